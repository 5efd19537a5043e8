//! The master's side of the control socket: accept a connection, read one
//! request line, act, answer. Answers that depend on workers (a reload is
//! done when every worker confirmed it) or on a new master (an upgrade is
//! done when it is ready or rolled back) wait in [`Pending`].
//!
//! The socket is a trust boundary. It is created with its final mode (0600,
//! by the umask around `bind`: there is no moment when it is more open), a
//! peer that is neither root nor the master's user is refused whatever the
//! file's mode (`SO_PEERCRED`), and a client is read without blocking the
//! loop: its request line must fit in [`REQUEST_MAX_BYTES`] and arrive
//! within [`REQUEST_TIMEOUT`], and at most [`MAX_CLIENTS`] may be reading at
//! once. Each refusal is logged and counted (`ctl status`: `control`).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{umask, Mode};

use crate::control::{Reply, Request};

use super::{Master, State, CONTROL};

/// Longest wait for every worker to confirm a reload.
const RELOAD_CONFIRM: Duration = Duration::from_secs(10);
/// Largest request line a client may send.
pub const REQUEST_MAX_BYTES: usize = 64 * 1024;
/// How long a client has to send its whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Most clients reading their request at once; more are refused.
pub const MAX_CLIENTS: usize = 32;
/// Tokens of control clients: `CLIENT_BASE + id` (above any pid-based
/// worker token, below the health probes').
pub const CLIENT_BASE: usize = 1 << 32;

/// A control connection whose request line is still arriving.
pub struct Client {
    id: usize,
    stream: StdUnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Control connections refused, by reason (shown by `ctl status`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Refusals {
    /// Peers that are neither root nor the master's user.
    pub peer_uid: u64,
    /// Requests longer than [`REQUEST_MAX_BYTES`].
    pub too_large: u64,
    /// Requests not complete within [`REQUEST_TIMEOUT`].
    pub timed_out: u64,
    /// Connections over [`MAX_CLIENTS`].
    pub too_many: u64,
}

/// An answer waiting for something to finish.
pub struct Pending {
    stream: StdUnixStream,
    kind: PendingKind,
    deadline: Instant,
}

pub enum PendingKind {
    Reload { seq: u64 },
    Upgrade,
}

/// (device, inode) of a file, to tell our socket from a successor's.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Master {
    /// Binds the control socket (replacing a stale or predecessor's file).
    pub(super) fn bind_control(&mut self) -> std::io::Result<()> {
        if let Some(old) = self.control.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&old.as_raw_fd()));
        }
        let path = self.config.control_socket.clone();
        let _ = std::fs::remove_file(&path);
        // The file is created 0600 by bind itself: no chmod window. The
        // master is the only thread that creates files, so the umask
        // change is seen by nothing else.
        let saved = umask(Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(&path);
        umask(saved);
        let l = bound.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot bind the control socket {}: {e}", path.display()))
        })?;
        l.set_nonblocking(true)?;
        self.poll.registry().register(&mut SourceFd(&l.as_raw_fd()), CONTROL, Interest::READABLE)?;
        self.control = Some(l);
        self.control_id = file_id(&path);
        Ok(())
    }

    /// Is the control socket file still the one this master bound?
    pub(super) fn control_is_ours(&self) -> bool {
        self.control_id.is_some() && file_id(&self.config.control_socket) == self.control_id
    }

    /// Accepts control connections: checks the peer, then reads its
    /// request as it arrives ([`Master::control_client_event`]).
    pub(super) fn accept_control(&mut self) {
        loop {
            let Some(l) = self.control.as_ref() else { return };
            let Ok((stream, _)) = l.accept() else { return };
            let me = nix::unistd::geteuid().as_raw();
            match getsockopt(&stream, PeerCredentials) {
                Ok(c) if c.uid() == 0 || c.uid() == me => {}
                Ok(c) => {
                    self.control_refused.peer_uid += 1;
                    slog::warn!(self.logger(), "control connection refused: not root nor the master's user";
                        "peer_uid" => c.uid(), "peer_pid" => c.pid(), "master_uid" => me);
                    answer(stream, &Reply::err("permission denied: only root and the master's user may control it"));
                    continue;
                }
                Err(e) => {
                    slog::warn!(self.logger(), "control connection refused: no peer credentials"; "error" => %e);
                    self.control_refused.peer_uid += 1;
                    continue;
                }
            }
            if self.control_clients.len() >= MAX_CLIENTS {
                self.control_refused.too_many += 1;
                slog::warn!(self.logger(), "control connection refused: too many clients"; "max" => MAX_CLIENTS);
                answer(stream, &Reply::err(format!("too many control clients (at most {MAX_CLIENTS})")));
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            let registered = stream.set_nonblocking(true).and_then(|()| {
                self.poll.registry().register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    Token(CLIENT_BASE + id),
                    Interest::READABLE,
                )
            });
            if let Err(e) = registered {
                slog::error!(self.logger(), "cannot watch a control connection"; "error" => %e);
                continue;
            }
            self.control_clients.push(Client {
                id,
                stream,
                buf: Vec::new(),
                deadline: Instant::now() + REQUEST_TIMEOUT,
            });
            // The request is often there already.
            self.control_client_event(id);
        }
    }

    /// Reads what a control client sent; acts once its line is complete.
    pub(super) fn control_client_event(&mut self, id: usize) {
        let Some(i) = self.control_clients.iter().position(|c| c.id == id) else { return };
        let c = &mut self.control_clients[i];
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            match (&c.stream).read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    c.buf.extend_from_slice(&chunk[..n]);
                    if c.buf.len() > REQUEST_MAX_BYTES || c.buf.contains(&b'\n') {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let line_end = c.buf.iter().position(|&b| b == b'\n');
        if line_end.is_none() && c.buf.len() <= REQUEST_MAX_BYTES && !eof {
            return;
        }
        let c = self.control_clients.swap_remove(i);
        let _ = self.poll.registry().deregister(&mut SourceFd(&c.stream.as_raw_fd()));
        let _ = c.stream.set_nonblocking(false);
        let line = match line_end {
            Some(n) if n <= REQUEST_MAX_BYTES => &c.buf[..n],
            None if c.buf.is_empty() => return,
            None if eof && c.buf.len() <= REQUEST_MAX_BYTES => &c.buf[..],
            _ => {
                self.control_refused.too_large += 1;
                slog::warn!(self.logger(), "control request refused: too large"; "max_bytes" => REQUEST_MAX_BYTES);
                return answer(c.stream, &Reply::err(format!("request larger than {REQUEST_MAX_BYTES} bytes")));
            }
        };
        match serde_json::from_slice::<Request>(line) {
            Ok(req) => self.command(c.stream, req),
            Err(e) => answer(c.stream, &Reply::err(format!("bad request: {e}"))),
        }
    }

    /// Clients that did not send their request in time.
    pub(super) fn expire_control_clients(&mut self, now: Instant) {
        while let Some(i) = self.control_clients.iter().position(|c| c.deadline <= now) {
            let c = self.control_clients.swap_remove(i);
            let _ = self.poll.registry().deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            let _ = c.stream.set_nonblocking(false);
            self.control_refused.timed_out += 1;
            slog::warn!(self.logger(), "control request timed out"; "after_ms" => REQUEST_TIMEOUT.as_millis() as u64,
                "bytes" => c.buf.len());
            answer(
                c.stream,
                &Reply::err(format!("request timed out: a whole line within {} ms", REQUEST_TIMEOUT.as_millis())),
            );
        }
    }

    fn command(&mut self, stream: StdUnixStream, req: Request) {
        slog::info!(self.logger(), "control command"; "cmd" => &req.cmd);
        match req.cmd.as_str() {
            "reload" => match self.reload() {
                Ok(seq) => self.pending.push(Pending {
                    stream,
                    kind: PendingKind::Reload { seq },
                    deadline: Instant::now() + RELOAD_CONFIRM,
                }),
                Err(e) => {
                    slog::error!(self.logger(), "reload refused; the running configuration stays"; "error" => %e);
                    answer(stream, &Reply::err(e.to_string()));
                }
            },
            "upgrade" => match self.start_upgrade(Some(stream)) {
                Ok(()) => {}
                Err((stream, e)) => {
                    slog::error!(self.logger(), "upgrade refused"; "error" => &e);
                    if let Some(s) = stream {
                        answer(s, &Reply::err(e));
                    }
                }
            },
            "quit" => {
                self.quit(false);
                answer(stream, &Reply::ok("quitting: workers drain, then the master exits"));
            }
            "stop" => {
                self.stop();
                answer(stream, &Reply::ok("stopping"));
            }
            "reopen" => {
                self.reopen();
                answer(stream, &Reply::ok("log files reopened"));
            }
            "status" => {
                let reply = Reply { data: self.status(), ..Reply::ok("running") };
                answer(stream, &reply);
            }
            "modules" => {
                let (table, data) = self.modules();
                answer(stream, &Reply { data, ..Reply::ok(table) });
            }
            "module" => {
                let reply = self.switch_module(&req.args);
                answer(stream, &reply);
            }
            "upstreams" => {
                let (table, data) = self.upstreams();
                answer(stream, &Reply { data, ..Reply::ok(table) });
            }
            other => answer(stream, &Reply::err(format!("unknown command {other:?}"))),
        }
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let (handover, generations) = self.handover_status();
        let workers: Vec<serde_json::Value> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| match &s.proc {
                Some(p) => {
                    serde_json::json!({"slot": i, "pid": p.pid.as_raw(), "ready": p.ready, "config_seq": p.acked})
                }
                None => serde_json::json!({"slot": i, "pid": null, "ready": false}),
            })
            .collect();
        serde_json::json!({
            "master_pid": std::process::id(),
            "config": self.args.config_path,
            "config_seq": self.seq,
            "state": format!("{:?}", self.state),
            "workers": workers,
            "retiring": self.retiring.iter().map(|p| p.pid.as_raw()).collect::<Vec<_>>(),
            "upgrade_pid": self.upgrade.as_ref().map(|u| u.pid.as_raw()),
            "handover": handover,
            "generations": generations,
            "listeners": self.listeners.iter().map(|b| b.entry.local.clone()).collect::<Vec<_>>(),
            "admin": self.admin.as_ref().map(|a| a.local.clone()),
            "access_log_dropped_lines": self.access_log_dropped(),
            "control_refused": {
                "peer_uid": self.control_refused.peer_uid,
                "too_large": self.control_refused.too_large,
                "timed_out": self.control_refused.timed_out,
                "too_many": self.control_refused.too_many,
            },
        })
    }

    /// Modules of the configuration with their state, and each worker's
    /// overload level.
    fn modules(&self) -> (String, serde_json::Value) {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = self.region.shared();
        let mut text = format!("{:<14} {:<8} {:<10} {:<9}\n", "MODULE", "ENABLED", "ESSENTIAL", "RUNTIME");
        let mut rows = Vec::new();
        for m in &self.config.modules {
            let flag = crate::hooks::registry_index(&m.name);
            let off = flag.is_some_and(|f| shared.modules[f].disabled.load(Relaxed) == 1);
            let runtime = if !m.enabled {
                "-"
            } else if off {
                "disabled"
            } else {
                "on"
            };
            text.push_str(&format!("{:<14} {:<8} {:<10} {:<9}\n", m.name, m.enabled, m.essential, runtime));
            rows.push(serde_json::json!({"name": m.name, "enabled": m.enabled, "essential": m.essential,
                "runtime_disabled": off, "state": runtime}));
        }
        let mut workers = Vec::new();
        text.push_str(&format!("\n{:<8} {:<8} {:<6} {:>5} {:>9}\n", "WORKER", "PID", "LEVEL", "BUSY%", "IN_FLIGHT"));
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(p) = &slot.proc else { continue };
            let Some(w) = shared.workers.get(p.place) else { continue };
            let (level, busy, in_flight) =
                (w.level.load(Relaxed), w.busy_percent.load(Relaxed), w.in_flight.load(Relaxed));
            text.push_str(&format!("{:<8} {:<8} {:<6} {:>5} {:>9}\n", i, p.pid.as_raw(), level, busy, in_flight));
            workers.push(serde_json::json!({"slot": i, "place": p.place, "pid": p.pid.as_raw(), "level": level, "busy_percent": busy,
                "in_flight": in_flight, "level_changes": w.level_changes.load(Relaxed)}));
        }
        let (quota_text, quota) = self.quota_keys();
        text.push_str(&quota_text);
        let dropped = self.access_log_dropped();
        text.push_str(&format!("\naccess log lines dropped: {dropped}\n"));
        (
            text.trim_end().to_string(),
            serde_json::json!({"modules": rows, "workers": workers, "quota": quota, "access_log_dropped_lines": dropped}),
        )
    }

    /// The quota's key table in shared memory: slots held by a key, slots
    /// with requests in flight, requests that found no slot (overflow) and
    /// idle slots taken over by new keys.
    fn quota_keys(&self) -> (String, serde_json::Value) {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = self.region.shared();
        let slots = &shared.limiters[1..=crate::shm::MAX_QUOTA_KEYS];
        let keys = slots.iter().filter(|l| l.key.load(Relaxed) != 0).count();
        let busy = slots.iter().filter(|l| l.key.load(Relaxed) != 0 && l.in_flight.load(Relaxed) > 0).count();
        let (overflow, reclaimed) = (shared.quota.overflow.load(Relaxed), shared.quota.reclaimed.load(Relaxed));
        let text = format!(
            "\n{:<10} {:>9} {:>10} {:>10}\n{:<10} {:>9} {:>10} {:>10}\n",
            "QUOTA", "KEYS", "OVERFLOW", "RECLAIMED", "", keys, overflow, reclaimed
        );
        (text, serde_json::json!({"keys": keys, "keys_in_flight": busy, "overflow": overflow, "reclaimed": reclaimed}))
    }

    /// `module enable|disable NAME`: a switch in shared memory, so every
    /// worker sees it at its next request, and it outlives reloads.
    fn switch_module(&self, args: &[String]) -> Reply {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(action), Some(name)) = (args.first(), args.get(1)) else {
            return Reply::err("usage: module enable|disable NAME");
        };
        let off = match action.as_str() {
            "enable" => 0,
            "disable" => 1,
            other => return Reply::err(format!("unknown action {other:?}: expected enable or disable")),
        };
        let Some(flag) = crate::hooks::registry_index(name) else {
            let known: Vec<&str> = crate::hooks::registry().iter().map(|r| r.name).collect();
            return Reply::err(format!("no module {name:?} (compiled in: {})", known.join(", ")));
        };
        self.region.shared().modules[flag].disabled.store(off, Relaxed);
        slog::warn!(self.logger(), "module switched at run time"; "module" => name, "action" => action);
        let configured = self.config.modules.iter().any(|m| &m.name == name && m.enabled);
        let note = if configured { "" } else { " (not enabled in the configuration)" };
        Reply::ok(format!("module {name} {action}d for all workers{note}"))
    }

    /// Every backend's shared state: the same answer whichever worker
    /// serves traffic, since it is read from the shared region.
    fn upstreams(&self) -> (String, serde_json::Value) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut rows = Vec::new();
        let mut text = format!(
            "{:<16} {:<28} {:>6} {:<10} {:>10} {:>6} {:>7} {:>10} {:>9} {:>7}\n",
            "CLUSTER", "BACKEND", "WEIGHT", "STATE", "EJECTED_MS", "RAMP%", "ACTIVE", "REQUESTS", "FAILURES", "PROBES"
        );
        for c in &self.config.clusters {
            for b in &c.backends {
                let Some(s) = self.backend_slots.peek(&b.addr) else { continue };
                // The clock is read after the deadline: read before, a
                // deadline that a worker sets in between would show more
                // than the ejection's length.
                let until = s.ejected_until_ms.load(Relaxed);
                let now = crate::shm::now_ms();
                let ejected_ms = until.saturating_sub(now);
                let (state, progress) = crate::upstream::backend_state(s, c.slow_start.as_millis() as u64, now);
                let ramp = (progress * 100.0) as u64;
                let row = serde_json::json!({
                    "cluster": c.name,
                    "backend": b.addr.to_string(),
                    "weight": b.weight,
                    "state": state,
                    "health_checked": c.health_check.is_some(),
                    "ejected_for_ms": ejected_ms,
                    "ejections": s.ejections.load(Relaxed),
                    "slow_start_percent": ramp,
                    "active": s.active.load(Relaxed),
                    "requests": s.requests.load(Relaxed),
                    "failures": s.failures.load(Relaxed),
                    "probes": s.probes.load(Relaxed),
                });
                text.push_str(&format!(
                    "{:<16} {:<28} {:>6} {:<10} {:>10} {:>6} {:>7} {:>10} {:>9} {:>7}\n",
                    c.name,
                    b.addr.to_string(),
                    b.weight,
                    state,
                    ejected_ms,
                    ramp,
                    s.active.load(Relaxed),
                    s.requests.load(Relaxed),
                    s.failures.load(Relaxed),
                    s.probes.load(Relaxed)
                ));
                rows.push(row);
            }
        }
        (text.trim_end().to_string(), serde_json::json!({ "backends": rows }))
    }

    /// Answers the pending requests that are settled or timed out.
    pub(super) fn reply_pending(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            let settled = match self.pending[i].kind {
                PendingKind::Reload { seq } => {
                    let live: Vec<_> = self.slots.iter().filter_map(|s| s.proc.as_ref()).collect();
                    let behind = live.iter().filter(|p| p.acked < seq).count();
                    if behind == 0 {
                        Some(Reply::ok(format!("configuration reloaded by {} workers", live.len())))
                    } else if now >= self.pending[i].deadline || self.state != State::Running {
                        Some(Reply::err(format!("{behind} of {} workers did not confirm the reload", live.len())))
                    } else {
                        None
                    }
                }
                PendingKind::Upgrade => None,
            };
            match settled {
                Some(reply) => {
                    let p = self.pending.swap_remove(i);
                    answer(p.stream, &reply);
                }
                None => i += 1,
            }
        }
    }

    /// Answers every pending upgrade request.
    pub(super) fn settle_upgrade_replies(&mut self, reply: &Reply) {
        let mut i = 0;
        while i < self.pending.len() {
            if matches!(self.pending[i].kind, PendingKind::Upgrade) {
                let p = self.pending.swap_remove(i);
                answer(p.stream, reply);
            } else {
                i += 1;
            }
        }
    }

    pub(super) fn wait_for_upgrade(&mut self, stream: StdUnixStream) {
        self.pending.push(Pending {
            stream,
            kind: PendingKind::Upgrade,
            deadline: Instant::now() + Duration::from_secs(3600),
        });
    }
}

/// Writes the answer line (best effort: the client may have gone).
pub fn answer(mut stream: StdUnixStream, reply: &Reply) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if let Ok(mut line) = serde_json::to_vec(reply) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
    }
}
