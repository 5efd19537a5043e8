//! Which slot of the shared region each backend address has: the table
//! the master keeps (assigning slots) and hands to its workers (which only
//! look it up). It lives beside the region it describes, so that the
//! master needs nothing of the data path to keep it.

use std::collections::HashMap;

use super::{BackendShm, Shared, MAX_BACKENDS};
use crate::config::BackendAddr;

/// Which shared-memory slot each backend address has. The master assigns
/// slots (an address keeps its slot for the life of the instance, across
/// reloads and upgrades) and sends the table to its workers, which only
/// look it up. `--single-process` assigns its own.
#[derive(Debug)]
pub struct SlotTable {
    shared: &'static Shared,
    map: HashMap<String, u32>,
    /// May this table assign new slots (master, single process)?
    assigns: bool,
}

impl SlotTable {
    /// An empty table over `shared`; `assigns`: may it give new slots.
    pub fn new(shared: &'static Shared, assigns: bool) -> SlotTable {
        SlotTable { shared, map: HashMap::new(), assigns }
    }

    /// A worker's copy of the master's table.
    pub fn from_entries(shared: &'static Shared, entries: &[(String, u32)]) -> SlotTable {
        SlotTable { shared, map: entries.iter().cloned().collect(), assigns: false }
    }

    /// Adds entries (a predecessor's table) to an assigning table.
    pub fn extend(&mut self, entries: &[(String, u32)]) {
        self.map.extend(entries.iter().cloned());
    }

    /// The shared state of a known address (never assigns).
    pub fn peek(&self, addr: &BackendAddr) -> Option<&'static BackendShm> {
        self.map.get(&addr.to_string()).map(|&n| self.shm(n))
    }

    /// The slot of an address (as written, `127.0.0.1:9001`) if it has one.
    pub fn slot(&self, addr: &str) -> Option<u32> {
        self.map.get(addr).copied()
    }

    /// Does `addr` have a slot?
    pub fn contains(&self, addr: &BackendAddr) -> bool {
        self.map.contains_key(&addr.to_string())
    }

    /// Every address and its slot (to send to workers or a new master).
    pub fn entries(&self) -> Vec<(String, u32)> {
        self.map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The slot of `addr`, assigning one if allowed. `None` when the region
    /// is full or the address is unknown to a worker.
    pub fn slot_of(&mut self, addr: &BackendAddr) -> Option<u32> {
        let key = addr.to_string();
        if let Some(&n) = self.map.get(&key) {
            return Some(n);
        }
        if !self.assigns || self.map.len() >= MAX_BACKENDS {
            return None;
        }
        let n = self.map.values().max().map_or(0, |m| m + 1);
        if n as usize >= MAX_BACKENDS {
            return None;
        }
        self.map.insert(key, n);
        Some(n)
    }

    /// The region this table describes.
    pub fn shared(&self) -> &'static Shared {
        self.shared
    }

    /// The shared state of slot `slot`.
    pub fn shm(&self, slot: u32) -> &'static BackendShm {
        &self.shared.backends[slot as usize]
    }
}
