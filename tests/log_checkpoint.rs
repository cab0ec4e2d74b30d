//! Background checkpoints (issue #2): a flush never writes a checkpoint; one is written
//! off the commit path and installed by a later commit while its base is unchanged.
//!
//! What is checked, each against a per-block model of the acknowledged state and a fresh
//! reader: commits issue no checkpoint PUT themselves (PUTs are attributed to the tokio task
//! that issued them) and the tail never passes its hard limit; failing and hanging
//! checkpoint uploads never fail or lose a flush; a compaction racing a background
//! checkpoint makes it stale, and it is never installed; GC never deletes a checkpoint that
//! is pending or named; a slow checkpoint PUT makes commits wait at the hard limit instead
//! of growing the manifest.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nbds3::format::{self, ExportKeys};
use nbds3::inspect::{self, NoProgress};
use nbds3::log::compact::{self, CompactConfig};
use nbds3::log::gc::{self, GcConfig, GcState};
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::faulty::{FaultConfig, FaultyStore};
use nbds3::store::memory::MemoryStore;
use nbds3::store::{list_all, DynStore, ListPage, ObjectMeta, ObjectStore, PutMode, StoreResult};

const BS: usize = 512;
const BLOCKS: u64 = 256;
const NAME: &str = "ckpt";

// ---------------------------------------------------------------------------------------
// Model, batches, checks.

fn block(lba: u64, tag: u64) -> Vec<u8> {
    let mut v = vec![(tag as u8) | 1; BS];
    v[..8].copy_from_slice(&lba.to_le_bytes());
    v[8..16].copy_from_slice(&tag.to_le_bytes());
    v
}

/// Per block: the tag of the data written there, or None (hole).
#[derive(Clone)]
struct Model(Vec<Option<u64>>);

impl Model {
    fn new() -> Self {
        Model(vec![None; BLOCKS as usize])
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCKS as usize * BS);
        for (lba, b) in self.0.iter().enumerate() {
            match b {
                Some(tag) => out.extend_from_slice(&block(lba as u64, *tag)),
                None => out.extend(std::iter::repeat_n(0u8, BS)),
            }
        }
        out
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// A random sorted batch (data runs, sometimes an unmap), applied to the model only when
/// the caller says the commit was acknowledged: returns (batch, model after it).
fn random_batch(rng: &mut Rng, model: &Model, tag: u64) -> (Vec<BatchEntry>, Model) {
    let mut after = model.clone();
    let mut out = Vec::new();
    let mut lba = rng.below(16);
    while lba < BLOCKS && out.len() < 4 {
        let len = (1 + rng.below(8)).min(BLOCKS - lba);
        if rng.below(5) == 0 {
            out.push(BatchEntry {
                lba,
                blocks: len,
                update: Update::Unmap,
            });
            for i in lba..lba + len {
                after.0[i as usize] = None;
            }
        } else {
            let mut d = Vec::with_capacity(len as usize * BS);
            for i in lba..lba + len {
                d.extend_from_slice(&block(i, tag));
                after.0[i as usize] = Some(tag);
            }
            out.push(BatchEntry {
                lba,
                blocks: len,
                update: Update::Data(Bytes::from(d)),
            });
        }
        lba += len + rng.below(64);
    }
    if out.is_empty() {
        out.push(BatchEntry {
            lba: 0,
            blocks: 1,
            update: Update::Unmap,
        });
        after.0[0] = None;
    }
    (out, after)
}

fn cfg(soft: usize, hard: usize) -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        frame_bytes_max: 2048,
        uploads_in_flight_max: 2,
        tail_segments_max: soft,
        tail_segments_hard_max: hard,
        tail_entries_min: 1 << 20,
        ..LogConfig::default()
    }
}

async fn create(store: &DynStore, cfg: LogConfig) -> Log {
    Log::open(
        Arc::clone(store),
        NAME,
        Some(Geometry {
            size_bytes: BLOCKS * BS as u64,
            block_size: BS as u32,
        }),
        cfg,
        OpenMode::Writer,
    )
    .await
    .expect("create export")
}

/// A fresh reader on `store` sees exactly the model, with consistent accounting.
async fn assert_reopens_as(store: &DynStore, model: &Model, ctx: &str) {
    let r = Log::open(
        Arc::clone(store),
        NAME,
        None,
        LogConfig::default(),
        OpenMode::ReadOnly,
    )
    .await
    .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    r.check_accounting()
        .unwrap_or_else(|e| panic!("{ctx}: accounting: {e}"));
    let data = r
        .read_blocks(0, BLOCKS)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
    assert!(data == model.bytes(), "{ctx}: reopened state differs");
}

fn stat(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Every manifest in the store, decoded.
async fn stored_manifests(store: &DynStore) -> Vec<format::Manifest> {
    let keys = ExportKeys::new(NAME).expect("keys");
    let mut out = Vec::new();
    for o in list_all(store.as_ref(), &keys.manifest_prefix())
        .await
        .expect("list")
    {
        let body = store.get(&o.key).await.expect("get manifest");
        out.push(format::decode_manifest(&body).expect("decode manifest"));
    }
    out
}

async fn checkpoint_keys(store: &DynStore) -> Vec<String> {
    let keys = ExportKeys::new(NAME).expect("keys");
    list_all(store.as_ref(), &keys.checkpoint_prefix())
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// `inspect verify` finds no problem (orphans are allowed: GC's business).
async fn assert_verify_clean(store: &DynStore, ctx: &str) {
    let r = inspect::verify(store, NAME, None, &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: verify: {e}"));
    assert!(r.ok && r.index_checked, "{ctx}: verify: {:?}", r.problems);
}

/// Everything present is named by a manifest at or above the low-water mark, and
/// everything named is present.
async fn assert_fully_collected(store: &DynStore, ctx: &str) {
    let keys = ExportKeys::new(NAME).expect("keys");
    let reachable = gc::reachable_keys(store, &keys).await.expect("reachable");
    let present: std::collections::BTreeSet<String> = list_all(store.as_ref(), &keys.root)
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    let garbage: Vec<&String> = present.difference(&reachable).collect();
    let missing: Vec<&String> = reachable.difference(&present).collect();
    assert!(garbage.is_empty(), "{ctx}: left behind: {garbage:?}");
    assert!(missing.is_empty(), "{ctx}: named but missing: {missing:?}");
}

fn gc_now() -> GcConfig {
    GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::ZERO,
        delete_objects_max: 100_000,
    }
}

// ---------------------------------------------------------------------------------------
// A store that records who PUT what, and can hold checkpoint PUTs.

#[derive(Debug, Clone)]
struct PutRec {
    key: String,
    /// The tokio task that issued the PUT.
    task: Option<tokio::task::Id>,
}

#[derive(Debug)]
struct TestStore {
    inner: DynStore,
    puts: Mutex<Vec<PutRec>>,
    /// Checkpoint PUTs still to hold (each waits for a permit of `release`).
    hold: AtomicUsize,
    /// Held PUTs are applied first, then held (the response is what hangs).
    apply_first: AtomicBool,
    /// PUTs being held right now.
    held: AtomicUsize,
    release: tokio::sync::Semaphore,
}

impl TestStore {
    fn new() -> Arc<TestStore> {
        Arc::new(TestStore {
            inner: Arc::new(MemoryStore::new()),
            puts: Mutex::new(Vec::new()),
            hold: AtomicUsize::new(0),
            apply_first: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
        })
    }
    fn puts(&self) -> Vec<PutRec> {
        self.puts.lock().expect("puts").clone()
    }
    /// Hold the next `n` checkpoint PUTs until `release_held`.
    fn hold_checkpoints(&self, n: usize, apply_first: bool) {
        self.apply_first.store(apply_first, Ordering::SeqCst);
        self.hold.store(n, Ordering::SeqCst);
    }
    fn release_held(&self, n: usize) {
        self.release.add_permits(n);
    }
    async fn wait_until_held(&self, n: usize) {
        for _ in 0..500 {
            if self.held.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no checkpoint PUT was held");
    }
}

#[async_trait]
impl ObjectStore for TestStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        self.puts.lock().expect("puts").push(PutRec {
            key: key.to_string(),
            task: tokio::task::try_id(),
        });
        let hold = key.contains("/checkpoint/")
            && self
                .hold
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if !hold {
            return self.inner.put(key, data, mode).await;
        }
        let apply_first = self.apply_first.load(Ordering::SeqCst);
        let r = if apply_first {
            Some(self.inner.put(key, data.clone(), mode).await)
        } else {
            None
        };
        self.held.fetch_add(1, Ordering::SeqCst);
        let permit = self.release.acquire().await.expect("semaphore");
        permit.forget();
        self.held.fetch_sub(1, Ordering::SeqCst);
        match r {
            Some(r) => r,
            None => self.inner.put(key, data, mode).await,
        }
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("test({})", self.inner.describe())
    }
}

fn kind(key: &str) -> &'static str {
    if key.contains("/segment/") {
        "segment"
    } else if key.contains("/manifest/") {
        "manifest"
    } else if key.contains("/checkpoint/") {
        "checkpoint"
    } else {
        "other"
    }
}

// ---------------------------------------------------------------------------------------
// (a) Flushes never write checkpoints; checkpoints are installed; the tail stays bounded.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_never_write_checkpoints_and_the_tail_stays_bounded() {
    // Inside a spawned task: `tokio::task::id()` names the committing task (the test's
    // `block_on` future has no id).
    tokio::spawn(async {
        let ts = TestStore::new();
        let store: DynStore = ts.clone();
        let (soft, hard) = (4, 8);
        let log = create(&store, cfg(soft, hard)).await;
        let me = tokio::task::id();
        let mut model = Model::new();
        let mut rng = Rng(7);
        for i in 0..300u64 {
            let (batch, after) = random_batch(&mut rng, &model, i + 1);
            let puts_before = ts.puts().len();
            let segs_before = stat(&log.stats.segments_written);
            log.commit(&batch).await.expect("commit");
            model = after;
            let segs = stat(&log.stats.segments_written) - segs_before;
            let mine: Vec<PutRec> = ts.puts()[puts_before..]
                .iter()
                .filter(|p| p.task == Some(me))
                .cloned()
                .collect();
            let count = |k: &str| mine.iter().filter(|p| kind(&p.key) == k).count() as u64;
            assert_eq!(count("checkpoint"), 0, "commit {i} wrote a checkpoint");
            assert_eq!(count("manifest"), 1, "commit {i}: {mine:?}");
            assert_eq!(count("segment"), segs, "commit {i}: {mine:?}");
            assert_eq!(mine.len() as u64, segs + 1, "commit {i}: {mine:?}");
            let m = log.manifest().await;
            assert!(m.tail.len() <= hard, "commit {i}: tail {}", m.tail.len());
            if i % 60 == 59 {
                assert_reopens_as(&store, &model, &format!("commit {i}")).await;
            }
        }
        let ck_puts: Vec<PutRec> = ts
            .puts()
            .into_iter()
            .filter(|p| kind(&p.key) == "checkpoint")
            .collect();
        assert!(!ck_puts.is_empty());
        assert!(
            ck_puts
                .iter()
                .all(|p| p.task.is_some() && p.task != Some(me)),
            "every checkpoint PUT came from a background task"
        );
        let installed = stat(&log.stats.checkpoints_installed);
        assert!(installed >= 30, "only {installed} checkpoints installed");
        assert_eq!(stat(&log.stats.checkpoints_discarded), 0);
        // Every manifest ever written respects the hard limit; most name a checkpoint.
        let ms = stored_manifests(&store).await;
        assert!(ms.iter().all(|m| m.tail.len() <= hard));
        assert!(ms.iter().filter(|m| m.checkpoint.is_some()).count() > 250);
        assert_reopens_as(&store, &model, "end").await;
        assert_verify_clean(&store, "end").await;
        // A new writer continues from the same state and keeps checkpointing.
        drop(log);
        let w = Log::open(
            Arc::clone(&store),
            NAME,
            None,
            cfg(soft, hard),
            OpenMode::Writer,
        )
        .await
        .expect("writer reopen");
        for i in 0..20u64 {
            let (batch, after) = random_batch(&mut rng, &model, 10_000 + i);
            w.commit(&batch).await.expect("commit after reopen");
            model = after;
        }
        assert!(stat(&w.stats.checkpoints_installed) >= 2);
        assert_reopens_as(&store, &model, "after reopen").await;
    })
    .await
    .expect("test task");
}

/// A checkpoint upload that hangs does not hold flushes up until the tail reaches its hard
/// limit; the commit that would pass it waits, and completes once the upload does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_proceed_past_a_hanging_checkpoint_until_the_hard_limit() {
    let ts = TestStore::new();
    let store: DynStore = ts.clone();
    let (soft, hard) = (2, 6);
    let log = Arc::new(create(&store, cfg(soft, hard)).await);
    let mut model = Model::new();
    let mut rng = Rng(11);
    ts.hold_checkpoints(1, false);
    let mut tag = 0;
    // Single-segment commits: the tail grows by one each time.
    let mut commit_one = |model: &Model| {
        tag += 1;
        let lba = tag % BLOCKS;
        let mut after = model.clone();
        after.0[lba as usize] = Some(tag);
        (
            vec![BatchEntry {
                lba,
                blocks: 1,
                update: Update::Data(Bytes::from(block(lba, tag))),
            }],
            after,
        )
    };
    while log.manifest().await.tail.len() < hard {
        let (b, after) = commit_one(&model);
        log.commit(&b).await.expect("commit below the hard limit");
        model = after;
    }
    ts.wait_until_held(1).await;
    assert_eq!(stat(&log.stats.checkpoints_written), 0, "upload is hanging");
    assert_eq!(stat(&log.stats.commits_waited_for_checkpoint), 0);
    // The job's decoded copy of the index is reported (for the volume to charge) while
    // it lives …
    let building = stat(&log.stats.checkpoint_build_extents);
    assert!(
        building > 0 && building <= log.index_extents() as u64,
        "{building} extents being built"
    );
    // The next commit would pass the hard limit: it waits for the hanging upload.
    let (b, after) = commit_one(&model);
    let l2 = Arc::clone(&log);
    let waiting = tokio::spawn(async move { l2.commit(&b).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "commit passed the hard limit");
    ts.release_held(1);
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("commit completes once the checkpoint is written")
        .expect("task")
        .expect("commit");
    model = after;
    let m = log.manifest().await;
    assert!(m.checkpoint.is_some() && m.tail.len() <= hard, "{m:?}");
    assert_eq!(stat(&log.stats.commits_waited_for_checkpoint), 1);
    // … and no longer once it has ended (a checkpoint started by the last commit may
    // still be running: wait for it).
    log.wait_checkpoint().await;
    assert_eq!(stat(&log.stats.checkpoint_build_extents), 0);
    assert!(stored_manifests(&store)
        .await
        .iter()
        .all(|m| m.tail.len() <= hard));
    let _ = &mut rng;
    assert_reopens_as(&store, &model, "after the wait").await;
}

// ---------------------------------------------------------------------------------------
// (e) Hard limit with slow checkpoint PUTs (faulty store latency).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_checkpoint_puts_make_commits_wait_at_the_hard_limit() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let store: DynStore = Arc::new(FaultyStore::new(
        Arc::clone(&mem),
        FaultConfig {
            seed: 5,
            latency_max: Duration::from_millis(250),
            key_contains: Some("/checkpoint/".into()),
            ..FaultConfig::default()
        },
    ));
    let (soft, hard) = (2, 5);
    let log = create(&store, cfg(soft, hard)).await;
    let mut model = Model::new();
    let mut rng = Rng(3);
    for i in 0..60u64 {
        let (batch, after) = random_batch(&mut rng, &model, i + 1);
        log.commit(&batch).await.expect("commit");
        model = after;
        let m = log.manifest().await;
        assert!(m.tail.len() <= hard, "commit {i}: tail {}", m.tail.len());
    }
    let waited = stat(&log.stats.commits_waited_for_checkpoint);
    let installed = stat(&log.stats.checkpoints_installed);
    assert!(waited >= 3, "only {waited} commits waited");
    assert!(installed >= 5, "only {installed} installed");
    assert!(stored_manifests(&mem)
        .await
        .iter()
        .all(|m| m.tail.len() <= hard));
    assert_reopens_as(&mem, &model, "end").await;
}

// ---------------------------------------------------------------------------------------
// (b) Failing and crashing checkpoint uploads.

#[tokio::test]
async fn failing_checkpoint_uploads_never_fail_or_lose_a_flush() {
    let mut discarded = 0;
    let mut installed = 0;
    for seed in 0..24u64 {
        let mem: DynStore = Arc::new(MemoryStore::new());
        let store: DynStore = Arc::new(FaultyStore::new(
            Arc::clone(&mem),
            FaultConfig {
                seed,
                fail_before_prob: 0.15,
                fail_after_prob: 0.15,
                short_read_prob: 0.05,
                corrupt_read_prob: 0.05,
                key_contains: Some("/checkpoint/".into()),
                ..FaultConfig::default()
            },
        ));
        // The hard limit is not the subject here (a commit at it that sees every checkpoint
        // fail does fail): far away.
        let log = create(&store, cfg(3, 256)).await;
        let mut model = Model::new();
        let mut rng = Rng(seed);
        for i in 0..40u64 {
            let (batch, after) = random_batch(&mut rng, &model, seed * 1000 + i + 1);
            log.commit(&batch)
                .await
                .unwrap_or_else(|e| panic!("seed {seed} commit {i}: {e}"));
            model = after;
        }
        discarded += stat(&log.stats.checkpoints_discarded);
        installed += stat(&log.stats.checkpoints_installed);
        let ctx = format!("seed {seed}");
        assert_reopens_as(&mem, &model, &ctx).await;
        // A new writer on the healthy store collects what the failures left behind.
        drop(log);
        let w = Log::open(Arc::clone(&mem), NAME, None, cfg(3, 256), OpenMode::Writer)
            .await
            .expect("writer");
        let mut st = GcState::default();
        gc::gc_pass(&w, &gc_now(), &mut st).await.expect("gc");
        while w.finish_checkpoint().await.expect("finish") {
            gc::gc_pass(&w, &gc_now(), &mut st).await.expect("gc");
        }
        assert_fully_collected(&mem, &ctx).await;
        assert_verify_clean(&mem, &ctx).await;
        assert_reopens_as(&mem, &model, &ctx).await;
    }
    assert!(discarded >= 20, "only {discarded} failed checkpoints");
    assert!(installed >= 50, "only {installed} installed");
}

/// The writer dies while a checkpoint upload hangs (applied or not): every acknowledged
/// flush is there for the next writer, which collects the orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_dying_during_a_checkpoint_upload_loses_nothing() {
    for apply_first in [false, true] {
        let ts = TestStore::new();
        let store: DynStore = ts.clone();
        let log = create(&store, cfg(2, 64)).await;
        let mut model = Model::new();
        let mut rng = Rng(21);
        ts.hold_checkpoints(1, apply_first);
        for i in 0..10u64 {
            let (batch, after) = random_batch(&mut rng, &model, i + 1);
            log.commit(&batch).await.expect("commit");
            model = after;
        }
        ts.wait_until_held(1).await;
        let ctx = format!("apply_first {apply_first}");
        assert_eq!(
            checkpoint_keys(&store).await.len(),
            usize::from(apply_first),
            "{ctx}"
        );
        // "Crash": the process is gone, its upload never answers.
        drop(log);
        assert_reopens_as(&store, &model, &ctx).await;
        let w = Log::open(Arc::clone(&store), NAME, None, cfg(2, 64), OpenMode::Writer)
            .await
            .expect("new writer");
        for i in 0..6u64 {
            let (batch, after) = random_batch(&mut rng, &model, 100 + i);
            w.commit(&batch).await.expect("commit by the new writer");
            model = after;
        }
        let mut st = GcState::default();
        gc::gc_pass(&w, &gc_now(), &mut st).await.expect("gc");
        while w.finish_checkpoint().await.expect("finish") {
            gc::gc_pass(&w, &gc_now(), &mut st).await.expect("gc");
        }
        assert_fully_collected(&store, &ctx).await;
        assert_verify_clean(&store, &ctx).await;
        assert_reopens_as(&store, &model, &ctx).await;
        ts.release_held(1);
    }
}

// ---------------------------------------------------------------------------------------
// (c) Compaction racing a background checkpoint.

fn compact_cfg() -> CompactConfig {
    CompactConfig {
        dead_fraction_min: 0.2,
        small_segment_bytes: 1 << 20,
        small_segments_min: 2,
        gc: gc_now(),
        ..CompactConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_a_background_checkpoint_stale_and_it_is_never_installed() {
    // written: the checkpoint finished before the compaction; else its upload hangs
    // (applied first or not) across the compaction.
    for (written, apply_first) in [(true, false), (false, false), (false, true)] {
        let ctx = format!("written {written} apply_first {apply_first}");
        let ts = TestStore::new();
        let store: DynStore = ts.clone();
        let log = create(&store, cfg(3, 64)).await;
        let mut model = Model::new();
        let mut rng = Rng(99);
        // One segment per commit (8 blocks of 512 bytes = segment_bytes_max). Block 0..4 of
        // the first segment are overwritten: it is half dead, a compaction victim.
        let runs = [(0u64, 8u64), (0, 4), (8, 4), (20, 4)];
        for (i, (lba, blocks)) in runs.into_iter().enumerate() {
            if i == 3 && !written {
                ts.hold_checkpoints(1, apply_first);
            }
            let tag = i as u64 + 1;
            let mut d = Vec::new();
            for b in lba..lba + blocks {
                d.extend_from_slice(&block(b, tag));
                model.0[b as usize] = Some(tag);
            }
            log.commit(&[BatchEntry {
                lba,
                blocks,
                update: Update::Data(Bytes::from(d)),
            }])
            .await
            .expect("commit");
        }
        // The fourth commit made the tail 4 > 3: a checkpoint of its state started.
        assert_eq!(log.manifest().await.tail.len(), 4, "{ctx}");
        let stale = if written {
            log.wait_checkpoint().await.expect("written, not installed")
        } else {
            ts.wait_until_held(1).await;
            u64::MAX
        };
        // Distinct data after the checkpoint's version: installing the stale checkpoint
        // over the compacted manifest would lose it.
        let mut after = model.clone();
        let mut d = Vec::new();
        for lba in 200..208 {
            d.extend_from_slice(&block(lba, 777));
            after.0[lba as usize] = Some(777);
        }
        // Not through commit(): that would install a written checkpoint right away.
        let r = compact::compact_pass(&log, &compact_cfg(), None)
            .await
            .expect("compaction");
        assert!(r.version.is_some(), "{ctx}: compaction committed: {r:?}");
        assert!(stat(&log.stats.checkpoints_discarded) >= 1, "{ctx}");
        let rewritten = log.manifest().await;
        log.commit(&[BatchEntry {
            lba: 200,
            blocks: 8,
            update: Update::Data(Bytes::from(d)),
        }])
        .await
        .expect("commit after compaction");
        model = after;
        if !written {
            ts.release_held(1);
        }
        for i in 0..8u64 {
            let (batch, after) = random_batch(&mut rng, &model, 10 + i);
            log.commit(&batch).await.expect("commit");
            model = after;
        }
        let stale_ids: Vec<u64> = checkpoint_keys(&store)
            .await
            .iter()
            .filter_map(|k| format::parse_numbered_key(&log.keys().checkpoint_prefix(), k))
            .filter(|&id| id < rewritten.checkpoint.expect("rewrite's checkpoint").id)
            .collect();
        if written {
            assert!(stale_ids.contains(&stale), "{ctx}");
        }
        for m in stored_manifests(&store).await {
            let named = m.checkpoint.map(|c| c.id);
            assert!(
                named.is_none_or(|id| !stale_ids.contains(&id) || m.version < rewritten.version),
                "{ctx}: version {} names the stale checkpoint {named:?}",
                m.version
            );
        }
        assert_reopens_as(&store, &model, &ctx).await;
        // GC collects the stale checkpoint (it is no longer pending).
        let mut st = GcState::default();
        gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
        while log.finish_checkpoint().await.expect("finish") {
            gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
        }
        assert_fully_collected(&store, &ctx).await;
        assert_verify_clean(&store, &ctx).await;
        assert_reopens_as(&store, &model, &ctx).await;
    }
}

// ---------------------------------------------------------------------------------------
// (d) GC beside pending and installing checkpoints.

/// The checkpoint object exists (its PUT applied, the response hangs) and no manifest
/// names it yet: GC, whose own commit settles everything below its floor, must keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_a_pending_background_checkpoint() {
    let ts = TestStore::new();
    let store: DynStore = ts.clone();
    let log = create(&store, cfg(2, 64)).await;
    let mut model = Model::new();
    let mut rng = Rng(5);
    ts.hold_checkpoints(1, true);
    for i in 0..6u64 {
        let (batch, after) = random_batch(&mut rng, &model, i + 1);
        log.commit(&batch).await.expect("commit");
        model = after;
    }
    ts.wait_until_held(1).await;
    let pending = checkpoint_keys(&store).await;
    assert_eq!(pending.len(), 1);
    let mut st = GcState::default();
    for _ in 0..2 {
        let r = gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
        assert!(
            !r.deleted_keys.contains(&pending[0]),
            "GC deleted the pending checkpoint: {r:?}"
        );
        assert!(r.objects_kept_unsure >= 1, "{r:?}");
    }
    assert_eq!(checkpoint_keys(&store).await, pending);
    ts.release_held(1);
    assert!(log.finish_checkpoint().await.expect("install"));
    let m = log.manifest().await;
    assert_eq!(
        m.checkpoint.map(|c| log.keys().checkpoint(c.id)),
        Some(pending[0].clone())
    );
    // The tail committed after the installed checkpoint's version is long again: another
    // one starts; install that too so nothing is in flight.
    gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
    while log.finish_checkpoint().await.expect("finish") {
        gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
    }
    assert_fully_collected(&store, "after install").await;
    assert_verify_clean(&store, "after install").await;
    assert_reopens_as(&store, &model, "after install").await;
}

/// Flushes, background checkpoints (slow uploads) and aggressive GC passes all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_running_beside_flushes_and_background_checkpoints() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let store: DynStore = Arc::new(FaultyStore::new(
        Arc::clone(&mem),
        FaultConfig {
            seed: 17,
            latency_max: Duration::from_millis(20),
            key_contains: Some("/checkpoint/".into()),
            ..FaultConfig::default()
        },
    ));
    let log = Arc::new(create(&store, cfg(3, 12)).await);
    let done = Arc::new(AtomicBool::new(false));
    let gc_task = {
        let log = Arc::clone(&log);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut st = GcState::default();
            let mut deleted = 0u64;
            while !done.load(Ordering::SeqCst) {
                let r = gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
                deleted += r.objects_deleted();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            deleted
        })
    };
    let mut model = Model::new();
    let mut rng = Rng(23);
    for i in 0..300u64 {
        let (batch, after) = random_batch(&mut rng, &model, i + 1);
        log.commit(&batch).await.expect("commit");
        model = after;
        if i % 50 == 49 {
            // Every manifest GC kept still opens (nothing it names was deleted).
            assert_reopens_as(&mem, &model, &format!("commit {i}")).await;
        }
    }
    done.store(true, Ordering::SeqCst);
    let deleted = gc_task.await.expect("gc task");
    assert!(deleted > 50, "GC deleted only {deleted}");
    assert!(stat(&log.stats.checkpoints_installed) >= 10);
    let mut st = GcState::default();
    gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
    while log.finish_checkpoint().await.expect("finish") {
        gc::gc_pass(&log, &gc_now(), &mut st).await.expect("gc");
    }
    assert_fully_collected(&mem, "end").await;
    assert_verify_clean(&mem, "end").await;
    assert_reopens_as(&mem, &model, "end").await;
}
