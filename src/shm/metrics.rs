//! The figures `/metrics` shows, kept in the shared region so that they
//! are summed over every worker and never go backwards: a worker that is
//! killed, a reload and a binary upgrade (the region is handed to the new
//! master) all leave them where they were.
//!
//! Layout: each worker place below [`METRIC_BLOCKS`] has a block of
//! counters of its own ([`WorkerMetrics`]), so that two workers never
//! write the same cache line on the request path (places above share the
//! last block; the adds are atomic, so sharing is correct, only slower).
//! A block is never cleared: the next worker at the place adds to what the
//! last one left. The exporter (the master) sums the blocks.
//!
//! Series of routes and clusters are found by name: a name's slot is
//! claimed in a key table of the region (SipHash of the name with the
//! region's key, compare-and-swap on a free slot) by whoever first needs
//! it, so a worker, its master and a new binary's master all find the same
//! slot with no table passed between them. Slot 0 of each table is the
//! series of requests that had no route (or cluster); the last is shared
//! by the names that found no free slot among the [`SERIES_PROBES`] they
//! probe (more names than series: `(other)` on `/metrics`, where the
//! names in it are counted). Label values therefore come from the
//! configuration only, never from a request.
//!
//! Owns: the layout of the figures, the histogram buckets, finding a
//! series, and this process's block ([`here`]).
//! Must not: render (that is `crate::metrics`).

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::Relaxed};

use super::{KeyHasher, Shared, ACCOUNTED_WORKERS};

/// Worker places with a block of their own (the others share the last).
pub const METRIC_BLOCKS: usize = ACCOUNTED_WORKERS;
/// Route series: slot 0 "no route", the last the overflow.
pub const MAX_ROUTE_SERIES: usize = 1024;
/// Cluster series: slot 0 "no cluster", the last the overflow.
pub const MAX_CLUSTER_SERIES: usize = 256;
/// Slots a name probes for its series before it falls back to the
/// overflow series: a full table (a configuration of more route names than
/// series) costs each name past its capacity 32 probes, not the whole
/// table. The price is that a nearly full table sends a few names to the
/// overflow while a slot is still free.
pub const SERIES_PROBES: usize = 32;
/// Status classes counted: 1xx to 5xx.
pub const STATUS_CLASSES: usize = 5;
/// Upper bounds of the duration histograms' buckets, in microseconds
/// (Prometheus's default buckets plus 30 s and 60 s); the last bucket
/// (`+Inf`) is implicit.
pub const BUCKETS_US: [u64; 15] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000, 60_000_000,
];
/// Buckets of a histogram, `+Inf` included.
pub const HIST_SLOTS: usize = BUCKETS_US.len() + 1;

/// Why a client connection's deadline passed (label `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// The request head did not arrive in time (408).
    ClientHeader,
    /// A keep-alive connection stayed idle too long (closed).
    KeepaliveIdle,
    /// The backend did not connect, answer or read in time (504 or close).
    Upstream,
    /// The client did not read the response in time (closed).
    ClientWrite,
    /// A tunnel stayed idle too long (closed).
    TunnelIdle,
    /// A request body came too slowly (408).
    ClientBody,
}

impl TimeoutKind {
    /// Every kind, in the order of [`WorkerMetrics::timeouts`].
    pub const ALL: [TimeoutKind; 6] = [
        TimeoutKind::ClientHeader,
        TimeoutKind::KeepaliveIdle,
        TimeoutKind::Upstream,
        TimeoutKind::ClientWrite,
        TimeoutKind::TunnelIdle,
        TimeoutKind::ClientBody,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            TimeoutKind::ClientHeader => "client_header",
            TimeoutKind::KeepaliveIdle => "keepalive_idle",
            TimeoutKind::Upstream => "upstream",
            TimeoutKind::ClientWrite => "client_write",
            TimeoutKind::TunnelIdle => "tunnel_idle",
            TimeoutKind::ClientBody => "client_body",
        }
    }
}

/// A histogram of durations: a count per bucket (not cumulative: the
/// exporter accumulates) and the sum in microseconds.
#[repr(C)]
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket, `+Inf` last.
    pub buckets: [AtomicU64; HIST_SLOTS],
    /// Sum of the observations, microseconds.
    pub sum_us: AtomicU64,
}

impl Histogram {
    const fn zero() -> Histogram {
        Histogram { buckets: [const { AtomicU64::new(0) }; HIST_SLOTS], sum_us: AtomicU64::new(0) }
    }

    /// Counts one observation.
    #[inline]
    pub fn observe(&self, us: u64) {
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// The figures of one cluster series in one block.
#[repr(C)]
#[derive(Debug)]
pub struct ClusterSeries {
    /// Responses by status class (1xx … 5xx).
    pub codes: [AtomicU64; STATUS_CLASSES],
    /// From the first byte of the request to the last of the response.
    pub duration: Histogram,
    /// From sending the request to the backend to the end of its response.
    pub upstream: Histogram,
}

/// The counters one worker place adds to.
#[repr(C)]
#[derive(Debug)]
pub struct WorkerMetrics {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections refused over `max_connections`.
    pub refused: AtomicU64,
    /// Client connections open now (a gauge: kept only for places below
    /// [`METRIC_BLOCKS`], zeroed when the worker at the place dies).
    pub active: AtomicU64,
    /// Deadlines that passed, by [`TimeoutKind`].
    pub timeouts: [AtomicU64; TimeoutKind::ALL.len()],
    /// Requests that were not the first of their connection.
    pub keepalive_requests: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Backend connections opened, and taken from the idle pool.
    pub upstream_connects: AtomicU64,
    /// Backend connections reused from the pool.
    pub upstream_reuses: AtomicU64,
    /// Connections closed because handling them panicked.
    pub panics: AtomicU64,
    /// Access-log lines written, and dropped (a slow or absent target).
    pub log_lines: AtomicU64,
    /// Access-log lines dropped.
    pub log_dropped: AtomicU64,
    /// Requests turned away by the overload controller (level 2).
    pub shed: AtomicU64,
    /// Datagrams the `statsd` module sent.
    pub statsd_sent: AtomicU64,
    /// Datagrams the `statsd` module could not send (no server, a full
    /// socket buffer): dropped.
    pub statsd_dropped: AtomicU64,
    /// Configurations the worker applied after its start (reloads, changed
    /// backend names): from the message's arrival to the new snapshot
    /// swapped in.
    pub reload_apply: Histogram,
    /// Requests by route series and status class.
    pub routes: [[AtomicU64; STATUS_CLASSES]; MAX_ROUTE_SERIES],
    /// Figures by cluster series.
    pub clusters: [ClusterSeries; MAX_CLUSTER_SERIES],
}

/// Figures of the instance kept by its masters (old and new alike).
#[repr(C)]
#[derive(Debug)]
pub struct ProcessShm {
    /// Reloads applied by every worker, and refused or failed.
    pub reloads_ok: AtomicU64,
    /// Reloads refused (bad configuration) or not confirmed by every worker.
    pub reloads_failed: AtomicU64,
    /// Wall-clock seconds of the last successful reload (0: none).
    pub last_reload_ok_s: AtomicU64,
    /// Binary upgrades that completed, and that were rolled back.
    pub upgrades_ok: AtomicU64,
    /// Binary upgrades rolled back (the new binary failed).
    pub upgrades_failed: AtomicU64,
    /// Wall-clock seconds of the last completed upgrade (0: none).
    pub last_upgrade_ok_s: AtomicU64,
    /// Workers started again after one died.
    pub worker_respawns: AtomicU64,
    /// Configurations loaded by this instance (start, reloads, upgrades).
    pub generation: AtomicU64,
    /// Wall-clock seconds when the instance (its first master) started.
    pub started_s: AtomicU64,
    /// Re-resolutions of backend names that failed (no answer, a server
    /// error): the name kept its addresses.
    pub dns_failures: AtomicU64,
    /// Re-resolutions of backend names that changed their addresses (each
    /// sent to the workers).
    pub dns_changes: AtomicU64,
}

/// The figures' part of the region.
#[repr(C)]
#[derive(Debug)]
pub struct MetricsShm {
    /// Key of each route series' name (0: free).
    route_keys: [AtomicU64; MAX_ROUTE_SERIES],
    /// Key of each cluster series' name (0: free).
    cluster_keys: [AtomicU64; MAX_CLUSTER_SERIES],
    /// Counters, by worker place.
    pub blocks: [WorkerMetrics; METRIC_BLOCKS],
    /// Figures of the instance.
    pub process: ProcessShm,
    /// Blocks ever written (places below this were used): the exporter
    /// reads no further, so untouched pages stay unallocated.
    pub blocks_used: AtomicU32,
}

/// Which table a series name is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKind {
    /// Route names.
    Route,
    /// Cluster names.
    Cluster,
}

impl MetricsShm {
    /// The block of worker place `place`.
    pub fn block(&self, place: usize) -> &WorkerMetrics {
        let i = place.min(METRIC_BLOCKS - 1);
        let _ = self.blocks_used.fetch_max(i as u32 + 1, Relaxed);
        &self.blocks[i]
    }

    /// The blocks that were ever used.
    pub fn used_blocks(&self) -> &[WorkerMetrics] {
        let n = (self.blocks_used.load(Relaxed) as usize).min(METRIC_BLOCKS);
        &self.blocks[..n]
    }

    fn keys(&self, kind: SeriesKind) -> &[AtomicU64] {
        match kind {
            SeriesKind::Route => &self.route_keys,
            SeriesKind::Cluster => &self.cluster_keys,
        }
    }

    /// The series of `name`, claiming a slot when it has none (and one is
    /// free within [`SERIES_PROBES`] of its hash; else the overflow slot).
    /// The empty name is slot 0.
    pub fn series(&self, hasher: &KeyHasher, kind: SeriesKind, name: &str) -> usize {
        self.find(hasher, kind, name, true).unwrap_or(self.keys(kind).len() - 1)
    }

    /// The series of `name` if it has one (never claims).
    pub fn find_series(&self, hasher: &KeyHasher, kind: SeriesKind, name: &str) -> Option<usize> {
        self.find(hasher, kind, name, false)
    }

    fn find(&self, hasher: &KeyHasher, kind: SeriesKind, name: &str, claim: bool) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        let keys = self.keys(kind);
        let mut h = hasher.clone();
        h.write(&[kind as u8]).write(name.as_bytes());
        // 0 marks a free slot: no name may have it.
        let key = h.finish().max(1);
        let usable = keys.len() - 2; // slots 1 ..= len-2
        let start = (key % usable as u64) as usize;
        for i in 0..usable.min(SERIES_PROBES) {
            let slot = 1 + (start + i) % usable;
            let k = keys[slot].load(Relaxed);
            if k == key {
                return Some(slot);
            }
            if k == 0 {
                if !claim {
                    return None;
                }
                match keys[slot].compare_exchange(0, key, Relaxed, Relaxed) {
                    Ok(_) => return Some(slot),
                    Err(now) if now == key => return Some(slot),
                    Err(_) => {}
                }
            }
        }
        None
    }
}

impl ClusterSeries {
    const fn zero() -> ClusterSeries {
        ClusterSeries {
            codes: [const { AtomicU64::new(0) }; STATUS_CLASSES],
            duration: Histogram::zero(),
            upstream: Histogram::zero(),
        }
    }
}

impl WorkerMetrics {
    /// A block with every counter at zero.
    pub const fn zero() -> WorkerMetrics {
        WorkerMetrics {
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            active: AtomicU64::new(0),
            timeouts: [const { AtomicU64::new(0) }; TimeoutKind::ALL.len()],
            keepalive_requests: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            upstream_connects: AtomicU64::new(0),
            upstream_reuses: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            log_lines: AtomicU64::new(0),
            log_dropped: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            statsd_sent: AtomicU64::new(0),
            statsd_dropped: AtomicU64::new(0),
            reload_apply: Histogram::zero(),
            routes: [const { [const { AtomicU64::new(0) }; STATUS_CLASSES] }; MAX_ROUTE_SERIES],
            clusters: [const { ClusterSeries::zero() }; MAX_CLUSTER_SERIES],
        }
    }

    /// A request ended: its status in its route and cluster series, its
    /// durations in the cluster's histograms.
    #[inline]
    pub fn finished(&self, route: usize, cluster: usize, status: u16, duration_us: u64, upstream_us: Option<u64>) {
        let class = (status as usize / 100).clamp(1, STATUS_CLASSES) - 1;
        if let Some(r) = self.routes.get(route) {
            r[class].fetch_add(1, Relaxed);
        }
        if let Some(c) = self.clusters.get(cluster) {
            c.codes[class].fetch_add(1, Relaxed);
            c.duration.observe(duration_us);
            if let Some(u) = upstream_us {
                c.upstream.observe(u);
            }
        }
    }

    /// Counts a deadline that passed.
    #[inline]
    pub fn timed_out(&self, kind: TimeoutKind) {
        self.timeouts[kind as usize].fetch_add(1, Relaxed);
    }
}

/// Adds `n` to a counter (shorthand for the request path).
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

/// This process's block: its worker place's once [`install`] ran, else a
/// block of its own that nobody reads (the master, unit tests).
static HERE: AtomicPtr<WorkerMetrics> = AtomicPtr::new(std::ptr::null_mut());

/// Makes `place`'s block of `shared` this process's (a worker, at start).
pub fn install(shared: &'static Shared, place: usize) {
    let block: &'static WorkerMetrics = shared.metrics.block(place);
    HERE.store(std::ptr::from_ref(block).cast_mut(), Relaxed);
}

/// The block this process adds to.
#[inline]
pub fn here() -> &'static WorkerMetrics {
    let p = HERE.load(Relaxed);
    if p.is_null() {
        return &UNREAD;
    }
    // SAFETY: the only non-null value stored is a `&'static WorkerMetrics`
    // into a mapping that is never unmapped (see `Region::map`), made only
    // of atomics, so shared use is sound.
    unsafe { &*p }
}

/// Where a process with no place (the master, unit tests) counts: a
/// block of its own that nobody reads.
static UNREAD: WorkerMetrics = WorkerMetrics::zero();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Region;

    #[test]
    fn a_name_finds_the_same_series_in_every_mapping() {
        let r = Region::create().unwrap();
        let other = Region::open(
            nix::unistd::dup(r.raw_fd())
                .map(|fd| {
                    // SAFETY: `dup` returned a new fd that nothing else owns.
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                })
                .unwrap(),
        )
        .unwrap();
        let (a, b) = (r.shared(), other.shared());
        let ha = a.key_hasher();
        let hb = b.key_hasher();
        let s1 = a.metrics.series(&ha, SeriesKind::Route, "api");
        let s2 = a.metrics.series(&ha, SeriesKind::Route, "web");
        assert_ne!(s1, s2);
        assert!(s1 > 0 && s1 < MAX_ROUTE_SERIES - 1);
        assert_eq!(b.metrics.find_series(&hb, SeriesKind::Route, "api"), Some(s1));
        assert_eq!(b.metrics.find_series(&hb, SeriesKind::Cluster, "api"), None, "tables are apart");
        assert_eq!(a.metrics.series(&ha, SeriesKind::Route, ""), 0);
    }

    #[test]
    fn a_full_table_sends_new_names_to_the_overflow_series() {
        let r = Region::create().unwrap();
        let (m, h) = (&r.shared().metrics, r.shared().key_hasher());
        let overflow = MAX_CLUSTER_SERIES - 1;
        let mut own = std::collections::HashMap::new();
        let mut in_other = Vec::new();
        for i in 0..4 * MAX_CLUSTER_SERIES {
            let name = format!("c{i}");
            match m.series(&h, SeriesKind::Cluster, &name) {
                s if s == overflow => in_other.push(name),
                s => {
                    assert!(s > 0 && s < overflow, "{name}: {s}");
                    assert!(own.insert(s, name).is_none(), "two names share series {s}");
                }
            }
        }
        // Bounded probing leaves a few slots free at most; the names past
        // the table's capacity all share the overflow.
        assert!(own.len() > (MAX_CLUSTER_SERIES - 2) * 3 / 4, "{} series taken", own.len());
        assert!(in_other.len() >= 4 * MAX_CLUSTER_SERIES - (MAX_CLUSTER_SERIES - 2));
        for (s, name) in &own {
            assert_eq!(m.series(&h, SeriesKind::Cluster, name), *s, "{name} keeps its series");
            assert_eq!(m.find_series(&h, SeriesKind::Cluster, name), Some(*s));
        }
        for name in &in_other {
            assert_eq!(m.find_series(&h, SeriesKind::Cluster, name), None, "{name} has no series");
            assert_eq!(m.series(&h, SeriesKind::Cluster, name), overflow);
        }
    }

    #[test]
    fn a_name_probes_a_bounded_number_of_slots() {
        // Every slot taken by other keys: a new name gives up after
        // SERIES_PROBES slots, it does not walk the whole table.
        let r = Region::create().unwrap();
        let (m, h) = (&r.shared().metrics, r.shared().key_hasher());
        for k in &m.route_keys[1..MAX_ROUTE_SERIES - 1] {
            k.store(u64::MAX, Relaxed);
        }
        let mut key = h.clone();
        key.write(&[SeriesKind::Route as u8]).write(b"late");
        let key = key.finish().max(1);
        let usable = MAX_ROUTE_SERIES - 2;
        let start = (key % usable as u64) as usize;
        // The slot just past the probed ones is free: unreachable.
        m.route_keys[1 + (start + SERIES_PROBES) % usable].store(0, Relaxed);
        assert_eq!(m.series(&h, SeriesKind::Route, "late"), MAX_ROUTE_SERIES - 1);
        // The last probed slot free: found.
        m.route_keys[1 + (start + SERIES_PROBES - 1) % usable].store(0, Relaxed);
        assert_eq!(m.series(&h, SeriesKind::Route, "late"), 1 + (start + SERIES_PROBES - 1) % usable);
    }

    #[test]
    fn observations_land_in_their_bucket() {
        let r = Region::create().unwrap();
        let b = r.shared().metrics.block(0);
        b.finished(3, 2, 204, 1_000, Some(700));
        b.finished(3, 2, 503, 3_000_000, None);
        b.finished(3, 2, 499, 70_000_000, None);
        assert_eq!(b.routes[3][1].load(Relaxed), 1);
        assert_eq!(b.routes[3][3].load(Relaxed), 1);
        assert_eq!(b.routes[3][4].load(Relaxed), 1);
        let c = &b.clusters[2];
        assert_eq!(c.duration.buckets[0].load(Relaxed), 1, "1 ms is in the le=0.001 bucket");
        assert_eq!(c.duration.buckets[11].load(Relaxed), 1, "3 s is in le=5");
        assert_eq!(c.duration.buckets[HIST_SLOTS - 1].load(Relaxed), 1, "70 s is +Inf");
        assert_eq!(c.duration.sum_us.load(Relaxed), 73_001_000);
        assert_eq!(c.upstream.buckets.iter().map(|b| b.load(Relaxed)).sum::<u64>(), 1);
        assert_eq!(r.shared().metrics.used_blocks().len(), 1);
    }
}
