//! Garbage collection: delete segments, checkpoints and manifest versions that no retained
//! manifest can reach, plus orphans left by crashed or failed commits.
//!
//! Retention: the latest manifest is always kept; an older version `v` is kept while it is
//! among the last [`GcConfig::keep_versions_min`] versions, or while its successor was
//! created less than [`GcConfig::retain_window`] ago (so `v` was the export's current state
//! within the window: a reader that looked blocks up in it may still be fetching them).
//! The lowest kept version becomes the manifest's `gc_low_water`.
//!
//! Invariants (each argued where the code relies on it):
//! - Fail-closed: an object is deleted only when it is positively known to be garbage. Keys
//!   that do not parse, ids of a newer epoch than the latest manifest, ids handed out by
//!   [`Log::allocate_id`] and not yet committed, and ids of this writer's own session that
//!   may still belong to an unresolved commit attempt are all kept. Any doubt about the
//!   state (fenced, a commit outcome unknown, a manifest unreadable) skips the pass.
//! - Manifests are deleted only below a low-water mark recorded in a manifest that has
//!   landed, and never the latest one. Versions below the mark may name missing objects
//!   (that is what "below the mark" means); no reader ever chooses them, because a reader
//!   takes the highest version and a stale writer can only re-create a slot below the
//!   latest — after which its post-commit LIST sees the newer version and it reports
//!   itself fenced instead of acknowledging anything (`Log::commit`, step 3).
//! - Only the export's writer runs GC, and only while its own manifest is the latest.
//! - Own-session objects: every manifest of this process lands under the commit lock. The
//!   pass takes a *floor* (the next id to be allocated) under that lock while no landing is
//!   in flight, then lands a commit of its own. Any earlier attempt whose manifest PUT was
//!   ambiguous targeted a version slot at or below the one that commit took, so it can no
//!   longer land as the latest: its objects (ids below the floor) are garbage if no kept
//!   manifest names them. Ids at or above the floor belong to commits that may be in
//!   flight now and are kept. This is what makes GC safe to run beside the flusher.
//! - Objects are not written under the commit lock (a flush's segments, uploaded by
//!   `Log::prepare` before `Log::land`; a compaction's segments; a background checkpoint,
//!   `Log` module doc), so ids below the floor may belong to a commit still in flight: they
//!   stay pending from allocation until a landed manifest names them, and then stay
//!   protected until a pass whose manifest LIST reached that manifest's version
//!   (`recently_named`): a pass that listed manifests just before it landed and objects
//!   just after sees them unnamed. (A flush's ids skip `recently_named` when no pass is
//!   running as it lands — any later pass lists that manifest first — so it does not grow
//!   with the amount written when GC is idle.) A landing whose outcome is unknown keeps its
//!   ids pending: that manifest may still land after this pass's own commit, above it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::compact::CompactError;
use super::{Log, LogError, OpenMode};
use crate::format::{self, ExportKeys};
use crate::store::{list_all, DynStore, ObjectMeta};

/// Objects per `delete_many` call (S3's DeleteObjects limit).
const DELETE_BATCH_MAX: usize = 1000;
/// A settled export (see [`GcState::settled`]) still gets a full pass after this many
/// skipped ones, for garbage no state of ours can see appear (a fenced daemon's late
/// uploads): one pass an hour at the default `--gc-interval` of 60 s.
const SETTLED_SKIPS_MAX: u32 = 60;

/// How long things are kept. Defaults favour safety for readers over prompt reclaiming.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// Manifest versions always kept, the latest included (at least 1).
    pub keep_versions_min: u64,
    /// A version is also kept while its successor is younger than this.
    pub retain_window: Duration,
    /// Objects one pass deletes at most (the rest waits for the next pass).
    pub delete_objects_max: usize,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            keep_versions_min: 8,
            retain_window: Duration::from_secs(300),
            delete_objects_max: 10_000,
        }
    }
}

/// What one pass did (or, for a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub latest_version: u64,
    /// The `gc_low_water` recorded in the latest manifest at the end of the pass.
    pub low_water: u64,
    pub manifests_deleted: u64,
    pub checkpoints_deleted: u64,
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced objects kept because they might still be needed (in-flight, newer
    /// epoch, unparseable key, not yet settled).
    pub objects_kept_unsure: u64,
    /// Garbage left for a later pass because of `delete_objects_max`.
    pub objects_deferred: u64,
    /// The pass committed a manifest (to record the low-water mark and settle own ids).
    pub committed: bool,
    /// Set when the pass decided not to touch anything, with the reason.
    pub skipped: Option<String>,
    /// Keys deleted (or, in a dry run, that would be), at most `delete_objects_max`.
    pub deleted_keys: Vec<String>,
}

impl GcReport {
    pub fn objects_deleted(&self) -> u64 {
        self.manifests_deleted + self.checkpoints_deleted + self.segments_deleted
    }
}

/// What GC needs to know about one manifest version (manifests are immutable; the cache is
/// only consulted at or above the low-water mark, where slots are never re-created).
#[derive(Debug, Clone)]
struct ManifestInfo {
    created_unix_ms: u64,
    writer_epoch: u64,
    gc_low_water: u64,
    checkpoint: Option<u64>,
    tail: Vec<u64>,
}

/// Caches kept between passes by the background compactor (a fresh one is always correct).
#[derive(Debug, Default)]
pub struct GcState {
    manifests: HashMap<u64, Arc<ManifestInfo>>,
    /// Checkpoint id → the segment ids it references.
    checkpoints: HashMap<u64, Arc<Vec<u64>>>,
    /// The writer's (manifest version, next object seq) after a pass that found nothing to
    /// do and nothing that time alone could change: no garbage, nothing unsure or
    /// unsettled, no mark to raise, and the latest manifest older than the retention
    /// window (so no version is kept for being recent). While both numbers stay the same
    /// no commit landed and no object id was handed out, so the next pass would list the
    /// same objects and decide the same: it is skipped, saving an idle export three LISTs
    /// per `--gc-interval` (4,320 a day at the default). Skipping only ever delays deletes.
    settled: Option<(u64, u32)>,
    /// Passes skipped since the last full one (see [`SETTLED_SKIPS_MAX`]).
    settled_skips: u32,
}

/// Everything listed under one export, parsed.
struct Listing {
    /// version → object, ascending.
    manifests: Vec<(u64, ObjectMeta)>,
    checkpoints: Vec<(Option<u64>, ObjectMeta)>,
    segments: Vec<(Option<u64>, ObjectMeta)>,
    /// Keys under the manifest prefix that are not a manifest name (kept).
    manifest_strays: usize,
}

async fn list_export(store: &DynStore, keys: &ExportKeys) -> Result<Listing, CompactError> {
    let mp = keys.manifest_prefix();
    let mut manifests = Vec::new();
    let mut manifest_strays = 0;
    for o in list_all(store.as_ref(), &mp)
        .await
        .map_err(LogError::from)?
    {
        match format::parse_numbered_key(&mp, &o.key) {
            Some(v) => manifests.push((v, o)),
            None => manifest_strays += 1,
        }
    }
    manifests.sort_by_key(|(v, _)| *v);
    let numbered = |prefix: String, objs: Vec<ObjectMeta>| {
        objs.into_iter()
            .map(|o| (format::parse_numbered_key(&prefix, &o.key), o))
            .collect::<Vec<_>>()
    };
    let cp = keys.checkpoint_prefix();
    let checkpoints = numbered(
        cp.clone(),
        list_all(store.as_ref(), &cp)
            .await
            .map_err(LogError::from)?,
    );
    let sp = keys.segment_prefix();
    let segments = numbered(
        sp.clone(),
        list_all(store.as_ref(), &sp)
            .await
            .map_err(LogError::from)?,
    );
    Ok(Listing {
        manifests,
        checkpoints,
        segments,
        manifest_strays,
    })
}

impl GcState {
    async fn manifest(
        &mut self,
        store: &DynStore,
        keys: &ExportKeys,
        version: u64,
    ) -> Result<Arc<ManifestInfo>, CompactError> {
        if let Some(m) = self.manifests.get(&version) {
            return Ok(Arc::clone(m));
        }
        let m = super::read_manifest(store, keys, version).await?;
        let info = Arc::new(ManifestInfo {
            created_unix_ms: m.created_unix_ms,
            writer_epoch: m.writer_epoch,
            gc_low_water: m.gc_low_water,
            checkpoint: m.checkpoint.map(|c| c.id),
            tail: m.tail.iter().map(|s| s.id).collect(),
        });
        self.manifests.insert(version, Arc::clone(&info));
        Ok(info)
    }

    async fn checkpoint_segments(
        &mut self,
        store: &DynStore,
        keys: &ExportKeys,
        id: u64,
    ) -> Result<Arc<Vec<u64>>, CompactError> {
        if let Some(c) = self.checkpoints.get(&id) {
            return Ok(Arc::clone(c));
        }
        let key = keys.checkpoint(id);
        let body = super::get_checkpoint_body(store, &key).await?;
        let k2 = key.clone();
        let c = crate::background::run(move || format::decode_checkpoint(&body))
            .await
            .map_err(|e| CompactError::Internal(e.to_string()))?
            .map_err(|source| LogError::Format { key: k2, source })?;
        let segs = Arc::new(c.segments.iter().map(|s| s.id).collect::<Vec<u64>>());
        self.checkpoints.insert(id, Arc::clone(&segs));
        Ok(segs)
    }
}

/// Who is asking, which decides what "own" and "settled" mean.
#[derive(Debug, Clone, Copy)]
struct Viewer {
    /// The writer's epoch; `None` for a dry run, which plans as a new writer would (every
    /// existing epoch is then an older one).
    own_epoch: Option<u64>,
    /// Own-epoch ids below this are settled (see the module doc); `None`: none are.
    settled_below: Option<u64>,
}

/// The outcome of planning.
#[derive(Debug, Default)]
struct Plan {
    latest: u64,
    /// Low-water mark of the latest manifest (durable: that manifest has landed).
    durable_low_water: u64,
    /// Lowest version retention keeps as things stand.
    target_low_water: u64,
    /// Lowest version retention would keep after one more commit made now.
    target_low_water_after_commit: u64,
    /// Garbage, in deletion order: manifests (ascending), then checkpoints, then segments.
    delete: Vec<(Kind, ObjectMeta)>,
    /// Own-session objects no kept manifest names but that are not yet settled.
    own_unsettled: u64,
    kept_unsure: u64,
    /// Ids named by a kept manifest.
    reachable: HashSet<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Checkpoint,
    Segment,
}

/// The lowest version to keep, walking down from the latest (`desc` is every version at or
/// above the current low-water mark, highest first). With `commit_now`, a successor created
/// `now_ms` is assumed (the version the pass is about to commit counts as kept).
fn retained_min(
    desc: &[(u64, u64)], // (version, created_unix_ms)
    cfg: &GcConfig,
    now_ms: u64,
    commit_now: bool,
) -> u64 {
    let window_ms = u64::try_from(cfg.retain_window.as_millis()).unwrap_or(u64::MAX);
    let keep_min = cfg.keep_versions_min.max(1);
    let Some(&(latest, _)) = desc.first() else {
        return 0;
    };
    let (mut kept, mut successor_created, mut low) = if commit_now {
        (1u64, Some(now_ms), latest + 1)
    } else {
        (0u64, None, latest)
    };
    for &(v, created) in desc {
        let recent = successor_created.is_some_and(|c| c.saturating_add(window_ms) > now_ms);
        if kept >= keep_min && !recent {
            break;
        }
        kept += 1;
        low = v;
        successor_created = Some(created);
    }
    low
}

async fn make_plan(
    store: &DynStore,
    keys: &ExportKeys,
    cfg: &GcConfig,
    state: &mut GcState,
    viewer: Viewer,
    now_ms: u64,
    assume_low_water: Option<u64>,
) -> Result<Plan, CompactError> {
    let listing = list_export(store, keys).await?;
    let Some(latest) = listing.manifests.last().map(|(v, _)| *v) else {
        return Err(LogError::NoSuchExport {
            export: keys.root.clone(),
        }
        .into());
    };
    let latest_info = state.manifest(store, keys, latest).await?;
    let durable = latest_info
        .gc_low_water
        .max(assume_low_water.unwrap_or(0))
        .min(latest);
    // Forget cached versions below the mark: those slots may be re-created by a stale
    // writer, and nothing below the mark is consulted again.
    state.manifests.retain(|&v, _| v >= durable);

    let mut desc: Vec<(u64, u64)> = Vec::new();
    let mut reachable: HashSet<u64> = HashSet::new();
    let mut live_checkpoints: HashSet<u64> = HashSet::new();
    for (v, _) in listing.manifests.iter().rev() {
        let v = *v;
        if v < durable {
            break;
        }
        let info = state.manifest(store, keys, v).await?;
        if let Some(own) = viewer.own_epoch {
            if info.writer_epoch > own {
                return Err(LogError::Fenced {
                    export: keys.root.clone(),
                    epoch: own,
                    newer_epoch: info.writer_epoch,
                }
                .into());
            }
        }
        desc.push((v, info.created_unix_ms));
        reachable.extend(info.tail.iter().copied());
        if let Some(c) = info.checkpoint {
            reachable.insert(c);
            live_checkpoints.insert(c);
            let segs = state.checkpoint_segments(store, keys, c).await?;
            reachable.extend(segs.iter().copied());
        }
    }
    state
        .checkpoints
        .retain(|id, _| live_checkpoints.contains(id));

    let latest_epoch = latest_info.writer_epoch;
    let mut plan = Plan {
        latest,
        durable_low_water: durable,
        target_low_water: retained_min(&desc, cfg, now_ms, false).max(durable),
        target_low_water_after_commit: retained_min(&desc, cfg, now_ms, true).max(durable),
        ..Plan::default()
    };
    plan.kept_unsure += listing.manifest_strays as u64;
    for (v, o) in &listing.manifests {
        // Below the durable mark and never the latest (durable <= latest).
        if *v < durable {
            plan.delete.push((Kind::Manifest, o.clone()));
        }
    }
    let kinds = [
        (Kind::Checkpoint, &listing.checkpoints),
        (Kind::Segment, &listing.segments),
    ];
    for (kind, objs) in kinds {
        for (id, o) in objs.iter() {
            let Some(id) = *id else {
                plan.kept_unsure += 1;
                continue;
            };
            if reachable.contains(&id) {
                continue;
            }
            let epoch = format::epoch_of_id(id);
            let garbage = match viewer.own_epoch {
                // Dry run: as a new writer, every existing epoch is an older one.
                None => epoch <= latest_epoch,
                Some(own) if epoch < own => true,
                Some(own) if epoch == own => {
                    if viewer.settled_below.is_some_and(|floor| id < floor) {
                        true
                    } else {
                        plan.own_unsettled += 1;
                        false
                    }
                }
                // A newer epoch than ours: another writer exists. Keep.
                Some(_) => false,
            };
            if garbage {
                plan.delete.push((kind, o.clone()));
            } else {
                plan.kept_unsure += 1;
            }
        }
    }
    plan.reachable = reachable;
    Ok(plan)
}

/// Drop ids from the plan that are pending (allocated, not yet committed) in `pending`.
fn exclude_pending(plan: &mut Plan, keys: &ExportKeys, pending: &BTreeSet<u64>) {
    let cp = keys.checkpoint_prefix();
    let sp = keys.segment_prefix();
    let before = plan.delete.len();
    plan.delete.retain(|(kind, o)| {
        let id = match kind {
            Kind::Manifest => return true,
            Kind::Checkpoint => format::parse_numbered_key(&cp, &o.key),
            Kind::Segment => format::parse_numbered_key(&sp, &o.key),
        };
        !id.is_some_and(|id| pending.contains(&id))
    });
    plan.kept_unsure += (before - plan.delete.len()) as u64;
}

fn skipped(reason: impl Into<String>) -> GcReport {
    GcReport {
        skipped: Some(reason.into()),
        ..GcReport::default()
    }
}

/// Counts a GC pass in `Log::gc_passes_active` for as long as it exists.
struct ActivePass<'a>(&'a Log);

impl<'a> ActivePass<'a> {
    fn new(log: &'a Log) -> Self {
        log.gc_passes_active.fetch_add(1, Ordering::SeqCst);
        Self(log)
    }
}

impl Drop for ActivePass<'_> {
    fn drop(&mut self) {
        self.0.gc_passes_active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One GC pass as the export's writer. Safe to run while the same log serves writes and
/// while a compaction is in flight (see the module doc for why).
pub async fn gc_pass(
    log: &Log,
    cfg: &GcConfig,
    state: &mut GcState,
) -> Result<GcReport, CompactError> {
    if log.mode == OpenMode::ReadOnly {
        return Err(CompactError::ReadOnly);
    }
    let now = crate::util::unix_ms_now;
    // Counted as running before its first manifest LIST (see `Log::land`), until it ends.
    let _active = ActivePass::new(log);
    // Phase 1: plan without settling anything of our own.
    let (pending0, writer_at) = {
        let st = log.commit.lock().await;
        log.check_fenced(&st)?;
        if st.need_resync {
            state.settled = None;
            return Ok(skipped(
                "the outcome of an earlier commit is unknown; waiting for the next commit",
            ));
        }
        let at = (st.manifest.version, st.next_seq);
        // Pending ids may turn into orphans without a commit (a compaction that gives up
        // releases its ids): a full pass, then.
        if state.settled == Some(at)
            && st.pending_ids.is_empty()
            && state.settled_skips < SETTLED_SKIPS_MAX
        {
            state.settled_skips += 1;
            return Ok(skipped(
                "nothing changed since a pass that found nothing to do",
            ));
        }
        (st.pending_ids.clone(), at)
    };
    state.settled = None;
    state.settled_skips = 0;
    let viewer = Viewer {
        own_epoch: Some(log.epoch),
        settled_below: None,
    };
    let mut plan = make_plan(&log.store, &log.keys, cfg, state, viewer, now(), None).await?;
    let mut committed = false;
    if plan.target_low_water > plan.durable_low_water || plan.own_unsettled > 0 {
        // Phase 2: capture the floor while no commit is in flight, record the new mark,
        // and land a commit. Ordering: the floor must be taken before that commit starts,
        // and the commit must have landed before anything below the floor is deleted.
        let floor = {
            let mut st = log.commit.lock().await;
            log.check_fenced(&st)?;
            if st.need_resync {
                return Ok(skipped("the outcome of an earlier commit is unknown"));
            }
            let mark = plan.target_low_water_after_commit;
            if mark > st.manifest.gc_low_water {
                st.manifest.gc_low_water = mark;
            }
            format::object_id(log.epoch, st.next_seq)
        };
        log.commit(&[]).await?;
        committed = true;
        // Phase 3: plan again. The latest manifest now carries the new mark, and own ids
        // below the floor are settled.
        let viewer = Viewer {
            own_epoch: Some(log.epoch),
            settled_below: Some(floor),
        };
        plan = make_plan(&log.store, &log.keys, cfg, state, viewer, now(), None).await?;
    }
    // Decide under the commit lock: still the writer, nothing pending deleted. Ids pending
    // at the first snapshot or now are both excluded, and so are ids whose pending mark was
    // dropped because a manifest the plan did not list names them: an id allocated after
    // the first snapshot and before the floor, whose commit landed between the plan's
    // manifest LIST and its object LIST, would otherwise look like settled garbage.
    {
        let mut st = log.commit.lock().await;
        log.check_fenced(&st)?;
        if st.need_resync && !committed {
            return Ok(skipped("the outcome of an earlier commit is unknown"));
        }
        exclude_pending(&mut plan, &log.keys, &pending0);
        exclude_pending(&mut plan, &log.keys, &st.pending_ids);
        // Ids a manifest the plan did not list names (it landed after the LIST; their
        // pending mark is gone): keep. Those whose manifest the plan listed are ordinary
        // objects now.
        let latest = plan.latest;
        let unseen: BTreeSet<u64> = st
            .recently_named
            .iter()
            .filter(|(_, &v)| v > latest)
            .map(|(&id, _)| id)
            .collect();
        exclude_pending(&mut plan, &log.keys, &unseen);
        st.recently_named.retain(|_, v| *v > latest);
        // Pending ids a kept manifest names have been committed (by a commit whose caller
        // saw an error): they are ordinary objects now.
        let reachable = &plan.reachable;
        st.pending_ids.retain(|id| !reachable.contains(id));
    }
    let mut report = execute(log.store(), cfg, &plan, false).await?;
    report.committed = committed;
    let window_ms = u64::try_from(cfg.retain_window.as_millis()).unwrap_or(u64::MAX);
    let latest_old = state
        .manifests
        .get(&plan.latest)
        .is_some_and(|m| m.created_unix_ms.saturating_add(window_ms) <= now());
    if !committed
        && pending0.is_empty()
        && plan.delete.is_empty()
        && plan.kept_unsure == 0
        && plan.own_unsettled == 0
        && plan.target_low_water <= plan.durable_low_water
        && plan.latest == writer_at.0
        && latest_old
    {
        state.settled = Some(writer_at);
    }
    Ok(report)
}

/// Delete (or, with `dry_run`, only count) what the plan says, manifests first so that no
/// manifest at or above the mark ever names a missing object, even after a crash midway.
async fn execute(
    store: &DynStore,
    cfg: &GcConfig,
    plan: &Plan,
    dry_run: bool,
) -> Result<GcReport, CompactError> {
    let mut r = GcReport {
        latest_version: plan.latest,
        low_water: plan.durable_low_water,
        objects_kept_unsure: plan.kept_unsure,
        ..GcReport::default()
    };
    let take = plan.delete.len().min(cfg.delete_objects_max);
    r.objects_deferred = (plan.delete.len() - take) as u64;
    let batch = &plan.delete[..take];
    for chunk in batch.chunks(DELETE_BATCH_MAX) {
        let keys: Vec<String> = chunk.iter().map(|(_, o)| o.key.clone()).collect();
        if !dry_run {
            store.delete_many(&keys).await.map_err(LogError::from)?;
        }
        for (kind, o) in chunk {
            match kind {
                Kind::Manifest => r.manifests_deleted += 1,
                Kind::Checkpoint => r.checkpoints_deleted += 1,
                Kind::Segment => r.segments_deleted += 1,
            }
            r.bytes_deleted += o.size_bytes;
        }
        r.deleted_keys.extend(keys);
    }
    if !batch.is_empty() {
        tracing::info!(
            latest = plan.latest,
            manifests = r.manifests_deleted,
            checkpoints = r.checkpoints_deleted,
            segments = r.segments_deleted,
            bytes = r.bytes_deleted,
            low_water = plan.durable_low_water,
            dry_run,
            "gc pass"
        );
    }
    Ok(r)
}

/// Plan a pass without writing anything, as a new writer taking the export now would run
/// it (`nbds3-compact --dry-run`): every existing epoch counts as an older one, and the
/// low-water mark as if the pass had committed it.
pub async fn gc_dry_run(
    store: &DynStore,
    keys: &ExportKeys,
    cfg: &GcConfig,
) -> Result<GcReport, CompactError> {
    let mut state = GcState::default();
    let viewer = Viewer {
        own_epoch: None,
        settled_below: None,
    };
    let now = crate::util::unix_ms_now();
    let first = make_plan(store, keys, cfg, &mut state, viewer, now, None).await?;
    // The real run lands commits of its own (taking the writer role, recording the mark),
    // so plan with the mark it would reach.
    let mark = first.target_low_water_after_commit;
    let plan = make_plan(store, keys, cfg, &mut state, viewer, now, Some(mark)).await?;
    execute(store, cfg, &plan, true).await
}

/// Every object key under the export, with sizes (for reports and tests).
pub async fn list_objects(
    store: &DynStore,
    keys: &ExportKeys,
) -> Result<Vec<ObjectMeta>, CompactError> {
    Ok(list_all(store.as_ref(), &keys.root)
        .await
        .map_err(LogError::from)?)
}

/// Ids of everything the manifests at or above the latest low-water mark name, plus those
/// manifests' keys: what a fully collected export holds. Used by tests to prove that GC
/// left nothing unreachable behind.
pub async fn reachable_keys(
    store: &DynStore,
    keys: &ExportKeys,
) -> Result<BTreeSet<String>, CompactError> {
    let mut state = GcState::default();
    let listing = list_export(store, keys).await?;
    let mut out = BTreeSet::new();
    let Some(latest) = listing.manifests.last().map(|(v, _)| *v) else {
        return Ok(out);
    };
    let low = state.manifest(store, keys, latest).await?.gc_low_water;
    for (v, o) in &listing.manifests {
        if *v < low {
            continue;
        }
        out.insert(o.key.clone());
        let info = state.manifest(store, keys, *v).await?;
        for id in &info.tail {
            out.insert(keys.segment(*id));
        }
        if let Some(c) = info.checkpoint {
            out.insert(keys.checkpoint(c));
            for id in state.checkpoint_segments(store, keys, c).await?.iter() {
                out.insert(keys.segment(*id));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_walk() {
        let cfg = GcConfig {
            keep_versions_min: 2,
            retain_window: Duration::from_millis(100),
            delete_objects_max: 10,
        };
        // Versions 10..=5, created at 1000 + v*10 ms; now = 2000: all successors old.
        let desc: Vec<(u64, u64)> = (5..=10).rev().map(|v| (v, 1000 + v * 10)).collect();
        assert_eq!(retained_min(&desc, &cfg, 2000, false), 9);
        assert_eq!(retained_min(&desc, &cfg, 2000, true), 10);
        // now = 1150: successors created after 1050 are recent → v with successor >= 6.
        assert_eq!(retained_min(&desc, &cfg, 1150, false), 5);
        let one = GcConfig {
            keep_versions_min: 1,
            retain_window: Duration::ZERO,
            ..cfg
        };
        assert_eq!(retained_min(&desc, &one, 2000, false), 10);
        assert_eq!(retained_min(&desc, &one, 2000, true), 11);
    }
}
