//! Request smuggling is impossible through Pitcher: every request whose
//! framing a backend could read differently is answered by Pitcher itself
//! with 400 (501 for a transfer coding it does not implement), the
//! connection is closed, and the backend sees nothing of it. What Pitcher
//! does forward is re-framed by Pitcher.

mod common;

use std::time::Duration;

use common::*;

/// A Pitcher in front of one recording backend, every request routed to it.
fn proxy() -> (Backend, Pitcher) {
    let be = Backend::start("be");
    let p = ConfigBuilder::new().cluster("app", [be.spec()]).route(None, "/", "app").start();
    (be, p)
}

/// Sends `raw` in one write on a fresh connection and asserts that Pitcher
/// answers `status` itself with `Connection: close`, closes the connection
/// without another byte, that the backend saw no connection at all, and
/// that Pitcher still serves a well-formed request afterwards.
fn assert_refused(raw: &[u8], status: u16) {
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(raw);
    let r = c.read_response();
    assert_error_response(&r, status);
    assert!(r.says_close(), "refusal without Connection: close:\n{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after refusing {:?}", String::from_utf8_lossy(raw));
    assert_eq!(be.connections(), 0, "the backend was connected to for {:?}", String::from_utf8_lossy(raw));
    assert_eq!(be.requests(), 0);
    assert_ok_body(&get_once(p.addr(), "h", "/after"), b"ok from be");
    assert_eq!(be.requests(), 1);
}

/// `POST / HTTP/1.1` with Host and these extra head lines, then `body`.
fn post(lines: &str, body: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: h\r\n{lines}\r\n{body}").into_bytes()
}

// --- Content-Length and Transfer-Encoding together or malformed ---

#[test]
fn content_length_and_transfer_encoding_together_is_400() {
    assert_refused(
        &post(
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
        ),
        400,
    );
}

#[test]
fn transfer_encoding_before_content_length_is_400() {
    assert_refused(&post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn two_differing_content_length_fields_is_400() {
    assert_refused(&post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"), 400);
}

#[test]
fn differing_content_lengths_in_one_field_is_400() {
    assert_refused(&post("Content-Length: 5, 6\r\n", "hello!"), 400);
}

#[test]
fn plus_signed_content_length_is_400() {
    assert_refused(&post("Content-Length: +5\r\n", "hello"), 400);
}

#[test]
fn negative_content_length_is_400() {
    assert_refused(&post("Content-Length: -1\r\n", ""), 400);
}

#[test]
fn hexadecimal_content_length_is_400() {
    assert_refused(&post("Content-Length: 0x5\r\n", "hello"), 400);
}

#[test]
fn content_length_with_a_space_inside_is_400() {
    assert_refused(&post("Content-Length: 1 0\r\n", "0123456789"), 400);
}

#[test]
fn empty_content_length_is_400() {
    assert_refused(&post("Content-Length: \r\n", ""), 400);
}

#[test]
fn content_length_with_trailing_comma_is_400() {
    assert_refused(&post("Content-Length: 5,\r\n", "hello"), 400);
}

#[test]
fn content_length_too_long_to_be_a_number_is_400() {
    assert_refused(&post("Content-Length: 99999999999999999999999\r\n", ""), 400);
}

// --- Transfer-Encoding whose final coding is not exactly chunked ---

#[test]
fn transfer_encoding_xchunked_is_501() {
    assert_refused(&post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), 501);
}

#[test]
fn transfer_encoding_gzip_alone_is_501() {
    assert_refused(&post("Transfer-Encoding: gzip\r\n", "0\r\n\r\n"), 501);
}

#[test]
fn transfer_encoding_gzip_then_chunked_is_501() {
    // Pitcher re-frames bodies as chunked only; it cannot pass a gzip
    // transfer coding on, and must not drop it silently.
    assert_refused(&post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"), 501);
}

#[test]
fn transfer_encoding_chunked_then_identity_is_400() {
    assert_refused(&post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_chunked_twice_in_one_field_is_400() {
    assert_refused(&post("Transfer-Encoding: chunked, chunked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_chunked_in_two_fields_is_400() {
    assert_refused(&post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_with_a_space_inside_chunked_is_400() {
    assert_refused(&post("Transfer-Encoding: chun ked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_with_a_parameter_on_chunked_is_400() {
    assert_refused(&post("Transfer-Encoding: chunked;q=1\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_with_an_empty_list_element_is_400() {
    assert_refused(&post("Transfer-Encoding: ,chunked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn empty_transfer_encoding_is_400() {
    assert_refused(&post("Transfer-Encoding: \r\n", ""), 400);
}

#[test]
fn transfer_encoding_with_a_vertical_tab_before_chunked_is_400() {
    assert_refused(&post("Transfer-Encoding: \x0bchunked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn transfer_encoding_chunked_with_non_ascii_look_alike_is_400() {
    // "chun\u{212a}ed": a Kelvin sign that some case folding turns into 'k'.
    let mut raw = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chun".to_vec();
    raw.extend_from_slice("\u{212a}".as_bytes());
    raw.extend_from_slice(b"ed\r\n\r\n0\r\n\r\n");
    assert_refused(&raw, 400);
}

#[test]
fn transfer_encoding_on_http10_is_400() {
    // RFC 9112 section 6.1: framing of an HTTP/1.0 message with
    // Transfer-Encoding is faulty.
    assert_refused(b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400);
}

#[test]
fn transfer_encoding_in_mixed_case_is_reframed_as_chunked() {
    // Transfer coding names are case-insensitive: accepted, and the
    // backend sees Pitcher's own framing, never the client's spelling.
    let (be, p) = proxy();
    let mut c = p.client();
    let r = c.request(&post("Transfer-Encoding: ChUnKeD\r\n", "5\r\nhello\r\n0\r\n\r\n"));
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().expect("backend saw the request");
    assert_eq!(got.headers.get_all("transfer-encoding"), vec!["chunked"], "{}", got.head_str());
    assert_eq!(got.body, b"hello");
}

#[test]
fn content_length_list_of_equal_values_is_reframed_as_one_length() {
    let (be, p) = proxy();
    let r = p.client().request(&post("Content-Length: 5, 5\r\nContent-Length: 5\r\n", "hello"));
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().expect("backend saw the request");
    assert_eq!(got.headers.get_all("content-length"), vec!["5"], "{}", got.head_str());
    assert_eq!(got.body, b"hello");
}

// --- malformed chunked bodies ---

fn chunked(body: &str) -> Vec<u8> {
    post("Transfer-Encoding: chunked\r\n", body)
}

#[test]
fn chunk_size_that_is_not_hex_is_400() {
    assert_refused(&chunked("z\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_with_0x_prefix_is_400() {
    assert_refused(&chunked("0x5\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_with_leading_space_is_400() {
    assert_refused(&chunked(" 5\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn negative_chunk_size_is_400() {
    assert_refused(&chunked("-5\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_overflowing_64_bits_is_400() {
    assert_refused(&chunked("10000000000000005\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn empty_chunk_size_line_is_400() {
    assert_refused(&chunked("\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_line_ending_in_bare_lf_is_400() {
    assert_refused(&chunked("5\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_size_line_ending_in_bare_cr_is_400() {
    assert_refused(&chunked("5\rhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_data_followed_by_bare_lf_is_400() {
    assert_refused(&chunked("5\r\nhello\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_data_longer_than_its_size_is_400() {
    assert_refused(&chunked("5\r\nhello, world\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_extension_without_a_name_is_400() {
    assert_refused(&chunked("5;\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_extension_with_a_control_character_is_400() {
    assert_refused(&chunked("5;a\x01b\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_extension_with_a_bare_lf_is_400() {
    assert_refused(&chunked("5;a\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_extension_with_an_unterminated_quoted_string_is_400() {
    assert_refused(&chunked("5;a=\"x\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn chunk_extension_with_a_bad_character_in_its_name_is_400() {
    assert_refused(&chunked("5;a@b=c\r\nhello\r\n0\r\n\r\n"), 400);
}

#[test]
fn trailer_with_obs_fold_is_400() {
    assert_refused(&chunked("5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"), 400);
}

#[test]
fn trailer_line_without_a_name_is_400() {
    assert_refused(&chunked("5\r\nhello\r\n0\r\n: v\r\n\r\n"), 400);
}

#[test]
fn last_chunk_ending_in_bare_lf_is_400() {
    assert_refused(&chunked("5\r\nhello\r\n0\r\n\n"), 400);
}

#[test]
fn well_formed_chunk_extensions_are_accepted() {
    let (be, p) = proxy();
    let r = p.client().request(&chunked("5 ; a=b ;c=\"q \\\" d\"\r\nhello\r\n0;last\r\nX-T: 1\r\n\r\n"));
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().expect("backend saw the request");
    assert_eq!(got.body, b"hello");
    // Re-framed: the client's extensions and trailers are not passed on.
    assert!(got.trailers.is_empty(), "trailers forwarded: {:?}", got.trailers);
}

// --- malformed heads ---

#[test]
fn bare_lf_line_ends_in_the_head_are_400() {
    assert_refused(b"GET / HTTP/1.1\nHost: h\n\n", 400);
}

#[test]
fn bare_lf_after_one_header_line_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n", 400);
}

#[test]
fn bare_cr_inside_a_header_value_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400);
}

#[test]
fn bare_cr_as_a_line_end_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n", 400);
}

#[test]
fn space_before_colon_in_a_header_name_is_400() {
    assert_refused(&post("Content-Length : 5\r\n", "hello"), 400);
}

#[test]
fn tab_before_colon_in_a_header_name_is_400() {
    assert_refused(&post("Transfer-Encoding\t: chunked\r\n", "0\r\n\r\n"), 400);
}

#[test]
fn space_inside_a_header_name_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX A: b\r\n\r\n", 400);
}

#[test]
fn obs_fold_in_a_header_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", 400);
}

#[test]
fn obs_fold_hiding_transfer_encoding_is_400() {
    assert_refused(&post("X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "hello"), 400);
}

#[test]
fn whitespace_before_the_first_header_line_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400);
}

#[test]
fn nul_in_a_header_value_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400);
}

#[test]
fn control_character_in_a_header_value_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n", 400);
}

#[test]
fn delete_character_in_a_header_value_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n", 400);
}

#[test]
fn nul_in_the_request_target_is_400() {
    assert_refused(b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

#[test]
fn two_host_fields_are_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400);
}

#[test]
fn host_with_a_space_inside_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400);
}

#[test]
fn host_with_a_non_numeric_port_is_400() {
    assert_refused(b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", 400);
}

// --- a refused body met after the head was forwarded ---

#[test]
fn malformed_chunk_after_the_head_was_forwarded_aborts_the_upstream_connection() {
    // The head and a valid first chunk reach the backend before the bad
    // chunk arrives. The bad bytes are never forwarded, the upstream
    // connection is closed (never pooled), so the backend never sees a
    // complete request, and the client gets 400 and a close.
    let (be, p) = proxy();
    let mut c = p.client();
    c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    assert!(wait_until(Duration::from_secs(5), || be.connections() == 1), "head never reached the backend");
    c.send(b"5\r\nworldXX0\r\n\r\n");
    let r = c.read_response();
    assert_error_response(&r, 400);
    assert!(r.says_close(), "{}", r.head_str());
    assert!(c.closed_by_peer(IO_TIMEOUT), "client connection left open");
    assert!(wait_until(Duration::from_secs(5), || be.open_connections() == 0), "upstream connection not aborted");
    assert_eq!(be.requests(), 0, "the backend received a complete request");
    // The next request does not reuse the aborted connection.
    assert_ok_body(&get_once(p.addr(), "h", "/after"), b"ok from be");
    assert_eq!(be.connections(), 2);
    assert_eq!(be.requests(), 1);
}

// --- hop-by-hop abuse ---

#[test]
fn connection_field_listing_host_does_not_strip_it() {
    // Fields named in Connection are dropped on the way, but Host is
    // end-to-end: a client must not make the backend see another host.
    let (be, p) = proxy();
    let r = p.client().request(b"GET / HTTP/1.1\r\nHost: H.Example:8080\r\nConnection: keep-alive, Host\r\n\r\n");
    assert_ok_body(&r, b"ok from be");
    let got = be.last_request().unwrap();
    assert_eq!(got.headers.get_all("host"), vec!["H.Example:8080"], "{}", got.head_str());
}

#[test]
fn malformed_request_after_a_head_request_gets_a_complete_400() {
    // The refusal is about the malformed request, not the HEAD before it:
    // its body is sent, as its Content-Length says.
    let (be, p) = proxy();
    let mut c = p.client();
    let r = c.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head_str());
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\nX A: b\r\n\r\n");
    let r = c.read_response();
    assert_error_response(&r, 400);
    assert!(c.closed_by_peer(IO_TIMEOUT), "connection left open after 400");
    assert_eq!(be.requests(), 1);
}
