//! `throttle`: a request-rate limit with burst that is global across all
//! workers: one token bucket in shared memory, refilled from the shared
//! clock, taken with compare-and-swap. Over the limit: 503 (or the
//! configured status, e.g. 429) with `Retry-After`.
//!
//! With `scope = "fleet"` the rate holds for every host sharing a Redis:
//! workers admit from the lease the master's lease thread took for the
//! current window (`crate::fleet`), and from the local bucket at
//! `fallback_rate_per_sec` when no lease covers the time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::fleet::{self, Scope};
use crate::hooks::{Build, Ctx, Module, Point, Response, SettingsError, Verdict};
use crate::http::RequestHead;
use crate::shm::fleet::FLEET_THROTTLE;
use crate::shm::{now_ms, MAX_BURST, MAX_RATE_PER_SEC};

/// Longest `retry_after_secs` accepted (a day).
pub const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// The shared limiter slot of the global throttle.
pub const SLOT: usize = 0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Requests per second, all workers together (all hosts together with
    /// `scope = "fleet"`).
    rate_per_sec: u64,
    /// Requests admitted at once above the rate (of the local bucket).
    #[serde(default = "default_burst")]
    burst: u64,
    /// Status of a refused request.
    #[serde(default = "default_status")]
    status: u16,
    /// `Retry-After` of a refused request.
    #[serde(default = "default_retry_after")]
    retry_after_secs: u64,
}

fn default_burst() -> u64 {
    1
}
fn default_status() -> u16 {
    503
}
fn default_retry_after() -> u64 {
    1
}

struct Throttle {
    s: Settings,
    /// The answer to a refused request (with its `Retry-After`), built once.
    refusal: Arc<Response>,
    /// `Some(fallback_rate_per_sec)` with `scope = "fleet"`.
    fleet_fallback: Option<u64>,
}

pub fn build(c: &ModuleConfig, _: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let (scope, table) = fleet::split(&c.settings).map_err(SettingsError::from)?;
    let s: Settings = super::settings(&table).map_err(super::mention_fleet_keys)?;
    if s.rate_per_sec == 0 {
        return Err("rate_per_sec must be at least 1".into());
    }
    if !(400..=599).contains(&s.status) {
        return Err(format!("status {} must be a 4xx or 5xx", s.status).into());
    }
    super::at_most("rate_per_sec", s.rate_per_sec, MAX_RATE_PER_SEC)?;
    super::at_most("burst", s.burst, MAX_BURST)?;
    super::at_most("retry_after_secs", s.retry_after_secs, MAX_RETRY_AFTER_SECS)?;
    let fleet_fallback = match scope {
        Scope::Host => None,
        Scope::Fleet(f) => Some(f.fallback_rate_per_sec),
    };
    let refusal = Arc::new(Response::new(s.status).header("Retry-After", &s.retry_after_secs.to_string()));
    Ok(Arc::new(Throttle { s, refusal, fleet_fallback }))
}

impl Module for Throttle {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster]
    }

    fn before_cluster(&self, _req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        let l = &ctx.shared.limiters[SLOT];
        let admitted = match self.fleet_fallback {
            None => l.try_take(self.s.rate_per_sec, self.s.burst, now_ms()),
            Some(fallback) => fleet::admit(ctx.shared, FLEET_THROTTLE, SLOT, fallback, self.s.burst, now_ms()),
        };
        if admitted {
            return Verdict::Continue;
        }
        if l.rejected.load(Relaxed) % 1000 == 1 {
            slog::info!(ctx.log, "throttling"; "rate_per_sec" => self.s.rate_per_sec, "rejected" => l.rejected.load(Relaxed));
        }
        Verdict::Respond(self.refusal.clone())
    }
}
