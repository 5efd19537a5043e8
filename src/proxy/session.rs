//! A client connection ([`Session`]): its socket, buffers, parsed heads,
//! the record of its current request and its [`State`]; and `drive`,
//! which runs state steps until nothing can move. The worker's loop (via
//! the engine) calls [`Core::drive`] when a socket of the session is ready
//! and [`Core::timeout`] when its deadline passes.
//!
//! The client socket is a [`ClientStream`]: cleartext or TLS, the states
//! read and write plaintext either way. TLS records the socket did not
//! take yet count as output still to write ([`Session::out_pending`]);
//! `drive` sends them before and after the state steps.
//!
//! Owns: the client socket and what was read from it or is to be written.
//! Must not: block, or know about processes and signals.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use slog::Logger;

use crate::buffer::Buf;
use crate::hooks::{Response, Vars};
use crate::http::write::{self as hw, ConnHeader};
use crate::http::RequestHead;
use crate::net::{Peer, Readiness};
use crate::shm::metrics::{self, TimeoutKind};
use crate::tls::ClientStream;

use super::core::{Core, Snapshot};
use super::exchange::Exchange;
use super::state::{Proxying, State, Step};
use super::timer::Timed;

/// A client connection.
#[derive(Debug)]
pub struct Session {
    /// Token value of the client socket (also the timer key).
    pub(super) key: usize,
    pub(super) stream: ClientStream,
    pub(super) peer: Peer,
    /// The bound address of the listener that accepted it (it moves with
    /// the connection on a binary upgrade).
    pub(super) listener: Arc<str>,
    pub(super) rd: Readiness,
    /// Bytes read from the client.
    pub(super) inb: Option<Buf>,
    /// Bytes for the client not taken from a backend's buffer (heads,
    /// chunk framing, local responses), and how much is written.
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    pub state: State,
    /// The request head (held while not parked).
    pub(super) req: Held<RequestHead>,
    /// The current (or last) request: what it is, where it went, how it
    /// ended (held while not parked).
    pub(super) ex: Held<Exchange>,
    pub(super) timed: Timed,
    pub(super) requests: u64,
    /// The configuration the current request started with (for a
    /// connection between requests: the current one, which a reload
    /// replaces).
    pub(super) snap: Arc<Snapshot>,
    /// Set by any byte moved or state change during one `drive`.
    pub(super) progressed: bool,
    /// Per-request values of modules.
    pub(super) vars: Vars,
    /// When the connection was accepted.
    pub(super) accepted: Instant,
    /// TCP_NODELAY is set on the client socket.
    pub(super) nodelay: bool,
    /// A write would have blocked: the socket needs write readiness events.
    pub(super) write_blocked: bool,
    /// The socket is registered for write readiness too. Until a write
    /// blocks it is registered for reads only, which spares an event per
    /// connection (a new socket is writable at once).
    pub(super) write_interest: bool,
    /// Writes to the client since the connection's last exchange ended.
    pub(super) writes: u32,
    /// The allocation of the exchange with a backend (and of its request
    /// head) while no exchange holds it: `Proxy` takes it and gives it back.
    pub(super) spare_proxy: Option<Box<Proxying>>,
    /// The current request's logger, built at its first log line
    /// (see `keys`).
    pub(super) log: Option<Logger>,
    /// Idle between requests, the request's allocations (heads, output,
    /// module values, the exchange's box) were handed back to the engine's
    /// pool: an idle keep-alive connection holds no buffer. Taken back at
    /// its next readiness event.
    pub(super) parked: bool,
    /// The listener redirects every request to https on this port.
    pub(super) redirect_https: Option<u16>,
}

impl Session {
    /// A session for a new connection, reusing the allocations of a
    /// closed one when there is one (`spare`).
    pub fn new(
        key: usize,
        (stream, peer): (ClientStream, Peer),
        listener: Arc<str>,
        snap: Arc<Snapshot>,
        spare: Option<Spare>,
    ) -> Session {
        let spare = spare.unwrap_or_default();
        Session {
            key,
            stream,
            peer,
            listener,
            // Not readable until epoll says so: registering reports data that
            // is already there, and reading at once after accept() mostly
            // finds nothing yet (one EAGAIN per connection).
            rd: Readiness { readable: false, writable: true, read_closed: false },
            inb: None,
            out: spare.out,
            out_pos: 0,
            state: State::Head { started: None },
            req: Held(Some(spare.req)),
            ex: Held(Some(spare.ex)),
            timed: Timed::default(),
            requests: 0,
            snap,
            progressed: false,
            vars: spare.vars,
            accepted: Instant::now(),
            nodelay: false,
            write_blocked: false,
            write_interest: false,
            writes: 0,
            spare_proxy: spare.spare_proxy,
            log: None,
            parked: false,
            redirect_https: None,
        }
    }

    /// Idle between requests, holding nothing that a request needs: no
    /// input, no output, waiting for the next head.
    pub(super) fn parkable(&self) -> bool {
        !self.parked && matches!(self.state, State::Head { started: None }) && self.inb.is_none() && self.out.is_empty()
    }

    /// Hands the request's allocations back (see `parked`).
    pub(super) fn park(&mut self) -> Spare {
        self.parked = true;
        self.log = None;
        let mut sp = Spare {
            out: std::mem::take(&mut self.out),
            req: self.req.0.take().unwrap_or_default(),
            ex: self.ex.0.take().unwrap_or_default(),
            vars: std::mem::take(&mut self.vars),
            spare_proxy: self.spare_proxy.take(),
        };
        sp.req.clear();
        sp.ex.reset();
        sp.vars.clear();
        sp
    }

    /// Takes allocations for the next request (a pooled set, or new ones).
    pub(super) fn unpark(&mut self, sp: Option<Spare>) {
        self.parked = false;
        let sp = sp.unwrap_or_default();
        self.out = sp.out;
        self.req.0 = Some(sp.req);
        self.ex.0 = Some(sp.ex);
        self.vars = sp.vars;
        self.spare_proxy = sp.spare_proxy;
    }

    /// A request has started and its REQUEST_FINISH hooks have not run
    /// (never for a parked session).
    pub(super) fn finish_pending(&self) -> bool {
        self.ex.0.as_ref().is_some_and(|e| e.finish_pending)
    }

    /// The allocations of a closing session, for the next one (none for
    /// a parked session: they are in the pool already).
    pub(super) fn into_spare(self) -> Option<Spare> {
        self.into_parts().1
    }

    /// The socket of a session that moves to another process, and its
    /// allocations for the next session (see [`Session::into_spare`]).
    pub(super) fn into_parts(self) -> (ClientStream, Option<Spare>) {
        let (Some(req), Some(ex)) = (self.req.0, self.ex.0) else { return (self.stream, None) };
        let mut sp = Spare { out: self.out, req, ex, vars: self.vars, spare_proxy: self.spare_proxy };
        sp.out.clear();
        // The head, its normalised path, and where the scan of a head
        // still arriving stood.
        sp.req.clear();
        sp.ex.reset();
        sp.vars.clear();
        (self.stream, Some(sp))
    }

    pub(super) fn has_input(&self) -> bool {
        self.inb.as_ref().is_some_and(|b| !b.is_empty())
    }

    /// Bytes for the client are still to be written: from `out`, or TLS
    /// records the socket has not taken yet.
    pub(super) fn out_pending(&self) -> bool {
        self.out_pos < self.out.len() || self.stream.pending()
    }

    /// Sends TLS records the socket has not taken yet, while it is
    /// writable. An error means the client is gone.
    pub(super) fn flush_tls(&mut self) -> io::Result<()> {
        if self.stream.pending() && self.rd.writable && !self.stream.flush()? {
            self.rd.writable = false;
            self.write_blocked = true;
        }
        Ok(())
    }

    /// Writes `out` then `body` to the client until done or blocked;
    /// returns (all bytes written, body bytes written).
    pub(super) fn write_client(&mut self, body: &[u8]) -> io::Result<(usize, usize)> {
        self.write_client_then(body, false)
    }

    /// [`Session::write_client`]; `ends_response`: `out` and `body` end the
    /// final response. When the client asked for the connection to close
    /// after it, they are its last bytes, and the FIN leaves with them
    /// (`ClientStream::write_before_close`). Only then: a client that asked
    /// sends nothing more, so nothing unread can turn the close into a
    /// reset that would destroy bytes still held (a keep-alive client that
    /// the proxy closes may have pipelined another request).
    pub(super) fn write_client_then(&mut self, body: &[u8], ends_response: bool) -> io::Result<(usize, usize)> {
        let closes = ends_response && self.ex.client_closes;
        let mut total = 0;
        let mut written_body = 0;
        while self.rd.writable {
            let head = &self.out[self.out_pos..];
            let rest = &body[written_body..];
            if head.is_empty() && rest.is_empty() {
                self.flush_tls()?;
                break;
            }
            if self.writes > 0 && !self.nodelay {
                self.stream.set_nodelay();
                self.nodelay = true;
            }
            self.writes += 1;
            let r = if closes {
                self.stream.write_before_close(&[IoSlice::new(head), IoSlice::new(rest)])
            } else if head.is_empty() {
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
        metrics::add(&metrics::here().bytes_sent, total as u64);
        Ok((total, written_body))
    }

    /// A module answered at ACCEPT: one write of its response, then our
    /// side is shut (no request was read; the session is closed next).
    pub(super) fn answer_and_shut(&mut self, r: &Response) {
        let mut out = Vec::new();
        hw::module_response(&mut out, r.status, &r.headers, &r.body, ConnHeader::Close, false);
        if let Ok(n) = self.stream.write(&out) {
            metrics::add(&metrics::here().bytes_sent, n as u64);
        }
        self.stream.shutdown_write();
    }
}

/// The reusable allocations of a session (buffers of heads and output),
/// kept by the engine between connections so that accepting one costs no
/// allocation in the steady state.
#[derive(Debug, Default)]
pub struct Spare {
    out: Vec<u8>,
    req: Box<RequestHead>,
    ex: Box<Exchange>,
    vars: Vars,
    spare_proxy: Option<Box<Proxying>>,
}

/// Counts bytes read from a client (`read_into(..).inspect(count_received)`).
pub(super) fn count_received(n: &Option<usize>) {
    if let Some(n) = *n {
        metrics::add(&metrics::here().bytes_received, n as u64);
    }
}

/// Reads from `stream` into `buf`: `Ok(Some(n))` bytes (0 = EOF),
/// `Ok(None)` would block. A short read marks the socket drained, which is
/// safe with edge-triggered epoll because EPOLLRDHUP reports a close.
pub(super) fn read_into<S: Read>(stream: &mut S, rd: &mut Readiness, buf: &mut Buf) -> io::Result<Option<usize>> {
    read_at_most(stream, rd, buf, usize::MAX)
}

/// [`read_into`], reading at most `max` bytes.
pub(super) fn read_at_most<S: Read>(
    stream: &mut S,
    rd: &mut Readiness,
    buf: &mut Buf,
    max: usize,
) -> io::Result<Option<usize>> {
    let spare = buf.spare();
    let want = spare.len().min(max);
    let spare = &mut spare[..want];
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

impl Core {
    /// Moves everything that can move for session `s`, state after state.
    /// Returns `false` when the session is to be closed.
    pub fn drive(&mut self, s: &mut Session) -> bool {
        // TLS records queued when the socket was full (handshake answers,
        // the end of a response) go first.
        if s.flush_tls().is_err() {
            return false;
        }
        let mut state = std::mem::replace(&mut s.state, State::Closed);
        let alive = loop {
            let (next, step) = match state {
                State::Head { started } => self.step_head(s, started),
                State::Proxy(p) => self.step_proxy(s, p),
                State::Local { keep } => self.step_local(s, keep),
                State::Tunnel(t) => self.step_tunnel(s, t),
                State::Linger => self.step_linger(s),
                State::Closed => (State::Closed, Step::Close),
            };
            state = next;
            match step {
                Step::Again => {}
                Step::Blocked => break true,
                Step::Close => break false,
            }
        };
        s.state = state;
        if !alive {
            return false;
        }
        if s.stream.take_handshake_done() {
            self.tls.handshaking = self.tls.handshaking.saturating_sub(1);
            // The handshake deadline gives way to the request's.
            s.progressed = true;
        }
        if s.flush_tls().is_err() {
            return false;
        }
        if s.stream.pending() {
            s.write_blocked = true;
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

    /// The connection is answered with `Connection: close` from now on:
    /// the worker drains, or hands its connections to a new generation and
    /// this one cannot move (TLS state stays in its process).
    pub(super) fn closing(&self, s: &Session) -> bool {
        self.draining || (self.handing_over && s.stream.is_tls())
    }

    /// Sets the session's deadline for what its state waits on.
    fn rearm(&mut self, s: &mut Session) {
        let t = &s.snap.config.timeouts;
        let at = match &s.state {
            State::Head { started: Some(t0) } => *t0 + t.client_header,
            State::Head { started: None } if s.stream.handshaking() => s.accepted + t.tls_handshake,
            State::Head { started: None } if s.requests == 0 => self.now + t.client_header,
            State::Head { started: None } => self.now + t.keepalive_idle,
            // The connect deadline was set when connecting began.
            State::Proxy(p) if self.ups[p.up].connecting => return,
            State::Proxy(p) => self.now + self.proxy_wait(s, p),
            State::Local { .. } => self.now + t.client_write,
            State::Tunnel(_) => self.now + t.tunnel_idle,
            State::Linger | State::Closed => return,
        };
        self.timers.set(&mut s.timed, s.key, at);
    }

    /// A deadline passed. Returns `false` to close the session.
    pub fn timeout(&mut self, s: &mut Session) -> bool {
        let kind = match &s.state {
            State::Head { started: Some(_) } => Some(TimeoutKind::ClientHeader),
            State::Head { started: None } if s.requests == 0 => Some(TimeoutKind::ClientHeader),
            State::Head { started: None } => Some(TimeoutKind::KeepaliveIdle),
            State::Local { .. } => Some(TimeoutKind::ClientWrite),
            State::Tunnel(_) => Some(TimeoutKind::TunnelIdle),
            // Proxy counts its own (upstream or request body).
            State::Proxy(_) | State::Linger | State::Closed => None,
        };
        if let Some(k) = kind {
            metrics::here().timed_out(k);
        }
        let (next, step) = match std::mem::replace(&mut s.state, State::Closed) {
            State::Head { started: Some(_) } => {
                slog::debug!(self.conn_log(s), "client header timeout");
                s.ex.client_keep = false;
                s.ex.head_request = false;
                self.respond(s, 408)
            }
            State::Proxy(p) => self.proxy_timeout(s, p),
            State::Head { started: None } if s.stream.handshaking() => {
                self.tls.timed_out += 1;
                self.log_tls_refusal("handshake timeout", &s.peer);
                (State::Closed, Step::Close)
            }
            other => (other, Step::Close),
        };
        s.state = next;
        step != Step::Close && self.drive(s)
    }

    /// Gives up what the session's state holds (its backend connection,
    /// unpooled) when the session closes.
    pub(super) fn leave_state(&mut self, s: &mut Session) {
        match std::mem::replace(&mut s.state, State::Closed) {
            State::Proxy(p) => self.leave_proxy(s, p, false),
            State::Tunnel(t) => self.release_upstream(s, t.up, false),
            _ => {}
        }
    }
}

/// A per-request part of a session, in an allocation of its own that an
/// idle session hands to the engine's pool with the rest of its request's
/// allocations (see `Session::parked`): 8 bytes of an idle connection, not
/// the whole structure. Read as the value it holds; the engine takes a
/// parked session's parts back before it steps it or times it out
/// (`Engine::serve`), and closing or moving a parked session reads none,
/// so an empty one is never read (if it were, the panic is the session's,
/// caught and counted like any other).
#[derive(Debug)]
pub(super) struct Held<T>(pub(super) Option<Box<T>>);

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_deref().expect("a parked session's request state was read")
    }
}

impl<T> std::ops::DerefMut for Held<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_deref_mut().expect("a parked session's request state was written")
    }
}
