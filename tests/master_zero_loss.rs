//! No request is lost while the master is reloaded, upgraded, or an
//! upgrade fails and is rolled back. A load client runs throughout: some
//! threads keep one connection open across requests (a response with
//! `Connection: close` means: reconnect), others open a new connection per
//! request. Every response is checked: a 200 whose body comes from a backend
//! the configuration may route to. A reset, an EOF before a response, or
//! any other answer is a failure, and the tests allow none.

mod common;

use std::time::{Duration, Instant};

use common::master::{alive, cmdline, parent_of, wait_gone, Load, LoadSpec, MasterRun};
use common::pitcher::send_signal;
use common::*;

/// Routes everything to cluster `to` (`a` or `b`).
fn config(a: &Backend, b: &Backend, to: &str, extra: &[&str]) -> ConfigBuilder {
    let mut c = ConfigBuilder::new().top("workers = 2").top("drain_timeout_ms = 1500");
    for l in extra {
        c = c.top(l);
    }
    c.cluster("a", [a.spec()]).cluster("b", [b.spec()]).route(None, "/", to)
}

/// A backend answering `ok from NAME`; the load's requests take a few
/// milliseconds, so that some are always in flight when a generation
/// starts draining.
fn backend(name: &'static str) -> Backend {
    Backend::with_handler(name, move |r| {
        let reply = default_reply(name);
        if r.path() == "/load" {
            reply.delayed(Duration::from_millis(4))
        } else {
            reply
        }
    })
}

fn load_spec(m: &MasterRun) -> LoadSpec {
    LoadSpec {
        addr: m.addr(),
        host: "load.example".into(),
        path: "/load".into(),
        keepalive: 4,
        per_request: 4,
        interval: Duration::from_millis(8),
        bodies: vec![b"ok from A".to_vec(), b"ok from B".to_vec()],
    }
}

/// GET on a new connection; the body (panics unless 200).
fn body_of_new_request(m: &MasterRun) -> String {
    let r = get_once(m.addr(), "check.example", "/check");
    assert_eq!(r.status, 200, "{}{}", r.head_str(), r.body_str());
    r.body_str()
}

/// After a failed upgrade: the same master (pid file restored, no
/// `.oldbin`, control socket its own) and the same workers serve on.
#[track_caller]
fn assert_rolled_back(m: &MasterRun, master: u32, workers: &[u32], what: &str) {
    assert_eq!(m.pid(), Some(master), "{what}: the pid file is restored");
    assert!(!m.oldbin().exists(), "{what}: no .oldbin left");
    let st = m.expect_status();
    assert_eq!(st.master_pid, master, "{what}: {st:?}");
    assert_eq!(st.upgrade_pid, None, "{what}: {st:?}");
    assert_eq!(st.worker_pids(), workers, "{what}: the workers were not touched");
    assert!(st.all_ready());
    assert_eq!(body_of_new_request(m), "ok from A", "{what}");
}

/// After a successful upgrade: the pid file and the status name the new
/// master, all its workers are ready and are its children.
fn check_new_master(m: &mut MasterRun, out: &RunOutput, old: u32) -> u32 {
    assert!(out.status.success(), "upgrade failed: {out:?}");
    let new: u32 = out
        .stdout
        .trim()
        .strip_prefix("pitcher: upgrade complete: new master pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected upgrade output {out:?}"));
    m.track(new);
    assert_ne!(new, old, "a new master");
    assert_eq!(m.pid(), Some(new), "the pid file names the new master");
    let st = m.expect_status();
    assert_eq!(st.master_pid, new, "the control socket is the new master's: {st:?}");
    assert!(st.all_ready(), "{st:?}");
    for w in st.worker_pids() {
        assert_eq!(parent_of(w), Some(new), "worker {w} belongs to the new master");
    }
    new
}

#[test]
fn zero_failed_requests_under_load_across_20_reloads_and_5_binary_upgrades() {
    let a = backend("A");
    let b = backend("B");
    let mut m = MasterRun::start(&config(&a, &b, "a", &[]));
    let load = Load::start(load_spec(&m));
    assert!(load.wait_progress(200, Duration::from_secs(10)), "the load runs: {:?}", load.stats().failures());
    let mut probe = m.client();
    let t0 = Instant::now();

    // 20 reloads alternating between the two configurations.
    for i in 0..20 {
        let to = if i % 2 == 0 { "b" } else { "a" };
        let want = if to == "a" { "ok from A" } else { "ok from B" };
        m.write_config(&config(&a, &b, to, &[]));
        let out = m.signal_cmd("reload");
        assert!(out.status.success(), "reload {i}: {out:?}");
        assert_eq!(out.stdout.trim(), "pitcher: configuration reloaded by 2 workers", "reload {i}");
        for _ in 0..3 {
            assert_eq!(body_of_new_request(&m), want, "reload {i}: new connections use the new configuration");
        }
        let r = probe.get("check.example", "/probe");
        assert_eq!(r.body_str(), want, "reload {i}: so does a keep-alive connection opened before it");
        std::thread::sleep(Duration::from_millis(150));
    }
    let reloads_took = t0.elapsed();
    // After 20 reloads the route is back on A.
    let want = "ok from A";

    // 5 binary upgrades, each with a fresh copy renamed over the master's path.
    let t1 = Instant::now();
    let mut old = m.pid().expect("pid file");
    let mut masters = vec![old];
    for i in 0..5 {
        m.install_binary();
        let out = m.signal_cmd("upgrade");
        let new = check_new_master(&mut m, &out, old);
        assert_eq!(body_of_new_request(&m), want, "upgrade {i}");
        masters.push(new);
        old = new;
        assert!(load.wait_progress(100, Duration::from_secs(10)), "upgrade {i}: the load goes on");
        std::thread::sleep(Duration::from_millis(300));
    }
    let upgrades_took = t1.elapsed();
    assert!(load.wait_progress(200, Duration::from_secs(10)));
    let report = load.finish();
    eprintln!(
        "zero-loss: 20 reloads in {reloads_took:.1?}, 5 upgrades in {upgrades_took:.1?}; load: {}",
        report.summary()
    );
    report.assert_no_failures();
    assert!(report.ok >= 3000, "too little load to mean anything: {}", report.summary());
    assert!(report.bodies.contains_key("ok from A") && report.bodies.contains_key("ok from B"));

    // Every old generation is gone; only the last master and its workers are left.
    for &pid in &masters[..masters.len() - 1] {
        assert!(wait_gone(pid, Duration::from_secs(5)), "old master {pid} still there: {}", cmdline(pid));
    }
    assert!(!m.oldbin().exists(), ".oldbin left behind");
    let family = m.family();
    assert_eq!(family.len(), 3, "the last master and its two workers: {family:?}");
    assert_eq!(m.expect_status().master_pid, old);
}

#[test]
fn failed_upgrades_roll_back_without_losing_a_request_and_a_good_upgrade_then_succeeds() {
    let a = backend("A");
    let b = backend("B");
    let mut m = MasterRun::start(&config(&a, &b, "a", &["upgrade_timeout_ms = 2000"]));
    let master = m.pid().expect("pid file");
    let workers = m.expect_status().worker_pids();
    let load = Load::start(load_spec(&m));
    assert!(load.wait_progress(200, Duration::from_secs(10)), "the load runs: {:?}", load.stats().failures());

    // The same master and workers serve on after each failure.
    let unchanged = |m: &MasterRun, what: &str| assert_rolled_back(m, master, &workers, what);

    // 1. A "binary" that exits at once, with `-s upgrade`.
    m.install_script("#!/bin/sh\nexit 3\n");
    let t0 = Instant::now();
    let out = m.signal_cmd("upgrade");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.starts_with("pitcher: upgrade failed"), "{out:?}");
    assert!(out.stderr.contains("rolled back"), "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "noticed at once, not at the timeout: {:?}", t0.elapsed());
    unchanged(&m, "exiting binary, -s upgrade");
    assert!(load.wait_progress(100, Duration::from_secs(10)));

    // 2. The same with SIGUSR2 by pid: the outcome shows in the status and the log.
    send_signal(master, "USR2");
    assert!(
        common::wait_until(Duration::from_secs(5), || m.log().matches("upgrade failed; rolled back").count() >= 2),
        "SIGUSR2 with an exiting binary is rolled back:\n{}",
        m.log()
    );
    unchanged(&m, "exiting binary, SIGUSR2");
    assert!(load.wait_progress(100, Duration::from_secs(10)));

    // 3. A "binary" that hangs: killed at the 2 s upgrade timeout. While it
    // hangs, a second upgrade is refused.
    m.install_script("#!/bin/sh\nexec sleep 60\n");
    let cfg = m.config_path().display().to_string();
    let t0 = Instant::now();
    let pending = std::thread::spawn(move || run_pitcher(&["-c", &cfg, "-s", "upgrade"], Duration::from_secs(30)));
    let st = m
        .wait_status(Duration::from_secs(2), |s| s.upgrade_pid.is_some())
        .unwrap_or_else(|| panic!("no upgrade in progress; status {:?}", m.status()));
    let sleeper = st.upgrade_pid.unwrap();
    // The shell of the script execs the sleeper, which keeps the pid.
    assert!(
        common::wait_until(Duration::from_secs(1), || cmdline(sleeper).starts_with("sleep 60")),
        "the new \"master\" is the sleeper: {:?}",
        cmdline(sleeper)
    );
    assert!(m.oldbin().exists(), "the pid file is .oldbin while the upgrade is pending");
    let second = m.signal_cmd("upgrade");
    assert!(!second.status.success(), "{second:?}");
    assert!(second.stderr.contains("already in progress"), "{second:?}");
    let out = pending.join().expect("thread");
    let took = t0.elapsed();
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("rolled back"), "{out:?}");
    assert!(out.stderr.contains("not ready within 2000 ms"), "{out:?}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "timed out after {took:?}");
    assert!(wait_gone(sleeper, Duration::from_secs(1)), "the hanging process {sleeper} is killed");
    unchanged(&m, "hanging binary");
    assert!(load.wait_progress(100, Duration::from_secs(10)));

    // 4. A good binary again: the upgrade succeeds.
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    let new = check_new_master(&mut m, &out, master);
    assert!(wait_gone(master, Duration::from_secs(5)), "the old master exits");
    for w in &workers {
        assert!(!alive(*w), "old worker {w} exited");
    }
    assert!(load.wait_progress(200, Duration::from_secs(10)));
    let report = load.finish();
    eprintln!("rollback: load: {}", report.summary());
    report.assert_no_failures();
    assert_eq!(m.expect_status().master_pid, new);
    assert_eq!(m.family().len(), 3, "{:?}", m.family());
}

/// `new_master_pid` of the first master log line containing `what`.
fn logged_new_master(log: &str, what: &str) -> Option<u32> {
    let line = log.lines().find(|l| l.contains(what))?;
    line.split("new_master_pid: ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `RssFile` of a process, in KiB: the pages of files (the binary, libc)
/// it has mapped.
fn rss_file_kib(pid: u32) -> u64 {
    status_kib(pid, "RssFile").unwrap_or_else(|| panic!("no RssFile for pid {pid}"))
}

/// The new master of an upgrade goes on in a child of the process the old
/// master started (so that it does not keep the startup's pages mapped),
/// and the old master adopts that child: it sees it die at once and rolls
/// back, with no request lost; a good upgrade then succeeds, and its master
/// maps fewer file pages than one that kept its startup.
#[test]
fn a_new_master_killed_after_it_left_its_first_process_is_rolled_back_at_once() {
    let a = backend("A");
    let b = backend("B");
    // Far beyond the test: the rollback must come from the death itself.
    let mut m = MasterRun::start(&config(&a, &b, "a", &["upgrade_timeout_ms = 60000"]));
    let master = m.pid().expect("pid file");
    let workers = m.expect_status().worker_pids();
    let load = Load::start(load_spec(&m));
    assert!(load.wait_progress(200, Duration::from_secs(10)), "the load runs: {:?}", load.stats().failures());

    // The new master holds its rolling start before its first worker.
    let hold = m.dir().join("fault-upgrade-hold");
    std::fs::write(&hold, b"").expect("hold file");
    m.install_binary();
    send_signal(master, "USR2");
    // (The control socket is the new master's while it starts.)
    assert!(
        common::wait_until(Duration::from_secs(10), || m.log().contains("goes on in a child")),
        "the new master forks:\n{}",
        m.log()
    );
    let log = m.log();
    let first = logged_new_master(&log, "upgrade started").expect("the old master logs the process it started");
    let new = logged_new_master(&log, "goes on in a child").expect("and the child it goes on in");
    assert_ne!(first, new, "the new master is a child of the process the old master started");
    assert!(wait_gone(first, Duration::from_secs(2)), "the first process exits and is reaped: {}", cmdline(first));
    assert_eq!(parent_of(new), Some(master), "the old master adopted the new one");
    assert!(cmdline(new).contains(" -c "), "the new master: {}", cmdline(new));

    let t0 = Instant::now();
    send_signal(new, "KILL");
    assert!(
        common::wait_until(Duration::from_secs(3), || m.log().contains("upgrade failed; rolled back")),
        "the old master notices its new master's death:\n{}",
        m.log()
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "at once, not at the timeout");
    let log = m.log();
    let failed = log.lines().find(|l| l.contains("upgrade failed; rolled back")).unwrap_or_default();
    assert!(failed.contains("killed by SIGKILL"), "the reason is the death: {failed}");
    assert!(wait_gone(new, Duration::from_secs(2)), "the killed new master is reaped, not a zombie");
    assert_rolled_back(&m, master, &workers, "new master killed");

    // A good upgrade now.
    std::fs::remove_file(&hold).expect("remove the hold");
    m.install_binary();
    // The first master (started in the foreground, it never forked) maps
    // its startup's pages; the new one only what it has run since.
    let old_pages = rss_file_kib(master);
    let out = m.signal_cmd("upgrade");
    let new = check_new_master(&mut m, &out, master);
    let new_pages = rss_file_kib(new);
    eprintln!("file pages mapped: first master {old_pages} KiB, new master {new_pages} KiB");
    assert!(
        new_pages * 10 < old_pages * 9,
        "the new master maps {new_pages} KiB of file pages, the first one {old_pages} KiB"
    );
    assert!(wait_gone(master, Duration::from_secs(5)), "the old master exits");
    assert!(load.wait_progress(200, Duration::from_secs(10)));
    let report = load.finish();
    eprintln!("killed new master: load: {}", report.summary());
    report.assert_no_failures();
}

/// A process a test started: killed and reaped by its pid however the
/// test ends.
struct Victim(std::process::Child);

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new "master" that names, as the child it goes on in, a process that
/// is not its child: the old master rolls back and does not adopt (nor, on
/// rollback, kill) that process.
#[test]
fn a_new_master_naming_a_pid_that_is_not_its_child_is_rolled_back_and_that_process_is_left_alone() {
    let a = backend("A");
    let b = backend("B");
    let m = MasterRun::start(&config(&a, &b, "a", &["upgrade_timeout_ms = 60000"]));
    let master = m.pid().expect("pid file");
    let workers = m.expect_status().worker_pids();
    let victim = Victim(std::process::Command::new("sleep").arg("60").spawn().expect("sleep"));
    let victim_pid = victim.0.id();
    // Takes the listeners, then claims the victim.
    m.install_script(&format!(
        "#!/usr/bin/env python3\n\
         import os, socket, time\n\
         s = socket.socket(fileno=int(os.environ['PITCHER_UPGRADE_FD']))\n\
         s.recvmsg(65536, socket.CMSG_SPACE(4 * 256))\n\
         s.send(b'{{\"type\":\"forked\",\"pid\":{victim_pid}}}')\n\
         time.sleep(60)\n"
    ));
    let t0 = Instant::now();
    let out = m.signal_cmd("upgrade");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains(&format!("named pid {victim_pid} as its child")), "{out:?}\n{}", m.log());
    assert!(t0.elapsed() < Duration::from_secs(5), "at once, not at the timeout: {:?}", t0.elapsed());
    assert!(alive(victim_pid), "the named process is not killed");
    assert_rolled_back(&m, master, &workers, "a stranger's pid named");
}
