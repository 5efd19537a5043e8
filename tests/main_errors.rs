//! The command's failures end in one place (`report` in `main.rs`): each is
//! one `pitcher: ...` message on stderr and its exit status (2 for an
//! unknown `-s` signal, 1 otherwise), and nothing on stdout.

mod common;

use std::time::Duration;

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// A valid configuration with pid file and control socket in `dir` (no
/// master is started on it), plus `extra`.
fn write_config(dir: &tempfile::TempDir, extra: &str) -> String {
    let text = ConfigBuilder::new()
        .top(&format!("pid_file = \"{}/p.pid\"", dir.path().display()))
        .top(&format!("control_socket = \"{}/p.sock\"", dir.path().display()))
        .cluster("app", ["127.0.0.1:9001"])
        .route(None, "/", "app")
        .build(free_port());
    let path = dir.path().join("pitcher.toml");
    std::fs::write(&path, format!("{text}{extra}")).expect("write config");
    path.to_str().expect("utf-8 path").to_string()
}

fn assert_failed(out: &RunOutput, code: i32, message: &str) {
    assert_eq!(out.status.code(), Some(code), "output:\n{}", out.all());
    assert!(out.stderr.contains(&format!("pitcher: {message}")), "expected {message:?} in:\n{}", out.all());
    assert!(out.stdout.is_empty(), "a failure printed on stdout:\n{}", out.all());
}

#[test]
fn an_unknown_signal_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "");
    let out = run_pitcher(&["-c", &path, "-s", "bogus"], RUN_TIMEOUT);
    assert_failed(&out, 2, "unknown signal \"bogus\": expected reload, upgrade, quit, stop or reopen");
}

#[test]
fn a_config_test_names_the_module_table_and_says_the_test_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "\n[modules.throttle]\nburst = 1\n");
    let out = run_pitcher(&["-t", "-c", &path], RUN_TIMEOUT);
    assert_failed(&out, 1, &format!("{path}:"));
    assert!(out.stderr.contains("[modules.throttle]: ") && out.stderr.contains("rate_per_sec"), "{}", out.all());
    assert!(out.stderr.contains(&format!("pitcher: configuration file {path} test failed")), "{}", out.all());
}

#[test]
fn ctl_without_a_master_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "");
    let out = run_pitcher(&["-c", &path, "ctl", "status"], RUN_TIMEOUT);
    let socket = dir.path().join("p.sock");
    assert_failed(&out, 1, &format!("cannot reach the master at {}: ", socket.display()));
}

#[test]
fn a_signal_without_a_master_signals_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "");
    let out = run_pitcher(&["-c", &path, "-s", "reload"], RUN_TIMEOUT);
    assert_failed(&out, 1, "cannot reach the master: ");
    assert!(out.stderr.contains("not signalling: no pid in"), "{}", out.all());
}

#[test]
fn worker_mode_by_hand_is_refused() {
    let out = run_pitcher(&["--worker"], RUN_TIMEOUT);
    assert_failed(&out, 1, "--worker is for processes started by the master");
}
