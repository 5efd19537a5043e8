//! A backend scripted by the test, for cases the recording [`super::Backend`]
//! cannot play: answer 101 and then echo bytes, send part of a response and
//! reset, answer before reading the body. Each accepted TCP connection is
//! handed, with its 1-based index, to the script on a thread of its own.
//! Accepted sockets have read and write timeouts; dropping the handle stops
//! accepting and shuts every connection down.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::IO_TIMEOUT;

type Script = dyn Fn(TcpStream, usize) + Send + Sync;

/// A running scripted backend. See the module documentation.
pub struct ScriptedBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    /// Clones of the live connections, to shut them down on drop. A
    /// connection's entry goes when its script returns, so that the socket
    /// really closes then (with RST if input was left unread).
    live: Arc<Mutex<HashMap<usize, TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl ScriptedBackend {
    /// Listens on 127.0.0.1 (port chosen by the kernel) and runs `script`
    /// for each connection.
    pub fn start<F>(script: F) -> ScriptedBackend
    where
        F: Fn(TcpStream, usize) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("scripted backend local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let live = Arc::new(Mutex::new(HashMap::new()));
        let script: Arc<Script> = Arc::new(script);
        let (st, cn, lv) = (stop.clone(), count.clone(), live.clone());
        let acceptor = thread::Builder::new()
            .name("scripted-backend-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_nodelay(true);
                    let n = cn.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Ok(c) = stream.try_clone() {
                        lv.lock().unwrap().insert(n, c);
                    }
                    let s = script.clone();
                    let lv = lv.clone();
                    let _ = thread::Builder::new().name(format!("scripted-backend-{n}")).spawn(move || {
                        s(stream, n);
                        lv.lock().unwrap().remove(&n);
                    });
                }
            })
            .expect("spawn scripted backend acceptor");
        ScriptedBackend { addr, stop, count, live, acceptor: Some(acceptor) }
    }

    /// The address to put in a cluster's `backends`.
    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Reads one head up to and including CRLF CRLF a byte at a time, so that
/// nothing after it (a body, pipelined bytes) is taken from the socket.
/// `Ok(None)` at end of stream before a complete head.
pub fn read_head_exact(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Ok(None);
        }
        head.push(b[0]);
        if head.len() > super::http::MAX_HEAD_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
    }
    Ok(Some(head))
}
