//! Erasure of a deleted identity (`idsync identities erase NAME`): an erasure request for a
//! person the repository no longer holds as an identity, but whose name and values its
//! history still holds.
//!
//! Key design choice: only a **deleted** identity is erased. An identity that exists (with
//! or without linked accounts, enabled or disabled) is refused ([`Erasure::StillExists`]):
//! its accounts would bring the person straight back, and the engine must first delete it
//! (`delete_action: delete`, or a process rule). In one transaction, what holds the
//! person goes:
//!
//! - its *former accounts* are the accounts its decision records and notifications name;
//!   those no identity links any more are the person's: their shadows (last seen
//!   attributes), failed events, discarded failed events, and their decision records that
//!   name no other identity go; an account linked again since (to someone else) keeps its
//!   shadow and failed events, which are that identity's now;
//! - every decision record naming it as its identity, and every notification about it
//!   (delivered or not);
//! - its name where other records mention it (a candidate of another account's decision, a
//!   rule's result, an error message) is replaced by `(erased)` ([`ERASED`]);
//!
//! A name is erased only when a decision record or a notification is about an identity of
//! that name: any other word (`#`, `admin`) is not a person's, and its mentions stay.
//! - index rows left behind by deleted identities, and attribute-source rows (module
//!   `sources`) of deleted identities or naming a former account no identity links;
//! - the work items of its former accounts (no identity links them any more), and its name
//!   where other work items mention it (a candidate, the identity an item was linked to, a
//!   reason) replaced by `(erased)`;
//! - its lifecycle timers (a deleted identity keeps none, but the step makes sure).
//!
//! The erasure itself is recorded in `erasures` without personal data: the time, the
//! operator's reference and the counts. A new table that holds personal data of
//! identities or accounts adds its step here.

use serde::Serialize;
use serde_json::Value as Json;

use crate::db::Conn;
use crate::error::{Context, RepoError, from_json, to_json};
use crate::{Repo, args, now};

/// What replaces an erased name in the records of others.
pub const ERASED: &str = "(erased)";

/// What one erasure removed and redacted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ErasureReport {
    /// The id of its row in `erasures`.
    pub id: i64,
    /// Former accounts found, and of them those no identity links any more (erased).
    pub accounts: u64,
    /// Former accounts linked to another identity since: their shadows and failed events
    /// were kept.
    pub accounts_relinked: u64,
    /// Decision records removed.
    pub decisions: u64,
    /// Shadows (last seen account attributes) removed.
    pub shadows: u64,
    /// Notifications removed (delivered or not).
    pub notifications: u64,
    /// Of them, undelivered ones.
    pub undelivered_notifications: u64,
    /// Failed events removed.
    pub failed_events: u64,
    /// Discarded failed events removed.
    pub failed_discarded: u64,
    /// Work items of its former accounts removed.
    pub work_items: u64,
    /// Lifecycle timers of the identity removed.
    pub timers: u64,
    /// Index rows of deleted identities removed.
    pub index_rows: u64,
    /// Attribute-source rows removed: of deleted identities (the foreign key normally
    /// removes them with the identity), or naming a former account.
    pub attribute_sources: u64,
    /// Correlation exclusions removed: of the deleted identity (the foreign key normally
    /// removes them with it), or of a former account.
    pub correlation_exclusions: u64,
    /// Other records (decisions, failed events) where the name was replaced by [`ERASED`].
    pub redacted: u64,
}

impl ErasureReport {
    /// Whether the erasure found anything at all.
    fn found_anything(&self) -> bool {
        self.accounts
            + self.decisions
            + self.notifications
            + self.failed_events
            + self.failed_discarded
            + self.work_items
            + self.timers
            + self.redacted
            > 0
    }
}

/// What an erasure request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Erasure {
    /// Erased, and recorded.
    Erased(ErasureReport),
    /// The identity exists: refused, nothing changed.
    StillExists {
        /// Its linked accounts, as (resource, key).
        accounts: Vec<(String, String)>,
        /// Whether it is disabled.
        disabled: bool,
    },
    /// No decision record or notification is about an identity of that name (never one,
    /// or already erased, or its records purged): nothing changed, nothing recorded.
    NothingHeld,
}

/// One row of `erasures`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErasureRecord {
    /// Its id.
    pub id: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The operator's reference (a ticket), if given.
    pub reference: Option<String>,
    /// What was removed: the counts of [`ErasureReport`].
    pub removed: Json,
}

impl Repo {
    /// Erases the deleted identity `name` (module doc); `reference` is kept with the record
    /// of the erasure. One transaction: all of it or nothing.
    pub fn erase_identity(
        &self,
        name: &str,
        reference: Option<&str>,
    ) -> Result<Erasure, RepoError> {
        self.begin()?;
        let result = (|| {
            let conn = self.lock()?;
            if let Some(live) = still_exists(&conn, name)? {
                return Ok(live);
            }
            let mut report = erase(&conn, name)?;
            if !report.found_anything() {
                return Ok(Erasure::NothingHeld);
            }
            let removed = to_json(&report, || "the record of an erasure".to_owned())?;
            report.id = conn
                .insert_one_id(
                    "INSERT INTO erasures (at, reference, removed) VALUES (?1, ?2, ?3) \
                     RETURNING id",
                    args![now(), reference, removed],
                )
                .ctx("recording the erasure")?;
            Ok(Erasure::Erased(report))
        })();
        match result {
            Ok(Erasure::Erased(r)) => self.finish(Ok(Erasure::Erased(r))),
            // Nothing to keep: end the transaction without writing.
            other => {
                self.rollback()?;
                other
            }
        }
    }

    /// The erasures carried out, oldest first.
    pub fn erasures(&self) -> Result<Vec<ErasureRecord>, RepoError> {
        let rows: Vec<(i64, String, Option<String>, String)> = self
            .lock()?
            .query_map(
                "SELECT id, at, reference, removed FROM erasures ORDER BY id",
                args![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .ctx("reading the erasures")?;
        rows.into_iter()
            .map(|(id, at, reference, removed)| {
                Ok(ErasureRecord {
                    id,
                    at,
                    reference,
                    removed: from_json(&removed, || format!("erasure #{id}"))?,
                })
            })
            .collect()
    }
}

/// [`Erasure::StillExists`] when identity `name` exists.
fn still_exists(conn: &Conn, name: &str) -> Result<Option<Erasure>, RepoError> {
    let row: Option<(i64, bool)> = conn
        .query_row(
            "SELECT id, disabled FROM identities WHERE name = ?1",
            args![name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .with_ctx(|| format!("reading identity {name}"))?;
    let Some((id, disabled)) = row else {
        return Ok(None);
    };
    let accounts = conn
        .query_map(
            "SELECT resource, key FROM links WHERE identity_id = ?1 ORDER BY resource, key",
            args![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .with_ctx(|| format!("reading the accounts of identity {name}"))?;
    Ok(Some(Erasure::StillExists { accounts, disabled }))
}

/// Every step of the erasure of `name`, inside the caller's transaction.
fn erase(conn: &Conn, name: &str) -> Result<ErasureReport, RepoError> {
    let mut report = ErasureReport::default();
    let ctx = |what: &str| format!("erasing: {what}");
    // Only a name the records know as an identity's is erased: the mentions of any other
    // word in the records of others (`#`, `admin`) are not a person's.
    let known = conn
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM decisions WHERE identity = ?1) \
             OR EXISTS (SELECT 1 FROM outbox WHERE identity = ?1)",
            args![name],
            |r| r.get::<bool>(0),
        )
        .with_ctx(|| ctx("looking for its records"))?;
    if !known {
        return Ok(report);
    }
    let former: Vec<(String, String)> = conn
        .query_map(
            "SELECT resource, key FROM decisions WHERE identity = ?1 \
             UNION SELECT resource, key FROM outbox WHERE identity = ?1 \
             AND resource IS NOT NULL AND key IS NOT NULL",
            args![name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .with_ctx(|| ctx("finding the former accounts"))?;
    report.accounts = former.len() as u64;
    for (resource, key) in &former {
        let linked = conn
            .query_row(
                "SELECT 1 FROM links WHERE resource = ?1 AND key = ?2",
                args![resource, key],
                |_| Ok(()),
            )
            .with_ctx(|| ctx("reading the links"))?
            .is_some();
        if linked {
            report.accounts_relinked += 1;
            continue;
        }
        let run = |sql: &str, what: &str| -> Result<u64, RepoError> {
            conn.execute(sql, args![resource, key])
                .with_ctx(|| ctx(what))
        };
        report.decisions += run(
            "DELETE FROM decisions WHERE resource = ?1 AND key = ?2 AND identity IS NULL",
            "removing the decision records of a former account",
        )?;
        report.shadows += run(
            "DELETE FROM shadows WHERE resource = ?1 AND key = ?2",
            "removing the shadow of a former account",
        )?;
        report.failed_events += run(
            "DELETE FROM failed_events WHERE resource = ?1 AND key = ?2",
            "removing the failed events of a former account",
        )?;
        report.failed_discarded += run(
            "DELETE FROM failed_discarded WHERE resource = ?1 AND key = ?2",
            "removing the discarded failed events of a former account",
        )?;
        report.work_items += run(
            "DELETE FROM work_items WHERE resource = ?1 AND key = ?2",
            "removing the work items of a former account",
        )?;
        report.attribute_sources += run(
            "DELETE FROM attribute_sources WHERE resource = ?1 AND key = ?2",
            "removing the attribute sources naming a former account",
        )?;
        report.correlation_exclusions += run(
            "DELETE FROM correlation_exclusions WHERE resource = ?1 AND key = ?2",
            "removing the correlation exclusions of a former account",
        )?;
    }
    report.decisions += conn
        .execute("DELETE FROM decisions WHERE identity = ?1", args![name])
        .with_ctx(|| ctx("removing its decision records"))?;
    report.undelivered_notifications = conn
        .query_one(
            "SELECT count(*) FROM outbox WHERE identity = ?1 AND status != 'sent'",
            args![name],
            |r| r.get::<i64>(0),
        )
        .map(|n| u64::try_from(n).unwrap_or(0))
        .with_ctx(|| ctx("counting its notifications"))?;
    report.notifications = conn
        .execute("DELETE FROM outbox WHERE identity = ?1", args![name])
        .with_ctx(|| ctx("removing its notifications"))?;
    report.timers = conn
        .execute("DELETE FROM timers WHERE identity = ?1", args![name])
        .with_ctx(|| ctx("removing its timers"))?;
    report.index_rows = conn
        .execute(
            "DELETE FROM identity_values WHERE identity_id NOT IN (SELECT id FROM identities)",
            args![],
        )
        .with_ctx(|| ctx("removing index rows of deleted identities"))?;
    report.attribute_sources += conn
        .execute(
            "DELETE FROM attribute_sources WHERE identity_id NOT IN (SELECT id FROM identities)",
            args![],
        )
        .with_ctx(|| ctx("removing attribute sources of deleted identities"))?;
    report.correlation_exclusions += conn
        .execute(
            "DELETE FROM correlation_exclusions \
             WHERE identity_id NOT IN (SELECT id FROM identities)",
            args![],
        )
        .with_ctx(|| ctx("removing correlation exclusions of deleted identities"))?;
    report.redacted = redact_records(conn, name)?;
    Ok(report)
}

/// The failed-event tables whose error texts are redacted: the name, the statement finding
/// the rows whose error contains `?1`, and the one replacing an error.
///
/// `replace(x, ?1, '') <> x` says "x contains ?1" in both databases (SQLite's `instr` is
/// PostgreSQL's `strpos`), case-sensitively like the redaction; NULL never matches.
const ERROR_TABLES: [(&str, &str, &str); 2] = [
    (
        "failed_events",
        "SELECT id, error FROM failed_events WHERE replace(error, ?1, '') <> error",
        "UPDATE failed_events SET error = ?2 WHERE id = ?1",
    ),
    (
        "failed_discarded",
        "SELECT id, error FROM failed_discarded WHERE replace(error, ?1, '') <> error",
        "UPDATE failed_discarded SET error = ?2 WHERE id = ?1",
    ),
];

/// Replaces `name` by [`ERASED`] where the records of others mention it: every text of a
/// decision record's JSON (candidates, rule results, errors) and the error of failed and
/// discarded failed events. Returns how many rows changed.
fn redact_records(conn: &Conn, name: &str) -> Result<u64, RepoError> {
    // The name as it appears inside JSON text (quotes and backslashes escaped).
    let json_name = serde_json::to_string(name).map_err(|e| RepoError::Encode {
        what: "an identity name".to_owned(),
        message: e.to_string(),
    })?;
    let json_name = &json_name[1..json_name.len() - 1];
    let mut changed = 0;
    // Contains: see ERROR_TABLES.
    let records: Vec<(i64, String)> = conn
        .query_map(
            "SELECT id, record FROM decisions WHERE replace(record, ?1, '') <> record",
            args![json_name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ctx("erasing: finding records that mention the name")?;
    for (id, record) in records {
        let mut value: Json = from_json(&record, || format!("decision {id}"))?;
        if !redact_json(&mut value, name) {
            continue;
        }
        let text = to_json(&value, || format!("decision {id}"))?;
        conn.execute(
            "UPDATE decisions SET record = ?2 WHERE id = ?1",
            args![id, text],
        )
        .with_ctx(|| format!("erasing the name from decision {id}"))?;
        changed += 1;
    }
    for (table, select, update) in ERROR_TABLES {
        let rows: Vec<(i64, String)> = conn
            .query_map(select, args![name], |r| Ok((r.get(0)?, r.get(1)?)))
            .with_ctx(|| format!("erasing: finding {table} that mention the name"))?;
        for (id, error) in rows {
            let Some(redacted) = redact_text(&error, name) else {
                continue;
            };
            conn.execute(update, args![id, redacted])
                .with_ctx(|| format!("erasing the name from {table} #{id}"))?;
            changed += 1;
        }
    }
    changed += redact_work_items(conn, name, json_name)?;
    Ok(changed)
}

/// Replaces `name` by [`ERASED`] in the work items of others: candidates, the identity an
/// item was settled with, its reason and the operator's reason. Returns how many changed.
fn redact_work_items(conn: &Conn, name: &str, json_name: &str) -> Result<u64, RepoError> {
    type Row = (i64, String, String, Option<String>, Option<String>);
    // Contains: see ERROR_TABLES.
    let rows: Vec<Row> = conn
        .query_map(
            "SELECT id, candidates, reason, resolved_identity, closed_reason FROM work_items \
             WHERE replace(candidates, ?1, '') <> candidates \
             OR replace(reason, ?2, '') <> reason OR resolved_identity = ?2 \
             OR replace(closed_reason, ?2, '') <> closed_reason",
            args![json_name, name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .ctx("erasing: finding work items that mention the name")?;
    let mut changed = 0;
    for (id, candidates, reason, resolved, closed_reason) in rows {
        let mut list: Json = from_json(&candidates, || format!("work item {id}"))?;
        let mut any = redact_json(&mut list, name);
        let reason = match redact_text(&reason, name) {
            Some(r) => {
                any = true;
                r
            }
            None => reason,
        };
        let resolved = match resolved {
            Some(r) if r == name => {
                any = true;
                Some(ERASED.to_owned())
            }
            other => other,
        };
        let closed_reason = match closed_reason.as_deref().and_then(|r| redact_text(r, name)) {
            Some(r) => {
                any = true;
                Some(r)
            }
            None => closed_reason,
        };
        if !any {
            continue;
        }
        let candidates = to_json(&list, || format!("work item {id}"))?;
        conn.execute(
            "UPDATE work_items SET candidates = ?2, reason = ?3, resolved_identity = ?4, \
             closed_reason = ?5 WHERE id = ?1",
            args![id, candidates, reason, resolved, closed_reason],
        )
        .with_ctx(|| format!("erasing the name from work item #{id}"))?;
        changed += 1;
    }
    Ok(changed)
}

/// Redacts `name` in every string of `value`; whether anything changed.
fn redact_json(value: &mut Json, name: &str) -> bool {
    match value {
        Json::String(s) => match redact_text(s, name) {
            Some(r) => {
                *s = r;
                true
            }
            None => false,
        },
        Json::Array(items) => items
            .iter_mut()
            .fold(false, |any, v| redact_json(v, name) | any),
        Json::Object(map) => map
            .values_mut()
            .fold(false, |any, v| redact_json(v, name) | any),
        _ => false,
    }
}

/// Characters that continue a name: a match of the name with one of these on either side is
/// part of another word (`ann` in `anna`, `1` in `rules/a.rhai:1:3`), not the name.
fn continues_name(c: char) -> bool {
    c.is_alphanumeric() || "._-@+:/\\".contains(c)
}

/// `text` with each whole-word occurrence of `name` replaced by [`ERASED`]; `None` when it
/// has none.
pub(crate) fn redact_text(text: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut changed = false;
    for (at, _) in text.match_indices(name) {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        if before.is_some_and(continues_name) || after.is_some_and(continues_name) {
            continue;
        }
        out.push_str(&text[copied..at]);
        out.push_str(ERASED);
        copied = at + name.len();
        changed = true;
    }
    out.push_str(&text[copied..]);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_names_are_redacted() {
        assert_eq!(
            redact_text("several candidates: ann, anna, ann.b", "ann").as_deref(),
            Some("several candidates: (erased), anna, ann.b")
        );
        assert_eq!(redact_text("rules/a.rhai:1:3: x", "1"), None);
        assert_eq!(redact_text("ann", "ann").as_deref(), Some("(erased)"));
        assert_eq!(
            redact_text("name ann taken by ann", "ann").as_deref(),
            Some("name (erased) taken by (erased)")
        );
        assert_eq!(redact_text("joanne", "ann"), None);
    }
}
