//! The error log: `slog` with a plain-text formatter behind an async drain,
//! so that a slow terminal or disk never blocks an event loop (records are
//! dropped, and counted by slog-async, when its queue is full). A file log
//! can be reopened in place (SIGUSR1, for logrotate).
//!
//! Also the table of files the master opened for this worker process
//! ([`take_over`], [`handed_file`]): a worker running as an unprivileged
//! user may be unable to open (or reopen, after logrotate) the files it
//! writes, so the master opens them and passes the fds.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use slog::{Drain, Logger};

use crate::config::LogTarget;

/// Messages queued for the log thread before new ones are dropped.
const QUEUE: usize = 8192;

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

/// Builds the root logger for a process.
pub fn build(target: &LogTarget, level: slog::Level, process: &'static str) -> io::Result<Log> {
    let (drain, guard, file) = match target {
        LogTarget::Stderr => {
            let decorator = slog_term::PlainSyncDecorator::new(io::stderr());
            let fmt = slog_term::FullFormat::new(decorator).build().fuse();
            let (d, g) = slog_async::Async::new(fmt).chan_size(QUEUE).build_with_guard();
            (d, g, None)
        }
        LogTarget::File(path) => {
            let file = LogFile::open(path)?;
            let decorator = slog_term::PlainSyncDecorator::new(file.clone());
            let fmt = slog_term::FullFormat::new(decorator).build().fuse();
            let (d, g) = slog_async::Async::new(fmt).chan_size(QUEUE).build_with_guard();
            (d, g, Some(file))
        }
    };
    let drain = drain.filter_level(level).fuse();
    let logger = Logger::root(drain, slog::o!("process" => process, "pid" => std::process::id()));
    Ok(Log { logger, file, _guard: guard })
}
