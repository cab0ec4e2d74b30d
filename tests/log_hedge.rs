//! Hedged segment PUTs (`Log::put_segment`): against a store that says twins pay, a
//! segment PUT that stalls gets an identical second PUT and the commit goes on when that
//! one lands; against one that does not, nothing is raced. Both read back exactly. And a
//! stuck PUT does not keep a commit's other segments from uploading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::memory::MemoryStore;
use nbds3::store::DynStore;

mod common;

use common::HookedPuts;

/// PUTs per key so far.
type PutCounts = Arc<Mutex<HashMap<String, u32>>>;

/// A store whose first PUT of every segment key stalls for `stall` (as a request stuck on
/// a slow connection or server node does); counts PUTs per key.
fn stall_first_segment_put(hedge: bool, stall: Duration) -> (DynStore, PutCounts) {
    let puts: PutCounts = Arc::default();
    let counts = Arc::clone(&puts);
    let store = HookedPuts::new(Arc::new(MemoryStore::new()), hedge, move |key| {
        let n = {
            let mut p = counts.lock().expect("puts");
            let n = p.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        let stalls = n == 1 && key.contains("/segment/");
        Box::pin(async move {
            if stalls {
                tokio::time::sleep(stall).await;
            }
            Ok(())
        })
    });
    (Arc::new(store), puts)
}

fn segment_puts(puts: &PutCounts) -> Vec<u32> {
    let p = puts.lock().expect("puts");
    p.iter()
        .filter(|(k, _)| k.contains("/segment/"))
        .map(|(_, n)| *n)
        .collect()
}

const BS: usize = 4096;

fn block(lba: u64, round: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (lba as usize * 31 + round as usize * 7 + i) as u8 | 1)
        .collect()
}

/// Commits `rounds` batches of 16 blocks (one segment each), each segment's first PUT
/// stalled for `stall`; returns the PUT counts, the time taken and the hedge count, after
/// checking a fresh reader sees the last round.
async fn commit_rounds(hedge: bool, stall: Duration, rounds: u64) -> (PutCounts, Duration, u64) {
    let (dyn_store, puts) = stall_first_segment_put(hedge, stall);
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
    (puts, took, hedged)
}

#[tokio::test]
async fn a_stalled_segment_put_is_raced_and_the_commit_goes_on() {
    let stall = Duration::from_secs(3);
    let (puts, took, hedged) = commit_rounds(true, stall, 3).await;
    assert_eq!(hedged, 3, "every stalled PUT got a twin");
    // No latency samples yet: each twin starts after the default delay (1 s), so three
    // commits take ~3 s where waiting out the stalls would take 9.
    assert!(took < 2 * stall, "3 commits took {took:?}");
    let puts = segment_puts(&puts);
    assert_eq!(puts.len(), 3, "one segment per commit: {puts:?}");
    assert!(
        puts.iter().all(|&n| n == 2),
        "two PUTs per segment: {puts:?}"
    );
}

#[tokio::test]
async fn without_hedging_a_stalled_put_holds_the_commit() {
    let stall = Duration::from_secs(3);
    let (puts, took, hedged) = commit_rounds(false, stall, 1).await;
    assert_eq!(hedged, 0);
    assert!(took >= stall, "the commit took {took:?}");
    assert_eq!(segment_puts(&puts), vec![1]);
}

/// A commit of many segments keeps its upload slots busy while one PUT is stuck: every
/// other segment is uploaded before the stuck one returns (an ordered upload queue would
/// stop after filling the slots once), and the segments are still committed in order.
#[tokio::test]
async fn a_stuck_segment_put_does_not_idle_the_other_upload_slots() {
    // Holds the first segment PUT until the gate opens; records the segment PUTs started.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started: Arc<Mutex<Vec<String>>> = Arc::default();
    let store = {
        let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
        HookedPuts::new(Arc::new(MemoryStore::new()), false, move |key| {
            let first = key.contains("/segment/") && {
                let mut s = started.lock().expect("started");
                s.push(key.to_string());
                s.len() == 1
            };
            let gate = Arc::clone(&gate);
            Box::pin(async move {
                if first {
                    let _ = gate.acquire().await.expect("gate");
                }
                Ok(())
            })
        })
    };
    let dyn_store: DynStore = Arc::new(store);
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
        let n = started.lock().expect("started").len();
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
    gate.add_permits(1);
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
