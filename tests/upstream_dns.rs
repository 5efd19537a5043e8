//! Backends by DNS name: the master resolves `name:PORT` entries through
//! a DNS server the test runs (a tiny UDP server answering A queries from
//! a table the test changes), re-resolves them every
//! `resolve_interval_ms`, and the workers follow: an address that appears
//! gets traffic, one that disappears gets none, with zero failed requests
//! under load. A name that does not resolve is a warning at `-t`, or a
//! refusal naming file, line and name with `resolve = "required"`.
//!
//! The backends of one name share a port on different loopback addresses
//! (127.0.0.2, 127.0.0.3: Linux routes all of 127.0.0.0/8 to `lo`).

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::master::{Load, LoadSpec, MasterRun};
use common::*;

/// A DNS server on 127.0.0.1 (port chosen by the kernel) answering A
/// queries from a table; a name not in it gets NXDOMAIN.
struct DnsServer {
    addr: SocketAddr,
    table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS server");
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
        let addr = sock.local_addr().expect("local_addr");
        let table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, q, s) = (table.clone(), queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                let Some((name, end)) = question(&buf[..n]) else { continue };
                q.fetch_add(1, Ordering::Relaxed);
                let ips = t.lock().unwrap().get(&name).cloned();
                let _ = sock.send_to(&answer(&buf[..end], ips.as_deref()), peer);
            }
        });
        DnsServer { addr, table, queries, stop, thread: Some(thread) }
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.table.lock().unwrap().insert(name.to_string(), ips.to_vec());
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The queried name (lower case, dotted) and the end of the question.
fn question(m: &[u8]) -> Option<(String, usize)> {
    if m.len() < 12 || m[2] & 0x80 != 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *m.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(m.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let end = at + 4;
    (end <= m.len()).then(|| (labels.join("."), end))
}

/// The response to `query` (header and question): A records, or NXDOMAIN.
fn answer(query: &[u8], ips: Option<&[Ipv4Addr]>) -> Vec<u8> {
    let mut m = query.to_vec();
    m[2] = 0x81; // response, RD
    m[3] = if ips.is_some() { 0x80 } else { 0x83 }; // RA; NOERROR or NXDOMAIN
    let ips = ips.unwrap_or(&[]);
    m[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
    m[8..12].fill(0);
    for ip in ips {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        m.extend_from_slice(&ip.octets());
    }
    m
}

const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SECOND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Two backends on the same port, at 127.0.0.2 ("A") and 127.0.0.3 ("B"),
/// answering the load's requests after a few milliseconds (so that some
/// are always in flight when an address goes).
fn backend_pair() -> (Backend, Backend, u16) {
    let handler = |name: &'static str| {
        move |r: &RecordedRequest| {
            let reply = default_reply(name);
            if r.path() == "/load" {
                reply.delayed(Duration::from_millis(4))
            } else {
                reply
            }
        }
    };
    for _ in 0..50 {
        let a = Backend::try_with_handler_at("A", (FIRST, 0).into(), handler("A")).expect("bind 127.0.0.2:0");
        let port = a.addr().port();
        if let Ok(b) = Backend::try_with_handler_at("B", (SECOND, port).into(), handler("B")) {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// `requests()` of a backend stays the same for `quiet` while the load
/// runs (it gets no new request).
fn stays_unused(b: &Backend, quiet: Duration, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let before = b.requests();
        std::thread::sleep(quiet);
        b.requests() == before
    })
}

#[test]
fn an_address_added_then_one_removed_by_dns_moves_requests_with_zero_failures() {
    let dns = DnsServer::start();
    let (a, b, port) = backend_pair();
    dns.set("app.test", &[FIRST]);
    let cluster = format!(
        "resolver = \"{}\"\nresolve_interval_ms = 100\nresolve = \"required\"\nslow_start_ms = \"20s\"",
        dns.addr
    );
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .cluster_with("app", [format!("app.test:{port}")], &cluster)
        .route(None, "/", "app")
        .section(&format!("[admin]\naddress = \"{admin}\""));
    let m = MasterRun::start(&builder);
    let metrics = || get_once(admin, "admin", "/metrics").body_str();
    let load = Load::start(LoadSpec {
        addr: m.addr(),
        host: "load.example".into(),
        path: "/load".into(),
        keepalive: 3,
        per_request: 3,
        interval: Duration::from_millis(5),
        bodies: vec![b"ok from A".to_vec(), b"ok from B".to_vec()],
    });
    assert!(load.wait_progress(100, Duration::from_secs(10)), "the load runs: {:?}", load.stats().failures());
    assert!(dns.queries() >= 2, "the name is re-resolved: {} queries", dns.queries());
    assert_eq!(b.requests(), 0, "127.0.0.3 is not in DNS yet");

    // Added: the second address gets requests too, in a slow start.
    dns.set("app.test", &[FIRST, SECOND]);
    assert!(wait_until(Duration::from_secs(10), || b.requests() >= 10), "B gets requests: {}", m.log());
    let ups = m.command(&["ctl", "upstreams"]).stdout;
    let row = |ip: &str| ups.lines().find(|l| l.contains(&format!("{ip}:{port}"))).map(str::to_string);
    assert!(row("127.0.0.2").is_some_and(|r| r.contains("healthy")), "{ups}");
    assert!(row("127.0.0.3").is_some_and(|r| r.contains("slow_start")), "a new address ramps up: {ups}");
    let text = metrics();
    assert!(text.contains(&format!("backend=\"127.0.0.3:{port}\"")), "/metrics shows the new address: {text}");
    let a_before = a.requests();
    assert!(wait_until(Duration::from_secs(10), || a.requests() > a_before + 10), "A still gets requests");

    // Removed: the first address gets nothing more; its requests in flight finish.
    dns.set("app.test", &[SECOND]);
    assert!(
        stays_unused(&a, Duration::from_millis(500), Duration::from_secs(10)),
        "A still gets requests after its address left DNS: {}",
        m.log()
    );
    let (a_gone, b_before) = (a.requests(), b.requests());
    assert!(load.wait_progress(100, Duration::from_secs(10)), "the load goes on");
    // (Responses counted by the load may include a few already in flight.)
    assert!(b.requests() >= b_before + 90, "B takes every request now");
    assert_eq!(a.requests(), a_gone, "A gets none");
    let ups = m.command(&["ctl", "upstreams"]).stdout;
    assert!(!ups.contains(&format!("127.0.0.2:{port}")), "ctl upstreams shows the resolved set: {ups}");
    let text = metrics();
    assert!(!text.contains(&format!("backend=\"127.0.0.2:{port}\"")), "{text}");
    assert!(text.contains("pitcher_backend_dns_lookups_total{result=\"changed\"} 2\n"), "two changes: {text}");

    let report = load.finish();
    report.assert_no_failures();
    assert!(report.bodies.contains_key("ok from A") && report.bodies.contains_key("ok from B"), "{report:?}");
    assert!(m.log().contains("backend name resolved to new addresses"), "{}", m.log());
}

#[test]
fn a_name_with_no_address_answers_503_until_dns_has_one() {
    let dns = DnsServer::start();
    let (_a, b, port) = backend_pair();
    let cluster = format!("resolver = \"{}\"\nresolve_interval_ms = 100", dns.addr);
    let builder =
        ConfigBuilder::new().cluster_with("app", [format!("later.test:{port}")], &cluster).route(None, "/", "app");
    let mut m = MasterRun::start(&builder);
    assert!(m.log().contains("backend name does not resolve"), "a warning at start: {}", m.log());
    let r = get_once(m.addr(), "x.example", "/");
    assert_eq!(r.status, 503, "no address yet: {}", r.head_str());
    // Required now: the reload is refused, naming the name; nothing changes.
    let required = ConfigBuilder::new()
        .cluster_with("app", [format!("later.test:{port}")], &format!("{cluster}\nresolve = \"required\""))
        .route(None, "/", "app");
    m.write_config(&required);
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.all().contains(&format!("later.test:{port}")) && out.all().contains("pitcher.toml:"), "{out:?}");
    m.write_config(&builder);
    dns.set("later.test", &[SECOND]);
    assert!(
        wait_until(Duration::from_secs(10), || get_once(m.addr(), "x.example", "/").status == 200),
        "the address found later serves: {}",
        m.log()
    );
    assert!(b.requests() >= 1);
    // A reload keeps the addresses the name has.
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(get_once(m.addr(), "x.example", "/").status, 200, "{}", m.log());
}

#[test]
fn an_unresolvable_name_is_a_warning_at_t_and_a_refusal_when_required() {
    let dns = DnsServer::start();
    let dir = common::pitcher::new_dir();
    let path = dir.path().join("pitcher.toml");
    let builder = |extra: &str| {
        ConfigBuilder::new()
            .cluster_with("app", ["127.0.0.1:9", "nowhere.test:9001"], &format!("resolver = \"{}\"\n{extra}", dns.addr))
            .route(None, "/", "app")
            .build(free_port())
    };
    let text = builder("");
    let line = text.lines().position(|l| l.contains("nowhere.test")).expect("the backends line") + 1;
    std::fs::write(&path, &text).unwrap();
    let cfg = path.to_str().unwrap();
    let out = run_pitcher(&["-t", "-c", cfg], Duration::from_secs(20));
    assert!(out.status.success(), "only a warning: {out:?}");
    assert!(out.stderr.contains("warning"), "{out:?}");
    assert!(out.stderr.contains(&format!("{cfg}:{line}:")) && out.stderr.contains("nowhere.test:9001"), "{out:?}");
    assert!(dns.queries() >= 1, "asked of the configured resolver");

    std::fs::write(&path, builder("resolve = \"required\"")).unwrap();
    let out = run_pitcher(&["-t", "-c", cfg], Duration::from_secs(20));
    assert!(!out.status.success(), "refused: {out:?}");
    let all = out.all();
    assert!(all.contains(&format!("{cfg}:{line}:")), "file and line: {all}");
    assert!(all.contains("nowhere.test:9001") && all.contains("required"), "{all}");

    // Once DNS has it, the required name passes.
    dns.set("nowhere.test", &[FIRST]);
    let out = run_pitcher(&["-t", "-c", cfg], Duration::from_secs(20));
    assert!(out.status.success() && !out.stderr.contains("warning"), "{out:?}");
}
