//! [`Core`]: what the sessions of a worker share (backend connections and
//! their pools, the current [`Snapshot`], timers, buffers, the overload
//! level), split from the session slab so both can be borrowed at once;
//! and [`UpConn`], a backend connection. What the core *does* is in the
//! files of the states that use it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use mio::Registry;
use slab::Slab;
use slog::Logger;

use crate::buffer::BufPool;
use crate::config::Config;
use crate::hooks::modules::Controller;
use crate::hooks::Modules;
use crate::net::Readiness;
use crate::router::Router;
use crate::shm::metrics::SeriesKind;
use crate::shm::Shared;
use crate::tls::{Acceptors, BackendStream, Connectors, TlsMaterial};
use crate::upstream::{Backends, Cluster, SlotTable};
use rustls::client::ClientSessionMemoryCache;

use super::timer::{Timed, Timers};

/// The configuration-derived state requests are served with. Immutable
/// once built (balancing counters are relaxed atomics); a reload builds a new one
/// and swaps the pointer. A session holds the snapshot its current request
/// started with, so requests in flight finish on it.
#[derive(Debug)]
pub struct Snapshot {
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Request routing of this configuration.
    pub router: Router,
    /// The clusters, by index in the configuration.
    pub clusters: Vec<Cluster>,
    /// The enabled modules and their pipelines.
    pub modules: Modules,
    /// Each route's series in the shared figures, by route index.
    pub route_series: Vec<usize>,
    /// Each cluster's series in the shared figures, by cluster index.
    pub cluster_series: Vec<usize>,
    /// The rustls configuration of each TLS listener (its certificates).
    pub tls: Acceptors,
    /// How to talk TLS to each cluster's backends (`None`: cleartext).
    pub backend_tls: Connectors,
    /// Listeners that redirect to https: (manifest name, https port).
    pub redirects: Vec<(String, u16)>,
}

impl Snapshot {
    /// The https port listener `name` redirects to, if it does.
    pub fn redirect_https(&self, name: &str) -> Option<u16> {
        self.redirects.iter().find(|(n, _)| n == name).map(|&(_, p)| p)
    }

    /// Builds a snapshot, giving its backends ids in the worker's table.
    /// TLS sessions to backends are kept in `sessions` (the worker's).
    pub fn build(
        config: Arc<Config>,
        material: &TlsMaterial,
        sessions: &Arc<ClientSessionMemoryCache>,
        backends: &mut Backends,
        slots: &mut SlotTable,
        log: &Logger,
    ) -> Result<Snapshot, String> {
        // Tickets stay valid while their key is held: two rotations after
        // it stopped sealing.
        let tls = Acceptors::build(&material.listeners, &slots.shared().tickets, config.tls_ticket_key_rotation * 2)?;
        let backend_tls = Connectors::build(&config.clusters, material, sessions)?;
        let modules = Modules::build(&config, slots.shared(), log)?;
        backends.retire_all();
        let clusters = config.clusters.iter().map(|c| Cluster::new(c, backends, slots)).collect();
        let (shared, hasher) = (slots.shared(), slots.shared().key_hasher());
        let series = |kind, name: &str| shared.metrics.series(&hasher, kind, name);
        let route_series = config.routes.iter().map(|r| series(SeriesKind::Route, &r.name)).collect();
        let cluster_series = config.clusters.iter().map(|c| series(SeriesKind::Cluster, &c.name)).collect();
        let redirects =
            config.listeners.iter().filter_map(|l| l.redirect_https_port.map(|p| (l.address.to_string(), p))).collect();
        let router = Router::new(&config)?;
        Ok(Snapshot { router, clusters, config, modules, route_series, cluster_series, tls, backend_tls, redirects })
    }
}

/// Everything the state machine works with besides the session itself:
/// split from the session slab so both can be borrowed at once.
pub struct Core {
    pub(super) registry: Registry,
    pub(super) ups: Slab<UpConn>,
    /// The configuration new requests are served with.
    pub(super) current: ArcSwap<Snapshot>,
    pub(super) backends: Backends,
    pub(super) slots: SlotTable,
    /// The shared region.
    pub(super) shared: &'static Shared,
    /// Overload level (0, 1: non-essential modules off, 2: shedding).
    pub(super) load_level: u32,
    /// The overload detector, when `[modules.degrade]` is enabled.
    pub(super) degrade: Option<Controller>,
    /// Request ids: a per-process random seed and a counter.
    pub(super) id_seed: u64,
    pub(super) id_seq: u64,
    /// Counter of the random numbers of weighted splits.
    pub(super) split_seq: u64,
    /// This worker's place among the master's workers (0 in
    /// `--single-process`): its index in the shared per-worker tables.
    pub(super) place: usize,
    pub(super) timers: Timers,
    /// Read buffers of client connections.
    pub(super) bufs: BufPool,
    /// Read buffers of upstream connections: larger, so that a response
    /// body moves in fewer, larger reads and writes.
    pub(super) up_bufs: BufPool,
    /// Pipes for spliced response bodies (see `splice`).
    pub(super) pipes: super::splice::Pipes,
    pub(super) now: Instant,
    pub(super) log: Logger,
    /// Answer with `Connection: close` and stop keeping connections.
    pub(super) draining: bool,
    /// Binary upgrade: connections are kept alive and handed to the next
    /// generation as soon as they can move (see `handover`).
    pub(super) handing_over: bool,
    /// Request bodies refused as too slow (see `forward::body_timeout`),
    /// and when that was last logged (once a second at most).
    pub(super) slow_bodies: u64,
    pub(super) slow_bodies_logged: Instant,
    /// TLS handshakes in progress and the ones that did not finish.
    pub(super) tls: TlsCounts,
    /// TLS sessions to backends, resumed by the next connection (kept
    /// across reloads).
    pub(super) tls_sessions: Arc<ClientSessionMemoryCache>,
}

/// A worker's TLS handshakes: in progress (limited by
/// `[limits] max_tls_handshakes`), and the connections closed before one
/// finished, by cause; logged once a second at most with the totals.
#[derive(Debug, Default)]
pub struct TlsCounts {
    /// Handshakes started and not finished or abandoned yet.
    pub handshaking: usize,
    /// Connections closed at accept: too many handshakes in progress.
    pub refused: u64,
    /// Handshakes that failed (not TLS, no common protocol, bad record).
    pub failed: u64,
    /// Handshakes that did not finish within `tls_handshake_ms`.
    pub timed_out: u64,
    /// Lines written in the current second, and when it started.
    pub logged: u32,
    pub logged_since: Option<Instant>,
}

/// Lines a second about TLS refusals, at most (a flood is summed up by the
/// totals on the next line).
const TLS_LINES_PER_SECOND: u32 = 10;

/// A connection to a backend: in use by a session, or idle in its pool.
#[derive(Debug)]
pub struct UpConn {
    pub(super) key: usize,
    pub(super) stream: BackendStream,
    /// The TLS settings it was made with (`Connector::id`; 0: cleartext):
    /// a pooled connection serves only a cluster with the same.
    pub(super) tls_id: u64,
    pub(super) rd: Readiness,
    pub(super) buf: Option<crate::buffer::Buf>,
    /// The connect, or the TLS handshake after it, is not done yet.
    pub(super) connecting: bool,
    /// Slab index of the session using it; `None` while pooled.
    pub(super) owner: Option<usize>,
    /// Id in the worker's backend table.
    pub(super) backend: usize,
    /// Taken from the pool for the current request.
    pub(super) reused: bool,
    pub(super) timed: Timed,
}

impl Core {
    /// A TLS connection closed before its handshake finished: a line with
    /// the totals (a few a second at most).
    pub(super) fn log_tls_refusal(&mut self, what: &str, peer: &dyn std::fmt::Debug) {
        let t = &mut self.tls;
        if t.logged_since.is_none_or(|s| self.now.saturating_duration_since(s) >= std::time::Duration::from_secs(1)) {
            t.logged_since = Some(self.now);
            t.logged = 0;
        }
        if t.logged >= TLS_LINES_PER_SECOND {
            return;
        }
        t.logged += 1;
        slog::info!(self.log, "TLS connection closed before its handshake finished"; "reason" => what,
            "peer" => format!("{peer:?}"), "handshaking" => self.tls.handshaking, "refused_total" => self.tls.refused,
            "failed_total" => self.tls.failed, "timed_out_total" => self.tls.timed_out);
    }

    /// A new request id: 16 hex digits, unique per process (a counter
    /// mixed with a random seed, so ids do not reveal request counts).
    pub(super) fn next_request_id(&mut self) -> [u8; 16] {
        self.id_seq += 1;
        // splitmix64 finaliser.
        let mut z = self.id_seed.wrapping_add(self.id_seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[(z >> (60 - 4 * i) & 0xf) as usize];
        }
        out
    }

    /// The overload controller changed the level: log it and publish it.
    pub(super) fn set_load_level(&mut self, level: u32, busy_percent: u32, in_flight: u32) {
        let old = std::mem::replace(&mut self.load_level, level);
        let what = match level {
            0 => "normal: all modules on",
            1 => "overloaded: non-essential modules off",
            _ => "overloaded: non-essential modules off, low-priority routes shed",
        };
        slog::warn!(self.log, "load level changed"; "from" => old, "to" => level, "state" => what,
            "busy_percent" => busy_percent, "in_flight" => in_flight);
        if let Some(w) = self.shared.workers.get(self.place) {
            w.level.store(level, Ordering::Relaxed);
            w.level_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request started (the overload controller's count window).
    pub(super) fn count_request(&mut self) {
        let now = self.now;
        let Some(c) = self.degrade.as_mut() else { return };
        if let Some(level) = c.request(now) {
            let in_flight = self.shared.workers.get(self.place).map_or(0, |w| w.in_flight.load(Ordering::Relaxed));
            self.set_load_level(level, 0, in_flight);
        }
    }
}
