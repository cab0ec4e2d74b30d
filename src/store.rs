//! Object-store abstraction: the only way nbds3 touches persistent bytes.
//!
//! The contract below is what the log layer relies on for crash safety and fencing; every
//! backend (`memory`, `file`, `s3`, and the `faulty` wrapper) must honour it, and one
//! conformance suite (`tests/store_conformance.rs`) checks each of them, S3 included.
//!
//! Contract:
//! - Keys are UTF-8 strings made of `/`-separated non-empty components, at most
//!   [`KEY_BYTES_MAX`] bytes, never containing `..` or `.` components, NUL, or a leading `/`.
//!   Backends reject other keys with [`StoreError::InvalidKey`] before any I/O.
//! - `put` is atomic: a reader sees either no object or the complete new bytes, never a
//!   prefix. With [`PutMode::IfAbsent`], of any number of racing puts to one key exactly one
//!   succeeds and the others get [`StoreError::PreconditionFailed`]. An `Ok` from `put` means
//!   the bytes are durable (fsynced for the file store, acknowledged by S3).
//! - `get`/`get_range` return exactly the stored bytes (`get_range` clamps nothing: a range
//!   past the end is an error, never a short read reported as success).
//! - `list` returns keys under a prefix in ascending byte order, `limit` at most per page,
//!   strictly after `start_after` when given; `ListPage::next` is `Some` when more remain.
//! - `delete` of a missing key is `Ok` (idempotent); `delete_many` is the same for a batch.
//! - Errors are typed: `NotFound`, `PreconditionFailed`, `Transient` (retries exhausted or
//!   worth retrying at a higher level), `Permanent`. Backends retry transient failures
//!   themselves within a bounded time before giving up.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod faulty;
pub mod file;
pub mod memory;
pub mod s3;

/// Longest key accepted (S3's limit is 1024 bytes of UTF-8).
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest page a `list` call returns (S3's own page limit).
pub const LIST_PAGE_MAX: usize = 1000;

/// How a `put` treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there.
    Overwrite,
    /// Create only if no object exists under the key (S3 `If-None-Match: *`).
    IfAbsent,
}

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size_bytes: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Pass as `start_after` to get the next page; `None` when the listing is complete.
    pub next: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object not found: {key}")]
    NotFound { key: String },
    #[error("precondition failed (object exists or changed): {key}")]
    PreconditionFailed { key: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("invalid range {start}..{end} for {key} (object is {size_bytes} bytes)")]
    InvalidRange {
        key: String,
        start: u64,
        end: u64,
        size_bytes: u64,
    },
    #[error("transient store error on {key}: {reason}")]
    Transient { key: String, reason: String },
    #[error("store error on {key}: {reason}")]
    Permanent { key: String, reason: String },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, StoreError::PreconditionFailed { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait ObjectStore: Send + Sync + Debug + 'static {
    /// Store `data` under `key` atomically and durably (see the module contract).
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()>;
    /// The whole object.
    async fn get(&self, key: &str) -> StoreResult<Bytes>;
    /// Bytes `range.start..range.end` of the object; an empty or out-of-bounds range is
    /// [`StoreError::InvalidRange`] (or `NotFound` when the object is missing).
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;
    /// Keys starting with `prefix`, ascending, strictly after `start_after`, at most
    /// `limit` (clamped to `1..=LIST_PAGE_MAX`).
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage>;
    /// Remove one object; missing is fine.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// Remove many objects; missing ones are fine. Default: one `delete` each.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }
    /// Short description for logs, never containing credentials (e.g. `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// A ranged GET's fixed cost, in bytes of transfer: readers fetch parts of one object
    /// that are at most this far apart with one GET, reading the gap in vain (see
    /// `log::plan_frame_spans`). Default: a local file system, where a request is a
    /// thread hop and a few syscalls, about the CPU of copying 64 KiB.
    fn request_cost_bytes(&self) -> u64 {
        64 * 1024
    }
    /// Whether a PUT that runs far longer than its peers is worth racing with a second,
    /// identical one (see `Log`'s segment uploads). Over a network, a few requests stall
    /// for no reason of their own (a slow connection, a busy server node) and a fresh one
    /// finishes sooner; on a local file system the second would only add work. Default:
    /// no.
    fn hedge_puts(&self) -> bool {
        false
    }
}

pub type DynStore = Arc<dyn ObjectStore>;

/// Every key under `prefix`, following pages to the end.
pub async fn list_all(store: &dyn ObjectStore, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, after.as_deref(), LIST_PAGE_MAX).await?;
        out.extend(page.objects);
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Check a key against the contract; every backend calls this before doing I/O.
pub fn validate_key(key: &str) -> StoreResult<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.chars().take(200).collect(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > KEY_BYTES_MAX {
        return bad("longer than 1024 bytes");
    }
    if key.contains('\0') {
        return bad("contains NUL");
    }
    for comp in key.split('/') {
        if comp.is_empty() {
            return bad("empty path component");
        }
        if comp == "." || comp == ".." {
            return bad("'.' or '..' component");
        }
    }
    Ok(())
}

/// A prefix passed to `list` follows the same rules, except it may be empty or end in `/`.
pub fn validate_prefix(prefix: &str) -> StoreResult<()> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        return if prefix.is_empty() {
            Ok(())
        } else {
            validate_key(prefix)
        };
    }
    validate_key(trimmed)
}

/// Open a store from a URL: `file://DIR`, `s3://BUCKET[/PREFIX]`, `memory://`.
pub async fn open_url(url: &str, s3_opts: &s3::S3Options) -> StoreResult<DynStore> {
    if let Some(dir) = url.strip_prefix("file://") {
        Ok(Arc::new(file::FileStore::open(dir)?))
    } else if let Some(rest) = url.strip_prefix("s3://") {
        Ok(Arc::new(s3::S3Store::open(rest, s3_opts).await?))
    } else if url == "memory://" || url.starts_with("memory://") {
        Ok(Arc::new(memory::MemoryStore::new()))
    } else {
        Err(StoreError::Permanent {
            key: url.to_string(),
            reason: "unsupported store URL (expected file://DIR, s3://BUCKET/PREFIX or memory://)"
                .into(),
        })
    }
}

/// Probe whether the store really honours `IfAbsent` (some S3 clones silently ignore
/// `If-None-Match`). Writes and deletes one key under `probe_prefix`. Returns `Ok(true)` when
/// a second IfAbsent put to the same key is refused, `Ok(false)` when the store overwrote.
pub async fn probe_if_absent(store: &dyn ObjectStore, probe_prefix: &str) -> StoreResult<bool> {
    let nonce: u64 = rand::random();
    let key = format!("{}/probe-{nonce:016x}", probe_prefix.trim_end_matches('/'));
    store
        .put(&key, Bytes::from_static(b"first"), PutMode::IfAbsent)
        .await?;
    let second = store
        .put(&key, Bytes::from_static(b"second"), PutMode::IfAbsent)
        .await;
    let honoured = match second {
        Err(StoreError::PreconditionFailed { .. }) => true,
        Ok(()) => false,
        Err(e) => {
            let _ = store.delete(&key).await;
            return Err(e);
        }
    };
    // Even when the second put "failed", confirm the first bytes survived.
    let body = store.get(&key).await;
    store.delete(&key).await?;
    Ok(honoured && matches!(body, Ok(b) if &b[..] == b"first"))
}
