//! The CSV flat-file adapter.
//!
//! Key design choice: a flat file has no change log, so the adapter diffs the whole file against
//! the **last committed snapshot** — the accounts the repository last saw on the resource
//! ([`KnownAccounts`]: key → content hash, and the attributes for "previous") — and never keeps
//! or advances a snapshot of its own. The checkpoint is only the xxh3 hash of the file's bytes
//! (`xxh3:<16 hex digits>`), committed by the engine with the batch; an unchanged file is
//! [`Fetch::Idle`]. If a batch is lost (crash, failed commit), the next fetch diffs against the
//! same committed state and produces the same events again: nothing is skipped and nothing is
//! applied twice.
//!
//! Bad input never blocks good rows: a malformed record becomes a [`Reject`] with its
//! `file:line`, and when its key can still be read that account is *held* (no update, no
//! delete) until the file is fixed. A key that appears on several lines is held the same way.
//! Problems with the file as a whole (missing key column, duplicate column name) are
//! [`AdapterError::Permanent`]; an unreadable or empty file is [`AdapterError::Transient`].
//!
//! The steps of [`FlatFileAdapter::next_batch`] — read the bytes, hash, parse, diff — are kept
//! apart so that settle detection (before reading), encodings (between reading and parsing)
//! and an accidental-delete guard (after the diff) can be added without reshaping them.

mod config;
mod diff;
mod rows;

use std::path::Path;

use idsync_core::{Adapter, AdapterError, Checkpoint, Fetch, KnownAccounts};
use xxhash_rust::xxh3::xxh3_64;

pub use config::FlatFileConfig;

use crate::diff::Target;
use crate::rows::Rows;

/// Reads one CSV file and reports what changed since the last committed snapshot.
#[derive(Clone, Debug)]
pub struct FlatFileAdapter {
    resource: String,
    config: FlatFileConfig,
}

impl FlatFileAdapter {
    /// An adapter for resource `resource`. The config should have passed
    /// [`FlatFileConfig::validate`]; if not, every fetch fails with a permanent error.
    pub fn new(resource: &str, config: FlatFileConfig) -> Self {
        FlatFileAdapter {
            resource: resource.to_owned(),
            config,
        }
    }

    /// The adapter's config.
    pub fn config(&self) -> &FlatFileConfig {
        &self.config
    }

    fn permanent(&self, message: String) -> AdapterError {
        AdapterError::Permanent {
            resource: self.resource.clone(),
            message,
        }
    }

    fn transient(&self, message: String) -> AdapterError {
        AdapterError::Transient {
            resource: self.resource.clone(),
            message,
        }
    }
}

/// The checkpoint token of a file's content.
fn content_token(bytes: &[u8]) -> String {
    format!("xxh3:{:016x}", xxh3_64(bytes))
}

/// The file name shown in origins (`hr.csv`), or the whole path if it has none.
fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

impl Adapter for FlatFileAdapter {
    fn resource(&self) -> &str {
        &self.resource
    }

    fn next_batch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError> {
        let problems = self.config.validate();
        if !problems.is_empty() {
            return Err(self.permanent(format!("invalid config: {}", problems.join("; "))));
        }
        let path = &self.config.path;
        let shown_path = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| self.transient(format!("cannot read {shown_path}: {e}")))?;

        let token = content_token(&bytes);
        if after.is_some_and(|c| c.0 == token) {
            return Ok(Fetch::Idle);
        }

        let mut rows = Rows::open(&bytes, &self.config, &self.resource, &shown_path)?;
        let target = Target {
            resource: &self.resource,
            file_name: &file_name(path),
            shown_path: &shown_path,
            fresh: after.is_none(),
        };
        let mut batch = diff::diff(&target, &mut rows, known)?;
        batch.checkpoint = Some(Checkpoint(token));
        Ok(Fetch::Batch(batch))
    }
}

#[cfg(test)]
mod tests;
