//! Request bodies that trickle: a body holds a backend connection while it
//! arrives, so one that comes slower than `client_body_min_rate_bytes` (per
//! second, over windows of `client_body_rate_window_ms`) or takes longer
//! than `client_body_total_ms` is answered 408 and its backend connection
//! closed, while other clients are served.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

const TRICKLERS: usize = 20;

/// A backend that reads a head and its Content-Length body; counts the
/// connections closed on it before their body was complete.
fn counting_backend(closed_early: Arc<AtomicUsize>) -> ScriptedBackend {
    ScriptedBackend::start(move |mut s: TcpStream, _| {
        use std::io::Write;
        while let Ok(Some(head)) = read_head_exact(&mut s) {
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut got = 0;
            let mut buf = [0u8; 1024];
            while got < length {
                match s.read(&mut buf[..(length - got).min(1024)]) {
                    Ok(0) | Err(_) => {
                        closed_early.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => got += n,
                }
            }
            let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}", path.len());
            if s.write_all(r.as_bytes()).is_err() {
                return;
            }
        }
    })
}

fn proxy(b: &ScriptedBackend, timeouts: &str) -> Pitcher {
    ConfigBuilder::new()
        .cluster_with("app", [b.spec()], "keepalive = 8\nretries = 0")
        .route(None, "/", "app")
        .section(&format!("[timeouts]\nclient_body_ms = 10000\n{timeouts}"))
        .start()
}

/// Starts `TRICKLERS` clients that send a head announcing 1000 bytes, then
/// one byte every 200 ms until the backend saw all their connections
/// closed (or 8 s passed); returns the clients.
fn trickle(p: &Pitcher, closed_early: &AtomicUsize) -> Vec<Client> {
    let mut clients: Vec<Client> = (0..TRICKLERS)
        .map(|_| {
            let mut c = p.client();
            c.send(b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1000\r\n\r\n");
            c
        })
        .collect();
    for _ in 0..40 {
        if closed_early.load(Ordering::SeqCst) == TRICKLERS {
            break;
        }
        for c in &mut clients {
            let _ = c.try_send(b"x");
        }
        thread::sleep(Duration::from_millis(200));
    }
    clients
}

#[test]
fn bodies_below_the_minimum_rate_are_408_and_release_their_backend_connections() {
    let closed_early = Arc::new(AtomicUsize::new(0));
    let b = counting_backend(closed_early.clone());
    let p =
        proxy(&b, "client_body_min_rate_bytes = 100\nclient_body_rate_window_ms = 500\nclient_body_total_ms = 60000");
    let mut normal = p.client();
    assert_ok_body(&normal.get("example.com", "/before"), b"/before");
    let clients = trickle(&p, &closed_early);
    assert_eq!(closed_early.load(Ordering::SeqCst), TRICKLERS, "the backend still holds trickling bodies");
    for mut c in clients {
        let r = c.read_response();
        assert_error_response(&r, 408);
    }
    assert_ok_body(&normal.get("example.com", "/after"), b"/after");
    assert_ok_body(&p.client().get("example.com", "/new"), b"/new");
}

#[test]
fn bodies_over_the_total_time_are_408_even_at_a_good_rate() {
    let closed_early = Arc::new(AtomicUsize::new(0));
    let b = counting_backend(closed_early.clone());
    // No minimum rate; 1.5 s for the whole body.
    let p = proxy(&b, "client_body_min_rate_bytes = 0\nclient_body_rate_window_ms = 500\nclient_body_total_ms = 1500");
    let clients = trickle(&p, &closed_early);
    assert_eq!(closed_early.load(Ordering::SeqCst), TRICKLERS, "the backend still holds trickling bodies");
    for mut c in clients {
        assert_error_response(&c.read_response(), 408);
    }
    assert_ok_body(&p.client().get("example.com", "/new"), b"/new");
}

#[test]
fn a_body_at_a_sufficient_rate_goes_through() {
    let closed_early = Arc::new(AtomicUsize::new(0));
    let b = counting_backend(closed_early.clone());
    let p =
        proxy(&b, "client_body_min_rate_bytes = 50\nclient_body_rate_window_ms = 1000\nclient_body_total_ms = 60000");
    let mut c = p.client();
    c.send(b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1000\r\n\r\n");
    // 100 bytes every 100 ms: 1000 bytes/s, over several windows.
    for _ in 0..10 {
        c.send(&[b'y'; 100]);
        thread::sleep(Duration::from_millis(100));
    }
    assert_ok_body(&c.read_response(), b"/upload");
    assert_eq!(closed_early.load(Ordering::SeqCst), 0);
}
