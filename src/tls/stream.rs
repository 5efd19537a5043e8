//! [`ClientStream`]: a client connection as its session sees it, bytes of
//! HTTP in and out, over a cleartext socket or a rustls `ServerConnection`
//! on that socket. Everything here is non-blocking and driven by the
//! session's reads and writes; it keeps the readiness contract of
//! `net::Stream` that sessions rely on under edge-triggered epoll:
//!
//! * a read returns fewer bytes than asked (or `WouldBlock`) only when the
//!   socket would block or reached its end, never while rustls still holds
//!   plaintext or the socket still holds records;
//! * a write accepts plaintext into rustls and sends what the socket takes;
//!   records it could not send stay queued ([`ClientStream::pending`]) and
//!   the next write, or [`ClientStream::flush`], sends them first. A write
//!   with records still queued that the socket refuses is `WouldBlock`.
//!
//! Handshake records are read and answered within reads; handshake
//! failures (garbage instead of a ClientHello, no common protocol) are
//! errors of the read, after the alert went out.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::event::Source;
use mio::{Interest, Registry, Token};
use rustls::{ConnectionCommon, ServerConfig, ServerConnection};

use crate::net::Stream;

/// A client connection: cleartext, or TLS terminated here.
#[derive(Debug)]
pub enum ClientStream {
    /// Cleartext HTTP.
    Plain(Stream),
    /// TLS: the socket and rustls' state of the connection.
    Tls(Box<TlsStream>),
}

/// A TLS server connection over a socket.
#[derive(Debug)]
pub struct TlsStream {
    sock: Stream,
    conn: ServerConnection,
    /// The socket reached its end (no more records).
    eof: bool,
    /// The handshake finished since the owner last asked.
    just_finished: bool,
}

/// IANA names of the TLS 1.3 suites rustls offers.
const TLS13_IANA: &[&str] = &["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"];

/// Why a TLS connection could not start or go on.
pub(super) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl ClientStream {
    /// A TLS server connection over `sock` with `config`.
    pub fn tls(sock: Stream, config: &Arc<ServerConfig>) -> io::Result<ClientStream> {
        let conn = ServerConnection::new(config.clone()).map_err(tls_error)?;
        Ok(ClientStream::Tls(Box::new(TlsStream { sock, conn, eof: false, just_finished: false })))
    }

    /// The socket of a cleartext connection, for system calls that move
    /// bytes without reading them (`splice`); `None` under TLS.
    pub fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            ClientStream::Plain(s) => Some(std::os::fd::AsFd::as_fd(s)),
            ClientStream::Tls(_) => None,
        }
    }

    /// Writes `bufs` when the connection is closed right after them: see
    /// `net::Stream::write_before_close` (cleartext); TLS writes as usual.
    pub fn write_before_close(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write_before_close(bufs),
            ClientStream::Tls(_) => self.write_vectored(bufs),
        }
    }

    /// TLS is terminated on this connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The socket underneath (the TLS state, if any, is dropped: only a
    /// cleartext connection may be handed to another process).
    pub fn into_socket(self) -> Stream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(t) => t.sock,
        }
    }

    /// The TLS handshake has not finished yet.
    pub fn handshaking(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(t) => t.conn.is_handshaking(),
        }
    }

    /// The handshake finished since the last call (once per connection).
    pub fn take_handshake_done(&mut self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(t) => std::mem::take(&mut t.just_finished),
        }
    }

    /// The negotiated protocol version and the cipher suite's IANA name
    /// (`TLSv1.3`, `TLS_AES_128_GCM_SHA256`), once the handshake is done.
    pub fn tls_params(&self) -> Option<(&'static str, &'static str)> {
        let ClientStream::Tls(t) = self else { return None };
        let version = match t.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "TLS",
        };
        let suite = t.conn.negotiated_cipher_suite()?.suite().as_str().unwrap_or("unknown");
        // rustls marks TLS 1.3 suites `TLS13_`; their IANA names say `TLS_`.
        let suite = match suite.strip_prefix("TLS13_") {
            Some(rest) => TLS13_IANA.iter().find(|n| n.ends_with(rest)).copied().unwrap_or(suite),
            None => suite,
        };
        Some((version, suite))
    }

    /// TLS records are queued that the socket did not take yet.
    pub fn pending(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Sends queued TLS records: `Ok(true)` when none is left, `Ok(false)`
    /// when the socket would block.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self {
            ClientStream::Plain(_) => Ok(true),
            ClientStream::Tls(t) => t.flush(),
        }
    }

    /// See `net::Stream::set_nodelay`.
    pub fn set_nodelay(&self) {
        match self {
            ClientStream::Plain(s) => s.set_nodelay(),
            ClientStream::Tls(t) => t.sock.set_nodelay(),
        }
    }

    /// Ends our side: over TLS a close_notify alert first (sent if the
    /// socket takes it now), then the socket's write side.
    pub fn shutdown_write(&mut self) {
        match self {
            ClientStream::Plain(s) => s.shutdown_write(),
            ClientStream::Tls(t) => {
                if !t.conn.is_handshaking() {
                    t.conn.send_close_notify();
                }
                let _ = t.flush();
                t.sock.shutdown_write();
            }
        }
    }
}

impl TlsStream {
    fn flush(&mut self) -> io::Result<bool> {
        flush_records(&mut self.conn, &mut self.sock)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_plain(&mut self.conn, &mut self.sock, &mut self.eof, &mut self.just_finished, buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        write_plain(&mut self.conn, &mut self.sock, bufs)
    }
}

/// Sends the records rustls has queued: `Ok(true)` when none is left,
/// `Ok(false)` when the socket would block. (Either side of TLS.)
pub(super) fn flush_records<D>(conn: &mut ConnectionCommon<D>, sock: &mut Stream) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads plaintext into `buf`, reading and processing records from the
/// socket while rustls has none and the socket has some; `eof` is set when
/// the socket ended, `finished` as soon as a handshake finished on the way
/// (whatever the read returns after: often `WouldBlock`, the client's
/// Finished having come without data). Short only when the socket would
/// block or ended.
pub(super) fn read_plain<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut Stream,
    eof: &mut bool,
    finished: &mut bool,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut n = 0;
    loop {
        match conn.reader().read(&mut buf[n..]) {
            // close_notify: the end of the plaintext.
            Ok(0) => return Ok(n),
            Ok(k) => {
                n += k;
                if n == buf.len() {
                    return Ok(n);
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The socket ended without close_notify: an end all the same
            // (HTTP framing says whether anything was cut short).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
            Err(e) => return Err(e),
        }
        if *eof {
            return Ok(n);
        }
        match conn.read_tls(sock) {
            Ok(0) => *eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return if n > 0 { Ok(n) } else { Err(e) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let was_handshaking = conn.is_handshaking();
        let processed = conn.process_new_packets();
        *finished |= was_handshaking && !conn.is_handshaking();
        // Handshake answers, or the alert that says why not.
        let flushed = flush_records(conn, sock);
        if let Err(e) = processed {
            return Err(tls_error(e));
        }
        flushed?;
    }
}

/// Queues `bufs` as plaintext after sending what was queued before, then
/// sends what the socket takes. `WouldBlock` when earlier records are
/// still queued (or rustls' buffer is full).
pub(super) fn write_plain<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut Stream,
    bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    if !flush_records(conn, sock)? {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let n = conn.writer().write_vectored(bufs)?;
    if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    flush_records(conn, sock)?;
    Ok(n)
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(t) => t.write_vectored(&[IoSlice::new(buf)]),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write_vectored(bufs),
            ClientStream::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ClientStream {
    /// The socket under TLS or not (what the poller watches).
    fn socket_mut(&mut self) -> &mut Stream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(x) => &mut x.sock,
        }
    }
}

impl Source for ClientStream {
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
