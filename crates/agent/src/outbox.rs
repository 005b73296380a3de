//! Notifications in the agent: a dispatch round with its report line, the `outbox`
//! commands, the pending mark in `identities show`/`export`.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use idsync_core::Identity;
use idsync_notify::{Dispatcher, RoundReport};
use idsync_repo::{OutboxFilter, OutboxMessage, OutboxStatus, Repo};

use crate::cli::OutboxCommand;
use crate::config::Loaded;
use crate::exit::Exit;
use crate::printable::inline;
use crate::setup::open_repo;

/// The dispatch round that ends a command which may have queued mail (`run --once`,
/// `reconcile`): the command's exit status `code`, turned into "failed" when a message was
/// dead-lettered and into "resource error" when the outbox could not be read.
pub fn round_after_command(setup: &crate::setup::Setup, code: ExitCode) -> ExitCode {
    let Some(d) = &setup.dispatcher else {
        return code;
    };
    match dispatch_round(d) {
        Ok(round) if round.dead > 0 && code == ExitCode::SUCCESS => {
            eprintln!(
                "error: outbox: {} message(s) dead-lettered (idsync outbox list --status dead)",
                round.dead
            );
            ExitCode::from(Exit::Failed)
        }
        Ok(_) => code,
        Err(e) => {
            eprintln!("error: outbox: {e}");
            ExitCode::from(Exit::Resource)
        }
    }
}

/// One dispatch round; prints a line when anything happened.
pub fn dispatch_round(d: &Dispatcher) -> Result<RoundReport, idsync_notify::NotifyError> {
    let r = d.round_blocking()?;
    if r != RoundReport::default() {
        crate::printable::line(format_args!(
            "outbox: sent {}, retrying {}, dead-lettered {}",
            r.sent, r.retrying, r.dead
        ));
    }
    Ok(r)
}

/// `identities show`: the identity's undelivered notifications.
pub fn show_pending(repo: &Repo, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let list = repo.outbox_list(&OutboxFilter {
        identity: Some(name.to_owned()),
        undelivered: true,
        ..OutboxFilter::default()
    })?;
    if !list.is_empty() {
        writeln!(out, "pending notifications:")?;
        for m in &list {
            writeln!(
                out,
                "  #{} {} {} attempts={} {}",
                m.id,
                m.status.as_str(),
                m.policy,
                m.attempts,
                m.last_error.as_deref().unwrap_or("")
            )?;
        }
    }
    Ok(())
}

/// Undelivered counts by identity, for `identities export`.
pub fn pending_counts(repo: &Repo) -> anyhow::Result<HashMap<String, u64>> {
    Ok(repo.outbox_undelivered_counts()?)
}

/// One `identities export` line: the identity, plus `pending_notifications` when it has
/// undelivered messages.
pub fn export_line(id: &Identity, pending: &HashMap<String, u64>) -> serde_json::Result<String> {
    let mut v = serde_json::to_value(id)?;
    if let (Some(n), Some(obj)) = (pending.get(&id.name), v.as_object_mut()) {
        obj.insert("pending_notifications".into(), (*n).into());
    }
    serde_json::to_string(&v)
}

fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn line(m: &OutboxMessage) -> String {
    let mut s = format!(
        "#{} {} {} attempts={} policy={} identity={} to={} subject={:?}",
        m.id,
        m.status.as_str(),
        time(m.created_at),
        m.attempts,
        m.policy,
        inline(m.identity.as_deref().unwrap_or("-")),
        inline(&m.mail.to.join(",")),
        m.mail.subject
    );
    match m.status {
        OutboxStatus::Pending => s.push_str(&format!(" next={}", time(m.next_attempt_at))),
        OutboxStatus::Sent => s.push_str(&format!(" sent={}", time(m.sent_at.unwrap_or(0)))),
        OutboxStatus::Dead => {}
    }
    if let Some(e) = &m.last_error {
        s.push_str(&format!(" error={e:?}"));
    }
    s
}

/// `idsync outbox ...`.
pub fn command(loaded: Loaded, cmd: &OutboxCommand) -> anyhow::Result<ExitCode> {
    let repo = open_repo(&loaded)?;
    let mut out = crate::printable::stdout();
    match cmd {
        OutboxCommand::List {
            status,
            identity,
            limit,
            json,
        } => {
            let status = match status.as_deref().map(|s| (s, OutboxStatus::parse(s))) {
                Some((s, None)) => {
                    eprintln!("unknown status '{s}'; one of: pending, sent, dead");
                    return Ok(ExitCode::from(Exit::Config));
                }
                Some((_, st)) => st,
                None => None,
            };
            let list = repo.outbox_list(&OutboxFilter {
                status,
                identity: identity.clone(),
                undelivered: false,
                limit: *limit,
            })?;
            for m in &list {
                if *json {
                    writeln!(out, "{}", serde_json::to_string(m)?)?;
                } else {
                    writeln!(out, "{}", line(m))?;
                }
            }
            let (p, s, d) = repo.outbox_counts()?;
            eprintln!(
                "{} message(s) shown; pending {p}, sent {s}, dead {d}",
                list.len()
            );
        }
        OutboxCommand::Show { ids } => {
            let mut code = ExitCode::SUCCESS;
            for (i, id) in ids.iter().enumerate() {
                let Some(m) = repo.outbox_get(*id)? else {
                    eprintln!("no outbox message #{id}");
                    code = ExitCode::from(Exit::Failed);
                    continue;
                };
                if i > 0 {
                    writeln!(out)?;
                }
                writeln!(out, "{}", line(&m))?;
                writeln!(
                    out,
                    "message-id: {}",
                    idsync_notify::message::message_id(&m)
                )?;
                writeln!(out, "from: {}", m.mail.from)?;
                writeln!(out, "to: {}", inline(&m.mail.to.join(", ")))?;
                writeln!(out, "subject: {}", inline(&m.mail.subject))?;
                writeln!(out, "--- text\n{}", m.mail.text)?;
                if let Some(h) = &m.mail.html {
                    writeln!(out, "--- html\n{h}")?;
                }
            }
            return Ok(code);
        }
        OutboxCommand::Retry { ids, dead } => {
            if *dead {
                let n = repo.outbox_retry_dead()?;
                crate::printable::line(format_args!("{n} dead-lettered message(s) due again"));
            } else if ids.is_empty() {
                eprintln!("give outbox ids, or --dead");
                return Ok(ExitCode::from(Exit::Config));
            } else {
                let mut code = ExitCode::SUCCESS;
                for id in ids {
                    if repo.outbox_retry(*id)? {
                        crate::printable::line(format_args!("#{id} due again"));
                    } else {
                        eprintln!("no undelivered outbox message #{id}");
                        code = ExitCode::from(Exit::Failed);
                    }
                }
                return Ok(code);
            }
        }
        OutboxCommand::Purge { sent_before } => {
            let cutoff = match crate::when::parse_cutoff(sent_before) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: --sent-before: {e}");
                    return Ok(ExitCode::from(Exit::Config));
                }
            };
            let ms = cutoff
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            let n = repo.outbox_purge_sent_before(ms)?;
            crate::printable::line(format_args!("purged {n} sent message(s)"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
