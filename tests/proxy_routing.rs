//! Which backend gets a request: routing by host and path, weighted round
//! robin, TCP and Unix-socket backends; and how connections are used:
//! client keep-alive, `Connection: close`, upstream connection pooling.

mod common;

use std::collections::HashMap;

use common::*;

/// GETs `path` with `Host: host` on a new connection and returns the
/// `X-Backend` that answered.
fn served_by(p: &Pitcher, host: &str, path: &str) -> String {
    let r = get_once(p.addr(), host, path);
    assert_eq!(r.status, 200, "{host}{path}: {}", r.head_str());
    r.header("x-backend").unwrap_or_else(|| panic!("{host}{path}: no X-Backend in\n{}", r.head_str())).to_string()
}

#[test]
fn routes_by_exact_host() {
    let a = Backend::start("a");
    let other = Backend::start("other");
    let p = ConfigBuilder::new()
        .cluster("ca", [a.spec()])
        .cluster("cother", [other.spec()])
        .route(Some("a.example"), "/", "ca")
        .route(None, "/", "cother")
        .start();

    assert_eq!(served_by(&p, "a.example", "/x"), "a");
    assert_eq!(served_by(&p, "b.example", "/x"), "other");
    assert_eq!(served_by(&p, "sub.a.example", "/x"), "other");
    assert_eq!((a.requests(), other.requests()), (1, 2));
    assert_eq!(a.last_request().unwrap().target, "/x");
}

#[test]
fn routes_by_wildcard_host_suffix() {
    let wide = Backend::start("wide");
    let narrow = Backend::start("narrow");
    let exact = Backend::start("exact");
    let fallback = Backend::start("fallback");
    let p = ConfigBuilder::new()
        .cluster("wide", [wide.spec()])
        .cluster("narrow", [narrow.spec()])
        .cluster("exact", [exact.spec()])
        .cluster("fallback", [fallback.spec()])
        .route(Some("*.example.com"), "/", "wide")
        .route(Some("*.b.example.com"), "/", "narrow")
        .route(Some("exact.example.com"), "/", "exact")
        .route(None, "/", "fallback")
        .start();

    assert_eq!(served_by(&p, "x.example.com", "/"), "wide");
    assert_eq!(served_by(&p, "deep.x.example.com", "/"), "wide");
    // The longest wildcard wins.
    assert_eq!(served_by(&p, "x.b.example.com", "/"), "narrow");
    // An exact host beats any wildcard.
    assert_eq!(served_by(&p, "exact.example.com", "/"), "exact");
    // "*.example.com" is for subdomains, not example.com itself.
    assert_eq!(served_by(&p, "example.com", "/"), "fallback");
    assert_eq!(served_by(&p, "example.org", "/"), "fallback");
}

#[test]
fn routes_by_longest_path_prefix() {
    let root = Backend::start("root");
    let api = Backend::start("api");
    let v2 = Backend::start("v2");
    let p = ConfigBuilder::new()
        .cluster("root", [root.spec()])
        .cluster("api", [api.spec()])
        .cluster("v2", [v2.spec()])
        // Declared shortest-last on purpose: order must not matter.
        .route(None, "/api/v2", "v2")
        .route(None, "/", "root")
        .route(None, "/api", "api")
        .start();

    assert_eq!(served_by(&p, "h", "/api/v2/users?id=3"), "v2");
    assert_eq!(served_by(&p, "h", "/api/v2"), "v2");
    assert_eq!(served_by(&p, "h", "/api/v1/users"), "api");
    assert_eq!(served_by(&p, "h", "/api"), "api");
    assert_eq!(served_by(&p, "h", "/"), "root");
    assert_eq!(served_by(&p, "h", "/static/app.js"), "root");
    assert_eq!(v2.last_request().unwrap().target, "/api/v2");
    assert_eq!(v2.recorded()[0].target, "/api/v2/users?id=3");
}

#[test]
fn host_match_ignores_port_and_case() {
    let app = Backend::start("app");
    let other = Backend::start("other");
    let p = ConfigBuilder::new()
        .cluster("app", [app.spec()])
        .cluster("other", [other.spec()])
        .route(Some("App.Example"), "/", "app")
        .route(None, "/", "other")
        .start();

    assert_eq!(served_by(&p, "app.example", "/"), "app");
    assert_eq!(served_by(&p, "APP.EXAMPLE", "/"), "app");
    assert_eq!(served_by(&p, "app.example:8080", "/"), "app");
    assert_eq!(served_by(&p, "aPp.ExAmPlE:80", "/"), "app");
    assert_eq!(served_by(&p, "app.example.org", "/"), "other");
    assert_eq!(app.requests(), 4);
}

#[test]
fn no_matching_route_is_404_and_reaches_no_backend() {
    let only = Backend::start("only");
    let p = ConfigBuilder::new().cluster("only", [only.spec()]).route(Some("only.example"), "/app", "only").start();

    let mut c = p.client();
    let r = c.get("else.example", "/app");
    assert_error_response(&r, 404);
    let r = c.get("only.example", "/other");
    assert_error_response(&r, 404);
    // The connection still works after a 404.
    let r = c.get("only.example", "/app/x");
    assert_ok_body(&r, b"ok from only");
    assert_eq!(
        only.requests(),
        1,
        "requests seen: {:?}",
        only.recorded().iter().map(|r| &r.target).collect::<Vec<_>>()
    );
}

#[test]
fn weighted_round_robin_shares_1_to_3() {
    let light = Backend::start("light");
    let heavy = Backend::start("heavy");
    let p = ConfigBuilder::new()
        .cluster("app", [light.spec_weight(1), heavy.spec_weight(3)])
        .route(None, "/", "app")
        .start();

    let mut c = p.client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        let r = c.get("h", &format!("/{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        *seen.entry(r.header("x-backend").unwrap_or("?").to_string()).or_default() += 1;
    }
    assert_eq!((light.requests(), heavy.requests()), (10, 30), "answers: {seen:?}");
    assert_eq!(seen.get("light"), Some(&10));
    assert_eq!(seen.get("heavy"), Some(&30));
}

#[test]
fn tcp_and_unix_backends_both_serve() {
    let tcp = Backend::start("tcp");
    let unix = Backend::unix("unix");
    let p = ConfigBuilder::new().cluster("app", [tcp.spec(), unix.spec()]).route(None, "/", "app").start();

    let mut c = p.client();
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let r = c.get("h", "/");
        assert_eq!(r.status, 200, "{}", r.head_str());
        bodies.push(r.body_str());
    }
    assert_eq!((tcp.requests(), unix.requests()), (5, 5), "bodies: {bodies:?}");
    assert_eq!(bodies.iter().filter(|b| *b == "ok from unix").count(), 5);
    assert_eq!(bodies.iter().filter(|b| *b == "ok from tcp").count(), 5);
}

#[test]
fn client_keepalive_serves_many_requests_on_one_connection() {
    let be = Backend::with_handler("be", |req| Reply::ok(format!("you asked for {}", req.target)));
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();

    let mut c = p.client();
    for i in 0..100 {
        let r = c.get("h", &format!("/req/{i}"));
        assert_ok_body(&r, format!("you asked for /req/{i}").as_bytes());
        assert!(!r.says_close(), "request {i} got Connection: close:\n{}", r.head_str());
    }
    assert_eq!(be.requests(), 100);
    assert!(!c.closed_by_peer(std::time::Duration::from_millis(100)), "keep-alive connection was closed");
}

#[test]
fn client_connection_close_is_answered_with_close() {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();

    let mut c = p.client();
    let r = c.request(&request_bytes("GET", "h", "/", &[("Connection", "close")], b""));
    assert_ok_body(&r, b"ok from be");
    assert!(r.says_close(), "no Connection: close in\n{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "Pitcher kept the connection open after Connection: close");
}

#[test]
fn upstream_connections_are_pooled_across_client_connections() {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();

    for i in 0..50 {
        let mut c = p.client();
        let r = c.get("h", &format!("/{i}"));
        assert_ok_body(&r, b"ok from be");
    }
    assert_eq!(be.requests(), 50);
    assert!(be.connections() <= 2, "50 sequential requests used {} upstream connections", be.connections());
}

#[test]
fn upstream_connections_are_pooled_for_one_keepalive_client() {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();

    let mut c = p.client();
    for i in 0..50 {
        let r = c.get("h", &format!("/{i}"));
        assert_ok_body(&r, b"ok from be");
    }
    assert_eq!(be.requests(), 50);
    assert!(be.connections() <= 2, "50 sequential requests used {} upstream connections", be.connections());
}
