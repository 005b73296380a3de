//! Notification policies compiled once and evaluated on the engine's thread: which identity
//! events (and new work items) trigger them, the Rhai condition and recipient expressions,
//! and the minijinja subject, text and HTML templates.
//!
//! Key design choice: a message is rendered completely when it is enqueued (inside the
//! batch transaction), so the dispatcher only sends stored bytes: it needs no Rhai engine
//! (which is not `Send`) and a resend is byte-for-byte the same message. Values that could
//! break the message are neutralised here: control characters (CR, LF, …) in the subject
//! become spaces, recipients must parse as a single mailbox without control characters
//! (otherwise the message is dead-lettered with the reason), and the HTML part autoescapes
//! every value.

use idsync_core::{AttrMap, Decision, Identity, Value};
use idsync_engine::{IdentityChange, Notifier, WorkItemNotice};
use idsync_repo::{NewOutboxMessage, RenderedMail};
use idsync_rules::rhai::{Dynamic, Scope};
use idsync_rules::{
    Limits, RuleEngine, Script, attrs_to_dynamic, identity_to_dynamic, render, truthy,
};
use lettre::message::Mailbox;
use minijinja::{AutoEscape, Environment};

use crate::config::{NotificationsConfig, PolicyConfig, Trigger};
use crate::retry::RetrySpec;

/// One compiled policy.
struct Compiled {
    name: String,
    on: Vec<Trigger>,
    attributes: Vec<String>,
    change: Option<crate::config::ChangeCondition>,
    condition: Option<Script>,
    to: Vec<Script>,
    from: String,
    html: bool,
    retry: RetrySpec,
    max_age_ms: i64,
}

/// Every policy of the config, ready to evaluate; the engine's [`Notifier`].
pub struct PolicyNotifier {
    rules: RuleEngine,
    jinja: Environment<'static>,
    policies: Vec<Compiled>,
}

impl std::fmt::Debug for PolicyNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyNotifier")
            .field("policies", &self.policies.len())
            .finish_non_exhaustive()
    }
}

impl PolicyNotifier {
    /// Compiles every policy; returns every problem, each naming its key
    /// (`notifications.policies[0].to[1]: …`).
    pub fn compile(cfg: &NotificationsConfig, limits: &Limits) -> Result<Self, Vec<String>> {
        let rules = RuleEngine::new(limits);
        let mut jinja = Environment::new();
        jinja.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        let mut problems = Vec::new();
        let mut policies = Vec::new();
        if let Err(e) = cfg.from.parse::<Mailbox>() {
            problems.push(format!("notifications.from: {:?}: {e}", cfg.from));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in cfg.policies.iter().enumerate() {
            let key = format!("notifications.policies[{i}]");
            if !names.insert(p.name.clone()) {
                problems.push(format!("{key}.name: duplicate policy name {:?}", p.name));
            }
            match compile_one(&rules, &mut jinja, cfg, p, &key) {
                Ok(c) => policies.push(c),
                Err(mut e) => problems.append(&mut e),
            }
        }
        if problems.is_empty() {
            Ok(PolicyNotifier {
                rules,
                jinja,
                policies,
            })
        } else {
            Err(problems)
        }
    }

    /// Where the policies' HTML templates put a value that autoescaping cannot make safe
    /// (module `html_lint`), one line each: `notifications.policies[0].html: line 3: …`.
    pub fn html_warnings(cfg: &NotificationsConfig) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in cfg.policies.iter().enumerate() {
            let Some(html) = &p.html else {
                continue;
            };
            for f in crate::html_lint::scan(html) {
                out.push(format!(
                    "notifications.policies[{i}].html: line {}: {}",
                    f.line,
                    f.hazard.explain()
                ));
            }
        }
        out
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there is no policy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

fn compile_one(
    rules: &RuleEngine,
    jinja: &mut Environment<'static>,
    cfg: &NotificationsConfig,
    p: &PolicyConfig,
    key: &str,
) -> Result<Compiled, Vec<String>> {
    let mut problems = Vec::new();
    if p.on.is_empty() {
        problems.push(format!("{key}.on: name at least one event"));
    }
    if p.to.is_empty() {
        problems.push(format!("{key}.to: name at least one recipient expression"));
    }
    let condition = match &p.condition {
        Some(src) => match rules.compile(&format!("{}.condition", p.name), src) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(format!("{key}.condition: {e}"));
                None
            }
        },
        None => None,
    };
    let mut to = Vec::new();
    for (j, src) in p.to.iter().enumerate() {
        match rules.compile(&format!("{}.to[{j}]", p.name), src) {
            Ok(s) => to.push(s),
            Err(e) => problems.push(format!("{key}.to[{j}]: {e}")),
        }
    }
    let from = p.from.clone().unwrap_or_else(|| cfg.from.clone());
    if let Err(e) = from.parse::<Mailbox>() {
        problems.push(format!("{key}.from: {from:?}: {e}"));
    }
    let mut templates = vec![("subject", &p.subject), ("text", &p.text)];
    if let Some(h) = &p.html {
        templates.push(("html", h));
    }
    for (part, src) in templates {
        if let Err(e) = jinja.add_template_owned(format!("{}.{part}", p.name), src.clone()) {
            problems.push(format!("{key}.{part}: template error: {e}"));
        }
    }
    let (retry, max_age_ms) =
        match RetrySpec::from_config(&format!("{key}.retry"), &p.retry, &p.on_error) {
            Ok(v) => v,
            Err(e) => {
                problems.push(e);
                (RetrySpec::default(), 0)
            }
        };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Compiled {
        name: p.name.clone(),
        on: p.on.clone(),
        attributes: p.attributes.clone(),
        change: p.change.clone(),
        condition,
        to,
        from,
        html: p.html.is_some(),
        retry,
        max_age_ms,
    })
}

/// The events one identity change amounts to.
pub fn events(before: Option<&Identity>, after: Option<&Identity>) -> Vec<Trigger> {
    match (before, after) {
        (None, Some(_)) => vec![Trigger::Created],
        (Some(_), None) => vec![Trigger::Deleted],
        (Some(b), Some(a)) => {
            let mut out = Vec::new();
            if b.disabled != a.disabled || !b.attrs.diff(&a.attrs).is_empty() {
                out.push(Trigger::Updated);
            }
            let has = |id: &Identity, r: &str, k: &str| {
                id.accounts.iter().any(|x| x.resource == r && x.key == k)
            };
            if a.accounts.iter().any(|x| !has(b, &x.resource, &x.key)) {
                out.push(Trigger::Linked);
            }
            if b.accounts.iter().any(|x| !has(a, &x.resource, &x.key)) {
                out.push(Trigger::Unlinked);
            }
            out
        }
        (None, None) => Vec::new(),
    }
}

fn first_text(attrs: &AttrMap, name: &str) -> Option<String> {
    attrs
        .get(name)
        .and_then(|v| v.first())
        .and_then(Value::as_text)
        .map(str::to_owned)
}

impl Compiled {
    /// Whether the `updated` filters (`attributes`, `change`) let this update through.
    fn update_matches(&self, b: &Identity, a: &Identity) -> bool {
        if !self.attributes.is_empty()
            && !self
                .attributes
                .iter()
                .any(|n| b.attrs.get(n) != a.attrs.get(n))
        {
            return false;
        }
        if let Some(c) = &self.change {
            let (old, new) = (
                first_text(&b.attrs, &c.attribute),
                first_text(&a.attrs, &c.attribute),
            );
            if old == new {
                return false;
            }
            if let Some(f) = &c.from
                && old.as_deref().unwrap_or("") != f
            {
                return false;
            }
            if let Some(t) = &c.to
                && new.as_deref().unwrap_or("") != t
            {
                return false;
            }
        }
        true
    }

    /// The trigger that fires this policy for the change, if any.
    fn fires(&self, ev: &[Trigger], change: &IdentityChange<'_>) -> Option<Trigger> {
        ev.iter().copied().find(|t| {
            self.on.contains(t)
                && match (t, change.before, change.after) {
                    (Trigger::Updated, Some(b), Some(a)) => self.update_matches(b, a),
                    _ => true,
                }
        })
    }
}

/// An identity as templates see it: `name`, `disabled`, `attrs` (one value: a string;
/// several: a list; binary: a size note), `accounts` (`resource`, `key`).
fn identity_value(id: &Identity) -> serde_json::Value {
    let accounts: Vec<serde_json::Value> = id
        .accounts
        .iter()
        .map(|a| serde_json::json!({ "resource": a.resource, "key": a.key }))
        .collect();
    serde_json::json!({
        "name": id.name,
        "disabled": id.disabled,
        "attrs": attrs_value(&id.attrs),
        "accounts": accounts,
    })
}

/// Replaces control characters (CR, LF, TAB, …) by spaces: one header line, no injection.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Checks one recipient: a single mailbox, no control characters.
fn check_recipient(r: &str) -> Result<(), String> {
    if r.chars().any(char::is_control) {
        return Err(format!(
            "invalid recipient {r:?}: it contains control characters (CR/LF)"
        ));
    }
    r.parse::<Mailbox>()
        .map(|_| ())
        .map_err(|e| format!("invalid recipient {r:?}: {e}"))
}

fn recipients(v: &Dynamic, out: &mut Vec<String>) -> Result<(), String> {
    if v.is_unit() {
        return Ok(());
    }
    if v.is_string() {
        let s = v.to_string();
        if !s.trim().is_empty() {
            out.push(s.trim().to_owned());
        }
        return Ok(());
    }
    if v.is_array() {
        for x in v.clone().into_array().unwrap_or_default() {
            recipients(&x, out)?;
        }
        return Ok(());
    }
    Err(format!(
        "a recipient expression must return a string, an array of strings or (), got {}",
        render(v)
    ))
}

/// What one policy renders a message about: the scope its expressions see and the
/// context its templates see.
struct Subject<'a> {
    scope: Scope<'static>,
    context: serde_json::Value,
    /// The identity the message is about (none for a work item).
    identity: Option<&'a str>,
    decision: &'a Decision,
}

impl PolicyNotifier {
    /// The message of policy `p` about `subject`, if its condition holds and it has a
    /// recipient.
    fn message(
        &self,
        p: &Compiled,
        subject: &mut Subject<'_>,
    ) -> Result<Option<NewOutboxMessage>, String> {
        let scope = &mut subject.scope;
        if let Some(c) = &p.condition {
            let v = self.rules.run(c, scope, None).map_err(|e| e.to_string())?;
            let go = truthy(&v)
                .map_err(|m| format!("{}: condition returned {}: {m}", c.label(), render(&v)))?;
            if !go {
                return Ok(None);
            }
        }
        let mut to = Vec::new();
        for s in &p.to {
            let v = self.rules.run(s, scope, None).map_err(|e| e.to_string())?;
            recipients(&v, &mut to).map_err(|m| format!("{}: {m}", s.label()))?;
        }
        if to.is_empty() {
            tracing::info!(policy = %p.name, identity = subject.identity.unwrap_or("-"), "no recipient: nothing sent");
            return Ok(None);
        }
        let dead = to.iter().find_map(|r| check_recipient(r).err());
        let ctx = minijinja::Value::from(minijinja::value::Serde(&subject.context));
        let render_part = |part: &str| -> Result<String, String> {
            let t = self
                .jinja
                .get_template(&format!("{}.{part}", p.name))
                .map_err(|e| format!("policy {}: {part}: {e}", p.name))?;
            t.render(&ctx)
                .map_err(|e| format!("policy {}: rendering the {part}: {e}", p.name))
        };
        let mail = RenderedMail {
            from: p.from.clone(),
            to,
            subject: one_line(&render_part("subject")?),
            text: render_part("text")?,
            html: if p.html {
                Some(render_part("html")?)
            } else {
                None
            },
            retry: serde_json::to_value(&p.retry).map_err(|e| e.to_string())?,
        };
        let d = subject.decision;
        Ok(Some(NewOutboxMessage {
            policy: p.name.clone(),
            identity: subject.identity.map(str::to_owned),
            resource: Some(d.resource.clone()),
            key: Some(d.key.clone()),
            mail,
            max_age_ms: p.max_age_ms,
            dead,
        }))
    }
}

/// Attributes as templates see them: one value a string, several a list, binary a note.
fn attrs_value(attrs: &AttrMap) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for a in attrs.iter() {
        let vals: Vec<serde_json::Value> = a
            .values
            .iter()
            .map(|v| serde_json::Value::String(v.to_string()))
            .collect();
        let v = if vals.len() == 1 {
            vals.into_iter().next().unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::Array(vals)
        };
        out.insert(a.name.clone(), v);
    }
    serde_json::Value::Object(out)
}

impl Notifier for PolicyNotifier {
    fn messages(&self, change: &IdentityChange<'_>) -> Result<Vec<NewOutboxMessage>, String> {
        let ev = events(change.before, change.after);
        if ev.is_empty() {
            return Ok(Vec::new());
        }
        let Some(subject_id) = change.after.or(change.before) else {
            return Ok(Vec::new());
        };
        let d = change.decision;
        let mut out = Vec::new();
        for p in &self.policies {
            let Some(trigger) = p.fires(&ev, change) else {
                continue;
            };
            let mut scope = Scope::new();
            scope.push("identity", identity_to_dynamic(subject_id));
            scope.push(
                "before",
                change
                    .before
                    .map(identity_to_dynamic)
                    .unwrap_or(Dynamic::UNIT),
            );
            scope.push("event", trigger.as_str().to_owned());
            scope.push("resource", d.resource.clone());
            scope.push("key", d.key.clone());
            scope.push("op", d.op.as_str().to_owned());
            let changed: Vec<String> = match (change.before, change.after) {
                (Some(b), Some(a)) => b.attrs.diff(&a.attrs).into_iter().map(|c| c.name).collect(),
                _ => Vec::new(),
            };
            let context = serde_json::json!({
                "identity": identity_value(subject_id),
                "before": change.before.map(identity_value),
                "event": trigger.as_str(),
                "resource": d.resource,
                "key": d.key,
                "op": d.op.as_str(),
                "policy": p.name,
                "changed": changed,
            });
            let mut subject = Subject {
                scope,
                context,
                identity: Some(&subject_id.name),
                decision: d,
            };
            out.extend(self.message(p, &mut subject)?);
        }
        Ok(out)
    }

    fn work_item(&self, item: &WorkItemNotice<'_>) -> Result<Vec<NewOutboxMessage>, String> {
        let d = item.decision;
        let mut out = Vec::new();
        for p in self
            .policies
            .iter()
            .filter(|p| p.on.contains(&Trigger::WorkItem))
        {
            let mut map = idsync_rules::rhai::Map::new();
            map.insert("id".into(), Dynamic::from(item.id));
            map.insert("kind".into(), Dynamic::from(item.kind.as_str().to_owned()));
            map.insert("reason".into(), Dynamic::from(item.reason.to_owned()));
            map.insert(
                "candidates".into(),
                Dynamic::from_array(item.candidates.iter().cloned().map(Dynamic::from).collect()),
            );
            map.insert("account".into(), attrs_to_dynamic(item.account));
            let mut scope = Scope::new();
            scope.push("identity", Dynamic::UNIT);
            scope.push("before", Dynamic::UNIT);
            scope.push("event", Trigger::WorkItem.as_str().to_owned());
            scope.push("resource", d.resource.clone());
            scope.push("key", d.key.clone());
            scope.push("work_item", Dynamic::from_map(map));
            let context = serde_json::json!({
                "identity": null,
                "before": null,
                "event": Trigger::WorkItem.as_str(),
                "resource": d.resource,
                "key": d.key,
                "policy": p.name,
                "changed": [],
                "work_item": {
                    "id": item.id,
                    "kind": item.kind.as_str(),
                    "reason": item.reason,
                    "candidates": item.candidates,
                    "account": attrs_value(item.account),
                },
            });
            let mut subject = Subject {
                scope,
                context,
                identity: None,
                decision: d,
            };
            out.extend(self.message(p, &mut subject)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use idsync_core::{AttrMap, Identity, LinkedAccount};

    use super::*;
    use crate::config::ChangeCondition;

    fn id(attrs: &[(&str, &str)], accounts: &[&str]) -> Identity {
        Identity {
            name: "ann".into(),
            version: 1,
            disabled: false,
            attrs: attrs.iter().copied().collect::<AttrMap>(),
            accounts: accounts
                .iter()
                .map(|k| LinkedAccount {
                    resource: "hr".into(),
                    key: (*k).into(),
                    attrs: AttrMap::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn events_from_before_and_after() {
        let a = id(&[("title", "dev")], &["1"]);
        let b = id(&[("title", "lead")], &["1", "2"]);
        assert_eq!(events(None, Some(&a)), [Trigger::Created]);
        assert_eq!(events(Some(&a), None), [Trigger::Deleted]);
        assert_eq!(
            events(Some(&a), Some(&b)),
            [Trigger::Updated, Trigger::Linked]
        );
        assert_eq!(
            events(Some(&b), Some(&a)),
            [Trigger::Updated, Trigger::Unlinked]
        );
        assert!(events(Some(&a), Some(&a)).is_empty());
    }

    #[test]
    fn update_filters_by_attribute_and_change() {
        let c = Compiled {
            name: "p".into(),
            on: vec![Trigger::Updated],
            attributes: vec!["Status".into()],
            change: Some(ChangeCondition {
                attribute: "status".into(),
                from: Some("active".into()),
                to: Some("terminated".into()),
            }),
            condition: None,
            to: Vec::new(),
            from: String::new(),
            html: false,
            retry: RetrySpec::default(),
            max_age_ms: 0,
        };
        let active = id(&[("status", "active"), ("title", "dev")], &[]);
        let gone = id(&[("status", "terminated"), ("title", "dev")], &[]);
        let retitled = id(&[("status", "active"), ("title", "lead")], &[]);
        let back = id(&[("status", "active")], &[]);
        assert!(c.update_matches(&active, &gone));
        assert!(!c.update_matches(&active, &retitled));
        assert!(!c.update_matches(&gone, &back));
    }

    #[test]
    fn one_line_removes_control_characters() {
        assert_eq!(one_line("a\r\nBcc: x\t"), "a  Bcc: x");
    }
}
