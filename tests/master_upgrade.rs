//! Binary upgrade details: the listening sockets themselves are handed to
//! the new master (TCP and Unix, never bound again), the binary started is
//! the one now at the path the master was started from, an upgrade the new
//! binary cannot complete (here: it refuses the configuration) is rolled
//! back, and the `.oldbin` pid file is left to the generation it names.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::master::{alive, copy_executable, wait_gone, write_executable, MasterRun};
use common::pitcher::PITCHER;
use common::*;

fn config(a: &Backend, workers: usize) -> ConfigBuilder {
    ConfigBuilder::new()
        .top(&format!("workers = {workers}"))
        .top("drain_timeout_ms = 1500")
        .top("upgrade_timeout_ms = 3000")
        .cluster("a", [a.spec()])
        .route(None, "/", "a")
}

/// Inodes of the listening TCP sockets on `port` (from `/proc/net/tcp`).
fn tcp_listen_inodes(port: u16) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            (f.len() > 9 && f[1].ends_with(&local) && f[3] == "0A").then(|| f[9].parse().ok()).flatten()
        })
        .collect()
}

/// Inodes of the listening Unix sockets bound to `path`.
fn unix_listen_inodes(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let p = path.display().to_string();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Flags 00010000 = listening.
            (f.len() > 7 && f[7] == p && f[3] == "00010000").then(|| f[6].parse().ok()).flatten()
        })
        .collect()
}

/// A GET over a Unix-socket listener; the raw response.
fn get_over_unix(path: &Path) -> String {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /unix HTTP/1.1\r\nHost: u.example\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}

#[test]
fn upgrade_hands_the_same_tcp_and_unix_listening_sockets_to_the_new_master() {
    let a = Backend::start("A");
    let builder = config(&a, 2).section("[[listeners]]\naddress = \"unix:@DIR@/front.sock\"");
    let mut m = MasterRun::start(&builder);
    let sock = m.dir().join("front.sock");
    let tcp_before = tcp_listen_inodes(m.port());
    let unix_before = unix_listen_inodes(&sock);
    assert_eq!(tcp_before.len(), 1, "one TCP listening socket: {tcp_before:?}");
    assert_eq!(unix_before.len(), 1, "one Unix listening socket: {unix_before:?}");
    assert!(get_over_unix(&sock).ends_with("ok from A"));
    let old = m.pid().unwrap();

    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().unwrap();
    m.track(new);
    assert!(wait_gone(old, Duration::from_secs(5)), "old master exits");

    assert_eq!(tcp_listen_inodes(m.port()), tcp_before, "the TCP listener is the same socket, not bound again");
    assert_eq!(unix_listen_inodes(&sock), unix_before, "the Unix listener is the same socket, not bound again");
    let st = m.expect_status();
    assert_eq!(st.listeners.len(), 2, "{st:?}");
    assert!(get_over_unix(&sock).ends_with("ok from A"));
    assert_eq!(get_once(m.addr(), "t.example", "/").body_str(), "ok from A");
}

#[test]
fn upgrade_starts_the_binary_now_at_the_path_the_master_was_started_from_even_through_a_symlink() {
    let a = Backend::start("A");
    let mut m = MasterRun::prepare(&config(&a, 1));
    // Operators often start /usr/sbin/pitcher as a symlink to a versioned
    // file and upgrade by pointing the symlink at the next version.
    let v1 = m.dir().join("sbin/pitcher-1");
    copy_executable(Path::new(PITCHER), &v1);
    let link = m.dir().join("sbin/pitcher-current");
    std::os::unix::fs::symlink(&v1, &link).expect("symlink");
    let child = std::process::Command::new(&link)
        .arg("--foreground")
        .arg("-c")
        .arg(m.config_path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(m.log_path()).expect("log"))
        .spawn()
        .expect("start the master through the symlink");
    m.track(child.id());
    m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let old = m.pid().unwrap();

    // Version 2: records that it ran, then is the real binary.
    let marker = m.dir().join("v2-ran");
    let v2 = m.dir().join("sbin/pitcher-2");
    write_executable(&v2, &format!("#!/bin/sh\necho \"$@\" > '{}'\nexec '{PITCHER}' \"$@\"\n", marker.display()));
    let tmp_link = m.dir().join("sbin/.pitcher-current.new");
    std::os::unix::fs::symlink(&v2, &tmp_link).expect("symlink v2");
    std::fs::rename(&tmp_link, &link).expect("repoint the symlink");

    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    m.track(m.pid().unwrap());
    assert!(
        marker.exists(),
        "the upgrade started {} (the file now at the master's path), not {}",
        v2.display(),
        v1.display()
    );
    assert!(wait_gone(old, Duration::from_secs(5)));
    drop(child);
}

#[test]
fn upgrade_with_a_configuration_the_new_binary_refuses_is_rolled_back() {
    let a = Backend::start("A");
    let mut m = MasterRun::start(&config(&a, 2));
    let old = m.pid().unwrap();
    let workers = m.expect_status().worker_pids();
    let good = m.config_text(m.builder());

    // Without a configuration test first: the new master refuses the file.
    m.write_config_text(&format!("no_such_key = 1\n{good}"));
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("rolled back"), "{out:?}");
    assert_eq!(m.pid(), Some(old), "pid file restored");
    assert!(!m.oldbin().exists());
    let st = m.expect_status();
    assert_eq!(st.master_pid, old);
    assert_eq!(st.worker_pids(), workers);
    assert_eq!(get_once(m.addr(), "t.example", "/").body_str(), "ok from A");

    // Fixed: the upgrade goes through.
    m.write_config_text(&good);
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    m.track(m.pid().unwrap());
    assert!(wait_gone(old, Duration::from_secs(5)));
}

#[test]
fn old_generation_draining_leaves_the_oldbin_pid_file_of_a_later_upgrade_alone() {
    let a = Backend::start("A");
    // Long enough drain that generation 1 is still there during upgrade 2.
    // The hanging upgrade 2 must still be pending when generation 1 exits:
    // its timeout is far past generation 1's drain deadline, so a loaded
    // machine cannot reorder the two.
    let mut m = MasterRun::start(&config(&a, 1).top("drain_timeout_ms = 2500").top("upgrade_timeout_ms = 8000"));
    let gen1 = m.pid().unwrap();
    // A request head still arriving keeps generation 1 draining until its
    // deadline (an idle keep-alive connection would move to generation 2).
    let mut idle = m.client();
    assert_eq!(idle.get("t.example", "/").body_str(), "ok from A");
    idle.send(b"GET /late HTTP/1.1\r\nHost: t.example\r\n");

    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let gen2 = m.pid().unwrap();
    m.track(gen2);
    assert!(alive(gen1), "generation 1 drains");

    // Upgrade 2 with a binary that hangs: generation 2's pid file is
    // .oldbin until the 8 s timeout; generation 1 exits meanwhile.
    m.install_script("#!/bin/sh\nexec sleep 60\n");
    let cfg = m.config_path().display().to_string();
    let pending = std::thread::spawn(move || run_pitcher(&["-c", &cfg, "-s", "upgrade"], Duration::from_secs(30)));
    assert!(common::wait_until(Duration::from_secs(2), || m.oldbin().exists()), "upgrade 2 started");
    assert!(wait_gone(gen1, Duration::from_secs(4)), "generation 1 exits at its drain deadline");
    assert_eq!(
        common::master::read_pid(&m.oldbin()),
        Some(gen2),
        "generation 1 must not remove the .oldbin of generation 2 on its way out"
    );
    let out = pending.join().expect("thread");
    assert!(!out.status.success() && out.stderr.contains("rolled back"), "{out:?}");
    assert_eq!(m.pid(), Some(gen2), "generation 2's pid file is restored");
    assert!(!m.oldbin().exists());
    assert!(!m.log().contains("cannot restore the pid file"), "{}", m.log());
    assert_eq!(m.expect_status().master_pid, gen2);
}

/// A gate that backend handlers wait at (bounded) until it opens.
#[derive(Clone, Default)]
struct Gate(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Gate {
    fn open(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn wait(&self) {
        common::wait_until(Duration::from_secs(20), || self.0.load(std::sync::atomic::Ordering::SeqCst));
    }
}

/// Regression: the new generation's workers took the places (indices in
/// the shared per-worker tables) of the old generation, which was still
/// draining on them; when an old worker exited, its master cleared the
/// place's counts, and the new generation's requests in flight for a quota
/// key were forgotten, so the key got more than its concurrency limit.
#[test]
fn quota_concurrency_is_exact_across_a_binary_upgrade() {
    let (old_gate, new_gate, last_gate) = (Gate::default(), Gate::default(), Gate::default());
    let gates = (old_gate.clone(), new_gate.clone(), last_gate.clone());
    let a = Backend::with_handler("A", move |r| {
        let p = r.path();
        if p.starts_with("/old") {
            gates.0.wait();
        } else if p.starts_with("/hold") {
            gates.1.wait();
        } else if p.starts_with("/last") {
            gates.2.wait();
        }
        Reply::ok("ok from A")
    });
    let builder = config(&a, 2)
        .top("drain_timeout_ms = 20000")
        .section("[modules.quota]\nkey = \"header:X-Tenant\"\nconcurrency = 3\nstatus = 429\n");
    let mut m = MasterRun::start(&builder);
    let addr = m.addr();
    let tenant = [("X-Tenant", "t")];
    let held = |path: String| std::thread::spawn(move || common::upstream::get_new_conn(addr, &path, &tenant));
    let status = |path: &str| common::upstream::get_new_conn(addr, path, &tenant).expect("request").status;
    let join_ok = |threads: Vec<std::thread::JoinHandle<Result<Response, String>>>| {
        for t in threads {
            let r = t.join().expect("client thread").expect("response");
            assert_eq!(r.status, 200, "{}", r.head_str());
        }
    };

    // Two requests in flight on the old generation.
    let old_reqs: Vec<_> = (0..2).map(|i| held(format!("/old/{i}"))).collect();
    assert!(a.wait_for_requests(2, Duration::from_secs(10)), "the old generation's requests arrived");
    let old = m.pid().expect("master pid");

    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().expect("new master pid");
    m.track(new);
    assert_ne!(new, old);
    assert!(alive(old), "the old generation drains its requests");

    // One on the new generation: the key's count is global across both.
    let mut new_reqs = vec![held("/hold/0".into())];
    assert!(a.wait_for_requests(3, Duration::from_secs(10)), "the new generation's request arrived");
    assert_eq!(status("/full/1"), 429, "2 old + 1 new in flight: the limit of 3 is reached");

    // The old generation finishes and exits.
    old_gate.open();
    join_ok(old_reqs);
    assert!(
        wait_gone(old, Duration::from_secs(15)),
        "the old master exits after its workers: {:?}\n{}",
        m.family(),
        m.log()
    );

    // 1 in flight on the new generation: exactly 2 more are admitted.
    new_reqs.push(held("/hold/1".into()));
    new_reqs.push(held("/hold/2".into()));
    assert!(a.wait_for_requests(5, Duration::from_secs(10)), "two more requests admitted");
    assert_eq!(
        status("/full/2"),
        429,
        "the old workers' exit must not clear the new generation's count (3 in flight)\n{}",
        m.log()
    );
    new_gate.open();
    join_ok(new_reqs);
    // A worker gives the count back just after the response is written:
    // wait until no key has a request in flight (`ctl modules`).
    let idle = common::wait_until(Duration::from_secs(10), || {
        let out = m.command(&["ctl", "--json", "modules"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        v["data"]["quota"]["keys_in_flight"] == 0
    });
    assert!(idle, "the finished requests gave their counts back");

    // Nothing in flight: exactly 3 again (no count left below zero or above).
    let last: Vec<_> = (0..3).map(|i| held(format!("/last/{i}"))).collect();
    assert!(a.wait_for_requests(8, Duration::from_secs(10)), "3 admitted with nothing else in flight");
    assert_eq!(status("/full/3"), 429, "and not a 4th");
    last_gate.open();
    join_ok(last);
    assert_eq!(status("/after"), 200);
}
