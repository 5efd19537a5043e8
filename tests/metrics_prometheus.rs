//! `/metrics` and `/status` on the master's admin listener, checked by real
//! parsers (Prometheus's `promtool check metrics`, from Debian's
//! `prometheus` package, and the strict OpenMetrics parser of the
//! `prometheus_client` Python package), counted against the requests the
//! test sent through two workers, across reloads, a worker killed with
//! SIGKILL and a binary upgrade; backend failures and ejections as they
//! happen; and hostile admin clients.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::master::{wait_gone, Load, LoadSpec, MasterRun};
use common::pitcher::send_signal;
use common::*;

/// `[admin]` on a kernel-chosen loopback port.
const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\nclient_timeout_ms = 1500";

fn config(b: &Backend, extra: &[&str]) -> ConfigBuilder {
    let mut c = ConfigBuilder::new().top("workers = 2").top("drain_timeout_ms = 1500").section(ADMIN);
    for l in extra {
        c = c.top(l);
    }
    c.cluster("app", [b.spec()]).route(Some("app.example"), "/", "app")
}

/// The admin address from `ctl status` (bound to port 0).
fn admin_addr(m: &MasterRun) -> SocketAddr {
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let a = v["data"]["admin"].as_str().unwrap_or_else(|| panic!("no admin address in {v}"));
    a.parse().unwrap()
}

/// One admin request: (status, head, body).
fn admin_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n{accept}\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = head[9..12].parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, head, body) = admin_get(addr, "/metrics", None);
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body
}

/// Samples by `name{labels}` (as written).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN))))
        .collect()
}

/// Sum of the samples of family `name` whose labels contain every `want`.
fn total(text: &str, name: &str, want: &[&str]) -> f64 {
    samples(text)
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && want.iter().all(|w| k.contains(w)))
        .map(|(_, v)| v)
        .sum()
}

fn requests_total(addr: SocketAddr) -> f64 {
    total(&scrape(addr), "pitcher_route_requests_total", &[])
}

/// Waits for the request counter to reach `want` (the last requests'
/// counts land just after their responses); returns what it read.
fn wait_requests(addr: SocketAddr, want: f64) -> f64 {
    let mut got = 0.0;
    wait_until(Duration::from_secs(3), || {
        got = requests_total(addr);
        got >= want
    });
    got
}

fn tool(name: &str, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(name)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name} (installed by .ci/run): {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn metrics_pass_promtool_and_the_openmetrics_parser_and_status_is_ctl_status() {
    let b = Backend::start("B");
    let m = MasterRun::start(&config(&b, &[]));
    let admin = admin_addr(&m);
    // The harness's readiness check connected once already.
    let accepted_before = total(&scrape(admin), "pitcher_connections_accepted_total", &[]);
    for i in 0..10 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/{i}")).status, 200);
    }
    assert_eq!(get_once(m.addr(), "nowhere.example", "/").status, 404);

    let text = scrape(admin);
    let out = tool("promtool", &["check", "metrics"], &text);
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(total(&text, "pitcher_route_requests_total", &["route=\"route1\"", "code=\"2xx\""]), 10.0, "{text}");
    assert_eq!(total(&text, "pitcher_route_requests_total", &["route=\"(none)\"", "code=\"4xx\""]), 1.0, "{text}");
    assert_eq!(total(&text, "pitcher_request_duration_seconds_count", &["cluster=\"app\""]), 10.0);
    assert_eq!(total(&text, "pitcher_upstream_response_seconds_count", &["cluster=\"app\""]), 10.0);
    assert_eq!(total(&text, "pitcher_connections_accepted_total", &[]), accepted_before + 11.0);
    assert_eq!(total(&text, "pitcher_backend_requests_total", &[&format!("backend=\"{}\"", b.spec())]), 10.0);
    assert!(total(&text, "pitcher_sent_bytes_total", &[]) > 0.0);
    assert_eq!(total(&text, "pitcher_workers", &[]), 2.0);
    assert_eq!(samples(&text).keys().filter(|k| k.starts_with("pitcher_process_resident_memory_bytes")).count(), 3);

    // OpenMetrics when asked, checked by a strict parser.
    let (status, head, om) = admin_get(admin, "/metrics", Some("application/openmetrics-text; version=1.0.0"));
    assert_eq!(status, 200);
    assert!(head.contains("application/openmetrics-text; version=1.0.0"), "{head}");
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE pitcher_route_requests counter\n"), "family names without _total");
    let parse = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                 fams = list(p(sys.stdin.read()))\nprint(len(fams), sum(len(f.samples) for f in fams))";
    let out = tool("python3", &["-c", parse], &om);
    assert!(out.status.success(), "OpenMetrics parser: {}", String::from_utf8_lossy(&out.stderr));
    let samples_om = samples(&om).len();
    let parsed: Vec<usize> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(parsed[0] > 40 && parsed[1] == samples_om, "parser saw {parsed:?}, the text has {samples_om} samples");

    // /status is what `ctl status --json` prints.
    let (status, head, body) = admin_get(admin, "/status", None);
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("application/json"));
    let web: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ctl: serde_json::Value = serde_json::from_str(&m.command(&["ctl", "--json", "status"]).stdout).unwrap();
    assert_eq!(web["data"]["master_pid"], ctl["data"]["master_pid"]);
    assert_eq!(web["data"]["workers"], ctl["data"]["workers"]);
    assert_eq!(web["ok"], true);

    // Anything else is refused, and counted.
    assert_eq!(admin_get(admin, "/nope", None).0, 404);
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert_eq!(total(&scrape(admin), "pitcher_admin_refused_total", &["bad_request"]), 2.0);
}

#[test]
fn request_counters_equal_the_requests_sent_and_never_go_back_across_reloads_a_killed_worker_and_an_upgrade() {
    let b = Backend::start("B");
    let mut m = MasterRun::start(&config(&b, &[]));
    let admin = admin_addr(&m);
    let spec = LoadSpec {
        addr: m.addr(),
        host: "app.example".into(),
        path: "/load".into(),
        keepalive: 3,
        per_request: 3,
        interval: Duration::from_millis(5),
        bodies: vec![b"ok from B".to_vec()],
    };
    let mut sent = 0.0;
    let mut last = 0.0;

    // Under load across both workers, with 5 reloads.
    let load = Load::start(spec.clone());
    assert!(load.wait_progress(200, Duration::from_secs(10)));
    for i in 0..5 {
        m.write_config(&config(&b, &[&format!("# reload {i}")]));
        let out = m.signal_cmd("reload");
        assert!(out.status.success(), "{out:?}");
        let now = requests_total(admin);
        assert!(now >= last, "reload {i}: the counter went back from {last} to {now}");
        last = now;
        assert!(load.wait_progress(50, Duration::from_secs(10)));
    }
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    sent += report.ok as f64;
    assert_eq!(wait_requests(admin, sent), sent, "after 5 reloads: {}", report.summary());
    let text = scrape(admin);
    assert_eq!(total(&text, "pitcher_reloads_total", &["ok"]), 5.0);
    assert_eq!(total(&text, "pitcher_config_generation", &[]), 6.0);
    assert!(total(&text, "pitcher_last_reload_success_timestamp_seconds", &[]) > 1.7e9);
    assert!(total(&text, "pitcher_keepalive_requests_total", &[]) > 0.0);

    // A worker killed with SIGKILL: its counts stay.
    let st = m.expect_status();
    let victim = st.worker_pids()[0];
    send_signal(victim, "KILL");
    assert!(wait_gone(victim, Duration::from_secs(5)));
    let st = m.wait_status(Duration::from_secs(10), |s| s.all_ready() && !s.worker_pids().contains(&victim));
    assert!(st.is_some(), "the worker is replaced");
    assert_eq!(requests_total(admin), sent, "a killed worker's requests are still counted");
    for i in 0..20 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/after-kill/{i}")).status, 200);
    }
    sent += 20.0;
    assert_eq!(wait_requests(admin, sent), sent);
    assert_eq!(total(&scrape(admin), "pitcher_worker_respawns_total", &[]), 1.0);

    // A binary upgrade under load: the new master serves the same admin
    // socket and the same counters.
    let old = m.pid().unwrap();
    let load = Load::start(spec);
    assert!(load.wait_progress(100, Duration::from_secs(10)));
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}");
    let new = m.pid().unwrap();
    m.track(new);
    assert_ne!(new, old);
    assert!(load.wait_progress(100, Duration::from_secs(10)));
    let mid = requests_total(admin);
    assert!(mid >= sent, "after the upgrade: {mid} < {sent}");
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    sent += report.ok as f64;
    assert!(wait_gone(old, Duration::from_secs(10)), "the old master leaves");
    assert_eq!(wait_requests(admin, sent), sent, "after the upgrade: {}", report.summary());
    let text = scrape(admin);
    assert_eq!(total(&text, "pitcher_upgrades_total", &["result=\"ok\""]), 1.0);
    assert_eq!(total(&text, "pitcher_config_generation", &[]), 7.0);
    let (_, _, status) = admin_get(admin, "/status", None);
    assert!(status.contains(&format!("\"master_pid\": {new}")), "the new master answers: {status}");
}

#[test]
fn backend_failures_ejection_and_health_show_as_they_happen() {
    let good = Backend::start("G");
    let dead = dead_addr();
    let extra = "retries = 1\npassive = { consecutive_failures = 2, ejection_ms = 60000, max_ejection_ms = 60000, max_ejected_percent = 50 }";
    // A second cluster whose only backend is checked by the master and found down.
    let down = dead_addr();
    let hc = "health_check = { path = \"/health\", interval_ms = 100, timeout_ms = 200, rise = 2, fall = 2 }";
    let c = ConfigBuilder::new()
        .top("workers = 1")
        .section(ADMIN)
        .cluster_with("app", [good.spec(), dead.to_string()], extra)
        .cluster_with("checked", [down.to_string()], hc)
        .route(None, "/", "app");
    let m = MasterRun::start(&c);
    let admin = admin_addr(&m);
    let dead_label = format!("backend=\"{dead}\"");
    let before = scrape(admin);
    assert_eq!(total(&before, "pitcher_backend_up", &[&dead_label]), 1.0, "untried: up");
    for i in 0..10 {
        let r = get_once(m.addr(), "x.example", &format!("/{i}"));
        assert_eq!(r.status, 200, "retried on the good backend");
    }
    let text = scrape(admin);
    let failed = total(&text, "pitcher_backend_failures_total", &[&dead_label, "kind=\"connect\""]);
    assert!(failed >= 2.0, "connect failures counted: {failed}\n{text}");
    assert_eq!(total(&text, "pitcher_backend_retries_total", &[&dead_label]), failed);
    assert_eq!(total(&text, "pitcher_backend_ejections_total", &[&dead_label]), 1.0);
    assert_eq!(total(&text, "pitcher_backend_state", &[&dead_label, "state=\"ejected\""]), 1.0);
    assert_eq!(total(&text, "pitcher_backend_up", &[&dead_label]), 0.0);
    let good_label = format!("backend=\"{}\"", good.spec());
    assert_eq!(total(&text, "pitcher_backend_up", &[&good_label]), 1.0);
    assert_eq!(total(&text, "pitcher_backend_failures_total", &[&good_label]), 0.0);
    assert_eq!(total(&text, "pitcher_cluster_requests_total", &["cluster=\"app\"", "code=\"2xx\""]), 10.0);

    // Active health: the master's probes mark it down.
    let down_label = format!("backend=\"{down}\"");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let t = scrape(admin);
            total(&t, "pitcher_backend_state", &[&down_label, "state=\"down\""]) == 1.0
                && total(&t, "pitcher_backend_probes_total", &[&down_label]) >= 2.0
        }),
        "{}",
        scrape(admin)
    );
    assert_eq!(total(&scrape(admin), "pitcher_backend_up", &[&down_label]), 0.0);
}

#[test]
fn hostile_admin_clients_are_refused_counted_and_never_stall_the_master() {
    let b = Backend::start("B");
    let m = MasterRun::start(&config(&b, &[]));
    let admin = admin_addr(&m);

    // A head that never ends.
    let mut big = TcpStream::connect(admin).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = big.write_all(b"GET /metrics HTTP/1.1\r\n");
    let _ = big.write_all(&vec![b'x'; 16 * 1024]);
    let mut r = Vec::new();
    let _ = big.read_to_end(&mut r);
    assert!(r.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&r));

    // Clients that connect and send nothing: 32 are held, the rest refused
    // at once; none of them keeps the master or the proxy from answering.
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    assert!(m.status().is_some(), "ctl answers while admin clients hang");
    assert_eq!(get_once(m.addr(), "app.example", "/").status, 200);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let mut refused = 0;
    for mut s in idle.iter().map(|s| s.try_clone().unwrap()) {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        if matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 503")) {
            refused += 1;
        }
    }
    assert_eq!(refused, 8, "over 32 clients are answered 503");
    // The held ones time out (client_timeout_ms = 1500) and are counted.
    assert!(wait_until(Duration::from_secs(5), || {
        let t = scrape(admin);
        total(&t, "pitcher_admin_refused_total", &["timed_out"]) >= 32.0
    }));
    drop(idle);

    // A scraper that never reads its answer holds only its own buffer.
    let mut stuck = TcpStream::connect(admin).unwrap();
    stuck.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let t = scrape(admin);
    assert_eq!(total(&t, "pitcher_admin_refused_total", &["too_many"]), 8.0);
    assert_eq!(total(&t, "pitcher_admin_refused_total", &["too_large"]), 1.0);
    assert!(m.status().is_some());
    drop(stuck);
}

#[test]
fn the_admin_endpoint_on_a_unix_socket_is_0660_and_removed_at_stop() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let b = Backend::start("B");
    let dir = common::pitcher::new_dir();
    let sock = dir.path().join("admin.sock");
    let c = ConfigBuilder::new()
        .section(&format!("[admin]\naddress = \"unix:{}\"", sock.display()))
        .cluster("app", [b.spec()])
        .route(None, "/", "app");
    let mut m = MasterRun::start(&c);
    assert_eq!(get_once(m.addr(), "x.example", "/").status, 200);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the admin socket is 0660");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(total(&text, "pitcher_route_requests_total", &["code=\"2xx\""]) >= 1.0, "{text}");
    m.stop();
    assert!(!sock.exists(), "the master removed its admin socket at stop");
}
