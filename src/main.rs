//! The `pitcher` command: parses the command line and hands over to the
//! master, a worker, or a one-shot action (`-t`, `-s`, `ctl`). Every path
//! returns a [`MainError`] on failure; [`report`] is the one place that
//! prints it and chooses the exit status.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use pitcher::channel::{self, Channel, ChannelError, ManifestError, ToWorker};
use pitcher::config::{Config, ConfigError};
use pitcher::control::{self, Request};
use pitcher::hooks::ModuleError;
use pitcher::master::daemon::{self, Notifier};
use pitcher::master::{Handover, Master, MasterArgs, NotRunning, PidFile, Served};
use pitcher::shm::{Region, SlotTable};

/// Default configuration file.
const DEFAULT_CONFIG: &str = "/etc/pitcher/pitcher.toml";

#[derive(Debug, Parser)]
#[command(name = "pitcher", version, about = "HTTP/1.1 reverse proxy: master + mio workers")]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// Test the configuration file and exit.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// With `-t`: print the effective routing table, one route a line in
    /// precedence order (host, path, conditions, action, [name]).
    #[arg(long = "routes", requires = "test")]
    routes: bool,
    /// Send a command to the running master: reload, upgrade, quit, stop, reopen.
    #[arg(short = 's', long = "signal", value_name = "SIGNAL")]
    signal: Option<String>,
    /// Keep the master in the foreground (for systemd and supervisord).
    #[arg(long = "foreground", short = 'f')]
    foreground: bool,
    /// Run one worker in the foreground, without a master (for debugging).
    #[arg(long = "single-process")]
    single_process: bool,
    /// Worker mode: started by the master, never by hand.
    #[arg(long = "worker", hide = true)]
    worker: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ask the running master (through its control socket).
    Ctl {
        /// Print the master's JSON answer.
        #[arg(long)]
        json: bool,
        /// status | upstreams | modules | module enable|disable NAME
        #[arg(required = true)]
        words: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// The one place where a failure becomes a message on stderr and an exit
/// status (2 for a command line that asks for something unknown, 1 for
/// everything else).
fn report(e: &MainError) -> ExitCode {
    match e {
        MainError::Logged => {}
        MainError::Test { path, source } => {
            eprintln!("pitcher: {source}");
            eprintln!("pitcher: configuration file {} test failed", path.display());
        }
        other => eprintln!("pitcher: {other}"),
    }
    match e {
        MainError::UnknownSignal { .. } => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Why the command failed. The text is what the operator reads after
/// `pitcher: `.
#[derive(Debug, thiserror::Error)]
enum MainError {
    /// Already written to the error log; nothing more to print.
    #[error("see the error log")]
    Logged,
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `-t` on a configuration that does not load.
    #[error("{source}")]
    Test { path: PathBuf, source: LoadError },
    #[error("bad upgrade channel: {0}")]
    UpgradeChannel(ChannelError),
    #[error(transparent)]
    PidFile(std::io::Error),
    #[error("cannot receive the listeners from the old master: {0}")]
    Handover(std::io::Error),
    #[error("cannot go on in a child after the startup: {0}")]
    LeaveStartup(std::io::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
    #[error(
        "reuseport of {address} differs from the running master's sockets: restart Pitcher (stop, start) to change it"
    )]
    ReuseportChanged { address: String },
    #[error("cannot daemonize: {0}")]
    Daemonize(std::io::Error),
    #[error("cannot open the error log: {0}")]
    ErrorLog(std::io::Error),
    #[error(transparent)]
    Start(std::io::Error),
    #[error("--worker is for processes started by the master")]
    NotAWorker,
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot create the shared region: {0}")]
    Region(std::io::Error),
    #[error("worker failed: {0}")]
    WorkerFailed(std::io::Error),
    #[error("unknown signal {0:?}: expected reload, upgrade, quit, stop or reopen")]
    UnknownSignal(String),
    #[error("{}: cannot read: {source}", path.display())]
    ControlPaths { path: PathBuf, source: std::io::Error },
    #[error("{sig} failed: {message}")]
    Refused { sig: String, message: String },
    #[error("cannot reach the master: {}: {source}; not signalling: {why}", socket.display())]
    NotSignalling { socket: PathBuf, source: std::io::Error, why: NotRunning },
    #[error("cannot signal master pid {pid}: {source}")]
    Kill { pid: u32, source: nix::errno::Errno },
    #[error("cannot reach the master at {}: {source}", socket.display())]
    Unreachable { socket: PathBuf, source: std::io::Error },
}

/// Why a configuration does not load (for `-t`, a start, single process).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create a shared region: {0}")]
    Region(std::io::Error),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Tls(#[from] pitcher::tls::TlsError),
}

/// Why a worker could not start (printed after `pitcher: worker: `).
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("bad channel: {0}")]
    Channel(ChannelError),
    #[error("files from the master refused: {0}")]
    Files(String),
    #[error("expected a configuration from the master, got {0}")]
    NoConfiguration(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listener manifest refused: {0}")]
    Manifest(#[from] ManifestError),
    #[error("cannot map the shared region: {0}")]
    Region(std::io::Error),
    #[error("cannot open the error log: {0}")]
    ErrorLog(std::io::Error),
    #[error("cannot drop privileges: {0}")]
    Privileges(#[from] PrivilegeError),
    #[error("{0}")]
    Signals(std::io::Error),
}

/// Why a worker could not switch to its user and group.
#[derive(Debug, thiserror::Error)]
enum PrivilegeError {
    #[error("{0}")]
    Lookup(nix::errno::Errno),
    #[error("no user {0:?}")]
    NoUser(String),
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("{call}: {source}")]
    Call { call: &'static str, source: nix::errno::Errno },
}

fn run(cli: &Cli) -> Result<ExitCode, MainError> {
    if cli.worker {
        return worker_main(cli);
    }
    if let Some(Cmd::Ctl { json, words }) = &cli.command {
        return ctl(&cli.config, *json, words);
    }
    if let Some(sig) = &cli.signal {
        return signal(&cli.config, sig);
    }
    let path = absolute(&cli.config);
    let (served, files, warnings) = match load(&path) {
        Ok(x) => x,
        Err(source) if cli.test => return Err(MainError::Test { path, source }),
        Err(e) => return Err(e.into()),
    };
    for w in &warnings {
        eprintln!("pitcher: warning: {w}");
    }
    if cli.test {
        for f in &files {
            println!("pitcher: read {}", f.display());
        }
        // Backend names: a warning each, unless their cluster requires them.
        let (_, unresolved) = pitcher::dns::resolve_config(&served.config, &[], pitcher::dns::LOOKUP_TIMEOUT);
        for u in &unresolved {
            if u.required {
                return Err(MainError::Test { path, source: u.to_config_error().into() });
            }
            eprintln!("pitcher: warning: {u}");
        }
        if cli.routes {
            // `load` built the table once already, to check it.
            let router = pitcher::router::Router::new(&served.config).map_err(|reason| MainError::Test {
                path: path.clone(),
                source: LoadError::Config(ConfigError { file: path.clone(), line_col: None, reason }),
            })?;
            print!("{}", router.table(&served.config));
        }
        println!("pitcher: configuration ok: {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.single_process {
        // No master to re-resolve: backend names are resolved once, here.
        let (resolved, unresolved) = pitcher::dns::resolve_config(&served.config, &[], pitcher::dns::LOOKUP_TIMEOUT);
        if let Some(u) = unresolved.iter().find(|u| u.required) {
            return Err(MainError::Load(u.to_config_error().into()));
        }
        for u in &unresolved {
            eprintln!("pitcher: warning: {u}");
        }
        let served = Served { config: served.config.with_resolved(&resolved), ..served };
        return single_process(served);
    }
    master_main(cli, path, served)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Reads and validates a configuration, module settings included, and
/// the certificates of its TLS listeners; also returns the files read and
/// the warnings (an expired certificate, a name no certificate covers).
fn load(path: &Path) -> Result<(Served, Vec<PathBuf>, Vec<String>), LoadError> {
    let pitcher::config::Loaded { config, text, form, files } = pitcher::config::include::load(path)?;
    // The routing table is built by every worker; a table that cannot be
    // (regexes too large together) is refused here, with the file.
    pitcher::router::Router::new(&config).map_err(|reason| ConfigError {
        file: path.to_path_buf(),
        line_col: None,
        reason,
    })?;
    // Modules are checked against a scratch region (nothing is written to it).
    let scratch = Region::create().map_err(LoadError::Region)?;
    pitcher::hooks::validate(&config, scratch.leak())?;
    let tls = pitcher::tls::load(&config, pitcher::tls::certs::now_unix())?;
    Ok((Served { config, text, form, tls: tls.material }, files, tls.warnings))
}

/// The master: bind (or receive, after an upgrade), detach, supervise.
fn master_main(cli: &Cli, path: PathBuf, served: Served) -> Result<ExitCode, MainError> {
    let config = &served.config;
    let handover = Channel::from_env(channel::UPGRADE_FD_ENV).map_err(MainError::UpgradeChannel)?;
    // Before binding anything: a second master of this pid file stops here
    // with a clear message. (In an upgrade the old master has renamed its
    // file to .oldbin, so the path is free for the new one.)
    let pid_file = PidFile::lock(&config.pid_file).map_err(MainError::PidFile)?;
    let mut inherited = Vec::new();
    let mut shared = None;
    let mut admin_fd = None;
    let mut fork_ok = false;
    if let Some(ch) = &handover {
        let r = Handover::receive(ch).map_err(MainError::Handover)?;
        inherited = r.listeners;
        shared = Some((r.region, r.backend_slots));
        fork_ok = r.fork_ok;
    }
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let name = l.address.to_string();
        // Every socket the old master had for this address (a `reuseport`
        // listener has one per worker slot, in slot order).
        let (mine, rest): (Vec<_>, Vec<_>) = inherited.into_iter().partition(|(e, _)| e.name == name);
        inherited = rest;
        let mut fds: Vec<_> = mine.into_iter().map(|(_, fd)| fd).collect();
        if fds.is_empty() {
            let fds = pitcher::net::bind_listener(&l.address, l.backlog, l.reuseport, config.workers)
                .map_err(|source| MainError::Listen { address: name, source })?;
            listeners.push((l.clone(), fds));
            continue;
        }
        if fds.iter().any(|fd| pitcher::net::is_reuseport(fd) != l.reuseport) {
            // Refused: the old master rolls back and keeps serving.
            return Err(MainError::ReuseportChanged { address: name });
        }
        for fd in &fds {
            if let Err(e) = pitcher::net::set_backlog(fd, l.backlog) {
                // Not fatal: the socket keeps its old backlog.
                eprintln!("pitcher: cannot set the backlog of {name}: {e}");
            }
        }
        if l.reuseport {
            // The old generation's extra sockets stay open in its draining
            // workers until they exit; more workers get new sockets.
            fds.truncate(config.workers.max(1));
            pitcher::net::grow_reuseport(&mut fds, config.workers, l.backlog)
                .map_err(|source| MainError::Listen { address: name.clone(), source })?;
        }
        listeners.push((l.clone(), fds));
    }
    // The admin socket, when the new configuration keeps its address.
    if let Some(a) = &config.admin {
        let name = pitcher::master::admin_handover_name(&a.address);
        if let Some(i) = inherited.iter().position(|(e, _)| e.name == name) {
            admin_fd = Some(inherited.swap_remove(i).1);
        }
    }
    drop(inherited); // Listeners the new configuration no longer has.
    let mut notifier = Notifier::none();
    if !cli.foreground && handover.is_none() {
        // Before any thread exists (the log thread starts below).
        notifier = daemon::detach().map_err(MainError::Daemonize)?;
    }
    if let Some(ch) = handover.as_ref().filter(|_| fork_ok) {
        // Like the detaching forks above: the master goes on without the
        // startup's pages. Still before any thread exists.
        daemon::leave_startup(ch).map_err(MainError::LeaveStartup)?;
    }
    let log = pitcher::log::build(&config.error_log, config.log_level, "master")
        .map_err(MainError::ErrorLog)
        .inspect_err(|e| notifier.fail(&e.to_string()))?;
    let args = MasterArgs {
        config_path: path,
        exe: own_path(),
        argv: std::env::args_os().skip(1).collect::<Vec<OsString>>(),
        pid_file,
    };
    let inherited = pitcher::master::Inherited { shared, admin: admin_fd };
    match Master::start(args, served, listeners, log, handover, inherited) {
        Ok(m) => {
            notifier.ok();
            Ok(ExitCode::from(m.run() as u8))
        }
        Err((e, log)) => {
            slog::crit!(log.logger, "master failed to start"; "error" => %e);
            drop(log); // Flushes the log before the process ends.
            notifier.fail(&e.to_string());
            Err(MainError::Start(e))
        }
    }
}

/// The path this binary was started from, as the operator sees it: argv[0]
/// made absolute, or looked up in PATH. Not `current_exe()`, which resolves
/// symlinks: an upgrade must start what the path names *now* (a symlink
/// switched to a new release), not the file we were loaded from.
fn own_path() -> PathBuf {
    let fallback = || std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let Some(arg0) = std::env::args_os().next() else { return fallback() };
    let p = PathBuf::from(&arg0);
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        return absolute(&p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(&p)).find(|c| c.is_file()))
        .map(|c| absolute(&c))
        .unwrap_or_else(fallback)
}

/// `--worker`: receive configuration and listeners from the master, drop
/// privileges, serve.
fn worker_main(cli: &Cli) -> Result<ExitCode, MainError> {
    // Started from /proc/self/exe: show up as "pitcher" in ps -C, pidof, top.
    let _ = nix::sys::prctl::set_name(c"pitcher");
    let ch = Channel::from_env(channel::WORKER_FD_ENV).map_err(WorkerError::Channel)?.ok_or(MainError::NotAWorker)?;
    // Access-log writer threads report dropped lines through this.
    if let Ok(reporter) = ch.try_clone() {
        pitcher::log::set_reporter(reporter);
    }
    let _ = ch.set_read_timeout(Some(Duration::from_secs(10)));
    let mut first = ch.recv::<ToWorker>();
    // Files the master opened for us (access logs) come before the
    // configuration that names them.
    if let Ok(Some((ToWorker::Files { paths }, fds))) = first {
        pitcher::log::take_over(&paths, fds).map_err(WorkerError::Files)?;
        first = ch.recv::<ToWorker>();
    }
    let (config_path, text, form, entries, slots, tls, resolved, fds) = match first {
        Ok(Some((
            ToWorker::Configure {
                config_path, config_text, config_form, listeners, backend_slots, tls, resolved, ..
            },
            fds,
        ))) => (config_path, config_text, config_form, listeners, backend_slots, tls, resolved, fds),
        other => return Err(WorkerError::NoConfiguration(format!("{other:?}")).into()),
    };
    let _ = ch.set_read_timeout(None);
    let config = Config::parse_sent(Path::new(&config_path), &text, form.as_ref())
        .map_err(WorkerError::Config)?
        .into_resolved(&resolved);
    drop((text, form));
    let (fds, region) = channel::split_fds(&entries, fds).map_err(WorkerError::Manifest)?;
    let shared = Region::open(region).map_err(WorkerError::Region)?.leak();
    let log = pitcher::log::build(&config.error_log, config.log_level, "worker").map_err(WorkerError::ErrorLog)?;
    if let Err(e) = drop_privileges(&config) {
        slog::crit!(log.logger, "cannot drop privileges"; "error" => %e);
        return Err(WorkerError::Privileges(e).into());
    }
    let _ = cli;
    let (stop, quit) = worker_signals().map_err(WorkerError::Signals)?;
    let init = pitcher::worker::WorkerInit {
        config: Arc::new(config),
        listeners: entries.into_iter().zip(fds).collect(),
        log: log.logger.clone(),
        log_file: log.file.clone(),
        stop,
        quit,
        channel: Some(ch),
        slots: SlotTable::from_entries(shared, &slots),
        tls,
        place: std::env::var(channel::WORKER_PLACE_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0),
    };
    let outcome = pitcher::worker::run(init);
    // The worker and its modules are gone: their last access-log lines are
    // with the writer threads. Let them reach the files.
    pitcher::hooks::modules::access_log::wait_writers(WRITERS_AT_EXIT);
    if let Err(e) = outcome {
        slog::crit!(log.logger, "worker failed"; "error" => %e);
        return Err(MainError::Logged);
    }
    Ok(ExitCode::SUCCESS)
}

/// Longest an exiting worker waits for its access-log writers.
const WRITERS_AT_EXIT: Duration = Duration::from_secs(2);

/// TERM/INT stop at once, QUIT drains; HUP, USR1 and USR2 are the
/// master's business and must not kill a worker that receives them.
fn worker_signals() -> std::io::Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
    let stop = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let ignored = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    signal_hook::flag::register(SIGQUIT, quit.clone())?;
    for sig in [SIGHUP, SIGUSR1, SIGUSR2] {
        signal_hook::flag::register(sig, ignored.clone())?;
    }
    Ok((stop, quit))
}

/// Switches to the configured user and group when running as root:
/// `nobody` (nginx's default) when the configuration names none; root only
/// when it says `user = "root"`.
fn drop_privileges(config: &Config) -> Result<(), PrivilegeError> {
    use nix::unistd::{setgid, setgroups, setuid, Group, User};
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let name = pitcher::master::worker_user(config);
    let user =
        User::from_name(name).map_err(PrivilegeError::Lookup)?.ok_or_else(|| PrivilegeError::NoUser(name.into()))?;
    if user.uid.is_root() && config.group.is_none() {
        return Ok(());
    }
    let gid = match &config.group {
        Some(g) => {
            Group::from_name(g).map_err(PrivilegeError::Lookup)?.ok_or_else(|| PrivilegeError::NoGroup(g.clone()))?.gid
        }
        None => user.gid,
    };
    let call = |call: &'static str| move |source| PrivilegeError::Call { call, source };
    setgroups(&[gid]).map_err(call("setgroups"))?;
    setgid(gid).map_err(call("setgid"))?;
    setuid(user.uid).map_err(call("setuid"))?;
    Ok(())
}

/// `--single-process`: bind the listeners here and run one worker.
fn single_process(served: Served) -> Result<ExitCode, MainError> {
    let Served { config, tls, .. } = served;
    let log = pitcher::log::build(&config.error_log, config.log_level, "worker").map_err(MainError::ErrorLog)?;
    let mut listeners = Vec::new();
    for l in &config.listeners {
        use std::os::fd::AsRawFd;
        let fd = pitcher::net::bind(&l.address, l.backlog)
            .map_err(|source| MainError::Listen { address: l.address.to_string(), source })?;
        listeners.push((channel::entry_for(&l.address, fd.as_raw_fd()), fd));
    }
    let (stop, quit) = worker_signals().map_err(MainError::Signals)?;
    let shared = Region::create().map_err(MainError::Region)?.leak();
    // No master rotates the session-ticket key: one for the process's life.
    let period = config.tls_ticket_key_rotation.as_millis() as u64;
    pitcher::tls::tickets::rotate_if_due(&shared.tickets, pitcher::shm::now_ms(), period);
    // No master: the fleet limits' lease threads run here, beside the
    // one worker.
    let mut fleet = pitcher::fleet::Leasers::default();
    fleet.configure(&config, shared, &log.logger);
    let init = pitcher::worker::WorkerInit {
        config: Arc::new(config),
        listeners,
        log: log.logger.clone(),
        log_file: log.file.clone(),
        stop,
        quit,
        channel: None,
        slots: SlotTable::new(shared, true),
        place: 0,
        tls,
    };
    let result = pitcher::worker::run(init);
    fleet.stop();
    if let Err(e) = result {
        slog::crit!(log.logger, "worker failed"; "error" => %e);
        return Err(MainError::WorkerFailed(e));
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the master of this configuration file listens and writes its pid.
/// Read leniently, so that `-s reload` reaches the master even when the
/// file now has an error (the master then reports it): when the file is
/// not valid TOML any more, the two keys are looked for line by line.
fn control_paths(config: &Path) -> Result<(PathBuf, PathBuf), MainError> {
    let text = std::fs::read_to_string(config)
        .map_err(|source| MainError::ControlPaths { path: config.to_path_buf(), source })?;
    let (mut socket, mut pid) = (None, None);
    // Top-level keys come before the first table header: only that part
    // is parsed (a file of thousands of routes is not read for two keys),
    // the whole file if the part alone does not parse.
    let mut top_end = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            break;
        }
        top_end += line.len();
    }
    let parsed = toml::from_str::<toml::Table>(&text[..top_end]).or_else(|_| toml::from_str::<toml::Table>(&text));
    match parsed {
        Ok(v) => {
            socket = v.get("control_socket").and_then(|x| x.as_str()).map(PathBuf::from);
            pid = v.get("pid_file").and_then(|x| x.as_str()).map(PathBuf::from);
        }
        Err(_) => {
            for line in text.lines().take_while(|l| !l.trim_start().starts_with('[')) {
                let Some((k, v)) = line.split_once('=') else { continue };
                let v = v.trim().trim_matches('"').to_string();
                match k.trim() {
                    "control_socket" => socket = Some(PathBuf::from(v)),
                    "pid_file" => pid = Some(PathBuf::from(v)),
                    _ => {}
                }
            }
        }
    }
    // `${VAR}` in the paths, as the master expanded it.
    let env = |p: PathBuf| {
        let s = p.to_string_lossy().into_owned();
        pitcher::config::env::expand(&s, &|n| std::env::var(n).ok()).map(PathBuf::from).unwrap_or(p)
    };
    Ok((
        env(socket.unwrap_or_else(|| PathBuf::from("/run/pitcher.sock"))),
        env(pid.unwrap_or_else(|| PathBuf::from("/run/pitcher.pid"))),
    ))
}

/// `-s SIGNAL`: through the control socket, or by pid file and kill(2)
/// when the socket is not there.
fn signal(config: &Path, sig: &str) -> Result<ExitCode, MainError> {
    let unix_sig = match sig {
        "reload" => nix::sys::signal::Signal::SIGHUP,
        "upgrade" => nix::sys::signal::Signal::SIGUSR2,
        "quit" => nix::sys::signal::Signal::SIGQUIT,
        "stop" => nix::sys::signal::Signal::SIGTERM,
        "reopen" => nix::sys::signal::Signal::SIGUSR1,
        other => return Err(MainError::UnknownSignal(other.to_string())),
    };
    let (socket, pid_file) = control_paths(config)?;
    match control::send(&socket, &Request { cmd: sig.to_string(), args: Vec::new() }) {
        Ok(reply) if reply.ok => {
            println!("pitcher: {}", reply.message);
            Ok(ExitCode::SUCCESS)
        }
        Ok(reply) => Err(MainError::Refused { sig: sig.to_string(), message: reply.message }),
        Err(source) => {
            // Only a live master holding its locked pid file is signalled,
            // never whatever process a stale file names.
            let pid = match pitcher::master::running_master(&pid_file) {
                Ok(pid) => pid,
                Err(why) => return Err(MainError::NotSignalling { socket, source, why }),
            };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), unix_sig)
                .map_err(|k| MainError::Kill { pid, source: k })?;
            println!("pitcher: control socket unavailable ({source}); sent {unix_sig} to master pid {pid}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ctl WORDS...`: ask the master and print its answer. A refusal is an
/// answer too: printed like any other, with exit status 1.
fn ctl(config: &Path, json: bool, words: &[String]) -> Result<ExitCode, MainError> {
    let (socket, _) = control_paths(config)?;
    let req = Request { cmd: words[0].clone(), args: words[1..].to_vec() };
    let reply = control::send(&socket, &req).map_err(|source| MainError::Unreachable { socket, source })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    } else {
        println!("{}", reply.message);
        if !reply.data.is_null() && req.cmd == "status" {
            println!("{}", serde_json::to_string_pretty(&reply.data).unwrap_or_default());
        }
    }
    Ok(if reply.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
