//! The shared part of the fleet limits (`scope = "fleet"` of `throttle` and
//! `quota`): per limiter slot, the leases of tokens that the master's lease
//! thread took from Redis, and the key of the slot as bytes (so that the
//! thread can name it in Redis); per module, the counters `/metrics` shows.
//!
//! A lease covers one time window (`from_ms..until_ms` of the shared clock)
//! and holds the tokens granted for it. A slot has two, so that the thread
//! can write the next window's lease while workers take from the current
//! one. Workers only ever take (`checked_sub`); the thread only writes a
//! lease whose window is over, or adds tokens to the current one.
//!
//! Owns: the layout of leases and fleet counters, taking a token from a
//! lease, publishing a lease and a key. Must not: decide sizes or talk to
//! Redis (that is `crate::fleet`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

/// Bytes of a slot's key kept for the lease thread; longer keys get no
/// lease (they are limited by the local share).
pub const KEY_BYTES: usize = 128;
const KEY_WORDS: usize = KEY_BYTES / 8;

/// Modules with fleet counters: the throttle, the quota.
pub const FLEET_MODULES: usize = 2;
/// Index of the throttle's counters in [`crate::shm::Shared::fleet`].
pub const FLEET_THROTTLE: usize = 0;
/// Index of the quota's counters.
pub const FLEET_QUOTA: usize = 1;

/// Tokens granted for one window.
#[repr(C)]
#[derive(Debug)]
pub struct LeaseWindow {
    /// Start of the window (shared clock, ms).
    pub from_ms: AtomicU64,
    /// End of the window (exclusive); 0 while the lease is being written.
    pub until_ms: AtomicU64,
    /// Tokens left.
    pub tokens: AtomicU64,
    /// 1: the fleet's window had plenty of tokens left at the last grant,
    /// so a request finding this lease empty goes to the local share
    /// (until the next top-up) instead of being refused.
    pub overdraft: AtomicU32,
}

/// What a request found in the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A token of the lease.
    Token,
    /// The lease is empty and the fleet's window is (nearly) used up: refuse.
    Empty,
    /// The lease is empty but the fleet's window had room: the local share decides.
    Overdraft,
    /// No lease covers the time: the local share decides.
    NoLease,
}

/// The leases and the key of one limiter slot.
#[repr(C)]
#[derive(Debug)]
pub struct LeaseShm {
    /// Two windows: the current one and the next.
    pub windows: [LeaseWindow; 2],
    /// Length of the key in `key` (0: not published yet).
    pub key_len: AtomicU32,
    /// The key's bytes, little-endian in words.
    key: [AtomicU64; KEY_WORDS],
}

/// Counters of one module's fleet limit.
#[repr(C)]
#[derive(Debug)]
pub struct FleetShm {
    /// 1 while the lease thread reaches Redis (fleet mode), 0 otherwise.
    pub redis_up: AtomicU32,
    /// Times the module fell back to its local share (Redis unreachable,
    /// slow or answering errors).
    pub fallbacks: AtomicU64,
    /// Round trips to Redis that failed (connect, timeout, error reply).
    pub redis_errors: AtomicU64,
    /// Round trips to Redis that returned leases.
    pub round_trips: AtomicU64,
    /// Tokens granted by Redis to this host.
    pub tokens_granted: AtomicU64,
    /// Requests admitted by the local share (no lease covered them).
    pub local_admitted: AtomicU64,
    /// Requests refused by the local share.
    pub local_rejected: AtomicU64,
}

impl LeaseShm {
    /// Takes a token from the lease whose window holds `now`.
    #[inline]
    pub fn take(&self, now: u64) -> Take {
        for w in &self.windows {
            let until = w.until_ms.load(Acquire);
            if now < until && now >= w.from_ms.load(Relaxed) {
                if w.tokens.fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1)).is_ok() {
                    return Take::Token;
                }
                return if w.overdraft.load(Relaxed) == 1 { Take::Overdraft } else { Take::Empty };
            }
        }
        Take::NoLease
    }

    /// Tokens left in the lease of the window that starts at `from_ms`
    /// (`None`: there is none).
    pub fn left(&self, from_ms: u64) -> Option<u64> {
        self.windows
            .iter()
            .find(|w| w.until_ms.load(Acquire) != 0 && w.from_ms.load(Relaxed) == from_ms)
            .map(|w| w.tokens.load(Relaxed))
    }

    /// Writes the lease of the window `from_ms..until_ms` with `tokens`, or
    /// adds them to it when it is there already; `overdraft`: the fleet's
    /// window has room to spare (see [`LeaseWindow::overdraft`]). The lease
    /// replaced is the one whose window ended first (the thread writes only
    /// the current and the next window, so that one is over).
    pub fn grant(&self, from_ms: u64, until_ms: u64, tokens: u64, overdraft: bool) {
        if let Some(w) =
            self.windows.iter().find(|w| w.until_ms.load(Acquire) == until_ms && w.from_ms.load(Relaxed) == from_ms)
        {
            w.tokens.fetch_add(tokens, Relaxed);
            w.overdraft.store(u32::from(overdraft), Relaxed);
            return;
        }
        let w = self.windows.iter().min_by_key(|w| w.until_ms.load(Relaxed)).expect("two windows");
        w.until_ms.store(0, Release);
        w.tokens.store(tokens, Relaxed);
        w.overdraft.store(u32::from(overdraft), Relaxed);
        w.from_ms.store(from_ms, Relaxed);
        w.until_ms.store(until_ms, Release);
    }

    /// Drops both leases (the slot changed keys): requests use the local
    /// share until the thread leases for the new key.
    pub fn clear(&self) {
        for w in &self.windows {
            w.until_ms.store(0, Release);
            w.tokens.store(0, Relaxed);
        }
        self.key_len.store(0, Release);
    }

    /// Publishes the slot's key for the lease thread (keys longer than
    /// [`KEY_BYTES`] are not published).
    pub fn set_key(&self, key: &[u8]) {
        if key.len() > KEY_BYTES {
            self.key_len.store(0, Release);
            return;
        }
        self.key_len.store(0, Release);
        for (i, word) in self.key.iter().enumerate().take(key.len().div_ceil(8)) {
            let mut b = [0u8; 8];
            let part = &key[i * 8..key.len().min(i * 8 + 8)];
            b[..part.len()].copy_from_slice(part);
            word.store(u64::from_le_bytes(b), Relaxed);
        }
        // A key of zero bytes is published with a length of u32::MAX.
        self.key_len.store(if key.is_empty() { u32::MAX } else { key.len() as u32 }, Release);
    }

    /// The slot's published key (the caller checks that it belongs to the
    /// slot's current owner: a key is rewritten when the slot changes hands).
    pub fn key(&self) -> Option<Vec<u8>> {
        let len = match self.key_len.load(Acquire) {
            0 => return None,
            u32::MAX => return Some(Vec::new()),
            n => n as usize,
        };
        if len > KEY_BYTES {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        for word in self.key.iter().take(len.div_ceil(8)) {
            out.extend_from_slice(&word.load(Relaxed).to_le_bytes());
        }
        out.truncate(len);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Take::{Empty, NoLease, Overdraft, Token};
    use crate::shm::Region;

    #[test]
    fn a_lease_admits_its_tokens_in_its_window_only() {
        let r = Region::create().unwrap();
        let l = &r.shared().leases[3];
        assert_eq!(l.take(1_000), NoLease, "no lease yet");
        l.grant(1_000, 1_100, 2, false);
        assert_eq!(l.take(999), NoLease);
        assert_eq!(l.take(1_000), Token);
        assert_eq!(l.take(1_050), Token);
        assert_eq!(l.take(1_060), Empty, "two tokens only");
        l.grant(1_000, 1_100, 1, false);
        assert_eq!(l.take(1_099), Token, "a top-up adds to the window");
        assert_eq!(l.take(1_100), NoLease, "the window is over");
        // The next window while the current one runs; then the one after
        // replaces the oldest.
        l.grant(1_100, 1_200, 5, false);
        assert_eq!(l.left(1_100), Some(5));
        l.grant(1_200, 1_300, 7, false);
        assert_eq!(l.left(1_000), None, "replaced");
        assert_eq!((l.left(1_100), l.left(1_200)), (Some(5), Some(7)));
        assert_eq!(l.take(1_150), Token);
        assert_eq!(l.left(1_100), Some(4));
        // Empty, with room in the fleet's window: the local share decides.
        while l.take(1_150) == Token {}
        assert_eq!(l.take(1_150), Empty);
        l.grant(1_100, 1_200, 0, true);
        assert_eq!(l.take(1_150), Overdraft);
        l.clear();
        assert_eq!(l.take(1_250), NoLease);
    }

    #[test]
    fn keys_round_trip_and_long_keys_are_not_published() {
        let r = Region::create().unwrap();
        let l = &r.shared().leases[9];
        assert_eq!(l.key(), None);
        for key in [&b""[..], b"t", b"tenant-42", &[7u8; 128][..]] {
            l.set_key(key);
            assert_eq!(l.key().as_deref(), Some(key));
        }
        l.set_key(&[1u8; 129]);
        assert_eq!(l.key(), None);
    }
}
