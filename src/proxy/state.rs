//! The states of a client connection, each with what is valid in it,
//! and the result of a state step. A step takes its state by value and
//! returns the next one (`Next`), so a state that does not hold a backend
//! connection cannot use one, and a state's data cannot outlive it.
//!
//! ```text
//!                accept
//!                  │
//!                  ▼
//!   ┌────────► Head { started } ──────── EOF, read error ─────────────► closed
//!   │              │ head parsed (start_request): route, BEFORE_CLUSTER,
//!   │              │ pick backend, AFTER_CLUSTER, open a connection
//!   │              ├── refused (4xx), 404, 502, a module answers, 408 ──┐
//!   │              ▼                                                    ▼
//!   │          Proxy(Proxying) ── failure before the response, ────► Local { keep }
//!   │           │   │   │         a module answers (respond)            │
//!   │           │   │   └── failure: retry ──► Proxy (new connection)   │
//!   │           │   └── 101 ──► Tunnel(Tunnel) ── both sides closed ──► closed
//!   │           │ response complete (finish)                            │
//!   │           ▼                                                       │
//!   └── keep ── end_exchange ◄───────────────────── response written ────┘
//!                  │ no keep
//!                  ├── unread input ──► Linger ── EOF, deadline ──► closed
//!                  └── nothing unread ──────────────────────────► closed
//! ```
//!
//! A failure after the response started, a client that goes away, or a
//! module's `Close` ends in `closed` from any state; closing gives back the
//! backend connection the state holds (`Core::leave_state`).
//!
//! Where each step lives: `Head` and `Local`, the end of an exchange and
//! `Linger` in `request`; `Proxy` in `forward`; `Tunnel` in `tunnel`;
//! `drive`, which runs the steps, in `session`.

use std::net::IpAddr;
use std::time::Instant;

use crate::http::write as hw;
use crate::http::{RequestHead, ResponseHead};

use super::exchange::{Body, Exchange};
use super::splice::Pipe;

/// Where a session is, with what is valid there.
#[derive(Debug)]
pub enum State {
    /// Reading a request head: idle between requests (`started: None`)
    /// or partial (`started`: when its first byte arrived).
    Head { started: Option<Instant> },
    /// An exchange with a backend: its connection and the framing state
    /// of both directions.
    Proxy(Box<Proxying>),
    /// Writing a response Pitcher made; then the next request (`keep`)
    /// or the end of the connection.
    Local { keep: bool },
    /// After a 101 Switching Protocols: bytes both ways.
    Tunnel(Tunnel),
    /// Our side is done: the client's unread input is drained before
    /// closing, so the last response is not destroyed by a reset.
    Linger,
    /// Nothing left to do (and the value a state step leaves behind while
    /// it owns the state).
    Closed,
}

/// What a state step says to `drive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The state changed or more may be possible: step again.
    Again,
    /// Nothing can move until the next event or deadline.
    Blocked,
    /// Close the session.
    Close,
}

/// A state step's result: the next state, and whether to go on. (On
/// `Close` the state is kept until the session is closed, which gives
/// back the backend connection it may hold.)
pub type Next = (State, Step);

/// How the response body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RespMode {
    /// As received (length, chunked, or close-delimited to a closing client).
    #[default]
    Pass,
    /// Close-delimited from the backend, re-framed as chunked.
    Reframe,
    /// Chunked from the backend, decoded for an HTTP/1.0 client.
    Decode,
}

/// What only an exchange with a backend has: the connection, what of the
/// request went up, and the framing of the response coming down.
#[derive(Debug)]
pub struct Proxying {
    /// The backend connection (index of its [`UpConn`](super::core::UpConn)).
    pub(super) up: usize,
    /// Request head (and re-framed chunk framing) for the backend, and how
    /// much of it is written.
    pub(super) up_out: Vec<u8>,
    pub(super) up_out_pos: usize,
    /// Length of the request head at the front of `up_out` (0 once it was
    /// dropped from there).
    pub(super) up_head_len: usize,
    /// A byte of the body (data or framing) went to the backend: the
    /// request can not be replayed.
    pub(super) body_out: bool,
    /// The backend's response head (here, not in the session: an idle
    /// connection does not carry it; its allocation stays with this box).
    pub(super) resp: ResponseHead,
    pub(super) resp_head_done: bool,
    pub(super) resp_body: Body,
    pub(super) resp_mode: RespMode,
    /// Scanned response body bytes at the front of the upstream buffer.
    pub(super) resp_ready: usize,
    /// The backend's side ended (FIN or error).
    pub(super) resp_eof: bool,
    /// The backend's connection ended with an error (reset), not a FIN: a
    /// close-delimited body is then truncated, not complete.
    pub(super) resp_reset: bool,
    /// Reframe mode: data bytes left of the chunk being written.
    pub(super) chunk_left: usize,
    pub(super) last_chunk_queued: bool,
    /// The backend's connection may serve another request.
    pub(super) upstream_keep: bool,
    /// Interim (1xx) response heads received, and their bytes.
    pub(super) interim: u32,
    pub(super) interim_bytes: usize,
    /// Pitcher sent the client a `100 Continue` (a backend's is not relayed).
    pub(super) continue_sent: bool,
    /// The pace of a request body still to come (`None`: no body to wait for).
    pub(super) body_pace: Option<BodyPace>,
    /// The response body goes through this pipe by `splice(2)` (taken
    /// from the worker's pool, given back by `leave_proxy`).
    pub(super) pipe: Option<Pipe>,
    /// No pipe could be opened for this body: it goes through the buffer.
    pub(super) no_pipe: bool,
}

/// How fast a request body arrives: its deadline (`client_body_total_ms`)
/// and the current rate window.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    pub(super) deadline: Instant,
    /// When the current window started.
    pub(super) window_start: Instant,
    /// Body bytes read in the current window.
    pub(super) window_bytes: u64,
    /// The backend held the body back in this window (then it is not judged).
    pub(super) backpressure: bool,
}

impl Proxying {
    /// An exchange over connection `up`, in the allocation of the
    /// session's previous exchange when there is one (`spare`): a state
    /// that moves is then a pointer, and no request allocates one.
    pub(super) fn start(spare: Option<Box<Proxying>>, up: usize) -> Box<Proxying> {
        match spare {
            Some(mut p) => {
                let up_out = std::mem::take(&mut p.up_out);
                let mut resp = std::mem::take(&mut p.resp);
                resp.head.clear();
                *p = Proxying::fresh(up, up_out, resp);
                p
            }
            None => Box::new(Proxying::fresh(up, Vec::new(), ResponseHead::default())),
        }
    }

    /// An exchange over connection `up`; `up_out` is an empty allocation
    /// for the request head, `resp` an empty response head.
    fn fresh(up: usize, up_out: Vec<u8>, resp: ResponseHead) -> Proxying {
        Proxying {
            up,
            up_out,
            up_out_pos: 0,
            up_head_len: 0,
            body_out: false,
            resp,
            resp_head_done: false,
            resp_body: Body::None,
            resp_mode: RespMode::Pass,
            resp_ready: 0,
            resp_eof: false,
            resp_reset: false,
            chunk_left: 0,
            last_chunk_queued: false,
            upstream_keep: false,
            interim: 0,
            interim_bytes: 0,
            continue_sent: false,
            body_pace: None,
            pipe: None,
            no_pipe: false,
        }
    }

    /// Queues the rewritten request head for the backend.
    pub(super) fn queue_head(&mut self, req: &RequestHead, client: Option<IpAddr>, scheme: hw::Scheme, upgrade: bool) {
        hw::request_head(&mut self.up_out, req, client, scheme, upgrade);
        self.up_head_len = self.up_out.len();
    }

    /// Response body bytes in the pipe, not yet written to the client.
    pub(super) fn piped(&self) -> usize {
        self.pipe.as_ref().map_or(0, |p| p.len)
    }

    /// The whole request (head and body) has reached the backend.
    pub(super) fn request_sent(&self, ex: &Exchange) -> bool {
        self.up_out_pos == self.up_out.len() && ex.body_read()
    }

    /// This exchange's allocations, emptied, for the session to keep
    /// for its next exchange.
    pub(super) fn recycle(mut self: Box<Self>) -> Box<Self> {
        self.up_out.clear();
        self
    }
}

/// What only a tunnel has: the backend connection and each direction's end.
#[derive(Debug)]
pub struct Tunnel {
    /// The backend connection (index of its [`UpConn`](super::core::UpConn)).
    pub(super) up: usize,
    /// The backend sent its FIN (or failed).
    pub(super) resp_eof: bool,
    /// The client sent its FIN (or failed).
    pub(super) client_eof: bool,
    /// The backend's FIN was passed on to the client.
    pub(super) client_shut: bool,
    /// The client's FIN was passed on to the backend.
    pub(super) up_shut: bool,
}

impl Tunnel {
    /// A tunnel over connection `up`; `resp_eof`: the backend already
    /// closed its side.
    pub(super) fn new(up: usize, resp_eof: bool) -> Tunnel {
        Tunnel { up, resp_eof, client_eof: false, client_shut: false, up_shut: false }
    }
}
