//! The Debian package, installed on this machine: `tools/build-deb.sh`
//! builds it (from the binaries of this test build, with the version the
//! test chooses); `dpkg -i` installs it (files, conffiles, the `pitcher`
//! system user, init links); the service starts through the init script
//! and serves as that user; `dpkg -i` of a newer build while it is stopped
//! leaves it stopped, and while it serves under load upgrades it in place
//! (`pitcher -s upgrade` from postinst: new master pid, no failed
//! request); `dpkg --purge` removes everything it made.
//!
//! It changes the machine (`/usr/sbin/pitcher`, `/etc/pitcher`, a user),
//! so it runs only as root and only where no `pitcher` package, user or
//! pid file exists; a guard stops every process of the installed service
//! by pid and purges the package even when the test fails.
//!
//! Where `/usr/sbin/policy-rc.d` forbids services to start and stop (the
//! usual container setup, and this machine), `invoke-rc.d` in the
//! maintainer scripts does nothing, so the test starts and stops the
//! service itself, as the operator of such a machine would; elsewhere it
//! checks that postinst started it and prerm stopped it. Without systemd
//! (here) the test uses the init script, with it `systemctl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::master::{alive, processes_naming, wait_gone, Load, LoadSpec, Status};
use common::system::{ctl_status, is_root, run, run_args, stop_processes_naming, uid_of, wait_ctl_status, Ran};
use common::*;

const CONFIG: &str = "/etc/pitcher/pitcher.toml";
const DAEMON: &str = "/usr/sbin/pitcher";
const INIT: &str = "/etc/init.d/pitcher";
const PID_FILE: &str = "/run/pitcher.pid";
const SOCKET: &str = "/run/pitcher.sock";
const DPKG_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything the package installs or its scripts make, all gone after a purge.
const INSTALLED: &[&str] = &[
    "/usr/sbin/pitcher",
    "/usr/bin/pitcher-records",
    "/etc/pitcher/pitcher.toml",
    "/etc/pitcher/conf.d",
    "/etc/init.d/pitcher",
    "/etc/logrotate.d/pitcher",
    "/lib/systemd/system/pitcher.service",
    "/usr/share/man/man8/pitcher.8.gz",
    "/usr/share/doc/pitcher/copyright",
    "/var/log/pitcher",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Owns the machine's `pitcher` package for the test: refuses to start on
/// a machine that has one, and on drop stops the service's processes by
/// pid and purges the package, whatever happened.
struct Machine;

impl Machine {
    fn claim() -> Machine {
        assert!(is_root(), "this test installs a Debian package: run it as root (as CI does)");
        let q = run_args("dpkg-query", &["-W", "-f=${Status}", "pitcher"], DPKG_TIMEOUT);
        assert!(
            q.code != 0 || q.stdout.contains("not-installed"),
            "a pitcher package is already on this machine ({}); not touching it",
            q.stdout
        );
        assert!(!has_user("pitcher"), "a `pitcher` user already exists; not touching it");
        for p in [PID_FILE, SOCKET, "/etc/pitcher"] {
            assert!(!Path::new(p).exists(), "{p} exists: another Pitcher runs here; not touching it");
        }
        Machine
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- /var/log/pitcher/error.log ---\n{}", error_log());
        }
        stop_processes_naming(Path::new(CONFIG));
        let out = purge();
        if out.code != 0 {
            eprintln!("cleanup: dpkg --purge pitcher failed: {out:?}");
        }
    }
}

fn purge() -> Ran {
    dpkg(&["--purge", "pitcher"])
}

fn dpkg(args: &[&str]) -> Ran {
    run(Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive"), DPKG_TIMEOUT)
}

/// `dpkg -i`, keeping a conffile the test changed without asking.
fn install(deb: &Path) -> Ran {
    let deb = deb.display().to_string();
    dpkg(&["--force-confdef", "--force-confold", "-i", &deb])
}

fn has_user(name: &str) -> bool {
    run_args("getent", &["passwd", name], Duration::from_secs(10)).code == 0
}

fn has_group(name: &str) -> bool {
    run_args("getent", &["group", name], Duration::from_secs(10)).code == 0
}

/// True when policy-rc.d forbids the maintainer scripts' `invoke-rc.d
/// pitcher ACTION`.
fn policy_forbids(action: &str) -> bool {
    let helper = Path::new("/usr/sbin/policy-rc.d");
    helper.exists() && run_args("/usr/sbin/policy-rc.d", &["pitcher", action], Duration::from_secs(10)).code == 101
}

/// `tools/build-deb.sh` on this test build's binaries.
fn build_deb(out: &Path, version: &str) -> PathBuf {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pitcher")).parent().expect("bin dir").display().to_string();
    let r = run(
        Command::new(repo().join("tools/build-deb.sh")).args([
            "--bin-dir",
            &bin_dir,
            "--fast",
            "--version",
            version,
            "--out",
            &out.display().to_string(),
        ]),
        Duration::from_secs(180),
    );
    assert_eq!(r.code, 0, "build-deb.sh: {r:?}");
    let deb = PathBuf::from(r.stdout.lines().last().expect("the .deb path"));
    assert!(deb.exists(), "{r:?}");
    deb
}

/// The service's `start` or `stop` as the machine's init system does it:
/// `systemctl` where systemd runs (so that what the maintainer scripts'
/// `invoke-rc.d` does later applies to the same service), else the init
/// script.
fn service(action: &str) -> Ran {
    if Path::new("/run/systemd/system").exists() {
        return run_args("systemctl", &[action, "pitcher"], Duration::from_secs(60));
    }
    run(Command::new("sh").arg(INIT).arg(action).env("PITCHER_INIT_PLAIN", "1"), Duration::from_secs(60))
}

fn error_log() -> String {
    std::fs::read_to_string("/var/log/pitcher/error.log").unwrap_or_default()
}

fn status() -> Option<Status> {
    ctl_status(Path::new(DAEMON), Path::new(CONFIG))
}

fn master_pid() -> Option<u32> {
    std::fs::read_to_string(PID_FILE).ok()?.trim().parse().ok()
}

fn user_id(name: &str) -> u32 {
    let r = run_args("id", &["-u", name], Duration::from_secs(10));
    r.stdout.trim().parse().unwrap_or_else(|_| panic!("id -u {name}: {r:?}"))
}

#[test]
fn debian_package_installs_serves_upgrades_in_place_under_load_and_purges_cleanly() {
    let _machine = Machine::claim();
    let dir = common::pitcher::new_dir();

    // The package: its files, conffiles and version.
    let v1 = build_deb(dir.path(), "0.1.0-1");
    let listing = run_args("dpkg-deb", &["-c", &v1.display().to_string()], DPKG_TIMEOUT);
    for path in INSTALLED {
        assert!(listing.stdout.contains(&format!(".{path}")), "{path} in the package:\n{}", listing.stdout);
    }
    let ctrl = dir.path().join("control");
    assert_eq!(
        run_args("dpkg-deb", &["-e", &v1.display().to_string(), &ctrl.display().to_string()], DPKG_TIMEOUT).code,
        0
    );
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).expect("conffiles");
    for f in ["/etc/pitcher/pitcher.toml", "/etc/init.d/pitcher", "/etc/logrotate.d/pitcher"] {
        assert!(conffiles.lines().any(|l| l == f), "{f} is a conffile: {conffiles}");
    }
    let control = std::fs::read_to_string(ctrl.join("control")).expect("control");
    assert!(control.contains("Version: 0.1.0-1\n") && control.contains("Depends: libc6"), "{control}");

    // Install.
    let installed = install(&v1);
    assert_eq!(installed.code, 0, "dpkg -i: {installed:?}");
    for path in INSTALLED {
        assert!(Path::new(path).exists(), "{path} after dpkg -i");
    }
    assert!(has_user("pitcher") && has_group("pitcher"), "postinst made the user and group");
    let uid = user_id("pitcher");
    assert!(uid < 1000, "a system user (uid {uid})");
    let pw = run_args("getent", &["passwd", "pitcher"], Duration::from_secs(10)).stdout;
    assert!(pw.trim_end().ends_with("nologin"), "no login shell: {pw}");
    assert!(
        std::fs::read_dir("/etc/rc2.d")
            .expect("rc2.d")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("pitcher")),
        "update-rc.d made the start links"
    );
    let r = run_args(DAEMON, &["-t", "-c", CONFIG], Duration::from_secs(30));
    assert_eq!(r.code, 0, "the packaged configuration passes the test: {r:?}");
    let r = run_args(DAEMON, &["--version"], Duration::from_secs(10));
    assert!(r.stdout.starts_with("pitcher "), "{r:?}");
    let man = run(Command::new("sh").arg("-c").arg("zcat /usr/share/man/man8/pitcher.8.gz"), Duration::from_secs(10));
    for section in [".SH OPTIONS", ".SH SIGNALS", ".SH FILES", "SIGUSR2"] {
        assert!(man.stdout.contains(section), "pitcher.8 has {section}");
    }
    if policy_forbids("start") {
        assert!(installed.all().contains("policy-rc.d denied"), "{installed:?}");
        assert!(status().is_none(), "not started where policy-rc.d forbids it");
    } else if installed.all().contains("pitcher: not started") {
        // The example configuration's port (127.0.0.1:8080) is taken here.
        assert!(error_log().contains("in use"), "{installed:?}\n{}", error_log());
    } else {
        let st = wait_ctl_status(Path::new(DAEMON), Path::new(CONFIG), Duration::from_secs(15), Status::all_ready);
        assert!(st.is_some(), "postinst started the service: {installed:?}");
        let r = service("stop");
        assert_eq!(r.code, 0, "{r:?}");
    }

    // A newer package while the service is stopped: installed, not started.
    let v2 = build_deb(dir.path(), "0.1.0-2");
    let r = install(&v2);
    assert_eq!(r.code, 0, "dpkg -i (upgrade, stopped): {r:?}");
    assert!(!r.all().contains("upgrade complete"), "{r:?}");
    assert!(status().is_none() && master_pid().is_none(), "a stopped service stays stopped: {r:?}");

    // The test's configuration on a free port, started by the init script.
    let a = Backend::start("A");
    let mut port = free_port();
    let config = |port: u16| {
        ConfigBuilder::new()
            .top("workers = 2")
            .top(&format!("pid_file = \"{PID_FILE}\""))
            .top(&format!("control_socket = \"{SOCKET}\""))
            .top("error_log = \"/var/log/pitcher/error.log\"")
            .top("user = \"pitcher\"")
            .top("drain_timeout_ms = 3000")
            .cluster("a", [a.spec()])
            .route(None, "/", "a")
            .build(port)
    };
    let mut started = None;
    for _ in 0..3 {
        std::fs::write(CONFIG, config(port)).expect("write the configuration");
        let r = service("start");
        if r.code == 0 {
            started = Some(r);
            break;
        }
        let log = error_log();
        assert!(log.contains("in use") || log.contains("os error 98"), "service start: {r:?}\n{log}");
        port = free_port();
    }
    let r = started.expect("the init script started the service on a free port");
    let first = master_pid().unwrap_or_else(|| panic!("pid file after start: {r:?}"));
    let st = wait_ctl_status(Path::new(DAEMON), Path::new(CONFIG), Duration::from_secs(15), Status::all_ready)
        .unwrap_or_else(|| panic!("no ready master: {r:?}"));
    assert_eq!(st.master_pid, first);
    for w in st.worker_pids() {
        assert_eq!(uid_of(w), Some(uid), "worker {w} runs as the pitcher user");
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let resp = get_once(addr, "deb.example", "/");
    assert_eq!((resp.status, resp.body_str().as_str()), (200, "ok from A"), "{}", resp.head_str());

    // A newer package under load: postinst upgrades the running master.
    let v3 = build_deb(dir.path(), "0.1.0-3");
    let load = Load::start(LoadSpec {
        addr,
        host: "deb.example".into(),
        path: "/".into(),
        keepalive: 2,
        per_request: 2,
        interval: Duration::from_millis(5),
        bodies: vec![b"ok from A".to_vec()],
    });
    assert!(load.wait_progress(40, Duration::from_secs(10)), "load runs before the upgrade");
    let t0 = Instant::now();
    let r = install(&v3);
    assert_eq!(r.code, 0, "dpkg -i (upgrade, running): {r:?}");
    assert!(r.all().contains("upgrade complete: new master pid"), "postinst ran pitcher -s upgrade: {r:?}");
    let second = master_pid().expect("pid file after the upgrade");
    assert_ne!(second, first, "a new master");
    assert!(wait_gone(first, Duration::from_secs(15)), "the old master exits after handing over");
    let st = wait_ctl_status(Path::new(DAEMON), Path::new(CONFIG), Duration::from_secs(15), Status::all_ready)
        .expect("the new master is ready");
    assert_eq!(st.master_pid, second);
    let exe = std::fs::read_link(format!("/proc/{second}/exe")).expect("exe of the new master");
    assert_eq!(exe, Path::new(DAEMON), "the new master runs the newly installed file");
    assert!(load.wait_progress(40, Duration::from_secs(10)), "served after the upgrade");
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "no failed request across the package upgrade ({:?}): {}\n{:?}",
        t0.elapsed(),
        report.summary(),
        report.failures
    );
    let q = run_args("dpkg-query", &["-W", "-f=${Version}", "pitcher"], DPKG_TIMEOUT);
    assert_eq!(q.stdout, "0.1.0-3");
    assert_eq!(std::fs::read_to_string(CONFIG).expect("config"), config(port), "the changed conffile was kept");

    // Purge: prerm stops the service (or, where policy-rc.d forbids it,
    // the operator does first), postrm removes what postinst made.
    if policy_forbids("stop") {
        let r = service("stop");
        assert_eq!(r.code, 0, "{r:?}");
    }
    let r = purge();
    assert_eq!(r.code, 0, "dpkg --purge: {r:?}");
    assert!(wait_gone(second, Duration::from_secs(10)), "the service is stopped");
    assert!(processes_naming(CONFIG).is_empty(), "{:?}", processes_naming(CONFIG));
    for path in INSTALLED.iter().chain(&["/etc/pitcher", PID_FILE, SOCKET]) {
        assert!(!Path::new(path).exists(), "{path} after dpkg --purge");
    }
    assert!(!has_user("pitcher") && !has_group("pitcher"), "the user and group are removed");
    for d in [
        "/etc/rc0.d",
        "/etc/rc2.d",
        "/etc/systemd/system/multi-user.target.wants",
        "/var/lib/systemd/deb-systemd-helper-enabled",
    ] {
        let left: Vec<String> = std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("pitcher"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{d} still has {left:?}");
    }
    let q = run_args("dpkg-query", &["-W", "-f=${Status}", "pitcher"], DPKG_TIMEOUT);
    assert!(q.code != 0 || q.stdout.contains("not-installed"), "{q:?}");
    assert!(!alive(first) && !alive(second));
}
