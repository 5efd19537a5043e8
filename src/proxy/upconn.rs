//! Connections to backends: choosing the backend of an attempt, taking an
//! idle pooled connection or connecting, and giving connections back to
//! their backend's pool (or closing them). The exchange that uses a
//! connection is in `forward`; a connection in use belongs to the
//! session state that holds its index (`Proxy`, then maybe `Tunnel`).
//!
//! A pooled connection stays registered for reads (like nginx's keep-alive
//! close handler): any readiness while it sits idle (a stray byte, a FIN,
//! an error) closes it at once, so taking it from the pool needs no
//! syscall, and a connection is only pooled when its readiness says
//! nothing is waiting to be read (with edge-triggered epoll, data that came
//! before the release would raise no new event).
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

use crate::shm::metrics;
use crate::upstream::Outcome;
use mio::Interest;

use crate::net::Readiness;
use crate::tls::BackendStream;

use super::core::{Core, UpConn};
use super::session::Session;
use super::timer::{Timed, Timers};
use super::token::{self, Kind};

impl Core {
    /// Picks a backend and connects to it (or takes a pooled connection):
    /// the connection's index. Connections that fail at once move on to
    /// the next backend. `Err`: the status to answer with when no backend
    /// can be had.
    pub(super) fn connect_upstream(&mut self, s: &mut Session) -> Result<usize, u16> {
        loop {
            self.pick_backend(s)?;
            if let Some(up) = self.open_backend(s)? {
                return Ok(up);
            }
        }
    }

    /// Chooses the backend for the next attempt (`s.ex.backend`), among
    /// those not tried yet, while the retry count allows.
    pub(super) fn pick_backend(&mut self, s: &mut Session) -> Result<(), u16> {
        let cluster = &s.snap.clusters[s.ex.cluster];
        if cluster.members.is_empty() {
            // Every backend is a DNS name that has no address now.
            return Err(503);
        }
        if s.ex.failed > cluster.retries {
            return Err(502);
        }
        let hash = cluster.request_hash(&s.req, s.peer);
        let Some(b) = cluster.pick(s.ex.tried, hash, crate::shm::now_ms()) else { return Err(502) };
        if b < 64 {
            s.ex.tried |= 1 << b;
        }
        s.ex.backend = b;
        // The request's logger names the backend: built anew if used.
        s.log = None;
        Ok(())
    }

    /// Takes a pooled connection to the chosen backend, or starts
    /// connecting to it: the connection's index. `Ok(None)`: the connect
    /// failed at once (the failure is counted; pick another backend).
    pub(super) fn open_backend(&mut self, s: &mut Session) -> Result<Option<usize>, u16> {
        let (_, sid) = token::decode(mio::Token(s.key));
        let cluster = &s.snap.clusters[s.ex.cluster];
        let id = cluster.members[s.ex.backend].id;
        let tls = s.snap.backend_tls.get(s.ex.cluster);
        let tls_id = tls.map_or(0, |c| c.id());
        // A pooled connection whose readiness was raised while idle (stray
        // bytes, a FIN) is dropped here in case its event has not been
        // handled yet. No read: the flags say it all.
        while let Some(&ui) = self.backends.get(id).idle.last() {
            if idle_usable(&self.ups[ui]) {
                break;
            }
            self.drop_idle(ui);
        }
        let backend = self.backends.get_mut(id);
        // The newest idle connection made with this cluster's TLS settings
        // (another cluster may name the same address with other settings).
        let pooled = backend.idle.iter().rposition(|&ui| self.ups[ui].tls_id == tls_id);
        if let Some(ui) = pooled.map(|i| backend.idle.remove(i)) {
            let u = &mut self.ups[ui];
            u.owner = Some(sid);
            u.reused = true;
            u.buf = Some(self.up_bufs.get());
            Timers::clear(&mut u.timed);
            backend.acquire(self.shared.place_counts(self.place));
            metrics::add(&metrics::here().upstream_reuses, 1);
            return Ok(Some(ui));
        }
        match BackendStream::connect(&backend.addr, tls) {
            Ok(stream) => {
                metrics::add(&metrics::here().upstream_connects, 1);
                let entry = self.ups.vacant_entry();
                let key = token::token(Kind::Upstream, entry.key()).0;
                let mut u = UpConn {
                    key,
                    stream,
                    tls_id,
                    rd: Readiness::default(),
                    buf: Some(self.up_bufs.get()),
                    connecting: true,
                    owner: Some(sid),
                    backend: id,
                    reused: false,
                    timed: Timed::default(),
                };
                if let Err(e) =
                    self.registry.register(&mut u.stream, mio::Token(key), Interest::READABLE | Interest::WRITABLE)
                {
                    slog::error!(self.log, "cannot register upstream socket"; "error" => %e);
                    if let Some(b) = u.buf.take() {
                        self.up_bufs.put(b);
                    }
                    return Err(502);
                }
                let up = entry.key();
                entry.insert(u);
                backend.acquire(self.shared.place_counts(self.place));
                let at = self.now + s.snap.config.timeouts.upstream_connect;
                self.timers.set(&mut s.timed, s.key, at);
                Ok(Some(up))
            }
            Err(e) => {
                s.ex.failed += 1;
                slog::warn!(self.req_log(s), "connect to backend failed"; "error" => %e);
                self.record_outcome(s, Outcome::ConnectError);
                Ok(None)
            }
        }
    }

    /// Feeds passive failure detection with the outcome of the exchange on
    /// the current backend; logs an ejection.
    pub(super) fn record_outcome(&mut self, s: &Session, outcome: Outcome) {
        let cluster = &s.snap.clusters[s.ex.cluster];
        if let Some(d) = cluster.record(s.ex.backend, outcome, crate::shm::now_ms()) {
            let id = cluster.members[s.ex.backend].id;
            slog::warn!(self.log, "backend ejected (passive detection)"; "backend" => %self.backends.get(id).addr,
                "cluster" => &cluster.name, "for_ms" => d.as_millis() as u64, "last" => ?outcome);
        }
    }

    /// Gives up the upstream connection `ui` that session `s` used: back
    /// to its backend's pool when `reusable`, else closed.
    pub(super) fn release_upstream(&mut self, s: &Session, ui: usize, reusable: bool) {
        let u = &mut self.ups[ui];
        let be = self.backends.get_mut(u.backend);
        be.release(self.shared.place_counts(self.place));
        if let Some(buf) = u.buf.take() {
            let clean = buf.is_empty();
            self.up_bufs.put(buf);
            // Bytes after the response (`!clean`), or readiness that says
            // some may be waiting unread (`readable`: the last read filled
            // the buffer, or an event came after it), make the connection
            // unfit: they would be taken for the next request's response.
            // (The cluster is looked up last: a tunnel handed over from an
            // old generation has no exchange, and is never reusable.)
            if reusable
                && clean
                && idle_usable(u)
                && !be.retired
                && be.idle.len() < s.snap.clusters[s.ex.cluster].keepalive
            {
                let cluster = &s.snap.clusters[s.ex.cluster];
                u.owner = None;
                u.reused = false;
                be.idle.push(ui);
                let at = self.now + cluster.keepalive_timeout;
                self.timers.set(&mut u.timed, u.key, at);
                return;
            }
        }
        self.close_upstream(ui);
    }

    /// Closes the backend connections still owned by session `sid` after
    /// it was closed (a step that panicked held them): the backend's
    /// counters are released too.
    pub(super) fn release_orphans(&mut self, sid: usize) {
        let owned: Vec<usize> = self.ups.iter().filter(|(_, u)| u.owner == Some(sid)).map(|(i, _)| i).collect();
        for ui in owned {
            self.backends.get_mut(self.ups[ui].backend).release(self.shared.place_counts(self.place));
            self.close_upstream(ui);
        }
    }

    /// Closes an upstream connection and forgets it (over TLS with a
    /// close_notify, when the socket takes it).
    pub(super) fn close_upstream(&mut self, ui: usize) {
        if self.ups.contains(ui) {
            let mut u = self.ups.remove(ui);
            if !u.connecting {
                u.stream.close_notify();
            }
            if let Some(buf) = u.buf.take() {
                self.up_bufs.put(buf);
            }
            // Closing the fd removes it from the epoll set; deregistering
            // first would only cost a syscall.
        }
    }

    /// An event on a pooled, idle connection. Readable (unasked bytes),
    /// closed or failed: it is no longer usable and is closed. A writable
    /// edge alone changes nothing.
    pub(super) fn idle_upstream_event(&mut self, ui: usize) {
        if !idle_usable(&self.ups[ui]) {
            slog::debug!(self.log, "pooled backend connection became readable; closing it";
                "backend" => %self.backends.get(self.ups[ui].backend).addr, "closed" => self.ups[ui].rd.read_closed);
            self.drop_idle(ui);
        }
    }

    /// Removes an idle connection from its pool and closes it.
    pub(super) fn drop_idle(&mut self, ui: usize) {
        let be = self.backends.get_mut(self.ups[ui].backend);
        if let Some(pos) = be.idle.iter().position(|&x| x == ui) {
            be.idle.swap_remove(pos);
        }
        self.close_upstream(ui);
    }
}

/// Nothing may be waiting to be read on the connection and it is not
/// closed, as far as its edge-triggered readiness tells: `readable` is
/// cleared only by a read that found the socket drained, and set again by
/// any event (data, FIN, error).
fn idle_usable(u: &UpConn) -> bool {
    !u.rd.readable && !u.rd.read_closed
}
