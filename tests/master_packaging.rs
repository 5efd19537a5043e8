//! The operations files in `packaging/`, run against a temporary
//! configuration: the LSB init script's actions (start in daemon mode,
//! status, reload and upgrade that test the configuration first and refuse
//! an invalid one, restart, stop with its fallback to SIGTERM), the systemd
//! unit's commands in the order systemd runs them, and the logrotate
//! file's postrotate command.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::master::{alive, parent_of, read_pid, request_in_thread, wait_gone, MasterRun};
use common::*;

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(file)
}

fn config(a: &Backend, b: &Backend, to: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .top("workers = 2")
        .top("drain_timeout_ms = 1000")
        .top("error_log = \"@DIR@/error.log\"")
        .cluster("a", [a.spec()])
        .cluster("b", [b.spec()])
        .route(None, "/", to)
}

/// Output of one run of the init script.
#[derive(Debug)]
struct Init {
    code: i32,
    out: String,
}

/// `sh packaging/pitcher.init ACTION` with DAEMON and CONFIG pointing at
/// the run, and `extra` environment.
fn init(m: &MasterRun, action: &str, extra: &[(&str, &str)]) -> Init {
    let mut cmd = Command::new("sh");
    cmd.arg(packaging("pitcher.init"))
        .arg(action)
        .env("DAEMON", m.exe())
        .env("CONFIG", m.config_path())
        .env("DEFAULTS", m.dir().join("no-defaults"))
        .stdin(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run the init script");
    let pid = child.id();
    // Bounded: a stuck script is killed by pid.
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let t0 = Instant::now();
    while !waiter.is_finished() {
        if t0.elapsed() > Duration::from_secs(60) {
            common::pitcher::send_signal(pid, "KILL");
            panic!("init script {action} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = waiter.join().expect("thread").expect("wait");
    Init {
        code: out.status.code().unwrap_or(-1),
        out: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    }
}

fn body(m: &MasterRun) -> String {
    let r = get_once(m.addr(), "t.example", "/");
    assert_eq!(r.status, 200, "{}", r.head_str());
    r.body_str()
}

fn count(m: &MasterRun, what: &str) -> usize {
    std::fs::read_to_string(m.dir().join("error.log")).unwrap_or_default().matches(what).count()
}

#[test]
fn init_script_and_debian_maintainer_script_are_posix_sh() {
    for f in ["pitcher.init", "debian/postinst", "debian/prerm", "debian/postrm"] {
        let out = Command::new("sh").arg("-n").arg(packaging(f)).output().expect("sh -n");
        assert!(out.status.success(), "{f}: {out:?}");
    }
    let text = std::fs::read_to_string(packaging("pitcher.init")).unwrap();
    assert!(text.starts_with("#!/bin/sh\n### BEGIN INIT INFO\n"), "LSB header");
    assert!(text.contains("### END INIT INFO"));
}

#[test]
fn init_script_actions_against_a_temporary_configuration() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::prepare(&config(&a, &b, "a"));

    let r = init(&m, "configtest", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.contains("configuration ok"), "{r:?}");
    let r = init(&m, "status", &[]);
    assert_eq!(r.code, 3, "status before start: {r:?}");

    // start: daemon mode, returns once the pid file names a live master.
    let r = init(&m, "start", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let first = m.pid().expect("pid file after start");
    assert!(alive(first));
    m.track(first);
    let st = m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}\n{r:?}"));
    assert_eq!(st.master_pid, first);
    assert_ne!(parent_of(first), Some(std::process::id()), "detached");
    assert_eq!(body(&m), "ok from A");

    let r = init(&m, "start", &[]);
    assert_eq!(r.code, 0, "start when running: {r:?}");
    assert!(r.out.contains("already running"), "{r:?}");
    assert_eq!(m.pid(), Some(first));
    let r = init(&m, "status", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.contains(&format!("running (pid {first})")), "{r:?}");

    // reload: valid file.
    m.write_config(&config(&a, &b, "b"));
    let r = init(&m, "reload", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.contains("configuration reloaded by 2 workers"), "{r:?}");
    assert_eq!(body(&m), "ok from B");

    // reload and upgrade of an invalid file: refused before the master is
    // asked, which keeps serving the running configuration.
    let good = m.config_text(m.builder());
    m.write_config_text(&good.replace("cluster = \"b\"", "cluster = \"missing\""));
    let reloads = count(&m, "cmd: reload");
    let r = init(&m, "reload", &[]);
    assert_eq!(r.code, 6, "reload of an invalid file: {r:?}");
    assert!(r.out.contains("not defined"), "the test's error is shown: {r:?}");
    let r = init(&m, "upgrade", &[]);
    assert_eq!(r.code, 6, "upgrade with an invalid file: {r:?}");
    let r = init(&m, "restart", &[]);
    assert_eq!(r.code, 6, "restart with an invalid file: {r:?}");
    assert_eq!(count(&m, "cmd: reload"), reloads, "the master was not asked");
    assert_eq!(count(&m, "cmd: upgrade"), 0, "the master was not asked");
    assert_eq!(m.pid(), Some(first), "the master is the same");
    assert_eq!(body(&m), "ok from B");
    m.write_config_text(&good);

    // upgrade: a new binary at DAEMON's path.
    m.install_binary();
    let r = init(&m, "upgrade", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.contains("upgrade complete: new master pid"), "{r:?}");
    let second = m.pid().expect("pid file after upgrade");
    m.track(second);
    assert_ne!(second, first);
    assert!(wait_gone(first, Duration::from_secs(5)), "old master exits");
    let r = init(&m, "status", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.contains(&format!("(pid {second})")), "{r:?}");
    assert_eq!(body(&m), "ok from B");

    // reopen (for logrotate).
    let r = init(&m, "reopen", &[]);
    assert_eq!(r.code, 0, "{r:?}");

    // restart: a new master.
    let r = init(&m, "restart", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let third = m.pid().expect("pid file after restart");
    m.track(third);
    assert!(third != second && !alive(second), "restart replaced master {second} by {third}");
    m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body(&m), "ok from B");

    // stop: graceful, everything gone, pid file and socket removed.
    let r = init(&m, "stop", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(m.wait_family_gone(Duration::from_secs(3)), "{:?}", m.family());
    assert!(!m.pid_file().exists() && !m.control_socket().exists());
    let r = init(&m, "status", &[]);
    assert_eq!(r.code, 3, "{r:?}");
    let r = init(&m, "stop", &[]);
    assert_eq!(r.code, 0, "stop when stopped: {r:?}");
    let r = init(&m, "reload", &[]);
    assert_eq!(r.code, 7, "reload when stopped: {r:?}");

    // A pid file left by a dead master.
    std::fs::write(m.pid_file(), format!("{third}\n")).unwrap();
    let r = init(&m, "status", &[]);
    assert_eq!(r.code, 1, "dead with a pid file: {r:?}");
    // start replaces the stale pid file.
    let r = init(&m, "start", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let fourth = m.pid().expect("pid file");
    m.track(fourth);
    assert_ne!(fourth, third);
    m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let r = init(&m, "stop", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(m.wait_family_gone(Duration::from_secs(3)), "{:?}", m.family());

    let r = init(&m, "bogus", &[]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn init_script_stop_falls_back_to_sigterm_after_stop_timeout() {
    let a = Backend::with_handler("A", |r| {
        if r.path() == "/slow" {
            Reply::ok("slow").delayed(Duration::from_secs(10))
        } else {
            default_reply("A")
        }
    });
    let b = Backend::start("B");
    let mut m = MasterRun::prepare(&config(&a, &b, "a").top("drain_timeout_ms = 20000"));
    let r = init(&m, "start", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    m.track(m.pid().expect("pid file"));
    m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));

    // A request that would keep a graceful stop waiting for 10 s.
    let _slow = request_in_thread(m.addr(), "t.example", "/slow");
    assert!(a.wait_for_requests(1, Duration::from_secs(5)));
    let t0 = Instant::now();
    let r = init(&m, "stop", &[("STOP_TIMEOUT", "1")]);
    let took = t0.elapsed();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(m.wait_family_gone(Duration::from_secs(3)), "{:?}", m.family());
    assert!(took < Duration::from_secs(6), "stop took {took:?} with STOP_TIMEOUT=1");
    assert!(
        std::fs::read_to_string(m.dir().join("error.log")).unwrap_or_default().contains("stopping"),
        "the master got SIGTERM after the graceful stop timed out"
    );
    assert!(!m.pid_file().exists());
}

#[test]
fn init_script_settings_come_from_the_defaults_file_and_the_environment_wins() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let m = MasterRun::prepare(&config(&a, &b, "a"));
    let defaults = m.dir().join("default-pitcher");
    std::fs::write(&defaults, format!("DAEMON={}\nCONFIG={}\n", m.exe().display(), m.config_path().display())).unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("sh");
        cmd.arg(packaging("pitcher.init")).arg("configtest").env("DEFAULTS", &defaults).env_remove("DAEMON");
        cmd.env_remove("CONFIG").env_remove("PIDFILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).output().expect("run the init script")
    };
    let out = run(&[]);
    assert!(out.status.success(), "settings from the defaults file: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&m.config_path().display().to_string()));
    let out = run(&[("CONFIG", "/nonexistent/pitcher.toml")]);
    assert!(!out.status.success(), "the environment wins over the defaults file: {out:?}");

    // PIDFILE defaults to the configuration's pid_file.
    let status = Command::new("sh")
        .arg(packaging("pitcher.init"))
        .arg("status")
        .env("DEFAULTS", &defaults)
        .env_remove("PIDFILE")
        .output()
        .unwrap();
    std::fs::write(m.pid_file(), "999999\n").unwrap();
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    let status = Command::new("sh")
        .arg(packaging("pitcher.init"))
        .arg("status")
        .env("DEFAULTS", &defaults)
        .env_remove("PIDFILE")
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1), "reads {}: {status:?}", m.pid_file().display());
    assert_eq!(read_pid(m.pid_file()), Some(999_999));
}

/// The value of every `Key=` line of a systemd unit, in order.
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string).collect()
}

#[test]
fn systemd_unit_commands_start_reload_and_stop_the_master_as_systemd_would() {
    let unit = std::fs::read_to_string(packaging("pitcher.service")).expect("pitcher.service");
    assert_eq!(unit_values(&unit, "Type"), ["forking"]);
    assert_eq!(unit_values(&unit, "KillSignal"), ["SIGQUIT"]);
    assert_eq!(unit_values(&unit, "KillMode"), ["mixed"]);
    assert_eq!(unit_values(&unit, "TimeoutStopSec").len(), 1);
    // The unit's pid file is the default configuration's.
    let conf = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/pitcher.toml")).unwrap();
    let pid_file = unit_values(&unit, "PIDFile").pop().expect("PIDFile=");
    assert!(conf.contains(&format!("pid_file = \"{pid_file}\"")), "PIDFile={pid_file} matches conf/pitcher.toml");

    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::prepare(&config(&a, &b, "a"));
    // The unit with its paths pointing at this run.
    let local = unit
        .replace("/usr/sbin/pitcher", &m.exe().display().to_string())
        .replace("/etc/pitcher/pitcher.toml", &m.config_path().display().to_string())
        .replace(&pid_file, &m.pid_file().display().to_string());
    let unit_path = m.dir().join("pitcher.service");
    std::fs::write(&unit_path, &local).unwrap();
    if let Ok(out) = Command::new("systemd-analyze").arg("verify").arg(&unit_path).output() {
        assert!(out.status.success(), "systemd-analyze verify: {out:?}");
    }
    let run = |line: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new(words[0]).args(&words[1..]).stdin(Stdio::null()).output().expect("run");
        assert!(out.status.success(), "{line}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for l in unit_values(&local, "ExecStartPre").iter().chain(&unit_values(&local, "ExecStart")) {
        run(l);
    }
    let main = m.wait_ready(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}")).master_pid;
    assert_eq!(read_pid(m.pid_file()), Some(main), "PIDFile= names the main process");
    assert_eq!(body(&m), "ok from A");

    m.write_config(&config(&a, &b, "b"));
    let reload = unit_values(&local, "ExecReload");
    assert_eq!(reload.len(), 2, "test, then reload");
    assert!(reload[0].contains(" -t "), "{reload:?}");
    let out: String = reload.iter().map(|l| run(l)).collect();
    assert!(out.contains("configuration reloaded by 2 workers"), "{out}");
    assert_eq!(body(&m), "ok from B");

    // An invalid file fails the first ExecReload command: reload stops there.
    let good = m.config_text(m.builder());
    m.write_config_text(&format!("workers = \"many\"\n{good}"));
    let words: Vec<&str> = reload[0].split_whitespace().collect();
    let out = Command::new(words[0]).args(&words[1..]).output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    m.write_config_text(&good);

    // Upgrade the way the unit's comments say, then stop with KillSignal
    // to the main PID as systemd would (KillMode=mixed).
    m.install_binary();
    common::pitcher::send_signal(main, "USR2");
    let st = m
        .wait_status(Duration::from_secs(10), |s| s.master_pid != main && s.all_ready())
        .unwrap_or_else(|| panic!("no new master; {:?}", m.status()));
    m.track(st.master_pid);
    assert!(wait_gone(main, Duration::from_secs(5)), "the old main PID exits");
    let new_main = read_pid(m.pid_file()).expect("PIDFile= after the upgrade");
    assert_eq!(new_main, st.master_pid, "PIDFile= names the new main process when the old one exits");
    common::pitcher::send_signal(new_main, "QUIT");
    assert!(m.wait_family_gone(Duration::from_secs(5)), "{:?}", m.family());
}

#[test]
fn logrotate_postrotate_command_reopens_the_log() {
    let text = std::fs::read_to_string(packaging("pitcher.logrotate")).expect("pitcher.logrotate");
    let cmd = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("/usr/sbin/pitcher"))
        .expect("a pitcher command in postrotate")
        .to_string();
    assert!(cmd.contains("-s reopen"), "{cmd}");

    let a = Backend::start("A");
    let b = Backend::start("B");
    let mut m = MasterRun::start(&config(&a, &b, "a"));
    let log = m.dir().join("error.log");
    std::fs::rename(&log, m.dir().join("error.log.1")).unwrap();
    let local = cmd
        .replace("/usr/sbin/pitcher", &m.exe().display().to_string())
        .replace("/etc/pitcher/pitcher.toml", &m.config_path().display().to_string());
    let out = Command::new("sh").arg("-c").arg(&local).output().unwrap();
    assert!(out.status.success(), "{local}: {out:?}");
    assert!(common::wait_until(Duration::from_secs(2), || log.exists()), "a new error.log after {local}");
    m.stop();
}
