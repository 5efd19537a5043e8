//! Deadlines of the event loop: a timing wheel of 10 ms slots with lazy
//! cancellation. Each timed object keeps its own `deadline` and the instant
//! it is queued at; pushing back a deadline costs nothing (the queued entry
//! fires early, finds a later deadline and is queued again), so a busy
//! connection does not touch the wheel on every event.
//!
//! Why slots and not a heap: every new connection queues a header timeout
//! and most connections close long before it, so the queue holds about
//! (connections per second × client_header_ms) stale entries. Appending to a
//! slot costs the same whatever that number is; a heap push or pop walks
//! log2(n) scattered entries. A timeout fires at most one slot (10 ms) late.
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Width of a slot: the precision of every timeout.
const SLOT_MS: u64 = 10;

/// The timing state an object embeds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timed {
    /// When the object's current wait expires (`None`: no timeout).
    pub deadline: Option<Instant>,
    /// The earliest instant this object is queued at.
    queued: Option<Instant>,
}

/// Deadlines keyed by token values, in slots by due time.
#[derive(Debug)]
pub struct Timers {
    origin: Instant,
    /// Slot number (end of the slot, in SLOT_MS since `origin`) → entries.
    slots: BTreeMap<u64, Vec<(Instant, usize)>>,
    /// Entries of slots that came due, not popped yet.
    ready: Vec<(Instant, usize)>,
    /// Emptied slot vectors, for reuse.
    spare: Vec<Vec<(Instant, usize)>>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers { origin: Instant::now(), slots: BTreeMap::new(), ready: Vec::new(), spare: Vec::new() }
    }
}

impl Timers {
    /// The slot whose end is the first slot boundary at or after `at`.
    fn slot_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        nanos.div_ceil(SLOT_MS as u128 * 1_000_000) as u64
    }

    fn slot_end(&self, slot: u64) -> Instant {
        self.origin + Duration::from_millis(slot * SLOT_MS)
    }

    fn push(&mut self, at: Instant, key: usize) {
        let slot = self.slot_of(at);
        let spare = &mut self.spare;
        self.slots.entry(slot).or_insert_with(|| spare.pop().unwrap_or_default()).push((at, key));
    }

    /// Sets `t`'s deadline to `at`, queueing it if no earlier entry exists.
    pub fn set(&mut self, t: &mut Timed, key: usize, at: Instant) {
        t.deadline = Some(at);
        if t.queued.is_none_or(|q| at < q) {
            t.queued = Some(at);
            self.push(at, key);
        }
    }

    pub fn clear(t: &mut Timed) {
        t.deadline = None;
    }

    /// Time until the first queued entry is due (for the poll timeout).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        self.slots.keys().next().map(|&s| self.slot_end(s).saturating_duration_since(now))
    }

    /// Pops the next entry due at `now`: (its instant, its key).
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize)> {
        loop {
            if let Some(e) = self.ready.pop() {
                return Some(e);
            }
            let &slot = self.slots.keys().next()?;
            if self.slot_end(slot) > now {
                return None;
            }
            let mut entries = self.slots.remove(&slot).unwrap_or_default();
            self.ready.append(&mut entries);
            self.spare.push(entries);
        }
    }

    /// Handles a popped entry for object `t`: `true` if its deadline is
    /// due; otherwise re-queues it at its deadline (if any) and returns
    /// `false`. Stale entries (not the one `t` is queued at) are ignored.
    pub fn fired(&mut self, t: &mut Timed, key: usize, at: Instant, now: Instant) -> bool {
        if t.queued != Some(at) {
            return false;
        }
        t.queued = None;
        match t.deadline {
            Some(d) if d <= now => {
                t.deadline = None;
                true
            }
            Some(d) => {
                t.queued = Some(d);
                self.push(d, key);
                false
            }
            None => false,
        }
    }

    /// Queued entries, stale ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ready.len() + self.slots.values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_back_deadline_requeues() {
        let mut timers = Timers::default();
        let mut t = Timed::default();
        let t0 = Instant::now();
        timers.set(&mut t, 7, t0 + Duration::from_millis(10));
        timers.set(&mut t, 7, t0 + Duration::from_millis(50));
        assert_eq!(timers.len(), 1);
        // The first entry comes due (within a slot) and finds a later deadline.
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(21)).unwrap();
        assert!(!timers.fired(&mut t, key, at, t0 + Duration::from_millis(21)));
        assert!(timers.pop_due(t0 + Duration::from_millis(40)).is_none());
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(61)).unwrap();
        assert!(timers.fired(&mut t, key, at, t0 + Duration::from_millis(61)));
    }

    #[test]
    fn nothing_fires_before_its_deadline() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        for i in 0..100u64 {
            let mut t = Timed::default();
            timers.set(&mut t, i as usize, t0 + Duration::from_micros(i * 997));
        }
        let mut now = t0;
        let mut fired = 0;
        while fired < 100 {
            now += Duration::from_millis(1);
            while let Some((at, _)) = timers.pop_due(now) {
                assert!(at <= now, "fired {:?} early", at - now);
                assert!(now - at <= Duration::from_millis(11), "fired {:?} late", now - at);
                fired += 1;
            }
        }
    }

    #[test]
    fn earlier_deadline_queues_again_and_stale_is_ignored() {
        let mut timers = Timers::default();
        let mut t = Timed::default();
        let t0 = Instant::now();
        timers.set(&mut t, 1, t0 + Duration::from_millis(50));
        timers.set(&mut t, 1, t0 + Duration::from_millis(5));
        // Due within one slot (10 ms) of its deadline.
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(15)).unwrap();
        assert!(timers.fired(&mut t, key, at, t0 + Duration::from_millis(15)));
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(60)).unwrap();
        assert!(!timers.fired(&mut t, key, at, t0 + Duration::from_millis(60)));
    }
}
