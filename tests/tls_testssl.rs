//! `testssl.sh` (Debian's `testssl` command) against an HTTPS listener
//! serving an ECDSA and an RSA certificate: protocols, cipher categories
//! and the vulnerability checks, read from its JSON output. No finding of
//! severity HIGH or CRITICAL, no SSLv2/SSLv3/TLS 1.0/TLS 1.1, no weak
//! cipher category offered. Bounded: `--fast`, only those three groups,
//! connect and OpenSSL timeouts, and a wall-clock limit on the run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pitcher::openssl;
use common::*;

/// The longest the scan may take (it takes about 40 s here).
const SCAN_LIMIT: Duration = Duration::from_secs(300);

/// A self-signed certificate for `localhost`: `<file>.pem`, `<file>.key`.
fn self_signed(dir: &Path, file: &str, newkey: &[&str]) -> String {
    let (pem, key) = (format!("{file}.pem"), format!("{file}.key"));
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(newkey);
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &pem,
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ]);
    openssl(dir, &args);
    format!("{{ cert = \"{}\", key = \"{}\" }}", dir.join(pem).display(), dir.join(key).display())
}

#[test]
fn testssl_finds_no_vulnerability_no_old_protocol_no_weak_cipher() {
    let dir = common::pitcher::new_dir();
    let d = dir.path();
    let ecdsa = self_signed(d, "ecdsa", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let rsa = self_signed(d, "rsa", &["-newkey", "rsa:2048"]);
    let backend = Backend::start("app");
    let p = ConfigBuilder::new()
        .listener(&format!("tls = {{ certificates = [{ecdsa}, {rsa}] }}"))
        .cluster("app", [backend.spec()])
        .route(None, "/", "app")
        .start();
    let json = d.join("testssl.json");
    let target = format!("127.0.0.1:{}", p.addr().port());
    let mut child = Command::new("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "batch", "--fast", "--connect-timeout", "5"])
        .args(["--openssl-timeout", "5", "-p", "-s", "-U", "--jsonfile"])
        .arg(&json)
        .arg(&target)
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run testssl (Debian package testssl.sh)");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for testssl") {
            break s;
        }
        if started.elapsed() > SCAN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("testssl (pid {}) did not finish in {SCAN_LIMIT:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{}: {e} (testssl exited {status})", json.display()));
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let finding = |id: &str| -> String {
        let f = findings.iter().find(|f| f["id"] == id).unwrap_or_else(|| panic!("no finding {id:?} in {text}"));
        f["finding"].as_str().unwrap_or_default().to_string()
    };
    let severe: Vec<&serde_json::Value> =
        findings.iter().filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL"))).collect();
    assert!(severe.is_empty(), "HIGH/CRITICAL findings: {severe:#?}");
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(finding(id).starts_with("not offered"), "{id}: {}", finding(id));
    }
    for id in ["TLS1_2", "TLS1_3"] {
        assert!(finding(id).starts_with("offered"), "{id}: {}", finding(id));
    }
    // Weak categories: NULL, anonymous, export, 64-bit/DES/RC2/RC4,
    // 3DES/IDEA, and CBC ("AVERAGE"). Only AEAD suites are offered.
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
    ] {
        assert!(finding(id).starts_with("not offered"), "{id}: {}", finding(id));
    }
    assert!(finding("cipherlist_STRONG").starts_with("offered"));
    // The vulnerability checks ran, and none found anything.
    for id in [
        "heartbleed",
        "CCS",
        "ticketbleed",
        "ROBOT",
        "secure_renego",
        "secure_client_renego",
        "CRIME_TLS",
        "POODLE_SSL",
        "fallback_SCSV",
        "SWEET32",
        "FREAK",
        "DROWN",
        "LOGJAM",
        "BEAST",
        "LUCKY13",
    ] {
        let f = finding(id);
        assert!(!f.to_ascii_uppercase().contains("VULNERABLE") || f.contains("not vulnerable"), "{id}: {f}");
    }
}
