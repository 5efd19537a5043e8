//! Zero-copy relay of large response bodies: `splice(2)` moves the bytes
//! of a Content-Length body from the backend's socket into a pipe and from
//! the pipe into the client's socket, so they never enter user space (the
//! kernel hands page references along). The pipes come from a per-worker
//! pool ([`Pipes`]): a pipe is two fds, too many to keep one per session.
//!
//! Used only where nothing needs to see the bytes (see
//! `Core::splice_wanted`): a plain-text client, a response passed as it
//! is (`RespMode::Pass`) with a known length of at least
//! [`SPLICE_MIN_BYTES`] left once the head and the bytes already read are
//! written. Modules see heads only, never bodies.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{self, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{self, MsgFlags};

/// Body bytes still to come, after what the first read brought, from
/// which splicing pays for its extra system calls.
pub const SPLICE_MIN_BYTES: u64 = 16 * 1024;
/// Bytes a pipe holds (`F_SETPIPE_SZ`; the kernel's default is 64 KiB):
/// the most moved per system call.
const PIPE_BYTES: usize = 256 * 1024;
/// Empty pipes a worker keeps for the next spliced body.
const POOLED_PIPES: usize = 64;

/// A pipe and the bytes in it.
#[derive(Debug)]
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Bytes spliced in and not yet out.
    pub len: usize,
    /// Its capacity (what `F_SETPIPE_SZ` granted).
    cap: usize,
}

/// What one splice into the pipe did.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// This many bytes moved in.
    Bytes(usize),
    /// The source reached its end.
    Eof,
    /// The source had nothing (it is drained).
    Drained,
    /// The pipe could take nothing more (its slots are full even though
    /// `len < cap`: a page reference may carry less than a page).
    Full,
}

impl Pipe {
    fn open() -> io::Result<Pipe> {
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A smaller pipe (pipe-max-size, or the user's pipe quota) is no
        // error: it only moves less per call.
        let cap = fcntl::fcntl(wr.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as libc::c_int))
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(64 * 1024);
        Ok(Pipe { rd, wr, len: 0, cap })
    }

    /// Moves up to `max` bytes from `src` into the pipe.
    pub fn fill(&mut self, src: impl AsFd, max: usize) -> io::Result<Filled> {
        let want = max.min(self.cap - self.len);
        if want == 0 {
            return Ok(Filled::Full);
        }
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            return match fcntl::splice(src.as_fd(), None, &self.wr, None, want, flags) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    self.len += n;
                    Ok(Filled::Bytes(n))
                }
                // EAGAIN: the socket is empty, or the pipe is full; an
                // empty pipe can not be full.
                Err(Errno::EAGAIN) if self.len == 0 => Ok(Filled::Drained),
                Err(Errno::EAGAIN) => Ok(Filled::Full),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Moves bytes from the pipe to `dst`: `Ok(None)` when `dst` would block.
    pub fn drain(&mut self, dst: impl AsFd) -> io::Result<Option<usize>> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            return match fcntl::splice(&self.rd, None, dst.as_fd(), None, self.len, flags) {
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.len -= n;
                    Ok(Some(n))
                }
                Err(Errno::EAGAIN) => Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }
}

/// Nothing is waiting to be read on a socket (peeked, not read).
pub fn socket_empty(sock: impl AsFd) -> bool {
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(socket::recv(sock.as_fd().as_raw_fd(), &mut [0u8; 1], flags), Err(Errno::EAGAIN))
}

/// A worker's idle pipes.
#[derive(Debug, Default)]
pub struct Pipes {
    free: Vec<Pipe>,
}

impl Pipes {
    /// An empty pipe: a pooled one or a new one.
    pub fn get(&mut self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(p) => Ok(p),
            None => Pipe::open(),
        }
    }

    /// Takes a pipe back. One that still holds bytes (an exchange that
    /// failed half-way) is closed: its bytes belong to nobody.
    pub fn put(&mut self, p: Pipe) {
        if p.len == 0 && self.free.len() < POOLED_PIPES {
            self.free.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn moves_bytes_through_and_tells_drained_from_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut pipes = Pipes::default();
        let mut p = pipes.get().unwrap();
        assert_eq!(p.fill(&b, 100).unwrap(), Filled::Drained);
        a.write_all(b"hello, world").unwrap();
        assert_eq!(p.fill(&b, 5).unwrap(), Filled::Bytes(5));
        assert!(!socket_empty(&b));
        assert_eq!(p.fill(&b, 100).unwrap(), Filled::Bytes(7));
        assert!(socket_empty(&b));
        assert_eq!(p.len, 12);
        assert_eq!(p.drain(&c).unwrap(), Some(12));
        assert_eq!(p.len, 0);
        let mut got = [0u8; 12];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, world");
        drop(a);
        assert_eq!(p.fill(&b, 100).unwrap(), Filled::Eof);
        pipes.put(p);
        assert_eq!(pipes.free.len(), 1);
    }

    #[test]
    fn a_pipe_holding_bytes_is_not_pooled() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut pipes = Pipes::default();
        let mut p = pipes.get().unwrap();
        a.write_all(b"left over").unwrap();
        assert_eq!(p.fill(&b, 100).unwrap(), Filled::Bytes(9));
        pipes.put(p);
        assert!(pipes.free.is_empty());
    }
}
