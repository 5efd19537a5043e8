//! Chunked transfer coding (RFC 9112 §7.1): a strict, incremental scanner.
//!
//! The scanner never copies: it tells the caller, for the bytes at the front
//! of a buffer, how many are framing (size lines, CRLFs, trailers) and how
//! many are chunk data. A proxy that forwards the coding as is counts both;
//! one that decodes it (for an HTTP/1.0 client) writes the data and skips the
//! framing. Anything that is not exactly the grammar is an error: the
//! scanner is the smuggling boundary for bodies.

/// Longest chunk-size line (size, extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    DataCrlf,
    #[error("invalid trailer")]
    Trailer,
    #[error("trailers too large")]
    TrailerTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a size line: at least one hex digit is needed.
    SizeStart,
    /// Inside the hex digits.
    Size,
    /// Inside `;ext...` up to CR.
    Ext,
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
    /// Inside a trailer field line.
    Trailer,
    /// Got CR in a trailer line; LF must follow.
    TrailerLf,
    /// Got CR of the final empty line; LF must follow.
    EndLf,
    Done,
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
                    self.line_len += 1;
                    if let Some(d) = hex(b) {
                        if self.size >> 60 != 0 {
                            return Err(ChunkedError::SizeOverflow);
                        }
                        self.size = self.size << 4 | d as u64;
                    } else if b == b';' {
                        self.state = State::Ext;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkedError::Size);
                    }
                }
                State::Ext => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if !is_ext_byte(b) {
                        return Err(ChunkedError::Extension);
                    }
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
                }
                State::TrailerStart => {
                    self.trailer_len += 1;
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if b == b' ' || b == b'\t' || b == b':' || !is_field_byte(b) {
                        // obs-fold or a field line without a name.
                        return Err(ChunkedError::Trailer);
                    } else {
                        self.state = State::Trailer;
                    }
                }
                State::Trailer => {
                    self.trailer_len += 1;
                    if self.trailer_len > MAX_TRAILER_BYTES {
                        return Err(ChunkedError::TrailerTooLarge);
                    }
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
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
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

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Bytes allowed in a chunk extension: token and quoted-string characters,
/// `=`, `;` and optional whitespace; no other controls.
fn is_ext_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

/// Bytes allowed in a trailer field line: visible, space, tab, obs-text.
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
        ] {
            let mut s = ChunkedScanner::new();
            assert!(s.scan_through(bad).is_err(), "accepted {:?}", String::from_utf8_lossy(bad));
        }
    }
}
