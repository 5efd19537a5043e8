//! A compromised worker and the shared memory region: the region is a
//! `memfd` sealed against resizing, so whoever holds its fd (a worker, or
//! anyone who reaches it through `/proc/PID/fd`) cannot shrink it under the
//! other processes' mappings and kill them with SIGBUS, nor grow it.

mod common;

use std::os::fd::AsFd;
use std::path::PathBuf;

use common::master::{alive, MasterRun};
use common::upstream::worker_pids;
use common::*;

/// The fds of `pid` that are the shared region (`/memfd:pitcher-shared`).
fn region_fds(pid: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd").flatten() {
        let link = std::fs::read_link(e.path()).unwrap_or_default();
        if link.to_string_lossy().starts_with("/memfd:pitcher-shared") {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_worker_cannot_resize_the_shared_region_and_the_proxy_keeps_serving() {
    let be = Backend::start("a");
    let builder = ConfigBuilder::new().top("workers = 2").cluster("app", [be.spec()]).route(None, "/", "app");
    let m = MasterRun::start(&builder);
    assert_eq!(get_once(m.addr(), "app", "/before").body_str(), "ok from a");
    let pids = worker_pids(&m);
    assert_eq!(pids.len(), 2);

    let fds = region_fds(pids[0]);
    assert_eq!(fds.len(), 1, "one shared region among the worker's fds: {fds:?}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fds[0])
        .unwrap_or_else(|e| panic!("open {}: {e}", fds[0].display()));
    let len = file.metadata().expect("fstat").len() as i64;
    assert!(len > 0);
    for size in [0, 4096, len / 2, len + 1, len * 2] {
        let r = nix::unistd::ftruncate(file.as_fd(), size);
        assert_eq!(r, Err(nix::errno::Errno::EPERM), "ftruncate to {size} bytes (region is {len})");
    }
    assert_eq!(file.metadata().expect("fstat").len() as i64, len, "the size did not change");

    // Every process of the instance still runs and serves.
    for _ in 0..20 {
        let r = common::upstream::get_new_conn(m.addr(), "/after", &[]).expect("request after the attempts");
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    for &p in &pids {
        assert!(alive(p), "worker {p} died");
    }
    assert!(m.pid().is_some_and(alive), "the master died");
    assert_eq!(worker_pids(&m), pids, "no worker was restarted");
    assert!(!m.log().contains("SIGBUS"), "{}", m.log());
}
