//! File backend (placeholder, being written).
use super::*;
#[derive(Debug)]
pub struct FileStore;
impl FileStore {
    pub fn open(_dir: &str) -> StoreResult<Self> {
        Err(StoreError::Permanent { key: String::new(), reason: "file store not yet built".into() })
    }
}
