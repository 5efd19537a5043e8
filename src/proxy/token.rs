//! Tokens: how an event from `mio` (or a deadline of the timer wheel)
//! names its owner. The low two bits are the kind of socket, the rest is
//! the owner's slab index, so an event finds its owner in O(1) and a pooled
//! upstream connection keeps its registration when it changes hands.
//!
//! [`token`] and [`decode`] are the only code that knows the layout.

use mio::Token;

/// Bits of a token that hold the kind.
const KIND_BITS: usize = 2;
const KIND_MASK: usize = (1 << KIND_BITS) - 1;

/// What a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listening socket (index into the worker's listeners).
    Listener = 0,
    /// A client connection (index into the sessions).
    Client = 1,
    /// A backend connection (index into the upstream connections).
    Upstream = 2,
    /// The channel to the master (index 0).
    Channel = 3,
}

/// The token of the object of `kind` at slab index `index`.
pub fn token(kind: Kind, index: usize) -> Token {
    Token(index << KIND_BITS | kind as usize)
}

/// The kind and slab index a token names.
pub fn decode(t: Token) -> (Kind, usize) {
    let kind = match t.0 & KIND_MASK {
        0 => Kind::Listener,
        1 => Kind::Client,
        2 => Kind::Upstream,
        _ => Kind::Channel,
    };
    (kind, t.0 >> KIND_BITS)
}

/// The token of the channel to the master.
pub const CHANNEL: Token = Token(Kind::Channel as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_and_index_comes_back() {
        for kind in [Kind::Listener, Kind::Client, Kind::Upstream, Kind::Channel] {
            for index in [0, 1, 2, 3, 4, 1023, usize::MAX >> KIND_BITS] {
                assert_eq!(decode(token(kind, index)), (kind, index));
            }
        }
        assert_eq!(decode(CHANNEL), (Kind::Channel, 0));
    }
}
