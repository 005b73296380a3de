//! Waiting for another process's write: the busy handler of every repository connection.
//!
//! SQLite lets one connection write at a time; another process that wants to write (an
//! `idsync failed retry` while the agent commits a large batch) is told "busy" and retries
//! through this handler. The agent waits up to [`crate::BUSY_TIMEOUT`] (its own batches
//! never wait for a command for long); a command can choose to wait much longer and say so
//! ([`wait_for_other_writers`]) instead of failing with "database is locked" after five
//! seconds. SQLite takes a plain function as handler, so the setting is per process.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long to wait for another writer, in milliseconds.
static PATIENCE_MS: AtomicU64 = AtomicU64::new(crate::BUSY_TIMEOUT.as_millis() as u64);

/// Called once per wait when it passes [`NOTICE_AFTER`].
static NOTICE: Mutex<Option<fn(Duration)>> = Mutex::new(None);

/// A wait longer than this is announced.
const NOTICE_AFTER: Duration = Duration::from_secs(1);

thread_local! {
    /// When the current wait of this thread began.
    static WAIT_STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// From now on, every repository connection of this process waits up to `patience` for
/// another process's write to end, and calls `notice(patience)` once per wait that lasts
/// over a second (so a person sees why the command pauses).
pub fn wait_for_other_writers(patience: Duration, notice: fn(Duration)) {
    PATIENCE_MS.store(
        u64::try_from(patience.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    if let Ok(mut n) = NOTICE.lock() {
        *n = Some(notice);
    }
}

/// The busy handler: `attempt` counts the calls of this wait (0 for the first). Returns
/// whether to try again.
pub(crate) fn handler(attempt: i32) -> bool {
    let now = Instant::now();
    let started = WAIT_STARTED.with(|s| {
        if attempt == 0 || s.get().is_none() {
            s.set(Some(now));
        }
        s.get().unwrap_or(now)
    });
    let waited = now.duration_since(started);
    let patience = Duration::from_millis(PATIENCE_MS.load(Ordering::Relaxed));
    if waited >= patience {
        return false;
    }
    let step = Duration::from_millis(if attempt < 10 { 1 + attempt as u64 } else { 50 });
    let next = waited + step;
    if waited < NOTICE_AFTER
        && next >= NOTICE_AFTER
        && let Ok(n) = NOTICE.lock()
        && let Some(notice) = *n
    {
        notice(patience);
    }
    std::thread::sleep(step.min(patience - waited));
    true
}
