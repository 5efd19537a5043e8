//! What a request and a response look like after Pitcher: bodies in every
//! framing arrive intact, bodiless responses (HEAD, 204, 304) keep the
//! connection in sync, hop-by-hop headers are removed, X-Forwarded-* added,
//! Host and target passed through.

mod common;

use common::*;

const MIB: usize = 1 << 20;

/// A Pitcher in front of one backend, every request routed to it.
fn single(be: &Backend) -> Pitcher {
    ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start()
}

/// Answers with the length of the request body the backend received.
fn echo_len(req: &RecordedRequest) -> Reply {
    Reply::ok(format!("got {} bytes", req.body.len()))
}

#[test]
fn content_length_request_body_arrives_intact() {
    let be = Backend::with_handler("be", echo_len);
    let p = single(&be);
    let body = pseudo_random_bytes(MIB, 1);

    let mut c = p.client();
    let r = c.request(&request_bytes("POST", "h", "/upload", &[("Content-Type", "application/octet-stream")], &body));
    assert_ok_body(&r, format!("got {MIB} bytes").as_bytes());
    let got = be.last_request().expect("backend saw the request");
    assert_eq!(got.method, "POST");
    assert_eq!(got.body.len(), body.len());
    assert!(got.body == body, "request body corrupted on the way (first bytes {:?})", preview(&got.body));
    // Still usable afterwards.
    let r = c.get("h", "/after");
    assert_ok_body(&r, b"got 0 bytes");
}

#[test]
fn chunked_request_body_arrives_intact() {
    let be = Backend::with_handler("be", echo_len);
    let p = single(&be);
    let body = pseudo_random_bytes(MIB, 2);

    let mut raw = b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    // Chunks of uneven sizes, from 1 byte to more than one read buffer.
    let sizes = [1usize, 2, 3, 100, 4096, 65_536, 70_000, 7, 16_384];
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let n = sizes[i % sizes.len()].min(body.len() - at);
        raw.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        raw.extend_from_slice(&body[at..at + n]);
        raw.extend_from_slice(b"\r\n");
        at += n;
        i += 1;
    }
    raw.extend_from_slice(b"0\r\n\r\n");

    let mut c = p.client();
    let r = c.request(&raw);
    assert_ok_body(&r, format!("got {MIB} bytes").as_bytes());
    let got = be.last_request().expect("backend saw the request");
    assert_eq!(got.body.len(), body.len());
    assert!(got.body == body, "chunked request body corrupted (first bytes {:?})", preview(&got.body));
    let r = c.get("h", "/after");
    assert_ok_body(&r, b"got 0 bytes");
}

#[test]
fn content_length_response_body_arrives_intact() {
    let big = pseudo_random_bytes(MIB, 3);
    let served = big.clone();
    let be =
        Backend::with_handler(
            "be",
            move |req| {
                if req.path() == "/big" {
                    Reply::ok(served.clone())
                } else {
                    Reply::ok("small")
                }
            },
        );
    let p = single(&be);

    let mut c = p.client();
    let r = c.get("h", "/big");
    assert_ok_body(&r, &big);
    let r = c.get("h", "/small");
    assert_ok_body(&r, b"small");
}

#[test]
fn chunked_response_body_arrives_intact() {
    let chunks: Vec<Vec<u8>> = [1usize, 10, 1000, 65_536, 100_000, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| pseudo_random_bytes(n, 10 + i as u64))
        .collect();
    let whole: Vec<u8> = chunks.concat();
    let be = Backend::with_handler("be", move |req| {
        if req.path() == "/chunked" {
            Reply::chunked(200, chunks.clone()).with_trailer("X-Checksum", "abc")
        } else {
            Reply::ok("small")
        }
    });
    let p = single(&be);

    let mut c = p.client();
    let r = c.get("h", "/chunked");
    assert_ok_body(&r, &whole);
    let r = c.get("h", "/small");
    assert_ok_body(&r, b"small");
}

#[test]
fn close_delimited_response_body_arrives_intact() {
    let body = pseudo_random_bytes(300 * 1024, 4);
    let served = body.clone();
    let be = Backend::with_handler("be", move |req| {
        if req.path() == "/eof" {
            Reply::close_delimited(200, served.clone())
        } else {
            Reply::ok("small")
        }
    });
    let p = single(&be);

    let mut c = p.client();
    let r = c.get("h", "/eof");
    assert_ok_body(&r, &body);
    match r.framing {
        // Read until Pitcher closed: nothing more to check.
        Framing::Close => {}
        // Re-framed (chunked, or a length): the connection must be in sync.
        Framing::Chunked | Framing::Length(_) => {
            if !r.says_close() {
                let r2 = c.get("h", "/small");
                assert_ok_body(&r2, b"small");
            }
        }
        Framing::None => panic!("a 200 to GET without a body framing"),
    }
}

#[test]
fn head_response_has_no_body() {
    let be = Backend::with_handler("be", |_| Reply::ok("hello world"));
    let p = single(&be);

    let mut c = p.client();
    let r = c.request(b"HEAD /thing HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head_str());
    assert!(r.body.is_empty());
    assert_eq!(be.last_request().unwrap().method, "HEAD");
    // Had Pitcher sent (or waited for) 11 body bytes, this would break.
    let r = c.get("h", "/thing");
    assert_ok_body(&r, b"hello world");
    assert_eq!(be.requests(), 2);
}

#[test]
fn no_content_204_has_no_body_and_keeps_connection_in_sync() {
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/204" {
            Reply::status(204, "").with_header("X-Kind", "none")
        } else {
            Reply::ok("after")
        }
    });
    let p = single(&be);

    let mut c = p.client();
    for _ in 0..3 {
        let r = c.get("h", "/204");
        assert_eq!(r.status_line(), "HTTP/1.1 204 No Content", "{}", r.head_str());
        assert_eq!(r.header("x-kind"), Some("none"));
        assert!(r.header("transfer-encoding").is_none(), "204 with Transfer-Encoding:\n{}", r.head_str());
        let r = c.get("h", "/next");
        assert_ok_body(&r, b"after");
    }
}

#[test]
fn not_modified_304_has_no_body_and_keeps_connection_in_sync() {
    // A 304 may carry the Content-Length of the representation; it still
    // has no body.
    let be = Backend::with_handler("be", |req| {
        if req.path() == "/304" {
            Reply::status(304, "").with_header("ETag", "\"v1\"").with_header("Content-Length", "1234")
        } else {
            Reply::ok("after")
        }
    });
    let p = single(&be);

    let mut c = p.client();
    for _ in 0..3 {
        let r = c.request(&request_bytes("GET", "h", "/304", &[("If-None-Match", "\"v1\"")], b""));
        assert_eq!(r.status, 304, "{}", r.head_str());
        assert_eq!(r.header("etag"), Some("\"v1\""));
        let r = c.get("h", "/next");
        assert_ok_body(&r, b"after");
    }
    assert_eq!(be.recorded()[0].header("if-none-match"), Some("\"v1\""));
}

#[test]
fn hop_by_hop_request_headers_are_removed() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    let r = c.request(
        b"GET /hop HTTP/1.1\r\n\
          Host: h\r\n\
          Connection: keep-alive, X-Secret\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Trailer: X-Checksum\r\n\
          Proxy-Connection: keep-alive\r\n\
          Upgrade: h2c\r\n\
          X-Secret: 42\r\n\
          X-Kept: yes\r\n\
          \r\n",
    );
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    for h in ["connection", "keep-alive", "te", "trailer", "proxy-connection", "upgrade", "x-secret"] {
        assert!(!got.headers.has(h), "backend received hop-by-hop header {h:?}:\n{}", got.head_str());
    }
    assert_eq!(got.header("x-kept"), Some("yes"), "end-to-end header lost:\n{}", got.head_str());
}

#[test]
fn hop_by_hop_response_headers_are_removed() {
    let be = Backend::with_handler("be", |_| {
        Reply::ok("body")
            .with_header("Connection", "keep-alive, X-Internal")
            .with_header("Keep-Alive", "timeout=5, max=100")
            .with_header("Proxy-Connection", "keep-alive")
            .with_header("X-Internal", "secret")
            .with_header("X-Public", "yes")
    });
    let p = single(&be);

    let mut c = p.client();
    for _ in 0..2 {
        let r = c.get("h", "/");
        assert_ok_body(&r, b"body");
        for h in ["keep-alive", "proxy-connection", "x-internal"] {
            assert!(!r.headers.has(h), "client received hop-by-hop header {h:?}:\n{}", r.head_str());
        }
        // Pitcher's own Connection handling is allowed; nothing else in it.
        for t in r.headers.tokens("connection") {
            assert!(t == "keep-alive" || t == "close", "Connection token {t:?} passed through:\n{}", r.head_str());
        }
        assert_eq!(r.header("x-public"), Some("yes"));
    }
}

#[test]
fn x_forwarded_for_is_appended() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    c.request(&request_bytes("GET", "h", "/", &[("X-Forwarded-For", "1.2.3.4")], b""));
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.joined("x-forwarded-for").as_deref(), Some("1.2.3.4, 127.0.0.1"), "{}", got.head_str());
}

#[test]
fn x_forwarded_for_is_created_when_absent() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    c.get("h", "/");
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("x-forwarded-for"), vec!["127.0.0.1"], "{}", got.head_str());
}

#[test]
fn x_forwarded_proto_is_http_and_overwrites_the_client_value() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    c.get("h", "/plain");
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("x-forwarded-proto"), vec!["http"], "{}", got.head_str());

    c.request(&request_bytes("GET", "h", "/spoofed", &[("X-Forwarded-Proto", "https")], b""));
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("x-forwarded-proto"), vec!["http"], "{}", got.head_str());
}

#[test]
fn each_request_gets_a_unique_request_id_and_a_client_id_is_kept() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    let mut ids = std::collections::HashSet::new();
    for i in 0..20 {
        c.get("h", &format!("/{i}"));
        let got = be.last_request().unwrap();
        let id = got.headers.get_all("x-request-id");
        assert_eq!(id.len(), 1, "{}", got.head_str());
        assert!(id[0].len() == 16 && id[0].bytes().all(|b| b.is_ascii_hexdigit()), "{}", got.head_str());
        assert!(ids.insert(id[0].to_string()), "id {} given twice", id[0]);
    }
    c.request(&request_bytes("GET", "h", "/traced", &[("X-Request-Id", "from-the-edge-42")], b""));
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("x-request-id"), vec!["from-the-edge-42"], "{}", got.head_str());
}

#[test]
fn host_header_and_target_are_passed_through_unchanged() {
    let be = Backend::start("be");
    let p = single(&be);

    let mut c = p.client();
    let target = "/a/b%20c/./d?x=1&y=%2F&z";
    let r = c.request(format!("GET {target} HTTP/1.1\r\nHost: Mixed.Example.COM:8080\r\n\r\n").as_bytes());
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("host"), vec!["Mixed.Example.COM:8080"], "{}", got.head_str());
    assert_eq!(got.target, target);
    assert_eq!(got.method, "GET");
    assert_eq!(got.version, "HTTP/1.1");
}

/// A client that asks for the connection to close gets every byte of the
/// response, then the end of the stream. Pitcher writes such a response's
/// last bytes with `MSG_MORE` so that its FIN leaves in the same segment;
/// that must never hold bytes back or lose them, however the response
/// ends: one write, many writes to a slow reader (chunked, not spliced),
/// a spliced body, no body (HEAD), HTTP/1.0, and a client that breaks its
/// own `Connection: close` by sending another request at once.
#[test]
fn a_client_that_asks_to_close_gets_the_whole_response_then_eof() {
    let big = pseudo_random_bytes(2 * MIB, 7);
    let served = big.clone();
    let be = Backend::with_handler("be", move |req| match req.path() {
        "/small" => Reply::ok("small"),
        "/chunked" => Reply::chunked(200, served.chunks(65536).map(<[u8]>::to_vec).collect()),
        _ => Reply::ok(served.clone()),
    });
    let p = single(&be);
    let close = [("Connection", "close")];

    for (method, path, want) in [
        ("GET", "/small", &b"small"[..]),
        ("GET", "/chunked", &big[..]),
        ("GET", "/length", &big[..]),
        ("HEAD", "/small", b""),
    ] {
        let mut c = Client::connect(p.addr());
        let r = c.request(&request_bytes(method, "h", path, &close, b""));
        assert_eq!(r.status, 200, "{method} {path}: {}", r.status_line());
        assert!(r.says_close(), "{method} {path}: no Connection: close in {:?}", r.headers);
        assert!(r.body == want, "{method} {path}: {} bytes, want {}", r.body.len(), want.len());
        assert_eq!(c.read_to_eof().expect("read to EOF"), b"", "{method} {path}: bytes after the response");
    }

    // A slow reader: the proxy's writes block, and the last one is made
    // once the client has read room free.
    let mut c = Client::connect(p.addr());
    c.send(&request_bytes("GET", "h", "/chunked", &close, b""));
    let mut r = c.read_head();
    std::thread::sleep(std::time::Duration::from_millis(300));
    c.read_body(&mut r);
    assert!(r.body == big, "slow reader: {} bytes, want {}", r.body.len(), big.len());
    assert_eq!(c.read_to_eof().expect("read to EOF"), b"", "slow reader: bytes after the response");

    // HTTP/1.0 without keep-alive closes too.
    let mut c = Client::connect(p.addr());
    c.send(b"GET /small HTTP/1.0\r\nHost: h\r\n\r\n");
    let r = c.read_response();
    assert_ok_body(&r, b"small");
    assert_eq!(c.read_to_eof().expect("read to EOF"), b"", "HTTP/1.0: bytes after the response");

    // Another request behind `Connection: close`, in the same packet: the
    // first is answered whole, the second dropped (not a reset that would
    // destroy the answer on its way).
    let mut c = Client::connect(p.addr());
    let mut two = request_bytes("GET", "h", "/small", &close, b"");
    two.extend_from_slice(&get_request("h", "/small"));
    c.send(&two);
    let r = c.read_response();
    assert_ok_body(&r, b"small");
    assert_eq!(c.read_to_eof().expect("read to EOF"), b"", "pipelined after close: bytes after the response");

    // An answer Pitcher makes itself (a module's refusal here) goes the
    // same way: whole, then EOF.
    let limited = ConfigBuilder::new()
        .cluster("app", [be.spec()])
        .route(None, "/", "app")
        .section("[modules.throttle]\nrate_per_sec = 1\nburst = 1\nstatus = 429\nretry_after_secs = 9\n")
        .start();
    let mut refused = 0;
    for i in 0..4 {
        let mut c = Client::connect(limited.addr());
        let r = c.request(&request_bytes("GET", "h", "/small", &close, b""));
        assert!(r.says_close(), "request {i}: no Connection: close in {:?}", r.headers);
        match r.status {
            200 => assert_ok_body(&r, b"small"),
            429 => {
                refused += 1;
                assert_eq!(r.header("retry-after"), Some("9"), "request {i}: {:?}", r.headers);
            }
            s => panic!("request {i}: status {s}"),
        }
        assert_eq!(c.read_to_eof().expect("read to EOF"), b"", "request {i}: bytes after the response");
    }
    assert!(refused >= 2, "the throttle (1/s, burst 1) refused {refused} of 4 requests");
}

/// An interim response (103 Early Hints) to a client that asked to close
/// is not the end of the connection: it reaches the client while the
/// backend still works on the final response, not held back until that
/// one is written.
#[test]
fn an_interim_response_to_a_client_that_asks_to_close_is_not_held_back() {
    use std::io::Write;
    use std::sync::mpsc;
    use std::sync::Mutex;
    let (go, wait) = mpsc::channel::<()>();
    let wait = Mutex::new(wait);
    let be = ScriptedBackend::start(move |mut s, _| {
        if read_head_exact(&mut s).ok().flatten().is_none() {
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n");
        // The final answer only once the client has seen the 103.
        let _ = wait.lock().unwrap().recv_timeout(IO_TIMEOUT);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal");
    });
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();
    let mut s = std::net::TcpStream::connect(p.addr()).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(&request_bytes("GET", "h", "/", &[("Connection", "close")], b"")).expect("send");
    let hint = read_head_exact(&mut s).expect("read the 103").expect("closed before the 103");
    assert!(hint.starts_with(b"HTTP/1.1 103 "), "{}", String::from_utf8_lossy(&hint));
    go.send(()).expect("backend gone");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut rest).expect("read to EOF");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200 ") && rest.ends_with("\r\n\r\nfinal"), "{rest}");
}
