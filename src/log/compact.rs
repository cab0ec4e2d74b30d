//! Compaction: rewrite the live blocks of mostly-dead (or tiny) segments into new segments,
//! so that garbage collection can delete the old ones. One code path serves the daemon's
//! background compactor ([`spawn_compactor`]) and the offline `nbds3-compact`.
//!
//! A pass: pick victims from the index's per-segment live-block counters (no LIST); read
//! the frames that still hold live blocks (verified; neighbours in a segment with one
//! ranged GET, see [`super::plan_frame_spans`]); re-frame those
//! blocks in block order into new segments built with [`SegmentBuilder`] under ids from
//! [`Log::allocate_id`]; upload them with IfAbsent; then [`Log::commit_rewrite`] publishes a
//! checkpoint + manifest that repoints only the runs that still point where the copy was
//! taken from. A block written meanwhile keeps its newer location; its copy is dead on
//! arrival. The victims end with no live blocks, drop out of the index, and become garbage
//! once no retained manifest names them (`gc`).
//!
//! Invariants:
//! - Durability order: every new segment is durable before the manifest that names it is
//!   written (`commit_rewrite` runs after all uploads returned Ok).
//! - Content never changes: a rewrite only moves bytes that are verified (frame crcs) and
//!   only where the index still holds the exact source location (segment id, frame offset
//!   and block in frame; segment ids are never reused, so equality means "not overwritten").
//! - A crash at any point loses nothing: before the manifest lands the new segments are
//!   orphans (GC removes them); after it lands the old ones are.
//! - New ids stay pending (GC keeps them) until a manifest names them or the pass knows no
//!   manifest ever will.
//! - The background compactor starts a pass only once the export has served no request
//!   for `pass_idle`, or `pass_idle_wait_max` after its previous pass, whichever is first
//!   (see `wait_for_idle`): requests come before reclaiming space, and space is still
//!   reclaimed on an export that is never idle. GC passes run every `gc_interval` whether
//!   or not the export is idle (see `wait_for_idle`).
//! - Stored bytes stay bounded under any load ([`SpaceGate`]): once the segments the index
//!   names hold more than `space_amp_max` × their live bytes, passes no longer wait for an
//!   interval or an idle export; above [`SPACE_STALL_FACTOR`] × that (or above a backlog
//!   the store had when the compactor started, as far as passes have worked it off),
//!   flushes (and so, once the dirty set is full, writers) wait for them. Only while
//!   passes can still reclaim: an urgent pass that commits nothing turns the gate off for
//!   a while.
//! - Bounded: one pass copies at most `pass_bytes_max` raw bytes (memory and I/O), with at
//!   most `reads_in_flight_max` reads of at most `SPAN_BYTES_MAX` each and the log's
//!   upload limit in flight.
//! - The page index's memory bound holds under any load ([`IndexGate`]): above
//!   [`INDEX_URGENT_FACTOR`] × `index_runs_max` runs, defragmenting passes no longer wait
//!   for an idle export; above [`INDEX_STALL_FACTOR`] ×, flushes (and so, once the dirty
//!   set is full, writers) wait for them. Only while defragmentation can still lower the
//!   index: once a pass over the bound finds nothing to join (the device's layout needs
//!   that many runs), nothing waits, and the log says the bound is too small.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use super::gc::{self, GcConfig, GcReport, GcState};
use super::index::{Index, SegStat, Val};
use super::{check_frame_covers, read_segment_directory, Log, LogError, OpenMode};
use crate::format::{DirEntry, EntryKind, SegmentBuilder, SegmentRef, FRAME_RAW_BYTES_MAX};
use crate::store::{DynStore, ListPage, ObjectMeta, ObjectStore, PutMode, StoreResult};
use crate::util::RangeValue;

/// Errors of the compaction / GC / lease layer.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("export is open read-only; compaction and gc need the writer role")]
    ReadOnly,
    #[error("invalid compaction setting: {0}")]
    Invalid(String),
    #[error("{key}: bad lease object: {reason}")]
    Lease { key: String, reason: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl CompactError {
    pub fn is_fenced(&self) -> bool {
        matches!(self, CompactError::Log(LogError::Fenced { .. }))
    }
}

pub type CompactResult<T> = Result<T, CompactError>;

/// Tunables of compaction and of the background compactor (units last).
#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// A segment whose share of dead data blocks is at least this is rewritten.
    pub dead_fraction_min: f64,
    /// Segments smaller than this (stored bytes) are merged ...
    pub small_segment_bytes: u64,
    /// ... once at least this many of them exist.
    pub small_segments_min: usize,
    /// Raw live bytes one pass copies at most (bounds memory and foreground impact).
    pub pass_bytes_max: u64,
    /// Background compactor: time between passes (so at most 60 s / this passes a minute).
    pub pass_interval: Duration,
    /// Frame reads in flight during a pass.
    pub reads_in_flight_max: usize,
    pub gc: GcConfig,
    /// Background compactor: time between GC passes.
    pub gc_interval: Duration,
    /// Background compactor: a pass waits until the export has served no request for this
    /// long (`Duration::ZERO`: it does not wait) …
    pub pass_idle: Duration,
    /// … but for at most this long after the previous pass, so a busy export is still
    /// compacted.
    pub pass_idle_wait_max: Duration,
    /// Page-index runs above which a pass also rewrites fragmented stretches (adjacent
    /// blocks stored in different frames) into whole frames, bringing the index back to
    /// three quarters of this. Bounds the index's memory where the write pattern would
    /// otherwise make it grow (scattered small writes). `None`: never.
    pub index_runs_max: Option<usize>,
    /// Largest frame a pass writes when the device's mapped data, cut into frames of the
    /// log's `frame_bytes_max`, would need more than three quarters of `index_runs_max`
    /// runs (a device too large for its index bound): passes then cut frames of twice,
    /// four times … that size, up to this, so the index fits again. The price is read
    /// amplification: a cold read of one block fetches and checks its whole frame.
    /// Never more than [`FRAME_RAW_BYTES_MAX`]; at most the log's `frame_bytes_max`
    /// switches this off.
    pub defrag_frame_bytes_max: usize,
    /// Stored bytes over live bytes (of the segments the index names) above which passes
    /// follow each other without waiting for an interval or an idle export; above
    /// [`SPACE_STALL_FACTOR`] × this, flushes wait for them ([`SpaceGate`]). Never below
    /// 1 / (1 − `dead_fraction_min`): under that level there may be no segment a pass
    /// would rewrite. `None`: passes wait for an idle export whatever the space.
    pub space_amp_max: Option<f64>,
}

impl Default for CompactConfig {
    fn default() -> Self {
        Self {
            dead_fraction_min: 0.5,
            small_segment_bytes: 1 << 20,
            small_segments_min: 16,
            pass_bytes_max: 64 << 20,
            pass_interval: Duration::from_secs(10),
            reads_in_flight_max: 4,
            gc: GcConfig::default(),
            gc_interval: Duration::from_secs(60),
            pass_idle: Duration::from_secs(1),
            pass_idle_wait_max: Duration::from_secs(60),
            index_runs_max: None,
            defrag_frame_bytes_max: DEFRAG_FRAME_BYTES_MAX,
            space_amp_max: Some(SPACE_AMP_MAX),
        }
    }
}

/// Default [`CompactConfig::space_amp_max`]: the store may hold up to twice the live data
/// (plus what GC's retention window keeps) before compaction takes turns with requests.
/// Equal to the level the default `dead_fraction_min` (0.5) guarantees once passes catch
/// up: with every segment under half dead, stored bytes are under twice the live ones.
pub const SPACE_AMP_MAX: f64 = 2.0;

/// Default [`CompactConfig::defrag_frame_bytes_max`]: 8 × the writers' 128 KiB frames, so
/// a fully defragmented device needs one index run per MiB (~96 KiB of index per GiB
/// mapped, not 768 KiB), while a cold 4 KiB read fetches at most 1 MiB (the length of one
/// ranged GET of neighbouring frames on reads anyway).
pub const DEFRAG_FRAME_BYTES_MAX: usize = 1 << 20;

impl CompactConfig {
    /// In blocks of `bs` bytes: the writers' frames (`log_frame_bytes`) and the largest
    /// frames a pass may cut (`defrag_frame_bytes_max`, never below the writers'), the
    /// `base` and `top` of [`frame_blocks_for`].
    pub fn frame_blocks_limits(&self, log_frame_bytes: usize, bs: u64) -> (u64, u64) {
        let bs = bs.max(1);
        let base = (log_frame_bytes as u64 / bs).max(1);
        (base, (self.defrag_frame_bytes_max as u64 / bs).max(base))
    }

    pub fn validate(&self) -> CompactResult<()> {
        if !(0.0..=1.0).contains(&self.dead_fraction_min) {
            return Err(CompactError::Invalid(format!(
                "dead fraction threshold {} is not in 0..=1",
                self.dead_fraction_min
            )));
        }
        if self.pass_bytes_max == 0 || self.reads_in_flight_max == 0 {
            return Err(CompactError::Invalid(
                "pass_bytes_max and reads_in_flight_max must be positive".into(),
            ));
        }
        if self.defrag_frame_bytes_max == 0 || self.defrag_frame_bytes_max > FRAME_RAW_BYTES_MAX {
            return Err(CompactError::Invalid(format!(
                "defrag frame size {} is not in 1..={FRAME_RAW_BYTES_MAX}",
                self.defrag_frame_bytes_max
            )));
        }
        if self.space_amp_max.is_some_and(|a| a.is_nan() || a < 1.0) {
            return Err(CompactError::Invalid(format!(
                "space amplification bound {:?} is below 1",
                self.space_amp_max
            )));
        }
        if self.gc.keep_versions_min == 0 {
            return Err(CompactError::Invalid(
                "gc must keep at least 1 manifest version".into(),
            ));
        }
        Ok(())
    }
}

/// Why a segment was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VictimReason {
    /// No live blocks at all: dropped without copying anything.
    Empty,
    /// Dead share at or above the threshold.
    Dead,
    /// Small; merged with other small segments.
    Small,
}

#[derive(Debug, Clone, Copy)]
pub struct Victim {
    pub id: u64,
    pub stat: SegStat,
    pub reason: VictimReason,
}

/// What a pass would do, from the index alone.
#[derive(Debug, Clone, Default)]
pub struct PassPlan {
    pub victims: Vec<Victim>,
    /// Raw bytes of live blocks to copy.
    pub live_raw_bytes: u64,
    /// Stored bytes of the victims (what GC frees later, minus what is copied).
    pub victim_bytes: u64,
    /// Fragmented stretches to rewrite as whole frames (when the index is over
    /// `index_runs_max`), most fragmented first; their raw bytes are in `live_raw_bytes`.
    pub fragments: Vec<Fragment>,
    /// The index is over `index_runs_max` and no stretch can be joined: every
    /// frame-sized window holds one run at most. Defragmentation cannot lower it.
    pub index_at_floor: bool,
    /// Blocks per frame this pass cuts (and per defragmentation window): the log's
    /// `frame_bytes_max`, or a power-of-two multiple of it when the device is too large
    /// for the index bound at that size ([`frame_blocks_for`]).
    pub frame_blocks: u64,
}

impl PassPlan {
    pub fn is_empty(&self) -> bool {
        self.victims.is_empty() && self.fragments.is_empty()
    }
}

/// A stretch of adjacent mapped blocks, at most one frame long, whose data lies in `runs`
/// different frames (or frame pieces): rewritten, it becomes one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fragment {
    pub runs: u64,
    pub lba: u64,
    pub blocks: u64,
}

/// The `count_max` most fragmented stretches of the index (at least 2 runs each), most
/// runs first. Stretches lie inside fixed windows of `frame_blocks` blocks (block
/// `k * frame_blocks` onwards), the same windows [`cut_jobs`] never lets a frame cross: a
/// rewritten stretch becomes exactly one run and stays one, whatever is written around it
/// later. (Windows counted from the start of each chain of adjacent runs would shift when
/// a write joins two chains, making every rewritten frame after it look fragmented again.)
fn plan_fragments(idx: &Index, frame_blocks: u64, count_max: usize) -> Vec<Fragment> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let frame_blocks = frame_blocks.max(1);
    // Only the best `count_max` are kept while scanning: memory stays at the pass's size
    // however large the index is.
    let mut best: BinaryHeap<Reverse<Fragment>> = BinaryHeap::new();
    let mut keep = |f: Fragment| {
        if f.runs < 2 || count_max == 0 {
            return;
        }
        if best.len() < count_max {
            best.push(Reverse(f));
        } else if best.peek().is_some_and(|Reverse(min)| f.runs > min.runs) {
            best.pop();
            best.push(Reverse(f));
        }
    };
    let empty = Fragment {
        runs: 0,
        lba: 0,
        blocks: 0,
    };
    let mut cur = empty;
    for (lba, blocks, v) in idx.map.iter() {
        if !matches!(v, Val::Frame { .. }) {
            // Nothing continues across a zero-allocated run.
            keep(cur);
            cur = empty;
            continue;
        }
        let end = lba + blocks;
        let mut at = lba;
        while at < end {
            let piece_end = end.min((at / frame_blocks + 1) * frame_blocks);
            if cur.runs == 0 || cur.lba + cur.blocks != at || at % frame_blocks == 0 {
                keep(cur);
                cur = Fragment {
                    runs: 0,
                    lba: at,
                    blocks: 0,
                };
            }
            cur.runs += 1;
            cur.blocks += piece_end - at;
            at = piece_end;
        }
    }
    keep(cur);
    let mut out: Vec<Fragment> = best.into_iter().map(|Reverse(f)| f).collect();
    out.sort_by(|a, b| b.runs.cmp(&a.runs).then(a.lba.cmp(&b.lba)));
    out
}

/// Pick victims. `budget_bytes` bounds the raw live bytes to copy (at least one victim is
/// taken whatever its size, so progress is always possible); `None` plans everything.
pub fn plan_pass(log: &Log, cfg: &CompactConfig, budget_bytes: Option<u64>) -> PassPlan {
    let bs = log.geometry().block_size as u64;
    let seg_raw_max = log.config().segment_bytes_max as u64;
    let (base_blocks, top_blocks) = cfg.frame_blocks_limits(log.config().frame_bytes_max, bs);
    log.with_index(|idx| {
        // Far over the index bound (flushes may be waiting on it, see `IndexGate`),
        // victims get a quarter of the budget and defragmentation the rest.
        let urgent = cfg
            .index_runs_max
            .is_some_and(|max| idx.map.len() > max.saturating_mul(INDEX_URGENT_FACTOR));
        let victims_budget = budget_bytes.map(|b| if urgent { b / 4 } else { b });
        let mut plan = plan_from_index(idx, bs, seg_raw_max, cfg, victims_budget);
        let mapped: u64 = idx.segs.values().map(|s| s.blocks_live).sum();
        plan.frame_blocks = frame_blocks_for(mapped, cfg.index_runs_max, base_blocks, top_blocks);
        plan_defrag(&mut plan, idx, bs, top_blocks, cfg, budget_bytes);
        plan
    })
}

/// Blocks per frame for a pass over an index mapping `mapped` data blocks: `base` (the
/// log's frames) while one run per such frame fits in three quarters of `runs_max`, else
/// the least power-of-two multiple of it that fits, at most `top`.
///
/// Why frames grow rather than the bound giving way: defragmentation cannot bring the
/// index below one run per frame of mapped data, so on a device large enough for that
/// floor to pass the bound, memory would follow the device's size, not the budget. Why
/// powers of two of the base: a window of the larger size holds whole windows of the
/// smaller ones, so frames cut at one level stay single runs at every level below it
/// (a pass at a lower level, once the index shrank, finds nothing fragmented there and
/// leaves them alone); and every pass cuts at the same level, so an ordinary pass does
/// not split what a defragmenting one joined.
pub fn frame_blocks_for(mapped: u64, runs_max: Option<usize>, base: u64, top: u64) -> u64 {
    let base = base.max(1);
    let Some(max) = runs_max else {
        return base;
    };
    let fits = (max as u64 * 3 / 4).max(1);
    let mut fb = base;
    while mapped.div_ceil(fb) > fits && fb.saturating_mul(2) <= top {
        fb *= 2;
    }
    fb
}

/// Add fragmented stretches to `plan` while the index has more than
/// `cfg.index_runs_max` runs: enough to bring it to three quarters of that, within what is
/// left of the byte budget. Stretches in victim segments are copied by the victims anyway.
fn plan_defrag(
    plan: &mut PassPlan,
    idx: &Index,
    bs: u64,
    top_blocks: u64,
    cfg: &CompactConfig,
    budget_bytes: Option<u64>,
) {
    let Some(max) = cfg.index_runs_max else {
        return;
    };
    let runs = idx.map.len();
    if runs <= max {
        return;
    }
    let excess = (runs - max * 3 / 4) as u64;
    let left = budget_bytes
        .unwrap_or(u64::MAX)
        .saturating_sub(plan.live_raw_bytes);
    // The pass's own frame size first; where nothing is fragmented at that size (holes
    // and zeroed runs can split the mapped data into more runs than its size suggests),
    // the next larger one, up to the largest allowed.
    let mut frame_blocks = plan.frame_blocks.max(1);
    let found = loop {
        let frame_bytes = frame_blocks * bs;
        // At least one stretch, so a pass always makes progress (as with victims).
        let count_max = (left / frame_bytes).clamp(1, excess.min(1 << 20)) as usize;
        let found = plan_fragments(idx, frame_blocks, count_max);
        if !found.is_empty() || frame_blocks.saturating_mul(2) > top_blocks {
            break found;
        }
        frame_blocks *= 2;
    };
    plan.frame_blocks = frame_blocks;
    let mut saved = 0u64;
    let mut used = 0u64;
    plan.index_at_floor = found.is_empty();
    for f in found {
        let raw = f.blocks * bs;
        if saved >= excess || (!plan.is_empty() && used + raw > left) {
            break;
        }
        saved += f.runs - 1;
        used += raw;
        plan.live_raw_bytes += raw;
        plan.fragments.push(f);
    }
}

/// `seg_raw_max`: raw bytes after which a pass starts a new output segment ([`cut_jobs`]).
fn plan_from_index(
    idx: &Index,
    bs: u64,
    seg_raw_max: u64,
    cfg: &CompactConfig,
    budget_bytes: Option<u64>,
) -> PassPlan {
    let budget = budget_bytes.unwrap_or(u64::MAX);
    let mut plan = PassPlan::default();
    // Segments without data entries (only trims) are dropped by any checkpoint: they never
    // start a pass on their own.
    let mut segs: Vec<(u64, SegStat)> = idx
        .segs
        .iter()
        .filter(|(_, s)| s.blocks_total > 0)
        .map(|(&id, &s)| (id, s))
        .collect();
    segs.sort_by_key(|(id, _)| *id);
    let empty: Vec<(u64, SegStat)> = segs
        .iter()
        .filter(|(_, s)| s.blocks_live == 0)
        .copied()
        .collect();
    let mut dead: Vec<(u64, SegStat)> = segs
        .iter()
        .filter(|(_, s)| s.blocks_live > 0 && s.dead_fraction() >= cfg.dead_fraction_min)
        .copied()
        .collect();
    // Most garbage freed per byte copied first.
    dead.sort_by(|a, b| {
        b.1.dead_fraction()
            .total_cmp(&a.1.dead_fraction())
            .then(a.0.cmp(&b.0))
    });
    // Small in stored bytes, and also in raw live bytes: output segments are cut by raw
    // size, so merging segments that each hold half a segment's raw data or more cannot
    // make fewer of them. (Well-compressing data makes segments small in stored bytes
    // only; without this the same segments were "merged" into as many again on every
    // pass, forever.)
    let small: Vec<(u64, SegStat)> = segs
        .iter()
        .filter(|(_, s)| {
            s.blocks_live > 0
                && s.dead_fraction() < cfg.dead_fraction_min
                && s.size_bytes < cfg.small_segment_bytes
                && s.blocks_live * bs < seg_raw_max / 2
        })
        .copied()
        .collect();
    let empty_bytes: u64 = empty.iter().map(|(_, s)| s.size_bytes).sum();
    let take = |plan: &mut PassPlan, id: u64, s: SegStat, reason| -> bool {
        let raw = s.blocks_live * bs;
        if !plan.victims.is_empty() && plan.live_raw_bytes.saturating_add(raw) > budget {
            return false;
        }
        plan.live_raw_bytes += raw;
        plan.victim_bytes += s.size_bytes;
        plan.victims.push(Victim {
            id,
            stat: s,
            reason,
        });
        true
    };
    for (id, s) in dead {
        if !take(&mut plan, id, s, VictimReason::Dead) {
            break;
        }
    }
    if small.len() >= cfg.small_segments_min.max(2) {
        let before = plan.victims.len();
        for (id, s) in small {
            if !take(&mut plan, id, s, VictimReason::Small) {
                break;
            }
        }
        // A "merge" of one segment would only copy it.
        if plan.victims.len() == before + 1
            && plan.victims.last().map(|v| v.reason) == Some(VictimReason::Small)
        {
            if let Some(v) = plan.victims.pop() {
                plan.live_raw_bytes -= v.stat.blocks_live * bs;
                plan.victim_bytes -= v.stat.size_bytes;
            }
        }
    }
    // Fully dead segments cost nothing to drop; they start a pass of their own only when
    // they hold enough bytes to be worth a checkpoint.
    if !plan.victims.is_empty() || empty_bytes >= cfg.small_segment_bytes {
        for (id, s) in empty {
            plan.victim_bytes += s.size_bytes;
            plan.victims.push(Victim {
                id,
                stat: s,
                reason: VictimReason::Empty,
            });
        }
    }
    plan
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub victims: u64,
    /// Stored bytes of the victims.
    pub victim_bytes: u64,
    /// Victims whose frames had to be read (the others had no live blocks).
    pub segments_read: u64,
    pub frames_read: u64,
    pub frame_bytes_read: u64,
    pub segments_written: u64,
    pub bytes_written: u64,
    /// Raw bytes of live blocks copied.
    pub raw_bytes_copied: u64,
    /// Blocks repointed to their new location.
    pub blocks_moved: u64,
    /// Copied blocks that had been overwritten meanwhile (kept their newer data).
    pub blocks_skipped: u64,
    /// Manifest version the pass committed, if it committed.
    pub version: Option<u64>,
    /// Fragmented stretches rewritten as whole frames.
    pub fragments: u64,
    /// Page-index runs before the pass and after its commit.
    pub index_runs_before: u64,
    pub index_runs_after: u64,
    /// See [`PassPlan::index_at_floor`].
    pub index_at_floor: bool,
}

/// One run of live blocks being moved: `blocks` blocks at `lba`, stored at `old`.
#[derive(Debug, Clone)]
struct Piece {
    lba: u64,
    blocks: u64,
    old: Val,
    data: Bytes,
}

/// A stored frame: (segment id, frame offset, frame length).
type FrameKey = (u64, u64, u32);

/// `(lba, blocks, location)`: a live run of a victim frame.
type LiveRun = (u64, u64, Val);

/// `(lba, blocks, old location, new location)`: what the commit repoints if still current.
type Move = (u64, u64, Val, Val);

/// Longest GET of neighbouring frames (those at most the store's `request_cost_bytes`
/// apart): with `reads_in_flight_max` of them, the pass's read buffers.
const SPAN_BYTES_MAX: u64 = 8 << 20;

/// Called with raw bytes copied as a pass reads them (for progress bars).
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// One compaction pass (see the module doc). Returns an empty report when there is nothing
/// worth doing.
pub async fn compact_pass(
    log: &Log,
    cfg: &CompactConfig,
    progress: Option<Progress<'_>>,
) -> CompactResult<PassReport> {
    cfg.validate()?;
    if log.mode == OpenMode::ReadOnly {
        return Err(CompactError::ReadOnly);
    }
    if log.is_fenced() {
        return Err(LogError::Fenced {
            export: log.name().to_string(),
            epoch: log.epoch(),
            newer_epoch: log.epoch() + 1,
        }
        .into());
    }
    let plan = plan_pass(log, cfg, Some(cfg.pass_bytes_max));
    if plan.is_empty() {
        return Ok(PassReport {
            index_at_floor: plan.index_at_floor,
            ..PassReport::default()
        });
    }
    let mut report = PassReport {
        victims: plan.victims.len() as u64,
        victim_bytes: plan.victim_bytes,
        fragments: plan.fragments.len() as u64,
        index_at_floor: plan.index_at_floor,
        ..PassReport::default()
    };
    let victims: HashSet<u64> = plan.victims.iter().map(|v| v.id).collect();

    // 1. The live runs of the victims, grouped by the frame that holds them.
    let mut frames: BTreeMap<FrameKey, Vec<LiveRun>> = BTreeMap::new();
    let runs_before = log.index_extents();
    log.with_index(|idx| {
        let mut collect = |lba: u64, blocks: u64, v: Val| {
            if let Val::Frame {
                seg,
                frame_offset,
                frame_len,
                ..
            } = v
            {
                frames
                    .entry((seg, frame_offset, frame_len))
                    .or_default()
                    .push((lba, blocks, v));
            }
        };
        let in_victim = |v: &Val| matches!(v, Val::Frame { seg, .. } if victims.contains(seg));
        if !victims.is_empty() {
            for (lba, blocks, v) in idx.map.iter() {
                if in_victim(v) {
                    collect(lba, blocks, *v);
                }
            }
        }
        // Fragmented stretches, as the index holds them now (a commit may have landed
        // since planning; whatever is mapped there now is what gets copied and checked).
        // Runs in victims are collected whole above.
        for f in &plan.fragments {
            for (lba, blocks, v) in idx.lookup(f.lba, f.blocks) {
                if let Some(v) = v.filter(|v| !in_victim(v)) {
                    collect(lba, blocks, v);
                }
            }
        }
    });
    report.segments_read = frames
        .keys()
        .map(|(s, ..)| *s)
        .collect::<HashSet<_>>()
        .len() as u64;

    // 2. Read and verify each frame once, neighbours in a segment with one GET; keep only
    //    the live blocks.
    let bs = log.geometry().block_size as usize;
    let frames: Vec<(FrameKey, Vec<LiveRun>)> = frames.into_iter().collect();
    let keys: Vec<FrameKey> = frames.iter().map(|(k, _)| *k).collect();
    let gap = log.store().request_cost_bytes();
    let spans = super::plan_frame_spans(&keys, gap, SPAN_BYTES_MAX);
    let frames = &frames;
    let read: Vec<Vec<(u32, Vec<Piece>)>> = futures::stream::iter(spans)
        .map(|span| async move {
            let seg = frames[span[0]].0 .0;
            let wanted: Vec<(u64, u32)> = span
                .iter()
                .map(|&i| (frames[i].0 .1, frames[i].0 .2))
                .collect();
            let decoded = log.read_frame_span(seg, &wanted).await?;
            let key = log.keys().segment(seg);
            let mut per_frame = Vec::with_capacity(span.len());
            for (&i, f) in span.iter().zip(decoded) {
                let f = f?;
                let ((_, _, len), runs) = &frames[i];
                let mut out = Vec::with_capacity(runs.len());
                for &(lba, blocks, v) in runs {
                    let Val::Frame { block_in_frame, .. } = v else {
                        continue;
                    };
                    let first = block_in_frame as u64;
                    check_frame_covers(&key, &f, lba, first, blocks)?;
                    let s = first as usize * bs;
                    let e = s + blocks as usize * bs;
                    out.push(Piece {
                        lba,
                        blocks,
                        old: v,
                        // A copy: a slice would keep the whole frame alive, beyond
                        // what `pass_bytes_max` bounds.
                        data: Bytes::copy_from_slice(&f.data[s..e]),
                    });
                }
                if let Some(p) = progress {
                    p(out.iter().map(|x| x.data.len() as u64).sum());
                }
                per_frame.push((*len, out));
            }
            Ok::<_, LogError>(per_frame)
        })
        .buffer_unordered(cfg.reads_in_flight_max.max(1))
        .try_collect()
        .await?;
    let read: Vec<(u32, Vec<Piece>)> = read.into_iter().flatten().collect();
    report.frames_read = read.len() as u64;
    report.frame_bytes_read = read.iter().map(|(len, _)| *len as u64).sum();
    let pieces = read.into_iter().flat_map(|(_, p)| p);
    let mut pieces: Vec<Piece> = pieces.collect();
    pieces.sort_by_key(|p| p.lba);
    report.raw_bytes_copied = pieces.iter().map(|p| p.data.len() as u64).sum();

    // 3. Cut into frames (consecutive blocks, at most frame_bytes_max) and segments.
    let jobs = cut_jobs(
        pieces,
        bs,
        plan.frame_blocks as usize * bs,
        log.config().segment_bytes_max,
    );

    // 4. Build and upload. Ids are pending from allocation until the commit settles.
    let mut ids = Vec::with_capacity(jobs.len());
    for _ in 0..jobs.len() {
        match log.allocate_id().await {
            Ok(id) => ids.push(id),
            Err(e) => {
                release_ids(log, &ids).await;
                return Err(e.into());
            }
        }
    }
    let epoch = log.epoch();
    let block_size = log.geometry().block_size;
    let zstd_level = log.config().zstd_level;
    let built = futures::stream::iter(ids.iter().copied().zip(jobs))
        .map(|(id, job)| async move {
            // At the lowest priority: compaction must not take CPU from requests.
            let (bytes, dir, moves) =
                crate::background::run(move || build_job(id, epoch, block_size, zstd_level, job))
                    .await
                    .map_err(|e| LogError::Internal(e.to_string()))?;
            let size = bytes.len() as u64;
            log.store()
                .put(
                    &log.keys().segment(id),
                    Bytes::from(bytes),
                    PutMode::IfAbsent,
                )
                .await?;
            Ok::<_, LogError>((
                SegmentRef {
                    id,
                    size_bytes: size,
                },
                dir,
                moves,
            ))
        })
        // Unordered (a slow PUT must not idle the other slots); back in id order below.
        .buffer_unordered(log.config().uploads_in_flight_max.max(1))
        .try_collect::<Vec<_>>()
        .await;
    let built = match built {
        Ok(mut b) => {
            b.sort_unstable_by_key(|(r, ..)| r.id);
            b
        }
        Err(e) => {
            // No manifest names these ids and none will: the commit never started.
            release_ids(log, &ids).await;
            return Err(e.into());
        }
    };
    let mut new_segments = Vec::with_capacity(built.len());
    let mut moves: Vec<Move> = Vec::new();
    for (r, dir, mut m) in built {
        report.segments_written += 1;
        report.bytes_written += r.size_bytes;
        new_segments.push((r, dir));
        moves.append(&mut m);
    }

    // 5. Commit: repoint only what still points at the copied-from place. All uploads above
    // have returned Ok, so the manifest this writes names only durable objects.
    let mut moved = 0u64;
    let mut skipped = 0u64;
    let result = log
        .commit_rewrite(&new_segments, |idx| {
            for (lba, blocks, old, new) in &moves {
                for (s, l, cur) in idx.lookup(*lba, *blocks) {
                    let off = s - lba;
                    if cur == Some(old.advance(off)) {
                        idx.set(s, l, new.advance(off));
                        moved += l;
                    } else {
                        skipped += l;
                    }
                }
            }
        })
        .await;
    match result {
        Ok(v) => {
            report.version = Some(v);
            report.blocks_moved = moved;
            report.blocks_skipped = skipped;
            report.index_runs_before = runs_before as u64;
            report.index_runs_after = log.index_extents() as u64;
            // Named by version v now; GC keeps them until a pass has listed v.
            log.named_by(&ids, v).await;
            let space = log.space();
            tracing::info!(
                export = log.name(),
                version = v,
                victims = report.victims,
                victim_bytes = report.victim_bytes,
                segments_written = report.segments_written,
                bytes_written = report.bytes_written,
                blocks_moved = moved,
                blocks_skipped = skipped,
                fragments = report.fragments,
                index_runs_before = report.index_runs_before,
                index_runs_after = report.index_runs_after,
                stored_mib = space.stored_bytes >> 20,
                live_mib = space.live_bytes >> 20,
                "compaction pass committed"
            );
            Ok(report)
        }
        Err(e) => {
            // An ambiguous manifest PUT may still land: then the ids are named and must
            // stay (GC drops them from the pending set once it sees them referenced).
            let ambiguous = log.commit.lock().await.need_resync;
            if !ambiguous {
                release_ids(log, &ids).await;
            }
            Err(e.into())
        }
    }
}

/// Forget pending ids (their objects are either named by a landed manifest, or garbage).
pub async fn release_ids(log: &Log, ids: &[u64]) {
    if ids.is_empty() {
        return;
    }
    let mut st = log.commit.lock().await;
    for id in ids {
        st.pending_ids.remove(id);
    }
}

/// One frame to build: consecutive pieces starting at `pieces[0].lba`.
type FrameJob = Vec<Piece>;

/// Group pieces (sorted by lba) into frames of consecutive blocks of at most
/// `frame_bytes_max`, and frames into segments of at most `segment_bytes_max` raw bytes.
fn cut_jobs(
    pieces: Vec<Piece>,
    bs: usize,
    frame_bytes_max: usize,
    segment_bytes_max: usize,
) -> Vec<Vec<FrameJob>> {
    let frame_blocks_max = (frame_bytes_max / bs).max(1) as u64;
    let mut segs: Vec<Vec<FrameJob>> = Vec::new();
    let mut cur_seg: Vec<FrameJob> = Vec::new();
    let mut seg_bytes = 0usize;
    let mut cur_frame: FrameJob = Vec::new();
    let mut frame_blocks = 0u64;
    let mut next_lba = u64::MAX;
    let flush_frame = |cur_frame: &mut FrameJob,
                       frame_blocks: &mut u64,
                       cur_seg: &mut Vec<FrameJob>,
                       seg_bytes: &mut usize,
                       segs: &mut Vec<Vec<FrameJob>>| {
        if cur_frame.is_empty() {
            return;
        }
        *seg_bytes += *frame_blocks as usize * bs;
        cur_seg.push(std::mem::take(cur_frame));
        *frame_blocks = 0;
        if *seg_bytes >= segment_bytes_max {
            segs.push(std::mem::take(cur_seg));
            *seg_bytes = 0;
        }
    };
    // Frames never cross a multiple of `frame_blocks_max` (see `plan_fragments`): a frame
    // ends at the next such boundary, so rewritten stretches keep one layout.
    for p in pieces {
        let mut p = p;
        loop {
            if p.lba != next_lba || p.lba % frame_blocks_max == 0 {
                flush_frame(
                    &mut cur_frame,
                    &mut frame_blocks,
                    &mut cur_seg,
                    &mut seg_bytes,
                    &mut segs,
                );
            }
            let room = frame_blocks_max - p.lba % frame_blocks_max;
            if p.blocks <= room {
                frame_blocks += p.blocks;
                next_lba = p.lba + p.blocks;
                cur_frame.push(p);
                break;
            }
            // Split: the head fills this frame, the tail starts the next one.
            let head = Piece {
                lba: p.lba,
                blocks: room,
                old: p.old,
                data: p.data.slice(..room as usize * bs),
            };
            let tail = Piece {
                lba: p.lba + room,
                blocks: p.blocks - room,
                old: p.old.advance(room),
                data: p.data.slice(room as usize * bs..),
            };
            frame_blocks += head.blocks;
            next_lba = head.lba + head.blocks;
            cur_frame.push(head);
            p = tail;
        }
    }
    flush_frame(
        &mut cur_frame,
        &mut frame_blocks,
        &mut cur_seg,
        &mut seg_bytes,
        &mut segs,
    );
    if !cur_seg.is_empty() {
        segs.push(cur_seg);
    }
    segs
}

/// Build one segment from frame jobs (CPU-heavy: run off the reactor).
fn build_job(
    id: u64,
    epoch: u64,
    block_size: u32,
    zstd_level: Option<i32>,
    frames: Vec<FrameJob>,
) -> (Vec<u8>, Vec<DirEntry>, Vec<Move>) {
    let mut b = SegmentBuilder::new(id, epoch, block_size, zstd_level);
    let mut moves = Vec::new();
    let mut raw = BytesMut::new();
    for f in frames {
        let Some(first_lba) = f.first().map(|p| p.lba) else {
            continue;
        };
        raw.clear();
        for p in &f {
            raw.extend_from_slice(&p.data);
        }
        let e = b.add_frame(first_lba, &raw);
        for p in f {
            let new = Val::Frame {
                seg: id,
                frame_offset: e.frame_offset,
                frame_len: e.frame_len,
                // A frame holds at most FRAME_RAW_BYTES_MAX bytes, so this fits in u32.
                block_in_frame: (p.lba - first_lba) as u32,
            };
            moves.push((p.lba, p.blocks, p.old, new));
        }
    }
    let (bytes, dir) = b.finish();
    (bytes, dir, moves)
}

/// Recompute every segment's live-block count from the map and compare with the stored
/// accounting; `Err` describes the first disagreement. (The invariant `log::index` states.)
pub fn check_accounting(idx: &Index) -> Result<(), String> {
    let mut live: HashMap<u64, u64> = HashMap::new();
    for (lba, blocks, v) in idx.map.iter() {
        if let Val::Frame { seg, .. } = v {
            if !idx.segs.contains_key(seg) {
                return Err(format!(
                    "run {lba}+{blocks} points into segment {seg}, unknown to the accounting"
                ));
            }
            *live.entry(*seg).or_default() += blocks;
        }
    }
    for (id, s) in &idx.segs {
        let n = live.get(id).copied().unwrap_or(0);
        if s.blocks_live != n {
            return Err(format!(
                "segment {id}: accounting says {} live blocks, the map has {n}",
                s.blocks_live
            ));
        }
        if s.blocks_live > s.blocks_total {
            return Err(format!(
                "segment {id}: {} live blocks of {} written",
                s.blocks_live, s.blocks_total
            ));
        }
    }
    Ok(())
}

impl Log {
    /// [`check_accounting`] over this log's index.
    pub fn check_accounting(&self) -> Result<(), String> {
        self.with_index(check_accounting)
    }
}

/// Where an export's bytes are.
#[derive(Debug, Clone, Default)]
pub struct SpaceReport {
    pub objects: u64,
    pub bytes_stored: u64,
    pub segments: u64,
    pub segment_bytes: u64,
    pub manifests: u64,
    pub manifest_bytes: u64,
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
    /// Anything else under the export (lease, probes).
    pub other_bytes: u64,
    /// Blocks mapped to stored data.
    pub live_blocks: u64,
    pub live_raw_bytes: u64,
    /// Stored (compressed, framed) bytes of the live blocks: each frame's size shared out
    /// over its blocks. Only with `measure_live`.
    pub live_stored_bytes: Option<u64>,
}

/// List the export and sum sizes; with `measure_live`, also read the directory of every
/// live segment to measure the stored size of live data (one ranged GET per segment).
pub async fn space_report(log: &Log, measure_live: bool) -> CompactResult<SpaceReport> {
    let keys = log.keys();
    let mut r = SpaceReport::default();
    for o in gc::list_objects(log.store(), keys).await? {
        r.objects += 1;
        r.bytes_stored += o.size_bytes;
        let rest = o.key.strip_prefix(&keys.root).unwrap_or("");
        if rest.starts_with("segment/") {
            r.segments += 1;
            r.segment_bytes += o.size_bytes;
        } else if rest.starts_with("manifest/") {
            r.manifests += 1;
            r.manifest_bytes += o.size_bytes;
        } else if rest.starts_with("checkpoint/") {
            r.checkpoints += 1;
            r.checkpoint_bytes += o.size_bytes;
        } else {
            r.other_bytes += o.size_bytes;
        }
    }
    let bs = log.geometry().block_size as u64;
    // Live blocks per frame, and the live segments.
    let (per_frame, live_segs) = log.with_index(|idx| {
        let mut per_frame: HashMap<(u64, u64), (u32, u64)> = HashMap::new();
        for (_, blocks, v) in idx.map.iter() {
            if let Val::Frame {
                seg,
                frame_offset,
                frame_len,
                ..
            } = v
            {
                let e = per_frame
                    .entry((*seg, *frame_offset))
                    .or_insert((*frame_len, 0));
                e.1 += blocks;
            }
        }
        (per_frame, idx.live_segments())
    });
    r.live_blocks = per_frame.values().map(|(_, n)| n).sum();
    r.live_raw_bytes = r.live_blocks * bs;
    if measure_live {
        let dirs: Vec<(u64, Vec<DirEntry>)> = futures::stream::iter(live_segs)
            .map(|s| async move {
                read_segment_directory(log.store(), keys, s)
                    .await
                    .map(|d| (s.id, d))
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let mut frame_blocks: HashMap<(u64, u64), u64> = HashMap::new();
        for (id, dir) in dirs {
            for e in dir.iter().filter(|e| e.kind == EntryKind::Data) {
                frame_blocks.insert((id, e.frame_offset), e.blocks);
            }
        }
        let mut live = 0u128;
        for (k, (len, n)) in &per_frame {
            let total = frame_blocks.get(k).copied().unwrap_or(*n).max(1);
            live += *len as u128 * *n as u128 / total as u128;
        }
        r.live_stored_bytes = Some(live as u64);
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Request counting (nbds3-compact's summary, the benchmark).

/// Requests made through a [`CountingStore`].
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub get_ranges: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    /// Delete requests (a `delete_many` of up to 1000 keys counts once).
    pub deletes: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub bytes_put: AtomicU64,
    pub bytes_got: AtomicU64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        [
            &self.puts,
            &self.gets,
            &self.get_ranges,
            &self.heads,
            &self.lists,
            &self.deletes,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Transparent wrapper that counts requests and bytes.
#[derive(Debug)]
pub struct CountingStore {
    inner: DynStore,
    counts: Arc<RequestCounts>,
}

impl CountingStore {
    pub fn new(inner: DynStore) -> Self {
        Self {
            inner,
            counts: Arc::new(RequestCounts::default()),
        }
    }
    pub fn counts(&self) -> Arc<RequestCounts> {
        Arc::clone(&self.counts)
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        bump(&self.counts.puts, 1);
        bump(&self.counts.bytes_put, data.len() as u64);
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        bump(&self.counts.gets, 1);
        let b = self.inner.get(key).await?;
        bump(&self.counts.bytes_got, b.len() as u64);
        Ok(b)
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        bump(&self.counts.get_ranges, 1);
        let b = self.inner.get_range(key, range).await?;
        bump(&self.counts.bytes_got, b.len() as u64);
        Ok(b)
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        bump(&self.counts.heads, 1);
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        bump(&self.counts.lists, 1);
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        bump(&self.counts.deletes, 1);
        bump(&self.counts.objects_deleted, 1);
        self.inner.delete(key).await
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        bump(&self.counts.deletes, keys.len().div_ceil(1000) as u64);
        bump(&self.counts.objects_deleted, keys.len() as u64);
        self.inner.delete_many(keys).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

// ---------------------------------------------------------------------------------------
// The background compactor.

/// Running totals of a background compactor (for tests, logs and metrics).
#[derive(Debug, Default)]
pub struct CompactorStats {
    pub passes: AtomicU64,
    /// Passes that committed a rewrite.
    pub rewrites: AtomicU64,
    pub segments_retired: AtomicU64,
    /// Fragmented stretches rewritten as whole frames.
    pub fragments_rewritten: AtomicU64,
    pub segments_written: AtomicU64,
    pub raw_bytes_copied: AtomicU64,
    pub bytes_written: AtomicU64,
    pub gc_passes: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub bytes_deleted: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl CompactorStats {
    fn error(&self, e: &CompactError) {
        bump(&self.errors, 1);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

struct Stop {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

/// Index runs, as a multiple of `index_runs_max`, above which defragmenting passes follow
/// each other without waiting for an idle export.
pub const INDEX_URGENT_FACTOR: usize = 2;
/// Index runs, as a multiple of `index_runs_max`, above which flushes wait for
/// defragmentation. With the default bound (a quarter of the cache) that is three quarters
/// of the cache budget the index is charged to: the index never takes the whole budget
/// while defragmentation can still shrink it.
pub const INDEX_STALL_FACTOR: usize = 3;
/// The longest one flush waits for a defragmenting pass before it goes ahead anyway: a
/// pass that hangs on the store must not hang writers for longer than a store timeout.
const INDEX_STALL_WAIT_MAX: Duration = Duration::from_secs(60);
/// How long a "nothing left to join" verdict stands before a pass looks again.
const INDEX_FLOOR_RECHECK: Duration = Duration::from_secs(1);
/// A flush that starts waiting after this long without waits logs that writes are held.
const INDEX_WAIT_LOG_QUIET: Duration = Duration::from_secs(60);

/// Note that a flush starts to wait (`last_wait`: when one last did); true if none did for
/// [`INDEX_WAIT_LOG_QUIET`], so the gates say why writes slow down once per episode.
fn wait_starts_episode(last_wait: &Mutex<Option<Instant>>) -> bool {
    let now = Instant::now();
    let mut last = last_wait.lock().unwrap_or_else(|p| p.into_inner());
    let quiet = last.is_none_or(|t| now.duration_since(t) >= INDEX_WAIT_LOG_QUIET);
    *last = Some(now);
    quiet
}

/// Back-pressure from the page index's memory bound to the flushes of one export (see the
/// module doc). The background compactor arms it with its `index_runs_max` and reports
/// every pass; [`Log::commit`] callers (the volume's flush) call [`IndexGate::wait_room`]
/// before they take a batch. Disarmed (no compactor, or it stopped), it never waits.
#[derive(Debug, Default)]
pub struct IndexGate {
    /// The running compactor's `index_runs_max`; 0 when no compactor runs.
    runs_max: AtomicUsize,
    /// Until when the index counts as at its floor: the last pass found it over the bound
    /// with nothing left to join. The verdict expires after [`INDEX_FLOOR_RECHECK`]:
    /// writes filling holes between runs make stretches joinable again.
    floor_until: Mutex<Option<Instant>>,
    /// The floor warning was logged (until a pass finds something to join again).
    floor_warned: AtomicBool,
    pass_ended: tokio::sync::Notify,
    /// Rung by flushes that find the index over the urgent level: the compactor stops
    /// waiting for its interval or for an idle export.
    urgent: tokio::sync::Notify,
    /// When a flush last started to wait.
    last_wait: Mutex<Option<Instant>>,
    /// Flushes that waited for defragmentation, and their total wait.
    pub flushes_waited: AtomicU64,
    pub wait_ms_total: AtomicU64,
}

impl IndexGate {
    fn arm(&self, runs_max: usize) {
        *self.floor() = None;
        self.runs_max.store(runs_max, Ordering::Release);
        self.pass_ended.notify_waiters();
    }

    fn floor(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.floor_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dirty runs one commit may carry while the gate is armed: half the bound, so a
    /// commit adds at most the bound (two runs per dirty run) and the index stays within
    /// [`INDEX_STALL_FACTOR`] × the bound however large the dirty set. `None` while
    /// disarmed: a flush then commits its whole batch at once.
    pub fn commit_runs_max(&self) -> Option<usize> {
        match self.runs_max.load(Ordering::Acquire) {
            0 => None,
            max => Some((max / 2).max(1)),
        }
    }

    fn disarm(&self) {
        self.runs_max.store(0, Ordering::Release);
        self.pass_ended.notify_waiters();
    }

    /// Record a pass. The index is at its floor when the pass found it over the bound and
    /// no stretch to join (no frame-sized window holds two runs that touch). Not "the
    /// index did not shrink" (flushes that landed during the pass add runs), nor "no
    /// stretch was rewritten" (victims may have taken the pass's budget). Wakes the
    /// waiting flushes to look again.
    fn pass_ended(&self, log: &Log, r: Option<&PassReport>) {
        if let Some(r) = r {
            let max = self.runs_max.load(Ordering::Acquire);
            let runs = log.index_extents();
            if r.index_at_floor {
                *self.floor() = Some(Instant::now() + INDEX_FLOOR_RECHECK);
                if !self.floor_warned.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        export = log.name(),
                        index_runs = runs,
                        index_runs_max = max,
                        "the page index is over its memory bound and defragmentation cannot \
                         shrink it further (holes and frames split it that much); raise \
                         --cache-size or --index-max"
                    );
                }
            } else {
                *self.floor() = None;
                self.floor_warned.store(false, Ordering::Release);
            }
        }
        self.pass_ended.notify_waiters();
    }

    /// More than `factor` × the bound index runs, if armed and defragmentation can still
    /// help.
    fn over(&self, log: &Log, factor: usize) -> bool {
        let max = self.runs_max.load(Ordering::Acquire);
        self.over_runs(log, max.saturating_mul(factor))
    }

    /// More than `level` index runs, if armed and defragmentation can still help.
    fn over_runs(&self, log: &Log, level: usize) -> bool {
        self.runs_max.load(Ordering::Acquire) > 0
            && !self.floor().is_some_and(|until| Instant::now() < until)
            && log.index_extents() > level
    }

    /// Wait until the index has room for a batch that adds up to `batch_runs` runs below
    /// [`INDEX_STALL_FACTOR`] × its bound (but never for less than
    /// [`INDEX_URGENT_FACTOR`] ×, the level passes work down to without pause), while the
    /// compactor is still shrinking it. Why: every run a commit adds costs memory the cache
    /// budget pays for; holding flushes back (and so, through the dirty bound, writers) is
    /// what keeps that memory bounded under a load that writes faster than passes join.
    /// The index then stays within 3 × the bound: a flush commits its batch in pieces of
    /// at most [`IndexGate::commit_runs_max`] runs, waiting here before each.
    pub async fn wait_room(&self, log: &Log, batch_runs: usize) {
        if self.over(log, INDEX_URGENT_FACTOR) {
            self.urgent.notify_one();
        }
        let start = Instant::now();
        let mut waited = false;
        loop {
            let notified = self.pass_ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let max = self.runs_max.load(Ordering::Acquire);
            let level = max
                .saturating_mul(INDEX_STALL_FACTOR)
                .saturating_sub(batch_runs)
                .max(max.saturating_mul(INDEX_URGENT_FACTOR));
            if !self.over_runs(log, level) || start.elapsed() >= INDEX_STALL_WAIT_MAX {
                break;
            }
            if !waited {
                waited = true;
                // Writers slow down from here on: say why, once per episode.
                if wait_starts_episode(&self.last_wait) {
                    tracing::info!(
                        export = log.name(),
                        index_runs = log.index_extents(),
                        index_runs_max = max,
                        "flushes wait for the page index to defragment (it is far over \
                         its memory bound): writes slow down to the pace of \
                         defragmentation; a larger --cache-size or --index-max avoids this"
                    );
                }
            }
            let left = INDEX_STALL_WAIT_MAX.saturating_sub(start.elapsed());
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
        if waited {
            bump(&self.flushes_waited, 1);
            bump(&self.wait_ms_total, start.elapsed().as_millis() as u64);
        }
    }
}

/// Space amplification, as a multiple of `space_amp_max`, above which flushes wait for
/// compaction ([`SpaceGate::wait_room`]). With the default bound: the store holds at most
/// ~3 × the live data (plus one flush batch and GC's retention window) however fast the
/// device is overwritten.
pub const SPACE_STALL_FACTOR: f64 = 1.5;
/// The longest one flush waits for compaction to reclaim space (as for the index).
const SPACE_STALL_WAIT_MAX: Duration = Duration::from_secs(60);
/// How long an urgent pass that reclaimed nothing (or failed) turns the gate off.
const SPACE_STUCK_RECHECK: Duration = Duration::from_secs(5);

/// Back-pressure from stored bytes to the flushes of one export, as [`IndexGate`] does for
/// the index's memory. Why: on an export that is never idle for `pass_idle`, passes came
/// once per `pass_idle_wait_max` (60 s by default) and copied at most `pass_bytes_max`
/// each, so sustained overwrites grew the store without bound: 4 KiB random overwrites
/// of a 1 GiB device (~300 MiB/s of new segments on the file store) took it to 10 GiB in
/// 30 s (`tools/bench/overwrite.sh`). Above `space_amp_max` passes stop waiting for an
/// idle export and follow each other; above [`SPACE_STALL_FACTOR`] × it, flushes (and
/// so, once the dirty set is full, writers) wait for them. Only while passes can still
/// reclaim: an urgent pass that commits nothing (or fails) switches the gate off for
/// [`SPACE_STUCK_RECHECK`]. Disarmed (no compactor, or it stopped), it never waits.
#[derive(Debug, Default)]
pub struct SpaceGate {
    /// The running compactor's bound (`f64` bits); 0 when no compactor runs.
    amp_max_bits: AtomicU64,
    /// The level flushes wait above (`f64` bits): [`SPACE_STALL_FACTOR`] × the bound, or
    /// the store's amplification when the compactor started if that was higher, lowered
    /// to what each pass leaves (never below the former). Why: a store that already held
    /// a backlog (written by a daemon without the gate, or with it off) must not stall
    /// writes until passes have worked it off; writes only may not make it worse.
    ceiling_bits: AtomicU64,
    stuck_until: Mutex<Option<Instant>>,
    pass_ended: tokio::sync::Notify,
    /// Rung by flushes that find the store over the bound: the compactor stops waiting.
    urgent: tokio::sync::Notify,
    last_wait: Mutex<Option<Instant>>,
    /// Flushes that waited for compaction, and their total wait.
    pub flushes_waited: AtomicU64,
    pub wait_ms_total: AtomicU64,
}

impl SpaceGate {
    fn arm(&self, log: &Log, amp_max: f64) {
        *self.stuck() = None;
        let ceiling = (amp_max * SPACE_STALL_FACTOR).max(log.space().amplification());
        self.ceiling_bits
            .store(ceiling.to_bits(), Ordering::Release);
        self.amp_max_bits
            .store(amp_max.to_bits(), Ordering::Release);
        self.pass_ended.notify_waiters();
    }

    /// The level flushes wait above (see `ceiling_bits`).
    fn ceiling(&self) -> f64 {
        f64::from_bits(self.ceiling_bits.load(Ordering::Acquire))
    }

    fn disarm(&self) {
        self.amp_max_bits.store(0, Ordering::Release);
        self.pass_ended.notify_waiters();
    }

    fn stuck(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.stuck_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The armed bound, if a compactor runs and its passes can still reclaim space.
    fn level(&self) -> Option<f64> {
        let bits = self.amp_max_bits.load(Ordering::Acquire);
        if bits == 0 || self.stuck().is_some_and(|until| Instant::now() < until) {
            return None;
        }
        Some(f64::from_bits(bits))
    }

    /// Stored bytes over more than `factor` × the bound × live bytes (armed, not stuck).
    fn over(&self, log: &Log, factor: f64) -> bool {
        self.level()
            .is_some_and(|max| log.space().amplification() > max * factor)
    }

    /// Record a pass: one that ran over the bound and committed nothing (or failed) means
    /// there is nothing passes can reclaim right now. Wakes the waiting flushes.
    fn pass_ended(&self, log: &Log, committed: bool) {
        if let Some(max) = self.level() {
            let amp = log.space().amplification();
            if !committed && amp > max {
                *self.stuck() = Some(Instant::now() + SPACE_STUCK_RECHECK);
            }
            // Only one task (the compactor) moves the ceiling: load, then store.
            let ceiling = self.ceiling().min(amp).max(max * SPACE_STALL_FACTOR);
            self.ceiling_bits
                .store(ceiling.to_bits(), Ordering::Release);
        }
        self.pass_ended.notify_waiters();
    }

    /// Wait until stored bytes are within [`SPACE_STALL_FACTOR`] × the bound, or the
    /// backlog the compactor started with as far as passes have worked it off (at most
    /// [`SPACE_STALL_WAIT_MAX`]), while the compactor can still reclaim space. Called by
    /// the volume's flush before it takes a batch.
    pub async fn wait_room(&self, log: &Log) {
        let start = Instant::now();
        let mut waited = false;
        loop {
            let notified = self.pass_ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Disarmed or stuck: never wait (and no scan of the segments).
            let Some(max) = self.level() else {
                break;
            };
            // One scan of the segments per check: it is O(segments), once per flush.
            let sp = log.space();
            let amp = sp.amplification();
            if !waited && amp > max {
                self.urgent.notify_one();
            }
            if amp <= self.ceiling() || start.elapsed() >= SPACE_STALL_WAIT_MAX {
                break;
            }
            if !waited {
                waited = true;
                if wait_starts_episode(&self.last_wait) {
                    tracing::info!(
                        export = log.name(),
                        stored_mib = sp.stored_bytes >> 20,
                        live_mib = sp.live_bytes >> 20,
                        "flushes wait for compaction (the store holds far more than the live \
                         data): writes slow down to the pace at which passes reclaim space; \
                         a larger --compact-space-max avoids this"
                    );
                }
            }
            let left = SPACE_STALL_WAIT_MAX.saturating_sub(start.elapsed());
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
        if waited {
            bump(&self.flushes_waited, 1);
            bump(&self.wait_ms_total, start.elapsed().as_millis() as u64);
        }
    }
}

/// Disarms the gates when the compactor task ends, however it ends.
struct Disarm<'a>(&'a IndexGate, &'a SpaceGate);

impl Drop for Disarm<'_> {
    fn drop(&mut self) {
        self.0.disarm();
        self.1.disarm();
    }
}

/// Owns a background compactor task; it stops when the handle is closed or dropped (a
/// pass in progress finishes first on `close`; after a drop it ends at its next check).
pub struct CompactorHandle {
    stop: Arc<Stop>,
    stats: Arc<CompactorStats>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for CompactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactorHandle")
            .field("stats", &self.stats)
            .finish()
    }
}

impl CompactorHandle {
    pub fn stats(&self) -> &Arc<CompactorStats> {
        &self.stats
    }
    /// Stop and wait for the task to end.
    pub async fn close(mut self) {
        self.signal();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
    fn signal(&self) {
        self.stop.flag.store(true, Ordering::Release);
        self.stop.notify.notify_waiters();
    }
}

impl Drop for CompactorHandle {
    fn drop(&mut self) {
        self.signal();
    }
}

/// Start the background compactor for a writer log: a compaction pass every
/// `pass_interval` (each bounded by `pass_bytes_max`) and a GC pass every `gc_interval`.
/// It stops on its own when the log is fenced.
pub fn spawn_compactor(log: Arc<Log>, cfg: CompactConfig) -> CompactorHandle {
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        notify: tokio::sync::Notify::new(),
    });
    let stats = Arc::new(CompactorStats::default());
    let task = tokio::spawn(run_compactor(
        log,
        cfg,
        Arc::clone(&stop),
        Arc::clone(&stats),
    ));
    CompactorHandle {
        stop,
        stats,
        task: Some(task),
    }
}

/// The space bound the compactor arms: `space_amp_max`, raised to 1 / (1 −
/// `dead_fraction_min`), the most a store of segments each under the threshold can hold
/// (a segment under it holds less than 1 / (1 − threshold) × its live bytes, so above
/// that level some segment is a victim). `None` when off, or when the threshold makes
/// the level unbounded (only fully dead segments are rewritten).
fn space_level(cfg: &CompactConfig) -> Option<f64> {
    let floor = 1.0 / (1.0 - cfg.dead_fraction_min);
    cfg.space_amp_max
        .map(|a| a.max(floor))
        .filter(|l| l.is_finite())
}

/// What [`wait_for_idle`] woke for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Run a pass (the export is idle, or has waited long enough, or is over a bound).
    Pass,
    /// Still busy, but a GC pass is due: run that alone.
    Gc,
    /// The compactor is being stopped.
    Stop,
}

/// Wait until the export has been idle for `cfg.pass_idle` (no request counted in
/// `LogStats::foreground_requests`), or until `cfg.pass_idle_wait_max` has passed since
/// `last_pass`. Why: a pass reads, decodes and writes segments and takes the index lock to
/// repoint runs; on a busy export that costs requests throughput and latency (cached 1 MiB
/// reads lost up to 30% beside a pass on 2 cores), while the space it reclaims can wait a
/// little. GC does not wait for an idle export (it lists and deletes, and decodes a
/// checkpoint at nice 19): at `gc_due` this returns [`Wake::Gc`]. Before, GC ran only
/// after a pass, so on a busy export once per `pass_idle_wait_max`, and the objects of a
/// minute of overwrites waited for it (the store peaked at 24 × the live data in
/// `tools/bench/overwrite.sh`).
async fn wait_for_idle(
    log: &Log,
    cfg: &CompactConfig,
    stop: &Stop,
    last_pass: Instant,
    gc_due: Instant,
) -> Wake {
    if cfg.pass_idle.is_zero() {
        return Wake::Pass;
    }
    let deadline = last_pass + cfg.pass_idle_wait_max;
    loop {
        let before = log.stats.foreground_requests.load(Ordering::Relaxed);
        let notified = stop.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stop.flag.load(Ordering::Acquire) {
            return Wake::Stop;
        }
        let now = Instant::now();
        if now >= deadline {
            return Wake::Pass;
        }
        if now >= gc_due {
            return Wake::Gc;
        }
        let nap = cfg.pass_idle.min(deadline - now).min(gc_due - now);
        tokio::select! {
            _ = &mut notified => return Wake::Stop,
            _ = log.index_gate.urgent.notified() => {}
            _ = log.space_gate.urgent.notified() => {}
            _ = tokio::time::sleep(nap) => {}
        }
        if log.stats.foreground_requests.load(Ordering::Relaxed) == before
            || log.index_gate.over(log, INDEX_URGENT_FACTOR)
            || log.space_gate.over(log, 1.0)
        {
            return Wake::Pass;
        }
    }
}

async fn run_compactor(
    log: Arc<Log>,
    cfg: CompactConfig,
    stop: Arc<Stop>,
    stats: Arc<CompactorStats>,
) {
    if let Err(e) = cfg.validate() {
        tracing::error!(export = log.name(), error = %e, "compactor not started");
        stats.error(&e);
        return;
    }
    let gate = &log.index_gate;
    gate.arm(cfg.index_runs_max.unwrap_or(0));
    let space = &log.space_gate;
    if let Some(level) = space_level(&cfg) {
        space.arm(&log, level);
    }
    let _disarm = Disarm(gate, space);
    let mut gc_state = GcState::default();
    let mut last_gc = Instant::now();
    let mut last_pass = Instant::now();
    let mut backoff = Duration::ZERO;
    // The last pass defragmented and the index is still over its bound: the next pass
    // follows at once (once the export is idle), not an interval later.
    let mut more_defrag = false;
    loop {
        // Far over the bound, or over the space bound, the next pass does not wait for an
        // idle export either.
        let urgent = gate.over(&log, INDEX_URGENT_FACTOR) || space.over(&log, 1.0);
        let wait = if urgent || more_defrag {
            backoff
        } else {
            cfg.pass_interval + backoff
        };
        let notified = stop.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stop.flag.load(Ordering::Acquire) {
            break;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = gate.urgent.notified(), if !urgent => {}
            _ = space.urgent.notified(), if !urgent => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if stop.flag.load(Ordering::Acquire) || log.is_fenced() {
            break;
        }
        let wake = if gate.over(&log, INDEX_URGENT_FACTOR) || space.over(&log, 1.0) {
            Wake::Pass
        } else {
            wait_for_idle(&log, &cfg, &stop, last_pass, last_gc + cfg.gc_interval).await
        };
        if wake == Wake::Stop {
            break;
        }
        let mut failed = false;
        // Wake::Gc: still busy, only GC is due (below).
        if wake == Wake::Pass {
            let result = compact_pass(&log, &cfg, None).await;
            gate.pass_ended(&log, result.as_ref().ok());
            space.pass_ended(&log, result.as_ref().is_ok_and(|r| r.version.is_some()));
            last_pass = Instant::now();
            more_defrag = false;
            match result {
                Ok(r) => {
                    more_defrag = r.fragments > 0
                        && cfg
                            .index_runs_max
                            .is_some_and(|max| log.index_extents() > max);
                    bump(&stats.passes, 1);
                    if r.version.is_some() {
                        bump(&stats.rewrites, 1);
                        bump(&stats.segments_retired, r.victims);
                        bump(&stats.fragments_rewritten, r.fragments);
                        bump(&stats.segments_written, r.segments_written);
                        bump(&stats.raw_bytes_copied, r.raw_bytes_copied);
                        bump(&stats.bytes_written, r.bytes_written);
                    }
                }
                Err(e) if e.is_fenced() => {
                    stats.error(&e);
                    break;
                }
                Err(e) => {
                    tracing::warn!(export = log.name(), error = %e, "compaction pass failed");
                    stats.error(&e);
                    failed = true;
                }
            }
        }
        if stop.flag.load(Ordering::Acquire) {
            break;
        }
        if last_gc.elapsed() >= cfg.gc_interval {
            last_gc = Instant::now();
            match gc::gc_pass(&log, &cfg.gc, &mut gc_state).await {
                Ok(r) => {
                    bump(&stats.gc_passes, 1);
                    bump(&stats.objects_deleted, r.objects_deleted());
                    bump(&stats.bytes_deleted, r.bytes_deleted);
                }
                Err(e) if e.is_fenced() => {
                    stats.error(&e);
                    break;
                }
                Err(e) => {
                    tracing::warn!(export = log.name(), error = %e, "gc pass failed");
                    stats.error(&e);
                    failed = true;
                }
            }
        }
        backoff = if failed {
            (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(60))
        } else {
            Duration::ZERO
        };
    }
    tracing::debug!(export = log.name(), "compactor stopped");
}

/// Run compaction passes until nothing is left to do (or `passes_max`), then one GC pass:
/// what `nbds3-compact` does. Returns the pass reports and the GC report.
pub async fn compact_all(
    log: &Log,
    cfg: &CompactConfig,
    passes_max: usize,
    progress: Option<Progress<'_>>,
) -> CompactResult<(Vec<PassReport>, GcReport)> {
    let mut passes = Vec::new();
    for _ in 0..passes_max {
        let r = compact_pass(log, cfg, progress).await?;
        let done = r.version.is_none();
        if !done {
            passes.push(r);
        }
        if done {
            break;
        }
    }
    let gc = gc::gc_pass(log, &cfg.gc, &mut GcState::default()).await?;
    Ok((passes, gc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(lba: u64, blocks: u64, seg: u64) -> Piece {
        Piece {
            lba,
            blocks,
            old: Val::Frame {
                seg,
                frame_offset: 16,
                frame_len: 100,
                block_in_frame: 0,
            },
            data: Bytes::from(vec![lba as u8; blocks as usize * 512]),
        }
    }

    #[test]
    fn cut_jobs_frames_are_consecutive_and_bounded() {
        let pieces = vec![
            piece(0, 3, 1),
            piece(3, 5, 2),
            piece(10, 1, 1),
            piece(11, 9, 3),
        ];
        let segs = cut_jobs(pieces, 512, 4 * 512, 8 * 512);
        let mut all = Vec::new();
        for s in &segs {
            let raw: u64 = s.iter().flatten().map(|p| p.blocks).sum();
            assert!(raw as usize * 512 <= 8 * 512 + 4 * 512);
            for f in s {
                let n: u64 = f.iter().map(|p| p.blocks).sum();
                assert!(n <= 4);
                let mut at = f[0].lba;
                for p in f {
                    assert_eq!(p.lba, at);
                    at += p.blocks;
                }
                // Inside one window of 4 blocks (multiples of the frame size).
                assert_eq!(f[0].lba / 4, (at - 1) / 4, "frame {:?} crosses a window", f);
                all.extend(f.iter().map(|p| (p.lba, p.blocks)));
            }
        }
        let total: u64 = all.iter().map(|(_, b)| b).sum();
        assert_eq!(total, 3 + 5 + 1 + 9);
        // 10..11 and 11..20 join into frames 10..12, 12..16, 16..20.
        let frames: Vec<(u64, u64)> = segs
            .iter()
            .flatten()
            .map(|f| (f[0].lba, f.iter().map(|p| p.blocks).sum()))
            .collect();
        assert_eq!(frames, vec![(0, 4), (4, 4), (10, 2), (12, 4), (16, 4)]);
    }

    /// The README's figures: with the default 256M cache (index bound 64 MiB at 96 bytes a
    /// run) frames stay at 128 KiB up to 64 GiB mapped, then double, up to 1 MiB past
    /// 256 GiB, and stop there.
    #[test]
    fn frames_grow_with_the_mapped_data_in_powers_of_two() {
        let runs_max = Some(crate::volume::index_runs_in(64 << 20));
        let gib = |g: u64| g << 18; // 4 KiB blocks
        let (base, top) = (32, 256);
        let f = |mapped| frame_blocks_for(mapped, runs_max, base, top);
        assert_eq!(f(0), 32);
        assert_eq!(f(gib(63)), 32);
        assert_eq!(f(gib(65)), 64);
        assert_eq!(f(gib(127)), 64);
        assert_eq!(f(gib(129)), 128);
        assert_eq!(f(gib(257)), 256);
        assert_eq!(f(gib(10 << 10)), 256);
        // No bound, or no room above the writers' frames: always the writers' frames.
        assert_eq!(frame_blocks_for(gib(1000), None, base, top), 32);
        assert_eq!(frame_blocks_for(gib(1000), runs_max, base, base), 32);
        // A limit between two powers of two: the lower one.
        assert_eq!(frame_blocks_for(gib(1000), runs_max, base, 200), 128);
    }

    #[test]
    fn fragments_lie_in_fixed_windows() {
        let mut idx = Index::new();
        // Single-block runs 5..40 (each its own frame), a zero-allocated run, then a
        // 16-block run that is one frame already.
        for lba in 5..40u64 {
            idx.set(
                lba,
                1,
                Val::Frame {
                    seg: 1,
                    frame_offset: lba * 100,
                    frame_len: 100,
                    block_in_frame: 0,
                },
            );
        }
        idx.set(40, 8, Val::ZeroAlloc);
        idx.set(
            48,
            16,
            Val::Frame {
                seg: 2,
                frame_offset: 0,
                frame_len: 100,
                block_in_frame: 0,
            },
        );
        let f = |runs, lba, blocks| Fragment { runs, lba, blocks };
        assert_eq!(
            plan_fragments(&idx, 16, 10),
            vec![f(16, 16, 16), f(11, 5, 11), f(8, 32, 8)]
        );
        assert_eq!(plan_fragments(&idx, 16, 1), vec![f(16, 16, 16)]);
        // Joining the chain to a run before it does not move the windows.
        idx.set(
            0,
            5,
            Val::Frame {
                seg: 3,
                frame_offset: 0,
                frame_len: 100,
                block_in_frame: 0,
            },
        );
        assert_eq!(
            plan_fragments(&idx, 16, 10),
            vec![f(16, 16, 16), f(12, 0, 16), f(8, 32, 8)]
        );
    }

    #[test]
    fn plan_picks_dead_then_small_within_budget() {
        let mut idx = Index::new();
        let stat = |total, live, size| SegStat {
            size_bytes: size,
            blocks_total: total,
            blocks_live: live,
        };
        idx.segs.insert(1, stat(100, 10, 400_000)); // 90% dead
        idx.segs.insert(2, stat(100, 60, 400_000)); // 40% dead, large
        idx.segs.insert(3, stat(100, 0, 400_000)); // empty
        idx.segs.insert(4, stat(10, 10, 40_000)); // small
        idx.segs.insert(5, stat(10, 10, 40_000)); // small
        let cfg = CompactConfig {
            small_segment_bytes: 100_000,
            small_segments_min: 2,
            ..CompactConfig::default()
        };
        let p = plan_from_index(&idx, 4096, 8 << 20, &cfg, None);
        let ids: Vec<u64> = p.victims.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![1, 4, 5, 3]);
        assert_eq!(p.live_raw_bytes, 30 * 4096);
        // A budget of one block still takes the first victim, and nothing after it.
        let p = plan_from_index(&idx, 4096, 8 << 20, &cfg, Some(1));
        let ids: Vec<u64> = p.victims.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![1, 3]);
    }

    #[test]
    fn small_but_raw_full_segments_are_not_merged() {
        // Well-compressing data: each segment holds a full segment's raw data (2,048 blocks
        // of 4 KiB = 8 MiB) in 100 KB. Merging them would cut as many segments again.
        let mut idx = Index::new();
        for id in 1..=20 {
            idx.segs.insert(
                id,
                SegStat {
                    size_bytes: 100_000,
                    blocks_total: 2048,
                    blocks_live: 2048,
                },
            );
        }
        let cfg = CompactConfig::default();
        assert!(plan_from_index(&idx, 4096, 8 << 20, &cfg, None).is_empty());
        // Half full in raw terms: two fit in one output segment, so they are merged.
        for s in idx.segs.values_mut() {
            s.blocks_live = 1000;
            s.blocks_total = 1000;
        }
        let p = plan_from_index(&idx, 4096, 8 << 20, &cfg, None);
        assert_eq!(p.victims.len(), 20);
        assert!(p.victims.iter().all(|v| v.reason == VictimReason::Small));
    }
}
