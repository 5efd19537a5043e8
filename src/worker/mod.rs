//! A worker process: one single-threaded `mio` event loop that owns its
//! listeners, the channel to the master and the [`Engine`] (the proxy:
//! sessions, upstream connections, timers). The worker polls, accepts,
//! applies the master's messages (reconfigure, drain, reopen) and reports
//! its load; what happens to a connection after `accept` is `proxy`'s.
//!
//! The worker is given its listening sockets and configuration as values
//! ([`WorkerInit`]); whether they come from the master over a Unix socket
//! or from `--single-process` startup is not its concern.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry};
use slab::Slab;
use slog::Logger;

use crate::channel::{split_fds, Channel, ChannelError, HandedConn, ListenerEntry, ToMaster, ToWorker, HANDOVER_BATCH};
use crate::config::Config;
use crate::log::LogFile;
use crate::net::Listener;
use crate::proxy::token::{self, Kind, CHANNEL};
use crate::proxy::{Detached, Engine};
use crate::shm::Shared;
use crate::upstream::SlotTable;

/// Accepts taken from one listener per loop turn before others get a turn.
const ACCEPT_BATCH: usize = 64;
/// Longest wait for room in the channel when sending connections.
const SEND_WAIT: Duration = Duration::from_secs(2);
/// How long accepting pauses after a resource error such as EMFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What a worker is started with.
pub struct WorkerInit {
    /// The configuration to start with.
    pub config: Arc<Config>,
    /// Listening sockets and their manifest entries.
    pub listeners: Vec<(ListenerEntry, OwnedFd)>,
    /// The worker's logger.
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
    /// Certificates of the TLS listeners and CAs of TLS clusters (read by the master).
    pub tls: crate::tls::TlsMaterial,
}

struct ListenerSlot {
    listener: Listener,
    entry: ListenerEntry,
    /// Its bound address, which each session it accepts keeps.
    name: Arc<str>,
    /// More connections may be waiting (the accept batch ran out).
    pending: bool,
}

/// A worker process's event loop.
pub struct Worker {
    poll: Poll,
    listeners: Slab<ListenerSlot>,
    /// The proxy: sessions, upstream connections, timers.
    engine: Engine,
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    channel: Option<Channel>,
    log_file: Option<LogFile>,
    log: Logger,
    /// The shared region, and this worker's place in its per-worker table.
    shared: &'static Shared,
    place: usize,
    /// The loop's clock, read once per turn.
    now: Instant,
    /// When draining ends at the latest.
    drain_deadline: Option<Instant>,
    /// Accepting is paused after a resource error (EMFILE) until then.
    accept_paused_until: Option<Instant>,
    /// Load measurement for the overload controller.
    load: LoadMeter,
    /// Binary upgrade: connections leave for the next generation.
    handing_over: bool,
    /// Connections closed instead of handed over (they could not be sent).
    handover_closed: u64,
    /// Connections refused over `max_connections`, and when last logged.
    refused: u64,
    refused_logged: Instant,
}

/// How often a worker measures its load.
const LOAD_TICK: Duration = Duration::from_millis(100);

/// Time the loop spent waiting in `epoll_wait` since `since`.
struct LoadMeter {
    since: Instant,
    idle: Duration,
}

impl Worker {
    /// A worker with its listeners registered and its first snapshot built.
    pub fn new(init: WorkerInit) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let mut listeners = Slab::new();
        for (entry, fd) in init.listeners {
            add_listener(poll.registry(), &mut listeners, entry, fd)?;
        }
        if let Some(ch) = &init.channel {
            ch.set_nonblocking(true)?;
            poll.registry().register(&mut SourceFd(&ch.raw_fd()), CHANNEL, Interest::READABLE)?;
        }
        let shared = init.slots.shared();
        crate::shm::metrics::install(shared, init.place);
        let registry = poll.registry().try_clone()?;
        let engine = Engine::new(registry, init.config, &init.tls, init.slots, init.place, init.log.clone())
            .map_err(io::Error::other)?;
        Ok(Worker {
            poll,
            listeners,
            engine,
            stop: init.stop,
            quit: init.quit,
            channel: init.channel,
            log_file: init.log_file,
            log: init.log,
            shared,
            place: init.place,
            now: Instant::now(),
            drain_deadline: None,
            accept_paused_until: None,
            load: LoadMeter { since: Instant::now(), idle: Duration::ZERO },
            handing_over: false,
            handover_closed: 0,
            refused: 0,
            refused_logged: Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
        })
    }

    /// Runs until asked to stop.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        for (_, l) in &self.listeners {
            slog::info!(self.log, "listening"; "address" => &l.entry.local, "fd" => l.listener.raw_fd());
        }
        if let Some(ch) = &self.channel {
            ch.send(&ToMaster::Ready { pid: std::process::id() }, &[])?;
        }
        while !self.stop.load(Ordering::Relaxed) {
            if self.quit.swap(false, Ordering::Relaxed) {
                let t = self.engine.current().config.drain_timeout;
                self.start_drain(t);
            }
            if let Some(deadline) = self.drain_deadline {
                if self.engine.sessions() == 0 || Instant::now() >= deadline {
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
                let mut t =
                    self.engine.next_timeout(now).map_or(Duration::from_secs(1), |t| t.min(Duration::from_secs(1)));
                if let Some(p) = paused {
                    t = t.min(p - now);
                }
                if let Some(d) = self.drain_deadline {
                    t = t.min(d.saturating_duration_since(now));
                }
                Some(t)
            };
            // Modules get their tick (and degrade its samples) every LOAD_TICK.
            let timeout = if self.engine.ticking() { timeout.map(|t| t.min(LOAD_TICK)) } else { timeout };
            let before = Instant::now();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            self.engine.set_now(self.now);
            self.load.idle += self.now - before;
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    (Kind::Listener, idx) => {
                        if let Some(l) = self.listeners.get_mut(idx) {
                            l.pending = true;
                        }
                    }
                    (Kind::Client, idx) => self.engine.client_event(idx, ev),
                    (Kind::Upstream, idx) => self.engine.upstream_event(idx, ev),
                    (Kind::Channel, _) => self.channel_event(),
                }
            }
            if self.accept_paused_until.is_none_or(|t| t <= self.now) {
                self.accept_paused_until = None;
                for i in 0..self.listeners.capacity() {
                    if self.listeners.get(i).is_some_and(|l| l.pending) {
                        self.accept(i);
                    }
                }
            }
            self.engine.run_timers();
            self.now = self.engine.now();
            self.hand_over();
            self.measure_load();
        }
        slog::info!(self.log, "worker stopping"; "sessions" => self.engine.sessions());
        if self.handing_over {
            // What could not move by the deadline is closed with the process.
            self.handover_closed += self.engine.sessions() as u64;
            if let Some(ch) = &self.channel {
                let _ = ch.send(&ToMaster::HandoverClosed { closed: self.handover_closed }, &[]);
            }
        }
        self.engine.current().modules.tick();
        Ok(())
    }

    fn accept(&mut self, i: usize) {
        let snap = self.engine.current();
        let max = snap.config.limits.max_connections;
        for _ in 0..ACCEPT_BATCH {
            let (stream, peer) = match self.listeners[i].listener.accept() {
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
                    slog::error!(self.log, "accept failed; pausing accepts for 100 ms"; "error" => %e,
                        "listener" => &self.listeners[i].entry.local);
                    self.accept_paused_until = Some(self.now + ACCEPT_PAUSE);
                    return;
                }
            };
            let tls = snap.tls.get(&self.listeners[i].entry.name);
            if self.engine.sessions() >= max {
                self.refuse_connection(stream, max, tls.is_some());
                continue;
            }
            let on = crate::proxy::AcceptedOn {
                name: &self.listeners[i].name,
                tls,
                redirect_https: snap.redirect_https(&self.listeners[i].entry.name),
            };
            self.engine.open(stream, peer, &on, &snap);
        }
        // The batch ran out: `pending` stays set and the loop polls without
        // waiting, so other sockets get their turn first.
    }

    /// Every `LOAD_TICK`: the share of time the loop was busy and the
    /// requests in flight, published in shared memory and fed to the
    /// overload controller.
    fn measure_load(&mut self) {
        let now = self.now;
        let elapsed = now.saturating_duration_since(self.load.since);
        if elapsed < LOAD_TICK {
            return;
        }
        self.engine.current().modules.tick();
        let busy = elapsed.saturating_sub(self.load.idle);
        let busy_percent = (busy.as_micros() * 100 / elapsed.as_micros().max(1)) as u32;
        self.load = LoadMeter { since: now, idle: Duration::ZERO };
        let in_flight = self.engine.in_flight();
        if let Some(w) = self.shared.workers.get(self.place) {
            w.pid.store(std::process::id(), Ordering::Relaxed);
            w.busy_percent.store(busy_percent, Ordering::Relaxed);
            w.in_flight.store(in_flight, Ordering::Relaxed);
        }
        self.engine.load_sample(now, busy_percent, in_flight);
        self.engine.publish_gauges();
    }

    /// Over `max_connections`: a 503 and a close. What the client already
    /// sent is read first and the close is a FIN, not a reset that could
    /// destroy the 503 on its way. A TLS client gets no 503 (it cannot
    /// read one before a handshake): it is closed.
    fn refuse_connection(&mut self, mut stream: crate::net::Stream, max: usize, tls: bool) {
        use std::io::{Read, Write};
        self.refused += 1;
        crate::shm::metrics::add(&crate::shm::metrics::here().refused, 1);
        if tls {
            drop(stream);
            self.log_refused(max);
            return;
        }
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
        self.log_refused(max);
    }

    fn log_refused(&mut self, max: usize) {
        // One line per second at most under a connection storm.
        if self.now.saturating_duration_since(self.refused_logged) >= Duration::from_secs(1) {
            slog::warn!(self.log, "connection limit reached; refusing connections"; "max_connections" => max,
                "refused_total" => self.refused);
            self.refused_logged = self.now;
        }
    }

    /// Messages from the master.
    fn channel_event(&mut self) {
        loop {
            let Some(ch) = self.channel.as_ref() else { return };
            match ch.recv::<ToWorker>() {
                Ok(None) => return,
                Ok(Some((
                    ToWorker::Configure {
                        seq,
                        config_path,
                        config_text,
                        config_form,
                        listeners,
                        backend_slots,
                        tls,
                        resolved,
                    },
                    fds,
                ))) => {
                    let started = Instant::now();
                    let (retired, error) = match self.reconfigure(
                        &Incoming {
                            path: &config_path,
                            text: &config_text,
                            form: config_form.as_ref(),
                            resolved: &resolved,
                            tls: &tls,
                        },
                        listeners,
                        backend_slots,
                        fds,
                    ) {
                        Ok(r) => (Some(r), None),
                        Err(e) => (None, Some(e)),
                    };
                    let took = started.elapsed();
                    match &error {
                        None => {
                            crate::shm::metrics::here().reload_apply.observe(took.as_micros() as u64);
                            // (slog writes the pairs last first: `seq` leads the line.)
                            slog::info!(self.log, "configuration reloaded";
                                "apply_ms" => format!("{:.1}", took.as_secs_f64() * 1000.0), "seq" => seq);
                        }
                        Some(e) => slog::error!(self.log, "reload refused"; "seq" => seq, "error" => e),
                    }
                    if let Some(ch) = &self.channel {
                        let _ = ch.send(&ToMaster::Configured { seq, error }, &[]);
                    }
                    // The old configuration is freed once the master knows.
                    drop(retired);
                }
                Ok(Some((ToWorker::Files { paths }, fds))) => {
                    if let Err(e) = crate::log::take_over(&paths, fds) {
                        slog::error!(self.log, "files from the master refused"; "error" => e);
                    }
                }
                Ok(Some((ToWorker::Drain { timeout_ms }, _))) => self.start_drain(Duration::from_millis(timeout_ms)),
                Ok(Some((ToWorker::HandOver { timeout_ms }, _))) => {
                    self.start_handover(Duration::from_millis(timeout_ms));
                }
                Ok(Some((ToWorker::Adopt { conns }, fds))) => self.adopt(&conns, fds),
                Ok(Some((ToWorker::Reopen, mut fds))) => {
                    // Modules' own files (access logs), in their writer threads.
                    self.engine.current().modules.reopen();
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
                            slog::error!(self.log, "cannot reopen the log file"; "error" => %e);
                        }
                    }
                }
                Err(e) => {
                    // The master is gone (or the channel broke): finish what
                    // is in flight and leave, rather than serve unmanaged.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        slog::warn!(self.log, "master is gone; draining");
                    } else {
                        slog::error!(self.log, "master channel failed; draining"; "error" => %e);
                    }
                    if let Some(ch) = self.channel.take() {
                        let _ = self.poll.registry().deregister(&mut SourceFd(&ch.raw_fd()));
                    }
                    if self.handing_over {
                        // Nowhere to hand connections to any more.
                        self.handing_over = false;
                        self.engine.stop_handover();
                    }
                    let t = self.engine.current().config.drain_timeout;
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
        served: &Incoming<'_>,
        entries: Vec<ListenerEntry>,
        backend_slots: Vec<(String, u32)>,
        fds: Vec<OwnedFd>,
    ) -> Result<crate::proxy::Retired, String> {
        let Incoming { path, text, form, resolved, tls } = *served;
        let config = Config::parse_sent(std::path::Path::new(path), text, form).map_err(|e| e.to_string())?;
        let config = config.into_resolved(resolved);
        // The region is the one this worker mapped at start; the copy is dropped.
        let (fds, _region) = split_fds(&entries, fds)?;
        self.engine.set_slots(&backend_slots);
        if self.drain_deadline.is_none() {
            let stale: Vec<usize> =
                self.listeners.iter().filter(|(_, l)| !entries.contains(&l.entry)).map(|(i, _)| i).collect();
            for i in stale {
                let mut slot = self.listeners.remove(i);
                let _ = self.poll.registry().deregister(&mut slot.listener);
                slog::info!(self.log, "listener closed"; "address" => &slot.entry.local);
            }
            for (entry, fd) in entries.into_iter().zip(fds) {
                if self.listeners.iter().any(|(_, l)| l.entry == entry) {
                    continue; // Already listening: the duplicate fd is dropped.
                }
                slog::info!(self.log, "listening"; "address" => &entry.local);
                add_listener(self.poll.registry(), &mut self.listeners, entry, fd).map_err(|e| e.to_string())?;
            }
        }
        self.engine.reconfigure(Arc::new(config), tls)
    }

    /// Stops accepting; requests in flight finish (answered with
    /// `Connection: close`), idle connections last until the deadline.
    fn start_drain(&mut self, timeout: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        slog::info!(self.log, "draining"; "sessions" => self.engine.sessions(), "timeout_ms" => timeout.as_millis() as u64);
        self.stop_accepting(timeout);
        self.engine.start_drain();
    }

    /// Binary upgrade: stops accepting; each connection goes to the master
    /// (for the next generation) as soon as it can move (`hand_over`),
    /// still served with keep-alive until then. What cannot move by the
    /// deadline is closed.
    fn start_handover(&mut self, timeout: Duration) {
        if self.drain_deadline.is_some() || self.channel.is_none() {
            return self.start_drain(timeout);
        }
        slog::info!(self.log, "handing connections over to the next generation"; "sessions" => self.engine.sessions(),
            "timeout_ms" => timeout.as_millis() as u64);
        self.stop_accepting(timeout);
        self.handing_over = true;
        self.engine.start_handover();
    }

    fn stop_accepting(&mut self, timeout: Duration) {
        for (_, mut slot) in std::mem::take(&mut self.listeners) {
            let _ = self.poll.registry().deregister(&mut slot.listener);
        }
        self.drain_deadline = Some(Instant::now() + timeout);
    }

    /// While handing over: sends the connections that can move now to the
    /// master, in batches. A batch that cannot be sent is taken back and
    /// the worker drains instead (`Connection: close`).
    fn hand_over(&mut self) {
        if !self.handing_over {
            return;
        }
        let mut moving = self.engine.take_movable();
        while !moving.is_empty() {
            let batch: Vec<Detached> = moving.drain(..moving.len().min(HANDOVER_BATCH)).collect();
            let conns: Vec<HandedConn> = batch.iter().map(|d| d.state.clone()).collect();
            let fds: Vec<RawFd> = batch.iter().flat_map(Detached::raw_fds).collect();
            let sent = match &self.channel {
                Some(ch) => ch.send_wait(&ToMaster::Handover { conns }, &fds, SEND_WAIT),
                None => Err(ChannelError::Closed),
            };
            match sent {
                Ok(()) => slog::debug!(self.log, "connections handed over"; "count" => batch.len()),
                Err(e) => {
                    slog::error!(self.log, "cannot hand connections over; draining them instead"; "error" => %e);
                    self.handing_over = false;
                    self.engine.stop_handover();
                    for d in batch.into_iter().chain(moving.drain(..)) {
                        if self.engine.adopt(&d.state, (d.client, d.upstream)).is_err() {
                            self.handover_closed += 1;
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Connections handed over by a worker of another generation.
    fn adopt(&mut self, conns: &[HandedConn], fds: Vec<OwnedFd>) {
        let need: usize = conns.iter().map(HandedConn::fds).sum();
        if need != fds.len() {
            slog::error!(self.log, "handed-over connections refused: fds do not match"; "connections" => conns.len(),
                "expected_fds" => need, "fds" => fds.len());
            return;
        }
        let mut fds = fds.into_iter();
        let mut failed = 0;
        for c in conns {
            let (Some(client), upstream) = (fds.next(), if c.tunnel.is_some() { fds.next() } else { None }) else {
                break;
            };
            if let Err(e) = self.engine.adopt(c, (client, upstream)) {
                failed += 1;
                slog::warn!(self.log, "cannot take a handed-over connection; closed"; "error" => %e);
            }
        }
        slog::debug!(self.log, "connections taken over"; "count" => conns.len() - failed, "failed" => failed);
    }
}

/// A configuration as the master sent it: its file, resolved text, the
/// addresses of its backend names and its TLS listeners' certificates.
#[derive(Clone, Copy)]
struct Incoming<'a> {
    path: &'a str,
    text: &'a str,
    /// The master's parse of `text` (`Config::parse_sent`).
    form: Option<&'a crate::config::Form>,
    resolved: &'a [crate::config::ResolvedName],
    tls: &'a crate::tls::TlsMaterial,
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
    registry.register(&mut listener, token::token(Kind::Listener, e.key()), Interest::READABLE)?;
    let name = Arc::from(entry.local.as_str());
    e.insert(ListenerSlot { listener, entry, name, pending: false });
    Ok(())
}

/// Runs a worker until it is stopped or has drained.
pub fn run(init: WorkerInit) -> io::Result<()> {
    crate::proxy::install_panic_hook();
    let mut w = Worker::new(init)?;
    w.run()
}
