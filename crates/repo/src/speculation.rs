//! Speculation: a batch on PostgreSQL without a wait per statement.
//!
//! On SQLite a statement is a function call; on PostgreSQL it is a round trip to another
//! process, and a batch that waits for every reply spends most of its time waiting (about
//! 120 µs a statement against 25 µs of the server's work, measured on two cores). So while
//! the engine decides a batch *optimistically* (crate `idsync-engine`), the repository
//! speculates:
//!
//! - **What the batch will read is read first, in one query**: the owners of the batch's
//!   accounts and those identities' rows ([`Repo::speculate`]). They are kept in [`Known`]
//!   for the transaction, and every write of this module's callers keeps them true
//!   (create, check-in, delete, link, unlink), so the batch reads them from memory. A name
//!   or an account not known is read from the database as before.
//! - **Writes whose outcome is predicted are sent ahead** ([`Conn::send_ahead`]): a
//!   check-in of a known version, the link of an account known to be unlinked, a new
//!   identity (its id taken beforehand from the table's sequence, [`IdPool`]), a shadow, a
//!   decision record. Their replies are checked with the next statement that waits — the
//!   server runs requests in the order sent, so any read sees the writes before it.
//! - **A wrong guess sends the batch back**: a write that failed or changed other rows
//!   than predicted (a name another identity took, an account linked meanwhile) is
//!   [`DbError::Mispredicted`](crate::db::DbError::Mispredicted) — [`RepoError::is_mispredicted`]
//!   — and the engine rolls the batch back and decides it again without speculating, one
//!   statement at a time, where the same situation is the usual refusal (`NameTaken`,
//!   `AlreadyLinked`) of one event. Nothing is committed over a wrong guess: the
//!   connection refuses `COMMIT` until it is rolled back.
//!
//! The knowledge is valid inside the batch's transaction only: the batch holds the lock
//! every agent's batches take (module `leases`), so only this transaction writes
//! identities and links meanwhile. It is dropped whenever the transaction ends.

use std::collections::{HashMap, HashSet};

use crate::db::{Arg, Conn};
use crate::error::{Context, RepoError};
use crate::{Repo, args};

/// An identity's stored row (as a speculating batch knows it).
#[derive(Clone, Debug)]
pub(crate) struct IdentityRow {
    pub id: i64,
    pub version: i64,
    pub disabled: bool,
    /// The stored attributes (canonical JSON).
    pub json: String,
}

/// Ids taken from a table's sequence ahead of the inserts that use them.
#[derive(Debug)]
pub(crate) struct IdPool {
    table: &'static str,
    ids: Vec<i64>,
}

impl IdPool {
    fn new(table: &'static str) -> IdPool {
        IdPool {
            table,
            ids: Vec::new(),
        }
    }

    /// The next id (more are taken when none is left).
    pub(crate) fn take(&mut self, conn: &Conn) -> Result<i64, RepoError> {
        if self.ids.is_empty() {
            let [ids] = next_ids(conn, [self.table], MORE_IDS)?;
            self.ids = ids;
        }
        self.ids.pop().ok_or_else(|| RepoError::Corrupt {
            what: format!("the id sequence of {}", self.table),
            message: "it gave no value".to_owned(),
        })
    }
}

/// `n` new ids (at least one) from the id sequence of each of `tables`, in one query; each
/// list in reverse order, to be taken from its end.
fn next_ids<const N: usize>(
    conn: &Conn,
    tables: [&'static str; N],
    n: usize,
) -> Result<[Vec<i64>; N], RepoError> {
    let columns: Vec<String> = tables
        .iter()
        .map(|t| format!("nextval(pg_get_serial_sequence('{t}', 'id'))"))
        .collect();
    let sql = format!("SELECT {} FROM generate_series(1, ?1)", columns.join(", "));
    let n = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
    let rows = conn
        .query_map(&sql, args![n], |r| {
            (0..N)
                .map(|i| r.get::<i64>(i))
                .collect::<Result<Vec<_>, _>>()
        })
        .with_ctx(|| format!("taking new ids of {}", tables.join(" and ")))?;
    let mut lists: [Vec<i64>; N] = std::array::from_fn(|_| Vec::with_capacity(rows.len()));
    for row in rows.into_iter().rev() {
        for (list, id) in lists.iter_mut().zip(row) {
            list.push(id);
        }
    }
    Ok(lists)
}

/// Ids taken when a batch has used those it took first (more decision records or new
/// identities than events: a rule's `ctx` writes).
const MORE_IDS: usize = 500;

/// What a speculating batch knows of the repository (module doc).
#[derive(Debug)]
pub(crate) struct Known {
    /// The resource of the batch.
    pub resource: String,
    /// Owner of each account of the batch's resource known (`None`: not linked).
    pub owners: HashMap<String, Option<String>>,
    /// Identities by name (`None`: known not to exist).
    pub identities: HashMap<String, Option<IdentityRow>>,
    /// The identities each correlation condition read ahead finds ([`Repo::prefetch_find`]),
    /// by (attribute folded, value normalised): id and name, in id order.
    pub postings: HashMap<(String, String), Vec<(i64, String)>>,
    /// The accounts of the batch that have a pending timer (read ahead, and each account a
    /// timer is planned for since): the others have none, and a rehire check of theirs
    /// reads nothing ([`Repo::timers_of_account`]).
    pub timed: HashSet<String>,
    /// The identities correlation's read-ahead found whose pending timers were read too
    /// ([`Repo::prefetch_find`]), and of them those that have one (or had one planned
    /// since): a link to one of the others cancels no grace-period delete and reads nothing.
    pub timers_read: HashSet<String>,
    /// See `timers_read`.
    pub identities_timed: HashSet<String>,
    /// Ids of new identities.
    pub identity_ids: IdPool,
    /// Ids of new decision records.
    pub decision_ids: IdPool,
}

impl Known {
    /// The owner of account `key` of `resource`, if known: `Some(None)` for an account
    /// known to be unlinked.
    pub(crate) fn owner(&self, resource: &str, key: &str) -> Option<Option<&str>> {
        if resource != self.resource {
            return None;
        }
        self.owners.get(key).map(Option::as_deref)
    }

    /// Whether account `key` of `resource` is known to have no pending timer.
    pub(crate) fn without_timers(&self, resource: &str, key: &str) -> bool {
        resource == self.resource && self.owners.contains_key(key) && !self.timed.contains(key)
    }

    /// Notes that account `key` of `resource` and identity `identity` have a pending timer
    /// now.
    pub(crate) fn timer_planned(&mut self, resource: &str, key: &str, identity: &str) {
        if resource == self.resource {
            self.timed.insert(key.to_owned());
        }
        self.identities_timed.insert(identity.to_owned());
    }

    /// Whether identity `name` is known to have no pending timer.
    pub(crate) fn identity_without_timers(&self, name: &str) -> bool {
        self.timers_read.contains(name) && !self.identities_timed.contains(name)
    }

    /// Notes the owner of account `key` of `resource` (when it is the batch's resource).
    pub(crate) fn set_owner(&mut self, resource: &str, key: &str, owner: Option<&str>) {
        if resource == self.resource {
            self.owners.insert(key.to_owned(), owner.map(str::to_owned));
        }
    }

    /// Notes that identity `id` (`name`) no longer has value `gone` of attribute `attr`
    /// (folded, the value normalised) and now has `came`, for the conditions read ahead.
    pub(crate) fn reindexed(
        &mut self,
        attr: &str,
        gone: &[&String],
        came: &[&String],
        id: i64,
        name: &str,
    ) {
        if self.postings.is_empty() {
            return;
        }
        for value in gone {
            if let Some(list) = self.postings.get_mut(&(attr.to_owned(), (*value).clone())) {
                list.retain(|(i, _)| *i != id);
            }
        }
        for value in came {
            if let Some(list) = self.postings.get_mut(&(attr.to_owned(), (*value).clone()))
                && let Err(at) = list.binary_search_by_key(&id, |(i, _)| *i)
            {
                list.insert(at, (id, name.to_owned()));
            }
        }
    }

    /// Forgets identity `name`: it was deleted, and its links with it.
    pub(crate) fn deleted(&mut self, name: &str) {
        self.identities.insert(name.to_owned(), None);
        for owner in self.owners.values_mut() {
            if owner.as_deref() == Some(name) {
                *owner = None;
            }
        }
    }
}

impl Repo {
    /// Starts speculating (module doc) for a batch of `resource` whose accounts are
    /// `keys`, inside the open batch transaction: reads their owners and those identities
    /// and sends predicted writes ahead until the transaction ends or
    /// [`Repo::settle_speculation`]. Returns whether it does: only on PostgreSQL (SQLite
    /// gains nothing), never outside a transaction.
    pub fn speculate(&self, resource: &str, keys: &[&str]) -> Result<bool, RepoError> {
        let conn = self.lock()?;
        if conn.dialect() != crate::db::Dialect::Postgres || !conn.in_transaction() {
            return Ok(false);
        }
        let mut known = Known {
            resource: resource.to_owned(),
            owners: keys.iter().map(|k| ((*k).to_owned(), None)).collect(),
            identities: HashMap::new(),
            postings: HashMap::new(),
            timed: HashSet::new(),
            timers_read: HashSet::new(),
            identities_timed: HashSet::new(),
            identity_ids: IdPool::new("identities"),
            decision_ids: IdPool::new("decisions"),
        };
        // One decision record per event, and at most a new identity per event as a rule:
        // their ids are taken now, in one query, before anything is sent ahead (a query
        // that waits in the middle of the batch would hold its writes up).
        let [decisions, identities] = next_ids(&conn, ["decisions", "identities"], keys.len())?;
        known.decision_ids.ids = decisions;
        known.identity_ids.ids = identities;
        // The owners and their identities in one query. A paused agent cannot hold the
        // batches' lock by leaving this reply unread: its session is ended after the lease
        // time (`PgOptions::unresponsive_timeout`).
        conn.each(
            "SELECT l.key, i.name, i.id, i.version, i.disabled, i.attrs \
             FROM links l JOIN identities i ON i.id = l.identity_id \
             WHERE l.resource = ?1 AND l.key = ANY(?2)",
            &[Arg::Text(resource), Arg::Texts(keys)],
            &|| format!("reading the owners of a batch of {resource}"),
            |r| {
                let name: String = r.get(1).ctx("reading an owner")?;
                known
                    .owners
                    .insert(r.get(0).ctx("reading an owner")?, Some(name.clone()));
                known.identities.insert(
                    name,
                    Some(IdentityRow {
                        id: r.get(2).ctx("reading an owner")?,
                        version: r.get(3).ctx("reading an owner")?,
                        disabled: r.get(4).ctx("reading an owner")?,
                        json: r.get(5).ctx("reading an owner")?,
                    }),
                );
                Ok(())
            },
        )?;
        // The few accounts with a pending timer, in one query: a rehire check of every
        // other account (a resource with a grace period) then reads nothing.
        conn.each(
            "SELECT DISTINCT key FROM timers WHERE resource = ?1 AND key = ANY(?2)",
            &[Arg::Text(resource), Arg::Texts(keys)],
            &|| format!("reading the timers of a batch of {resource}"),
            |r| {
                known.timed.insert(r.get(0).ctx("reading a timer")?);
                Ok(())
            },
        )?;
        conn.send_writes_ahead(true)
            .ctx("starting to send writes ahead")?;
        *self.known.lock().map_err(|_| RepoError::Poisoned)? = Some(known);
        Ok(true)
    }

    /// Stops speculating and checks every write sent ahead: a wrong guess is an error
    /// for which [`RepoError::is_mispredicted`] holds (roll back and decide again).
    pub fn settle_speculation(&self) -> Result<(), RepoError> {
        let conn = self.lock()?;
        self.known.lock().map_err(|_| RepoError::Poisoned)?.take();
        conn.send_writes_ahead(false)
            .ctx("checking the writes sent ahead")
    }

    /// What the speculating batch knows, if it speculates (lock it after the connection).
    pub(crate) fn known(&self) -> Result<std::sync::MutexGuard<'_, Option<Known>>, RepoError> {
        self.known.lock().map_err(|_| RepoError::Poisoned)
    }

    /// Drops what a batch knew (its transaction ended) and stops sending ahead.
    pub(crate) fn forget_known(&self, conn: &Conn) {
        if let Ok(mut known) = self.known.lock() {
            *known = None;
        }
        // Only called when the transaction is over: nothing is left to check.
        let _ = conn.send_writes_ahead(false);
    }
}
