//! A client connection and the exchange in flight on it: the proxy state
//! machine. The worker's event loop calls [`Core::drive`] when a socket of
//! the session is ready or its deadline passes; `drive` moves bytes until
//! nothing more can move, and says whether the session lives on.
//!
//! Phases of a session: `Head` (reading a request head; idle between
//! requests), `Proxy` (an exchange with a backend, see `proxy.rs`),
//! `Local` (writing a response Pitcher made itself), `Tunnel` (after a
//! 101, bytes both ways), `Linger` (our side is done, the client's unread
//! input is drained before closing so the last response is not reset).
//!
//! Owns: the client socket, its buffers, the parsed request and response.
//! Must not: block, or know about processes and signals.
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buffer::Buf;
use crate::http::write::{self as hw, ConnHeader};
use crate::http::{ChunkedScanner, Framing, HttpError, RequestHead, ResponseHead, Version};
use crate::net::{Peer, Readiness, Stream};

use super::timer::Timed;
use super::{Core, Snapshot};
use crate::hooks::Point;

/// How long a closing connection's unread input is drained.
pub const LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Head,
    Proxy,
    Local { keep: bool },
    Tunnel,
    Linger,
}

/// Body framing state of one direction, as scanned so far.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    None,
    /// Bytes not yet scanned.
    Length(u64),
    Chunked(ChunkedScanner),
    /// Until the sender closes.
    Close,
}

impl Body {
    pub fn from_framing(f: Framing) -> Body {
        match f {
            Framing::None | Framing::Length(0) => Body::None,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedScanner::new()),
            Framing::Close => Body::Close,
        }
    }

    /// Every byte of the body has been scanned (Close: never, until EOF).
    pub fn complete(&self) -> bool {
        match self {
            Body::None => true,
            Body::Length(n) => *n == 0,
            Body::Chunked(s) => s.is_done(),
            Body::Close => false,
        }
    }

    /// Scans `data` (bytes that follow those already scanned); returns how
    /// many belong to the body.
    pub fn scan(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        Ok(match self {
            Body::None => 0,
            Body::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                n as usize
            }
            Body::Chunked(s) => s.scan_through(data).map_err(HttpError::Chunked)?,
            Body::Close => data.len(),
        })
    }
}

/// How the response body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RespMode {
    /// As received (length, chunked, or close-delimited to a closing client).
    #[default]
    Pass,
    /// Close-delimited from the backend, re-framed as chunked.
    Reframe,
    /// Chunked from the backend, decoded for an HTTP/1.0 client.
    Decode,
}

/// The state of one request/response exchange. Reset between requests;
/// its vectors keep their capacity.
#[derive(Debug, Default)]
pub struct Exchange {
    pub cluster: usize,
    pub backend: usize,
    /// Slab index of the upstream connection in use.
    pub up: Option<usize>,
    /// Backends tried for this request (bit per backend index).
    pub tried: u64,
    /// Connect attempts that failed.
    pub failed: u32,
    /// Resends on a fresh connection after a pooled one turned out closed.
    pub replays: u32,
    pub head_request: bool,
    pub upgrade: bool,
    pub client_keep: bool,
    /// Request head for the backend, and how much of it is written.
    pub up_out: Vec<u8>,
    pub up_out_pos: usize,
    pub req_body: Body,
    /// Scanned request body bytes at the front of the client buffer.
    pub req_ready: usize,
    pub req_body_sent: u64,
    /// Length of the request head at the front of `up_out` (0 once it was
    /// dropped from there).
    pub up_head_len: usize,
    /// A byte of the body (data or framing) went to the backend: the
    /// request can not be replayed.
    pub body_out: bool,
    pub resp_head_done: bool,
    /// Interim (1xx) response heads received, and their bytes.
    pub interim: u32,
    pub interim_bytes: usize,
    pub resp_body: Body,
    pub resp_mode: RespMode,
    pub resp_ready: usize,
    pub resp_eof: bool,
    /// The backend's connection ended with an error (reset), not a FIN: a
    /// close-delimited body is then truncated, not complete.
    pub resp_reset: bool,
    /// Reframe mode: data bytes left of the chunk being written.
    pub chunk_left: usize,
    pub last_chunk_queued: bool,
    pub upstream_keep: bool,
    /// Bytes received from the backend for this request.
    pub resp_bytes: u64,
    /// Tunnel: the client sent its FIN (or failed).
    pub client_eof: bool,
    /// Tunnel: the backend's FIN was passed on to the client.
    pub client_shut: bool,
    /// Tunnel: the client's FIN was passed on to the backend.
    pub up_shut: bool,
    pub started: Option<Instant>,
    /// When the request started going to a backend (for upstream time).
    pub upstream_started: Option<Instant>,
    /// The status the client got (from the backend or from Pitcher).
    pub status: u16,
    /// Response body bytes written to the client.
    pub bytes_out: u64,
    /// The route matched, if any.
    pub route: Option<usize>,
    /// `cluster` holds a choice (from the route or a module).
    pub cluster_chosen: bool,
    /// REQUEST_FINISH is still owed for this exchange.
    pub finish_pending: bool,
    /// Request body deadline (`client_body_total_ms`), and the current
    /// rate window: its start, the body bytes read in it, and whether the
    /// backend held the body back in it (then it is not judged).
    pub body_deadline: Option<Instant>,
    pub body_window_start: Option<Instant>,
    pub body_window_bytes: u64,
    pub body_backpressure: bool,
    /// The client asked for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// Pitcher sent the client a `100 Continue` (a backend's is not relayed).
    pub continue_sent: bool,
}

impl Exchange {
    fn reset(&mut self) {
        let up_out = std::mem::take(&mut self.up_out);
        *self = Exchange { up_out, ..Exchange::default() };
        self.up_out.clear();
    }

    /// The whole request (head and body) has reached the backend.
    pub fn request_sent(&self) -> bool {
        self.up_out_pos == self.up_out.len() && self.req_body.complete() && self.req_ready == 0
    }
}

/// A client connection.
#[derive(Debug)]
pub struct Session {
    /// Token value of the client socket (also the timer key).
    pub key: usize,
    pub stream: Stream,
    pub peer: Peer,
    pub rd: Readiness,
    /// Bytes read from the client.
    pub inb: Option<Buf>,
    /// Bytes for the client not taken from a backend's buffer (heads,
    /// chunk framing, local responses), and how much is written.
    pub out: Vec<u8>,
    pub out_pos: usize,
    pub phase: Phase,
    pub req: RequestHead,
    pub resp: ResponseHead,
    pub ex: Exchange,
    pub timed: Timed,
    /// When the first byte of the current request head arrived.
    pub head_started: Option<Instant>,
    pub requests: u64,
    /// The configuration the current request started with (for an idle
    /// connection: the one current when its last request started).
    pub snap: Arc<Snapshot>,
    /// Set by any byte moved or phase change during one `drive`.
    pub progressed: bool,
    /// Per-request values of modules.
    pub vars: crate::hooks::Vars,
    /// When the connection was accepted.
    pub accepted: Instant,
    /// TCP_NODELAY is set on the client socket.
    pub nodelay: bool,
    /// A write would have blocked: the socket needs write readiness events.
    pub write_blocked: bool,
    /// The socket is registered for write readiness too. Until a write
    /// blocks it is registered for reads only, which spares an event per
    /// connection (a new socket is writable at once).
    pub write_interest: bool,
    /// Writes to the client since the connection's last exchange ended.
    pub writes: u32,
}

impl Session {
    /// A session for a new connection, reusing the allocations of a
    /// closed one when there is one (`spare`).
    pub fn new(key: usize, stream: Stream, peer: Peer, snap: Arc<Snapshot>, spare: Option<Spare>) -> Session {
        let spare = spare.unwrap_or_default();
        Session {
            key,
            stream,
            peer,
            // Not readable until epoll says so: registering reports data that
            // is already there, and reading at once after accept() mostly
            // finds nothing yet (one EAGAIN per connection).
            rd: Readiness { readable: false, writable: true, read_closed: false },
            inb: None,
            out: spare.out,
            out_pos: 0,
            phase: Phase::Head,
            req: spare.req,
            resp: spare.resp,
            ex: spare.ex,
            timed: Timed::default(),
            head_started: None,
            requests: 0,
            snap,
            progressed: false,
            vars: spare.vars,
            accepted: Instant::now(),
            nodelay: false,
            write_blocked: false,
            write_interest: false,
            writes: 0,
        }
    }

    /// The allocations of a closing session, for the next one.
    pub fn into_spare(self) -> Spare {
        let mut sp = Spare { out: self.out, req: self.req, resp: self.resp, ex: self.ex, vars: self.vars };
        sp.out.clear();
        // The head, its normalised path, and where the scan of a head
        // still arriving stood.
        sp.req.clear();
        sp.resp.head.clear();
        sp.ex.reset();
        sp.vars.clear();
        sp
    }

    pub fn has_input(&self) -> bool {
        self.inb.as_ref().is_some_and(|b| !b.is_empty())
    }

    pub(super) fn out_pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Writes `out` then `body` to the client until done or blocked;
    /// returns (all bytes written, body bytes written).
    pub fn write_client(&mut self, body: &[u8]) -> io::Result<(usize, usize)> {
        let mut total = 0;
        let mut written_body = 0;
        while self.rd.writable {
            let head = &self.out[self.out_pos..];
            let rest = &body[written_body..];
            if head.is_empty() && rest.is_empty() {
                break;
            }
            if self.writes > 0 && !self.nodelay {
                self.stream.set_nodelay();
                self.nodelay = true;
            }
            self.writes += 1;
            let r = if head.is_empty() {
                self.stream.write(rest)
            } else if rest.is_empty() {
                self.stream.write(head)
            } else {
                self.stream.write_vectored(&[IoSlice::new(head), IoSlice::new(rest)])
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.progressed = true;
                    total += n;
                    let h = n.min(head.len());
                    self.out_pos += h;
                    if self.out_pos == self.out.len() {
                        self.out.clear();
                        self.out_pos = 0;
                    }
                    written_body += n - h;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rd.writable = false;
                    self.write_blocked = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.ex.bytes_out += written_body as u64;
        Ok((total, written_body))
    }
}

/// The reusable allocations of a session (buffers of heads and output),
/// kept by the worker between connections so that accepting one costs no
/// allocation in the steady state.
#[derive(Debug, Default)]
pub struct Spare {
    out: Vec<u8>,
    req: RequestHead,
    resp: ResponseHead,
    ex: Exchange,
    vars: crate::hooks::Vars,
}

/// What a phase step says to `drive`.
pub enum Step {
    /// The phase changed or more may be possible: step again.
    Again,
    /// Nothing can move until the next event or deadline.
    Blocked,
    /// Close the session.
    Close,
}

/// Reads from `stream` into `buf`: `Ok(Some(n))` bytes (0 = EOF),
/// `Ok(None)` would block. A short read marks the socket drained, which is
/// safe with edge-triggered epoll because EPOLLRDHUP reports a close.
pub fn read_into(stream: &mut Stream, rd: &mut Readiness, buf: &mut Buf) -> io::Result<Option<usize>> {
    let spare = buf.spare();
    let want = spare.len();
    if want == 0 {
        return Ok(None);
    }
    loop {
        match stream.read(spare) {
            Ok(n) => {
                if n < want {
                    rd.drained();
                }
                buf.fill(n);
                return Ok(Some(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                rd.drained();
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Why an incomplete or complete head over `max` bytes is refused: 414
/// when its request line alone does not fit, else 431.
fn head_too_large(data: &[u8], max: usize) -> HttpError {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) if i < max => HttpError::HeadersTooLarge,
        _ => HttpError::UriTooLong,
    }
}

impl Core {
    /// Moves everything that can move for session `s`. Returns `false` when
    /// the session is to be closed.
    pub fn drive(&mut self, s: &mut Session) -> bool {
        loop {
            let step = match s.phase {
                Phase::Head => self.step_head(s),
                Phase::Proxy => self.step_proxy(s),
                Phase::Local { keep } => self.step_local(s, keep),
                Phase::Tunnel => self.step_tunnel(s),
                Phase::Linger => self.step_linger(s),
            };
            match step {
                Step::Again => continue,
                Step::Blocked => break,
                Step::Close => return false,
            }
        }
        if std::mem::take(&mut s.write_blocked) && !s.write_interest {
            let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
            if self.registry.reregister(&mut s.stream, mio::Token(s.key), interest).is_err() {
                return false;
            }
            s.write_interest = true;
        }
        if std::mem::take(&mut s.progressed) {
            self.rearm(s);
        }
        true
    }

    /// Reads and parses a request head.
    fn step_head(&mut self, s: &mut Session) -> Step {
        loop {
            if let Some(inb) = s.inb.as_mut().filter(|b| !b.is_empty()) {
                let limits = &s.snap.config.limits;
                // A buffer smaller than the limit (a reload raised it) is
                // the limit: a full buffer cannot be read into.
                let max = limits.max_header_bytes.min(inb.capacity());
                // Incremental: only the bytes read since the last call are
                // examined; httparse runs once the head (or the request
                // line) is complete, or when the buffer is full.
                match s.req.parse_more(inb.data(), limits.max_headers, inb.len() >= max) {
                    Ok(Some(n)) if n > max => {
                        let e = head_too_large(inb.data(), max);
                        return self.refuse_head(s, e);
                    }
                    Ok(Some(n)) => {
                        inb.consume(n);
                        s.requests += 1;
                        s.progressed = true;
                        return self.start_request(s);
                    }
                    Ok(None) if inb.len() >= max => {
                        let e = head_too_large(inb.data(), max);
                        return self.refuse_head(s, e);
                    }
                    Ok(None) => {}
                    Err(e) => return self.refuse_head(s, e),
                }
            } else if !s.rd.readable {
                // Idle between requests: give the buffer back.
                if let Some(b) = s.inb.take() {
                    self.bufs.put(b);
                }
            }
            if !s.rd.readable {
                return Step::Blocked;
            }
            let inb = s.inb.get_or_insert_with(|| self.bufs.get());
            match read_into(&mut s.stream, &mut s.rd, inb) {
                Ok(Some(0)) | Err(_) => return Step::Close,
                Ok(Some(_)) => {
                    s.progressed = true;
                    if s.head_started.is_none() {
                        s.head_started = Some(self.now);
                    }
                }
                Ok(None) => {}
            }
        }
    }

    /// A request head was parsed: route it and start the exchange.
    fn start_request(&mut self, s: &mut Session) -> Step {
        s.head_started = None;
        s.ex.reset();
        s.snap = self.current.load_full();
        s.vars.clear();
        s.ex.started = Some(self.now);
        s.ex.finish_pending = true;
        self.count_request();
        s.ex.head_request = s.req.is_head();
        s.ex.client_keep = s.req.keep_alive() && !self.draining;
        s.ex.req_body = Body::from_framing(s.req.framing());
        // RFC 9110 §10.1.1: Pitcher answers `Expect: 100-continue` itself
        // (the backend sees it only if configured). An HTTP/1.0 request's
        // Expect is ignored; a client that sent body bytes already does
        // not wait.
        if s.req.head.get("expect").is_some_and(|v| crate::http::head::trim(v).eq_ignore_ascii_case(b"100-continue")) {
            s.ex.expect_continue = s.req.version() == Version::Http11 && !s.ex.req_body.complete() && !s.has_input();
            if !s.snap.config.forward_expect {
                s.req.head.remove("expect");
            }
        }
        let max_body = s.snap.config.limits.max_body_bytes;
        if let Framing::Length(n) = s.req.framing() {
            if n > max_body {
                return self.refuse(s, HttpError::BodyTooLarge);
            }
        }
        // A malformed or oversized chunked body that came with the head is
        // refused before any backend is contacted. (Bytes that come later
        // are checked as they are re-framed; see `pump_request`.)
        if let Body::Chunked(sc) = &s.ex.req_body {
            let mut probe = sc.clone();
            let buffered = s.inb.as_ref().map_or(&[][..], |b| b.data());
            if let Err(e) = probe.scan_through(buffered) {
                return self.refuse(s, HttpError::Chunked(e));
            }
            if probe.data_total > max_body {
                return self.refuse(s, HttpError::BodyTooLarge);
            }
        }
        // A request id for the backend and the logs, unless the request
        // already carries one (from a load balancer in front of us).
        if s.req.head.get("x-request-id").is_none() {
            let id = self.next_request_id();
            s.req.head.append("X-Request-Id", &id);
        }
        // `path()` is the normalised path; the backend gets the target as
        // received unless the configuration asks for the normalised one.
        if s.snap.config.normalize_upstream_path {
            s.req.use_normalized_target();
        }
        s.ex.route = s.snap.router.lookup(s.req.host(), s.req.path());
        if let Some(r) = s.ex.route {
            s.ex.cluster = s.snap.config.routes[r].cluster;
            s.ex.cluster_chosen = true;
        }
        if let Some(step) = self.hook_request(s, Point::BeforeCluster) {
            return step;
        }
        if !s.ex.cluster_chosen {
            return self.respond(s, 404);
        }
        // RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
        // Only the protocols the configuration allows become a tunnel
        // (default: WebSocket). Anything else, such as h2c, would take the
        // connection out of per-request routing and modules: its Upgrade is
        // dropped as hop-by-hop and the request goes on as HTTP/1.1.
        s.ex.upgrade = s.req.version() == Version::Http11
            && s.req.head.has_token("connection", "upgrade")
            && s.req.head.get("upgrade").is_some_and(|u| {
                let proto = crate::http::head::trim(u.split(|&b| b == b',').next().unwrap_or(b""));
                let name = proto.split(|&b| b == b'/').next().unwrap_or(b"");
                s.snap.config.upgrade_protocols.iter().any(|p| p.as_bytes().eq_ignore_ascii_case(name))
            });
        s.phase = Phase::Proxy;
        // The backend is chosen, then AFTER_CLUSTER runs, then Pitcher
        // connects (or takes a pooled connection).
        if let Err(status) = self.pick_backend(s) {
            return self.respond(s, status);
        }
        s.ex.upstream_started = Some(self.now);
        if let Some(step) = self.hook_request(s, Point::AfterCluster) {
            return step;
        }
        let opened = match self.open_backend(s) {
            Ok(true) => Ok(()),
            Ok(false) => self.connect_upstream(s),
            Err(status) => Err(status),
        };
        if let Err(status) = opened {
            return self.respond(s, status);
        }
        // Tests of the worker's panic containment: a panic while the
        // session holds a backend connection.
        #[cfg(feature = "fault-injection")]
        if s.req.head.get("x-pitcher-test-panic").is_some() {
            panic!("fault injection: X-Pitcher-Test-Panic");
        }
        if !s.ex.req_body.complete() {
            let t = &s.snap.config.timeouts;
            s.ex.body_deadline = Some(self.now + t.client_body_total);
            s.ex.body_window_start = Some(self.now);
        }
        // Ready for the body: route, modules and backend are settled.
        if s.ex.expect_continue {
            s.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            s.ex.continue_sent = true;
            if s.write_client(&[]).is_err() {
                return Step::Close;
            }
        }
        let client = match s.peer {
            Peer::Ip(ip) => Some(ip),
            Peer::Unix => None,
        };
        hw::request_head(&mut s.ex.up_out, &s.req, client, s.ex.upgrade);
        s.ex.up_head_len = s.ex.up_out.len();
        Step::Again
    }

    /// Refuses a request head that could not be parsed: nothing of the
    /// previous exchange (a HEAD method, a body) applies to the answer.
    fn refuse_head(&mut self, s: &mut Session, e: HttpError) -> Step {
        s.ex.reset();
        s.head_started = None;
        s.ex.started = Some(self.now);
        s.ex.finish_pending = true;
        self.refuse(s, e)
    }

    /// Answers a malformed request: the client stream cannot be trusted,
    /// so the connection is closed after the response.
    pub(super) fn refuse(&mut self, s: &mut Session, e: HttpError) -> Step {
        slog::debug!(self.log, "request refused"; "reason" => %e, "status" => e.status(), "peer" => ?s.peer);
        s.ex.client_keep = false;
        self.respond(s, e.status())
    }

    /// Sends a response made by Pitcher. The connection stays open only if
    /// the client wants it and the request's body is fully read.
    pub(super) fn respond(&mut self, s: &mut Session, status: u16) -> Step {
        self.respond_with(s, status, &[], &[])
    }

    /// Sends a response made by Pitcher or a module: extra header fields,
    /// and a body (empty: Pitcher's short text body for the status).
    pub(super) fn respond_with(
        &mut self,
        s: &mut Session,
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Step {
        self.release_upstream(s, false);
        s.ex.status = status;
        let body_read = s.ex.req_body.complete() && s.ex.req_ready == 0;
        let keep = s.ex.client_keep && body_read && status != 408;
        let conn = match (keep, s.req.version()) {
            (false, _) => ConnHeader::Close,
            (true, Version::Http10) => ConnHeader::KeepAlive,
            (true, Version::Http11) => ConnHeader::Default,
        };
        s.out.clear();
        s.out_pos = 0;
        // Written from `out`: counted here, not as backend body bytes.
        s.ex.bytes_out = hw::module_response(&mut s.out, status, headers, body, conn, s.ex.head_request) as u64;
        s.phase = Phase::Local { keep };
        s.progressed = true;
        Step::Again
    }

    fn step_local(&mut self, s: &mut Session, keep: bool) -> Step {
        if s.write_client(&[]).is_err() {
            return Step::Close;
        }
        if s.out_pending() {
            return Step::Blocked;
        }
        self.end_exchange(s, keep)
    }

    /// The response is fully written: next request, or close.
    pub(super) fn end_exchange(&mut self, s: &mut Session, keep: bool) -> Step {
        self.hook_request_finish(s);
        s.progressed = true;
        s.writes = 0;
        if keep {
            if !s.nodelay {
                s.stream.set_nodelay();
                s.nodelay = true;
            }
            s.phase = Phase::Head;
            // Bytes of a pipelined request already read: its head is late
            // from now on, not idle.
            if s.has_input() {
                s.head_started = Some(self.now);
            }
            return Step::Again;
        }
        // Unread input (a body we refused, pipelined requests) would make
        // the kernel reset the connection and lose the response: drain it.
        if s.has_input() || !s.ex.req_body.complete() || s.rd.readable && !s.rd.read_closed {
            s.stream.shutdown_write();
            s.phase = Phase::Linger;
            self.timers.set(&mut s.timed, s.key, self.now + LINGER);
            return Step::Again;
        }
        Step::Close
    }

    fn step_linger(&mut self, s: &mut Session) -> Step {
        let mut scratch = [0u8; 4096];
        loop {
            if !s.rd.readable {
                return Step::Blocked;
            }
            match s.stream.read(&mut scratch) {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.rd.drained(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }

    /// Sets the session's deadline for what it now waits on.
    fn rearm(&mut self, s: &mut Session) {
        let t = &s.snap.config.timeouts;
        let at = match s.phase {
            Phase::Head => match s.head_started {
                Some(t0) => t0 + t.client_header,
                None if s.requests == 0 => self.now + t.client_header,
                None => self.now + t.keepalive_idle,
            },
            Phase::Proxy => match s.ex.up.map(|u| self.ups[u].connecting) {
                // The connect deadline was set when connecting began.
                Some(true) => return,
                _ => self.now + self.proxy_wait(s),
            },
            Phase::Local { .. } => self.now + t.client_write,
            Phase::Tunnel => self.now + t.tunnel_idle,
            Phase::Linger => return,
        };
        self.timers.set(&mut s.timed, s.key, at);
    }

    /// A deadline passed. Returns `false` to close the session.
    pub fn timeout(&mut self, s: &mut Session) -> bool {
        match s.phase {
            Phase::Head if s.head_started.is_some() => {
                slog::debug!(self.log, "client header timeout"; "peer" => ?s.peer);
                s.ex.client_keep = false;
                s.ex.head_request = false;
                let _ = self.respond(s, 408);
                self.drive(s)
            }
            Phase::Proxy => {
                let step = self.proxy_timeout(s);
                match step {
                    Step::Close => false,
                    _ => self.drive(s),
                }
            }
            _ => false,
        }
    }

    /// Bytes in both directions after a 101 Switching Protocols. A FIN
    /// from either side is passed on once everything that side sent has
    /// been delivered (half-close); the session ends when both directions
    /// are closed, on any error, or after the idle timeout.
    fn step_tunnel(&mut self, s: &mut Session) -> Step {
        let Some(ui) = s.ex.up else { return Step::Close };
        loop {
            let mut moved = false;
            let u = &mut self.ups[ui];
            let Some(ubuf) = u.buf.as_mut() else { return Step::Close };
            // Backend to client.
            match s.write_client(ubuf.data()) {
                Ok((total, n)) => {
                    ubuf.consume(n);
                    moved |= total > 0;
                }
                Err(_) => return Step::Close,
            }
            if !s.ex.resp_eof && u.rd.readable && ubuf.room() > 0 {
                match read_into(&mut u.stream, &mut u.rd, ubuf) {
                    Ok(Some(0)) | Err(_) => {
                        s.ex.resp_eof = true;
                        moved = true;
                    }
                    Ok(Some(_)) => moved = true,
                    Ok(None) => {}
                }
            }
            if s.ex.resp_eof && ubuf.is_empty() && !s.out_pending() && !s.ex.client_shut {
                s.stream.shutdown_write();
                s.ex.client_shut = true;
                moved = true;
            }
            // Client to backend.
            let inb = s.inb.get_or_insert_with(|| self.bufs.get());
            while u.rd.writable && !inb.is_empty() {
                match u.stream.write(inb.data()) {
                    Ok(n) => {
                        inb.consume(n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => u.rd.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
            }
            if !s.ex.client_eof && s.rd.readable && inb.room() > 0 {
                match read_into(&mut s.stream, &mut s.rd, inb) {
                    Ok(Some(0)) | Err(_) => {
                        s.ex.client_eof = true;
                        moved = true;
                    }
                    Ok(Some(_)) => moved = true,
                    Ok(None) => {}
                }
            }
            if s.ex.client_eof && inb.is_empty() && !s.ex.up_shut {
                u.stream.shutdown_write();
                s.ex.up_shut = true;
                moved = true;
            }
            if s.ex.client_shut && s.ex.up_shut {
                return Step::Close;
            }
            if moved {
                s.progressed = true;
            } else {
                return Step::Blocked;
            }
        }
    }
}
