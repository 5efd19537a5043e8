//! Fleet-wide limits: `scope = "fleet"` of the `throttle` and `quota`
//! modules. Every Pitcher of a fleet takes tokens from one Redis in
//! leases, per time window, and its workers admit locally from the lease
//! in shared memory ([`crate::shm::LeaseShm`]): no request ever waits on
//! Redis. A thread of the master takes the leases ([`lease`]); when Redis
//! is unreachable or slow no lease covers the time any more, and workers
//! fall back to the module's local share (`fallback_rate_per_sec`), until
//! the thread reaches Redis again. The algorithm is written down in
//! `docs/ARCHITECTURE.md` ("Fleet limits").
//!
//! Owns: the fleet settings of a module table, the admission from a lease
//! (or the local share), starting and stopping the lease threads as the
//! configuration changes. Must not: block a worker, or be reached from the
//! request path except through [`admit`].

pub mod lease;
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::Config;
use crate::shm::fleet::{Take, FLEET_QUOTA, FLEET_THROTTLE};
use crate::shm::Shared;

/// Length of a lease window: Redis counts the tokens of each window of
/// this many wall-clock milliseconds.
pub const WINDOW_MS: u64 = 100;
/// Default timeout of a connection to Redis and of each round trip.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 50;
/// Bounds of `redis_timeout_ms`: a round trip must fit in a window.
pub const MIN_REDIS_TIMEOUT_MS: u64 = 1;
/// Longest `redis_timeout_ms`.
pub const MAX_REDIS_TIMEOUT_MS: u64 = 80;
/// Default prefix of the Redis keys.
pub const DEFAULT_KEY_PREFIX: &str = "pitcher";
/// The keys of a module table that belong to the fleet scope.
pub const FLEET_KEYS: [&str; 5] = ["scope", "redis", "fallback_rate_per_sec", "redis_timeout_ms", "redis_key_prefix"];

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddr {
    /// `HOST:PORT`.
    Tcp(String, u16),
    /// `unix:/path`.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for RedisAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisAddr::Tcp(h, p) => write!(f, "{h}:{p}"),
            RedisAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl RedisAddr {
    /// Parses `HOST:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<RedisAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("redis = {s:?}: a Unix socket path must be absolute"));
            }
            return Ok(RedisAddr::Unix(p.into()));
        }
        let (host, port) = s.rsplit_once(':').ok_or(format!("redis = {s:?}: expected HOST:PORT or unix:/path"))?;
        let port: u16 = port.parse().map_err(|_| format!("redis = {s:?}: bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(format!("redis = {s:?}: expected HOST:PORT or unix:/path"));
        }
        Ok(RedisAddr::Tcp(host.to_string(), port))
    }
}

/// The fleet part of a `throttle` or `quota` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// The Redis every host of the fleet shares.
    pub redis: RedisAddr,
    /// What this host admits per second (per key, for the quota) when no
    /// lease covers the time: Redis unreachable or slow.
    pub fallback_rate_per_sec: u64,
    /// Timeout of connecting to Redis and of each round trip.
    pub redis_timeout: Duration,
    /// Prefix of the Redis keys (one per fleet sharing a Redis).
    pub key_prefix: String,
}

/// Where a module's limit holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// This host: the workers' shared bucket (the default).
    Host,
    /// Every host that shares the Redis.
    Fleet(FleetSettings),
}

/// Takes the fleet keys out of a module table: the scope, and the table
/// the module parses itself.
pub fn split(table: &toml::Table) -> Result<(Scope, toml::Table), String> {
    let mut rest = table.clone();
    let mut take = |k: &str| rest.remove(k);
    let [scope, redis, fallback, timeout, prefix] = FLEET_KEYS.map(&mut take);
    let scope = match scope {
        None => "host".to_string(),
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err("scope must be \"host\" or \"fleet\"".into()),
    };
    let int = |name: &str, v: Option<toml::Value>| -> Result<Option<u64>, String> {
        match v {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if n >= 0 => Ok(Some(n as u64)),
            Some(_) => Err(format!("{name} must be a non-negative integer")),
        }
    };
    match scope.as_str() {
        "host" => {
            if let Some(k) = [&redis, &fallback, &timeout, &prefix].iter().position(|v| v.is_some()) {
                return Err(format!("{} needs scope = \"fleet\"", FLEET_KEYS[k + 1]));
            }
            Ok((Scope::Host, rest))
        }
        "fleet" => {
            let redis = match redis {
                Some(toml::Value::String(s)) => RedisAddr::parse(&s)?,
                Some(_) => return Err("redis must be a string: \"HOST:PORT\" or \"unix:/path\"".into()),
                None => return Err("scope = \"fleet\" needs redis = \"HOST:PORT\" or \"unix:/path\"".into()),
            };
            let fallback_rate_per_sec = int("fallback_rate_per_sec", fallback)?
                .ok_or("scope = \"fleet\" needs fallback_rate_per_sec (this host's share when Redis is unreachable)")?;
            if fallback_rate_per_sec == 0 || fallback_rate_per_sec > crate::shm::MAX_RATE_PER_SEC {
                return Err(format!(
                    "fallback_rate_per_sec = {fallback_rate_per_sec}: expected 1 to {}",
                    crate::shm::MAX_RATE_PER_SEC
                ));
            }
            let t = int("redis_timeout_ms", timeout)?.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
            if !(MIN_REDIS_TIMEOUT_MS..=MAX_REDIS_TIMEOUT_MS).contains(&t) {
                return Err(format!(
                    "redis_timeout_ms = {t}: expected {MIN_REDIS_TIMEOUT_MS} to {MAX_REDIS_TIMEOUT_MS} (a lease window is {WINDOW_MS} ms)"
                ));
            }
            let key_prefix = match prefix {
                None => DEFAULT_KEY_PREFIX.to_string(),
                Some(toml::Value::String(s)) if !s.is_empty() && s.len() <= 64 => s,
                Some(_) => return Err("redis_key_prefix must be a string of 1 to 64 bytes".into()),
            };
            Ok((
                Scope::Fleet(FleetSettings {
                    redis,
                    fallback_rate_per_sec,
                    redis_timeout: Duration::from_millis(t),
                    key_prefix,
                }),
                rest,
            ))
        }
        other => Err(format!("scope = {other:?}: expected \"host\" or \"fleet\"")),
    }
}

/// Decides one request of a fleet-scoped limiter slot: a token of the
/// lease that covers `now`; or, when none does (Redis unreachable, or the
/// key is new to the lease thread) or it is empty while the fleet's window
/// had plenty of room (a burst faster than the top-ups), the slot's local
/// bucket at the fallback rate. Counts the decision.
#[inline]
pub fn admit(shared: &Shared, module: usize, slot: usize, fallback_rate_per_sec: u64, burst: u64, now: u64) -> bool {
    let l = &shared.limiters[slot];
    match shared.leases[slot].take(now) {
        Take::Token => {
            l.admitted.fetch_add(1, Relaxed);
            true
        }
        Take::Empty => {
            l.rejected.fetch_add(1, Relaxed);
            false
        }
        Take::Overdraft | Take::NoLease => {
            let ok = l.try_take(fallback_rate_per_sec, burst, now);
            let f = &shared.fleet[module];
            if ok { &f.local_admitted } else { &f.local_rejected }.fetch_add(1, Relaxed);
            ok
        }
    }
}

/// What a lease thread serves: a module's fleet limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Which module.
    pub kind: Kind,
    /// The fleet-wide rate (per key, for the quota).
    pub rate_per_sec: u64,
    /// Where and how.
    pub settings: FleetSettings,
}

/// The module a [`Plan`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The global throttle: one bucket (limiter slot 0).
    Throttle,
    /// The quota: one bucket per key, in limiter slots `1..=max_keys`.
    Quota {
        /// The quota's `max_keys`.
        max_keys: usize,
    },
}

impl Kind {
    /// The index of the module's counters in the region.
    pub fn counters(self) -> usize {
        match self {
            Kind::Throttle => FLEET_THROTTLE,
            Kind::Quota { .. } => FLEET_QUOTA,
        }
    }

    /// The module's name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Throttle => "throttle",
            Kind::Quota { .. } => "quota",
        }
    }
}

/// The lease threads a configuration asks for (enabled `throttle` and
/// `quota` tables with `scope = "fleet"`). Tables were validated by the
/// modules already; one that does not parse here gets no thread.
pub fn plans(config: &Config) -> Vec<Plan> {
    let mut out = Vec::new();
    for m in config.modules.iter().filter(|m| m.enabled) {
        let kind = match m.name.as_str() {
            "throttle" => Kind::Throttle,
            "quota" => {
                let max_keys = m.settings.get("max_keys").and_then(toml::Value::as_integer).unwrap_or(1024);
                Kind::Quota { max_keys: max_keys.clamp(1, crate::shm::MAX_QUOTA_KEYS as i64) as usize }
            }
            _ => continue,
        };
        let Ok((Scope::Fleet(settings), _)) = split(&m.settings) else { continue };
        let rate_per_sec = m.settings.get("rate_per_sec").and_then(toml::Value::as_integer).unwrap_or(0);
        if rate_per_sec <= 0 {
            continue;
        }
        out.push(Plan { kind, rate_per_sec: rate_per_sec as u64, settings });
    }
    out
}

/// A running lease thread.
struct Running {
    plan: Plan,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The master's lease threads, one per fleet-scoped module.
#[derive(Default)]
pub struct Leasers {
    running: Vec<Running>,
}

impl Leasers {
    /// Starts, keeps or stops threads to match `config`: a module whose
    /// fleet settings did not change keeps its thread (and its connection).
    pub fn configure(&mut self, config: &Config, shared: &'static Shared, log: &slog::Logger) {
        let plans = plans(config);
        let (keep, gone): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|r| plans.contains(&r.plan));
        for r in gone {
            slog::info!(log, "fleet limit stopped"; "module" => r.plan.kind.name());
            r.stop();
        }
        self.running = keep;
        for plan in plans {
            if self.running.iter().any(|r| r.plan == plan) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let log = log.new(slog::o!("module" => plan.kind.name(), "redis" => plan.settings.redis.to_string()));
            let (p, s, l) = (plan.clone(), stop.clone(), log.clone());
            let thread = std::thread::Builder::new()
                .name(format!("pitcher-lease-{}", plan.kind.name()))
                .spawn(move || lease::run(&p, shared, &l, &s));
            match thread {
                Ok(t) => self.running.push(Running { plan, stop, thread: Some(t) }),
                Err(e) => {
                    slog::error!(log, "cannot start the fleet lease thread; the module uses its local share"; "error" => %e);
                }
            }
        }
    }

    /// Stops every thread (the master exits or hands over to a new one).
    pub fn stop(&mut self) {
        for r in self.running.drain(..) {
            r.stop();
        }
    }
}

impl Drop for Leasers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn fleet_keys_are_split_from_the_module_table() {
        let (scope, rest) = split(&table("rate_per_sec = 5\n")).unwrap();
        assert_eq!(scope, Scope::Host);
        assert_eq!(rest, table("rate_per_sec = 5\n"));
        let (scope, rest) = split(&table(
            "rate_per_sec = 5\nscope = \"fleet\"\nredis = \"unix:/run/r.sock\"\nfallback_rate_per_sec = 2\n",
        ))
        .unwrap();
        let Scope::Fleet(f) = scope else { panic!("fleet") };
        assert_eq!(f.redis, RedisAddr::Unix("/run/r.sock".into()));
        assert_eq!((f.fallback_rate_per_sec, f.redis_timeout.as_millis(), f.key_prefix.as_str()), (2, 50, "pitcher"));
        assert_eq!(rest, table("rate_per_sec = 5\n"));
        let (scope, _) = split(&table(
            "scope = \"fleet\"\nredis = \"[::1]:7000\"\nfallback_rate_per_sec = 2\nredis_timeout_ms = 20\n",
        ))
        .unwrap();
        let Scope::Fleet(f) = scope else { panic!("fleet") };
        assert_eq!((f.redis, f.redis_timeout.as_millis()), (RedisAddr::Tcp("::1".into(), 7000), 20));
    }

    #[test]
    fn bad_fleet_settings_are_refused_with_the_reason() {
        for (t, why) in [
            ("scope = \"world\"", "expected \"host\" or \"fleet\""),
            ("redis = \"127.0.0.1:6379\"", "needs scope = \"fleet\""),
            ("scope = \"fleet\"\nfallback_rate_per_sec = 1", "needs redis"),
            ("scope = \"fleet\"\nredis = \"127.0.0.1:6379\"", "needs fallback_rate_per_sec"),
            ("scope = \"fleet\"\nredis = \"127.0.0.1:6379\"\nfallback_rate_per_sec = 0", "expected 1 to"),
            ("scope = \"fleet\"\nredis = \"127.0.0.1\"\nfallback_rate_per_sec = 1", "HOST:PORT"),
            ("scope = \"fleet\"\nredis = \"unix:r.sock\"\nfallback_rate_per_sec = 1", "absolute"),
            ("scope = \"fleet\"\nredis = \"h:1\"\nfallback_rate_per_sec = 1\nredis_timeout_ms = 500", "window"),
        ] {
            let e = split(&table(t)).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn a_request_takes_from_the_lease_and_falls_back_to_the_local_share_without_one() {
        let r = crate::shm::Region::create().unwrap();
        let s = r.shared();
        // No lease: the local bucket (burst 2, 1/s).
        let local: Vec<bool> = (0..3).map(|_| admit(s, FLEET_THROTTLE, 0, 1, 2, 5_000)).collect();
        assert_eq!(local, [true, true, false]);
        assert_eq!(s.fleet[FLEET_THROTTLE].local_admitted.load(Relaxed), 2);
        assert_eq!(s.fleet[FLEET_THROTTLE].local_rejected.load(Relaxed), 1);
        // A lease of 3 for this window: its tokens, then refusals.
        s.leases[0].grant(5_000, 5_100, 3, false);
        let leased: Vec<bool> = (0..4).map(|_| admit(s, FLEET_THROTTLE, 0, 1, 2, 5_010)).collect();
        assert_eq!(leased, [true, true, true, false]);
        assert_eq!(s.limiters[0].admitted.load(Relaxed), 2 + 3);
        assert_eq!(s.fleet[FLEET_THROTTLE].local_admitted.load(Relaxed), 2, "not the local share");
    }
}
