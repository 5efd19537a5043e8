//! Address types of the configuration: where Pitcher listens and where a
//! backend lives. Newtypes keep a listening address from being passed where a
//! backend address is expected. Parsing only; nothing here opens a socket.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, Deserialize, Deserializer};

/// A socket address that is either TCP (`127.0.0.1:8080`, `[::1]:80`) or a
/// Unix domain socket (`unix:/run/app.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SockAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl SockAddr {
    /// Parses `host:port` (numeric IPv4 / bracketed IPv6) or `unix:/path`.
    pub fn parse(s: &str) -> Result<SockAddr, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: address needs a path, as in \"unix:/run/app.sock\"".into());
            }
            if path.len() > 107 {
                return Err(format!("unix socket path is {} bytes; at most 107 fit in sockaddr_un", path.len()));
            }
            return Ok(SockAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(SockAddr::Tcp).map_err(|_| {
            format!(
                "invalid address {s:?}: expected IP:PORT (e.g. \"127.0.0.1:8080\", \"[::1]:8080\") or \"unix:/path\""
            )
        })
    }
}

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SockAddr::Tcp(a) => write!(f, "{a}"),
            SockAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where a listener accepts client connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SockAddr);

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SockAddr::parse(&s).map(ListenAddr).map_err(de::Error::custom)
    }
}

/// Where a backend accepts connections from Pitcher.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr(pub SockAddr);

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One entry of a cluster's `backends` list: `"ADDR [weight=N]"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where the backend listens.
    pub addr: BackendAddr,
    /// Relative share of traffic, 1..=1000.
    pub weight: u32,
}

/// Largest weight accepted; keeps the smooth round robin arithmetic small.
pub const MAX_WEIGHT: u32 = 1000;

impl BackendSpec {
    /// Parses `ADDR` or `ADDR weight=N`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<BackendSpec, String> {
        let mut parts = s.split_whitespace();
        let addr = parts.next().ok_or_else(|| "empty backend entry".to_string())?;
        let addr = BackendAddr(SockAddr::parse(addr)?);
        let mut weight = 1;
        for p in parts {
            let (k, v) =
                p.split_once('=').ok_or_else(|| format!("backend parameter {p:?} is not of the form key=value"))?;
            match k {
                "weight" => {
                    weight = v
                        .parse::<u32>()
                        .ok()
                        .filter(|w| (1..=MAX_WEIGHT).contains(w))
                        .ok_or_else(|| format!("weight={v:?}: expected an integer from 1 to {MAX_WEIGHT}"))?;
                }
                other => return Err(format!("unknown backend parameter {other:?} (known: weight)")),
            }
        }
        Ok(BackendSpec { addr, weight })
    }
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BackendSpec::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_unix_and_weight() {
        let b = BackendSpec::parse("127.0.0.1:9002 weight=3").unwrap();
        assert_eq!(b.weight, 3);
        assert_eq!(b.addr.to_string(), "127.0.0.1:9002");
        let u = BackendSpec::parse("unix:/run/app.sock").unwrap();
        assert_eq!(u.addr.0, SockAddr::Unix("/run/app.sock".into()));
        assert_eq!(u.weight, 1);
        assert!(SockAddr::parse("[::1]:80").is_ok());
    }

    #[test]
    fn refuses_bad_entries() {
        assert!(BackendSpec::parse("localhost:80").is_err());
        assert!(BackendSpec::parse("127.0.0.1:80 weight=0").is_err());
        assert!(BackendSpec::parse("127.0.0.1:80 weight=x").is_err());
        assert!(BackendSpec::parse("127.0.0.1:80 max_fails=3").is_err());
        assert!(BackendSpec::parse("unix:").is_err());
    }
}
