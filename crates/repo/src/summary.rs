//! Per-resource figures for `idsync status`: when the checkpoint last moved, how many events
//! were decided, how many wait as failed events.

use rusqlite::{OptionalExtension, params};

use crate::Repo;
use crate::error::{Context, RepoError};

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
    /// The summary of `resource`.
    pub fn resource_summary(&self, resource: &str) -> Result<ResourceSummary, RepoError> {
        let guard = self.lock()?;
        let conn = crate::sqlite_only(&guard, "this")?;
        let ctx = || format!("summarizing resource {resource}");
        let checkpoint_at: Option<String> = conn
            .query_row(
                "SELECT updated_at FROM checkpoints WHERE resource = ?1",
                params![resource],
                |r| r.get(0),
            )
            .optional()
            .with_ctx(ctx)?;
        let count = |sql: &str| -> Result<u64, RepoError> {
            conn.query_row(sql, params![resource], |r| r.get::<_, i64>(0))
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
