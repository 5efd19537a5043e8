//! TLS to backends (a cluster's `tls` table) against a real HTTPS origin:
//! `tests/tls_origin.py` (Python's `ssl`, i.e. OpenSSL) with a CA and
//! certificates made in each test by `openssl`. Verification by a CA file,
//! the name sent in SNI and checked, keep-alive reuse and session
//! resumption of backend TLS connections, a tunnel after 101, health
//! probes over TLS, refused certificates (502, counted as `kind="tls"`),
//! `verify = false` (served, warned at `-t`), and hostile TLS origins.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::master::MasterRun;
use common::pitcher::new_dir;
use common::pitcher::openssl;
use common::*;

/// The name the origins' certificates are issued for.
const NAME: &str = "api.internal";

/// A CA (ECDSA P-256) `<name>.pem`/`<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    let subj = format!("/CN=Pitcher test CA {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    );
    dir.join(pem)
}

/// A leaf certificate for DNS name `dns` signed by CA `ca` (made by
/// [`make_ca`]), or self-signed when `ca` is `None`: (cert, key).
fn make_leaf(dir: &Path, file: &str, ca: Option<&str>, dns: &str) -> (PathBuf, PathBuf) {
    let (pem, key, csr, ext) =
        (format!("{file}.pem"), format!("{file}.key"), format!("{file}.csr"), format!("{file}.ext"));
    std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{dns}\nbasicConstraints=CA:FALSE\n")).unwrap();
    let subj = format!("/CN={dns}");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ],
    );
    let mut args = vec!["x509", "-req", "-in", &csr, "-out", &pem, "-days", "2", "-extfile", &ext];
    let (ca_pem, ca_key) = ca.map(|c| (format!("{c}.pem"), format!("{c}.key"))).unwrap_or_default();
    if ca.is_some() {
        args.extend_from_slice(&["-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial"]);
    } else {
        args.extend_from_slice(&["-signkey", &key]);
    }
    openssl(dir, &args);
    (dir.join(pem), dir.join(key))
}

/// `tests/tls_origin.py` on a kernel-picked port; stopped by pid on drop.
struct Origin {
    child: Child,
    port: u16,
    events: PathBuf,
}

impl Origin {
    fn start(dir: &Path, tag: &str, (cert, key): &(PathBuf, PathBuf), mode: &str) -> Origin {
        let events = dir.join(format!("{tag}.events"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls_origin.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--events")
            .arg(&events)
            .args(["--mode", mode])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the TLS origin did not print its port: {line:?}");
        };
        Origin { child, port, events }
    }

    fn spec(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its event lines starting with `kind` (`conn`, `req`, `error`, ...).
    fn events(&self, kind: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        text.lines().filter(|l| l.split(' ').next() == Some(kind)).map(str::to_string).collect()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tls = { ... }` of a cluster.
fn tls_table(sni: Option<&str>, ca: Option<&Path>, verify: bool) -> String {
    let mut keys = vec![format!("verify = {verify}")];
    if let Some(n) = sni {
        keys.push(format!("sni = \"{n}\""));
    }
    if let Some(c) = ca {
        keys.push(format!("ca_file = \"{}\"", c.display()));
    }
    format!("tls = {{ {} }}", keys.join(", "))
}

/// A test CA in `d` and an origin whose certificate for [`NAME`] it
/// signed: (the CA's PEM, the origin).
fn signed_origin(d: &Path) -> (PathBuf, Origin) {
    let ca = make_ca(d, "ca");
    (ca, Origin::start(d, "o", &make_leaf(d, "leaf", Some("ca"), NAME), "ok"))
}

/// [`signed_origin`] and a Pitcher that proxies `/` to it over TLS,
/// verifying its certificate against the CA and [`NAME`].
fn verified_origin_and_proxy(d: &Path) -> (Origin, Pitcher) {
    let (ca, origin) = signed_origin(d);
    let p = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &tls_table(Some(NAME), Some(&ca), true))
        .route(None, "/", "app")
        .start();
    (origin, p)
}

fn get(addr: SocketAddr, path: &str) -> Response {
    let mut c = Client::connect(addr);
    c.get("app.example", path)
}

#[test]
fn verified_backend_is_reused_and_sees_its_sni_name() {
    let dir = new_dir();
    let (origin, p) = verified_origin_and_proxy(dir.path());
    // Several requests on one client connection, then on new ones: one
    // backend TLS connection carries them all.
    let mut c = p.client();
    for i in 0..4 {
        let r = c.get("app.example", &format!("/ka{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert_eq!(r.body_str(), format!("conn=1 sni={NAME} path=/ka{i}"));
    }
    for i in 0..3 {
        let r = get(p.addr(), &format!("/new{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert_eq!(r.body_str(), format!("conn=1 sni={NAME} path=/new{i}"));
    }
    let conns = origin.events("conn");
    assert_eq!(conns.len(), 1, "one backend connection for seven requests: {conns:?}");
    assert!(conns[0].contains(&format!("sni={NAME}")) && conns[0].contains("version=TLSv1.3"), "{conns:?}");
    assert_eq!(origin.events("req").len(), 7);
}

#[test]
fn large_bodies_from_a_tls_backend_are_decrypted_not_spliced() {
    // A cleartext client and a body far above the splice threshold: the
    // splice path (socket to pipe to socket) must not take a TLS backend's
    // records, which only rustls can turn into the body.
    let dir = new_dir();
    let (origin, p) = verified_origin_and_proxy(dir.path());
    let pattern: Vec<u8> = (0..=255u8).collect();
    let mut c = p.client();
    for n in [1 << 20, 3 << 20, 100_000] {
        let r = c.get("app.example", &format!("/big/{n}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert_eq!(r.body.len(), n, "the whole body");
        let bad = r.body.iter().enumerate().position(|(i, &b)| b != pattern[i % 256]);
        assert_eq!(bad, None, "the body as the backend sent it, decrypted");
    }
    // The backend connection stayed usable: one connection for all.
    let r = c.get("app.example", "/after");
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(origin.events("conn").len(), 1, "{:?}", origin.events("conn"));
}

#[test]
fn new_backend_connections_resume_the_tls_session() {
    let dir = new_dir();
    let d = dir.path();
    let (ca, origin) = signed_origin(d);
    // keepalive = 0: no pooled connection, a new one per request.
    let tls = tls_table(Some(NAME), Some(&ca), true);
    let p = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &format!("keepalive = 0\n{tls}"))
        .route(None, "/", "app")
        .start();
    for i in 0..3 {
        let r = get(p.addr(), &format!("/r{i}"));
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert_eq!(r.body_str(), format!("conn={} sni={NAME} path=/r{i}", i + 1));
    }
    let conns = origin.events("conn");
    assert_eq!(conns.len(), 3, "{conns:?}");
    assert!(conns[0].contains("reused=False"), "the first is a full handshake: {conns:?}");
    assert!(conns[1..].iter().all(|c| c.contains("reused=True")), "later ones resume: {conns:?}");
}

#[test]
fn wrong_name_is_refused_with_502() {
    let dir = new_dir();
    let d = dir.path();
    let (ca, origin) = signed_origin(d);
    let p = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &tls_table(Some("other.internal"), Some(&ca), true))
        .route(None, "/", "app")
        .start();
    let r = get(p.addr(), "/");
    assert_error_response(&r, 502);
    let refused = "certificate not valid for name \"other.internal\"";
    assert!(wait_until(Duration::from_secs(5), || p.log().contains(refused)), "{}", p.log());
    // Without sni the address is checked: the certificate names none.
    let p2 = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &tls_table(None, Some(&ca), true))
        .route(None, "/", "app")
        .start();
    assert_error_response(&get(p2.addr(), "/"), 502);
    let refused = "certificate not valid for name \"127.0.0.1\"";
    assert!(wait_until(Duration::from_secs(5), || p2.log().contains(refused)), "{}", p2.log());
    // The origin saw two handshakes fail and no request.
    assert!(wait_until(Duration::from_secs(5), || origin.events("handshake_failed").len() == 2));
    assert!(origin.events("conn").is_empty() && origin.events("req").is_empty());
}

/// `[admin]` on a kernel-chosen loopback port.
const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\nclient_timeout_ms = 1500";

fn metrics(m: &MasterRun) -> String {
    let out = m.command(&["ctl", "--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let addr: SocketAddr = v["data"]["admin"].as_str().expect("admin address").parse().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut all = String::new();
    std::io::Read::read_to_string(&mut s, &mut all).unwrap();
    all
}

/// The value of the sample of `family` whose labels contain all of `labels`.
fn sample(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn wrong_ca_is_a_502_counted_as_tls_and_probes_speak_tls() {
    let dir = new_dir();
    let d = dir.path();
    let ca = make_ca(d, "ca");
    let other = make_ca(d, "other");
    let leaf = make_leaf(d, "leaf", Some("ca"), NAME);
    let bad = Origin::start(d, "bad", &leaf, "ok");
    let good = Origin::start(d, "good", &leaf, "ok");
    let health = "health_check = { path = \"/health\", interval_ms = 100, timeout_ms = 1000 }";
    let builder = ConfigBuilder::new()
        .section(ADMIN)
        .cluster_with("bad", [bad.spec()], &tls_table(Some(NAME), Some(&other), true))
        .cluster_with("good", [good.spec()], &format!("{health}\n{}", tls_table(Some(NAME), Some(&ca), true)))
        .route(None, "/bad", "bad")
        .route(None, "/", "good");
    let m = MasterRun::start(&builder);
    let r = get(m.addr(), "/bad");
    assert_error_response(&r, 502);
    assert!(
        wait_until(Duration::from_secs(5), || m.log().contains("UnknownIssuer")),
        "the log names the reason:\n{}",
        m.log()
    );
    let bad_label = format!("backend=\"{}\"", bad.spec());
    let text = metrics(&m);
    let tls_failures = sample(&text, "pitcher_backend_failures_total", &[&bad_label, "kind=\"tls\""]);
    assert!(tls_failures.is_some_and(|n| n >= 1.0), "{text}");
    assert!(bad.events("req").is_empty());
    // The master's probes reach the good origin over TLS, verified.
    assert!(
        wait_until(Duration::from_secs(5), || good
            .events("req")
            .iter()
            .any(|l| l.contains("GET /health user-agent=pitcher-health-check"))),
        "{:?}",
        good.events("req")
    );
    let r = get(m.addr(), "/ok");
    assert_eq!(r.status, 200, "{}", r.head_str());
}

#[test]
fn unverified_backend_is_served_and_warned_at_check() {
    let dir = new_dir();
    let d = dir.path();
    // Self-signed, for a name nobody asks for.
    let origin = Origin::start(d, "o", &make_leaf(d, "self", None, "self.invalid"), "ok");
    let builder = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &tls_table(None, None, false))
        .route(None, "/", "app");
    let p = builder.start();
    let r = get(p.addr(), "/x");
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert_eq!(r.body_str(), "conn=1 sni=None path=/x");
    let out = run_pitcher(&["-t", "-c", p.config_path().to_str().unwrap()], Duration::from_secs(10));
    assert!(out.all().contains("tls.verify = false"), "{}", out.all());
    // The public roots (no ca_file) do not trust it.
    let strict = ConfigBuilder::new()
        .cluster_with("app", [origin.spec()], &tls_table(Some("self.invalid"), None, true))
        .route(None, "/", "app")
        .start();
    assert_error_response(&get(strict.addr(), "/"), 502);
}

#[test]
fn check_names_an_unreadable_ca_file() {
    let dir = new_dir();
    let missing = dir.path().join("nowhere/ca.pem");
    let text = ConfigBuilder::new()
        .cluster_with("app", ["127.0.0.1:9"], &tls_table(Some(NAME), Some(&missing), true))
        .route(None, "/", "app")
        .build(free_port());
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let out = run_pitcher(&["-t", "-c", path.to_str().unwrap()], Duration::from_secs(10));
    assert!(!out.status.success(), "{}", out.all());
    assert!(out.all().contains(&missing.display().to_string()) && out.all().contains("cannot read"), "{}", out.all());
    // An sni that is not a DNS name is refused with its key.
    let text = ConfigBuilder::new()
        .cluster_with("app", ["127.0.0.1:9"], "tls = { sni = \"10.0.0.1\" }")
        .route(None, "/", "app")
        .build(free_port());
    std::fs::write(&path, text).unwrap();
    let out = run_pitcher(&["-t", "-c", path.to_str().unwrap()], Duration::from_secs(10));
    assert!(!out.status.success() && out.all().contains("tls.sni"), "{}", out.all());
}

#[test]
fn tunnel_after_101_over_backend_tls() {
    let dir = new_dir();
    let (_origin, p) = verified_origin_and_proxy(dir.path());
    let mut c = p.client();
    c.send(b"GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    let r = c.read_head();
    assert_eq!(r.status, 101, "{}", r.head_str());
    for msg in [&b"ping"[..], &[7u8; 40_000][..]] {
        c.send(msg);
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let part = c.read_some(65536).expect("echo");
            assert!(!part.is_empty(), "tunnel closed after {} bytes", got.len());
            got.extend_from_slice(&part);
        }
        assert_eq!(got, msg);
    }
}

#[test]
fn hostile_tls_backends_get_the_right_answer_and_no_crash() {
    let dir = new_dir();
    let d = dir.path();
    let ca = make_ca(d, "ca");
    let leaf = make_leaf(d, "leaf", Some("ca"), NAME);
    let garbage = Origin::start(d, "garbage", &leaf, "garbage");
    let head = Origin::start(d, "head", &leaf, "close_head");
    let body = Origin::start(d, "body", &leaf, "close_body");
    let good = Origin::start(d, "good", &leaf, "ok");
    let tls = tls_table(Some(NAME), Some(&ca), true);
    let p = ConfigBuilder::new()
        .cluster_with("garbage", [garbage.spec()], &tls)
        .cluster_with("head", [head.spec()], &tls)
        .cluster_with("body", [body.spec()], &tls)
        .cluster_with("good", [good.spec()], &tls)
        .route(None, "/garbage", "garbage")
        .route(None, "/head", "head")
        .route(None, "/body", "body")
        .route(None, "/", "good")
        .start();
    for _ in 0..2 {
        // Not a TLS record after the handshake: bad record, 502.
        assert_error_response(&get(p.addr(), "/garbage"), 502);
        // Closed in the middle of the head: 502.
        assert_error_response(&get(p.addr(), "/head"), 502);
        // Closed in the middle of the body: the client connection closes
        // before the announced length (never a short body then more).
        let mut c = p.client();
        c.send(&get_request("app.example", "/body"));
        let r = c.read_head();
        assert_eq!(r.status, 200, "{}", r.head_str());
        assert_eq!(r.header("content-length"), Some("1000"));
        let rest = c.read_to_eof().unwrap_or_default();
        assert!(rest.len() < 1000, "{} bytes of 1000", rest.len());
    }
    let r = get(p.addr(), "/ok");
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert!(p.log().lines().all(|l| !l.contains("panic")), "{}", p.log());
}
