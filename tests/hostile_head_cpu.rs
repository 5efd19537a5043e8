//! A request head sent one byte per TCP segment costs the worker CPU in
//! proportion to its length, not to its square: each read examines only
//! the bytes it brought, and httparse runs once the head is complete.
//! Measured as the worker's CPU time (utime + stime from /proc) for one
//! long head and for short ones, so that only ratios are asserted, never
//! a duration.

mod common;

use std::io::Write;
use std::thread;
use std::time::Duration;

use common::*;

/// The numeric fields of /proc/PID/stat, numbered as in proc(5).
fn stat_field(pid: u32, n: usize) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) in
    // parentheses; the first of them, the state, is field 3.
    let rest = &stat[stat.rfind(')').expect("comm in parentheses") + 2..];
    rest.split_whitespace().nth(n - 3).and_then(|f| f.parse().ok()).expect("a number")
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    stat_field(pid, 14) + stat_field(pid, 15)
}

/// How often the process's main thread (the event loop) went to sleep
/// waiting: once per wake-up with something to read.
fn waits(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).expect("read task status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches")
}

const HEAD_START: &str = "GET /pad HTTP/1.1\r\nHost: h\r\nX-Pad: ";
const HEAD_END: &str = "\r\n\r\n";

/// A GET whose head is exactly `len` bytes, padded with one long field.
fn head_of(len: usize) -> Vec<u8> {
    let mut h = HEAD_START.as_bytes().to_vec();
    h.resize(len - HEAD_END.len(), b'p');
    h.extend_from_slice(HEAD_END.as_bytes());
    h
}

/// Sends `raw` one byte per write (the client sets TCP_NODELAY), pausing
/// after each so that the bytes arrive in separate segments and reads.
fn send_bytewise(c: &Client, raw: &[u8]) {
    let mut s = c.stream();
    for b in raw {
        s.write_all(std::slice::from_ref(b)).expect("write one byte");
        thread::sleep(Duration::from_micros(1));
    }
}

/// (CPU ticks, wake-ups) of `pid` while `f` runs.
fn cost(pid: u32, f: impl FnOnce()) -> (u64, u64) {
    let (t0, w0) = (cpu_ticks(pid), waits(pid));
    f();
    (cpu_ticks(pid) - t0, waits(pid) - w0)
}

#[test]
fn head_sent_one_byte_per_segment_costs_linear_cpu() {
    const BIG: usize = 64 * 1024;
    const SMALL: usize = 1024;
    /// One 1 KiB head alone costs too few clock ticks to measure.
    const SMALL_HEADS: usize = 16;
    let be = Backend::start("be");
    let p = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[limits]\nmax_header_bytes = 131072\n[timeouts]\nclient_header_ms = 60000")
        .start();
    // Single-process: the process started is the worker.
    let worker = p.pid();
    let mut c = p.client();
    // Warm up (buffers, backend connection) so neither run pays for it.
    assert_ok_body(&c.get("h", "/"), b"ok from be");

    let small = head_of(SMALL);
    let (small_ticks, small_waits) = cost(worker, || {
        for _ in 0..SMALL_HEADS {
            send_bytewise(&c, &small);
            assert_ok_body(&c.read_response(), b"ok from be");
        }
    });
    let big = head_of(BIG);
    let (big_ticks, big_waits) = cost(worker, || {
        send_bytewise(&c, &big);
        assert_ok_body(&c.read_response(), b"ok from be");
    });
    let got = be.last_request().expect("the backend saw the long head");
    assert_eq!(got.header("x-pad").map(str::len), Some(BIG - HEAD_START.len() - HEAD_END.len()));

    let report = format!(
        "64 KiB head: {big_ticks} ticks, {big_waits} wake-ups; {SMALL_HEADS} heads of 1 KiB: {small_ticks} ticks, {small_waits} wake-ups"
    );
    assert!(small_ticks >= 5 && small_waits >= 1000, "too little measured: {report}");
    // Per byte: re-parsing the whole buffer on every read would cost the
    // long head about 64 times as much per byte as the short ones.
    let per_byte = (big_ticks as f64 / BIG as f64) / (small_ticks as f64 / (SMALL * SMALL_HEADS) as f64);
    assert!(per_byte < 8.0, "per-byte CPU ratio {per_byte:.1}: {report}");
    // Per wake-up: a worker that falls behind reads more bytes at once,
    // which hides quadratic work from the per-byte ratio (the sender sets
    // the pace); the cost of each read must not grow with the head either.
    let per_wait = (big_ticks as f64 / big_waits.max(1) as f64) / (small_ticks as f64 / small_waits as f64);
    assert!(per_wait < 8.0, "per-read CPU ratio {per_wait:.1}: {report}");
    eprintln!("{report}");
}
