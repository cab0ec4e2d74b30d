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
