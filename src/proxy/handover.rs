//! Moving a client connection to another process on a binary upgrade: which
//! sessions can move (idle between requests with nothing read or left to
//! write, or a tunnel whose buffers are both empty), taking one apart into
//! its sockets and the little state that rebuilds it ([`Detached`]), and
//! rebuilding one that a worker of another generation handed over.
//!
//! It is one connection throughout: FINISH does not run on the side that
//! gives it away, ACCEPT does not run on the side that takes it. A tunnel's
//! 101 exchange ends (REQUEST_FINISH) where it was proxied.
//!
//! Must not: know where the connection goes (the worker and the masters
//! route it), or read from a socket (bytes that arrive meanwhile wait in
//! the kernel, and registering the socket in the new process reports them).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use mio::{Interest, Token};

use crate::channel::{HandedConn, HandedTunnel};
use crate::config::{BackendAddr, SockAddr};
use crate::net::{Readiness, Stream};
use crate::tls::BackendStream;

use super::core::{Core, Snapshot, UpConn};
use super::guard::guarded;
use super::session::{Session, Spare};
use super::state::{State, Tunnel};
use super::timer::Timed;
use super::token::{self, Kind};

/// A connection taken apart to move to another process.
#[derive(Debug)]
pub struct Detached {
    /// What the next worker needs besides the sockets.
    pub state: HandedConn,
    /// The client socket.
    pub client: OwnedFd,
    /// A tunnel's backend socket.
    pub upstream: Option<OwnedFd>,
}

impl Detached {
    /// The fds in the order a hand-over message carries them.
    pub fn raw_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(self.client.as_raw_fd()).chain(self.upstream.as_ref().map(AsRawFd::as_raw_fd))
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl Core {
    /// Whether session `s` can move now.
    pub(super) fn movable(&self, s: &Session) -> bool {
        // TLS state cannot move between processes: a TLS connection
        // drains on its worker (`Connection: close`, then close_notify).
        if s.has_input() || s.out_pending() || s.stream.is_tls() {
            return false;
        }
        match &s.state {
            State::Head { started: None } => !s.finish_pending(),
            // A tunnel over TLS to its backend drains like a TLS client.
            State::Tunnel(t) => self
                .ups
                .get(t.up)
                .is_some_and(|u| !u.connecting && !u.stream.is_tls() && u.buf.as_ref().is_none_or(|b| b.is_empty())),
            _ => false,
        }
    }

    /// Takes session `s` (already out of the slab) apart: its sockets
    /// leave the poller, a tunnel's backend connection leaves the backend's
    /// counts, buffers go back to the pools. Returns the connection.
    pub(super) fn detach(&mut self, mut s: Session) -> Detached {
        let _ = self.registry.deregister(&mut s.stream);
        let idle = s.timed.deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(self.now));
        let mut tunnel = None;
        let mut upstream = None;
        if let State::Tunnel(t) = std::mem::replace(&mut s.state, State::Closed) {
            if let Err(p) = guarded(|| self.hook_request_finish(&mut s)) {
                slog::error!(self.log, "panic in the request-finish hooks of a tunnel handed over"; "panic" => %p.message,
                    "location" => %p.location);
            }
            let mut u = self.ups.remove(t.up);
            let _ = self.registry.deregister(&mut u.stream);
            let be = self.backends.get_mut(u.backend);
            be.release(self.shared.place_counts(self.place));
            if let Some(b) = u.buf.take() {
                self.up_bufs.put(b);
            }
            tunnel = Some(HandedTunnel {
                backend: be.addr.to_string(),
                resp_eof: t.resp_eof,
                client_eof: t.client_eof,
                client_shut: t.client_shut,
                up_shut: t.up_shut,
            });
            upstream = Some(u.stream.into_socket().into_fd());
        }
        if let Some(b) = s.inb.take() {
            self.bufs.put(b);
        }
        let state = HandedConn {
            listener: s.listener.to_string(),
            requests: s.requests,
            idle_ms: idle.as_millis().try_into().unwrap_or(u64::MAX),
            tunnel,
        };
        let (stream, _) = s.into_parts();
        Detached { state, client: stream.into_socket().into_fd(), upstream }
    }

    /// Rebuilds a connection handed over by a worker of another
    /// generation as the session of token `key`: idle between requests
    /// (its idle deadline carried over), or a tunnel with its backend
    /// connection and half-close state.
    pub(super) fn adopt(
        &mut self,
        key: usize,
        h: &HandedConn,
        (client, upstream): (OwnedFd, Option<OwnedFd>),
        snap: Arc<Snapshot>,
        spare: Option<Spare>,
    ) -> io::Result<Session> {
        let (mut stream, peer) = Stream::from_handed(client)?;
        let (_, sid) = token::decode(Token(key));
        self.registry.register(&mut stream, Token(key), Interest::READABLE)?;
        let state = match (&h.tunnel, upstream) {
            (None, None) => Ok(State::Head { started: None }),
            (Some(t), Some(fd)) => self.adopt_upstream(sid, t, fd).map(State::Tunnel),
            _ => Err(invalid("a tunnel needs exactly its backend's fd".into())),
        };
        let state = match state {
            Ok(st) => st,
            Err(e) => {
                let _ = self.registry.deregister(&mut stream);
                return Err(e);
            }
        };
        let stream = crate::tls::ClientStream::Plain(stream);
        let mut s = Session::new(key, (stream, peer), Arc::from(h.listener.as_str()), snap, spare);
        s.requests = h.requests;
        // The first exchange's end set TCP_NODELAY; it moved with the socket.
        s.nodelay = h.requests > 0;
        s.state = state;
        let at = self.now + Duration::from_millis(h.idle_ms);
        self.timers.set(&mut s.timed, key, at);
        Ok(s)
    }

    /// A tunnel's backend connection, handed over: registered, counted
    /// against its backend, owned by session `sid`.
    fn adopt_upstream(&mut self, sid: usize, t: &HandedTunnel, fd: OwnedFd) -> io::Result<Tunnel> {
        let addr = SockAddr::parse(&t.backend).map_err(invalid)?;
        let (stream, _) = Stream::from_handed(fd)?;
        let id = self.backends.id_for(&BackendAddr(addr), &mut self.slots);
        let entry = self.ups.vacant_entry();
        let key = token::token(Kind::Upstream, entry.key()).0;
        let mut u = UpConn {
            key,
            stream: BackendStream::Plain(stream),
            tls_id: 0,
            rd: Readiness { readable: false, writable: true, read_closed: false },
            buf: Some(self.up_bufs.get()),
            connecting: false,
            owner: Some(sid),
            backend: id,
            reused: false,
            timed: Timed::default(),
        };
        if let Err(e) = self.registry.register(&mut u.stream, Token(key), Interest::READABLE | Interest::WRITABLE) {
            if let Some(b) = u.buf.take() {
                self.up_bufs.put(b);
            }
            return Err(e);
        }
        let up = entry.key();
        entry.insert(u);
        self.backends.get_mut(id).acquire(self.shared.place_counts(self.place));
        Ok(Tunnel {
            up,
            resp_eof: t.resp_eof,
            client_eof: t.client_eof,
            client_shut: t.client_shut,
            up_shut: t.up_shut,
        })
    }
}
