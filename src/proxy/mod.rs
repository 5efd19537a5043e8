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
//! 1. this file: [`Engine`] (the sessions, the upstream connections and
//!    what they share, [`Core`]) and the entry points the worker calls:
//!    [`Engine::open`], [`Engine::client_event`], [`Engine::upstream_event`],
//!    [`Engine::run_timers`]; the configuration [`Snapshot`].
//! 2. `session`: a client connection and its [`State`] enum, one variant
//!    per state with the data valid in it; `drive` runs the transitions.
//! 3. `request`: the `Head` state (read and parse a head, route it, choose
//!    a backend), answering locally (`Local`), the end of an exchange and
//!    `Linger`.
//! 4. `forward`: the `Proxy` state: the request up, the response down,
//!    failures turned into a retry, a 502/504 or a close.
//! 5. `tunnel`: the `Tunnel` state after a 101.
//! 6. `upconn`: backend connections: pick, pool, connect, release.
//! 7. `hooks`: the calls into the module pipeline (one function runs a
//!    point's modules).
//! 8. `keys`: the request-scoped logger; `timer`: the deadlines; `token`:
//!    how an event names its owner.

mod forward;
mod hooks;
mod keys;
mod request;
mod session;
mod timer;
pub mod token;
mod tunnel;
mod upconn;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Interest, Registry};
use slab::Slab;
use slog::Logger;

use crate::buffer::BufPool;
use crate::config::Config;
use crate::hooks::modules::{Controller, DegradeSettings};
use crate::hooks::{Modules, Verdict};
use crate::net::{Peer, Stream};
use crate::router::Router;
use crate::shm::Shared;
use crate::upstream::{Backends, Cluster, SlotTable};

use session::Spare;
pub use session::{Session, State};
use timer::Timers;
use token::Kind;
pub use upconn::UpConn;

/// Free buffers (and closed sessions' allocations) kept for reuse.
const POOLED_BUFFERS: usize = 1024;
/// Smallest read buffer of a client connection.
const MIN_BUFFER: usize = 16 * 1024;
/// Smallest read buffer of an upstream connection.
const UPSTREAM_BUFFER: usize = 64 * 1024;

/// The configuration-derived state requests are served with. Immutable
/// once built (balancing counters are relaxed atomics); a reload builds a new one
/// and swaps the pointer. A session holds the snapshot its current request
/// started with, so requests in flight finish on it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub clusters: Vec<Cluster>,
    /// The enabled modules and their pipelines.
    pub modules: Modules,
}

impl Snapshot {
    /// Builds a snapshot, giving its backends ids in the worker's table.
    pub fn build(
        config: Arc<Config>,
        backends: &mut Backends,
        slots: &mut SlotTable,
        log: &Logger,
    ) -> Result<Snapshot, String> {
        let modules = Modules::build(&config, slots.shared(), log)?;
        backends.retire_all();
        let clusters = config.clusters.iter().map(|c| Cluster::new(c, backends, slots)).collect();
        Ok(Snapshot { router: Router::new(&config), clusters, config, modules })
    }
}

/// Everything the state machine works with besides the session itself:
/// split from the session slab so both can be borrowed at once.
pub struct Core {
    registry: Registry,
    ups: Slab<UpConn>,
    /// The configuration new requests are served with.
    current: ArcSwap<Snapshot>,
    backends: Backends,
    slots: SlotTable,
    /// The shared region.
    shared: &'static Shared,
    /// Overload level (0, 1: non-essential modules off, 2: shedding).
    load_level: u32,
    /// The overload detector, when `[modules.degrade]` is enabled.
    degrade: Option<Controller>,
    /// Request ids: a per-process random seed and a counter.
    id_seed: u64,
    id_seq: u64,
    /// This worker's place among the master's workers (0 in
    /// `--single-process`): its index in the shared per-worker tables.
    place: usize,
    timers: Timers,
    /// Read buffers of client connections.
    bufs: BufPool,
    /// Read buffers of upstream connections: larger, so that a response
    /// body moves in fewer, larger reads and writes.
    up_bufs: BufPool,
    now: Instant,
    log: Logger,
    /// Answer with `Connection: close` and stop keeping connections.
    draining: bool,
}

/// The proxy of one worker: its client sessions, and the [`Core`] they
/// share (upstream connections, timers, buffers, the current snapshot).
pub struct Engine {
    sessions: Slab<Session>,
    core: Core,
    /// Allocations of closed sessions, for new ones.
    spares: Vec<Spare>,
}

impl Engine {
    /// An engine serving `config`. `registry` is the worker's poll
    /// registry; `place` its index in the shared per-worker tables.
    pub fn new(
        registry: Registry,
        config: Arc<Config>,
        mut slots: SlotTable,
        place: usize,
        log: Logger,
    ) -> Result<Engine, String> {
        let buf_size = config.limits.max_header_bytes.max(MIN_BUFFER);
        let mut backends = Backends::default();
        let degrade = DegradeSettings::from_config(&config).map(Controller::new);
        let snapshot = Snapshot::build(config, &mut backends, &mut slots, &log)?;
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
                place,
                timers: Timers::default(),
                bufs: BufPool::new(buf_size, POOLED_BUFFERS),
                up_bufs: BufPool::new(buf_size.max(UPSTREAM_BUFFER), POOLED_BUFFERS),
                now: Instant::now(),
                log,
                draining: false,
            },
            spares: Vec::new(),
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
        self.sessions.iter().filter(|(_, s)| s.ex.finish_pending).count() as u32
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
    pub fn open(&mut self, mut stream: Stream, peer: Peer, snap: &Arc<Snapshot>) {
        let entry = self.sessions.vacant_entry();
        let idx = entry.key();
        let key = token::token(Kind::Client, idx);
        if let Err(e) = self.core.registry.register(&mut stream, key, Interest::READABLE) {
            slog::error!(self.core.log, "cannot register client socket"; "error" => %e);
            return;
        }
        let spare = self.spares.pop();
        let s = entry.insert(Session::new(key.0, stream, peer, snap.clone(), spare));
        let at = self.core.now + snap.config.timeouts.client_header;
        self.core.timers.set(&mut s.timed, key.0, at);
        match self.core.hook_accept(s) {
            Verdict::Continue => {}
            Verdict::Respond(r) => {
                s.answer_and_shut(&r);
                self.close(idx);
            }
            Verdict::Close => self.close(idx),
        }
    }

    /// Readiness of a client socket.
    pub fn client_event(&mut self, idx: usize, ev: &mio::event::Event) {
        if let Some(s) = self.sessions.get_mut(idx) {
            s.rd.update(ev);
            if !self.core.drive(s) {
                self.close(idx);
            }
        }
    }

    /// Readiness of a backend connection: its session's, or a pooled one's.
    pub fn upstream_event(&mut self, idx: usize, ev: &mio::event::Event) {
        let Some(u) = self.core.ups.get_mut(idx) else { return };
        u.rd.update(ev);
        match u.owner {
            Some(sid) => {
                if let Some(s) = self.sessions.get_mut(sid) {
                    if !self.core.drive(s) {
                        self.close(sid);
                    }
                }
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
                    if !self.core.timeout(s) {
                        self.close(idx);
                    }
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

    /// Closes a session: REQUEST_FINISH (if owed) and FINISH, its backend
    /// connection closed, its allocations kept for the next one.
    fn close(&mut self, idx: usize) {
        if !self.sessions.contains(idx) {
            return;
        }
        let mut s = self.sessions.remove(idx);
        if s.ex.finish_pending && s.ex.status == 0 {
            s.ex.status = 499; // The client went away before a response (nginx's 499).
        }
        self.core.hook_finish(&mut s);
        self.core.leave_state(&mut s);
        if let Some(b) = s.inb.take() {
            self.core.bufs.put(b);
        }
        // Dropping the stream closes the fd, which also removes it from the
        // epoll set; the session's allocations serve the next connection.
        if self.spares.len() < POOLED_BUFFERS {
            self.spares.push(s.into_spare());
        }
    }

    /// Answer with `Connection: close` from now on, and keep no connection.
    pub fn start_drain(&mut self) {
        self.core.draining = true;
    }

    /// The backend slots of a new configuration (sent with it).
    pub fn set_slots(&mut self, backend_slots: &[(String, u32)]) {
        self.core.slots = SlotTable::from_entries(self.core.shared, backend_slots);
    }

    /// Serves new requests with `config`; requests in flight keep the
    /// snapshot they have. Idle connections to backends no cluster names
    /// any more are closed.
    pub fn reconfigure(&mut self, config: Arc<Config>) -> Result<(), String> {
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
        let snapshot = Snapshot::build(config, &mut core.backends, &mut core.slots, &core.log)?;
        core.current.store(Arc::new(snapshot));
        let retired: Vec<usize> = core
            .ups
            .iter()
            .filter(|(_, u)| u.owner.is_none() && core.backends.get(u.backend).retired)
            .map(|(i, _)| i)
            .collect();
        for ui in retired {
            core.drop_idle(ui);
        }
        Ok(())
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

impl Core {
    /// A new request id: 16 hex digits, unique per process (a counter
    /// mixed with a random seed, so ids do not reveal request counts).
    fn next_request_id(&mut self) -> [u8; 16] {
        self.id_seq += 1;
        // splitmix64 finaliser.
        let mut z = self.id_seed.wrapping_add(self.id_seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[(z >> (60 - 4 * i) & 0xf) as usize];
        }
        out
    }

    /// The overload controller changed the level: log it and publish it.
    fn set_load_level(&mut self, level: u32, busy_percent: u32, in_flight: u32) {
        let old = std::mem::replace(&mut self.load_level, level);
        let what = match level {
            0 => "normal: all modules on",
            1 => "overloaded: non-essential modules off",
            _ => "overloaded: non-essential modules off, low-priority routes shed",
        };
        slog::warn!(self.log, "load level changed"; "from" => old, "to" => level, "state" => what,
            "busy_percent" => busy_percent, "in_flight" => in_flight);
        if let Some(w) = self.shared.workers.get(self.place) {
            w.level.store(level, Ordering::Relaxed);
            w.level_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request started (the overload controller's count window).
    fn count_request(&mut self) {
        let now = self.now;
        let Some(c) = self.degrade.as_mut() else { return };
        if let Some(level) = c.request(now) {
            let in_flight = self.shared.workers.get(self.place).map_or(0, |w| w.in_flight.load(Ordering::Relaxed));
            self.set_load_level(level, 0, in_flight);
        }
    }
}
