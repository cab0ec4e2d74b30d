//! Command-line pieces shared by the binaries: how to name and open a store, and how
//! segment frames are compressed.

use std::sync::Arc;

use clap::Args;

use crate::log::LogConfig;
use crate::store::{self, s3::S3Options, DynStore};

/// Where objects live. Without `--store`, the embedded default: a local directory.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Object store: `file://DIR` (embedded default) or `s3://BUCKET[/PREFIX]`.
    #[arg(long, env = "NBDS3_STORE", default_value = "file://nbds3-data")]
    pub store: String,
    /// S3 endpoint URL (MinIO, Garage, SeaweedFS, R2 …); default: AWS.
    #[arg(long, env = "NBDS3_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default from the AWS config chain, else us-east-1).
    #[arg(long, env = "NBDS3_S3_REGION")]
    pub s3_region: Option<String>,
    /// Use path-style S3 URLs (needed by most self-hosted servers).
    #[arg(long, env = "NBDS3_S3_PATH_STYLE")]
    pub s3_path_style: bool,
}

impl StoreArgs {
    /// The S3 options these flags give, with a failing request retried for `retry_max`
    /// (each binary has its own `--s3-retry-max` default).
    pub fn s3_options(&self, retry_max: std::time::Duration) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            retry_max_elapsed: retry_max,
            ..S3Options::default()
        }
    }
}

/// How segment frames are stored: `--compression` and `--zstd-level`, shared by the daemon
/// and `nbds3-compact` (whose rewritten frames follow the same policy).
#[derive(Debug, Clone, Args)]
pub struct CompressionArgs {
    /// Segment frame compression: `zstd` keeps a frame compressed when that saves at
    /// least 1/8 of it; `off` stores every frame raw (less CPU per byte written, more
    /// bytes stored). Readers accept both, so this can change at any restart.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,
    /// zstd level for segment frames (-7 fastest ... 19 smallest).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub zstd_level: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Zstd,
    Off,
}

impl CompressionArgs {
    /// The level for `LogConfig::zstd_level`: `None` when compression is off.
    pub fn zstd_level(&self) -> Option<i32> {
        match self.compression {
            Compression::Zstd => Some(self.zstd_level),
            Compression::Off => None,
        }
    }

    /// The log's defaults with this compression policy.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            zstd_level: self.zstd_level(),
            ..LogConfig::default()
        }
    }
}

/// Refuse stores that ignore conditional puts (fencing and commit atomicity depend on
/// them) unless the operator explicitly accepts the risk.
pub async fn check_conditional_put(store: &DynStore, allow_unsafe: bool) -> anyhow::Result<()> {
    let honoured = store::probe_if_absent(store.as_ref(), "probe")
        .await
        .map_err(|e| anyhow::anyhow!("probing conditional-put support failed: {e}"))?;
    if !honoured {
        if allow_unsafe {
            tracing::warn!(store = %store.describe(), "store IGNORES If-None-Match; running anyway because --allow-unsafe-no-conditional-put was given: two writers on one export can now lose data");
        } else {
            anyhow::bail!(
                "store {} ignores conditional puts (If-None-Match: *); nbds3 cannot guarantee a single writer or atomic commits on it. Use a store that supports them (AWS S3, MinIO, SeaweedFS, R2), or pass --allow-unsafe-no-conditional-put if only one daemon will ever write",
                store.describe()
            );
        }
    }
    Ok(())
}

/// Keep `Arc` imported for binaries that build on this module.
pub type SharedStore = Arc<dyn store::ObjectStore>;
