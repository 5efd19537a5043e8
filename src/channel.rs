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
    pub name: String,
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
        seq: u64,
        config_path: String,
        config_text: String,
        listeners: Vec<ListenerEntry>,
        backend_slots: Vec<(String, u32)>,
    },
    /// Files the master opened for the worker (access logs), fds attached
    /// in the order of `paths`; sent before each `Configure` and `Reopen`.
    Files { paths: Vec<String> },
    /// Stop accepting, finish what is in flight, exit.
    Drain { timeout_ms: u64 },
    /// Reopen log files.
    Reopen,
}

/// Worker to master.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// Configured and accepting.
    Ready { pid: u32 },
    /// Outcome of a `Configure` after the first.
    Configured { seq: u64, error: Option<String> },
    /// Access-log lines this worker dropped so far (a slow target), sent
    /// by its writer thread when the count grows.
    Dropped { access_log_lines: u64 },
}

/// Old master ↔ new master during a binary upgrade.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Handoff {
    /// Old to new: the listening sockets, fds attached in manifest order,
    /// then the shared memory region (its state outlives the old binary).
    Listeners { listeners: Vec<ListenerEntry>, backend_slots: Vec<(String, u32)> },
    /// New to old: workers are accepting; the old generation may go.
    Ready { pid: u32 },
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
    pub fn from_env(var: &str) -> io::Result<Option<Channel>> {
        let Ok(v) = std::env::var(var) else { return Ok(None) };
        let fd: RawFd = v.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{var}={v:?}")))?;
        // The fd must be an open socket; fstat-like check via getsockopt.
        socket::getsockopt(&unsafe_borrow(fd), socket::sockopt::SockType)
            .map_err(|e| io::Error::other(format!("{var}={fd} is not a socket: {e}")))?;
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

    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        self.sock.set_nonblocking(nb)
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one message with `fds` attached: in one packet when it is
    /// small, else in a sealed memfd attached after `fds`.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!("message of {} bytes exceeds {MAX_MESSAGE}", bytes.len())));
        }
        if fds.len() + 1 > MAX_FDS {
            return Err(io::Error::other(format!("{} fds exceed {} per message", fds.len(), MAX_FDS - 1)));
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

    fn send_packet(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let n = self.sock.send_with_fd(bytes, fds)?;
        if n != bytes.len() {
            return Err(io::Error::other("short send on a seqpacket channel"));
        }
        Ok(())
    }

    /// Receives one message. `Ok(None)`: nothing now (non-blocking).
    /// `Err(UnexpectedEof)`: the peer is gone. `Err(InvalidData)`: a packet
    /// longer than [`INLINE_MAX`], a payload that is not a sealed memfd of
    /// the announced length, or more than [`MAX_MESSAGE`] bytes.
    pub fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        // One byte more than any packet we accept: a longer one is refused
        // rather than read truncated.
        let mut buf = vec![0u8; INLINE_MAX + 1];
        let mut raw = [0 as RawFd; MAX_FDS];
        let (n, nfds) = match self.sock.recv_with_fd(&mut buf, &mut raw) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
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
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        if n > INLINE_MAX {
            return Err(invalid(format!("a packet of more than {INLINE_MAX} bytes")));
        }
        let payload;
        let bytes = if buf[0] == MEMFD_TAG {
            if n != HEADER_LEN {
                return Err(invalid(format!("a memfd header of {n} bytes")));
            }
            let len = u64::from_le_bytes(buf[1..HEADER_LEN].try_into().expect("8 bytes"));
            let fd = fds.pop().ok_or_else(|| invalid("a memfd header without its fd".into()))?;
            payload = read_sealed(fd, len)?;
            &payload[..]
        } else {
            &buf[..n]
        };
        let msg = serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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
fn read_sealed(fd: OwnedFd, len: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if len > MAX_MESSAGE as u64 {
        return Err(invalid(format!("a message of {len} bytes exceeds {MAX_MESSAGE}")));
    }
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| invalid(format!("payload fd: {e}")))?;
    let seals = nix::fcntl::SealFlag::from_bits_truncate(seals);
    if !seals.contains(SEALS) {
        return Err(invalid("the payload memfd is not sealed".into()));
    }
    let f = std::fs::File::from(fd);
    let size = f.metadata()?.len();
    if size != len {
        return Err(invalid(format!("the payload memfd holds {size} bytes, the header says {len}")));
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
pub fn split_fds(entries: &[ListenerEntry], mut fds: Vec<OwnedFd>) -> Result<(Vec<OwnedFd>, OwnedFd), String> {
    if fds.len() != entries.len() + 1 {
        return Err(format!(
            "manifest names {} listeners and a shared region, but {} fds arrived",
            entries.len(),
            fds.len()
        ));
    }
    let region = fds.pop().expect("one more than the listeners");
    check_manifest(entries, &fds)?;
    Ok((fds, region))
}

/// Checks received fds against their manifest: same count, and each fd is
/// a listening socket bound where the manifest says.
pub fn check_manifest(entries: &[ListenerEntry], fds: &[OwnedFd]) -> Result<(), String> {
    if entries.len() != fds.len() {
        return Err(format!("manifest names {} listeners but {} fds arrived", entries.len(), fds.len()));
    }
    for (e, fd) in entries.iter().zip(fds) {
        let listening = socket::getsockopt(fd, socket::sockopt::AcceptConn).unwrap_or(false);
        if !listening {
            return Err(format!("fd {} for {} is not a listening socket", fd.as_raw_fd(), e.name));
        }
        if e.local.starts_with("unix:") {
            let ok = socket::getsockname::<socket::UnixAddr>(fd.as_raw_fd())
                .ok()
                .and_then(|a| a.path().map(|p| format!("unix:{}", p.display())))
                .is_some_and(|p| p == e.local);
            if !ok {
                return Err(format!("fd {} is not bound to {}", fd.as_raw_fd(), e.local));
            }
        } else {
            let actual = crate::net::local_addr(fd.as_raw_fd()).map(|a| a.to_string()).unwrap_or_default();
            if actual != e.local {
                return Err(format!("fd {} is bound to {actual}, manifest says {}", fd.as_raw_fd(), e.local));
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
