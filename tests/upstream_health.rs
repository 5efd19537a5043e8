//! Active health checks and slow start with two workers: the master probes
//! each backend once per interval (not once per worker), with the request
//! the documentation describes; a backend failing its probes (an error
//! status or no answer in time) is taken out of every worker's rotation and
//! comes back after `rise` good probes with a slow start; a backend added
//! by a reload ramps up too.
//!
//! The tests of this file run one at a time: they count probes per
//! interval and shares of traffic.

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::upstream::*;
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(nodes: &[&Node], extra: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .top("workers = 2")
        .cluster_with("app", nodes.iter().map(|n| n.spec()), extra)
        .route(None, "/", "app")
}

/// A node whose `/health` answers the status in `health` (200 at first)
/// and everything else 200.
fn checked_node(name: &str) -> (Node, Arc<AtomicU16>) {
    let health = Arc::new(AtomicU16::new(200));
    let h = health.clone();
    let n = Node::with_handler(name, move |hit| {
        if hit.target == "/health" {
            match h.load(Ordering::SeqCst) {
                200 => Act::Ok,
                0 => Act::Hang,
                s => Act::Status(s),
            }
        } else {
            Act::Ok
        }
    });
    (n, health)
}

#[test]
fn one_probe_per_backend_per_interval_whatever_the_number_of_workers() {
    let _g = serial();
    let (a, b) = (Node::start("a"), Node::start("b"));
    let extra = "health_check = { path = \"/health\", interval_ms = 200, timeout_ms = 500, rise = 2, fall = 2 }";
    let m = MasterRun::start(&config(&[&a, &b], extra));
    assert_eq!(worker_pids(&m).len(), 2);
    assert!(
        wait_until(Duration::from_secs(5), || a.probes() >= 1 && b.probes() >= 1),
        "no probe within 5 s: a {} b {}\n{}",
        a.probes(),
        b.probes(),
        m.log()
    );
    thread::sleep(Duration::from_millis(100));
    let (a0, b0) = (a.probes(), b.probes());
    thread::sleep(Duration::from_secs(2));
    let (da, db) = (a.probes() - a0, b.probes() - b0);
    assert!((7..=13).contains(&da) && (7..=13).contains(&db), "probes in 2 s at 200 ms: a {da}, b {db} (10 expected)");

    // The probe: GET <path>, the health-check User-Agent, Connection:
    // close, each on a connection of its own; no other request.
    let hits = a.hits();
    for h in &hits {
        assert!(h.is_probe(), "unexpected request {} {}", h.method, h.target);
        assert_eq!((h.method.as_str(), h.target.as_str()), ("GET", "/health"));
        assert_eq!(h.headers.tokens("connection"), ["close"], "{:?}", h.headers);
        assert!(h.headers.get("host").is_some(), "{:?}", h.headers);
    }
    let conns: std::collections::BTreeSet<usize> = hits.iter().map(|h| h.conn).collect();
    assert_eq!(conns.len(), hits.len(), "one connection per probe");

    // ctl counts the same probes, once.
    let (table, rows) = upstreams(&m);
    for (n, r) in [(&a, &rows[0]), (&b, &rows[1])] {
        assert_eq!(r.backend, n.spec(), "{table}");
        assert!(r.health_checked, "{table}");
        assert_eq!(r.state, "healthy", "{table}");
        let seen = n.probes() as u64;
        assert!(
            r.probes + 1 >= seen && r.probes <= seen + 1,
            "ctl says {} probes, {} got {seen}:\n{table}",
            r.probes,
            n.name()
        );
        assert_eq!(r.requests, 0, "probes are not requests:\n{table}");
    }
}

#[test]
fn failing_health_check_takes_a_backend_out_and_it_comes_back_with_a_slow_start() {
    let _g = serial();
    let a = Node::start("a");
    let (b, health) = checked_node("b");
    let slow_start = Duration::from_millis(3000);
    let extra = format!(
        "slow_start_ms = {}\nhealth_check = {{ path = \"/health\", interval_ms = 100, timeout_ms = 300, rise = 2, fall = 2 }}",
        slow_start.as_millis()
    );
    let m = MasterRun::start(&config(&[&a, &b], &extra));
    assert!(wait_until(Duration::from_secs(5), || b.probes() >= 2), "no probes");
    let load = Hammer::start(m.addr(), 3, Duration::from_millis(2));
    assert!(load.wait_more(200, Duration::from_secs(10)));
    assert!(b.traffic() > 50, "b serves before its check fails: {}", b.traffic());

    // 503 on /health: down after 2 failed probes, for every worker.
    health.store(503, Ordering::SeqCst);
    let failing = Instant::now();
    wait_row(&m, "app", &b.spec(), Duration::from_secs(5), |r| r.state == "down")
        .unwrap_or_else(|| panic!("b not down: {}", upstreams(&m).0));
    assert!(failing.elapsed() < Duration::from_secs(2), "down after {:?} (fall 2 x 100 ms)", failing.elapsed());
    thread::sleep(Duration::from_millis(200));
    let n0 = b.traffic();
    let served = load.total();
    thread::sleep(Duration::from_secs(1));
    assert!(load.total() > served + 100, "load stalled");
    assert_eq!(b.traffic(), n0, "a backend that is down got traffic");
    assert!(!log_lines(&m, &["backend is down", &b.spec()]).is_empty(), "{}", m.log());

    // Healthy again: up after 2 good probes, then a slow start.
    health.store(200, Ordering::SeqCst);
    let r = wait_row(&m, "app", &b.spec(), Duration::from_secs(5), |r| r.state != "down")
        .unwrap_or_else(|| panic!("b not up again: {}", upstreams(&m).0));
    let asked = Instant::now();
    assert_eq!(r.state, "slow_start", "{r:?}");
    let up = asked - slow_start * r.slow_start_percent as u32 / 100;
    let end = up + slow_start + Duration::from_millis(1300);
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let report = load.finish();
    let nodes = [&a, &b];
    let share = |from: Instant, to: Instant| {
        let total: usize = nodes.iter().map(|n| n.traffic_between(from, to)).sum();
        (b.traffic_between(from, to) as f64 / total.max(1) as f64, total)
    };
    let first = share(up, up + Duration::from_secs(1));
    let last = share(up + slow_start + Duration::from_millis(100), end - Duration::from_millis(200));
    eprintln!("share of b: first second of its slow start {first:?}, after it {last:?}");
    assert!(first.1 >= 100 && last.1 >= 100, "too few requests to measure: {first:?} {last:?}");
    // Weight from 10% to 40% in the first second: about 20% of the
    // traffic; then 50%.
    assert!(first.0 < 0.33, "no slow start after health up: {first:?} then {last:?}");
    assert!(last.0 > 0.4 && last.0 < 0.6, "full share after the slow start: {last:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!log_lines(&m, &["backend is up again", &b.spec()]).is_empty(), "{}", m.log());
}

#[test]
fn a_probe_that_times_out_is_a_failure() {
    let _g = serial();
    let a = Node::start("a");
    let (b, health) = checked_node("b");
    let extra = "health_check = { path = \"/health\", interval_ms = 100, timeout_ms = 200, rise = 1, fall = 2 }";
    let m = MasterRun::start(&config(&[&a, &b], extra));
    assert!(wait_until(Duration::from_secs(5), || b.probes() >= 1), "no probes");
    health.store(0, Ordering::SeqCst); // hang
    wait_row(&m, "app", &b.spec(), Duration::from_secs(5), |r| r.state == "down")
        .unwrap_or_else(|| panic!("a backend that does not answer its probes is not down: {}", upstreams(&m).0));
    for i in 0..20 {
        let r = get_new_conn(m.addr(), &format!("/t/{i}"), &[]).expect("request");
        assert_eq!(r.header("x-backend"), Some("a"));
    }
    health.store(200, Ordering::SeqCst);
    wait_row(&m, "app", &b.spec(), Duration::from_secs(5), |r| r.state != "down")
        .unwrap_or_else(|| panic!("b not up again: {}", upstreams(&m).0));
}

/// Starts a load, reloads to `to`, and returns the share of `node` in the
/// first second after the reload and after the slow start.
fn share_after_reload(
    m: &mut MasterRun,
    to: &ConfigBuilder,
    node: &Node,
    nodes: &[&Node],
    slow: Duration,
) -> (f64, f64) {
    let load = Hammer::start(m.addr(), 3, Duration::from_millis(2));
    assert!(load.wait_more(100, Duration::from_secs(10)));
    reload(m, to);
    let at = Instant::now();
    let r = row(m, "app", &node.spec());
    let end = at + slow + Duration::from_millis(1300);
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let report = load.finish();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let share = |from: Instant, to: Instant| {
        let total: usize = nodes.iter().map(|n| n.traffic_between(from, to)).sum();
        assert!(total >= 100, "too few requests to measure: {total}");
        node.traffic_between(from, to) as f64 / total as f64
    };
    let (first, last) = (share(at, at + Duration::from_secs(1)), share(at + slow + Duration::from_millis(100), end));
    eprintln!(
        "{} right after the reload: {r:?}; share first second {first:.3}, after the slow start {last:.3}",
        node.name()
    );
    assert_eq!(r.state, "slow_start", "a backend added by a reload starts slowly: {r:?}");
    (first, last)
}

#[test]
fn a_backend_added_by_a_reload_ramps_up() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    let slow = Duration::from_millis(3000);
    let extra = format!("slow_start_ms = {}", slow.as_millis());
    let mut m = MasterRun::start(&config(&[&a, &b], &extra));
    let (first, last) = share_after_reload(&mut m, &config(&[&a, &b, &c], &extra), &c, &[&a, &b, &c], slow);
    // From 10% to 40% of its weight in the first second: about 11%; then 33%.
    assert!(first < 0.2 && last > 0.26 && last < 0.41, "{first} then {last}");
}

#[test]
fn a_backend_removed_and_added_again_ramps_up_again() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    let slow = Duration::from_millis(3000);
    let extra = format!("slow_start_ms = {}", slow.as_millis());
    let mut m = MasterRun::start(&config(&[&a, &b, &c], &extra));
    for i in 0..30 {
        assert_eq!(get_new_conn(m.addr(), &format!("/{i}"), &[]).expect("request").status, 200);
    }
    reload(&mut m, &config(&[&a, &b], &extra));
    let (first, last) = share_after_reload(&mut m, &config(&[&a, &b, &c], &extra), &c, &[&a, &b, &c], slow);
    assert!(first < 0.2 && last > 0.26 && last < 0.41, "{first} then {last}");
}

#[test]
fn down_state_survives_a_reload_and_ends_when_health_checks_are_switched_off() {
    let _g = serial();
    let a = Node::start("a");
    let (b, health) = checked_node("b");
    let checked = "health_check = { path = \"/health\", interval_ms = 100, timeout_ms = 300, rise = 2, fall = 2 }";
    let builder = config(&[&a, &b], checked);
    let mut m = MasterRun::start(&builder);
    health.store(503, Ordering::SeqCst);
    wait_row(&m, "app", &b.spec(), Duration::from_secs(5), |r| r.state == "down")
        .unwrap_or_else(|| panic!("b not down: {}", upstreams(&m).0));

    // An unrelated change: b stays down.
    let other = Node::start("other");
    reload(&mut m, &builder.clone().cluster("other", [other.spec()]).route(Some("other.example"), "/", "other"));
    assert_eq!(row(&m, "app", &b.spec()).state, "down", "{}", upstreams(&m).0);
    for i in 0..10 {
        assert_eq!(get_new_conn(m.addr(), &format!("/kept/{i}"), &[]).expect("request").header("x-backend"), Some("a"));
    }
    assert_eq!(b.traffic(), 0);

    // Health checks switched off for the cluster: nothing will ever probe
    // b again, so nothing may keep it out of the rotation.
    reload(&mut m, &config(&[&a, &b], ""));
    thread::sleep(Duration::from_millis(300));
    let probes = b.probes();
    for i in 0..20 {
        assert_eq!(get_new_conn(m.addr(), &format!("/unchecked/{i}"), &[]).expect("request").status, 200);
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(b.probes(), probes, "probed after health checks were switched off");
    let r = row(&m, "app", &b.spec());
    assert!(
        b.traffic() > 0 && r.state != "down",
        "b is no longer checked but stays down for good: {r:?}, {} requests reached it",
        b.traffic()
    );
}

#[test]
fn unix_socket_backends_are_probed_with_a_valid_host() {
    let _g = serial();
    let a = Node::start("a");
    let u = Backend::unix("u");
    let extra = "health_check = { path = \"/health\", interval_ms = 100, timeout_ms = 300, rise = 1, fall = 1 }";
    let m = MasterRun::start(
        &ConfigBuilder::new()
            .top("workers = 2")
            .cluster_with("app", [a.spec(), u.spec()], extra)
            .route(None, "/", "app"),
    );
    assert!(u.wait_for_requests(2, Duration::from_secs(5)), "the unix backend is not probed");
    let probe = u.recorded().into_iter().next().expect("probe");
    assert_eq!(probe.header("user-agent"), Some(PROBE_AGENT));
    assert_eq!(row(&m, "app", &u.spec()).state, "healthy");
    // RFC 9110: Host = uri-host [ ":" port ]; a socket path is not one,
    // and strict servers answer 400 to it (the backend would then be down).
    let host = probe.header("host").unwrap_or_default().to_string();
    assert!(
        !host.is_empty() && !host.contains('/'),
        "probe of a unix-socket backend sends an invalid Host: {host:?}\n{}",
        probe.head_str()
    );
}
