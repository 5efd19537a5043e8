//! The `access_log` module with the real binary: one line per request, as
//! JSON, in nginx's combined format or a custom one, in a file and at a syslog server over
//! UDP; the file is reopened on SIGUSR1 (`pitcher -s reopen`) after
//! logrotate renamed it; a log file that cannot be opened never holds up a
//! request.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::*;

/// Longest wait for a line to arrive (the writer is asynchronous).
const LINE_WAIT: Duration = Duration::from_secs(5);

/// A backend whose `/app/slow...` answers after 60 ms.
fn backend() -> Backend {
    Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path().starts_with("/app/slow") {
            reply.delayed(Duration::from_millis(60))
        } else {
            reply
        }
    })
}

fn config(be: &Backend, module: &str) -> ConfigBuilder {
    ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/app", "app").section(module)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Waits until the file has a line containing `needle`; returns that line.
fn wait_line(path: &Path, needle: &str) -> String {
    let mut found = None;
    wait_until(LINE_WAIT, || {
        found = lines(path).into_iter().find(|l| l.contains(needle));
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no line with {needle:?} in {}: {:?}", path.display(), lines(path)))
}

fn send(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.request(&request_bytes(
        method,
        "app.example",
        path,
        &[("User-Agent", "probe/1.0"), ("Referer", "http://ref.example/"), ("Connection", "close")],
        body,
    ))
}

#[test]
fn json_lines_carry_client_method_path_status_bytes_timings_and_backend() {
    let be = backend();
    let p = config(&be, "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"json\"").start();
    let log = p.dir().join("access.log");

    assert_ok_body(&send(p.addr(), "GET", "/app/slow/1?q=\"x\"", b""), b"ok from a");
    assert_ok_body(&send(p.addr(), "POST", "/app/post", b"payload"), b"ok from a");
    assert_eq!(send(p.addr(), "GET", "/elsewhere", b"").status, 404);

    let parse =
        |l: String| -> serde_json::Value { serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")) };
    let get = parse(wait_line(&log, "/app/slow/1"));
    assert_eq!(get["client"], "127.0.0.1", "{get}");
    assert_eq!(get["method"], "GET", "{get}");
    assert_eq!(get["path"], "/app/slow/1?q=\"x\"", "{get}");
    assert_eq!(get["host"], "app.example", "{get}");
    assert_eq!(get["status"], 200, "{get}");
    assert_eq!(get["bytes"], 9, "body bytes sent: {get}");
    assert_eq!(get["backend"], be.spec().as_str(), "{get}");
    assert_eq!(get["user_agent"], "probe/1.0", "{get}");
    let time = get["time"].as_str().unwrap_or_else(|| panic!("no time: {get}"));
    assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "time {time:?}");
    let duration = get["duration_ms"].as_f64().unwrap_or_else(|| panic!("no duration_ms: {get}"));
    let upstream = get["upstream_ms"].as_f64().unwrap_or_else(|| panic!("no upstream_ms: {get}"));
    assert!(upstream >= 50.0, "the backend took 60 ms: {get}");
    assert!(duration >= upstream, "the request lasted at least its upstream time: {get}");
    assert!(duration < 10_000.0, "{get}");

    let post = parse(wait_line(&log, "/app/post"));
    assert_eq!(post["method"], "POST", "{post}");
    assert_eq!(post["status"], 200, "{post}");

    // Answered by Pitcher itself: no backend, no upstream time.
    let local = parse(wait_line(&log, "/elsewhere"));
    assert_eq!(local["status"], 404, "{local}");
    assert!(local["backend"].is_null() && local["upstream_ms"].is_null(), "{local}");
    assert_eq!(lines(&log).len(), 3, "one line per request: {:?}", lines(&log));
}

/// Regression: Pitcher's own answers (a 404, a module's 429) were logged
/// with `bytes` 0 although they carry a body.
#[test]
fn pitchers_own_answers_are_logged_with_the_body_bytes_sent() {
    let be = backend();
    let module = "[modules]\norder = [\"access_log\", \"quota\"]\n\n\
                  [modules.access_log]\npath = \"@DIR@/access.log\"\n\n\
                  [modules.quota]\nkey = \"header:User-Agent\"\nrate_per_sec = 1\nburst = 1\n";
    let p = config(&be, module).start();
    let log = p.dir().join("access.log");
    let parse = |l: String| -> serde_json::Value { serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")) };

    let r = send(p.addr(), "GET", "/nothing-here", b"");
    assert_eq!(r.status, 404);
    let v = parse(wait_line(&log, "/nothing-here"));
    assert_eq!(v["bytes"].as_u64(), Some(r.body.len() as u64), "{v}");

    let rejected = (0..4).map(|i| send(p.addr(), "GET", &format!("/app/q/{i}"), b"")).find(|r| r.status == 429);
    let r = rejected.expect("a 429 from the quota");
    let line = lines(&log).into_iter().find(|l| l.contains("\"status\":429")).map(parse);
    let v = line.unwrap_or_else(|| parse(wait_line(&log, "\"status\":429")));
    assert_eq!(v["bytes"].as_u64(), Some(r.body.len() as u64), "{v}");
}

/// The standard regex for nginx's combined log format.
const COMBINED: &str = r#"^(\S+) (\S+) (\S+) \[(\d{2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-]\d{4})\] "(\S+) (\S+) (\S+)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"$"#;

#[test]
fn combined_lines_are_nginxs_combined_format_exactly() {
    let be = backend();
    let p = config(&be, "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"combined\"").start();
    let log = p.dir().join("access.log");
    let re = regex::Regex::new(COMBINED).expect("regex");

    assert_ok_body(&send(p.addr(), "GET", "/app/slow/c?x=1", b""), b"ok from a");
    let line = wait_line(&log, "/app/slow/c");
    let c = re.captures(&line).unwrap_or_else(|| panic!("not a combined line: {line}"));
    let year: i32 = c[6].parse().expect("year");
    assert!(year >= 2024, "{line}");
    assert_eq!(
        (&c[1], &c[2], &c[3], &c[11], &c[12], &c[13], &c[14], &c[15], &c[16], &c[17]),
        ("127.0.0.1", "-", "-", "GET", "/app/slow/c?x=1", "HTTP/1.1", "200", "9", "http://ref.example/", "probe/1.0"),
        "{line}"
    );

    assert_eq!(send(p.addr(), "GET", "/nowhere", b"").status, 404);
    let line = wait_line(&log, "/nowhere");
    let c = re.captures(&line).unwrap_or_else(|| panic!("not a combined line: {line}"));
    assert_eq!((&c[12], &c[14]), ("/nowhere", "404"), "{line}");
}

#[test]
fn custom_lines_fill_named_variables_with_timings_and_backend() {
    let be = backend();
    let module = "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"custom\"\n\
        custom = \"$remote_addr|$request|$status|$body_bytes_sent|$upstream_addr|$upstream_response_time|$request_time|$http_user_agent|$request_id|$route|$http_connection|$http_X_Absent\"";
    let p = config(&be, module).start();
    let log = p.dir().join("access.log");

    let r = send(p.addr(), "GET", "/app/slow/custom", b"");
    assert_ok_body(&r, b"ok from a");
    let line = wait_line(&log, "/app/slow/custom");
    let f: Vec<&str> = line.split('|').collect();
    assert_eq!(f.len(), 12, "{line}");
    assert_eq!(&f[..5], &["127.0.0.1", "GET /app/slow/custom HTTP/1.1", "200", "9", be.spec().as_str()], "{line}");
    let (urt, rt): (f64, f64) = (f[5].parse().expect("urt"), f[6].parse().expect("rt"));
    assert!(urt >= 0.05 && rt >= urt, "seconds: {line}");
    assert_eq!(f[7], "probe/1.0", "{line}");
    assert!(f[8].len() >= 8 && f[8] != "-", "Pitcher's request id: {line}");
    // Any field by name ($http_NAME, `_` read as `-`), and "-" when absent.
    assert_eq!((f[10], f[11]), ("close", "-"), "{line}");

    assert_eq!(send(p.addr(), "GET", "/nowhere", b"").status, 404);
    let line = wait_line(&log, "/nowhere");
    let f: Vec<&str> = line.split('|').collect();
    assert_eq!((f[4], f[5], f[9]), ("-", "-", "-"), "no backend, no route: {line}");
}

#[test]
fn lines_arrive_at_a_syslog_server_over_udp() {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    udp.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let to = udp.local_addr().expect("local_addr");
    let be = backend();
    let module = format!("[modules.access_log]\nsyslog_udp = \"{to}\"\nformat = \"json\"");
    let p = config(&be, &module).start();

    let deadline = Instant::now() + LINE_WAIT;
    let mut n = 0;
    let got = loop {
        // Datagrams may be lost: send until one arrives.
        n += 1;
        assert_ok_body(&send(p.addr(), "GET", &format!("/app/udp/{n}"), b""), b"ok from a");
        let mut buf = [0u8; 4096];
        if let Ok((len, _)) = udp.recv_from(&mut buf) {
            break String::from_utf8_lossy(&buf[..len]).into_owned();
        }
        assert!(Instant::now() < deadline, "no datagram at {to} after {n} requests\n{}", p.log());
    };
    assert!(got.starts_with("<134>1 "), "RFC 5424, local0.info: {got}");
    assert!(got.contains("/app/udp/"), "{got}");
    let json = got.split_once('{').map(|(_, r)| format!("{{{r}")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["backend"], be.spec().as_str(), "{v}");
}

#[test]
fn the_file_is_reopened_on_sigusr1_after_logrotate_renamed_it() {
    let be = backend();
    let builder = config(&be, "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"combined\"");
    let m = MasterRun::start(&builder);
    let log = m.dir().join("access.log");
    assert_ok_body(&send(m.addr(), "GET", "/app/before", b""), b"ok from a");
    wait_line(&log, "/app/before");

    for (round, how) in ["-s reopen", "SIGUSR1"].iter().enumerate() {
        let rotated = m.dir().join(format!("access.log.{round}"));
        std::fs::rename(&log, &rotated).expect("rename the access log");
        match *how {
            "-s reopen" => {
                let out = m.signal_cmd("reopen");
                assert!(out.status.success(), "{out:?}");
            }
            _ => {
                m.kill_master("USR1");
            }
        }
        // The reopen travels master → worker → writer: send until a line
        // lands in the new file.
        let mut n = 0;
        let arrived = wait_until(LINE_WAIT, || {
            n += 1;
            assert_ok_body(&send(m.addr(), "GET", &format!("/app/after/{round}/{n}"), b""), b"ok from a");
            std::thread::sleep(Duration::from_millis(50));
            lines(&log).iter().any(|l| l.contains(&format!("/app/after/{round}/")))
        });
        assert!(
            arrived,
            "after {how}, {n} requests and no line in a new {}; the renamed file has {:?}\n{}",
            log.display(),
            lines(&rotated).iter().rev().take(3).collect::<Vec<_>>(),
            m.log()
        );
        assert!(lines(&rotated).iter().any(|l| l.contains("/app/")), "the rotated file keeps the old lines");
    }
}

#[test]
fn a_log_file_that_cannot_be_opened_never_holds_up_requests() {
    let be = backend();
    let p = config(&be, "[modules.access_log]\npath = \"@DIR@/no/such/dir/access.log\"").start();
    let t0 = Instant::now();
    for i in 0..20 {
        assert_ok_body(&send(p.addr(), "GET", &format!("/app/x/{i}"), b""), b"ok from a");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "20 requests took {:?}", t0.elapsed());
    assert!(
        wait_until(LINE_WAIT, || p.log().contains("cannot open the access log")),
        "the module should say why there is no access log:\n{}",
        p.log()
    );
    assert!(!p.dir().join("no").exists());
}
