//! Recycled WRITE payload buffers, shared by every connection of a server.
//!
//! Why: a write payload lives from its request until the flush that persists it, on
//! whichever threads those run, and is freed in batches of up to the dirty-set bound. Given
//! back to malloc, the batch's memory went to the per-thread arenas the buffers came from,
//! while the next writes, on other threads, grew other arenas: the daemon sat above its
//! resident target in free heap between two trims, and every fresh page cost a fault and a
//! kernel zeroing. Recycled here, a payload buffer is a payload buffer again.
//!
//! A payload is handed on as a plain [`Bytes`] over the buffer's own allocation
//! ([`PooledBuf::freeze`]), and comes back only where a holder that may drop the last
//! reference gives it back with [`PayloadPool::recycle`]: the volume when a flush batch has
//! landed or a dirty block is overwritten, the page cache when it lets go of a block it
//! held by reference. Anywhere else the last drop frees it. Why not a `Bytes` that returns
//! itself on drop (`Bytes::from_owner`, as before): that allocates a reference-count box
//! per write on the connection's thread, freed on the flusher's, so every write paid a
//! malloc slow path on the thread that reads the requests (4% of the daemon's CPU in
//! perf, on the path that sets the request rate).
//!
//! Invariants:
//! - Only payloads of [`POOLED_LEN_MAX`] bytes or less that are whole multiples of
//!   [`POOLED_LEN_STEP`] are pooled, each in the free list of its exact length: a buffer
//!   handed out is exactly the payload, so what the dirty set charges for it (its length)
//!   is what it holds.
//! - The free lists together hold at most `free_bytes_max` bytes; a buffer returned beyond
//!   that is freed. The daemon passes its dirty-set bound: a pooled buffer is in the dirty
//!   set (charged there), held by the page cache (charged there), in flight in a request
//!   (bounded by the request byte budgets), free here, or gone back to the allocator (a
//!   last reference dropped outside the recycling points), and new payloads take free
//!   buffers before anything is allocated, so free and dirty payloads together stay near
//!   that bound. Where they do not (writers held at the dirty limit while the cache
//!   evicts blocks it held by reference), the memory trimmer empties the pool when the
//!   process passes its resident target ([`PayloadPool::release_free`]), as it trims the
//!   allocator's own free memory.
//! - A buffer's old contents are never read: a payload is read over it in full before it
//!   is handed out. (`take` prefetches the next free buffer's first lines into the cache:
//!   a hint to the CPU, not a read.)

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::util::lock;

/// Payload lengths are pooled in steps of this many bytes.
pub const POOLED_LEN_STEP: usize = 4096;
/// Longest payload pooled. Longer payloads (sequential writes) are few per byte written,
/// so what malloc costs them is small beside the copy.
pub const POOLED_LEN_MAX: usize = 128 * 1024;

const CLASSES: usize = POOLED_LEN_MAX / POOLED_LEN_STEP;

/// Counters, for tests and the debug log.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Buffers handed out from a free list.
    pub reused: AtomicU64,
    /// Buffers allocated because their free list was empty.
    pub allocated: AtomicU64,
    /// Buffers freed on return because the pool was full.
    pub dropped: AtomicU64,
}

/// The free buffers of one pooled length.
type FreeList = Mutex<Vec<Box<[u8]>>>;

/// Free lists of payload buffers, one per pooled length.
#[derive(Debug)]
pub struct PayloadPool {
    classes: Box<[FreeList]>,
    free_bytes: AtomicUsize,
    free_bytes_max: usize,
    pub stats: PoolStats,
}

impl PayloadPool {
    /// A pool holding at most `free_bytes_max` bytes of free buffers.
    pub fn new(free_bytes_max: usize) -> Arc<Self> {
        Arc::new(Self {
            classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
            free_bytes: AtomicUsize::new(0),
            free_bytes_max,
            stats: PoolStats::default(),
        })
    }

    /// Bytes of free buffers held now.
    pub fn free_bytes(&self) -> usize {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Free every buffer the pool holds (back to the allocator); returns the bytes freed.
    /// What the memory trimmer calls when the process is above its resident target.
    pub fn release_free(&self) -> u64 {
        let mut freed = 0u64;
        for class in self.classes.iter() {
            let bufs = std::mem::take(&mut *lock(class));
            let n: usize = bufs.iter().map(|b| b.len()).sum();
            self.free_bytes.fetch_sub(n, Ordering::Relaxed);
            freed += n as u64;
        }
        freed
    }

    fn class(len: usize) -> Option<usize> {
        (len > 0 && len <= POOLED_LEN_MAX && len.is_multiple_of(POOLED_LEN_STEP))
            .then(|| len / POOLED_LEN_STEP - 1)
    }

    /// A buffer of exactly `len` bytes with unspecified contents, recycled when one is
    /// free; `None` for a length the pool does not keep.
    pub fn take(&self, len: usize) -> Option<PooledBuf<'_>> {
        let class = Self::class(len)?;
        let recycled = {
            let mut list = lock(&self.classes[class]);
            let b = list.pop();
            if let Some(next) = list.last() {
                prefetch_for_write(next);
            }
            b
        };
        let buf = match recycled {
            Some(b) => {
                self.free_bytes.fetch_sub(len, Ordering::Relaxed);
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                b
            }
            None => {
                self.stats.allocated.fetch_add(1, Ordering::Relaxed);
                vec![0u8; len].into_boxed_slice()
            }
        };
        Some(PooledBuf { buf, pool: self })
    }

    /// Take back the buffer under `b` if `b` is the only reference to all of a buffer
    /// of a pooled length (what [`PooledBuf::freeze`] made, not cloned or sliced since,
    /// or with every other clone gone); otherwise just drop `b`. Returns whether it was
    /// taken back.
    pub fn recycle(&self, b: Bytes) -> bool {
        Self::reclaim(b).is_some_and(|buf| self.give_back(buf))
    }

    /// The buffer under `b` if `b` is the only reference to all of a buffer of a pooled
    /// length.
    fn reclaim(b: Bytes) -> Option<Box<[u8]>> {
        Self::class(b.len())?;
        // Unique and whole: the allocation is exactly `len` bytes, so this moves nothing
        // and allocates nothing. Shared (a clone is alive) or a slice: dropped as usual.
        let v: Vec<u8> = b.try_into_mut().ok()?.into();
        (v.len() == v.capacity()).then(|| v.into_boxed_slice())
    }

    fn give_back(&self, buf: Box<[u8]>) -> bool {
        let len = buf.len();
        let Some(class) = Self::class(len) else {
            return false;
        };
        // Reserve the room first, so concurrent returns never overshoot the bound.
        let reserved = self
            .free_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                (f + len <= self.free_bytes_max).then_some(f + len)
            })
            .is_ok();
        if reserved {
            lock(&self.classes[class]).push(buf);
        } else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }
}

/// Most bytes of a free buffer [`PayloadPool::take`] prefetches: a 4 or 8 KiB payload.
/// Longer copies stream, and the hardware prefetcher keeps up with them; prefetching more
/// would only push other data out of the first-level cache.
const PREFETCH_BYTES_MAX: usize = 8 * 1024;

/// Ask the CPU to bring the start of `b` into its cache, ready to be written, while the
/// caller goes on. Why: [`PayloadPool::take`] hands out the buffer a flush gave back last,
/// whose lines sit in another core's cache or none; copying a 4 KiB payload into it was 18%
/// of the connection thread's CPU under 4 KiB random writes (tools/bench/RESULTS.md,
/// session 24). Each `take` prefetches the buffer the next one will hand out, so the
/// misses overlap with serving the request in between (ab.sh randwrite: 1.09× and 1.18×,
/// the server's CPU per write 10.1 → 8.9 µs). Only a hint: it never faults and changes no
/// memory.
#[cfg(target_arch = "x86_64")]
fn prefetch_for_write(b: &[u8]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
    for off in (0..b.len().min(PREFETCH_BYTES_MAX)).step_by(64) {
        // SAFETY: `off < b.len()`, so the address is inside `b`'s allocation; a prefetch
        // reads and writes nothing.
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(b.as_ptr().add(off).cast()) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_for_write(_: &[u8]) {}

/// A payload buffer being filled; it goes back to its pool if dropped unfrozen (a
/// connection that fails mid-payload). It borrows the pool rather than holding an `Arc`:
/// a clone and a drop of one reference count shared by every connection and the flusher
/// was two contended atomic operations per write on the connection's thread.
#[derive(Debug)]
pub struct PooledBuf<'a> {
    /// Empty only once frozen (an empty box does not allocate).
    buf: Box<[u8]>,
    pool: &'a PayloadPool,
}

impl PooledBuf<'_> {
    /// The buffer as immutable bytes over its own allocation (no allocation here: the
    /// buffer is exactly its length); back to the pool only through
    /// [`PayloadPool::recycle`].
    pub fn freeze(mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.buf))
    }
}

impl AsRef<[u8]> for PooledBuf<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for PooledBuf<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        // `give_back` ignores the empty box `freeze` leaves behind (no pooled length is 0).
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_exactly_sized_and_within_the_bound() {
        let pool = PayloadPool::new(3 * 4096);
        assert!(pool.take(0).is_none());
        assert!(pool.take(4095).is_none());
        assert!(pool.take(POOLED_LEN_MAX + POOLED_LEN_STEP).is_none());
        let mut a = pool.take(4096).unwrap();
        a.as_mut().fill(7);
        let bytes = a.freeze();
        let clone = bytes.clone();
        assert!(!pool.recycle(bytes), "taken back while a clone is alive");
        assert_eq!(pool.free_bytes(), 0);
        assert_eq!(&clone[..], &[7u8; 4096][..]);
        // A slice, or bytes that never came from the pool, are not taken back.
        assert!(!pool.recycle(clone.slice(..POOLED_LEN_STEP / 2)));
        assert!(!pool.recycle(Bytes::from(vec![0u8; 2 * POOLED_LEN_STEP + 1])));
        assert!(pool.recycle(clone), "the last reference");
        assert_eq!(pool.free_bytes(), 4096);
        // The same buffer again (contents unspecified; here the old ones), not a new one.
        let b = pool.take(4096).unwrap();
        assert_eq!(b.as_ref().len(), 4096);
        assert_eq!(pool.stats.reused.load(Ordering::Relaxed), 1);
        assert_eq!(pool.free_bytes(), 0);
        // Other lengths have their own lists; returns past the bound are freed.
        // Dropped unfrozen (a connection that failed mid-payload), a buffer goes back too.
        let c = pool.take(8192).unwrap();
        let d = pool.take(8192).unwrap();
        assert_eq!(c.as_ref().len(), 8192);
        drop(b);
        assert!(pool.recycle(c.freeze()));
        assert!(!pool.recycle(d.freeze()), "past the bound");
        assert_eq!(pool.free_bytes(), 4096 + 8192);
        assert_eq!(pool.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(pool.take(8192).unwrap().as_ref().len(), 8192);
        assert_eq!(pool.stats.reused.load(Ordering::Relaxed), 2);
        // Emptied on demand; later takes allocate again.
        assert_eq!(pool.release_free(), 4096 + 8192);
        assert_eq!(pool.free_bytes(), 0);
        drop(pool.take(4096).unwrap());
        assert_eq!(pool.stats.allocated.load(Ordering::Relaxed), 4);
    }
}
