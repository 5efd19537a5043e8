//! TLS session-ticket keys in the shared region ([`TicketKeys`]): a master
//! draws them and rotates them; every worker seals new tickets with the
//! current key and opens tickets sealed with any key still held, so a
//! client resumes on whichever worker it reaches. The region outlives
//! reloads and moves to a new master on upgrade, and so do the keys.
//!
//! Three keys are held: the current one and the two before it, so a ticket
//! stays valid at least one rotation period after it was issued. Each key
//! is written under a sequence lock (odd while being written): a reader
//! that overlaps a write retries, and never uses a torn key.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Bytes of a ticket key (AES-256-GCM).
pub const TICKET_KEY_BYTES: usize = 32;
/// Keys held: the current one and the two before it.
const HELD: usize = 3;
/// Reads retried while a master rewrites a key.
const READ_TRIES: usize = 64;

/// One key and its name.
#[repr(C)]
#[derive(Debug, Default)]
struct KeySlot {
    /// Sequence lock: odd while the slot is being written.
    seq: AtomicU64,
    /// The key's name, carried in its tickets (0: none yet).
    id: AtomicU64,
    /// When it became the current key (`shm::now_ms`).
    since_ms: AtomicU64,
    key: [AtomicU64; TICKET_KEY_BYTES / 8],
}

/// The ticket keys of an instance. See the module documentation.
#[repr(C)]
#[derive(Debug, Default)]
pub struct TicketKeys {
    /// 1 + the slot of the current key (0: no key yet).
    current: AtomicU32,
    slots: [KeySlot; HELD],
}

/// A key as read: its name, when it became current, its bytes.
type Key = (u64, u64, [u8; TICKET_KEY_BYTES]);

impl KeySlot {
    fn read(&self) -> Option<Key> {
        for _ in 0..READ_TRIES {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let id = self.id.load(Ordering::Relaxed);
            let since = self.since_ms.load(Ordering::Relaxed);
            let mut key = [0u8; TICKET_KEY_BYTES];
            for (chunk, word) in key.chunks_mut(8).zip(&self.key) {
                chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return (id != 0).then_some((id, since, key));
            }
        }
        None
    }

    /// Writes the slot; `false` if another writer holds it.
    fn write(&self, id: u64, since_ms: u64, key: &[u8; TICKET_KEY_BYTES]) -> bool {
        let s = self.seq.load(Ordering::Relaxed);
        if s % 2 == 1 || self.seq.compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return false;
        }
        fence(Ordering::Release);
        self.id.store(id, Ordering::Relaxed);
        self.since_ms.store(since_ms, Ordering::Relaxed);
        for (chunk, word) in key.chunks(8).zip(&self.key) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        self.seq.store(s + 2, Ordering::Release);
        true
    }
}

impl TicketKeys {
    /// The key new tickets are sealed with: (name, key).
    pub fn current(&self) -> Option<(u64, [u8; TICKET_KEY_BYTES])> {
        let i = self.current.load(Ordering::Acquire).checked_sub(1)? as usize;
        self.slots.get(i)?.read().map(|(id, _, k)| (id, k))
    }

    /// When the current key became current (`None`: there is none).
    pub fn current_since_ms(&self) -> Option<u64> {
        let i = self.current.load(Ordering::Acquire).checked_sub(1)? as usize;
        self.slots.get(i)?.read().map(|(_, since, _)| since)
    }

    /// The held key named `id`.
    pub fn by_id(&self, id: u64) -> Option<[u8; TICKET_KEY_BYTES]> {
        if id == 0 {
            return None;
        }
        self.slots.iter().filter_map(KeySlot::read).find(|k| k.0 == id).map(|k| k.2)
    }

    /// Makes `key` (named `id`, non-zero) the current key, dropping the
    /// oldest. A slot another writer holds (a master rotating at this
    /// moment, or one that died mid-write) is passed over for the next
    /// oldest; `false` when no slot could be written.
    pub fn rotate(&self, id: u64, key: &[u8; TICKET_KEY_BYTES], now_ms: u64) -> bool {
        let current = self.current.load(Ordering::Acquire) as usize;
        for k in 0..HELD {
            let slot = (current + k) % HELD;
            if current != 0 && slot == current - 1 {
                continue;
            }
            if self.slots[slot].write(id, now_ms, key) {
                self.current.store(slot as u32 + 1, Ordering::Release);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_two_previous_keys() {
        let t = TicketKeys::default();
        assert_eq!(t.current(), None);
        for id in 1..=4u64 {
            assert!(t.rotate(id, &[id as u8; TICKET_KEY_BYTES], id * 10));
            assert_eq!(t.current(), Some((id, [id as u8; TICKET_KEY_BYTES])));
            assert_eq!(t.current_since_ms(), Some(id * 10));
        }
        assert_eq!(t.by_id(1), None, "the fourth key replaced the first");
        for id in 2..=4u64 {
            assert_eq!(t.by_id(id), Some([id as u8; TICKET_KEY_BYTES]));
        }
        assert_eq!(t.by_id(0), None);
    }

    #[test]
    fn a_slot_being_written_is_not_read_nor_written_twice() {
        let t = TicketKeys::default();
        assert!(t.rotate(7, &[7; TICKET_KEY_BYTES], 1));
        t.slots[1].seq.fetch_add(1, Ordering::SeqCst); // a writer died mid-write
        assert!(!t.slots[1].write(8, 2, &[8; TICKET_KEY_BYTES]));
        assert_eq!(t.by_id(7), Some([7; TICKET_KEY_BYTES]));
        // Rotation passes over the stuck slot.
        assert!(t.rotate(8, &[8; TICKET_KEY_BYTES], 2));
        assert_eq!(t.current(), Some((8, [8; TICKET_KEY_BYTES])));
        assert_eq!(t.by_id(7), Some([7; TICKET_KEY_BYTES]));
        t.slots[2].seq.fetch_add(1, Ordering::SeqCst);
        assert_eq!(t.current(), None, "a slot being written is not read");
    }
}
