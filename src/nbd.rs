//! NBD server side: the wire codec (`proto`, no I/O), one session per connection
//! (`session`: handshake, then pipelined transmission), the accept loop (`server`), and TLS
//! for STARTTLS (`tls`).
//!
//! This layer knows nothing about S3 or the log: it talks to an [`ExportProvider`] that hands
//! out one shared [`BlockExport`] per export name. Every request is validated here (range,
//! flags, size limits) before the export sees it, so exports may assume
//! `offset + len <= size_bytes()` and `len <= REQUEST_BYTES_MAX`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod mem;
pub mod pool;
pub mod proto;
pub mod server;
pub mod session;
pub mod tls;

/// Largest READ/WRITE payload accepted (advertised as the maximum block size).
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Errno values carried in NBD error replies (the spec's fixed numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// An error an export reports for one request; becomes an NBD error reply.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (errno {errno:?})")]
pub struct ExportError {
    pub errno: Errno,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// One piece of a read: bytes, or a run of zeros that is unallocated (a hole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Bytes),
    /// Data held in consecutive pieces (cached blocks), sent without joining them.
    Pieces(Vec<Bytes>),
    Hole(u32),
}

impl ReadChunk {
    pub fn len(&self) -> u32 {
        match self {
            ReadChunk::Data(b) => b.len() as u32,
            ReadChunk::Pieces(ps) => ps.iter().map(|b| b.len() as u32).sum(),
            ReadChunk::Hole(n) => *n,
        }
    }
    /// The data as one buffer (copies pieces; for tests and small callers).
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            ReadChunk::Data(b) => b.to_vec(),
            ReadChunk::Pieces(ps) => ps.concat(),
            ReadChunk::Hole(n) => vec![0; *n as usize],
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `base:allocation` flags for one extent.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// A block device as the protocol sees it. Shared by all connections to one export, so a
/// `flush` covers writes completed on every connection (this is what makes CAN_MULTI_CONN
/// honest). Offsets and lengths are in bytes and already validated by the session.
#[async_trait]
pub trait BlockExport: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// Preferred I/O size (the device block size).
    fn block_size(&self) -> u32;
    fn read_only(&self) -> bool;
    /// Human-readable text for NBD_INFO_DESCRIPTION; none by default.
    fn description(&self) -> Option<String> {
        None
    }
    /// Contents of `offset..offset+len`, in order, chunk lengths summing to `len`.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError>;
    /// Store `data` at `offset`; with `fua` it is durable before returning.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError>;
    /// Make every write completed before this call durable.
    async fn flush(&self) -> Result<(), ExportError>;
    /// Discard a range; it reads as zeros afterwards.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Zero a range. `no_hole`: the client asked that it stay allocated; we still may store
    /// zeros as unmapped because reads return zeros either way (the spec allows this only
    /// when `no_hole` is false, so an export honours it by reporting the range as
    /// allocated-but-zero in block status).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError>;
    /// Warm the cache for a range.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// `base:allocation` extents covering a prefix of `offset..offset+len` (at least one,
    /// none empty), as `(length, flags)`.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u32, u32)>, ExportError>;
}

/// Hands out exports by name; one shared instance per name.
#[async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockExport>, ExportError>;
    /// Names for NBD_OPT_LIST.
    async fn list(&self) -> Result<Vec<String>, ExportError>;
    /// Called when a connection to `name` closes, so idle exports can be flushed/released.
    /// The session calls it exactly once for every successful `open` (NBD_OPT_INFO opens and
    /// releases at once), so a provider may keep a reference count per name.
    async fn release(&self, _name: &str) {}
}
