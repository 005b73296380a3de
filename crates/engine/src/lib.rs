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
//! On PostgreSQL an optimistic batch also *speculates* (the repository's module
//! `speculation`): the owners and identities of its accounts are read first, the
//! correlation rules run ahead so that what their queries find is read in one query
//! (`Engine::read_correlation_ahead`; the rules run again when each account is decided),
//! and the writes whose outcome the repository predicts are sent without waiting. A wrong
//! guess is an error of its own (`RepoError::is_mispredicted`): the batch is rolled back
//! and decided again without speculating, where the same situation is the usual refusal of
//! one event.
//!
//! A batch marked `reconcile` (a part of a reconcile) is decided exactly like any other;
//! its decision records say op `reconcile`, while the rules saw the event's own op.
//!
//! Work items: an event that leaves its situation to an operator (`on_disputed` /
//! `on_unmatched: work_item`, fuzzy candidates (module `fuzzy`), or a rule's
//! `ctx.work_item`) raises a work item in the same
//! transaction, inside the event's guard like any of its writes, and the item notes its
//! decision record's id once that is written; a crash leaves both or neither. Operators
//! act through [`Engine::apply_operator`]: the same pipeline with the outcome forced
//! (module `pipeline`), recorded as a decision of op `operator`, its notifications queued
//! like a rule's, the work items it settles closed, all in one transaction.
//!
//! Lifecycle (modules `lifecycle`, `timers`): a leaver's grace-period delete and the
//! `valid_from` / `valid_to` dates are timers in the repository, planned, moved or
//! cancelled in the transaction of the decision, and fired later by
//! [`Engine::fire_due_timers`] as decisions of op `timer`, each with the removal of its
//! timer in one transaction.
//!
//! Poison events: an event that makes the process die (an abort, an out-of-memory kill)
//! rolls its whole batch back, and the next start would apply it again. A [`CrashGuard`]
//! set by the agent is told which event is being decided; when it says an event crashed
//! the process twice, the engine isolates it: a failed event ("crashed the agent"),
//! decided without running any rule, its shadow updated like any failed event's, so the
//! batch and the resource go on.

mod authority;
mod fuzzy;
mod guard;
mod host;
mod lifecycle;
mod notifier;
mod pipeline;
mod policy;
mod timers;

use std::collections::BTreeMap;
use std::sync::Arc;

use idsync_core::{
    Action, ChangeBatch, ChangeEvent, Checkpoint, Decision, Op, RuleOutcome, Situation,
};
use idsync_repo::{
    FailedEvent, NewFailure, NewWorkItem, Repo, RepoError, Resolution, WorkItemFilter,
    WorkItemKind, WorkItemState,
};
use idsync_rules::{Limits, RuleEngine};

pub use authority::{AUTHORITY_RULE, Authority};
pub use fuzzy::{DEFAULT_BLOCK_LIMIT, Fuzzy, MAX_SIMILAR};
pub use guard::CrashGuard;
pub use lifecycle::{
    Bound, LIFECYCLE_RULE, Lifecycle, TIMER_RULE, format_delay, format_time, parse_date,
};
pub use notifier::{IdentityChange, Notifier, WorkItemNotice};
pub use pipeline::{
    DISABLED_CHANGE, EventError, FUZZY_RULE, NORMALISED_RULE, OPERATOR_RULE, OperatorAction,
    Refusal, WORK_ITEM_RULE,
};
pub use policy::{DeleteAction, Escalation, Mapping, MappingSource, OnError, Policy, Strength};
pub use timers::FiredTimer;

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
    /// An operator's request was refused before anything changed (an unknown identity,
    /// account or work item, a closed item, an account linked already).
    #[error("{0}")]
    Refused(Refusal),
    /// An operator's request failed while it was applied (a mapping or naming rule failed,
    /// the name is taken, a notification policy failed): nothing of it was kept but its
    /// failed decision record.
    #[error("account {key} of {resource}: {error}")]
    OperatorFailed {
        /// Resource.
        resource: String,
        /// Account key.
        key: String,
        /// Why.
        error: String,
        /// The failed decision's record.
        decision_id: i64,
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
    /// Lifecycle timers the batch planned, moved or cancelled (the agent's timer thread
    /// looks at its next due time again when this is not zero).
    pub timers: u64,
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
        self.timers += other.timers;
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
        self.timers += d.rules.iter().filter(|r| r.rule == TIMER_RULE).count() as u64;
    }
}

/// The engine: a sandboxed rule engine and the repository. Not `Send` (the rule engine
/// is per thread).
pub struct Engine {
    rules: RuleEngine,
    repo: Arc<Repo>,
    notifier: Option<Box<dyn Notifier>>,
    guard: Option<Box<dyn CrashGuard>>,
    /// The attributes `authority:` governs and every resource's mappings.
    authority: Option<Authority>,
    /// Deciding for a preview (everything is rolled back): nothing is logged as done.
    previewing: std::cell::Cell<bool>,
}

impl Engine {
    /// An engine over `repo` whose scripts run with `limits`.
    pub fn new(repo: Arc<Repo>, limits: &Limits) -> Engine {
        Engine {
            rules: RuleEngine::new(limits),
            repo,
            notifier: None,
            guard: None,
            authority: None,
            previewing: std::cell::Cell::new(false),
        }
    }

    /// Sets the crash guard: told of every event before it is decided (batches and
    /// retries), it may have the engine isolate an event that crashed the process.
    pub fn set_crash_guard(&mut self, guard: Box<dyn CrashGuard>) {
        self.guard = Some(guard);
    }

    /// Sets the attribute authority (module `authority`): the governed attributes'
    /// precedence and every resource's policy, to decide those attributes from all of an
    /// identity's linked accounts.
    pub fn set_authority(&mut self, authority: Authority) {
        self.authority = Some(authority);
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
        let before = self.previewing.replace(true);
        let result = self.run_batch(policy, batch, each);
        self.previewing.set(before);
        self.repo.rollback()?;
        result
    }

    /// This engine decides for a dry run only (a preview applying parts to a scratch copy
    /// of the repository): what it raises is not logged as if it had happened.
    pub fn mark_dry_run(&self) {
        self.previewing.set(true);
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

    /// [`Engine::run_batch`] once the guard is chosen. An optimistic run speculates on
    /// PostgreSQL (the repository's module `speculation`); a wrong guess sends the batch
    /// back, to be decided again without speculating.
    fn run_batch_guarded(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
        guard: Guard,
        progress: &mut Progress<'_>,
    ) -> Result<BatchReport, EngineError> {
        self.repo.begin()?;
        let mut decided = None;
        let keys: Vec<&str> = batch.events.iter().map(|e| e.key.as_str()).collect();
        if guard == Guard::Optimistic && self.repo.speculate(&policy.resource, &keys)? {
            let speculated = self
                .read_correlation_ahead(policy, batch)
                .and_then(|()| self.apply_in_tx(policy, batch, guard, progress))
                .and_then(|report| {
                    self.repo.settle_speculation()?;
                    Ok(report)
                });
            match speculated {
                Err(EngineError::Repo(e)) if e.is_mispredicted() => {
                    tracing::debug!(resource = %policy.resource, "the batch's speculation guessed wrong ({e}): deciding it again without");
                    self.repo.rollback()?;
                    self.repo.begin()?;
                    progress.redo = true;
                }
                other => decided = Some(other?),
            }
        }
        let decided = match decided {
            Some(d) => d,
            None => self.apply_in_tx(policy, batch, guard, progress)?,
        };
        match decided {
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

    /// For a speculating batch: runs the correlation rule of each account of `batch` no
    /// identity owns, and has the repository read what those queries will find in one go
    /// (instead of one query per account while deciding). The rule runs again when the
    /// account is decided: this reading is only a hint, and the rule is read-only. The crash
    /// guard is told of each account first (a rule that kills the process is traced to its
    /// event here too; an isolated event is passed over).
    fn read_correlation_ahead(
        &self,
        policy: &Policy,
        batch: &ChangeBatch,
    ) -> Result<(), EngineError> {
        let Some(script) = &policy.correlation else {
            return Ok(());
        };
        let needs = ScopeNeeds::of(policy);
        let mut queries = Vec::new();
        for event in &batch.events {
            if event.op == Op::Delete
                || self.repo.owner_of(&event.resource, &event.key)?.is_some()
                || self
                    .guard
                    .as_ref()
                    .is_some_and(|g| g.before(event).is_some())
            {
                continue;
            }
            let mut decider = Decider::new(&self.rules, &self.repo, policy, needs, event);
            if let Some(q) = decider.correlation_queries(script) {
                queries.extend(q);
            }
        }
        self.repo.prefetch_find(&queries)?;
        Ok(())
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
            let (mut d, raised) = match (crashes, guard) {
                (Some(times), _) => (isolated(event, times), Vec::new()),
                (None, Guard::Savepoints) => self.decide_event(policy, needs, event, true)?,
                (None, Guard::Optimistic) => {
                    let writes = self.repo.write_count()?;
                    let decided = self.decide_event(policy, needs, event, false)?;
                    if decided.0.error.is_some() && self.repo.write_count()? != writes {
                        return Ok(None);
                    }
                    decided
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
            for item in raised {
                self.repo.note_work_item_decision(item, id)?;
            }
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
    /// batch. Returns the decision and the ids of the work items it raised (to note the
    /// decision record on once it is written).
    fn decide_event(
        &self,
        policy: &Policy,
        needs: ScopeNeeds,
        event: &ChangeEvent,
        savepoint: bool,
    ) -> Result<(Decision, Vec<i64>), EngineError> {
        let _span =
            tracing::info_span!("event", resource = %event.resource, key = %event.key).entered();
        if savepoint {
            self.repo.savepoint()?;
        }
        let mut d = blank_decision(event);
        let mut decider = Decider::new(&self.rules, &self.repo, policy, needs, event);
        decider.host.capture.set(self.notifier.is_some());
        decider.authority = self.authority.as_ref();
        let mut raised = Vec::new();
        let outcome = decider
            .decide(&mut d)
            .and_then(|()| {
                self.raise_work_items(&decider.raise, &decider.similar, event, &mut d, &mut raised)
            })
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
                raised.clear();
            }
        }
        Ok((d, raised))
    }

    /// Writes the work items the event raised (module doc): a new one is handed to the
    /// notifier, one seen again only refreshed. Their ids go to `raised`. `similar`: the
    /// fuzzy candidates, the candidates of a `similar` item.
    fn raise_work_items(
        &self,
        items: &[(WorkItemKind, String)],
        similar: &[String],
        event: &ChangeEvent,
        d: &mut Decision,
        raised: &mut Vec<i64>,
    ) -> Result<(), EventError> {
        for (kind, reason) in items {
            // The candidates that made the situation (confirmation's survivors), else those
            // correlation found (an unmatched account whose candidates were all dropped);
            // for a similar item, the fuzzy candidates.
            let candidates = if *kind == WorkItemKind::Similar {
                similar.to_vec()
            } else if d.confirmed.is_empty() {
                d.candidates.clone()
            } else {
                d.confirmed.clone()
            };
            let r = self.repo.raise_work_item(&NewWorkItem {
                resource: &event.resource,
                key: &event.key,
                kind: *kind,
                reason,
                candidates: &candidates,
            })?;
            raised.push(r.id);
            // (In the event's span: `span.resource`, `span.key` in JSON logs.)
            if !self.previewing.get() {
                if r.new {
                    tracing::info!("work item #{} opened: {reason}", r.id);
                } else {
                    tracing::info!("work item #{} raised again (still open)", r.id);
                }
            }
            if !r.new {
                continue;
            }
            let Some(notifier) = &self.notifier else {
                continue;
            };
            let notice = WorkItemNotice {
                id: r.id,
                kind: *kind,
                reason,
                candidates: &candidates,
                account: &event.attrs,
                decision: d,
            };
            let messages = notifier.work_item(&notice).map_err(EventError::Notify)?;
            self.enqueue(messages, d)?;
        }
        Ok(())
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
            self.enqueue(messages, d)?;
        }
        Ok(())
    }

    /// Inserts `messages` into the outbox and records each in the decision, so preview,
    /// explain and fixtures show it.
    fn enqueue(
        &self,
        messages: Vec<idsync_repo::NewOutboxMessage>,
        d: &mut Decision,
    ) -> Result<(), EventError> {
        for m in messages {
            self.repo.outbox_insert(&m)?;
            d.rules.push(RuleOutcome {
                rule: NOTIFICATION_RULE.to_owned(),
                script: m.policy.clone(),
                result: match &m.dead {
                    None => format!("to {}: {}", m.mail.to.join(", "), m.mail.subject),
                    Some(why) => format!("not sendable ({why}): {}", m.mail.subject),
                },
            });
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
                Some(times) => (isolated(event, times), Vec::new()),
                None => {
                    let d = self.decide_event(policy, ScopeNeeds::of(policy), event, true);
                    if let Some(g) = &self.guard {
                        if let Ok((d, _)) = &d {
                            g.after(event, d.error.is_none());
                        }
                        g.idle();
                    }
                    d?
                }
            };
            let (d, raised) = d;
            let id = self.repo.record_decision(&d)?;
            for item in raised {
                self.repo.note_work_item_decision(item, id)?;
            }
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

/// An operator's request about one account ([`Engine::apply_operator`]).
#[derive(Clone, Copy, Debug)]
pub struct OperatorRequest<'a> {
    /// Resource.
    pub resource: &'a str,
    /// Account key.
    pub key: &'a str,
    /// What to do.
    pub action: &'a OperatorAction,
    /// The work item this settles (`work-items resolve ID`), which must be open and about
    /// this account.
    pub work_item: Option<i64>,
    /// Why, as the operator said (kept in the decision and the closed items).
    pub reason: Option<&'a str>,
}

/// What an operator's request did.
#[derive(Clone, Debug)]
pub struct OperatorOutcome {
    /// The decision record's id.
    pub decision_id: i64,
    /// The decision (op `operator`).
    pub decision: Decision,
    /// The work items it closed.
    pub closed: Vec<i64>,
}

impl Engine {
    /// Applies an operator's decision about one account in one transaction: the pipeline
    /// with the outcome forced (the account's last seen attributes through the resource's
    /// mappings and naming), its notifications queued, one decision record of op
    /// `operator`, and the work items it settles closed: the one named, and for a link or
    /// a create every open disputed or unmatched item of the account. A link or create
    /// also supersedes the account's failed events. A refusal or failure changes nothing.
    pub fn apply_operator(
        &self,
        policy: &Policy,
        req: &OperatorRequest<'_>,
    ) -> Result<OperatorOutcome, EngineError> {
        self.repo.begin()?;
        match self.operate_in_tx(policy, req) {
            Ok(outcome) => {
                self.repo.commit()?;
                Ok(outcome)
            }
            Err(e @ EngineError::OperatorFailed { .. }) => {
                // Its effects were undone; its failed decision record is kept.
                self.repo.commit()?;
                Err(e)
            }
            Err(e) => {
                if let Err(rb) = self.repo.rollback() {
                    tracing::error!("rollback failed: {rb}");
                }
                Err(e)
            }
        }
    }

    /// [`Engine::apply_operator`] inside its transaction.
    fn operate_in_tx(
        &self,
        policy: &Policy,
        req: &OperatorRequest<'_>,
    ) -> Result<OperatorOutcome, EngineError> {
        let item = match req.work_item {
            None => None,
            Some(id) => {
                let item = self
                    .repo
                    .work_item(id)?
                    .filter(|i| i.resource == req.resource && i.key == req.key)
                    .ok_or(EngineError::Refused(Refusal::NoSuchWorkItem { id }))?;
                if let Some(c) = &item.closed {
                    let how = match (c.resolution, &c.identity) {
                        (Resolution::Linked, Some(i)) => format!("linked to {i} at {}", c.at),
                        (Resolution::Created, Some(i)) => format!("created {i} at {}", c.at),
                        (r, _) => format!("{} at {}", r.as_str(), c.at),
                    };
                    return Err(EngineError::Refused(Refusal::WorkItemClosed { id, how }));
                }
                Some(item)
            }
        };
        let attrs = self.repo.shadow(req.resource, req.key)?;
        if attrs.is_none() && matches!(req.action, OperatorAction::Link(_) | OperatorAction::Create)
        {
            return Err(EngineError::Refused(Refusal::NoSuchAccount {
                resource: req.resource.to_owned(),
                key: req.key.to_owned(),
            }));
        }
        let event = ChangeEvent {
            resource: req.resource.to_owned(),
            key: req.key.to_owned(),
            op: Op::Operator,
            attrs: attrs.unwrap_or_default(),
            previous: None,
            origin: None,
        };
        let mut d = blank_decision(&event);
        let mut request = req.action.describe();
        if let Some(id) = req.work_item {
            request = format!("work item #{id}: {request}");
        }
        if let Some(reason) = req.reason {
            request = format!("{request} (reason: {reason})");
        }
        d.rules.push(RuleOutcome {
            rule: OPERATOR_RULE.to_owned(),
            script: String::new(),
            result: request,
        });
        // What an ignored item's account is, when no identity owns it.
        let fallback = match item.as_ref().map(|i| (i.kind, i.candidates.len())) {
            Some((WorkItemKind::Disputed, _)) => Situation::Disputed,
            Some((WorkItemKind::Rule, n)) if n > 1 => Situation::Disputed,
            _ => Situation::Unmatched,
        };
        let needs = ScopeNeeds::of(policy);
        let mut decider = Decider::new(&self.rules, &self.repo, policy, needs, &event);
        decider.host.capture.set(self.notifier.is_some());
        decider.authority = self.authority.as_ref();
        self.repo.savepoint()?;
        let outcome = decider
            .operate(req.action, fallback, &mut d)
            .and_then(|()| self.notify(&decider.host.pre_images.borrow(), &mut d));
        match outcome {
            Ok(()) => self.repo.release()?,
            Err(EventError::Refused(r)) => return Err(EngineError::Refused(r)),
            Err(EventError::Repo(e)) if is_infrastructure(&e) => return Err(e.into()),
            Err(e) => {
                // Undone, and recorded as a failed decision of the operator's.
                self.repo.rollback_savepoint()?;
                let error = e.to_string();
                d.action = Action::Failed;
                d.error = Some(error.clone());
                d.changes.clear();
                let decision_id = self.repo.record_decision(&d)?;
                return Err(EngineError::OperatorFailed {
                    resource: req.resource.to_owned(),
                    key: req.key.to_owned(),
                    error,
                    decision_id,
                });
            }
        }
        let decision_id = self.repo.record_decision(&d)?;
        let resolution = match req.action {
            OperatorAction::Link(_) => Some(Resolution::Linked),
            OperatorAction::Create => Some(Resolution::Created),
            OperatorAction::Ignore => Some(Resolution::Ignored),
            OperatorAction::Unlink => None,
        };
        let mut closed = Vec::new();
        if let Some(resolution) = resolution {
            let mut ids: Vec<i64> = item.iter().map(|i| i.id).collect();
            if resolution != Resolution::Ignored {
                // The account is settled: its open disputed/unmatched items with it.
                let open = self.repo.work_items(&WorkItemFilter {
                    state: Some(WorkItemState::Open),
                    resource: Some(req.resource.to_owned()),
                    key: Some(req.key.to_owned()),
                })?;
                ids.extend(
                    open.iter()
                        .filter(|i| i.kind != WorkItemKind::Rule && !ids.contains(&i.id))
                        .map(|i| i.id)
                        .collect::<Vec<_>>(),
                );
            }
            for id in ids {
                let closure = idsync_repo::NewClosure {
                    resolution,
                    identity: d.identity.as_deref(),
                    decision_id: Some(decision_id),
                    reason: req.reason,
                };
                if self.repo.close_work_item(id, &closure)? {
                    closed.push(id);
                }
            }
            if resolution != Resolution::Ignored {
                // Re-running an older failed event of the account would apply stale data.
                self.repo.supersede_failures(req.resource, req.key)?;
            }
        }
        Ok(OperatorOutcome {
            decision_id,
            decision: d,
            closed,
        })
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
