//! Chunked transfer coding (RFC 9112 §7.1): a strict, incremental scanner.
//!
//! The scanner never copies: it tells the caller, for the bytes at the front
//! of a buffer, how many are framing (size lines, CRLFs, trailers) and how
//! many are chunk data. A proxy that forwards the coding as is counts both
//! (responses, whose trailers must reach the client); one that re-frames it
//! ([`ChunkedScanner::reframe`], request bodies) writes its own size lines
//! around the data; one that decodes it (for an HTTP/1.0 client) writes the
//! data and skips the framing. Anything that is not exactly the grammar is
//! an error: the scanner is the smuggling boundary for bodies.

use super::head::is_tchar;

/// Longest chunk-size line (size, extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    /// A chunk size that is not hex digits.
    #[error("invalid chunk size")]
    Size,
    /// A chunk size beyond `u64`.
    #[error("chunk size too large")]
    SizeOverflow,
    /// A malformed chunk extension.
    #[error("invalid chunk extension")]
    Extension,
    /// A chunk-size line longer than allowed.
    #[error("chunk line too long")]
    LineTooLong,
    /// Chunk data not followed by CRLF.
    #[error("missing CRLF after chunk data")]
    DataCrlf,
    /// A malformed trailer field.
    #[error("invalid trailer")]
    Trailer,
    /// Trailers larger than allowed.
    #[error("trailers too large")]
    TrailerTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a size line: at least one hex digit is needed.
    SizeStart,
    /// Inside the hex digits.
    Size,
    /// Inside the chunk extensions, up to CR.
    Ext(Ext),
    /// Got CR of the size line; LF must follow.
    SizeLf,
    /// Inside chunk data, with this many bytes left.
    Data(u64),
    /// After data: CR must follow.
    DataCr,
    /// After data CR: LF must follow.
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// After the colon of a trailer field, up to CR.
    TrailerValue,
    /// Got CR in a trailer line; LF must follow.
    TrailerLf,
    /// Got CR of the final empty line; LF must follow.
    EndLf,
    Done,
}

/// Where in `chunk-ext` (RFC 9112 §7.1.1) the scanner is:
/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// Whitespace after the size: only `;` may follow.
    AfterSize,
    /// After `;`: whitespace, then the first name character.
    NameStart,
    Name,
    /// Whitespace after a name: `=` or `;` must follow.
    AfterName,
    /// After `=`: whitespace, then a token or a quoted string.
    ValueStart,
    Token,
    Quoted,
    /// After a backslash inside a quoted string.
    QuotedPair,
    /// After the closing quote.
    AfterQuoted,
    /// Whitespace after a value: `;` must follow.
    AfterValue,
}

/// Incremental chunked-body scanner.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    size: u64,
    line_len: usize,
    trailer_len: usize,
    /// Sum of chunk sizes seen so far (for body size limits).
    pub data_total: u64,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedScanner {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedScanner { state: State::SizeStart, size: 0, line_len: 0, trailer_len: 0, data_total: 0 }
    }

    /// The terminating empty line has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Chunk data bytes that may follow right now (0 when in framing).
    pub fn data_left(&self) -> u64 {
        match self.state {
            State::Data(n) => n,
            _ => 0,
        }
    }

    /// Records that `n` data bytes (at most [`data_left`](Self::data_left)) were taken.
    pub fn consume_data(&mut self, n: usize) {
        if let State::Data(left) = self.state {
            let left = left - n as u64;
            self.state = if left == 0 { State::DataCr } else { State::Data(left) };
        } else {
            debug_assert!(n == 0, "consume_data outside chunk data");
        }
    }

    /// Reads framing bytes from the front of `buf` until chunk data begins,
    /// the body ends, or `buf` runs out. Returns how many bytes were framing.
    pub fn scan_framing(&mut self, buf: &[u8]) -> Result<usize, ChunkedError> {
        self.framing(buf, None)
    }

    /// Like [`scan_framing`](Self::scan_framing), and appends to `out` the
    /// framing Pitcher sends in its place: a bare size line for each chunk,
    /// CRLF after its data, and `0 CRLF CRLF` once the whole trailer section
    /// has been read. Chunk extensions and trailer fields are dropped
    /// (RFC 9112 §7.1.1 and RFC 9110 §6.5.1 let an intermediary discard
    /// them), so nothing of the sender's framing is passed on.
    pub fn reframe(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        self.framing(buf, Some(out))
    }

    fn framing(&mut self, buf: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Data(_) | State::Done => return Ok(i),
                State::SizeStart => {
                    let d = hex(b).ok_or(ChunkedError::Size)?;
                    self.size = d as u64;
                    self.line_len = 1;
                    self.state = State::Size;
                }
                State::Size => {
                    self.count_line()?;
                    if let Some(d) = hex(b) {
                        if self.size >> 60 != 0 {
                            return Err(ChunkedError::SizeOverflow);
                        }
                        self.size = self.size << 4 | d as u64;
                    } else if b == b';' {
                        self.state = State::Ext(Ext::NameStart);
                    } else if is_ws(b) {
                        self.state = State::Ext(Ext::AfterSize);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkedError::Size);
                    }
                }
                State::Ext(e) => {
                    self.count_line()?;
                    self.state = match ext_step(e, b)? {
                        Some(e) => State::Ext(e),
                        None => State::SizeLf,
                    };
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Size);
                    }
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.data_total = self.data_total.saturating_add(self.size);
                        self.state = State::Data(self.size);
                        if let Some(out) = out.as_deref_mut() {
                            use std::io::Write;
                            let _ = write!(out, "{:x}\r\n", self.size);
                        }
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::DataCrlf);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::DataCrlf);
                    }
                    self.state = State::SizeStart;
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                State::TrailerStart => {
                    self.count_trailer()?;
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if is_tchar(b) {
                        self.state = State::TrailerName;
                    } else {
                        // obs-fold, or a field line without a name.
                        return Err(ChunkedError::Trailer);
                    }
                }
                State::TrailerName => {
                    self.count_trailer()?;
                    if b == b':' {
                        self.state = State::TrailerValue;
                    } else if !is_tchar(b) {
                        return Err(ChunkedError::Trailer);
                    }
                }
                State::TrailerValue => {
                    self.count_trailer()?;
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if !is_field_byte(b) {
                        return Err(ChunkedError::Trailer);
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Trailer);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Trailer);
                    }
                    self.state = State::Done;
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn count_line(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(ChunkedError::LineTooLong);
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILER_BYTES {
            return Err(ChunkedError::TrailerTooLarge);
        }
        Ok(())
    }

    /// Pass-through scan: how many bytes from the front of `buf` belong to
    /// the body (framing and data alike), stopping at the end of the body.
    pub fn scan_through(&mut self, buf: &[u8]) -> Result<usize, ChunkedError> {
        let mut i = 0;
        loop {
            i += self.scan_framing(&buf[i..])?;
            let left = self.data_left();
            if left == 0 || i == buf.len() {
                return Ok(i);
            }
            let n = left.min((buf.len() - i) as u64) as usize;
            self.consume_data(n);
            i += n;
        }
    }
}

/// One byte of a chunk extension: the next extension state, or `None` at
/// the CR that ends the size line.
fn ext_step(e: Ext, b: u8) -> Result<Option<Ext>, ChunkedError> {
    let bad = Err(ChunkedError::Extension);
    let next = match e {
        Ext::AfterSize | Ext::AfterValue => match b {
            _ if is_ws(b) => e,
            b';' => Ext::NameStart,
            _ => return bad,
        },
        Ext::NameStart => match b {
            _ if is_ws(b) => e,
            _ if is_tchar(b) => Ext::Name,
            _ => return bad,
        },
        Ext::Name => match b {
            _ if is_tchar(b) => e,
            _ if is_ws(b) => Ext::AfterName,
            b'=' => Ext::ValueStart,
            b';' => Ext::NameStart,
            b'\r' => return Ok(None),
            _ => return bad,
        },
        Ext::AfterName => match b {
            _ if is_ws(b) => e,
            b'=' => Ext::ValueStart,
            b';' => Ext::NameStart,
            _ => return bad,
        },
        Ext::ValueStart => match b {
            _ if is_ws(b) => e,
            b'"' => Ext::Quoted,
            _ if is_tchar(b) => Ext::Token,
            _ => return bad,
        },
        Ext::Token => match b {
            _ if is_tchar(b) => e,
            _ if is_ws(b) => Ext::AfterValue,
            b';' => Ext::NameStart,
            b'\r' => return Ok(None),
            _ => return bad,
        },
        Ext::Quoted => match b {
            b'"' => Ext::AfterQuoted,
            b'\\' => Ext::QuotedPair,
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => e,
            _ => return bad,
        },
        Ext::QuotedPair => match b {
            b'\t' | b' '..=0x7e | 0x80..=0xff => Ext::Quoted,
            _ => return bad,
        },
        Ext::AfterQuoted => match b {
            _ if is_ws(b) => Ext::AfterValue,
            b';' => Ext::NameStart,
            b'\r' => return Ok(None),
            _ => return bad,
        },
    };
    Ok(Some(next))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Bytes allowed in a trailer field value: visible, space, tab, obs-text.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces split at `split`; returns (data, consumed).
    fn decode_split(input: &[u8], split: usize) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in [&input[..split], &input[split..]] {
            let mut i = 0;
            while i < piece.len() && !s.is_done() {
                i += s.scan_framing(&piece[i..])?;
                let n = (s.data_left().min((piece.len() - i) as u64)) as usize;
                out.extend_from_slice(&piece[i..i + n]);
                s.consume_data(n);
                i += n;
            }
            consumed += i;
        }
        assert!(s.is_done(), "not done");
        Ok((out, consumed))
    }

    #[test]
    fn decodes_at_every_split() {
        let body = b"5\r\nhello\r\nB;ext=1;q=\"x\"\r\n world, hi!\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..=body.len() {
            let (data, consumed) = decode_split(body, split).unwrap();
            assert_eq!(data, b"hello world, hi!");
            assert_eq!(consumed, body.len() - 4, "split {split}");
        }
    }

    #[test]
    fn pass_through_stops_at_body_end() {
        let body = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        for split in 0..=body.len() {
            let mut s = ChunkedScanner::new();
            let a = s.scan_through(&body[..split]).unwrap();
            let b = s.scan_through(&body[a..]).unwrap();
            assert!(s.is_done());
            assert_eq!(a + b, 13, "split {split}");
        }
    }

    #[test]
    fn refuses_malformed_framing() {
        for bad in [
            &b"x\r\n"[..],
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXY",
            b"5\r\nhello\n0\r\n\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"5;a\x00b\r\n",
            b"0\r\n folded: x\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\n\r\r",
            b"fffffffffffffffff\r\n",
            b"5;\r\nhello\r\n",
            b"5;a b\r\n",
            b"5;a=\r\n",
            b"5;a=\"x\r\n",
            b"5;a=\"x\\\x01\"\r\n",
            b"5;a=b c\r\n",
            b"5;a@b\r\n",
            b"5 \r\n",
            b"5;a \r\n",
            b"0\r\nX\r\n\r\n",
            b"0\r\nX Y: 1\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nX: a\x00\r\n\r\n",
        ] {
            let mut s = ChunkedScanner::new();
            assert!(s.scan_through(bad).is_err(), "accepted {:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn accepts_extension_grammar() {
        for ok in [
            &b"5;a\r\nhello\r\n0\r\n\r\n"[..],
            b"5 ;a\r\nhello\r\n0\r\n\r\n",
            b"5\t; a = b ;c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"q \\\" ;x\";b=c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"\"\r\nhello\r\n0\r\n\r\n",
        ] {
            let mut s = ChunkedScanner::new();
            assert_eq!(s.scan_through(ok).unwrap(), ok.len(), "{:?}", String::from_utf8_lossy(ok));
        }
    }

    #[test]
    fn size_line_of_leading_zeros_is_bounded() {
        let mut line = vec![b'0'; MAX_CHUNK_LINE + 1];
        line.extend_from_slice(b"5\r\n");
        assert_eq!(ChunkedScanner::new().scan_through(&line), Err(ChunkedError::LineTooLong));
    }

    #[test]
    fn reframes_at_every_split() {
        let body = b"05;ext=1\r\nhello\r\nB;q=\"x\"\r\n world, hi!\r\n000\r\nX-T: 1\r\n\r\nNEXT";
        let want = b"5\r\nhello\r\nb\r\n world, hi!\r\n0\r\n\r\n";
        for split in 0..=body.len() {
            let mut s = ChunkedScanner::new();
            let mut out = Vec::new();
            let mut consumed = 0;
            for piece in [&body[..split], &body[split..]] {
                let mut i = 0;
                while i < piece.len() && !s.is_done() {
                    i += s.reframe(&piece[i..], &mut out).unwrap();
                    let n = (s.data_left().min((piece.len() - i) as u64)) as usize;
                    out.extend_from_slice(&piece[i..i + n]);
                    s.consume_data(n);
                    i += n;
                }
                consumed += i;
            }
            assert!(s.is_done());
            assert_eq!(consumed, body.len() - 4, "split {split}");
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want), "split {split}");
        }
    }

    #[test]
    fn reframe_ends_the_body_only_after_the_trailers() {
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        s.reframe(b"0\r\nX-T: 1\r\n", &mut out).unwrap();
        assert!(out.is_empty(), "terminator written before the trailer section ended");
        assert!(s.reframe(b"X U: 2\r\n\r\n", &mut out).is_err());
        assert!(out.is_empty());
    }
}
