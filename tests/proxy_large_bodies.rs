//! Large bodies through the real binary: 1 MiB and 3 MiB bodies, identity
//! and chunked, arrive byte-exact in both directions, on one keep-alive
//! client connection and one reused backend connection (identity response
//! bodies of this size go through `splice(2)`); bytes a backend sends past
//! a spliced body are never taken for the next response; a client that
//! stops reading mid-body is timed out; a backend closing mid-body gives
//! the client a truncated body and a closed connection, not a hang.

mod common;

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn single(spec: &str, extra: &str) -> Pitcher {
    ConfigBuilder::new().cluster("app", [spec]).route(None, "/", "app").section(extra).start()
}

/// The size asked for in a path like `/get/1048576`.
fn size_of(path: &str) -> usize {
    path.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A request with a chunked body, in pieces of `piece` bytes.
fn chunked_request(path: &str, body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    for c in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn large_bodies_arrive_byte_exact_both_ways_on_reused_connections() {
    let be = Backend::with_handler("be", |req| {
        let n = size_of(req.path());
        if req.path().starts_with("/get/") {
            Reply::ok(pattern_bytes(0, n))
        } else if req.path().starts_with("/chunks/") {
            Reply::chunked(200, pattern_bytes(0, n).chunks(100_000).map(<[u8]>::to_vec).collect())
        } else if req.path().starts_with("/stream/") {
            Reply::stream(n as u64)
        } else {
            // Echo the request body (its length and a digest of it go back
            // in headers too, to tell a lost byte from a moved one).
            Reply::ok(req.body.clone()).with_header("X-Got", &req.body.len().to_string())
        }
    });
    let p = single(&be.spec(), "");
    let mut c = p.client();

    for round in 0..2 {
        for n in [MIB, 3 * MIB] {
            // Downloads: Content-Length (one write, and in 64 KiB pieces) and chunked.
            for path in [format!("/get/{n}"), format!("/stream/{n}"), format!("/chunks/{n}")] {
                let r = c.get("h", &path);
                assert_eq!(r.status, 200, "{path}: {}", r.head_str());
                assert_eq!(r.body.len(), n, "{path} (round {round}): body length");
                assert!(r.body == pattern_bytes(0, n), "{path} (round {round}): body bytes differ");
            }
            // Uploads: Content-Length and chunked.
            let body = pseudo_random_bytes(n, round as u64 * 7 + n as u64);
            let r = c.request(&request_bytes("POST", "h", &format!("/echo/{n}"), &[], &body));
            assert_eq!(r.status, 200, "{}", r.head_str());
            assert_eq!(r.header("x-got"), Some(n.to_string().as_str()), "identity upload of {n}");
            assert!(r.body == body, "identity upload of {n}: echoed bytes differ");
            let r = c.request(&chunked_request(&format!("/echo-chunked/{n}"), &body, 40_000));
            assert_eq!(r.status, 200, "{}", r.head_str());
            assert_eq!(r.header("x-got"), Some(n.to_string().as_str()), "chunked upload of {n}");
            assert!(r.body == body, "chunked upload of {n}: echoed bytes differ");
        }
    }
    // One client connection served all of it, and so did one backend
    // connection: a spliced body leaves it fit for the next request.
    assert!(!c.closed_by_peer(Duration::from_millis(50)), "the client connection was closed");
    assert_eq!(be.requests(), 2 * 2 * 5);
    assert_eq!(be.connections(), 1, "the backend connection was not reused after large bodies");
}

#[test]
fn bytes_after_a_large_body_are_not_taken_for_the_next_response() {
    const N: usize = 256 * 1024;
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/first" {
            // The body, then a whole second response nobody asked for.
            let mut raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {N}\r\n\r\n").into_bytes();
            raw.extend_from_slice(&pattern_bytes(0, N));
            raw.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nbogus");
            Reply::raw(raw)
        } else {
            Reply::ok("second")
        }
    });
    let p = single(&be.spec(), "");
    let mut c = p.client();
    let r = c.get("h", "/first");
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert!(r.body == pattern_bytes(0, N), "first body differs");
    let r = if c.closed_by_peer(Duration::from_millis(10)) {
        get_once(p.addr(), "h", "/second")
    } else {
        c.get("h", "/second")
    };
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "second", "the backend's extra bytes were taken for the next response");
}

#[test]
fn client_that_stops_reading_mid_body_is_timed_out() {
    const LEN: u64 = 1 << 30;
    let be = Backend::with_handler("be", |_| Reply::stream(LEN));
    let p = single(&be.spec(), "[timeouts]\nclient_write_ms = 400");
    let mut c = p.client();
    c.send(&get_request("h", "/big"));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head_str());
    let first = c.read_some(64 * 1024).expect("the first body bytes");
    assert!(!first.is_empty() && first == pattern_bytes(0, first.len()));
    // Stop reading well past client_write_ms.
    thread::sleep(Duration::from_millis(2000));
    // What the sockets held arrives, then the connection ends: far short
    // of the body, and well before the client's own read timeout.
    let started = Instant::now();
    let mut offset = first.len() as u64;
    let ended = loop {
        match c.read_some(256 * 1024) {
            Ok(b) if b.is_empty() => break Ok(()),
            Ok(b) => {
                assert!(b == pattern_bytes(offset, b.len()), "body corrupted at offset {offset}");
                offset += b.len() as u64;
            }
            Err(e) => break Err(e),
        }
    };
    let took = started.elapsed();
    if let Err(e) = &ended {
        assert!(
            !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "the connection was left open after the client stopped reading ({offset} bytes read)"
        );
    }
    assert!(offset < LEN / 4, "the client got {offset} bytes after stopping to read");
    assert!(took < IO_TIMEOUT, "the connection ended only after {took:?}");
    // Pitcher goes on serving.
    be.set_handler(|_| Reply::ok("fine"));
    assert_ok_body(&get_once(p.addr(), "h", "/"), b"fine");
}

#[test]
fn backend_closing_mid_body_truncates_the_response() {
    const SENT: usize = MIB;
    let be = Backend::with_handler("be", |_| {
        let mut raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 3 * MIB).into_bytes();
        raw.extend_from_slice(&pattern_bytes(0, SENT));
        Reply::raw_then_close(raw)
    });
    let p = single(&be.spec(), "");
    let mut c = p.client();
    c.send(&get_request("h", "/"));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head_str());
    assert_eq!(head.header("content-length"), Some((3 * MIB).to_string().as_str()));
    let started = Instant::now();
    // Every byte the backend sent arrives, then the connection closes.
    let got = c.read_to_eof().expect("the body up to the close");
    assert!(started.elapsed() < IO_TIMEOUT, "truncation took {:?}", started.elapsed());
    assert_eq!(got.len(), SENT, "bytes before the close");
    assert!(got == pattern_bytes(0, SENT), "the truncated body's bytes differ");
    // Pitcher goes on serving.
    be.set_handler(|_| Reply::ok("fine"));
    assert_ok_body(&get_once(p.addr(), "h", "/"), b"fine");
}

/// No pipe to be had (the fd limit; here a test build's fault injection):
/// the body goes through the buffers, whole, and the connections stay
/// usable.
#[cfg(feature = "fault-injection")]
#[test]
fn without_a_pipe_a_large_body_is_copied_whole() {
    let be = Backend::with_handler("be", |req| Reply::ok(pattern_bytes(0, size_of(req.path()))));
    let p = single(&be.spec(), "");
    let mut c = p.client();
    for _ in 0..2 {
        let r = c.request(&request_bytes(
            "GET",
            "h",
            &format!("/get/{}", 3 * MIB),
            &[("X-Pitcher-Test-No-Pipe", "1")],
            b"",
        ));
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert!(r.body == pattern_bytes(0, 3 * MIB), "body bytes differ ({} bytes)", r.body.len());
        let r = c.get("h", &format!("/get/{MIB}"));
        assert!(r.body == pattern_bytes(0, MIB), "spliced body after a copied one differs");
    }
    assert_eq!(be.connections(), 1, "the backend connection was not reused");
}
