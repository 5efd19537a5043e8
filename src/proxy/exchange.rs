//! The record of the current request ([`Exchange`]: what it is, where it
//! went, how it ended), valid from its head to its end whatever the
//! session's state, and [`Body`], the framing state of a body.

use std::time::Instant;

use crate::http::{ChunkedScanner, Framing, HttpError};

/// Body framing state of one direction, as scanned so far.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    None,
    /// Bytes not yet scanned.
    Length(u64),
    Chunked(ChunkedScanner),
    /// Until the sender closes.
    Close,
}

impl Body {
    pub fn from_framing(f: Framing) -> Body {
        match f {
            Framing::None | Framing::Length(0) => Body::None,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedScanner::new()),
            Framing::Close => Body::Close,
        }
    }

    /// Every byte of the body has been scanned (Close: never, until EOF).
    pub fn complete(&self) -> bool {
        match self {
            Body::None => true,
            Body::Length(n) => *n == 0,
            Body::Chunked(s) => s.is_done(),
            Body::Close => false,
        }
    }

    /// Scans `data` (bytes that follow those already scanned); returns how
    /// many belong to the body.
    pub fn scan(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        Ok(match self {
            Body::None => 0,
            Body::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                n as usize
            }
            Body::Chunked(s) => s.scan_through(data).map_err(HttpError::Chunked)?,
            Body::Close => data.len(),
        })
    }
}

/// The record of one request: what it is, where it went, how it ended.
/// Valid from its head to its end, whatever the session's state; reset
/// when the next head is parsed. (What only an exchange with a backend
/// has is in [`Proxying`](super::state::Proxying).)
#[derive(Debug, Default)]
pub struct Exchange {
    /// The route matched, if any.
    pub route: Option<usize>,
    /// The cluster (index in the snapshot), when `cluster_chosen`.
    pub cluster: usize,
    /// `cluster` holds a choice (from the route or a module).
    pub cluster_chosen: bool,
    /// The backend of the current attempt (index among the cluster's members).
    pub backend: usize,
    /// Backends tried for this request (bit per backend index).
    pub tried: u64,
    /// Connect attempts that failed.
    pub failed: u32,
    /// Resends on a fresh connection after a pooled one turned out closed.
    pub replays: u32,
    pub head_request: bool,
    /// An upgrade (WebSocket) the configuration allows was asked for.
    pub upgrade: bool,
    /// The client connection may serve another request.
    pub client_keep: bool,
    /// The client asked for the connection to close after this request
    /// (`Connection: close`, or HTTP/1.0 without keep-alive); then
    /// `client_keep` is false from the start and stays so.
    pub client_closes: bool,
    /// The request body's framing, as read from the client so far.
    pub req_body: Body,
    /// Scanned request body bytes at the front of the client buffer.
    pub req_ready: usize,
    pub started: Option<Instant>,
    /// When the request started going to a backend (for upstream time).
    pub upstream_started: Option<Instant>,
    /// The status the client got (from the backend or from Pitcher).
    pub status: u16,
    /// Response body bytes written to the client.
    pub bytes_out: u64,
    /// REQUEST_FINISH is still owed for this exchange.
    pub finish_pending: bool,
}

impl Exchange {
    pub(super) fn reset(&mut self) {
        *self = Exchange::default();
    }

    /// The request's whole body has been read and passed on (or dropped).
    pub(super) fn body_read(&self) -> bool {
        self.req_body.complete() && self.req_ready == 0
    }
}
