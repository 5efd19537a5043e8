//! Syslog (RFC 5424 with the hostname) with the real binary, received by a
//! test listener: the access log over UDP and over a Unix datagram socket,
//! the error log over both; a syslog socket that is missing is counted,
//! never fatal.

mod common;

use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::free_port;
use common::master::MasterRun;
use common::pitcher::{new_dir, traversable};
use common::*;

const WAIT: Duration = Duration::from_secs(5);

fn backend() -> Backend {
    Backend::with_handler("a", |_| Reply::ok("ok from a"))
}

fn builder(be: &Backend) -> ConfigBuilder {
    ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/app", "app")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string()
}

/// A datagram source the test reads from.
enum Listener {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

impl Listener {
    fn recv(&self) -> Option<String> {
        let mut buf = vec![0u8; 65536];
        let n = match self {
            Listener::Udp(s) => s.recv(&mut buf).ok()?,
            Listener::Unix(s) => s.recv(&mut buf).ok()?,
        };
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

fn udp() -> (Listener, String) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let a = format!("udp:{}", s.local_addr().expect("addr"));
    (Listener::Udp(s), a)
}

fn unix(dir: &tempfile::TempDir) -> (Listener, String) {
    use std::os::unix::fs::PermissionsExt;
    traversable(dir.path());
    let p = dir.path().join("log.sock");
    let s = UnixDatagram::bind(&p).expect("bind unix datagram");
    // Workers of a root master run as nobody.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    (Listener::Unix(s), format!("unix:{}", p.display()))
}

/// The fields of an RFC 5424 message: PRI+VERSION, TIMESTAMP, HOSTNAME,
/// APP-NAME, PROCID, MSGID, STRUCTURED-DATA, MSG.
fn fields(msg: &str) -> Vec<String> {
    msg.splitn(8, ' ').map(str::to_string).collect()
}

fn check_header(f: &[String], pri: &str, app: &str, msgid: &str, whole: &str) {
    assert_eq!(f.len(), 8, "{whole}");
    assert_eq!(f[0], format!("<{pri}>1"), "{whole}");
    assert!(f[1].len() == 24 && f[1].ends_with('Z') && f[1].as_bytes()[10] == b'T', "RFC 3339 time: {whole}");
    assert_eq!(f[2], hostname(), "{whole}");
    assert_eq!(f[3], app, "{whole}");
    assert!(f[4].parse::<u32>().is_ok(), "PROCID: {whole}");
    assert_eq!((f[5].as_str(), f[6].as_str()), (msgid, "-"), "{whole}");
}

/// Sends requests until an access line arrives (datagrams may be lost).
fn access_line(m: &MasterRun, l: &Listener, tag: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        assert_eq!(get_once(m.addr(), "app.example", &format!("/app/{tag}/{n}")).status, 200);
        while let Some(msg) = l.recv() {
            if msg.contains(&format!("/app/{tag}/")) {
                return msg;
            }
        }
        assert!(Instant::now() < deadline, "no access line after {n} requests\n{}", m.log());
    }
}

fn access_over(l: Listener, addr: &str, tag: &str) {
    let be = backend();
    let m = MasterRun::start(&builder(&be).section(&format!(
        "[modules.access_log]\nformat = \"json\"\nsyslog = \"{addr}\"\nsyslog_facility = \"local3\"\nsyslog_tag = \"edge\""
    )));
    let msg = access_line(&m, &l, tag);
    let f = fields(&msg);
    // local3 (19) * 8 + info (6) = 158.
    check_header(&f, "158", "edge", "access", &msg);
    let v: serde_json::Value = serde_json::from_str(&f[7]).unwrap_or_else(|e| panic!("{e}: {msg}"));
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["backend"], be.spec().as_str(), "{v}");
}

#[test]
fn access_lines_arrive_over_udp_as_rfc5424_with_the_hostname() {
    let (l, a) = udp();
    access_over(l, &a, "udp");
}

#[test]
fn access_lines_arrive_over_a_unix_datagram_socket() {
    let d = new_dir();
    let (l, a) = unix(&d);
    access_over(l, &a, "unixdg");
}

fn error_log_over(l: Listener, addr: &str) {
    let be = backend();
    let m = MasterRun::start(&builder(&be).top(&format!("error_log = \"syslog:{addr}\"")));
    // The master and the worker say they started; a reload says more.
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + WAIT;
    let msg = loop {
        if let Some(msg) = l.recv() {
            break msg;
        }
        assert!(Instant::now() < deadline, "no error log datagram\n{}", m.log());
    };
    let f = fields(&msg);
    let pri: u32 = f[0].trim_start_matches('<').trim_end_matches(">1").parse().unwrap_or_else(|_| panic!("{msg}"));
    assert_eq!(pri / 8, 3, "facility daemon: {msg}");
    check_header(&f, &pri.to_string(), "pitcher", "error", &msg);
    assert!(f[7].contains("process="), "key=value pairs follow the message: {msg}");
}

#[test]
fn the_error_log_goes_to_syslog_over_udp() {
    let (l, a) = udp();
    error_log_over(l, &a);
}

#[test]
fn the_error_log_goes_to_syslog_over_a_unix_datagram_socket() {
    let d = new_dir();
    let (l, a) = unix(&d);
    error_log_over(l, &a);
}

#[test]
fn a_missing_syslog_socket_is_counted_not_fatal() {
    let be = backend();
    let d = new_dir();
    let missing = d.path().join("no-such-log");
    let m = MasterRun::start(
        &builder(&be).section(&format!("[modules.access_log]\nsyslog = \"unix:{}\"", missing.display())),
    );
    for i in 0..5 {
        assert_eq!(get_once(m.addr(), "app.example", &format!("/app/nolog/{i}")).status, 200);
    }
    let dropped = || {
        let out = m.command(&["ctl", "--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        v["data"]["access_log_dropped_lines"].as_u64().unwrap_or(0)
    };
    assert!(wait_until(WAIT, || dropped() == 5), "dropped: {}\n{}", dropped(), m.log());
}

#[test]
fn error_log_shapes_are_checked_at_t() {
    let be = backend();
    for (value, ok) in [
        ("syslog:udp:127.0.0.1:514", true),
        ("syslog:unix:/dev/log", true),
        ("syslog:udp:nowhere", false),
        ("syslog:tcp:127.0.0.1:514", false),
    ] {
        let dir = new_dir();
        let text = builder(&be).top(&format!("error_log = \"{value}\"")).build(free_port());
        let path = dir.path().join("pitcher.toml");
        std::fs::write(&path, text).expect("write config");
        let out = run_pitcher(&["-t", "-c", path.to_str().expect("utf-8")], Duration::from_secs(10));
        assert_eq!(out.status.success(), ok, "{value}: {}", out.all());
        if !ok {
            assert!(out.all().contains("error_log"), "{value}: {}", out.all());
        }
    }
}

#[test]
fn error_log_lines_carry_the_year_and_zone_and_notice_is_a_level() {
    let be = backend();
    let p = builder(&be).top("log_level = \"notice\"").start();
    assert_eq!(get_once(p.addr(), "app.example", "/app/x").status, 200);
    assert!(wait_until(WAIT, || !p.log().trim().is_empty()), "no error log line");
    let log = p.log();
    let line = log.lines().find(|l| l.contains("listening")).unwrap_or_else(|| panic!("{log}"));
    let time = line.split(' ').next().unwrap_or("");
    // 2026-12-02T18:17:00.123Z: year, and the zone (UTC).
    assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[4] == b'-', "{line}");
    let year: u32 = time[..4].parse().unwrap_or(0);
    assert!(year >= 2024, "{line}");
}
