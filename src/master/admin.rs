//! The master's admin listener (`[admin]`): `GET /metrics` (Prometheus
//! text, or OpenMetrics when `Accept` asks for it) and `GET /status` (the
//! JSON of `pitcher ctl status --json`), over TCP or a Unix socket.
//!
//! Why the master: it never touches request traffic, so a scrape (which
//! sums every worker's block of the shared region and reads `/proc`)
//! costs the data path nothing; and the master outlives every worker, so
//! the endpoint is up while workers restart. The listener is handed to a
//! new master on binary upgrade with the other sockets.
//!
//! Every peer may be hostile: a request head must fit in
//! [`HEAD_MAX_BYTES`] and the whole exchange finish within
//! `client_timeout_ms`; at most [`MAX_CLIENTS`] are served at once; the
//! answer is written without blocking (a client that does not read holds
//! only its own buffer). Each refusal is counted (`pitcher_admin_refused`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::{Interest, Token};

use crate::config::ListenAddr;
use crate::metrics::{self, Format};
use crate::net::{Listener, Stream};

use super::Master;

/// Largest request head a client may send.
pub const HEAD_MAX_BYTES: usize = 8 * 1024;
/// Most clients served at once; more are answered 503 and closed.
pub const MAX_CLIENTS: usize = 32;
/// The admin listener's token.
pub const LISTENER: Token = Token(5);
/// Tokens of admin clients: `CLIENT_BASE + id` (between the control
/// clients' and the health probes').
pub const CLIENT_BASE: usize = 1 << 36;

/// The admin listener and its clients.
pub struct Admin {
    /// The configured address.
    pub address: ListenAddr,
    /// The address it is bound to (`127.0.0.1:43121`).
    pub local: String,
    /// A duplicate of the listening fd, to hand to a new master.
    pub fd: OwnedFd,
    /// A Unix socket's path and (device, inode), to remove the file at
    /// exit only if it is still this one.
    pub unix_file: Option<(std::path::PathBuf, Option<(u64, u64)>)>,
    listener: Listener,
    clients: Vec<Client>,
    next_id: usize,
    /// Requests refused, by reason.
    pub refused: Refused,
}

/// Admin requests refused, by reason.
#[derive(Debug, Default, Clone, Copy)]
pub struct Refused {
    /// Over [`MAX_CLIENTS`].
    pub too_many: u64,
    /// A head larger than [`HEAD_MAX_BYTES`].
    pub too_large: u64,
    /// Not done within `client_timeout_ms`.
    pub timed_out: u64,
    /// Not an HTTP request (400), not GET/HEAD (405), or an unknown path (404).
    pub bad_request: u64,
}

impl Refused {
    /// (reason, count) pairs for `/metrics`.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("too_many", self.too_many),
            ("too_large", self.too_large),
            ("timed_out", self.timed_out),
            ("bad_request", self.bad_request),
        ]
    }
}

struct Client {
    id: usize,
    stream: Stream,
    head: Vec<u8>,
    /// The answer, once the head is in; written from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    deadline: Instant,
}

impl Admin {
    /// Wraps a bound listening socket (bound here, or from the old master).
    pub fn new(address: ListenAddr, fd: OwnedFd) -> std::io::Result<Admin> {
        let local = crate::channel::entry_for(&address, fd.as_raw_fd()).local;
        let dup = fd.try_clone()?;
        let unix_file = match &address.0 {
            crate::config::SockAddr::Unix(p) => Some((p.clone(), super::control::file_id(p))),
            crate::config::SockAddr::Tcp(_) => None,
        };
        let listener = Listener::from_fd(fd, unix_file.is_some())?;
        Ok(Admin {
            address,
            local,
            fd: dup,
            unix_file,
            listener,
            clients: Vec::new(),
            next_id: 0,
            refused: Refused::default(),
        })
    }

    /// Binds `address` (a Unix socket is made 0660: the master's user and
    /// group may scrape).
    pub fn bind(address: &ListenAddr) -> std::io::Result<OwnedFd> {
        use nix::sys::stat::{umask, Mode};
        let saved = umask(Mode::from_bits_truncate(0o117));
        let r = crate::net::bind(address, 128);
        umask(saved);
        r
    }
}

/// The name of the admin socket in an upgrade's hand-over manifest.
pub fn handover_name(address: &ListenAddr) -> String {
    format!("admin:{address}")
}

impl Master {
    /// Binds, keeps or closes the admin listener for the configuration
    /// (at start and on reload). `inherited`: the old master's socket.
    pub(super) fn configure_admin(&mut self, inherited: Option<OwnedFd>) -> std::io::Result<()> {
        let want = self.config.admin.as_ref().map(|a| a.address.clone());
        if self.admin.as_ref().map(|a| &a.address) == want.as_ref() {
            return Ok(()); // Same address (or none before and after): nothing changes.
        }
        let Some(address) = want else {
            self.close_admin();
            return Ok(());
        };
        let fd = match inherited {
            Some(fd) => fd,
            None => Admin::bind(&address)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on [admin] {address}: {e}")))?,
        };
        self.close_admin();
        let mut admin = Admin::new(address, fd)?;
        self.poll.registry().register(&mut admin.listener, LISTENER, Interest::READABLE)?;
        slog::info!(self.logger(), "admin listening (GET /metrics, /status)"; "address" => &admin.local);
        self.admin = Some(admin);
        Ok(())
    }

    /// Stops serving the admin endpoint (reload without `[admin]`, or the
    /// socket was handed to a new master).
    pub(super) fn close_admin(&mut self) {
        if let Some(mut a) = self.admin.take() {
            let _ = self.poll.registry().deregister(&mut a.listener);
            for mut c in a.clients.drain(..) {
                let _ = self.poll.registry().deregister(&mut c.stream);
            }
        }
    }

    /// New admin connections.
    pub(super) fn accept_admin(&mut self) {
        loop {
            let Some(a) = self.admin.as_mut() else { return };
            let Ok((mut stream, _)) = a.listener.accept() else { return };
            if a.clients.len() >= MAX_CLIENTS {
                a.refused.too_many += 1;
                let _ = stream.write(&response(503, "text/plain", b"too many admin clients\n", false));
                continue;
            }
            let id = a.next_id;
            a.next_id += 1;
            let token = Token(CLIENT_BASE + id);
            if self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                continue;
            }
            let timeout = self.config.admin.as_ref().map_or(Duration::from_secs(10), |c| c.client_timeout);
            let deadline = Instant::now() + timeout;
            a.clients.push(Client { id, stream, head: Vec::new(), out: Vec::new(), out_pos: 0, deadline });
        }
    }

    /// Readiness of admin client `id`: read its head, answer, write.
    pub(super) fn admin_client_event(&mut self, id: usize) {
        let Some(a) = self.admin.as_mut() else { return };
        let Some(i) = a.clients.iter().position(|c| c.id == id) else { return };
        let c = &mut a.clients[i];
        let mut done = false;
        if c.out.is_empty() {
            let mut chunk = [0u8; 2048];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        done = true;
                        break;
                    }
                    Ok(n) => {
                        c.head.extend_from_slice(&chunk[..n]);
                        if c.head.len() > HEAD_MAX_BYTES {
                            a.refused.too_large += 1;
                            c.out = response(431, "text/plain", b"request head too large\n", false);
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
            if c.out.is_empty() && !done && c.head.windows(4).any(|w| w == b"\r\n\r\n") {
                let head = std::mem::take(&mut c.head);
                let out = self.admin_answer(&head);
                let Some(a) = self.admin.as_mut() else { return };
                let Some(c) = a.clients.iter_mut().find(|c| c.id == id) else { return };
                c.out = out;
            }
        }
        let Some(a) = self.admin.as_mut() else { return };
        let Some(i) = a.clients.iter().position(|c| c.id == id) else { return };
        let c = &mut a.clients[i];
        while !done && c.out_pos < c.out.len() {
            match c.stream.write(&c.out[c.out_pos..]) {
                Ok(0) => done = true,
                Ok(n) => {
                    c.out_pos += n;
                    if c.out_pos == c.out.len() {
                        c.stream.shutdown_write();
                        done = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => done = true,
            }
        }
        if done {
            let mut c = a.clients.swap_remove(i);
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Clients past their deadline are closed.
    pub(super) fn expire_admin_clients(&mut self, now: Instant) {
        let Some(a) = self.admin.as_mut() else { return };
        while let Some(i) = a.clients.iter().position(|c| c.deadline <= now) {
            let mut c = a.clients.swap_remove(i);
            a.refused.timed_out += 1;
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// The answer to one request head.
    fn admin_answer(&mut self, head: &[u8]) -> Vec<u8> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let bad = |a: &mut Option<super::admin::Admin>, status, msg: &[u8]| {
            if let Some(a) = a.as_mut() {
                a.refused.bad_request += 1;
            }
            response(status, "text/plain", msg, false)
        };
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return bad(&mut self.admin, 400, b"bad request\n");
        }
        let (Some(method), Some(target)) = (req.method, req.path) else {
            return bad(&mut self.admin, 400, b"bad request\n");
        };
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            return bad(&mut self.admin, 405, b"only GET and HEAD\n");
        }
        let path = target.split('?').next().unwrap_or("");
        let accept = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("accept"))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .unwrap_or_default();
        match path {
            "/metrics" => {
                let format = Format::from_accept(&accept);
                let text = self.render_metrics(format);
                let mut out = response(200, format.content_type(), text.as_bytes(), head_only);
                out.shrink_to_fit();
                out
            }
            "/status" => {
                // The answer `pitcher ctl status --json` prints.
                let reply = crate::control::Reply { data: self.status(), ..crate::control::Reply::ok("running") };
                let mut body = serde_json::to_vec_pretty(&reply).unwrap_or_default();
                body.push(b'\n');
                response(200, "application/json", &body, head_only)
            }
            _ => bad(&mut self.admin, 404, b"not found: try /metrics or /status\n"),
        }
    }

    /// The exposition of every figure.
    pub(super) fn render_metrics(&self, format: Format) -> String {
        let workers = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| s.proc.as_ref().map(|p| (slot, p)))
            .map(|(slot, p)| metrics::WorkerInfo { slot, place: p.place, pid: p.pid.as_raw() as u32 })
            .collect();
        let r = self.control_refused;
        let view = metrics::View {
            shared: self.region.shared(),
            config: &self.config,
            backends: &self.backend_slots,
            workers,
            refusals: vec![
                ("peer_uid", r.peer_uid),
                ("too_large", r.too_large),
                ("timed_out", r.timed_out),
                ("too_many", r.too_many),
            ],
            admin_refusals: self.admin.as_ref().map(|a| a.refused.pairs()).unwrap_or_default(),
        };
        metrics::render(&view, format)
    }
}

/// A whole HTTP/1.1 response that closes the connection.
fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}
