//! Backends that misbehave on a kept-alive connection: stray responses,
//! bodies where none may be, floods of interim responses, heads with
//! conflicting framing. Each test runs one worker with upstream keepalive
//! on and two clients in turn: the second must always get its own response.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// What a scripted backend writes for one request: pieces of bytes, each
/// after a delay in milliseconds.
type Plan = Vec<(u64, Vec<u8>)>;

/// A 200 whose body is the request's path: the client can tell whose
/// response it got.
fn own_response(path: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}", path.len()).into_bytes()
}

const STRAY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY";

/// A backend that reads request heads (and Content-Length bodies) on each
/// connection and plays `plan(method, path)` for each.
fn backend(plan: impl Fn(&str, &str) -> Plan + Send + Sync + 'static) -> ScriptedBackend {
    ScriptedBackend::start(move |mut s: TcpStream, _n| loop {
        let Ok(Some(head)) = read_head_exact(&mut s) else { return };
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut words = text.split_whitespace();
        let (method, path) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
        let length = text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        for (delay, bytes) in plan(&method, &path) {
            thread::sleep(Duration::from_millis(delay));
            if s.write_all(&bytes).is_err() {
                return;
            }
        }
    })
}

fn proxy(b: &ScriptedBackend) -> Pitcher {
    ConfigBuilder::new().cluster_with("app", [b.spec()], "keepalive = 8\nretries = 0").route(None, "/", "app").start()
}

/// First client: `first` request; the test checks its response with
/// `check`. Then, once whatever the backend does late has happened, a
/// second client's GET must get its own response.
fn two_clients(b: &ScriptedBackend, p: &Pitcher, first: &[u8], check: impl Fn(&Response)) {
    let mut c1 = p.client();
    let r1 = c1.request(first);
    check(&r1);
    // Let the backend's late bytes (sent 20 ms after its response) arrive.
    thread::sleep(Duration::from_millis(150));
    let mut c2 = p.client();
    let r2 = c2.get("example.com", "/second");
    assert_ok_body(&r2, b"/second");
    // And once more on the same client connection.
    let r3 = c2.get("example.com", "/third");
    assert_ok_body(&r3, b"/third");
    assert!(b.connections() >= 1);
}

fn ok_first(r: &Response) {
    assert_ok_body(r, b"/first");
}

#[test]
fn extra_response_20ms_after_a_response_is_not_given_to_the_next_client() {
    let b = backend(|_, path| {
        let mut plan = vec![(0, own_response(path))];
        if path == "/first" {
            plan.push((20, STRAY.to_vec()));
        }
        plan
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), ok_first);
}

#[test]
fn extra_response_in_the_same_write_is_not_given_to_the_next_client() {
    let b = backend(|_, path| {
        let mut bytes = own_response(path);
        if path == "/first" {
            bytes.extend_from_slice(STRAY);
        }
        vec![(0, bytes)]
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), ok_first);
}

#[test]
fn second_response_20ms_after_a_head_response_is_not_given_to_the_next_client() {
    // The motivating bug: HEAD answered, then a full response 20 ms later.
    let b = backend(|method, path| {
        if method == "HEAD" {
            vec![(0, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()), (20, STRAY.to_vec())]
        } else {
            vec![(0, own_response(path))]
        }
    });
    let p = proxy(&b);
    two_clients(&b, &p, &request_bytes("HEAD", "example.com", "/first", &[], b""), |r| {
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert!(r.body.is_empty());
    });
}

#[test]
fn body_on_a_response_to_head_is_not_given_to_the_next_client() {
    for delay in [0, 20] {
        let b = backend(move |method, path| {
            if method == "HEAD" {
                vec![(0, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()), (delay, b"hello".to_vec())]
            } else {
                vec![(0, own_response(path))]
            }
        });
        let p = proxy(&b);
        two_clients(&b, &p, &request_bytes("HEAD", "example.com", "/first", &[], b""), |r| {
            assert_eq!(r.status, 200, "{}", r.head_str());
        });
    }
}

#[test]
fn body_on_204_and_304_is_not_given_to_the_next_client() {
    for status in ["204 No Content", "304 Not Modified"] {
        for delay in [0, 20] {
            let b = backend(move |_, path| {
                if path == "/first" {
                    let head = format!("HTTP/1.1 {status}\r\n\r\n").into_bytes();
                    vec![(0, head), (delay, STRAY.to_vec())]
                } else {
                    vec![(0, own_response(path))]
                }
            });
            let p = proxy(&b);
            let code: u16 = status[..3].parse().unwrap();
            two_clients(&b, &p, &get_request("example.com", "/first"), |r| {
                assert_eq!(r.status, code, "{}", r.head_str());
                assert!(r.body.is_empty());
            });
        }
    }
}

#[test]
fn bytes_arriving_after_the_buffer_ended_at_the_body_end_make_the_connection_unusable() {
    // The head and body in one write, the body in two, so that a read ends
    // exactly at the body's end; then more bytes later.
    let b = backend(|_, path| {
        if path == "/first" {
            vec![
                (0, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n/fi".to_vec()),
                (10, b"rst".to_vec()),
                (20, b"HTTP/1.1 200 OK\r\n".to_vec()),
                (10, b"Content-Length: 5\r\n\r\nSTRAY".to_vec()),
            ]
        } else {
            vec![(0, own_response(path))]
        }
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), ok_first);
}

#[test]
fn backend_closing_a_pooled_connection_costs_the_next_client_nothing() {
    let closed = Arc::new(AtomicUsize::new(0));
    let seen = closed.clone();
    let b = ScriptedBackend::start(move |mut s: TcpStream, n| {
        while let Ok(Some(head)) = read_head_exact(&mut s) {
            let text = String::from_utf8_lossy(&head).into_owned();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            if s.write_all(&own_response(&path)).is_err() {
                return;
            }
            if n == 1 {
                // The first connection is closed 20 ms after its response.
                thread::sleep(Duration::from_millis(20));
                let _ = s.shutdown(std::net::Shutdown::Both);
                seen.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), ok_first);
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert_eq!(b.connections(), 2, "the closed connection was replaced by one new connection");
}

#[test]
fn more_interim_responses_than_allowed_is_502_and_the_connection_is_not_reused() {
    let b = backend(|_, path| {
        if path == "/first" {
            let mut flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(17);
            flood.extend_from_slice(&own_response(path));
            vec![(0, flood)]
        } else {
            vec![(0, own_response(path))]
        }
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), |r| {
        assert_eq!(r.status, 502, "{}", r.head_str());
        assert!(r.interim.len() <= 16, "{} interim responses were forwarded", r.interim.len());
    });
    assert_eq!(b.connections(), 2, "the flooding connection was closed, not pooled");
}

#[test]
fn a_few_interim_responses_are_relayed() {
    let b = backend(|_, path| {
        let mut bytes = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".repeat(3);
        bytes.extend_from_slice(&own_response(path));
        vec![(0, bytes)]
    });
    let p = proxy(&b);
    two_clients(&b, &p, &get_request("example.com", "/first"), |r| {
        assert_ok_body(r, b"/first");
        assert_eq!(r.interim, vec![103, 103, 103]);
    });
}

#[test]
fn endless_interim_responses_to_a_client_that_does_not_read_do_not_grow_the_worker() {
    const CONTINUES: usize = 1_600_000; // 40 MB of "100 Continue" heads.
    let done = Arc::new(AtomicUsize::new(0));
    let finished = done.clone();
    let b = ScriptedBackend::start(move |mut s: TcpStream, n| {
        while let Ok(Some(head)) = read_head_exact(&mut s) {
            let text = String::from_utf8_lossy(&head).into_owned();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            if path == "/flood" {
                let chunk = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1000);
                for _ in 0..CONTINUES / 1000 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                finished.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if s.write_all(&own_response(&path)).is_err() || n == 0 {
                return;
            }
        }
    });
    let p = proxy(&b);
    assert_ok_body(&p.client().get("example.com", "/warm-up"), b"/warm-up");
    let before = p.rss_kib();
    // A client that sends its request and never reads.
    let mut silent = TcpStream::connect(p.addr()).expect("connect");
    silent.write_all(&get_request("example.com", "/flood")).expect("send");
    assert!(wait_until(Duration::from_secs(30), || done.load(Ordering::SeqCst) == 1), "the backend kept writing");
    // What the backend wrote last may still be in socket buffers: let the
    // worker take it.
    thread::sleep(Duration::from_millis(300));
    let after = p.rss_kib();
    eprintln!("worker RSS {before} KiB before the flood, {after} KiB after");
    assert!(after < before + 4096, "worker RSS grew from {before} KiB to {after} KiB");
    let mut c2 = p.client();
    assert_ok_body(&c2.get("example.com", "/second"), b"/second");
    drop(silent);
}

#[test]
fn interim_204_and_304_heads_with_conflicting_framing_are_502_and_never_forwarded() {
    for bad in [
        "HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n",
        "HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    ] {
        let b = backend(move |_, path| {
            if path == "/first" {
                let mut bytes = bad.as_bytes().to_vec();
                if bad.starts_with("HTTP/1.1 1") {
                    bytes.extend_from_slice(&own_response(path));
                }
                vec![(0, bytes)]
            } else {
                vec![(0, own_response(path))]
            }
        });
        let p = proxy(&b);
        two_clients(&b, &p, &get_request("example.com", "/first"), |r| {
            assert_error_response(r, 502);
            assert!(r.interim.is_empty(), "an invalid interim head was forwarded for {bad:?}");
        });
    }
}

#[test]
fn conflicting_framing_on_a_response_to_head_is_502() {
    let b = backend(|method, path| {
        if method == "HEAD" {
            vec![(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n".to_vec())]
        } else {
            vec![(0, own_response(path))]
        }
    });
    let p = proxy(&b);
    two_clients(&b, &p, &request_bytes("HEAD", "example.com", "/first", &[], b""), |r| {
        assert_eq!(r.status, 502, "{}", r.head_str());
    });
}
