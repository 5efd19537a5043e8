//! One `[[routes]]` entry: what it matches (host, path, method, header,
//! cookie, query) and what it does (proxy to a cluster or a weighted split,
//! with path and Host rewrites; redirect; a fixed local response), parsed
//! from the file and validated. The lookup structures built from these are
//! in [`crate::router`].
//!
//! Must not: match requests (that is the router's business).

use std::collections::HashMap;
use std::fmt;

use super::spanned::Spanned;
use serde::Deserialize;

/// A compiled regular expression (byte-oriented, linear-time), compared by
/// its text.
#[derive(Clone)]
pub struct Pattern(pub regex::bytes::Regex);

impl Pattern {
    /// Compiles `re`; the error says which key holds it.
    pub fn new(key: &str, re: &str) -> Result<Pattern, String> {
        regex::bytes::Regex::new(re).map(Pattern).map_err(|e| format!("{key} {re:?} is not a valid regex: {e}"))
    }
    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.as_str())
    }
}

/// How a route matches the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Any host (the route has no `host`).
    Any,
    /// Exactly this host (lower case, no port).
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches any host ending in it.
    Suffix(String),
    /// `host_regex`: matched against the lower-case, port-less host.
    Regex(Pattern),
}

/// How a route matches the (normalised) request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `path`: exactly this path.
    Exact(String),
    /// `path_prefix` (default `/`): paths starting with these bytes.
    Prefix(String),
    /// `path_regex`: paths the regex finds a match in.
    Regex(Pattern),
}

/// What a header, cookie or query parameter must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    /// Present, with any value.
    Present,
    /// Equal to this value (bytes as sent).
    Equals(String),
    /// A value the regex finds a match in.
    Regex(Pattern),
}

/// Where a condition looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A request header field (its first occurrence; name case-insensitive).
    Header,
    /// A cookie of the `Cookie` field(s).
    Cookie,
    /// A parameter of the target's query (as sent: not percent-decoded).
    Query,
}

/// A condition besides host and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Header, cookie or query parameter.
    pub source: Source,
    /// Its name (header names are compared case-insensitively).
    pub name: String,
    /// What its value must be.
    pub value: ValueMatch,
}

/// The Host field the backend gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's (default).
    Keep,
    /// The chosen backend's address (`ip:port`; `localhost` for a Unix
    /// socket). A retry on another backend after the head was queued keeps
    /// the first backend's.
    Backend,
    /// This value.
    Literal(String),
}

/// What happens to the path before the request goes to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAction {
    /// Nothing: the backend gets the target as received.
    Keep,
    /// `strip_prefix = true`: the matched `path_prefix` is removed.
    StripPrefix,
    /// `replace_prefix = "/new"`: the matched `path_prefix` becomes this.
    ReplacePrefix(String),
    /// `rewrite = { regex, replacement }`: the first match in the path is
    /// replaced (`$1`, `${name}` refer to groups).
    Rewrite {
        /// What is replaced.
        regex: Pattern,
        /// What replaces it.
        replacement: String,
    },
}

/// Sticky split: which request value keeps a client on one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// This header's value.
    Header(String),
    /// This cookie's value.
    Cookie(String),
}

/// One cluster of a split and its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitArm {
    /// Index into [`super::Config::clusters`].
    pub cluster: usize,
    /// Relative share (1..=10000).
    pub weight: u32,
}

/// What a route does with a request it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to a cluster (one arm: `cluster`; several: `split`).
    Proxy {
        /// The clusters and their weights.
        arms: Vec<SplitArm>,
        /// Sum of the weights.
        total_weight: u32,
        /// A split keyed by a request value instead of chance.
        sticky: Option<Sticky>,
        /// Path rewrite.
        path: PathAction,
        /// The Host the backend gets.
        host_header: HostHeader,
    },
    /// Answer with a redirect to `to` with its variables expanded.
    Redirect {
        /// 301, 302, 307 or 308.
        status: u16,
        /// The Location template (`$scheme`, `$host`, `$request_uri`).
        to: String,
    },
    /// Answer with a fixed response.
    Return {
        /// Its status.
        status: u16,
        /// Its body.
        body: String,
        /// Its Content-Type.
        content_type: String,
    },
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// For logs and quotas: `name`, or `route<N>` (1-based, in file order).
    pub name: String,
    /// Which hosts the route matches.
    pub host: HostMatch,
    /// Which paths it matches.
    pub path: PathMatch,
    /// Methods it matches (upper case); empty: any.
    pub methods: Vec<String>,
    /// Header, cookie and query conditions, all of which must hold.
    pub conditions: Vec<Condition>,
    /// What it does.
    pub action: Action,
    /// Module names for this route, in order; `None`: the global order.
    pub modules: Option<Vec<String>>,
    /// Shed first when the worker is overloaded (degrade level 2).
    pub low_priority: bool,
}

impl RouteConfig {
    /// The cluster of a route that proxies to one cluster (the first arm of
    /// a split); `None` for redirects and local responses.
    pub fn cluster(&self) -> Option<usize> {
        match &self.action {
            Action::Proxy { arms, .. } => arms.first().map(|a| a.cluster),
            Action::Redirect { .. } | Action::Return { .. } => None,
        }
    }
}

/// `header`, `cookie`, `query`: `{ name = "...", value = "..." }` or
/// `{ name = "...", regex = "..." }` or `{ name = "..." }` (present).
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMatch {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileArm {
    cluster: String,
    weight: u32,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSticky {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    to: String,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileReturn {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRewrite {
    regex: String,
    replacement: String,
}

/// A `[[routes]]` entry as written. Every key is documented in
/// `conf/pitcher.toml`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_regex: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_prefix: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_regex: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    methods: Option<Spanned<Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Spanned<FileMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie: Option<Spanned<FileMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<Spanned<FileMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<Spanned<Vec<FileArm>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sticky: Option<Spanned<FileSticky>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect: Option<Spanned<FileRedirect>>,
    #[serde(rename = "return")]
    #[serde(skip_serializing_if = "Option::is_none")]
    respond: Option<Spanned<FileReturn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strip_prefix: Option<Spanned<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replace_prefix: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rewrite: Option<Spanned<FileRewrite>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_header: Option<Spanned<String>>,
    /// Modules for this route, in order (default: the global order).
    #[serde(skip_serializing_if = "Option::is_none")]
    modules: Option<Spanned<Vec<String>>>,
    /// "normal" or "low": low-priority routes are shed first under overload.
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<Spanned<String>>,
}

/// An error and the byte span it belongs to.
type Resolve<T> = Result<T, (Option<std::ops::Range<usize>>, String)>;

fn at<T>(s: &Spanned<T>, e: String) -> (Option<std::ops::Range<usize>>, String) {
    (Some(s.span()), e)
}

/// The variables a redirect's `to` may hold.
pub const REDIRECT_VARS: [&str; 3] = ["$scheme", "$host", "$request_uri"];

/// Resolves one route (`index`: its 0-based place, for its default name).
pub(super) fn resolve(
    r: &FileRoute,
    index: usize,
    clusters: &HashMap<&str, usize>,
    modules: &toml::Table,
) -> Resolve<RouteConfig> {
    let cluster_index = |span: std::ops::Range<usize>, n: &str| -> Resolve<usize> {
        clusters.get(n).copied().ok_or_else(|| (Some(span), format!("route names cluster {n:?}, which is not defined")))
    };
    let host = match (&r.host, &r.host_regex) {
        (Some(h), Some(_)) => return Err(at(h, "give host or host_regex, not both".into())),
        (None, None) => HostMatch::Any,
        (Some(h), None) => parse_host_match(h.get_ref()).map_err(|e| at(h, e))?,
        (None, Some(h)) => HostMatch::Regex(Pattern::new("host_regex", h.get_ref()).map_err(|e| at(h, e))?),
    };
    let path = match (&r.path, &r.path_prefix, &r.path_regex) {
        (None, None, None) => PathMatch::Prefix("/".into()),
        (Some(p), None, None) => PathMatch::Exact(normal(&slash_path("path", p)?)),
        (None, Some(p), None) => PathMatch::Prefix(normal(&slash_path("path_prefix", p)?)),
        (None, None, Some(p)) => PathMatch::Regex(Pattern::new("path_regex", p.get_ref()).map_err(|e| at(p, e))?),
        _ => {
            let s = r.path.as_ref().or(r.path_prefix.as_ref()).or(r.path_regex.as_ref()).map(Spanned::span);
            return Err((s, "give one of path, path_prefix and path_regex".into()));
        }
    };
    let mut methods = Vec::new();
    if let Some(m) = &r.methods {
        for x in m.get_ref() {
            if x.is_empty() || !x.bytes().all(crate::http::head::is_tchar) {
                return Err(at(m, format!("methods: {x:?} is not a method name")));
            }
            methods.push(x.to_ascii_uppercase());
        }
        if methods.is_empty() {
            return Err(at(m, "methods is empty: leave it out to match every method".into()));
        }
    }
    let mut conditions = Vec::new();
    for (source, key, m) in [
        (Source::Header, "header", &r.header),
        (Source::Cookie, "cookie", &r.cookie),
        (Source::Query, "query", &r.query),
    ] {
        let Some(m) = m else { continue };
        let f = m.get_ref();
        if f.name.is_empty() {
            return Err(at(m, format!("{key}: name is empty")));
        }
        let value = match (&f.value, &f.regex) {
            (None, None) => ValueMatch::Present,
            (Some(v), None) => ValueMatch::Equals(v.clone()),
            (None, Some(re)) => ValueMatch::Regex(Pattern::new(&format!("{key}.regex"), re).map_err(|e| at(m, e))?),
            (Some(_), Some(_)) => return Err(at(m, format!("{key}: give value or regex, not both"))),
        };
        conditions.push(Condition { source, name: f.name.clone(), value });
    }

    let actions = [r.cluster.is_some(), r.split.is_some(), r.redirect.is_some(), r.respond.is_some()];
    let proxy_keys = [
        r.strip_prefix.as_ref().map(Spanned::span),
        r.replace_prefix.as_ref().map(Spanned::span),
        r.rewrite.as_ref().map(Spanned::span),
        r.host_header.as_ref().map(Spanned::span),
        r.sticky.as_ref().map(Spanned::span),
    ];
    if actions.iter().filter(|&&a| a).count() != 1 {
        return Err((None, "a route needs exactly one of cluster, split, redirect and return".into()));
    }
    let action = if let Some(rd) = &r.redirect {
        if let Some(s) = proxy_keys.iter().flatten().next() {
            return Err((Some(s.clone()), "a redirect route cannot rewrite, set host_header or be sticky".into()));
        }
        let f = rd.get_ref();
        let status = f.status.unwrap_or(302);
        if ![301, 302, 303, 307, 308].contains(&status) {
            return Err(at(rd, format!("redirect status {status}: expected 301, 302, 303, 307 or 308")));
        }
        check_template(&f.to).map_err(|e| at(rd, e))?;
        Action::Redirect { status, to: f.to.clone() }
    } else if let Some(rt) = &r.respond {
        if let Some(s) = proxy_keys.iter().flatten().next() {
            return Err((Some(s.clone()), "a return route cannot rewrite, set host_header or be sticky".into()));
        }
        let f = rt.get_ref();
        let status = f.status.unwrap_or(200);
        if !(200..=599).contains(&status) || status == 204 || status == 304 {
            return Err(at(rt, format!("return status {status}: expected 200 to 599, except 204 and 304")));
        }
        let content_type = f.content_type.clone().unwrap_or_else(|| "text/plain".into());
        if content_type.is_empty() || content_type.bytes().any(|b| b.is_ascii_control()) {
            return Err(at(rt, format!("return content_type {content_type:?} is not a field value")));
        }
        Action::Return { status, body: f.body.clone().unwrap_or_default(), content_type }
    } else {
        let (arms, sticky) = if let Some(c) = &r.cluster {
            if let Some(s) = &r.sticky {
                return Err(at(s, "sticky needs a split".into()));
            }
            (vec![SplitArm { cluster: cluster_index(c.span(), c.get_ref())?, weight: 1 }], None)
        } else {
            let split = r.split.as_ref().ok_or((None, "a route needs a cluster".to_string()))?;
            let mut arms = Vec::new();
            for a in split.get_ref() {
                if !(1..=10_000).contains(&a.weight) {
                    return Err(at(split, format!("split weight {}: expected 1 to 10000", a.weight)));
                }
                let cluster = cluster_index(split.span(), &a.cluster)?;
                if arms.iter().any(|x: &SplitArm| x.cluster == cluster) {
                    return Err(at(split, format!("split names cluster {:?} twice", a.cluster)));
                }
                arms.push(SplitArm { cluster, weight: a.weight });
            }
            if arms.is_empty() {
                return Err(at(split, "split is empty".into()));
            }
            let sticky = match &r.sticky {
                None => None,
                Some(s) => match (&s.get_ref().header, &s.get_ref().cookie) {
                    (Some(h), None) if !h.is_empty() => Some(Sticky::Header(h.clone())),
                    (None, Some(c)) if !c.is_empty() => Some(Sticky::Cookie(c.clone())),
                    _ => return Err(at(s, "sticky: give header = \"NAME\" or cookie = \"NAME\"".into())),
                },
            };
            (arms, sticky)
        };
        let total_weight = arms.iter().map(|a| a.weight).sum();
        let prefix_only = |span: std::ops::Range<usize>, key: &str| -> Resolve<()> {
            match path {
                PathMatch::Prefix(_) => Ok(()),
                PathMatch::Exact(_) | PathMatch::Regex(_) => Err((Some(span), format!("{key} needs a path_prefix"))),
            }
        };
        let path_action = match (&r.strip_prefix, &r.replace_prefix, &r.rewrite) {
            (None, None, None) => PathAction::Keep,
            (Some(s), None, None) => {
                prefix_only(s.span(), "strip_prefix")?;
                if *s.get_ref() {
                    PathAction::StripPrefix
                } else {
                    PathAction::Keep
                }
            }
            (None, Some(s), None) => {
                prefix_only(s.span(), "replace_prefix")?;
                let p = slash_path("replace_prefix", s)?;
                check_path_text("replace_prefix", &p).map_err(|e| at(s, e))?;
                PathAction::ReplacePrefix(p)
            }
            (None, None, Some(s)) => {
                let f = s.get_ref();
                check_path_text("rewrite.replacement", &f.replacement).map_err(|e| at(s, e))?;
                PathAction::Rewrite {
                    regex: Pattern::new("rewrite.regex", &f.regex).map_err(|e| at(s, e))?,
                    replacement: f.replacement.clone(),
                }
            }
            _ => return Err((None, "give one of strip_prefix, replace_prefix and rewrite".into())),
        };
        let host_header = match &r.host_header {
            None => HostHeader::Keep,
            Some(h) => match h.get_ref().as_str() {
                "keep" => HostHeader::Keep,
                "backend" => HostHeader::Backend,
                v if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => HostHeader::Literal(v.into()),
                v => return Err(at(h, format!("host_header {v:?}: expected \"keep\", \"backend\" or a host"))),
            },
        };
        Action::Proxy { arms, total_weight, sticky, path: path_action, host_header }
    };

    let low_priority = match &r.priority {
        None => false,
        Some(p) => match p.get_ref().as_str() {
            "normal" => false,
            "low" => true,
            other => return Err(at(p, format!("priority {other:?}: expected \"normal\" or \"low\""))),
        },
    };
    let route_modules = match &r.modules {
        None => None,
        Some(list) => {
            for m in list.get_ref() {
                if !modules.contains_key(m) || m == "order" {
                    return Err(at(list, format!("route names module {m:?}, which has no [modules.{m}] table")));
                }
            }
            Some(list.get_ref().clone())
        }
    };
    let name = r.name.clone().unwrap_or_else(|| format!("route{}", index + 1));
    Ok(RouteConfig { name, host, path, methods, conditions, action, modules: route_modules, low_priority })
}

/// A path of the configuration in the form request paths are matched in
/// ([`crate::http::path`]: `/a//b` and `/a/b` are one prefix); a path
/// that has no normal form (`/..`) can match no normalised path and is
/// kept as written.
fn normal(p: &str) -> String {
    let mut norm = Vec::new();
    match crate::http::path::normalize(p.as_bytes(), &mut norm) {
        Ok(()) => String::from_utf8(norm).unwrap_or_else(|_| p.to_string()),
        Err(_) => p.to_string(),
    }
}

fn slash_path(key: &str, p: &Spanned<String>) -> Resolve<String> {
    if p.get_ref().starts_with('/') {
        Ok(p.get_ref().clone())
    } else {
        Err(at(p, format!("{key} {:?} must start with '/'", p.get_ref())))
    }
}

/// Text that goes into the path the backend gets: visible ASCII, no `?`
/// or `#` (the query is the client's), so that no rewrite can break the
/// request line.
fn check_path_text(key: &str, p: &str) -> Result<(), String> {
    match p.bytes().find(|&b| !b.is_ascii_graphic() || b == b'?' || b == b'#') {
        None => Ok(()),
        Some(b) => Err(format!("{key} {p:?}: {:?} is not allowed in a path", char::from(b))),
    }
}

/// A redirect's `to`: every `$` starts one of [`REDIRECT_VARS`].
fn check_template(to: &str) -> Result<(), String> {
    if to.is_empty() {
        return Err("redirect to is empty".into());
    }
    let mut rest = to;
    while let Some(i) = rest.find('$') {
        let tail = &rest[i..];
        let Some(v) = REDIRECT_VARS.iter().find(|v| tail.starts_with(*v)) else {
            return Err(format!(
                "redirect to {to:?}: unknown variable at {tail:?} (known: $scheme, $host, $request_uri)"
            ));
        };
        rest = &tail[v.len()..];
    }
    if to.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!("redirect to {to:?} holds a control character"));
    }
    Ok(())
}

pub(super) fn parse_host_match(h: &str) -> Result<HostMatch, String> {
    let h = h.trim().to_ascii_lowercase();
    if h.is_empty() || h == "*" {
        return Ok(HostMatch::Any);
    }
    if let Some(suffix) = h.strip_prefix("*.") {
        if suffix.is_empty() || suffix.contains('*') {
            return Err(format!("host pattern {h:?}: a wildcard is \"*.suffix\""));
        }
        return Ok(HostMatch::Suffix(format!(".{suffix}")));
    }
    if h.contains('*') {
        return Err(format!("host pattern {h:?}: '*' is allowed only as the first label, as in \"*.example.com\""));
    }
    if h.contains(':') && !h.starts_with('[') {
        return Err(format!("host pattern {h:?}: give the host without a port"));
    }
    Ok(HostMatch::Exact(h))
}
