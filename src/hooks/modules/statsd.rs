//! `statsd`: pushes request figures to a statsd server over UDP, for sites
//! that collect by push rather than by scraping `/metrics`.
//!
//! At REQUEST_FINISH a request adds to counters kept in this worker (by
//! cluster: requests per status class, body bytes sent) and writes its
//! timers (`request_time`, and `upstream_time` when a backend answered)
//! into the datagram being filled. A datagram goes out when the next line
//! would not fit in `max_packet_bytes`, and at each flush (every
//! `flush_interval_ms`, from the module tick), which first writes the
//! counters gathered since the last one. Lines are newline-separated, in the
//! statsd text format (`pitcher.requests.app.2xx:17|c`,
//! `pitcher.request_time.app:12.345|ms`).
//!
//! The socket is a connected, non-blocking UDP socket of this worker: a
//! datagram that cannot be sent at once (`EAGAIN`, `ECONNREFUSED` when no
//! server listens, ...) is dropped, counted in the worker's shared figures
//! (`statsd_dropped`, next to `statsd_sent`) and logged at most once a
//! second. Nothing here allocates per request: the metric names are built
//! once per configuration (cluster names sanitized, `[^A-Za-z0-9_-]` → `_`)
//! and the datagram buffer is reused.
//!
//! Must not: block, resolve names (the address is an IP and a port), or
//! take a label from a request.
//!
//! ```toml
//! [modules.statsd]
//! address = "127.0.0.1:8125"
//! prefix = "pitcher"
//! flush_interval_ms = 1000
//! max_packet_bytes = 1432
//! ```

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use slog::Logger;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Ctx, Finished, Module, Point, SettingsError};
use crate::shm::metrics::{self, STATUS_CLASSES};

/// Shortest `flush_interval_ms` (the module tick comes about every 100 ms).
pub const MIN_FLUSH_INTERVAL_MS: u64 = 100;
/// Longest `flush_interval_ms` (a minute).
pub const MAX_FLUSH_INTERVAL_MS: u64 = 60_000;
/// Smallest `max_packet_bytes`.
pub const MIN_PACKET_BYTES: u64 = 64;
/// Largest `max_packet_bytes`: the largest UDP payload over IPv4.
pub const MAX_PACKET_BYTES: u64 = 65_507;
/// Room a line needs besides its name: `5xx:`, a 20-digit value with a
/// fraction, `|ms`.
const VALUE_ROOM: usize = 32;
/// The name standing for "no cluster" (answered before a cluster was
/// chosen: no route, a module's answer).
const NO_CLUSTER: &str = "_none";
/// The status classes' names, 1xx first.
const CLASSES: [&str; STATUS_CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Least time between two "dropped" log lines.
const WARN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The statsd server: `IP:PORT` (no host name: a worker never resolves).
    address: String,
    /// Put before every metric name, with a dot; empty: none.
    #[serde(default = "default_prefix")]
    prefix: String,
    /// Counters are sent (and the datagram being filled) this often.
    #[serde(default = "default_flush_interval_ms")]
    flush_interval_ms: u64,
    /// Largest datagram sent (payload bytes); 1432 fits an Ethernet MTU.
    #[serde(default = "default_max_packet_bytes")]
    max_packet_bytes: u64,
}

fn default_prefix() -> String {
    "pitcher".into()
}
fn default_flush_interval_ms() -> u64 {
    1000
}
fn default_max_packet_bytes() -> u64 {
    1432
}

/// `[^A-Za-z0-9_-]` → `_`: a name that is one statsd path segment.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// The metric names of one cluster, up to the value (built once per
/// configuration).
#[derive(Debug)]
struct Names {
    /// `PREFIX.requests.CLUSTER.` (the class follows).
    requests: String,
    /// `PREFIX.bytes_sent.CLUSTER:`.
    bytes_sent: String,
    /// `PREFIX.request_time.CLUSTER:`.
    request_time: String,
    /// `PREFIX.upstream_time.CLUSTER:`.
    upstream_time: String,
}

impl Names {
    fn new(prefix: &str, cluster: &str) -> Names {
        let stem = |what: &str, end: char| {
            let c = sanitize(cluster);
            if prefix.is_empty() {
                format!("{what}.{c}{end}")
            } else {
                format!("{prefix}.{what}.{c}{end}")
            }
        };
        Names {
            requests: stem("requests", '.'),
            bytes_sent: stem("bytes_sent", ':'),
            request_time: stem("request_time", ':'),
            upstream_time: stem("upstream_time", ':'),
        }
    }

    fn longest(&self) -> usize {
        [&self.requests, &self.bytes_sent, &self.request_time, &self.upstream_time]
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
    }
}

/// A cluster's counters since the last flush.
#[derive(Debug, Default, Clone)]
struct Counts {
    requests: [u64; STATUS_CLASSES],
    bytes_sent: u64,
}

/// What the worker's loop changes; only that thread touches it, so the
/// lock is never contended.
struct State {
    /// Per cluster (index in `config.clusters`), then "no cluster" last.
    counts: Vec<Counts>,
    /// The datagram being filled (capacity `max_packet`).
    packet: Vec<u8>,
    /// One line being formatted (capacity `max_packet`).
    line: Vec<u8>,
    last_flush: Instant,
    /// When "dropped" was last logged, and drops since.
    warned: Option<Instant>,
    unreported: u64,
}

struct Statsd {
    address: SocketAddr,
    /// `None` when only checking the settings.
    socket: Option<UdpSocket>,
    /// Per cluster, then "no cluster" last.
    names: Vec<Names>,
    interval: Duration,
    max_packet: usize,
    log: Logger,
    state: Mutex<State>,
}

/// The validated settings: the address and the names of every cluster.
fn parse(s: &Settings, clusters: &[&str]) -> Result<(SocketAddr, Vec<Names>), SettingsError> {
    let address: SocketAddr =
        s.address.parse().map_err(|_| format!("address = {:?}: expected IP:PORT (no host name)", s.address))?;
    if address.port() == 0 {
        return Err("address needs a port other than 0".into());
    }
    let p = &s.prefix;
    if !p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        || p.starts_with('.')
        || p.ends_with('.')
        || p.contains("..")
    {
        return Err(format!(
            "prefix = {p:?}: letters, digits, '_', '-' and '.' between segments only (or empty for none)"
        )
        .into());
    }
    if s.flush_interval_ms < MIN_FLUSH_INTERVAL_MS {
        return Err(format!("flush_interval_ms must be at least {MIN_FLUSH_INTERVAL_MS}").into());
    }
    super::at_most("flush_interval_ms", s.flush_interval_ms, MAX_FLUSH_INTERVAL_MS)?;
    if s.max_packet_bytes < MIN_PACKET_BYTES {
        return Err(format!("max_packet_bytes must be at least {MIN_PACKET_BYTES}").into());
    }
    super::at_most("max_packet_bytes", s.max_packet_bytes, MAX_PACKET_BYTES)?;
    let names: Vec<Names> = clusters.iter().chain([&NO_CLUSTER]).map(|c| Names::new(p, c)).collect();
    let longest = names.iter().map(Names::longest).max().unwrap_or(0) + VALUE_ROOM;
    if longest as u64 > s.max_packet_bytes {
        return Err(format!(
            "max_packet_bytes = {} cannot hold a line of {longest} bytes (the prefix and the longest cluster name)",
            s.max_packet_bytes
        )
        .into());
    }
    Ok((address, names))
}

/// Builds the statsd module from its `[modules.statsd]` table.
pub fn build(c: &ModuleConfig, b: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let s: Settings = super::settings(&c.settings)?;
    let clusters: Vec<&str> = b.config.clusters.iter().map(|c| c.name.as_str()).collect();
    let (address, names) = parse(&s, &clusters)?;
    let max_packet = s.max_packet_bytes as usize;
    let socket = if b.check_only {
        None
    } else {
        Some(open(address).map_err(|source| SettingsError::Start { what: "statsd socket", source })?)
    };
    let state = State {
        counts: vec![Counts::default(); names.len()],
        packet: Vec::with_capacity(max_packet),
        line: Vec::with_capacity(max_packet),
        last_flush: Instant::now(),
        warned: None,
        unreported: 0,
    };
    Ok(Arc::new(Statsd {
        address,
        socket,
        names,
        interval: Duration::from_millis(s.flush_interval_ms),
        max_packet,
        log: b.log.clone(),
        state: Mutex::new(state),
    }))
}

/// A non-blocking UDP socket connected to `to` (so the kernel reports a
/// server that is not there as `ECONNREFUSED` on a later send).
fn open(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(any)?;
    socket.set_nonblocking(true)?;
    socket.connect(to)?;
    Ok(socket)
}

/// Writes `micros` as milliseconds with three decimals.
fn write_ms(out: &mut Vec<u8>, micros: u128) {
    let _ = write!(out, "{}.{:03}|ms", micros / 1000, micros % 1000);
}

impl Statsd {
    /// Sends the datagram being filled, if any, and empties it.
    fn send(&self, st: &mut State) {
        if st.packet.is_empty() {
            return;
        }
        let result = match &self.socket {
            Some(s) => s.send(&st.packet),
            None => Ok(st.packet.len()),
        };
        st.packet.clear();
        let here = metrics::here();
        match result {
            Ok(_) => metrics::add(&here.statsd_sent, 1),
            Err(e) => {
                metrics::add(&here.statsd_dropped, 1);
                st.unreported += 1;
                let now = Instant::now();
                if st.warned.is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY) {
                    slog::warn!(self.log, "statsd datagrams dropped"; "dropped" => st.unreported,
                        "address" => %self.address, "error" => %e);
                    st.warned = Some(now);
                    st.unreported = 0;
                }
            }
        }
    }

    /// Appends the line in `st.line` to the datagram, sending the datagram
    /// first when the line would not fit.
    fn push_line(&self, st: &mut State) {
        let sep = usize::from(!st.packet.is_empty());
        if st.packet.len() + sep + st.line.len() > self.max_packet {
            self.send(st);
        }
        if !st.packet.is_empty() {
            st.packet.push(b'\n');
        }
        let State { packet, line, .. } = st;
        packet.extend_from_slice(line);
    }

    /// Writes the counters gathered since the last flush (and zeroes them),
    /// then sends what is left.
    fn flush(&self, st: &mut State, now: Instant) {
        for i in 0..st.counts.len() {
            let names = &self.names[i];
            let c = std::mem::take(&mut st.counts[i]);
            for (class, &n) in c.requests.iter().enumerate() {
                if n > 0 {
                    st.line.clear();
                    let _ = write!(st.line, "{}{}:{n}|c", names.requests, CLASSES[class]);
                    self.push_line(st);
                }
            }
            if c.bytes_sent > 0 {
                st.line.clear();
                let _ = write!(st.line, "{}{}|c", names.bytes_sent, c.bytes_sent);
                self.push_line(st);
            }
        }
        self.send(st);
        st.last_flush = now;
    }
}

impl Drop for Statsd {
    /// A reload replaces the module: what it gathered still goes out.
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            self.flush(&mut st, Instant::now());
        }
    }
}

impl Module for Statsd {
    fn points(&self) -> &'static [Point] {
        &[Point::RequestFinish]
    }

    fn request_finish(&self, d: &Finished<'_>, ctx: &mut Ctx<'_>) {
        let Ok(mut guard) = self.state.lock() else { return };
        let st = &mut *guard;
        let i = ctx.cluster.filter(|&c| c < self.names.len() - 1).unwrap_or(self.names.len() - 1);
        let class = (usize::from(d.status) / 100).clamp(1, STATUS_CLASSES) - 1;
        if let Some(c) = st.counts.get_mut(i) {
            c.requests[class] += 1;
            c.bytes_sent += d.bytes;
        }
        let names = &self.names[i];
        st.line.clear();
        st.line.extend_from_slice(names.request_time.as_bytes());
        write_ms(&mut st.line, d.duration.as_micros());
        self.push_line(st);
        if let Some(u) = d.upstream_time {
            st.line.clear();
            st.line.extend_from_slice(names.upstream_time.as_bytes());
            write_ms(&mut st.line, u.as_micros());
            self.push_line(st);
        }
    }

    fn tick(&self) {
        let now = Instant::now();
        let Ok(mut st) = self.state.lock() else { return };
        if now.saturating_duration_since(st.last_flush) >= self.interval {
            self.flush(&mut st, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(t: &str) -> Result<(SocketAddr, Vec<Names>), SettingsError> {
        let table: toml::Table = toml::from_str(t).map_err(|e| SettingsError::from(e.to_string()))?;
        let s: Settings = crate::hooks::modules::settings(&table)?;
        parse(&s, &["app", "web.v2/blue"])
    }

    #[test]
    fn settings_are_validated() {
        let (a, names) = settings("address = \"127.0.0.1:8125\"").unwrap();
        assert_eq!(a, "127.0.0.1:8125".parse().unwrap());
        assert_eq!(names.len(), 3, "two clusters and no cluster");
        assert!(settings("address = \"[::1]:8125\"\nprefix = \"\"\nflush_interval_ms = 100").is_ok());
        assert!(settings("address = \"127.0.0.1:8125\"\nprefix = \"edge.eu-1\"\nmax_packet_bytes = 65507").is_ok());
        for bad in [
            "prefix = \"p\"",
            "address = \"statsd.local:8125\"",
            "address = \"127.0.0.1:0\"",
            "address = \"127.0.0.1:8125\"\nprefix = \"a:b\"",
            "address = \"127.0.0.1:8125\"\nprefix = \"a.\"",
            "address = \"127.0.0.1:8125\"\nprefix = \"a..b\"",
            "address = \"127.0.0.1:8125\"\nflush_interval_ms = 10",
            "address = \"127.0.0.1:8125\"\nflush_interval_ms = 600000",
            "address = \"127.0.0.1:8125\"\nmax_packet_bytes = 10",
            "address = \"127.0.0.1:8125\"\nmax_packet_bytes = 70000",
            "address = \"127.0.0.1:8125\"\nmax_packet_bytes = 64\nprefix = \"a-very-long-prefix-for-every-metric\"",
            "address = \"127.0.0.1:8125\"\nunknown = 1",
        ] {
            assert!(settings(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cluster_names_are_sanitized_once() {
        let (_, names) = settings("address = \"127.0.0.1:8125\"\nprefix = \"edge.eu\"").unwrap();
        assert_eq!(names[0].requests, "edge.eu.requests.app.");
        assert_eq!(names[1].request_time, "edge.eu.request_time.web_v2_blue:");
        assert_eq!(names[2].bytes_sent, "edge.eu.bytes_sent._none:");
        let (_, names) = settings("address = \"127.0.0.1:8125\"\nprefix = \"\"").unwrap();
        assert_eq!(names[0].upstream_time, "upstream_time.app:");
    }

    #[test]
    fn the_sample_configuration_table_is_valid() {
        // It ships with `enabled = false`, so the examples' check skips it.
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pitcher.toml"));
        let config = crate::config::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let mc = config.modules.iter().find(|m| m.name == "statsd").expect("a [modules.statsd] table");
        let region = crate::shm::Region::create().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let b = Build { config: &config, shared: region.leak(), log: &log, check_only: true };
        build(mc, &b).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn timers_have_three_decimals_of_a_millisecond() {
        let mut out = Vec::new();
        write_ms(&mut out, 12_345);
        write_ms(&mut out, 7);
        assert_eq!(out, b"12.345|ms0.007|ms");
    }
}
