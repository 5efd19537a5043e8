//! Upstream failure at any point: a pooled connection the backend closed is
//! replaced without the client noticing (when replaying is safe), a backend
//! that dies in the middle of a response makes Pitcher close the client
//! connection without completing the body or answering anything after it,
//! and each failure is logged once with the request and the backend.

mod common;

use std::io::Write;
use std::thread;
use std::time::Duration;

use common::*;

fn single(spec: &str) -> Pitcher {
    ConfigBuilder::new().cluster("app", [spec]).route(None, "/", "app").start()
}

/// Lines of Pitcher's log that contain every one of `words`.
fn log_lines(p: &Pitcher, words: &[&str]) -> Vec<String> {
    p.log().lines().filter(|l| words.iter().all(|w| l.contains(w))).map(str::to_string).collect()
}

#[test]
fn pooled_connection_closed_by_the_backend_while_idle_is_replaced_transparently() {
    // The backend closes every connection after its response without
    // announcing it with Connection: close.
    let be = Backend::with_handler("be", |_| Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
    let p = single(&be.spec());
    let mut c = p.client();
    for i in 1..=4 {
        assert_ok_body(&c.get("h", &format!("/{i}")), b"ok");
        assert!(wait_until(Duration::from_secs(5), || be.open_connections() == 0), "backend kept its connection");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(be.connections(), 4);
    assert_eq!(be.requests(), 4, "a request was sent twice");
    assert!(log_lines(&p, &["ERRO"]).is_empty(), "errors logged:\n{}", p.log());
}

/// The first request of the backend's first connection is answered; every
/// later request on that connection is read and the connection closed
/// without an answer: a pooled connection the backend closed just as the
/// request reached it.
fn closes_its_first_connection_after_one_answer(req: &RecordedRequest) -> Reply {
    if req.conn == 1 && req.seq > 1 {
        Reply::Reset
    } else {
        Reply::ok(format!("{} {} on connection {}", req.method, req.target, req.conn))
    }
}

#[test]
fn pooled_connection_closed_as_a_get_reaches_it_is_retried_on_a_fresh_connection() {
    let be = Backend::with_handler("be", closes_its_first_connection_after_one_answer);
    let p = single(&be.spec());
    let mut c = p.client();
    assert_ok_body(&c.get("h", "/first"), b"GET /first on connection 1");
    let r = c.get("h", "/second");
    assert_ok_body(&r, b"GET /second on connection 2");
    assert_eq!(be.connections(), 2);
    assert_eq!(be.requests(), 3, "the GET was not sent again exactly once");
}

#[test]
fn pooled_connection_closed_as_a_post_reaches_it_is_not_replayed() {
    // A POST may have been acted on: it is not sent twice (RFC 9110
    // section 9.2.2); the client gets 502 and may decide itself.
    let be = Backend::with_handler("be", closes_its_first_connection_after_one_answer);
    let p = single(&be.spec());
    let mut c = p.client();
    assert_ok_body(&c.get("h", "/first"), b"GET /first on connection 1");
    let r = c.request(&request_bytes("POST", "h", "/order", &[], b"one pizza"));
    assert_error_response(&r, 502);
    assert_eq!(be.requests(), 2, "the POST was sent again");
    assert_eq!(be.connections(), 1);
    // The client connection is still good.
    assert_ok_body(&c.get("h", "/third"), b"GET /third on connection 2");
}

#[test]
fn pooled_connection_closed_as_a_bodiless_post_reaches_it_is_not_replayed() {
    // No body byte went out, but the head did: the backend may have acted
    // on it.
    let be = Backend::with_handler("be", closes_its_first_connection_after_one_answer);
    let p = single(&be.spec());
    let mut c = p.client();
    assert_ok_body(&c.get("h", "/first"), b"GET /first on connection 1");
    let r = c.request(b"POST /ring-the-bell HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
    assert_error_response(&r, 502);
    assert_eq!(be.requests(), 2, "the POST was sent again");
}

/// Sends `/cut` and `/next` pipelined in one write; returns everything the
/// client receives until Pitcher closes the connection.
fn pipelined_cut(p: &Pitcher) -> (Response, Vec<u8>) {
    let mut c = p.client();
    let mut raw = get_request("h", "/cut");
    raw.extend_from_slice(&get_request("h", "/next"));
    c.send(&raw);
    let head = c.read_head();
    let rest = c.read_to_eof().expect("read until Pitcher closes");
    (head, rest)
}

#[test]
fn backend_dying_mid_content_length_body_closes_the_client_without_another_response() {
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/cut" {
            Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        } else {
            Reply::ok("next")
        }
    });
    let p = single(&be.spec());
    let (head, rest) = pipelined_cut(&p);
    assert_eq!(head.status, 200, "{}", head.head_str());
    assert_eq!(String::from_utf8_lossy(&rest), "partial", "bytes after the truncated body");
    assert_eq!(be.requests(), 1, "the pipelined request was sent after a truncated response");
}

#[test]
fn backend_dying_mid_chunked_body_closes_the_client_without_the_last_chunk() {
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/cut" {
            Reply::raw_then_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        } else {
            Reply::ok("next")
        }
    });
    let p = single(&be.spec());
    let (head, rest) = pipelined_cut(&p);
    assert_eq!(head.status, 200, "{}", head.head_str());
    assert_eq!(String::from_utf8_lossy(&rest), "5\r\nhello\r\n", "bytes after the truncated body");
    assert_eq!(be.requests(), 1);
}

#[test]
fn reset_during_a_close_delimited_response_is_not_completed() {
    // A close-delimited body ends with a FIN, never with a reset: the
    // re-framed body must not be given its last chunk.
    let be = ScriptedBackend::start(|mut s, _| {
        if read_head_exact(&mut s).ok().flatten().is_none() {
            return;
        }
        // The request body stays unread, so closing sends RST.
        let _ = s.peek(&mut [0u8; 1]);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\npartial body");
        thread::sleep(Duration::from_millis(100));
    });
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(&request_bytes("GET", "h", "/reset", &[], b"hello"));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head_str());
    // Pitcher closes the connection, and what came before the close is not
    // a complete body in any framing.
    let rest = c.read_to_eof().expect("the client connection was not closed");
    assert!(!rest.ends_with(b"0\r\n\r\n"), "reset body completed: {:?}", String::from_utf8_lossy(&rest));
    assert_ne!(head.framing, Framing::Length(rest.len() as u64), "reset body delivered as complete");
    assert_ne!(head.framing, Framing::Close, "a close-delimited body can not show the reset:\n{}", head.head_str());
}

#[test]
fn truncated_response_is_logged_once_with_the_request_and_the_backend() {
    let be =
        Backend::with_handler("be", |_| Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"));
    let p = single(&be.spec());
    let mut c = p.client();
    c.send(&get_request("h", "/logged-cut"));
    let _ = c.read_head();
    let _ = c.read_to_eof();
    let addr = be.spec();
    let words = ["/logged-cut", addr.as_str()];
    assert!(wait_until(Duration::from_secs(5), || !log_lines(&p, &words).is_empty()), "not logged:\n{}", p.log());
    thread::sleep(Duration::from_millis(200));
    let lines = log_lines(&p, &words);
    assert_eq!(lines.len(), 1, "logged {} times:\n{}", lines.len(), lines.join("\n"));
    assert!(lines[0].contains("GET"), "no method in {:?}", lines[0]);
}

#[test]
fn refused_backend_connection_is_logged_once_with_the_request_and_the_backend() {
    let dead = dead_addr();
    let p = single(&dead.to_string());
    assert_error_response(&p.client().get("h", "/logged-refused"), 502);
    let addr = dead.to_string();
    let words = ["/logged-refused", addr.as_str()];
    assert!(wait_until(Duration::from_secs(5), || !log_lines(&p, &words).is_empty()), "not logged:\n{}", p.log());
    thread::sleep(Duration::from_millis(200));
    let lines = log_lines(&p, &words);
    assert_eq!(lines.len(), 1, "logged {} times:\n{}", lines.len(), lines.join("\n"));
}
