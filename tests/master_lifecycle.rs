//! The master and its workers as an operator sees them: the workers it
//! starts (children of the master, restarted when killed), reloads by
//! `-s reload` and SIGHUP (in place, refused when the file is invalid),
//! upgrades by SIGUSR2, the number of workers changed by a reload, graceful
//! (`-s quit`) and fast (`-s stop`) stops, log reopening, and daemon mode.
//!
//! Every test runs the real binary as master + workers on loopback sockets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::master::{alive, cmdline, parent_of, read_pid, request_in_thread, wait_gone, MasterRun};
use common::pitcher::send_signal;
use common::*;

/// Clusters `a` and `b`, everything routed to `to`, `workers` workers.
fn two_clusters(a: &Backend, b: &Backend, to: &str, workers: usize) -> ConfigBuilder {
    ConfigBuilder::new()
        .top(&format!("workers = {workers}"))
        .top("drain_timeout_ms = 2000")
        .cluster("a", [a.spec()])
        .cluster("b", [b.spec()])
        .route(None, "/", to)
}

/// The body of a GET on a new connection; panics unless it is a 200.
fn body_of_new_request(m: &MasterRun, path: &str) -> String {
    let r = get_once(m.addr(), "test.example", path);
    assert_eq!(r.status, 200, "GET {path}: {}{}", r.head_str(), r.body_str());
    r.body_str()
}

#[test]
fn master_starts_the_configured_number_of_ready_workers_as_its_children() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::start(&two_clusters(&a, &b, "a", 3));

    let st = m.expect_status();
    assert_eq!(st.state, "Running");
    assert_eq!(Some(st.master_pid), m.pid(), "pid file names the master");
    assert_eq!(st.workers.len(), 3, "{st:?}");
    assert!(st.all_ready(), "{st:?}");
    let mut pids = st.worker_pids();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three distinct worker pids: {st:?}");
    for pid in &pids {
        assert_eq!(parent_of(*pid), Some(st.master_pid), "worker {pid} is a child of the master");
        assert!(cmdline(*pid).starts_with("pitcher: worker process"), "worker {pid}: {:?}", cmdline(*pid));
    }
    assert_eq!(st.listeners, vec![m.addr().to_string()]);
    let mode = std::fs::metadata(m.control_socket()).expect("control socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    // Exactly the master and its three workers.
    assert_eq!(m.family().len(), 4, "{:?}", m.family());
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
}

#[test]
fn worker_killed_with_sigkill_is_replaced_and_the_new_one_serves_within_a_second() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let before = m.expect_status();
    let victim = before.workers[0].pid.expect("slot 0 has a worker");
    let other = before.workers[1].pid.expect("slot 1 has a worker");

    let t0 = Instant::now();
    send_signal(victim, "KILL");
    let after = m
        .wait_status(Duration::from_secs(1), |s| {
            s.all_ready() && s.workers[0].pid.is_some_and(|p| p != victim) && !alive(victim)
        })
        .unwrap_or_else(|| panic!("no new ready worker within 1 s; status {:?}", m.status()));
    let took = t0.elapsed();
    let new = after.workers[0].pid.unwrap();
    assert_eq!(after.workers[1].pid, Some(other), "the other worker is untouched");
    assert_eq!(parent_of(new), Some(after.master_pid));
    assert!(
        common::wait_until(Duration::from_secs(2), || {
            m.log().lines().any(|l| l.contains("worker died; restarting it") && l.contains("killed by SIGKILL"))
        }),
        "the master logs the death and the signal:\n{}",
        m.log()
    );
    for _ in 0..10 {
        assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    }
    eprintln!("replacement worker {new} ready {took:?} after SIGKILL of {victim}");
}

#[test]
fn only_worker_killed_with_sigkill_is_replaced_and_a_waiting_request_is_served_within_a_second() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::start(&two_clusters(&a, &b, "a", 1));
    let victim = m.expect_status().workers[0].pid.expect("a worker");

    send_signal(victim, "KILL");
    assert!(wait_gone(victim, Duration::from_secs(1)), "worker {victim} still alive after SIGKILL");
    // No worker may be accepting now: the connection waits in the backlog
    // until the replacement accepts it.
    let t0 = Instant::now();
    let r = get_once(m.addr(), "test.example", "/after-kill");
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "ok from A");
    assert!(took < Duration::from_secs(1), "request after the kill took {took:?}");
    let st = m.expect_status();
    assert_ne!(st.workers[0].pid, Some(victim));
    assert!(st.all_ready(), "{st:?}");
}

#[test]
fn crash_looping_worker_is_restarted_with_growing_back_off() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::start(&two_clusters(&a, &b, "a", 1));
    // Three deaths of young workers in a row: each restart waits longer.
    let mut last = None;
    for _ in 0..3 {
        let st = m
            .wait_status(Duration::from_secs(5), |s| s.all_ready() && s.workers[0].pid != last)
            .unwrap_or_else(|| panic!("no ready worker; status {:?}", m.status()));
        let victim = st.workers[0].pid.unwrap();
        send_signal(victim, "KILL");
        assert!(wait_gone(victim, Duration::from_secs(1)));
        last = Some(victim);
    }
    let st = m
        .wait_status(Duration::from_secs(5), |s| s.all_ready() && s.workers[0].pid != last)
        .expect("the worker comes back");
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    let restarts = || {
        m.log()
            .lines()
            .filter(|l| l.contains("worker died; restarting it"))
            .filter_map(|l| l.split("restart_in_ms: ").nth(1)?.split(',').next()?.trim().parse().ok())
            .collect::<Vec<u64>>()
    };
    assert!(
        common::wait_until(Duration::from_secs(2), || restarts().len() == 3),
        "three restarts logged with their delay:\n{}",
        m.log()
    );
    let delays = restarts();
    assert!(delays.windows(2).all(|w| w[1] > w[0]) && delays[0] > 0, "back-off grows: {delays:?}");
    eprintln!("restart delays {delays:?} ms; worker now {:?}", st.workers[0].pid);
}

#[test]
fn s_reload_swaps_the_configuration_in_place_without_restarting_workers() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let before = m.expect_status();
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    // A keep-alive connection opened before the reload.
    let mut c = m.client();
    assert_eq!(c.get("test.example", "/").body_str(), "ok from A");

    m.write_config(&two_clusters(&a, &b, "b", 2));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "pitcher: configuration reloaded by 2 workers");

    let after = m.expect_status();
    assert_eq!(after.master_pid, before.master_pid);
    assert_eq!(after.worker_pids(), before.worker_pids(), "no worker restarted for a reload");
    assert_eq!(after.config_seq, before.config_seq + 1);
    assert!(after.all_at(after.config_seq), "{after:?}");
    for _ in 0..6 {
        assert_eq!(body_of_new_request(&m, "/"), "ok from B");
    }
    // The next request on the old keep-alive connection sees the new route.
    let r = c.get("test.example", "/");
    assert_eq!(r.body_str(), "ok from B");
    assert!(!r.says_close(), "a reload does not close connections: {}", r.head_str());
}

#[test]
fn sighup_by_pid_reloads_like_s_reload() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let before = m.expect_status();

    m.write_config(&two_clusters(&a, &b, "b", 2));
    m.kill_master("HUP");
    let seq = before.config_seq + 1;
    let after = m
        .wait_status(Duration::from_secs(5), |s| s.config_seq == seq && s.all_at(seq))
        .unwrap_or_else(|| panic!("SIGHUP did not reload; status {:?}", m.status()));
    assert_eq!(after.master_pid, before.master_pid);
    assert_eq!(after.worker_pids(), before.worker_pids(), "no worker restarted for a reload");
    for _ in 0..6 {
        assert_eq!(body_of_new_request(&m, "/"), "ok from B");
    }
}

/// The line (1-based) of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).unwrap_or_else(|| panic!("{needle:?} not in\n{text}"))
}

/// An invalid file: `-s reload` exits non-zero printing
/// `pitcher: reload failed: <file>:<line>:<col>: <reason>`, the master logs
/// it, and the old configuration keeps serving; a valid reload afterwards
/// works. `make` builds the invalid text from the run's valid one; the
/// error is expected on the first line containing `needle`.
fn check_invalid_reload(make: impl Fn(String) -> String, needle: &str, reason: &str) {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let before = m.expect_status();

    let text = make(m.config_text(&two_clusters(&a, &b, "a", 2)));
    let bad_line = line_of(&text, needle);
    m.write_config_text(&text);
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "an invalid file must fail the reload: {out:?}");
    let prefix = format!("pitcher: reload failed: {}:{bad_line}:", m.config_path().display());
    assert!(out.stderr.starts_with(&prefix), "stderr should start with {prefix:?}: {out:?}");
    assert!(out.stderr.contains(reason), "stderr should give the reason {reason:?}: {out:?}");
    assert!(
        common::wait_until(Duration::from_secs(2), || m
            .log()
            .contains("reload refused; the running configuration stays")),
        "the master logs the refusal:\n{}",
        m.log()
    );

    let after = m.expect_status();
    assert_eq!(after.config_seq, before.config_seq, "nothing changed");
    assert_eq!(after.worker_pids(), before.worker_pids());
    for _ in 0..6 {
        assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    }

    m.write_config(&two_clusters(&a, &b, "b", 2));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(body_of_new_request(&m, "/"), "ok from B");
}

#[test]
fn reload_of_a_file_naming_an_undefined_cluster_keeps_the_old_configuration_and_reports_file_and_line() {
    check_invalid_reload(
        |good| good.replace("cluster = \"a\"", "cluster = \"nope\""),
        "cluster = \"nope\"",
        "not defined",
    );
}

#[test]
fn reload_of_a_file_with_a_toml_syntax_error_keeps_the_old_configuration_and_reports_file_and_line() {
    check_invalid_reload(|good| format!("drain_timeout_ms = 12x\n{good}"), "12x", "expected newline");
}

#[test]
fn sigusr2_by_pid_upgrades_like_s_upgrade() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let old = m.pid().expect("pid file");
    let old_workers = m.expect_status().worker_pids();

    m.install_binary();
    send_signal(old, "USR2");
    let st = m
        .wait_status(Duration::from_secs(10), |s| s.master_pid != old && s.all_ready())
        .unwrap_or_else(|| panic!("SIGUSR2 did not bring a new master; status {:?}", m.status()));
    let new = st.master_pid;
    m.track(new);
    assert!(m.wait_ready(Duration::from_secs(10)).is_ok(), "the new master is ready");
    assert_eq!(m.pid(), Some(new), "the pid file names the new master");
    for pid in st.worker_pids() {
        assert_eq!(parent_of(pid), Some(new), "new worker {pid} is a child of the new master");
        assert!(!old_workers.contains(&pid));
    }
    assert!(wait_gone(old, Duration::from_secs(6)), "the old master exits after draining");
    for pid in old_workers {
        assert!(wait_gone(pid, Duration::from_secs(1)), "old worker {pid} exits");
    }
    assert!(common::wait_until(Duration::from_secs(2), || !m.oldbin().exists()), "the .oldbin pid file is removed");
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    assert_eq!(m.family().len(), 3, "new master and its two workers only: {:?}", m.family());
}

#[test]
fn reload_changing_workers_starts_and_drains_workers() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let two = m.expect_status().worker_pids();

    m.write_config(&two_clusters(&a, &b, "a", 3));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    let three = m
        .wait_status(Duration::from_secs(5), |s| s.workers.len() == 3 && s.all_ready())
        .unwrap_or_else(|| panic!("no third worker; status {:?}", m.status()));
    assert_eq!(&three.worker_pids()[..2], &two[..], "the two running workers are kept");

    m.write_config(&two_clusters(&a, &b, "a", 1));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    let one = m
        .wait_status(Duration::from_secs(5), |s| s.workers.len() == 1 && s.all_ready())
        .unwrap_or_else(|| panic!("still more than one worker; status {:?}", m.status()));
    assert_eq!(one.worker_pids(), vec![two[0]]);
    for pid in three.worker_pids().into_iter().skip(1) {
        assert!(wait_gone(pid, Duration::from_secs(5)), "retired worker {pid} exits");
    }
    assert!(m.wait_status(Duration::from_secs(3), |s| s.retiring.is_empty()).is_some());
    assert_eq!(m.family().len(), 2, "{:?}", m.family());
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
}

#[test]
fn s_quit_drains_a_slow_request_then_master_and_workers_exit_and_pid_file_and_socket_are_removed() {
    let a = Backend::with_handler("A", |r| {
        if r.path() == "/slow" {
            Reply::ok("slow from A").delayed(Duration::from_millis(1500))
        } else {
            default_reply("A")
        }
    });
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2).top("drain_timeout_ms = 5000"));
    let st = m.expect_status();

    let slow = request_in_thread(m.addr(), "test.example", "/slow");
    assert!(a.wait_for_requests(1, Duration::from_secs(5)), "the slow request reached the backend");
    let t0 = Instant::now();
    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    // The listener closes at once: new connections are refused while the
    // slow request is still being answered.
    assert!(
        common::wait_until(Duration::from_secs(1), || std::net::TcpStream::connect(m.addr()).is_err()),
        "the listener still accepts during the drain"
    );
    assert!(!slow.is_finished(), "the slow request is still in flight");

    let r = slow.join().expect("thread").unwrap_or_else(|e| panic!("the in-flight request failed: {e}\n{}", m.log()));
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "slow from A");
    assert!(r.says_close(), "a draining worker answers with Connection: close: {}", r.head_str());

    assert!(m.wait_family_gone(Duration::from_secs(5)), "master and workers exit: {:?}", m.family());
    let took = t0.elapsed();
    assert!(!alive(st.master_pid));
    for pid in st.worker_pids() {
        assert!(!alive(pid), "worker {pid}");
    }
    assert!(!m.pid_file().exists(), "pid file removed");
    assert!(!m.control_socket().exists(), "control socket removed");
    let status = m.reap_first();
    assert!(status.is_some_and(|s| s.success()), "master exit status {status:?}");
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(m.addr()).is_err(), "listener closed");
    assert!(took < Duration::from_secs(4), "quit took {took:?} with a 1.5 s request in flight");
}

#[test]
fn s_stop_is_fast_even_with_a_request_in_flight() {
    let a = Backend::with_handler("A", |r| {
        if r.path() == "/slow" {
            Reply::ok("slow").delayed(Duration::from_secs(8))
        } else {
            default_reply("A")
        }
    });
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2).top("drain_timeout_ms = 20000"));
    let _slow = request_in_thread(m.addr(), "test.example", "/slow");
    assert!(a.wait_for_requests(1, Duration::from_secs(5)));

    let t0 = Instant::now();
    let out = m.signal_cmd("stop");
    assert!(out.status.success(), "{out:?}");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "stopped: {:?}", m.family());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "fast stop took {took:?}");
    assert!(!m.pid_file().exists(), "pid file removed");
    assert!(!m.control_socket().exists(), "control socket removed");
}

#[test]
fn sigterm_by_pid_stops_fast_and_sigquit_by_pid_stops_gracefully() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    m.kill_master("TERM");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "SIGTERM: {:?}", m.family());
    assert!(!m.pid_file().exists() && !m.control_socket().exists());
    drop(m);

    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    m.kill_master("QUIT");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "SIGQUIT: {:?}", m.family());
    assert!(!m.pid_file().exists() && !m.control_socket().exists());
    assert!(m.log().contains("quitting: draining workers"), "{}", m.log());
}

#[test]
fn s_reopen_and_sigusr1_reopen_the_error_log_after_it_was_moved() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let with_log = |to: &str| two_clusters(&a, &b, to, 2).top("error_log = \"@DIR@/error.log\"");
    let mut m = MasterRun::start(&with_log("a"));
    let log = m.dir().join("error.log");
    let rotated = m.dir().join("error.log.1");
    assert!(common::wait_until(Duration::from_secs(2), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("master started"))
    }));

    // logrotate: move the file, then ask for a reopen.
    std::fs::rename(&log, &rotated).expect("rotate");
    let out = m.signal_cmd("reopen");
    assert!(out.status.success(), "{out:?}");
    assert!(common::wait_until(Duration::from_secs(2), || log.exists()), "a new error.log is created");
    // Something every worker logs: a reload.
    m.write_config(&with_log("b"));
    assert!(m.signal_cmd("reload").status.success());
    let has = |p: &std::path::Path, what: &str| std::fs::read_to_string(p).unwrap_or_default().matches(what).count();
    assert!(
        common::wait_until(Duration::from_secs(2), || has(&log, "configuration reloaded, seq: 2") == 2),
        "both workers log into the new file:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(has(&rotated, "configuration reloaded"), 0, "nothing more goes to the moved file");

    // The same with SIGUSR1 by pid.
    let rotated2 = m.dir().join("error.log.2");
    std::fs::rename(&log, &rotated2).expect("rotate");
    m.kill_master("USR1");
    assert!(common::wait_until(Duration::from_secs(2), || log.exists()), "SIGUSR1 creates a new error.log");
    m.write_config(&with_log("a"));
    assert!(m.signal_cmd("reload").status.success());
    assert!(
        common::wait_until(Duration::from_secs(2), || has(&log, "configuration reloaded, seq: 3") == 2),
        "both workers log into the file made by SIGUSR1:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(has(&rotated2, "configuration reloaded, seq: 3"), 0);
    m.stop();
}

#[test]
fn daemon_mode_detaches_and_the_pid_file_names_the_master() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::prepare(&two_clusters(&a, &b, "a", 2).top("error_log = \"@DIR@/error.log\""));
    let out = Command::new(m.exe())
        .arg("-c")
        .arg(m.config_path())
        .stdin(Stdio::null())
        .output()
        .expect("run pitcher in daemon mode");
    assert!(out.status.success(), "{out:?}");
    let st = m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let pid = m.pid().expect("pid file");
    assert_eq!(st.master_pid, pid);
    assert_ne!(parent_of(pid), Some(std::process::id()), "the master is detached from its starter");
    for w in st.worker_pids() {
        assert_eq!(parent_of(w), Some(pid));
    }
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");
    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "{:?}", m.family());
    assert!(read_pid(m.pid_file()).is_none() && !m.control_socket().exists());
}

#[test]
fn daemon_mode_start_failure_after_detaching_fails_the_command_with_the_reason_and_is_logged() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::prepare(&two_clusters(&a, &b, "a", 1).top("error_log = \"@DIR@/error.log\""));
    // A control socket in a directory that does not exist: the master can
    // only find out after it detached (the pid file is locked before, so a
    // second master is refused before it binds anything). An init script
    // or systemd's Type=forking must still learn that the start failed,
    // and why.
    let text = m.config_text(m.builder()).replace(
        &format!("control_socket = \"{}\"", m.control_socket().display()),
        &format!("control_socket = \"{}/missing/pitcher.sock\"", m.dir().display()),
    );
    m.write_config_text(&text);
    let out = Command::new(m.exe()).arg("-c").arg(m.config_path()).stdin(Stdio::null()).output().expect("run pitcher");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the start failed, so must the command: {out:?}");
    assert!(stderr.contains("cannot bind the control socket"), "the reason is printed: {stderr:?}");
    let log = m.dir().join("error.log");
    assert!(
        common::wait_until(Duration::from_secs(3), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("cannot bind the control socket"))
        }),
        "the reason is in the error log: {:?}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(common::wait_until(Duration::from_secs(3), || m.family().is_empty()), "{:?}", m.family());
}

#[test]
fn workers_running_as_the_configured_user_keep_logging_after_the_error_log_is_rotated() {
    // Workers drop privileges only when the master runs as root.
    if !nix_is_root() || !std::fs::read_to_string("/etc/passwd").unwrap_or_default().contains("\nnobody:") {
        eprintln!("skipped: needs root and a user \"nobody\"");
        return;
    }
    let a = Backend::start("A");
    let b = Backend::start("B");
    let with = |to: &str| two_clusters(&a, &b, to, 2).top("user = \"nobody\"").top("error_log = \"@DIR@/error.log\"");
    let mut m = MasterRun::start(&with("a"));
    // The directory is the test's (mode 0700): let the workers' user in,
    // as /var/log/pitcher would.
    std::fs::set_permissions(m.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for w in m.expect_status().worker_pids() {
        let uid = std::fs::read_to_string(format!("/proc/{w}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
        assert_eq!(uid.as_deref(), Some("65534"), "worker {w} runs as nobody");
    }
    assert_eq!(body_of_new_request(&m, "/"), "ok from A");

    let log = m.dir().join("error.log");
    std::fs::rename(&log, m.dir().join("error.log.1")).unwrap();
    let out = m.signal_cmd("reopen");
    assert!(out.status.success(), "{out:?}");
    m.write_config(&with("b"));
    assert!(m.signal_cmd("reload").status.success());
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        common::wait_until(Duration::from_secs(2), || text().matches("configuration reloaded, seq: 2").count() == 2),
        "both workers log into the new file after the rotation; new file:\n{}\nold file:\n{}",
        text(),
        std::fs::read_to_string(m.dir().join("error.log.1")).unwrap_or_default()
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        .unwrap_or(false)
}

#[test]
fn s_commands_fall_back_to_the_pid_file_and_a_signal_when_the_control_socket_is_gone() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let pid = m.pid().expect("pid file");
    std::fs::remove_file(m.control_socket()).expect("remove the control socket");

    m.write_config(&two_clusters(&a, &b, "b", 2));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains(&format!("sent SIGHUP to master pid {pid}")), "{out:?}");
    assert!(
        common::wait_until(Duration::from_secs(3), || body_of_new_request(&m, "/") == "ok from B"),
        "SIGHUP reloaded:\n{}",
        m.log()
    );

    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains(&format!("sent SIGQUIT to master pid {pid}")), "{out:?}");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "{:?}", m.family());
    assert!(!m.pid_file().exists());
}

#[test]
fn reload_binds_added_listeners_and_closes_removed_ones() {
    use std::io::{Read, Write};
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::start(&two_clusters(&a, &b, "a", 2));
    let first = m.addr();
    let base = m.config_text(m.builder());
    let second = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let unix = m.dir().join("extra.sock");

    // Added: a TCP and a Unix listener, bound by the master, served by both workers.
    let more = format!(
        "{base}\n[[listeners]]\naddress = \"{second}\"\n\n[[listeners]]\naddress = \"unix:{}\"\n",
        unix.display()
    );
    m.write_config_text(&more);
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    for _ in 0..10 {
        assert_eq!(get_once(second, "test.example", "/").body_str(), "ok from A");
        assert_eq!(get_once(first, "test.example", "/").body_str(), "ok from A");
    }
    let mut u = std::os::unix::net::UnixStream::connect(&unix).expect("the unix listener accepts");
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.write_all(b"GET / HTTP/1.1\r\nHost: test.example\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    u.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok from A"), "{answer}");

    // Removed: the first listener; the others keep serving.
    let only_second = more.replace(&format!("\"{first}\""), &format!("\"{second}\"")).replacen(
        &format!("[[listeners]]\naddress = \"{second}\"\n"),
        "",
        1,
    );
    m.write_config_text(&only_second);
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}\n{only_second}\n{}", m.log());
    assert!(
        wait_until(Duration::from_secs(3), || std::net::TcpStream::connect(first).is_err()),
        "the removed listener still accepts"
    );
    assert_eq!(get_once(second, "test.example", "/").body_str(), "ok from A");
}
