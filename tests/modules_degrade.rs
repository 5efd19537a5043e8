//! Automatic degradation with the real binary (one worker, so that one
//! worker surely sees the whole load): requests held in flight by a slow
//! backend raise the worker's overload level; a short spike does not; at
//! level 1 the non-essential modules are off, at level 2 the low-priority
//! routes are answered 503 while the others still work; when the load ends
//! the level drops back to 0 after `restore_ms` and the modules are on
//! again. Every change is logged and shown by `pitcher ctl modules`.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::master::{Load, LoadSpec, MasterRun};
use common::*;

/// Longest wait for a level change (window 500 ms, restore 1000 ms, a
/// backend answering within 1 s).
const LEVEL_WAIT: Duration = Duration::from_secs(8);

/// Backend delay of the requests that make the load.
const SLOW: Duration = Duration::from_millis(1000);

fn config(be: &Backend) -> ConfigBuilder {
    config_with(be, "window_ms = 500\nrestore_ms = 1000")
}

fn config_with(be: &Backend, window: &str) -> ConfigBuilder {
    // Busy-ratio thresholds out of reach: the test drives the level by
    // requests in flight only.
    ConfigBuilder::new().cluster("app", [be.spec()]).section(
        &r#"
[[routes]]
name = "reports"
path_prefix = "/low"
cluster = "app"
priority = "low"

[[routes]]
name = "main"
path_prefix = "/"
cluster = "app"

[modules]
order = ["degrade", "headers"]

[modules.degrade]
in_flight_high = 8
in_flight_low = 2
shed_in_flight = 30
busy_high_percent = 100
busy_low_percent = 100
shed_busy_percent = 100
@WINDOW@

[modules.headers]
essential = false
response_set = { "X-Extra" = "on" }
"#
        .replace("@WINDOW@", window),
    )
}

/// The worker's row of `ctl --json modules`.
fn worker_row(m: &MasterRun) -> serde_json::Value {
    let out = m.command(&["ctl", "--json", "modules"]);
    assert!(out.status.success(), "ctl --json modules: {out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    v["data"]["workers"][0].clone()
}

fn level(m: &MasterRun) -> u64 {
    worker_row(m)["level"].as_u64().unwrap_or_else(|| panic!("no level in {}", worker_row(m)))
}

fn wait_level(m: &MasterRun, want: impl Fn(u64) -> bool, what: &str) -> u64 {
    let mut last = 0;
    let ok = wait_until(LEVEL_WAIT, || {
        last = level(m);
        want(last)
    });
    assert!(ok, "{what}: level stayed {last}; worker {}\n{}", worker_row(m), m.log());
    last
}

/// "load level changed" lines of the log that moved to `to`.
fn changes_to(m: &MasterRun, to: u64) -> usize {
    m.log().lines().filter(|l| l.contains("load level changed") && l.contains(&format!("to: {to},"))).count()
}

fn slow_load(m: &MasterRun, threads: usize) -> Load {
    load_on(m, "/slow", threads)
}

fn load_on(m: &MasterRun, path: &str, threads: usize) -> Load {
    Load::start(LoadSpec {
        addr: m.addr(),
        host: "app".into(),
        path: path.into(),
        keepalive: threads,
        per_request: 0,
        interval: Duration::ZERO,
        bodies: vec![b"ok from a".to_vec()],
    })
}

#[test]
fn overload_switches_non_essential_modules_off_sheds_low_priority_routes_and_restores() {
    let be = Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path().starts_with("/slow") {
            reply.delayed(SLOW)
        } else if r.path().starts_with("/spike") {
            reply.delayed(Duration::from_millis(100))
        } else {
            reply
        }
    });
    let m = MasterRun::start(&config(&be));
    let addr = m.addr();

    let r = get_once(addr, "app", "/");
    assert_ok_body(&r, b"ok from a");
    assert_eq!(r.header("x-extra"), Some("on"), "{}", r.head_str());
    assert_eq!(level(&m), 0);

    // A spike shorter than the window is not overload.
    let spike: Vec<_> = (0..12).map(|i| thread::spawn(move || get_once(addr, "app", &format!("/spike/{i}")))).collect();
    for t in spike {
        assert_ok_body(&t.join().expect("spike thread"), b"ok from a");
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(level(&m), 0, "a 100 ms spike changed the level:\n{}", m.log());
    assert_eq!(changes_to(&m, 1), 0, "{}", m.log());

    // Level 1: 12 requests in flight (over in_flight_high = 8) for longer
    // than the window.
    let base = slow_load(&m, 12);
    let t0 = Instant::now();
    let l = wait_level(&m, |l| l >= 1, "12 requests in flight");
    assert!(t0.elapsed() >= Duration::from_millis(400), "level {l} before the window of 500 ms passed");
    assert!(wait_until(Duration::from_secs(3), || changes_to(&m, 1) >= 1), "no log line:\n{}", m.log());
    let row = worker_row(&m);
    assert!(row["in_flight"].as_u64().unwrap_or(0) >= 8, "{row}");
    assert!(row["level_changes"].as_u64().unwrap_or(0) >= 1, "{row}");
    let out = m.command(&["ctl", "modules"]);
    assert!(out.status.success() && out.stdout.contains("LEVEL"), "{out:?}");
    let r = get_once(addr, "app", "/during");
    assert_ok_body(&r, b"ok from a");
    assert!(r.header("x-extra").is_none(), "a non-essential module ran at level 1:\n{}", r.head_str());
    let r = get_once(addr, "app", "/low/report");
    assert_ok_body(&r, b"ok from a");

    // Level 2: 36 in flight, over shed_in_flight = 30.
    let more = slow_load(&m, 24);
    wait_level(&m, |l| l >= 2, "36 requests in flight");
    assert!(wait_until(Duration::from_secs(3), || changes_to(&m, 2) >= 1), "no log line:\n{}", m.log());
    let before = be.requests();
    let r = get_once(addr, "app", "/low/report");
    assert_eq!(r.status, 503, "a low-priority route at level 2:\n{}", r.head_str());
    assert!(r.header("retry-after").is_some(), "{}", r.head_str());
    assert!(
        !be.recorded()[before..].iter().any(|q| q.path().starts_with("/low")),
        "the shed request reached the backend"
    );
    let r = get_once(addr, "app", "/normal");
    assert_ok_body(&r, b"ok from a");
    assert!(r.header("x-extra").is_none(), "{}", r.head_str());

    // The load ends: back to 0 after restore_ms of calm.
    let more = more.finish();
    let base = base.finish();
    for rep in [&base, &more] {
        assert!(
            rep.failures.is_empty(),
            "the normal route failed under overload: {}\n{:?}",
            rep.summary(),
            rep.failures
        );
    }
    wait_level(&m, |l| l == 0, "the load ended");
    assert!(wait_until(Duration::from_secs(3), || changes_to(&m, 0) >= 1), "no log line:\n{}", m.log());
    let r = get_once(addr, "app", "/after");
    assert_eq!(r.header("x-extra"), Some("on"), "the module is back:\n{}", r.head_str());
    let r = get_once(addr, "app", "/low/after");
    assert_ok_body(&r, b"ok from a");
}

#[test]
fn a_request_count_window_needs_that_many_requests_seen_overloaded() {
    let be = Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path().starts_with("/hold") {
            reply.delayed(Duration::from_millis(2500))
        } else {
            reply
        }
    });
    let m = MasterRun::start(&config_with(&be, "window_ms = 0\nwindow_requests = 40\nrestore_ms = 500"));
    let addr = m.addr();

    // 10 requests held in flight (over in_flight_high = 8), seen by a
    // load measurement.
    let hold = load_on(&m, "/hold", 10);
    let seen = wait_until(Duration::from_secs(5), || worker_row(&m)["in_flight"].as_u64().unwrap_or(0) >= 8);
    assert!(seen, "the held requests were not counted: {}", worker_row(&m));
    // However long it lasts, fewer than 40 requests are not overload.
    thread::sleep(Duration::from_millis(300));
    for i in 0..10 {
        assert_ok_body(&get_once(addr, "app", &format!("/few/{i}")), b"ok from a");
    }
    assert_eq!(level(&m), 0, "level changed after about 10 requests of a 40-request window:\n{}", m.log());
    // 40 more requests while overloaded: level 1.
    for i in 0..40 {
        assert_ok_body(&get_once(addr, "app", &format!("/many/{i}")), b"ok from a");
    }
    wait_level(&m, |l| l >= 1, "50 requests seen overloaded");
    let r = get_once(addr, "app", "/check");
    assert!(r.header("x-extra").is_none(), "{}", r.head_str());

    let rep = hold.finish();
    assert!(rep.failures.is_empty(), "{:?}", rep.failures);
    wait_level(&m, |l| l == 0, "the load ended");
    assert!(wait_until(Duration::from_secs(3), || changes_to(&m, 0) >= 1), "no log line:\n{}", m.log());
    assert_eq!(get_once(addr, "app", "/after").header("x-extra"), Some("on"));
}

/// Regression: a reload that removed `[modules.degrade]` while a worker
/// was overloaded set its level back to 0 silently: `ctl modules` kept
/// showing the old level and nothing was logged.
#[test]
fn a_reload_without_degrade_brings_the_published_level_back_to_0() {
    let be = Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path().starts_with("/slow") {
            reply.delayed(SLOW)
        } else {
            reply
        }
    });
    let mut m = MasterRun::start(&config(&be));
    let load = slow_load(&m, 12);
    wait_level(&m, |l| l >= 1, "12 requests in flight");

    let without = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[modules.headers]\nessential = false\nresponse_set = { \"X-Extra\" = \"on\" }\n");
    common::upstream::reload(&mut m, &without);
    let r = get_once(m.addr(), "app", "/after-reload");
    assert_eq!(r.header("x-extra"), Some("on"), "no controller, no shedding:\n{}", r.head_str());
    wait_level(&m, |l| l == 0, "degrade removed by a reload");
    assert!(changes_to(&m, 0) >= 1, "the change of level is logged:\n{}", m.log());
    let rep = load.finish();
    assert!(rep.failures.is_empty(), "{:?}", rep.failures);
}
