//! The hook pipeline with the real binary: the six points run in order
//! (watched through the built-in `trace` module), an answer given at
//! BEFORE_CLUSTER (throttle, quota) never reaches a backend, the `headers`
//! module edits requests and responses globally and per route, and module
//! configuration errors are refused by `pitcher -t` with the file, the line
//! and the module.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

/// Longest wait for the asynchronous error log to show a line.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// One line of the `trace` module: the point and its key/value pairs.
#[derive(Debug, Clone)]
struct Hook {
    point: String,
    line: String,
}

/// The `trace` lines of the error log, in order.
fn hooks(p: &Pitcher) -> Vec<Hook> {
    p.log()
        .lines()
        .filter(|l| l.contains(" hook, "))
        .filter_map(|l| {
            let point = l.split("point: ").nth(1)?.split(',').next()?.trim().to_string();
            Some(Hook { point, line: l.to_string() })
        })
        .collect()
}

/// Waits until every connection seen so far has met FINISH (the readiness
/// probe of the harness opens and closes one); the number of lines so far.
fn settled(p: &Pitcher) -> usize {
    let mut n = 0;
    let ok = wait_until(LOG_WAIT, || {
        let h = hooks(p);
        n = h.len();
        let count = |pt: &str| h.iter().filter(|x| x.point == pt).count();
        count("ACCEPT") == count("FINISH")
    });
    assert!(ok, "connections without FINISH in the log:\n{}", p.log());
    n
}

/// The points of the trace lines after the first `from`, once one of them
/// is FINISH (bounded wait).
fn points_after(p: &Pitcher, from: usize) -> Vec<Hook> {
    let mut got = Vec::new();
    let ok = wait_until(LOG_WAIT, || {
        got = hooks(p).split_off(from.min(hooks(p).len()));
        got.iter().any(|h| h.point == "FINISH")
    });
    assert!(ok, "no FINISH after line {from}; trace so far: {got:#?}\n{}", p.log());
    got
}

fn names(h: &[Hook]) -> Vec<&str> {
    h.iter().map(|h| h.point.as_str()).collect()
}

fn trace_config(be: &Backend, extra: &str) -> ConfigBuilder {
    ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").section(extra)
}

#[test]
fn hooks_run_at_each_point_in_order_for_one_request() {
    let be = Backend::start("a");
    let p = trace_config(&be, "[modules.trace]").start();
    let from = settled(&p);

    let r = get_once(p.addr(), "app", "/one");
    assert_ok_body(&r, b"ok from a");
    assert_eq!(r.header("x-pitcher-trace"), Some("BEFORE_CLUSTER,AFTER_CLUSTER,BACKEND_RESPONSE"), "{}", r.head_str());

    let got = points_after(&p, from);
    assert_eq!(
        names(&got),
        ["ACCEPT", "BEFORE_CLUSTER", "AFTER_CLUSTER", "BACKEND_RESPONSE", "REQUEST_FINISH", "FINISH"],
        "{got:#?}"
    );
    assert!(got[1].line.contains("target: /one"), "{got:#?}");
    assert!(got[2].line.contains(&format!("backend: {}", be.spec())), "AFTER_CLUSTER knows the backend: {got:#?}");
    assert!(got[4].line.contains("status: 200"), "{got:#?}");
    assert!(got[5].line.contains("requests: 1"), "{got:#?}");
}

#[test]
fn keep_alive_connection_meets_accept_and_finish_once() {
    let be = Backend::start("a");
    let p = trace_config(&be, "[modules.trace]").start();
    let from = settled(&p);

    let mut c = p.client();
    for path in ["/ka/1", "/ka/2"] {
        let r = c.get("app", path);
        assert_ok_body(&r, b"ok from a");
        assert_eq!(r.header("x-pitcher-trace"), Some("BEFORE_CLUSTER,AFTER_CLUSTER,BACKEND_RESPONSE"));
        assert!(!r.says_close(), "{}", r.head_str());
    }
    // Nothing but ACCEPT and the first exchange until the client closes.
    thread::sleep(Duration::from_millis(100));
    assert!(hooks(&p)[from..].iter().all(|h| h.point != "FINISH"), "FINISH before the close: {:#?}", hooks(&p));
    drop(c);

    let got = points_after(&p, from);
    let exchange = ["BEFORE_CLUSTER", "AFTER_CLUSTER", "BACKEND_RESPONSE", "REQUEST_FINISH"];
    let mut expected = vec!["ACCEPT"];
    expected.extend(exchange);
    expected.extend(exchange);
    expected.push("FINISH");
    assert_eq!(names(&got), expected, "{got:#?}");
    assert!(got[1].line.contains("target: /ka/1") && got[4].line.contains("target: /ka/1"), "{got:#?}");
    assert!(got[5].line.contains("target: /ka/2") && got[8].line.contains("target: /ka/2"), "{got:#?}");
    assert!(got[9].line.contains("requests: 2"), "{got:#?}");
}

#[test]
fn a_throttle_answer_at_before_cluster_never_reaches_the_backend() {
    let be = Backend::start("a");
    let modules = "[modules]\norder = [\"trace\", \"throttle\"]\n\n[modules.trace]\n\n\
                   [modules.throttle]\nrate_per_sec = 1\nburst = 1\nstatus = 429\nretry_after_secs = 7";
    let p = trace_config(&be, modules).start();
    let from = settled(&p);

    let mut ok = 0;
    let mut rejected = 0;
    for i in 0..6 {
        let r = get_once(p.addr(), "app", &format!("/t/{i}"));
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.header("retry-after"), Some("7"), "{}", r.head_str());
                assert!(r.header("x-pitcher-trace").is_none(), "no BACKEND_RESPONSE for a module's answer");
                rejected += 1;
            }
            s => panic!("unexpected status {s}: {}", r.head_str()),
        }
    }
    assert!(rejected >= 4, "rate 1/s, burst 1: {ok} admitted, {rejected} rejected");
    assert_eq!(be.requests(), ok, "only admitted requests reach the backend");

    // A rejected request: BEFORE_CLUSTER, then straight to REQUEST_FINISH.
    let mut seq = Vec::new();
    wait_until(LOG_WAIT, || {
        seq = hooks(&p)[from..].to_vec();
        seq.iter().filter(|h| h.point == "FINISH").count() == 6
    });
    let rejected_seq: Vec<&Hook> = seq.iter().filter(|h| h.line.contains("status: 429")).collect();
    assert_eq!(rejected_seq.len(), rejected, "one REQUEST_FINISH per rejection: {seq:#?}");
    let after = seq.iter().filter(|h| h.point == "AFTER_CLUSTER").count();
    assert_eq!(after, ok, "AFTER_CLUSTER only for admitted requests: {seq:#?}");
}

#[test]
fn the_throttle_answers_503_with_retry_after_by_default() {
    let be = Backend::start("a");
    let p = trace_config(&be, "[modules.throttle]\nrate_per_sec = 1").start();
    let answers: Vec<Response> = (0..4).map(|i| get_once(p.addr(), "app", &format!("/d/{i}"))).collect();
    let refused: Vec<&Response> = answers.iter().filter(|r| r.status != 200).collect();
    assert!(refused.len() >= 2, "burst 1, rate 1/s: {:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in refused {
        assert_eq!(r.status, 503, "{}", r.head_str());
        assert_eq!(r.header("retry-after"), Some("1"), "{}", r.head_str());
        assert!(!r.body.is_empty(), "a short text body: {}", r.head_str());
    }
}

#[test]
fn a_quota_answer_at_before_cluster_never_reaches_the_backend() {
    let be = Backend::with_handler("a", |r| {
        let reply = Reply::ok("ok from a");
        if r.path() == "/slow" {
            reply.delayed(Duration::from_millis(800))
        } else {
            reply
        }
    });
    let modules = "[modules.quota]\nkey = \"header:X-Tenant\"\nconcurrency = 1\nstatus = 429";
    let p = trace_config(&be, modules).start();
    let addr = p.addr();
    let req = |path: &str, tenant: &str| {
        let mut c = Client::connect(addr);
        c.request(&request_bytes("GET", "app", path, &[("X-Tenant", tenant), ("Connection", "close")], b""))
    };

    let slow = thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.request(&request_bytes("GET", "app", "/slow", &[("X-Tenant", "t1"), ("Connection", "close")], b""))
    });
    assert!(be.wait_for_requests(1, Duration::from_secs(5)), "the slow request did not arrive");
    for i in 0..3 {
        let r = req(&format!("/over/{i}"), "t1");
        assert_eq!(r.status, 429, "t1 has one request in flight: {}", r.head_str());
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(be.requests(), 1, "refused requests reached the backend: {:?}", be.recorded());
    // Another tenant is not affected.
    assert_ok_body(&req("/other", "t2"), b"ok from a");

    assert_ok_body(&slow.join().expect("slow request thread"), b"ok from a");
    // The slot was given back at REQUEST_FINISH.
    assert_ok_body(&req("/after", "t1"), b"ok from a");
    let paths: Vec<String> = be.recorded().iter().map(|r| r.target.clone()).collect();
    assert_eq!(paths, ["/slow", "/other", "/after"]);
}

#[test]
fn headers_module_edits_requests_and_responses_globally_and_per_route() {
    let be = Backend::with_handler("a", |_| {
        Reply::ok("ok from a")
            .with_header("X-Internal", "secret")
            .with_header("X-Keep", "yes")
            .with_header("X-Served-By", "backend")
    });
    let text = format!(
        r#"
[[clusters]]
name = "app"
backends = ["{be}"]

[[routes]]
name = "api"
path_prefix = "/api"
cluster = "app"

[[routes]]
name = "web"
path_prefix = "/"
cluster = "app"

[modules.headers]
request_set = {{ "X-Env" = "test" }}
request_append = {{ "X-Multi" = "added" }}
request_remove = ["X-Secret"]
response_set = {{ "X-Served-By" = "pitcher" }}
response_append = {{ "X-Trail" = "one" }}
response_remove = ["X-Internal"]

[modules.headers.routes.api]
request_set = {{ "X-Route" = "api" }}
response_set = {{ "Cache-Control" = "no-store" }}
response_remove = ["X-Keep"]
"#,
        be = be.spec()
    );
    let p = ConfigBuilder::new().section(&text).start();
    let send = |path: &str| {
        let mut c = p.client();
        c.request(&request_bytes(
            "GET",
            "app",
            path,
            &[("X-Secret", "s3cr3t"), ("X-Multi", "orig"), ("X-Env", "client"), ("Connection", "close")],
            b"",
        ))
    };

    let web = send("/page");
    assert_ok_body(&web, b"ok from a");
    let seen = be.last_request().expect("request at the backend");
    assert_eq!(seen.headers.get_all("x-env"), ["test"], "request_set replaces:\n{}", seen.head_str());
    assert_eq!(seen.headers.get_all("x-multi"), ["orig", "added"], "request_append adds:\n{}", seen.head_str());
    assert!(seen.header("x-secret").is_none(), "request_remove:\n{}", seen.head_str());
    assert!(seen.header("x-route").is_none(), "the api rules are for the api route only:\n{}", seen.head_str());
    assert_eq!(web.headers.get_all("x-served-by"), ["pitcher"], "response_set:\n{}", web.head_str());
    assert_eq!(web.header("x-trail"), Some("one"), "response_append:\n{}", web.head_str());
    assert!(web.header("x-internal").is_none(), "response_remove:\n{}", web.head_str());
    assert_eq!(web.header("x-keep"), Some("yes"), "{}", web.head_str());
    assert!(web.header("cache-control").is_none(), "{}", web.head_str());

    let api = send("/api/v1");
    assert_ok_body(&api, b"ok from a");
    let seen = be.last_request().expect("request at the backend");
    assert_eq!(seen.target, "/api/v1");
    assert_eq!(seen.header("x-route"), Some("api"), "route rule on the request:\n{}", seen.head_str());
    assert_eq!(seen.headers.get_all("x-env"), ["test"], "global rules still apply:\n{}", seen.head_str());
    assert!(seen.header("x-secret").is_none(), "{}", seen.head_str());
    assert_eq!(api.header("cache-control"), Some("no-store"), "route rule on the response:\n{}", api.head_str());
    assert!(api.header("x-keep").is_none(), "route response_remove:\n{}", api.head_str());
    assert_eq!(api.headers.get_all("x-served-by"), ["pitcher"], "{}", api.head_str());
    assert!(api.header("x-internal").is_none(), "{}", api.head_str());
}

#[test]
fn a_route_runs_only_the_modules_it_names() {
    let be = Backend::start("a");
    let text = format!(
        r#"
[[clusters]]
name = "app"
backends = ["{be}"]

[[routes]]
name = "plain"
path_prefix = "/plain"
cluster = "app"
modules = []

[[routes]]
path_prefix = "/"
cluster = "app"

[modules.headers]
response_set = {{ "X-Headers" = "on" }}
"#,
        be = be.spec()
    );
    let p = ConfigBuilder::new().section(&text).start();
    let r = get_once(p.addr(), "app", "/x");
    assert_eq!(r.header("x-headers"), Some("on"), "global pipeline:\n{}", r.head_str());
    let r = get_once(p.addr(), "app", "/plain/x");
    assert_ok_body(&r, b"ok from a");
    assert!(r.header("x-headers").is_none(), "modules = [] runs none:\n{}", r.head_str());
}

// --- configuration errors ---------------------------------------------------

const BASE: &str = "workers = 1\n\
[[listeners]]\n\
address = \"127.0.0.1:1\"\n\
[[clusters]]\n\
name = \"app\"\n\
backends = [\"127.0.0.1:2\"]\n\
[[routes]]\n\
path_prefix = \"/\"\n\
cluster = \"app\"\n";

/// `pitcher -t` on `BASE` + `extra`: (success, stderr + stdout, file path).
fn check(extra: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, format!("{BASE}{extra}")).expect("write config");
    let path = path.display().to_string();
    let out = run_pitcher(&["-t", "-c", &path], Duration::from_secs(20));
    (out.status.success(), out.all(), path)
}

/// The 1-based line of `needle` in `BASE` + `extra`.
fn line_of(extra: &str, needle: &str) -> usize {
    let text = format!("{BASE}{extra}");
    1 + text.lines().position(|l| l.trim() == needle).unwrap_or_else(|| panic!("{needle} not in {text}"))
}

/// Refused, naming the file, the line of `at` and the module's table.
fn assert_refused(extra: &str, at: &str, table: &str, words: &[&str]) {
    let (ok, out, path) = check(extra);
    assert!(!ok, "accepted:\n{BASE}{extra}\n{out}");
    let line = line_of(extra, at);
    assert!(out.contains(&path), "the file is not named: {out}");
    let named = out.contains(&format!("{path}:{line}")) || out.contains(&format!("line {line}"));
    assert!(named, "line {line} is not named: {out}");
    assert!(out.contains(table), "the module {table} is not named: {out}");
    for w in words {
        assert!(out.contains(w), "{w:?} missing in: {out}");
    }
}

#[test]
fn an_unknown_module_is_refused_naming_file_line_and_module() {
    let t = "[modules.nosuch]";
    assert_refused("\n[modules.nosuch]\nx = 1\n", t, t, &["no such module", "throttle"]);
}

#[test]
fn bad_module_settings_are_refused_naming_file_line_and_module() {
    let t = "[modules.throttle]";
    assert_refused("\n[modules.throttle]\nburst = 3\n", t, t, &["rate_per_sec"]);
    assert_refused("\n[modules.trace]\n\n[modules.throttle]\nrate_per_sec = 5\nbogus = 1\n", t, t, &["bogus"]);
    assert_refused("\n[modules.throttle]\nrate_per_sec = 5\nstatus = 200\n", t, t, &["status"]);
    let t = "[modules.quota]";
    assert_refused("\n[modules.quota]\nkey = \"cookie:x\"\n", t, t, &["key"]);
    let t = "[modules.access_log]";
    assert_refused("\n[modules.access_log]\nformat = \"xml\"\npath = \"/tmp/x.log\"\n", t, t, &["format"]);
    let t = "[modules.degrade]";
    assert_refused("\n[modules.degrade]\nin_flight_high = 10\nin_flight_low = 20\n", t, t, &["_low"]);
    let extra = "\n[modules.headers]\n[modules.headers.routes.nosuchroute]\nresponse_set = { \"A\" = \"b\" }\n";
    assert_refused(extra, "[modules.headers]", "[modules.headers]", &["nosuchroute"]);
}

/// Regression: a module table made only by its sub-tables (TOML's implicit
/// tables) or by dotted keys was refused with "invalid type: string
/// \"routes\", expected a borrowed string".
#[test]
fn module_tables_given_by_sub_tables_or_dotted_keys_are_accepted() {
    let route = "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\ncluster = \"app\"\n";
    for extra in [
        format!("{route}\n[modules.headers.routes.api]\nresponse_set = {{ \"A\" = \"b\" }}\n"),
        format!("{route}\n[modules]\nheaders.response_set = {{ \"A\" = \"b\" }}\n"),
    ] {
        let (ok, out, _) = check(&extra);
        assert!(ok, "refused:\n{BASE}{extra}\n{out}");
    }
}

#[test]
fn a_route_naming_a_module_without_a_table_is_refused() {
    let (ok, out, path) = check("modules = [\"headers\"]\n");
    assert!(!ok, "accepted: {out}");
    assert!(out.contains(&path), "{out}");
    assert!(out.contains("headers") && out.contains("[modules.headers]"), "{out}");
    let line = line_of("modules = [\"headers\"]\n", "modules = [\"headers\"]");
    assert!(out.contains(&format!("{path}:{line}:")), "line {line} not named: {out}");
}

#[test]
fn valid_module_tables_pass_the_check() {
    let extra = "\n[modules]\norder = [\"trace\", \"headers\"]\n\n[modules.trace]\n\n\
                 [modules.headers]\nessential = false\nresponse_set = { \"X-A\" = \"b\" }\n\n\
                 [modules.throttle]\nenabled = false\nrate_per_sec = 10\n";
    let (ok, out, _) = check(extra);
    assert!(ok, "refused: {out}");
}
