//! The decision for one change event, in the order docs/design.md fixes: filter, process,
//! owner by link, delete, correlation, confirmation, one/none/several candidates,
//! mapping and checkin. Runs inside the open batch transaction; the caller brackets each
//! event in a savepoint so a failure undoes exactly that event's effects.

use std::rc::Rc;
use std::sync::Arc;

use idsync_core::{
    Action, AttrChange, AttrMap, ChangeEvent, Decision, Identity, Op, RuleOutcome, Situation, Value,
};
use idsync_repo::{Repo, RepoError};
use idsync_rules::rhai::{Dynamic, Scope};
use idsync_rules::{
    Access, Context, Correlation, RuleEngine, RuleError, RuleHost, Script, attrs_to_dynamic,
    dynamic_to_values, identity_to_dynamic, parse_correlation, render, truthy,
};

use crate::host::EventHost;
use crate::policy::{DeleteAction, MappingSource, Policy, ScopeNeeds};

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
    }
}

/// The name of the pseudo-attribute that records enabling and disabling in changes.
pub const DISABLED_CHANGE: &str = "(disabled)";

pub(crate) struct Decider<'a> {
    pub rules: &'a RuleEngine,
    pub repo: &'a Arc<Repo>,
    pub policy: &'a Policy,
    pub event: &'a ChangeEvent,
    pub host: Rc<EventHost>,
    pub scope: Scope<'static>,
    needs: ScopeNeeds,
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
            needs,
        }
    }

    fn run(&mut self, script: &Script, access: Access) -> Result<Dynamic, RuleError> {
        let host: Rc<dyn RuleHost> = self.host.clone();
        self.rules
            .run(script, &mut self.scope, Some((host, access)))
    }

    fn run_truthy(
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
                    self.delete_action(&name, d)?;
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
        // 5. Correlation.
        let candidates = match &policy.correlation {
            Some(c) => self.correlate(c, d)?,
            None => Vec::new(),
        };
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
                self.update(one, true, d)?;
                d.action = Action::Linked;
            }
            [] => {
                d.situation = Some(Situation::Unmatched);
                if policy.create_unmatched {
                    self.create(d)?;
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
                if let Some(r) = &policy.resolve {
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

    fn finish_scripted(&self, d: &mut Decision, action: Action) {
        d.action = action;
        if let Some(name) = self.host.touched.borrow().clone() {
            d.identity = Some(name);
        }
        for w in self.host.work_items.borrow().iter() {
            d.rules.push(RuleOutcome {
                rule: "work_item".into(),
                script: String::new(),
                result: w.clone(),
            });
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
                for q in &queries {
                    names.extend(self.repo.find(q)?);
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
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
            for a in self.event.attrs.iter() {
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
        let result = self.apply_mappings(&mut attrs);
        self.scope.rewind(mark);
        result?;
        Ok(attrs)
    }

    fn apply_mappings(&mut self, attrs: &mut AttrMap) -> Result<(), EventError> {
        for m in &self.policy.mappings {
            let values: Vec<Value> = match &m.source {
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
            };
            attrs.set(&m.attribute, values);
        }
        Ok(())
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
        // mapping can see them through `identity`.
        let view = if self.needs.mapping_identity {
            self.view(name)?
        } else {
            self.repo
                .identity_without_accounts(name)?
                .ok_or_else(|| RepoError::NoSuchIdentity {
                    name: name.to_owned(),
                })?
        };
        let attrs = self.map_attrs(&view.attrs, Some(&view))?;
        let mut changes = view.attrs.diff(&attrs);
        let mut disabled = view.disabled;
        if relink && disabled {
            disabled = false;
            changes.push(disabled_change(true, false));
        }
        if !changes.is_empty() {
            self.repo.checkin(name, view.version, &attrs, disabled)?;
        }
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
        let attrs = self.map_attrs(&AttrMap::new(), None)?;
        self.host.pre_image(&name)?;
        self.repo.create_identity_with_account(
            &name,
            &attrs,
            Some((&self.event.resource, &self.event.key)),
        )?;
        d.changes = AttrMap::new().diff(&attrs);
        d.identity = Some(name);
        d.action = Action::Created;
        Ok(())
    }

    fn delete_action(&mut self, name: &str, d: &mut Decision) -> Result<(), EventError> {
        self.host.pre_image(name)?;
        self.repo.unlink(&self.event.resource, &self.event.key)?;
        d.action = Action::Unlinked;
        if self.policy.delete_action == DeleteAction::Unlink {
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
        if !others.is_empty() {
            d.rules.push(RuleOutcome {
                rule: "delete_action".into(),
                script: String::new(),
                result: format!(
                    "only unlinked: {name} still has account(s) {} on {}",
                    others.join(", "),
                    self.event.resource
                ),
            });
            return Ok(());
        }
        match self.policy.delete_action {
            DeleteAction::Unlink => {}
            DeleteAction::Disable => {
                if !view.disabled {
                    self.repo.checkin(name, view.version, &view.attrs, true)?;
                    d.changes.push(disabled_change(false, true));
                }
                d.action = Action::Disabled;
            }
            DeleteAction::Delete => {
                self.repo.delete_identity(name)?;
                d.action = Action::DeletedIdentity;
            }
        }
        Ok(())
    }
}

fn outcome(role: &str, script: &Script, result: String) -> RuleOutcome {
    RuleOutcome {
        rule: role.to_owned(),
        script: script.label().to_owned(),
        result,
    }
}

fn disabled_change(before: bool, after: bool) -> AttrChange {
    AttrChange {
        name: DISABLED_CHANGE.to_owned(),
        before: Some(vec![Value::Text(before.to_string())]),
        after: Some(vec![Value::Text(after.to_string())]),
    }
}
