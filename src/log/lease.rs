//! Writer lease: a small heartbeat object, `exports/<key>/lease`, that a serving daemon
//! overwrites every few seconds, so that offline tools (`nbds3-compact`) can tell that an
//! export is in use and refuse to take it over by accident.
//!
//! The lease is advisory. Correctness never depends on it: a single writer is enforced by
//! epochs and conditional manifest PUTs (`log`), and a tool that takes the export anyway
//! (`--force`) fences the daemon, whose writes then fail instead of being lost. What the
//! lease prevents is the surprise of that fencing.
//!
//! Invariants: the object is one envelope (`format::LEASE_MAGIC`, crc-checked) holding a
//! [`Lease`]; it is written with Overwrite (it is not part of the log and never named by a
//! manifest, so GC ignores it); a holder deletes it on clean shutdown only if it still
//! holds it. Freshness is judged by the reader's clock against `renewed_unix_ms + ttl_ms`,
//! and a lease stamped in the future counts as fresh (clock skew keeps, never discards).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::compact::CompactResult;
use super::{Log, LogError};
use crate::format::{self, ExportKeys, LEASE_MAGIC};
use crate::store::{DynStore, PutMode, StoreError};

/// How often a daemon refreshes its lease. Every refresh is a PUT, for as long as the
/// export is open, busy or idle: at 5 s (the default until 2026-11-29) that was 17,280 PUTs
/// a day per export, ~2.6 USD a month at AWS S3's request price, ten times what storing
/// a 10 GiB device costs; at 30 s it is 2,880. The price of a longer interval: after a
/// daemon dies without deleting its lease, offline tools wait out the ttl (4 intervals,
/// 2 min) or are told to pass `--force`.
pub const LEASE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// A lease is stale after this many refresh intervals without a refresh.
pub const LEASE_TTL_INTERVALS: u32 = 4;

/// The lease object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Writer epoch of the holder.
    pub epoch: u64,
    /// Random per holder session (tells "still mine" on shutdown).
    pub nonce: u64,
    /// `hostname:pid` of the holder, for the operator.
    pub holder: String,
    pub renewed_unix_ms: u64,
    /// Fresh until `renewed_unix_ms + ttl_ms`.
    pub ttl_ms: u64,
}

pub fn encode_lease(l: &Lease) -> Vec<u8> {
    format::encode_envelope(&LEASE_MAGIC, l, false)
}

pub fn decode_lease(b: &[u8]) -> Result<Lease, format::FormatError> {
    format::decode_envelope("lease", &LEASE_MAGIC, b)
}

/// What the lease object says about whether a daemon serves the export.
#[derive(Debug, Clone)]
pub enum LeaseStatus {
    Absent,
    /// Refreshed `age_ms` ago (0 when stamped in the future), within its ttl.
    Live {
        lease: Lease,
        age_ms: u64,
    },
    /// Not refreshed for longer than its ttl: the holder is gone (or cut off).
    Expired {
        lease: Lease,
        age_ms: u64,
    },
    /// Present but not decodable: treated as live by cautious callers.
    Unreadable {
        reason: String,
    },
}

impl LeaseStatus {
    /// Whether a cautious caller must assume a daemon is serving the export.
    pub fn is_live_or_unknown(&self) -> bool {
        matches!(
            self,
            LeaseStatus::Live { .. } | LeaseStatus::Unreadable { .. }
        )
    }
}

/// Read and judge the lease against `now_ms`.
pub async fn lease_status(
    store: &DynStore,
    keys: &ExportKeys,
    now_ms: u64,
) -> CompactResult<LeaseStatus> {
    let body = match store.get(&keys.lease()).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => return Ok(LeaseStatus::Absent),
        Err(e) => return Err(LogError::Store(e).into()),
    };
    let lease = match decode_lease(&body) {
        Ok(l) => l,
        Err(e) => {
            return Ok(LeaseStatus::Unreadable {
                reason: e.to_string(),
            })
        }
    };
    let age_ms = now_ms.saturating_sub(lease.renewed_unix_ms);
    if lease.renewed_unix_ms.saturating_add(lease.ttl_ms) > now_ms {
        Ok(LeaseStatus::Live { lease, age_ms })
    } else {
        Ok(LeaseStatus::Expired { lease, age_ms })
    }
}

fn holder_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".to_string()
    };
    format!("{host}:{}", std::process::id())
}

struct Shared {
    stop: AtomicBool,
    notify: tokio::sync::Notify,
}

/// Keeps a lease fresh in the background. `close` stops refreshing and removes the lease
/// if it is still ours; dropping the handle only stops refreshing (the lease then expires).
pub struct LeaseHandle {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
    store: DynStore,
    keys: ExportKeys,
    nonce: u64,
}

impl std::fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHandle")
            .field("key", &self.keys.lease())
            .finish()
    }
}

impl LeaseHandle {
    fn signal(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notify.notify_waiters();
    }

    /// Stop refreshing, then delete the lease if it still carries our nonce.
    pub async fn close(mut self) {
        self.signal();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let key = self.keys.lease();
        if let Ok(body) = self.store.get(&key).await {
            if decode_lease(&body).is_ok_and(|l| l.nonce == self.nonce) {
                if let Err(e) = self.store.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not remove the lease; it will expire");
                }
            }
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.signal();
    }
}

/// Write the lease now and keep refreshing it every `interval` until closed, dropped, or
/// the log is fenced (a fenced writer no longer serves the export's latest state).
pub fn spawn_lease(log: Arc<Log>, interval: Duration) -> LeaseHandle {
    let interval = interval.max(Duration::from_millis(10));
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        notify: tokio::sync::Notify::new(),
    });
    let nonce: u64 = rand::random();
    let holder = holder_name();
    let ttl_ms = u64::try_from((interval * LEASE_TTL_INTERVALS).as_millis()).unwrap_or(u64::MAX);
    let store = Arc::clone(log.store());
    let keys = log.keys().clone();
    let sh = Arc::clone(&shared);
    let task = tokio::spawn(async move {
        loop {
            let notified = sh.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if sh.stop.load(Ordering::Acquire) || log.is_fenced() {
                break;
            }
            let lease = Lease {
                epoch: log.epoch(),
                nonce,
                holder: holder.clone(),
                renewed_unix_ms: crate::util::unix_ms_now(),
                ttl_ms,
            };
            let body = Bytes::from(encode_lease(&lease));
            if let Err(e) = log
                .store()
                .put(&log.keys().lease(), body, PutMode::Overwrite)
                .await
            {
                tracing::warn!(export = log.name(), error = %e, "lease refresh failed");
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    LeaseHandle {
        shared,
        task: Some(task),
        store,
        keys,
        nonce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trip_and_flips() {
        let l = Lease {
            epoch: 7,
            nonce: 99,
            holder: "host:1".into(),
            renewed_unix_ms: 1_700_000_000_000,
            ttl_ms: 20_000,
        };
        let b = encode_lease(&l);
        assert_eq!(decode_lease(&b).unwrap(), l);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_lease(&bad).is_err(), "flip at {i} undetected");
        }
    }
}
