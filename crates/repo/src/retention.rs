//! Retention: removing decision records, sent notifications and discarded failed events
//! older than a cutoff, a chunk of rows per transaction so the agent's batches wait at most
//! one chunk.
//!
//! Key design choice: what must be kept past its age is said in ONE place, [`KEEP`]: each
//! reason with the SQL condition that holds for the decision records it needs. The purge
//! (`results purge`, the agent's `retention`) keeps every record one of them holds for and
//! reports how many each kept: open failed events and open work items keep the records of
//! their account. A new kind of open item that needs them adds its line there.
//!
//! Decision ids grow with time (`AUTOINCREMENT` on SQLite, a sequence on PostgreSQL, and
//! recorded as they are decided), so the purge walks them in id order from the oldest and
//! stops after a chunk holding no record older than the cutoff: it reads the old records
//! and one chunk more, never the whole table, and needs no index on the time (which every
//! event would pay for). The condition of [`KEEP`] and every statement serve SQLite and
//! PostgreSQL alike.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::db::{Arg, ToArg};
use crate::error::{Context, RepoError};
use crate::{Repo, args, stored_time};

/// One reason to keep a decision record past its retention: why (said to the operator) and
/// the SQL condition on the record, which the statement names `d` (a row of `decisions`).
#[derive(Clone, Copy, Debug)]
pub struct Keep {
    /// Why the records are kept, e.g. `an open failed event of their account needs them`.
    pub reason: &'static str,
    /// The condition, true for the records kept for this reason.
    pub condition: &'static str,
}

/// What must be kept: the decision records that something still open needs. The first
/// reason that holds is the one counted.
pub const KEEP: &[Keep] = &[
    Keep {
        reason: "an open failed event of their account needs them",
        condition: "EXISTS (SELECT 1 FROM failed_events f \
                    WHERE f.resource = d.resource AND f.key = d.key)",
    },
    Keep {
        reason: "an open work item of their account needs them",
        condition: "EXISTS (SELECT 1 FROM work_items w \
                    WHERE w.state = 'open' AND w.resource = d.resource AND w.key = d.key)",
    },
];

/// Rows removed per transaction.
pub const PURGE_CHUNK: usize = 10_000;

/// What a purge of decision records did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Records removed.
    pub removed: u64,
    /// Records older than the cutoff that were kept, per reason of [`KEEP`] (same order,
    /// every reason listed).
    pub kept: Vec<(&'static str, u64)>,
    /// The purge stopped before the end because it was asked to (the rest goes next time).
    pub interrupted: bool,
}

impl PurgeReport {
    /// Records older than the cutoff that were kept, for every reason.
    pub fn kept_total(&self) -> u64 {
        self.kept.iter().map(|(_, n)| n).sum()
    }
}

/// `t` as Unix milliseconds (the outbox's times); times before 1970 are 0.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Repo {
    /// Removes the decision records recorded before `cutoff`, but those [`KEEP`] needs, a
    /// chunk of [`PURGE_CHUNK`] records per transaction. `stop` is asked between chunks;
    /// when it says yes the purge ends there (`interrupted`).
    pub fn purge_decisions_before(
        &self,
        cutoff: SystemTime,
        stop: &dyn Fn() -> bool,
    ) -> Result<PurgeReport, RepoError> {
        let cutoff = stored_time(cutoff);
        // -2: newer than the cutoff; -1: to remove; i >= 0: kept for KEEP[i].
        // Cast: PostgreSQL's CASE of small constants is an INTEGER, read here as BIGINT.
        let mut class = String::from("CAST(CASE WHEN d.at >= ?2 THEN -2");
        for (i, k) in KEEP.iter().enumerate() {
            class.push_str(&format!(" WHEN {} THEN {i}", k.condition));
        }
        class.push_str(" ELSE -1 END AS BIGINT)");
        let select = format!(
            "SELECT d.id, {class} FROM decisions d WHERE d.id > ?1 ORDER BY d.id LIMIT {PURGE_CHUNK}"
        );
        let mut report = PurgeReport {
            kept: KEEP.iter().map(|k| (k.reason, 0)).collect(),
            ..PurgeReport::default()
        };
        let mut after = 0_i64;
        loop {
            if stop() {
                report.interrupted = true;
                return Ok(report);
            }
            self.begin()?;
            let chunk = (|| {
                let conn = self.lock()?;
                let rows: Vec<(i64, i64)> = conn
                    .query_map(&select, args![after, cutoff], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .ctx("reading decision records to purge")?;
                let mut removed = 0_u64;
                let mut kept = vec![0_u64; KEEP.len()];
                let mut older = false;
                for (id, class) in &rows {
                    match usize::try_from(*class) {
                        Ok(i) => {
                            older = true;
                            if let Some(n) = kept.get_mut(i) {
                                *n += 1;
                            }
                        }
                        Err(_) if *class == -1 => {
                            older = true;
                            conn.execute("DELETE FROM decisions WHERE id = ?1", args![id])
                                .with_ctx(|| format!("purging decision record #{id}"))?;
                            removed += 1;
                        }
                        Err(_) => {}
                    }
                }
                Ok((rows.len(), rows.last().map(|r| r.0), older, removed, kept))
            })();
            let (read, last, older, removed, kept) = self.finish(chunk)?;
            report.removed += removed;
            for (total, n) in report.kept.iter_mut().zip(kept) {
                total.1 += n;
            }
            match last {
                Some(last) if read == PURGE_CHUNK && older => after = last,
                _ => return Ok(report),
            }
        }
    }

    /// Removes the sent notifications delivered before `cutoff` (never undelivered ones), a
    /// chunk per transaction; returns how many, and whether `stop` ended it early.
    pub fn purge_sent_outbox_before(
        &self,
        cutoff: SystemTime,
        stop: &dyn Fn() -> bool,
    ) -> Result<(u64, bool), RepoError> {
        self.delete_in_chunks(
            "sent notifications",
            &format!(
                "SELECT id FROM outbox WHERE status = 'sent' AND sent_at < ?1 LIMIT {PURGE_CHUNK}"
            ),
            Arg::Int(unix_ms(cutoff)),
            "DELETE FROM outbox WHERE id = ?1",
            stop,
        )
    }

    /// Removes the discarded failed events discarded before `cutoff`, a chunk per
    /// transaction; returns how many, and whether `stop` ended it early.
    pub fn purge_discarded_failures_before(
        &self,
        cutoff: SystemTime,
        stop: &dyn Fn() -> bool,
    ) -> Result<(u64, bool), RepoError> {
        let cutoff = stored_time(cutoff);
        self.delete_in_chunks(
            "discarded failed events",
            &format!("SELECT id FROM failed_discarded WHERE discarded_at < ?1 LIMIT {PURGE_CHUNK}"),
            cutoff.to_arg(),
            "DELETE FROM failed_discarded WHERE id = ?1",
            stop,
        )
    }

    /// Deletes the rows whose ids `select` (one parameter, `param`) finds, a chunk per
    /// transaction, until it finds fewer than a chunk or `stop` says so.
    fn delete_in_chunks(
        &self,
        what: &str,
        select: &str,
        param: Arg<'_>,
        delete: &str,
        stop: &dyn Fn() -> bool,
    ) -> Result<(u64, bool), RepoError> {
        let mut removed = 0;
        loop {
            if stop() {
                return Ok((removed, true));
            }
            self.begin()?;
            let chunk = (|| {
                let conn = self.lock()?;
                let ids: Vec<i64> = conn
                    .query_map(select, &[param], |r| r.get(0))
                    .with_ctx(|| format!("reading {what} to purge"))?;
                for id in &ids {
                    conn.execute(delete, args![id])
                        .with_ctx(|| format!("purging {what}"))?;
                }
                Ok(ids.len())
            })();
            let n = self.finish(chunk)?;
            removed += n as u64;
            if n < PURGE_CHUNK {
                return Ok((removed, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use rusqlite::params;

    use super::*;

    /// `n` decision records of accounts `k0`..`k49` of resource hr recorded at `at`.
    fn records(repo: &Repo, n: usize, at: &str) {
        let conn = repo.sqlite_for_tests();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO decisions (at, resource, key, op, situation, action, identity, record) \
             SELECT ?2, 'hr', 'k' || (i % 50), 'upsert', 'unmatched', 'created', NULL, '{}' FROM n",
            params![n as i64, at],
        )
        .unwrap();
    }

    fn count(repo: &Repo, sql: &str) -> i64 {
        repo.sqlite_for_tests()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn purges_in_chunks_keeps_what_is_needed_and_reads_no_further_than_a_chunk_past_the_cutoff() {
        let repo = Repo::open_in_memory().unwrap();
        records(&repo, 25_000, "2020-01-01T00:00:00.000Z");
        records(&repo, 30_000, "2099-01-01T00:00:00.000Z");
        repo.sqlite_for_tests()
            .execute(
                "INSERT INTO failed_events (at, resource, key, error) \
                 VALUES ('2020-01-01T00:00:00.000Z', 'hr', 'k7', 'no luck')",
                [],
            )
            .unwrap();
        let chunks = Cell::new(0);
        let cutoff = humantime::parse_rfc3339("2021-01-01T00:00:00Z").unwrap();
        let r = repo
            .purge_decisions_before(cutoff, &|| {
                chunks.set(chunks.get() + 1);
                false
            })
            .unwrap();
        // k7 is every 50th record: 500 of the old ones, kept for its open failed event.
        assert_eq!(r.removed, 24_500);
        assert_eq!(r.kept, vec![(KEEP[0].reason, 500), (KEEP[1].reason, 0)]);
        assert!(!r.interrupted);
        assert_eq!(count(&repo, "SELECT count(*) FROM decisions"), 30_500);
        assert_eq!(
            count(&repo, "SELECT count(*) FROM decisions WHERE at < '2021'"),
            500
        );
        // Chunks of 10,000: two old, one across the cutoff, one new (nothing older: stop),
        // not the three more the 30,000 new records would take.
        assert_eq!(chunks.get(), 4);
    }

    #[test]
    fn a_stop_ends_the_purge_between_chunks() {
        let repo = Repo::open_in_memory().unwrap();
        records(&repo, 25_000, "2020-01-01T00:00:00.000Z");
        let asked = Cell::new(0);
        let r = repo
            .purge_decisions_before(SystemTime::now(), &|| {
                asked.set(asked.get() + 1);
                asked.get() > 1
            })
            .unwrap();
        assert!(r.interrupted);
        assert_eq!(r.removed, PURGE_CHUNK as u64);
        let r = repo
            .purge_decisions_before(SystemTime::now(), &|| false)
            .unwrap();
        assert_eq!(r.removed, 15_000);
        assert_eq!(count(&repo, "SELECT count(*) FROM decisions"), 0);
    }

    #[test]
    fn only_sent_notifications_and_old_discarded_events_go() {
        let repo = Repo::open_in_memory().unwrap();
        repo.sqlite_for_tests()
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) \
                 INSERT INTO outbox (created_at, policy, status, next_attempt_at, expires_at, \
                 sent_at, message) SELECT 1000, 'welcome', 'sent', 1000, 9000, 2000, '{}' FROM n;
                 INSERT INTO outbox (created_at, policy, status, next_attempt_at, expires_at, message)
                 VALUES (1000, 'welcome', 'pending', 1000, 9000, '{}'),
                        (1000, 'welcome', 'dead', 1000, 9000, '{}');
                 INSERT INTO failed_discarded (at, resource, error, discarded_at, reason) VALUES
                   ('2020-01-01T00:00:00.000Z', 'hr', 'x', '2020-01-01T00:00:00.000Z', 'old'),
                   ('2020-01-01T00:00:00.000Z', 'hr', 'x', '2099-01-01T00:00:00.000Z', 'new');",
            )
            .unwrap();
        let (n, stopped) = repo
            .purge_sent_outbox_before(SystemTime::now(), &|| false)
            .unwrap();
        assert_eq!((n, stopped), (12_000, false));
        assert_eq!(count(&repo, "SELECT count(*) FROM outbox"), 2);
        let (n, _) = repo
            .purge_discarded_failures_before(SystemTime::now(), &|| false)
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            count(
                &repo,
                "SELECT count(*) FROM failed_discarded WHERE reason = 'new'"
            ),
            1
        );
    }
}
