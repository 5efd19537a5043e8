//! `access_log`: one line per request at REQUEST_FINISH, to a file, to a
//! syslog server (UDP or the local `/dev/log`), and/or as length-delimited
//! protobuf records to a receiver over TCP or a Unix stream socket.
//!
//! The event loop never waits for a log target: lines (and records) are
//! formatted into a batch ([`format`], [`record`]; nothing allocated per
//! line) that goes, when it is large or at the next tick (100 ms), to a
//! bounded queue that a writer thread of this worker empties ([`writer`])
//! — one hand-over per batch, not per line. Lines are lost when the queue
//! is full (a slow disk, a stopped receiver), when a write fails (a full
//! disk), when no syslog socket takes them, or while the records receiver
//! is away ([`stream`]: reconnect with back-off); every lost line is
//! counted, logged by the writer, and reported to the master (`ctl status`,
//! `ctl modules`: `access_log_dropped_lines`). The file is reopened on
//! SIGUSR1 (logrotate).
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
//! format = "json"                        # or "combined", or "custom" with custom = "..."
//! syslog = "udp:127.0.0.1:514"           # optional; or "unix:/dev/log"
//! records = "tcp:127.0.0.1:9500"         # optional; or "unix:/run/pitcher-records.sock"
//! ```

mod format;
pub mod record;
mod stream;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Ctx, Finished, Module, Point};
use crate::syslog::{Syslog, SyslogAddr};

use format::{Clock, Format};
use record::AccessRecord;
use stream::{RecordStream, StreamAddr};
use writer::{Msg, Writer};

/// Batches waiting for the writer before new ones are dropped.
const QUEUE: usize = 256;
/// A batch this large (text or records) goes to the writer at once.
const BATCH_BYTES: usize = 32 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// A file, opened by the master and reopened on SIGUSR1.
    path: Option<PathBuf>,
    /// `json`, `combined` (nginx's, exactly) or `custom`.
    #[serde(default = "default_format")]
    format: String,
    /// The template of `format = "custom"`: text and `$variables`.
    custom: Option<String>,
    /// A syslog server: `udp:IP:PORT` or `unix:/dev/log`.
    syslog: Option<String>,
    /// The older spelling of `syslog = "udp:IP:PORT"`: `IP:PORT`.
    syslog_udp: Option<String>,
    /// The syslog facility (`local0` unless given).
    syslog_facility: Option<String>,
    /// The syslog APP-NAME (`pitcher` unless given).
    syslog_tag: Option<String>,
    /// A receiver of protobuf records: `tcp:IP:PORT` or `unix:/path`.
    records: Option<String>,
}

/// Lines dropped by every access log of this process (all reloads).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Writer threads of this process, to wait for at exit.
static WRITERS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

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

/// Counts lines lost (in this module and in the process's total).
fn count_dropped(own: &AtomicU64, n: u64) {
    own.fetch_add(n, Relaxed);
    DROPPED_TOTAL.fetch_add(n, Relaxed);
    crate::shm::metrics::add(&crate::shm::metrics::here().log_dropped, n);
}

/// Lines and records formatted since the last hand-over.
#[derive(Default)]
struct Batch {
    /// Lines, each ending in a newline (when a file or syslog is a sink).
    text: String,
    /// Length-delimited records (when a records receiver is a sink).
    records: Vec<u8>,
    lines: u64,
    /// The record being encoded, reused.
    record: AccessRecord,
    clock: Clock,
    /// Buffers the writer thread emptied and gave back, for the next
    /// batches: no allocation per batch in the steady state.
    spares: Option<Receiver<(String, Vec<u8>)>>,
}

struct AccessLog {
    format: Format,
    /// A file or syslog takes the text lines.
    text: bool,
    /// A receiver takes the records.
    records: bool,
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
        let (spare_text, spare_records) = b.spares.as_ref().and_then(|r| r.try_recv().ok()).unwrap_or_else(|| {
            (
                if self.text { String::with_capacity(BATCH_BYTES + 1024) } else { String::new() },
                if self.records { Vec::with_capacity(BATCH_BYTES + 1024) } else { Vec::new() },
            )
        });
        let text = std::mem::replace(&mut b.text, spare_text);
        let records = std::mem::replace(&mut b.records, spare_records);
        let lines = std::mem::take(&mut b.lines);
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Batch { text, records, lines }) {
            count_dropped(&self.dropped, lines);
        }
    }
}

impl Drop for AccessLog {
    /// A reload replaces the module: its last lines still go out.
    fn drop(&mut self) {
        self.flush();
    }
}

/// The validated settings.
struct Parsed {
    format: Format,
    path: Option<PathBuf>,
    syslog: Option<(SyslogAddr, u8, String)>,
    records: Option<StreamAddr>,
}

fn parse(s: Settings) -> Result<Parsed, String> {
    let format = Format::parse(&s.format, s.custom.as_deref())?;
    let syslog_addr = match (&s.syslog, &s.syslog_udp) {
        (Some(_), Some(_)) => return Err("give syslog or syslog_udp, not both".into()),
        (Some(a), None) => Some(SyslogAddr::parse(a).map_err(|e| format!("syslog = {e}"))?),
        (None, Some(a)) => {
            Some(SyslogAddr::Udp(a.parse().map_err(|_| format!("syslog_udp = {a:?}: expected IP:PORT"))?))
        }
        (None, None) => None,
    };
    let syslog = match syslog_addr {
        Some(a) => {
            let facility = crate::syslog::facility(s.syslog_facility.as_deref().unwrap_or("local0"))?;
            Some((a, facility, s.syslog_tag.unwrap_or_else(|| "pitcher".into())))
        }
        None if s.syslog_facility.is_some() || s.syslog_tag.is_some() => {
            return Err("syslog_facility and syslog_tag need a syslog address".into())
        }
        None => None,
    };
    let records = s.records.as_deref().map(StreamAddr::parse).transpose()?;
    if s.path.is_none() && syslog.is_none() && records.is_none() {
        return Err("give a path, a syslog address, a records receiver, or several".into());
    }
    Ok(Parsed { format, path: s.path, syslog, records })
}

/// Builds the access-log module from its `[modules.access_log]` table.
pub fn build(c: &ModuleConfig, b: &Build) -> Result<Arc<dyn Module>, String> {
    let p = parse(super::settings(&c.settings)?)?;
    let (tx, rx) = sync_channel(QUEUE);
    // Emptied buffers come back on this one (it holds what the queue can).
    let (spares_tx, spares_rx) = sync_channel(QUEUE + 1);
    let dropped = Arc::new(AtomicU64::new(0));
    let module = AccessLog {
        format: p.format,
        text: p.path.is_some() || p.syslog.is_some(),
        records: p.records.is_some(),
        tx,
        dropped: dropped.clone(),
        batch: Mutex::new(Batch { spares: Some(spares_rx), ..Batch::default() }),
    };
    if b.check_only {
        return Ok(Arc::new(module));
    }
    let writer = Writer {
        path: p.path,
        file: None,
        syslog: p.syslog.map(|(a, f, tag)| Syslog::new(a, f, &tag)),
        records: p.records.map(|a| RecordStream::new(a, b.log.clone())),
        dropped,
        records_dropped: 0,
        syslog_dropped: 0,
        log: b.log.clone(),
        spares: spares_tx,
    };
    let handle = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;
    if let Ok(mut w) = WRITERS.lock() {
        w.retain(|h| !h.is_finished());
        w.push(handle);
    }
    Ok(Arc::new(module))
}

impl Module for AccessLog {
    fn points(&self) -> &'static [Point] {
        &[Point::RequestFinish]
    }

    fn request_finish(&self, d: &Finished<'_>, ctx: &mut Ctx<'_>) {
        let full = {
            let Ok(mut guard) = self.batch.lock() else { return };
            let b = &mut *guard;
            let now = SystemTime::now();
            if self.text {
                b.clock.set(now);
                self.format.write(&mut b.text, &mut b.clock, d, ctx);
                b.text.push('\n');
            }
            if self.records {
                b.record.fill(now, d, ctx);
                // Encoding into a Vec cannot fail (it grows).
                let _ = b.record.encode_length_delimited(&mut b.records);
            }
            b.lines += 1;
            crate::shm::metrics::add(&crate::shm::metrics::here().log_lines, 1);
            b.text.len() >= BATCH_BYTES || b.records.len() >= BATCH_BYTES
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(t: &str) -> Result<Parsed, String> {
        let table: toml::Table = toml::from_str(t).map_err(|e| e.to_string())?;
        parse(crate::hooks::modules::settings(&table)?)
    }

    #[test]
    fn sinks_and_formats_are_validated() {
        assert!(settings("path = \"/x\"").is_ok());
        assert!(settings("syslog_udp = \"127.0.0.1:514\"").is_ok(), "the older spelling still works");
        assert!(settings("syslog = \"unix:/dev/log\"\nsyslog_facility = \"local3\"\nsyslog_tag = \"edge\"").is_ok());
        assert!(settings("records = \"unix:/run/r.sock\"\nformat = \"custom\"\ncustom = \"$status\"").is_ok());
        for bad in [
            "format = \"json\"",
            "path = \"/x\"\nformat = \"xml\"",
            "path = \"/x\"\nformat = \"custom\"",
            "path = \"/x\"\nformat = \"custom\"\ncustom = \"$nope\"",
            "syslog = \"udp:nowhere\"",
            "syslog = \"unix:/dev/log\"\nsyslog_udp = \"127.0.0.1:514\"",
            "syslog = \"unix:/dev/log\"\nsyslog_facility = \"local9\"",
            "path = \"/x\"\nsyslog_tag = \"t\"",
            "records = \"udp:127.0.0.1:1\"",
            "path = \"/x\"\nunknown = 1",
        ] {
            assert!(settings(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
