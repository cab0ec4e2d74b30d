//! In-memory [`BlockExport`] and [`ExportProvider`]: the test double for session tests and
//! the backend of `examples/memserver.rs` (so real NBD clients can exercise the protocol layer
//! without the log or a store).
//!
//! Invariants:
//! - Storage is sparse, in pages of `block_size` bytes: a page is absent (a hole), `Zero`
//!   (allocated, reads as zeros — what WRITE_ZEROES with NO_HOLE leaves), or `Data`.
//!   Reads report absent and `Zero` pages as [`ReadChunk::Hole`]; block status reports absent
//!   pages as HOLE|ZERO, `Zero` pages as ZERO, data as 0.
//! - Pages live in shards, each behind a std mutex held only for a page copy (never across an
//!   await), so concurrent requests on many connections do not serialize on one lock.
//! - Fault injection (a forced errno, a delay at one offset) costs one relaxed atomic load
//!   when nothing is armed, so the memserver's numbers measure the protocol layer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::util::lock;

use super::pool::PayloadPool;
use super::{BlockExport, Errno, ExportError, ExportProvider, ReadChunk, STATE_HOLE, STATE_ZERO};

const SHARDS: usize = 64;

enum Page {
    Zero,
    Data(Box<[u8]>),
}

/// Which operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

#[derive(Default)]
struct Faults {
    /// Every operation of this kind (or all kinds when `None`) fails with the errno.
    fail: Option<(Option<Op>, Errno)>,
    /// Operations starting exactly at this offset sleep first.
    delay: Option<(u64, Duration)>,
}

/// Operation counters, for tests that check what reached the export.
#[derive(Debug, Default)]
pub struct MemStats {
    /// Operations that reached the export (counted before any injected delay or fault).
    pub started: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fua_ops: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub no_hole_zeroes: AtomicU64,
    pub caches: AtomicU64,
    pub block_statuses: AtomicU64,
}

/// A sparse in-memory block device.
pub struct MemExport {
    size_bytes: u64,
    block_size: u32,
    read_only: bool,
    description: Option<String>,
    shards: Box<[Mutex<HashMap<u64, Page>>]>,
    faults_armed: AtomicBool,
    faults: Mutex<Faults>,
    /// Where write payloads go back once copied in (see [`MemExport::with_payload_pool`]).
    payload_pool: Option<Arc<PayloadPool>>,
    pub stats: MemStats,
}

impl MemExport {
    /// `block_size` must be a power of two (it is the page size).
    pub fn new(size_bytes: u64, block_size: u32) -> Self {
        assert!(
            block_size.is_power_of_two(),
            "block size must be a power of two"
        );
        Self {
            size_bytes,
            block_size,
            read_only: false,
            description: None,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            faults_armed: AtomicBool::new(false),
            faults: Mutex::new(Faults::default()),
            payload_pool: None,
            stats: MemStats::default(),
        }
    }

    /// Give each write's payload back to `pool` once copied into the pages, as the
    /// volume does when it lets go of one (payloads come back to a pool only that way).
    pub fn with_payload_pool(mut self, pool: Arc<PayloadPool>) -> Self {
        self.payload_pool = Some(pool);
        self
    }

    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Make every operation of `op` (all operations when `None`) fail with `errno`;
    /// `set_fail(None, None)`-style clearing is [`MemExport::clear_faults`].
    pub fn set_fail(&self, op: Option<Op>, errno: Errno) {
        lock(&self.faults).fail = Some((op, errno));
        self.faults_armed.store(true, Ordering::Release);
    }

    /// Delay every operation that starts at `offset` by `delay`.
    pub fn set_delay(&self, offset: u64, delay: Duration) {
        lock(&self.faults).delay = Some((offset, delay));
        self.faults_armed.store(true, Ordering::Release);
    }

    pub fn clear_faults(&self) {
        *lock(&self.faults) = Faults::default();
        self.faults_armed.store(false, Ordering::Release);
    }

    async fn inject(&self, op: Op, offset: u64) -> Result<(), ExportError> {
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        if !self.faults_armed.load(Ordering::Acquire) {
            return Ok(());
        }
        let (fail, delay) = {
            let f = lock(&self.faults);
            (f.fail, f.delay)
        };
        if let Some((at, d)) = delay {
            if at == offset {
                tokio::time::sleep(d).await;
            }
        }
        if let Some((which, errno)) = fail {
            if which.is_none() || which == Some(op) {
                return Err(ExportError::new(errno, format!("injected {op:?} failure")));
            }
        }
        Ok(())
    }

    fn shard(&self, page: u64) -> MutexGuard<'_, HashMap<u64, Page>> {
        lock(&self.shards[(page % SHARDS as u64) as usize])
    }

    /// Split `offset..offset+len` into per-page pieces `(page, start in page, length)`.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let bs = self.block_size as u64;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos / bs;
            let start = pos % bs;
            let n = (bs - start).min(end - pos);
            pos += n;
            Some((page, start as usize, n as usize))
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ExportError::new(Errno::Inval, "range past the end")),
        }
    }

    fn check_writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::new(Errno::Perm, "export is read-only"));
        }
        Ok(())
    }

    /// Zero or discard a range: whole pages become `whole` (None = absent), partial pages
    /// get their bytes cleared.
    fn zero_range(&self, offset: u64, len: u64, allocate: bool) {
        let bs = self.block_size as usize;
        for (page, start, n) in self.pieces(offset, len) {
            let mut shard = self.shard(page);
            if n == bs {
                if allocate {
                    shard.insert(page, Page::Zero);
                } else {
                    shard.remove(&page);
                }
                continue;
            }
            match shard.get_mut(&page) {
                Some(Page::Data(bytes)) => bytes[start..start + n].fill(0),
                Some(Page::Zero) => {}
                None if allocate => {
                    shard.insert(page, Page::Zero);
                }
                None => {}
            }
        }
    }

    /// Allocated (non-hole) pages, for tests.
    pub fn allocated_pages(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

enum Run {
    Data(BytesMut),
    Hole(u32),
}

#[async_trait]
impl BlockExport for MemExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        self.inject(Op::Read, offset).await?;
        self.check_range(offset, len.into())?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let mut chunks = Vec::new();
        let mut run: Option<Run> = None;
        for (page, start, n) in self.pieces(offset, len.into()) {
            let shard = self.shard(page);
            match shard.get(&page) {
                Some(Page::Data(bytes)) => {
                    let piece = &bytes[start..start + n];
                    match &mut run {
                        Some(Run::Data(buf)) => buf.extend_from_slice(piece),
                        _ => {
                            if let Some(Run::Hole(h)) = run.take() {
                                chunks.push(ReadChunk::Hole(h));
                            }
                            // Reserve the rest of the request: runs of data are usually long.
                            let rest = (offset + u64::from(len))
                                .saturating_sub(page * self.block_size as u64 + start as u64);
                            let mut buf = BytesMut::with_capacity(rest as usize);
                            buf.extend_from_slice(piece);
                            run = Some(Run::Data(buf));
                        }
                    }
                }
                Some(Page::Zero) | None => match &mut run {
                    Some(Run::Hole(h)) => *h += n as u32,
                    _ => {
                        if let Some(Run::Data(buf)) = run.take() {
                            chunks.push(ReadChunk::Data(buf.freeze()));
                        }
                        run = Some(Run::Hole(n as u32));
                    }
                },
            }
        }
        match run {
            Some(Run::Data(buf)) => chunks.push(ReadChunk::Data(buf.freeze())),
            Some(Run::Hole(h)) => chunks.push(ReadChunk::Hole(h)),
            None => {}
        }
        Ok(chunks)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.inject(Op::Write, offset).await?;
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.stats.fua_ops.fetch_add(1, Ordering::Relaxed);
        }
        let bs = self.block_size as usize;
        let mut consumed = 0usize;
        for (page, start, n) in self.pieces(offset, data.len() as u64) {
            let piece = &data[consumed..consumed + n];
            consumed += n;
            let mut shard = self.shard(page);
            if n == bs {
                // Overwrite in place when the page has a buffer already: no allocation.
                match shard.get_mut(&page) {
                    Some(Page::Data(bytes)) => bytes.copy_from_slice(piece),
                    _ => {
                        shard.insert(page, Page::Data(piece.into()));
                    }
                }
                continue;
            }
            let entry = shard
                .entry(page)
                .or_insert_with(|| Page::Data(vec![0u8; bs].into_boxed_slice()));
            if let Page::Zero = entry {
                *entry = Page::Data(vec![0u8; bs].into_boxed_slice());
            }
            if let Page::Data(bytes) = entry {
                bytes[start..start + n].copy_from_slice(piece);
            }
        }
        if let Some(pool) = &self.payload_pool {
            pool.recycle(data);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.inject(Op::Flush, 0).await?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.inject(Op::Trim, offset).await?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.stats.trims.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.stats.fua_ops.fetch_add(1, Ordering::Relaxed);
        }
        self.zero_range(offset, len, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.inject(Op::WriteZeroes, offset).await?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
        if no_hole {
            self.stats.no_hole_zeroes.fetch_add(1, Ordering::Relaxed);
        }
        if fua {
            self.stats.fua_ops.fetch_add(1, Ordering::Relaxed);
        }
        self.zero_range(offset, len, no_hole);
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.inject(Op::Cache, offset).await?;
        self.check_range(offset, len)?;
        self.stats.caches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u32, u32)>, ExportError> {
        self.inject(Op::BlockStatus, offset).await?;
        self.check_range(offset, len)?;
        self.stats.block_statuses.fetch_add(1, Ordering::Relaxed);
        let mut extents: Vec<(u32, u32)> = Vec::new();
        for (page, _, n) in self.pieces(offset, len) {
            let flags = match self.shard(page).get(&page) {
                None => STATE_HOLE | STATE_ZERO,
                Some(Page::Zero) => STATE_ZERO,
                Some(Page::Data(_)) => 0,
            };
            match extents.last_mut() {
                // Extent lengths are u32 on the wire; start a new one before overflowing.
                Some((l, f)) if *f == flags && l.checked_add(n as u32).is_some() => *l += n as u32,
                _ => extents.push((n as u32, flags)),
            }
        }
        Ok(extents)
    }
}

/// A fixed set of named [`MemExport`]s. The empty name selects the default export, if set.
pub struct MemProvider {
    exports: BTreeMap<String, Arc<MemExport>>,
    default_name: Option<String>,
    open_counts: Mutex<HashMap<String, i64>>,
}

impl MemProvider {
    pub fn new() -> Self {
        Self {
            exports: BTreeMap::new(),
            default_name: None,
            open_counts: Mutex::new(HashMap::new()),
        }
    }

    /// Add an export; the first one added becomes the default.
    pub fn with_export(mut self, name: impl Into<String>, export: MemExport) -> Self {
        let name = name.into();
        if self.default_name.is_none() {
            self.default_name = Some(name.clone());
        }
        self.exports.insert(name, Arc::new(export));
        self
    }

    pub fn export(&self, name: &str) -> Option<Arc<MemExport>> {
        self.exports.get(name).cloned()
    }

    /// Opens not yet matched by a release, per requested name.
    pub fn open_count(&self, name: &str) -> i64 {
        lock(&self.open_counts).get(name).copied().unwrap_or(0)
    }
}

impl Default for MemProvider {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ExportProvider for MemProvider {
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockExport>, ExportError> {
        let key = if name.is_empty() {
            self.default_name.as_deref().unwrap_or("")
        } else {
            name
        };
        let export =
            self.exports.get(key).cloned().ok_or_else(|| {
                ExportError::new(Errno::Inval, format!("no export named {name:?}"))
            })?;
        *lock(&self.open_counts).entry(name.to_owned()).or_insert(0) += 1;
        Ok(export)
    }

    async fn list(&self) -> Result<Vec<String>, ExportError> {
        Ok(self.exports.keys().cloned().collect())
    }

    async fn release(&self, name: &str) {
        *lock(&self.open_counts).entry(name.to_owned()).or_insert(0) -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(chunks: Vec<ReadChunk>) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&c.to_vec());
        }
        out
    }

    #[tokio::test]
    async fn sparse_reads_writes_and_status() {
        let e = MemExport::new(64 * 1024, 4096);
        assert_eq!(e.read(0, 8192).await.unwrap(), vec![ReadChunk::Hole(8192)]);
        e.write(4096 + 100, Bytes::from(vec![7u8; 5000]), false)
            .await
            .unwrap();
        let got = flat(e.read(0, 16384).await.unwrap());
        assert!(got[..4196].iter().all(|&b| b == 0));
        assert!(got[4196..9196].iter().all(|&b| b == 7));
        assert!(got[9196..].iter().all(|&b| b == 0));
        assert_eq!(
            e.block_status(0, 16384).await.unwrap(),
            vec![(4096, 3), (8192, 0), (4096, 3)]
        );
        e.write_zeroes(4096, 4096, false, true).await.unwrap();
        e.trim(8192, 4096, false).await.unwrap();
        assert_eq!(
            e.block_status(0, 16384).await.unwrap(),
            vec![(4096, 3), (4096, STATE_ZERO), (8192, 3)]
        );
        assert_eq!(
            e.read(0, 16384).await.unwrap(),
            vec![ReadChunk::Hole(16384)]
        );
    }

    #[tokio::test]
    async fn faults_and_read_only() {
        let e = MemExport::new(8192, 512).with_read_only(true);
        assert_eq!(
            e.write(0, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err()
                .errno,
            Errno::Perm
        );
        e.set_fail(Some(Op::Read), Errno::Io);
        assert_eq!(e.read(0, 1).await.unwrap_err().errno, Errno::Io);
        e.clear_faults();
        assert!(e.read(0, 1).await.is_ok());
    }
}
