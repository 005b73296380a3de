//! The record of reconciles: one row per reconcile run (`idsync reconcile`, or the agent at
//! a resource's `reconcile: { cron }` times), so that `idsync status` shows the last one
//! whichever process ran it. The decisions themselves are ordinary decision records (op
//! `reconcile`); this is only the run's summary.

use crate::error::{Context, RepoError};
use crate::{Repo, args, now};

/// How a reconcile run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileOutcome {
    /// Every part was committed.
    Complete,
    /// Stopped between committed parts (a stop request); begun again, it resumes.
    Stopped,
    /// A part could not be read or committed; what was committed stays.
    Failed,
}

impl ReconcileOutcome {
    /// The lowercase name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileOutcome::Complete => "complete",
            ReconcileOutcome::Stopped => "stopped",
            ReconcileOutcome::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<ReconcileOutcome> {
        [
            ReconcileOutcome::Complete,
            ReconcileOutcome::Stopped,
            ReconcileOutcome::Failed,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// One reconcile run of one resource.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileRun {
    /// The resource.
    pub resource: String,
    /// When it began (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339); set by [`Repo::record_reconcile`].
    pub ended_at: String,
    /// What started it: `command` (`idsync reconcile`) or `schedule` (the agent).
    pub started_by: String,
    /// How many account keys were asked for; `None`: every account.
    pub keys: Option<u64>,
    /// Events decided.
    pub events: u64,
    /// Events whose decision changed something.
    pub changed: u64,
    /// Events whose decision changed nothing.
    pub unchanged: u64,
    /// Events that failed.
    pub failed: u64,
    /// Input the adapter could not read.
    pub rejected: u64,
    /// How it ended.
    pub outcome: ReconcileOutcome,
    /// Why it failed.
    pub error: Option<String>,
}

impl Repo {
    /// Records a reconcile run that just ended (its `ended_at` is now), in a transaction of
    /// its own.
    pub fn record_reconcile(&self, run: &ReconcileRun) -> Result<(), RepoError> {
        self.begin()?;
        let result = (|| {
            self.lock()?
                .execute(
                    "INSERT INTO reconciles (resource, started_at, ended_at, started_by, \
                     key_count, events, changed, unchanged, failed, rejected, outcome, error) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    args![
                        run.resource,
                        run.started_at,
                        now(),
                        run.started_by,
                        run.keys.map(count),
                        count(run.events),
                        count(run.changed),
                        count(run.unchanged),
                        count(run.failed),
                        count(run.rejected),
                        run.outcome.as_str(),
                        run.error,
                    ],
                )
                .with_ctx(|| format!("recording the reconcile of {}", run.resource))?;
            Ok(())
        })();
        self.finish(result)
    }

    /// The last reconcile run of `resource`, if any.
    pub fn last_reconcile(&self, resource: &str) -> Result<Option<ReconcileRun>, RepoError> {
        let row = self
            .lock()?
            .query_row(
                "SELECT started_at, ended_at, started_by, key_count, events, changed, unchanged, \
                 failed, rejected, outcome, error FROM reconciles WHERE resource = ?1 \
                 ORDER BY id DESC LIMIT 1",
                args![resource],
                |r| {
                    Ok((
                        (
                            r.get::<String>(0)?,
                            r.get::<String>(1)?,
                            r.get::<String>(2)?,
                            r.get::<Option<i64>>(3)?,
                        ),
                        [
                            r.get::<i64>(4)?,
                            r.get::<i64>(5)?,
                            r.get::<i64>(6)?,
                            r.get::<i64>(7)?,
                            r.get::<i64>(8)?,
                        ],
                        r.get::<String>(9)?,
                        r.get::<Option<String>>(10)?,
                    ))
                },
            )
            .with_ctx(|| format!("reading the last reconcile of {resource}"))?;
        let Some(((started_at, ended_at, started_by, keys), n, outcome, error)) = row else {
            return Ok(None);
        };
        let outcome = ReconcileOutcome::parse(&outcome).ok_or_else(|| RepoError::Corrupt {
            what: format!("the last reconcile of {resource}"),
            message: format!("unknown outcome '{outcome}'"),
        })?;
        let n = n.map(|v| v.max(0) as u64);
        Ok(Some(ReconcileRun {
            resource: resource.to_owned(),
            started_at,
            ended_at,
            started_by,
            keys: keys.map(|k| k.max(0) as u64),
            events: n[0],
            changed: n[1],
            unchanged: n[2],
            failed: n[3],
            rejected: n[4],
            outcome,
            error,
        }))
    }
}

/// A count as the repository stores it.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
