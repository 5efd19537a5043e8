//! The real master + worker processes for the process-model tests: a
//! master started from a private copy of the binary (so a test can replace
//! the file at the master's path, as an operator does before an upgrade),
//! its control commands and status, the processes of its family, and a load
//! client that checks every response while the master is reloaded or
//! upgraded.
//!
//! Every process is found and stopped by pid: the masters named by the pid
//! file, its `.oldbin` and the status, and every process whose command line
//! names the test's configuration file (masters and workers of every
//! generation). Dropping a [`MasterRun`] stops them all and waits until none
//! is left.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::client::{get_request, request_bytes, Client, Response};
use super::pitcher::{run_pitcher, send_signal, ConfigBuilder, RunOutput, DIR_PLACEHOLDER, PITCHER};
use super::{free_port, wait_until};

/// Longest wait for a master and all its workers to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait for the whole family to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);

/// Longest a `pitcher -s ...` or `ctl` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The `data` of `pitcher ctl --json status`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub master_pid: u32,
    pub config_seq: u64,
    pub state: String,
    pub workers: Vec<WorkerStatus>,
    #[serde(default)]
    pub retiring: Vec<u32>,
    #[serde(default)]
    pub upgrade_pid: Option<u32>,
    #[serde(default)]
    pub listeners: Vec<String>,
}

/// One worker slot in [`Status`].
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: Option<u32>,
    pub ready: bool,
    #[serde(default)]
    pub config_seq: Option<u64>,
}

impl Status {
    /// Pids of the workers in their slots.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.pid).collect()
    }

    /// Every slot has a worker that reported ready.
    pub fn all_ready(&self) -> bool {
        !self.workers.is_empty() && self.workers.iter().all(|w| w.pid.is_some() && w.ready)
    }

    /// Every worker confirmed configuration `seq` (or a later one).
    pub fn all_at(&self, seq: u64) -> bool {
        self.all_ready() && self.workers.iter().all(|w| w.config_seq.is_some_and(|s| s >= seq))
    }
}

/// A master started by a test. See the module documentation.
pub struct MasterRun {
    dir: tempfile::TempDir,
    exe: PathBuf,
    config: PathBuf,
    pid_file: PathBuf,
    control_socket: PathBuf,
    log: PathBuf,
    port: u16,
    builder: ConfigBuilder,
    /// The first master, when the test started it itself (foreground).
    first: Option<Child>,
    /// Every master pid seen, to stop them all at the end.
    masters: Vec<u32>,
}

/// The state of a process from `/proc/<pid>/stat`; `None` if there is none.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// The parent pid of a process.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|&b| b == 0).filter(|a| !a.is_empty()).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_default()
}

/// Live processes whose command line contains `needle`.
pub fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let me = std::process::id();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if pid == me || !alive(pid) {
                continue;
            }
            let c = cmdline(pid);
            if c.contains(needle) {
                out.push((pid, c));
            }
        }
    }
    out.sort();
    out
}

/// Waits (bounded) until `pid` is gone (or a zombie).
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    wait_until(timeout, || !alive(pid))
}

/// Copies an executable with `cp` in a child process, mode 0755.
///
/// Not with `std::fs::copy`: while this (multi-threaded) test process holds
/// a file open for writing, any child another test thread forks inherits
/// the descriptor until it execs, and executing the file in that window
/// fails with ETXTBSY ("Text file busy").
pub fn copy_executable(src: &Path, dst: &Path) {
    let _ = std::fs::remove_file(dst);
    let st = Command::new("cp").arg(src).arg(dst).stdin(Stdio::null()).status().expect("run cp");
    assert!(st.success(), "cp {} {}: {st}", src.display(), dst.display());
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Writes an executable file (mode 0755) from a child process; see
/// [`copy_executable`] for why.
pub fn write_executable(dst: &Path, text: &str) {
    let _ = std::fs::remove_file(dst);
    let st = Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$1\" > \"$2\"")
        .arg("sh")
        .arg(text)
        .arg(dst)
        .stdin(Stdio::null())
        .status()
        .expect("run sh");
    assert!(st.success(), "write {}: {st}", dst.display());
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Reads a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl MasterRun {
    /// Starts `<copy of pitcher> --foreground -c <dir>/pitcher.toml` with the
    /// configuration of `builder` (plus `pid_file` and `control_socket` in
    /// the test's directory) on a free port, and waits until every worker
    /// is ready and the listener accepts.
    pub fn start(builder: &ConfigBuilder) -> MasterRun {
        MasterRun::start_prepared(builder, |_| {})
    }

    /// [`MasterRun::start`], with `setup` run on the directory before the
    /// master starts (directories the configuration names, for instance).
    pub fn start_prepared(builder: &ConfigBuilder, setup: impl Fn(&Path)) -> MasterRun {
        let mut run = MasterRun::prepare(builder);
        setup(run.dir());
        let mut last = String::new();
        for _ in 0..5 {
            run.port = free_port();
            run.write_config(builder);
            let log = OpenOptions::new().create(true).append(true).open(&run.log).expect("open master.log");
            let child = Command::new(&run.exe)
                .arg("--foreground")
                .arg("-c")
                .arg(&run.config)
                .current_dir(run.dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log fd"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", run.exe.display()));
            run.masters.push(child.id());
            run.first = Some(child);
            match run.wait_ready(READY_TIMEOUT) {
                Ok(_) => return run,
                Err(why) => {
                    let log = run.log();
                    run.stop();
                    let lower = log.to_ascii_lowercase();
                    if !(lower.contains("in use") || lower.contains("os error 98")) {
                        panic!("pitcher master did not start: {why}\n{log}");
                    }
                    last = log;
                }
            }
        }
        panic!("pitcher master could not bind a free port in 5 tries; last log:\n{last}");
    }

    /// The directory, binary copy and configuration of a run, without
    /// starting anything (for tests that start the master another way, as
    /// the init script does).
    pub fn prepare(builder: &ConfigBuilder) -> MasterRun {
        let dir = tempfile::Builder::new().prefix("pitcher-master").tempdir().expect("create temporary directory");
        // Workers run as nobody: they must reach Unix-socket backends here.
        super::pitcher::traversable(dir.path());
        let sbin = dir.path().join("sbin");
        std::fs::create_dir(&sbin).expect("mkdir sbin");
        let exe = sbin.join("pitcher");
        let mut run = MasterRun {
            config: dir.path().join("pitcher.toml"),
            pid_file: dir.path().join("pitcher.pid"),
            control_socket: dir.path().join("pitcher.sock"),
            log: dir.path().join("master.log"),
            exe,
            dir,
            port: free_port(),
            builder: builder.clone(),
            first: None,
            masters: Vec::new(),
        };
        run.install_binary();
        run.write_config(builder);
        run
    }

    /// (Re)writes the configuration file from `builder`, on the same port
    /// and paths. `@DIR@` is replaced by the test's directory.
    pub fn write_config(&mut self, builder: &ConfigBuilder) {
        self.builder = builder.clone();
        std::fs::write(&self.config, self.config_text(builder)).expect("write pitcher.toml");
    }

    /// The configuration text [`MasterRun::write_config`] would write.
    pub fn config_text(&self, builder: &ConfigBuilder) -> String {
        let body = builder.build(self.port).replace(DIR_PLACEHOLDER, &self.dir.path().display().to_string());
        format!(
            "pid_file = \"{}\"\ncontrol_socket = \"{}\"\n{body}",
            self.pid_file.display(),
            self.control_socket.display()
        )
    }

    /// Writes raw text as the configuration file (for invalid files).
    pub fn write_config_text(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write pitcher.toml");
    }

    pub fn builder(&self) -> &ConfigBuilder {
        &self.builder
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path the master was started from (the copy of the binary).
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn pid_file(&self) -> &Path {
        &self.pid_file
    }

    /// `<pid_file>.oldbin`.
    pub fn oldbin(&self) -> PathBuf {
        let mut s = self.pid_file.as_os_str().to_owned();
        s.push(".oldbin");
        PathBuf::from(s)
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new client connection to the listener.
    pub fn client(&self) -> Client {
        Client::connect(self.addr())
    }

    /// The master pid in the pid file.
    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pid_file)
    }

    /// Remembers a master pid, so that it is stopped at the end.
    pub fn track(&mut self, pid: u32) {
        if !self.masters.contains(&pid) {
            self.masters.push(pid);
        }
    }

    /// The log of every generation: the stderr of the first master, which
    /// its workers and successors inherit.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Copies the binary under test to a sibling of the master's path and
    /// renames it over that path (never writing into a running executable).
    pub fn install_binary(&self) {
        let tmp = self.exe.with_file_name(".pitcher.new");
        copy_executable(Path::new(PITCHER), &tmp);
        std::fs::rename(&tmp, &self.exe).expect("rename the new binary over the old one");
    }

    /// Puts an executable script at the master's path (renamed over it).
    pub fn install_script(&self, text: &str) {
        let tmp = self.exe.with_file_name(".pitcher.new");
        write_executable(&tmp, text);
        std::fs::rename(&tmp, &self.exe).expect("rename the script over the binary");
    }

    /// `pitcher -c <config> <args>` with the binary under test (never the
    /// file at the master's path, which a test may have replaced).
    pub fn command(&self, args: &[&str]) -> RunOutput {
        let config = self.config.display().to_string();
        let mut all = vec!["-c", config.as_str()];
        all.extend_from_slice(args);
        run_pitcher(&all, COMMAND_TIMEOUT)
    }

    /// `pitcher -c <config> -s <what>`.
    pub fn signal_cmd(&self, what: &str) -> RunOutput {
        self.command(&["-s", what])
    }

    /// `pitcher -c <config> ctl --json status`, parsed; `None` if the
    /// master does not answer.
    pub fn status(&self) -> Option<Status> {
        let out = self.command(&["ctl", "--json", "status"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
            return None;
        }
        serde_json::from_value(v.get("data")?.clone()).ok()
    }

    /// [`MasterRun::status`], or a panic with the log.
    pub fn expect_status(&self) -> Status {
        self.status().unwrap_or_else(|| {
            let out = self.command(&["ctl", "--json", "status"]);
            panic!("ctl status failed: {out:?}\n--- log ---\n{}", self.log())
        })
    }

    /// Polls the status until `f` holds; returns the status that did.
    pub fn wait_status(&self, timeout: Duration, mut f: impl FnMut(&Status) -> bool) -> Option<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return Some(s);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the master named by the pid file answers, every worker
    /// is ready and the listener accepts; returns that status.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Status, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let in_pid_file = self.pid();
            if let Some(c) = self.first.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    if in_pid_file.is_none_or(|p| p == c.id()) {
                        return Err(format!("the master exited with {st}"));
                    }
                }
            }
            if let Some(s) = self.status() {
                let pid_ok = self.pid() == Some(s.master_pid);
                if pid_ok
                    && s.all_ready()
                    && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
                {
                    self.track(s.master_pid);
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {timeout:?}; last status {:?}", self.status()));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends a signal by name to the master in the pid file.
    pub fn kill_master(&self, sig: &str) -> u32 {
        let pid = self.pid().unwrap_or_else(|| panic!("no pid in {}", self.pid_file.display()));
        send_signal(pid, sig);
        pid
    }

    /// Live processes of this run: every process whose command line names
    /// its configuration file (masters and workers of every generation).
    pub fn family(&self) -> Vec<(u32, String)> {
        processes_naming(&self.config.display().to_string())
    }

    /// Reaps the first master if it has exited (it is our child).
    pub fn reap_first(&mut self) -> Option<std::process::ExitStatus> {
        self.first.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) until no process of this run is left; reaps the
    /// first master. True if none is left.
    pub fn wait_family_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_first();
            // A process on its way out may already have lost its command
            // line (so `family` misses it) and still be there: the masters
            // seen are waited for by pid too.
            if self.family().is_empty() && self.masters.iter().all(|&p| !alive(p)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops everything of this run: SIGTERM to every master (pid file,
    /// `.oldbin`, every pid seen), then SIGKILL to whatever of the family is
    /// left after a grace period. Waits until nothing is left.
    pub fn stop(&mut self) {
        let mut masters = self.masters.clone();
        masters.extend(self.pid());
        masters.extend(read_pid(&self.oldbin()));
        for (pid, c) in self.family() {
            if !c.starts_with("pitcher: worker process") {
                masters.push(pid);
            }
        }
        masters.sort_unstable();
        masters.dedup();
        // Every master of this run names its configuration file on its
        // command line; a pid that no longer does was reused by another
        // process and is left alone.
        let needle = self.config.display().to_string();
        let ours = |pid: u32| alive(pid) && cmdline(pid).contains(&needle);
        for &pid in &masters {
            if ours(pid) {
                send_signal(pid, "TERM");
            }
        }
        if !self.wait_family_gone(STOP_TIMEOUT) {
            for (pid, _) in self.family() {
                send_signal(pid, "KILL");
            }
            for &pid in &masters {
                if ours(pid) {
                    send_signal(pid, "KILL");
                }
            }
            self.wait_family_gone(Duration::from_secs(3));
        }
        if let Some(mut c) = self.first.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MasterRun {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "pitcher master (pid file {:?}) log at the time of the failure:\n{}\n--- processes ---\n{:?}",
                self.pid(),
                self.log(),
                self.family()
            );
        }
        self.stop();
    }
}

/// What the load client sends and accepts.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// Threads that keep one connection open across requests.
    pub keepalive: usize,
    /// Threads that open a new connection for every request.
    pub per_request: usize,
    /// Pause between two requests of one thread.
    pub interval: Duration,
    /// Bodies of a correct answer (any of them).
    pub bodies: Vec<Vec<u8>>,
}

/// Counters of a running load, shared with its threads.
#[derive(Default)]
pub struct LoadStats {
    pub ok: AtomicU64,
    pub keepalive_ok: AtomicU64,
    pub per_request_ok: AtomicU64,
    /// Responses on keep-alive connections that said `Connection: close`.
    pub closes: AtomicU64,
    pub connections: AtomicU64,
    failures: Mutex<Vec<String>>,
    bodies: Mutex<BTreeMap<String, u64>>,
}

impl LoadStats {
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// A load client running in threads. See [`LoadSpec`].
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<LoadStats>,
    started: Instant,
}

/// The outcome of a load run.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub keepalive_ok: u64,
    pub per_request_ok: u64,
    pub closes: u64,
    pub connections: u64,
    pub failures: Vec<String>,
    pub bodies: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// Panics, with the summary and the first 20 failures, unless every
    /// request succeeded.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        assert!(
            self.failures.is_empty(),
            "{} failed requests; {}\nfirst failures:\n{}",
            self.failures.len(),
            self.summary(),
            self.failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    pub fn rate(&self) -> f64 {
        (self.ok + self.failures.len() as u64) as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests in {:.1} s ({:.0}/s): {} ok ({} keep-alive, {} one per connection), {} failed; \
             {} connections, {} keep-alive responses with Connection: close; bodies {:?}",
            self.ok + self.failures.len() as u64,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.ok,
            self.keepalive_ok,
            self.per_request_ok,
            self.failures.len(),
            self.connections,
            self.closes,
            self.bodies
        )
    }
}

impl Load {
    pub fn start(spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let started = Instant::now();
        let mut threads = Vec::new();
        for i in 0..spec.keepalive + spec.per_request {
            let keepalive = i < spec.keepalive;
            let (spec, stop, stats) = (spec.clone(), stop.clone(), stats.clone());
            let name = if keepalive { format!("load-ka-{i}") } else { format!("load-new-{i}") };
            let h = thread::Builder::new()
                .name(name.clone())
                .spawn(move || load_thread(&name, keepalive, &spec, &stop, &stats, started))
                .expect("spawn load thread");
            threads.push(h);
        }
        Load { stop, threads, stats, started }
    }

    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Waits until at least `n` more requests succeeded (bounded).
    pub fn wait_progress(&self, n: u64, timeout: Duration) -> bool {
        let from = self.stats.ok.load(Ordering::SeqCst);
        wait_until(timeout, || self.stats.ok.load(Ordering::SeqCst) >= from + n)
    }

    /// Stops the threads and reports.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let s = &self.stats;
        LoadReport {
            ok: s.ok.load(Ordering::SeqCst),
            keepalive_ok: s.keepalive_ok.load(Ordering::SeqCst),
            per_request_ok: s.per_request_ok.load(Ordering::SeqCst),
            closes: s.closes.load(Ordering::SeqCst),
            connections: s.connections.load(Ordering::SeqCst),
            failures: s.failures(),
            bodies: s.bodies.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn load_thread(name: &str, keepalive: bool, spec: &LoadSpec, stop: &AtomicBool, stats: &LoadStats, t0: Instant) {
    let mut conn: Option<(Client, u64)> = None;
    let mut next = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let fail = |what: String| {
            let t = t0.elapsed().as_secs_f64();
            stats.failures.lock().unwrap().push(format!("{t:.3}s {name} request {n}: {what}"));
        };
        if conn.is_none() {
            match Client::try_connect(spec.addr) {
                Ok(c) => {
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    conn = Some((c, 0));
                }
                Err(e) => {
                    fail(format!("connect: {e}"));
                    pace(&mut next, spec.interval);
                    continue;
                }
            }
        }
        let (c, on_conn) = conn.as_mut().expect("connected");
        *on_conn += 1;
        let nth = *on_conn;
        let req = if keepalive {
            get_request(&spec.host, &spec.path)
        } else {
            request_bytes("GET", &spec.host, &spec.path, &[("Connection", "close")], b"")
        };
        let outcome: Result<Response, String> = c
            .try_send(&req)
            .map_err(|e| format!("send (request {nth} on its connection): {e}"))
            .and_then(|()| c.try_read_response().map_err(|e| format!("read (request {nth} on its connection): {e}")));
        match outcome {
            Ok(r) if r.status == 200 && spec.bodies.contains(&r.body) => {
                stats.ok.fetch_add(1, Ordering::SeqCst);
                if keepalive {
                    stats.keepalive_ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    stats.per_request_ok.fetch_add(1, Ordering::SeqCst);
                }
                *stats.bodies.lock().unwrap().entry(r.body_str()).or_default() += 1;
                if !keepalive || r.says_close() {
                    if keepalive {
                        stats.closes.fetch_add(1, Ordering::SeqCst);
                    }
                    conn = None;
                }
            }
            Ok(r) => {
                fail(format!(
                    "unexpected response (request {nth} on its connection): {} body {:?}",
                    r.status_line(),
                    r.body_str()
                ));
                conn = None;
            }
            Err(e) => {
                fail(e);
                conn = None;
            }
        }
        pace(&mut next, spec.interval);
    }
}

/// Sleeps until the next slot of a fixed-rate schedule (no catching up).
fn pace(next: &mut Instant, interval: Duration) {
    *next += interval;
    let now = Instant::now();
    if *next > now {
        thread::sleep(*next - now);
    } else {
        *next = now;
    }
}

/// A slow request on its own connection, in a thread: sends `GET path`
/// and returns the response (or the error) when it arrives.
pub fn request_in_thread(addr: SocketAddr, host: &str, path: &str) -> JoinHandle<Result<Response, String>> {
    let req = get_request(host, path);
    thread::spawn(move || {
        let mut c = Client::try_connect(addr).map_err(|e| format!("connect: {e}"))?;
        c.try_send(&req).map_err(|e| format!("send: {e}"))?;
        c.try_read_response().map_err(|e| format!("read: {e}"))
    })
}

/// Uid and gid of the `nobody` user (from `/etc/passwd`).
pub fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "nobody").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
        })
        .expect("a nobody user in /etc/passwd")
}

/// Runs the binary under test with `args` as `uid`/`gid` (bounded: killed
/// after `timeout`).
pub fn run_pitcher_as(uid: u32, gid: u32, args: &[&str], timeout: Duration) -> RunOutput {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The build tree may sit under a directory that `uid` cannot enter
    // (a checkout in /root): run a copy from a directory everyone can.
    let dir = tempfile::Builder::new().prefix("pitcher-as-").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let bin = dir.path().join("pitcher");
    std::fs::copy(PITCHER, &bin).expect("copy the binary under test");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod binary");
    let mut child = Command::new(&bin)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} as uid {uid}: {e}", bin.display()));
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("collect the output");
    RunOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
