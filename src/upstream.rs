//! Upstream clusters as one worker sees them.
//!
//! Two lifetimes meet here. A [`Cluster`] belongs to one configuration
//! snapshot: its members, weights, balancing state and hash ring are
//! replaced by a reload. A [`BackendRt`] belongs to the worker and is keyed
//! by address: its idle keep-alive connections survive every reload that
//! keeps the address. Health, ejection, slow start and load counters live
//! in shared memory ([`BackendShm`]) so that every worker sees the same
//! state; they survive reloads (and upgrades) with the address's slot.
//! Sockets live in the worker's connection slab; this module holds slab
//! indices.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::{BackendAddr, Balance, ClusterConfig, HashKey, HealthCheck, Passive};
pub use crate::shm::SlotTable;
use crate::shm::{BackendShm, PlaceCounts};

/// The worker's state for one backend address.
#[derive(Debug)]
pub struct BackendRt {
    /// The backend's address.
    pub addr: BackendAddr,
    /// `addr` as text (for logs and modules, without formatting each time).
    pub name: String,
    /// Shared state of this address (all workers).
    pub shm: &'static BackendShm,
    /// Its slot in the shared region (`None`: the region is full and it
    /// counts in a private overflow slot), for this worker's share of
    /// `shm.active` ([`crate::shm::PlaceCounts`]).
    pub slot: Option<u32>,
    /// Slab indices of idle pooled connections, most recent last.
    pub idle: Vec<usize>,
    /// Connections of this worker in use for requests.
    pub active: usize,
    /// No cluster of the current configuration names it any more.
    pub retired: bool,
}

impl BackendRt {
    /// This worker's share of `shm.active`, in its place's counts.
    fn share<'a>(&self, mine: Option<&'a PlaceCounts>) -> Option<&'a AtomicU32> {
        mine?.backend_active.get(self.slot? as usize)
    }

    /// A request of this worker (whose place's counts are `mine`) starts
    /// using a connection.
    pub fn acquire(&mut self, mine: Option<&PlaceCounts>) {
        self.active += 1;
        self.shm.active.fetch_add(1, Relaxed);
        if let Some(c) = self.share(mine) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A request of this worker (whose place's counts are `mine`) stops
    /// using a connection.
    pub fn release(&mut self, mine: Option<&PlaceCounts>) {
        if self.active > 0 {
            self.active -= 1;
            let _ = self.shm.active.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
            if let Some(c) = self.share(mine) {
                let _ = c.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
            }
        }
    }
}

/// Gives the shared-memory slot of a backend address.
pub trait SlotMap {
    /// The slot of `addr` and its state, or `None` when it has no slot.
    fn slot(&mut self, addr: &BackendAddr) -> Option<(u32, &'static BackendShm)>;
}

impl SlotMap for SlotTable {
    fn slot(&mut self, addr: &BackendAddr) -> Option<(u32, &'static BackendShm)> {
        let n = self.slot_of(addr)?;
        Some((n, self.shm(n)))
    }
}

/// All backends a worker has known, by stable id. Ids are never reused, so
/// a request still running on an old snapshot cannot reach a different
/// backend through a stale id.
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<BackendRt>,
    by_addr: HashMap<BackendAddr, usize>,
}

impl Backends {
    /// The id of `addr`, creating its state when new (or reviving it).
    pub fn id_for(&mut self, addr: &BackendAddr, slots: &mut dyn SlotMap) -> usize {
        if let Some(&id) = self.by_addr.get(addr) {
            self.list[id].retired = false;
            return id;
        }
        let (slot, shm) = match slots.slot(addr) {
            Some((n, shm)) => (Some(n), shm),
            None => (None, overflow_slot()),
        };
        let id = self.list.len();
        self.list.push(BackendRt {
            addr: addr.clone(),
            name: addr.to_string(),
            shm,
            slot,
            idle: Vec::new(),
            active: 0,
            retired: false,
        });
        self.by_addr.insert(addr.clone(), id);
        id
    }

    /// The backend of id `id`.
    pub fn get(&self, id: usize) -> &BackendRt {
        &self.list[id]
    }

    /// Every backend this worker knows (retired ones included).
    pub fn iter(&self) -> impl Iterator<Item = &BackendRt> {
        self.list.iter()
    }

    /// The backend of id `id`, to change.
    pub fn get_mut(&mut self, id: usize) -> &mut BackendRt {
        &mut self.list[id]
    }

    /// Marks every backend retired; [`id_for`](Self::id_for) revives those
    /// the new configuration still names.
    pub fn retire_all(&mut self) {
        for b in &mut self.list {
            b.retired = true;
        }
    }
}

/// Backends beyond the region's slots share one private, never-reported
/// state: they still work, without shared health (logged by the master).
fn overflow_slot() -> &'static BackendShm {
    static OVERFLOW: std::sync::OnceLock<&'static BackendShm> = std::sync::OnceLock::new();
    OVERFLOW.get_or_init(|| {
        let r = crate::shm::Region::create().expect("memfd for the overflow slot");
        let s = &r.shared().backends[0];
        std::mem::forget(r);
        s
    })
}

/// A backend as a member of a cluster.
#[derive(Debug)]
pub struct Member {
    /// Id in the worker's [`Backends`].
    pub id: usize,
    /// Its weight (traffic share).
    pub weight: i64,
    /// Its shared state.
    pub shm: &'static BackendShm,
    /// Smooth WRR running weight. Atomic only so that a snapshot is `Sync`
    /// (one worker thread uses it; relaxed loads and stores are plain moves).
    current: AtomicI64,
}

/// Share of its weight a backend gets at the start of a slow start.
const SLOW_START_FLOOR: f64 = 0.1;
/// Virtual nodes per unit of weight on a consistent-hash ring.
const RING_POINTS: usize = 64;

/// A cluster of one configuration snapshot.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's name.
    pub name: String,
    /// Its backends.
    pub members: Vec<Member>,
    /// Idle connections kept per backend.
    pub keepalive: usize,
    /// How long an idle connection is kept.
    pub keepalive_timeout: Duration,
    /// Other backends a failed request may be tried on.
    pub retries: u32,
    /// Retries happen only this soon after the request started.
    pub retry_budget: Duration,
    /// How requests are spread.
    pub lb: Balance,
    /// What a `hash` cluster hashes.
    pub hash_key: HashKey,
    /// Slow-start ramp, in ms (0: none).
    pub slow_start_ms: u64,
    /// Active health check (done by the master).
    pub health_check: Option<HealthCheck>,
    /// Passive failure detection.
    pub passive: Passive,
    /// Consistent-hash ring: (point, member index), sorted by point.
    ring: Vec<(u64, usize)>,
    /// Random state for p2c (xorshift).
    rng: AtomicU64,
}

impl Cluster {
    /// The cluster of `c`, its backends given ids in `backends` and slots by `slots`.
    pub fn new(c: &ClusterConfig, backends: &mut Backends, slots: &mut dyn SlotMap) -> Cluster {
        let members: Vec<Member> = c
            .backends
            .iter()
            .map(|b| {
                let id = backends.id_for(&b.addr, slots);
                Member { id, weight: b.weight as i64, shm: backends.get(id).shm, current: AtomicI64::new(0) }
            })
            .collect();
        let mut ring = Vec::new();
        if c.lb == Balance::Hash {
            for (i, b) in c.backends.iter().enumerate() {
                for v in 0..RING_POINTS * b.weight as usize {
                    ring.push((hash64(&(b.addr.to_string(), v)), i));
                }
            }
            ring.sort_unstable();
        }
        Cluster {
            name: c.name.clone(),
            members,
            keepalive: c.keepalive,
            keepalive_timeout: c.keepalive_timeout,
            retries: c.retries,
            retry_budget: c.retry_budget,
            lb: c.lb,
            hash_key: c.hash_key.clone(),
            slow_start_ms: c.slow_start.as_millis() as u64,
            health_check: c.health_check.clone(),
            passive: c.passive.clone(),
            ring,
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64),
        }
    }

    /// Can member `i` take requests now (not ejected, not down)?
    pub fn available(&self, i: usize, now_ms: u64) -> bool {
        let s = self.members[i].shm;
        s.down.load(Relaxed) == 0 && s.ejected_until_ms.load(Relaxed) <= now_ms
    }

    /// Weight of member `i` now, lowered during its slow start.
    pub fn effective_weight(&self, i: usize, now_ms: u64) -> i64 {
        let m = &self.members[i];
        let f = ramp_progress(m.shm, self.slow_start_ms, now_ms);
        if f >= 1.0 {
            return m.weight * 100;
        }
        let f = SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * f;
        ((m.weight * 100) as f64 * f).max(1.0) as i64
    }

    /// Picks a member for a request: among those not tried yet (`tried`,
    /// a bit per member) and available; when none is available, among all
    /// not tried (better to try a backend than to fail at once). `hash` is
    /// the request's key for `lb = "hash"`.
    pub fn pick(&self, tried: u64, hash: u64, now_ms: u64) -> Option<usize> {
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let any_available = (0..self.members.len()).any(|i| untried(i) && self.available(i, now_ms));
        let ok = |i: usize| untried(i) && (!any_available || self.available(i, now_ms));
        match self.lb {
            Balance::RoundRobin => self.pick_wrr(&ok, now_ms),
            Balance::LeastConn => self.pick_least(&ok, now_ms, (0..self.members.len()).collect::<Vec<_>>()),
            Balance::P2c => {
                let candidates: Vec<usize> = (0..self.members.len()).filter(|&i| ok(i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let a = (self.next_random() % n as u64) as usize;
                        let mut b = (self.next_random() % (n as u64 - 1)) as usize;
                        if b >= a {
                            b += 1;
                        }
                        self.pick_least(&ok, now_ms, vec![candidates[a], candidates[b]])
                    }
                }
            }
            Balance::Hash => {
                if self.ring.is_empty() {
                    return None;
                }
                let start = self.ring.partition_point(|&(p, _)| p < hash);
                (0..self.ring.len()).map(|k| self.ring[(start + k) % self.ring.len()].1).find(|&i| ok(i))
            }
        }
    }

    /// The hash of a request for `lb = "hash"` (0 for other balancers).
    pub fn request_hash(&self, req: &crate::http::RequestHead, peer: crate::net::Peer) -> u64 {
        if self.lb != Balance::Hash {
            return 0;
        }
        match &self.hash_key {
            HashKey::ClientIp => match peer {
                crate::net::Peer::Ip(ip) => hash64(&ip),
                crate::net::Peer::Unix => 0,
            },
            HashKey::Path => hash64(&req.path()),
            HashKey::Header(name) => hash64(&req.head.get(name).unwrap_or(b"")),
        }
    }

    fn pick_wrr(&self, ok: &dyn Fn(usize) -> bool, now_ms: u64) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, m) in self.members.iter().enumerate() {
            if !ok(i) {
                continue;
            }
            let w = self.effective_weight(i, now_ms);
            let cur = m.current.load(Relaxed) + w;
            m.current.store(cur, Relaxed);
            total += w;
            if best.is_none_or(|(_, b)| cur > b) {
                best = Some((i, cur));
            }
        }
        let (i, _) = best?;
        let m = &self.members[i];
        m.current.store(m.current.load(Relaxed) - total, Relaxed);
        Some(i)
    }

    /// The member with the fewest active connections per unit of
    /// (effective) weight among `among`; ties go round robin.
    fn pick_least(&self, ok: &dyn Fn(usize) -> bool, now_ms: u64, among: Vec<usize>) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        let offset = self.next_random() as usize;
        let n = among.len();
        for k in 0..n {
            let i = among[(k + offset) % n];
            if !ok(i) {
                continue;
            }
            let load = self.members[i].shm.active.load(Relaxed) as f64 / self.effective_weight(i, now_ms) as f64;
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    fn next_random(&self) -> u64 {
        let mut x = self.rng.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Relaxed);
        x
    }
}

/// A stable 64-bit hash (the same in every worker and process).
pub fn hash64<T: Hash>(v: &T) -> u64 {
    // SipHash with fixed keys: `DefaultHasher::new()` is deterministic.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// How far a backend's slow start has gone at `now_ms`: 0 when it starts,
/// 1 once it is over (or when there is none).
pub fn ramp_progress(s: &BackendShm, slow_start_ms: u64, now_ms: u64) -> f64 {
    let start = s.ramp_start_ms.load(Relaxed);
    if slow_start_ms == 0 || start == 0 || now_ms >= start + slow_start_ms {
        return 1.0;
    }
    now_ms.saturating_sub(start) as f64 / slow_start_ms as f64
}

/// A backend's state as operators see it (`ctl upstreams`, `/metrics`):
/// `down` (active health), `ejected` (passive detection), `slow_start`,
/// or `healthy`; and its slow start's progress ([`ramp_progress`]).
pub fn backend_state(s: &BackendShm, slow_start_ms: u64, now_ms: u64) -> (&'static str, f64) {
    let ramp = ramp_progress(s, slow_start_ms, now_ms);
    let state = if s.down.load(Relaxed) == 1 {
        "down"
    } else if s.ejected_until_ms.load(Relaxed) > now_ms {
        "ejected"
    } else if ramp < 1.0 {
        "slow_start"
    } else {
        "healthy"
    };
    (state, ramp)
}

/// The outcome of one request to a backend, for passive detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// The connection failed.
    ConnectError,
    /// A connect, read or write timed out.
    Timeout,
    /// A 5xx status from the backend.
    ServerError,
    /// The backend closed or reset the connection before the response
    /// was complete (passive detection treats it as a connection error).
    Reset,
    /// The backend's response was malformed (treated as a connection error).
    Invalid,
    /// The TLS handshake with the backend failed: its certificate was
    /// refused, or no common protocol (treated as a connection error).
    Tls,
}

impl Cluster {
    /// Records an outcome for member `i`; ejects it when a detector trips
    /// (and the cluster's ejection cap allows). Returns the ejection length
    /// when this call ejected the backend.
    pub fn record(&self, i: usize, outcome: Outcome, now_ms: u64) -> Option<Duration> {
        let p = &self.passive;
        let s = self.members[i].shm;
        s.requests.fetch_add(1, Relaxed);
        let (failed, kind) = match outcome {
            Outcome::Success => (false, None),
            Outcome::ConnectError => (p.on_connect_error, Some(&s.fail_connect)),
            Outcome::Reset => (p.on_connect_error, Some(&s.fail_reset)),
            Outcome::Invalid => (p.on_connect_error, Some(&s.fail_invalid)),
            Outcome::Tls => (p.on_connect_error, Some(&s.fail_tls)),
            Outcome::Timeout => (p.on_timeout, Some(&s.fail_timeout)),
            Outcome::ServerError => (p.on_5xx, Some(&s.fail_5xx)),
        };
        // Every failure is counted by kind, whether or not it counts
        // against the backend.
        if let Some(k) = kind {
            k.fetch_add(1, Relaxed);
        }
        // Time window: a new window starts when the old one is over.
        let w0 = s.window_start_ms.load(Relaxed);
        if now_ms >= w0 + p.window.as_millis() as u64
            && s.window_start_ms.compare_exchange(w0, now_ms, Relaxed, Relaxed).is_ok()
        {
            s.window_requests.store(0, Relaxed);
            s.window_failures.store(0, Relaxed);
        }
        let wreq = s.window_requests.fetch_add(1, Relaxed) + 1;
        if !failed {
            s.consecutive_failures.store(0, Relaxed);
            return None;
        }
        s.failures.fetch_add(1, Relaxed);
        let consecutive = s.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let wfail = s.window_failures.fetch_add(1, Relaxed) + 1;
        let by_count = p.consecutive_failures > 0 && consecutive >= p.consecutive_failures;
        let by_time = p.window_failure_percent > 0
            && wreq >= p.window_min_requests
            && wfail as u64 * 100 >= p.window_failure_percent as u64 * wreq as u64;
        let current = s.ejected_until_ms.load(Relaxed);
        if !(by_count || by_time) || current > now_ms {
            return None;
        }
        // Cap: never more than max_ejected_percent of the cluster at once.
        let ejected =
            (0..self.members.len()).filter(|&j| self.members[j].shm.ejected_until_ms.load(Relaxed) > now_ms).count();
        if (ejected + 1) * 100 > self.members.len() * p.max_ejected_percent as usize {
            return None;
        }
        let n = s.ejections.fetch_add(1, Relaxed).min(16);
        let ms = (p.ejection.as_millis() as u64).saturating_mul(1 << n).min(p.max_ejection.as_millis() as u64);
        let until = now_ms + ms;
        // Only one worker ejects: the others lose this race and see it ejected.
        if s.ejected_until_ms.compare_exchange(current, until, Relaxed, Relaxed).is_err() {
            s.ejections.fetch_sub(1, Relaxed);
            return None;
        }
        // Re-admission ramps up from the end of the ejection.
        s.ramp_start_ms.store(until, Relaxed);
        s.consecutive_failures.store(0, Relaxed);
        s.window_requests.store(0, Relaxed);
        s.window_failures.store(0, Relaxed);
        Some(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;
    use crate::shm::Region;

    /// Slots from a private region, in order.
    struct TestSlots {
        region: Region,
        next: usize,
        map: HashMap<BackendAddr, usize>,
    }

    impl TestSlots {
        fn new() -> TestSlots {
            TestSlots { region: Region::create().unwrap(), next: 0, map: HashMap::new() }
        }
    }

    impl SlotMap for TestSlots {
        fn slot(&mut self, addr: &BackendAddr) -> Option<(u32, &'static BackendShm)> {
            let n = *self.map.entry(addr.clone()).or_insert_with(|| {
                self.next += 1;
                self.next - 1
            });
            Some((n as u32, &self.region.shared().backends[n]))
        }
    }

    fn config(specs: &[&str], lb: Balance) -> ClusterConfig {
        ClusterConfig {
            name: "c".into(),
            backends: specs.iter().map(|s| BackendSpec::parse(s).unwrap()).collect(),
            keepalive: 1,
            keepalive_timeout: Duration::from_secs(1),
            retries: 1,
            retry_budget: Duration::from_secs(10),
            lb,
            hash_key: HashKey::Path,
            slow_start: Duration::ZERO,
            health_check: None,
            passive: Passive::default(),
            dns: Default::default(),
            tls: None,
        }
    }

    fn cluster(specs: &[&str], lb: Balance, slots: &mut TestSlots) -> Cluster {
        Cluster::new(&config(specs, lb), &mut Backends::default(), slots)
    }

    #[test]
    fn smooth_weighted_round_robin() {
        let c = cluster(
            &["127.0.0.1:1 weight=5", "127.0.0.1:2", "127.0.0.1:3"],
            Balance::RoundRobin,
            &mut TestSlots::new(),
        );
        let picks: Vec<usize> = (0..7).map(|_| c.pick(0, 0, 1).unwrap()).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_tried_and_ejected_backends() {
        let c = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], Balance::RoundRobin, &mut TestSlots::new());
        for _ in 0..4 {
            assert_eq!(c.pick(0b011, 0, 1), Some(2));
        }
        c.members[1].shm.ejected_until_ms.store(1000, Relaxed);
        assert!((0..10).all(|_| c.pick(0, 0, 500) != Some(1)));
        assert!((0..10).any(|_| c.pick(0, 0, 1000) == Some(1)));
        assert_eq!(c.pick(0b111, 0, 1), None);
    }

    #[test]
    fn consistent_hash_moves_few_keys() {
        let mut slots = TestSlots::new();
        let four = cluster(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"], Balance::Hash, &mut slots);
        let three = cluster(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], Balance::Hash, &mut slots);
        let keys: Vec<u64> = (0..2000).map(|k| hash64(&format!("/user/{k}"))).collect();
        let moved = keys
            .iter()
            .filter(|&&k| {
                let a = four.pick(0, k, 1).unwrap();
                a != 3 && three.pick(0, k, 1).unwrap() != a
            })
            .count();
        assert_eq!(moved, 0, "keys of remaining backends must stay");
        let on_removed = keys.iter().filter(|&&k| four.pick(0, k, 1) == Some(3)).count();
        assert!((300..700).contains(&on_removed), "{on_removed} of 2000 on one of four");
    }

    #[test]
    fn least_conn_and_p2c_prefer_the_idle() {
        let mut slots = TestSlots::new();
        for lb in [Balance::LeastConn, Balance::P2c] {
            let c = cluster(&["127.0.0.1:11", "127.0.0.1:12"], lb, &mut slots);
            c.members[0].shm.active.store(10, Relaxed);
            assert!((0..20).all(|_| c.pick(0, 0, 1) == Some(1)), "{lb:?}");
            c.members[0].shm.active.store(0, Relaxed);
        }
    }

    #[test]
    fn consecutive_failures_eject_and_the_cap_holds() {
        let c = cluster(&["127.0.0.1:21", "127.0.0.1:22"], Balance::RoundRobin, &mut TestSlots::new());
        for _ in 0..4 {
            assert_eq!(c.record(0, Outcome::ConnectError, 100), None);
        }
        assert_eq!(c.record(0, Outcome::ConnectError, 100), Some(Duration::from_secs(10)));
        assert!(!c.available(0, 200));
        // 50% cap: the second of two backends may not be ejected now.
        for _ in 0..10 {
            assert_eq!(c.record(1, Outcome::ConnectError, 200), None);
        }
        assert!(c.available(1, 200));
        // One success resets the count window.
        for _ in 0..4 {
            c.record(1, Outcome::ConnectError, 200);
        }
        c.record(1, Outcome::Success, 200);
        assert_eq!(c.members[1].shm.consecutive_failures.load(Relaxed), 0);
    }

    #[test]
    fn slow_start_ramps_weight() {
        let mut cfg = config(&["127.0.0.1:31", "127.0.0.1:32"], Balance::RoundRobin);
        cfg.slow_start = Duration::from_millis(1000);
        let c = Cluster::new(&cfg, &mut Backends::default(), &mut TestSlots::new());
        c.members[1].shm.ramp_start_ms.store(10_000, Relaxed);
        assert_eq!(c.effective_weight(1, 10_000), 10);
        assert_eq!(c.effective_weight(1, 10_500), 55);
        assert_eq!(c.effective_weight(1, 11_000), 100);
        let picks = (0..110).filter(|_| c.pick(0, 0, 10_000) == Some(1)).count();
        assert_eq!(picks, 10, "10% of traffic at the start of the ramp");
    }
}
