//! The SQLite schema and its migrations, versioned with `PRAGMA user_version`.
//!
//! `MIGRATIONS[i]` takes a file from version `i` to `i + 1`. Each runs in its own
//! transaction together with the version bump, so a crash mid-upgrade leaves the old
//! version intact. Never edit a released migration: append a new one, and bring
//! PostgreSQL's schema (`postgres::SCHEMA`, with a PostgreSQL migration once databases of
//! the older version exist) and the copy's table list (`copy::TABLES`) along: a unit test
//! compares all three.
//!
//! A repository also carries `PRAGMA application_id` = [`APPLICATION_ID`] from its first
//! migration on (files created before that carry 0 and are known by their version). A file
//! with another application id, or with tables but no idsync schema version, is refused:
//! migrating it would mix idsync's tables into another application's database.

use rusqlite::Connection;

use crate::error::{Context, RepoError};

/// Migrations in order; the schema version is their count.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r#"
    CREATE TABLE identities (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        version     INTEGER NOT NULL,
        disabled    INTEGER NOT NULL DEFAULT 0,
        attrs       TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );

    -- Text values of identity attributes, for correlation queries. attr is lowercased;
    -- values are exact. The primary key is the (attr, value) index and deduplicates.
    CREATE TABLE identity_values (
        attr         TEXT NOT NULL,
        value        TEXT NOT NULL,
        identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        PRIMARY KEY (attr, value, identity_id)
    ) WITHOUT ROWID;
    CREATE INDEX identity_values_identity ON identity_values(identity_id);

    CREATE TABLE links (
        resource     TEXT NOT NULL,
        key          TEXT NOT NULL,
        identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        linked_at    TEXT NOT NULL,
        PRIMARY KEY (resource, key)
    );
    CREATE INDEX links_identity ON links(identity_id);

    -- The last seen attributes of every account of every resource. hash is
    -- AttrMap::content_hash() stored as the i64 with the same bits.
    CREATE TABLE shadows (
        resource  TEXT NOT NULL,
        key       TEXT NOT NULL,
        hash      INTEGER NOT NULL,
        attrs     TEXT NOT NULL,
        PRIMARY KEY (resource, key)
    ) WITHOUT ROWID;

    CREATE TABLE checkpoints (
        resource    TEXT PRIMARY KEY,
        token       TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );

    CREATE TABLE decisions (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         TEXT NOT NULL,
        resource   TEXT NOT NULL,
        key        TEXT NOT NULL,
        op         TEXT NOT NULL,
        situation  TEXT,
        action     TEXT NOT NULL,
        identity   TEXT,
        record     TEXT NOT NULL
    );
    CREATE INDEX decisions_account ON decisions(resource, key);
    CREATE INDEX decisions_situation ON decisions(situation);
    CREATE INDEX decisions_identity ON decisions(identity);
    CREATE INDEX decisions_action ON decisions(action);

    CREATE TABLE failed_events (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        at               TEXT NOT NULL,
        resource         TEXT NOT NULL,
        key              TEXT,
        origin           TEXT,
        error            TEXT NOT NULL,
        event            TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        last_attempt_at  TEXT,
        decision_id      INTEGER
    );
    CREATE INDEX failed_events_account ON failed_events(resource, key);
    "#,
    // 2: the notification outbox (written in the batch transaction, drained by the
    // dispatcher). Times are Unix milliseconds so due rows can be found by index.
    r#"
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at       INTEGER NOT NULL,
        policy           TEXT NOT NULL,
        identity         TEXT,
        resource         TEXT,
        key              TEXT,
        status           TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL,
        claimed_until    INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        sent_at          INTEGER,
        message          TEXT NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_identity ON outbox(identity, status);
    "#,
    // 3: fewer index writes per event. identity_values holds only the attributes that
    // correlation queries have asked for (listed in indexed_attributes, built on first
    // use inside a transaction), without the per-identity secondary index or the foreign
    // key: deletes and re-indexing remove exactly the rows they know from the attributes.
    // Decisions keep the indexes `explain` and `status` use; failed ones get a partial
    // index. A covering index lets a diffing adapter read key -> hash without the JSON.
    r#"
    DROP TABLE identity_values;
    CREATE TABLE identity_values (
        attr         TEXT NOT NULL,
        value        TEXT NOT NULL,
        identity_id  INTEGER NOT NULL,
        PRIMARY KEY (attr, value, identity_id)
    ) WITHOUT ROWID;
    CREATE TABLE indexed_attributes (
        attr      TEXT PRIMARY KEY,
        built_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    DROP INDEX decisions_situation;
    DROP INDEX decisions_action;
    CREATE INDEX decisions_failed ON decisions(resource) WHERE action = 'failed';
    CREATE INDEX shadows_hash ON shadows(resource, key, hash);
    "#,
    // 4: links keyed by (resource, key) without a rowid: the owner lookup is one b-tree
    // descent instead of two, the identity index covers the account list, and a new link
    // writes two b-trees instead of three.
    r#"
    CREATE TABLE links_v4 (
        resource     TEXT NOT NULL,
        key          TEXT NOT NULL,
        identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        linked_at    TEXT NOT NULL,
        PRIMARY KEY (resource, key)
    ) WITHOUT ROWID;
    INSERT INTO links_v4 (resource, key, identity_id, linked_at)
        SELECT resource, key, identity_id, linked_at FROM links;
    DROP TABLE links;
    ALTER TABLE links_v4 RENAME TO links;
    CREATE INDEX links_identity ON links(identity_id);
    "#,
    // 5: failed events an operator discarded, kept as a record of who gave up on what.
    r#"
    CREATE TABLE failed_discarded (
        id             INTEGER PRIMARY KEY,
        at             TEXT NOT NULL,
        resource       TEXT NOT NULL,
        key            TEXT,
        origin         TEXT,
        error          TEXT NOT NULL,
        event          TEXT,
        discarded_at   TEXT NOT NULL,
        reason         TEXT NOT NULL
    );
    "#,
    // 6: reconcile runs (`idsync reconcile`, scheduled reconciles), for `idsync status`.
    r#"
    CREATE TABLE IF NOT EXISTS reconciles (
        id          INTEGER PRIMARY KEY,
        resource    TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT NOT NULL,
        started_by  TEXT NOT NULL,
        key_count   INTEGER,
        events      INTEGER NOT NULL,
        changed     INTEGER NOT NULL,
        unchanged   INTEGER NOT NULL,
        failed      INTEGER NOT NULL,
        rejected    INTEGER NOT NULL,
        outcome     TEXT NOT NULL,
        error       TEXT
    );
    CREATE INDEX IF NOT EXISTS reconciles_resource ON reconciles(resource, id);
    "#,
    // 7: erasure requests carried out (`identities erase`): when, the operator's reference and
    // how many rows of each kind went, never whose (module `erasure`).
    r#"
    CREATE TABLE IF NOT EXISTS erasures (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         TEXT NOT NULL,
        reference  TEXT,
        removed    TEXT NOT NULL
    );
    "#,
    // 8: the last pass of each resource by `run --once` (the agent reports its own in the
    // status file): when it last passed, when it last failed and why (module `passes`).
    r#"
    CREATE TABLE IF NOT EXISTS last_passes (
        resource   TEXT PRIMARY KEY,
        passed_at  TEXT,
        failed_at  TEXT,
        error      TEXT
    ) WITHOUT ROWID;
    "#,
    // 9: work items: what the engine or a rule left to an operator (a disputed or unmatched
    // account, `ctx.work_item`), open until an operator links, creates or ignores. Written
    // in the batch transaction with the decision that raised them. At most one open item
    // per account and kind (for rule items: per message), enforced by the partial index.
    r#"
    CREATE TABLE IF NOT EXISTS work_items (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at         TEXT NOT NULL,
        resource           TEXT NOT NULL,
        key                TEXT NOT NULL,
        kind               TEXT NOT NULL,
        reason             TEXT NOT NULL,
        candidates         TEXT NOT NULL,
        decision_id        INTEGER,
        seen               INTEGER NOT NULL DEFAULT 1,
        last_seen_at       TEXT NOT NULL,
        last_decision_id   INTEGER,
        state              TEXT NOT NULL,
        closed_at          TEXT,
        resolution         TEXT,
        resolved_identity  TEXT,
        closed_by_decision INTEGER,
        closed_reason      TEXT
    );
    CREATE UNIQUE INDEX IF NOT EXISTS work_items_one_open ON work_items
        (resource, key, kind, CASE WHEN kind = 'rule' THEN reason ELSE '' END)
        WHERE state = 'open';
    CREATE INDEX IF NOT EXISTS work_items_account ON work_items(resource, key);
    CREATE INDEX IF NOT EXISTS work_items_state ON work_items(state, id);
    "#,
    // 10: lifecycle timers: a grace-period delete, a valid_from / valid_to date, planned in the
    // transaction of the decision that planned them and removed in that of the decision
    // that fired or cancelled them (module `timers`). At most one pending timer per
    // identity and kind; due times in Unix ms, indexed for the agent's next wake-up.
    r#"
    CREATE TABLE IF NOT EXISTS timers (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        identity    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        due_at      INTEGER NOT NULL,
        planned_at  INTEGER NOT NULL,
        resource    TEXT NOT NULL,
        key         TEXT NOT NULL,
        reason      TEXT NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT
    );
    CREATE UNIQUE INDEX IF NOT EXISTS timers_one_per_kind ON timers(identity, kind);
    CREATE INDEX IF NOT EXISTS timers_due ON timers(due_at);
    CREATE INDEX IF NOT EXISTS timers_account ON timers(resource, key);
    "#,
    // 11: the normalisation each attribute's correlation index was built with (module
    // `index`): step names joined by commas, e.g. 'case,spaces'. An attribute listed in
    // indexed_attributes without a row here holds exact values, as every index did before.
    r#"
    CREATE TABLE IF NOT EXISTS index_normalisations (
        attr   TEXT PRIMARY KEY,
        steps  TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 12: attribute authority: for each attribute `authority:` governs, which linked account
    // gave the identity its current value (module `sources`). Written in the batch
    // transaction with the checkin; removed with the identity (foreign key). attr is
    // lowercased.
    r#"
    CREATE TABLE IF NOT EXISTS attribute_sources (
        identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        attr         TEXT NOT NULL,
        resource     TEXT NOT NULL,
        key          TEXT NOT NULL,
        given_at     TEXT NOT NULL,
        PRIMARY KEY (identity_id, attr)
    ) WITHOUT ROWID;
    "#,
    // 13: correlation exclusions: accounts an operator unlinked from an identity, which
    // correlation must not link to it again (module `exclusions`). Removed with the
    // identity (foreign key).
    r#"
    CREATE TABLE IF NOT EXISTS correlation_exclusions (
        resource     TEXT NOT NULL,
        key          TEXT NOT NULL,
        identity_id  INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        excluded_at  TEXT NOT NULL,
        PRIMARY KEY (resource, key, identity_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS correlation_exclusions_identity
        ON correlation_exclusions(identity_id);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA application_id` of an idsync repository: "idsy" in ASCII.
pub const APPLICATION_ID: i32 = 0x6964_7379;

/// Refuses a database that is not an idsync repository (module doc). `version` is its
/// `user_version`.
fn recognise(conn: &Connection, version: i64) -> Result<(), RepoError> {
    let id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .ctx("reading the application id")?;
    if id != 0 && id != APPLICATION_ID {
        return Err(RepoError::NotARepository {
            reason: format!("the database belongs to another application (application_id {id:#x})"),
        });
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .ctx("reading the schema")?;
        if tables > 0 {
            return Err(RepoError::NotARepository {
                reason: format!(
                    "the database holds {tables} schema objects of another application"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a database that is not an idsync repository, before anything is written to it.
pub(crate) fn check_is_repository(conn: &Connection) -> Result<(), RepoError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .ctx("reading the schema version")?;
    recognise(conn, version)
}

/// Brings the schema of `conn` up to [`SCHEMA_VERSION`].
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), RepoError> {
    // Up to date (the usual case): no write lock, so commands can open the repository
    // while an agent holds a batch transaction.
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .ctx("reading the schema version")?;
    recognise(conn, current)?;
    if current == SCHEMA_VERSION {
        return Ok(());
    }
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .ctx("starting the schema upgrade")?;
        // Read inside the write transaction: two processes opening a new file at once
        // must not both apply the same migration.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("reading the schema version")?;
        recognise(&tx, version)?;
        if version > SCHEMA_VERSION {
            return Err(RepoError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let index = usize::try_from(version).map_err(|_| RepoError::Corrupt {
            what: "schema version".to_owned(),
            message: format!("negative user_version {version}"),
        })?;
        let Some(sql) = MIGRATIONS.get(index) else {
            return Ok(());
        };
        tx.execute_batch(sql)
            .with_ctx(|| format!("upgrading the schema to version {}", version + 1))?;
        tx.pragma_update(None, "user_version", version + 1)
            .ctx("storing the schema version")?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .ctx("storing the application id")?;
        tx.commit().ctx("committing the schema upgrade")?;
    }
}
