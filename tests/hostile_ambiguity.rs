//! Requests that an origin could read differently from Pitcher are refused
//! with 400 and never forwarded (a method not in upper case, a fragment, an
//! invalid Host even beside an absolute-form target, a `_` twin of a
//! framing or forwarding field, a path above the root); and routing and
//! route-scoped modules match the normalised path, so `//admin`,
//! `/%61dmin` or `/x/../admin` cannot slip past a rule for `/admin`, while
//! the backend still gets the target as sent unless configured otherwise.

mod common;

use common::*;

/// A Pitcher in front of one recording backend, every request routed to it.
fn proxy() -> (Backend, Pitcher) {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();
    (be, p)
}

/// Sends each of `raws` on a fresh connection and asserts that Pitcher
/// answers 400 itself with `Connection: close` and closes the connection,
/// that the backend saw no connection at all, and that a well-formed
/// request still goes through afterwards.
fn assert_all_refused(raws: &[&[u8]]) {
    let (be, p) = proxy();
    for raw in raws {
        let mut c = p.client();
        c.send(raw);
        let r = c.read_response();
        assert_error_response(&r, 400);
        assert!(r.says_close(), "refusal without Connection: close:\n{}", r.head_str());
        assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after refusing {:?}", preview(raw));
        assert_eq!(be.connections(), 0, "the backend was connected to for {:?}", preview(raw));
    }
    assert_ok_body(&get_once(p.addr(), "h", "/after"), b"ok from be");
    assert_eq!(be.requests(), 1);
}

// --- Point 3: method case, fragments, Host values ---

#[test]
fn method_not_in_upper_case_is_400() {
    assert_all_refused(&[
        b"get / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"Get / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"delete /x HTTP/1.1\r\nHost: h\r\n\r\n",
    ]);
}

#[test]
fn fragment_in_the_target_is_400() {
    assert_all_refused(&[
        b"GET /public#/../admin HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a?q=1#frag HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/a#frag HTTP/1.1\r\nHost: h\r\n\r\n",
    ]);
}

#[test]
fn invalid_host_is_400_even_beside_an_absolute_form_target() {
    assert_all_refused(&[
        b"GET http://h/x HTTP/1.1\r\nHost: h h\r\n\r\n",
        b"GET http://h/x HTTP/1.1\r\nHost: evil/x\r\n\r\n",
        b"GET http://h/x HTTP/1.1\r\nHost: u@evil\r\n\r\n",
        b"GET http://h/x HTTP/1.1\r\nHost: h:port\r\n\r\n",
        b"GET http://h/x HTTP/1.1\r\nHost: a,b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    ]);
}

#[test]
fn absolute_form_authority_still_wins_over_a_valid_host() {
    let (be, p) = proxy();
    let r = p.client().request(b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    assert_eq!(be.last_request().unwrap().headers.get_all("host"), vec!["a.example"]);
}

// --- Point 2: `_` twins of fields proxies act on ---

#[test]
fn underscore_twins_of_framing_and_forwarding_fields_are_400() {
    assert_all_refused(&[
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent_Length: 5\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nkeep_alive: 300\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nProxy_Connection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded_Proto: https\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX_Request_Id: forged\r\n\r\n",
    ]);
}

#[test]
fn other_fields_with_underscores_are_forwarded() {
    let (be, p) = proxy();
    let r = p.client().request(b"GET / HTTP/1.1\r\nHost: h\r\nX_Custom: 1\r\nContent_Type: text/plain\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert_eq!(got.header("x_custom"), Some("1"), "{}", got.head_str());
    assert_eq!(got.header("content_type"), Some("text/plain"));
}

// --- Point 4: routing and modules on the normalised path ---

/// `/admin` goes to the `admin` cluster (a route named "admin", whose
/// `headers` rule marks the request), everything else to `app`.
fn admin_proxy(top: &str) -> (Backend, Backend, Pitcher) {
    let app = Backend::start("app");
    let admin = Backend::start("admin");
    let p = ConfigBuilder::new()
        .top(top)
        .cluster("app", [app.spec()])
        .cluster("admin", [admin.spec()])
        .route(None, "/", "app")
        .section(
            r#"[[routes]]
name = "admin"
path_prefix = "/admin"
cluster = "admin"

[modules.headers.routes.admin]
request_set = { "X-Scope" = "admin" }"#,
        )
        .start();
    (app, admin, p)
}

const DISGUISED: [&str; 6] = ["//admin", "/%61dmin", "/x/../admin", "/x/./../admin", "/./admin/", "/x/%2E%2e/admin"];

#[test]
fn disguised_admin_paths_take_the_admin_route_and_its_modules() {
    let (app, admin, p) = admin_proxy("normalize_upstream_path = false");
    let mut c = p.client();
    for target in DISGUISED {
        let r = c.get("h", target);
        assert_ok_body(&r, b"ok from admin");
        let got = admin.last_request().unwrap();
        // The route-scoped module ran, and the backend got the target as sent.
        assert_eq!(got.header("x-scope"), Some("admin"), "{target}");
        assert_eq!(got.target, target);
    }
    assert_eq!(admin.requests(), DISGUISED.len());
    // An encoded slash is not a separator: this is not under /admin.
    assert_ok_body(&c.get("h", "/x%2F..%2Fadmin"), b"ok from app");
    assert_ok_body(&c.get("h", "/public"), b"ok from app");
    assert_eq!(app.last_request().unwrap().header("x-scope"), None);
}

#[test]
fn normalised_path_goes_to_the_backend_when_configured() {
    let (_app, admin, p) = admin_proxy("normalize_upstream_path = true");
    let mut c = p.client();
    assert_ok_body(&c.get("h", "//x/./../%61dmin//users?q=/../%61"), b"ok from admin");
    assert_eq!(admin.last_request().unwrap().target, "/admin/users?q=/../%61");
    assert_ok_body(&c.get("h", "/admin%2fx"), b"ok from admin");
    assert_eq!(admin.last_request().unwrap().target, "/admin%2Fx");
}

#[test]
fn path_above_the_root_or_with_a_malformed_escape_is_400() {
    assert_all_refused(&[
        b"GET /../admin HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /x/../../admin HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /%2e%2e/admin HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/../x HTTP/1.1\r\n\r\n",
        b"GET /%zz HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a%2 HTTP/1.1\r\nHost: h\r\n\r\n",
    ]);
}
