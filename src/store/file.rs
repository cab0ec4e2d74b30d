//! File backend (placeholder, being written).
use super::*;
#[derive(Debug)]
pub struct FileStore;
impl FileStore {
    pub fn open(_dir: &str) -> StoreResult<Self> {
        Err(StoreError::Permanent { key: String::new(), reason: "file store not yet built".into() })
    }
}

#[async_trait]
impl ObjectStore for FileStore {
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
        "file://".into()
    }
}

fn not_built(key: &str) -> StoreError {
    StoreError::Permanent { key: key.into(), reason: "backend not yet built".into() }
}
