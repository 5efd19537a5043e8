//! Fixed-size I/O buffers and the per-worker pool they come from, so that
//! the steady state of the event loop allocates nothing. A buffer is a
//! window `start..end` over its memory; consumed bytes are dropped from the
//! front and the rest is moved down only when room is needed at the back.

/// A byte buffer of fixed capacity.
#[derive(Debug)]
pub struct Buf {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    /// An empty buffer of `n` bytes.
    pub fn with_capacity(n: usize) -> Buf {
        Buf { mem: vec![0; n].into_boxed_slice(), start: 0, end: 0 }
    }

    /// The buffered bytes.
    pub fn data(&self) -> &[u8] {
        &self.mem[self.start..self.end]
    }

    /// Bytes held, not yet consumed.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Holds no unconsumed byte?
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Total size of the backing storage.
    pub fn capacity(&self) -> usize {
        self.mem.len()
    }

    /// Room left for reading, counting the consumed front.
    pub fn room(&self) -> usize {
        self.mem.len() - self.len()
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space at the back, moving the data down first if that space is
    /// less than half of what the front could give back.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.mem.len() - self.end < self.start {
            self.mem.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.mem[self.end..]
    }

    /// Records that `n` bytes were written into [`spare`](Self::spare).
    pub fn fill(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.mem.len());
        self.end += n;
    }

    /// Drops every byte held; the storage stays.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// A free list of equally sized buffers.
#[derive(Debug)]
pub struct BufPool {
    size: usize,
    free: Vec<Buf>,
    max_free: usize,
}

impl BufPool {
    /// A pool of `size`-byte buffers that keeps at most `max_free` idle ones.
    pub fn new(size: usize, max_free: usize) -> BufPool {
        BufPool { size, free: Vec::new(), max_free }
    }

    /// An empty buffer: a pooled one, or a new one when none is idle.
    pub fn get(&mut self) -> Buf {
        self.free.pop().unwrap_or_else(|| Buf::with_capacity(self.size))
    }

    /// Returns a buffer; a full pool (or a buffer of another size, left from
    /// before a reload) lets it go.
    pub fn put(&mut self, mut b: Buf) {
        if self.free.len() < self.max_free && b.capacity() == self.size {
            b.clear();
            self.free.push(b);
        }
    }

    /// Frees every idle buffer and keeps none from now on (a worker handing
    /// its connections to the next generation: what it frees goes back to
    /// the kernel while the new worker takes the load, see `master`'s
    /// `WORKER_MMAP_THRESHOLD_BYTES`).
    pub fn release(&mut self) {
        self.max_free = 0;
        self.free = Vec::new();
    }

    /// The size of every buffer of this pool.
    pub fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_only_when_needed() {
        let mut b = Buf::with_capacity(8);
        b.spare()[..6].copy_from_slice(b"abcdef");
        b.fill(6);
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        // 2 free at the back, 4 at the front: compacts.
        assert_eq!(b.spare().len(), 6);
        assert_eq!(b.data(), b"ef");
        b.consume(2);
        assert!(b.is_empty());
        assert_eq!(b.spare().len(), 8);
    }

    #[test]
    fn a_released_pool_keeps_nothing() {
        let mut p = BufPool::new(8, 4);
        let (a, b) = (p.get(), p.get());
        p.put(a);
        assert_eq!(p.free.len(), 1);
        p.release();
        assert!(p.free.is_empty());
        p.put(b);
        assert!(p.free.is_empty());
        assert_eq!(p.get().capacity(), 8);
    }
}
