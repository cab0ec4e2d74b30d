//! The log: an export as immutable segments plus versioned manifests in an object store.
//!
//! Job: turn a batch of block updates into segment objects and one new manifest version
//! (the commit point), serve block lookups from the in-memory [`index::Index`], read and
//! verify single frames by ranged GET, and keep exactly one writer per export.
//!
//! Invariants (each relied on by crash safety; see `format/FORMAT.md`):
//! - A manifest is written only after every object it references has been written
//!   successfully, so no manifest ever names a missing object.
//! - Manifests are written with IfAbsent at `latest + 1`; the one that lands is the commit.
//!   The in-memory index changes only after the manifest PUT succeeded and the post-commit
//!   LIST showed no newer version.
//! - Every writer session has a fresh epoch, committed before its first write. A commit
//!   that collides with a manifest of a higher epoch, or that finds a newer version after
//!   landing (a slot freed by GC and re-filled by a stale writer), marks the log `Fenced`
//!   and fails: the caller never acknowledges it.
//! - Segment and checkpoint ids are `epoch << 32 | seq` and never reused, so retries never
//!   collide with an earlier attempt's objects.
//! - A commit is two steps: [`Log::prepare`] uploads the segments outside the commit lock
//!   (so a volume can upload its next batch while the previous one lands), [`Log::land`]
//!   lands the manifest under it. Manifests land one at a time; in what order is the
//!   caller's business (the volume lands its batches in the order it took them). Prepared
//!   ids are pending (kept from GC) until landed or abandoned; all uploads of all batches
//!   share `uploads_in_flight_max` slots, older batches first.
//!
//! Checkpoints (issue #2: a flush's cost must not grow with the device). A flush
//! ([`Log::commit`]) never writes a checkpoint. When the tail is long (the soft triggers
//! `tail_segments_max` / `tail_entries_min`), the commit that made it so starts a
//! *background checkpoint* after it landed: the state of that version `v0`, rebuilt off the
//! commit path from `v0`'s checkpoint object and the tail directories held in memory, and
//! PUT IfAbsent under a fresh id. A later commit installs it: its manifest names the new
//! checkpoint and keeps only the tail segments committed after `v0`. That is the same state,
//! because a manifest means "checkpoint + tail replayed in order" (FORMAT.md §7) and the
//! checkpoint is exactly `v0`'s checkpoint + `v0`'s tail replayed. Rules:
//! - At most one background checkpoint at a time ([`CommitState::checkpoint`]). It is
//!   installed only while its base still matches: the current manifest names the same
//!   checkpoint and its tail starts with exactly the segment ids `v0`'s tail had. Anything
//!   else (a compaction's `commit_rewrite`, a resync onto another state) discards it; so does
//!   a failed build or PUT. A discarded checkpoint is an orphan for GC.
//! - Its id is in `pending_ids` (GC never deletes it) from allocation until a landed,
//!   fence-checked manifest names it (then in `recently_named` until a GC pass has listed
//!   that manifest), or until it is discarded. A manifest naming it whose
//!   PUT was ambiguous keeps it pending: the next commit resynchronizes first and then either
//!   finds the adopted manifest naming it (installed) or the unchanged base (installs it
//!   again). It is discarded only while no manifest of ours that may land names it: the
//!   only manifests that ever name it are install attempts, and after an ambiguous one the
//!   session resynchronizes before anything else (`need_resync`); a later landed commit
//!   takes the slot such an attempt aimed at, so it can no longer become the latest (the GC
//!   floor argument, `gc` module doc).
//! - Back-pressure: a commit whose tail would exceed `tail_segments_hard_max` segments (or
//!   [`TAIL_ENTRIES_HARD_FACTOR`] × the entry trigger) waits for the background checkpoint
//!   (starting one if none) and installs it, instead of growing the manifest further. The
//!   manifest therefore stays below ≈ 12–14 bytes × `tail_segments_hard_max` + ~100 bytes
//!   (a `SegmentRef` is two varints: a 9-byte id and a 3- or 5-byte size), ≈ 13 KiB by
//!   default, unless a single commit carries more segments than that by itself.
//! - [`Log::commit_rewrite`] (compaction, not a flush) still writes its checkpoint inline.

pub mod compact;
pub mod gc;
pub mod index;
pub mod lease;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::format::{
    self, CheckpointRef, CompressState, DirEntry, EntryKind, ExportKeys, FormatError, Manifest,
    SegmentBuilder, SegmentRef, FRAME_HEADER_BYTES, FRAME_RAW_BYTES_MAX, SEGMENT_FOOTER_BYTES,
};
use crate::store::{list_all, DynStore, PutMode, StoreError};
use index::{Index, Val};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: {source}")]
    Format { key: String, source: FormatError },
    #[error("fenced: export {export:?} was opened by a newer writer (our epoch {epoch}, found {newer_epoch})")]
    Fenced {
        export: String,
        epoch: u64,
        newer_epoch: u64,
    },
    #[error("export {export:?} does not exist")]
    NoSuchExport { export: String },
    #[error("manifest names a missing object {key}")]
    MissingObject { key: String },
    #[error("{key}: corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("export is open read-only")]
    ReadOnly,
    #[error("internal: {0}")]
    Internal(String),
}

pub type LogResult<T> = Result<T, LogError>;

fn fmt_err(key: &str) -> impl FnOnce(FormatError) -> LogError + '_ {
    move |source| LogError::Format {
        key: key.to_string(),
        source,
    }
}

/// Size of an export, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    pub block_size: u32,
}

impl Geometry {
    pub fn blocks(&self) -> u64 {
        self.size_bytes / self.block_size as u64
    }
    pub fn validate(&self) -> LogResult<()> {
        if !format::valid_block_size(self.block_size) {
            return Err(LogError::Invalid(format!(
                "block size {} (must be a power of two from 512 to 65536)",
                self.block_size
            )));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(self.block_size as u64) {
            return Err(LogError::Invalid(format!(
                "size {} must be a positive multiple of the block size {}",
                self.size_bytes, self.block_size
            )));
        }
        Ok(())
    }
}

/// Tunables, with limits named (units last).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Raw (uncompressed) data per segment before a new one is started.
    pub segment_bytes_max: usize,
    /// Raw bytes per frame: the unit of compression and of a read from the store.
    pub frame_bytes_max: usize,
    /// Segment uploads running at once during one commit.
    pub uploads_in_flight_max: usize,
    /// Tail segments a manifest may list before a background checkpoint is started (soft).
    pub tail_segments_max: usize,
    /// Tail segments a manifest may never exceed: a commit that would waits for the
    /// background checkpoint and installs it first (hard; > `tail_segments_max`). Bounds
    /// the manifest (≈ 13 bytes per tail segment) and the replay on open.
    pub tail_segments_hard_max: usize,
    /// Tail directory entries (replay work on open) before a background checkpoint is
    /// started, at least; the real trigger is also relative to the index size, so the
    /// amortized cost of checkpoints per flushed block stays constant. The hard limit is
    /// [`TAIL_ENTRIES_HARD_FACTOR`] times the trigger.
    pub tail_entries_min: usize,
    /// zstd level for segment frames; `None` stores every frame raw (readers accept
    /// either, so this is writer policy, not format).
    pub zstd_level: Option<i32>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 8 << 20,
            frame_bytes_max: 128 << 10,
            uploads_in_flight_max: 8,
            tail_segments_max: 256,
            tail_segments_hard_max: 1024,
            tail_entries_min: 128 * 1024,
            zstd_level: Some(-1),
        }
    }
}

/// The tail's hard limit on directory entries, as a multiple of the entry trigger
/// (`max(tail_entries_min, index extents)`): 2 × the index's runs, as when the trigger was
/// half of that and the factor 4. The trigger then fired twice as often, and a checkpoint
/// (decode the base, replay the tail, encode, compress: ~2 extents per flushed block) was
/// ~8% of the daemon's CPU in random writes.
pub const TAIL_ENTRIES_HARD_FACTOR: usize = 2;

/// How many background checkpoints one commit at the hard limit waits for before it gives
/// up (each failed one is replaced by a fresh one).
const CHECKPOINT_WAITS_MAX: usize = 3;

/// A background checkpoint whose base checkpoint is at most this big and whose tail has at
/// most `CHECKPOINT_INLINE_ENTRIES_MAX` entries is built on the async task itself (it takes
/// well under a millisecond, less than a hop to the blocking pool), else off the reactor.
const CHECKPOINT_INLINE_BYTES_MAX: usize = 64 * 1024;
const CHECKPOINT_INLINE_ENTRIES_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Take the writer role: commit a higher epoch, fencing any previous writer.
    Writer,
    /// Read the latest state; never write.
    ReadOnly,
}

/// One update in a commit batch: `blocks` blocks at `lba`.
#[derive(Debug, Clone)]
pub enum Update {
    /// Exactly `blocks * block_size` bytes.
    Data(Bytes),
    Unmap,
    ZeroAlloc,
}

#[derive(Debug, Clone)]
pub struct BatchEntry {
    pub lba: u64,
    pub blocks: u64,
    pub update: Update,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default)]
pub struct LogStats {
    pub commits: AtomicU64,
    pub segments_written: AtomicU64,
    pub segment_bytes_written: AtomicU64,
    pub manifest_bytes_written: AtomicU64,
    /// Checkpoints PUT (background ones when their PUT returned, compaction's inline).
    pub checkpoints_written: AtomicU64,
    pub checkpoint_bytes_written: AtomicU64,
    /// Background checkpoints named by a landed manifest.
    pub checkpoints_installed: AtomicU64,
    /// Background checkpoints dropped (failed, or their base changed under them).
    pub checkpoints_discarded: AtomicU64,
    /// Commits that waited for a background checkpoint at the tail's hard limit.
    pub commits_waited_for_checkpoint: AtomicU64,
    /// Background checkpoint build time (base decode + replay + encode, not the PUT), in
    /// microseconds: total and the longest one.
    pub checkpoint_build_us_total: AtomicU64,
    pub checkpoint_build_us_max: AtomicU64,
    pub frames_read: AtomicU64,
    pub frame_bytes_read: AtomicU64,
    /// Ranged GETs that fetched frames: fewer than `frames_read` when neighbouring frames
    /// of a segment were fetched together (see [`plan_frame_spans`]).
    pub frame_gets: AtomicU64,
    /// Bytes those GETs fetched, gaps between the wanted frames included.
    pub frame_get_bytes: AtomicU64,
    /// Requests the volume above has served (it counts them here): the background
    /// compactor waits for a quiet moment by watching this.
    pub foreground_requests: AtomicU64,
    /// Index extents of the background checkpoint being built right now (0 when none):
    /// the build decodes a copy of the index, which the volume charges to the cache.
    pub checkpoint_build_extents: AtomicU64,
    /// Segment PUTs that got a twin because the first ran long (see `Log::put_segment`).
    pub segment_puts_hedged: AtomicU64,
    /// Memory held by the directories of the current manifest's tail (kept for the
    /// background checkpoint's replay; up to [`TAIL_ENTRIES_HARD_FACTOR`] × the entry
    /// trigger, which follows the index): the volume charges it to the cache with the
    /// index. Updated whenever the tail changes.
    pub tail_dir_bytes: AtomicU64,
}

/// Adds a background checkpoint job's extents to `LogStats::checkpoint_build_extents`
/// for as long as the job exists, and takes them off when it ends, fails or is aborted
/// (its future dropped). Added and subtracted, not set: an aborted job's future may be
/// dropped after its replacement has started.
struct BuildCharge(Arc<LogStats>, u64);

impl BuildCharge {
    fn new(stats: &Arc<LogStats>, extents: usize) -> Self {
        let extents = extents as u64;
        stats
            .checkpoint_build_extents
            .fetch_add(extents, Ordering::AcqRel);
        Self(Arc::clone(stats), extents)
    }
}

impl Drop for BuildCharge {
    fn drop(&mut self) {
        self.0
            .checkpoint_build_extents
            .fetch_sub(self.1, Ordering::AcqRel);
    }
}

struct CommitState {
    manifest: Manifest,
    next_seq: u32,
    /// The directories of `manifest.tail`, in the same order (always the same length): the
    /// replay cost on open, and what a background checkpoint applies to its base.
    tail_dirs: Vec<Arc<Vec<DirEntry>>>,
    /// An earlier manifest PUT failed ambiguously: re-read before the next commit.
    need_resync: bool,
    /// Ids handed out whose objects no manifest is known to name yet: a compaction in
    /// progress ([`Log::allocate_id`]) and the background checkpoint. Garbage collection
    /// never deletes these.
    pending_ids: std::collections::BTreeSet<u64>,
    /// Formerly pending ids → the version of the landed manifest that first named them.
    /// GC keeps them until a pass whose manifest listing reached that version: a pass that
    /// listed manifests just before it landed would otherwise see an unnamed object that
    /// is no longer pending (`gc::gc_pass` drops the entries such a pass has seen).
    recently_named: std::collections::BTreeMap<u64, u64>,
    /// The background checkpoint being written or waiting to be installed (at most one).
    checkpoint: Option<BgCheckpoint>,
}

impl CommitState {
    fn tail_entries(&self) -> usize {
        self.tail_dirs.iter().map(|d| d.len()).sum()
    }

    /// What `tail_dirs` holds in memory: each directory's allocation and its headers.
    fn tail_dir_bytes(&self) -> usize {
        self.tail_dirs
            .iter()
            .map(|d| {
                d.capacity() * std::mem::size_of::<DirEntry>()
                    + std::mem::size_of::<Vec<DirEntry>>()
                    + 2 * std::mem::size_of::<usize>() // the Arc's counts
            })
            .sum()
    }
}

/// A checkpoint of the state of manifest `version`, written off the commit path (see the
/// module doc). It can replace `base_checkpoint` + the first `base_tail.len()` tail
/// segments of any later manifest that still has exactly that base.
struct BgCheckpoint {
    id: u64,
    version: u64,
    base_checkpoint: Option<CheckpointRef>,
    base_tail: Vec<u64>,
    base_tail_entries: usize,
    state: BgState,
}

enum BgState {
    Writing(tokio::task::JoinHandle<LogResult<CheckpointRef>>),
    Written(CheckpointRef),
}

impl BgCheckpoint {
    fn base_matches(&self, m: &Manifest) -> bool {
        m.checkpoint == self.base_checkpoint
            && m.tail.len() >= self.base_tail.len()
            && m.tail
                .iter()
                .zip(&self.base_tail)
                .all(|(s, id)| s.id == *id)
    }
    fn written(&self) -> Option<CheckpointRef> {
        match self.state {
            BgState::Written(c) => Some(c),
            BgState::Writing(_) => None,
        }
    }
}

pub struct Log {
    store: DynStore,
    keys: ExportKeys,
    name: String,
    geometry: Geometry,
    cfg: LogConfig,
    mode: OpenMode,
    epoch: u64,
    nonce: u64,
    index: RwLock<Index>,
    commit: tokio::sync::Mutex<CommitState>,
    fenced: AtomicBool,
    version: AtomicU64,
    /// Shared with the background checkpoint task.
    pub stats: Arc<LogStats>,
    /// How compressible recent writes were, carried between segments (a hint only).
    compress: std::sync::Mutex<CompressState>,
    /// Segment buffers kept for the next flush.
    seg_bufs: BufPool,
    /// Back-pressure from the index's memory bound (armed by the background compactor).
    pub index_gate: compact::IndexGate,
    /// Back-pressure from stored bytes over live ones (armed by the background compactor).
    pub space_gate: compact::SpaceGate,
    /// How long recent segment PUTs took (microseconds, newest last, at most
    /// [`PUT_LATENCY_SAMPLES`]): the hedge delay follows their median.
    put_latencies: std::sync::Mutex<std::collections::VecDeque<u64>>,
    /// Segment uploads in flight, across every batch being prepared (each holds a permit
    /// and one segment buffer): `uploads_in_flight_max`.
    upload_slots: tokio::sync::Semaphore,
    /// Taken by a batch while it queues for its upload slots, so an older batch gets all
    /// of its slots before a newer one gets any (the older one lands first).
    upload_queue: tokio::sync::Mutex<()>,
    /// GC passes running now ([`gc::gc_pass`]); see [`Log::land`].
    pub(crate) gc_passes_active: std::sync::atomic::AtomicUsize,
}

/// A batch's segments, uploaded (durable) and not yet named by a manifest: made by
/// [`Log::prepare`], committed by [`Log::land`]. Their ids are pending (GC keeps them)
/// until then; a `Prepared` given up is passed to [`Log::abandon`] (dropped instead, its
/// ids stay pending for the session: a leak, never a loss).
#[derive(Debug)]
pub struct Prepared {
    segs: Vec<SegmentRef>,
    dirs: Vec<Arc<Vec<DirEntry>>>,
}

/// Segment PUT latencies kept for the hedge delay.
const PUT_LATENCY_SAMPLES: usize = 64;
/// Samples needed before the median sets the hedge delay ([`PUT_HEDGE_DELAY_DEFAULT`] until
/// then).
const PUT_LATENCY_SAMPLES_MIN: usize = 8;
/// A segment PUT still running after this many times the recent median gets a twin.
const PUT_HEDGE_MEDIAN_FACTOR: u32 = 2;
/// Bounds of the hedge delay: never sooner (a twin costs a request and the bytes again),
/// never later.
const PUT_HEDGE_DELAY_MIN: Duration = Duration::from_millis(200);
const PUT_HEDGE_DELAY_MAX: Duration = Duration::from_secs(30);
const PUT_HEDGE_DELAY_DEFAULT: Duration = Duration::from_secs(1);

/// Segment buffers kept for reuse, at most one per concurrent upload. Why: a fresh 8 MiB
/// buffer page-faults and the kernel zeroes each of its 2,048 pages as the segment is
/// built — 7% of the daemon's CPU under random 4 KiB writes. Costs at most
/// `uploads_in_flight_max` x (segment size) of resident memory, the same as one full round
/// of uploads already holds.
struct BufPool {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
    max: usize,
    /// Larger buffers (an oversized batch entry) are not kept.
    cap_max: usize,
}

impl BufPool {
    fn new(max: usize, cap_max: usize) -> Self {
        Self {
            bufs: std::sync::Mutex::new(Vec::new()),
            max,
            cap_max,
        }
    }

    fn take(&self) -> Vec<u8> {
        self.bufs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Keep the buffer behind `b` if nobody else holds it any more (a store may still).
    fn give_back(&self, b: Bytes) {
        let Ok(mut m) = b.try_into_mut() else {
            return;
        };
        // Emptied first: `Vec::from` moves the contents to the front, a copy of the whole
        // segment for nothing.
        m.clear();
        let v = Vec::from(m);
        if v.capacity() > self.cap_max {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < self.max {
            bufs.push(v);
        }
    }
}

impl Log {
    fn compress_state(&self) -> CompressState {
        *self.compress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_compress_state(&self, state: CompressState) {
        *self.compress.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Nobody can install it any more: stop the upload (an object that landed anyway is
        // an orphan that GC removes).
        if let Some(BgCheckpoint {
            state: BgState::Writing(task),
            ..
        }) = &self.commit.get_mut().checkpoint
        {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("export", &self.name)
            .field("epoch", &self.epoch)
            .field("version", &self.version())
            .finish()
    }
}

/// Latest manifest version present, or None.
pub async fn latest_version(store: &DynStore, keys: &ExportKeys) -> LogResult<Option<u64>> {
    let prefix = keys.manifest_prefix();
    let all = list_all(store.as_ref(), &prefix).await?;
    Ok(all
        .iter()
        .filter_map(|o| format::parse_numbered_key(&prefix, &o.key))
        .max())
}

pub async fn read_manifest(
    store: &DynStore,
    keys: &ExportKeys,
    version: u64,
) -> LogResult<Manifest> {
    let key = keys.manifest(version);
    let body = store.get(&key).await?;
    let m = format::decode_manifest(&body).map_err(fmt_err(&key))?;
    if m.version != version {
        return Err(LogError::Corrupt {
            key,
            reason: format!("manifest says version {}", m.version),
        });
    }
    Ok(m)
}

/// Read a segment's directory with one ranged GET of its tail (a second one only when the
/// directory is larger than the first read).
pub async fn read_segment_directory(
    store: &DynStore,
    keys: &ExportKeys,
    seg: SegmentRef,
) -> LogResult<Vec<DirEntry>> {
    let key = keys.segment(seg.id);
    let size = seg.size_bytes;
    if size < (format::SEGMENT_HEADER_BYTES + SEGMENT_FOOTER_BYTES) as u64 {
        return Err(LogError::Corrupt {
            key,
            reason: format!("size {size} too small for a segment"),
        });
    }
    let tail_len = size.min(64 * 1024);
    let tail = get_range_exact(store, &key, size - tail_len..size).await?;
    let footer = format::parse_segment_footer(&tail, size).map_err(fmt_err(&key))?;
    if footer.segment_id != seg.id {
        return Err(LogError::Corrupt {
            key,
            reason: format!("footer names segment {}", footer.segment_id),
        });
    }
    let dir_start = footer.dir_offset;
    let dir_end = dir_start + footer.dir_len as u64;
    let dir = if dir_start >= size - tail_len {
        let s = (dir_start - (size - tail_len)) as usize;
        tail.slice(s..s + footer.dir_len as usize)
    } else {
        get_range_exact(store, &key, dir_start..dir_end).await?
    };
    format::parse_segment_directory(&dir, &footer).map_err(fmt_err(&key))
}

/// `get_range` that maps a missing object to `MissingObject` and checks the length (a
/// short body is never passed on as data).
async fn get_range_exact(
    store: &DynStore,
    key: &str,
    range: std::ops::Range<u64>,
) -> LogResult<Bytes> {
    let want = range.end - range.start;
    let b = store.get_range(key, range).await.map_err(|e| match e {
        StoreError::NotFound { key } => LogError::MissingObject { key },
        other => LogError::Store(other),
    })?;
    if b.len() as u64 != want {
        return Err(LogError::Store(StoreError::Transient {
            key: key.to_string(),
            reason: format!("short read: {} of {want} bytes", b.len()),
        }));
    }
    Ok(b)
}

/// Group frames `(segment, offset, length)` into spans that one ranged GET each fetches:
/// frames of one segment, taken in offset order, join a span while the gap before them is
/// at most `gap_max` bytes and the span stays within `bytes_max` (a larger frame is a span
/// of its own). Returns, per span, the indices into `frames` it covers, in offset order.
///
/// Why: the log keeps a flush's blocks in LBA order, so after random writes a read or a
/// compaction pass needs many small frames that sit close together in few segments. One
/// GET each cost a request (an S3 bill line, a round trip, a file open) per 4 KiB; reading
/// the gaps too is cheaper up to a point, which `gap_max` sets.
pub fn plan_frame_spans(
    frames: &[(u64, u64, u32)],
    gap_max: u64,
    bytes_max: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..frames.len()).collect();
    order.sort_by_key(|&i| (frames[i].0, frames[i].1));
    let mut spans: Vec<Vec<usize>> = Vec::new();
    // (segment, span start, span end) of the span being grown.
    let mut cur: Option<(u64, u64, u64)> = None;
    for i in order {
        let (seg, off, len) = frames[i];
        let end = off.saturating_add(len as u64);
        match cur {
            Some((s, start, e))
                if s == seg
                    && off.saturating_sub(e) <= gap_max
                    && end.max(e) - start <= bytes_max =>
            {
                cur = Some((s, start, e.max(end)));
                if let Some(last) = spans.last_mut() {
                    last.push(i);
                }
            }
            _ => {
                cur = Some((seg, off, end));
                spans.push(vec![i]);
            }
        }
    }
    spans
}

/// PUT an encoded checkpoint (IfAbsent: ids are never reused) and count it.
async fn put_checkpoint(
    store: &DynStore,
    keys: &ExportKeys,
    stats: &LogStats,
    id: u64,
    body: Vec<u8>,
) -> LogResult<CheckpointRef> {
    let size = body.len() as u64;
    store
        .put(&keys.checkpoint(id), Bytes::from(body), PutMode::IfAbsent)
        .await?;
    stats.checkpoints_written.fetch_add(1, Ordering::Relaxed);
    stats
        .checkpoint_bytes_written
        .fetch_add(size, Ordering::Relaxed);
    Ok(CheckpointRef {
        id,
        size_bytes: size,
    })
}

/// Rebuild the index a manifest describes: its checkpoint, then its tail in order.
/// Returns the index and the number of tail directory entries (replay cost).
pub async fn load_index(
    store: &DynStore,
    keys: &ExportKeys,
    m: &Manifest,
    uploads_in_flight_max: usize,
) -> LogResult<(Index, usize)> {
    let (idx, dirs) = load_index_and_tail(store, keys, m, uploads_in_flight_max).await?;
    Ok((idx, dirs.iter().map(|d| d.len()).sum()))
}

/// GET a checkpoint object, mapping a missing one to `MissingObject`.
async fn get_checkpoint_body(store: &DynStore, key: &str) -> LogResult<Bytes> {
    store.get(key).await.map_err(|e| match e {
        StoreError::NotFound { key } => LogError::MissingObject { key },
        other => LogError::Store(other),
    })
}

/// Decode and validate a checkpoint body into an index (CPU-heavy for big ones).
fn index_from_checkpoint_body(
    key: &str,
    body: &[u8],
    size_bytes: u64,
    block_size: u32,
) -> LogResult<Index> {
    let c = format::decode_checkpoint(body).map_err(fmt_err(key))?;
    if c.size_bytes != size_bytes || c.block_size != block_size {
        return Err(LogError::Corrupt {
            key: key.to_string(),
            reason: "checkpoint geometry differs from manifest".into(),
        });
    }
    Index::from_checkpoint(&c, size_bytes / block_size as u64).map_err(|reason| LogError::Corrupt {
        key: key.to_string(),
        reason,
    })
}

/// [`load_index`], also returning the tail's directories (in tail order).
async fn load_index_and_tail(
    store: &DynStore,
    keys: &ExportKeys,
    m: &Manifest,
    uploads_in_flight_max: usize,
) -> LogResult<(Index, Vec<Arc<Vec<DirEntry>>>)> {
    let geometry_blocks = m.size_bytes / m.block_size as u64;
    let mut idx = match m.checkpoint {
        None => Index::new(),
        Some(cref) => {
            let key = keys.checkpoint(cref.id);
            let body = get_checkpoint_body(store, &key).await?;
            let (size_bytes, block_size) = (m.size_bytes, m.block_size);
            tokio::task::spawn_blocking(move || {
                index_from_checkpoint_body(&key, &body, size_bytes, block_size)
            })
            .await
            .map_err(|e| LogError::Internal(e.to_string()))??
        }
    };
    // Directories are fetched in parallel (unordered: one slow GET must not hold the
    // others back) but applied strictly in commit order.
    let mut fetched: Vec<(usize, Vec<DirEntry>)> =
        futures::stream::iter(m.tail.iter().copied().enumerate())
            .map(|(i, s)| async move {
                Ok::<_, LogError>((i, read_segment_directory(store, keys, s).await?))
            })
            .buffer_unordered(uploads_in_flight_max.max(1))
            .try_collect()
            .await?;
    fetched.sort_unstable_by_key(|(i, _)| *i);
    let dirs: Vec<Vec<DirEntry>> = fetched.into_iter().map(|(_, d)| d).collect();
    for (s, dir) in m.tail.iter().zip(&dirs) {
        for e in dir {
            if e.lba
                .checked_add(e.blocks)
                .is_none_or(|end| end > geometry_blocks)
            {
                return Err(LogError::Corrupt {
                    key: keys.segment(s.id),
                    reason: format!("entry {e:?} past the end of the device"),
                });
            }
        }
        idx.apply_segment(*s, dir);
    }
    Ok((idx, dirs.into_iter().map(Arc::new).collect()))
}

/// Everything a background checkpoint needs, owned (the task outlives no `Log` borrow).
struct CheckpointJob {
    store: DynStore,
    keys: ExportKeys,
    id: u64,
    /// The manifest version whose state this is.
    version: u64,
    geometry: Geometry,
    base: Option<CheckpointRef>,
    tail: Vec<(SegmentRef, Arc<Vec<DirEntry>>)>,
    stats: Arc<LogStats>,
    /// Dropped with the job (done, failed or aborted).
    _charge: BuildCharge,
}

impl CheckpointJob {
    /// GET the base checkpoint (checked: crc, geometry, references), replay the tail on it,
    /// encode, PUT IfAbsent. The result is exactly the index that loading `version`'s
    /// manifest gives; only a commit that finds the base unchanged names it.
    async fn run(self) -> LogResult<CheckpointRef> {
        let base = match self.base {
            Some(c) => {
                let key = self.keys.checkpoint(c.id);
                let body = get_checkpoint_body(&self.store, &key).await?;
                if body.len() as u64 != c.size_bytes {
                    return Err(LogError::Corrupt {
                        key,
                        reason: format!("{} bytes, manifest says {}", body.len(), c.size_bytes),
                    });
                }
                Some((key, body))
            }
            None => None,
        };
        let entries: usize = self.tail.iter().map(|(_, d)| d.len()).sum();
        let inline = base
            .as_ref()
            .is_none_or(|(_, b)| b.len() <= CHECKPOINT_INLINE_BYTES_MAX)
            && entries <= CHECKPOINT_INLINE_ENTRIES_MAX;
        let (g, version, tail) = (self.geometry, self.version, self.tail);
        let started = std::time::Instant::now();
        let build = move || -> LogResult<Vec<u8>> {
            let mut idx = match base {
                Some((key, body)) => {
                    index_from_checkpoint_body(&key, &body, g.size_bytes, g.block_size)?
                }
                None => Index::new(),
            };
            for (s, d) in &tail {
                idx.apply_segment(*s, d);
            }
            let c = idx.to_checkpoint(version, g.size_bytes, g.block_size);
            Ok(format::encode_checkpoint(&c))
        };
        let body = if inline {
            build()?
        } else {
            // At the lowest priority: nothing waits for a checkpoint but a commit at the
            // tail's hard limit, and while that waits the CPU is free for it anyway.
            crate::background::run(build)
                .await
                .map_err(|e| LogError::Internal(e.to_string()))??
        };
        let build_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats
            .checkpoint_build_us_total
            .fetch_add(build_us, Ordering::Relaxed);
        self.stats
            .checkpoint_build_us_max
            .fetch_max(build_us, Ordering::Relaxed);
        put_checkpoint(&self.store, &self.keys, &self.stats, self.id, body).await
    }
}

/// What became of a manifest PUT (see [`Log::land_manifest`]).
enum Landing {
    /// It landed and no newer version exists: the commit point.
    Landed,
    /// The slot holds an earlier attempt of this session that we had seen fail.
    EarlierAttemptLanded,
}

impl Log {
    /// Open (and with `create`, create if missing) an export.
    pub async fn open(
        store: DynStore,
        export_name: &str,
        create: Option<Geometry>,
        cfg: LogConfig,
        mode: OpenMode,
    ) -> LogResult<Log> {
        let keys = ExportKeys::new(export_name).map_err(|e| LogError::Invalid(e.to_string()))?;
        if let Some(g) = create {
            g.validate()?;
        }
        if cfg.frame_bytes_max == 0 || cfg.frame_bytes_max > FRAME_RAW_BYTES_MAX {
            return Err(LogError::Invalid("frame_bytes_max out of range".into()));
        }
        if cfg.tail_segments_hard_max <= cfg.tail_segments_max {
            return Err(LogError::Invalid(format!(
                "tail_segments_hard_max {} must exceed tail_segments_max {}",
                cfg.tail_segments_hard_max, cfg.tail_segments_max
            )));
        }
        let nonce: u64 = rand::random();
        // Loop: racing openers and writers may take the version we aim for.
        let (pool_max, pool_cap_max) = (
            cfg.uploads_in_flight_max.max(1),
            cfg.segment_bytes_max.saturating_mul(2) + (1 << 20),
        );
        for _attempt in 0..64 {
            let latest = latest_version(&store, &keys).await?;
            let base = match latest {
                Some(v) => match read_manifest(&store, &keys, v).await {
                    Ok(m) => Some(m),
                    // GC removed it between LIST and GET: look again.
                    Err(LogError::Store(StoreError::NotFound { .. })) => continue,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let base = match (base, create, mode) {
                (Some(m), _, _) => {
                    if m.export_name != export_name {
                        return Err(LogError::Corrupt {
                            key: keys.manifest(m.version),
                            reason: format!(
                                "manifest belongs to export {:?} (key collision)",
                                m.export_name
                            ),
                        });
                    }
                    m
                }
                (None, Some(g), OpenMode::Writer) => {
                    let m = Manifest {
                        version: 1,
                        export_name: export_name.to_string(),
                        size_bytes: g.size_bytes,
                        block_size: g.block_size,
                        writer_epoch: 1,
                        writer_nonce: nonce,
                        created_unix_ms: crate::util::unix_ms_now(),
                        checkpoint: None,
                        tail: Vec::new(),
                        gc_low_water: 1,
                    };
                    let body = Bytes::from(format::encode_manifest(&m));
                    match store.put(&keys.manifest(1), body, PutMode::IfAbsent).await {
                        Ok(()) => {}
                        Err(StoreError::PreconditionFailed { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    tracing::info!(
                        export = export_name,
                        size_bytes = g.size_bytes,
                        block_size = g.block_size,
                        "created export"
                    );
                    // Fall through to take the writer role with a fresh epoch like any
                    // other opener (epoch 1 is the creator's placeholder).
                    continue;
                }
                (None, _, _) => {
                    return Err(LogError::NoSuchExport {
                        export: export_name.to_string(),
                    })
                }
            };
            let geometry = Geometry {
                size_bytes: base.size_bytes,
                block_size: base.block_size,
            };
            geometry.validate().map_err(|e| LogError::Corrupt {
                key: keys.manifest(base.version),
                reason: e.to_string(),
            })?;
            let (index, tail_dirs) =
                load_index_and_tail(&store, &keys, &base, cfg.uploads_in_flight_max).await?;
            let (manifest, epoch) = match mode {
                OpenMode::ReadOnly => (base.clone(), base.writer_epoch),
                OpenMode::Writer => {
                    let mut m = base.clone();
                    m.version = base.version + 1;
                    m.writer_epoch = base.writer_epoch + 1;
                    m.writer_nonce = nonce;
                    m.created_unix_ms = crate::util::unix_ms_now();
                    let body = Bytes::from(format::encode_manifest(&m));
                    match store
                        .put(&keys.manifest(m.version), body, PutMode::IfAbsent)
                        .await
                    {
                        Ok(()) => {}
                        Err(StoreError::PreconditionFailed { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    // Same GC trap as in `commit`: between our LIST and this PUT the writer
                    // may have committed on and GC freed our slot, so the PUT landed below
                    // the latest version and `base` is stale. Start over on the real latest.
                    let after = keys.manifest(m.version);
                    let newer = store.list(&keys.manifest_prefix(), Some(&after), 1).await?;
                    if !newer.objects.is_empty() {
                        continue;
                    }
                    let epoch = m.writer_epoch;
                    (m, epoch)
                }
            };
            tracing::info!(
                export = export_name,
                version = manifest.version,
                epoch,
                mapped_blocks = index.mapped_blocks(),
                tail_segments = manifest.tail.len(),
                "opened export"
            );
            let version = manifest.version;
            let state = CommitState {
                manifest,
                next_seq: 0,
                tail_dirs,
                need_resync: false,
                pending_ids: std::collections::BTreeSet::new(),
                recently_named: std::collections::BTreeMap::new(),
                checkpoint: None,
            };
            let stats = Arc::new(LogStats::default());
            stats
                .tail_dir_bytes
                .store(state.tail_dir_bytes() as u64, Ordering::Release);
            return Ok(Log {
                store,
                keys,
                name: export_name.to_string(),
                geometry,
                cfg,
                mode,
                epoch,
                nonce,
                index: RwLock::new(index),
                commit: tokio::sync::Mutex::new(state),
                fenced: AtomicBool::new(false),
                version: AtomicU64::new(version),
                stats,
                compress: Default::default(),
                seg_bufs: BufPool::new(pool_max, pool_cap_max),
                index_gate: compact::IndexGate::default(),
                space_gate: compact::SpaceGate::default(),
                put_latencies: Default::default(),
                upload_slots: tokio::sync::Semaphore::new(pool_max),
                upload_queue: tokio::sync::Mutex::new(()),
                gc_passes_active: Default::default(),
            });
        }
        Err(LogError::Internal(
            "could not open: manifest versions kept changing (too many racing writers)".into(),
        ))
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn keys(&self) -> &ExportKeys {
        &self.keys
    }
    pub fn store(&self) -> &DynStore {
        &self.store
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }
    /// Latest version this log has committed or loaded.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    fn index_read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // Index mutations are plain map operations that cannot panic midway in a way that
        // breaks the map; a poisoned lock still guards a consistent structure.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }
    fn index_write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs covering `lba..lba+blocks`, holes as `None`.
    pub fn lookup(&self, lba: u64, blocks: u64) -> Vec<(u64, u64, Option<Val>)> {
        self.index_read().lookup(lba, blocks)
    }

    /// Run a closure over the index (inspection, compaction planning).
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.index_read())
    }

    /// Fetch, verify and decompress one frame with a single ranged GET.
    pub async fn read_frame(
        &self,
        seg: u64,
        frame_offset: u64,
        frame_len: u32,
    ) -> LogResult<format::Frame> {
        self.read_frame_span(seg, &[(frame_offset, frame_len)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(LogError::Internal("no frame decoded".into())))
    }

    /// Fetch frames `(offset, length)` of segment `seg` — one span of
    /// [`plan_frame_spans`] — with a single ranged GET, then verify and decompress each.
    /// The outer error is the GET's; each frame has its own result (a corrupt frame does
    /// not fail its neighbours).
    pub async fn read_frame_span(
        &self,
        seg: u64,
        frames: &[(u64, u32)],
    ) -> LogResult<Vec<LogResult<format::Frame>>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.keys.segment(seg);
        let mut start = u64::MAX;
        let mut end = 0u64;
        for &(off, len) in frames {
            let e = off
                .checked_add(len as u64)
                .ok_or_else(|| LogError::Internal("frame range overflows".into()))?;
            start = start.min(off);
            end = end.max(e);
        }
        let b = get_range_exact(&self.store, &key, start..end).await?;
        self.stats.frame_gets.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frame_get_bytes
            .fetch_add(end - start, Ordering::Relaxed);
        let bs = self.geometry.block_size;
        let frames: Vec<(u64, u32)> = frames.to_vec();
        let stats = Arc::clone(&self.stats);
        let decode = move || {
            frames
                .iter()
                .map(|&(off, len)| {
                    let at = (off - start) as usize;
                    stats.frames_read.fetch_add(1, Ordering::Relaxed);
                    stats
                        .frame_bytes_read
                        .fetch_add(len as u64, Ordering::Relaxed);
                    format::decode_frame(&b[at..at + len as usize], bs, off).map_err(fmt_err(&key))
                })
                .collect::<Vec<_>>()
        };
        if end - start > 64 * 1024 {
            tokio::task::spawn_blocking(decode)
                .await
                .map_err(|e| LogError::Internal(e.to_string()))
        } else {
            Ok(decode())
        }
    }

    /// Read `blocks` blocks from `lba` straight from the store (no cache): used by tests,
    /// the inspector and compaction. Holes read as zeros.
    pub async fn read_blocks(&self, lba: u64, blocks: u64) -> LogResult<Vec<u8>> {
        let bs = self.geometry.block_size as usize;
        let mut out = vec![0u8; blocks as usize * bs];
        for (s, l, v) in self.lookup(lba, blocks) {
            if let Some(Val::Frame {
                seg,
                frame_offset,
                frame_len,
                block_in_frame,
            }) = v
            {
                let f = self.read_frame(seg, frame_offset, frame_len).await?;
                let first = block_in_frame as u64;
                check_frame_covers(&self.keys.segment(seg), &f, s, first, l)?;
                let src = &f.data[first as usize * bs..(first + l) as usize * bs];
                let at = (s - lba) as usize * bs;
                out[at..at + src.len()].copy_from_slice(src);
            }
        }
        Ok(out)
    }

    /// Commit a batch of updates (sorted by lba, non-overlapping, inside the device):
    /// segments first, then the manifest. Returns the new version. On error nothing of the
    /// batch is visible unless a later reopen finds the manifest landed after all — it is
    /// then visible whole, never torn.
    ///
    /// Never writes a checkpoint: it may install a background checkpoint that is ready, and
    /// start one after landing when the tail is long (see the module doc). Writes one
    /// segment per `segment_bytes_max` of data (one for a small batch) and one manifest.
    pub async fn commit(&self, batch: &[BatchEntry]) -> LogResult<u64> {
        let prepared = self.prepare(batch).await?;
        self.land(prepared).await
    }

    /// Step 1 of a commit: build the batch's segments and upload them (at most
    /// `uploads_in_flight_max` at a time across all batches being prepared). Runs outside
    /// the commit lock, so the next batch's segments can upload while the previous one
    /// lands; batches that must land in order are landed in that order by the caller.
    /// The segments' ids are pending from allocation (GC keeps them: the floor argument
    /// in the `gc` module doc assumes a commit's own objects are written under the commit
    /// lock, which these are not) until `land` or `abandon`.
    pub async fn prepare(&self, batch: &[BatchEntry]) -> LogResult<Prepared> {
        if self.mode == OpenMode::ReadOnly {
            return Err(LogError::ReadOnly);
        }
        self.validate_batch(batch)?;
        let jobs = self.partition(batch);
        let with_ids = {
            let mut st = self.commit.lock().await;
            self.check_fenced(&st)?;
            let mut with_ids = Vec::with_capacity(jobs.len());
            for j in jobs {
                let id = self.next_id(&mut st)?;
                st.pending_ids.insert(id);
                with_ids.push((id, j));
            }
            with_ids
        };
        let ids: Vec<u64> = with_ids.iter().map(|(id, _)| *id).collect();
        match self.write_segments(with_ids).await {
            Ok((segs, dirs)) => Ok(Prepared {
                segs,
                dirs: dirs.into_iter().map(Arc::new).collect(),
            }),
            Err(e) => {
                // Nothing will name these: garbage for GC (some may have been written).
                let mut st = self.commit.lock().await;
                for id in &ids {
                    st.pending_ids.remove(id);
                }
                Err(e)
            }
        }
    }

    /// Give up a prepared batch that will not be landed: its segments become garbage.
    pub async fn abandon(&self, p: Prepared) {
        let mut st = self.commit.lock().await;
        for s in &p.segs {
            st.pending_ids.remove(&s.id);
        }
    }

    /// Step 2 of a commit: land a manifest naming the prepared segments (see
    /// [`Log::commit`]). On success the ids stop being pending; if a GC pass is running
    /// they go to `recently_named` (it may have listed manifests before this one landed
    /// and objects after), otherwise any later pass lists this manifest first. On a failure
    /// whose outcome is unknown (`need_resync`: the manifest may yet land, even after a
    /// later GC commit) they stay pending; on any other failure they are garbage.
    pub async fn land(&self, p: Prepared) -> LogResult<u64> {
        let mut st = self.commit.lock().await;
        let r = self.land_locked(&mut st, &p).await;
        match &r {
            Ok(v) => {
                // After the landing: a pass that starts from here on lists it.
                let record = self.gc_passes_active.load(Ordering::SeqCst) > 0;
                for s in &p.segs {
                    st.pending_ids.remove(&s.id);
                    if record {
                        st.recently_named.insert(s.id, *v);
                    }
                }
            }
            Err(_) if st.need_resync => {}
            Err(_) => {
                for s in &p.segs {
                    st.pending_ids.remove(&s.id);
                }
            }
        }
        r
    }

    async fn land_locked(&self, st: &mut CommitState, p: &Prepared) -> LogResult<u64> {
        self.check_fenced(st)?;
        if st.need_resync {
            self.resync(st).await?;
        }
        let segs = &p.segs;
        let dirs = &p.dirs;
        let new_entries: usize = dirs.iter().map(|d| d.len()).sum();
        // 2. Manifest, retried past our own earlier attempts that turned out to land.
        for _ in 0..8 {
            // Back-pressure: never let the tail pass its hard limit (waits, rarely).
            self.make_tail_room(st, segs.len(), new_entries).await?;
            let mut m = self.next_manifest(st);
            // A background checkpoint that is written and still fits replaces the part of
            // the tail it covers. Its object was PUT (and returned Ok) before this
            // manifest's PUT starts, like the segments above.
            // (`make_tail_room` just reconciled it with this manifest; checked again.)
            let install = st
                .checkpoint
                .as_ref()
                .filter(|bg| bg.base_matches(&st.manifest))
                .and_then(|bg| bg.written().map(|c| (c, bg.base_tail.len())));
            if let Some((cref, covered)) = install {
                m.checkpoint = Some(cref);
                m.tail.drain(..covered);
            }
            m.tail.extend(segs.iter().copied());
            match self.land_manifest(st, &m).await? {
                Landing::Landed => {}
                Landing::EarlierAttemptLanded => {
                    // An earlier attempt of ours that we saw fail did land: adopt it and
                    // commit again on top (its data is a subset of ours).
                    self.resync(st).await?;
                    continue;
                }
            }
            // 3. Publish to readers: the manifest landed and no newer version exists.
            {
                let mut idx = self.index_write();
                for (s, d) in segs.iter().zip(dirs.iter()) {
                    idx.apply_segment(*s, d);
                }
                if install.is_some() {
                    // Segments neither live nor in the tail are no longer part of the
                    // state's description (as after reopening from this manifest).
                    let tail: std::collections::HashSet<u64> =
                        m.tail.iter().map(|s| s.id).collect();
                    idx.segs
                        .retain(|id, s| s.blocks_live > 0 || tail.contains(id));
                }
            }
            if let Some((cref, covered)) = install {
                // Named by the latest manifest now, which GC always keeps once its listing
                // includes this version.
                st.tail_dirs.drain(..covered);
                st.pending_ids.remove(&cref.id);
                st.recently_named.insert(cref.id, m.version);
                st.checkpoint = None;
                self.stats
                    .checkpoints_installed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(export = %self.name, version = m.version, checkpoint = cref.id, "installed background checkpoint");
            }
            st.tail_dirs.extend(dirs.iter().cloned());
            debug_assert_eq!(st.tail_dirs.len(), m.tail.len());
            self.note_tail(st);
            let manifest_len = format::encode_manifest(&m).len() as u64;
            self.stats
                .manifest_bytes_written
                .fetch_add(manifest_len, Ordering::Relaxed);
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            let v = m.version;
            st.manifest = m;
            self.version.store(v, Ordering::Release);
            // 4. A long tail starts a checkpoint of the state just published. It is the
            // caller's flush that has landed: a failure here must not fail it.
            if st.checkpoint.is_none() && self.checkpoint_due(st) {
                if let Err(e) = self.start_checkpoint(st) {
                    tracing::warn!(export = %self.name, error = %e, "could not start a background checkpoint");
                }
            }
            return Ok(v);
        }
        Err(LogError::Internal(
            "commit kept colliding with our own earlier attempts".into(),
        ))
    }

    /// The next manifest on top of the current one, as this session's: same checkpoint and
    /// tail, version + 1.
    fn next_manifest(&self, st: &CommitState) -> Manifest {
        let mut m = st.manifest.clone();
        m.version += 1;
        m.writer_nonce = self.nonce;
        m.writer_epoch = self.epoch;
        m.created_unix_ms = crate::util::unix_ms_now();
        m
    }

    /// PUT the manifest IfAbsent (the commit point), then check that no newer version
    /// exists (FORMAT.md §10.3 steps 3–4). `Ok(Landed)` is the only outcome after which
    /// the caller may publish and acknowledge.
    async fn land_manifest(&self, st: &mut CommitState, m: &Manifest) -> LogResult<Landing> {
        match self.put_manifest(m).await {
            Ok(()) => {}
            Err(LogError::Store(StoreError::PreconditionFailed { key })) => {
                let other = read_manifest(&self.store, &self.keys, m.version).await?;
                if other.writer_nonce != self.nonce {
                    // Another writer took this version: a newer epoch (or, after GC, a
                    // writer we cannot order against). Either way we must stop.
                    return Err(self.fence(other.writer_epoch.max(self.epoch + 1)));
                }
                if other != *m {
                    tracing::warn!(%key, "earlier commit attempt landed");
                    return Ok(Landing::EarlierAttemptLanded);
                }
                // Else our own PUT landed on a retry inside the store client.
            }
            Err(e) => {
                // Ambiguous: the manifest may or may not exist. Re-read before the next
                // commit so we never build on a state we are unsure of.
                st.need_resync = true;
                return Err(e);
            }
        }
        // Fencing against GC: if any version above ours exists, a newer writer owns the
        // export and our version slot was one GC had freed. Our manifest is then an orphan
        // that no reader will choose; report failure so nothing is acknowledged.
        let after = self.keys.manifest(m.version);
        let newer = self
            .store
            .list(&self.keys.manifest_prefix(), Some(&after), 1)
            .await;
        match newer {
            Ok(p) if p.objects.is_empty() => Ok(Landing::Landed),
            Ok(p) => {
                let v = p
                    .objects
                    .first()
                    .and_then(|o| format::parse_numbered_key(&self.keys.manifest_prefix(), &o.key))
                    .unwrap_or(0);
                let e = read_manifest(&self.store, &self.keys, v)
                    .await
                    .map(|m| m.writer_epoch)
                    .unwrap_or(self.epoch + 1);
                Err(self.fence(e))
            }
            Err(e) => {
                st.need_resync = true;
                Err(e.into())
            }
        }
    }

    /// The soft triggers: the tail has more segments than `tail_segments_max`, or more
    /// directory entries than `max(tail_entries_min, index extents)`.
    fn checkpoint_due(&self, st: &CommitState) -> bool {
        st.manifest.tail.len() > self.cfg.tail_segments_max
            || st.tail_entries() > self.tail_entries_trigger()
    }

    /// Stored and live bytes of the segments the index names (O(segments)).
    pub fn space(&self) -> index::Space {
        self.index_read().space()
    }

    /// Runs in the in-memory page index (what its memory grows with).
    pub fn index_extents(&self) -> usize {
        self.index_read().map.len()
    }

    /// PUT a segment (IfAbsent). Where the store says it pays ([`crate::store::ObjectStore::hedge_puts`]),
    /// a PUT still running after [`PUT_HEDGE_MEDIAN_FACTOR`] × the median of recent ones
    /// gets an identical twin, and the first to succeed wins (the other is dropped).
    ///
    /// Why: a commit waits for its slowest segment, and writers wait for the commit once
    /// the dirty set is full. Against SeaweedFS most 8 MiB PUTs took 0.25–0.45 s but one
    /// or two per flush ~1.1 s: sustained writes ran at 59–88 MiB/s; with twins, 97–102.
    ///
    /// Safe because segment ids are never reused: only our own attempts write this key,
    /// with the same bytes. A failure of one attempt (a 412 when the twin landed first)
    /// waits for the other, whose result is the answer; no failure is taken for success.
    async fn put_segment(&self, key: &str, body: Bytes) -> crate::store::StoreResult<()> {
        if !self.store.hedge_puts() {
            return self.store.put(key, body, PutMode::IfAbsent).await;
        }
        let start = Instant::now();
        let delay = self.put_hedge_delay();
        let first = self.store.put(key, body.clone(), PutMode::IfAbsent);
        tokio::pin!(first);
        let r = match tokio::time::timeout(delay, first.as_mut()).await {
            Ok(r) => r,
            Err(_) => {
                self.stats
                    .segment_puts_hedged
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(export = %self.name, key, delay_ms = delay.as_millis() as u64, "segment PUT slow; racing a second one");
                let second = self.store.put(key, body, PutMode::IfAbsent);
                tokio::pin!(second);
                match futures::future::select(first, second).await {
                    futures::future::Either::Left((r, other))
                    | futures::future::Either::Right((r, other)) => match r {
                        Ok(()) => Ok(()),
                        Err(_) => other.await,
                    },
                }
            }
        };
        if r.is_ok() {
            self.note_put_latency(start.elapsed());
        }
        r
    }

    /// [`PUT_HEDGE_MEDIAN_FACTOR`] × the median of recent segment PUTs, within bounds.
    fn put_hedge_delay(&self) -> Duration {
        let lat = self.put_latencies.lock().unwrap_or_else(|p| p.into_inner());
        if lat.len() < PUT_LATENCY_SAMPLES_MIN {
            return PUT_HEDGE_DELAY_DEFAULT;
        }
        let mut v: Vec<u64> = lat.iter().copied().collect();
        drop(lat);
        let mid = v.len() / 2;
        let (_, median, _) = v.select_nth_unstable(mid);
        (Duration::from_micros(*median) * PUT_HEDGE_MEDIAN_FACTOR)
            .clamp(PUT_HEDGE_DELAY_MIN, PUT_HEDGE_DELAY_MAX)
    }

    /// Record a segment PUT's time (hedged ones included: from the first attempt's start,
    /// so a store that became slow across the board raises the delay rather than getting
    /// twins for every PUT).
    fn note_put_latency(&self, took: Duration) {
        let mut lat = self.put_latencies.lock().unwrap_or_else(|p| p.into_inner());
        if lat.len() == PUT_LATENCY_SAMPLES {
            lat.pop_front();
        }
        lat.push_back(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Publish the tail's memory (see `LogStats::tail_dir_bytes`).
    fn note_tail(&self, st: &CommitState) {
        self.stats
            .tail_dir_bytes
            .store(st.tail_dir_bytes() as u64, Ordering::Release);
    }

    fn tail_entries_trigger(&self) -> usize {
        let extents = self.index_read().map.len();
        self.cfg.tail_entries_min.max(extents)
    }

    /// Start a background checkpoint of the current manifest's state. Under the commit
    /// lock, with none in flight; the id is pending (kept by GC) from here on.
    fn start_checkpoint(&self, st: &mut CommitState) -> LogResult<()> {
        debug_assert!(st.checkpoint.is_none());
        let id = self.next_id(st)?;
        st.pending_ids.insert(id);
        let m = &st.manifest;
        let job = CheckpointJob {
            store: Arc::clone(&self.store),
            keys: self.keys.clone(),
            id,
            version: m.version,
            geometry: self.geometry,
            base: m.checkpoint,
            // The directories are shared, not copied: this costs O(tail segments) under
            // the lock whatever the size of the index.
            tail: m
                .tail
                .iter()
                .copied()
                .zip(st.tail_dirs.iter().cloned())
                .collect(),
            stats: Arc::clone(&self.stats),
            // The build's copy is about as large as the live index it replays.
            _charge: BuildCharge::new(&self.stats, self.index_extents()),
        };
        let span = tracing::debug_span!("checkpoint", export = %self.name, id, version = m.version);
        let task = tokio::spawn(tracing::Instrument::instrument(job.run(), span));
        tracing::debug!(export = %self.name, id, version = m.version, tail_segments = m.tail.len(), "started background checkpoint");
        st.checkpoint = Some(BgCheckpoint {
            id,
            version: m.version,
            base_checkpoint: m.checkpoint,
            base_tail: m.tail.iter().map(|s| s.id).collect(),
            base_tail_entries: st.tail_entries(),
            state: BgState::Writing(task),
        });
        Ok(())
    }

    /// Drop the background checkpoint: stop its upload if running and let GC have its id
    /// (no manifest of ours names it or may still land naming it: see the module doc).
    fn discard_checkpoint(&self, st: &mut CommitState, why: &str) {
        if let Some(bg) = st.checkpoint.take() {
            if let BgState::Writing(task) = &bg.state {
                task.abort();
            }
            st.pending_ids.remove(&bg.id);
            self.stats
                .checkpoints_discarded
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(export = %self.name, id = bg.id, version = bg.version, why, "discarded background checkpoint");
        }
    }

    /// After the manifest changed other than by installing it (resync, rewrite): the
    /// background checkpoint is installed already (the adopted manifest names it), still
    /// installable, or stale.
    fn reconcile_checkpoint(&self, st: &mut CommitState) {
        let Some(bg) = &st.checkpoint else { return };
        if bg.written().is_some() && st.manifest.checkpoint.map(|c| c.id) == Some(bg.id) {
            // An install attempt whose PUT looked failed did land and we adopted it.
            let id = bg.id;
            st.pending_ids.remove(&id);
            let v = st.manifest.version;
            st.recently_named.insert(id, v);
            st.checkpoint = None;
            self.stats
                .checkpoints_installed
                .fetch_add(1, Ordering::Relaxed);
        } else if !bg.base_matches(&st.manifest) {
            self.discard_checkpoint(st, "its base is no longer the manifest's");
        }
    }

    /// Collect the background checkpoint's outcome if it has finished (with `wait`, wait
    /// for it). A failed one is discarded and its error returned.
    async fn settle_checkpoint(&self, st: &mut CommitState, wait: bool) -> Option<LogError> {
        let bg = st.checkpoint.as_mut()?;
        if let BgState::Writing(task) = &mut bg.state {
            if !wait && !task.is_finished() {
                return None;
            }
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(LogError::Internal(format!("checkpoint task: {e}"))),
            };
            match r {
                Ok(cref) => bg.state = BgState::Written(cref),
                Err(e) => {
                    tracing::warn!(export = %self.name, id = bg.id, error = %e, "background checkpoint failed; a later commit starts another");
                    self.discard_checkpoint(st, "write failed");
                    return Some(e);
                }
            }
        }
        self.reconcile_checkpoint(st);
        None
    }

    /// Make sure this commit's tail (after installing a ready checkpoint) stays within the
    /// hard limits; else wait for the background checkpoint, starting one if none runs.
    /// Waiting holds the commit lock: later flushes queue behind this one (that is the
    /// back-pressure). Gives up after [`CHECKPOINT_WAITS_MAX`] failed checkpoints.
    async fn make_tail_room(
        &self,
        st: &mut CommitState,
        new_segments: usize,
        new_entries: usize,
    ) -> LogResult<()> {
        let mut last_err: Option<LogError> = None;
        let mut waited = false;
        for attempt in 0..=CHECKPOINT_WAITS_MAX {
            if let Some(e) = self.settle_checkpoint(st, false).await {
                last_err = Some(e);
            }
            let (mut segments, mut entries) = (st.manifest.tail.len(), st.tail_entries());
            if let Some(bg) = st.checkpoint.as_ref().filter(|b| b.written().is_some()) {
                segments -= bg.base_tail.len();
                entries -= bg.base_tail_entries;
            }
            let entries_hard = self
                .tail_entries_trigger()
                .saturating_mul(TAIL_ENTRIES_HARD_FACTOR);
            // With nothing left of the current tail, only this commit's own segments
            // remain: nothing can shorten that.
            let fits = segments + new_segments <= self.cfg.tail_segments_hard_max
                && entries + new_entries <= entries_hard;
            if fits || segments == 0 {
                if waited {
                    self.stats
                        .commits_waited_for_checkpoint
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            if attempt == CHECKPOINT_WAITS_MAX {
                break;
            }
            match &st.checkpoint {
                None => self.start_checkpoint(st)?,
                Some(bg) if bg.written().is_some() => {
                    // Written, but what it leaves of the tail is still too long (a big
                    // commit): replace it by one of the current state.
                    self.discard_checkpoint(st, "superseded at the hard limit");
                    self.start_checkpoint(st)?;
                }
                Some(_) => {}
            }
            tracing::debug!(export = %self.name, tail_segments = st.manifest.tail.len(), "tail at its hard limit; waiting for the background checkpoint");
            waited = true;
            if let Some(e) = self.settle_checkpoint(st, true).await {
                last_err = Some(e);
            }
        }
        Err(last_err.unwrap_or_else(|| {
            LogError::Internal("tail at its hard limit and no checkpoint could be installed".into())
        }))
    }

    fn fence(&self, newer_epoch: u64) -> LogError {
        self.fenced.store(true, Ordering::Release);
        tracing::error!(export = %self.name, epoch = self.epoch, newer_epoch, "fenced by a newer writer; refusing further writes");
        LogError::Fenced {
            export: self.name.clone(),
            epoch: self.epoch,
            newer_epoch,
        }
    }

    fn check_fenced(&self, st: &CommitState) -> LogResult<()> {
        if self.is_fenced() {
            return Err(LogError::Fenced {
                export: self.name.clone(),
                epoch: self.epoch,
                newer_epoch: st.manifest.writer_epoch.max(self.epoch + 1),
            });
        }
        Ok(())
    }

    async fn put_manifest(&self, m: &Manifest) -> LogResult<()> {
        let body = Bytes::from(format::encode_manifest(m));
        self.store
            .put(&self.keys.manifest(m.version), body, PutMode::IfAbsent)
            .await?;
        Ok(())
    }

    /// Re-read the latest manifest; adopt it if it is ours, else we are fenced.
    async fn resync(&self, st: &mut CommitState) -> LogResult<()> {
        let latest = latest_version(&self.store, &self.keys)
            .await?
            .ok_or_else(|| LogError::NoSuchExport {
                export: self.name.clone(),
            })?;
        if latest != st.manifest.version {
            let m = read_manifest(&self.store, &self.keys, latest).await?;
            if m.writer_epoch != self.epoch || m.writer_nonce != self.nonce {
                return Err(self.fence(m.writer_epoch));
            }
            let (idx, tail_dirs) =
                load_index_and_tail(&self.store, &self.keys, &m, self.cfg.uploads_in_flight_max)
                    .await?;
            *self.index_write() = idx;
            st.tail_dirs = tail_dirs;
            self.note_tail(st);
            self.version.store(m.version, Ordering::Release);
            st.manifest = m;
        }
        st.need_resync = false;
        // Settles an install attempt that was ambiguous: the adopted manifest names the
        // checkpoint (installed), or the manifest is unchanged (still installable).
        self.reconcile_checkpoint(st);
        Ok(())
    }

    fn validate_batch(&self, batch: &[BatchEntry]) -> LogResult<()> {
        let blocks = self.geometry.blocks();
        let bs = self.geometry.block_size as u64;
        let mut prev_end = 0;
        for e in batch {
            let end = e.lba.checked_add(e.blocks);
            if e.blocks == 0 || end.is_none_or(|end| end > blocks) || e.lba < prev_end {
                return Err(LogError::Invalid(format!(
                    "batch entry {}+{} unsorted, overlapping or outside the device",
                    e.lba, e.blocks
                )));
            }
            if let Update::Data(d) = &e.update {
                if d.len() as u64 != e.blocks * bs {
                    return Err(LogError::Invalid(
                        "data length is not blocks * block size".into(),
                    ));
                }
            }
            prev_end = e.lba + e.blocks;
        }
        Ok(())
    }

    fn next_id(&self, st: &mut CommitState) -> LogResult<u64> {
        let seq = st.next_seq;
        st.next_seq = seq.checked_add(1).ok_or_else(|| {
            LogError::Internal("object ids exhausted for this epoch; reopen".into())
        })?;
        Ok(format::object_id(self.epoch, seq))
    }

    /// Split the batch into segments, build them off the reactor, upload them in parallel
    /// (bounded). Returns refs and directories in id (= commit) order.
    /// Split a batch into segment jobs: each gets entries up to `segment_bytes_max` of raw
    /// data; ranges that carry no data ride along in the current job. Never an empty job.
    fn partition(&self, batch: &[BatchEntry]) -> Vec<Vec<BatchEntry>> {
        let mut jobs: Vec<Vec<BatchEntry>> = vec![Vec::new()];
        let mut job_bytes = 0usize;
        let bs = self.geometry.block_size as usize;
        for e in batch {
            match &e.update {
                Update::Data(d) => {
                    let mut off = 0usize;
                    while off < d.len() {
                        if job_bytes >= self.cfg.segment_bytes_max {
                            jobs.push(Vec::new());
                            job_bytes = 0;
                        }
                        let room = (self.cfg.segment_bytes_max - job_bytes).max(bs);
                        let take = room.min(d.len() - off) / bs * bs;
                        let take = take.max(bs);
                        let lba = e.lba + (off / bs) as u64;
                        if let Some(j) = jobs.last_mut() {
                            j.push(BatchEntry {
                                lba,
                                blocks: (take / bs) as u64,
                                update: Update::Data(d.slice(off..off + take)),
                            });
                        }
                        job_bytes += take;
                        off += take;
                    }
                }
                _ => {
                    if let Some(j) = jobs.last_mut() {
                        j.push(e.clone());
                    }
                }
            }
        }
        jobs.retain(|j| !j.is_empty());
        jobs
    }

    /// Build the jobs' segments off the reactor and upload them, each holding one of the
    /// log's upload slots. Returns refs and directories in id (= commit) order.
    async fn write_segments(
        &self,
        with_ids: Vec<(u64, Vec<BatchEntry>)>,
    ) -> LogResult<(Vec<SegmentRef>, Vec<Vec<DirEntry>>)> {
        // Uploads finish in any order and a slot is refilled as soon as any one ends (a
        // straggling PUT does not idle the others); results are put back in id (commit)
        // order below. An error returns at once, dropping (cancelling) the rest.
        if with_ids.is_empty() {
            // An empty commit (GC's, an install): nothing to queue behind other batches for.
            return Ok((Vec::new(), Vec::new()));
        }
        let mut running = futures::stream::FuturesUnordered::new();
        let mut results: Vec<(SegmentRef, Vec<DirEntry>)> = Vec::with_capacity(with_ids.len());
        {
            // Older batches take all their slots first: they land first.
            let _queue = self.upload_queue.lock().await;
            for (id, job) in with_ids {
                let permit = loop {
                    tokio::select! {
                        p = self.upload_slots.acquire() => {
                            break p.map_err(|_| LogError::Internal("upload slots closed".into()))?;
                        }
                        Some(r) = running.next(), if !running.is_empty() => results.push(r?),
                    }
                };
                running.push(async move {
                    // The slot is held until the PUT returns: it bounds the buffers too.
                    let _permit = permit;
                    self.upload_job(id, job).await
                });
            }
        }
        while let Some(r) = running.next().await {
            results.push(r?);
        }
        results.sort_unstable_by_key(|(r, _)| r.id);
        Ok(results.into_iter().unzip())
    }

    /// Build one segment off the reactor and PUT it.
    async fn upload_job(
        &self,
        id: u64,
        job: Vec<BatchEntry>,
    ) -> LogResult<(SegmentRef, Vec<DirEntry>)> {
        let cfg = self.cfg.clone();
        let (epoch, block_size) = (self.epoch, self.geometry.block_size);
        let compress = self.compress_state();
        let buf = self.seg_bufs.take();
        let (buf, start, dir, compress) = tokio::task::spawn_blocking(move || {
            build_segment(buf, id, epoch, block_size, &cfg, compress, &job)
        })
        .await
        .map_err(|e| LogError::Internal(e.to_string()))?;
        self.set_compress_state(compress);
        let buf = Bytes::from(buf);
        let segment = buf.slice(start..);
        let size = segment.len() as u64;
        self.put_segment(&self.keys.segment(id), segment).await?;
        self.seg_bufs.give_back(buf);
        self.stats.segments_written.fetch_add(1, Ordering::Relaxed);
        self.stats
            .segment_bytes_written
            .fetch_add(size, Ordering::Relaxed);
        Ok((
            SegmentRef {
                id,
                size_bytes: size,
            },
            dir,
        ))
    }

    async fn write_checkpoint(
        &self,
        st: &mut CommitState,
        idx: &Index,
        version: u64,
    ) -> LogResult<CheckpointRef> {
        let id = self.next_id(st)?;
        let c = idx.to_checkpoint(version, self.geometry.size_bytes, self.geometry.block_size);
        let body = tokio::task::spawn_blocking(move || format::encode_checkpoint(&c))
            .await
            .map_err(|e| LogError::Internal(e.to_string()))?;
        put_checkpoint(&self.store, &self.keys, &self.stats, id, body).await
    }

    /// The manifest this log last committed or loaded.
    pub async fn manifest(&self) -> Manifest {
        self.commit.lock().await.manifest.clone()
    }

    /// Write a checkpoint now and commit a manifest pointing at it (compaction uses this to
    /// publish a rewritten index; `rewrite` edits the index copy before it is written, under
    /// the commit lock so no flush interleaves). Not a flush: the checkpoint is written
    /// inline, and any background checkpoint is dropped (its base is about to change).
    pub async fn commit_rewrite<F>(
        &self,
        new_segments: &[(SegmentRef, Vec<DirEntry>)],
        rewrite: F,
    ) -> LogResult<u64>
    where
        F: FnOnce(&mut Index),
    {
        if self.mode == OpenMode::ReadOnly {
            return Err(LogError::ReadOnly);
        }
        let mut st = self.commit.lock().await;
        self.check_fenced(&st)?;
        if st.need_resync {
            self.resync(&mut st).await?;
        }
        // After the resync no install attempt is unresolved, so no manifest of ours that
        // may still land names the background checkpoint: it can go. (If this rewrite
        // fails, the next commit simply starts a new one.)
        self.discard_checkpoint(&mut st, "compaction rewrites the index");
        let mut idx = self.index_read().clone();
        for (s, _) in new_segments {
            let total = new_segments
                .iter()
                .find(|(x, _)| x.id == s.id)
                .map(|(_, d)| {
                    d.iter()
                        .filter(|e| e.kind == EntryKind::Data)
                        .map(|e| e.blocks)
                        .sum()
                })
                .unwrap_or(0);
            idx.segs.insert(
                s.id,
                index::SegStat {
                    size_bytes: s.size_bytes,
                    blocks_total: total,
                    blocks_live: 0,
                },
            );
        }
        rewrite(&mut idx);
        idx.drop_dead_segments();
        let mut m = self.next_manifest(&st);
        let cref = self.write_checkpoint(&mut st, &idx, m.version).await?;
        m.checkpoint = Some(cref);
        m.tail.clear();
        match self.land_manifest(&mut st, &m).await? {
            Landing::Landed => {}
            Landing::EarlierAttemptLanded => {
                st.need_resync = true;
                return Err(LogError::Internal(
                    "rewrite raced an earlier attempt; retry".into(),
                ));
            }
        }
        *self.index_write() = idx;
        st.tail_dirs.clear();
        self.note_tail(&st);
        let manifest_len = format::encode_manifest(&m).len() as u64;
        self.stats
            .manifest_bytes_written
            .fetch_add(manifest_len, Ordering::Relaxed);
        let v = m.version;
        st.manifest = m;
        self.version.store(v, Ordering::Release);
        Ok(v)
    }

    /// Wait for the background checkpoint being written, if any. Returns its id when one
    /// is written and waits for the next commit to install it (tests, benchmarks).
    pub async fn wait_checkpoint(&self) -> Option<u64> {
        let mut st = self.commit.lock().await;
        self.settle_checkpoint(&mut st, true).await;
        st.checkpoint.as_ref().map(|c| c.id)
    }

    /// Wait for the background checkpoint and install it with an empty commit (one
    /// manifest PUT). Returns whether one was installed. For a quiet moment: shutdown (the
    /// next open replays less), tests that want no work in flight.
    pub async fn finish_checkpoint(&self) -> LogResult<bool> {
        if self.wait_checkpoint().await.is_none() {
            return Ok(false);
        }
        let before = self.stats.checkpoints_installed.load(Ordering::Relaxed);
        self.commit(&[]).await?;
        Ok(self.stats.checkpoints_installed.load(Ordering::Relaxed) > before)
    }

    /// Pending ids that the landed manifest `version` names: no longer pending, but kept
    /// from GC until a pass has listed that version (see `CommitState::recently_named`).
    pub(crate) async fn named_by(&self, ids: &[u64], version: u64) {
        let mut st = self.commit.lock().await;
        for id in ids {
            st.pending_ids.remove(id);
            st.recently_named.insert(*id, version);
        }
    }

    /// Allocate an object id under the commit lock (compaction writes its own segments).
    /// The id stays pending (GC keeps its object) until the caller's commit names it or the
    /// caller releases it (`compact::release_ids`).
    pub async fn allocate_id(&self) -> LogResult<u64> {
        let mut st = self.commit.lock().await;
        let id = self.next_id(&mut st)?;
        st.pending_ids.insert(id);
        Ok(id)
    }
}

/// Check that `frame` holds blocks `first..first+len` for lbas `lba..`: a mismatch means the
/// index and the stored frame disagree (corruption or a bug), never data to return.
pub fn check_frame_covers(
    key: &str,
    f: &format::Frame,
    lba: u64,
    first: u64,
    len: u64,
) -> LogResult<()> {
    if first + len > f.blocks as u64 || f.first_lba + first != lba {
        return Err(LogError::Corrupt {
            key: key.to_string(),
            reason: format!(
                "frame holds lbas {}+{}, index expects {}+{} at block {}",
                f.first_lba, f.blocks, lba, len, first
            ),
        });
    }
    Ok(())
}

/// Build one segment from a job: data runs, neighbouring ones together, are cut into
/// frames of at most `frame_bytes_max`; all-zero blocks inside data become unmapped runs
/// (they cost nothing to store and read back as zeros). The directory is in lba order.
fn build_segment(
    buf: Vec<u8>,
    id: u64,
    epoch: u64,
    block_size: u32,
    cfg: &LogConfig,
    compress: CompressState,
    job: &[BatchEntry],
) -> (Vec<u8>, usize, Vec<DirEntry>, CompressState) {
    let bs = block_size as usize;
    let frame_blocks = (cfg.frame_bytes_max / bs).max(1);
    // Upper bound of the object when every frame stays raw: data, a header per frame and
    // a directory entry (under 40 bytes) per frame or range.
    let estimate: usize = job
        .iter()
        .map(|e| match &e.update {
            Update::Data(d) => {
                let frames = d.len().div_ceil(frame_blocks * bs);
                d.len() + frames * (FRAME_HEADER_BYTES + 40)
            }
            _ => 40,
        })
        .sum();
    // Aligned, so the file store writes this very buffer with O_DIRECT (no bounce copy).
    let mut b = SegmentBuilder::new_aligned_in(
        buf,
        estimate + SEGMENT_FOOTER_BYTES,
        id,
        epoch,
        block_size,
        cfg.zstd_level,
    )
    .with_compress_state(compress);
    // Every batch entry makes at least one directory entry (more only for runs longer
    // than a frame or split by zero blocks).
    b.reserve_entries(job.len());
    // Non-zero blocks go into the pending frame; neighbouring data runs (separate writes
    // of adjacent blocks: the batch is sorted by lba) share frames up to `frame_blocks`.
    // Fewer frames: fewer index runs (daemon memory), headers and directory entries, and
    // zstd sees more than one 4 KiB block at a time. Anything that is not data ends the
    // pending frame first, so the directory stays in lba order.
    let mut pending: Vec<&[u8]> = Vec::new();
    let mut pending_lba = 0u64;
    let mut pending_blocks = 0usize;
    fn emit(b: &mut SegmentBuilder, pending: &mut Vec<&[u8]>, lba: u64, blocks: &mut usize) {
        if !pending.is_empty() {
            b.add_frame_parts(lba, pending);
            pending.clear();
            *blocks = 0;
        }
    }
    for e in job {
        match &e.update {
            Update::Unmap => {
                emit(&mut b, &mut pending, pending_lba, &mut pending_blocks);
                b.add_range(e.lba, e.blocks, EntryKind::Unmap);
            }
            Update::ZeroAlloc => {
                emit(&mut b, &mut pending, pending_lba, &mut pending_blocks);
                b.add_range(e.lba, e.blocks, EntryKind::ZeroAlloc);
            }
            Update::Data(d) => {
                // Walk blocks, grouping consecutive non-zero blocks into frames and
                // consecutive zero blocks into unmapped runs.
                let n = e.blocks as usize;
                let mut i = 0;
                while i < n {
                    let zero = is_zero(&d[i * bs..(i + 1) * bs]);
                    let mut j = i + 1;
                    while j < n
                        && (zero || j - i < frame_blocks)
                        && is_zero(&d[j * bs..(j + 1) * bs]) == zero
                    {
                        j += 1;
                    }
                    if zero {
                        emit(&mut b, &mut pending, pending_lba, &mut pending_blocks);
                        b.add_range(e.lba + i as u64, (j - i) as u64, EntryKind::Unmap);
                        i = j;
                        continue;
                    }
                    while i < j {
                        let lba = e.lba + i as u64;
                        if pending_lba + pending_blocks as u64 != lba
                            || pending_blocks == frame_blocks
                        {
                            emit(&mut b, &mut pending, pending_lba, &mut pending_blocks);
                        }
                        if pending.is_empty() {
                            pending_lba = lba;
                        }
                        let take = (j - i).min(frame_blocks - pending_blocks);
                        pending.push(&d[i * bs..(i + take) * bs]);
                        pending_blocks += take;
                        i += take;
                    }
                }
            }
        }
    }
    emit(&mut b, &mut pending, pending_lba, &mut pending_blocks);
    let learnt = b.compress_state();
    let (buf, start, dir) = b.finish_in_place();
    (buf, start, dir, learnt)
}

pub fn is_zero(b: &[u8]) -> bool {
    // Fold 64-byte chunks with OR (no early exit inside a chunk, so it vectorizes).
    // (`chunks_exact`, not `as_chunks`: the latter needs Rust 1.88, the MSRV is 1.85.)
    let mut chunks = b.chunks_exact(64);
    let rest = chunks.remainder();
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0) && rest.iter().all(|&x| x == 0)
}

/// Shared handle.
pub type LogHandle = Arc<Log>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_spans_group_close_frames_of_one_segment() {
        let frames = [
            (7, 0, 100),       // 0
            (7, 100, 100),     // 1: adjacent to 0
            (5, 50, 10),       // 2: another segment
            (7, 1_300, 100),   // 3: gap 1,100 > 1,000: a new span
            (7, 2_000, 100),   // 4: gap 600: joins 3
            (7, 2_100, 5_000), // 5: would make the span 5,800 > 4,000 long
            (5, 60, 10),       // 6: joins 2, listed out of order
            (7, 9_000, 9_000), // 7: larger than the limit on its own
        ];
        let spans = plan_frame_spans(&frames, 1_000, 4_000);
        assert_eq!(
            spans,
            vec![vec![2, 6], vec![0, 1], vec![3, 4], vec![5], vec![7]]
        );
        assert!(plan_frame_spans(&[], 1, 1).is_empty());
        // No gap allowed: only touching frames merge.
        assert_eq!(plan_frame_spans(&frames[..2], 0, 4_000), vec![vec![0, 1]]);
        assert_eq!(
            plan_frame_spans(&[(1, 0, 10), (1, 11, 10)], 0, 4_000),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn buffer_pool_keeps_only_unshared_bounded_buffers() {
        let pool = BufPool::new(2, 1 << 20);
        assert_eq!(
            pool.take().capacity(),
            0,
            "an empty pool hands out a new buffer"
        );
        // A buffer a store still holds a reference to is not taken back.
        let shared = Bytes::from(vec![1u8; 1000]);
        let held = shared.clone();
        pool.give_back(shared);
        assert_eq!(pool.bufs.lock().unwrap().len(), 0);
        drop(held);
        // Nor one a store holds a slice of (the aligned segment inside the buffer).
        let whole = Bytes::from(vec![2u8; 1000]);
        let segment = whole.slice(100..);
        pool.give_back(whole);
        assert_eq!(pool.bufs.lock().unwrap().len(), 0);
        drop(segment);
        // Oversized buffers are dropped; at most `max` are kept, cleared.
        pool.give_back(Bytes::from(vec![0u8; 2 << 20]));
        for _ in 0..3 {
            let mut v = Vec::with_capacity(4096);
            v.extend_from_slice(&[7u8; 100]);
            pool.give_back(Bytes::from(v));
        }
        assert_eq!(pool.bufs.lock().unwrap().len(), 2);
        let b = pool.take();
        assert!(b.is_empty() && b.capacity() >= 4096);
    }
}
