//! Flush-cost benchmark: what each 4 KiB flush writes to the object store as the number of
//! mapped blocks grows, over 1,000 consecutive flushes (worst single flush and average),
//! the background checkpoints written meanwhile (off the flush path, reported separately)
//! and the flush latency (CPU only: in-memory store).
//!
//! ```text
//! cargo run --release --example flush_cost            # or tools/bench/flush-cost.sh
//! cargo run --release --example flush_cost -- --quick # 1K and 100K only
//! ```
//!
//! The store is the in-memory backend wrapped in a counter of PUTs and bytes per key kind
//! (segment / manifest / checkpoint) and per issuing tokio task, so the numbers are the
//! log's own cost, not a backend's, and a flush's own PUTs are told apart from the
//! background checkpoint task's. Log configuration: `LogConfig::default()` (what the
//! daemon uses). Target: at 1M mapped blocks, ≤ 3 PUTs and ≤ 64 KiB of manifest +
//! checkpoint bytes for every 4 KiB flush.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::memory::MemoryStore;
use nbds3::store::{DynStore, ListPage, ObjectMeta, ObjectStore, PutMode, StoreResult};

const BS: usize = 4096;
/// 32 GiB device: room for 1M mapped blocks, also scattered with gaps between them.
const DEVICE_BLOCKS: u64 = 8 << 20;
/// Blocks per commit while filling (32 MiB batches).
const FILL_BATCH_BLOCKS: u64 = 8192;
const FLUSHES: usize = 1000;

#[derive(Debug, Default, Clone, Copy)]
struct Kind {
    puts: u64,
    bytes: u64,
}

/// PUTs by key kind, split by who issued them: the task running the flushes (`fg`) or
/// any other task (`bg`: the background checkpoint).
#[derive(Debug, Default, Clone)]
struct Counts {
    fg: BTreeMap<&'static str, Kind>,
    bg: BTreeMap<&'static str, Kind>,
    gets: u64,
    lists: u64,
}

fn get(m: &BTreeMap<&'static str, Kind>, k: &str) -> Kind {
    m.get(k).copied().unwrap_or_default()
}

impl Counts {
    fn fg_puts(&self) -> u64 {
        self.fg.values().map(|k| k.puts).sum()
    }
    fn minus(&self, before: &Counts) -> Counts {
        let sub = |a: &BTreeMap<&'static str, Kind>, b: &BTreeMap<&'static str, Kind>| {
            a.iter()
                .map(|(k, v)| {
                    let o = get(b, k);
                    (
                        *k,
                        Kind {
                            puts: v.puts - o.puts,
                            bytes: v.bytes - o.bytes,
                        },
                    )
                })
                .collect()
        };
        Counts {
            fg: sub(&self.fg, &before.fg),
            bg: sub(&self.bg, &before.bg),
            gets: self.gets - before.gets,
            lists: self.lists - before.lists,
        }
    }
}

/// Counts every PUT (and its bytes) by key kind and issuing task, every GET and LIST.
#[derive(Debug)]
struct CountingStore {
    inner: DynStore,
    counts: Mutex<Counts>,
    /// The task whose PUTs count as the flush's own.
    flusher: Mutex<Option<tokio::task::Id>>,
}

fn key_kind(key: &str) -> &'static str {
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

impl CountingStore {
    fn snapshot(&self) -> Counts {
        self.counts.lock().expect("counts").clone()
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        {
            let fg = *self.flusher.lock().expect("flusher") == tokio::task::try_id();
            let mut c = self.counts.lock().expect("counts");
            let side = if fg { &mut c.fg } else { &mut c.bg };
            let k = side.entry(key_kind(key)).or_default();
            k.puts += 1;
            k.bytes += data.len() as u64;
        }
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.counts.lock().expect("counts").gets += 1;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.counts.lock().expect("counts").gets += 1;
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
        self.counts.lock().expect("counts").lists += 1;
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("counting({})", self.inner.describe())
    }
}

/// Compressible, never-zero content for fill blocks (each block carries its lba).
fn fill_block(lba: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + BS, 0x5a);
    out[start..start + 8].copy_from_slice(&(lba + 1).to_le_bytes());
}

/// Incompressible 4 KiB for the measured flushes (worst case for segment bytes).
fn noise_block(seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(BS);
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy)]
enum Layout {
    Sequential,
    Scattered,
}

/// Min / average / max of a per-flush series.
#[derive(Debug, Default, Clone, Copy)]
struct Series {
    avg: f64,
    max: u64,
}

fn series(xs: &[u64]) -> Series {
    Series {
        avg: xs.iter().sum::<u64>() as f64 / xs.len().max(1) as f64,
        max: xs.iter().copied().max().unwrap_or(0),
    }
}

struct Row {
    label: String,
    mapped: u64,
    extents: usize,
    fill_secs: f64,
    /// Per flush (the flush's own PUTs).
    puts: Series,
    manifest_bytes: Series,
    segment_bytes: Series,
    /// PUTs of a checkpoint by the flushing task itself (must be 0).
    fg_checkpoint_puts: u64,
    lists_per_flush: f64,
    latency_p50: Duration,
    latency_p99: Duration,
    latency_max: Duration,
    /// Background checkpoints PUT during (and right after) the flushes.
    bg: Kind,
    installed: u64,
    waited: u64,
    build_ms_max: f64,
    /// What taking the snapshot under the commit lock would have cost instead: cloning
    /// the index, converting it (`to_checkpoint`).
    clone_ms: f64,
    to_checkpoint_ms: f64,
}

async fn fill(log: &Log, blocks: u64, layout: Layout) {
    match layout {
        Layout::Sequential => {
            let mut lba = 0;
            while lba < blocks {
                let n = FILL_BATCH_BLOCKS.min(blocks - lba);
                let mut data = Vec::with_capacity(n as usize * BS);
                for i in 0..n {
                    fill_block(lba + i, &mut data);
                }
                let batch = [BatchEntry {
                    lba,
                    blocks: n,
                    update: Update::Data(Bytes::from(data)),
                }];
                log.commit(&batch).await.expect("fill commit");
                lba += n;
            }
        }
        Layout::Scattered => {
            // Distinct even lbas: no two written blocks are adjacent, so every block is its
            // own frame and its own index extent.
            let mut rng = Xorshift(0x1234_5678_9abc_def1);
            let mut set = std::collections::BTreeSet::new();
            while (set.len() as u64) < blocks {
                set.insert((rng.next() % (DEVICE_BLOCKS / 2)) * 2);
            }
            let lbas: Vec<u64> = set.into_iter().collect();
            // Commit in groups (each batch sorted, as the volume layer sends them).
            for chunk in lbas.chunks(FILL_BATCH_BLOCKS as usize) {
                let batch: Vec<BatchEntry> = chunk
                    .iter()
                    .map(|&lba| {
                        let mut d = Vec::with_capacity(BS);
                        fill_block(lba, &mut d);
                        BatchEntry {
                            lba,
                            blocks: 1,
                            update: Update::Data(Bytes::from(d)),
                        }
                    })
                    .collect();
                log.commit(&batch).await.expect("fill commit");
            }
        }
    }
}

async fn scenario(blocks: u64, layout: Layout) -> Row {
    let counting = Arc::new(CountingStore {
        inner: Arc::new(MemoryStore::new()),
        counts: Mutex::new(Counts::default()),
        flusher: Mutex::new(None),
    });
    let store: DynStore = counting.clone();
    let log = Log::open(
        store,
        "bench",
        Some(Geometry {
            size_bytes: DEVICE_BLOCKS * BS as u64,
            block_size: BS as u32,
        }),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await
    .expect("create export");
    let t = Instant::now();
    fill(&log, blocks, layout).await;
    // Nothing of the fill in flight while measuring (a written checkpoint is installed by
    // the first measured flush, which costs nothing extra).
    log.wait_checkpoint().await;
    let fill_secs = t.elapsed().as_secs_f64();
    let (mapped, extents) = log.with_index(|i| (i.mapped_blocks(), i.map.len()));
    assert_eq!(mapped, blocks, "fill mapped every block");
    let (clone_ms, to_checkpoint_ms) = log.with_index(|i| {
        let t = Instant::now();
        let c = i.clone();
        let clone_ms = t.elapsed().as_secs_f64() * 1e3;
        drop(c);
        let t = Instant::now();
        let c = i.to_checkpoint(1, DEVICE_BLOCKS * BS as u64, BS as u32);
        let to_ms = t.elapsed().as_secs_f64() * 1e3;
        drop(c);
        (clone_ms, to_ms)
    });

    // 1,000 consecutive 4 KiB flushes, each a single-block overwrite of a mapped block.
    let mut rng = Xorshift(0xfeed_f00d);
    let target = |rng: &mut Xorshift| match layout {
        Layout::Sequential => rng.next() % blocks,
        Layout::Scattered => (rng.next() % (DEVICE_BLOCKS / 2)) * 2,
    };
    *counting.flusher.lock().expect("flusher") = tokio::task::try_id();
    let stat = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let installed0 = stat(&log.stats.checkpoints_installed);
    let waited0 = stat(&log.stats.commits_waited_for_checkpoint);
    let before = counting.snapshot();
    let (mut puts, mut man, mut seg, mut lat) = (vec![], vec![], vec![], vec![]);
    for i in 0..FLUSHES {
        let b0 = counting.snapshot();
        let batch = [BatchEntry {
            lba: target(&mut rng),
            blocks: 1,
            update: Update::Data(noise_block(i as u64 + 1)),
        }];
        let t = Instant::now();
        log.commit(&batch).await.expect("4 KiB flush");
        lat.push(t.elapsed());
        let d = counting.snapshot().minus(&b0);
        puts.push(d.fg_puts());
        man.push(get(&d.fg, "manifest").bytes);
        seg.push(get(&d.fg, "segment").bytes);
    }
    // Let the last background checkpoint finish so its bytes are counted.
    log.wait_checkpoint().await;
    let all = counting.snapshot().minus(&before);
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let label = match layout {
        Layout::Sequential => format!("{} sequential", human(blocks)),
        Layout::Scattered => format!("{} scattered", human(blocks)),
    };
    Row {
        label,
        mapped,
        extents,
        fill_secs,
        puts: series(&puts),
        manifest_bytes: series(&man),
        segment_bytes: series(&seg),
        fg_checkpoint_puts: get(&all.fg, "checkpoint").puts,
        lists_per_flush: all.lists as f64 / FLUSHES as f64,
        latency_p50: pct(0.5),
        latency_p99: pct(0.99),
        latency_max: lat[lat.len() - 1],
        bg: get(&all.bg, "checkpoint"),
        installed: stat(&log.stats.checkpoints_installed) - installed0,
        waited: stat(&log.stats.commits_waited_for_checkpoint) - waited0,
        build_ms_max: stat(&log.stats.checkpoint_build_us_max) as f64 / 1e3,
        clone_ms,
        to_checkpoint_ms,
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}Mi", n >> 20)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}K", n / 1000)
    } else {
        n.to_string()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut cases = vec![
        (1_000, Layout::Sequential),
        (100_000, Layout::Sequential),
        (100_000, Layout::Scattered),
    ];
    if !quick {
        cases.push((1 << 20, Layout::Sequential));
        // Every block its own extent: the largest checkpoint 1M blocks can make.
        cases.push((1 << 20, Layout::Scattered));
    }
    let mut rows = Vec::new();
    for (blocks, layout) in cases {
        // In a task of its own, so its PUTs are told apart from the background task's.
        let r = tokio::spawn(scenario(blocks, layout))
            .await
            .expect("scenario");
        eprintln!(
            "{}: filled in {:.1}s, {} extents",
            r.label, r.fill_secs, r.extents
        );
        rows.push(r);
    }
    let f = FLUSHES as f64;
    println!("{FLUSHES} consecutive 4 KiB flushes after filling the export, per flush (the flush's own PUTs):\n");
    println!("| export (mapped blocks) | index extents | PUTs avg | PUTs max | manifest B avg | manifest B max | segment B avg | checkpoint PUTs by a flush | LISTs | latency p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} ({}) | {} | {:.3} | {} | {:.0} | {} | {:.0} | {} | {:.2} | {} | {} | {} |",
            r.label,
            r.mapped,
            r.extents,
            r.puts.avg,
            r.puts.max,
            r.manifest_bytes.avg,
            r.manifest_bytes.max,
            r.segment_bytes.avg,
            r.fg_checkpoint_puts,
            r.lists_per_flush,
            ms(r.latency_p50),
            ms(r.latency_p99),
            ms(r.latency_max),
        );
    }
    println!(
        "\nBackground checkpoints written during those {FLUSHES} flushes (off the flush path):\n"
    );
    println!("| export | checkpoints | bytes each | amortized B/flush | installed | flushes that waited (hard limit) | build ms max | inline snapshot instead: clone ms + to_checkpoint ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.1} + {:.1} |",
            r.label,
            r.bg.puts,
            r.bg.bytes.checked_div(r.bg.puts).unwrap_or(0),
            r.bg.bytes as f64 / f,
            r.installed,
            r.waited,
            r.build_ms_max,
            r.clone_ms,
            r.to_checkpoint_ms,
        );
    }
    for r in rows.iter().filter(|r| r.mapped == 1 << 20) {
        let met = r.puts.max <= 3 && r.manifest_bytes.max <= 65536 && r.fg_checkpoint_puts == 0;
        println!(
            "\nTarget at 1Mi mapped blocks ({}): ≤ 3 PUTs and ≤ 64 KiB manifest+checkpoint bytes for every 4 KiB flush.\n\
             Measured: worst flush {} PUTs and {} manifest bytes, no checkpoint bytes (avg {:.3} PUTs, {:.0} B) → {}; \
             background checkpoints: {} × {} B, {:.0} B per flush amortized",
            r.label,
            r.puts.max,
            r.manifest_bytes.max,
            r.puts.avg,
            r.manifest_bytes.avg,
            if met { "MET for every flush" } else { "MISSED" },
            r.bg.puts,
            r.bg.bytes.checked_div(r.bg.puts).unwrap_or(0),
            r.bg.bytes as f64 / f,
        );
    }
}
