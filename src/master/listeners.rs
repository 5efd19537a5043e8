//! The master's listening sockets: one per listener shared by every
//! worker, or with `reuseport` one `SO_REUSEPORT` socket per worker slot;
//! which socket each worker slot gets, what a reload keeps, binds and
//! closes, and what a new master is handed on upgrade.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::channel::{self, ListenerEntry};
use crate::config::{Config, ListenerConfig};

use super::{Master, ReloadError};

/// A bound listener: one socket that every worker accepts from, or with
/// `reuseport` one `SO_REUSEPORT` socket per worker slot. The master keeps
/// every socket open, so a worker respawned at a slot gets that slot's
/// socket back with the connections queued on it while it was gone, and a
/// new master gets the same sockets on upgrade.
pub(super) struct Bound {
    pub(super) config: ListenerConfig,
    /// Never empty: the socket, or with `reuseport` the socket of each
    /// worker slot in slot order.
    pub(super) fds: Vec<OwnedFd>,
    pub(super) entry: ListenerEntry,
}

impl Bound {
    pub(super) fn new(config: ListenerConfig, fds: Vec<OwnedFd>) -> io::Result<Bound> {
        let first = fds.first().ok_or_else(|| io::Error::other(format!("no socket for {}", config.address)))?;
        let entry = channel::entry_for(&config.address, first.as_raw_fd());
        Ok(Bound { config, fds, entry })
    }

    /// The socket worker slot `slot` accepts from.
    fn fd_for(&self, slot: usize) -> RawFd {
        let i = if self.config.reuseport { slot.min(self.fds.len() - 1) } else { 0 };
        self.fds[i].as_raw_fd()
    }
}

impl Master {
    /// The fds that go with the `Configure` of worker slot `slot`: every
    /// listener in manifest order (with `reuseport`, the slot's own
    /// socket), then the shared region.
    pub(super) fn message_fds(&self, slot: usize) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|b| b.fd_for(slot)).collect();
        fds.push(self.region.raw_fd());
        fds
    }

    /// What a new master is handed on upgrade: every socket of every
    /// listener with its manifest entry (a `reuseport` listener's entry
    /// once per socket, in slot order), then the shared region.
    pub(super) fn handoff_listeners(&self) -> (Vec<ListenerEntry>, Vec<RawFd>) {
        let mut entries = Vec::new();
        let mut fds = Vec::new();
        for b in &self.listeners {
            for fd in &b.fds {
                entries.push(b.entry.clone());
                fds.push(fd.as_raw_fd());
            }
        }
        fds.push(self.region.raw_fd());
        (entries, fds)
    }

    /// The listeners of a configuration being loaded: the sockets of
    /// unchanged addresses kept (duplicated; the running ones close with
    /// the old list), new ones bound; a `reuseport` listener gets one
    /// socket per worker slot of `config`.
    pub(super) fn next_listeners(&self, config: &Config) -> Result<Vec<Bound>, ReloadError> {
        let mut next = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let listener = || l.address.to_string();
            let bound = match self.listeners.iter().find(|b| b.config.address == l.address) {
                Some(b) => {
                    if b.config.reuseport != l.reuseport {
                        return Err(ReloadError::Reuseport { listener: listener() });
                    }
                    let mut fds = b
                        .fds
                        .iter()
                        .map(OwnedFd::try_clone)
                        .collect::<io::Result<Vec<_>>>()
                        .map_err(|source| ReloadError::Duplicate { listener: listener(), source })?;
                    if b.config.backlog != l.backlog {
                        for fd in &fds {
                            crate::net::set_backlog(fd, l.backlog)
                                .map_err(|source| ReloadError::Backlog { listener: listener(), source })?;
                        }
                    }
                    if l.reuseport {
                        // Sockets of slots that go away: the master's copy
                        // closes; the draining worker keeps its own until
                        // it exits, when what is queued on it is reset
                        // unless the kernel migrates it.
                        if fds.len() > config.workers.max(1) && !migrates_queued_connections() {
                            slog::warn!(self.logger(), "fewer workers with reuseport: connections queued on the sockets of the workers that go away are reset when they exit (set net.ipv4.tcp_migrate_req = 1 to move them to the other sockets)";
                            "listener" => listener(), "sockets" => fds.len(), "workers" => config.workers);
                        }
                        fds.truncate(config.workers.max(1));
                        crate::net::grow_reuseport(&mut fds, config.workers, l.backlog)
                            .map_err(|source| ReloadError::Listen { listener: listener(), source })?;
                    }
                    Bound { config: l.clone(), fds, entry: b.entry.clone() }
                }
                None => {
                    let fds = crate::net::bind_listener(&l.address, l.backlog, l.reuseport, config.workers)
                        .map_err(|source| ReloadError::Listen { listener: listener(), source })?;
                    let b = Bound::new(l.clone(), fds)
                        .map_err(|source| ReloadError::Listen { listener: listener(), source })?;
                    slog::info!(self.logger(), "listening"; "address" => &b.entry.local);
                    b
                }
            };
            next.push(bound);
        }
        Ok(next)
    }
}

/// Does the kernel move the connections queued on a closed `SO_REUSEPORT`
/// socket to another socket of its group (`net.ipv4.tcp_migrate_req`,
/// Linux 5.14)?
fn migrates_queued_connections() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}
