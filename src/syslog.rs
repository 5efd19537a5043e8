//! Syslog (RFC 5424) over UDP or a local Unix datagram socket (`/dev/log`),
//! for the access log and the error log: one datagram per line,
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
//!
//! A sender belongs to one writer thread (the access log's, or the error
//! log's async drain): it never runs on an event loop. Sends never block
//! (datagrams); a line that cannot be sent (no server, no `/dev/log`) is
//! counted by the caller, never fatal. The socket is opened lazily and
//! opened again after an error, at most once a second.

use std::fmt::Write;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How long a failed socket is left alone before it is opened again.
const RETRY: Duration = Duration::from_secs(1);

/// Where syslog lines go: `udp:IP:PORT` or `unix:/dev/log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddr {
    /// A syslog server over UDP.
    Udp(SocketAddr),
    /// A local Unix datagram socket such as `/dev/log`.
    Unix(PathBuf),
}

impl SyslogAddr {
    /// `udp:IP:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<SyslogAddr, String> {
        if let Some(a) = s.strip_prefix("udp:") {
            return a.parse().map(SyslogAddr::Udp).map_err(|_| format!("{s:?}: expected udp:IP:PORT"));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("{s:?}: expected unix:/absolute/path"));
            }
            return Ok(SyslogAddr::Unix(PathBuf::from(p)));
        }
        Err(format!("{s:?}: expected \"udp:IP:PORT\" or \"unix:/dev/log\""))
    }
}

impl std::fmt::Display for SyslogAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyslogAddr::Udp(a) => write!(f, "udp:{a}"),
            SyslogAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// RFC 5424 facility by name (`local0` … `local7`, `user`, `daemon`).
pub fn facility(name: &str) -> Result<u8, String> {
    Ok(match name {
        "user" => 1,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        other => {
            return Err(format!("syslog facility {other:?}: expected local0 to local7, user, daemon, auth or syslog"))
        }
    })
}

/// RFC 5424 severities used here.
pub mod severity {
    /// Critical conditions.
    pub const CRIT: u8 = 2;
    /// Error conditions.
    pub const ERR: u8 = 3;
    /// Warning conditions.
    pub const WARNING: u8 = 4;
    /// Normal but significant.
    pub const NOTICE: u8 = 5;
    /// Informational.
    pub const INFO: u8 = 6;
    /// Debug messages.
    pub const DEBUG: u8 = 7;
}

/// This host's name for the HOSTNAME field (`-` if it has none).
pub fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(h) => {
            let h = h.to_string_lossy();
            // RFC 5424: PRINTUSASCII, at most 255 characters.
            let clean: String = h.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
            if clean.is_empty() {
                "-".into()
            } else {
                clean
            }
        }
        Err(_) => "-".into(),
    }
}

enum Sock {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

/// A syslog sender (one per writer thread).
pub struct Syslog {
    addr: SyslogAddr,
    facility: u8,
    /// APP-NAME.
    tag: String,
    hostname: String,
    pid: u32,
    sock: Option<Sock>,
    /// When the socket may be opened again after a failure.
    retry_at: Option<Instant>,
    /// The datagram being built (its capacity is reused).
    buf: String,
}

impl Syslog {
    /// A sender to `addr` with this facility and APP-NAME (`tag`).
    pub fn new(addr: SyslogAddr, facility: u8, tag: &str) -> Syslog {
        Syslog {
            addr,
            facility,
            tag: tag.chars().filter(|c| c.is_ascii_graphic()).take(48).collect(),
            hostname: hostname(),
            pid: std::process::id(),
            sock: None,
            retry_at: None,
            buf: String::with_capacity(1024),
        }
    }

    /// Where the lines go.
    pub fn addr(&self) -> &SyslogAddr {
        &self.addr
    }

    fn open(&self) -> io::Result<Sock> {
        match &self.addr {
            SyslogAddr::Udp(a) => {
                let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let s = UdpSocket::bind(bind)?;
                s.connect(a)?;
                s.set_nonblocking(true)?;
                Ok(Sock::Udp(s))
            }
            SyslogAddr::Unix(p) => {
                let s = UnixDatagram::unbound()?;
                s.connect(p)?;
                s.set_nonblocking(true)?;
                Ok(Sock::Unix(s))
            }
        }
    }

    /// Sends one line; `Err` when it was not sent (count it).
    pub fn send(&mut self, severity: u8, msgid: &str, line: &str) -> io::Result<()> {
        if self.sock.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(io::Error::new(io::ErrorKind::NotConnected, "syslog socket unavailable"));
            }
            match self.open() {
                Ok(s) => {
                    self.sock = Some(s);
                    self.retry_at = None;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + RETRY);
                    return Err(e);
                }
            }
        }
        self.buf.clear();
        let _ = write!(self.buf, "<{}>1 ", u32::from(self.facility) * 8 + u32::from(severity));
        crate::timefmt::write_iso8601(&mut self.buf, SystemTime::now());
        let _ = write!(self.buf, " {} {} {} {} - {}", self.hostname, self.tag, self.pid, msgid, line);
        let sent = match &self.sock {
            Some(Sock::Udp(s)) => s.send(self.buf.as_bytes()),
            Some(Sock::Unix(s)) => s.send(self.buf.as_bytes()),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "syslog socket unavailable")),
        };
        match sent {
            Ok(_) => Ok(()),
            // A full socket buffer: this line is lost, the socket is fine.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                // No listener (any more): open again later.
                self.sock = None;
                self.retry_at = Some(Instant::now() + RETRY);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_facilities_parse() {
        assert_eq!(SyslogAddr::parse("udp:127.0.0.1:514"), Ok(SyslogAddr::Udp("127.0.0.1:514".parse().unwrap())));
        assert_eq!(SyslogAddr::parse("unix:/dev/log"), Ok(SyslogAddr::Unix("/dev/log".into())));
        assert!(SyslogAddr::parse("udp:localhost").is_err());
        assert!(SyslogAddr::parse("unix:dev/log").is_err());
        assert!(SyslogAddr::parse("tcp:1.2.3.4:5").is_err());
        assert_eq!(facility("local0"), Ok(16));
        assert!(facility("local9").is_err());
    }

    #[test]
    fn lines_are_rfc5424_datagrams_on_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let mut s = Syslog::new(SyslogAddr::Unix(path.clone()), 16, "pitcher");
        assert!(s.send(severity::INFO, "access", "early").is_err(), "no socket yet: not sent");
        let rx = UnixDatagram::bind(&path).unwrap();
        s.retry_at = None;
        s.send(severity::ERR, "error", "hello world").unwrap();
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
        let f: Vec<&str> = got.splitn(8, ' ').collect();
        assert_eq!(f[0], "<131>1", "{got}");
        assert!(f[1].ends_with('Z') && f[1].len() == 24, "{got}");
        assert_eq!((f[2], f[3], f[5], f[6], f[7]), (hostname().as_str(), "pitcher", "error", "-", "hello world"));
        assert_eq!(f[4], std::process::id().to_string());
    }
}
