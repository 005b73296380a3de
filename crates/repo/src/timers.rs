//! Lifecycle timers: what the engine planned to do to an identity at a later time — delete
//! it when the grace period of `delete_action: { action: disable, then: delete, after }`
//! ends, enable it on its `valid_from` date, disable it on its `valid_to` date.
//!
//! Key design choices:
//! - A timer is written in the transaction of the decision that planned it, and removed in
//!   the transaction of the decision that fired it (op `timer`) or cancelled it (a rehire):
//!   a crash leaves a timer pending or fired with its decision, never fired twice nor lost.
//!   There is no "fired" state: the decision records are the history.
//! - An identity has at most one pending timer of each kind (unique index): planning again
//!   moves it (a changed date re-plans its timer).
//! - Times are Unix milliseconds, so the next due timer is one index lookup
//!   ([`Repo::next_timer_due`]) for the agent's sleep.

use serde::Serialize;

use crate::db::{Arg, Conn, DbError, Row, ToArg};
use crate::error::{Context, RepoError};
use crate::{Repo, args};

/// What a timer does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimerKind {
    /// Delete the identity: the grace period of its resource's `delete_action` ended.
    Delete,
    /// Enable the identity: its `valid_from` date came.
    Enable,
    /// Disable the identity: its `valid_to` date came.
    Disable,
}

impl TimerKind {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::Delete => "delete",
            TimerKind::Enable => "enable",
            TimerKind::Disable => "disable",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<TimerKind> {
        [TimerKind::Delete, TimerKind::Enable, TimerKind::Disable]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for TimerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A timer to plan ([`Repo::plan_timer`]).
#[derive(Clone, Copy, Debug)]
pub struct NewTimer<'a> {
    /// The identity it acts on.
    pub identity: &'a str,
    /// What it does.
    pub kind: TimerKind,
    /// When it fires (Unix ms).
    pub due_at: i64,
    /// The resource of the account whose event planned it (its policy decides the firing).
    pub resource: &'a str,
    /// That account's key.
    pub key: &'a str,
    /// Why, in words (shown by `explain` and `preview --timers`).
    pub reason: &'a str,
    /// When it was planned (Unix ms): the time of the decision that plans it, from which
    /// a grace period counts.
    pub planned_at: i64,
}

/// A pending timer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Timer {
    /// Id, stable and never reused.
    pub id: i64,
    /// The identity it acts on.
    pub identity: String,
    /// What it does.
    pub kind: TimerKind,
    /// When it fires (Unix ms).
    pub due_at: i64,
    /// When it was planned, or planned again (Unix ms).
    pub planned_at: i64,
    /// The resource whose event planned it.
    pub resource: String,
    /// The account key whose event planned it.
    pub key: String,
    /// Why, in words.
    pub reason: String,
    /// Firings that failed (a rule error): each put it off.
    pub attempts: i64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// What planning a timer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// A new timer.
    New(i64),
    /// The identity's pending timer of that kind was moved from this time (Unix ms).
    Moved {
        /// Its id.
        id: i64,
        /// When it was due before.
        from: i64,
    },
    /// The identity's pending timer of that kind was due at that time already.
    Unchanged(i64),
}

const COLUMNS: &str =
    "id, identity, kind, due_at, planned_at, resource, key, reason, attempts, last_error";

fn read_row(r: &Row<'_>) -> Result<(Timer, String), DbError> {
    let kind: String = r.get(2)?;
    Ok((
        Timer {
            id: r.get(0)?,
            identity: r.get(1)?,
            kind: TimerKind::Delete,
            due_at: r.get(3)?,
            planned_at: r.get(4)?,
            resource: r.get(5)?,
            key: r.get(6)?,
            reason: r.get(7)?,
            attempts: r.get(8)?,
            last_error: r.get(9)?,
        },
        kind,
    ))
}

/// Timers matching `tail` (a `WHERE … ORDER BY …` clause), kinds decoded.
fn select(conn: &Conn, tail: &str, args: &[Arg<'_>]) -> Result<Vec<Timer>, RepoError> {
    let rows = conn
        .query_map(
            &format!("SELECT {COLUMNS} FROM timers {tail}"),
            args,
            read_row,
        )
        .ctx("reading timers")?;
    rows.into_iter()
        .map(|(mut t, kind)| {
            t.kind = TimerKind::parse(&kind).ok_or_else(|| RepoError::Corrupt {
                what: format!("timer #{}", t.id),
                message: format!("unknown kind '{kind}'"),
            })?;
            Ok(t)
        })
        .collect()
}

/// `AND resource IN (…)` for `only` (none: every resource), with its arguments appended.
fn only_clause<'a>(only: Option<&'a [String]>, args: &mut Vec<Arg<'a>>) -> String {
    match only {
        None => String::new(),
        Some(names) => {
            let marks = vec!["?"; names.len()].join(", ");
            args.extend(names.iter().map(|n| n.to_arg()));
            format!(" AND resource IN ({marks})")
        }
    }
}

impl Repo {
    /// Plans a timer, or moves the identity's pending timer of that kind to the new time
    /// (and notes the account, reason and time of this planning). Call inside the
    /// transaction of the decision that plans it.
    pub fn plan_timer(&self, t: &NewTimer<'_>) -> Result<Planned, RepoError> {
        let what = || format!("{} timer of identity {}", t.kind, t.identity);
        let conn = self.lock()?;
        if let Some(k) = self.known()?.as_mut() {
            k.timer_planned(t.resource, t.key, t.identity);
        }
        let existing: Option<(i64, i64)> = conn
            .query_row(
                "SELECT id, due_at FROM timers WHERE identity = ?1 AND kind = ?2",
                args![t.identity, t.kind.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .with_ctx(|| format!("looking up the {}", what()))?;
        match existing {
            Some((id, due)) if due == t.due_at => Ok(Planned::Unchanged(id)),
            Some((id, due)) => {
                conn.execute(
                    "UPDATE timers SET due_at = ?2, planned_at = ?3, resource = ?4, key = ?5, \
                     reason = ?6, attempts = 0, last_error = NULL WHERE id = ?1",
                    args![id, t.due_at, t.planned_at, t.resource, t.key, t.reason],
                )
                .with_ctx(|| format!("moving the {}", what()))?;
                Ok(Planned::Moved { id, from: due })
            }
            None => {
                let id: i64 = conn
                    .insert_one_id(
                        "INSERT INTO timers (identity, kind, due_at, planned_at, resource, key, reason) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                        args![
                            t.identity,
                            t.kind.as_str(),
                            t.due_at,
                            t.planned_at,
                            t.resource,
                            t.key,
                            t.reason
                        ],
                    )
                    .with_ctx(|| format!("planning the {}", what()))?;
                Ok(Planned::New(id))
            }
        }
    }

    /// Removes the identity's pending timer of `kind` and returns it (a rehire cancels the
    /// grace-period delete; dates that no longer call for it cancel a date timer).
    pub fn cancel_timer(
        &self,
        identity: &str,
        kind: TimerKind,
    ) -> Result<Option<Timer>, RepoError> {
        let conn = self.lock()?;
        if self
            .known()?
            .as_ref()
            .is_some_and(|k| k.identity_without_timers(identity))
        {
            // Read ahead by a speculating batch (module `speculation`): nothing to cancel,
            // and no query that would wait for the writes sent ahead.
            return Ok(None);
        }
        let found = select(
            &conn,
            "WHERE identity = ?1 AND kind = ?2",
            args![identity, kind.as_str()],
        )?;
        let Some(t) = found.into_iter().next() else {
            return Ok(None);
        };
        remove(&conn, t.id)?;
        Ok(Some(t))
    }

    /// Removes every pending timer of the identity (it was deleted) and returns them.
    pub fn cancel_timers_of(&self, identity: &str) -> Result<Vec<Timer>, RepoError> {
        let conn = self.lock()?;
        let found = select(&conn, "WHERE identity = ?1 ORDER BY id", args![identity])?;
        conn.execute("DELETE FROM timers WHERE identity = ?1", args![identity])
            .with_ctx(|| format!("cancelling the timers of identity {identity}"))?;
        Ok(found)
    }

    /// The pending timers of an identity, by due time.
    pub fn timers_of_identity(&self, identity: &str) -> Result<Vec<Timer>, RepoError> {
        select(
            &*self.lock()?,
            "WHERE identity = ?1 ORDER BY due_at, id",
            args![identity],
        )
    }

    /// The pending timers an event of account `key` of `resource` planned, by due time.
    pub fn timers_of_account(&self, resource: &str, key: &str) -> Result<Vec<Timer>, RepoError> {
        let conn = self.lock()?;
        if self
            .known()?
            .as_ref()
            .is_some_and(|k| k.without_timers(resource, key))
        {
            // A speculating batch read which of its accounts have timers (module
            // `speculation`): no query, which would wait for the writes sent ahead.
            return Ok(Vec::new());
        }
        select(
            &conn,
            "WHERE resource = ?1 AND key = ?2 ORDER BY due_at, id",
            args![resource, key],
        )
    }

    /// Pending timers due at or before `until` (Unix ms), earliest first, at most `limit`;
    /// `only`: of these resources (none: of every resource).
    pub fn due_timers(
        &self,
        until: i64,
        limit: usize,
        only: Option<&[String]>,
    ) -> Result<Vec<Timer>, RepoError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut args: Vec<Arg<'_>> = vec![until.to_arg()];
        let clause = only_clause(only, &mut args);
        args.push(limit.to_arg());
        select(
            &*self.lock()?,
            &format!("WHERE due_at <= ?{clause} ORDER BY due_at, id LIMIT ?"),
            &args,
        )
    }

    /// When the next pending timer is due (Unix ms), `None` when none is pending; `only`:
    /// of these resources.
    pub fn next_timer_due(&self, only: Option<&[String]>) -> Result<Option<i64>, RepoError> {
        let mut args: Vec<Arg<'_>> = Vec::new();
        let clause = only_clause(only, &mut args);
        self.lock()?
            .query_one(
                &format!("SELECT min(due_at) FROM timers WHERE 1 = 1{clause}"),
                &args,
                |r| r.get(0),
            )
            .ctx("finding the next due timer")
    }

    /// How many timers of the resources in `only` (none: of every resource) are pending,
    /// and how many of them were due before `overdue_before` (Unix ms).
    pub fn timer_counts(
        &self,
        overdue_before: i64,
        only: Option<&[String]>,
    ) -> Result<(u64, u64), RepoError> {
        let mut args: Vec<Arg<'_>> = vec![overdue_before.to_arg()];
        let clause = only_clause(only, &mut args);
        let (pending, overdue): (i64, i64) = self
            .lock()?
            .query_one(
                &format!(
                    "SELECT count(*), COALESCE(SUM(CASE WHEN due_at < ? THEN 1 ELSE 0 END), 0) \
                     FROM timers WHERE 1 = 1{clause}"
                ),
                &args,
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ctx("counting timers")?;
        Ok((
            u64::try_from(pending).unwrap_or(0),
            u64::try_from(overdue).unwrap_or(0),
        ))
    }

    /// Removes timer `id` (it fired: call in the transaction recording its decision);
    /// false if it was not pending.
    pub fn remove_timer(&self, id: i64) -> Result<bool, RepoError> {
        remove(&*self.lock()?, id)
    }

    /// Moves timer `id` to `due_at`, keeping when it was planned (its firing found that the
    /// current config puts it later).
    pub fn move_timer(&self, id: i64, due_at: i64) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "UPDATE timers SET due_at = ?2 WHERE id = ?1",
                args![id, due_at],
            )
            .with_ctx(|| format!("moving timer #{id}"))?;
        Ok(())
    }

    /// Records a failed firing of timer `id`: one more attempt, the error, and the next
    /// attempt at `due_at`.
    pub fn postpone_timer(&self, id: i64, due_at: i64, error: &str) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "UPDATE timers SET due_at = ?2, attempts = attempts + 1, last_error = ?3 \
                 WHERE id = ?1",
                args![id, due_at, error],
            )
            .with_ctx(|| format!("putting off timer #{id}"))?;
        Ok(())
    }
}

fn remove(conn: &Conn, id: i64) -> Result<bool, RepoError> {
    let n = conn
        .execute("DELETE FROM timers WHERE id = ?1", args![id])
        .with_ctx(|| format!("removing timer #{id}"))?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer<'a>(
        identity: &'a str,
        kind: TimerKind,
        due_at: i64,
        resource: &'a str,
    ) -> NewTimer<'a> {
        NewTimer {
            identity,
            kind,
            due_at,
            resource,
            key: "k",
            reason: "why",
            planned_at: crate::now_ms(),
        }
    }

    /// Pending and overdue counts, of every resource or of some, on both databases (the
    /// statement mixes a bound time with the resources' list).
    #[test]
    fn timer_counts_tell_pending_and_overdue_timers_apart() {
        let pg = idsync_testkit::postgres::Postgres::start().expect("PostgreSQL");
        pg.create_database("idsync").expect("a database");
        let repos = [
            Repo::open_in_memory().expect("SQLite"),
            Repo::open_postgres(&pg.url("idsync"), &Default::default()).expect("PostgreSQL"),
        ];
        for repo in repos {
            repo.begin().expect("begin");
            for (who, due, resource) in [
                ("ann", 1_000, "hr"),
                ("bob", 9_000, "hr"),
                ("cy", 2_000, "dir"),
            ] {
                repo.plan_timer(&timer(who, TimerKind::Delete, due, resource))
                    .expect("planned");
            }
            repo.commit().expect("commit");
            assert_eq!(repo.timer_counts(5_000, None).expect("counts"), (3, 2));
            let hr = ["hr".to_owned()];
            assert_eq!(repo.timer_counts(5_000, Some(&hr)).expect("counts"), (2, 1));
            assert_eq!(repo.timer_counts(0, Some(&hr)).expect("counts"), (2, 0));
        }
    }

    #[test]
    fn one_pending_timer_per_identity_and_kind_moved_by_planning_again() {
        let repo = Repo::open_in_memory().expect("a repository");
        repo.begin().expect("begin");
        let Planned::New(id) = repo
            .plan_timer(&timer("ann", TimerKind::Delete, 5_000, "hr"))
            .expect("planned")
        else {
            panic!("a new timer");
        };
        assert_eq!(
            repo.plan_timer(&timer("ann", TimerKind::Delete, 5_000, "hr"))
                .expect("planned"),
            Planned::Unchanged(id)
        );
        assert_eq!(
            repo.plan_timer(&timer("ann", TimerKind::Delete, 7_000, "dir"))
                .expect("planned"),
            Planned::Moved { id, from: 5_000 }
        );
        repo.plan_timer(&timer("ann", TimerKind::Enable, 6_000, "hr"))
            .expect("planned");
        repo.plan_timer(&timer("bob", TimerKind::Disable, 1_000, "dir"))
            .expect("planned");
        repo.commit().expect("commit");
        assert_eq!(repo.timer_counts(0, None).expect("counts").0, 3);
        let ann = repo.timers_of_identity("ann").expect("ann's");
        assert_eq!(ann.len(), 2);
        assert_eq!(
            (ann[1].kind, ann[1].due_at, ann[1].resource.as_str()),
            (TimerKind::Delete, 7_000, "dir")
        );
        // Due ones earliest first, of some resources or all; the next due time.
        let due: Vec<i64> = repo
            .due_timers(6_500, 10, None)
            .expect("due")
            .iter()
            .map(|t| t.due_at)
            .collect();
        assert_eq!(due, [1_000, 6_000]);
        let hr = ["hr".to_owned()];
        let due = repo.due_timers(10_000, 10, Some(&hr)).expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(repo.next_timer_due(None).expect("next"), Some(1_000));
        assert_eq!(repo.next_timer_due(Some(&hr)).expect("next"), Some(6_000));
        // A failed firing puts it off; a cancel or a firing removes it.
        repo.postpone_timer(due[0].id, 60_000, "boom")
            .expect("postponed");
        let t = &repo.timers_of_identity("ann").expect("ann's")[1];
        assert_eq!(
            (t.kind, t.attempts, t.last_error.as_deref()),
            (TimerKind::Enable, 1, Some("boom"))
        );
        assert!(
            repo.cancel_timer("ann", TimerKind::Delete)
                .expect("cancel")
                .is_some()
        );
        assert!(
            repo.cancel_timer("ann", TimerKind::Delete)
                .expect("cancel")
                .is_none()
        );
        let bob = repo.timers_of_account("dir", "k").expect("bob's");
        assert!(repo.remove_timer(bob[0].id).expect("removed"));
        assert_eq!(repo.cancel_timers_of("ann").expect("ann's").len(), 1);
        assert_eq!(repo.timer_counts(0, None).expect("counts").0, 0);
        assert_eq!(repo.next_timer_due(None).expect("next"), None);
    }
}
