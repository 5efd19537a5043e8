//! Limits shared by the workers, with two workers: the global `throttle`
//! admits its configured rate whatever the number of workers (not a share
//! per worker), and rejects the rest with the configured status and
//! `Retry-After`; the `quota` module keeps a flooding business (tenant)
//! from lowering another's success rate.
//!
//! The tests of this file run one at a time: they measure rates.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::upstream::{get_new_conn, switches, worker_pids};
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a [`Flood`] saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    statuses: BTreeMap<u16, u64>,
    /// Transport errors and unexpected answers.
    errors: Vec<String>,
    /// `Retry-After` values of the rejections.
    retry_after: BTreeMap<String, u64>,
    /// When the first request was sent and the last answer came.
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Seen {
    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.len() as u64
    }
}

/// Threads sending `GET path` on new connections (so both workers serve),
/// with extra headers, pausing `pause` between requests, until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
}

impl Flood {
    fn start(addr: SocketAddr, threads: usize, pause: Duration, path: &str, headers: &[(&str, &str)]) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let threads = (0..threads)
            .map(|i| {
                let (stop, seen, headers, path) = (stop.clone(), seen.clone(), headers.clone(), path.to_string());
                thread::spawn(move || {
                    let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let sent = Instant::now();
                        let r = get_new_conn(addr, &format!("{path}/{i}/{n}"), &h);
                        let done = Instant::now();
                        let mut s = seen.lock().unwrap();
                        s.first = Some(s.first.map_or(sent, |f| f.min(sent)));
                        s.last = Some(s.last.map_or(done, |l| l.max(done)));
                        match r {
                            Ok(r) => {
                                *s.statuses.entry(r.status).or_default() += 1;
                                if r.status != 200 {
                                    let ra = r.header("retry-after").unwrap_or("none").to_string();
                                    *s.retry_after.entry(ra).or_default() += 1;
                                }
                            }
                            Err(e) => s.errors.push(format!("thread {i} request {n}: {e}")),
                        }
                        drop(s);
                        if !pause.is_zero() {
                            thread::sleep(pause);
                        }
                    }
                })
            })
            .collect();
        Flood { stop, threads, seen }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.seen()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn the_global_throttle_holds_its_rate_across_two_workers() {
    const RATE: f64 = 200.0;
    const BURST: f64 = 20.0;
    let _g = serial();
    let be = Backend::start("a");
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[modules.throttle]\nrate_per_sec = 200\nburst = 20\nstatus = 429\nretry_after_secs = 3\n");
    let m = MasterRun::start(&builder);
    let pids = worker_pids(&m);
    assert_eq!(pids.len(), 2);
    let before: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();

    // The bucket starts full (burst) at the first request of this flood.
    let flood = Flood::start(m.addr(), 8, Duration::ZERO, "/flood", &[]);
    thread::sleep(Duration::from_secs(3));
    let seen = flood.finish();

    let woke: Vec<u64> = pids.iter().zip(&before).map(|(&p, b)| switches(p) - b).collect();
    let elapsed = seen.last.zip(seen.first).map_or(0.0, |(l, f)| (l - f).as_secs_f64());
    let (ok, rejected) = (seen.count(200), seen.count(429));
    let offered = seen.total() as f64 / elapsed;
    let report = format!(
        "{ok} admitted, {rejected} rejected in {elapsed:.2} s (offered {offered:.0}/s); statuses {:?}; \
         Retry-After {:?}; worker context switches {woke:?}; {} errors {:?}",
        seen.statuses,
        seen.retry_after,
        seen.errors.len(),
        seen.errors.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!("throttle: {report}");
    assert!(seen.errors.is_empty(), "{report}");
    assert_eq!(ok + rejected, seen.total(), "only 200 and 429 expected: {report}");
    assert!(offered >= 2.0 * RATE, "the load must be well over the rate to measure it: {report}");
    assert!(woke.iter().all(|&w| w >= 100), "both workers must serve the flood: {report}");
    assert_eq!(seen.retry_after.keys().collect::<Vec<_>>(), ["3"], "every rejection has Retry-After: {report}");
    assert_eq!(be.requests() as u64, ok, "only admitted requests reach the backend: {report}");

    // admitted ≈ burst + rate × duration; the rate within 10 %.
    let admitted_rate = (ok as f64 - BURST) / elapsed;
    assert!(
        (admitted_rate - RATE).abs() <= RATE * 0.10,
        "admitted rate {admitted_rate:.1}/s is not within 10 % of {RATE}/s: {report}"
    );
}

#[test]
fn a_flooding_tenant_does_not_lower_another_tenants_success_rate() {
    let _g = serial();
    let be = Backend::with_handler("a", |_| Reply::ok("ok from a").delayed(Duration::from_millis(5)));
    let builder = ConfigBuilder::new().top("workers = 2").cluster("app", [be.spec()]).route(None, "/", "app").section(
        "[modules.quota]\nkey = \"header:X-Tenant\"\nrate_per_sec = 100\nburst = 20\nconcurrency = 4\nstatus = 429\n",
    );
    let m = MasterRun::start(&builder);

    let flood = Flood::start(m.addr(), 8, Duration::ZERO, "/a", &[("X-Tenant", "tenant-a")]);
    // Tenant B: one request every 40 ms (25/s, within its quota).
    let steady = Flood::start(m.addr(), 1, Duration::from_millis(40), "/b", &[("X-Tenant", "tenant-b")]);
    thread::sleep(Duration::from_secs(3));
    let b = steady.finish();
    let a = flood.finish();

    let report =
        format!("tenant A {:?} ({} errors), tenant B {:?} {:?}", a.statuses, a.errors.len(), b.statuses, b.errors);
    eprintln!("quota: {report}");
    assert!(b.total() >= 30, "tenant B sent too little to judge: {report}");
    assert_eq!(b.count(200), b.total(), "tenant B must keep a 100 % success rate: {report}");
    assert!(a.count(429) > 0, "tenant A must be refused on its own quota: {report}");
    assert!(a.count(200) > 0, "tenant A still gets its quota: {report}");
    assert_eq!(a.retry_after.keys().collect::<Vec<_>>(), ["1"], "{report}");
    // Tenant A's admitted rate is bounded by its own quota (100/s + burst).
    let elapsed = a.last.zip(a.first).map_or(0.0, |(l, f)| (l - f).as_secs_f64());
    assert!(
        a.count(200) as f64 <= 20.0 + 100.0 * elapsed * 1.1,
        "tenant A got more than its quota in {elapsed:.2} s: {report}"
    );
}

/// Regression: requests in flight in a worker that died (killed, crashed)
/// kept their quota concurrency slots forever.
#[test]
fn a_dead_workers_requests_give_their_quota_slots_back() {
    let _g = serial();
    let be = Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path().starts_with("/hold") {
            reply.delayed(Duration::from_secs(30))
        } else {
            reply
        }
    });
    let builder = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[modules.quota]\nkey = \"header:X-Tenant\"\nconcurrency = 2\nstatus = 429\n");
    let m = MasterRun::start(&builder);
    let addr = m.addr();
    let held: Vec<_> = (0..2)
        .map(|i| thread::spawn(move || get_new_conn(addr, &format!("/hold/{i}"), &[("X-Tenant", "t")])))
        .collect();
    assert!(be.wait_for_requests(2, Duration::from_secs(5)), "the held requests did not arrive");
    let r = get_new_conn(addr, "/full", &[("X-Tenant", "t")]).expect("request");
    assert_eq!(r.status, 429, "both slots are taken: {}", r.head_str());

    let old = worker_pids(&m);
    for &pid in &old {
        common::pitcher::send_signal(pid, "KILL");
    }
    for h in held {
        let _ = h.join();
    }
    let back =
        m.wait_status(Duration::from_secs(10), |s| s.all_ready() && s.worker_pids().iter().all(|p| !old.contains(p)));
    assert!(back.is_some(), "no new worker: {:?}", m.status());
    let r = get_new_conn(addr, "/after", &[("X-Tenant", "t")]).expect("request");
    assert_eq!(r.status, 200, "the dead worker's slots were not given back: {}", r.head_str());
}

/// The `quota` part of `pitcher ctl --json modules`, and the text table.
fn quota_table(m: &MasterRun) -> (serde_json::Value, String) {
    let out = m.command(&["ctl", "--json", "modules"]);
    assert!(out.status.success(), "ctl --json modules: {out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let text = m.command(&["ctl", "modules"]);
    assert!(text.status.success(), "ctl modules: {text:?}");
    (v["data"]["quota"].clone(), text.stdout)
}

/// Regression: a flood of distinct random keys took every shared quota
/// slot for good, so every later tenant shared the overflow slot (and its
/// drained bucket) with the flood.
#[test]
fn a_flood_of_random_quota_keys_goes_idle_and_a_new_tenant_gets_its_own_limit() {
    let _g = serial();
    let be = Backend::start("a");
    let builder = ConfigBuilder::new().top("workers = 2").cluster("app", [be.spec()]).route(None, "/", "app").section(
        "[modules.quota]\nkey = \"header:X-Tenant\"\nrate_per_sec = 1\nburst = 3\nstatus = 429\n\
         max_keys = 16\nkey_idle_ms = 1000\n",
    );
    let m = MasterRun::start(&builder);
    let addr = m.addr();

    // 2000 distinct random keys, one request each, from 4 keep-alive clients.
    let flood: Vec<_> = (0..4u64)
        .map(|t| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut seen = BTreeMap::<u16, u64>::new();
                for k in 0..500u64 {
                    let key: String =
                        pseudo_random_bytes(8, t * 1_000_003 + k).iter().map(|b| format!("{b:02x}")).collect();
                    let r = c.request(&request_bytes("GET", "app", "/flood", &[("X-Tenant", &key)], b""));
                    *seen.entry(r.status).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    let mut seen = BTreeMap::<u16, u64>::new();
    for t in flood {
        for (s, n) in t.join().expect("flood thread") {
            *seen.entry(s).or_default() += n;
        }
    }
    let (quota, text) = quota_table(&m);
    let report = format!("flood {seen:?}; ctl quota {quota}\n{text}");
    eprintln!("{report}");
    assert_eq!(seen.values().sum::<u64>(), 2000, "{report}");
    assert_eq!(seen.keys().filter(|&&s| s != 200 && s != 429).count(), 0, "only 200 and 429: {report}");
    assert!(seen.get(&429).copied().unwrap_or(0) > 0, "the overflow slot's bucket refuses the flood: {report}");
    assert_eq!(quota["keys"], 16, "every one of max_keys slots is taken: {report}");
    let overflow = quota["overflow"].as_u64().expect("overflow count");
    assert!(overflow > 0 && overflow < 2000, "requests without a slot of their own are counted: {report}");
    assert!(text.contains("OVERFLOW") && text.contains(&overflow.to_string()), "{report}");

    // The flood's keys go idle; a new tenant, then another, each get a
    // slot and a full burst of their own (the overflow bucket is empty).
    thread::sleep(Duration::from_millis(1500));
    for tenant in ["tenant-new", "tenant-other"] {
        let mut c = Client::connect(addr);
        let mut statuses = Vec::new();
        for i in 0..10 {
            let r = c.request(&request_bytes("GET", "app", &format!("/{tenant}/{i}"), &[("X-Tenant", tenant)], b""));
            statuses.push(r.status);
            if r.status == 429 {
                break;
            }
        }
        let report = format!("{tenant}: {statuses:?}; {report}");
        assert_eq!(statuses[..3], [200, 200, 200], "a burst of its own: {report}");
        assert_eq!(statuses.last(), Some(&429), "its own limit applies to it: {report}");
    }
    let (after, _) = quota_table(&m);
    assert!(after["reclaimed"].as_u64().unwrap_or(0) >= 2, "idle slots were reclaimed: {after}");
    assert_eq!(after["overflow"], quota["overflow"], "the new tenants did not overflow: {after}");
}
