//! The error log: `slog` with a plain-text formatter behind an async drain,
//! so that a slow terminal or disk never blocks an event loop (records are
//! dropped, and counted by slog-async, when its queue is full). A file log
//! can be reopened in place (SIGUSR1, for logrotate). Lines start with the
//! time in RFC 3339 with the year and the zone (UTC: `Z`). The error log
//! can also go to syslog (`error_log = "syslog:udp:IP:PORT"` or
//! `"syslog:unix:/dev/log"`, [`SyslogDrain`]), sent from the async drain's
//! thread.
//!
//! Also the table of files the master opened for this worker process
//! ([`take_over`], [`handed_file`]): a worker running as an unprivileged
//! user may be unable to open (or reopen, after logrotate) the files it
//! writes, so the master opens them and passes the fds.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use slog::{Drain, Logger};

use crate::config::LogTarget;

/// Messages queued for a worker's log thread before new ones are dropped
/// (and counted by `slog_async`'s "dropped messages" line). A worker logs
/// per request when backends fail, in bursts.
const QUEUE: usize = 8192;

/// The same for the master, which logs only lifecycle events (starts,
/// reloads, upgrades, exits: tens of lines at once). The queue's slots are
/// allocated and written when it is built, about 100 bytes each, so the
/// worker's 8,192 would cost every master 0.8 MiB of RSS, paid twice while
/// a binary upgrade runs two masters.
const MASTER_QUEUE: usize = 1024;

/// A sending handle on the worker's channel to the master, for reports
/// from threads other than the event loop's.
static REPORTER: Mutex<Option<crate::channel::Channel>> = Mutex::new(None);

/// Lets [`report_dropped`] reach the master through `ch`.
pub fn set_reporter(ch: crate::channel::Channel) {
    if let Ok(mut r) = REPORTER.lock() {
        *r = Some(ch);
    }
}

/// Tells the master how many access-log lines this process dropped so far
/// (a total, so a report lost to a full channel is made good by the next).
pub fn report_dropped(total: u64) {
    if let Ok(r) = REPORTER.lock() {
        if let Some(ch) = r.as_ref() {
            let _ = ch.send(&crate::channel::ToMaster::Dropped { access_log_lines: total }, &[]);
        }
    }
}

/// Files the master opened for this process, by the path it was given.
static HANDED: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

/// Takes over files the master opened: `fds[i]` is `paths[i]`, opened for
/// appending. Replaces earlier ones of the same path (after a reopen).
pub fn take_over(paths: &[String], fds: Vec<std::os::fd::OwnedFd>) -> Result<(), String> {
    if paths.len() != fds.len() {
        return Err(format!("{} files named but {} fds arrived", paths.len(), fds.len()));
    }
    let Ok(mut table) = HANDED.lock() else { return Err("the file table is poisoned".into()) };
    for (p, fd) in paths.iter().zip(fds) {
        let p = PathBuf::from(p);
        table.retain(|(q, _)| *q != p);
        table.push((p, File::from(fd)));
    }
    Ok(())
}

/// A handle on the file the master opened at `path`, if it did.
pub fn handed_file(path: &Path) -> Option<io::Result<File>> {
    let table = HANDED.lock().ok()?;
    table.iter().find(|(p, _)| p == path).map(|(_, f)| f.try_clone())
}

/// A log file that can be reopened while loggers write to it.
#[derive(Debug, Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl LogFile {
    fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile { path: path.to_path_buf(), file: Arc::new(Mutex::new(open_append(path)?)) })
    }

    /// Reopens the file at its path (after logrotate moved the old one).
    pub fn reopen(&self) -> io::Result<()> {
        let f = open_append(&self.path)?;
        if let Ok(mut g) = self.file.lock() {
            *g = f;
        }
        Ok(())
    }
}

impl LogFile {
    /// Writes to `file` from now on (a file opened by someone else).
    pub fn replace(&self, file: File) {
        if let Ok(mut g) = self.file.lock() {
            *g = file;
        }
    }
}

/// The file at `path` for appending: the master's fd when it handed one
/// over for this path, else opened here.
fn open_append(path: &Path) -> io::Result<File> {
    match handed_file(path) {
        Some(f) => f,
        None => OpenOptions::new().create(true).append(true).open(path),
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.lock() {
            Ok(mut f) => f.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self.file.lock() {
            Ok(mut f) => f.flush(),
            Err(_) => Ok(()),
        }
    }
}

/// A process's root logger and what keeps it alive.
pub struct Log {
    /// The logger to write to.
    pub logger: Logger,
    /// Present when logging to a file: reopen it on SIGUSR1.
    pub file: Option<LogFile>,
    _guard: slog_async::AsyncGuard,
}

impl Log {
    /// Reopens the log file, if any.
    pub fn reopen(&self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.reopen(),
            None => Ok(()),
        }
    }
}

/// The time at the start of each line: `2026-12-02T18:17:00.123Z`.
fn timestamp(w: &mut dyn Write) -> io::Result<()> {
    w.write_all(crate::timefmt::iso8601(SystemTime::now()).as_bytes())
}

/// Error log lines that syslog did not take (no server, no `/dev/log`):
/// they are written to stderr instead, and counted.
pub static SYSLOG_LOST: AtomicU64 = AtomicU64::new(0);

/// The error log as RFC 5424 syslog datagrams (facility daemon, APP-NAME
/// `pitcher`, MSGID `error`): `message key=value ...`.
pub struct SyslogDrain {
    syslog: Mutex<crate::syslog::Syslog>,
}

impl SyslogDrain {
    /// A drain that sends error-log lines to `addr`.
    pub fn new(addr: crate::syslog::SyslogAddr) -> SyslogDrain {
        SyslogDrain { syslog: Mutex::new(crate::syslog::Syslog::new(addr, 3, "pitcher")) }
    }
}

/// `key=value` pairs appended to a line.
struct Pairs<'a>(&'a mut String);

impl slog::Serializer for Pairs<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for SyslogDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use crate::syslog::severity;
        use slog::KV;
        let mut line = record.msg().to_string();
        let _ = record.kv().serialize(record, &mut Pairs(&mut line));
        let _ = values.serialize(record, &mut Pairs(&mut line));
        let sev = match record.level() {
            slog::Level::Critical => severity::CRIT,
            slog::Level::Error => severity::ERR,
            slog::Level::Warning => severity::WARNING,
            slog::Level::Info => severity::INFO,
            slog::Level::Debug | slog::Level::Trace => severity::DEBUG,
        };
        let sent = match self.syslog.lock() {
            Ok(mut s) => s.send(sev, "error", &line).is_ok(),
            Err(_) => false,
        };
        if !sent {
            let lost = SYSLOG_LOST.fetch_add(1, Relaxed) + 1;
            eprintln!(
                "{} {} (syslog unreachable; {lost} error log lines sent here instead)",
                record.level().as_short_str(),
                line
            );
        }
        Ok(())
    }
}

/// Builds the root logger for a process.
pub fn build(target: &LogTarget, level: slog::Level, process: &'static str) -> io::Result<Log> {
    let queue = if process == "master" { MASTER_QUEUE } else { QUEUE };
    let (drain, guard, file) = match target {
        LogTarget::Stderr => {
            let decorator = slog_term::PlainSyncDecorator::new(io::stderr());
            let fmt = slog_term::FullFormat::new(decorator).use_custom_timestamp(timestamp).build().fuse();
            let (d, g) = slog_async::Async::new(fmt).chan_size(queue).build_with_guard();
            (d, g, None)
        }
        LogTarget::File(path) => {
            let file = LogFile::open(path)?;
            let decorator = slog_term::PlainSyncDecorator::new(file.clone());
            let fmt = slog_term::FullFormat::new(decorator).use_custom_timestamp(timestamp).build().fuse();
            let (d, g) = slog_async::Async::new(fmt).chan_size(queue).build_with_guard();
            (d, g, Some(file))
        }
        LogTarget::Syslog(addr) => {
            let (d, g) = slog_async::Async::new(SyslogDrain::new(addr.clone())).chan_size(queue).build_with_guard();
            (d, g, None)
        }
    };
    let drain = drain.filter_level(level).fuse();
    let logger = Logger::root(drain, slog::o!("process" => process, "pid" => std::process::id()));
    Ok(Log { logger, file, _guard: guard })
}
