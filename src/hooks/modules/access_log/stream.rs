//! The records sink: length-delimited protobuf records (see
//! `proto/access_record.proto`) over TCP or a Unix stream socket, written
//! by the access log's writer thread (never the event loop).
//!
//! Connects lazily and again after a failure, with a back-off from 100 ms
//! doubling to 5 s. Records handed over while there is no connection are
//! dropped and counted by the caller. The receiver never writes, so a
//! readable connection means the receiver went away: checked before each
//! batch, so that a batch is not lost silently into a dead TCP connection.
//! A batch whose write fails or stalls (a stopped receiver) is counted as
//! dropped and the connection is closed: a cut record is never followed by
//! another on the same connection.

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

    /// The receiver closed its end (or reset it): it never sends anything.
    fn peer_gone(&self) -> bool {
        let mut b = [0u8; 1];
        match recv(self.fd(), &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(_) => false,
            Err(nix::errno::Errno::EAGAIN) => false,
            Err(_) => true,
        }
    }
}

/// What became of a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Delivered,
    /// Not sent (no connection, or it failed): count the batch's records.
    Dropped,
}

pub struct RecordStream {
    addr: StreamAddr,
    conn: Option<Conn>,
    backoff: Duration,
    retry_at: Option<Instant>,
    log: slog::Logger,
}

impl RecordStream {
    pub fn new(addr: StreamAddr, log: slog::Logger) -> RecordStream {
        RecordStream { addr, conn: None, backoff: BACKOFF_MIN, retry_at: None, log }
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

    fn lost(&mut self, why: &str, e: Option<io::Error>) {
        if self.conn.take().is_some() {
            let e = e.map(|e| e.to_string()).unwrap_or_default();
            slog::warn!(self.log, "access records receiver lost; records are dropped (and counted) until it is back";
                "address" => %self.addr, "why" => why, "error" => e);
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Writes one batch of length-delimited records.
    pub fn send(&mut self, batch: &[u8]) -> Sent {
        if batch.is_empty() {
            return Sent::Delivered;
        }
        if self.conn.as_ref().is_some_and(Conn::peer_gone) {
            self.lost("the receiver closed the connection", None);
            // Try again at once: a restarted receiver may already be there.
            self.retry_at = None;
        }
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Sent::Dropped;
            }
            match self.connect() {
                Ok(c) => {
                    slog::info!(self.log, "access records receiver connected"; "address" => %self.addr);
                    self.conn = Some(c);
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
                    return Sent::Dropped;
                }
            }
        }
        let Some(c) = self.conn.as_mut() else { return Sent::Dropped };
        match c.write_all(batch) {
            Ok(()) => Sent::Delivered,
            Err(e) => {
                self.lost("write failed", Some(e));
                Sent::Dropped
            }
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
        assert_eq!(s.send(b"x"), Sent::Dropped, "no receiver");
        assert_eq!(s.send(b"x"), Sent::Dropped, "backing off");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        s.retry_at = None;
        assert_eq!(s.send(b"one"), Sent::Delivered);
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 3];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"one");
        drop(c);
        // The next batch finds the connection closed and connects again.
        assert_eq!(s.send(b"two"), Sent::Delivered);
        let (mut c, _) = l.accept().unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"two");
    }

    /// The subtle case: a write into a TCP connection the receiver closed
    /// succeeds (the reset comes later), so the batch would be lost without
    /// being counted. The check before each batch sees the close.
    #[test]
    fn a_closed_tcp_receiver_is_noticed_before_a_batch_is_written_into_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = RecordStream::new(StreamAddr::Tcp(l.local_addr().unwrap()), log());
        assert_eq!(s.send(b"one"), Sent::Delivered);
        let (c, _) = l.accept().unwrap();
        drop(c);
        // Let the FIN arrive.
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            s.conn.as_ref().is_some_and(Conn::peer_gone)
        });
        assert!(gone, "the close is seen");
        assert_eq!(s.send(b"two"), Sent::Delivered);
        l.set_nonblocking(true).unwrap();
        let mut got = None;
        for _ in 0..200 {
            if let Ok((c, _)) = l.accept() {
                got = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = got.expect("\"two\" went over a new connection");
        c.set_nonblocking(false).unwrap();
        let mut b = [0u8; 3];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"two");
    }
}
