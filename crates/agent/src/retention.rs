//! Retention (`retention:` in the config): old decision records, sent notifications and
//! discarded failed events removed by `idsync run` at start and then every hour, and by
//! `idsync run --once` after its pass.
//!
//! Key design choice: the agent applies it on a thread of its own that the main thread
//! starts when it is due (the main thread looks at the time on its usual turn, so an idle
//! agent gains no wake-up), a chunk of rows per transaction (`idsync_repo::PURGE_CHUNK`) so
//! a resource's batch waits at most one chunk; a stop or a reload ends it between chunks,
//! and the rest goes at the next turn. What must be kept is decided in the repository
//! (`idsync_repo::KEEP`).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use idsync_repo::{PurgeReport, Repo, RepoError};

use crate::config::RetentionConfig;
use crate::runner::Stop;

/// How often the agent applies retention after the one at start.
pub const EVERY: Duration = Duration::from_secs(3600);

/// The configured ages, as written (for the messages) and as durations.
#[derive(Clone, Debug, Default)]
pub struct Ages {
    decisions: Option<(String, Duration)>,
    outbox: Option<(String, Duration)>,
    failed_discarded: Option<(String, Duration)>,
}

impl Ages {
    /// The ages of a validated config (`idsync check` refuses a value that is not an age).
    pub fn of(config: &RetentionConfig) -> Ages {
        let age = |v: &Option<String>| {
            v.as_ref().and_then(|text| {
                crate::when::parse_age(text)
                    .ok()
                    .map(|d| (text.trim().to_owned(), d))
            })
        };
        Ages {
            decisions: age(&config.decisions),
            outbox: age(&config.outbox),
            failed_discarded: age(&config.failed_discarded),
        }
    }

    /// Whether nothing is to be removed.
    pub fn is_empty(&self) -> bool {
        self.decisions.is_none() && self.outbox.is_none() && self.failed_discarded.is_none()
    }
}

/// What one application of retention removed.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    decisions: Option<(String, PurgeReport)>,
    outbox: Option<(String, u64)>,
    failed_discarded: Option<(String, u64)>,
    /// A stop ended it early; the rest goes next time.
    pub interrupted: bool,
}

impl Applied {
    /// One line saying what was removed and kept, `None` when nothing was.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some((age, r)) = &self.decisions
            && (r.removed > 0 || r.kept_total() > 0)
        {
            parts.push(format!(
                "removed {} decision record(s) older than {age}{}",
                r.removed,
                describe_kept(r)
            ));
        }
        if let Some((age, n)) = &self.outbox
            && *n > 0
        {
            parts.push(format!("removed {n} sent notification(s) older than {age}"));
        }
        if let Some((age, n)) = &self.failed_discarded
            && *n > 0
        {
            parts.push(format!(
                "removed {n} discarded failed event(s) older than {age}"
            ));
        }
        if parts.is_empty() {
            return None;
        }
        if self.interrupted {
            parts.push("stopped before the end; the rest goes next time".to_owned());
        }
        Some(parts.join("; "))
    }
}

/// `" (kept N: n1 because …, n2 because …)"` for the records a purge kept, or nothing.
pub fn describe_kept(r: &PurgeReport) -> String {
    if r.kept_total() == 0 {
        return String::new();
    }
    let why: Vec<String> = r
        .kept
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{n}: {reason}"))
        .collect();
    format!("; kept {} of them ({})", r.kept_total(), why.join(", "))
}

/// Applies `ages` to `repo` now; `stop` is asked between chunks.
pub fn apply(repo: &Repo, ages: &Ages, stop: &dyn Fn() -> bool) -> Result<Applied, RepoError> {
    let now = SystemTime::now();
    let cutoff = |age: Duration| now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut applied = Applied::default();
    if let Some((text, age)) = &ages.decisions {
        let r = repo.purge_decisions_before(cutoff(*age), stop)?;
        applied.interrupted |= r.interrupted;
        applied.decisions = Some((text.clone(), r));
    }
    if let Some((text, age)) = &ages.outbox {
        let (n, stopped) = repo.purge_sent_outbox_before(cutoff(*age), stop)?;
        applied.interrupted |= stopped;
        applied.outbox = Some((text.clone(), n));
    }
    if let Some((text, age)) = &ages.failed_discarded {
        let (n, stopped) = repo.purge_discarded_failures_before(cutoff(*age), stop)?;
        applied.interrupted |= stopped;
        applied.failed_discarded = Some((text.clone(), n));
    }
    Ok(applied)
}

/// The agent's retention job: due at start, then every [`EVERY`]; run on a thread of its
/// own so the main thread stays free for signals, reloads and the status file.
#[derive(Debug)]
pub struct Job {
    next: Instant,
    running: Option<JoinHandle<()>>,
}

impl Default for Job {
    fn default() -> Self {
        Job::new()
    }
}

impl Job {
    /// A job due now.
    pub fn new() -> Job {
        Job {
            next: Instant::now(),
            running: None,
        }
    }

    /// Starts a round on `repo` when one is due and none is running; `stop` ends it
    /// between chunks. Cheap when nothing is due: the main thread calls it every turn.
    pub fn tick(&mut self, repo: &Arc<Repo>, ages: &Ages, stop: &Stop) {
        if ages.is_empty() || Instant::now() < self.next {
            return;
        }
        if self.running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.join();
        self.next = Instant::now() + EVERY;
        let (repo, ages, stop) = (repo.clone(), ages.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("idsync-retention".to_owned())
            .spawn(move || match apply(&repo, &ages, &|| stop.requested()) {
                Ok(applied) => {
                    if let Some(line) = applied.describe() {
                        tracing::info!("retention: {line}");
                    }
                }
                Err(e) => tracing::warn!("retention: {e}; next attempt in an hour"),
            });
        match spawned {
            Ok(h) => self.running = Some(h),
            Err(e) => tracing::warn!("retention: cannot start its thread: {e}"),
        }
    }

    /// Waits for the round in hand (ended between chunks once its stop was requested).
    pub fn join(&mut self) {
        if let Some(h) = self.running.take()
            && h.join().is_err()
        {
            tracing::error!("the retention thread panicked");
        }
    }

    /// Waits for the round in hand and makes the job due at once: after a reload, the new
    /// config's retention applies (and a round the reload cut short goes on).
    pub fn restart(&mut self) {
        self.join();
        self.next = Instant::now();
    }
}
