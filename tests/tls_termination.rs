//! TLS termination on a listener's `tls` table, with real clients (`curl`,
//! `openssl s_client`, Python's `ssl`) against the real binary, and a test
//! CA and certificates made in each test with `openssl`: SNI and wildcard
//! choice, ECDSA vs RSA clients, ALPN, every proxy state over TLS,
//! `X-Forwarded-Proto: https` and the access log's `$ssl_*`, `-t`
//! messages, reloads that swap certificates (and refuse a broken key), and
//! hostile clients (silent, garbage, too many handshakes).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::master::MasterRun;
use common::pitcher::openssl;
use common::*;

/// Longest any client command may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Key types of test certificates.
#[derive(Clone, Copy)]
enum KeyType {
    Ecdsa,
    Rsa,
}

/// A test CA (ECDSA P-256) in a directory, issuing leaf certificates with
/// `openssl ca` (which, unlike `openssl x509`, takes explicit dates).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(dir.join("issued")).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = issued\nserial = serial\n\
             default_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n[p]\ncommonName = supplied\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=Pitcher Test CA",
            ],
        );
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` (the first is also the CN, prefixed with
    /// `label` so a test can tell which one it got) and its key:
    /// `<file>.pem`, `<file>.key`. `dates`: notBefore and notAfter as
    /// `YYYYMMDDHHMMSSZ`, else valid for 30 days from now.
    fn leaf(
        &self,
        file: &str,
        label: &str,
        kind: KeyType,
        names: &[&str],
        dates: Option<(&str, &str)>,
    ) -> (PathBuf, PathBuf) {
        let (cert, key, csr) = (format!("{file}.pem"), format!("{file}.key"), format!("{file}.csr"));
        let newkey: &[&str] = match kind {
            KeyType::Ecdsa => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyType::Rsa => &["-newkey", "rsa:2048"],
        };
        let san = format!("subjectAltName={}", names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(","));
        let subj = format!("/CN={label} {}", names[0]);
        let mut args = vec!["req", "-new"];
        args.extend_from_slice(newkey);
        args.extend_from_slice(&["-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj, "-addext", &san]);
        openssl(&self.dir, &args);
        let mut args = vec![
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", &csr, "-out", &cert,
            "-notext",
        ];
        match dates {
            Some((from, to)) => args.extend_from_slice(&["-startdate", from, "-enddate", to]),
            None => args.extend_from_slice(&["-days", "30"]),
        }
        openssl(&self.dir, &args);
        (self.dir.join(cert), self.dir.join(key))
    }
}

/// `{ cert = "...", key = "..." }`
fn pair(cert: &Path, key: &Path) -> String {
    format!("{{ cert = \"{}\", key = \"{}\" }}", cert.display(), key.display())
}

/// The `tls = { certificates = [...] }` line of a listener.
fn tls_line(pairs: &[(PathBuf, PathBuf)]) -> String {
    let list: Vec<String> = pairs.iter().map(|(c, k)| pair(c, k)).collect();
    format!("tls = {{ certificates = [{}] }}", list.join(", "))
}

/// Runs a command with a deadline; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut o = String::new();
        let mut e = String::new();
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        let _ = tx.send((o, e));
    });
    let Ok((o, e)) = rx.recv_timeout(CLIENT_TIMEOUT) else {
        let _ = child.kill();
        panic!("client pid {pid} did not finish in {CLIENT_TIMEOUT:?}: {cmd:?}");
    };
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    (ok, o, e)
}

/// `curl -v` to `https://host:port/path` resolved to 127.0.0.1, trusting
/// the test CA. Returns (status, body, verbose log).
fn curl(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String, String) {
    let url = format!("https://{host}:{port}{path}");
    let resolve = format!("{host}:{port}:127.0.0.1");
    let (_, out, err) = run(Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &resolve, "-w", "\n%{http_code}"])
        .args(extra)
        .arg(&url));
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string(), err)
}

/// `openssl s_client` handshake (stdin closed right away), returning what
/// it printed (stdout then stderr).
fn s_client(ca: &Path, port: u16, args: &[&str]) -> String {
    let (_, o, e) = run(Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
        .arg(ca)
        .args(args));
    format!("{o}\n{e}")
}

/// The subject CN of the certificate a client got, from curl's or
/// s_client's output.
fn subject(out: &str) -> String {
    for line in out.lines() {
        let l = line.trim_start_matches(['*', ' ']);
        if let Some(rest) = l.strip_prefix("subject:").or_else(|| l.strip_prefix("subject=")) {
            return rest.trim().replace("CN = ", "").replace("CN=", "");
        }
    }
    panic!("no subject in:\n{out}")
}

/// A keep-alive HTTPS connection through `openssl s_client -quiet`.
struct TlsConn {
    child: Child,
    rx: mpsc::Receiver<u8>,
}

impl TlsConn {
    fn open(ca: &Path, port: u16, server_name: &str) -> TlsConn {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &format!("127.0.0.1:{port}"), "-servername", server_name])
            .args(["-verify_return_error", "-CAfile"])
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = out.read(&mut b) {
                if n == 0 || b[..n].iter().any(|&x| tx.send(x).is_err()) {
                    return;
                }
            }
        });
        TlsConn { child, rx }
    }

    /// Sends a GET and reads its response (head and Content-Length body).
    fn get(&mut self, host: &str, path: &str) -> Result<(String, String), String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            head.push(self.rx.recv_timeout(left).map_err(|e| format!("{e} after {head:?}"))?);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no content-length in {head}"))?;
        let mut body = Vec::new();
        while body.len() < len {
            let left = deadline.saturating_duration_since(Instant::now());
            body.push(self.rx.recv_timeout(left).map_err(|e| e.to_string())?);
        }
        Ok((head, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS Pitcher (single process) in front of one backend.
fn tls_pitcher(pki_dir: &Path, pairs: &[(PathBuf, PathBuf)], backend: &Backend, extra: &str) -> Pitcher {
    let _ = pki_dir;
    let mut b =
        ConfigBuilder::new().listener(&tls_line(pairs)).cluster("app", [backend.spec()]).route(None, "/", "app");
    if !extra.is_empty() {
        b = b.section(extra);
    }
    b.start()
}

#[test]
fn curl_gets_through_https_with_the_certificate_of_its_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "first", KeyType::Ecdsa, &["a.test"], None);
    let b = pki.leaf("b", "wild", KeyType::Ecdsa, &["*.b.test"], None);
    let c = pki.leaf("c", "exact", KeyType::Ecdsa, &["x.b.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(dir.path(), &[a, b, c], &backend, "");
    let port = p.addr().port();

    let (status, body, log) = curl(&pki.ca(), "a.test", port, "/hello", &[]);
    assert_eq!(status, 200, "{log}\n{}", p.log());
    assert_eq!(body, "ok from app");
    assert_eq!(subject(&log), "first a.test");
    assert!(log.contains("ALPN: server accepted http/1.1"), "{log}");

    // A wildcard covers one label; an exact name wins over a wildcard.
    let (status, _, log) = curl(&pki.ca(), "y.b.test", port, "/", &[]);
    assert_eq!((status, subject(&log).as_str()), (200, "wild *.b.test"), "{log}");
    let (status, _, log) = curl(&pki.ca(), "x.b.test", port, "/", &[]);
    assert_eq!((status, subject(&log).as_str()), (200, "exact x.b.test"), "{log}");

    // No server name (or one no certificate covers): the first certificate.
    let out = s_client(&pki.ca(), port, &["-noservername"]);
    assert_eq!(subject(&out), "first a.test", "{out}");
    let out = s_client(&pki.ca(), port, &["-servername", "other.test"]);
    assert_eq!(subject(&out), "first a.test", "{out}");

    // The backend learns the request came over TLS, whatever the client says.
    let (status, _, _) = curl(&pki.ca(), "a.test", port, "/proto", &["-H", "X-Forwarded-Proto: http"]);
    assert_eq!(status, 200);
    let last = backend.last_request().expect("a request reached the backend");
    assert_eq!(last.path(), "/proto");
    assert_eq!(last.headers.get_all("x-forwarded-proto"), vec!["https"], "{}", last.head_str());
}

#[test]
fn ecdsa_only_and_rsa_only_clients_each_get_the_certificate_they_can_verify() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ec = pki.leaf("ec", "ecdsa", KeyType::Ecdsa, &["both.test"], None);
    let rsa = pki.leaf("rsa", "rsa", KeyType::Rsa, &["both.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(dir.path(), &[ec, rsa], &backend, "");
    let port = p.addr().port();

    for version in ["-tls1_3", "-tls1_2"] {
        let out = s_client(&pki.ca(), port, &["-servername", "both.test", version, "-sigalgs", "ECDSA+SHA256"]);
        assert_eq!(subject(&out), "ecdsa both.test", "{version}: {out}");
        let out =
            s_client(&pki.ca(), port, &["-servername", "both.test", version, "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"]);
        assert_eq!(subject(&out), "rsa both.test", "{version}: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    }

    // Python's ssl module, restricted to RSA, over HTTP.
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         ctx.maximum_version = ssl.TLSVersion.TLSv1_2\n\
         ctx.set_ciphers('ECDHE-RSA-AES128-GCM-SHA256')\n\
         s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='both.test')\n\
         s.sendall(b'GET /py HTTP/1.1\\r\\nHost: both.test\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n\
         \x20   chunk = s.recv(65536)\n\
         \x20   if not chunk: break\n\
         \x20   data += chunk\n\
         print(s.version(), s.cipher()[0], dict(x[0] for x in s.getpeercert()['subject'])['commonName'])\n\
         print(data.decode())\n",
        ca = pki.ca().display().to_string()
    );
    let (ok, out, err) = run(Command::new("python3").arg("-c").arg(&script));
    assert!(ok, "python failed: {err}\n{}", p.log());
    assert!(out.starts_with("TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256 rsa both.test\n"), "{out}");
    assert!(out.contains("HTTP/1.1 200 OK") && out.ends_with("ok from app\n"), "{out}");
}

#[test]
fn a_client_offering_only_h2_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(dir.path(), &[a], &backend, "");
    let port = p.addr().port();

    let out = s_client(&pki.ca(), port, &["-servername", "a.test", "-alpn", "h2"]);
    assert!(out.contains("no application protocol"), "{out}");
    let out = s_client(&pki.ca(), port, &["-servername", "a.test", "-alpn", "h2,http/1.1"]);
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    assert!(wait_for(|| p.log().contains("failed_total: 1")), "the refusal is counted:\n{}", p.log());
    assert_eq!(backend.requests(), 0);
}

#[test]
fn every_state_works_over_tls_bodies_both_ways_keep_alive_local_answers_and_the_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let big = pattern_bytes(0, 3 << 20);
    let reply = big.clone();
    let backend = Backend::with_handler("app", move |r| {
        if r.method == "POST" {
            Reply::ok(format!("got {} bytes, sum {}", r.body.len(), r.body.iter().map(|&b| u64::from(b)).sum::<u64>()))
        } else if r.path() == "/big" {
            Reply::ok(reply.clone())
        } else {
            default_reply("app")
        }
    });
    let log = dir.path().join("access.log");
    let extra = format!(
        "[modules.access_log]\npath = \"{}\"\nformat = \"custom\"\ncustom = \"$request_uri $status $ssl_protocol $ssl_cipher\"",
        log.display()
    );
    let p = ConfigBuilder::new()
        .listener(&tls_line(&[a]))
        .cluster("app", [backend.spec()])
        .route(Some("a.test"), "/", "app")
        .section(&extra)
        .start();
    let port = p.addr().port();
    let ca = pki.ca();

    // A large response, twice on one connection (curl reuses it).
    let out_file = dir.path().join("big.out");
    let url = format!("https://a.test:{port}/big");
    let (ok, out, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("a.test:{port}:127.0.0.1"), "-o"])
        .arg(&out_file)
        .args(["-w", "%{http_code} %{size_download} %{num_connects}\\n", &url, "-o"])
        .arg(dir.path().join("big2.out"))
        .arg(&url));
    assert!(ok, "{err}\n{}", p.log());
    assert_eq!(out, "200 3145728 1\n200 3145728 0\n", "two responses on one connection");
    assert!(std::fs::read(&out_file).unwrap() == big, "the body arrived intact");

    // A large request body.
    let body_file = dir.path().join("up.bin");
    std::fs::write(&body_file, &big).unwrap();
    let (status, body, log_) =
        curl(&ca, "a.test", port, "/up", &["--data-binary", &format!("@{}", body_file.display())]);
    assert_eq!(status, 200, "{log_}");
    let sum: u64 = big.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(body, format!("got {} bytes, sum {sum}", big.len()));

    // Pitcher's own answer (no route for this host), then the close it asks for.
    let (status, _, _) = curl(&ca, "a.test", port, "/", &["-H", "Host: nohost.test"]);
    assert_eq!(status, 404);

    // The access log has the TLS parameters.
    assert!(
        wait_for(|| std::fs::read_to_string(&log).unwrap_or_default().lines().count() >= 4),
        "access log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first == "/big 200 TLSv1.3 TLS_AES_128_GCM_SHA256" || first == "/big 200 TLSv1.3 TLS_AES_256_GCM_SHA384",
        "{text}"
    );
    let (status, _, _) = curl(&ca, "a.test", port, "/v12", &["--tlsv1.2", "--tls-max", "1.2"]);
    assert_eq!(status, 200);
    assert!(
        wait_for(|| std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("/v12 200 TLSv1.2 TLS_ECDHE_ECDSA_WITH_AES_")),
        "access log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn an_upgraded_connection_tunnels_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = ScriptedBackend::start(|mut s, _| {
        let _ = read_head_exact(&mut s);
        let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        let mut b = [0u8; 64];
        // Echo, upper-cased, until the client closes.
        while let Ok(n) = s.read(&mut b) {
            if n == 0 {
                break;
            }
            let up: Vec<u8> = b[..n].to_ascii_uppercase();
            let _ = s.write_all(&up);
        }
    });
    let p = ConfigBuilder::new()
        .listener(&tls_line(&[a]))
        .cluster("app", [backend.addr().to_string()])
        .route(None, "/", "app")
        .start();
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='a.test')\n\
         s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: a.test\\r\\nUpgrade: websocket\\r\\nConnection: upgrade\\r\\n\\r\\n')\n\
         head = b''\n\
         while not head.endswith(b'\\r\\n\\r\\n'): head += s.recv(1)\n\
         print(head.split(b'\\r\\n')[0].decode())\n\
         s.sendall(b'hello tunnel')\n\
         got = b''\n\
         while len(got) < 12: got += s.recv(64)\n\
         print(got.decode())\n",
        ca = pki.ca().display().to_string(),
        port = p.addr().port()
    );
    let (ok, out, err) = run(Command::new("python3").arg("-c").arg(&script));
    assert!(ok, "python failed: {err}\n{}", p.log());
    assert_eq!(out, "HTTP/1.1 101 Switching Protocols\nHELLO TUNNEL\n");
}

/// Polls `f` for up to 10 s.
fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn config_test_names_the_file_and_the_reason_of_every_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (a_cert, a_key) = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let (_, b_key) = pki.leaf("b", "b", KeyType::Ecdsa, &["b.test"], None);
    let (old_cert, old_key) =
        pki.leaf("old", "old", KeyType::Ecdsa, &["old.test"], Some(("20200101000000Z", "20200201000000Z")));
    let config = |pairs: &[(PathBuf, PathBuf)], host: &str| {
        ConfigBuilder::new()
            .top(&format!("pid_file = \"{}/p.pid\"", dir.path().display()))
            .listener(&tls_line(pairs))
            .cluster("app", ["127.0.0.1:9001"])
            .route(Some(host), "/", "app")
            .build(free_port())
    };
    let check = |text: &str| {
        let path = dir.path().join("pitcher.toml");
        std::fs::write(&path, text).unwrap();
        run_pitcher(&["-t", "-c", path.to_str().unwrap()], Duration::from_secs(10))
    };

    let out = check(&config(&[(a_cert.clone(), a_key.clone())], "a.test"));
    assert!(out.status.success(), "{}", out.all());
    assert!(!out.all().contains("warning"), "{}", out.all());

    let missing = dir.path().join("nope.pem");
    let out = check(&config(&[(missing.clone(), a_key.clone())], "a.test"));
    assert!(!out.status.success());
    assert!(out.all().contains(&format!("{}: cannot read: No such file", missing.display())), "{}", out.all());

    let out = check(&config(&[(a_cert.clone(), b_key.clone())], "a.test"));
    assert!(!out.status.success());
    let want = format!("{}: the private key does not match the certificate {}", b_key.display(), a_cert.display());
    assert!(out.all().contains(&want), "{}", out.all());

    let out = check(&config(&[(a_key.clone(), a_key.clone())], "a.test"));
    assert!(!out.status.success());
    assert!(out.all().contains(&format!("{}: no certificate in the file", a_key.display())), "{}", out.all());

    let out = check(&config(&[(a_cert.clone(), a_cert.clone())], "a.test"));
    assert!(!out.status.success());
    assert!(out.all().contains(&format!("{}: no private key in the file", a_cert.display())), "{}", out.all());

    // Warnings: an expired certificate, a route host no certificate covers.
    let out = check(&config(&[(a_cert.clone(), a_key.clone()), (old_cert.clone(), old_key)], "c.test"));
    assert!(out.status.success(), "warnings do not refuse: {}", out.all());
    assert!(
        out.all()
            .contains(&format!("warning: {}: the certificate expired on 2020-02-01T00:00:00.000Z", old_cert.display())),
        "{}",
        out.all()
    );
    assert!(out.all().contains("(host c.test): no certificate of listener 127.0.0.1:"), "{}", out.all());
}

#[test]
fn a_reload_swaps_certificates_for_new_handshakes_and_refuses_a_broken_key() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = Pki::new(scratch.path());
    let (c1, k1) = pki.leaf("one", "one", KeyType::Ecdsa, &["r.test"], None);
    let (c2, k2) = pki.leaf("two", "two", KeyType::Ecdsa, &["r.test"], None);
    let b = Backend::start("app");
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .listener("tls = { certificates = [{ cert = \"@DIR@/site.pem\", key = \"@DIR@/site.key\" }] }")
        .cluster("app", [b.spec()])
        .route(None, "/", "app");
    let m = MasterRun::start_prepared(&builder, |d| {
        std::fs::copy(&c1, d.join("site.pem")).unwrap();
        std::fs::copy(&k1, d.join("site.key")).unwrap();
        // Readable by the master only: workers run as nobody when the
        // test runs as root, and never open it.
        std::fs::set_permissions(d.join("site.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    let (cert, key) = (m.dir().join("site.pem"), m.dir().join("site.key"));
    let port = m.port();
    let ca = pki.ca();

    let (status, _, log) = curl(&ca, "r.test", port, "/", &[]);
    assert_eq!((status, subject(&log).as_str()), (200, "one r.test"), "{log}\n{}", m.log());
    let mut old = TlsConn::open(&ca, port, "r.test");
    let (head, body) = old.get("r.test", "/before").expect("a request before the reload");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok from app");

    // New certificate, reload: new handshakes get it, the old connection goes on.
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{}\n{}", out.all(), m.log());
    let (status, _, log) = curl(&ca, "r.test", port, "/", &[]);
    assert_eq!((status, subject(&log).as_str()), (200, "two r.test"), "{log}\n{}", m.log());
    let (head, _) = old.get("r.test", "/after").expect("the connection opened before the reload still works");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A key that does not fit: the reload is refused, naming the files; the
    // second certificate keeps serving.
    std::fs::copy(&k1, &key).unwrap();
    let out = m.signal_cmd("reload");
    assert!(!out.status.success(), "a broken key must fail the reload: {}", out.all());
    let want = format!("{}: the private key does not match the certificate {}", key.display(), cert.display());
    assert!(out.all().contains(&want), "{}", out.all());
    let (status, _, log) = curl(&ca, "r.test", port, "/", &[]);
    assert_eq!((status, subject(&log).as_str()), (200, "two r.test"), "{log}");
    let (head, _) = old.get("r.test", "/still").expect("the old connection survives a refused reload too");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn a_silent_client_is_closed_at_the_handshake_timeout_and_garbage_gets_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(dir.path(), &[a], &backend, "[timeouts]\ntls_handshake_ms = 300\nclient_header_ms = 20000");
    let addr = p.addr();

    let mut silent = Client::connect(addr);
    assert!(
        silent.closed_by_peer(Duration::from_secs(5)),
        "a silent TLS client must be closed at the handshake timeout"
    );
    assert!(wait_for(|| p.log().contains("reason: handshake timeout")), "{}", p.log());

    // HTTP spoken to a TLS port: a TLS alert record (content type 21), then the close.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got.first(), Some(&21), "expected an alert, got {got:?}");
    assert!(got.len() <= 7, "nothing but the alert: {got:?}");
    assert!(wait_for(|| p.log().contains("failed_total: 1")), "{}", p.log());

    // Pitcher still serves.
    let (status, _, log) = curl(&pki.ca(), "a.test", addr.port(), "/", &[]);
    assert_eq!(status, 200, "{log}");
    assert_eq!(backend.requests(), 1);
}

#[test]
fn handshakes_over_the_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(
        dir.path(),
        &[a],
        &backend,
        "[limits]\nmax_tls_handshakes = 2\n[timeouts]\ntls_handshake_ms = 60000",
    );
    let addr: SocketAddr = p.addr();

    // Pitcher's own readiness probe may still be handshaking: wait until
    // two silent clients hold the only two places.
    let mut held = vec![Client::connect(addr), Client::connect(addr)];
    std::thread::sleep(Duration::from_millis(200));
    let mut third = Client::connect(addr);
    assert!(third.closed_by_peer(Duration::from_secs(5)), "a third handshake must be refused");
    assert!(wait_for(|| p.log().contains("reason: max_tls_handshakes reached")), "{}", p.log());
    assert!(p.log().contains("refused_total: 1"), "{}", p.log());

    // Once the holders leave, handshakes are accepted again.
    held.clear();
    assert!(
        wait_for(|| curl(&pki.ca(), "a.test", addr.port(), "/", &[]).0 == 200),
        "handshakes resume after the holders left:\n{}",
        p.log()
    );
}

/// Regression (found by `tools/bench.sh` tls_full): a handshake whose last
/// client flight came alone, without request bytes, was never counted as
/// finished, so each such connection held a place of `max_tls_handshakes`
/// for the life of the worker, until every new handshake was refused.
#[test]
fn handshakes_finished_without_data_give_their_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(dir.path(), &[a], &backend, "[limits]\nmax_tls_handshakes = 2");
    // Six connections that finish their handshake, wait (so Pitcher reads
    // the client's Finished on its own) and close without a request; then
    // a request must still get a handshake.
    let script = format!(
        "import socket, ssl, time\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         for i in range(6):\n\
         \x20   s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='a.test')\n\
         \x20   time.sleep(0.1)\n\
         \x20   s.close()\n\
         \x20   time.sleep(0.05)\n\
         s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='a.test')\n\
         s.sendall(b'GET /after HTTP/1.1\\r\\nHost: a.test\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n\
         \x20   chunk = s.recv(65536)\n\
         \x20   if not chunk: break\n\
         \x20   data += chunk\n\
         print(data.decode())\n",
        ca = pki.ca().display().to_string(),
        port = p.addr().port()
    );
    let (ok, out, err) = run(Command::new("python3").arg("-c").arg(&script));
    assert!(ok, "python failed: {err}\n{}", p.log());
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}\n{}", p.log());
    assert!(!p.log().contains("max_tls_handshakes reached"), "{}", p.log());
}

/// `openssl s_client` sending `request` and reading until the server
/// closes; returns what it printed (stdout then stderr).
fn s_client_request(ca: &Path, port: u16, args: &[&str], request: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-ign_eof", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
        .arg(ca)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    drop(stdin);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(Ok(out)) = rx.recv_timeout(CLIENT_TIMEOUT) else {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("openssl s_client (pid {pid}) did not finish in {CLIENT_TIMEOUT:?}");
    };
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn sessions_resume_by_tickets_across_workers_reloads_and_an_upgrade() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = Pki::new(scratch.path());
    let (c, k) = pki.leaf("site", "site", KeyType::Ecdsa, &["r.test"], None);
    let b = Backend::start("app");
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .top("upgrade_timeout_ms = 5000")
        .listener("tls = { certificates = [{ cert = \"@DIR@/site.pem\", key = \"@DIR@/site.key\" }] }")
        .cluster("app", [b.spec()])
        .route(None, "/", "app");
    let mut m = MasterRun::start_prepared(&builder, |d| {
        std::fs::copy(&c, d.join("site.pem")).unwrap();
        std::fs::copy(&k, d.join("site.key")).unwrap();
    });
    let port = m.port();
    let ca = pki.ca();
    let request = "GET / HTTP/1.1\r\nHost: r.test\r\nConnection: close\r\n\r\n";
    let s13 = scratch.path().join("s13.pem");
    let s12 = scratch.path().join("s12.pem");
    let (s13_, s12_) = (s13.to_str().unwrap(), s12.to_str().unwrap());

    let out = s_client_request(&ca, port, &["-servername", "r.test", "-sess_out", s13_], request);
    assert!(out.contains("New, TLSv1.3") && out.contains("ok from app"), "{out}\n{}", m.log());
    let out = s_client_request(&ca, port, &["-servername", "r.test", "-tls1_2", "-sess_out", s12_], request);
    assert!(out.contains("New, TLSv1.2") && out.contains("ok from app"), "{out}");

    let resumes = |m: &MasterRun, what: &str| {
        for _ in 0..4 {
            let out = s_client_request(&ca, port, &["-servername", "r.test", "-sess_in", s13_], request);
            assert!(out.contains("Reused, TLSv1.3") && out.contains("ok from app"), "{what}: {out}\n{}", m.log());
            let out = s_client_request(&ca, port, &["-servername", "r.test", "-tls1_2", "-sess_in", s12_], request);
            assert!(out.contains("Reused, TLSv1.2") && out.contains("ok from app"), "{what}: {out}");
        }
    };
    // Four connections each (two workers share one accept queue).
    resumes(&m, "first generation");
    for i in 1..=3 {
        let out = m.signal_cmd("reload");
        assert!(out.status.success(), "reload {i}: {}", out.all());
        resumes(&m, &format!("after reload {i}"));
    }

    let old = m.pid().unwrap();
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{}\n{}", out.all(), m.log());
    let new = m.pid().unwrap();
    assert_ne!(new, old);
    m.track(new);
    assert!(common::master::wait_gone(old, Duration::from_secs(10)), "the old master exits");
    resumes(&m, "after the upgrade");
    assert_eq!(m.log().matches("TLS session-ticket key rotated").count(), 1, "one key, drawn once:\n{}", m.log());
}

#[test]
fn a_cleartext_listener_redirects_to_https_and_curl_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test", "www.a.test"], None);
    let backend = Backend::start("app");
    let (tls_port, http_port) = (free_port(), free_port());
    let text = ConfigBuilder::new()
        .listener(&tls_line(&[a]))
        .cluster("app", [backend.spec()])
        .route(None, "/", "app")
        .section(&format!("[[listeners]]\naddress = \"127.0.0.1:{http_port}\"\nredirect_https_port = {tls_port}"))
        .build(tls_port);
    let p = Pitcher::start(&text);
    let http: SocketAddr = ([127, 0, 0, 1], http_port).into();

    let r = Client::connect(http).request(b"GET /x?y=1 HTTP/1.1\r\nHost: WWW.a.test:80\r\n\r\n");
    assert_eq!(r.status, 301, "{}", r.head_str());
    assert_eq!(r.header("location"), Some(format!("https://www.a.test:{tls_port}/x?y=1").as_str()));
    let r = Client::connect(http).request(&request_bytes("POST", "a.test", "/form", &[], b"k=v"));
    assert_eq!(r.status, 308, "a POST keeps its method: {}", r.head_str());
    assert_eq!(r.header("location"), Some(format!("https://a.test:{tls_port}/form").as_str()));
    let r = Client::connect(http).request(b"GET http://a.test/abs HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert_eq!(r.header("location"), Some(format!("https://a.test:{tls_port}/abs").as_str()), "{}", r.head_str());
    let r = Client::connect(http).request(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "no host to redirect to: {}", r.head_str());
    assert_eq!(backend.requests(), 0, "a redirect never reaches a backend");

    let (ok, out, err) = run(Command::new("curl")
        .args(["-sS", "-L", "--max-time", "10", "--cacert"])
        .arg(pki.ca())
        .args(["--resolve", &format!("a.test:{http_port}:127.0.0.1")])
        .args(["--resolve", &format!("a.test:{tls_port}:127.0.0.1")])
        .args(["-w", "\n%{url_effective} %{http_code}", &format!("http://a.test:{http_port}/follow")]));
    assert!(ok, "{err}\n{}", p.log());
    assert_eq!(out, format!("ok from app\nhttps://a.test:{tls_port}/follow 200"));
    assert_eq!(backend.last_request().unwrap().header("x-forwarded-proto"), Some("https"));
}

/// A Python load client over TLS: `threads` keep-alive connections (a
/// `Connection: close` or a closed connection means reconnect, as any
/// client does), requests until the file `stop` exists; prints
/// `ok N failed M` and the first failures.
const TLS_LOAD: &str = r#"
import http.client, os, socket, ssl, sys, threading, time
ca, port, stop, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
lock = threading.Lock()
counts = {"ok": 0, "failed": 0}
errors = []
def connect():
    c = http.client.HTTPSConnection("r.test", port, context=ctx, timeout=10)
    c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="r.test")
    return c
def run():
    c = None
    while not os.path.exists(stop):
        try:
            if c is None:
                c = connect()
            c.request("GET", "/load")
            r = c.getresponse()
            body = r.read()
            good = r.status == 200 and body == b"ok from app"
            with lock:
                counts["ok" if good else "failed"] += 1
                if not good: errors.append("status %d body %r" % (r.status, body[:80]))
            if r.will_close:
                c.close()
                c = None
        except Exception as e:
            with lock:
                counts["failed"] += 1
                errors.append(repr(e))
            c = None
        time.sleep(0.005)
ts = [threading.Thread(target=run) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print("ok %d failed %d" % (counts["ok"], counts["failed"]))
print("\n".join(errors[:5]))
"#;

#[test]
fn no_request_over_tls_fails_during_reloads_and_an_upgrade() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = Pki::new(scratch.path());
    let (c1, k1) = pki.leaf("one", "one", KeyType::Ecdsa, &["r.test"], None);
    let (c2, k2) = pki.leaf("two", "two", KeyType::Rsa, &["r.test"], None);
    let b = Backend::start("app");
    let builder = ConfigBuilder::new()
        .top("workers = 2")
        .top("drain_timeout_ms = 1500")
        .listener("tls = { certificates = [{ cert = \"@DIR@/site.pem\", key = \"@DIR@/site.key\" }] }")
        .cluster("app", [b.spec()])
        .route(None, "/", "app");
    let mut m = MasterRun::start_prepared(&builder, |d| {
        std::fs::copy(&c1, d.join("site.pem")).unwrap();
        std::fs::copy(&k1, d.join("site.key")).unwrap();
    });
    let stop = scratch.path().join("stop");
    let load = Command::new("python3")
        .args(["-c", TLS_LOAD])
        .arg(pki.ca())
        .arg(m.port().to_string())
        .arg(&stop)
        .arg("4")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let pid = load.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(load.wait_with_output());
    });
    let pause = || std::thread::sleep(Duration::from_millis(300));

    pause();
    for (i, (c, k)) in [(&c2, &k2), (&c1, &k1), (&c2, &k2)].into_iter().enumerate() {
        std::fs::copy(c, m.dir().join("site.pem")).unwrap();
        std::fs::copy(k, m.dir().join("site.key")).unwrap();
        let out = m.signal_cmd("reload");
        assert!(out.status.success(), "reload {i}: {}", out.all());
        pause();
    }
    let old = m.pid().unwrap();
    m.install_binary();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{}\n{}", out.all(), m.log());
    let new = m.pid().unwrap();
    m.track(new);
    assert!(common::master::wait_gone(old, Duration::from_secs(10)), "the old master exits");
    pause();
    std::fs::write(&stop, "").unwrap();

    let Ok(Ok(out)) = rx.recv_timeout(CLIENT_TIMEOUT) else {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("the load client (pid {pid}) did not stop");
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ok, failed) = text
        .lines()
        .next()
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((w.get(1)?.parse::<u64>().ok()?, w.get(3)?.parse::<u64>().ok()?))
        })
        .unwrap_or_else(|| panic!("load output: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(ok >= 50, "the load ran: {text}");
    assert_eq!(failed, 0, "{text}\n{}", m.log());
}

#[test]
fn after_the_handshake_a_slow_head_gets_408_and_an_oversized_one_431_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = pki.leaf("a", "a", KeyType::Ecdsa, &["a.test"], None);
    let backend = Backend::start("app");
    let p = tls_pitcher(
        dir.path(),
        &[a],
        &backend,
        "[timeouts]\nclient_header_ms = 500\n[limits]\nmax_header_bytes = 2048",
    );
    let script = format!(
        "import socket, ssl, time\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         def conn():\n\
         \x20   return ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port}), timeout=10), server_hostname='a.test')\n\
         def answer(s):\n\
         \x20   data = b''\n\
         \x20   while True:\n\
         \x20       chunk = s.recv(4096)\n\
         \x20       if not chunk: return data\n\
         \x20       data += chunk\n\
         s = conn()\n\
         s.sendall(b'GET / HTTP/1.1\\r\\nHost: a.test\\r\\n')\n\
         print(answer(s).split(b'\\r\\n')[0].decode())\n\
         s = conn()\n\
         s.sendall(b'GET / HTTP/1.1\\r\\nHost: a.test\\r\\nX-Big: ' + b'x' * 4096 + b'\\r\\n\\r\\n')\n\
         print(answer(s).split(b'\\r\\n')[0].decode())\n",
        ca = pki.ca().display().to_string(),
        port = p.addr().port()
    );
    let (ok, out, err) = run(Command::new("python3").arg("-c").arg(&script));
    assert!(ok, "python failed: {err}\n{}", p.log());
    assert_eq!(out, "HTTP/1.1 408 Request Timeout\nHTTP/1.1 431 Request Header Fields Too Large\n");
    assert_eq!(backend.requests(), 0);
}
