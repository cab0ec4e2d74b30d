//! `nbds3d`: serve block devices over NBD, stored log-structured in an object store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nbds3::cli::{check_conditional_put, CompressionArgs, StoreArgs};
use nbds3::log::compact::CompactConfig;
use nbds3::log::Geometry;
use nbds3::nbd::pool::PayloadPool;
use nbds3::nbd::server::{self, Listener, ServerLimits};
use nbds3::nbd::tls::TlsMode;
use nbds3::util::{parse_duration, parse_size};
use nbds3::volume::{Exports, ExportsConfig, VolumeConfig};

/// Temp files of interrupted puts older than this are removed at start (file store).
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// Resident memory allowed beyond the cache, dirty and upload budgets (code, runtime, index
/// of a small device, connection buffers) before freed heap memory is given back.
const RESIDENT_SLACK_BYTES: u64 = 64 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "nbds3d",
    version,
    about = "NBD server whose devices live in S3-compatible object storage"
)]
struct Cli {
    /// TCP address to listen on (repeatable). Default: 127.0.0.1:10809 unless --unix is given.
    #[arg(long)]
    listen: Vec<String>,
    /// Unix socket path to listen on.
    #[arg(long)]
    unix: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    compression: CompressionArgs,
    /// An S3 request that keeps failing (endpoint unreachable, 5xx, throttled) is retried
    /// for this long, then fails: a FLUSH waiting on it gets EIO and its data stays dirty
    /// for the next one. Keep it below the clients' own timeouts (an attempt already under
    /// way may still run to its own time limit).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    s3_retry_max: Duration,
    /// Size of exports created on first use (K/M/G/T).
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    default_size: u64,
    /// Block size of exports created on first use.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Page cache size, shared by all exports; the open exports' page indexes count toward it.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    cache_size: u64,
    /// Dirty (unflushed) data limit, shared by all exports; writers wait above it.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    dirty_max: u64,
    /// Longest time written data stays only in memory.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    flush_interval: Duration,
    /// A write that finds --dirty-max full waits for flushes to make room; once it has
    /// waited this long while flushes keep failing (the store is down), it gets EIO and
    /// its data is not taken (what is already dirty stays dirty). A slow store that still
    /// takes flushes never fails a write. 0s: wait as long as the outage lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    write_stall_max: Duration,
    /// Serve existing exports read-only; create nothing, write nothing.
    #[arg(long)]
    read_only: bool,
    /// Maximum simultaneous client connections.
    #[arg(long, default_value_t = 256)]
    connections_max: usize,
    /// WRITE payload and READ reply bytes all connections' in-flight requests may hold
    /// together (each connection is also limited to 128M); requests beyond it wait.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    inflight_bytes_max: u64,
    /// Run even if the store ignores conditional puts (unsafe with more than one writer).
    #[arg(long)]
    allow_unsafe_no_conditional_put: bool,
    /// Rewrite a segment once at least this share of its data is dead (0..=1).
    #[arg(long, default_value_t = 0.5)]
    compact_threshold: f64,
    /// Time between background compaction passes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    compact_interval: Duration,
    /// Stored bytes over live bytes above which compaction passes stop waiting for an idle
    /// export; above 1.5 × this, flushes wait for them (0: off). At least
    /// 1 / (1 − --compact-threshold).
    #[arg(long, default_value_t = 2.0)]
    compact_space_max: f64,
    /// Live bytes one compaction pass copies at most.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    compact_pass_bytes: u64,
    /// A compaction pass waits until the export has served no request for this long, but
    /// at most 6 compaction intervals (0s: passes do not wait).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    compact_idle: Duration,
    /// Time between garbage-collection passes.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    gc_interval: Duration,
    /// Manifest versions garbage collection always keeps.
    #[arg(long, default_value_t = 8)]
    gc_keep_versions: u64,
    /// Garbage collection keeps a state that was current this recently.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    gc_retain: Duration,
    /// Page-index memory of one export above which the compactor rewrites fragmented
    /// stretches into whole frames (default: a quarter of --cache-size).
    #[arg(long, value_parser = parse_size)]
    index_max: Option<u64>,
    /// Largest frame compaction cuts when a device is too large for --index-max at the
    /// writers' 128 KiB frames (up to 4M; a cold read fetches a whole frame).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    defrag_frame_max: u64,
    /// An export no connection has used for this long is flushed and closed: its flusher,
    /// lease, compactor and page index go, until a client opens it again. Bounds what
    /// exports opened once (any name creates one) keep costing in memory and store
    /// requests. 0s: keep exports open until shutdown.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    export_idle_close: Duration,
    /// Exports open at once, at most (each holds a page index, a flusher, a lease and a
    /// compactor): opening one more first closes the export unused the longest, and is
    /// refused while every open export has a connection.
    #[arg(long, default_value_t = 256)]
    exports_max: usize,
    /// How often a served export's lease object is rewritten (one PUT each), so offline
    /// tools can tell it is in use; it counts as stale after 4 intervals.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    lease_interval: Duration,
    /// Run no background compaction or garbage collection.
    #[arg(long)]
    no_compactor: bool,
    /// Server certificate chain (PEM, leaf first): enables NBD_OPT_STARTTLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With --tls-cert: `require` serves nothing before STARTTLS; `allow` also serves
    /// plain connections.
    #[arg(long, value_enum, default_value_t = TlsMode::Require)]
    tls: TlsMode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nbds3::util::init_stderr_logging("info");
    let cli = Cli::parse();
    let geometry = Geometry {
        size_bytes: cli.default_size,
        block_size: cli.block_size,
    };
    geometry
        .validate()
        .map_err(|e| anyhow::anyhow!("--default-size/--block-size: {e}"))?;

    let compact = (!cli.no_compactor && !cli.read_only).then(|| CompactConfig {
        dead_fraction_min: cli.compact_threshold,
        pass_interval: cli.compact_interval,
        pass_bytes_max: cli.compact_pass_bytes,
        pass_idle: cli.compact_idle,
        pass_idle_wait_max: cli.compact_interval.saturating_mul(6),
        index_runs_max: cli.index_max.map(nbds3::volume::index_runs_in),
        defrag_frame_bytes_max: usize::try_from(cli.defrag_frame_max).unwrap_or(usize::MAX),
        space_amp_max: (cli.compact_space_max != 0.0).then_some(cli.compact_space_max),
        gc_interval: cli.gc_interval,
        gc: nbds3::log::gc::GcConfig {
            keep_versions_min: cli.gc_keep_versions,
            retain_window: cli.gc_retain,
            ..Default::default()
        },
        ..CompactConfig::default()
    });
    if cli.lease_interval < Duration::from_secs(1) {
        anyhow::bail!("--lease-interval: at least 1s (each refresh is a PUT)");
    }
    if let Some(c) = &compact {
        c.validate()
            .map_err(|e| anyhow::anyhow!("--compact-*/--gc-*/--defrag-frame-max flags: {e}"))?;
    }

    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(
            nbds3::nbd::tls::load(cert, key, cli.tls_client_ca.as_deref(), cli.tls)
                .context("loading the TLS certificate")?,
        ),
        _ => None,
    };

    let s3 = cli.store.s3_options(cli.s3_retry_max);
    let store = nbds3::store::open_url(&cli.store.store, &s3)
        .await
        .context("opening the store")?;
    if !cli.read_only {
        check_conditional_put(&store, cli.allow_unsafe_no_conditional_put).await?;
        if let Some(dir) = cli.store.store.strip_prefix("file://") {
            // Leftovers of puts a crash interrupted; in the background, it walks the tree.
            if let Ok(fs) = nbds3::store::file::FileStore::open(dir) {
                tokio::task::spawn_blocking(move || {
                    match fs.sweep_stale_temp_files(STALE_TEMP_AGE) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "removed stale temp files"),
                        Err(e) => tracing::warn!(error = %e, "sweeping stale temp files failed"),
                    }
                });
            }
        }
    }

    let mut listeners = Vec::new();
    let mut addrs = cli.listen.clone();
    if addrs.is_empty() && cli.unix.is_none() {
        addrs.push("127.0.0.1:10809".into());
    }
    for a in &addrs {
        let l = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("listening on {a}"))?;
        listeners.push(Listener::Tcp(l));
    }
    if let Some(p) = &cli.unix {
        let _ = std::fs::remove_file(p);
        let l = tokio::net::UnixListener::bind(p)
            .with_context(|| format!("listening on {}", p.display()))?;
        listeners.push(Listener::Unix(l));
    }
    // Freed write buffers stay in the arena of the worker that allocated them; give them
    // back when the resident set passes what the budgets add up to (see `nbds3::memory`).
    let log_cfg = cli.compression.log_config();
    let uploads_bytes = (log_cfg.segment_bytes_max * log_cfg.uploads_in_flight_max) as u64;
    let resident_target = cli
        .cache_size
        .saturating_add(cli.dirty_max)
        .saturating_add(uploads_bytes)
        // A compaction pass holds the live blocks it copies and the segments it builds.
        .saturating_add(
            compact
                .as_ref()
                .map_or(0, |c| c.pass_bytes_max.saturating_add(uploads_bytes)),
        )
        .saturating_add(RESIDENT_SLACK_BYTES);
    // Write payload buffers are recycled: free ones plus those in the dirty set stay near
    // the dirty bound, which the resident target counts; above the target the trimmer
    // empties the pool first. The volumes and the page cache give buffers back when they
    // let go of them (see `nbds3::nbd::pool`).
    let payload_pool = PayloadPool::new(usize::try_from(cli.dirty_max).unwrap_or(usize::MAX));
    let exports = Exports::new(
        Arc::clone(&store),
        ExportsConfig {
            default_geometry: geometry,
            log: log_cfg,
            volume: VolumeConfig {
                cache_bytes_max: cli.cache_size,
                dirty_bytes_max: cli.dirty_max,
                flush_interval: cli.flush_interval,
                write_stall_max: (!cli.write_stall_max.is_zero()).then_some(cli.write_stall_max),
                lease_interval: cli.lease_interval,
                payload_pool: Some(Arc::clone(&payload_pool)),
                ..VolumeConfig::default()
            },
            read_only: cli.read_only,
            compact,
            idle_close: (!cli.export_idle_close.is_zero()).then_some(cli.export_idle_close),
            exports_max: Some(cli.exports_max.max(1)),
        },
    );
    exports.start_idle_closer();
    nbds3::memory::pin_mmap_threshold(nbds3::memory::MMAP_THRESHOLD_BYTES);
    let pool = Arc::clone(&payload_pool);
    nbds3::memory::spawn_trimmer(
        resident_target,
        nbds3::memory::TRIM_FREE_BYTES_MIN,
        nbds3::memory::TRIM_CHECK_INTERVAL,
        Some(Arc::new(move || pool.release_free())),
    );
    tracing::info!(
        resident_target_mib = resident_target >> 20,
        listen = ?addrs,
        unix = ?cli.unix,
        store = %store.describe(),
        read_only = cli.read_only,
        tls = tls.as_ref().map_or("off", |t| t.describe()),
        "nbds3d listening"
    );
    // SIGHUP: load the TLS certificate, key and client CA again (renewed certificates are
    // served without a restart; see `nbds3::nbd::tls`). Installed without TLS too, so a
    // stray SIGHUP (a closed terminal) no longer kills the daemon with data unflushed.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let reloadable = tls.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &reloadable {
                None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
                Some(t) => match t.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "SIGHUP: reloading the TLS certificate failed; still serving the old one"
                    ),
                },
            }
        }
    });
    let limits = ServerLimits {
        connections_max: cli.connections_max,
        request_bytes_in_flight_total_max: usize::try_from(cli.inflight_bytes_max)
            .unwrap_or(usize::MAX),
        payload_pool: Some(payload_pool),
        tls,
        ..ServerLimits::default()
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    };
    server::run(listeners, exports.clone(), limits, shutdown)
        .await
        .context("serving")?;
    // Every in-flight request has finished; now make all written data durable. If the
    // store is down, keep trying: exiting would drop the unflushed writes. A second
    // SIGINT/SIGTERM gives up (and the exit status says so).
    let give_up = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: giving up on the final flush");
    };
    exports
        .close_all_retrying(give_up)
        .await
        .map_err(|e| anyhow::anyhow!("final flush failed, data not durable: {e}"))?;
    tracing::info!("all exports flushed; exiting");
    Ok(())
}
