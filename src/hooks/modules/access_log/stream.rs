//! The records sink: length-delimited protobuf records (see
//! `proto/access_record.proto`) over TCP or a Unix stream socket, written
//! by the access log's writer thread (never the event loop).
//!
//! Connects lazily and again after a failure, with a back-off from 100 ms
//! doubling to 5 s. Records handed over while there is no connection are
//! dropped and counted by the caller. The receiver writes back only
//! acknowledgements: the number of records it printed on the connection
//! (8 bytes, little-endian; `pitcher-records` does). They are read before
//! each batch; an end of stream there means the receiver went away, and
//! every record written on the connection that it did not acknowledge is
//! counted as dropped (it may have died with them in its socket buffer).
//! A batch whose write fails or stalls (a stopped receiver) is counted as
//! dropped, with the unacknowledged ones, and the connection is closed: a
//! cut record is never followed by another on the same connection.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags};

/// The first wait after a failed connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two connection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A TCP connect that takes longer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A write of a batch that takes longer fails (the receiver is stopped or
/// too slow); meanwhile the worker's queue absorbs, then drops and counts.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where records go: `tcp:IP:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl StreamAddr {
    pub fn parse(s: &str) -> Result<StreamAddr, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(StreamAddr::Tcp).map_err(|_| format!("records = {s:?}: expected tcp:IP:PORT"));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("records = {s:?}: expected unix:/absolute/path"));
            }
            return Ok(StreamAddr::Unix(PathBuf::from(p)));
        }
        Err(format!("records = {s:?}: expected \"tcp:IP:PORT\" or \"unix:/path\""))
    }
}

impl std::fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamAddr::Tcp(a) => write!(f, "tcp:{a}"),
            StreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection and its records' accounting.
struct Link {
    conn: Conn,
    /// Records written on it.
    written: u64,
    /// Records the receiver acknowledged.
    acked: u64,
    /// Bytes of an acknowledgement not yet complete.
    partial: [u8; 8],
    npartial: usize,
}

impl Link {
    /// Reads the acknowledgements that arrived; `false` when the receiver
    /// closed the connection (or it failed).
    fn read_acks(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match recv(self.conn.fd(), &mut b, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return false,
                Ok(n) => {
                    for &byte in &b[..n] {
                        self.partial[self.npartial] = byte;
                        self.npartial += 1;
                        if self.npartial == 8 {
                            self.npartial = 0;
                            // Never more than was written (a confused receiver).
                            self.acked = u64::from_le_bytes(self.partial).min(self.written);
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return false,
            }
        }
    }

    /// Written, never acknowledged.
    fn unacked(&self) -> u64 {
        self.written.saturating_sub(self.acked)
    }
}

impl Conn {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(b),
            Conn::Unix(s) => s.write_all(b),
        }
    }
}

pub struct RecordStream {
    addr: StreamAddr,
    link: Option<Link>,
    backoff: Duration,
    retry_at: Option<Instant>,
    log: slog::Logger,
}

impl RecordStream {
    pub fn new(addr: StreamAddr, log: slog::Logger) -> RecordStream {
        RecordStream { addr, link: None, backoff: BACKOFF_MIN, retry_at: None, log }
    }

    fn connect(&self) -> io::Result<Conn> {
        match &self.addr {
            StreamAddr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, CONNECT_TIMEOUT)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
            StreamAddr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Ok(Conn::Unix(s))
            }
        }
    }

    /// The connection is gone: returns its records that were never
    /// acknowledged (to count as dropped).
    fn lost(&mut self, why: &str, e: Option<io::Error>) -> u64 {
        let mut unacked = 0;
        if let Some(mut l) = self.link.take() {
            l.read_acks();
            unacked = l.unacked();
            let e = e.map(|e| e.to_string()).unwrap_or_default();
            slog::warn!(self.log, "access records receiver lost; records are dropped (and counted) until it is back";
                "address" => %self.addr, "why" => why, "error" => e, "unacknowledged" => unacked);
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        unacked
    }

    /// Writes one batch of `records` length-delimited records. Returns
    /// how many records are lost: the batch's when it could not go, plus
    /// those of a connection that ended before acknowledging them.
    pub fn send(&mut self, batch: &[u8], records: u64) -> u64 {
        let mut dropped = 0;
        if self.link.as_mut().is_some_and(|l| !l.read_acks()) {
            dropped += self.lost("the receiver closed the connection", None);
            // Try again at once: a restarted receiver may already be there.
            self.retry_at = None;
        }
        if batch.is_empty() {
            return dropped;
        }
        if self.link.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return dropped + records;
            }
            match self.connect() {
                Ok(c) => {
                    slog::info!(self.log, "access records receiver connected"; "address" => %self.addr);
                    self.link = Some(Link { conn: c, written: 0, acked: 0, partial: [0; 8], npartial: 0 });
                    self.backoff = BACKOFF_MIN;
                    self.retry_at = None;
                }
                Err(e) => {
                    if self.retry_at.is_none() {
                        slog::warn!(self.log, "cannot reach the access records receiver; retrying with back-off";
                            "address" => %self.addr, "error" => %e);
                    }
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    return dropped + records;
                }
            }
        }
        let Some(l) = self.link.as_mut() else { return dropped + records };
        match l.conn.write_all(batch) {
            Ok(()) => {
                l.written += records;
                dropped
            }
            Err(e) => dropped + records + self.lost("write failed", Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn log() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(StreamAddr::parse("tcp:127.0.0.1:9500"), Ok(StreamAddr::Tcp("127.0.0.1:9500".parse().unwrap())));
        assert_eq!(StreamAddr::parse("unix:/run/x.sock"), Ok(StreamAddr::Unix("/run/x.sock".into())));
        assert!(StreamAddr::parse("tcp:host").is_err());
        assert!(StreamAddr::parse("unix:x.sock").is_err());
        assert!(StreamAddr::parse("udp:1.2.3.4:5").is_err());
    }

    #[test]
    fn a_closed_receiver_is_noticed_before_the_next_batch_and_reconnected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let mut s = RecordStream::new(StreamAddr::Unix(path.clone()), log());
        assert_eq!(s.send(b"x", 1), 1, "no receiver");
        assert_eq!(s.send(b"x", 1), 1, "backing off");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        s.retry_at = None;
        assert_eq!(s.send(b"one", 1), 0);
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 3];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"one");
        c.write_all(&1u64.to_le_bytes()).unwrap();
        drop(c);
        // The next batch finds the connection closed (nothing unacknowledged
        // on it) and connects again.
        assert_eq!(s.send(b"two", 1), 0);
        let (mut c, _) = l.accept().unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"two");
    }

    /// The subtle cases: a write into a TCP connection the receiver closed
    /// succeeds (the reset comes later), and records the receiver took into
    /// its socket buffer die with it. Both are counted: the close is seen
    /// before the next batch, and what was never acknowledged is dropped.
    #[test]
    fn records_a_dead_tcp_receiver_never_acknowledged_are_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = RecordStream::new(StreamAddr::Tcp(l.local_addr().unwrap()), log());
        assert_eq!(s.send(b"one", 2), 0);
        assert_eq!(s.send(b"two", 3), 0);
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 6];
        c.read_exact(&mut b).unwrap();
        // It acknowledges the first batch only, then dies.
        c.write_all(&2u64.to_le_bytes()).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        // The next batch: the 3 unacknowledged records are lost, this one goes
        // on a new connection.
        assert_eq!(s.send(b"new", 1), 3);
        l.set_nonblocking(true).unwrap();
        let mut got = None;
        for _ in 0..200 {
            if let Ok((c, _)) = l.accept() {
                got = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = got.expect("a new connection");
        c.set_nonblocking(false).unwrap();
        let mut b = [0u8; 3];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"new");
    }
}
