//! Passive failure detection with two workers sharing one state: a backend
//! that crashes or is killed under load is ejected by every worker within
//! its detection window while clients see no error (retries move their
//! requests on); once restarted on the same address it is re-admitted when
//! the ejection ends and its share of traffic ramps up over the slow start
//! (measured); one unlucky request does not eject; the time window needs its
//! minimum of requests; repeated ejections grow up to the cap; never more
//! than the configured share of a cluster is ejected; the state survives a
//! reload and a binary upgrade.
//!
//! The tests of this file run one at a time: they measure shares of
//! traffic and detection times under load on a small machine.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::master::{wait_gone, MasterRun};
use common::upstream::*;
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two workers, one cluster "app" of `nodes` with `extra` keys, every path
/// routed to it.
fn config(nodes: &[&Node], extra: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .top("workers = 2")
        .cluster_with("app", nodes.iter().map(|n| n.spec()), extra)
        .route(None, "/", "app")
}

/// Share of `node` in the traffic all `nodes` got in `[from, to)`.
fn share(node: &Node, nodes: &[&Node], from: Instant, to: Instant) -> (f64, usize) {
    let total: usize = nodes.iter().map(|n| n.traffic_between(from, to)).sum();
    (node.traffic_between(from, to) as f64 / total.max(1) as f64, total)
}

#[test]
fn crashed_backend_is_ejected_by_every_worker_and_clients_see_no_error() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    let extra = "retries = 2\n\
        passive = { consecutive_failures = 3, window_ms = 5000, window_min_requests = 20, \
        window_failure_percent = 50, ejection_ms = 30000, max_ejection_ms = 60000 }";
    let m = MasterRun::start(&config(&[&a, &b, &c], extra));
    let pids = worker_pids(&m);
    assert_eq!(pids.len(), 2, "two workers");

    let load = Hammer::start(m.addr(), 4, Duration::from_millis(2));
    assert!(load.wait_more(300, Duration::from_secs(15)), "load does not progress");
    assert!(c.traffic() > 30, "c served its share before the crash: {}", c.traffic());

    // The crash: c still owns its port but closes every connection at
    // once, so each connection Pitcher makes to it is counted.
    let crashed = Instant::now();
    c.crash();
    let r = wait_row(&m, "app", &c.spec(), Duration::from_secs(10), |r| r.state == "ejected")
        .unwrap_or_else(|| panic!("c not ejected within 10 s: {:?}", upstreams(&m).0));
    let took = crashed.elapsed();
    assert!(took < Duration::from_secs(5), "ejection took {took:?} with 3 consecutive failures under load");
    assert!(r.failures >= 3, "{r:?}");
    assert!(r.ejected_for_ms > 20_000, "{r:?}");

    // Ejected for every worker: while both workers keep serving new
    // connections, no connection at all reaches c.
    thread::sleep(Duration::from_millis(300));
    let conns = c.connections();
    let cs_before: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();
    let served = load.total();
    thread::sleep(Duration::from_secs(2));
    let cs_after: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();
    assert!(load.total() >= served + 200, "load stalled: {} -> {}", served, load.total());
    for (i, pid) in pids.iter().enumerate() {
        assert!(
            cs_after[i] > cs_before[i] + 100,
            "worker {pid} served nothing meanwhile: {cs_before:?} -> {cs_after:?}"
        );
    }
    assert_eq!(c.connections(), conns, "an ejected backend got new connections");

    let report = load.finish();
    assert!(report.errors.is_empty(), "clients saw {} errors: {:?}", report.errors.len(), report.errors);
    assert_eq!(report.statuses.keys().copied().collect::<Vec<_>>(), vec![200], "{:?}", report.statuses);

    let (table, rows) = upstreams(&m);
    for r in &rows {
        if r.backend == c.spec() {
            assert_eq!(r.state, "ejected", "{table}");
            assert_eq!(r.ejections, 1, "one ejection, whichever worker saw the failures first:\n{table}");
        } else {
            assert_eq!(r.state, "healthy", "{table}");
            assert_eq!(r.failures, 0, "{table}");
        }
    }
    let ejected = log_lines(&m, &["backend ejected", &c.spec()]);
    assert_eq!(ejected.len(), 1, "one ejection logged: {ejected:#?}");
}

#[test]
fn killed_backend_is_ejected_and_after_restart_its_share_ramps_up_over_the_slow_start() {
    let _g = serial();
    let (a, b) = (Node::start("a"), Node::start("b"));
    let c = Node::start("c");
    let slow_start = Duration::from_millis(4000);
    let extra = format!(
        "retries = 2\nslow_start_ms = {}\n\
         passive = {{ consecutive_failures = 3, window_ms = 5000, window_min_requests = 20, \
         window_failure_percent = 50, ejection_ms = 3000, max_ejection_ms = 60000 }}",
        slow_start.as_millis()
    );
    let m = MasterRun::start(&config(&[&a, &b, &c], &extra));
    let nodes = [&a, &b, &c];

    let load = Hammer::start(m.addr(), 4, Duration::from_millis(1));
    assert!(load.wait_more(300, Duration::from_secs(15)), "load does not progress");
    assert!(c.traffic() > 30, "c served its share before it was killed: {}", c.traffic());

    // Killed: the listener is closed, connecting is refused.
    let killed = Instant::now();
    c.kill();
    let r = wait_row(&m, "app", &c.spec(), Duration::from_secs(10), |r| r.state == "ejected")
        .unwrap_or_else(|| panic!("c not ejected within 10 s: {}", upstreams(&m).0));
    assert!(killed.elapsed() < Duration::from_secs(5), "ejection took {:?}", killed.elapsed());
    assert!(r.ejected_for_ms > 1500, "{r:?}");
    // No worker tries it any more: the refused connects stop.
    thread::sleep(Duration::from_millis(200));
    let refused = log_lines(&m, &["connect to backend failed", &c.spec()]).len();
    assert!(refused >= 1, "no refused connect logged:\n{}", m.log());
    thread::sleep(Duration::from_millis(800));
    assert_eq!(log_lines(&m, &["connect to backend failed", &c.spec()]).len(), refused, "ejected yet tried");

    // Restarted on the same address during its ejection; it gets traffic
    // again only when the ejection ends.
    c.restart();
    let asked = Instant::now();
    let r = row(&m, "app", &c.spec());
    assert_eq!(r.state, "ejected", "{r:?}");
    let readmitted = asked + Duration::from_millis(r.ejected_for_ms);
    let before = c.traffic();
    thread::sleep(readmitted.saturating_duration_since(Instant::now()).saturating_sub(Duration::from_millis(100)));
    assert_eq!(c.traffic(), before, "traffic reached c before its ejection ended");

    // During the ramp, ctl says so.
    let mid = wait_row(&m, "app", &c.spec(), Duration::from_secs(3), |r| r.state == "slow_start")
        .unwrap_or_else(|| panic!("no slow start after the ejection: {}", upstreams(&m).0));
    assert!(mid.slow_start_percent < 100, "{mid:?}");

    let slice = slow_start / 4;
    let end = readmitted + slow_start + slice + Duration::from_millis(300);
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let report = load.finish();

    let mut shares = Vec::new();
    for k in 0..4u32 {
        let from = readmitted + slice * k;
        shares.push(share(&c, &nodes, from, from + slice));
    }
    let full =
        share(&c, &nodes, readmitted + slow_start + Duration::from_millis(100), end - Duration::from_millis(200));
    let summary = format!("shares of c in 4 slices of the slow start: {shares:?}; afterwards: {full:?}");
    eprintln!("{summary}");
    for (_, n) in shares.iter().chain([&full]) {
        assert!(*n >= 100, "too few requests per slice to measure: {summary}");
    }
    // Linear from 10% to 100% of weight 1 among three: about 10%, 18%,
    // 25%, 31% of the traffic, then 33%.
    assert!(shares[0].0 < 0.2, "first slice should be well below the full share: {summary}");
    assert!(shares[3].0 > shares[0].0 + 0.08, "the share does not ramp up: {summary}");
    for k in 1..4 {
        assert!(shares[k].0 + 0.04 >= shares[k - 1].0, "the share fell during the ramp: {summary}");
    }
    assert!(full.0 > 0.26 && full.0 < 0.41, "after the slow start c has its full share: {summary}");
    assert!(report.errors.is_empty(), "clients saw {} errors: {:?}", report.errors.len(), report.errors);
    let r = row(&m, "app", &c.spec());
    assert_eq!((r.state.as_str(), r.ejections), ("healthy", 1), "{r:?}");
}

#[test]
fn a_single_failure_does_not_eject_but_consecutive_failures_do() {
    let _g = serial();
    let a = Node::start("a");
    let b = Node::start("b");
    // Every request of b on a connection of its own: a failure on a pooled
    // connection would be taken for a stale connection and replayed.
    b.set_keepalive(false);
    // b fails its 1st, 2nd, 4th and 5th requests: never 3 in a row.
    let n = Arc::new(AtomicUsize::new(0));
    let nb = n.clone();
    b.set_handler(move |_| match nb.fetch_add(1, Ordering::SeqCst) + 1 {
        1 | 2 | 4 | 5 => Act::Close,
        _ => Act::Ok,
    });
    let extra = "retries = 1\n\
        passive = { consecutive_failures = 3, window_ms = 10000, window_min_requests = 20, \
        window_failure_percent = 50, ejection_ms = 30000, max_ejection_ms = 60000 }";
    let m = MasterRun::start(&config(&[&a, &b], extra));
    let mut cl = Client::connect(m.addr());
    for i in 0..40 {
        let r = cl.get("app", &format!("/one/{i}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.head_str());
    }
    let r = row(&m, "app", &b.spec());
    assert_eq!(r.state, "healthy", "{r:?}");
    assert_eq!((r.ejections, r.failures), (0, 4), "{r:?}");
    assert!(b.traffic() >= 15, "b kept getting traffic: {}", b.traffic());
    assert!(log_lines(&m, &["backend ejected"]).is_empty(), "{}", m.log());

    // Three in a row do eject.
    b.set_handler(|_| Act::Close);
    let seen = b.traffic();
    let mut sent = 0;
    while b.traffic() < seen + 3 && sent < 20 {
        let r = cl.get("app", "/three");
        assert_eq!(r.status, 200, "{}", r.head_str());
        sent += 1;
    }
    assert_eq!(b.traffic(), seen + 3);
    let r = row(&m, "app", &b.spec());
    assert_eq!((r.state.as_str(), r.ejections, r.failures), ("ejected", 1, 7), "{r:?}");
    for _ in 0..10 {
        assert_eq!(cl.get("app", "/after").status, 200);
    }
    assert_eq!(b.traffic(), seen + 3, "an ejected backend got traffic");
}

#[test]
fn time_window_ejects_on_a_failure_ratio_once_it_saw_its_minimum_of_requests() {
    let _g = serial();
    let a = Node::start("a");
    // b fails every other request: 50%, but never 2 in a row.
    let b = Node::with_handler("b", |h| if h.seq % 2 == 0 { Act::Close } else { Act::Ok });
    b.set_keepalive(false);
    let extra = "retries = 1\n\
        passive = { consecutive_failures = 0, window_ms = 20000, window_min_requests = 10, \
        window_failure_percent = 40, ejection_ms = 30000, max_ejection_ms = 60000 }";
    let m = MasterRun::start(&config(&[&a, &b], extra));
    let mut cl = Client::connect(m.addr());
    let mut until = |n: usize| {
        let mut sent = 0;
        while b.traffic() < n && sent < 100 {
            let r = cl.get("app", "/ratio");
            assert_eq!(r.status, 200, "{}", r.head_str());
            sent += 1;
        }
        assert_eq!(b.traffic(), n);
    };
    until(9);
    let r = row(&m, "app", &b.spec());
    assert_eq!(
        (r.state.as_str(), r.failures, r.requests),
        ("healthy", 4, 9),
        "9 requests < window_min_requests: {r:?}"
    );
    until(10);
    let r = row(&m, "app", &b.spec());
    assert_eq!((r.state.as_str(), r.failures, r.ejections), ("ejected", 5, 1), "5 of 10 failed >= 40%: {r:?}");
    for _ in 0..10 {
        assert_eq!(cl.get("app", "/after").status, 200);
    }
    assert_eq!(b.traffic(), 10, "an ejected backend got traffic");
}

#[test]
fn repeated_ejections_double_up_to_the_maximum() {
    let _g = serial();
    let a = Node::start("a");
    let b = Node::start("b");
    b.set_close_on_accept(true);
    let extra = "retries = 1\n\
        passive = { consecutive_failures = 3, ejection_ms = 400, max_ejection_ms = 1000 }";
    let m = MasterRun::start(&config(&[&a, &b], extra));
    let load = Hammer::start(m.addr(), 2, Duration::from_millis(2));
    // Longest ejection seen for each ejection count.
    let mut longest: BTreeMap<u64, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let r = row(&m, "app", &b.spec());
        if r.state == "ejected" {
            let e = longest.entry(r.ejections).or_default();
            *e = (*e).max(r.ejected_for_ms);
        }
        if r.ejections >= 5 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let report = load.finish();
    eprintln!("longest ejection seen per ejection count: {longest:?}");
    let get = |n: u64| longest.get(&n).copied().unwrap_or_else(|| panic!("ejection {n} never seen: {longest:?}"));
    assert!((250..=400).contains(&get(1)), "first ejection 400 ms: {longest:?}");
    assert!((600..=800).contains(&get(2)), "second ejection doubles to 800 ms: {longest:?}");
    assert!((850..=1000).contains(&get(3)), "third capped at max_ejection_ms 1000: {longest:?}");
    assert!((850..=1000).contains(&get(4)), "fourth capped at max_ejection_ms 1000: {longest:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn never_more_than_max_ejected_percent_of_a_cluster_is_ejected() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    b.set_close_on_accept(true);
    c.set_close_on_accept(true);
    // 50% of three backends: one may be ejected, not two.
    let extra = "retries = 2\n\
        passive = { consecutive_failures = 3, ejection_ms = 30000, max_ejection_ms = 60000, max_ejected_percent = 50 }";
    let m = MasterRun::start(&config(&[&a, &b, &c], extra));
    let load = Hammer::start(m.addr(), 3, Duration::from_millis(2));
    let states = |m: &MasterRun| {
        let (_, rows) = upstreams(m);
        rows.iter().map(|r| (r.backend.clone(), r.state.clone())).collect::<BTreeMap<_, _>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || states(&m).values().filter(|s| *s == "ejected").count() == 1),
        "nothing ejected: {}",
        upstreams(&m).0
    );
    let (b_conns, c_conns) = (b.connections(), c.connections());
    for _ in 0..20 {
        let s = states(&m);
        assert_eq!(s.values().filter(|s| *s == "ejected").count(), 1, "{}", upstreams(&m).0);
        assert_eq!(s[&a.spec()], "healthy");
        thread::sleep(Duration::from_millis(50));
    }
    let report = load.finish();
    assert!(report.errors.is_empty(), "retries hide both failing backends: {:?}", report.errors);
    // The one not ejected keeps being tried (and failing).
    let (_, rows) = upstreams(&m);
    let kept = rows.iter().find(|r| r.backend != a.spec() && r.state != "ejected").expect("one failing backend kept");
    let grew = if kept.backend == b.spec() { b.connections() > b_conns } else { c.connections() > c_conns };
    assert!(grew, "the failing backend that was not ejected is still used: {rows:#?}");
    assert!(kept.failures > 3, "{kept:?}");
}

/// Sends GETs until `node` is ejected (bounded).
fn eject(m: &MasterRun, node: &Node) -> UpRow {
    for i in 0..200 {
        let r = get_new_conn(m.addr(), &format!("/eject/{i}"), &[]).expect("request");
        assert_eq!(r.status, 200, "{}", r.head_str());
        let row = row(m, "app", &node.spec());
        if row.state == "ejected" {
            return row;
        }
    }
    panic!("{} not ejected: {}", node.name(), upstreams(m).0);
}

#[test]
fn ejection_and_counters_survive_a_reload() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    c.set_close_on_accept(true);
    let extra = "retries = 2\n\
        passive = { consecutive_failures = 3, ejection_ms = 60000, max_ejection_ms = 120000 }";
    let builder = config(&[&a, &b, &c], extra);
    let mut m = MasterRun::start(&builder);
    let before_row = eject(&m, &c);
    let (_, before) = upstreams(&m);

    // An unrelated change: one more route.
    let other = Backend::start("other");
    reload(&mut m, &builder.clone().cluster("other", [other.spec()]).route(Some("other.example"), "/", "other"));
    let (table, after) = upstreams(&m);
    let after_row = after.iter().find(|r| r.backend == c.spec()).expect("c row").clone();
    assert_eq!(after_row.state, "ejected", "{table}");
    assert!(after_row.ejected_for_ms <= before_row.ejected_for_ms && after_row.ejected_for_ms > 50_000, "{table}");
    for r in &before {
        let same = after.iter().find(|x| x.cluster == r.cluster && x.backend == r.backend).expect("row kept");
        assert_eq!(
            (&same.state, same.ejections, same.requests, same.failures),
            (&r.state, r.ejections, r.requests, r.failures),
            "counters kept across the reload:\nbefore {before:#?}\n{table}"
        );
    }
    // Still ejected where it matters: in the workers.
    let conns = c.connections();
    for i in 0..40 {
        let r = get_new_conn(m.addr(), &format!("/after/{i}"), &[]).expect("request");
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    assert_eq!(c.connections(), conns, "after the reload a worker used the ejected backend");
    assert_eq!(log_lines(&m, &["backend ejected"]).len(), 1, "{}", m.log());
}

#[test]
fn ejection_survives_a_binary_upgrade() {
    let _g = serial();
    let (a, b, c) = (Node::start("a"), Node::start("b"), Node::start("c"));
    c.set_close_on_accept(true);
    let extra = "retries = 2\n\
        passive = { consecutive_failures = 3, ejection_ms = 60000, max_ejection_ms = 120000 }";
    let mut m = MasterRun::start(&config(&[&a, &b, &c], extra).top("upgrade_timeout_ms = 5000"));
    let before = eject(&m, &c);
    let old = m.pid().expect("pid");
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let new = m.pid().expect("pid");
    m.track(new);
    assert_ne!(new, old);
    assert!(wait_gone(old, Duration::from_secs(10)), "old master exits");
    let after = row(&m, "app", &c.spec());
    assert_eq!((after.state.as_str(), after.ejections), ("ejected", before.ejections), "{after:?}");
    assert!(after.requests >= before.requests && after.failures >= before.failures, "{before:?} -> {after:?}");
    let conns = c.connections();
    for i in 0..40 {
        let r = get_new_conn(m.addr(), &format!("/upgraded/{i}"), &[]).expect("request");
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    assert_eq!(c.connections(), conns, "after the upgrade a worker used the ejected backend");
}
