//! Configuration: the TOML file as written (`file` structs, serde with
//! `deny_unknown_fields`) and the resolved, validated [`Config`] the rest of
//! Pitcher uses, with defaults filled in and names resolved to indices.
//!
//! Owns: parsing, validation and error reporting with file, line and reason.
//! Must not: open sockets, touch the filesystem beyond reading the file.

pub mod addr;
pub mod env;
pub mod include;
pub mod names;
pub mod route;
pub mod spanned;
pub mod units;
pub mod upstream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spanned::Spanned;

pub use addr::{BackendAddr, BackendEntry, BackendSpec, ListenAddr, NamedBackend, SockAddr};
pub use include::Loaded;
pub use names::{ClusterDns, ResolvedName, DEFAULT_RESOLVE_INTERVAL};
pub use route::{
    Action, Condition, HostHeader, HostMatch, PathAction, PathMatch, Pattern, RouteConfig, Source, SplitArm, Sticky,
    ValueMatch,
};
pub use upstream::{BackendTls, Balance, HashKey, HealthCheck, Passive};

/// A configuration that was refused, with where and why.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file at fault (the main file or an included one).
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub line_col: Option<(usize, usize)>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((l, c)) => write!(f, "{}:{}:{}: {}", self.file.display(), l, c, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// Number of worker processes: a count or `"auto"` (one per core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One worker per core.
    Auto,
    /// This many workers.
    Count(usize),
}

/// As written: a number or `"auto"`.
impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if (1..=512).contains(&n) => Ok(Workers::Count(n as usize)),
            Raw::N(n) => Err(serde::de::Error::custom(format!("workers = {n}: expected 1 to 512 or \"auto\""))),
            Raw::S(s) if s == "auto" => Ok(Workers::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!("workers = {s:?}: expected a number or \"auto\""))),
        }
    }
}

/// Where the error log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// The standard error of the process.
    Stderr,
    /// A file, appended to.
    File(PathBuf),
    /// `syslog:udp:IP:PORT` or `syslog:unix:/dev/log` (RFC 5424, facility
    /// daemon, APP-NAME pitcher).
    Syslog(crate::syslog::SyslogAddr),
}

/// The file as written. Every field is documented in `conf/pitcher.toml`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<Workers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    control_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_protocols: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    normalize_upstream_path: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_expect: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ticket_key_rotation_ms: Option<u64>,
    /// Default DNS server of the clusters' backend names (`IP[:PORT]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    resolver: Option<Spanned<String>>,
    #[serde(default)]
    listeners: Vec<FileListener>,
    #[serde(default)]
    clusters: Vec<Spanned<FileCluster>>,
    #[serde(default)]
    routes: Vec<Spanned<route::FileRoute>>,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    limits: FileLimits,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<FileAdmin>,
    /// `[modules]`: an optional `order` list and one table per module.
    #[serde(default)]
    /// (Plain values: toml's spans do not cover tables given by sub-tables
    /// or dotted keys; lines are found in the text instead.)
    modules: toml::Table,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    address: Spanned<ListenAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    address: Spanned<ListenAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backlog: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reuseport: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Spanned<FileTls>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_https_port: Option<u16>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    certificates: Vec<FileCertificate>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileCertificate {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    name: Spanned<String>,
    backends: Spanned<Vec<Spanned<BackendEntry>>>,
    /// "optional" (default) or "required": must every name resolve at load?
    #[serde(skip_serializing_if = "Option::is_none")]
    resolve: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolve_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolver: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_budget_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lb: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_key: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_start_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check: Option<Spanned<upstream::FileHealthCheck>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passive: Option<Spanned<upstream::FilePassive>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Spanned<upstream::FileBackendTls>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    client_header_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_body_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_body_total_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_body_rate_window_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_body_min_rate_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_write_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive_idle_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_connect_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_read_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_write_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel_idle_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_handshake_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_header_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_headers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tls_handshakes: Option<usize>,
}

/// A listening socket to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Where to listen.
    pub address: ListenAddr,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// One `SO_REUSEPORT` socket per worker (the kernel spreads new
    /// connections over them) instead of one socket whose queue every
    /// worker accepts from. TCP only.
    pub reuseport: bool,
    /// TLS is terminated on this listener (`None`: cleartext HTTP).
    pub tls: Option<ListenerTls>,
    /// A cleartext listener that answers every request with a redirect to
    /// `https://` on this port (301 for GET and HEAD, 308 for others).
    pub redirect_https_port: Option<u16>,
}

/// The `tls` table of a listener: where its certificates are. Only the
/// master reads these files (`crate::tls::load`); workers get the parsed
/// material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate/key pairs in the order given; the first is the default
    /// for clients whose server name no certificate covers.
    pub certificates: Vec<CertificateFiles>,
}

/// One certificate chain and its private key, as PEM files (relative
/// paths are taken from the main configuration file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The certificate chain: the leaf first, then intermediates.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A named group of backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The name routes refer to.
    pub name: String,
    /// Its backends, with their weights.
    pub backends: Vec<BackendSpec>,
    /// Idle upstream connections kept per backend, per worker.
    pub keepalive: usize,
    /// How long an idle pooled upstream connection is kept.
    pub keepalive_timeout: Duration,
    /// How many other backends a failed request is tried on: always when
    /// nothing was sent, and for idempotent requests whose backend failed
    /// before the response started.
    pub retries: u32,
    /// Retries happen only this soon after the request started.
    pub retry_budget: Duration,
    /// How requests are spread over the backends.
    pub lb: Balance,
    /// What a `hash` cluster hashes.
    pub hash_key: HashKey,
    /// Traffic to a backend that was added, re-admitted or came back up
    /// ramps linearly over this time (zero: no ramp).
    pub slow_start: Duration,
    /// Active health check done by the master (`None`: none).
    pub health_check: Option<HealthCheck>,
    /// Passive failure detection from real traffic.
    pub passive: Passive,
    /// Backends given by DNS name, and how the master resolves them. The
    /// addresses found are in `backends` once [`Config::with_resolved`]
    /// put them there.
    pub dns: ClusterDns,
    /// TLS to the backends (`None`: cleartext HTTP).
    pub tls: Option<BackendTls>,
}

/// One `[modules.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleConfig {
    /// The module's name (the table's key).
    pub name: String,
    /// Loaded at all (`enabled = false` keeps the table but not the module).
    pub enabled: bool,
    /// Non-essential modules are switched off under overload.
    pub essential: bool,
    /// The module's own keys (without `enabled` and `essential`).
    pub settings: toml::Table,
    /// 1-based line of the table, for error messages.
    pub line: usize,
    /// The file that holds the table (the main file or an included one).
    pub file: PathBuf,
}

/// Every wait has a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request head (or the connection) to its end.
    pub client_header: Duration,
    /// Longest wait for the next piece of a request body.
    pub client_body: Duration,
    /// Longest time from the end of a request head to the end of its body.
    pub client_body_total: Duration,
    /// A request body is measured over windows of this length (the first
    /// one is its grace period).
    pub client_body_rate_window: Duration,
    /// Least body bytes per second a client must send over each window
    /// while Pitcher waits for them (0: no minimum).
    pub client_body_min_rate_bytes: u64,
    /// Longest wait for a client to accept more response bytes.
    pub client_write: Duration,
    /// Idle time allowed between requests on a client connection.
    pub keepalive_idle: Duration,
    /// Longest wait for a connection to a backend.
    pub upstream_connect: Duration,
    /// Longest wait for the next bytes of a response from a backend.
    pub upstream_read: Duration,
    /// Longest wait for a backend to accept more request bytes.
    pub upstream_write: Duration,
    /// Longest a tunnel (after a 101) may pass no byte in either direction.
    pub tunnel_idle: Duration,
    /// Longest a TLS handshake may take, from the accept.
    pub tls_handshake: Duration,
}

/// Size limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or response head, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields in a head.
    pub max_headers: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Client connections per worker.
    pub max_connections: usize,
    /// TLS handshakes in progress per worker; connections beyond are closed.
    pub max_tls_handshakes: usize,
}

/// The resolved configuration: no `Option`s left, names resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages and reloads).
    pub source: PathBuf,
    /// Worker processes (`auto` resolved to the number of cores).
    pub workers: usize,
    /// The master's pid file (locked while it runs).
    pub pid_file: PathBuf,
    /// The master's control socket (`ctl`, `-s`).
    pub control_socket: PathBuf,
    /// Where the error log goes.
    pub error_log: LogTarget,
    /// Least severe level written to the error log.
    pub log_level: slog::Level,
    /// User the workers run as when started by root (`None`: `nobody`).
    pub user: Option<String>,
    /// Group the workers run as (`None`: the user's group).
    pub group: Option<String>,
    /// Longest a graceful stop or a reload waits for requests in flight.
    pub drain_timeout: Duration,
    /// How long a new master may take to report ready before rollback.
    pub upgrade_timeout: Duration,
    /// Protocols a request may switch to (`Upgrade`), lower case. Others
    /// are not tunnelled: the request goes on as plain HTTP.
    pub upgrade_protocols: Vec<String>,
    /// Send the backend the normalised path (the one routes and modules
    /// match) instead of the target as received. Default `false`.
    pub normalize_upstream_path: bool,
    /// Pass `Expect: 100-continue` on to backends (Pitcher answers it
    /// itself either way; a backend's own 100 is then not relayed again).
    pub forward_expect: bool,
    /// How often the master draws a new TLS session-ticket key (tickets
    /// stay valid two periods after their key stopped sealing).
    pub tls_ticket_key_rotation: Duration,
    /// Sockets to listen on.
    pub listeners: Vec<ListenerConfig>,
    /// Backend clusters, by index.
    pub clusters: Vec<ClusterConfig>,
    /// Routing rules, in the order they are tried.
    pub routes: Vec<RouteConfig>,
    /// Every timeout.
    pub timeouts: Timeouts,
    /// Size limits.
    pub limits: Limits,
    /// Module tables, in pipeline order (`[modules] order`, then the rest
    /// in name order).
    pub modules: Vec<ModuleConfig>,
    /// `[admin]`: where the master serves `/metrics` and `/status`
    /// (`None`: nowhere, the default).
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: the master's HTTP listener for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `IP:PORT` or `unix:/path`.
    pub address: ListenAddr,
    /// How long a client has to send its request and read the answer.
    pub client_timeout: Duration,
}

/// Default `listen(2)` backlog: long, so that a burst or a restart does not
/// cause SYN retransmits.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Smallest header limit accepted: a request line and a Host must fit.
pub const MIN_HEADER_BYTES: usize = 1024;
/// Largest header limit accepted; it sizes every connection's read buffer.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

impl Config {
    /// The files the master opens for its workers (which may run as a user
    /// that cannot open them): the error log, then the `path` of every
    /// enabled access log. Read from the settings as written (the module
    /// checked them when the configuration was validated), so that the
    /// master needs nothing of the modules to find them.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let error_log = match &self.error_log {
            LogTarget::File(p) => Some(p.clone()),
            LogTarget::Stderr | LogTarget::Syslog(_) => None,
        };
        let access_logs = self
            .modules
            .iter()
            .filter(|m| m.enabled && m.name == "access_log")
            .filter_map(|m| m.settings.get("path")?.as_str().map(PathBuf::from));
        error_log.into_iter().chain(access_logs).collect()
    }

    /// Reads and validates a configuration file and the files it includes,
    /// with `${VAR}` from the environment (see [`include`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        include::load(path).map(|l| l.config)
    }

    /// Parses and validates configuration text as the operator writes it
    /// (includes relative to `path`'s directory, `${VAR}`, `"10s"`).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        include::parse(path, text, &|name| std::env::var(name).ok()).map(|l| l.config)
    }

    /// Parses the resolved text a master produced ([`Loaded::text`]): no
    /// include is read and nothing is expanded. `path` is used in messages.
    pub fn parse_resolved(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_located(path, text, &|offset| (path.to_path_buf(), line_col(text, offset)))
    }

    /// Reads the configuration of a resolved text from the master's parse
    /// of it ([`Loaded::form`]) instead of parsing the text again, then
    /// checks it all as [`Config::parse_resolved`] does: the form is only
    /// a faster way to the same file structure, never trusted more than
    /// the text. A form that cannot be read (or none) falls back to the
    /// text.
    pub fn parse_sent(path: &Path, text: &str, form: Option<&Form>) -> Result<Config, ConfigError> {
        match form.map(|f| serde_json::from_str::<FileConfig>(f)) {
            Some(Ok(file)) => {
                Config::from_file(path, text, file, &|offset| (path.to_path_buf(), line_col(text, offset)))
            }
            Some(Err(_)) | None => Config::parse_resolved(path, text),
        }
    }

    /// The typed parse; `locate` maps an offset in `text` to the file,
    /// line and column it came from.
    fn parse_located(
        path: &Path,
        text: &str,
        locate: &dyn Fn(usize) -> (PathBuf, (usize, usize)),
    ) -> Result<Config, ConfigError> {
        let file = FileConfig::read(path, text, locate)?;
        Config::from_file(path, text, file, locate)
    }

    /// The checks and resolution of a typed file (`text`: what it was
    /// read from).
    fn from_file(
        path: &Path,
        text: &str,
        file: FileConfig,
        locate: &dyn Fn(usize) -> (PathBuf, (usize, usize)),
    ) -> Result<Config, ConfigError> {
        let err_at = |span, reason| error_at(path, locate, span, reason);
        let mut config = resolve(path, file).map_err(|(span, reason)| err_at(span, reason))?;
        for m in &mut config.modules {
            m.file = path.to_path_buf();
            m.line = module_line(text, &m.name);
        }
        for n in config.clusters.iter_mut().flat_map(|c| c.dns.names.iter_mut()) {
            // `line` held the entry's byte offset until now.
            let (file, (line, _)) = locate(n.line);
            n.file = file;
            n.line = line;
        }
        Ok(config)
    }

    /// Index of the cluster with this name.
    pub fn cluster_index(&self, name: &str) -> Option<usize> {
        self.clusters.iter().position(|c| c.name == name)
    }
}

type Resolve<T> = Result<T, (Option<std::ops::Range<usize>>, String)>;

/// The master's parse of a configuration before its checks, as JSON with
/// every span kept (`config::spanned`): what it sends its workers beside
/// the text, so that they do not parse the TOML again. A string inside
/// the message (a raw JSON value cannot sit in the channel's tagged
/// messages), decoded apart.
pub type Form = String;

impl FileConfig {
    /// The typed parse of `text` (`locate`: see [`Config::parse_located`]).
    fn read(
        path: &Path,
        text: &str,
        locate: &dyn Fn(usize) -> (PathBuf, (usize, usize)),
    ) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| error_at(path, locate, e.span(), e.message().to_string()))
    }

    /// The typed read of a text the caller parsed already (`doc`): from
    /// that parse rather than a second one.
    fn read_document(
        path: &Path,
        doc: toml_edit::ImDocument<String>,
        locate: &dyn Fn(usize) -> (PathBuf, (usize, usize)),
    ) -> Result<FileConfig, ConfigError> {
        FileConfig::deserialize(toml_edit::de::Deserializer::from(doc))
            .map_err(|e| error_at(path, locate, e.span(), e.message().to_string()))
    }
}

/// An error at `span` of a text (`locate` maps its offsets to a file, line
/// and column); without a span, the error is `path`'s.
fn error_at(
    path: &Path,
    locate: &dyn Fn(usize) -> (PathBuf, (usize, usize)),
    span: Option<std::ops::Range<usize>>,
    reason: String,
) -> ConfigError {
    let (file, line_col) = match span {
        Some(s) => {
            let (f, lc) = locate(s.start);
            (f, Some(lc))
        }
        None => (path.to_path_buf(), None),
    };
    ConfigError { file, line_col, reason }
}

fn ms(v: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default_ms))
}

fn resolve(path: &Path, f: FileConfig) -> Resolve<Config> {
    let workers = match f.workers.unwrap_or(Workers::Count(1)) {
        Workers::Count(n) => n,
        Workers::Auto => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let log_level = match &f.log_level {
        None => slog::Level::Info,
        Some(s) => match s.get_ref().as_str() {
            "critical" | "crit" => slog::Level::Critical,
            "error" => slog::Level::Error,
            "warn" | "warning" => slog::Level::Warning,
            // nginx's `notice` (start, reload, exit messages) is our info.
            "notice" | "info" => slog::Level::Info,
            "debug" => slog::Level::Debug,
            "trace" => slog::Level::Trace,
            other => {
                return Err((
                    Some(s.span()),
                    format!("log_level {other:?}: expected one of crit, error, warn, notice, info, debug, trace"),
                ))
            }
        },
    };
    let error_log = match f.error_log.as_deref() {
        None | Some("stderr") => LogTarget::Stderr,
        Some(s) if s.starts_with("syslog:") => match crate::syslog::SyslogAddr::parse(&s["syslog:".len()..]) {
            Ok(a) => LogTarget::Syslog(a),
            Err(e) => return Err((None, format!("error_log = {e} after \"syslog:\""))),
        },
        Some(p) => LogTarget::File(PathBuf::from(p)),
    };

    if f.listeners.is_empty() {
        return Err((None, "no [[listeners]]: at least one listening address is needed".into()));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(f.listeners.len());
    for l in &f.listeners {
        let address = l.address.get_ref().clone();
        if listeners.iter().any(|x| x.address == address) {
            return Err((Some(l.address.span()), format!("listener {address} is given twice")));
        }
        let backlog = l.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog == 0 {
            return Err((Some(l.address.span()), "backlog must be at least 1".into()));
        }
        let reuseport = l.reuseport.unwrap_or(false);
        if reuseport && matches!(address.0, SockAddr::Unix(_)) {
            return Err((Some(l.address.span()), format!("reuseport is for TCP listeners, not {address}")));
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                if t.get_ref().certificates.is_empty() {
                    return Err((Some(t.span()), format!("listener {address}: tls.certificates is empty")));
                }
                let dir = path.parent().unwrap_or(Path::new("/"));
                let certificates = t
                    .get_ref()
                    .certificates
                    .iter()
                    .map(|c| CertificateFiles { cert: dir.join(&c.cert), key: dir.join(&c.key) })
                    .collect();
                Some(ListenerTls { certificates })
            }
        };
        let redirect_https_port = l.redirect_https_port;
        if redirect_https_port == Some(0) {
            return Err((
                Some(l.address.span()),
                format!("listener {address}: redirect_https_port must be 1 to 65535"),
            ));
        }
        if redirect_https_port.is_some() && tls.is_some() {
            return Err((
                Some(l.address.span()),
                format!("listener {address}: a TLS listener cannot redirect to https (redirect_https_port)"),
            ));
        }
        listeners.push(ListenerConfig { address, backlog, reuseport, tls, redirect_https_port });
    }

    let mut clusters: Vec<ClusterConfig> = Vec::with_capacity(f.clusters.len());
    // Names seen so far: a hash, not a scan of `clusters` (thousands of them).
    let mut cluster_seen: std::collections::HashSet<&str> = std::collections::HashSet::with_capacity(f.clusters.len());
    for c in &f.clusters {
        let span = c.span();
        let c = c.get_ref();
        let name = c.name.get_ref().clone();
        if name.is_empty() {
            return Err((Some(c.name.span()), "cluster name is empty".into()));
        }
        if !cluster_seen.insert(c.name.get_ref().as_str()) {
            return Err((Some(c.name.span()), format!("cluster {name:?} is defined twice")));
        }
        if c.backends.get_ref().is_empty() {
            return Err((Some(c.backends.span()), format!("cluster {name:?} has no backends")));
        }
        let mut backends: Vec<BackendSpec> = Vec::new();
        let mut names: Vec<NamedBackend> = Vec::new();
        for e in c.backends.get_ref() {
            let twice =
                |what: String| Err((Some(e.span()), format!("backend {what} is listed twice in cluster {name:?}")));
            match e.get_ref() {
                BackendEntry::Addr(b) if backends.iter().any(|x| x.addr == b.addr) => return twice(b.addr.to_string()),
                BackendEntry::Addr(b) => backends.push(b.clone()),
                BackendEntry::Name(n) if names.iter().any(|x| x.key() == n.key()) => return twice(n.key()),
                BackendEntry::Name(n) => names.push(NamedBackend { line: e.span().start, ..n.clone() }),
            }
        }
        let dns = names::cluster_dns(
            &name,
            names,
            c.resolve.as_ref(),
            c.resolve_interval_ms,
            c.resolver.as_ref().or(f.resolver.as_ref()),
        )
        .map_err(|(sp, e)| (Some(sp.unwrap_or_else(|| span.clone())), e))?;
        let _ = span;
        let lb = upstream::balance(c.lb.as_ref()).map_err(|(sp, e)| (Some(sp), e))?;
        let hash_key = upstream::hash_key(c.hash_key.as_ref()).map_err(|(sp, e)| (Some(sp), e))?;
        let health_check = match &c.health_check {
            None => None,
            Some(h) => Some(upstream::health_check(h.get_ref()).map_err(|e| (Some(h.span()), e))?),
        };
        let passive = match &c.passive {
            None => Passive::default(),
            Some(p) => upstream::passive(Some(p.get_ref())).map_err(|e| (Some(p.span()), e))?,
        };
        let tls = match &c.tls {
            None => None,
            Some(t) => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let tls = upstream::backend_tls(t.get_ref(), dir).map_err(|e| (Some(t.span()), e))?;
                let unix = backends.iter().any(|b| matches!(b.addr.0, SockAddr::Unix(_)));
                if unix && tls.sni.is_none() {
                    return Err((
                        Some(t.span()),
                        format!("cluster {name:?}: TLS to a Unix-socket backend needs tls.sni (the name to verify)"),
                    ));
                }
                Some(tls)
            }
        };
        clusters.push(ClusterConfig {
            name,
            backends,
            keepalive: c.keepalive.unwrap_or(64),
            keepalive_timeout: ms(c.keepalive_timeout_ms, 60_000),
            retries: c.retries.unwrap_or(1).min(16),
            retry_budget: ms(c.retry_budget_ms, 10_000),
            lb,
            hash_key,
            slow_start: ms(c.slow_start_ms, 0),
            health_check,
            passive,
            dns,
            tls,
        });
    }

    let mut routes = Vec::with_capacity(f.routes.len());
    let cluster_names: std::collections::HashMap<&str, usize> =
        clusters.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
    for (i, r) in f.routes.iter().enumerate() {
        // Errors without a key of their own point at the route.
        let route = route::resolve(r.get_ref(), i, &cluster_names, &f.modules)
            .map_err(|(span, e)| (span.or_else(|| Some(r.span())), e))?;
        routes.push(route);
    }

    let t = &f.timeouts;
    let timeouts = Timeouts {
        client_header: ms(t.client_header_ms, 10_000),
        client_body: ms(t.client_body_ms, 60_000),
        client_body_total: ms(t.client_body_total_ms, 3_600_000),
        client_body_rate_window: ms(t.client_body_rate_window_ms, 5_000),
        client_body_min_rate_bytes: t.client_body_min_rate_bytes.unwrap_or(500),
        client_write: ms(t.client_write_ms, 60_000),
        keepalive_idle: ms(t.keepalive_idle_ms, 75_000),
        upstream_connect: ms(t.upstream_connect_ms, 3_000),
        upstream_read: ms(t.upstream_read_ms, 60_000),
        upstream_write: ms(t.upstream_write_ms, 60_000),
        tunnel_idle: ms(t.tunnel_idle_ms, 300_000),
        tls_handshake: ms(t.tls_handshake_ms, 10_000),
    };
    for (name, d) in [
        ("client_header_ms", timeouts.client_header),
        ("client_body_ms", timeouts.client_body),
        ("client_body_total_ms", timeouts.client_body_total),
        ("client_body_rate_window_ms", timeouts.client_body_rate_window),
        ("client_write_ms", timeouts.client_write),
        ("keepalive_idle_ms", timeouts.keepalive_idle),
        ("upstream_connect_ms", timeouts.upstream_connect),
        ("upstream_read_ms", timeouts.upstream_read),
        ("upstream_write_ms", timeouts.upstream_write),
        ("tunnel_idle_ms", timeouts.tunnel_idle),
        ("tls_handshake_ms", timeouts.tls_handshake),
    ] {
        if d.is_zero() {
            return Err((None, format!("[timeouts] {name} must be greater than 0")));
        }
    }

    let l = &f.limits;
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(16 * 1024),
        max_headers: l.max_headers.unwrap_or(100),
        max_body_bytes: l.max_body_bytes.unwrap_or(100 * 1024 * 1024),
        max_connections: l.max_connections.unwrap_or(10_000),
        max_tls_handshakes: l.max_tls_handshakes.unwrap_or(1_000),
    };
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&limits.max_header_bytes) {
        return Err((
            None,
            format!(
                "[limits] max_header_bytes = {}: expected {MIN_HEADER_BYTES} to {MAX_HEADER_BYTES}",
                limits.max_header_bytes
            ),
        ));
    }
    if !(1..=1000).contains(&limits.max_headers) {
        return Err((None, format!("[limits] max_headers = {}: expected 1 to 1000", limits.max_headers)));
    }
    if limits.max_connections == 0 {
        return Err((None, "[limits] max_connections must be at least 1".into()));
    }
    if limits.max_tls_handshakes == 0 {
        return Err((None, "[limits] max_tls_handshakes must be at least 1".into()));
    }

    let modules = resolve_modules(&f.modules)?;
    let admin = match &f.admin {
        Some(a) => {
            let address = a.address.get_ref().clone();
            if listeners.iter().any(|l| l.address == address) {
                return Err((Some(a.address.span()), format!("[admin] address {address} is also a listener's")));
            }
            let client_timeout = ms(a.client_timeout_ms, 10_000);
            if client_timeout.is_zero() {
                return Err((None, "[admin] client_timeout_ms must be greater than 0".into()));
            }
            Some(AdminConfig { address, client_timeout })
        }
        None => None,
    };
    if f.tls_ticket_key_rotation_ms.is_some_and(|v| v < 1000) {
        return Err((None, "tls_ticket_key_rotation_ms must be at least 1000".into()));
    }

    Ok(Config {
        source: path.to_path_buf(),
        workers,
        pid_file: f.pid_file.unwrap_or_else(|| PathBuf::from("/run/pitcher.pid")),
        control_socket: f.control_socket.unwrap_or_else(|| PathBuf::from("/run/pitcher.sock")),
        error_log,
        log_level,
        user: f.user,
        group: f.group,
        drain_timeout: ms(f.drain_timeout_ms, 30_000),
        upgrade_timeout: ms(f.upgrade_timeout_ms, 10_000),
        upgrade_protocols: f
            .upgrade_protocols
            .clone()
            .unwrap_or_else(|| vec!["websocket".to_string()])
            .into_iter()
            .map(|p| p.to_ascii_lowercase())
            .collect(),
        normalize_upstream_path: f.normalize_upstream_path.unwrap_or(false),
        forward_expect: f.forward_expect.unwrap_or(false),
        tls_ticket_key_rotation: ms(f.tls_ticket_key_rotation_ms, 43_200_000),
        listeners,
        clusters,
        routes,
        timeouts,
        limits,
        modules,
        admin,
    })
}

/// `[modules]`: `order` (optional) and one table per module. `line` holds
/// the byte offset of the table until `Config::parse` turns it into a line.
fn resolve_modules(m: &toml::Table) -> Resolve<Vec<ModuleConfig>> {
    let mut order: Vec<String> = Vec::new();
    if let Some(o) = m.get("order") {
        let bad = || (None, "[modules] order must be a list of module names".to_string());
        for v in o.as_array().ok_or_else(bad)? {
            let name = v.as_str().ok_or_else(bad)?;
            if !m.contains_key(name) || name == "order" {
                return Err((None, format!("[modules] order names {name:?}, which has no [modules.{name}] table")));
            }
            if order.iter().any(|x| x == name) {
                return Err((None, format!("[modules] order names {name:?} twice")));
            }
            order.push(name.to_string());
        }
    }
    for name in m.keys() {
        if name != "order" && !order.contains(name) {
            order.push(name.clone());
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for name in order {
        let v = &m[&name];
        let mut table = v.as_table().cloned().ok_or((None, format!("[modules.{name}] must be a table")))?;
        let flag = |t: &mut toml::Table, key: &str, default: bool| -> Resolve<bool> {
            match t.remove(key) {
                None => Ok(default),
                Some(toml::Value::Boolean(b)) => Ok(b),
                Some(_) => Err((None, format!("[modules.{name}] {key} must be true or false"))),
            }
        };
        let enabled = flag(&mut table, "enabled", true)?;
        let essential = flag(&mut table, "essential", true)?;
        out.push(ModuleConfig { name, enabled, essential, settings: table, line: 0, file: PathBuf::new() });
    }
    Ok(out)
}

/// The line where a module's settings start: its `[modules.NAME...]`
/// header, else a `NAME.` / `NAME =` key under `[modules]`, else 0.
fn module_line(text: &str, name: &str) -> usize {
    let header = format!("[modules.{name}");
    let mut in_modules = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with(&header) && t[header.len()..].starts_with([']', '.']) {
            return i + 1;
        }
        if t.starts_with('[') {
            in_modules = t.starts_with("[modules]");
            continue;
        }
        if in_modules && t.starts_with(name) && t[name.len()..].trim_start().starts_with(['.', '=']) {
            return i + 1;
        }
    }
    0
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workers = 2
pid_file = "/tmp/p.pid"
[[listeners]]
address = "127.0.0.1:8080"
[[clusters]]
name = "app"
backends = ["127.0.0.1:9001", "127.0.0.1:9002 weight=3", "unix:/run/app.sock"]
[[routes]]
host = "*.example.com"
path_prefix = "/api"
cluster = "app"
[timeouts]
client_header_ms = 5000
"#;

    #[test]
    fn resolves_a_good_file() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.clusters[0].backends.len(), 3);
        assert_eq!(c.routes[0].host, HostMatch::Suffix(".example.com".into()));
        assert_eq!(c.timeouts.client_header, Duration::from_millis(5000));
        assert_eq!(c.timeouts.upstream_connect, Duration::from_millis(3000));
        assert_eq!(c.listeners[0].backlog, DEFAULT_BACKLOG);
    }

    #[test]
    fn reuseport_is_for_tcp_listeners_only() {
        assert!(!Config::parse(Path::new("t.toml"), GOOD).unwrap().listeners[0].reuseport, "off by default");
        let on = GOOD.replacen("[[listeners]]\n", "[[listeners]]\nreuseport = true\n", 1);
        assert!(Config::parse(Path::new("t.toml"), &on).unwrap().listeners[0].reuseport);
        let unix = format!("{GOOD}\n[[listeners]]\naddress = \"unix:/tmp/p.sock\"\nreuseport = true\n");
        let e = Config::parse(Path::new("t.toml"), &unix).unwrap_err().to_string();
        assert!(e.contains("reuseport is for TCP listeners"), "{e}");
    }

    #[test]
    fn unknown_key_has_file_and_line() {
        let bad = GOOD.replace("client_header_ms = 5000", "client_header_ms = 5000\nbogus = 1");
        let e = Config::parse(Path::new("t.toml"), &bad).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("t.toml:15:"), "{s}");
        assert!(s.contains("bogus"), "{s}");
    }

    #[test]
    fn bad_backend_and_unknown_cluster_have_lines() {
        let bad = GOOD.replace("weight=3", "weight=0");
        let e = Config::parse(Path::new("t.toml"), &bad).unwrap_err();
        assert_eq!(e.line_col.unwrap().0, 8, "{e}");
        let bad = GOOD.replace("cluster = \"app\"", "cluster = \"nope\"");
        let e = Config::parse(Path::new("t.toml"), &bad).unwrap_err();
        assert_eq!(e.line_col.unwrap().0, 12, "{e}");
        assert!(e.reason.contains("nope"));
    }

    #[test]
    fn the_form_sent_to_workers_gives_the_same_configuration_as_the_text() {
        let no_env = |_: &str| None;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let l =
                include::parse(&p, &std::fs::read_to_string(&p).unwrap(), &no_env).unwrap_or_else(|e| panic!("{e}"));
            let form = l.form.as_ref().expect("a form");
            let sent = Config::parse_sent(&p, &l.text, Some(form)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(sent, Config::parse_resolved(&p, &l.text).unwrap(), "{}", p.display());
            checked += 1;
        }
        assert!(checked >= 1, "no example file");
    }

    #[test]
    fn a_form_is_checked_like_the_text_and_an_unreadable_one_falls_back_to_it() {
        let p = Path::new("t.toml");
        let l = include::parse(p, GOOD, &|_: &str| None).unwrap();
        let form = l.form.unwrap();
        // The route's cluster renamed: read, then refused by the same
        // checks as the text, at its line.
        let f = form.as_str();
        let at = f.find(r#""cluster":["#).unwrap_or_else(|| panic!("no route cluster in {f}"));
        let end = at + f[at..].find(r#""app"]"#).unwrap_or_else(|| panic!("{f}"));
        let bad = format!("{}\"nope\"]{}", &f[..end], &f[end + 6..]);
        let e = Config::parse_sent(p, &l.text, Some(&bad)).unwrap_err();
        assert!(e.reason.contains("nope"), "{e}");
        assert!(e.line_col.is_some(), "{e}");
        // Not a form at all, or an unknown key: the text is parsed instead.
        for junk in [r#"{"bogus":1}"#, "[]"] {
            assert_eq!(Config::parse_sent(p, &l.text, Some(&junk.to_string())).unwrap(), l.config);
        }
    }

    #[test]
    fn cluster_tls_tables() {
        let with = |tls: &str| GOOD.replacen("backends = [", &format!("{tls}\nbackends = ["), 1);
        // The Unix backend needs a name to check.
        let e = Config::parse(Path::new("/etc/p/t.toml"), &with("tls = {}")).unwrap_err().to_string();
        assert!(e.contains("needs tls.sni"), "{e}");
        let c =
            Config::parse(Path::new("/etc/p/t.toml"), &with("tls = { sni = \"API.internal\", ca_file = \"ca.pem\" }"))
                .unwrap();
        let t = c.clusters[0].tls.as_ref().unwrap();
        assert!(t.verify);
        assert_eq!(t.sni.as_deref(), Some("api.internal"));
        assert_eq!(t.ca_file.as_deref(), Some(Path::new("/etc/p/ca.pem")));
        assert!(
            !Config::parse(Path::new("t.toml"), &with("tls = { sni = \"a\", verify = false }")).unwrap().clusters[0]
                .tls
                .as_ref()
                .unwrap()
                .verify
        );
        for bad in ["sni = \"10.0.0.1\"", "sni = \"a..b\"", "sni = \"-a.b\"", "ca_file = \"\"", "verify = 1"] {
            let text = with(&format!("tls = {{ sni = \"x.y\", {bad} }}").replace("sni = \"x.y\", sni", "sni"));
            assert!(Config::parse(Path::new("t.toml"), &text).is_err(), "{bad}");
        }
        assert!(Config::parse(Path::new("t.toml"), GOOD).unwrap().clusters[0].tls.is_none());
    }

    #[test]
    fn tls_tables_resolve_relative_paths_and_refuse_contradictions() {
        let with = |extra: &str| {
            GOOD.replace("address = \"127.0.0.1:8080\"", &format!("address = \"127.0.0.1:8080\"\n{extra}"))
        };
        let c = Config::parse(
            Path::new("/etc/p/t.toml"),
            &with("tls = { certificates = [{ cert = \"a.pem\", key = \"/k/a.key\" }] }"),
        )
        .unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.certificates[0].cert, Path::new("/etc/p/a.pem"));
        assert_eq!(tls.certificates[0].key, Path::new("/k/a.key"));
        let e = Config::parse(Path::new("t.toml"), &with("tls = { certificates = [] }")).unwrap_err();
        assert!(e.reason.contains("tls.certificates is empty"), "{e}");
        let e = Config::parse(
            Path::new("t.toml"),
            &with("redirect_https_port = 443\ntls = { certificates = [{ cert = \"a\", key = \"b\" }] }"),
        )
        .unwrap_err();
        assert!(e.reason.contains("cannot redirect"), "{e}");
        let e = Config::parse(Path::new("t.toml"), &with("redirect_https_port = 0")).unwrap_err();
        assert!(e.reason.contains("1 to 65535"), "{e}");
        let c = Config::parse(Path::new("t.toml"), &with("redirect_https_port = 443")).unwrap();
        assert_eq!(c.listeners[0].redirect_https_port, Some(443));
    }

    #[test]
    fn the_shipped_examples_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn backend_names_are_kept_with_their_line_and_resolved_in() {
        let text = GOOD.replace(
            "\"unix:/run/app.sock\"]",
            "\"unix:/run/app.sock\",\n  \"App.internal:9001 weight=2\"]\nresolve = \"required\"\nresolve_interval_ms = 500\nresolver = \"127.0.0.1:5353\"",
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let dns = &c.clusters[0].dns;
        assert_eq!(c.clusters[0].backends.len(), 3);
        assert_eq!(dns.names.len(), 1);
        assert_eq!((dns.names[0].key().as_str(), dns.names[0].line), ("app.internal:9001", 9));
        assert_eq!(dns.names[0].file, Path::new("t.toml"));
        assert!(dns.required);
        assert_eq!(dns.interval, Duration::from_millis(500));
        assert_eq!(dns.resolver, Some("127.0.0.1:5353".parse().unwrap()));
        let r = vec![ResolvedName {
            cluster: "app".into(),
            name: "app.internal:9001".into(),
            addrs: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        }];
        let resolved = c.with_resolved(&r);
        let addrs: Vec<String> =
            resolved.clusters[0].backends.iter().map(|b| format!("{} {}", b.addr, b.weight)).collect();
        // 127.0.0.1:9001 is listed already (weight 1): not added twice.
        assert_eq!(addrs[3..], ["127.0.0.2:9001 2".to_string()]);
        assert_eq!(c.with_resolved(&[]), c);

        let bad = text.replace("\"required\"", "\"maybe\"");
        assert!(Config::parse(Path::new("t.toml"), &bad).unwrap_err().reason.contains("maybe"));
        let bad = text.replace("127.0.0.1:5353", "dns.example");
        assert!(Config::parse(Path::new("t.toml"), &bad).unwrap_err().reason.contains("resolver"));
        let twice = text.replace("weight=2\"", "weight=2\", \"app.internal:9001\"");
        assert!(Config::parse(Path::new("t.toml"), &twice).unwrap_err().reason.contains("twice"));
        let units = text.replace("resolve_interval_ms = 500", "resolve_interval_ms = \"30s\"");
        let c = Config::parse(Path::new("t.toml"), &units).unwrap();
        assert_eq!(c.clusters[0].dns.interval, Duration::from_secs(30));
    }
}
