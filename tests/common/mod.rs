//! Helpers shared by integration tests (each test crate includes this with `mod common;`).
//!
//! S3 servers come from the environment that `tools/test-env.sh` exports:
//! `NBDS3_TEST_S3_ENDPOINT`/`NBDS3_TEST_S3_BUCKET` (SeaweedFS) and
//! `NBDS3_TEST_MOTO_ENDPOINT`/`NBDS3_TEST_MOTO_BUCKET` (moto), with the standard
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_REGION`. When a server is not configured
//! the helpers print a loud SKIP line and return `None` — unless `NBDS3_REQUIRE_S3=1` (CI),
//! in which case they panic, so a misconfigured CI can never pass by skipping.
//!
//! Every store handed out lives under a fresh random prefix, so concurrent tests and repeated
//! runs against one bucket never see each other's objects.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;

use nbds3::store::s3::{S3Options, S3Store};
use nbds3::store::{list_all, DynStore, ObjectStore};

/// Which S3 server a test wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    SeaweedFs,
    Moto,
}

impl S3Kind {
    fn env_names(self) -> (&'static str, &'static str) {
        match self {
            S3Kind::SeaweedFs => ("NBDS3_TEST_S3_ENDPOINT", "NBDS3_TEST_S3_BUCKET"),
            S3Kind::Moto => ("NBDS3_TEST_MOTO_ENDPOINT", "NBDS3_TEST_MOTO_BUCKET"),
        }
    }
}

/// True when `NBDS3_REQUIRE_S3=1`: missing S3 configuration is a failure, not a skip.
pub fn s3_required() -> bool {
    std::env::var("NBDS3_REQUIRE_S3").is_ok_and(|v| v == "1")
}

/// Endpoint and bucket for `kind`, or `None` after printing a SKIP line (panics instead when
/// S3 is required).
pub fn s3_test_endpoint(kind: S3Kind, test_name: &str) -> Option<(String, String)> {
    let (ep_var, bucket_var) = kind.env_names();
    let endpoint = std::env::var(ep_var).ok().filter(|v| !v.is_empty());
    let bucket = std::env::var(bucket_var).ok().filter(|v| !v.is_empty());
    match (endpoint, bucket) {
        (Some(e), Some(b)) => Some((e, b)),
        _ => {
            let msg = format!(
                "{ep_var}/{bucket_var} not set: {kind:?} test {test_name} cannot run \
                 (source tools/test-env.sh to start local S3 servers)"
            );
            if s3_required() {
                panic!("NBDS3_REQUIRE_S3=1 but {msg}");
            }
            eprintln!("!!!!!!!! SKIP: {msg}");
            None
        }
    }
}

/// A random lowercase-hex tag for unique prefixes.
pub fn random_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Options used to reach the local test servers (path-style, region from `AWS_REGION`).
pub fn s3_test_options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint: Some(endpoint.to_string()),
        region: std::env::var("AWS_REGION").ok().filter(|v| !v.is_empty()),
        path_style: true,
        ..S3Options::default()
    }
}

/// An S3 store of `kind` under a fresh prefix `nbds3-test/<test_name>-<random>`, or `None`
/// when the server is not configured (see module doc).
pub async fn s3_test_store(kind: S3Kind, test_name: &str) -> Option<DynStore> {
    let (endpoint, bucket) = s3_test_endpoint(kind, test_name)?;
    let safe_name: String = test_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let url = format!("{bucket}/nbds3-test/{safe_name}-{}", random_tag());
    let store = S3Store::open(&url, &s3_test_options(&endpoint))
        .await
        .unwrap_or_else(|e| panic!("opening {kind:?} store s3://{url} at {endpoint}: {e}"));
    Some(Arc::new(store))
}

/// Delete every object in `store` (best effort; for S3 test prefixes after a test).
pub async fn remove_all(store: &dyn ObjectStore) {
    if let Ok(objects) = list_all(store, "").await {
        let keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
        let _ = store.delete_many(&keys).await;
    }
}

/// What a [`HookedPuts`] hook returns: the hook's verdict on one PUT, awaited before it.
pub type PutHookFuture = futures::future::BoxFuture<'static, nbds3::store::StoreResult<()>>;

/// A store that runs a test's hook before every PUT — to hold, delay, count or fail it —
/// and passes everything to `inner` otherwise: the one wrapper the interleaving tests
/// share. A hook returning `Err` fails the PUT without storing anything.
pub struct HookedPuts {
    pub inner: DynStore,
    hedge: bool,
    hook: Box<dyn Fn(&str) -> PutHookFuture + Send + Sync>,
}

impl HookedPuts {
    /// `hedge`: what [`ObjectStore::hedge_puts`] answers (whether the log races stalled
    /// segment PUTs on this store).
    pub fn new(
        inner: DynStore,
        hedge: bool,
        hook: impl Fn(&str) -> PutHookFuture + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            hedge,
            hook: Box::new(hook),
        }
    }
}

impl std::fmt::Debug for HookedPuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HookedPuts({})", self.inner.describe())
    }
}

#[async_trait::async_trait]
impl ObjectStore for HookedPuts {
    async fn put(
        &self,
        key: &str,
        data: bytes::Bytes,
        mode: nbds3::store::PutMode,
    ) -> nbds3::store::StoreResult<()> {
        (self.hook)(key).await?;
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> nbds3::store::StoreResult<bytes::Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> nbds3::store::StoreResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> nbds3::store::StoreResult<nbds3::store::ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> nbds3::store::StoreResult<nbds3::store::ListPage> {
        self.inner.list(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> nbds3::store::StoreResult<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("hooked-puts({})", self.inner.describe())
    }
    fn hedge_puts(&self) -> bool {
        self.hedge
    }
}
