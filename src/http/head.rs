//! Request and response heads, parsed with `httparse` and kept as byte
//! ranges into an owned copy of the head (hyper's idea): the head outlives
//! the read buffer it came from, and hooks can edit it without re-parsing.
//!
//! Owns: head parsing (incremental: each read examines only the new
//! bytes), the framing decision of RFC 9112 §6, the refusal of ambiguous
//! framing and of requests that origins could read differently (method
//! case, fragments, invalid hosts, `_` twins of fields proxies act on),
//! and the normalised path that routing matches. Must not: do I/O.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::{path, HttpError};

/// A header field as ranges into [`Head::buf`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Where the name is in the head's bytes.
    pub name: Range<usize>,
    /// Where the value is (trimmed).
    pub value: Range<usize>,
}

/// HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// The parts of a head common to requests and responses.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// The head's bytes; ranges point into it. Edits append to it.
    pub buf: Vec<u8>,
    /// The header fields, in order.
    pub fields: Vec<Field>,
}

impl Head {
    /// Empties the head for reuse.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.fields.clear();
    }

    /// The name of field `f`.
    pub fn name(&self, f: &Field) -> &[u8] {
        &self.buf[f.name.clone()]
    }

    /// The value of field `f`.
    pub fn value(&self, f: &Field) -> &[u8] {
        &self.buf[f.value.clone()]
    }

    /// Iterates over (name, value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| (&self.buf[f.name.clone()], &self.buf[f.value.clone()]))
    }

    /// First value of a header, by case-insensitive name.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// Removes every field with this name.
    pub fn remove(&mut self, name: &str) {
        let buf = &self.buf;
        self.fields.retain(|f| !buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()));
    }

    /// Appends a field.
    pub fn append(&mut self, name: &str, value: &[u8]) {
        let n0 = self.buf.len();
        self.buf.extend_from_slice(name.as_bytes());
        let v0 = self.buf.len();
        self.buf.extend_from_slice(value);
        self.fields.push(Field { name: n0..v0, value: v0..self.buf.len() });
    }

    /// Replaces every field with this name by one field.
    pub fn set(&mut self, name: &str, value: &[u8]) {
        self.remove(name);
        self.append(name, value);
    }

    /// Copies parsed httparse headers, recording their ranges.
    fn copy_fields(&mut self, raw: &[u8], headers: &[httparse::Header<'_>]) -> Result<(), HttpError> {
        let base = raw.as_ptr() as usize;
        let off = self.buf.len();
        self.buf.extend_from_slice(raw);
        for h in headers {
            let n = h.name.as_ptr() as usize - base + off;
            let v = h.value.as_ptr() as usize - base + off;
            // httparse allows obs-text and HTAB in values; controls were refused
            // by it already, but NUL and other CTLs are refused here to be sure.
            // (A fold without early exit: the compiler vectorises it.)
            if h.value.iter().fold(false, |bad, &b| bad | (b < 0x20) & (b != b'\t') | (b == 0x7f)) {
                return Err(HttpError::BadHeader);
            }
            self.fields.push(Field { name: n..n + h.name.len(), value: v..v + h.value.len() });
        }
        Ok(())
    }

    /// Framing from Content-Length / Transfer-Encoding (RFC 9112 §6),
    /// refusing ambiguity: both present, differing lengths, lengths that
    /// are not plain decimals, a malformed coding list, or a list whose
    /// only coding is not exactly `chunked`.
    ///
    /// Requests: `chunked` alone is the one transfer coding Pitcher
    /// implements; a list of well-formed codings that is anything else is
    /// refused with 501, a malformed one (empty elements, parameters,
    /// `chunked` twice or not last) with 400. Responses: `chunked` alone,
    /// else the response is refused (a backend may not apply codings the
    /// request's TE did not offer, and Pitcher sends no TE).
    fn body_framing(&self, is_request: bool) -> Result<Framing, HttpError> {
        let mut length: Option<u64> = None;
        let mut te = TransferCodings::default();
        for (name, value) in self.iter() {
            if name.eq_ignore_ascii_case(b"content-length") {
                for part in value.split(|&b| b == b',') {
                    let n = parse_decimal(trim(part)).ok_or(HttpError::BadContentLength)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(HttpError::BadContentLength);
                    }
                    length = Some(n);
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te.add(value);
            }
        }
        match (te.seen, length) {
            (true, Some(_)) => Err(HttpError::LengthAndChunked),
            (true, None) => {
                if te.malformed || te.chunked > 1 || (te.chunked == 1 && !te.last_chunked) {
                    Err(HttpError::BadTransferEncoding)
                } else if te.codings == 1 && te.last_chunked {
                    Ok(Framing::Chunked)
                } else {
                    Err(HttpError::UnknownTransferEncoding)
                }
            }
            (false, Some(0)) if is_request => Ok(Framing::None),
            (false, Some(n)) => Ok(Framing::Length(n)),
            (false, None) if is_request => Ok(Framing::None),
            (false, None) => Ok(Framing::Close),
        }
    }

    /// Does a comma-separated header (e.g. Connection) list `token`?
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .any(|(_, v)| v.split(|&b| b == b',').any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes())))
    }
}

/// What the Transfer-Encoding fields of a message list, combined in order
/// (RFC 9110 §5.3).
#[derive(Debug, Default)]
struct TransferCodings {
    seen: bool,
    /// Well-formed codings listed.
    codings: usize,
    /// How many of them are `chunked` (case-insensitive, RFC 9112 §7).
    chunked: usize,
    last_chunked: bool,
    /// An element that is not a bare token: empty, with parameters, with
    /// spaces or other bytes inside.
    malformed: bool,
}

impl TransferCodings {
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for element in value.split(|&b| b == b',') {
            let c = trim(element);
            if c.is_empty() || !c.iter().all(|&b| is_tchar(b)) {
                self.malformed = true;
                continue;
            }
            let chunked = c.eq_ignore_ascii_case(b"chunked");
            self.codings += 1;
            self.chunked += usize::from(chunked);
            self.last_chunked = chunked;
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// The bytes and header fields.
    pub head: Head,
    /// Where the method is.
    pub method: Range<usize>,
    /// The request target in origin form (`/path?query`); absolute-form
    /// targets are normalised and their authority becomes the host.
    pub target: Range<usize>,
    /// The version (`None` until parsed).
    pub version: Option<Version>,
    /// Host, lower-cased, without port (from the target or the Host field).
    pub host: Range<usize>,
    /// The authority of an absolute-form target, as received: it replaces
    /// the Host field towards the backend (RFC 9112 §3.2.2).
    pub authority: Option<Range<usize>>,
    /// How the body is framed (`None` until parsed).
    pub framing: Option<Framing>,
    /// The normalised path ([`path::normalize`]) of the target, which
    /// routes and modules match. Kept from request to request, so its
    /// capacity is reused.
    norm: Vec<u8>,
    /// How far a head still arriving was examined ([`Self::parse_more`]).
    scan: HeadScan,
}

/// Where [`RequestHead::parse_more`] stopped examining a head that is not
/// complete yet.
#[derive(Debug, Clone, Copy, Default)]
struct HeadScan {
    /// Bytes at the front of the buffer already examined.
    scanned: usize,
    /// A byte other than the CR and LF of leading empty lines was seen
    /// (httparse skips those lines, RFC 9112 §2.2).
    started: bool,
    /// The request line ended (and was checked).
    line_ended: bool,
}

impl HeadScan {
    /// Examines the bytes of `raw` after `scanned` up to the next place
    /// where running the parser is worth it: the end of the request line
    /// (once) or an empty line (the end of the head). `Ok(false)`: none in
    /// the bytes there are. A bare LF is refused at once: `parse` refuses
    /// every head that holds one.
    fn next_stop(&mut self, raw: &[u8]) -> Result<bool, HttpError> {
        while let Some(&b) = raw.get(self.scanned) {
            self.scanned += 1;
            let i = self.scanned;
            if b != b'\n' {
                self.started |= b != b'\r';
                continue;
            }
            if i < 2 || raw[i - 2] != b'\r' {
                return Err(HttpError::BadRequest);
            }
            if !self.started {
                continue;
            }
            if !self.line_ended {
                self.line_ended = true;
                return Ok(true);
            }
            // CR LF CR LF; the first CR LF is after `started`, since the
            // byte that set it is neither.
            if raw[i - 4..i - 2] == *b"\r\n" {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl RequestHead {
    /// The method's bytes.
    pub fn method(&self) -> &[u8] {
        &self.head.buf[self.method.clone()]
    }
    /// The target's bytes, as received.
    pub fn target(&self) -> &[u8] {
        &self.head.buf[self.target.clone()]
    }
    /// The normalised path of the target ([`path::normalize`]: unreserved
    /// escapes decoded, slashes merged, dot-segments removed), which routes
    /// and route-scoped modules match. The target, as received, is what
    /// the backend gets unless `normalize_upstream_path` is set.
    pub fn path(&self) -> &[u8] {
        &self.norm
    }
    /// Path part of the target (before `?`), as received.
    pub fn raw_path(&self) -> &[u8] {
        let t = self.target();
        &t[..t.iter().position(|&b| b == b'?').unwrap_or(t.len())]
    }
    /// The host, lower case, without port (from the target or `Host`).
    pub fn host(&self) -> &[u8] {
        &self.head.buf[self.host.clone()]
    }
    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version.unwrap_or(Version::Http11)
    }
    /// How the body is framed.
    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or(Framing::None)
    }
    /// Is the method HEAD (a response without a body)?
    pub fn is_head(&self) -> bool {
        self.method() == b"HEAD"
    }

    /// Does the client want the connection kept open after this exchange?
    pub fn keep_alive(&self) -> bool {
        match self.version() {
            Version::Http11 => !self.head.has_token("connection", "close"),
            Version::Http10 => self.head.has_token("connection", "keep-alive"),
        }
    }

    /// Sets the target (used by rewriting hooks) and its normalised path.
    /// A target whose path cannot be normalised (it climbs above `/`, or
    /// has a malformed escape) keeps its path as given: it came from the
    /// configuration, not from the client.
    pub fn set_target(&mut self, target: &[u8]) {
        let t0 = self.head.buf.len();
        self.head.buf.extend_from_slice(target);
        self.target = t0..self.head.buf.len();
        self.normalize_path().unwrap_or_else(|_| {
            let raw = self.raw_path().to_vec();
            self.norm.clear();
            self.norm.extend_from_slice(&raw);
        });
    }

    /// Replaces the path of the target by the normalised path, keeping the
    /// query as received (`normalize_upstream_path = true`).
    pub fn use_normalized_target(&mut self) {
        let t = self.target.clone();
        let query = t.start + self.raw_path().len()..t.end;
        let t0 = self.head.buf.len();
        self.head.buf.extend_from_slice(&self.norm);
        self.head.buf.extend_from_within(query);
        self.target = t0..self.head.buf.len();
    }

    fn normalize_path(&mut self) -> Result<(), HttpError> {
        let t = self.target.clone();
        let end = t.start + self.raw_path().len();
        path::normalize(&self.head.buf[t.start..end], &mut self.norm)
    }

    /// Forgets the head, and where the scan of the next one stands (a
    /// session's head is reused by the next connection).
    pub fn clear(&mut self) {
        self.head.clear();
        self.norm.clear();
        self.scan = HeadScan::default();
    }

    /// [`parse`](Self::parse) for a head that arrives in pieces: `raw` is
    /// the buffer of the previous call with bytes added at its end, or a
    /// new head after the previous one was complete or refused. Only the
    /// new bytes are examined, for the end of the request line and of the
    /// head; httparse runs once when the request line ends (a bad one is
    /// refused without waiting for the rest), when the head is complete,
    /// and when the caller can read no more (`full`). A head sent a byte at
    /// a time thus costs linear time, not quadratic.
    pub fn parse_more(&mut self, raw: &[u8], max_headers: usize, full: bool) -> Result<Option<usize>, HttpError> {
        if raw.len() < self.scan.scanned {
            self.scan = HeadScan::default();
        }
        let r = self.scan_and_parse(raw, max_headers, full);
        if !matches!(r, Ok(None)) {
            self.scan = HeadScan::default();
        }
        r
    }

    fn scan_and_parse(&mut self, raw: &[u8], max_headers: usize, full: bool) -> Result<Option<usize>, HttpError> {
        while self.scan.next_stop(raw)? {
            if let Some(n) = self.parse(raw, max_headers)? {
                return Ok(Some(n));
            }
        }
        if full {
            return self.parse(raw, max_headers);
        }
        Ok(None)
    }

    /// Parses a request head at the front of `raw`.
    /// `Ok(None)`: incomplete. `Ok(Some(n))`: the head is `raw[..n]`.
    pub fn parse(&mut self, raw: &[u8], max_headers: usize) -> Result<Option<usize>, HttpError> {
        // Uninitialised slots: httparse writes those it fills, so a parse
        // does not first clear 256 x 32 bytes (a tenth of a small
        // request's instructions).
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_PARSE_HEADERS];
        let headers = &mut storage[..max_headers.min(MAX_PARSE_HEADERS)];
        let mut req = httparse::Request::new(&mut []);
        let n = match req.parse_with_uninit_headers(raw, headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
            Err(httparse::Error::Version) => return Err(HttpError::BadVersion),
            Err(_) => return Err(HttpError::BadRequest),
        };
        self.head.clear();
        // Refuse bare LF line ends: httparse accepts them, RFC 9112 lets a
        // proxy refuse them, and a backend may read them differently.
        if has_bare_lf(&raw[..n]) {
            return Err(HttpError::BadRequest);
        }
        let method = req.method.ok_or(HttpError::BadRequest)?;
        let target = req.path.ok_or(HttpError::BadRequest)?;
        // Methods are case-sensitive (RFC 9110 §9.1), but some origins
        // upper-case them: `get` must not reach one as a method other than
        // the one modules and logs saw.
        if method.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(HttpError::BadMethod);
        }
        // A fragment is never sent (RFC 9112 §3.2); origins differ on
        // whether `#` ends the path.
        if target.contains('#') {
            return Err(HttpError::BadTarget);
        }
        let version = match req.version {
            Some(1) => Version::Http11,
            Some(0) => Version::Http10,
            _ => return Err(HttpError::BadVersion),
        };
        let base = raw.as_ptr() as usize;
        let m = method.as_ptr() as usize - base;
        let t = target.as_ptr() as usize - base;
        self.method = m..m + method.len();
        self.target = t..t + target.len();
        self.version = Some(version);
        self.head.copy_fields(&raw[..n], req.headers)?;
        if self.head.fields.iter().any(|f| is_underscore_twin(self.head.name(f))) {
            return Err(HttpError::UnderscoreHeader);
        }

        // Host: from an absolute-form target, else from the Host field.
        self.authority = None;
        let tgt = &self.head.buf[self.target.clone()];
        let scheme_len = if starts_with_ignore_case(tgt, b"http://") {
            7
        } else if starts_with_ignore_case(tgt, b"https://") {
            8
        } else {
            0
        };
        if scheme_len > 0 {
            let rest = &tgt[scheme_len..];
            let auth_len = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
            if auth_len == 0 {
                return Err(HttpError::BadRequest);
            }
            let a0 = self.target.start + scheme_len;
            self.authority = Some(a0..a0 + auth_len);
            let path0 = a0 + auth_len;
            if path0 == self.target.end || self.head.buf[path0] == b'?' {
                // "http://h" or "http://h?q": origin form needs a "/".
                let q = self.head.buf[path0..self.target.end].to_vec();
                let mut t = b"/".to_vec();
                t.extend_from_slice(&q);
                self.set_target(&t);
            } else {
                self.target = path0..self.target.end;
            }
        } else if !(tgt.starts_with(b"/") || (tgt == b"*" && self.method() == b"OPTIONS")) {
            return Err(HttpError::BadRequest);
        }
        let mut host_fields = self.head.fields.iter().filter(|f| self.head.name(f).eq_ignore_ascii_case(b"host"));
        let host_field = host_fields.next().map(|f| f.value.clone());
        if host_fields.next().is_some() {
            return Err(HttpError::BadRequest);
        }
        let host = match (self.authority.clone(), host_field) {
            (Some(h), Some(field)) => {
                // The authority wins (RFC 9112 §3.2.2), but a Host field an
                // origin could read differently is refused all the same.
                host_part(&self.head.buf, field)?;
                h
            }
            (Some(h), None) => h,
            (None, Some(h)) => h,
            (None, None) if version == Version::Http10 => 0..0,
            (None, None) => return Err(HttpError::MissingHost),
        };
        self.host = normalise_host(&mut self.head.buf, host)?;
        let framing = self.head.body_framing(true)?;
        // RFC 9112 §6.1: the framing of an HTTP/1.0 message with
        // Transfer-Encoding is faulty (1.0 has no chunked coding).
        if version == Version::Http10 && self.head.get("transfer-encoding").is_some() {
            return Err(HttpError::BadTransferEncoding);
        }
        self.framing = Some(framing);
        self.normalize_path()?;
        Ok(Some(n))
    }
}

/// A parsed response head.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    /// The bytes and header fields.
    pub head: Head,
    /// The status code.
    pub status: u16,
    /// Where the reason phrase is.
    pub reason: Range<usize>,
    /// The version (`None` until parsed).
    pub version: Option<Version>,
}

impl ResponseHead {
    /// The reason phrase's bytes.
    pub fn reason(&self) -> &[u8] {
        &self.head.buf[self.reason.clone()]
    }

    /// Parses a response head at the front of `raw`.
    pub fn parse(&mut self, raw: &[u8], max_headers: usize) -> Result<Option<usize>, HttpError> {
        // Uninitialised slots, as for a request.
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_PARSE_HEADERS];
        let headers = &mut storage[..max_headers.min(MAX_PARSE_HEADERS)];
        let mut resp = httparse::Response::new(&mut []);
        let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, raw, headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(HttpError::BadResponse),
        };
        self.head.clear();
        let code = resp.code.ok_or(HttpError::BadResponse)?;
        if !(100..=999).contains(&code) {
            return Err(HttpError::BadResponse);
        }
        self.status = code;
        self.version = Some(if resp.version == Some(0) { Version::Http10 } else { Version::Http11 });
        let reason = resp.reason.unwrap_or("");
        let base = raw.as_ptr() as usize;
        let r = if reason.is_empty() { 0 } else { reason.as_ptr() as usize - base };
        self.reason = r..r + reason.len();
        self.head.copy_fields(&raw[..n], resp.headers).map_err(|_| HttpError::BadResponse)?;
        Ok(Some(n))
    }

    /// Body framing of this response to a request (`head_request`: the
    /// request was HEAD). RFC 9112 §6.3.
    ///
    /// Every head is validated, also those that have no body (1xx, 204,
    /// 304, a response to HEAD): conflicting or malformed Content-Length
    /// and Transfer-Encoding make the response refused, as a downstream
    /// or a cache could frame it differently. 1xx and 204 must carry no
    /// Transfer-Encoding and no non-zero Content-Length (RFC 9110 §8.6,
    /// RFC 9112 §6.1).
    pub fn framing(&self, head_request: bool) -> Result<Framing, HttpError> {
        let framing = self.head.body_framing(false).map_err(|_| HttpError::BadResponse)?;
        if self.status < 200 || self.status == 204 {
            return match framing {
                Framing::Close | Framing::Length(0) => Ok(Framing::None),
                _ => Err(HttpError::BadResponse),
            };
        }
        if head_request || self.status == 304 {
            return Ok(Framing::None);
        }
        Ok(framing)
    }

    /// Will the backend keep the connection open after this response?
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Some(Version::Http10) => self.head.has_token("connection", "keep-alive"),
            _ => !self.head.has_token("connection", "close"),
        }
    }
}

/// Most header fields httparse is given room for.
pub const MAX_PARSE_HEADERS: usize = 256;

/// Copies the host of `r` (trimmed, port stripped, lower-cased, without a
/// final `.`) to the end of `buf` and returns its range; the field itself
/// is left as received.
fn normalise_host(buf: &mut Vec<u8>, r: Range<usize>) -> Result<Range<usize>, HttpError> {
    let mut h = host_part(buf, r)?;
    // "example.com." names the same host as "example.com" (nginx strips
    // the dot too): routes must match it.
    if h.len() > 1 && buf[h.end - 1] == b'.' {
        h.end -= 1;
    }
    let out = buf.len()..buf.len() + h.len();
    buf.extend_from_within(h);
    buf[out.clone()].make_ascii_lowercase();
    Ok(out)
}

/// The host in the Host field value or authority `buf[r]`: trimmed, its
/// port (digits, maybe none: RFC 3986 §3.2.3) removed, and checked, so that
/// no origin can read it as another host: an IP literal (hex digits, `:`
/// and `.` in brackets) or a name of unreserved characters without empty
/// labels (no `..`, no leading `.`). Empty is allowed (RFC 9112 §3.2).
fn host_part(buf: &[u8], r: Range<usize>) -> Result<Range<usize>, HttpError> {
    let h = trim(&buf[r]);
    let start = h.as_ptr() as usize - buf.as_ptr() as usize;
    let end = if h.starts_with(b"[") {
        let close = h.iter().position(|&b| b == b']').ok_or(HttpError::BadRequest)?;
        let inner = &h[1..close];
        if inner.is_empty() || !inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err(HttpError::BadRequest);
        }
        close + 1
    } else {
        let end = h.iter().position(|&b| b == b':').unwrap_or(h.len());
        let name = &h[..end];
        let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if !name.iter().all(|&b| ok(b)) || name.starts_with(b".") || name.windows(2).any(|w| w == b"..") {
            return Err(HttpError::BadRequest);
        }
        end
    };
    let port = &h[end..];
    if !port.is_empty() && (port[0] != b':' || !port[1..].iter().all(u8::is_ascii_digit)) {
        return Err(HttpError::BadRequest);
    }
    Ok(start..start + end)
}

/// Fields that proxies and origins act on, and whose `-` a CGI or WSGI
/// origin maps to `_` (`HTTP_TRANSFER_ENCODING`): a client's
/// `Transfer_Encoding` would be merged with, or replace, the real one
/// there. Names without `-` (Connection, Upgrade, TE, Trailer, Host) have
/// no such twin.
const UNDERSCORE_PROTECTED: [&[u8]; 7] = [
    b"content-length",
    b"transfer-encoding",
    b"keep-alive",
    b"proxy-connection",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-request-id",
];

/// Does `name` contain `_` and differ from a protected field name only by
/// `_` for `-` (and case)? Such requests are refused with 400 rather than
/// forwarded without the field (nginx's `underscores_in_headers off`
/// drops them silently): no client has a reason to send one, and a refusal
/// is visible in the access log.
fn is_underscore_twin(name: &[u8]) -> bool {
    name.contains(&b'_')
        && UNDERSCORE_PROTECTED.iter().any(|p| {
            p.len() == name.len()
                && p.iter().zip(name).all(|(&p, &n)| p == n.to_ascii_lowercase() || (p == b'-' && n == b'_'))
        })
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn has_bare_lf(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
}

/// `s` without leading and trailing spaces and tabs.
pub fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map(|i| i + 1).unwrap_or(start);
    &s[start..end.max(start)]
}

/// A plain decimal of at most 18 digits (no sign, no spaces inside).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &d| n * 10 + (d - b'0') as u64))
}

/// RFC 9110 token character.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
        let mut r = RequestHead::default();
        Ok(r.parse(raw, 100)?.map(|n| (r, n)))
    }

    #[test]
    fn parses_at_every_split() {
        let raw = b"POST http://Example.COM:8080/a/b?x=1 HTTP/1.1\r\nHost: ignored\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        let head_len = raw.len() - 5;
        for split in 0..head_len {
            assert!(parse(&raw[..split]).unwrap().is_none(), "split {split}");
        }
        let (r, n) = parse(raw).unwrap().unwrap();
        assert_eq!(n, head_len);
        assert_eq!(r.method(), b"POST");
        assert_eq!(r.target(), b"/a/b?x=1");
        assert_eq!(r.path(), b"/a/b");
        assert_eq!(r.host(), b"example.com");
        assert_eq!(r.framing(), Framing::Length(5));
        assert_eq!(r.head.get("x-a"), Some(&b"b"[..]));
    }

    #[test]
    fn host_field_port_and_case() {
        let (r, _) = parse(b"GET / HTTP/1.1\r\nHost: WWW.Example.com:81\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.host(), b"www.example.com");
        assert!(r.keep_alive());
        let (r, _) = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive());
        assert_eq!(r.host(), b"");
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let cases: &[(&[u8], HttpError)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", HttpError::BadContentLength),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", HttpError::UnknownTransferEncoding),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (b"GET / HTTP/1.1\r\n\r\n", HttpError::MissingHost),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", HttpError::BadRequest),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", HttpError::UnknownTransferEncoding),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HttpError::UnknownTransferEncoding,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chun ked\r\n\r\n", HttpError::BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;x=1\r\n\r\n", HttpError::BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", HttpError::BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n", HttpError::BadTransferEncoding),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HttpError::BadTransferEncoding),
            (b"GET / HTTP/1.1\r\nHost: a:x\r\n\r\n", HttpError::BadRequest),
            (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadRequest),
            (b"GET http://u@a/x HTTP/1.1\r\n\r\n", HttpError::BadRequest),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw).unwrap_err(), *want, "{}", String::from_utf8_lossy(raw));
        }
        let (r, _) = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.framing(), Framing::Length(3));
        let (r, _) = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.framing(), Framing::Chunked);
    }

    #[test]
    fn absolute_form_authority_replaces_host() {
        let (r, _) = parse(b"GET HTTPS://Example.COM:8443?q HTTP/1.1\r\nHost: other\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.target(), b"/?q");
        assert_eq!(r.host(), b"example.com");
        assert_eq!(&r.head.buf[r.authority.clone().unwrap()], b"Example.COM:8443");
        let (r, _) = parse(b"GET /x HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.host(), b"[::1]");
        assert!(r.authority.is_none());
    }

    /// Feeds `raw` to `parse_more` `step` bytes at a time, as reads would.
    fn feed(r: &mut RequestHead, raw: &[u8], step: usize) -> Result<Option<usize>, HttpError> {
        let mut end = 0;
        loop {
            end = (end + step).min(raw.len());
            match r.parse_more(&raw[..end], 100, false)? {
                Some(n) => return Ok(Some(n)),
                None if end == raw.len() => return Ok(None),
                None => {}
            }
        }
    }

    #[test]
    fn incremental_parse_agrees_with_whole_parse_at_every_split() {
        let raw = b"\r\nPOST http://Example.COM:8080/a//b/../c?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        let (whole, n) = parse(raw).unwrap().unwrap();
        for step in 1..raw.len() {
            let mut r = RequestHead::default();
            assert_eq!(feed(&mut r, raw, step), Ok(Some(n)), "step {step}");
            assert_eq!((r.method(), r.target(), r.path()), (whole.method(), whole.target(), whole.path()));
            assert_eq!((r.host(), r.framing()), (whole.host(), whole.framing()));
            assert_eq!(r.path(), b"/a/c");
            // Split in two at every byte too.
            let mut r = RequestHead::default();
            let first = r.parse_more(&raw[..step], 100, false).unwrap();
            let got = first.or_else(|| r.parse_more(raw, 100, false).unwrap());
            assert_eq!(got, Some(n), "split {step}");
        }
    }

    #[test]
    fn incremental_parse_examines_each_byte_once_and_resets_after_a_head() {
        let raw = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
        let mut r = RequestHead::default();
        for end in 1..=27 {
            assert_eq!(r.parse_more(&raw[..end], 100, false), Ok(None), "{end}");
            assert_eq!(r.scan.scanned, end, "every new byte is examined, no old one again");
        }
        assert_eq!(r.parse_more(&raw[..40], 100, false), Ok(Some(28)));
        assert_eq!(r.path(), b"/a");
        // The next head starts at the front of the buffer again.
        assert_eq!(r.scan.scanned, 0);
        assert_eq!(r.parse_more(&raw[28..], 100, false), Ok(Some(28)));
        assert_eq!(r.path(), b"/b");
        // A session's head, reused for another connection, starts afresh.
        r.parse_more(b"GET /c HTTP/1.1\r\nHo", 100, false).unwrap();
        r.clear();
        assert_eq!(r.parse_more(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n", 100, false), Ok(Some(28)));
    }

    #[test]
    fn incremental_parse_refuses_early_and_parses_a_full_buffer() {
        let mut r = RequestHead::default();
        // A bare LF is refused as soon as it arrives.
        assert_eq!(r.parse_more(b"GET / HTTP/1.1\nHo", 100, false), Err(HttpError::BadRequest));
        // A bad request line is refused when it ends, without the rest.
        assert_eq!(r.parse_more(b"GET / HTTP/1.1\r", 100, false), Ok(None));
        assert_eq!(r.parse_more(b"GET / HTTP/1.1\r\nX", 100, false), Ok(None));
        let mut r = RequestHead::default();
        assert_eq!(r.parse_more(b"GET / HTTP/3.0\r\nX", 100, false), Err(HttpError::BadVersion));
        let mut r = RequestHead::default();
        assert_eq!(r.parse_more(b"get / HTTP/1.1\r\n", 100, false), Ok(None), "checked once complete");
        assert_eq!(r.parse_more(b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 100, false), Err(HttpError::BadMethod));
        // A full buffer without the end of the head: httparse judges it.
        let mut r = RequestHead::default();
        assert_eq!(r.parse_more(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b", 100, true), Ok(None));
        let mut r = RequestHead::default();
        assert_eq!(r.parse_more(b"GET / HTTP/1.1\r\nHost: h\r\nX A: b", 100, true), Err(HttpError::BadRequest));
    }

    #[test]
    fn requests_origins_read_differently_are_refused() {
        let cases: &[(&[u8], HttpError)] = &[
            (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadMethod),
            (b"Get / HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadMethod),
            (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            (b"GET /a?q#b HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            (b"GET http://a/x#y HTTP/1.1\r\n\r\n", HttpError::BadTarget),
            (b"GET /../x HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            (b"GET /a/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            (b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            // Invalid Host values, in origin and in absolute form.
            (b"GET http://a/x HTTP/1.1\r\nHost: b c\r\n\r\n", HttpError::BadRequest),
            (b"GET http://a/x HTTP/1.1\r\nHost: a:x\r\n\r\n", HttpError::BadRequest),
            (b"GET http://a/x HTTP/1.1\r\nHost: a/b\r\n\r\n", HttpError::BadRequest),
            (b"GET http://a/x HTTP/1.1\r\nHost: u@a\r\n\r\n", HttpError::BadRequest),
            (b"GET http://a/x HTTP/1.1\r\nHost: a,b\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: .a\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: [a@b]\r\n\r\n", HttpError::BadRequest),
            (b"GET / HTTP/1.1\r\nHost: a?b\r\n\r\n", HttpError::BadRequest),
            (b"GET http://a%2fb/x HTTP/1.1\r\n\r\n", HttpError::BadRequest),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw).map(|_| ()).unwrap_err(), *want, "{}", String::from_utf8_lossy(raw));
        }
        // Accepted: upper-case extension methods, names with "_" and "~",
        // a final dot (dropped for routing), IP literals.
        for (raw, host) in [
            (&b"M-SEARCH / HTTP/1.1\r\nHost: my_host.example~1\r\n\r\n"[..], &b"my_host.example~1"[..]),
            (b"GET / HTTP/1.1\r\nHost: Example.COM.:80\r\n\r\n", b"example.com"),
            (b"GET http://[::1]:8/ HTTP/1.1\r\nHost: [::1]\r\n\r\n", b"[::1]"),
            (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", b""),
        ] {
            let (r, _) = parse(raw).unwrap().unwrap();
            assert_eq!(r.host(), host, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn underscore_twins_of_protected_fields_are_refused() {
        for name in [
            "Transfer_Encoding",
            "content_length",
            "Keep_Alive",
            "Proxy_Connection",
            "Proxy-Connection",
            "X_Forwarded_For",
            "X-Forwarded_Proto",
            "x_request_id",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{name}: 1\r\n\r\n");
            let got = parse(raw.as_bytes()).map(|_| ());
            if name.contains('_') {
                assert_eq!(got, Err(HttpError::UnderscoreHeader), "{name}");
            } else {
                assert_eq!(got, Ok(()), "{name}");
            }
        }
        // Other names with "_" pass, and so do protected names written right.
        for name in ["X_Custom", "Content_Type", "Transfer_Encodings", "Content-Length_", "Connection", "TE"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{name}: 0\r\n\r\n");
            assert!(parse(raw.as_bytes()).is_ok(), "{name}");
        }
    }

    #[test]
    fn path_is_normalised_and_the_target_kept_unless_asked() {
        let (mut r, _) = parse(b"GET //x/./%2e%2E/%61dmin/%2f?a=/../b HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.path(), b"/admin/%2F");
        assert_eq!(r.raw_path(), b"//x/./%2e%2E/%61dmin/%2f");
        assert_eq!(r.target(), b"//x/./%2e%2E/%61dmin/%2f?a=/../b");
        r.use_normalized_target();
        assert_eq!(r.target(), b"/admin/%2F?a=/../b");
        // A rewrite by a module is normalised too.
        r.set_target(b"/a/../b?q");
        assert_eq!(r.path(), b"/b");
        r.set_target(b"/../c");
        assert_eq!(r.path(), b"/../c", "not normalisable: kept as the module gave it");
        let (r, _) = parse(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.path(), b"*");
        let (r, _) = parse(b"GET http://h HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.path(), b"/");
    }

    #[test]
    fn the_normalised_path_reuses_its_buffer() {
        let mut r = RequestHead::default();
        let raw = b"GET /a/b/../c/d HTTP/1.1\r\nHost: h\r\n\r\n";
        r.parse_more(raw, 100, false).unwrap();
        let (ptr, cap) = (r.norm.as_ptr(), r.norm.capacity());
        for _ in 0..3 {
            r.parse_more(b"GET /x//y HTTP/1.1\r\nHost: h\r\n\r\n", 100, false).unwrap();
            assert_eq!(r.path(), b"/x/y");
            assert_eq!((r.norm.as_ptr(), r.norm.capacity()), (ptr, cap));
        }
    }

    #[test]
    fn response_framing() {
        let mut r = ResponseHead::default();
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        for split in 0..raw.len() {
            assert!(r.parse(&raw[..split], 100).unwrap().is_none());
        }
        assert_eq!(r.parse(raw, 100).unwrap(), Some(raw.len()));
        assert_eq!(r.framing(false).unwrap(), Framing::Length(10));
        assert_eq!(r.framing(true).unwrap(), Framing::None);
        r.parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false).unwrap(), Framing::None);
        r.parse(b"HTTP/1.1 200 OK\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false).unwrap(), Framing::Close);
        r.parse(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false).unwrap(), Framing::Chunked);
        assert!(!r.keep_alive());
        r.parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false), Err(HttpError::BadResponse));
        r.parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false), Err(HttpError::BadResponse));
        // Heads without a body are validated all the same.
        for (raw, head_req) in [
            (&b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n"[..], false),
            (b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", true),
        ] {
            r.parse(raw, 100).unwrap();
            assert_eq!(r.framing(head_req), Err(HttpError::BadResponse), "{}", String::from_utf8_lossy(raw));
        }
        r.parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(false).unwrap(), Framing::None);
        r.parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 100).unwrap();
        assert_eq!(r.framing(true).unwrap(), Framing::None);
    }
}
