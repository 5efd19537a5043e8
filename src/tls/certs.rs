//! The master's read of certificate and key files: every TLS listener's
//! PEM files loaded, parsed and checked, for `-t`, a start and a reload.
//! A file that cannot be read, holds no certificate or no key, or a key
//! that does not match its certificate refuses the configuration, naming
//! the file and the reason. An expired (or not yet valid) certificate, or
//! a route host no certificate covers, is a warning.
//!
//! Must not: run in a worker (workers run unprivileged; key files may be
//! readable by root only).

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::{Config, HostMatch};

use super::x509;
use super::{CertKey, Der, KeyFormat, ListenerCerts, TlsMaterial, TrustAnchors};

/// Why a listener's certificates are refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not PEM this reader understands.
    #[error("{}: bad PEM: {reason}", file.display())]
    Pem {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("{}: no certificate in the file (expected a PEM \"BEGIN CERTIFICATE\" section)", file.display())]
    NoCertificate {
        /// The file.
        file: PathBuf,
    },
    /// The file holds no private key section.
    #[error("{}: no private key in the file (expected PEM \"BEGIN PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")", file.display())]
    NoKey {
        /// The file.
        file: PathBuf,
    },
    /// The key is of a type or curve rustls cannot sign with.
    #[error("{}: unusable private key: {reason}", file.display())]
    BadKey {
        /// The file.
        file: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The certificate is not a valid X.509 certificate.
    #[error("{}: bad certificate: {reason}", file.display())]
    BadCertificate {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("{}: the private key does not match the certificate {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// The material of every TLS listener and backend CA, and what deserves
/// a warning.
#[derive(Debug, Default)]
pub struct Loaded {
    /// What the workers get.
    pub material: TlsMaterial,
    /// Problems that do not refuse the configuration (expiry, names,
    /// unverified backends).
    pub warnings: Vec<String>,
}

/// Reads and checks the certificates of every TLS listener of `config`
/// and the CA files of its clusters' `tls`. `now` (seconds since the
/// epoch) decides what is expired.
pub fn load(config: &Config, now: i64) -> Result<Loaded, TlsError> {
    let mut out = Loaded::default();
    load_trust(config, &mut out)?;
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        let listener = l.address.to_string();
        let mut certificates = Vec::with_capacity(tls.certificates.len());
        let mut names: Vec<String> = Vec::new();
        for files in &tls.certificates {
            let (ck, facts) = load_pair(&files.cert, &files.key)?;
            if facts.not_after < now {
                out.warnings.push(format!(
                    "{}: the certificate expired on {} (clients will refuse it)",
                    files.cert.display(),
                    crate::timefmt::iso8601(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(facts.not_after.max(0) as u64)
                    )
                ));
            }
            if facts.dns_names.is_empty() {
                out.warnings.push(format!(
                    "{}: the certificate names no DNS name (subjectAltName); it is served only as the default",
                    files.cert.display()
                ));
            }
            names.extend(facts.dns_names);
            certificates.push(ck);
        }
        for r in &config.routes {
            let host = match &r.host {
                // A regex names no one host to check a certificate against.
                HostMatch::Any | HostMatch::Regex(_) => continue,
                HostMatch::Exact(h) => h.clone(),
                HostMatch::Suffix(s) => format!("*{s}"),
            };
            if !names.iter().any(|n| n == &host || x509::name_matches(n, &host)) {
                out.warnings.push(format!(
                    "route {} (host {host}): no certificate of listener {listener} covers this name; such clients get the default certificate",
                    r.name
                ));
            }
        }
        out.material.listeners.push(ListenerCerts { listener, certificates });
    }
    Ok(out)
}

/// The CA files of the clusters that talk TLS to their backends, each read
/// once; a cluster that does not verify is a warning.
fn load_trust(config: &Config, out: &mut Loaded) -> Result<(), TlsError> {
    for c in &config.clusters {
        let Some(tls) = &c.tls else { continue };
        if !tls.verify {
            out.warnings.push(format!(
                "cluster {:?}: tls.verify = false: backend certificates are not checked (anyone on the path can pose as a backend)",
                c.name
            ));
        }
        if tls.verify && tls.sni.is_none() && !c.dns.names.is_empty() {
            out.warnings.push(format!(
                "cluster {:?}: without tls.sni, backends given by DNS name are checked against their IP addresses, not the name",
                c.name
            ));
        }
        let Some(file) = &tls.ca_file else { continue };
        if out.material.trust.iter().any(|t| &t.ca_file == file) {
            continue;
        }
        let text = read(file)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem { file: file.clone(), reason: e.to_string() })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { file: file.clone() });
        }
        let mut store = rustls::RootCertStore::empty();
        for cert in &certs {
            store.add(cert.clone()).map_err(|e| TlsError::BadCertificate {
                file: file.clone(),
                reason: format!("not usable as a trust anchor: {e}"),
            })?;
        }
        out.material
            .trust
            .push(TrustAnchors { ca_file: file.clone(), certs: certs.into_iter().map(|c| Der(c.to_vec())).collect() });
    }
    Ok(())
}

/// Seconds since the epoch now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read { file: file.to_path_buf(), source })
}

/// One certificate chain and key, parsed and checked against each other.
fn load_pair(cert: &Path, key: &Path) -> Result<(CertKey, x509::CertFacts), TlsError> {
    fn pem(file: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
        move |e| TlsError::Pem { file: file.to_path_buf(), reason: e.to_string() }
    }
    let text = read(cert)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&text).collect::<Result<_, _>>().map_err(pem(cert))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { file: cert.to_path_buf() });
    };
    let facts =
        x509::facts(leaf).map_err(|e| TlsError::BadCertificate { file: cert.to_path_buf(), reason: e.to_string() })?;
    let text = read(key)?;
    let der = match PrivateKeyDer::from_pem_slice(&text) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(TlsError::NoKey { file: key.to_path_buf() }),
        Err(e) => return Err(pem(key)(e)),
    };
    let (key_format, key_bytes) = match &der {
        PrivateKeyDer::Pkcs8(k) => (KeyFormat::Pkcs8, k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Pkcs1(k) => (KeyFormat::Pkcs1, k.secret_pkcs1_der().to_vec()),
        PrivateKeyDer::Sec1(k) => (KeyFormat::Sec1, k.secret_sec1_der().to_vec()),
        _ => return Err(TlsError::BadKey { file: key.to_path_buf(), reason: "unknown key encoding".into() }),
    };
    let signing = super::signing_key(der.clone_key())
        .map_err(|e| TlsError::BadKey { file: key.to_path_buf(), reason: e.to_string() })?;
    match CertifiedKey::new(chain.clone(), signing).keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::Mismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        Err(e) => return Err(TlsError::BadCertificate { file: cert.to_path_buf(), reason: e.to_string() }),
    }
    let ck = CertKey { chain: chain.into_iter().map(|c| Der(c.to_vec())).collect(), key_format, key: Der(key_bytes) };
    Ok((ck, facts))
}
