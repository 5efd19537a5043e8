//! The channels between processes: master ↔ worker, and old master ↔ new
//! master during a binary upgrade. A channel is a `SOCK_SEQPACKET` Unix
//! socket pair: each message is one packet (JSON), file descriptors travel
//! with the packet that names them (`sendfd`), and the peer's exit reads as
//! end-of-file. Listening sockets always travel with a manifest of names
//! that the receiver checks against the fds themselves.
//!
//! A socket message is bounded by the socket buffer (about 200 KiB), a
//! configuration of thousands of routes is not: a message larger than
//! [`INLINE_MAX`] is written to a sealed `memfd` (no write, grow or shrink
//! possible once sealed) that travels as the packet's last fd, behind a
//! small header packet giving its length. The receiver checks the seals and
//! the length and accepts at most [`MAX_MESSAGE`] bytes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use sendfd::{RecvWithFd, SendWithFd};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{ListenAddr, SockAddr};

/// Why a message could not be sent or received. [`kind`](Self::kind) maps
/// it to the [`io::ErrorKind`] callers match on (`WouldBlock` never
/// appears: "nothing now" is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer closed its end (it exited).
    #[error("the peer closed the channel")]
    Closed,
    /// The environment variable does not name a channel fd.
    #[error("{var}={value:?} is not a channel fd: {reason}")]
    BadFd {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A message could not be encoded.
    #[error("cannot encode a message: {0}")]
    Encode(serde_json::Error),
    /// A message could not be decoded.
    #[error("cannot decode a message: {0}")]
    Decode(serde_json::Error),
    /// A message is larger than [`MAX_MESSAGE`].
    #[error("a message of {len} bytes exceeds {MAX_MESSAGE}")]
    TooLarge {
        /// Its length in bytes.
        len: u64,
    },
    /// More fds than one message carries.
    #[error("{count} fds exceed {max} per message", max = MAX_FDS - 1)]
    TooManyFds {
        /// How many were given.
        count: usize,
    },
    /// The kernel took part of a packet.
    #[error("short send on a seqpacket channel")]
    ShortSend,
    /// A packet longer than [`INLINE_MAX`] arrived.
    #[error("a packet of more than {INLINE_MAX} bytes")]
    PacketTooLong,
    /// A memfd header of the wrong size.
    #[error("a memfd header of {len} bytes")]
    BadHeader {
        /// The packet's length.
        len: usize,
    },
    /// A memfd header arrived without an fd.
    #[error("a memfd header without its fd")]
    MissingPayload,
    /// The payload memfd could change under the reader.
    #[error("the payload memfd is not sealed")]
    Unsealed,
    /// The payload memfd's size differs from its header's.
    #[error("the payload memfd holds {size} bytes, the header says {len}")]
    LengthMismatch {
        /// Bytes in the memfd.
        size: u64,
        /// Bytes the header announced.
        len: u64,
    },
}

impl ChannelError {
    /// The I/O error kind of this error: `UnexpectedEof` when the peer is
    /// gone, `InvalidData` for a malformed message, `InvalidInput` for one
    /// this side may not send.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ChannelError::Io(e) => e.kind(),
            ChannelError::Closed => io::ErrorKind::UnexpectedEof,
            ChannelError::BadFd { .. }
            | ChannelError::Encode(_)
            | ChannelError::TooLarge { .. }
            | ChannelError::TooManyFds { .. } => io::ErrorKind::InvalidInput,
            ChannelError::ShortSend => io::ErrorKind::WriteZero,
            ChannelError::Decode(_)
            | ChannelError::PacketTooLong
            | ChannelError::BadHeader { .. }
            | ChannelError::MissingPayload
            | ChannelError::Unsealed
            | ChannelError::LengthMismatch { .. } => io::ErrorKind::InvalidData,
        }
    }
}

/// Bridge for callers that still speak `io::Error` (the worker's loop).
impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> io::Error {
        match e {
            ChannelError::Io(e) => e,
            other => io::Error::new(other.kind(), other),
        }
    }
}

impl From<nix::Error> for ChannelError {
    fn from(e: nix::Error) -> ChannelError {
        ChannelError::Io(e.into())
    }
}

/// Why received fds do not match their manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not as many fds as the manifest names (`region`: one more was
    /// expected for the shared region).
    #[error(
        "manifest names {listeners} listeners{}, but {fds} fds arrived",
        if *region { " and a shared region" } else { "" }
    )]
    Count {
        /// Listeners in the manifest.
        listeners: usize,
        /// Whether the shared region's fd was expected after them.
        region: bool,
        /// Fds received.
        fds: usize,
    },
    /// An fd is not a listening socket.
    #[error("fd {fd} for {name} is not a listening socket")]
    NotListening {
        /// The fd number.
        fd: RawFd,
        /// The manifest's name for it.
        name: String,
    },
    /// A Unix socket fd is not bound to its entry's path.
    #[error("fd {fd} is not bound to {local}")]
    NotBound {
        /// The fd number.
        fd: RawFd,
        /// Where the manifest says.
        local: String,
    },
    /// An fd is bound somewhere else than its entry says.
    #[error("fd {fd} is bound to {actual}, manifest says {local}")]
    BoundElsewhere {
        /// The fd number.
        fd: RawFd,
        /// Where it is bound (empty when unknown).
        actual: String,
        /// Where the manifest says.
        local: String,
    },
}

/// Bridge for callers that report errors as text (the worker's reload).
impl From<ManifestError> for String {
    fn from(e: ManifestError) -> String {
        e.to_string()
    }
}

/// Largest message a receiver accepts (a configuration file travels in one).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Largest message sent as one packet; larger ones go in a sealed memfd.
pub const INLINE_MAX: usize = 32 << 10;
/// First byte of a header packet whose payload is in a memfd (a JSON
/// message starts with `{`), followed by the payload's length (u64 LE).
const MEMFD_TAG: u8 = 0;
const HEADER_LEN: usize = 9;
/// Most fds one message carries (the kernel's SCM_RIGHTS limit is 253).
pub const MAX_FDS: usize = 250;
/// Environment variable naming a worker's channel fd.
pub const WORKER_FD_ENV: &str = "PITCHER_WORKER_FD";
/// Environment variable giving a worker its place among the workers.
pub const WORKER_PLACE_ENV: &str = "PITCHER_WORKER_PLACE";
/// Environment variable naming a new master's channel to the old one.
pub const UPGRADE_FD_ENV: &str = "PITCHER_UPGRADE_FD";

/// One listening socket in a manifest: its configured address and the
/// address it is actually bound to (they differ for port 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerEntry {
    /// The address as configured (`127.0.0.1:0`, `unix:/run/p.sock`).
    pub name: String,
    /// The address it is bound to (`127.0.0.1:43121`).
    pub local: String,
}

/// Master to worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// The configuration to serve (first message, and every reload), with
    /// every listening fd attached in manifest order, then the shared
    /// memory region's fd. `backend_slots` gives each backend address its
    /// slot in that region.
    Configure {
        /// Sequence number, echoed by [`ToMaster::Configured`].
        seq: u64,
        /// The main configuration file (for messages and relative paths).
        config_path: String,
        /// The configuration with includes and `${VAR}` resolved.
        config_text: String,
        /// The manifest of the attached listening fds.
        listeners: Vec<ListenerEntry>,
        /// Each backend address's slot in the shared region.
        backend_slots: Vec<(String, u32)>,
        /// Certificates and keys of the TLS listeners and the CA
        /// certificates of TLS clusters, read by the master (workers never
        /// read key or CA files).
        #[serde(default)]
        tls: crate::tls::TlsMaterial,
        /// The addresses the master found for each backend name; the
        /// worker adds them to the clusters of `config_text`
        /// (`Config::with_resolved`).
        #[serde(default)]
        resolved: Vec<crate::config::ResolvedName>,
        /// The master's parse of `config_text` (`Config::parse_sent`): the
        /// worker reads it instead of parsing the text again, and checks
        /// it as it would the text.
        #[serde(default)]
        config_form: Option<crate::config::Form>,
    },
    /// Files the master opened for the worker (access logs), fds attached
    /// in the order of `paths`; sent before each `Configure` and `Reopen`.
    Files {
        /// The path of each attached fd.
        paths: Vec<String>,
    },
    /// Stop accepting, finish what is in flight, exit.
    Drain {
        /// Longest wait for requests in flight.
        timeout_ms: u64,
    },
    /// Reopen log files.
    Reopen,
    /// Binary upgrade: stop accepting and hand every connection that can
    /// move (idle between requests with nothing buffered, or a tunnel with
    /// empty buffers) to the master ([`ToMaster::Handover`]), the others as
    /// soon as they can; exit when none is left. What is left at the
    /// deadline is closed (and counted).
    HandOver {
        /// Longest wait for connections that cannot move yet.
        timeout_ms: u64,
    },
    /// Connections of a worker of another generation to serve from now on,
    /// their fds attached in order (two for a tunnel: client, backend).
    Adopt {
        /// The state of each connection.
        conns: Vec<HandedConn>,
    },
}

/// A client connection moving between generations on a binary upgrade:
/// what its new worker needs besides the fds. The peer's address is read
/// from the socket itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedConn {
    /// The listener that accepted it (its bound address).
    pub listener: String,
    /// Requests served on it so far.
    pub requests: u64,
    /// Milliseconds left before it is closed if idle (keep-alive, or the
    /// tunnel's idle timeout).
    pub idle_ms: u64,
    /// Set for a WebSocket/Upgrade tunnel: its second fd is the backend
    /// connection.
    pub tunnel: Option<HandedTunnel>,
}

impl HandedConn {
    /// How many fds travel with this connection.
    pub fn fds(&self) -> usize {
        1 + usize::from(self.tunnel.is_some())
    }
}

/// The tunnel part of a [`HandedConn`]: the backend and the half-close
/// state of both directions (both buffers were empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedTunnel {
    /// The backend's address (`host:port`, `unix:/path`).
    pub backend: String,
    /// The backend sent its FIN.
    pub resp_eof: bool,
    /// The client sent its FIN.
    pub client_eof: bool,
    /// The backend's FIN was passed on to the client.
    pub client_shut: bool,
    /// The client's FIN was passed on to the backend.
    pub up_shut: bool,
}

/// Most connections in one hand-over message (each takes one or two fds
/// of [`MAX_FDS`]).
pub const HANDOVER_BATCH: usize = 100;

/// Worker to master.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// Configured and accepting.
    Ready {
        /// The worker's pid.
        pid: u32,
    },
    /// Outcome of a `Configure` after the first.
    Configured {
        /// The `seq` of the `Configure`.
        seq: u64,
        /// Why it was refused (`None`: applied).
        error: Option<String>,
    },
    /// Access-log lines this worker dropped so far (a slow target), sent
    /// by its writer thread when the count grows.
    Dropped {
        /// Lines dropped since the worker started.
        access_log_lines: u64,
    },
    /// Connections this worker hands to the next generation
    /// ([`ToWorker::HandOver`]), fds attached in order.
    Handover {
        /// The state of each connection.
        conns: Vec<HandedConn>,
    },
    /// Connections a handing-over worker had to close (at its deadline, or
    /// because they could not be sent), so far.
    HandoverClosed {
        /// Connections closed since the hand-over began.
        closed: u64,
    },
}

/// Old master ↔ new master during a binary upgrade.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Handoff {
    /// Old to new: the listening sockets, fds attached in manifest order,
    /// then the shared memory region (its state outlives the old binary).
    Listeners {
        /// The manifest of the attached listening fds; a `reuseport`
        /// listener's entry comes once per socket, in worker slot order.
        listeners: Vec<ListenerEntry>,
        /// Each backend address's slot in the shared region.
        backend_slots: Vec<(String, u32)>,
        /// The old master adopts a new master that goes on in a child of
        /// the process it started (`Forked`). Absent from an old master of
        /// an earlier version, which does not: its new master does not fork.
        #[serde(default)]
        fork_ok: bool,
    },
    /// New to old, first of all when `fork_ok`: the new master goes on in
    /// this child of the process the old master started, which exits.
    Forked {
        /// The new master's pid from now on.
        pid: u32,
    },
    /// New to old: workers are accepting; the old generation may go.
    Ready {
        /// The new master's pid.
        pid: u32,
    },
    /// New to old (rolling start): the old master retires workers (each
    /// hands its connections over and exits) until at most `keep` serve.
    Retire {
        /// Old workers that may go on serving.
        keep: usize,
        /// New workers accepting so far: while there is none, a retired
        /// worker's connections go to its serving siblings.
        accepting: usize,
    },
    /// New to old (rolling start): a new worker failed; the old master
    /// rolls back (its retired workers come back on the old binary) and
    /// takes back the connections the new generation hands back.
    Abort {
        /// What failed.
        reason: String,
    },
    /// Either way: client connections for the receiving master's workers,
    /// fds attached in order.
    Connections {
        /// The state of each connection.
        conns: Vec<HandedConn>,
    },
    /// Old to new, on every change: the old generation as `ctl status`
    /// shows it.
    Generation {
        /// The old master's pid.
        pid: u32,
        /// Its live workers' pids.
        workers: Vec<u32>,
        /// Workers it still has to retire (`workers` minus those handing over).
        serving: usize,
        /// Connections its workers handed over so far.
        handed_over: u64,
        /// Connections its workers closed instead.
        closed: u64,
    },
}

/// One end of a channel.
#[derive(Debug)]
pub struct Channel {
    // A SOCK_SEQPACKET socket: std has no type for it, and UnixStream's
    // fd-level operations (and sendfd's sendmsg/recvmsg) are what it needs.
    sock: UnixStream,
}

impl Channel {
    /// A connected pair; both ends close-on-exec.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((Channel { sock: UnixStream::from(a) }, Channel { sock: UnixStream::from(b) }))
    }

    /// Makes this end inheritable across exec (for a child about to be
    /// spawned); returns its fd number.
    pub fn inheritable(&self) -> io::Result<RawFd> {
        fcntl(self.sock.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        Ok(self.sock.as_raw_fd())
    }

    /// Takes the channel fd named by an environment variable.
    pub fn from_env(var: &'static str) -> Result<Option<Channel>, ChannelError> {
        let Ok(v) = std::env::var(var) else { return Ok(None) };
        let bad = |reason: String| ChannelError::BadFd { var, value: v.clone(), reason };
        let fd: RawFd = v.parse().map_err(|_| bad("not an fd number".into()))?;
        // The fd must be an open socket; fstat-like check via getsockopt.
        socket::getsockopt(&unsafe_borrow(fd), socket::sockopt::SockType)
            .map_err(|e| bad(format!("not a socket: {e}")))?;
        // SAFETY: the parent passed this fd, open and not close-on-exec, for
        // this process alone (checked just above that it is a socket); we
        // take sole ownership here and nothing else in this process uses it.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        fcntl(sock.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        Ok(Some(Channel { sock }))
    }

    /// Another handle on this end (the same socket), for a second thread
    /// that only sends.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel { sock: self.sock.try_clone()? })
    }

    /// Makes `recv` return `Ok(None)` instead of waiting.
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        self.sock.set_nonblocking(nb)
    }

    /// Bounds how long a blocking `recv` waits.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// The socket's fd (to register with a poller).
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one message with `fds` attached: in one packet when it is
    /// small, else in a sealed memfd attached after `fds`.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(msg).map_err(ChannelError::Encode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge { len: bytes.len() as u64 });
        }
        if fds.len() + 1 > MAX_FDS {
            return Err(ChannelError::TooManyFds { count: fds.len() });
        }
        if bytes.len() <= INLINE_MAX {
            return self.send_packet(&bytes, fds);
        }
        let payload = sealed_memfd(&bytes)?;
        let mut header = [0u8; HEADER_LEN];
        header[0] = MEMFD_TAG;
        header[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        let mut all = fds.to_vec();
        all.push(payload.as_raw_fd());
        self.send_packet(&header, &all)
    }

    /// Sends like [`send`](Self::send) on a non-blocking channel, but
    /// waits up to `timeout` for room in the socket rather than fail: for
    /// messages that carry client connections, which a peer slow to read
    /// must not get closed. The channel is non-blocking again afterwards.
    pub fn send_wait<T: Serialize>(
        &self,
        msg: &T,
        fds: &[RawFd],
        timeout: std::time::Duration,
    ) -> Result<(), ChannelError> {
        self.sock.set_nonblocking(false)?;
        self.sock.set_write_timeout(Some(timeout))?;
        let sent = self.send(msg, fds);
        let _ = self.sock.set_write_timeout(None);
        self.sock.set_nonblocking(true)?;
        sent
    }

    fn send_packet(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), ChannelError> {
        let n = self.sock.send_with_fd(bytes, fds)?;
        if n != bytes.len() {
            return Err(ChannelError::ShortSend);
        }
        Ok(())
    }

    /// Receives one message. `Ok(None)`: nothing now (non-blocking).
    /// [`ChannelError::Closed`]: the peer is gone. An error of kind
    /// `InvalidData`: a packet longer than [`INLINE_MAX`], a payload that
    /// is not a sealed memfd of the announced length, or more than
    /// [`MAX_MESSAGE`] bytes.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        // One byte more than any packet we accept: a longer one is refused
        // rather than read truncated.
        let mut buf = vec![0u8; INLINE_MAX + 1];
        let mut raw = [0 as RawFd; MAX_FDS];
        let (n, nfds) = match self.sock.recv_with_fd(&mut buf, &mut raw) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::with_capacity(nfds);
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed these fds in our table; nobody
            // else knows them, so we own each one exactly once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
            fds.push(owned);
        }
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        if n > INLINE_MAX {
            return Err(ChannelError::PacketTooLong);
        }
        let payload;
        let bytes = if buf[0] == MEMFD_TAG {
            if n != HEADER_LEN {
                return Err(ChannelError::BadHeader { len: n });
            }
            let len = u64::from_le_bytes(buf[1..HEADER_LEN].try_into().expect("8 bytes"));
            let fd = fds.pop().ok_or(ChannelError::MissingPayload)?;
            payload = read_sealed(fd, len)?;
            &payload[..]
        } else {
            &buf[..n]
        };
        let msg = serde_json::from_slice(bytes).map_err(ChannelError::Decode)?;
        Ok(Some((msg, fds)))
    }
}

/// A memfd holding `bytes`, sealed against any change.
fn sealed_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::Write;
    let fd = memfd_create(c"pitcher-message", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(SEALS))?;
    Ok(OwnedFd::from(f))
}

/// Seals a payload memfd must carry: nobody can change it once received.
const SEALS: nix::fcntl::SealFlag = nix::fcntl::SealFlag::from_bits_truncate(
    nix::fcntl::SealFlag::F_SEAL_SEAL.bits()
        | nix::fcntl::SealFlag::F_SEAL_SHRINK.bits()
        | nix::fcntl::SealFlag::F_SEAL_GROW.bits()
        | nix::fcntl::SealFlag::F_SEAL_WRITE.bits(),
);

/// Reads a payload memfd after checking its seals and length.
fn read_sealed(fd: OwnedFd, len: u64) -> Result<Vec<u8>, ChannelError> {
    use std::os::unix::fs::FileExt;
    if len > MAX_MESSAGE as u64 {
        return Err(ChannelError::TooLarge { len });
    }
    // Not a memfd at all reads as one without seals.
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|_| ChannelError::Unsealed)?;
    let seals = nix::fcntl::SealFlag::from_bits_truncate(seals);
    if !seals.contains(SEALS) {
        return Err(ChannelError::Unsealed);
    }
    let f = std::fs::File::from(fd);
    let size = f.metadata()?.len();
    if size != len {
        return Err(ChannelError::LengthMismatch { size, len });
    }
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// A borrowed fd for a getsockopt check.
fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for one getsockopt call on an fd number given to us
    // by our parent; a closed fd makes the call fail with EBADF, nothing worse.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// The manifest entry for a bound listening fd.
pub fn entry_for(addr: &ListenAddr, fd: RawFd) -> ListenerEntry {
    let local = match &addr.0 {
        SockAddr::Tcp(_) => crate::net::local_addr(fd).map(|a| a.to_string()).unwrap_or_default(),
        SockAddr::Unix(p) => format!("unix:{}", p.display()),
    };
    ListenerEntry { name: addr.to_string(), local }
}

/// Splits the fds of a message into listeners and the shared region (the
/// one fd after the listeners), checking the listeners against their
/// manifest.
pub fn split_fds(entries: &[ListenerEntry], mut fds: Vec<OwnedFd>) -> Result<(Vec<OwnedFd>, OwnedFd), ManifestError> {
    let count = ManifestError::Count { listeners: entries.len(), region: true, fds: fds.len() };
    if fds.len() != entries.len() + 1 {
        return Err(count);
    }
    let region = fds.pop().ok_or(count)?;
    check_manifest(entries, &fds)?;
    Ok((fds, region))
}

/// Checks received fds against their manifest: same count, and each fd is
/// a listening socket bound where the manifest says.
pub fn check_manifest(entries: &[ListenerEntry], fds: &[OwnedFd]) -> Result<(), ManifestError> {
    if entries.len() != fds.len() {
        return Err(ManifestError::Count { listeners: entries.len(), region: false, fds: fds.len() });
    }
    for (e, fd) in entries.iter().zip(fds) {
        let listening = socket::getsockopt(fd, socket::sockopt::AcceptConn).unwrap_or(false);
        if !listening {
            return Err(ManifestError::NotListening { fd: fd.as_raw_fd(), name: e.name.clone() });
        }
        if e.local.starts_with("unix:") {
            let ok = socket::getsockname::<socket::UnixAddr>(fd.as_raw_fd())
                .ok()
                .and_then(|a| a.path().map(|p| format!("unix:{}", p.display())))
                .is_some_and(|p| p == e.local);
            if !ok {
                return Err(ManifestError::NotBound { fd: fd.as_raw_fd(), local: e.local.clone() });
            }
        } else {
            let actual = crate::net::local_addr(fd.as_raw_fd()).map(|a| a.to_string()).unwrap_or_default();
            if actual != e.local {
                return Err(ManifestError::BoundElsewhere { fd: fd.as_raw_fd(), actual, local: e.local.clone() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Blob {
        text: String,
    }

    #[test]
    fn messages_larger_than_a_packet_travel_in_a_sealed_memfd() {
        let (a, b) = Channel::pair().unwrap();
        for len in [10, INLINE_MAX - 20, INLINE_MAX + 1, 3 << 20] {
            let msg = Blob { text: "r".repeat(len) };
            let (extra, _keep) = Channel::pair().unwrap();
            a.send(&msg, &[extra.raw_fd()]).unwrap();
            let (got, fds) = b.recv::<Blob>().unwrap().unwrap();
            assert_eq!(got, msg, "len {len}");
            assert_eq!(fds.len(), 1, "only the caller's fds come back (len {len})");
        }
    }

    #[test]
    fn a_manifest_that_does_not_match_its_fds_says_what_arrived() {
        let e = split_fds(&[], Vec::new()).unwrap_err();
        assert!(matches!(e, ManifestError::Count { listeners: 0, region: true, fds: 0 }), "{e}");
        assert_eq!(e.to_string(), "manifest names 0 listeners and a shared region, but 0 fds arrived");
        // A socket that is not listening, named as a listener.
        let (a, _b) = Channel::pair().unwrap();
        let entry = ListenerEntry { name: "127.0.0.1:1".into(), local: "127.0.0.1:1".into() };
        let fd = OwnedFd::from(a.sock);
        let e = check_manifest(std::slice::from_ref(&entry), std::slice::from_ref(&fd)).unwrap_err();
        assert!(matches!(&e, ManifestError::NotListening { name, .. } if name == "127.0.0.1:1"), "{e}");
        // The peer gone reads as Closed, of kind UnexpectedEof.
        let (c, d) = Channel::pair().unwrap();
        drop(d);
        let e = c.recv::<Blob>().unwrap_err();
        assert!(matches!(e, ChannelError::Closed) && e.kind() == io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn an_old_master_that_does_not_say_fork_ok_gets_a_new_master_that_does_not_fork() {
        // The listeners message of a master from before `Forked` existed.
        let old = r#"{"type":"listeners","listeners":[],"backend_slots":[]}"#;
        let Handoff::Listeners { fork_ok, .. } = serde_json::from_str(old).unwrap() else { panic!("listeners") };
        assert!(!fork_ok);
        let now =
            serde_json::to_string(&Handoff::Listeners { listeners: vec![], backend_slots: vec![], fork_ok: true })
                .unwrap();
        let Handoff::Listeners { fork_ok, .. } = serde_json::from_str(&now).unwrap() else { panic!("listeners") };
        assert!(fork_ok);
    }

    #[test]
    fn an_unsealed_or_oversized_payload_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        // A header pointing at an unsealed memfd.
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        let body = br#"{"text":"x"}"#;
        nix::unistd::write(&fd, body).unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
        a.send_packet(&header, &[fd.as_raw_fd()]).unwrap();
        let e = b.recv::<Blob>().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A header announcing more than the receiver accepts.
        let sealed = sealed_memfd(body).unwrap();
        header[1..].copy_from_slice(&((MAX_MESSAGE as u64) + 1).to_le_bytes());
        a.send_packet(&header, &[sealed.as_raw_fd()]).unwrap();
        let e = b.recv::<Blob>().unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        // A packet longer than INLINE_MAX.
        a.send_packet(&vec![b' '; INLINE_MAX + 5], &[]).unwrap();
        assert_eq!(b.recv::<Blob>().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
