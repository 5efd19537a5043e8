//! The `pitcher` command: parses the command line and hands over to the
//! master, a worker, or a one-shot action (`-t`, `-s`, `ctl`). Errors end
//! here as a message on stderr and a non-zero exit status.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use pitcher::channel::{self, Channel, ToWorker};
use pitcher::config::Config;
use pitcher::control::{self, Request};
use pitcher::master::daemon::{self, Notifier};
use pitcher::master::{Handover, Master, MasterArgs, PidFile};
use pitcher::shm::Region;
use pitcher::upstream::SlotTable;

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
    if cli.worker {
        return worker_main(&cli);
    }
    if let Some(Cmd::Ctl { json, words }) = &cli.command {
        return ctl(&cli.config, *json, words);
    }
    if let Some(sig) = &cli.signal {
        return signal(&cli.config, sig);
    }
    let path = absolute(&cli.config);
    let (config, text, files) = match load(&path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pitcher: {e}");
            if cli.test {
                eprintln!("pitcher: configuration file {} test failed", path.display());
            }
            return ExitCode::FAILURE;
        }
    };
    if cli.test {
        files.iter().for_each(|f| println!("pitcher: read {}", f.display()));
        println!("pitcher: configuration ok: {}", path.display());
        return ExitCode::SUCCESS;
    }
    if cli.single_process {
        return single_process(config);
    }
    master_main(&cli, path, config, text)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Reads and validates a configuration, module settings included.
fn load(path: &Path) -> Result<(Config, String, Vec<PathBuf>), String> {
    let pitcher::config::Loaded { config, text, files } =
        pitcher::config::include::load(path).map_err(|e| e.to_string())?;
    // Modules are checked against a scratch region (nothing is written to it).
    let scratch = Region::create().map_err(|e| format!("cannot create a shared region: {e}"))?;
    pitcher::hooks::validate(&config, scratch.leak())?;
    Ok((config, text, files))
}

/// The master: bind (or receive, after an upgrade), detach, supervise.
fn master_main(cli: &Cli, path: PathBuf, config: Config, text: String) -> ExitCode {
    let handover = match Channel::from_env(channel::UPGRADE_FD_ENV) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("pitcher: bad upgrade channel: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before binding anything: a second master of this pid file stops here
    // with a clear message. (In an upgrade the old master has renamed its
    // file to .oldbin, so the path is free for the new one.)
    let pid_file = match PidFile::lock(&config.pid_file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pitcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut inherited = Vec::new();
    let mut shared = None;
    if let Some(ch) = &handover {
        match Handover::receive(ch) {
            Ok(r) => {
                inherited = r.listeners;
                shared = Some((r.region, r.backend_slots));
            }
            Err(e) => {
                eprintln!("pitcher: cannot receive the listeners from the old master: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let name = l.address.to_string();
        if let Some(i) = inherited.iter().position(|(e, _)| e.name == name) {
            let (_, fd) = inherited.swap_remove(i);
            if let Err(e) = pitcher::net::set_backlog(&fd, l.backlog) {
                eprintln!("pitcher: cannot set the backlog of {name}: {e}");
            }
            listeners.push((l.clone(), fd));
            continue;
        }
        match pitcher::net::bind(&l.address, l.backlog) {
            Ok(fd) => listeners.push((l.clone(), fd)),
            Err(e) => {
                eprintln!("pitcher: cannot listen on {}: {e}", l.address);
                return ExitCode::FAILURE;
            }
        }
    }
    drop(inherited); // Listeners the new configuration no longer has.
    let mut notifier = Notifier::none();
    if !cli.foreground && handover.is_none() {
        // Before any thread exists (the log thread starts below).
        match daemon::detach() {
            Ok(n) => notifier = n,
            Err(e) => {
                eprintln!("pitcher: cannot daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let log = match pitcher::log::build(&config.error_log, config.log_level, "master") {
        Ok(l) => l,
        Err(e) => {
            notifier.fail(&format!("cannot open the error log: {e}"));
            eprintln!("pitcher: cannot open the error log: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = MasterArgs {
        config_path: path,
        exe: own_path(),
        argv: std::env::args_os().skip(1).collect::<Vec<OsString>>(),
        pid_file,
    };
    match Master::start(args, config, text, listeners, log, handover, shared) {
        Ok(m) => {
            notifier.ok();
            ExitCode::from(m.run() as u8)
        }
        Err((e, log)) => {
            slog::crit!(log.logger, "master failed to start"; "error" => %e);
            drop(log); // Flushes the log before the process ends.
            notifier.fail(&e.to_string());
            eprintln!("pitcher: {e}");
            ExitCode::FAILURE
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
fn worker_main(cli: &Cli) -> ExitCode {
    // Started from /proc/self/exe: show up as "pitcher" in ps -C, pidof, top.
    let _ = nix::sys::prctl::set_name(c"pitcher");
    let ch = match Channel::from_env(channel::WORKER_FD_ENV) {
        Ok(Some(ch)) => ch,
        Ok(None) => {
            eprintln!("pitcher: --worker is for processes started by the master");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("pitcher: worker: bad channel: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Access-log writer threads report dropped lines through this.
    if let Ok(reporter) = ch.try_clone() {
        pitcher::log::set_reporter(reporter);
    }
    let _ = ch.set_read_timeout(Some(Duration::from_secs(10)));
    let mut first = ch.recv::<ToWorker>();
    // Files the master opened for us (access logs) come before the
    // configuration that names them.
    if let Ok(Some((ToWorker::Files { paths }, fds))) = first {
        if let Err(e) = pitcher::log::take_over(&paths, fds) {
            eprintln!("pitcher: worker: files from the master refused: {e}");
            return ExitCode::FAILURE;
        }
        first = ch.recv::<ToWorker>();
    }
    let (config_path, text, entries, slots, fds) = match first {
        Ok(Some((ToWorker::Configure { config_path, config_text, listeners, backend_slots, .. }, fds))) => {
            (config_path, config_text, listeners, backend_slots, fds)
        }
        other => {
            eprintln!("pitcher: worker: expected a configuration from the master, got {other:?}");
            return ExitCode::FAILURE;
        }
    };
    let _ = ch.set_read_timeout(None);
    let config = match Config::parse_resolved(Path::new(&config_path), &text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pitcher: worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (fds, region) = match channel::split_fds(&entries, fds) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pitcher: worker: listener manifest refused: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = match Region::open(region) {
        Ok(r) => r.leak(),
        Err(e) => {
            eprintln!("pitcher: worker: cannot map the shared region: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = match pitcher::log::build(&config.error_log, config.log_level, "worker") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pitcher: worker: cannot open the error log: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = drop_privileges(&config) {
        slog::crit!(log.logger, "cannot drop privileges"; "error" => &e);
        eprintln!("pitcher: worker: cannot drop privileges: {e}");
        return ExitCode::FAILURE;
    }
    let _ = cli;
    let (stop, quit) = match worker_signals() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pitcher: worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let init = pitcher::worker::WorkerInit {
        config: Arc::new(config),
        listeners: entries.into_iter().zip(fds).collect(),
        log: log.logger.clone(),
        log_file: log.file.clone(),
        stop,
        quit,
        channel: Some(ch),
        slots: SlotTable::from_entries(shared, &slots),
        place: std::env::var(channel::WORKER_PLACE_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0),
    };
    let outcome = pitcher::worker::run(init);
    // The worker and its modules are gone: their last access-log lines are
    // with the writer threads. Let them reach the files.
    pitcher::hooks::modules::access_log::wait_writers(WRITERS_AT_EXIT);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            slog::crit!(log.logger, "worker failed"; "error" => %e);
            ExitCode::FAILURE
        }
    }
}

/// Longest an exiting worker waits for its access-log writers.
const WRITERS_AT_EXIT: Duration = Duration::from_secs(2);

/// TERM/INT stop at once, QUIT drains; HUP, USR1 and USR2 are the
/// master's business and must not kill a worker that receives them.
fn worker_signals() -> std::io::Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    use signal_hook::consts::*;
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
fn drop_privileges(config: &Config) -> Result<(), String> {
    use nix::unistd::{setgid, setgroups, setuid, Group, User};
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let name = pitcher::master::worker_user(config);
    let user = User::from_name(name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no user {name:?}"))?;
    if user.uid.is_root() && config.group.is_none() {
        return Ok(());
    }
    let gid = match &config.group {
        Some(g) => Group::from_name(g).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group {g:?}"))?.gid,
        None => user.gid,
    };
    setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(gid).map_err(|e| format!("setgid: {e}"))?;
    setuid(user.uid).map_err(|e| format!("setuid: {e}"))?;
    Ok(())
}

/// `--single-process`: bind the listeners here and run one worker.
fn single_process(config: Config) -> ExitCode {
    let log = match pitcher::log::build(&config.error_log, config.log_level, "worker") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pitcher: cannot open the error log: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut listeners = Vec::new();
    for l in &config.listeners {
        match pitcher::net::bind(&l.address, l.backlog) {
            Ok(fd) => {
                use std::os::fd::AsRawFd;
                listeners.push((channel::entry_for(&l.address, fd.as_raw_fd()), fd));
            }
            Err(e) => {
                eprintln!("pitcher: cannot listen on {}: {e}", l.address);
                return ExitCode::FAILURE;
            }
        }
    }
    let (stop, quit) = match worker_signals() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pitcher: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = match Region::create() {
        Ok(r) => r.leak(),
        Err(e) => {
            eprintln!("pitcher: cannot create the shared region: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    };
    match pitcher::worker::run(init) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            slog::crit!(log.logger, "worker failed"; "error" => %e);
            eprintln!("pitcher: worker failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the master of this configuration file listens and writes its pid.
/// Read leniently, so that `-s reload` reaches the master even when the
/// file now has an error (the master then reports it): when the file is
/// not valid TOML any more, the two keys are looked for line by line.
fn control_paths(config: &Path) -> Result<(PathBuf, PathBuf), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: cannot read: {e}", config.display()))?;
    let (mut socket, mut pid) = (None, None);
    match toml::from_str::<toml::Table>(&text) {
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
fn signal(config: &Path, sig: &str) -> ExitCode {
    let unix_sig = match sig {
        "reload" => nix::sys::signal::Signal::SIGHUP,
        "upgrade" => nix::sys::signal::Signal::SIGUSR2,
        "quit" => nix::sys::signal::Signal::SIGQUIT,
        "stop" => nix::sys::signal::Signal::SIGTERM,
        "reopen" => nix::sys::signal::Signal::SIGUSR1,
        other => {
            eprintln!("pitcher: unknown signal {other:?}: expected reload, upgrade, quit, stop or reopen");
            return ExitCode::from(2);
        }
    };
    let (socket, pid_file) = match control_paths(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pitcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    match control::send(&socket, &Request { cmd: sig.to_string(), args: Vec::new() }) {
        Ok(reply) if reply.ok => {
            println!("pitcher: {}", reply.message);
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            eprintln!("pitcher: {sig} failed: {}", reply.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            // Only a live master holding its locked pid file is signalled,
            // never whatever process a stale file names.
            let pid = match pitcher::master::running_master(&pid_file) {
                Ok(pid) => pid,
                Err(why) => {
                    eprintln!("pitcher: cannot reach the master: {}: {e}; not signalling: {why}", socket.display());
                    return ExitCode::FAILURE;
                }
            };
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), unix_sig) {
                Ok(()) => {
                    println!("pitcher: control socket unavailable ({e}); sent {unix_sig} to master pid {pid}");
                    ExitCode::SUCCESS
                }
                Err(k) => {
                    eprintln!("pitcher: cannot signal master pid {pid}: {k}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `ctl WORDS...`: ask the master and print its answer.
fn ctl(config: &Path, json: bool, words: &[String]) -> ExitCode {
    let (socket, _) = match control_paths(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pitcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    let req = Request { cmd: words[0].clone(), args: words[1..].to_vec() };
    match control::send(&socket, &req) {
        Ok(reply) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
            } else {
                println!("{}", reply.message);
                if !reply.data.is_null() && req.cmd == "status" {
                    println!("{}", serde_json::to_string_pretty(&reply.data).unwrap_or_default());
                }
            }
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pitcher: cannot reach the master at {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}
