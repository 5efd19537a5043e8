//! Trust boundaries of the process model: a configuration far larger than
//! one socket message reaches the workers and a new master; the control
//! socket serves only root and the master's user, and a silent or
//! oversized client cannot stall the master; the pid file is locked by its
//! master, so a second master refuses to start and `-s` never signals a
//! process that is not a Pitcher master.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::master::{alive, nobody, run_pitcher_as, wait_gone, MasterRun};
use common::*;

/// Routes `/route-N/` for N in 0..count, all to cluster `a`, each with a
/// long name: 3000 routes make about 4.5 MiB of TOML, more than one socket
/// message can carry even where `net.core.wmem_max` was raised to 4 MiB.
/// (Long names rather than more routes keep the parsing, done by the
/// master and each worker, short in a debug build.)
fn many_routes(a: &Backend, count: usize) -> ConfigBuilder {
    let mut b = ConfigBuilder::new()
        .top("workers = 1")
        .top("drain_timeout_ms = 1500")
        .top("upgrade_timeout_ms = 10000")
        .cluster("a", [a.spec()]);
    for i in 0..count {
        b = b.section(&format!(
            "[[routes]]\nname = \"route-{i:05}-{}\"\npath_prefix = \"/route-{i}/\"\ncluster = \"a\"",
            "of-a-configuration-larger-than-one-socket-message-".repeat(29)
        ));
    }
    b
}

#[test]
fn a_configuration_of_more_than_a_mebibyte_starts_reloads_and_upgrades() {
    let a = Backend::start("A");
    let builder = many_routes(&a, 3000);
    let mut m = MasterRun::start(&builder);
    let size = std::fs::metadata(m.config_path()).unwrap().len();
    assert!(size >= 4 << 20, "the configuration is {size} bytes");
    let get = |m: &MasterRun, path: &str| get_once(m.addr(), "t.example", path).status;
    assert_eq!(get(&m, "/route-2345/x"), 200, "{}", m.log());
    assert_eq!(get(&m, "/route-3000/x"), 404, "no such route");

    // Reload with one more route: every worker takes the new file.
    let builder = many_routes(&a, 3001);
    m.write_config(&builder);
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert_eq!(get(&m, "/route-3000/x"), 200);
    assert_eq!(get(&m, "/route-17/x"), 200);

    let old = m.pid().unwrap();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let new = m.pid().unwrap();
    m.track(new);
    assert_ne!(new, old);
    assert!(wait_gone(old, Duration::from_secs(10)), "the old master exits");
    m.wait_ready(common::master::READY_TIMEOUT).expect("the new generation is ready");
    assert_eq!(get(&m, "/route-2999/x"), 200);
    assert_eq!(get(&m, "/route-3001/x"), 404);
    assert!(alive(new));
}

fn small(a: &Backend) -> ConfigBuilder {
    ConfigBuilder::new().top("workers = 1").cluster("a", [a.spec()]).route(None, "/", "a")
}

#[test]
fn the_control_socket_refuses_another_uid_even_when_its_file_is_opened_to_everyone() {
    let a = Backend::start("A");
    let m = MasterRun::start(&small(&a));
    let mode = std::fs::metadata(m.control_socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is created 0600");
    // An operator's mistake: everything opened to everyone. The peer check
    // still refuses a user who is neither root nor the master's.
    for (p, mode) in [(m.dir(), 0o755), (m.config_path(), 0o644), (m.control_socket(), 0o666)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (uid, gid) = nobody();
    let cfg = m.config_path().display().to_string();
    let out = run_pitcher_as(uid, gid, &["-c", &cfg, "ctl", "status"], Duration::from_secs(20));
    assert!(!out.status.success(), "{out:?}");
    assert!(out.all().contains("permission denied"), "{out:?}");
    assert!(m.log().contains("control connection refused"), "{}", m.log());
    assert!(m.log().contains(&format!("peer_uid: {uid}")), "{}", m.log());
    // Root still gets its answer, and sees the refusal counted.
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["data"]["control_refused"]["peer_uid"], 1, "{v}");
}

#[test]
fn a_silent_or_trickling_control_client_does_not_stall_the_master() {
    let a = Backend::start("A");
    let m = MasterRun::start(&small(&a));
    // One client that connects and says nothing, one that sends a byte
    // every 100 ms and never ends its line.
    let silent = UnixStream::connect(m.control_socket()).unwrap();
    let mut trickle = UnixStream::connect(m.control_socket()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let mut t2 = trickle.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for _ in 0..150 {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) || t2.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // While both are connected, the master answers others.
    let out = run_pitcher(&["-c", &m.config_path().display().to_string(), "ctl", "status"], Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert_eq!(get_once(m.addr(), "t.example", "/").status, 200);
    // Each is answered with a timeout and closed, the trickler too.
    trickle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = trickle.read_to_string(&mut answer);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    assert!(answer.contains("timed out"), "{answer:?}");
    let mut silent_answer = String::new();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = (&silent).read_to_string(&mut silent_answer);
    assert!(silent_answer.contains("timed out"), "{silent_answer:?}");
    // Too large: refused without reading on forever.
    let mut big = UnixStream::connect(m.control_socket()).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = big.write_all(&vec![b' '; 200 * 1024]);
    let mut big_answer = String::new();
    let _ = big.read_to_string(&mut big_answer);
    assert!(big_answer.contains("larger than"), "{big_answer:?}");
    let st = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).expect("json");
    assert_eq!(v["data"]["control_refused"]["timed_out"], 2, "{v}");
    assert_eq!(v["data"]["control_refused"]["too_large"], 1, "{v}");
}

#[test]
fn a_second_master_of_the_same_pid_file_refuses_to_start() {
    let a = Backend::start("A");
    let m = MasterRun::start(&small(&a));
    let first = m.pid().unwrap();
    let cfg = m.config_path().display().to_string();
    // Same file, so the same pid file (and the same port: the pid file is
    // checked before anything is bound).
    let out = run_pitcher(&["-c", &cfg, "--foreground"], Duration::from_secs(20));
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains(&format!("another master (pid {first}) holds the pid file")), "{out:?}");
    assert_eq!(m.pid(), Some(first), "the pid file still names the first master");
    assert!(alive(first));
    assert_eq!(m.expect_status().master_pid, first);
}

#[test]
fn signal_never_reaches_a_process_that_is_not_a_pitcher_master() {
    let a = Backend::start("A");
    let m = MasterRun::prepare(&small(&a));
    // A stale pid file naming an unrelated process, and no control socket.
    let mut sleep = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
    std::fs::write(m.pid_file(), format!("{}\n", sleep.id())).unwrap();
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("not signalling"), "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(sleep.try_wait().unwrap().is_none(), "sleep was not signalled");
    // Even when something holds the file locked, a process that is not a
    // Pitcher master is not signalled.
    let held = std::fs::File::open(m.pid_file()).unwrap();
    let _lock = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
    let out = m.signal_cmd("stop");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("not a Pitcher master"), "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(sleep.try_wait().unwrap().is_none(), "sleep was not signalled");
    sleep.kill().unwrap();
    sleep.wait().unwrap();
}

#[test]
fn the_pid_file_lock_passes_to_the_new_master_of_an_upgrade() {
    let a = Backend::start("A");
    let mut m = MasterRun::start(&small(&a).top("drain_timeout_ms = 1000"));
    let old = m.pid().unwrap();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let new = m.pid().unwrap();
    m.track(new);
    assert!(wait_gone(old, Duration::from_secs(10)), "the old master exits");
    assert!(!m.oldbin().exists(), "the old master removed its .oldbin");
    // The new master holds the lock: a second master is refused, and with
    // the control socket gone, -s still finds it by its locked pid file.
    let cfg = m.config_path().display().to_string();
    let out = run_pitcher(&["-c", &cfg, "--foreground"], Duration::from_secs(20));
    assert!(out.stderr.contains(&format!("another master (pid {new})")), "{out:?}");
    std::fs::remove_file(m.control_socket()).unwrap();
    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains(&format!("master pid {new}")), "{out:?}");
    assert!(wait_gone(new, Duration::from_secs(10)), "the new master quits on the signal");
}

/// The real uid of a process (from `/proc/PID/status`).
fn uid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[test]
fn a_root_master_runs_its_workers_as_nobody_unless_told_root() {
    // These tests run as root (here and in CI): that is the case at hand.
    assert_eq!(uid_of(std::process::id()), Some(0), "the test suite runs as root");
    let (nobody_uid, _) = nobody();
    let a = Backend::start("A");
    let m = MasterRun::start(&small(&a).top("workers = 2"));
    for w in m.expect_status().worker_pids() {
        assert_eq!(uid_of(w), Some(nobody_uid), "worker {w} runs as nobody");
    }
    assert_eq!(uid_of(m.pid().unwrap()), Some(0), "the master stays root");
    assert!(m.log().contains("workers run as user nobody (default"), "{}", m.log());
    assert_eq!(get_once(m.addr(), "t.example", "/").status, 200);
    drop(m);

    let m = MasterRun::start(&small(&a).top("user = \"root\""));
    for w in m.expect_status().worker_pids() {
        assert_eq!(uid_of(w), Some(0), "worker {w} runs as root when told so");
    }
    assert!(m.log().contains("workers run as user root (configured)"), "{}", m.log());
}

/// A log directory the workers' user cannot write to (root's, 0755), with
/// the error log and an access log in it.
fn with_logs(a: &Backend) -> ConfigBuilder {
    small(a)
        .top("workers = 2")
        .top("drain_timeout_ms = 2000")
        .top("error_log = \"@DIR@/logs/error.log\"")
        .section("[modules.access_log]\npath = \"@DIR@/logs/access.log\"\nformat = \"json\"")
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().count()
}

#[test]
fn logs_rotate_under_workers_that_run_as_nobody_and_cannot_open_them() {
    let a = Backend::start("A");
    let builder = with_logs(&a);
    let mut m = start_with_log_dir(&builder);
    let (nobody_uid, _) = nobody();
    let workers = m.expect_status().worker_pids();
    assert!(workers.iter().all(|&w| uid_of(w) == Some(nobody_uid)), "workers run as nobody");
    let logs = m.dir().join("logs");
    let access = logs.join("access.log");
    for i in 0..5 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/before/{i}")).status, 200);
    }
    assert!(wait_until(Duration::from_secs(5), || lines(&access) == 5), "{}", m.log());

    // logrotate: move both files away, then -s reopen.
    std::fs::rename(&access, logs.join("access.log.1")).unwrap();
    std::fs::rename(logs.join("error.log"), logs.join("error.log.1")).unwrap();
    let out = m.signal_cmd("reopen");
    assert!(out.status.success(), "{out:?}");
    for i in 0..4 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/after/{i}")).status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(5), || lines(&access) == 4),
        "the new access log gets the new lines: {:?}\nerror log:\n{}",
        std::fs::read_to_string(&access),
        std::fs::read_to_string(logs.join("error.log")).unwrap_or_default()
    );
    let old = std::fs::read_to_string(logs.join("access.log.1")).unwrap();
    assert_eq!(old.lines().count(), 5, "{old}");
    assert!(!old.contains("/after/"));
    // The workers write the error log through the master's new file.
    let new_error_log = logs.join("error.log");
    for w in workers {
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{w}/fd")).unwrap().filter_map(Result::ok).collect();
        let targets: Vec<_> = fds.iter().filter_map(|f| std::fs::read_link(f.path()).ok()).collect();
        assert!(targets.contains(&new_error_log), "worker {w} holds the new error log: {targets:?}");
    }
    m.stop();
}

/// `MasterRun::start` with a root-owned `logs/` directory (0755) made in
/// the run's directory before the master starts.
fn start_with_log_dir(builder: &ConfigBuilder) -> MasterRun {
    MasterRun::start_prepared(builder, |dir| {
        let logs = dir.join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o755)).unwrap();
    })
}

#[test]
fn quit_and_upgrade_lose_no_access_log_line_of_a_completed_request() {
    let a = Backend::start("A");
    let mut m = start_with_log_dir(&with_logs(&a));
    let access = m.dir().join("logs/access.log");
    // Completed requests, then at once an upgrade: the old workers drain
    // and exit with lines still in their buffers.
    for i in 0..40 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/one/{i}")).status, 200);
    }
    let old = m.pid().unwrap();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().unwrap();
    m.track(new);
    assert!(wait_gone(old, Duration::from_secs(10)), "the old generation exits");
    assert!(
        wait_until(Duration::from_secs(3), || lines(&access) == 40),
        "every request of the old generation is logged: {} lines",
        lines(&access)
    );
    for i in 0..40 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/two/{i}")).status, 200);
    }
    let out = m.signal_cmd("quit");
    assert!(out.status.success(), "{out:?}");
    assert!(m.wait_family_gone(Duration::from_secs(10)), "{:?}", m.family());
    let text = std::fs::read_to_string(&access).unwrap();
    assert_eq!(text.lines().count(), 80, "no line lost at quit:\n{text}");
    for i in 0..40 {
        assert!(text.contains(&format!("\"/two/{i}\"")), "/two/{i} is logged");
    }
}

#[test]
fn access_log_lines_lost_to_a_full_disk_are_counted_and_shown_by_ctl() {
    let a = Backend::start("A");
    let m = MasterRun::start(&small(&a).section("[modules.access_log]\npath = \"/dev/full\"\nformat = \"json\""));
    for i in 0..7 {
        assert_eq!(get_once(m.addr(), "t.example", &format!("/lost/{i}")).status, 200);
    }
    let dropped = || {
        let out = m.command(&["ctl", "--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        v["data"]["access_log_dropped_lines"].as_u64()
    };
    assert!(wait_until(Duration::from_secs(5), || dropped() == Some(7)), "dropped: {:?}\n{}", dropped(), m.log());
    let out = m.command(&["ctl", "modules"]);
    assert!(out.stdout.contains("access log lines dropped: 7"), "{out:?}");
}
