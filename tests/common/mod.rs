//! Shared harness of the integration tests: the real `pitcher` binary
//! ([`Pitcher`], [`ConfigBuilder`]), real backends ([`Backend`], [`Reply`]),
//! a backend scripted with raw sockets ([`ScriptedBackend`]),
//! a raw HTTP/1.1 client ([`Client`]), all on loopback sockets whose ports
//! the kernel picks. Every process a test starts is stopped by its pid when
//! its handle drops; every client socket has read and write timeouts.
//!
//! Each test file compiles this module and uses part of it.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod client;
pub mod http;
pub mod master;
pub mod pitcher;
pub mod scripted;
pub mod system;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use backend::{default_reply, Backend, RecordedRequest, Reply};
pub use client::{get_once, get_request, request_bytes, Client, Response};
pub use http::{pattern_bytes, pseudo_random_bytes, Framing, Headers};
pub use pitcher::{run_pitcher, ConfigBuilder, Pitcher, RunOutput};
pub use scripted::{read_head_exact, ScriptedBackend};

/// Read and write timeout of every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and
/// released), for Pitcher's own listener, which Pitcher binds from its
/// configuration.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// An address on which nothing listens, so connecting is refused.
///
/// Taken below the kernel's ephemeral range, so no test socket bound to
/// port 0 (backends, Pitcher's listeners) can take it in the meantime.
pub fn dead_addr() -> SocketAddr {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
            ^ std::process::id().rotate_left(16);
    for i in 0..1000u32 {
        let port = from + ((seed.wrapping_add(i.wrapping_mul(7919)) % u32::from(to - from)) as u16);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port found below {low}");
}

/// Polls `f` every 5 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `VmRSS` of a process, in KiB, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// A field of `/proc/<pid>/status` counted in KiB (`VmRSS`, `RssFile`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Asserts a response Pitcher made itself for an error: exactly
/// `HTTP/1.1 <code> <reason>`, `Content-Type: text/plain...`, a
/// Content-Length equal to the non-empty body.
pub fn assert_error_response(r: &Response, code: u16) {
    let expected = format!("HTTP/1.1 {code} {}", http::reason_phrase(code));
    assert_eq!(r.status_line(), expected, "status line; response head:\n{}", r.head_str());
    let ct = r.header("content-type").unwrap_or_else(|| panic!("no Content-Type in:\n{}", r.head_str()));
    assert!(ct.to_ascii_lowercase().starts_with("text/plain"), "Content-Type {ct:?}");
    let cl = r.header("content-length").unwrap_or_else(|| panic!("no Content-Length in:\n{}", r.head_str()));
    assert_eq!(cl.parse::<usize>().ok(), Some(r.body.len()), "Content-Length {cl:?} vs body {:?}", r.body_str());
    assert!(!r.body.is_empty(), "error response has an empty body:\n{}", r.head_str());
    assert_eq!(r.framing, Framing::Length(r.body.len() as u64));
}

/// Asserts a 200 whose body is exactly `body`.
pub fn assert_ok_body(r: &Response, body: &[u8]) {
    assert_eq!(r.status, 200, "response head:\n{}body: {:?}", r.head_str(), r.body_str());
    assert!(
        r.body == body,
        "body differs: got {} bytes {:?}..., expected {} bytes",
        r.body.len(),
        preview(&r.body),
        body.len()
    );
}

/// The first 80 bytes of `b`, printable.
pub fn preview(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned()
}
