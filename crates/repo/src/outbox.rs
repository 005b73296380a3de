//! The notification outbox: rendered messages waiting for delivery.
//!
//! Key design choice (docs/design.md, "Durability"): a message is inserted in the same
//! transaction as the checkin that caused it, and it stays *undelivered* (status `pending`,
//! or `dead` after a permanent failure) until the transaction that records its delivery
//! marks it `sent`. That row is the "pending notification" mark of the identity: there is no
//! separate flag to forget to clear. The dispatcher claims due rows with a lease
//! (`claimed_until`), so two dispatchers on one repository do not send the same row at
//! once, and a dispatcher that dies mid-send leaves the row to be claimed again when the
//! lease ends. Times are Unix milliseconds. Statements serve SQLite and PostgreSQL alike.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::db::{Arg, DbError, Dialect, Row, ToArg};
use crate::error::{Context, RepoError, from_json, to_json};
use crate::leases::DB_NOW_MS;
use crate::{Repo, Serialised, args, require_tx};

/// A rendered email, as stored in the outbox row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedMail {
    /// The From mailbox.
    pub from: String,
    /// Recipients (To).
    pub to: Vec<String>,
    /// Subject, one line.
    pub subject: String,
    /// The text part.
    pub text: String,
    /// The HTML part, if the policy has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// The policy's retry schedule and error handling, opaque to the repository.
    #[serde(default)]
    pub retry: serde_json::Value,
}

/// A message to enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutboxMessage {
    /// The policy that produced it.
    pub policy: String,
    /// The identity it is about (shown as pending on it until delivered).
    pub identity: Option<String>,
    /// The resource of the event that caused it.
    pub resource: Option<String>,
    /// The account key of that event.
    pub key: Option<String>,
    /// The message.
    pub mail: RenderedMail,
    /// How long delivery may be retried, in milliseconds from creation.
    pub max_age_ms: i64,
    /// Set when the message cannot ever be sent (e.g. an invalid recipient address): it is
    /// stored dead-lettered with this error, visible and re-triable after a fix.
    pub dead: Option<String>,
}

/// Where a message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Waiting for (another) delivery attempt.
    Pending,
    /// Delivered.
    Sent,
    /// Given up (permanent failure or too old); re-triable by the CLI.
    Dead,
}

impl OutboxStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Dead => "dead",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<OutboxStatus> {
        [
            OutboxStatus::Pending,
            OutboxStatus::Sent,
            OutboxStatus::Dead,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// One outbox row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// Row id (the Message-ID is derived from it).
    pub id: i64,
    /// When it was enqueued (Unix ms).
    pub created_at: i64,
    /// Policy name.
    pub policy: String,
    /// The identity it is about.
    pub identity: Option<String>,
    /// Resource of the causing event.
    pub resource: Option<String>,
    /// Account key of the causing event.
    pub key: Option<String>,
    /// Status.
    pub status: OutboxStatus,
    /// Delivery attempts so far.
    pub attempts: i64,
    /// Not before (Unix ms).
    pub next_attempt_at: i64,
    /// Retries stop after this (Unix ms).
    pub expires_at: i64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When delivered (Unix ms).
    pub sent_at: Option<i64>,
    /// The message.
    pub mail: RenderedMail,
}

/// What a delivery attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxOutcome {
    /// Delivered: the row becomes `sent`, which clears the identity's pending mark.
    Sent,
    /// Try again at `next_attempt_at` (Unix ms).
    Retry {
        /// Not before.
        next_attempt_at: i64,
        /// Why it failed.
        error: String,
    },
    /// Give up: dead-lettered.
    Dead {
        /// Why.
        error: String,
    },
}

/// What `outbox list` shows.
#[derive(Clone, Debug, Default)]
pub struct OutboxFilter {
    /// Only this status.
    pub status: Option<OutboxStatus>,
    /// Only messages about this identity.
    pub identity: Option<String>,
    /// Only undelivered ones (pending or dead).
    pub undelivered: bool,
    /// At most this many, newest first.
    pub limit: Option<u64>,
}

/// Now as Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const COLUMNS: &str = "id, created_at, policy, identity, resource, key, status, attempts, \
     next_attempt_at, expires_at, last_error, sent_at, message";

fn read_row(r: &Row<'_>) -> Result<(OutboxMessage, String), DbError> {
    let status: String = r.get(6)?;
    let msg = OutboxMessage {
        id: r.get(0)?,
        created_at: r.get(1)?,
        policy: r.get(2)?,
        identity: r.get(3)?,
        resource: r.get(4)?,
        key: r.get(5)?,
        status: OutboxStatus::parse(&status).unwrap_or(OutboxStatus::Dead),
        attempts: r.get(7)?,
        next_attempt_at: r.get(8)?,
        expires_at: r.get(9)?,
        last_error: r.get(10)?,
        sent_at: r.get(11)?,
        mail: RenderedMail {
            from: String::new(),
            to: Vec::new(),
            subject: String::new(),
            text: String::new(),
            html: None,
            retry: serde_json::Value::Null,
        },
    };
    Ok((msg, r.get(12)?))
}

fn decode(rows: Vec<(OutboxMessage, String)>) -> Result<Vec<OutboxMessage>, RepoError> {
    rows.into_iter()
        .map(|(mut m, json)| {
            m.mail = from_json(&json, || format!("outbox message {}", m.id))?;
            Ok(m)
        })
        .collect()
}

impl Repo {
    /// Enqueues a message, normally inside the batch transaction of the checkin that caused
    /// it. Returns the row id.
    pub fn outbox_insert(&self, m: &NewOutboxMessage) -> Result<i64, RepoError> {
        let json = to_json(&m.mail, || format!("outbox message of policy {}", m.policy))?;
        let now = now_ms();
        let status = if m.dead.is_some() {
            OutboxStatus::Dead
        } else {
            OutboxStatus::Pending
        };
        self.lock()?
            .insert_one_id(
                "INSERT INTO outbox (created_at, policy, identity, resource, key, status, \
                 next_attempt_at, expires_at, last_error, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?1, ?7, ?8, ?9) RETURNING id",
                args![
                    now,
                    m.policy,
                    m.identity,
                    m.resource,
                    m.key,
                    status.as_str(),
                    now.saturating_add(m.max_age_ms),
                    m.dead,
                    json
                ],
            )
            .with_ctx(|| format!("enqueueing a message of policy {}", m.policy))
    }

    /// Claims up to `limit` due pending messages for `lease_ms` and returns them, in a
    /// transaction of its own (committed before anything is sent).
    ///
    /// On PostgreSQL every agent's dispatcher claims at once: the due rows are locked with
    /// `FOR UPDATE SKIP LOCKED`, so two dispatchers never claim one message and neither
    /// waits for the other (nor for a batch: the transaction skips the batches' lock).
    pub fn outbox_claim(&self, limit: u64, lease_ms: i64) -> Result<Vec<OutboxMessage>, RepoError> {
        self.begin_as(Serialised::No)?;
        let result = (|| {
            let conn = self.lock()?;
            let (now, lock) = match conn.dialect() {
                Dialect::Sqlite => (now_ms(), ""),
                // The claims of every agent's dispatcher on the database's clock: an agent
                // whose clock runs ahead by more than the claim lease would otherwise take
                // a message another agent is still sending as free.
                Dialect::Postgres => (
                    conn.query_one(&format!("SELECT {DB_NOW_MS}"), args![], |r| r.get(0))
                        .ctx("reading the database's clock")?,
                    " FOR UPDATE SKIP LOCKED",
                ),
            };
            let rows = conn
                .query_map(
                    &format!(
                        "SELECT {COLUMNS} FROM outbox WHERE status = 'pending' \
                         AND next_attempt_at <= ?1 AND claimed_until <= ?1 \
                         ORDER BY next_attempt_at, id LIMIT ?2{lock}"
                    ),
                    args![now, i64::try_from(limit).unwrap_or(i64::MAX)],
                    read_row,
                )
                .ctx("finding due outbox messages")?;
            let until = now.saturating_add(lease_ms);
            for (m, _) in &rows {
                conn.execute(
                    "UPDATE outbox SET claimed_until = ?1 WHERE id = ?2",
                    args![until, m.id],
                )
                .with_ctx(|| format!("claiming outbox message {}", m.id))?;
            }
            drop(conn);
            decode(rows)
        })();
        self.finish(result)
    }

    /// Records the outcomes of delivery attempts in one transaction. `Sent` is what clears
    /// the pending mark of the message's identity.
    pub fn outbox_record(&self, outcomes: &[(i64, OutboxOutcome)]) -> Result<(), RepoError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        self.begin_as(Serialised::No)?;
        let result = (|| {
            let now = now_ms();
            let conn = self.lock()?;
            require_tx(&conn, "outbox_record")?;
            for (id, outcome) in outcomes {
                let (sql, args): (&str, Vec<Arg<'_>>) = match outcome {
                    OutboxOutcome::Sent => (
                        "UPDATE outbox SET status = 'sent', sent_at = ?2, attempts = attempts + 1, \
                         claimed_until = 0, last_error = NULL WHERE id = ?1",
                        vec![id.to_arg(), now.to_arg()],
                    ),
                    OutboxOutcome::Retry {
                        next_attempt_at,
                        error,
                    } => (
                        "UPDATE outbox SET next_attempt_at = ?2, last_error = ?3, \
                         attempts = attempts + 1, claimed_until = 0 WHERE id = ?1",
                        vec![id.to_arg(), next_attempt_at.to_arg(), error.to_arg()],
                    ),
                    OutboxOutcome::Dead { error } => (
                        "UPDATE outbox SET status = 'dead', last_error = ?2, \
                         attempts = attempts + 1, claimed_until = 0 WHERE id = ?1",
                        vec![id.to_arg(), error.to_arg()],
                    ),
                };
                conn.execute(sql, &args)
                    .with_ctx(|| format!("recording the delivery of outbox message {id}"))?;
            }
            Ok(())
        })();
        self.finish(result)
    }

    /// Outbox rows, newest first.
    pub fn outbox_list(&self, f: &OutboxFilter) -> Result<Vec<OutboxMessage>, RepoError> {
        let mut sql = format!("SELECT {COLUMNS} FROM outbox WHERE 1=1");
        let mut args: Vec<Arg<'_>> = Vec::new();
        // Clauses are fixed text and values bound: one statement per combination of
        // filters.
        if let Some(s) = f.status {
            args.push(s.as_str().to_arg());
            sql.push_str(&format!(" AND status = ?{}", args.len()));
        }
        if f.undelivered {
            sql.push_str(" AND status != 'sent'");
        }
        if let Some(i) = &f.identity {
            args.push(i.to_arg());
            sql.push_str(&format!(" AND identity = ?{}", args.len()));
        }
        sql.push_str(" ORDER BY id DESC");
        if let Some(l) = f.limit {
            args.push(Arg::Int(i64::try_from(l).unwrap_or(i64::MAX)));
            sql.push_str(&format!(" LIMIT ?{}", args.len()));
        }
        let rows = self
            .lock()?
            .query_map(&sql, &args, read_row)
            .ctx("listing the outbox")?;
        decode(rows)
    }

    /// One outbox row.
    pub fn outbox_get(&self, id: i64) -> Result<Option<OutboxMessage>, RepoError> {
        let row = self
            .lock()?
            .query_row(
                &format!("SELECT {COLUMNS} FROM outbox WHERE id = ?1"),
                args![id],
                read_row,
            )
            .with_ctx(|| format!("reading outbox message {id}"))?;
        Ok(decode(row.into_iter().collect())?.pop())
    }

    /// Makes an undelivered message due now again, with a fresh maximum age. Returns false
    /// when there is no such undelivered message.
    pub fn outbox_retry(&self, id: i64) -> Result<bool, RepoError> {
        let n = self
            .lock()?
            .execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?2, \
                 expires_at = ?2 + (expires_at - created_at), claimed_until = 0 \
                 WHERE id = ?1 AND status != 'sent'",
                args![id, now_ms()],
            )
            .with_ctx(|| format!("retrying outbox message {id}"))?;
        Ok(n > 0)
    }

    /// Makes every dead-lettered message due again. Returns how many.
    pub fn outbox_retry_dead(&self) -> Result<u64, RepoError> {
        self.lock()?
            .execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?1, \
                 expires_at = ?1 + (expires_at - created_at), claimed_until = 0 \
                 WHERE status = 'dead'",
                args![now_ms()],
            )
            .ctx("retrying dead-lettered messages")
    }

    /// Deletes sent messages delivered before `before_ms`. Undelivered ones are never
    /// purged. Returns how many.
    pub fn outbox_purge_sent_before(&self, before_ms: i64) -> Result<u64, RepoError> {
        self.lock()?
            .execute(
                "DELETE FROM outbox WHERE status = 'sent' AND sent_at < ?1",
                args![before_ms],
            )
            .ctx("purging sent messages")
    }

    /// Undelivered (pending or dead) message counts by identity.
    pub fn outbox_undelivered_counts(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, RepoError> {
        let rows = self
            .lock()?
            .query_map(
                "SELECT identity, COUNT(*) FROM outbox WHERE status != 'sent' \
                 AND identity IS NOT NULL GROUP BY identity",
                args![],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )
            .ctx("counting undelivered messages")?;
        Ok(rows
            .into_iter()
            .map(|(i, n)| (i, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// When the next pending message becomes due (Unix milliseconds; its next attempt or
    /// the end of its claim, whichever is later), `None` when nothing is pending.
    pub fn outbox_next_due(&self) -> Result<Option<i64>, RepoError> {
        self.lock()?
            .query_one(
                "SELECT min(CASE WHEN next_attempt_at > claimed_until THEN next_attempt_at \
                 ELSE claimed_until END) FROM outbox WHERE status = 'pending'",
                args![],
                |r| r.get::<Option<i64>>(0),
            )
            .ctx("finding the next due outbox message")
    }

    /// Counts by status: (pending, sent, dead).
    pub fn outbox_counts(&self) -> Result<(u64, u64, u64), RepoError> {
        let mut counts = (0, 0, 0);
        let rows = self
            .lock()?
            .query_map(
                "SELECT status, COUNT(*) FROM outbox GROUP BY status",
                args![],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )
            .ctx("counting outbox messages")?;
        for (s, n) in rows {
            let n = u64::try_from(n).unwrap_or(0);
            match OutboxStatus::parse(&s) {
                Some(OutboxStatus::Pending) => counts.0 = n,
                Some(OutboxStatus::Sent) => counts.1 = n,
                Some(OutboxStatus::Dead) => counts.2 = n,
                None => {}
            }
        }
        Ok(counts)
    }
}
