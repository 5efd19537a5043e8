//! The loggers of a connection and of a request: the worker's logger with
//! the keys that name what a line is about (`worker`, `conn`, `peer`; and
//! for a request `req`, `method`, `path`, `cluster`, `backend`), so a log
//! site types only what is particular to it.
//!
//! Cost: nothing until a line is logged. A request's logger is built at
//! its first line (one allocation) and kept for the request's later lines;
//! it is dropped when the request ends or its backend changes. Debug lines
//! compile out of release builds, builder included.

use slog::{Logger, Record, Serializer, KV};

use crate::net::Peer;

use super::core::Core;
use super::session::Session;
use super::token;

/// Keys of a client connection.
struct ConnKeys {
    worker: usize,
    conn: usize,
    peer: Peer,
}

impl KV for ConnKeys {
    fn serialize(&self, _: &Record, ser: &mut dyn Serializer) -> slog::Result {
        ser.emit_arguments("peer", &format_args!("{:?}", self.peer))?;
        ser.emit_usize("conn", self.conn)?;
        ser.emit_usize("worker", self.worker)
    }
}

/// Keys of a request (besides its connection's).
struct RequestKeys {
    conn: ConnKeys,
    req: String,
    method: String,
    path: String,
    cluster: Option<String>,
    backend: Option<String>,
}

impl KV for RequestKeys {
    fn serialize(&self, r: &Record, ser: &mut dyn Serializer) -> slog::Result {
        if let Some(b) = &self.backend {
            ser.emit_str("backend", b)?;
        }
        if let Some(c) = &self.cluster {
            ser.emit_str("cluster", c)?;
        }
        ser.emit_str("path", &self.path)?;
        ser.emit_str("method", &self.method)?;
        ser.emit_str("req", &self.req)?;
        self.conn.serialize(r, ser)
    }
}

impl Core {
    fn conn_keys(&self, s: &Session) -> ConnKeys {
        ConnKeys { worker: self.place, conn: token::decode(mio::Token(s.key)).1, peer: s.peer }
    }

    /// A logger for a line about the connection (no request parsed yet).
    pub(super) fn conn_log(&self, s: &Session) -> Logger {
        self.log.new(slog::o!(self.conn_keys(s)))
    }

    /// The current request's logger, built at its first use.
    pub(super) fn req_log<'a>(&'a self, s: &'a mut Session) -> &'a Logger {
        if s.log.is_none() {
            let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let cluster = s.ex.cluster_chosen.then(|| s.snap.clusters.get(s.ex.cluster)).flatten();
            // The backend of the current attempt, once one was chosen.
            let backend = s.ex.upstream_started.and(cluster).and_then(|c| c.members.get(s.ex.backend));
            let keys = RequestKeys {
                conn: self.conn_keys(s),
                req: lossy(s.req.head.get("x-request-id").unwrap_or(b"")),
                method: lossy(s.req.method()),
                path: lossy(s.req.target()),
                cluster: cluster.map(|c| c.name.clone()),
                backend: backend.map(|m| self.backends.get(m.id).addr.to_string()),
            };
            s.log = Some(self.log.new(slog::o!(keys)));
        }
        match &s.log {
            Some(l) => l,
            None => &self.log,
        }
    }
}
