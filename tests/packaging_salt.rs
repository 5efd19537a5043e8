//! The Salt formula `packaging/salt/pitcher`, applied by the real Salt
//! (`salt-call --local`, masterless, from PyPI: `.ci/run` installs it) to
//! a node whose every path is under a temporary directory: the binary is
//! a copy of this test build's `pitcher`, the service runs through the
//! formula's init script. One apply starts a Pitcher that serves; applying
//! again with the same pillar changes nothing; a changed pillar reloads it
//! (same master); a changed binary upgrades it in place under load (new
//! master, no failed request); a pillar whose configuration fails
//! `pitcher -t` fails the state and leaves the file and the running
//! master as they were.
//!
//! Salt's own files (cache, logs, keys) go under the temporary directory
//! too (`root_dir`); every process of the node is stopped by pid at the
//! end, also when the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::master::{copy_executable, wait_gone, Load, LoadSpec, Status};
use common::system::{ctl_status, run, run_args, stop_processes_naming, wait_ctl_status, Ran};
use common::*;

const SALT_TIMEOUT: Duration = Duration::from_secs(180);

/// Where Salt would write without `root_dir`: the test must leave them as
/// it found them.
const SALT_SYSTEM_DIRS: &[&str] = &["/etc/salt", "/var/cache/salt", "/var/log/salt", "/var/run/salt"];

/// A node under a temporary directory and the Salt configuration that
/// manages it. Dropping it stops every process of the node by pid.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = common::pitcher::new_dir();
        let d = dir.path();
        for sub in ["salt", "pillar", "builds"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
        }
        let formula = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/salt");
        let minion = json!({
            "id": "pitcher-test-node",
            "root_dir": d.join("salt-root"),
            "file_client": "local",
            "file_roots": {"base": [formula]},
            "pillar_roots": {"base": [d.join("pillar")]},
        });
        // JSON is YAML.
        std::fs::write(d.join("salt/minion"), minion.to_string()).expect("write minion");
        std::fs::write(d.join("pillar/top.sls"), "base:\n  '*':\n    - pitcher\n").expect("write top.sls");
        Node { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn binary(&self) -> PathBuf {
        self.path("node/sbin/pitcher")
    }

    fn config(&self) -> PathBuf {
        self.path("node/etc/pitcher.toml")
    }

    fn pillar_paths(&self) -> Value {
        json!({
            "binary": self.binary(),
            "config": self.config(),
            "init_script": self.path("node/init.d/pitcher"),
            "pid_file": self.path("node/run/pitcher.pid"),
            "control_socket": self.path("node/run/pitcher.sock"),
            "log_dir": self.path("node/log"),
        })
    }

    /// Writes pillar `pitcher` with this binary and configuration.
    fn set_pillar(&self, binary: &Path, config: Value) {
        let pillar =
            json!({"pitcher": {"install": {"binary": binary}, "paths": self.pillar_paths(), "config": config}});
        std::fs::write(self.path("pillar/pitcher.sls"), pillar.to_string()).expect("write pillar");
    }

    /// `salt-call --local state.apply pitcher`: the exit status and each
    /// state's result by its ID.
    fn apply(&self) -> Applied {
        let conf = self.path("salt");
        let ran = run(
            Command::new("salt-call")
                .arg("--local")
                .arg("--config-dir")
                .arg(&conf)
                .args(["--retcode-passthrough", "--out", "json", "--log-level", "warning", "state.apply", "pitcher"])
                .current_dir(self.dir.path()),
            SALT_TIMEOUT,
        );
        let states = serde_json::from_str::<Value>(&ran.stdout)
            .ok()
            .and_then(|v| v.get("local").cloned())
            .unwrap_or_else(|| panic!("salt-call output is not a state result: {ran:?}"));
        Applied { ran, states }
    }

    fn status(&self) -> Option<Status> {
        ctl_status(&self.binary(), &self.config())
    }

    fn wait_ready(&self, f: impl Fn(&Status) -> bool) -> Status {
        wait_ctl_status(&self.binary(), &self.config(), Duration::from_secs(15), |s| s.all_ready() && f(s))
            .unwrap_or_else(|| panic!("no ready master; {:?}\n{}", self.status(), self.error_log()))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.path("node/log/error.log")).unwrap_or_default()
    }

    /// The formula's init script, as the formula runs it.
    fn init(&self, action: &str) -> Ran {
        run(
            Command::new("sh")
                .arg(self.path("node/init.d/pitcher"))
                .arg(action)
                .env("DAEMON", self.binary())
                .env("CONFIG", self.config())
                .env("PITCHER_INIT_PLAIN", "1"),
            Duration::from_secs(60),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node error log ---\n{}", self.error_log());
        }
        stop_processes_naming(&self.config());
    }
}

/// The outcome of one `state.apply`.
struct Applied {
    ran: Ran,
    /// `{"<module>_|-<id>_|-<name>_|-<function>": {"result": ..., "changes": ...}}`
    states: Value,
}

impl Applied {
    /// The result of the state with this ID.
    fn state(&self, id: &str) -> &Value {
        let obj = self.states.as_object().unwrap_or_else(|| panic!("no states: {:?}", self.ran));
        let tag = format!("_|-{id}_|-");
        obj.iter()
            .find(|(k, _)| k.contains(&tag))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no state {id}: {:?}", self.ran))
    }

    fn changed(&self, id: &str) -> bool {
        self.state(id)["changes"].as_object().is_some_and(|c| !c.is_empty())
    }

    fn succeeded(&self, id: &str) -> bool {
        self.state(id)["result"] == Value::Bool(true)
    }

    fn all(&self) -> String {
        format!("{}\n{}", serde_json::to_string_pretty(&self.states).unwrap_or_default(), self.ran.stderr)
    }
}

/// A configuration pillar: one listener, clusters `a` and `b`, `/` to `to`.
fn config(port: u16, a: &Backend, b: &Backend, to: &str) -> Value {
    json!({
        "workers": 2,
        "drain_timeout_ms": 3000,
        "listeners": [{"address": format!("127.0.0.1:{port}")}],
        "clusters": [{"name": "a", "backends": [a.spec()]}, {"name": "b", "backends": [b.spec()]}],
        "routes": [{"path_prefix": "/", "cluster": to}],
        "timeouts": {"upstream_read_ms": 5000},
    })
}

fn body(addr: std::net::SocketAddr) -> String {
    let r = get_once(addr, "salt.example", "/");
    assert_eq!(r.status, 200, "{}", r.head_str());
    r.body_str()
}

#[test]
fn salt_formula_starts_reloads_upgrades_in_place_and_refuses_an_invalid_configuration() {
    let salt = run_args("salt-call", &["--version"], Duration::from_secs(60));
    assert_eq!(salt.code, 0, "salt-call is needed (.ci/run installs it from PyPI): {salt:?}");
    let salt_dirs_before: Vec<bool> = SALT_SYSTEM_DIRS.iter().map(|d| Path::new(d).exists()).collect();

    let node = Node::new();
    let a = Backend::start("A");
    let b = Backend::start("B");
    let v1 = node.path("builds/pitcher-1");
    copy_executable(Path::new(env!("CARGO_BIN_EXE_pitcher")), &v1);

    // First apply: installs, renders, tests, starts; then the first request.
    let mut port = free_port();
    let mut first_served = None;
    for _ in 0..3 {
        node.set_pillar(&v1, config(port, &a, &b, "a"));
        let t0 = Instant::now();
        let applied = node.apply();
        let returned = t0.elapsed();
        if applied.ran.code == 0 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            assert!(
                wait_until(Duration::from_secs(10), || Client::try_connect(addr).is_ok()),
                "listening after the apply: {}",
                applied.all()
            );
            assert_eq!(body(addr), "ok from A");
            first_served = Some((applied, returned, t0.elapsed()));
            break;
        }
        // The port picked was taken meanwhile: the start failed; try another.
        assert!(
            applied.all().contains("in use") || node.error_log().contains("in use"),
            "state.apply failed: {}\n{}",
            applied.all(),
            node.error_log()
        );
        port = free_port();
    }
    let (applied, returned, took) = first_served.expect("state.apply started a Pitcher on a free port");
    // Reported in docs/BENCHMARKS.md (not asserted: timings depend on the machine).
    let mut durations: Vec<(String, f64)> = applied
        .states
        .as_object()
        .map(|o| {
            o.values()
                .map(|v| (v["__id__"].as_str().unwrap_or("?").to_string(), v["duration"].as_f64().unwrap_or(0.0)))
                .collect()
        })
        .unwrap_or_default();
    durations.sort_by(|x, y| y.1.total_cmp(&x.1));
    eprintln!(
        "state.apply to the first served request: {:.2} s (salt-call returned after {:.2} s; states, ms: {durations:?})",
        took.as_secs_f64(),
        returned.as_secs_f64()
    );
    assert!(
        applied.changed("pitcher-binary") && applied.changed("pitcher-config") && applied.changed("pitcher-running")
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let first = node.wait_ready(|_| true);
    assert_eq!(std::fs::read_link(format!("/proc/{}/exe", first.master_pid)).expect("exe"), node.binary());
    let rendered = std::fs::read_to_string(node.config()).expect("rendered configuration");
    assert!(rendered.contains("[[routes]]") && rendered.contains("[timeouts]"), "{rendered}");

    // Same pillar: nothing changes, nothing is reloaded or restarted.
    let applied = node.apply();
    assert_eq!(applied.ran.code, 0, "{}", applied.all());
    for id in ["pitcher-binary", "pitcher-config", "pitcher-reload", "pitcher-upgrade", "pitcher-running"] {
        assert!(applied.succeeded(id) && !applied.changed(id), "{id} unchanged: {}", applied.all());
    }
    let st = node.wait_ready(|_| true);
    assert_eq!((st.master_pid, st.config_seq), (first.master_pid, first.config_seq), "not touched");

    // Changed pillar: a reload by the same master.
    node.set_pillar(&v1, config(port, &a, &b, "b"));
    let applied = node.apply();
    assert_eq!(applied.ran.code, 0, "{}", applied.all());
    assert!(applied.changed("pitcher-config") && applied.changed("pitcher-reload"), "{}", applied.all());
    assert!(!applied.changed("pitcher-upgrade") && !applied.changed("pitcher-running"), "{}", applied.all());
    let st = node.wait_ready(|s| s.config_seq > first.config_seq);
    assert_eq!(st.master_pid, first.master_pid, "reloaded in place, same master");
    assert_eq!(body(addr), "ok from B");

    // Changed binary (another build: the same code with bytes appended,
    // which the ELF loader ignores) under load: an in-place upgrade.
    let v2 = node.path("builds/pitcher-2");
    copy_executable(&v1, &v2);
    let appended = run_args(
        "sh",
        &["-c", "printf 'pitcher test build 2' >> \"$0\"", &v2.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(appended.code, 0, "{appended:?}");
    node.set_pillar(&v2, config(port, &a, &b, "b"));
    let load = Load::start(LoadSpec {
        addr,
        host: "salt.example".into(),
        path: "/".into(),
        keepalive: 2,
        per_request: 2,
        interval: Duration::from_millis(5),
        bodies: vec![b"ok from B".to_vec()],
    });
    assert!(load.wait_progress(40, Duration::from_secs(10)), "load runs before the upgrade");
    let applied = node.apply();
    assert_eq!(applied.ran.code, 0, "{}", applied.all());
    assert!(applied.changed("pitcher-binary") && applied.changed("pitcher-upgrade"), "{}", applied.all());
    assert!(!applied.changed("pitcher-running"), "not started again: {}", applied.all());
    let upgraded = node.wait_ready(|s| s.master_pid != first.master_pid);
    assert!(wait_gone(first.master_pid, Duration::from_secs(15)), "the old master exits after handing over");
    assert_eq!(std::fs::read_link(format!("/proc/{}/exe", upgraded.master_pid)).expect("exe"), node.binary());
    assert!(load.wait_progress(40, Duration::from_secs(10)), "served after the upgrade");
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "no failed request across the upgrade: {}\n{:?}",
        report.summary(),
        report.failures
    );

    // Invalid configuration: the state fails, the file and the master stay.
    let before = std::fs::read_to_string(node.config()).expect("configuration");
    node.set_pillar(&v2, config(port, &a, &b, "missing"));
    let applied = node.apply();
    assert_ne!(applied.ran.code, 0, "an invalid configuration fails state.apply: {}", applied.all());
    assert!(!applied.succeeded("pitcher-config"), "{}", applied.all());
    assert!(applied.state("pitcher-config")["comment"].to_string().contains("check_cmd"), "{}", applied.all());
    assert!(!applied.succeeded("pitcher-reload") && !applied.changed("pitcher-reload"), "{}", applied.all());
    assert_eq!(
        std::fs::read_to_string(node.config()).expect("configuration"),
        before,
        "the file in place is unchanged"
    );
    let st = node.wait_ready(|_| true);
    assert_eq!(
        (st.master_pid, st.config_seq),
        (upgraded.master_pid, upgraded.config_seq),
        "the running master is untouched"
    );
    assert_eq!(body(addr), "ok from B");

    // Stop (by the init script the formula installed), then nothing is left.
    let r = node.init("stop");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(wait_gone(upgraded.master_pid, Duration::from_secs(10)));
    assert!(stop_processes_naming(&node.config()).is_empty(), "every process of the node stopped");
    let salt_dirs_after: Vec<bool> = SALT_SYSTEM_DIRS.iter().map(|d| Path::new(d).exists()).collect();
    assert_eq!(salt_dirs_after, salt_dirs_before, "Salt wrote only under the test's directory: {SALT_SYSTEM_DIRS:?}");
}

#[test]
fn pillar_example_renders_a_configuration_that_passes_the_test() {
    let node = Node::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/salt/pillar.example");
    std::fs::copy(&example, node.path("pillar/pitcher.sls")).expect("copy pillar.example");
    let out = node.path("rendered.toml");
    let ran = run(
        Command::new("salt-call")
            .arg("--local")
            .arg("--config-dir")
            .arg(node.path("salt"))
            .args([
                "--retcode-passthrough",
                "--out",
                "json",
                "cp.get_template",
                "salt://pitcher/files/pitcher.toml.jinja",
            ])
            .arg(&out)
            .current_dir(node.path("")),
        SALT_TIMEOUT,
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}: {ran:?}"));
    let r = run_pitcher(&["-t", "-c", &out.display().to_string()], Duration::from_secs(30));
    assert!(r.status.success(), "pitcher -t on pillar.example's configuration: {r:?}\n{text}");
    for want in
        ["pid_file = \"/run/pitcher.pid\"", "error_log = \"/var/log/pitcher/error.log\"", "[[listeners]]", "[admin]"]
    {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

#[test]
fn scale_out_script_applies_the_formula_to_every_host_with_salt_ssh() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/scale-out.sh");
    let r = run(
        Command::new(&script).args(["--dry-run", "--pillar-root", "/srv/entry", "n1", "10.0.0.7"]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let formula = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/salt");
    for want in [
        format!("file_roots: {{base: [\"{}\"]}}", formula.display()),
        "pillar_roots: {base: [\"/srv/entry\"]}".to_string(),
        "n1:\n  host: n1\n  user: root\n".to_string(),
        "10.0.0.7:\n  host: 10.0.0.7\n".to_string(),
        "salt-ssh ".to_string(),
        "state.apply pitcher".to_string(),
    ] {
        assert!(r.stdout.contains(&want), "{want:?} in\n{}", r.stdout);
    }
    let r = run(&mut Command::new(&script), Duration::from_secs(30));
    assert_eq!(r.code, 2, "no host: usage; {r:?}");
}
