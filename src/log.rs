//! The error log: `slog` with a plain-text formatter behind an async drain,
//! so that a slow terminal or disk never blocks an event loop (records are
//! dropped, and counted by slog-async, when its queue is full). A file log
//! can be reopened in place (SIGUSR1, for logrotate).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use slog::{Drain, Logger};

use crate::config::LogTarget;

/// Messages queued for the log thread before new ones are dropped.
const QUEUE: usize = 8192;

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

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
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
