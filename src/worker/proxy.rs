//! The `Proxy` phase of a session: streaming the request up and the
//! response down with bounded buffers over a backend connection (chosen and
//! opened in `upconn.rs`), and turning every failure into either a retry, a
//! 502/504, or a closed client connection.
//!
//! Body bytes are not copied: request bytes go from the client's read
//! buffer to the backend socket and response bytes from the upstream read
//! buffer to the client socket, behind the head in one `writev`. (The one
//! exception: small pieces of a re-framed chunked request body are copied
//! behind their size line, so tiny chunks do not cost a write each.)
//!
//! What reaches a backend is re-framed by Pitcher: its own Content-Length,
//! or its own chunk size lines with the client's extensions and trailers
//! dropped. A request that turns out malformed after its head went up
//! aborts the upstream connection before the body's end is sent, so the
//! backend never receives a complete request from it.
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

use std::io::{self, IoSlice, Write};
use std::time::Duration;

use crate::http::head::MAX_PARSE_HEADERS;
use crate::http::write::{self as hw, ConnHeader, OutFraming};
use crate::http::{Framing, HttpError, Version};
use crate::upstream::Outcome;

use super::session::{read_into, Body, Phase, RespMode, Session, Step};
use super::Core;

/// Chunk data pieces up to this size are copied into the outgoing buffer
/// with their framing rather than written from the read buffer on their own.
const COPIED_CHUNK_DATA: usize = 1024;
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

impl Core {
    pub(super) fn step_proxy(&mut self, s: &mut Session) -> Step {
        loop {
            let Some(ui) = s.ex.up else { return Step::Close };
            let mut moved = false;
            let u = &mut self.ups[ui];
            if u.connecting {
                if !u.rd.writable && !u.rd.read_closed {
                    return Step::Blocked;
                }
                match u.stream.connect_result() {
                    Ok(true) => {
                        u.connecting = false;
                        u.rd.writable = true;
                        moved = true;
                    }
                    Ok(false) => {
                        u.rd.writable = false;
                        return Step::Blocked;
                    }
                    Err(e) => return self.fail(s, Fail::Connect(e)),
                }
            }
            match self.pump_request(s, ui) {
                Ok(m) => moved |= m,
                Err(f) => return self.fail(s, f),
            }
            match self.pump_response(s, ui) {
                Ok(m) => moved |= m,
                Err(f) => return self.fail(s, f),
            }
            if s.phase != Phase::Proxy {
                return Step::Again;
            }
            if s.ex.resp_head_done && self.response_done(s, ui) {
                return self.finish(s);
            }
            if !moved {
                return Step::Blocked;
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
    fn pump_request(&mut self, s: &mut Session, ui: usize) -> Result<bool, Fail> {
        let mut moved = false;
        let max_body = s.snap.config.limits.max_body_bytes;
        let u = &mut self.ups[ui];
        loop {
            let mut progress = false;
            // Take newly read body bytes.
            if let Some(inb) = s.inb.as_mut() {
                match &mut s.ex.req_body {
                    Body::Chunked(sc) => {
                        // Small pieces of data are copied behind their size
                        // line, so a body of tiny chunks costs a write per
                        // read, not one per chunk; larger ones are written
                        // from the read buffer. `up_out` stays bounded.
                        while s.ex.req_ready == 0
                            && !sc.is_done()
                            && !inb.is_empty()
                            && s.ex.up_out.len() - s.ex.up_out_pos < MAX_PENDING_FRAMED
                        {
                            let n = sc
                                .reframe(inb.data(), &mut s.ex.up_out)
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
                                s.ex.up_out.extend_from_slice(&inb.data()[..d]);
                                inb.consume(d);
                            } else {
                                s.ex.req_ready = d;
                            }
                        }
                    }
                    body => {
                        if !body.complete() && inb.len() > s.ex.req_ready {
                            s.ex.req_ready += body.scan(&inb.data()[s.ex.req_ready..]).map_err(Fail::RequestBody)?;
                        }
                    }
                }
            }
            // Write what we have.
            while u.rd.writable {
                let head = &s.ex.up_out[s.ex.up_out_pos..];
                let body = match s.inb.as_ref() {
                    Some(b) => &b.data()[..s.ex.req_ready],
                    None => &[][..],
                };
                if head.is_empty() && body.is_empty() {
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
                        s.ex.up_out_pos += h;
                        let b = n - h;
                        s.ex.body_out |= b > 0 || s.ex.up_out_pos > s.ex.up_head_len;
                        if b > 0 {
                            if let Some(inb) = s.inb.as_mut() {
                                inb.consume(b);
                            }
                            s.ex.req_ready -= b;
                            s.ex.req_body_sent += b as u64;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        u.rd.writable = false;
                        s.ex.body_backpressure = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Fail::UpstreamWrite(e)),
                }
            }
            // Once body bytes went out the request can not be replayed, so
            // what was written need not be kept.
            if s.ex.body_out && s.ex.up_out_pos == s.ex.up_out.len() {
                s.ex.up_out.clear();
                s.ex.up_out_pos = 0;
                s.ex.up_head_len = 0;
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
            match read_into(&mut s.stream, &mut s.rd, inb) {
                Ok(Some(0)) | Err(_) => return Err(Fail::ClientGone),
                Ok(Some(n)) => {
                    s.ex.body_window_bytes += n as u64;
                    moved = true;
                }
                Ok(None) => return Ok(moved),
            }
        }
    }

    /// Backend to client: the response head, then body bytes as they come.
    fn pump_response(&mut self, s: &mut Session, ui: usize) -> Result<bool, Fail> {
        let mut moved = false;
        loop {
            let mut step = false;
            let u = &mut self.ups[ui];
            let Some(ubuf) = u.buf.as_mut() else { return Err(Fail::UpstreamClosed) };
            // Read when there is room (bounded: a slow client stops us here).
            if !s.ex.resp_eof && u.rd.readable && ubuf.room() > 0 {
                match read_into(&mut u.stream, &mut u.rd, ubuf) {
                    Ok(Some(0)) => {
                        s.ex.resp_eof = true;
                        step = true;
                    }
                    Err(_) => {
                        s.ex.resp_eof = true;
                        s.ex.resp_reset = true;
                        step = true;
                    }
                    Ok(Some(n)) => {
                        s.ex.resp_bytes += n as u64;
                        step = true;
                    }
                    Ok(None) => {}
                }
            }
            if !s.ex.resp_head_done {
                // Interim responses (100 Continue) go out as they come: a
                // client may be waiting for one before it sends the body.
                if s.out_pending() {
                    let (n, _) = s.write_client(&[]).map_err(|_| Fail::ClientGone)?;
                    moved |= n > 0;
                }
                // Interim heads count against the response head limit.
                let head_room = ubuf.capacity().saturating_sub(s.ex.interim_bytes);
                match s.resp.parse(ubuf.data(), MAX_PARSE_HEADERS) {
                    Ok(Some(n)) if n > head_room => return Err(Fail::TooManyInterim),
                    Ok(Some(n)) => {
                        ubuf.consume(n);
                        if s.resp.status < 200 && s.resp.status != 101 {
                            s.ex.interim += 1;
                            s.ex.interim_bytes += n;
                            if s.ex.interim > MAX_INTERIM_RESPONSES {
                                return Err(Fail::TooManyInterim);
                            }
                        }
                        self.response_head(s)?;
                        moved = true;
                        if s.phase != Phase::Proxy {
                            return Ok(true);
                        }
                        continue;
                    }
                    Ok(None) if ubuf.room() == 0 => return Err(Fail::BadResponse),
                    Ok(None) if ubuf.len() >= head_room => return Err(Fail::TooManyInterim),
                    Ok(None) if s.ex.resp_eof => {
                        return Err(if ubuf.is_empty() { Fail::UpstreamClosed } else { Fail::BadResponse })
                    }
                    Ok(None) => {}
                    Err(_) => return Err(Fail::BadResponse),
                }
                moved |= step;
                if !step {
                    return Ok(moved);
                }
                continue;
            }
            // Scan new body bytes (the decoder scans as it writes).
            if s.ex.resp_mode != RespMode::Decode && !s.ex.resp_body.complete() && ubuf.len() > s.ex.resp_ready {
                let n = s.ex.resp_body.scan(&ubuf.data()[s.ex.resp_ready..]).map_err(|_| Fail::BadResponse)?;
                s.ex.resp_ready += n;
            }
            step |= self.write_response_body(s, ui)?;
            moved |= step;
            if !step {
                break;
            }
        }
        if s.ex.resp_eof && !s.ex.resp_body.complete() {
            if let Body::Close = s.ex.resp_body {
                let all_written = s.ex.resp_ready == 0 && s.ex.chunk_left == 0;
                if s.ex.resp_reset && all_written {
                    // A reset is not the end of a close-delimited body.
                    return Err(Fail::Truncated);
                }
                if s.ex.resp_mode == RespMode::Reframe && all_written && !s.ex.last_chunk_queued {
                    s.out.extend_from_slice(b"0\r\n\r\n");
                    s.ex.last_chunk_queued = true;
                    moved |= self.write_response_body(s, ui)?;
                }
            } else {
                let buffered = self.ups[ui].buf.as_ref().map_or(0, |b| b.len());
                let pending = if s.ex.resp_mode == RespMode::Decode { buffered } else { s.ex.resp_ready };
                if pending == 0 {
                    return Err(Fail::Truncated);
                }
            }
        }
        Ok(moved)
    }

    /// A response head arrived: decide the framing towards the client and
    /// queue the head.
    fn response_head(&mut self, s: &mut Session) -> Result<(), Fail> {
        let status = s.resp.status;
        let client_v11 = s.req.version() == Version::Http11;
        // Validated whatever the status: a head with conflicting framing is
        // never forwarded (see `ResponseHead::framing`).
        let framing = s.resp.framing(s.ex.head_request).map_err(|_| Fail::BadResponse)?;
        if status == 101 {
            if !s.ex.upgrade {
                return Err(Fail::BadResponse);
            }
            hw::response_head(&mut s.out, &s.resp, OutFraming::None, ConnHeader::Upgrade);
            s.ex.resp_head_done = true;
            s.ex.status = 101;
            s.phase = Phase::Tunnel;
            return Ok(());
        }
        if status < 200 {
            // Interim responses (100 Continue, 103) go to HTTP/1.1 clients;
            // a 100 only if Pitcher did not send its own.
            if client_v11 && !(status == 100 && s.ex.continue_sent) {
                hw::response_head(&mut s.out, &s.resp, OutFraming::None, ConnHeader::Default);
            }
            return Ok(());
        }
        self.record_outcome(s, if status >= 500 { Outcome::ServerError } else { Outcome::Success });
        s.ex.status = status;
        match self.hook_response(s) {
            None => {}
            // A module closed the connection.
            Some(Step::Close) => return Err(Fail::ClientGone),
            // A module answered instead: the session is in `Local` now.
            Some(_) => return Ok(()),
        }
        // A final response before the client sent its whole body (a
        // backend refusing an upload, an `Expect: 100-continue` answered
        // without 100): the rest of the body can not be told from a next
        // request, so the connection closes, and the client is told so
        // (RFC 9110 §10.1.1).
        let mut keep = s.ex.client_keep && !self.draining && s.ex.req_body.complete();
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
        s.ex.upstream_keep = s.resp.keep_alive() && framing != Framing::Close;
        s.ex.resp_mode = mode;
        s.ex.resp_body = Body::from_framing(framing);
        let conn = match (keep, client_v11) {
            (false, _) => ConnHeader::Close,
            (true, true) => ConnHeader::Default,
            (true, false) => ConnHeader::KeepAlive,
        };
        hw::response_head(&mut s.out, &s.resp, out, conn);
        s.ex.resp_head_done = true;
        Ok(())
    }

    /// Writes queued head bytes and available body bytes to the client.
    fn write_response_body(&mut self, s: &mut Session, ui: usize) -> Result<bool, Fail> {
        let u = &mut self.ups[ui];
        let Some(ubuf) = u.buf.as_mut() else { return Ok(false) };
        let mut moved = false;
        loop {
            let body: &[u8] = match s.ex.resp_mode {
                RespMode::Pass => &ubuf.data()[..s.ex.resp_ready],
                RespMode::Reframe => {
                    if s.ex.chunk_left == 0 && s.ex.resp_ready > 0 {
                        hw::chunk_head(&mut s.out, s.ex.resp_ready);
                        s.ex.chunk_left = s.ex.resp_ready;
                    }
                    &ubuf.data()[..s.ex.chunk_left]
                }
                RespMode::Decode => {
                    let Body::Chunked(sc) = &mut s.ex.resp_body else { return Err(Fail::BadResponse) };
                    let n = sc.scan_framing(ubuf.data()).map_err(|_| Fail::BadResponse)?;
                    if n > 0 {
                        ubuf.consume(n);
                        moved = true;
                    }
                    let d = (sc.data_left().min(ubuf.len() as u64)) as usize;
                    &ubuf.data()[..d]
                }
            };
            let (total, n) = s.write_client(body).map_err(|_| Fail::ClientGone)?;
            if total == 0 {
                return Ok(moved);
            }
            moved = true;
            if n == 0 {
                continue;
            }
            ubuf.consume(n);
            match s.ex.resp_mode {
                RespMode::Pass => s.ex.resp_ready -= n,
                RespMode::Reframe => {
                    s.ex.resp_ready -= n;
                    s.ex.chunk_left -= n;
                    if s.ex.chunk_left == 0 {
                        s.out.extend_from_slice(b"\r\n");
                    }
                }
                RespMode::Decode => {
                    if let Body::Chunked(sc) = &mut s.ex.resp_body {
                        sc.consume_data(n);
                    }
                }
            }
        }
    }

    /// The response has been completely written to the client.
    fn response_done(&self, s: &Session, ui: usize) -> bool {
        if s.out_pos < s.out.len() {
            return false;
        }
        let body_done = match (&s.ex.resp_body, s.ex.resp_mode) {
            (Body::Close, RespMode::Reframe) => s.ex.last_chunk_queued,
            (Body::Close, _) => s.ex.resp_eof && self.ups[ui].buf.as_ref().is_none_or(|b| b.is_empty()),
            (b, _) => b.complete(),
        };
        body_done && s.ex.resp_ready == 0
    }

    /// The exchange is over: pool or close the upstream connection, then
    /// the next request or close.
    fn finish(&mut self, s: &mut Session) -> Step {
        let request_sent = s.ex.request_sent();
        let reusable = s.ex.upstream_keep && request_sent && !s.ex.resp_eof;
        self.release_upstream(s, reusable);
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

    /// Turns a failure into a retry, an error response, or a close.
    fn fail(&mut self, s: &mut Session, f: Fail) -> Step {
        let started = s.ex.resp_head_done || s.out_pos < s.out.len();
        let (backend, reused) = match s.ex.up.map(|u| &self.ups[u]) {
            Some(u) => (self.backends.get(u.backend).addr.to_string(), u.reused),
            None => (String::new(), false),
        };
        let method = String::from_utf8_lossy(s.req.method()).into_owned();
        let path = String::from_utf8_lossy(s.req.target()).into_owned();
        match f {
            Fail::ClientGone => {
                slog::debug!(self.log, "client closed during exchange"; "method" => &method, "path" => &path, "backend" => &backend);
                self.release_upstream(s, false);
                return Step::Close;
            }
            Fail::RequestBody(e) if !started => {
                self.release_upstream(s, false);
                return self.refuse(s, e);
            }
            Fail::Connect(_) | Fail::ConnectTimeout => {
                slog::warn!(self.log, "connect to backend failed"; "method" => &method, "path" => &path, "backend" => &backend, "error" => %f);
                let outcome = if matches!(f, Fail::ConnectTimeout) { Outcome::Timeout } else { Outcome::ConnectError };
                self.record_outcome(s, outcome);
                self.release_upstream(s, false);
                s.ex.failed += 1;
                return self.retry(s, if matches!(f, Fail::ConnectTimeout) { 504 } else { 502 });
            }
            Fail::RequestBody(e) => {
                // The response is under way: the client's broken body ends
                // the exchange, and the connection.
                slog::debug!(self.log, "request body refused during the response"; "method" => &method, "path" => &path,
                    "backend" => &backend, "error" => %e);
                self.release_upstream(s, false);
                return Step::Close;
            }
            Fail::UpstreamClosed | Fail::UpstreamWrite(_)
                if !started
                    && reused
                    && !s.ex.body_out
                    && s.ex.replays < 4
                    && (s.ex.up_out_pos == 0 || is_idempotent(s.req.method())) =>
            {
                // A pooled connection the backend had closed before the
                // request reached it. Nothing of a response came, no body
                // byte went out, and the method may be repeated (or nothing
                // at all was written): sending again on a new connection is
                // safe (RFC 9110 §9.2.2).
                slog::debug!(self.log, "pooled connection was closed by the backend; resending"; "backend" => &backend);
                self.release_upstream(s, false);
                s.ex.replays += 1;
                if s.ex.backend < 64 {
                    s.ex.tried &= !(1u64 << s.ex.backend);
                }
                return self.retry(s, 502);
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
            self.record_outcome(
                s,
                if matches!(f, Fail::UpstreamTimeout) { Outcome::Timeout } else { Outcome::ConnectError },
            );
            let cluster = &s.snap.clusters[s.ex.cluster];
            let in_budget =
                s.ex.started.is_some_and(|t0| self.now.saturating_duration_since(t0) < cluster.retry_budget);
            if !started && !s.ex.body_out && is_idempotent(s.req.method()) && s.ex.failed < cluster.retries && in_budget
            {
                slog::warn!(self.log, "backend failed; retrying the request on another backend"; "method" => &method,
                    "path" => &path, "backend" => &backend, "error" => %f);
                self.release_upstream(s, false);
                s.ex.failed += 1;
                return self.retry(s, status);
            }
        }
        slog::error!(self.log, "backend failed"; "method" => &method, "path" => &path, "backend" => &backend,
            "error" => %f, "status" => status, "response_started" => started);
        self.release_upstream(s, false);
        if started {
            return Step::Close;
        }
        s.ex.client_keep = s.ex.client_keep && s.ex.req_body.complete();
        self.respond(s, status)
    }

    /// Feeds passive failure detection with the outcome of the exchange on
    /// the current backend; logs an ejection.
    fn record_outcome(&mut self, s: &Session, outcome: Outcome) {
        let cluster = &s.snap.clusters[s.ex.cluster];
        if let Some(d) = cluster.record(s.ex.backend, outcome, crate::shm::now_ms()) {
            let id = cluster.members[s.ex.backend].id;
            slog::warn!(self.log, "backend ejected (passive detection)"; "backend" => %self.backends.get(id).addr,
                "cluster" => &cluster.name, "for_ms" => d.as_millis() as u64, "last" => ?outcome);
        }
    }

    /// Connects again for the same request (nothing of it was processed).
    fn retry(&mut self, s: &mut Session, status_if_none: u16) -> Step {
        s.ex.up_out_pos = 0;
        s.ex.resp_eof = false;
        s.ex.resp_bytes = 0;
        match self.connect_upstream(s) {
            Ok(()) => {
                s.progressed = true;
                Step::Again
            }
            Err(_) => self.respond(s, status_if_none),
        }
    }

    /// What a session in the Proxy phase waits on, as a timeout.
    pub(super) fn proxy_wait(&self, s: &Session) -> Duration {
        let t = &s.snap.config.timeouts;
        if !s.ex.resp_head_done {
            if !s.ex.req_body.complete() && s.ex.req_ready == 0 {
                // Also wake at the end of the rate window and at the body's
                // total deadline (bytes that keep coming re-arm the idle
                // timeout, not these).
                let mut wait = t.client_body;
                let window_end = s.ex.body_window_start.map(|w| w + t.client_body_rate_window);
                for at in [window_end, s.ex.body_deadline].into_iter().flatten() {
                    wait = wait.min(at.saturating_duration_since(self.now));
                }
                return wait;
            }
            if !s.ex.request_sent() {
                return t.upstream_write;
            }
            return t.upstream_read;
        }
        if s.out_pos < s.out.len() || s.ex.resp_ready > 0 || !s.rd.writable {
            t.client_write
        } else {
            t.upstream_read
        }
    }

    /// The Proxy phase's deadline passed.
    pub(super) fn proxy_timeout(&mut self, s: &mut Session) -> Step {
        match s.ex.up.map(|u| self.ups[u].connecting) {
            Some(true) => self.fail(s, Fail::ConnectTimeout),
            _ if !s.ex.resp_head_done && !s.ex.req_body.complete() && s.ex.req_ready == 0 => self.body_timeout(s),
            _ if !s.ex.resp_head_done => self.fail(s, Fail::UpstreamTimeout),
            _ => {
                let backend = s.ex.up.map(|u| self.backends.get(self.ups[u].backend).addr.to_string());
                slog::warn!(self.log, "timeout while streaming a response; closing";
                    "method" => %String::from_utf8_lossy(s.req.method()), "path" => %String::from_utf8_lossy(s.req.target()),
                    "backend" => backend.unwrap_or_default());
                self.release_upstream(s, false);
                Step::Close
            }
        }
    }
}

impl Core {
    /// A deadline passed while waiting for request body bytes: the idle
    /// timeout (`client_body_ms`), the total one (`client_body_total_ms`),
    /// or the end of a rate window, which opens the next window when the
    /// client kept up (or the backend was the slow side). A body too slow
    /// is answered 408 (a close if anything of a response went out), and
    /// the backend connection it held is closed.
    fn body_timeout(&mut self, s: &mut Session) -> Step {
        let t = &s.snap.config.timeouts;
        let now = self.now;
        let total_passed = s.ex.body_deadline.is_some_and(|d| now >= d);
        let window = t.client_body_rate_window;
        let window_start = s.ex.body_window_start.unwrap_or(now);
        let why = if total_passed {
            "total time"
        } else if now >= window_start + window {
            let least = t.client_body_min_rate_bytes.saturating_mul(window.as_millis() as u64) / 1000;
            if s.ex.body_backpressure || s.ex.body_window_bytes >= least {
                s.ex.body_window_start = Some(now);
                s.ex.body_window_bytes = 0;
                s.ex.body_backpressure = false;
                s.progressed = true;
                return Step::Again;
            }
            "minimum rate"
        } else {
            "idle"
        };
        self.slow_bodies += 1;
        if now.saturating_duration_since(self.slow_bodies_logged) >= Duration::from_secs(1) {
            slog::warn!(self.log, "request body too slow; refused"; "reason" => why, "peer" => ?s.peer,
                "window_bytes" => s.ex.body_window_bytes, "slow_bodies_total" => self.slow_bodies);
            self.slow_bodies_logged = now;
        }
        self.release_upstream(s, false);
        if s.out_pending() {
            return Step::Close;
        }
        s.ex.client_keep = false;
        self.respond(s, 408)
    }
}

/// Methods whose repetition has the effect of one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE")
}
