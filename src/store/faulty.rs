//! Fault-injecting wrapper over any store, driven by a seed, for crash and robustness tests.
//!
//! What it can do (all off by default, so `FaultConfig::default()` is transparent):
//! - fail an operation before it reaches the inner store (`fail_before_prob`), or after the
//!   inner store applied it (`fail_after_prob`: the put happened, the caller sees an error);
//! - return a truncated body (`short_read_prob`) or one with a single flipped byte
//!   (`corrupt_read_prob`) as `Ok` — the layer above must catch these with lengths and
//!   checksums, which is the point;
//! - sleep up to `latency_max` before each operation;
//! - confine the random faults and the latency above to operations whose key contains a
//!   given string (`key_contains`, e.g. `"/checkpoint/"`);
//! - simulate a crash: `crash_at(i, applied)` makes operation number `i` fail (after applying
//!   it first if `applied` and it mutates), and every operation after it fail too, as if the
//!   process had died, until `heal()`. Operations already in flight when the crash happens
//!   also report failure (their effect may have landed: nobody saw the acknowledgement).
//!
//! Invariants: operations are numbered from 0 in the order they start (`op_count()`); every
//! random decision for an operation is drawn when it starts, always the same number of draws,
//! so a sequential workload replays identically from the same seed. The ops log keeps the
//! last [`OPS_LOG_MAX`] entries.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// How many recent operations `ops_log` keeps.
pub const OPS_LOG_MAX: usize = 10_000;

/// Fault probabilities (each in `0.0..=1.0`) and the seed that drives them.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    pub seed: u64,
    pub fail_before_prob: f64,
    pub fail_after_prob: f64,
    pub short_read_prob: f64,
    pub corrupt_read_prob: f64,
    pub latency_max: Duration,
    /// Random faults and latency hit only operations whose key (a list's prefix, a
    /// `delete_many`'s first key) contains this; `None`: every operation. Crash points
    /// (`crash_at`) are by operation number and ignore it.
    pub key_contains: Option<String>,
}

/// Which store operation an op-log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Put,
    Get,
    GetRange,
    Head,
    List,
    Delete,
    DeleteMany,
}

impl OpKind {
    fn mutates(self) -> bool {
        matches!(self, OpKind::Put | OpKind::Delete | OpKind::DeleteMany)
    }
}

/// One started operation: its number, kind and key (the prefix for `list`, the first key
/// and a count for `delete_many`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    pub index: u64,
    pub kind: OpKind,
    pub key: String,
}

/// Every random decision for one operation, drawn up front (see module doc).
#[derive(Debug, Clone, Copy)]
struct Plan {
    index: u64,
    /// Fail with an error before/after applying, because of a crash or a random fault.
    fail_before: bool,
    fail_after: bool,
    /// The crash point itself is this op (for the error message).
    crash_here: bool,
    short_read: bool,
    corrupt_read: bool,
    /// Random bits used to pick the truncation length or the corrupted byte.
    pick: u64,
    latency: Duration,
}

#[derive(Debug)]
struct State {
    rng: StdRng,
    next_op: u64,
    crash_point: Option<(u64, bool)>,
    crashed: bool,
    log: VecDeque<OpRecord>,
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: DynStore,
    cfg: FaultConfig,
    state: Mutex<State>,
}

impl FaultyStore {
    pub fn new(inner: DynStore, cfg: FaultConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self {
            inner,
            cfg,
            state: Mutex::new(State {
                rng,
                next_op: 0,
                crash_point: None,
                crashed: false,
                log: VecDeque::new(),
            }),
        }
    }

    /// The wrapped store (tests inspect it after a simulated crash).
    pub fn inner(&self) -> &DynStore {
        &self.inner
    }

    /// Crash at operation `op_index` (counted from 0 since creation): it fails — applied
    /// first when `applied` and it mutates — and so does every later operation until `heal`.
    /// An index that has already started never fires; a new call replaces the previous one.
    pub fn crash_at(&self, op_index: u64, applied: bool) {
        let mut st = self.lock();
        st.crash_point = Some((op_index, applied));
    }

    /// Crash immediately: every operation from now on fails until `heal`.
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// Undo a crash: later operations go through again (random faults still apply).
    pub fn heal(&self) {
        let mut st = self.lock();
        st.crash_point = None;
        st.crashed = false;
    }

    /// Whether the simulated crash has happened.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// How many operations have started.
    pub fn op_count(&self) -> u64 {
        self.lock().next_op
    }

    /// The most recent operations, oldest first (at most [`OPS_LOG_MAX`]).
    pub fn ops_log(&self) -> Vec<OpRecord> {
        self.lock().log.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // State updates are single assignments; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number the operation, log it and draw its fate.
    fn begin(&self, kind: OpKind, key: &str) -> Plan {
        let mut st = self.lock();
        let index = st.next_op;
        st.next_op += 1;
        if st.log.len() == OPS_LOG_MAX {
            st.log.pop_front();
        }
        st.log.push_back(OpRecord {
            index,
            kind,
            key: key.to_string(),
        });
        // Always the same draws in the same order, whatever the outcome (determinism).
        let cfg = &self.cfg;
        let r_before: f64 = st.rng.random();
        let r_after: f64 = st.rng.random();
        let r_short: f64 = st.rng.random();
        let r_corrupt: f64 = st.rng.random();
        let pick: u64 = st.rng.random();
        let latency_frac: f64 = st.rng.random();
        let hit = cfg.key_contains.as_deref().is_none_or(|k| key.contains(k));
        let mut plan = Plan {
            index,
            fail_before: hit && r_before < cfg.fail_before_prob,
            fail_after: hit && r_after < cfg.fail_after_prob,
            crash_here: false,
            short_read: hit && r_short < cfg.short_read_prob,
            corrupt_read: hit && r_corrupt < cfg.corrupt_read_prob,
            pick,
            latency: if hit {
                cfg.latency_max.mul_f64(latency_frac)
            } else {
                Duration::ZERO
            },
        };
        if st.crashed {
            plan.fail_before = true;
        } else if let Some((at, applied)) = st.crash_point {
            if index == at {
                st.crashed = true;
                plan.crash_here = true;
                if applied && kind.mutates() {
                    plan.fail_after = true;
                } else {
                    plan.fail_before = true;
                }
            }
        }
        plan
    }

    fn injected(&self, plan: &Plan, kind: OpKind, key: &str, stage: &str) -> StoreError {
        let why = if plan.crash_here {
            "simulated crash"
        } else if self.is_crashed() {
            "store unreachable after simulated crash"
        } else {
            "injected fault"
        };
        StoreError::Transient {
            key: key.into(),
            reason: format!("{why} ({stage}) at op {} {kind:?}", plan.index),
        }
    }

    /// Run one operation under its plan: latency, fail-before, the inner call, fail-after.
    async fn run<T, Fut>(&self, kind: OpKind, key: &str, inner: Fut) -> StoreResult<T>
    where
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let plan = self.begin(kind, key);
        if !plan.latency.is_zero() {
            tokio::time::sleep(plan.latency).await;
        }
        if plan.fail_before || (self.is_crashed() && !plan.crash_here) {
            return Err(self.injected(&plan, kind, key, "before applying"));
        }
        let result = inner.await;
        // A crash that happened meanwhile means nobody saw this result.
        if plan.fail_after || self.is_crashed() {
            return Err(self.injected(&plan, kind, key, "after applying"));
        }
        result
    }

    /// Apply short-read and corruption faults to a successful read.
    fn mangle(&self, plan_pick: u64, short: bool, corrupt: bool, body: Bytes) -> Bytes {
        if body.is_empty() {
            return body;
        }
        let mut body = body;
        if short {
            // Strictly shorter, possibly empty.
            let keep = (plan_pick % body.len() as u64) as usize;
            body = body.slice(..keep);
        }
        if corrupt && !body.is_empty() {
            let mut v = body.to_vec();
            let at = (plan_pick.rotate_left(17) % v.len() as u64) as usize;
            // Never XOR with 0: the byte must really change.
            let mask = ((plan_pick >> 8) as u8) | 1;
            v[at] ^= mask;
            body = Bytes::from(v);
        }
        body
    }

    async fn read(&self, kind: OpKind, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let plan = self.begin(kind, key);
        if !plan.latency.is_zero() {
            tokio::time::sleep(plan.latency).await;
        }
        if plan.fail_before || (self.is_crashed() && !plan.crash_here) {
            return Err(self.injected(&plan, kind, key, "before applying"));
        }
        let result = match range {
            Some(r) => self.inner.get_range(key, r).await,
            None => self.inner.get(key).await,
        };
        if plan.fail_after || self.is_crashed() {
            return Err(self.injected(&plan, kind, key, "after applying"));
        }
        result.map(|b| self.mangle(plan.pick, plan.short_read, plan.corrupt_read, b))
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        self.run(OpKind::Put, key, self.inner.put(key, data, mode))
            .await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.read(OpKind::Get, key, None).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.read(OpKind::GetRange, key, Some(range)).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.run(OpKind::Head, key, self.inner.head(key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        self.run(
            OpKind::List,
            prefix,
            self.inner.list(prefix, start_after, limit),
        )
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run(OpKind::Delete, key, self.inner.delete(key)).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let label = match keys {
            [] => String::new(),
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
        };
        self.run(OpKind::DeleteMany, &label, self.inner.delete_many(keys))
            .await
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
    fn request_cost_bytes(&self) -> u64 {
        self.inner.request_cost_bytes()
    }
    fn hedge_puts(&self) -> bool {
        self.inner.hedge_puts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn faulty(cfg: FaultConfig) -> (Arc<MemoryStore>, FaultyStore) {
        let mem = Arc::new(MemoryStore::new());
        let inner: DynStore = mem.clone();
        (mem, FaultyStore::new(inner, cfg))
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn default_config_is_transparent() {
        let (_, s) = faulty(FaultConfig::default());
        s.put("a", b("1"), PutMode::IfAbsent).await.expect("put");
        assert!(s
            .put("a", b("2"), PutMode::IfAbsent)
            .await
            .expect_err("exists")
            .is_precondition_failed());
        assert_eq!(&s.get("a").await.expect("get")[..], b"1");
        assert_eq!(s.head("a").await.expect("head").size_bytes, 1);
        assert_eq!(s.list("", None, 10).await.expect("list").objects.len(), 1);
        s.delete("a").await.expect("delete");
        assert!(s.get("a").await.expect_err("gone").is_not_found());
        assert_eq!(s.op_count(), 7);
        assert!(s.describe().starts_with("faulty("));
    }

    #[tokio::test]
    async fn crash_not_applied_fails_everything_after_until_heal() {
        let (mem, s) = faulty(FaultConfig::default());
        s.crash_at(1, false);
        s.put("a", b("1"), PutMode::Overwrite).await.expect("op 0");
        let err = s
            .put("b", b("2"), PutMode::Overwrite)
            .await
            .expect_err("op 1 crashes");
        assert!(
            matches!(err, StoreError::Transient { ref reason, .. } if reason.contains("crash"))
        );
        assert!(s.is_crashed());
        assert!(s.get("a").await.is_err(), "op 2 fails after the crash");
        assert!(s.list("", None, 10).await.is_err());
        assert_eq!(mem.snapshot().len(), 1, "crashed put was not applied");
        s.heal();
        assert_eq!(&s.get("a").await.expect("healed")[..], b"1");
        assert!(s.get("b").await.expect_err("never written").is_not_found());
    }

    #[tokio::test]
    async fn crash_applied_put_lands_but_reports_error() {
        let (mem, s) = faulty(FaultConfig::default());
        s.crash_at(0, true);
        assert!(s.put("a", b("1"), PutMode::IfAbsent).await.is_err());
        assert_eq!(mem.snapshot(), vec![("a".to_string(), 1)]);
        assert!(s.head("a").await.is_err());
        s.heal();
        assert_eq!(&s.get("a").await.expect("get")[..], b"1");
        // `applied` on a read is just a failure.
        s.crash_at(s.op_count(), true);
        assert!(s.get("a").await.is_err());
    }

    #[tokio::test]
    async fn same_seed_same_faults() {
        let cfg = FaultConfig {
            seed: 42,
            fail_before_prob: 0.2,
            fail_after_prob: 0.2,
            short_read_prob: 0.2,
            corrupt_read_prob: 0.2,
            latency_max: Duration::ZERO,
            key_contains: None,
        };
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (mem, s) = faulty(cfg.clone());
            mem.put("k", Bytes::from(vec![7u8; 100]), PutMode::Overwrite)
                .await
                .expect("seed object");
            let mut run = Vec::new();
            for i in 0..200 {
                let r = s
                    .get("k")
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| e.to_string());
                let p = s
                    .put(&format!("p{i}"), b("x"), PutMode::Overwrite)
                    .await
                    .map_err(|e| e.to_string());
                run.push((r, p));
            }
            let faults = run.iter().filter(|(r, p)| r.is_err() || p.is_err()).count();
            assert!(
                faults > 50 && faults < 200,
                "faults happen, not always: {faults}"
            );
            outcomes.push((run, mem.snapshot()));
        }
        assert_eq!(outcomes[0], outcomes[1]);
    }

    #[tokio::test]
    async fn short_and_corrupt_reads() {
        let data = Bytes::from((0..=255u8).collect::<Vec<_>>());
        let (mem, s) = faulty(FaultConfig {
            seed: 7,
            short_read_prob: 1.0,
            ..FaultConfig::default()
        });
        mem.put("k", data.clone(), PutMode::Overwrite)
            .await
            .expect("put");
        for _ in 0..20 {
            let got = s.get("k").await.expect("short read is Ok");
            assert!(got.len() < data.len());
            assert_eq!(&got[..], &data[..got.len()]);
            let got = s.get_range("k", 10..20).await.expect("short range is Ok");
            assert!(got.len() < 10);
        }
        let (mem, s) = faulty(FaultConfig {
            seed: 7,
            corrupt_read_prob: 1.0,
            ..FaultConfig::default()
        });
        mem.put("k", data.clone(), PutMode::Overwrite)
            .await
            .expect("put");
        for _ in 0..20 {
            let got = s.get("k").await.expect("corrupt read is Ok");
            assert_eq!(got.len(), data.len());
            let diff = got.iter().zip(data.iter()).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 1);
        }
    }

    #[tokio::test]
    async fn fail_after_applies_the_put() {
        let (mem, s) = faulty(FaultConfig {
            fail_after_prob: 1.0,
            ..FaultConfig::default()
        });
        assert!(s.put("a", b("1"), PutMode::Overwrite).await.is_err());
        assert_eq!(mem.snapshot().len(), 1);
        let (mem, s) = faulty(FaultConfig {
            fail_before_prob: 1.0,
            ..FaultConfig::default()
        });
        assert!(s.put("a", b("1"), PutMode::Overwrite).await.is_err());
        assert!(mem.snapshot().is_empty());
    }

    #[tokio::test]
    async fn faults_can_be_confined_to_some_keys() {
        let (mem, s) = faulty(FaultConfig {
            fail_before_prob: 1.0,
            key_contains: Some("/checkpoint/".into()),
            ..FaultConfig::default()
        });
        s.put("x/segment/1", b("1"), PutMode::IfAbsent)
            .await
            .expect("other keys pass");
        assert!(s
            .put("x/checkpoint/1", b("1"), PutMode::IfAbsent)
            .await
            .is_err());
        assert_eq!(mem.snapshot(), vec![("x/segment/1".to_string(), 1)]);
    }

    #[tokio::test]
    async fn latency_is_bounded() {
        // Real time (the crate does not enable tokio's test-util clock): 10 ops of ≤ 100 ms.
        let (_, s) = faulty(FaultConfig {
            latency_max: Duration::from_millis(100),
            ..FaultConfig::default()
        });
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            let _ = s.get("missing").await;
        }
        let spent = start.elapsed();
        assert!(spent > Duration::from_millis(10) && spent <= Duration::from_millis(3000));
    }

    #[tokio::test]
    async fn ops_log_is_bounded_and_ordered() {
        let (_, s) = faulty(FaultConfig::default());
        for i in 0..(OPS_LOG_MAX as u64 + 5) {
            let _ = s.head(&format!("k{i}")).await;
        }
        let log = s.ops_log();
        assert_eq!(log.len(), OPS_LOG_MAX);
        assert_eq!(log[0].index, 5);
        assert_eq!(log[0].key, "k5");
        assert_eq!(log[0].kind, OpKind::Head);
        assert!(log.windows(2).all(|w| w[0].index + 1 == w[1].index));
        s.delete_many(&["x".into(), "y".into()])
            .await
            .expect("delete_many");
        let last = s.ops_log().pop().expect("entry");
        assert_eq!(
            (last.kind, last.key.as_str()),
            (OpKind::DeleteMany, "x (+1 more)")
        );
    }
}
