//! `degrade`: automatic degradation under overload.
//!
//! Each worker measures its own load every tick (100 ms): the share of
//! time its event loop was busy (not waiting in `epoll_wait`) and the
//! number of requests in flight. Overload is declared only when it lasts:
//! for the whole `window_ms` (time window) or over `window_requests`
//! requests in a row (count window) — a short spike is not overload.
//!
//! * Level 1: non-essential modules (`essential = false`) are switched off
//!   in this worker.
//! * Level 2 (load over the `shed_*` thresholds for a window): requests of
//!   routes with `priority = "low"` are answered 503 by this module.
//!
//! The level drops back to 0 only after the load stayed under the lower
//! `*_low` thresholds for `restore_ms` (hysteresis, so it does not flap).
//! Every change is logged and published in shared memory for `pitcher ctl`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Ctx, Module, Point, Response, SettingsError, Verdict};
use crate::http::RequestHead;

/// The `[modules.degrade]` settings; the worker's overload controller reads them too.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DegradeSettings {
    /// Event-loop busy share, in percent, that counts as overload.
    #[serde(default = "d_busy_high")]
    pub busy_high_percent: u32,
    /// Busy share under which the worker counts as recovered.
    #[serde(default = "d_busy_low")]
    pub busy_low_percent: u32,
    /// Requests in flight in a worker that count as overload.
    #[serde(default = "d_in_flight_high")]
    pub in_flight_high: u32,
    /// Requests in flight under which the worker counts as recovered.
    #[serde(default = "d_in_flight_low")]
    pub in_flight_low: u32,
    /// Busy share at which low-priority routes are shed (level 2).
    #[serde(default = "d_shed_busy")]
    pub shed_busy_percent: u32,
    /// Requests in flight at which low-priority routes are shed (level 2).
    #[serde(default = "d_shed_in_flight")]
    pub shed_in_flight: u32,
    /// Time window: overload must last this long to raise the level.
    #[serde(default = "d_window_ms")]
    pub window_ms: u64,
    /// Count window: this many requests in a row seen while overloaded
    /// (0: only the time window).
    #[serde(default)]
    pub window_requests: u64,
    /// Time under the `*_low` thresholds before the level goes back to 0.
    #[serde(default = "d_restore_ms")]
    pub restore_ms: u64,
    /// Status of a shed request.
    #[serde(default = "d_status")]
    pub status: u16,
}

fn d_busy_high() -> u32 {
    85
}
fn d_busy_low() -> u32 {
    60
}
fn d_in_flight_high() -> u32 {
    5000
}
fn d_in_flight_low() -> u32 {
    2500
}
fn d_shed_busy() -> u32 {
    95
}
fn d_shed_in_flight() -> u32 {
    8000
}
fn d_window_ms() -> u64 {
    2000
}
fn d_restore_ms() -> u64 {
    5000
}
fn d_status() -> u16 {
    503
}

impl DegradeSettings {
    /// The settings of an enabled `[modules.degrade]` table, if any.
    pub fn from_config(c: &crate::config::Config) -> Option<DegradeSettings> {
        let m = c.modules.iter().find(|m| m.name == "degrade" && m.enabled)?;
        super::settings(&m.settings).ok()
    }

    fn check(&self) -> Result<(), SettingsError> {
        if self.busy_low_percent > self.busy_high_percent || self.in_flight_low > self.in_flight_high {
            return Err("the *_low thresholds must not exceed the *_high ones".into());
        }
        if self.shed_busy_percent < self.busy_high_percent || self.shed_in_flight < self.in_flight_high {
            return Err("the shed_* thresholds must be at least the *_high ones".into());
        }
        if self.window_ms == 0 && self.window_requests == 0 {
            return Err("window_ms or window_requests must be set".into());
        }
        Ok(())
    }
}

struct Degrade {
    /// The answer to a shed request, built once.
    refusal: Arc<Response>,
}

pub fn build(c: &ModuleConfig, _: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let s: DegradeSettings = super::settings(&c.settings)?;
    s.check()?;
    Ok(Arc::new(Degrade { refusal: Arc::new(Response::new(s.status).header("Retry-After", "1")) }))
}

impl Module for Degrade {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster]
    }

    fn before_cluster(&self, _req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        if ctx.load_level >= 2 && ctx.route.is_some_and(|r| r.low_priority) {
            crate::shm::metrics::add(&crate::shm::metrics::here().shed, 1);
            return Verdict::Respond(self.refusal.clone());
        }
        Verdict::Continue
    }
}

/// One worker's overload detector (driven by the worker's loop).
#[derive(Debug)]
pub struct Controller {
    s: DegradeSettings,
    /// The current level: 0 normal, 1 non-essential modules off, 2 shedding.
    pub level: u32,
    /// Since when the load has been at least level 1 / level 2 / calm.
    over_since: Option<Instant>,
    critical_since: Option<Instant>,
    calm_since: Option<Instant>,
    /// Requests seen in a row while overloaded / critical (count window).
    over_requests: u64,
    critical_requests: u64,
    overloaded: bool,
    critical: bool,
}

impl Controller {
    /// A controller at level 0.
    pub fn new(s: DegradeSettings) -> Controller {
        Controller {
            s,
            level: 0,
            over_since: None,
            critical_since: None,
            calm_since: None,
            over_requests: 0,
            critical_requests: 0,
            overloaded: false,
            critical: false,
        }
    }

    /// New settings after a reload; the current level is kept.
    pub fn update(&mut self, s: DegradeSettings) {
        self.s = s;
    }

    /// A load sample; returns the new level when it changed.
    pub fn sample(&mut self, now: Instant, busy_percent: u32, in_flight: u32) -> Option<u32> {
        let s = &self.s;
        self.overloaded = busy_percent >= s.busy_high_percent || in_flight >= s.in_flight_high;
        self.critical = busy_percent >= s.shed_busy_percent || in_flight >= s.shed_in_flight;
        let calm = busy_percent < s.busy_low_percent && in_flight < s.in_flight_low;
        track(&mut self.over_since, self.overloaded, now, &mut self.over_requests);
        track(&mut self.critical_since, self.critical, now, &mut self.critical_requests);
        let mut none = 0;
        track(&mut self.calm_since, calm, now, &mut none);
        self.decide(now)
    }

    /// A request arrived (count window).
    pub fn request(&mut self, now: Instant) -> Option<u32> {
        if self.s.window_requests == 0 {
            return None;
        }
        if self.overloaded {
            self.over_requests += 1;
        }
        if self.critical {
            self.critical_requests += 1;
        }
        self.decide(now)
    }

    fn decide(&mut self, now: Instant) -> Option<u32> {
        let window = Duration::from_millis(self.s.window_ms);
        let s = &self.s;
        let lasted = |since: Option<Instant>, count: u64| {
            since.is_some_and(|t| s.window_ms > 0 && now.duration_since(t) >= window)
                || (s.window_requests > 0 && count >= s.window_requests)
        };
        let restored = self.calm_since.is_some_and(|t| now.duration_since(t) >= Duration::from_millis(s.restore_ms));
        let target = if lasted(self.critical_since, self.critical_requests) {
            2
        } else if lasted(self.over_since, self.over_requests) {
            self.level.max(1)
        } else if restored {
            0
        } else {
            self.level
        };
        // Levels go down only after the load stayed calm for restore_ms.
        let target = if target < self.level && !restored { self.level } else { target };
        if target != self.level {
            self.level = target;
            return Some(target);
        }
        None
    }
}

fn track(since: &mut Option<Instant>, on: bool, now: Instant, count: &mut u64) {
    if on {
        since.get_or_insert(now);
    } else {
        *since = None;
        *count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DegradeSettings {
        super::super::settings(&toml::toml! {
            in_flight_high = 10
            in_flight_low = 5
            shed_in_flight = 20
            window_ms = 1000
            restore_ms = 2000
        })
        .unwrap()
    }

    #[test]
    fn a_spike_is_not_overload_and_restore_waits() {
        let mut c = Controller::new(settings());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(c.sample(at(0), 0, 50), None);
        assert_eq!(c.sample(at(500), 0, 3), None, "a 500 ms spike");
        assert_eq!(c.sample(at(600), 0, 12), None);
        assert_eq!(c.sample(at(1700), 0, 12), Some(1));
        assert_eq!(c.sample(at(1800), 0, 25), None);
        assert_eq!(c.sample(at(2900), 0, 25), Some(2));
        assert_eq!(c.sample(at(3000), 0, 7), None, "between low and high: stays");
        assert_eq!(c.sample(at(4000), 0, 1), None);
        assert_eq!(c.sample(at(5900), 0, 1), None);
        assert_eq!(c.sample(at(6100), 0, 1), Some(0));
    }
}
