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

pub mod compact;
pub mod gc;
pub mod index;
pub mod lease;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::format::{
    self, CheckpointRef, DirEntry, EntryKind, ExportKeys, FormatError, Manifest, SegmentBuilder,
    SegmentRef, FRAME_RAW_BYTES_MAX, SEGMENT_FOOTER_BYTES,
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
    /// Tail segments a manifest may list before the commit writes a checkpoint instead.
    pub tail_segments_max: usize,
    /// Tail directory entries (replay work on open) before a checkpoint is written, at
    /// least; the real trigger is also relative to the index size, so the amortized cost of
    /// checkpoints per flushed block stays constant.
    pub tail_entries_min: usize,
    pub zstd_level: i32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 8 << 20,
            frame_bytes_max: 128 << 10,
            uploads_in_flight_max: 8,
            tail_segments_max: 256,
            tail_entries_min: 64 * 1024,
            zstd_level: 1,
        }
    }
}

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
    pub checkpoints_written: AtomicU64,
    pub checkpoint_bytes_written: AtomicU64,
    pub frames_read: AtomicU64,
    pub frame_bytes_read: AtomicU64,
}

struct CommitState {
    manifest: Manifest,
    next_seq: u32,
    /// Directory entries in the tail (replay cost on open).
    tail_entries: usize,
    /// An earlier manifest PUT failed ambiguously: re-read before the next commit.
    need_resync: bool,
    /// Ids handed out by [`Log::allocate_id`] whose objects no manifest names yet (a
    /// compaction in progress). Garbage collection never deletes these.
    pending_ids: std::collections::BTreeSet<u64>,
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
    pub stats: LogStats,
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

/// Rebuild the index a manifest describes: its checkpoint, then its tail in order.
pub async fn load_index(
    store: &DynStore,
    keys: &ExportKeys,
    m: &Manifest,
    uploads_in_flight_max: usize,
) -> LogResult<(Index, usize)> {
    let geometry_blocks = m.size_bytes / m.block_size as u64;
    let mut idx = match m.checkpoint {
        None => Index::new(),
        Some(cref) => {
            let key = keys.checkpoint(cref.id);
            let body = store.get(&key).await.map_err(|e| match e {
                StoreError::NotFound { key } => LogError::MissingObject { key },
                other => LogError::Store(other),
            })?;
            let c = tokio::task::spawn_blocking(move || format::decode_checkpoint(&body))
                .await
                .map_err(|e| LogError::Internal(e.to_string()))?
                .map_err(fmt_err(&key))?;
            if c.size_bytes != m.size_bytes || c.block_size != m.block_size {
                return Err(LogError::Corrupt {
                    key,
                    reason: "checkpoint geometry differs from manifest".into(),
                });
            }
            Index::from_checkpoint(&c, geometry_blocks)
                .map_err(|reason| LogError::Corrupt { key, reason })?
        }
    };
    // Directories are fetched in parallel but applied strictly in commit order.
    let dirs: Vec<Vec<DirEntry>> = futures::stream::iter(m.tail.iter().copied())
        .map(|s| async move { read_segment_directory(store, keys, s).await })
        .buffered(uploads_in_flight_max.max(1))
        .try_collect()
        .await?;
    let mut tail_entries = 0;
    for (s, dir) in m.tail.iter().zip(dirs) {
        for e in &dir {
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
        tail_entries += dir.len();
        idx.apply_segment(*s, &dir);
    }
    Ok((idx, tail_entries))
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
        let nonce: u64 = rand::random();
        // Loop: racing openers and writers may take the version we aim for.
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
            let (index, tail_entries) =
                load_index(&store, &keys, &base, cfg.uploads_in_flight_max).await?;
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
                commit: tokio::sync::Mutex::new(CommitState {
                    manifest,
                    next_seq: 0,
                    tail_entries,
                    need_resync: false,
                    pending_ids: std::collections::BTreeSet::new(),
                }),
                fenced: AtomicBool::new(false),
                version: AtomicU64::new(version),
                stats: LogStats::default(),
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
        let key = self.keys.segment(seg);
        let end = frame_offset
            .checked_add(frame_len as u64)
            .ok_or_else(|| LogError::Internal("frame range overflows".into()))?;
        let b = get_range_exact(&self.store, &key, frame_offset..end).await?;
        self.stats.frames_read.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frame_bytes_read
            .fetch_add(frame_len as u64, Ordering::Relaxed);
        let bs = self.geometry.block_size;
        let frame = if b.len() > 64 * 1024 {
            tokio::task::spawn_blocking(move || format::decode_frame(&b, bs, frame_offset))
                .await
                .map_err(|e| LogError::Internal(e.to_string()))?
        } else {
            format::decode_frame(&b, bs, frame_offset)
        }
        .map_err(fmt_err(&key))?;
        Ok(frame)
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
    pub async fn commit(&self, batch: &[BatchEntry]) -> LogResult<u64> {
        if self.mode == OpenMode::ReadOnly {
            return Err(LogError::ReadOnly);
        }
        self.validate_batch(batch)?;
        let mut st = self.commit.lock().await;
        self.check_fenced(&st)?;
        if st.need_resync {
            self.resync(&mut st).await?;
        }
        // 1. Segments. All must be durable before the manifest that names them exists.
        let (segs, dirs) = self.write_segments(&mut st, batch).await?;
        let new_entries: usize = dirs.iter().map(|d| d.len()).sum();
        // 2. Manifest, retried past our own earlier attempts that turned out to land.
        for _ in 0..8 {
            let mut m = st.manifest.clone();
            m.version += 1;
            m.writer_nonce = self.nonce;
            m.writer_epoch = self.epoch;
            m.created_unix_ms = crate::util::unix_ms_now();
            m.tail.extend(segs.iter().copied());
            let tail_entries = st.tail_entries + new_entries;
            let index_extents = self.index_read().map.len();
            let checkpoint_due = m.tail.len() > self.cfg.tail_segments_max
                || tail_entries > self.cfg.tail_entries_min.max(index_extents / 2);
            let mut checkpointed: Option<Index> = None;
            if checkpoint_due {
                let mut idx = self.index_read().clone();
                for (s, d) in segs.iter().zip(&dirs) {
                    idx.apply_segment(*s, d);
                }
                idx.drop_dead_segments();
                let cref = self.write_checkpoint(&mut st, &idx, m.version).await?;
                m.checkpoint = Some(cref);
                m.tail.clear();
                checkpointed = Some(idx);
            }
            match self.put_manifest(&m).await {
                Ok(()) => {}
                Err(LogError::Store(StoreError::PreconditionFailed { key })) => {
                    let other = read_manifest(&self.store, &self.keys, m.version).await?;
                    if other.writer_nonce != self.nonce {
                        // Another writer took this version: a newer epoch (or, after GC, a
                        // writer we cannot order against). Either way we must stop.
                        return Err(self.fence(other.writer_epoch.max(self.epoch + 1)));
                    }
                    if other != m {
                        // An earlier attempt of ours that we saw fail did land: adopt it
                        // and commit again on top (its data is a subset of ours).
                        tracing::warn!(%key, "earlier commit attempt landed; resynchronizing");
                        self.resync(&mut st).await?;
                        continue;
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
            // 3. Fencing against GC: if any version above ours exists, a newer writer owns
            // the export and our version slot was one GC had freed. Our manifest is then an
            // orphan that no reader will choose; report failure so nothing is acknowledged.
            let after = self.keys.manifest(m.version);
            let newer = self
                .store
                .list(&self.keys.manifest_prefix(), Some(&after), 1)
                .await;
            match newer {
                Ok(p) if p.objects.is_empty() => {}
                Ok(p) => {
                    let v = p
                        .objects
                        .first()
                        .and_then(|o| {
                            format::parse_numbered_key(&self.keys.manifest_prefix(), &o.key)
                        })
                        .unwrap_or(0);
                    let e = read_manifest(&self.store, &self.keys, v)
                        .await
                        .map(|m| m.writer_epoch)
                        .unwrap_or(self.epoch + 1);
                    return Err(self.fence(e));
                }
                Err(e) => {
                    st.need_resync = true;
                    return Err(e.into());
                }
            }
            // 4. Publish to readers.
            {
                let mut idx = self.index_write();
                match checkpointed {
                    Some(new_idx) => *idx = new_idx,
                    None => {
                        for (s, d) in segs.iter().zip(&dirs) {
                            idx.apply_segment(*s, d);
                        }
                    }
                }
            }
            st.tail_entries = if m.checkpoint != st.manifest.checkpoint {
                0
            } else {
                tail_entries
            };
            let manifest_len = format::encode_manifest(&m).len() as u64;
            self.stats
                .manifest_bytes_written
                .fetch_add(manifest_len, Ordering::Relaxed);
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            let v = m.version;
            st.manifest = m;
            self.version.store(v, Ordering::Release);
            return Ok(v);
        }
        Err(LogError::Internal(
            "commit kept colliding with our own earlier attempts".into(),
        ))
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
            let (idx, tail_entries) =
                load_index(&self.store, &self.keys, &m, self.cfg.uploads_in_flight_max).await?;
            *self.index_write() = idx;
            st.tail_entries = tail_entries;
            self.version.store(m.version, Ordering::Release);
            st.manifest = m;
        }
        st.need_resync = false;
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
    async fn write_segments(
        &self,
        st: &mut CommitState,
        batch: &[BatchEntry],
    ) -> LogResult<(Vec<SegmentRef>, Vec<Vec<DirEntry>>)> {
        // Partition: each job gets entries up to segment_bytes_max raw data; ranges that
        // carry no data ride along in the current job.
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
        let mut with_ids = Vec::with_capacity(jobs.len());
        for j in jobs {
            if !j.is_empty() {
                with_ids.push((self.next_id(st)?, j));
            }
        }
        let cfg = self.cfg.clone();
        let block_size = self.geometry.block_size;
        let epoch = self.epoch;
        let results: Vec<(SegmentRef, Vec<DirEntry>)> = futures::stream::iter(with_ids)
            .map(|(id, job)| {
                let cfg = cfg.clone();
                async move {
                    let (bytes, dir) = tokio::task::spawn_blocking(move || {
                        build_segment(id, epoch, block_size, &cfg, &job)
                    })
                    .await
                    .map_err(|e| LogError::Internal(e.to_string()))?;
                    let size = bytes.len() as u64;
                    self.store
                        .put(
                            &self.keys.segment(id),
                            Bytes::from(bytes),
                            PutMode::IfAbsent,
                        )
                        .await?;
                    self.stats.segments_written.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .segment_bytes_written
                        .fetch_add(size, Ordering::Relaxed);
                    Ok::<_, LogError>((
                        SegmentRef {
                            id,
                            size_bytes: size,
                        },
                        dir,
                    ))
                }
            })
            .buffered(self.cfg.uploads_in_flight_max.max(1))
            .try_collect()
            .await?;
        Ok(results.into_iter().unzip())
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
        let size = body.len() as u64;
        self.store
            .put(
                &self.keys.checkpoint(id),
                Bytes::from(body),
                PutMode::IfAbsent,
            )
            .await?;
        self.stats
            .checkpoints_written
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .checkpoint_bytes_written
            .fetch_add(size, Ordering::Relaxed);
        Ok(CheckpointRef {
            id,
            size_bytes: size,
        })
    }

    /// The manifest this log last committed or loaded.
    pub async fn manifest(&self) -> Manifest {
        self.commit.lock().await.manifest.clone()
    }

    /// Write a checkpoint now and commit a manifest pointing at it (compaction uses this to
    /// publish a rewritten index; `rewrite` edits the index copy before it is written, under
    /// the commit lock so no flush interleaves).
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
        let mut m = st.manifest.clone();
        m.version += 1;
        m.writer_nonce = self.nonce;
        m.writer_epoch = self.epoch;
        m.created_unix_ms = crate::util::unix_ms_now();
        let cref = self.write_checkpoint(&mut st, &idx, m.version).await?;
        m.checkpoint = Some(cref);
        m.tail.clear();
        match self.put_manifest(&m).await {
            Ok(()) => {}
            Err(LogError::Store(StoreError::PreconditionFailed { .. })) => {
                let other = read_manifest(&self.store, &self.keys, m.version).await?;
                if other != m {
                    if other.writer_nonce != self.nonce {
                        return Err(self.fence(other.writer_epoch));
                    }
                    st.need_resync = true;
                    return Err(LogError::Internal(
                        "rewrite raced an earlier attempt; retry".into(),
                    ));
                }
            }
            Err(e) => {
                st.need_resync = true;
                return Err(e);
            }
        }
        let after = self.keys.manifest(m.version);
        let p = self
            .store
            .list(&self.keys.manifest_prefix(), Some(&after), 1)
            .await;
        match p {
            Ok(p) if p.objects.is_empty() => {}
            Ok(_) => return Err(self.fence(self.epoch + 1)),
            Err(e) => {
                st.need_resync = true;
                return Err(e.into());
            }
        }
        *self.index_write() = idx;
        st.tail_entries = 0;
        let v = m.version;
        st.manifest = m;
        self.version.store(v, Ordering::Release);
        Ok(v)
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

/// Build one segment from a job: data runs are cut into frames of at most
/// `frame_bytes_max`; all-zero blocks inside data become unmapped runs (they cost nothing
/// to store and read back as zeros).
fn build_segment(
    id: u64,
    epoch: u64,
    block_size: u32,
    cfg: &LogConfig,
    job: &[BatchEntry],
) -> (Vec<u8>, Vec<DirEntry>) {
    let bs = block_size as usize;
    let frame_blocks = (cfg.frame_bytes_max / bs).max(1);
    let mut b = SegmentBuilder::new(id, epoch, block_size, cfg.zstd_level);
    for e in job {
        match &e.update {
            Update::Unmap => {
                b.add_range(e.lba, e.blocks, EntryKind::Unmap);
            }
            Update::ZeroAlloc => {
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
                    let lba = e.lba + i as u64;
                    if zero {
                        b.add_range(lba, (j - i) as u64, EntryKind::Unmap);
                    } else {
                        b.add_frame(lba, &d[i * bs..j * bs]);
                    }
                    i = j;
                }
            }
        }
    }
    b.finish()
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
