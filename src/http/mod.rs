//! HTTP/1.1 message handling without I/O: head parsing ([`head`]), the
//! normalised request path routing matches ([`path`]), chunked framing
//! ([`chunked`]) and the serialisation of the heads Pitcher sends
//! ([`write`]). The proxy state machine sits on top of this module.

pub mod chunked;
pub mod head;
pub mod path;
pub mod write;

pub use chunked::{ChunkedError, ChunkedScanner};
pub use head::{Field, Framing, Head, RequestHead, ResponseHead, Version};

/// Why a message was refused. Each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line or head is malformed.
    #[error("malformed request")]
    BadRequest,
    /// A header field is malformed.
    #[error("malformed header field")]
    BadHeader,
    /// The method is not in upper case.
    #[error("method not in upper case")]
    BadMethod,
    /// The target has a fragment, a malformed escape, or a path above the root.
    #[error("request target with a fragment, a malformed escape, or a path above the root")]
    BadTarget,
    /// A header name that differs from a hop-by-hop, framing or forwarding field only by `_`.
    #[error("header name that differs from a hop-by-hop, framing or forwarding field only by '_'")]
    UnderscoreHeader,
    /// An HTTP version other than 1.0 or 1.1.
    #[error("unsupported HTTP version")]
    BadVersion,
    /// An HTTP/1.1 request without `Host`.
    #[error("missing Host header")]
    MissingHost,
    /// An invalid `Content-Length`.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    /// A malformed `Transfer-Encoding`.
    #[error("invalid Transfer-Encoding")]
    BadTransferEncoding,
    /// A transfer coding Pitcher does not know.
    #[error("unknown transfer coding")]
    UnknownTransferEncoding,
    /// More header fields than allowed.
    #[error("too many header fields")]
    TooManyHeaders,
    /// The request line is longer than allowed.
    #[error("request line too long")]
    UriTooLong,
    /// The head is larger than allowed.
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// The body is larger than allowed.
    #[error("request body too large")]
    BodyTooLarge,
    /// The chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    Chunked(ChunkedError),
    /// A backend's response head is malformed.
    #[error("malformed response from backend")]
    BadResponse,
}

impl HttpError {
    /// The status a client is answered with.
    pub fn status(self) -> u16 {
        match self {
            HttpError::UnknownTransferEncoding => 501,
            HttpError::BadVersion => 505,
            HttpError::TooManyHeaders | HttpError::HeadersTooLarge => 431,
            HttpError::UriTooLong => 414,
            HttpError::BodyTooLarge => 413,
            HttpError::BadResponse => 502,
            _ => 400,
        }
    }
}

/// Standard reason phrase of the statuses Pitcher generates.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        401 => "Unauthorized",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) that are never forwarded, plus the
/// framing fields Pitcher always writes itself. `upgrade` is handled apart.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 7] =
        [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"content-length"];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}
