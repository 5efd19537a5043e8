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
//! Trust boundary: workers run unprivileged and may be compromised. The
//! memfd is sealed against resizing (`F_SEAL_SHRINK | F_SEAL_GROW`, then
//! `F_SEAL_SEAL`) before any worker sees it, so no process can truncate it
//! under the others' mappings (which would kill them with SIGBUS); keys are
//! hashed into the region with [`KeyHasher`], SipHash-2-4 written here over
//! the key's bytes with a random key stored in the region itself, so a new
//! binary finds the old one's slots and a client cannot aim its keys at
//! another's slots.
//!
//! Owns: the region's layout, creating, sealing and mapping it, worker
//! places, the key hash, the shared clock, the table of backend slots
//! ([`SlotTable`]), the TLS session-ticket keys ([`TicketKeys`]), the
//! fleet limits' leases ([`LeaseShm`]).
//! Must not: hold policy (what counts as a failure lives in `health`).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};

pub mod fleet;
pub mod metrics;
mod slots;
pub use fleet::{FleetShm, LeaseShm};
pub use metrics::MetricsShm;
mod tickets;
pub use slots::SlotTable;
pub use tickets::{TicketKeys, TICKET_KEY_BYTES};

/// Backend slots in a region; addresses get slots for the instance's life.
pub const MAX_BACKENDS: usize = 4096;
/// Rate limiter slots (global throttle, per-business quotas).
pub const MAX_LIMITERS: usize = 4096;
/// Limiter slots a quota's keys may use: all but the throttle's (0) and
/// the quota overflow slot (the last one).
pub const MAX_QUOTA_KEYS: usize = MAX_LIMITERS - 2;
/// The limiter slot shared by quota keys that found no slot of their own.
pub const QUOTA_OVERFLOW_SLOT: usize = MAX_LIMITERS - 1;
/// Module on/off flags (one per compiled-in module).
pub const MAX_MODULES: usize = 64;
/// Worker places whose load is published: two generations of the largest
/// `workers` (512) can run at once during a binary upgrade, and no two
/// live workers ever share a place (see [`Shared::claim_place`]).
pub const MAX_WORKERS: usize = 1024;
/// Worker places (the lowest ones, taken first) whose share of backend
/// connections and of requests in flight is tracked, so that the master
/// can take a dead worker's share back.
pub const ACCOUNTED_WORKERS: usize = 128;
/// Largest rate a token bucket accepts (`rate_per_sec`), so that
/// refill arithmetic stays far from `u64` limits.
pub const MAX_RATE_PER_SEC: u64 = 10_000_000;
/// Largest burst a token bucket accepts.
pub const MAX_BURST: u64 = 10_000_000;
/// Identifies a Pitcher region and its layout version.
const MAGIC: u64 = 0x5049_5443_4845_520a; // "PITCHER" + layout 10
/// Seals every region carries: its size can never change.
const SEALS: SealFlag = SealFlag::from_bits_truncate(
    SealFlag::F_SEAL_SHRINK.bits() | SealFlag::F_SEAL_GROW.bits() | SealFlag::F_SEAL_SEAL.bits(),
);

/// Shared state of one backend address.
#[repr(C)]
#[derive(Debug)]
pub struct BackendShm {
    /// Connections in use by requests, all workers together.
    pub active: AtomicU32,
    /// Consecutive failed requests (count-window detector).
    pub consecutive_failures: AtomicU32,
    /// Requests sent to it, all workers together.
    pub requests: AtomicU64,
    /// Of which failed.
    pub failures: AtomicU64,
    /// Time window detector: window start (shared ms) and its counts.
    pub window_start_ms: AtomicU64,
    /// Requests in the current window.
    pub window_requests: AtomicU32,
    /// Failures in the current window.
    pub window_failures: AtomicU32,
    /// Passive ejection: until when, and how many times so far.
    pub ejected_until_ms: AtomicU64,
    /// Ejections so far.
    pub ejections: AtomicU32,
    /// Active health: 0 = up (or not checked), 1 = down.
    pub down: AtomicU32,
    /// Successful probes in a row.
    pub probe_ok_run: AtomicU32,
    /// Failed probes in a row.
    pub probe_fail_run: AtomicU32,
    /// Probes done.
    pub probes: AtomicU64,
    /// Slow start ramps from this instant (shared ms; 0 = no ramp).
    pub ramp_start_ms: AtomicU64,
    /// Failed requests by kind: connection refused or failed.
    pub fail_connect: AtomicU64,
    /// Connect, read or write timed out.
    pub fail_timeout: AtomicU64,
    /// Closed or reset before or during the response.
    pub fail_reset: AtomicU64,
    /// A malformed response.
    pub fail_invalid: AtomicU64,
    /// A 5xx response.
    pub fail_5xx: AtomicU64,
    /// Requests sent again to another backend after this one failed them.
    pub retries: AtomicU64,
    /// The TLS handshake failed (certificate refused, no common protocol).
    pub fail_tls: AtomicU64,
}

/// A token bucket shared by all workers (global throttle, quotas).
#[repr(C)]
#[derive(Debug)]
pub struct LimiterShm {
    /// Tokens in thousandths, and when they were last refilled.
    pub milli_tokens: AtomicU64,
    /// When tokens were last added (shared ms).
    pub refilled_ms: AtomicU64,
    /// Requests in flight (concurrency limits); each worker place's share
    /// is in [`PlaceCounts`] (given back by the master when a worker dies).
    pub in_flight: AtomicU32,
    /// Fingerprint of the key that owns this slot (0: free).
    pub key: AtomicU64,
    /// Last time (shared ms) a request of the key used this slot: an idle
    /// slot with nothing in flight can be taken by another key.
    pub used_ms: AtomicU64,
    /// Requests let through.
    pub admitted: AtomicU64,
    /// Requests refused.
    pub rejected: AtomicU64,
}

/// Counters of the quota's key table.
#[repr(C)]
#[derive(Debug)]
pub struct QuotaShm {
    /// Requests whose key found no slot of its own (they share the
    /// overflow slot's limits).
    pub overflow: AtomicU64,
    /// Idle slots taken over by a new key.
    pub reclaimed: AtomicU64,
    /// Requests the quota let through, all keys together.
    pub admitted: AtomicU64,
    /// Requests the quota refused, all keys together.
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
    /// The worker's pid (0: no worker at this place).
    pub pid: AtomicU32,
    /// Overload level: 0 normal, 1 non-essential modules off, 2 shedding.
    pub level: AtomicU32,
    /// Event-loop busy ratio over the last measurement, in percent.
    pub busy_percent: AtomicU32,
    /// Requests in flight.
    pub in_flight: AtomicU32,
    /// Times the overload level changed.
    pub level_changes: AtomicU64,
}

/// One worker place's share of the shared counts, so that the master can
/// take back what a worker that died held. Place-major: forgetting a place
/// reads only its own 32 KiB, never a page of the region that no process
/// used (a read of a never-written page of a memfd gives it memory of its
/// own, in the reader: scanning every backend's and limiter's share once
/// cost the master the whole region, ~4.7 MB), and two workers never
/// write the same cache line to count.
#[repr(C)]
#[derive(Debug)]
pub struct PlaceCounts {
    /// Connections to each backend slot in use by requests of this place.
    pub backend_active: [AtomicU32; MAX_BACKENDS],
    /// Requests of this place in flight in each limiter slot.
    pub limiter_in_flight: [AtomicU32; MAX_LIMITERS],
    /// Idle pooled connections of this place to each backend slot.
    pub backend_idle: [AtomicU32; MAX_BACKENDS],
}

/// The region's layout.
#[repr(C)]
#[derive(Debug)]
pub struct Shared {
    magic: AtomicU64,
    /// The key of [`KeyHasher`], drawn when the region is created and kept
    /// with it (so across upgrades).
    hash_key: [AtomicU64; 2],
    /// Backend state, by slot ([`SlotTable`]).
    pub backends: [BackendShm; MAX_BACKENDS],
    /// Token buckets: 0 the global throttle, then quota keys, the last the quota overflow.
    pub limiters: [LimiterShm; MAX_LIMITERS],
    /// Counters of the quota's key table.
    pub quota: QuotaShm,
    /// Fleet leases (tokens taken from Redis) and keys, by limiter slot.
    pub leases: [LeaseShm; MAX_LIMITERS],
    /// Counters of the fleet limits, by module ([`fleet::FLEET_THROTTLE`], [`fleet::FLEET_QUOTA`]).
    pub fleet: [FleetShm; fleet::FLEET_MODULES],
    /// Module switches, by registry index.
    pub modules: [ModuleShm; MAX_MODULES],
    /// Published load, by worker place.
    pub workers: [WorkerShm; MAX_WORKERS],
    /// Who holds each worker place: 0 free, else the pid of the worker
    /// there (or of the master that is starting it).
    places: [AtomicU32; MAX_WORKERS],
    /// Each accounted place's share of the counts above.
    by_place: [PlaceCounts; ACCOUNTED_WORKERS],
    /// The figures of `/metrics` ([`metrics`]).
    pub metrics: MetricsShm,
    /// TLS session-ticket keys, drawn and rotated by the master.
    pub tickets: TicketKeys,
}

/// A mapped region. Mappings are never unmapped while the process runs
/// (a region is created once per instance), so `&'static Shared` is sound.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    shared: &'static Shared,
}

impl Region {
    /// Creates, sizes, seals and maps a fresh, zeroed region.
    pub fn create() -> io::Result<Region> {
        let fd = memfd_create(c"pitcher-shared", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
        nix::unistd::ftruncate(&fd, std::mem::size_of::<Shared>() as i64)?;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(SEALS))?;
        let r = Region::map(fd)?;
        let k = std::collections::hash_map::RandomState::new();
        for (i, slot) in r.shared.hash_key.iter().enumerate() {
            slot.store(std::hash::BuildHasher::hash_one(&k, i), Relaxed);
        }
        r.shared.magic.store(MAGIC, Relaxed);
        Ok(r)
    }

    /// Maps a region received from the master (or the old master). A
    /// region that could still be resized is refused.
    pub fn open(fd: OwnedFd) -> io::Result<Region> {
        let (len, size) = (std::mem::size_of::<Shared>(), nix::sys::stat::fstat(fd.as_raw_fd())?.st_size as usize);
        if size != len {
            return Err(io::Error::other(format!(
                "shared region is {size} bytes, expected {len}: it has another layout (mixed binary versions?)"
            )));
        }
        let seals = SealFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)?);
        if !seals.contains(SEALS) {
            return Err(io::Error::other("shared region is not sealed against resizing"));
        }
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

    /// The mapped region, for the life of the process.
    pub fn shared(&self) -> &'static Shared {
        self.shared
    }

    /// The memfd (to send to workers and a new master).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Shared {
    /// A worker place's process died: its connections to backends and its
    /// requests in flight are gone, take them out of the shared counts.
    /// Only for a place that no live process holds (see
    /// [`Shared::release_place`]).
    pub fn forget_worker(&self, place: usize) {
        if place >= ACCOUNTED_WORKERS {
            if let Some(w) = self.workers.get(place) {
                w.in_flight.store(0, Relaxed);
                w.level.store(0, Relaxed);
            }
            return;
        }
        // Only this place's own row is read; read before writing, so a row
        // entry that is zero stays untouched.
        let row = &self.by_place[place];
        for (b, mine) in self.backends.iter().zip(&row.backend_active) {
            if mine.load(Relaxed) != 0 {
                let n = mine.swap(0, Relaxed);
                let _ = b.active.fetch_update(Relaxed, Relaxed, |a| Some(a.saturating_sub(n)));
            }
        }
        for mine in row.backend_idle.iter().filter(|n| n.load(Relaxed) != 0) {
            mine.store(0, Relaxed);
        }
        // Read before writing here too: a write to a block no worker used
        // would give its page memory.
        if let Some(b) = self.metrics.blocks.get(place).filter(|b| b.active.load(Relaxed) != 0) {
            b.active.store(0, Relaxed);
        }
        for (l, mine) in self.limiters.iter().zip(&row.limiter_in_flight) {
            if mine.load(Relaxed) != 0 {
                let n = mine.swap(0, Relaxed);
                let _ = l.in_flight.fetch_update(Relaxed, Relaxed, |a| Some(a.saturating_sub(n)));
            }
        }
        if let Some(w) = self.workers.get(place) {
            w.in_flight.store(0, Relaxed);
            w.level.store(0, Relaxed);
        }
    }

    /// Takes a worker place for master `master_pid`: the lowest place that
    /// is free, or whose holder is gone (its counts are forgotten first).
    /// Places are shared by every master of the instance (old and new
    /// generations during an upgrade), and taken with compare-and-swap, so
    /// two live workers never share one and an old worker that exits never
    /// clears a new one's counts. `None`: every place is held.
    pub fn claim_place(&self, master_pid: u32) -> Option<usize> {
        for (i, p) in self.places.iter().enumerate() {
            let holder = p.load(Relaxed);
            if holder == 0 {
                if p.compare_exchange(0, master_pid, Relaxed, Relaxed).is_ok() {
                    return Some(i);
                }
            } else if !pid_alive(holder) && p.compare_exchange(holder, master_pid, Relaxed, Relaxed).is_ok() {
                self.forget_worker(i);
                return Some(i);
            }
        }
        None
    }

    /// The worker started at `place` is `worker_pid`: the place is held as
    /// long as that process lives, even if its master does not.
    pub fn hold_place(&self, place: usize, worker_pid: u32) {
        if let Some(p) = self.places.get(place) {
            p.store(worker_pid, Relaxed);
        }
    }

    /// The worker `worker_pid` at `place` exited: forgets its counts and
    /// frees the place. Nothing happens if the place was taken over
    /// meanwhile (by a master that found the worker gone and forgot it).
    pub fn release_place(&self, place: usize, worker_pid: u32, master_pid: u32) {
        let Some(p) = self.places.get(place) else { return };
        // Held by the master while its counts are cleared: nobody can take
        // it and have its new worker's counts cleared.
        if p.compare_exchange(worker_pid, master_pid, Relaxed, Relaxed).is_ok() {
            self.forget_worker(place);
            p.store(0, Relaxed);
        }
    }

    /// Frees the places whose holder is gone (workers of a master that was
    /// killed, a new master rolled back): their counts are forgotten.
    /// Returns how many were freed.
    pub fn reclaim_places(&self) -> usize {
        let mut freed = 0;
        for (i, p) in self.places.iter().enumerate() {
            let holder = p.load(Relaxed);
            if holder != 0 && !pid_alive(holder) && p.compare_exchange(holder, u32::MAX, Relaxed, Relaxed).is_ok() {
                self.forget_worker(i);
                p.store(0, Relaxed);
                freed += 1;
            }
        }
        freed
    }

    /// The holder of a place (0: free), for `ctl`.
    pub fn place_holder(&self, place: usize) -> u32 {
        self.places.get(place).map_or(0, |p| p.load(Relaxed))
    }

    /// A hasher for keys that go into this region (see [`KeyHasher`]).
    pub fn key_hasher(&self) -> KeyHasher {
        KeyHasher::new(self.hash_key[0].load(Relaxed), self.hash_key[1].load(Relaxed))
    }
}

/// Does process `pid` exist? (`kill(pid, 0)`: only "no such process" says
/// no; a process of another user exists.)
fn pid_alive(pid: u32) -> bool {
    if pid == u32::MAX {
        return true; // a place being cleared
    }
    let Ok(raw) = i32::try_from(pid) else { return false };
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None), Err(nix::errno::Errno::ESRCH))
}

/// SipHash-2-4 (Aumasson and Bernstein), written here over the bytes
/// written to it, so that the hash of a key is fixed by this project and
/// not by the compiler's `Hash`/`DefaultHasher` (which may change from one
/// release to the next): a new binary finds the slots of the old one. The
/// key comes from the region ([`Shared::key_hasher`]), drawn at random when
/// the region is created: nobody outside can compute where a key lands.
#[derive(Debug, Clone)]
pub struct KeyHasher {
    v: [u64; 4],
    /// Bytes not yet compressed (fewer than 8), little-endian in `tail`.
    tail: u64,
    ntail: usize,
    len: u64,
}

impl KeyHasher {
    /// A hasher with the 128-bit key `(k0, k1)`.
    pub fn new(k0: u64, k1: u64) -> KeyHasher {
        KeyHasher {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            len: 0,
        }
    }

    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        Self::round(&mut self.v);
        Self::round(&mut self.v);
        self.v[0] ^= m;
    }

    /// Adds bytes to the message.
    pub fn write(&mut self, bytes: &[u8]) -> &mut KeyHasher {
        for &b in bytes {
            self.tail |= u64::from(b) << (8 * self.ntail);
            self.ntail += 1;
            if self.ntail == 8 {
                let m = self.tail;
                self.compress(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
        self.len = self.len.wrapping_add(bytes.len() as u64);
        self
    }

    /// The hash of the bytes written so far.
    pub fn finish(&self) -> u64 {
        let mut h = self.clone();
        let m = h.tail | ((h.len & 0xff) << 56);
        h.compress(m);
        h.v[2] ^= 0xff;
        for _ in 0..4 {
            Self::round(&mut h.v);
        }
        h.v[0] ^ h.v[1] ^ h.v[2] ^ h.v[3]
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

impl Shared {
    /// The counts of worker place `place` (`None` above the accounted places).
    pub fn place_counts(&self, place: usize) -> Option<&PlaceCounts> {
        self.by_place.get(place)
    }

    /// One more request in flight in limiter slot `slot` for worker place
    /// `place`; returns the count before.
    pub fn limiter_enter(&self, slot: usize, place: usize) -> u32 {
        let Some(l) = self.limiters.get(slot) else { return 0 };
        if let Some(c) = self.by_place.get(place).and_then(|r| r.limiter_in_flight.get(slot)) {
            c.fetch_add(1, Relaxed);
        }
        l.in_flight.fetch_add(1, Relaxed)
    }

    /// One request fewer in flight in limiter slot `slot` for worker place `place`.
    pub fn limiter_leave(&self, slot: usize, place: usize) {
        let Some(l) = self.limiters.get(slot) else { return };
        if let Some(c) = self.by_place.get(place).and_then(|r| r.limiter_in_flight.get(slot)) {
            let _ = c.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
        let _ = l.in_flight.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }
}

impl LimiterShm {
    /// Gives the slot to a new key (taken over from an idle one): an empty
    /// bucket that fills to its burst at its first take, no history.
    pub fn reset_for_new_key(&self, now: u64) {
        self.refilled_ms.store(0, Relaxed);
        self.milli_tokens.store(0, Relaxed);
        self.admitted.store(0, Relaxed);
        self.rejected.store(0, Relaxed);
        self.used_ms.store(now, Relaxed);
    }

    /// Takes one token from a bucket of `rate_per_sec` with room for
    /// `burst`; refills lazily from the shared clock. Lock-free: refills
    /// and takes are compare-and-swap loops, so the admitted rate is
    /// global however many workers share the bucket.
    ///
    /// The arithmetic saturates, so no rate, burst or idle time can wrap
    /// it (configurations are bounded by [`MAX_RATE_PER_SEC`] and
    /// [`MAX_BURST`] anyway).
    pub fn try_take(&self, rate_per_sec: u64, burst: u64, now: u64) -> bool {
        let cap = burst.max(1).saturating_mul(1000);
        // Refill: whoever moves `refilled_ms` forward adds the tokens.
        let last = self.refilled_ms.load(Relaxed);
        if last == 0 {
            if self.refilled_ms.compare_exchange(0, now, Relaxed, Relaxed).is_ok() {
                self.milli_tokens.store(cap, Relaxed);
            }
        } else if now > last && self.refilled_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            let add = (now - last).saturating_mul(rate_per_sec); // milli-tokens: rate/s × ms
            let _ = self.milli_tokens.fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_add(add).min(cap)));
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
        let s = r.shared();
        let l = &s.limiters[5];
        s.limiter_enter(5, 1);
        s.limiter_enter(5, 1);
        s.limiter_enter(5, 0);
        s.forget_worker(1);
        assert_eq!(l.in_flight.load(Relaxed), 1);
        s.limiter_leave(5, 0);
        assert_eq!(l.in_flight.load(Relaxed), 0);
    }

    /// Bytes of the region's memfd that have memory (written or read
    /// once): what every process mapping it shares.
    fn bytes_with_memory(r: &Region) -> u64 {
        use nix::unistd::{lseek, Whence};
        let len = std::mem::size_of::<Shared>() as i64;
        let (mut at, mut total) = (0i64, 0u64);
        while at < len {
            let Ok(data) = lseek(r.raw_fd(), at, Whence::SeekData) else { break };
            let hole = lseek(r.raw_fd(), data, Whence::SeekHole).unwrap_or(len);
            total += (hole - data) as u64;
            at = hole;
        }
        total
    }

    /// Regression: forgetting a dead worker's counts read every backend's
    /// and limiter's share, which gave the whole region (4.7 MB) memory in
    /// the master. Now only the place's own row is read.
    #[test]
    fn forgetting_a_worker_reads_only_its_own_row_of_the_region() {
        let r = Region::create().unwrap();
        let s = r.shared();
        s.limiter_enter(4000, 3);
        s.backends[3000].active.fetch_add(1, Relaxed);
        s.by_place[3].backend_active[3000].fetch_add(1, Relaxed);
        let before = bytes_with_memory(&r);
        s.forget_worker(3);
        s.forget_worker(9);
        assert_eq!((s.limiters[4000].in_flight.load(Relaxed), s.backends[3000].active.load(Relaxed)), (0, 0));
        let grown = bytes_with_memory(&r) - before;
        let row = std::mem::size_of::<PlaceCounts>() as u64;
        // Each row may straddle one more page than its size (rows are not
        // page-aligned), and the places' load entries share one page.
        assert!(grown <= 2 * row + 3 * 4096, "forgetting two places gave {grown} bytes memory (a row is {row})");
        assert!((std::mem::size_of::<Shared>() as u64) > 40 * row, "the region is much larger than a row");
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

    #[test]
    fn token_bucket_at_the_bounds_saturates_instead_of_wrapping() {
        let r = Region::create().unwrap();
        // The largest configured rate and burst, after a year idle.
        let l = &r.shared().limiters[1];
        let t0 = 1_000;
        let first = (0..10).filter(|_| l.try_take(MAX_RATE_PER_SEC, MAX_BURST, t0)).count();
        assert_eq!(first, 10);
        let year = 365 * 24 * 3600 * 1000;
        assert!(l.try_take(MAX_RATE_PER_SEC, MAX_BURST, t0 + year));
        assert_eq!(l.milli_tokens.load(Relaxed), MAX_BURST * 1000 - 1000, "refilled to the burst, no more");
        // Absurd values (refused by configuration checks) still cannot wrap.
        let l = &r.shared().limiters[2];
        assert!(l.try_take(u64::MAX, u64::MAX, 1));
        assert!(l.try_take(u64::MAX, u64::MAX, u64::MAX));
        assert_eq!(l.milli_tokens.load(Relaxed), u64::MAX - 1000, "refilled to the (saturated) burst");
        // A rate of 1/s: a token per second, not a wrapped multiple.
        let l = &r.shared().limiters[3];
        assert!(l.try_take(1, 1, 10));
        assert!(!l.try_take(1, 1, 500));
        assert!(l.try_take(1, 1, 1_010));
        assert!(!l.try_take(1, 1, 1_011));
    }

    #[test]
    fn the_region_cannot_be_resized() {
        let r = Region::create().unwrap();
        let seals = fcntl(r.raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        assert_eq!(SealFlag::from_bits_truncate(seals), SEALS);
        let len = std::mem::size_of::<Shared>() as i64;
        for size in [0, len / 2, len + 4096] {
            assert_eq!(nix::unistd::ftruncate(&r.fd, size), Err(nix::errno::Errno::EPERM), "size {size}");
        }
        // Nor can the seals be removed or added to.
        assert_eq!(fcntl(r.raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)), Err(nix::errno::Errno::EPERM));
        r.shared().backends[0].requests.fetch_add(1, Relaxed);
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let fd = memfd_create(c"not-sealed", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, std::mem::size_of::<Shared>() as i64).unwrap();
        let e = Region::open(fd).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
    }

    /// Known answers of SipHash-2-4 from its paper's reference vectors
    /// (key 00 01 .. 0f, messages 00 01 .. of length 0 to 15).
    #[test]
    fn key_hash_is_siphash_2_4_known_answers() {
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..64).collect();
        let hash = |n: usize| KeyHasher::new(k0, k1).write(&msg[..n]).finish();
        assert_eq!(hash(0), 0x726f_db47_dd0e_0e31);
        assert_eq!(hash(1), 0x74f8_39c5_93dc_67fd);
        assert_eq!(hash(7), 0xab02_00f5_8b01_d137);
        assert_eq!(hash(8), 0x93f5_f579_9a93_2462);
        assert_eq!(hash(15), 0xa129_ca61_49be_45e5);
        assert_eq!(hash(63), 0x958a_324c_eb06_4572);
        // Written in pieces or at once: the same message, the same hash.
        let mut h = KeyHasher::new(k0, k1);
        h.write(&msg[..3]).write(&msg[3..11]).write(&msg[11..15]);
        assert_eq!(h.finish(), hash(15));
    }

    #[test]
    fn a_new_mapping_finds_the_same_key_hashes() {
        let a = Region::create().unwrap();
        let b = Region::open(a.fd.try_clone().unwrap()).unwrap();
        let h = |s: &Shared| s.key_hasher().write(b"tenant-42").finish();
        assert_eq!(h(a.shared()), h(b.shared()));
        let other = Region::create().unwrap();
        assert_ne!(h(a.shared()), h(other.shared()), "each instance draws its own key");
    }

    #[test]
    fn places_are_never_shared_by_two_live_workers() {
        let r = Region::create().unwrap();
        let s = r.shared();
        let me = std::process::id();
        // Generation 1: places 0 and 1, held by live processes (us).
        let a = s.claim_place(me).unwrap();
        let b = s.claim_place(me).unwrap();
        s.hold_place(a, me);
        s.hold_place(b, me);
        assert_eq!((a, b), (0, 1));
        // Generation 2 starts while generation 1 runs: other places.
        let c = s.claim_place(me).unwrap();
        s.hold_place(c, me);
        assert_eq!(c, 2);
        s.limiter_enter(9, c);
        s.limiter_enter(9, a);
        // Generation 1's worker exits: only its own counts go.
        s.release_place(a, me, me);
        assert_eq!(s.limiters[9].in_flight.load(Relaxed), 1);
        assert_eq!(s.by_place[c].limiter_in_flight[9].load(Relaxed), 1);
        assert_eq!(s.place_holder(a), 0);
        // A release for a process that no longer holds the place is a no-op.
        s.limiter_enter(9, c);
        s.release_place(c, me + 1, me);
        assert_eq!(s.limiters[9].in_flight.load(Relaxed), 2);
    }

    #[test]
    fn a_place_whose_holder_is_gone_is_forgotten_and_reused() {
        let r = Region::create().unwrap();
        let s = r.shared();
        // A process that has exited (and was reaped): its pid is free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let p = s.claim_place(std::process::id()).unwrap();
        s.hold_place(p, gone);
        s.limiter_enter(4, p);
        s.backends[4].active.fetch_add(1, Relaxed);
        s.by_place[p].backend_active[4].fetch_add(1, Relaxed);
        assert_eq!(s.reclaim_places(), 1);
        assert_eq!(s.limiters[4].in_flight.load(Relaxed), 0);
        assert_eq!(s.backends[4].active.load(Relaxed), 0);
        assert_eq!(s.claim_place(std::process::id()), Some(p));
    }
}
