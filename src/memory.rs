//! Process memory housekeeping: hands heap memory that the allocator holds free back to the
//! kernel, so the resident set follows what the daemon's budgets hold rather than the peak
//! of every allocator arena.
//!
//! Why: glibc's malloc gives each thread that allocates its own arena, and a freed chunk
//! goes back to the arena it came from, where only the very top of the heap is ever
//! returned. Write payloads are allocated by whichever worker thread runs the connection
//! and freed after the flush; when the connection's task moves between workers, each
//! worker's arena in turn grows to hold a dirty set's worth of buffers and keeps it. With
//! `--cache-size 16M --dirty-max 256M`, 15 s of random 4 KiB writes left the daemon at
//! 473 MiB resident, of which 214 MiB were free chunks (`malloc_trim` brought it to 245).
//! One arena for all threads fixes this too, but costs ~7% of CPU per write in lock
//! contention (measured); returning free memory from time to time costs nothing on the
//! request path.
//!
//! Large buffers (≥ [`MMAP_THRESHOLD_BYTES`]: segments, compaction's big spans) are kept out of
//! the arenas altogether by pinning glibc's mmap threshold at start: with compaction
//! running beside the writes, the dynamic threshold had put them between write payloads,
//! and the daemon sat 30–100 MiB above its resident target in fragments a trim could not
//! return (`--cache-size 16M --dirty-max 256M`: 520–605 MiB against 528; pinned, 490–540).
//!
//! Invariants:
//! - The trim runs on the background thread (nice 19, [`crate::background`]), never on a
//!   request path; only when the process is resident above the sum of its budgets and the
//!   allocator holds at least `free_bytes_min` free: a working set within budget is not
//!   churned through the kernel for nothing.
//! - Where the allocator is not glibc's, [`heap_free_bytes`] is `None` and nothing runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Free bytes below which the trimmer leaves the heap alone.
pub const TRIM_FREE_BYTES_MIN: u64 = 64 << 20;
/// How often the trimmer looks at the heap.
pub const TRIM_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Allocations of at least this many bytes get their own mapping, returned to the kernel
/// the moment they are freed (see [`pin_mmap_threshold`]). Above the largest common
/// request payload (1 MiB): a mapping per write payload cost 25% more CPU per 1 MiB
/// write (page faults and munmap) when this was 256 KiB.
pub const MMAP_THRESHOLD_BYTES: usize = 4 << 20;

/// Fix the allocator's mmap threshold at `bytes`. Why: glibc raises the threshold every
/// time a mapped chunk is freed (up to 32 MiB), after which large buffers (segments being
/// built, compaction's spans and frames) come from the arenas, between the small write
/// payloads, and their freed space stays resident in fragments a trim cannot return.
/// Fixed, buffers this large never share pages with small ones. Returns false where the
/// allocator cannot be told.
pub fn pin_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(b) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt only changes the allocator's tunables; called before threads
        // start allocating heavily (it is thread-safe regardless).
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, b) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

/// Bytes the allocator holds free (in its arenas, not returned to the kernel); `None`
/// where that cannot be asked.
pub fn heap_free_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own statistics (glibc ≥ 2.33).
        let mi = unsafe { libc::mallinfo2() };
        Some(mi.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Return free heap pages to the kernel (all arenas); true if any memory was released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim is thread-safe and only touches free chunks.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The process's resident set in bytes (`/proc/self/statm`), if readable.
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}

/// Bytes the daemon released (flushed write batches) since the trimmer last ran.
static FREED_SINCE_CHECK: AtomicU64 = AtomicU64::new(0);
/// Wakes the trimmer early once `FREED_SINCE_CHECK` reaches its threshold.
static FREED_WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Tell the trimmer that `bytes` of buffers were just dropped (a flushed batch). A large
/// release wakes it at once: the moment the free memory appears is the moment to return it,
/// before another arena grows to hold the next batch.
pub fn note_freed(bytes: u64) {
    let total = FREED_SINCE_CHECK.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if total >= TRIM_FREE_BYTES_MIN {
        FREED_WAKE.notify_one();
    }
}

/// Memory the daemon keeps free for reuse outside the allocator (recycled buffers): given
/// back to the allocator, all of it, when the process is above its resident target.
/// Returns the bytes released.
pub type ReleaseHook = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// Start the trimmer on the current tokio runtime: every `interval`, or as soon as
/// [`note_freed`] has seen `TRIM_FREE_BYTES_MIN` released, if the process is resident above
/// `resident_target` (what its budgets add up to), first empty `release` (free buffers
/// kept for reuse go back to the allocator), then, if the heap holds at least
/// `free_bytes_min` free, trim it; on the background thread. Runs until the runtime ends.
///
/// Below the target nothing is trimmed: the free memory will hold the next batch, and
/// giving it back would only make the kernel zero the same pages again (measured: trimming
/// after every flush cost 8% more CPU per 4 KiB write with a 1.25 GiB cache).
pub fn spawn_trimmer(
    resident_target: u64,
    free_bytes_min: u64,
    interval: Duration,
    release: Option<ReleaseHook>,
) {
    tokio::spawn(async move {
        // Nothing to do where the allocator cannot be asked.
        if heap_free_bytes().is_none() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = FREED_WAKE.notified() => {}
            }
            FREED_SINCE_CHECK.store(0, Ordering::Relaxed);
            // mallinfo2 walks the arenas' free lists: on the background thread too.
            let release = release.clone();
            let job = crate::background::run(move || {
                let before = resident_bytes().unwrap_or(0);
                if before <= resident_target {
                    return None;
                }
                if let Some(r) = &release {
                    let n = r();
                    if n > 0 {
                        tracing::debug!(bytes = n, "released recycled buffers");
                    }
                }
                let free = heap_free_bytes().unwrap_or(0);
                if free < free_bytes_min {
                    return None;
                }
                release_free_memory();
                let after = resident_bytes().unwrap_or(before);
                Some((free, before.saturating_sub(after)))
            });
            match job.await {
                Ok(Some((free, released))) => {
                    tracing::debug!(free, released, "returned free heap memory to the kernel");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "memory trimmer stopped");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above the resident target the trimmer empties the recycled buffers first; below
    /// it, it leaves them alone.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[tokio::test]
    async fn the_trimmer_empties_recycled_buffers_only_above_the_target() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let calls = |target: u64| async move {
            let n = Arc::new(AtomicUsize::new(0));
            let seen = Arc::clone(&n);
            let hook: ReleaseHook = Arc::new(move || {
                seen.fetch_add(1, Ordering::Relaxed);
                0
            });
            spawn_trimmer(target, u64::MAX, Duration::from_millis(5), Some(hook));
            tokio::time::sleep(Duration::from_millis(200)).await;
            n.load(Ordering::Relaxed)
        };
        assert!(calls(0).await > 0, "never released above the target");
        assert_eq!(calls(u64::MAX).await, 0, "released below the target");
    }

    #[test]
    fn resident_bytes_are_measured() {
        let r = resident_bytes().expect("/proc/self/statm");
        assert!(r > 1 << 20, "{r}");
    }

    /// Memory freed in the middle of the heap goes back to the kernel after a trim.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_freed_chunks() {
        // 4000-byte chunks (below the mmap threshold: heap chunks), 7 of every 8 freed:
        // what is free lies between live chunks, never at the top of the heap, so free()
        // alone returns nothing.
        let mut v: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 4000]).collect();
        let keep: Vec<Vec<u8>> = v.drain(..).step_by(8).collect();
        let free = heap_free_bytes().expect("glibc");
        assert!(free >= 100_000_000, "{free}");
        let before = resident_bytes().unwrap();
        release_free_memory();
        let after = resident_bytes().unwrap();
        assert!(
            before.saturating_sub(after) >= 80_000_000,
            "resident {before} -> {after} after freeing 140 MB"
        );
        assert_eq!(keep.len(), 5_000);
        assert!(keep.iter().enumerate().all(|(i, b)| b[0] == (8 * i) as u8));
    }
}
