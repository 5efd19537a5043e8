//! HTTP/1.1 wire pieces shared by the test backend and the test client: a
//! buffered connection that reads heads, lines and bodies exactly, header
//! lists, and the body framing rules of RFC 9112 section 6.
//!
//! Written independently of Pitcher's own parser on purpose: a test must not
//! share the bugs of the code it checks. Strict where Pitcher's output is
//! judged (CRLF line ends, well-formed chunks), never lenient by guessing.

use std::io::{self, Read, Write};

/// How much one `read(2)` may bring in.
const READ_CHUNK: usize = 64 * 1024;

/// Largest head either side accepts before calling the peer broken.
pub const MAX_HEAD_BYTES: usize = 1 << 20;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Header fields in the order received, names as sent; look-ups ignore case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, one per field line.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// All field lines of `name` combined as RFC 9110 section 5.3 allows.
    pub fn joined(&self, name: &str) -> Option<String> {
        let all = self.get_all(name);
        if all.is_empty() {
            None
        } else {
            Some(all.join(", "))
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The comma-separated tokens of every `name` line, lower-cased.
    pub fn tokens(&self, name: &str) -> Vec<String> {
        self.get_all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Every field name, lower-cased, in order.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.to_ascii_lowercase()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits a head (ending in CRLF CRLF) into its start line and its fields.
/// Rejects bare LF line ends and lines without a colon.
pub fn parse_head(raw: &[u8]) -> io::Result<(String, Headers)> {
    let text = String::from_utf8_lossy(raw);
    let body =
        text.strip_suffix("\r\n\r\n").ok_or_else(|| invalid(format!("head does not end in CRLF CRLF: {text:?}")))?;
    let mut lines = body.split("\r\n");
    let start = lines.next().unwrap_or_default().to_string();
    if start.contains('\n') {
        return Err(invalid(format!("bare LF in start line: {start:?}")));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.contains('\n') || line.contains('\r') {
            return Err(invalid(format!("bare CR or LF in header line: {line:?}")));
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| invalid(format!("header line without ':': {line:?}")))?;
        if name.is_empty() || name.ends_with(' ') || name.ends_with('\t') {
            return Err(invalid(format!("bad header name in {line:?}")));
        }
        headers.push((name.to_string(), value.trim_matches([' ', '\t']).to_string()));
    }
    Ok((start, Headers(headers)))
}

/// How a message body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (HEAD, 1xx, 204, 304, or a request without length).
    None,
    Length(u64),
    Chunked,
    /// Response body delimited by the server closing the connection.
    Close,
}

/// Content-Length of a message: `Ok(None)` when absent, an error when the
/// values disagree or do not parse.
fn content_length(headers: &Headers) -> io::Result<Option<u64>> {
    let mut found: Option<u64> = None;
    for v in headers.get_all("content-length") {
        for part in v.split(',') {
            let n: u64 = part.trim().parse().map_err(|_| invalid(format!("bad Content-Length {v:?}")))?;
            if found.is_some_and(|f| f != n) {
                return Err(invalid(format!(
                    "conflicting Content-Length values: {:?}",
                    headers.get_all("content-length")
                )));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn is_chunked(headers: &Headers) -> io::Result<Option<bool>> {
    let codings = headers.tokens("transfer-encoding");
    match codings.last() {
        None => Ok(None),
        Some(last) if last == "chunked" => Ok(Some(true)),
        Some(_) => Ok(Some(false)),
    }
}

/// Framing of a request body.
pub fn request_framing(headers: &Headers) -> io::Result<Framing> {
    match is_chunked(headers)? {
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Err(invalid("request Transfer-Encoding does not end in chunked")),
        None => Ok(content_length(headers)?.map_or(Framing::None, Framing::Length)),
    }
}

/// Framing of a response body to a request with `method`.
pub fn response_framing(method: &str, status: u16, headers: &Headers) -> io::Result<Framing> {
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    match is_chunked(headers)? {
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Ok(Framing::Close),
        None => Ok(content_length(headers)?.map_or(Framing::Close, Framing::Length)),
    }
}

/// A stream with a read buffer: reads exactly what one message needs and
/// keeps the rest for the next one, so keep-alive connections stay usable.
pub struct BufConn<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
}

impl<S: Read + Write> BufConn<S> {
    pub fn new(stream: S) -> Self {
        BufConn { stream, buf: Vec::with_capacity(READ_CHUNK), pos: 0 }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// One `read(2)` appended to the buffer; 0 means end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let res = loop {
            match self.stream.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.buf.truncate(old + *res.as_ref().unwrap_or(&0));
        res
    }

    /// Reads one head up to and including CRLF CRLF. `Ok(None)` when the
    /// stream ends cleanly before its first byte.
    pub fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut searched = 0;
        loop {
            let avail = self.buffered();
            if let Some(i) = find(&avail[searched..], b"\r\n\r\n") {
                let end = searched + i + 4;
                let head = avail[..end].to_vec();
                self.consume(end);
                return Ok(Some(head));
            }
            searched = avail.len().saturating_sub(3);
            if avail.len() > MAX_HEAD_BYTES {
                return Err(invalid("head larger than MAX_HEAD_BYTES"));
            }
            if self.fill()? == 0 {
                return if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended inside a head: {:?}", String::from_utf8_lossy(self.buffered())),
                    ))
                };
            }
        }
    }

    /// Exactly `n` bytes.
    pub fn read_exact_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.buffered().is_empty() && self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {} of {n} body bytes", out.len()),
                ));
            }
            let take = (n - out.len()).min(self.buffered().len());
            out.extend_from_slice(&self.buffered()[..take]);
            self.consume(take);
        }
        Ok(out)
    }

    /// One CRLF-terminated line, without the CRLF.
    pub fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut searched = 0;
        loop {
            let avail = self.buffered();
            if let Some(i) = find(&avail[searched..], b"\r\n") {
                let end = searched + i;
                let line = avail[..end].to_vec();
                self.consume(end + 2);
                return Ok(line);
            }
            searched = avail.len().saturating_sub(1);
            if avail.len() > MAX_HEAD_BYTES {
                return Err(invalid("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a line"));
            }
        }
    }

    /// Everything up to the end of the stream.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let mut out = self.buffered().to_vec();
        self.consume(out.len());
        loop {
            let old = out.len();
            out.resize(old + READ_CHUNK, 0);
            match self.stream.read(&mut out[old..]) {
                Ok(0) => {
                    out.truncate(old);
                    return Ok(out);
                }
                Ok(n) => out.truncate(old + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => out.truncate(old),
                Err(e) => return Err(e),
            }
        }
    }

    /// Up to `max` bytes: what is buffered, else one read. Empty at EOF.
    pub fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        if self.buffered().is_empty() && self.fill()? == 0 {
            return Ok(Vec::new());
        }
        let take = max.min(self.buffered().len());
        let out = self.buffered()[..take].to_vec();
        self.consume(take);
        Ok(out)
    }

    /// A chunked body (RFC 9112 section 7.1): the data and the trailers.
    pub fn read_chunked(&mut self) -> io::Result<(Vec<u8>, Headers)> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8_lossy(&line).into_owned();
            let size_str = line.split(';').next().unwrap_or_default().trim_end_matches([' ', '\t']);
            let size =
                u64::from_str_radix(size_str, 16).map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&self.read_exact_vec(size as usize)?);
            let end = self.read_line()?;
            if !end.is_empty() {
                return Err(invalid(format!("chunk data not followed by CRLF: {:?}", String::from_utf8_lossy(&end))));
            }
        }
        let mut trailers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                return Ok((body, Headers(trailers)));
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let (n, v) = line.split_once(':').ok_or_else(|| invalid(format!("bad trailer line {line:?}")))?;
            trailers.push((n.to_string(), v.trim().to_string()));
        }
    }

    /// A body with the given framing: the data and any trailers.
    pub fn read_body(&mut self, framing: Framing) -> io::Result<(Vec<u8>, Headers)> {
        match framing {
            Framing::None => Ok((Vec::new(), Headers::default())),
            Framing::Length(n) => Ok((self.read_exact_vec(n as usize)?, Headers::default())),
            Framing::Chunked => self.read_chunked(),
            Framing::Close => Ok((self.read_to_eof()?, Headers::default())),
        }
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }
}

/// Encodes `chunks` (empty ones skipped) and `trailers` as a chunked body.
pub fn encode_chunked(chunks: &[Vec<u8>], trailers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks.iter().filter(|c| !c.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (n, v) in trailers {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The standard reason phrase of a status code (empty when unknown).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for bodies whose every
/// byte is compared.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The byte at `offset` of a streamed body ([`crate::common::Reply::Stream`]).
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// `len` bytes of the streamed-body pattern starting at `offset`.
pub fn pattern_bytes(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}
