//! The last pass of each resource by `idsync run --once`, kept in the repository so that
//! `idsync status` shows it after the process has gone (the running agent reports its own
//! passes in its status file): when the resource last passed, and when and why its last
//! pass failed, if the last one did.

use serde::Serialize;

use crate::error::{Context, RepoError};
use crate::{Repo, args, now};

/// What `run --once` recorded of a resource's passes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LastPass {
    /// When a pass last ended without error (RFC 3339).
    pub passed_at: Option<String>,
    /// When a pass last failed.
    pub failed_at: Option<String>,
    /// Why the last pass failed; `None` when the last pass worked.
    pub error: Option<String>,
}

impl Repo {
    /// Records that a pass of `resource` ended: without error (`error` = `None`) or with
    /// `error`. Its own small transaction.
    pub fn record_pass(&self, resource: &str, error: Option<&str>) -> Result<(), RepoError> {
        let sql = match error {
            None => {
                "INSERT INTO last_passes (resource, passed_at) VALUES (?1, ?2) \
                 ON CONFLICT (resource) DO UPDATE SET passed_at = excluded.passed_at, error = NULL"
            }
            Some(_) => {
                "INSERT INTO last_passes (resource, failed_at, error) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (resource) DO UPDATE SET failed_at = excluded.failed_at, \
                 error = excluded.error"
            }
        };
        let conn = self.lock()?;
        let done = match error {
            None => conn.execute(sql, args![resource, now()]),
            Some(e) => conn.execute(sql, args![resource, now(), e]),
        };
        done.with_ctx(|| format!("recording the pass of resource {resource}"))?;
        Ok(())
    }

    /// What `run --once` last recorded of `resource`'s passes.
    pub fn last_pass(&self, resource: &str) -> Result<Option<LastPass>, RepoError> {
        self.lock()?
            .query_row(
                "SELECT passed_at, failed_at, error FROM last_passes WHERE resource = ?1",
                args![resource],
                |r| {
                    Ok(LastPass {
                        passed_at: r.get(0)?,
                        failed_at: r.get(1)?,
                        error: r.get(2)?,
                    })
                },
            )
            .with_ctx(|| format!("reading the last pass of resource {resource}"))
    }
}
