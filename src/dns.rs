//! Looking up backend names: the system resolver (`getaddrinfo` through
//! std), or a small DNS client over UDP (A records) when a `resolver` is
//! configured. Every lookup is bounded by a timeout.
//!
//! Blocking: called by the master's resolver thread and at load time
//! (`-t`, start, reload), never on a worker's or the master's loop.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::{Config, ResolvedName};

/// Longest a lookup may take (load time and each periodic lookup).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a name gave no answer. A name that does not exist, or has no
/// address, is an answer (an empty list), not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// No answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The socket failed.
    #[error("{0}")]
    Io(String),
    /// The server answered with an error code (2 SERVFAIL, 5 REFUSED, ...).
    #[error("the DNS server answered with error code {0}")]
    Server(u8),
    /// The answer could not be read.
    #[error("malformed DNS answer")]
    Malformed,
    /// The system resolver failed.
    #[error("{0}")]
    System(String),
}

/// The addresses of `host` (sorted, without duplicates): asked of
/// `server` over UDP when given, else of the system resolver.
pub fn lookup(host: &str, server: Option<SocketAddr>, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let mut addrs = match server {
        Some(s) => lookup_udp(host, s, timeout)?,
        None => lookup_system(host, timeout)?,
    };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// `getaddrinfo` in a thread of its own, so that the caller waits at most
/// `timeout` (the thread finishes on its own when the system gives up).
fn lookup_system(host: &str, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    std::thread::Builder::new()
        .name("pitcher-dns".into())
        .spawn(move || {
            let r = (name.as_str(), 0).to_socket_addrs().map(|it| it.map(|a| a.ip()).collect::<Vec<_>>());
            let _ = tx.send(r);
        })
        .map_err(|e| DnsError::Io(e.to_string()))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => Ok(v),
        // getaddrinfo's EAI_NONAME / EAI_NODATA are answers: no address.
        Ok(Err(e)) if ["not known", "No address associated"].iter().any(|m| e.to_string().contains(m)) => {
            Ok(Vec::new())
        }
        Ok(Err(e)) => Err(DnsError::System(e.to_string())),
        Err(_) => Err(DnsError::Timeout(timeout.as_millis() as u64)),
    }
}

/// One A query to `server`, sent twice (at the start and half-way) in
/// case a datagram is lost; answers with another id are ignored.
fn lookup_udp(host: &str, server: SocketAddr, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let io = |e: std::io::Error| DnsError::Io(e.to_string());
    let bind: SocketAddr =
        if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| DnsError::Malformed)?;
    let sock = UdpSocket::bind(bind).map_err(io)?;
    sock.connect(server).map_err(io)?;
    let id = query_id();
    let query = encode_query(id, host).ok_or(DnsError::Malformed)?;
    let start = Instant::now();
    let deadline = start + timeout;
    let mut sent = 0;
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(DnsError::Timeout(timeout.as_millis() as u64));
        }
        if sent == 0 || (sent == 1 && now >= start + timeout / 2) {
            sock.send(&query).map_err(io)?;
            sent += 1;
        }
        let wait = if sent == 1 { (start + timeout / 2).min(deadline) } else { deadline };
        let wait = wait.saturating_duration_since(now).max(Duration::from_millis(1));
        sock.set_read_timeout(Some(wait)).map_err(io)?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                if let Some(answer) = decode_answer(id, &buf[..n]) {
                    return answer;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // ECONNREFUSED from an earlier send: nothing listens there.
            Err(e) => return Err(io(e)),
        }
    }
}

/// A query id that differs from one query to the next.
fn query_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (t as u16) ^ ((t >> 16) as u16) ^ NEXT.fetch_add(0x9e37, Relaxed)
}

/// A recursive query for the A records of `host` (RFC 1035 §4.1). `None`
/// when the name cannot be encoded.
pub fn encode_query(id: u16, host: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + host.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // type A, class IN
    Some(q)
}

/// The A records of an answer to query `id`; `None` when the datagram is
/// not that answer (another id, not a response). NXDOMAIN is an empty list.
pub fn decode_answer(id: u16, m: &[u8]) -> Option<Result<Vec<IpAddr>, DnsError>> {
    if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != id || m[2] & 0x80 == 0 {
        return None;
    }
    let rcode = m[3] & 0x0f;
    if rcode == 3 {
        return Some(Ok(Vec::new()));
    }
    if rcode != 0 {
        return Some(Err(DnsError::Server(rcode)));
    }
    Some(read_records(m).ok_or(DnsError::Malformed))
}

fn read_records(m: &[u8]) -> Option<Vec<IpAddr>> {
    let count = |i: usize| u16::from_be_bytes([m[i], m[i + 1]]) as usize;
    let (qd, an) = (count(4), count(6));
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(m, at)?;
        let rr = m.get(at..at + 10)?;
        let (rtype, class, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[2], rr[3]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        let data = m.get(at + 10..at + 10 + len)?;
        if rtype == 1 && class == 1 && len == 4 {
            out.push(IpAddr::from([data[0], data[1], data[2], data[3]]));
        }
        at += 10 + len;
    }
    Some(out)
}

/// The offset after a (possibly compressed) name at `at`.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return (at + 2 <= m.len()).then_some(at + 2),
            l if l < 64 => at += 1 + l,
            _ => return None,
        }
    }
}

/// A backend name that gave no address at load.
#[derive(Debug, Clone)]
pub struct Unresolved {
    /// Its cluster.
    pub cluster: String,
    /// `host:port`.
    pub name: String,
    /// The file and line of its `backends` entry.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Its cluster says `resolve = "required"`.
    pub required: bool,
    /// What happened.
    pub reason: String,
}

impl Unresolved {
    /// The refusal of a `resolve = "required"` name, at its file and line.
    pub fn to_config_error(&self) -> crate::config::ConfigError {
        crate::config::ConfigError {
            file: self.file.clone(),
            line_col: Some((self.line, 1)),
            reason: format!(
                "backend name {} of cluster {:?} does not resolve: {} (resolve = \"required\")",
                self.name, self.cluster, self.reason
            ),
        }
    }
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: backend name {} of cluster {:?} does not resolve: {}",
            self.file.display(),
            self.line,
            self.name,
            self.cluster,
            self.reason
        )
    }
}

/// Resolves every backend name of `config` (each in a thread of its own,
/// all within `timeout`), except those `known` already has addresses for
/// (a reload does not wait for names it knows; one with no address is
/// asked again, so that `resolve = "required"` is checked).
/// Returns the answers (known ones included) and the names with no address.
pub fn resolve_config(
    config: &Config,
    known: &[ResolvedName],
    timeout: Duration,
) -> (Vec<ResolvedName>, Vec<Unresolved>) {
    let (tx, rx) = mpsc::channel();
    let mut out = Vec::new();
    let mut asked = Vec::new();
    let mut not_started = Vec::new();
    for c in &config.clusters {
        for n in &c.dns.names {
            let key = n.key();
            if let Some(k) = known.iter().find(|k| k.cluster == c.name && k.name == key && !k.addrs.is_empty()) {
                out.push(k.clone());
                continue;
            }
            let (tx, host, server, i) = (tx.clone(), n.host.clone(), c.dns.resolver, asked.len());
            asked.push((c, n));
            let spawned = std::thread::Builder::new().name("pitcher-dns".into()).spawn(move || {
                let _ = tx.send((i, lookup(&host, server, timeout)));
            });
            if let Err(e) = spawned {
                not_started.push((i, DnsError::Io(e.to_string())));
            }
        }
    }
    drop(tx);
    let mut answers: Vec<Option<Result<Vec<IpAddr>, DnsError>>> = vec![None; asked.len()];
    for (i, e) in not_started {
        answers[i] = Some(Err(e));
    }
    let deadline = Instant::now() + timeout + Duration::from_millis(100);
    while answers.iter().any(Option::is_none) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, r)) => answers[i] = Some(r),
            Err(_) => break,
        }
    }
    let mut unresolved = Vec::new();
    for ((c, n), a) in asked.into_iter().zip(answers) {
        let a = a.unwrap_or(Err(DnsError::Timeout(timeout.as_millis() as u64)));
        let problem = match &a {
            Ok(v) if v.is_empty() => Some("no address (A record) for it".to_string()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = problem {
            unresolved.push(Unresolved {
                cluster: c.name.clone(),
                name: n.key(),
                file: n.file.clone(),
                line: n.line,
                required: c.dns.required,
                reason,
            });
        }
        out.push(ResolvedName { cluster: c.name.clone(), name: n.key(), addrs: a.unwrap_or_default() });
    }
    (out, unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `q` with these A records (the name compressed).
    fn answer(q: &[u8], rcode: u8, ips: &[[u8; 4]]) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] = 0x81;
        m[3] = 0x80 | rcode;
        m[7] = ips.len() as u8;
        for ip in ips {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            m.extend_from_slice(ip);
        }
        m
    }

    #[test]
    fn encodes_and_decodes() {
        let q = encode_query(7, "app.internal").unwrap();
        assert_eq!(&q[12..], b"\x03app\x08internal\x00\x00\x01\x00\x01");
        let a = answer(&q, 0, &[[127, 0, 0, 2], [127, 0, 0, 3]]);
        let ips = decode_answer(7, &a).unwrap().unwrap();
        assert_eq!(ips, vec![IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3])]);
        assert!(decode_answer(8, &a).is_none(), "another id");
        assert!(decode_answer(7, &q).is_none(), "a query, not a response");
        assert_eq!(decode_answer(7, &answer(&q, 3, &[])), Some(Ok(vec![])));
        assert_eq!(decode_answer(7, &answer(&q, 2, &[])), Some(Err(DnsError::Server(2))));
        let cut = &a[..a.len() - 2];
        assert_eq!(decode_answer(7, cut), Some(Err(DnsError::Malformed)));
        assert!(encode_query(1, "a..b").is_none());
    }

    #[test]
    fn the_system_resolver_reads_etc_hosts() {
        let ips = lookup("localhost", None, LOOKUP_TIMEOUT).unwrap();
        assert!(ips.contains(&IpAddr::from([127, 0, 0, 1])), "{ips:?}");
        assert_eq!(lookup("no-such-name.invalid", None, LOOKUP_TIMEOUT).map(|v| v.len()).unwrap_or(0), 0);
    }

    #[test]
    fn udp_lookup_times_out_without_a_server() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = lookup("app.internal", Some(silent.local_addr().unwrap()), Duration::from_millis(200));
        assert_eq!(r, Err(DnsError::Timeout(200)));
    }
}
