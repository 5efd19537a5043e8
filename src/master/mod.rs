//! The master process: owns the listening sockets, the pid file and the
//! control socket, starts and supervises the workers, reloads the
//! configuration into them and hands everything to a new binary on
//! upgrade. It never touches request traffic. Fleet-scoped limits have
//! a lease thread here (`crate::fleet`), started and stopped with the
//! configuration, that takes tokens from Redis into the shared region.
//!
//! One `mio` loop watches: a self-pipe woken by signals (the handlers only
//! set flags), the control socket, each worker's channel, the resolver
//! thread's waker (backend names) and, during an upgrade, the channel
//! between the old and the new master. Deadlines
//! (respawn back-off, upgrade timeout, stop) are checked on every turn; the
//! loop wakes at least every `TICK`.

mod admin;
mod control;
pub mod daemon;
mod health;
mod listeners;
mod pidfile;
mod resolver;
mod upgrade;

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use slog::Logger;

use crate::channel::{self, Channel, ToMaster, ToWorker, WORKER_FD_ENV};
use crate::config::{Config, ListenerConfig};

use crate::log::Log;
use crate::shm::{Region, SlotTable};
use listeners::Bound;

pub use admin::handover_name as admin_handover_name;
pub use pidfile::{read_pid, running_master, NotRunning, PidFile};
pub use upgrade::{Handover, Received};

/// Longest sleep of the master loop.
const TICK: Duration = Duration::from_millis(100);
/// A worker that dies sooner than this after starting counts as crashing.
const MIN_HEALTHY_LIFE: Duration = Duration::from_secs(2);
/// First and largest respawn delays for a crashing worker.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long workers get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const UPGRADE: Token = Token(2);
/// A new master's channel to the old one.
const PREDECESSOR: Token = Token(3);
/// Worker channels: `WORKER_BASE + pid`.
const WORKER_BASE: usize = 16;

/// The user workers run as when the master is root and the configuration
/// names none (nginx's default).
pub const DEFAULT_WORKER_USER: &str = "nobody";

/// The user a root master's workers switch to.
pub fn worker_user(config: &Config) -> &str {
    config.user.as_deref().unwrap_or(DEFAULT_WORKER_USER)
}

/// How the master was started.
pub struct MasterArgs {
    /// Absolute path of the configuration file.
    pub config_path: PathBuf,
    /// The binary's path at start, for `SIGUSR2` (the file there may be
    /// replaced later: that is the point of an upgrade).
    pub exe: PathBuf,
    /// The arguments the master was started with (after argv[0]).
    pub argv: Vec<OsString>,
    /// The pid file, locked before anything was bound; held for the
    /// master's life.
    pub pid_file: PidFile,
}

/// What a new master takes over from the old one in a binary upgrade
/// (nothing, at a first start).
#[derive(Default)]
pub struct Inherited {
    /// The shared region and its backend slots.
    pub shared: Option<(Region, Vec<(String, u32)>)>,
    /// The admin listening socket, when the configuration keeps its address.
    pub admin: Option<OwnedFd>,
}

/// A configuration as the master serves it: validated, its text resolved
/// (what workers parse), and the certificates of its TLS listeners read
/// from their files (what workers get instead of the files).
pub struct Served {
    /// The configuration.
    pub config: Config,
    /// Its resolved text.
    pub text: String,
    /// The parse of `text`, for the workers (`config::Loaded::form`).
    pub form: Option<crate::config::Form>,
    /// Parsed certificates and keys of every TLS listener, and the CA
    /// certificates of TLS clusters.
    pub tls: crate::tls::TlsMaterial,
}

/// A worker process.
struct WorkerProc {
    pid: Pid,
    /// Index of its slot: its place in the shared per-worker tables.
    place: usize,
    chan: Channel,
    started: Instant,
    ready: bool,
    /// Last configuration sequence the worker confirmed.
    acked: u64,
    /// Access-log lines it reported dropped.
    access_log_dropped: u64,
}

/// One of the `workers` places: a process, or a respawn pending.
#[derive(Default)]
struct Slot {
    proc: Option<WorkerProc>,
    respawn_at: Option<Instant>,
    backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Draining workers, then exit (QUIT, or replaced by a new master).
    Quitting {
        replaced: bool,
    },
    /// Workers were sent SIGTERM; exit when they are gone or at the deadline.
    Stopping {
        deadline: Instant,
    },
}

/// Signal flags, set by handlers, read by the loop.
struct Signals {
    pipe: StdUnixStream,
    hup: Arc<AtomicBool>,
    usr1: Arc<AtomicBool>,
    usr2: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    chld: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
        let (read, write) = StdUnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let flag = || Arc::new(AtomicBool::new(false));
        let s =
            Signals { pipe: read, hup: flag(), usr1: flag(), usr2: flag(), quit: flag(), term: flag(), chld: flag() };
        for (sig, f) in [
            (SIGHUP, &s.hup),
            (SIGUSR1, &s.usr1),
            (SIGUSR2, &s.usr2),
            (SIGQUIT, &s.quit),
            (SIGTERM, &s.term),
            (SIGINT, &s.term),
            (SIGCHLD, &s.chld),
        ] {
            signal_hook::flag::register(sig, f.clone())?;
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
        }
        Ok(s)
    }

    fn drain_pipe(&mut self) {
        let mut buf = [0u8; 64];
        while matches!(self.pipe.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// The master process state.
pub struct Master {
    args: MasterArgs,
    log: Log,
    /// The configuration in force, its backend names' addresses added to
    /// their clusters (what workers, health checks, `ctl` and `/metrics` see).
    config: Arc<Config>,
    /// The configuration as loaded (names not resolved): `config` is made
    /// from it again whenever a name's addresses change.
    loaded: Arc<Config>,
    /// Backend names: their addresses and their re-resolution.
    resolver: resolver::Resolver,
    config_text: String,
    /// The parse of `config_text` sent with it.
    config_form: Option<crate::config::Form>,
    /// Certificates of the TLS listeners, sent with every `Configure`.
    tls: crate::tls::TlsMaterial,
    listeners: Vec<Bound>,
    slots: Vec<Slot>,
    /// Workers being drained away (after a reload lowered `workers`).
    retiring: Vec<WorkerProc>,
    seq: u64,
    poll: Poll,
    signals: Signals,
    control: Option<std::os::unix::net::UnixListener>,
    /// (device, inode) of the control socket file this master bound.
    control_id: Option<(u64, u64)>,
    pending: Vec<control::Pending>,
    /// Control connections whose request is still arriving.
    control_clients: Vec<control::Client>,
    next_client: usize,
    control_refused: control::Refusals,
    /// Access-log lines dropped by workers that have exited.
    access_log_dropped_gone: u64,
    upgrade: Option<upgrade::Upgrade>,
    /// After an upgrade: the channel to the new master, which takes this
    /// generation's connections (or gives them back after a failed one).
    successor: Option<upgrade::Successor>,
    /// This master is the new one of an upgrade: the channel to the old
    /// master while its generation is still there.
    predecessor: Option<upgrade::Predecessor>,
    /// Connections handed between generations, and those waiting for a
    /// ready worker.
    handoffs: upgrade::Handoffs,
    /// Shared memory of the instance, and its backend slots.
    region: Region,
    backend_slots: SlotTable,
    health: health::Checker,
    /// Lease threads of the fleet-scoped limits (tokens from Redis).
    fleet: crate::fleet::Leasers,
    state: State,
    /// When draining workers are killed anyway.
    quit_deadline: Option<Instant>,
    /// Last look for worker places held by processes that are gone.
    places_swept: Instant,
    /// The `[admin]` listener (metrics, status), when configured.
    admin: Option<admin::Admin>,
}

impl Master {
    fn logger(&self) -> &Logger {
        &self.log.logger
    }

    /// Starts a master with its listeners bound (or received) already.
    pub fn start(
        args: MasterArgs,
        served: Served,
        listeners: Vec<(ListenerConfig, Vec<OwnedFd>)>,
        log: Log,
        handover: Option<Channel>,
        inherited: Inherited,
    ) -> Result<Master, (io::Error, Log)> {
        let Inherited { shared, admin: admin_fd } = inherited;
        let Served { config, text: config_text, form: config_form, tls } = served;
        // Backend names are resolved before any worker starts (load time:
        // the loop does not run yet).
        let (resolved, unresolved) = crate::dns::resolve_config(&config, &[], crate::dns::LOOKUP_TIMEOUT);
        for u in &unresolved {
            if u.required {
                let e = io::Error::other(u.to_config_error().to_string());
                return Err((e, log));
            }
            slog::warn!(log.logger, "backend name does not resolve; retried every resolve_interval_ms"; "name" => &u.name,
                "cluster" => &u.cluster, "file" => %u.file.display(), "line" => u.line, "reason" => &u.reason);
        }
        let loaded = Arc::new(config);
        let config = loaded.with_resolved(&resolved);
        let mut resolver = resolver::Resolver::new(Vec::new());
        resolver.configure(&loaded, resolved);
        let setup = || -> io::Result<(Poll, Signals)> {
            let poll = Poll::new()?;
            let mut signals = Signals::install()?;
            poll.registry().register(&mut SourceFd(&signals.pipe.as_raw_fd()), SIGNALS, Interest::READABLE)?;
            signals.drain_pipe();
            Ok((poll, signals))
        };
        let (poll, signals) = match setup() {
            Ok(x) => x,
            Err(e) => return Err((e, log)),
        };
        let listeners = match listeners.into_iter().map(|(c, fds)| Bound::new(c, fds)).collect() {
            Ok(l) => l,
            Err(e) => return Err((e, log)),
        };
        // The shared region: the predecessor's after an upgrade (its state
        // carries over), else a fresh one.
        let (region, slots) = match shared {
            Some((region, entries)) => {
                let mut t = SlotTable::new(region.shared(), true);
                t.extend(&entries);
                (region, t)
            }
            None => {
                let region = match Region::create() {
                    Ok(r) => r,
                    Err(e) => return Err((e, log)),
                };
                let t = SlotTable::new(region.shared(), true);
                (region, t)
            }
        };
        let mut m = Master {
            args,
            log,
            config: Arc::new(config),
            loaded,
            resolver,
            config_text,
            config_form,
            tls,
            listeners,
            slots: Vec::new(),
            retiring: Vec::new(),
            seq: 1,
            poll,
            signals,
            control: None,
            control_id: None,
            pending: Vec::new(),
            control_clients: Vec::new(),
            next_client: 0,
            control_refused: control::Refusals::default(),
            access_log_dropped_gone: 0,
            upgrade: None,
            successor: None,
            predecessor: None,
            handoffs: upgrade::Handoffs::default(),
            region,
            backend_slots: slots,
            health: health::Checker::default(),
            fleet: crate::fleet::Leasers::default(),
            state: State::Running,
            quit_deadline: None,
            places_swept: Instant::now(),
            admin: None,
        };
        m.assign_slots(None);
        let p = &m.region.shared().metrics.process;
        p.generation.fetch_add(1, Ordering::Relaxed);
        let _ = p.started_s.compare_exchange(0, unix_now(), Ordering::Relaxed, Ordering::Relaxed);
        if let Err(e) = m.configure_admin(admin_fd) {
            m.cleanup();
            return Err((e, m.log));
        }
        m.rotate_ticket_keys();
        m.health.configure(&m.config, &m.tls, &mut m.backend_slots, m.poll.registry(), &m.log.logger);
        m.fleet.configure(&m.config, m.region.shared(), &m.log.logger);
        if let Err(e) = m.write_pid_file().and_then(|()| m.bind_control()) {
            m.cleanup();
            return Err((e, m.log));
        }
        for b in &m.listeners {
            slog::info!(m.logger(), "listening"; "address" => &b.entry.local, "backlog" => b.config.backlog,
                "reuseport_sockets" => if b.config.reuseport { b.fds.len() } else { 0 });
        }
        let n = m.config.workers;
        m.slots.resize_with(n, Slot::default);
        if let Some(ch) = handover {
            // Rolling start: the workers start one at a time (`handover_tick`).
            if let Err(e) = m.take_predecessor(ch) {
                m.cleanup();
                return Err((e, m.log));
            }
        } else {
            for i in 0..n {
                m.spawn(i);
            }
        }
        slog::info!(m.logger(), "master started"; "workers" => n, "config" => %m.args.config_path.display());
        if nix::unistd::geteuid().is_root() {
            let user = worker_user(&m.config);
            let why = if m.config.user.is_some() { "configured" } else { "default: no user in the configuration" };
            slog::info!(m.logger(), "workers run as user {user} ({why})"; "user" => user);
            if user == "root" {
                slog::warn!(m.logger(), "workers run as root (user = \"root\"): a compromised worker owns the host");
            }
        }
        Ok(m)
    }

    /// Runs until the master exits; returns the exit status.
    pub fn run(mut self) -> i32 {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let wait = self.health.next_due(now).map_or(TICK, |d| d.min(TICK));
            let wait = self.resolver.next_due(now).map_or(wait, |d| d.min(wait));
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    slog::crit!(self.logger(), "poll failed"; "error" => %e);
                    return 1;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.signals.drain_pipe(),
                    CONTROL => self.accept_control(),
                    UPGRADE => self.upgrade_event(),
                    admin::LISTENER => self.accept_admin(),
                    PREDECESSOR => self.predecessor_event(),
                    resolver::TOKEN => self.resolver_answers(),
                    Token(t) if t >= health::PROBE_BASE => {
                        self.health.event(ev.token(), self.poll.registry(), &self.log.logger);
                    }
                    Token(t) if t >= admin::CLIENT_BASE => self.admin_client_event(t - admin::CLIENT_BASE),
                    Token(t) if t >= control::CLIENT_BASE => self.control_client_event(t - control::CLIENT_BASE),
                    Token(t) if t >= WORKER_BASE => self.worker_event(Pid::from_raw((t - WORKER_BASE) as i32)),
                    _ => {}
                }
            }
            self.handle_signals();
            self.tick();
            if let Some(code) = self.finished() {
                self.cleanup();
                slog::info!(self.logger(), "master exiting"; "status" => code);
                return code;
            }
        }
    }

    fn handle_signals(&mut self) {
        if self.signals.chld.swap(false, Ordering::Relaxed) {
            self.reap();
        }
        if self.signals.term.swap(false, Ordering::Relaxed) {
            self.stop();
        }
        if self.signals.quit.swap(false, Ordering::Relaxed) {
            self.quit(false);
        }
        if self.signals.hup.swap(false, Ordering::Relaxed) {
            match self.reload() {
                Ok(seq) => slog::info!(self.logger(), "reload sent to workers (SIGHUP)"; "seq" => seq),
                Err(e) => slog::error!(self.logger(), "reload refused; the running configuration stays"; "error" => %e),
            }
        }
        if self.signals.usr1.swap(false, Ordering::Relaxed) {
            self.reopen();
        }
        if self.signals.usr2.swap(false, Ordering::Relaxed) {
            if let Err((_, e)) = self.start_upgrade(None) {
                slog::error!(self.logger(), "upgrade refused"; "error" => %e);
            }
        }
    }

    /// Deadlines: respawns, upgrade timeout, pending replies, stop.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.state == State::Running {
            for i in 0..self.slots.len() {
                if self.slots[i].proc.is_none() && self.slots[i].respawn_at.is_some_and(|t| t <= now) {
                    self.spawn(i);
                }
            }
        }
        if self.state == State::Running {
            self.health.tick(self.poll.registry(), &self.log.logger);
            self.resolver.tick(&self.loaded, self.poll.registry(), &self.log.logger);
        }
        self.sweep_places(now);
        self.rotate_ticket_keys();
        self.upgrade_tick(now);
        self.handover_tick();
        self.deliver_parked();
        self.reply_pending(now);
        self.expire_control_clients(now);
        self.expire_admin_clients(now);
        if let Some(d) = self.quit_deadline {
            if now >= d {
                self.quit_deadline = None;
                slog::warn!(self.logger(), "drain deadline passed; killing the remaining workers");
                self.signal_workers(Signal::SIGKILL);
            }
        }
        if let State::Stopping { deadline } = self.state {
            if now >= deadline {
                self.signal_workers(Signal::SIGKILL);
            }
        }
    }

    /// `Some(status)` when the master should exit now.
    fn finished(&self) -> Option<i32> {
        let live = self.slots.iter().any(|s| s.proc.is_some()) || !self.retiring.is_empty();
        match self.state {
            State::Running => None,
            State::Quitting { .. } | State::Stopping { .. } if !live => Some(0),
            _ => None,
        }
    }

    /// Starts the worker of slot `i`.
    fn spawn(&mut self, i: usize) {
        self.slots[i].respawn_at = None;
        let place = self.claim_place();
        match self.spawn_process(i, place) {
            Ok(p) => {
                self.region.shared().hold_place(place, p.pid.as_raw() as u32);
                slog::info!(self.logger(), "worker started"; "slot" => i, "place" => place, "worker_pid" => p.pid.as_raw());
                self.slots[i].proc = Some(p);
            }
            Err(e) => {
                let me = std::process::id();
                self.region.shared().release_place(place, me, me);
                let slot = &mut self.slots[i];
                slot.backoff = (slot.backoff * 2).clamp(BACKOFF_START, BACKOFF_MAX);
                slot.respawn_at = Some(Instant::now() + slot.backoff);
                slog::error!(self.log.logger, "cannot start a worker"; "slot" => i, "error" => %e, "retry_in_ms" => slot.backoff.as_millis() as u64);
                if self.rolling() {
                    self.slots[i].respawn_at = None;
                    self.abort_rolling(format!("cannot start a new worker: {e}"));
                }
            }
        }
    }

    /// A place in the shared per-worker tables for a new worker: one that
    /// no live worker of any generation holds (an old generation may still
    /// be draining on its places during an upgrade), so that a worker's
    /// exit clears only its own counts. See `Shared::claim_place`.
    fn claim_place(&self) -> usize {
        match self.region.shared().claim_place(std::process::id()) {
            Some(place) => place,
            None => {
                slog::warn!(self.log.logger, "every worker place is held; this worker's counts are not tracked per place";
                    "places" => crate::shm::MAX_WORKERS);
                crate::shm::MAX_WORKERS
            }
        }
    }

    /// A worker exited: its counts are taken out of the shared totals and
    /// its place is freed (unless a master that found it gone did so).
    fn release_place(&self, p: &WorkerProc) {
        self.region.shared().release_place(p.place, p.pid.as_raw() as u32, std::process::id());
    }

    /// Once a second: frees the places of workers that are gone without
    /// their master freeing them (a new master rolled back, a master
    /// killed), so their requests in flight stop counting.
    fn sweep_places(&mut self, now: Instant) {
        if now.duration_since(self.places_swept) < Duration::from_secs(1) {
            return;
        }
        self.places_swept = now;
        let freed = self.region.shared().reclaim_places();
        if freed > 0 {
            slog::info!(self.log.logger, "freed the places of workers that are gone"; "places" => freed);
        }
    }

    /// fork + exec of our own binary (`/proc/self/exe`, so a worker always
    /// matches its master even if the file at our path was replaced), with
    /// the channel as an inherited fd, then the configuration and the
    /// listeners over the channel.
    fn spawn_process(&mut self, slot: usize, place: usize) -> io::Result<WorkerProc> {
        #[cfg(feature = "fault-injection")]
        self.injected_spawn_failure()?;
        let (mine, theirs) = Channel::pair()?;
        let fd = theirs.inheritable()?;
        let child = Command::new("/proc/self/exe")
            .arg0("pitcher: worker process")
            .arg("--worker")
            .arg("-c")
            .arg(&self.args.config_path)
            .env(WORKER_FD_ENV, fd.to_string())
            .env(channel::WORKER_PLACE_ENV, place.to_string())
            .env(MALLOC_TUNABLES_ENV, worker_malloc_tunables(std::env::var(MALLOC_TUNABLES_ENV).ok()))
            .env_remove(channel::UPGRADE_FD_ENV)
            .stdin(Stdio::null())
            .spawn()?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped by waitpid(-1) on SIGCHLD; `Child` is not waited.
        drop(child);
        let p = WorkerProc {
            pid,
            place,
            chan: mine,
            started: Instant::now(),
            ready: false,
            acked: self.seq,
            access_log_dropped: 0,
        };
        self.send_files(&p.chan)?;
        p.chan.send(&self.configure_message(), &self.message_fds(slot))?;
        p.chan.set_nonblocking(true)?;
        self.poll.registry().register(
            &mut SourceFd(&p.chan.raw_fd()),
            Token(WORKER_BASE + pid.as_raw() as usize),
            Interest::READABLE,
        )?;
        Ok(p)
    }

    /// Opens the files workers write (the error log, access logs) and
    /// sends them to a worker: running as `nobody`, it may not be allowed
    /// to open them. A file the master cannot open is logged and left to
    /// the worker. Opened without blocking (a FIFO with no reader would
    /// stall the master), then made blocking for the worker's writer.
    fn send_files(&self, chan: &Channel) -> Result<(), channel::ChannelError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut paths = Vec::new();
        let mut files = Vec::new();
        for p in self.config.log_files() {
            let opened = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&p)
                .and_then(|f| {
                    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND))?;
                    Ok(f)
                });
            match opened {
                Ok(f) => {
                    paths.push(p.to_string_lossy().into_owned());
                    files.push(f);
                }
                Err(e) => {
                    slog::error!(self.log.logger, "cannot open a log file for the workers"; "path" => %p.display(), "error" => %e);
                }
            }
        }
        if paths.is_empty() {
            return Ok(());
        }
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        chan.send(&ToWorker::Files { paths }, &fds)
    }

    fn configure_message(&self) -> ToWorker {
        ToWorker::Configure {
            seq: self.seq,
            config_path: self.args.config_path.to_string_lossy().into_owned(),
            config_text: self.config_text.clone(),
            config_form: self.config_form.clone(),
            listeners: self.listeners.iter().map(|b| b.entry.clone()).collect(),
            backend_slots: self.backend_slots.entries(),
            tls: self.tls.clone(),
            resolved: self.resolver.current().to_vec(),
        }
    }

    /// Draws the first TLS session-ticket key of a new region, and a new
    /// one each `tls_ticket_key_rotation` (after an upgrade, the schedule
    /// goes on from the old master's last key).
    fn rotate_ticket_keys(&self) {
        let period = self.config.tls_ticket_key_rotation.as_millis() as u64;
        if crate::tls::tickets::rotate_if_due(&self.region.shared().tickets, crate::shm::now_ms(), period) {
            slog::info!(self.logger(), "TLS session-ticket key rotated"; "rotation_ms" => period);
        }
    }

    /// Gives every backend of the configuration a shared slot. A backend
    /// that a reload adds (or adds back) starts afresh: no old counters,
    /// ejection or health verdict, and a slow start from now.
    fn assign_slots(&mut self, previous: Option<&Config>) {
        let now = crate::shm::now_ms();
        for c in &self.config.clusters {
            for b in &c.backends {
                let added = previous
                    .is_some_and(|p| !p.clusters.iter().any(|pc| pc.backends.iter().any(|pb| pb.addr == b.addr)));
                match self.backend_slots.slot_of(&b.addr) {
                    Some(n) if added => self.backend_slots.shm(n).reset(now),
                    Some(_) => {}
                    None => {
                        slog::warn!(self.log.logger, "shared slots are full; this backend has no shared health state";
                        "backend" => %b.addr, "slots" => crate::shm::MAX_BACKENDS);
                    }
                }
            }
        }
    }

    /// Messages from a worker.
    fn worker_event(&mut self, pid: Pid) {
        loop {
            let Some(p) = self.find_worker(pid) else { return };
            match p.chan.recv::<ToMaster>() {
                Ok(None) => return,
                Ok(Some((ToMaster::Ready { .. }, _))) => {
                    p.ready = true;
                    slog::debug!(self.log.logger, "worker ready"; "worker_pid" => pid.as_raw());
                }
                Ok(Some((ToMaster::Dropped { access_log_lines }, _))) => {
                    p.access_log_dropped = p.access_log_dropped.max(access_log_lines);
                }
                Ok(Some((ToMaster::Handover { conns }, fds))) => self.route_from_worker(conns, fds),
                Ok(Some((ToMaster::HandoverClosed { closed }, _))) => {
                    self.handoffs.closed += closed;
                    self.report_generation();
                }
                Ok(Some((ToMaster::Configured { seq, error }, _))) => {
                    p.acked = p.acked.max(seq);
                    if let Some(e) = error {
                        slog::error!(self.log.logger, "worker refused a configuration"; "worker_pid" => pid.as_raw(), "seq" => seq, "error" => e);
                    }
                }
                Err(_) => {
                    // Channel closed: the process is exiting; SIGCHLD follows.
                    let fd = p.chan.raw_fd();
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                    return;
                }
            }
        }
    }

    fn find_worker(&mut self, pid: Pid) -> Option<&mut WorkerProc> {
        self.slots.iter_mut().filter_map(|s| s.proc.as_mut()).chain(self.retiring.iter_mut()).find(|p| p.pid == pid)
    }

    /// Collects exited children and restarts workers that died.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let how = match status {
                WaitStatus::Exited(_, code) => format!("exit status {code}"),
                WaitStatus::Signaled(_, sig, core) => {
                    format!("killed by {sig}{}", if core { " (core dumped)" } else { "" })
                }
                other => format!("{other:?}"),
            };
            let clean = matches!(status, WaitStatus::Exited(_, 0));
            if self.upgrade_child_exited(pid, &how, clean) {
                continue;
            }
            // What it sent before exiting (connections it handed over, its
            // counts) is read before its channel is dropped: SIGCHLD may be
            // handled before the channel's readiness in the same turn.
            self.worker_event(pid);
            if let Some(i) = self.retiring.iter().position(|p| p.pid == pid) {
                let p = self.retiring.remove(i);
                self.access_log_dropped_gone += p.access_log_dropped;
                self.release_place(&p);
                slog::info!(self.logger(), "drained worker exited"; "worker_pid" => pid.as_raw(), "how" => &how);
                self.report_generation();
                continue;
            }
            let Some(i) = self.slots.iter().position(|s| s.proc.as_ref().is_some_and(|p| p.pid == pid)) else {
                slog::debug!(self.logger(), "reaped a child"; "child_pid" => pid.as_raw(), "how" => &how);
                continue;
            };
            let p = self.slots[i].proc.take().expect("slot has the process");
            self.access_log_dropped_gone += p.access_log_dropped;
            let _ = self.poll.registry().deregister(&mut SourceFd(&p.chan.raw_fd()));
            // Its backend connections died with it.
            self.release_place(&p);
            if self.state != State::Running {
                slog::info!(self.logger(), "worker exited"; "slot" => i, "worker_pid" => pid.as_raw(), "how" => &how);
                continue;
            }
            if self.rolling() {
                self.abort_rolling(format!("a new worker exited ({how})"));
                continue;
            }
            let slot = &mut self.slots[i];
            if p.started.elapsed() < MIN_HEALTHY_LIFE {
                slot.backoff = (slot.backoff * 2).clamp(BACKOFF_START, BACKOFF_MAX);
            } else {
                slot.backoff = Duration::ZERO;
            }
            slot.respawn_at = Some(Instant::now() + slot.backoff);
            self.region.shared().metrics.process.worker_respawns.fetch_add(1, Ordering::Relaxed);
            slog::error!(self.log.logger, "worker died; restarting it"; "slot" => i, "worker_pid" => pid.as_raw(), "how" => &how,
                "restart_in_ms" => slot.backoff.as_millis() as u64);
            if slot.backoff.is_zero() {
                self.spawn(i);
            }
        }
    }

    /// Re-reads and validates the configuration and sends it to the
    /// workers. Invalid: nothing changes. Returns the sequence number the
    /// workers confirm.
    pub fn reload(&mut self) -> Result<u64, ReloadError> {
        let r = self.try_reload();
        let p = &self.region.shared().metrics.process;
        match &r {
            Ok(_) => {
                p.reloads_ok.fetch_add(1, Ordering::Relaxed);
                p.generation.fetch_add(1, Ordering::Relaxed);
                p.last_reload_ok_s.store(unix_now(), Ordering::Relaxed);
            }
            Err(_) => {
                p.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn try_reload(&mut self) -> Result<u64, ReloadError> {
        if self.state != State::Running {
            return Err(ReloadError::Stopping);
        }
        let path = self.args.config_path.clone();
        let crate::config::Loaded { config, text, form, .. } = crate::config::include::load(&path)?;
        crate::hooks::validate(&config, self.region.shared())?;
        // Certificates are read before anything changes: a missing file or a
        // key that does not fit refuses the reload, the old ones keep serving.
        let tls = crate::tls::load(&config, crate::tls::certs::now_unix())?;
        for w in &tls.warnings {
            slog::warn!(self.logger(), "{w}");
        }
        // Names known already keep their addresses; new ones are looked up
        // now (bounded: this is load time, like reading the files).
        let (resolved, unresolved) =
            crate::dns::resolve_config(&config, self.resolver.current(), crate::dns::LOOKUP_TIMEOUT);
        for u in &unresolved {
            if u.required {
                return Err(ReloadError::Config(u.to_config_error()));
            }
            slog::warn!(self.log.logger, "backend name does not resolve; retried every resolve_interval_ms"; "name" => &u.name,
                "cluster" => &u.cluster, "file" => %u.file.display(), "line" => u.line, "reason" => &u.reason);
        }
        let next = self.next_listeners(&config)?;
        // A new admin address is bound before anything changes.
        let admin_fd = match &config.admin {
            Some(a) if self.admin.as_ref().map(|x| &x.address) != Some(&a.address) => Some(
                admin::Admin::bind(&a.address)
                    .map_err(|source| ReloadError::Listen { listener: format!("[admin] {}", a.address), source })?,
            ),
            _ => None,
        };
        for old in &self.listeners {
            if !next.iter().any(|b| b.config.address == old.config.address) {
                slog::info!(self.logger(), "listener removed"; "address" => &old.entry.local);
            }
        }
        self.listeners = next;
        let workers = config.workers;
        let loaded = Arc::new(config);
        // Without backend names the two are the same: one copy, not two.
        let in_force =
            if loaded.has_backend_names() { Arc::new(loaded.with_resolved(&resolved)) } else { loaded.clone() };
        self.resolver.configure(&loaded, resolved);
        self.loaded = loaded;
        let previous = std::mem::replace(&mut self.config, in_force);
        self.config_text = text;
        self.config_form = form;
        self.tls = tls.material;
        self.seq += 1;
        self.assign_slots(Some(&previous));
        self.health.configure(&self.config, &self.tls, &mut self.backend_slots, self.poll.registry(), &self.log.logger);
        self.fleet.configure(&self.config, self.region.shared(), &self.log.logger);
        if let Err(e) = self.configure_admin(admin_fd) {
            slog::error!(self.logger(), "admin listener not changed"; "error" => %e);
        }
        let msg = self.configure_message();
        for (slot, p) in self.slots.iter().enumerate().filter_map(|(i, s)| Some((i, s.proc.as_ref()?))) {
            let fds = self.message_fds(slot);
            if let Err(e) = self.send_files(&p.chan).and_then(|()| p.chan.send(&msg, &fds)) {
                slog::error!(self.log.logger, "cannot send the configuration to a worker"; "worker_pid" => p.pid.as_raw(), "error" => %e);
            }
        }
        self.resize(workers);
        Ok(self.seq)
    }

    /// Answers of the resolver thread: when a backend name's addresses
    /// changed, the configuration in force is made again from the loaded
    /// one and sent to the workers like a reload of the same text (same
    /// `Configure` message, `resolved` updated). An address that appears
    /// gets a fresh slot state and a slow start (`assign_slots`); one that
    /// goes is retired by the workers once its requests in flight end.
    fn resolver_answers(&mut self) {
        let answers = self.resolver.answers(&self.log.logger);
        let p = &self.region.shared().metrics.process;
        p.dns_failures.fetch_add(answers.failed, Ordering::Relaxed);
        p.dns_changes.fetch_add(answers.changes.len() as u64, Ordering::Relaxed);
        let changes = answers.changes;
        if changes.is_empty() || self.state != State::Running {
            return;
        }
        for c in &changes {
            let list = |a: &[std::net::IpAddr]| a.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(",");
            slog::info!(self.log.logger, "backend name resolved to new addresses"; "cluster" => &c.cluster,
                "name" => &c.name, "before" => list(&c.before), "after" => list(&c.after));
        }
        let next = Arc::new(self.loaded.with_resolved(self.resolver.current()));
        let previous = std::mem::replace(&mut self.config, next);
        self.seq += 1;
        self.assign_slots(Some(&previous));
        self.health.configure(&self.config, &self.tls, &mut self.backend_slots, self.poll.registry(), &self.log.logger);
        let msg = self.configure_message();
        for (slot, p) in self.slots.iter().enumerate().filter_map(|(i, s)| Some((i, s.proc.as_ref()?))) {
            let fds = self.message_fds(slot);
            if let Err(e) = self.send_files(&p.chan).and_then(|()| p.chan.send(&msg, &fds)) {
                slog::error!(self.log.logger, "cannot send the new backend addresses to a worker"; "worker_pid" => p.pid.as_raw(), "error" => %e);
            }
        }
    }

    /// Starts or drains workers to have `n`.
    fn resize(&mut self, n: usize) {
        while self.slots.len() > n {
            let slot = self.slots.pop().expect("non-empty");
            if let Some(p) = slot.proc {
                let _ = p.chan.send(&ToWorker::Drain { timeout_ms: self.config.drain_timeout.as_millis() as u64 }, &[]);
                slog::info!(self.logger(), "draining a worker (fewer workers configured)"; "worker_pid" => p.pid.as_raw());
                self.retiring.push(p);
            }
        }
        while self.slots.len() < n {
            self.slots.push(Slot::default());
            let i = self.slots.len() - 1;
            self.spawn(i);
        }
    }

    /// Reopens the error log (logrotate). Workers get the reopened file as
    /// an fd: after dropping privileges they may not be allowed to open it.
    fn reopen(&mut self) {
        if let Err(e) = self.log.reopen() {
            slog::error!(self.logger(), "cannot reopen the error log"; "error" => %e);
        }
        let file = match &self.config.error_log {
            crate::config::LogTarget::File(p) => match std::fs::OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    slog::error!(self.logger(), "cannot open the error log for the workers"; "error" => %e);
                    None
                }
            },
            crate::config::LogTarget::Stderr | crate::config::LogTarget::Syslog(_) => None,
        };
        let fds: Vec<RawFd> = file.iter().map(|f| f.as_raw_fd()).collect();
        for p in self.slots.iter().filter_map(|s| s.proc.as_ref()).chain(self.retiring.iter()) {
            if let Err(e) = self.send_files(&p.chan) {
                slog::error!(self.logger(), "cannot send the reopened files to a worker"; "worker_pid" => p.pid.as_raw(), "error" => %e);
            }
            let _ = p.chan.send(&ToWorker::Reopen, &fds);
        }
        slog::info!(self.logger(), "log files reopened");
    }

    /// Graceful stop: workers drain, then the master exits.
    fn quit(&mut self, replaced: bool) {
        if matches!(self.state, State::Quitting { .. } | State::Stopping { .. }) {
            return;
        }
        slog::info!(self.logger(), "quitting: draining workers"; "replaced" => replaced);
        self.state = State::Quitting { replaced };
        let drain = self.config.drain_timeout;
        let timeout_ms = drain.as_millis() as u64;
        // Replaced by a new generation (or handing back after a failed
        // one): connections move rather than close.
        let msg = if replaced && self.handoff_route().is_some() {
            ToWorker::HandOver { timeout_ms }
        } else {
            ToWorker::Drain { timeout_ms }
        };
        for p in self.slots.iter().filter_map(|s| s.proc.as_ref()).chain(self.retiring.iter()) {
            let _ = p.chan.send(&msg, &[]);
        }
        self.quit_deadline = Some(Instant::now() + drain + STOP_GRACE);
        // Stop accepting in the master too: it holds the sockets only to
        // hand them on.
        if !replaced {
            self.listeners.clear();
        }
    }

    /// Fast stop: SIGTERM to the workers, SIGKILL after a grace period.
    fn stop(&mut self) {
        if matches!(self.state, State::Stopping { .. }) {
            return;
        }
        slog::info!(self.logger(), "stopping");
        self.state = State::Stopping { deadline: Instant::now() + STOP_GRACE };
        self.signal_workers(Signal::SIGTERM);
    }

    fn signal_workers(&self, sig: Signal) {
        for p in self.slots.iter().filter_map(|s| s.proc.as_ref()).chain(self.retiring.iter()) {
            let _ = kill(p.pid, sig);
        }
    }

    /// Access-log lines dropped by every worker of this master, live or gone.
    fn access_log_dropped(&self) -> u64 {
        let live: u64 = self
            .slots
            .iter()
            .filter_map(|s| s.proc.as_ref())
            .chain(self.retiring.iter())
            .map(|p| p.access_log_dropped)
            .sum();
        self.access_log_dropped_gone + live
    }

    fn write_pid_file(&self) -> io::Result<()> {
        self.args.pid_file.write_pid(std::process::id()).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot write the pid file {}: {e}", self.args.pid_file.path().display()))
        })
    }

    /// Removes what this master owns on its way out.
    fn cleanup(&mut self) {
        let replaced = matches!(self.state, State::Quitting { replaced: true });
        if replaced {
            // Only our own: a later upgrade may have written its .oldbin.
            let oldbin = upgrade::oldbin(&self.config.pid_file);
            if read_pid(&oldbin) == Some(std::process::id()) {
                let _ = std::fs::remove_file(oldbin);
            }
            return;
        }
        if read_pid(&self.config.pid_file) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.config.pid_file);
        }
        if self.control_is_ours() {
            let _ = std::fs::remove_file(&self.config.control_socket);
        }
        if let Some((path, id)) = self.admin.as_ref().and_then(|a| a.unix_file.as_ref()) {
            if id.is_some() && control::file_id(path) == *id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Wall-clock seconds since the epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The master is shutting down or handing over.
    #[error("the master is stopping")]
    Stopping,
    /// The configuration does not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A module table is wrong.
    #[error(transparent)]
    Modules(#[from] crate::hooks::ModuleError),
    /// A TLS listener's certificate or key is refused.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A kept listening socket could not be duplicated.
    #[error("cannot duplicate the socket of {listener}: {source}")]
    Duplicate {
        /// The listener's address.
        listener: String,
        /// Why.
        source: io::Error,
    },
    /// A kept listening socket's new backlog could not be set.
    #[error("{listener}: {source}")]
    Backlog {
        /// The listener's address.
        listener: String,
        /// Why.
        source: io::Error,
    },
    /// `reuseport` of a listener that stays was changed: its sockets
    /// cannot change kind while they serve.
    #[error("reuseport of {listener} cannot change while it listens: restart Pitcher (stop, start) to change it")]
    Reuseport {
        /// The listener's address.
        listener: String,
    },
    /// A new listener could not be bound.
    #[error("cannot listen on {listener}: {source}")]
    Listen {
        /// The listener's address.
        listener: String,
        /// Why.
        source: io::Error,
    },
}

/// glibc reads its allocator settings from this variable at exec.
const MALLOC_TUNABLES_ENV: &str = "GLIBC_TUNABLES";

/// Allocations from this size up get their own mapping in a worker.
/// Those are the I/O buffers (16 KiB client, 64 KiB backend): a mapped
/// buffer is returned to the kernel when it is freed, and its zeroed pages
/// are not touched until bytes are written, where a buffer carved from the
/// heap stays resident after `free` and is cleared in full by `calloc` when
/// reused. The buffer pools keep steady-state allocation off the hot path,
/// so the extra `mmap`/`munmap` happen only when a pool grows or shrinks
/// (a burst, a hand-over): that is when memory should go back.
const WORKER_MMAP_THRESHOLD_BYTES: usize = 16 * 1024;

/// The operator's `GLIBC_TUNABLES` (if any) with the worker's mmap
/// threshold added, unless the operator set one.
fn worker_malloc_tunables(operator: Option<String>) -> String {
    let ours = format!("glibc.malloc.mmap_threshold={WORKER_MMAP_THRESHOLD_BYTES}");
    match operator {
        Some(t) if t.contains("glibc.malloc.mmap_threshold") => t,
        Some(t) if !t.is_empty() => format!("{t}:{ours}"),
        _ => ours,
    }
}

#[cfg(test)]
mod tests {
    use super::worker_malloc_tunables;

    #[test]
    fn the_workers_mmap_threshold_joins_the_operators_tunables_and_never_overrides_one() {
        assert_eq!(worker_malloc_tunables(None), "glibc.malloc.mmap_threshold=16384");
        assert_eq!(worker_malloc_tunables(Some(String::new())), "glibc.malloc.mmap_threshold=16384");
        assert_eq!(
            worker_malloc_tunables(Some("glibc.malloc.arena_max=2".into())),
            "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=16384"
        );
        let theirs = "glibc.malloc.mmap_threshold=1048576".to_string();
        assert_eq!(worker_malloc_tunables(Some(theirs.clone())), theirs);
    }
}
