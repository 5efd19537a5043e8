//! Size limits answered with the right status and nothing sent upstream:
//! 414 for a request line that does not fit, 431 for too large or too many
//! header fields, 413 for a body over the maximum (before reading it when
//! Content-Length says so, mid-stream for chunked bodies), 400 for a
//! missing Host; absolute-form targets accepted and normalised.

mod common;

use std::time::Duration;

use common::*;

const LIMITS: &str = "[limits]\nmax_header_bytes = 1024\nmax_headers = 10\nmax_body_bytes = 1000";

fn proxy() -> (Backend, Pitcher) {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").section(LIMITS).start();
    (be, p)
}

/// Reads Pitcher's answer on `c`, asserts it is `status` with
/// `Connection: close`, that the connection then closes, and that the
/// backend saw nothing.
fn assert_refused_on(c: &mut Client, be: &Backend, status: u16) {
    let r = c.read_response();
    assert_error_response(&r, status);
    assert!(r.says_close(), "refusal without Connection: close:\n{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after {status}");
    assert_eq!(be.connections(), 0, "the backend was connected to");
    assert_eq!(be.requests(), 0);
}

fn long_target(len: usize) -> String {
    format!("/{}", "a".repeat(len))
}

#[test]
fn request_line_longer_than_max_header_bytes_is_414() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(format!("GET {} HTTP/1.1\r\nHost: h\r\n\r\n", long_target(2000)).as_bytes());
    assert_refused_on(&mut c, &be, 414);
}

#[test]
fn unfinished_request_line_reaching_max_header_bytes_is_414() {
    // The line never ends: Pitcher must not wait for it.
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(format!("GET {}", long_target(1500)).as_bytes());
    assert_refused_on(&mut c, &be, 414);
}

#[test]
fn header_fields_larger_than_max_header_bytes_are_431() {
    let (be, p) = proxy();
    let mut c = p.client();
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..5 {
        raw.push_str(&format!("X-Big-{i}: {}\r\n", "v".repeat(300)));
    }
    raw.push_str("\r\n");
    c.send(raw.as_bytes());
    assert_refused_on(&mut c, &be, 431);
}

#[test]
fn one_header_field_larger_than_max_header_bytes_is_431() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(format!("GET / HTTP/1.1\r\nHost: h\r\nCookie: {}\r\n\r\n", "c".repeat(2000)).as_bytes());
    assert_refused_on(&mut c, &be, 431);
}

#[test]
fn unfinished_header_section_reaching_max_header_bytes_is_431() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(format!("GET / HTTP/1.1\r\nHost: h\r\nX-Endless: {}", "v".repeat(1500)).as_bytes());
    assert_refused_on(&mut c, &be, 431);
}

#[test]
fn more_header_fields_than_max_headers_is_431() {
    let (be, p) = proxy();
    let mut c = p.client();
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..10 {
        raw.push_str(&format!("X-{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    c.send(raw.as_bytes());
    assert_refused_on(&mut c, &be, 431);
}

#[test]
fn head_at_the_limits_is_served() {
    let (be, p) = proxy();
    let mut c = p.client();
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..8 {
        raw.push_str(&format!("X-{i}: v\r\n"));
    }
    raw.push_str(&format!("X-Pad: {}\r\n\r\n", "p".repeat(1024 - raw.len() - "X-Pad: \r\n\r\n".len())));
    assert_eq!(raw.len(), 1024);
    let r = c.request(raw.as_bytes());
    assert_ok_body(&r, b"ok from be");
    assert_eq!(be.requests(), 1);
}

#[test]
fn content_length_over_max_body_bytes_is_413_before_the_body_is_sent() {
    let (be, p) = proxy();
    let mut c = p.client();
    // The client waits for an answer before sending any of the body.
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read_response();
    assert!(r.interim.is_empty(), "got interim responses {:?} before the 413", r.interim);
    assert_error_response(&r, 413);
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after 413");
    assert_eq!(be.connections(), 0);
}

#[test]
fn content_length_over_max_body_bytes_with_the_body_sent_is_413() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(&request_bytes("POST", "h", "/upload", &[], &vec![b'x'; 1001]));
    assert_refused_on(&mut c, &be, 413);
}

#[test]
fn chunked_body_over_max_body_bytes_in_one_write_is_413() {
    let (be, p) = proxy();
    let mut c = p.client();
    let mut raw = b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("190\r\n{}\r\n", "x".repeat(400)).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    c.send(&raw);
    assert_refused_on(&mut c, &be, 413);
}

#[test]
fn chunked_body_crossing_max_body_bytes_mid_stream_is_413() {
    // The head and 800 bytes are forwarded before the body crosses the
    // limit; the upstream connection is then aborted, so the backend never
    // receives a complete request.
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(format!("320\r\n{}\r\n", "x".repeat(800)).as_bytes());
    assert!(wait_until(Duration::from_secs(5), || be.connections() == 1), "head never reached the backend");
    c.send(format!("320\r\n{}\r\n0\r\n\r\n", "y".repeat(800)).as_bytes());
    let r = c.read_response();
    assert_error_response(&r, 413);
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after 413");
    assert!(wait_until(Duration::from_secs(5), || be.open_connections() == 0), "upstream connection not aborted");
    assert_eq!(be.requests(), 0, "the backend received a complete request");
}

#[test]
fn chunked_body_at_max_body_bytes_is_served() {
    let be = Backend::with_handler("be", |req| Reply::ok(format!("got {} bytes", req.body.len())));
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").section(LIMITS).start();
    let raw = format!(
        "POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1f4\r\n{}\r\n1f4\r\n{}\r\n0\r\n\r\n",
        "x".repeat(500),
        "y".repeat(500)
    );
    assert_ok_body(&p.client().request(raw.as_bytes()), b"got 1000 bytes");
}

#[test]
fn missing_host_on_http11_is_400() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n");
    assert_refused_on(&mut c, &be, 400);
}

#[test]
fn absolute_form_target_is_normalised_to_origin_form_and_its_host() {
    // The target's authority decides the route and replaces the Host field
    // (RFC 9112 section 3.2.2); the backend sees origin form.
    let app = Backend::start("app");
    let other = Backend::start("other");
    let p = ConfigBuilder::new()
        .cluster("app", [app.spec()])
        .cluster("other", [other.spec()])
        .route(Some("app.example"), "/", "app")
        .route(None, "/", "other")
        .start();
    let mut c = p.client();
    let r = c.request(b"GET http://App.Example:8080/a/b?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n");
    assert_ok_body(&r, b"ok from app");
    let got = app.last_request().expect("app saw the request");
    assert_eq!(got.target, "/a/b?x=1");
    assert_eq!(got.headers.get_all("host"), vec!["App.Example:8080"], "{}", got.head_str());
    // Without a path: "/" is the origin form.
    let r = c.request(b"GET HTTP://app.example?q HTTP/1.1\r\nHost: app.example\r\n\r\n");
    assert_ok_body(&r, b"ok from app");
    assert_eq!(app.last_request().unwrap().target, "/?q");
    assert_eq!(other.requests(), 0);
}

#[test]
fn absolute_form_target_without_host_field_is_accepted() {
    let (be, p) = proxy();
    let r = p.client().request(b"GET http://a.example/x HTTP/1.1\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert_eq!(got.target, "/x");
    assert_eq!(got.header("host"), Some("a.example"));
}

#[test]
fn absolute_form_target_with_userinfo_is_400() {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(b"GET http://user@a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n");
    assert_refused_on(&mut c, &be, 400);
}
