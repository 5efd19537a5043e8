//! The pid file: written and locked (`flock`, exclusive) by its master for
//! the master's whole life, so that a second master of the same file
//! refuses to start, and so that `pitcher -s` can tell a live master from a
//! stale file. On a binary upgrade the old master renames its file to
//! `.oldbin` (its lock goes with the inode) and the new master creates and
//! locks a new file at the path; each holds its own until it exits.
//!
//! The lock is taken before the master daemonizes: the open file
//! description (and with it the lock) is shared by the forks and outlives
//! the parents that exit.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A pid file this process holds locked.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Unlocked when dropped (and by the kernel when the process ends).
    file: Flock<File>,
}

impl PidFile {
    /// Opens (creating it if needed) and locks the pid file. Fails with a
    /// message naming the running master when another process holds it.
    pub fn lock(path: &Path) -> io::Result<PidFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open the pid file {}: {e}", path.display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(PidFile { path: path.to_path_buf(), file }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = read_pid(path).map_or_else(|| "a process".to_string(), |p| format!("pid {p}"));
                Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another master ({holder}) holds the pid file {}: is Pitcher already running? \
                         (`pitcher -s quit` stops it; give this instance its own pid_file)",
                        path.display()
                    ),
                ))
            }
            Err((_, e)) => Err(io::Error::other(format!("cannot lock the pid file {}: {e}", path.display()))),
        }
    }

    /// Writes `pid` as the file's content (after a daemonizing fork the pid
    /// is known only now).
    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        let text = format!("{pid}\n");
        self.file.set_len(0)?;
        self.file.write_all_at(text.as_bytes(), 0)?;
        Ok(())
    }

    /// The pid file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    /// A start that failed before the pid was written leaves no empty file
    /// behind (the file is ours: we hold its lock).
    fn drop(&mut self) {
        if self.file.metadata().is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The pid in a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Why no running master was found behind a pid file (so nothing is
/// signalled).
#[derive(Debug, thiserror::Error)]
pub enum NotRunning {
    /// The file holds no pid.
    #[error("no pid in {}", file.display())]
    NoPid {
        /// The pid file.
        file: PathBuf,
    },
    /// The file or the process could not be read.
    #[error("{what}: {source}")]
    Unreadable {
        /// The pid file or the process (`pid N`).
        what: String,
        /// Why.
        source: io::Error,
    },
    /// Nobody holds the file's lock.
    #[error("{} is not locked by a running master (stale; pid {pid})", file.display())]
    Unlocked {
        /// The pid file.
        file: PathBuf,
        /// The pid it names.
        pid: u32,
    },
    /// The lock could not be tested.
    #[error("cannot check the lock of {}: {source}", file.display())]
    Lock {
        /// The pid file.
        file: PathBuf,
        /// Why.
        source: nix::errno::Errno,
    },
    /// The pid is another program, or a worker.
    #[error("pid {pid} in {} is not a Pitcher master ({argv0:?})", file.display())]
    NotPitcher {
        /// The pid file.
        file: PathBuf,
        /// The pid it names.
        pid: u32,
        /// That process's argv[0].
        argv0: String,
    },
    /// The process does not have the file open.
    #[error("pid {pid} does not hold {} (stale pid file)", file.display())]
    NotHolding {
        /// The pid file.
        file: PathBuf,
        /// The pid it names.
        pid: u32,
    },
}

/// The pid of the live Pitcher master that holds `path`, for `-s` to
/// signal; an error saying why not otherwise. A pid is trusted only if the
/// file is locked, the process is a Pitcher master (its command line, not
/// a worker's), and it has the pid file open: a stale file naming a pid
/// that was reused by another program is never signalled.
pub fn running_master(path: &Path) -> Result<u32, NotRunning> {
    let file = || path.to_path_buf();
    let unreadable = |what: String| move |source| NotRunning::Unreadable { what, source };
    let pid = read_pid(path).ok_or_else(|| NotRunning::NoPid { file: file() })?;
    let f = File::open(path).map_err(unreadable(path.display().to_string()))?;
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
        Ok(_) => return Err(NotRunning::Unlocked { file: file(), pid }),
        Err((_, source)) => return Err(NotRunning::Lock { file: file(), source }),
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(unreadable(format!("pid {pid}")))?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
    let argv0 = args.first().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default();
    let name = Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.starts_with("pitcher") || args.iter().any(|a| *a == b"--worker") {
        return Err(NotRunning::NotPitcher { file: file(), pid, argv0 });
    }
    let wanted = std::fs::canonicalize(path).map_err(unreadable(path.display().to_string()))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(unreadable(format!("pid {pid}")))?;
    let holds = fds.filter_map(Result::ok).any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == wanted));
    if !holds {
        return Err(NotRunning::NotHolding { file: file(), pid });
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid");
        drop(PidFile::lock(&path).unwrap());
        assert!(!path.exists(), "a start that never wrote its pid leaves no file");
        let first = PidFile::lock(&path).unwrap();
        first.write_pid(4242).unwrap();
        let e = PidFile::lock(&path).unwrap_err();
        assert!(e.to_string().contains("another master (pid 4242)"), "{e}");
        assert_eq!(read_pid(&path), Some(4242));
        // Locked, but the pid was reused by another program.
        let mut other = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        first.write_pid(other.id()).unwrap();
        let e = running_master(&path).unwrap_err();
        assert!(matches!(e, NotRunning::NotPitcher { .. }), "{e}");
        assert!(e.to_string().contains("not a Pitcher master"), "{e}");
        other.kill().unwrap();
        other.wait().unwrap();
        drop(first);
        let e = running_master(&path).unwrap_err();
        assert!(matches!(e, NotRunning::Unlocked { .. }), "{e}");
        assert!(e.to_string().contains("not locked"), "{e}");
    }
}
