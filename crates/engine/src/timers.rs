//! Firing lifecycle timers ([`Engine::fire_due_timers`]): each due timer is decided again
//! with the current rules and config, as a decision of op `timer`, its notifications
//! queued like any decision's.
//!
//! Key design choice (crash discipline): a timer's firing — the identity's change, the
//! outbox messages, the decision record and the timer's removal — is one transaction
//! with the others of its round, so a crash leaves a timer pending (fired again after the
//! restart) or fired with its decision, never fired twice. A firing that fails (a delete
//! rule's error, a notification policy's) undoes its own effects only; its decision is
//! recorded as failed and the timer is put off (a minute, doubling up to an hour). Each
//! firing is under the crash guard: one that killed the process twice is recorded as failed
//! without running a rule, and put off the same way.

use std::time::Duration;

use idsync_core::{Action, AttrMap, ChangeEvent, Decision, Op, RuleOutcome, Situation};
use idsync_repo::{Timer, TimerKind, now_ms};

use crate::lifecycle::{TIMER_RULE, Was, dates_of, format_delay, format_time};
use crate::pipeline::{Decider, EventError, blank_decision, disabled_change};
use crate::policy::{DeleteAction, Policy, ScopeNeeds};
use crate::{Engine, EngineError, is_infrastructure};

/// A failed firing is tried again after this, doubled after every attempt …
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// … up to this.
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// One timer fired.
#[derive(Clone, Debug)]
pub struct FiredTimer {
    /// The timer as it was pending.
    pub timer: Timer,
    /// Its decision record's id.
    pub decision_id: i64,
    /// The decision (op `timer`); failed when the firing failed (the timer is put off).
    pub decision: Decision,
}

impl Engine {
    /// Fires at most `max` timers due now, earliest first, in one transaction (module
    /// doc); `only`: those planned by these resources (none: every timer). `policies`
    /// decide them: a timer whose resource has none (no longer configured) fires doing
    /// nothing. Returns what fired; fewer than `max` means none is due any more.
    pub fn fire_due_timers(
        &self,
        policies: &[Policy],
        only: Option<&[String]>,
        max: usize,
    ) -> Result<Vec<FiredTimer>, EngineError> {
        self.repo.begin()?;
        let result = self.fire_in_tx(policies, only, max);
        // Past the last firing: a crash from here on (the commit) is no timer's doing.
        if let Some(g) = &self.guard {
            g.idle();
        }
        match result {
            Ok(fired) => {
                self.repo.commit()?;
                Ok(fired)
            }
            Err(e) => {
                if let Err(rb) = self.repo.rollback() {
                    tracing::error!("rollback failed: {rb}");
                }
                Err(e)
            }
        }
    }

    fn fire_in_tx(
        &self,
        policies: &[Policy],
        only: Option<&[String]>,
        max: usize,
    ) -> Result<Vec<FiredTimer>, EngineError> {
        let now = now_ms();
        let due = self.repo.due_timers(now, max, only)?;
        let mut fired = Vec::with_capacity(due.len());
        for t in due {
            let policy = policies.iter().find(|p| p.resource == t.resource);
            let traced = traced_as(&t);
            let d = match &self.guard {
                None => self.fire_one(policy, &t, now)?,
                Some(g) => match g.before(&traced) {
                    Some(times) => {
                        g.forget(&traced);
                        isolated(&t, times)
                    }
                    None => {
                        let d = self.fire_one(policy, &t, now)?;
                        g.after(&traced, d.error.is_none());
                        d
                    }
                },
            };
            let decision_id = self.repo.record_decision(&d)?;
            let _span =
                tracing::info_span!("event", resource = %t.resource, key = %t.key).entered();
            match &d.error {
                None => tracing::info!(
                    "timer #{} ({} of {}) fired: {}",
                    t.id,
                    t.kind,
                    t.identity,
                    d.action
                ),
                Some(e) => {
                    let wait = RETRY_FIRST
                        .saturating_mul(1 << t.attempts.clamp(0, 16))
                        .min(RETRY_MAX);
                    let next = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(0));
                    self.repo.postpone_timer(t.id, next, e)?;
                    tracing::warn!(
                        "timer #{} ({} of {}) failed; next attempt at {}: {e}",
                        t.id,
                        t.kind,
                        t.identity,
                        format_time(next)
                    );
                }
            }
            fired.push(FiredTimer {
                timer: t,
                decision_id,
                decision: d,
            });
        }
        Ok(fired)
    }

    /// Decides one timer in a savepoint: its effects stay only if it succeeds.
    fn fire_one(
        &self,
        policy: Option<&Policy>,
        t: &Timer,
        now: i64,
    ) -> Result<Decision, EngineError> {
        // The account as last seen (a delete rule may judge whether it is still gone).
        let shadow = self.repo.shadow(&t.resource, &t.key)?;
        let event = ChangeEvent {
            resource: t.resource.clone(),
            key: t.key.clone(),
            op: Op::Update,
            attrs: shadow.clone().unwrap_or_default(),
            previous: shadow,
            origin: None,
        };
        let mut d = blank_decision(&event);
        d.op = Op::Timer;
        d.identity = Some(t.identity.clone());
        d.rules.push(RuleOutcome {
            rule: TIMER_RULE.to_owned(),
            script: String::new(),
            result: format!(
                "timer #{}: {} of {} due {} ({}), fired",
                t.id,
                t.kind,
                t.identity,
                format_time(t.due_at),
                t.reason
            ),
        });
        self.repo.savepoint()?;
        let outcome = match policy {
            None => {
                d.situation = Some(Situation::Linked);
                d.action = Action::Ignored;
                note(
                    &mut d,
                    format!(
                        "resource {} is no longer configured: nothing done",
                        t.resource
                    ),
                );
                self.repo
                    .remove_timer(t.id)
                    .map(drop)
                    .map_err(EventError::from)
            }
            Some(p) => {
                let mut decider =
                    Decider::new(&self.rules, &self.repo, p, ScopeNeeds::of(p), &event);
                decider.host.capture.set(self.notifier.is_some());
                decider
                    .fire(t, now, &mut d)
                    .and_then(|()| self.notify(&decider.host.pre_images.borrow(), &mut d))
            }
        };
        match outcome {
            Ok(()) => self.repo.release()?,
            Err(EventError::Repo(e)) if is_infrastructure(&e) => {
                self.repo.rollback_savepoint()?;
                return Err(e.into());
            }
            Err(e) => {
                self.repo.rollback_savepoint()?;
                d.action = Action::Failed;
                d.error = Some(e.to_string());
                d.changes.clear();
            }
        }
        Ok(d)
    }
}

/// The firing of `t` as the crash guard knows it: the timer and its attempts so far (a
/// firing that crashed the agent twice is isolated and put off; once put off, the attempts
/// differ and the next try is a new firing to the guard).
fn traced_as(t: &Timer) -> ChangeEvent {
    let mut attrs = AttrMap::new();
    attrs.set_text("timer", t.id.to_string());
    attrs.set_text("kind", t.kind.as_str());
    attrs.set_text("identity", &t.identity);
    attrs.set_text("attempts", t.attempts.to_string());
    ChangeEvent {
        resource: t.resource.clone(),
        key: t.key.clone(),
        op: Op::Timer,
        attrs,
        previous: None,
        origin: None,
    }
}

/// The failed decision of a firing the crash guard isolated: no rule runs; the timer is put
/// off like any failed firing.
fn isolated(t: &Timer, times: u32) -> Decision {
    let mut d = blank_decision(&traced_as(t));
    d.identity = Some(t.identity.clone());
    d.action = Action::Failed;
    d.error = Some(format!(
        "crashed the agent ({times} times) while timer #{} ({} of {}) fired: isolated, its \
         rules were not run; it is tried again after its delay",
        t.id, t.kind, t.identity
    ));
    d
}

fn note(d: &mut Decision, result: String) {
    d.rules.push(RuleOutcome {
        rule: TIMER_RULE.to_owned(),
        script: String::new(),
        result,
    });
}

impl Decider<'_> {
    /// Decides timer `t` again with this policy and applies it, removing it (or moving
    /// it, when the config now puts it later).
    pub(crate) fn fire(&mut self, t: &Timer, now: i64, d: &mut Decision) -> Result<(), EventError> {
        match t.kind {
            TimerKind::Delete => self.fire_delete(t, now, d),
            TimerKind::Enable | TimerKind::Disable => self.fire_date(t, now, d),
        }
    }

    /// The grace period ended: the identity is deleted if the account is still gone and
    /// the resource still says so.
    fn fire_delete(&mut self, t: &Timer, now: i64, d: &mut Decision) -> Result<(), EventError> {
        let name = t.identity.as_str();
        d.situation = Some(Situation::Deleted);
        d.action = Action::Ignored;
        let Some(view) = self.repo.identity(name)? else {
            note(d, format!("{name} no longer exists: nothing done"));
            self.repo.remove_timer(t.id)?;
            return Ok(());
        };
        let (DeleteAction::Disable, Some(after)) =
            (self.policy.delete_action, self.policy.delete_after)
        else {
            note(
                d,
                format!(
                    "the delete_action of {} no longer deletes after a grace period: nothing done",
                    t.resource
                ),
            );
            self.repo.remove_timer(t.id)?;
            return Ok(());
        };
        let due = t
            .planned_at
            .saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
        if due > now {
            note(
                d,
                format!(
                    "the grace period of {} is now {}: moved to {}",
                    t.resource,
                    format_delay(after),
                    format_time(due)
                ),
            );
            self.repo.move_timer(t.id, due)?;
            return Ok(());
        }
        let back: Vec<&str> = view
            .accounts
            .iter()
            .filter(|a| a.resource == t.resource)
            .map(|a| a.key.as_str())
            .collect();
        if !back.is_empty() {
            note(
                d,
                format!(
                    "{name} has account(s) {} on {} again: nothing done",
                    back.join(", "),
                    t.resource
                ),
            );
            self.repo.remove_timer(t.id)?;
            return Ok(());
        }
        // Is the account still gone? Gone from the resource, or there and still a delete
        // by the delete rule (e.g. its status says it left).
        if self.event.previous.is_some() {
            let still_gone = match &self.policy.delete {
                Some(rule) => self.run_truthy("delete", rule, d)?,
                None => false,
            };
            if !still_gone {
                note(
                    d,
                    format!(
                        "account {} is on {} again (not linked to {name}): nothing done",
                        t.key, t.resource
                    ),
                );
                self.repo.remove_timer(t.id)?;
                return Ok(());
            }
        }
        self.host.pre_image(name)?;
        self.repo.delete_identity(name)?;
        let others = self.repo.cancel_timers_of(name)?;
        let others: Vec<String> = others
            .iter()
            .filter(|o| o.id != t.id)
            .map(|o| format!("#{} {}", o.id, o.kind))
            .collect();
        if !others.is_empty() {
            note(
                d,
                format!(
                    "the other timers of {name} cancelled: {}",
                    others.join(", ")
                ),
            );
        }
        d.action = Action::DeletedIdentity;
        Ok(())
    }

    /// A date came: the identity's state is decided again from its dates as they are now
    /// (which also plans its next date timer).
    fn fire_date(&mut self, t: &Timer, now: i64, d: &mut Decision) -> Result<(), EventError> {
        let name = t.identity.as_str();
        d.situation = Some(Situation::Linked);
        d.action = Action::Ignored;
        // Removed first: deciding the dates again plans whatever they still call for.
        self.repo.remove_timer(t.id)?;
        let Some(view) = self.repo.identity(name)? else {
            note(d, format!("{name} no longer exists: nothing done"));
            return Ok(());
        };
        let lifecycle = match (&self.policy.lifecycle, &self.policy.process) {
            (Some(lc), None) => lc.clone(),
            _ => {
                note(
                    d,
                    format!(
                        "resource {} no longer has lifecycle dates: nothing done",
                        t.resource
                    ),
                );
                return Ok(());
            }
        };
        let dates = dates_of(&lifecycle, &view.attrs, name)?;
        // An enable timer fires at valid_from: until then the dates had it disabled.
        let was = match t.kind {
            TimerKind::Enable => Was::Outside,
            _ => Was::Unknown,
        };
        self.host.pre_image(name)?;
        let linked = !view.accounts.is_empty();
        let disabled = self.apply_dates(name, dates, was, view.disabled, linked, now, d)?;
        if disabled != view.disabled {
            self.repo
                .checkin(name, view.version, &view.attrs, disabled)?;
            d.changes.push(disabled_change(view.disabled, disabled));
            d.action = if disabled {
                Action::Disabled
            } else {
                Action::Updated
            };
        }
        Ok(())
    }
}
