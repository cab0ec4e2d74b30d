//! Hedged segment PUTs (`Log::put_segment`): against a store that says twins pay, a
//! segment PUT that stalls gets an identical second PUT and the commit goes on when that
//! one lands; against one that does not, nothing is raced. Both read back exactly. And a
//! stuck PUT does not keep a commit's other segments from uploading.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::memory::MemoryStore;
use nbds3::store::{DynStore, ListPage, ObjectMeta, ObjectStore, PutMode, StoreResult};

/// Makes the first PUT of every segment key stall for `stall` (as a request stuck on a
/// slow connection or server node does) and counts PUTs per key.
#[derive(Debug)]
struct StallFirstSegmentPut {
    inner: DynStore,
    hedge: bool,
    stall: Duration,
    puts: Mutex<HashMap<String, u32>>,
}

impl StallFirstSegmentPut {
    fn segment_puts(&self) -> Vec<u32> {
        let p = self.puts.lock().expect("puts");
        p.iter()
            .filter(|(k, _)| k.contains("/segment/"))
            .map(|(_, n)| *n)
            .collect()
    }
}

#[async_trait]
impl ObjectStore for StallFirstSegmentPut {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        let n = {
            let mut p = self.puts.lock().expect("puts");
            let n = p.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        if n == 1 && key.contains("/segment/") {
            tokio::time::sleep(self.stall).await;
        }
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("stall-first-segment-put({})", self.inner.describe())
    }
    fn hedge_puts(&self) -> bool {
        self.hedge
    }
}

const BS: usize = 4096;

fn block(lba: u64, round: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (lba as usize * 31 + round as usize * 7 + i) as u8 | 1)
        .collect()
}

/// Commits `rounds` batches of 16 blocks (one segment each), each segment's first PUT
/// stalled for `stall`; returns the store, the time taken and the hedge count, after
/// checking a fresh reader sees the last round.
async fn commit_rounds(
    hedge: bool,
    stall: Duration,
    rounds: u64,
) -> (Arc<StallFirstSegmentPut>, Duration, u64) {
    let store = Arc::new(StallFirstSegmentPut {
        inner: Arc::new(MemoryStore::new()),
        hedge,
        stall,
        puts: Mutex::new(HashMap::new()),
    });
    let dyn_store: DynStore = store.clone();
    let g = Geometry {
        size_bytes: 1 << 20,
        block_size: BS as u32,
    };
    let log = Log::open(
        Arc::clone(&dyn_store),
        "h",
        Some(g),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await
    .expect("create");
    let start = Instant::now();
    for round in 0..rounds {
        let mut v = Vec::with_capacity(16 * BS);
        for lba in 0..16 {
            v.extend_from_slice(&block(lba, round));
        }
        log.commit(&[BatchEntry {
            lba: 0,
            blocks: 16,
            update: Update::Data(Bytes::from(v)),
        }])
        .await
        .expect("commit");
    }
    let took = start.elapsed();
    let hedged = log
        .stats
        .segment_puts_hedged
        .load(std::sync::atomic::Ordering::Relaxed);
    let reader = Log::open(
        dyn_store,
        "h",
        None,
        LogConfig::default(),
        OpenMode::ReadOnly,
    )
    .await
    .expect("reopen");
    let got = reader.read_blocks(0, 16).await.expect("read back");
    for lba in 0..16u64 {
        let b = lba as usize * BS;
        assert!(
            got[b..b + BS] == block(lba, rounds - 1)[..],
            "block {lba} after {rounds} rounds"
        );
    }
    (store, took, hedged)
}

#[tokio::test]
async fn a_stalled_segment_put_is_raced_and_the_commit_goes_on() {
    let stall = Duration::from_secs(3);
    let (store, took, hedged) = commit_rounds(true, stall, 3).await;
    assert_eq!(hedged, 3, "every stalled PUT got a twin");
    // No latency samples yet: each twin starts after the default delay (1 s), so three
    // commits take ~3 s where waiting out the stalls would take 9.
    assert!(took < 2 * stall, "3 commits took {took:?}");
    let puts = store.segment_puts();
    assert_eq!(puts.len(), 3, "one segment per commit: {puts:?}");
    assert!(
        puts.iter().all(|&n| n == 2),
        "two PUTs per segment: {puts:?}"
    );
}

#[tokio::test]
async fn without_hedging_a_stalled_put_holds_the_commit() {
    let stall = Duration::from_secs(3);
    let (store, took, hedged) = commit_rounds(false, stall, 1).await;
    assert_eq!(hedged, 0);
    assert!(took >= stall, "the commit took {took:?}");
    assert_eq!(store.segment_puts(), vec![1]);
}

/// Holds the first segment PUT until the test opens the gate, and counts the segment PUTs
/// that have started.
#[derive(Debug)]
struct GateFirstSegmentPut {
    inner: DynStore,
    gate: tokio::sync::Semaphore,
    started: Mutex<Vec<String>>,
}

#[async_trait]
impl ObjectStore for GateFirstSegmentPut {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        if key.contains("/segment/") {
            let first = {
                let mut s = self.started.lock().expect("started");
                s.push(key.to_string());
                s.len() == 1
            };
            if first {
                let _ = self.gate.acquire().await.expect("gate");
            }
        }
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("gate-first-segment-put({})", self.inner.describe())
    }
}

/// A commit of many segments keeps its upload slots busy while one PUT is stuck: every
/// other segment is uploaded before the stuck one returns (an ordered upload queue would
/// stop after filling the slots once), and the segments are still committed in order.
#[tokio::test]
async fn a_stuck_segment_put_does_not_idle_the_other_upload_slots() {
    let store = Arc::new(GateFirstSegmentPut {
        inner: Arc::new(MemoryStore::new()),
        gate: tokio::sync::Semaphore::new(0),
        started: Mutex::new(Vec::new()),
    });
    let dyn_store: DynStore = store.clone();
    let g = Geometry {
        size_bytes: 1 << 20,
        block_size: BS as u32,
    };
    // 4 blocks per segment, 2 uploads at a time: 24 blocks make 6 segments.
    let cfg = LogConfig {
        segment_bytes_max: 4 * BS,
        uploads_in_flight_max: 2,
        ..LogConfig::default()
    };
    let log = Arc::new(
        Log::open(
            Arc::clone(&dyn_store),
            "u",
            Some(g),
            cfg.clone(),
            OpenMode::Writer,
        )
        .await
        .expect("create"),
    );
    let mut v = Vec::with_capacity(24 * BS);
    for lba in 0..24 {
        v.extend_from_slice(&block(lba, 1));
    }
    let commit = tokio::spawn({
        let log = Arc::clone(&log);
        async move {
            log.commit(&[BatchEntry {
                lba: 0,
                blocks: 24,
                update: Update::Data(Bytes::from(v)),
            }])
            .await
        }
    });
    // All six PUTs start while the first is held (the deadline only turns a hang into a
    // failure).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = store.started.lock().expect("started").len();
        if n == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of 6 segment PUTs started while the first one was stuck"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !commit.is_finished(),
        "the commit waits for its stuck segment"
    );
    store.gate.add_permits(1);
    commit.await.expect("join").expect("commit");
    let reader = Log::open(dyn_store, "u", None, cfg, OpenMode::ReadOnly)
        .await
        .expect("reopen");
    assert_eq!(reader.manifest().await.tail.len(), 6);
    let got = reader.read_blocks(0, 24).await.expect("read back");
    for lba in 0..24u64 {
        let b = lba as usize * BS;
        assert!(got[b..b + BS] == block(lba, 1)[..], "block {lba}");
    }
    let tail: Vec<u64> = reader.manifest().await.tail.iter().map(|s| s.id).collect();
    let mut sorted = tail.clone();
    sorted.sort_unstable();
    assert_eq!(tail, sorted, "segments named in id (commit) order");
}
