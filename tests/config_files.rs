//! Configuration files for a whole business: `include = ["conf.d/*.toml"]`
//! with clusters and routes in included files (served, reloaded, errors at
//! their file and line), `${VAR}` from the environment of the process, and
//! durations and sizes written with units.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::master::MasterRun;
use common::pitcher::PITCHER;
use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::fs::write(path, text).expect("write config file");
}

/// An included file: one cluster and a route to it for `host`.
fn service(cluster: &str, host: &str, backend: &Backend) -> String {
    format!(
        "# service {cluster}\n[[clusters]]\nname = \"{cluster}\"\nbackends = [\"{}\"]\nretry_budget_ms = \"5s\"\n\n[[routes]]\nhost = \"{host}\"\ncluster = \"{cluster}\"\n",
        backend.spec()
    )
}

#[test]
fn a_cluster_and_route_in_an_included_file_are_served_with_unit_values() {
    let main_be = Backend::start("main");
    let app_be = Backend::start("app");
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("conf.d/10-app.toml"), &service("app", "app.example.com", &app_be));
    let config = ConfigBuilder::new()
        .top("include = [\"conf.d/*.toml\"]")
        .cluster("main", [main_be.spec()])
        .route(None, "/", "main")
        .section("[timeouts]\nupstream_read_ms = \"10s\"\nclient_header_ms = \"1.5m\"\n[limits]\nmax_body_bytes = \"1KiB\"\nmax_header_bytes = \"16KiB\"")
        .build(free_port());
    let p = Pitcher::start_in(dir, &config);

    let r = p.client().get("app.example.com", "/x");
    assert_ok_body(&r, b"ok from app");
    let r = p.client().get("other.example.com", "/x");
    assert_ok_body(&r, b"ok from main");
    // "1KiB" took effect: a 2 KiB body is refused.
    let mut c = p.client();
    let r = c.request(&request_bytes("POST", "app.example.com", "/", &[], &[b'x'; 2048]));
    assert_eq!(r.status, 413, "{}", r.head_str());
    assert_eq!(app_be.requests(), 1);
}

#[test]
fn config_test_reports_an_error_in_the_second_included_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let be = Backend::start("b");
    let good = service("a", "a.example.com", &be);
    let bad = service("b", "b.example.com", &be).replace("retry_budget_ms = \"5s\"", "retry_budget_ms = \"5 seconds\"");
    write(&dir.path().join("conf.d/10-a.toml"), &good);
    write(&dir.path().join("conf.d/20-b.toml"), &bad);
    let main = ConfigBuilder::new()
        .top(&format!("pid_file = \"{}/p.pid\"", dir.path().display()))
        .top("include = [\"conf.d/*.toml\"]")
        .cluster("main", [be.spec()])
        .route(None, "/", "main")
        .build(free_port());
    let main_path = dir.path().join("pitcher.toml");
    write(&main_path, &main);

    let out = run_pitcher(&["-t", "-c", main_path.to_str().unwrap()], RUN_TIMEOUT);
    assert!(!out.status.success(), "a bad file passed:\n{}", out.all());
    let line = bad.lines().position(|l| l.contains("5 seconds")).unwrap() + 1;
    let where_ = format!("{}:{line}:19:", dir.path().join("conf.d/20-b.toml").display());
    assert!(out.all().contains(&where_), "expected {where_:?} in:\n{}", out.all());
    assert!(out.all().contains("expected a duration like \"10s\" or \"250ms\""), "no hint:\n{}", out.all());

    // Fixed: `-t` passes and names every file it read, in merge order.
    write(&dir.path().join("conf.d/20-b.toml"), &service("b", "b.example.com", &be));
    let out = run_pitcher(&["-t", "-c", main_path.to_str().unwrap()], RUN_TIMEOUT);
    assert!(out.status.success(), "{}", out.all());
    let reads: Vec<&str> = out.stdout.lines().filter_map(|l| l.strip_prefix("pitcher: read ")).collect();
    let expected: Vec<PathBuf> =
        vec![main_path.clone(), dir.path().join("conf.d/10-a.toml"), dir.path().join("conf.d/20-b.toml")];
    assert_eq!(reads, expected.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>(), "{}", out.all());
    assert!(out.stdout.contains("configuration ok"), "{}", out.all());
}

#[test]
fn a_reload_after_editing_an_included_file_applies_it_in_every_worker() {
    let main_be = Backend::start("main");
    let first = Backend::start("first");
    let second = Backend::start("second");
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .top("include = [\"conf.d/*.toml\"]")
        .cluster("main", [main_be.spec()])
        .route(None, "/", "main");
    let mut m = MasterRun::start(&builder);
    // No file matches the glob yet: the main file alone.
    assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from main");

    let svc = m.dir().join("conf.d/10-svc.toml");
    write(&svc, &service("svc", "svc.example.com", &first));
    common::upstream::reload(&mut m, &builder);
    for _ in 0..4 {
        assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from first");
    }

    write(&svc, &service("svc", "svc.example.com", &second));
    common::upstream::reload(&mut m, &builder);
    for _ in 0..4 {
        assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from second");
    }

    // A broken included file is refused; the running configuration stays.
    write(&svc, "[[clusters]]\nname = \"svc\"\n");
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "a bad include was accepted:\n{}", out.all());
    assert!(out.all().contains("10-svc.toml:1:"), "the file is not named:\n{}", out.all());
    assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from second");
}

/// A single-process Pitcher started with its own environment; killed by
/// pid on drop.
struct WithEnv {
    child: Child,
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
}

impl WithEnv {
    fn start(config: &str, env: &[(&str, &str)]) -> WithEnv {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let path = dir.path().join("pitcher.toml");
        let text = format!(
            "pid_file = \"{0}/p.pid\"\ncontrol_socket = \"{0}/p.sock\"\n{1}",
            dir.path().display(),
            config.replace("@PORT@", &port.to_string())
        );
        write(&path, &text);
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let mut cmd = Command::new(PITCHER);
        cmd.args(["--single-process", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.env_remove("PITCHER_TEST_BACKEND");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn pitcher");
        let mut w = WithEnv { child, dir, addr: ([127, 0, 0, 1], port).into() };
        let up = wait_until(RUN_TIMEOUT, || {
            w.child.try_wait().ok().flatten().is_some()
                || TcpStream::connect_timeout(&w.addr, Duration::from_millis(100)).is_ok()
        });
        assert!(up && w.child.try_wait().ok().flatten().is_none(), "pitcher did not start:\n{}", w.log());
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for WithEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("pitcher log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn environment_variables_take_their_default_or_the_value_set() {
    let default_be = Backend::start("default");
    let set_be = Backend::start("set");
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:@PORT@\"\n[[clusters]]\nname = \"app\"\nbackends = [\"${{PITCHER_TEST_BACKEND:-{}}}\"]\n[[routes]]\ncluster = \"app\"\n[modules.headers]\nresponse_set = {{ \"X-Env\" = \"$${{literal}}\" }}\n",
        default_be.spec()
    );

    let p = WithEnv::start(&config, &[]);
    let r = get_once(p.addr, "a.example.com", "/");
    assert_ok_body(&r, b"ok from default");
    assert_eq!(r.header("x-env"), Some("${literal}"), "{}", r.head_str());
    drop(p);

    let p = WithEnv::start(&config, &[("PITCHER_TEST_BACKEND", &set_be.spec())]);
    assert_ok_body(&get_once(p.addr, "a.example.com", "/"), b"ok from set");
    assert_eq!(set_be.requests(), 1);
    assert_eq!(default_be.requests(), 1);

    // Unset and without a default: refused, at its file and line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pitcher.toml");
    let text = config.replace(&format!(":-{}", default_be.spec()), "").replace("@PORT@", "1");
    write(&path, &text);
    let line = text.lines().position(|l| l.contains("${PITCHER_TEST_BACKEND}")).unwrap() + 1;
    let out = run_pitcher(&["-t", "-c", path.to_str().unwrap()], RUN_TIMEOUT);
    assert!(!out.status.success(), "{}", out.all());
    assert!(out.all().contains(&format!("{}:{line}:", path.display())), "{}", out.all());
    assert!(out.all().contains("PITCHER_TEST_BACKEND is not set"), "{}", out.all());
}

/// Workers never read the configuration files: a worker restarted after
/// an included file was deleted (and an env variable would differ) still
/// serves what the master validated, from the resolved text it sends.
#[test]
fn a_restarted_worker_gets_the_resolved_configuration_from_the_master() {
    let main_be = Backend::start("main");
    let svc_be = Backend::start("svc");
    let builder = ConfigBuilder::new()
        .top("workers = 1")
        .top("include = [\"conf.d/*.toml\"]")
        .cluster("main", [main_be.spec()])
        .route(None, "/", "main");
    let mut m = MasterRun::start(&builder);
    let svc = m.dir().join("conf.d/10-svc.toml");
    write(&svc, &service("svc", "svc.example.com", &svc_be));
    common::upstream::reload(&mut m, &builder);
    assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from svc");

    std::fs::remove_file(&svc).expect("remove the included file");
    let old = m.expect_status().worker_pids();
    assert_eq!(old.len(), 1);
    common::pitcher::send_signal(old[0], "KILL");
    let st = m.wait_status(RUN_TIMEOUT, |s| s.all_ready() && !s.worker_pids().contains(&old[0]));
    assert!(st.is_some(), "no new worker: {:?}\n{}", m.status(), m.log());
    assert_ok_body(&m.client().get("svc.example.com", "/"), b"ok from svc");
}
