//! Binary upgrade (SIGUSR2), both sides.
//!
//! Old master: renames its pid file to `<pid_file>.oldbin`, starts the
//! binary now at its own path as a new master with a channel fd in its
//! environment, and sends it every listening socket with their manifest.
//! When the new master says its workers are accepting, the old one drains
//! its workers and exits. If the new master exits, closes the channel, or
//! is not ready in time, it is killed and the old master carries on as if
//! nothing happened (rollback): its workers never stopped accepting, its
//! pid file and control socket are put back.
//!
//! New master: takes the listening sockets from the channel instead of
//! binding them, goes on in a child of the process the old master started
//! (`Forked`; see `daemon::leave_startup`: the old master is a child
//! subreaper and adopts it), starts its workers, and reports ready once all
//! are.
//!
//! Rolling start and connection hand-over: the new master starts its
//! workers one at a time. Each time one is accepting, it asks the old
//! master to retire workers (`Retire { keep }`); a retired worker stops
//! accepting and hands each client connection (idle keep-alive, or a
//! tunnel with empty buffers; the others as soon as they get there) to its
//! master, which passes them over this channel to the new master, which
//! gives them to one of its ready workers. The next new worker starts once
//! an old one has exited, so at most `workers + 1` workers live. When all
//! are accepting the new master says `Ready` and the old generation hands
//! over the rest. If a new worker fails meanwhile, the new master says
//! `Abort`, hands its connections back the same way and exits; the old
//! master restarts the workers it retired (rollback at every step).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::Interest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::channel::{split_fds, Channel, HandedConn, Handoff, ListenerEntry, ToWorker, UPGRADE_FD_ENV, WORKER_FD_ENV};
use crate::control::Reply;
use crate::shm::Region;

use super::{Master, State, PREDECESSOR, UPGRADE};

/// Longest wait for room in a channel when passing connections on.
const SEND_WAIT: Duration = Duration::from_secs(2);
/// Rolling start: how long the next new worker waits for a retired old
/// worker that is still finishing long requests (a download, a long poll)
/// before it starts anyway. Usually the old worker is gone in milliseconds;
/// without this bound one long request would hold the upgrade up to the
/// drain timeout.
const ROLLING_STEP_WAIT: Duration = Duration::from_secs(1);

/// Test builds (`fault-injection` feature): while a file of this name sits
/// beside the configuration file, a new master's second worker fails to
/// start during a rolling upgrade.
#[cfg(feature = "fault-injection")]
pub const FAIL_WORKER_FILE: &str = "fault-upgrade-worker";

/// Test builds (`fault-injection` feature): while a file of this name sits
/// beside the configuration file, a new master holds its rolling start
/// before its first worker.
#[cfg(feature = "fault-injection")]
pub const HOLD_ROLLING_FILE: &str = "fault-upgrade-hold";

/// The old master's channel to the new one once the upgrade is over (the
/// new generation takes this one's connections), or after the new one
/// failed (it gives connections back: `returning`).
pub struct Successor {
    chan: Channel,
    returning: bool,
}

/// A new master's channel to the old one while the old generation lives.
pub struct Predecessor {
    chan: Channel,
    /// `Ready` went to the old master: every new worker accepts.
    ready_sent: bool,
    /// The rolling start failed: connections go back to the old generation.
    aborted: bool,
    /// The last `Retire { keep, accepting }` sent, and when.
    keep_sent: Option<(usize, usize)>,
    retired_at: Option<Instant>,
    /// The old generation as it last reported itself.
    old: Option<OldGeneration>,
    /// Workers this master tried to start while rolling.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    spawns: u32,
}

/// The old generation, as seen by the new master (`ctl status`).
struct OldGeneration {
    pid: u32,
    workers: Vec<u32>,
    serving: usize,
    handed_over: u64,
    closed: u64,
}

/// Connections passed between generations, counted, and those waiting
/// for a ready worker.
#[derive(Default)]
pub struct Handoffs {
    /// Handed by this master's workers to another generation.
    handed_over: u64,
    /// Received from another generation.
    received: u64,
    /// Closed by this master's workers instead of handed over (deadline,
    /// a send that failed), or dropped for want of a worker.
    pub closed: u64,
    /// Waiting for a ready worker.
    parked: Vec<(Vec<HandedConn>, Vec<OwnedFd>)>,
    /// Round robin over the workers that take connections.
    next: usize,
    /// The old generation's last report, kept once it is gone.
    previous: Option<OldGeneration>,
}

/// An upgrade in progress, seen from the old master.
pub struct Upgrade {
    pub pid: Pid,
    chan: Channel,
    deadline: Instant,
    /// New workers accepting (rolling start).
    accepting: usize,
}

/// The parent of a live process, from `/proc/PID/stat`.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// `<pid_file>.oldbin`.
pub fn oldbin(pid_file: &Path) -> PathBuf {
    let mut s = pid_file.as_os_str().to_owned();
    s.push(".oldbin");
    PathBuf::from(s)
}

impl Master {
    /// Starts a binary upgrade. On refusal, gives the control stream back
    /// with the reason.
    pub(super) fn start_upgrade(
        &mut self,
        reply: Option<StdUnixStream>,
    ) -> Result<(), (Option<StdUnixStream>, String)> {
        if let Some(u) = &self.upgrade {
            return Err((reply, format!("an upgrade is already in progress (new master pid {})", u.pid)));
        }
        if self.rolling() {
            return Err((
                reply,
                "an upgrade is already in progress: this master is itself still starting from one".into(),
            ));
        }
        if self.state != State::Running {
            return Err((reply, "the master is stopping".into()));
        }
        let pid_file = self.config.pid_file.clone();
        let old = oldbin(&pid_file);
        if let Err(e) = std::fs::rename(&pid_file, &old) {
            return Err((reply, format!("cannot rename {} to {}: {e}", pid_file.display(), old.display())));
        }
        match self.spawn_new_master() {
            Ok(u) => {
                slog::info!(self.logger(), "upgrade started"; "new_master_pid" => u.pid.as_raw(), "binary" => %self.args.exe.display());
                self.upgrade = Some(u);
                self.report_generation();
                if let Some(s) = reply {
                    self.wait_for_upgrade(s);
                }
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::rename(&old, &pid_file);
                Err((reply, format!("cannot start the new binary {}: {e}", self.args.exe.display())))
            }
        }
    }

    fn spawn_new_master(&mut self) -> std::io::Result<Upgrade> {
        let (mine, theirs) = Channel::pair()?;
        let fd = theirs.inheritable()?;
        let child = Command::new(&self.args.exe)
            .args(&self.args.argv)
            .env(UPGRADE_FD_ENV, fd.to_string())
            .env_remove(WORKER_FD_ENV)
            .stdin(Stdio::null())
            .spawn()?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        drop(child);
        let (mut entries, mut fds) = self.handoff_listeners();
        // The admin socket goes too (before the region, the last fd), so
        // that scrapes never find it closed.
        if let Some(a) = &self.admin {
            entries.push(ListenerEntry { name: super::admin::handover_name(&a.address), local: a.local.clone() });
            let region = fds.pop();
            fds.push(a.fd.as_raw_fd());
            fds.extend(region);
        }
        // The new master leaves the process we start for a child of it
        // (see `daemon::leave_startup`); that child must become ours, to
        // be reaped, watched and killed on rollback like the first.
        let fork_ok = match nix::sys::prctl::set_child_subreaper(true) {
            Ok(()) => true,
            Err(e) => {
                slog::warn!(self.logger(), "cannot become a child subreaper; the new master will not fork"; "error" => %e);
                false
            }
        };
        let msg = Handoff::Listeners { listeners: entries, backend_slots: self.backend_slots.entries(), fork_ok };
        let sent = mine.send(&msg, &fds);
        mine.set_nonblocking(true)?;
        self.poll.registry().register(&mut SourceFd(&mine.raw_fd()), UPGRADE, Interest::READABLE)?;
        let u = Upgrade { pid, chan: mine, deadline: Instant::now() + self.config.upgrade_timeout, accepting: 0 };
        if let Err(e) = sent {
            // The child may have died at once; rollback follows from here.
            slog::error!(self.logger(), "cannot hand the listeners to the new master"; "error" => %e);
        }
        Ok(u)
    }

    pub(super) fn upgrade_event(&mut self) {
        if self.upgrade.is_none() {
            return self.successor_event();
        }
        loop {
            let Some(u) = &self.upgrade else { return };
            match u.chan.recv::<Handoff>() {
                Ok(None) => return,
                Ok(Some((Handoff::Forked { pid }, _))) => {
                    // Only a child of the process we started (or, once that
                    // one exited, ours): a pid we will kill on rollback.
                    let first = u.pid.as_raw() as u32;
                    let parent = parent_pid(pid);
                    if !(parent == Some(first) || parent == Some(std::process::id())) {
                        return self.rollback(format!(
                            "the new master named pid {pid} as its child, whose parent is {parent:?}"
                        ));
                    }
                    slog::info!(self.logger(), "the new master goes on in a child of its first process"; "new_master_pid" => pid);
                    if let Some(u) = self.upgrade.as_mut() {
                        u.pid = Pid::from_raw(pid as i32);
                    }
                    self.report_generation();
                }
                Ok(Some((Handoff::Ready { pid }, _))) => return self.upgrade_succeeded(pid),
                Ok(Some((Handoff::Retire { keep, accepting }, _))) => {
                    if let Some(u) = self.upgrade.as_mut() {
                        u.accepting = accepting;
                    }
                    self.retire_to(keep);
                }
                Ok(Some((Handoff::Abort { reason }, _))) => {
                    return self.roll_back(format!("a new worker failed: {reason}"), false);
                }
                Ok(Some((Handoff::Connections { conns }, fds))) => self.receive_connections(conns, fds),
                Ok(Some((other, _))) => {
                    return self.rollback(format!("unexpected message from the new master: {other:?}"));
                }
                Err(e) => {
                    // Usually the process is exiting: say how, if it does soon.
                    let pid = u.pid;
                    for _ in 0..20 {
                        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                                return self.rollback(format!("the new master exited (exit status {code})"));
                            }
                            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                                return self.rollback(format!("the new master was killed by {sig}"));
                            }
                            _ => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                    return self.rollback(format!("the new master closed its channel before it was ready ({e})"));
                }
            }
        }
    }

    /// The channel to the new master after the upgrade: connections it
    /// gives back, or its end.
    fn successor_event(&mut self) {
        loop {
            let Some(s) = &self.successor else { return };
            match s.chan.recv::<Handoff>() {
                Ok(None) => return,
                Ok(Some((Handoff::Connections { conns }, fds))) => self.receive_connections(conns, fds),
                Ok(Some(_)) => {}
                Err(_) => {
                    if let Some(s) = self.successor.take() {
                        let _ = self.poll.registry().deregister(&mut SourceFd(&s.chan.raw_fd()));
                    }
                    return;
                }
            }
        }
    }

    /// Rolling start, old side: retire workers until at most `keep` serve.
    /// A retired worker hands its connections over and exits; its slot
    /// stays empty (a rollback starts it again).
    fn retire_to(&mut self, keep: usize) {
        let timeout = self.config.upgrade_timeout;
        if let Some(u) = &mut self.upgrade {
            // Progress: the new generation gets the full time for each step.
            u.deadline = Instant::now() + timeout;
        }
        let timeout_ms = self.config.drain_timeout.as_millis() as u64;
        let mut serving: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].proc.is_some()).collect();
        while serving.len() > keep {
            let Some(i) = serving.pop() else { break };
            let Some(p) = self.slots[i].proc.take() else { continue };
            self.slots[i].respawn_at = None;
            let _ = p.chan.send(&ToWorker::HandOver { timeout_ms }, &[]);
            slog::info!(self.logger(), "worker retired: it hands its connections to the new generation";
                "slot" => i, "worker_pid" => p.pid.as_raw());
            self.retiring.push(p);
        }
        self.report_generation();
    }

    pub(super) fn upgrade_tick(&mut self, now: Instant) {
        let timeout = self.config.upgrade_timeout;
        if let Some(u) = self.upgrade.as_mut().filter(|_| !self.retiring.is_empty()) {
            // A retired worker finishing its requests (bounded by the drain
            // timeout) holds the rolling start up: the new master's clock
            // runs only while it is the one to act.
            u.deadline = now + timeout;
        }
        if self.upgrade.as_ref().is_some_and(|u| now >= u.deadline) {
            let ms = self.config.upgrade_timeout.as_millis();
            self.rollback(format!("the new master was not ready within {ms} ms"));
        }
    }

    /// SIGCHLD for the new master while the upgrade is pending.
    /// `clean`: it exited with status 0.
    pub(super) fn upgrade_child_exited(&mut self, pid: Pid, how: &str, clean: bool) -> bool {
        if self.upgrade.as_ref().is_none_or(|u| u.pid != pid) {
            return false;
        }
        if clean {
            // The new master's first process exits 0 once its child has
            // said `Forked` (the message is in the channel before the
            // exit): read it before judging.
            self.upgrade_event();
        }
        if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
            self.rollback(format!("the new master exited ({how})"));
        }
        true
    }

    fn upgrade_succeeded(&mut self, pid: u32) {
        let Some(u) = self.upgrade.take() else { return };
        // The channel stays: this generation's connections go through it.
        self.successor = Some(Successor { chan: u.chan, returning: false });
        slog::info!(self.logger(), "upgrade complete: the new master is serving; draining this generation"; "new_master_pid" => pid);
        self.settle_upgrade_replies(&Reply::ok(format!("upgrade complete: new master pid {pid}")));
        // The new master owns the control socket now, and the admin one.
        if let Some(l) = self.control.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.as_raw_fd()));
        }
        self.close_admin();
        let p = &self.region.shared().metrics.process;
        p.upgrades_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        p.last_upgrade_ok_s.store(super::unix_now(), std::sync::atomic::Ordering::Relaxed);
        self.quit(true);
    }

    /// The old master keeps serving: kill the new one, restore the pid
    /// file and the control socket, say why.
    fn rollback(&mut self, reason: String) {
        self.roll_back(reason, true);
    }

    /// Rollback; `kill`: the new master is killed, else (it aborted a
    /// rolling start) it gives the connections its workers took back over
    /// the channel, and exits by itself. Workers retired for the new
    /// generation start again on this binary.
    fn roll_back(&mut self, reason: String, kill_it: bool) {
        let Some(u) = self.upgrade.take() else { return };
        if kill_it {
            let _ = self.poll.registry().deregister(&mut SourceFd(&u.chan.raw_fd()));
            let _ = kill(u.pid, Signal::SIGKILL);
        } else {
            self.successor = Some(Successor { chan: u.chan, returning: true });
        }
        self.region.shared().metrics.process.upgrades_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..self.slots.len() {
            if self.slots[i].proc.is_none() && self.slots[i].respawn_at.is_none() {
                self.spawn(i);
            }
        }
        let pid_file = self.config.pid_file.clone();
        if let Err(e) = std::fs::rename(oldbin(&pid_file), &pid_file) {
            slog::error!(self.logger(), "cannot restore the pid file; writing a new one"; "error" => %e);
            match super::PidFile::lock(&pid_file) {
                Ok(f) => {
                    self.args.pid_file = f;
                    let _ = self.write_pid_file();
                }
                Err(e) => slog::error!(self.logger(), "cannot write a new pid file"; "error" => %e),
            }
        }
        if !self.control_is_ours() {
            if let Err(e) = self.bind_control() {
                slog::error!(self.logger(), "cannot restore the control socket"; "error" => %e);
            }
        }
        slog::error!(self.logger(), "upgrade failed; rolled back, the running master keeps serving"; "reason" => &reason, "new_master_pid" => u.pid.as_raw());
        self.settle_upgrade_replies(&Reply::err(format!("rolled back, the running master keeps serving: {reason}")));
    }

    /// New master: takes the channel to the old one (after the
    /// listeners came through it), to hear from the old generation and
    /// receive its connections.
    pub(super) fn take_predecessor(&mut self, chan: Channel) -> std::io::Result<()> {
        chan.set_read_timeout(None)?;
        chan.set_nonblocking(true)?;
        self.poll.registry().register(&mut SourceFd(&chan.raw_fd()), PREDECESSOR, Interest::READABLE)?;
        self.predecessor = Some(Predecessor {
            chan,
            ready_sent: false,
            aborted: false,
            keep_sent: None,
            retired_at: None,
            old: None,
            spawns: 0,
        });
        Ok(())
    }

    /// This master is the new one of an upgrade whose workers are still
    /// starting one by one.
    pub(super) fn rolling(&self) -> bool {
        self.predecessor.as_ref().is_some_and(|p| !p.ready_sent && !p.aborted)
    }

    /// New master, rolling start. With several workers, room is made
    /// before each new worker starts: the old master retires one of its
    /// own (whose connections go to its serving siblings while no new
    /// worker accepts, to the new workers after), and the next new worker
    /// starts once it has exited, so no more than `workers` workers live at
    /// once. A retired worker still finishing long requests holds the step
    /// up for [`ROLLING_STEP_WAIT`] at most. With one worker the new one
    /// starts first (nobody would accept meanwhile). When every new worker
    /// accepts, `Ready`: the old generation hands over the rest and goes.
    pub(super) fn handover_tick(&mut self) {
        if !self.rolling() || self.state != State::Running {
            return;
        }
        #[cfg(feature = "fault-injection")]
        if self.args.config_path.parent().is_some_and(|d| d.join(HOLD_ROLLING_FILE).exists()) {
            return;
        }
        let n = self.slots.len();
        let ready = self.slots.iter().filter(|s| s.proc.as_ref().is_some_and(|p| p.ready)).count();
        let started = self.slots.iter().filter(|s| s.proc.is_some()).count();
        let Some(p) = self.predecessor.as_mut() else { return };
        if ready == n {
            p.ready_sent = true;
            match p.chan.send(&Handoff::Ready { pid: std::process::id() }, &[]) {
                Ok(()) => slog::info!(self.log.logger, "workers accepting; told the old master"),
                Err(e) => slog::warn!(self.log.logger, "could not reach the old master"; "error" => %e),
            }
            return;
        }
        if ready != started || started >= n {
            return; // A new worker is starting.
        }
        let keep = if n == 1 { 1 } else { n - started - 1 };
        if p.keep_sent != Some((keep, ready)) {
            p.keep_sent = Some((keep, ready));
            p.retired_at = Some(Instant::now());
            if let Err(e) = p.chan.send(&Handoff::Retire { keep, accepting: ready }, &[]) {
                slog::warn!(self.log.logger, "could not reach the old master"; "error" => %e);
            }
        }
        let (old_live, old_serving) = p.old.as_ref().map_or((usize::MAX, usize::MAX), |g| (g.workers.len(), g.serving));
        let room = |old: usize| started.saturating_add(old).saturating_add(1) <= n;
        let waited = p.retired_at.is_some_and(|t| t.elapsed() >= ROLLING_STEP_WAIT) && room(old_serving);
        if room(old_live) || waited || (n == 1 && started == 0) {
            if let Some(i) = self.slots.iter().position(|s| s.proc.is_none() && s.respawn_at.is_none()) {
                self.spawn(i);
            }
        }
    }

    /// New master: a worker failed during the rolling start. The old
    /// generation takes over again (`Abort`); this one hands its
    /// connections back and exits.
    pub(super) fn abort_rolling(&mut self, reason: String) {
        let Some(p) = self.predecessor.as_mut() else { return };
        p.aborted = true;
        slog::error!(self.log.logger, "rolling upgrade failed; handing connections back to the old generation";
            "reason" => &reason);
        if let Err(e) = p.chan.send_wait(&Handoff::Abort { reason }, &[], SEND_WAIT) {
            slog::error!(self.log.logger, "could not reach the old master"; "error" => %e);
        }
        self.quit(true);
        // Connections that were waiting for a worker go back too.
        for (conns, fds) in std::mem::take(&mut self.handoffs.parked) {
            self.route_from_worker(conns, fds);
        }
    }

    /// Test builds: the second worker of a rolling start fails to start
    /// while [`FAIL_WORKER_FILE`] sits beside the configuration file.
    #[cfg(feature = "fault-injection")]
    pub(super) fn injected_spawn_failure(&mut self) -> std::io::Result<()> {
        let file = self.args.config_path.parent().map(|d| d.join(FAIL_WORKER_FILE));
        let Some(p) = self.predecessor.as_mut().filter(|p| !p.ready_sent) else { return Ok(()) };
        p.spawns += 1;
        let armed = file.is_some_and(|f| f.exists());
        if armed && p.spawns == 2 {
            return Err(std::io::Error::other("fault injection: the second new worker does not start"));
        }
        Ok(())
    }

    /// New master: the old generation's reports and connections.
    pub(super) fn predecessor_event(&mut self) {
        loop {
            let Some(p) = &mut self.predecessor else { return };
            match p.chan.recv::<Handoff>() {
                Ok(None) => return,
                Ok(Some((Handoff::Connections { conns }, fds))) => self.receive_connections(conns, fds),
                Ok(Some((Handoff::Generation { pid, workers, serving, handed_over, closed }, _))) => {
                    p.old = Some(OldGeneration { pid, workers, serving, handed_over, closed });
                }
                Ok(Some((other, _))) => {
                    slog::warn!(self.log.logger, "unexpected message from the old master"; "message" => ?other);
                }
                Err(_) => {
                    // The old master is gone: this generation is the only one.
                    let Some(p) = self.predecessor.take() else { return };
                    let _ = self.poll.registry().deregister(&mut SourceFd(&p.chan.raw_fd()));
                    if let Some(g) = &p.old {
                        slog::info!(self.log.logger, "the old generation is gone"; "old_master_pid" => g.pid,
                            "connections_handed_over" => g.handed_over, "connections_closed" => g.closed);
                    }
                    self.handoffs.previous = p.old;
                    if !p.ready_sent && !p.aborted && self.state == State::Running {
                        for i in 0..self.slots.len() {
                            if self.slots[i].proc.is_none() && self.slots[i].respawn_at.is_none() {
                                self.spawn(i);
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Where this master's workers' connections go: the new master of an
    /// upgrade (pending or done), or back to the old one after a failed
    /// rolling start. `None`: they stay in this generation.
    pub(super) fn handoff_route(&self) -> Option<&Channel> {
        if let Some(u) = &self.upgrade {
            return Some(&u.chan);
        }
        if let Some(s) = self.successor.as_ref().filter(|s| !s.returning) {
            return Some(&s.chan);
        }
        self.predecessor.as_ref().filter(|p| p.aborted).map(|p| &p.chan)
    }

    /// Connections a worker of this master handed over: to the other
    /// generation, or (none, or it cannot take them) to a worker of this one.
    pub(super) fn route_from_worker(&mut self, conns: Vec<HandedConn>, fds: Vec<OwnedFd>) {
        let no_new_worker_yet = self.upgrade.as_ref().is_some_and(|u| u.accepting == 0);
        if no_new_worker_yet && self.slots.iter().any(|s| s.proc.as_ref().is_some_and(|p| p.ready)) {
            // Rolling start, first step: the siblings serve them meanwhile.
            return self.deliver_local(conns, fds);
        }
        if let Some(ch) = self.handoff_route() {
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let n = conns.len() as u64;
            match ch.send_wait(&Handoff::Connections { conns: conns.clone() }, &raw, SEND_WAIT) {
                Ok(()) => {
                    self.handoffs.handed_over += n;
                    self.report_generation();
                    return;
                }
                Err(e) => {
                    slog::error!(self.logger(), "cannot pass connections to the other master; keeping them here";
                        "connections" => n, "error" => %e);
                }
            }
        }
        self.deliver_local(conns, fds);
    }

    /// Connections from the other generation's master.
    fn receive_connections(&mut self, conns: Vec<HandedConn>, fds: Vec<OwnedFd>) {
        self.handoffs.received += conns.len() as u64;
        if self.state == State::Running {
            return self.deliver_local(conns, fds);
        }
        // This generation is leaving too (a later upgrade began): on they go.
        self.route_from_worker(conns, fds);
    }

    /// Gives connections to a ready worker of this master (round robin);
    /// with none ready yet, they wait (`deliver_parked`). A master that is
    /// leaving has no worker to give them to: they are closed, and counted.
    fn deliver_local(&mut self, conns: Vec<HandedConn>, fds: Vec<OwnedFd>) {
        if self.state != State::Running {
            self.handoffs.closed += conns.len() as u64;
            slog::warn!(self.logger(), "connections handed to a master that is leaving; closed"; "connections" => conns.len());
            return;
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let n = self.slots.len();
        for k in 0..n {
            let i = (self.handoffs.next + k) % n;
            let Some(p) = self.slots[i].proc.as_ref().filter(|p| p.ready) else { continue };
            match p.chan.send_wait(&ToWorker::Adopt { conns: conns.clone() }, &raw, SEND_WAIT) {
                Ok(()) => {
                    self.handoffs.next = i + 1;
                    return;
                }
                Err(e) => {
                    slog::warn!(self.logger(), "cannot give connections to a worker"; "worker_pid" => p.pid.as_raw(), "error" => %e);
                }
            }
        }
        self.handoffs.parked.push((conns, fds));
    }

    /// Connections that waited for a ready worker.
    pub(super) fn deliver_parked(&mut self) {
        if self.handoffs.parked.is_empty() || !self.slots.iter().any(|s| s.proc.as_ref().is_some_and(|p| p.ready)) {
            return;
        }
        for (conns, fds) in std::mem::take(&mut self.handoffs.parked) {
            self.deliver_local(conns, fds);
        }
    }

    /// Old master: tells the new one what its generation looks like now
    /// (for `ctl status`, and for the rolling start's pace).
    pub(super) fn report_generation(&self) {
        let ch = match (&self.upgrade, &self.successor) {
            (Some(u), _) => &u.chan,
            (None, Some(s)) if !s.returning => &s.chan,
            _ => return,
        };
        let workers = self.live_worker_pids();
        let msg = Handoff::Generation {
            pid: std::process::id(),
            serving: self.slots.iter().filter(|s| s.proc.is_some()).count(),
            workers,
            handed_over: self.handoffs.handed_over,
            closed: self.handoffs.closed,
        };
        let _ = ch.send(&msg, &[]);
    }

    fn live_worker_pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|s| s.proc.as_ref())
            .chain(self.retiring.iter())
            .map(|p| p.pid.as_raw() as u32)
            .collect()
    }

    /// `ctl status`: the hand-over counts of this master, and during an
    /// upgrade each generation with its workers.
    pub(super) fn handover_status(&self) -> (serde_json::Value, serde_json::Value) {
        let h = &self.handoffs;
        let counts = serde_json::json!({
            "handed_over": h.handed_over,
            "received": h.received,
            "closed": h.closed,
            "waiting": h.parked.iter().map(|(c, _)| c.len()).sum::<usize>(),
            "previous_generation": h.previous.as_ref().map(|g| serde_json::json!({"master_pid": g.pid,
                "handed_over": g.handed_over, "closed": g.closed})),
        });
        let mut gens = Vec::new();
        if let Some(g) = self.predecessor.as_ref().and_then(|p| p.old.as_ref()) {
            gens.push(serde_json::json!({"role": "old", "master_pid": g.pid, "workers": g.workers,
                "handed_over": g.handed_over, "closed": g.closed}));
        }
        let leaving = self.upgrade.is_some() || self.successor.as_ref().is_some_and(|s| !s.returning);
        gens.push(serde_json::json!({"role": if leaving { "old" } else { "current" }, "master_pid": std::process::id(),
            "workers": self.live_worker_pids(), "handed_over": h.handed_over, "received": h.received, "closed": h.closed}));
        if let Some(u) = &self.upgrade {
            gens.push(serde_json::json!({"role": "new", "master_pid": u.pid.as_raw()}));
        }
        (counts, serde_json::Value::Array(gens))
    }
}

/// How long a new master waits for its predecessor's listeners.
const HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// A new master's side of the hand-over.
pub struct Handover;

impl Handover {
    /// Receives the listening sockets and the shared region (with its
    /// backend slots) from the old master.
    pub fn receive(chan: &Channel) -> std::io::Result<Received> {
        chan.set_read_timeout(Some(HANDOFF_WAIT))?;
        let (msg, fds) = chan.recv::<Handoff>()?.ok_or_else(|| std::io::Error::other("no hand-over message"))?;
        let Handoff::Listeners { listeners, backend_slots, fork_ok } = msg else {
            return Err(std::io::Error::other("unexpected hand-over message"));
        };
        let (fds, region) = split_fds(&listeners, fds).map_err(std::io::Error::other)?;
        let region = Region::open(region)?;
        Ok(Received { listeners: listeners.into_iter().zip(fds).collect(), region, backend_slots, fork_ok })
    }
}

/// What a new master receives from the old one.
pub struct Received {
    /// The listening sockets, checked against their manifest.
    pub listeners: Vec<(ListenerEntry, OwnedFd)>,
    /// The shared region of the old master.
    pub region: Region,
    /// The old master's backend slots.
    pub backend_slots: Vec<(String, u32)>,
    /// The old master adopts a new master that forks (`Handoff::Forked`).
    pub fork_ok: bool,
}
