//! `/metrics`: the figures of the shared region (`shm::metrics`, summed
//! over every worker place), of the backends' shared state, of the modules
//! and of the processes, written in the Prometheus text exposition format
//! (0.0.4) or in OpenMetrics 1.0 when the scraper asks for it.
//!
//! Label values come from the configuration (route, cluster and module
//! names, backend addresses) and from small fixed sets (status class,
//! timeout kind, failure kind, worker slot): never from a request, so the
//! number of series is bounded by the configuration.
//!
//! Owns: the names, help texts and types of every family, and the two
//! text formats. Must not: serve sockets (the master's `admin` does), or
//! write to the region.

pub mod process;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::Config;
use crate::shm::metrics::{
    Histogram, SeriesKind, TimeoutKind, WorkerMetrics, BUCKETS_US, HIST_SLOTS, MAX_CLUSTER_SERIES, MAX_ROUTE_SERIES,
    STATUS_CLASSES,
};
use crate::shm::{BackendShm, Shared, SlotTable, ACCOUNTED_WORKERS, MAX_QUOTA_KEYS};
use crate::upstream::backend_state;

/// Which text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text exposition format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: &str) -> Format {
        if accept.to_ascii_lowercase().contains("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A worker process as the master knows it.
#[derive(Debug, Clone, Copy)]
pub struct WorkerInfo {
    /// Its slot among the master's `workers`.
    pub slot: usize,
    /// Its place in the shared per-worker tables.
    pub place: usize,
    /// Its pid.
    pub pid: u32,
}

/// What the master hands the renderer.
#[derive(Debug)]
pub struct View<'a> {
    /// The shared region.
    pub shared: &'static Shared,
    /// The configuration being served (names of routes, clusters, backends).
    pub config: &'a Config,
    /// Which slot each backend address has.
    pub backends: &'a SlotTable,
    /// The master's workers (live ones).
    pub workers: Vec<WorkerInfo>,
    /// Control-socket connections refused, by reason.
    pub refusals: Vec<(&'static str, u64)>,
    /// Admin requests refused, by reason.
    pub admin_refusals: Vec<(&'static str, u64)>,
}

/// The kind of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The text being written.
struct Out {
    text: String,
    format: Format,
}

impl Out {
    /// HELP and TYPE of a family. `name` is the family's name: for a
    /// counter, without `_total` (added to its samples).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (type_name, kind_name) = match (kind, self.format) {
            (Kind::Counter, Format::Prometheus) => (format!("{name}_total"), "counter"),
            (Kind::Counter, Format::OpenMetrics) => (name.to_string(), "counter"),
            (Kind::Gauge, _) => (name.to_string(), "gauge"),
            (Kind::Histogram, _) => (name.to_string(), "histogram"),
        };
        let _ = writeln!(self.text, "# HELP {type_name} {help}");
        let _ = writeln!(self.text, "# TYPE {type_name} {kind_name}");
    }

    /// One sample: `name{labels} value`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_into(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A counter sample (`name` is the family's name).
    fn counter(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample(&format!("{name}_total"), labels, value);
    }

    /// A histogram's samples from per-bucket counts (accumulated here).
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], buckets: &[u64; HIST_SLOTS], sum_us: u64) {
        let mut cum = 0;
        let bucket = format!("{name}_bucket");
        for (i, n) in buckets.iter().enumerate() {
            cum += n;
            let le = match BUCKETS_US.get(i) {
                Some(&us) => seconds(us),
                None => "+Inf".to_string(),
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cum);
        }
        self.sample(&format!("{name}_sum"), labels, seconds(sum_us));
        self.sample(&format!("{name}_count"), labels, cum);
    }
}

/// Microseconds as seconds, without trailing zeros (`0.0025`, `1.0`).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return format!("{whole}.0");
    }
    let f = format!("{frac:06}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn sum(blocks: &[WorkerMetrics], f: impl Fn(&WorkerMetrics) -> &AtomicU64) -> u64 {
    blocks.iter().map(|b| f(b).load(Relaxed)).fold(0u64, u64::wrapping_add)
}

/// Per-bucket counts and the sum of one histogram over every block.
fn hist_sum<'b>(hists: impl Iterator<Item = &'b Histogram>) -> ([u64; HIST_SLOTS], u64) {
    let mut buckets = [0u64; HIST_SLOTS];
    let mut total = 0u64;
    for h in hists {
        for (acc, b) in buckets.iter_mut().zip(&h.buckets) {
            *acc = acc.wrapping_add(b.load(Relaxed));
        }
        total = total.wrapping_add(h.sum_us.load(Relaxed));
    }
    (buckets, total)
}

/// Picks one counter of a worker block.
type BlockCounter = fn(&WorkerMetrics) -> &AtomicU64;
/// Reads one counter of a backend.
type BackendCounter = fn(&BackendShm) -> u64;

/// Status class label of index `i`.
const CODES: [&str; STATUS_CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The series of requests that had no route or cluster.
const NONE_LABEL: &str = "(none)";
/// The series shared by names that found their table full.
const OTHER_LABEL: &str = "(other)";

/// The whole exposition.
pub fn render(v: &View<'_>, format: Format) -> String {
    let mut o = Out { text: String::with_capacity(64 * 1024), format };
    let m = &v.shared.metrics;
    let blocks = m.used_blocks();
    let hasher = v.shared.key_hasher();

    // Requests by route.
    let mut routes: Vec<(String, usize)> = vec![(NONE_LABEL.into(), 0)];
    let mut routes_in_other = 0u64;
    for r in &v.config.routes {
        match m.find_series(&hasher, SeriesKind::Route, &r.name) {
            Some(s) => routes.push((r.name.clone(), s)),
            None => routes_in_other += 1,
        }
    }
    routes.push((OTHER_LABEL.into(), MAX_ROUTE_SERIES - 1));
    o.family("pitcher_route_requests", Kind::Counter, "Requests answered, by route and status class.");
    for (name, s) in &routes {
        for (c, code) in CODES.iter().enumerate() {
            let n = blocks.iter().map(|b| b.routes[*s][c].load(Relaxed)).fold(0u64, u64::wrapping_add);
            o.counter("pitcher_route_requests", &[("route", name), ("code", code)], n);
        }
    }
    o.family(
        "pitcher_route_info",
        Kind::Gauge,
        "The clusters each route of the configuration sends to (always 1; every cluster of a split; an empty cluster for redirects and fixed responses).",
    );
    for r in &v.config.routes {
        let arms: &[crate::config::SplitArm] = match &r.action {
            crate::config::Action::Proxy { arms, .. } => arms,
            crate::config::Action::Redirect { .. } | crate::config::Action::Return { .. } => &[],
        };
        if arms.is_empty() {
            o.sample("pitcher_route_info", &[("route", &r.name), ("cluster", "")], 1);
        }
        for a in arms {
            let cluster = v.config.clusters.get(a.cluster).map_or("", |c| c.name.as_str());
            o.sample("pitcher_route_info", &[("route", &r.name), ("cluster", cluster)], 1);
        }
    }

    // Requests, durations by cluster.
    let mut clusters: Vec<(String, usize)> = vec![(NONE_LABEL.into(), 0)];
    let mut clusters_in_other = 0u64;
    for c in &v.config.clusters {
        match m.find_series(&hasher, SeriesKind::Cluster, &c.name) {
            Some(s) => clusters.push((c.name.clone(), s)),
            None => clusters_in_other += 1,
        }
    }
    clusters.push((OTHER_LABEL.into(), MAX_CLUSTER_SERIES - 1));
    o.family(
        "pitcher_series_in_other",
        Kind::Gauge,
        "Routes and clusters of the configuration without a series of their own (more names than the shared region has series, or not served yet): their requests count in route=\"(other)\" / cluster=\"(other)\".",
    );
    o.sample("pitcher_series_in_other", &[("table", "route")], routes_in_other);
    o.sample("pitcher_series_in_other", &[("table", "cluster")], clusters_in_other);
    o.family("pitcher_cluster_requests", Kind::Counter, "Requests answered, by cluster and status class.");
    for (name, s) in &clusters {
        for (c, code) in CODES.iter().enumerate() {
            let n = blocks.iter().map(|b| b.clusters[*s].codes[c].load(Relaxed)).fold(0u64, u64::wrapping_add);
            o.counter("pitcher_cluster_requests", &[("cluster", name), ("code", code)], n);
        }
    }
    o.family(
        "pitcher_request_duration_seconds",
        Kind::Histogram,
        "From the first byte of a request to the last byte of its response, by cluster.",
    );
    for (name, s) in &clusters {
        let (b, total) = hist_sum(blocks.iter().map(|b| &b.clusters[*s].duration));
        o.histogram("pitcher_request_duration_seconds", &[("cluster", name)], &b, total);
    }
    o.family(
        "pitcher_upstream_response_seconds",
        Kind::Histogram,
        "From sending a request to a backend to the end of its response, by cluster.",
    );
    for (name, s) in clusters.iter().skip(1) {
        let (b, total) = hist_sum(blocks.iter().map(|b| &b.clusters[*s].upstream));
        o.histogram("pitcher_upstream_response_seconds", &[("cluster", name)], &b, total);
    }

    // Traffic and connections.
    let counters: [(&str, &str, BlockCounter); 8] = [
        ("pitcher_received_bytes", "Bytes read from clients.", |b| &b.bytes_received),
        ("pitcher_sent_bytes", "Bytes written to clients.", |b| &b.bytes_sent),
        ("pitcher_connections_accepted", "Client connections accepted.", |b| &b.accepted),
        ("pitcher_keepalive_requests", "Requests that reused a client connection (not its first request).", |b| {
            &b.keepalive_requests
        }),
        ("pitcher_upstream_connections_opened", "Connections opened to backends.", |b| &b.upstream_connects),
        ("pitcher_upstream_connections_reused", "Requests sent on a pooled backend connection.", |b| {
            &b.upstream_reuses
        }),
        ("pitcher_panics", "Client connections closed because handling them panicked.", |b| &b.panics),
        ("pitcher_shed_requests", "Low-priority requests refused by the degrade module under overload.", |b| &b.shed),
    ];
    for (name, help, f) in counters {
        o.family(name, Kind::Counter, help);
        o.counter(name, &[], sum(blocks, f));
    }
    o.family("pitcher_connections_refused", Kind::Counter, "Client connections refused, by reason.");
    o.counter("pitcher_connections_refused", &[("reason", "max_connections")], sum(blocks, |b| &b.refused));
    o.family(
        "pitcher_timeouts",
        Kind::Counter,
        "Deadlines that passed on client connections, by kind (the connection was answered 408/504 or closed).",
    );
    for k in TimeoutKind::ALL {
        o.counter("pitcher_timeouts", &[("kind", k.name())], sum(blocks, |b| &b.timeouts[k as usize]));
    }
    o.family("pitcher_connections_active", Kind::Gauge, "Client connections open, by worker slot.");
    for w in &v.workers {
        if let Some(b) = blocks.get(w.place).filter(|_| w.place < ACCOUNTED_WORKERS) {
            o.sample("pitcher_connections_active", &[("worker", &w.slot.to_string())], b.active.load(Relaxed));
        }
    }

    backends(&mut o, v);
    modules(&mut o, v, blocks);
    processes(&mut o, v);

    if format == Format::OpenMetrics {
        o.text.push_str("# EOF\n");
    }
    o.text
}

/// Per-backend figures (a backend address in several clusters is shown
/// under each, with the same figures: its state is per address).
fn backends(o: &mut Out, v: &View<'_>) {
    let now = crate::shm::now_ms();
    let mut rows = Vec::new();
    for c in &v.config.clusters {
        for b in &c.backends {
            if let Some(s) = v.backends.peek(&b.addr) {
                rows.push((c.name.as_str(), b.addr.to_string(), s, c.slow_start.as_millis() as u64));
            }
        }
    }
    let counters: [(&str, &str, BackendCounter); 4] = [
        ("pitcher_backend_requests", "Requests sent to the backend (attempts).", |s| s.requests.load(Relaxed)),
        ("pitcher_backend_retries", "Requests this backend failed that were sent to another backend.", |s| {
            s.retries.load(Relaxed)
        }),
        ("pitcher_backend_ejections", "Times passive detection ejected the backend.", |s| {
            u64::from(s.ejections.load(Relaxed))
        }),
        ("pitcher_backend_probes", "Active health probes of the backend (by the master).", |s| s.probes.load(Relaxed)),
    ];
    for (name, help, f) in counters {
        o.family(name, Kind::Counter, help);
        for (cluster, addr, s, _) in &rows {
            o.counter(name, &[("cluster", cluster), ("backend", addr)], f(s));
        }
    }
    o.family("pitcher_backend_failures", Kind::Counter, "Failed requests to the backend, by kind.");
    for (cluster, addr, s, _) in &rows {
        for (kind, n) in [
            ("connect", &s.fail_connect),
            ("timeout", &s.fail_timeout),
            ("reset", &s.fail_reset),
            ("invalid", &s.fail_invalid),
            ("5xx", &s.fail_5xx),
            ("tls", &s.fail_tls),
        ] {
            o.counter(
                "pitcher_backend_failures",
                &[("cluster", cluster), ("backend", addr), ("kind", kind)],
                n.load(Relaxed),
            );
        }
    }
    o.family("pitcher_backend_up", Kind::Gauge, "1 when the backend takes traffic (healthy or slow start), else 0.");
    for (cluster, addr, s, slow) in &rows {
        let (state, _) = backend_state(s, *slow, now);
        let up = u8::from(state == "healthy" || state == "slow_start");
        o.sample("pitcher_backend_up", &[("cluster", cluster), ("backend", addr)], up);
    }
    o.family(
        "pitcher_backend_state",
        Kind::Gauge,
        "The backend's state: 1 for the one it is in (healthy, slow_start, ejected, down).",
    );
    for (cluster, addr, s, slow) in &rows {
        let (state, _) = backend_state(s, *slow, now);
        for st in ["healthy", "slow_start", "ejected", "down"] {
            o.sample(
                "pitcher_backend_state",
                &[("cluster", cluster), ("backend", addr), ("state", st)],
                u8::from(st == state),
            );
        }
    }
    o.family(
        "pitcher_backend_weight_ratio",
        Kind::Gauge,
        "How far the backend's slow start has gone (0 to 1; 1: full weight).",
    );
    for (cluster, addr, s, slow) in &rows {
        let (_, ramp) = backend_state(s, *slow, now);
        o.sample("pitcher_backend_weight_ratio", &[("cluster", cluster), ("backend", addr)], ramp);
    }
    o.family("pitcher_backend_active_connections", Kind::Gauge, "Backend connections in use by requests, all workers.");
    for (cluster, addr, s, _) in &rows {
        o.sample(
            "pitcher_backend_active_connections",
            &[("cluster", cluster), ("backend", addr)],
            s.active.load(Relaxed),
        );
    }
    o.family("pitcher_backend_idle_connections", Kind::Gauge, "Idle pooled backend connections, all workers.");
    for (cluster, addr, _, _) in &rows {
        let slot = v.backends.slot(addr);
        let idle: u64 = v
            .workers
            .iter()
            .filter_map(|w| v.shared.place_counts(w.place))
            .filter_map(|row| slot.and_then(|n| row.backend_idle.get(n as usize)))
            .map(|n| u64::from(n.load(Relaxed)))
            .sum();
        o.sample("pitcher_backend_idle_connections", &[("cluster", cluster), ("backend", addr)], idle);
    }
}

/// The fleet limits' figures (`scope = "fleet"`), by module: whether
/// Redis is reached, fallbacks to the local share, round trips, tokens.
fn fleet(o: &mut Out, v: &View<'_>) {
    let plans = crate::fleet::plans(v.config);
    if plans.is_empty() {
        return;
    }
    let each = |o: &mut Out, name: &str, kind: Kind, help: &str, get: &dyn Fn(&crate::shm::FleetShm) -> u64| {
        o.family(name, kind, help);
        for p in &plans {
            let f = &v.shared.fleet[p.kind.counters()];
            match kind {
                Kind::Counter => o.counter(name, &[("module", p.kind.name())], get(f)),
                _ => o.sample(name, &[("module", p.kind.name())], get(f)),
            }
        }
    };
    each(
        o,
        "pitcher_fleet_redis_up",
        Kind::Gauge,
        "1 while the fleet limit's lease thread reaches Redis (fleet mode), 0 while it uses the local share.",
        &|f| u64::from(f.redis_up.load(Relaxed)),
    );
    each(
        o,
        "pitcher_fleet_fallbacks",
        Kind::Counter,
        "Times the fleet limit fell back to this host's local share (Redis unreachable, slow or failing).",
        &|f| f.fallbacks.load(Relaxed),
    );
    each(
        o,
        "pitcher_fleet_redis_errors",
        Kind::Counter,
        "Connections and round trips to Redis that failed or timed out.",
        &|f| f.redis_errors.load(Relaxed),
    );
    each(
        o,
        "pitcher_fleet_round_trips",
        Kind::Counter,
        "Round trips to Redis that returned leases (one per tick at most, for every bucket).",
        &|f| f.round_trips.load(Relaxed),
    );
    each(o, "pitcher_fleet_tokens_granted", Kind::Counter, "Tokens Redis granted this host in leases.", &|f| {
        f.tokens_granted.load(Relaxed)
    });
    o.family("pitcher_fleet_local_requests", Kind::Counter, "Requests decided by the local share because no lease covered them (Redis unreachable, or a key new to the lease thread).");
    for p in &plans {
        let f = &v.shared.fleet[p.kind.counters()];
        o.counter(
            "pitcher_fleet_local_requests",
            &[("module", p.kind.name()), ("result", "admitted")],
            f.local_admitted.load(Relaxed),
        );
        o.counter(
            "pitcher_fleet_local_requests",
            &[("module", p.kind.name()), ("result", "rejected")],
            f.local_rejected.load(Relaxed),
        );
    }
}

/// The modules' figures: throttle and quota decisions, degrade levels,
/// access-log lines, run-time switches.
fn modules(o: &mut Out, v: &View<'_>, blocks: &[WorkerMetrics]) {
    let shared = v.shared;
    let throttle = &shared.limiters[0];
    o.family("pitcher_throttle_requests", Kind::Counter, "Requests the throttle module admitted or rejected.");
    o.counter("pitcher_throttle_requests", &[("result", "admitted")], throttle.admitted.load(Relaxed));
    o.counter("pitcher_throttle_requests", &[("result", "rejected")], throttle.rejected.load(Relaxed));
    let q = &shared.quota;
    o.family("pitcher_quota_requests", Kind::Counter, "Requests the quota module admitted or rejected, all keys.");
    o.counter("pitcher_quota_requests", &[("result", "admitted")], q.admitted.load(Relaxed));
    o.counter("pitcher_quota_requests", &[("result", "rejected")], q.rejected.load(Relaxed));
    o.family("pitcher_quota_overflow_requests", Kind::Counter, "Quota requests whose key found no slot of its own.");
    o.counter("pitcher_quota_overflow_requests", &[], q.overflow.load(Relaxed));
    o.family("pitcher_quota_reclaimed_slots", Kind::Counter, "Idle quota key slots taken over by a new key.");
    o.counter("pitcher_quota_reclaimed_slots", &[], q.reclaimed.load(Relaxed));
    o.family("pitcher_quota_key_slots", Kind::Gauge, "Quota key slots in shared memory.");
    o.sample("pitcher_quota_key_slots", &[], MAX_QUOTA_KEYS);
    fleet(o, v);
    o.family(
        "pitcher_degrade_level",
        Kind::Gauge,
        "Overload level of each worker (0 normal, 1 non-essential modules off, 2 shedding).",
    );
    for w in &v.workers {
        if let Some(ws) = shared.workers.get(w.place) {
            o.sample("pitcher_degrade_level", &[("worker", &w.slot.to_string())], ws.level.load(Relaxed));
        }
    }
    o.family("pitcher_degrade_level_changes", Kind::Counter, "Overload level changes of the live workers.");
    let changes: u64 =
        v.workers.iter().filter_map(|w| shared.workers.get(w.place)).map(|ws| ws.level_changes.load(Relaxed)).sum();
    o.counter("pitcher_degrade_level_changes", &[], changes);
    o.family("pitcher_access_log_lines", Kind::Counter, "Access-log lines produced (written plus dropped).");
    o.counter("pitcher_access_log_lines", &[], sum(blocks, |b| &b.log_lines));
    o.family(
        "pitcher_access_log_dropped_lines",
        Kind::Counter,
        "Access-log lines dropped: a slow file, syslog or records receiver, or none reachable.",
    );
    o.counter("pitcher_access_log_dropped_lines", &[], sum(blocks, |b| &b.log_dropped));
    o.family(
        "pitcher_statsd_datagrams",
        Kind::Counter,
        "Datagrams of the statsd module, sent or dropped (no server, a full buffer).",
    );
    o.counter("pitcher_statsd_datagrams", &[("result", "sent")], sum(blocks, |b| &b.statsd_sent));
    o.counter("pitcher_statsd_datagrams", &[("result", "dropped")], sum(blocks, |b| &b.statsd_dropped));
    o.family("pitcher_module_enabled", Kind::Gauge, "1 when a configured module runs (not switched off at run time).");
    for mc in &v.config.modules {
        let off = crate::hooks::registry_index(&mc.name).is_some_and(|f| shared.modules[f].disabled.load(Relaxed) == 1);
        o.sample("pitcher_module_enabled", &[("module", &mc.name)], u8::from(mc.enabled && !off));
    }
}

/// Reloads, upgrades, respawns, the configuration generation, and the
/// usual process figures of the master and each worker.
fn processes(o: &mut Out, v: &View<'_>) {
    let p = &v.shared.metrics.process;
    o.family("pitcher_reloads", Kind::Counter, "Configuration reloads, by result (failed: refused configuration).");
    o.counter("pitcher_reloads", &[("result", "ok")], p.reloads_ok.load(Relaxed));
    o.counter("pitcher_reloads", &[("result", "failed")], p.reloads_failed.load(Relaxed));
    o.family(
        "pitcher_last_reload_success_timestamp_seconds",
        Kind::Gauge,
        "When the last reload succeeded (0: never).",
    );
    o.sample("pitcher_last_reload_success_timestamp_seconds", &[], p.last_reload_ok_s.load(Relaxed));
    o.family(
        "pitcher_reload_apply_seconds",
        Kind::Histogram,
        "How long a worker took to apply a configuration the master sent (parse, validate, build the routes and clusters, swap), one observation per worker and configuration.",
    );
    let (b, total) = hist_sum(v.shared.metrics.used_blocks().iter().map(|b| &b.reload_apply));
    o.histogram("pitcher_reload_apply_seconds", &[], &b, total);
    o.family("pitcher_upgrades", Kind::Counter, "Binary upgrades, by result (failed: rolled back).");
    o.counter("pitcher_upgrades", &[("result", "ok")], p.upgrades_ok.load(Relaxed));
    o.counter("pitcher_upgrades", &[("result", "failed")], p.upgrades_failed.load(Relaxed));
    o.family(
        "pitcher_last_upgrade_success_timestamp_seconds",
        Kind::Gauge,
        "When the last binary upgrade completed (0: never).",
    );
    o.sample("pitcher_last_upgrade_success_timestamp_seconds", &[], p.last_upgrade_ok_s.load(Relaxed));
    o.family(
        "pitcher_backend_dns_lookups",
        Kind::Counter,
        "Re-resolutions of backend names that changed their addresses, or failed (the addresses stay).",
    );
    o.counter("pitcher_backend_dns_lookups", &[("result", "changed")], p.dns_changes.load(Relaxed));
    o.counter("pitcher_backend_dns_lookups", &[("result", "failed")], p.dns_failures.load(Relaxed));
    o.family("pitcher_worker_respawns", Kind::Counter, "Workers started again after one died.");
    o.counter("pitcher_worker_respawns", &[], p.worker_respawns.load(Relaxed));
    o.family(
        "pitcher_config_generation",
        Kind::Gauge,
        "Configurations loaded by this instance (start, reloads, upgrades).",
    );
    o.sample("pitcher_config_generation", &[], p.generation.load(Relaxed));
    o.family("pitcher_start_time_seconds", Kind::Gauge, "When the instance's first master started.");
    o.sample("pitcher_start_time_seconds", &[], p.started_s.load(Relaxed));
    o.family("pitcher_workers", Kind::Gauge, "Worker processes of the serving master.");
    o.sample("pitcher_workers", &[], v.workers.len());
    o.family("pitcher_control_refused", Kind::Counter, "Control-socket connections refused, by reason.");
    for (reason, n) in &v.refusals {
        o.counter("pitcher_control_refused", &[("reason", reason)], *n);
    }
    o.family("pitcher_admin_refused", Kind::Counter, "Admin (metrics) requests refused, by reason.");
    for (reason, n) in &v.admin_refusals {
        o.counter("pitcher_admin_refused", &[("reason", reason)], *n);
    }

    let mut procs = vec![("master".to_string(), "master", std::process::id())];
    procs.extend(v.workers.iter().map(|w| (w.slot.to_string(), "worker", w.pid)));
    let stats: Vec<_> = procs.iter().map(|(slot, role, pid)| (slot, *role, process::read(*pid))).collect();
    o.family(
        "pitcher_process_cpu_seconds",
        Kind::Counter,
        "User and system CPU time of each process (a worker's restarts from 0 when it is replaced).",
    );
    for (slot, role, s) in &stats {
        if let Some(s) = s {
            o.sample("pitcher_process_cpu_seconds_total", &[("role", role), ("slot", slot)], s.cpu_seconds);
        }
    }
    o.family("pitcher_process_resident_memory_bytes", Kind::Gauge, "Resident memory of each process.");
    for (slot, role, s) in &stats {
        if let Some(s) = s {
            o.sample("pitcher_process_resident_memory_bytes", &[("role", role), ("slot", slot)], s.rss_bytes);
        }
    }
    o.family("pitcher_process_open_fds", Kind::Gauge, "Open file descriptors of each process.");
    for (slot, role, s) in &stats {
        if let Some(n) = s.and_then(|s| s.open_fds) {
            o.sample("pitcher_process_open_fds", &[("role", role), ("slot", slot)], n);
        }
    }
    o.family("pitcher_process_start_time_seconds", Kind::Gauge, "When each process started.");
    for (slot, role, s) in &stats {
        if let Some(s) = s {
            o.sample("pitcher_process_start_time_seconds", &[("role", role), ("slot", slot)], s.start_seconds.floor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_written_without_trailing_zeros() {
        assert_eq!(seconds(1_000), "0.001");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1.0");
        assert_eq!(seconds(60_000_000), "60.0");
        assert_eq!(seconds(1_234_567), "1.234567");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape_into(&mut s, "a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn accept_picks_the_format() {
        assert_eq!(
            Format::from_accept("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept("text/plain"), Format::Prometheus);
        assert_eq!(Format::from_accept(""), Format::Prometheus);
    }
}
