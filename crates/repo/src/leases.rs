//! Resource leases, for several agents sharing one PostgreSQL repository.
//!
//! A resource is run by the agent holding its lease: a row of `leases` naming the holder,
//! a fencing token and an expiry. The holder renews it well before it expires; once it has
//! expired, any agent may take it over, and the token goes up by one. Times are the
//! database server's clock (`clock_timestamp()`), so agents on machines whose clocks
//! disagree still agree on who holds what.
//!
//! Fencing: an agent registers the lease it holds with its [`Repo`]
//! ([`Repo::set_fence`]); from then on every batch of that resource commits only if, inside
//! the batch's own transaction, the lease row still names this holder with this token and
//! has not expired (`SELECT … FOR UPDATE`, module `lib`). A holder paused past its expiry
//! (a stopped process, a long garbage collection, a network partition) can therefore never
//! commit over its successor: its batch is rolled back and read again by whoever holds the
//! lease.
//!
//! [`Leases`] has a connection of its own, so renewals never wait behind a batch in
//! progress on the repository's connection. An SQLite repository has one agent (its file
//! lock) and no leases.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::db::Conn;
use crate::error::{Context, RepoError};
use crate::{PgOptions, Repo, args};

/// The database server's clock in Unix milliseconds, as SQL.
pub(crate) const DB_NOW_MS: &str = "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)";

/// The lease an agent holds on a resource: what its batches are fenced with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The holder's name (one per agent: its `agent_name`, or host and config folder).
    pub holder: String,
    /// The fencing token of this tenure.
    pub token: i64,
}

/// One row of `leases`, for `idsync status`.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseRow {
    /// Resource name.
    pub resource: String,
    /// The agent holding it.
    pub holder: String,
    /// Fencing token (how many times the lease changed hands, plus one).
    pub token: i64,
    /// When this holder took it (Unix ms).
    pub acquired_at: i64,
    /// When it expires unless renewed (Unix ms).
    pub expires_at: i64,
    /// Whether it has expired (by the database's clock).
    pub expired: bool,
}

/// Takes, renews and gives back resource leases on a connection of its own.
pub struct Leases {
    conn: Mutex<Conn>,
    holder: String,
    ttl: Duration,
    /// How to connect again after the server closed the connection (a restart).
    url: String,
    options: PgOptions,
}

impl Leases {
    /// Opens a connection to the PostgreSQL repository at `url` for `holder`, whose leases
    /// last `ttl` from each renewal.
    pub fn open(
        url: &str,
        options: &PgOptions,
        holder: &str,
        ttl: Duration,
    ) -> Result<Leases, RepoError> {
        let conn = crate::postgres::connect(url, options)?;
        crate::postgres::prepare(&conn)?;
        Ok(Leases {
            conn: Mutex::new(conn),
            holder: holder.to_owned(),
            ttl,
            url: url.to_owned(),
            options: options.clone(),
        })
    }

    /// This agent's name as the leases table shows it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The connection, connected again first if the server closed it (its statements run
    /// outside transactions, so nothing is lost with it).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Conn>, RepoError> {
        let mut conn = self.conn.lock().map_err(|_| RepoError::Poisoned)?;
        if conn.is_closed() {
            *conn = crate::postgres::connect(&self.url, &self.options)?;
        }
        Ok(conn)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes the lease of `resource` if it is free, expired, or held under this agent's
    /// name (the same agent restarted after a crash takes its resources back at once); the
    /// fence to commit under, `None` while another agent holds it. Every taking is a new
    /// tenure with a new token, so nothing of an earlier tenure (a process of the same name
    /// that is paused, not dead) can commit under it.
    pub fn acquire(&self, resource: &str) -> Result<Option<Fence>, RepoError> {
        let sql = format!(
            "INSERT INTO leases AS l (resource, holder, token, acquired_at, renewed_at, expires_at) \
             VALUES (?1, ?2, 1, {DB_NOW_MS}, {DB_NOW_MS}, {DB_NOW_MS} + ?3) \
             ON CONFLICT (resource) DO UPDATE SET \
               token = l.token + 1, holder = excluded.holder, \
               acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at, \
               expires_at = excluded.expires_at \
             WHERE l.holder = excluded.holder OR l.expires_at <= excluded.renewed_at \
             RETURNING token"
        );
        let token: Option<i64> = self
            .lock()?
            .query_row(&sql, args![resource, self.holder, self.ttl_ms()], |r| {
                r.get(0)
            })
            .with_ctx(|| format!("taking the lease of resource {resource}"))?;
        Ok(token.map(|token| Fence {
            holder: self.holder.clone(),
            token,
        }))
    }

    /// Renews a lease held under `fence`; false when it is no longer ours (expired and
    /// taken, or expired: the caller stops committing and acquires again).
    pub fn renew(&self, resource: &str, fence: &Fence) -> Result<bool, RepoError> {
        let sql = format!(
            "UPDATE leases SET renewed_at = {DB_NOW_MS}, expires_at = {DB_NOW_MS} + ?4 \
             WHERE resource = ?1 AND holder = ?2 AND token = ?3 AND expires_at > {DB_NOW_MS}"
        );
        let n = self
            .lock()?
            .execute(
                &sql,
                args![resource, fence.holder, fence.token, self.ttl_ms()],
            )
            .with_ctx(|| format!("renewing the lease of resource {resource}"))?;
        Ok(n == 1)
    }

    /// Gives the lease of `resource` back (a clean stop), so another agent takes it at once.
    pub fn release(&self, resource: &str, fence: &Fence) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "DELETE FROM leases WHERE resource = ?1 AND holder = ?2 AND token = ?3",
                args![resource, fence.holder, fence.token],
            )
            .with_ctx(|| format!("giving back the lease of resource {resource}"))?;
        Ok(())
    }
}

impl Repo {
    /// Fences the batches of `resource`: from now on they commit only under `fence`
    /// (module doc); `None` lifts the fence (the lease was given back or lost: the caller
    /// must not run the resource then).
    pub fn set_fence(&self, resource: &str, fence: Option<Fence>) -> Result<(), RepoError> {
        let mut fences = self.fences.lock().map_err(|_| RepoError::Poisoned)?;
        match fence {
            Some(f) => fences.insert(resource.to_owned(), f),
            None => fences.remove(resource),
        };
        Ok(())
    }

    /// Every lease (PostgreSQL repositories; empty for SQLite), by resource.
    pub fn leases(&self) -> Result<Vec<LeaseRow>, RepoError> {
        let conn = self.lock()?;
        if conn.dialect() != crate::db::Dialect::Postgres {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT resource, holder, token, acquired_at, expires_at, expires_at <= {DB_NOW_MS} \
             FROM leases ORDER BY resource"
        );
        conn.query_map(&sql, args![], |r| {
            Ok(LeaseRow {
                resource: r.get(0)?,
                holder: r.get(1)?,
                token: r.get(2)?,
                acquired_at: r.get(3)?,
                expires_at: r.get(4)?,
                expired: r.get(5)?,
            })
        })
        .ctx("reading the leases")
    }
}

/// Inside the batch transaction of `resource` (PostgreSQL): whether `fence` still holds,
/// locking the lease row until the commit so it cannot change hands meanwhile.
pub(crate) fn fence_holds(conn: &Conn, resource: &str, fence: &Fence) -> Result<bool, RepoError> {
    let sql = format!(
        "SELECT token FROM leases WHERE resource = ?1 AND holder = ?2 AND token = ?3 \
         AND expires_at > {DB_NOW_MS} FOR UPDATE"
    );
    let found: Option<i64> = conn
        .query_row(&sql, args![resource, fence.holder, fence.token], |r| {
            r.get(0)
        })
        .with_ctx(|| format!("checking the lease of resource {resource}"))?;
    Ok(found.is_some())
}
