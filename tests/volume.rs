//! Volume-level tests over the in-memory store: read precedence (dirty, flushing, cache,
//! store), partial-block writes, trim and zeroing, block status, flush durability across a
//! reopen, and that a failed commit keeps data dirty for the next flush; a write that finds
//! the dirty set full gets EIO once flushes have kept failing for the stall bound (never
//! because the store is merely slow).

use std::sync::Arc;

use bytes::Bytes;
use nbds3::format::DirEntry;
use nbds3::log::{Geometry, Log, LogConfig, OpenMode};
use nbds3::nbd::{BlockExport, ReadChunk, STATE_HOLE, STATE_ZERO};
use nbds3::store::memory::MemoryStore;
use nbds3::store::DynStore;
use nbds3::volume::{DirtyBudget, PageCache, Volume, VolumeConfig};

const BS: u32 = 4096;
const SIZE: u64 = 64 << 20;

async fn open(store: &DynStore, cfg: VolumeConfig) -> Arc<Volume> {
    let cache = PageCache::new(cfg.cache_bytes_max);
    open_with_cache(store, cfg, cache).await
}

async fn open_with_cache(
    store: &DynStore,
    cfg: VolumeConfig,
    cache: Arc<PageCache>,
) -> Arc<Volume> {
    open_with_log(store, cfg, cache, LogConfig::default()).await
}

async fn open_with_log(
    store: &DynStore,
    cfg: VolumeConfig,
    cache: Arc<PageCache>,
    log_cfg: LogConfig,
) -> Arc<Volume> {
    let log = Log::open(
        Arc::clone(store),
        "vol",
        Some(Geometry {
            size_bytes: SIZE,
            block_size: BS,
        }),
        log_cfg,
        OpenMode::Writer,
    )
    .await
    .expect("open log");
    Volume::new(
        Arc::new(log),
        cfg.clone(),
        DirtyBudget::new(cfg.dirty_bytes_max, cfg.dirty_high_water_ratio),
        cache,
        false,
    )
}

fn flat(chunks: Vec<ReadChunk>) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&c.to_vec());
    }
    out
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn write_flush_reopen_reads_back() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    v.write(8192, pattern(1, 1 << 20), false).await.unwrap();
    // Unaligned write spanning a block boundary (read-modify-write on both edges).
    v.write(3 * 4096 + 100, pattern(9, 5000), false)
        .await
        .unwrap();
    let before = flat(v.read(0, 2 << 20).await.unwrap());
    Volume::flush(&v).await.unwrap();
    let after_flush = flat(v.read(0, 2 << 20).await.unwrap());
    assert_eq!(before, after_flush);
    drop(v);
    let v2 = open(&store, VolumeConfig::default()).await;
    let reopened = flat(v2.read(0, 2 << 20).await.unwrap());
    assert_eq!(before, reopened);
    assert_eq!(
        &reopened[8192 + 100..8192 + 200],
        &pattern(1, 1 << 20)[100..200]
    );
    assert_eq!(
        &reopened[3 * 4096 + 100..3 * 4096 + 5100],
        &pattern(9, 5000)[..]
    );
    assert!(reopened[..8192].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn unwritten_reads_are_holes_and_block_status_matches() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    let r = v.read(0, 65536).await.unwrap();
    assert_eq!(r, vec![ReadChunk::Hole(65536)]);
    v.write(16384, pattern(3, 8192), false).await.unwrap();
    let bs = v.block_status(0, 65536).await.unwrap();
    assert_eq!(
        bs,
        vec![
            (16384, STATE_HOLE | STATE_ZERO),
            (8192, 0),
            (65536 - 24576, STATE_HOLE | STATE_ZERO)
        ]
    );
    Volume::flush(&v).await.unwrap();
    assert_eq!(v.block_status(0, 65536).await.unwrap(), bs);
    // Zeroes: without NO_HOLE a hole, with NO_HOLE allocated zeros.
    v.write_zeroes(16384, 4096, false, false).await.unwrap();
    v.write_zeroes(20480, 4096, false, true).await.unwrap();
    let want = vec![
        (20480, STATE_HOLE | STATE_ZERO),
        (4096, STATE_ZERO),
        (65536 - 24576, STATE_HOLE | STATE_ZERO),
    ];
    assert_eq!(v.block_status(0, 65536).await.unwrap(), want);
    Volume::flush(&v).await.unwrap();
    assert_eq!(v.block_status(0, 65536).await.unwrap(), want);
    assert!(flat(v.read(0, 65536).await.unwrap())
        .iter()
        .all(|&b| b == 0));
}

#[tokio::test]
async fn all_zero_writes_become_holes_after_flush() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    v.write(0, Bytes::from(vec![0u8; 1 << 20]), false)
        .await
        .unwrap();
    Volume::flush(&v).await.unwrap();
    assert_eq!(v.log().with_index(|i| i.mapped_blocks()), 0);
    assert_eq!(
        v.block_status(0, 1 << 20).await.unwrap(),
        vec![(1 << 20, STATE_HOLE | STATE_ZERO)]
    );
}

#[tokio::test]
async fn trim_and_partial_zero_edges() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    v.write(0, pattern(5, 65536), true).await.unwrap();
    // Zero an unaligned range: edges are zeroed byte-exactly.
    v.write_zeroes(1000, 10000, false, false).await.unwrap();
    let got = flat(v.read(0, 65536).await.unwrap());
    let mut want = pattern(5, 65536).to_vec();
    want[1000..11000].fill(0);
    assert_eq!(got, want);
    // Trim whole blocks: they read as zeros and become holes.
    v.trim(32768, 16384, true).await.unwrap();
    want[32768..49152].fill(0);
    assert_eq!(flat(v.read(0, 65536).await.unwrap()), want);
    drop(v);
    let v = open(&store, VolumeConfig::default()).await;
    assert_eq!(flat(v.read(0, 65536).await.unwrap()), want);
}

#[tokio::test]
async fn read_after_cache_eviction_and_overwrite() {
    let store: DynStore = Arc::new(MemoryStore::new());
    // A tiny cache forces evictions and refills from the store.
    let cfg = VolumeConfig {
        cache_bytes_max: 64 * 1024,
        ..VolumeConfig::default()
    };
    let v = open(&store, cfg).await;
    for round in 0..3u8 {
        for i in 0..64u64 {
            v.write(i * 65536, pattern(round * 64 + i as u8, 65536), false)
                .await
                .unwrap();
        }
        Volume::flush(&v).await.unwrap();
        for i in (0..64u64).rev() {
            let got = flat(v.read(i * 65536, 65536).await.unwrap());
            assert_eq!(
                got,
                pattern(round * 64 + i as u8, 65536).to_vec(),
                "round {round} chunk {i}"
            );
        }
    }
}

#[tokio::test]
async fn dirty_budget_is_enforced_by_background_flush() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig {
        dirty_bytes_max: 2 << 20,
        ..VolumeConfig::default()
    };
    let v = open(&store, cfg).await;
    v.start_flusher();
    // Write 16x the dirty budget; writers must wait for background flushes, never OOM.
    for i in 0..128u64 {
        v.write(i * 262144, pattern(i as u8, 262144), false)
            .await
            .unwrap();
    }
    Volume::flush(&v).await.unwrap();
    for i in [0u64, 77, 127] {
        assert_eq!(
            flat(v.read(i * 262144, 262144).await.unwrap()),
            pattern(i as u8, 262144).to_vec()
        );
    }
    assert!(
        v.log()
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

/// Counts ranged GETs in flight (and the most seen at once) over another store.
struct GetCounter {
    inner: DynStore,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
    total: std::sync::atomic::AtomicUsize,
    /// When set: the cache's chunk bytes as each GET started go to `chunk_bytes_at_get`.
    cache: std::sync::OnceLock<Arc<PageCache>>,
    chunk_bytes_at_get: std::sync::Mutex<Vec<usize>>,
}

impl std::fmt::Debug for GetCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetCounter")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl nbds3::store::ObjectStore for GetCounter {
    async fn put(
        &self,
        key: &str,
        data: Bytes,
        mode: nbds3::store::PutMode,
    ) -> nbds3::store::StoreResult<()> {
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> nbds3::store::StoreResult<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> nbds3::store::StoreResult<Bytes> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(c) = self.cache.get() {
            self.chunk_bytes_at_get
                .lock()
                .unwrap()
                .push(c.usage().chunk_bytes);
        }
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        self.total.fetch_add(1, SeqCst);
        // Long enough that every fetch a read issues at once is in flight together.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let r = self.inner.get_range(key, range).await;
        self.now.fetch_sub(1, SeqCst);
        r
    }
    async fn head(&self, key: &str) -> nbds3::store::StoreResult<nbds3::store::ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> nbds3::store::StoreResult<nbds3::store::ListPage> {
        self.inner.list(prefix, start_after, max_keys).await
    }
    async fn delete(&self, key: &str) -> nbds3::store::StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        "get-counter".into()
    }
}

#[tokio::test]
async fn written_blocks_are_cached_by_the_commit() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    for i in 0..32u64 {
        // Single blocks (shared into the cache) and a 1 MiB write (copied out of it).
        v.write(i * 8192, pattern(i as u8, 4096), false)
            .await
            .unwrap();
    }
    v.write(32 << 20, pattern(99, 1 << 20), false)
        .await
        .unwrap();
    Volume::flush(&v).await.unwrap();
    for i in 0..32u64 {
        assert_eq!(
            flat(v.read(i * 8192, 4096).await.unwrap()),
            pattern(i as u8, 4096).to_vec()
        );
    }
    assert_eq!(
        flat(v.read(32 << 20, 1 << 20).await.unwrap()),
        pattern(99, 1 << 20).to_vec()
    );
    let frames_read = v
        .log()
        .stats
        .frames_read
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        frames_read, 0,
        "just-committed data was read back from the store"
    );
}

/// A memory store behind a GET counter.
fn counted_store() -> (Arc<GetCounter>, DynStore) {
    let counter = Arc::new(GetCounter {
        inner: Arc::new(MemoryStore::new()),
        now: 0.into(),
        max: 0.into(),
        total: 0.into(),
        cache: std::sync::OnceLock::new(),
        chunk_bytes_at_get: Default::default(),
    });
    let store: DynStore = counter.clone();
    (counter, store)
}

/// Write `pattern(i)` to every other block (block `2 i`) for `i < n`, each block a segment
/// of its own if `flush_each`, else all in one commit; then close.
async fn write_every_other_block(store: &DynStore, n: u64, flush_each: bool) {
    let v = open(store, VolumeConfig::default()).await;
    for i in 0..n {
        v.write(i * 8192, pattern(i as u8, 4096), false)
            .await
            .unwrap();
        if flush_each {
            v.flush().await.unwrap();
        }
    }
    v.close().await.unwrap();
}

/// `got` (read from offset 0) holds what [`write_every_other_block`] wrote, holes between.
fn check_every_other_block(got: &[u8], n: usize) {
    for i in 0..n {
        assert_eq!(
            &got[i * 8192..i * 8192 + 4096],
            &pattern(i as u8, 4096)[..],
            "block {}",
            i * 2
        );
        assert!(got[i * 8192 + 4096..(i + 1) * 8192].iter().all(|&b| b == 0));
    }
}

#[tokio::test]
async fn cold_read_fetches_neighbouring_frames_with_one_get() {
    let (counter, store) = counted_store();
    // 256 single-block frames side by side in one segment: every other block of a 2 MiB
    // range, one commit (as random writes leave them: a flush stores blocks in LBA order).
    write_every_other_block(&store, 256, false).await;
    let v = open(&store, VolumeConfig::default()).await;
    let before = counter.total.load(std::sync::atomic::Ordering::SeqCst);
    let chunks = v.read(0, 2 << 20).await.unwrap();
    // Data and holes alternate: 256 data chunks and 256 holes.
    assert_eq!(chunks.len(), 512);
    check_every_other_block(&flat(chunks), 256);
    let gets = counter.total.load(std::sync::atomic::Ordering::SeqCst) - before;
    let stats = &v.log().stats;
    assert_eq!(
        stats.frames_read.load(std::sync::atomic::Ordering::Relaxed),
        256
    );
    // ~1 MiB of frames: one or two GETs (a GET spans at most 1 MiB), not 256.
    assert!(
        (1..=2).contains(&gets),
        "{gets} GETs for 256 neighbouring frames"
    );
    // A second read is served from the cache.
    let _ = v.read(0, 2 << 20).await.unwrap();
    assert_eq!(
        counter.total.load(std::sync::atomic::Ordering::SeqCst) - before,
        gets
    );
}

#[tokio::test]
async fn cache_request_hands_frames_to_the_cache_round_by_round() {
    let (counter, store) = counted_store();
    // 64 single-block frames, each in a segment of its own: 64 GETs.
    write_every_other_block(&store, 64, true).await;
    let cfg = VolumeConfig::default();
    let cache = PageCache::new(cfg.cache_bytes_max);
    let v = open_with_cache(&store, cfg, Arc::clone(&cache)).await;
    assert!(counter.cache.set(Arc::clone(&cache)).is_ok());
    let before = counter.total.load(std::sync::atomic::Ordering::SeqCst);
    v.cache(0, 64 * 8192).await.unwrap();
    let seen = counter.chunk_bytes_at_get.lock().unwrap().clone();
    assert_eq!(seen.len(), 64, "one GET per frame");
    // The frames come in rounds of 16 and each round is in the cache before the next
    // starts: the last GET finds three rounds cached. Before, the warm held all 64
    // decoded frames until the last arrived, and every GET found the cache empty.
    assert_eq!(seen[0], 0);
    assert!(
        seen[63] > 0,
        "nothing was cached while the warm's last frames were fetched: {seen:?}"
    );
    // Everything is cached now: reading it takes no GET.
    check_every_other_block(&flat(v.read(0, 64 * 8192).await.unwrap()), 64);
    assert_eq!(
        counter.total.load(std::sync::atomic::Ordering::SeqCst) - before,
        64
    );
}

#[tokio::test]
async fn warms_count_frames_not_gets_against_the_fetch_bound() {
    let (counter, store) = counted_store();
    // 40 × 16 single-block frames side by side in one segment: each CACHE below gets its
    // 16 frames with one GET.
    let (warms, per) = (40u64, 16u64);
    write_every_other_block(&store, warms * per, false).await;
    let v = open(&store, VolumeConfig::default()).await;
    let before = counter.total.load(std::sync::atomic::Ordering::SeqCst);
    let tasks: Vec<_> = (0..warms)
        .map(|w| {
            let v = Arc::clone(&v);
            tokio::spawn(async move { v.cache(w * per * 8192, per * 8192).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let gets = counter.total.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(gets, warms as usize, "one GET per CACHE request");
    // Each GET carries 16 frames, and every one of them is decoded and held until the
    // cache takes it: at most FRAME_FETCHES_MAX frames, so 4 such GETs, at once. Counting
    // GETs instead let all 40 run together (640 frames).
    let max = counter.max.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max as u64 * per <= nbds3::volume::FRAME_FETCHES_MAX as u64,
        "{max} GETs of {per} frames each in flight at once"
    );
    assert!(max >= 2, "the CACHE requests did not overlap (max {max})");
    check_every_other_block(
        &flat(v.read(0, (warms * per * 8192) as u32).await.unwrap()),
        (warms * per) as usize,
    );
}

#[tokio::test]
async fn cold_read_fetches_each_frame_once_and_concurrently() {
    let (counter, store) = counted_store();
    // 64 single-block frames, each in a segment of its own (a flush per block).
    write_every_other_block(&store, 64, true).await;
    let v = open(&store, VolumeConfig::default()).await;
    let before = counter.total.load(std::sync::atomic::Ordering::SeqCst);
    check_every_other_block(&flat(v.read(0, 512 << 10).await.unwrap()), 64);
    let gets = counter.total.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(gets, 64, "each frame fetched exactly once");
    let max = counter.max.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max >= 8,
        "frames were fetched one at a time (max {max} in flight)"
    );
}

#[tokio::test]
async fn sequential_cold_reads_trigger_readahead() {
    let store: DynStore = Arc::new(MemoryStore::new());
    {
        let v = open(&store, VolumeConfig::default()).await;
        v.write(0, pattern(5, 16 << 20), false).await.unwrap();
        v.close().await.unwrap();
    }
    let v = open(&store, VolumeConfig::default()).await;
    let frames = |v: &Arc<Volume>| {
        v.log()
            .stats
            .frames_read
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Two sequential 1 MiB reads: 16 frames of 128 KiB; the second arms readahead of the
    // next 4 MiB (32 more frames) in the background.
    for i in 0..2u64 {
        assert_eq!(
            flat(v.read(i << 20, 1 << 20).await.unwrap()),
            pattern(5, 16 << 20)[(i as usize) << 20..((i as usize) + 1) << 20].to_vec()
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while frames(&v) < 16 + 32 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        frames(&v),
        16 + 32,
        "readahead did not fetch the next 4 MiB"
    );
}

fn tail_dir_bytes(v: &Volume) -> usize {
    v.log()
        .stats
        .tail_dir_bytes
        .load(std::sync::atomic::Ordering::Acquire) as usize
}

#[tokio::test]
async fn page_index_is_charged_to_the_cache_budget() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig {
        cache_bytes_max: 1 << 20,
        ..VolumeConfig::default()
    };
    let cache = PageCache::new(cfg.cache_bytes_max);
    let v = open_with_cache(&store, cfg, Arc::clone(&cache)).await;
    // 4,000 single blocks two apart: 4,000 index runs.
    let n = 4000u64;
    for i in 0..n {
        v.write(i * 2 * BS as u64, pattern(i as u8, BS as usize), false)
            .await
            .unwrap();
    }
    Volume::flush(&v).await.unwrap();
    let extents = v.log().index_extents();
    assert!(extents >= n as usize);
    // The index, and the directories of the manifest's tail (no checkpoint yet: one
    // entry per block) that the next checkpoint replays.
    let tail = tail_dir_bytes(&v);
    assert!(
        tail >= n as usize * std::mem::size_of::<DirEntry>(),
        "{tail}"
    );
    let u = cache.usage();
    assert_eq!(u.index_bytes, extents * 96 + tail);
    assert!(
        u.chunk_bytes + u.index_bytes <= 1 << 20,
        "cache and index exceed the cache size: {u:?}"
    );
    // Everything still reads back (from the store where the cache gave way).
    for i in (0..n).step_by(97) {
        assert_eq!(
            flat(v.read(i * 2 * BS as u64, BS).await.unwrap()),
            pattern(i as u8, BS as usize).to_vec()
        );
    }
    v.close().await.unwrap();
    assert_eq!(
        cache.usage().index_bytes,
        0,
        "a closed volume still charges its index"
    );
}

/// The tail's directories are charged with the index while the tail grows, and the charge
/// drops when a background checkpoint replaces the tail.
#[tokio::test]
async fn tail_directories_are_charged_until_a_checkpoint_replaces_them() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig {
        cache_bytes_max: 4 << 20,
        ..VolumeConfig::default()
    };
    let cache = PageCache::new(cfg.cache_bytes_max);
    let log = Log::open(
        Arc::clone(&store),
        "vol",
        Some(Geometry {
            size_bytes: SIZE,
            block_size: BS,
        }),
        // A checkpoint once the tail holds more entries than the index has runs.
        LogConfig {
            tail_entries_min: 0,
            ..LogConfig::default()
        },
        OpenMode::Writer,
    )
    .await
    .expect("open log");
    let v = Volume::new(
        Arc::new(log),
        cfg.clone(),
        DirtyBudget::new(cfg.dirty_bytes_max, cfg.dirty_high_water_ratio),
        Arc::clone(&cache),
        false,
    );
    let stats = &v.log().stats;
    let (mut peak, mut dropped) = (0usize, false);
    for round in 0..32u64 {
        // 64 scattered blocks per flush: 64 directory entries, and 64 new runs in the first
        // 8 rounds; later rounds rewrite those blocks, so the tail outgrows the index.
        for i in 0..64 {
            let lba = ((round % 8) * 64 + i) * 2;
            v.write(lba * BS as u64, pattern(lba as u8, BS as usize), false)
                .await
                .unwrap();
        }
        Volume::flush(&v).await.unwrap();
        let tail = tail_dir_bytes(&v);
        dropped |= tail < peak;
        peak = peak.max(tail);
        // The charge was taken at the commit, with a build's decoded copy if one had just
        // started (it may have ended since): at least the index and the tail.
        let charged = cache.usage().index_bytes;
        let floor = v.log().index_extents() * 96 + tail;
        assert!(
            charged >= floor,
            "round {round}: charged {charged} < {floor}"
        );
    }
    let installed = stats
        .checkpoints_installed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(installed > 0, "no background checkpoint was installed");
    assert!(
        dropped,
        "the tail's charge never dropped (peak {peak} bytes)"
    );
    v.close().await.unwrap();
}

/// The index charge follows index changes that are not flushes: a defragmenting
/// compaction pass shrinks the index, and the flusher's next tick lowers the charge.
#[tokio::test]
async fn index_charge_follows_compaction() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig {
        cache_bytes_max: 4 << 20,
        flush_interval: std::time::Duration::from_millis(200),
        ..VolumeConfig::default()
    };
    let cache = PageCache::new(cfg.cache_bytes_max);
    let v = open_with_cache(&store, cfg, Arc::clone(&cache)).await;
    v.start_flusher();
    // Even blocks in one flush, odd blocks in the next: 2,048 adjacent blocks, each in a
    // frame of its own.
    let n = 2048u64;
    for parity in 0..2 {
        for i in (parity..n).step_by(2) {
            v.write(i * BS as u64, pattern(i as u8, BS as usize), false)
                .await
                .unwrap();
        }
        Volume::flush(&v).await.unwrap();
    }
    assert_eq!(v.log().index_extents(), n as usize);
    let tail = tail_dir_bytes(&v);
    assert!(
        tail >= n as usize * std::mem::size_of::<DirEntry>(),
        "{tail}"
    );
    assert_eq!(cache.usage().index_bytes, n as usize * 96 + tail);
    let ccfg = nbds3::log::compact::CompactConfig {
        dead_fraction_min: 1.0,
        index_runs_max: Some(100),
        ..Default::default()
    };
    let r = nbds3::log::compact::compact_pass(v.log(), &ccfg, None)
        .await
        .unwrap();
    assert!(r.fragments > 0, "{r:?}");
    let runs = v.log().index_extents();
    assert!(runs <= 100, "{runs} runs after defragmenting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // The pass wrote its checkpoint inline: no tail is left to charge.
    assert_eq!(tail_dir_bytes(&v), 0);
    while cache.usage().index_bytes != runs * 96 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(cache.usage().index_bytes, runs * 96);
    for i in (0..n).step_by(61) {
        assert_eq!(
            flat(v.read(i * BS as u64, BS).await.unwrap()),
            pattern(i as u8, BS as usize).to_vec()
        );
    }
    v.close().await.unwrap();
}

/// Single-block writes (kept apart from longer runs in the dirty set), longer writes,
/// trims and zeroes over the same blocks, with flushes in between and a read and
/// block-status check against a per-block model every few steps, then a read after a
/// reopen. The dirty set must answer reads and flush in block order whichever structure
/// holds a block.
#[tokio::test]
async fn mixed_single_and_run_writes_match_a_model() {
    const BLOCKS: u64 = 96;
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, VolumeConfig::default()).await;
    let mut model: Vec<Option<u8>> = vec![None; BLOCKS as usize]; // None: reads as zeros
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let block = |tag: u8| Bytes::from(vec![tag; BS as usize]);
    for step in 0..600u32 {
        let tag = (step % 250) as u8 + 1;
        let lba = next(BLOCKS);
        match next(10) {
            0..=5 => {
                v.write(lba * BS as u64, block(tag), false).await.unwrap();
                model[lba as usize] = Some(tag);
            }
            6 => {
                let n = 1 + next(12).min(BLOCKS - lba - 1);
                let mut data = Vec::new();
                for i in 0..n {
                    data.extend_from_slice(&block(tag.wrapping_add(i as u8) | 1));
                    model[(lba + i) as usize] = Some(tag.wrapping_add(i as u8) | 1);
                }
                v.write(lba * BS as u64, Bytes::from(data), false)
                    .await
                    .unwrap();
            }
            7 => {
                let n = 1 + next(8).min(BLOCKS - lba - 1);
                v.trim(lba * BS as u64, n * BS as u64, false).await.unwrap();
                for i in lba..lba + n {
                    model[i as usize] = None;
                }
            }
            8 => {
                v.write_zeroes(lba * BS as u64, BS as u64, false, true)
                    .await
                    .unwrap();
                model[lba as usize] = Some(0);
            }
            _ => Volume::flush(&v).await.unwrap(),
        }
        if step % 7 == 0 {
            let got = flat(v.read(0, (BLOCKS * BS as u64) as u32).await.unwrap());
            for (i, m) in model.iter().enumerate() {
                let want = m.unwrap_or(0);
                let b = &got[i * BS as usize..(i + 1) * BS as usize];
                assert!(b.iter().all(|&x| x == want), "step {step}: block {i}");
            }
            let mut at = 0u64;
            while at < BLOCKS * BS as u64 {
                let ext = v.block_status(at, BLOCKS * BS as u64 - at).await.unwrap();
                for (len, flags) in ext {
                    for b in at / BS as u64..(at + len as u64) / BS as u64 {
                        let want = match model[b as usize] {
                            None => STATE_HOLE | STATE_ZERO,
                            Some(0) => STATE_ZERO,
                            Some(_) => 0,
                        };
                        assert_eq!(flags, want, "step {step}: status of block {b}");
                    }
                    at += len as u64;
                }
            }
        }
    }
    Volume::flush(&v).await.unwrap();
    drop(v);
    let v = open(&store, VolumeConfig::default()).await;
    let got = flat(v.read(0, (BLOCKS * BS as u64) as u32).await.unwrap());
    for (i, m) in model.iter().enumerate() {
        let b = &got[i * BS as usize..(i + 1) * BS as usize];
        assert!(
            b.iter().all(|&x| x == m.unwrap_or(0)),
            "after reopen: block {i}"
        );
    }
}

/// Frames larger than the writers' default (compaction cuts up to 1 MiB ones on devices
/// too large for the index bound): cold reads of single blocks out of them, and of the
/// whole frame, return the data written; a cold read caches only the 128 KiB-aligned
/// stretch around what it read, not the whole frame.
#[tokio::test]
async fn cold_reads_out_of_one_mib_frames_read_back() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let log_cfg = LogConfig {
        frame_bytes_max: 1 << 20,
        ..LogConfig::default()
    };
    let open_big = |store: DynStore, log_cfg: LogConfig| async move {
        let cfg = VolumeConfig {
            readahead_bytes_max: 0,
            ..VolumeConfig::default()
        };
        let cache = PageCache::new(cfg.cache_bytes_max);
        let v = open_with_log(&store, cfg, Arc::clone(&cache), log_cfg).await;
        (v, cache)
    };
    let data = pattern(7, 1 << 20);
    let (v, _) = open_big(Arc::clone(&store), log_cfg.clone()).await;
    v.write(1 << 20, data.clone(), false).await.unwrap();
    Volume::flush(&v).await.unwrap();
    // One run: the whole MiB is one frame.
    assert_eq!(v.log().index_extents(), 1);
    drop(v);
    // (first block, blocks, cached bytes after the read: the 32-block windows it touched)
    for (block, blocks, cached) in [
        (0u64, 1u64, 128 << 10),
        (17, 1, 128 << 10),
        (255, 1, 128 << 10),
        (30, 3, 256 << 10),
        (0, 256, 1 << 20),
    ] {
        // A fresh cache each time: every read is cold.
        let (v, cache) = open_big(Arc::clone(&store), log_cfg.clone()).await;
        let index = cache.usage().index_bytes;
        let off = block as usize * BS as usize;
        let len = blocks as usize * BS as usize;
        let got = flat(v.read((1 << 20) + off as u64, len as u32).await.unwrap());
        assert_eq!(got, &data[off..off + len], "blocks {block}+{blocks}");
        let usage = cache.usage();
        assert_eq!(usage.index_bytes, index);
        assert_eq!(usage.chunk_bytes, cached, "blocks {block}+{blocks}");
    }
}

/// Cold reads of many volumes' clients at once share one bound on frame fetches in flight
/// (`FRAME_FETCHES_MAX`, per page cache): 200 concurrent 4 KiB reads of blocks in 200
/// different segments never have more GETs in flight than that, yet more than one read's
/// own fan-out (so the bound is the shared one), and every read returns its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_reads_share_the_fetch_bound() {
    let (counter, store) = counted_store();
    let n = 200u64;
    write_every_other_block(&store, n, true).await;
    let v = open(&store, VolumeConfig::default()).await;
    let before = counter.total.load(std::sync::atomic::Ordering::SeqCst);
    let reads: Vec<_> = (0..n)
        .map(|i| {
            let v = Arc::clone(&v);
            tokio::spawn(async move { (i, flat(v.read(i * 8192, 4096).await.unwrap())) })
        })
        .collect();
    for r in reads {
        let (i, got) = r.await.unwrap();
        assert_eq!(got, pattern(i as u8, 4096), "block {}", 2 * i);
    }
    let gets = counter.total.load(std::sync::atomic::Ordering::SeqCst) - before;
    let max = counter.max.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(gets, n as usize, "one GET per segment");
    assert!(
        max <= nbds3::volume::FRAME_FETCHES_MAX,
        "{max} GETs in flight at once, over {}",
        nbds3::volume::FRAME_FETCHES_MAX
    );
    assert!(
        max > 16,
        "only {max} GETs in flight at once: reads did not overlap"
    );
}

/// A volume with its flusher running, a `dirty` byte budget, flushes every 50 ms and
/// writers giving up after `stall` while flushes fail.
async fn stalling_volume(store: &DynStore, dirty: u64, stall: std::time::Duration) -> Arc<Volume> {
    let cfg = VolumeConfig {
        dirty_bytes_max: dirty,
        flush_interval: std::time::Duration::from_millis(50),
        write_stall_max: Some(stall),
        ..VolumeConfig::default()
    };
    let v = open(store, cfg).await;
    v.start_flusher();
    v
}

/// Writes `len`-byte patterns one after the other from `from` until one fails; returns the
/// offsets written and the error with how long the failing write took.
async fn write_until_error(
    v: &Arc<Volume>,
    from: u64,
    len: u64,
    count: u64,
) -> (
    Vec<u64>,
    Option<(nbds3::nbd::ExportError, std::time::Duration)>,
) {
    let mut done = Vec::new();
    for i in 0..count {
        let off = from + i * len;
        let started = std::time::Instant::now();
        match v.write(off, pattern(off as u8, len as usize), false).await {
            Ok(()) => done.push(off),
            Err(e) => return (done, Some((e, started.elapsed()))),
        }
    }
    (done, None)
}

#[tokio::test]
async fn writes_get_eio_when_flushes_keep_failing_past_the_stall_bound() {
    use nbds3::store::faulty::{FaultConfig, FaultyStore};
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultConfig::default(),
    ));
    let store: DynStore = faulty.clone();
    let stall = std::time::Duration::from_millis(300);
    let v = stalling_volume(&store, 2 << 20, stall).await;
    const LEN: u64 = 256 << 10;
    v.write(0, pattern(0, LEN as usize), false).await.unwrap();
    Volume::flush(&v).await.unwrap();

    // The store goes away: writes fill the dirty set, then one waits and gets EIO.
    faulty.crash_now();
    let (accepted, failed) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        write_until_error(&v, LEN, LEN, 64),
    )
    .await
    .expect("writes hung with the store down: none failed after the stall bound");
    let (err, took) = failed.expect("a write failed once the dirty set was full");
    assert_eq!(err.errno, nbds3::nbd::Errno::Io, "{err:?}");
    assert!(took >= stall, "gave up after {took:?}");
    assert!(
        !accepted.is_empty() && accepted.len() < 16,
        "{} writes taken into a 2 MiB dirty set",
        accepted.len()
    );
    let failed_at = LEN * (accepted.len() as u64 + 1);
    // The next one fails the same way; what was taken still reads back.
    let again = v.write(failed_at, pattern(7, LEN as usize), false).await;
    assert_eq!(again.unwrap_err().errno, nbds3::nbd::Errno::Io);
    for &off in &accepted {
        assert_eq!(
            flat(v.read(off, LEN as u32).await.unwrap()),
            pattern(off as u8, LEN as usize).to_vec()
        );
    }

    // The store is back: the dirty data lands, writes are taken again.
    faulty.heal();
    Volume::flush(&v).await.unwrap();
    let after = failed_at + LEN;
    v.write(after, pattern(9, LEN as usize), false)
        .await
        .unwrap();
    Volume::flush(&v).await.unwrap();
    v.close().await.unwrap();

    // All of it is in the store; the refused writes are not.
    let v = open(faulty.inner(), VolumeConfig::default()).await;
    for &off in &accepted {
        assert_eq!(
            flat(v.read(off, LEN as u32).await.unwrap()),
            pattern(off as u8, LEN as usize).to_vec(),
            "accepted write at {off}"
        );
    }
    assert_eq!(
        flat(v.read(failed_at, LEN as u32).await.unwrap()),
        vec![0u8; LEN as usize],
        "a refused write"
    );
    assert_eq!(
        flat(v.read(after, LEN as u32).await.unwrap()),
        pattern(9, LEN as usize).to_vec()
    );
}

/// A store back from an outage takes writes as soon as a writer needs room: the writer
/// that has waited the stall bound gets a flush tried at once, where it used to get EIO
/// until the flusher's next retry (its backoff grows to 10 s in an outage).
#[tokio::test]
async fn a_store_back_from_an_outage_takes_writes_without_waiting_for_the_flusher_backoff() {
    use nbds3::store::faulty::{FaultConfig, FaultyStore};
    use std::time::{Duration, Instant};
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultConfig::default(),
    ));
    let store: DynStore = faulty.clone();
    let stall = Duration::from_millis(300);
    let v = stalling_volume(&store, 2 << 20, stall).await;
    const LEN: u64 = 256 << 10;
    faulty.crash_now();
    // Fill the dirty set; the write after that fails (the store is down).
    let (accepted, failed) =
        tokio::time::timeout(Duration::from_secs(30), write_until_error(&v, 0, LEN, 64))
            .await
            .expect("writes hung with the store down");
    let (err, _) = failed.expect("a write failed once the dirty set was full");
    assert_eq!(err.errno, nbds3::nbd::Errno::Io, "{err:?}");

    // Heal just after a failed retry that came at least 1.5 s after the one before: the
    // flusher's next retry is then 3 s or more away.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ops, mut changed) = (faulty.op_count(), Instant::now());
    let gap = loop {
        assert!(
            Instant::now() < deadline,
            "the flusher's retries never spread out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = faulty.op_count();
        if now != ops {
            ops = now;
            let gap = changed.elapsed();
            changed = Instant::now();
            // Let the retry's operations finish (they fail at once), then heal.
            tokio::time::sleep(Duration::from_millis(30)).await;
            if gap >= Duration::from_millis(1500) {
                faulty.heal();
                break gap;
            }
        }
    };

    // The dirty set is still full; this write needs room a flush has to make.
    let started = Instant::now();
    let off = LEN * (accepted.len() as u64 + 1);
    v.write(off, pattern(5, LEN as usize), false)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "store back for {:?}, write failed: {e:?}",
                started.elapsed()
            )
        });
    let took = started.elapsed();
    assert!(
        took < gap,
        "the write waited {took:?}, as long as the flusher's backoff ({gap:?} before)"
    );
    Volume::flush(&v).await.unwrap();
    v.close().await.unwrap();
    let v = open(faulty.inner(), VolumeConfig::default()).await;
    for &o in accepted.iter().chain([&off]) {
        let want = if o == off { 5 } else { o as u8 };
        assert_eq!(
            flat(v.read(o, LEN as u32).await.unwrap()),
            pattern(want, LEN as usize).to_vec(),
            "write at {o}"
        );
    }
}

#[tokio::test]
async fn a_slow_store_that_takes_flushes_never_fails_a_write() {
    use nbds3::store::faulty::{FaultConfig, FaultyStore};
    let store: DynStore = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultConfig {
            latency_max: std::time::Duration::from_millis(300),
            ..FaultConfig::default()
        },
    ));
    let stall = std::time::Duration::from_millis(20);
    let v = stalling_volume(&store, 1 << 20, stall).await;
    const LEN: u64 = 256 << 10;
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..24u64 {
        let started = std::time::Instant::now();
        v.write(i * LEN, pattern(i as u8, LEN as usize), false)
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
    }
    // Writers did wait longer than the bound, for flushes that landed.
    assert!(slowest > stall, "slowest write {slowest:?}");
    Volume::flush(&v).await.unwrap();
    for i in [0u64, 11, 23] {
        assert_eq!(
            flat(v.read(i * LEN, LEN as u32).await.unwrap()),
            pattern(i as u8, LEN as usize).to_vec()
        );
    }
}

/// Write payload buffers come back to the server's pool wherever the volume lets go of
/// them: a dirty block overwritten before its flush, a landed batch's blocks, and blocks
/// the page cache held by reference once a read has copied them into the cache's chunk.
#[tokio::test]
async fn payload_buffers_go_back_to_the_pool_when_the_volume_lets_go_of_them() {
    use nbds3::nbd::pool::PayloadPool;
    let pool = PayloadPool::new(64 << 20);
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig::default();
    let cache = PageCache::with_payload_pool(cfg.cache_bytes_max, Some(Arc::clone(&pool)));
    let v = open_with_cache(&store, cfg, cache).await;
    // What a connection does with a WRITE's payload.
    let payload = |seed: u8| {
        let mut b = pool.take(BS as usize).expect("a pooled length");
        b.as_mut().copy_from_slice(&pattern(seed, BS as usize));
        b.freeze()
    };
    let bs = BS as u64;
    const N: u64 = 16;

    // Overwritten while dirty: the first buffer is free again at once.
    v.write(0, payload(1), false).await.unwrap();
    assert_eq!(pool.free_bytes(), 0);
    v.write(0, payload(2), false).await.unwrap();
    assert_eq!(
        pool.free_bytes(),
        BS as usize,
        "the overwritten block's buffer"
    );
    // Blocks 1..N, every other chunk-aligned stretch, so the cache has no buffer for their
    // chunks and takes them by reference after the flush.
    for i in 1..N {
        v.write(i * bs, payload(i as u8 + 2), false).await.unwrap();
    }
    Volume::flush(&v).await.unwrap();
    // Landed, but the cache holds every block by reference: none back yet (the one
    // free buffer was taken again by the second write).
    assert_eq!(pool.free_bytes(), 0, "buffers the cache still holds");
    // Reading them copies them into the chunk's buffer: now all are free.
    let got = flat(v.read(0, (N * bs) as u32).await.unwrap());
    for i in 0..N {
        let want = if i == 0 { 2 } else { i as u8 + 2 };
        assert_eq!(
            &got[(i * bs) as usize..((i + 1) * bs) as usize],
            &pattern(want, BS as usize)[..],
            "block {i}"
        );
    }
    assert_eq!(pool.free_bytes(), (N * bs) as usize, "after the read");

    // Into chunks the cache has a buffer for, blocks are copied at the commit, so a
    // landed batch gives every buffer back at once.
    for i in 0..N {
        v.write(i * bs, payload(i as u8 + 40), false).await.unwrap();
    }
    assert_eq!(pool.free_bytes(), 0, "all taken again");
    Volume::flush(&v).await.unwrap();
    assert_eq!(
        pool.free_bytes(),
        (N * bs) as usize,
        "after the batch landed"
    );
    assert!(pool.stats.reused.load(std::sync::atomic::Ordering::Relaxed) > N);
    let got = flat(v.read(0, (N * bs) as u32).await.unwrap());
    for i in 0..N {
        assert_eq!(
            &got[(i * bs) as usize..((i + 1) * bs) as usize],
            &pattern(i as u8 + 40, BS as usize)[..],
            "block {i} rewritten"
        );
    }
}
