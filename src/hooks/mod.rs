//! The hook pipeline: how modules take part in a request.
//!
//! A **module** is a named group of handlers, one per hook point it cares
//! about. The core calls the points in this order (see `docs/modules.md`
//! for the chart):
//!
//! ```text
//! ACCEPT ─► [read head, route] ─► BEFORE_CLUSTER ─► [pick backend]
//!   ─► AFTER_CLUSTER ─► [connect or reuse, send] ─► BACKEND_RESPONSE
//!   ─► [stream body] ─► REQUEST_FINISH ─► (next request, or) FINISH
//! ```
//!
//! Handlers run **on the worker's event loop and must not block**: no
//! blocking I/O, no sleeping, no locks held for long. They see heads, a
//! context and the current time, never sockets or `mio`. A handler may
//! continue, answer the request itself ([`Verdict::Respond`]), or close the
//! connection ([`Verdict::Close`]).
//!
//! Modules are compiled in and registered by name ([`registry`]); the
//! configuration enables them (`[modules.NAME]`) and orders them, globally
//! and per route. At run time a module can be switched off and on for all
//! workers at once (a flag in shared memory, set through the control
//! socket), and a non-essential module is switched off by the overload
//! controller while the worker is overloaded.

pub mod modules;

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::Logger;

use crate::config::{Config, ModuleConfig, RouteConfig};
use crate::http::{RequestHead, ResponseHead};
use crate::shm::Shared;

/// What is wrong with a module's settings (its `[modules.NAME]` table), or
/// why it could not start. The table's file and line are added by
/// [`ModuleError`].
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The table does not fit the module's settings: an unknown key, a
    /// value of the wrong type, a missing key.
    #[error("{message}")]
    Table {
        /// The parser's message.
        message: String,
    },
    /// A value over its bound.
    #[error("{name} = {value} is over the limit of {max}")]
    OverLimit {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: u64,
        /// The largest value accepted.
        max: u64,
    },
    /// A value, or a combination of values, the module refuses.
    #[error("{reason}")]
    Invalid {
        /// What is wrong, naming the setting.
        reason: String,
    },
    /// The module could not start what it needs (a writer thread).
    #[error("cannot start the {what}: {source}")]
    Start {
        /// What could not be started.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl From<String> for SettingsError {
    fn from(reason: String) -> SettingsError {
        SettingsError::Invalid { reason }
    }
}

impl From<&str> for SettingsError {
    fn from(reason: &str) -> SettingsError {
        SettingsError::Invalid { reason: reason.to_string() }
    }
}

/// Bridge for module code that still reports its settings' errors as text.
impl From<SettingsError> for String {
    fn from(e: SettingsError) -> String {
        e.to_string()
    }
}

/// A module table that cannot be loaded, with the file and line of the
/// table: `FILE:LINE: [modules.NAME]: PROBLEM`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: [modules.{module}]: {problem}", file.display())]
pub struct ModuleError {
    /// The file that holds the table.
    pub file: std::path::PathBuf,
    /// The table's 1-based line.
    pub line: usize,
    /// The module's name as written.
    pub module: String,
    /// What is wrong.
    pub problem: ModuleProblem,
}

/// What is wrong with one module table.
#[derive(Debug, thiserror::Error)]
pub enum ModuleProblem {
    /// No module of that name is compiled in.
    #[error("no such module (compiled in: {})", known.join(", "))]
    Unknown {
        /// The modules that are.
        known: Vec<&'static str>,
    },
    /// The module refused its settings.
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

/// Bridge for callers that report errors as text (the worker's snapshot).
impl From<ModuleError> for String {
    fn from(e: ModuleError) -> String {
        e.to_string()
    }
}

/// The six hook points, in the order a request meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A client connection was accepted.
    Accept = 0,
    /// A request head was read and routed; no backend is chosen yet.
    BeforeCluster = 1,
    /// A backend was chosen; the request is about to be sent.
    AfterCluster = 2,
    /// The backend's response head arrived.
    BackendResponse = 3,
    /// A request is over (answered, failed or cut).
    RequestFinish = 4,
    /// The client connection is closing.
    Finish = 5,
}

impl Point {
    /// Every point, in order.
    pub const ALL: [Point; 6] = [
        Point::Accept,
        Point::BeforeCluster,
        Point::AfterCluster,
        Point::BackendResponse,
        Point::RequestFinish,
        Point::Finish,
    ];

    /// The point's name in logs and `docs/modules.md`.
    pub fn name(self) -> &'static str {
        match self {
            Point::Accept => "ACCEPT",
            Point::BeforeCluster => "BEFORE_CLUSTER",
            Point::AfterCluster => "AFTER_CLUSTER",
            Point::BackendResponse => "BACKEND_RESPONSE",
            Point::RequestFinish => "REQUEST_FINISH",
            Point::Finish => "FINISH",
        }
    }
}

/// What a handler decides.
#[derive(Debug)]
pub enum Verdict {
    /// Go on with the next handler, then the core.
    Continue,
    /// Answer the request with this response; no backend sees it (at
    /// BACKEND_RESPONSE: the backend's response is dropped). Shared, so
    /// that a module that gives the same answer again and again (a
    /// refusal) builds it once and hands out clones of the `Arc`: nothing
    /// is allocated per answer. A response made for one request is
    /// `Response::new(..).into()`.
    Respond(Arc<Response>),
    /// Close the client connection.
    Close,
}

/// A response made by a module. Build the ones a module gives often (a
/// refusal) once, when the module is built, and answer with a clone of the
/// `Arc` ([`Verdict::Respond`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, in order.
    pub headers: Vec<(String, String)>,
    /// Empty: Pitcher's standard short text body for the status.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status`, no header and no body.
    pub fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }
}

/// Per-request values modules keep between their handlers (for example a
/// quota to give back at REQUEST_FINISH): one `u64` per loaded module.
#[derive(Debug, Default, Clone)]
pub struct Vars {
    values: Vec<u64>,
}

impl Vars {
    /// The value module `module` stored (0 when none).
    pub fn get(&self, module: usize) -> u64 {
        self.values.get(module).copied().unwrap_or(0)
    }

    /// Stores a value for module `module`.
    pub fn set(&mut self, module: usize, v: u64) {
        if self.values.len() <= module {
            self.values.resize(module + 1, 0);
        }
        self.values[module] = v;
    }

    /// Forgets every value (a new request).
    pub fn clear(&mut self) {
        self.values.iter_mut().for_each(|v| *v = 0);
    }
}

/// What every handler is given besides the message.
pub struct Ctx<'a> {
    /// The time of the event being handled.
    pub now: Instant,
    /// The client's IP (`None` on a Unix-domain listener).
    pub client: Option<IpAddr>,
    /// The connection's logger (`worker`, `conn` keys).
    pub log: &'a Logger,
    /// The route the request matched (request points only).
    pub route: Option<&'a RouteConfig>,
    /// The cluster chosen so far (index in `config.clusters`); a
    /// BEFORE_CLUSTER handler may replace it ([`Ctx::choose_cluster`]).
    pub cluster: Option<usize>,
    /// The backend chosen (AFTER_CLUSTER and later).
    pub backend: Option<&'a str>,
    /// This module's index in the snapshot (for [`Vars`]).
    pub module: usize,
    /// The worker's overload level: 0 normal, 1 non-essential modules
    /// off, 2 low-priority routes shed.
    pub load_level: u32,
    /// Per-request values modules keep between points.
    pub vars: &'a mut Vars,
    /// State shared by all workers (global limits).
    pub shared: &'static Shared,
    /// The configuration the request is served with.
    pub config: &'a Config,
    /// This worker's place (index in the shared per-worker tables).
    pub worker: usize,
}

impl<'a> Ctx<'a> {
    /// A context with no route, cluster or backend yet (for unit tests of
    /// modules, and the points before routing).
    pub fn new(config: &'a Config, shared: &'static Shared, log: &'a Logger, vars: &'a mut Vars) -> Ctx<'a> {
        Ctx {
            now: Instant::now(),
            client: None,
            log,
            route: None,
            cluster: None,
            backend: None,
            module: 0,
            load_level: 0,
            vars,
            shared,
            config,
            worker: 0,
        }
    }

    /// Sends the request to the cluster of this name (BEFORE_CLUSTER).
    /// `false`: no such cluster.
    pub fn choose_cluster(&mut self, name: &str) -> bool {
        match self.config.cluster_index(name) {
            Some(i) => {
                self.cluster = Some(i);
                true
            }
            None => false,
        }
    }

    /// The name of the chosen cluster.
    pub fn cluster_name(&self) -> Option<&str> {
        self.cluster.map(|i| self.config.clusters[i].name.as_str())
    }
}

/// A finished exchange, for REQUEST_FINISH.
#[derive(Debug)]
pub struct Finished<'a> {
    /// The request's method.
    pub method: &'a [u8],
    /// The request target as received.
    pub target: &'a [u8],
    /// The request's protocol version, `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'static str,
    /// The request's host.
    pub host: &'a [u8],
    /// The status sent to the client.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// From the first byte of the request to the last of the response.
    pub duration: Duration,
    /// Time from sending the request to the backend to the end of its
    /// response (`None`: no backend was involved).
    pub upstream_time: Option<Duration>,
    /// The backend that served it, if any.
    pub backend: Option<&'a str>,
    /// Every field of the request head, as forwarded (`$http_NAME`).
    pub headers: &'a crate::http::head::Head,
    /// Over TLS: the protocol version (`TLSv1.3`) and the cipher suite's
    /// IANA name (`TLS_AES_128_GCM_SHA256`); `None` in cleartext.
    pub tls: Option<(&'static str, &'static str)>,
}

impl Finished<'_> {
    /// The `User-Agent` header (empty when none). Looked up when asked:
    /// most modules never ask, and a refusal should not pay for it.
    pub fn user_agent(&self) -> &[u8] {
        self.headers.get("user-agent").unwrap_or(b"")
    }

    /// The `Referer` header (empty when none).
    pub fn referer(&self) -> &[u8] {
        self.headers.get("referer").unwrap_or(b"")
    }

    /// The request's X-Request-Id (Pitcher's, or the client's; empty when
    /// none).
    pub fn request_id(&self) -> &[u8] {
        self.headers.get("x-request-id").unwrap_or(b"")
    }
}

/// A client connection, for ACCEPT and FINISH.
#[derive(Debug)]
pub struct Connection {
    /// The client's address (`None` on a Unix socket).
    pub client: Option<IpAddr>,
    /// Requests served on the connection.
    pub requests: u64,
    /// How long the connection was open.
    pub duration: Duration,
}

/// A module's handlers. Every method has a no-op default: implement the
/// points you need and list them in [`points`](Module::points).
///
/// Handlers run on the event loop: **they must not block**.
pub trait Module: Send + Sync {
    /// The points this module handles; the others are never called.
    fn points(&self) -> &'static [Point];

    /// [`Point::Accept`].
    fn accept(&self, _conn: &Connection, _ctx: &mut Ctx<'_>) -> Verdict {
        Verdict::Continue
    }
    /// [`Point::BeforeCluster`]: may change the request head.
    fn before_cluster(&self, _req: &mut RequestHead, _ctx: &mut Ctx<'_>) -> Verdict {
        Verdict::Continue
    }
    /// [`Point::AfterCluster`]: may change the request head.
    fn after_cluster(&self, _req: &mut RequestHead, _ctx: &mut Ctx<'_>) -> Verdict {
        Verdict::Continue
    }
    /// [`Point::BackendResponse`]: may change the response head.
    fn backend_response(&self, _resp: &mut ResponseHead, _ctx: &mut Ctx<'_>) -> Verdict {
        Verdict::Continue
    }
    /// [`Point::RequestFinish`]: what happened, for logs and counters.
    fn request_finish(&self, _done: &Finished<'_>, _ctx: &mut Ctx<'_>) {}
    /// [`Point::Finish`].
    fn finish(&self, _conn: &Connection, _ctx: &mut Ctx<'_>) {}
    /// Reopen files (SIGUSR1).
    fn reopen(&self) {}
    /// Housekeeping on the event loop about every 100 ms (for instance,
    /// handing buffered lines to a writer thread). Must not block.
    fn tick(&self) {}
}

/// A module compiled into Pitcher: its name and how to build it from its
/// `[modules.NAME]` table.
pub struct Registration {
    /// The name of its `[modules.NAME]` table.
    pub name: &'static str,
    /// Builds it from that table.
    pub build: BuildFn,
}

/// Builds a module from its table; the error says what is wrong with it.
pub type BuildFn = fn(&ModuleConfig, &Build) -> Result<Arc<dyn Module>, SettingsError>;

/// What a module may use when it is built.
pub struct Build<'a> {
    /// The whole configuration (for cross-checks such as route names).
    pub config: &'a Config,
    /// The shared region (limiter slots, flags).
    pub shared: &'static Shared,
    /// The worker's logger.
    pub log: &'a Logger,
    /// Only checking the settings (`pitcher -t`, a reload in the master):
    /// open no file, start no thread.
    pub check_only: bool,
}

/// Most registered modules (shared-memory flags are per registration).
pub const MAX_MODULES: usize = crate::shm::MAX_MODULES;

/// The modules compiled in, by name. Their index is their shared flag.
pub fn registry() -> &'static [Registration] {
    modules::REGISTRY
}

/// Index of a registered module.
pub fn registry_index(name: &str) -> Option<usize> {
    registry().iter().position(|r| r.name == name)
}

/// A loaded module of one snapshot.
pub struct Loaded {
    /// The registered name.
    pub name: &'static str,
    /// The built module.
    pub module: Arc<dyn Module>,
    /// Index in [`registry`]: the shared on/off flag.
    pub flag: usize,
    /// Kept on under overload.
    pub essential: bool,
}

/// For each point, the loaded modules to call, in order.
#[derive(Debug, Default, Clone)]
pub struct Pipeline {
    by_point: [Vec<usize>; 6],
}

impl Pipeline {
    /// The modules (indices into [`Modules::loaded`]) to call at `p`.
    pub fn at(&self, p: Point) -> &[usize] {
        &self.by_point[p as usize]
    }

    /// Calls no module at any point?
    pub fn is_empty(&self) -> bool {
        self.by_point.iter().all(|v| v.is_empty())
    }
}

/// The modules of one configuration snapshot and the pipelines built from
/// them: one global, one per route that names its own modules.
#[derive(Default)]
pub struct Modules {
    /// The enabled modules, in pipeline order.
    pub loaded: Vec<Loaded>,
    /// The pipeline of routes that name no modules of their own.
    pub global: Pipeline,
    /// Per route (index in `config.routes`); `None`: the global pipeline.
    pub per_route: Vec<Option<Pipeline>>,
}

impl std::fmt::Debug for Modules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modules").field("loaded", &self.loaded.iter().map(|l| l.name).collect::<Vec<_>>()).finish()
    }
}

impl Modules {
    /// Builds the enabled modules of `config`. Errors name the module's
    /// table and line.
    pub fn build(config: &Config, shared: &'static Shared, log: &Logger) -> Result<Modules, ModuleError> {
        Modules::build_with(config, shared, log, false)
    }

    fn build_with(
        config: &Config,
        shared: &'static Shared,
        log: &Logger,
        check_only: bool,
    ) -> Result<Modules, ModuleError> {
        let mut out = Modules::default();
        let b = Build { config, shared, log, check_only };
        for mc in config.modules.iter().filter(|m| m.enabled) {
            let error = |problem: ModuleProblem| ModuleError {
                file: mc.file.clone(),
                line: mc.line,
                module: mc.name.clone(),
                problem,
            };
            let flag = registry_index(&mc.name)
                .ok_or_else(|| error(ModuleProblem::Unknown { known: registry().iter().map(|r| r.name).collect() }))?;
            let module = (registry()[flag].build)(mc, &b).map_err(|e| error(e.into()))?;
            out.loaded.push(Loaded { name: registry()[flag].name, module, flag, essential: mc.essential });
        }
        let all: Vec<usize> = (0..out.loaded.len()).collect();
        out.global = out.pipeline(&all);
        for r in &config.routes {
            out.per_route.push(r.modules.as_ref().map(|names| {
                let idx: Vec<usize> =
                    names.iter().filter_map(|n| out.loaded.iter().position(|l| l.name == n)).collect();
                out.pipeline(&idx)
            }));
        }
        Ok(out)
    }

    fn pipeline(&self, order: &[usize]) -> Pipeline {
        let mut p = Pipeline::default();
        for &i in order {
            for &pt in self.loaded[i].module.points() {
                p.by_point[pt as usize].push(i);
            }
        }
        p
    }

    /// The pipeline of a route (`None`: before routing).
    pub fn pipeline_for(&self, route: Option<usize>) -> &Pipeline {
        match route.and_then(|r| self.per_route.get(r)).and_then(|p| p.as_ref()) {
            Some(p) => p,
            None => &self.global,
        }
    }

    /// Is loaded module `i` on right now (not switched off at run time, and
    /// not shed because `shedding` non-essential modules)?
    pub fn active(&self, i: usize, shared: &Shared, shedding: bool) -> bool {
        let l = &self.loaded[i];
        (l.essential || !shedding) && shared.modules[l.flag].disabled.load(Relaxed) == 0
    }

    /// Asks every module to reopen its files (SIGUSR1).
    pub fn reopen(&self) {
        for l in &self.loaded {
            l.module.reopen();
        }
    }

    /// Runs every module's housekeeping (about every 100 ms).
    pub fn tick(&self) {
        for l in &self.loaded {
            l.module.tick();
        }
    }
}

/// Checks the module tables of a configuration (for `-t` and reloads) by
/// building every enabled module; nothing is written to `shared`.
pub fn validate(config: &Config, shared: &'static Shared) -> Result<(), ModuleError> {
    let log = Logger::root(slog::Discard, slog::o!());
    Modules::build_with(config, shared, &log, true).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_examples_have_valid_modules() {
        let region = crate::shm::Region::create().unwrap();
        let shared = region.leak();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                validate(&c, shared).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn unknown_modules_and_settings_name_file_and_line() {
        let region = crate::shm::Region::create().unwrap();
        let shared = region.leak();
        let base =
            "[[listeners]]\naddress = \"127.0.0.1:1\"\n[[clusters]]\nname = \"a\"\nbackends = [\"127.0.0.1:2\"]\n";
        let c = Config::parse(std::path::Path::new("x.toml"), &format!("{base}[modules.nosuch]\n")).unwrap();
        let e = validate(&c, shared).unwrap_err();
        assert!(matches!(e.problem, ModuleProblem::Unknown { .. }) && e.line == 6, "{e}");
        let e = e.to_string();
        assert!(e.starts_with("x.toml:6: [modules.nosuch]: no such module"), "{e}");
        let c =
            Config::parse(std::path::Path::new("x.toml"), &format!("{base}[modules.throttle]\nburst = 1\n")).unwrap();
        let e = validate(&c, shared).unwrap_err();
        assert!(matches!(e.problem, ModuleProblem::Settings(SettingsError::Table { .. })), "{e}");
        let e = e.to_string();
        assert!(e.contains("x.toml:6: [modules.throttle]") && e.contains("rate_per_sec"), "{e}");
    }
}
