//! Reloads do not grow the memory of a running instance: the memory of the
//! master and its workers after 30 reloads stays within 10% of what it was
//! before the first (with the same traffic served before each measure).
//!
//! Memory is the sum of `Pss` from `/proc/PID/smaps_rollup` over the master
//! and its workers, not of VmRSS: the processes share the binary's pages
//! and the shared region's, which VmRSS counts once in every process that
//! touched them (so the sum would move when a second process first reads a
//! page, and overstate the instance). Pss charges each shared page in
//! shares, so the sum is what the instance costs the machine.
//!
//! The reloads are the ones operators do: most change a route, some add a
//! worker and take it away again (a worker that exits makes the master
//! forget its counts in the shared region, which once read every page of
//! the region into the master: +4.7 MB), and between them keep-alive
//! connections go idle (each once kept the configuration of its last
//! request alive until its next one).

mod common;

use std::time::Duration;

use common::master::MasterRun;
use common::*;

/// Routes to go through: each snapshot of the configuration holds a router
/// and a copy of every route, so an old snapshot kept alive is visible.
const ROUTES: usize = 400;

fn config(backend: &Backend, variant: usize, workers: usize) -> ConfigBuilder {
    // A worker taken away closes its idle connections at the drain deadline
    // (only the third worker is: the first two stay).
    let mut c = ConfigBuilder::new()
        .top(&format!("workers = {workers}"))
        .top("drain_timeout_ms = 300")
        .cluster("a", [backend.spec()]);
    for r in 0..ROUTES {
        c = c.route(None, &format!("/v{variant}/r{r}/"), "a");
    }
    c.route(None, "/", "a")
}

/// Sum of Pss (KiB) over the master and its workers.
fn pss_kib(m: &MasterRun) -> u64 {
    let st = m.expect_status();
    let pids: Vec<u32> = std::iter::once(st.master_pid).chain(st.worker_pids()).collect();
    pids.iter()
        .map(|p| {
            let text = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
            let line = text.lines().find(|l| l.starts_with("Pss:")).unwrap_or_else(|| panic!("no Pss for {p}"));
            line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("Pss value")
        })
        .sum()
}

/// Keep-alive connections open from the start to the end.
const IDLE: usize = 40;

/// The same traffic before each measure: new connections, and one request
/// on keep-alive connection `round` of `idle`, which then stays idle (after
/// 30 rounds, 30 connections last served a request under 30 configurations).
fn traffic(m: &MasterRun, idle: &mut [Client], round: usize) {
    for i in 0..20 {
        let r = get_once(m.addr(), &format!("host{i}.example"), "/");
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    let c = &mut idle[round % IDLE];
    assert_eq!(c.get("host1.example", "/").status, 200, "keep-alive connection {round}");
}

fn reload(m: &mut MasterRun, backend: &Backend, variant: usize, workers: usize) {
    m.write_config(&config(backend, variant, workers));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "reload {variant}: {out:?}");
    let st = m
        .wait_status(Duration::from_secs(15), |s| s.workers.len() == workers && s.all_ready() && s.retiring.is_empty());
    assert!(st.is_some(), "reload {variant}: workers settled\n{}", m.log());
}

#[test]
fn thirty_reloads_keep_the_memory_of_master_and_workers_within_ten_percent() {
    let backend = Backend::start("A");
    let mut m = MasterRun::start(&config(&backend, 0, 2));
    let mut idle: Vec<Client> = (0..IDLE).map(|_| m.client()).collect();
    // Warm up (buffers, pools, first use of every code path), then measure.
    for round in 0..IDLE {
        traffic(&m, &mut idle, round);
    }
    // One reload before measuring: the code of that path is read from the
    // binary the first time it runs.
    reload(&mut m, &backend, 1, 2);
    traffic(&m, &mut idle, 0);
    let before = pss_kib(&m);

    for i in 2..32 {
        // Every tenth reload adds a worker, the next takes it away.
        let workers = if i % 10 == 5 { 3 } else { 2 };
        reload(&mut m, &backend, i, workers);
        traffic(&m, &mut idle, i);
    }
    let after = pss_kib(&m);
    eprintln!("Pss of master + workers: {before} KiB before, {after} KiB after 30 reloads");
    assert!(
        after * 10 <= before * 11,
        "memory grew from {before} KiB to {after} KiB over 30 reloads (more than 10%)\n{}",
        m.log()
    );
}

/// Workers allocate their I/O buffers (16 KiB and up) in mappings of their
/// own, so buffers freed after a burst or while handing connections to a
/// new generation go back to the kernel: the master starts them with the
/// glibc tunable that says so (a worker's own environment, read from
/// /proc), and they serve with it.
#[test]
fn workers_start_with_their_buffers_mapped_apart_and_serve() {
    let backend = Backend::start("A");
    let m = MasterRun::start(&config(&backend, 0, 2));
    let st = m.expect_status();
    assert!(st.all_ready(), "{st:?}");
    for pid in st.worker_pids() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("worker environment readable");
        let tunables = env
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"GLIBC_TUNABLES="))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(tunables.as_deref(), Some("glibc.malloc.mmap_threshold=16384"), "worker {pid}");
    }
    let master_env = std::fs::read(format!("/proc/{}/environ", st.master_pid)).expect("master environment readable");
    assert!(
        !master_env.split(|&b| b == 0).any(|v| v.starts_with(b"GLIBC_TUNABLES=")),
        "the master's own allocator is left as the operator started it"
    );
    let r = Client::connect(m.addr()).get("host1.example", "/v0/r1/x");
    assert_eq!(r.status, 200, "{r:?}");
}
