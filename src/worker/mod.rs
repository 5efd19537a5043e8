//! A worker: one single-threaded `mio` event loop that owns its listeners,
//! a slab of client sessions, a slab of upstream connections, the timers,
//! and (in master mode) the channel to the master.
//!
//! The worker is given its listening sockets and configuration as values
//! ([`WorkerInit`]); whether they come from the master over a Unix socket
//! or from `--single-process` startup is not its concern.
//!
//! Tokens: the low two bits name the kind of socket, the rest is the slab
//! index (`token(kind, index)`), so an event finds its owner in O(1) and a
//! pooled upstream connection keeps its registration when it changes hands.
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

mod hooks;
mod proxy;
mod session;
mod timer;
mod upconn;

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use slog::Logger;

use crate::buffer::BufPool;
use crate::channel::{split_fds, Channel, ListenerEntry, ToMaster, ToWorker};
use crate::config::Config;
use crate::hooks::modules::{Controller, DegradeSettings};
use crate::hooks::Modules;
use crate::log::LogFile;
use crate::net::Listener;
use crate::router::Router;
use crate::shm::Shared;
use crate::upstream::{Backends, Cluster, SlotTable};

pub use session::Session;
use timer::Timers;
pub use upconn::UpConn;

pub(crate) const KIND_LISTENER: usize = 0;
pub(crate) const KIND_CLIENT: usize = 1;
pub(crate) const KIND_UPSTREAM: usize = 2;
pub(crate) const KIND_CONTROL: usize = 3;

pub(crate) fn token(kind: usize, index: usize) -> Token {
    Token(index << 2 | kind)
}

/// Accepts taken from one listener per loop turn before others get a turn.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses after a resource error such as EMFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Free buffers a worker keeps for reuse.
const POOLED_BUFFERS: usize = 1024;
/// Smallest read buffer of a client connection.
const MIN_BUFFER: usize = 16 * 1024;
/// Smallest read buffer of an upstream connection.
const UPSTREAM_BUFFER: usize = 64 * 1024;

/// What a worker is started with.
pub struct WorkerInit {
    pub config: Arc<Config>,
    /// Listening sockets and their manifest entries.
    pub listeners: Vec<(ListenerEntry, OwnedFd)>,
    pub log: Logger,
    /// The log file to reopen on request, if logging to a file.
    pub log_file: Option<LogFile>,
    /// Set from a signal handler: stop the loop now.
    pub stop: Arc<AtomicBool>,
    /// Set from a signal handler: drain and stop.
    pub quit: Arc<AtomicBool>,
    /// The channel to the master (absent in `--single-process` mode).
    pub channel: Option<Channel>,
    /// Shared-memory slots of backend addresses.
    pub slots: SlotTable,
    /// This worker's place among the master's workers (0 in
    /// `--single-process`): its index in the shared per-worker tables.
    pub place: usize,
}

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

/// Everything the proxy state machine works with besides the session
/// itself: split from the session slab so both can be borrowed at once.
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
    /// This worker's place (see [`WorkerInit::place`]).
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
    /// Request bodies refused as too slow (see `proxy::body_timeout`), and
    /// when that was last logged (once a second at most).
    slow_bodies: u64,
    slow_bodies_logged: Instant,
}

struct ListenerSlot {
    listener: Listener,
    entry: ListenerEntry,
    /// More connections may be waiting (the accept batch ran out).
    pending: bool,
}

/// A worker process's event loop.
pub struct Worker {
    poll: Poll,
    sessions: Slab<Session>,
    listeners: Slab<ListenerSlot>,
    core: Core,
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    channel: Option<Channel>,
    log_file: Option<LogFile>,
    /// When draining ends at the latest.
    drain_deadline: Option<Instant>,
    /// Accepting is paused after a resource error (EMFILE) until then.
    accept_paused_until: Option<Instant>,
    /// Load measurement for the overload controller.
    load: LoadMeter,
    /// Allocations of closed sessions, for new ones.
    spares: Vec<session::Spare>,
    /// Connections refused over `max_connections`, and when last logged.
    refused: u64,
    refused_logged: Instant,
    /// Connections closed because handling them panicked.
    panics: u64,
}

/// How often a worker measures its load.
const LOAD_TICK: Duration = Duration::from_millis(100);

/// Time the loop spent waiting in `epoll_wait` since `since`.
struct LoadMeter {
    since: Instant,
    idle: Duration,
}

/// Token of the channel to the master.
const CHANNEL: Token = Token(KIND_CONTROL);

impl Worker {
    pub fn new(init: WorkerInit) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let mut listeners = Slab::new();
        for (entry, fd) in init.listeners {
            add_listener(&registry, &mut listeners, entry, fd)?;
        }
        if let Some(ch) = &init.channel {
            ch.set_nonblocking(true)?;
            registry.register(&mut SourceFd(&ch.raw_fd()), CHANNEL, Interest::READABLE)?;
        }
        let buf_size = init.config.limits.max_header_bytes.max(MIN_BUFFER);
        let mut backends = Backends::default();
        let mut slots = init.slots;
        let degrade = DegradeSettings::from_config(&init.config).map(Controller::new);
        let snapshot = Snapshot::build(init.config, &mut backends, &mut slots, &init.log).map_err(io::Error::other)?;
        let shared = slots.shared();
        Ok(Worker {
            poll,
            sessions: Slab::with_capacity(1024),
            listeners,
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
                place: init.place,
                timers: Timers::default(),
                bufs: BufPool::new(buf_size, POOLED_BUFFERS),
                up_bufs: BufPool::new(buf_size.max(UPSTREAM_BUFFER), POOLED_BUFFERS),
                now: Instant::now(),
                log: init.log,
                draining: false,
                slow_bodies: 0,
                slow_bodies_logged: Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
            },
            stop: init.stop,
            quit: init.quit,
            channel: init.channel,
            log_file: init.log_file,
            drain_deadline: None,
            accept_paused_until: None,
            load: LoadMeter { since: Instant::now(), idle: Duration::ZERO },
            spares: Vec::new(),
            refused: 0,
            refused_logged: Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
            panics: 0,
        })
    }

    /// Runs until asked to stop.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        for (_, l) in &self.listeners {
            slog::info!(self.core.log, "listening"; "address" => &l.entry.local, "fd" => l.listener.raw_fd());
        }
        if let Some(ch) = &self.channel {
            ch.send(&ToMaster::Ready { pid: std::process::id() }, &[])?;
        }
        while !self.stop.load(Ordering::Relaxed) {
            if self.quit.swap(false, Ordering::Relaxed) {
                let t = self.core.current.load().config.drain_timeout;
                self.start_drain(t);
            }
            if let Some(deadline) = self.drain_deadline {
                if self.sessions.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            let now = Instant::now();
            let paused = self.accept_paused_until.filter(|&t| t > now);
            let any_pending = self.listeners.iter().any(|(_, l)| l.pending);
            let timeout = if any_pending && paused.is_none() {
                Some(Duration::ZERO)
            } else {
                // Wake at least once a second to notice a stop request.
                let mut t = self
                    .core
                    .timers
                    .next_timeout(now)
                    .map_or(Duration::from_secs(1), |t| t.min(Duration::from_secs(1)));
                if let Some(p) = paused {
                    t = t.min(p - now);
                }
                if let Some(d) = self.drain_deadline {
                    t = t.min(d.saturating_duration_since(now));
                }
                Some(t)
            };
            // Modules get their tick (and degrade its samples) every LOAD_TICK.
            let ticking = self.core.degrade.is_some() || !self.core.current.load().modules.loaded.is_empty();
            let timeout = if ticking { timeout.map(|t| t.min(LOAD_TICK)) } else { timeout };
            let before = Instant::now();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.core.now = Instant::now();
            self.load.idle += self.core.now - before;
            for ev in events.iter() {
                let t = ev.token().0;
                let idx = t >> 2;
                match t & 3 {
                    KIND_LISTENER => {
                        if let Some(l) = self.listeners.get_mut(idx) {
                            l.pending = true;
                        }
                    }
                    KIND_CLIENT => self.serve(idx, |core, s| {
                        s.rd.update(ev);
                        core.drive(s)
                    }),
                    KIND_UPSTREAM => self.upstream_event(idx, ev),
                    _ => self.channel_event(),
                }
            }
            if self.accept_paused_until.is_none_or(|t| t <= self.core.now) {
                self.accept_paused_until = None;
                for i in 0..self.listeners.capacity() {
                    if self.listeners.get(i).is_some_and(|l| l.pending) {
                        self.accept(i);
                    }
                }
            }
            self.run_timers();
            self.measure_load();
        }
        slog::info!(self.core.log, "worker stopping"; "sessions" => self.sessions.len());
        self.core.current.load().modules.tick();
        Ok(())
    }

    fn upstream_event(&mut self, idx: usize, ev: &mio::event::Event) {
        let Some(u) = self.core.ups.get_mut(idx) else { return };
        u.rd.update(ev);
        match u.owner {
            Some(sid) => self.serve(sid, |core, s| core.drive(s)),
            None => self.core.idle_upstream_event(idx),
        }
    }

    fn accept(&mut self, i: usize) {
        let snap = self.core.current.load_full();
        let max = snap.config.limits.max_connections;
        for _ in 0..ACCEPT_BATCH {
            let (mut stream, peer) = match self.listeners[i].listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listeners[i].pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS: the connection stays queued;
                    // pause accepting briefly (connections that finish free
                    // fds) rather than spin on the error.
                    slog::error!(self.core.log, "accept failed; pausing accepts for 100 ms"; "error" => %e,
                        "listener" => &self.listeners[i].entry.local);
                    self.accept_paused_until = Some(self.core.now + ACCEPT_PAUSE);
                    return;
                }
            };
            if self.sessions.len() >= max {
                self.refuse_connection(stream, max);
                continue;
            }
            let entry = self.sessions.vacant_entry();
            let idx = entry.key();
            let key = token(KIND_CLIENT, idx).0;
            if let Err(e) = self.core.registry.register(&mut stream, Token(key), Interest::READABLE) {
                slog::error!(self.core.log, "cannot register client socket"; "error" => %e);
                continue;
            }
            let spare = self.spares.pop();
            let s = entry.insert(Session::new(key, stream, peer, snap.clone(), spare));
            let at = self.core.now + snap.config.timeouts.client_header;
            self.core.timers.set(&mut s.timed, key, at);
            let core = &mut self.core;
            match guarded(|| core.hook_accept(s)) {
                Err(p) => self.session_panicked(idx, p),
                Ok(Ok(())) => {}
                Ok(Err(answer)) => {
                    if let Some(r) = answer {
                        use std::io::Write;
                        let mut out = Vec::new();
                        crate::http::write::module_response(
                            &mut out,
                            r.status,
                            &r.headers,
                            &r.body,
                            crate::http::write::ConnHeader::Close,
                            false,
                        );
                        let _ = s.stream.write(&out);
                        s.stream.shutdown_write();
                    }
                    self.close_session(idx);
                }
            }
        }
        // The batch ran out: `pending` stays set and the loop polls without
        // waiting, so other sockets get their turn first.
    }

    /// Every `LOAD_TICK`: the share of time the loop was busy and the
    /// requests in flight, published in shared memory and fed to the
    /// overload controller.
    fn measure_load(&mut self) {
        let now = self.core.now;
        let elapsed = now.saturating_duration_since(self.load.since);
        if elapsed < LOAD_TICK {
            return;
        }
        self.core.current.load().modules.tick();
        let busy = elapsed.saturating_sub(self.load.idle);
        let busy_percent = (busy.as_micros() * 100 / elapsed.as_micros().max(1)) as u32;
        self.load = LoadMeter { since: now, idle: Duration::ZERO };
        let in_flight = self.sessions.iter().filter(|(_, s)| s.ex.finish_pending).count() as u32;
        let w = self.core.shared.workers.get(self.core.place);
        if let Some(w) = w {
            w.pid.store(std::process::id(), Ordering::Relaxed);
            w.busy_percent.store(busy_percent, Ordering::Relaxed);
            w.in_flight.store(in_flight, Ordering::Relaxed);
        }
        let Some(c) = self.core.degrade.as_mut() else { return };
        if let Some(level) = c.sample(now, busy_percent, in_flight) {
            self.core.set_load_level(level, busy_percent, in_flight);
        }
    }

    /// Over `max_connections`: a 503 and a close. What the client already
    /// sent is read first and the close is a FIN, not a reset that could
    /// destroy the 503 on its way.
    fn refuse_connection(&mut self, mut stream: crate::net::Stream, max: usize) {
        use std::io::{Read, Write};
        let mut scratch = [0u8; 4096];
        for _ in 0..4 {
            match stream.read(&mut scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let mut out = Vec::with_capacity(160);
        crate::http::write::local_response(&mut out, 503, b"", crate::http::write::ConnHeader::Close, false);
        let _ = stream.write(&out);
        stream.shutdown_write();
        self.refused += 1;
        // One line per second at most under a connection storm.
        if self.core.now.saturating_duration_since(self.refused_logged) >= Duration::from_secs(1) {
            slog::warn!(self.core.log, "connection limit reached; refusing connections"; "max_connections" => max,
                "refused_total" => self.refused);
            self.refused_logged = self.core.now;
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        self.core.now = now;
        while let Some((at, key)) = self.core.timers.pop_due(now) {
            let idx = key >> 2;
            match key & 3 {
                KIND_CLIENT => {
                    let Some(s) = self.sessions.get_mut(idx) else { continue };
                    if s.key != key || !self.core.timers.fired(&mut s.timed, key, at, now) {
                        continue;
                    }
                    self.serve(idx, |core, s| core.timeout(s));
                }
                KIND_UPSTREAM => {
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

    /// Runs `f` (a step of the proxy state machine, a timeout, hooks) on
    /// session `idx`; closes the session when `f` says so, or when it
    /// panics: one connection's panic must not take the worker's other
    /// connections with it.
    fn serve(&mut self, idx: usize, f: impl FnOnce(&mut Core, &mut Session) -> bool) {
        let Some(s) = self.sessions.get_mut(idx) else { return };
        let core = &mut self.core;
        match guarded(|| f(core, s)) {
            Ok(true) => {}
            Ok(false) => self.close_session(idx),
            Err(p) => self.session_panicked(idx, p),
        }
    }

    /// Handling session `idx` panicked: it is logged with its message and
    /// place, counted, and the connection closed (its upstream connection
    /// too, and the backend's counters released). The session's state may
    /// be half-updated, so a panic while closing it drops it as it is.
    fn session_panicked(&mut self, idx: usize, p: Panic) {
        self.panics += 1;
        let peer = self.sessions.get(idx).map(|s| format!("{:?}", s.peer)).unwrap_or_default();
        slog::error!(self.core.log, "panic while handling a connection; closing it"; "panic" => %p.message,
            "location" => %p.location, "peer" => peer, "panics_total" => self.panics);
        if let Some(s) = self.sessions.get_mut(idx) {
            if s.ex.finish_pending {
                s.ex.status = 500;
            }
        }
        if let Err(p) = guarded(|| self.close_session(idx)) {
            slog::error!(self.core.log, "panic while closing a connection after a panic"; "panic" => %p.message,
                "location" => %p.location);
            if self.sessions.contains(idx) {
                drop(self.sessions.remove(idx));
            }
        }
    }

    fn close_session(&mut self, idx: usize) {
        if !self.sessions.contains(idx) {
            return;
        }
        let mut s = self.sessions.remove(idx);
        if s.ex.finish_pending && s.ex.status == 0 {
            s.ex.status = 499; // The client went away before a response (nginx's 499).
        }
        let core = &mut self.core;
        if let Err(p) = guarded(|| core.hook_finish(&mut s)) {
            self.panics += 1;
            slog::error!(self.core.log, "panic in the finish hooks of a connection"; "panic" => %p.message,
                "location" => %p.location, "panics_total" => self.panics);
        }
        self.core.release_upstream(&mut s, false);
        if let Some(b) = s.inb.take() {
            self.core.bufs.put(b);
        }
        // Dropping the stream closes the fd, which also removes it from the
        // epoll set; the session's allocations serve the next connection.
        if self.spares.len() < POOLED_BUFFERS {
            self.spares.push(s.into_spare());
        }
    }
}

impl Core {
    /// A new request id: 16 hex digits, unique per process (a counter
    /// mixed with a random seed, so ids do not reveal request counts).
    pub(crate) fn next_request_id(&mut self) -> [u8; 16] {
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
    pub(crate) fn set_load_level(&mut self, level: u32, busy_percent: u32, in_flight: u32) {
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
    pub(crate) fn count_request(&mut self) {
        let now = self.now;
        let Some(c) = self.degrade.as_mut() else { return };
        if let Some(level) = c.request(now) {
            let in_flight = self.shared.workers.get(self.place).map_or(0, |w| w.in_flight.load(Ordering::Relaxed));
            self.set_load_level(level, 0, in_flight);
        }
    }
}

/// Registers a listening socket received (or bound) for this worker.
fn add_listener(
    registry: &Registry,
    slots: &mut Slab<ListenerSlot>,
    entry: ListenerEntry,
    fd: OwnedFd,
) -> io::Result<()> {
    let mut listener = Listener::from_fd(fd, entry.local.starts_with("unix:"))?;
    let e = slots.vacant_entry();
    registry.register(&mut listener, token(KIND_LISTENER, e.key()), Interest::READABLE)?;
    e.insert(ListenerSlot { listener, entry, pending: false });
    Ok(())
}

impl Worker {
    /// Messages from the master.
    fn channel_event(&mut self) {
        loop {
            let Some(ch) = self.channel.as_ref() else { return };
            match ch.recv::<ToWorker>() {
                Ok(None) => return,
                Ok(Some((ToWorker::Configure { seq, config_path, config_text, listeners, backend_slots }, fds))) => {
                    let error = self.reconfigure(&config_path, &config_text, listeners, backend_slots, fds).err();
                    match &error {
                        None => slog::info!(self.core.log, "configuration reloaded"; "seq" => seq),
                        Some(e) => slog::error!(self.core.log, "reload refused"; "seq" => seq, "error" => e),
                    }
                    if let Some(ch) = &self.channel {
                        let _ = ch.send(&ToMaster::Configured { seq, error }, &[]);
                    }
                }
                Ok(Some((ToWorker::Files { paths }, fds))) => {
                    if let Err(e) = crate::log::take_over(&paths, fds) {
                        slog::error!(self.core.log, "files from the master refused"; "error" => e);
                    }
                }
                Ok(Some((ToWorker::Drain { timeout_ms }, _))) => self.start_drain(Duration::from_millis(timeout_ms)),
                Ok(Some((ToWorker::Reopen, mut fds))) => {
                    // Modules' own files (access logs), in their writer threads.
                    self.core.current.load().modules.reopen();
                    if let Some(f) = &self.log_file {
                        // The master sends the reopened file: this worker may
                        // no longer have the rights to open it itself.
                        let r = match fds.pop() {
                            Some(fd) => {
                                f.replace(std::fs::File::from(fd));
                                Ok(())
                            }
                            None => f.reopen(),
                        };
                        if let Err(e) = r {
                            slog::error!(self.core.log, "cannot reopen the log file"; "error" => %e);
                        }
                    }
                }
                Err(e) => {
                    // The master is gone (or the channel broke): finish what
                    // is in flight and leave, rather than serve unmanaged.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        slog::warn!(self.core.log, "master is gone; draining");
                    } else {
                        slog::error!(self.core.log, "master channel failed; draining"; "error" => %e);
                    }
                    if let Some(ch) = self.channel.take() {
                        let _ = self.core.registry.deregister(&mut SourceFd(&ch.raw_fd()));
                    }
                    let t = self.core.current.load().config.drain_timeout;
                    self.start_drain(t);
                    return;
                }
            }
        }
    }

    /// Applies a configuration: listeners added and removed, then the new
    /// snapshot swapped in. Requests in flight keep the snapshot they have.
    fn reconfigure(
        &mut self,
        path: &str,
        text: &str,
        entries: Vec<ListenerEntry>,
        backend_slots: Vec<(String, u32)>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let config = Config::parse_resolved(std::path::Path::new(path), text).map_err(|e| e.to_string())?;
        // The region is the one this worker mapped at start; the copy is dropped.
        let (fds, _region) = split_fds(&entries, fds)?;
        self.core.slots = SlotTable::from_entries(self.core.slots.shared(), &backend_slots);
        if self.drain_deadline.is_none() {
            let stale: Vec<usize> =
                self.listeners.iter().filter(|(_, l)| !entries.contains(&l.entry)).map(|(i, _)| i).collect();
            for i in stale {
                let mut slot = self.listeners.remove(i);
                let _ = self.core.registry.deregister(&mut slot.listener);
                slog::info!(self.core.log, "listener closed"; "address" => &slot.entry.local);
            }
            for (entry, fd) in entries.into_iter().zip(fds) {
                if self.listeners.iter().any(|(_, l)| l.entry == entry) {
                    continue; // Already listening: the duplicate fd is dropped.
                }
                slog::info!(self.core.log, "listening"; "address" => &entry.local);
                add_listener(&self.core.registry, &mut self.listeners, entry, fd).map_err(|e| e.to_string())?;
            }
        }
        let buf_size = config.limits.max_header_bytes.max(MIN_BUFFER);
        if buf_size != self.core.bufs.size() {
            self.core.bufs = BufPool::new(buf_size, POOLED_BUFFERS);
            self.core.up_bufs = BufPool::new(buf_size.max(UPSTREAM_BUFFER), POOLED_BUFFERS);
        }
        let config = Arc::new(config);
        match DegradeSettings::from_config(&config) {
            Some(d) => match self.core.degrade.as_mut() {
                Some(c) => c.update(d),
                None => self.core.degrade = Some(Controller::new(d)),
            },
            None => {
                self.core.degrade = None;
                if self.core.load_level != 0 {
                    self.core.set_load_level(0, 0, 0);
                }
            }
        }
        let snapshot = Snapshot::build(config, &mut self.core.backends, &mut self.core.slots, &self.core.log)?;
        self.core.current.store(Arc::new(snapshot));
        // Idle connections to backends no cluster names any more.
        let retired: Vec<usize> = self
            .core
            .ups
            .iter()
            .filter(|(_, u)| u.owner.is_none() && self.core.backends.get(u.backend).retired)
            .map(|(i, _)| i)
            .collect();
        for ui in retired {
            self.core.drop_idle(ui);
        }
        Ok(())
    }

    /// Stops accepting; requests in flight finish (answered with
    /// `Connection: close`), idle connections last until the deadline.
    fn start_drain(&mut self, timeout: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        slog::info!(self.core.log, "draining"; "sessions" => self.sessions.len(), "timeout_ms" => timeout.as_millis() as u64);
        for (_, mut slot) in std::mem::take(&mut self.listeners) {
            let _ = self.core.registry.deregister(&mut slot.listener);
        }
        self.core.draining = true;
        self.drain_deadline = Some(Instant::now() + timeout);
    }
}

/// Runs a worker until it is stopped or has drained.
pub fn run(init: WorkerInit) -> io::Result<()> {
    install_panic_hook();
    let mut w = Worker::new(init)?;
    w.run()
}

/// A panic caught by [`guarded`]: its message and `file:line`.
struct Panic {
    message: String,
    location: String,
}

thread_local! {
    /// Inside [`guarded`]: the panic hook records the panic for the caller
    /// to log instead of printing it to stderr (a daemon's stderr is
    /// /dev/null; the error log is where operators look).
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<Panic>> = const { RefCell::new(None) };
}

/// Chains a hook before the default one that records panics inside
/// [`guarded`] (the payload of `catch_unwind` has no location).
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(Cell::get) {
            return default(info);
        }
        let p = info.payload();
        let message = match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
            (Some(m), _) => (*m).to_string(),
            (None, Some(m)) => m.clone(),
            (None, None) => "(no message)".to_string(),
        };
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|l| *l.borrow_mut() = Some(Panic { message, location }));
    }));
}

/// Runs `f`, catching a panic. `AssertUnwindSafe`: after a panic the
/// caller throws away the one session `f` worked on; the worker's shared
/// state is left consistent by construction (slab entries and counters
/// are released by closing that session).
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    let outer = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    r.map_err(|_| {
        LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .unwrap_or(Panic { message: "(unknown)".to_string(), location: String::new() })
    })
}
