//! Helpers of the upstream resilience tests: a backend that can be killed
//! (its listener closed, so connecting is refused) and restarted on the
//! same address, made to crash (accept and close at once), fail, hang or
//! slow down while it runs, and that timestamps every request it gets; the
//! `ctl upstreams` view of a master; reloads; per-worker I/O counters; a
//! small load client that keeps every response.
//!
//! Every thread a [`Node`] starts stops when it is killed or dropped; every
//! socket has timeouts.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::client::{request_bytes, Client, Response};
use super::http::{parse_head, request_framing, BufConn, Headers};
use super::master::MasterRun;
use super::pitcher::ConfigBuilder;
use super::{dead_addr, wait_until};

/// The User-Agent of the master's health probes.
pub const PROBE_AGENT: &str = "pitcher-health-check";

/// Read timeout of a node's connections (a safety net).
const NODE_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One request as a [`Node`] received it.
#[derive(Debug, Clone)]
pub struct Hit {
    /// When its head and body had arrived.
    pub at: Instant,
    /// 1-based index among every request of the node (probes included).
    pub seq: usize,
    /// 1-based index of the connection it came on (accept order).
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Hit {
    /// A health probe of the master (by its User-Agent).
    pub fn is_probe(&self) -> bool {
        self.headers.get("user-agent") == Some(PROBE_AGENT)
    }
}

/// What a node does with a request.
#[derive(Debug, Clone)]
pub enum Act {
    /// 200, body `ok from <name>`, header `X-Backend: <name>`.
    Ok,
    /// This status, body `<status> from <name>`, `X-Backend: <name>`.
    Status(u16),
    /// Wait, then [`Act::Ok`].
    Delay(Duration),
    /// Close the connection without answering (the request was read).
    Close,
    /// Never answer; keep the connection open until the peer closes it or
    /// the node is killed.
    Hang,
}

type NodeHandler = dyn Fn(&Hit) -> Act + Send + Sync;

struct NodeInner {
    name: String,
    handler: RwLock<Arc<NodeHandler>>,
    /// Accept connections and close them at once, reading nothing (a
    /// crashing backend that still owns its port).
    close_on_accept: AtomicBool,
    /// Answer every request with `Connection: close` and close.
    no_keepalive: AtomicBool,
    hits: Mutex<Vec<Hit>>,
    connections: AtomicUsize,
    /// Live connections of the current run, to shut them down on kill.
    live: Mutex<HashMap<usize, TcpStream>>,
}

struct Run {
    stop: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

/// A TCP backend on a fixed address that can be killed and restarted. See
/// the module documentation.
pub struct Node {
    addr: SocketAddr,
    inner: Arc<NodeInner>,
    run: Mutex<Option<Run>>,
}

impl Node {
    /// A node answering [`Act::Ok`], on a port below the kernel's ephemeral
    /// range (so that no outgoing connection takes its port while it is
    /// dead, and it can always be restarted there).
    pub fn start(name: &str) -> Node {
        Node::with_handler(name, |_| Act::Ok)
    }

    /// A node answering with `handler`, on a port like [`Node::start`].
    pub fn with_handler<F>(name: &str, handler: F) -> Node
    where
        F: Fn(&Hit) -> Act + Send + Sync + 'static,
    {
        let inner = Arc::new(NodeInner {
            name: name.to_string(),
            handler: RwLock::new(Arc::new(handler)),
            close_on_accept: AtomicBool::new(false),
            no_keepalive: AtomicBool::new(false),
            hits: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            live: Mutex::new(HashMap::new()),
        });
        for _ in 0..20 {
            let addr = dead_addr();
            if let Ok(l) = TcpListener::bind(addr) {
                let n = Node { addr, inner, run: Mutex::new(None) };
                n.serve(l);
                return n;
            }
        }
        panic!("no port for node {name}");
    }

    /// `127.0.0.1:PORT`, for a cluster's `backends`.
    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    /// [`Node::spec`] with a weight.
    pub fn spec_weight(&self, weight: u32) -> String {
        format!("{} weight={weight}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Closes the listener and every connection: connecting is refused
    /// from now on. Hits and counts are kept.
    pub fn kill(&self) {
        let Some(run) = self.run.lock().unwrap().take() else { return };
        run.stop.store(true, Ordering::SeqCst);
        for s in self.inner.live.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the blocking accept; the acceptor then drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = run.acceptor.join();
        assert!(
            wait_until(Duration::from_secs(5), || TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
                .is_err()),
            "node {} still accepts on {} after kill",
            self.inner.name,
            self.addr
        );
    }

    /// Listens on the same address again (after [`Node::kill`]).
    pub fn restart(&self) {
        assert!(self.run.lock().unwrap().is_none(), "node {} is running", self.inner.name);
        let deadline = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("restart {} on {}: {e}", self.inner.name, self.addr),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        self.serve(l);
    }

    fn serve(&self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let (inner, st) = (self.inner.clone(), stop.clone());
        let acceptor = thread::Builder::new()
            .name(format!("node-{}-accept", self.inner.name))
            .spawn(move || accept_loop(&inner, &st, listener))
            .expect("spawn node acceptor");
        *self.run.lock().unwrap() = Some(Run { stop, acceptor });
    }

    /// Replaces the handler for the requests that come next.
    pub fn set_handler<F>(&self, handler: F)
    where
        F: Fn(&Hit) -> Act + Send + Sync + 'static,
    {
        *self.inner.handler.write().unwrap() = Arc::new(handler);
    }

    /// Accept and close every new connection at once (`true`), or serve
    /// them again (`false`).
    pub fn set_close_on_accept(&self, on: bool) {
        self.inner.close_on_accept.store(on, Ordering::SeqCst);
    }

    /// A crash that leaves the port open: every connection open now is
    /// shut down and every new one closed at once.
    pub fn crash(&self) {
        self.set_close_on_accept(true);
        for s in self.inner.live.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Keep connections open between requests (`true`, the default), or
    /// answer each with `Connection: close` and close it, so that Pitcher
    /// never reuses one.
    pub fn set_keepalive(&self, on: bool) {
        self.inner.no_keepalive.store(!on, Ordering::SeqCst);
    }

    /// Connections accepted so far (every run).
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().clone()
    }

    /// Requests other than health probes.
    pub fn traffic(&self) -> usize {
        self.inner.hits.lock().unwrap().iter().filter(|h| !h.is_probe()).count()
    }

    /// Health probes received.
    pub fn probes(&self) -> usize {
        self.inner.hits.lock().unwrap().iter().filter(|h| h.is_probe()).count()
    }

    /// Requests other than probes that arrived in `[from, to)`.
    pub fn traffic_between(&self, from: Instant, to: Instant) -> usize {
        self.inner.hits.lock().unwrap().iter().filter(|h| !h.is_probe() && h.at >= from && h.at < to).count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn accept_loop(inner: &Arc<NodeInner>, stop: &AtomicBool, listener: TcpListener) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let conn = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if inner.close_on_accept.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let _ = stream.set_read_timeout(Some(NODE_IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(NODE_IO_TIMEOUT));
        let _ = stream.set_nodelay(true);
        let Ok(clone) = stream.try_clone() else { continue };
        inner.live.lock().unwrap().insert(conn, clone);
        let ci = inner.clone();
        let spawned = thread::Builder::new().name(format!("node-{}-{conn}", inner.name)).spawn(move || {
            serve_conn(&ci, conn, stream);
            ci.live.lock().unwrap().remove(&conn);
        });
        if spawned.is_err() {
            inner.live.lock().unwrap().remove(&conn);
        }
    }
}

fn serve_conn(inner: &NodeInner, conn: usize, stream: TcpStream) {
    let mut c = BufConn::new(stream);
    loop {
        let Ok(Some(head)) = c.read_head() else { return };
        let Ok((line, headers)) = parse_head(&head) else { return };
        let mut parts = line.split(' ');
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return };
        let Ok(framing) = request_framing(&headers) else { return };
        let Ok((body, _)) = c.read_body(framing) else { return };
        let close =
            headers.tokens("connection").iter().any(|t| t == "close") || inner.no_keepalive.load(Ordering::SeqCst);
        let hit = {
            let mut all = inner.hits.lock().unwrap();
            let hit = Hit {
                at: Instant::now(),
                seq: all.len() + 1,
                conn,
                method: method.to_string(),
                target: target.to_string(),
                headers,
                body,
            };
            all.push(hit.clone());
            hit
        };
        let handler = inner.handler.read().unwrap().clone();
        let (status, body) = match handler(&hit) {
            Act::Ok => (200, format!("ok from {}", inner.name)),
            Act::Status(s) => (s, format!("{s} from {}", inner.name)),
            Act::Delay(d) => {
                thread::sleep(d);
                (200, format!("ok from {}", inner.name))
            }
            Act::Close => return,
            Act::Hang => {
                let mut sink = [0u8; 1024];
                while matches!(c.get_mut().read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nX-Backend: {}\r\nContent-Length: {}\r\n{}\r\n{body}",
            inner.name,
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if c.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// One backend in `ctl --json upstreams`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpRow {
    pub cluster: String,
    pub backend: String,
    pub weight: u64,
    pub state: String,
    pub health_checked: bool,
    pub ejected_for_ms: u64,
    pub ejections: u64,
    pub slow_start_percent: u64,
    pub active: u64,
    pub requests: u64,
    pub failures: u64,
    pub probes: u64,
}

/// `ctl --json upstreams`: the table (`message`) and the rows; panics with
/// the output when it is not `ok`.
pub fn upstreams(m: &MasterRun) -> (String, Vec<UpRow>) {
    let out = m.command(&["ctl", "--json", "upstreams"]);
    assert!(out.status.success(), "ctl --json upstreams failed: {out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ctl --json upstreams: {e}: {:?}", out.stdout));
    assert_eq!(v["ok"], serde_json::Value::Bool(true), "{v}");
    let rows: Vec<UpRow> = serde_json::from_value(v["data"]["backends"].clone())
        .unwrap_or_else(|e| panic!("data.backends of ctl --json upstreams: {e}: {v}"));
    (v["message"].as_str().unwrap_or_default().to_string(), rows)
}

/// The row of `backend` (a spec, `127.0.0.1:PORT`) in `cluster`.
pub fn row(m: &MasterRun, cluster: &str, backend: &str) -> UpRow {
    let (_, rows) = upstreams(m);
    rows.iter()
        .find(|r| r.cluster == cluster && r.backend == backend)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {cluster}/{backend} in {rows:#?}"))
}

/// Polls the row of `backend` until `f` holds; the row that did.
pub fn wait_row(
    m: &MasterRun,
    cluster: &str,
    backend: &str,
    timeout: Duration,
    mut f: impl FnMut(&UpRow) -> bool,
) -> Option<UpRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = row(m, cluster, backend);
        if f(&r) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `builder` as the configuration, reloads with `-s reload` and
/// waits until every worker runs it.
pub fn reload(m: &mut MasterRun, builder: &ConfigBuilder) {
    let before = m.expect_status();
    m.write_config(builder);
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "reload failed: {out:?}\n{}", m.log());
    let seq = before.config_seq + 1;
    m.wait_status(Duration::from_secs(10), |s| s.all_at(seq))
        .unwrap_or_else(|| panic!("workers did not take configuration {seq}: {:?}\n{}", m.status(), m.log()));
}

/// The worker pids of a master (two expected in these tests).
pub fn worker_pids(m: &MasterRun) -> Vec<u32> {
    m.expect_status().worker_pids()
}

/// Context switches of a process so far (voluntary and not, from
/// `/proc/<pid>/status`): an idle worker sleeps in `epoll_wait` and barely
/// switches, one that serves requests wakes for each of them.
pub fn switches(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    st.lines()
        .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
        .sum()
}

/// Log lines that contain every one of `words`.
pub fn log_lines(m: &MasterRun, words: &[&str]) -> Vec<String> {
    m.log().lines().filter(|l| words.iter().all(|w| l.contains(w))).map(str::to_string).collect()
}

/// One `GET path` on a new connection with `Connection: close` (new
/// connections are spread over the workers) and extra headers.
pub fn get_new_conn(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
    let mut h = headers.to_vec();
    h.push(("Connection", "close"));
    let mut c = Client::try_connect(addr).map_err(|e| format!("connect: {e}"))?;
    c.try_send(&request_bytes("GET", "app", path, &h, b"")).map_err(|e| format!("send: {e}"))?;
    c.try_read_response().map_err(|e| format!("read: {e}"))
}

/// What a [`Hammer`] saw.
#[derive(Debug, Default)]
pub struct HammerReport {
    /// Responses by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Responses by `X-Backend`.
    pub backends: BTreeMap<String, u64>,
    /// Transport errors and statuses other than 200, with their time.
    pub errors: Vec<String>,
    pub total: u64,
}

/// A load client: `threads` threads send `GET /load/N` on new connections
/// (so that both workers get traffic), each pausing `pause` between
/// requests, until finished.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<HammerReport>>,
    pub sent: Arc<AtomicU64>,
}

impl Hammer {
    pub fn start(addr: SocketAddr, threads: usize, pause: Duration) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(HammerReport::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let handles = (0..threads)
            .map(|i| {
                let (stop, report, sent) = (stop.clone(), report.clone(), sent.clone());
                thread::Builder::new()
                    .name(format!("hammer-{i}"))
                    .spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::SeqCst) {
                            n += 1;
                            sent.fetch_add(1, Ordering::SeqCst);
                            let r = get_new_conn(addr, &format!("/load/{i}/{n}"), &[]);
                            let mut rep = report.lock().unwrap();
                            rep.total += 1;
                            let at = t0.elapsed().as_secs_f64();
                            match r {
                                Ok(r) => {
                                    *rep.statuses.entry(r.status).or_default() += 1;
                                    if let Some(b) = r.header("x-backend") {
                                        *rep.backends.entry(b.to_string()).or_default() += 1;
                                    }
                                    if r.status != 200 {
                                        rep.errors
                                            .push(format!("{at:.3}s thread {i} request {n}: {}", r.status_line()));
                                    }
                                }
                                Err(e) => rep.errors.push(format!("{at:.3}s thread {i} request {n}: {e}")),
                            }
                            drop(rep);
                            if !pause.is_zero() {
                                thread::sleep(pause);
                            }
                        }
                    })
                    .expect("spawn hammer thread")
            })
            .collect();
        Hammer { stop, threads: handles, report, sent }
    }

    /// Requests answered so far.
    pub fn total(&self) -> u64 {
        self.report.lock().unwrap().total
    }

    /// Errors so far.
    pub fn errors(&self) -> Vec<String> {
        self.report.lock().unwrap().errors.clone()
    }

    /// Waits (bounded) until `n` more requests were answered.
    pub fn wait_more(&self, n: u64, timeout: Duration) -> bool {
        let from = self.total();
        wait_until(timeout, || self.total() >= from + n)
    }

    /// Stops the threads and reports.
    pub fn finish(mut self) -> HammerReport {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        std::mem::take(&mut *self.report.lock().unwrap())
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}
