//! The `statsd` module with the real master and two workers, received by
//! a UDP socket of the test: the request counters add up to the requests
//! sent, a timer arrives per request under the configured prefix, no
//! datagram is larger than `max_packet_bytes`; with no server listening,
//! requests still all succeed and the lost datagrams are counted (the
//! workers log `statsd datagrams dropped`).

mod common;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::*;

const WAIT: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 200;
const BODY: &str = "ok from a";

fn backend() -> Backend {
    Backend::with_handler("a", |_| Reply::ok(BODY))
}

fn builder(be: &Backend, address: &str) -> ConfigBuilder {
    builder_flushing(be, address, 100)
}

fn builder_flushing(be: &Backend, address: &str, flush_interval_ms: u64) -> ConfigBuilder {
    let statsd = format!(
        "[modules.statsd]\naddress = \"{address}\"\nprefix = \"edge.test\"\n\
         flush_interval_ms = {flush_interval_ms}\nmax_packet_bytes = {MAX_PACKET}"
    );
    ConfigBuilder::new()
        .top("workers = 2")
        .cluster("app", [be.spec()])
        .route(None, "/app", "app")
        .section(&statsd)
        .section("[admin]\naddress = \"127.0.0.1:0\"")
}

/// `pitcher_statsd_datagrams_total{result}` from the master's `/metrics`.
fn datagrams(m: &MasterRun, result: &str) -> u64 {
    use std::io::{Read, Write};
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let admin = v["data"]["admin"].as_str().expect("admin address").to_string();
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let key = format!("pitcher_statsd_datagrams_total{{result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.parse().ok()).expect("the family")
}

/// What the receiver got: counters summed by name, timers counted by name.
#[derive(Default, Debug)]
struct Received {
    counters: BTreeMap<String, u64>,
    timers: BTreeMap<String, u64>,
    datagrams: usize,
}

impl Received {
    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    fn requests(&self) -> u64 {
        self.counters.iter().filter(|(k, _)| k.starts_with("edge.test.requests.")).map(|(_, v)| v).sum()
    }

    /// Reads one datagram (if one comes within the socket's timeout),
    /// checking its size and the shape of every line.
    fn read(&mut self, s: &UdpSocket) -> bool {
        let mut buf = vec![0u8; 65536];
        let Ok(n) = s.recv(&mut buf) else { return false };
        assert!(n <= MAX_PACKET, "a datagram of {n} bytes, over max_packet_bytes {MAX_PACKET}");
        self.datagrams += 1;
        let text = std::str::from_utf8(&buf[..n]).expect("statsd datagrams are text");
        for line in text.split('\n') {
            let (name, rest) = line.split_once(':').unwrap_or_else(|| panic!("no ':' in {line:?} of {text:?}"));
            assert!(name.starts_with("edge.test."), "{line:?} lacks the prefix");
            let (value, kind) = rest.split_once('|').unwrap_or_else(|| panic!("no '|' in {line:?}"));
            match kind {
                "c" => {
                    let v: u64 = value.parse().unwrap_or_else(|_| panic!("counter value in {line:?}"));
                    *self.counters.entry(name.to_string()).or_default() += v;
                }
                "ms" => {
                    let v: f64 = value.parse().unwrap_or_else(|_| panic!("timer value in {line:?}"));
                    assert!((0.0..10_000.0).contains(&v), "{line:?}");
                    *self.timers.entry(name.to_string()).or_default() += 1;
                }
                _ => panic!("unknown metric type in {line:?}"),
            }
        }
        true
    }
}

fn receiver() -> (UdpSocket, String) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let a = s.local_addr().expect("addr").to_string();
    (s, a)
}

#[test]
fn counters_add_up_to_the_requests_and_a_timer_arrives_per_request() {
    let be = backend();
    let (rx, address) = receiver();
    let m = MasterRun::start(&builder(&be, &address));
    let (routed, unrouted) = (60u64, 7u64);
    // Keep-alive clients and one-shot ones, so that both workers serve some.
    let mut c = m.client();
    for i in 0..routed / 2 {
        let r = c.get("app.example", &format!("/app/ka/{i}"));
        assert_eq!(r.status, 200);
    }
    for i in 0..routed / 2 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/app/once/{i}")).status, 200);
    }
    for i in 0..unrouted {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/nowhere/{i}")).status, 404);
    }
    let mut got = Received::default();
    let deadline = Instant::now() + WAIT;
    while got.requests() < routed + unrouted && Instant::now() < deadline {
        got.read(&rx);
    }
    // Anything sent late would show up now.
    while got.read(&rx) {}
    assert_eq!(got.requests(), routed + unrouted, "{got:?}\n{}", m.log());
    assert_eq!(got.counter("edge.test.requests.app.2xx"), routed, "{got:?}");
    assert_eq!(got.counter("edge.test.requests._none.4xx"), unrouted, "{got:?}");
    assert_eq!(got.counter("edge.test.bytes_sent.app"), routed * BODY.len() as u64, "{got:?}");
    assert_eq!(got.timers.get("edge.test.request_time.app"), Some(&routed), "{got:?}");
    assert_eq!(got.timers.get("edge.test.upstream_time.app"), Some(&routed), "{got:?}");
    assert_eq!(got.timers.get("edge.test.request_time._none"), Some(&unrouted), "{got:?}");
    assert_eq!(got.timers.get("edge.test.upstream_time._none"), None, "no backend, no upstream time: {got:?}");
    // 141 lines of up to ~45 bytes cannot fit in a few 200-byte datagrams:
    // full datagrams were sent before the flush.
    assert!(got.datagrams > 20, "{} datagrams", got.datagrams);
    assert!(wait_until(WAIT, || datagrams(&m, "sent") >= got.datagrams as u64), "sent datagrams are in /metrics");
}

#[test]
fn with_no_server_requests_succeed_and_lost_datagrams_are_counted() {
    let be = backend();
    let address = {
        let (rx, a) = receiver();
        drop(rx);
        a
    };
    let m = MasterRun::start(&builder(&be, &address));
    let mut c = m.client();
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    // Each flush sends a datagram; the kernel refuses the next one once
    // the port's "unreachable" came back.
    while !m.log().contains("statsd datagrams dropped") {
        assert!(Instant::now() < deadline, "no drop logged after {n} requests\n{}", m.log());
        for _ in 0..10 {
            n += 1;
            assert_eq!(c.get("app.example", &format!("/app/{n}")).status, 200);
            assert_eq!(get_once(m.addr(), "app.example", &format!("/app/once/{n}")).status, 200);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = m.log();
    let line = log.lines().find(|l| l.contains("statsd datagrams dropped")).expect("the line");
    assert!(line.contains(&address), "{line}");
    assert!(line.contains("dropped: "), "{line}");
    assert!(wait_until(WAIT, || datagrams(&m, "dropped") > 0), "dropped datagrams are in /metrics");
}

/// Reads until the `requests` counters reach `n` or [`WAIT`] passes.
fn read_until(rx: &UdpSocket, got: &mut Received, n: u64) {
    let deadline = Instant::now() + WAIT;
    while got.requests() < n && Instant::now() < deadline {
        got.read(rx);
    }
}

#[test]
fn counters_not_yet_flushed_go_out_at_a_reload_and_at_quit() {
    let be = backend();
    let (rx, address) = receiver();
    // No flush for a minute: what arrives sooner was sent when the module
    // was replaced (reload) or the worker ended (quit).
    let mut m = MasterRun::start(&builder_flushing(&be, &address, 60_000));
    let mut got = Received::default();
    for i in 0..20 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/app/before/{i}")).status, 200);
    }
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    read_until(&rx, &mut got, 20);
    assert_eq!(got.counter("edge.test.requests.app.2xx"), 20, "{got:?}\n{}", m.log());
    for i in 0..15 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/app/after/{i}")).status, 200);
    }
    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    read_until(&rx, &mut got, 35);
    assert_eq!(got.counter("edge.test.requests.app.2xx"), 35, "{got:?}\n{}", m.log());
    assert_eq!(got.timers.get("edge.test.request_time.app"), Some(&35), "{got:?}");
    m.stop();
}
