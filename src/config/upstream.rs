//! The resilience settings of a cluster: balancing, active health checks,
//! passive failure detection, slow start and retries. File structs and
//! their resolved forms; parsing and validation only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::spanned::Spanned;
use serde::Deserialize;

/// How a cluster spreads requests over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active connections (all workers together) per unit of weight.
    LeastConn,
    /// Consistent hashing on `hash_key`.
    Hash,
    /// Power of two random choices, the less loaded per unit of weight.
    P2c,
}

/// What a `hash` cluster hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// The request path.
    Path,
    /// A request header (lower-case name).
    Header(String),
}

/// Active health check: one HTTP probe per backend per interval, done by
/// the master for every worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path of the probe request.
    pub path: String,
    /// Time between two probes of a backend.
    pub interval: Duration,
    /// Longest a probe may take.
    pub timeout: Duration,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Statuses that count as healthy: `status_min..=status_max`.
    pub status_min: u16,
    /// Highest healthy status (see `status_min`).
    pub status_max: u16,
}

/// Passive failure detection from real traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive {
    /// Count window: eject after this many failures in a row (0 = off).
    pub consecutive_failures: u32,
    /// Time window: within `window`, with at least `window_min_requests`,
    /// eject when failures reach `window_failure_percent` (0 = off).
    pub window: Duration,
    /// Requests a window needs before its failure ratio counts.
    pub window_min_requests: u32,
    /// Failure ratio of a window, in percent, that ejects the backend.
    pub window_failure_percent: u32,
    /// First ejection lasts `ejection`; each repeat doubles it, up to `max_ejection`.
    pub ejection: Duration,
    /// Longest ejection (each ejection doubles the last one up to this).
    pub max_ejection: Duration,
    /// Never eject more than this share of a cluster at once.
    pub max_ejected_percent: u32,
    /// A failed connection counts as a failure.
    pub on_connect_error: bool,
    /// A timeout counts as a failure.
    pub on_timeout: bool,
    /// A 5xx response counts as a failure.
    pub on_5xx: bool,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            consecutive_failures: 5,
            window: Duration::from_secs(10),
            window_min_requests: 20,
            window_failure_percent: 50,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            on_connect_error: true,
            on_timeout: true,
            on_5xx: false,
        }
    }
}

/// TLS to a cluster's backends (nginx's `proxy_pass https://` with
/// `proxy_ssl_verify`, `proxy_ssl_name` + `proxy_ssl_server_name`,
/// `proxy_ssl_trusted_certificate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// Check the backend's certificate (chain to a trusted root, name,
    /// validity). `false` accepts any certificate (`-t` warns).
    pub verify: bool,
    /// The name sent in SNI and checked against the certificate; `None`:
    /// the backend's IP address is checked (no SNI is sent for an address).
    pub sni: Option<String>,
    /// PEM file of the CAs to trust (read by the master only); `None`: the
    /// public roots compiled in (Mozilla's, `webpki-roots`).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackendTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealthCheck {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fall: Option<u32>,
    /// Expected status: a number (200) or a class ("2xx", "3xx").
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<toml::Value>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePassive {
    #[serde(skip_serializing_if = "Option::is_none")]
    consecutive_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_min_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_failure_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ejection_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ejection_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ejected_percent: Option<u32>,
    /// Any of "connect", "timeout", "5xx".
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_on: Option<Vec<String>>,
}

type R<T> = Result<T, String>;

/// A cluster's `tls` table; a relative `ca_file` is taken from `dir` (the
/// main configuration file's directory).
pub(super) fn backend_tls(f: &FileBackendTls, dir: &Path) -> R<BackendTls> {
    if let Some(n) = &f.sni {
        // A DNS name (RFC 1123 labels); an address is checked without it.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if n.len() > 253 || !n.split('.').all(label_ok) || n.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!("tls.sni = {n:?}: expected a DNS name (an IP address is checked without sni)"));
        }
    }
    if f.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err("tls.ca_file is empty".into());
    }
    Ok(BackendTls {
        verify: f.verify.unwrap_or(true),
        sni: f.sni.as_ref().map(|n| n.to_ascii_lowercase()),
        ca_file: f.ca_file.as_ref().map(|p| dir.join(p)),
    })
}

pub(super) fn balance(s: Option<&Spanned<String>>) -> Result<Balance, (std::ops::Range<usize>, String)> {
    let Some(s) = s else { return Ok(Balance::RoundRobin) };
    match s.get_ref().as_str() {
        "round_robin" => Ok(Balance::RoundRobin),
        "least_conn" => Ok(Balance::LeastConn),
        "hash" => Ok(Balance::Hash),
        "p2c" => Ok(Balance::P2c),
        other => Err((s.span(), format!("lb = {other:?}: expected round_robin, least_conn, hash or p2c"))),
    }
}

pub(super) fn hash_key(s: Option<&Spanned<String>>) -> Result<HashKey, (std::ops::Range<usize>, String)> {
    let Some(s) = s else { return Ok(HashKey::ClientIp) };
    match s.get_ref().as_str() {
        "client_ip" => Ok(HashKey::ClientIp),
        "path" => Ok(HashKey::Path),
        h if h.starts_with("header:") && h.len() > 7 => Ok(HashKey::Header(h[7..].to_ascii_lowercase())),
        other => Err((s.span(), format!("hash_key = {other:?}: expected client_ip, path or header:NAME"))),
    }
}

pub(super) fn health_check(f: &FileHealthCheck) -> R<HealthCheck> {
    let (status_min, status_max) = match &f.status {
        None => (200, 399),
        Some(toml::Value::Integer(n)) if (100..=599).contains(n) => (*n as u16, *n as u16),
        Some(toml::Value::String(s))
            if s.len() == 3 && s.ends_with("xx") && (b'1'..=b'5').contains(&s.as_bytes()[0]) =>
        {
            let c = (s.as_bytes()[0] - b'0') as u16 * 100;
            (c, c + 99)
        }
        Some(other) => {
            return Err(format!("health_check status = {other}: expected a status (200) or a class (\"2xx\")"))
        }
    };
    let path = f.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("health_check path {path:?} must start with '/' and contain no spaces or controls"));
    }
    let hc = HealthCheck {
        path,
        interval: Duration::from_millis(f.interval_ms.unwrap_or(1000)),
        timeout: Duration::from_millis(f.timeout_ms.unwrap_or(500)),
        rise: f.rise.unwrap_or(2),
        fall: f.fall.unwrap_or(2),
        status_min,
        status_max,
    };
    if hc.interval < Duration::from_millis(10) || hc.timeout.is_zero() || hc.rise == 0 || hc.fall == 0 {
        return Err("health_check: interval_ms >= 10, timeout_ms > 0, rise and fall >= 1".into());
    }
    Ok(hc)
}

pub(super) fn passive(f: Option<&FilePassive>) -> R<Passive> {
    let d = Passive::default();
    let Some(f) = f else { return Ok(d) };
    let mut p = Passive {
        consecutive_failures: f.consecutive_failures.unwrap_or(d.consecutive_failures),
        window: f.window_ms.map(Duration::from_millis).unwrap_or(d.window),
        window_min_requests: f.window_min_requests.unwrap_or(d.window_min_requests),
        window_failure_percent: f.window_failure_percent.unwrap_or(d.window_failure_percent),
        ejection: f.ejection_ms.map(Duration::from_millis).unwrap_or(d.ejection),
        max_ejection: f.max_ejection_ms.map(Duration::from_millis).unwrap_or(d.max_ejection),
        max_ejected_percent: f.max_ejected_percent.unwrap_or(d.max_ejected_percent),
        ..d
    };
    if let Some(on) = &f.failure_on {
        p.on_connect_error = false;
        p.on_timeout = false;
        p.on_5xx = false;
        for k in on {
            match k.as_str() {
                "connect" => p.on_connect_error = true,
                "timeout" => p.on_timeout = true,
                "5xx" => p.on_5xx = true,
                other => return Err(format!("passive.failure_on {other:?}: expected connect, timeout or 5xx")),
            }
        }
    }
    if p.window_failure_percent > 100 || p.max_ejected_percent > 100 {
        return Err("passive: percentages are 0 to 100".into());
    }
    if p.max_ejection < p.ejection {
        return Err("passive: max_ejection_ms must be at least ejection_ms".into());
    }
    if p.window.is_zero() {
        return Err("passive: window_ms must be greater than 0".into());
    }
    Ok(p)
}
