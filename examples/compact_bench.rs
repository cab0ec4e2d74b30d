//! Compaction space benchmark: fill an export, overwrite it randomly three times over with
//! flushes, compact and collect, and report what is stored before and after against the
//! live compressed bytes, the write amplification of compaction, requests and time.
//!
//!     cargo run --release --example compact_bench -- [--size 1G] [--thresholds 0.5,0.25]
//!         [--store URL] [--flush-every 64M] [--verify-blocks 20000]
//!
//! Without `--store` a fresh `file://` store in a temp directory is used (removed at the
//! end). `--store s3://BUCKET/PREFIX` with `NBDS3_S3_ENDPOINT` / `NBDS3_S3_PATH_STYLE=1`
//! (and the usual AWS credential variables) runs it against S3; each run uses a fresh
//! export name and deletes it afterwards.
//!
//! Data is "incompressible-ish": three quarters of every block are pseudo-random bytes and a
//! quarter repeats an 8-byte tag, so zstd saves about a quarter and sizes mean something.
//! Every row starts from an empty export. After compaction, a sample of blocks is read back
//! and checked against the model of what was last written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;

use nbds3::log::compact::{self, CompactConfig, CountingStore, RequestCounts};
use nbds3::log::gc::GcConfig;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::s3::S3Options;
use nbds3::store::DynStore;
use nbds3::util::parse_size;

#[derive(Debug, Parser)]
struct Args {
    /// Export size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Dead-fraction thresholds to run, one row each.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25")]
    thresholds: Vec<f64>,
    /// Store URL (default: a temp `file://` directory).
    #[arg(long)]
    store: Option<String>,
    /// Flush (commit) after this many bytes written.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    flush_every: u64,
    /// Blocks read back and checked after compaction.
    #[arg(long, default_value_t = 20_000)]
    verify_blocks: u64,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const BS: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Content of block `lba` as written by write number `id`.
fn fill_block(out: &mut [u8], lba: u64, id: u64) {
    let mut r =
        Rng((lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03)) | 1);
    let tag = r.next() | 1;
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = if i % 4 == 3 { tag } else { r.next() };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[derive(Default)]
struct Row {
    threshold: f64,
    stored_before: u64,
    objects_before: u64,
    stored_after: u64,
    objects_after: u64,
    live_stored: u64,
    live_raw: u64,
    compaction_written: u64,
    compaction_read: u64,
    passes: usize,
    requests: u64,
    workload: Duration,
    compaction: Duration,
    verified: u64,
}

async fn commit_pending(log: &Log, pending: &mut BTreeMap<u64, u64>) -> anyhow::Result<()> {
    // Coalesce consecutive blocks into runs (at most 1 MiB each).
    let mut entries = Vec::new();
    let mut run: Option<(u64, BytesMut)> = None;
    for (&lba, &id) in pending.iter() {
        let extend = matches!(&run, Some((s, b)) if *s + (b.len() / BS) as u64 == lba && b.len() < (1 << 20));
        if !extend {
            if let Some((s, b)) = run.take() {
                entries.push(BatchEntry {
                    lba: s,
                    blocks: (b.len() / BS) as u64,
                    update: Update::Data(b.freeze()),
                });
            }
            run = Some((lba, BytesMut::with_capacity(1 << 20)));
        }
        if let Some((_, b)) = &mut run {
            let at = b.len();
            b.resize(at + BS, 0);
            fill_block(&mut b[at..], lba, id);
        }
    }
    if let Some((s, b)) = run.take() {
        entries.push(BatchEntry {
            lba: s,
            blocks: (b.len() / BS) as u64,
            update: Update::Data(b.freeze()),
        });
    }
    pending.clear();
    if !entries.is_empty() {
        log.commit(&entries).await?;
    }
    Ok(())
}

async fn one_row(
    args: &Args,
    store: DynStore,
    counts: Arc<RequestCounts>,
    threshold: f64,
    name: &str,
) -> anyhow::Result<Row> {
    let blocks = args.size / BS as u64;
    let log = Log::open(
        Arc::clone(&store),
        name,
        Some(Geometry {
            size_bytes: args.size,
            block_size: BS as u32,
        }),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await?;
    let mut model = vec![0u64; blocks as usize];
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut id = 0u64;
    let flush_blocks = (args.flush_every / BS as u64).max(1);
    let t0 = Instant::now();
    // Fill sequentially, then overwrite randomly three times over (4–64 KiB writes).
    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
    let mut since_flush = 0u64;
    let mut written = 0u64;
    while written < 4 * blocks {
        let (lba, n) = if written < blocks {
            (written, 256.min(blocks - written))
        } else {
            let n = 1 + rng.below(16);
            (rng.below(blocks - n + 1), n)
        };
        id += 1;
        for b in lba..lba + n {
            pending.insert(b, id);
            model[b as usize] = id;
        }
        written += n;
        since_flush += n;
        if since_flush >= flush_blocks {
            commit_pending(&log, &mut pending).await?;
            since_flush = 0;
        }
    }
    commit_pending(&log, &mut pending).await?;
    let workload = t0.elapsed();

    let before = compact::space_report(&log, false).await?;
    let req0 = counts.total();
    let cfg = CompactConfig {
        dead_fraction_min: threshold,
        pass_bytes_max: 256 << 20,
        gc: GcConfig {
            keep_versions_min: 1,
            retain_window: Duration::ZERO,
            delete_objects_max: usize::MAX,
        },
        ..CompactConfig::default()
    };
    let t1 = Instant::now();
    let (passes, _gc) = compact::compact_all(&log, &cfg, 100_000, None).await?;
    let compaction = t1.elapsed();
    let requests = counts.total() - req0;
    let after = compact::space_report(&log, true).await?;

    // Read back a sample (and both ends) against the model.
    let mut verified = 0;
    let mut buf = vec![0u8; BS];
    let mut sample: Vec<u64> = (0..args.verify_blocks.min(blocks))
        .map(|_| rng.below(blocks))
        .collect();
    sample.extend([0, blocks - 1]);
    for lba in sample {
        let got = log.read_blocks(lba, 1).await?;
        fill_block(&mut buf, lba, model[lba as usize]);
        anyhow::ensure!(got == buf, "block {lba} differs after compaction");
        verified += 1;
    }
    log.check_accounting().map_err(|e| anyhow::anyhow!(e))?;

    Ok(Row {
        threshold,
        stored_before: before.bytes_stored,
        objects_before: before.objects,
        stored_after: after.bytes_stored,
        objects_after: after.objects,
        live_stored: after.live_stored_bytes.unwrap_or(0),
        live_raw: after.live_raw_bytes,
        compaction_written: passes.iter().map(|p| p.bytes_written).sum(),
        compaction_read: passes.iter().map(|p| p.frame_bytes_read).sum(),
        passes: passes.len(),
        requests,
        workload,
        compaction,
        verified,
    })
}

async fn delete_export(store: &DynStore, name: &str) -> anyhow::Result<()> {
    let keys = nbds3::format::ExportKeys::new(name)?;
    let objs = nbds3::store::list_all(store.as_ref(), &keys.root).await?;
    let keys: Vec<String> = objs.into_iter().map(|o| o.key).collect();
    for chunk in keys.chunks(1000) {
        store.delete_many(chunk).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.size >= (16 << 20) && args.size.is_multiple_of(BS as u64),
        "--size must be a multiple of 4 KiB, at least 16 MiB"
    );
    let tmp;
    let url = match &args.store {
        Some(u) => u.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("nbds3-compact-bench")
                .tempdir()?;
            format!("file://{}", tmp.path().display())
        }
    };
    let s3 = S3Options {
        endpoint: std::env::var("NBDS3_S3_ENDPOINT").ok(),
        region: std::env::var("NBDS3_S3_REGION").ok(),
        path_style: std::env::var("NBDS3_S3_PATH_STYLE").is_ok_and(|v| v == "1" || v == "true"),
        ..S3Options::default()
    };
    let inner = nbds3::store::open_url(&url, &s3).await?;
    let counting = Arc::new(CountingStore::new(inner));
    let counts = counting.counts();
    let store: DynStore = counting;
    eprintln!(
        "store {}, export {} of 4 KiB blocks, flush every {}",
        store.describe(),
        human(args.size),
        human(args.flush_every)
    );
    let mut rows = Vec::new();
    for &t in &args.thresholds {
        let name = format!(
            "compact-bench-{}-{}",
            (t * 100.0) as u32,
            rand::random::<u32>()
        );
        eprintln!("threshold {t}: writing {} ...", human(4 * args.size));
        let r = one_row(&args, Arc::clone(&store), Arc::clone(&counts), t, &name).await;
        delete_export(&store, &name).await?;
        let r = r?;
        eprintln!(
            "threshold {t}: {} -> {} in {:.1?} (workload {:.1?})",
            human(r.stored_before),
            human(r.stored_after),
            r.compaction,
            r.workload
        );
        rows.push(r);
    }
    println!("| threshold | stored before | stored after | live compressed | after / live | live raw | compaction wrote | WA (wrote / live) | compaction read | passes | requests | compaction time | workload time | blocks verified |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} ({} obj) | {} ({} obj) | {} | **{:.3}** | {} | {} | {:.2} | {} | {} | {} | {:.1} s | {:.1} s | {} |",
            r.threshold,
            human(r.stored_before),
            r.objects_before,
            human(r.stored_after),
            r.objects_after,
            human(r.live_stored),
            r.stored_after as f64 / r.live_stored.max(1) as f64,
            human(r.live_raw),
            human(r.compaction_written),
            r.compaction_written as f64 / r.live_stored.max(1) as f64,
            human(r.compaction_read),
            r.passes,
            r.requests,
            r.compaction.as_secs_f64(),
            r.workload.as_secs_f64(),
            r.verified
        );
    }
    Ok(())
}
