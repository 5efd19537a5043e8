//! An example module: answers 403 to every request whose path starts with
//! a configured prefix, and marks the responses it lets through with a
//! header. The whole module is the part above `main`; see
//! `docs/modules.md` for the guide.
//!
//! ```toml
//! [modules.deny_path]
//! prefix = "/admin/"
//! header = "X-Deny-Path"      # optional; this is the default
//! ```
//!
//! To compile it into Pitcher: copy this file (without `main` and the
//! tests, or keep the tests) to `src/hooks/modules/deny_path.rs`, add
//! `mod deny_path;` to `src/hooks/modules/mod.rs`, and append
//! `Registration { name: "deny_path", build: deny_path::build }` at the end
//! of `REGISTRY`.
//!
//! Run its tests with `cargo test --example deny_path` (they also run in
//! `cargo test`, through `tests/modules_example.rs`).

use std::sync::Arc;

use pitcher::config::ModuleConfig;
use pitcher::hooks::{Build, Ctx, Module, Point, Response, Verdict};
use pitcher::http::{RequestHead, ResponseHead};
use serde::Deserialize;

/// The `[modules.deny_path]` table (`enabled` and `essential` are taken
/// out by Pitcher before the module sees it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Requests whose path starts with this are refused.
    prefix: String,
    /// The header put on the answers.
    #[serde(default = "default_header")]
    header: String,
}

fn default_header() -> String {
    "X-Deny-Path".into()
}

/// Built once per configuration and shared by every request: read-only.
pub struct DenyPath {
    prefix: Vec<u8>,
    header: String,
}

/// Builds the module from its table; an error names what is wrong (Pitcher
/// adds the file, the line and the module's name).
pub fn build(c: &ModuleConfig, _b: &Build) -> Result<Arc<dyn Module>, String> {
    let s: Settings =
        toml::Value::Table(c.settings.clone()).try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
    if !s.prefix.starts_with('/') {
        return Err(format!("prefix {:?} must start with '/'", s.prefix));
    }
    Ok(Arc::new(DenyPath { prefix: s.prefix.into_bytes(), header: s.header }))
}

impl Module for DenyPath {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster, Point::BackendResponse]
    }

    /// Runs before a cluster is chosen: a refusal here never reaches a
    /// backend.
    fn before_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        if !req.path().starts_with(&self.prefix) {
            return Verdict::Continue;
        }
        slog::debug!(ctx.log, "deny_path: refused"; "path" => %String::from_utf8_lossy(req.path()));
        Verdict::Respond(Response::new(403).header(&self.header, "denied").body("forbidden by deny_path\n").into())
    }

    /// Runs on the backend's response head, before it goes to the client.
    fn backend_response(&self, resp: &mut ResponseHead, _ctx: &mut Ctx<'_>) -> Verdict {
        resp.head.set(&self.header, b"passed");
        Verdict::Continue
    }
}

/// Examples are programs; this one has nothing to run on its own.
fn main() {
    println!("deny_path is a module: see the file's documentation, and run `cargo test --example deny_path`");
}

#[cfg(test)]
mod tests {
    //! Drives the handlers on a synthetic request: no sockets, no worker.

    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;

    use pitcher::config::Config;
    use pitcher::hooks::Vars;
    use pitcher::shm::{Region, Shared};
    use slog::{o, Discard, Logger};

    use super::*;

    const CONFIG: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[[clusters]]
name = "app"
backends = ["127.0.0.1:9000"]

[[routes]]
path_prefix = "/"
cluster = "app"

[modules.deny_path]
prefix = "/admin/"
header = "X-Guard"
"#;

    /// Everything a handler is given, owned by the test.
    struct World {
        config: Config,
        shared: &'static Shared,
        log: Logger,
        vars: Vars,
    }

    impl World {
        fn new(text: &str) -> World {
            let config = Config::parse(Path::new("test.toml"), text).expect("configuration");
            let shared = Region::create().expect("shared region").leak();
            World { config, shared, log: Logger::root(Discard, o!()), vars: Vars::default() }
        }

        fn module(&self) -> Result<Arc<dyn Module>, String> {
            let table = self.config.modules.iter().find(|m| m.name == "deny_path").expect("[modules.deny_path]");
            let b = Build { config: &self.config, shared: self.shared, log: &self.log, check_only: false };
            build(table, &b)
        }

        /// The context of a request that matched the first route.
        fn ctx(&mut self) -> Ctx<'_> {
            let mut ctx = Ctx::new(&self.config, self.shared, &self.log, &mut self.vars);
            ctx.client = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
            ctx.route = self.config.routes.first();
            ctx.cluster = Some(0);
            ctx
        }
    }

    fn request(path: &str) -> RequestHead {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n\r\n");
        let mut req = RequestHead::default();
        assert_eq!(req.parse(raw.as_bytes(), 100).expect("a valid request"), Some(raw.len()));
        req
    }

    fn response() -> ResponseHead {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        let mut resp = ResponseHead::default();
        assert_eq!(resp.parse(raw, 100).expect("a valid response"), Some(raw.len()));
        resp
    }

    #[test]
    fn a_path_under_the_prefix_is_answered_403() {
        let mut w = World::new(CONFIG);
        let m = w.module().expect("module");
        let mut req = request("/admin/users?id=1");
        match m.before_cluster(&mut req, &mut w.ctx()) {
            Verdict::Respond(r) => {
                assert_eq!(r.status, 403);
                assert_eq!(r.headers, [("X-Guard".to_string(), "denied".to_string())]);
                assert_eq!(r.body, b"forbidden by deny_path\n");
            }
            other => panic!("expected a 403, got {other:?}"),
        }
    }

    #[test]
    fn disguised_paths_under_the_prefix_are_answered_403_too() {
        // `req.path()` is the normalised path: slashes merged, unreserved
        // escapes decoded, dot-segments removed.
        let mut w = World::new(CONFIG);
        let m = w.module().expect("module");
        for path in ["//admin/x", "/%61dmin/x", "/x/../admin/x", "/x/./../admin//x", "/admin/./x"] {
            let mut req = request(path);
            let verdict = m.before_cluster(&mut req, &mut w.ctx());
            assert!(matches!(verdict, Verdict::Respond(ref r) if r.status == 403), "{path}: {verdict:?}");
        }
    }

    #[test]
    fn other_paths_go_on_and_their_responses_are_marked() {
        let mut w = World::new(CONFIG);
        let m = w.module().expect("module");
        for path in ["/", "/admin", "/public/admin/x"] {
            let mut req = request(path);
            assert!(matches!(m.before_cluster(&mut req, &mut w.ctx()), Verdict::Continue), "{path}");
        }
        let mut resp = response();
        assert!(matches!(m.backend_response(&mut resp, &mut w.ctx()), Verdict::Continue));
        assert_eq!(resp.head.get("x-guard"), Some(&b"passed"[..]));
        assert_eq!(resp.head.get("content-length"), Some(&b"2"[..]), "the rest of the head is untouched");
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = CONFIG.replace("prefix = \"/admin/\"", "prefix = \"admin\"");
        let e = World::new(&bad).module().err().expect("refused");
        assert!(e.contains("must start with '/'"), "{e}");
        let unknown = CONFIG.replace("header = \"X-Guard\"", "hedaer = \"X-Guard\"");
        let e = World::new(&unknown).module().err().expect("refused");
        assert!(e.contains("hedaer"), "{e}");
    }
}
