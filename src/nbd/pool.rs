//! Recycled WRITE payload buffers, shared by every connection of a server.
//!
//! Why: a write payload lives from its request until the flush that persists it, on
//! whichever threads those run, and is freed in batches of up to the dirty-set bound. Given
//! back to malloc, the batch's memory went to the per-thread arenas the buffers came from,
//! while the next writes, on other threads, grew other arenas: the daemon sat above its
//! resident target in free heap between two trims, and every fresh page cost a fault and a
//! kernel zeroing. Recycled here, a payload buffer is a payload buffer again.
//!
//! Invariants:
//! - Only payloads of [`POOLED_LEN_MAX`] bytes or less that are whole multiples of
//!   [`POOLED_LEN_STEP`] are pooled, each in the free list of its exact length: a buffer
//!   handed out is exactly the payload, so what the dirty set charges for it (its length)
//!   is what it holds.
//! - The free lists together hold at most `free_bytes_max` bytes; a buffer returned beyond
//!   that is freed. The daemon passes its dirty-set bound: a pooled buffer is in the dirty
//!   set (charged there), held by the page cache (charged there), in flight in a request
//!   (bounded by the request byte budgets), or free here, and new payloads take free
//!   buffers before anything is allocated, so free and dirty payloads together stay near
//!   that bound. Where they do not (writers held at the dirty limit while the cache
//!   evicts blocks it held by reference), the memory trimmer empties the pool when the
//!   process passes its resident target ([`PayloadPool::release_free`]), as it trims the
//!   allocator's own free memory.
//! - A buffer's old contents are never read: a payload is read over it in full before it
//!   is handed out.

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
    pub fn take(self: &Arc<Self>, len: usize) -> Option<PooledBuf> {
        let class = Self::class(len)?;
        let recycled = lock(&self.classes[class]).pop();
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
        Some(PooledBuf {
            buf,
            pool: Arc::clone(self),
        })
    }

    fn give_back(&self, buf: Box<[u8]>) {
        let len = buf.len();
        let Some(class) = Self::class(len) else {
            return;
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
    }
}

/// A payload buffer that goes back to its pool when dropped (or when the last [`Bytes`]
/// made from it with [`PooledBuf::freeze`] is).
#[derive(Debug)]
pub struct PooledBuf {
    /// Empty only once dropped (an empty box does not allocate).
    buf: Box<[u8]>,
    pool: Arc<PayloadPool>,
}

impl PooledBuf {
    /// The buffer as shared, immutable bytes; it returns to the pool with the last clone.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // `give_back` ignores the empty box left behind (no pooled length is 0).
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
        drop(bytes);
        assert_eq!(pool.free_bytes(), 0, "returned while a clone is alive");
        assert_eq!(&clone[..], &[7u8; 4096][..]);
        drop(clone);
        assert_eq!(pool.free_bytes(), 4096);
        // The same buffer again (contents unspecified; here the old ones), not a new one.
        let b = pool.take(4096).unwrap();
        assert_eq!(b.as_ref().len(), 4096);
        assert_eq!(pool.stats.reused.load(Ordering::Relaxed), 1);
        assert_eq!(pool.free_bytes(), 0);
        // Other lengths have their own lists; returns past the bound are freed.
        let c = pool.take(8192).unwrap();
        let d = pool.take(8192).unwrap();
        assert_eq!(c.as_ref().len(), 8192);
        drop((b, c, d));
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
