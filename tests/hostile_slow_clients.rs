//! Slow, idle and too many clients: 408 for a head sent a byte at a time,
//! idle keep-alive connections closed, the connection limit answered with
//! 503, and many slow clients not stalling normal traffic on the same
//! worker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn proxy(extra: &str) -> (Backend, Pitcher) {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").section(extra).start();
    (be, p)
}

/// Writes `bytes` one at a time with `gap` between them until done, a
/// write fails, or `stop` is set.
fn trickle(mut s: TcpStream, bytes: Vec<u8>, gap: Duration, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for b in bytes {
            if stop.load(Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(gap);
        }
    })
}

#[test]
fn head_sent_a_byte_at_a_time_gets_408_after_client_header_timeout() {
    let (be, p) = proxy("[timeouts]\nclient_header_ms = 500");
    let mut c = p.client();
    let stop = Arc::new(AtomicBool::new(false));
    let mut head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ".to_vec();
    head.extend_from_slice(&[b'a'; 200]);
    let t0 = Instant::now();
    let writer = trickle(c.stream().try_clone().unwrap(), head, Duration::from_millis(20), stop.clone());
    let r = c.read_response();
    let waited = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    assert_error_response(&r, 408);
    assert!(r.says_close(), "{}", r.head_str());
    // Every byte was progress, yet the head as a whole was late.
    assert!(waited >= Duration::from_millis(400), "408 after only {waited:?}");
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after 408");
    writer.join().unwrap();
    assert_eq!(be.connections(), 0);
}

#[test]
fn body_stalled_mid_way_gets_408_after_client_body_timeout() {
    let (be, p) = proxy("[timeouts]\nclient_body_ms = 300");
    let mut c = p.client();
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
    let r = c.read_response();
    assert_error_response(&r, 408);
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after 408");
    assert!(wait_until(Duration::from_secs(5), || be.open_connections() == 0), "upstream connection left open");
    assert_eq!(be.requests(), 0, "the backend received a complete request");
}

#[test]
fn idle_keepalive_connection_is_closed_after_keepalive_idle_timeout() {
    let (_be, p) = proxy("[timeouts]\nkeepalive_idle_ms = 300\nclient_header_ms = 10000");
    let mut c = p.client();
    assert_ok_body(&c.get("h", "/"), b"ok from be");
    let t0 = Instant::now();
    // Closed silently: no 408 for a client that started no request.
    assert!(c.closed_by_peer(IO_TIMEOUT), "idle keep-alive connection never closed");
    let idle = t0.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after only {idle:?} of idleness");
}

#[test]
fn connection_that_never_sends_is_closed_silently_after_client_header_timeout() {
    let (be, p) = proxy("[timeouts]\nclient_header_ms = 300\nkeepalive_idle_ms = 10000");
    let mut c = p.client();
    let t0 = Instant::now();
    assert!(c.closed_by_peer(IO_TIMEOUT), "silent connection never closed");
    assert!(t0.elapsed() >= Duration::from_millis(250), "closed after only {:?}", t0.elapsed());
    assert_eq!(be.connections(), 0);
}

/// Soft limit on open files of this process (inherited by Pitcher).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

#[test]
fn a_thousand_slow_clients_do_not_stall_normal_requests() {
    // Each process holds one end of every slow connection, plus its own
    // files: stay well inside the soft limit on machines that have a low one.
    let n = 1000.min(open_files_limit().saturating_sub(256));
    assert!(n >= 200, "open files limit too low for this test: {}", open_files_limit());
    let (be, p) = proxy("[timeouts]\nclient_header_ms = 30000");

    let mut slow: Vec<TcpStream> = (0..n)
        .map(|i| {
            let s =
                TcpStream::connect_timeout(&p.addr(), IO_TIMEOUT).unwrap_or_else(|e| panic!("slow client {i}: {e}"));
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    for s in &mut slow {
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: h\r\nX-Trickle: ").unwrap();
    }
    // One byte to every slow client every 20 ms while normal traffic runs.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let trickler = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let mut socks: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for s in &mut socks {
                    s.write_all(b"a").expect("a slow client was cut off");
                }
                rounds.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Normal traffic, on new connections and on a keep-alive one, all
    // answered, for as long as it takes the slow clients to trickle ten
    // times (and at least 40 times each).
    let mut keep = p.client();
    let mut served = 0;
    while served < 40 || rounds.load(Ordering::SeqCst) < 10 {
        let r = get_once(p.addr(), "h", &format!("/fresh/{served}"));
        assert_ok_body(&r, b"ok from be");
        assert_ok_body(&keep.get("h", &format!("/kept/{served}")), b"ok from be");
        served += 1;
        assert!(served < 100_000, "the trickler made no progress");
    }
    stop.store(true, Ordering::SeqCst);
    trickler.join().expect("trickler panicked");
    assert_eq!(be.requests(), 2 * served);

    // The slow clients were kept, not dropped: a few finish and are served.
    for s in slow.iter_mut().take(5) {
        s.write_all(b"\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(10).any(|w| w == b"ok from be") {
            let k = s.read(&mut buf).expect("read from a finished slow client");
            assert!(k > 0, "slow client closed before its answer: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..k]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&got));
    }
    assert_eq!(be.requests(), 2 * served + 5);
}

#[test]
fn connections_over_max_connections_get_503_and_close() {
    let (be, p) = proxy("[limits]\nmax_connections = 3");
    // Three connections, each surely accepted (it was served).
    let mut held: Vec<Client> = (0..3).map(|_| p.client()).collect();
    for c in &mut held {
        assert_ok_body(&c.get("h", "/"), b"ok from be");
    }

    // A fourth is answered 503 and closed without a request.
    let mut extra = p.client();
    let r = extra.read_response();
    assert_error_response(&r, 503);
    assert!(r.says_close(), "{}", r.head_str());
    assert!(extra.closed_by_peer(IO_TIMEOUT), "excess connection left open");

    // One that sends its request at once gets the same answer.
    let mut eager = p.client();
    eager.send(&get_request("h", "/eager"));
    let r = eager.read_response();
    assert_error_response(&r, 503);
    assert_eq!(be.requests(), 3, "a refused connection's request reached the backend");

    // The held connections still work; once one closes, a new one is served.
    assert_ok_body(&held[0].get("h", "/still"), b"ok from be");
    drop(held.pop());
    let mut served = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut c = p.client();
            c.send(&get_request("h", "/later"));
            match c.try_read_response() {
                Ok(r) if r.status == 200 => {
                    served = Some(r);
                    true
                }
                _ => false,
            }
        }),
        "no connection served after one of the held ones closed"
    );
    assert_ok_body(&served.unwrap(), b"ok from be");
}
