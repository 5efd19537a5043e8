//! `access_log`: one line per request at REQUEST_FINISH, as JSON or in the
//! combined format, to a file and/or a syslog server over UDP.
//!
//! The event loop never waits for a log target: lines are formatted into a
//! batch that goes, when it is large or at the next tick (100 ms), to a
//! bounded queue that a writer thread of this worker empties — one hand-over
//! per batch, not per line. A full queue (a slow disk, a missing syslog
//! server) or a failed write (a full disk) drops the batch and counts its
//! lines; the count is logged by the writer when it catches up and reported
//! to the master (`ctl status`, `ctl modules`: `access_log_dropped_lines`). The file is reopened on SIGUSR1 (logrotate).
//!
//! Under a master, the file is opened by the master ([`files`]) and handed
//! over as an fd (`log::handed_file`), at start and at each reopen: a worker
//! running as `nobody` may not be allowed to open it. A worker that exits
//! waits (bounded) for its writers to write what was handed to them
//! ([`wait_writers`]).
//!
//! ```toml
//! [modules.access_log]
//! path = "/var/log/pitcher/access.log"   # optional
//! format = "json"                        # or "combined"
//! syslog_udp = "127.0.0.1:514"           # optional
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::config::{Config, ModuleConfig};
use crate::hooks::{Build, Ctx, Finished, Module, Point};

/// Batches waiting for the writer before new ones are dropped.
const QUEUE: usize = 256;
/// A batch this large goes to the writer at once.
const BATCH_BYTES: usize = 32 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    path: Option<PathBuf>,
    #[serde(default = "default_format")]
    format: String,
    syslog_udp: Option<String>,
}

/// Lines dropped by every access log of this process (all reloads).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Writer threads of this process, to wait for at exit.
static WRITERS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// The files the master opens for this module (the `path`s of enabled
/// access logs).
pub fn files(config: &Config) -> Vec<PathBuf> {
    config
        .modules
        .iter()
        .filter(|m| m.enabled && m.name == "access_log")
        .filter_map(|m| super::settings::<Settings>(&m.settings).ok()?.path)
        .collect()
}

/// Waits until every writer thread whose module is gone has written what
/// it was handed, or `limit` passed. Called by a worker on its way out.
pub fn wait_writers(limit: Duration) {
    let deadline = Instant::now() + limit;
    let Ok(mut writers) = WRITERS.lock() else { return };
    while writers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in writers.drain(..).filter(|h| h.is_finished()) {
        let _ = h.join();
    }
}

fn default_format() -> String {
    "json".into()
}

enum Msg {
    /// Lines, each ending in a newline.
    Lines(String),
    Reopen,
}

/// Lines formatted since the last hand-over.
#[derive(Default)]
struct Batch {
    text: String,
    lines: u64,
}

struct AccessLog {
    json: bool,
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    /// Only the worker's loop thread touches it: the lock is never contended.
    batch: Mutex<Batch>,
}

impl AccessLog {
    fn flush(&self) {
        let Ok(mut b) = self.batch.lock() else { return };
        if b.lines == 0 {
            return;
        }
        let text = std::mem::replace(&mut b.text, String::with_capacity(BATCH_BYTES + 1024));
        let n = std::mem::take(&mut b.lines);
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Lines(text)) {
            self.dropped.fetch_add(n, Relaxed);
            DROPPED_TOTAL.fetch_add(n, Relaxed);
        }
    }
}

impl Drop for AccessLog {
    /// A reload replaces the module: its last lines still go out.
    fn drop(&mut self) {
        self.flush();
    }
}

/// Builds an access log from its `[modules.access_log]` table.
pub fn build(c: &ModuleConfig, b: &Build) -> Result<Arc<dyn Module>, String> {
    let s: Settings = super::settings(&c.settings)?;
    let json = match s.format.as_str() {
        "json" => true,
        "combined" => false,
        other => return Err(format!("format = {other:?}: expected \"json\" or \"combined\"")),
    };
    let syslog: Option<SocketAddr> = match &s.syslog_udp {
        None => None,
        Some(a) => Some(a.parse().map_err(|_| format!("syslog_udp = {a:?}: expected IP:PORT"))?),
    };
    if s.path.is_none() && syslog.is_none() {
        return Err("give a path, a syslog_udp address, or both".into());
    }
    let (tx, rx) = sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    if b.check_only {
        return Ok(Arc::new(AccessLog { json, tx, dropped, batch: Mutex::default() }));
    }
    let writer = Writer { path: s.path, syslog, file: None, udp: None, dropped: dropped.clone(), log: b.log.clone() };
    let handle = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;
    if let Ok(mut w) = WRITERS.lock() {
        w.retain(|h| !h.is_finished());
        w.push(handle);
    }
    Ok(Arc::new(AccessLog { json, tx, dropped, batch: Mutex::default() }))
}

impl Module for AccessLog {
    fn points(&self) -> &'static [Point] {
        &[Point::RequestFinish]
    }

    fn request_finish(&self, d: &Finished<'_>, ctx: &mut Ctx<'_>) {
        let full = {
            let Ok(mut b) = self.batch.lock() else { return };
            if self.json {
                json_line(&mut b.text, d, ctx);
            } else {
                combined_line(&mut b.text, d, ctx);
            }
            b.text.push('\n');
            b.lines += 1;
            b.text.len() >= BATCH_BYTES
        };
        if full {
            self.flush();
        }
    }

    fn tick(&self) {
        self.flush();
    }

    fn reopen(&self) {
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

fn client(ctx: &Ctx<'_>) -> String {
    ctx.client.map_or_else(|| "unix".to_string(), |ip| ip.to_string())
}

/// One JSON object, written directly (no intermediate value tree: this runs
/// for every request).
fn json_line(o: &mut String, d: &Finished<'_>, ctx: &Ctx<'_>) {
    use std::fmt::Write;
    o.push_str("{\"time\":\"");
    o.push_str(&iso8601(SystemTime::now()));
    o.push_str("\",\"client\":");
    json_str(o, client(ctx).as_bytes());
    o.push_str(",\"method\":");
    json_str(o, d.method);
    o.push_str(",\"path\":");
    json_str(o, d.target);
    o.push_str(",\"host\":");
    json_str(o, d.host);
    let _ = write!(
        o,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3}",
        d.status,
        d.bytes,
        d.duration.as_secs_f64() * 1000.0
    );
    o.push_str(",\"backend\":");
    match d.backend {
        Some(b) => json_str(o, b.as_bytes()),
        None => o.push_str("null"),
    }
    match d.upstream_time {
        Some(t) => {
            let _ = write!(o, ",\"upstream_ms\":{:.3}", t.as_secs_f64() * 1000.0);
        }
        None => o.push_str(",\"upstream_ms\":null"),
    }
    o.push_str(",\"route\":");
    match ctx.route {
        Some(r) => json_str(o, r.name.as_bytes()),
        None => o.push_str("null"),
    }
    o.push_str(",\"user_agent\":");
    json_str(o, d.user_agent);
    o.push_str(",\"request_id\":");
    json_str(o, d.request_id);
    o.push('}');
}

/// A JSON string of bytes (invalid UTF-8 replaced).
fn json_str(o: &mut String, b: &[u8]) {
    use std::fmt::Write;
    o.push('"');
    for c in String::from_utf8_lossy(b).chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
}

/// nginx's combined format plus request time, backend and upstream time.
fn combined_line(o: &mut String, d: &Finished<'_>, ctx: &Ctx<'_>) {
    use std::fmt::Write;
    let q = |b: &[u8]| if b.is_empty() { "-".to_string() } else { String::from_utf8_lossy(b).replace('"', "\\\"") };
    let _ = write!(
        o,
        "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" rt={:.3} backend={} urt={} id={}",
        client(ctx),
        iso8601(SystemTime::now()),
        q(d.method),
        q(d.target),
        d.version,
        d.status,
        d.bytes,
        q(d.referer),
        q(d.user_agent),
        d.duration.as_secs_f64(),
        d.backend.unwrap_or("-"),
        d.upstream_time.map_or("-".to_string(), |t| format!("{:.3}", t.as_secs_f64())),
        q(d.request_id),
    );
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), without a date crate.
pub fn iso8601(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The writer thread: owns the file and the UDP socket.
struct Writer {
    path: Option<PathBuf>,
    syslog: Option<SocketAddr>,
    /// Written one batch per `write` (batches are already large): a
    /// failed write is known at once and its lines are counted as dropped.
    file: Option<File>,
    udp: Option<UdpSocket>,
    dropped: Arc<AtomicU64>,
    log: slog::Logger,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        self.open();
        let mut reported = 0;
        // Ends when the module is dropped (a reload built a new one).
        while let Ok(msg) = rx.recv() {
            self.handle(msg);
            while let Ok(more) = rx.try_recv() {
                self.handle(more);
            }
            if let Some(f) = self.file.as_mut() {
                let _ = f.flush();
            }
            let dropped = self.dropped.load(Relaxed);
            if dropped > reported {
                slog::warn!(self.log, "access log lines dropped (target too slow)"; "dropped_total" => dropped);
                reported = dropped;
                crate::log::report_dropped(DROPPED_TOTAL.load(Relaxed));
            }
        }
        if self.dropped.load(Relaxed) > reported {
            crate::log::report_dropped(DROPPED_TOTAL.load(Relaxed));
        }
    }

    fn open(&mut self) {
        if let Some(p) = &self.path {
            // The master's fd when it opened the file for us.
            let opened =
                crate::log::handed_file(p).unwrap_or_else(|| OpenOptions::new().create(true).append(true).open(p));
            match opened {
                Ok(f) => self.file = Some(f),
                Err(e) => slog::error!(self.log, "cannot open the access log"; "path" => %p.display(), "error" => %e),
            }
        }
        if let Some(a) = self.syslog {
            let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            match UdpSocket::bind(bind).and_then(|s| s.connect(a).map(|()| s)) {
                Ok(s) => self.udp = Some(s),
                Err(e) => slog::error!(self.log, "cannot open the syslog socket"; "address" => %a, "error" => %e),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Lines(text) => {
                if let Some(f) = self.file.as_mut() {
                    if f.write_all(text.as_bytes()).is_err() {
                        // A full disk: the lines are lost, and counted.
                        let n = text.lines().count() as u64;
                        self.dropped.fetch_add(n, Relaxed);
                        DROPPED_TOTAL.fetch_add(n, Relaxed);
                    }
                }
                let Some(u) = &self.udp else { return };
                for line in text.lines() {
                    // RFC 5424: facility local0 (16), severity info (6).
                    let msg = format!(
                        "<134>1 {} - pitcher {} access - {}",
                        iso8601(SystemTime::now()),
                        std::process::id(),
                        line
                    );
                    let _ = u.send(msg.as_bytes());
                }
            }
            Msg::Reopen => {
                if let Some(f) = self.file.as_mut() {
                    let _ = f.flush();
                }
                self.file = None;
                self.udp = None;
                self.open();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_strings_are_escaped() {
        let mut o = String::new();
        json_str(&mut o, b"a\"b\\c\nd");
        assert_eq!(o, r#""a\"b\\c\u000ad""#);
        let v: serde_json::Value = serde_json::from_str(&o).unwrap();
        assert_eq!(v, "a\"b\\c\nd");
    }

    #[test]
    fn iso8601_dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(UNIX_EPOCH + Duration::from_millis(1_795_608_000_123)), "2026-11-25T12:00:00.123Z");
        assert_eq!(iso8601(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
