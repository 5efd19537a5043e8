//! A panic while handling one connection (injected with the test-only
//! `fault-injection` feature: `cargo test --features fault-injection`)
//! closes that connection only: it is written to the error log with its
//! message and place, and the worker goes on serving its other clients.
#![cfg(feature = "fault-injection")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::master::MasterRun;
use common::*;

#[test]
fn a_panic_closes_its_connection_only_and_is_in_the_error_log_of_a_daemon() {
    let backend = Backend::start("A");
    let builder = ConfigBuilder::new()
        .top("workers = 1")
        .top("error_log = \"@DIR@/error.log\"")
        .cluster_with("app", [backend.spec()], "keepalive = 8")
        .route(None, "/", "app");
    let mut m = MasterRun::prepare(&builder);
    // Without --foreground: a daemon, whose stderr is not a terminal.
    let out = Command::new(m.exe()).arg("-c").arg(m.config_path()).stdin(Stdio::null()).output().expect("run pitcher");
    assert!(out.status.success(), "{out:?}");
    let before = m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}")).worker_pids();
    assert_eq!(before.len(), 1);

    // A client of the same worker with a kept-alive connection.
    let mut other = m.client();
    assert_eq!(other.get("test.example", "/before").status, 200);

    let mut victim = m.client();
    victim.send(&request_bytes("GET", "test.example", "/boom", &[("X-Pitcher-Test-Panic", "1")], b""));
    let got = victim.read_to_eof().unwrap_or_default();
    assert!(got.is_empty(), "the panicking connection got {:?}", String::from_utf8_lossy(&got));

    // The same connection of the other client, and new connections, are served.
    let r = other.get("test.example", "/after");
    assert_eq!(r.status, 200, "{}", r.head_str());
    for _ in 0..3 {
        assert_eq!(get_once(m.addr(), "test.example", "/new").status, 200);
    }
    let after = m.expect_status().worker_pids();
    assert_eq!(before, after, "the worker was replaced");

    // The backend connection the panicking session held was given back:
    // no request is counted as active on the backend any more.
    let out = m.command(&["ctl", "upstreams"]);
    assert!(out.status.success(), "{out:?}");
    let line = out.stdout.lines().find(|l| l.contains(&backend.spec())).unwrap_or_else(|| panic!("{}", out.stdout));
    assert_eq!(line.split_whitespace().nth(6), Some("0"), "ACTIVE after the panic:\n{}", out.stdout);

    let log = std::fs::read_to_string(m.dir().join("error.log")).expect("read error.log");
    let line = log
        .lines()
        .find(|l| l.contains("panic while handling a connection"))
        .unwrap_or_else(|| panic!("no panic line in the error log:\n{log}"));
    assert!(line.contains("fault injection: X-Pitcher-Test-Panic"), "{line}");
    let place = line.split("src/proxy/request.rs:").nth(1).unwrap_or_else(|| panic!("no file:line in {line}"));
    assert!(place.starts_with(|c: char| c.is_ascii_digit()), "{line}");
    assert!(line.contains("panics_total: 1"), "{line}");
    m.stop();
}
