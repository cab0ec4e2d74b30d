//! In-memory backend: a sorted map behind a mutex. Used by unit tests, simulations and
//! `memory://` (nothing survives the process). Honours the full store contract, including
//! atomic IfAbsent, so the log layer's fencing can be tested against it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace an object's bytes behind the contract's back (tests: corruption, tampering).
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut map = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(b) => {
                let mut v = b.to_vec();
                f(&mut v);
                map.insert(key.to_string(), Bytes::from(v));
                true
            }
            None => false,
        }
    }

    /// All keys and sizes (tests).
    pub fn snapshot(&self) -> Vec<(String, usize)> {
        let map = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (every mutation is
        // a single insert/remove), so a poisoned lock is still safe to use.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        validate_key(key)?;
        let mut map = self.lock();
        if mode == PutMode::IfAbsent && map.contains_key(key) {
            return Err(StoreError::PreconditionFailed { key: key.into() });
        }
        map.insert(key.to_string(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound { key: key.into() })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let body = self.get(key).await?;
        let size = body.len() as u64;
        if range.start >= range.end || range.end > size {
            return Err(StoreError::InvalidRange {
                key: key.into(),
                start: range.start,
                end: range.end,
                size_bytes: size,
            });
        }
        Ok(body.slice(range.start as usize..range.end as usize))
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let body = self.get(key).await?;
        Ok(ObjectMeta {
            key: key.into(),
            size_bytes: body.len() as u64,
        })
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let limit = limit.clamp(1, LIST_PAGE_MAX);
        let map = self.lock();
        let lower = match start_after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_string()),
            _ => std::ops::Bound::Included(prefix.to_string()),
        };
        let mut objects = Vec::new();
        let mut more = false;
        for (k, v) in map.range((lower, std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if objects.len() == limit {
                more = true;
                break;
            }
            objects.push(ObjectMeta {
                key: k.clone(),
                size_bytes: v.len() as u64,
            });
        }
        let next = if more {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.lock().remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory://".into()
    }
}
