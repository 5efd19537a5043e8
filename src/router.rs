//! Routing: from a request's host and path to a cluster, nginx-style. The
//! host picks a group of routes first (an exact host beats the longest
//! `*.suffix` wildcard, which beats routes without a host); within that
//! group the longest matching path prefix wins. Paths are matched in
//! their normalised form ([`crate::http::path`]): the caller passes the
//! request's normalised path, and prefixes are normalised here, so that
//! `//admin`, `/%61dmin` or `/x/../admin` match the prefix `/admin`.
//! Built once per configuration; lookups allocate nothing.

use std::collections::HashMap;

use crate::config::{Config, HostMatch};
use crate::http::path;

#[derive(Debug, Default)]
struct Group {
    /// (path prefix, route index), longest prefix first.
    prefixes: Vec<(Vec<u8>, usize)>,
}

impl Group {
    fn add(&mut self, prefix: &str, route: usize) {
        // In the form request paths are matched in (`/a//b` and `/a/b` are
        // one prefix); a prefix that has no normal form (`/..`) can match
        // no normalised path and is kept as written.
        let mut norm = Vec::new();
        if path::normalize(prefix.as_bytes(), &mut norm).is_err() {
            norm = prefix.as_bytes().to_vec();
        }
        // The first route given for a prefix wins, as in the file's order.
        if !self.prefixes.iter().any(|(p, _)| *p == norm) {
            self.prefixes.push((norm, route));
            self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        }
    }

    fn lookup(&self, path: &[u8]) -> Option<usize> {
        self.prefixes.iter().find(|(p, _)| path.starts_with(p)).map(|(_, c)| *c)
    }
}

/// The routing table of one configuration.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Vec<u8>, Group>,
    /// (".suffix", group), longest suffix first.
    suffix: Vec<(Vec<u8>, Group)>,
    any: Option<Group>,
}

impl Router {
    /// The routing table of `config`.
    pub fn new(config: &Config) -> Router {
        let mut r = Router::default();
        for (index, route) in config.routes.iter().enumerate() {
            let group = match &route.host {
                HostMatch::Any => r.any.get_or_insert_with(Group::default),
                HostMatch::Exact(h) => r.exact.entry(h.as_bytes().to_vec()).or_default(),
                HostMatch::Suffix(s) => {
                    let i = match r.suffix.iter().position(|(x, _)| x == s.as_bytes()) {
                        Some(i) => i,
                        None => {
                            r.suffix.push((s.as_bytes().to_vec(), Group::default()));
                            r.suffix.len() - 1
                        }
                    };
                    &mut r.suffix[i].1
                }
            };
            group.add(&route.path_prefix, index);
        }
        r.suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        r
    }

    /// The route (index in `config.routes`) for a (lower-case, port-less)
    /// host and a normalised path ([`crate::http::RequestHead::path`]).
    pub fn lookup(&self, host: &[u8], path: &[u8]) -> Option<usize> {
        let group = self
            .exact
            .get(host)
            .or_else(|| self.suffix.iter().find(|(s, _)| host.ends_with(s) && host.len() > s.len()).map(|(_, g)| g))
            .or(self.any.as_ref())?;
        group.lookup(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn host_then_longest_prefix() {
        let c = Config::parse(
            Path::new("t"),
            r#"
[[listeners]]
address = "127.0.0.1:1"
[[clusters]]
name = "a"
backends = ["127.0.0.1:2"]
[[clusters]]
name = "b"
backends = ["127.0.0.1:3"]
[[clusters]]
name = "c"
backends = ["127.0.0.1:4"]
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
        )
        .unwrap();
        let r = Router::new(&c);
        let cluster = |h: &[u8], p: &[u8]| r.lookup(h, p).map(|i| c.routes[i].cluster);
        assert_eq!(cluster(b"other", b"/"), Some(0));
        assert_eq!(cluster(b"other", b"/api/v1"), Some(1));
        assert_eq!(cluster(b"w.example.com", b"/api"), Some(2));
        assert_eq!(cluster(b"example.com", b"/"), Some(0));
        assert_eq!(cluster(b"x.example.com", b"/only/x"), Some(0));
        assert_eq!(r.lookup(b"x.example.com", b"/"), None);
    }

    #[test]
    fn prefixes_are_matched_in_normal_form() {
        let c = Config::parse(
            Path::new("t"),
            r#"
[[listeners]]
address = "127.0.0.1:1"
[[clusters]]
name = "a"
backends = ["127.0.0.1:2"]
[[clusters]]
name = "b"
backends = ["127.0.0.1:3"]
[[routes]]
cluster = "a"
[[routes]]
path_prefix = "//adm%69n"
cluster = "b"
"#,
        )
        .unwrap();
        let r = Router::new(&c);
        // Request paths come normalised (RequestHead::path); the prefix
        // "//adm%69n" was normalised to "/admin".
        assert_eq!(r.lookup(b"h", b"/admin/x"), Some(1));
        assert_eq!(r.lookup(b"h", b"/adm"), Some(0));
    }
}
