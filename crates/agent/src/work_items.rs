//! The operator's commands: `work-items list|show|resolve`, `link` and `unlink`, and the
//! work items and correlation exclusions `explain` shows.
//!
//! Every decision an operator makes goes through the engine
//! ([`idsync_engine::Engine::apply_operator`]): the resource's mappings, naming and
//! notification policies apply as they would to a rule's decision, one decision record of
//! op `operator` is written, and the work items it settles are closed, all in one
//! transaction (a write of the agent in progress is waited for, as for every command).
//! Exit status: 0 done; 2 an unknown resource, account, identity or work item, or a request
//! that cannot apply (a closed item, `--create` for a linked account); 1 the request failed
//! while applied (a mapping or naming rule, a name taken), nothing changed; 3 the
//! repository failed.

use std::io::Write;
use std::process::ExitCode;

use idsync_core::Identity;
use idsync_engine::{EngineError, OperatorAction, OperatorRequest};
use idsync_repo::{DecisionFilter, Repo, StoredDecision, WorkItem, WorkItemFilter, WorkItemState};

use crate::cli::{LinkArgs, UnlinkArgs, WorkItemStateArg, WorkItemsCommand};
use crate::config::Loaded;
use crate::exit::Exit;
use crate::explain::one_line;
use crate::printable::{inline, line};
use crate::setup::{Setup, open_repo};

/// Attributes of a candidate shown by `work-items show` before it says how many more.
const SHOWN_ATTRIBUTES: usize = 20;

/// `idsync work-items ...`.
pub fn command(loaded: Loaded, cmd: &WorkItemsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkItemsCommand::List {
            state,
            resource,
            json,
        } => {
            let repo = open_repo(&loaded)?;
            list(&repo, *state, resource.as_deref(), *json)
        }
        WorkItemsCommand::Show { id, json } => {
            let repo = open_repo(&loaded)?;
            show(&repo, *id, *json)
        }
        WorkItemsCommand::Resolve {
            id,
            link,
            create,
            ignore,
            reason,
        } => {
            let action = match (link, create, ignore) {
                (Some(name), _, _) => OperatorAction::Link(name.clone()),
                (None, true, _) => OperatorAction::Create,
                (None, false, true) => OperatorAction::Ignore,
                // clap requires one of them.
                (None, false, false) => {
                    eprintln!("error: give --link IDENTITY, --create or --ignore");
                    return Ok(ExitCode::from(Exit::Config));
                }
            };
            resolve(loaded, *id, &action, reason.as_deref())
        }
    }
}

/// `work-items list`.
fn list(
    repo: &Repo,
    state: WorkItemStateArg,
    resource: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let items = repo.work_items(&WorkItemFilter {
        state: match state {
            WorkItemStateArg::Open => Some(WorkItemState::Open),
            WorkItemStateArg::Closed => Some(WorkItemState::Closed),
            WorkItemStateArg::All => None,
        },
        resource: resource.map(str::to_owned),
        key: None,
    })?;
    let mut out = crate::printable::stdout();
    for item in &items {
        if json {
            writeln!(out, "{}", serde_json::to_string(item)?)?;
        } else {
            writeln!(out, "{}", summary(item))?;
        }
    }
    let open = items
        .iter()
        .filter(|i| i.state == WorkItemState::Open)
        .count();
    eprintln!("{} work item(s), {open} open", items.len());
    Ok(ExitCode::SUCCESS)
}

/// One line: `#3 open disputed hr 1015 candidates=ann,bea seen=2 since 2026-…: reason`, or
/// for a closed item its outcome.
pub fn summary(item: &WorkItem) -> String {
    let mut s = format!(
        "#{} {} {} {} {}",
        item.id,
        item.state.as_str(),
        item.kind.as_str(),
        item.resource,
        inline(&item.key)
    );
    if !item.candidates.is_empty() {
        s.push_str(&format!(
            " candidates={}",
            inline(&item.candidates.join(","))
        ));
    }
    if item.seen > 1 {
        s.push_str(&format!(" seen={}", item.seen));
    }
    s.push_str(&format!(
        " since {}: {}",
        item.created_at,
        inline(&item.reason)
    ));
    if let Some(c) = &item.closed {
        s.push_str(&format!(" → {}", closure(c)));
    }
    s
}

/// `linked to bea at 2026-… by decision #9 (reason: …)`.
fn closure(c: &idsync_repo::Closure) -> String {
    let mut s = match (&c.resolution, &c.identity) {
        (idsync_repo::Resolution::Linked, Some(i)) => format!("linked to {}", inline(i)),
        (idsync_repo::Resolution::Created, Some(i)) => format!("created {}", inline(i)),
        (r, _) => r.as_str().to_owned(),
    };
    s.push_str(&format!(" at {}", c.at));
    if let Some(d) = c.decision_id {
        s.push_str(&format!(" by decision #{d}"));
    }
    if let Some(r) = &c.reason {
        s.push_str(&format!(" (reason: {})", inline(r)));
    }
    s
}

/// `work-items show ID`.
fn show(repo: &Repo, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let Some(item) = repo.work_item(id)? else {
        eprintln!("error: no work item #{id} (idsync work-items list --state all)");
        return Ok(ExitCode::from(Exit::Config));
    };
    let account = repo.shadow(&item.resource, &item.key)?;
    let owner = repo.owner_of(&item.resource, &item.key)?;
    let mut candidates: Vec<Identity> = Vec::new();
    for name in &item.candidates {
        if let Some(i) = repo.identity(name)? {
            candidates.push(i);
        }
    }
    let history = repo.decisions(&DecisionFilter {
        resource: Some(item.resource.clone()),
        key: Some(item.key.clone()),
        ..DecisionFilter::default()
    })?;
    let mut out = crate::printable::stdout();
    if json {
        let v = serde_json::json!({
            "work_item": item,
            "account": account,
            "owner": owner,
            "candidates": candidates,
            "history": history,
        });
        writeln!(out, "{v}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "work item #{} ({})", item.id, item.state.as_str())?;
    writeln!(out, "account: {} {}", item.resource, inline(&item.key))?;
    writeln!(out, "kind: {}", item.kind.as_str())?;
    writeln!(out, "reason: {}", inline(&item.reason))?;
    let by = |d: Option<i64>| d.map(|d| format!(" (decision #{d})")).unwrap_or_default();
    writeln!(
        out,
        "raised: {}{}; seen {} time(s), last {}{}",
        item.created_at,
        by(item.decision_id),
        item.seen,
        item.last_seen_at,
        by(item.last_decision_id)
    )?;
    if let Some(c) = &item.closed {
        writeln!(out, "closed: {}", closure(c))?;
    }
    match &owner {
        Some(o) => writeln!(out, "linked now to: {}", inline(o))?,
        None => writeln!(out, "linked now to: (no identity)")?,
    }
    match &account {
        None => writeln!(
            out,
            "account attributes: (none: the account is no longer on {})",
            item.resource
        )?,
        Some(attrs) => {
            writeln!(
                out,
                "account attributes (as last seen on {}):",
                item.resource
            )?;
            for a in attrs.iter() {
                writeln!(out, "  {}: {}", a.name, values(&a.values))?;
            }
        }
    }
    if candidates.is_empty() {
        writeln!(out, "candidates: none")?;
    } else {
        writeln!(out, "candidates:")?;
    }
    for c in &candidates {
        let accounts: Vec<String> = c
            .accounts
            .iter()
            .map(|a| format!("{}:{}", a.resource, inline(&a.key)))
            .collect();
        writeln!(
            out,
            "  {} ({}; accounts: {})",
            inline(&c.name),
            if c.disabled { "disabled" } else { "enabled" },
            if accounts.is_empty() {
                "none".to_owned()
            } else {
                accounts.join(", ")
            }
        )?;
        for a in c.attrs.iter().take(SHOWN_ATTRIBUTES) {
            writeln!(out, "    {}: {}", a.name, values(&a.values))?;
        }
        if c.attrs.len() > SHOWN_ATTRIBUTES {
            writeln!(
                out,
                "    … {} more (idsync identities show {})",
                c.attrs.len() - SHOWN_ATTRIBUTES,
                inline(&c.name)
            )?;
        }
    }
    let missing: Vec<&String> = item
        .candidates
        .iter()
        .filter(|n| !candidates.iter().any(|c| &c.name == *n))
        .collect();
    for n in missing {
        writeln!(out, "  {} (no longer exists)", inline(n))?;
    }
    writeln!(
        out,
        "history ({} decision(s) of the account):",
        history.len()
    )?;
    for r in &history {
        writeln!(out, "  #{} {} {}", r.id, r.at, one_line(&r.decision))?;
    }
    if item.state == WorkItemState::Open {
        writeln!(
            out,
            "to settle it: idsync work-items resolve {} --link IDENTITY | --create | --ignore [--reason TEXT]",
            item.id
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn values(vs: &[idsync_core::Value]) -> String {
    let shown: Vec<String> = vs
        .iter()
        .map(|v| inline(&v.to_string()).into_owned())
        .collect();
    shown.join(" | ")
}

/// `work-items resolve ID ...`.
fn resolve(
    loaded: Loaded,
    id: i64,
    action: &OperatorAction,
    reason: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let setup = match crate::commands::setup(loaded) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let Some(item) = setup.engine.repo().work_item(id)? else {
        eprintln!("error: no work item #{id} (idsync work-items list --state all)");
        return Ok(ExitCode::from(Exit::Config));
    };
    apply(
        &setup,
        &OperatorRequest {
            resource: &item.resource,
            key: &item.key,
            action,
            work_item: Some(id),
            reason,
        },
    )
}

/// `idsync link RESOURCE KEY IDENTITY`.
pub fn link(loaded: Loaded, args: &LinkArgs) -> anyhow::Result<ExitCode> {
    let action = OperatorAction::Link(args.identity.clone());
    account_command(
        loaded,
        &args.resource,
        &args.key,
        &action,
        args.reason.as_deref(),
    )
}

/// `idsync unlink RESOURCE KEY`.
pub fn unlink(loaded: Loaded, args: &UnlinkArgs) -> anyhow::Result<ExitCode> {
    account_command(
        loaded,
        &args.resource,
        &args.key,
        &OperatorAction::Unlink,
        args.reason.as_deref(),
    )
}

/// An operator decision about an account named by resource and key (or DN, naming
/// attribute).
fn account_command(
    loaded: Loaded,
    resource: &str,
    key: &str,
    action: &OperatorAction,
    reason: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let setup = match crate::commands::setup(loaded) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let key =
        crate::accounts::resolve_key(&setup.loaded, setup.engine.repo(), Some(resource), key)?;
    apply(
        &setup,
        &OperatorRequest {
            resource,
            key: &key,
            action,
            work_item: None,
            reason,
        },
    )
}

/// Has the engine apply `req`, prints the decision and the items it closed.
fn apply(setup: &Setup, req: &OperatorRequest<'_>) -> anyhow::Result<ExitCode> {
    let Some(policy) = setup.policy(req.resource) else {
        eprintln!(
            "error: resource {} is no longer configured in {}",
            req.resource,
            setup.loaded.file.display()
        );
        return Ok(ExitCode::from(Exit::Config));
    };
    match setup.engine.apply_operator(policy, req) {
        Ok(outcome) => {
            line(format_args!(
                "#{} {}",
                outcome.decision_id,
                one_line(&outcome.decision)
            ));
            for id in &outcome.closed {
                line(format_args!("work item #{id} closed"));
            }
            let queued = outcome
                .decision
                .rules
                .iter()
                .filter(|r| r.rule == idsync_engine::NOTIFICATION_RULE)
                .count();
            if queued == 0 {
                return Ok(ExitCode::SUCCESS);
            }
            // Sent now, as `run --once` sends what its pass queued (a running agent's
            // dispatcher claims with a lease: no message goes out twice); what cannot go
            // now stays queued for the agent's retries.
            eprintln!("{queued} notification(s) queued");
            Ok(crate::outbox::round_after_command(setup, ExitCode::SUCCESS))
        }
        Err(EngineError::Refused(r)) => {
            eprintln!("error: {}", inline(&r.to_string()));
            Ok(ExitCode::from(Exit::Config))
        }
        Err(e @ EngineError::OperatorFailed { decision_id, .. }) => {
            eprintln!(
                "error: {}; nothing was changed (recorded as failed decision #{decision_id})",
                inline(&e.to_string())
            );
            Ok(ExitCode::from(Exit::Failed))
        }
        Err(e) => Err(e.into()),
    }
}

/// `explain`: the work items of the account (`resource`, `key`), or of the identity `name`
/// (items whose candidates include it or that were settled with it, and items of the
/// accounts its decision records name).
pub fn explain(
    repo: &Repo,
    account: Option<(&str, &str)>,
    identity: Option<&str>,
    records: &[StoredDecision],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let items: Vec<WorkItem> = match (account, identity) {
        (Some((resource, key)), _) => repo.work_items(&WorkItemFilter {
            resource: Some(resource.to_owned()),
            key: Some(key.to_owned()),
            ..WorkItemFilter::default()
        })?,
        (None, Some(name)) => repo
            .work_items(&WorkItemFilter::default())?
            .into_iter()
            .filter(|i| {
                i.candidates.iter().any(|c| c == name)
                    || i.closed
                        .as_ref()
                        .is_some_and(|c| c.identity.as_deref() == Some(name))
                    || records
                        .iter()
                        .any(|r| r.decision.resource == i.resource && r.decision.key == i.key)
            })
            .collect(),
        (None, None) => Vec::new(),
    };
    for i in &items {
        let (state, then) = match &i.closed {
            None => (
                "open",
                format!(
                    "settle it with `idsync work-items resolve {} --link IDENTITY | --create | --ignore`",
                    i.id
                ),
            ),
            Some(c) => ("closed", closure(c)),
        };
        writeln!(
            out,
            "{state} work item #{} ({}, {} {}): {}; {then}",
            i.id,
            i.kind.as_str(),
            i.resource,
            inline(&i.key),
            inline(&i.reason),
        )?;
    }
    Ok(())
}

/// `explain`: the identities account (`resource`, `key`) is not correlated to any more, or
/// the accounts not correlated to identity `name`, because an operator unlinked them.
pub fn explain_exclusions(
    repo: &Repo,
    account: Option<(&str, &str)>,
    identity: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let exclusions = match (account, identity) {
        (Some((resource, key)), _) => repo.exclusions_of_account(resource, key)?,
        (None, Some(name)) => repo.exclusions_of_identity(name)?,
        (None, None) => Vec::new(),
    };
    for e in &exclusions {
        let key = inline(&e.key);
        writeln!(
            out,
            "not correlated: account {key} of {} is not linked to {} by correlation (an \
             operator unlinked it at {}; `idsync link {} {key} {}` links it again)",
            e.resource, e.identity, e.at, e.resource, e.identity
        )?;
    }
    Ok(())
}
