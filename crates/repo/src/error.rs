//! The repository's error type.
//!
//! Messages are written for the people running idsync: they name the identity, the resource
//! or the row concerned and say what was expected, so the CLI can print them as they are.

use std::time::Duration;

use idsync_core::Checkpoint;

use crate::db::DbError;

/// Everything that can go wrong in the repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The database (SQLite or PostgreSQL) reported an error while doing `context`.
    #[error("repository: {context}: {source}")]
    Database {
        /// What the repository was doing, e.g. `storing shadow hr/42`.
        context: String,
        /// The driver's error.
        #[source]
        source: DbError,
    },
    /// The stored checkpoint is not the one the batch was read after: another agent (or a
    /// second run) committed this resource meanwhile. The whole batch was rolled back.
    #[error(
        "resource {resource}: the checkpoint was moved by someone else (expected {}, found {}); \
         the batch was rolled back and will be read again",
        show_checkpoint(.expected),
        show_checkpoint(.found)
    )]
    CheckpointConflict {
        /// Resource name.
        resource: String,
        /// The checkpoint the batch was read after.
        expected: Option<Checkpoint>,
        /// The checkpoint found in the repository.
        found: Option<Checkpoint>,
    },
    /// This agent's lease of the resource expired or passed to another agent before the
    /// batch could commit: the batch was rolled back (its successor reads it again).
    #[error(
        "resource {resource}: this agent no longer holds its lease (token {token}); the batch \
         was rolled back and is left to the agent that holds it"
    )]
    LeaseLost {
        /// Resource name.
        resource: String,
        /// The fencing token the batch was read under.
        token: i64,
    },
    /// A migration's target already holds data.
    #[error("the target repository is not empty: table {table} has {rows} rows")]
    NotEmpty {
        /// A table that holds rows.
        table: String,
        /// How many.
        rows: u64,
    },
    /// Checkin with a stale version.
    #[error(
        "identity {name} was changed by someone else (expected version {expected}, found {found})"
    )]
    VersionConflict {
        /// Identity name.
        name: String,
        /// The version the caller checked out.
        expected: i64,
        /// The version in the repository.
        found: i64,
    },
    /// An identity with this name exists already.
    #[error("identity {name} already exists")]
    NameTaken {
        /// Identity name.
        name: String,
    },
    /// No identity has this name.
    #[error("identity {name} does not exist")]
    NoSuchIdentity {
        /// Identity name.
        name: String,
    },
    /// The account is linked to another identity.
    #[error("account {key} on resource {resource} is already linked to identity {owner}")]
    AlreadyLinked {
        /// Resource name.
        resource: String,
        /// Account key.
        key: String,
        /// The identity that owns it.
        owner: String,
    },
    /// No failed event has this id.
    #[error("failed event {id} does not exist")]
    NoSuchFailure {
        /// Failed-event id.
        id: i64,
    },
    /// A stored row could not be read back (bad JSON).
    #[error("repository data is damaged: {what}: {message}")]
    Corrupt {
        /// Which row, e.g. `identity jdoe`.
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value could not be encoded for storage.
    #[error("cannot store {what}: {message}")]
    Encode {
        /// What was being stored.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// A correlation query with no condition would match every identity.
    #[error("an identity query needs at least one attribute condition")]
    EmptyQuery,
    /// Only text values are indexed.
    #[error("attribute {attr}: identities can only be searched by text values, not binary ones")]
    BinaryCondition {
        /// Attribute name.
        attr: String,
    },
    /// An identity name must not be empty.
    #[error("an identity name must not be empty")]
    EmptyName,
    /// A transaction operation was called with no transaction open.
    #[error("repository: {op} called outside a transaction (call begin first)")]
    NoTransaction {
        /// The operation, e.g. `savepoint`.
        op: &'static str,
    },
    /// Another batch kept its transaction open longer than the caller was willing to wait.
    #[error(
        "repository busy: another batch kept its transaction open for more than {}s",
        .waited.as_secs()
    )]
    Busy {
        /// How long `begin` waited.
        waited: Duration,
    },
    /// The file was written by a newer idsync.
    #[error(
        "repository schema version {found} is newer than this idsync supports ({supported}); \
         upgrade idsync"
    )]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The file at the repository path is not an idsync repository (an empty file left by a
    /// failed restore, another application's database): using it would create every
    /// identity again.
    #[error(
        "not an idsync repository: {reason}; idsync leaves it untouched (restore the right \
         file, or move this one away to start a new repository)"
    )]
    NotARepository {
        /// What was found instead.
        reason: String,
    },
    /// The repository file could not be created, opened or inspected.
    #[error("repository: {context}: {source}")]
    File {
        /// What the repository was doing, e.g. `creating /var/lib/idsync/idsync.db`.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A thread panicked while holding the repository lock.
    #[error("repository unusable: a thread panicked while using it; restart idsync")]
    Poisoned,
}

impl RepoError {
    /// Whether the operation may succeed if the caller reads again and retries (a conflict
    /// with a concurrent writer, or a busy database).
    pub fn is_conflict(&self) -> bool {
        match self {
            RepoError::CheckpointConflict { .. }
            | RepoError::VersionConflict { .. }
            | RepoError::Busy { .. } => true,
            RepoError::Database {
                source: DbError::Sqlite(e),
                ..
            } => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            // Serialization failure, deadlock, lock not available.
            RepoError::Database { source, .. } => {
                matches!(source.sqlstate(), Some("40001" | "40P01" | "55P03"))
            }
            _ => false,
        }
    }
}

impl RepoError {
    /// Whether a write sent ahead while the batch speculated did not go as predicted
    /// (module `speculation`): roll the batch back and decide it again without
    /// speculating.
    pub fn is_mispredicted(&self) -> bool {
        matches!(
            self,
            RepoError::Database {
                source: DbError::Mispredicted(_),
                ..
            }
        )
    }

    /// Whether the repository's storage failed (disk full, an I/O error, a file that turned
    /// read-only or cannot be opened): trying again at once will fail again, so the caller
    /// backs off until the operator has fixed it.
    pub fn is_storage_failure(&self) -> bool {
        match self {
            RepoError::File { .. } => true,
            RepoError::Database {
                source: DbError::Sqlite(e),
                ..
            } => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::ReadOnly
                        | rusqlite::ErrorCode::CannotOpen
                )
            ),
            // The server is unreachable or went away (no SQLSTATE: the connection failed),
            // a connection exception (08…), insufficient resources (53…: disk full, out of
            // memory, too many connections), the server shutting down (57P…), a read-only
            // server (25006: a standby after a fail-over).
            RepoError::Database {
                source: DbError::Postgres(e),
                ..
            } => match e.code().map(|c| c.code()) {
                None => e.is_closed() || e.as_db_error().is_none(),
                Some(code) => {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                        || code == "25006"
                }
            },
            _ => false,
        }
    }
}

fn show_checkpoint(c: &Option<Checkpoint>) -> String {
    match c {
        Some(c) => format!("{:?}", c.0),
        None => "none".to_owned(),
    }
}

/// Attaches a context to database errors.
pub(crate) trait Context<T> {
    /// With a fixed context.
    fn ctx(self, context: &str) -> Result<T, RepoError>;
    /// With a context built only on error.
    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, RepoError>;
}

impl<T, E: Into<DbError>> Context<T> for Result<T, E> {
    fn ctx(self, context: &str) -> Result<T, RepoError> {
        self.map_err(|source| RepoError::Database {
            context: context.to_owned(),
            source: source.into(),
        })
    }

    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, RepoError> {
        self.map_err(|source| RepoError::Database {
            context: context(),
            source: source.into(),
        })
    }
}

/// Encodes `v` as JSON for a column.
pub(crate) fn to_json<T: serde::Serialize>(
    v: &T,
    what: impl FnOnce() -> String,
) -> Result<String, RepoError> {
    serde_json::to_string(v).map_err(|e| RepoError::Encode {
        what: what(),
        message: e.to_string(),
    })
}

/// Decodes a JSON column.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    text: &str,
    what: impl FnOnce() -> String,
) -> Result<T, RepoError> {
    serde_json::from_str(text).map_err(|e| RepoError::Corrupt {
        what: what(),
        message: e.to_string(),
    })
}
