//! Decision records (one per event) and failed events (re-runnable by the CLI).

use idsync_core::{Action, ChangeEvent, Decision, Op, Situation};
use serde::{Deserialize, Serialize};

use crate::db::{Arg, Conn, Predicted, ToArg};
use crate::error::{Context, RepoError, from_json, to_json};
use crate::merge::{Kind, SetWise};
use crate::{Repo, args, now, stored_time};

/// A failed event to record. `event` is `None` for input that never became an event
/// (a rejected CSV row).
#[derive(Clone, Copy, Debug)]
pub struct NewFailure<'a> {
    /// Resource name.
    pub resource: &'a str,
    /// Account key, when known.
    pub key: Option<&'a str>,
    /// Where the input came from, e.g. `hr.csv:12`.
    pub origin: Option<&'a str>,
    /// Why it failed.
    pub error: &'a str,
    /// The event, for re-running.
    pub event: Option<&'a ChangeEvent>,
    /// The decision record of the failed attempt.
    pub decision_id: Option<i64>,
}

/// A failed event an operator discarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscardedFailure {
    /// Its id as a failed event.
    pub id: i64,
    /// Resource name.
    pub resource: String,
    /// Account key, when known.
    pub key: Option<String>,
    /// Its last error.
    pub error: String,
    /// When it was discarded (RFC 3339).
    pub discarded_at: String,
    /// Why, as the operator said.
    pub reason: String,
}

/// A stored failed event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedEvent {
    /// Id, stable and never reused.
    pub id: i64,
    /// When it first failed (RFC 3339).
    pub at: String,
    /// Resource name.
    pub resource: String,
    /// Account key, when known.
    pub key: Option<String>,
    /// Where the input came from.
    pub origin: Option<String>,
    /// The latest error.
    pub error: String,
    /// The event, for re-running.
    pub event: Option<ChangeEvent>,
    /// Retries so far (not counting the first failure).
    pub attempts: i64,
    /// When it was last retried.
    pub last_attempt_at: Option<String>,
    /// The decision record of the first failed attempt.
    pub decision_id: Option<i64>,
}

/// Which decisions to list; every field is optional (the default lists all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecisionFilter {
    /// Only this resource.
    pub resource: Option<String>,
    /// Only this account key.
    pub key: Option<String>,
    /// Only this situation.
    pub situation: Option<Situation>,
    /// Only failed events (action `failed`).
    pub failed_only: bool,
    /// Only decisions about this identity.
    pub identity: Option<String>,
    /// Only the newest this many.
    pub limit: Option<usize>,
}

/// A stored decision record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDecision {
    /// Id, increasing with time.
    pub id: i64,
    /// When it was recorded (RFC 3339).
    pub at: String,
    /// The record.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The part of a decision record stored as JSON: everything but the fields the columns
/// hold (resource, key, op, situation, action, identity), which are a third of a typical
/// record and were stored twice before.
#[derive(Serialize)]
struct RecordBody<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    candidates: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    confirmed: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    rules: &'a [idsync_core::RuleOutcome],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    changes: &'a [idsync_core::AttrChange],
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// [`RecordBody`] as read back. Records written before it hold the whole decision; the
/// fields the columns hold are then ignored here (they are the same).
#[derive(Deserialize)]
struct StoredBody {
    #[serde(default)]
    candidates: Vec<String>,
    #[serde(default)]
    confirmed: Vec<String>,
    #[serde(default)]
    rules: Vec<idsync_core::RuleOutcome>,
    #[serde(default)]
    changes: Vec<idsync_core::AttrChange>,
    #[serde(default)]
    error: Option<String>,
}

/// One row of `decisions`, as read.
struct DecisionRow {
    id: i64,
    at: String,
    resource: String,
    key: String,
    op: String,
    situation: Option<String>,
    action: String,
    identity: Option<String>,
    record: String,
}

impl DecisionRow {
    fn into_stored(self) -> Result<StoredDecision, RepoError> {
        let id = self.id;
        let corrupt = |what: &str, value: &str| RepoError::Corrupt {
            what: format!("decision {id}"),
            message: format!("unknown {what} '{value}'"),
        };
        let body: StoredBody = from_json(&self.record, || format!("decision {id}"))?;
        let situation = match &self.situation {
            None => None,
            Some(s) => Some(Situation::parse(s).ok_or_else(|| corrupt("situation", s))?),
        };
        Ok(StoredDecision {
            id,
            at: self.at,
            decision: Decision {
                op: Op::parse(&self.op).ok_or_else(|| corrupt("op", &self.op))?,
                action: Action::parse(&self.action)
                    .ok_or_else(|| corrupt("action", &self.action))?,
                situation,
                resource: self.resource,
                key: self.key,
                identity: self.identity,
                candidates: body.candidates,
                confirmed: body.confirmed,
                rules: body.rules,
                changes: body.changes,
                error: body.error,
                // The stored time is the record's `at`.
                at: None,
            },
        })
    }
}

/// Decision records sent ahead, set-wise (module `merge`).
static DECISIONS: SetWise = SetWise {
    sql: "INSERT INTO decisions (id, at, resource, key, op, situation, action, identity, record) \
          SELECT * FROM unnest(?1::bigint[], ?2::text[], ?3::text[], ?4::text[], ?5::text[], \
          ?6::text[], ?7::text[], ?8::text[], ?9::text[])",
    kinds: &[
        Kind::Int,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
    ],
};

impl Repo {
    /// Stores the decision record of one event; returns its id.
    pub fn record_decision(&self, d: &Decision) -> Result<i64, RepoError> {
        let body = RecordBody {
            candidates: &d.candidates,
            confirmed: &d.confirmed,
            rules: &d.rules,
            changes: &d.changes,
            error: d.error.as_deref(),
        };
        let record = to_json(&body, || {
            format!("decision for account {}/{}", d.resource, d.key)
        })?;
        let conn = self.lock()?;
        let at = d.at.map_or_else(now, stored_time);
        let what = || {
            format!(
                "recording the decision for account {}/{}",
                d.resource, d.key
            )
        };
        let (op, situation, action) = (
            d.op.as_str(),
            d.situation.map(Situation::as_str),
            d.action.as_str(),
        );
        let fields = args![
            at, d.resource, d.key, op, situation, action, d.identity, record,
        ];
        if conn.sends_ahead()
            && let Some(k) = self.known()?.as_mut()
        {
            // Speculating (module `speculation`): the id is taken beforehand.
            let id = k.decision_ids.take(&conn)?;
            let with_id: Vec<Arg<'_>> = std::iter::once(Arg::Int(id))
                .chain(fields.iter().copied())
                .collect();
            let w = Predicted {
                sql: "INSERT INTO decisions (id, at, resource, key, op, situation, action, identity, record) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                set: &DECISIONS,
                args: &with_id,
                expect: Some(1),
                entities: &[],
                after: &[],
            };
            conn.send_ahead(&w, what).with_ctx(what)?;
            return Ok(id);
        }
        conn.insert_one_id(
            "INSERT INTO decisions (at, resource, key, op, situation, action, identity, record) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            fields,
        )
        .with_ctx(what)
    }

    /// Decisions matching `filter`, oldest first (with a limit: the newest `limit` of
    /// them, still oldest first).
    pub fn decisions(&self, filter: &DecisionFilter) -> Result<Vec<StoredDecision>, RepoError> {
        let mut wheres: Vec<&str> = Vec::new();
        let mut args: Vec<Arg<'_>> = Vec::new();
        // Values are bound by position; clauses are fixed text, so the statement cache
        // holds one statement per combination of filters.
        if let Some(r) = &filter.resource {
            wheres.push("resource = ?");
            args.push(r.to_arg());
        }
        if let Some(k) = &filter.key {
            wheres.push("key = ?");
            args.push(k.to_arg());
        }
        if let Some(s) = filter.situation {
            wheres.push("situation = ?");
            args.push(s.as_str().to_arg());
        }
        if filter.failed_only {
            wheres.push("action = 'failed'");
        }
        if let Some(i) = &filter.identity {
            wheres.push("identity = ?");
            args.push(i.to_arg());
        }
        let mut sql = String::from(
            "SELECT id, at, resource, key, op, situation, action, identity, record FROM decisions",
        );
        if !wheres.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&wheres.join(" AND "));
        }
        match filter.limit {
            Some(n) => {
                sql.push_str(" ORDER BY id DESC LIMIT ?");
                args.push(Arg::Int(i64::try_from(n).unwrap_or(i64::MAX)));
            }
            None => sql.push_str(" ORDER BY id"),
        }
        let rows = self
            .lock()?
            .query_map(&sql, &args, |r| {
                Ok(DecisionRow {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    resource: r.get(2)?,
                    key: r.get(3)?,
                    op: r.get(4)?,
                    situation: r.get(5)?,
                    action: r.get(6)?,
                    identity: r.get(7)?,
                    record: r.get(8)?,
                })
            })
            .ctx("listing decisions")?;
        let mut out = rows
            .into_iter()
            .map(DecisionRow::into_stored)
            .collect::<Result<Vec<_>, RepoError>>()?;
        if filter.limit.is_some() {
            out.reverse();
        }
        Ok(out)
    }

    /// Stores a failed event; returns its id. Rejected input (no event) already stored with
    /// the same resource, key, origin and error is not stored twice: its id is returned.
    pub fn record_failure(&self, f: &NewFailure<'_>) -> Result<i64, RepoError> {
        let what = || {
            format!(
                "failed event of account {}/{}",
                f.resource,
                f.key.unwrap_or("?")
            )
        };
        let event = f.event.map(|e| to_json(e, what)).transpose()?;
        let conn = self.lock()?;
        if event.is_none() {
            // Rejected input (no event to re-run): the same line rejected again by a later
            // pass is the same failure, seen again, not a new one.
            let seen: Option<i64> = conn
                .query_row(
                    "SELECT id FROM failed_events WHERE resource = ?1 \
                     AND key IS NOT DISTINCT FROM ?2 AND origin IS NOT DISTINCT FROM ?3 \
                     AND error = ?4 AND event IS NULL LIMIT 1",
                    args![f.resource, f.key, f.origin, f.error],
                    |r| r.get(0),
                )
                .with_ctx(|| format!("looking up the {}", what()))?;
            if let Some(id) = seen {
                return Ok(id);
            }
        }
        conn.insert_one_id(
            "INSERT INTO failed_events (at, resource, key, origin, error, event, decision_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            args![
                now(),
                f.resource,
                f.key,
                f.origin,
                f.error,
                event,
                f.decision_id,
            ],
        )
        .with_ctx(|| format!("recording the {}", what()))
    }

    /// Whether `resource` has failed events waiting.
    pub fn has_failures(&self, resource: &str) -> Result<bool, RepoError> {
        self.lock()?
            .query_row(
                "SELECT 1 FROM failed_events WHERE resource = ?1 LIMIT 1",
                args![resource],
                |_| Ok(()),
            )
            .map(|found| found.is_some())
            .with_ctx(|| format!("reading failed events of resource {resource}"))
    }

    /// Deletes the failed events of account `key` of `resource`: a newer event for it
    /// succeeded, so re-running the old ones would apply stale data. Returns how many.
    pub fn supersede_failures(&self, resource: &str, key: &str) -> Result<u64, RepoError> {
        self.lock()?
            .execute(
                "DELETE FROM failed_events WHERE resource = ?1 AND key = ?2",
                args![resource, key],
            )
            .with_ctx(|| format!("clearing failed events of account {resource}/{key}"))
    }

    /// Deletes failed event `id` (it was re-run successfully); false if it did not exist.
    pub fn remove_failure(&self, id: i64) -> Result<bool, RepoError> {
        let n = self
            .lock()?
            .execute("DELETE FROM failed_events WHERE id = ?1", args![id])
            .with_ctx(|| format!("removing failed event {id}"))?;
        Ok(n > 0)
    }

    /// Notes that re-running failed event `id` failed again with `error`.
    pub fn note_retry_failure(&self, id: i64, error: &str) -> Result<(), RepoError> {
        let n = self
            .lock()?
            .execute(
                "UPDATE failed_events SET attempts = attempts + 1, error = ?2, \
                 last_attempt_at = ?3 WHERE id = ?1",
                args![id, error, now()],
            )
            .with_ctx(|| format!("updating failed event {id}"))?;
        if n == 0 {
            return Err(RepoError::NoSuchFailure { id });
        }
        Ok(())
    }

    /// Failed events, of one resource or all, oldest first.
    pub fn failures(&self, resource: Option<&str>) -> Result<Vec<FailedEvent>, RepoError> {
        let rows = {
            let conn = self.lock()?;
            match resource {
                Some(r) => query_failures(&conn, "WHERE resource = ?1 ORDER BY id", args![r]),
                None => query_failures(&conn, "ORDER BY id", args![]),
            }?
        };
        rows.into_iter().map(RawFailure::decode).collect()
    }

    /// Clears the rejected-input rows (failed events without an event) of `resource` that
    /// the source no longer produces: `current` holds `(key, origin, error)` of every reject
    /// of the source as read now. Returns how many were cleared. Call inside the batch.
    pub fn clear_fixed_rejects(
        &self,
        resource: &str,
        current: &[(Option<String>, Option<String>, String)],
    ) -> Result<u64, RepoError> {
        let conn = self.lock()?;
        let rows: Vec<(i64, Option<String>, Option<String>, String)> = conn
            .query_map(
                "SELECT id, key, origin, error FROM failed_events \
                 WHERE resource = ?1 AND event IS NULL",
                args![resource],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .with_ctx(|| format!("reading the rejected input of resource {resource}"))?;
        let mut cleared = 0;
        for (id, key, origin, error) in rows {
            if current
                .iter()
                .any(|(k, o, e)| *k == key && *o == origin && *e == error)
            {
                continue;
            }
            conn.execute("DELETE FROM failed_events WHERE id = ?1", args![id])
                .with_ctx(|| format!("clearing fixed rejected input #{id}"))?;
            cleared += 1;
        }
        Ok(cleared)
    }

    /// Discards failed events `ids` (an operator gave up on them, for `reason`): each is
    /// moved to the record of discarded events (`failed_discarded`) in one transaction.
    /// Returns the ids discarded (unknown ids are skipped).
    pub fn discard_failures(&self, ids: &[i64], reason: &str) -> Result<Vec<i64>, RepoError> {
        self.begin()?;
        let result = (|| {
            let conn = self.lock()?;
            let mut done = Vec::new();
            for id in ids {
                let moved = conn
                    .execute(
                        "INSERT INTO failed_discarded \
                         (id, at, resource, key, origin, error, event, discarded_at, reason) \
                         SELECT id, at, resource, key, origin, error, event, \
                         CAST(?2 AS TEXT), CAST(?3 AS TEXT) FROM failed_events WHERE id = ?1",
                        args![id, now(), reason],
                    )
                    .with_ctx(|| format!("discarding failed event #{id}"))?;
                if moved == 0 {
                    continue;
                }
                conn.execute("DELETE FROM failed_events WHERE id = ?1", args![id])
                    .with_ctx(|| format!("discarding failed event #{id}"))?;
                done.push(*id);
            }
            Ok(done)
        })();
        self.finish(result)
    }

    /// The discarded failed events, oldest first.
    pub fn discarded_failures(&self) -> Result<Vec<DiscardedFailure>, RepoError> {
        self.lock()?
            .query_map(
                "SELECT id, resource, key, error, discarded_at, reason FROM failed_discarded \
                 ORDER BY id",
                args![],
                |r| {
                    Ok(DiscardedFailure {
                        id: r.get(0)?,
                        resource: r.get(1)?,
                        key: r.get(2)?,
                        error: r.get(3)?,
                        discarded_at: r.get(4)?,
                        reason: r.get(5)?,
                    })
                },
            )
            .ctx("reading the discarded failed events")
    }

    /// Failed event `id`.
    pub fn failure(&self, id: i64) -> Result<Option<FailedEvent>, RepoError> {
        let rows = query_failures(&*self.lock()?, "WHERE id = ?1", args![id])?;
        rows.into_iter().next().map(RawFailure::decode).transpose()
    }
}

/// A failed-event row before its JSON is decoded.
struct RawFailure {
    id: i64,
    at: String,
    resource: String,
    key: Option<String>,
    origin: Option<String>,
    error: String,
    event: Option<String>,
    attempts: i64,
    last_attempt_at: Option<String>,
    decision_id: Option<i64>,
}

impl RawFailure {
    fn decode(self) -> Result<FailedEvent, RepoError> {
        let id = self.id;
        let event = self
            .event
            .map(|e| from_json(&e, || format!("failed event {id}")))
            .transpose()?;
        Ok(FailedEvent {
            id,
            at: self.at,
            resource: self.resource,
            key: self.key,
            origin: self.origin,
            error: self.error,
            event,
            attempts: self.attempts,
            last_attempt_at: self.last_attempt_at,
            decision_id: self.decision_id,
        })
    }
}

fn query_failures(conn: &Conn, tail: &str, args: &[Arg<'_>]) -> Result<Vec<RawFailure>, RepoError> {
    let sql = format!(
        "SELECT id, at, resource, key, origin, error, event, attempts, last_attempt_at, \
         decision_id FROM failed_events {tail}"
    );
    conn.query_map(&sql, args, |r| {
        Ok(RawFailure {
            id: r.get(0)?,
            at: r.get(1)?,
            resource: r.get(2)?,
            key: r.get(3)?,
            origin: r.get(4)?,
            error: r.get(5)?,
            event: r.get(6)?,
            attempts: r.get(7)?,
            last_attempt_at: r.get(8)?,
            decision_id: r.get(9)?,
        })
    })
    .ctx("reading failed events")
}
