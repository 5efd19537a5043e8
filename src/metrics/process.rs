//! The usual figures of a process (CPU time, resident memory, open fds,
//! start time), read from `/proc` by the master for itself and for each
//! of its workers at scrape time.

use std::path::PathBuf;

/// What `/proc` tells of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStat {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Open file descriptors (`None`: not readable).
    pub open_fds: Option<u64>,
    /// Start time, seconds since the epoch.
    pub start_seconds: f64,
}

/// The figures of process `pid`, `None` when it is gone.
pub fn read(pid: u32) -> Option<ProcStat> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The command name is in parentheses and may contain anything: the
    // fields are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so field N is f[N - 3].
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let tick = clock_ticks();
    let cpu_seconds = (field(14)? + field(15)?) as f64 / tick;
    let rss_pages = field(24)?;
    let rss_bytes = rss_pages * page_size();
    let start_seconds = boot_time().unwrap_or(0.0) + field(22)? as f64 / tick;
    let open_fds = std::fs::read_dir(dir.join("fd")).ok().map(|d| d.count() as u64);
    Some(ProcStat { cpu_seconds, rss_bytes, open_fds, start_seconds })
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as u64,
        _ => 4096,
    }
}

/// When the system booted, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let p = super::read(std::process::id()).expect("own /proc entry");
        assert!(p.rss_bytes > 1024 * 1024, "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_seconds > now - 3600.0 && p.start_seconds <= now + 1.0, "{p:?}");
        assert!(super::read(u32::MAX - 1).is_none());
    }
}
