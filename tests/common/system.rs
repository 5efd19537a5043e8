//! What the packaging tests (Debian package, Salt formula) share: bounded
//! runs of system commands (`dpkg`, `salt-call`, the init script) with
//! their output in files, the status of a master installed somewhere else
//! than a test directory, and stopping every process of such a master by
//! pid.
//!
//! Output goes to files, not pipes: a command that starts a daemon (the
//! init script's `start`, `salt-call` running it) must not leave the
//! daemon holding a pipe this process waits on.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::master::{alive, processes_naming, Status};
use super::pitcher::send_signal;
use super::wait_until;

/// The outcome of one [`run`].
#[derive(Debug)]
pub struct Ran {
    /// Exit status (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion ([`super::pitcher::run_command`]): its exit
/// code and output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Ran {
    let out = super::pitcher::run_command(cmd, timeout);
    Ran { code: out.status.code().unwrap_or(-1), stdout: out.stdout, stderr: out.stderr }
}

/// [`run`] of `program args...`.
pub fn run_args(program: &str, args: &[&str], timeout: Duration) -> Ran {
    run(Command::new(program).args(args), timeout)
}

/// `exe -c config ctl --json status`, parsed; `None` if no master answers.
pub fn ctl_status(exe: &Path, config: &Path) -> Option<Status> {
    let out = run(Command::new(exe).arg("-c").arg(config).args(["ctl", "--json", "status"]), Duration::from_secs(30));
    if out.code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    serde_json::from_value(v.get("data")?.clone()).ok()
}

/// Polls [`ctl_status`] until `f` holds (bounded).
pub fn wait_ctl_status(
    exe: &Path,
    config: &Path,
    timeout: Duration,
    mut f: impl FnMut(&Status) -> bool,
) -> Option<Status> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = ctl_status(exe, config) {
            if f(&s) {
                return Some(s);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real uid of a process (`Uid:` of /proc/PID/status).
pub fn uid_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    uid_of(std::process::id()) == Some(0)
}

/// Stops, by pid, every live process whose command line names `config`
/// (masters and workers of every generation): SIGTERM, then SIGKILL to
/// what is left after a few seconds. Returns what was found.
pub fn stop_processes_naming(config: &Path) -> Vec<(u32, String)> {
    let needle = config.display().to_string();
    let found = processes_naming(&needle);
    for (pid, _) in &found {
        send_signal(*pid, "TERM");
    }
    if !wait_until(Duration::from_secs(8), || found.iter().all(|(p, _)| !alive(*p))) {
        for (pid, _) in &found {
            if alive(*pid) {
                send_signal(*pid, "KILL");
            }
        }
        wait_until(Duration::from_secs(3), || found.iter().all(|(p, _)| !alive(*p)));
    }
    found
}
