//! A small raw HTTP/1.1 client: the test writes the exact request bytes, the
//! client reads exactly one response (Content-Length, chunked, until close,
//! or none for HEAD/204/304) and leaves the connection usable for the next.
//! Every socket has read and write timeouts, so no test can hang forever.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::http::{parse_head, response_framing, BufConn, Framing, Headers};
use super::IO_TIMEOUT;

/// One response as the client received it.
#[derive(Debug, Clone)]
pub struct Response {
    /// The head exactly as received, including the final CRLF CRLF.
    pub head: Vec<u8>,
    /// `HTTP/1.1`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    /// The body after removing its framing.
    pub body: Vec<u8>,
    pub trailers: Headers,
    /// How the body was delimited on the wire.
    pub framing: Framing,
    /// Status codes of interim (1xx) responses received before this one.
    pub interim: Vec<u16>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The status line, without CRLF.
    pub fn status_line(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        head.split("\r\n").next().unwrap_or_default().to_string()
    }

    pub fn head_str(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// True if the response says the connection will close.
    pub fn says_close(&self) -> bool {
        self.headers.tokens("connection").iter().any(|t| t == "close")
    }
}

/// A client connection. See the module documentation.
pub struct Client {
    conn: BufConn<TcpStream>,
    /// The method of the last request sent, so the next response is read
    /// with the right framing (HEAD has no body).
    last_method: String,
}

impl Client {
    /// Connects to `addr` with read and write timeouts of [`IO_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(Client { conn: BufConn::new(s), last_method: "GET".into() })
    }

    pub fn stream(&self) -> &TcpStream {
        self.conn.get_ref()
    }

    /// Writes raw bytes; remembers the method if they start a request.
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).unwrap_or_else(|e| panic!("send request: {e}"));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(sp) = bytes.iter().position(|&b| b == b' ') {
            let m = &bytes[..sp];
            if !m.is_empty() && m.iter().all(|b| b.is_ascii_uppercase()) {
                self.last_method = String::from_utf8_lossy(m).into_owned();
            }
        }
        self.conn.get_mut().write_all(bytes)?;
        self.conn.get_mut().flush()
    }

    /// Reads one final response to the last request sent (1xx interim
    /// responses other than 101 are skipped and noted in `interim`).
    pub fn read_response(&mut self) -> Response {
        self.try_read_response().unwrap_or_else(|e| panic!("read response: {e}"))
    }

    pub fn try_read_response(&mut self) -> io::Result<Response> {
        let mut r = self.try_read_head()?;
        let (body, trailers) = self.conn.read_body(r.framing)?;
        r.body = body;
        r.trailers = trailers;
        Ok(r)
    }

    /// Reads the head of the next final response only; the body is left on
    /// the connection for [`Client::read_some`] or [`Client::read_body`].
    pub fn read_head(&mut self) -> Response {
        self.try_read_head().unwrap_or_else(|e| panic!("read response head: {e}"))
    }

    pub fn try_read_head(&mut self) -> io::Result<Response> {
        let mut interim = Vec::new();
        loop {
            let head = self
                .conn
                .read_head()?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"))?;
            let (line, headers) = parse_head(&head)?;
            let mut parts = line.splitn(3, ' ');
            let version = parts.next().unwrap_or_default().to_string();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .filter(|_| version.starts_with("HTTP/"))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
            let reason = parts.next().unwrap_or_default().to_string();
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            let framing = response_framing(&self.last_method, status, &headers)?;
            return Ok(Response {
                head,
                version,
                status,
                reason,
                headers,
                body: Vec::new(),
                trailers: Headers::default(),
                framing,
                interim,
            });
        }
    }

    /// Reads the body of a response whose head [`Client::read_head`] read.
    pub fn read_body(&mut self, r: &mut Response) {
        let (body, trailers) = self.conn.read_body(r.framing).unwrap_or_else(|e| panic!("read body: {e}"));
        r.body = body;
        r.trailers = trailers;
    }

    /// Reads the body of a response whose head [`Client::read_head`] read,
    /// returning errors (a body cut short) instead of panicking.
    pub fn try_read_response_body(&mut self, r: &Response) -> io::Result<Vec<u8>> {
        self.conn.read_body(r.framing).map(|(body, _)| body)
    }

    /// Up to `max` bytes of whatever comes next; empty at end of stream.
    pub fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        self.conn.read_some(max)
    }

    /// Everything until the server closes.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        self.conn.read_to_eof()
    }

    /// Sends `raw` and reads the response.
    pub fn request(&mut self, raw: &[u8]) -> Response {
        self.send(raw);
        self.read_response()
    }

    /// A keep-alive `GET path` with `Host: host`.
    pub fn get(&mut self, host: &str, path: &str) -> Response {
        self.request(&get_request(host, path))
    }

    /// True if the server has closed the connection (EOF or reset) within
    /// `wait`; false if it is still open and silent. Panics if unexpected
    /// bytes arrive.
    pub fn closed_by_peer(&mut self, wait: Duration) -> bool {
        assert!(self.conn.buffered().is_empty(), "unread bytes: {:?}", String::from_utf8_lossy(self.conn.buffered()));
        let s = self.conn.get_ref();
        s.set_read_timeout(Some(wait)).expect("set_read_timeout");
        let r = self.conn.read_some(1);
        self.conn.get_ref().set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        match r {
            Ok(b) if b.is_empty() => true,
            Ok(b) => panic!("expected silence or close, got bytes {:?}", String::from_utf8_lossy(&b)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => false,
            Err(_) => true,
        }
    }
}

/// `GET path HTTP/1.1` with only a Host header.
pub fn get_request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// A request with the given extra header lines and a Content-Length body
/// (no Content-Length when `body` is empty and the method is GET or HEAD).
pub fn request_bytes(method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || !(method == "GET" || method == "HEAD") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// One request on a fresh connection with `Connection: close`.
pub fn get_once(addr: SocketAddr, host: &str, path: &str) -> Response {
    let mut c = Client::connect(addr);
    c.request(&request_bytes("GET", host, path, &[("Connection", "close")], b""))
}
