//! Routing rules beyond host and path prefix: every matcher (host regex,
//! exact path, path regex, methods, header, cookie, query) and its
//! precedence; every action (prefix strip/replace, regex rewrite, Host
//! header, redirect, fixed response, weighted and sticky splits) as the
//! client and the backend see them; `pitcher -t --routes`; and a
//! configuration of 10,000 routes and 2,000 clusters that loads, routes and
//! reloads (every worker applies it, and `/metrics` counts the routes past
//! its table's capacity in `(other)`).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::master::MasterRun;
use common::*;

/// Sends `raw` on a new connection and returns the `X-Backend` that answered.
fn served_by_raw(p: &Pitcher, raw: &str) -> String {
    let mut c = p.client();
    let r = c.request(raw.as_bytes());
    assert_eq!(r.status, 200, "{raw:?}: {}", r.head_str());
    r.header("x-backend").unwrap_or_else(|| panic!("{raw:?}: no X-Backend in\n{}", r.head_str())).to_string()
}

fn get(host: &str, target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

#[test]
fn every_matcher_and_its_precedence() {
    let names = ["any", "re", "exact", "prefix", "long", "regex", "beta", "cookie", "query", "post"];
    let backends: Vec<Backend> = names.iter().map(|n| Backend::start(n)).collect();
    let mut b = ConfigBuilder::new();
    for (n, be) in names.iter().zip(&backends) {
        b = b.cluster(n, [be.spec()]);
    }
    let p = b
        .section(
            r#"
[[routes]]
cluster = "any"
[[routes]]
host_regex = "^api[0-9]+\\.example\\.(com|net)$"
cluster = "re"
[[routes]]
host = "shop.example"
path_regex = "^/items/[0-9]+$"
cluster = "regex"
[[routes]]
host = "shop.example"
path_prefix = "/items"
cluster = "prefix"
[[routes]]
host = "shop.example"
path_prefix = "/items/special"
cluster = "long"
[[routes]]
host = "shop.example"
path = "/items/7"
cluster = "exact"
[[routes]]
host = "shop.example"
path_prefix = "/cart"
header = { name = "X-Beta", value = "1" }
cluster = "beta"
[[routes]]
host = "shop.example"
path_prefix = "/cart"
cookie = { name = "session", regex = "^vip-" }
cluster = "cookie"
[[routes]]
host = "shop.example"
path_prefix = "/cart"
query = { name = "debug" }
cluster = "query"
[[routes]]
host = "shop.example"
path_prefix = "/cart"
methods = ["POST"]
cluster = "post"
[[routes]]
host = "shop.example"
path_prefix = "/"
cluster = "any"
"#,
        )
        .start();

    // Hosts: exact > regex > any.
    assert_eq!(served_by_raw(&p, &get("api12.example.com", "/x", "")), "re");
    assert_eq!(served_by_raw(&p, &get("api12.example.org", "/x", "")), "any");
    // Paths: exact > longest prefix > regex.
    assert_eq!(served_by_raw(&p, &get("shop.example", "/items/7", "")), "exact");
    assert_eq!(served_by_raw(&p, &get("shop.example", "/items/special/1", "")), "long");
    assert_eq!(served_by_raw(&p, &get("shop.example", "/items/8", "")), "prefix");
    assert_eq!(served_by_raw(&p, &get("shop.example", "//items/%37", "")), "exact");
    // Conditions, in file order: the first whose conditions hold.
    assert_eq!(served_by_raw(&p, &get("shop.example", "/cart", "X-Beta: 1\r\nCookie: session=vip-1\r\n")), "beta");
    assert_eq!(
        served_by_raw(&p, &get("shop.example", "/cart", "X-Beta: 2\r\nCookie: a=b; session=vip-1\r\n")),
        "cookie"
    );
    assert_eq!(served_by_raw(&p, &get("shop.example", "/cart?x=1&debug=1", "Cookie: session=basic\r\n")), "query");
    let post = "POST /cart HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(served_by_raw(&p, post), "post");
    // None holds: the next path candidate, the prefix "/".
    assert_eq!(served_by_raw(&p, &get("shop.example", "/cart", "")), "any");
    assert_eq!(backends[1].requests(), 1);
}

#[test]
fn rewrites_and_host_header_as_the_backend_sees_them() {
    let be = Backend::start("app");
    let p = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .section(
            r#"
[[routes]]
path_prefix = "/api/"
strip_prefix = true
cluster = "app"
[[routes]]
path_prefix = "/old"
replace_prefix = "/new"
host_header = "backend"
cluster = "app"
[[routes]]
path_regex = "^/u/([0-9]+)/profile$"
rewrite = { regex = "^/u/([0-9]+)/profile$", replacement = "/users/$1" }
host_header = "internal.example"
cluster = "app"
[[routes]]
path_prefix = "/plain"
cluster = "app"
"#,
        )
        .start();
    let mut c = p.client();
    for (target, want_target, want_host) in [
        ("/api/users?id=3", "/users?id=3", "front.example".to_string()),
        ("/api/", "/", "front.example".to_string()),
        ("/old/x?q", "/new/x?q", be.addr().to_string()),
        ("/u/42/profile?tab=1", "/users/42?tab=1", "internal.example".to_string()),
        ("/plain//path?k=v", "/plain//path?k=v", "front.example".to_string()),
    ] {
        let r = c.get("front.example", target);
        assert_eq!(r.status, 200, "{target}: {}", r.head_str());
        let seen = be.last_request().unwrap_or_else(|| panic!("{target}: the backend saw nothing"));
        assert_eq!(seen.target, want_target, "{target}");
        assert_eq!(seen.header("host"), Some(want_host.as_str()), "{target}: {}", seen.head_str());
    }
}

#[test]
fn redirects_and_fixed_responses_are_answered_by_pitcher() {
    let be = Backend::start("app");
    let p = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .section(
            r#"
[[routes]]
host = "old.example"
redirect = { status = 301, to = "https://new.example$request_uri" }
[[routes]]
path_prefix = "/secure"
redirect = { status = 308, to = "https://$host$request_uri" }
[[routes]]
path = "/health"
return = { status = 200, body = "healthy\n", content_type = "text/plain; charset=utf-8" }
[[routes]]
path = "/gone"
return = { status = 410, body = "{\"error\":\"gone\"}", content_type = "application/json" }
[[routes]]
path = "/scheme"
redirect = { to = "$scheme://$host/x" }
[[routes]]
cluster = "app"
"#,
        )
        .start();
    let mut c = p.client();
    let r = c.get("old.example:8080", "/a/b?c=d");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://new.example/a/b?c=d"));
    let r = c.get("Shop.Example:8080", "/secure/pay?x=1");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://shop.example/secure/pay?x=1"));
    let r = c.get("h", "/health");
    assert_eq!((r.status, r.body_str().as_str()), (200, "healthy\n"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = c.get("h", "/gone");
    assert_eq!((r.status, r.body_str().as_str()), (410, "{\"error\":\"gone\"}"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = c.get("h", "/scheme");
    assert_eq!((r.status, r.header("location")), (302, Some("http://h/x")));
    // The connection stayed usable, and no backend saw any of these.
    let r = c.get("h", "/other");
    assert_eq!(r.header("x-backend"), Some("app"));
    assert_eq!(be.requests(), 1);
}

/// Sends `n` keep-alive requests made by `make(i)` and counts the
/// backends that answered.
fn tally(p: &Pitcher, n: usize, make: impl Fn(usize) -> String) -> HashMap<String, usize> {
    let mut c = p.client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..n {
        let r = c.request(make(i).as_bytes());
        assert_eq!(r.status, 200, "{}", r.head_str());
        *seen.entry(r.header("x-backend").unwrap_or("none").to_string()).or_default() += 1;
    }
    seen
}

#[test]
fn weighted_split_over_10000_requests() {
    let v1 = Backend::start("v1");
    let v2 = Backend::start("v2");
    let p = ConfigBuilder::new()
        .cluster("v1", [v1.spec()])
        .cluster("v2", [v2.spec()])
        .section("[[routes]]\nsplit = [{ cluster = \"v1\", weight = 95 }, { cluster = \"v2\", weight = 5 }]\n")
        .start();
    let n = 10_000;
    let seen = tally(&p, n, |_| get("h", "/", ""));
    let (a, b) = (seen.get("v1").copied().unwrap_or(0), seen.get("v2").copied().unwrap_or(0));
    assert_eq!(a + b, n, "{seen:?}");
    // 5% ± 3% of the requests.
    assert!((200..=800).contains(&b), "v2 got {b} of {n}: {seen:?}");
}

#[test]
fn sticky_split_keeps_a_value_on_one_cluster() {
    let v1 = Backend::start("v1");
    let v2 = Backend::start("v2");
    let p = ConfigBuilder::new()
        .cluster("v1", [v1.spec()])
        .cluster("v2", [v2.spec()])
        .section(
            r#"
[[routes]]
path_prefix = "/h"
split = [{ cluster = "v1", weight = 50 }, { cluster = "v2", weight = 50 }]
sticky = { header = "X-User" }
[[routes]]
path_prefix = "/c"
split = [{ cluster = "v1", weight = 50 }, { cluster = "v2", weight = 50 }]
sticky = { cookie = "uid" }
"#,
        )
        .start();
    let mut per_value: HashMap<String, String> = HashMap::new();
    let mut clusters_seen: HashMap<String, usize> = HashMap::new();
    for round in 0..3 {
        for user in 0..40 {
            for (path, extra) in
                [("/h", format!("X-User: user-{user}\r\n")), ("/c", format!("Cookie: a=1; uid=user-{user}\r\n"))]
            {
                let seen = tally(&p, 1, |_| get("h", path, &extra));
                let got = seen.keys().next().cloned().unwrap_or_default();
                let key = format!("{path} {user}");
                if round == 0 {
                    *clusters_seen.entry(got.clone()).or_default() += 1;
                    per_value.insert(key, got);
                } else {
                    assert_eq!(per_value[&key], got, "{key} moved in round {round}");
                }
            }
        }
    }
    // 80 values spread over both clusters.
    assert!(clusters_seen.len() == 2 && clusters_seen.values().all(|&n| n >= 10), "{clusters_seen:?}");
    // Without a value: weighted random, both clusters.
    let seen = tally(&p, 200, |_| get("h", "/h", ""));
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn t_routes_prints_the_table_in_precedence_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pitcher.toml");
    let text = r#"
[[listeners]]
address = "127.0.0.1:1"
[[clusters]]
name = "app"
backends = ["127.0.0.1:2"]
[[clusters]]
name = "canary"
backends = ["127.0.0.1:3"]
[[routes]]
name = "fallback"
cluster = "app"
[[routes]]
name = "api"
host = "shop.example"
path_prefix = "/api"
methods = ["GET"]
header = { name = "X-Beta", value = "1" }
split = [{ cluster = "app", weight = 95 }, { cluster = "canary", weight = 5 }]
[[routes]]
name = "wild"
host = "*.example"
path_regex = "\\.php$"
return = { status = 403, body = "no" }
[[routes]]
name = "exact"
host = "shop.example"
path = "/api/ping"
cluster = "app"
"#;
    std::fs::write(&path, text).expect("write");
    let p = path.display().to_string();
    let out = run_pitcher(&["-t", "--routes", "-c", &p], Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.all());
    let rows: Vec<&str> = out.stdout.lines().filter(|l| l.contains('\t')).collect();
    assert_eq!(
        rows,
        [
            "host=shop.example\tpath=/api/ping\t-\tcluster=app\t[exact]",
            "host=shop.example\tprefix=/api\tmethods=GET header:X-Beta=1\tsplit=app:95,canary:5\t[api]",
            "host=*.example\tpath~\\.php$\t-\treturn 403 (2 bytes)\t[wild]",
            "host=*\tprefix=/\t-\tcluster=app\t[fallback]",
        ],
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("configuration ok"), "{}", out.stdout);
}

#[test]
fn bad_rules_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pitcher.toml");
    let head = "[[listeners]]\naddress = \"127.0.0.1:1\"\n[[clusters]]\nname = \"app\"\nbackends = [\"127.0.0.1:2\"]\n[[routes]]\n";
    for (route, reason) in [
        ("path_regex = \"(\"\ncluster = \"app\"\n", "not a valid regex"),
        ("path = \"/a\"\nstrip_prefix = true\ncluster = \"app\"\n", "needs a path_prefix"),
        ("redirect = { status = 200, to = \"/x\" }\n", "redirect status 200"),
        ("redirect = { to = \"https://$hostname$uri\" }\n", "unknown variable"),
        ("cluster = \"app\"\nreturn = { body = \"x\" }\n", "exactly one of"),
        ("split = [{ cluster = \"app\", weight = 0 }]\n", "weight 0"),
        ("path_prefix = \"/a\"\nreplace_prefix = \"/b c\"\ncluster = \"app\"\n", "not allowed in a path"),
        ("header = { name = \"X\", value = \"1\", regex = \"1\" }\ncluster = \"app\"\n", "not both"),
        ("cluster = \"app\"\nhost_header = \"\"\n", "host_header"),
    ] {
        std::fs::write(&path, format!("{head}{route}")).expect("write");
        let p = path.display().to_string();
        let out = run_pitcher(&["-t", "-c", &p], Duration::from_secs(20));
        assert!(!out.status.success(), "{route}: accepted");
        assert!(out.stderr.contains(&format!("{p}:")) && out.stderr.contains(reason), "{route}: {}", out.stderr);
        // The error points into the route (line 7 or later).
        let line: usize = out
            .stderr
            .split(&format!("{p}:"))
            .nth(1)
            .and_then(|s| s.split(':').next())
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        assert!(line >= 6, "{route}: {}", out.stderr);
    }
}

/// A configuration of `routes` routes over `clusters` clusters, which
/// are spread over `backends`; route `j` sends to cluster
/// `(j + shift) % clusters`. Even routes are by exact host, odd ones by
/// path prefix under any host; every tenth has a header condition.
fn big_config(backends: &[Backend], clusters: usize, routes: usize, shift: usize) -> ConfigBuilder {
    let mut b = ConfigBuilder::new().top("workers = 2");
    for i in 0..clusters {
        b = b.cluster(&format!("c{i}"), [backends[i % backends.len()].spec()]);
    }
    let mut t = String::with_capacity(routes * 80);
    for j in 0..routes {
        let cluster = (j + shift) % clusters;
        t.push_str("[[routes]]\n");
        if j % 2 == 0 {
            t.push_str(&format!("host = \"svc{j}.example\"\npath_prefix = \"/v1\"\n"));
        } else {
            t.push_str(&format!("path_prefix = \"/r{j}/\"\n"));
        }
        if j % 10 == 1 {
            t.push_str("header = { name = \"X-Tenant\" }\n");
        }
        t.push_str(&format!("cluster = \"c{cluster}\"\n"));
    }
    t.push_str("[[routes]]\nreturn = { status = 404, body = \"none\" }\n");
    b.section(&t)
}

/// The request route `j` of [`big_config`] matches, and the backend it
/// should reach.
fn sample(j: usize, shift: usize, clusters: usize, backends: &[Backend]) -> (String, String) {
    let raw = if j % 2 == 0 {
        get(&format!("svc{j}.example"), "/v1/x", "")
    } else if j % 10 == 1 {
        get("any.example", &format!("/r{j}/x"), "X-Tenant: t\r\n")
    } else {
        get("any.example", &format!("/r{j}/x"), "")
    };
    (raw, backends[((j + shift) % clusters) % backends.len()].name().to_string())
}

/// `[admin]` on a kernel-chosen loopback port.
const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"";

/// The admin address from `ctl status` (bound to port 0).
fn admin_addr(m: &MasterRun) -> SocketAddr {
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    v["data"]["admin"].as_str().unwrap_or_else(|| panic!("no admin address in {v}")).parse().unwrap()
}

/// `/metrics` as samples: `name{labels}` → value.
fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {all:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN))))
        .collect()
}

/// Requests of route series `route` with status class 2xx.
fn route_2xx(m: &HashMap<String, f64>, route: &str) -> Option<f64> {
    m.get(&format!("pitcher_route_requests_total{{route=\"{route}\",code=\"2xx\"}}")).copied()
}

#[test]
fn route_series_past_the_tables_capacity_count_in_other() {
    // More routes than the shared region has route series (1,022).
    let routes = 1_200;
    let b = Backend::start("b");
    let mut t = String::new();
    for j in 0..routes {
        t.push_str(&format!("[[routes]]\nname = \"r{j}\"\npath_prefix = \"/r{j}/\"\ncluster = \"app\"\n"));
    }
    let config = ConfigBuilder::new().top("workers = 2").section(ADMIN).cluster("app", [b.spec()]).section(&t);
    let m = MasterRun::start(&config);
    let addr = admin_addr(&m);
    let before = metrics(addr);
    let own: Vec<usize> = (0..routes).filter(|j| route_2xx(&before, &format!("r{j}")).is_some()).collect();
    let in_other = before.get("pitcher_series_in_other{table=\"route\"}").copied().unwrap_or(-1.0);
    assert!(own.len() <= 1_022, "{} routes have a series of their own", own.len());
    assert_eq!(own.len() + in_other as usize, routes, "every route has a series or is counted in (other)");
    assert!(in_other as usize >= routes - 1_022, "{in_other} routes in (other)");
    let other = (0..routes).find(|j| !own.contains(j)).expect("a route without a series");
    let listed = own[0];
    for _ in 0..3 {
        let r = m.client().request(get("any.example", &format!("/r{other}/x"), "").as_bytes());
        assert_eq!(r.status, 200, "{}", r.head_str());
    }
    let r = m.client().request(get("any.example", &format!("/r{listed}/x"), "").as_bytes());
    assert_eq!(r.status, 200, "{}", r.head_str());
    let after = metrics(addr);
    let other_2xx = |m: &HashMap<String, f64>| route_2xx(m, "(other)").unwrap_or(-1.0);
    assert_eq!(other_2xx(&after) - other_2xx(&before), 3.0, "the requests of r{other} count in (other)");
    assert_eq!(route_2xx(&after, &format!("r{listed}")), Some(1.0), "r{listed} counts under its name");
    assert_eq!(route_2xx(&after, &format!("r{other}")), None, "r{other} has no series of its own");
}

#[test]
fn ten_thousand_routes_load_route_and_reload() {
    let (clusters, routes) = (2_000, 10_000);
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let config = big_config(&backends, clusters, routes, 0).section(ADMIN);
    let mut m = MasterRun::start(&config);
    let out = m.command(&["-t"]);
    assert!(out.status.success(), "{}", out.all());
    let check = |m: &MasterRun, shift: usize| {
        for k in 0..60 {
            let j = (k * 7919 + 13) % routes;
            let (raw, want) = sample(j, shift, clusters, &backends);
            let mut c = m.client();
            let r = c.request(raw.as_bytes());
            assert_eq!(r.status, 200, "route {j}: {}", r.head_str());
            assert_eq!(r.header("x-backend"), Some(want.as_str()), "route {j} (shift {shift})");
        }
        // A route with a header condition, without the header: the
        // catch-all's local 404.
        let mut c = m.client();
        let r = c.request(get("any.example", "/r11/x", "").as_bytes());
        assert_eq!((r.status, r.body_str().as_str()), (404, "none"));
    };
    check(&m, 0);
    let before = m.expect_status();
    m.write_config(&big_config(&backends, clusters, routes, 1).section(ADMIN));
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{}", out.all());
    let seq = before.config_seq + 1;
    m.wait_status(Duration::from_secs(30), |s| s.config_seq == seq && s.all_at(seq))
        .unwrap_or_else(|| panic!("the reload was not applied; status {:?}", m.status()));
    check(&m, 1);
    // Each of the two workers timed its apply of the reload; the routes
    // past the route series' capacity are counted in (other).
    let after = metrics(admin_addr(&m));
    assert_eq!(after.get("pitcher_reload_apply_seconds_count").copied(), Some(2.0));
    let in_other = after.get("pitcher_series_in_other{table=\"route\"}").copied().unwrap_or(0.0);
    assert!(in_other as usize >= routes + 1 - 1_022, "{in_other} routes in (other)");
}
