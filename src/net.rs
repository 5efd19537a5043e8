//! Sockets: TCP and Unix-domain streams and listeners behind one type each,
//! binding with a chosen backlog, and readiness bookkeeping for the
//! edge-triggered event loop. No HTTP here.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};

use crate::config::{BackendAddr, ListenAddr, SockAddr};

/// A connected stream, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
}

impl Stream {
    /// Starts a non-blocking connect to a backend.
    pub fn connect(addr: &BackendAddr) -> io::Result<Stream> {
        match &addr.0 {
            SockAddr::Tcp(a) => {
                let s = TcpStream::connect(*a)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            SockAddr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
        }
    }

    /// Checks a pending connect after a writable (or error) event:
    /// `Ok(true)` connected, `Ok(false)` still in progress.
    pub fn connect_result(&self) -> io::Result<bool> {
        let err = match self {
            Stream::Tcp(s) => s.take_error()?,
            Stream::Unix(s) => s.take_error()?,
        };
        if let Some(e) = err {
            return Err(e);
        }
        let r = match self {
            Stream::Tcp(s) => s.peer_addr().map(|_| ()),
            Stream::Unix(s) => s.peer_addr().map(|_| ()),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Disables Nagle's algorithm on a TCP stream. Needed as soon as a
    /// connection carries more than one write per exchange or more than one
    /// exchange: a small write after an unacknowledged one would otherwise
    /// wait for the peer's delayed ACK.
    pub fn set_nodelay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }

    /// Writes `bufs` when the connection is closed right after them. On a
    /// TCP socket the write says `MSG_MORE`: the kernel holds the last
    /// partial segment until the close, whose FIN then leaves in that same
    /// segment (`tcp_send_fin` tacks it on an unsent one), one segment and
    /// one ACK less per connection. A Unix socket writes as usual.
    pub fn write_before_close(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => {
                // nix names no MSG_MORE; the kernel's value is libc's.
                let flags = socket::MsgFlags::from_bits_retain(libc::MSG_MORE) | socket::MsgFlags::MSG_NOSIGNAL;
                socket::sendmsg::<()>(s.as_raw_fd(), bufs, &[], flags, None).map_err(io::Error::from)
            }
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    /// The socket itself, to hand to another process. Deregister it from
    /// the poller first: an epoll registration lasts as long as the open
    /// socket, which outlives this process's fd.
    pub fn into_fd(self) -> OwnedFd {
        match self {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }

    /// A connected stream socket received from another process (a binary
    /// upgrade hands connections over), made non-blocking; its peer is read
    /// from the socket. Anything but a connected TCP or Unix stream socket
    /// is refused.
    pub fn from_handed(fd: OwnedFd) -> io::Result<(Stream, Peer)> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("handed fd: {what}"));
        if socket::getsockopt(&fd, socket::sockopt::SockType)? != SockType::Stream {
            return Err(invalid("not a stream socket"));
        }
        let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
        if local.as_unix_addr().is_some() {
            let s = StdUnixStream::from(fd);
            s.peer_addr()?;
            s.set_nonblocking(true)?;
            return Ok((Stream::Unix(UnixStream::from_std(s)), Peer::Unix));
        }
        if local.as_sockaddr_in().is_some() || local.as_sockaddr_in6().is_some() {
            let s = std::net::TcpStream::from(fd);
            let peer = s.peer_addr()?;
            s.set_nonblocking(true)?;
            return Ok((Stream::Tcp(TcpStream::from_std(s)), Peer::Ip(canonical_ip(peer))));
        }
        Err(invalid("not a TCP or Unix socket"))
    }

    /// Shuts the write side down (errors ignored: the peer may be gone).
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}

/// A listening socket, TCP or Unix.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listening socket.
    Tcp(TcpListener),
    /// A Unix listening socket.
    Unix(UnixListener),
}

/// The client's address as written into X-Forwarded-For: an IP, or
/// `unix` for a client on a Unix-domain listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer's address.
    Ip(IpAddr),
    /// A Unix socket peer (no address).
    Unix,
}

impl Listener {
    /// Wraps a listening socket fd received from the master (or bound here).
    pub fn from_fd(fd: OwnedFd, unix: bool) -> io::Result<Listener> {
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` comes from an OwnedFd we own (just released), so no
        // one else closes it; it is a listening socket of the given family,
        // checked by the caller against the fd manifest.
        Ok(if unix {
            let l = unsafe { StdUnixListener::from_raw_fd(raw) };
            l.set_nonblocking(true)?;
            Listener::Unix(UnixListener::from_std(l))
        } else {
            let l = unsafe { std::net::TcpListener::from_raw_fd(raw) };
            l.set_nonblocking(true)?;
            Listener::Tcp(TcpListener::from_std(l))
        })
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                // TCP_NODELAY is set later, only if the connection needs it
                // (see `Stream::set_nodelay`): one syscall less per
                // connection that is answered in one write and closed.
                let (s, a) = l.accept()?;
                Ok((Stream::Tcp(s), Peer::Ip(canonical_ip(a))))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }

    /// The socket's fd.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

fn canonical_ip(a: SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        ip @ IpAddr::V4(_) => ip,
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Unix(l) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Unix(l) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
            Listener::Unix(l) => l.deregister(r),
        }
    }
}

/// Binds a listening socket with the given backlog (mio's own bind has a
/// fixed one). TCP sockets get SO_REUSEADDR; a stale Unix socket file is
/// removed first. The fd is close-on-exec and non-blocking.
pub fn bind(addr: &ListenAddr, backlog: u32) -> io::Result<OwnedFd> {
    match &addr.0 {
        SockAddr::Tcp(a) => bind_tcp(*a, backlog, false),
        SockAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() && StdUnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
            }
            let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
            let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            socket::bind(fd.as_raw_fd(), &socket::UnixAddr::new(path.as_path())?)?;
            socket::listen(&fd, listen_backlog(backlog))?;
            Ok(fd)
        }
    }
}

/// The sockets of one listener: one shared by every worker, or with
/// `reuseport` `n` (at least one) `SO_REUSEPORT` sockets on the same
/// address (port 0: the port the first one got).
pub fn bind_listener(addr: &ListenAddr, backlog: u32, reuseport: bool, n: usize) -> io::Result<Vec<OwnedFd>> {
    let first = match (&addr.0, reuseport) {
        (SockAddr::Tcp(a), true) => bind_tcp(*a, backlog, true)?,
        (SockAddr::Unix(_), true) => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "reuseport is for TCP listeners"));
        }
        (_, false) => return Ok(vec![bind(addr, backlog)?]),
    };
    let mut fds = vec![first];
    grow_reuseport(&mut fds, n, backlog)?;
    Ok(fds)
}

/// Binds `SO_REUSEPORT` sockets on the address of `fds[0]` until there
/// are `n`. Sockets of one group must all have the option and one owner,
/// which the master is.
pub fn grow_reuseport(fds: &mut Vec<OwnedFd>, n: usize, backlog: u32) -> io::Result<()> {
    let Some(first) = fds.first() else { return Ok(()) };
    let at = local_addr(first.as_raw_fd()).ok_or_else(|| io::Error::other("reuseport socket has no address"))?;
    while fds.len() < n {
        fds.push(bind_tcp(at, backlog, true)?);
    }
    Ok(())
}

/// Does this listening socket have `SO_REUSEPORT`?
pub fn is_reuseport(fd: &OwnedFd) -> bool {
    socket::getsockopt(fd, socket::sockopt::ReusePort).unwrap_or(false)
}

fn listen_backlog(backlog: u32) -> Backlog {
    Backlog::new(backlog.min(i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN)
}

fn bind_tcp(a: SocketAddr, backlog: u32, reuseport: bool) -> io::Result<OwnedFd> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let family = if a.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, flags, None)?;
    socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
    if reuseport {
        socket::setsockopt(&fd, socket::sockopt::ReusePort, &true)?;
    }
    if a.is_ipv6() {
        socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(a))?;
    socket::listen(&fd, listen_backlog(backlog))?;
    Ok(fd)
}

/// The local address of a bound TCP listening fd (to report port 0 binds).
pub fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    let ss: SockaddrStorage = socket::getsockname(fd).ok()?;
    if let Some(v4) = ss.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    ss.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Readiness of one socket, as learnt from edge-triggered events: set by
/// events, cleared when an operation would block.
#[derive(Debug, Clone, Copy, Default)]
pub struct Readiness {
    /// Readable since the last `WouldBlock` on a read.
    pub readable: bool,
    /// Writable since the last `WouldBlock` on a write.
    pub writable: bool,
    /// The peer closed its side (EPOLLRDHUP) or the socket has an error:
    /// reads will not block any more, so `readable` stays set.
    pub read_closed: bool,
}

impl Readiness {
    /// Records what an event says is ready.
    pub fn update(&mut self, ev: &mio::event::Event) {
        if ev.is_readable() {
            self.readable = true;
        }
        if ev.is_writable() {
            self.writable = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.read_closed = true;
            self.readable = true;
        }
        if ev.is_write_closed() || ev.is_error() {
            self.writable = true;
        }
    }

    /// A read returned fewer bytes than asked, or would block.
    pub fn drained(&mut self) {
        if !self.read_closed {
            self.readable = false;
        }
    }
}

/// Changes the backlog of a listening socket (Linux applies a second
/// `listen(2)` to the queue in place).
pub fn set_backlog(fd: &OwnedFd, backlog: u32) -> io::Result<()> {
    socket::listen(fd, listen_backlog(backlog))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_fd_must_be_a_connected_stream_socket_and_keeps_its_peer() {
        // A connected TCP pair: the peer comes from the socket itself.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let (mut s, peer) = Stream::from_handed(OwnedFd::from(server)).unwrap();
        assert_eq!(peer, Peer::Ip(c.local_addr().unwrap().ip()));
        (&c).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        let n = loop {
            match s.read(&mut b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        assert_eq!((n, b[0]), (1, b'x'), "non-blocking, and the same connection");
        // A Unix stream pair.
        let (a, _b) = StdUnixStream::pair().unwrap();
        assert_eq!(Stream::from_handed(OwnedFd::from(a)).unwrap().1, Peer::Unix);
        // A datagram socket, and a listening socket (no peer), are refused.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(Stream::from_handed(OwnedFd::from(udp)).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(Stream::from_handed(OwnedFd::from(l)).is_err());
    }

    #[test]
    fn a_reuseport_listener_is_one_socket_per_worker_on_one_port() {
        let addr = ListenAddr(SockAddr::parse("127.0.0.1:0").unwrap());
        let mut fds = bind_listener(&addr, 16, true, 3).unwrap();
        let ports: Vec<_> = fds.iter().map(|f| local_addr(f.as_raw_fd()).unwrap()).collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| *p == ports[0] && p.port() != 0), "{ports:?}");
        assert!(fds.iter().all(is_reuseport));
        grow_reuseport(&mut fds, 4, 16).unwrap();
        assert_eq!(local_addr(fds[3].as_raw_fd()), Some(ports[0]));
        // A shared listener is one socket without the option, and no other
        // socket can join its address.
        let shared = bind_listener(&addr, 16, false, 3).unwrap();
        assert_eq!(shared.len(), 1);
        assert!(!is_reuseport(&shared[0]));
        let mut more = vec![shared.into_iter().next().unwrap()];
        assert!(grow_reuseport(&mut more, 2, 16).is_err());
        let unix = ListenAddr(SockAddr::parse("unix:/tmp/pitcher-never-bound.sock").unwrap());
        assert!(bind_listener(&unix, 16, true, 2).is_err());
    }
}
