//! Runs the real `pitcher` binary for a test: writes its configuration into a
//! temporary directory, starts it, waits until its listener accepts, and
//! stops it by pid when the handle is dropped. Pitcher's stderr and stdout go
//! to files in that directory; a test that panics prints them.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::client::Client;
use super::{free_port, vm_rss_kib};

/// The binary under test.
pub const PITCHER: &str = env!("CARGO_BIN_EXE_pitcher");

/// Longest wait for Pitcher to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for a graceful stop before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// In configuration text given to [`Pitcher::start`], this is replaced by
/// the path of the test's temporary directory (for sockets, logs, pid files).
pub const DIR_PLACEHOLDER: &str = "@DIR@";

/// Where the first listener of a configuration is.
#[derive(Debug, Clone)]
pub enum ListenAt {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running Pitcher. See the module documentation.
pub struct Pitcher {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    listen: ListenAt,
    /// Started as master + workers: stop with SIGTERM first, and make sure
    /// no worker outlives the test.
    multi_process: bool,
}

/// Why a start failed: the process exited early or never accepted.
pub struct StartError {
    pub dir: tempfile::TempDir,
    pub log: String,
}

/// A test's directory, traversable by everyone (0711): started as root,
/// Pitcher's workers run as `nobody`, and connect to Unix-socket backends
/// here. Files in it keep their own modes; what the workers write (logs)
/// the master opens for them.
pub fn new_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("pitcher-test").tempdir().expect("create temporary directory");
    traversable(dir.path());
    dir
}

/// Mode 0711 on a directory: anyone may reach what is inside by name.
pub fn traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod 0711");
}

impl Pitcher {
    /// Starts `pitcher --single-process -c <dir>/pitcher.toml` with this
    /// configuration (see [`Pitcher::start_with_args`]).
    pub fn start(config: &str) -> Pitcher {
        Pitcher::start_in(new_dir(), config)
    }

    /// Like [`Pitcher::start`] in a directory the test already made.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Pitcher {
        Pitcher::start_with_args(dir, config, &["--single-process"])
    }

    /// Starts `pitcher <args> -c <dir>/pitcher.toml`. Panics with Pitcher's
    /// log if it exits or does not accept within 10 s.
    pub fn start_with_args(dir: tempfile::TempDir, config: &str, args: &[&str]) -> Pitcher {
        match Pitcher::try_start(dir, config, args) {
            Ok(p) => p,
            Err(e) => panic!("pitcher did not start; its log:\n{}", e.log),
        }
    }

    /// Starts Pitcher; on failure returns the directory and the log.
    ///
    /// `@DIR@` in `config` is replaced by the directory's path, and a
    /// `pid_file` and `control_socket` inside it are added unless given.
    /// The first `[[listeners]]` address is where readiness is awaited.
    pub fn try_start(dir: tempfile::TempDir, config: &str, args: &[&str]) -> Result<Pitcher, StartError> {
        let text = prepare_config(config, dir.path());
        let listen = first_listener(&text).unwrap_or_else(|| panic!("no [[listeners]] address in config:\n{text}"));
        let config_path = dir.path().join("pitcher.toml");
        std::fs::write(&config_path, &text).expect("write pitcher.toml");
        let stderr = File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        let stdout = File::create(dir.path().join("stdout.log")).expect("create stdout.log");
        let child = Command::new(PITCHER)
            .args(args)
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PITCHER}: {e}"));
        let mut p = Pitcher {
            child: Some(child),
            dir,
            config_path,
            listen,
            multi_process: !args.contains(&"--single-process"),
        };
        match p.wait_ready() {
            Ok(()) => Ok(p),
            Err(why) => {
                p.stop();
                let log = format!("{why}\n{}", p.log());
                let dir = std::mem::replace(&mut p.dir, new_dir());
                Err(StartError { dir, log })
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.try_wait() {
                return Err(format!("pitcher exited early with {st}"));
            }
            let ok = match &self.listen {
                ListenAt::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok(),
                ListenAt::Unix(p) => UnixStream::connect(p).is_ok(),
            };
            if ok {
                // A listener that is someone else's would leave us talking
                // to the wrong process: make sure ours is still alive.
                std::thread::sleep(Duration::from_millis(20));
                if let Some(st) = self.try_wait() {
                    return Err(format!("pitcher exited early with {st}"));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("pitcher did not accept on {:?} within {START_TIMEOUT:?}", self.listen));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pid of the process started (the master, or the only process).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("pitcher already stopped")
    }

    /// TCP address of the first listener.
    pub fn addr(&self) -> SocketAddr {
        match &self.listen {
            ListenAt::Tcp(a) => *a,
            ListenAt::Unix(p) => panic!("first listener is unix:{}", p.display()),
        }
    }

    pub fn listen(&self) -> &ListenAt {
        &self.listen
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the configuration file (same placeholders as at start).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, prepare_config(config, self.dir.path())).expect("write pitcher.toml");
    }

    /// A new client connection to the first listener.
    pub fn client(&self) -> Client {
        Client::connect(self.addr())
    }

    /// What Pitcher wrote to stderr, then stdout (if anything).
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        let (err, out) = (read("stderr.log"), read("stdout.log"));
        if out.is_empty() {
            format!("--- pitcher stderr ---\n{err}")
        } else {
            format!("--- pitcher stderr ---\n{err}--- pitcher stdout ---\n{out}")
        }
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid()).unwrap_or_else(|| panic!("no VmRSS for pid {}\n{}", self.pid(), self.log()))
    }

    /// Sends a signal by name (`HUP`, `USR2`, `QUIT`, `TERM`, ...) to the
    /// started process, by pid.
    pub fn signal(&self, sig: &str) {
        send_signal(self.pid(), sig);
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every live descendant of the started process (workers, a new master
    /// after an upgrade), by pid.
    pub fn descendants(&self) -> Vec<u32> {
        descendants_of(self.pid())
    }

    /// SIGKILL and reap; the handle no longer names a process afterwards.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process now: single-process with SIGKILL; master + workers
    /// with SIGTERM, then SIGKILL after 5 s, and any descendant that is
    /// still alive (a worker of this binary) with SIGKILL, by pid.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if self.multi_process {
            let family = self.descendants();
            if self.try_wait().is_none() {
                self.signal("TERM");
                self.wait_exit(STOP_TIMEOUT);
            }
            self.kill();
            for pid in family {
                if is_pitcher_process(pid) {
                    send_signal(pid, "KILL");
                }
            }
        } else {
            self.kill();
        }
    }
}

impl Drop for Pitcher {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "pitcher (pid {:?}) log at the time of the failure:\n{}",
                self.child.as_ref().map(|c| c.id()),
                self.log()
            );
        }
        self.stop();
    }
}

/// Replaces `@DIR@` and adds `pid_file` / `control_socket` in `dir` unless the
/// text sets them.
fn prepare_config(config: &str, dir: &Path) -> String {
    let text = config.replace(DIR_PLACEHOLDER, &dir.display().to_string());
    let sets = |key: &str| {
        text.lines().any(|l| {
            let l = l.trim_start();
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    let mut top = String::new();
    if !sets("pid_file") {
        top.push_str(&format!("pid_file = \"{}/pitcher.pid\"\n", dir.display()));
    }
    if !sets("control_socket") {
        top.push_str(&format!("control_socket = \"{}/pitcher.sock\"\n", dir.display()));
    }
    top + &text
}

/// The `address` of the first `[[listeners]]` table.
fn first_listener(text: &str) -> Option<ListenAt> {
    let mut in_listeners = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_listeners = l.replace(' ', "") == "[[listeners]]";
            continue;
        }
        if in_listeners {
            if let Some(rest) = l.strip_prefix("address") {
                let v = rest.trim_start().strip_prefix('=')?.trim();
                let v = v.split('"').nth(1)?;
                return Some(match v.strip_prefix("unix:") {
                    Some(p) => ListenAt::Unix(PathBuf::from(p)),
                    None => ListenAt::Tcp(v.parse().ok()?),
                });
            }
        }
    }
    None
}

/// `kill -s SIG pid`: one process, by pid.
pub fn send_signal(pid: u32, sig: &str) {
    let _ =
        Command::new("kill").args(["-s", sig, &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn is_pitcher_process(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).next().is_some_and(|a0| a0.ends_with(b"pitcher")))
        .unwrap_or(false)
}

/// Live descendants of `root`, from the parent pids in `/proc/*/stat`.
pub fn descendants_of(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The name is in parentheses and may contain spaces: the fields
            // after the last ')' are state, ppid, ...
            let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) {
                parent.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Output of a finished `pitcher` command.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// stdout and stderr together, for messages that may go to either.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `pitcher <args>` to completion (killed by pid after `timeout`).
pub fn run_pitcher(args: &[&str], timeout: Duration) -> RunOutput {
    run_command(Command::new(PITCHER).args(args), timeout)
}

/// Runs `cmd` (stdin from /dev/null) to completion, its output in files
/// (not pipes: a command that starts a daemon must not leave it holding a
/// pipe this process waits on); killed by pid, and a panic, after
/// `timeout`.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> RunOutput {
    let dir = new_dir();
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create out"))
        .stderr(File::create(&err_path).expect("create err"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunOutput {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Runs `openssl <args>` in `dir` (test certificates and keys); panics
/// with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds a typical configuration: one TCP listener, clusters, routes, and
/// any extra TOML. Top-level keys default to one worker and `info` logs.
///
/// ```ignore
/// let p = ConfigBuilder::new()
///     .cluster("app", [be.spec()])
///     .route(None, "/", "app")
///     .section("[timeouts]\nupstream_read_ms = 500")
///     .start();
/// ```
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    top: Vec<String>,
    /// Lines of the `[[listeners]]` table after its address.
    listener: Vec<String>,
    clusters: Vec<String>,
    routes: Vec<String>,
    sections: Vec<String>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder::new()
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl ConfigBuilder {
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            top: vec!["workers = 1".into(), "log_level = \"info\"".into()],
            listener: Vec::new(),
            clusters: Vec::new(),
            routes: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// A top-level `key = value` line; replaces an earlier one of the key.
    pub fn top(mut self, line: &str) -> Self {
        let key = line.split('=').next().unwrap_or_default().trim().to_string();
        self.top.retain(|l| l.split('=').next().unwrap_or_default().trim() != key);
        self.top.push(line.to_string());
        self
    }

    /// A `key = value` line of the listener's table (`tls = { ... }`).
    pub fn listener(mut self, line: &str) -> Self {
        self.listener.push(line.to_string());
        self
    }

    /// A cluster with these backend entries (`ADDR [weight=N]`).
    pub fn cluster<I, S>(self, name: &str, backends: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.cluster_with(name, backends, "")
    }

    /// A cluster with extra keys (`retries = 0`, `keepalive = 8`, ...).
    pub fn cluster_with<I, S>(mut self, name: &str, backends: I, extra: &str) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list: Vec<String> = backends.into_iter().map(|b| toml_str(b.as_ref())).collect();
        let mut t = format!("[[clusters]]\nname = {}\nbackends = [{}]\n", toml_str(name), list.join(", "));
        if !extra.is_empty() {
            t.push_str(extra.trim_end());
            t.push('\n');
        }
        self.clusters.push(t);
        self
    }

    /// A route: optional host pattern, path prefix, cluster name.
    pub fn route(mut self, host: Option<&str>, path_prefix: &str, cluster: &str) -> Self {
        let mut t = String::from("[[routes]]\n");
        if let Some(h) = host {
            t.push_str(&format!("host = {}\n", toml_str(h)));
        }
        t.push_str(&format!("path_prefix = {}\ncluster = {}\n", toml_str(path_prefix), toml_str(cluster)));
        self.routes.push(t);
        self
    }
    /// Verbatim TOML appended at the end (`[timeouts]`, `[limits]`, ...).
    pub fn section(mut self, toml: &str) -> Self {
        self.sections.push(format!("{}\n", toml.trim_end()));
        self
    }

    /// The configuration text, listening on 127.0.0.1:`port`.
    pub fn build(&self, port: u16) -> String {
        let mut t = String::new();
        for l in &self.top {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&format!("\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n"));
        for l in &self.listener {
            t.push_str(l);
            t.push('\n');
        }
        for c in self.clusters.iter().chain(&self.routes).chain(&self.sections) {
            t.push('\n');
            t.push_str(c);
        }
        t
    }

    /// Starts a single-process Pitcher with this configuration on a free
    /// port, trying another port if the one picked was taken meanwhile.
    pub fn start(&self) -> Pitcher {
        let mut dir = new_dir();
        let mut last = String::new();
        for _ in 0..5 {
            match Pitcher::try_start(dir, &self.build(free_port()), &["--single-process"]) {
                Ok(p) => return p,
                Err(e) => {
                    let lower = e.log.to_ascii_lowercase();
                    if !(lower.contains("in use") || lower.contains("os error 98")) {
                        panic!("pitcher did not start; its log:\n{}", e.log);
                    }
                    dir = e.dir;
                    last = e.log;
                }
            }
        }
        panic!("pitcher could not bind a free port in 5 tries; last log:\n{last}");
    }
}
