//! Compaction and GC against a per-block model, with crashes at store operations.
//!
//! - `model_random_crashes`: ≥ 1,000 seeded runs of random writes, overwrites, trims and
//!   zero-allocs committed (flushed) through the log, interleaved with compaction and GC
//!   passes, with a simulated crash (`FaultyStore::crash_at`, before or after applying) at a
//!   random store operation in each process life, and random transient faults, short and
//!   corrupt reads in some runs. After every crash the export is reopened and every block
//!   must equal the model's last acknowledged flush — or, for the one commit in flight at
//!   the crash, that commit applied whole. At the end GC must leave nothing unreachable.
//! - `model_crash_at_every_op`: one fixed workload, crashed at every single store operation
//!   (both before and after applying it).
//! - `stale_writer_cannot_resurrect_after_gc`: a fenced writer whose next manifest slot was
//!   freed by GC re-creates it, is told it is fenced, never becomes visible, and its
//!   objects are collected.
//! - `space_after_random_overwrites_64mib`: the small version of the space benchmark.
//! - `daemon_serves_while_compacting`: concurrent verified I/O through `Exports`/`Volume`
//!   while an aggressive background compactor and GC run.
//! - `piecewise_flush_crashed_at_every_step_keeps_every_acknowledged_block`: a FLUSH the
//!   index gate commits in pieces, crashed at each of its store operations, then reopened
//!   by a new daemon: acknowledged blocks intact, whole pieces only, Ok means all landed.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::HookedPuts;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use nbds3::format::ExportKeys;
use nbds3::log::compact::{self, CompactConfig};
use nbds3::log::gc::{self, GcConfig, GcState};
use nbds3::log::index::Val;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, LogError, OpenMode, Update};
use nbds3::nbd::{BlockExport, ExportProvider, ReadChunk};
use nbds3::store::faulty::{FaultConfig, FaultyStore};
use nbds3::store::memory::MemoryStore;
use nbds3::store::{list_all, DynStore};
use nbds3::volume::{Exports, ExportsConfig, VolumeConfig};

const NAME: &str = "disk";

// ---------------------------------------------------------------------------------------
// Model and helpers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blk {
    Hole,
    ZeroAlloc,
    /// Content `block_bytes(lba, id)`.
    Data(u64),
}

/// Deterministic, never all-zero, mostly incompressible content.
fn block_bytes(bs: usize, lba: u64, id: u64) -> Vec<u8> {
    let mut x =
        (lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03)) | 1;
    let mut v = Vec::with_capacity(bs + 8);
    while v.len() < bs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(bs);
    v[0] |= 1;
    v
}

fn apply(model: &mut [Blk], batch: &[(u64, u64, Blk)]) {
    for &(lba, n, b) in batch {
        for i in lba..lba + n {
            model[i as usize] = b;
        }
    }
}

fn to_batch(bs: usize, batch: &[(u64, u64, Blk)], ids: &[u64]) -> Vec<BatchEntry> {
    batch
        .iter()
        .zip(ids)
        .map(|(&(lba, n, b), _)| BatchEntry {
            lba,
            blocks: n,
            update: match b {
                Blk::Hole => Update::Unmap,
                Blk::ZeroAlloc => Update::ZeroAlloc,
                Blk::Data(id) => {
                    let mut d = Vec::with_capacity(n as usize * bs);
                    for i in lba..lba + n {
                        d.extend_from_slice(&block_bytes(bs, i, id));
                    }
                    Update::Data(Bytes::from(d))
                }
            },
        })
        .collect()
}

/// A random batch: sorted, non-overlapping runs; each data run gets a fresh id.
fn random_batch(rng: &mut StdRng, blocks: u64, next_id: &mut u64) -> Vec<(u64, u64, Blk)> {
    let mut out = Vec::new();
    let mut at = rng.random_range(0..blocks / 4);
    let runs = rng.random_range(1..6);
    for _ in 0..runs {
        if at >= blocks {
            break;
        }
        let n = rng.random_range(1..=12u64).min(blocks - at);
        let b = match rng.random_range(0..10) {
            0 => Blk::Hole,
            1 => Blk::ZeroAlloc,
            _ => {
                *next_id += 1;
                Blk::Data(*next_id)
            }
        };
        out.push((at, n, b));
        at += n + rng.random_range(0..blocks / 3);
    }
    out
}

/// A fresh read-only log on `store` (its index rebuilt from the checkpoint and tail).
async fn open_read_only(store: &DynStore) -> Log {
    Log::open(
        Arc::clone(store),
        NAME,
        None,
        LogConfig::default(),
        OpenMode::ReadOnly,
    )
    .await
    .expect("reopen read-only")
}

/// Read the whole export through a fresh read-only log on `store` and return it per block.
async fn observe(store: &DynStore, bs: usize, blocks: u64) -> (Vec<u8>, Vec<Option<Val>>) {
    let log = open_read_only(store).await;
    log.check_accounting().expect("live-block accounting");
    let data = log.read_blocks(0, blocks).await.expect("read back");
    let mut kinds = vec![None; blocks as usize];
    for (s, l, v) in log.lookup(0, blocks) {
        for i in s..s + l {
            kinds[i as usize] = v;
        }
    }
    assert_eq!(data.len(), bs * blocks as usize);
    (data, kinds)
}

fn matches(model: &[Blk], bs: usize, data: &[u8], kinds: &[Option<Val>]) -> Result<(), String> {
    for (i, b) in model.iter().enumerate() {
        let got = &data[i * bs..(i + 1) * bs];
        let ok = match b {
            Blk::Hole => kinds[i].is_none() && got.iter().all(|&x| x == 0),
            Blk::ZeroAlloc => kinds[i] == Some(Val::ZeroAlloc) && got.iter().all(|&x| x == 0),
            Blk::Data(id) => {
                matches!(kinds[i], Some(Val::Frame { .. }))
                    && got == block_bytes(bs, i as u64, *id).as_slice()
            }
        };
        if !ok {
            return Err(format!(
                "block {i}: expected {b:?}, found {:?} (first bytes {:?})",
                kinds[i],
                &got[..8]
            ));
        }
    }
    Ok(())
}

/// Every object under the export must be named by a manifest at or above the low-water
/// mark (or be one of those manifests): GC left no garbage and no orphans behind.
async fn assert_fully_collected(store: &DynStore) {
    let keys = ExportKeys::new(NAME).unwrap();
    let reachable = gc::reachable_keys(store, &keys).await.unwrap();
    let present: BTreeSet<String> = list_all(store.as_ref(), &keys.root)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let garbage: Vec<&String> = present.difference(&reachable).collect();
    assert!(garbage.is_empty(), "left behind: {garbage:?}");
    let missing: Vec<&String> = reachable.difference(&present).collect();
    assert!(missing.is_empty(), "named but missing: {missing:?}");
}

fn small_log_cfg(rng: &mut StdRng, deterministic: bool) -> LogConfig {
    let mut cfg = LogConfig {
        segment_bytes_max: 512 * rng.random_range(4..16),
        frame_bytes_max: 512 * rng.random_range(1..5),
        uploads_in_flight_max: if deterministic {
            1
        } else {
            rng.random_range(1..4)
        },
        tail_segments_max: rng.random_range(2..6),
        tail_entries_min: rng.random_range(4..32),
        zstd_level: Some(1),
        ..LogConfig::default()
    };
    // A low hard limit (no extra draw, so seeds keep their meaning): commits here also
    // wait for background checkpoints.
    cfg.tail_segments_hard_max = cfg.tail_segments_max * 2;
    cfg
}

fn aggressive_compact_cfg(rng: &mut StdRng, deterministic: bool) -> CompactConfig {
    CompactConfig {
        dead_fraction_min: [0.0, 0.2, 0.5, 0.8][rng.random_range(0..4)],
        small_segment_bytes: 4096,
        small_segments_min: 2,
        pass_bytes_max: 512 * rng.random_range(1..64),
        pass_interval: Duration::from_millis(1),
        reads_in_flight_max: if deterministic {
            1
        } else {
            rng.random_range(1..4)
        },
        gc: GcConfig {
            keep_versions_min: rng.random_range(1..3),
            retain_window: Duration::ZERO,
            delete_objects_max: rng.random_range(1..50),
        },
        gc_interval: Duration::from_millis(1),
        pass_idle: Duration::ZERO,
        pass_idle_wait_max: Duration::ZERO,
        // Low enough that most passes also defragment: rewrites by LBA stretch get the
        // same crash and fault checking as rewrites by segment.
        index_runs_max: Some(12),
        // Armed where a background compactor runs: flushes that wait for space get the
        // same crash and fault checking.
        space_amp_max: Some(compact::SPACE_AMP_MAX),
        // Above the writers' frames (at most 4 blocks here), so on devices too large for
        // that bound passes also cut larger frames, under the same checking.
        defrag_frame_bytes_max: 16 * 512,
    }
}

// ---------------------------------------------------------------------------------------
// The model-checked crash test.

fn trace() -> bool {
    std::env::var_os("NBDS3_COMPACT_MODEL_TRACE").is_some()
}

#[derive(Debug, Clone, Copy)]
struct RunOpts {
    seed: u64,
    /// Crash at this op of the given life (index into lives), if any: (life, op, applied).
    forced_crash: Option<(usize, u64, bool)>,
    /// Random crash points and faults (the seeded mode).
    random: bool,
}

#[derive(Debug, Default)]
struct RunStats {
    lives: u64,
    crashes: u64,
    commits: u64,
    in_doubt_landed: u64,
    compactions: u64,
    gc_deleted: u64,
    ops: u64,
}

/// One seeded run: several process lives over one store; returns stats or a mismatch.
async fn run_model(opts: RunOpts) -> Result<RunStats, String> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let bs = 512usize;
    let blocks: u64 = 96;
    let inner: DynStore = Arc::new(MemoryStore::new());
    let deterministic = opts.forced_crash.is_some();
    let log_cfg = small_log_cfg(&mut rng, deterministic);
    let geometry = Geometry {
        size_bytes: blocks * bs as u64,
        block_size: bs as u32,
    };
    let mut model = vec![Blk::Hole; blocks as usize];
    let mut next_id = 0u64;
    let mut stats = RunStats::default();
    let lives = if opts.random { 3 } else { 2 };
    for life in 0..=lives {
        let last = life == lives;
        // Faults (not in the final, checking life): random transient failures and bad
        // reads in some runs, and a crash point.
        let faults = !last && opts.random && rng.random_bool(0.3);
        let fcfg = FaultConfig {
            seed: rng.random(),
            fail_before_prob: if faults { 0.02 } else { 0.0 },
            fail_after_prob: if faults { 0.02 } else { 0.0 },
            short_read_prob: if faults { 0.01 } else { 0.0 },
            corrupt_read_prob: if faults { 0.01 } else { 0.0 },
            latency_max: Duration::ZERO,
            key_contains: None,
        };
        let faulty = Arc::new(FaultyStore::new(Arc::clone(&inner), fcfg));
        let store: DynStore = faulty.clone();
        let ccfg = aggressive_compact_cfg(&mut rng, deterministic);
        let mut log = None;
        for _ in 0..20 {
            match Log::open(
                Arc::clone(&store),
                NAME,
                Some(geometry),
                log_cfg.clone(),
                OpenMode::Writer,
            )
            .await
            {
                Ok(l) => {
                    log = Some(l);
                    break;
                }
                Err(_) if faults => continue,
                Err(e) => return Err(format!("open failed: {e}")),
            }
        }
        let Some(log) = log else {
            // Could not open through the faults: a life without steps.
            continue;
        };
        stats.lives += 1;
        let base = faulty.op_count();
        match opts.forced_crash {
            Some((l, op, applied)) if l == life => faulty.crash_at(base + op, applied),
            Some(_) => {}
            None if !last && rng.random_bool(0.85) => {
                faulty.crash_at(base + rng.random_range(0..160), rng.random_bool(0.5))
            }
            None => {}
        }
        let mut in_doubt: Option<Vec<Blk>> = None;
        let mut gc_state = GcState::default();
        let steps = if last { 6 } else { rng.random_range(4..20) };
        for step in 0..steps {
            if faulty.is_crashed() {
                break;
            }
            let action = if last && step >= steps - 2 {
                2 // end with GC
            } else if deterministic {
                rng.random_range(0..4)
            } else {
                rng.random_range(0..5)
            };
            if trace() {
                eprintln!(
                    "life {life} step {step}: action {action} (ops so far {})",
                    faulty.op_count()
                );
            }
            match action {
                0 | 1 | 4 => {
                    let batch = random_batch(&mut rng, blocks, &mut next_id);
                    let entries = to_batch(bs, &batch, &vec![0; batch.len()]);
                    let mut after = model.clone();
                    apply(&mut after, &batch);
                    // Retry through transient faults, as the volume's flusher does; any
                    // failed attempt may have landed, so until one succeeds it is in doubt.
                    let flush = async {
                        for _ in 0..30 {
                            match log.commit(&entries).await {
                                Ok(_) => return Ok(true),
                                Err(LogError::Fenced { .. }) => {
                                    return Err("single writer got fenced".to_string())
                                }
                                Err(_) if faulty.is_crashed() => return Ok(false),
                                Err(_) => continue,
                            }
                        }
                        Ok(false)
                    };
                    let ok = if action == 4 {
                        // The flush races a compaction and a GC pass of the same log, as
                        // in the daemon: blocks it overwrites must keep the new data, and
                        // GC must not take its segments.
                        let maintenance = async {
                            let _ = compact::compact_pass(&log, &ccfg, None).await;
                            let _ = gc::gc_pass(&log, &ccfg.gc, &mut gc_state).await;
                        };
                        let (ok, ()) = tokio::join!(flush, maintenance);
                        if let Err(e) = log.check_accounting() {
                            return Err(format!("accounting after a race: {e}"));
                        }
                        ok?
                    } else {
                        flush.await?
                    };
                    if ok {
                        model = after;
                        stats.commits += 1;
                    } else {
                        in_doubt = Some(after);
                        break;
                    }
                }
                2 => {
                    // Compaction then GC, as the compactor does.
                    match compact::compact_pass(&log, &ccfg, None).await {
                        Ok(r) if r.version.is_some() => stats.compactions += 1,
                        Ok(_) => {}
                        Err(e) if e.is_fenced() => return Err(format!("fenced: {e}")),
                        Err(e) if last => return Err(format!("compaction failed: {e}")),
                        Err(_) => {}
                    }
                    if let Err(e) = log.check_accounting() {
                        return Err(format!("accounting after compaction: {e}"));
                    }
                    match gc::gc_pass(&log, &ccfg.gc, &mut gc_state).await {
                        Ok(r) => stats.gc_deleted += r.objects_deleted(),
                        Err(e) if e.is_fenced() => return Err(format!("fenced: {e}")),
                        Err(e) if last => return Err(format!("gc failed: {e}")),
                        Err(_) => {}
                    }
                }
                _ => {
                    // Compaction alone, with a fully live threshold sometimes.
                    let mut c = ccfg.clone();
                    c.dead_fraction_min = 0.0;
                    if let Err(e) = compact::compact_pass(&log, &c, None).await {
                        if e.is_fenced() || last {
                            return Err(format!("compaction: {e}"));
                        }
                    }
                }
            }
        }
        if faulty.is_crashed() {
            stats.crashes += 1;
        }
        stats.ops += faulty.op_count() - base;
        drop(log);
        // The process is gone. Whatever landed must be the model, or the model with the
        // in-doubt commit applied whole.
        let (data, kinds) = observe(&inner, bs, blocks).await;
        match matches(&model, bs, &data, &kinds) {
            Ok(()) => {}
            Err(e1) => match &in_doubt {
                Some(alt) => match matches(alt, bs, &data, &kinds) {
                    Ok(()) => {
                        model = alt.clone();
                        stats.in_doubt_landed += 1;
                    }
                    Err(e2) => {
                        return Err(format!(
                            "life {life}: neither the acknowledged state ({e1}) nor the in-doubt commit ({e2})"
                        ))
                    }
                },
                None => return Err(format!("life {life}: {e1}")),
            },
        }
    }
    // The last life ended with clean compaction + GC passes (keep 1 or 2 versions, no
    // window): every orphan of every crash must be gone, and nothing reachable missing.
    let log = Log::open(
        Arc::clone(&inner),
        NAME,
        None,
        log_cfg.clone(),
        OpenMode::Writer,
    )
    .await
    .map_err(|e| format!("final open: {e}"))?;
    let gcfg = GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::ZERO,
        delete_objects_max: 100_000,
    };
    let mut st = GcState::default();
    gc::gc_pass(&log, &gcfg, &mut st)
        .await
        .map_err(|e| format!("final gc: {e}"))?;
    // GC's own commit may have started a background checkpoint (the tail is long after
    // the crashes): in flight it is pending, not garbage. Install it and collect again so
    // the store holds exactly what the latest manifests name. Collect again even when it
    // was not installed (written, then found stale): its object is an orphan only from
    // now on, which the first pass could not yet delete. A pass's own commit may start
    // another checkpoint, hence the (bounded) loop until none is in flight.
    for round in 0..4 {
        log.finish_checkpoint()
            .await
            .map_err(|e| format!("final checkpoint: {e}"))?;
        gc::gc_pass(&log, &gcfg, &mut st)
            .await
            .map_err(|e| format!("final gc after the checkpoint (round {round}): {e}"))?;
        if log.wait_checkpoint().await.is_none() {
            break;
        }
    }
    assert_fully_collected(&inner).await;
    let (data, kinds) = observe(&inner, bs, blocks).await;
    matches(&model, bs, &data, &kinds).map_err(|e| format!("after final gc: {e}"))?;
    Ok(stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_random_crashes() {
    let runs: u64 = std::env::var("NBDS3_COMPACT_MODEL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("NBDS3_COMPACT_MODEL_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let t0 = Instant::now();
    let totals = Arc::new(std::sync::Mutex::new(RunStats::default()));
    let failures = Arc::new(AtomicU64::new(0));
    futures::stream::iter(first..first + runs)
        .map(|seed| {
            let totals = Arc::clone(&totals);
            let failures = Arc::clone(&failures);
            async move {
                let r = tokio::spawn(run_model(RunOpts {
                    seed,
                    forced_crash: None,
                    random: true,
                }))
                .await
                .map_err(|e| format!("panicked: {e}"))
                .and_then(|r| r);
                match r {
                    Ok(s) => {
                        let mut t = totals.lock().unwrap();
                        t.lives += s.lives;
                        t.crashes += s.crashes;
                        t.commits += s.commits;
                        t.in_doubt_landed += s.in_doubt_landed;
                        t.compactions += s.compactions;
                        t.gc_deleted += s.gc_deleted;
                        t.ops += s.ops;
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("seed {seed}: MISMATCH: {e}");
                    }
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let t = totals.lock().unwrap();
    eprintln!(
        "{runs} runs in {:.1?}: {} lives, {} crashes, {} commits ({} in-doubt landed), {} compactions, {} objects collected, {} store ops",
        t0.elapsed(),
        t.lives,
        t.crashes,
        t.commits,
        t.in_doubt_landed,
        t.compactions,
        t.gc_deleted,
        t.ops
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "mismatches (see stderr)"
    );
    assert!(t.crashes > runs, "crashes actually happened");
    assert!(t.compactions > runs, "compaction actually ran");
    assert!(t.gc_deleted > runs, "gc actually deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_crash_at_every_op() {
    // Count the ops of life 0 of a fixed workload without a crash, then crash at each.
    let seed = 7;
    let probe = run_model(RunOpts {
        seed,
        forced_crash: Some((usize::MAX, 0, false)),
        random: false,
    })
    .await
    .expect("workload runs clean");
    // `ops` counts every life; life 0 is the first share, an upper bound is fine.
    let ops = probe.ops;
    assert!(ops > 50, "workload too small: {ops} ops");
    let t0 = Instant::now();
    let cases: Vec<(u64, bool)> = (0..ops).flat_map(|i| [(i, false), (i, true)]).collect();
    let n = cases.len();
    let failures: Vec<String> = futures::stream::iter(cases)
        .map(|(op, applied)| async move {
            tokio::spawn(run_model(RunOpts {
                seed,
                forced_crash: Some((0, op, applied)),
                random: false,
            }))
            .await
            .map_err(|e| format!("panicked: {e}"))
            .and_then(|r| r)
            .err()
            .map(|e| format!("crash at op {op} (applied {applied}): {e}"))
        })
        .buffer_unordered(8)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    eprintln!("{n} crash points in {:.1?}", t0.elapsed());
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// Fencing with GC really running.

#[tokio::test]
async fn stale_writer_cannot_resurrect_after_gc() {
    let bs = 512usize;
    let blocks = 64u64;
    let store: DynStore = Arc::new(MemoryStore::new());
    let keys = ExportKeys::new(NAME).unwrap();
    let geometry = Geometry {
        size_bytes: blocks * bs as u64,
        block_size: bs as u32,
    };
    let cfg = LogConfig {
        segment_bytes_max: 4096,
        frame_bytes_max: 1024,
        ..LogConfig::default()
    };
    let open = |mode| Log::open(Arc::clone(&store), NAME, Some(geometry), cfg.clone(), mode);
    let write = |lba: u64, n: u64, id: u64| to_batch(bs, &[(lba, n, Blk::Data(id))], &[0]);

    // A writes X; B takes over (A does not know), writes Y over part of it.
    let a = open(OpenMode::Writer).await.unwrap();
    a.commit(&write(0, 16, 1)).await.unwrap();
    let a_version = a.version();
    let b = open(OpenMode::Writer).await.unwrap();
    b.commit(&write(0, 8, 2)).await.unwrap();
    b.commit(&write(8, 4, 3)).await.unwrap();
    // B compacts and collects aggressively: A's manifests, including the slot A will aim
    // for next (B's opening version a_version + 1), are deleted.
    let ccfg = CompactConfig {
        dead_fraction_min: 0.0,
        gc: GcConfig {
            keep_versions_min: 1,
            retain_window: Duration::ZERO,
            delete_objects_max: 10_000,
        },
        ..CompactConfig::default()
    };
    let r = compact::compact_pass(&b, &ccfg, None).await.unwrap();
    assert!(r.version.is_some());
    let mut st = GcState::default();
    let g = gc::gc_pass(&b, &ccfg.gc, &mut st).await.unwrap();
    assert!(g.manifests_deleted > 0 && g.segments_deleted > 0, "{g:?}");
    let slot = keys.manifest(a_version + 1);
    assert!(
        store.get(&slot).await.is_err(),
        "the slot the stale writer aims for must have been collected"
    );
    let b_latest = b.version();

    // A, stale, commits Z over everything: its IfAbsent PUT re-creates the freed slot, the
    // post-commit LIST sees B's newer versions, and A reports itself fenced.
    let err = a.commit(&write(0, 32, 4)).await.unwrap_err();
    assert!(matches!(err, LogError::Fenced { .. }), "{err}");
    assert!(a.is_fenced());
    // A stale GC must not touch anything either.
    let before: Vec<_> = list_all(store.as_ref(), &keys.root).await.unwrap();
    let e = gc::gc_pass(&a, &ccfg.gc, &mut GcState::default())
        .await
        .unwrap_err();
    assert!(e.is_fenced(), "{e}");
    assert!(compact::compact_pass(&a, &ccfg, None)
        .await
        .unwrap_err()
        .is_fenced());
    let after: Vec<_> = list_all(store.as_ref(), &keys.root).await.unwrap();
    assert_eq!(before, after, "a fenced writer changed the store");

    // Readers see B's state: Y where written, X elsewhere, never Z.
    let mut model = vec![Blk::Hole; blocks as usize];
    apply(&mut model, &[(0, 16, Blk::Data(1))]);
    apply(&mut model, &[(0, 8, Blk::Data(2))]);
    apply(&mut model, &[(8, 4, Blk::Data(3))]);
    let (data, kinds) = observe(&store, bs, blocks).await;
    matches(&model, bs, &data, &kinds).unwrap();
    let reader = open(OpenMode::ReadOnly).await.unwrap();
    assert_eq!(reader.version(), b_latest, "the latest version is B's");

    // B keeps working, and its next GC removes A's re-created manifest and A's segments.
    b.commit(&write(40, 2, 5)).await.unwrap();
    apply(&mut model, &[(40, 2, Blk::Data(5))]);
    let g = gc::gc_pass(&b, &ccfg.gc, &mut st).await.unwrap();
    assert!(g.objects_deleted() > 0, "{g:?}");
    assert!(store.get(&slot).await.is_err(), "re-created slot collected");
    let a_epoch = a.epoch();
    for o in list_all(store.as_ref(), &keys.segment_prefix())
        .await
        .unwrap()
    {
        let id = nbds3::format::parse_numbered_key(&keys.segment_prefix(), &o.key).unwrap();
        assert!(
            nbds3::format::epoch_of_id(id) > a_epoch,
            "stale writer's segment {} survived",
            o.key
        );
    }
    assert_fully_collected(&store).await;
    let (data, kinds) = observe(&store, bs, blocks).await;
    matches(&model, bs, &data, &kinds).unwrap();
}

// ---------------------------------------------------------------------------------------
// Space.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn space_after_random_overwrites_64mib() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let size: u64 = 64 << 20;
    let bs = 4096usize;
    let log = Log::open(
        Arc::clone(&store),
        NAME,
        Some(Geometry {
            size_bytes: size,
            block_size: bs as u32,
        }),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await
    .unwrap();
    let blocks = size / bs as u64;
    let mut rng = StdRng::seed_from_u64(42);
    let mut model = vec![0u64; blocks as usize];
    let mut id = 0u64;
    // Fill, then overwrite randomly 3 times over (4-64 KiB writes), flushing every 4 MiB.
    let mut batch: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut batch_blocks = 0u64;
    let mut written = 0u64;
    let total = blocks * 4;
    while written < total {
        let (lba, n) = if written < blocks {
            (written, 16.min(blocks - written))
        } else {
            let n = rng.random_range(1..=16u64);
            (rng.random_range(0..blocks - n), n)
        };
        id += 1;
        for i in lba..lba + n {
            batch.insert(i, id);
            model[i as usize] = id;
        }
        batch_blocks += n;
        written += n;
        if batch_blocks >= 1024 || written >= total {
            let entries: Vec<BatchEntry> = batch
                .iter()
                .map(|(&lba, &id)| BatchEntry {
                    lba,
                    blocks: 1,
                    update: Update::Data(Bytes::from(block_bytes(bs, lba, id))),
                })
                .collect();
            log.commit(&entries).await.unwrap();
            batch.clear();
            batch_blocks = 0;
        }
    }
    let before = compact::space_report(&log, true).await.unwrap();
    let stat = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (frames0, gets0) = (stat(&log.stats.frames_read), stat(&log.stats.frame_gets));
    let ccfg = CompactConfig {
        dead_fraction_min: 0.25,
        pass_bytes_max: 16 << 20,
        gc: GcConfig {
            keep_versions_min: 1,
            retain_window: Duration::ZERO,
            delete_objects_max: 1_000_000,
        },
        ..CompactConfig::default()
    };
    let (passes, g) = compact::compact_all(&log, &ccfg, 1000, None).await.unwrap();
    let after = compact::space_report(&log, true).await.unwrap();
    let live = after.live_stored_bytes.unwrap();
    let ratio = after.bytes_stored as f64 / live as f64;
    let copied: u64 = passes.iter().map(|p| p.bytes_written).sum();
    eprintln!(
        "before {} B ({} objects), after {} B ({} objects), live {} B, ratio {:.3}, {} passes, wrote {} B (WA {:.2}), gc deleted {}",
        before.bytes_stored,
        before.objects,
        after.bytes_stored,
        after.objects,
        live,
        ratio,
        passes.len(),
        copied,
        copied as f64 / live as f64,
        g.objects_deleted()
    );
    assert!(ratio <= 1.1, "stored/live = {ratio:.3}");
    // The victims' live frames (neighbouring blocks of one flush share a frame, so most
    // hold a few blocks) were read with few GETs, not one each.
    let frames = stat(&log.stats.frames_read) - frames0;
    let gets = stat(&log.stats.frame_gets) - gets0;
    eprintln!("compaction read {frames} frames with {gets} GETs");
    assert!(
        frames > 1000 && gets * 3 < frames,
        "{frames} frames, {gets} GETs"
    );
    assert!(before.bytes_stored as f64 > 1.5 * after.bytes_stored as f64);
    log.check_accounting().unwrap();
    // Content intact (spot-check 2,000 random blocks and both ends).
    let mut check: Vec<u64> = (0..2000).map(|_| rng.random_range(0..blocks)).collect();
    check.extend([0, blocks - 1]);
    for lba in check {
        let got = log.read_blocks(lba, 1).await.unwrap();
        assert_eq!(
            got,
            block_bytes(bs, lba, model[lba as usize]),
            "block {lba}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The daemon serving while its compactor runs.

fn flat(chunks: Vec<ReadChunk>) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&c.to_vec());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemon_serves_while_compacting() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let bs = 4096usize;
    let size: u64 = 8 << 20;
    let blocks = size / bs as u64;
    let exports = Exports::new(
        Arc::clone(&store),
        ExportsConfig {
            default_geometry: Geometry {
                size_bytes: size,
                block_size: bs as u32,
            },
            log: LogConfig {
                segment_bytes_max: 64 << 10,
                frame_bytes_max: 16 << 10,
                ..LogConfig::default()
            },
            volume: VolumeConfig {
                cache_bytes_max: 256 << 10,
                flush_interval: Duration::from_millis(20),
                readahead_bytes_max: 0,
                ..VolumeConfig::default()
            },
            read_only: false,
            idle_close: None,
            exports_max: None,
            compact: Some(CompactConfig {
                dead_fraction_min: 0.1,
                small_segment_bytes: 64 << 10,
                small_segments_min: 2,
                pass_bytes_max: 1 << 20,
                pass_interval: Duration::from_millis(5),
                reads_in_flight_max: 4,
                gc: GcConfig {
                    keep_versions_min: 1,
                    // In-flight reads of a just-retired segment finish well within this.
                    retain_window: Duration::from_secs(2),
                    delete_objects_max: 10_000,
                },
                gc_interval: Duration::from_millis(20),
                // Passes race the writers: that is the point of this test.
                pass_idle: Duration::ZERO,
                pass_idle_wait_max: Duration::ZERO,
                // Scattered writes over 2048 blocks: defragmenting races the writers too,
                // in frames of up to 64 KiB (one run per 16 KiB frame would be 512 runs,
                // too many for this bound, so passes cut 64 KiB frames).
                index_runs_max: Some(200),
                defrag_frame_bytes_max: 64 << 10,
                space_amp_max: Some(compact::SPACE_AMP_MAX),
            }),
        },
    );
    let vol = exports.open(NAME).await.unwrap();
    // Each block's latest acknowledged id; writers own disjoint stripes of blocks so the
    // expected value of every block is exact.
    let workers = 4u64;
    let expected: Arc<Vec<AtomicU64>> = Arc::new((0..blocks).map(|_| AtomicU64::new(0)).collect());
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let vol = Arc::clone(&vol);
        let expected = Arc::clone(&expected);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            let mut id = w << 40;
            let mut ops = 0u64;
            while Instant::now() < deadline {
                // A block in this worker's stripe.
                let lba = rng.random_range(0..blocks / workers) * workers + w;
                match rng.random_range(0..10) {
                    0..=4 => {
                        id += 1;
                        vol.write(
                            lba * bs as u64,
                            Bytes::from(block_bytes(bs, lba, id)),
                            false,
                        )
                        .await
                        .unwrap();
                        expected[lba as usize].store(id, Ordering::Release);
                    }
                    5 => {
                        vol.trim(lba * bs as u64, bs as u64, false).await.unwrap();
                        expected[lba as usize].store(0, Ordering::Release);
                    }
                    6 => vol.flush().await.unwrap(),
                    _ => {
                        let want = expected[lba as usize].load(Ordering::Acquire);
                        let got = flat(vol.read(lba * bs as u64, bs as u32).await.unwrap());
                        let exp = if want == 0 {
                            vec![0u8; bs]
                        } else {
                            block_bytes(bs, lba, want)
                        };
                        assert!(got == exp, "block {lba}: wrong data (want id {want})");
                    }
                }
                ops += 1;
            }
            ops
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await.unwrap();
    }
    // Let the compactor and GC catch up a little, then check everything.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = exports.compactor_stats(NAME).unwrap();
    let rewrites = stats.rewrites.load(Ordering::Relaxed);
    let deleted = stats.objects_deleted.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    eprintln!(
        "{ops} ops; compactor: {rewrites} rewrites, {} segments retired, {} bytes copied, {deleted} objects deleted, {errors} errors ({:?})",
        stats.segments_retired.load(Ordering::Relaxed),
        stats.raw_bytes_copied.load(Ordering::Relaxed),
        stats.last_error.lock().unwrap()
    );
    assert!(rewrites >= 3, "the compactor must have rewritten segments");
    assert!(deleted > 0, "gc must have deleted objects");
    for lba in 0..blocks {
        let want = expected[lba as usize].load(Ordering::Acquire);
        let got = flat(vol.read(lba * bs as u64, bs as u32).await.unwrap());
        let exp = if want == 0 {
            vec![0u8; bs]
        } else {
            block_bytes(bs, lba, want)
        };
        assert!(got == exp, "block {lba} after the run");
    }
    exports.close_all().await.unwrap();
    // Durable: a fresh reader sees the same.
    let (data, _) = observe(&store, bs, blocks).await;
    for lba in 0..blocks {
        let want = expected[lba as usize].load(Ordering::Acquire);
        let exp = if want == 0 {
            vec![0u8; bs]
        } else {
            block_bytes(bs, lba, want)
        };
        assert!(
            data[lba as usize * bs..(lba as usize + 1) * bs] == exp[..],
            "block {lba} after reopen"
        );
    }
    // Lease removed on clean close.
    let keys = ExportKeys::new(NAME).unwrap();
    assert!(store.get(&keys.lease()).await.is_err());
}

// ---------------------------------------------------------------------------------------
// Deterministic interleavings.

/// Stops the first PUT under a prefix once armed, until one permit is added to `go`.
struct Gate {
    armed: std::sync::atomic::AtomicBool,
    reached: tokio::sync::Notify,
    go: tokio::sync::Semaphore,
}

/// `inner` behind a [`Gate`] on PUTs of keys under `prefix`.
fn gated(inner: DynStore, prefix: String) -> (DynStore, Arc<Gate>) {
    let gate = Arc::new(Gate {
        armed: false.into(),
        reached: tokio::sync::Notify::new(),
        go: tokio::sync::Semaphore::new(0),
    });
    let g = Arc::clone(&gate);
    let store = HookedPuts::new(inner, false, move |key| {
        let stop = key.starts_with(&prefix) && g.armed.swap(false, Ordering::AcqRel);
        let g = Arc::clone(&g);
        Box::pin(async move {
            if stop {
                g.reached.notify_one();
                let _permit = g.go.acquire().await;
            }
            Ok(())
        })
    });
    (Arc::new(store), gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_overwritten_during_compaction_keeps_new_data() {
    let bs = 512usize;
    let blocks = 64u64;
    let keys = ExportKeys::new(NAME).unwrap();
    let inner: DynStore = Arc::new(MemoryStore::new());
    let (store, gate) = gated(Arc::clone(&inner), keys.segment_prefix());
    let log = Arc::new(
        Log::open(
            Arc::clone(&store),
            NAME,
            Some(Geometry {
                size_bytes: blocks * bs as u64,
                block_size: bs as u32,
            }),
            LogConfig::default(),
            OpenMode::Writer,
        )
        .await
        .unwrap(),
    );
    let mut model = vec![Blk::Hole; blocks as usize];
    for (lba, n, id) in [(0, 16, 1), (0, 8, 2)] {
        let b = [(lba, n, Blk::Data(id))];
        log.commit(&to_batch(bs, &b, &[0])).await.unwrap();
        apply(&mut model, &b);
    }
    // The compaction copies blocks 8..16 (id 1) and 0..8 (id 2); while its new segment is
    // on the way, blocks 8..12 are overwritten and committed.
    gate.armed.store(true, Ordering::Release);
    let cfg = CompactConfig {
        dead_fraction_min: 0.0,
        small_segments_min: 2,
        ..CompactConfig::default()
    };
    let l2 = Arc::clone(&log);
    let compaction = tokio::spawn(async move { compact::compact_pass(&l2, &cfg, None).await });
    gate.reached.notified().await;
    let b = [(8, 4, Blk::Data(3))];
    log.commit(&to_batch(bs, &b, &[0])).await.unwrap();
    apply(&mut model, &b);
    gate.go.add_permits(1);
    let r = compaction.await.unwrap().unwrap();
    assert!(r.version.is_some(), "{r:?}");
    assert_eq!(r.blocks_skipped, 4, "{r:?}");
    assert_eq!(r.blocks_moved, 12, "{r:?}");
    log.check_accounting().unwrap();
    let (data, kinds) = observe(&inner, bs, blocks).await;
    matches(&model, bs, &data, &kinds).unwrap();
}

/// Put a stray object (what an upload left behind) under `key`.
async fn put_object(store: &DynStore, key: &str, body: &'static [u8]) {
    store
        .put(
            key,
            Bytes::from_static(body),
            nbds3::store::PutMode::IfAbsent,
        )
        .await
        .unwrap();
}

/// A 64-block export, opened as its writer.
async fn small_writer(store: &DynStore, bs: usize) -> Log {
    Log::open(
        Arc::clone(store),
        NAME,
        Some(Geometry {
            size_bytes: 64 * bs as u64,
            block_size: bs as u32,
        }),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn gc_keeps_pending_ids_until_released() {
    let bs = 512usize;
    let store: DynStore = Arc::new(MemoryStore::new());
    let keys = ExportKeys::new(NAME).unwrap();
    let log = small_writer(&store, bs).await;
    log.commit(&to_batch(bs, &[(0, 4, Blk::Data(1))], &[0]))
        .await
        .unwrap();
    // An object under an id handed out for a compaction that has not committed yet.
    let id = log.allocate_id().await.unwrap();
    let key = keys.segment(id);
    put_object(&store, &key, b"in flight").await;
    let gcfg = GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::ZERO,
        delete_objects_max: 1000,
    };
    let mut st = GcState::default();
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(
        store.get(&key).await.is_ok(),
        "pending object deleted: {r:?}"
    );
    assert!(r.objects_kept_unsure >= 1);
    // Released (the compaction gave up): now it is an orphan of this session, collected
    // once a commit has settled everything allocated before it.
    compact::release_ids(&log, &[id]).await;
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(store.get(&key).await.is_err(), "orphan kept: {r:?}");
    assert_fully_collected(&store).await;
    // An idle export does not make GC commit again and again.
    let v = log.version();
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(!r.committed && r.objects_deleted() == 0, "{r:?}");
    assert_eq!(log.version(), v);
}

#[tokio::test]
async fn gc_skips_passes_while_nothing_changes_and_resumes_on_change() {
    let bs = 512usize;
    let inner: DynStore = Arc::new(MemoryStore::new());
    let counting = Arc::new(compact::CountingStore::new(Arc::clone(&inner)));
    let counts = counting.counts();
    let store: DynStore = counting;
    let keys = ExportKeys::new(NAME).unwrap();
    let log = small_writer(&store, bs).await;
    for i in 0..3 {
        log.commit(&to_batch(bs, &[(0, 4, Blk::Data(i))], &[0]))
            .await
            .unwrap();
    }
    let gcfg = GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::ZERO,
        delete_objects_max: 1000,
    };
    let lists = || counts.lists.load(Ordering::Relaxed);
    let mut st = GcState::default();
    // Old versions and their segments go; then a pass that finds nothing settles.
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.objects_deleted() > 0 && r.skipped.is_none(), "{r:?}");
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_none() && r.objects_deleted() == 0, "{r:?}");
    // Nothing changed since: skipped without a request.
    let before = lists();
    for _ in 0..5 {
        let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
        assert!(r.skipped.is_some(), "{r:?}");
    }
    assert_eq!(lists(), before, "a skipped pass listed");

    // A commit: the next pass is a full one and collects the versions it replaced.
    log.commit(&to_batch(bs, &[(0, 4, Blk::Data(7))], &[0]))
        .await
        .unwrap();
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_none() && r.objects_deleted() >= 1, "{r:?}");
    assert!(lists() > before);
    assert_fully_collected(&store).await;

    // An id handed out, then uploaded and given back without a commit (a compaction that
    // gave up): a pass while it is pending must not settle, as nothing would change again
    // when the orphan appears.
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_none(), "{r:?}");
    let id = log.allocate_id().await.unwrap();
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_none(), "{r:?}");
    let key = keys.segment(id);
    put_object(&store, &key, b"given up").await;
    compact::release_ids(&log, &[id]).await;
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_none(), "{r:?}");
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(store.get(&key).await.is_err(), "orphan kept: {r:?}");
    assert_fully_collected(&store).await;

    // Garbage none of our state sees appear (an older writer's late upload) is found by
    // the full pass that follows a run of skipped ones.
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert!(r.skipped.is_some(), "{r:?}");
    let stale = keys.segment(nbds3::format::object_id(log.epoch() - 1, 4242));
    put_object(&store, &stale, b"late").await;
    let mut skipped = 1;
    let full = loop {
        let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
        if r.skipped.is_none() {
            break r;
        }
        skipped += 1;
        assert!(skipped <= 60, "no full pass after {skipped} skipped");
    };
    assert_eq!(skipped, 60, "{full:?}");
    assert_eq!(full.segments_deleted, 1, "{full:?}");
    assert!(store.get(&stale).await.is_err());
}

#[tokio::test]
async fn gc_does_not_settle_while_the_retention_window_keeps_versions() {
    let bs = 512usize;
    let store: DynStore = Arc::new(MemoryStore::new());
    let log = small_writer(&store, bs).await;
    let gcfg = GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::from_millis(400),
        delete_objects_max: 1000,
    };
    let mut st = GcState::default();
    for i in 0..3 {
        log.commit(&to_batch(bs, &[(0, 4, Blk::Data(i))], &[0]))
            .await
            .unwrap();
    }
    // Every version is recent: kept, and the pass must not take "nothing to delete now"
    // for "nothing to delete until the next commit".
    let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
    assert_eq!(r.objects_deleted(), 0, "{r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut deleted = 0;
    for _ in 0..3 {
        let r = gc::gc_pass(&log, &gcfg, &mut st).await.unwrap();
        deleted += r.objects_deleted();
    }
    assert!(deleted > 0, "versions past the window were never collected");
    assert_fully_collected(&store).await;
}

// ---------------------------------------------------------------------------------------
// Scheduling of the background compactor.

/// An empty 1 MiB export on a memory store, for the scheduling tests.
async fn scheduling_log() -> Arc<Log> {
    let store: DynStore = Arc::new(MemoryStore::new());
    Arc::new(
        Log::open(
            store,
            NAME,
            Some(Geometry {
                size_bytes: 1 << 20,
                block_size: 4096,
            }),
            LogConfig::default(),
            OpenMode::Writer,
        )
        .await
        .unwrap(),
    )
}

/// Count a request on `log` every 20 ms for `d`: an export busy without a break.
async fn busy_for(log: &Log, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        log.stats
            .foreground_requests
            .fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_passes_wait_for_an_idle_export_but_not_forever() {
    let log = scheduling_log().await;
    let cfg = CompactConfig {
        pass_interval: Duration::from_millis(10),
        pass_idle: Duration::from_millis(500),
        pass_idle_wait_max: Duration::from_secs(4),
        ..CompactConfig::default()
    };
    let handle = compact::spawn_compactor(Arc::clone(&log), cfg);
    let passes = || handle.stats().passes.load(Ordering::Relaxed);
    // Requests every 20 ms: no pass (the first may come only 4 s after start).
    busy_for(&log, Duration::from_millis(2000)).await;
    assert_eq!(passes(), 0, "a pass ran while the export was busy");
    // Quiet: a pass follows within about the idle time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while passes() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(passes() >= 1, "no pass after the export went quiet");
    // Busy without a break: passes still come, at most 4 s apart.
    let before = passes();
    busy_for(&log, Duration::from_millis(6000)).await;
    assert!(passes() > before, "a busy export was never compacted");
    handle.close().await;
}

/// GC does not wait for an idle export: on an export busy without a break (requests every
/// 20 ms, passes waiting 30 s for a quiet second), GC passes still run at `gc_interval`,
/// and no compaction pass does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_runs_on_a_busy_export_while_passes_wait() {
    let log = scheduling_log().await;
    let cfg = CompactConfig {
        pass_interval: Duration::from_millis(10),
        pass_idle: Duration::from_millis(500),
        pass_idle_wait_max: Duration::from_secs(30),
        gc_interval: Duration::from_millis(200),
        ..CompactConfig::default()
    };
    let handle = compact::spawn_compactor(Arc::clone(&log), cfg);
    busy_for(&log, Duration::from_secs(2)).await;
    let stats = handle.stats();
    let passes = stats.passes.load(Ordering::Relaxed);
    let gcs = stats.gc_passes.load(Ordering::Relaxed);
    assert_eq!(passes, 0, "a pass ran while the export was busy");
    assert!(gcs >= 3, "only {gcs} GC passes in 2 s at a 200 ms interval");
    handle.close().await;
}

/// A log over `store` (`blocks` blocks of `bs` bytes, writers' frames of `frame_blocks`)
/// written in four commits, each every 4th block (offset by the commit number): every
/// block is mapped, each its own run, in four fully live segments (no dead data, so
/// ordinary compaction has nothing to do). Returns it with its model.
async fn scattered_log(
    store: &DynStore,
    bs: usize,
    blocks: u64,
    frame_blocks: usize,
) -> (Log, Vec<Blk>) {
    let log = Log::open(
        Arc::clone(store),
        NAME,
        Some(Geometry {
            size_bytes: blocks * bs as u64,
            block_size: bs as u32,
        }),
        LogConfig {
            frame_bytes_max: frame_blocks * bs,
            ..LogConfig::default()
        },
        OpenMode::Writer,
    )
    .await
    .unwrap();
    let mut model = vec![Blk::Hole; blocks as usize];
    let mut id = 0;
    for k in 0..4u64 {
        let batch: Vec<(u64, u64, Blk)> = (0..blocks / 4)
            .map(|i| {
                id += 1;
                (i * 4 + k, 1, Blk::Data(id))
            })
            .collect();
        log.commit(&to_batch(bs, &batch, &vec![0; batch.len()]))
            .await
            .unwrap();
        apply(&mut model, &batch);
    }
    assert_eq!(log.index_extents(), blocks as usize);
    (log, model)
}

/// The store holds `model` (read through a fresh read-only log); returns the index runs
/// a fresh open builds (from the checkpoint, runs joined again).
async fn store_reads_back(store: &DynStore, model: &[Blk], bs: usize, blocks: u64) -> usize {
    let (data, kinds) = observe(store, bs, blocks).await;
    matches(model, bs, &data, &kinds).unwrap();
    open_read_only(store).await.index_extents()
}

/// Scattered writes leave adjacent blocks in different frames, one index run each. With the
/// index over `index_runs_max`, a pass rewrites the most fragmented stretches as whole
/// frames: the run count drops to what the layout needs, every block reads back, and the
/// accounting holds. Without the bound, the same pass leaves the index alone.
#[tokio::test]
async fn defrag_rewrites_fragmented_stretches_into_whole_frames() {
    let bs = 512usize;
    let blocks = 256u64;
    for bounded in [false, true] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let (log, model) = scattered_log(&store, bs, blocks, 16).await;
        let cfg = CompactConfig {
            dead_fraction_min: 1.0,
            small_segment_bytes: 0,
            index_runs_max: bounded.then_some(64),
            ..CompactConfig::default()
        };
        let plan = compact::plan_pass(&log, &cfg, Some(cfg.pass_bytes_max));
        let r = compact::compact_pass(&log, &cfg, None).await.unwrap();
        if !bounded {
            assert!(plan.is_empty(), "{plan:?}");
            assert_eq!(r.version, None, "{r:?}");
            assert_eq!(log.index_extents(), blocks as usize);
            continue;
        }
        // 256 runs, bound 64: down to at most 48, the most fragmented stretches first.
        // Every 16-block stretch has 16 runs, so 14 stretches do it (256 - 14 * 15 = 46).
        assert_eq!(plan.fragments.len(), 14, "{plan:?}");
        assert!(plan
            .fragments
            .iter()
            .all(|f| f.runs == 16 && f.blocks == 16));
        assert!(plan.victims.is_empty(), "{plan:?}");
        assert!(r.version.is_some(), "{r:?}");
        assert_eq!(r.fragments, 14, "{r:?}");
        assert_eq!(r.blocks_moved, 14 * 16, "{r:?}");
        assert_eq!(
            (r.index_runs_before, r.index_runs_after),
            (256, 46),
            "{r:?}"
        );
        assert_eq!(log.index_extents(), 46);
        log.check_accounting().unwrap();
        // Under the bound now: the next pass has nothing to do.
        assert!(compact::plan_pass(&log, &cfg, None).is_empty());
        // Everything reads back, from this log and from a fresh open of the store (which
        // rebuilds the index from the checkpoint and joins the runs again).
        let data = log.read_blocks(0, blocks).await.unwrap();
        let kinds: Vec<Option<Val>> = (0..blocks).map(|b| log.lookup(b, 1)[0].2).collect();
        matches(&model, bs, &data, &kinds).unwrap();
        drop(log);
        assert_eq!(store_reads_back(&store, &model, bs, blocks).await, 46);
    }
}

/// A device too large for its index bound at the writers' frame size: one run per frame
/// would still be too many, so passes cut larger frames (powers of two of the writers', up
/// to `defrag_frame_bytes_max`) until the index fits. Every block reads back, from this log
/// and after a reopen, and a later pass finds nothing to do (the larger frames are not
/// split again). With larger frames not allowed, the same passes stop at the floor and say
/// so.
#[tokio::test]
async fn defrag_cuts_larger_frames_when_the_device_outgrows_the_bound() {
    let bs = 512usize;
    let blocks = 1024u64;
    for top_blocks in [64u64, 8] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let (log, model) = scattered_log(&store, bs, blocks, 8).await;
        // Bound 40 runs (30 after a pass): 8-block frames need 128, 16-block 64, 32-block
        // 32, 64-block frames 16.
        let cfg = CompactConfig {
            dead_fraction_min: 1.0,
            small_segment_bytes: 0,
            index_runs_max: Some(40),
            defrag_frame_bytes_max: top_blocks as usize * bs,
            ..CompactConfig::default()
        };
        assert_eq!(
            compact::frame_blocks_for(blocks, cfg.index_runs_max, 8, top_blocks),
            top_blocks
        );
        let mut last = compact::PassReport::default();
        for _ in 0..20 {
            last = compact::compact_pass(&log, &cfg, None).await.unwrap();
            if last.version.is_none() {
                break;
            }
        }
        assert_eq!(last.version, None, "passes never settled: {last:?}");
        log.check_accounting().unwrap();
        let runs: Vec<(u64, u64, Option<Val>)> = log.lookup(0, blocks);
        if top_blocks == 8 {
            // One run per writers' frame is the floor, over the bound: reported.
            assert_eq!(log.index_extents(), 128, "{runs:?}");
            assert!(last.index_at_floor, "{last:?}");
        } else {
            assert_eq!(log.index_extents(), 16, "{runs:?}");
            assert!(!last.index_at_floor, "{last:?}");
            // Each run is one whole 64-block frame, aligned to 64 blocks.
            for &(lba, n, v) in &runs {
                assert_eq!((lba % 64, n), (0, 64), "{runs:?}");
                assert!(
                    matches!(
                        v,
                        Some(Val::Frame {
                            block_in_frame: 0,
                            ..
                        })
                    ),
                    "{runs:?}"
                );
            }
            // Settled: planning again finds nothing, at the same frame size.
            let plan = compact::plan_pass(&log, &cfg, None);
            assert!(plan.is_empty(), "{plan:?}");
            assert_eq!(plan.frame_blocks, 64);
        }
        let data = log.read_blocks(0, blocks).await.unwrap();
        let kinds: Vec<Option<Val>> = (0..blocks).map(|b| log.lookup(b, 1)[0].2).collect();
        matches(&model, bs, &data, &kinds).unwrap();
        // Single blocks out of the large frames read back too.
        for b in [0u64, 63, 64, 500, 1023] {
            let one = log.read_blocks(b, 1).await.unwrap();
            let b = b as usize;
            assert_eq!(one, &data[b * bs..(b + 1) * bs], "block {b}");
        }
        let runs_now = log.index_extents();
        drop(log);
        assert_eq!(store_reads_back(&store, &model, bs, blocks).await, runs_now);
    }
}

/// Exports over `store` whose compactor would never pass on its own while writers are busy
/// (`pass_idle` far longer than the test): any pass during the writes comes from the index
/// gate's urgency, and any bound on the index from its stall.
fn gated_exports(store: &DynStore, size: u64, index_runs_max: usize) -> Arc<Exports> {
    // At most 64 blocks per flush: the index overshoots by at most that much.
    gated_exports_with(
        store,
        size,
        index_runs_max,
        64 * 4096,
        Duration::from_millis(20),
        GATED_FRAME_BYTES,
    )
}

/// The largest frame the gated exports' passes cut: their writers' own (32 KiB), so the
/// index floor stays at one run per 32 KiB (see `frame_blocks_for`) unless a test says
/// otherwise.
const GATED_FRAME_BYTES: usize = 32 << 10;

fn gated_exports_with(
    store: &DynStore,
    size: u64,
    index_runs_max: usize,
    dirty_bytes_max: u64,
    flush_interval: Duration,
    defrag_frame_bytes_max: usize,
) -> Arc<Exports> {
    Exports::new(
        Arc::clone(store),
        ExportsConfig {
            default_geometry: Geometry {
                size_bytes: size,
                block_size: 4096,
            },
            log: LogConfig {
                segment_bytes_max: 256 << 10,
                frame_bytes_max: GATED_FRAME_BYTES,
                ..LogConfig::default()
            },
            volume: VolumeConfig {
                cache_bytes_max: 1 << 20,
                dirty_bytes_max,
                flush_interval,
                readahead_bytes_max: 0,
                ..VolumeConfig::default()
            },
            read_only: false,
            idle_close: None,
            exports_max: None,
            compact: Some(CompactConfig {
                pass_bytes_max: 256 << 10,
                pass_interval: Duration::from_millis(5),
                pass_idle: Duration::from_secs(30),
                pass_idle_wait_max: Duration::from_secs(60),
                index_runs_max: Some(index_runs_max),
                defrag_frame_bytes_max,
                ..CompactConfig::default()
            }),
        },
    )
}

/// Every block reads back as version `expected[lba]` (see `block_bytes`), through the export
/// and again from the store after the exports close.
async fn check_versions_then_reopen(
    exports: &Arc<Exports>,
    export: &Arc<dyn BlockExport>,
    store: &DynStore,
    bs: usize,
    expected: &[u64],
) {
    for (lba, &want) in expected.iter().enumerate() {
        let got = flat(
            export
                .read(lba as u64 * bs as u64, bs as u32)
                .await
                .unwrap(),
        );
        assert!(
            got == block_bytes(bs, lba as u64, want),
            "block {lba} (want id {want})"
        );
    }
    exports.close_all().await.unwrap();
    let (data, _) = observe(store, bs, expected.len() as u64).await;
    for (lba, &want) in expected.iter().enumerate() {
        assert!(
            data[lba * bs..(lba + 1) * bs] == block_bytes(bs, lba as u64, want)[..],
            "block {lba} after reopen"
        );
    }
}

/// Write blocks `lba..lba + blocks` with their first version (id 1) in one request, and
/// flush.
async fn write_first_version(export: &Arc<dyn BlockExport>, bs: usize, lba: u64, blocks: u64) {
    let mut buf = Vec::with_capacity(blocks as usize * bs);
    for b in lba..lba + blocks {
        buf.extend_from_slice(&block_bytes(bs, b, 1));
    }
    export
        .write(lba * bs as u64, Bytes::from(buf), false)
        .await
        .unwrap();
    export.flush().await.unwrap();
}

/// Sustained scattered writes with the index far over `index_runs_max`: defragmenting
/// passes run without waiting for an idle export, and flushes wait for them above
/// `INDEX_STALL_FACTOR` × the bound, so the index stays within that plus one batch (a
/// batch of n blocks adds at most 2n runs: each write can split a run in three). Without
/// the gate no pass runs during the writes and the index ends near one run per block.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_stays_bounded_under_sustained_scattered_writes() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let bs = 4096usize;
    let blocks: u64 = 4096;
    // The floor is one run per 8-block frame (512); the stall level, 3 × 256, is above it.
    let max = 256usize;
    let exports = gated_exports(&store, blocks * bs as u64, max);
    let vol = exports.volume(NAME).await.unwrap();
    let export = exports.open(NAME).await.unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    // Every block written first, in order: no holes (which defragmentation cannot join
    // across), so the floor is one run per frame.
    let mut expected = vec![1u64; blocks as usize];
    for lba in (0..blocks).step_by(64) {
        write_first_version(&export, bs, lba, 64).await;
    }
    let mut peak = 0usize;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut id = 1u64;
    while Instant::now() < deadline {
        let lba = rng.random_range(0..blocks);
        id += 1;
        export
            .write(
                lba * bs as u64,
                Bytes::from(block_bytes(bs, lba, id)),
                false,
            )
            .await
            .unwrap();
        expected[lba as usize] = id;
        if id.is_multiple_of(32) {
            export.flush().await.unwrap();
        }
        peak = peak.max(vol.log().index_extents());
    }
    let gate = &vol.log().index_gate;
    let waited = gate.flushes_waited.load(Ordering::Relaxed);
    let stats = exports.compactor_stats(NAME).unwrap();
    let fragments = stats.fragments_rewritten.load(Ordering::Relaxed);
    eprintln!(
        "{id} writes; index peak {peak} runs (bound {max}); {waited} flushes waited {} ms; \
         {fragments} stretches defragmented",
        gate.wait_ms_total.load(Ordering::Relaxed)
    );
    assert!(id > 2 * max as u64, "too few writes to test anything: {id}");
    assert!(fragments > 0, "no defragmenting pass ran during the writes");
    assert!(waited > 0, "no flush waited for defragmentation");
    let limit = compact::INDEX_STALL_FACTOR * max + 2 * 64;
    assert!(peak <= limit, "index peaked at {peak} runs, over {limit}");
    check_versions_then_reopen(&exports, &export, &store, bs, &expected).await;
}

/// A dirty set that can add far more runs than the bound in one flush (2048 scattered
/// blocks, up to 4096 runs, against a bound of 512): the flush commits it in pieces of
/// half the bound, each waiting for room, so the index stays within 3 × the bound.
/// Committed whole, the index would pass 4000 runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_stays_bounded_when_one_flush_holds_more_runs_than_the_bound() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let bs = 4096usize;
    let blocks: u64 = 8192;
    // Floor: one run per 8-block frame (1024), under 2 × 512, the level passes work down to.
    let max = 512usize;
    // High water (half) at 4096 blocks: the 2048 writes below stay dirty until the FLUSH.
    let exports = gated_exports_with(
        &store,
        blocks * bs as u64,
        max,
        8192 * bs as u64,
        Duration::from_secs(600),
        GATED_FRAME_BYTES,
    );
    let vol = exports.volume(NAME).await.unwrap();
    let export = exports.open(NAME).await.unwrap();
    let mut expected = vec![1u64; blocks as usize];
    for lba in (0..blocks).step_by(512) {
        write_first_version(&export, bs, lba, 512).await;
    }
    // 2048 distinct odd blocks, none next to another, so each write splits a run.
    let mut rng = StdRng::seed_from_u64(11);
    let mut lbas: Vec<u64> = (0..blocks / 2).map(|i| 2 * i + 1).collect();
    lbas.shuffle(&mut rng);
    lbas.truncate(2048);
    for &lba in &lbas {
        export
            .write(lba * bs as u64, Bytes::from(block_bytes(bs, lba, 2)), false)
            .await
            .unwrap();
        expected[lba as usize] = 2;
    }
    // Sample the index while the flush commits.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (vol, done) = (Arc::clone(&vol), Arc::clone(&done));
        tokio::spawn(async move {
            let mut peak = 0usize;
            while !done.load(Ordering::Acquire) {
                peak = peak.max(vol.log().index_extents());
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            peak.max(vol.log().index_extents())
        })
    };
    let before = vol.log().index_extents();
    export.flush().await.unwrap();
    done.store(true, Ordering::Release);
    let peak = sampler.await.unwrap();
    let waited = vol.log().index_gate.flushes_waited.load(Ordering::Relaxed);
    eprintln!("index {before} runs before the flush, peak {peak} (bound {max}); {waited} waits");
    let limit = compact::INDEX_STALL_FACTOR * max;
    assert!(peak <= limit, "index peaked at {peak} runs, over {limit}");
    assert!(waited > 0, "no piece waited for defragmentation");
    check_versions_then_reopen(&exports, &export, &store, bs, &expected).await;
}

/// A device whose layout needs more runs than the bound allows (every frame-sized window
/// holds one run, so nothing is left to join): with frames no larger than the writers'
/// allowed, the gate must see that and let flushes through, not hold writers until its
/// safety timeout. With larger frames allowed (the default), the same device does fit:
/// passes cut larger frames and the index ends within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_gate_lets_flushes_through_at_the_layout_floor() {
    let bs = 4096usize;
    let frame_blocks = 8u64; // frame_bytes_max 32 KiB
    let frames = 64u64;
    let blocks = frame_blocks * frames;
    let max = 4usize;
    for defrag_frame_bytes_max in [GATED_FRAME_BYTES, 1 << 20] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let exports = gated_exports_with(
            &store,
            blocks * bs as u64,
            max,
            64 * 4096,
            Duration::from_millis(20),
            defrag_frame_bytes_max,
        );
        let vol = exports.volume(NAME).await.unwrap();
        let export = exports.open(NAME).await.unwrap();
        // One whole frame per flush, each window written once: one run per window, 64
        // runs, far over the stall level (12), impossible to lower at 32 KiB frames.
        let start = Instant::now();
        for f in 0..frames {
            write_first_version(&export, bs, f * frame_blocks, frame_blocks).await;
        }
        let took = start.elapsed();
        let runs = vol.log().index_extents();
        eprintln!(
            "frames up to {defrag_frame_bytes_max}: {frames} flushes in {took:?}; \
             index {runs} runs (bound {max})"
        );
        assert!(
            took < Duration::from_secs(20),
            "flushes were held at the layout floor for {took:?}"
        );
        if defrag_frame_bytes_max == GATED_FRAME_BYTES {
            assert_eq!(runs, frames as usize, "one run per frame-sized window");
        } else {
            // Passes the gate made urgent cut frames of up to 1 MiB (256 blocks: 2 runs
            // would do): the index is back under the urgent level, far below the floor
            // of 32 KiB frames.
            let urgent = compact::INDEX_URGENT_FACTOR * max;
            assert!(runs <= urgent, "{runs} runs, urgent level {urgent}");
        }
        let expected = vec![1u64; blocks as usize];
        check_versions_then_reopen(&exports, &export, &store, bs, &expected).await;
    }
}

/// A FLUSH the index gate commits in pieces, crashed at every store operation it makes
/// (before and after the operation applies), then the daemon restarted on the same store:
/// every block reads its acknowledged first version or the crashed flush's second; the
/// second versions form whole pieces in lba order (each piece is one commit: none is seen
/// in part); and a FLUSH that returned Ok has every block at the second version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piecewise_flush_crashed_at_every_step_keeps_every_acknowledged_block() {
    let bs = 4096usize;
    let blocks: u64 = 1024;
    // The floor (one run per 8-block frame) is the bound: the gate is armed, pieces hold
    // 64 dirty runs, and no piece waits for defragmentation.
    let max = 128usize;
    let write_blocks = 4u64;
    let piece_blocks = (max / 2) as u64 * write_blocks;
    let (mut crashes, mut partial) = (0usize, 0usize);
    'points: for at in 0u64.. {
        for applied in [false, true] {
            let mem: DynStore = Arc::new(MemoryStore::new());
            let faulty = Arc::new(FaultyStore::new(Arc::clone(&mem), FaultConfig::default()));
            let store: DynStore = faulty.clone();
            // Dirty bound far over the data: only the FLUSH below commits version 2.
            let size = blocks * bs as u64;
            let daemon = |store: &DynStore| {
                gated_exports_with(
                    store,
                    size,
                    max,
                    4 * size,
                    Duration::from_secs(600),
                    GATED_FRAME_BYTES,
                )
            };
            let exports = daemon(&store);
            let vol = exports.volume(NAME).await.unwrap();
            let export = exports.open(NAME).await.unwrap();
            for lba in (0..blocks).step_by(64) {
                write_first_version(&export, bs, lba, 64).await;
            }
            for lba in (0..blocks).step_by(write_blocks as usize) {
                let mut buf = Vec::with_capacity(write_blocks as usize * bs);
                for b in lba..lba + write_blocks {
                    buf.extend_from_slice(&block_bytes(bs, b, 2));
                }
                export
                    .write(lba * bs as u64, Bytes::from(buf), false)
                    .await
                    .unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while vol.log().index_gate.commit_runs_max().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "the compactor never armed the gate"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(vol.log().index_gate.commit_runs_max(), Some(max / 2));
            faulty.crash_at(faulty.op_count() + at, applied);
            let acked = export.flush().await.is_ok();
            let crashed = faulty.is_crashed();
            // The process dies here: whatever its tasks still try fails on the crashed
            // store. A new daemon opens the export from what the store holds.
            drop((export, vol, exports));
            let exports = daemon(&mem);
            let export = exports.open(NAME).await.unwrap();
            let mut second = Vec::new();
            for lba in 0..blocks {
                let got = flat(export.read(lba * bs as u64, bs as u32).await.unwrap());
                if got == block_bytes(bs, lba, 2) {
                    second.push(lba);
                } else {
                    assert!(
                        got == block_bytes(bs, lba, 1),
                        "crash at op +{at} (applied {applied}): block {lba} is neither version"
                    );
                }
            }
            exports.close_all().await.unwrap();
            let n = second.len() as u64;
            assert!(
                second.iter().copied().eq(0..n) && n.is_multiple_of(piece_blocks),
                "crash at op +{at} (applied {applied}): version 2 in blocks {:?}..{:?} \
                 ({n} blocks), not whole pieces of {piece_blocks} in order",
                second.first(),
                second.last()
            );
            if acked {
                assert_eq!(n, blocks, "flush acknowledged, yet blocks are at version 1");
            }
            if !crashed {
                assert!(acked, "a flush without a crash failed");
                break 'points;
            }
            crashes += 1;
            if n > 0 && n < blocks {
                partial += 1;
            }
        }
    }
    eprintln!("{crashes} crash points, {partial} left some pieces committed and some not");
    // Four pieces of four segments and a manifest each: the crashes must have hit every
    // piece, including after some pieces and before others.
    assert!(crashes >= 30, "only {crashes} crash points");
    assert!(partial >= 6, "only {partial} crashes fell between pieces");
}

/// Device of the overwrite tests: 1024 blocks of 4 KiB.
const OW_BS: usize = 4096;
const OW_BLOCKS: u64 = 1024;

/// Exports for the overwrite tests: 256 KiB segments, 64 dirty blocks per flush, and a
/// compactor (unless `space_amp_max` is `None` … `compact`: `None` runs none) that waits
/// 30 s for an idle export and copies one victim per pass, far slower than the writes.
fn overwrite_exports(store: &DynStore, compact: Option<Option<f64>>) -> Arc<Exports> {
    Exports::new(
        Arc::clone(store),
        ExportsConfig {
            default_geometry: Geometry {
                size_bytes: OW_BLOCKS * OW_BS as u64,
                block_size: OW_BS as u32,
            },
            log: LogConfig {
                segment_bytes_max: 256 << 10,
                frame_bytes_max: GATED_FRAME_BYTES,
                ..LogConfig::default()
            },
            volume: VolumeConfig {
                cache_bytes_max: 1 << 20,
                dirty_bytes_max: 64 * OW_BS as u64,
                flush_interval: Duration::from_millis(20),
                readahead_bytes_max: 0,
                ..VolumeConfig::default()
            },
            read_only: false,
            idle_close: None,
            exports_max: None,
            compact: compact.map(|space_amp_max| CompactConfig {
                pass_bytes_max: 32 << 10,
                pass_interval: Duration::from_millis(5),
                pass_idle: Duration::from_secs(30),
                pass_idle_wait_max: Duration::from_secs(60),
                space_amp_max,
                ..CompactConfig::default()
            }),
        },
    )
}

/// Write block `lba` with the next version (`*id + 1`), recorded in `expected`.
async fn overwrite_block(
    export: &Arc<dyn BlockExport>,
    lba: u64,
    id: &mut u64,
    expected: &mut [u64],
) {
    *id += 1;
    let data = Bytes::from(block_bytes(OW_BS, lba, *id));
    export.write(lba * OW_BS as u64, data, false).await.unwrap();
    expected[lba as usize] = *id;
}

/// Overwrite random blocks (new versions from `*id` on, recorded in `expected`) for `d`,
/// flushing every 64 writes; returns the highest stored / live seen after a flush.
async fn overwrite_for(
    export: &Arc<dyn BlockExport>,
    log: &Log,
    rng: &mut StdRng,
    id: &mut u64,
    expected: &mut [u64],
    d: Duration,
) -> f64 {
    let mut peak = 0f64;
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        let lba = rng.random_range(0..OW_BLOCKS);
        overwrite_block(export, lba, id, expected).await;
        if id.is_multiple_of(64) {
            export.flush().await.unwrap();
            peak = peak.max(log.space().amplification());
        }
    }
    export.flush().await.unwrap();
    peak
}

/// [`overwrite_for`] in steps of 50 ms until `done(stored / live)` (at most 20 s);
/// returns the last stored / live.
async fn overwrite_until(
    export: &Arc<dyn BlockExport>,
    log: &Log,
    rng: &mut StdRng,
    id: &mut u64,
    expected: &mut [u64],
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let amp = log.space().amplification();
        if done(amp) || Instant::now() >= deadline {
            return amp;
        }
        overwrite_for(export, log, rng, id, expected, Duration::from_millis(50)).await;
    }
}

/// Sustained random overwrites of an export that is never idle (passes wait 30 s for an
/// idle export, at most 60 s): without the space bound no pass runs and the store grows
/// with every flush; with it, passes run back to back once stored bytes pass twice the
/// live ones, and flushes wait for them above three times (one victim per pass is far
/// slower than the writes here), so stored bytes stay within that plus one flush batch.
/// Every block reads back at its last version, and from the store after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_bytes_stay_bounded_under_sustained_overwrites() {
    for bound in [None, Some(2.0)] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let exports = overwrite_exports(&store, Some(bound));
        let vol = exports.volume(NAME).await.unwrap();
        let export = exports.open(NAME).await.unwrap();
        let mut expected = vec![1u64; OW_BLOCKS as usize];
        for lba in (0..OW_BLOCKS).step_by(64) {
            write_first_version(&export, OW_BS, lba, 64).await;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let mut id = 1u64;
        let peak = overwrite_for(
            &export,
            vol.log(),
            &mut rng,
            &mut id,
            &mut expected,
            Duration::from_secs(3),
        )
        .await;
        let end = vol.log().space().amplification();
        let gate = &vol.log().space_gate;
        let waited = gate.flushes_waited.load(Ordering::Relaxed);
        let stats = exports.compactor_stats(NAME).unwrap();
        let rewrites = stats.rewrites.load(Ordering::Relaxed);
        eprintln!(
            "bound {bound:?}: {id} writes; stored/live peak {peak:.2}, end {end:.2}; \
             {rewrites} passes committed; {waited} flushes waited {} ms",
            gate.wait_ms_total.load(Ordering::Relaxed)
        );
        // Enough writes to overwrite the device many times over.
        assert!(id > 8 * OW_BLOCKS, "too few writes to test anything: {id}");
        match bound {
            None => {
                assert_eq!(rewrites, 0, "a pass ran on a busy export without the bound");
                assert!(
                    peak > 4.0,
                    "the store did not grow without the bound: {peak:.2}"
                );
                exports.close_all().await.unwrap();
            }
            Some(b) => {
                assert!(rewrites > 0, "no pass ran during the writes");
                assert!(waited > 0, "no flush waited for compaction");
                // One flush batch (64 blocks) and one segment beyond the stall level.
                let limit = b * compact::SPACE_STALL_FACTOR + 0.25;
                assert!(
                    peak <= limit,
                    "stored/live peaked at {peak:.2}, over {limit}"
                );
                check_versions_then_reopen(&exports, &export, &store, OW_BS, &expected).await;
            }
        }
    }
}

/// A store that already holds a backlog (written without a compactor) when a compactor
/// with the space bound starts: flushes do not wait for passes to work the backlog off
/// down to the stall level (3 ×) — they only may not make it worse — so the first flush
/// returns while the store is still far over it. Passes then work it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_from_before_the_bound_does_not_stall_writes() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut expected = vec![1u64; OW_BLOCKS as usize];
    let mut rng = StdRng::seed_from_u64(9);
    let mut id = 1u64;
    {
        let exports = overwrite_exports(&store, None);
        let vol = exports.volume(NAME).await.unwrap();
        let export = exports.open(NAME).await.unwrap();
        for lba in (0..OW_BLOCKS).step_by(64) {
            write_first_version(&export, OW_BS, lba, 64).await;
        }
        // Until the backlog is well over the stall level (checkpoints drop segments that
        // die whole, so it swings).
        let amp = overwrite_until(&export, vol.log(), &mut rng, &mut id, &mut expected, |a| {
            a >= 8.0
        })
        .await;
        assert!(amp >= 8.0, "no backlog to test with: {amp:.2}");
        exports.close_all().await.unwrap();
    }
    let exports = overwrite_exports(&store, Some(Some(2.0)));
    let vol = exports.volume(NAME).await.unwrap();
    let export = exports.open(NAME).await.unwrap();
    let before = vol.log().space().amplification();
    // One batch of writes and a flush, right away.
    for lba in (0..OW_BLOCKS).step_by(16) {
        overwrite_block(&export, lba, &mut id, &mut expected).await;
    }
    export.flush().await.unwrap();
    let after = vol.log().space().amplification();
    eprintln!("stored/live {before:.2} at open, {after:.2} after the first flush");
    let stall = 2.0 * compact::SPACE_STALL_FACTOR;
    assert!(
        after > stall + 1.0,
        "the first flush waited for the backlog to go ({before:.2} -> {after:.2})"
    );
    // Passes work the backlog off while the export stays busy.
    let end = overwrite_until(&export, vol.log(), &mut rng, &mut id, &mut expected, |a| {
        a <= stall
    })
    .await;
    assert!(end <= stall + 0.25, "the backlog stayed: {end:.2}");
    check_versions_then_reopen(&exports, &export, &store, OW_BS, &expected).await;
}
