//! A real HTTP/1.1 backend for tests, on TCP (127.0.0.1, port 0) or a Unix
//! domain socket, one thread per connection.
//!
//! It records every request exactly as it arrived (raw head, parsed fields,
//! de-framed body and trailers), counts connections and requests, and answers
//! with whatever a handler closure returns: a normal response, chunked,
//! close-delimited, raw bytes, a huge streamed body, silence, or a drop.
//! Dropping the `Backend` shuts every connection down and stops its threads.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::http::{
    encode_chunked, parse_head, pattern_byte, reason_phrase, request_framing, BufConn, Framing, Headers,
};

/// Safety net: no backend write blocks longer than this.
const BACKEND_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Size of each write of a streamed body.
const STREAM_PIECE: usize = 64 * 1024;

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 1-based index of the connection it came on (in accept order).
    pub conn: usize,
    /// 1-based index of the request on this backend.
    pub seq: usize,
    /// The head exactly as received, including the final CRLF CRLF.
    pub head: Vec<u8>,
    pub method: String,
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub headers: Headers,
    /// The body after removing its framing (Content-Length or chunked).
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body.
    pub trailers: Headers,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The path of the target, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn head_str(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }
}

/// What the backend answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A response with a Content-Length body. `Content-Length` is added
    /// unless `headers` carry Content-Length or Transfer-Encoding, or the
    /// status is 1xx/204/304. The body is not sent for HEAD, 1xx, 204, 304.
    Full { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// A chunked response (`Transfer-Encoding: chunked` is added).
    Chunked { status: u16, headers: Vec<(String, String)>, chunks: Vec<Vec<u8>>, trailers: Vec<(String, String)> },
    /// A response without length: the body, then the connection is closed.
    CloseDelimited { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// These bytes verbatim; then the connection is closed if `close`.
    Raw { bytes: Vec<u8>, close: bool },
    /// A Content-Length body of `len` bytes made on the fly (the pattern of
    /// [`super::http::pattern_byte`]), written in 64 KiB pieces; the bytes
    /// actually written are counted in [`Backend::bytes_written`].
    Stream { status: u16, headers: Vec<(String, String)>, len: u64 },
    /// Never answer; keep the connection open until the peer closes it or
    /// the backend is dropped.
    Hang,
    /// Close the connection right after reading the request, without
    /// answering. The peer usually sees a FIN; [`Backend::resetting`] makes
    /// the kernel send an RST instead.
    Reset,
    /// Wait, then answer.
    Delay(Duration, Box<Reply>),
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::status(200, body)
    }

    /// `status` with `body` (Content-Length framed).
    pub fn status(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full { status, headers: Vec::new(), body: body.into() }
    }

    /// A chunked response with these chunks.
    pub fn chunked(status: u16, chunks: Vec<Vec<u8>>) -> Reply {
        Reply::Chunked { status, headers: Vec::new(), chunks, trailers: Vec::new() }
    }

    /// A close-delimited response.
    pub fn close_delimited(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::CloseDelimited { status, headers: Vec::new(), body: body.into() }
    }

    /// Raw bytes, connection kept open afterwards.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Raw { bytes: bytes.into(), close: false }
    }

    /// Raw bytes, then close.
    pub fn raw_then_close(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Raw { bytes: bytes.into(), close: true }
    }

    /// A 200 streamed body of `len` bytes.
    pub fn stream(len: u64) -> Reply {
        Reply::Stream { status: 200, headers: Vec::new(), len }
    }

    /// Adds a header field (no effect on Raw, Hang, Reset).
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        match &mut self {
            Reply::Full { headers, .. }
            | Reply::Chunked { headers, .. }
            | Reply::CloseDelimited { headers, .. }
            | Reply::Stream { headers, .. } => headers.push((name.to_string(), value.to_string())),
            Reply::Delay(_, inner) => **inner = inner.as_ref().clone().with_header(name, value),
            Reply::Raw { .. } | Reply::Hang | Reply::Reset => {}
        }
        self
    }

    /// Adds a trailer field (chunked replies only).
    pub fn with_trailer(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Chunked { trailers, .. } = &mut self {
            trailers.push((name.to_string(), value.to_string()));
        }
        self
    }

    /// Adds `Connection: close`; the backend closes after the response.
    pub fn close(self) -> Reply {
        self.with_header("Connection", "close")
    }

    /// The same reply after `d`.
    pub fn delayed(self, d: Duration) -> Reply {
        Reply::Delay(d, Box::new(self))
    }
}

type Handler = dyn Fn(&RecordedRequest) -> Reply + Send + Sync;

/// A TCP or Unix stream.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_write_timeout(&self, d: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(d)),
            Stream::Unix(s) => s.set_write_timeout(Some(d)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// Where a backend listens.
#[derive(Debug, Clone)]
enum Where {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

struct Inner {
    name: String,
    handler: RwLock<Arc<Handler>>,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
    open_connections: AtomicUsize,
    bytes_written: AtomicU64,
    stop: AtomicBool,
    /// Reset every connection as soon as request bytes arrive, unread.
    reset_on_data: bool,
    /// Clones of the live connections, to shut them down on drop. A
    /// connection removes its own entry when it ends, so that closing the
    /// thread's stream really closes the socket.
    live: Mutex<HashMap<usize, Stream>>,
}

/// A running test backend. See the module documentation.
pub struct Backend {
    inner: Arc<Inner>,
    at: Where,
    acceptor: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A TCP backend with the default handler: 200, body `ok from <name>`,
    /// header `X-Backend: <name>`.
    pub fn start(name: &str) -> Backend {
        let n = name.to_string();
        Backend::with_handler(name, move |_| default_reply(&n))
    }

    /// A TCP backend on 127.0.0.1 (port chosen by the kernel) answering with
    /// `handler`.
    pub fn with_handler<F>(name: &str, handler: F) -> Backend
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend local_addr");
        Backend::run(name, Listener::Tcp(listener), Where::Tcp(addr), Arc::new(handler), false)
    }

    /// A TCP backend at `addr` (another loopback address such as
    /// 127.0.0.2, a port already chosen) answering with `handler`; the
    /// error when the address cannot be bound.
    pub fn try_with_handler_at<F>(name: &str, addr: SocketAddr, handler: F) -> io::Result<Backend>
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        Ok(Backend::run(name, Listener::Tcp(listener), Where::Tcp(addr), Arc::new(handler), false))
    }

    /// A TCP backend that resets every connection: it waits until request
    /// bytes have arrived, reads none of them and closes, so the kernel
    /// sends RST instead of FIN. No request is recorded.
    pub fn resetting(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend local_addr");
        let n = name.to_string();
        Backend::run(
            name,
            Listener::Tcp(listener),
            Where::Tcp(addr),
            Arc::new(move |_: &RecordedRequest| default_reply(&n)),
            true,
        )
    }

    /// A Unix-socket backend at `path` with the default handler.
    pub fn unix_at(name: &str, path: &Path) -> Backend {
        let n = name.to_string();
        Backend::unix_with_handler_at(name, path, move |_| default_reply(&n))
    }

    /// A Unix-socket backend at `path` answering with `handler`. An old
    /// socket file at `path` is removed first.
    pub fn unix_with_handler_at<F>(name: &str, path: &Path, handler: F) -> Backend
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("bind backend on {}: {e}", path.display()));
        // Pitcher's workers run as nobody: they must be able to connect.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod the backend socket");
        Backend::run(name, Listener::Unix(listener), Where::Unix(path.to_path_buf()), Arc::new(handler), false)
    }

    /// A Unix-socket backend in a temporary directory of its own.
    pub fn unix(name: &str) -> Backend {
        let n = name.to_string();
        Backend::unix_with_handler(name, move |_| default_reply(&n))
    }

    /// A Unix-socket backend in a temporary directory of its own, answering
    /// with `handler`.
    pub fn unix_with_handler<F>(name: &str, handler: F) -> Backend
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        let dir = tempfile::Builder::new().prefix("pitcher-be").tempdir().expect("tempdir for unix backend");
        super::pitcher::traversable(dir.path());
        let path = dir.path().join(format!("{name}.sock"));
        let mut b = Backend::unix_with_handler_at(name, &path, handler);
        b._dir = Some(dir);
        b
    }

    fn run(name: &str, listener: Listener, at: Where, handler: Arc<Handler>, reset_on_data: bool) -> Backend {
        let inner = Arc::new(Inner {
            name: name.to_string(),
            handler: RwLock::new(handler),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            bytes_written: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            reset_on_data,
            live: Mutex::new(HashMap::new()),
        });
        let acc_inner = inner.clone();
        let acceptor = thread::Builder::new()
            .name(format!("backend-{name}-accept"))
            .spawn(move || accept_loop(acc_inner, listener))
            .expect("spawn backend acceptor");
        Backend { inner, at, acceptor: Some(acceptor), _dir: None }
    }

    /// Replaces the handler for the requests that come next.
    pub fn set_handler<F>(&self, handler: F)
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        *self.inner.handler.write().unwrap() = Arc::new(handler);
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The address to put in a cluster's `backends`: `127.0.0.1:PORT` or
    /// `unix:/path`.
    pub fn spec(&self) -> String {
        match &self.at {
            Where::Tcp(a) => a.to_string(),
            Where::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// [`Backend::spec`] with a weight.
    pub fn spec_weight(&self, weight: u32) -> String {
        format!("{} weight={weight}", self.spec())
    }

    /// The TCP address (panics for a Unix-socket backend).
    pub fn addr(&self) -> SocketAddr {
        match &self.at {
            Where::Tcp(a) => *a,
            Where::Unix(p) => panic!("backend {} is on unix socket {}", self.inner.name, p.display()),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.inner.open_connections.load(Ordering::SeqCst)
    }

    /// Requests received so far (counted once the whole body has arrived).
    pub fn requests(&self) -> usize {
        self.inner.requests.lock().unwrap().len()
    }

    /// Every request received so far, in order.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.inner.requests.lock().unwrap().last().cloned()
    }

    /// Body bytes of [`Reply::Stream`] replies actually written to sockets.
    pub fn bytes_written(&self) -> u64 {
        self.inner.bytes_written.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` requests have arrived; true if they did.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.requests() >= n)
    }

    fn wake_acceptor(&self) {
        let _ = match &self.at {
            Where::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_secs(1)).map(drop),
            Where::Unix(p) => UnixStream::connect(p).map(drop),
        };
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        for s in self.inner.live.lock().unwrap().values() {
            s.shutdown();
        }
        self.wake_acceptor();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        if let Where::Unix(p) = &self.at {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The default answer: 200, `ok from <name>`, `X-Backend: <name>`.
pub fn default_reply(name: &str) -> Reply {
    Reply::ok(format!("ok from {name}")).with_header("X-Backend", name)
}

fn accept_loop(inner: Arc<Inner>, listener: Listener) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(_) if inner.stop.load(Ordering::SeqCst) => return,
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let conn = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = stream.set_write_timeout(BACKEND_WRITE_TIMEOUT);
        match stream.try_clone() {
            Ok(c) => {
                inner.live.lock().unwrap().insert(conn, c);
            }
            Err(_) => continue,
        }
        inner.open_connections.fetch_add(1, Ordering::SeqCst);
        let ci = inner.clone();
        let spawned = thread::Builder::new().name(format!("backend-{}-{conn}", inner.name)).spawn(move || {
            serve(&ci, conn, stream);
            ci.live.lock().unwrap().remove(&conn);
            ci.open_connections.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            inner.live.lock().unwrap().remove(&conn);
            inner.open_connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Serves one connection until it should close. The stream is dropped (and
/// the socket closed, once the `live` clone is removed) by the caller.
fn serve(inner: &Inner, conn: usize, stream: Stream) {
    if inner.reset_on_data {
        if let Stream::Tcp(s) = &stream {
            // Wait for the first byte without consuming it: closing with
            // unread data makes the kernel answer with RST.
            let _ = s.peek(&mut [0u8; 1]);
        }
        return;
    }
    let mut c = BufConn::new(stream);
    while !inner.stop.load(Ordering::SeqCst) {
        let Ok(Some(head)) = c.read_head() else { return };
        let Ok((line, headers)) = parse_head(&head) else {
            return;
        };
        let mut parts = line.split(' ');
        let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(t), Some(v)) => (m.to_string(), t.to_string(), v.to_string()),
            _ => return,
        };
        let Ok(framing) = request_framing(&headers) else {
            return;
        };
        let expects_continue = headers.tokens("expect").iter().any(|t| t == "100-continue");
        if expects_continue && framing != Framing::None && c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let Ok((body, trailers)) = c.read_body(framing) else {
            return;
        };
        let client_close = headers.tokens("connection").iter().any(|t| t == "close")
            || (version == "HTTP/1.0" && !headers.tokens("connection").iter().any(|t| t == "keep-alive"));
        let req = {
            let mut all = inner.requests.lock().unwrap();
            let req =
                RecordedRequest { conn, seq: all.len() + 1, head, method, target, version, headers, body, trailers };
            all.push(req.clone());
            req
        };
        let handler = inner.handler.read().unwrap().clone();
        let reply = handler(&req);
        match write_reply(inner, &mut c, &req, reply) {
            Ok(true) if !client_close => continue,
            _ => return,
        }
    }
}

fn head_bytes(status: u16, headers: &[(String, String)], extra: &[(String, String)]) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (n, v) in headers.iter().chain(extra) {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn wants_close(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
}

fn has(headers: &[(String, String)], name: &str) -> bool {
    headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// Writes `reply`; `Ok(true)` if the connection may serve another request.
fn write_reply(inner: &Inner, c: &mut BufConn<Stream>, req: &RecordedRequest, reply: Reply) -> io::Result<bool> {
    let no_body_status = |s: u16| (100..200).contains(&s) || s == 204 || s == 304;
    let head_req = req.method.eq_ignore_ascii_case("HEAD");
    match reply {
        Reply::Full { status, headers, body } => {
            let mut extra = Vec::new();
            if !no_body_status(status) && !has(&headers, "content-length") && !has(&headers, "transfer-encoding") {
                extra.push(("Content-Length".to_string(), body.len().to_string()));
            }
            let mut out = head_bytes(status, &headers, &extra);
            if !head_req && !no_body_status(status) {
                out.extend_from_slice(&body);
            }
            c.write_all(&out)?;
            Ok(!wants_close(&headers))
        }
        Reply::Chunked { status, headers, chunks, trailers } => {
            let extra = [("Transfer-Encoding".to_string(), "chunked".to_string())];
            let mut out = head_bytes(status, &headers, &extra);
            if !head_req && !no_body_status(status) {
                out.extend_from_slice(&encode_chunked(&chunks, &trailers));
            }
            c.write_all(&out)?;
            Ok(!wants_close(&headers))
        }
        Reply::CloseDelimited { status, headers, body } => {
            let mut out = head_bytes(status, &headers, &[]);
            if !head_req && !no_body_status(status) {
                out.extend_from_slice(&body);
            }
            c.write_all(&out)?;
            Ok(false)
        }
        Reply::Raw { bytes, close } => {
            c.write_all(&bytes)?;
            Ok(!close)
        }
        Reply::Stream { status, headers, len } => {
            let extra = [("Content-Length".to_string(), len.to_string())];
            c.write_all(&head_bytes(status, &headers, &extra))?;
            if head_req {
                return Ok(!wants_close(&headers));
            }
            // One pattern buffer; piece k starts at offset % 251 into it.
            let pattern: Vec<u8> = (0..(STREAM_PIECE + 251) as u64).map(pattern_byte).collect();
            let mut sent: u64 = 0;
            while sent < len {
                if inner.stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                let start = (sent % 251) as usize;
                let n = (len - sent).min(STREAM_PIECE as u64) as usize;
                let w = match c.get_mut().write(&pattern[start..start + n]) {
                    Ok(0) => return Ok(false),
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                sent += w as u64;
                inner.bytes_written.fetch_add(w as u64, Ordering::SeqCst);
            }
            Ok(!wants_close(&headers))
        }
        Reply::Hang => {
            // Swallow whatever comes until the peer closes or we are stopped.
            let mut sink = [0u8; 4096];
            while !inner.stop.load(Ordering::SeqCst) {
                match c.get_mut().read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            Ok(false)
        }
        Reply::Reset => Ok(false),
        Reply::Delay(d, inner_reply) => {
            let until = Instant::now() + d;
            while Instant::now() < until {
                if inner.stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                thread::sleep(Duration::from_millis(5).min(until.saturating_duration_since(Instant::now())));
            }
            write_reply(inner, c, req, *inner_reply)
        }
    }
}
