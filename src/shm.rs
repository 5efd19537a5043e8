//! State shared by every process of a Pitcher instance: a `memfd` region
//! that the master creates, maps, and hands to each worker with its other
//! fds (and to a new master on upgrade, so the state outlives the binary).
//!
//! Why shared memory: limits that are global (throttling, quotas) and the
//! health, ejection and slow-start state of backends must be the same for
//! every worker at request time, not N per-worker approximations, and a
//! round trip to the master per request would cost more than the request.
//! Every field is an atomic, so any bit pattern (including the all-zero
//! state of a fresh region) is valid and no lock is ever held across
//! processes: a worker that dies mid-update leaves a counter off by one,
//! never a poisoned lock.
//!
//! Owns: the region's layout, creating and mapping it, the shared clock.
//! Must not: hold policy (what counts as a failure lives in `health`).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};

/// Backend slots in a region; addresses get slots for the instance's life.
pub const MAX_BACKENDS: usize = 4096;
/// Rate limiter slots (global throttle, per-business quotas).
pub const MAX_LIMITERS: usize = 1024;
/// Module on/off flags (one per compiled-in module).
pub const MAX_MODULES: usize = 64;
/// Worker places whose load is published.
pub const MAX_WORKERS: usize = 512;
/// Worker places whose share of backend connections is tracked.
pub const ACCOUNTED_WORKERS: usize = 128;
/// Identifies a Pitcher region and its layout version.
const MAGIC: u64 = 0x5049_5443_4845_5204; // "PITCHER" + layout 4

/// Shared state of one backend address.
#[repr(C)]
#[derive(Debug)]
pub struct BackendShm {
    /// Connections in use by requests, all workers together.
    pub active: AtomicU32,
    /// Consecutive failed requests (count-window detector).
    pub consecutive_failures: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Time window detector: window start (shared ms) and its counts.
    pub window_start_ms: AtomicU64,
    pub window_requests: AtomicU32,
    pub window_failures: AtomicU32,
    /// Passive ejection: until when, and how many times so far.
    pub ejected_until_ms: AtomicU64,
    pub ejections: AtomicU32,
    /// Active health: 0 = up (or not checked), 1 = down.
    pub down: AtomicU32,
    pub probe_ok_run: AtomicU32,
    pub probe_fail_run: AtomicU32,
    pub probes: AtomicU64,
    /// Slow start ramps from this instant (shared ms; 0 = no ramp).
    pub ramp_start_ms: AtomicU64,
    /// Each worker place's share of `active`, so that the master can take
    /// back the connections of a worker that died.
    pub active_by_worker: [AtomicU32; ACCOUNTED_WORKERS],
}

/// A token bucket shared by all workers (global throttle, quotas).
#[repr(C)]
#[derive(Debug)]
pub struct LimiterShm {
    /// Tokens in thousandths, and when they were last refilled.
    pub milli_tokens: AtomicU64,
    pub refilled_ms: AtomicU64,
    /// Requests in flight (concurrency limits), and each worker place's
    /// share of them (given back by the master when a worker dies).
    pub in_flight: AtomicU32,
    pub in_flight_by_worker: [AtomicU32; ACCOUNTED_WORKERS],
    /// Fingerprint of the key that owns this slot (0: free).
    pub key: AtomicU64,
    pub admitted: AtomicU64,
    pub rejected: AtomicU64,
}

/// A module's run-time switch (set through the control socket).
#[repr(C)]
#[derive(Debug)]
pub struct ModuleShm {
    /// 1: switched off for every worker.
    pub disabled: AtomicU32,
}

/// A worker's published load, for `ctl` (written by the worker itself).
#[repr(C)]
#[derive(Debug)]
pub struct WorkerShm {
    pub pid: AtomicU32,
    /// Overload level: 0 normal, 1 non-essential modules off, 2 shedding.
    pub level: AtomicU32,
    /// Event-loop busy ratio over the last measurement, in percent.
    pub busy_percent: AtomicU32,
    pub in_flight: AtomicU32,
    pub level_changes: AtomicU64,
}

/// The region's layout.
#[repr(C)]
#[derive(Debug)]
pub struct Shared {
    magic: AtomicU64,
    pub backends: [BackendShm; MAX_BACKENDS],
    pub limiters: [LimiterShm; MAX_LIMITERS],
    pub modules: [ModuleShm; MAX_MODULES],
    pub workers: [WorkerShm; MAX_WORKERS],
}

/// A mapped region. Mappings are never unmapped while the process runs
/// (a region is created once per instance), so `&'static Shared` is sound.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    shared: &'static Shared,
}

impl Region {
    /// Creates and maps a fresh, zeroed region.
    pub fn create() -> io::Result<Region> {
        let fd = memfd_create(c"pitcher-shared", MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, std::mem::size_of::<Shared>() as i64)?;
        let r = Region::map(fd)?;
        r.shared.magic.store(MAGIC, Relaxed);
        Ok(r)
    }

    /// Maps a region received from the master.
    pub fn open(fd: OwnedFd) -> io::Result<Region> {
        let r = Region::map(fd)?;
        if r.shared.magic.load(Relaxed) != MAGIC {
            return Err(io::Error::other("shared region has another layout (mixed binary versions?)"));
        }
        Ok(r)
    }

    fn map(fd: OwnedFd) -> io::Result<Region> {
        let len = std::mem::size_of::<Shared>();
        let size = nix::sys::stat::fstat(fd.as_raw_fd())?.st_size as usize;
        if size != len {
            return Err(io::Error::other(format!("shared region is {size} bytes, expected {len}")));
        }
        let nz = NonZeroUsize::new(len).expect("non-empty layout");
        // SAFETY: a fresh MAP_SHARED mapping of a memfd passed between our
        // own processes, exactly `size_of::<Shared>()` long (checked above),
        // page aligned by mmap. `Shared` is repr(C) and made only of
        // atomics, valid for every bit pattern (a new memfd reads as zeros),
        // and only ever accessed through atomic operations, so concurrent
        // use by other processes is sound. The mapping is never unmapped,
        // which makes the 'static lifetime true.
        let shared: &'static Shared = unsafe {
            let p: NonNull<std::ffi::c_void> =
                mmap(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd.as_fd(), 0)?;
            &*(p.as_ptr() as *const Shared)
        };
        Ok(Region { fd, shared })
    }

    /// Keeps the mapping (and its fd) for the rest of the process.
    pub fn leak(self) -> &'static Shared {
        let s = self.shared;
        std::mem::forget(self);
        s
    }

    pub fn shared(&self) -> &'static Shared {
        self.shared
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Shared {
    /// A worker place's process died: its connections to backends are
    /// gone, take them out of the shared counts.
    pub fn forget_worker(&self, place: usize) {
        if place >= ACCOUNTED_WORKERS {
            return;
        }
        for b in self.backends.iter() {
            let n = b.active_by_worker[place].swap(0, Relaxed);
            if n > 0 {
                let _ = b.active.fetch_update(Relaxed, Relaxed, |a| Some(a.saturating_sub(n)));
            }
        }
        for l in self.limiters.iter() {
            let n = l.in_flight_by_worker[place].swap(0, Relaxed);
            if n > 0 {
                let _ = l.in_flight.fetch_update(Relaxed, Relaxed, |a| Some(a.saturating_sub(n)));
            }
        }
        if let Some(w) = self.workers.get(place) {
            w.in_flight.store(0, Relaxed);
            w.level.store(0, Relaxed);
        }
    }
}

/// The clock all processes agree on: CLOCK_MONOTONIC in milliseconds
/// (system-wide on Linux, unlike an `Instant`, which cannot be shared).
pub fn now_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000,
        Err(_) => 0,
    }
}

impl BackendShm {
    /// Forgets the history of this slot (its address was added back by a
    /// reload) and starts a slow start at `now_ms`. Connection counts stay:
    /// they are live.
    pub fn reset(&self, now_ms: u64) {
        for c in [&self.consecutive_failures, &self.window_requests, &self.window_failures, &self.ejections] {
            c.store(0, Relaxed);
        }
        for c in [&self.requests, &self.failures, &self.ejected_until_ms, &self.probes] {
            c.store(0, Relaxed);
        }
        self.down.store(0, Relaxed);
        self.probe_ok_run.store(0, Relaxed);
        self.probe_fail_run.store(0, Relaxed);
        self.window_start_ms.store(now_ms, Relaxed);
        self.ramp_start_ms.store(now_ms, Relaxed);
    }
}

impl LimiterShm {
    /// One more request in flight for worker place `place`.
    pub fn enter(&self, place: usize) -> u32 {
        if let Some(c) = self.in_flight_by_worker.get(place) {
            c.fetch_add(1, Relaxed);
        }
        self.in_flight.fetch_add(1, Relaxed)
    }

    /// One request fewer in flight for worker place `place`.
    pub fn leave(&self, place: usize) {
        if let Some(c) = self.in_flight_by_worker.get(place) {
            let _ = c.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
        let _ = self.in_flight.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// Takes one token from a bucket of `rate_per_sec` with room for
    /// `burst`; refills lazily from the shared clock. Lock-free: refills
    /// and takes are compare-and-swap loops, so the admitted rate is
    /// global however many workers share the bucket.
    pub fn try_take(&self, rate_per_sec: u64, burst: u64, now: u64) -> bool {
        let cap = burst.max(1) * 1000;
        // Refill: whoever moves `refilled_ms` forward adds the tokens.
        let last = self.refilled_ms.load(Relaxed);
        if last == 0 {
            if self.refilled_ms.compare_exchange(0, now, Relaxed, Relaxed).is_ok() {
                self.milli_tokens.store(cap, Relaxed);
            }
        } else if now > last && self.refilled_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            let add = (now - last) * rate_per_sec; // milli-tokens: rate/s × ms
            let _ = self.milli_tokens.fetch_update(Relaxed, Relaxed, |t| Some((t + add).min(cap)));
        }
        let taken = self.milli_tokens.fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1000)).is_ok();
        if taken {
            self.admitted.fetch_add(1, Relaxed);
        } else {
            self.rejected.fetch_add(1, Relaxed);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_shared_between_mappings() {
        let a = Region::create().unwrap();
        let fd = a.fd.try_clone().unwrap();
        let b = Region::open(fd).unwrap();
        a.shared().backends[7].requests.fetch_add(3, Relaxed);
        assert_eq!(b.shared().backends[7].requests.load(Relaxed), 3);
    }

    #[test]
    fn a_dead_worker_gives_back_its_requests_in_flight() {
        let r = Region::create().unwrap();
        let l = &r.shared().limiters[5];
        l.enter(1);
        l.enter(1);
        l.enter(0);
        r.shared().forget_worker(1);
        assert_eq!(l.in_flight.load(Relaxed), 1);
        l.leave(0);
        assert_eq!(l.in_flight.load(Relaxed), 0);
    }

    #[test]
    fn token_bucket_admits_burst_then_rate() {
        let r = Region::create().unwrap();
        let l = &r.shared().limiters[0];
        let t0 = 1_000;
        let burst = (0..50).filter(|_| l.try_take(100, 20, t0)).count();
        assert_eq!(burst, 20);
        // 100 ms later: 10 more tokens.
        let later = (0..50).filter(|_| l.try_take(100, 20, t0 + 100)).count();
        assert_eq!(later, 10);
    }
}
