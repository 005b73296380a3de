//! Per-resource figures for `idsync status`: when the checkpoint last moved, how many events
//! were decided, how many wait as failed events; and whether the repository holds records
//! of a resource at all (one the config no longer has can still be named to read or
//! discard them).

use crate::error::{Context, RepoError};
use crate::{Repo, args};

/// What the repository knows of one resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResourceSummary {
    /// When the checkpoint was last committed (RFC 3339), if ever.
    pub checkpoint_at: Option<String>,
    /// Decision records (events processed).
    pub decisions: u64,
    /// Failed decision records.
    pub failed_decisions: u64,
    /// Failed events waiting for a retry.
    pub failed_pending: u64,
}

impl Repo {
    /// Whether the repository holds records of `resource`: accounts, decisions, failed
    /// events (pending or discarded) or work items.
    pub fn holds_records_of(&self, resource: &str) -> Result<bool, RepoError> {
        self.lock()?
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM shadows WHERE resource = ?1) \
                 OR EXISTS (SELECT 1 FROM decisions WHERE resource = ?1) \
                 OR EXISTS (SELECT 1 FROM failed_events WHERE resource = ?1) \
                 OR EXISTS (SELECT 1 FROM failed_discarded WHERE resource = ?1) \
                 OR EXISTS (SELECT 1 FROM work_items WHERE resource = ?1)",
                args![resource],
                |r| r.get(0),
            )
            .with_ctx(|| format!("looking for records of resource {resource}"))
    }

    /// The summary of `resource`.
    pub fn resource_summary(&self, resource: &str) -> Result<ResourceSummary, RepoError> {
        let conn = self.lock()?;
        let ctx = || format!("summarizing resource {resource}");
        let checkpoint_at: Option<String> = conn
            .query_row(
                "SELECT updated_at FROM checkpoints WHERE resource = ?1",
                args![resource],
                |r| r.get(0),
            )
            .with_ctx(ctx)?;
        let count = |sql: &str| -> Result<u64, RepoError> {
            conn.query_one(sql, args![resource], |r| r.get::<i64>(0))
                .map(|n| n.max(0) as u64)
                .with_ctx(ctx)
        };
        Ok(ResourceSummary {
            checkpoint_at,
            decisions: count("SELECT count(*) FROM decisions WHERE resource = ?1")?,
            failed_decisions: count(
                "SELECT count(*) FROM decisions WHERE resource = ?1 AND action = 'failed'",
            )?,
            failed_pending: count("SELECT count(*) FROM failed_events WHERE resource = ?1")?,
        })
    }
}
