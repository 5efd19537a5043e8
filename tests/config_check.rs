//! `pitcher -t -c FILE`: a good file is reported ok, a bad one is refused
//! with `<file>:<line>:` of the offending line and what is wrong with it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// A complete, valid configuration with pid file and control socket in `dir`.
fn good_config(dir: &std::path::Path) -> String {
    ConfigBuilder::new()
        .top(&format!("pid_file = \"{}/p.pid\"", dir.display()))
        .top(&format!("control_socket = \"{}/p.sock\"", dir.display()))
        .cluster_with("app", ["127.0.0.1:9001", "127.0.0.1:9002 weight=3"], "retries = 1")
        .route(Some("*.example.com"), "/", "app")
        .route(None, "/", "app")
        .section("[timeouts]\nupstream_read_ms = 1000")
        .build(free_port())
}

/// Writes `text` to `<dir>/pitcher.toml`.
fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("pitcher.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// 1-based number of the first line equal to `line` (after trimming).
fn line_of(text: &str, line: &str) -> usize {
    text.lines().position(|l| l.trim() == line).unwrap_or_else(|| panic!("{line:?} not in\n{text}")) + 1
}

fn check(path: &std::path::Path) -> RunOutput {
    run_pitcher(&["-t", "-c", path.to_str().expect("utf-8 path")], RUN_TIMEOUT)
}

#[test]
fn config_test_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &good_config(dir.path()));

    let out = check(&path);
    assert!(out.status.success(), "exit {}; output:\n{}", out.status, out.all());
    assert!(out.all().contains("configuration ok"), "output:\n{}", out.all());
}

#[test]
fn config_test_refuses_an_unknown_key_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = good_config(dir.path()).replace("retries = 1", "retries = 1\nbogus_key = 7");
    let path = write(&dir, &text);
    let line = line_of(&text, "bogus_key = 7");

    let out = check(&path);
    assert!(!out.status.success(), "a bad file passed; output:\n{}", out.all());
    let where_ = format!("{}:{line}:", path.display());
    assert!(out.all().contains(&where_), "expected {where_:?} in:\n{}", out.all());
    assert!(out.all().contains("bogus_key"), "the key is not named:\n{}", out.all());
    assert!(!out.all().contains("configuration ok"), "output:\n{}", out.all());
}

#[test]
fn config_test_refuses_a_route_to_an_undefined_cluster_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = good_config(dir.path()).replace(
        "host = \"*.example.com\"\npath_prefix = \"/\"\ncluster = \"app\"",
        "host = \"*.example.com\"\npath_prefix = \"/\"\ncluster = \"nope\"",
    );
    let path = write(&dir, &text);
    let line = line_of(&text, "cluster = \"nope\"");

    let out = check(&path);
    assert!(!out.status.success(), "a bad file passed; output:\n{}", out.all());
    let where_ = format!("{}:{line}:", path.display());
    assert!(out.all().contains(&where_), "expected {where_:?} in:\n{}", out.all());
    assert!(out.all().contains("nope"), "the cluster is not named:\n{}", out.all());
}

/// Token buckets are bounded: an absurd rate or burst (whose arithmetic
/// would overflow) is refused by `-t` with the file, the module table's
/// line and the limit.
#[test]
fn config_test_refuses_absurd_rates_and_bursts_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[modules.throttle]", "rate_per_sec = 18446744073709551\nburst = 20", "rate_per_sec", "10000000"),
        ("[modules.throttle]", "rate_per_sec = 100\nburst = 9000000000000000000", "burst", "10000000"),
        ("[modules.quota]", "rate_per_sec = 100000000000\nburst = 20", "rate_per_sec", "10000000"),
        ("[modules.quota]", "rate_per_sec = 100\nburst = 1000000000000", "burst", "10000000"),
        ("[modules.quota]", "max_keys = 100000", "max_keys", "4094"),
        ("[modules.quota]", "key_idle_ms = 5", "key_idle_ms", "86400000"),
    ];
    for (table, body, key, limit) in cases {
        let text = format!("{}\n{table}\n{body}\n", good_config(dir.path()));
        let path = write(&dir, &text);
        let line = line_of(&text, table);
        let out = check(&path);
        let all = out.all();
        assert!(!out.status.success(), "{table} {body:?} passed:\n{all}");
        assert!(all.contains(&format!("{}:{line}:", path.display())), "file and line {line} expected:\n{all}");
        assert!(all.contains(key) && all.contains(limit), "{key} and its limit {limit} expected:\n{all}");
    }
    // At the limits: accepted.
    let text = format!(
        "{}\n[modules.quota]\nrate_per_sec = 10000000\nburst = 10000000\nmax_keys = 4094\nkey_idle_ms = 86400000\n",
        good_config(dir.path())
    );
    let out = check(&write(&dir, &text));
    assert!(out.status.success(), "the bounds themselves are valid:\n{}", out.all());
}
