//! `idsync identities erase NAME...` (an erasure request for deleted identities) and
//! `idsync identities erasures` (the record of the erasures carried out). What is erased
//! and what is refused is decided in the repository (`idsync_repo::Erasure`); this module
//! says it to the operator. The record of an erasure holds no name: the name is printed to
//! the operator who gave it, never logged.

use std::io::Write;
use std::process::ExitCode;

use idsync_repo::{ERASED, Erasure, ErasureReport, Repo};

use crate::exit::Exit;
use crate::printable::{inline, line};

/// Erases each of `names` in its own transaction. Exit status: 2 if one still exists
/// (refused), else 1 if nothing named one of them, else 0.
pub fn erase(repo: &Repo, names: &[String], reference: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut refused = false;
    let mut unknown = false;
    for name in names {
        let shown = inline(name);
        match repo.erase_identity(name, reference)? {
            Erasure::Erased(report) => {
                tracing::warn!("erasure #{} carried out", report.id);
                line(format_args!("erased {shown}: {}", describe(&report)));
            }
            Erasure::StillExists { accounts, disabled } => {
                refused = true;
                let state = if disabled { "disabled" } else { "enabled" };
                let linked = if accounts.is_empty() {
                    "no linked account".to_owned()
                } else {
                    let list: Vec<String> = accounts
                        .iter()
                        .map(|(r, k)| format!("{r}:{}", inline(k)))
                        .collect();
                    format!("linked to {}", list.join(", "))
                };
                eprintln!(
                    "error: identity '{shown}' still exists ({state}, {linked}): only a deleted \
                     identity can be erased; nothing was changed. The engine deletes an identity \
                     when its last account is deleted and the resource says \
                     `delete_action: delete`"
                );
            }
            Erasure::NothingHeld => {
                unknown = true;
                eprintln!(
                    "error: nothing in the repository is about an identity named '{shown}' (no \
                     identity, decision record or notification): nothing to erase"
                );
            }
        }
    }
    Ok(if refused {
        ExitCode::from(Exit::Config)
    } else if unknown {
        ExitCode::from(Exit::Failed)
    } else {
        ExitCode::SUCCESS
    })
}

/// What one erasure removed, for the operator.
fn describe(r: &ErasureReport) -> String {
    let mut s = format!("{} former account(s)", r.accounts);
    if r.accounts_relinked > 0 {
        s.push_str(&format!(
            " ({} linked to another identity since: their shadows and failed events kept)",
            r.accounts_relinked
        ));
    }
    s.push_str(&format!(
        "; removed {} decision record(s), {} shadow(s), {} notification(s) ({} undelivered), \
         {} failed event(s), {} discarded failed event(s), {} work item(s), {} index row(s)",
        r.decisions,
        r.shadows,
        r.notifications,
        r.undelivered_notifications,
        r.failed_events,
        r.failed_discarded,
        r.work_items,
        r.index_rows
    ));
    if r.timers > 0 {
        s.push_str(&format!(", {} timer(s)", r.timers));
    }
    if r.attribute_sources > 0 {
        s.push_str(&format!(", {} attribute source(s)", r.attribute_sources));
    }
    if r.correlation_exclusions > 0 {
        s.push_str(&format!(
            ", {} correlation exclusion(s)",
            r.correlation_exclusions
        ));
    }
    if r.redacted > 0 {
        s.push_str(&format!(
            "; the name replaced by {ERASED} in {} other record(s)",
            r.redacted
        ));
    }
    s.push_str(&format!("; recorded as erasure #{}", r.id));
    s
}

/// `idsync identities erasures [--json]`.
pub fn list(repo: &Repo, json: bool) -> anyhow::Result<ExitCode> {
    let mut out = crate::printable::stdout();
    let all = repo.erasures()?;
    for e in &all {
        if json {
            writeln!(out, "{}", serde_json::to_string(e)?)?;
            continue;
        }
        writeln!(
            out,
            "#{} {} reference={} removed={}",
            e.id,
            e.at,
            inline(e.reference.as_deref().unwrap_or("-")),
            e.removed
        )?;
    }
    eprintln!("{} erasure(s)", all.len());
    Ok(ExitCode::SUCCESS)
}
