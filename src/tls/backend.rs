//! TLS to backends. [`Connectors`]: a worker's rustls `ClientConfig` for
//! each cluster with a `tls` table, built from the configuration and the
//! CA certificates the master read ([`TlsMaterial::trust`]); with no
//! `ca_file`, Mozilla's roots compiled in (`webpki-roots`). [`BackendStream`]:
//! a backend connection, cleartext or a rustls `ClientConnection` on the
//! socket, non-blocking, with `net::Stream`'s readiness contract (see
//! `tls::stream`), so pooling, retries, tunnels and health probes use one
//! type whatever the cluster speaks.
//!
//! The handshake is part of connecting: [`BackendStream::connect_step`]
//! finishes the TCP connect, then the handshake, and tells a refused
//! certificate ([`ConnectError::Tls`]) from a refused connection. TLS
//! sessions to backends resume from one in-memory cache per worker that
//! outlives reloads (rustls' `ClientSessionMemoryCache`).
//!
//! Must not: read files (the master does), know HTTP.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::event::Source;
use mio::{Interest, Registry, Token};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{BackendAddr, BackendTls, ClusterConfig, SockAddr};
use crate::net::{Readiness, Stream};

use super::stream::{flush_records, read_plain, tls_error, write_plain};
use super::TlsMaterial;

/// Servers whose TLS sessions a worker remembers (rustls keeps up to 8
/// tickets per server).
const SESSION_CACHE_ENTRIES: usize = 8 * 1024;

/// A worker's cache of TLS sessions to backends: one for all snapshots, so
/// a reload does not cost every backend a full handshake.
pub fn session_cache() -> Arc<ClientSessionMemoryCache> {
    Arc::new(ClientSessionMemoryCache::new(SESSION_CACHE_ENTRIES))
}

/// How to talk TLS to the backends of one cluster.
#[derive(Debug, Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    /// `tls.sni`; `None`: each backend's address is the name checked.
    sni: Option<ServerName<'static>>,
    /// Identifies the settings (verification, trusted CAs, name): a pooled
    /// connection is reused only by a cluster with the same id.
    id: u64,
}

impl Connector {
    /// The name sent in SNI and checked against `addr`'s certificate.
    fn server_name(&self, addr: &BackendAddr) -> io::Result<ServerName<'static>> {
        if let Some(n) = &self.sni {
            return Ok(n.clone());
        }
        match &addr.0 {
            SockAddr::Tcp(a) => Ok(ServerName::IpAddress(a.ip().into())),
            SockAddr::Unix(_) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS to a Unix-socket backend needs tls.sni"))
            }
        }
    }

    /// What a pooled connection made with these settings is tagged with.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The connector of each cluster of a snapshot, by cluster index.
#[derive(Debug, Default)]
pub struct Connectors {
    by_cluster: Vec<Option<Connector>>,
}

impl Connectors {
    /// Builds a connector for every cluster with a `tls` table; sessions
    /// are kept in `sessions`.
    pub fn build(
        clusters: &[ClusterConfig],
        material: &TlsMaterial,
        sessions: &Arc<ClientSessionMemoryCache>,
    ) -> Result<Connectors, String> {
        let mut by_cluster = Vec::with_capacity(clusters.len());
        for c in clusters {
            let Some(tls) = &c.tls else {
                by_cluster.push(None);
                continue;
            };
            let connector = connector(tls, material, sessions).map_err(|e| format!("cluster {:?}: {e}", c.name))?;
            by_cluster.push(Some(connector));
        }
        Ok(Connectors { by_cluster })
    }

    /// The connector of cluster `i`; `None` for a cleartext cluster.
    pub fn get(&self, i: usize) -> Option<&Connector> {
        self.by_cluster.get(i).and_then(Option::as_ref)
    }
}

fn connector(
    tls: &BackendTls,
    material: &TlsMaterial,
    sessions: &Arc<ClientSessionMemoryCache>,
) -> Result<Connector, String> {
    let provider = super::provider();
    let mut id = DefaultHasher::new();
    (tls.verify, &tls.sni, &tls.ca_file).hash(&mut id);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = if tls.verify {
        let roots = match &tls.ca_file {
            Some(file) => {
                let anchors =
                    material.trust.iter().find(|t| &t.ca_file == file).ok_or_else(|| {
                        format!("{}: the master sent no certificates for this ca_file", file.display())
                    })?;
                let mut roots = RootCertStore::empty();
                for c in &anchors.certs {
                    c.0.hash(&mut id);
                    roots.add(CertificateDer::from(c.0.clone())).map_err(|e| format!("{}: {e}", file.display()))?;
                }
                roots
            }
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        };
        builder.with_root_certificates(roots)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    };
    let mut config = builder.with_no_client_auth();
    // HTTP/1.1 only: a backend that also speaks h2 must not pick it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::store(sessions.clone());
    let sni = match &tls.sni {
        Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| format!("tls.sni {n:?}: {e}"))?),
        None => None,
    };
    Ok(Connector { config: Arc::new(config), sni, id: id.finish() | 1 })
}

/// `verify = false`: every certificate is taken, but the handshake's
/// signatures are still checked (the peer holds the key it presents).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why connecting to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP (or Unix) connect failed.
    #[error("{0}")]
    Socket(io::Error),
    /// The TLS handshake failed: the reason names the certificate check
    /// that refused it, the alert the backend sent, or its close.
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
}

/// A connection to a backend: cleartext, or TLS.
#[derive(Debug)]
pub enum BackendStream {
    /// Cleartext HTTP.
    Plain(Stream),
    /// TLS: the socket and rustls' state of the connection.
    Tls(Box<TlsBackend>),
}

/// A TLS client connection over a socket.
#[derive(Debug)]
pub struct TlsBackend {
    sock: Stream,
    conn: ClientConnection,
    /// The TCP connect finished.
    connected: bool,
    /// The socket reached its end (no more records).
    eof: bool,
}

impl BackendStream {
    /// Starts a non-blocking connect to `addr`, TLS with `tls`.
    pub fn connect(addr: &BackendAddr, tls: Option<&Connector>) -> io::Result<BackendStream> {
        let sock = Stream::connect(addr)?;
        let Some(c) = tls else { return Ok(BackendStream::Plain(sock)) };
        let conn = ClientConnection::new(c.config.clone(), c.server_name(addr)?).map_err(tls_error)?;
        Ok(BackendStream::Tls(Box::new(TlsBackend { sock, conn, connected: false, eof: false })))
    }

    /// TLS is spoken on this connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    /// The socket of a cleartext connection, for system calls that move
    /// bytes without reading them (`splice`); `None` under TLS, whose
    /// records must be decrypted.
    pub fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            BackendStream::Plain(s) => Some(std::os::fd::AsFd::as_fd(s)),
            BackendStream::Tls(_) => None,
        }
    }

    /// Goes on connecting after an event: `Ok(true)` once connected (and
    /// the TLS handshake done), `Ok(false)` while waiting on the socket.
    /// `rd` is the socket's readiness (cleared where an operation blocked).
    pub fn connect_step(&mut self, rd: &mut Readiness) -> Result<bool, ConnectError> {
        let (sock, connected) = match self {
            BackendStream::Plain(s) => (s, None),
            BackendStream::Tls(t) if t.connected => return t.handshake_step(rd),
            BackendStream::Tls(t) => (&mut t.sock, Some(&mut t.connected)),
        };
        if !rd.writable && !rd.read_closed {
            return Ok(false);
        }
        match sock.connect_result() {
            Ok(true) => rd.writable = true,
            Ok(false) => {
                rd.writable = false;
                return Ok(false);
            }
            Err(e) => return Err(ConnectError::Socket(e)),
        }
        match connected {
            None => Ok(true),
            Some(c) => {
                *c = true;
                self.connect_step(rd)
            }
        }
    }

    /// TLS records are queued that the socket did not take yet.
    pub fn pending(&self) -> bool {
        match self {
            BackendStream::Plain(_) => false,
            BackendStream::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Sends queued TLS records: `Ok(true)` when none is left, `Ok(false)`
    /// when the socket would block.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self {
            BackendStream::Plain(_) => Ok(true),
            BackendStream::Tls(t) => flush_records(&mut t.conn, &mut t.sock),
        }
    }

    /// Ends our side: over TLS a close_notify alert first (sent if the
    /// socket takes it now), then the socket's write side.
    pub fn shutdown_write(&mut self) {
        match self {
            BackendStream::Plain(s) => s.shutdown_write(),
            BackendStream::Tls(t) => {
                t.close_notify();
                t.sock.shutdown_write();
            }
        }
    }

    /// Before the connection is dropped: over TLS a close_notify alert, if
    /// the socket takes it now, so the backend sees a clean end.
    pub fn close_notify(&mut self) {
        if let BackendStream::Tls(t) = self {
            t.close_notify();
        }
    }

    /// The socket underneath (the TLS state, if any, is dropped: only a
    /// cleartext connection may be handed to another process).
    pub fn into_socket(self) -> Stream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(t) => t.sock,
        }
    }
}

impl TlsBackend {
    /// Drives the handshake while the socket allows.
    fn handshake_step(&mut self, rd: &mut Readiness) -> Result<bool, ConnectError> {
        loop {
            match flush_records(&mut self.conn, &mut self.sock) {
                Ok(true) => {}
                Ok(false) => rd.writable = false,
                Err(e) => return Err(ConnectError::Tls(e)),
            }
            // Done once the server's Finished is processed; our own
            // Finished goes out with the first write (or the flush above).
            if !self.conn.is_handshaking() {
                return Ok(true);
            }
            if !rd.readable {
                return Ok(false);
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => {
                    return Err(ConnectError::Tls(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection during the handshake",
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    rd.drained();
                    if rd.read_closed {
                        // An error or a FIN with nothing left to read.
                        return Err(ConnectError::Tls(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the backend closed the connection during the handshake",
                        )));
                    }
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnectError::Tls(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert that says why goes out first.
                let _ = flush_records(&mut self.conn, &mut self.sock);
                return Err(ConnectError::Tls(tls_error(e)));
            }
        }
    }

    fn close_notify(&mut self) {
        if !self.conn.is_handshaking() {
            self.conn.send_close_notify();
        }
        let _ = flush_records(&mut self.conn, &mut self.sock);
    }
}

impl Read for BackendStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.read(buf),
            // The handshake finished in `connect_step`; nothing to learn.
            BackendStream::Tls(t) => read_plain(&mut t.conn, &mut t.sock, &mut t.eof, &mut false, buf),
        }
    }
}

impl Write for BackendStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.write(buf),
            BackendStream::Tls(t) => write_plain(&mut t.conn, &mut t.sock, &[IoSlice::new(buf)]),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.write_vectored(bufs),
            BackendStream::Tls(t) => write_plain(&mut t.conn, &mut t.sock, bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BackendStream {
    /// The socket under TLS or not (what the poller watches).
    fn socket_mut(&mut self) -> &mut Stream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(x) => &mut x.sock,
        }
    }
}

impl Source for BackendStream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.socket_mut().register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.socket_mut().reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.socket_mut().deregister(r)
    }
}
