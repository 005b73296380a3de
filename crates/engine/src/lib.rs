//! The sync engine: decides each change event with the user's rules and commits a batch
//! atomically.
//!
//! Key design choice: one repository transaction per batch holds every effect (identity
//! changes and links), one decision record per event, the failed-event rows, the shadows
//! (the accounts as last seen) and the resource's new checkpoint, written compare-and-swap
//! from the checkpoint the batch was read after. A failed event leaves no effect behind: it
//! becomes a failed-event row and the batch goes on; a crash loses the batch as a whole and
//! the adapter reads it again.
//!
//! How a failed event is undone: SQLite savepoints copy every page an event touches, which
//! is a large part of an event's cost, and most failures (a rule error, an unresolved
//! situation, a name taken) happen before the event writes anything. So a batch first
//! runs *optimistically*, without savepoints, and checks SQLite's change counter around
//! each event; if an event fails after writing (a process or resolve rule that wrote
//! through `ctx`, then failed; a mapping that failed after an unlinked account was linked;
//! a notification that failed after the checkin), the batch
//! transaction is rolled back and the batch run again with a savepoint around every
//! event. Policies with a process rule (it writes on every event) start with savepoints.
//!
//! A batch marked `reconcile` (a part of a reconcile) is decided exactly like any other;
//! its decision records say op `reconcile`, while the rules saw the event's own op.
//!
//! Poison events: an event that makes the process die (an abort, an out-of-memory kill)
//! rolls its whole batch back, and the next start would apply it again. A [`CrashGuard`]
//! set by the agent is told which event is being decided; when it says an event crashed
//! the process twice, the engine isolates it: a failed event ("crashed the agent"),
//! decided without running any rule, its shadow updated like any failed event's, so the
//! batch and the resource go on.

mod guard;
mod host;
mod notifier;
mod pipeline;
mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;

use idsync_core::{
    Action, ChangeBatch, ChangeEvent, Checkpoint, Decision, Op, RuleOutcome, Situation,
};
use idsync_repo::{FailedEvent, NewFailure, Repo, RepoError};
use idsync_rules::{Limits, RuleEngine};

pub use guard::CrashGuard;
pub use notifier::{IdentityChange, Notifier};
pub use pipeline::{DISABLED_CHANGE, EventError};
pub use policy::{DeleteAction, Mapping, MappingSource, OnError, Policy};

use pipeline::{Decider, blank_decision};
use policy::ScopeNeeds;

/// The `rule` of the [`RuleOutcome`] that records a queued notification (its `script` is
/// the policy name).
pub const NOTIFICATION_RULE: &str = "notification";

/// Why a batch could not be applied. Nothing of it was committed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The repository failed (IO, a checkpoint conflict).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// `on_error: halt` and an event failed: the whole batch was rolled back.
    #[error("resource {resource} halted (on_error: halt) at account {key}: {error}")]
    Halted {
        /// Resource.
        resource: String,
        /// The failing account key (or origin for unreadable input).
        key: String,
        /// Why it failed.
        error: String,
    },
    /// A failed event that cannot be re-run (its input was unreadable).
    #[error("failed event {id} cannot be re-run: {reason}")]
    NotRetriable {
        /// Failed-event id.
        id: i64,
        /// Why.
        reason: String,
    },
}

/// What one batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Resource name.
    pub resource: String,
    /// Events decided, by situation (failed events count under the situation reached).
    pub situations: BTreeMap<Situation, u64>,
    /// Events decided, by action.
    pub actions: BTreeMap<Action, u64>,
    /// Events that failed (rule error, unresolved situation).
    pub failed: u64,
    /// Input the adapter could not read (malformed rows).
    pub rejected: u64,
    /// Events whose decision changed nothing ([`Decision::changed_nothing`]), e.g. the
    /// unchanged accounts of a reconcile.
    pub unchanged: u64,
}

impl BatchReport {
    /// Adds another report's counts.
    pub fn merge(&mut self, other: &BatchReport) {
        for (k, v) in &other.situations {
            *self.situations.entry(*k).or_default() += v;
        }
        for (k, v) in &other.actions {
            *self.actions.entry(*k).or_default() += v;
        }
        self.failed += other.failed;
        self.rejected += other.rejected;
        self.unchanged += other.unchanged;
    }

    /// Total events decided.
    pub fn events(&self) -> u64 {
        self.actions.values().sum()
    }

    fn count(&mut self, d: &Decision) {
        if let Some(s) = d.situation {
            *self.situations.entry(s).or_default() += 1;
        }
        *self.actions.entry(d.action).or_default() += 1;
        if d.action == Action::Failed {
            self.failed += 1;
        }
        if d.changed_nothing() {
            self.unchanged += 1;
        }
    }
}

/// The engine: a sandboxed rule engine and the repository. Not `Send` (the rule engine
/// is per thread).
pub struct Engine {
    rules: RuleEngine,
    repo: Arc<Repo>,
    notifier: Option<Box<dyn Notifier>>,
    guard: Option<Box<dyn CrashGuard>>,
}

impl Engine {
    /// An engine over `repo` whose scripts run with `limits`.
    pub fn new(repo: Arc<Repo>, limits: &Limits) -> Engine {
        Engine {
            rules: RuleEngine::new(limits),
            repo,
            notifier: None,
            guard: None,
        }
    }

    /// Sets the crash guard: told of every event before it is decided (batches and
    /// retries), it may have the engine isolate an event that crashed the process.
    pub fn set_crash_guard(&mut self, guard: Box<dyn CrashGuard>) {
        self.guard = Some(guard);
    }

    /// Sets the notification hook: every successful event's changed identities go through
    /// it, and the messages it returns are enqueued in the event's savepoint.
    pub fn set_notifier(&mut self, notifier: Box<dyn Notifier>) {
        self.notifier = Some(notifier);
    }

    /// The rule engine, to compile the scripts of a [`Policy`].
    pub fn rules(&self) -> &RuleEngine {
        &self.rules
    }

    /// The repository.
    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    /// Applies a batch in one transaction and commits it with its checkpoint, provided the
    /// stored checkpoint is still `expected`.
    pub fn apply_batch(
        &self,
        policy: &Policy,
        expected: Option<&Checkpoint>,
        batch: &ChangeBatch,
    ) -> Result<BatchReport, EngineError> {
        self.apply_batch_with(policy, expected, batch, &mut |_| {})
    }

    /// [`Engine::apply_batch`], calling `each` with every decision as it is made (progress).
    pub fn apply_batch_with(
        &self,
        policy: &Policy,
        expected: Option<&Checkpoint>,
        batch: &ChangeBatch,
        each: &mut dyn FnMut(&Decision),
    ) -> Result<BatchReport, EngineError> {
        match self.run_batch(policy, batch, each) {
            Ok(report) => {
                let started = std::time::Instant::now();
                self.repo
                    .commit_batch(&policy.resource, expected, batch.checkpoint.as_ref())?;
                tracing::debug!(
                    resource = %policy.resource,
                    events = batch.events.len(),
                    "batch committed in {:?}",
                    started.elapsed()
                );
                Ok(report)
            }
            Err(e) => {
                if let Err(rb) = self.repo.rollback() {
                    tracing::error!(resource = %policy.resource, "rollback failed: {rb}");
                }
                Err(e)
            }
        }
    }

    /// Decides a batch exactly as [`Engine::apply_batch`] would, then rolls everything
    /// back: the repository, the checkpoint and the failed-event list are untouched.
    /// `each` sees every decision. An `on_error: halt` stop is reported as an error.
    pub fn preview_batch(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
        each: &mut dyn FnMut(&Decision),
    ) -> Result<BatchReport, EngineError> {
        let result = self.run_batch(policy, batch, each);
        self.repo.rollback()?;
        result
    }

    /// Opens the batch transaction and decides every event in it, optimistically first
    /// (see the crate documentation), again with savepoints if an event failed after
    /// writing. Leaves the transaction open on success, for the caller to commit or roll
    /// back.
    fn run_batch(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
        each: &mut dyn FnMut(&Decision),
    ) -> Result<BatchReport, EngineError> {
        let mut progress = Progress {
            each,
            reported: 0,
            redo: false,
        };
        let guard = if policy.process.is_some() {
            Guard::Savepoints
        } else {
            Guard::Optimistic
        };
        let result = self.run_batch_guarded(policy, batch, guard, &mut progress);
        // Past the last event: a crash from here on (the commit) is no event's doing.
        if let Some(g) = &self.guard {
            g.idle();
        }
        result
    }

    /// [`Engine::run_batch`] once the guard is chosen.
    fn run_batch_guarded(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
        guard: Guard,
        progress: &mut Progress<'_>,
    ) -> Result<BatchReport, EngineError> {
        self.repo.begin()?;
        match self.apply_in_tx(policy, batch, guard, progress)? {
            Some(report) => Ok(report),
            None => {
                tracing::debug!(resource = %policy.resource, "an event failed after writing: deciding the batch again with a savepoint per event");
                self.repo.rollback()?;
                self.repo.begin()?;
                progress.redo = true;
                self.apply_in_tx(policy, batch, Guard::Savepoints, progress)?
                    .ok_or_else(|| {
                        EngineError::Repo(RepoError::Corrupt {
                            what: format!("batch of resource {}", policy.resource),
                            message: "an event kept effects although it ran in a savepoint"
                                .to_owned(),
                        })
                    })
            }
        }
    }

    /// Decides the events of `batch` in the open transaction. `None`: running
    /// [`Guard::Optimistic`], an event failed after writing; the caller rolls back and
    /// runs the batch again with savepoints.
    fn apply_in_tx(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
        guard: Guard,
        progress: &mut Progress<'_>,
    ) -> Result<Option<BatchReport>, EngineError> {
        let mut report = BatchReport {
            resource: policy.resource.clone(),
            ..BatchReport::default()
        };
        for reject in &batch.rejects {
            if !progress.redo {
                tracing::warn!(resource = %policy.resource, origin = %reject.origin, "rejected input: {}", reject.reason);
            }
            if policy.on_error == OnError::Halt {
                return Err(EngineError::Halted {
                    resource: policy.resource.clone(),
                    key: reject.key.clone().unwrap_or_else(|| reject.origin.clone()),
                    error: reject_error(reject),
                });
            }
            self.repo.record_failure(&NewFailure {
                resource: &policy.resource,
                key: reject.key.as_deref(),
                origin: Some(&reject.origin),
                error: &reject_error(reject),
                event: None,
                decision_id: None,
            })?;
            report.rejected += 1;
        }
        if batch.rejects_complete {
            // Rejected input recorded before and not rejected again was fixed at the source.
            let current: Vec<(Option<String>, Option<String>, String)> = batch
                .rejects
                .iter()
                .map(|r| (r.key.clone(), Some(r.origin.clone()), reject_error(r)))
                .collect();
            let cleared = self.repo.clear_fixed_rejects(&policy.resource, &current)?;
            if cleared > 0 && !progress.redo {
                tracing::info!(resource = %policy.resource, "{cleared} rejected input row(s) fixed at the source: cleared from the failed events");
            }
        }
        // Superseding old failed events costs a statement per event: skip it while the
        // resource has none.
        let mut failures_pending = self.repo.has_failures(&policy.resource)?;
        let needs = ScopeNeeds::of(policy);
        for (index, event) in batch.events.iter().enumerate() {
            let crashes = self.guard.as_ref().and_then(|g| g.before(event));
            let mut d = match (crashes, guard) {
                (Some(times), _) => isolated(event, times),
                (None, Guard::Savepoints) => self.decide_event(policy, needs, event, true)?,
                (None, Guard::Optimistic) => {
                    let writes = self.repo.write_count()?;
                    let d = self.decide_event(policy, needs, event, false)?;
                    if d.error.is_some() && self.repo.write_count()? != writes {
                        return Ok(None);
                    }
                    d
                }
            };
            if crashes.is_none()
                && let Some(g) = &self.guard
            {
                g.after(event, d.error.is_none());
            }
            if batch.reconcile {
                // The rules saw the event's own op; the record says a reconcile decided it.
                d.op = Op::Reconcile;
            }
            let fresh = index >= progress.reported;
            let id = self.repo.record_decision(&d)?;
            if let Some(error) = &d.error {
                if fresh {
                    // In the event's span (at the warning's level, so that it is there
                    // whatever the log level): `span.resource`, `span.key` in JSON logs.
                    let _span =
                        tracing::warn_span!("event", resource = %event.resource, key = %event.key)
                            .entered();
                    tracing::warn!("event failed: {error}");
                }
                if policy.on_error == OnError::Halt {
                    return Err(EngineError::Halted {
                        resource: policy.resource.clone(),
                        key: event.key.clone(),
                        error: error.clone(),
                    });
                }
                self.repo.record_failure(&NewFailure {
                    resource: &event.resource,
                    key: Some(&event.key),
                    origin: event.origin.as_deref(),
                    error,
                    event: Some(event),
                    decision_id: Some(id),
                })?;
                failures_pending = true;
            } else if failures_pending {
                // A newer change of this account succeeded: older failed events of it
                // would apply stale data if re-run.
                self.repo.supersede_failures(&event.resource, &event.key)?;
            }
            if event.op == Op::Delete {
                self.repo.delete_shadow(&event.resource, &event.key)?;
            } else {
                self.repo
                    .put_shadow(&event.resource, &event.key, &event.attrs)?;
            }
            report.count(&d);
            if fresh {
                (progress.each)(&d);
                progress.reported = index + 1;
            }
        }
        Ok(Some(report))
    }

    /// Decides one event; with `savepoint`, inside a savepoint so that its effects stay
    /// only if it succeeds. Repository failures other than refusals (IO, SQL) abort the
    /// batch.
    fn decide_event(
        &self,
        policy: &Policy,
        needs: ScopeNeeds,
        event: &ChangeEvent,
        savepoint: bool,
    ) -> Result<Decision, EngineError> {
        let _span =
            tracing::info_span!("event", resource = %event.resource, key = %event.key).entered();
        if savepoint {
            self.repo.savepoint()?;
        }
        let mut d = blank_decision(event);
        let mut decider = Decider::new(&self.rules, &self.repo, policy, needs, event);
        decider.host.capture.set(self.notifier.is_some());
        let outcome = decider
            .decide(&mut d)
            .and_then(|()| self.notify(&decider.host.pre_images.borrow(), &mut d));
        match outcome {
            Ok(()) => {
                if savepoint {
                    self.repo.release()?;
                }
            }
            Err(EventError::Repo(e)) if is_infrastructure(&e) => {
                if savepoint {
                    self.repo.rollback_savepoint()?;
                }
                return Err(EngineError::Repo(e));
            }
            Err(e) => {
                if savepoint {
                    self.repo.rollback_savepoint()?;
                }
                d.action = Action::Failed;
                d.error = Some(e.to_string());
                d.changes.clear();
            }
        }
        Ok(d)
    }

    /// Step 9: hands each identity the event changed to the notifier and enqueues the
    /// messages it returns, inside the event's savepoint.
    fn notify(
        &self,
        pre_images: &[(String, Option<idsync_core::Identity>)],
        d: &mut Decision,
    ) -> Result<(), EventError> {
        let Some(notifier) = &self.notifier else {
            return Ok(());
        };
        for (name, before) in pre_images {
            let after = self.repo.identity(name)?;
            if before.is_none() && after.is_none() {
                continue;
            }
            let change = IdentityChange {
                before: before.as_ref(),
                after: after.as_ref(),
                decision: d,
            };
            let messages = notifier.messages(&change).map_err(EventError::Notify)?;
            for m in messages {
                self.repo.outbox_insert(&m)?;
                // Recorded in the decision, so preview, explain and fixtures show it.
                d.rules.push(RuleOutcome {
                    rule: NOTIFICATION_RULE.to_owned(),
                    script: m.policy.clone(),
                    result: match &m.dead {
                        None => format!("to {}: {}", m.mail.to.join(", "), m.mail.subject),
                        Some(why) => format!("not sendable ({why}): {}", m.mail.subject),
                    },
                });
            }
        }
        Ok(())
    }

    /// Re-runs a failed event in its own transaction. On success the failed row is
    /// removed; otherwise its attempt count and error are updated. Either way a decision
    /// is recorded.
    pub fn retry(&self, policy: &Policy, failure: &FailedEvent) -> Result<Decision, EngineError> {
        let Some(event) = &failure.event else {
            return Err(EngineError::NotRetriable {
                id: failure.id,
                reason: format!(
                    "the input could not be read ({}); fix the source and the next pass reads it again",
                    failure.error
                ),
            });
        };
        self.repo.begin()?;
        let result = (|| {
            let d = match self.guard.as_ref().and_then(|g| g.before(event)) {
                Some(times) => isolated(event, times),
                None => {
                    let d = self.decide_event(policy, ScopeNeeds::of(policy), event, true);
                    if let Some(g) = &self.guard {
                        if let Ok(d) = &d {
                            g.after(event, d.error.is_none());
                        }
                        g.idle();
                    }
                    d?
                }
            };
            self.repo.record_decision(&d)?;
            match &d.error {
                None => {
                    self.repo.remove_failure(failure.id)?;
                }
                Some(e) => self.repo.note_retry_failure(failure.id, e)?,
            }
            Ok::<_, EngineError>(d)
        })();
        match result {
            Ok(d) => {
                self.repo.commit()?;
                Ok(d)
            }
            Err(e) => {
                if let Err(rb) = self.repo.rollback() {
                    tracing::error!("rollback failed: {rb}");
                }
                Err(e)
            }
        }
    }
}

/// The failed decision of an event isolated because it crashed the process `times`
/// times: no rule runs.
fn isolated(event: &ChangeEvent, times: u32) -> Decision {
    let mut d = blank_decision(event);
    d.error = Some(EventError::Crashed { times }.to_string());
    d
}

/// How a batch undoes the effects of a failed event (see the crate documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    /// No savepoints; an event that fails after writing sends the batch back.
    Optimistic,
    /// A savepoint around every event.
    Savepoints,
}

/// The progress callback of a batch and how many decisions it has seen, so a batch run
/// again with savepoints does not report (or log) the same event twice.
struct Progress<'a> {
    each: &'a mut dyn FnMut(&Decision),
    reported: usize,
    redo: bool,
}

/// Repository errors that are not about this event (IO, locking, damaged data): they
/// abort the batch instead of failing one event.
fn is_infrastructure(e: &RepoError) -> bool {
    !matches!(
        e,
        RepoError::VersionConflict { .. }
            | RepoError::NameTaken { .. }
            | RepoError::NoSuchIdentity { .. }
            | RepoError::AlreadyLinked { .. }
            | RepoError::EmptyQuery
            | RepoError::BinaryCondition { .. }
            | RepoError::EmptyName
    )
}

/// The error recorded for rejected input: where it came from and why.
fn reject_error(r: &idsync_core::Reject) -> String {
    format!("{}: {}", r.origin, r.reason)
}

#[cfg(test)]
mod tests;
