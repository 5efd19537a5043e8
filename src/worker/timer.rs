//! Deadlines of the event loop: a min-heap of (instant, key) with lazy
//! cancellation. Each timed object keeps its own `deadline` and the instant
//! it is queued at; pushing back a deadline costs nothing (the queued entry
//! fires early, finds a later deadline and is queued again), so a busy
//! connection does not touch the heap on every event.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The timing state an object embeds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timed {
    /// When the object's current wait expires (`None`: no timeout).
    pub deadline: Option<Instant>,
    /// The earliest instant this object is queued at in the heap.
    queued: Option<Instant>,
}

/// A heap of deadlines keyed by token values.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Timers {
    /// Sets `t`'s deadline to `at`, queueing it if no earlier entry exists.
    pub fn set(&mut self, t: &mut Timed, key: usize, at: Instant) {
        t.deadline = Some(at);
        if t.queued.is_none_or(|q| at < q) {
            t.queued = Some(at);
            self.heap.push(Reverse((at, key)));
        }
    }

    pub fn clear(t: &mut Timed) {
        t.deadline = None;
    }

    /// Time until the first queued entry (for the poll timeout).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap.peek().map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// Pops the next entry due at `now`: (its instant, its key).
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
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
                self.heap.push(Reverse((d, key)));
                false
            }
            None => false,
        }
    }

    /// Queued entries, stale ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
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
        timers.set(&mut t, 7, t0 + Duration::from_millis(30));
        assert_eq!(timers.len(), 1);
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(15)).unwrap();
        assert!(!timers.fired(&mut t, key, at, t0 + Duration::from_millis(15)));
        assert!(timers.pop_due(t0 + Duration::from_millis(20)).is_none());
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(31)).unwrap();
        assert!(timers.fired(&mut t, key, at, t0 + Duration::from_millis(31)));
    }

    #[test]
    fn earlier_deadline_queues_again_and_stale_is_ignored() {
        let mut timers = Timers::default();
        let mut t = Timed::default();
        let t0 = Instant::now();
        timers.set(&mut t, 1, t0 + Duration::from_millis(50));
        timers.set(&mut t, 1, t0 + Duration::from_millis(5));
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(6)).unwrap();
        assert!(timers.fired(&mut t, key, at, t0 + Duration::from_millis(6)));
        let (at, key) = timers.pop_due(t0 + Duration::from_millis(60)).unwrap();
        assert!(!timers.fired(&mut t, key, at, t0 + Duration::from_millis(60)));
    }
}
