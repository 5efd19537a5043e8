//! `quota`: business isolation. Each business key (the route's name, or a
//! header value such as a tenant id) has its own request rate and its own
//! concurrency limit, shared by all workers, so that one business that
//! floods the entry is refused on its own quota and cannot lower the
//! success rate of another.
//!
//! Keys take slots of the shared limiter table (one bucket and one
//! concurrency count per key). A flood of distinct keys cannot keep them:
//! a slot whose key has nothing in flight and no request for `key_idle_ms`
//! is taken over by the next new key that probes it (compare-and-swap), so
//! a legitimate new tenant gets its own limits once the flood's keys go
//! idle. A request whose key finds no slot shares the overflow slot's
//! limits with every other such key, and is counted (`ctl modules`).
//!
//! ```toml
//! [modules.quota]
//! key = "header:X-Tenant"     # or "route"
//! rate_per_sec = 100          # per key; 0 = no rate limit
//! burst = 20
//! concurrency = 50            # requests in flight per key; 0 = no limit
//! status = 429
//! max_keys = 1024             # slots for keys (1 to 4094)
//! key_idle_ms = 60000         # a slot idle this long can go to a new key
//! ```
//!
//! With `scope = "fleet"` (and `redis`, `fallback_rate_per_sec`), each
//! key's `rate_per_sec` holds for every host sharing the Redis: workers
//! admit from the key's lease (`crate::fleet`), taken by the master's
//! lease thread for the keys that have requests, and from the key's local
//! bucket at `fallback_rate_per_sec` when no lease covers the time (Redis
//! unreachable, or the key's first requests). `concurrency` stays per host.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::fleet::{self, Scope};
use crate::hooks::{Build, Ctx, Finished, Module, Point, Response, SettingsError, Verdict};
use crate::http::RequestHead;
use crate::shm::fleet::FLEET_QUOTA;
use crate::shm::{now_ms, KeyHasher, Shared, MAX_BURST, MAX_QUOTA_KEYS, MAX_RATE_PER_SEC, QUOTA_OVERFLOW_SLOT};

/// Largest `concurrency` accepted.
pub const MAX_CONCURRENCY: u32 = 10_000_000;
/// Shortest and longest `key_idle_ms` accepted.
pub const MIN_KEY_IDLE_MS: u64 = 100;
pub const MAX_KEY_IDLE_MS: u64 = 86_400_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// `route`, or `header:NAME`.
    #[serde(default = "default_key")]
    key: String,
    /// Requests per second per key (0: no rate limit).
    #[serde(default)]
    rate_per_sec: u64,
    /// Requests a key may send at once above its rate.
    #[serde(default = "default_burst")]
    burst: u64,
    /// Requests in flight per key (0: no limit).
    #[serde(default)]
    concurrency: u32,
    /// Status of a refused request.
    #[serde(default = "default_status")]
    status: u16,
    /// Keys that can have a slot (and so limits) of their own at once.
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    /// A key's slot with nothing in flight and no request for this long
    /// may be taken by a new key.
    #[serde(default = "default_key_idle_ms")]
    key_idle_ms: u64,
}

fn default_key() -> String {
    "route".into()
}
fn default_burst() -> u64 {
    10
}
fn default_status() -> u16 {
    429
}
fn default_max_keys() -> usize {
    1024
}
fn default_key_idle_ms() -> u64 {
    60_000
}

enum Key {
    Route,
    Header(String),
}

struct Quota {
    s: Settings,
    key: Key,
    /// The region's key hash with this module's prefix already written.
    hasher: KeyHasher,
    /// `Some(fallback_rate_per_sec)` with `scope = "fleet"`.
    fleet_fallback: Option<u64>,
    /// The answer to a refused request, built once.
    refusal: Arc<Response>,
}

pub fn build(c: &ModuleConfig, b: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let (scope, table) = fleet::split(&c.settings).map_err(SettingsError::from)?;
    let s: Settings = super::settings(&table).map_err(super::mention_fleet_keys)?;
    let key = match s.key.as_str() {
        "route" => Key::Route,
        k if k.starts_with("header:") && k.len() > 7 => Key::Header(k[7..].to_string()),
        other => return Err(format!("key = {other:?}: expected \"route\" or \"header:NAME\"").into()),
    };
    if !(400..=599).contains(&s.status) {
        return Err(format!("status {} must be a 4xx or 5xx", s.status).into());
    }
    super::at_most("rate_per_sec", s.rate_per_sec, MAX_RATE_PER_SEC)?;
    super::at_most("burst", s.burst, MAX_BURST)?;
    super::at_most("concurrency", u64::from(s.concurrency), u64::from(MAX_CONCURRENCY))?;
    if !(1..=MAX_QUOTA_KEYS).contains(&s.max_keys) {
        return Err(format!("max_keys = {}: expected 1 to {MAX_QUOTA_KEYS}", s.max_keys).into());
    }
    if !(MIN_KEY_IDLE_MS..=MAX_KEY_IDLE_MS).contains(&s.key_idle_ms) {
        return Err(format!("key_idle_ms = {}: expected {MIN_KEY_IDLE_MS} to {MAX_KEY_IDLE_MS}", s.key_idle_ms).into());
    }
    let fleet_fallback = match scope {
        Scope::Host => None,
        Scope::Fleet(_) if s.rate_per_sec == 0 => {
            return Err("scope = \"fleet\" needs a rate_per_sec (the fleet-wide rate of each key)".into())
        }
        Scope::Fleet(f) => Some(f.fallback_rate_per_sec),
    };
    let mut hasher = b.shared.key_hasher();
    hasher.write(b"quota\0");
    let refusal = Arc::new(Response::new(s.status).header("Retry-After", "1"));
    Ok(Arc::new(Quota { s, key, hasher, fleet_fallback, refusal }))
}

/// Slots probed for a key before it falls back to the overflow slot.
const PROBES: usize = 32;

/// The shared slot of a business key: open addressing over slots
/// 1..=`max_keys` (slot 0 is the global throttle's), each claimed by the
/// fingerprint of its key, so that two businesses never share a quota.
/// A key's slot is found first among its probes; else it takes the first
/// free one, or the first whose key is idle (nothing in flight, unused for
/// `idle_ms`). `None`: every probed slot is busy (the caller counts an
/// overflow). Keys never give a slot back to "free" (they are replaced),
/// so a free slot ends a key's probe sequence. Two workers that see a new
/// key at once take the same slot (the compare-and-swap loser finds its
/// own key there), unless the table changed between their looks: then the
/// key may hold two slots for a while, and the one not found first goes
/// idle and is taken over.
/// A slot claimed by a key gets the key's bytes published for the fleet
/// lease thread (and its old key's leases dropped).
fn find_slot(shared: &Shared, fp: u64, key: &[u8], max_keys: usize, idle_ms: u64, now: u64) -> Option<usize> {
    let n_slots = max_keys.clamp(1, MAX_QUOTA_KEYS) as u64;
    let start = fp % n_slots;
    let mut candidate = None;
    for p in 0..PROBES.min(max_keys) as u64 {
        let i = 1 + ((start + p) % n_slots) as usize;
        let l = &shared.limiters[i];
        let owner = l.key.load(Relaxed);
        if owner == fp {
            if l.used_ms.load(Relaxed) != now {
                l.used_ms.store(now, Relaxed);
            }
            return Some(i);
        }
        if owner == 0 {
            candidate.get_or_insert((i, 0));
            break;
        }
        let idle = l.in_flight.load(Relaxed) == 0 && now.saturating_sub(l.used_ms.load(Relaxed)) >= idle_ms;
        if idle && candidate.is_none() {
            candidate = Some((i, owner));
        }
    }
    let (i, owner) = candidate?;
    let l = &shared.limiters[i];
    match l.key.compare_exchange(owner, fp, Relaxed, Relaxed) {
        Ok(_) => {
            if owner != 0 {
                l.reset_for_new_key(now);
                shared.quota.reclaimed.fetch_add(1, Relaxed);
            } else {
                l.used_ms.store(now, Relaxed);
            }
            shared.leases[i].clear();
            shared.leases[i].set_key(key);
            Some(i)
        }
        Err(x) if x == fp => Some(i),
        Err(_) => None,
    }
}

impl Quota {
    /// The quota's decision for one request.
    fn admit(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        let key: &[u8] = match &self.key {
            Key::Route => ctx.route.map_or(b"", |r| r.name.as_bytes()),
            Key::Header(h) => req.head.get(h).unwrap_or(b""),
        };
        let fp = self.hasher.clone().write(key).finish() | 1; // 0 marks a free slot
        let now = now_ms();
        let shared = ctx.shared;
        // A slot taken over by another key between finding it and entering
        // it is not ours: leave it and look again (a few times at most).
        for _ in 0..4 {
            let n = match find_slot(shared, fp, key, self.s.max_keys, self.s.key_idle_ms, now) {
                Some(n) => n,
                None => {
                    shared.quota.overflow.fetch_add(1, Relaxed);
                    QUOTA_OVERFLOW_SLOT
                }
            };
            let l = &shared.limiters[n];
            // Entering first pins the slot: a slot with a request in flight
            // is never taken over.
            let before = if self.s.concurrency > 0 { Some(shared.limiter_enter(n, ctx.worker)) } else { None };
            if n != QUOTA_OVERFLOW_SLOT && l.key.load(Relaxed) != fp {
                if before.is_some() {
                    shared.limiter_leave(n, ctx.worker);
                }
                continue;
            }
            let admitted = match self.fleet_fallback {
                _ if self.s.rate_per_sec == 0 => true,
                None => l.try_take(self.s.rate_per_sec, self.s.burst, now),
                Some(fallback) => fleet::admit(shared, FLEET_QUOTA, n, fallback, self.s.burst, now),
            };
            if !admitted {
                if before.is_some() {
                    shared.limiter_leave(n, ctx.worker);
                }
                return self.refuse();
            }
            if let Some(before) = before {
                if before >= self.s.concurrency {
                    shared.limiter_leave(n, ctx.worker);
                    l.rejected.fetch_add(1, Relaxed);
                    return self.refuse();
                }
                // Given back at REQUEST_FINISH (slot + 1; 0 = nothing held).
                ctx.vars.set(ctx.module, n as u64 + 1);
            }
            return Verdict::Continue;
        }
        // Slots changing hands under our feet four times: count it with
        // the overflow and refuse rather than spin.
        shared.quota.overflow.fetch_add(1, Relaxed);
        self.refuse()
    }

    fn refuse(&self) -> Verdict {
        Verdict::Respond(self.refusal.clone())
    }
}

impl Module for Quota {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster, Point::RequestFinish]
    }

    fn before_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        let verdict = self.admit(req, ctx);
        let q = &ctx.shared.quota;
        match verdict {
            Verdict::Continue => q.admitted.fetch_add(1, Relaxed),
            _ => q.rejected.fetch_add(1, Relaxed),
        };
        verdict
    }
    fn request_finish(&self, _done: &Finished<'_>, ctx: &mut Ctx<'_>) {
        let held = ctx.vars.get(ctx.module);
        if held > 0 {
            ctx.shared.limiter_leave(held as usize - 1, ctx.worker);
            ctx.vars.set(ctx.module, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Region;

    fn fp(s: &Shared, key: &str) -> u64 {
        s.key_hasher().write(b"quota\0").write(key.as_bytes()).finish() | 1
    }

    #[test]
    fn a_flood_of_keys_overflows_then_its_idle_slots_go_to_new_keys() {
        let r = Region::create().unwrap();
        let s = r.shared();
        let (max_keys, idle) = (16, 1_000);
        let mut t = 10_000;
        let mut overflow = 0;
        for k in 0..500 {
            if find_slot(s, fp(s, &format!("flood-{k}")), b"", max_keys, idle, t).is_none() {
                overflow += 1;
            }
        }
        assert!(overflow >= 500 - 16, "{overflow} overflowed");
        assert_eq!(find_slot(s, fp(s, "tenant"), b"tenant", max_keys, idle, t), None, "every slot is busy");
        // A slot with a request in flight is never taken over.
        let pinned = (1..=16).find(|&i| s.limiters[i].key.load(Relaxed) != 0).unwrap();
        s.limiter_enter(pinned, 0);
        t += idle;
        let mine = find_slot(s, fp(s, "tenant"), b"tenant", max_keys, idle, t).expect("an idle slot");
        assert_ne!(mine, pinned);
        assert_eq!(s.limiters[mine].key.load(Relaxed), fp(s, "tenant"));
        assert_eq!(find_slot(s, fp(s, "tenant"), b"tenant", max_keys, idle, t), Some(mine), "found again");
        assert_eq!(s.quota.reclaimed.load(Relaxed), 1);
        let other = find_slot(s, fp(s, "other"), b"other", max_keys, idle, t).expect("another idle slot");
        assert_ne!(other, mine);
        assert!((1..=16).contains(&other) && (1..=16).contains(&mine));
    }

    #[test]
    fn a_reclaimed_slot_starts_with_a_full_bucket() {
        let r = Region::create().unwrap();
        let s = r.shared();
        let a = find_slot(s, fp(s, "a"), b"a", 1, 100, 1_000).unwrap();
        while s.limiters[a].try_take(1, 3, 1_000) {}
        assert_eq!(find_slot(s, fp(s, "b"), b"b", 1, 100, 1_050), None, "a is not idle yet");
        let b = find_slot(s, fp(s, "b"), b"b", 1, 100, 1_100).unwrap();
        assert_eq!(a, b);
        let taken = (0..10).filter(|_| s.limiters[b].try_take(1, 3, 1_100)).count();
        assert_eq!(taken, 3, "b's own burst, not a's empty bucket");
    }
}
