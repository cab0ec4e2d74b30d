//! The background CPU thread: where maintenance work that nobody is waiting on runs —
//! building compaction segments, building and decoding checkpoints for GC — so that it
//! never takes CPU from requests.
//!
//! Why a thread of its own: that work used `spawn_blocking` and competed with the request
//! path on equal terms; on a 2-core machine a compaction pass after a burst of random
//! writes cost cached sequential reads up to 30% of their throughput. The thread runs at
//! the lowest scheduling priority (nice 19, applied to this thread only: Linux nice is per
//! thread), so the kernel gives it what requests leave idle and, under full load, still a
//! small share (CFS weight 15 against 1024): it is slowed, never starved.
//!
//! Invariants:
//! - One thread, started on first use, jobs run in submission order. Callers bound how
//!   many jobs they have queued (compaction: its upload limit; checkpoints: one per log).
//! - A job that panics is reported to its caller as [`BackgroundError::Panicked`]; the
//!   thread carries on with the next job.
//! - Where the priority cannot be lowered (a sandbox refusing `setpriority`) jobs still
//!   run, at normal priority, and a warning says so once.

use std::sync::mpsc;
use std::sync::OnceLock;

/// Errors of the background thread.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    #[error("background job panicked")]
    Panicked,
    #[error("background thread could not be started: {0}")]
    NoThread(String),
}

type Job = Box<dyn FnOnce() + Send>;

/// Nice value of the background thread (the lowest priority there is).
pub const BACKGROUND_NICE: i32 = 19;

fn queue() -> Result<&'static mpsc::Sender<Job>, BackgroundError> {
    static TX: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("nbds3-background".into())
            .spawn(move || {
                lower_priority();
                // Ends when every sender is gone, i.e. never in a running daemon.
                for job in rx {
                    job();
                }
            })
            .map(|_| tx)
            .map_err(|e| e.to_string())
    });
    tx.as_ref()
        .map_err(|e| BackgroundError::NoThread(e.clone()))
}

fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
    if r != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not lower the background thread's priority; maintenance runs at normal priority"
        );
    }
}

/// Run `f` on the background thread and wait for its result.
pub async fn run<T, F>(f: F) -> Result<T, BackgroundError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // The caller may have gone away (its task was aborted): nothing to report to.
        let _ = done_tx.send(r.map_err(|_| BackgroundError::Panicked));
    });
    queue()?
        .send(job)
        .map_err(|_| BackgroundError::NoThread("background thread has exited".into()))?;
    done_rx.await.map_err(|_| BackgroundError::Panicked)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_at_the_lowest_priority_and_survive_a_panic() {
        let nice = run(|| {
            // SAFETY: a plain syscall on the calling thread.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
        })
        .await
        .unwrap();
        assert_eq!(nice, BACKGROUND_NICE);
        // The caller's thread keeps its own priority.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        let here = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        assert_ne!(here, BACKGROUND_NICE);
        assert!(matches!(
            run(|| -> u32 { panic!("job failed") }).await,
            Err(BackgroundError::Panicked)
        ));
        assert_eq!(run(|| 6 * 7).await.unwrap(), 42);
    }
}
