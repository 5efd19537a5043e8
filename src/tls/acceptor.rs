//! A worker's rustls configuration of each TLS listener, built from the
//! material the master sent ([`ListenerCerts`]): TLS 1.3 and 1.2 with
//! rustls' default (modern, AEAD-only) suites on the `ring` provider, ALPN
//! `http/1.1` only (a client that offers ALPN without it, `h2` alone, is
//! refused in the handshake), and a certificate resolver by server name
//! and key type.
//!
//! Built with every configuration; a reload builds new ones, so new
//! handshakes use the new certificates while established connections keep
//! the configuration they were accepted with.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use std::time::Duration;

use crate::shm::TicketKeys;

use super::tickets::SharedTicketer;
use super::x509;
use super::{CertKey, KeyFormat, ListenerCerts};

/// The rustls configuration of each TLS listener, by listener name.
#[derive(Debug, Default)]
pub struct Acceptors {
    by_listener: Vec<(String, Arc<ServerConfig>)>,
}

impl Acceptors {
    /// Builds the configuration of every listener in `material`; session
    /// tickets are sealed with `tickets`, valid for `ticket_lifetime`.
    pub fn build(
        material: &[ListenerCerts],
        tickets: &'static TicketKeys,
        ticket_lifetime: Duration,
    ) -> Result<Acceptors, String> {
        let mut by_listener = Vec::with_capacity(material.len());
        // TLS 1.3 caps a ticket's lifetime at 7 days.
        let lifetime_s = ticket_lifetime.as_secs().clamp(1, 604_800) as u32;
        for l in material {
            let ticketer = Arc::new(SharedTicketer::new(tickets, lifetime_s));
            let config =
                server_config(&l.certificates, ticketer).map_err(|e| format!("listener {}: {e}", l.listener))?;
            by_listener.push((l.listener.clone(), config));
        }
        Ok(Acceptors { by_listener })
    }

    /// The configuration of listener `name` (as configured), `None` for a
    /// cleartext listener.
    pub fn get(&self, name: &str) -> Option<&Arc<ServerConfig>> {
        self.by_listener.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// No listener terminates TLS.
    pub fn is_empty(&self) -> bool {
        self.by_listener.is_empty()
    }
}

/// The ALPN protocols offered: HTTP/1.1 only, until HTTP/2 exists.
const ALPN: &[&[u8]] = &[b"http/1.1"];

fn server_config(certs: &[CertKey], ticketer: Arc<SharedTicketer>) -> Result<Arc<ServerConfig>, String> {
    let provider = super::provider();
    let resolver = SniResolver::new(certs)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.ticketer = ticketer;
    // Resumption by tickets only: a session cache would be per worker, and
    // emptied by every reload.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// One certificate the resolver may serve.
#[derive(Debug)]
struct Candidate {
    /// DNS names of the certificate, lower case (`*.x` for wildcards).
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// Picks a certificate for a ClientHello: among those whose names cover
/// the server name (exact names before wildcards), the first whose key can
/// sign with a scheme the client offers (so an ECDSA-only client gets the
/// ECDSA certificate and an RSA-only one the RSA certificate of the same
/// name); with no match, the first that can sign for the client, in
/// configuration order (the first certificate is the default).
#[derive(Debug)]
struct SniResolver {
    candidates: Vec<Candidate>,
}

impl SniResolver {
    fn new(certs: &[CertKey]) -> Result<SniResolver, String> {
        let mut candidates = Vec::with_capacity(certs.len());
        for c in certs {
            let chain: Vec<CertificateDer<'static>> =
                c.chain.iter().map(|d| CertificateDer::from(d.0.clone())).collect();
            let leaf = chain.first().ok_or("a certificate entry without a certificate")?;
            let names = x509::facts(leaf).map_err(|e| e.to_string())?.dns_names;
            let bytes = c.key.0.clone();
            let der = match c.key_format {
                KeyFormat::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(bytes)),
                KeyFormat::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(bytes)),
                KeyFormat::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(bytes)),
            };
            let signing = super::signing_key(der).map_err(|e| e.to_string())?;
            candidates.push(Candidate { names, key: Arc::new(CertifiedKey::new(chain, signing)) });
        }
        if candidates.is_empty() {
            return Err("no certificate".into());
        }
        Ok(SniResolver { candidates })
    }

    fn pick(&self, server_name: Option<&str>, schemes: &[rustls::SignatureScheme]) -> Option<&Candidate> {
        let fits = |c: &&Candidate| c.key.key.choose_scheme(schemes).is_some();
        if let Some(name) = server_name {
            let exact = self.candidates.iter().filter(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(name)));
            let wild = self
                .candidates
                .iter()
                .filter(|c| c.names.iter().any(|n| n.starts_with("*.") && x509::name_matches(n, name)));
            if let Some(c) = exact.chain(wild).find(fits) {
                return Some(c);
            }
        }
        self.candidates.iter().find(fits).or(self.candidates.first())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name(), hello.signature_schemes()).map(|c| c.key.clone())
    }
}
