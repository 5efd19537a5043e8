//! Retries with two workers: a request whose connection failed goes to
//! another backend whatever its method (nothing was sent); an idempotent
//! request whose backend failed before the response started goes to
//! another backend within the retry budget; a POST whose body was sent is
//! never sent twice; `retries` bounds the backends tried.

mod common;

use std::collections::BTreeMap;

use common::master::MasterRun;
use common::upstream::*;
use common::*;

/// Passive detection that never ejects, so that the failing backend keeps
/// its turn in the rotation.
const NO_EJECTION: &str = "passive = { consecutive_failures = 0, window_failure_percent = 0 }";

fn config(nodes: &[&Node], extra: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .top("workers = 2")
        .cluster_with("app", nodes.iter().map(|n| n.spec()), extra)
        .route(None, "/", "app")
}

/// One request on a new connection.
fn send(m: &MasterRun, method: &str, path: &str, body: &[u8]) -> Response {
    let mut c = Client::connect(m.addr());
    c.send(&request_bytes(method, "app", path, &[("Connection", "close")], body));
    c.read_response()
}

/// Hits of `node` whose target is `path`.
fn hits_of(node: &Node, path: &str) -> Vec<Hit> {
    node.hits().into_iter().filter(|h| h.target == path).collect()
}

#[test]
fn get_is_retried_after_a_backend_closed_before_responding_and_post_is_not() {
    let bad = Node::with_handler("bad", |_| Act::Close);
    let good = Node::start("good");
    let m = MasterRun::start(&config(&[&bad, &good], &format!("retries = 1\n{NO_EJECTION}")));
    for i in 0..10 {
        let path = format!("/get/{i}");
        let r = send(&m, "GET", &path, b"");
        assert_ok_body(&r, b"ok from good");
        assert_eq!(hits_of(&good, &path).len(), 1, "{path}");
    }
    let retried = (0..10).filter(|i| !hits_of(&bad, &format!("/get/{i}")).is_empty()).count();
    assert!(retried >= 2, "the failing backend got {retried} of 10 GETs: the retry path was not exercised");

    let mut outcome: BTreeMap<u16, u32> = BTreeMap::new();
    for i in 0..10 {
        let path = format!("/post/{i}");
        let body = format!("order {i}");
        let r = send(&m, "POST", &path, body.as_bytes());
        *outcome.entry(r.status).or_default() += 1;
        let (on_bad, on_good) = (hits_of(&bad, &path), hits_of(&good, &path));
        assert_eq!(on_bad.len() + on_good.len(), 1, "{path} sent {} times", on_bad.len() + on_good.len());
        if on_bad.is_empty() {
            assert_ok_body(&r, b"ok from good");
        } else {
            assert_eq!(on_bad[0].body, body.as_bytes());
            assert_error_response(&r, 502);
        }
    }
    assert!(outcome.get(&502).copied().unwrap_or(0) >= 2, "the failing backend got too few POSTs: {outcome:?}");
    let (table, rows) = upstreams(&m);
    let r = rows.iter().find(|r| r.backend == bad.spec()).expect("row");
    assert_eq!(r.failures as usize, bad.traffic(), "every failure counted once:\n{table}");
    assert_eq!(r.state, "healthy", "ejection is off:\n{table}");
}

#[test]
fn connect_failures_move_any_method_to_another_backend() {
    let dead = Node::start("dead");
    dead.kill();
    let good = Node::start("good");
    let m = MasterRun::start(&config(&[&dead, &good], &format!("retries = 1\n{NO_EJECTION}")));
    for i in 0..10 {
        let body = format!("payment {i}");
        let path = format!("/pay/{i}");
        let r = send(&m, "POST", &path, body.as_bytes());
        assert_ok_body(&r, b"ok from good");
        let hits = hits_of(&good, &path);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].body, body.as_bytes());
    }
    let r = row(&m, "app", &dead.spec());
    assert!(r.failures >= 2, "refused connects count as failures: {r:?}");
}

#[test]
fn retries_bound_the_backends_tried() {
    let (d1, d2) = (Node::start("d1"), Node::start("d2"));
    d1.kill();
    d2.kill();
    let good = Node::start("good");
    // retries = 1: a request may meet both dead backends before the good
    // one and then fails; retries = 2 always reaches the good one.
    let mut m = MasterRun::start(&config(&[&d1, &d2, &good], &format!("retries = 1\n{NO_EJECTION}")));
    let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
    for i in 0..30 {
        *statuses.entry(send(&m, "GET", &format!("/r1/{i}"), b"").status).or_default() += 1;
    }
    assert!(statuses.contains_key(&502), "with retries = 1 some requests meet two dead backends: {statuses:?}");
    reload(&mut m, &config(&[&d1, &d2, &good], &format!("retries = 2\n{NO_EJECTION}")));
    for i in 0..30 {
        assert_ok_body(&send(&m, "GET", &format!("/r2/{i}"), b""), b"ok from good");
    }
}

#[test]
fn a_get_that_timed_out_is_retried_only_within_the_retry_budget() {
    let hang = Node::with_handler("hang", |_| Act::Hang);
    let good = Node::start("good");
    let timeouts = "[timeouts]\nupstream_read_ms = 300";
    let within = format!("retries = 1\nretry_budget_ms = 5000\n{NO_EJECTION}");
    let mut m = MasterRun::start(&config(&[&hang, &good], &within).section(timeouts));
    for i in 0..6 {
        let r = send(&m, "GET", &format!("/in/{i}"), b"");
        assert_ok_body(&r, b"ok from good");
    }
    let retried = (0..6).filter(|i| !hits_of(&hang, &format!("/in/{i}")).is_empty()).count();
    assert!(retried >= 1, "the hanging backend got none of 6 GETs");

    // A budget shorter than the read timeout: no time left to retry.
    let short = format!("retries = 1\nretry_budget_ms = 100\n{NO_EJECTION}");
    reload(&mut m, &config(&[&hang, &good], &short).section(timeouts));
    for i in 0..6 {
        let path = format!("/out/{i}");
        let r = send(&m, "GET", &path, b"");
        if hits_of(&hang, &path).is_empty() {
            assert_ok_body(&r, b"ok from good");
        } else {
            assert_error_response(&r, 504);
            assert!(hits_of(&good, &path).is_empty(), "{path} retried past its budget");
        }
    }
    assert!((0..6).any(|i| !hits_of(&hang, &format!("/out/{i}")).is_empty()), "the hanging backend got none of 6 GETs");
}
