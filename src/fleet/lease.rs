//! A lease thread of the master: for one fleet-scoped module, takes the
//! tokens of each bucket (the throttle's one, or each active quota key's)
//! from Redis window by window and writes them into the shared leases the
//! workers admit from. One round trip per tick at most, for every bucket
//! together; a tick with nothing to ask makes none.
//!
//! Per bucket and window (`WINDOW_MS` of wall-clock time, numbered the
//! same on every host): the next window's lease is taken ahead, at
//! `PREFETCH_AT_MS` into the current one, sized from the host's recent
//! demand, or, when the fleet asked more than the window holds, from the
//! host's share of the fleet's demand (which every host reports to Redis
//! with that lease); while a window runs, a lease running low is topped
//! up from what the window has left. Unused tokens die with their window.
//!
//! Owns: sizing leases, the thread's Redis state (up, falling back,
//! retrying) and its counters and log lines. Must not: touch workers or
//! the configuration.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::redis::{Ask, Client, Grant};
use super::{Kind, Plan, WINDOW_MS};
use crate::shm::{now_ms, FleetShm, Shared};

/// How often the thread looks at its leases.
pub const TICK: Duration = Duration::from_millis(10);
/// When, into a window, the next window's lease is taken.
pub const PREFETCH_AT_MS: u64 = WINDOW_MS * 2 / 5;
/// Leases are topped up until this far into their window.
const TOP_UP_UNTIL_MS: u64 = WINDOW_MS * 9 / 10;
/// A bucket without a request for this many windows gets no more leases
/// (its requests go to the local share until the thread sees them).
pub const IDLE_WINDOWS: u32 = 20;
/// After a failed round trip, Redis is tried again this much later.
pub const RETRY: Duration = Duration::from_millis(500);
/// Life of the window counters in Redis: long enough for hosts whose
/// clocks differ by a second, short enough that an idle key costs nothing.
const KEY_TTL_MS: u64 = 4 * WINDOW_MS + 2_000;

/// Most a lease asks for beyond the expected demand, as a factor, while
/// the fleet's window has room to spare.
pub const HEADROOM: f64 = 4.0;

/// Tokens of window `k` for `rate_per_sec`: the rate spread over the
/// windows so that every second (and every run of windows) holds exactly
/// `rate_per_sec`, however it divides.
pub fn window_cap(rate_per_sec: u64, k: u64) -> u64 {
    let upto = |k: u64| u128::from(k) * u128::from(rate_per_sec) * u128::from(WINDOW_MS) / 1000;
    (upto(k + 1) - upto(k)) as u64
}

/// Tokens to take ahead for the next window, from the host's expected
/// demand and `share` (this host's demand and the fleet's in the same
/// earlier window): when the fleet asked more than a window holds, the
/// host's share of the window (no more than its demand); when the window
/// has room to spare, the demand with a headroom of half the spare spread
/// by demand (at most [`HEADROOM`] times the demand), so that a burst between
/// two looks of the thread (or a thread kept off its core for a while) is
/// not refused while the fleet has tokens; without news of the fleet, the
/// demand and a half.
pub fn prefetch_size(expected: f64, cap: u64, share: Option<(u64, u64)>) -> u64 {
    let expected = expected.max(1.0);
    let ask = match share {
        Some((mine, fleet)) if fleet > cap => (cap as f64 * mine as f64 / fleet as f64).min(expected),
        // Half the spare (the rest stays for top-ups), rounded down so
        // that the hosts' asks still fit in the window.
        Some((_, fleet)) if fleet > 0 => {
            let spare = cap as f64 / fleet as f64 - 1.0;
            (expected * (1.0 + spare / 2.0).min(HEADROOM)).floor().max(expected)
        }
        _ => expected * 1.5,
    };
    (ask.ceil().max(1.0) as u64).min(cap.max(1))
}

/// Tokens to add to a running lease that has `left`, with `rest_ms` of
/// its window to go, an expected demand of `per_ms`, and `room` tokens
/// left in the fleet's window at the last look: `None` while the lease
/// holds at least half of what the rest of the window should need. With
/// plenty of room (twice the headroom), the need times [`HEADROOM`].
pub fn top_up_size(left: u64, per_ms: f64, rest_ms: u64, demand_now: bool, room: u64) -> Option<u64> {
    let need = per_ms * rest_ms as f64;
    if (left as f64) * 2.0 >= need && !(left == 0 && demand_now) {
        return None;
    }
    let want = if room as f64 >= 2.0 * HEADROOM * need { HEADROOM * need } else { need };
    Some((want.ceil() as u64).saturating_sub(left).max(1))
}

/// What the thread keeps of one bucket.
struct Bucket {
    /// Limiter slot.
    slot: usize,
    /// Owner of the slot when the bucket was made (quota keys).
    fp: u64,
    /// Redis key prefix of the bucket.
    base: Vec<u8>,
    /// Requests (admitted + refused) counted at the last window change.
    seen: u64,
    /// Requests per window, smoothed.
    ewma: f64,
    /// The host's demand of the last windows, newest last: (window, requests).
    history: VecDeque<(u64, u64)>,
    /// The fleet's demand of an earlier window, from the last prefetch:
    /// (window, requests).
    fleet: Option<(u64, u64)>,
    /// Windows in a row without a request.
    idle: u32,
    /// Last window leased ahead.
    prefetched: u64,
    /// A window whose counter Redis said is used up.
    exhausted: u64,
    /// Tokens the fleet's windows had left at their last grant, by the
    /// window's parity (the current and the next): (window, tokens).
    room: [(u64, u64); 2],
}

impl Bucket {
    fn new(slot: usize, fp: u64, base: Vec<u8>, seen: u64) -> Bucket {
        Bucket {
            slot,
            fp,
            base,
            seen,
            ewma: 0.0,
            history: VecDeque::new(),
            fleet: None,
            // Idle until its first window with requests.
            idle: IDLE_WINDOWS,
            prefetched: 0,
            exhausted: u64::MAX,
            room: [(u64::MAX, 0); 2],
        }
    }

    fn key(&self, what: &str, k: u64) -> Vec<u8> {
        let mut v = self.base.clone();
        v.extend_from_slice(format!(":{what}{k}").as_bytes());
        v
    }

    /// The window `k` starts: the last one's demand is in.
    fn roll(&mut self, total: u64, k: u64) {
        let d = if total >= self.seen { total - self.seen } else { total };
        self.seen = total;
        self.ewma = if self.history.is_empty() { d as f64 } else { 0.5 * self.ewma + 0.5 * d as f64 };
        self.history.push_back((k.saturating_sub(1), d));
        while self.history.len() > 6 {
            self.history.pop_front();
        }
        self.idle = if d == 0 { self.idle.saturating_add(1) } else { 0 };
    }

    fn demand_of(&self, k: u64) -> Option<u64> {
        self.history.iter().find(|(w, _)| *w == k).map(|(_, d)| *d)
    }
}

/// A round trip's asks, with what each is for.
struct Planned {
    slot: usize,
    from_ms: u64,
    window: u64,
    prefetch: bool,
}

/// The thread's state.
struct Leaser<'a> {
    plan: &'a Plan,
    shared: &'static Shared,
    counters: &'static FleetShm,
    log: &'a slog::Logger,
    client: Option<Client>,
    retry_at: Instant,
    /// Known state of Redis: `None` before the first round trip.
    up: Option<bool>,
    buckets: HashMap<usize, Bucket>,
    /// Wall-clock ms minus shared-clock ms (kept while it stays close).
    offset: i64,
    window: u64,
}

/// Runs the lease thread of `plan` until `stop` is set.
pub fn run(plan: &Plan, shared: &'static Shared, log: &slog::Logger, stop: &AtomicBool) {
    let mut l = Leaser {
        plan,
        shared,
        counters: &shared.fleet[plan.kind.counters()],
        log,
        client: None,
        retry_at: Instant::now(),
        up: None,
        buckets: HashMap::new(),
        offset: 0,
        window: 0,
    };
    slog::info!(log, "fleet limit: leasing tokens from Redis"; "rate_per_sec" => plan.rate_per_sec,
        "fallback_rate_per_sec" => plan.settings.fallback_rate_per_sec);
    while !stop.load(Relaxed) {
        l.tick();
        std::thread::sleep(TICK);
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Leaser<'_> {
    fn tick(&mut self) {
        let (wall, mono) = (wall_ms(), now_ms());
        let offset = wall as i64 - mono as i64;
        if (offset - self.offset).abs() > 5 {
            self.offset = offset; // Started, or the wall clock was set.
        }
        let wall = (mono as i64 + self.offset) as u64;
        let (k, phase) = (wall / WINDOW_MS, wall % WINDOW_MS);
        let start = (k * WINDOW_MS) as i64 - self.offset; // Window k on the shared clock.
        let Ok(start) = u64::try_from(start) else { return };
        if k != self.window {
            self.window = k;
            self.discover_and_roll(k);
        }
        let mut asks = Vec::new();
        let mut planned = Vec::new();
        let rate = self.plan.rate_per_sec;
        for b in self.buckets.values_mut().filter(|b| b.idle < IDLE_WINDOWS) {
            let l = &self.shared.limiters[b.slot];
            let total = l.admitted.load(Relaxed) + l.rejected.load(Relaxed);
            let now_demand = total.saturating_sub(b.seen);
            // This window: a first lease, or a top-up.
            if phase < TOP_UP_UNTIL_MS && b.exhausted != k {
                let per_ms = (b.ewma / WINDOW_MS as f64).max(now_demand as f64 / phase.max(1) as f64);
                let rest = WINDOW_MS - phase;
                let left = self.shared.leases[b.slot].left(start);
                let size = match left {
                    None if now_demand > 0 || b.ewma > 0.0 => Some((2.0 * per_ms * rest as f64).ceil().max(1.0) as u64),
                    None => None,
                    Some(left) => {
                        let (w, room) = b.room[(k % 2) as usize];
                        let room = if w == k { room } else { 0 };
                        top_up_size(left, per_ms, rest, now_demand > 0, room)
                    }
                };
                if let Some(tokens) = size {
                    asks.push(Ask {
                        counter: b.key("", k),
                        demand_add: b.key("d", k.saturating_sub(1)),
                        demand_read: b.key("d", k.saturating_sub(2)),
                        tokens,
                        cap: window_cap(rate, k),
                        report: None,
                    });
                    planned.push(Planned { slot: b.slot, from_ms: start, window: k, prefetch: false });
                }
            }
            // The next window, ahead of time.
            if phase >= PREFETCH_AT_MS && b.prefetched != k + 1 {
                let cap = window_cap(rate, k + 1);
                let share = b.fleet.and_then(|(w, fleet)| Some((b.demand_of(w)?, fleet)));
                asks.push(Ask {
                    counter: b.key("", k + 1),
                    demand_add: b.key("d", k.saturating_sub(1)),
                    demand_read: b.key("d", k.saturating_sub(2)),
                    tokens: prefetch_size(b.ewma, cap, share),
                    cap,
                    report: Some(b.demand_of(k.saturating_sub(1)).unwrap_or(0)),
                });
                planned.push(Planned { slot: b.slot, from_ms: start + WINDOW_MS, window: k + 1, prefetch: true });
            }
        }
        if asks.is_empty() {
            return;
        }
        let Some(grants) = self.round_trip(&asks) else { return };
        for (p, g) in planned.iter().zip(grants) {
            self.apply(p, g, k);
        }
    }

    fn apply(&mut self, p: &Planned, g: Grant, k: u64) {
        let Some(b) = self.buckets.get_mut(&p.slot) else { return };
        // Plenty of room: twice the headroom of what the host expects.
        let overdraft = g.left as f64 >= 2.0 * HEADROOM * b.ewma.max(1.0);
        self.shared.leases[p.slot].grant(p.from_ms, p.from_ms + WINDOW_MS, g.tokens, overdraft);
        self.counters.tokens_granted.fetch_add(g.tokens, Relaxed);
        if g.left == 0 {
            b.exhausted = p.window;
        }
        b.room[(p.window % 2) as usize] = (p.window, g.left);
        if p.prefetch {
            b.prefetched = p.window;
            b.fleet = Some((k.saturating_sub(2), g.fleet_demand));
        }
    }

    /// At a window change: finds the buckets (the quota's active keys) and
    /// takes in the last window's demand.
    fn discover_and_roll(&mut self, k: u64) {
        let prefix = &self.plan.settings.key_prefix;
        match self.plan.kind {
            Kind::Throttle => {
                let b = self
                    .buckets
                    .entry(0)
                    .or_insert_with(|| Bucket::new(0, 0, format!("{prefix}:throttle").into_bytes(), 0));
                let l = &self.shared.limiters[0];
                b.roll(l.admitted.load(Relaxed) + l.rejected.load(Relaxed), k);
            }
            Kind::Quota { max_keys } => {
                for slot in 1..=max_keys {
                    let l = &self.shared.limiters[slot];
                    let fp = l.key.load(Relaxed);
                    if fp == 0 {
                        continue;
                    }
                    let total = l.admitted.load(Relaxed) + l.rejected.load(Relaxed);
                    if let Some(b) = self.buckets.get_mut(&slot).filter(|b| b.fp == fp) {
                        b.roll(total, k);
                        continue;
                    }
                    // A new key at this slot: its bytes, checked against
                    // the slot's owner (they are written after the claim).
                    let Some(key) = self.shared.leases[slot].key() else { continue };
                    let mut h = self.shared.key_hasher();
                    if h.write(b"quota\0").write(&key).finish() | 1 != fp {
                        continue;
                    }
                    let mut base = format!("{prefix}:quota:").into_bytes();
                    base.extend_from_slice(&key);
                    // Its demand so far counts as the last window's.
                    let mut b = Bucket::new(slot, fp, base, 0);
                    b.roll(total, k);
                    self.buckets.insert(slot, b);
                }
            }
        }
    }

    /// One round trip, or `None` (Redis unreachable, slow, or waiting for
    /// the next retry).
    fn round_trip(&mut self, asks: &[Ask]) -> Option<Vec<Grant>> {
        let s = &self.plan.settings;
        if self.client.is_none() {
            if Instant::now() < self.retry_at {
                return None;
            }
            match Client::connect(&s.redis, s.redis_timeout) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    self.failed(&e);
                    return None;
                }
            }
        }
        let c = self.client.as_mut()?;
        match c.lease(asks, KEY_TTL_MS) {
            Ok(g) => {
                self.counters.round_trips.fetch_add(1, Relaxed);
                if self.up != Some(true) {
                    if self.up == Some(false) {
                        slog::warn!(self.log, "fleet limit: Redis is back; leases in force again");
                    }
                    self.up = Some(true);
                    self.counters.redis_up.store(1, Relaxed);
                }
                Some(g)
            }
            Err(e) => {
                self.client = None;
                self.failed(&e);
                None
            }
        }
    }

    fn failed(&mut self, e: &super::redis::Error) {
        self.counters.redis_errors.fetch_add(1, Relaxed);
        self.retry_at = Instant::now() + RETRY;
        if self.up != Some(false) {
            self.up = Some(false);
            self.counters.redis_up.store(0, Relaxed);
            self.counters.fallbacks.fetch_add(1, Relaxed);
            slog::warn!(self.log, "fleet limit: Redis unreachable or slow; this host falls back to its local share";
                "error" => %e, "fallback_rate_per_sec" => self.plan.settings.fallback_rate_per_sec,
                "retry_every_ms" => RETRY.as_millis() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_caps_add_up_to_the_rate_every_second() {
        for rate in [1, 7, 300, 333, 1_000, 12_345] {
            for start in [0u64, 17_000_000_003] {
                let second: u64 = (start..start + 1000 / WINDOW_MS).map(|k| window_cap(rate, k)).sum();
                assert!(second.abs_diff(rate) <= 1, "rate {rate}: {second} in a second");
                let ten: u64 = (start..start + 10_000 / WINDOW_MS).map(|k| window_cap(rate, k)).sum();
                assert!(ten.abs_diff(rate * 10) <= 1, "rate {rate}: {ten} in ten seconds");
            }
        }
        assert_eq!(window_cap(300, 5), 30);
    }

    #[test]
    fn a_prefetch_asks_the_expected_demand_or_the_hosts_share_when_the_fleet_asks_more() {
        assert_eq!(prefetch_size(12.2, 30, None), 19, "no news of the fleet: the demand and a half");
        assert_eq!(prefetch_size(0.0, 30, None), 2, "at least one token and a half");
        assert_eq!(prefetch_size(80.0, 30, None), 30, "never more than the window");
        // 80/10/10 of a fleet demand of 60 for 30 tokens: 24, 3, 3.
        assert_eq!(prefetch_size(48.0, 30, Some((48, 60))), 24);
        assert_eq!(prefetch_size(6.0, 30, Some((6, 60))), 3);
        assert_eq!(prefetch_size(2.0, 30, Some((6, 60))), 2, "no more than the demand");
        // The fleet asks less than the window holds: the demand and the
        // spare spread by demand, at most twice the demand.
        assert_eq!(prefetch_size(6.0, 30, Some((6, 20))), 7);
        // 2 of a fleet demand of 6 for 10 tokens: 2 each (the spare stays
        // for top-ups).
        assert_eq!(prefetch_size(2.0, 10, Some((2, 6))), 2);
        assert_eq!(prefetch_size(6.0, 1_000, Some((6, 20))), 24, "at most four times");
    }

    #[test]
    fn a_lease_is_topped_up_when_it_holds_less_than_half_the_rest_of_its_need() {
        // 0.3 requests per ms, 50 ms left: 15 needed.
        assert_eq!(top_up_size(10, 0.3, 50, true, 0), None);
        assert_eq!(top_up_size(7, 0.3, 50, true, 20), Some(8));
        assert_eq!(top_up_size(7, 0.3, 50, true, 60), Some(8), "room for less than twice the headroom");
        assert_eq!(top_up_size(7, 0.3, 50, true, 120), Some(53), "room for four times the need");
        assert_eq!(top_up_size(0, 0.0, 50, true, 0), Some(1), "an empty lease with demand");
        assert_eq!(top_up_size(0, 0.0, 50, false, 0), None);
    }
}
