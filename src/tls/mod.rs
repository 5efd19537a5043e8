//! TLS termination: a layer between a client socket and its session, so
//! HTTP code reads and writes plaintext and knows nothing of TLS.
//!
//! * [`certs`]: the master reads the PEM files of every TLS listener,
//!   checks them (key matches certificate, expiry, names) and produces
//!   [`ListenerCerts`], the parsed material that travels to the workers in
//!   their `Configure` message. Workers never open a key file.
//! * [`acceptor`]: a worker turns that material into one rustls
//!   `ServerConfig` per listener, with a certificate resolver that picks by
//!   server name (SNI, wildcards) and by what the client can verify
//!   (ECDSA or RSA).
//! * [`stream`]: [`ClientStream`], a client connection in cleartext or
//!   TLS, driven without blocking from the worker's `mio` loop.
//! * [`tickets`]: session tickets sealed with keys the master keeps in the
//!   shared region, so a client resumes on any worker of any generation.
//! * [`x509`]: the DNS names and expiry read from a certificate.
//! * [`backend`]: TLS to backends: a worker's rustls `ClientConfig` per
//!   cluster ([`Connectors`]) and [`BackendStream`], a backend connection
//!   in cleartext or TLS behind one type, driven like [`ClientStream`].
//!
//! Must not: block, know HTTP, or read files in a worker.

pub mod acceptor;
pub mod backend;
pub mod certs;
pub mod stream;
pub mod tickets;
pub mod x509;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use acceptor::Acceptors;
pub use backend::{BackendStream, Connector, Connectors};
pub use certs::{load, Loaded, TlsError};
pub use stream::ClientStream;

/// The crypto provider of every rustls configuration (listeners and
/// backends) and of the master's key checks, in one place: `ring` (see
/// Cargo.toml and docs/BENCHMARKS.md for why not aws-lc-rs).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// A private key as the provider signs with it.
pub fn signing_key(
    der: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<std::sync::Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    provider().key_provider.load_private_key(der)
}

/// Everything of TLS the master reads from files for its workers: the
/// listeners' certificates and keys, the CAs that backends are checked
/// against. Travels in `ToWorker::Configure`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    /// One entry per TLS listener, in configuration order.
    pub listeners: Vec<ListenerCerts>,
    /// The certificates of each `ca_file` that a cluster's `tls` names.
    pub trust: Vec<TrustAnchors>,
}

/// The CA certificates of one `ca_file`, as read by the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchors {
    /// The file as configured (how clusters name it; workers never open it).
    pub ca_file: std::path::PathBuf,
    /// Its certificates, DER.
    pub certs: Vec<Der>,
}

/// The certificates of one TLS listener, as parsed by the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerCerts {
    /// The listener's address as configured (its manifest name).
    pub listener: String,
    /// Certificate chains and keys in configuration order (the first is
    /// the default).
    pub certificates: Vec<CertKey>,
}

/// One certificate chain and its private key, DER.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertKey {
    /// The chain, leaf first.
    pub chain: Vec<Der>,
    /// The private key's encoding.
    pub key_format: KeyFormat,
    /// The private key.
    pub key: Der,
}

impl fmt::Debug for CertKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("chain", &self.chain.len())
            .field("key_format", &self.key_format)
            .finish_non_exhaustive()
    }
}

/// How a private key is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// PKCS#8 (`BEGIN PRIVATE KEY`).
    Pkcs8,
    /// PKCS#1 (`BEGIN RSA PRIVATE KEY`).
    Pkcs1,
    /// SEC1 (`BEGIN EC PRIVATE KEY`).
    Sec1,
}

/// DER bytes, carried as a hex string on the channel (a JSON array of
/// numbers would be four times the size).
#[derive(Clone, PartialEq, Eq)]
pub struct Der(pub Vec<u8>);

impl fmt::Debug for Der {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Der({} bytes)", self.0.len())
    }
}

impl Serialize for Der {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Der {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(serde::de::Error::custom("DER: not a lower-case hex digit")),
        };
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("DER: odd number of hex digits"));
        }
        s.as_bytes().chunks(2).map(|p| Ok(nibble(p[0])? << 4 | nibble(p[1])?)).collect::<Result<_, _>>().map(Der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_travels_as_hex_and_back() {
        let d = Der(vec![0, 1, 0x7f, 0x80, 0xff]);
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(j, "\"00017f80ff\"");
        assert_eq!(serde_json::from_str::<Der>(&j).unwrap(), d);
        assert!(serde_json::from_str::<Der>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Der>("\"012\"").is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = CertKey { chain: vec![Der(vec![1])], key_format: KeyFormat::Pkcs8, key: Der(vec![0xab, 0xcd]) };
        let s = format!("{c:?}");
        assert!(!s.contains("abcd") && !s.contains("171"), "{s}");
    }
}
