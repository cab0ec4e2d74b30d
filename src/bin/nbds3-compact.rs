//! nbds3-compact: offline compaction and garbage collection of one export.
//!
//! Takes the writer role the same way the daemon does (a higher epoch, committed with a
//! conditional PUT), then runs the library's compaction passes (`nbds3::log::compact`, the
//! code the daemon's background compactor runs) until no segment qualifies, and one GC pass.
//! Refuses to start while a daemon's lease on the export is fresh, because taking the writer
//! role fences that daemon (its writes then fail); `--force` does it anyway. `--dry-run`
//! opens the export read-only and prints the plan without writing anything.
//!
//! Progress goes to stderr (only on a terminal), the summary to stdout; exit codes are in
//! `--help`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use nbds3::cli::{check_conditional_put, CompressionArgs, StoreArgs};
use nbds3::format::ExportKeys;
use nbds3::log::compact::{
    self, CompactConfig, CompactError, CountingStore, PassReport, RequestCounts, VictimReason,
};
use nbds3::log::gc::{self, GcConfig, GcReport};
use nbds3::log::lease::{self, LeaseStatus};
use nbds3::log::{self as nlog, Log, LogError, OpenMode};
use nbds3::store::{DynStore, StoreError};
use nbds3::util::{parse_duration, parse_size, unix_ms_now};

const EXIT_OK: u8 = 0;
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NO_EXPORT: u8 = 3;
const EXIT_STORE: u8 = 4;
const EXIT_CORRUPT: u8 = 5;
const EXIT_DAEMON_ACTIVE: u8 = 6;
const EXIT_FENCED: u8 = 7;

const EXIT_CODES_HELP: &str = "\
EXIT CODES:
  0  success (dry run: plan printed)
  1  other failure
  2  usage error (bad arguments)
  3  no such export
  4  store unreachable or failing (after retries)
  5  an object the export needs is corrupt or missing
  6  a daemon is serving the export (its lease is fresh); stop it or pass --force
  7  another writer took the export over while compacting";

/// Compact one export offline: rewrite mostly-dead segments, then delete what no retained
/// manifest needs.
#[derive(Debug, Parser)]
#[command(name = "nbds3-compact", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    compression: CompressionArgs,
    /// Export name.
    export: String,
    /// Rewrite a segment once at least this share of its data is dead (0..=1).
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Print what would be done and change nothing (opens the export read-only).
    #[arg(long)]
    dry_run: bool,
    /// Run even though a daemon's lease is fresh. The daemon is fenced: its writes fail
    /// from then on (nothing acknowledged is lost) until it is restarted.
    #[arg(long)]
    force: bool,
    /// Live bytes one pass copies at most (bounds memory).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pass_bytes: u64,
    /// Also rewrite fragmented stretches (adjacent blocks stored in different frames) until
    /// the export's page index needs at most this much memory.
    #[arg(long, value_parser = parse_size)]
    index_max: Option<u64>,
    /// Largest frame a pass cuts when the export is too large for --index-max at the
    /// writers' 128 KiB frames (up to 4M; a cold read fetches a whole frame).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    defrag_frame_max: u64,
    /// Manifest versions garbage collection keeps (at least 1).
    #[arg(long, default_value_t = 8)]
    keep_versions: u64,
    /// Garbage collection also keeps states that were current this recently (readers may
    /// still be using them). `0s` reclaims everything at once.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    retain: Duration,
    /// Compact only; do not collect garbage.
    #[arg(long)]
    no_gc: bool,
    /// Run even if the store ignores conditional puts (unsafe if anything else writes).
    #[arg(long)]
    allow_unsafe_no_conditional_put: bool,
    /// Stop retrying an unreachable or failing S3 endpoint after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    s3_retry_max: Duration,
}

/// A failure with the exit code it maps to.
struct Fail {
    code: u8,
    msg: String,
}

fn fail(code: u8, msg: impl Into<String>) -> Fail {
    Fail {
        code,
        msg: msg.into(),
    }
}

fn log_code(e: &LogError) -> u8 {
    match e {
        LogError::NoSuchExport { .. } => EXIT_NO_EXPORT,
        LogError::Store(StoreError::NotFound { .. }) | LogError::MissingObject { .. } => {
            EXIT_CORRUPT
        }
        LogError::Store(_) => EXIT_STORE,
        LogError::Format { .. } | LogError::Corrupt { .. } => EXIT_CORRUPT,
        LogError::Fenced { .. } => EXIT_FENCED,
        LogError::Invalid(_) => EXIT_USAGE,
        LogError::ReadOnly | LogError::Internal(_) => EXIT_FAILED,
    }
}

impl From<LogError> for Fail {
    fn from(e: LogError) -> Self {
        let code = log_code(&e);
        let msg = match &e {
            LogError::Fenced { .. } => format!(
                "{e}\nanother writer (a daemon?) took the export over while compacting; everything committed so far is intact"
            ),
            _ => e.to_string(),
        };
        fail(code, msg)
    }
}

impl From<CompactError> for Fail {
    fn from(e: CompactError) -> Self {
        match e {
            CompactError::Log(l) => l.into(),
            CompactError::Invalid(m) => fail(EXIT_USAGE, m),
            other => fail(EXIT_FAILED, other.to_string()),
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn requests_line(c: &RequestCounts) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "put {}, get {}, get-range {}, head {}, list {}, delete {} ({} objects); total {}",
        c.puts.load(Relaxed),
        c.gets.load(Relaxed),
        c.get_ranges.load(Relaxed),
        c.heads.load(Relaxed),
        c.lists.load(Relaxed),
        c.deletes.load(Relaxed),
        c.objects_deleted.load(Relaxed),
        c.total()
    )
}

async fn stored(store: &DynStore, keys: &ExportKeys) -> Result<(u64, u64), Fail> {
    let objs = gc::list_objects(store, keys).await?;
    Ok((objs.len() as u64, objs.iter().map(|o| o.size_bytes).sum()))
}

fn print_gc(g: &GcReport, dry_run: bool) {
    let label = if dry_run {
        "gc would delete"
    } else {
        "gc deleted"
    };
    println!(
        "  {label:<19} {} manifests, {} checkpoints, {} segments ({})",
        g.manifests_deleted,
        g.checkpoints_deleted,
        g.segments_deleted,
        human(g.bytes_deleted)
    );
    if g.objects_deferred > 0 {
        println!(
            "  gc deferred         {} objects (per-pass limit)",
            g.objects_deferred
        );
    }
    if g.objects_kept_unsure > 0 {
        println!(
            "  gc kept             {} unreferenced objects it cannot prove dead",
            g.objects_kept_unsure
        );
    }
    if let Some(r) = &g.skipped {
        println!("  gc skipped          {r}");
    }
    println!(
        "  manifests           latest {}, low-water mark {}",
        g.latest_version, g.low_water
    );
}

async fn run(cli: Cli) -> Result<(), Fail> {
    if !(0.0..=1.0).contains(&cli.threshold) {
        return Err(fail(
            EXIT_USAGE,
            format!("--threshold {} is not between 0 and 1", cli.threshold),
        ));
    }
    if cli.keep_versions == 0 {
        return Err(fail(EXIT_USAGE, "--keep-versions must be at least 1"));
    }
    let keys =
        ExportKeys::new(&cli.export).map_err(|e| fail(EXIT_USAGE, format!("export name: {e}")))?;
    let cfg = CompactConfig {
        dead_fraction_min: cli.threshold,
        pass_bytes_max: cli.pass_bytes.max(1),
        index_runs_max: cli.index_max.map(nbds3::volume::index_runs_in),
        defrag_frame_bytes_max: usize::try_from(cli.defrag_frame_max).unwrap_or(usize::MAX),
        gc: GcConfig {
            keep_versions_min: cli.keep_versions,
            retain_window: cli.retain,
            ..GcConfig::default()
        },
        ..CompactConfig::default()
    };
    cfg.validate()?;

    let s3 = cli.store.s3_options(cli.s3_retry_max);
    let inner = nbds3::store::open_url(&cli.store.store, &s3)
        .await
        .map_err(|e| fail(EXIT_STORE, format!("opening the store: {e}")))?;
    let counting = Arc::new(CountingStore::new(inner));
    let counts = counting.counts();
    let store: DynStore = counting;

    let t0 = Instant::now();
    if nlog::latest_version(&store, &keys).await?.is_none() {
        return Err(fail(
            EXIT_NO_EXPORT,
            format!("no export named {:?} in {}", cli.export, store.describe()),
        ));
    }
    match lease::lease_status(&store, &keys, unix_ms_now()).await? {
        LeaseStatus::Live { lease, age_ms } if !cli.dry_run => {
            if !cli.force {
                return Err(fail(
                    EXIT_DAEMON_ACTIVE,
                    format!(
                        "export {:?} is being served by a daemon ({}, writer epoch {}, lease renewed {:.1}s ago).\n\
                         Compacting now would take the writer role away from it: its writes would fail until it is restarted.\n\
                         Stop the daemon first (its own background compactor does this work while it runs), or pass --force.",
                        cli.export,
                        lease.holder,
                        lease.epoch,
                        age_ms as f64 / 1000.0
                    ),
                ));
            }
            eprintln!(
                "warning: --force: taking the export from the daemon at {} (writer epoch {}); its writes will fail from now on",
                lease.holder, lease.epoch
            );
        }
        LeaseStatus::Unreadable { reason } if !cli.dry_run && !cli.force => {
            return Err(fail(
                EXIT_DAEMON_ACTIVE,
                format!(
                    "the export's lease object cannot be read ({reason}); a daemon may be serving it. Check, then pass --force"
                ),
            ));
        }
        LeaseStatus::Live { lease, .. } => eprintln!(
            "note: a daemon ({}) is serving the export; this plan may be outdated by the time it would run",
            lease.holder
        ),
        _ => {}
    }

    let (objects_before, bytes_before) = stored(&store, &keys).await?;
    if cli.dry_run {
        return dry_run(&cli, &store, &keys, &cfg, objects_before, bytes_before).await;
    }
    check_conditional_put(&store, cli.allow_unsafe_no_conditional_put)
        .await
        .map_err(|e| fail(EXIT_STORE, e.to_string()))?;

    let log = Log::open(
        Arc::clone(&store),
        &cli.export,
        None,
        cli.compression.log_config(),
        OpenMode::Writer,
    )
    .await?;
    let plan = compact::plan_pass(&log, &cfg, None);
    let bar = if std::io::stderr().is_terminal() && plan.live_raw_bytes > 0 {
        let b = ProgressBar::new(plan.live_raw_bytes);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} compacting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let progress = {
        let bar = bar.clone();
        move |n: u64| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        }
    };
    let mut passes: Vec<PassReport> = Vec::new();
    loop {
        let r = compact::compact_pass(&log, &cfg, Some(&progress)).await?;
        if r.version.is_none() {
            break;
        }
        passes.push(r);
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let g = if cli.no_gc {
        None
    } else {
        Some(gc::gc_pass(&log, &cfg.gc, &mut gc::GcState::default()).await?)
    };
    let (objects_after, bytes_after) = stored(&store, &keys).await?;

    let sum = |f: fn(&PassReport) -> u64| passes.iter().map(f).sum::<u64>();
    println!(
        "export {:?}: {} compaction passes in {:.1?}",
        cli.export,
        passes.len(),
        t0.elapsed()
    );
    println!(
        "  segments read       {} ({} frames, {})",
        sum(|p| p.segments_read),
        sum(|p| p.frames_read),
        human(sum(|p| p.frame_bytes_read))
    );
    println!(
        "  segments retired    {} ({} stored)",
        sum(|p| p.victims),
        human(sum(|p| p.victim_bytes))
    );
    println!(
        "  segments written    {} ({})",
        sum(|p| p.segments_written),
        human(sum(|p| p.bytes_written))
    );
    println!(
        "  blocks moved        {} (skipped {}: overwritten meanwhile)",
        sum(|p| p.blocks_moved),
        sum(|p| p.blocks_skipped)
    );
    if let (Some(first), Some(last)) = (passes.first(), passes.last()) {
        println!(
            "  index runs          before {}, after {} ({} fragmented stretches rewritten)",
            first.index_runs_before,
            last.index_runs_after,
            sum(|p| p.fragments)
        );
    }
    if let Some(g) = &g {
        print_gc(g, false);
    }
    println!(
        "  bytes stored        before {} ({objects_before} objects), after {} ({objects_after} objects)",
        human(bytes_before),
        human(bytes_after)
    );
    if !cli.no_gc && !cli.retain.is_zero() && sum(|p| p.victims) > 0 {
        println!(
            "  note                retired segments are deleted by a later gc once the retention window ({:?}) has passed; --retain 0s reclaims at once",
            cli.retain
        );
    }
    println!("  requests            {}", requests_line(&counts));
    Ok(())
}

async fn dry_run(
    cli: &Cli,
    store: &DynStore,
    keys: &ExportKeys,
    cfg: &CompactConfig,
    objects_before: u64,
    bytes_before: u64,
) -> Result<(), Fail> {
    let log = Log::open(
        Arc::clone(store),
        &cli.export,
        None,
        cli.compression.log_config(),
        OpenMode::ReadOnly,
    )
    .await?;
    let plan = compact::plan_pass(&log, cfg, None);
    println!(
        "export {:?} (dry run: nothing is written): {} ({objects_before} objects) stored",
        cli.export,
        human(bytes_before)
    );
    println!(
        "  would rewrite       {} segments ({} stored), copying {} of live data",
        plan.victims.len(),
        human(plan.victim_bytes),
        human(plan.live_raw_bytes)
    );
    const SHOWN_MAX: usize = 20;
    for v in plan.victims.iter().take(SHOWN_MAX) {
        let why = match v.reason {
            VictimReason::Empty => "no live data",
            VictimReason::Dead => "mostly dead",
            VictimReason::Small => "small, merged",
        };
        println!(
            "    segment {:020}  {:>10}  {:>5.1}% dead  {why}",
            v.id,
            human(v.stat.size_bytes),
            v.stat.dead_fraction() * 100.0
        );
    }
    if plan.victims.len() > SHOWN_MAX {
        println!("    … and {} more", plan.victims.len() - SHOWN_MAX);
    }
    if !plan.fragments.is_empty() {
        println!(
            "  would defragment    {} stretches of the page index ({} runs now, bound {})",
            plan.fragments.len(),
            log.index_extents(),
            cfg.index_runs_max.unwrap_or(0)
        );
    }
    if !cli.no_gc {
        let g = gc::gc_dry_run(store, keys, &cfg.gc).await?;
        print_gc(&g, true);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    nbds3::util::init_stderr_logging("warn");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(f) => {
            eprintln!("nbds3-compact: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}
