//! Log-layer behaviour against a per-block model, on the memory store and the file store:
//! round trips through `Log::commit` / `Log::read_blocks`, holes and zero blocks, index-only
//! unmap and zero-alloc, reopen (checkpoint + tail replay), geometry, export isolation,
//! corrupted and missing objects, fencing (including the GC trap) and ambiguous failures.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::HookedPuts;
use nbds3::format::{self, EntryKind, ExportKeys, FormatError};
use nbds3::log::index::Val;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, LogError, OpenMode, Update};
use nbds3::store::faulty::{FaultConfig, FaultyStore, OpKind};
use nbds3::store::file::FileStore;
use nbds3::store::memory::MemoryStore;
use nbds3::store::{list_all, DynStore};

// ---------------------------------------------------------------------------------------
// Model and helpers.

/// What one block is, as far as the log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blk {
    Hole,
    ZeroAlloc,
    /// Non-zero content derived from (lba, seed).
    Data(u64),
}

/// Deterministic, never all-zero, partly compressible block content.
fn block_bytes(bs: usize, lba: u64, seed: u64) -> Vec<u8> {
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut v = Vec::with_capacity(bs);
    while v.len() < bs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half the 8-byte words repeat the run's tag: zstd has something to find.
        let w = if (v.len() / 8) % 2 == 0 { x } else { seed | 1 };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.truncate(bs);
    v[0] |= 1;
    v
}

struct Model {
    bs: usize,
    blocks: Vec<Blk>,
}

impl Model {
    fn new(bs: usize, n: u64) -> Self {
        Self {
            bs,
            blocks: vec![Blk::Hole; n as usize],
        }
    }
    fn apply(&mut self, batch: &[BatchEntry]) {
        for e in batch {
            for i in 0..e.blocks {
                let lba = (e.lba + i) as usize;
                self.blocks[lba] = match &e.update {
                    Update::Unmap => Blk::Hole,
                    Update::ZeroAlloc => Blk::ZeroAlloc,
                    Update::Data(d) => {
                        let b = &d[i as usize * self.bs..(i as usize + 1) * self.bs];
                        if b.iter().all(|&x| x == 0) {
                            Blk::Hole
                        } else {
                            // Recover the seed: tests only write block_bytes(lba, seed).
                            Blk::Data(seed_of(b))
                        }
                    }
                };
            }
        }
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blocks.len() * self.bs);
        for (lba, b) in self.blocks.iter().enumerate() {
            match b {
                Blk::Data(seed) => out.extend_from_slice(&block_bytes(self.bs, lba as u64, *seed)),
                _ => out.extend(std::iter::repeat_n(0u8, self.bs)),
            }
        }
        out
    }
}

/// Every test block carries its seed in bytes 8..16 (the first odd word is `seed | 1`).
fn seed_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) & !1
}

fn data(bs: usize, lba: u64, blocks: u64, seed: u64) -> BatchEntry {
    assert_eq!(seed & 1, 0, "seeds are even (see seed_of)");
    let mut v = Vec::with_capacity(blocks as usize * bs);
    for i in 0..blocks {
        v.extend_from_slice(&block_bytes(bs, lba + i, seed));
    }
    BatchEntry {
        lba,
        blocks,
        update: Update::Data(Bytes::from(v)),
    }
}
fn zeros(bs: usize, lba: u64, blocks: u64) -> BatchEntry {
    BatchEntry {
        lba,
        blocks,
        update: Update::Data(Bytes::from(vec![0u8; blocks as usize * bs])),
    }
}
fn unmap(lba: u64, blocks: u64) -> BatchEntry {
    BatchEntry {
        lba,
        blocks,
        update: Update::Unmap,
    }
}
fn zero_alloc(lba: u64, blocks: u64) -> BatchEntry {
    BatchEntry {
        lba,
        blocks,
        update: Update::ZeroAlloc,
    }
}

/// Assert the log reads and maps exactly what the model says.
async fn assert_matches(log: &Log, model: &Model, ctx: &str) {
    let n = model.blocks.len() as u64;
    let got = log.read_blocks(0, n).await.expect("read_blocks");
    if got != model.bytes() {
        let bs = model.bs;
        let bad: Vec<usize> = (0..n as usize)
            .filter(|&i| got[i * bs..(i + 1) * bs] != model.bytes()[i * bs..(i + 1) * bs])
            .take(10)
            .collect();
        panic!("{ctx}: data differs from the model at blocks {bad:?}");
    }
    for (s, l, v) in log.lookup(0, n) {
        for lba in s..s + l {
            let want = model.blocks[lba as usize];
            let ok = matches!(
                (want, v),
                (Blk::Hole, None)
                    | (Blk::ZeroAlloc, Some(Val::ZeroAlloc))
                    | (Blk::Data(_), Some(Val::Frame { .. }))
            );
            assert!(ok, "{ctx}: block {lba} is {v:?}, model says {want:?}");
        }
    }
}

fn geometry(bs: u32, blocks: u64) -> Geometry {
    Geometry {
        size_bytes: bs as u64 * blocks,
        block_size: bs,
    }
}

async fn create(store: &DynStore, name: &str, g: Geometry, cfg: LogConfig) -> Log {
    Log::open(Arc::clone(store), name, Some(g), cfg, OpenMode::Writer)
        .await
        .expect("create export")
}

async fn open_rw(store: &DynStore, name: &str, cfg: LogConfig) -> LogResultLog {
    Log::open(Arc::clone(store), name, None, cfg, OpenMode::Writer).await
}

async fn open_ro(store: &DynStore, name: &str) -> LogResultLog {
    Log::open(
        Arc::clone(store),
        name,
        None,
        LogConfig::default(),
        OpenMode::ReadOnly,
    )
    .await
}

type LogResultLog = Result<Log, LogError>;

/// The stores every backend-independent test runs against.
struct Backend {
    name: &'static str,
    store: DynStore,
    _dir: Option<tempfile::TempDir>,
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = FileStore::open(dir.path().to_str().expect("utf-8 temp path")).expect("file store");
    vec![
        Backend {
            name: "memory",
            store: Arc::new(MemoryStore::new()),
            _dir: None,
        },
        Backend {
            name: "file",
            store: Arc::new(file),
            _dir: Some(dir),
        },
    ]
}

fn small_cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 << 10,
        frame_bytes_max: 4 << 10,
        tail_segments_max: 3,
        tail_entries_min: 1 << 20,
        ..LogConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Round trips, holes, zero blocks.

#[tokio::test]
async fn round_trip_holes_and_zero_blocks() {
    for be in backends() {
        let bs = 1024usize;
        let n = 256u64;
        let log = create(&be.store, "rt", geometry(bs as u32, n), small_cfg()).await;
        let mut model = Model::new(bs, n);
        assert_matches(&log, &model, be.name).await;
        assert_eq!(
            log.lookup(0, n),
            vec![(0, n, None)],
            "{}: new export is one hole",
            be.name
        );
        // Multi-frame and multi-segment runs (frames 4 KiB = 4 blocks, segments 16 KiB).
        let b1 = vec![data(bs, 0, 40, 2), data(bs, 50, 3, 4), data(bs, 255, 1, 6)];
        let v1 = log.commit(&b1).await.expect("commit 1");
        model.apply(&b1);
        assert_matches(&log, &model, be.name).await;
        // Overwrites that split existing frames, plus a run with zero blocks inside.
        let mut mixed = data(bs, 20, 6, 8);
        if let Update::Data(d) = &mixed.update {
            let mut v = d.to_vec();
            v[bs..3 * bs].fill(0); // blocks 21 and 22 become zero
            mixed.update = Update::Data(Bytes::from(v));
        }
        let b2 = vec![data(bs, 3, 2, 10), mixed, zeros(bs, 50, 2)];
        let v2 = log.commit(&b2).await.expect("commit 2");
        assert_eq!(v2, v1 + 1, "{}: one version per commit", be.name);
        model.apply(&b2);
        assert_matches(&log, &model, be.name).await;
        for lba in [21, 22, 50, 51] {
            assert_eq!(
                log.lookup(lba, 1),
                vec![(lba, 1, None)],
                "{}: all-zero block {lba} must be unmapped",
                be.name
            );
        }
        // Partial reads straddling holes and frames.
        let part = log.read_blocks(18, 10).await.expect("partial read");
        assert_eq!(part, model.bytes()[18 * bs..28 * bs], "{}", be.name);
        // Reads outside what was written are zeros and read no frames.
        let frames_before = log
            .stats
            .frames_read
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(log
            .read_blocks(100, 150)
            .await
            .expect("hole")
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            log.stats
                .frames_read
                .load(std::sync::atomic::Ordering::Relaxed),
            frames_before,
            "{}: holes cost no reads",
            be.name
        );
        // Invalid batches are refused before any I/O.
        for bad in [
            vec![data(bs, 250, 7, 12)],
            vec![data(bs, 5, 2, 12), data(bs, 6, 1, 14)],
            vec![data(bs, 9, 1, 12), data(bs, 5, 1, 14)],
            vec![unmap(0, 0)],
        ] {
            match log.commit(&bad).await {
                Err(LogError::Invalid(_)) => {}
                other => panic!("{}: bad batch accepted: {other:?}", be.name),
            }
        }
        let bad_len = BatchEntry {
            lba: 0,
            blocks: 2,
            update: Update::Data(Bytes::from(vec![1u8; bs])),
        };
        assert!(matches!(
            log.commit(&[bad_len]).await,
            Err(LogError::Invalid(_))
        ));
        assert_eq!(
            log.version(),
            v2,
            "{}: refused batches commit nothing",
            be.name
        );
        assert_matches(&log, &model, be.name).await;
    }
}

#[tokio::test]
async fn unmap_and_zero_alloc_only_change_the_index() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let bs = 4096usize;
    // 1 TiB device: unmapping or zeroing all of it must cost a few bytes, not terabytes.
    let n = (1u64 << 40) / bs as u64;
    let log = create(&store, "trim", geometry(bs as u32, n), LogConfig::default()).await;
    let b1 = vec![data(bs, 0, 64, 2), data(bs, n - 8, 8, 4)];
    log.commit(&b1).await.expect("data");
    let seg_bytes = || {
        log.stats
            .segment_bytes_written
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = seg_bytes();
    let b2 = vec![
        unmap(0, 16),
        zero_alloc(16, 16),
        zero_alloc(1 << 20, n - (1 << 20) - 8),
    ];
    log.commit(&b2).await.expect("unmap + zero-alloc");
    let cost = seg_bytes() - before;
    assert!(cost < 200, "index-only commit wrote a {cost}-byte segment");
    // The segment of that commit holds no frame at all.
    let m = log.manifest().await;
    let last = *m.tail.last().expect("tail segment");
    let body = store
        .get(&log.keys().segment(last.id))
        .await
        .expect("segment");
    let (_, entries) = format::parse_segment(&body, true).expect("parse");
    let kinds: Vec<(u64, u64, EntryKind)> =
        entries.iter().map(|e| (e.lba, e.blocks, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, 16, EntryKind::Unmap),
            (16, 16, EntryKind::ZeroAlloc),
            (1 << 20, n - (1 << 20) - 8, EntryKind::ZeroAlloc),
        ]
    );
    assert_eq!(
        log.lookup(0, 64),
        vec![
            (0, 16, None),
            (16, 16, Some(Val::ZeroAlloc)),
            log.lookup(32, 32)[0]
        ]
    );
    assert!(matches!(log.lookup(32, 1)[0].2, Some(Val::Frame { .. })));
    assert_eq!(log.lookup(1 << 20, 1)[0].2, Some(Val::ZeroAlloc));
    assert!(matches!(log.lookup(n - 1, 1)[0].2, Some(Val::Frame { .. })));
    let frames = log
        .stats
        .frames_read
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(log
        .read_blocks(0, 32)
        .await
        .expect("read")
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        log.stats
            .frames_read
            .load(std::sync::atomic::Ordering::Relaxed),
        frames,
        "zero-alloc and holes read no frames"
    );
    assert_eq!(
        log.read_blocks(40, 1).await.expect("read"),
        block_bytes(bs, 40, 2),
        "data beside the trimmed range is intact"
    );
    // Whole-device trim is cheap too and leaves nothing mapped.
    let before = seg_bytes();
    log.commit(&[unmap(0, n)]).await.expect("trim all");
    assert!(seg_bytes() - before < 200);
    assert_eq!(log.lookup(0, n), vec![(0, n, None)]);
    assert_eq!(log.with_index(|i| i.mapped_blocks()), 0);
    // And a reopen agrees.
    let r = open_ro(&store, "trim").await.expect("reopen");
    assert_eq!(r.lookup(0, n), vec![(0, n, None)]);
}

// ---------------------------------------------------------------------------------------
// Reopen: checkpoint + tail replay.

/// Small xorshift so tests need no RNG dependency and stay reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random sorted, non-overlapping batch over `n` blocks.
fn random_batch(rng: &mut Rng, bs: usize, n: u64, seed_base: u64) -> Vec<BatchEntry> {
    let mut out = Vec::new();
    let mut lba = rng.below(n / 4);
    let mut k = 0;
    while lba < n {
        let len = (1 + rng.below(12)).min(n - lba);
        let e = match rng.below(10) {
            0 => unmap(lba, len),
            1 => zero_alloc(lba, len),
            2 => zeros(bs, lba, len),
            _ => data(bs, lba, len, (seed_base + k) * 2),
        };
        out.push(e);
        k += 1;
        lba += len + rng.below(n / 6);
    }
    if out.is_empty() {
        out.push(data(bs, 0, 1, seed_base * 2));
    }
    out
}

#[tokio::test]
async fn reopen_restores_identical_state() {
    for be in backends() {
        let bs = 512usize;
        let n = 300u64;
        let cfg = small_cfg();
        let log = create(&be.store, "reopen", geometry(bs as u32, n), cfg.clone()).await;
        let mut model = Model::new(bs, n);
        let mut rng = Rng(0x5eed_0001);
        let mut saw_checkpoint_and_tail = false;
        let mut saw_tail_only = false;
        for round in 0..24u64 {
            let batch = random_batch(&mut rng, bs, n, round * 100 + 1);
            log.commit(&batch).await.expect("commit");
            model.apply(&batch);
            let m = log.manifest().await;
            saw_checkpoint_and_tail |= m.checkpoint.is_some() && !m.tail.is_empty();
            saw_tail_only |= m.checkpoint.is_none() && !m.tail.is_empty();
            let live = log.lookup(0, n);
            let r = open_ro(&be.store, "reopen").await.expect("reopen");
            assert_eq!(r.version(), log.version(), "{}: round {round}", be.name);
            assert_eq!(
                r.lookup(0, n),
                live,
                "{}: round {round}: reopened index differs (checkpoint {:?}, tail {})",
                be.name,
                m.checkpoint,
                m.tail.len()
            );
            assert_matches(&r, &model, &format!("{} round {round}", be.name)).await;
        }
        let ckpts = log
            .stats
            .checkpoints_written
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(ckpts >= 4, "{}: only {ckpts} checkpoints", be.name);
        assert!(saw_checkpoint_and_tail && saw_tail_only, "{}", be.name);
        // A new writer continues from the same state, fencing the old one.
        drop(log);
        let w = open_rw(&be.store, "reopen", cfg)
            .await
            .expect("writer reopen");
        assert_matches(&w, &model, be.name).await;
        let b = vec![data(bs, 7, 3, 99_998)];
        w.commit(&b).await.expect("commit after reopen");
        model.apply(&b);
        let r = open_ro(&be.store, "reopen").await.expect("reopen 2");
        assert_matches(&r, &model, be.name).await;
    }
}

#[tokio::test]
async fn geometry_is_persisted_and_validated() {
    for be in backends() {
        let g = geometry(2048, 1000);
        let log = create(&be.store, "geo", g, LogConfig::default()).await;
        log.commit(&[data(2048, 999, 1, 2)])
            .await
            .expect("last block");
        assert!(matches!(
            log.commit(&[data(2048, 1000, 1, 2)]).await,
            Err(LogError::Invalid(_))
        ));
        drop(log);
        let r = open_ro(&be.store, "geo").await.expect("reopen");
        assert_eq!(r.geometry(), g, "{}", be.name);
        assert_eq!(r.manifest().await.size_bytes, 2048 * 1000);
        // An existing export keeps its geometry whatever a later opener asks to create.
        let w = Log::open(
            Arc::clone(&be.store),
            "geo",
            Some(geometry(4096, 7)),
            LogConfig::default(),
            OpenMode::Writer,
        )
        .await
        .expect("open existing");
        assert_eq!(w.geometry(), g, "{}", be.name);
        assert_eq!(
            w.read_blocks(999, 1).await.expect("read"),
            block_bytes(2048, 999, 2)
        );
        // Missing export, and invalid geometries.
        assert!(matches!(
            open_ro(&be.store, "nope").await,
            Err(LogError::NoSuchExport { .. })
        ));
        for bad in [
            geometry(4096, 0),
            geometry(1000, 10),
            geometry(256, 10),
            geometry(131072, 10),
            Geometry {
                size_bytes: 4096 * 10 + 1,
                block_size: 4096,
            },
        ] {
            let r = Log::open(
                Arc::clone(&be.store),
                "bad",
                Some(bad),
                LogConfig::default(),
                OpenMode::Writer,
            )
            .await;
            assert!(
                matches!(r, Err(LogError::Invalid(_))),
                "{}: {bad:?}",
                be.name
            );
        }
        assert!(
            list_all(
                be.store.as_ref(),
                &ExportKeys::new("bad").expect("key").root
            )
            .await
            .expect("list")
            .is_empty(),
            "{}: refused creates write nothing",
            be.name
        );
    }
}

// ---------------------------------------------------------------------------------------
// Export isolation.

#[tokio::test]
async fn export_names_are_isolated() {
    let long = "x".repeat(4096);
    let names: Vec<String> = [
        "../x",
        "a/b",
        "a%2Fb",
        "a%2fb",
        ".",
        "..",
        "",
        "é/ü",
        "日本語",
        "a",
        "a/",
        "na",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([long.clone(), "x".repeat(4095)])
    .collect();
    for be in backends() {
        let bs = 512usize;
        let n = 16u64;
        let roots: Vec<String> = names
            .iter()
            .map(|nm| ExportKeys::new(nm).expect("key").root)
            .collect();
        for (i, a) in roots.iter().enumerate() {
            assert!(a.starts_with("exports/") && a.ends_with('/'));
            assert_eq!(a.matches('/').count(), 2, "{a}: one component");
            for (j, b) in roots.iter().enumerate() {
                assert!(
                    i == j || !b.starts_with(a.as_str()),
                    "{a} is a prefix of {b}"
                );
            }
        }
        let mut models = Vec::new();
        for (i, nm) in names.iter().enumerate() {
            let log = create(&be.store, nm, geometry(bs as u32, n), LogConfig::default()).await;
            let b = vec![data(bs, i as u64 % n, 1, (i as u64 + 1) * 2)];
            log.commit(&b).await.expect("commit");
            let mut m = Model::new(bs, n);
            m.apply(&b);
            models.push(m);
        }
        let listing = |i: usize| {
            let store = Arc::clone(&be.store);
            let root = roots[i].clone();
            async move {
                list_all(store.as_ref(), &root)
                    .await
                    .expect("list")
                    .into_iter()
                    .map(|o| o.key)
                    .collect::<Vec<_>>()
            }
        };
        let all = list_all(be.store.as_ref(), "exports/")
            .await
            .expect("list all");
        let mut total = 0;
        let mut before = Vec::new();
        for i in 0..names.len() {
            let l = listing(i).await;
            assert!(!l.is_empty());
            total += l.len();
            before.push(l);
        }
        assert_eq!(
            total,
            all.len(),
            "{}: every object is under exactly one export",
            be.name
        );
        // Writing to one export never changes what another reads or lists.
        for (i, nm) in names.iter().enumerate() {
            let w = open_rw(&be.store, nm, LogConfig::default())
                .await
                .expect("open");
            assert_eq!(w.name(), nm);
            let b = vec![data(bs, 0, n, (i as u64 + 100) * 2)];
            w.commit(&b).await.expect("commit");
            models[i].apply(&b);
            before[i] = listing(i).await;
            for j in 0..names.len() {
                let r = open_ro(&be.store, &names[j]).await.expect("open other");
                assert_eq!(r.name(), names[j]);
                assert_matches(
                    &r,
                    &models[j],
                    &format!("{}: export {j} after writing {i}", be.name),
                )
                .await;
                assert_eq!(
                    listing(j).await,
                    before[j],
                    "{}: export {j} listing changed",
                    be.name
                );
            }
        }
        // Too long: refused with a clear error, nothing written.
        let too_long = "x".repeat(4097);
        match Log::open(
            Arc::clone(&be.store),
            &too_long,
            Some(geometry(512, 8)),
            LogConfig::default(),
            OpenMode::Writer,
        )
        .await
        {
            Err(LogError::Invalid(msg)) => {
                assert!(
                    msg.contains("export name too long: 4097 bytes, limit is 4096"),
                    "{msg}"
                )
            }
            other => panic!("4097-byte name accepted: {other:?}"),
        }
        assert_eq!(
            list_all(be.store.as_ref(), "exports/")
                .await
                .expect("list")
                .len(),
            before.iter().map(|l| l.len()).sum::<usize>()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Corrupted, truncated and missing objects.

/// An export with a checkpoint and a non-empty tail: (store, segment ids in the
/// checkpoint, segment ids in the tail, model).
async fn corruptible_export() -> (Arc<MemoryStore>, Vec<u64>, Vec<u64>, Model) {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let bs = 512usize;
    let n = 64u64;
    let cfg = LogConfig {
        tail_segments_max: 2,
        tail_entries_min: 1 << 20,
        ..LogConfig::default()
    };
    let log = create(&store, "c", geometry(bs as u32, n), cfg).await;
    let mut model = Model::new(bs, n);
    let batches = [
        vec![data(bs, 0, 8, 2), zero_alloc(20, 2)],
        vec![data(bs, 10, 4, 4)],
        vec![unmap(2, 1), data(bs, 30, 2, 6)],
        vec![data(bs, 40, 3, 8), zero_alloc(50, 1)],
    ];
    for b in &batches {
        log.commit(b).await.expect("commit");
        model.apply(b);
        // The third commit starts a background checkpoint; the fourth installs it.
        log.wait_checkpoint().await;
    }
    let m = log.manifest().await;
    let cref = m.checkpoint.expect("a checkpoint");
    let c = format::decode_checkpoint(
        &store
            .get(&log.keys().checkpoint(cref.id))
            .await
            .expect("checkpoint"),
    )
    .expect("decode");
    let ck: Vec<u64> = c.segments.iter().map(|s| s.id).collect();
    let tail: Vec<u64> = m.tail.iter().map(|s| s.id).collect();
    assert!(!ck.is_empty() && !tail.is_empty());
    (mem, ck, tail, model)
}

/// Open read-only and read everything.
async fn open_and_read(
    store: &DynStore,
) -> Result<(Vec<u8>, Vec<(u64, u64, Option<Val>)>), LogError> {
    let log = open_ro(store, "c").await?;
    let d = log.read_blocks(0, 64).await?;
    Ok((d, log.lookup(0, 64)))
}

fn expect_err_naming(r: Result<impl std::fmt::Debug, LogError>, key: &str, what: &str) -> LogError {
    match r {
        Ok(v) => panic!("{what}: expected an error naming {key}, got Ok({v:?})"),
        Err(e) => {
            assert!(
                e.to_string().contains(key),
                "{what}: error does not name {key}: {e}"
            );
            e
        }
    }
}

#[tokio::test]
async fn corrupt_objects_are_typed_errors_naming_the_key() {
    let keys = ExportKeys::new("c").expect("key");
    // A byte in a frame payload of a tail segment: open works (directories are fine),
    // reading that frame fails with a checksum error.
    {
        let (mem, _, tail, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let key = keys.segment(tail[0]);
        assert!(mem.tamper(&key, |b| b[16 + 32 + 3] ^= 0x10));
        let log = open_ro(&store, "c").await.expect("open still works");
        let e = expect_err_naming(log.read_blocks(0, 64).await, &key, "frame payload");
        assert!(
            matches!(
                e,
                LogError::Format {
                    source: FormatError::ChecksumMismatch { what: "frame", .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // A byte in a frame header of a checkpointed segment (not read on open).
    {
        let (mem, ck, _, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let key = keys.segment(ck[0]);
        assert!(mem.tamper(&key, |b| b[16 + 8] ^= 0x01)); // first_lba
        let log = open_ro(&store, "c").await.expect("open");
        expect_err_naming(log.read_blocks(0, 64).await, &key, "frame header");
    }
    // The directory of a tail segment: open fails.
    {
        let (mem, _, tail, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let key = keys.segment(tail[0]);
        assert!(mem.tamper(&key, |b| {
            let at = b.len() - format::SEGMENT_FOOTER_BYTES - 2;
            b[at] ^= 0x04
        }));
        let e = expect_err_naming(open_and_read(&store).await, &key, "directory");
        assert!(
            matches!(
                e,
                LogError::Format {
                    source: FormatError::ChecksumMismatch {
                        what: "segment directory",
                        ..
                    },
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // The footer of a tail segment.
    {
        let (mem, _, tail, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let key = keys.segment(tail[0]);
        assert!(mem.tamper(&key, |b| {
            let at = b.len() - 20; // segment_id field
            b[at] ^= 0x80
        }));
        expect_err_naming(open_and_read(&store).await, &key, "footer");
    }
    // The latest manifest.
    {
        let (mem, _, _, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let v = nbds3::log::latest_version(&store, &keys)
            .await
            .expect("list")
            .expect("some");
        let key = keys.manifest(v);
        assert!(mem.tamper(&key, |b| b[30] ^= 0x02));
        let e = expect_err_naming(open_and_read(&store).await, &key, "manifest");
        assert!(matches!(e, LogError::Format { .. }), "{e:?}");
        // A writer refuses too: it never builds on a state it cannot read.
        expect_err_naming(
            open_rw(&store, "c", LogConfig::default()).await,
            &key,
            "writer",
        );
    }
    // The checkpoint.
    {
        let (mem, _, _, _) = corruptible_export().await;
        let store: DynStore = mem.clone();
        let m = open_ro(&store, "c").await.expect("open").manifest().await;
        let key = keys.checkpoint(m.checkpoint.expect("checkpoint").id);
        assert!(mem.tamper(&key, |b| {
            let l = b.len();
            b[l - 1] ^= 0x20
        }));
        let e = expect_err_naming(open_and_read(&store).await, &key, "checkpoint");
        assert!(
            matches!(
                e,
                LogError::Format {
                    source: FormatError::ChecksumMismatch { .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Truncations of the latest manifest, the checkpoint, a tail segment and a checkpointed
    // segment: an error naming the object, or (a checkpointed segment's footer is never
    // read) the right data — never other data.
    let (mem, ck, tail, model) = corruptible_export().await;
    let store: DynStore = mem.clone();
    let m = open_ro(&store, "c").await.expect("open").manifest().await;
    let targets = [
        keys.manifest(m.version),
        keys.checkpoint(m.checkpoint.expect("checkpoint").id),
        keys.segment(tail[0]),
        keys.segment(ck[0]),
    ];
    for key in targets {
        let len = store.head(&key).await.expect("head").size_bytes as usize;
        for keep in [len - 1, len / 2, 10, 0] {
            let (mem2, _, _, _) = corruptible_export().await;
            let store2: DynStore = mem2.clone();
            assert!(mem2.tamper(&key, |b| b.truncate(keep)));
            match open_and_read(&store2).await {
                Ok((d, _)) if keep == len - 1 && key == keys.segment(ck[0]) => {
                    assert!(d == model.bytes(), "{key} truncated: other data")
                }
                r => {
                    expect_err_naming(r, &key, &format!("truncated to {keep}"));
                }
            }
        }
    }
}

#[tokio::test]
async fn missing_objects_are_typed_errors_naming_the_key() {
    let keys = ExportKeys::new("c").expect("key");
    // A tail segment: open fails.
    let (mem, ck, tail, _) = corruptible_export().await;
    let store: DynStore = mem.clone();
    let key = keys.segment(tail[0]);
    store.delete(&key).await.expect("delete");
    let e = expect_err_naming(open_and_read(&store).await, &key, "missing tail segment");
    assert!(matches!(e, LogError::MissingObject { .. }), "{e:?}");
    // A checkpointed segment: open works, reading its blocks fails.
    let (mem, _, _, model) = corruptible_export().await;
    let store: DynStore = mem.clone();
    let key = keys.segment(ck[0]);
    store.delete(&key).await.expect("delete");
    let log = open_ro(&store, "c").await.expect("open");
    let e = expect_err_naming(
        log.read_blocks(0, 64).await,
        &key,
        "missing checkpointed segment",
    );
    assert!(matches!(e, LogError::MissingObject { .. }), "{e:?}");
    // Blocks that live elsewhere still read correctly.
    let at = (0..64usize)
        .find(|&i| match log.lookup(i as u64, 1)[0].2 {
            Some(Val::Frame { seg, .. }) => seg != ck[0],
            _ => false,
        })
        .expect("a block in another segment");
    assert_eq!(
        log.read_blocks(at as u64, 1).await.expect("other block"),
        model.bytes()[at * 512..(at + 1) * 512]
    );
    // The checkpoint itself.
    let (mem, _, _, _) = corruptible_export().await;
    let store: DynStore = mem.clone();
    let m = open_ro(&store, "c").await.expect("open").manifest().await;
    let key = keys.checkpoint(m.checkpoint.expect("checkpoint").id);
    store.delete(&key).await.expect("delete");
    let e = expect_err_naming(open_and_read(&store).await, &key, "missing checkpoint");
    assert!(matches!(e, LogError::MissingObject { .. }), "{e:?}");
}

/// Every byte of every object, changed: the export either fails to open/read with an error
/// naming that object, or reads exactly the right data (the byte was one no reader uses,
/// e.g. in a superseded manifest or a segment header).
#[tokio::test]
async fn every_changed_byte_is_an_error_or_the_right_data() {
    let (mem, _, _, model) = corruptible_export().await;
    let store: DynStore = mem.clone();
    let (want_data, want_map) = open_and_read(&store).await.expect("pristine");
    assert_eq!(want_data, model.bytes());
    let mut errors = 0u64;
    let mut benign = BTreeSet::new();
    let mut tried = 0u64;
    for (key, len) in mem.snapshot() {
        for i in 0..len {
            for mask in [0x01u8, 0x80] {
                assert!(mem.tamper(&key, |b| b[i] ^= mask));
                tried += 1;
                match open_and_read(&store).await {
                    Ok((d, map)) => {
                        assert!(
                            d == want_data && map == want_map,
                            "{key} byte {i} ^ {mask:#x}: read different data"
                        );
                        benign.insert(key.clone());
                    }
                    Err(e) => {
                        assert!(
                            e.to_string().contains(&key),
                            "{key} byte {i}: error does not name it: {e}"
                        );
                        errors += 1;
                    }
                }
                assert!(mem.tamper(&key, |b| b[i] ^= mask));
            }
        }
    }
    println!("{tried} corrupted variants: {errors} errors, rest read correct data; objects with unread bytes: {benign:?}");
    // Only the bytes a reader uses are detected; the latest manifest, the checkpoint and
    // tail directories are always read, so most changes must be errors.
    assert!(errors * 2 > tried, "{errors} of {tried}");
}

// ---------------------------------------------------------------------------------------
// Fencing.

#[tokio::test]
async fn stale_writer_is_fenced() {
    for be in backends() {
        let bs = 512usize;
        let a = create(
            &be.store,
            "f",
            geometry(bs as u32, 32),
            LogConfig::default(),
        )
        .await;
        let mut model = Model::new(bs, 32);
        let b0 = vec![data(bs, 0, 4, 2)];
        a.commit(&b0).await.expect("A before B");
        model.apply(&b0);
        let b = open_rw(&be.store, "f", LogConfig::default())
            .await
            .expect("B opens");
        assert!(b.epoch() > a.epoch());
        match a.commit(&[data(bs, 4, 4, 4)]).await {
            Err(LogError::Fenced {
                epoch, newer_epoch, ..
            }) => {
                assert_eq!(epoch, a.epoch());
                assert!(newer_epoch > epoch, "{}", be.name);
            }
            other => panic!("{}: stale writer's commit: {other:?}", be.name),
        }
        assert!(a.is_fenced());
        // Fenced for good, even for index-only updates, and A's in-memory view is unchanged.
        assert!(matches!(
            a.commit(&[unmap(0, 1)]).await,
            Err(LogError::Fenced { .. })
        ));
        assert_matches(&a, &model, be.name).await;
        let b1 = vec![data(bs, 8, 2, 6)];
        b.commit(&b1).await.expect("B commits");
        model.apply(&b1);
        assert!(matches!(
            a.commit(&[data(bs, 8, 2, 8)]).await,
            Err(LogError::Fenced { .. })
        ));
        let r = open_ro(&be.store, "f").await.expect("fresh reader");
        assert_eq!(r.version(), b.version());
        assert_eq!(r.epoch(), b.epoch());
        assert_matches(&r, &model, &format!("{}: fresh reader", be.name)).await;
    }
}

/// The SlateDB trap: GC deletes old manifest versions, including the slot the stale writer
/// will write next. Its IfAbsent PUT then succeeds; the post-commit LIST must still fence it,
/// and readers must never see its data.
#[tokio::test]
async fn fencing_survives_gc_of_old_manifests() {
    for be in backends() {
        let bs = 512usize;
        let keys = ExportKeys::new("gc").expect("key");
        let a = create(
            &be.store,
            "gc",
            geometry(bs as u32, 32),
            LogConfig::default(),
        )
        .await;
        let mut model = Model::new(bs, 32);
        let b0 = vec![data(bs, 0, 2, 2)];
        a.commit(&b0).await.expect("A");
        model.apply(&b0);
        let a_next = a.version() + 1;
        let b = open_rw(&be.store, "gc", LogConfig::default())
            .await
            .expect("B");
        for i in 0..20u64 {
            let bi = vec![data(bs, i % 30, 2, (i + 10) * 2)];
            b.commit(&bi).await.expect("B commits");
            model.apply(&bi);
        }
        // "GC": delete every manifest but the latest.
        let latest = b.version();
        for v in 1..latest {
            be.store.delete(&keys.manifest(v)).await.expect("delete");
        }
        assert!(
            be.store.head(&keys.manifest(a_next)).await.is_err(),
            "slot freed"
        );
        let r = a.commit(&[data(bs, 20, 4, 1000)]).await;
        assert!(
            matches!(r, Err(LogError::Fenced { .. })),
            "{}: stale writer after GC: {r:?}",
            be.name
        );
        // The trap did trigger: A's manifest landed in the freed slot, as an orphan.
        let orphan = be.store.get(&keys.manifest(a_next)).await.expect("orphan");
        let om = format::decode_manifest(&orphan).expect("decode orphan");
        assert_eq!(om.writer_epoch, a.epoch(), "{}", be.name);
        assert!(matches!(
            a.commit(&[unmap(0, 1)]).await,
            Err(LogError::Fenced { .. })
        ));
        let fresh = open_ro(&be.store, "gc").await.expect("fresh");
        assert_eq!(fresh.version(), latest);
        assert_eq!(fresh.epoch(), b.epoch());
        assert_matches(&fresh, &model, &format!("{}: after the trap", be.name)).await;
        // B carries on; a new writer after both sees B's data only.
        let last = vec![data(bs, 28, 4, 2000)];
        b.commit(&last).await.expect("B after the trap");
        model.apply(&last);
        drop(b);
        let c = open_rw(&be.store, "gc", LogConfig::default())
            .await
            .expect("C");
        assert!(c.epoch() > om.writer_epoch);
        assert_matches(&c, &model, &format!("{}: next writer", be.name)).await;
    }
}

/// Only the slot A writes next was deleted (the rest of B's history is there).
#[tokio::test]
async fn fencing_when_only_the_next_slot_was_deleted() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let keys = ExportKeys::new("gc1").expect("key");
    let a = create(&store, "gc1", geometry(512, 16), LogConfig::default()).await;
    a.commit(&[data(512, 0, 1, 2)]).await.expect("A");
    let b = open_rw(&store, "gc1", LogConfig::default())
        .await
        .expect("B");
    b.commit(&[data(512, 1, 1, 4)]).await.expect("B");
    store
        .delete(&keys.manifest(a.version() + 1))
        .await
        .expect("delete B's open manifest");
    assert!(matches!(
        a.commit(&[data(512, 2, 1, 6)]).await,
        Err(LogError::Fenced { .. })
    ));
    let r = open_ro(&store, "gc1").await.expect("reader");
    assert_eq!(r.version(), b.version());
    assert!(r
        .read_blocks(2, 1)
        .await
        .expect("read")
        .iter()
        .all(|&x| x == 0));
    assert_eq!(
        r.read_blocks(1, 1).await.expect("read"),
        block_bytes(512, 1, 4)
    );
}

// ---------------------------------------------------------------------------------------
// Ambiguous failures.

/// Commit `batch` with the store crashing at the `k`-th operation of the commit; the crash is
/// healed right after (a transient outage, not a process death). Returns the result and the
/// kind/key of the crashed operation.
async fn commit_with_fault(
    log: &Log,
    fs: &FaultyStore,
    batch: &[BatchEntry],
    k: u64,
    applied: bool,
) -> (Result<u64, LogError>, OpKind, String) {
    let at = fs.op_count() + k;
    fs.crash_at(at, applied);
    let r = log.commit(batch).await;
    let crashed = fs.is_crashed();
    fs.heal();
    assert!(crashed, "op {k} of the commit was never reached");
    let rec = fs
        .ops_log()
        .into_iter()
        .find(|o| o.index == at)
        .expect("crashed op in the log");
    (r, rec.kind, rec.key)
}

#[tokio::test]
async fn ambiguous_manifest_put_resyncs_and_loses_nothing() {
    let bs = 512usize;
    // (op to crash at: 1 = manifest PUT, 2 = the post-commit LIST; applied?)
    for (k, applied, landed) in [(1u64, true, true), (1, false, false), (2, true, true)] {
        let mem = Arc::new(MemoryStore::new());
        let inner: DynStore = mem.clone();
        let fs = Arc::new(FaultyStore::new(inner.clone(), FaultConfig::default()));
        let store: DynStore = fs.clone();
        let keys = ExportKeys::new("amb").expect("key");
        let log = create(&store, "amb", geometry(bs as u32, 64), LogConfig::default()).await;
        let mut model = Model::new(bs, 64);
        let b0 = vec![data(bs, 0, 4, 2)];
        log.commit(&b0).await.expect("first");
        model.apply(&b0);
        let v0 = log.version();
        let b1 = vec![unmap(1, 1), data(bs, 4, 4, 4)];
        let (r, kind, key) = commit_with_fault(&log, &fs, &b1, k, applied).await;
        assert!(r.is_err(), "k={k}: commit under a fault reported success");
        if k == 1 {
            assert_eq!(
                (kind, key.as_str()),
                (OpKind::Put, keys.manifest(v0 + 1).as_str())
            );
        } else {
            assert_eq!(kind, OpKind::List);
        }
        assert_eq!(
            inner.head(&keys.manifest(v0 + 1)).await.is_ok(),
            landed,
            "k={k} applied={applied}"
        );
        // Not acknowledged: the caller retries the same data together with new data.
        let b2 = vec![unmap(1, 1), data(bs, 4, 4, 4), data(bs, 20, 2, 6)];
        let v2 = log
            .commit(&b2)
            .await
            .expect("commit after the ambiguous failure");
        assert_eq!(v2, if landed { v0 + 2 } else { v0 + 1 }, "k={k}");
        model.apply(&b2);
        assert_matches(&log, &model, &format!("k={k} live")).await;
        let fresh = open_ro(&inner, "amb").await.expect("fresh");
        assert_eq!(fresh.version(), v2);
        assert_matches(&fresh, &model, &format!("k={k} applied={applied} fresh")).await;
        // When the first attempt landed, its state is visible at its own version too.
        if landed {
            let m = nbds3::log::read_manifest(&inner, &keys, v0 + 1)
                .await
                .expect("landed manifest");
            assert_eq!(m.writer_epoch, log.epoch());
        }
    }
}

/// The batch that landed ambiguously is never re-sent: the next commit must still have it.
#[tokio::test]
async fn landed_but_unacknowledged_batch_survives_a_different_next_batch() {
    let bs = 512usize;
    let mem = Arc::new(MemoryStore::new());
    let inner: DynStore = mem.clone();
    let fs = Arc::new(FaultyStore::new(inner.clone(), FaultConfig::default()));
    let store: DynStore = fs.clone();
    let log = create(
        &store,
        "amb2",
        geometry(bs as u32, 64),
        LogConfig::default(),
    )
    .await;
    let b1 = vec![data(bs, 10, 3, 2)];
    let (r, kind, _) = commit_with_fault(&log, &fs, &b1, 1, true).await;
    assert!(r.is_err() && kind == OpKind::Put);
    let b2 = vec![data(bs, 30, 1, 4)];
    log.commit(&b2).await.expect("next commit");
    let mut model = Model::new(bs, 64);
    model.apply(&b1);
    model.apply(&b2);
    assert_matches(&log, &model, "live").await;
    let fresh = open_ro(&inner, "amb2").await.expect("fresh");
    assert_matches(&fresh, &model, "fresh").await;
}

/// `inner` with `hook` run once, just before the first PUT to `key` is applied.
fn hook_before_put(
    inner: DynStore,
    key: String,
    hook: impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
) -> DynStore {
    let hook = std::sync::Mutex::new(Some(hook));
    Arc::new(HookedPuts::new(inner, false, move |k| {
        let h = if k == key {
            hook.lock().expect("lock").take()
        } else {
            None
        };
        Box::pin(async move {
            if let Some(h) = h {
                h().await;
            }
            Ok(())
        })
    }))
}

/// The GC trap at open: between the opener's LIST and its epoch-claiming PUT, the current
/// writer commits on and GC frees the slot the opener aims for. The opener's PUT lands below
/// the latest version; it must notice (like a commit does) and take the writer role on the
/// real latest state, never serve the stale one.
#[tokio::test]
async fn opener_racing_commits_and_gc_does_not_serve_stale_state() {
    let bs = 512usize;
    let inner: DynStore = Arc::new(MemoryStore::new());
    let keys = ExportKeys::new("race").expect("key");
    let a = Arc::new(
        create(
            &inner,
            "race",
            geometry(bs as u32, 16),
            LogConfig::default(),
        )
        .await,
    );
    a.commit(&[data(bs, 0, 1, 2)]).await.expect("A");
    let slot = a.version() + 1;
    let a2 = Arc::clone(&a);
    let inner2 = Arc::clone(&inner);
    let keys2 = keys.clone();
    let hs = hook_before_put(Arc::clone(&inner), keys.manifest(slot), move || {
        Box::pin(async move {
            for i in 0..4u64 {
                a2.commit(&[data(bs, 1 + i, 1, 10 + 2 * i)])
                    .await
                    .expect("A commits meanwhile");
            }
            // "GC" keeps only the latest version.
            for v in 1..a2.version() {
                inner2.delete(&keys2.manifest(v)).await.expect("gc");
            }
        })
    });
    let b = open_rw(&hs, "race", LogConfig::default())
        .await
        .expect("B opens");
    // B must see everything A committed, and A must now be fenced.
    let mut model = Model::new(bs, 16);
    model.apply(&[data(bs, 0, 1, 2)]);
    for i in 0..4u64 {
        model.apply(&[data(bs, 1 + i, 1, 10 + 2 * i)]);
    }
    assert!(
        b.version() > a.version(),
        "B opened below the latest version"
    );
    assert_matches(&b, &model, "B after the race").await;
    assert!(matches!(
        a.commit(&[data(bs, 9, 1, 100)]).await,
        Err(LogError::Fenced { .. })
    ));
    b.commit(&[data(bs, 10, 1, 102)]).await.expect("B commits");
    model.apply(&[data(bs, 10, 1, 102)]);
    let r = open_ro(&inner, "race").await.expect("reader");
    assert_matches(&r, &model, "reader").await;
}

/// Separate writes of neighbouring blocks (one batch entry each, as the dirty set hands
/// them over) share frames, up to `frame_bytes_max`: one index run per frame, not per
/// write. A zero block or a gap ends the frame; the data reads back either way.
#[tokio::test]
async fn adjacent_writes_share_frames() {
    let bs = 512usize;
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = LogConfig {
        frame_bytes_max: 8 * bs,
        ..LogConfig::default()
    };
    let log = create(&store, "adj", geometry(bs as u32, 64), cfg).await;
    let mut model = Model::new(bs, 64);
    // Blocks 0..20 one by one (block 12 all zeros), 21..23 as one write, 30 alone.
    let mut batch: Vec<BatchEntry> = (0..20u64)
        .map(|l| {
            if l == 12 {
                zeros(bs, l, 1)
            } else {
                data(bs, l, 1, 2 * l)
            }
        })
        .collect();
    batch.push(data(bs, 21, 2, 100));
    batch.push(data(bs, 30, 1, 102));
    log.commit(&batch).await.unwrap();
    model.apply(&batch);
    assert_matches(&log, &model, "adjacent writes").await;
    let runs: Vec<(u64, u64)> = log
        .lookup(0, 64)
        .into_iter()
        .filter(|r| r.2.is_some())
        .map(|r| (r.0, r.1))
        .collect();
    // Frames of at most 8 blocks: 0..8, 8..12 (the zero block 12 is a hole), 13..20 (7),
    // 21..23 (not adjacent to 19: block 20 was never written), 30.
    assert_eq!(runs, vec![(0, 8), (8, 4), (13, 7), (21, 2), (30, 1)]);
    let frames: BTreeSet<u64> = log
        .lookup(0, 64)
        .into_iter()
        .filter_map(|r| match r.2 {
            Some(Val::Frame { frame_offset, .. }) => Some(frame_offset),
            _ => None,
        })
        .collect();
    assert_eq!(frames.len(), 5);
    drop(log);
    let ro = open_ro(&store, "adj").await.unwrap();
    assert_matches(&ro, &model, "adjacent writes, reopened").await;
}
