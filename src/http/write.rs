//! Serialisation of the heads Pitcher sends: the request to a backend, the
//! response to a client, and Pitcher's own error responses. Every head
//! Pitcher forwards is re-framed here (RFC 9112): the framing fields of the
//! received message are dropped and written anew from the framing Pitcher
//! actually uses, so an ambiguous message can never pass through.

use std::net::IpAddr;

use super::head::{trim, RequestHead, ResponseHead};
use super::{is_hop_by_hop, reason, Framing, Head};

/// How the body Pitcher sends is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// No body.
    None,
    /// A body of this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked` (forwarded or re-framed).
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 clients).
    Close,
}

impl OutFraming {
    /// How a request body of framing `f` is sent on.
    pub fn from_request(f: Framing) -> OutFraming {
        match f {
            Framing::None => OutFraming::None,
            Framing::Length(n) => OutFraming::Length(n),
            Framing::Chunked => OutFraming::Chunked,
            Framing::Close => OutFraming::Close,
        }
    }
}

/// The values of a head's Connection fields, gathered once per head so
/// that deciding whether each field is hop-by-hop does not walk every
/// field again (a walk per field was a tenth of a small request's
/// instructions). More Connection fields than it holds: the head is walked
/// as before.
struct ConnectionLists<'a> {
    values: [&'a [u8]; 4],
    n: usize,
    overflow: bool,
}

impl<'a> ConnectionLists<'a> {
    fn of(head: &'a Head) -> ConnectionLists<'a> {
        let mut c = ConnectionLists { values: [&[]; 4], n: 0, overflow: false };
        for (name, value) in head.iter() {
            if name.eq_ignore_ascii_case(b"connection") {
                match c.values.get_mut(c.n) {
                    Some(slot) => {
                        *slot = value;
                        c.n += 1;
                    }
                    None => c.overflow = true,
                }
            }
        }
        c
    }

    /// `name` is one of the tokens the Connection fields list.
    fn lists(&self, head: &Head, name: &[u8]) -> bool {
        let listed = |v: &[u8]| v.split(|&b| b == b',').any(|t| trim(t).eq_ignore_ascii_case(name));
        if self.overflow {
            return head.iter().filter(|(n, _)| n.eq_ignore_ascii_case(b"connection")).any(|(_, v)| listed(v));
        }
        self.values[..self.n].iter().any(|v| listed(v))
    }
}

/// Is this field hop-by-hop for `head`: a fixed hop-by-hop name or a name
/// listed in its Connection field (`conn`, gathered from `head`)?
fn skip_field(head: &Head, conn: &ConnectionLists<'_>, name: &[u8], keep_upgrade: bool) -> bool {
    if is_hop_by_hop(name) {
        return true;
    }
    if name.eq_ignore_ascii_case(b"upgrade") {
        return !keep_upgrade;
    }
    conn.lists(head, name)
}

fn push_num(out: &mut Vec<u8>, n: u64) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(n).as_bytes());
}

fn push_framing(out: &mut Vec<u8>, f: OutFraming) {
    match f {
        OutFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_num(out, n);
            out.extend_from_slice(b"\r\n");
        }
        OutFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        OutFraming::None | OutFraming::Close => {}
    }
}

/// How the client reached Pitcher: the value of `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Cleartext HTTP.
    Http,
    /// HTTP over TLS terminated by Pitcher.
    Https,
}

/// Writes the request head sent to a backend: origin-form target,
/// HTTP/1.1, hop-by-hop fields removed, X-Forwarded-For appended,
/// X-Forwarded-Proto set to `scheme` (whatever the client sent), Host passed through, or replaced by the authority
/// of an absolute-form target (RFC 9112 §3.2.2), or sent empty when an
/// HTTP/1.0 client gave neither (§3.2: every HTTP/1.1 request has one).
/// `upgrade`: keep Upgrade and send `Connection: upgrade`.
pub fn request_head(out: &mut Vec<u8>, req: &RequestHead, client_ip: Option<IpAddr>, scheme: Scheme, upgrade: bool) {
    let head = &req.head;
    out.extend_from_slice(req.method());
    out.push(b' ');
    out.extend_from_slice(req.target());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff_seen = false;
    let mut host_seen = false;
    let conn = ConnectionLists::of(head);
    for (name, value) in head.iter() {
        // Host is end-to-end whatever the Connection field lists: a client
        // must not be able to strip it on the way to the backend.
        let is_host = name.eq_ignore_ascii_case(b"host");
        if !is_host && skip_field(head, &conn, name, upgrade) || name.eq_ignore_ascii_case(b"x-forwarded-proto") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            if !xff_seen {
                // All values, in order, joined, then the client.
                out.extend_from_slice(b"X-Forwarded-For: ");
                let mut first = true;
                for (n, v) in head.iter() {
                    if n.eq_ignore_ascii_case(b"x-forwarded-for") && !trim(v).is_empty() {
                        if !first {
                            out.extend_from_slice(b", ");
                        }
                        out.extend_from_slice(trim(v));
                        first = false;
                    }
                }
                if !first {
                    out.extend_from_slice(b", ");
                }
                push_ip(out, client_ip);
                out.extend_from_slice(b"\r\n");
                xff_seen = true;
            }
            continue;
        }
        if is_host {
            if host_seen {
                continue;
            }
            host_seen = true;
            if let Some(a) = req.authority.clone() {
                out.extend_from_slice(b"Host: ");
                out.extend_from_slice(&head.buf[a]);
                out.extend_from_slice(b"\r\n");
                continue;
            }
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !host_seen {
        out.extend_from_slice(b"Host: ");
        if let Some(a) = req.authority.clone() {
            out.extend_from_slice(&head.buf[a]);
        }
        out.extend_from_slice(b"\r\n");
    }
    if !xff_seen {
        out.extend_from_slice(b"X-Forwarded-For: ");
        push_ip(out, client_ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(match scheme {
        Scheme::Http => b"X-Forwarded-Proto: http\r\n".as_slice(),
        Scheme::Https => b"X-Forwarded-Proto: https\r\n",
    });
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    push_framing(out, OutFraming::from_request(req.framing()));
    out.extend_from_slice(b"\r\n");
}

/// The client's IP, or `unix` for a client on a Unix-domain listener.
fn push_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    use std::io::Write;
    match ip {
        // Dotted decimal by hand: `Display` for an address goes through
        // the formatter's padding machinery, about 500 instructions of a
        // small request's 15,000.
        Some(IpAddr::V4(v4)) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_octet(out, octet);
            }
        }
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
        None => out.extend_from_slice(b"unix"),
    }
}

/// One byte in decimal, without leading zeros.
fn push_octet(out: &mut Vec<u8>, n: u8) {
    if n >= 100 {
        out.push(b'0' + n / 100);
    }
    if n >= 10 {
        out.push(b'0' + n / 10 % 10);
    }
    out.push(b'0' + n % 10);
}

/// What the response says about the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnHeader {
    /// Nothing (HTTP/1.1 keep-alive is the default).
    Default,
    /// `Connection: keep-alive` (HTTP/1.0 client that asked for it).
    KeepAlive,
    /// `Connection: close`.
    Close,
    /// `Connection: upgrade` (101 to a tunnel).
    Upgrade,
}

/// Writes the response head sent to a client: hop-by-hop fields removed,
/// framing written from `framing`, Connection from `conn`.
pub fn response_head(out: &mut Vec<u8>, resp: &ResponseHead, framing: OutFraming, conn: ConnHeader) {
    let head = &resp.head;
    out.extend_from_slice(b"HTTP/1.1 ");
    push_num(out, resp.status as u64);
    out.push(b' ');
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let lists = ConnectionLists::of(head);
    for (name, value) in head.iter() {
        // A response without a body (HEAD, 304) keeps the length fields of
        // the representation it describes.
        let length_field =
            name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding");
        if skip_field(head, &lists, name, conn == ConnHeader::Upgrade) && !(framing == OutFraming::None && length_field)
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    push_framing(out, framing);
    push_conn(out, conn);
    out.extend_from_slice(b"\r\n");
}

fn push_conn(out: &mut Vec<u8>, conn: ConnHeader) {
    match conn {
        ConnHeader::Default => {}
        ConnHeader::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        ConnHeader::Close => out.extend_from_slice(b"Connection: close\r\n"),
        ConnHeader::Upgrade => out.extend_from_slice(b"Connection: upgrade\r\n"),
    }
}

/// Writes a complete response generated by Pitcher itself, with a short
/// text body (none for HEAD requests), `extra` header lines (each ending in
/// CRLF) and the Connection field.
/// Returns the body bytes written.
pub fn local_response(out: &mut Vec<u8>, status: u16, extra: &[u8], conn: ConnHeader, head_request: bool) -> usize {
    let reason = reason(status);
    out.extend_from_slice(b"HTTP/1.1 ");
    push_num(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nServer: pitcher\r\nContent-Type: text/plain\r\n");
    out.extend_from_slice(extra);
    let body_len = 3 + 1 + reason.len() + 1;
    push_framing(out, OutFraming::Length(body_len as u64));
    push_conn(out, conn);
    out.extend_from_slice(b"\r\n");
    if head_request {
        return 0;
    }
    push_num(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.push(b'\n');
    body_len
}

/// Writes a complete response made by a module: its header fields and
/// body (Pitcher's short text body for the status when `body` is empty).
/// Returns the body bytes written. Written straight into `out` (no
/// allocation: a refusal under overload is this path).
pub fn module_response(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    conn: ConnHeader,
    head_request: bool,
) -> usize {
    let reason = reason(status);
    out.extend_from_slice(b"HTTP/1.1 ");
    push_num(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nServer: pitcher\r\n");
    // Pitcher's own text body is text/plain; a module's body is unless
    // the module says otherwise.
    if body.is_empty() || !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
        out.extend_from_slice(b"Content-Type: text/plain\r\n");
    }
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body_len = if body.is_empty() { 3 + 1 + reason.len() + 1 } else { body.len() };
    push_framing(out, OutFraming::Length(body_len as u64));
    push_conn(out, conn);
    out.extend_from_slice(b"\r\n");
    if head_request {
        return 0;
    }
    if body.is_empty() {
        push_num(out, status as u64);
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.push(b'\n');
    } else {
        out.extend_from_slice(body);
    }
    body_len
}

/// The head of a chunk of `n` bytes in a re-framed body.
pub fn chunk_head(out: &mut Vec<u8>, n: usize) {
    use std::io::Write;
    let _ = write!(out, "{n:x}\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_in_dotted_decimal_as_display_writes_it() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "1.100.9.99", "192.168.0.200"] {
            let mut out = Vec::new();
            super::push_ip(&mut out, Some(ip.parse().unwrap()));
            assert_eq!(String::from_utf8(out).unwrap(), ip);
        }
        let mut out = Vec::new();
        super::push_ip(&mut out, Some("::1".parse().unwrap()));
        assert_eq!(out, b"::1");
    }

    #[test]
    fn module_responses_are_written_whole() {
        let h = |n: &str, v: &str| (n.to_string(), v.to_string());
        // No body: Pitcher's text body, the module's fields after its own.
        let mut out = Vec::new();
        let n = module_response(&mut out, 503, &[h("Retry-After", "1")], b"", ConnHeader::Default, false);
        let mut want = Vec::new();
        local_response(&mut want, 503, b"Retry-After: 1\r\n", ConnHeader::Default, false);
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want));
        assert_eq!(n, "503 Service Unavailable\n".len());
        // A body: its length; text/plain unless the module names a type.
        let mut out = Vec::new();
        let n = module_response(&mut out, 200, &[h("content-type", "a/b")], b"hello", ConnHeader::Close, false);
        assert_eq!(n, 5);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nServer: pitcher\r\ncontent-type: a/b\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        let mut out = Vec::new();
        assert_eq!(module_response(&mut out, 429, &[], b"slow", ConnHeader::Default, true), 0);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 429 Too Many Requests\r\nServer: pitcher\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\n"
        );
    }

    #[test]
    fn request_head_rewrites_hop_by_hop_and_forwarding() {
        let mut r = RequestHead::default();
        let raw = b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, X-Secret, Host\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n";
        r.parse(raw, 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, Some("127.0.0.1".parse().unwrap()), Scheme::Http, false);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "GET /x HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 1.2.3.4, 127.0.0.1\r\nAccept: */*\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
    }

    #[test]
    fn every_name_of_many_connection_fields_is_stripped() {
        // Six Connection fields: more than the lists gathered at once.
        let mut raw = b"GET /x HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        for i in 0..6 {
            raw.extend_from_slice(format!("Connection: X-H{i}\r\nX-H{i}: secret\r\n").as_bytes());
        }
        raw.extend_from_slice(b"Accept: */*\r\n\r\n");
        let mut r = RequestHead::default();
        r.parse(&raw, 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, None, Scheme::Http, false);
        let s = String::from_utf8(out).unwrap();
        assert!(!s.contains("secret") && !s.contains("X-H"), "{s}");
        assert!(s.contains("Accept: */*\r\n"), "{s}");
    }

    #[test]
    fn request_head_over_tls_says_https_whatever_the_client_sent() {
        let mut r = RequestHead::default();
        r.parse(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\n\r\n", 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, None, Scheme::Https, false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("\r\nX-Forwarded-Proto: https\r\n"), "{s}");
        assert_eq!(s.matches("X-Forwarded-Proto").count(), 1, "{s}");
    }

    #[test]
    fn request_head_host_from_absolute_form_or_empty() {
        let mut r = RequestHead::default();
        r.parse(b"GET http://Up.Example:81/p?q HTTP/1.1\r\nHost: spoofed\r\nX-A: 1\r\n\r\n", 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, None, Scheme::Http, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q HTTP/1.1\r\nHost: Up.Example:81\r\nX-A: 1\r\nX-Forwarded-For: unix\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
        r.parse(b"GET http://a.example/ HTTP/1.1\r\n\r\n", 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, None, Scheme::Http, false);
        assert!(String::from_utf8(out).unwrap().contains("\r\nHost: a.example\r\n"));
        r.parse(b"GET / HTTP/1.0\r\n\r\n", 100).unwrap().unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &r, None, Scheme::Http, false);
        assert!(String::from_utf8(out).unwrap().starts_with("GET / HTTP/1.1\r\nHost: \r\nX-Forwarded-For: unix\r\n"));
    }

    #[test]
    fn response_head_reframes() {
        let mut r = ResponseHead::default();
        r.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close, X-Drop\r\nX-Drop: y\r\nKeep-Alive: t=5\r\nX-Keep: z\r\n\r\n", 100).unwrap();
        let mut out = Vec::new();
        response_head(&mut out, &r, OutFraming::Length(5), ConnHeader::Default);
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 200 OK\r\nX-Keep: z\r\nContent-Length: 5\r\n\r\n");
    }

    #[test]
    fn local_response_has_length() {
        let mut out = Vec::new();
        local_response(&mut out, 502, b"", ConnHeader::Close, false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(s.ends_with("\r\nContent-Length: 16\r\nConnection: close\r\n\r\n502 Bad Gateway\n"), "{s}");
    }
}
