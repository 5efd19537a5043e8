//! The error log: `slog` with a plain-text formatter behind an async drain,
//! so that a slow terminal or disk never blocks an event loop (records are
//! dropped, and counted by slog-async, when its queue is full).

use std::fs::OpenOptions;

use slog::{Drain, Logger};

use crate::config::LogTarget;

/// Messages queued for the log thread before new ones are dropped.
const QUEUE: usize = 8192;

/// Builds the root logger for a process.
pub fn build(
    target: &LogTarget,
    level: slog::Level,
    process: &'static str,
) -> std::io::Result<(Logger, slog_async::AsyncGuard)> {
    let (drain, guard) = match target {
        LogTarget::Stderr => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let fmt = slog_term::FullFormat::new(decorator).build().fuse();
            slog_async::Async::new(fmt).chan_size(QUEUE).build_with_guard()
        }
        LogTarget::File(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let decorator = slog_term::PlainSyncDecorator::new(file);
            let fmt = slog_term::FullFormat::new(decorator).build().fuse();
            slog_async::Async::new(fmt).chan_size(QUEUE).build_with_guard()
        }
    };
    let drain = drain.filter_level(level).fuse();
    let log = Logger::root(drain, slog::o!("process" => process, "pid" => std::process::id()));
    Ok((log, guard))
}
