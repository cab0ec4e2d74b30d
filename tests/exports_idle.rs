//! The daemon's export registry closes exports no connection uses: after
//! `ExportsConfig::idle_close` without a user an export is flushed and closed (flusher,
//! lease, compactor and index go) and the next client opens it afresh with everything
//! there; an export in use is never closed; a close whose flush fails keeps the export
//! open with its data and tries again later; opens racing closes lose nothing. At
//! `ExportsConfig::exports_max`, opening another export closes the one unused the longest,
//! or is refused while all are in use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbds3::format::ExportKeys;
use nbds3::log::compact::CompactConfig;
use nbds3::log::{Geometry, LogConfig};
use nbds3::nbd::{BlockExport, ExportProvider, ReadChunk};
use nbds3::store::faulty::{FaultConfig, FaultyStore};
use nbds3::store::memory::MemoryStore;
use nbds3::store::DynStore;
use nbds3::volume::{Exports, ExportsConfig, VolumeConfig};

const BS: usize = 4096;

fn exports(store: &DynStore, idle: Duration) -> Arc<Exports> {
    exports_with(store, Some(idle), None)
}

fn exports_with(store: &DynStore, idle: Option<Duration>, max: Option<usize>) -> Arc<Exports> {
    let e = Exports::new(
        Arc::clone(store),
        ExportsConfig {
            default_geometry: Geometry {
                size_bytes: 16 << 20,
                block_size: BS as u32,
            },
            log: LogConfig::default(),
            volume: VolumeConfig {
                cache_bytes_max: 4 << 20,
                dirty_bytes_max: 8 << 20,
                // Writes stay dirty until a FLUSH or the idle close.
                flush_interval: Duration::from_secs(600),
                ..VolumeConfig::default()
            },
            read_only: false,
            compact: Some(CompactConfig::default()),
            idle_close: idle,
            exports_max: max,
        },
    );
    e.start_idle_closer();
    e
}

fn block(v: u8) -> Bytes {
    Bytes::from(vec![v; BS])
}

async fn read_block(e: &Arc<dyn BlockExport>, lba: u64) -> Vec<u8> {
    let chunks: Vec<ReadChunk> = e.read(lba * BS as u64, BS as u32).await.unwrap();
    chunks.iter().flat_map(|c| c.to_vec()).collect()
}

/// Block `lba` holds `v` in every byte (a short message instead of 4 KiB of diff).
async fn assert_block(e: &Arc<dyn BlockExport>, lba: u64, v: u8, what: &str) {
    let got = read_block(e, lba).await;
    let wrong = got.iter().filter(|&&b| b != v).count();
    assert_eq!(
        wrong, 0,
        "block {lba} {what}: {wrong} bytes differ from {v:#x}, first {:#x}",
        got[0]
    );
}

async fn wait_closed(e: &Exports, name: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !e.open_names().await.iter().any(|n| n == name) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_export_is_flushed_and_closed_and_reopens_with_its_data() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let idle = Duration::from_millis(200);
    let e = exports(&store, idle);
    let lease = ExportKeys::new("a").unwrap().lease();

    let a = e.open("a").await.unwrap();
    a.write(0, block(0x5a), false).await.unwrap();
    // In use: never closed, however long it sits.
    tokio::time::sleep(idle * 4).await;
    assert_eq!(e.open_names().await, vec!["a".to_string()]);
    assert!(store.get(&lease).await.is_ok(), "no lease while served");

    // The last user leaves: closed after the idle period, its unflushed write durable,
    // its lease gone.
    drop(a);
    e.release("a").await;
    assert!(wait_closed(&e, "a", Duration::from_secs(5)).await);
    assert!(store.get(&lease).await.is_err(), "lease left behind");
    let fresh = exports(&store, idle);
    let a = fresh.open("a").await.unwrap();
    assert_block(&a, 0, 0x5a, "").await;
    fresh.release("a").await;

    // The first registry opens it again on demand (a new writer epoch): all there.
    let a = e.open("a").await.unwrap();
    assert_block(&a, 0, 0x5a, "").await;
    e.release("a").await;
    e.close_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_whose_flush_fails_keeps_the_export_and_its_data() {
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultConfig::default(),
    ));
    let store: DynStore = faulty.clone();
    let idle = Duration::from_millis(100);
    let e = exports(&store, idle);
    let b = e.open("b").await.unwrap();
    b.write(8 * BS as u64, block(0xc3), false).await.unwrap();
    faulty.crash_now();
    drop(b);
    e.release("b").await;
    // Several idle periods with the store down: the export stays, dirty data and all.
    tokio::time::sleep(idle * 8).await;
    assert_eq!(e.open_names().await, vec!["b".to_string()]);
    let b = e.open("b").await.unwrap();
    assert_block(&b, 8, 0xc3, "").await;
    drop(b);
    e.release("b").await;
    // The store is back: the next attempt closes it, durably.
    faulty.heal();
    assert!(wait_closed(&e, "b", Duration::from_secs(10)).await);
    let fresh = exports(faulty.inner(), idle);
    let b = fresh.open("b").await.unwrap();
    assert_block(&b, 8, 0xc3, "").await;
    fresh.release("b").await;
    e.close_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opens_racing_idle_closes_lose_no_write() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let e = exports(&store, Duration::from_millis(5));
    // Each round: open, write its own block (unflushed), leave; the closer closes in
    // between or while the next open waits for it.
    for i in 0..150u64 {
        let c = e.open("r").await.unwrap();
        c.write(i * BS as u64, block((i % 250) as u8 | 1), false)
            .await
            .unwrap();
        drop(c);
        e.release("r").await;
        tokio::time::sleep(Duration::from_millis(i % 12)).await;
    }
    let c = e.open("r").await.unwrap();
    for i in 0..150u64 {
        assert_block(&c, i, (i % 250) as u8 | 1, "").await;
    }
    e.release("r").await;
    e.close_all().await.unwrap();
    // And from the store alone.
    let fresh = exports(&store, Duration::from_secs(60));
    let c = fresh.open("r").await.unwrap();
    for i in 0..150u64 {
        assert_block(&c, i, (i % 250) as u8 | 1, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_an_idle_close_in_progress() {
    // The store is slow, so the idle close's flush is still running when the shutdown
    // starts; the shutdown must not return before that flush landed.
    let slow = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultConfig {
            latency_max: Duration::from_millis(60),
            ..FaultConfig::default()
        },
    ));
    let store: DynStore = slow.clone();
    let e = exports(&store, Duration::from_millis(20));
    let s = e.open("s").await.unwrap();
    for i in 0..64u64 {
        s.write(i * BS as u64, block(0x77), false).await.unwrap();
    }
    drop(s);
    e.release("s").await;
    // The close has begun; its flush takes a few slow store requests more.
    let end = Instant::now() + Duration::from_secs(5);
    while !e.is_closing("s") {
        assert!(Instant::now() < end, "never closed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    e.close_all().await.unwrap();
    let fresh = exports(slow.inner(), Duration::from_secs(60));
    let s = fresh.open("s").await.unwrap();
    for i in [0u64, 63] {
        assert_block(&s, i, 0x77, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_bound_the_longest_unused_export_makes_room() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let e = exports_with(&store, None, Some(2));
    let a = e.open("a").await.unwrap();
    a.write(0, block(0xa1), false).await.unwrap();
    let b = e.open("b").await.unwrap();
    b.write(0, block(0xb2), false).await.unwrap();
    drop(b);
    e.release("b").await;
    // Full: "b" is unused, so opening "c" closes it first (flushing its write).
    let c = e.open("c").await.unwrap();
    assert_eq!(e.open_names().await, vec!["a".to_string(), "c".to_string()]);
    // Both open exports in use: a fourth is refused, with the reason, and nothing closes.
    let err = match e.open("d").await {
        Ok(_) => panic!("a third export opened past --exports-max 2"),
        Err(err) => err,
    };
    assert!(err.message.contains("--exports-max"), "{err:?}");
    assert_eq!(e.open_names().await, vec!["a".to_string(), "c".to_string()]);
    // "a" is left: now "d" opens, and "a"'s unflushed write was made durable on the way.
    drop(a);
    e.release("a").await;
    let d = e.open("d").await.unwrap();
    assert_eq!(e.open_names().await, vec!["c".to_string(), "d".to_string()]);
    drop((c, d));
    let fresh = exports_with(&store, None, None);
    for (name, v) in [("a", 0xa1u8), ("b", 0xb2)] {
        let x = fresh.open(name).await.unwrap();
        assert_block(&x, 0, v, name).await;
    }
}
