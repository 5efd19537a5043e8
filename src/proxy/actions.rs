//! What a matched route does to its request ([`crate::config::Action`]):
//! answer it here (redirect, fixed response), or choose its cluster (one,
//! or a weighted and possibly sticky split) and rewrite its path and Host
//! for the backend.

use std::borrow::Cow;

use crate::config::addr::SockAddr;
use crate::config::{Action, HostHeader, PathAction, PathMatch, SplitArm, Sticky};
use crate::http::head::{trim, RequestHead};

use super::core::Core;
use super::session::Session;
use super::state::Next;

/// Which arm of a split takes a request: the one whose share of
/// `total` holds `point`'s place (`point % total`).
pub fn split_arm(arms: &[SplitArm], total: u32, point: u64) -> usize {
    let mut at = (point % u64::from(total.max(1))) as u32;
    for a in arms {
        if at < a.weight {
            return a.cluster;
        }
        at -= a.weight;
    }
    arms.last().map_or(0, |a| a.cluster)
}

/// The value a sticky split hashes, if the request has a non-empty one.
fn sticky_value<'a>(req: &'a RequestHead, sticky: &Sticky) -> Option<&'a [u8]> {
    let v = match sticky {
        Sticky::Header(h) => req.head.get(h).map(trim),
        Sticky::Cookie(c) => crate::router::cookie(req, c),
    };
    v.filter(|v| !v.is_empty())
}

/// The path after a route's path action, or `None` when it has none.
/// `path` is the normalised path the route matched; the result starts
/// with `/`.
fn rewritten<'a>(action: &PathAction, matched: &PathMatch, path: &'a [u8]) -> Option<Cow<'a, [u8]>> {
    let prefix_len = match matched {
        PathMatch::Prefix(p) => p.len().min(path.len()),
        PathMatch::Exact(_) | PathMatch::Regex(_) => 0,
    };
    let out: Cow<'a, [u8]> = match action {
        PathAction::Keep => return None,
        PathAction::StripPrefix => Cow::Borrowed(&path[prefix_len..]),
        PathAction::ReplacePrefix(new) => {
            let mut v = new.as_bytes().to_vec();
            v.extend_from_slice(&path[prefix_len..]);
            Cow::Owned(v)
        }
        PathAction::Rewrite { regex, replacement } => regex.0.replace(path, replacement.as_bytes()),
    };
    if out.first() == Some(&b'/') {
        return Some(out);
    }
    let mut v = Vec::with_capacity(out.len() + 1);
    v.push(b'/');
    v.extend_from_slice(&out);
    Some(Cow::Owned(v))
}

impl Core {
    /// A random number for splits without a sticky value (splitmix64 of a
    /// per-process seed and counter).
    fn split_random(&mut self) -> u64 {
        self.split_seq += 1;
        let mut z =
            (self.id_seed ^ 0x5851_F42D_4C95_7F2D).wrapping_add(self.split_seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Applies the action of the route `s.ex.route`: `Some` when the
    /// request was answered here (redirect, `return`), `None` when it goes
    /// on to a cluster (chosen, and the path and Host rewritten). A
    /// request without a route is left alone (404 later, unless a module
    /// chooses a cluster).
    pub(super) fn apply_route(&mut self, s: &mut Session) -> Option<Next> {
        let r = s.ex.route?;
        let snap = s.snap.clone();
        let route = &snap.config.routes[r];
        match &route.action {
            Action::Redirect { status, to } => {
                let location = expand(to, &s.req);
                let headers = [("Location".to_string(), location)];
                Some(self.respond_with(s, *status, &headers, b""))
            }
            Action::Return { status, body, content_type } => {
                let headers = [("Content-Type".to_string(), content_type.clone())];
                Some(self.respond_with(s, *status, &headers, body.as_bytes()))
            }
            Action::Proxy { arms, total_weight, sticky, path, host_header } => {
                s.ex.cluster = if arms.len() == 1 {
                    arms[0].cluster
                } else {
                    let point = match sticky.as_ref().and_then(|st| sticky_value(&s.req, st)) {
                        Some(v) => crate::upstream::hash64(&v),
                        None => self.split_random(),
                    };
                    split_arm(arms, *total_weight, point)
                };
                s.ex.cluster_chosen = true;
                if let Some(new_path) = rewritten(path, &route.path, s.req.path()) {
                    let target = s.req.target();
                    let query = &target[target.iter().position(|&b| b == b'?').unwrap_or(target.len())..];
                    let mut t = new_path.into_owned();
                    t.extend_from_slice(query);
                    s.req.set_target(&t);
                }
                if let HostHeader::Literal(h) = host_header {
                    s.req.head.set("Host", h.as_bytes());
                    s.req.authority = None;
                }
                None
            }
        }
    }

    /// `host_header = "backend"`: the Host the backend gets is its address.
    pub(super) fn set_backend_host(&mut self, s: &mut Session) {
        let Some(r) = s.ex.route else { return };
        let Action::Proxy { host_header: HostHeader::Backend, .. } = &s.snap.config.routes[r].action else { return };
        let Some(m) = s.snap.clusters.get(s.ex.cluster).and_then(|c| c.members.get(s.ex.backend)) else { return };
        let b = self.backends.get(m.id);
        let host: &[u8] = match &b.addr.0 {
            SockAddr::Tcp(_) => b.name.as_bytes(),
            SockAddr::Unix(_) => b"localhost",
        };
        s.req.head.set("Host", host);
        s.req.authority = None;
    }
}

/// A redirect's `to` with `$scheme`, `$host` and `$request_uri` replaced
/// (checked when the configuration was loaded).
fn expand(to: &str, req: &RequestHead) -> String {
    let mut out = String::with_capacity(to.len() + req.target().len());
    let mut rest = to;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$scheme") {
            out.push_str("http");
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$host") {
            out.push_str(&String::from_utf8_lossy(req.host()));
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$request_uri") {
            out.push_str(&String::from_utf8_lossy(req.target()));
            rest = t;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pattern;

    #[test]
    fn split_arms_take_their_share() {
        let arms = [SplitArm { cluster: 7, weight: 95 }, SplitArm { cluster: 9, weight: 5 }];
        let mut n9 = 0;
        for p in 0..1000u64 {
            if split_arm(&arms, 100, p) == 9 {
                n9 += 1;
            }
        }
        assert_eq!(n9, 50);
        assert_eq!(split_arm(&arms, 100, 94), 7);
        assert_eq!(split_arm(&arms, 100, 95), 9);
    }

    #[test]
    fn path_actions() {
        let prefix = PathMatch::Prefix("/api".into());
        let rw = |a: &PathAction, p: &str| {
            rewritten(a, &prefix, p.as_bytes()).map(|c| String::from_utf8_lossy(&c).into_owned())
        };
        assert_eq!(rw(&PathAction::Keep, "/api/x"), None);
        assert_eq!(rw(&PathAction::StripPrefix, "/api/x").as_deref(), Some("/x"));
        assert_eq!(rw(&PathAction::StripPrefix, "/api").as_deref(), Some("/"));
        assert_eq!(rw(&PathAction::StripPrefix, "/apix").as_deref(), Some("/x"));
        assert_eq!(rw(&PathAction::ReplacePrefix("/v2".into()), "/api/x").as_deref(), Some("/v2/x"));
        let re = PathAction::Rewrite {
            regex: Pattern::new("t", "^/api/users/([0-9]+)$").unwrap(),
            replacement: "/u/${1}".into(),
        };
        assert_eq!(rw(&re, "/api/users/42").as_deref(), Some("/u/42"));
        assert_eq!(rw(&re, "/api/other").as_deref(), Some("/api/other"));
    }

    #[test]
    fn redirect_variables() {
        let mut req = RequestHead::default();
        req.parse(b"GET /a/b?x=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n", 100).unwrap().unwrap();
        assert_eq!(expand("https://$host$request_uri", &req), "https://shop.example/a/b?x=1");
        assert_eq!(expand("$scheme://new.example/", &req), "http://new.example/");
    }
}
