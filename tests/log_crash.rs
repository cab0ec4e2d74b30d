//! Crash test: seeded runs of random batches against a per-block model, crashing the store
//! at a chosen operation of each flush (the op applied or not), then checking what a fresh
//! reader sees: exactly the last acknowledged state, or — only when the failed commit's
//! manifest landed — that state with the whole batch applied. Never a mix, never a lost
//! acknowledged block. Reopens with short and corrupted reads must fail, never return
//! wrong data. Checkpoints are written by a background task (started after a commit
//! lands, run while the next flush builds its segments) and installed by a later commit,
//! so crash points also fall on the checkpoint's GET of its base and its PUT, and on
//! manifest PUTs that install one.
//!
//! `NBDS3_CRASH_RUNS` overrides the number of runs (default 1000), `NBDS3_CRASH_SEED` the
//! first seed (default 0); a failure message names the seed to replay.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use nbds3::format::ExportKeys;
use nbds3::log::index::Val;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::faulty::{FaultConfig, FaultyStore, OpKind};
use nbds3::store::memory::MemoryStore;
use nbds3::store::DynStore;

const BS: usize = 512;
const BLOCKS: u64 = 48;
const FLUSHES_PER_RUN: usize = 8;
/// Crash points are drawn from the first this-many operations of a flush; a commit of
/// these small batches performs 3..=12 (the background checkpoint's GET and PUT when one
/// was started by the previous commit, segments, manifest, LIST).
const CRASH_OP_RANGE: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blk {
    Hole,
    ZeroAlloc,
    Data(u64),
}

fn block_bytes(lba: u64, tag: u64) -> Vec<u8> {
    let mut x = (lba + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag;
    let mut v = Vec::with_capacity(BS);
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Every other word is the tag: compressible, and it identifies the write.
        let w = if (v.len() / 8) % 2 == 0 { x } else { tag };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v[0] |= 1;
    v
}

#[derive(Clone, PartialEq, Eq)]
struct Model(Vec<Blk>);

impl Model {
    fn apply(&mut self, batch: &[BatchEntry]) {
        for e in batch {
            for i in 0..e.blocks {
                let lba = (e.lba + i) as usize;
                self.0[lba] = match &e.update {
                    Update::Unmap => Blk::Hole,
                    Update::ZeroAlloc => Blk::ZeroAlloc,
                    Update::Data(d) => {
                        let b = &d[i as usize * BS..(i as usize + 1) * BS];
                        if b.iter().all(|&x| x == 0) {
                            Blk::Hole
                        } else {
                            Blk::Data(u64::from_le_bytes(b[8..16].try_into().expect("8")))
                        }
                    }
                };
            }
        }
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * BS);
        for (lba, b) in self.0.iter().enumerate() {
            match b {
                Blk::Data(tag) => out.extend_from_slice(&block_bytes(lba as u64, *tag)),
                _ => out.extend(std::iter::repeat_n(0u8, BS)),
            }
        }
        out
    }
}

/// The log's state as a model (data via read_blocks, kinds via lookup).
async fn observe(log: &Log) -> Result<(Vec<u8>, Vec<u8>), nbds3::log::LogError> {
    let data = log.read_blocks(0, BLOCKS).await?;
    let mut kinds = vec![0u8; BLOCKS as usize];
    for (s, l, v) in log.lookup(0, BLOCKS) {
        for lba in s..s + l {
            kinds[lba as usize] = match v {
                None => 0,
                Some(Val::ZeroAlloc) => 1,
                Some(Val::Frame { .. }) => 2,
            };
        }
    }
    Ok((data, kinds))
}

fn kinds_of(m: &Model) -> Vec<u8> {
    m.0.iter()
        .map(|b| match b {
            Blk::Hole => 0,
            Blk::ZeroAlloc => 1,
            Blk::Data(_) => 2,
        })
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: good enough and seedable from 0.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// Random sorted, non-overlapping batch: writes (often over existing data), zero writes,
/// unmaps and zero-allocs.
fn random_batch(rng: &mut Rng, tag_base: u64) -> Vec<BatchEntry> {
    let mut out = Vec::new();
    let mut lba = rng.below(8);
    let mut k = 0u64;
    while lba < BLOCKS {
        let len = (1 + rng.below(10)).min(BLOCKS - lba);
        let update = match rng.below(12) {
            0 | 1 => Update::Unmap,
            2 => Update::ZeroAlloc,
            3 => Update::Data(Bytes::from(vec![0u8; len as usize * BS])),
            r => {
                let tag = (tag_base << 8) | k;
                let mut v = Vec::with_capacity(len as usize * BS);
                for i in 0..len {
                    v.extend_from_slice(&block_bytes(lba + i, tag));
                }
                // Sometimes a zero block inside a data run (it must become a hole).
                if r == 4 && len > 2 {
                    v[BS..2 * BS].fill(0);
                }
                Update::Data(Bytes::from(v))
            }
        };
        out.push(BatchEntry {
            lba,
            blocks: len,
            update,
        });
        k += 1;
        lba += len + rng.below(6);
    }
    if out.is_empty() {
        out.push(BatchEntry {
            lba: 0,
            blocks: 1,
            update: Update::Unmap,
        });
    }
    out
}

fn op_class(kind: OpKind, key: &str) -> String {
    let what = if key.contains("/segment/") {
        "segment"
    } else if key.contains("/checkpoint/") {
        "checkpoint"
    } else if key.contains("/manifest") {
        "manifest"
    } else {
        "other"
    };
    format!("{kind:?} {what}")
}

#[derive(Default)]
struct Tally {
    runs: u64,
    flushes: u64,
    /// (class of the crashed op, applied) → count
    crash_points: BTreeMap<(String, bool), u64>,
    /// (position in the flush k, applied) pairs seen
    positions: BTreeMap<(u64, bool), u64>,
    crashes_landed: u64,
    /// Crashed flushes whose manifest landed and installed a background checkpoint.
    crashes_landed_installing: u64,
    /// Background checkpoints installed, over all writers.
    checkpoints_installed: u64,
    crashes_not_landed: u64,
    no_crash: u64,
    continued_after_crash: u64,
    faulty_reads_err: u64,
    faulty_reads_ok: u64,
}

async fn run(seed: u64, t: &mut Tally) {
    let mut rng = Rng(seed);
    let mem = Arc::new(MemoryStore::new());
    let inner: DynStore = mem.clone();
    let fs = Arc::new(FaultyStore::new(inner.clone(), FaultConfig::default()));
    let store: DynStore = fs.clone();
    let keys = ExportKeys::new("crash").expect("key");
    let cfg = LogConfig {
        segment_bytes_max: rng.pick(&[1024, 2048, 8192]),
        frame_bytes_max: rng.pick(&[512, 1024, 2048]),
        tail_segments_max: rng.pick(&[1, 2, 4, 256]),
        tail_entries_min: rng.pick(&[0, 8, 1 << 20]),
        // Mostly sequential uploads (reproducible op order); sometimes parallel.
        uploads_in_flight_max: rng.pick(&[1, 1, 1, 3]),
        ..LogConfig::default()
    };
    let g = Geometry {
        size_bytes: BLOCKS * BS as u64,
        block_size: BS as u32,
    };
    let mut log = Log::open(
        store.clone(),
        "crash",
        Some(g),
        cfg.clone(),
        OpenMode::Writer,
    )
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: create: {e}"));
    let mut acked = Model(vec![Blk::Hole; BLOCKS as usize]);
    for flush in 0..FLUSHES_PER_RUN {
        t.flushes += 1;
        let ctx = format!("seed {seed} flush {flush}");
        let batch = random_batch(&mut rng, seed * 16 + flush as u64);
        let k = rng.below(CRASH_OP_RANGE);
        let applied = rng.below(2) == 0;
        // The store's latest version (the writer may lag behind it after an ambiguous failure
        // it has not resynchronized from yet).
        let v_before = nbds3::log::latest_version(&inner, &keys)
            .await
            .expect("list")
            .expect("a manifest");
        let at = fs.op_count() + k;
        fs.crash_at(at, applied);
        let r = log.commit(&batch).await;
        let crashed = fs.is_crashed();
        fs.heal();
        if !crashed {
            // The flush needed fewer than k + 1 operations: it ran to completion.
            let v = r.unwrap_or_else(|e| panic!("{ctx}: commit without a crash failed: {e}"));
            assert_eq!(v, v_before + 1, "{ctx}");
            acked.apply(&batch);
            t.no_crash += 1;
            continue;
        }
        assert!(
            r.is_err(),
            "{ctx}: commit acknowledged despite a crash at op {k}"
        );
        let rec = fs
            .ops_log()
            .into_iter()
            .find(|o| o.index == at)
            .expect("crashed op is logged");
        *t.crash_points
            .entry((op_class(rec.kind, &rec.key), applied))
            .or_default() += 1;
        *t.positions.entry((k, applied)).or_default() += 1;
        // Did the commit point land?
        let landed = inner.head(&keys.manifest(v_before + 1)).await.is_ok();
        let mut with_batch = acked.clone();
        with_batch.apply(&batch);
        let expected = if landed {
            t.crashes_landed += 1;
            let m0 = nbds3::log::read_manifest(&inner, &keys, v_before).await;
            let m1 = nbds3::log::read_manifest(&inner, &keys, v_before + 1).await;
            if let (Ok(m0), Ok(m1)) = (m0, m1) {
                if m1.checkpoint.is_some() && m1.checkpoint != m0.checkpoint {
                    t.crashes_landed_installing += 1;
                }
            }
            with_batch
        } else {
            t.crashes_not_landed += 1;
            acked.clone()
        };
        // A fresh reader on the healed store sees exactly one of the two states.
        let r = Log::open(
            inner.clone(),
            "crash",
            None,
            cfg.clone(),
            OpenMode::ReadOnly,
        )
        .await
        .unwrap_or_else(|e| panic!("{ctx}: reopen after crash at {}: {e}", rec.key));
        let (data, kinds) = observe(&r)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: read after crash: {e}"));
        if data != expected.bytes() || kinds != kinds_of(&expected) {
            let diff: Vec<usize> = (0..BLOCKS as usize)
                .filter(|&i| data[i * BS..(i + 1) * BS] != expected.bytes()[i * BS..(i + 1) * BS])
                .collect();
            panic!(
                "{ctx}: crash at op {k} ({:?} {}, applied={applied}), manifest landed={landed}: \
                 state differs from the expected one at blocks {diff:?} (kinds {:?} vs {:?})",
                rec.kind,
                rec.key,
                kinds,
                kinds_of(&expected)
            );
        }
        acked = expected;
        // Now read it again through a store that returns short and corrupted bodies.
        if rng.below(2) == 0 {
            faulty_reopen(&inner, &cfg, &acked, seed ^ ((flush as u64) << 32), t, &ctx).await;
        }
        // Either the process died (new writer) or the outage was transient and the same
        // writer carries on (its next commit must resynchronize first).
        if rng.below(3) == 0 {
            t.continued_after_crash += 1;
        } else {
            t.checkpoints_installed += log
                .stats
                .checkpoints_installed
                .load(std::sync::atomic::Ordering::Relaxed);
            drop(log);
            log = Log::open(store.clone(), "crash", None, cfg.clone(), OpenMode::Writer)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: writer reopen: {e}"));
            let (data, _) = observe(&log).await.expect("read");
            assert!(data == acked.bytes(), "{ctx}: new writer sees other data");
        }
    }
    // One clean commit (it resynchronizes a writer that carried on after a crash), then the
    // final check through that writer and a fresh reader.
    let last = random_batch(&mut rng, seed * 16 + 15);
    log.commit(&last)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: final commit: {e}"));
    acked.apply(&last);
    t.checkpoints_installed += log
        .stats
        .checkpoints_installed
        .load(std::sync::atomic::Ordering::Relaxed);
    let (data, kinds) = observe(&log).await.expect("final read");
    assert!(
        data == acked.bytes() && kinds == kinds_of(&acked),
        "seed {seed}: writer's final view"
    );
    let r = Log::open(inner.clone(), "crash", None, cfg, OpenMode::ReadOnly)
        .await
        .expect("final reopen");
    let (data, kinds) = observe(&r).await.expect("final reader");
    assert!(
        data == acked.bytes() && kinds == kinds_of(&acked),
        "seed {seed}: final reader"
    );
    t.runs += 1;
}

/// Open read-only through short and corrupted reads: every outcome is an error or exactly
/// the expected state.
async fn faulty_reopen(
    inner: &DynStore,
    cfg: &LogConfig,
    want: &Model,
    seed: u64,
    t: &mut Tally,
    ctx: &str,
) {
    let fs: DynStore = Arc::new(FaultyStore::new(
        inner.clone(),
        FaultConfig {
            seed,
            short_read_prob: 0.15,
            corrupt_read_prob: 0.15,
            ..FaultConfig::default()
        },
    ));
    for _ in 0..3 {
        let r = match Log::open(fs.clone(), "crash", None, cfg.clone(), OpenMode::ReadOnly).await {
            Ok(log) => observe(&log).await,
            Err(e) => Err(e),
        };
        match r {
            Ok((data, kinds)) => {
                assert!(
                    data == want.bytes() && kinds == kinds_of(want),
                    "{ctx}: faulty reads produced wrong data"
                );
                t.faulty_reads_ok += 1;
            }
            Err(_) => t.faulty_reads_err += 1,
        }
    }
}

#[tokio::test]
async fn crash_at_every_step_of_a_flush_loses_nothing_and_tears_nothing() {
    let runs: u64 = std::env::var("NBDS3_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("NBDS3_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let start = std::time::Instant::now();
    let mut t = Tally::default();
    for seed in first..first + runs {
        run(seed, &mut t).await;
    }
    let crashes = t.crashes_landed + t.crashes_not_landed;
    println!(
        "{} runs, {} flushes in {:.1?}: {} crashed ({} with the manifest landed, {} not), {} ran past the crash point; {} continued with the same writer",
        t.runs,
        t.flushes,
        start.elapsed(),
        crashes,
        t.crashes_landed,
        t.crashes_not_landed,
        t.no_crash,
        t.continued_after_crash
    );
    println!("crash points (operation, applied): count");
    for ((class, applied), n) in &t.crash_points {
        println!("  {class:<18} applied={applied:<5} {n}");
    }
    println!(
        "distinct (position in flush, applied) crash points: {}",
        t.positions.len()
    );
    println!(
        "reopens with short/corrupt reads: {} errors, {} correct reads",
        t.faulty_reads_err, t.faulty_reads_ok
    );
    println!(
        "background checkpoints installed: {}; crashed flushes whose landed manifest installed one: {}",
        t.checkpoints_installed, t.crashes_landed_installing
    );
    assert_eq!(t.runs, runs);
    if runs >= 1000 {
        // Coverage: the test must really have crashed at every kind of step.
        // "Put checkpoint" and "Get checkpoint" are the background checkpoint's upload and
        // its read of the base checkpoint: no flush writes one itself.
        for class in [
            "Put segment",
            "Put checkpoint",
            "Get checkpoint",
            "Put manifest",
        ] {
            for applied in [false, true] {
                let n = t
                    .crash_points
                    .get(&(class.to_string(), applied))
                    .copied()
                    .unwrap_or(0);
                assert!(n >= 20, "only {n} crashes at {class} applied={applied}");
            }
        }
        let lists: u64 = t
            .crash_points
            .iter()
            .filter(|((c, _), _)| c == "List manifest")
            .map(|(_, n)| n)
            .sum();
        assert!(lists >= 20, "only {lists} crashes at the post-commit LIST");
        assert!(t.crashes_landed >= 100 && t.crashes_not_landed >= 100);
        assert!(
            t.checkpoints_installed >= 500 && t.crashes_landed_installing >= 20,
            "installed {}, crashed while installing {}",
            t.checkpoints_installed,
            t.crashes_landed_installing
        );
        assert!(t.faulty_reads_err >= 100 && t.faulty_reads_ok >= 100);
    }
}
