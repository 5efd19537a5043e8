//! `Expect: 100-continue`: Pitcher sends `100 Continue` itself once it is
//! ready for the body (route chosen, modules passed, backend picked),
//! whether or not the backend ever sends one; the backend sees `Expect`
//! only with `forward_expect = true`, and its own 100 is then not relayed a
//! second time; a request refused before gets its final status without 100.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// A backend that reads a head and its Content-Length body, optionally
/// sends its own `100 Continue` first, and answers with what it saw.
fn echo_backend(send_continue: bool) -> ScriptedBackend {
    ScriptedBackend::start(move |mut s: TcpStream, _| {
        while let Ok(Some(head)) = read_head_exact(&mut s) {
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let expect = text.contains("\r\nexpect:");
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if send_continue && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                return;
            }
            let mut body = vec![0u8; length];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            let answer = format!("expect={expect};body={}", String::from_utf8_lossy(&body));
            let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
            if s.write_all(r.as_bytes()).is_err() {
                return;
            }
        }
    })
}

fn head_with_expect(path: &str, length: usize) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: example.com\r\nExpect: 100-continue\r\nContent-Length: {length}\r\n\r\n")
        .into_bytes()
}

/// Reads one head from a raw connection: its status and the whole text.
fn read_status(s: &mut TcpStream) -> (u16, String) {
    let head = read_head_exact(s).expect("read head").expect("connection closed before a head");
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (status, text)
}

/// Reads the body of a head with a Content-Length.
fn read_body(s: &mut TcpStream, head: &str) -> String {
    let n: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("read body");
    String::from_utf8_lossy(&b).into_owned()
}

fn connect(p: &Pitcher) -> TcpStream {
    let s = TcpStream::connect(p.addr()).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

/// A client that waits for `100 Continue` before its body; returns the
/// final response's body. Twice on one connection.
fn upload_after_continue(p: &Pitcher, body: &str) -> Vec<String> {
    let mut s = connect(p);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        s.write_all(&head_with_expect("/upload", body.len())).expect("send head");
        let (status, _) = read_status(&mut s);
        assert_eq!(status, 100, "Pitcher did not send 100 Continue before the body");
        s.write_all(body.as_bytes()).expect("send body");
        let (status, head) = read_status(&mut s);
        assert_eq!(status, 200, "a second 100 or another status after the body:\n{head}");
        bodies.push(read_body(&mut s, &head));
    }
    bodies
}

#[test]
fn pitcher_sends_100_continue_when_the_backend_never_does_and_does_not_forward_expect() {
    let b = echo_backend(false);
    let p = ConfigBuilder::new().cluster_with("app", [b.spec()], "keepalive = 8").route(None, "/", "app").start();
    for _ in 0..2 {
        assert_eq!(upload_after_continue(&p, "hello"), vec!["expect=false;body=hello"; 2]);
    }
}

#[test]
fn with_forward_expect_the_backend_sees_expect_and_its_100_is_not_relayed_twice() {
    let b = echo_backend(true);
    let p = ConfigBuilder::new()
        .top("forward_expect = true")
        .cluster_with("app", [b.spec()], "keepalive = 8")
        .route(None, "/", "app")
        .start();
    for _ in 0..2 {
        assert_eq!(upload_after_continue(&p, "hello"), vec!["expect=true;body=hello"; 2]);
    }
}

#[test]
fn requests_refused_before_the_body_get_their_status_without_100() {
    let b = echo_backend(false);
    let p = ConfigBuilder::new()
        .cluster_with("app", [b.spec()], "keepalive = 8")
        .route(None, "/app", "app")
        .section("[limits]\nmax_body_bytes = 1000")
        .start();
    // No route: 404.
    let mut s = connect(&p);
    s.write_all(&head_with_expect("/elsewhere", 5)).expect("send head");
    let (status, head) = read_status(&mut s);
    assert_eq!(status, 404, "{head}");
    // Content-Length over the limit: 413.
    let mut s = connect(&p);
    s.write_all(&head_with_expect("/app", 5000)).expect("send head");
    let (status, head) = read_status(&mut s);
    assert_eq!(status, 413, "{head}");
    // And an accepted one still gets its 100.
    let mut s = connect(&p);
    s.write_all(&head_with_expect("/app", 2)).expect("send head");
    assert_eq!(read_status(&mut s).0, 100);
}

#[test]
fn a_request_shed_by_a_module_gets_503_without_100() {
    let b = echo_backend(false);
    let p = ConfigBuilder::new()
        .cluster_with("app", [b.spec()], "keepalive = 8")
        .route(None, "/", "app")
        .section("[modules.throttle]\nrate_per_sec = 1\nburst = 1")
        .start();
    // The bucket admits one request a second: among a few in a row, one is
    // refused; it must get its 503 without a 100 before it.
    for _ in 0..5 {
        let mut s = connect(&p);
        s.write_all(&head_with_expect("/", 2)).expect("send head");
        let (status, head) = read_status(&mut s);
        if status == 100 {
            s.write_all(b"ok").expect("send body");
            assert_eq!(read_status(&mut s).0, 200);
            continue;
        }
        assert_eq!(status, 503, "{head}");
        return;
    }
    panic!("no request was refused by the throttle");
}

#[test]
fn a_client_that_sends_its_body_at_once_is_served() {
    let b = echo_backend(false);
    let p = ConfigBuilder::new().cluster_with("app", [b.spec()], "keepalive = 8").route(None, "/", "app").start();
    let mut s = connect(&p);
    let mut req = head_with_expect("/", 5);
    req.extend_from_slice(b"hello");
    s.write_all(&req).expect("send");
    let (status, head) = read_status(&mut s);
    assert_eq!(status, 200, "{head}");
    assert_eq!(read_body(&mut s, &head), "expect=false;body=hello");
}
