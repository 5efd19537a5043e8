//! Connections that live across a reload or a binary upgrade: a slow
//! request in flight finishes (on the old route after a reload, on the old
//! worker after an upgrade, its connection kept alive and handed to the new
//! generation), an idle keep-alive connection to an old worker is handed to
//! the new generation at once, and one that cannot move (a request head
//! still arriving) is closed only at the drain deadline, and counted.

mod common;

use std::time::{Duration, Instant};

use common::master::{alive, request_in_thread, wait_gone, MasterRun};
use common::*;

/// The slow path of the backends below.
const SLOW: &str = "/slow";
const SLOW_DELAY: Duration = Duration::from_secs(2);

/// A backend answering `ok from NAME`, and `slow from NAME` after
/// [`SLOW_DELAY`] on [`SLOW`].
fn slow_backend(name: &'static str) -> Backend {
    Backend::with_handler(name, move |r| {
        if r.path() == SLOW {
            Reply::ok(format!("slow from {name}")).delayed(SLOW_DELAY)
        } else {
            default_reply(name)
        }
    })
}

fn config(a: &Backend, b: &Backend, to: &str, workers: usize, drain_ms: u64) -> ConfigBuilder {
    ConfigBuilder::new()
        .top(&format!("workers = {workers}"))
        .top(&format!("drain_timeout_ms = {drain_ms}"))
        .cluster("a", [a.spec()])
        .cluster("b", [b.spec()])
        .route(None, "/", to)
}

fn body_of_new_request(m: &MasterRun) -> String {
    let r = get_once(m.addr(), "test.example", "/");
    assert_eq!(r.status, 200, "{}{}", r.head_str(), r.body_str());
    r.body_str()
}

#[test]
fn slow_request_in_flight_during_a_reload_completes_on_the_old_route() {
    let a = slow_backend("A");
    let b = slow_backend("B");
    let mut m = MasterRun::start(&config(&a, &b, "a", 2, 3000));

    let slow = request_in_thread(m.addr(), "test.example", SLOW);
    assert!(a.wait_for_requests(1, Duration::from_secs(5)), "the slow request reached A");
    let t0 = Instant::now();
    m.write_config(&config(&a, &b, "b", 2, 3000));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    // New requests go to B while the slow one is still being answered by A.
    assert_eq!(body_of_new_request(&m), "ok from B");
    assert!(!slow.is_finished(), "the slow request is still in flight after the reload ({:?})", t0.elapsed());

    let r = slow.join().expect("thread").unwrap_or_else(|e| panic!("the in-flight request failed: {e}"));
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "slow from A", "finished on the route it started with");
    assert!(!r.says_close(), "a reload closes nothing: {}", r.head_str());
    assert_eq!(b.recorded().iter().filter(|q| q.path() == SLOW).count(), 0, "B never saw the slow request");
    assert_eq!(body_of_new_request(&m), "ok from B");
}

#[test]
fn slow_request_in_flight_during_an_upgrade_completes_then_the_old_generation_exits() {
    let a = slow_backend("A");
    let b = slow_backend("B");
    let mut m = MasterRun::start(&config(&a, &b, "a", 2, 6000));
    let old = m.pid().expect("pid file");
    let old_workers = m.expect_status().worker_pids();

    let slow = request_in_thread(m.addr(), "test.example", SLOW);
    assert!(a.wait_for_requests(1, Duration::from_secs(5)), "the slow request reached A");
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().expect("pid file after the upgrade");
    m.track(new);
    assert_ne!(new, old);
    assert_eq!(out.stdout.trim(), format!("pitcher: upgrade complete: new master pid {new}"));
    assert_eq!(body_of_new_request(&m), "ok from A");

    let r = slow.join().expect("thread").unwrap_or_else(|e| panic!("the in-flight request failed: {e}"));
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "slow from A");
    assert!(!r.says_close(), "the connection is handed over after its response, not closed: {}", r.head_str());

    // Nothing else keeps the old generation: it goes well before the
    // 6 s drain deadline.
    assert!(wait_gone(old, Duration::from_secs(2)), "old master {old} exits once its workers drained");
    for pid in old_workers {
        assert!(!alive(pid), "old worker {pid} exited");
    }
    assert!(!m.oldbin().exists(), ".oldbin removed");
    assert_eq!(m.expect_status().master_pid, new);
}

#[test]
fn idle_keepalive_connection_to_an_old_worker_is_handed_to_the_new_generation_at_once() {
    let a = slow_backend("A");
    let b = slow_backend("B");
    // One worker per generation: the connection is surely on the old one.
    let mut m = MasterRun::start(&config(&a, &b, "a", 1, 4000));
    let old = m.pid().expect("pid file");

    let mut c = m.client();
    let r = c.get("test.example", "/first");
    assert_eq!(r.body_str(), "ok from A");
    assert!(!r.says_close());

    let t0 = Instant::now();
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().expect("pid file");
    m.track(new);
    // The idle connection moved: nothing keeps the old generation until
    // its 4 s deadline.
    assert!(wait_gone(old, Duration::from_secs(3)), "old master exits once its connection moved\n{}", m.log());
    assert!(t0.elapsed() < Duration::from_secs(3));

    let r = c
        .try_send(&get_request("test.example", "/second"))
        .map_err(|e| e.to_string())
        .and_then(|()| c.try_read_response().map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("the next request on the idle connection failed: {e}\n{}", m.log()));
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "ok from A");
    assert!(!r.says_close(), "the new generation keeps the connection: {}", r.head_str());
    assert!(!c.closed_by_peer(Duration::from_millis(300)), "the connection stays open");
    assert_eq!(a.last_request().map(|q| q.target), Some("/second".to_string()));
    let st = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).expect("status JSON");
    assert_eq!(v["data"]["master_pid"], new);
    assert_eq!(v["data"]["handover"]["received"], 1, "{v}");
    assert_eq!(v["data"]["handover"]["previous_generation"]["handed_over"], 1, "{v}");
}

#[test]
fn a_connection_that_cannot_move_is_closed_only_at_the_drain_deadline_and_counted() {
    let a = slow_backend("A");
    let b = slow_backend("B");
    let mut m = MasterRun::start(&config(&a, &b, "a", 1, 2000));
    let old = m.pid().expect("pid file");

    let mut c = m.client();
    assert_eq!(c.get("test.example", "/").body_str(), "ok from A");
    // A request head still arriving: the connection cannot move.
    c.send(b"GET /late HTTP/1.1\r\nHost: test.example\r\n");

    m.install_binary();
    let t0 = Instant::now();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    m.track(m.pid().expect("pid file"));

    // Still open well within the deadline...
    assert!(!c.closed_by_peer(Duration::from_millis(1000)), "closed {:?} after the upgrade", t0.elapsed());
    assert!(alive(old));
    // ...and closed at it.
    assert!(c.closed_by_peer(Duration::from_secs(4)), "still open {:?} after the upgrade", t0.elapsed());
    let closed_after = t0.elapsed();
    assert!(closed_after >= Duration::from_millis(1500), "closed after {closed_after:?}, before the 2 s deadline");
    assert!(wait_gone(old, Duration::from_secs(2)), "the old master exits after the deadline");
    assert_eq!(body_of_new_request(&m), "ok from A");
    // The new master says what became of the old generation's connections.
    let counted = wait_until(Duration::from_secs(5), || {
        let st = m.command(&["ctl", "--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
        v["data"]["handover"]["previous_generation"]["closed"] == 1
    });
    assert!(counted, "the connection closed at the deadline is counted\n{}", m.log());
}
