//! When backends fail or clients are slow: 502 for refused, closed and reset
//! upstream connections, 504 for a silent backend, retry of a failed
//! connect on the next backend, and bounded memory with backpressure for a
//! client that reads slowly.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn single(spec: &str, extra: &str) -> Pitcher {
    ConfigBuilder::new().cluster("app", [spec]).route(None, "/", "app").section(extra).start()
}

#[test]
fn refused_backend_connection_gives_502() {
    let dead = dead_addr();
    let p = single(&dead.to_string(), "");

    let mut c = p.client();
    let r = c.get("h", "/");
    assert_error_response(&r, 502);
    // Pitcher itself is fine: a second client gets the same answer.
    assert_error_response(&get_once(p.addr(), "h", "/"), 502);
}

#[test]
fn backend_closing_before_answering_gives_502() {
    let be = Backend::with_handler("be", |_| Reply::raw_then_close(""));
    let p = single(&be.spec(), "");

    let r = p.client().get("h", "/");
    assert_error_response(&r, 502);
    assert!(be.requests() >= 1, "the backend never got the request");
}

#[test]
fn backend_resetting_before_answering_gives_502() {
    let be = Backend::resetting("be");
    let p = single(&be.spec(), "");

    let r = p.client().get("h", "/");
    assert_error_response(&r, 502);
    assert!(be.connections() >= 1, "Pitcher never connected to the backend");
}

#[test]
fn backend_sending_a_partial_head_then_closing_gives_502() {
    let be = Backend::with_handler("be", |_| Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Le"));
    let p = single(&be.spec(), "");

    let r = p.client().get("h", "/");
    assert_error_response(&r, 502);
}

#[test]
fn silent_backend_gives_504_after_upstream_read_timeout() {
    let be = Backend::with_handler("be", |_| Reply::Hang);
    let p = single(&be.spec(), "[timeouts]\nupstream_read_ms = 500");

    let mut c = p.client();
    let started = Instant::now();
    let r = c.get("h", "/");
    let took = started.elapsed();
    assert_error_response(&r, 504);
    assert!(took < Duration::from_secs(5), "504 took {took:?} with upstream_read_ms = 500");
    assert_eq!(be.requests(), 1);
}

#[test]
fn connect_failure_is_retried_on_the_next_backend() {
    let dead = dead_addr();
    let live = Backend::start("live");
    let p = ConfigBuilder::new()
        .cluster_with("app", [dead.to_string(), live.spec()], "retries = 1")
        .route(None, "/", "app")
        .start();

    let mut c = p.client();
    for i in 0..10 {
        let r = c.get("h", &format!("/ka/{i}"));
        assert_ok_body(&r, b"ok from live");
    }
    for i in 0..10 {
        let r = get_once(p.addr(), "h", &format!("/fresh/{i}"));
        assert_ok_body(&r, b"ok from live");
    }
    assert_eq!(live.requests(), 20);
}

#[test]
fn slow_reader_keeps_memory_bounded_and_applies_backpressure() {
    const GIB: u64 = 1 << 30;
    const MAX_RSS_GROWTH_KIB: u64 = 16 * 1024;
    const MAX_WRITTEN: u64 = 128 << 20;
    let be =
        Backend::with_handler("be", |req| if req.path() == "/big" { Reply::stream(GIB) } else { Reply::ok("warm") });
    let p = single(&be.spec(), "");

    // Let Pitcher allocate whatever a first request needs.
    let mut warm = p.client();
    for _ in 0..5 {
        assert_ok_body(&warm.get("h", "/warm"), b"warm");
    }
    drop(warm);
    let rss_before = p.rss_kib();

    let mut c = p.client();
    c.send(&get_request("h", "/big"));
    let r = c.read_head();
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.header("content-length"), Some(GIB.to_string().as_str()), "{}", r.head_str());

    let mut offset: u64 = 0;
    let started = Instant::now();
    let mut last_check = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let got = c.read_some(16 * 1024).expect("read the streamed body");
        assert!(!got.is_empty(), "body ended after {offset} bytes");
        assert!(got == pattern_bytes(offset, got.len()), "body corrupted at offset {offset}");
        offset += got.len() as u64;
        thread::sleep(Duration::from_millis(5));
        // Stop early (and fail below) rather than let a proxy that buffers
        // everything take a whole GiB of memory.
        if last_check.elapsed() > Duration::from_millis(50) {
            last_check = Instant::now();
            let grew = p.rss_kib().saturating_sub(rss_before);
            if grew >= MAX_RSS_GROWTH_KIB || be.bytes_written() >= MAX_WRITTEN {
                break;
            }
        }
    }
    let rss_after = p.rss_kib();
    let written = be.bytes_written();

    let grew_kib = rss_after.saturating_sub(rss_before);
    eprintln!("slow reader: read {offset} B, backend wrote {written} B, RSS {rss_before} -> {rss_after} KiB");
    assert!(
        grew_kib < MAX_RSS_GROWTH_KIB,
        "Pitcher's RSS grew by {grew_kib} KiB ({rss_before} -> {rss_after}) while a client read {offset} bytes slowly"
    );
    assert!(
        written < MAX_WRITTEN,
        "no backpressure: the backend wrote {written} bytes while the client read only {offset}"
    );
    assert!(offset > 0 && written >= offset);

    // Dropping the slow client leaves Pitcher serving.
    drop(c);
    assert_ok_body(&get_once(p.addr(), "h", "/warm"), b"warm");
}

#[test]
fn late_response_after_504_is_not_given_to_the_next_request() {
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/slow" {
            Reply::ok("late answer to /slow").delayed(Duration::from_millis(1000))
        } else {
            Reply::ok(format!("answer to {}", req.path()))
        }
    });
    let p = single(&be.spec(), "[timeouts]\nupstream_read_ms = 300");

    let mut c = p.client();
    assert_error_response(&c.get("h", "/slow"), 504);
    // Let the late answer reach whatever upstream connection carried /slow.
    thread::sleep(Duration::from_millis(1200));
    let r = if c.closed_by_peer(Duration::from_millis(10)) {
        get_once(p.addr(), "h", "/fast")
    } else {
        c.get("h", "/fast")
    };
    assert_ok_body(&r, b"answer to /fast");
}

#[test]
fn truncated_content_length_response_closes_the_client_connection() {
    let be = Backend::with_handler("be", |_| {
        Reply::raw_then_close("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten b")
    });
    let p = single(&be.spec(), "");

    let mut c = p.client();
    c.send(&get_request("h", "/"));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head_str());
    // Whatever the framing, the client must not see a complete response.
    let res = c.try_read_response_body(&head);
    assert!(res.is_err(), "a truncated body was delivered as complete: {:?}", res.map(|b| preview(&b)));
}

#[test]
fn truncated_chunked_response_is_not_completed() {
    let be = Backend::with_handler("be", |_| {
        Reply::raw_then_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    });
    let p = single(&be.spec(), "");

    let mut c = p.client();
    c.send(&get_request("h", "/"));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head_str());
    let res = c.try_read_response_body(&head);
    assert!(res.is_err(), "a truncated chunked body was completed: {:?}", res.map(|b| preview(&b)));
}
