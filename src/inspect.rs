//! The engine of `nbds3-inspect`: list, decode and verify everything nbds3 keeps in a
//! store, without ever writing to it.
//!
//! Job: for a store (and an export in it) produce serde-serializable reports — the exports
//! present, an export's manifest versions, one manifest decoded, its segments with live-byte
//! accounting (optionally per frame), the block map, and a full verification that reads
//! every object the chosen manifest reaches and lists the objects nothing reaches.
//! Each report also renders itself as aligned text; the binary is a thin CLI over this.
//!
//! Invariants:
//! - Read-only: stores are wrapped in [`ReadOnlyStore`], whose `put`/`delete` fail without
//!   touching the inner store, and `file://` stores must already exist (opening one never
//!   creates a directory). Nothing here calls a writing API of the log layer.
//! - Nothing read from the store is trusted: every object is decoded by `format` (magic,
//!   version, crc, bounded lengths) and a failure becomes an [`InspectError::Corrupt`] (or,
//!   in `verify`, a [`Problem`] naming the key and, where known, the byte offset); nothing
//!   here panics on stored data.
//! - `verify` separates "the data is wrong" (problems: exit 1) from "the store could not be
//!   read" ([`InspectError::Store`]: exit 4); a missing object that a manifest names is a
//!   problem, a failed request is not.
//! - Memory is bounded: segments are downloaded whole only in `verify`/`segment`, at most
//!   [`SEGMENTS_IN_FLIGHT_MAX`] at once and each at most [`SEGMENT_BYTES_MAX`]; problem lists
//!   stop growing at [`PROBLEMS_MAX`] (the rest are counted).
//!
//! Exit codes (see [`InspectError::exit_code`]): 0 ok, 1 verify found problems, 2 usage,
//! 3 no such export/version/segment, 4 store unreachable or failing, 5 corrupt object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::format::{
    self, Checkpoint, DirEntry, EntryKind, ExportKeys, Manifest, SegmentRef, EXPORTS_PREFIX,
    SEGMENT_FOOTER_BYTES,
};
use crate::log::index::{Index, Val};
use crate::log::{self, LogError};
use crate::store::s3::S3Options;
use crate::store::{
    self, list_all, DynStore, ListPage, ObjectMeta, ObjectStore, PutMode, StoreError, StoreResult,
};

/// Exit status: everything fine.
pub const EXIT_OK: i32 = 0;
/// Exit status: `verify` found problems (they are in the report).
pub const EXIT_PROBLEMS: i32 = 1;
/// Exit status: bad command line or argument.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no such export, manifest version or segment.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit status: the store could not be reached or failed a request.
pub const EXIT_STORE: i32 = 4;
/// Exit status: an object needed to answer is corrupt or missing.
pub const EXIT_CORRUPT: i32 = 5;

/// Whole segments downloaded at once by `verify`.
pub const SEGMENTS_IN_FLIGHT_MAX: usize = 4;
/// Largest segment `verify` downloads whole; larger ones are reported, not read.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// Manifests (small objects) fetched at once.
const MANIFESTS_IN_FLIGHT_MAX: usize = 16;
/// Problems a report lists; further ones are only counted.
pub const PROBLEMS_MAX: usize = 1000;
/// Segment directories fetched at once for `segments --frames`.
const DIRECTORIES_IN_FLIGHT_MAX: usize = 8;
/// Store-level prefix where `cli::check_conditional_put` probes (leftovers are orphans).
const ROOT_PROBE_PREFIX: &str = "probe/";

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no such export {export:?}")]
    NoSuchExport { export: String },
    #[error("export {export:?} has no manifest version {version} (present: {present})")]
    NoSuchVersion {
        export: String,
        version: u64,
        present: String,
    },
    #[error("export {export:?} has no segment {id}")]
    NoSuchSegment { export: String, id: u64 },
    #[error("{key}: corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl InspectError {
    /// The process exit status for this error (module doc lists them).
    pub fn exit_code(&self) -> i32 {
        match self {
            InspectError::NoSuchExport { .. }
            | InspectError::NoSuchVersion { .. }
            | InspectError::NoSuchSegment { .. } => EXIT_NOT_FOUND,
            InspectError::Corrupt { .. } => EXIT_CORRUPT,
            InspectError::Store(_) | InspectError::Internal(_) => EXIT_STORE,
            InspectError::Invalid(_) => EXIT_USAGE,
        }
    }

    /// Short machine-readable name, for JSON error documents.
    pub fn kind(&self) -> &'static str {
        match self {
            InspectError::NoSuchExport { .. } => "no_such_export",
            InspectError::NoSuchVersion { .. } => "no_such_version",
            InspectError::NoSuchSegment { .. } => "no_such_segment",
            InspectError::Corrupt { .. } => "corrupt",
            InspectError::Store(_) => "store",
            InspectError::Invalid(_) => "invalid",
            InspectError::Internal(_) => "internal",
        }
    }
}

impl From<LogError> for InspectError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Store(StoreError::NotFound { key }) | LogError::MissingObject { key } => {
                InspectError::Corrupt {
                    key,
                    reason: "missing object (a manifest names it)".into(),
                }
            }
            LogError::Store(s) => InspectError::Store(s),
            LogError::Format { key, source } => InspectError::Corrupt {
                key,
                reason: source.to_string(),
            },
            LogError::Corrupt { key, reason } => InspectError::Corrupt { key, reason },
            LogError::NoSuchExport { export } => InspectError::NoSuchExport { export },
            LogError::Invalid(s) => InspectError::Invalid(s),
            other => InspectError::Internal(other.to_string()),
        }
    }
}

pub type InspectResult<T> = Result<T, InspectError>;

// ---------------------------------------------------------------------------------------
// Read-only store guard.

/// Wraps a store so that every write fails before reaching it: the inspector's promise
/// never to modify a store does not depend on the rest of the code being careful.
#[derive(Debug)]
pub struct ReadOnlyStore {
    inner: DynStore,
}

impl ReadOnlyStore {
    pub fn wrap(inner: DynStore) -> DynStore {
        Arc::new(Self { inner })
    }

    fn refuse(op: &str, key: &str) -> StoreError {
        StoreError::Permanent {
            key: key.to_string(),
            reason: format!("{op} refused: nbds3-inspect opens stores read-only"),
        }
    }
}

#[async_trait]
impl ObjectStore for ReadOnlyStore {
    async fn put(&self, key: &str, _data: Bytes, _mode: PutMode) -> StoreResult<()> {
        Err(Self::refuse("put", key))
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
        Err(Self::refuse("delete", key))
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        Err(Self::refuse(
            "delete",
            keys.first().map(String::as_str).unwrap_or(""),
        ))
    }
    fn describe(&self) -> String {
        format!("{} (read-only)", self.inner.describe())
    }
}

/// Open a store by URL for inspection, wrapped read-only. A `file://` directory must
/// already exist (the file backend would otherwise create it).
pub async fn open_store(url: &str, s3: &S3Options) -> InspectResult<DynStore> {
    if let Some(dir) = url.strip_prefix("file://") {
        if !std::path::Path::new(dir).is_dir() {
            return Err(InspectError::Store(StoreError::Permanent {
                key: url.to_string(),
                reason: "store directory does not exist".into(),
            }));
        }
    }
    let inner = store::open_url(url, s3).await?;
    Ok(ReadOnlyStore::wrap(inner))
}

// ---------------------------------------------------------------------------------------
// What is stored under one export.

/// Objects under one export root, classified by key.
#[derive(Debug, Default, Clone)]
struct Inventory {
    manifests: BTreeMap<u64, u64>,
    segments: BTreeMap<u64, u64>,
    checkpoints: BTreeMap<u64, u64>,
    probes: Vec<ObjectMeta>,
    /// The writer lease (advisory heartbeat of a serving daemon), if present.
    lease: Option<ObjectMeta>,
    other: Vec<ObjectMeta>,
}

impl Inventory {
    fn from_objects(keys: &ExportKeys, objects: Vec<ObjectMeta>) -> Self {
        let (mp, sp, cp, pp) = (
            keys.manifest_prefix(),
            keys.segment_prefix(),
            keys.checkpoint_prefix(),
            keys.probe_prefix(),
        );
        let lease_key = keys.lease();
        let mut inv = Inventory::default();
        for o in objects {
            if let Some(v) = format::parse_numbered_key(&mp, &o.key) {
                inv.manifests.insert(v, o.size_bytes);
            } else if let Some(id) = format::parse_numbered_key(&sp, &o.key) {
                inv.segments.insert(id, o.size_bytes);
            } else if let Some(id) = format::parse_numbered_key(&cp, &o.key) {
                inv.checkpoints.insert(id, o.size_bytes);
            } else if o.key.starts_with(&pp) {
                inv.probes.push(o);
            } else if o.key == lease_key {
                inv.lease = Some(o);
            } else {
                inv.other.push(o);
            }
        }
        inv
    }

    fn bytes(&self) -> u64 {
        self.manifests.values().sum::<u64>()
            + self.segments.values().sum::<u64>()
            + self.checkpoints.values().sum::<u64>()
            + self.probes.iter().map(|o| o.size_bytes).sum::<u64>()
            + self.lease.as_ref().map_or(0, |o| o.size_bytes)
            + self.other.iter().map(|o| o.size_bytes).sum::<u64>()
    }

    fn latest(&self) -> Option<u64> {
        self.manifests.keys().next_back().copied()
    }
}

/// An export found in the store, with its objects listed once.
struct Export {
    name: String,
    keys: ExportKeys,
    inv: Inventory,
}

impl Export {
    async fn resolve(store: &DynStore, name: &str) -> InspectResult<Export> {
        let keys = ExportKeys::new(name).map_err(|e| InspectError::Invalid(e.to_string()))?;
        let objects = list_all(store.as_ref(), &keys.root).await?;
        let inv = Inventory::from_objects(&keys, objects);
        if inv.manifests.is_empty() {
            return Err(InspectError::NoSuchExport {
                export: name.to_string(),
            });
        }
        Ok(Export {
            name: name.to_string(),
            keys,
            inv,
        })
    }

    fn latest(&self) -> u64 {
        self.inv.latest().unwrap_or(0)
    }

    /// `version`, or the latest, checked to exist.
    fn pick(&self, version: Option<u64>) -> InspectResult<u64> {
        let v = version.unwrap_or_else(|| self.latest());
        if !self.inv.manifests.contains_key(&v) {
            return Err(InspectError::NoSuchVersion {
                export: self.name.clone(),
                version: v,
                present: version_ranges(self.inv.manifests.keys().copied()),
            });
        }
        Ok(v)
    }

    /// Read and decode one manifest; it must belong to this export (not a hash twin).
    async fn manifest(&self, store: &DynStore, v: u64) -> InspectResult<Manifest> {
        let m = log::read_manifest(store, &self.keys, v)
            .await
            .map_err(|e| match e {
                LogError::Store(StoreError::NotFound { .. }) => InspectError::NoSuchVersion {
                    export: self.name.clone(),
                    version: v,
                    present: "(it vanished while reading: GC running?)".into(),
                },
                other => other.into(),
            })?;
        check_manifest_belongs(&m, &self.name, &self.keys.manifest(v))?;
        Ok(m)
    }
}

fn check_manifest_belongs(m: &Manifest, name: &str, key: &str) -> InspectResult<()> {
    if m.export_name != name {
        return Err(InspectError::Corrupt {
            key: key.to_string(),
            reason: format!(
                "manifest belongs to export {:?} (key collision)",
                m.export_name
            ),
        });
    }
    Ok(())
}

/// "1-3, 7, 9-12" for a sorted sequence of versions.
fn version_ranges(vs: impl Iterator<Item = u64>) -> String {
    let mut out = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for v in vs {
        run = match run {
            Some((a, b)) if b + 1 == v => Some((a, v)),
            Some((a, b)) => {
                out.push(if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                });
                Some((v, v))
            }
            None => Some((v, v)),
        };
    }
    if let Some((a, b)) = run {
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

// ---------------------------------------------------------------------------------------
// exports

#[derive(Debug, Clone, Serialize)]
pub struct ExportsReport {
    pub store: String,
    pub exports: Vec<ExportRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportRow {
    /// The export name from the latest manifest (or decoded from a plain key when no
    /// manifest is readable); `None` when unknown.
    pub name: Option<String>,
    /// The key component under `exports/` (`n…` plain, `h…` hashed).
    pub key: String,
    pub hashed_key: bool,
    pub version: Option<u64>,
    pub size_bytes: Option<u64>,
    pub block_size: Option<u32>,
    pub writer_epoch: Option<u64>,
    pub updated_unix_ms: Option<u64>,
    pub manifests: usize,
    pub segments: usize,
    pub checkpoints: usize,
    pub other_objects: usize,
    /// Every byte stored under the export (including orphans).
    pub bytes_stored: u64,
    /// The writer lease: whether a daemon is serving the export.
    pub lease: Option<LeaseView>,
    /// Why the latest manifest could not be read, when it could not.
    pub error: Option<String>,
}

/// The advisory writer lease a serving daemon refreshes (`exports/<key>/lease`).
#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    pub key: String,
    pub holder: Option<String>,
    pub epoch: Option<u64>,
    pub renewed_unix_ms: Option<u64>,
    /// Milliseconds since the last refresh (0 when stamped in the future).
    pub age_ms: Option<u64>,
    /// Live for this long after each refresh (4 × the holder's `--lease-interval`).
    pub ttl_ms: Option<u64>,
    /// Refreshed within its ttl: a daemon is (probably) serving the export right now.
    pub live: bool,
    /// Why it could not be decoded.
    pub error: Option<String>,
}

impl LeaseView {
    fn short(&self) -> String {
        match (&self.error, self.live) {
            (Some(_), _) => "unreadable".into(),
            (None, true) => format!("live {}", self.holder.as_deref().unwrap_or("?")),
            (None, false) => "expired".into(),
        }
    }
}

/// Read the lease when the listing showed one; `None` if it vanished meanwhile.
async fn read_lease(store: &DynStore, inv: &Inventory) -> InspectResult<Option<LeaseView>> {
    let Some(o) = &inv.lease else {
        return Ok(None);
    };
    let body = match store.get(&o.key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut v = LeaseView {
        key: o.key.clone(),
        holder: None,
        epoch: None,
        renewed_unix_ms: None,
        age_ms: None,
        ttl_ms: None,
        live: false,
        error: None,
    };
    match log::lease::decode_lease(&body) {
        Ok(l) => {
            let now = crate::util::unix_ms_now();
            v.live = l.renewed_unix_ms.saturating_add(l.ttl_ms) > now;
            v.age_ms = Some(now.saturating_sub(l.renewed_unix_ms));
            v.ttl_ms = Some(l.ttl_ms);
            v.holder = Some(l.holder);
            v.epoch = Some(l.epoch);
            v.renewed_unix_ms = Some(l.renewed_unix_ms);
        }
        Err(e) => v.error = Some(e.to_string()),
    }
    Ok(Some(v))
}

/// Every export in the store, from one listing plus its latest manifest each.
pub async fn exports(store: &DynStore) -> InspectResult<ExportsReport> {
    let all = list_all(store.as_ref(), EXPORTS_PREFIX).await?;
    let mut groups: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for o in all {
        let rest = &o.key[EXPORTS_PREFIX.len()..];
        let key = rest.split('/').next().unwrap_or("").to_string();
        groups.entry(key).or_default().push(o);
    }
    let rows: Vec<ExportRow> = futures::stream::iter(groups)
        .map(|(key, objects)| async move {
            let keys = ExportKeys {
                root: format!("{EXPORTS_PREFIX}{key}/"),
            };
            let inv = Inventory::from_objects(&keys, objects);
            let plain_name = format::export_name_from_key(&key);
            let mut row = ExportRow {
                name: plain_name.clone(),
                hashed_key: key.starts_with('h'),
                key,
                version: inv.latest(),
                size_bytes: None,
                block_size: None,
                writer_epoch: None,
                updated_unix_ms: None,
                manifests: inv.manifests.len(),
                segments: inv.segments.len(),
                checkpoints: inv.checkpoints.len(),
                other_objects: inv.probes.len()
                    + inv.other.len()
                    + usize::from(inv.lease.is_some()),
                bytes_stored: inv.bytes(),
                lease: read_lease(store, &inv).await?,
                error: None,
            };
            let Some(v) = inv.latest() else {
                row.error = Some("no manifest (not an export, or only leftovers)".into());
                return Ok(row);
            };
            match log::read_manifest(store, &keys, v).await {
                Ok(m) => {
                    if plain_name.as_ref().is_some_and(|n| *n != m.export_name) {
                        row.error = Some(format!(
                            "manifest names export {:?}, key says {:?}",
                            m.export_name,
                            plain_name.unwrap_or_default()
                        ));
                    }
                    row.name = Some(m.export_name);
                    row.size_bytes = Some(m.size_bytes);
                    row.block_size = Some(m.block_size);
                    row.writer_epoch = Some(m.writer_epoch);
                    row.updated_unix_ms = Some(m.created_unix_ms);
                }
                Err(LogError::Store(StoreError::NotFound { key })) => {
                    row.error = Some(format!("{key}: vanished while reading (GC running?)"));
                }
                Err(LogError::Store(e)) => return Err(InspectError::Store(e)),
                Err(e) => row.error = Some(e.to_string()),
            }
            Ok::<_, InspectError>(row)
        })
        .buffered(MANIFESTS_IN_FLIGHT_MAX)
        .try_collect()
        .await?;
    Ok(ExportsReport {
        store: store.describe(),
        exports: rows,
    })
}

// ---------------------------------------------------------------------------------------
// manifests

#[derive(Debug, Clone, Serialize)]
pub struct ManifestsReport {
    pub export: String,
    pub root: String,
    pub latest: u64,
    /// The latest manifest's `gc_low_water`: versions below it are not retained.
    pub gc_low_water: Option<u64>,
    pub versions: Vec<ManifestRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManifestRow {
    pub version: u64,
    pub object_bytes: u64,
    /// At or above the latest manifest's `gc_low_water`.
    pub retained: bool,
    pub writer_epoch: Option<u64>,
    pub created_unix_ms: Option<u64>,
    pub created: Option<String>,
    pub checkpoint: Option<u64>,
    pub tail_segments: Option<usize>,
    pub tail_bytes: Option<u64>,
    pub gc_low_water: Option<u64>,
    pub error: Option<String>,
}

/// Every manifest version present under the export, decoded.
pub async fn manifests(store: &DynStore, export: &str) -> InspectResult<ManifestsReport> {
    let exp = Export::resolve(store, export).await?;
    let decoded = read_all_manifests(store, &exp).await?;
    let latest = exp.latest();
    let low = decoded
        .get(&latest)
        .and_then(|r| r.as_ref().ok())
        .map(|m| m.gc_low_water);
    let versions = exp
        .inv
        .manifests
        .iter()
        .map(|(&v, &size)| {
            let mut row = ManifestRow {
                version: v,
                object_bytes: size,
                retained: low.is_none_or(|l| v >= l),
                writer_epoch: None,
                created_unix_ms: None,
                created: None,
                checkpoint: None,
                tail_segments: None,
                tail_bytes: None,
                gc_low_water: None,
                error: None,
            };
            match decoded.get(&v) {
                Some(Ok(m)) => {
                    row.writer_epoch = Some(m.writer_epoch);
                    row.created_unix_ms = Some(m.created_unix_ms);
                    row.created = Some(format_unix_ms(m.created_unix_ms));
                    row.checkpoint = m.checkpoint.map(|c| c.id);
                    row.tail_segments = Some(m.tail.len());
                    row.tail_bytes = Some(m.tail.iter().map(|s| s.size_bytes).sum());
                    row.gc_low_water = Some(m.gc_low_water);
                }
                Some(Err(e)) => row.error = Some(e.clone()),
                None => row.error = Some("deleted while reading (GC at work)".into()),
            }
            row
        })
        .collect();
    Ok(ManifestsReport {
        export: exp.name.clone(),
        root: exp.keys.root.clone(),
        latest,
        gc_low_water: low,
        versions,
    })
}

/// Decode every listed manifest; per-version decode errors are values, store errors abort.
/// Versions deleted since the listing (GC at work) are left out.
async fn read_all_manifests(
    store: &DynStore,
    exp: &Export,
) -> InspectResult<BTreeMap<u64, Result<Manifest, String>>> {
    let pairs: Vec<Option<(u64, Result<Manifest, String>)>> =
        futures::stream::iter(exp.inv.manifests.keys().copied())
            .map(|v| async move {
                let key = exp.keys.manifest(v);
                let r = match log::read_manifest(store, &exp.keys, v).await {
                    Ok(m) if m.export_name != exp.name => Err(format!(
                        "{key}: manifest belongs to export {:?} (key collision)",
                        m.export_name
                    )),
                    Ok(m) => Ok(m),
                    Err(LogError::Store(StoreError::NotFound { .. })) => return Ok(None),
                    Err(LogError::Store(e)) => return Err(InspectError::Store(e)),
                    Err(e) => Err(e.to_string()),
                };
                Ok(Some((v, r)))
            })
            .buffered(MANIFESTS_IN_FLIGHT_MAX)
            .try_collect()
            .await?;
    Ok(pairs.into_iter().flatten().collect())
}

// ---------------------------------------------------------------------------------------
// manifest

#[derive(Debug, Clone, Serialize)]
pub struct ManifestReport {
    pub export: String,
    pub key: String,
    pub object_bytes: u64,
    pub latest: u64,
    pub created: String,
    pub manifest: Manifest,
    pub checkpoint: Option<CheckpointSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub key: String,
    pub id: u64,
    pub object_bytes: u64,
    pub version: Option<u64>,
    pub segments: Option<usize>,
    pub extents: Option<usize>,
    pub mapped_blocks: Option<u64>,
    pub error: Option<String>,
}

/// One manifest (the latest, or `version`), decoded, with a summary of its checkpoint.
pub async fn manifest(
    store: &DynStore,
    export: &str,
    version: Option<u64>,
) -> InspectResult<ManifestReport> {
    let exp = Export::resolve(store, export).await?;
    let v = exp.pick(version)?;
    let m = exp.manifest(store, v).await?;
    let checkpoint = match m.checkpoint {
        None => None,
        Some(c) => {
            let key = exp.keys.checkpoint(c.id);
            let mut s = CheckpointSummary {
                key: key.clone(),
                id: c.id,
                object_bytes: c.size_bytes,
                version: None,
                segments: None,
                extents: None,
                mapped_blocks: None,
                error: None,
            };
            match read_checkpoint(store, &key).await {
                Ok(Ok(ck)) => {
                    s.version = Some(ck.version);
                    s.segments = Some(ck.segments.len());
                    s.extents = Some(ck.extents.len());
                    s.mapped_blocks = Some(ck.extents.iter().map(|e| e.blocks).sum());
                }
                Ok(Err(bad)) => s.error = Some(bad.reason),
                Err(e) => return Err(e),
            }
            Some(s)
        }
    };
    Ok(ManifestReport {
        export: exp.name.clone(),
        key: exp.keys.manifest(v),
        object_bytes: exp.inv.manifests.get(&v).copied().unwrap_or(0),
        latest: exp.latest(),
        created: format_unix_ms(m.created_unix_ms),
        manifest: m,
        checkpoint,
    })
}

/// Something wrong with one object, found while reading it.
#[derive(Debug, Clone)]
struct Bad {
    offset: Option<u64>,
    reason: String,
}

/// Fetch and decode a checkpoint: `Err` only for store failures; missing or corrupt is
/// `Ok(Err(Bad))`.
async fn read_checkpoint(store: &DynStore, key: &str) -> InspectResult<Result<Checkpoint, Bad>> {
    let body = match store.get(key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Ok(Err(Bad {
                offset: None,
                reason: "missing object (a manifest names it)".into(),
            }))
        }
        Err(e) => return Err(e.into()),
    };
    let r = tokio::task::spawn_blocking(move || format::decode_checkpoint(&body))
        .await
        .map_err(|e| InspectError::Internal(e.to_string()))?;
    Ok(r.map_err(|e| Bad {
        offset: format_error_offset(&e),
        reason: e.to_string(),
    }))
}

fn format_error_offset(e: &format::FormatError) -> Option<u64> {
    match e {
        format::FormatError::ChecksumMismatch { offset, .. } => Some(*offset),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// segments

#[derive(Debug, Clone, Serialize)]
pub struct SegmentsReport {
    pub export: String,
    pub version: u64,
    pub block_size: u32,
    pub segments: Vec<SegmentRow>,
    pub total: SegmentTotals,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SegmentTotals {
    pub segments: usize,
    pub size_bytes: u64,
    pub blocks_total: u64,
    pub blocks_live: u64,
    pub live_bytes_estimate: u64,
    pub dead_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentRow {
    pub id: u64,
    pub key: String,
    /// Writer epoch that wrote it (high 32 bits of the id).
    pub epoch: u64,
    /// "checkpoint" (listed by the manifest's checkpoint) or "tail" (replayed after it).
    pub source: &'static str,
    pub size_bytes: u64,
    pub blocks_total: u64,
    pub blocks_live: u64,
    pub live_bytes_estimate: u64,
    pub dead_fraction: f64,
    /// Directory entries, with `--frames`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<Vec<FrameRow>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrameRow {
    /// "data", "unmap" or "zero_alloc".
    pub kind: &'static str,
    pub lba: u64,
    pub blocks: u64,
    /// Offset of the frame header in the segment (data only).
    pub frame_offset: Option<u64>,
    /// Header + payload bytes (data only).
    pub frame_len: Option<u32>,
    /// Blocks of this frame the index still maps (data only).
    pub live_blocks: Option<u64>,
    /// Whether the payload is zstd-compressed (only when the frame was read whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// What is wrong with the frame, when it was read whole and failed its checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Data => "data",
        EntryKind::Unmap => "unmap",
        EntryKind::ZeroAlloc => "zero_alloc",
    }
}

/// Load the index a manifest describes (read-only; same code the daemon opens with).
async fn index_at(store: &DynStore, exp: &Export, m: &Manifest) -> InspectResult<Index> {
    let (idx, _) = log::load_index(store, &exp.keys, m, DIRECTORIES_IN_FLIGHT_MAX).await?;
    Ok(idx)
}

/// Live blocks per (segment, frame offset) according to the index.
fn live_by_frame(idx: &Index) -> HashMap<(u64, u64), u64> {
    let mut out: HashMap<(u64, u64), u64> = HashMap::new();
    for (_, len, v) in idx.map.iter() {
        if let Val::Frame {
            seg, frame_offset, ..
        } = *v
        {
            *out.entry((seg, frame_offset)).or_default() += len;
        }
    }
    out
}

/// Every segment the manifest's index knows, with live-byte accounting; with `frames`,
/// each segment's directory too (one ranged GET of its tail each).
pub async fn segments(
    store: &DynStore,
    export: &str,
    version: Option<u64>,
    frames: bool,
) -> InspectResult<SegmentsReport> {
    let exp = Export::resolve(store, export).await?;
    let v = exp.pick(version)?;
    let m = exp.manifest(store, v).await?;
    let idx = index_at(store, &exp, &m).await?;
    let tail: BTreeSet<u64> = m.tail.iter().map(|s| s.id).collect();
    let mut stats: Vec<(u64, crate::log::index::SegStat)> =
        idx.segs.iter().map(|(&id, &s)| (id, s)).collect();
    stats.sort_by_key(|(id, _)| *id);
    let dirs: Vec<Option<Vec<DirEntry>>> = if frames {
        futures::stream::iter(stats.iter().map(|(id, s)| SegmentRef {
            id: *id,
            size_bytes: s.size_bytes,
        }))
        .map(|sref| {
            let keys = &exp.keys;
            async move {
                log::read_segment_directory(store, keys, sref)
                    .await
                    .map(Some)
            }
        })
        .buffered(DIRECTORIES_IN_FLIGHT_MAX)
        .try_collect()
        .await?
    } else {
        vec![None; stats.len()]
    };
    let live = live_by_frame(&idx);
    let mut total = SegmentTotals::default();
    let mut rows = Vec::with_capacity(stats.len());
    for ((id, s), dir) in stats.into_iter().zip(dirs) {
        total.segments += 1;
        total.size_bytes += s.size_bytes;
        total.blocks_total += s.blocks_total;
        total.blocks_live += s.blocks_live;
        total.live_bytes_estimate += s.live_bytes_estimate();
        rows.push(SegmentRow {
            id,
            key: exp.keys.segment(id),
            epoch: format::epoch_of_id(id),
            source: if tail.contains(&id) {
                "tail"
            } else {
                "checkpoint"
            },
            size_bytes: s.size_bytes,
            blocks_total: s.blocks_total,
            blocks_live: s.blocks_live,
            live_bytes_estimate: s.live_bytes_estimate(),
            dead_fraction: s.dead_fraction(),
            frames: dir.map(|d| frame_rows(id, &d, &live, None)),
        });
    }
    total.dead_fraction = if total.blocks_total == 0 {
        0.0
    } else {
        1.0 - total.blocks_live as f64 / total.blocks_total as f64
    };
    Ok(SegmentsReport {
        export: exp.name.clone(),
        version: v,
        block_size: m.block_size,
        segments: rows,
        total,
    })
}

fn frame_rows(
    seg: u64,
    dir: &[DirEntry],
    live: &HashMap<(u64, u64), u64>,
    scan: Option<&SegmentScan>,
) -> Vec<FrameRow> {
    dir.iter()
        .map(|e| {
            let data = e.kind == EntryKind::Data;
            let info = scan
                .and_then(|s| s.frames.get(&e.frame_offset))
                .filter(|_| data);
            FrameRow {
                kind: kind_name(e.kind),
                lba: e.lba,
                blocks: e.blocks,
                frame_offset: data.then_some(e.frame_offset),
                frame_len: data.then_some(e.frame_len),
                live_blocks: data.then(|| live.get(&(seg, e.frame_offset)).copied().unwrap_or(0)),
                compressed: info.and_then(|f| f.compressed),
                error: info.and_then(|f| f.error.clone()),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// segment (one, read whole)

#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub export: String,
    pub id: u64,
    pub key: String,
    pub epoch: u64,
    pub size_bytes: u64,
    /// Manifest version whose index the live counts come from.
    pub version: u64,
    /// Whether that manifest reaches this segment.
    pub reachable: bool,
    pub block_size: Option<u32>,
    pub footer_epoch: Option<u64>,
    pub blocks_total: u64,
    pub blocks_live: u64,
    pub frames: Vec<FrameRow>,
    pub problems: Vec<Problem>,
}

/// One segment downloaded whole and checked frame by frame, its directory listed with the
/// live blocks of each frame under `version` (latest by default). Works for orphans too.
pub async fn segment(
    store: &DynStore,
    export: &str,
    id: u64,
    version: Option<u64>,
) -> InspectResult<SegmentReport> {
    let exp = Export::resolve(store, export).await?;
    let v = exp.pick(version)?;
    let Some(&size) = exp.inv.segments.get(&id) else {
        return Err(InspectError::NoSuchSegment {
            export: exp.name.clone(),
            id,
        });
    };
    let m = exp.manifest(store, v).await?;
    let idx = index_at(store, &exp, &m).await?;
    let key = exp.keys.segment(id);
    if size > SEGMENT_BYTES_MAX {
        return Err(InspectError::Invalid(format!(
            "{key} is {size} bytes, more than the {SEGMENT_BYTES_MAX} this tool reads whole"
        )));
    }
    let body = match store.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(InspectError::NoSuchSegment {
                export: exp.name.clone(),
                id,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let bs = m.block_size;
    let scan = tokio::task::spawn_blocking(move || scan_segment(&body, id, bs))
        .await
        .map_err(|e| InspectError::Internal(e.to_string()))?;
    let live = live_by_frame(&idx);
    let frames = scan
        .entries
        .as_deref()
        .map(|d| frame_rows(id, d, &live, Some(&scan)))
        .unwrap_or_default();
    let problems = scan
        .problems
        .iter()
        .map(|b| Problem {
            key: key.clone(),
            offset: b.offset,
            what: "segment",
            message: b.reason.clone(),
        })
        .collect();
    Ok(SegmentReport {
        export: exp.name.clone(),
        id,
        key: key.clone(),
        epoch: format::epoch_of_id(id),
        size_bytes: size,
        version: v,
        reachable: idx.segs.contains_key(&id),
        block_size: scan.block_size,
        footer_epoch: scan.footer_epoch,
        blocks_total: scan.data_blocks(),
        blocks_live: idx.segs.get(&id).map_or(0, |s| s.blocks_live),
        frames,
        problems,
    })
}

// ---------------------------------------------------------------------------------------
// map

#[derive(Debug, Clone, Serialize)]
pub struct MapReport {
    pub export: String,
    pub version: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The range shown, in bytes (rounded out to whole blocks).
    pub offset: u64,
    pub length: u64,
    pub extents: Vec<MapExtent>,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub hole_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    pub lba: u64,
    pub blocks: u64,
    /// "data" (stored in a frame), "zero" (zeroed, allocated, no bytes stored) or "hole".
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_in_frame: Option<u32>,
}

/// Block ranges of `offset..offset+length` (bytes; whole device by default) and where each
/// lives, under the manifest `version` (latest by default).
pub async fn map(
    store: &DynStore,
    export: &str,
    version: Option<u64>,
    offset: Option<u64>,
    length: Option<u64>,
) -> InspectResult<MapReport> {
    let exp = Export::resolve(store, export).await?;
    let v = exp.pick(version)?;
    let m = exp.manifest(store, v).await?;
    let bs = m.block_size as u64;
    if !format::valid_block_size(m.block_size) || m.size_bytes % bs != 0 {
        return Err(InspectError::Corrupt {
            key: exp.keys.manifest(v),
            reason: format!("geometry {} bytes / block {}", m.size_bytes, m.block_size),
        });
    }
    let start = offset.unwrap_or(0);
    if start > m.size_bytes {
        return Err(InspectError::Invalid(format!(
            "offset {start} is past the end of the export ({} bytes)",
            m.size_bytes
        )));
    }
    let end = match length {
        Some(l) => start
            .checked_add(l)
            .ok_or_else(|| InspectError::Invalid("offset + length overflows".into()))?,
        None => m.size_bytes,
    }
    .min(m.size_bytes);
    let first = start / bs;
    let last = end.div_ceil(bs);
    let idx = index_at(store, &exp, &m).await?;
    let mut report = MapReport {
        export: exp.name.clone(),
        version: v,
        size_bytes: m.size_bytes,
        block_size: m.block_size,
        offset: first * bs,
        length: (last - first) * bs,
        extents: Vec::new(),
        data_bytes: 0,
        zero_bytes: 0,
        hole_bytes: 0,
    };
    if last == first {
        return Ok(report);
    }
    for (lba, blocks, val) in idx.lookup(first, last - first) {
        let mut x = MapExtent {
            offset: lba * bs,
            length: blocks * bs,
            lba,
            blocks,
            state: "hole",
            segment: None,
            frame_offset: None,
            frame_len: None,
            block_in_frame: None,
        };
        match val {
            None => report.hole_bytes += x.length,
            Some(Val::ZeroAlloc) => {
                x.state = "zero";
                report.zero_bytes += x.length;
            }
            Some(Val::Frame {
                seg,
                frame_offset,
                frame_len,
                block_in_frame,
            }) => {
                x.state = "data";
                x.segment = Some(seg);
                x.frame_offset = Some(frame_offset);
                x.frame_len = Some(frame_len);
                x.block_in_frame = Some(block_in_frame);
                report.data_bytes += x.length;
            }
        }
        report.extents.push(x);
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// verify

/// Progress callbacks for long runs (the binary draws a bar; tests pass [`NoProgress`]).
pub trait Progress: Send + Sync {
    /// A new phase begins with `total` units of work (`bytes` says what a unit is).
    fn phase(&self, name: &str, total: u64, bytes: bool);
    fn advance(&self, n: u64);
    fn finish(&self);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64, _: bool) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub key: String,
    /// Byte offset inside the object, when the problem has one.
    pub offset: Option<u64>,
    /// Category: "manifest", "checkpoint", "segment", "missing", "size", "index",
    /// "accounting".
    pub what: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Orphan {
    pub key: String,
    pub size_bytes: u64,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyCounts {
    pub manifests: u64,
    pub checkpoints: u64,
    pub segments: u64,
    pub segment_bytes: u64,
    pub frames: u64,
    pub index_runs: u64,
    pub mapped_blocks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub export: String,
    pub root: String,
    /// The manifest version checked in depth.
    pub version: u64,
    pub latest: u64,
    pub gc_low_water: Option<u64>,
    /// True when no problem was found (orphans are not problems).
    pub ok: bool,
    pub checked: VerifyCounts,
    /// False when the index could not be rebuilt (a needed object was bad), so the index
    /// and accounting checks were skipped.
    pub index_checked: bool,
    pub problems: Vec<Problem>,
    /// Problems beyond [`PROBLEMS_MAX`], counted only.
    pub problems_omitted: u64,
    pub orphans: Vec<Orphan>,
    pub orphan_bytes: u64,
    /// False when a retained manifest or a checkpoint it names could not be read: objects
    /// only that one names then show as unreachable although they are not.
    pub orphans_certain: bool,
    /// The writer lease: when live, a daemon is writing and objects of its in-flight
    /// commit may show as unreachable.
    pub lease: Option<LeaseView>,
}

impl VerifyReport {
    fn problem(&mut self, key: &str, offset: Option<u64>, what: &'static str, msg: String) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(Problem {
                key: key.to_string(),
                offset,
                what,
                message: msg,
            });
        } else {
            self.problems_omitted += 1;
        }
    }
}

/// What reading one whole segment found.
#[derive(Debug, Default)]
struct SegmentScan {
    block_size: Option<u32>,
    footer_epoch: Option<u64>,
    entries: Option<Vec<DirEntry>>,
    /// Data frames by offset, as checked.
    frames: HashMap<u64, FrameCheck>,
    problems: Vec<Bad>,
}

#[derive(Debug, Clone)]
struct FrameCheck {
    first_lba: u64,
    blocks: u64,
    frame_len: u32,
    compressed: Option<bool>,
    error: Option<String>,
}

impl SegmentScan {
    fn bad(&mut self, offset: Option<u64>, reason: String) {
        self.problems.push(Bad { offset, reason });
    }
    fn data_blocks(&self) -> u64 {
        self.entries.as_deref().map_or(0, |d| {
            d.iter()
                .filter(|e| e.kind == EntryKind::Data)
                .map(|e| e.blocks)
                .sum()
        })
    }
}

/// Check a whole segment stage by stage (header, footer, directory, every frame), the
/// checks `format::parse_segment(.., true)` makes, but reporting every bad frame with its
/// offset instead of stopping at the first. CPU-heavy: run it off the reactor.
fn scan_segment(b: &[u8], id: u64, block_size: u32) -> SegmentScan {
    let mut s = SegmentScan::default();
    let len = b.len() as u64;
    match format::parse_segment_header(b) {
        Ok(bs) => {
            s.block_size = Some(bs);
            if bs != block_size {
                s.bad(
                    Some(12),
                    format!("segment block size {bs}, export block size {block_size}"),
                );
            }
        }
        Err(e) => s.bad(Some(0), format!("segment header: {e}")),
    }
    let footer = match format::parse_segment_footer(b, len) {
        Ok(f) => f,
        Err(e) => {
            s.bad(
                Some(len.saturating_sub(SEGMENT_FOOTER_BYTES as u64)),
                format!("segment footer: {e}"),
            );
            return s;
        }
    };
    s.footer_epoch = Some(footer.epoch);
    if footer.segment_id != id {
        s.bad(
            Some(len - SEGMENT_FOOTER_BYTES as u64 + 24),
            format!("footer names segment {}", footer.segment_id),
        );
    }
    if footer.epoch != format::epoch_of_id(id) {
        s.bad(
            Some(len - SEGMENT_FOOTER_BYTES as u64 + 32),
            format!(
                "footer epoch {} differs from the id's epoch {}",
                footer.epoch,
                format::epoch_of_id(id)
            ),
        );
    }
    // parse_segment_footer checked dir_offset + dir_len + footer == len.
    let ds = footer.dir_offset as usize;
    let de = ds + footer.dir_len as usize;
    let entries = match b
        .get(ds..de)
        .ok_or_else(|| "directory outside object".to_string())
        .and_then(|d| format::parse_segment_directory(d, &footer).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(reason) => {
            s.bad(Some(footer.dir_offset), format!("directory: {reason}"));
            return s;
        }
    };
    for e in entries.iter().filter(|e| e.kind == EntryKind::Data) {
        let fs = e.frame_offset as usize;
        let fe = fs + e.frame_len as usize;
        let mut fc = FrameCheck {
            first_lba: e.lba,
            blocks: e.blocks,
            frame_len: e.frame_len,
            compressed: None,
            error: None,
        };
        // parse_segment_directory checked the frame lies inside the data area.
        let Some(fb) = b.get(fs..fe) else {
            fc.error = Some("frame outside object".into());
            s.bad(Some(e.frame_offset), "frame outside object".into());
            s.frames.insert(e.frame_offset, fc);
            continue;
        };
        match format::decode_frame(fb, block_size, e.frame_offset) {
            Ok(f) => {
                fc.compressed = fb.get(4..6).map(|x| u16::from_le_bytes([x[0], x[1]]) == 1);
                if f.first_lba != e.lba || f.blocks as u64 != e.blocks {
                    let msg = format!(
                        "frame header says lbas {}+{}, directory says {}+{}",
                        f.first_lba, f.blocks, e.lba, e.blocks
                    );
                    fc.error = Some(msg.clone());
                    s.bad(Some(e.frame_offset), msg);
                }
            }
            Err(err) => {
                let msg = format!("frame (lbas {}+{}): {err}", e.lba, e.blocks);
                fc.error = Some(err.to_string());
                s.bad(Some(e.frame_offset), msg);
            }
        }
        s.frames.insert(e.frame_offset, fc);
    }
    s.entries = Some(entries);
    s
}

/// Read and check everything the manifest `version` (latest by default) reaches, check
/// every retained manifest and what it names exists, and list what nothing reaches.
/// `Err` only when the export/version does not exist or the store fails; everything wrong
/// with the data is in the report (`ok == false`).
pub async fn verify(
    store: &DynStore,
    export: &str,
    version: Option<u64>,
    progress: &dyn Progress,
) -> InspectResult<VerifyReport> {
    let exp = Export::resolve(store, export).await?;
    let target = exp.pick(version)?;
    let latest = exp.latest();
    let mut r = VerifyReport {
        export: exp.name.clone(),
        root: exp.keys.root.clone(),
        version: target,
        latest,
        gc_low_water: None,
        ok: false,
        checked: VerifyCounts::default(),
        index_checked: false,
        problems: Vec::new(),
        problems_omitted: 0,
        orphans: Vec::new(),
        orphan_bytes: 0,
        orphans_certain: true,
        lease: read_lease(store, &exp.inv).await?,
    };
    if let Some(l) = &r.lease {
        if let Some(e) = l.error.clone() {
            r.problem(&l.key.clone(), None, "lease", e);
        }
    }

    // 1. Every manifest present: decode (magic, version, crc) and sanity-check.
    progress.phase("manifests", exp.inv.manifests.len() as u64, false);
    let decoded = read_all_manifests(store, &exp).await?;
    progress.advance(exp.inv.manifests.len() as u64);
    if !decoded.contains_key(&target) {
        return Err(InspectError::NoSuchVersion {
            export: exp.name.clone(),
            version: target,
            present: "(deleted while verifying: GC at work; try again)".into(),
        });
    }
    r.checked.manifests = decoded.len() as u64;
    // The GC low-water mark comes from the newest manifest that decodes.
    let low = decoded
        .values()
        .rev()
        .find_map(|m| m.as_ref().ok())
        .map(|m| m.gc_low_water);
    r.gc_low_water = low;
    let low = low.unwrap_or(0);
    let mut prev: Option<&Manifest> = None;
    for (&v, m) in &decoded {
        let key = exp.keys.manifest(v);
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                if v >= low || v == target {
                    let msg = e.strip_prefix(&format!("{key}: ")).unwrap_or(e).to_string();
                    r.problem(&key, None, "manifest", msg);
                    r.orphans_certain = false;
                }
                continue;
            }
        };
        if v < low && v != target {
            continue;
        }
        let g = log::Geometry {
            size_bytes: m.size_bytes,
            block_size: m.block_size,
        };
        if let Err(e) = g.validate() {
            r.problem(&key, None, "manifest", e.to_string());
        }
        if m.gc_low_water > m.version {
            r.problem(
                &key,
                None,
                "manifest",
                format!("gc_low_water {} above its own version", m.gc_low_water),
            );
        }
        if let Some(p) = prev {
            if p.size_bytes != m.size_bytes || p.block_size != m.block_size {
                r.problem(
                    &key,
                    None,
                    "manifest",
                    format!(
                        "geometry {}/{} differs from version {} ({}/{})",
                        m.size_bytes, m.block_size, p.version, p.size_bytes, p.block_size
                    ),
                );
            }
            if m.writer_epoch < p.writer_epoch {
                r.problem(
                    &key,
                    None,
                    "manifest",
                    format!(
                        "writer epoch {} is below version {}'s epoch {}",
                        m.writer_epoch, p.version, p.writer_epoch
                    ),
                );
            }
        }
        prev = Some(m);
    }

    // 2. Everything a retained manifest names must exist with the recorded size.
    let retained: Vec<&Manifest> = decoded
        .iter()
        .filter(|(&v, _)| v >= low || v == target)
        .filter_map(|(_, m)| m.as_ref().ok())
        .collect();
    let mut reach_segments: BTreeSet<u64> = BTreeSet::new();
    let mut reach_checkpoints: BTreeMap<u64, u64> = BTreeMap::new();
    for m in &retained {
        let mkey = exp.keys.manifest(m.version);
        for s in &m.tail {
            reach_segments.insert(s.id);
            check_exists(
                &mut r,
                &exp.inv.segments,
                &exp.keys.segment(s.id),
                s.id,
                s.size_bytes,
                &mkey,
            );
        }
        if let Some(c) = m.checkpoint {
            reach_checkpoints.insert(c.id, c.size_bytes);
            check_exists(
                &mut r,
                &exp.inv.checkpoints,
                &exp.keys.checkpoint(c.id),
                c.id,
                c.size_bytes,
                &mkey,
            );
        }
    }

    // 3. Checkpoints: decode each one a retained manifest names (their segments are
    //    reachable too); the target's is kept for the index.
    let target_m: Option<Manifest> = decoded.get(&target).and_then(|m| m.as_ref().ok()).cloned();
    let target_ck_id = target_m.as_ref().and_then(|m| m.checkpoint).map(|c| c.id);
    let mut target_ck: Option<Checkpoint> = None;
    let mut index_possible = target_m.is_some();
    progress.phase("checkpoints", reach_checkpoints.len() as u64, false);
    for &id in reach_checkpoints.keys() {
        progress.advance(1);
        if !exp.inv.checkpoints.contains_key(&id) {
            r.orphans_certain = false;
            if Some(id) == target_ck_id {
                index_possible = false;
            }
            continue;
        }
        let key = exp.keys.checkpoint(id);
        match read_checkpoint(store, &key).await? {
            Ok(c) => {
                r.checked.checkpoints += 1;
                for s in &c.segments {
                    reach_segments.insert(s.id);
                    check_exists(
                        &mut r,
                        &exp.inv.segments,
                        &exp.keys.segment(s.id),
                        s.id,
                        s.size_bytes,
                        &key,
                    );
                }
                if Some(id) == target_ck_id {
                    target_ck = Some(c);
                }
            }
            Err(bad) => {
                r.problem(&key, bad.offset, "checkpoint", bad.reason);
                r.orphans_certain = false;
                if Some(id) == target_ck_id {
                    index_possible = false;
                }
            }
        }
    }

    // 4. The target's segments, downloaded whole and checked frame by frame.
    let mut deep: BTreeMap<u64, u64> = BTreeMap::new();
    if let Some(m) = &target_m {
        if let Some(c) = &target_ck {
            if c.size_bytes != m.size_bytes || c.block_size != m.block_size {
                let key = exp.keys.checkpoint(target_ck_id.unwrap_or(0));
                r.problem(
                    &key,
                    None,
                    "checkpoint",
                    "geometry differs from manifest".into(),
                );
            }
            if c.version > m.version {
                let key = exp.keys.checkpoint(target_ck_id.unwrap_or(0));
                r.problem(
                    &key,
                    None,
                    "checkpoint",
                    format!(
                        "checkpoint of version {} named by older version {}",
                        c.version, m.version
                    ),
                );
            }
            for s in &c.segments {
                deep.insert(s.id, s.size_bytes);
            }
        }
        for s in &m.tail {
            deep.insert(s.id, s.size_bytes);
        }
    }
    let to_read: Vec<(u64, u64)> = deep
        .keys()
        .filter_map(|id| exp.inv.segments.get(id).map(|&size| (*id, size)))
        .collect();
    let block_size = target_m.as_ref().map_or(4096, |m| m.block_size);
    progress.phase("segments", to_read.iter().map(|(_, s)| *s).sum(), true);
    let scans: Vec<(u64, Option<SegmentScan>)> = futures::stream::iter(to_read)
        .map(|(id, size)| {
            let key = exp.keys.segment(id);
            async move {
                if size > SEGMENT_BYTES_MAX {
                    let mut s = SegmentScan::default();
                    s.bad(
                        None,
                        format!("{size} bytes: larger than {SEGMENT_BYTES_MAX}, not read"),
                    );
                    return Ok((id, Some(s)));
                }
                let body = match store.get(&key).await {
                    Ok(b) => b,
                    // Listed a moment ago: a concurrent GC, reported as missing.
                    Err(StoreError::NotFound { .. }) => return Ok((id, None)),
                    Err(e) => return Err(InspectError::Store(e)),
                };
                let n = body.len() as u64;
                let scan = tokio::task::spawn_blocking(move || scan_segment(&body, id, block_size))
                    .await
                    .map_err(|e| InspectError::Internal(e.to_string()))?;
                progress.advance(n);
                Ok((id, Some(scan)))
            }
        })
        .buffered(SEGMENTS_IN_FLIGHT_MAX)
        .try_collect()
        .await?;
    let mut by_id: HashMap<u64, SegmentScan> = HashMap::new();
    for (id, scan) in scans {
        let key = exp.keys.segment(id);
        match scan {
            None => r.problem(
                &key,
                None,
                "missing",
                "vanished while verifying (GC running?)".into(),
            ),
            Some(s) => {
                r.checked.segments += 1;
                r.checked.segment_bytes += exp.inv.segments.get(&id).copied().unwrap_or(0);
                r.checked.frames += s.frames.len() as u64;
                for b in &s.problems {
                    r.problem(&key, b.offset, "segment", b.reason.clone());
                }
                by_id.insert(id, s);
            }
        }
    }
    progress.finish();

    // 5. Rebuild the target's index from what was read, and check it against the frames
    //    and the live-block accounting.
    if let (true, Some(m)) = (index_possible, &target_m) {
        let ck_key = exp.keys.checkpoint(target_ck_id.unwrap_or(0));
        if let Some(idx) = rebuild_index(&mut r, &exp, m, target_ck.as_ref(), &ck_key, &by_id) {
            check_index(&mut r, &exp, &idx, &by_id);
            r.index_checked = true;
        }
    }

    // 6. Orphans: what no retained manifest reaches.
    for (&v, &size) in &exp.inv.manifests {
        if v < low {
            r.orphans.push(Orphan {
                key: exp.keys.manifest(v),
                size_bytes: size,
                reason: "manifest below gc_low_water",
            });
        }
    }
    for (&id, &size) in &exp.inv.checkpoints {
        if !reach_checkpoints.contains_key(&id) {
            r.orphans.push(Orphan {
                key: exp.keys.checkpoint(id),
                size_bytes: size,
                reason: "checkpoint no retained manifest names",
            });
        }
    }
    for (&id, &size) in &exp.inv.segments {
        if !reach_segments.contains(&id) {
            r.orphans.push(Orphan {
                key: exp.keys.segment(id),
                size_bytes: size,
                reason: "segment no retained manifest reaches",
            });
        }
    }
    for o in &exp.inv.probes {
        r.orphans.push(Orphan {
            key: o.key.clone(),
            size_bytes: o.size_bytes,
            reason: "leftover conditional-put probe",
        });
    }
    for o in &exp.inv.other {
        r.orphans.push(Orphan {
            key: o.key.clone(),
            size_bytes: o.size_bytes,
            reason: "unknown object under the export",
        });
    }
    for o in list_all(store.as_ref(), ROOT_PROBE_PREFIX).await? {
        r.orphans.push(Orphan {
            key: o.key,
            size_bytes: o.size_bytes,
            reason: "leftover conditional-put probe (store root)",
        });
    }
    r.orphan_bytes = r.orphans.iter().map(|o| o.size_bytes).sum();
    r.ok = r.problems.is_empty() && r.problems_omitted == 0;
    Ok(r)
}

/// Record a problem when `id` is not listed, or listed with another size than recorded.
/// Each key is reported once however many manifests name it.
fn check_exists(
    r: &mut VerifyReport,
    listed: &BTreeMap<u64, u64>,
    key: &str,
    id: u64,
    size: u64,
    named_by: &str,
) {
    if r.problems.iter().any(|p| p.key == key) {
        return;
    }
    match listed.get(&id) {
        None => r.problem(
            key,
            None,
            "missing",
            format!("named by {named_by} but not in the store"),
        ),
        Some(&actual) if actual != size => r.problem(
            key,
            None,
            "size",
            format!("object is {actual} bytes, {named_by} records {size}"),
        ),
        _ => {}
    }
}

/// The target manifest's index, rebuilt from its checkpoint and its tail segments'
/// directories as read whole; `None` (with a problem) when that is impossible.
fn rebuild_index(
    r: &mut VerifyReport,
    exp: &Export,
    m: &Manifest,
    ck: Option<&format::Checkpoint>,
    ck_key: &str,
    scans: &HashMap<u64, SegmentScan>,
) -> Option<Index> {
    if !format::valid_block_size(m.block_size) {
        return None;
    }
    let device_blocks = m.size_bytes / m.block_size as u64;
    let mut idx = match ck {
        Some(c) => match Index::from_checkpoint(c, device_blocks) {
            Ok(i) => i,
            Err(reason) => {
                r.problem(ck_key, None, "checkpoint", reason);
                return None;
            }
        },
        None => Index::new(),
    };
    for s in &m.tail {
        let key = exp.keys.segment(s.id);
        let dir = scans.get(&s.id).and_then(|sc| sc.entries.as_ref())?;
        for e in dir {
            if e.lba
                .checked_add(e.blocks)
                .is_none_or(|end| end > device_blocks)
            {
                r.problem(
                    &key,
                    None,
                    "segment",
                    format!(
                        "directory entry lbas {}+{} past the end of the device ({device_blocks} blocks)",
                        e.lba, e.blocks
                    ),
                );
                return None;
            }
        }
        idx.apply_segment(*s, dir);
    }
    Some(idx)
}

/// Every index run must land inside a frame that exists, at a frame boundary whose header
/// agrees; every segment's live-block count must equal what the index maps into it, and
/// its written-block count what its directory holds.
fn check_index(r: &mut VerifyReport, exp: &Export, idx: &Index, scans: &HashMap<u64, SegmentScan>) {
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    for (lba, blocks, v) in idx.map.iter() {
        r.checked.index_runs += 1;
        r.checked.mapped_blocks += blocks;
        let Val::Frame {
            seg,
            frame_offset,
            frame_len,
            block_in_frame,
        } = *v
        else {
            continue;
        };
        *live.entry(seg).or_default() += blocks;
        let key = exp.keys.segment(seg);
        // Missing or unreadable segments are reported already.
        let Some(scan) = scans.get(&seg).filter(|s| s.entries.is_some()) else {
            continue;
        };
        let Some(f) = scan.frames.get(&frame_offset) else {
            r.problem(
                &key,
                Some(frame_offset),
                "index",
                format!("lbas {lba}+{blocks} map to offset {frame_offset}, which is not a frame in the directory"),
            );
            continue;
        };
        if f.frame_len != frame_len {
            r.problem(
                &key,
                Some(frame_offset),
                "index",
                format!(
                    "lbas {lba}+{blocks}: index says frame length {frame_len}, directory {}",
                    f.frame_len
                ),
            );
        }
        let bif = block_in_frame as u64;
        if bif + blocks > f.blocks || f.first_lba.checked_add(bif) != Some(lba) {
            r.problem(
                &key,
                Some(frame_offset),
                "index",
                format!(
                    "lbas {lba}+{blocks} map to blocks {bif}.. of a frame holding lbas {}+{}",
                    f.first_lba, f.blocks
                ),
            );
        }
        if let Some(err) = &f.error {
            r.problem(
                &key,
                Some(frame_offset),
                "data",
                format!("lbas {lba}+{blocks} are stored in a bad frame: {err}"),
            );
        }
    }
    let mut ids: Vec<u64> = idx.segs.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let Some(st) = idx.segs.get(&id) else {
            continue;
        };
        let key = exp.keys.segment(id);
        let mapped = live.remove(&id).unwrap_or(0);
        if st.blocks_live != mapped {
            r.problem(
                &key,
                None,
                "accounting",
                format!(
                    "accounting says {} live blocks, the index maps {mapped}",
                    st.blocks_live
                ),
            );
        }
        if st.blocks_live > st.blocks_total {
            r.problem(
                &key,
                None,
                "accounting",
                format!(
                    "{} live blocks but written with {}",
                    st.blocks_live, st.blocks_total
                ),
            );
        }
        if let Some(scan) = scans.get(&id).filter(|s| s.entries.is_some()) {
            let written = scan.data_blocks();
            if st.blocks_total != written {
                r.problem(
                    &key,
                    None,
                    "accounting",
                    format!(
                        "accounting says written with {} data blocks, its directory has {written}",
                        st.blocks_total
                    ),
                );
            }
        }
    }
    for (id, mapped) in live {
        r.problem(
            &exp.keys.segment(id),
            None,
            "accounting",
            format!("the index maps {mapped} blocks into it, but it has no accounting entry"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Text rendering.

/// `ms` since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC` (proleptic Gregorian).
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

/// Bytes as a short human string (`1.5 MiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A text table: columns padded to their widest cell; numeric columns right-aligned.
struct Table {
    head: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(cols: &[(&'static str, bool)]) -> Self {
        Self {
            head: cols.iter().map(|c| c.0).collect(),
            right: cols.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn render(&self, out: &mut String) {
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(x) = w.get_mut(i) {
                    *x = (*x).max(c.chars().count());
                }
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                let width = w.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(c.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&mut self.head.iter().copied(), out);
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str), out);
        }
    }
}

/// `s` cut to at most `max` characters, with `…` marking the cut.
fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

fn pct(f: f64) -> String {
    format!("{:.1}%", f * 100.0)
}

impl ExportsReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut t = Table::new(&[
            ("NAME", false),
            ("SIZE", true),
            ("BLOCK", true),
            ("VERSION", true),
            ("EPOCH", true),
            ("OBJECTS", true),
            ("STORED", true),
            ("UPDATED", false),
            ("LEASE", false),
        ]);
        for e in &self.exports {
            let objects = e.manifests + e.segments + e.checkpoints + e.other_objects;
            let mut name = e
                .name
                .as_deref()
                .map_or_else(|| format!("? ({})", e.key), |n| ellipsize(n, 48));
            if e.hashed_key {
                name.push_str(" [hashed key]");
            }
            t.row(vec![
                name,
                e.size_bytes.map_or("-".into(), human_bytes),
                opt(&e.block_size),
                opt(&e.version),
                opt(&e.writer_epoch),
                objects.to_string(),
                human_bytes(e.bytes_stored),
                e.updated_unix_ms.map_or("-".into(), format_unix_ms),
                e.lease.as_ref().map_or("-".into(), LeaseView::short),
            ]);
        }
        let _ = writeln!(
            out,
            "store {}: {} export(s)",
            self.store,
            self.exports.len()
        );
        t.render(&mut out);
        for e in &self.exports {
            if let Some(err) = &e.error {
                let _ = writeln!(out, "warning: exports/{}: {err}", e.key);
            }
        }
        out
    }
}

impl ManifestsReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "export {:?} ({}): {} manifest(s), latest {}, gc_low_water {}",
            self.export,
            self.root,
            self.versions.len(),
            self.latest,
            opt(&self.gc_low_water)
        );
        let mut t = Table::new(&[
            ("VERSION", true),
            ("EPOCH", true),
            ("CREATED", false),
            ("CHECKPOINT", true),
            ("TAIL", true),
            ("TAIL BYTES", true),
            ("BYTES", true),
            ("", false),
        ]);
        for v in &self.versions {
            let mut note = String::new();
            if !v.retained {
                note.push_str("below gc_low_water");
            }
            if let Some(e) = &v.error {
                note = format!("ERROR {e}");
            }
            t.row(vec![
                v.version.to_string(),
                opt(&v.writer_epoch),
                opt(&v.created),
                opt(&v.checkpoint),
                opt(&v.tail_segments),
                v.tail_bytes.map_or("-".into(), human_bytes),
                v.object_bytes.to_string(),
                note,
            ]);
        }
        t.render(&mut out);
        out
    }
}

impl ManifestReport {
    pub fn to_text(&self) -> String {
        let m = &self.manifest;
        let mut out = String::new();
        let latest = if m.version == self.latest {
            " (latest)".to_string()
        } else {
            format!(" (latest is {})", self.latest)
        };
        let _ = writeln!(out, "manifest      {}{latest}", self.key);
        let _ = writeln!(out, "object bytes  {}", self.object_bytes);
        let _ = writeln!(out, "export        {:?}", m.export_name);
        let _ = writeln!(out, "version       {}", m.version);
        let _ = writeln!(
            out,
            "size          {} bytes ({})",
            m.size_bytes,
            human_bytes(m.size_bytes)
        );
        let _ = writeln!(out, "block size    {}", m.block_size);
        let _ = writeln!(out, "writer epoch  {}", m.writer_epoch);
        let _ = writeln!(out, "writer nonce  {:#018x}", m.writer_nonce);
        let _ = writeln!(out, "created       {}", self.created);
        let _ = writeln!(out, "gc_low_water  {}", m.gc_low_water);
        match &self.checkpoint {
            None => {
                let _ = writeln!(out, "checkpoint    none (empty index before the tail)");
            }
            Some(c) => {
                let _ = writeln!(out, "checkpoint    {} ({} bytes)", c.key, c.object_bytes);
                match &c.error {
                    Some(e) => {
                        let _ = writeln!(out, "              ERROR {e}");
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "              state of version {}, {} segments, {} extents, {} mapped blocks",
                            opt(&c.version),
                            opt(&c.segments),
                            opt(&c.extents),
                            opt(&c.mapped_blocks)
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "tail          {} segment(s)", m.tail.len());
        let mut t = Table::new(&[("  SEGMENT", true), ("EPOCH", true), ("BYTES", true)]);
        for s in &m.tail {
            t.row(vec![
                format!("  {:020}", s.id),
                format::epoch_of_id(s.id).to_string(),
                s.size_bytes.to_string(),
            ]);
        }
        if !m.tail.is_empty() {
            t.render(&mut out);
        }
        out
    }
}

fn render_frames(frames: &[FrameRow], out: &mut String) {
    let mut t = Table::new(&[
        ("    KIND", false),
        ("LBA", true),
        ("BLOCKS", true),
        ("FRAME OFF", true),
        ("FRAME LEN", true),
        ("LIVE", true),
        ("", false),
    ]);
    for f in frames {
        let mut note = match f.compressed {
            Some(true) => "zstd".to_string(),
            Some(false) => "raw".to_string(),
            None => String::new(),
        };
        if let Some(e) = &f.error {
            note = format!("BAD: {e}");
        }
        t.row(vec![
            format!("    {}", f.kind),
            f.lba.to_string(),
            f.blocks.to_string(),
            opt(&f.frame_offset),
            opt(&f.frame_len),
            opt(&f.live_blocks),
            note,
        ]);
    }
    t.render(out);
}

impl SegmentsReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "export {:?} version {}: {} segment(s), {} stored, {} live (est.), {} dead",
            self.export,
            self.version,
            self.total.segments,
            human_bytes(self.total.size_bytes),
            human_bytes(self.total.live_bytes_estimate),
            pct(self.total.dead_fraction)
        );
        let with_frames = self.segments.iter().any(|s| s.frames.is_some());
        let cols: &[(&'static str, bool)] = &[
            ("SEGMENT", false),
            ("EPOCH", true),
            ("FROM", false),
            ("BYTES", true),
            ("BLOCKS", true),
            ("LIVE", true),
            ("LIVE BYTES", true),
            ("DEAD", true),
        ];
        let row = |s: &SegmentRow| {
            vec![
                format!("{:020}", s.id),
                s.epoch.to_string(),
                s.source.to_string(),
                s.size_bytes.to_string(),
                s.blocks_total.to_string(),
                s.blocks_live.to_string(),
                s.live_bytes_estimate.to_string(),
                pct(s.dead_fraction),
            ]
        };
        if !with_frames {
            let mut t = Table::new(cols);
            for s in &self.segments {
                t.row(row(s));
            }
            t.render(&mut out);
        } else {
            for s in &self.segments {
                let mut t = Table::new(cols);
                t.row(row(s));
                t.render(&mut out);
                if let Some(f) = &s.frames {
                    render_frames(f, &mut out);
                }
                out.push('\n');
            }
        }
        out
    }
}

impl SegmentReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "segment       {}", self.key);
        let _ = writeln!(out, "bytes         {}", self.size_bytes);
        let _ = writeln!(
            out,
            "epoch         {} (footer {})",
            self.epoch,
            opt(&self.footer_epoch)
        );
        let _ = writeln!(out, "block size    {}", opt(&self.block_size));
        let _ = writeln!(
            out,
            "blocks        {} written, {} live in version {}{}",
            self.blocks_total,
            self.blocks_live,
            self.version,
            if self.reachable {
                ""
            } else {
                " (not reached by that version)"
            }
        );
        let _ = writeln!(out, "entries       {}", self.frames.len());
        render_frames(&self.frames, &mut out);
        for p in &self.problems {
            let _ = writeln!(out, "PROBLEM {}", p.to_text());
        }
        if self.problems.is_empty() {
            let _ = writeln!(out, "all frames check out");
        }
        out
    }
}

impl MapReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "export {:?} version {}: bytes {}..{} of {} (block {}): {} data, {} zero, {} hole",
            self.export,
            self.version,
            self.offset,
            self.offset + self.length,
            self.size_bytes,
            self.block_size,
            human_bytes(self.data_bytes),
            human_bytes(self.zero_bytes),
            human_bytes(self.hole_bytes)
        );
        let mut t = Table::new(&[
            ("OFFSET", true),
            ("LENGTH", true),
            ("STATE", false),
            ("SEGMENT", false),
            ("FRAME OFF", true),
            ("FRAME LEN", true),
            ("BLOCK", true),
        ]);
        for x in &self.extents {
            t.row(vec![
                x.offset.to_string(),
                x.length.to_string(),
                x.state.to_string(),
                x.segment.map_or("-".into(), |s| format!("{s:020}")),
                opt(&x.frame_offset),
                opt(&x.frame_len),
                opt(&x.block_in_frame),
            ]);
        }
        t.render(&mut out);
        out
    }
}

impl Problem {
    pub fn to_text(&self) -> String {
        match self.offset {
            Some(o) => format!("{} @{o}: {}: {}", self.key, self.what, self.message),
            None => format!("{}: {}: {}", self.key, self.what, self.message),
        }
    }
}

impl VerifyReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.checked;
        let _ = writeln!(
            out,
            "export {:?} ({}) version {} (latest {}, gc_low_water {})",
            self.export,
            self.root,
            self.version,
            self.latest,
            opt(&self.gc_low_water)
        );
        let _ = writeln!(
            out,
            "checked {} manifest(s), {} checkpoint(s), {} segment(s) ({}), {} frame(s), {} index run(s) mapping {} block(s){}",
            c.manifests,
            c.checkpoints,
            c.segments,
            human_bytes(c.segment_bytes),
            c.frames,
            c.index_runs,
            c.mapped_blocks,
            if self.index_checked {
                ""
            } else {
                "; index checks SKIPPED"
            }
        );
        if self.gc_low_water.is_some_and(|l| self.version < l) {
            let _ = writeln!(
                out,
                "note: version {} is below gc_low_water: objects it names may already be collected",
                self.version
            );
        }
        if let Some(l) = self.lease.as_ref().filter(|l| l.live) {
            let _ = writeln!(
                out,
                "note: a daemon holds the lease ({}, refreshed {} ms ago): objects of a commit in flight may show as unreachable",
                l.holder.as_deref().unwrap_or("?"),
                opt(&l.age_ms)
            );
        }
        for p in &self.problems {
            let _ = writeln!(out, "PROBLEM {}", p.to_text());
        }
        if self.problems_omitted > 0 {
            let _ = writeln!(out, "... and {} more problem(s)", self.problems_omitted);
        }
        if !self.orphans.is_empty() {
            let _ = writeln!(
                out,
                "{} unreachable object(s), {} (left untouched){}:",
                self.orphans.len(),
                human_bytes(self.orphan_bytes),
                if self.orphans_certain {
                    ""
                } else {
                    "; UNCERTAIN: an unreadable manifest or checkpoint may reach some of them"
                }
            );
            let mut t = Table::new(&[("  KEY", false), ("BYTES", true), ("WHY", false)]);
            for o in &self.orphans {
                t.row(vec![
                    format!("  {}", o.key),
                    o.size_bytes.to_string(),
                    o.reason.to_string(),
                ]);
            }
            t.render(&mut out);
        }
        let n = self.problems.len() as u64 + self.problems_omitted;
        if !self.index_checked && self.version > 1 {
            let _ = writeln!(
                out,
                "hint: older versions may still be intact: nbds3-inspect verify {:?} --version {}",
                self.export,
                self.version - 1
            );
        }
        if self.ok {
            let _ = writeln!(out, "OK: no problems found");
        } else {
            let _ = writeln!(out, "FAILED: {n} problem(s)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{object_id, SegmentBuilder};
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn read_only_store_refuses_every_write() {
        let mem = Arc::new(MemoryStore::new());
        let inner: DynStore = mem.clone();
        inner
            .put("a/b", Bytes::from_static(b"x"), PutMode::IfAbsent)
            .await
            .unwrap();
        let ro = ReadOnlyStore::wrap(inner);
        for mode in [PutMode::IfAbsent, PutMode::Overwrite] {
            let e = ro.put("a/c", Bytes::from_static(b"y"), mode).await;
            assert!(matches!(e, Err(StoreError::Permanent { .. })), "{e:?}");
        }
        assert!(ro.delete("a/b").await.is_err());
        assert!(ro.delete_many(&["a/b".to_string()]).await.is_err());
        assert_eq!(mem.snapshot(), vec![("a/b".to_string(), 1)]);
        assert_eq!(&ro.get("a/b").await.unwrap()[..], b"x");
        assert_eq!(list_all(ro.as_ref(), "a/").await.unwrap().len(), 1);
        assert!(ro.describe().ends_with("(read-only)"));
    }

    fn sample_segment() -> (Vec<u8>, u64) {
        let id = object_id(2, 5);
        let mut b = SegmentBuilder::new(id, 2, 4096, Some(1));
        b.add_frame(10, &vec![7u8; 8192]);
        b.add_range(20, 4, EntryKind::Unmap);
        let rnd: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        b.add_frame(30, &rnd);
        (b.finish().0, id)
    }

    #[test]
    fn scan_of_intact_segment_is_clean() {
        let (seg, id) = sample_segment();
        let s = scan_segment(&seg, id, 4096);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.data_blocks(), 3);
        assert_eq!(s.frames.get(&16).and_then(|f| f.compressed), Some(true));
        // The wrong id or block size is reported, with the footer/header offset.
        assert!(!scan_segment(&seg, id + 1, 4096).problems.is_empty());
        assert_eq!(scan_segment(&seg, id, 512).problems[0].offset, Some(12));
    }

    #[test]
    fn scan_reports_every_flipped_byte_with_an_offset() {
        let (seg, id) = sample_segment();
        for i in 0..seg.len() {
            let mut bad = seg.clone();
            bad[i] ^= 0x10;
            let s = scan_segment(&bad, id, 4096);
            assert!(!s.problems.is_empty(), "flip at {i} undetected");
            assert!(s.problems.iter().all(|p| p.offset.is_some()), "flip at {i}");
        }
        // Decoding garbage or truncated segments never panics.
        for n in 0..seg.len() {
            let _ = scan_segment(&seg[..n], id, 4096);
        }
    }

    #[test]
    fn times_and_ranges_render() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(
            format_unix_ms(1_700_000_000_123),
            "2023-11-14 22:13:20.123 UTC"
        );
        assert_eq!(
            format_unix_ms(951_782_400_000),
            "2000-02-29 00:00:00.000 UTC"
        );
        assert_eq!(
            version_ranges([1, 2, 3, 5, 7, 8].into_iter()),
            "1-3, 5, 7-8"
        );
        assert_eq!(version_ranges(std::iter::empty()), "none");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(ellipsize("abcdef", 4), "abc…");
    }

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        let codes = [
            InspectError::NoSuchExport { export: "x".into() }.exit_code(),
            InspectError::Store(StoreError::Transient {
                key: "k".into(),
                reason: "r".into(),
            })
            .exit_code(),
            InspectError::Corrupt {
                key: "k".into(),
                reason: "r".into(),
            }
            .exit_code(),
            InspectError::Invalid("x".into()).exit_code(),
        ];
        assert_eq!(
            codes,
            [EXIT_NOT_FOUND, EXIT_STORE, EXIT_CORRUPT, EXIT_USAGE]
        );
        let missing: InspectError = LogError::MissingObject { key: "k".into() }.into();
        assert_eq!(missing.exit_code(), EXIT_CORRUPT);
    }
}
