//! `reuseport = true` on a listener: the master binds one `SO_REUSEPORT`
//! socket per worker and keeps them all, so each worker accepts from a
//! queue of its own, a worker respawned after a crash takes over the
//! connections queued on its socket while it was dead, and reloads and
//! binary upgrades (which hand the same sockets to the new master) lose no
//! request.
//!
//! Which worker served a request is read from the access log (`$pid`); how
//! many sockets listen on the port, from `/proc/net/tcp`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::master::{alive, wait_gone, Load, LoadSpec, MasterRun};
use common::pitcher::send_signal;
use common::*;

fn config(backend: &Backend, reuseport: bool, extra_top: &[&str]) -> ConfigBuilder {
    let mut c = ConfigBuilder::new()
        .top("workers = 2")
        .top("drain_timeout_ms = 1500")
        .listener(&format!("reuseport = {reuseport}"));
    for l in extra_top {
        c = c.top(l);
    }
    c.cluster("a", [backend.spec()]).route(None, "/", "a").section(
        "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"custom\"\ncustom = \"$pid $request_uri\"",
    )
}

/// Listening TCP sockets on 127.0.0.1:`port` (distinct inodes).
fn listening_sockets(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    let mut inodes: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then_some(f[9])
        })
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes.len()
}

/// Requests per worker pid for paths starting with `prefix`, from the access log.
fn served_by(log: &Path, prefix: &str) -> BTreeMap<u32, usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some(pid), Some(uri)) = (f.next().and_then(|p| p.parse::<u32>().ok()), f.next()) {
            if uri.starts_with(prefix) {
                *by.entry(pid).or_insert(0) += 1;
            }
        }
    }
    by
}

/// Waits until the access log holds `n` lines for `prefix` (it is written in batches).
fn wait_logged(log: &Path, prefix: &str, n: usize) -> BTreeMap<u32, usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let by = served_by(log, prefix);
        if by.values().sum::<usize>() >= n || Instant::now() > deadline {
            return by;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_worker_accepts_from_its_own_socket_and_a_respawned_worker_serves_what_queued_while_it_was_dead() {
    let backend = Backend::start("A");
    let mut m = MasterRun::start(&config(&backend, true, &[]));
    let log = m.dir().join("access.log");
    assert_eq!(listening_sockets(m.port()), 2, "one socket per worker");

    // New connections are spread by the kernel over both workers' sockets.
    for i in 0..60 {
        let r = get_once(m.addr(), "t.example", &format!("/spread/{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    let by = wait_logged(&log, "/spread/", 60);
    let workers = m.expect_status().worker_pids();
    assert_eq!(by.values().sum::<usize>(), 60, "{by:?}");
    assert_eq!(by.keys().copied().collect::<Vec<_>>(), sorted(&workers), "both workers served: {by:?}");

    // A worker dies; clients connect and send before it is back. Those the
    // kernel puts on its socket wait in that socket's queue (the master
    // keeps it open) and are served by the worker respawned at its slot.
    let victim = workers[0];
    send_signal(victim, "KILL");
    let mut clients: Vec<Client> = (0..40)
        .map(|i| {
            let mut c = m.client();
            c.send(&get_request("t.example", &format!("/queued/{i}")));
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.try_read_response().unwrap_or_else(|e| panic!("client {i}: {e}\n{}", m.log()));
        assert_eq!(r.status, 200, "client {i}: {}", r.head_str());
    }
    assert!(wait_gone(victim, Duration::from_secs(5)), "the killed worker is gone");
    let st = m
        .wait_status(Duration::from_secs(10), |s| s.all_ready() && !s.worker_pids().contains(&victim))
        .expect("the worker is respawned");
    let respawned: Vec<u32> = st.worker_pids().into_iter().filter(|p| !workers.contains(p)).collect();
    assert_eq!(respawned.len(), 1, "{st:?}");
    let by = wait_logged(&log, "/queued/", 40);
    assert_eq!(by.values().sum::<usize>(), 40, "{by:?}");
    assert!(
        by.get(&respawned[0]).is_some_and(|&n| n > 0),
        "the respawned worker {} served the connections queued on its socket: {by:?}",
        respawned[0]
    );
    assert!(!by.contains_key(&victim), "the killed worker served nothing after its death: {by:?}");
    assert_eq!(listening_sockets(m.port()), 2, "the same two sockets, none added");

    // A reload to three workers binds a socket for the third; back to two,
    // its socket closes once its worker has drained.
    m.write_config(&config(&backend, true, &["workers = 3"]));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    let st = m.wait_status(Duration::from_secs(10), |s| s.workers.len() == 3 && s.all_ready()).expect("3 workers");
    assert_eq!(listening_sockets(m.port()), 3, "{st:?}");
    for i in 0..90 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/three/{i}")).status, 200);
    }
    let by = wait_logged(&log, "/three/", 90);
    assert_eq!(by.keys().copied().collect::<Vec<_>>(), sorted(&st.worker_pids()), "all three served: {by:?}");
    m.write_config(&config(&backend, true, &[]));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    let st = m
        .wait_status(Duration::from_secs(10), |s| s.workers.len() == 2 && s.all_ready() && s.retiring.is_empty())
        .expect("back to 2 workers");
    assert!(common::wait_until(Duration::from_secs(5), || listening_sockets(m.port()) == 2), "{st:?}");
    assert_eq!(get_once(m.addr(), "t.example", "/two").status, 200);
}

fn sorted(v: &[u32]) -> Vec<u32> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

#[test]
fn reloads_and_binary_upgrades_under_load_lose_no_request_and_keep_the_sockets() {
    let a = Backend::start("A");
    let mut m = MasterRun::start(&config(&a, true, &[]));
    let sockets = listening_sockets(m.port());
    assert_eq!(sockets, 2);
    let load = Load::start(LoadSpec {
        addr: m.addr(),
        host: "load.example".into(),
        path: "/load".into(),
        keepalive: 4,
        per_request: 4,
        interval: Duration::from_millis(8),
        bodies: vec![b"ok from A".to_vec()],
    });
    assert!(load.wait_progress(200, Duration::from_secs(10)), "the load runs: {:?}", load.stats().failures());

    for i in 0..5 {
        m.write_config(&config(&a, true, &[&format!("drain_timeout_ms = {}", 1500 + i)]));
        let out = m.signal_cmd("reload");
        assert!(out.status.success(), "reload {i}: {out:?}");
        assert!(load.wait_progress(50, Duration::from_secs(10)), "reload {i}: the load goes on");
        assert_eq!(listening_sockets(m.port()), 2, "reload {i}: the same sockets");
    }

    // A reload may not turn reuseport off (nor on): refused, nothing changes.
    m.write_config(&config(&a, false, &[]));
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("reuseport"), "{out:?}");
    m.write_config(&config(&a, true, &[]));

    let mut old = m.pid().expect("pid file");
    for i in 0..2 {
        m.install_binary();
        let out = m.signal_cmd("upgrade");
        assert!(out.status.success(), "upgrade {i}: {out:?}\n{}", m.log());
        let new = m.pid().expect("pid file");
        assert_ne!(new, old, "upgrade {i}");
        m.track(new);
        assert!(wait_gone(old, Duration::from_secs(10)), "upgrade {i}: the old master exits");
        assert!(load.wait_progress(100, Duration::from_secs(10)), "upgrade {i}: the load goes on");
        assert_eq!(listening_sockets(m.port()), 2, "upgrade {i}: the new master serves the same two sockets");
        old = new;
    }
    let st = m.expect_status();
    assert!(st.all_ready() && st.worker_pids().iter().all(|&p| alive(p)), "{st:?}");
    let report = load.finish();
    eprintln!("reuseport: load over 5 reloads and 2 upgrades: {}", report.summary());
    report.assert_no_failures();
    assert!(report.ok >= 1000, "too little load to mean anything: {}", report.summary());
}
