//! `pitcher-records`: a small receiver of the access log's protobuf records
//! (`[modules.access_log] records = "tcp:..."` or `"unix:..."`). It listens
//! on a TCP address or a Unix stream socket, takes any number of worker
//! connections, decodes the length-delimited `AccessRecord`s
//! (`proto/access_record.proto`) and prints each as one JSON line on
//! stdout — the line the JSON access log format writes for that request.
//!
//! ```text
//! pitcher-records tcp:127.0.0.1:9500
//! pitcher-records unix:/run/pitcher-records.sock
//! ```
//!
//! The bound address is printed on stderr (`listening on tcp:...`): with
//! port 0 the kernel picks one. A connection that ends inside a record is
//! reported on stderr; the cut record is not printed.
//!
//! Acknowledgements: whenever it has printed every record it has read so
//! far, the receiver writes back the number of records printed on the
//! connection (8 bytes, little-endian). The sender counts the records it
//! wrote that were never acknowledged as dropped when the connection ends,
//! so records lost in a killed receiver's socket buffer are counted too.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use pitcher::hooks::modules::access_log::record::AccessRecord;
use prost::Message;

/// A record larger than this is refused (the connection is closed).
const MAX_RECORD_BYTES: usize = 1024 * 1024;

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let out = Arc::new(Mutex::new(io::stdout()));
    let result = if let Some(a) = arg.strip_prefix("tcp:") {
        TcpListener::bind(a).and_then(|l| {
            eprintln!("listening on tcp:{}", l.local_addr()?);
            accept_all(l.incoming(), &out);
            Ok(())
        })
    } else if let Some(p) = arg.strip_prefix("unix:") {
        let _ = std::fs::remove_file(p);
        UnixListener::bind(p).map(|l| {
            eprintln!("listening on unix:{p}");
            accept_all(l.incoming(), &out);
        })
    } else {
        eprintln!("usage: pitcher-records tcp:IP:PORT | unix:/path");
        std::process::exit(2);
    };
    if let Err(e) = result {
        eprintln!("pitcher-records: {arg}: {e}");
        std::process::exit(1);
    }
}

/// Serves every connection of a listener, each on its own thread.
fn accept_all<C: Read + Write + Send + 'static>(
    incoming: impl Iterator<Item = io::Result<C>>,
    out: &Arc<Mutex<io::Stdout>>,
) {
    for c in incoming {
        match c {
            Ok(c) => {
                let out = out.clone();
                std::thread::spawn(move || serve(c, &out));
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

/// Prints the records of one connection until it ends, acknowledging
/// them each time nothing read is left unprinted.
fn serve(c: impl Read + Write, out: &Mutex<io::Stdout>) {
    let mut r = BufReader::new(c);
    let mut buf = Vec::new();
    let mut printed: u64 = 0;
    loop {
        match read_record(&mut r, &mut buf) {
            Ok(Some(rec)) => {
                let line = rec.to_json();
                let Ok(mut o) = out.lock() else { return };
                if writeln!(o, "{line}").and_then(|()| o.flush()).is_err() {
                    return;
                }
                drop(o);
                printed += 1;
                if r.buffer().is_empty() && r.get_mut().write_all(&printed.to_le_bytes()).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                eprintln!("connection ended inside a record: {e}");
                return;
            }
        }
    }
}

/// One length-delimited record; `None` at a clean end of stream.
fn read_record(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<AccessRecord>> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            if i == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_RECORD_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a record of {len} bytes")));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    AccessRecord::decode(buf.as_slice()).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
