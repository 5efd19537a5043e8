//! The access record shipped over a stream (`records = ...`): a prost
//! message written by hand to mirror `proto/access_record.proto` exactly,
//! so that no `protoc` is needed at build time (a unit test compares the
//! field numbers and types with the `.proto` text). Also its JSON form,
//! which is the JSON access log format's line: the `pitcher-records`
//! receiver prints it.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::hooks::{Ctx, Finished};

use super::format::{self, Clock};

/// `pitcher.access.AccessRecord` (see the `.proto` for each field).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccessRecord {
    /// When the request finished, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "1")]
    pub time_unix_ms: u64,
    /// The client address (`unix` for a Unix-socket client).
    #[prost(string, tag = "2")]
    pub client: String,
    /// The request method.
    #[prost(string, tag = "3")]
    pub method: String,
    /// The request target as received.
    #[prost(string, tag = "4")]
    pub path: String,
    /// The Host the request was routed by.
    #[prost(string, tag = "5")]
    pub host: String,
    /// The status the client got.
    #[prost(uint32, tag = "6")]
    pub status: u32,
    /// Response body bytes sent to the client.
    #[prost(uint64, tag = "7")]
    pub bytes: u64,
    /// From the first byte of the request head to the end of the response, in nanoseconds.
    #[prost(uint64, tag = "8")]
    pub duration_ns: u64,
    /// The backend that answered (empty: none).
    #[prost(string, tag = "9")]
    pub backend: String,
    /// Time spent on the backend, in nanoseconds (absent: no backend).
    #[prost(uint64, optional, tag = "10")]
    pub upstream_ns: Option<u64>,
    /// The index of the route matched, as text (empty: none).
    #[prost(string, tag = "11")]
    pub route: String,
    /// The User-Agent field.
    #[prost(string, tag = "12")]
    pub user_agent: String,
    /// The X-Request-Id of the request.
    #[prost(string, tag = "13")]
    pub request_id: String,
}

fn set(s: &mut String, b: &[u8]) {
    s.clear();
    s.push_str(&String::from_utf8_lossy(b));
}

impl AccessRecord {
    /// Fills the record in place (its strings keep their capacity: one
    /// record is reused for every request of a worker).
    pub fn fill(&mut self, now: SystemTime, d: &Finished<'_>, ctx: &Ctx<'_>) {
        self.time_unix_ms = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        self.client.clear();
        match ctx.client {
            Some(ip) => {
                let _ = write!(self.client, "{ip}");
            }
            None => self.client.push_str("unix"),
        }
        set(&mut self.method, d.method);
        set(&mut self.path, d.target);
        set(&mut self.host, d.host);
        self.status = u32::from(d.status);
        self.bytes = d.bytes;
        self.duration_ns = d.duration.as_nanos() as u64;
        set(&mut self.backend, d.backend.unwrap_or("").as_bytes());
        self.upstream_ns = d.upstream_time.map(|t| t.as_nanos() as u64);
        set(&mut self.route, ctx.route.map_or("", |r| r.name.as_str()).as_bytes());
        set(&mut self.user_agent, d.user_agent());
        set(&mut self.request_id, d.request_id());
    }

    /// The record as the JSON access log would have written it.
    pub fn to_json(&self) -> String {
        let mut o = String::with_capacity(256);
        o.push_str("{\"time\":\"");
        let mut clock = Clock::default();
        clock.set(UNIX_EPOCH + Duration::from_millis(self.time_unix_ms));
        clock.write_iso(&mut o);
        o.push_str("\",\"client\":");
        format::json_str(&mut o, self.client.as_bytes());
        o.push_str(",\"method\":");
        format::json_str(&mut o, self.method.as_bytes());
        o.push_str(",\"path\":");
        format::json_str(&mut o, self.path.as_bytes());
        o.push_str(",\"host\":");
        format::json_str(&mut o, self.host.as_bytes());
        let _ = write!(o, ",\"status\":{},\"bytes\":{},\"duration_ms\":", self.status, self.bytes);
        format::millis(&mut o, Duration::from_nanos(self.duration_ns));
        o.push_str(",\"backend\":");
        opt_str(&mut o, &self.backend);
        o.push_str(",\"upstream_ms\":");
        match self.upstream_ns {
            Some(t) => format::millis(&mut o, Duration::from_nanos(t)),
            None => o.push_str("null"),
        }
        o.push_str(",\"route\":");
        opt_str(&mut o, &self.route);
        o.push_str(",\"user_agent\":");
        format::json_str(&mut o, self.user_agent.as_bytes());
        o.push_str(",\"request_id\":");
        format::json_str(&mut o, self.request_id.as_bytes());
        o.push('}');
        o
    }
}

fn opt_str(o: &mut String, s: &str) {
    if s.is_empty() {
        o.push_str("null");
    } else {
        format::json_str(o, s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// (number, type, name, optional) of each field declared in the `.proto`.
    fn proto_fields() -> Vec<(u32, String, String, bool)> {
        let text = include_str!("../../../../proto/access_record.proto");
        let body = text.split("message AccessRecord {").nth(1).expect("message AccessRecord");
        let body = body.split('}').next().unwrap_or("");
        body.lines()
            .map(|l| l.split("//").next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| {
                let l = l.trim_end_matches(';');
                let (decl, num) = l.split_once('=').expect("field = number");
                let words: Vec<&str> = decl.split_whitespace().collect();
                let optional = words[0] == "optional";
                let w = if optional { &words[1..] } else { &words[..] };
                (num.trim().parse().expect("field number"), w[0].to_string(), w[1].to_string(), optional)
            })
            .collect()
    }

    #[test]
    fn the_structs_match_the_proto_file() {
        let fields = proto_fields();
        // What the derive says, field by field (name, number, type, optional).
        let ours: Vec<(u32, &str, &str, bool)> = vec![
            (1, "uint64", "time_unix_ms", false),
            (2, "string", "client", false),
            (3, "string", "method", false),
            (4, "string", "path", false),
            (5, "string", "host", false),
            (6, "uint32", "status", false),
            (7, "uint64", "bytes", false),
            (8, "uint64", "duration_ns", false),
            (9, "string", "backend", false),
            (10, "uint64", "upstream_ns", true),
            (11, "string", "route", false),
            (12, "string", "user_agent", false),
            (13, "string", "request_id", false),
        ];
        let theirs: Vec<(u32, &str, &str, bool)> =
            fields.iter().map(|(n, t, f, o)| (*n, t.as_str(), f.as_str(), *o)).collect();
        assert_eq!(theirs, ours);
        // And the derive encodes each field under that number and wire type:
        // a record with every field set has each tag once, in order.
        let r = AccessRecord {
            time_unix_ms: 1,
            client: "c".into(),
            method: "m".into(),
            path: "p".into(),
            host: "h".into(),
            status: 2,
            bytes: 3,
            duration_ns: 4,
            backend: "b".into(),
            upstream_ns: Some(0),
            route: "r".into(),
            user_agent: "u".into(),
            request_id: "i".into(),
        };
        let bytes = r.encode_to_vec();
        let mut tags = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let key = bytes[i];
            let (num, wire) = (u32::from(key >> 3), key & 7);
            tags.push((num, wire));
            i += 1;
            match wire {
                0 => i += 1,                         // one-byte varints here
                2 => i += 1 + usize::from(bytes[i]), // one-byte lengths here
                w => panic!("wire type {w}"),
            }
        }
        let want: Vec<(u32, u8)> = ours.iter().map(|(n, t, _, _)| (*n, if *t == "string" { 2 } else { 0 })).collect();
        assert_eq!(tags, want);
        assert_eq!(AccessRecord::decode(bytes.as_slice()).unwrap(), r);
    }

    #[test]
    fn the_json_form_is_the_json_formats_line() {
        let r = AccessRecord {
            time_unix_ms: 1_795_608_000_123,
            client: "127.0.0.1".into(),
            method: "GET".into(),
            path: "/a\"b".into(),
            host: "h.example".into(),
            status: 200,
            bytes: 9,
            duration_ns: 1_234_567,
            backend: String::new(),
            upstream_ns: None,
            route: "main".into(),
            user_agent: "ua".into(),
            request_id: "id1".into(),
        };
        assert_eq!(
            r.to_json(),
            r#"{"time":"2026-11-25T12:00:00.123Z","client":"127.0.0.1","method":"GET","path":"/a\"b","host":"h.example","status":200,"bytes":9,"duration_ms":1.235,"backend":null,"upstream_ms":null,"route":"main","user_agent":"ua","request_id":"id1"}"#
        );
    }
}
