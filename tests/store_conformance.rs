//! One conformance suite for every `ObjectStore` backend: the contract written on the trait
//! in `src/store.rs`, checked the same way against memory, file, a fault-free FaultyStore,
//! and S3 (SeaweedFS and moto, from `tools/test-env.sh`; see `tests/common/mod.rs` for how
//! missing S3 servers skip or, with `NBDS3_REQUIRE_S3=1`, fail).
//!
//! Each case is an `async fn(DynStore)` in `cases`; the `suite!` macro instantiates every case
//! for every backend as `<backend>::<case>`, so `cargo test --test store_conformance moto::`
//! runs one backend and `cargo test --test store_conformance racing` one case everywhere.
//! Every test gets a fresh store (a new temp dir, or a new random S3 prefix).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use nbds3::store::faulty::{FaultConfig, FaultyStore};
use nbds3::store::memory::MemoryStore;
use nbds3::store::s3::{S3Options, S3Store};
use nbds3::store::{open_url, DynStore, ObjectStore, PutMode, StoreError};

use common::S3Kind;

/// A store under test plus whatever must outlive it.
struct Backend {
    store: DynStore,
    _dir: Option<tempfile::TempDir>,
    /// S3 prefixes are removed after the test so a long-lived bucket stays clean.
    cleanup: bool,
    /// How the backend orders `list` results (SeaweedFS deviates, see `KeyOrder`).
    order: cases::KeyOrder,
}

impl Backend {
    async fn finish(self) {
        if self.cleanup {
            common::remove_all(self.store.as_ref()).await;
        }
    }
}

async fn memory(_test: &str) -> Option<Backend> {
    let store = open_url("memory://", &S3Options::default())
        .await
        .expect("memory store");
    Some(Backend {
        store,
        _dir: None,
        cleanup: false,
        order: cases::KeyOrder::Bytes,
    })
}

async fn file(_test: &str) -> Option<Backend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let store = open_url(&url, &S3Options::default())
        .await
        .expect("file store");
    Some(Backend {
        store,
        _dir: Some(dir),
        cleanup: false,
        order: cases::KeyOrder::Bytes,
    })
}

async fn faulty_memory(_test: &str) -> Option<Backend> {
    let inner: DynStore = Arc::new(MemoryStore::new());
    Some(Backend {
        store: Arc::new(FaultyStore::new(inner, FaultConfig::default())),
        _dir: None,
        cleanup: false,
        order: cases::KeyOrder::Bytes,
    })
}

async fn seaweedfs(test: &str) -> Option<Backend> {
    let store = common::s3_test_store(S3Kind::SeaweedFs, test).await?;
    Some(Backend {
        store,
        _dir: None,
        cleanup: true,
        // Observed with SeaweedFS 4.48: its filer lists in component order, not byte order.
        order: cases::KeyOrder::Components,
    })
}

async fn moto(test: &str) -> Option<Backend> {
    let store = common::s3_test_store(S3Kind::Moto, test).await?;
    Some(Backend {
        store,
        _dir: None,
        cleanup: true,
        order: cases::KeyOrder::Bytes,
    })
}

macro_rules! for_backend {
    ($backend:ident; $($case:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(b) = super::$backend(stringify!($case)).await else {
                        return;
                    };
                    super::cases::$case(b.store.clone(), b.order).await;
                    b.finish().await;
                }
            )*
        }
    };
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        for_backend!(memory; $($case),*);
        for_backend!(file; $($case),*);
        for_backend!(faulty_memory; $($case),*);
        for_backend!(seaweedfs; $($case),*);
        for_backend!(moto; $($case),*);
    };
}

suite!(
    put_get_round_trip,
    unusual_key_characters,
    empty_object,
    large_object,
    overwrite_replaces,
    if_absent_refuses_existing,
    racing_if_absent_one_winner,
    get_range_bounds,
    head_reports_size,
    list_order_prefix_and_pagination,
    delete_is_idempotent,
    delete_many_across_batches,
    invalid_keys_rejected,
    probe_if_absent_holds,
);

mod cases {
    use std::ops::Range;

    use bytes::Bytes;
    use futures::stream::{self, StreamExt, TryStreamExt};
    use nbds3::store::{
        list_all, probe_if_absent, DynStore, ListPage, PutMode, StoreError, KEY_BYTES_MAX,
    };

    /// The order a backend's `list` returns keys in.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum KeyOrder {
        /// Ascending bytes, as the store contract says (AWS, moto, memory, file).
        Bytes,
        /// Ascending lists of `/`-separated components, i.e. `/` sorts below every byte:
        /// `a/x` before `a-b`. SeaweedFS does this; asserted so a change shows up.
        Components,
    }

    impl KeyOrder {
        fn cmp(self, a: &str, b: &str) -> std::cmp::Ordering {
            match self {
                KeyOrder::Bytes => a.cmp(b),
                KeyOrder::Components => a.split('/').cmp(b.split('/')),
            }
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// Deterministic non-repeating-looking bytes (a bad offset shows up as a mismatch).
    fn pattern(len: usize, seed: u32) -> Bytes {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    fn keys(page: &ListPage) -> Vec<&str> {
        page.objects.iter().map(|o| o.key.as_str()).collect()
    }

    fn assert_invalid_range(r: Result<Bytes, StoreError>, range: Range<u64>, size: u64) {
        match r {
            Err(StoreError::InvalidRange {
                start,
                end,
                size_bytes,
                ..
            }) => {
                assert_eq!((start, end), (range.start, range.end));
                assert_eq!(size_bytes, size, "size in InvalidRange for {range:?}");
            }
            other => panic!(
                "range {range:?} on a {size}-byte object: expected InvalidRange, got {other:?}"
            ),
        }
    }

    pub async fn put_get_round_trip(s: DynStore, _order: KeyOrder) {
        s.put("obj/one", b("hello"), PutMode::Overwrite)
            .await
            .expect("put");
        assert_eq!(&s.get("obj/one").await.expect("get")[..], b"hello");
        s.put("two", b("world"), PutMode::IfAbsent)
            .await
            .expect("put IfAbsent new key");
        assert_eq!(&s.get("two").await.expect("get")[..], b"world");
        assert!(s
            .get("obj/missing")
            .await
            .expect_err("missing")
            .is_not_found());
        assert!(s.get("missing").await.expect_err("missing").is_not_found());
        assert!(!s.describe().is_empty());
    }

    pub async fn unusual_key_characters(s: DynStore, _order: KeyOrder) {
        let names = [
            "k/sp ace",
            "k/uni-\u{fc}\u{20ac}\u{1f600}",
            "k/plus+percent%3F?hash#amp&eq=",
            "k/tilde~star*quote'paren()",
            "k/.hidden",
            "k/...",
            &format!("k/{}", "n".repeat(200)),
        ];
        for (i, k) in names.iter().enumerate() {
            s.put(k, pattern(10 + i, i as u32), PutMode::IfAbsent)
                .await
                .unwrap_or_else(|e| panic!("put {k:?}: {e}"));
        }
        for (i, k) in names.iter().enumerate() {
            assert_eq!(
                s.get(k).await.expect("get"),
                pattern(10 + i, i as u32),
                "{k:?}"
            );
            assert_eq!(s.head(k).await.expect("head").size_bytes, 10 + i as u64);
        }
        let mut want: Vec<&str> = names.to_vec();
        want.sort_unstable();
        let listed = list_all(s.as_ref(), "k/").await.expect("list");
        let got: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(got, want);
    }

    pub async fn empty_object(s: DynStore, _order: KeyOrder) {
        s.put("empty", Bytes::new(), PutMode::IfAbsent)
            .await
            .expect("put empty");
        assert!(s.get("empty").await.expect("get").is_empty());
        assert_eq!(s.head("empty").await.expect("head").size_bytes, 0);
        assert_invalid_range(s.get_range("empty", 0..1).await, 0..1, 0);
        let page = s.list("", None, 10).await.expect("list");
        assert_eq!(keys(&page), vec!["empty"]);
        assert_eq!(page.objects[0].size_bytes, 0);
        assert!(s
            .put("empty", Bytes::new(), PutMode::IfAbsent)
            .await
            .expect_err("exists")
            .is_precondition_failed());
    }

    pub async fn large_object(s: DynStore, _order: KeyOrder) {
        const LEN: usize = 8 << 20;
        let data = pattern(LEN, 99);
        s.put("big/obj", data.clone(), PutMode::IfAbsent)
            .await
            .expect("put 8 MiB");
        assert_eq!(
            s.head("big/obj").await.expect("head").size_bytes,
            LEN as u64
        );
        let got = s.get("big/obj").await.expect("get 8 MiB");
        assert_eq!(got.len(), LEN);
        assert!(got == data, "8 MiB body differs");
        let mid = (LEN / 2) as u64;
        let r = mid - 3..mid + 4096;
        assert_eq!(
            s.get_range("big/obj", r.clone()).await.expect("range"),
            data.slice(r.start as usize..r.end as usize)
        );
        let last = LEN as u64 - 1..LEN as u64;
        assert_eq!(
            &s.get_range("big/obj", last).await.expect("last byte")[..],
            &data[LEN - 1..]
        );
    }

    pub async fn overwrite_replaces(s: DynStore, _order: KeyOrder) {
        s.put("ow", b("first version"), PutMode::Overwrite)
            .await
            .expect("create via Overwrite");
        s.put("ow", b("second"), PutMode::Overwrite)
            .await
            .expect("overwrite");
        assert_eq!(&s.get("ow").await.expect("get")[..], b"second");
        assert_eq!(s.head("ow").await.expect("head").size_bytes, 6);
        s.put("ow", Bytes::new(), PutMode::Overwrite)
            .await
            .expect("overwrite with empty");
        assert!(s.get("ow").await.expect("get").is_empty());
        let listed = list_all(s.as_ref(), "").await.expect("list");
        assert_eq!(listed.len(), 1, "overwrite must not duplicate the key");
    }

    pub async fn if_absent_refuses_existing(s: DynStore, _order: KeyOrder) {
        s.put("ia", b("original"), PutMode::IfAbsent)
            .await
            .expect("first");
        let err = s
            .put("ia", b("intruder"), PutMode::IfAbsent)
            .await
            .expect_err("second IfAbsent must fail");
        assert!(err.is_precondition_failed(), "{err:?}");
        assert_eq!(&s.get("ia").await.expect("get")[..], b"original");
        // After a delete the slot is free again (GC must guard against exactly this).
        s.delete("ia").await.expect("delete");
        s.put("ia", b("reborn"), PutMode::IfAbsent)
            .await
            .expect("IfAbsent after delete");
        assert_eq!(&s.get("ia").await.expect("get")[..], b"reborn");
    }

    pub async fn racing_if_absent_one_winner(s: DynStore, _order: KeyOrder) {
        const RACERS: usize = 16;
        for round in 0..4 {
            let key = format!("race/{round}");
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(RACERS));
            let tasks: Vec<_> = (0..RACERS)
                .map(|i| {
                    let s = s.clone();
                    let key = key.clone();
                    let barrier = barrier.clone();
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let r = s
                            .put(&key, b(&format!("writer {i}")), PutMode::IfAbsent)
                            .await;
                        (i, r)
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tasks {
                let (i, r) = t.await.expect("task");
                match r {
                    Ok(()) => winners.push(i),
                    Err(e) if e.is_precondition_failed() => {}
                    Err(e) => panic!("racer {i} on {key}: unexpected error {e:?}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let body = s.get(&key).await.expect("get");
            assert_eq!(&body[..], format!("writer {}", winners[0]).as_bytes());
        }
    }

    pub async fn get_range_bounds(s: DynStore, _order: KeyOrder) {
        let data = pattern(100, 5);
        s.put("r", data.clone(), PutMode::IfAbsent)
            .await
            .expect("put");
        for r in [0..1u64, 99..100, 0..100, 10..20, 50..99] {
            let got = s.get_range("r", r.clone()).await.expect("in-bounds range");
            assert_eq!(got, data.slice(r.start as usize..r.end as usize), "{r:?}");
        }
        #[allow(clippy::reversed_empty_ranges)]
        for r in [99..101u64, 100..101, 150..200, 0..101, 5..5, 6..5] {
            assert_invalid_range(s.get_range("r", r.clone()).await, r, 100);
        }
        for r in [0..1u64, 5..5] {
            let err = s.get_range("nope", r).await.expect_err("missing");
            assert!(err.is_not_found(), "{err:?}");
        }
    }

    pub async fn head_reports_size(s: DynStore, _order: KeyOrder) {
        s.put("h/a", pattern(1234, 1), PutMode::Overwrite)
            .await
            .expect("put");
        let meta = s.head("h/a").await.expect("head");
        assert_eq!((meta.key.as_str(), meta.size_bytes), ("h/a", 1234));
        assert!(s.head("h/b").await.expect_err("missing").is_not_found());
        assert!(s
            .head("h")
            .await
            .expect_err("a prefix is not an object")
            .is_not_found());
    }

    pub async fn list_order_prefix_and_pagination(s: DynStore, order: KeyOrder) {
        // Byte order differs from directory order: '-' (0x2d) < '/' (0x2f) < '0' (0x30).
        let all = [
            "l/a/b", "l/a-b", "l/a/c", "l/a0", "l/a/d/e", "l/b", "m/x", "lz",
        ];
        stream::iter(all)
            .map(|k| {
                let s = s.clone();
                async move { s.put(k, b(k), PutMode::IfAbsent).await }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await
            .expect("puts");
        // What a backend listing in `order` must return for a prefix and cursor.
        let expect = |prefix: &str, after: Option<&str>| -> Vec<String> {
            // A cursor below the prefix (in bytes) excludes nothing, whatever the order: the
            // S3 backend does not even send it.
            let after = after.filter(|a| *a >= prefix);
            let mut v: Vec<String> = all
                .iter()
                .filter(|k| k.starts_with(prefix))
                .filter(|k| after.is_none_or(|a| order.cmp(k, a).is_gt()))
                .map(|k| k.to_string())
                .collect();
            v.sort_by(|a, b| order.cmp(a, b));
            v
        };
        let sorted = expect("l/", None);
        if order == KeyOrder::Bytes {
            assert_eq!(
                sorted,
                ["l/a-b", "l/a/b", "l/a/c", "l/a/d/e", "l/a0", "l/b"],
                "test's own expectation"
            );
        }

        // Pages of 2 under "l/": cursor is the last key, the final page has no `next`.
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list("l/", after.as_deref(), 2).await.expect("page");
            assert!(page.objects.len() <= 2);
            pages.push(
                keys(&page)
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>(),
            );
            match page.next {
                Some(ref n) => {
                    assert_eq!(Some(n.as_str()), keys(&page).last().copied());
                    after = page.next.clone();
                }
                None => break,
            }
            assert!(pages.len() < 10, "pagination does not terminate");
        }
        let want_pages: Vec<Vec<String>> = sorted.chunks(2).map(|c| c.to_vec()).collect();
        assert_eq!(pages, want_pages);

        let list = |prefix: &'static str, after: Option<&'static str>| {
            let s = s.clone();
            async move {
                let page = s.list(prefix, after, 1000).await.expect("list");
                assert!(page.next.is_none());
                for o in &page.objects {
                    assert_eq!(o.size_bytes, o.key.len() as u64, "size of {}", o.key);
                }
                page.objects.into_iter().map(|o| o.key).collect::<Vec<_>>()
            }
        };
        let cases: &[(&str, Option<&str>)] = &[
            ("l/", None),
            ("l/a", None),
            ("l/a/", None),
            ("l/a/d", None),
            ("l/a/d/e", None),
            ("l/zzz", None),
            ("q/", None),
            ("l", None),
            ("", None),
            // start_after need not be a key; one below the prefix means from the start.
            ("l/", Some("l/a/bb")),
            ("l/", Some("a")),
            ("l/", Some("l/a-b")),
            ("l/", Some("l/a/d/e")),
            ("l/", Some("l/b")),
            ("l/", Some("m")),
            ("l/a/", Some("l/a-b")),
            ("", Some("l/b")),
        ];
        for &(prefix, after) in cases {
            assert_eq!(
                list(prefix, after).await,
                expect(prefix, after),
                "prefix {prefix:?} start_after {after:?}"
            );
        }
        assert_eq!(list("l/a/", None).await, ["l/a/b", "l/a/c", "l/a/d/e"]);
        assert!(list("l/zzz", None).await.is_empty());

        // limit is clamped to at least 1.
        let page = s.list("l/", None, 0).await.expect("limit 0");
        assert_eq!(keys(&page), vec![sorted[0].as_str()]);
        assert_eq!(page.next.as_deref(), Some(sorted[0].as_str()));

        let everything = list_all(s.as_ref(), "").await.expect("list_all");
        assert_eq!(everything.len(), all.len());
    }

    pub async fn delete_is_idempotent(s: DynStore, _order: KeyOrder) {
        s.delete("d/never").await.expect("delete missing");
        s.put("d/k", b("x"), PutMode::IfAbsent).await.expect("put");
        s.put("d/other", b("y"), PutMode::IfAbsent)
            .await
            .expect("put");
        s.delete("d/k").await.expect("delete");
        assert!(s.get("d/k").await.expect_err("gone").is_not_found());
        assert!(s.head("d/k").await.expect_err("gone").is_not_found());
        s.delete("d/k").await.expect("delete again");
        assert_eq!(
            keys(&s.list("", None, 10).await.expect("list")),
            vec!["d/other"]
        );
    }

    pub async fn delete_many_across_batches(s: DynStore, _order: KeyOrder) {
        // More than one S3 DeleteObjects batch (1000 keys).
        let names: Vec<String> = (0..1005).map(|i| format!("dm/k{i:04}")).collect();
        stream::iter(names.clone())
            .map(|k| {
                let s = s.clone();
                async move { s.put(&k, b("v"), PutMode::Overwrite).await }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .expect("puts");
        s.put("dm-keep", b("k"), PutMode::Overwrite)
            .await
            .expect("put");
        assert_eq!(list_all(s.as_ref(), "dm/").await.expect("list").len(), 1005);
        let mut doomed = names.clone();
        doomed.push("dm/missing".into());
        s.delete_many(&doomed).await.expect("delete_many");
        assert!(list_all(s.as_ref(), "dm/").await.expect("list").is_empty());
        assert_eq!(&s.get("dm-keep").await.expect("survivor")[..], b"k");
        s.delete_many(&doomed[..3])
            .await
            .expect("again: idempotent");
        s.delete_many(&[]).await.expect("empty batch");
    }

    pub async fn invalid_keys_rejected(s: DynStore, _order: KeyOrder) {
        let long = "x".repeat(KEY_BYTES_MAX + 1);
        let bad = [
            "../x", "a//b", "", &long, "/a", "a/", "a/./b", "a/../b", "a\0b", "..", ".",
        ];
        let invalid = |what: &str, key: &str, e: StoreError| {
            assert!(
                matches!(e, StoreError::InvalidKey { .. }),
                "{what} {key:?}: expected InvalidKey, got {e:?}"
            );
        };
        for key in bad {
            let e = s
                .put(key, b("x"), PutMode::Overwrite)
                .await
                .expect_err("put");
            invalid("put", key, e);
            let e = s
                .put(key, b("x"), PutMode::IfAbsent)
                .await
                .expect_err("put");
            invalid("put IfAbsent", key, e);
            invalid("get", key, s.get(key).await.expect_err("get"));
            invalid(
                "get_range",
                key,
                s.get_range(key, 0..1).await.expect_err("get_range"),
            );
            invalid("head", key, s.head(key).await.expect_err("head"));
            invalid("delete", key, s.delete(key).await.expect_err("delete"));
            invalid(
                "delete_many",
                key,
                s.delete_many(&[key.to_string(), "fine".into()])
                    .await
                    .expect_err("delete_many"),
            );
        }
        for prefix in ["../", "a//", "/a", "a/../"] {
            let e = s.list(prefix, None, 10).await.expect_err("list");
            invalid("list prefix", prefix, e);
        }
        assert!(
            list_all(s.as_ref(), "").await.expect("list").is_empty(),
            "nothing was written"
        );
    }

    pub async fn probe_if_absent_holds(s: DynStore, _order: KeyOrder) {
        assert!(probe_if_absent(s.as_ref(), "probe").await.expect("probe"));
        assert!(
            list_all(s.as_ref(), "").await.expect("list").is_empty(),
            "probe cleans up"
        );
    }
}

/// `put` sends the body's CRC32 and an unsigned payload: a server that checks flexible
/// checksums (SeaweedFS does) must refuse a body that does not match the value declared,
/// and take the object when it does. Moto accepts a wrong value, so it is not asked.
#[tokio::test]
async fn seaweedfs_refuses_a_body_that_does_not_match_its_checksum() {
    let Some((endpoint, bucket)) = common::s3_test_endpoint(S3Kind::SeaweedFs, "crc32") else {
        return;
    };
    let url = format!("{bucket}/nbds3-test/crc32-{}", common::random_tag());
    let store = S3Store::open(&url, &common::s3_test_options(&endpoint))
        .await
        .expect("open");
    let body = Bytes::from_static(b"nbds3");
    let err = store
        .put_once_declaring_crc32("k", body.clone(), "AAAAAA==")
        .await
        .expect_err("a wrong checksum must be refused");
    assert!(format!("{err}").contains("BadDigest"), "{err}");
    assert!(matches!(
        store.get("k").await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .put_once_declaring_crc32("k", body.clone(), "hRMpZg==")
        .await
        .expect("the right checksum is taken");
    store
        .put("k2", body.clone(), PutMode::IfAbsent)
        .await
        .expect("put");
    assert_eq!(store.get("k").await.expect("get"), body);
    assert_eq!(store.get("k2").await.expect("get"), body);
    common::remove_all(&store).await;
}
