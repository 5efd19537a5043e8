//! Backends given by DNS name, as configuration: the settings of a
//! cluster's names (`resolve`, `resolve_interval_ms`, `resolver`), the
//! addresses the master found for them, and the configuration with those
//! addresses put in. Pure: nothing here resolves a name (see `crate::dns`).

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use super::spanned::Spanned;

use super::{BackendAddr, BackendSpec, Config, NamedBackend, SockAddr};

/// The backend names of a cluster and how the master resolves them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterDns {
    /// `name:PORT` entries of `backends`, in file order.
    pub names: Vec<NamedBackend>,
    /// Time between two resolutions of each name.
    pub interval: Duration,
    /// `resolve = "required"`: a name that does not resolve at load fails
    /// the load (`-t`, start, reload); otherwise it is a warning.
    pub required: bool,
    /// DNS server asked over UDP (`None`: the system resolver).
    pub resolver: Option<SocketAddr>,
}

/// The addresses a backend name of a cluster resolved to, as the master
/// sends them to its workers with the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedName {
    /// The cluster's name.
    pub cluster: String,
    /// The name as written, `host:port` ([`NamedBackend::key`]).
    pub name: String,
    /// The addresses found (sorted, no duplicates); empty: none.
    pub addrs: Vec<IpAddr>,
}

/// Default time between two resolutions of a backend name.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

impl Config {
    /// This configuration with the addresses its backend names resolved
    /// to added to their clusters' `backends` (each with its name's
    /// weight). An address a cluster already has (listed, or found for an
    /// earlier name) is not added twice. Names without an entry in
    /// `resolved` add nothing.
    pub fn with_resolved(&self, resolved: &[ResolvedName]) -> Config {
        self.clone().into_resolved(resolved)
    }

    /// [`Config::with_resolved`] without the copy (a worker keeps only
    /// the configuration with the addresses in: copying ten thousand
    /// routes to drop them at once is a good part of a reload).
    pub fn into_resolved(mut self, resolved: &[ResolvedName]) -> Config {
        self.add_resolved(resolved);
        self
    }

    /// Whether any cluster names a backend by DNS name (without one,
    /// [`Config::with_resolved`] changes nothing).
    pub fn has_backend_names(&self) -> bool {
        self.clusters.iter().any(|c| !c.dns.names.is_empty())
    }

    fn add_resolved(&mut self, resolved: &[ResolvedName]) {
        if resolved.is_empty() {
            return;
        }
        for c in &mut self.clusters {
            for n in &c.dns.names {
                let key = n.key();
                let Some(r) = resolved.iter().find(|r| r.cluster == c.name && r.name == key) else { continue };
                for ip in &r.addrs {
                    let addr = BackendAddr(SockAddr::Tcp(SocketAddr::new(*ip, n.port)));
                    if !c.backends.iter().any(|b| b.addr == addr) {
                        c.backends.push(BackendSpec { addr, weight: n.weight });
                    }
                }
            }
        }
    }
}

/// The names of a cluster and how they are resolved, from the file's keys
/// (`resolver`: the cluster's or the top level's). An error without a
/// span is the cluster's.
pub(super) fn cluster_dns(
    cluster: &str,
    names: Vec<NamedBackend>,
    resolve: Option<&Spanned<String>>,
    resolve_interval_ms: Option<u64>,
    resolver: Option<&Spanned<String>>,
) -> Result<ClusterDns, (Option<Range<usize>>, String)> {
    let required = match resolve {
        None => false,
        Some(r) => match r.get_ref().as_str() {
            "optional" => false,
            "required" => true,
            other => {
                return Err((Some(r.span()), format!("resolve = {other:?}: expected \"optional\" or \"required\"")))
            }
        },
    };
    let resolver = match resolver {
        None => None,
        Some(r) => Some(parse_resolver(r.get_ref()).map_err(|e| (Some(r.span()), e))?),
    };
    let interval = Duration::from_millis(resolve_interval_ms.unwrap_or(DEFAULT_RESOLVE_INTERVAL.as_millis() as u64));
    if interval < Duration::from_millis(100) {
        return Err((None, format!("cluster {cluster:?}: resolve_interval_ms must be at least 100")));
    }
    Ok(ClusterDns { names, interval, required, resolver })
}

/// `resolver = "IP"` or `"IP:PORT"` (port 53 by default).
fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("resolver = {s:?}: expected IP or IP:PORT of a DNS server (e.g. \"127.0.0.1:53\")"))
}
