//! The runner: one pass of one resource, part by part, for `idsync run --once` and for each
//! resource loop of the agent; and what a failed pass means for the loop's schedule.
//!
//! A pass fetches and applies parts until the adapter has nothing more (a large initial load
//! in parts of `batch_size`, the files of a folder), each part committed with its own
//! checkpoint. Between parts the runner looks at its [`Stop`]: a stop request ends the pass
//! after the part in hand, which is committed (a part is atomic: a kill at any point loses at
//! most the uncommitted part, which the next start reads again).
//!
//! A reconcile ([`reconcile`]) is a pass the adapter was asked to make of every account
//! ([`Adapter::begin_reconcile`]): the same parts, checkpoints and stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use idsync_core::{Adapter, AdapterError, Decision, Fetch};
use idsync_engine::{BatchReport, EngineError, Policy};
use idsync_repo::RepoError;

use crate::setup::Setup;

/// A stop request shared by the loops of one run: set once, seen by every loop between
/// parts and within a slice of every wait.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicBool>);

/// The longest a loop waits before looking at its [`Stop`] again.
pub const SLICE: Duration = Duration::from_millis(200);

impl Stop {
    /// A stop nobody has requested yet.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// The flag itself (for signal handlers).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Requests the stop.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until `deadline`, a poke on `poked` (several pokes count as one) or a stop
    /// request, whichever comes first. A poker gone (the loops ended) leaves the deadline
    /// and the stop.
    pub fn wait_poked(&self, poked: &Receiver<()>, deadline: Instant) {
        while !self.requested() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match poked.recv_timeout(left.min(SLICE)) {
                Ok(()) => {
                    while poked.try_recv().is_ok() {}
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.sleep_until(deadline);
                    return;
                }
            }
        }
    }

    /// Sleeps until `deadline` or a stop request, whichever comes first; whether the stop
    /// was requested.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.requested() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

/// What a pass reports as it goes: the part about to be applied (its event count, and the
/// pass's total when the adapter knows it) and the events applied so far of it.
pub trait Progress {
    /// A part of `events` events is about to be applied; the pass hands out `planned`
    /// events in all, when known.
    fn part_started(&mut self, events: usize, planned: Option<u64>);
    /// One more event of the part in hand was decided (`decision`; the part may still be
    /// rolled back).
    fn event_done(&mut self, decision: &Decision);
    /// The part was committed.
    fn part_committed(&mut self, report: &BatchReport);
}

/// One pass of `policy`'s resource through `adapter`: parts until the adapter has nothing
/// more or `stop` was requested (checked after each committed part). `None`: nothing to do.
pub fn pass(
    setup: &Setup,
    adapter: &mut dyn Adapter,
    policy: &Policy,
    stop: &Stop,
    progress: &mut dyn Progress,
) -> anyhow::Result<Option<BatchReport>> {
    let _span = tracing::info_span!("pass", resource = %policy.resource).entered();
    let repo = setup.engine.repo();
    let mut total: Option<BatchReport> = None;
    loop {
        let expected = repo.checkpoint(&policy.resource)?;
        match adapter.next_batch(expected.as_ref(), repo.as_ref())? {
            Fetch::Idle => return Ok(total),
            Fetch::Batch(batch) => {
                progress.part_started(batch.events.len(), adapter.planned());
                let report = setup
                    .engine
                    .apply_batch_with(policy, expected.as_ref(), &batch, &mut |d| {
                        progress.event_done(d);
                    })
                    .with_context(|| format!("resource {}", policy.resource))?;
                progress.part_committed(&report);
                total
                    .get_or_insert_with(BatchReport::default)
                    .merge(&report);
                if !adapter.has_more() {
                    return Ok(total);
                }
                if stop.requested() {
                    tracing::info!(
                        resource = %policy.resource,
                        "stopping after the committed part; the next start goes on from it"
                    );
                    return Ok(total);
                }
            }
        }
    }
}

/// What a reconcile did: its report (`None`: the resource holds nothing and nothing is
/// known), and whether it was handed out whole (`false`: stopped between parts; begun
/// again, it goes on from the committed parts).
#[derive(Debug)]
pub struct Reconciled {
    /// The merged report of its parts.
    pub report: Option<BatchReport>,
    /// Every part was committed.
    pub complete: bool,
}

/// A reconcile of `policy`'s resource through `adapter`: every account (or only `keys`)
/// decided again with the current rules, part by part, as [`pass`] does. On an error or a
/// stop between parts the adapter is told to end the reconcile, so that its next fetch is
/// an ordinary pass; what was committed stays.
pub fn reconcile(
    setup: &Setup,
    adapter: &mut dyn Adapter,
    policy: &Policy,
    keys: Option<Vec<String>>,
    stop: &Stop,
    progress: &mut dyn Progress,
) -> anyhow::Result<Reconciled> {
    adapter
        .begin_reconcile(keys)
        .with_context(|| format!("resource {}: reconcile", policy.resource))?;
    let _span = tracing::info_span!("reconcile", resource = %policy.resource).entered();
    let result = pass(setup, adapter, policy, stop, progress);
    let complete = result.is_ok() && !adapter.has_more();
    if !complete {
        adapter.end_reconcile();
    }
    result.map(|report| Reconciled { report, complete })
}

/// What a failed pass means for its resource's schedule, decided on the error's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `on_error: halt` stopped the batch: the resource waits for a config or rule change.
    Halted,
    /// The repository's storage failed (disk full, I/O error): back off, ignore wake-ups.
    Storage,
    /// The source may work again soon (server down, file being written): back off.
    Transient,
    /// Anything else (a bad header, a config the server refuses): the next scheduled time
    /// or wake-up.
    Other,
    /// The batch was fenced off: this agent's lease of the resource passed to another
    /// agent (PostgreSQL, module `leases`).
    Fenced,
}

impl Failure {
    /// Classifies the error of a pass.
    pub fn of(e: &anyhow::Error) -> Failure {
        for cause in e.chain() {
            match cause.downcast_ref::<EngineError>() {
                Some(EngineError::Halted { .. }) => return Failure::Halted,
                Some(EngineError::Repo(r)) if r.is_storage_failure() => return Failure::Storage,
                _ => {}
            }
            let repo_error = match cause.downcast_ref::<EngineError>() {
                Some(EngineError::Repo(r)) => Some(r),
                _ => cause.downcast_ref::<RepoError>(),
            };
            if let Some(RepoError::LeaseLost { .. }) = repo_error {
                return Failure::Fenced;
            }
            if repo_error.is_some_and(RepoError::is_storage_failure) {
                return Failure::Storage;
            }
            if let Some(a) = cause.downcast_ref::<AdapterError>() {
                return if a.is_transient() {
                    Failure::Transient
                } else {
                    Failure::Other
                };
            }
        }
        Failure::Other
    }

    /// The wait after the `n`th consecutive failure of this kind (from 1), `None` for the
    /// resource's usual schedule: storage 2 s doubling to 5 min; a transient source error
    /// 0.5 s doubling to 30 s.
    pub fn backoff(self, n: u32) -> Option<Duration> {
        let (first, max) = match self {
            Failure::Storage => (Duration::from_secs(2), Duration::from_secs(300)),
            Failure::Transient => (Duration::from_millis(500), Duration::from_secs(30)),
            Failure::Halted | Failure::Other | Failure::Fenced => return None,
        };
        Some(
            first
                .checked_mul(1 << n.saturating_sub(1).min(16))
                .map_or(max, |d| d.min(max)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let storage: Vec<u64> = (1..=10)
            .map(|n| Failure::Storage.backoff(n).unwrap().as_secs())
            .collect();
        assert_eq!(storage, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        let transient: Vec<u128> = (1..=8)
            .map(|n| Failure::Transient.backoff(n).unwrap().as_millis())
            .collect();
        assert_eq!(
            transient,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(Failure::Storage.backoff(u32::MAX).unwrap().as_secs(), 300);
        assert_eq!(Failure::Other.backoff(1), None);
    }

    #[test]
    fn a_stop_ends_a_sleep_within_a_slice() {
        let stop = Stop::new();
        let s = stop.clone();
        let t = std::thread::spawn(move || s.sleep_until(Instant::now() + Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        let asked = Instant::now();
        stop.request();
        assert!(t.join().unwrap());
        assert!(asked.elapsed() < SLICE * 2);
    }

    #[test]
    fn failures_are_classified_by_type() {
        let halted = anyhow::Error::from(EngineError::Halted {
            resource: "hr".into(),
            key: "1".into(),
            error: "x".into(),
        })
        .context("resource hr");
        assert_eq!(Failure::of(&halted), Failure::Halted);
        let down = anyhow::Error::from(AdapterError::Transient {
            resource: "dir".into(),
            message: "connection refused".into(),
        });
        assert_eq!(Failure::of(&down), Failure::Transient);
        assert_eq!(Failure::of(&anyhow::anyhow!("other")), Failure::Other);
    }
}
