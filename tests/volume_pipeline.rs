//! Pipelined flushes (`FLUSH_PIPELINE_DEPTH`): a newer batch uploads while an older one is
//! still uploading, but lands only after it, and only if it landed; GC keeps a batch's
//! uploaded segments while its manifest waits; a failed older batch puts the newer one back
//! too, and nothing written is lost.
//!
//! Each segment PUT is held by the store until the test lets it go (or fail), so every
//! interleaving below is forced, not timed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbds3::log::gc::{gc_pass, GcConfig, GcState};
use nbds3::log::{Geometry, Log, LogConfig, OpenMode};
use nbds3::nbd::{BlockExport, ReadChunk};
use nbds3::store::memory::MemoryStore;
use nbds3::store::{DynStore, StoreError};
use nbds3::volume::{DirtyBudget, PageCache, Volume, VolumeConfig};
use tokio::sync::oneshot;

const BS: u32 = 4096;
const SIZE: u64 = 16 << 20;

mod common;

use common::HookedPuts;

/// Segment PUTs waiting for the test, in arrival order (a sender, until released).
type Waiting = Arc<Mutex<Vec<(String, Option<oneshot::Sender<bool>>)>>>;

/// A store that holds every segment PUT until the test releases it: `true` lets it
/// through, `false` fails it.
struct HeldPuts {
    store: Arc<HookedPuts>,
    held: Waiting,
}

impl HeldPuts {
    fn new() -> Self {
        let held: Waiting = Arc::default();
        let waiting = Arc::clone(&held);
        let store = HookedPuts::new(Arc::new(MemoryStore::new()), false, move |key| {
            let rx = key.contains("/segment/").then(|| {
                let (tx, rx) = oneshot::channel();
                waiting
                    .lock()
                    .expect("held")
                    .push((key.to_string(), Some(tx)));
                rx
            });
            let key = key.to_string();
            Box::pin(async move {
                let ok = match rx {
                    Some(rx) => rx.await.unwrap_or(false),
                    None => true,
                };
                if ok {
                    Ok(())
                } else {
                    Err(StoreError::Permanent {
                        key,
                        reason: "failed by the test".into(),
                    })
                }
            })
        });
        Self {
            store: Arc::new(store),
            held,
        }
    }

    /// The store behind the hook (what a reader sees).
    fn inner(&self) -> &DynStore {
        &self.store.inner
    }

    /// Wait until `n` segment PUTs have arrived; their keys in arrival order.
    async fn wait_held(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let h = self.held.lock().expect("held");
                if h.len() >= n {
                    return h.iter().map(|(k, _)| k.clone()).collect();
                }
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} segment PUTs arrived",
                    h.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn release(&self, i: usize, ok: bool) {
        let tx = self.held.lock().expect("held")[i].1.take();
        tx.expect("released twice").send(ok).expect("PUT gone");
    }

    /// Wait until segment PUT `i` reached the inner store.
    async fn wait_stored(&self, i: usize) {
        let key = self.held.lock().expect("held")[i].0.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.inner().head(&key).await.is_err() {
            assert!(Instant::now() < deadline, "{key} never stored");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn setup() -> (Arc<HeldPuts>, Arc<Volume>) {
    let store = Arc::new(HeldPuts::new());
    let dyn_store: DynStore = store.store.clone();
    let log = Log::open(
        dyn_store,
        "p",
        Some(Geometry {
            size_bytes: SIZE,
            block_size: BS,
        }),
        LogConfig::default(),
        OpenMode::Writer,
    )
    .await
    .expect("open log");
    let cfg = VolumeConfig::default();
    let v = Volume::new(
        Arc::new(log),
        cfg.clone(),
        DirtyBudget::new(cfg.dirty_bytes_max, cfg.dirty_high_water_ratio),
        PageCache::new(cfg.cache_bytes_max),
        false,
    );
    (store, v)
}

fn block(seed: u8) -> Bytes {
    Bytes::from(
        (0..BS as usize)
            .map(|i| seed.wrapping_add(i as u8) | 1)
            .collect::<Vec<u8>>(),
    )
}

async fn read(v: &Arc<Volume>, lba: u64) -> Vec<u8> {
    let chunks: Vec<ReadChunk> = v.read(lba * BS as u64, BS).await.expect("read");
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&c.to_vec());
    }
    out
}

/// What a fresh reader of the store sees at `lba`.
async fn stored(store: &Arc<HeldPuts>, lba: u64) -> Vec<u8> {
    let r = Log::open(
        Arc::clone(store.inner()),
        "p",
        None,
        LogConfig::default(),
        OpenMode::ReadOnly,
    )
    .await
    .expect("reader");
    r.read_blocks(lba, 1).await.expect("read back")
}

fn flush(v: &Arc<Volume>) -> tokio::task::JoinHandle<Result<(), String>> {
    let v = Arc::clone(v);
    tokio::spawn(async move { Volume::flush(&v).await.map_err(|e| e.to_string()) })
}

async fn write(v: &Arc<Volume>, lba: u64, seed: u8) {
    v.write(lba * BS as u64, block(seed), false)
        .await
        .expect("write");
}

/// Blocks `(lba, seed)` as the volume reads them and, if `store` is given, as a fresh
/// reader of the store sees them.
async fn expect_blocks(v: &Arc<Volume>, store: Option<&Arc<HeldPuts>>, blocks: &[(u64, u8)]) {
    for &(lba, seed) in blocks {
        assert_eq!(
            read(v, lba).await,
            block(seed).to_vec(),
            "volume, block {lba}"
        );
        if let Some(store) = store {
            assert_eq!(
                stored(store, lba).await,
                block(seed).to_vec(),
                "store, block {lba}"
            );
        }
    }
}

type FlushTask = tokio::task::JoinHandle<Result<(), String>>;

/// Batch A (block 0 = 1, plus `a_also`) is held at its segment PUT; batch B (block 0 = 2,
/// block 8 = 3) is taken next and its segment stored. Returns both flushes and the held
/// segment keys (A's first).
async fn two_batches(
    store: &Arc<HeldPuts>,
    v: &Arc<Volume>,
    a_also: &[(u64, u8)],
) -> (FlushTask, FlushTask, Vec<String>) {
    write(v, 0, 1).await;
    for &(lba, seed) in a_also {
        write(v, lba, seed).await;
    }
    let a = flush(v);
    store.wait_held(1).await;
    write(v, 0, 2).await;
    write(v, 8, 3).await;
    let b = flush(v);
    let keys = store.wait_held(2).await;
    store.release(1, true);
    store.wait_stored(1).await;
    (a, b, keys)
}

#[tokio::test]
async fn a_newer_batch_uploads_early_but_lands_after_the_older_one() {
    let (store, v) = setup().await;
    let (a, b, keys) = two_batches(&store, &v, &[]).await;
    let version = v.log().version();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!b.is_finished(), "the newer flush waits for the older one");
    assert_eq!(
        v.log().version(),
        version,
        "no manifest landed out of order"
    );
    // GC while the newer batch's segment is uploaded and named by no manifest: kept.
    let gc = GcConfig {
        keep_versions_min: 1,
        retain_window: Duration::ZERO,
        ..GcConfig::default()
    };
    gc_pass(v.log(), &gc, &mut GcState::default())
        .await
        .expect("gc pass");
    assert!(
        store.inner().head(&keys[1]).await.is_ok(),
        "GC deleted a segment whose manifest was still to land"
    );
    // Reads see the newest data while both batches are in flight.
    expect_blocks(&v, None, &[(0, 2), (8, 3)]).await;
    store.release(0, true);
    a.await.expect("join a").expect("flush a");
    b.await.expect("join b").expect("flush b");
    expect_blocks(&v, Some(&store), &[(0, 2), (8, 3)]).await;
}

#[tokio::test]
async fn a_failed_older_batch_puts_the_newer_one_back_too() {
    let (store, v) = setup().await;
    let (a, b, _) = two_batches(&store, &v, &[(4, 4)]).await;
    store.release(0, false);
    assert!(a.await.expect("join a").is_err(), "the failed batch fails");
    assert!(
        b.await.expect("join b").is_err(),
        "the newer batch must not land without the older one"
    );
    // Both batches are dirty again, newest data on top.
    expect_blocks(&v, None, &[(0, 2), (4, 4), (8, 3)]).await;
    // The next flush commits all of it.
    let c = flush(&v);
    store.wait_held(3).await;
    store.release(2, true);
    c.await.expect("join c").expect("flush c");
    expect_blocks(&v, Some(&store), &[(0, 2), (4, 4), (8, 3)]).await;
}

#[tokio::test]
async fn a_flush_of_writes_already_in_flight_waits_for_their_batch() {
    let (store, v) = setup().await;
    write(&v, 0, 1).await;
    let a = flush(&v);
    store.wait_held(1).await;
    // Nothing new was written: this FLUSH is covered by the batch in flight and must not
    // return before it lands.
    let b = flush(&v);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!b.is_finished(), "returned before the batch landed");
    assert_eq!(store.wait_held(1).await.len(), 1, "no second batch taken");
    store.release(0, true);
    a.await.expect("join a").expect("flush a");
    b.await.expect("join b").expect("flush b");
    expect_blocks(&v, Some(&store), &[(0, 1)]).await;
}

#[tokio::test]
async fn a_flush_whose_covering_batch_failed_makes_its_own_attempt() {
    let (store, v) = setup().await;
    write(&v, 0, 1).await;
    let a = flush(&v);
    store.wait_held(1).await;
    // Covered by A's batch: waits for it.
    let b = flush(&v);
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.release(0, false);
    assert!(a.await.expect("join a").is_err(), "A's batch failed");
    // B does not inherit A's error: it takes the data put back as a batch of its own.
    store.wait_held(2).await;
    assert!(!b.is_finished(), "B returned before its own batch landed");
    store.release(1, true);
    b.await.expect("join b").expect("B's own batch lands");
    expect_blocks(&v, Some(&store), &[(0, 1)]).await;
}
