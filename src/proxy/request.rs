//! A request from its head to its end, where no backend connection is
//! involved: the `Head` state (read and parse a head, route it, run
//! BEFORE_CLUSTER, choose a backend, run AFTER_CLUSTER, open the
//! connection: then `Proxy`), the `Local` state (a response Pitcher or a
//! module made), the end of an exchange (REQUEST_FINISH, then the next
//! head or the close) and `Linger`.

use crate::shm::metrics;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use crate::hooks::{Point, Verdict};
use crate::http::write::{self as hw, ConnHeader};
use crate::http::{Framing, HttpError, Version};
use crate::net::Peer;

use super::core::Core;
use super::exchange::Body;
use super::session::{count_received, read_into, Session};
use super::state::{BodyPace, Next, Proxying, State, Step};

/// How long a closing connection's unread input is drained.
pub const LINGER: Duration = Duration::from_secs(2);

/// Why an incomplete or complete head over `max` bytes is refused: 414
/// when its request line alone does not fit, else 431.
fn head_too_large(data: &[u8], max: usize) -> HttpError {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) if i < max => HttpError::HeadersTooLarge,
        _ => HttpError::UriTooLong,
    }
}

impl Core {
    /// `Head`: reads and parses a request head.
    pub(super) fn step_head(&mut self, s: &mut Session, mut started: Option<Instant>) -> Next {
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
                        if s.requests > 1 {
                            metrics::add(&metrics::here().keepalive_requests, 1);
                        }
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
                return (State::Head { started }, Step::Blocked);
            }
            let inb = s.inb.get_or_insert_with(|| self.bufs.get());
            match read_into(&mut s.stream, &mut s.rd, inb).inspect(count_received) {
                Err(e) if s.stream.handshaking() => {
                    self.tls.failed += 1;
                    self.log_tls_refusal(&e.to_string(), &s.peer);
                    return (State::Head { started }, Step::Close);
                }
                Ok(Some(0)) | Err(_) => return (State::Head { started }, Step::Close),
                Ok(Some(_)) => {
                    s.progressed = true;
                    if started.is_none() {
                        started = Some(self.now);
                    }
                }
                Ok(None) => {}
            }
        }
    }

    /// `Head` → a request head was parsed: route it, choose its backend
    /// and open a connection to it (`Proxy`), or answer it (`Local`).
    fn start_request(&mut self, s: &mut Session) -> Next {
        s.ex.reset();
        s.snap = self.current.load_full();
        s.vars.clear();
        s.log = None;
        s.ex.started = Some(self.now);
        s.ex.finish_pending = true;
        self.count_request();
        s.ex.head_request = s.req.is_head();
        s.ex.client_closes = !s.req.keep_alive();
        s.ex.client_keep = !s.ex.client_closes && !self.closing(s);
        s.ex.req_body = Body::from_framing(s.req.framing());
        // RFC 9110 §10.1.1: Pitcher answers `Expect: 100-continue` itself
        // (the backend sees it only if configured). An HTTP/1.0 request's
        // Expect is ignored; a client that sent body bytes already does
        // not wait.
        let mut expect_continue = false;
        if s.req.head.get("expect").is_some_and(|v| crate::http::head::trim(v).eq_ignore_ascii_case(b"100-continue")) {
            expect_continue = s.req.version() == Version::Http11 && !s.ex.req_body.complete() && !s.has_input();
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
        if let Some(port) = s.redirect_https {
            return self.redirect_https(s, port);
        }
        // `path()` is the normalised path; the backend gets the target as
        // received unless the configuration asks for the normalised one.
        if s.snap.config.normalize_upstream_path {
            s.req.use_normalized_target();
        }
        s.ex.route = s.snap.router.lookup(&s.req);
        // The route's action: a redirect or fixed response is answered
        // here, before any module runs (REQUEST_FINISH still sees it);
        // otherwise its cluster is chosen and its rewrites applied.
        if let Some(next) = self.apply_route(s) {
            return next;
        }
        let v = self.hook_request(s, Point::BeforeCluster);
        if let Some(next) = self.verdict(s, v) {
            return next;
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
        // The backend is chosen, then AFTER_CLUSTER runs, then Pitcher
        // connects (or takes a pooled connection).
        if let Err(status) = self.pick_backend(s) {
            return self.respond(s, status);
        }
        s.ex.upstream_started = Some(self.now);
        let v = self.hook_request(s, Point::AfterCluster);
        if let Some(next) = self.verdict(s, v) {
            return next;
        }
        let opened = match self.open_backend(s) {
            Ok(Some(up)) => Ok(up),
            Ok(None) => self.connect_upstream(s),
            Err(status) => Err(status),
        };
        let up = match opened {
            Ok(up) => up,
            Err(status) => return self.respond(s, status),
        };
        // Tests of the worker's panic containment: a panic while the
        // session holds a backend connection.
        #[cfg(feature = "fault-injection")]
        if s.req.head.get("x-pitcher-test-panic").is_some() {
            panic!("fault injection: X-Pitcher-Test-Panic");
        }
        let mut p = Proxying::start(s.spare_proxy.take(), up);
        if !s.ex.req_body.complete() {
            let t = &s.snap.config.timeouts;
            p.body_pace = Some(BodyPace {
                deadline: self.now + t.client_body_total,
                window_start: self.now,
                window_bytes: 0,
                backpressure: false,
            });
        }
        // Ready for the body: route, modules and backend are settled.
        if expect_continue {
            s.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            p.continue_sent = true;
            if s.write_client(&[]).is_err() {
                return (State::Proxy(p), Step::Close);
            }
        }
        let client = match s.peer {
            Peer::Ip(ip) => Some(ip),
            Peer::Unix => None,
        };
        // `host_header = "backend"`: the backend connected to (after any
        // immediate connect failures moved on to another).
        self.set_backend_host(s);
        let scheme = if s.stream.is_tls() { hw::Scheme::Https } else { hw::Scheme::Http };
        p.queue_head(&s.req, client, scheme, s.ex.upgrade);
        (State::Proxy(p), Step::Again)
    }

    /// → `Local`: a listener with `redirect_https_port` answers every
    /// request with the same target on `https://HOST[:PORT]` (nginx's
    /// `return 301 https://$host$request_uri`), 301 for GET and HEAD, 308
    /// (which keeps the method and body) for the others. No route or
    /// module runs but REQUEST_FINISH (the access log).
    fn redirect_https(&mut self, s: &mut Session, port: u16) -> Next {
        let host = String::from_utf8_lossy(s.req.host()).into_owned();
        if host.is_empty() {
            return self.respond(s, 400);
        }
        let target = s.req.target();
        // Origin form from an absolute-form target (its authority is the host).
        let path = match target.first() {
            Some(b'/') => target,
            _ => match target.windows(3).position(|w| w == b"://") {
                Some(i) => target[i + 3..].iter().position(|&b| b == b'/').map_or(&b"/"[..], |j| &target[i + 3 + j..]),
                None => b"/",
            },
        };
        let mut location = format!("https://{host}");
        if port != 443 {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&String::from_utf8_lossy(path));
        let status = if matches!(s.req.method(), b"GET" | b"HEAD") { 301 } else { 308 };
        self.respond_with(s, status, &[("Location".to_string(), location)], &[])
    }

    /// What a request point's verdict means before any backend connection
    /// is open: go on (`None`), answer, or close.
    fn verdict(&mut self, s: &mut Session, v: Verdict) -> Option<Next> {
        match v {
            Verdict::Continue => None,
            Verdict::Respond(r) => Some(self.respond_with(s, r.status, &r.headers, &r.body)),
            Verdict::Close => Some((State::Closed, Step::Close)),
        }
    }

    /// `Head` → `Local`: a request head that could not be parsed is
    /// refused; nothing of the previous exchange (a HEAD method, a body)
    /// applies to the answer.
    fn refuse_head(&mut self, s: &mut Session, e: HttpError) -> Next {
        s.ex.reset();
        s.log = None;
        s.ex.started = Some(self.now);
        s.ex.finish_pending = true;
        self.refuse(s, e)
    }

    /// → `Local`: answers a malformed request. The client stream cannot be
    /// trusted, so the connection is closed after the response.
    pub(super) fn refuse(&mut self, s: &mut Session, e: HttpError) -> Next {
        slog::debug!(self.conn_log(s), "request refused"; "reason" => %e, "status" => e.status());
        s.ex.client_keep = false;
        self.respond(s, e.status())
    }

    /// → `Local`: sends a response made by Pitcher. The connection stays
    /// open only if the client wants it and the request's body is fully read.
    pub(super) fn respond(&mut self, s: &mut Session, status: u16) -> Next {
        self.respond_with(s, status, &[], &[])
    }

    /// → `Local`: sends a response made by Pitcher or a module: extra
    /// header fields, and a body (empty: Pitcher's short text body for the
    /// status). The state it leaves holds no backend connection.
    pub(super) fn respond_with(
        &mut self,
        s: &mut Session,
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Next {
        s.ex.status = status;
        let keep = s.ex.client_keep && s.ex.body_read() && status != 408;
        let conn = match (keep, s.req.version()) {
            (false, _) => ConnHeader::Close,
            (true, Version::Http10) => ConnHeader::KeepAlive,
            (true, Version::Http11) => ConnHeader::Default,
        };
        s.out.clear();
        s.out_pos = 0;
        // Written from `out`: counted here, not as backend body bytes.
        s.ex.bytes_out = hw::module_response(&mut s.out, status, headers, body, conn, s.ex.head_request) as u64;
        s.progressed = true;
        (State::Local { keep }, Step::Again)
    }

    /// `Local`: writes the response (all of it is in `out`), then ends the
    /// exchange.
    pub(super) fn step_local(&mut self, s: &mut Session, keep: bool) -> Next {
        if s.write_client_then(&[], true).is_err() {
            return (State::Closed, Step::Close);
        }
        if s.out_pending() {
            return (State::Local { keep }, Step::Blocked);
        }
        self.end_exchange(s, keep)
    }

    /// The response is fully written: REQUEST_FINISH, then `Head` for the
    /// next request (`keep`), `Linger`, or close.
    pub(super) fn end_exchange(&mut self, s: &mut Session, keep: bool) -> Next {
        self.hook_request_finish(s);
        s.progressed = true;
        s.writes = 0;
        if keep {
            if !s.nodelay {
                s.stream.set_nodelay();
                s.nodelay = true;
            }
            // Bytes of a pipelined request already read: its head is late
            // from now on, not idle.
            let started = s.has_input().then_some(self.now);
            return (State::Head { started }, Step::Again);
        }
        // Unread input (a body we refused, pipelined requests) would make
        // the kernel reset the connection and lose the response: drain it.
        if s.has_input() || !s.ex.req_body.complete() || s.rd.readable && !s.rd.read_closed {
            s.stream.shutdown_write();
            self.timers.set(&mut s.timed, s.key, self.now + LINGER);
            return (State::Linger, Step::Again);
        }
        (State::Closed, Step::Close)
    }

    /// `Linger`: reads and drops the client's input until EOF (or the
    /// linger deadline).
    pub(super) fn step_linger(&mut self, s: &mut Session) -> Next {
        let mut scratch = [0u8; 4096];
        loop {
            if !s.rd.readable {
                return (State::Linger, Step::Blocked);
            }
            match s.stream.read(&mut scratch) {
                Ok(0) => return (State::Closed, Step::Close),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.rd.drained(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (State::Closed, Step::Close),
            }
        }
    }
}
