//! The access log's protobuf records with the real binary and the real
//! `pitcher-records` receiver: the receiver prints, for each request, the
//! line of the JSON access log; killing and restarting the receiver loses
//! only records that were counted (`ctl status`: access_log_dropped_lines);
//! a stopped receiver never holds up requests.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::master::MasterRun;
use common::pitcher::{new_dir, send_signal, traversable};
use common::*;

const RECEIVER: &str = env!("CARGO_BIN_EXE_pitcher-records");
/// Longest wait for records to arrive (the writer is asynchronous, and a
/// reconnection waits out a back-off of at most 5 s).
const WAIT: Duration = Duration::from_secs(15);

/// A running `pitcher-records`, stopped by pid when dropped.
struct Receiver {
    child: Child,
    /// The address it listens on, as the access log's `records` takes it.
    addr: String,
    /// The JSON lines it printed.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(listen: &str) -> Receiver {
        let mut child = Command::new(RECEIVER)
            .arg(listen)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pitcher-records");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        err.read_line(&mut first).expect("read the receiver's address");
        let addr =
            first.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("receiver said {first:?}")).to_string();
        // Keep draining stderr (cut records are reported there).
        std::thread::spawn(move || for _ in err.lines() {});
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        if let Some(p) = addr.strip_prefix("unix:") {
            // Workers of a root master run as nobody.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
        }
        Receiver { child, addr, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backend() -> Backend {
    Backend::with_handler("a", |_| Reply::ok("ok from a"))
}

fn builder(be: &Backend, records: &str) -> ConfigBuilder {
    ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/app", "app").section(&format!(
        "[modules.access_log]\npath = \"@DIR@/access.log\"\nformat = \"json\"\nrecords = \"{records}\""
    ))
}

fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

fn get(addr: std::net::SocketAddr, path: &str) -> Response {
    let mut c = Client::connect(addr);
    c.request(&request_bytes("GET", "app.example", path, &[("User-Agent", "probe/1.0"), ("Connection", "close")], b""))
}

/// Lines that mention `needle` (a path prefix of one test phase).
fn with(lines: &[String], needle: &str) -> Vec<String> {
    lines.iter().filter(|l| l.contains(needle)).cloned().collect()
}

fn dropped(m: &MasterRun) -> u64 {
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["data"]["access_log_dropped_lines"].as_u64().unwrap_or(0)
}

/// A socket path in a directory that workers running as nobody can reach.
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let d = new_dir();
    traversable(d.path());
    let p = d.path().join("records.sock");
    (d, p)
}

#[test]
fn the_receiver_prints_the_json_log_lines_of_the_same_requests_over_tcp() {
    let r = Receiver::start("tcp:127.0.0.1:0");
    let be = backend();
    let m = MasterRun::start(&builder(&be, &r.addr));
    let log = m.dir().join("access.log");
    for i in 0..12 {
        assert_eq!(get(m.addr(), &format!("/app/tcp/{i}?q=%22x%22&a=b")).status, 200);
    }
    assert_eq!(get(m.addr(), "/nowhere/tcp").status, 404);
    let done = wait_until(WAIT, || with(&r.lines(), "/tcp").len() == 13 && with(&file_lines(&log), "/tcp").len() == 13);
    assert!(done, "receiver: {:?}\nfile: {:?}\n{}", r.lines(), file_lines(&log), m.log());
    let mut got = with(&r.lines(), "/tcp");
    let mut want = with(&file_lines(&log), "/tcp");
    got.sort();
    want.sort();
    assert_eq!(got, want, "the receiver's JSON lines are the JSON access log's");
    let v: serde_json::Value = serde_json::from_str(&got[0]).expect("JSON");
    assert!(v["duration_ms"].as_f64().is_some() && v["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(dropped(&m), 0);
}

#[test]
fn killing_and_restarting_the_receiver_loses_only_counted_records_over_unix() {
    let (_d, sock) = socket_dir();
    kill_and_restart(&format!("unix:{}", sock.display()));
}

#[test]
fn killing_and_restarting_the_receiver_loses_only_counted_records_over_tcp() {
    kill_and_restart("tcp:127.0.0.1:0");
}

/// Records before, while and after the receiver is away; it comes back on
/// the address it had (a kernel-picked port is bound again).
fn kill_and_restart(listen: &str) {
    let r = Receiver::start(listen);
    let listen = r.addr.clone();
    let be = backend();
    let m = MasterRun::start(&builder(&be, &listen));
    let log = m.dir().join("access.log");

    for i in 0..10 {
        assert_eq!(get(m.addr(), &format!("/app/before/{i}")).status, 200);
    }
    assert!(wait_until(WAIT, || with(&r.lines(), "/app/before/").len() == 10), "{:?}\n{}", r.lines(), m.log());
    let before = r.lines();
    drop(r);

    // The receiver is away: these are lost, and counted.
    for i in 0..10 {
        assert_eq!(get(m.addr(), &format!("/app/away/{i}")).status, 200);
    }
    assert!(wait_until(WAIT, || dropped(&m) >= 1), "records lost while away are counted\n{}", m.log());
    assert!(
        wait_until(WAIT, || m.log().contains("records_dropped")),
        "the writer says how many records it dropped\n{}",
        m.log()
    );

    // Back: the writer reconnects (after its back-off).
    let r = Receiver::start(&listen);
    let mut sent_after = 0;
    let back = wait_until(WAIT, || {
        assert_eq!(get(m.addr(), &format!("/app/after/{sent_after}")).status, 200);
        sent_after += 1;
        std::thread::sleep(Duration::from_millis(50));
        !with(&r.lines(), "/app/after/").is_empty()
    });
    assert!(back, "no record after the receiver came back\n{}", m.log());
    let sent = 10 + 10 + sent_after;
    assert!(wait_until(WAIT, || file_lines(&log).len() == sent), "the file has every line: {}", file_lines(&log).len());

    // Records still on their way are neither received nor dropped yet.
    let settled = || before.len() as u64 + r.lines().len() as u64 + dropped(&m) >= sent as u64;
    wait_until(WAIT, settled);
    let received: Vec<String> = before.iter().cloned().chain(r.lines()).collect();
    let lost = dropped(&m);
    assert!(
        received.len() as u64 + lost >= sent as u64,
        "sent {sent}, received {}, counted as dropped {lost}: uncounted losses",
        received.len()
    );
    assert!(received.len() < sent, "some records were lost while the receiver was away");
    let file = file_lines(&log);
    for line in &received {
        assert!(file.contains(line), "a received record is not a line of the JSON log: {line}");
    }
}

#[test]
fn a_stopped_receiver_never_holds_up_requests() {
    let (_d, sock) = socket_dir();
    let listen = format!("unix:{}", sock.display());
    let r = Receiver::start(&listen);
    let be = backend();
    let m = MasterRun::start(&builder(&be, &listen));
    assert_eq!(get(m.addr(), "/app/first").status, 200);
    assert!(wait_until(WAIT, || !with(&r.lines(), "/app/first").is_empty()), "{}", m.log());

    // Stopped (not gone): its socket buffer fills, the writer's writes
    // stall; requests go on, and the records that cannot go are counted.
    r.signal("STOP");
    let ua = "u".repeat(12 * 1024);
    let mut c = Client::connect(m.addr());
    let n = 400;
    for i in 0..n {
        let resp =
            c.request(&request_bytes("GET", "app.example", &format!("/app/stopped/{i}"), &[("User-Agent", &ua)], b""));
        assert_eq!(resp.status, 200, "request {i} while the receiver is stopped");
    }
    assert!(wait_until(WAIT, || dropped(&m) > 0), "records that could not go are counted\n{}", m.log());
    r.signal("CONT");
    let got = || with(&r.lines(), "/app/stopped/").len() as u64;
    assert!(
        wait_until(WAIT, || got() + dropped(&m) >= n),
        "received {}, dropped {}: uncounted losses\n{}",
        got(),
        dropped(&m),
        m.log()
    );
}
