//! The `Proxy` state: one exchange with a backend. The request goes up and
//! the response comes down with bounded buffers over a backend connection
//! (chosen and opened in `upconn`), and every failure becomes a retry, a
//! 502/504, or a closed client connection.
//!
//! Body bytes are not copied: request bytes go from the client's read
//! buffer to the backend socket and response bytes from the upstream read
//! buffer to the client socket, behind the head in one `writev`. (The one
//! exception: small pieces of a re-framed chunked request body are copied
//! behind their size line, so tiny chunks do not cost a write each.) A
//! large response body of known length to a cleartext client does not
//! even enter user space: it is spliced through a pipe (`splice`), and the
//! backend is read in small reads until its head is complete so that the
//! body is still in the socket then.
//!
//! What reaches a backend is re-framed by Pitcher: its own Content-Length,
//! or its own chunk size lines with the client's extensions and trailers
//! dropped. A request that turns out malformed after its head went up
//! aborts the upstream connection before the body's end is sent, so the
//! backend never receives a complete request from it.
//!
//! Leaving `Proxy`: `finish` (response complete → end of the exchange),
//! `fail` (→ the same state on another connection, `Local` or close), a
//! 101 (→ `Tunnel`, which takes the connection), a module's answer at
//! BACKEND_RESPONSE (→ `Local`). Every exit but the tunnel goes through
//! `leave_proxy`, which gives the connection back.

use std::io::{self, IoSlice, Write};
use std::time::Duration;

use crate::hooks::{Response, Verdict};
use crate::http::head::MAX_PARSE_HEADERS;
use crate::http::write::{self as hw, ConnHeader, OutFraming};
use crate::http::{Framing, HttpError, Version};
use crate::shm::metrics::{self, TimeoutKind};
use crate::tls::backend::ConnectError;
use crate::upstream::Outcome;

use super::core::Core;
use super::exchange::Body;
use super::session::{count_received, read_at_most, read_into, Session};
use super::splice::{socket_empty, Filled, SPLICE_MIN_BYTES};
use super::state::{BodyPace, Next, Proxying, RespMode, State, Step, Tunnel};

/// Chunk data pieces up to this size are copied into the outgoing buffer
/// with their framing rather than written from the read buffer on their own.
const COPIED_CHUNK_DATA: usize = 1024;
/// The most read from a backend at a time until its response head is
/// complete, when the body may be spliced: enough for a head and a small
/// body in one read, little enough that a large body is left in the
/// socket for `splice` (bytes read into the buffer are copied twice).
const HEAD_READ: usize = 4096;
/// Re-framed request bytes queued for a backend before more client input
/// is taken (backpressure for chunked bodies).
const MAX_PENDING_FRAMED: usize = 16 * 1024;
/// Interim (1xx) responses accepted before the final one of an exchange;
/// past it the backend is failed (502) and its connection closed. With
/// their bytes counted against the response head limit (the upstream read
/// buffer), this bounds what a backend can queue towards a client that
/// does not read.
pub const MAX_INTERIM_RESPONSES: u32 = 16;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Fail {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    /// The TLS handshake failed (certificate refused, no common protocol,
    /// an alert or a close from the backend).
    #[error("TLS handshake with backend failed: {0}")]
    Tls(io::Error),
    #[error("write to backend failed: {0}")]
    UpstreamWrite(io::Error),
    /// EOF or reset before the response head was complete.
    #[error("backend closed the connection before responding")]
    UpstreamClosed,
    #[error("backend timed out")]
    UpstreamTimeout,
    #[error("malformed response from backend")]
    BadResponse,
    /// More than `MAX_INTERIM_RESPONSES` 1xx heads, or more bytes of them
    /// than a response head may have.
    #[error("too many interim (1xx) responses from backend")]
    TooManyInterim,
    /// The backend closed in the middle of a body.
    #[error("backend closed the connection in the middle of the response body")]
    Truncated,
    #[error("client closed the connection")]
    ClientGone,
    /// The request body is malformed or too large.
    #[error("request body: {0}")]
    RequestBody(HttpError),
}

/// A response head that takes the session out of `Proxy`.
enum Switch {
    /// 101: the connection becomes a tunnel.
    Upgrade,
    /// A BACKEND_RESPONSE module answers instead of the backend.
    Answer(std::sync::Arc<Response>),
}

/// What pumping the response did.
enum Pumped {
    /// Whether any byte moved.
    Moved(bool),
    Switch(Switch),
}

impl Core {
    /// `Proxy`: moves bytes both ways until nothing can move, the response
    /// is complete, or the exchange fails.
    pub(super) fn step_proxy(&mut self, s: &mut Session, mut p: Box<Proxying>) -> Next {
        loop {
            let mut moved = false;
            let u = &mut self.ups[p.up];
            if u.connecting {
                // The connect, then (over TLS) the handshake.
                match u.stream.connect_step(&mut u.rd) {
                    Ok(true) => {
                        u.connecting = false;
                        moved = true;
                    }
                    Ok(false) => return (State::Proxy(p), Step::Blocked),
                    Err(ConnectError::Socket(e)) => return self.fail(s, p, Fail::Connect(e)),
                    Err(ConnectError::Tls(e)) => return self.fail(s, p, Fail::Tls(e)),
                }
            }
            match self.pump_request(s, &mut p) {
                Ok(m) => moved |= m,
                Err(f) => return self.fail(s, p, f),
            }
            match self.pump_response(s, &mut p) {
                Ok(Pumped::Moved(m)) => moved |= m,
                Ok(Pumped::Switch(Switch::Upgrade)) => {
                    let up = p.up;
                    let resp_eof = p.resp_eof;
                    s.spare_proxy = Some(p.recycle());
                    return (State::Tunnel(Tunnel::new(up, resp_eof)), Step::Again);
                }
                Ok(Pumped::Switch(Switch::Answer(r))) => {
                    // The backend's response is dropped, and its connection
                    // with it (unpooled).
                    self.leave_proxy(s, p, false);
                    return self.respond_with(s, r.status, &r.headers, &r.body);
                }
                Err(f) => return self.fail(s, p, f),
            }
            if p.resp_head_done && self.response_done(s, &p) {
                return self.finish(s, p);
            }
            if !moved {
                return (State::Proxy(p), Step::Blocked);
            }
            s.progressed = true;
        }
    }

    /// Client to backend: the request head, then body bytes as they come.
    ///
    /// A Content-Length body is forwarded as read. A chunked body is
    /// re-framed: the client's size lines, extensions and trailers are
    /// validated and dropped, and Pitcher's own size lines go out in their
    /// place (queued in `up_out` only once the data before them is written,
    /// so framing and data stay in order). An invalid byte is never
    /// forwarded, and the body's end is only sent once the whole trailer
    /// section was valid: a backend never receives a complete request from
    /// a refused body.
    fn pump_request(&mut self, s: &mut Session, p: &mut Proxying) -> Result<bool, Fail> {
        let mut moved = false;
        let max_body = s.snap.config.limits.max_body_bytes;
        let u = &mut self.ups[p.up];
        loop {
            let mut progress = false;
            // Take newly read body bytes.
            if let Some(inb) = s.inb.as_mut() {
                let ex = &mut *s.ex;
                match &mut ex.req_body {
                    Body::Chunked(sc) => {
                        // Small pieces of data are copied behind their size
                        // line, so a body of tiny chunks costs a write per
                        // read, not one per chunk; larger ones are written
                        // from the read buffer. `up_out` stays bounded.
                        while ex.req_ready == 0
                            && !sc.is_done()
                            && !inb.is_empty()
                            && p.up_out.len() - p.up_out_pos < MAX_PENDING_FRAMED
                        {
                            let n = sc
                                .reframe(inb.data(), &mut p.up_out)
                                .map_err(|e| Fail::RequestBody(HttpError::Chunked(e)))?;
                            if sc.data_total > max_body {
                                return Err(Fail::RequestBody(HttpError::BodyTooLarge));
                            }
                            inb.consume(n);
                            let d = sc.data_left().min(inb.len() as u64) as usize;
                            if n == 0 && d == 0 {
                                break;
                            }
                            progress = true;
                            sc.consume_data(d);
                            if d <= COPIED_CHUNK_DATA {
                                p.up_out.extend_from_slice(&inb.data()[..d]);
                                inb.consume(d);
                            } else {
                                ex.req_ready = d;
                            }
                        }
                    }
                    body => {
                        if !body.complete() && inb.len() > ex.req_ready {
                            ex.req_ready += body.scan(&inb.data()[ex.req_ready..]).map_err(Fail::RequestBody)?;
                        }
                    }
                }
            }
            // Write what we have.
            while u.rd.writable {
                let head = &p.up_out[p.up_out_pos..];
                let body = match s.inb.as_ref() {
                    Some(b) => &b.data()[..s.ex.req_ready],
                    None => &[][..],
                };
                if head.is_empty() && body.is_empty() {
                    // TLS records of what was written that the socket did
                    // not take yet.
                    match u.stream.flush() {
                        Ok(true) => {}
                        Ok(false) => u.rd.writable = false,
                        Err(e) => return Err(Fail::UpstreamWrite(e)),
                    }
                    break;
                }
                let r = if body.is_empty() {
                    u.stream.write(head)
                } else {
                    u.stream.write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
                };
                match r {
                    Ok(n) => {
                        progress = true;
                        let h = n.min(head.len());
                        p.up_out_pos += h;
                        let b = n - h;
                        p.body_out |= b > 0 || p.up_out_pos > p.up_head_len;
                        if b > 0 {
                            if let Some(inb) = s.inb.as_mut() {
                                inb.consume(b);
                            }
                            s.ex.req_ready -= b;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        u.rd.writable = false;
                        if let Some(pace) = p.body_pace.as_mut() {
                            pace.backpressure = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Fail::UpstreamWrite(e)),
                }
            }
            // Once body bytes went out the request can not be replayed, so
            // what was written need not be kept.
            if p.body_out && p.up_out_pos == p.up_out.len() {
                p.up_out.clear();
                p.up_out_pos = 0;
                p.up_head_len = 0;
            }
            if progress {
                moved = true;
                continue;
            }
            // Read more of the body when there is room.
            if s.ex.req_body.complete() || !s.rd.readable {
                return Ok(moved);
            }
            let inb = s.inb.get_or_insert_with(|| self.bufs.get());
            match read_into(&mut s.stream, &mut s.rd, inb).inspect(count_received) {
                Ok(Some(0)) | Err(_) => return Err(Fail::ClientGone),
                Ok(Some(n)) => {
                    if let Some(pace) = p.body_pace.as_mut() {
                        pace.window_bytes += n as u64;
                    }
                    moved = true;
                }
                Ok(None) => return Ok(moved),
            }
        }
    }

    /// Backend to client: the response head, then body bytes as they come.
    fn pump_response(&mut self, s: &mut Session, p: &mut Proxying) -> Result<Pumped, Fail> {
        let mut moved = false;
        loop {
            // A large body of known length: through a pipe (see `splice`),
            // once what was read with the head has been written.
            let mut splicing = p.pipe.is_some() || (!p.no_pipe && self.splice_wanted(s, p));
            if p.pipe.is_none()
                && splicing
                && self.ups[p.up].buf.as_ref().is_some_and(|b| b.is_empty())
                && !s.out_pending()
            {
                let got = self.pipes.get();
                // Tests of the fallback: a request header makes it fail.
                #[cfg(feature = "fault-injection")]
                let got = match s.req.head.get("x-pitcher-test-no-pipe") {
                    Some(_) => Err(io::Error::other("fault injection: X-Pitcher-Test-No-Pipe")),
                    None => got,
                };
                match got {
                    Ok(pipe) => p.pipe = Some(pipe),
                    // No pipe to be had (fd limit): the body is copied.
                    Err(_) => {
                        p.no_pipe = true;
                        splicing = false;
                    }
                }
            }
            if p.pipe.is_some() {
                if !self.splice_body(s, p)? {
                    break;
                }
                moved = true;
                continue;
            }
            let mut step = false;
            let u = &mut self.ups[p.up];
            let Some(ubuf) = u.buf.as_mut() else { return Err(Fail::UpstreamClosed) };
            // Read when there is room (bounded: a slow client stops us here).
            // Until the head is complete, a connection whose body may be
            // spliced reads little, so that the body stays in the socket.
            let max = if !p.resp_head_done && s.stream.plain_fd().is_some() && !u.stream.is_tls() {
                HEAD_READ
            } else {
                usize::MAX
            };
            if !splicing && !p.resp_eof && u.rd.readable && ubuf.room() > 0 {
                match read_at_most(&mut u.stream, &mut u.rd, ubuf, max) {
                    Ok(Some(0)) => {
                        p.resp_eof = true;
                        step = true;
                    }
                    Err(_) => {
                        p.resp_eof = true;
                        p.resp_reset = true;
                        step = true;
                    }
                    Ok(Some(_)) => step = true,
                    Ok(None) => {}
                }
            }
            if !p.resp_head_done {
                // Interim responses (100 Continue) go out as they come: a
                // client may be waiting for one before it sends the body.
                if s.out_pending() {
                    let (n, _) = s.write_client(&[]).map_err(|_| Fail::ClientGone)?;
                    moved |= n > 0;
                }
                // Interim heads count against the response head limit.
                let head_room = ubuf.capacity().saturating_sub(p.interim_bytes);
                match p.resp.parse(ubuf.data(), MAX_PARSE_HEADERS) {
                    Ok(Some(n)) if n > head_room => return Err(Fail::TooManyInterim),
                    Ok(Some(n)) => {
                        ubuf.consume(n);
                        if p.resp.status < 200 && p.resp.status != 101 {
                            p.interim += 1;
                            p.interim_bytes += n;
                            if p.interim > MAX_INTERIM_RESPONSES {
                                return Err(Fail::TooManyInterim);
                            }
                        }
                        if let Some(switch) = self.response_head(s, p)? {
                            return Ok(Pumped::Switch(switch));
                        }
                        moved = true;
                        continue;
                    }
                    Ok(None) if ubuf.room() == 0 => return Err(Fail::BadResponse),
                    Ok(None) if ubuf.len() >= head_room => return Err(Fail::TooManyInterim),
                    Ok(None) if p.resp_eof => {
                        return Err(if ubuf.is_empty() { Fail::UpstreamClosed } else { Fail::BadResponse })
                    }
                    Ok(None) => {}
                    Err(_) => return Err(Fail::BadResponse),
                }
                moved |= step;
                if !step {
                    return Ok(Pumped::Moved(moved));
                }
                continue;
            }
            // Scan new body bytes (the decoder scans as it writes).
            if p.resp_mode != RespMode::Decode && !p.resp_body.complete() && ubuf.len() > p.resp_ready {
                let n = p.resp_body.scan(&ubuf.data()[p.resp_ready..]).map_err(|_| Fail::BadResponse)?;
                p.resp_ready += n;
            }
            step |= self.write_response_body(s, p)?;
            moved |= step;
            if !step {
                break;
            }
        }
        if p.resp_eof && !p.resp_body.complete() {
            if let Body::Close = p.resp_body {
                let all_written = p.resp_ready == 0 && p.chunk_left == 0;
                if p.resp_reset && all_written {
                    // A reset is not the end of a close-delimited body.
                    return Err(Fail::Truncated);
                }
                if p.resp_mode == RespMode::Reframe && all_written && !p.last_chunk_queued {
                    s.out.extend_from_slice(b"0\r\n\r\n");
                    p.last_chunk_queued = true;
                    moved |= self.write_response_body(s, p)?;
                }
            } else {
                let buffered = self.ups[p.up].buf.as_ref().map_or(0, |b| b.len());
                let pending = if p.resp_mode == RespMode::Decode { buffered } else { p.resp_ready + p.piped() };
                if pending == 0 {
                    return Err(Fail::Truncated);
                }
            }
        }
        Ok(Pumped::Moved(moved))
    }

    /// A response head arrived: decide the framing towards the client and
    /// queue the head. `Some`: the session leaves `Proxy`.
    fn response_head(&mut self, s: &mut Session, p: &mut Proxying) -> Result<Option<Switch>, Fail> {
        let status = p.resp.status;
        let client_v11 = s.req.version() == Version::Http11;
        // Validated whatever the status: a head with conflicting framing is
        // never forwarded (see `ResponseHead::framing`).
        let framing = p.resp.framing(s.ex.head_request).map_err(|_| Fail::BadResponse)?;
        if status == 101 {
            if !s.ex.upgrade {
                return Err(Fail::BadResponse);
            }
            hw::response_head(&mut s.out, &p.resp, OutFraming::None, ConnHeader::Upgrade);
            p.resp_head_done = true;
            s.ex.status = 101;
            return Ok(Some(Switch::Upgrade));
        }
        if status < 200 {
            // Interim responses (100 Continue, 103) go to HTTP/1.1 clients;
            // a 100 only if Pitcher did not send its own.
            if client_v11 && !(status == 100 && p.continue_sent) {
                hw::response_head(&mut s.out, &p.resp, OutFraming::None, ConnHeader::Default);
            }
            return Ok(None);
        }
        self.record_outcome(s, if status >= 500 { Outcome::ServerError } else { Outcome::Success });
        s.ex.status = status;
        match self.hook_response(s, &mut p.resp) {
            Verdict::Continue => {}
            // A module closed the connection.
            Verdict::Close => return Err(Fail::ClientGone),
            Verdict::Respond(r) => return Ok(Some(Switch::Answer(r))),
        }
        // A final response before the client sent its whole body (a
        // backend refusing an upload, an `Expect: 100-continue` answered
        // without 100): the rest of the body can not be told from a next
        // request, so the connection closes, and the client is told so
        // (RFC 9110 §10.1.1).
        let mut keep = s.ex.client_keep && !self.closing(s) && s.ex.req_body.complete();
        let (mode, out) = match framing {
            Framing::None => (RespMode::Pass, OutFraming::None),
            Framing::Length(n) => (RespMode::Pass, OutFraming::Length(n)),
            Framing::Chunked if client_v11 => (RespMode::Pass, OutFraming::Chunked),
            Framing::Chunked => {
                keep = false;
                (RespMode::Decode, OutFraming::Close)
            }
            Framing::Close if client_v11 && keep => (RespMode::Reframe, OutFraming::Chunked),
            Framing::Close => {
                keep = false;
                (RespMode::Pass, OutFraming::Close)
            }
        };
        s.ex.client_keep = keep;
        p.upstream_keep = p.resp.keep_alive() && framing != Framing::Close;
        p.resp_mode = mode;
        p.resp_body = Body::from_framing(framing);
        let conn = match (keep, client_v11) {
            (false, _) => ConnHeader::Close,
            (true, true) => ConnHeader::Default,
            (true, false) => ConnHeader::KeepAlive,
        };
        hw::response_head(&mut s.out, &p.resp, out, conn);
        p.resp_head_done = true;
        Ok(None)
    }

    /// Writes queued head bytes and available body bytes to the client.
    fn write_response_body(&mut self, s: &mut Session, p: &mut Proxying) -> Result<bool, Fail> {
        let u = &mut self.ups[p.up];
        let Some(ubuf) = u.buf.as_mut() else { return Ok(false) };
        let mut moved = false;
        loop {
            let body: &[u8] = match p.resp_mode {
                RespMode::Pass => &ubuf.data()[..p.resp_ready],
                RespMode::Reframe => {
                    if p.chunk_left == 0 && p.resp_ready > 0 {
                        hw::chunk_head(&mut s.out, p.resp_ready);
                        p.chunk_left = p.resp_ready;
                    }
                    &ubuf.data()[..p.chunk_left]
                }
                RespMode::Decode => {
                    let Body::Chunked(sc) = &mut p.resp_body else { return Err(Fail::BadResponse) };
                    let n = sc.scan_framing(ubuf.data()).map_err(|_| Fail::BadResponse)?;
                    if n > 0 {
                        ubuf.consume(n);
                        moved = true;
                    }
                    let d = (sc.data_left().min(ubuf.len() as u64)) as usize;
                    &ubuf.data()[..d]
                }
            };
            // Every byte of the response is in hand: this write may end it.
            let ends = p.resp_head_done && p.resp_mode == RespMode::Pass && p.resp_body.complete() && p.piped() == 0;
            let (total, n) = s.write_client_then(body, ends).map_err(|_| Fail::ClientGone)?;
            if total == 0 {
                return Ok(moved);
            }
            moved = true;
            if n == 0 {
                continue;
            }
            ubuf.consume(n);
            match p.resp_mode {
                RespMode::Pass => p.resp_ready -= n,
                RespMode::Reframe => {
                    p.resp_ready -= n;
                    p.chunk_left -= n;
                    if p.chunk_left == 0 {
                        s.out.extend_from_slice(b"\r\n");
                    }
                }
                RespMode::Decode => {
                    if let Body::Chunked(sc) = &mut p.resp_body {
                        sc.consume_data(n);
                    }
                }
            }
        }
    }

    /// The response has been completely written to the client.
    fn response_done(&self, s: &Session, p: &Proxying) -> bool {
        if s.out_pending() {
            return false;
        }
        let body_done = match (&p.resp_body, p.resp_mode) {
            (Body::Close, RespMode::Reframe) => p.last_chunk_queued,
            (Body::Close, _) => p.resp_eof && self.ups[p.up].buf.as_ref().is_none_or(|b| b.is_empty()),
            (b, _) => b.complete(),
        };
        body_done && p.resp_ready == 0 && p.piped() == 0
    }

    /// The rest of the response body is to go through a pipe (once what
    /// was read with the head is written; nothing more is read into the
    /// buffer meanwhile): nothing needs to see its bytes (modules see
    /// heads only), its length is known and large, neither the client nor
    /// the backend speaks TLS.
    fn splice_wanted(&self, s: &Session, p: &Proxying) -> bool {
        p.resp_head_done
            && p.resp_mode == RespMode::Pass
            // (Body bytes not yet read: those read are scanned at once.)
            && matches!(p.resp_body, Body::Length(n) if n >= SPLICE_MIN_BYTES)
            && !p.resp_eof
            && s.stream.plain_fd().is_some()
            && self.ups[p.up].stream.plain_fd().is_some()
    }

    /// Moves response body bytes backend → pipe → client while any can
    /// move. Whether any did; the end of the body, an early EOF and a
    /// blocked client are seen by the caller as with the buffered path.
    fn splice_body(&mut self, s: &mut Session, p: &mut Proxying) -> Result<bool, Fail> {
        let Some(pipe) = p.pipe.as_mut() else { return Ok(false) };
        let u = &mut self.ups[p.up];
        let mut moved = false;
        loop {
            let mut step = false;
            let left = match p.resp_body {
                Body::Length(n) => usize::try_from(n).unwrap_or(usize::MAX),
                _ => 0,
            };
            // (Only a cleartext backend gets a pipe: see splice_wanted.)
            let Some(ufd) = u.stream.plain_fd() else { return Err(Fail::UpstreamClosed) };
            if left > 0 && !p.resp_eof && u.rd.readable {
                match pipe.fill(ufd, left) {
                    Ok(Filled::Bytes(n)) => {
                        if let Body::Length(l) = &mut p.resp_body {
                            *l -= n as u64;
                            // The body is in: the connection is reusable
                            // if nothing follows it (as a short read
                            // tells on the buffered path).
                            if *l == 0 && socket_empty(ufd) {
                                u.rd.drained();
                            }
                        }
                        step = true;
                    }
                    Ok(Filled::Eof) => {
                        p.resp_eof = true;
                        step = true;
                    }
                    Ok(Filled::Drained) => u.rd.drained(),
                    // The client has to take some first.
                    Ok(Filled::Full) => {}
                    Err(_) => {
                        p.resp_eof = true;
                        p.resp_reset = true;
                        step = true;
                    }
                }
            }
            if pipe.len > 0 && s.rd.writable {
                if !s.nodelay {
                    s.stream.set_nodelay();
                    s.nodelay = true;
                }
                let Some(fd) = s.stream.plain_fd() else { return Err(Fail::ClientGone) };
                match pipe.drain(fd) {
                    Ok(Some(n)) => {
                        s.writes += 1;
                        s.progressed = true;
                        s.ex.bytes_out += n as u64;
                        metrics::add(&metrics::here().bytes_sent, n as u64);
                        step = true;
                    }
                    Ok(None) => {
                        s.rd.writable = false;
                        s.write_blocked = true;
                    }
                    Err(_) => return Err(Fail::ClientGone),
                }
            }
            if !step {
                return Ok(moved);
            }
            moved = true;
        }
    }

    /// Leaves `Proxy` without a tunnel: the backend connection goes back
    /// to its pool when `reusable`, else it is closed; the session keeps
    /// the head's allocation.
    pub(super) fn leave_proxy(&mut self, s: &mut Session, mut p: Box<Proxying>, reusable: bool) {
        if let Some(pipe) = p.pipe.take() {
            self.pipes.put(pipe);
        }
        self.release_upstream(s, p.up, reusable);
        s.spare_proxy = Some(p.recycle());
    }

    /// `Proxy` → end of the exchange: pool or close the upstream
    /// connection, then the next request or close.
    fn finish(&mut self, s: &mut Session, p: Box<Proxying>) -> Next {
        let reusable = p.upstream_keep && p.request_sent(&s.ex) && !p.resp_eof;
        self.leave_proxy(s, p, reusable);
        // Body bytes the backend did not take before answering are
        // dropped, so they are not read as the next request; a body still
        // being received keeps the connection from being reused at all.
        if s.ex.req_body.complete() && s.ex.req_ready > 0 {
            if let Some(inb) = s.inb.as_mut() {
                inb.consume(s.ex.req_ready);
            }
            s.ex.req_ready = 0;
        }
        let keep = s.ex.client_keep && s.ex.req_body.complete();
        self.end_exchange(s, keep)
    }

    /// `Proxy` → a failure becomes a retry (`Proxy` on a new connection),
    /// an error response (`Local`), or a close.
    fn fail(&mut self, s: &mut Session, p: Box<Proxying>, f: Fail) -> Next {
        let started = p.resp_head_done || s.out_pos < s.out.len();
        let reused = self.ups[p.up].reused;
        match f {
            Fail::ClientGone => {
                slog::debug!(self.req_log(s), "client closed during exchange");
                self.leave_proxy(s, p, false);
                return (State::Closed, Step::Close);
            }
            Fail::RequestBody(e) if !started => {
                self.leave_proxy(s, p, false);
                return self.refuse(s, e);
            }
            Fail::Connect(_) | Fail::ConnectTimeout | Fail::Tls(_) => {
                slog::warn!(self.req_log(s), "connect to backend failed"; "error" => %f);
                let outcome = match f {
                    Fail::ConnectTimeout => Outcome::Timeout,
                    Fail::Tls(_) => Outcome::Tls,
                    _ => Outcome::ConnectError,
                };
                self.record_outcome(s, outcome);
                s.ex.failed += 1;
                self.count_retry(s);
                return self.retry(s, p, if matches!(f, Fail::ConnectTimeout) { 504 } else { 502 });
            }
            Fail::RequestBody(e) => {
                // The response is under way: the client's broken body ends
                // the exchange, and the connection.
                slog::debug!(self.req_log(s), "request body refused during the response"; "error" => %e);
                self.leave_proxy(s, p, false);
                return (State::Closed, Step::Close);
            }
            Fail::UpstreamClosed | Fail::UpstreamWrite(_)
                if !started
                    && reused
                    && !p.body_out
                    && s.ex.replays < 4
                    && (p.up_out_pos == 0 || is_idempotent(s.req.method())) =>
            {
                // A pooled connection the backend had closed before the
                // request reached it. Nothing of a response came, no body
                // byte went out, and the method may be repeated (or nothing
                // at all was written): sending again on a new connection is
                // safe (RFC 9110 §9.2.2).
                slog::debug!(self.req_log(s), "pooled connection was closed by the backend; resending");
                s.ex.replays += 1;
                if s.ex.backend < 64 {
                    s.ex.tried &= !(1u64 << s.ex.backend);
                }
                return self.retry(s, p, 502);
            }
            _ => {}
        }
        let status = match f {
            Fail::UpstreamTimeout => 504,
            Fail::RequestBody(e) => e.status(),
            _ => 502,
        };
        // The backend failed this request: passive detection counts it, and
        // an idempotent request none of whose body was sent goes to another
        // backend while the retry count and the time budget allow.
        if !matches!(f, Fail::RequestBody(_)) {
            let outcome = match f {
                Fail::UpstreamTimeout => Outcome::Timeout,
                Fail::BadResponse | Fail::TooManyInterim => Outcome::Invalid,
                Fail::UpstreamClosed | Fail::UpstreamWrite(_) | Fail::Truncated => Outcome::Reset,
                _ => Outcome::ConnectError,
            };
            self.record_outcome(s, outcome);
            let cluster = &s.snap.clusters[s.ex.cluster];
            let in_budget =
                s.ex.started.is_some_and(|t0| self.now.saturating_duration_since(t0) < cluster.retry_budget);
            if !started && !p.body_out && is_idempotent(s.req.method()) && s.ex.failed < cluster.retries && in_budget {
                slog::warn!(self.req_log(s), "backend failed; retrying the request on another backend"; "error" => %f);
                s.ex.failed += 1;
                self.count_retry(s);
                return self.retry(s, p, status);
            }
        }
        slog::error!(self.req_log(s), "backend failed"; "error" => %f, "status" => status, "response_started" => started);
        self.leave_proxy(s, p, false);
        if started {
            return (State::Closed, Step::Close);
        }
        s.ex.client_keep = s.ex.client_keep && s.ex.req_body.complete();
        self.respond(s, status)
    }

    /// The backend of the current attempt failed the request, which goes
    /// to another (counted on the failed backend).
    fn count_retry(&self, s: &Session) {
        if let Some(m) = s.snap.clusters[s.ex.cluster].members.get(s.ex.backend) {
            m.shm.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The same request again on a new connection (nothing of it was
    /// processed): `Proxy` again, or `Local` with `status_if_none` when no
    /// backend can be had. The failed connection is closed.
    fn retry(&mut self, s: &mut Session, mut p: Box<Proxying>, status_if_none: u16) -> Next {
        self.release_upstream(s, p.up, false);
        p.up_out_pos = 0;
        p.resp_eof = false;
        match self.connect_upstream(s) {
            Ok(up) => {
                p.up = up;
                s.progressed = true;
                (State::Proxy(p), Step::Again)
            }
            Err(_) => {
                s.spare_proxy = Some(p.recycle());
                self.respond(s, status_if_none)
            }
        }
    }

    /// What a session in `Proxy` waits on, as a timeout.
    pub(super) fn proxy_wait(&self, s: &Session, p: &Proxying) -> Duration {
        let t = &s.snap.config.timeouts;
        if !p.resp_head_done {
            if !s.ex.req_body.complete() && s.ex.req_ready == 0 {
                // Also wake at the end of the rate window and at the body's
                // total deadline (bytes that keep coming re-arm the idle
                // timeout, not these).
                let mut wait = t.client_body;
                if let Some(pace) = &p.body_pace {
                    for at in [pace.window_start + t.client_body_rate_window, pace.deadline] {
                        wait = wait.min(at.saturating_duration_since(self.now));
                    }
                }
                return wait;
            }
            if !p.request_sent(&s.ex) {
                return t.upstream_write;
            }
            return t.upstream_read;
        }
        if s.out_pending() || p.resp_ready > 0 || p.piped() > 0 || !s.rd.writable {
            t.client_write
        } else {
            t.upstream_read
        }
    }

    /// `Proxy`'s deadline passed.
    pub(super) fn proxy_timeout(&mut self, s: &mut Session, p: Box<Proxying>) -> Next {
        if self.ups[p.up].connecting {
            metrics::here().timed_out(TimeoutKind::Upstream);
            return self.fail(s, p, Fail::ConnectTimeout);
        }
        if !p.resp_head_done && !s.ex.req_body.complete() && s.ex.req_ready == 0 {
            return self.body_timeout(s, p);
        }
        metrics::here().timed_out(TimeoutKind::Upstream);
        if !p.resp_head_done {
            return self.fail(s, p, Fail::UpstreamTimeout);
        }
        slog::warn!(self.req_log(s), "timeout while streaming a response; closing");
        self.leave_proxy(s, p, false);
        (State::Closed, Step::Close)
    }

    /// A deadline passed while waiting for request body bytes: the idle
    /// timeout (`client_body_ms`), the total one (`client_body_total_ms`),
    /// or the end of a rate window, which opens the next window when the
    /// client kept up (or the backend was the slow side). A body too slow
    /// is answered 408 (a close if anything of a response went out), and
    /// the backend connection it held is closed.
    fn body_timeout(&mut self, s: &mut Session, mut p: Box<Proxying>) -> Next {
        let t = &s.snap.config.timeouts;
        let now = self.now;
        let window = t.client_body_rate_window;
        let least = t.client_body_min_rate_bytes.saturating_mul(window.as_millis() as u64) / 1000;
        let why = match p.body_pace.as_mut() {
            Some(pace) if now >= pace.deadline => "total time",
            Some(pace) if now >= pace.window_start + window => {
                if pace.backpressure || pace.window_bytes >= least {
                    *pace = BodyPace { window_start: now, window_bytes: 0, backpressure: false, ..*pace };
                    s.progressed = true;
                    return (State::Proxy(p), Step::Again);
                }
                "minimum rate"
            }
            _ => "idle",
        };
        let window_bytes = p.body_pace.map_or(0, |pace| pace.window_bytes);
        self.slow_bodies += 1;
        metrics::here().timed_out(TimeoutKind::ClientBody);
        if now.saturating_duration_since(self.slow_bodies_logged) >= Duration::from_secs(1) {
            slog::warn!(self.req_log(s), "request body too slow; refused"; "reason" => why,
                "window_bytes" => window_bytes, "slow_bodies_total" => self.slow_bodies);
            self.slow_bodies_logged = now;
        }
        self.leave_proxy(s, p, false);
        if s.out_pending() {
            return (State::Closed, Step::Close);
        }
        s.ex.client_keep = false;
        self.respond(s, 408)
    }
}

/// Methods whose repetition has the effect of one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE")
}
