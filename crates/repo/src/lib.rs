//! idsync's identity repository: identities and their attributes, account links, account
//! shadows, resource checkpoints, decision records, failed events, work items and lifecycle
//! timers, in one SQLite file.
//!
//! # Key design choice: one connection, transactions bracketed by the caller
//!
//! A [`Repo`] owns a single SQLite connection behind a mutex, and every method takes
//! `&self`, so the engine can share it as `Arc<Repo>`. Instead of handing out a
//! transaction object (which would borrow the connection), the caller brackets a batch with
//! plain calls: [`Repo::begin`] (`BEGIN IMMEDIATE`), then per event [`Repo::savepoint`] and
//! [`Repo::release`] or [`Repo::rollback_savepoint`], and finally [`Repo::commit_batch`],
//! which stores the resource's new checkpoint as a compare-and-swap against the checkpoint
//! the batch was read after, in the same transaction as the batch's effects. A crash at any
//! point therefore leaves all of a batch or none of it (docs/design.md, "Durability").
//!
//! Because the connection is shared, an open batch transaction belongs to the whole `Repo`:
//! [`Repo::begin`] waits (up to [`Repo::with_batch_wait`], two minutes by default) until the
//! batch in progress commits or rolls back, so resource loops sharing one `Repo` take turns
//! just as separate connections would. Calls from other threads while a batch is open see
//! (and would join) that batch: everything that writes must go through `begin`/`commit`.
//!
//! Other choices:
//! - Identity attributes are stored as the JSON of an [`AttrMap`](idsync_core::AttrMap). The
//!   text values of the attributes correlation queries use are also kept in
//!   `identity_values(attr lowercased, value, identity_id)`, whose primary key answers
//!   [`Repo::find`] without scanning identities. An attribute is indexed the first time a
//!   query inside a transaction asks for it (listed in `indexed_attributes` from then on),
//!   so identities with fifty attributes cost index writes only for the two or three that
//!   correlation uses. Values are kept in the normalised form declared for their attribute
//!   (case, spaces, diacritics), and the index rebuilt when that declaration changes
//!   (module `index`).
//! - Shadows (the last seen attributes of each account) store the JSON and
//!   [`content_hash`](idsync_core::AttrMap::content_hash); a covering index on
//!   (resource, key, hash) lets diffing adapters read a million hashes without the JSON.
//! - Notification messages wait in the `outbox` table (module `outbox`): inserted in the
//!   batch transaction, claimed with a lease, marked sent in the transaction that records
//!   delivery.
//! - For the attributes `authority:` governs, `attribute_sources` remembers which linked
//!   account gave each current value (module `sources`), so that an account unlinked or
//!   deleted takes its values with it.
//! - Old records are purged a chunk per transaction, keeping what open items need (module
//!   `retention`, its `KEEP` list); a deleted identity's traces are erased on request
//!   (module `erasure`).
//! - The file runs in WAL mode with `synchronous=FULL`: a committed batch survives a power
//!   loss. The schema is versioned with `PRAGMA user_version` (see the `schema` module).

mod busy;
mod checkpointer;
mod copy;
pub(crate) mod db;
mod erasure;
mod error;
mod exclusions;
mod file;
mod identities;
mod index;
mod leases;
mod merge;
mod outbox;
mod passes;
mod postgres;
mod reconciles;
mod records;
mod retention;
mod schema;
mod shadows;
mod sources;
mod speculation;
mod summary;
#[cfg(test)]
mod tests;
mod timers;
mod warm;
mod work_items;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::Connection;

pub use busy::wait_for_other_writers;
pub use checkpointer::WAL_SAFETY_NET_PAGES;
pub use copy::CopiedTable;
pub use erasure::{ERASED, Erasure, ErasureRecord, ErasureReport};
pub use error::RepoError;
pub use exclusions::Exclusion;
pub use index::{Block, BlockQuery};
pub use leases::{Fence, LeaseRow, Leases};
pub use outbox::{
    NewOutboxMessage, OutboxFilter, OutboxMessage, OutboxOutcome, OutboxStatus, RenderedMail,
    now_ms,
};
pub use passes::LastPass;
pub use postgres::{PgOptions, redact_url};
pub use reconciles::{ReconcileOutcome, ReconcileRun};
pub use records::{DecisionFilter, DiscardedFailure, FailedEvent, NewFailure, StoredDecision};
pub use retention::{KEEP, Keep, PURGE_CHUNK, PurgeReport};
pub use schema::SCHEMA_VERSION;
pub use sources::AttributeSource;
pub use summary::ResourceSummary;
pub use timers::{NewTimer, Planned, Timer, TimerKind};
pub use work_items::{
    Closure, NewClosure, NewWorkItem, Raised, Resolution, WorkItem, WorkItemFilter, WorkItemKind,
    WorkItemState,
};

use error::Context;

/// How long SQLite waits for a lock held by another connection (another process), unless
/// the process chose to wait longer ([`wait_for_other_writers`]).
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Default for how long [`Repo::begin`] waits for another batch of the same `Repo`.
const DEFAULT_BATCH_WAIT: Duration = Duration::from_secs(120);

/// Name of the per-event savepoint.
const EVENT_SAVEPOINT: &str = "event";

/// The identity repository. `Send + Sync`; share it as `Arc<Repo>`.
pub struct Repo {
    conn: Mutex<db::Conn>,
    /// The indexed attributes as read inside the open transaction (see
    /// [`Repo::indexed`]); cleared whenever a transaction or savepoint ends.
    indexed: Mutex<Option<Arc<Vec<index::Indexed>>>>,
    /// How each identity attribute compares in correlation queries, as the config declares
    /// ([`Repo::declare_normalisations`]; module `index`).
    declared: Mutex<Arc<idsync_core::Normalisations>>,
    /// Signalled whenever a transaction ends, for [`Repo::begin`] waiting its turn.
    idle: Condvar,
    batch_wait: Duration,
    /// Checkpoints the WAL after each commit on a thread of its own (files only).
    checkpointer: Option<checkpointer::Checkpointer>,
    /// Reads the file ahead before passes that visit many accounts (files only). It holds
    /// the process's descriptor of the file, which must close after every connection:
    /// keep this field last (module `file`).
    warmer: Option<warm::Warmer>,
    /// How to connect again to a PostgreSQL repository whose connection was closed.
    reconnect: Option<(String, PgOptions)>,
    /// The leases this agent's batches commit under, by resource (module `leases`).
    fences: Mutex<std::collections::HashMap<String, Fence>>,
    /// What a speculating batch knows (module `speculation`); `None` otherwise.
    known: Mutex<Option<speculation::Known>>,
    /// Whether any correlation exclusion exists, as read inside the open transaction
    /// (module `exclusions`); forgotten whenever a transaction or savepoint ends.
    any_exclusion: Mutex<Option<bool>>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("batch_wait", &self.batch_wait)
            .finish_non_exhaustive()
    }
}

impl Repo {
    /// Opens (creating if needed) the repository file at `path` and brings its schema up to
    /// date. WAL journal, `synchronous=FULL`, foreign keys on, 5 s busy timeout. A new file
    /// is created owner-only; a file that is not an idsync repository (empty, a folder,
    /// another application's database) is refused with [`RepoError::NotARepository`]
    /// (module `file`).
    pub fn open(path: &Path) -> Result<Repo, RepoError> {
        if let file::Found::Nothing = file::inspect(path)? {
            file::create(path, |temp| {
                let conn = Connection::open(temp)
                    .with_ctx(|| format!("creating repository file {}", temp.display()))?;
                Self::setup(conn, true).map(drop)
            })?;
        }
        // Held before the connection opens, dropped after it closes (module `file`).
        let held = file::hold(path)?;
        let conn = Connection::open(path)
            .with_ctx(|| format!("opening repository file {}", path.display()))?;
        let mut repo = Self::setup(conn, true)?;
        repo.warmer = Some(warm::Warmer::new(path, held));
        let wal = match repo.lock()?.sqlite() {
            Some(conn) => conn
                .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
                .ctx("reading the journal mode")?
                .eq_ignore_ascii_case("wal"),
            None => false,
        };
        if wal {
            match checkpointer::Checkpointer::start(path) {
                Ok(c) => {
                    if let db::Conn::Sqlite(conn) = &mut *repo.lock()? {
                        c.hook(conn)?;
                    }
                    repo.checkpointer = Some(c);
                }
                Err(e) => tracing::warn!(
                    "repository {}: checkpoints stay in the committing call: {e}",
                    path.display()
                ),
            }
        }
        Ok(repo)
    }

    /// Opens the repository in the PostgreSQL database at `url` (module `postgres`),
    /// setting up an empty database.
    pub fn open_postgres(url: &str, options: &PgOptions) -> Result<Repo, RepoError> {
        let conn = postgres::connect(url, options)?;
        postgres::prepare(&conn)?;
        let mut repo = Repo::over(conn);
        repo.reconnect = Some((url.to_owned(), options.clone()));
        Ok(repo)
    }

    /// A repository over `conn`, its schema ready.
    fn over(conn: db::Conn) -> Repo {
        Repo {
            conn: Mutex::new(conn),
            indexed: Mutex::new(None),
            declared: Mutex::new(Arc::default()),
            idle: Condvar::new(),
            batch_wait: DEFAULT_BATCH_WAIT,
            checkpointer: None,
            warmer: None,
            reconnect: None,
            fences: Mutex::default(),
            known: Mutex::default(),
            any_exclusion: Mutex::default(),
        }
    }

    /// A private in-memory repository with the same schema, for tests.
    pub fn open_in_memory() -> Result<Repo, RepoError> {
        let conn = Connection::open_in_memory().ctx("opening an in-memory repository")?;
        Self::setup(conn, false)
    }

    fn setup(mut conn: Connection, file: bool) -> Result<Repo, RepoError> {
        conn.busy_handler(Some(busy::handler))
            .ctx("setting the busy handler")?;
        if file {
            // Switching needs a write lock, which a running agent may hold: only switch a
            // file that is not in WAL mode yet (a new one), so readers open while it runs.
            // (Read the header first: the mode of an existing file is known only then.)
            let _: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .ctx("reading the repository")?;
            schema::check_is_repository(&conn)?;
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .ctx("reading the journal mode")?;
            if !mode.eq_ignore_ascii_case("wal") {
                // Returns the mode in force; a file system without shared memory keeps the
                // rollback journal, which is as durable, only less concurrent.
                // Two processes creating the file at once race for this lock, and SQLite
                // does not wait here on its own: retry for up to the busy timeout.
                let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
                loop {
                    match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| {
                        r.get::<_, String>(0)
                    }) {
                        Ok(_mode) => break,
                        Err(e)
                            if std::time::Instant::now() < deadline
                                && matches!(
                                    e.sqlite_error_code(),
                                    Some(
                                        rusqlite::ErrorCode::DatabaseBusy
                                            | rusqlite::ErrorCode::DatabaseLocked
                                    )
                                ) =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => return Err(e).ctx("switching to WAL mode"),
                    }
                }
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .ctx("setting synchronous=FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .ctx("enabling foreign keys")?;
        // A 64 MiB page cache (the default is 2 MiB): a large batch otherwise spills dirty
        // pages and re-reads index pages through the OS for every event.
        conn.pragma_update(None, "cache_size", -65536)
            .ctx("setting the page cache size")?;
        // Savepoints copy every page an event touches to a statement journal; keep it in
        // memory rather than in a temporary file (one pwrite per page otherwise).
        conn.pragma_update(None, "temp_store", "MEMORY")
            .ctx("setting temp_store=MEMORY")?;
        // Stable query plans: without this, SQLite re-prepares a statement whenever a new
        // value is bound to a parameter its plan looked at (the owner lookup did so on
        // every event). The schema's indexes leave one sensible plan per statement.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .ctx("enabling the query planner stability guarantee")?;
        schema::migrate(&mut conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Repo::over(db::Conn::Sqlite(conn)))
    }

    /// A pass is about to visit many accounts (a flat-file diff, a full LDAP refresh):
    /// starts reading the repository file into the page cache on a thread of its own, so
    /// the pass does not wait for its pages one random read at a time (module `warm`).
    /// Does nothing for an in-memory repository, a file too large for the memory
    /// available, or when it did so in the last ten seconds.
    pub fn warm_up(&self) {
        if let Some(w) = &self.warmer {
            w.warm_up();
        }
    }

    /// Waits until the background checkpoint has copied everything committed so far into
    /// the database file (benchmarks time a pass without the previous pass's
    /// housekeeping). Returns at once for an in-memory repository.
    pub fn settle(&self) {
        if let Some(c) = &self.checkpointer {
            c.settle();
        }
    }

    /// Writes a consistent copy of the repository to a new SQLite file at `path`: a
    /// scratch copy a dry run may change (a preview of several files). An SQLite file is
    /// copied with `VACUUM INTO`; a PostgreSQL repository table by table, as `idsync
    /// migrate` does (module `copy`). Not inside a batch.
    pub fn copy_into(&self, path: &Path) -> Result<(), RepoError> {
        {
            let guard = self.lock()?;
            if let Some(conn) = guard.sqlite() {
                let target = path.to_str().ok_or_else(|| RepoError::Corrupt {
                    what: "scratch copy".to_owned(),
                    message: format!("{} is not valid UTF-8", path.display()),
                })?;
                conn.execute("VACUUM INTO ?1", [target])
                    .with_ctx(|| format!("copying the repository to {}", path.display()))?;
                return Ok(());
            }
        }
        // A scratch copy is not verified: it is thrown away after the preview.
        self.copy_tables_into(&Repo::open(path)?)
    }

    /// Sets the log size from which a transaction waits for the checkpoint (tests).
    #[cfg(test)]
    pub(crate) fn set_wal_restart_pages(&mut self, pages: i64) {
        if let Some(c) = &mut self.checkpointer {
            c.restart_pages = pages;
        }
    }

    /// Sets how long [`Repo::begin`] waits for a batch of another thread to finish before
    /// failing with [`RepoError::Busy`].
    pub fn with_batch_wait(mut self, wait: Duration) -> Repo {
        self.batch_wait = wait;
        self
    }

    /// The SQLite connection of a test repository, locked.
    #[cfg(test)]
    pub(crate) fn sqlite_for_tests(&self) -> SqliteGuard<'_> {
        SqliteGuard(self.conn.lock().expect("repository lock"))
    }

    /// Locks the connection; a poisoned lock becomes [`RepoError::Poisoned`]. A PostgreSQL
    /// connection the server closed (a restart, a fail-over, a session ended for idling in
    /// a transaction) is replaced by a new one first, but never while a transaction was
    /// open on it: the server rolled that transaction back, and every call fails until its
    /// owner has ended it (`rollback`), so nothing of the batch can run on the new
    /// connection outside a transaction; the batch is read again.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, db::Conn>, RepoError> {
        let mut guard = self.conn.lock().map_err(|_| RepoError::Poisoned)?;
        if guard.is_closed()
            && !guard.in_transaction()
            && let Some((url, options)) = &self.reconnect
        {
            match postgres::connect(url, options) {
                Ok(fresh) => {
                    tracing::warn!(
                        "repository {}: the connection was closed; connected again",
                        redact_url(url)
                    );
                    *guard = fresh;
                    self.forget_transaction_caches();
                }
                // The call goes on with the closed connection and fails with the driver's
                // error, which says why (a storage failure: the caller backs off).
                Err(e) => tracing::debug!("repository: connecting again failed: {e}"),
            }
        }
        Ok(guard)
    }

    /// The attributes `identity_values` indexes. Inside a transaction the list is read
    /// once and kept: only this connection can change it then (it holds the write lock),
    /// by building an index ([`Repo::forget_transaction_caches`] after) or by rolling back (every end
    /// of a transaction or savepoint forgets it). Outside one it is read every time.
    pub(crate) fn indexed(&self, conn: &db::Conn) -> Result<Arc<Vec<index::Indexed>>, RepoError> {
        if !conn.in_transaction() {
            return Ok(Arc::new(index::indexed_attrs(conn)?));
        }
        let mut cache = self.indexed.lock().map_err(|_| RepoError::Poisoned)?;
        if let Some(list) = &*cache {
            return Ok(list.clone());
        }
        let list = Arc::new(index::indexed_attrs(conn)?);
        *cache = Some(list.clone());
        Ok(list)
    }

    /// Drops what is cached for the open transaction: the indexed attributes, and whether
    /// correlation exclusions exist.
    pub(crate) fn forget_transaction_caches(&self) {
        if let Ok(mut cache) = self.indexed.lock() {
            *cache = None;
        }
        if let Ok(mut cache) = self.any_exclusion.lock() {
            *cache = None;
        }
    }

    // --- batch transaction -------------------------------------------------------------

    /// Starts the batch transaction (`BEGIN IMMEDIATE`: the write lock is taken now, so the
    /// batch cannot fail later for lack of it). Waits for a batch of another thread on this
    /// `Repo` to finish first.
    pub fn begin(&self) -> Result<(), RepoError> {
        self.begin_as(Serialised::Yes)
    }

    /// [`Repo::begin`], or on PostgreSQL with `Serialised::No` a transaction that does not
    /// take the write lock every agent's batches share: for the outbox, whose claims lock
    /// their own rows (`FOR UPDATE SKIP LOCKED`) and touch nothing a batch decides on.
    pub(crate) fn begin_as(&self, serialised: Serialised) -> Result<(), RepoError> {
        if let Some(c) = &self.checkpointer {
            c.before_begin();
        }
        let mut conn = self.lock()?;
        let start = Instant::now();
        while conn.in_transaction() {
            let waited = start.elapsed();
            if waited >= self.batch_wait {
                return Err(RepoError::Busy { waited });
            }
            conn = self
                .idle
                .wait_timeout(conn, self.batch_wait - waited)
                .map_err(|_| RepoError::Poisoned)?
                .0;
        }
        self.forget_transaction_caches();
        let sql = match (conn.dialect(), serialised) {
            (db::Dialect::Postgres, Serialised::No) => "BEGIN",
            (dialect, _) => begin_sql(dialect),
        };
        exec(&conn, sql, "starting a transaction")
    }

    /// Commits a transaction begun with [`Repo::begin`] when `result` is `Ok`, rolls it back
    /// otherwise (reporting the first error).
    pub(crate) fn finish<T>(&self, result: Result<T, RepoError>) -> Result<T, RepoError> {
        match result {
            Ok(v) => {
                self.commit()?;
                Ok(v)
            }
            Err(e) => {
                // The first error is the one to report.
                let _ = self.rollback();
                Err(e)
            }
        }
    }

    /// Marks the start of one event's effects (`SAVEPOINT event`).
    pub fn savepoint(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        require_tx(&conn, "savepoint")?;
        exec(
            &conn,
            &format!("SAVEPOINT {EVENT_SAVEPOINT}"),
            "starting an event savepoint",
        )
    }

    /// Keeps the event's effects (`RELEASE event`).
    pub fn release(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        require_tx(&conn, "release")?;
        exec(
            &conn,
            &format!("RELEASE {EVENT_SAVEPOINT}"),
            "releasing an event savepoint",
        )
    }

    /// Undoes the event's effects and ends its savepoint; the batch goes on.
    pub fn rollback_savepoint(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        require_tx(&conn, "rollback_savepoint")?;
        self.forget_transaction_caches();
        self.forget_known(&conn);
        exec(
            &conn,
            &format!("ROLLBACK TO {EVENT_SAVEPOINT}"),
            "rolling back an event savepoint",
        )?;
        exec(
            &conn,
            &format!("RELEASE {EVENT_SAVEPOINT}"),
            "ending a rolled back event savepoint",
        )
    }

    /// Commits the batch together with the new checkpoint of `resource`, as a
    /// compare-and-swap: if the stored checkpoint is not `expected`, the whole transaction is
    /// rolled back and [`RepoError::CheckpointConflict`] returned. `new = None` leaves the
    /// stored checkpoint as it is. On any error, no transaction is left open.
    pub fn commit_batch(
        &self,
        resource: &str,
        expected: Option<&idsync_core::Checkpoint>,
        new: Option<&idsync_core::Checkpoint>,
    ) -> Result<(), RepoError> {
        let fence = self
            .fences
            .lock()
            .map_err(|_| RepoError::Poisoned)?
            .get(resource)
            .cloned();
        let conn = self.lock()?;
        require_tx(&conn, "commit_batch")?;
        let result = (|| {
            if let Some(fence) = &fence
                && !leases::fence_holds(&conn, resource, fence)?
            {
                return Err(RepoError::LeaseLost {
                    resource: resource.to_owned(),
                    token: fence.token,
                });
            }
            let found = shadows::read_checkpoint(&conn, resource)?;
            if found.as_ref() != expected {
                return Err(RepoError::CheckpointConflict {
                    resource: resource.to_owned(),
                    expected: expected.cloned(),
                    found,
                });
            }
            if let Some(new) = new {
                shadows::write_checkpoint(&conn, resource, new)?;
            }
            exec(&conn, "COMMIT", "committing the batch")
        })();
        self.end_tx(conn, result)
    }

    /// Commits without touching any checkpoint (the CLI re-running failed events).
    /// On error, no transaction is left open.
    pub fn commit(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        require_tx(&conn, "commit")?;
        let result = exec(&conn, "COMMIT", "committing");
        self.end_tx(conn, result)
    }

    /// Rolls back the open transaction, if any.
    pub fn rollback(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        if !conn.in_transaction() {
            return Ok(());
        }
        let result = exec(&conn, "ROLLBACK", "rolling back");
        self.end_tx(conn, result)
    }

    /// How many rows this connection has inserted, updated or deleted since it was opened
    /// (SQLite's `total_changes`). The engine compares it around an event to know whether
    /// a failed event left writes behind.
    pub fn write_count(&self) -> Result<u64, RepoError> {
        Ok(self.lock()?.total_changes())
    }

    /// Whether a transaction is open on this `Repo`.
    pub fn in_transaction(&self) -> Result<bool, RepoError> {
        Ok(self.lock()?.in_transaction())
    }

    /// After COMMIT or ROLLBACK: on error, rolls back whatever is still open; then wakes
    /// anyone waiting in [`Repo::begin`].
    fn end_tx(
        &self,
        conn: MutexGuard<'_, db::Conn>,
        result: Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        self.forget_transaction_caches();
        self.forget_known(&conn);
        if result.is_err() && conn.in_transaction() {
            // The first error is the one to report; this one would only hide it.
            let _ = exec(&conn, "ROLLBACK", "rolling back after an error");
        }
        drop(conn);
        self.idle.notify_all();
        result
    }
}

/// Whether a transaction takes the write lock all batches share (module `leases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Serialised {
    Yes,
    No,
}

/// How a transaction that writes begins.
fn begin_sql(dialect: db::Dialect) -> &'static str {
    match dialect {
        db::Dialect::Sqlite => "BEGIN IMMEDIATE",
        // One writing transaction at a time across every agent sharing the database, as
        // SQLite's write lock gives: correlation reads and the identities it creates must
        // not interleave with another agent's (two creations of one person).
        db::Dialect::Postgres => "BEGIN; SELECT pg_advisory_xact_lock(7262100312313447239)",
    }
}

/// Runs one transaction control statement (`BEGIN`, `COMMIT`, a savepoint).
fn exec(conn: &db::Conn, sql: &str, context: &str) -> Result<(), RepoError> {
    conn.control(sql).ctx(context)
}

fn require_tx(conn: &db::Conn, op: &'static str) -> Result<(), RepoError> {
    if !conn.in_transaction() {
        Err(RepoError::NoTransaction { op })
    } else {
        Ok(())
    }
}

/// Runs `f` atomically. Outside a transaction it runs in its own savepoint (which then
/// acts as a transaction), undone if `f` fails. Inside a transaction the caller owns
/// atomicity: the engine brackets each event in a savepoint or redoes the batch with
/// savepoints when an event fails after writing (see `idsync_engine`), and other callers
/// roll the transaction back on error. Skipping the nested savepoint there spares SQLite
/// from journaling every page the write touches a second time.
fn atomic<T>(
    repo: &Repo,
    conn: &db::Conn,
    f: impl FnOnce(&db::Conn) -> Result<T, RepoError>,
) -> Result<T, RepoError> {
    if conn.in_transaction() {
        return f(conn);
    }
    if conn.dialect() == db::Dialect::Postgres {
        // A savepoint needs a transaction there: a transaction of its own.
        exec(conn, begin_sql(conn.dialect()), "starting a transaction")?;
        let result = f(conn);
        repo.forget_transaction_caches();
        return match result {
            Ok(v) => exec(conn, "COMMIT", "committing").map(|()| v),
            Err(e) => {
                let _ = exec(conn, "ROLLBACK", "rolling back");
                Err(e)
            }
        };
    }
    exec(conn, "SAVEPOINT idsync_op", "starting a savepoint")?;
    let result = f(conn);
    // The savepoint acted as a transaction: what it cached is not valid after it.
    repo.forget_transaction_caches();
    match result {
        Ok(v) => {
            exec(conn, "RELEASE idsync_op", "releasing a savepoint")?;
            Ok(v)
        }
        Err(e) => {
            // Report the first error; a failure here would leave the outer transaction to
            // the caller's rollback anyway.
            let _ = exec(conn, "ROLLBACK TO idsync_op", "rolling back a savepoint");
            let _ = exec(conn, "RELEASE idsync_op", "ending a savepoint");
            Err(e)
        }
    }
}

/// The current time as stored in the repository (RFC 3339, UTC, milliseconds).
fn now() -> String {
    stored_time(SystemTime::now())
}

/// The form of `decisions.at` (and of every time the repository stores as text): RFC 3339
/// in UTC with milliseconds, so that text order is time order.
fn stored_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A locked SQLite connection, for tests that look at the file's tables directly.
#[cfg(test)]
pub(crate) struct SqliteGuard<'a>(MutexGuard<'a, db::Conn>);

#[cfg(test)]
impl std::ops::Deref for SqliteGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0.sqlite().expect("an SQLite repository")
    }
}
