//! Routing: from a request to a route, at a cost that does not grow with
//! the number of routes. Precedence (documented in docs/OPERATIONS.md):
//!
//! 1. The host picks one group of routes: an exact host (hash lookup)
//!    beats the longest `*.suffix` (one hash lookup per label of the
//!    host) beats the first `host_regex` in file order that matches (one
//!    compiled set for all of them) beats routes without a host. The
//!    request never falls through to a later group.
//! 2. Within the group, an exact `path` (hash lookup) beats the longest
//!    `path_prefix` (a byte trie walked once along the path; then the
//!    shorter prefixes, longest first) beats the `path_regex` routes in
//!    file order (one compiled set per group).
//! 3. Among the routes of one path match, the first in file order whose
//!    other conditions (methods, header, cookie, query) all hold wins;
//!    when none does, the next path candidate is tried.
//!
//! Paths are matched in their normalised form ([`crate::http::path`]):
//! the caller passes the request's normalised path, and prefixes and exact
//! paths are normalised when the configuration is read, so that `//admin`, `/%61dmin` or
//! `/x/../admin` match the prefix `/admin`. Built once per configuration;
//! lookups allocate nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use regex_automata::meta::{self, Regex};
use regex_automata::{Input, MatchKind, PatternSet};

use crate::config::{
    Action, Condition, Config, HostHeader, HostMatch, PathAction, PathMatch, Source, Sticky, ValueMatch,
};
use crate::http::head::{trim, RequestHead};

/// "No node".
const NONE: u32 = u32::MAX;

/// A byte trie of path prefixes.
#[derive(Debug)]
struct Trie {
    nodes: Vec<Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// (byte, child node), sorted by byte.
    children: Vec<(u8, u32)>,
    /// Routes of the prefix ending here, in file order.
    routes: Vec<usize>,
    /// The nearest ancestor with routes ([`NONE`]: none).
    up: u32,
}

impl Default for Trie {
    fn default() -> Self {
        Trie { nodes: vec![Node { up: NONE, ..Node::default() }] }
    }
}

impl Trie {
    fn insert(&mut self, prefix: &[u8], route: usize) {
        let mut n = 0usize;
        for &b in prefix {
            n = match self.nodes[n].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[n].children[i].1 as usize,
                Err(i) => {
                    let new = self.nodes.len();
                    self.nodes.push(Node { up: NONE, ..Node::default() });
                    self.nodes[n].children.insert(i, (b, new as u32));
                    new
                }
            };
        }
        self.nodes[n].routes.push(route);
    }

    /// Sets each node's `up` link (parents come before children).
    fn link(&mut self) {
        let mut stack = vec![0usize];
        while let Some(n) = stack.pop() {
            let up = if self.nodes[n].routes.is_empty() { self.nodes[n].up } else { n as u32 };
            for i in 0..self.nodes[n].children.len() {
                let c = self.nodes[n].children[i].1 as usize;
                self.nodes[c].up = up;
                stack.push(c);
            }
        }
    }

    /// The deepest node with routes whose prefix `path` starts with.
    fn deepest(&self, path: &[u8]) -> u32 {
        let mut n = 0usize;
        let mut best = if self.nodes[0].routes.is_empty() { NONE } else { 0 };
        for &b in path {
            match self.nodes[n].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => n = self.nodes[n].children[i].1 as usize,
                Err(_) => break,
            }
            if !self.nodes[n].routes.is_empty() {
                best = n as u32;
            }
        }
        best
    }

    /// Every (prefix, routes), longest prefix first, then by bytes.
    fn entries(&self) -> Vec<(Vec<u8>, &[usize])> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, Vec::new())];
        while let Some((n, prefix)) = stack.pop() {
            if !self.nodes[n].routes.is_empty() {
                out.push((prefix.clone(), &self.nodes[n].routes[..]));
            }
            for &(b, c) in &self.nodes[n].children {
                let mut p = prefix.clone();
                p.push(b);
                stack.push((c as usize, p));
            }
        }
        out.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// A set of regexes compiled into one automaton, reporting every pattern
/// that matches (a `RegexSet`, without its per-call allocation).
#[derive(Debug)]
struct Set {
    re: Regex,
}

impl Set {
    fn new(patterns: &[&str]) -> Result<Set, String> {
        Regex::builder()
            .configure(meta::Config::new().match_kind(MatchKind::All).utf8_empty(false))
            .syntax(regex_automata::util::syntax::Config::new().utf8(false))
            .build_many(patterns)
            .map(|re| Set { re })
            .map_err(|e| format!("the {} regexes of one group do not compile together: {e}", patterns.len()))
    }

    /// The first (lowest) pattern that matches `hay`.
    fn first(&self, hay: &[u8], scratch: &mut PatternSet) -> Option<usize> {
        scratch.clear();
        self.re.which_overlapping_matches(&Input::new(hay), scratch);
        scratch.iter().next().map(|p| p.as_usize())
    }
}

/// The routes of one host match.
#[derive(Debug, Default)]
struct Group {
    /// Exact paths (normalised) and their routes in file order.
    exact: HashMap<Box<[u8]>, Vec<usize>>,
    prefixes: Trie,
    /// `path_regex` routes in file order; pattern `i` of `regex` is route
    /// `regex_routes[i]`'s.
    regex_routes: Vec<usize>,
    regex: Option<Set>,
}

impl Group {
    fn add(&mut self, m: &PathMatch, route: usize) {
        match m {
            // Both in normal form already (config::route).
            PathMatch::Exact(p) => self.exact.entry(p.as_bytes().into()).or_default().push(route),
            PathMatch::Prefix(p) => self.prefixes.insert(p.as_bytes(), route),
            PathMatch::Regex(_) => self.regex_routes.push(route),
        }
    }

    fn finish(&mut self, config: &Config) -> Result<(), String> {
        self.prefixes.link();
        if !self.regex_routes.is_empty() {
            let pats: Vec<&str> = self
                .regex_routes
                .iter()
                .map(|&r| match &config.routes[r].path {
                    PathMatch::Regex(p) => p.as_str(),
                    PathMatch::Exact(_) | PathMatch::Prefix(_) => unreachable!("only regex routes are listed"),
                })
                .collect();
            self.regex = Some(Set::new(&pats)?);
        }
        Ok(())
    }

    fn lookup(&self, path: &[u8], scratch: &mut PatternSet, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        if let Some(routes) = self.exact.get(path) {
            if let Some(&r) = routes.iter().find(|&&r| ok(r)) {
                return Some(r);
            }
        }
        let mut n = self.prefixes.deepest(path);
        while n != NONE {
            let node = &self.prefixes.nodes[n as usize];
            if let Some(&r) = node.routes.iter().find(|&&r| ok(r)) {
                return Some(r);
            }
            n = node.up;
        }
        let set = self.regex.as_ref()?;
        scratch.clear();
        set.re.which_overlapping_matches(&Input::new(path), scratch);
        scratch.iter().map(|p| self.regex_routes[p.as_usize()]).find(|&r| ok(r))
    }
}

/// What a route requires besides host and path.
#[derive(Debug, Default)]
struct Conds {
    methods: Vec<Box<[u8]>>,
    conditions: Vec<Condition>,
}

/// The routing table of one configuration.
#[derive(Debug)]
pub struct Router {
    exact: HashMap<Box<[u8]>, Group>,
    /// `.suffix` (of `*.suffix`) → group.
    suffix: HashMap<Box<[u8]>, Group>,
    /// One group per distinct `host_regex`, in file order; pattern `i` of
    /// `host_set` is `host_regex[i]`'s.
    host_regex: Vec<(String, Group)>,
    host_set: Option<Set>,
    any: Option<Group>,
    /// Conditions by route index.
    conds: Vec<Conds>,
    /// Scratch for the regex sets, as large as the largest one.
    scratch: Mutex<PatternSet>,
}

impl Router {
    /// The routing table of `config`. `Err`: the regexes of a group are
    /// too large together (each was compiled alone when parsed).
    pub fn new(config: &Config) -> Result<Router, String> {
        let mut exact: HashMap<Box<[u8]>, Group> = HashMap::new();
        let mut suffix: HashMap<Box<[u8]>, Group> = HashMap::new();
        let mut host_regex: Vec<(String, Group)> = Vec::new();
        let mut any: Option<Group> = None;
        let mut conds = Vec::with_capacity(config.routes.len());
        for (index, route) in config.routes.iter().enumerate() {
            let group = match &route.host {
                HostMatch::Any => any.get_or_insert_with(Group::default),
                HostMatch::Exact(h) => exact.entry(h.as_bytes().into()).or_default(),
                HostMatch::Suffix(s) => suffix.entry(s.as_bytes().into()).or_default(),
                HostMatch::Regex(p) => {
                    let i = match host_regex.iter().position(|(x, _)| x == p.as_str()) {
                        Some(i) => i,
                        None => {
                            host_regex.push((p.as_str().to_string(), Group::default()));
                            host_regex.len() - 1
                        }
                    };
                    &mut host_regex[i].1
                }
            };
            group.add(&route.path, index);
            conds.push(Conds {
                methods: route.methods.iter().map(|m| m.as_bytes().into()).collect(),
                conditions: route.conditions.clone(),
            });
        }
        let mut largest = host_regex.len();
        let groups = exact.values_mut().chain(suffix.values_mut()).chain(host_regex.iter_mut().map(|(_, g)| g));
        for g in groups.chain(any.as_mut()) {
            g.finish(config)?;
            largest = largest.max(g.regex_routes.len());
        }
        let host_set = if host_regex.is_empty() {
            None
        } else {
            Some(Set::new(&host_regex.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>())?)
        };
        Ok(Router { exact, suffix, host_regex, host_set, any, conds, scratch: Mutex::new(PatternSet::new(largest)) })
    }

    /// The group of a (lower-case, port-less) host.
    fn group(&self, host: &[u8], scratch: &mut PatternSet) -> Option<&Group> {
        if let Some(g) = self.exact.get(host) {
            return Some(g);
        }
        if !self.suffix.is_empty() {
            // Leftmost dot first: the longest suffix. "*.example.com" is
            // for subdomains, so the whole host is never a suffix.
            for (i, _) in host.iter().enumerate().skip(1).filter(|(_, &b)| b == b'.') {
                if let Some(g) = self.suffix.get(&host[i..]) {
                    return Some(g);
                }
            }
        }
        if let Some(set) = &self.host_set {
            if let Some(i) = set.first(host, scratch) {
                return Some(&self.host_regex[i].1);
            }
        }
        self.any.as_ref()
    }

    /// The route (index in `config.routes`) for a request: its
    /// (lower-case, port-less) host, normalised path
    /// ([`RequestHead::path`]), method, fields and query.
    pub fn lookup(&self, req: &RequestHead) -> Option<usize> {
        self.find(req.host(), req.path(), &|r| self.holds(r, req))
    }

    /// The route for a host and a normalised path, among the routes for
    /// which `ok` holds (in precedence order, the first).
    pub fn find(&self, host: &[u8], path: &[u8], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        // Only one lookup runs at a time in a worker: the lock is never
        // contended. A poisoned lock only means a panic elsewhere while
        // holding it; the scratch is cleared before each use.
        let mut guard = self.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let scratch = &mut *guard;
        self.group(host, scratch)?.lookup(path, scratch, ok)
    }

    /// Do route `r`'s methods and conditions hold for `req`?
    fn holds(&self, r: usize, req: &RequestHead) -> bool {
        let Some(c) = self.conds.get(r) else { return false };
        if !c.methods.is_empty() && !c.methods.iter().any(|m| **m == *req.method()) {
            return false;
        }
        c.conditions.iter().all(|cond| {
            let value = match cond.source {
                Source::Header => req.head.get(&cond.name),
                Source::Cookie => cookie(req, &cond.name),
                Source::Query => query_param(req.target(), &cond.name),
            };
            match (&cond.value, value) {
                (_, None) => false,
                (ValueMatch::Present, Some(_)) => true,
                (ValueMatch::Equals(want), Some(v)) => trim(v) == want.as_bytes(),
                (ValueMatch::Regex(p), Some(v)) => p.0.is_match(trim(v)),
            }
        })
    }

    /// The effective table, one line per route in precedence order: host
    /// match, path match, conditions, action (for `pitcher -t --routes`).
    pub fn table(&self, config: &Config) -> String {
        let mut out = String::new();
        let mut groups: Vec<(String, &Group)> = Vec::new();
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        groups.extend(exact.into_iter().map(|(h, g)| (format!("host={}", String::from_utf8_lossy(h)), g)));
        let mut suffix: Vec<_> = self.suffix.iter().collect();
        suffix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(b.0)));
        groups.extend(suffix.into_iter().map(|(s, g)| (format!("host=*{}", String::from_utf8_lossy(s)), g)));
        groups.extend(self.host_regex.iter().map(|(p, g)| (format!("host~{p}"), g)));
        groups.extend(self.any.iter().map(|g| ("host=*".to_string(), g)));
        for (host, g) in groups {
            let mut rows: Vec<(String, usize)> = Vec::new();
            let mut exact: Vec<_> = g.exact.iter().collect();
            exact.sort_by(|a, b| a.0.cmp(b.0));
            for (p, routes) in exact {
                rows.extend(routes.iter().map(|&r| (format!("path={}", String::from_utf8_lossy(p)), r)));
            }
            for (p, routes) in g.prefixes.entries() {
                rows.extend(routes.iter().map(|&r| (format!("prefix={}", String::from_utf8_lossy(&p)), r)));
            }
            for &r in &g.regex_routes {
                if let PathMatch::Regex(p) = &config.routes[r].path {
                    rows.push((format!("path~{}", p.as_str()), r));
                }
            }
            for (path, r) in rows {
                let route = &config.routes[r];
                let _ = writeln!(
                    out,
                    "{host}\t{path}\t{}\t{}\t[{}]",
                    conditions_text(route),
                    action_text(route, config),
                    route.name
                );
            }
        }
        out
    }
}

fn conditions_text(route: &crate::config::RouteConfig) -> String {
    let mut parts = Vec::new();
    if !route.methods.is_empty() {
        parts.push(format!("methods={}", route.methods.join(",")));
    }
    for c in &route.conditions {
        let src = match c.source {
            Source::Header => "header",
            Source::Cookie => "cookie",
            Source::Query => "query",
        };
        parts.push(match &c.value {
            ValueMatch::Present => format!("{src}:{}", c.name),
            ValueMatch::Equals(v) => format!("{src}:{}={v}", c.name),
            ValueMatch::Regex(p) => format!("{src}:{}~{}", c.name, p.as_str()),
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn action_text(route: &crate::config::RouteConfig, config: &Config) -> String {
    match &route.action {
        Action::Redirect { status, to } => format!("redirect {status} {to}"),
        Action::Return { status, body, .. } => format!("return {status} ({} bytes)", body.len()),
        Action::Proxy { arms, sticky, path, host_header, .. } => {
            let mut s = if arms.len() == 1 {
                format!("cluster={}", config.clusters[arms[0].cluster].name)
            } else {
                let list: Vec<String> =
                    arms.iter().map(|a| format!("{}:{}", config.clusters[a.cluster].name, a.weight)).collect();
                format!("split={}", list.join(","))
            };
            match sticky {
                Some(Sticky::Header(h)) => s.push_str(&format!(" sticky=header:{h}")),
                Some(Sticky::Cookie(c)) => s.push_str(&format!(" sticky=cookie:{c}")),
                None => {}
            }
            match path {
                PathAction::Keep => {}
                PathAction::StripPrefix => s.push_str(" strip_prefix"),
                PathAction::ReplacePrefix(p) => s.push_str(&format!(" replace_prefix={p}")),
                PathAction::Rewrite { regex, replacement } => {
                    s.push_str(&format!(" rewrite={}=>{replacement}", regex.as_str()));
                }
            }
            match host_header {
                HostHeader::Keep => {}
                HostHeader::Backend => s.push_str(" host_header=backend"),
                HostHeader::Literal(h) => s.push_str(&format!(" host_header={h}")),
            }
            s
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` field(s).
pub fn cookie<'a>(req: &'a RequestHead, name: &str) -> Option<&'a [u8]> {
    req.head.iter().filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie")).find_map(|(_, v)| {
        v.split(|&b| b == b';').find_map(|pair| {
            let pair = trim(pair);
            let eq = pair.iter().position(|&b| b == b'=')?;
            (trim(&pair[..eq]) == name.as_bytes()).then(|| trim(&pair[eq + 1..]))
        })
    })
}

/// The value of query parameter `name` in a target (as sent; a parameter
/// without `=` has an empty value).
pub fn query_param<'a>(target: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let q = target.iter().position(|&b| b == b'?')?;
    target[q + 1..].split(|&b| b == b'&').find_map(|pair| {
        let (n, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (n == name.as_bytes()).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const HEAD: &str = "[[listeners]]\naddress = \"127.0.0.1:1\"\n[[clusters]]\nname = \"a\"\nbackends = [\"127.0.0.1:2\"]\n[[clusters]]\nname = \"b\"\nbackends = [\"127.0.0.1:3\"]\n[[clusters]]\nname = \"c\"\nbackends = [\"127.0.0.1:4\"]\n";

    fn config(routes: &str) -> Config {
        Config::parse(Path::new("t"), &format!("{HEAD}{routes}")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The name of the route a raw request head is routed to.
    fn route_of(c: &Config, r: &Router, raw: &str) -> Option<String> {
        let mut req = RequestHead::default();
        req.parse(raw.as_bytes(), 100).unwrap().unwrap();
        r.lookup(&req).map(|i| c.routes[i].name.clone())
    }

    fn get(host: &str, target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
    }

    #[test]
    fn host_then_longest_prefix() {
        let c = config(
            r#"
[[routes]]
cluster = "a"
[[routes]]
path_prefix = "/api"
cluster = "b"
[[routes]]
host = "*.example.com"
cluster = "c"
[[routes]]
host = "x.example.com"
path_prefix = "/only"
cluster = "a"
"#,
        );
        let r = Router::new(&c).unwrap();
        let route = |h: &str, p: &str| route_of(&c, &r, &get(h, p));
        assert_eq!(route("other", "/").as_deref(), Some("route1"));
        assert_eq!(route("other", "/api/v1").as_deref(), Some("route2"));
        assert_eq!(route("w.example.com", "/api").as_deref(), Some("route3"));
        assert_eq!(route("example.com", "/").as_deref(), Some("route1"));
        assert_eq!(route("x.example.com", "/only/x").as_deref(), Some("route4"));
        assert_eq!(route("x.example.com", "/"), None);
    }

    #[test]
    fn prefixes_are_matched_in_normal_form() {
        let c = config("[[routes]]\ncluster = \"a\"\n[[routes]]\npath_prefix = \"//adm%69n\"\ncluster = \"b\"\n");
        let r = Router::new(&c).unwrap();
        // Request paths come normalised (RequestHead::path); the prefix
        // "//adm%69n" was normalised to "/admin".
        assert_eq!(r.find(b"h", b"/admin/x", &|_| true), Some(1));
        assert_eq!(r.find(b"h", b"/adm", &|_| true), Some(0));
    }

    #[test]
    fn precedence_of_host_kinds() {
        let c = config(
            r#"
[[routes]]
name = "any"
cluster = "a"
[[routes]]
name = "re"
host_regex = "^api[0-9]+\\."
cluster = "a"
[[routes]]
name = "re2"
host_regex = "example"
cluster = "a"
[[routes]]
name = "wide"
host = "*.example.com"
cluster = "a"
[[routes]]
name = "narrow"
host = "*.b.example.com"
cluster = "a"
[[routes]]
name = "exact"
host = "api1.example.com"
cluster = "a"
"#,
        );
        let r = Router::new(&c).unwrap();
        let route = |h: &str| route_of(&c, &r, &get(h, "/")).unwrap_or_default();
        assert_eq!(route("api1.example.com"), "exact");
        assert_eq!(route("x.b.example.com"), "narrow");
        assert_eq!(route("api2.example.com"), "wide");
        assert_eq!(route("api2.example.org"), "re");
        // Both regexes match: the first in file order wins.
        assert_eq!(route("api3.example.net"), "re");
        assert_eq!(route("www.example.net"), "re2");
        assert_eq!(route("other"), "any");
    }

    #[test]
    fn precedence_of_path_kinds_and_conditions() {
        let c = config(
            r#"
[[routes]]
name = "regex"
path_regex = "^/api/v[0-9]+/users"
cluster = "a"
[[routes]]
name = "root"
cluster = "a"
[[routes]]
name = "api"
path_prefix = "/api"
cluster = "a"
[[routes]]
name = "api-v1-beta"
path_prefix = "/api/v1"
header = { name = "X-Beta", value = "1" }
cluster = "b"
[[routes]]
name = "api-v1-post"
path_prefix = "/api/v1"
methods = ["post", "PUT"]
cluster = "b"
[[routes]]
name = "api-v1"
path_prefix = "/api/v1"
cluster = "c"
[[routes]]
name = "exact"
path = "/api/v1/users"
cookie = { name = "uid", regex = "^[0-9]+$" }
cluster = "a"
[[routes]]
name = "q"
path = "/api/v1/users"
query = { name = "debug" }
cluster = "a"
"#,
        );
        let r = Router::new(&c).unwrap();
        let route = |raw: String| route_of(&c, &r, &raw).unwrap_or_default();
        assert_eq!(route(get("h", "/api/v1/x")), "api-v1");
        assert_eq!(route(get("h", "/api/v2/x")), "api");
        assert_eq!(route(get("h", "/x")), "root");
        assert_eq!(route("GET /api/v1/x HTTP/1.1\r\nHost: h\r\nx-beta: 1\r\n\r\n".into()), "api-v1-beta");
        assert_eq!(route("GET /api/v1/x HTTP/1.1\r\nHost: h\r\nX-Beta: 2\r\n\r\n".into()), "api-v1");
        assert_eq!(route("POST /api/v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".into()), "api-v1-post");
        // The prefix beats the regex.
        assert_eq!(route(get("h", "/api/v1/users")), "api-v1");
        assert_eq!(route("GET /api/v1/users HTTP/1.1\r\nHost: h\r\nCookie: a=b; uid=42\r\n\r\n".into()), "exact");
        assert_eq!(route("GET /api/v1/users HTTP/1.1\r\nHost: h\r\nCookie: uid=x\r\n\r\n".into()), "api-v1");
        assert_eq!(route(get("h", "/api/v1/users?a=1&debug")), "q");
        assert_eq!(route(get("h", "/api/v1/users?debugger=1")), "api-v1");
    }

    #[test]
    fn regex_paths_in_file_order_and_no_fallthrough_between_hosts() {
        let c = config(
            r#"
[[routes]]
name = "png"
host = "h"
path_regex = "\\.png$"
cluster = "a"
[[routes]]
name = "img"
host = "h"
path_regex = "^/img/"
cluster = "a"
[[routes]]
name = "any"
cluster = "a"
"#,
        );
        let r = Router::new(&c).unwrap();
        assert_eq!(route_of(&c, &r, &get("h", "/img/a.png")).as_deref(), Some("png"));
        assert_eq!(route_of(&c, &r, &get("h", "/img/a.gif")).as_deref(), Some("img"));
        assert_eq!(route_of(&c, &r, &get("h", "/a.gif")), None);
        assert_eq!(route_of(&c, &r, &get("other", "/a.gif")).as_deref(), Some("any"));
    }

    #[test]
    fn table_lists_routes_in_precedence_order() {
        let c = config(
            r#"
[[routes]]
name = "last"
cluster = "a"
[[routes]]
name = "short"
host = "h"
path_prefix = "/a"
cluster = "b"
[[routes]]
name = "long"
host = "h"
path_prefix = "/a/b"
split = [{ cluster = "a", weight = 9 }, { cluster = "b", weight = 1 }]
[[routes]]
name = "go"
host = "h"
path = "/go"
redirect = { status = 301, to = "https://$host$request_uri" }
"#,
        );
        let t = Router::new(&c).unwrap().table(&c);
        let names: Vec<&str> = t.lines().map(|l| l.rsplit('[').next().unwrap_or("").trim_end_matches(']')).collect();
        assert_eq!(names, ["go", "long", "short", "last"], "{t}");
        assert!(t.contains("host=h\tprefix=/a/b\t-\tsplit=a:9,b:1\t[long]"), "{t}");
        assert!(t.contains("redirect 301 https://$host$request_uri"), "{t}");
    }

    #[test]
    fn cookie_and_query_parsing() {
        let mut req = RequestHead::default();
        req.parse(b"GET /p?a=1&b&c=x%20y HTTP/1.1\r\nHost: h\r\nCookie: s=1; uid = 7 \r\nCookie: t=2\r\n\r\n", 100)
            .unwrap()
            .unwrap();
        assert_eq!(cookie(&req, "uid"), Some(&b"7"[..]));
        assert_eq!(cookie(&req, "t"), Some(&b"2"[..]));
        assert_eq!(cookie(&req, "u"), None);
        assert_eq!(query_param(req.target(), "a"), Some(&b"1"[..]));
        assert_eq!(query_param(req.target(), "b"), Some(&b""[..]));
        assert_eq!(query_param(req.target(), "c"), Some(&b"x%20y"[..]));
        assert_eq!(query_param(req.target(), "d"), None);
    }
}
