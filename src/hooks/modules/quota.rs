//! `quota`: business isolation. Each business key (the route's name, or a
//! header value such as a tenant id) has its own request rate and its own
//! concurrency limit, shared by all workers, so that one business that
//! floods the entry is refused on its own quota and cannot lower the
//! success rate of another.
//!
//! ```toml
//! [modules.quota]
//! key = "header:X-Tenant"     # or "route"
//! rate_per_sec = 100          # per key; 0 = no rate limit
//! burst = 20
//! concurrency = 50            # requests in flight per key; 0 = no limit
//! status = 429
//! ```

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Ctx, Finished, Module, Point, Response, Verdict};
use crate::http::RequestHead;
use crate::shm::{now_ms, LimiterShm, Shared, MAX_LIMITERS};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_key")]
    key: String,
    #[serde(default)]
    rate_per_sec: u64,
    #[serde(default = "default_burst")]
    burst: u64,
    #[serde(default)]
    concurrency: u32,
    #[serde(default = "default_status")]
    status: u16,
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

enum Key {
    Route,
    Header(String),
}

struct Quota {
    s: Settings,
    key: Key,
}

pub fn build(c: &ModuleConfig, _: &Build) -> Result<Arc<dyn Module>, String> {
    let s: Settings = super::settings(&c.settings)?;
    let key = match s.key.as_str() {
        "route" => Key::Route,
        k if k.starts_with("header:") && k.len() > 7 => Key::Header(k[7..].to_string()),
        other => return Err(format!("key = {other:?}: expected \"route\" or \"header:NAME\"")),
    };
    if !(400..=599).contains(&s.status) {
        return Err(format!("status {} must be a 4xx or 5xx", s.status));
    }
    Ok(Arc::new(Quota { s, key }))
}

/// Slots probed for a key before it falls back to the overflow slot.
const PROBES: usize = 32;

/// The shared slot of a business key: open addressing over slots
/// 1..MAX_LIMITERS (slot 0 is the global throttle's), each claimed by the
/// fingerprint of its key, so that two businesses never share a quota.
/// When the table is full, remaining keys share the last slot.
fn slot(shared: &'static Shared, key: &[u8]) -> (usize, &'static LimiterShm) {
    let h = crate::upstream::hash64(&key) | 1; // 0 marks a free slot
    let n_slots = MAX_LIMITERS as u64 - 2; // the last one is the overflow
    let start = h % n_slots;
    for p in 0..PROBES as u64 {
        let n = 1 + ((start + p) % n_slots) as usize;
        let l = &shared.limiters[n];
        match l.key.compare_exchange(0, h, Relaxed, Relaxed) {
            Ok(_) => return (n, l),
            Err(owner) if owner == h => return (n, l),
            Err(_) => {}
        }
    }
    let n = MAX_LIMITERS - 1;
    (n, &shared.limiters[n])
}

impl Module for Quota {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster, Point::RequestFinish]
    }

    fn before_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        let key: &[u8] = match &self.key {
            Key::Route => ctx.route.map_or(b"", |r| r.name.as_bytes()),
            Key::Header(h) => req.head.get(h).unwrap_or(b""),
        };
        let (n, l) = slot(ctx.shared, key);
        if self.s.rate_per_sec > 0 && !l.try_take(self.s.rate_per_sec, self.s.burst, now_ms()) {
            return Verdict::Respond(Response::new(self.s.status).header("Retry-After", "1"));
        }
        if self.s.concurrency > 0 {
            let before = l.enter(ctx.worker);
            if before >= self.s.concurrency {
                l.leave(ctx.worker);
                l.rejected.fetch_add(1, Relaxed);
                return Verdict::Respond(Response::new(self.s.status).header("Retry-After", "1"));
            }
            // Given back at REQUEST_FINISH (slot + 1; 0 = nothing held).
            ctx.vars.set(ctx.module, n as u64 + 1);
        }
        Verdict::Continue
    }

    fn request_finish(&self, _done: &Finished<'_>, ctx: &mut Ctx<'_>) {
        let held = ctx.vars.get(ctx.module);
        if held > 0 {
            ctx.shared.limiters[held as usize - 1].leave(ctx.worker);
            ctx.vars.set(ctx.module, 0);
        }
    }
}
