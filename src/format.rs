//! Byte layout of every object nbds3 stores, and the key names they live under.
//!
//! This module is the code half of the contract written in `format/FORMAT.md`; the
//! committed fixtures in `format/fixtures/` are decoded by `tests/format_fixtures.rs`, so the
//! spec, this code and stored data cannot drift apart. Any change to bytes produced here must
//! bump [`FORMAT_VERSION`], update `format/`, and keep the old fixtures decoding (or rejected
//! with a clear [`FormatError::UnsupportedVersion`]).
//!
//! Invariants: every object starts with an 8-byte magic and the format version; every byte
//! a reader returns as data has passed a crc32 check over the bytes as stored and a crc32
//! over the decompressed bytes; decoding never trusts a length from storage without checking
//! it against the bytes actually present and against a fixed bound.
//!
//! Segment object (all integers little-endian):
//! ```text
//! +--------------------------------------------------------------+
//! | header (16): "NBDS3SEG" | version u16 | 0 u16 | block_size u32|
//! +--------------------------------------------------------------+
//! | frame 0: header (32) + stored payload                         |
//! |   "NBFR" | flags u16 (1 = zstd) | 0 u16 | first_lba u64        |
//! |   blocks u32 | stored_len u32 | raw_crc u32 | crc u32           |
//! |   (crc = crc32 of frame header bytes 0..28 then payload)       |
//! | frame 1 ...                                                   |
//! +--------------------------------------------------------------+
//! | directory: bincode(Vec<DirEntry>)                             |
//! +--------------------------------------------------------------+
//! | footer (48): "NBDS3SFT" | version u16 | 0 u16 | dir_len u32   |
//! |   dir_offset u64 | segment_id u64 | epoch u64 | dir_crc u32    |
//! |   footer_crc u32 (crc32 of footer bytes 0..44)                |
//! +--------------------------------------------------------------+
//! ```
//! Manifests and checkpoints share one envelope:
//! ```text
//! magic (8) | version u16 | flags u16 (1 = zstd) | payload_len u32 | raw_len u32 |
//! crc u32 (crc32 of envelope bytes 0..20 then payload) | payload = [zstd](bincode(T))
//! ```

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

/// Version of every object this build writes. Readers reject other versions.
pub const FORMAT_VERSION: u16 = 1;

pub const SEGMENT_MAGIC: [u8; 8] = *b"NBDS3SEG";
pub const SEGMENT_FOOTER_MAGIC: [u8; 8] = *b"NBDS3SFT";
pub const FRAME_MAGIC: [u8; 4] = *b"NBFR";
pub const MANIFEST_MAGIC: [u8; 8] = *b"NBDS3MAN";
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"NBDS3CKP";
/// Writer lease (`exports/<key>/lease`): a heartbeat the serving daemon refreshes, so offline
/// tools can tell that the export is in use (see `log::lease` and `format/FORMAT.md`).
pub const LEASE_MAGIC: [u8; 8] = *b"NBDS3LSE";

pub const SEGMENT_HEADER_BYTES: usize = 16;
pub const FRAME_HEADER_BYTES: usize = 32;
pub const SEGMENT_FOOTER_BYTES: usize = 48;
pub const ENVELOPE_HEADER_BYTES: usize = 24;

/// Upper bound on a frame's uncompressed size: a reader never allocates more than this
/// for one frame, whatever the stored header claims.
pub const FRAME_RAW_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Upper bound on an envelope's decoded payload (a checkpoint of a very large index).
pub const ENVELOPE_RAW_BYTES_MAX: usize = 1024 * 1024 * 1024;
/// Upper bound on a segment directory.
pub const DIRECTORY_BYTES_MAX: usize = 64 * 1024 * 1024;

const FLAG_ZSTD: u16 = 1;

/// Block sizes an export may have.
pub fn valid_block_size(b: u32) -> bool {
    b.is_power_of_two() && (512..=65536).contains(&b)
}

/// The bincode configuration, pinned: little-endian, variable-length integers (bincode
/// 2.0.1 `standard()`), with a decode limit so corrupt lengths cannot allocate unbounded
/// memory. Changing any of this changes stored bytes.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<ENVELOPE_RAW_BYTES_MAX>()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic: expected {expected:?}")]
    BadMagic { expected: String },
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("checksum mismatch in {what} at offset {offset}")]
    ChecksumMismatch { what: &'static str, offset: u64 },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("export name too long: {bytes} bytes, limit is {limit}")]
    ExportNameTooLong { bytes: usize, limit: usize },
}

type FResult<T> = Result<T, FormatError>;

fn corrupt(what: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Corrupt {
        what,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Little-endian helpers over checked slices (never index past what is present).

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> FResult<()> {
    if b.len() < n {
        return Err(FormatError::Truncated {
            what,
            need: n as u64,
            have: b.len() as u64,
        });
    }
    Ok(())
}

fn check_version(v: u16) -> FResult<()> {
    if v != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: v });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Segment directory entries.

/// What one directory entry records about a range of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// Blocks stored in the frame at `frame_offset`/`frame_len`.
    Data,
    /// Blocks discarded (trim, write-zeroes, all-zero writes): unmapped, read as zeros.
    Unmap,
    /// Blocks zeroed with NO_HOLE: read as zeros, reported allocated; no bytes stored.
    ZeroAlloc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub lba: u64,
    pub blocks: u64,
    pub kind: EntryKind,
    /// Offset of the frame header within the segment (Data only, else 0).
    pub frame_offset: u64,
    /// Frame header + payload length (Data only, else 0).
    pub frame_len: u32,
}

// ---------------------------------------------------------------------------------------
// Segment writing.

/// Builds one segment object in memory. CPU-heavy (zstd + crc): call it off the reactor.
pub struct SegmentBuilder {
    buf: Vec<u8>,
    entries: Vec<DirEntry>,
    segment_id: u64,
    epoch: u64,
    block_size: u32,
    /// One compression context for the whole segment: creating a context per frame (what
    /// `zstd::bulk::compress` does) cost 12% of the daemon's CPU under 4 KiB random writes.
    /// `None` when zstd could not allocate one: frames are then stored raw.
    cctx: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    /// Where a frame given in parts is joined when it is to be compressed (zstd's one-shot
    /// API wants one slice); reused across frames.
    joined: Vec<u8>,
    /// Early abort for incompressible data (see [`CompressState`]).
    compress: CompressState,
    /// Where the segment starts in `buf`: 0, or the padding that puts it on a
    /// [`SEGMENT_BUF_ALIGN`] boundary (see [`SegmentBuilder::new_aligned_in`]). Offsets in
    /// the directory count from here.
    start: usize,
}

/// Address alignment [`SegmentBuilder::new_aligned_in`] gives a segment in memory: what
/// `O_DIRECT` needs, so the file store writes the buffer itself instead of a copy.
pub const SEGMENT_BUF_ALIGN: usize = 4096;

/// The writer's memory of how compressible recent data was, carried from one segment to
/// the next (a fresh state per segment paid the learning attempts again every segment).
#[derive(Debug, Clone, Copy, Default)]
pub struct CompressState {
    /// Frames in a row that failed to compress well.
    misses: u32,
    /// Raw bytes still to store without trying.
    skip_bytes: u64,
}

/// A frame is stored compressed only if zstd saves at least 1/this of it (12.5%, ZFS's
/// rule): smaller savings are not worth the decompression on every read.
const COMPRESS_MIN_SAVING_DIVISOR: usize = 8;
/// Frames at least twice this long are probed by compressing their first this many bytes
/// before the whole frame is tried.
const COMPRESS_PROBE_BYTES: usize = 16 * 1024;
/// Failed attempts in a row before frames start skipping compression.
const COMPRESS_MISSES_BEFORE_SKIP: u32 = 4;
/// Raw bytes skipped after the first miss past [`COMPRESS_MISSES_BEFORE_SKIP`]; doubles per
/// further miss.
const COMPRESS_SKIP_FIRST_BYTES: u64 = 64 << 10;
/// Most raw bytes skipped between two attempts: how late data that turned compressible is
/// noticed. In bytes, not frames: an attempt has a fixed cost (context and table setup)
/// that dominates for 4 KiB frames.
const COMPRESS_SKIP_MAX_BYTES: u64 = 4 << 20;

impl SegmentBuilder {
    pub fn new(segment_id: u64, epoch: u64, block_size: u32, zstd_level: Option<i32>) -> Self {
        Self::start_in(
            Vec::with_capacity(64 * 1024),
            0,
            segment_id,
            epoch,
            block_size,
            zstd_level,
        )
    }

    /// Like [`SegmentBuilder::new`], building into `buf` (cleared first: a buffer reused
    /// from an earlier segment has its pages mapped already, where a fresh multi-MiB one
    /// page-faults and zeroes every page as the segment is written into it), with room for
    /// `capacity` bytes of segment reserved up front (an 8 MiB segment would otherwise be
    /// copied ~8 times as the buffer grows) and the segment placed at a
    /// [`SEGMENT_BUF_ALIGN`]-aligned address inside `buf`: finish with
    /// [`SegmentBuilder::finish_in_place`]. If the segment outgrows `capacity` the buffer
    /// moves and the alignment may be lost; that costs a copy in the file store, never
    /// correctness.
    pub fn new_aligned_in(
        mut buf: Vec<u8>,
        capacity: usize,
        segment_id: u64,
        epoch: u64,
        block_size: u32,
        zstd_level: Option<i32>,
    ) -> Self {
        buf.clear();
        buf.reserve(capacity.saturating_add(SEGMENT_BUF_ALIGN));
        let start = buf.as_ptr().align_offset(SEGMENT_BUF_ALIGN);
        let start = if start < SEGMENT_BUF_ALIGN { start } else { 0 };
        Self::start_in(buf, start, segment_id, epoch, block_size, zstd_level)
    }

    fn start_in(
        mut buf: Vec<u8>,
        start: usize,
        segment_id: u64,
        epoch: u64,
        block_size: u32,
        zstd_level: Option<i32>,
    ) -> Self {
        buf.clear();
        buf.resize(start, 0);
        buf.extend_from_slice(&SEGMENT_MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        buf.extend_from_slice(&block_size.to_le_bytes());
        Self {
            buf,
            entries: Vec::new(),
            segment_id,
            epoch,
            block_size,
            // No level: every frame is stored raw (`--compression off`).
            cctx: zstd_level.and_then(|level| zstd::bulk::Compressor::new(level).ok()),
            scratch: Vec::new(),
            joined: Vec::new(),
            compress: CompressState::default(),
            start,
        }
    }

    /// Start from what an earlier segment learnt about the data's compressibility.
    pub fn with_compress_state(mut self, state: CompressState) -> Self {
        self.compress = state;
        self
    }

    /// Room for `n` more directory entries up front: a batch of random 4 KiB writes makes
    /// one entry per block, and a directory grown by doubling copied itself and faulted
    /// in fresh pages ~15 times per 32k-block segment.
    pub fn reserve_entries(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// What this segment learnt, for the next one.
    pub fn compress_state(&self) -> CompressState {
        self.compress
    }

    /// Whether the next `len` raw bytes are stored without an attempt (early abort below,
    /// or no zstd context); skipped bytes count off the early abort.
    fn skips_compression(&mut self, len: usize) -> bool {
        let st = &mut self.compress;
        if st.skip_bytes > 0 {
            st.skip_bytes = st.skip_bytes.saturating_sub(len as u64);
            return true;
        }
        self.cctx.is_none()
    }

    /// Compress `raw` into `self.scratch` if that is worth it; false means store it raw.
    ///
    /// Early abort: after [`COMPRESS_MISSES_BEFORE_SKIP`] frames in a row that did not meet
    /// the saving bar, the next [`COMPRESS_SKIP_FIRST_BYTES`] of raw data are stored without
    /// trying, doubling per further miss up to [`COMPRESS_SKIP_MAX_BYTES`]; one success
    /// resets it. Random or already compressed data then costs one attempt per 4 MiB;
    /// compressible data is unaffected. A choice of the writer only: readers accept raw
    /// and zstd frames alike.
    fn try_compress(&mut self, raw: &[u8]) -> bool {
        if self.skips_compression(raw.len()) {
            return false;
        }
        let st = &mut self.compress;
        let Some(cctx) = self.cctx.as_mut() else {
            return false;
        };
        let bar = |n: usize| n - n / COMPRESS_MIN_SAVING_DIVISOR;
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        // A large frame is probed first: its first COMPRESS_PROBE_BYTES must meet the same
        // bar, or the whole attempt is a miss. A failed full attempt on 128 KiB costs ~0.3
        // ms; the probe an eighth of that. (A prefix compresses a little worse than the
        // frame, having less history: frames just over the bar whose prefix is just under
        // it are stored raw, the price of not paying a full attempt on every frame of
        // data that saves 4-8%, like fio's default buffers.)
        let probe_failed = raw.len() >= 2 * COMPRESS_PROBE_BYTES
            && {
                let probe = &raw[..COMPRESS_PROBE_BYTES];
                !matches!(cctx.compress_to_buffer(probe, &mut self.scratch), Ok(n) if n <= bar(probe.len()))
            };
        self.scratch.clear();
        let ok = !probe_failed
            && matches!(cctx.compress_to_buffer(raw, &mut self.scratch), Ok(n) if n <= bar(raw.len()));
        if ok {
            st.misses = 0;
        } else {
            st.misses = st.misses.saturating_add(1);
            if st.misses >= COMPRESS_MISSES_BEFORE_SKIP {
                let doublings = (st.misses - COMPRESS_MISSES_BEFORE_SKIP).min(16);
                st.skip_bytes =
                    (COMPRESS_SKIP_FIRST_BYTES << doublings).min(COMPRESS_SKIP_MAX_BYTES);
            }
        }
        ok
    }

    /// Bytes so far (frames only; the directory and footer come on `finish`).
    pub fn len_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Append `raw` (a whole number of blocks starting at `first_lba`) as one frame.
    pub fn add_frame(&mut self, first_lba: u64, raw: &[u8]) -> DirEntry {
        self.add_frame_parts(first_lba, &[raw])
    }

    /// Append the concatenation of `parts` (together a whole number of blocks starting at
    /// `first_lba`) as one frame: the same bytes as [`SegmentBuilder::add_frame`] of the
    /// joined data. The parts are only joined in memory when the frame is to be compressed;
    /// a raw frame is copied part by part into the segment.
    pub fn add_frame_parts(&mut self, first_lba: u64, parts: &[&[u8]]) -> DirEntry {
        let bs = self.block_size as usize;
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(raw_len > 0 && raw_len.is_multiple_of(bs) && raw_len <= FRAME_RAW_BYTES_MAX);
        let blocks = (raw_len / bs) as u32;
        let compressed = match parts {
            [one] => self.try_compress(one),
            // Not trying: no need to join the parts.
            _ if self.skips_compression(raw_len) => false,
            _ => {
                let mut joined = std::mem::take(&mut self.joined);
                joined.clear();
                for p in parts {
                    joined.extend_from_slice(p);
                }
                let ok = self.try_compress(&joined);
                self.joined = joined;
                ok
            }
        };
        // Raw when zstd does not help enough (already-compressed or random data).
        let flags: u16 = if compressed { FLAG_ZSTD } else { 0 };
        let payload_len = if compressed {
            self.scratch.len()
        } else {
            raw_len
        };
        let offset = self.len_bytes() as u64;
        let mut hdr = [0u8; FRAME_HEADER_BYTES];
        hdr[0..4].copy_from_slice(&FRAME_MAGIC);
        hdr[4..6].copy_from_slice(&flags.to_le_bytes());
        hdr[8..16].copy_from_slice(&first_lba.to_le_bytes());
        hdr[16..20].copy_from_slice(&blocks.to_le_bytes());
        hdr[20..24].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let mut raw_h = crc32fast::Hasher::new();
        for p in parts {
            raw_h.update(p);
        }
        hdr[24..28].copy_from_slice(&raw_h.clone().finalize().to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&hdr[0..28]);
        if compressed {
            h.update(&self.scratch);
        } else {
            // The stored payload is the raw data: extend by its crc instead of a 2nd pass.
            h.combine(&raw_h);
        }
        hdr[28..32].copy_from_slice(&h.finalize().to_le_bytes());
        self.buf.extend_from_slice(&hdr);
        if compressed {
            self.buf.extend_from_slice(&self.scratch);
        } else {
            for p in parts {
                self.buf.extend_from_slice(p);
            }
        }
        let e = DirEntry {
            lba: first_lba,
            blocks: blocks as u64,
            kind: EntryKind::Data,
            frame_offset: offset,
            frame_len: (FRAME_HEADER_BYTES + payload_len) as u32,
        };
        self.entries.push(e);
        e
    }

    /// Record a run of blocks that is unmapped (or zero-allocated) from this segment on.
    pub fn add_range(&mut self, lba: u64, blocks: u64, kind: EntryKind) -> DirEntry {
        debug_assert!(kind != EntryKind::Data);
        let e = DirEntry {
            lba,
            blocks,
            kind,
            frame_offset: 0,
            frame_len: 0,
        };
        self.entries.push(e);
        e
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Append directory and footer; returns the whole object and its directory.
    pub fn finish(self) -> (Vec<u8>, Vec<DirEntry>) {
        let (mut buf, start, entries) = self.finish_in_place();
        buf.drain(..start);
        (buf, entries)
    }

    /// Finish: the segment is `buf[start..]` (see [`SegmentBuilder::new_aligned_in`]).
    pub fn finish_in_place(mut self) -> (Vec<u8>, usize, Vec<DirEntry>) {
        let dir_offset = self.len_bytes() as u64;
        let dir = encode_bincode(&self.entries);
        self.buf.extend_from_slice(&dir);
        let mut f = [0u8; SEGMENT_FOOTER_BYTES];
        f[0..8].copy_from_slice(&SEGMENT_FOOTER_MAGIC);
        f[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        f[12..16].copy_from_slice(&(dir.len() as u32).to_le_bytes());
        f[16..24].copy_from_slice(&dir_offset.to_le_bytes());
        f[24..32].copy_from_slice(&self.segment_id.to_le_bytes());
        f[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        f[40..44].copy_from_slice(&crc32fast::hash(&dir).to_le_bytes());
        let crc = crc32fast::hash(&f[0..44]);
        f[44..48].copy_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&f);
        (self.buf, self.start, self.entries)
    }
}

fn encode_bincode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for our plain data types (no maps with failing keys,
    // no custom serializers); an error here is a programming bug, so it is surfaced loudly.
    bincode::serde::encode_to_vec(v, bincode_config()).expect("bincode encoding of plain data")
}

fn decode_bincode<T: for<'de> Deserialize<'de>>(what: &'static str, b: &[u8]) -> FResult<T> {
    let (v, used) = bincode::serde::decode_from_slice(b, bincode_config())
        .map_err(|e| corrupt(what, format!("decode: {e}")))?;
    if used != b.len() {
        return Err(corrupt(
            what,
            format!("{} trailing bytes after payload", b.len() - used),
        ));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// Segment reading.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentFooter {
    pub dir_len: u32,
    pub dir_offset: u64,
    pub segment_id: u64,
    pub epoch: u64,
    pub dir_crc: u32,
}

/// Parse the fixed footer from the last [`SEGMENT_FOOTER_BYTES`] of a segment of
/// `object_len` bytes, checking it fits the object.
pub fn parse_segment_footer(tail: &[u8], object_len: u64) -> FResult<SegmentFooter> {
    need("segment footer", tail, SEGMENT_FOOTER_BYTES)?;
    let f = &tail[tail.len() - SEGMENT_FOOTER_BYTES..];
    if f[0..8] != SEGMENT_FOOTER_MAGIC {
        return Err(FormatError::BadMagic {
            expected: "NBDS3SFT".into(),
        });
    }
    if crc32fast::hash(&f[0..44]) != rd_u32(f, 44) {
        return Err(FormatError::ChecksumMismatch {
            what: "segment footer",
            offset: object_len.saturating_sub(SEGMENT_FOOTER_BYTES as u64),
        });
    }
    check_version(rd_u16(f, 8))?;
    let footer = SegmentFooter {
        dir_len: rd_u32(f, 12),
        dir_offset: rd_u64(f, 16),
        segment_id: rd_u64(f, 24),
        epoch: rd_u64(f, 32),
        dir_crc: rd_u32(f, 40),
    };
    let dir_end = footer
        .dir_offset
        .checked_add(footer.dir_len as u64)
        .ok_or_else(|| corrupt("segment footer", "directory range overflows"))?;
    if footer.dir_offset < SEGMENT_HEADER_BYTES as u64
        || dir_end + SEGMENT_FOOTER_BYTES as u64 != object_len
        || footer.dir_len as usize > DIRECTORY_BYTES_MAX
    {
        return Err(corrupt(
            "segment footer",
            format!(
                "directory {}+{} does not fit object of {object_len} bytes",
                footer.dir_offset, footer.dir_len
            ),
        ));
    }
    Ok(footer)
}

/// Decode and validate a directory: crc, and every entry inside the frame area.
pub fn parse_segment_directory(dir: &[u8], footer: &SegmentFooter) -> FResult<Vec<DirEntry>> {
    if dir.len() != footer.dir_len as usize {
        return Err(FormatError::Truncated {
            what: "segment directory",
            need: footer.dir_len as u64,
            have: dir.len() as u64,
        });
    }
    if crc32fast::hash(dir) != footer.dir_crc {
        return Err(FormatError::ChecksumMismatch {
            what: "segment directory",
            offset: footer.dir_offset,
        });
    }
    let entries: Vec<DirEntry> = decode_bincode("segment directory", dir)?;
    for e in &entries {
        if e.blocks == 0 || e.lba.checked_add(e.blocks).is_none() {
            return Err(corrupt("segment directory", format!("bad range {e:?}")));
        }
        if e.kind == EntryKind::Data {
            let end = e.frame_offset.checked_add(e.frame_len as u64);
            if e.frame_offset < SEGMENT_HEADER_BYTES as u64
                || (e.frame_len as usize) < FRAME_HEADER_BYTES
                || end.is_none_or(|end| end > footer.dir_offset)
            {
                return Err(corrupt(
                    "segment directory",
                    format!("frame outside segment data area: {e:?}"),
                ));
            }
        }
    }
    Ok(entries)
}

/// Check a segment header (first 16 bytes); returns the block size it was written with.
pub fn parse_segment_header(b: &[u8]) -> FResult<u32> {
    need("segment header", b, SEGMENT_HEADER_BYTES)?;
    if b[0..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic {
            expected: "NBDS3SEG".into(),
        });
    }
    check_version(rd_u16(b, 8))?;
    if rd_u16(b, 10) != 0 {
        return Err(corrupt("segment header", "reserved bytes are not zero"));
    }
    Ok(rd_u32(b, 12))
}

/// A decoded frame: `blocks` blocks starting at `first_lba`, verified.
#[derive(Debug, Clone)]
pub struct Frame {
    pub first_lba: u64,
    pub blocks: u32,
    /// `Bytes` so callers can hand out block slices without copying.
    pub data: bytes::Bytes,
}

thread_local! {
    /// One decompression context per thread, reused: creating one per frame halved cold
    /// 4 KiB random read throughput. `None` if zstd could not allocate one.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// Decompress a frame payload of exactly `raw_len` bytes (the caller checks the length).
fn decompress_frame(payload: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DCTX.with(|d| match d.borrow_mut().as_mut() {
        Some(d) => d.decompress(payload, raw_len),
        None => zstd::bulk::decompress(payload, raw_len),
    })
}

/// Verify and decompress one frame (header + payload, exactly `frame_len` bytes).
/// `offset` is only used in error messages.
pub fn decode_frame(b: &[u8], block_size: u32, offset: u64) -> FResult<Frame> {
    need("frame header", b, FRAME_HEADER_BYTES)?;
    if b[0..4] != FRAME_MAGIC {
        return Err(FormatError::BadMagic {
            expected: "NBFR".into(),
        });
    }
    let flags = rd_u16(b, 4);
    let first_lba = rd_u64(b, 8);
    let blocks = rd_u32(b, 16);
    let stored_len = rd_u32(b, 20) as usize;
    let raw_crc = rd_u32(b, 24);
    let crc = rd_u32(b, 28);
    if b.len() != FRAME_HEADER_BYTES + stored_len {
        return Err(FormatError::Truncated {
            what: "frame",
            need: (FRAME_HEADER_BYTES + stored_len) as u64,
            have: b.len() as u64,
        });
    }
    let payload = &b[FRAME_HEADER_BYTES..];
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..28]);
    h.update(payload);
    if h.finalize() != crc {
        return Err(FormatError::ChecksumMismatch {
            what: "frame",
            offset,
        });
    }
    let raw_len = (blocks as usize)
        .checked_mul(block_size as usize)
        .filter(|&n| n > 0 && n <= FRAME_RAW_BYTES_MAX)
        .ok_or_else(|| corrupt("frame", format!("bad block count {blocks}")))?;
    let data = match flags {
        FLAG_ZSTD => {
            let d = decompress_frame(payload, raw_len)
                .map_err(|e| corrupt("frame", format!("zstd at offset {offset}: {e}")))?;
            if d.len() != raw_len {
                return Err(corrupt(
                    "frame",
                    format!("decompressed to {} bytes, expected {raw_len}", d.len()),
                ));
            }
            d
        }
        0 => {
            if payload.len() != raw_len {
                return Err(corrupt("frame", "raw payload length mismatch"));
            }
            payload.to_vec()
        }
        other => return Err(corrupt("frame", format!("unknown flags {other:#x}"))),
    };
    if crc32fast::hash(&data) != raw_crc {
        return Err(FormatError::ChecksumMismatch {
            what: "frame data",
            offset,
        });
    }
    Ok(Frame {
        first_lba,
        blocks,
        data: data.into(),
    })
}

/// Decode a whole segment: header, footer, directory, and (when `check_frames`) every
/// frame. Used by the inspector and by tests; the daemon reads frames by range instead.
pub fn parse_segment(b: &[u8], check_frames: bool) -> FResult<(SegmentFooter, Vec<DirEntry>)> {
    let block_size = parse_segment_header(b)?;
    if !valid_block_size(block_size) {
        return Err(corrupt(
            "segment header",
            format!("block size {block_size}"),
        ));
    }
    let footer = parse_segment_footer(b, b.len() as u64)?;
    let dir_start = footer.dir_offset as usize;
    let dir = &b[dir_start..dir_start + footer.dir_len as usize];
    let entries = parse_segment_directory(dir, &footer)?;
    if check_frames {
        for e in entries.iter().filter(|e| e.kind == EntryKind::Data) {
            let s = e.frame_offset as usize;
            let f = decode_frame(&b[s..s + e.frame_len as usize], block_size, e.frame_offset)?;
            if f.first_lba != e.lba || f.blocks as u64 != e.blocks {
                return Err(corrupt(
                    "segment",
                    format!("frame at {} disagrees with directory", e.frame_offset),
                ));
            }
        }
    }
    Ok((footer, entries))
}

// ---------------------------------------------------------------------------------------
// Envelopes: manifests and checkpoints.

pub fn encode_envelope<T: Serialize>(magic: &[u8; 8], v: &T, compress: bool) -> Vec<u8> {
    let raw = encode_bincode(v);
    let (flags, payload) = if compress {
        // Level 1: a checkpoint (the whole page index) is rewritten in the background as the
        // tail grows. On a 3.9 MB checkpoint of random writes level 3 took twice the CPU
        // (81 against 163 MB/s) for a 3% smaller object.
        match zstd::bulk::compress(&raw, 1) {
            Ok(c) if c.len() < raw.len() => (FLAG_ZSTD, c),
            _ => (0, raw.clone()),
        }
    } else {
        (0, raw.clone())
    };
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_BYTES + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[0..20]);
    h.update(&payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn decode_envelope<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    magic: &[u8; 8],
    b: &[u8],
) -> FResult<T> {
    need(what, b, ENVELOPE_HEADER_BYTES)?;
    if &b[0..8] != magic {
        return Err(FormatError::BadMagic {
            expected: String::from_utf8_lossy(magic).into_owned(),
        });
    }
    let version = rd_u16(b, 8);
    let flags = rd_u16(b, 10);
    let payload_len = rd_u32(b, 12) as usize;
    let raw_len = rd_u32(b, 16) as usize;
    let crc = rd_u32(b, 20);
    if b.len() != ENVELOPE_HEADER_BYTES + payload_len {
        return Err(FormatError::Truncated {
            what,
            need: (ENVELOPE_HEADER_BYTES + payload_len) as u64,
            have: b.len() as u64,
        });
    }
    let payload = &b[ENVELOPE_HEADER_BYTES..];
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..20]);
    h.update(payload);
    if h.finalize() != crc {
        return Err(FormatError::ChecksumMismatch { what, offset: 0 });
    }
    // Version is checked after the crc so a flipped version byte reads as corruption.
    check_version(version)?;
    if raw_len > ENVELOPE_RAW_BYTES_MAX {
        return Err(corrupt(what, format!("raw length {raw_len} too large")));
    }
    match flags {
        FLAG_ZSTD => {
            let raw = zstd::bulk::decompress(payload, raw_len)
                .map_err(|e| corrupt(what, format!("zstd: {e}")))?;
            if raw.len() != raw_len {
                return Err(corrupt(what, "decompressed length mismatch"));
            }
            decode_bincode(what, &raw)
        }
        0 => {
            if payload_len != raw_len {
                return Err(corrupt(what, "raw length mismatch"));
            }
            decode_bincode(what, payload)
        }
        other => Err(corrupt(what, format!("unknown flags {other:#x}"))),
    }
}

/// Reference from a manifest to a segment object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub id: u64,
    pub size_bytes: u64,
}

/// A segment as a checkpoint records it: with the data blocks it was written with, so dead
/// space stays known across checkpoints (compaction picks victims by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSegment {
    pub id: u64,
    pub size_bytes: u64,
    pub blocks_total: u64,
}

/// Reference from a manifest to a checkpoint object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub id: u64,
    pub size_bytes: u64,
}

/// The commit point. `manifest/<version:020>`, written once with IfAbsent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u64,
    /// The export name in full (the key may be a hash of it; this detects collisions).
    pub export_name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Raised by every writer that opens the export; a lower epoch is fenced.
    pub writer_epoch: u64,
    /// Random per writer session: tells "my own commit that looked failed" from another's.
    pub writer_nonce: u64,
    pub created_unix_ms: u64,
    /// Index state up to some earlier commit, or none (empty index).
    pub checkpoint: Option<CheckpointRef>,
    /// Segments committed after the checkpoint, oldest first; replayed in order on open.
    pub tail: Vec<SegmentRef>,
    /// Lowest manifest version that garbage collection keeps; versions below may be gone.
    pub gc_low_water: u64,
}

/// One extent in a checkpoint: `blocks` blocks from `lba` map to `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointValue {
    /// Block `block_in_frame` of the frame at `frame_offset` (len `frame_len`) of
    /// `segments[segment_index]`.
    Frame {
        segment_index: u32,
        frame_offset: u64,
        frame_len: u32,
        block_in_frame: u32,
    },
    ZeroAlloc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointExtent {
    pub lba: u64,
    pub blocks: u64,
    pub value: CheckpointValue,
}

/// Full index snapshot. `checkpoint/<id:020>`, written once with IfAbsent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Manifest version whose state this is.
    pub version: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Every segment the extents point into (and only those).
    pub segments: Vec<CheckpointSegment>,
    pub extents: Vec<CheckpointExtent>,
}

pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    encode_envelope(&MANIFEST_MAGIC, m, false)
}
pub fn decode_manifest(b: &[u8]) -> FResult<Manifest> {
    decode_envelope("manifest", &MANIFEST_MAGIC, b)
}
pub fn encode_checkpoint(c: &Checkpoint) -> Vec<u8> {
    encode_envelope(&CHECKPOINT_MAGIC, c, true)
}
pub fn decode_checkpoint(b: &[u8]) -> FResult<Checkpoint> {
    decode_envelope("checkpoint", &CHECKPOINT_MAGIC, b)
}

// ---------------------------------------------------------------------------------------
// Keys.

/// Longest export name accepted (NBD allows 4096 bytes).
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;
/// Encoded names longer than this are replaced by a hash (S3 keys are limited to 1024
/// bytes, file names to 255).
const EXPORT_KEY_PLAIN_MAX: usize = 160;

/// Injective, traversal-free key component for an export name: `n` + percent-encoding of
/// every byte outside `[A-Za-z0-9._-]`, or, when that is longer than 160 bytes, `h` + the
/// SHA-256 of the name in hex. The leading letter keeps the two forms (and `.`/`..`) apart;
/// the manifest stores the full name so a hash collision would be detected, not merged.
pub fn export_key(name: &str) -> Result<String, FormatError> {
    if name.len() > EXPORT_NAME_BYTES_MAX {
        return Err(FormatError::ExportNameTooLong {
            bytes: name.len(),
            limit: EXPORT_NAME_BYTES_MAX,
        });
    }
    let mut s = String::with_capacity(name.len() + 1);
    s.push('n');
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
        if s.len() > EXPORT_KEY_PLAIN_MAX {
            break;
        }
    }
    if s.len() > EXPORT_KEY_PLAIN_MAX {
        let digest = Sha256::digest(name.as_bytes());
        let mut h = String::from("h");
        for b in digest {
            h.push_str(&format!("{b:02x}"));
        }
        return Ok(h);
    }
    Ok(s)
}

/// Inverse of the plain form of [`export_key`]; `None` for hashed keys or foreign names.
pub fn export_name_from_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix('n')?;
    let mut out = Vec::with_capacity(rest.len());
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = rest.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Root under which all exports live.
pub const EXPORTS_PREFIX: &str = "exports/";

/// Key names for one export.
#[derive(Debug, Clone)]
pub struct ExportKeys {
    /// `exports/<export-key>/`
    pub root: String,
}

impl ExportKeys {
    pub fn new(export_name: &str) -> Result<Self, FormatError> {
        Ok(Self {
            root: format!("{EXPORTS_PREFIX}{}/", export_key(export_name)?),
        })
    }
    pub fn manifest_prefix(&self) -> String {
        format!("{}manifest/", self.root)
    }
    pub fn manifest(&self, version: u64) -> String {
        format!("{}manifest/{version:020}", self.root)
    }
    pub fn segment_prefix(&self) -> String {
        format!("{}segment/", self.root)
    }
    pub fn segment(&self, id: u64) -> String {
        format!("{}segment/{id:020}", self.root)
    }
    pub fn checkpoint_prefix(&self) -> String {
        format!("{}checkpoint/", self.root)
    }
    pub fn checkpoint(&self, id: u64) -> String {
        format!("{}checkpoint/{id:020}", self.root)
    }
    /// The serving daemon's heartbeat (overwritten in place; not part of the log).
    pub fn lease(&self) -> String {
        format!("{}lease", self.root)
    }
    /// Where the daemon probes conditional-put support.
    pub fn probe_prefix(&self) -> String {
        format!("{}probe/", self.root)
    }
}

/// Parse the trailing 20-digit number of a manifest/segment/checkpoint key.
pub fn parse_numbered_key(prefix: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    if rest.len() != 20 || !rest.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Object ids (segments, checkpoints) are `epoch << 32 | sequence`: unique per writer
/// session without coordination, and ordered by time across writers.
pub fn object_id(epoch: u64, seq: u32) -> u64 {
    (epoch << 32) | seq as u64
}
pub fn epoch_of_id(id: u64) -> u64 {
    id >> 32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_block(seed: &mut u64) -> Vec<u8> {
        (0..4096)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }

    fn frame_flags(seg: &[u8], e: &DirEntry) -> u16 {
        rd_u16(seg, e.frame_offset as usize + 4)
    }

    #[test]
    fn without_a_level_every_frame_is_stored_raw_and_reads_back() {
        let text: Vec<u8> = b"compressible line of text 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(32 * 4096)
            .collect();
        for (level, want_flags) in [(None, 0), (Some(-1), FLAG_ZSTD), (Some(-7), FLAG_ZSTD)] {
            let mut b = SegmentBuilder::new(object_id(1, 1), 1, 4096, level);
            let entries: Vec<DirEntry> = (0..8u64).map(|i| b.add_frame(i * 32, &text)).collect();
            let (seg, _) = b.finish();
            let (_, parsed) = parse_segment(&seg, true).expect("segment parses");
            assert_eq!(parsed.len(), entries.len());
            for e in &entries {
                assert_eq!(frame_flags(&seg, e), want_flags, "level {level:?}");
                let at = e.frame_offset as usize;
                let frame = decode_frame(&seg[at..at + e.frame_len as usize], 4096, e.frame_offset)
                    .expect("frame decodes");
                assert_eq!(&frame.data[..], &text[..]);
            }
            // Raw: 8 frames of 128 KiB and their headers; zstd: a small fraction of that.
            if level.is_none() {
                assert!(seg.len() > 8 * text.len(), "{}", seg.len());
            } else {
                assert!(seg.len() < text.len(), "{}", seg.len());
            }
        }
    }

    #[test]
    fn compression_early_abort_skips_random_data_and_recovers() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut b = SegmentBuilder::new(object_id(1, 1), 1, 4096, Some(1));
        let text: Vec<u8> = b"compressible line of text 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        let mut entries = Vec::new();
        let mut attempts_on_random = 0;
        // 2,000 random frames (8 MiB) cost only a handful of compression attempts.
        for i in 0..2000u64 {
            let skipping = b.compress.skip_bytes > 0;
            entries.push((b.add_frame(i, &random_block(&mut seed)), true));
            if !skipping {
                attempts_on_random += 1;
            }
        }
        assert!(
            (4..=16).contains(&attempts_on_random),
            "{attempts_on_random} attempts"
        );
        // What was learnt carries into the next segment: it starts out skipping.
        let carried = b.compress_state();
        assert!(carried.skip_bytes > 0 && carried.misses > COMPRESS_MISSES_BEFORE_SKIP);
        let mut next =
            SegmentBuilder::new(object_id(1, 2), 1, 4096, Some(1)).with_compress_state(carried);
        next.add_frame(0, &text);
        assert_eq!(next.entry_count(), 1);
        assert!(next.compress.misses > 0, "the next segment tried at once");
        // Compressible data is compressed again within the longest skip.
        let mut first_zstd = None;
        for i in 0..(COMPRESS_SKIP_MAX_BYTES / 4096 + 2) {
            let e = b.add_frame(10_000 + i, &text);
            entries.push((e, false));
            if first_zstd.is_none() && b.compress.misses == 0 {
                first_zstd = Some(i);
            }
        }
        assert!(first_zstd.is_some(), "compression never resumed");
        let (seg, _) = b.finish();
        let mut zstd_text = 0;
        for (e, random) in &entries {
            let f = frame_flags(&seg, e);
            if *random {
                assert_eq!(f, 0, "random data must be stored raw");
            } else if f == FLAG_ZSTD {
                zstd_text += 1;
            }
            let fr = decode_frame(
                &seg[e.frame_offset as usize..(e.frame_offset + e.frame_len as u64) as usize],
                4096,
                e.frame_offset,
            )
            .unwrap();
            if !*random {
                assert_eq!(fr.data, text);
            }
        }
        assert!(zstd_text > 0);
        // And the whole segment still parses with every frame checked.
        parse_segment(&seg, true).unwrap();
    }

    #[test]
    fn large_frames_are_probed_before_a_full_attempt() {
        let mut seed = 7u64;
        let text: Vec<u8> = b"compressible line of text 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(128 << 10)
            .collect();
        // Compressible from the start: the probe passes and the frame is stored zstd.
        let mut b = SegmentBuilder::new(object_id(1, 1), 1, 4096, Some(1));
        let e = b.add_frame(0, &text);
        // A random prefix fails the probe: stored raw, though the rest would compress.
        let mut mixed = text.clone();
        for c in mixed[..COMPRESS_PROBE_BYTES].chunks_mut(4096) {
            c.copy_from_slice(&random_block(&mut seed));
        }
        let m = b.add_frame(32, &mixed);
        assert_eq!(b.compress.misses, 1, "the failed probe counts as a miss");
        let (seg, _) = b.finish();
        assert_eq!(frame_flags(&seg, &e), FLAG_ZSTD);
        assert_eq!(frame_flags(&seg, &m), 0);
        for (entry, want) in [(&e, &text), (&m, &mixed)] {
            let at = entry.frame_offset as usize;
            let fr = decode_frame(
                &seg[at..at + entry.frame_len as usize],
                4096,
                entry.frame_offset,
            )
            .unwrap();
            assert!(fr.data == want[..]);
        }
    }

    #[test]
    fn frames_saving_under_an_eighth_are_stored_raw() {
        let mut seed = 42u64;
        // 4096 bytes of which ~6% is a repeated pattern: zstd saves less than 12.5%.
        let mut raw = random_block(&mut seed);
        for x in raw[..256].iter_mut() {
            *x = 7;
        }
        let mut b = SegmentBuilder::new(object_id(1, 1), 1, 4096, Some(1));
        let e = b.add_frame(0, &raw);
        let (seg, _) = b.finish();
        assert_eq!(frame_flags(&seg, &e), 0);
        assert_eq!(e.frame_len as usize, FRAME_HEADER_BYTES + 4096);
    }

    fn sample_segment() -> Vec<u8> {
        let mut b = SegmentBuilder::new(object_id(3, 7), 3, 4096, Some(1));
        let mut raw = vec![0u8; 8192];
        raw[0] = 1;
        raw[5000] = 9;
        b.add_frame(10, &raw);
        let rnd: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        b.add_frame(100, &rnd);
        b.add_range(20, 5, EntryKind::Unmap);
        b.finish().0
    }

    #[test]
    fn aligned_builder_writes_the_same_bytes_at_an_aligned_address() {
        let build = |mut b: SegmentBuilder| {
            let mut raw = vec![0u8; 8192];
            raw[0] = 1;
            b.add_frame(10, &raw);
            b.add_range(20, 5, EntryKind::Unmap);
            b
        };
        let (plain, _) = build(SegmentBuilder::new(object_id(3, 7), 3, 4096, Some(1))).finish();
        // A reused buffer with stale contents and an arbitrary address.
        let (buf, start, entries) = build(SegmentBuilder::new_aligned_in(
            vec![0xAAu8; 5000],
            64 << 10,
            object_id(3, 7),
            3,
            4096,
            Some(1),
        ))
        .finish_in_place();
        assert_eq!(buf[start..].as_ptr() as usize % SEGMENT_BUF_ALIGN, 0);
        assert_eq!(
            &buf[start..],
            &plain[..],
            "same object bytes, offsets from its start"
        );
        assert_eq!(parse_segment(&buf[start..], true).unwrap().1, entries);
    }

    #[test]
    fn a_frame_in_parts_is_the_frame_of_the_joined_bytes() {
        // Compressible (text), incompressible (xorshift) and a mix, in 1..4 parts.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = vec![0u8; 4 * 4096];
        for c in noise.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let text: Vec<u8> = b"block device line of text, "
            .iter()
            .copied()
            .cycle()
            .take(4 * 4096)
            .collect();
        let mut mixed = text.clone();
        mixed[8192..].copy_from_slice(&noise[8192..]);
        for data in [&text, &noise, &mixed] {
            for cuts in [vec![], vec![4096], vec![4096, 8192, 12288], vec![12288]] {
                let mut parts: Vec<&[u8]> = Vec::new();
                let mut at = 0;
                for &c in cuts.iter().chain(std::iter::once(&data.len())) {
                    parts.push(&data[at..c]);
                    at = c;
                }
                let mut whole = SegmentBuilder::new(object_id(3, 7), 3, 4096, Some(1));
                let mut split = SegmentBuilder::new(object_id(3, 7), 3, 4096, Some(1));
                let a = whole.add_frame(40, data);
                let b = split.add_frame_parts(40, &parts);
                assert_eq!(a, b);
                let (wa, _) = whole.finish();
                let (wb, entries) = split.finish();
                assert_eq!(wa, wb, "{} parts", parts.len());
                let e = entries[0];
                let s = e.frame_offset as usize;
                let f = decode_frame(&wb[s..s + e.frame_len as usize], 4096, 0).unwrap();
                assert_eq!(&f.data[..], &data[..]);
            }
        }
    }

    #[test]
    fn segment_round_trip() {
        let seg = sample_segment();
        let (footer, entries) = parse_segment(&seg, true).unwrap();
        assert_eq!(footer.segment_id, object_id(3, 7));
        assert_eq!(entries.len(), 3);
        let e = entries[0];
        let s = e.frame_offset as usize;
        let f = decode_frame(&seg[s..s + e.frame_len as usize], 4096, 0).unwrap();
        assert_eq!(f.first_lba, 10);
        assert_eq!(f.data[0], 1);
        assert_eq!(f.data[5000], 9);
        assert_eq!(entries[2].kind, EntryKind::Unmap);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let seg = sample_segment();
        for i in 0..seg.len() {
            let mut bad = seg.clone();
            bad[i] ^= 0x40;
            assert!(parse_segment(&bad, true).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn manifest_round_trip_and_flips() {
        let m = Manifest {
            version: 5,
            export_name: "disk".into(),
            size_bytes: 1 << 30,
            block_size: 4096,
            writer_epoch: 2,
            writer_nonce: 77,
            created_unix_ms: 1,
            checkpoint: Some(CheckpointRef {
                id: 9,
                size_bytes: 100,
            }),
            tail: vec![SegmentRef {
                id: 10,
                size_bytes: 5,
            }],
            gc_low_water: 1,
        };
        let b = encode_manifest(&m);
        assert_eq!(decode_manifest(&b).unwrap(), m);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_manifest(&bad).is_err(), "flip at {i} undetected");
        }
        assert!(decode_manifest(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn export_keys_are_injective_and_safe() {
        let names = [
            "", ".", "..", "../x", "a/b", "a%2Fb", "a%2fb", "é", "n", "h", "%", "a b",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let k = export_key(n).unwrap();
            assert!(!k.contains('/') && k != "." && k != "..", "{k}");
            assert!(seen.insert(k.clone()), "collision for {n:?}");
            assert_eq!(export_name_from_key(&k).as_deref(), Some(n));
        }
        let long = "a".repeat(4096);
        let k = export_key(&long).unwrap();
        assert!(k.starts_with('h') && k.len() == 65);
        assert_ne!(k, export_key(&"a".repeat(4095)).unwrap());
        assert!(export_key(&"a".repeat(4097)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_segment(&b, true);
            let _ = decode_manifest(&b);
            let _ = decode_checkpoint(&b);
            let _ = decode_frame(&b, 4096, 0);
            let _ = parse_segment_footer(&b, b.len() as u64);
        }

        #[test]
        fn export_key_injective(a in ".{0,40}", b in ".{0,40}") {
            if a != b {
                proptest::prop_assert_ne!(export_key(&a).unwrap(), export_key(&b).unwrap());
            }
        }
    }
}
