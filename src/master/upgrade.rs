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
//! binding them, starts its workers, and reports ready once all are.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::Interest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::channel::{split_fds, Channel, Handoff, ListenerEntry, UPGRADE_FD_ENV, WORKER_FD_ENV};
use crate::control::Reply;
use crate::shm::Region;

use super::{Master, State, UPGRADE};

/// An upgrade in progress, seen from the old master.
pub struct Upgrade {
    pub pid: Pid,
    chan: Channel,
    deadline: Instant,
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
        if self.handover.is_some() {
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
        let (entries, fds) = self.handoff_listeners();
        let msg = Handoff::Listeners { listeners: entries, backend_slots: self.backend_slots.entries() };
        let sent = mine.send(&msg, &fds);
        mine.set_nonblocking(true)?;
        self.poll.registry().register(&mut SourceFd(&mine.raw_fd()), UPGRADE, Interest::READABLE)?;
        let u = Upgrade { pid, chan: mine, deadline: Instant::now() + self.config.upgrade_timeout };
        if let Err(e) = sent {
            // The child may have died at once; rollback follows from here.
            slog::error!(self.logger(), "cannot hand the listeners to the new master"; "error" => %e);
        }
        Ok(u)
    }

    pub(super) fn upgrade_event(&mut self) {
        let Some(u) = &self.upgrade else { return };
        match u.chan.recv::<Handoff>() {
            Ok(None) => {}
            Ok(Some((Handoff::Ready { pid }, _))) => self.upgrade_succeeded(pid),
            Ok(Some((other, _))) => self.rollback(format!("unexpected message from the new master: {other:?}")),
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
                self.rollback(format!("the new master closed its channel before it was ready ({e})"));
            }
        }
    }

    pub(super) fn upgrade_tick(&mut self, now: Instant) {
        if self.upgrade.as_ref().is_some_and(|u| now >= u.deadline) {
            let ms = self.config.upgrade_timeout.as_millis();
            self.rollback(format!("the new master was not ready within {ms} ms"));
        }
    }

    /// SIGCHLD for the new master while the upgrade is pending.
    pub(super) fn upgrade_child_exited(&mut self, pid: Pid, how: &str) -> bool {
        if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
            self.rollback(format!("the new master exited ({how})"));
            return true;
        }
        false
    }

    fn upgrade_succeeded(&mut self, pid: u32) {
        let Some(u) = self.upgrade.take() else { return };
        let _ = self.poll.registry().deregister(&mut SourceFd(&u.chan.raw_fd()));
        slog::info!(self.logger(), "upgrade complete: the new master is serving; draining this generation"; "new_master_pid" => pid);
        self.settle_upgrade_replies(&Reply::ok(format!("upgrade complete: new master pid {pid}")));
        // The new master owns the control socket now.
        if let Some(l) = self.control.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.as_raw_fd()));
        }
        self.quit(true);
    }

    /// The old master keeps serving: kill the new one, restore the pid
    /// file and the control socket, say why.
    fn rollback(&mut self, reason: String) {
        let Some(u) = self.upgrade.take() else { return };
        let _ = self.poll.registry().deregister(&mut SourceFd(&u.chan.raw_fd()));
        let _ = kill(u.pid, Signal::SIGKILL);
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

    /// New master: once every worker accepts, tell the old master.
    pub(super) fn handover_tick(&mut self) {
        if self.handover.is_none() || !self.slots.iter().all(|s| s.proc.as_ref().is_some_and(|p| p.ready)) {
            return;
        }
        if let Some(ch) = self.handover.take() {
            match ch.send(&Handoff::Ready { pid: std::process::id() }, &[]) {
                Ok(()) => slog::info!(self.logger(), "workers accepting; told the old master"),
                Err(e) => slog::warn!(self.logger(), "could not reach the old master"; "error" => %e),
            }
        }
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
        let Handoff::Listeners { listeners, backend_slots } = msg else {
            return Err(std::io::Error::other("unexpected hand-over message"));
        };
        let (fds, region) = split_fds(&listeners, fds).map_err(std::io::Error::other)?;
        let region = Region::open(region)?;
        Ok(Received { listeners: listeners.into_iter().zip(fds).collect(), region, backend_slots })
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
}
