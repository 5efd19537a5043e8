//! Active health checks, run by the master: one HTTP probe per backend per
//! interval, however many workers there are, with the result written to
//! the backend's shared state that every worker reads when it balances.
//! The master never touches request traffic; a probe is its own small
//! connection (`GET <path>`, `Connection: close`), driven by the master's
//! event loop without blocking it; over TLS for a cluster with `tls`,
//! checked like the workers' connections (a refused certificate fails the
//! probe).

use std::io::{Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};
use slog::Logger;

use crate::config::{BackendAddr, Config, HealthCheck};
use crate::net::Readiness;
use crate::shm::{now_ms, BackendShm, SlotTable};
use crate::tls::{BackendStream, Connector, Connectors, TlsMaterial};

/// Probe tokens: `PROBE_BASE + target index` (above any pid-based token).
pub const PROBE_BASE: usize = 1 << 40;
/// Most bytes of a probe's answer read (the status line is enough).
const MAX_ANSWER: usize = 1024;

struct Probe {
    stream: BackendStream,
    /// What the socket may do: everything is tried after each event (an
    /// operation that cannot says so), so this is set before each try.
    rd: Readiness,
    connected: bool,
    request: Vec<u8>,
    written: usize,
    answer: Vec<u8>,
    deadline: Instant,
}

/// One backend address to check.
struct Target {
    addr: BackendAddr,
    shm: &'static BackendShm,
    hc: HealthCheck,
    /// TLS to this backend (its first checked cluster's `tls`).
    tls: Option<Connector>,
    next_at: Instant,
    probe: Option<Probe>,
}

/// The master's health checker.
#[derive(Default)]
pub struct Checker {
    targets: Vec<Target>,
    /// TLS sessions of probes, resumed by the next probe.
    sessions: Option<std::sync::Arc<rustls::client::ClientSessionMemoryCache>>,
}

impl Checker {
    /// Rebuilds the targets from a configuration; probes in flight are
    /// dropped (their backends are probed again at once).
    pub fn configure(
        &mut self,
        config: &Config,
        tls: &TlsMaterial,
        slots: &mut SlotTable,
        registry: &Registry,
        log: &Logger,
    ) {
        let sessions = self.sessions.get_or_insert_with(crate::tls::backend::session_cache).clone();
        // The master checked this material when it loaded it.
        let connectors = Connectors::build(&config.clusters, tls, &sessions).unwrap_or_else(|e| {
            slog::error!(log, "health checks of TLS backends: cannot build their TLS settings"; "error" => %e);
            Connectors::default()
        });
        // Probes keep their schedule across a reload (no burst of probes).
        let mut next: Vec<(BackendAddr, Instant)> = Vec::new();
        for t in &mut self.targets {
            if let Some(mut p) = t.probe.take() {
                let _ = registry.deregister(&mut p.stream);
            }
            next.push((t.addr.clone(), t.next_at));
        }
        self.targets.clear();
        let now = Instant::now();
        for (ci, c) in config.clusters.iter().enumerate() {
            let Some(hc) = &c.health_check else { continue };
            for b in &c.backends {
                if self.targets.iter().any(|t| t.addr == b.addr) {
                    continue; // Probed once, with the first cluster's settings.
                }
                let Some(slot) = slots.slot_of(&b.addr) else { continue };
                let next_at = next.iter().find(|(a, _)| *a == b.addr).map_or(now, |(_, t)| *t);
                self.targets.push(Target {
                    addr: b.addr.clone(),
                    shm: slots.shm(slot),
                    hc: hc.clone(),
                    tls: connectors.get(ci).cloned(),
                    next_at,
                    probe: None,
                });
            }
        }
        // A backend no longer checked is no longer held down by old probes.
        for c in &config.clusters {
            for b in &c.backends {
                if self.targets.iter().any(|t| t.addr == b.addr) {
                    continue;
                }
                if let Some(s) = slots.peek(&b.addr) {
                    s.down.store(0, Relaxed);
                    s.probe_ok_run.store(0, Relaxed);
                    s.probe_fail_run.store(0, Relaxed);
                }
            }
        }
    }

    /// Time until the next probe is due or times out.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.targets
            .iter()
            .map(|t| t.probe.as_ref().map_or(t.next_at, |p| p.deadline))
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Starts due probes and fails those past their timeout.
    pub fn tick(&mut self, registry: &Registry, log: &Logger) {
        let now = Instant::now();
        for i in 0..self.targets.len() {
            let t = &mut self.targets[i];
            if let Some(p) = &t.probe {
                if now >= p.deadline {
                    self.finish(i, false, "timeout", registry, log);
                }
                continue;
            }
            if now < t.next_at {
                continue;
            }
            t.next_at = now + t.hc.interval;
            match BackendStream::connect(&t.addr, t.tls.as_ref()) {
                Ok(mut stream) => {
                    if let Err(e) =
                        registry.register(&mut stream, Token(PROBE_BASE + i), Interest::READABLE | Interest::WRITABLE)
                    {
                        slog::error!(log, "cannot register a health probe"; "error" => %e);
                        continue;
                    }
                    // A Unix-socket backend has no host name: "localhost".
                    let host = match &t.addr.0 {
                        crate::config::SockAddr::Tcp(a) => a.to_string(),
                        crate::config::SockAddr::Unix(_) => "localhost".to_string(),
                    };
                    let request = format!(
                        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pitcher-health-check\r\nConnection: close\r\n\r\n",
                        t.hc.path
                    )
                    .into_bytes();
                    t.probe = Some(Probe {
                        stream,
                        rd: Readiness::default(),
                        connected: false,
                        request,
                        written: 0,
                        answer: Vec::new(),
                        deadline: now + t.hc.timeout,
                    });
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.finish(i, false, &reason, registry, log);
                }
            }
        }
    }

    /// A probe socket is ready.
    pub fn event(&mut self, token: Token, registry: &Registry, log: &Logger) {
        let i = token.0 - PROBE_BASE;
        let Some(t) = self.targets.get_mut(i) else { return };
        let Some(p) = t.probe.as_mut() else { return };
        if !p.connected {
            p.rd = Readiness { readable: true, writable: true, read_closed: false };
            match p.stream.connect_step(&mut p.rd) {
                Ok(true) => p.connected = true,
                Ok(false) => return,
                Err(e) => {
                    let reason = e.to_string();
                    return self.finish(i, false, &reason, registry, log);
                }
            }
        }
        while p.written < p.request.len() {
            match p.stream.write(&p.request[p.written..]) {
                Ok(n) => p.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let reason = e.to_string();
                    return self.finish(i, false, &reason, registry, log);
                }
            }
        }
        // TLS records the socket did not take yet.
        match p.stream.flush() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let reason = e.to_string();
                return self.finish(i, false, &reason, registry, log);
            }
        }
        let mut buf = [0u8; 512];
        loop {
            match p.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    p.answer.extend_from_slice(&buf[..n]);
                    if p.answer.len() >= MAX_ANSWER || p.answer.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let reason = e.to_string();
                    return self.finish(i, false, &reason, registry, log);
                }
            }
        }
        let status = status_of(&p.answer);
        let ok = status.is_some_and(|s| (t.hc.status_min..=t.hc.status_max).contains(&s));
        let reason = match status {
            Some(s) => format!("status {s}"),
            None => "no HTTP status line".into(),
        };
        self.finish(i, ok, &reason, registry, log);
    }

    /// Records a probe's result in the shared state (rise/fall).
    fn finish(&mut self, i: usize, ok: bool, reason: &str, registry: &Registry, log: &Logger) {
        let t = &mut self.targets[i];
        if let Some(mut p) = t.probe.take() {
            let _ = registry.deregister(&mut p.stream);
        }
        let s = t.shm;
        s.probes.fetch_add(1, Relaxed);
        if ok {
            s.probe_fail_run.store(0, Relaxed);
            let run = s.probe_ok_run.fetch_add(1, Relaxed) + 1;
            if s.down.load(Relaxed) == 1 && run >= t.hc.rise {
                s.down.store(0, Relaxed);
                s.ramp_start_ms.store(now_ms(), Relaxed);
                slog::warn!(log, "backend is up again (health check)"; "backend" => %t.addr, "successes" => run);
            }
        } else {
            s.probe_ok_run.store(0, Relaxed);
            let run = s.probe_fail_run.fetch_add(1, Relaxed) + 1;
            if s.down.load(Relaxed) == 0 && run >= t.hc.fall {
                s.down.store(1, Relaxed);
                slog::error!(log, "backend is down (health check)"; "backend" => %t.addr, "failures" => run, "reason" => reason);
            }
        }
    }
}

/// The status code of an HTTP response's first line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status_of;

    #[test]
    fn reads_the_status_line() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 503 x\r\n"), Some(503));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
    }
}
