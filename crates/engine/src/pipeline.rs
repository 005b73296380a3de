//! The decision for one change event, in the order docs/design.md fixes: filter, process,
//! owner by link, delete, correlation, confirmation, one/none/several candidates,
//! mapping and checkin. Runs inside the open batch transaction; the caller brackets each
//! event in a savepoint so a failure undoes exactly that event's effects.
//!
//! An operator's decision about one account ([`OperatorAction`]: link, create, ignore,
//! unlink) runs through the same steps with the situation's outcome forced: the same
//! linking, naming, mappings and unlinking code, so an operator's link fills the identity
//! exactly as a rule's link would.

use std::rc::Rc;
use std::sync::Arc;

use idsync_core::{
    Action, AttrChange, AttrMap, ChangeEvent, Decision, Identity, Op, RuleOutcome, Situation, Value,
};
use idsync_repo::{Repo, RepoError, WorkItemKind};
use idsync_rules::rhai::{Dynamic, Scope};
use idsync_rules::{
    Access, Context, Correlation, RuleEngine, RuleError, RuleHost, Script, attrs_to_dynamic,
    dynamic_to_values, identity_to_dynamic, parse_correlation, render, truthy,
};

use crate::authority::{Authority, Offer};
use crate::fuzzy::Fuzzy;
use crate::host::EventHost;
use crate::policy::{DeleteAction, Escalation, MappingSource, Policy, ScopeNeeds, Strength};

/// Why one event failed. It becomes a failed-event row; the batch goes on.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// A rule failed or returned an unusable value.
    #[error("{0}")]
    Rule(#[from] RuleError),
    /// The repository refused an effect (name taken, already linked, version conflict).
    #[error("{0}")]
    Repo(#[from] RepoError),
    /// The situation has no configured way out (e.g. disputed without a resolve rule).
    #[error("{0}")]
    Unresolved(String),
    /// A notification policy failed for the event.
    #[error("notification: {0}")]
    Notify(String),
    /// An identity's lifecycle dates cannot be read (the message names the attribute).
    #[error("{0}")]
    Lifecycle(String),
    /// An operator's request cannot apply as asked (nothing was changed).
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// The event crashed the agent while it was applied, `times` times: it is isolated,
    /// its rules are not run again.
    #[error(
        "crashed the agent ({times} times) while this event was applied: isolated, its rules were not run again; fix the cause, then `idsync failed retry`"
    )]
    Crashed {
        /// How many times.
        times: u32,
    },
}

/// What an operator decides about one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    /// Link the account to this identity (moving it from another owner, if any, which
    /// correlation will then not link it to again) and apply the resource's mappings from
    /// the account's last seen attributes.
    Link(String),
    /// Create an identity for the account through the resource's naming and mappings, as
    /// an unmatched account with `create_unmatched` would.
    Create,
    /// Change nothing (closes a work item).
    Ignore,
    /// Remove the account's link; the identity stays as it is, and correlation will not link
    /// the account to it again (an operator can).
    Unlink,
}

impl OperatorAction {
    /// The request in words, for the decision record.
    pub fn describe(&self) -> String {
        match self {
            OperatorAction::Link(name) => format!("link to {name}"),
            OperatorAction::Create => "create an identity".to_owned(),
            OperatorAction::Ignore => "ignore".to_owned(),
            OperatorAction::Unlink => "unlink".to_owned(),
        }
    }
}

/// Why an operator's request was refused before anything changed. Each names what the
/// operator typed, never attribute values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The identity to link to does not exist.
    #[error("no identity named '{name}' (idsync identities list)")]
    NoSuchIdentity {
        /// The name given.
        name: String,
    },
    /// idsync has no record of the account on the resource (no shadow).
    #[error(
        "resource {resource} has no account '{key}' (idsync has not seen it there, or it was deleted)"
    )]
    NoSuchAccount {
        /// Resource.
        resource: String,
        /// The key given.
        key: String,
    },
    /// `--create` for an account that an identity owns.
    #[error(
        "account {key} of {resource} is linked to {owner}; unlink it first (idsync unlink {resource} {key})"
    )]
    AlreadyLinked {
        /// Resource.
        resource: String,
        /// Account key.
        key: String,
        /// Its owner.
        owner: String,
    },
    /// `unlink` of an account no identity owns.
    #[error("account {key} of {resource} is not linked to any identity")]
    NotLinked {
        /// Resource.
        resource: String,
        /// Account key.
        key: String,
    },
    /// No work item has this id.
    #[error("no work item #{id} (idsync work-items list --state all)")]
    NoSuchWorkItem {
        /// The id given.
        id: i64,
    },
    /// The work item was closed already.
    #[error("work item #{id} is closed already ({how})")]
    WorkItemClosed {
        /// The id given.
        id: i64,
        /// How and when it was closed.
        how: String,
    },
}

/// A fresh decision record for `event`, marked failed until decided.
pub(crate) fn blank_decision(event: &ChangeEvent) -> Decision {
    Decision {
        resource: event.resource.clone(),
        key: event.key.clone(),
        op: event.op,
        situation: None,
        action: Action::Failed,
        identity: None,
        candidates: Vec::new(),
        confirmed: Vec::new(),
        rules: Vec::new(),
        changes: Vec::new(),
        error: None,
        at: Some(std::time::SystemTime::now()),
    }
}

/// The `rule` of the [`RuleOutcome`] that records a work item (its `result` is the reason).
pub const WORK_ITEM_RULE: &str = "work_item";

/// The `rule` of the [`RuleOutcome`] that records an operator's request (its `result` is
/// the request in words).
pub const OPERATOR_RULE: &str = "operator";

/// The `rule` of the [`RuleOutcome`] that records the correlation conditions compared in
/// normalised form (its `result`: each such condition, as returned and as compared).
pub const NORMALISED_RULE: &str = "normalised";

/// The `rule` of the [`RuleOutcome`] that records a fuzzy candidate search (its `result`:
/// the block, the account's values and the candidates with their scores).
pub const FUZZY_RULE: &str = "fuzzy";

/// The name of the pseudo-attribute that records enabling and disabling in changes.
pub const DISABLED_CHANGE: &str = "(disabled)";

pub(crate) struct Decider<'a> {
    pub rules: &'a RuleEngine,
    pub repo: &'a Arc<Repo>,
    pub policy: &'a Policy,
    pub event: &'a ChangeEvent,
    pub host: Rc<EventHost>,
    pub scope: Scope<'static>,
    /// The work items this event raises (kind, reason), in order; written by the caller
    /// once the event succeeded.
    pub raise: Vec<(WorkItemKind, String)>,
    /// The fuzzy candidates of a `similar` work item, best first.
    pub similar: Vec<String>,
    /// The attributes the mappings give a new identity for this account, once computed
    /// (a fuzzy search computes them before a create would).
    new_attrs: Option<AttrMap>,
    pub needs: ScopeNeeds,
    /// The attributes `authority:` governs (module `authority`), when any.
    pub authority: Option<&'a Authority>,
    /// What the account's mappings offer for governed attributes (they do not set them).
    pub offers: Vec<Offer>,
}

impl<'a> Decider<'a> {
    pub fn new(
        rules: &'a RuleEngine,
        repo: &'a Arc<Repo>,
        policy: &'a Policy,
        needs: ScopeNeeds,
        event: &'a ChangeEvent,
    ) -> Self {
        // Variables no script names are left out rather than built for every event.
        let mut scope = Scope::new();
        if needs.account || needs.global {
            let account = attrs_to_dynamic(&event.attrs);
            if needs.global {
                scope.push("global", account.clone());
            }
            if needs.account {
                scope.push("account", account);
            }
        }
        if needs.previous {
            scope.push(
                "previous",
                event
                    .previous
                    .as_ref()
                    .map(attrs_to_dynamic)
                    .unwrap_or(Dynamic::UNIT),
            );
        }
        for (needed, name, value) in [
            (needs.resource, "resource", event.resource.as_str()),
            (needs.key, "key", event.key.as_str()),
            (needs.op, "op", event.op.as_str()),
        ] {
            if needed {
                scope.push(name, value.to_owned());
            }
        }
        let host = Rc::new(EventHost::new(repo, &event.resource, &event.key));
        Decider {
            rules,
            repo,
            policy,
            event,
            host,
            scope,
            raise: Vec::new(),
            similar: Vec::new(),
            new_attrs: None,
            needs,
            authority: None,
            offers: Vec::new(),
        }
    }

    fn run(&mut self, script: &Script, access: Access) -> Result<Dynamic, RuleError> {
        let host: Rc<dyn RuleHost> = self.host.clone();
        self.rules
            .run(script, &mut self.scope, Some((host, access)))
    }

    pub(crate) fn run_truthy(
        &mut self,
        role: &str,
        script: &Script,
        d: &mut Decision,
    ) -> Result<bool, RuleError> {
        let v = self.run(script, Access::ReadOnly)?;
        d.rules.push(outcome(role, script, render(&v)));
        truthy(&v).map_err(|msg| {
            RuleError::new(
                script.label(),
                RuleEngine::result_pos(script),
                format!("{role} rule returned {}: {msg}", render(&v)),
            )
        })
    }

    /// Decides and applies the event, filling `d`.
    pub fn decide(&mut self, d: &mut Decision) -> Result<(), EventError> {
        let policy = self.policy;
        // 1. Filter.
        if let Some(f) = &policy.filter
            && !self.run_truthy("filter", f, d)?
        {
            d.situation = Some(Situation::Filtered);
            d.action = Action::Ignored;
            return Ok(());
        }
        // 2. Process rule overrides everything else.
        if let Some(p) = &policy.process {
            d.situation = Some(Situation::Processed);
            self.scope.push("ctx", Context);
            let v = self.run(p, Access::ReadWrite)?;
            d.rules.push(outcome("process", p, render(&v)));
            self.finish_scripted(d, Action::Processed);
            self.cancel_grace_of_rule_links(d)?;
            return Ok(());
        }
        // 3. Owner by link.
        let owner = self.repo.owner_of(&self.event.resource, &self.event.key)?;
        // 4. Delete, by op or by rule.
        let mut is_delete = self.event.op == Op::Delete;
        if !is_delete && let Some(r) = &policy.delete {
            is_delete = self.run_truthy("delete", r, d)?;
        }
        if is_delete {
            d.situation = Some(Situation::Deleted);
            match owner {
                None => d.action = Action::Ignored,
                Some(name) => {
                    d.identity = Some(name.clone());
                    self.withdraw(&name, policy.delete_action, d)?;
                }
            }
            return Ok(());
        }
        if let Some(name) = owner {
            d.situation = Some(Situation::Linked);
            d.identity = Some(name.clone());
            self.update(&name, false, d)?;
            d.action = Action::Updated;
            return Ok(());
        }
        // 4b. A rehire: the account left within a grace period and came back.
        if let Some(t) = self.rehire()? {
            let name = t.identity;
            d.situation = Some(Situation::Unlinked);
            d.identity = Some(name.clone());
            d.candidates = vec![name.clone()];
            d.confirmed = vec![name.clone()];
            d.rules.push(RuleOutcome {
                rule: crate::lifecycle::TIMER_RULE.into(),
                script: String::new(),
                result: format!(
                    "rehire: account {} of {} left {name} within its grace period and came back: linked back",
                    self.event.key, self.event.resource
                ),
            });
            self.host.pre_image(&name)?;
            self.repo
                .link(&name, &self.event.resource, &self.event.key)?;
            self.cancel_grace(&name, d)?;
            self.update(&name, true, d)?;
            d.action = Action::Linked;
            return Ok(());
        }
        // 5. Correlation, without the identities an operator unlinked the account from.
        let candidates = match &policy.correlation {
            Some(c) => self.correlate(c, d)?,
            None => Vec::new(),
        };
        let candidates = self.without_exclusions(candidates, d)?;
        d.candidates = candidates.clone();
        // 6. Confirmation.
        let confirmed = match &policy.confirmation {
            Some(cf) if !candidates.is_empty() => self.confirm(cf, &candidates, d)?,
            _ => candidates,
        };
        d.confirmed = confirmed.clone();
        // 7. One, none or several.
        match confirmed.as_slice() {
            [one] => {
                d.situation = Some(Situation::Unlinked);
                d.identity = Some(one.clone());
                self.host.pre_image(one)?;
                self.repo.link(one, &self.event.resource, &self.event.key)?;
                self.cancel_grace(one, d)?;
                self.update(one, true, d)?;
                d.action = Action::Linked;
            }
            [] => {
                d.situation = Some(Situation::Unmatched);
                let similar = match &policy.fuzzy {
                    Some(f) => self.similar(f, d)?,
                    None => None,
                };
                if let Some(reason) = similar {
                    self.hand_over(WorkItemKind::Similar, reason, d);
                } else if policy.create_unmatched {
                    self.create(d)?;
                } else if policy.on_unmatched == Escalation::WorkItem {
                    let reason = format!(
                        "no identity matches account {} of {}",
                        self.event.key, self.event.resource
                    );
                    self.hand_over(WorkItemKind::Unmatched, reason, d);
                } else if let Some(r) = &policy.resolve {
                    self.resolve(r, &confirmed, d)?;
                } else {
                    return Err(EventError::Unresolved(format!(
                        "{}: no identity matches account {} and create_unmatched is off; configure a resolve rule",
                        self.event.resource, self.event.key
                    )));
                }
            }
            several => {
                d.situation = Some(Situation::Disputed);
                if policy.on_disputed == Escalation::WorkItem {
                    let reason = format!(
                        "account {} of {} matches {} identities: {}",
                        self.event.key,
                        self.event.resource,
                        several.len(),
                        several.join(", ")
                    );
                    self.hand_over(WorkItemKind::Disputed, reason, d);
                } else if let Some(r) = &policy.resolve {
                    self.resolve(r, several, d)?;
                } else {
                    return Err(EventError::Unresolved(format!(
                        "{}: account {} matches {} identities: {}; configure a resolve rule or tighten correlation/confirmation",
                        self.event.resource,
                        self.event.key,
                        several.len(),
                        several.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// `candidates` without the identities an operator unlinked the account from
    /// (repository module `exclusions`), each left out noted in the decision record.
    fn without_exclusions(
        &self,
        candidates: Vec<String>,
        d: &mut Decision,
    ) -> Result<Vec<String>, EventError> {
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let excluded = self
            .repo
            .excluded_for(&self.event.resource, &self.event.key)?;
        if excluded.is_empty() {
            return Ok(candidates);
        }
        let (out, kept): (Vec<String>, Vec<String>) =
            candidates.into_iter().partition(|c| excluded.contains(c));
        for name in out {
            d.rules.push(RuleOutcome {
                rule: OPERATOR_RULE.into(),
                script: String::new(),
                result: format!(
                    "not a candidate: {name} (an operator unlinked this account from it; \
                     idsync link {} {} {name} links it again)",
                    self.event.resource, self.event.key
                ),
            });
        }
        Ok(kept)
    }

    fn finish_scripted(&mut self, d: &mut Decision, action: Action) {
        d.action = action;
        if let Some(name) = self.host.touched.borrow().clone() {
            d.identity = Some(name);
        }
        for w in self.host.work_items.borrow().iter() {
            d.rules.push(RuleOutcome {
                rule: WORK_ITEM_RULE.into(),
                script: String::new(),
                result: w.clone(),
            });
            self.raise.push((WorkItemKind::Rule, w.clone()));
        }
    }

    /// Leaves the situation to an operator: a work item (`on_disputed` / `on_unmatched`).
    fn hand_over(&mut self, kind: WorkItemKind, reason: String, d: &mut Decision) {
        d.action = Action::WorkItem;
        d.rules.push(RuleOutcome {
            rule: WORK_ITEM_RULE.into(),
            script: String::new(),
            result: reason.clone(),
        });
        self.raise.push((kind, reason));
    }

    /// Applies an operator's decision about the account, with the situation it finds
    /// (`fallback`: the situation to record when it changes nothing and finds no owner).
    pub fn operate(
        &mut self,
        action: &OperatorAction,
        fallback: Situation,
        d: &mut Decision,
    ) -> Result<(), EventError> {
        let event = self.event;
        let (resource, key) = (&event.resource, &event.key);
        let owner = self.repo.owner_of(resource, key)?;
        match action {
            OperatorAction::Link(name) => {
                if self.repo.identity_without_accounts(name)?.is_none() {
                    return Err(Refusal::NoSuchIdentity { name: name.clone() }.into());
                }
                d.identity = Some(name.clone());
                match owner {
                    Some(o) if o == *name => {
                        d.situation = Some(Situation::Linked);
                        self.update(name, false, d)?;
                        d.action = Action::Updated;
                        return Ok(());
                    }
                    Some(o) => {
                        d.situation = Some(Situation::Linked);
                        self.host.pre_image(&o)?;
                        self.repo.unlink(resource, key)?;
                        self.repo.exclude(resource, key, &o)?;
                        d.rules.push(RuleOutcome {
                            rule: OPERATOR_RULE.into(),
                            script: String::new(),
                            result: format!("unlinked from {o}"),
                        });
                        if self.authority.is_some_and(|a| !a.is_empty()) {
                            // Its values go with it (their changes are the other
                            // identity's: noted, not among this decision's changes).
                            let previous = self.view(&o)?;
                            self.take_back(&previous, false, Some(&o), d)?;
                        }
                    }
                    None => d.situation = Some(Situation::Unlinked),
                }
                self.host.pre_image(name)?;
                self.repo.link(name, resource, key)?;
                self.repo.clear_exclusion(resource, key, name)?;
                self.cancel_grace(name, d)?;
                self.update(name, true, d)?;
                d.action = Action::Linked;
            }
            OperatorAction::Create => {
                if let Some(owner) = owner {
                    return Err(Refusal::AlreadyLinked {
                        resource: resource.clone(),
                        key: key.clone(),
                        owner,
                    }
                    .into());
                }
                d.situation = Some(Situation::Unmatched);
                self.create(d)?;
            }
            OperatorAction::Ignore => {
                d.situation = Some(if owner.is_some() {
                    Situation::Linked
                } else {
                    fallback
                });
                d.identity = owner;
                d.action = Action::Ignored;
            }
            OperatorAction::Unlink => {
                let Some(owner) = owner else {
                    return Err(Refusal::NotLinked {
                        resource: resource.clone(),
                        key: key.clone(),
                    }
                    .into());
                };
                d.situation = Some(Situation::Linked);
                d.identity = Some(owner.clone());
                self.withdraw(&owner, DeleteAction::Unlink, d)?;
                self.repo.exclude(resource, key, &owner)?;
            }
        }
        Ok(())
    }

    /// The queries the correlation rule returns for the account, for reading ahead (a
    /// speculating batch); `None` when it returns names or nothing, or fails (the decision
    /// runs it again and reports that).
    pub(crate) fn correlation_queries(
        &mut self,
        script: &Script,
    ) -> Option<Vec<idsync_core::Conditions>> {
        let v = self.run(script, Access::ReadOnly).ok()?;
        match parse_correlation(&v).ok()? {
            Correlation::Queries(queries) => Some(queries),
            Correlation::Nothing | Correlation::Names(_) => None,
        }
    }

    fn correlate(&mut self, script: &Script, d: &mut Decision) -> Result<Vec<String>, EventError> {
        let v = self.run(script, Access::ReadOnly)?;
        d.rules.push(outcome("correlation", script, render(&v)));
        let parsed = parse_correlation(&v)
            .map_err(|msg| RuleError::new(script.label(), RuleEngine::result_pos(script), msg))?;
        let mut names = Vec::new();
        match parsed {
            Correlation::Nothing => {}
            Correlation::Names(list) => {
                for n in list {
                    if self.repo.identity(&n)?.is_some() {
                        names.push(n);
                    }
                }
            }
            Correlation::Queries(queries) => {
                self.note_normalised(&queries, d)?;
                for q in &queries {
                    names.extend(self.repo.find(q)?);
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Records, for `explain`, each condition compared in normalised form: the value as the
    /// rule returned it and as compared (the identities' side is indexed in that form).
    fn note_normalised(
        &self,
        queries: &[idsync_core::Conditions],
        d: &mut Decision,
    ) -> Result<(), EventError> {
        let mut noted = Vec::new();
        for (attr, value) in queries.iter().flat_map(|q| q.0.iter()) {
            let Value::Text(text) = value else { continue };
            let n = self.repo.normalisation(attr)?;
            if n.is_exact() {
                continue;
            }
            noted.push(format!("{attr} {text:?} → {:?} ({n})", n.apply(text)));
        }
        if !noted.is_empty() {
            d.rules.push(RuleOutcome {
                rule: NORMALISED_RULE.into(),
                script: String::new(),
                result: noted.join("; "),
            });
        }
        Ok(())
    }

    /// The fuzzy candidates of an account correlation found no identity for (leaving out
    /// those the confirmation dropped), recorded in the decision: `Some(reason)` of the
    /// `similar` work item when there are any, `self.similar` their names.
    fn similar(&mut self, fuzzy: &Fuzzy, d: &mut Decision) -> Result<Option<String>, EventError> {
        let mapped = self.map_attrs(&AttrMap::new(), None)?;
        // Governed attributes are offered, not set (module `authority`): the account's
        // offers count for the comparison as the values a new identity would get.
        let mut compared = mapped.clone();
        for offer in self.offers.iter().filter(|o| !o.values.is_empty()) {
            compared.set(&offer.name, offer.values.clone());
        }
        let found = fuzzy.search(self.repo, &compared, &d.candidates)?;
        self.new_attrs = Some(mapped);
        d.rules.push(RuleOutcome {
            rule: FUZZY_RULE.into(),
            script: String::new(),
            result: fuzzy.report(&found),
        });
        if found.candidates.is_empty() {
            return Ok(None);
        }
        let listed: Vec<String> = found.candidates.iter().map(|c| fuzzy.describe(c)).collect();
        self.similar = found.candidates.into_iter().map(|c| c.name).collect();
        Ok(Some(format!(
            "account {} of {} matches no identity exactly; similar: {}",
            self.event.key,
            self.event.resource,
            listed.join("; ")
        )))
    }

    fn confirm(
        &mut self,
        script: &Script,
        candidates: &[String],
        d: &mut Decision,
    ) -> Result<Vec<String>, EventError> {
        let mut kept = Vec::new();
        for name in candidates {
            let Some(view) = self.repo.identity(name)? else {
                continue;
            };
            let mark = self.scope.len();
            self.scope.push("identity", identity_to_dynamic(&view));
            let result = self.run(script, Access::ReadOnly);
            self.scope.rewind(mark);
            let v = result?;
            d.rules.push(outcome(
                "confirmation",
                script,
                format!("{name}: {}", render(&v)),
            ));
            let keep = truthy(&v).map_err(|msg| {
                RuleError::new(
                    script.label(),
                    RuleEngine::result_pos(script),
                    format!(
                        "confirmation rule returned {} for {name}: {msg}",
                        render(&v)
                    ),
                )
            })?;
            if keep {
                kept.push(name.clone());
            }
        }
        Ok(kept)
    }

    fn resolve(
        &mut self,
        script: &Script,
        candidates: &[String],
        d: &mut Decision,
    ) -> Result<(), EventError> {
        let mark = self.scope.len();
        self.scope.push(
            "candidates",
            Dynamic::from_array(candidates.iter().cloned().map(Dynamic::from).collect()),
        );
        self.scope.push(
            "situation",
            d.situation.map(|s| s.as_str()).unwrap_or("").to_owned(),
        );
        self.scope.push("ctx", Context);
        let result = self.run(script, Access::ReadWrite);
        self.scope.rewind(mark);
        let v = result?;
        d.rules.push(outcome("resolve", script, render(&v)));
        self.finish_scripted(d, Action::Resolved);
        self.cancel_grace_of_rule_links(d)?;
        Ok(())
    }

    /// The mapped attributes: `base`, then every account attribute when populate_global
    /// is on, then each declared mapping.
    fn map_attrs(
        &mut self,
        base: &AttrMap,
        identity: Option<&Identity>,
    ) -> Result<AttrMap, EventError> {
        let mut attrs = base.clone();
        if self.policy.populate_global {
            // A governed attribute comes from mappings only (docs/rules.md).
            for a in self.event.attrs.iter().filter(|a| !self.governed(&a.name)) {
                attrs.set(&a.name, a.values.clone());
            }
        }
        let mark = self.scope.len();
        if self.needs.mapping_identity {
            self.scope.push(
                "identity",
                identity.map(identity_to_dynamic).unwrap_or(Dynamic::UNIT),
            );
        }
        let result = self.apply_mappings(&mut attrs, identity.is_none());
        self.scope.rewind(mark);
        result?;
        Ok(attrs)
    }

    /// Each mapping in list order, by its strength (`creating`: the event creates the
    /// identity). A governed attribute is not set but offered (module `authority`).
    fn apply_mappings(&mut self, attrs: &mut AttrMap, creating: bool) -> Result<(), EventError> {
        self.offers.clear();
        for m in &self.policy.mappings {
            if m.strength == Strength::Initial && !creating {
                continue;
            }
            let governed = self.governed(&m.attribute);
            if m.strength == Strength::Weak && !governed && attrs.contains(&m.attribute) {
                continue;
            }
            let values = self.mapping_values(&m.source)?;
            if governed {
                let attr = m.attribute.to_lowercase();
                self.offers.retain(|o| o.attr != attr);
                self.offers.push(Offer {
                    attr,
                    name: m.attribute.clone(),
                    strength: m.strength,
                    values,
                });
            } else {
                attrs.set(&m.attribute, values);
            }
        }
        Ok(())
    }

    /// The values one mapping gives for the account in hand.
    pub(crate) fn mapping_values(
        &mut self,
        source: &MappingSource,
    ) -> Result<Vec<Value>, EventError> {
        Ok(match source {
            MappingSource::Attribute(src) => self
                .event
                .attrs
                .get(src)
                .map(<[Value]>::to_vec)
                .unwrap_or_default(),
            MappingSource::Expr(script) => {
                let v = self.run(script, Access::ReadOnly)?;
                dynamic_to_values(&v).map_err(|msg| {
                    RuleError::new(script.label(), RuleEngine::result_pos(script), msg)
                })?
            }
        })
    }

    /// The identity view of `name`, which must exist.
    fn view(&self, name: &str) -> Result<Identity, RepoError> {
        self.repo
            .identity(name)?
            .ok_or_else(|| RepoError::NoSuchIdentity {
                name: name.to_owned(),
            })
    }

    /// Maps the account onto an existing identity and checks it in.
    fn update(&mut self, name: &str, relink: bool, d: &mut Decision) -> Result<(), EventError> {
        self.host.pre_image(name)?;
        // The linked accounts (with their last seen attributes) are read only if a
        // mapping can see them through `identity`, or governed attributes are decided
        // from them (module `authority`).
        let governs = self
            .authority
            .is_some_and(|a| a.mapped_by(&self.policy.resource));
        let view = if self.needs.mapping_identity || governs {
            self.view(name)?
        } else {
            self.repo
                .identity_without_accounts(name)?
                .ok_or_else(|| RepoError::NoSuchIdentity {
                    name: name.to_owned(),
                })?
        };
        let mut attrs = self.map_attrs(&view.attrs, Some(&view))?;
        let sources = self.settle(&view, &mut attrs, d)?;
        let mut changes = view.attrs.diff(&attrs);
        // A link re-enables; then the lifecycle dates, if any, have their say.
        let disabled = view.disabled && !relink;
        let before = (!relink).then_some(&view.attrs);
        let disabled = self.settle_dates(name, before, &attrs, disabled, d)?;
        if disabled != view.disabled {
            changes.push(disabled_change(view.disabled, disabled));
        }
        if !changes.is_empty() {
            self.repo.checkin(name, view.version, &attrs, disabled)?;
        }
        self.write_sources(name, sources)?;
        d.changes = changes;
        Ok(())
    }

    fn create(&mut self, d: &mut Decision) -> Result<(), EventError> {
        let name = match &self.policy.naming {
            Some(script) => {
                let v = self.run(script, Access::ReadOnly)?;
                d.rules.push(outcome("naming", script, render(&v)));
                let name = if v.is_string() {
                    v.to_string()
                } else {
                    String::new()
                };
                if name.trim().is_empty() {
                    return Err(RuleError::new(
                        script.label(),
                        RuleEngine::result_pos(script),
                        format!("naming must return a non-empty string, got {}", render(&v)),
                    )
                    .into());
                }
                name
            }
            None => self.event.key.clone(),
        };
        let mut attrs = match self.new_attrs.take() {
            Some(attrs) => attrs,
            None => self.map_attrs(&AttrMap::new(), None)?,
        };
        let sources = self.settle_new(&mut attrs);
        self.host.pre_image(&name)?;
        self.repo.create_identity_with_account(
            &name,
            &attrs,
            Some((&self.event.resource, &self.event.key)),
        )?;
        self.write_sources(&name, sources)?;
        d.changes = AttrMap::new().diff(&attrs);
        // A new identity whose dates say it is not valid yet (or any more).
        if self.settle_dates(&name, None, &attrs, false, d)? {
            self.repo.checkin(&name, 1, &attrs, true)?;
            d.changes.push(disabled_change(false, true));
        }
        d.identity = Some(name);
        d.action = Action::Created;
        Ok(())
    }

    /// Withdraws the account from its owner `name`: unlinks it, takes back the governed
    /// values it gave (module `authority`), then applies `action` (the resource's
    /// `delete_action` for a delete; `Unlink` for an operator's unlink).
    fn withdraw(
        &mut self,
        name: &str,
        action: DeleteAction,
        d: &mut Decision,
    ) -> Result<(), EventError> {
        self.host.pre_image(name)?;
        self.repo.unlink(&self.event.resource, &self.event.key)?;
        d.action = Action::Unlinked;
        let governs = self.authority.is_some_and(|a| !a.is_empty());
        if action == DeleteAction::Unlink && !governs {
            return Ok(());
        }
        let view = self.view(name)?;
        // Still holding another live account on this resource (e.g. rehired under a new
        // key in the same file): the person has not left, so only the account goes.
        let others: Vec<&str> = view
            .accounts
            .iter()
            .filter(|a| a.resource == self.event.resource)
            .map(|a| a.key.as_str())
            .collect();
        let mut disable = false;
        if action != DeleteAction::Unlink && !others.is_empty() {
            d.rules.push(RuleOutcome {
                rule: "delete_action".into(),
                script: String::new(),
                result: format!(
                    "only unlinked: {name} still has account(s) {} on {}",
                    others.join(", "),
                    self.event.resource
                ),
            });
        } else {
            match action {
                DeleteAction::Unlink => {}
                DeleteAction::Disable => {
                    disable = true;
                    d.action = Action::Disabled;
                }
                DeleteAction::Delete => {
                    self.repo.delete_identity(name)?;
                    d.action = Action::DeletedIdentity;
                    let cancelled = self.repo.cancel_timers_of(name)?;
                    if !cancelled.is_empty() {
                        let which: Vec<String> = cancelled
                            .iter()
                            .map(|t| format!("#{} {}", t.id, t.kind))
                            .collect();
                        d.rules.push(RuleOutcome {
                            rule: crate::lifecycle::TIMER_RULE.into(),
                            script: String::new(),
                            result: format!(
                                "the timers of {name} cancelled (it was deleted): {}",
                                which.join(", ")
                            ),
                        });
                    }
                    return Ok(());
                }
            }
        }
        d.changes = self.take_back(&view, disable, None, d)?;
        if disable {
            self.plan_grace_delete(name, d)?;
        }
        Ok(())
    }

    /// Checks identity `view` in without the governed values the account in hand gave it
    /// (it is unlinked from it already), disabled too with `disable`; returns the changes.
    fn take_back(
        &mut self,
        view: &Identity,
        disable: bool,
        from: Option<&str>,
        d: &mut Decision,
    ) -> Result<Vec<AttrChange>, EventError> {
        let mut attrs = view.attrs.clone();
        let sources = self.withdraw_values(view, &mut attrs, from, d)?;
        let mut changes = view.attrs.diff(&attrs);
        let disabled = view.disabled || disable;
        if disabled != view.disabled {
            changes.push(disabled_change(false, true));
        }
        if !changes.is_empty() {
            self.repo
                .checkin(&view.name, view.version, &attrs, disabled)?;
        }
        self.write_sources(&view.name, sources)?;
        Ok(changes)
    }
}

fn outcome(role: &str, script: &Script, result: String) -> RuleOutcome {
    RuleOutcome {
        rule: role.to_owned(),
        script: script.label().to_owned(),
        result,
    }
}

pub(crate) fn disabled_change(before: bool, after: bool) -> AttrChange {
    AttrChange {
        name: DISABLED_CHANGE.to_owned(),
        before: Some(vec![Value::Text(before.to_string())]),
        after: Some(vec![Value::Text(after.to_string())]),
    }
}
