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

mod proxy;
mod session;
mod timer;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use slog::Logger;

use crate::buffer::BufPool;
use crate::config::{Config, ListenAddr, SockAddr};
use crate::net::Listener;
use crate::router::Router;
use crate::upstream::{Backends, Cluster};

pub use proxy::UpConn;
pub use session::Session;
use timer::Timers;

pub(crate) const KIND_LISTENER: usize = 0;
pub(crate) const KIND_CLIENT: usize = 1;
pub(crate) const KIND_UPSTREAM: usize = 2;

pub(crate) fn token(kind: usize, index: usize) -> Token {
    Token(index << 2 | kind)
}

/// Accepts taken from one listener per loop turn before others get a turn.
const ACCEPT_BATCH: usize = 64;
/// Free buffers a worker keeps for reuse.
const POOLED_BUFFERS: usize = 1024;
/// Smallest read buffer per connection direction.
const MIN_BUFFER: usize = 16 * 1024;

/// What a worker is started with.
pub struct WorkerInit {
    pub config: Arc<Config>,
    /// Listening sockets, in the order of `config.listeners`.
    pub listeners: Vec<(ListenAddr, OwnedFd)>,
    pub log: Logger,
    /// Set from a signal handler: stop the loop.
    pub stop: Arc<AtomicBool>,
}

/// The configuration-derived state requests are served with. Immutable
/// once built (balancing counters are `Cell`s); a reload builds a new one
/// and swaps the pointer. A session holds the snapshot its current request
/// started with, so requests in flight finish on it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub clusters: Vec<Cluster>,
}

impl Snapshot {
    /// Builds a snapshot, giving its backends ids in the worker's table.
    pub fn build(config: Arc<Config>, backends: &mut Backends) -> Snapshot {
        backends.retire_all();
        let clusters = config.clusters.iter().map(|c| Cluster::new(c, backends)).collect();
        Snapshot { router: Router::new(&config), clusters, config }
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
    timers: Timers,
    bufs: BufPool,
    now: Instant,
    log: Logger,
    /// Answer with `Connection: close` and stop keeping connections.
    draining: bool,
}

struct ListenerSlot {
    listener: Listener,
    addr: ListenAddr,
    /// More connections may be waiting (the accept batch ran out).
    pending: bool,
}

/// A worker process's event loop.
pub struct Worker {
    poll: Poll,
    sessions: Slab<Session>,
    listeners: Vec<ListenerSlot>,
    core: Core,
    stop: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(init: WorkerInit) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let mut listeners = Vec::with_capacity(init.listeners.len());
        for (i, (addr, fd)) in init.listeners.into_iter().enumerate() {
            let mut listener = Listener::from_fd(fd, matches!(addr.0, SockAddr::Unix(_)))?;
            registry.register(&mut listener, token(KIND_LISTENER, i), Interest::READABLE)?;
            listeners.push(ListenerSlot { listener, addr, pending: false });
        }
        let buf_size = init.config.limits.max_header_bytes.max(MIN_BUFFER);
        let mut backends = Backends::default();
        let snapshot = Snapshot::build(init.config, &mut backends);
        Ok(Worker {
            poll,
            sessions: Slab::with_capacity(1024),
            listeners,
            core: Core {
                registry,
                ups: Slab::with_capacity(1024),
                current: ArcSwap::from_pointee(snapshot),
                backends,
                timers: Timers::default(),
                bufs: BufPool::new(buf_size, POOLED_BUFFERS),
                now: Instant::now(),
                log: init.log,
                draining: false,
            },
            stop: init.stop,
        })
    }

    /// Runs until asked to stop.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        for l in &self.listeners {
            slog::info!(self.core.log, "listening"; "address" => %l.addr, "fd" => l.listener.raw_fd());
        }
        while !self.stop.load(Ordering::Relaxed) {
            let any_pending = self.listeners.iter().any(|l| l.pending);
            let timeout = if any_pending {
                Some(Duration::ZERO)
            } else {
                // Wake at least once a second to notice a stop request.
                Some(
                    self.core
                        .timers
                        .next_timeout(Instant::now())
                        .map_or(Duration::from_secs(1), |t| t.min(Duration::from_secs(1))),
                )
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.core.now = Instant::now();
            for ev in events.iter() {
                let t = ev.token().0;
                let idx = t >> 2;
                match t & 3 {
                    KIND_LISTENER => {
                        if let Some(l) = self.listeners.get_mut(idx) {
                            l.pending = true;
                        }
                    }
                    KIND_CLIENT => {
                        if let Some(s) = self.sessions.get_mut(idx) {
                            s.rd.update(ev);
                            if !self.core.drive(s) {
                                self.close_session(idx);
                            }
                        }
                    }
                    KIND_UPSTREAM => self.upstream_event(idx, ev),
                    _ => {}
                }
            }
            for i in 0..self.listeners.len() {
                if self.listeners[i].pending {
                    self.accept(i);
                }
            }
            self.run_timers();
        }
        slog::info!(self.core.log, "worker stopping"; "sessions" => self.sessions.len());
        Ok(())
    }

    fn upstream_event(&mut self, idx: usize, ev: &mio::event::Event) {
        let Some(u) = self.core.ups.get_mut(idx) else { return };
        u.rd.update(ev);
        match u.owner {
            Some(sid) => {
                if let Some(s) = self.sessions.get_mut(sid) {
                    if !self.core.drive(s) {
                        self.close_session(sid);
                    }
                }
            }
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
                    // EMFILE and the like: stop accepting until the next event.
                    slog::error!(self.core.log, "accept failed"; "error" => %e, "listener" => %self.listeners[i].addr);
                    self.listeners[i].pending = false;
                    return;
                }
            };
            if self.sessions.len() >= max {
                use std::io::Write;
                let _ = stream.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 24\r\nConnection: close\r\n\r\n503 Service Unavailable\n",
                );
                slog::warn!(self.core.log, "connection limit reached; refusing a connection"; "max_connections" => max);
                continue;
            }
            let entry = self.sessions.vacant_entry();
            let idx = entry.key();
            let key = token(KIND_CLIENT, idx).0;
            if let Err(e) =
                self.core.registry.register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
            {
                slog::error!(self.core.log, "cannot register client socket"; "error" => %e);
                continue;
            }
            let s = entry.insert(Session::new(key, stream, peer, snap.clone()));
            let at = self.core.now + snap.config.timeouts.client_header;
            self.core.timers.set(&mut s.timed, key, at);
            if !self.core.drive(s) {
                self.close_session(idx);
            }
        }
        // The batch ran out: `pending` stays set and the loop polls without
        // waiting, so other sockets get their turn first.
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
                    if !self.core.timeout(s) {
                        self.close_session(idx);
                    }
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

    fn close_session(&mut self, idx: usize) {
        if !self.sessions.contains(idx) {
            return;
        }
        let mut s = self.sessions.remove(idx);
        self.core.release_upstream(&mut s, false);
        if let Some(b) = s.inb.take() {
            self.core.bufs.put(b);
        }
        // Dropping the stream closes the fd, which also removes it from the
        // epoll set.
    }
}

/// Runs a worker until `init.stop` is set.
pub fn run(init: WorkerInit) -> io::Result<()> {
    let mut w = Worker::new(init)?;
    w.run()
}
