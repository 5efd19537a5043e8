//! Protocol features real clients and backends use: HTTP/1.0 with and
//! without keep-alive, pipelining, `Expect: 100-continue`, Upgrade to a
//! byte tunnel, chunked trailers, `Connection: close` from either side, and
//! close-delimited responses re-framed for keep-alive clients.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn single(spec: &str) -> Pitcher {
    ConfigBuilder::new().cluster("app", [spec]).route(None, "/", "app").start()
}

/// Answers with the request's target and body.
fn echo(req: &RecordedRequest) -> Reply {
    Reply::ok(format!("{} {}", req.target, String::from_utf8_lossy(&req.body)))
}

/// Reads from `c` until `want` has arrived (or fails after 5 s).
fn read_until(c: &mut Client, want: &[u8]) -> Vec<u8> {
    c.stream().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    while !got.windows(want.len()).any(|w| w == want) {
        match c.read_some(64 * 1024) {
            Ok(b) if !b.is_empty() => got.extend_from_slice(&b),
            other => panic!(
                "waiting for {:?}, got {:?} then {other:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    c.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    got
}

// --- HTTP/1.0 ---

#[test]
fn http10_request_without_keepalive_is_answered_and_closed() {
    let be = Backend::with_handler("be", echo);
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.request(b"GET /old HTTP/1.0\r\n\r\n");
    assert_ok_body(&r, b"/old ");
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "HTTP/1.0 connection without keep-alive left open");
    // The backend gets an HTTP/1.1 request, which always has a Host field.
    let got = be.last_request().unwrap();
    assert_eq!(got.version, "HTTP/1.1");
    assert_eq!(got.headers.get_all("host"), vec![""], "{}", got.head_str());
}

#[test]
fn http10_request_with_keepalive_keeps_the_connection() {
    let be = Backend::with_handler("be", echo);
    let p = single(&be.spec());
    let mut c = p.client();
    for i in 0..3 {
        let r = c.request(format!("GET /old/{i} HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n").as_bytes());
        assert_ok_body(&r, format!("/old/{i} ").as_bytes());
        assert_eq!(r.header("connection"), Some("keep-alive"), "{}", r.head_str());
    }
    let r = c.request(b"POST /old HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nbody");
    assert_ok_body(&r, b"/old body");
    assert_eq!(be.requests(), 4);
}

#[test]
fn http10_client_gets_a_chunked_response_decoded_and_closed() {
    let be = Backend::with_handler("be", |_| {
        Reply::chunked(200, vec![b"hello ".to_vec(), b"world".to_vec()]).with_trailer("X-T", "1")
    });
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.request(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n");
    assert_ok_body(&r, b"hello world");
    assert_eq!(r.framing, Framing::Close, "{}", r.head_str());
    assert!(r.header("transfer-encoding").is_none(), "{}", r.head_str());
    assert!(r.says_close(), "{}", r.head_str());
}

#[test]
fn close_delimited_response_to_http10_client_is_passed_and_closed() {
    let be = Backend::with_handler("be", |_| Reply::close_delimited(200, "until the end"));
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.request(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n");
    assert_ok_body(&r, b"until the end");
    assert_eq!(r.framing, Framing::Close, "{}", r.head_str());
    assert!(r.says_close(), "{}", r.head_str());
}

// --- pipelining ---

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let be = Backend::with_handler("be", echo);
    let p = single(&be.spec());
    let mut c = p.client();
    let mut raw = get_request("h", "/one");
    raw.extend_from_slice(&request_bytes("POST", "h", "/two", &[], b"body-two"));
    raw.extend_from_slice(
        b"POST /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nthr\r\n2\r\nee\r\n0\r\n\r\n",
    );
    raw.extend_from_slice(&get_request("h", "/four"));
    c.send(&raw);
    for want in ["/one ", "/two body-two", "/three three", "/four "] {
        assert_ok_body(&c.read_response(), want.as_bytes());
    }
    assert_eq!(be.requests(), 4);
    assert!(!c.closed_by_peer(Duration::from_millis(50)), "pipelining client was disconnected");
}

#[test]
fn pipelined_requests_with_a_local_answer_between_them_stay_in_order() {
    let be = Backend::with_handler("be", echo);
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(Some("h"), "/", "app").start();
    let mut c = p.client();
    let mut raw = get_request("h", "/one");
    raw.extend_from_slice(&get_request("unknown.example", "/two"));
    raw.extend_from_slice(&get_request("h", "/three"));
    c.send(&raw);
    assert_ok_body(&c.read_response(), b"/one ");
    assert_error_response(&c.read_response(), 404);
    assert_ok_body(&c.read_response(), b"/three ");
}

#[test]
fn pipelined_request_after_connection_close_is_not_answered() {
    let be = Backend::with_handler("be", echo);
    let p = single(&be.spec());
    let mut c = p.client();
    let mut raw = get_request("h", "/one");
    raw.extend_from_slice(&request_bytes("GET", "h", "/two", &[("Connection", "close")], b""));
    raw.extend_from_slice(&get_request("h", "/three"));
    c.send(&raw);
    assert_ok_body(&c.read_response(), b"/one ");
    let r = c.read_response();
    assert_ok_body(&r, b"/two ");
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after Connection: close");
    assert_eq!(be.requests(), 2, "the request after Connection: close reached the backend");
}

// --- Expect: 100-continue ---

#[test]
fn expect_100_continue_is_answered_by_pitcher_before_the_body() {
    let be = Backend::with_handler("be", echo);
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    // The client sends nothing more until it has the 100.
    let got = read_until(&mut c, b"\r\n\r\n");
    assert_eq!(String::from_utf8_lossy(&got), "HTTP/1.1 100 Continue\r\n\r\n");
    c.send(b"hello");
    let r = c.read_response();
    assert_ok_body(&r, b"/up hello");
    assert!(!r.says_close(), "{}", r.head_str());
    // Pitcher answered the expectation itself; the backend does not see it
    // (unless `forward_expect = true`, see http_features_expect.rs).
    assert_eq!(be.last_request().unwrap().header("expect"), None);
    // The connection is in sync for the next request.
    assert_ok_body(&c.get("h", "/next"), b"/next ");
}

#[test]
fn expect_100_continue_answered_at_once_with_a_final_status_closes_the_connection() {
    // The backend refuses without 100 and without reading the body (the
    // client has Pitcher's own 100 by then: it was ready for the body).
    let be = ScriptedBackend::start(|mut s, _| {
        if read_head_exact(&mut s).ok().flatten().is_some() {
            let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nnot you");
            let _ = s.read(&mut [0u8; 64]);
        }
    });
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 401, "{}", r.head_str());
    assert_eq!(r.interim, vec![100], "Pitcher's 100 only, once");
    assert_eq!(r.body, b"not yo");
    // The body was never sent: the client is told the connection closes,
    // so it does not have to send it, and it does close.
    assert!(r.says_close(), "final response before the body without Connection: close:\n{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open");
}

// --- Upgrade ---

const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A backend that switches to a tunnel on an Upgrade request, sends
/// `server-first`, then answers each read with its bytes upper-cased, and
/// on EOF writes `bye` and closes. `eof` is set when it saw the client's FIN.
fn upgrading_backend(eof: Arc<AtomicBool>) -> ScriptedBackend {
    ScriptedBackend::start(move |mut s, _| {
        let Ok(Some(head)) = read_head_exact(&mut s) else { return };
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !(head.contains("\r\nupgrade: websocket\r\n") && head.contains("\r\nconnection: upgrade\r\n")) {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            return;
        }
        if s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nserver-first",
        )
        .is_err()
        {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    eof.store(true, Ordering::SeqCst);
                    let _ = s.write_all(b"bye");
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
}

#[test]
fn upgrade_to_websocket_becomes_a_bidirectional_tunnel() {
    let be = upgrading_backend(Arc::new(AtomicBool::new(false)));
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(UPGRADE);
    let r = c.read_head();
    assert_eq!(r.status, 101, "{}", r.head_str());
    assert_eq!(r.header("upgrade"), Some("websocket"), "{}", r.head_str());
    assert!(r.headers.tokens("connection").contains(&"upgrade".to_string()), "{}", r.head_str());
    read_until(&mut c, b"server-first");
    for msg in ["ping", "a longer message", "\x00\x01binary\u{ff}"] {
        c.send(msg.as_bytes());
        read_until(&mut c, msg.to_ascii_uppercase().as_bytes());
    }
}

#[test]
fn tunnel_passes_the_clients_half_close_on_and_delivers_the_rest() {
    let eof = Arc::new(AtomicBool::new(false));
    let be = upgrading_backend(eof.clone());
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(UPGRADE);
    assert_eq!(c.read_head().status, 101);
    read_until(&mut c, b"server-first");
    c.send(b"last words");
    c.stream().shutdown(Shutdown::Write).unwrap();
    // The backend answers, sees the FIN, says bye and closes; all of it
    // reaches the client before the end of the stream.
    let rest = c.read_to_eof().expect("read the rest of the tunnel");
    assert!(rest.ends_with(b"bye"), "after half-close the client got {:?}", String::from_utf8_lossy(&rest));
    assert!(eof.load(Ordering::SeqCst), "the backend never saw the client's FIN");
}

#[test]
fn tunnel_is_closed_after_its_idle_timeout() {
    let eof = Arc::new(AtomicBool::new(false));
    let be = upgrading_backend(eof.clone());
    let p = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[timeouts]\ntunnel_idle_ms = 300")
        .start();
    let mut c = p.client();
    c.send(UPGRADE);
    assert_eq!(c.read_head().status, 101);
    read_until(&mut c, b"server-first");
    c.send(b"x");
    read_until(&mut c, b"X");
    let t0 = Instant::now();
    let mut tail = Vec::new();
    let closed = c.stream().set_read_timeout(Some(IO_TIMEOUT)).is_ok() && {
        let mut s: &TcpStream = c.stream();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(n) => tail.extend_from_slice(&buf[..n]),
            }
        }
    };
    assert!(closed);
    let idle = t0.elapsed();
    assert!(idle >= Duration::from_millis(250), "tunnel closed after only {idle:?}");
    assert!(idle < Duration::from_secs(5), "tunnel idle for {idle:?} before it was closed");
    assert!(wait_until(Duration::from_secs(5), || eof.load(Ordering::SeqCst)), "backend side of the tunnel left open");
}

#[test]
fn upgrade_declined_by_the_backend_stays_http() {
    let be = Backend::with_handler("be", |req| Reply::ok(format!("plain {}", req.target)));
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.request(UPGRADE);
    assert_ok_body(&r, b"plain /ws");
    assert!(r.header("upgrade").is_none(), "{}", r.head_str());
    assert_ok_body(&c.get("h", "/next"), b"plain /next");
}

#[test]
fn switching_protocols_to_a_request_without_upgrade_is_502() {
    let be = Backend::with_handler("be", |_| Reply::raw("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"));
    let p = single(&be.spec());
    assert_error_response(&p.client().get("h", "/"), 502);
}

// --- trailers, Connection: close from the backend, close-delimited ---

#[test]
fn chunked_response_trailers_reach_the_client() {
    let be = Backend::with_handler("be", |_| {
        Reply::chunked(200, vec![b"part one, ".to_vec(), b"part two".to_vec()])
            .with_trailer("X-Checksum", "abc123")
            .with_trailer("Server-Timing", "db;dur=53")
    });
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.get("h", "/");
    assert_ok_body(&r, b"part one, part two");
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.trailers.get("x-checksum"), Some("abc123"), "trailers: {:?}", r.trailers);
    assert_eq!(r.trailers.get("server-timing"), Some("db;dur=53"));
    assert_ok_body(&c.get("h", "/"), b"part one, part two");
}

#[test]
fn connection_close_from_the_backend_closes_only_the_upstream_connection() {
    let be = Backend::with_handler("be", |req| Reply::ok(format!("closing after {}", req.target)).close());
    let p = single(&be.spec());
    let mut c = p.client();
    for i in 0..3 {
        let r = c.get("h", &format!("/{i}"));
        assert_ok_body(&r, format!("closing after /{i}").as_bytes());
        assert!(!r.says_close(), "the backend's Connection: close reached the client:\n{}", r.head_str());
    }
    // Never reused after it said close: one connection per request.
    assert_eq!(be.connections(), 3);
}

#[test]
fn close_delimited_response_is_reframed_as_chunked_for_a_keepalive_client() {
    let be = Backend::with_handler("be", |req| Reply::close_delimited(200, format!("until close {}", req.target)));
    let p = single(&be.spec());
    let mut c = p.client();
    for i in 0..3 {
        let r = c.get("h", &format!("/{i}"));
        assert_ok_body(&r, format!("until close /{i}").as_bytes());
        assert_eq!(r.framing, Framing::Chunked, "{}", r.head_str());
        assert!(!r.says_close(), "{}", r.head_str());
    }
    assert_eq!(be.connections(), 3);
}

#[test]
fn upgrade_in_an_http10_request_is_not_forwarded() {
    // RFC 9110 section 7.8: a server ignores Upgrade in an HTTP/1.0 request.
    let be = Backend::start("be");
    let p = single(&be.spec());
    let r = p.client().request(b"GET /ws HTTP/1.0\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert!(!got.headers.has("upgrade"), "{}", got.head_str());
    assert!(!got.headers.tokens("connection").contains(&"upgrade".to_string()), "{}", got.head_str());
}

#[test]
fn upgrade_to_a_protocol_not_allowed_is_served_as_plain_http() {
    // h2c (and anything not in upgrade_protocols, default ["websocket"])
    // would take the connection out of per-request routing: it is dropped.
    let be = Backend::start("be");
    let p = single(&be.spec());
    let mut c = p.client();
    let r = c.request(b"GET /h2 HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert!(!got.headers.has("upgrade"), "{}", got.head_str());
    assert!(!got.headers.has("http2-settings"), "{}", got.head_str());
    // The connection is still plain HTTP/1.1 keep-alive.
    let r = c.request(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
}

#[test]
fn chunked_request_body_of_tiny_chunks_arrives_intact() {
    // Thousands of 1- to 7-byte chunks, with extensions, in pieces that cut
    // through size lines and data: re-framed by Pitcher, the data intact.
    let be = Backend::with_handler("be", |req| Reply::ok(format!("got {} bytes", req.body.len())));
    let p = single(&be.spec());
    let body = pseudo_random_bytes(20_000, 7);
    let mut raw = b"POST /tiny HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let (mut at, mut i) = (0, 0usize);
    while at < body.len() {
        let n = (1 + i % 7).min(body.len() - at);
        raw.extend_from_slice(format!("{n:x};i={i}\r\n").as_bytes());
        raw.extend_from_slice(&body[at..at + n]);
        raw.extend_from_slice(b"\r\n");
        at += n;
        i += 1;
    }
    raw.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    let mut c = p.client();
    for piece in raw.chunks(4093) {
        c.send(piece);
    }
    assert_ok_body(&c.read_response(), b"got 20000 bytes");
    let got = be.last_request().unwrap();
    assert!(got.body == body, "body corrupted (first bytes {:?})", preview(&got.body));
    assert_ok_body(&c.get("h", "/after"), b"got 0 bytes");
}
