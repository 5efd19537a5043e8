//! The master's re-resolution of backend names: a schedule per name (its
//! cluster's `resolve_interval_ms`), one thread that does the lookups
//! (blocking, each bounded by [`dns::LOOKUP_TIMEOUT`]) and hands the
//! answers back over a channel, waking the master's loop through a
//! `mio::Waker`. The master's loop never waits for DNS.
//!
//! Owns: the current addresses of every name. Must not: touch workers or
//! the configuration (the master publishes what changed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Registry, Token, Waker};

use crate::config::{Config, ResolvedName};
use crate::dns;

/// The waker's token in the master's loop.
pub const TOKEN: Token = Token(4);

/// A lookup for the thread.
struct Job {
    cluster: String,
    name: String,
    host: String,
    server: Option<SocketAddr>,
}

/// A lookup's outcome.
struct Done {
    cluster: String,
    name: String,
    answer: Result<Vec<IpAddr>, dns::DnsError>,
}

/// When a name is next looked up, and whether a lookup is under way.
struct Due {
    next: Instant,
    in_flight: bool,
}

/// What an answer changed.
pub struct Change {
    /// The cluster.
    pub cluster: String,
    /// `host:port`.
    pub name: String,
    /// Addresses before.
    pub before: Vec<IpAddr>,
    /// Addresses now.
    pub after: Vec<IpAddr>,
}

/// The master's resolver: schedule, thread, current answers.
pub struct Resolver {
    jobs: Option<mpsc::Sender<Job>>,
    done: Option<mpsc::Receiver<Done>>,
    due: HashMap<(String, String), Due>,
    current: Vec<ResolvedName>,
    /// The thread could not be started (said once in the log).
    start_failed: bool,
}

/// What the answers taken from the thread did.
#[derive(Default)]
pub struct Answers {
    /// Names whose addresses changed.
    pub changes: Vec<Change>,
    /// Lookups that failed (those names keep their addresses).
    pub failed: u64,
}

impl Resolver {
    /// A resolver whose answers are `current` (resolved at load). The
    /// thread starts with the first name to look up.
    pub fn new(current: Vec<ResolvedName>) -> Resolver {
        Resolver { jobs: None, done: None, due: HashMap::new(), current, start_failed: false }
    }

    /// The addresses of every name, for the workers.
    pub fn current(&self) -> &[ResolvedName] {
        &self.current
    }

    /// A new configuration was loaded with these answers: names it no
    /// longer has are forgotten, new ones are scheduled one interval on.
    pub fn configure(&mut self, config: &Config, current: Vec<ResolvedName>) {
        self.current = current;
        let now = Instant::now();
        let mut due = HashMap::new();
        for c in &config.clusters {
            for n in &c.dns.names {
                let key = (c.name.clone(), n.key());
                let d = self.due.remove(&key).unwrap_or(Due { next: now + c.dns.interval, in_flight: false });
                due.insert(key, d);
            }
        }
        self.due = due;
    }

    /// Sends the lookups that are due to the thread.
    pub fn tick(&mut self, config: &Config, registry: &Registry, log: &slog::Logger) {
        let now = Instant::now();
        if self.jobs.is_none() && self.due.values().any(|d| d.next <= now) {
            if let Err(e) = self.start(registry) {
                if !self.start_failed {
                    slog::error!(log, "cannot start the resolver thread; backend names are not re-resolved"; "error" => %e);
                }
                self.start_failed = true;
                return;
            }
        }
        for c in &config.clusters {
            for n in &c.dns.names {
                let key = (c.name.clone(), n.key());
                let Some(d) = self.due.get_mut(&key) else { continue };
                if d.in_flight || d.next > now {
                    continue;
                }
                d.next = now + c.dns.interval;
                let job = Job { cluster: c.name.clone(), name: n.key(), host: n.host.clone(), server: c.dns.resolver };
                if self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok()) {
                    d.in_flight = true;
                }
            }
        }
    }

    fn start(&mut self, registry: &Registry) -> std::io::Result<()> {
        let waker = Arc::new(Waker::new(registry, TOKEN)?);
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel::<Done>();
        std::thread::Builder::new().name("pitcher-resolver".into()).spawn(move || {
            while let Ok(j) = rx.recv() {
                let answer = dns::lookup(&j.host, j.server, dns::LOOKUP_TIMEOUT);
                if tx.send(Done { cluster: j.cluster, name: j.name, answer }).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        })?;
        self.jobs = Some(jobs);
        self.done = Some(done);
        Ok(())
    }

    /// Takes the thread's answers: the names whose addresses changed. A
    /// failed lookup keeps the name's addresses (a DNS outage must not
    /// empty a cluster); an answer, even an empty one, replaces them.
    pub fn answers(&mut self, log: &slog::Logger) -> Answers {
        let mut out = Answers::default();
        let Some(done) = &self.done else { return out };
        while let Ok(d) = done.try_recv() {
            let key = (d.cluster.clone(), d.name.clone());
            let Some(due) = self.due.get_mut(&key) else { continue }; // Gone with a reload.
            due.in_flight = false;
            let addrs = match d.answer {
                Ok(a) => a,
                Err(e) => {
                    out.failed += 1;
                    slog::warn!(log, "backend name lookup failed; its addresses stay"; "cluster" => &d.cluster,
                        "name" => &d.name, "error" => %e);
                    continue;
                }
            };
            let entry = match self.current.iter_mut().find(|r| r.cluster == d.cluster && r.name == d.name) {
                Some(r) => r,
                None => {
                    self.current.push(ResolvedName { cluster: d.cluster.clone(), name: d.name.clone(), addrs: vec![] });
                    self.current.last_mut().expect("just pushed")
                }
            };
            if entry.addrs != addrs {
                let before = std::mem::replace(&mut entry.addrs, addrs.clone());
                out.changes.push(Change { cluster: d.cluster, name: d.name, before, after: addrs });
            }
        }
        out
    }

    /// Time until the next lookup is due (for the loop's sleep).
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.due.values().filter(|d| !d.in_flight).map(|d| d.next.saturating_duration_since(now)).min()
    }
}
