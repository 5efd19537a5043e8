//! The `Tunnel` state: after a 101 Switching Protocols, bytes both ways
//! between the client and the backend connection it took from `Proxy`.
//! A FIN from either side is passed on once everything that side sent has
//! been delivered (half-close); the session ends when both directions are
//! closed, on any error, or after the idle timeout.

use std::io::{self, Write};

use super::core::Core;
use super::session::{count_received, read_into, Session};
use super::state::{Next, State, Step, Tunnel};

impl Core {
    /// `Tunnel`: moves bytes both ways until nothing can move, or both
    /// directions are closed (then the session closes).
    pub(super) fn step_tunnel(&mut self, s: &mut Session, mut t: Tunnel) -> Next {
        loop {
            let mut moved = false;
            let u = &mut self.ups[t.up];
            let Some(ubuf) = u.buf.as_mut() else { return (State::Tunnel(t), Step::Close) };
            // Backend to client.
            match s.write_client(ubuf.data()) {
                Ok((total, n)) => {
                    ubuf.consume(n);
                    moved |= total > 0;
                }
                Err(_) => return (State::Tunnel(t), Step::Close),
            }
            if !t.resp_eof && u.rd.readable && ubuf.room() > 0 {
                match read_into(&mut u.stream, &mut u.rd, ubuf) {
                    Ok(Some(0)) | Err(_) => {
                        t.resp_eof = true;
                        moved = true;
                    }
                    Ok(Some(_)) => moved = true,
                    Ok(None) => {}
                }
            }
            if t.resp_eof && ubuf.is_empty() && !s.out_pending() && !t.client_shut {
                s.stream.shutdown_write();
                t.client_shut = true;
                moved = true;
            }
            // Client to backend.
            let inb = s.inb.get_or_insert_with(|| self.bufs.get());
            while u.rd.writable && !inb.is_empty() {
                match u.stream.write(inb.data()) {
                    Ok(n) => {
                        inb.consume(n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => u.rd.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return (State::Tunnel(t), Step::Close),
                }
            }
            // TLS records to the backend the socket did not take yet.
            if u.rd.writable && u.stream.pending() {
                match u.stream.flush() {
                    Ok(true) => moved = true,
                    Ok(false) => u.rd.writable = false,
                    Err(_) => return (State::Tunnel(t), Step::Close),
                }
            }
            if !t.client_eof && s.rd.readable && inb.room() > 0 {
                match read_into(&mut s.stream, &mut s.rd, inb).inspect(count_received) {
                    Ok(Some(0)) | Err(_) => {
                        t.client_eof = true;
                        moved = true;
                    }
                    Ok(Some(_)) => moved = true,
                    Ok(None) => {}
                }
            }
            if t.client_eof && inb.is_empty() && !u.stream.pending() && !t.up_shut {
                u.stream.shutdown_write();
                t.up_shut = true;
                moved = true;
            }
            if t.client_shut && t.up_shut {
                return (State::Tunnel(t), Step::Close);
            }
            if moved {
                s.progressed = true;
            } else {
                return (State::Tunnel(t), Step::Blocked);
            }
        }
    }
}
