//! The in-memory page index: block → where its bytes live, plus per-segment live-block
//! accounting (what compaction uses to pick victims without a LIST).
//!
//! Invariants: runs never overlap; `set` joins a run onto its neighbour when the two
//! continue each other (same frame and consecutive blocks, or both zero-allocated; a
//! frame's pieces are joined when set in block order, as commits, checkpoints and
//! compaction do), so the number of runs, which is what the index costs in memory, follows
//! the stored layout rather than the history of writes; `segs[s].blocks_live` equals the
//! number of blocks whose run points into segment `s` (checked by `check_accounting` in
//! tests and by the inspector's verify); a segment appears in `segs` from the moment a
//! commit names it.

use std::collections::HashMap;

use crate::format::{
    Checkpoint, CheckpointExtent, CheckpointSegment, CheckpointValue, DirEntry, EntryKind,
    SegmentRef,
};
use crate::util::{RangeMap, RangeValue};

/// Where a mapped run of blocks lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// Blocks `block_in_frame..` of the frame at `frame_offset` in segment `seg`.
    Frame {
        seg: u64,
        frame_offset: u64,
        frame_len: u32,
        block_in_frame: u32,
    },
    /// Zeroed with NO_HOLE: reads as zeros, reported allocated.
    ZeroAlloc,
}

impl RangeValue for Val {
    fn advance(&self, blocks: u64) -> Self {
        match *self {
            Val::Frame {
                seg,
                frame_offset,
                frame_len,
                block_in_frame,
            } => Val::Frame {
                seg,
                frame_offset,
                frame_len,
                // Runs come from frames of at most FRAME_RAW_BYTES_MAX, so this fits.
                block_in_frame: block_in_frame + blocks as u32,
            },
            Val::ZeroAlloc => Val::ZeroAlloc,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegStat {
    pub size_bytes: u64,
    /// Data blocks the segment was written with.
    pub blocks_total: u64,
    /// Data blocks the index still maps into it.
    pub blocks_live: u64,
}

impl SegStat {
    /// Fraction of the segment's data that is dead (0.0 = all live).
    pub fn dead_fraction(&self) -> f64 {
        if self.blocks_total == 0 {
            1.0
        } else {
            1.0 - self.blocks_live as f64 / self.blocks_total as f64
        }
    }
    /// Live bytes estimated by the share of live blocks (frames compress unevenly).
    pub fn live_bytes_estimate(&self) -> u64 {
        if self.blocks_total == 0 {
            0
        } else {
            (self.size_bytes as u128 * self.blocks_live as u128 / self.blocks_total as u128) as u64
        }
    }
}

/// What [`Index::space`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    pub stored_bytes: u64,
    pub live_bytes: u64,
}

impl Space {
    /// Stored bytes over live bytes (1.0 when nothing is stored).
    pub fn amplification(&self) -> f64 {
        match (self.stored_bytes, self.live_bytes) {
            (0, 0) => 1.0,
            (_, 0) => f64::INFINITY,
            (stored, live) => stored as f64 / live as f64,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Index {
    pub map: RangeMap<Val>,
    pub segs: HashMap<u64, SegStat>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take `len` blocks of `v` out of its segment's live count.
    fn account_removed(segs: &mut HashMap<u64, SegStat>, len: u64, v: Val) {
        if let Val::Frame { seg, .. } = v {
            if let Some(s) = segs.get_mut(&seg) {
                s.blocks_live = s.blocks_live.saturating_sub(len);
            }
        }
    }

    /// Map a run, replacing what was there.
    pub fn set(&mut self, lba: u64, blocks: u64, v: Val) {
        if let Val::Frame { seg, .. } = v {
            if let Some(s) = self.segs.get_mut(&seg) {
                s.blocks_live += blocks;
            }
        }
        let segs = &mut self.segs;
        self.map.insert_with(lba, blocks, v, |_, len, old| {
            Self::account_removed(segs, len, old)
        });
        // Join runs that continue each other, so a frame is one run however many pieces
        // set it (compaction moves a frame's blocks piece by piece, in block order). A new
        // frame's first run starts at block 0 and cannot continue anything: the flush
        // path pays nothing for this.
        match v {
            Val::Frame { block_in_frame, .. } if block_in_frame > 0 => {
                self.map.join_left(lba);
            }
            Val::ZeroAlloc => {
                self.map.join_left(lba);
                self.map.join_left(lba + blocks);
            }
            Val::Frame { .. } => {}
        }
    }

    /// Unmap a run.
    pub fn unmap(&mut self, lba: u64, blocks: u64) {
        let segs = &mut self.segs;
        self.map.remove_with(lba, blocks, |_, len, old| {
            Self::account_removed(segs, len, old)
        });
    }

    /// Apply one segment's directory, in order, as a commit of that segment does.
    pub fn apply_segment(&mut self, seg: SegmentRef, entries: &[DirEntry]) {
        let blocks_total = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Data)
            .map(|e| e.blocks)
            .sum();
        self.segs.insert(
            seg.id,
            SegStat {
                size_bytes: seg.size_bytes,
                blocks_total,
                blocks_live: 0,
            },
        );
        for e in entries {
            match e.kind {
                EntryKind::Data => self.set(
                    e.lba,
                    e.blocks,
                    Val::Frame {
                        seg: seg.id,
                        frame_offset: e.frame_offset,
                        frame_len: e.frame_len,
                        block_in_frame: 0,
                    },
                ),
                EntryKind::Unmap => self.unmap(e.lba, e.blocks),
                EntryKind::ZeroAlloc => self.set(e.lba, e.blocks, Val::ZeroAlloc),
            }
        }
    }

    /// Runs covering `lba..lba+blocks` completely, holes as `None`.
    pub fn lookup(&self, lba: u64, blocks: u64) -> Vec<(u64, u64, Option<Val>)> {
        let mut out = Vec::new();
        let mut at = lba;
        let end = lba + blocks;
        for (s, l, v) in self.map.overlapping(lba, blocks) {
            if s > at {
                out.push((at, s - at, None));
            }
            out.push((s, l, Some(v)));
            at = s + l;
        }
        if at < end {
            out.push((at, end - at, None));
        }
        out
    }

    /// Segments the index still points into.
    pub fn live_segments(&self) -> Vec<SegmentRef> {
        let mut v: Vec<SegmentRef> = self
            .segs
            .iter()
            .filter(|(_, s)| s.blocks_live > 0)
            .map(|(&id, s)| SegmentRef {
                id,
                size_bytes: s.size_bytes,
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Stored bytes of the segments the index names, and their live share (estimated per
    /// segment by its share of live blocks, as compaction does). Segments with no data
    /// entries (trims only) are left out: any checkpoint drops them.
    pub fn space(&self) -> Space {
        let mut sp = Space::default();
        for s in self.segs.values().filter(|s| s.blocks_total > 0) {
            sp.stored_bytes += s.size_bytes;
            sp.live_bytes += s.live_bytes_estimate();
        }
        sp
    }

    /// Forget segments that no extent references (after a checkpoint they are no longer
    /// needed to describe the state).
    pub fn drop_dead_segments(&mut self) {
        self.segs.retain(|_, s| s.blocks_live > 0);
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.map.iter().map(|(_, l, _)| l).sum()
    }

    pub fn to_checkpoint(&self, version: u64, size_bytes: u64, block_size: u32) -> Checkpoint {
        let segments: Vec<CheckpointSegment> = self
            .live_segments()
            .into_iter()
            .map(|s| CheckpointSegment {
                id: s.id,
                size_bytes: s.size_bytes,
                blocks_total: self.segs.get(&s.id).map_or(0, |st| st.blocks_total),
            })
            .collect();
        let pos: HashMap<u64, u32> = segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i as u32))
            .collect();
        let mut extents = Vec::with_capacity(self.map.len());
        for (lba, blocks, v) in self.map.iter() {
            let value = match *v {
                Val::Frame {
                    seg,
                    frame_offset,
                    frame_len,
                    block_in_frame,
                } => CheckpointValue::Frame {
                    // Every Frame value points at a segment with live blocks, so it is in
                    // `pos`; u32::MAX would be rejected by `from_checkpoint`.
                    segment_index: pos.get(&seg).copied().unwrap_or(u32::MAX),
                    frame_offset,
                    frame_len,
                    block_in_frame,
                },
                Val::ZeroAlloc => CheckpointValue::ZeroAlloc,
            };
            extents.push(CheckpointExtent { lba, blocks, value });
        }
        Checkpoint {
            version,
            size_bytes,
            block_size,
            segments,
            extents,
        }
    }

    /// Rebuild from a checkpoint, validating every reference; `Err` names the problem.
    pub fn from_checkpoint(c: &Checkpoint, device_blocks: u64) -> Result<Self, String> {
        let mut idx = Index::new();
        for s in &c.segments {
            idx.segs.insert(
                s.id,
                SegStat {
                    size_bytes: s.size_bytes,
                    blocks_total: s.blocks_total,
                    blocks_live: 0,
                },
            );
        }
        // Extents arrive in lba order: the runs are collected (with the joins `set` would
        // make) and the tree bulk-built, instead of one `set` per extent (which was 3/4 of
        // loading a checkpoint, and a checkpoint is loaded at every background build).
        let mut runs: Vec<(u64, u64, Val)> = Vec::with_capacity(c.extents.len());
        let mut prev_end = 0u64;
        for e in &c.extents {
            let end = e
                .lba
                .checked_add(e.blocks)
                .filter(|&end| e.blocks > 0 && end <= device_blocks && e.lba >= prev_end)
                .ok_or_else(|| format!("extent {e:?} out of order or out of range"))?;
            prev_end = end;
            let v = match e.value {
                CheckpointValue::Frame {
                    segment_index,
                    frame_offset,
                    frame_len,
                    block_in_frame,
                } => {
                    let seg = c
                        .segments
                        .get(segment_index as usize)
                        .ok_or_else(|| format!("extent {e:?} names a missing segment"))?;
                    if frame_offset.saturating_add(frame_len as u64) > seg.size_bytes {
                        return Err(format!("extent {e:?} points outside segment {}", seg.id));
                    }
                    Val::Frame {
                        seg: seg.id,
                        frame_offset,
                        frame_len,
                        block_in_frame,
                    }
                }
                CheckpointValue::ZeroAlloc => Val::ZeroAlloc,
            };
            if let Val::Frame { seg, .. } = v {
                if let Some(s) = idx.segs.get_mut(&seg) {
                    s.blocks_live += e.blocks;
                }
            }
            // The joins `set` makes when runs are set in order (see there).
            let joins = match v {
                Val::Frame { block_in_frame, .. } => block_in_frame > 0,
                Val::ZeroAlloc => true,
            };
            if let Some(last) = runs.last_mut().filter(|_| joins) {
                if last.0 + last.1 == e.lba && last.2.advance(last.1) == v {
                    last.1 += e.blocks;
                    continue;
                }
            }
            runs.push((e.lba, e.blocks, v));
        }
        // The loop above already rejected runs out of order.
        idx.map =
            RangeMap::from_sorted_runs(runs).map_err(|i| format!("extent {i} out of order"))?;
        for (id, s) in &idx.segs {
            if s.blocks_live > s.blocks_total {
                return Err(format!(
                    "segment {id} has {} live blocks but was written with {}",
                    s.blocks_live, s.blocks_total
                ));
            }
        }
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seg: u64, offset: u64, bif: u32) -> Val {
        Val::Frame {
            seg,
            frame_offset: offset,
            frame_len: 4096,
            block_in_frame: bif,
        }
    }

    fn runs(idx: &Index) -> Vec<(u64, u64, Val)> {
        idx.map.iter().map(|(l, n, v)| (l, n, *v)).collect()
    }

    #[test]
    fn pieces_of_one_frame_set_in_order_are_one_run() {
        let mut idx = Index::new();
        idx.segs.insert(
            7,
            SegStat {
                size_bytes: 10_000,
                blocks_total: 8,
                blocks_live: 0,
            },
        );
        // Blocks 10..18 are frame (7, 0) block by block, as a compaction pass repoints them.
        for b in 0..8u32 {
            idx.set(10 + b as u64, 1, frame(7, 0, b));
        }
        assert_eq!(runs(&idx), vec![(10, 8, frame(7, 0, 0))]);
        assert_eq!(idx.segs[&7].blocks_live, 8);
        // Another frame, or a gap in the blocks, is not joined.
        idx.set(18, 1, frame(7, 4096, 1));
        idx.set(19, 1, frame(7, 0, 9));
        assert_eq!(idx.map.len(), 3);
        // Zero-allocated runs join on both sides.
        idx.set(30, 2, Val::ZeroAlloc);
        idx.set(34, 2, Val::ZeroAlloc);
        idx.set(32, 2, Val::ZeroAlloc);
        assert_eq!(idx.map.len(), 4);
        assert_eq!(
            idx.lookup(29, 8),
            vec![(29, 1, None), (30, 6, Some(Val::ZeroAlloc)), (36, 1, None)]
        );
        // Splitting a joined run still accounts block by block.
        idx.unmap(12, 2);
        assert_eq!(idx.segs[&7].blocks_live, 8);
        assert_eq!(idx.lookup(14, 1), vec![(14, 1, Some(frame(7, 0, 4)))]);
        crate::log::compact::check_accounting(&idx).unwrap();
    }

    proptest::proptest! {
        /// Loading a checkpoint bulk-builds the tree; the result must be the index that
        /// setting the same extents one by one, in order, gives (runs, joins, accounting),
        /// including checkpoints whose neighbouring extents continue each other.
        #[test]
        fn checkpoint_load_equals_setting_extents_in_order(
            steps in proptest::collection::vec((0u64..3, 1u64..5, 0u8..4, 0u32..3), 0..60)
        ) {
            let segments: Vec<CheckpointSegment> = (0..3)
                .map(|i| CheckpointSegment { id: 10 + i, size_bytes: 1 << 20, blocks_total: 1000 })
                .collect();
            let mut extents = Vec::new();
            let mut lba = 0u64;
            let mut prev: Option<(u64, CheckpointValue)> = None;
            for (gap, blocks, kind, seg) in steps {
                lba += gap;
                let value = match (kind, prev) {
                    // Continue the previous frame exactly where it stopped (joinable).
                    (0, Some((n, CheckpointValue::Frame { segment_index, frame_offset, frame_len, block_in_frame })))
                        if gap == 0 =>
                    {
                        CheckpointValue::Frame {
                            segment_index,
                            frame_offset,
                            frame_len,
                            block_in_frame: block_in_frame + n as u32,
                        }
                    }
                    (1, _) => CheckpointValue::ZeroAlloc,
                    _ => CheckpointValue::Frame {
                        segment_index: seg,
                        frame_offset: lba * 64,
                        frame_len: 4096,
                        block_in_frame: u32::from(kind == 3),
                    },
                };
                extents.push(CheckpointExtent { lba, blocks, value });
                prev = Some((blocks, value));
                lba += blocks;
            }
            let c = Checkpoint { version: 1, size_bytes: 1 << 20, block_size: 4096, segments, extents };
            let loaded = Index::from_checkpoint(&c, 1 << 20).unwrap();
            let mut want = Index::new();
            for s in &c.segments {
                want.segs.insert(s.id, SegStat { size_bytes: s.size_bytes, blocks_total: s.blocks_total, blocks_live: 0 });
            }
            for e in &c.extents {
                let v = match e.value {
                    CheckpointValue::Frame { segment_index, frame_offset, frame_len, block_in_frame } => Val::Frame {
                        seg: c.segments[segment_index as usize].id,
                        frame_offset,
                        frame_len,
                        block_in_frame,
                    },
                    CheckpointValue::ZeroAlloc => Val::ZeroAlloc,
                };
                want.set(e.lba, e.blocks, v);
            }
            proptest::prop_assert_eq!(runs(&loaded), runs(&want));
            proptest::prop_assert_eq!(&loaded.segs, &want.segs);
        }
    }

    #[test]
    fn checkpoint_load_rejects_extents_out_of_order() {
        let segments = vec![CheckpointSegment {
            id: 1,
            size_bytes: 1 << 20,
            blocks_total: 10,
        }];
        let extents = vec![
            CheckpointExtent {
                lba: 8,
                blocks: 4,
                value: CheckpointValue::ZeroAlloc,
            },
            CheckpointExtent {
                lba: 10,
                blocks: 1,
                value: CheckpointValue::ZeroAlloc,
            },
        ];
        let c = Checkpoint {
            version: 1,
            size_bytes: 1 << 20,
            block_size: 4096,
            segments,
            extents,
        };
        assert!(Index::from_checkpoint(&c, 256)
            .unwrap_err()
            .contains("out of order"));
    }
}
