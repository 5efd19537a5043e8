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

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects the keys and values a KV emits.
    struct Collect(Vec<(String, String)>);

    impl Serializer for Collect {
        fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
            self.0.push((key.to_string(), val.to_string()));
            Ok(())
        }
    }

    fn emitted(kv: &dyn KV) -> Vec<(String, String)> {
        let mut c = Collect(Vec::new());
        let rs = slog::record_static!(slog::Level::Info, "");
        kv.serialize(&Record::new(&rs, &format_args!(""), slog::b!()), &mut c).unwrap();
        c.0.sort();
        c.0
    }

    #[test]
    fn a_request_logger_names_worker_connection_request_and_backend() {
        let conn = ConnKeys { worker: 3, conn: 17, peer: Peer::Unix };
        let keys = RequestKeys {
            conn,
            req: "abc".into(),
            method: "GET".into(),
            path: "/x".into(),
            cluster: Some("api".into()),
            backend: Some("127.0.0.1:8080".into()),
        };
        let got = emitted(&keys);
        let want: Vec<(String, String)> = [
            ("backend", "127.0.0.1:8080"),
            ("cluster", "api"),
            ("conn", "17"),
            ("method", "GET"),
            ("path", "/x"),
            ("peer", "Unix"),
            ("req", "abc"),
            ("worker", "3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        // Before a backend is chosen, no backend or cluster key.
        let keys = RequestKeys { cluster: None, backend: None, ..keys };
        let names: Vec<String> = emitted(&keys).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["conn", "method", "path", "peer", "req", "worker"]);
    }
}
