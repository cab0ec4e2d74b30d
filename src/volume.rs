//! Volumes: one per export, shared by every connection to it, between the NBD layer and the
//! log. Holds the dirty set (writes not yet committed) and reads through a shared, bounded
//! page cache; turns FLUSH into a log commit.
//!
//! Invariants:
//! - Read precedence: dirty set, then the batches being flushed (newest first; at most
//!   [`FLUSH_PIPELINE_DEPTH`], their manifests landing one at a time in the order they were
//!   taken), then the cache, then the store. The cache only ever holds a block's latest committed value: a commit updates
//!   (or drops) the cache entries of everything it wrote *after* the index changed, and a
//!   cache fill from the store inserts a block only if, under the cache lock, the index
//!   still points where the bytes came from.
//! - `flush()` returns Ok only after a commit covering every write that completed before
//!   the call has landed (group commit: one commit may cover many flush calls).
//! - A failed commit puts its batch, and every newer batch in flight (which must not land
//!   without it), back under the dirty set (newer writes win), so the data is retried by
//!   the next flush; nothing is dropped.
//! - Memory: dirty + flushing bytes are charged to one [`DirtyBudget`] shared by all
//!   volumes; writers wait at the limit, a background flush starts at the high-water mark.
//!   A writer that has waited [`VolumeConfig::write_stall_max`] while the latest flush to
//!   land or fail failed asks the flushers to try again at once (not after their backoff)
//!   and gets EIO when a batch taken after that has failed too: the store is failing now,
//!   and waiting longer would turn an outage into a hung device. Its data is not taken;
//!   what is dirty stays dirty. (Without the fresh try, a store back for seconds still
//!   failed writes until the flushers' next retry, up to 10 s later.)
//!   The page cache is one map of block chunks shared by all volumes (CLOCK eviction: see
//!   [`ClockMap`]), bounded in bytes
//!   together with the volumes' page indexes; bytes it has handed out never change
//!   (copy-on-write). Write payload buffers go back to the server's pool where the dirty
//!   set, a landed batch or the cache drops them, and only when that drop is the last
//!   reference (`PayloadPool::recycle` checks): a buffer is never reused while anything
//!   can still read it.
//! - Exports ([`Exports`]): one volume per name, shared by its connections. One that no
//!   connection has used for `idle_close` is closed: taken out of the open set under the
//!   registry's lock, compactor stopped, final flush, lease released; an open of that name
//!   meanwhile waits, then opens it afresh (a new writer must not fence a flush in
//!   progress), and the shutdown waits for it too. A close whose flush fails puts the
//!   volume back whole, data and all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::log::compact::{
    frame_blocks_for, spawn_compactor, CompactConfig, CompactorHandle, CompactorStats,
};
use crate::log::index::Val;
use crate::log::lease::{spawn_lease, LeaseHandle, LEASE_INTERVAL_DEFAULT};
use crate::log::{BatchEntry, Geometry, Log, LogConfig, LogError, OpenMode, Update};
use crate::nbd::pool::PayloadPool;
use crate::nbd::{
    BlockExport, Errno, ExportError, ExportProvider, ReadChunk, STATE_HOLE, STATE_ZERO,
};
use crate::store::DynStore;
use crate::util::{BlockRunMap, ClockMap, RangeMap, RangeValue};

/// Memory charged per dirty run on top of its data, so runs without data (trims) are
/// bounded too: what a one-block run costs in the dirty set's hash map at worst, its
/// bucket plus control byte at the 7/16 load right after the table doubled (130 bytes; a
/// longer run's tree entry costs ~100 in a 2/3-full B-tree node).
const DIRTY_RUN_OVERHEAD_BYTES: usize = (std::mem::size_of::<(u64, Dirty)>() + 1) * 16 / 7;
/// Flush batches in flight at once: the next batch's segments upload while the previous
/// one waits for its slowest PUTs, lands its manifest and refreshes the cache (with one at
/// a time, the upload slots sat idle through all of that: ~0.3 s of every ~1.3 s flush of
/// 128 MiB against SeaweedFS). Their manifests still land one at a time, oldest first.
/// Memory is unchanged: every batch is charged to the dirty budget until it lands, and
/// uploads share the log's slots.
const FLUSH_PIPELINE_DEPTH: usize = 2;
/// A FLUSH whose writes were taken by other callers' batches gives up (EIO) when that
/// many such batches failed in turn, instead of waiting on the next one indefinitely.
const FLUSH_COVERED_FAILURES_MAX: u32 = 3;
/// A final flush at shutdown that fails is tried again after this long, then twice as
/// long each time up to [`FINAL_FLUSH_RETRY_MAX`] (`Exports::close_all_retrying`).
pub const FINAL_FLUSH_RETRY_FIRST: Duration = Duration::from_secs(1);
pub const FINAL_FLUSH_RETRY_MAX: Duration = Duration::from_secs(30);
/// Single-block runs the spare dirty map keeps room for (see `State::spare_dirty`): a
/// 256 MiB batch of 4 KiB random writes, in a table of ~4 MiB that sits unused between
/// batches (uncharged: the budget charges runs in use).
const SPARE_DIRTY_SINGLES_MAX: usize = 1 << 16;
/// Partial-block writes lock one of these stripes for their read-modify-write.
const RMW_STRIPES: usize = 64;
/// Times one read looks the index up again after a frame vanished under it (moved by
/// compaction, then deleted by GC).
const READ_RELOOKUPS_MAX: u32 = 3;
/// Memory charged per page-index run: a B-tree entry is 48 bytes, and nodes are half to
/// two-thirds full (measured: 76 bytes per run inserted at random, 96 in ascending order).
pub const INDEX_BYTES_PER_EXTENT: usize = 96;

/// Page-index memory of a device written all over and fully defragmented: one run per
/// frame of `frame_bytes` (the least defragmentation can reach), as charged
/// ([`INDEX_BYTES_PER_EXTENT`] per run).
pub fn index_floor_bytes(geometry: Geometry, frame_bytes: usize) -> u64 {
    let frames = geometry.size_bytes.div_ceil(frame_bytes.max(1) as u64);
    frames.saturating_mul(INDEX_BYTES_PER_EXTENT as u64)
}

/// Page-index runs that `bytes` of memory hold, as charged ([`INDEX_BYTES_PER_EXTENT`]):
/// how a memory bound on the index (`--index-max`) becomes a bound on runs.
pub fn index_runs_in(bytes: u64) -> usize {
    usize::try_from(bytes / INDEX_BYTES_PER_EXTENT as u64).unwrap_or(usize::MAX)
}
/// Estimated bytes per index extent while a background checkpoint is built: the decoded
/// `Index` (as above) plus the checkpoint's entry list and encoded body made from it.
const CHECKPOINT_BUILD_BYTES_PER_EXTENT: usize = 2 * INDEX_BYTES_PER_EXTENT;
/// Blocks a commit's cache update handles per hold of the cache lock.
const CACHE_UPDATE_BLOCKS_PER_LOCK: usize = 256;
/// Frames one read (or readahead) fetches from the store at once.
const FRAME_FETCHES_PER_READ_MAX: usize = 16;
/// Frame fetches in flight at once across every volume sharing a page cache (the daemon),
/// counted in frames: a fetch takes a permit per frame it fetches, up to
/// [`FRAME_FETCHES_PER_READ_MAX`], all at once, and keeps them until its frames are in
/// hand. What bounds the memory of cold reads, readahead and `CACHE`: at most 64 GETs
/// (each ≤ `READ_SPAN_BYTES_MAX`, or one larger frame), and, for warming, at most 64
/// decoded frames (each ≤ `FRAME_RAW_BYTES_MAX`), since a warm fetches at most
/// [`FRAME_FETCHES_PER_READ_MAX`] frames per round and hands them to the cache before the
/// next. A read may decode more frames than it holds permits (256 single-block frames in
/// a 1 MiB read after random writes), but those are what it returns: its request's byte
/// budget covers them, plus at most the two frames that overhang its ends. Before, a
/// permit was a GET, however many frames it carried, and a warm held every frame of its
/// range until the last one came: 64 concurrent 32 MiB `CACHE` requests of
/// well-compressed data could hold ~2 GiB of decoded frames; and earlier still only each
/// request was bounded, so 128 cold 4 KiB reads in flight on one connection could hold
/// 128 fetches. 64: four reads' full fan-out, and more concurrent GETs than a 2-core
/// machine decodes.
pub const FRAME_FETCHES_MAX: usize = 64;
/// A frame as a read's fetch returns it.
type FetchedFrame = Result<Arc<crate::format::Frame>, VolumeError>;

/// Read replies take blocks of frames up to this size by reference; from larger frames
/// (only compaction writes them, see `frame_blocks_for`) they copy, so what a reply holds
/// stays within 128 KiB or twice its own length.
const SLICED_FRAME_BYTES_MAX: u64 = 128 << 10;
/// Longest GET of neighbouring frames (those at most the store's `request_cost_bytes`
/// apart) a read makes: a read holds at most 16 x 1 MiB of GET buffers.
const READ_SPAN_BYTES_MAX: u64 = 1 << 20;
/// Blocks a single BLOCK_STATUS answer looks at (a prefix answer is allowed by the spec).
const BLOCK_STATUS_BLOCKS_MAX: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Page cache size, shared by all volumes.
    pub cache_bytes_max: u64,
    /// Dirty + flushing bytes, shared by all volumes; writers wait at this limit.
    pub dirty_bytes_max: u64,
    /// A background flush starts above this share of `dirty_bytes_max`.
    pub dirty_high_water_ratio: f64,
    /// Longest time written data stays only in memory.
    pub flush_interval: Duration,
    /// Bytes read ahead after a sequential read.
    pub readahead_bytes_max: u64,
    /// A write that found the dirty set full and has waited this long while flushes keep
    /// failing gets EIO instead of waiting on; `None` waits as long as the outage lasts.
    pub write_stall_max: Option<Duration>,
    /// How often a writable export's lease is refreshed (see [`LEASE_INTERVAL_DEFAULT`]).
    pub lease_interval: Duration,
    /// Where write payload buffers go back when the dirty set, a landed flush batch or
    /// the page cache lets go of them (the server's pool: see [`crate::nbd::pool`]);
    /// `None`: they are freed. Like `cache_bytes_max`, it builds the page cache the
    /// exports share ([`PageCache::with_payload_pool`]); volumes use the cache's.
    pub payload_pool: Option<Arc<PayloadPool>>,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            cache_bytes_max: 256 << 20,
            dirty_bytes_max: 256 << 20,
            dirty_high_water_ratio: 0.5,
            flush_interval: Duration::from_secs(5),
            readahead_bytes_max: 4 << 20,
            write_stall_max: Some(Duration::from_secs(30)),
            lease_interval: LEASE_INTERVAL_DEFAULT,
            payload_pool: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("read-only export")]
    ReadOnly,
    #[error("export is shutting down")]
    ShuttingDown,
    #[error("no room in the dirty set after waiting {waited:?}: flushes to the store are failing")]
    Stalled { waited: Duration },
}

impl VolumeError {
    /// Whether trying the same flush again may succeed: the store failed for a transient
    /// reason (after its own retries), or a batch holding the writes failed and put them
    /// back (the next attempt meets whatever made it fail). Fencing, corruption, invalid
    /// requests and permanent store errors would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            VolumeError::Log(LogError::Store(crate::store::StoreError::Transient { .. }))
                | VolumeError::Log(LogError::Internal(_))
        )
    }
}

impl From<VolumeError> for ExportError {
    fn from(e: VolumeError) -> Self {
        let errno = match &e {
            VolumeError::ReadOnly => Errno::Perm,
            VolumeError::ShuttingDown => Errno::Shutdown,
            VolumeError::Stalled { .. } => Errno::Io,
            VolumeError::Log(LogError::ReadOnly) => Errno::Perm,
            VolumeError::Log(LogError::Invalid(_)) => Errno::Inval,
            VolumeError::Log(_) => Errno::Io,
        };
        ExportError::new(errno, e.to_string())
    }
}

/// A dirty run's content.
#[derive(Debug, Clone)]
enum Dirty {
    /// Exactly the run's blocks; `.1` is the block size (so the run can be cut without
    /// context), `.2` the length of the allocation the bytes live in.
    Data(Bytes, u32, usize),
    Unmap,
    ZeroAlloc,
}

impl Dirty {
    fn data(b: Bytes, bs: u32) -> Self {
        let n = b.len();
        Dirty::Data(b, bs, n)
    }
    /// A sub-slice; copied out when it would pin an allocation over 4x its size, so memory
    /// held by the dirty set stays within 4x of what the budget is charged.
    fn sub(b: &Bytes, bs: u32, backing: usize, range: std::ops::Range<usize>) -> Self {
        let n = range.end - range.start;
        if n * 4 < backing {
            Dirty::Data(Bytes::copy_from_slice(&b[range]), bs, n)
        } else {
            Dirty::Data(b.slice(range), bs, backing)
        }
    }
}

impl RangeValue for Dirty {
    fn advance(&self, blocks: u64) -> Self {
        match self {
            Dirty::Data(b, bs, backing) => {
                Dirty::sub(b, *bs, *backing, blocks as usize * *bs as usize..b.len())
            }
            Dirty::Unmap => Dirty::Unmap,
            Dirty::ZeroAlloc => Dirty::ZeroAlloc,
        }
    }
    fn clip(&self, blocks: u64) -> Self {
        match self {
            Dirty::Data(b, bs, backing) => {
                Dirty::sub(b, *bs, *backing, 0..blocks as usize * *bs as usize)
            }
            other => other.clone(),
        }
    }
}

/// Dirty-memory budget shared by all volumes of a daemon.
#[derive(Debug)]
pub struct DirtyBudget {
    used: AtomicUsize,
    max: usize,
    high_water: usize,
    freed: Notify,
    /// Volumes' flushers listen here to start a flush above the high-water mark.
    pressure: Notify,
    /// The latest flush batch to land or fail (any volume's: they share one store) failed.
    /// Writers waiting for room give up only while this is set, so a slow store (flushes
    /// landing, just late) never fails a write, and one flush that lands clears it.
    flushes_failing: AtomicBool,
    /// Flush batches taken so far by every volume; a batch's number is the count when it
    /// was taken (see [`DirtyBudget::take_batch_number`]).
    batches_taken: AtomicU64,
    /// Number of the newest batch that failed (0: none yet).
    newest_failed: AtomicU64,
    /// A writer about to give up wants a flush tried now: flushers skip their backoff
    /// until one of them takes a batch (see [`DirtyBudget::acquire`]).
    retry_wanted: AtomicBool,
    /// Wakes the flushers when `retry_wanted` is set.
    retry: Notify,
}

impl DirtyBudget {
    pub fn new(max: u64, high_water_ratio: f64) -> Arc<Self> {
        let max = max.max(1 << 20) as usize;
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            high_water: ((max as f64) * high_water_ratio.clamp(0.05, 1.0)) as usize,
            freed: Notify::new(),
            pressure: Notify::new(),
            flushes_failing: AtomicBool::new(false),
            batches_taken: AtomicU64::new(0),
            newest_failed: AtomicU64::new(0),
            retry_wanted: AtomicBool::new(false),
            retry: Notify::new(),
        })
    }
    /// Number a flush batch being taken (1, 2, …, across all volumes).
    fn take_batch_number(&self) -> u64 {
        self.batches_taken.fetch_add(1, Ordering::AcqRel) + 1
    }
    /// Record how flush batch `number` ended (see `flushes_failing`).
    fn note_flush(&self, number: u64, ok: bool) {
        if !ok {
            self.newest_failed.fetch_max(number, Ordering::AcqRel);
        }
        self.flushes_failing.store(!ok, Ordering::Release);
    }
    /// Ask the flushers for a batch now, past their backoff.
    fn want_retry(&self) {
        self.retry_wanted.store(true, Ordering::Release);
        self.retry.notify_waiters();
    }
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
    /// Charge `n` bytes if they fit now (or nothing else is charged); above the high-water
    /// mark, ask the flushers to start.
    fn try_charge(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Acquire);
        while cur == 0 || cur + n <= self.max {
            match self
                .used
                .compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if cur + n > self.high_water {
                        self.pressure.notify_waiters();
                    }
                    return true;
                }
                Err(now) => cur = now,
            }
        }
        false
    }
    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
    /// Charge `n` bytes, waiting while the budget is full (a single request larger than
    /// the whole budget is admitted when nothing else is charged, so it cannot deadlock).
    /// Gives up, charging nothing, once it has waited `stall_max` while flushes are
    /// failing (`flushes_failing`) and a batch taken after that (asked for at once, past
    /// the flushers' backoff) has failed as well; at the latest after twice `stall_max`
    /// while they still fail, should no flusher take a batch.
    async fn acquire(&self, n: usize, stall_max: Option<Duration>) -> Result<(), VolumeError> {
        // With room (the common case) no waiter is registered: that takes the Notify's
        // lock twice, on every write.
        if self.try_charge(n) {
            return Ok(());
        }
        let started = Instant::now();
        // Batches taken when this writer asked for a fresh try; any failing after that
        // number tell it the store is failing now.
        let mut probe: Option<u64> = None;
        loop {
            // Registered before the check, so a release between the two wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_charge(n) {
                return Ok(());
            }
            let waited = started.elapsed();
            if let Some(max) = stall_max {
                if waited >= max && self.flushes_failing.load(Ordering::Acquire) {
                    match probe {
                        None => {
                            probe = Some(self.batches_taken.load(Ordering::Acquire));
                            self.want_retry();
                        }
                        Some(asked) => {
                            if self.newest_failed.load(Ordering::Acquire) > asked
                                || waited >= max.saturating_mul(2)
                            {
                                return Err(VolumeError::Stalled { waited });
                            }
                        }
                    }
                }
            }
            self.pressure.notify_waiters();
            // Bounded wait so a missed wake-up can only delay, never hang.
            let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
        }
    }
}

/// Page cache shared by all volumes, in chunks of consecutive blocks: a chunk is one
/// contiguous buffer of [`CACHE_CHUNK_BYTES`] (or one block, if blocks are larger) plus a
/// bitmap of which of its blocks are valid, keyed by (volume id, chunk number), in one
/// [`ClockMap`] bounded in bytes: chunks read since they came in outlive those that were
/// not, a hit costs one bit (no list to reorder).
///
/// Why chunks, not blocks: with one allocation per 4 KiB block a cached 1 MiB read touched
/// 256 scattered buffers and refcounts (after random writes the blocks sit all over the
/// heap) and ran at half of nbdkit's RAM disk; a chunk keeps neighbours contiguous, and
/// the 8 slices taken from one chunk share one refcount. The cost: a lone cached block
/// occupies a whole chunk (8x at 4 KiB blocks) — the same trade nbdkit's 32 KiB pages make.
///
/// The budget also covers the open volumes' page indexes (estimated at
/// [`INDEX_BYTES_PER_EXTENT`] per run, updated at every commit) and the directories of
/// their manifests' tails, which the next checkpoint replays (what they allocate, ~32
/// bytes per entry; up to max(256k, 2 × the index's runs) entries): chunks get what the
/// indexes leave, so `--cache-size` bounds cache and index together for as long as the
/// indexes fit in it.
///
/// Blocks handed out are `Bytes` slices of a chunk's buffer. A write into a chunk whose
/// buffer is still referenced by such a slice copies the buffer first (copy-on-write), so
/// data already handed out never changes.
pub struct PageCache {
    inner: Mutex<CacheInner>,
    /// Frame fetches (GETs and their decoding) of all volumes sharing this cache:
    /// [`FRAME_FETCHES_MAX`] permits, one per frame being fetched.
    fetches: tokio::sync::Semaphore,
    /// Where payload buffers go back (see [`PageCache::with_payload_pool`]); the same
    /// pool as `CacheInner::pool`, readable without the lock.
    pool: Option<Arc<PayloadPool>>,
}

/// See [`PageCache::usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    pub chunk_bytes: usize,
    pub index_bytes: usize,
}

/// Bytes per cache chunk (block sizes above this get one-block chunks).
pub const CACHE_CHUNK_BYTES: usize = 32 * 1024;

#[derive(Default)]
struct Chunk {
    /// The chunk's buffer, `chunk_blocks * bs` long; empty while every valid block is
    /// still in `pending`.
    data: Bytes,
    /// Bit i: block i of the chunk is valid (in `data`, or in `pending` if listed there).
    present: u64,
    /// Committed blocks held by reference to the buffers they were written in (block
    /// index, the block, bytes charged for its allocation). Copied into `data` on the
    /// chunk's first read: a commit after random writes then costs a refcount per block
    /// instead of a cold 4 KiB copy, and data never read back is never copied.
    pending: Vec<(u8, Bytes, usize)>,
}

impl Chunk {
    /// Bytes charged to the cache for this chunk.
    fn charge(&self) -> usize {
        self.data.len() + self.pending.iter().map(|p| p.2).sum::<usize>()
    }

    /// Take block `i` out of `pending`, if there (at most once: a block is unpended
    /// before it is pended again).
    fn unpend(&mut self, i: usize) -> Option<Bytes> {
        let at = self.pending.iter().position(|p| p.0 as usize == i)?;
        Some(self.pending.swap_remove(at).1)
    }

    /// `data` as a writable buffer of `len` bytes: allocated if empty, copied if a slice
    /// handed out still references it (bytes handed out never change).
    fn data_mut(&mut self, len: usize) -> BytesMut {
        let data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return BytesMut::zeroed(len);
        }
        data.try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
    }

    /// Copy every pending block into `data`; the blocks' buffers go back to `pool`.
    fn materialize(&mut self, bs: usize, pool: Option<&PayloadPool>) {
        if self.pending.is_empty() {
            return;
        }
        let mut m = self.data_mut(chunk_blocks(bs) as usize * bs);
        for (i, b, _) in self.pending.drain(..) {
            let i = i as usize;
            m[i * bs..(i + 1) * bs].copy_from_slice(&b);
            recycle(pool, b);
        }
        self.data = m.freeze();
    }

    /// Let go of every pending block, their buffers back to `pool`.
    fn drop_pending(&mut self, pool: Option<&PayloadPool>) {
        for (_, b, _) in self.pending.drain(..) {
            recycle(pool, b);
        }
    }
}

/// Give a payload buffer back to `pool` if nothing else holds it (else just drop it).
fn recycle(pool: Option<&PayloadPool>, b: Bytes) {
    if let Some(p) = pool {
        p.recycle(b);
    }
}

/// The cache under its lock. Methods take the volume's block size: a volume always uses the
/// same one, so a chunk's layout never changes.
struct CacheInner {
    chunks: ClockMap<(u64, u64), Chunk>,
    /// Where blocks held by reference go back when the cache lets go of them.
    pool: Option<Arc<PayloadPool>>,
    /// Sum of the chunks' `charge()`.
    bytes: usize,
    bytes_max: usize,
    /// Estimated memory of the open volumes' page indexes, charged to the same budget:
    /// the chunks get what the indexes leave (at least one chunk).
    index_bytes: usize,
}

fn chunk_blocks(bs: usize) -> u64 {
    (CACHE_CHUNK_BYTES / bs).clamp(1, 64) as u64
}

/// One block's slot in a read (see [`Volume::read_blocks`]): `None` while unknown,
/// `Some(None)` for zeros, `Some(Some(bytes))` for data. Data may cover several blocks:
/// a stretch of neighbouring blocks that come from one buffer is one slice, held by the
/// stretch's first slot, and the slots after it that it covers hold an empty `Bytes`.
/// One slice per stretch instead of one per block: a cached 1 MiB read was 256 refcounted
/// slices and as many iovecs, now one per cache chunk.
type Slot = Option<Option<Bytes>>;

/// Fill the empty slots `j` of `slots` for which `avail(j)` holds from `src`, whose block
/// `j` is `src[off + j * bs..][..bs]`: one slice (or copy, with `copy`) per stretch of
/// such slots (see [`Slot`]).
fn fill_stretches(
    slots: &mut [Slot],
    src: &Bytes,
    off: usize,
    bs: usize,
    copy: bool,
    avail: impl Fn(usize) -> bool,
) {
    let n = slots.len();
    let mut j = 0;
    while j < n {
        let start = j;
        while j < n && slots[j].is_none() && avail(j) {
            j += 1;
        }
        if j == start {
            j += 1; // filled already, or not in `src`
            continue;
        }
        let range = off + start * bs..off + j * bs;
        slots[start] = Some(Some(if copy {
            Bytes::copy_from_slice(&src[range])
        } else {
            src.slice(range)
        }));
        for slot in &mut slots[start + 1..j] {
            *slot = Some(Some(Bytes::new()));
        }
    }
}

impl CacheInner {
    fn locate(key: (u64, u64), bs: usize) -> ((u64, u64), usize) {
        let cb = chunk_blocks(bs);
        ((key.0, key.1 / cb), (key.1 % cb) as usize)
    }

    /// Fill the empty slots of blocks `lba..lba + slots.len()` of volume `vol` from the
    /// cache: one lookup per chunk, not per block, and one slice per stretch of
    /// blocks taken from a chunk (see [`Slot`]).
    fn fill_slots(&mut self, vol: u64, lba: u64, slots: &mut [Slot], bs: usize) {
        let cb = chunk_blocks(bs);
        let end = lba + slots.len() as u64;
        let mut at = lba;
        while at < end {
            let chunk_end = (at / cb + 1) * cb;
            let run = at..chunk_end.min(end);
            let wanted = run.clone().any(|b| slots[(b - lba) as usize].is_none());
            if wanted {
                if let Some(c) = self.chunks.get_mut(&(vol, at / cb)) {
                    if !c.pending.is_empty() {
                        let before = c.charge();
                        c.materialize(bs, self.pool.as_deref());
                        let after = c.charge();
                        self.bytes = self.bytes + after - before;
                    }
                    let first = (run.start % cb) as usize;
                    let present = c.present;
                    fill_stretches(
                        &mut slots[(run.start - lba) as usize..(run.end - lba) as usize],
                        &c.data,
                        first * bs,
                        bs,
                        false,
                        |j| present & (1 << (first + j)) != 0,
                    );
                }
            }
            at = run.end;
        }
        self.evict();
    }

    /// Whether block `key` is cached (does not count as a use).
    fn contains(&self, key: (u64, u64), bs: usize) -> bool {
        let (ck, i) = Self::locate(key, bs);
        self.chunks
            .peek(&ck)
            .is_some_and(|c| c.present & (1 << i) != 0)
    }

    /// Cache a copy of `block` (exactly `bs` bytes) as the content of `key`.
    fn put(&mut self, key: (u64, u64), block: &[u8], bs: usize) {
        self.put_block(key, block, None, bs);
    }

    /// Cache `block` (exactly `bs` bytes, in an allocation of `charge` bytes) as the
    /// content of `key`: by reference while its chunk has no buffer (copied in when the
    /// chunk is next read), else copied into the buffer.
    fn put_shared(&mut self, key: (u64, u64), block: &Bytes, charge: usize, bs: usize) {
        self.put_block(key, block, Some((block, charge)), bs);
    }

    /// One lookup per block for both kinds of put.
    fn put_block(
        &mut self,
        key: (u64, u64),
        block: &[u8],
        by_ref: Option<(&Bytes, usize)>,
        bs: usize,
    ) {
        let (ck, i) = Self::locate(key, bs);
        let len = chunk_blocks(bs) as usize * bs;
        let c = self.chunks.get_or_insert_mut(ck, Chunk::default);
        let before = c.charge();
        if let Some(old) = c.unpend(i) {
            recycle(self.pool.as_deref(), old);
        }
        match by_ref {
            // Only while the chunk has no buffer: with one, a copy costs no more memory
            // than the block, where holding the block too would charge it twice. Block
            // indices fit in u8: a chunk has at most 64 blocks.
            Some((b, charge)) if c.data.is_empty() => c.pending.push((i as u8, b.clone(), charge)),
            _ => {
                let mut m = c.data_mut(len);
                m[i * bs..(i + 1) * bs].copy_from_slice(block);
                c.data = m.freeze();
            }
        }
        c.present |= 1 << i;
        self.bytes = self.bytes + c.charge() - before;
        self.evict();
    }

    /// Cache `data` (exactly one chunk's blocks, `chunk_blocks * bs` bytes) as the whole of
    /// chunk `(vol, chunk)`: one lookup and one copy, where block by block a chunk not
    /// cached yet cost a zeroed allocation and a lookup per block. Slices handed out keep
    /// the old contents (a shared buffer is replaced, never written).
    fn put_chunk(&mut self, vol: u64, chunk: u64, data: &[u8], bs: usize) {
        let c = self.chunks.get_or_insert_mut((vol, chunk), Chunk::default);
        let before = c.charge();
        c.drop_pending(self.pool.as_deref());
        // The chunk's own buffer when nothing else holds it (a cache that already holds the
        // chunk, rewritten: no allocation); a new one otherwise.
        c.data = match std::mem::take(&mut c.data).try_into_mut() {
            Ok(mut m) if m.len() == data.len() => {
                m.copy_from_slice(data);
                m.freeze()
            }
            _ => Bytes::copy_from_slice(data),
        };
        let cb = chunk_blocks(bs);
        c.present = if cb == 64 { u64::MAX } else { (1 << cb) - 1 };
        self.bytes = self.bytes + c.charge() - before;
        self.evict();
    }

    /// Evict chunks (in CLOCK order) until within the byte bound.
    fn evict(&mut self) {
        let limit = self
            .bytes_max
            .saturating_sub(self.index_bytes)
            .max(CACHE_CHUNK_BYTES);
        while self.bytes > limit {
            match self.chunks.pop_victim() {
                Some((_, mut c)) => {
                    self.bytes -= c.charge();
                    c.drop_pending(self.pool.as_deref());
                }
                None => break,
            }
        }
    }

    /// Forget block `key`.
    fn pop(&mut self, key: (u64, u64), bs: usize) {
        let (ck, i) = Self::locate(key, bs);
        let Some(c) = self.chunks.peek_mut(&ck) else {
            return;
        };
        let before = c.charge();
        if let Some(old) = c.unpend(i) {
            recycle(self.pool.as_deref(), old);
        }
        c.present &= !(1 << i);
        let (empty, after) = (c.present == 0, c.charge());
        self.bytes = self.bytes + after - before;
        if empty {
            if let Some(mut c) = self.chunks.pop(&ck) {
                self.bytes -= c.charge();
                c.drop_pending(self.pool.as_deref());
            }
        }
    }
}

impl PageCache {
    /// A cache of at most `bytes_max` bytes of chunk buffers (at least one chunk).
    pub fn new(bytes_max: u64) -> Arc<Self> {
        Self::with_payload_pool(bytes_max, None)
    }

    /// Like [`PageCache::new`], giving write payload buffers it held by reference back to
    /// `pool` when it lets go of them; the volumes using this cache give theirs back to
    /// the same pool.
    pub fn with_payload_pool(bytes_max: u64, pool: Option<Arc<PayloadPool>>) -> Arc<Self> {
        let bytes_max = usize::try_from(bytes_max)
            .unwrap_or(usize::MAX)
            .max(CACHE_CHUNK_BYTES);
        Arc::new(Self {
            inner: Mutex::new(CacheInner {
                chunks: ClockMap::new(),
                pool: pool.clone(),
                bytes: 0,
                bytes_max,
                index_bytes: 0,
            }),
            fetches: tokio::sync::Semaphore::new(FRAME_FETCHES_MAX),
            pool,
        })
    }

    /// The pool payload buffers go back to, if any.
    fn payload_pool(&self) -> Option<&PayloadPool> {
        self.pool.as_deref()
    }
    /// What the cache holds now: chunk bytes and the page-index bytes charged to it.
    pub fn usage(&self) -> CacheUsage {
        let g = self.lock();
        CacheUsage {
            chunk_bytes: g.bytes,
            index_bytes: g.index_bytes,
        }
    }

    /// A volume's index estimate changed from `before` to `now` bytes; evicts chunks as
    /// needed so chunks and indexes together stay within the cache size.
    fn recharge_index(&self, before: usize, now: usize) {
        let mut g = self.lock();
        g.index_bytes = g.index_bytes.saturating_sub(before).saturating_add(now);
        g.evict();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    dirty: BlockRunMap<Dirty>,
    /// Data bytes held by `dirty` (exact).
    dirty_data_bytes: usize,
    /// What `dirty` is charged to the budget: data plus a fixed overhead per run.
    dirty_bytes: usize,
    /// Batches taken out of `dirty` and not landed yet, oldest first (at most
    /// [`FLUSH_PIPELINE_DEPTH`]). Reads look at them newest first, after `dirty`.
    flushing: std::collections::VecDeque<InFlight>,
    /// Completed writes so far; a flush covers all writes up to the value it snapshots.
    write_gen: u64,
    /// Every write up to this is durable (a batch that covers it has landed, and so has
    /// every older one).
    flushed_gen: u64,
    /// Every write up to this is landed or in a batch in flight.
    snapped_gen: u64,
    next_ticket: u64,
    first_dirty_at: Option<Instant>,
    /// The map of the last batch that landed, emptied, to be the next dirty set: its
    /// hash table keeps its capacity, where a fresh map grew by doubling through every
    /// batch, rehashing and page-faulting new tables as random writes came in (1.5% of the
    /// daemon's CPU). It keeps room for at most [`SPARE_DIRTY_SINGLES_MAX`] runs.
    /// Up to [`FLUSH_PIPELINE_DEPTH`] are kept: with two batches in flight, two can land
    /// between snapshots, and keeping only one sent every other batch to a fresh map (so
    /// no more maps exist at once than the dirty set and the batches in flight need).
    spare_dirty: Vec<BlockRunMap<Dirty>>,
}

/// A batch being flushed: taken from the dirty set, uploading or landing.
struct InFlight {
    ticket: u64,
    /// The `write_gen` it covers once landed (with every older batch).
    gen: u64,
    map: Arc<BlockRunMap<Dirty>>,
    /// What it is charged to the dirty budget.
    bytes: usize,
}

type FrameKey = (u64, u64);

/// A frame one read needs, and the runs of the read it serves.
struct FrameNeed {
    seg: u64,
    frame_offset: u64,
    frame_len: u32,
    /// (first lba, blocks, first block in the frame, the index value looked up)
    runs: Vec<(u64, u64, u32, Val)>,
}
type FrameResult = Result<Arc<crate::format::Frame>, String>;

pub struct Volume {
    id: u64,
    log: Arc<Log>,
    geo: Geometry,
    cfg: VolumeConfig,
    read_only: bool,
    state: Mutex<State>,
    /// Taken while a batch is admitted (snapshot, ticket), so batches are taken in order.
    flush_lock: tokio::sync::Mutex<()>,
    /// Batches in flight: [`FLUSH_PIPELINE_DEPTH`].
    pipeline: tokio::sync::Semaphore,
    /// Notified whenever a batch leaves `flushing` (landed or put back).
    flush_done: Notify,
    /// Wakes the flusher: the dirty set reached [`Volume::pipeline_batch_bytes`] while a
    /// batch is in flight.
    flush_wanted: Notify,
    budget: Arc<DirtyBudget>,
    cache: Arc<PageCache>,
    inflight: Mutex<HashMap<FrameKey, Arc<tokio::sync::OnceCell<FrameResult>>>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    last_read_end: AtomicU64,
    readahead_running: AtomicBool,
    /// The last readahead fetched something (or none ran yet).
    readahead_useful: AtomicBool,
    /// Blocks `[.0, .1)` were last scheduled for readahead.
    readahead_window: Mutex<(u64, u64)>,
    closed: AtomicBool,
    stop: Notify,
    /// Index bytes this volume has charged to the page cache.
    index_charged: AtomicUsize,
}

static NEXT_VOLUME_ID: AtomicU64 = AtomicU64::new(1);

impl Volume {
    pub fn new(
        log: Arc<Log>,
        cfg: VolumeConfig,
        budget: Arc<DirtyBudget>,
        cache: Arc<PageCache>,
        read_only: bool,
    ) -> Arc<Self> {
        let geo = log.geometry();
        let v = Arc::new(Self {
            id: NEXT_VOLUME_ID.fetch_add(1, Ordering::Relaxed),
            log,
            geo,
            cfg,
            read_only,
            state: Mutex::new(State {
                dirty: BlockRunMap::new(),
                dirty_data_bytes: 0,
                dirty_bytes: 0,
                flushing: std::collections::VecDeque::new(),
                write_gen: 0,
                flushed_gen: 0,
                snapped_gen: 0,
                next_ticket: 0,
                first_dirty_at: None,
                spare_dirty: Vec::new(),
            }),
            flush_lock: tokio::sync::Mutex::new(()),
            pipeline: tokio::sync::Semaphore::new(FLUSH_PIPELINE_DEPTH),
            flush_done: Notify::new(),
            flush_wanted: Notify::new(),
            budget,
            cache,
            inflight: Mutex::new(HashMap::new()),
            stripes: (0..RMW_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            last_read_end: AtomicU64::new(u64::MAX),
            readahead_running: AtomicBool::new(false),
            readahead_useful: AtomicBool::new(true),
            readahead_window: Mutex::new((0, 0)),
            closed: AtomicBool::new(false),
            stop: Notify::new(),
            index_charged: AtomicUsize::new(0),
        });
        v.charge_index();
        v
    }

    /// Charge this volume's page index to the page cache's budget (see [`PageCache`]):
    /// at open, after every commit, on every flusher tick, and back to zero on close.
    fn charge_index(&self) {
        let now = if self.closed.load(Ordering::Acquire) {
            0
        } else {
            // A background checkpoint build holds a decoded copy of the index (an Index
            // and the entry list it encodes from) until its upload ends; the tail's
            // directories (what the next build replays) grow with the index too.
            let stats = &self.log.stats;
            let building = stats.checkpoint_build_extents.load(Ordering::Acquire) as usize;
            let tail = stats.tail_dir_bytes.load(Ordering::Acquire) as usize;
            self.log
                .index_extents()
                .saturating_mul(INDEX_BYTES_PER_EXTENT)
                .saturating_add(building.saturating_mul(CHECKPOINT_BUILD_BYTES_PER_EXTENT))
                .saturating_add(tail)
        };
        let before = self.index_charged.swap(now, Ordering::AcqRel);
        if before != now {
            self.cache.recharge_index(before, now);
        }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// Bytes written and not yet flushed: the dirty set's data and what the flush batches
    /// not landed yet are charged (their data and a small per-run overhead).
    pub fn unflushed_bytes(&self) -> usize {
        let st = self.st();
        st.dirty_data_bytes + st.flushing.iter().map(|b| b.bytes).sum::<usize>()
    }
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves State consistent before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bs(&self) -> u64 {
        self.geo.block_size as u64
    }

    /// Spawn the background flusher: flushes at the high-water mark and when data has
    /// been dirty for `flush_interval`. Ends when the volume is closed.
    pub fn start_flusher(self: &Arc<Self>) {
        let v = Arc::clone(self);
        tokio::spawn(async move {
            let tick = (v.cfg.flush_interval / 4).max(Duration::from_millis(10));
            let mut backoff = Duration::from_millis(100);
            let mut retry_at: Option<Instant> = None;
            // Up to FLUSH_PIPELINE_DEPTH flushes of ours at once, each reporting here.
            let (tx, mut rx) = tokio::sync::mpsc::channel(FLUSH_PIPELINE_DEPTH);
            let mut running = 0usize;
            loop {
                let pressure = v.budget.pressure.notified();
                let landed = v.flush_done.notified();
                let listen = running == 0 && v.st().flushing.is_empty();
                let wait = retry_at.map_or(tick, |t| {
                    t.saturating_duration_since(Instant::now()).min(tick)
                });
                tokio::select! {
                    _ = v.stop.notified() => break,
                    // Woken on every write above the high-water mark: listened to only
                    // while no batch is in flight (then `flush_wanted` says when the next
                    // one is worth taking, and each landing is a moment to look again).
                    _ = pressure, if listen => {},
                    _ = v.flush_wanted.notified() => {},
                    _ = v.budget.retry.notified() => {},
                    _ = landed => {},
                    Some(r) = rx.recv() => {
                        running -= 1;
                        match r {
                            Ok(()) => {
                                backoff = Duration::from_millis(100);
                                retry_at = None;
                            }
                            Err(e) => {
                                tracing::warn!(export = v.log.name(), error = %e, "background flush failed; data stays dirty");
                                if matches!(e, VolumeError::Log(LogError::Fenced { .. })) {
                                    break;
                                }
                                retry_at = Some(Instant::now() + backoff);
                                backoff = (backoff * 2).min(Duration::from_secs(10));
                            }
                        }
                    }
                    _ = tokio::time::sleep(wait) => {},
                }
                if v.closed.load(Ordering::Acquire) {
                    break;
                }
                // The index also changes without a flush (compaction and defragmentation
                // commit on their own; a background checkpoint build ends): keep its charge
                // to the cache budget current.
                v.charge_index();
                // A writer about to fail wants to know whether the store works now.
                if v.budget.retry_wanted.load(Ordering::Acquire) {
                    retry_at = None;
                }
                if retry_at.is_some_and(|t| Instant::now() < t) {
                    continue;
                }
                if running < FLUSH_PIPELINE_DEPTH && v.flush_due() {
                    running += 1;
                    v.budget.retry_wanted.store(false, Ordering::Release);
                    let (v, tx) = (Arc::clone(&v), tx.clone());
                    tokio::spawn(async move {
                        let r = Volume::flush(&v).await;
                        let _ = tx.send(r).await;
                    });
                }
            }
        });
    }

    /// Whether the flusher should take a batch now: data dirty for `flush_interval`; or,
    /// with no batch in flight, the budget past its high-water mark; or, with one in
    /// flight, enough dirty data for the next ([`Volume::pipeline_batch_bytes`]).
    fn flush_due(&self) -> bool {
        let st = self.st();
        if st.dirty_bytes == 0 {
            return false;
        }
        if st
            .first_dirty_at
            .is_some_and(|t| t.elapsed() >= self.cfg.flush_interval)
        {
            return true;
        }
        if st.flushing.is_empty() {
            self.budget.used() > self.budget.high_water
        } else {
            st.dirty_bytes >= self.pipeline_batch_bytes()
        }
    }

    /// Dirty bytes worth a batch of their own while another is in flight: half the room
    /// above the high-water mark (64 MiB by default). Smaller would make small segments
    /// and more manifests; larger would leave the upload slots idle while writers wait.
    fn pipeline_batch_bytes(&self) -> usize {
        (self.budget.max.saturating_sub(self.budget.high_water) / 2).max(1)
    }

    /// Flush everything and stop the flusher. Further writes fail.
    pub async fn close(self: &Arc<Self>) -> Result<(), VolumeError> {
        let r = self.flush().await;
        self.shut();
        r
    }

    /// Stop the flusher without flushing (what `close` does after its flush). Further
    /// writes fail.
    pub fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop.notify_waiters();
        self.charge_index();
    }

    /// Make every write that completed before this call durable.
    ///
    /// The work runs as its own task and this call only waits for it: a caller that goes
    /// away (a client disconnecting, a forced shutdown aborting its session) must not
    /// cancel a flush half-way, which would leave the batch it took out of the dirty set
    /// neither committed nor put back.
    pub async fn flush(self: &Arc<Self>) -> Result<(), VolumeError> {
        let v = Arc::clone(self);
        match tokio::spawn(async move { v.flush_detached().await }).await {
            Ok(r) => r,
            Err(e) => Err(VolumeError::Log(LogError::Internal(format!(
                "flush task failed: {e}"
            )))),
        }
    }

    async fn flush_detached(&self) -> Result<(), VolumeError> {
        let target = self.st().write_gen;
        // Batches of other callers that covered these writes and then failed: after a few,
        // report the failure rather than wait on yet another (as one own attempt would).
        let mut covered = 0;
        loop {
            // Writes taken by a batch in flight: wait for it (group commit). If it fails,
            // its data is back in the dirty set and this caller makes its own attempt.
            loop {
                let done = self.flush_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                {
                    let st = self.st();
                    if st.flushed_gen >= target {
                        return Ok(());
                    }
                    if st.snapped_gen < target {
                        break;
                    }
                }
                done.await;
            }
            if covered == FLUSH_COVERED_FAILURES_MAX {
                return Err(VolumeError::Log(LogError::Internal(
                    "the flush batches holding these writes failed; they stay dirty".into(),
                )));
            }
            if let Some(r) = self.flush_batch(target).await {
                return r;
            }
            covered += 1;
        }
    }

    /// Take the dirty set as a batch and commit it, pipelined (see
    /// [`FLUSH_PIPELINE_DEPTH`]): admitted in order under `flush_lock`, uploaded while
    /// older batches land, landed when it is the oldest in flight. `None`: nothing of
    /// `target` was left to take (another caller's batch covers it: wait for that).
    async fn flush_batch(&self, target: u64) -> Option<Result<(), VolumeError>> {
        let admit = self.flush_lock.lock().await;
        // Far over its memory bound, the page index must shrink before a commit grows it
        // (a no-op unless a compactor runs and can still shrink it). Under the flush lock,
        // so one batch at a time gets past the check; room is made for the most runs the
        // commit can add: every dirty data run holds at least one block, and writing it
        // adds at most two runs (one written inside a run splits that run in three). A
        // batch larger than the gate allows is committed in pieces, each waiting for
        // room (below). Trims are left out of this first estimate (they cost the budget
        // little, so the budget does not bound them) but count in each piece's size.
        let budget_runs = self.budget.max / (self.bs() as usize + DIRTY_RUN_OVERHEAD_BYTES);
        let piece_runs = self.log.index_gate.commit_runs_max().unwrap_or(usize::MAX);
        self.log
            .index_gate
            .wait_room(&self.log, 2 * budget_runs.min(piece_runs))
            .await;
        // Likewise when the store holds far more than the live data and compaction can
        // still reclaim it (a no-op unless a compactor runs): writers slow down to the
        // pace at which passes reclaim space, so stored bytes stay bounded.
        self.log.space_gate.wait_room(&self.log).await;
        let Ok(_slot) = self.pipeline.acquire().await else {
            return Some(Err(VolumeError::ShuttingDown));
        };
        let (snap, ticket) = {
            let mut st = self.st();
            if st.flushed_gen >= target {
                return Some(Ok(()));
            }
            if st.snapped_gen >= target {
                return None;
            }
            let gen = st.write_gen;
            st.snapped_gen = gen;
            if st.dirty.is_empty() {
                // Every write up to `gen` is landed or in flight: done when the newest
                // batch in flight lands (it then covers `gen`), or now if none is.
                match st.flushing.back_mut() {
                    Some(newest) => {
                        newest.gen = newest.gen.max(gen);
                        return None;
                    }
                    None => {
                        st.flushed_gen = st.flushed_gen.max(gen);
                        return Some(Ok(()));
                    }
                }
            }
            let next = st.spare_dirty.pop().unwrap_or_default();
            let snap = Arc::new(std::mem::replace(&mut st.dirty, next));
            let bytes = std::mem::take(&mut st.dirty_bytes);
            st.dirty_data_bytes = 0;
            st.first_dirty_at = None;
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.flushing.push_back(InFlight {
                ticket,
                gen,
                map: Arc::clone(&snap),
                bytes,
            });
            (snap, ticket)
        };
        let number = self.budget.take_batch_number();
        // The next batch may be taken from here on (it waits for a pipeline slot).
        drop(admit);
        // In block order: the one sort the dirty set's hash-kept single blocks need, kept
        // for the cache update after the commit (in block order, blocks that share a cache
        // chunk come one after the other: in hash order that update cost half as much again).
        let runs = snap.sorted();
        let batch: Vec<BatchEntry> = runs
            .iter()
            .map(|&(lba, blocks, v)| BatchEntry {
                lba,
                blocks,
                update: match v {
                    Dirty::Data(b, ..) => Update::Data(b.clone()),
                    Dirty::Unmap => Update::Unmap,
                    Dirty::ZeroAlloc => Update::ZeroAlloc,
                },
            })
            .collect();
        // A batch that is one piece (the usual case) uploads now, while older batches land.
        let single = batch.len() <= piece_runs;
        let prepared = if single {
            Some(self.log.prepare(&batch).await)
        } else {
            None
        };
        // Land in admission order: wait until this batch is the oldest in flight. A batch
        // that is no longer in flight was put back by an older batch's failure.
        let mut result = loop {
            let done = self.flush_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let st = self.st();
                match st.flushing.iter().position(|f| f.ticket == ticket) {
                    Some(0) => break Ok(()),
                    Some(_) => {}
                    None => {
                        break Err(LogError::Internal(
                            "an older flush batch failed; this one was put back".into(),
                        ))
                    }
                }
            }
            done.await;
        };
        match (prepared, &result) {
            (Some(Ok(p)), Ok(())) => result = self.log.land(p).await.map(|_| ()),
            (Some(Ok(p)), Err(_)) => self.log.abandon(p).await,
            (Some(Err(e)), Ok(())) => result = Err(e),
            (Some(Err(_)), Err(_)) => {}
            (None, Ok(())) => {
                // Pieces in lba order, each its own commit (manifest). A block device
                // promises nothing about writes not yet flushed, so a crash between two
                // pieces loses nothing it acknowledged; this FLUSH returns only after the
                // last piece. A failed piece puts the whole batch back (pieces already
                // committed are written again, which changes nothing they read as).
                for (i, piece) in batch.chunks(piece_runs).enumerate() {
                    if i > 0 {
                        self.log
                            .index_gate
                            .wait_room(&self.log, 2 * piece.len())
                            .await;
                    }
                    if let Err(e) = self.log.commit(piece).await {
                        result = Err(e);
                        break;
                    }
                }
            }
            (None, Err(_)) => {}
        }
        drop(batch);
        Some(match result {
            Ok(()) => {
                // The index now has the new locations; refresh the cache before the batch
                // stops being visible as flushing (see the module invariants), and before
                // the next batch lands (it may hold newer data for the same blocks).
                self.cache_committed(&runs);
                self.charge_index();
                self.budget.note_flush(number, true);
                let mut st = self.st();
                let landed = st.flushing.pop_front();
                debug_assert_eq!(landed.as_ref().map(|f| f.ticket), Some(ticket));
                let (gen, bytes) = landed.map(|f| (f.gen, f.bytes)).unwrap_or((0, 0));
                st.flushed_gen = st.flushed_gen.max(gen);
                drop(st);
                self.flush_done.notify_waiters();
                self.budget.release(bytes);
                // The batch's buffers are freed here (the last references); let the
                // memory trimmer know, so a big batch's memory goes back to the kernel.
                // The emptied map becomes the spare dirty set (see `State::spare_dirty`).
                drop(runs);
                if let Ok(mut map) = Arc::try_unwrap(snap) {
                    // Nothing else holds the batch's payloads now but the page cache (the
                    // blocks it took by reference) and readers: the rest go back to the pool.
                    let pool = self.cache.payload_pool();
                    map.clear_keeping(SPARE_DIRTY_SINGLES_MAX, |v| {
                        if let Dirty::Data(b, ..) = v {
                            recycle(pool, b);
                        }
                    });
                    let mut st = self.st();
                    if st.spare_dirty.len() < FLUSH_PIPELINE_DEPTH {
                        st.spare_dirty.push(map);
                    }
                }
                crate::memory::note_freed(bytes as u64);
                Ok(())
            }
            Err(e) => {
                self.put_back_from(ticket);
                self.budget.note_flush(number, false);
                Err(e.into())
            }
        })
    }

    /// A flush batch failed: put it and every newer batch in flight back under the dirty
    /// set (newer writes win), newest first, so the next flush retries them; older batches
    /// stay in flight. The newer batches cannot land without this one, and a batch taken
    /// later must include their data: a FLUSH that lands claims every earlier write.
    fn put_back_from(&self, ticket: u64) {
        let bs = self.bs() as usize;
        let mut st = self.st();
        let Some(at) = st.flushing.iter().position(|f| f.ticket == ticket) else {
            return;
        };
        let failed: Vec<InFlight> = st.flushing.drain(at..).collect();
        let before = st.dirty_bytes;
        let mut released = 0;
        for f in failed.iter().rev() {
            released += f.bytes;
            for (lba, blocks, v) in f.map.iter_unordered() {
                let mut at = lba;
                let end = lba + blocks;
                let mut pieces = Vec::new();
                for (s, l, _) in st.dirty.overlapping(lba, blocks) {
                    if s > at {
                        pieces.push((at, s - at));
                    }
                    at = s + l;
                }
                if at < end {
                    pieces.push((at, end - at));
                }
                for (s, l) in pieces {
                    let val = v.advance(s - lba);
                    if let Dirty::Data(..) = val {
                        st.dirty_data_bytes += l as usize * bs;
                    }
                    st.dirty.insert(s, l, val);
                }
            }
        }
        st.dirty_bytes = st.dirty_data_bytes + DIRTY_RUN_OVERHEAD_BYTES * st.dirty.len();
        let added = st.dirty_bytes - before;
        // Only what is still in flight is covered now.
        st.snapped_gen = st
            .flushing
            .back()
            .map_or(st.flushed_gen, |f| f.gen)
            .max(st.flushed_gen);
        if st.first_dirty_at.is_none() {
            st.first_dirty_at = Some(Instant::now());
        }
        drop(st);
        self.flush_done.notify_waiters();
        // Charge what came back and release the batches' charge.
        self.budget.used.fetch_add(added, Ordering::AcqRel);
        self.budget.release(released);
    }

    /// Write-through after a commit: every block the batch wrote becomes the cache's copy
    /// (what was just written is likely read next, and reading it back from the store is
    /// the slowest path), unmapped or zeroed blocks leave the cache. The lock is taken per
    /// slice of blocks so readers are not held up by a large batch; correctness does not
    /// need one critical section, because a concurrent cache fill checks the (already
    /// updated) index under the lock and cannot insert an older value.
    fn cache_committed(&self, runs: &[(u64, u64, &Dirty)]) {
        let bs = self.bs() as usize;
        let cb = chunk_blocks(bs);
        let mut cache = self.cache.lock();
        let mut done = 0usize;
        for &(lba, blocks, v) in runs {
            let mut i = 0;
            while i < blocks {
                let key = (self.id, lba + i);
                // Whole chunks of a long run (sequential writes) go in at once.
                if let Dirty::Data(b, ..) = v {
                    if cb > 1 && key.1.is_multiple_of(cb) && blocks - i >= cb {
                        let s = i as usize * bs;
                        cache.put_chunk(self.id, key.1 / cb, &b[s..s + cb as usize * bs], bs);
                        i += cb;
                        done += cb as usize;
                        if done >= CACHE_UPDATE_BLOCKS_PER_LOCK {
                            done = 0;
                            drop(cache);
                            cache = self.cache.lock();
                        }
                        continue;
                    }
                }
                match v {
                    // A block written on its own (random small writes) is cached by
                    // reference: its buffer is exactly what the cache is charged.
                    Dirty::Data(b, _, backing) if blocks == 1 && *backing <= 2 * bs => {
                        cache.put_shared(key, b, *backing, bs);
                    }
                    Dirty::Data(b, ..) => {
                        let s = i as usize * bs;
                        cache.put(key, &b[s..s + bs], bs);
                    }
                    _ => cache.pop(key, bs),
                }
                i += 1;
                done += 1;
                if done >= CACHE_UPDATE_BLOCKS_PER_LOCK {
                    done = 0;
                    drop(cache);
                    cache = self.cache.lock();
                }
            }
        }
    }

    /// Count a request for the background compactor, which waits for quiet moments.
    fn note_request(&self) {
        self.log
            .stats
            .foreground_requests
            .fetch_add(1, Ordering::Relaxed);
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(VolumeError::ShuttingDown);
        }
        if self.log.is_fenced() {
            return Err(VolumeError::Log(LogError::Fenced {
                export: self.log.name().to_string(),
                epoch: self.log.epoch(),
                newer_epoch: self.log.epoch() + 1,
            }));
        }
        Ok(())
    }

    /// Insert whole-block runs into the dirty set (after charging the budget).
    async fn put_dirty(&self, runs: Vec<(u64, u64, Dirty)>) -> Result<(), VolumeError> {
        let bs = self.bs() as usize;
        // Upper bound of the charge: data, plus each insert adds at most two runs (itself
        // and the split-off tail of a run it cuts in the middle).
        let bound: usize = runs
            .iter()
            .map(|(_, l, v)| {
                2 * DIRTY_RUN_OVERHEAD_BYTES
                    + match v {
                        Dirty::Data(..) => *l as usize * bs,
                        _ => 0,
                    }
            })
            .sum();
        self.budget.acquire(bound, self.cfg.write_stall_max).await?;
        let pool = self.cache.payload_pool();
        let mut st = self.st();
        let before = st.dirty_bytes;
        let s = &mut *st;
        for (lba, blocks, v) in runs {
            if let Dirty::Data(..) = v {
                s.dirty_data_bytes += blocks as usize * bs;
            }
            let data_bytes = &mut s.dirty_data_bytes;
            s.dirty.insert_with(lba, blocks, v, |_, l, old| {
                if let Dirty::Data(b, ..) = old {
                    *data_bytes -= l as usize * bs;
                    // An overwritten block's buffer, still warm, serves the next write.
                    recycle(pool, b);
                }
            });
        }
        st.dirty_bytes = st.dirty_data_bytes + DIRTY_RUN_OVERHEAD_BYTES * st.dirty.len();
        let after = st.dirty_bytes;
        st.write_gen += 1;
        if st.first_dirty_at.is_none() {
            st.first_dirty_at = Some(Instant::now());
        }
        let next_batch = self.pipeline_batch_bytes();
        let wanted = !st.flushing.is_empty() && before < next_batch && after >= next_batch;
        drop(st);
        if wanted {
            // Stored if the flusher is busy: it looks again when it next waits.
            self.flush_wanted.notify_one();
        }
        // Give back what the bound over-charged (after - before <= bound always).
        let used = after.saturating_sub(before);
        let extra = bound.saturating_sub(used) + before.saturating_sub(after);
        if extra > 0 {
            self.budget.release(extra);
        }
        Ok(())
    }

    /// Current content of one block (dirty, flushing, cache, store), for read-modify-write.
    async fn read_block(&self, lba: u64) -> Result<Bytes, VolumeError> {
        let (chunks, _) = self.read_blocks(lba, 1).await?;
        let bs = self.bs() as usize;
        Ok(match chunks.into_iter().next() {
            Some(Some(b)) => b,
            _ => Bytes::from(vec![0u8; bs]),
        })
    }

    /// Write `data` at byte `offset`; partial blocks at the edges are read-modify-written.
    async fn write_bytes(&self, offset: u64, mut data: Bytes) -> Result<(), VolumeError> {
        let bs = self.bs();
        let end = offset + data.len() as u64;
        let mut runs = Vec::new();
        let mut pos = offset;
        // Head partial block.
        let mut rmw: Vec<(u64, usize, usize, usize)> = Vec::new(); // (lba, in-block off, data off, len)
        if !pos.is_multiple_of(bs) || end - pos < bs {
            let lba = pos / bs;
            let in_off = (pos % bs) as usize;
            let n = ((bs - pos % bs).min(end - pos)) as usize;
            rmw.push((lba, in_off, 0, n));
            pos += n as u64;
        }
        let full_start = pos;
        let full_blocks = (end - pos) / bs;
        if full_blocks > 0 {
            let s = (full_start - offset) as usize;
            let e = s + (full_blocks * bs) as usize;
            let piece = if s == 0 && e == data.len() {
                std::mem::take(&mut data)
            } else {
                data.slice(s..e)
            };
            runs.push((full_start / bs, full_blocks, Dirty::data(piece, bs as u32)));
            pos += full_blocks * bs;
        }
        if pos < end {
            rmw.push((pos / bs, 0, (pos - offset) as usize, (end - pos) as usize));
        }
        if !runs.is_empty() {
            self.put_dirty(runs).await?;
        }
        for (lba, in_off, d_off, n) in rmw {
            let _g = self.stripes[(lba as usize) % RMW_STRIPES].lock().await;
            let cur = self.read_block(lba).await?;
            let mut b = BytesMut::from(&cur[..]);
            b[in_off..in_off + n].copy_from_slice(&data[d_off..d_off + n]);
            self.put_dirty(vec![(lba, 1, Dirty::data(b.freeze(), bs as u32))])
                .await?;
        }
        Ok(())
    }

    /// Zero (or trim) bytes `offset..offset+len`: whole blocks become `whole`; partial edge
    /// blocks are zeroed by read-modify-write when `zero_edges`, else left alone.
    async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        whole: Dirty,
        zero_edges: bool,
    ) -> Result<(), VolumeError> {
        let bs = self.bs();
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let end_full = end / bs;
        if first_full < end_full {
            self.put_dirty(vec![(first_full, end_full - first_full, whole)])
                .await?;
        }
        if zero_edges {
            let mut edges = Vec::new();
            if !offset.is_multiple_of(bs) || first_full > end_full {
                let e = (first_full * bs).min(end);
                edges.push((offset, e - offset));
            }
            if !end.is_multiple_of(bs) && end_full >= first_full && end_full * bs >= offset {
                let s = (end_full * bs).max(offset);
                if edges.last().is_none_or(|&(o, _)| o != s) && s < end {
                    edges.push((s, end - s));
                }
            }
            for (o, l) in edges {
                self.write_bytes(o, Bytes::from(vec![0u8; l as usize]))
                    .await?;
            }
        }
        Ok(())
    }

    /// Per-block view of `lba..lba+n`: `Some(bytes)` for data, `None` for zeros; data may
    /// cover several blocks, the slots it covers after its first then hold an empty
    /// `Bytes` (see [`Slot`]). Also says whether any block had to come from the store (a
    /// cache miss).
    async fn read_blocks(
        &self,
        lba: u64,
        n: u64,
    ) -> Result<(Vec<Option<Bytes>>, bool), VolumeError> {
        let bs = self.bs() as usize;
        let mut out: Vec<Slot> = vec![None; n as usize];
        {
            let st = self.st();
            let fill = |runs: Vec<(u64, u64, Dirty)>, out: &mut Vec<Slot>| {
                for (s, l, v) in runs {
                    let run = &mut out[(s - lba) as usize..(s + l - lba) as usize];
                    match &v {
                        Dirty::Data(b, ..) => fill_stretches(run, b, 0, bs, false, |_| true),
                        _ => run
                            .iter_mut()
                            .filter(|slot| slot.is_none())
                            .for_each(|slot| *slot = Some(None)),
                    }
                }
            };
            fill(st.dirty.overlapping(lba, n), &mut out);
            for f in st.flushing.iter().rev() {
                fill(f.map.overlapping(lba, n), &mut out);
            }
        }
        // Cache.
        if out.iter().any(|s| s.is_none()) {
            self.cache.lock().fill_slots(self.id, lba, &mut out, bs);
        }
        // Store: the distinct frames still needed, fetched concurrently (after random 4 KiB
        // writes a 1 MiB read spans up to 256 single-block frames; one at a time that was
        // 256 round trips). A fetch fails when compaction moved the blocks and GC deleted
        // the old segment between our lookup and the GET (possible when the GC retain
        // window is shorter than a read): then the index no longer points there and a fresh
        // lookup finds the blocks' new home.
        let mut relookups = 0;
        let mut missed = false;
        // The 128 KiB-aligned stretch around this read (see where frames fill the cache).
        let w = (SLICED_FRAME_BYTES_MAX / bs as u64).max(1);
        let read_window = (lba / w * w)..(lba + n).div_ceil(w) * w;
        while out.iter().any(|s| s.is_none()) {
            let mut frames: Vec<FrameNeed> = Vec::new();
            let mut by_frame: HashMap<FrameKey, usize> = HashMap::new();
            for (s, l, v) in self.log.lookup(lba, n) {
                let missing = (s..s + l).any(|b| out[(b - lba) as usize].is_none());
                if !missing {
                    continue;
                }
                match v {
                    None | Some(Val::ZeroAlloc) => {
                        for b in s..s + l {
                            let slot = &mut out[(b - lba) as usize];
                            if slot.is_none() {
                                *slot = Some(None);
                            }
                        }
                    }
                    Some(
                        val @ Val::Frame {
                            seg,
                            frame_offset,
                            frame_len,
                            block_in_frame,
                        },
                    ) => {
                        let i = *by_frame.entry((seg, frame_offset)).or_insert_with(|| {
                            frames.push(FrameNeed {
                                seg,
                                frame_offset,
                                frame_len,
                                runs: Vec::new(),
                            });
                            frames.len() - 1
                        });
                        frames[i].runs.push((s, l, block_in_frame, val));
                    }
                }
            }
            missed |= !frames.is_empty();
            let fetched = self
                .fetch_frames(
                    frames
                        .iter()
                        .map(|f| (f.seg, f.frame_offset, f.frame_len))
                        .collect(),
                )
                .await;
            let mut failed: Option<(VolumeError, bool)> = None;
            for (f, r) in frames.iter().zip(fetched) {
                let frame = match r {
                    Ok(frame) => frame,
                    Err(e) => {
                        let moved = f
                            .runs
                            .iter()
                            .any(|&(s, l, _, v)| self.log.lookup(s, l) != [(s, l, Some(v))]);
                        if failed.is_none() {
                            failed = Some((e, moved));
                        }
                        continue;
                    }
                };
                for &(s, l, first, _) in &f.runs {
                    let first = first as u64;
                    crate::log::check_frame_covers(
                        &self.log.keys().segment(f.seg),
                        &frame,
                        s,
                        first,
                        l,
                    )?;
                    // Slices of the frame, no copy (the reply is short-lived), unless the
                    // frame is far larger than what this read takes of it: a 4 KiB reply
                    // must not keep a 1 MiB frame (defragmentation's, see
                    // `frame_blocks_for`) alive while it waits for the socket.
                    let copy =
                        frame.data.len() as u64 > SLICED_FRAME_BYTES_MAX.max(2 * l * bs as u64);
                    fill_stretches(
                        &mut out[(s - lba) as usize..(s + l - lba) as usize],
                        &frame.data,
                        first as usize * bs,
                        bs,
                        copy,
                        |_| true,
                    );
                }
                // Of a frame larger than the writers' (compaction's, see
                // `frame_blocks_for`), only the 128 KiB-aligned stretch around what was
                // read: caching a whole 1 MiB frame for every cold 4 KiB read would evict
                // 256 blocks' worth of other data each time (half of a 2M cache) and copy
                // a MiB. Readahead still caches whole frames.
                let window =
                    (frame.data.len() as u64 > SLICED_FRAME_BYTES_MAX).then(|| read_window.clone());
                self.fill_cache_from_frame(f.seg, f.frame_offset, &frame, window);
            }
            if let Some((e, moved)) = failed {
                if !moved || relookups >= READ_RELOOKUPS_MAX {
                    return Err(e);
                }
                relookups += 1;
            }
        }
        Ok((out.into_iter().map(|s| s.flatten()).collect(), missed))
    }

    /// Put every block of a fetched frame that the index still maps to it into the cache
    /// (checked under the cache lock; see the module invariants).
    /// `window`: only blocks in this range (`None`: the whole frame).
    fn fill_cache_from_frame(
        &self,
        seg: u64,
        frame_offset: u64,
        frame: &crate::format::Frame,
        window: Option<std::ops::Range<u64>>,
    ) {
        let bs = self.bs() as usize;
        let end = frame.first_lba.saturating_add(frame.blocks as u64);
        let (mut from, mut to) = (frame.first_lba, end);
        if let Some(w) = window {
            (from, to) = (from.max(w.start), to.min(w.end));
        }
        if from >= to {
            return;
        }
        let mut cache = self.cache.lock();
        // Look the index up under the cache lock: a commit updates the index before the
        // cache, so a block is inserted only where the index still points at this frame.
        for (s, l, v) in self.log.lookup(from, to - from) {
            if let Some(Val::Frame {
                seg: vs,
                frame_offset: vo,
                block_in_frame,
                ..
            }) = v
            {
                if vs != seg || vo != frame_offset {
                    continue;
                }
                for i in 0..l {
                    let o = (block_in_frame as u64 + i) as usize * bs;
                    if o + bs <= frame.data.len() {
                        cache.put((self.id, s + i), &frame.data[o..o + bs], bs);
                    }
                }
            }
        }
    }

    /// Fetch frames `(segment, offset, length)` concurrently (bounded), results in order.
    /// Neighbouring frames of one segment come with one GET (a flush stores its blocks in
    /// LBA order, so a read after random writes finds many of its frames side by side);
    /// a frame alone goes through [`Volume::fetch_frame`], which merges concurrent misses.
    async fn fetch_frames(&self, frames: Vec<(u64, u64, u32)>) -> Vec<FetchedFrame> {
        let gap = self.log.store().request_cost_bytes();
        let spans = crate::log::plan_frame_spans(&frames, gap, READ_SPAN_BYTES_MAX);
        // All of this read's permits in one acquisition: a read holding some while
        // waiting for more could wait forever on others doing the same. Never closed, so
        // the error arm cannot happen; it would only mean no bound, not a failed read.
        // One permit per frame (not per GET: one GET may carry many small, well-compressed
        // frames; see FRAME_FETCHES_MAX).
        let want = frames.len().clamp(1, FRAME_FETCHES_PER_READ_MAX) as u32;
        let _slots = self.cache.fetches.acquire_many(want).await.ok();
        let frames = &frames;
        let fetched: Vec<Vec<(usize, FetchedFrame)>> = futures::stream::iter(spans)
            .map(|span| async move {
                if let [i] = span[..] {
                    let (seg, off, len) = frames[i];
                    return vec![(i, self.fetch_frame(seg, off, len).await)];
                }
                let seg = frames[span[0]].0;
                let wanted: Vec<(u64, u32)> =
                    span.iter().map(|&i| (frames[i].1, frames[i].2)).collect();
                match self.log.read_frame_span(seg, &wanted).await {
                    Ok(decoded) => span
                        .iter()
                        .zip(decoded)
                        .map(|(&i, r)| (i, r.map(Arc::new).map_err(VolumeError::from)))
                        .collect(),
                    Err(e) => {
                        let reason = e.to_string();
                        span.iter()
                            .map(|&i| {
                                (
                                    i,
                                    Err(VolumeError::Log(LogError::Corrupt {
                                        key: self.log.keys().segment(seg),
                                        reason: reason.clone(),
                                    })),
                                )
                            })
                            .collect()
                    }
                }
            })
            // Unordered: each result carries its position, and a slow GET must not keep
            // the next spans from starting (`buffered` refills only as the oldest ends).
            .buffer_unordered(FRAME_FETCHES_PER_READ_MAX)
            .collect()
            .await;
        let mut out: Vec<Option<FetchedFrame>> = (0..frames.len()).map(|_| None).collect();
        for (i, r) in fetched.into_iter().flatten() {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(VolumeError::Log(LogError::Internal(
                        "frame not fetched".into(),
                    )))
                })
            })
            .collect()
    }

    /// Fetch a frame, coalescing concurrent misses on the same frame into one GET.
    async fn fetch_frame(&self, seg: u64, frame_offset: u64, frame_len: u32) -> FetchedFrame {
        let key = (seg, frame_offset);
        let cell = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(key).or_default())
        };
        let r = cell
            .get_or_init(|| async {
                self.log
                    .read_frame(seg, frame_offset, frame_len)
                    .await
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .await
            .clone();
        {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(&key);
            }
        }
        r.map_err(|reason| {
            VolumeError::Log(LogError::Corrupt {
                key: self.log.keys().segment(seg),
                reason,
            })
        })
    }

    /// After a sequential read ending at `end_lba`, warm the blocks after it in the
    /// background. The window warmed last is remembered: while a sequential reader is still
    /// more than half a window away from its end nothing is done (probing 4 MiB of cache
    /// on every 1 MiB read cost 5% of the CPU of cached sequential reads); past that, only
    /// the part beyond the old window is fetched. And while the reader only hits the cache
    /// and the last readahead found everything cached too, readahead stays off (like
    /// Linux, which re-arms it only on a miss or a page it read ahead itself).
    fn maybe_readahead(self: &Arc<Self>, start_lba: u64, end_lba: u64, missed: bool) {
        let prev = self.last_read_end.swap(end_lba, Ordering::AcqRel);
        if prev != start_lba || self.cfg.readahead_bytes_max == 0 {
            return;
        }
        if !missed && !self.readahead_useful.load(Ordering::Acquire) {
            return;
        }
        let blocks = (self.cfg.readahead_bytes_max / self.bs()).max(1);
        let end = (end_lba + blocks).min(self.geo.blocks());
        let from = {
            let mut w = self
                .readahead_window
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (ws, we) = *w;
            let inside = ws <= end_lba && end_lba < we;
            if inside && we - end_lba > blocks / 2 {
                return;
            }
            if self.readahead_running.swap(true, Ordering::AcqRel) {
                return;
            }
            let from = if inside { we } else { end_lba };
            *w = (end_lba, end);
            from
        };
        let v = Arc::clone(self);
        tokio::spawn(async move {
            if end > from {
                let fetched = v.warm(from, end - from).await;
                v.readahead_useful
                    .store(!matches!(fetched, Ok(0)), Ordering::Release);
            }
            v.readahead_running.store(false, Ordering::Release);
        });
    }

    /// Load blocks into the cache without returning them (CACHE command, readahead).
    /// Returns how many frames had to be fetched.
    async fn warm(&self, lba: u64, n: u64) -> Result<usize, VolumeError> {
        let bs = self.bs() as usize;
        let mut need: Vec<(u64, u64, u32)> = Vec::new();
        {
            let cache = self.cache.lock();
            for (s, l, v) in self.log.lookup(lba, n) {
                if let Some(Val::Frame {
                    seg,
                    frame_offset,
                    frame_len,
                    ..
                }) = v
                {
                    if !(s..s + l).all(|b| cache.contains((self.id, b), bs)) {
                        need.push((seg, frame_offset, frame_len));
                    }
                }
            }
        }
        need.sort_unstable();
        need.dedup();
        let fetched = need.len();
        let mut first_err = None;
        // A round of frames at a time, each round in the cache before the next is fetched:
        // nothing returns these frames to a client, so no request budget covers them, and
        // a 32 MiB CACHE must not hold 32 MiB of decoded frames (FRAME_FETCHES_MAX).
        for round in need.chunks(FRAME_FETCHES_PER_READ_MAX) {
            for (&(seg, off, _), r) in round.iter().zip(self.fetch_frames(round.to_vec()).await) {
                match r {
                    Ok(frame) => self.fill_cache_from_frame(seg, off, &frame, None),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        first_err.map_or(Ok(fetched), Err)
    }
}

#[async_trait]
impl BlockExport for Arc<Volume> {
    fn size_bytes(&self) -> u64 {
        self.geo.size_bytes
    }
    fn block_size(&self) -> u32 {
        self.geo.block_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        self.note_request();
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = self.bs();
        let first = offset / bs;
        let last = (offset + len as u64 - 1) / bs;
        let (blocks, missed) = self.read_blocks(first, last - first + 1).await?;
        self.maybe_readahead(first, last + 1, missed);
        // Assemble: consecutive data blocks into one chunk of pieces (slices of the cached
        // or fetched blocks, never copied here), consecutive zeros into one hole.
        let mut chunks: Vec<ReadChunk> = Vec::new();
        let mut data: Vec<Bytes> = Vec::new();
        let mut hole = 0u32;
        let flush_data = |data: &mut Vec<Bytes>, chunks: &mut Vec<ReadChunk>| match data.len() {
            0 => {}
            1 => chunks.extend(data.pop().map(ReadChunk::Data)),
            _ => chunks.push(ReadChunk::Pieces(std::mem::take(data))),
        };
        for (i, b) in blocks.into_iter().enumerate() {
            let blba = first + i as u64;
            let bstart = blba * bs;
            // Data may span several blocks (the slots after it then hold nothing).
            let bend = bstart + b.as_ref().map_or(bs, |b| b.len() as u64);
            let s = (offset.max(bstart) - bstart) as usize;
            let e = ((offset + len as u64).min(bend) - bstart) as usize;
            match b {
                Some(bytes) if bytes.is_empty() => {}
                Some(bytes) => {
                    if hole > 0 {
                        chunks.push(ReadChunk::Hole(hole));
                        hole = 0;
                    }
                    data.push(if s == 0 && e == bytes.len() {
                        bytes
                    } else {
                        bytes.slice(s..e)
                    });
                }
                None => {
                    flush_data(&mut data, &mut chunks);
                    hole += (e - s) as u32;
                }
            }
        }
        if hole > 0 {
            chunks.push(ReadChunk::Hole(hole));
        }
        flush_data(&mut data, &mut chunks);
        Ok(chunks)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.note_request();
        self.check_writable()?;
        self.write_bytes(offset, data).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.note_request();
        if self.read_only {
            return Ok(());
        }
        Ok(Volume::flush(self).await?)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.note_request();
        self.check_writable()?;
        // Partial blocks at the edges are left as they are (the spec lets TRIM be
        // advisory); whole blocks become holes.
        self.zero_range(offset, len, Dirty::Unmap, false).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.note_request();
        self.check_writable()?;
        let whole = if no_hole {
            Dirty::ZeroAlloc
        } else {
            Dirty::Unmap
        };
        self.zero_range(offset, len, whole, true).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.note_request();
        if len == 0 {
            return Ok(());
        }
        let bs = self.bs();
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        self.warm(first, last - first + 1).await?;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u32, u32)>, ExportError> {
        self.note_request();
        let bs = self.bs();
        if len == 0 {
            return Err(ExportError::new(Errno::Inval, "zero-length block status"));
        }
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let n = (last - first + 1).min(BLOCK_STATUS_BLOCKS_MAX);
        // Later layers override earlier: index, then flushing (oldest first), then dirty.
        let mut m: RangeMap<Flags> = RangeMap::new();
        for (s, l, v) in self.log.lookup(first, n) {
            let f = match v {
                None => STATE_HOLE | STATE_ZERO,
                Some(Val::ZeroAlloc) => STATE_ZERO,
                Some(Val::Frame { .. }) => 0,
            };
            m.insert(s, l, Flags(f));
        }
        {
            let st = self.st();
            let layers = st.flushing.iter().map(|f| &*f.map);
            for layer in layers.chain([&st.dirty]) {
                for (s, l, v) in layer.overlapping(first, n) {
                    let f = match v {
                        Dirty::Data(..) => 0,
                        Dirty::Unmap => STATE_HOLE | STATE_ZERO,
                        Dirty::ZeroAlloc => STATE_ZERO,
                    };
                    m.insert(s, l, Flags(f));
                }
            }
        }
        let mut out: Vec<(u32, u32)> = Vec::new();
        let req_end = offset + len;
        let mut cur: Option<(u64, u64, u32)> = None; // byte start, byte end, flags
        for (s, l, f) in m.iter() {
            let bstart = (s * bs).max(offset);
            let bend = ((s + l) * bs).min(req_end);
            match &mut cur {
                Some((_, e, cf)) if *cf == f.0 && *e == bstart => *e = bend,
                _ => {
                    if let Some((a, b, cf)) = cur.take() {
                        push_extent(&mut out, a, b, cf);
                    }
                    cur = Some((bstart, bend, f.0));
                }
            }
        }
        if let Some((a, b, cf)) = cur {
            push_extent(&mut out, a, b, cf);
        }
        Ok(out)
    }
}

fn push_extent(out: &mut Vec<(u32, u32)>, start: u64, end: u64, flags: u32) {
    // Extent lengths are u32 on the wire: split long ones at a block-friendly size.
    let mut at = start;
    while at < end {
        let n = (end - at).min(0x8000_0000);
        out.push((n as u32, flags));
        at += n;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Flags(u32);
impl RangeValue for Flags {
    fn advance(&self, _: u64) -> Self {
        *self
    }
}

/// Settings for creating and opening exports.
#[derive(Debug, Clone)]
pub struct ExportsConfig {
    pub default_geometry: Geometry,
    pub log: LogConfig,
    pub volume: VolumeConfig,
    pub read_only: bool,
    /// Background compaction and GC of writable exports; `None` turns them off.
    pub compact: Option<CompactConfig>,
    /// An export no connection has used for this long is flushed and closed (its flusher,
    /// lease and compactor stop; the next client opens it afresh), once
    /// [`Exports::start_idle_closer`] runs; `None` keeps exports open until shutdown.
    pub idle_close: Option<Duration>,
    /// Exports open at once, at most: opening one more closes the one unused the longest,
    /// or is refused when all are in use. `None`: no bound.
    pub exports_max: Option<usize>,
}

/// Tasks that run beside a writable volume: its lease heartbeat and its compactor.
struct Background {
    lease: LeaseHandle,
    compactor: Option<CompactorHandle>,
}

/// The daemon's export registry: one shared [`Volume`] per export name.
pub struct Exports {
    store: DynStore,
    cfg: ExportsConfig,
    budget: Arc<DirtyBudget>,
    cache: Arc<PageCache>,
    open: tokio::sync::Mutex<HashMap<String, Arc<Volume>>>,
    background: Mutex<HashMap<String, Background>>,
    /// Connections using each open export (changed under the `open` lock when one is
    /// added, so an export found unused there cannot gain a user meanwhile), and since when
    /// it has had none.
    users: Mutex<HashMap<String, Users>>,
    /// Exports being closed for idleness: opening one waits for its mutex (held by the
    /// closer), then opens it afresh.
    closing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set by the shutdown: the idle closer closes nothing more.
    shutting: AtomicBool,
}

#[derive(Debug)]
struct Users {
    count: usize,
    idle_since: Instant,
}

impl Exports {
    pub fn new(store: DynStore, cfg: ExportsConfig) -> Arc<Self> {
        let budget = DirtyBudget::new(
            cfg.volume.dirty_bytes_max,
            cfg.volume.dirty_high_water_ratio,
        );
        let cache = PageCache::with_payload_pool(
            cfg.volume.cache_bytes_max,
            cfg.volume.payload_pool.clone(),
        );
        Arc::new(Self {
            store,
            cfg,
            budget,
            cache,
            open: tokio::sync::Mutex::new(HashMap::new()),
            background: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            closing: Mutex::new(HashMap::new()),
            shutting: AtomicBool::new(false),
        })
    }

    pub async fn volume(&self, name: &str) -> Result<Arc<Volume>, LogError> {
        self.volume_used(name, false).await
    }

    /// The open volume `name`, opened (or created) now if it is not; with `use_it`, count
    /// one more user of it (under the `open` lock: see `users`).
    async fn volume_used(&self, name: &str, use_it: bool) -> Result<Arc<Volume>, LogError> {
        let mut made_room = false;
        let mut open = loop {
            let open = self.open.lock().await;
            // Being closed for idleness: wait until that ends, then open it afresh (its
            // final flush must land before a new writer fences the old one).
            let closing = self.closing_map().get(name).cloned();
            if let Some(m) = closing {
                drop(open);
                let _ = m.lock().await;
                continue;
            }
            // A fenced volume stays in place: another daemon owns the export now, and
            // taking it back automatically would make two daemons fence each other in
            // turn. Its writes fail with EIO until the operator restarts this daemon.
            if let Some(v) = open.get(name) {
                if use_it {
                    self.add_user(name);
                }
                return Ok(Arc::clone(v));
            }
            let Some(max) = self.cfg.exports_max else {
                break open;
            };
            if open.len() + self.closing_map().len() < max {
                break open;
            }
            // At the bound: close the export unused the longest to make room (once; its
            // flush may fail, and then it stays).
            let victim = self
                .users_map()
                .iter()
                .filter(|(n, u)| u.count == 0 && open.contains_key(n.as_str()))
                .min_by_key(|(_, u)| u.idle_since)
                .map(|(n, _)| n.clone());
            match victim {
                Some(victim) if !made_room => {
                    drop(open);
                    made_room = true;
                    self.close_idle(&victim, Duration::ZERO).await;
                }
                _ => {
                    tracing::warn!(
                        export = name,
                        exports_max = max,
                        "not opening another export: --exports-max are open and in use"
                    );
                    return Err(LogError::Invalid(format!(
                        "{max} exports are open and in use (--exports-max); export {name:?} \
                         must wait until one is left unused"
                    )));
                }
            }
        };
        let (create, mode) = if self.cfg.read_only {
            (None, OpenMode::ReadOnly)
        } else {
            (Some(self.cfg.default_geometry), OpenMode::Writer)
        };
        let log = Log::open(
            Arc::clone(&self.store),
            name,
            create,
            self.cfg.log.clone(),
            mode,
        )
        .await?;
        // The index cannot be defragmented below one run per frame of mapped data. On a
        // device too large for its bound at the writers' frame size, compaction cuts
        // larger frames (`frame_blocks_for`); say so at open, and warn when even the
        // largest would need more than the cache can give.
        let g = log.geometry();
        let bs = u64::from(g.block_size);
        let base = (self.cfg.log.frame_bytes_max as u64 / bs).max(1);
        let frame_bytes = match &self.cfg.compact {
            Some(c) => {
                let runs_max = c.index_runs_max.unwrap_or(self.index_runs_max_default());
                let (base, top) = c.frame_blocks_limits(self.cfg.log.frame_bytes_max, bs);
                frame_blocks_for(g.size_bytes / bs, Some(runs_max), base, top) * bs
            }
            None => base * bs,
        };
        if frame_bytes > base * bs {
            tracing::info!(
                export = name,
                size_bytes = g.size_bytes,
                frame_kib = frame_bytes >> 10,
                "written all over, this export needs frames larger than the writers' to keep \
                 its page index within --index-max: compaction will cut them (a cold read \
                 then fetches a whole frame); a larger --cache-size or --index-max avoids it"
            );
        }
        let floor = index_floor_bytes(g, frame_bytes as usize);
        if floor > self.cfg.volume.cache_bytes_max / 4 * 3 {
            tracing::warn!(
                export = name,
                size_bytes = log.geometry().size_bytes,
                index_floor_mib = floor >> 20,
                cache_mib = self.cfg.volume.cache_bytes_max >> 20,
                "written all over, this export's page index would need more than three \
                 quarters of --cache-size (one run per frame at least); memory would then \
                 exceed the budget: raise --cache-size"
            );
        }
        let v = Volume::new(
            Arc::new(log),
            self.cfg.volume.clone(),
            Arc::clone(&self.budget),
            Arc::clone(&self.cache),
            self.cfg.read_only,
        );
        if !self.cfg.read_only {
            v.start_flusher();
            let bg = Background {
                lease: spawn_lease(Arc::clone(v.log()), self.cfg.volume.lease_interval),
                compactor: self.spawn_compactor_for(v.log()),
            };
            self.bg().insert(name.to_string(), bg);
        }
        open.insert(name.to_string(), Arc::clone(&v));
        if use_it {
            self.add_user(name);
        }
        Ok(v)
    }

    /// The background compactor of a writable export, if compaction is on.
    fn spawn_compactor_for(&self, log: &Arc<Log>) -> Option<CompactorHandle> {
        self.cfg.compact.clone().map(|mut c| {
            // Unless told otherwise, an export's page index may take a quarter of the page
            // cache (which it is charged to) before compaction starts defragmenting it.
            if c.index_runs_max.is_none() {
                c.index_runs_max = Some(self.index_runs_max_default());
            }
            spawn_compactor(Arc::clone(log), c)
        })
    }

    fn users_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Users>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closing_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_user(&self, name: &str) {
        self.users_map()
            .entry(name.to_string())
            .or_insert(Users {
                count: 0,
                idle_since: Instant::now(),
            })
            .count += 1;
    }

    /// Names of open exports (those being closed for idleness included: they are open
    /// until their final flush has landed), for tests and tools.
    pub async fn open_names(&self) -> Vec<String> {
        let open = self.open.lock().await;
        let mut v: Vec<String> = open.keys().cloned().collect();
        v.extend(self.closing_map().keys().cloned());
        v.sort();
        v.dedup();
        v
    }

    /// Whether export `name` is being closed for idleness right now.
    pub fn is_closing(&self, name: &str) -> bool {
        self.closing_map().contains_key(name)
    }

    /// Close exports unused for `ExportsConfig::idle_close`, checking a few times per
    /// period, until the daemon's runtime ends. A no-op without `idle_close`.
    pub fn start_idle_closer(self: &Arc<Self>) {
        let Some(idle) = self.cfg.idle_close else {
            return;
        };
        let me = Arc::downgrade(self);
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(me) = me.upgrade() else { break };
                let due: Vec<String> = me
                    .users_map()
                    .iter()
                    .filter(|(_, u)| u.count == 0 && u.idle_since.elapsed() >= idle)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in due {
                    me.close_idle(&name, idle).await;
                }
            }
        });
    }

    /// Flush and close export `name` if it is open, unused, and has been for `idle`.
    /// Ordering: the compactor stops first (its commits must not race the final flush),
    /// then the final flush, then the lease goes, so the lease says "in use" until the
    /// data is durable. If the flush fails (the store is down; fenced), nothing is lost:
    /// the volume goes back in place, compactor restarted, and is tried again after
    /// another idle period.
    async fn close_idle(&self, name: &str, idle: Duration) {
        let (v, bg, _held) = {
            let mut open = self.open.lock().await;
            if self.shutting.load(Ordering::Acquire) {
                return;
            }
            let unused = self
                .users_map()
                .get(name)
                .is_some_and(|u| u.count == 0 && u.idle_since.elapsed() >= idle);
            if !unused {
                return;
            }
            let Some(v) = open.remove(name) else {
                self.users_map().remove(name);
                return;
            };
            // Held until the close ends; opens of `name` wait on it (a fresh mutex: no wait).
            let gate = Arc::new(tokio::sync::Mutex::new(()));
            let held = Arc::clone(&gate).lock_owned().await;
            self.closing_map()
                .insert(name.to_string(), Arc::clone(&gate));
            let bg = self.bg().remove(name);
            (v, bg, held)
        };
        let (lease, compactor) = match bg {
            Some(b) => (Some(b.lease), b.compactor),
            None => (None, None),
        };
        if let Some(c) = compactor {
            c.close().await;
        }
        match v.flush().await {
            Ok(()) => {
                v.shut();
                if let Some(l) = lease {
                    l.close().await;
                }
                self.users_map().remove(name);
                tracing::info!(
                    export = name,
                    idle_secs = idle.as_secs_f64(),
                    "closed an export no connection used"
                );
            }
            Err(e) => {
                tracing::warn!(export = name, error = %e, "closing an idle export: flush failed; it stays open");
                let mut open = self.open.lock().await;
                if let Some(l) = lease {
                    let compactor = self.spawn_compactor_for(v.log());
                    self.bg().insert(
                        name.to_string(),
                        Background {
                            lease: l,
                            compactor,
                        },
                    );
                }
                open.insert(name.to_string(), v);
                if let Some(u) = self.users_map().get_mut(name) {
                    u.idle_since = Instant::now();
                }
            }
        }
        self.closing_map().remove(name);
    }

    /// Flush and close every open export (shutdown), one flush attempt each. Returns the
    /// first error.
    pub async fn close_all(&self) -> Result<(), VolumeError> {
        self.close_all_inner(None).await
    }

    /// Like [`Exports::close_all`], but a final flush that fails for a reason that may pass
    /// ([`VolumeError::is_retryable`]: the store is down) is tried again, after 1 s and then twice as long each time up to
    /// [`FINAL_FLUSH_RETRY_MAX`], until it succeeds or `give_up` completes (the daemon's
    /// second SIGINT/SIGTERM). Unflushed writes are all the daemon holds of them: exiting
    /// at the first failed attempt would drop them whenever a shutdown met an outage. After
    /// `give_up`, nothing more is flushed or released and the error names what was left.
    pub async fn close_all_retrying(
        &self,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<(), VolumeError> {
        let give_up = std::pin::pin!(give_up);
        self.close_all_inner(Some(give_up)).await
    }

    async fn close_all_inner(
        &self,
        mut give_up: Option<std::pin::Pin<&mut dyn std::future::Future<Output = ()>>>,
    ) -> Result<(), VolumeError> {
        let retrying = give_up.is_some();
        // An idle close in progress has taken its export out of `open`: wait for it to
        // end (closed, or put back when its flush failed) so no export is missed here. The
        // flag, read under the `open` lock, stops new ones.
        self.shutting.store(true, Ordering::Release);
        let gates: Vec<_> = {
            let _open = self.open.lock().await;
            self.closing_map().values().cloned().collect()
        };
        for g in gates {
            let _ = g.lock().await;
        }
        // Compactors first (a pass in progress finishes), then the final flushes, then the
        // leases, so the lease says "in use" until the data is durable.
        let mut bgs: Vec<Background> = self.bg().drain().map(|(_, b)| b).collect();
        for b in &mut bgs {
            if let Some(c) = b.compactor.take() {
                c.close().await;
            }
        }
        let vols: Vec<Arc<Volume>> = self.open.lock().await.values().cloned().collect();
        let mut first = Ok(());
        let mut abandoned = false;
        for v in vols {
            if abandoned {
                let unflushed_mib = v.unflushed_bytes() as f64 / (1u64 << 20) as f64;
                tracing::error!(
                    export = v.log.name(),
                    unflushed_mib,
                    "not flushed: shutdown forced"
                );
                v.shut();
                continue;
            }
            let mut delay = FINAL_FLUSH_RETRY_FIRST;
            let flushed = loop {
                let r = match give_up.as_mut() {
                    None => v.flush().await,
                    // A flush runs detached (`Volume::flush`): dropping the wait for it
                    // when the operator gives up cancels nothing half-way.
                    Some(g) => tokio::select! {
                        r = v.flush() => r,
                        _ = g.as_mut() => {
                            abandoned = true;
                            Err(VolumeError::Log(LogError::Internal(
                                "final flush abandoned: shutdown forced".into(),
                            )))
                        }
                    },
                };
                let e = match r {
                    Ok(()) => break Ok(()),
                    Err(e) => e,
                };
                if abandoned || !retrying || !e.is_retryable() {
                    break Err(e);
                }
                let unflushed_mib = v.unflushed_bytes() as f64 / (1u64 << 20) as f64;
                tracing::error!(
                    export = v.log.name(),
                    error = %e,
                    unflushed_mib,
                    retry_in_secs = delay.as_secs(),
                    "final flush failed; retrying (SIGINT or SIGTERM again exits without it)"
                );
                if let Some(g) = give_up.as_mut() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = g.as_mut() => {
                            abandoned = true;
                            break Err(e);
                        }
                    }
                }
                delay = delay.saturating_mul(2).min(FINAL_FLUSH_RETRY_MAX);
            };
            v.shut();
            if let Err(e) = flushed {
                let unflushed_mib = v.unflushed_bytes() as f64 / (1u64 << 20) as f64;
                tracing::error!(export = v.log.name(), error = %e, unflushed_mib, "final flush failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        if abandoned {
            // Releasing a lease is a store request too, and the store may be what is down.
            return first;
        }
        for b in bgs {
            b.lease.close().await;
        }
        first
    }

    fn bg(&self) -> std::sync::MutexGuard<'_, HashMap<String, Background>> {
        self.background.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page-index runs one export keeps before its compactor defragments, when the compactor
    /// config does not say: a quarter of the page cache.
    pub fn index_runs_max_default(&self) -> usize {
        index_runs_in(self.cfg.volume.cache_bytes_max / 4)
    }

    /// Counters of an export's background compactor, if one runs.
    pub fn compactor_stats(&self, name: &str) -> Option<Arc<CompactorStats>> {
        self.bg()
            .get(name)
            .and_then(|b| b.compactor.as_ref().map(|c| Arc::clone(c.stats())))
    }

    pub fn budget(&self) -> &Arc<DirtyBudget> {
        &self.budget
    }
}

#[async_trait]
impl ExportProvider for Exports {
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockExport>, ExportError> {
        match self.volume_used(name, true).await {
            Ok(v) => Ok(Arc::new(v)),
            Err(LogError::NoSuchExport { export }) => Err(ExportError::new(
                Errno::Inval,
                format!("no export {export:?} (the daemon is read-only)"),
            )),
            Err(LogError::Invalid(m)) => Err(ExportError::new(Errno::Inval, m)),
            Err(e) => {
                tracing::error!(export = name, error = %e, "cannot open export");
                Err(ExportError::new(Errno::Io, e.to_string()))
            }
        }
    }

    async fn release(&self, name: &str) {
        if let Some(u) = self.users_map().get_mut(name) {
            u.count = u.count.saturating_sub(1);
            if u.count == 0 {
                u.idle_since = Instant::now();
            }
        }
    }

    async fn list(&self) -> Result<Vec<String>, ExportError> {
        let objs = crate::store::list_all(self.store.as_ref(), crate::format::EXPORTS_PREFIX)
            .await
            .map_err(|e| ExportError::new(Errno::Io, e.to_string()))?;
        let mut names: Vec<String> = objs
            .iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(crate::format::EXPORTS_PREFIX)?;
                let (k, tail) = rest.split_once('/')?;
                if !tail.starts_with("manifest/") {
                    return None;
                }
                crate::format::export_name_from_key(k)
            })
            .collect();
        names.extend(self.open.lock().await.keys().cloned());
        names.sort();
        names.dedup();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4096;

    /// One block through the read path's lookup.
    impl CacheInner {
        fn get(&mut self, key: (u64, u64), bs: usize) -> Option<Bytes> {
            let mut slot = [None];
            self.fill_slots(key.0, key.1, &mut slot, bs);
            slot[0].take().flatten()
        }
    }

    fn block(v: u8) -> Vec<u8> {
        vec![v; BS]
    }

    /// Fencing, corruption and permanent store errors end a shutdown at once; an outage
    /// (or a batch put back) is worth another final flush.
    #[test]
    fn only_errors_that_may_pass_are_retried_at_shutdown() {
        use crate::store::StoreError;
        let transient = StoreError::Transient {
            key: "k".into(),
            reason: "unreachable".into(),
        };
        let permanent = StoreError::Permanent {
            key: "k".into(),
            reason: "access denied".into(),
        };
        assert!(VolumeError::Log(LogError::Store(transient)).is_retryable());
        assert!(VolumeError::Log(LogError::Internal("batch put back".into())).is_retryable());
        assert!(!VolumeError::Log(LogError::Store(permanent)).is_retryable());
        let fenced = LogError::Fenced {
            export: "disk".into(),
            epoch: 2,
            newer_epoch: 3,
        };
        assert!(!VolumeError::Log(fenced).is_retryable());
        let corrupt = LogError::Corrupt {
            key: "k".into(),
            reason: "crc".into(),
        };
        assert!(!VolumeError::Log(corrupt).is_retryable());
        assert!(!VolumeError::ReadOnly.is_retryable());
    }

    /// The README's figures: 0.75 MB of index per GiB at 128 KiB frames, so the default
    /// 256 MiB cache's three quarters (the index gate's stall level) run out near 256 GiB.
    #[test]
    fn index_floor_follows_device_size() {
        let geo = |size_bytes| Geometry {
            size_bytes,
            block_size: 4096,
        };
        assert_eq!(index_floor_bytes(geo(1 << 30), 128 << 10), 8192 * 96);
        assert_eq!(index_floor_bytes(geo((1 << 30) + 1), 128 << 10), 8193 * 96);
        let stall = (256u64 << 20) / 4 * 3;
        assert!(index_floor_bytes(geo(255 << 30), 128 << 10) < stall);
        assert!(index_floor_bytes(geo(257 << 30), 128 << 10) > stall);
    }

    #[test]
    fn a_whole_chunk_replaces_its_blocks_and_leaves_handed_out_slices_alone() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        let cb = chunk_blocks(BS) as usize;
        // Block 1 by reference (pending), block 2 copied into a buffer, one slice handed out.
        g.put_shared((1, 1), &Bytes::from(block(7)), BS, BS);
        g.put((1, 2), &block(8), BS);
        let out = g.get((1, 2), BS).unwrap();
        let data: Vec<u8> = (0..cb).flat_map(|i| block(100 + i as u8)).collect();
        g.put_chunk(1, 0, &data, BS);
        for i in 0..cb {
            assert_eq!(
                g.get((1, i as u64), BS).unwrap(),
                block(100 + i as u8),
                "block {i}"
            );
        }
        assert_eq!(out, block(8), "a slice handed out changed");
        // One buffer charged: the pending block went with the old contents.
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES);
        // Another volume's chunk 0 is another chunk.
        assert!(g.get((2, 0), BS).is_none());
    }

    #[test]
    fn cache_chunks_hold_blocks_independently() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        assert!(g.get((1, 5), BS).is_none());
        g.put((1, 5), &block(5), BS);
        g.put((1, 6), &block(6), BS);
        g.put((2, 5), &block(9), BS); // another volume, same lba
        assert_eq!(g.get((1, 5), BS).unwrap(), block(5));
        assert_eq!(g.get((1, 6), BS).unwrap(), block(6));
        assert_eq!(g.get((2, 5), BS).unwrap(), block(9));
        // Same chunk, block never put: absent, not zeros.
        assert!(g.get((1, 4), BS).is_none() && !g.contains((1, 4), BS));
        g.pop((1, 5), BS);
        assert!(g.get((1, 5), BS).is_none());
        assert_eq!(g.get((1, 6), BS).unwrap(), block(6));
        g.pop((1, 6), BS);
        // The chunk is gone once empty: only volume 2's chunk is left.
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES);
    }

    #[test]
    fn fill_slots_takes_cached_blocks_across_chunks_and_keeps_filled_slots() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        let per_chunk = (CACHE_CHUNK_BYTES / BS) as u64;
        for b in [per_chunk - 1, per_chunk, per_chunk + 2] {
            g.put((1, b), &block(b as u8), BS);
        }
        let first = per_chunk - 2;
        let mut slots: Vec<Slot> = vec![None; 6];
        slots[1] = Some(None); // already known (e.g. from the dirty set): left alone
        g.fill_slots(1, first, &mut slots, BS);
        let got: Vec<Option<u8>> = slots
            .iter()
            .map(|s| s.as_ref().and_then(|b| b.as_ref().map(|b| b[0])))
            .collect();
        let want = [
            None,
            None,
            Some(per_chunk as u8),
            None,
            Some(per_chunk as u8 + 2),
            None,
        ];
        assert_eq!(got, want);
        assert!(slots[0].is_none() && slots[1] == Some(None));
    }

    /// Blocks of one chunk come out as one slice per stretch; a slot already filled, or a
    /// block the chunk lacks, ends a stretch; every block reads back its own bytes.
    #[test]
    fn fill_slots_gives_one_slice_per_stretch() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        let per_chunk = (CACHE_CHUNK_BYTES / BS) as u64;
        let data: Vec<u8> = (0..per_chunk).flat_map(|i| block(i as u8)).collect();
        g.put_chunk(1, 0, &data, BS);
        g.put((1, per_chunk), &block(200), BS);
        g.put((1, per_chunk + 1), &block(201), BS);
        // Blocks 2..per_chunk + 3: slot 3 (block 5) is already known; per_chunk + 2 is
        // not cached.
        let first = 2;
        let n = (per_chunk + 1) as usize;
        let mut slots: Vec<Slot> = vec![None; n];
        slots[3] = Some(None);
        g.fill_slots(1, first, &mut slots, BS);
        let lens: Vec<Option<usize>> = slots
            .iter()
            .map(|s| s.as_ref().map(|b| b.as_ref().map_or(0, |b| b.len() / BS)))
            .collect();
        let mut want = vec![Some(0); n];
        want[0] = Some(3); // blocks 2, 3, 4
        want[3] = Some(0); // the known zero block
        want[4] = Some(per_chunk as usize - 6); // blocks 6..per_chunk
        want[(per_chunk - first) as usize] = Some(2); // the next chunk's two blocks
        want[n - 1] = None;
        assert_eq!(lens, want);
        assert!(slots[3] == Some(None));
        let b = slots[4].clone().flatten().unwrap();
        for (k, blk) in b.chunks(BS).enumerate() {
            assert_eq!(blk, &block(6 + k as u8)[..]);
        }
        assert_eq!(slots[0].clone().flatten().unwrap()[2 * BS..], block(4)[..]);
    }

    #[test]
    fn bytes_handed_out_never_change() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        g.put((1, 0), &block(1), BS);
        let held = g.get((1, 0), BS).unwrap();
        let neighbour = {
            g.put((1, 1), &block(2), BS);
            g.get((1, 1), BS).unwrap()
        };
        g.put((1, 0), &block(3), BS);
        g.put((1, 1), &block(4), BS);
        assert_eq!(held, block(1));
        assert_eq!(neighbour, block(2));
        assert_eq!(g.get((1, 0), BS).unwrap(), block(3));
        assert_eq!(g.get((1, 1), BS).unwrap(), block(4));
        drop((held, neighbour));
        // Unshared again: updated in place, still correct.
        g.put((1, 0), &block(7), BS);
        assert_eq!(g.get((1, 0), BS).unwrap(), block(7));
    }

    #[test]
    fn blocks_cached_by_reference_read_back_and_are_charged() {
        let c = PageCache::new(1 << 20);
        let mut g = c.lock();
        let shared = |v: u8| Bytes::from(block(v));
        // A chunk without a buffer holds committed blocks by reference, charged as given.
        g.put_shared((1, 0), &shared(1), BS, BS);
        g.put_shared((1, 2), &shared(2), BS, BS);
        g.put_shared((1, 2), &shared(3), BS, BS); // replaces, not adds
        assert_eq!(g.bytes, 2 * BS);
        assert!(g.contains((1, 0), BS) && g.contains((1, 2), BS) && !g.contains((1, 1), BS));
        // A copied block into the same chunk gives it its buffer; pending ones stay valid.
        g.put((1, 1), &block(4), BS);
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES + 2 * BS);
        // The first read copies them into the chunk's buffer and drops their charge.
        assert_eq!(g.get((1, 0), BS).unwrap(), block(1));
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES);
        assert_eq!(g.get((1, 1), BS).unwrap(), block(4));
        assert_eq!(g.get((1, 2), BS).unwrap(), block(3));
        assert!(g.get((1, 3), BS).is_none());
        // Once the chunk has a buffer, later blocks are copied into it (charged once).
        let held = g.get((1, 2), BS).unwrap();
        g.put_shared((1, 2), &shared(5), BS, BS);
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES);
        assert_eq!(held, block(3), "bytes handed out changed");
        assert_eq!(g.get((1, 2), BS).unwrap(), block(5));
        // Forgetting a pending block drops its charge; the chunk goes when empty.
        g.put_shared((2, 9), &shared(6), BS, BS);
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES + BS);
        g.pop((2, 9), BS);
        assert_eq!(g.bytes, CACHE_CHUNK_BYTES);
        assert!(g.get((2, 9), BS).is_none());
    }

    #[test]
    fn blocks_cached_by_reference_count_towards_the_bound() {
        let c = PageCache::new((2 * CACHE_CHUNK_BYTES) as u64);
        let mut g = c.lock();
        let per_chunk = (CACHE_CHUNK_BYTES / BS) as u64;
        // 20 lone blocks in 20 chunks, 4 KiB each: only 16 fit in 64 KiB.
        for k in 0..20u64 {
            g.put_shared((1, k * per_chunk), &Bytes::from(block(k as u8)), BS, BS);
            assert!(g.bytes <= 2 * CACHE_CHUNK_BYTES);
        }
        assert!(!g.contains((1, 0), BS), "oldest not evicted");
        assert_eq!(g.get((1, 19 * per_chunk), BS).unwrap(), block(19));
        assert!(g.bytes <= 2 * CACHE_CHUNK_BYTES);
    }

    #[test]
    fn index_charge_shrinks_the_chunk_budget() {
        let c = PageCache::new((4 * CACHE_CHUNK_BYTES) as u64);
        let per_chunk = (CACHE_CHUNK_BYTES / BS) as u64;
        for k in 0..4u64 {
            c.lock().put((1, k * per_chunk), &block(k as u8), BS);
        }
        assert_eq!(c.usage().chunk_bytes, 4 * CACHE_CHUNK_BYTES);
        // An index of 2.5 chunks' worth leaves room for 1 chunk.
        c.recharge_index(0, 5 * CACHE_CHUNK_BYTES / 2);
        let u = c.usage();
        assert_eq!(u.chunk_bytes, CACHE_CHUNK_BYTES);
        assert!(
            c.lock().contains((1, 3 * per_chunk), BS),
            "not in eviction order"
        );
        // An index larger than the whole cache still leaves one chunk.
        c.recharge_index(u.index_bytes, 10 * CACHE_CHUNK_BYTES);
        c.lock().put((1, 9 * per_chunk), &block(9), BS);
        assert_eq!(c.usage().chunk_bytes, CACHE_CHUNK_BYTES);
        // Released (a volume closed): chunks may use it all again.
        c.recharge_index(10 * CACHE_CHUNK_BYTES, 0);
        for k in 0..4u64 {
            c.lock().put((2, k * per_chunk), &block(k as u8), BS);
        }
        assert_eq!(
            c.usage(),
            CacheUsage {
                chunk_bytes: 4 * CACHE_CHUNK_BYTES,
                index_bytes: 0
            }
        );
    }

    #[test]
    fn cache_is_bounded_in_bytes_unused_first() {
        let chunks = 4;
        let c = PageCache::new((chunks * CACHE_CHUNK_BYTES) as u64);
        let per_chunk = (CACHE_CHUNK_BYTES / BS) as u64;
        let mut g = c.lock();
        for k in 0..chunks as u64 {
            g.put((1, k * per_chunk), &block(k as u8 + 1), BS);
        }
        // Read chunk 0 since it came in: chunk 1, never read, goes first.
        assert!(g.get((1, 0), BS).is_some());
        g.put((1, 100 * per_chunk), &block(50), BS);
        assert!(g.bytes <= chunks * CACHE_CHUNK_BYTES);
        assert!(g.contains((1, 0), BS));
        assert!(!g.contains((1, per_chunk), BS), "unused chunk not evicted");
        assert!(g.contains((1, 100 * per_chunk), BS));
        // Large blocks: one block per chunk.
        g.put((3, 7), &vec![8u8; 65536], 65536);
        assert_eq!(g.get((3, 7), 65536).unwrap().len(), 65536);
        assert!(g.bytes <= chunks * CACHE_CHUNK_BYTES);
    }
}
