//! Detaching from the terminal for an init script, without losing the
//! outcome of the start: the parent process waits until the detached master
//! reports that it started (or why it could not), prints that, and exits
//! with the matching status. `systemd`'s `Type=forking` and `start-stop-
//! daemon` both rely on that exit status.
//!
//! The forks also leave behind the pages the startup touched (the
//! configuration parser, the route compiler, certificate loading): a child
//! does not inherit the page-table entries of its parent's file mappings,
//! so the master that supervises for months maps only what it runs. A new
//! master started by a binary upgrade does not detach, and forks once for
//! the same reason ([`leave_startup`]).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use nix::unistd::{fork, setsid, ForkResult};

use crate::channel::{Channel, Handoff};

/// The detached master's line back to the waiting parent.
pub struct Notifier(Option<UnixStream>);

impl Notifier {
    /// A master that does not detach has no one to tell.
    pub fn none() -> Notifier {
        Notifier(None)
    }

    /// Started: the parent exits 0.
    pub fn ok(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.write_all(b"ok");
        }
    }

    /// Not started: the parent prints `msg` and exits 1.
    pub fn fail(&mut self, msg: &str) {
        if let Some(mut s) = self.0.take() {
            let _ = s.write_all(msg.as_bytes());
        }
    }
}

/// Forks twice and starts a new session. Returns in the detached process
/// only; the original process waits for the [`Notifier`] and exits.
/// Must be called while the process has a single thread.
pub fn detach() -> std::io::Result<Notifier> {
    let (mut waiting, child_end) = UnixStream::pair()?;
    // SAFETY: the process is single-threaded here (no log thread, no other
    // thread started yet), so the child is a complete copy of it; the child
    // only continues the normal startup path.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(child_end);
            let mut msg = String::new();
            let _ = waiting.read_to_string(&mut msg);
            match msg.as_str() {
                "ok" => std::process::exit(0),
                "" => {
                    eprintln!("pitcher: the master exited during startup (see the error log)");
                    std::process::exit(1)
                }
                m => {
                    eprintln!("pitcher: {m}");
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Child => {}
    }
    drop(waiting);
    setsid()?;
    // SAFETY: still single-threaded; the second fork makes sure the master
    // is not a session leader and can never acquire a terminal again.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    // Leave the terminal (and whatever pipes the caller waits on): from
    // here on, messages go to the error log and, for the start's outcome,
    // through the notifier.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in [0, 1, 2] {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    Ok(Notifier(Some(child_end)))
}

/// New master of a binary upgrade, once its configuration is loaded and
/// the listening sockets received: goes on in a child, so as not to keep
/// the startup's pages mapped (7.2 MiB of RSS instead of a detached
/// master's 4.9). The child says `Forked` with its pid to the old master
/// (a child subreaper: the child becomes its child when this process
/// exits), then this process exits 0; it exits 1 if the child died first.
/// Returns in the child only. Must be called while the process has a
/// single thread.
pub fn leave_startup(chan: &Channel) -> std::io::Result<()> {
    let (mut waiting, mut child_end) = UnixStream::pair()?;
    // SAFETY: the process is single-threaded here (as for `detach`: no log
    // thread yet), so the child is a complete copy of it; the parent only
    // waits on a socket and exits without running destructors (the pid
    // file's lock and every fd stay with the child).
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(child_end);
            let mut msg = Vec::new();
            let _ = waiting.read_to_end(&mut msg);
            std::process::exit(if msg == b"ok" { 0 } else { 1 })
        }
        ForkResult::Child => {}
    }
    drop(waiting);
    chan.send(&Handoff::Forked { pid: std::process::id() }, &[]).map_err(std::io::Error::other)?;
    child_end.write_all(b"ok")
}
