//! Request side: the head a client sends (`RequestHead::parse`), then its
//! body framing (`ChunkedScanner`).
//!
//! Input: one control byte (header limit, split point, upgrade flag), then
//! the bytes of the request. Besides "no panic, no hang, no leak":
//! - the head Pitcher writes for the backend parses again to the same
//!   method, target, host and framing (nothing a client sends can make
//!   Pitcher forward an ambiguous or different request);
//! - a chunked body is judged the same scanned whole or in two pieces;
//! - its re-framed form is canonical chunked coding carrying the same data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pitcher::http::write::request_head;
use pitcher::http::{ChunkedScanner, Framing, RequestHead};

fuzz_target!(|input: &[u8]| {
    let Some((&knob, raw)) = input.split_first() else { return };
    let max_headers = 1 + usize::from(knob & 0x3f);
    let mut req = RequestHead::default();
    let Ok(Some(n)) = req.parse(raw, max_headers) else { return };
    assert!(n <= raw.len());
    let target = req.target().to_vec();
    assert!(target.starts_with(b"/") || target == b"*", "target {:?}", String::from_utf8_lossy(&target));
    let _ = (req.path(), req.keep_alive(), req.is_head());

    let mut out = Vec::new();
    request_head(&mut out, &req, None, knob & 0x40 != 0);
    let mut again = RequestHead::default();
    match again.parse(&out, 256) {
        Ok(Some(m)) => assert_eq!(m, out.len()),
        other => panic!("forwarded head does not parse ({other:?}):\n{}", String::from_utf8_lossy(&out)),
    }
    assert_eq!(again.method(), req.method());
    assert_eq!(again.target(), &target[..]);
    assert_eq!(again.host(), req.host());
    assert_eq!(again.framing(), req.framing());

    if req.framing() == Framing::Chunked {
        let body = &raw[n..];
        let split = usize::from(knob).wrapping_mul(31) % (body.len() + 1);
        check_chunked(body, split);
    }
});

/// Scans `body` whole and split at `split` (as reads may cut it), and
/// re-frames it in those two pieces.
fn check_chunked(body: &[u8], split: usize) {
    let mut whole = ChunkedScanner::new();
    let whole_res = whole.scan_through(body);

    let mut two = ChunkedScanner::new();
    let two_res = two.scan_through(&body[..split]).and_then(|a| {
        if a < split {
            assert!(two.is_done(), "stopped early without finishing");
            Ok(a)
        } else {
            two.scan_through(&body[split..]).map(|b| a + b)
        }
    });
    match (&whole_res, &two_res) {
        (Ok(x), Ok(y)) => {
            assert_eq!(x, y);
            assert_eq!(whole.is_done(), two.is_done());
            assert_eq!(whole.data_total, two.data_total);
        }
        (Err(_), Err(_)) => {}
        _ => panic!("whole {whole_res:?} vs split at {split} {two_res:?}"),
    }

    // Re-frame as the proxy does: framing translated, data copied as is.
    let mut rf = ChunkedScanner::new();
    let mut out = Vec::new();
    let mut data = Vec::new();
    let mut failed = false;
    'pieces: for piece in [&body[..split], &body[split..]] {
        let mut i = 0;
        while i < piece.len() && !rf.is_done() {
            match rf.reframe(&piece[i..], &mut out) {
                Ok(k) => i += k,
                Err(_) => {
                    failed = true;
                    break 'pieces;
                }
            }
            let d = rf.data_left().min((piece.len() - i) as u64) as usize;
            out.extend_from_slice(&piece[i..i + d]);
            data.extend_from_slice(&piece[i..i + d]);
            rf.consume_data(d);
            i += d;
        }
    }
    assert_eq!(failed, whole_res.is_err(), "reframe and scan disagree");
    assert_eq!(rf.is_done(), whole.is_done() && !failed);
    if !rf.is_done() {
        return;
    }
    // The re-framed body decodes to the same data, and is all consumed.
    let mut dec = ChunkedScanner::new();
    let mut decoded = Vec::new();
    let mut i = 0;
    while !dec.is_done() {
        i += dec.scan_framing(&out[i..]).expect("re-framed body is not valid chunked coding");
        let d = dec.data_left().min((out.len() - i) as u64) as usize;
        assert!(dec.is_done() || i < out.len(), "re-framed body ends early");
        decoded.extend_from_slice(&out[i..i + d]);
        dec.consume_data(d);
        i += d;
    }
    assert_eq!(i, out.len());
    assert_eq!(decoded, data);
    assert_eq!(dec.data_total, data.len() as u64);
}
