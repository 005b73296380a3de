//! Rule authoring commands: `preview` (a dry run of the next pass, or with `--reconcile` of
//! a reconcile), `explain` (the decision
//! records of one account or identity, step by step) and `results --record` (a decision
//! captured as a rule fixture).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use idsync_core::{Action, Adapter, AdapterError, AttrMap, Decision, Fetch, Op, Situation};
use idsync_engine::BatchReport;
use idsync_repo::{DecisionFilter, Repo, StoredDecision};

use crate::cli::{ExplainArgs, PreviewArgs};
use crate::config::{Loaded, SourceConfig};
use crate::exit::Exit;
use crate::explain::{one_line, steps};
use crate::fixtures::{Expect, Fixture, FixtureAccount, FixtureEvent, FixtureIdentity};
use crate::setup::{Setup, open_repo};

/// A scratch copy of the repository in a temporary folder, with a setup over it, for a
/// preview that must apply what it previewed to preview what follows (a folder's next
/// files). Removed when dropped.
struct Scratch {
    setup: Setup,
    _dir: tempfile::TempDir,
}

impl Scratch {
    /// Copies `setup`'s repository (as committed now) and sets up over the copy.
    fn of(setup: &Setup) -> anyhow::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("idsync-preview-")
            .tempdir()
            .context("creating a folder for the preview's scratch copy")?;
        let path = dir.path().join("preview.db");
        setup.engine.repo().copy_into(&path)?;
        let repo = Repo::open(&path)?;
        let setup = Setup::with_repo(setup.loaded.clone(), std::sync::Arc::new(repo))?;
        setup.engine.mark_dry_run();
        Ok(Scratch { setup, _dir: dir })
    }
}

/// Whether a preview lists `d`: deletes always; the rest up to `--limit`, and in a
/// reconcile only the decisions that change something.
fn always_listed(d: &Decision) -> bool {
    d.op == Op::Delete || (d.op == Op::Reconcile && d.situation == Some(Situation::Deleted))
}

/// `idsync preview`: what the next pass (or with `--reconcile`, a reconcile) would do,
/// writing nothing.
pub fn preview(setup: &Setup, args: &PreviewArgs) -> anyhow::Result<ExitCode> {
    let repo = setup.engine.repo();
    // A reconcile of the keys asked for (with --reconcile), named as `idsync reconcile`
    // takes them.
    let keys = |resource: &str| -> anyhow::Result<Option<Vec<String>>> {
        if args.keys.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for k in &args.keys {
            out.push(crate::accounts::resolve_key(
                &setup.loaded,
                repo,
                Some(resource),
                k,
            )?);
        }
        Ok(Some(out))
    };
    // A preview moves no file: folder resources leave processed files where they are (an
    // adapter archives a file once its checkpoint says it was applied, which the scratch
    // copy below does say).
    let mut leave = setup.loaded.clone();
    for r in &mut leave.config.resources {
        if let SourceConfig::Flatfile(ff) = &mut r.source {
            ff.after = idsync_flatfile::AfterProcessing::Leave;
        }
    }
    // A fresh adapter for the resource at `i`, asked for a reconcile when previewing one.
    let adapter_for = |i: usize, accept: bool| -> anyhow::Result<Box<dyn Adapter>> {
        let mut adapter = crate::setup::adapter_for(&leave, i);
        if accept {
            adapter.accept_deletes();
        }
        if args.reconcile {
            let name = &setup.loaded.config.resources[i].name;
            adapter.begin_reconcile(keys(name)?)?;
        }
        Ok(adapter)
    };
    let mut out = crate::printable::stdout();
    let mut failed = 0;
    let mut errors = 0;
    for (i, r) in setup.loaded.config.resources.iter().enumerate() {
        if args.resource.as_ref().is_some_and(|only| only != &r.name) {
            continue;
        }
        let Some(policy) = setup.policy(&r.name) else {
            continue;
        };
        // Every part of the pass, each fetched after the previous part's checkpoint as if
        // it had been committed (nothing is): the totals are the whole pass's.
        let mut adapter = match adapter_for(i, false) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e:#}");
                errors += 1;
                continue;
            }
        };
        let mut after = repo.checkpoint(&r.name)?;
        let mut total = BatchReport::default();
        let mut parts = 0u64;
        let mut listed = 0usize;
        let mut hidden = 0usize;
        let mut accepted = false;
        // A folder of files: each file is diffed against what the previous one leaves, so
        // each previewed part is applied to a scratch copy of the repository (the real one
        // is never written).
        let scratch: std::cell::OnceCell<Scratch> = std::cell::OnceCell::new();
        let folder = matches!(&r.source, SourceConfig::Flatfile(ff) if ff.pattern.is_some());
        if folder && !args.reconcile {
            let _ = scratch.set(Scratch::of(setup)?);
        }
        loop {
            let (cur, cur_policy) = match scratch.get() {
                Some(sc) => (&sc.setup, sc.setup.policy(&r.name).unwrap_or(policy)),
                None => (setup, policy),
            };
            let cur_repo = cur.engine.repo();
            let batch = match adapter.next_batch(after.as_ref(), cur_repo.as_ref()) {
                Ok(Fetch::Batch(b)) => b,
                Ok(Fetch::Idle) => break,
                // The guard would refuse the pass: show what it would delete (the run
                // still refuses it, so the preview fails like the run would).
                Err(AdapterError::DeleteGuard { refusal, .. }) if parts == 0 && !accepted => {
                    let doing = if args.reconcile {
                        format!(
                            "the reconcile would be refused — {refusal}; what it would do if accepted (idsync reconcile {} --accept-deletes):",
                            r.name
                        )
                    } else {
                        format!(
                            "the run would refuse this pass — {refusal}; what it would do if accepted (--accept-deletes {}):",
                            r.name
                        )
                    };
                    note(&mut out, args.json(), format_args!("{}: {doing}", r.name))?;
                    errors += 1;
                    adapter = adapter_for(i, true)?;
                    accepted = true;
                    continue;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    errors += 1;
                    break;
                }
            };
            parts += 1;
            for reject in &batch.rejects {
                if !args.json() {
                    writeln!(
                        out,
                        "{} rejected {}: {}",
                        r.name, reject.origin, reject.reason
                    )?;
                } else {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"resource": r.name, "rejected": reject})
                    )?;
                }
            }
            let mut write_err = None;
            let mut list = |d: &Decision| {
                // Deletes are always listed; the rest up to --limit (a reconcile lists only
                // what would change).
                if !always_listed(d) {
                    if args.reconcile && d.changed_nothing() {
                        return;
                    }
                    if args.limit.is_some_and(|n| listed >= n) {
                        hidden += 1;
                        return;
                    }
                    listed += 1;
                }
                let line = if args.json() {
                    serde_json::to_string(d).unwrap_or_default()
                } else {
                    one_line(d)
                };
                if let Err(e) = writeln!(out, "{line}") {
                    write_err = Some(e);
                }
            };
            // With a scratch copy each part is decided once, applied to the copy; else it
            // is decided and rolled back, and the next part fetched as if it was committed.
            let result = if scratch.get().is_some() {
                cur.engine
                    .apply_batch_with(cur_policy, after.as_ref(), &batch, &mut list)
            } else {
                cur.engine.preview_batch(cur_policy, &batch, &mut list)
            };
            if let Some(e) = write_err {
                return Err(e.into());
            }
            match result {
                Ok(report) => total.merge(&report),
                Err(e) => {
                    eprintln!("error: {e}");
                    errors += 1;
                    break;
                }
            }
            after = match scratch.get() {
                Some(_) => cur_repo.checkpoint(&r.name)?,
                None => batch.checkpoint.clone(),
            };
            if !adapter.has_more() {
                break;
            }
        }
        if parts == 0 {
            if !args.json() && errors == 0 {
                if args.reconcile {
                    writeln!(out, "{}: nothing to reconcile", r.name)?;
                } else {
                    writeln!(out, "{}: no changes", r.name)?;
                }
            }
            continue;
        }
        failed += total.failed + total.rejected;
        if !args.json() && args.reconcile {
            let events = total.events();
            writeln!(
                out,
                "{}: reconcile: {} would change, {} unchanged; {} in {parts} part(s); nothing was written",
                r.name,
                events - total.unchanged.min(events),
                total.unchanged,
                crate::explain::describe(&total)
            )?;
            if hidden > 0 {
                writeln!(
                    out,
                    "{}: {hidden} more change(s) not listed (--limit); the totals are the whole reconcile's",
                    r.name
                )?;
            }
        } else if !args.json() {
            writeln!(
                out,
                "{}: {} in {parts} part(s) would be applied; nothing was written",
                r.name,
                crate::explain::describe(&total)
            )?;
            if hidden > 0 {
                writeln!(
                    out,
                    "{}: {hidden} more event(s) not listed (--limit); the totals are the whole pass's",
                    r.name
                )?;
            }
        }
    }
    Ok(if errors > 0 {
        ExitCode::from(Exit::Resource)
    } else if failed > 0 {
        ExitCode::from(Exit::Failed)
    } else {
        ExitCode::SUCCESS
    })
}

/// A note about a resource's preview: a line of the listing, or with `--json` a line on
/// stderr, so that standard output holds only the JSON lines of the records.
fn note(out: &mut impl Write, json: bool, text: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    if json {
        eprintln!("{text}");
        Ok(())
    } else {
        writeln!(out, "{text}")
    }
}

/// `idsync explain RESOURCE KEY` or `idsync explain --identity NAME`.
pub fn explain(loaded: &Loaded, args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repo(loaded)?;
    let filter = match (&args.identity, &args.resource, &args.key) {
        (Some(name), _, _) => DecisionFilter {
            identity: Some(name.clone()),
            ..DecisionFilter::default()
        },
        (None, Some(resource), Some(key)) => DecisionFilter {
            resource: Some(resource.clone()),
            key: Some(crate::accounts::resolve_key(
                loaded,
                &repo,
                Some(resource),
                key,
            )?),
            ..DecisionFilter::default()
        },
        _ => {
            eprintln!("give RESOURCE KEY, or --identity NAME");
            return Ok(ExitCode::from(Exit::Config));
        }
    };
    let records = repo.decisions(&filter)?;
    if records.is_empty() {
        eprintln!("no decision records match");
        return Ok(ExitCode::from(Exit::Failed));
    }
    let mut out = crate::printable::stdout();
    for r in &records {
        let d = &r.decision;
        writeln!(out, "#{} {} {} {}", r.id, r.at, d.resource, d.key)?;
        write!(out, "{}", steps(d))?;
    }
    // Failed events still waiting for a retry.
    for f in repo.failures(filter.resource.as_deref())? {
        let same_account = filter.key.is_some() && f.key == filter.key;
        let same_identity = args.identity.is_some()
            && records.iter().any(|r| {
                r.decision.key.as_str() == f.key.as_deref().unwrap_or("")
                    && r.decision.resource == f.resource
            });
        if same_account || same_identity {
            writeln!(
                out,
                "pending failed event #{} (attempts {}): {}; re-run with `idsync failed retry {}`",
                f.id, f.attempts, f.error, f.id
            )?;
        }
    }
    let account = filter.resource.as_deref().zip(filter.key.as_deref());
    crate::work_items::explain(&repo, account, args.identity.as_deref(), &records, &mut out)?;
    crate::timers::explain(&repo, account, args.identity.as_deref(), &mut out)?;
    crate::work_items::explain_exclusions(&repo, account, args.identity.as_deref(), &mut out)?;
    Ok(ExitCode::SUCCESS)
}

/// `idsync results --record FILE`: the newest matching decision as a rule fixture.
pub fn record(
    loaded: &Loaded,
    records: &[StoredDecision],
    file: &Path,
) -> anyhow::Result<ExitCode> {
    let Some(stored) = records.last() else {
        eprintln!("no decision record matches: nothing to record");
        return Ok(ExitCode::from(Exit::Failed));
    };
    let repo = open_repo(loaded)?;
    let redact = &loaded.config.redact_attributes;
    let fixture = fixture_from(&repo, stored, &Redaction::new(redact))?;
    let yaml = serde_yaml::to_string(&fixture).context("encoding the fixture")?;
    let header = format!(
        "# Recorded from decision #{} ({}) by `idsync results --record`.\n# Redacted attributes: {}\n",
        stored.id,
        stored.at,
        if redact.is_empty() {
            "none".to_owned()
        } else {
            redact.join(", ")
        }
    );
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(file, format!("{header}{yaml}"))
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("recorded decision #{} to {}", stored.id, file.display());
    Ok(ExitCode::SUCCESS)
}

/// The redaction of one recorded fixture: the values of the named attributes become
/// `redacted:` and 12 hex digits of a keyed hash (SipHash with a random key drawn for this
/// recording). Equal values get equal placeholders and different values different ones
/// (but for a 1 in 2^48 chance), so a rule comparing two of them (a confirmation on birth
/// dates) decides as it did; the key is forgotten, so a placeholder cannot be turned back
/// into its value by hashing guesses. A rule that parses the value (a date's year) cannot
/// work on a placeholder: leave such an attribute out of `redact_attributes`.
struct Redaction<'a> {
    names: &'a [String],
    key: std::collections::hash_map::RandomState,
}

impl<'a> Redaction<'a> {
    fn new(names: &'a [String]) -> Redaction<'a> {
        Redaction {
            names,
            key: std::collections::hash_map::RandomState::new(),
        }
    }

    fn placeholder(&self, value: &idsync_core::Value) -> idsync_core::Value {
        use std::hash::BuildHasher as _;
        let hash = self.key.hash_one(value);
        idsync_core::Value::Text(format!("redacted:{:012x}", hash >> 16))
    }

    fn is_redacted(&self, name: &str) -> bool {
        self.names.iter().any(|r| r.eq_ignore_ascii_case(name))
    }
}

fn redacted(mut attrs: AttrMap, redact: &Redaction<'_>) -> AttrMap {
    for name in redact.names {
        if let Some(values) = attrs.get(name) {
            let hidden = values.iter().map(|v| redact.placeholder(v)).collect();
            attrs.set(name, hidden);
        }
    }
    attrs
}

/// Rebuilds the repository state before the decision (as far as it can be known: the
/// involved identities now, with the decision's own changes and link undone) and the event.
fn fixture_from(
    repo: &Repo,
    stored: &StoredDecision,
    redact: &Redaction<'_>,
) -> anyhow::Result<Fixture> {
    let d = &stored.decision;
    // The event: exact for failed events (stored whole), else the account as last seen.
    let failure = repo
        .failures(Some(&d.resource))?
        .into_iter()
        .find(|f| f.decision_id == Some(stored.id));
    let event = match failure.and_then(|f| f.event) {
        Some(e) => FixtureEvent {
            op: e.op,
            key: e.key,
            attrs: redacted(e.attrs, redact),
            previous: e.previous.map(|p| redacted(p, redact)),
        },
        None => {
            let attrs = if d.op == Op::Delete {
                AttrMap::new()
            } else {
                repo.shadow(&d.resource, &d.key)?.unwrap_or_default()
            };
            FixtureEvent {
                op: d.op,
                key: d.key.clone(),
                attrs: redacted(attrs, redact),
                previous: None,
            }
        }
    };
    let mut names: Vec<String> = d.candidates.clone();
    if let Some(i) = &d.identity
        && !names.contains(i)
    {
        names.push(i.clone());
    }
    let mut identities = Vec::new();
    for name in names {
        if d.action == Action::Created && d.identity.as_deref() == Some(name.as_str()) {
            continue;
        }
        let Some(mut id) = repo.identity(&name)? else {
            continue;
        };
        if d.identity.as_deref() == Some(name.as_str()) {
            for c in &d.changes {
                if c.name == idsync_engine::DISABLED_CHANGE {
                    id.disabled = c
                        .before
                        .as_ref()
                        .and_then(|v| v.first())
                        .is_some_and(|v| v.as_text() == Some("true"));
                } else {
                    id.attrs.set(&c.name, c.before.clone().unwrap_or_default());
                }
            }
            let account_linked_by_decision = matches!(
                d.action,
                Action::Linked | Action::Resolved | Action::Processed
            );
            if account_linked_by_decision {
                id.accounts
                    .retain(|a| !(a.resource == d.resource && a.key == d.key));
            }
            if matches!(d.action, Action::Unlinked | Action::Disabled) {
                id.accounts.push(idsync_core::LinkedAccount {
                    resource: d.resource.clone(),
                    key: d.key.clone(),
                    attrs: AttrMap::new(),
                });
            }
        }
        identities.push(FixtureIdentity {
            name: id.name,
            disabled: id.disabled,
            attrs: redacted(id.attrs, redact),
            accounts: id
                .accounts
                .into_iter()
                .map(|a| FixtureAccount {
                    resource: a.resource,
                    key: a.key,
                    attrs: redacted(a.attrs, redact),
                })
                .collect(),
        });
    }
    let mut expect_attrs = AttrMap::new();
    for c in &d.changes {
        if c.name != idsync_engine::DISABLED_CHANGE && !redact.is_redacted(&c.name) {
            expect_attrs.set(&c.name, c.after.clone().unwrap_or_default());
        }
    }
    Ok(Fixture {
        name: Some(format!(
            "recorded: {} {} {} ({})",
            d.resource,
            d.key,
            d.op,
            d.situation.map(|s| s.as_str()).unwrap_or("failed")
        )),
        resource: d.resource.clone(),
        identities,
        event,
        expect: Expect {
            situation: d.situation.map(|s| s.as_str().to_owned()),
            action: Some(d.action.as_str().to_owned()),
            identity: Some(d.identity.clone()),
            candidates: Some(d.candidates.clone()),
            confirmed: None,
            attrs: (!expect_attrs.is_empty()).then_some(expect_attrs),
            disabled: None,
            notifications: Some(
                d.rules
                    .iter()
                    .filter(|r| r.rule == idsync_engine::NOTIFICATION_RULE)
                    .map(|r| r.script.clone())
                    .collect(),
            ),
            error_contains: d.error.as_ref().map(|e| {
                e.lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(80)
                    .collect()
            }),
        },
    })
}
