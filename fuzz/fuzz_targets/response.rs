//! Response side: the head a backend sends (`ResponseHead::parse`), its
//! framing (`ResponseHead::framing`) and the chunked decoding done for
//! HTTP/1.0 clients.
//!
//! Input: one control byte (HEAD request or not, split point), then the
//! bytes of the response. Besides "no panic, no hang, no leak":
//! - the head Pitcher writes for the client parses again to the same status
//!   and framing;
//! - a chunked body gives the same result passed through (`scan_through`)
//!   or decoded (`scan_framing` + data), whole or in two pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pitcher::http::write::{response_head, ConnHeader, OutFraming};
use pitcher::http::{ChunkedScanner, Framing, ResponseHead};

fuzz_target!(|input: &[u8]| {
    let Some((&knob, raw)) = input.split_first() else { return };
    let head_request = knob & 1 != 0;
    let mut resp = ResponseHead::default();
    let Ok(Some(n)) = resp.parse(raw, 256) else { return };
    assert!(n <= raw.len());
    let _ = (resp.reason(), resp.keep_alive());
    let Ok(framing) = resp.framing(head_request) else { return };

    let out_framing = match framing {
        Framing::None => OutFraming::None,
        Framing::Length(l) => OutFraming::Length(l),
        Framing::Chunked => OutFraming::Chunked,
        Framing::Close => OutFraming::Close,
    };
    let mut out = Vec::new();
    response_head(&mut out, &resp, out_framing, ConnHeader::Default);
    let mut again = ResponseHead::default();
    match again.parse(&out, 256) {
        Ok(Some(m)) => assert_eq!(m, out.len()),
        other => panic!("forwarded head does not parse ({other:?}):\n{}", String::from_utf8_lossy(&out)),
    }
    assert_eq!(again.status, resp.status);
    assert_eq!(again.framing(head_request).ok(), Some(framing), "{}", String::from_utf8_lossy(&out));

    if framing == Framing::Chunked {
        let body = &raw[n..];
        let split = usize::from(knob >> 1).wrapping_mul(17) % (body.len() + 1);
        check_chunked(body, split);
    }
});

fn check_chunked(body: &[u8], split: usize) {
    let mut pass = ChunkedScanner::new();
    let pass_res = pass.scan_through(body);

    // Decode in two pieces, as for an HTTP/1.0 client.
    let mut dec = ChunkedScanner::new();
    let mut consumed = 0;
    let mut data = 0u64;
    let mut failed = false;
    'pieces: for piece in [&body[..split], &body[split..]] {
        let mut i = 0;
        while i < piece.len() && !dec.is_done() {
            match dec.scan_framing(&piece[i..]) {
                Ok(k) => i += k,
                Err(_) => {
                    failed = true;
                    break 'pieces;
                }
            }
            let d = dec.data_left().min((piece.len() - i) as u64) as usize;
            dec.consume_data(d);
            data += d as u64;
            i += d;
        }
        consumed += i;
        if dec.is_done() {
            break;
        }
    }
    match pass_res {
        Ok(k) => {
            assert!(!failed, "decoding failed where passing through did not");
            assert_eq!(dec.is_done(), pass.is_done());
            if pass.is_done() {
                assert_eq!(consumed, k);
                assert_eq!(data, pass.data_total);
            }
        }
        Err(_) => assert!(failed, "decoding accepted what passing through refused"),
    }
}
