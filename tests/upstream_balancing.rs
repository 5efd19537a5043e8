//! Balancing with two workers: consistent hashing on a header keeps each
//! key on its backend in every worker and moves only the keys of a backend
//! that a reload removed; least connections and power of two choices keep
//! requests away from a slow backend (connections counted across workers);
//! smooth weighted round robin over TCP and Unix-socket backends alike;
//! `ctl upstreams` gives the same counters whoever asks and however often,
//! and they match what the backends saw.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::pitcher::send_signal;
use common::upstream::*;
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(specs: &[String], extra: &str) -> ConfigBuilder {
    ConfigBuilder::new().top("workers = 2").cluster_with("app", specs, extra).route(None, "/", "app")
}

fn specs(nodes: &[&Node]) -> Vec<String> {
    nodes.iter().map(|n| n.spec()).collect()
}

/// The backend that serves `user`, asked twice on new connections (which
/// the two workers share); both answers must agree.
fn backend_of(m: &MasterRun, user: &str) -> String {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = get_new_conn(m.addr(), "/profile", &[("X-User", user)]).expect("request");
        assert_eq!(r.status, 200, "{}", r.head_str());
        seen.push(r.header("x-backend").expect("X-Backend").to_string());
    }
    assert_eq!(seen[0], seen[1], "user {user} went to two backends");
    seen.remove(0)
}

#[test]
fn consistent_hash_keeps_keys_on_their_backend_when_one_is_removed() {
    let _g = serial();
    let nodes: Vec<Node> = ["a", "b", "c", "d"].iter().map(|n| Node::start(n)).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let extra = "lb = \"hash\"\nhash_key = \"header:X-User\"";
    let mut m = MasterRun::start(&config(&specs(&refs), extra));
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let before: BTreeMap<&str, String> = users.iter().map(|u| (u.as_str(), backend_of(&m, u))).collect();
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for b in before.values() {
        *per.entry(b.as_str()).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "every backend has users: {per:?}");
    assert!(per.values().all(|&n| n >= 20), "keys spread over the four backends: {per:?}");

    // d leaves the cluster.
    reload(&mut m, &config(&specs(&refs[..3]), extra));
    let after: BTreeMap<&str, String> = users.iter().map(|u| (u.as_str(), backend_of(&m, u))).collect();
    let stayed_on_others = before.iter().filter(|(_, b)| *b != "d").count();
    let moved: Vec<_> = before.iter().filter(|(u, b)| *b != "d" && after[*u] != **b).collect();
    assert!(
        moved.len() * 100 <= stayed_on_others * 5,
        "{} of {stayed_on_others} users of the remaining backends moved: {moved:?}",
        moved.len()
    );
    let of_d: BTreeSet<&str> = before.iter().filter(|(_, b)| *b == "d").map(|(u, _)| after[u].as_str()).collect();
    assert!(!of_d.contains("d"), "users still sent to a removed backend");
    assert!(of_d.len() >= 2, "the removed backend's users spread over the others: {of_d:?}");
    assert_eq!(nodes[3].traffic(), before.values().filter(|b| *b == "d").count() * 2, "traffic after removal");
}

/// `threads` threads send GETs on new connections for `run`; requests by
/// backend name.
fn spread(m: &MasterRun, threads: usize, run: Duration) -> BTreeMap<String, u64> {
    let load = Hammer::start(m.addr(), threads, Duration::ZERO);
    thread::sleep(run);
    let report = load.finish();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    report.backends
}

#[test]
fn least_conn_sends_most_requests_to_the_fast_backend() {
    let _g = serial();
    let fast = Node::start("fast");
    let slow = Node::with_handler("slow", |_| Act::Delay(Duration::from_secs(1)));
    let m = MasterRun::start(&config(&specs(&[&fast, &slow]), "lb = \"least_conn\""));
    let by = spread(&m, 6, Duration::from_secs(3));
    eprintln!("least_conn: {by:?}");
    let (f, s) = (by.get("fast").copied().unwrap_or(0), by.get("slow").copied().unwrap_or(0));
    assert!(f >= 100, "{by:?}");
    assert!(s * 10 < f + s, "the slow backend got {s} of {} requests", f + s);
    // Its connections are released: nothing is counted active afterwards.
    assert!(
        wait_until(Duration::from_secs(3), || upstreams(&m).1.iter().all(|r| r.active == 0)),
        "{}",
        upstreams(&m).0
    );
}

#[test]
fn p2c_keeps_traffic_away_from_a_slow_backend() {
    let _g = serial();
    let (f1, f2) = (Node::start("fast1"), Node::start("fast2"));
    let slow = Node::with_handler("slow", |_| Act::Delay(Duration::from_secs(1)));
    let m = MasterRun::start(&config(&specs(&[&f1, &f2, &slow]), "lb = \"p2c\""));
    let by = spread(&m, 6, Duration::from_secs(3));
    eprintln!("p2c: {by:?}");
    let total: u64 = by.values().sum();
    let get = |n: &str| by.get(n).copied().unwrap_or(0);
    assert!(total >= 100, "{by:?}");
    assert!(get("slow") * 10 < total, "slow got too much: {by:?}");
    assert!(get("fast1") * 4 > total && get("fast2") * 4 > total, "both fast backends are used: {by:?}");
}

#[test]
fn weighted_round_robin_over_tcp_and_unix_backends() {
    let _g = serial();
    let tcp = Node::start("tcp");
    let unix = Backend::unix("unix");
    let m = MasterRun::start(&config(&[tcp.spec_weight(3), unix.spec()], ""));
    // One keep-alive connection: one worker, its own smooth sequence.
    let mut c = Client::connect(m.addr());
    let mut by: BTreeMap<String, u32> = BTreeMap::new();
    let mut order = String::new();
    for i in 0..40 {
        let r = c.get("app", &format!("/w/{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        let b = r.header("x-backend").expect("X-Backend").to_string();
        order.push(if b == "tcp" { 't' } else { 'u' });
        *by.entry(b).or_default() += 1;
    }
    assert_eq!(by.get("tcp"), Some(&30), "weight 3 to 1: {by:?} {order}");
    assert_eq!(by.get("unix"), Some(&10), "weight 3 to 1: {by:?} {order}");
    assert!(!order.contains("uu") && !order.contains("tttt"), "smooth: {order}");
}

#[test]
fn ctl_upstreams_answers_the_same_whoever_asks_and_matches_the_backends() {
    let _g = serial();
    let (a, b) = (Node::start("a"), Node::start("b"));
    // c answers 500 to every fourth request: failures, never 3 in a row.
    let c = Node::with_handler("c", |h| if h.seq % 4 == 0 { Act::Status(500) } else { Act::Ok });
    let extra = "passive = { consecutive_failures = 3, window_ms = 10000, window_min_requests = 20, \
        window_failure_percent = 50, failure_on = [\"connect\", \"timeout\", \"5xx\"] }";
    let m = MasterRun::start(&config(&specs(&[&a, &b, &c]), extra));
    let pids = worker_pids(&m);
    let cs_before: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let addr = m.addr();
            thread::spawn(move || {
                (0..75)
                    .map(|i| get_new_conn(addr, &format!("/ctl/{t}/{i}"), &[]).expect("request").status)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
    let cs_after: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();
    for (i, pid) in pids.iter().enumerate() {
        assert!(cs_after[i] > cs_before[i] + 20, "worker {pid} served nothing: {cs_before:?} -> {cs_after:?}");
    }
    let errors = statuses.iter().filter(|&&s| s == 500).count() as u64;
    assert_eq!(statuses.len() - errors as usize, statuses.iter().filter(|&&s| s == 200).count());

    let (table, first) = upstreams(&m);
    for _ in 0..10 {
        let (t, rows) = upstreams(&m);
        assert_eq!(rows, first, "ctl upstreams changed without traffic:\n{table}\n{t}");
    }
    let total: u64 = first.iter().map(|r| r.requests).sum();
    assert_eq!(total, 300, "{table}");
    for n in [&a, &b, &c] {
        let r = first.iter().find(|r| r.backend == n.spec()).expect("row");
        assert_eq!(r.requests, n.traffic() as u64, "{} counted by both workers:\n{table}", n.name());
        assert_eq!((r.state.as_str(), r.active, r.ejections, r.probes), ("healthy", 0, 0, 0), "{table}");
        assert_eq!(r.cluster, "app");
        assert_eq!(r.weight, 1);
        assert!(!r.health_checked);
    }
    let rc = first.iter().find(|r| r.backend == c.spec()).expect("row");
    assert_eq!(rc.failures, errors, "5xx counted as failures:\n{table}");
    assert!(first.iter().filter(|r| r.backend != c.spec()).all(|r| r.failures == 0), "{table}");

    // The text form: the header and one line per backend.
    let out = m.command(&["ctl", "upstreams"]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let header: Vec<&str> = lines.first().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["CLUSTER", "BACKEND", "WEIGHT", "STATE", "EJECTED_MS", "RAMP%", "ACTIVE", "REQUESTS", "FAILURES", "PROBES"],
        "{}",
        out.stdout
    );
    for n in [&a, &b, &c] {
        let line = lines.iter().find(|l| l.contains(&n.spec())).unwrap_or_else(|| panic!("{}", out.stdout));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], "app");
        assert_eq!(f[3], "healthy", "{line}");
        assert_eq!(f[7], n.traffic().to_string(), "{line}");
    }
    // A table: every line as wide as the header (the columns line up).
    for l in &lines {
        assert_eq!(l.trim_end().len(), lines[0].trim_end().len(), "columns do not line up:\n{}", out.stdout);
    }
}

#[test]
fn active_connections_of_a_worker_that_died_are_not_counted_forever() {
    let _g = serial();
    let (a, b) = (Node::start("a"), Node::start("b"));
    for n in [&a, &b] {
        n.set_handler(
            |h| if h.target.starts_with("/slow") { Act::Delay(Duration::from_millis(1500)) } else { Act::Ok },
        );
    }
    let m = MasterRun::start(&config(&specs(&[&a, &b]), "lb = \"least_conn\""));
    let before = m.expect_status();
    // Requests in flight in both workers.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let addr = m.addr();
            thread::spawn(move || get_new_conn(addr, &format!("/slow/{i}"), &[]))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || a.traffic() + b.traffic() >= 6), "slow requests did not arrive");
    let busy: u64 = upstreams(&m).1.iter().map(|r| r.active).sum();
    assert_eq!(busy, 6, "{}", upstreams(&m).0);
    // Both workers die with their requests in flight; the master starts
    // new ones.
    for pid in before.worker_pids() {
        send_signal(pid, "KILL");
    }
    for h in handles {
        let _ = h.join();
    }
    m.wait_status(Duration::from_secs(10), |s| {
        s.all_ready() && s.worker_pids().iter().all(|p| !before.worker_pids().contains(p))
    })
    .unwrap_or_else(|| panic!("workers not restarted: {:?}", m.status()));
    // The backends have long answered: nothing is in use any more.
    thread::sleep(Duration::from_millis(1600));
    let (table, rows) = upstreams(&m);
    let stuck: u64 = rows.iter().map(|r| r.active).sum();
    // What the leak does to least_conn: requests avoid the backend with
    // phantom connections.
    let mut by: BTreeMap<String, u32> = BTreeMap::new();
    let t0 = Instant::now();
    for i in 0..20 {
        let r = get_new_conn(m.addr(), &format!("/after/{i}"), &[]).expect("request");
        *by.entry(r.header("x-backend").unwrap_or("?").to_string()).or_default() += 1;
    }
    assert_eq!(
        stuck,
        0,
        "connections of the dead workers are still counted as active:\n{table}\n20 requests after: {by:?} ({:?})",
        t0.elapsed()
    );
}
