//! The access log's writer thread: owns the file, the syslog socket and the
//! records connection of one `access_log` module instance. It may block (a
//! slow disk, a stopped receiver); the event loop never does: it only hands
//! batches over a bounded queue. Lost lines are counted here and reported
//! to the master.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use crate::syslog::{severity, Syslog};

use super::stream::RecordStream;
use super::{count_dropped, DROPPED_TOTAL};

pub enum Msg {
    /// `lines` requests: their text lines (each ending in a newline; empty
    /// when no file or syslog takes them) and their length-delimited
    /// records (empty when no receiver takes them).
    Batch {
        text: String,
        records: Vec<u8>,
        lines: u64,
    },
    Reopen,
}

pub struct Writer {
    pub path: Option<PathBuf>,
    /// Written one batch per `write` (batches are already large): a
    /// failed write is known at once and its lines are counted as dropped.
    pub file: Option<File>,
    pub syslog: Option<Syslog>,
    pub records: Option<RecordStream>,
    pub dropped: Arc<AtomicU64>,
    /// Of which: records not delivered to the receiver (away, stopped).
    pub records_dropped: u64,
    /// Of which: lines no syslog socket took.
    pub syslog_dropped: u64,
    pub log: slog::Logger,
    /// Gives emptied batch buffers back to the module.
    pub spares: SyncSender<(String, Vec<u8>)>,
}

impl Writer {
    pub fn run(mut self, rx: Receiver<Msg>) {
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
                slog::warn!(self.log, "access log lines dropped (a target is slow or away)";
                    "dropped_total" => dropped, "records_dropped" => self.records_dropped,
                    "syslog_dropped" => self.syslog_dropped);
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
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Batch { mut text, mut records, lines } => {
                if let Some(f) = self.file.as_mut() {
                    if f.write_all(text.as_bytes()).is_err() {
                        // A full disk: the lines are lost, and counted.
                        count_dropped(&self.dropped, lines);
                    }
                }
                if let Some(s) = self.syslog.as_mut() {
                    let mut lost = 0;
                    for line in text.lines() {
                        if s.send(severity::INFO, "access", line).is_err() {
                            lost += 1;
                        }
                    }
                    if lost > 0 {
                        self.syslog_dropped += lost;
                        count_dropped(&self.dropped, lost);
                    }
                }
                if let Some(r) = self.records.as_mut() {
                    let lost = r.send(&records, lines);
                    if lost > 0 {
                        self.records_dropped += lost;
                        count_dropped(&self.dropped, lost);
                    }
                }
                // Back to the module for a later batch (dropped if it has
                // enough already, or is gone).
                text.clear();
                records.clear();
                let _ = self.spares.try_send((text, records));
            }
            Msg::Reopen => {
                if let Some(f) = self.file.as_mut() {
                    let _ = f.flush();
                }
                self.file = None;
                self.open();
            }
        }
    }
}
