//! S3 backend (placeholder, being written).
use super::*;

/// Connection settings for the S3 backend (credentials come from the standard AWS chain).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
}

#[derive(Debug)]
pub struct S3Store;

impl S3Store {
    pub async fn open(_bucket_and_prefix: &str, _opts: &S3Options) -> StoreResult<Self> {
        Err(StoreError::Permanent { key: String::new(), reason: "s3 not yet built".into() })
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, _data: Bytes, _mode: PutMode) -> StoreResult<()> {
        Err(not_built(key))
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        Err(not_built(key))
    }
    async fn get_range(&self, key: &str, _range: Range<u64>) -> StoreResult<Bytes> {
        Err(not_built(key))
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        Err(not_built(key))
    }
    async fn list(&self, prefix: &str, _s: Option<&str>, _l: usize) -> StoreResult<ListPage> {
        Err(not_built(prefix))
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        Err(not_built(key))
    }
    fn describe(&self) -> String {
        "s3://".into()
    }
}

fn not_built(key: &str) -> StoreError {
    StoreError::Permanent { key: key.into(), reason: "backend not yet built".into() }
}
