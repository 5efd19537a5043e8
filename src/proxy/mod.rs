//! The proxy: everything that happens to a client connection and its
//! requests on one worker's event loop, from the accepted socket to the
//! closed one. The worker (`crate::worker`) owns the process around it:
//! polling, accepting, the channel to the master; it hands this layer
//! accepted sockets, readiness events and the passing of time.
//!
//! Must not: import `worker`, block, or know about processes and signals.
//!
//! Read it top-down, in this order:
//!
//! 1. this file: [`Engine`], the entry points the worker calls
//!    ([`Engine::open`], [`Engine::client_event`], [`Engine::upstream_event`],
//!    [`Engine::run_timers`], reconfiguration, drain, load samples).
//! 2. `state`: the states of a connection (`State`: `Head`, `Proxy`,
//!    `Local`, `Tunnel`, `Linger`), the data each owns, the diagram of
//!    their transitions.
//! 3. `session`: a client connection and `drive`, which runs state steps.
//! 4. `request`: `Head` (read and parse a head, route it, choose and open
//!    a backend), `Local` (a response Pitcher or a module made), the end
//!    of an exchange, `Linger`.
//! 5. `forward`: `Proxy`: the request up, the response down, failures
//!    turned into a retry, a 502/504 or a close.
//! 6. `tunnel`: `Tunnel`, after a 101.
//! 7. `upconn`: backend connections: pick, pool, connect, release.
//! 8. `hooks`: the calls into the module pipeline (one function runs a
//!    point's modules); `handover`: a connection leaving for (or arriving
//!    from) another generation on a binary upgrade.
//! 9. What the steps share: `core` (`Core`, [`Snapshot`], `UpConn`),
//!    `exchange` (the record of the current request, body framing),
//!    `keys` (the request's logger), `guard` (a panic closes one
//!    connection, not the worker), `timer` (deadlines), `token` (how an
//!    event names its owner).
//!
//! Files point one way: `token`, `timer`, `exchange`, `guard` import nothing of
//! this layer; `state` and `core` import only those; `session` imports
//! them; the step files (`request`, `forward`, `tunnel`, `upconn`,
//! `hooks`, `keys`, `handover`) import `session` and below, never each
//! other; this file sits on top.

mod actions;
mod core;
mod exchange;
mod forward;
mod guard;
mod handover;
mod hooks;
mod keys;
mod request;
mod session;
mod splice;
mod state;
mod timer;
pub mod token;
mod tunnel;
mod upconn;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Interest, Registry};
use rustls::ServerConfig;
use slab::Slab;
use slog::Logger;

use crate::buffer::BufPool;
use crate::channel::HandedConn;
use crate::config::Config;
use crate::hooks::modules::{Controller, DegradeSettings};
use crate::hooks::Verdict;
use crate::net::{Peer, Stream};
use crate::shm::{metrics, Shared};
use crate::tls::{ClientStream, TlsMaterial};
use crate::upstream::{Backends, SlotTable};

pub use self::core::Snapshot;
use self::core::{Core, TlsCounts};
pub use self::guard::install_panic_hook;
use self::guard::{guarded, Panic};
pub use self::handover::Detached;
use self::session::{Session, Spare};
use self::state::State;
use self::timer::Timers;
use self::token::Kind;

/// Free buffers (and closed sessions' allocations) kept for reuse.
const POOLED_BUFFERS: usize = 1024;
/// Smallest read buffer of a client connection.
const MIN_BUFFER: usize = 16 * 1024;
/// Smallest read buffer of an upstream connection.
const UPSTREAM_BUFFER: usize = 64 * 1024;

/// The listener a connection was accepted on, as the engine needs it.
#[derive(Debug)]
pub struct AcceptedOn<'a> {
    /// The listener's manifest name (kept by the session, for a hand-over).
    pub name: &'a Arc<str>,
    /// Its TLS configuration, `None` for cleartext.
    pub tls: Option<&'a Arc<ServerConfig>>,
    /// The listener answers every request with a redirect to https on
    /// this port.
    pub redirect_https: Option<u16>,
}

/// A configuration snapshot that [`Engine::reconfigure`] replaced: requests
/// still in flight on it keep it alive; dropping this is the engine's last
/// hold on it.
#[must_use = "dropping it frees the old configuration at once"]
pub struct Retired {
    _snapshot: Arc<core::Snapshot>,
}

/// The proxy of one worker: its client sessions, and the `Core` they
/// share (upstream connections, timers, buffers, the current snapshot).
pub struct Engine {
    sessions: Slab<Session>,
    core: Core,
    /// Allocations of closed sessions, for new ones.
    spares: Vec<Spare>,
    /// Connections closed because handling them panicked.
    panics: u64,
}

impl Engine {
    /// An engine serving `config`. `registry` is the worker's poll
    /// registry; `place` its index in the shared per-worker tables.
    pub fn new(
        registry: Registry,
        config: Arc<Config>,
        tls: &TlsMaterial,
        mut slots: SlotTable,
        place: usize,
        log: Logger,
    ) -> Result<Engine, String> {
        let buf_size = config.limits.max_header_bytes.max(MIN_BUFFER);
        let mut backends = Backends::default();
        let degrade = DegradeSettings::from_config(&config).map(Controller::new);
        let tls_sessions = crate::tls::backend::session_cache();
        let snapshot = Snapshot::build(config, tls, &tls_sessions, &mut backends, &mut slots, &log)?;
        let shared = slots.shared();
        Ok(Engine {
            sessions: Slab::with_capacity(1024),
            core: Core {
                registry,
                ups: Slab::with_capacity(1024),
                current: ArcSwap::from_pointee(snapshot),
                backends,
                slots,
                shared,
                load_level: 0,
                degrade,
                id_seed: crate::upstream::hash64(&(std::process::id(), std::time::SystemTime::now())),
                id_seq: 0,
                split_seq: 0,
                place,
                timers: Timers::default(),
                bufs: BufPool::new(buf_size, POOLED_BUFFERS),
                up_bufs: BufPool::new(buf_size.max(UPSTREAM_BUFFER), POOLED_BUFFERS),
                pipes: splice::Pipes::default(),
                now: Instant::now(),
                log,
                draining: false,
                handing_over: false,
                slow_bodies: 0,
                slow_bodies_logged: Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
                tls: TlsCounts::default(),
                tls_sessions,
            },
            spares: Vec::new(),
            panics: 0,
        })
    }

    /// The configuration new requests are served with.
    pub fn current(&self) -> Arc<Snapshot> {
        self.core.current.load_full()
    }

    /// The shared region.
    pub fn shared(&self) -> &'static Shared {
        self.core.shared
    }

    /// Open client connections.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Requests in flight (started, REQUEST_FINISH not run yet).
    pub fn in_flight(&self) -> u32 {
        self.sessions.iter().filter(|(_, s)| s.finish_pending()).count() as u32
    }

    /// The loop's clock: set once per turn, read by every step.
    pub fn set_now(&mut self, now: Instant) {
        self.core.now = now;
    }

    /// The loop's clock as the engine last set it (after the timers ran).
    pub fn now(&self) -> Instant {
        self.core.now
    }

    /// Time until the next deadline is due.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.core.timers.next_timeout(now)
    }

    /// Modules want their tick (or the overload controller its samples).
    pub fn ticking(&self) -> bool {
        self.core.degrade.is_some() || !self.core.current.load().modules.loaded.is_empty()
    }

    /// A connection was accepted: a session for it, its header deadline,
    /// and the ACCEPT point (whose modules may answer or close it).
    /// `on`: the listener it came from. A TLS connection over `[limits]
    /// max_tls_handshakes` handshakes in progress is closed at once
    /// (counted and logged).
    pub fn open(&mut self, stream: Stream, peer: Peer, on: &AcceptedOn<'_>, snap: &Arc<Snapshot>) {
        let timeouts = &snap.config.timeouts;
        let (mut stream, deadline) = match on.tls {
            None => (ClientStream::Plain(stream), timeouts.client_header),
            Some(_) if self.core.tls.handshaking >= snap.config.limits.max_tls_handshakes => {
                self.core.tls.refused += 1;
                self.core.log_tls_refusal("max_tls_handshakes reached", &peer);
                return;
            }
            Some(config) => match ClientStream::tls(stream, config) {
                Ok(s) => (s, timeouts.tls_handshake),
                Err(e) => {
                    slog::error!(self.core.log, "cannot start a TLS connection"; "error" => %e);
                    return;
                }
            },
        };
        let entry = self.sessions.vacant_entry();
        let idx = entry.key();
        let key = token::token(Kind::Client, idx);
        if let Err(e) = self.core.registry.register(&mut stream, key, Interest::READABLE) {
            slog::error!(self.core.log, "cannot register client socket"; "error" => %e);
            return;
        }
        metrics::add(&metrics::here().accepted, 1);
        let spare = self.spares.pop();
        if stream.handshaking() {
            self.core.tls.handshaking += 1;
        }
        let s = entry.insert(Session::new(key.0, (stream, peer), on.name.clone(), snap.clone(), spare));
        s.redirect_https = on.redirect_https;
        let at = self.core.now + deadline;
        self.core.timers.set(&mut s.timed, key.0, at);
        let core = &mut self.core;
        match guarded(|| core.hook_accept(s)) {
            Err(p) => self.session_panicked(idx, p),
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Respond(r)) => {
                s.answer_and_shut(&r);
                self.close(idx);
            }
            Ok(Verdict::Close) => self.close(idx),
        }
    }

    /// Readiness of a client socket. An idle connection takes its
    /// request's allocations back from the pool first, and gives them back
    /// when it is idle again.
    pub fn client_event(&mut self, idx: usize, ev: &mio::event::Event) {
        self.serve(idx, |core, s| {
            s.rd.update(ev);
            core.drive(s)
        });
        self.park_if_idle(idx);
    }

    /// Session `idx` waits for its next request with nothing in hand: its
    /// request's allocations go back to the pool.
    fn park_if_idle(&mut self, idx: usize) {
        if let Some(s) = self.sessions.get_mut(idx).filter(|s| s.parkable()) {
            let sp = s.park();
            if self.spares.len() < POOLED_BUFFERS && !self.core.handing_over {
                self.spares.push(sp);
            }
        }
    }

    /// Readiness of a backend connection: its session's, or a pooled one's.
    pub fn upstream_event(&mut self, idx: usize, ev: &mio::event::Event) {
        let Some(u) = self.core.ups.get_mut(idx) else { return };
        u.rd.update(ev);
        match u.owner {
            Some(sid) => {
                self.serve(sid, |core, s| core.drive(s));
                self.park_if_idle(sid);
            }
            None => self.core.idle_upstream_event(idx),
        }
    }

    /// Handles every deadline that is due.
    pub fn run_timers(&mut self) {
        let now = Instant::now();
        self.core.now = now;
        while let Some((at, key)) = self.core.timers.pop_due(now) {
            match token::decode(mio::Token(key)) {
                (Kind::Client, idx) => {
                    let Some(s) = self.sessions.get_mut(idx) else { continue };
                    if s.key != key || !self.core.timers.fired(&mut s.timed, key, at, now) {
                        continue;
                    }
                    self.serve(idx, |core, s| core.timeout(s));
                }
                (Kind::Upstream, idx) => {
                    let Some(u) = self.core.ups.get_mut(idx) else { continue };
                    if u.owner.is_some() || !self.core.timers.fired(&mut u.timed, key, at, now) {
                        continue;
                    }
                    self.core.drop_idle(idx);
                }
                _ => {}
            }
        }
    }

    /// Runs `f` (state steps, a timeout) on session `idx`, a parked one
    /// first taking its request's allocations back from the pool; closes
    /// the session when `f` says so, or when it panics.
    fn serve(&mut self, idx: usize, f: impl FnOnce(&mut Core, &mut Session) -> bool) {
        let Some(s) = self.sessions.get_mut(idx) else { return };
        if s.parked {
            s.unpark(self.spares.pop());
        }
        let core = &mut self.core;
        match guarded(|| f(core, s)) {
            Ok(true) => {}
            Ok(false) => self.close(idx),
            Err(p) => self.session_panicked(idx, p),
        }
    }

    /// Handling session `idx` panicked: it is logged with its message and
    /// place, counted, and the connection closed, with the backend
    /// connection it owned and the backend's counters. A step that panics
    /// owned the session's state, which is gone with its stack: the backend
    /// connection is found by its owner. The session may be half-updated,
    /// so a panic while closing it drops it as it is.
    fn session_panicked(&mut self, idx: usize, p: Panic) {
        self.panics += 1;
        metrics::add(&metrics::here().panics, 1);
        let peer = self.sessions.get(idx).map(|s| format!("{:?}", s.peer)).unwrap_or_default();
        slog::error!(self.core.log, "panic while handling a connection; closing it"; "panic" => %p.message,
            "location" => %p.location, "peer" => peer, "panics_total" => self.panics);
        if let Some(s) = self.sessions.get_mut(idx) {
            if s.finish_pending() {
                s.ex.status = 500;
            }
        }
        if let Err(p) = guarded(|| self.close(idx)) {
            slog::error!(self.core.log, "panic while closing a connection after a panic"; "panic" => %p.message,
                "location" => %p.location);
            if self.sessions.contains(idx) {
                let stream = &mut self.sessions[idx].stream;
                if stream.handshaking() || stream.take_handshake_done() {
                    self.core.tls.handshaking = self.core.tls.handshaking.saturating_sub(1);
                }
                drop(self.sessions.remove(idx));
            }
        }
        self.core.release_orphans(idx);
    }

    /// Closes a session: REQUEST_FINISH (if owed) and FINISH, its backend
    /// connection closed, its allocations kept for the next one.
    fn close(&mut self, idx: usize) {
        if !self.sessions.contains(idx) {
            return;
        }
        // A parked session is closed as it is: no request is owed its
        // hooks, and FINISH modules see only the connection.
        let mut s = self.sessions.remove(idx);
        if s.stream.handshaking() || s.stream.take_handshake_done() {
            self.core.tls.handshaking = self.core.tls.handshaking.saturating_sub(1);
        } else if s.stream.is_tls() {
            // close_notify, if the socket takes it now.
            s.stream.shutdown_write();
        }
        if s.finish_pending() && s.ex.status == 0 {
            s.ex.status = 499; // The client went away before a response (nginx's 499).
        }
        let core = &mut self.core;
        if let Err(p) = guarded(|| core.hook_finish(&mut s)) {
            self.panics += 1;
            slog::error!(self.core.log, "panic in the finish hooks of a connection"; "panic" => %p.message,
                "location" => %p.location, "panics_total" => self.panics);
        }
        self.core.leave_state(&mut s);
        if let Some(b) = s.inb.take() {
            self.core.bufs.put(b);
        }
        // Dropping the stream closes the fd, which also removes it from the
        // epoll set; the session's allocations serve the next connection.
        if self.spares.len() < POOLED_BUFFERS && !self.core.handing_over {
            self.spares.extend(s.into_spare());
        }
    }

    /// Answer with `Connection: close` from now on, and keep no connection.
    pub fn start_drain(&mut self) {
        self.core.draining = true;
    }

    /// Binary upgrade: connections stay alive (no `Connection: close`)
    /// and leave through [`Engine::take_movable`] as soon as they can move.
    pub fn start_handover(&mut self) {
        self.core.handing_over = true;
        // Buffers freed from now on go back to the kernel, not to a pool:
        // the next generation is taking the load, and the peak memory of
        // an upgrade is both generations' at once.
        self.core.bufs.release();
        self.core.up_bufs.release();
        self.spares = Vec::new();
    }

    /// The hand-over cannot go on (the master is gone): drain instead.
    pub fn stop_handover(&mut self) {
        self.core.handing_over = false;
        self.core.draining = true;
    }

    /// While handing over: every session that can move now (idle between
    /// requests with nothing buffered, or a tunnel with empty buffers),
    /// taken out of the engine with its sockets.
    pub fn take_movable(&mut self) -> Vec<Detached> {
        if !self.core.handing_over {
            return Vec::new();
        }
        let ids: Vec<usize> = self.sessions.iter().filter(|(_, s)| self.core.movable(s)).map(|(i, _)| i).collect();
        let mut out = Vec::with_capacity(ids.len());
        for idx in ids {
            // (Its allocations are freed, not pooled: the worker is
            // handing its load over.)
            out.push(self.core.detach(self.sessions.remove(idx)));
        }
        out
    }

    /// Serves a connection a worker of another generation handed over
    /// (see [`Detached`]): `fds` are its client socket and, for a tunnel,
    /// the backend's.
    pub fn adopt(&mut self, h: &HandedConn, fds: (OwnedFd, Option<OwnedFd>)) -> std::io::Result<()> {
        let snap = self.current();
        let entry = self.sessions.vacant_entry();
        let key = token::token(Kind::Client, entry.key()).0;
        let spare = self.spares.pop();
        let s = self.core.adopt(key, h, fds, snap, spare)?;
        entry.insert(s);
        Ok(())
    }

    /// The backend slots of a new configuration (sent with it).
    pub fn set_slots(&mut self, backend_slots: &[(String, u32)]) {
        self.core.slots = SlotTable::from_entries(self.core.shared, backend_slots);
    }

    /// Serves new requests with `config`; requests in flight keep the
    /// snapshot they have. Idle connections to backends no cluster names
    /// any more are closed.
    ///
    /// Returns the snapshot it replaced, which the caller drops when it
    /// suits it (after confirming to the master): freeing the routes and
    /// clusters of a large configuration is no part of applying the new one.
    pub fn reconfigure(&mut self, config: Arc<Config>, tls: &TlsMaterial) -> Result<Retired, String> {
        let core = &mut self.core;
        let buf_size = config.limits.max_header_bytes.max(MIN_BUFFER);
        if buf_size != core.bufs.size() {
            core.bufs = BufPool::new(buf_size, POOLED_BUFFERS);
            core.up_bufs = BufPool::new(buf_size.max(UPSTREAM_BUFFER), POOLED_BUFFERS);
        }
        match DegradeSettings::from_config(&config) {
            Some(d) => match core.degrade.as_mut() {
                Some(c) => c.update(d),
                None => core.degrade = Some(Controller::new(d)),
            },
            None => {
                core.degrade = None;
                if core.load_level != 0 {
                    core.set_load_level(0, 0, 0);
                }
            }
        }
        let snapshot =
            Arc::new(Snapshot::build(config, tls, &core.tls_sessions, &mut core.backends, &mut core.slots, &core.log)?);
        let old = core.current.swap(snapshot.clone());
        // Connections between requests move to the new snapshot now: each
        // would otherwise keep the one its last request started with until
        // its next request, and idle keep-alive connections that span many
        // reloads would keep as many old configurations alive.
        for (_, s) in self.sessions.iter_mut() {
            if matches!(s.state, State::Head { .. }) && !s.finish_pending() {
                s.snap = snapshot.clone();
            }
        }
        let retired: Vec<usize> = core
            .ups
            .iter()
            .filter(|(_, u)| u.owner.is_none() && core.backends.get(u.backend).retired)
            .map(|(i, _)| i)
            .collect();
        for ui in retired {
            core.drop_idle(ui);
        }
        Ok(Retired { _snapshot: old })
    }

    /// Publishes the gauges of this worker (open connections, idle pooled
    /// connections by backend) in its block of the shared region. Places
    /// that share a block publish none (a gauge cannot be shared).
    pub fn publish_gauges(&self) {
        let place = self.core.place;
        if place >= metrics::METRIC_BLOCKS {
            return;
        }
        metrics::here().active.store(self.sessions.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let Some(row) = self.core.shared.place_counts(place) else { return };
        for b in self.core.backends.iter() {
            if let Some(g) = b.slot.and_then(|n| row.backend_idle.get(n as usize)) {
                let n = b.idle.len() as u32;
                if g.load(std::sync::atomic::Ordering::Relaxed) != n {
                    g.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// A load sample of the worker (every 100 ms): the overload controller
    /// may change the level.
    pub fn load_sample(&mut self, now: Instant, busy_percent: u32, in_flight: u32) {
        let Some(c) = self.core.degrade.as_mut() else { return };
        if let Some(level) = c.sample(now, busy_percent, in_flight) {
            self.core.set_load_level(level, busy_percent, in_flight);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The layer below the worker must not reach back up into it.
    #[test]
    fn no_file_of_the_proxy_layer_imports_the_worker() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/proxy");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            files += 1;
            // Code lines (not comments) before any test module.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for bad in ["crate::worker", "super::super"] {
                    assert!(!line.contains(bad), "{}: {line}", path.display());
                }
            }
        }
        assert!(files >= 10, "read {files} files of {dir}");
    }
}
