//! Access log line formats: nginx's exact `combined`, `json`, and a
//! user-defined format of named variables (`custom`). Lines are written
//! straight into the worker's batch; nothing is allocated per line (the
//! batch's capacity is reused, and the time strings are formatted once per
//! second by [`Clock`]).
//!
//! Times are in UTC (`+0000` in `$time_local`, `Z` in ISO 8601).

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::hooks::{Ctx, Finished};

/// A line format, parsed once when the module is built.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Json,
    Combined,
    Custom(Vec<Part>),
}

/// A piece of a custom format.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Var(Var),
    /// `$http_NAME` for a field without a variable of its own: the
    /// field's name, lower case with `_` read as `-` (nginx's rule).
    Header(String),
}

/// The variables of a custom format (nginx's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    RemoteAddr,
    TimeLocal,
    TimeIso8601,
    Request,
    RequestMethod,
    RequestUri,
    ServerProtocol,
    Host,
    Status,
    BodyBytesSent,
    RequestTime,
    UpstreamAddr,
    UpstreamResponseTime,
    HttpUserAgent,
    HttpReferer,
    RequestId,
    Route,
    /// The worker's process id (nginx's `$pid`).
    Pid,
    SslProtocol,
    SslCipher,
}

const VARS: &[(&str, Var)] = &[
    ("remote_addr", Var::RemoteAddr),
    ("time_local", Var::TimeLocal),
    ("time_iso8601", Var::TimeIso8601),
    ("request", Var::Request),
    ("request_method", Var::RequestMethod),
    ("request_uri", Var::RequestUri),
    ("server_protocol", Var::ServerProtocol),
    ("host", Var::Host),
    ("http_host", Var::Host),
    ("status", Var::Status),
    ("body_bytes_sent", Var::BodyBytesSent),
    ("request_time", Var::RequestTime),
    ("upstream_addr", Var::UpstreamAddr),
    ("upstream_response_time", Var::UpstreamResponseTime),
    ("http_user_agent", Var::HttpUserAgent),
    ("http_referer", Var::HttpReferer),
    ("request_id", Var::RequestId),
    ("http_x_request_id", Var::RequestId),
    ("route", Var::Route),
    ("pid", Var::Pid),
    ("ssl_protocol", Var::SslProtocol),
    ("ssl_cipher", Var::SslCipher),
];

impl Format {
    /// `format` and, for `"custom"`, the `custom` template.
    pub fn parse(format: &str, custom: Option<&str>) -> Result<Format, String> {
        match (format, custom) {
            ("json", None) => Ok(Format::Json),
            ("combined", None) => Ok(Format::Combined),
            ("custom", Some(t)) => parse_custom(t).map(Format::Custom),
            ("custom", None) => Err("format = \"custom\" needs a custom = \"$remote_addr ...\" template".into()),
            ("json" | "combined", Some(_)) => Err("custom = \"...\" is used only with format = \"custom\"".into()),
            (other, _) => Err(format!("format = {other:?}: expected \"json\", \"combined\" or \"custom\"")),
        }
    }

    /// Appends one line (without its newline).
    pub fn write(&self, o: &mut String, clock: &mut Clock, d: &Finished<'_>, ctx: &Ctx<'_>) {
        match self {
            Format::Json => json_line(o, clock, d, ctx),
            Format::Combined => combined_line(o, clock, d, ctx),
            Format::Custom(parts) => {
                for p in parts {
                    match p {
                        Part::Text(t) => o.push_str(t),
                        Part::Var(v) => var(o, *v, clock, d, ctx),
                        Part::Header(name) => esc(o, d.headers.get(name).unwrap_or(b"-")),
                    }
                }
            }
        }
    }
}

/// `$name` or `${name}`; `$$` is a dollar sign.
fn parse_custom(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = t;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            text.push('$');
            rest = r;
            continue;
        }
        let (name, after) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| format!("custom: unclosed ${{ in {t:?}"))?;
            (&r[..end], &r[end + 1..])
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        let part = match VARS.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => Part::Var(*v),
            None => match name.strip_prefix("http_") {
                Some(field) if !field.is_empty() => Part::Header(field.to_ascii_lowercase().replace('_', "-")),
                _ => {
                    let known: Vec<&str> = VARS.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "custom: unknown variable ${name}; known: $http_NAME (any request field), ${}",
                        known.join(", $")
                    ));
                }
            },
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(part);
        rest = after;
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// The time strings of the current second, formatted once per second.
#[derive(Debug, Default)]
pub struct Clock {
    sec: u64,
    millis: u32,
    /// `YYYY-MM-DDTHH:MM:SS` (UTC).
    iso: String,
    /// `02/Dec/2026:18:17:00 +0000`, nginx's `$time_local` (UTC).
    local: String,
}

impl Clock {
    /// Takes the time of `now`; reformats only when the second changed.
    pub fn set(&mut self, now: SystemTime) {
        const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.millis = d.subsec_millis();
        if d.as_secs() == self.sec && !self.iso.is_empty() {
            return;
        }
        self.sec = d.as_secs();
        let c = crate::timefmt::civil(self.sec);
        self.iso.clear();
        let _ = write!(self.iso, "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", c.0, c.1, c.2, c.3, c.4, c.5);
        self.local.clear();
        let month = MONTHS.get(c.1 as usize - 1).copied().unwrap_or("Jan");
        let _ = write!(self.local, "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000", c.2, c.0, c.3, c.4, c.5);
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn write_iso(&self, o: &mut String) {
        o.push_str(&self.iso);
        let _ = write!(o, ".{:03}Z", self.millis);
    }

    pub fn local(&self) -> &str {
        &self.local
    }
}

fn client(o: &mut String, ctx: &Ctx<'_>) {
    match ctx.client {
        Some(ip) => {
            let _ = write!(o, "{ip}");
        }
        None => o.push_str("unix"),
    }
}

/// One JSON object, written directly (no intermediate value tree).
fn json_line(o: &mut String, clock: &Clock, d: &Finished<'_>, ctx: &Ctx<'_>) {
    o.push_str("{\"time\":\"");
    clock.write_iso(o);
    o.push_str("\",\"client\":\"");
    client(o, ctx);
    o.push_str("\",\"method\":");
    json_str(o, d.method);
    o.push_str(",\"path\":");
    json_str(o, d.target);
    o.push_str(",\"host\":");
    json_str(o, d.host);
    let _ = write!(o, ",\"status\":{},\"bytes\":{},\"duration_ms\":", d.status, d.bytes);
    millis(o, d.duration);
    o.push_str(",\"backend\":");
    match d.backend {
        Some(b) => json_str(o, b.as_bytes()),
        None => o.push_str("null"),
    }
    o.push_str(",\"upstream_ms\":");
    match d.upstream_time {
        Some(t) => millis(o, t),
        None => o.push_str("null"),
    }
    o.push_str(",\"route\":");
    match ctx.route {
        Some(r) => json_str(o, r.name.as_bytes()),
        None => o.push_str("null"),
    }
    o.push_str(",\"user_agent\":");
    json_str(o, d.user_agent());
    o.push_str(",\"request_id\":");
    json_str(o, d.request_id());
    o.push('}');
}

/// Milliseconds with three decimals (the JSON format's timings; the
/// records receiver prints them the same way).
pub fn millis(o: &mut String, t: std::time::Duration) {
    let _ = write!(o, "{:.3}", t.as_secs_f64() * 1000.0);
}

/// A JSON string of bytes (invalid UTF-8 replaced).
pub fn json_str(o: &mut String, b: &[u8]) {
    o.push('"');
    for c in String::from_utf8_lossy(b).chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
}

/// Bytes as nginx escapes them in a log line: `"`, `\`, controls and
/// non-ASCII as `\xHH`; empty as `-`.
fn esc(o: &mut String, b: &[u8]) {
    if b.is_empty() {
        o.push('-');
        return;
    }
    for &c in b {
        if c == b'"' || c == b'\\' || !(0x20..0x7f).contains(&c) {
            let _ = write!(o, "\\x{c:02X}");
        } else {
            o.push(c as char);
        }
    }
}

/// nginx's `combined`, exactly:
/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"`.
fn combined_line(o: &mut String, clock: &Clock, d: &Finished<'_>, ctx: &Ctx<'_>) {
    client(o, ctx);
    o.push_str(" - - [");
    o.push_str(clock.local());
    o.push_str("] \"");
    request(o, d);
    let _ = write!(o, "\" {} {} \"", d.status, d.bytes);
    esc(o, d.referer());
    o.push_str("\" \"");
    esc(o, d.user_agent());
    o.push('"');
}

fn request(o: &mut String, d: &Finished<'_>) {
    esc(o, d.method);
    o.push(' ');
    esc(o, d.target);
    o.push(' ');
    o.push_str(d.version);
}

fn seconds(o: &mut String, t: std::time::Duration) {
    let _ = write!(o, "{:.3}", t.as_secs_f64());
}

fn var(o: &mut String, v: Var, clock: &Clock, d: &Finished<'_>, ctx: &Ctx<'_>) {
    match v {
        Var::RemoteAddr => client(o, ctx),
        Var::TimeLocal => o.push_str(clock.local()),
        Var::TimeIso8601 => clock.write_iso(o),
        Var::Request => request(o, d),
        Var::RequestMethod => esc(o, d.method),
        Var::RequestUri => esc(o, d.target),
        Var::ServerProtocol => o.push_str(d.version),
        Var::Host => esc(o, d.host),
        Var::Status => {
            let _ = write!(o, "{}", d.status);
        }
        Var::BodyBytesSent => {
            let _ = write!(o, "{}", d.bytes);
        }
        Var::RequestTime => seconds(o, d.duration),
        Var::UpstreamAddr => o.push_str(d.backend.unwrap_or("-")),
        Var::UpstreamResponseTime => match d.upstream_time {
            Some(t) => seconds(o, t),
            None => o.push('-'),
        },
        Var::HttpUserAgent => esc(o, d.user_agent()),
        Var::HttpReferer => esc(o, d.referer()),
        Var::RequestId => esc(o, d.request_id()),
        Var::Route => o.push_str(ctx.route.map_or("-", |r| r.name.as_str())),
        Var::Pid => {
            use std::fmt::Write;
            let _ = write!(o, "{}", std::process::id());
        }
        Var::SslProtocol => o.push_str(d.tls.map_or("-", |t| t.0)),
        Var::SslCipher => o.push_str(d.tls.map_or("-", |t| t.1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_strings_are_escaped() {
        let mut o = String::new();
        json_str(&mut o, b"a\"b\\c\nd");
        assert_eq!(o, r#""a\"b\\c\u000ad""#);
        let v: serde_json::Value = serde_json::from_str(&o).unwrap();
        assert_eq!(v, "a\"b\\c\nd");
    }

    #[test]
    fn the_clock_formats_time_local_and_keeps_it_for_the_second() {
        let mut c = Clock::default();
        c.set(UNIX_EPOCH + Duration::from_millis(1_795_608_000_123));
        assert_eq!(c.local(), "25/Nov/2026:12:00:00 +0000");
        let mut o = String::new();
        c.set(UNIX_EPOCH + Duration::from_millis(1_795_608_000_987));
        c.write_iso(&mut o);
        assert_eq!(o, "2026-11-25T12:00:00.987Z");
        c.set(UNIX_EPOCH + Duration::from_millis(1_795_608_001_000));
        assert_eq!(c.local(), "25/Nov/2026:12:00:01 +0000");
    }

    #[test]
    fn custom_templates_name_variables() {
        let f = Format::parse("custom", Some("$remote_addr [${time_local}] \"$request\" $$ $status")).unwrap();
        let Format::Custom(parts) = f else { panic!("custom") };
        assert_eq!(
            parts,
            vec![
                Part::Var(Var::RemoteAddr),
                Part::Text(" [".into()),
                Part::Var(Var::TimeLocal),
                Part::Text("] \"".into()),
                Part::Var(Var::Request),
                Part::Text("\" $ ".into()),
                Part::Var(Var::Status),
            ]
        );
        let e = Format::parse("custom", Some("$remote_addr $nope")).unwrap_err();
        assert!(e.contains("$nope"), "{e}");
        assert!(Format::parse("custom", None).is_err());
        assert!(Format::parse("xml", None).is_err());
        assert_eq!(Format::parse("combined", None), Ok(Format::Combined));
    }

    #[test]
    fn combined_escapes_like_nginx() {
        let mut o = String::new();
        esc(&mut o, b"a\"b\\\x01\xc3");
        assert_eq!(o, "a\\x22b\\x5C\\x01\\xC3");
        o.clear();
        esc(&mut o, b"");
        assert_eq!(o, "-");
    }
}
