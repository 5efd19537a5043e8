//! Binary upgrades that clients cannot see: a keep-alive connection and a
//! WebSocket-like tunnel are handed, as the same TCP connections, from each
//! generation to the next (the socket is then held by a worker of the new
//! master, and the old processes are gone), and a rolling upgrade whose
//! second new worker fails rolls back without a failed request, the old
//! binary serving afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::master::{wait_gone, MasterRun};
use common::*;

fn config(backend: &str, workers: usize) -> ConfigBuilder {
    ConfigBuilder::new()
        .top(&format!("workers = {workers}"))
        .top("drain_timeout_ms = 5000")
        .top("upgrade_timeout_ms = 10000")
        .cluster("a", [backend])
        .route(None, "/", "a")
}

/// `ctl --json status`'s data, as JSON.
fn status_json(m: &MasterRun) -> serde_json::Value {
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["data"].clone()
}

/// Upgrades to a fresh copy of the binary and waits until the old master
/// and every worker of its generation are gone; the new master's pid.
fn upgrade(m: &mut MasterRun) -> u32 {
    let old = m.pid().expect("master pid");
    let old_workers = m.expect_status().worker_pids();
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "upgrade failed: {out:?}\n{}", m.log());
    let new = m.pid().expect("new master pid");
    m.track(new);
    assert_ne!(new, old);
    for pid in std::iter::once(old).chain(old_workers) {
        assert!(wait_gone(pid, Duration::from_secs(15)), "the old generation exits (pid {pid})\n{}", m.log());
    }
    new
}

/// The inode of Pitcher's end of the TCP connection from the client port
/// `client_port` to the listener port `proxy_port`.
fn server_socket_inode(proxy_port: u16, client_port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (format!(":{proxy_port:04X}"), format!(":{client_port:04X}"));
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1].ends_with(&local) && f[2].ends_with(&remote)).then(|| f[9].parse().ok()).flatten()
    })
}

/// Which of `pids` hold socket `inode` open.
fn holders(inode: u64, pids: &[u32]) -> Vec<u32> {
    let target = format!("socket:[{inode}]");
    pids.iter()
        .copied()
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
                d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == target))
            })
        })
        .collect()
}

/// Asserts that the connection from `client_port` is held by exactly one
/// worker of the current master.
fn held_by_a_new_worker(m: &MasterRun, client_port: u16, what: &str) -> u32 {
    let workers = m.expect_status().worker_pids();
    let inode = server_socket_inode(m.port(), client_port)
        .unwrap_or_else(|| panic!("{what}: no server side of the connection from port {client_port}"));
    // A worker may still be registering it: wait a little.
    let mut held = Vec::new();
    wait_until(Duration::from_secs(5), || {
        held = holders(inode, &workers);
        held.len() == 1
    });
    assert_eq!(
        held.len(),
        1,
        "{what}: the connection is held by one worker of the new generation {workers:?}: {held:?}"
    );
    held[0]
}

/// What a thread driving one connection found wrong, if anything.
type Failure = Arc<Mutex<Option<String>>>;

/// Waits until `count` reaches `n`; panics with the driving thread's
/// failure (or the log) if it does not.
fn wait_count(m: &MasterRun, count: &AtomicU64, n: u64, failure: &Failure, what: &str) {
    let ok =
        wait_until(Duration::from_secs(15), || count.load(Ordering::SeqCst) >= n || failure.lock().unwrap().is_some());
    if let Some(f) = failure.lock().unwrap().clone() {
        panic!("{what}: {f}\n{}", m.log());
    }
    assert!(ok, "{what}: {} of {n} exchanges\n{}", count.load(Ordering::SeqCst), m.log());
}

#[test]
fn one_keep_alive_connection_is_served_by_each_new_generation_through_five_binary_upgrades() {
    let a = Backend::start("A");
    let mut m = MasterRun::start(&config(&a.spec(), 2));
    let mut client = m.client();
    let client_port = client.stream().local_addr().expect("local address").port();
    let (stop, served, failure) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Failure::default());
    let (st, sv, fl) = (stop.clone(), served.clone(), failure.clone());
    let driver = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::SeqCst) {
            let r = client
                .try_send(&get_request("ka.example", &format!("/ka/{n}")))
                .and_then(|()| client.try_read_response());
            match r {
                Ok(r) if r.status == 200 && r.body_str() == "ok from A" && !r.says_close() => {}
                Ok(r) => {
                    *fl.lock().unwrap() = Some(format!("request {n}: {}{}", r.head_str(), r.body_str()));
                    return;
                }
                Err(e) => {
                    *fl.lock().unwrap() = Some(format!("request {n}: the connection failed: {e}"));
                    return;
                }
            }
            n += 1;
            sv.store(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    wait_count(&m, &served, 2, &failure, "before the first upgrade");
    let mut holders_seen = Vec::new();
    for round in 1..=5 {
        upgrade(&mut m);
        // The old generation is gone: the next requests are served by the new one.
        let now = served.load(Ordering::SeqCst);
        wait_count(&m, &served, now + 3, &failure, &format!("after upgrade {round}"));
        let st = status_json(&m);
        assert!(
            st["handover"]["received"].as_u64().is_some_and(|n| n >= 1),
            "upgrade {round}: the new master received the connection: {st}"
        );
        holders_seen.push(held_by_a_new_worker(&m, client_port, &format!("upgrade {round}")));
    }
    stop.store(true, Ordering::SeqCst);
    driver.join().expect("client thread");
    if let Some(f) = failure.lock().unwrap().clone() {
        panic!("{f}\n{}", m.log());
    }
    holders_seen.dedup();
    assert_eq!(holders_seen.len(), 5, "a different worker process after each upgrade: {holders_seen:?}");
}

const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A backend that switches to a tunnel on an Upgrade request and echoes
/// every byte upper-cased.
fn echoing_backend() -> ScriptedBackend {
    ScriptedBackend::start(|mut s, _| {
        let Ok(Some(_)) = read_head_exact(&mut s) else { return };
        if s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .is_err()
        {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_websocket_tunnel_moves_to_each_new_generation_through_three_upgrades_without_loss_or_reorder() {
    let be = echoing_backend();
    let mut m = MasterRun::start(&config(&be.spec(), 2));
    let mut client = m.client();
    client.send(UPGRADE);
    let r = client.read_head();
    assert_eq!(r.status, 101, "{}", r.head_str());
    let client_port = client.stream().local_addr().expect("local address").port();
    let (stop, echoed, failure) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Failure::default());
    let (st, ec, fl) = (stop.clone(), echoed.clone(), failure.clone());
    let driver = std::thread::spawn(move || {
        let mut s: &TcpStream = client.stream();
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let mut n = 0u64;
        while !st.load(Ordering::SeqCst) {
            let msg = format!("message {n:06};");
            let mut got = vec![0u8; msg.len()];
            let r = s.write_all(msg.as_bytes()).and_then(|()| s.read_exact(&mut got));
            if let Err(e) = r {
                *fl.lock().unwrap() = Some(format!("message {n}: the tunnel failed: {e}"));
                return;
            }
            if got != msg.to_ascii_uppercase().as_bytes() {
                *fl.lock().unwrap() = Some(format!(
                    "message {n}: sent {msg:?}, got {:?} (lost or reordered)",
                    String::from_utf8_lossy(&got)
                ));
                return;
            }
            n += 1;
            ec.store(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    wait_count(&m, &echoed, 3, &failure, "before the first upgrade");
    for round in 1..=3 {
        upgrade(&mut m);
        let now = echoed.load(Ordering::SeqCst);
        wait_count(&m, &echoed, now + 5, &failure, &format!("after upgrade {round}"));
        held_by_a_new_worker(&m, client_port, &format!("upgrade {round}"));
    }
    stop.store(true, Ordering::SeqCst);
    driver.join().expect("client thread");
    if let Some(f) = failure.lock().unwrap().clone() {
        panic!("{f}\n{}", m.log());
    }
    assert_eq!(be.connections(), 1, "the backend saw one connection throughout: the tunnel moved, it was not reopened");
}

/// Regression guard for rollback at every step of a rolling start: the
/// first new worker took connections from a retired old worker; the second
/// fails to start (fault injection); the connections go back, the retired
/// worker comes back on the old binary, and no request fails.
#[cfg(feature = "fault-injection")]
#[test]
fn a_rolling_upgrade_whose_second_new_worker_fails_rolls_back_without_a_failed_request() {
    use common::master::{Load, LoadSpec};

    let a = Backend::start("A");
    let mut m = MasterRun::start(&config(&a.spec(), 2));
    let old = m.pid().expect("master pid");
    let binary = |pid: u32| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(format!("/proc/{pid}/exe")).expect("a process's binary");
        (meta.dev(), meta.ino())
    };
    let old_exe = binary(old);
    let load = Load::start(LoadSpec {
        addr: m.addr(),
        host: "load.example".into(),
        path: "/load".into(),
        keepalive: 3,
        per_request: 2,
        interval: Duration::from_millis(20),
        bodies: vec![b"ok from A".to_vec()],
    });
    assert!(load.wait_progress(20, Duration::from_secs(10)), "the load runs");
    // Idle keep-alive connections on the worker the rolling start retires
    // first (the last slot's): they move (through its sibling, while no new
    // worker accepts) to the first new worker, and back.
    let st = m.expect_status();
    let retired = st.workers.iter().find(|w| w.slot == 1).and_then(|w| w.pid).expect("worker of slot 1");
    let mut idle = Vec::new();
    for _ in 0..60 {
        let mut c = m.client();
        assert_eq!(c.get("idle.example", "/idle").body_str(), "ok from A");
        let port = c.stream().local_addr().expect("local address").port();
        let inode = server_socket_inode(m.port(), port).expect("the connection's socket");
        if holders(inode, &[retired]) == [retired] {
            idle.push(c);
            if idle.len() == 2 {
                break;
            }
        }
    }
    assert!(!idle.is_empty(), "no connection landed on worker {retired}");

    let fault = m.dir().join("fault-upgrade-worker");
    std::fs::write(&fault, b"").expect("arm the fault");
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(!out.status.success() && out.stderr.contains("rolled back"), "{out:?}\n{}", m.log());
    assert!(m.log().contains("worker retired"), "the rolling start had retired an old worker:\n{}", m.log());
    assert_eq!(m.pid(), Some(old), "the pid file names the old master again");

    // The new master and its worker leave; the old master has its two workers again.
    let settled = wait_until(Duration::from_secs(20), || m.family().len() == 3);
    assert!(settled, "old master and two workers left: {:?}\n{}", m.family(), m.log());
    let st = m.wait_status(Duration::from_secs(10), |s| s.master_pid == old && s.all_ready()).expect("status");
    assert_eq!(st.workers.len(), 2, "{st:?}");
    for w in st.worker_pids() {
        assert_eq!(binary(w), old_exe, "worker {w} runs the old binary");
    }
    let handed_back = status_json(&m)["handover"]["received"].as_u64().unwrap_or(0);
    assert!(
        handed_back >= idle.len() as u64,
        "the connections the new generation took came back (received {handed_back})\n{}",
        m.log()
    );
    for c in &mut idle {
        let r = c.get("idle.example", "/again");
        assert_eq!(r.body_str(), "ok from A");
        assert!(!r.says_close(), "the connection lives on: {}", r.head_str());
    }
    assert!(load.wait_progress(20, Duration::from_secs(10)), "the old binary serves after the rollback");
    let report = load.finish();
    assert!(report.failures.is_empty(), "no request fails: {}\n{}", report.summary(), m.log());

    // Fixed: the next upgrade goes through.
    std::fs::remove_file(&fault).expect("disarm the fault");
    upgrade(&mut m);
    assert_eq!(get_once(m.addr(), "t.example", "/").body_str(), "ok from A");
}

/// `ctl status` during an upgrade (an old worker still finishing a slow
/// request keeps its generation there): both generations with their
/// workers, and the connections handed over so far.
#[test]
fn ctl_status_shows_each_generation_its_workers_and_the_connections_handed_over() {
    let release = Arc::new(AtomicBool::new(false));
    let gate = release.clone();
    let a = Backend::with_handler("A", move |r| {
        if r.path() == "/slow" {
            wait_until(Duration::from_secs(20), || gate.load(Ordering::SeqCst));
        }
        Reply::ok("ok from A")
    });
    let mut m = MasterRun::start(&config(&a.spec(), 2));
    let old = m.pid().expect("master pid");
    // Idle keep-alive connections to move, and a request the old generation
    // must finish.
    let mut idle: Vec<Client> = (0..4).map(|_| m.client()).collect();
    for c in &mut idle {
        assert_eq!(c.get("idle.example", "/").body_str(), "ok from A");
    }
    let slow = common::master::request_in_thread(m.addr(), "slow.example", "/slow");
    assert!(a.wait_for_requests(5, Duration::from_secs(10)), "the slow request arrived");

    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let new = m.pid().expect("new master pid");
    m.track(new);
    let st = status_json(&m);
    let gens = st["generations"].as_array().cloned().unwrap_or_default();
    assert_eq!(gens.len(), 2, "old and current generation: {st}");
    assert_eq!(gens[0]["role"], "old", "{st}");
    assert_eq!(gens[0]["master_pid"], old, "{st}");
    assert_eq!(gens[0]["workers"].as_array().map(Vec::len), Some(1), "the old worker finishing /slow: {st}");
    assert_eq!(gens[1]["role"], "current", "{st}");
    assert_eq!(gens[1]["master_pid"], new, "{st}");
    assert_eq!(gens[1]["workers"].as_array().map(Vec::len), Some(2), "{st}");
    assert_eq!(gens[0]["handed_over"], 4, "the four idle connections moved: {st}");
    assert_eq!(st["handover"]["received"], 4, "{st}");

    release.store(true, Ordering::SeqCst);
    let r = slow.join().expect("thread").unwrap_or_else(|e| panic!("the slow request failed: {e}"));
    assert_eq!(r.status, 200);
    assert!(wait_gone(old, Duration::from_secs(10)), "the old generation goes after its last request");
    let st = status_json(&m);
    assert_eq!(st["generations"].as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st["handover"]["previous_generation"]["handed_over"], 5, "and the slow one's connection after it: {st}");
    for c in &mut idle {
        let r = c.get("idle.example", "/again");
        assert_eq!(r.body_str(), "ok from A");
        assert!(!r.says_close(), "{}", r.head_str());
    }
}

/// A tunnel with bytes in flight (a burst the client is not reading yet)
/// cannot move; it moves once they are delivered, none lost or reordered.
#[test]
fn a_tunnel_with_bytes_in_flight_moves_once_they_are_delivered() {
    const CHUNK: usize = 64 << 10;
    // Chunk i is made of one byte that names it (mod 251): a lost or
    // reordered chunk shows.
    fn chunk(i: usize) -> Vec<u8> {
        vec![(i % 251) as u8; CHUNK]
    }
    // More than the kernel's socket buffers on the way hold (loopback
    // autotuning: a few MiB each), so some stays in Pitcher's buffers.
    const BURST: usize = 40 << 20;
    let be = ScriptedBackend::start(|mut s, _| {
        let Ok(Some(_)) = read_head_exact(&mut s) else { return };
        if s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .is_err()
        {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                return;
            }
            let sent = if &buf[..n] == b"burst;" {
                (0..BURST / CHUNK).try_for_each(|i| s.write_all(&chunk(i)))
            } else {
                s.write_all(&buf[..n].to_ascii_uppercase())
            };
            if sent.is_err() {
                return;
            }
        }
    });
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .top("drain_timeout_ms = 30000")
        .top("upgrade_timeout_ms = 10000")
        .cluster("a", [be.spec()])
        .route(None, "/", "a");
    let mut m = MasterRun::start(&builder);
    let old = m.pid().expect("master pid");
    let old_workers = m.expect_status().worker_pids();
    let mut client = m.client();
    client.send(UPGRADE);
    assert_eq!(client.read_head().status, 101);
    let client_port = client.stream().local_addr().expect("local address").port();
    let mut s: &TcpStream = client.stream();
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // Megabytes on their way, unread: the proxy's buffers are full.
    s.write_all(b"burst;").expect("send");
    std::thread::sleep(Duration::from_millis(300));

    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    m.track(m.pid().expect("new master pid"));
    let st = status_json(&m);
    let old_live = st["generations"][0]["workers"].as_array().map_or(0, Vec::len);
    assert_eq!(old_live, 1, "the old worker holding the tunnel is still there: {st}");

    let mut got = vec![0u8; CHUNK];
    for i in 0..BURST / CHUNK {
        s.read_exact(&mut got).expect("the burst arrives");
        assert!(got == chunk(i), "chunk {i} of the burst arrived whole and in order");
    }
    for i in 0..5 {
        let msg = format!("after {i};");
        s.write_all(msg.as_bytes()).expect("send");
        let mut echo = vec![0u8; msg.len()];
        s.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, msg.to_ascii_uppercase().as_bytes());
    }
    for pid in std::iter::once(old).chain(old_workers) {
        assert!(wait_gone(pid, Duration::from_secs(10)), "the old generation goes once the tunnel moved\n{}", m.log());
    }
    held_by_a_new_worker(&m, client_port, "the drained tunnel");
    let st = status_json(&m);
    assert_eq!(st["handover"]["previous_generation"]["handed_over"], 1, "moved, not closed: {st}");
    assert_eq!(st["handover"]["previous_generation"]["closed"], 0, "{st}");
    s.write_all(b"last;").expect("send");
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"LAST;");
    assert_eq!(be.connections(), 1, "the backend connection moved with it");
}
