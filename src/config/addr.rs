//! Address types of the configuration: where Pitcher listens and where a
//! backend lives (an address, or a DNS name the master resolves). Newtypes
//! keep a listening address from being passed where a backend address is
//! expected. Parsing only; nothing here opens a socket or resolves a name.

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

/// As written in the file (read back by `Deserialize`: the form the master
/// sends its workers, `config::spanned`).
impl serde::Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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

/// A backend given by DNS name (`"app.internal:9001 weight=2"`): the
/// master resolves it and every address found becomes a backend of the
/// cluster, with this weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBackend {
    /// The host name, lower case, without a trailing dot.
    pub host: String,
    /// The port every address of the name is reached on.
    pub port: u16,
    /// Weight of each address found.
    pub weight: u32,
    /// The file that names it (main or included).
    pub file: PathBuf,
    /// 1-based line of the `backends` entry (0 until the file is located).
    pub line: usize,
}

impl NamedBackend {
    /// `host:port`, as written (the key of its resolved addresses).
    pub fn key(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One entry of a cluster's `backends` list as written: an address, or a
/// name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEntry {
    /// `IP:PORT` or `unix:/path`.
    Addr(BackendSpec),
    /// `name:PORT`.
    Name(NamedBackend),
}

impl BackendEntry {
    /// Parses `ADDR [weight=N]` where ADDR is `IP:PORT`, `unix:/path` or
    /// `host.name:PORT`.
    pub fn parse(s: &str) -> Result<BackendEntry, String> {
        let first = s.split_whitespace().next().unwrap_or("");
        let as_addr = BackendSpec::parse(s);
        if as_addr.is_ok() || first.starts_with("unix:") || first.starts_with('[') {
            return as_addr.map(BackendEntry::Addr);
        }
        let (host, port) = first.rsplit_once(':').ok_or_else(|| {
            format!(
                "invalid backend {first:?}: expected IP:PORT, NAME:PORT (e.g. \"app.internal:9001\") or \"unix:/path\""
            )
        })?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("invalid backend {first:?}: the port must be a number from 1 to 65535"))?;
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        valid_host(&host).map_err(|why| format!("invalid backend {first:?}: {why}"))?;
        // The weight is checked by the same code as for an address.
        let weight = BackendSpec::parse(&s.replacen(first, "127.0.0.1:1", 1))?.weight;
        Ok(BackendEntry::Name(NamedBackend { host, port, weight, file: PathBuf::new(), line: 0 }))
    }
}

/// A DNS host name: labels of letters, digits, `-` and `_`, at most 63
/// bytes each and 253 in all; the last label not all digits (that would
/// be a mistyped IP address).
fn valid_host(host: &str) -> Result<(), String> {
    if host.is_empty() || host.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label of a host name has 1 to 63 characters".into());
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err("a host name has only letters, digits, '-', '_' and dots".into());
        }
    }
    if host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err("not an IP address, and a host name does not end in a number".into());
    }
    Ok(())
}

/// As an entry of `backends` (`"ADDR weight=N"`), which `Deserialize`
/// reads back to the same entry.
impl serde::Serialize for BackendEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BackendEntry::Addr(b) => s.collect_str(&format_args!("{} weight={}", b.addr, b.weight)),
            BackendEntry::Name(n) => s.collect_str(&format_args!("{}:{} weight={}", n.host, n.port, n.weight)),
        }
    }
}

impl<'de> Deserialize<'de> for BackendEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BackendEntry::parse(&s).map_err(de::Error::custom)
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
        for bad in ["app", "app:0", "app:x", "a..b:80", "a b:80", "1.2.3.999:80", "app:80 weight=0", "[::1]80"] {
            assert!(BackendEntry::parse(bad).is_err(), "{bad}");
        }
        assert!(BackendSpec::parse("127.0.0.1:80 weight=0").is_err());
        assert!(BackendSpec::parse("127.0.0.1:80 weight=x").is_err());
        assert!(BackendSpec::parse("127.0.0.1:80 max_fails=3").is_err());
        assert!(BackendSpec::parse("unix:").is_err());
    }

    #[test]
    fn parses_names() {
        match BackendEntry::parse("App.Internal.:9001 weight=2").unwrap() {
            BackendEntry::Name(n) => {
                assert_eq!((n.host.as_str(), n.port, n.weight), ("app.internal", 9001, 2));
                assert_eq!(n.key(), "app.internal:9001");
            }
            other @ BackendEntry::Addr(_) => panic!("{other:?}"),
        }
        assert!(matches!(BackendEntry::parse("127.0.0.1:80").unwrap(), BackendEntry::Addr(_)));
        assert!(matches!(BackendEntry::parse("unix:/a").unwrap(), BackendEntry::Addr(_)));
    }
}
