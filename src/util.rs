//! Small shared pieces: an interval map over block numbers, size parsing, time.
//!
//! `RangeMap` is the one structure behind both the page index (`log::index`) and the dirty
//! set (`volume`): non-overlapping runs `start..start+len` each carrying a value that can be
//! "advanced" to describe a suffix of itself, so splitting a run never copies data.
//! `BlockRunMap` is the same map with single-block runs kept in a hash map beside the tree:
//! the dirty set's shape under random writes. `ClockMap` is the page cache's map: a hash
//! map whose entries are evicted in CLOCK (second chance) order.

use std::collections::{BTreeMap, HashMap};

/// A value describing a run of blocks that can be cut: `advance(n)` is the value for the
/// same run with its first `n` blocks removed.
pub trait RangeValue: Clone {
    fn advance(&self, blocks: u64) -> Self;
    /// The value for only the first `blocks` blocks of the run (default: unchanged, for
    /// values that do not carry per-block content).
    fn clip(&self, _blocks: u64) -> Self {
        self.clone()
    }
}

/// Non-overlapping runs of blocks, keyed by first block. Adjacent runs are joined only on
/// request ([`RangeMap::join_left`]): only the owner knows where a join can happen, and
/// the dirty set's values (data) never continue each other.
#[derive(Debug, Clone)]
pub struct RangeMap<V> {
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for RangeMap<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<V: RangeValue> RangeMap<V> {
    pub fn new() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }

    /// Build from runs given in increasing order, none empty and none overlapping the
    /// next, in O(n): the tree is bulk-built instead of taking n inserts. Returns the
    /// index of the first run that breaks the order. Nothing is joined.
    pub fn from_sorted_runs(runs: Vec<(u64, u64, V)>) -> Result<Self, usize> {
        let mut end = 0u64;
        for (i, &(start, len, _)) in runs.iter().enumerate() {
            if len == 0 || (i > 0 && start < end) {
                return Err(i);
            }
            end = start.checked_add(len).ok_or(i)?;
        }
        // Sorted input: `from_iter`'s stable sort is a single pass, then a bulk build.
        Ok(Self {
            map: runs.into_iter().map(|(s, l, v)| (s, (l, v))).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Remove `start..start+len`; returns the removed pieces (clipped) in order.
    pub fn remove(&mut self, start: u64, len: u64) -> Vec<(u64, u64, V)> {
        let mut removed = Vec::new();
        self.remove_with(start, len, |s, l, v| removed.push((s, l, v)));
        removed
    }

    /// Remove `start..start+len`, handing each removed piece (clipped) to `f` in order.
    /// Allocates nothing beyond the map's own nodes: this runs for every write and every
    /// committed extent.
    pub fn remove_with(&mut self, start: u64, len: u64, mut f: impl FnMut(u64, u64, V)) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        // The run starting before `start` may stick into the range.
        let head = match self.map.range(..start).next_back() {
            Some((&k, &(l, _))) if k + l > start => Some(k),
            _ => None,
        };
        // Then every run starting inside the range, looked up afresh each time: taking one
        // out only re-inserts pieces outside `start..end`, so this terminates.
        let mut next = head;
        while let Some(k) = next.or_else(|| self.map.range(start..end).next().map(|(&k, _)| k)) {
            next = None;
            let Some((l, v)) = self.map.remove(&k) else {
                break;
            };
            let run_end = k + l;
            if k >= start && run_end <= end {
                f(k, l, v); // wholly inside: handed over as it is
                continue;
            }
            if k < start {
                self.map.insert(k, (start - k, v.clip(start - k)));
            }
            if run_end > end {
                self.map.insert(end, (run_end - end, v.advance(end - k)));
            }
            let s = k.max(start);
            let e = run_end.min(end);
            f(s, e - s, v.advance(s - k).clip(e - s));
        }
    }

    /// Map `start..start+len` to `v`, replacing what was there; returns the replaced pieces.
    pub fn insert(&mut self, start: u64, len: u64, v: V) -> Vec<(u64, u64, V)> {
        let mut removed = Vec::new();
        self.insert_with(start, len, v, |s, l, old| removed.push((s, l, old)));
        removed
    }

    /// Map `start..start+len` to `v`, handing each replaced piece to `f` in order.
    pub fn insert_with(&mut self, start: u64, len: u64, v: V, mut f: impl FnMut(u64, u64, V)) {
        if len == 0 {
            return;
        }
        // One lookup settles the two common cases: the last run starting before the end
        // either is exactly this run (a block rewritten: the value is swapped in place, no
        // node changes) or ends at or before `start`, and then, runs being sorted and
        // disjoint, nothing overlaps (a block written for the first time: one insert).
        // Only a real overlap takes the general path, which looks up afresh.
        let end = start.saturating_add(len);
        match self.map.range_mut(..end).next_back() {
            Some((&k, (l, old))) if k == start && *l == len => {
                let old = std::mem::replace(old, v);
                f(start, len, old);
                return;
            }
            Some((&k, (l, _))) if k + *l > start => self.remove_with(start, len, &mut f),
            _ => {}
        }
        self.map.insert(start, (len, v));
    }

    /// Join the run starting at `start` onto the run that ends exactly there, when the two
    /// describe one continuous run (the earlier value advanced by its length is the later
    /// value). Returns whether they were joined. Costs one lookup; callers only ask where
    /// a join is possible at all.
    pub fn join_left(&mut self, start: u64) -> bool
    where
        V: PartialEq,
    {
        let Some((&pk, &(pl, ref pv))) = self.map.range(..start).next_back() else {
            return false;
        };
        if pk + pl != start {
            return false;
        }
        let Some((l, v)) = self.map.get(&start) else {
            return false;
        };
        if pv.advance(pl) != *v {
            return false;
        }
        let l = *l;
        self.map.remove(&start);
        if let Some((prev_len, _)) = self.map.get_mut(&pk) {
            *prev_len += l;
        }
        true
    }

    /// Runs overlapping `start..start+len`, clipped to it, in order (holes are skipped).
    pub fn overlapping(&self, start: u64, len: u64) -> Vec<(u64, u64, V)> {
        let mut out = Vec::new();
        let end = start.saturating_add(len);
        if len == 0 {
            return out;
        }
        if let Some((&k, (l, v))) = self.map.range(..=start).next_back() {
            if k + l > start && k < start {
                let e = (k + l).min(end);
                out.push((start, e - start, v.advance(start - k).clip(e - start)));
            }
        }
        for (&k, (l, v)) in self.map.range(start..end) {
            let e = (k + l).min(end);
            out.push((k, e - k, if e - k < *l { v.clip(e - k) } else { v.clone() }));
        }
        out
    }

    /// Every run, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &V)> + '_ {
        self.map.iter().map(|(&k, (l, v))| (k, *l, v))
    }

    /// Whether some run covers block `lba`.
    pub fn covers(&self, lba: u64) -> bool {
        matches!(self.map.range(..=lba).next_back(), Some((&k, &(l, _))) if k + l > lba)
    }
}

/// Non-overlapping runs of blocks like [`RangeMap`], with every run of exactly one block
/// that no longer run covers kept in a hash map instead of the tree.
///
/// Why: the dirty set under random 4 KiB writes is tens of thousands of one-block runs at
/// scattered addresses. Inserting each into a B-tree of that size cost ~1.8 µs (a chain of
/// cache misses down the tree; 8% of the daemon's CPU per random write), a hash insert a
/// small fraction of that; the order the tree keeps for free is needed only once per flush
/// ([`BlockRunMap::sorted`]), where one sort costs far less than the inserts did.
///
/// Invariant: no block is both in `singles` and covered by a run of `runs`. The hash uses
/// std's randomly keyed SipHash: the keys are block numbers a client chooses.
#[derive(Debug, Clone)]
pub struct BlockRunMap<V> {
    runs: RangeMap<V>,
    singles: HashMap<u64, V>,
}

impl<V> Default for BlockRunMap<V> {
    fn default() -> Self {
        Self {
            runs: RangeMap::default(),
            singles: HashMap::new(),
        }
    }
}

impl<V: RangeValue> BlockRunMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs held (one-block runs included).
    pub fn len(&self) -> usize {
        self.runs.len() + self.singles.len()
    }
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.singles.is_empty()
    }

    /// Remove everything, handing each value to `f`, keeping the hash table's capacity
    /// for up to `singles_max` single-block runs (a larger table is shrunk to that).
    pub fn clear_keeping(&mut self, singles_max: usize, mut f: impl FnMut(V)) {
        for (_, v) in self.singles.drain() {
            f(v);
        }
        for (_, (_, v)) in std::mem::take(&mut self.runs.map) {
            f(v);
        }
        self.singles.shrink_to(singles_max);
    }

    /// Map `start..start+len` to `v`, handing each replaced piece (clipped) to `f`, in no
    /// particular order.
    pub fn insert_with(&mut self, start: u64, len: u64, v: V, mut f: impl FnMut(u64, u64, V)) {
        if len == 0 {
            return;
        }
        if len == 1 && !self.runs.covers(start) {
            if let Some(old) = self.singles.insert(start, v) {
                f(start, 1, old);
            }
            return;
        }
        self.take_singles(start, len, &mut f);
        self.runs.insert_with(start, len, v, f);
    }

    /// Map `start..start+len` to `v`; returns the replaced pieces in order.
    pub fn insert(&mut self, start: u64, len: u64, v: V) -> Vec<(u64, u64, V)> {
        let mut removed = Vec::new();
        self.insert_with(start, len, v, |s, l, old| removed.push((s, l, old)));
        removed.sort_unstable_by_key(|r| r.0);
        removed
    }

    /// Blocks of `start..start+len` that may hold a one-block run, in order, for the
    /// caller to look up once each: every block of the range when it is no longer than the
    /// map (probing visits fewer entries), else the keys a scan of the map finds in it.
    /// Probing allocates nothing and looks nothing up here.
    fn single_keys(&self, start: u64, len: u64) -> impl Iterator<Item = u64> {
        let end = start.saturating_add(len);
        let (probe, found) = if self.singles.is_empty() {
            (0..0, Vec::new())
        } else if len <= self.singles.len() as u64 {
            (start..end, Vec::new())
        } else {
            let mut keys: Vec<u64> = (self.singles.keys().copied())
                .filter(|&k| k >= start && k < end)
                .collect();
            keys.sort_unstable();
            (0..0, keys)
        };
        probe.chain(found)
    }

    /// Remove the one-block runs inside `start..start+len`, handing each to `f`.
    fn take_singles(&mut self, start: u64, len: u64, f: &mut impl FnMut(u64, u64, V)) {
        for lba in self.single_keys(start, len) {
            if let Some(old) = self.singles.remove(&lba) {
                f(lba, 1, old);
            }
        }
    }

    /// Runs overlapping `start..start+len`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, len: u64) -> Vec<(u64, u64, V)> {
        let mut out = self.runs.overlapping(start, len);
        let from_runs = out.len();
        out.extend(
            self.single_keys(start, len)
                .filter_map(|k| self.singles.get(&k).map(|v| (k, 1, v.clone()))),
        );
        if from_runs > 0 && out.len() > from_runs {
            // Two sorted lists, disjoint: one merge.
            out.sort_by_key(|r| r.0);
        }
        out
    }

    /// Every run, in no particular order.
    pub fn iter_unordered(&self) -> impl Iterator<Item = (u64, u64, &V)> + '_ {
        self.runs
            .iter()
            .chain(self.singles.iter().map(|(&k, v)| (k, 1, v)))
    }

    /// Every run, in order (a sort of the one-block runs: call it once per use).
    pub fn sorted(&self) -> Vec<(u64, u64, &V)> {
        let mut out: Vec<(u64, u64, &V)> = self.iter_unordered().collect();
        out.sort_unstable_by_key(|r| r.0);
        out
    }
}

/// Lock a std mutex, taking the data even if a holder panicked: for state a panic cannot
/// leave half-changed (plain bytes, lists of buffers), so one failed request does not
/// stop the others.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024), e.g. `10G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parse a duration like `5s`, `250ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?}"))?;
    Ok(std::time::Duration::from_millis(n.saturating_mul(unit)))
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Log through `tracing` to stderr, at the level `RUST_LOG` says (else `default`), for the
/// binaries. Colours only on a terminal (and without `NO_COLOR`): a log redirected to a
/// file or a journal gets plain `key=value` text that grep and log shippers can read.
pub fn init_stderr_logging(default: &str) {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// A hash map that picks eviction victims in CLOCK (second chance) order: entries live in
/// a ring of slots, each with a referenced bit that a lookup sets and the clock hand
/// clears as it passes; the first entry the hand finds unreferenced is the victim.
///
/// Why not a linked-list LRU: every hit there moves a node to the front, touching the
/// node, its two neighbours and the head, cold memory in a large cache; a cached 1 MiB
/// read makes 32 such hits. Here a hit writes one bit in the entry it reads anyway. New
/// entries start unreferenced, so data cached and never read again (written through,
/// read ahead and not used) goes before data that was read since it came in.
///
/// Invariants: `index` maps every key held to its slot, and `slots[i]` holds an entry
/// exactly when some key maps to `i`; `free` lists the empty slots. The slot ring never
/// shrinks: it is as long as the most entries held at once. Keys are hashed with std's
/// randomly keyed SipHash (clients choose the blocks).
#[derive(Debug)]
pub struct ClockMap<K, V> {
    index: HashMap<K, usize>,
    slots: Vec<Option<ClockSlot<K, V>>>,
    free: Vec<usize>,
    hand: usize,
}

#[derive(Debug)]
struct ClockSlot<K, V> {
    key: K,
    val: V,
    referenced: bool,
}

impl<K: Copy + Eq + std::hash::Hash, V> Default for ClockMap<K, V> {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash, V> ClockMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn slot_mut(&mut self, key: &K) -> Option<&mut ClockSlot<K, V>> {
        let i = *self.index.get(key)?;
        self.slots.get_mut(i)?.as_mut()
    }

    /// The entry of `key`, marked referenced.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let s = self.slot_mut(key)?;
        s.referenced = true;
        Some(&mut s.val)
    }

    /// The entry of `key` without marking it.
    pub fn peek(&self, key: &K) -> Option<&V> {
        let i = *self.index.get(key)?;
        self.slots.get(i)?.as_ref().map(|s| &s.val)
    }

    /// The entry of `key`, writable, without marking it.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        self.slot_mut(key).map(|s| &mut s.val)
    }

    /// The entry of `key`, inserted (unreferenced) from `make` if absent; an entry that
    /// was there is marked referenced.
    pub fn get_or_insert_mut(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.index.get(&key) {
            Some(&i) => {
                if let Some(Some(s)) = self.slots.get_mut(i) {
                    s.referenced = true;
                }
                i
            }
            None => {
                let slot = Some(ClockSlot {
                    key,
                    val: make(),
                    referenced: false,
                });
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slots[i] = slot;
                        i
                    }
                    None => {
                        self.slots.push(slot);
                        self.slots.len() - 1
                    }
                };
                self.index.insert(key, i);
                i
            }
        };
        match &mut self.slots[i] {
            Some(s) => &mut s.val,
            None => unreachable!("slot {i} is indexed, so it holds an entry (invariant)"),
        }
    }

    /// Remove the entry of `key`.
    pub fn pop(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        let s = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(s.val)
    }

    /// Remove and return the next victim: the first unreferenced entry from the hand on,
    /// clearing the referenced bits it passes (at most one full turn plus one slot).
    pub fn pop_victim(&mut self) -> Option<(K, V)> {
        if self.index.is_empty() {
            return None;
        }
        for _ in 0..=2 * self.slots.len() {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let at = self.hand;
            self.hand += 1;
            match &mut self.slots[at] {
                Some(s) if s.referenced => s.referenced = false,
                Some(_) => {
                    let s = self.slots[at].take()?;
                    self.index.remove(&s.key);
                    self.free.push(at);
                    return Some((s.key, s.val));
                }
                None => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_map_evicts_unreferenced_entries_first_and_gives_everything_back() {
        let mut m: ClockMap<u64, u64> = ClockMap::new();
        for k in 0..4 {
            *m.get_or_insert_mut(k, || k * 10) += 1;
        }
        assert_eq!(m.len(), 4);
        // 0 and 2 were read since they came in: 1 goes first, then 3.
        assert_eq!(m.get_mut(&0), Some(&mut 1));
        assert_eq!(m.get_mut(&2), Some(&mut 21));
        assert_eq!(m.peek(&3), Some(&31)); // a peek does not count as a use
        assert_eq!(m.pop_victim(), Some((1, 11)));
        assert_eq!(m.pop_victim(), Some((3, 31)));
        // Both had their second chance taken on the way: now in ring order.
        assert_eq!(m.pop_victim(), Some((0, 1)));
        // A freed slot is reused; pop removes by key.
        m.get_or_insert_mut(7, || 70);
        assert_eq!(m.pop(&2), Some(21));
        assert_eq!(m.pop(&2), None);
        assert_eq!(m.peek_mut(&7), Some(&mut 70));
        assert_eq!(m.pop_victim(), Some((7, 70)));
        assert_eq!(m.pop_victim(), None);
        assert!(m.is_empty() && m.get_mut(&7).is_none());
        assert!(
            m.slots.len() <= 4,
            "the ring grew past the most entries held"
        );
    }
    use std::borrow::Borrow;

    #[derive(Clone, Debug, PartialEq)]
    struct Off(u64);
    impl RangeValue for Off {
        fn advance(&self, n: u64) -> Self {
            Off(self.0 + n)
        }
    }

    use proptest::test_runner::TestCaseError;

    /// The replaced pieces of an insert or remove of `s..s+l`: in order, inside the range,
    /// and together exactly what the range held before, block by block.
    fn check_replaced(
        replaced: Vec<(u64, u64, Off)>,
        s: u64,
        l: u64,
        before: &[Option<u64>],
    ) -> Result<(), TestCaseError> {
        let mut reported: Vec<Option<u64>> = vec![None; l as usize];
        let mut prev_end = s;
        for (k, n, v) in replaced {
            proptest::prop_assert!(k >= prev_end && n > 0 && k + n <= s + l);
            prev_end = k + n;
            for b in k..k + n {
                reported[(b - s) as usize] = Some(v.0 + (b - k));
            }
        }
        proptest::prop_assert_eq!(reported, before);
        Ok(())
    }

    /// Runs (which must come in order, disjoint, none empty) as a per-block model of
    /// `blocks` blocks.
    fn per_block(
        runs: impl IntoIterator<Item = (u64, u64, impl Borrow<Off>)>,
        blocks: usize,
    ) -> Result<Vec<Option<u64>>, TestCaseError> {
        let mut got: Vec<Option<u64>> = vec![None; blocks];
        let mut prev_end = 0;
        for (k, l, v) in runs {
            proptest::prop_assert!(k >= prev_end && l > 0);
            prev_end = k + l;
            for b in k..k + l {
                got[b as usize] = Some(v.borrow().0 + (b - k));
            }
        }
        Ok(got)
    }

    proptest::proptest! {
        /// The range map agrees with a per-block model under any sequence of operations.
        #[test]
        fn range_map_matches_model(ops in proptest::collection::vec((0u64..64, proptest::prop_oneof![proptest::strategy::Just(1u64), proptest::strategy::Just(4), 1u64..24], proptest::bool::ANY), 1..80)) {
            let mut m = RangeMap::new();
            let mut model: Vec<Option<u64>> = vec![None; 100];
            for (i, (s, l, ins)) in ops.into_iter().enumerate() {
                let tag = (i as u64 + 1) * 1000;
                // What the range held before, as the replaced pieces must report it.
                let before: Vec<Option<u64>> = (s..s + l).map(|b| model[b as usize]).collect();
                let replaced = if ins {
                    let r = m.insert(s, l, Off(tag));
                    for b in s..s + l { model[b as usize] = Some(tag + (b - s)); }
                    r
                } else {
                    let r = m.remove(s, l);
                    for b in s..s + l { model[b as usize] = None; }
                    r
                };
                check_replaced(replaced, s, l, &before)?;
                proptest::prop_assert_eq!(&per_block(m.overlapping(0, 100), 100)?, &model);
                proptest::prop_assert_eq!(&per_block(m.iter(), 100)?, &model);
            }
        }
    }

    proptest::proptest! {
        /// The block run map agrees with a per-block model (and so with `RangeMap`) under
        /// any mix of one-block and longer inserts, whichever way it looks singles up.
        #[test]
        fn block_run_map_matches_model(ops in proptest::collection::vec((0u64..64, proptest::prop_oneof![3 => proptest::strategy::Just(1u64), 1 => 1u64..24, 1 => proptest::strategy::Just(60u64)]), 1..120)) {
            let mut m = BlockRunMap::new();
            let mut model: Vec<Option<u64>> = vec![None; 130];
            for (i, (s, l)) in ops.into_iter().enumerate() {
                let tag = (i as u64 + 1) * 1000;
                let before: Vec<Option<u64>> = (s..s + l).map(|b| model[b as usize]).collect();
                let replaced = m.insert(s, l, Off(tag));
                for b in s..s + l { model[b as usize] = Some(tag + (b - s)); }
                check_replaced(replaced, s, l, &before)?;
                // Whole range (scans the singles) and short windows (probes them).
                proptest::prop_assert_eq!(&per_block(m.overlapping(0, 130), 130)?, &model);
                for w in (0..128).step_by(5) {
                    let mut prev_end = w;
                    for (k, l, v) in m.overlapping(w, 3) {
                        proptest::prop_assert!(k >= prev_end && l > 0 && k + l <= w + 3);
                        prev_end = k + l;
                        for b in k..k + l { proptest::prop_assert_eq!(Some(v.0 + (b - k)), model[b as usize]); }
                    }
                }
                proptest::prop_assert_eq!(&per_block(m.sorted(), 130)?, &model);
                proptest::prop_assert_eq!(m.len(), m.iter_unordered().count());
            }
        }
    }

    #[test]
    fn a_cleared_block_run_map_is_empty_and_works_again() {
        let mut m = BlockRunMap::new();
        for b in 0..100u64 {
            m.insert(b * 2, 1, Off(b));
        }
        m.insert(500, 10, Off(500));
        let mut dropped = Vec::new();
        m.clear_keeping(8, |v| dropped.push(v.0));
        dropped.sort_unstable();
        assert_eq!(
            dropped,
            (0..100).chain([500]).collect::<Vec<_>>(),
            "every value handed over"
        );
        assert!(m.is_empty() && m.overlapping(0, 1000).is_empty());
        m.insert(4, 1, Off(7));
        m.insert(10, 3, Off(10));
        assert_eq!(m.len(), 2);
        assert_eq!(per_block(m.sorted(), 14).unwrap()[4], Some(7));
    }

    #[test]
    fn join_left_joins_only_continuous_runs() {
        let mut m = RangeMap::new();
        m.insert(0, 4, Off(100));
        m.insert(4, 2, Off(104));
        m.insert(7, 1, Off(107)); // a hole at 6: nothing to join onto
        m.insert(8, 2, Off(500)); // touches 7 but does not continue it
        assert!(m.join_left(4));
        assert!(!m.join_left(7));
        assert!(!m.join_left(8));
        assert!(!m.join_left(3)); // not the start of a run
        let runs: Vec<(u64, u64, u64)> = m.iter().map(|(k, l, v)| (k, l, v.0)).collect();
        assert_eq!(runs, vec![(0, 6, 100), (7, 1, 107), (8, 2, 500)]);
        // The joined run still reads block by block as before.
        let got: Vec<(u64, u64, u64)> = m
            .overlapping(3, 3)
            .into_iter()
            .map(|(k, l, v)| (k, l, v.0))
            .collect();
        assert_eq!(got, vec![(3, 3, 103)]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256m").unwrap(), 256 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
