//! Session tickets sealed with the instance's ticket keys (kept in the
//! shared region, `shm::TicketKeys`): any worker of any generation opens a
//! ticket another issued, while its key is held, so a client resumes
//! whichever worker it reaches, across reloads and upgrades.
//!
//! A ticket is `key name (8 bytes) ‖ nonce (12) ‖ AES-256-GCM(state)`,
//! the key name as associated data. The keys are drawn by the master
//! ([`new_key`]) and rotated on its schedule ([`rotate_if_due`]).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::shm::{TicketKeys, TICKET_KEY_BYTES};

/// rustls' ticket producer over the shared keys.
#[derive(Debug)]
pub struct SharedTicketer {
    keys: &'static TicketKeys,
    /// Seconds a client may keep a ticket (the rotation period: a key stays
    /// held two periods after it stopped sealing).
    lifetime_s: u32,
}

impl SharedTicketer {
    /// Tickets sealed with `keys`, announced as valid for `lifetime_s`.
    pub fn new(keys: &'static TicketKeys, lifetime_s: u32) -> SharedTicketer {
        SharedTicketer { keys, lifetime_s }
    }
}

fn aead(key: &[u8; TICKET_KEY_BYTES]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key).ok().map(LessSafeKey::new)
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_s
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (id, key) = self.keys.current()?;
        let key = aead(&key)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let name = id.to_be_bytes();
        let mut out = Vec::with_capacity(name.len() + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        let tag =
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&name), &mut sealed).ok()?;
        out.extend_from_slice(&sealed);
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (name, rest) = cipher.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let key = aead(&self.keys.by_id(u64::from_be_bytes(*name))?)?;
        let mut buf = sealed.to_vec();
        let plain = key.open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(name), &mut buf).ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

/// A fresh random key and a random non-zero name for it.
pub fn new_key() -> Option<(u64, [u8; TICKET_KEY_BYTES])> {
    let rng = SystemRandom::new();
    let mut key = [0u8; TICKET_KEY_BYTES];
    let mut name = [0u8; 8];
    rng.fill(&mut key).ok()?;
    rng.fill(&mut name).ok()?;
    Some((u64::from_be_bytes(name).max(1), key))
}

/// Draws a new current key when there is none or the current one is
/// `period_ms` old. Returns whether a key was drawn.
pub fn rotate_if_due(keys: &TicketKeys, now_ms: u64, period_ms: u64) -> bool {
    if keys.current_since_ms().is_some_and(|since| now_ms.saturating_sub(since) < period_ms) {
        return false;
    }
    match new_key() {
        Some((id, key)) => keys.rotate(id, &key, now_ms),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn keys() -> &'static TicketKeys {
        Box::leak(Box::default())
    }

    #[test]
    fn a_ticket_opens_while_its_key_is_held_and_not_after() {
        let k = keys();
        let t = SharedTicketer::new(k, 3600);
        assert_eq!(t.encrypt(b"state"), None, "no key, no ticket");
        assert!(rotate_if_due(k, 1_000, 60_000));
        assert!(!rotate_if_due(k, 2_000, 60_000), "not due yet");
        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        // Another worker's ticketer (same region) opens it.
        assert_eq!(SharedTicketer::new(k, 3600).decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(t.decrypt(&bad), None, "a forged ticket is refused");
        assert_eq!(t.decrypt(&ticket[..10]), None);
        // Two rotations later it still opens; after the third it does not.
        assert!(rotate_if_due(k, 61_000, 60_000));
        assert!(rotate_if_due(k, 121_000, 60_000));
        assert!(t.decrypt(&ticket).is_some());
        assert!(rotate_if_due(k, 181_000, 60_000));
        assert_eq!(t.decrypt(&ticket), None);
    }
}
