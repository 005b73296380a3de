//! The **records floor** both pipeline benchmarks report: the rows a pipeline pass wrote
//! (identities, their correlation index rows, links, shadows, decision records), inserted
//! again, row by row, into a fresh repository file with the same schema and settings, in
//! one transaction, with no rule run, no lookup and no decision made.
//!
//! It is measured the way the benchmarks' floors are (one prepared insert per row, the
//! repository's settings), so the two compare: the floor says what writing the source's
//! rows once costs, the records floor what writing the records the design keeps for each
//! account costs. No tuning of the pipeline gets it below the records floor while it keeps
//! those records.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use idsync_repo::Repo;

/// The tables a sync pass writes one or more rows to for each account it creates.
pub const RECORD_TABLES: [&str; 5] = [
    "identities",
    "identity_values",
    "links",
    "shadows",
    "decisions",
];

/// What [`records_floor`] measured.
pub struct RecordsFloor {
    /// Time to insert the rows, commit included.
    pub elapsed: Duration,
    /// Rows inserted, all tables together.
    pub rows: u64,
}

/// The repository's settings on a plain connection, for the benchmarks' floors: WAL,
/// `synchronous=FULL`, its 64 MiB page cache, and no checkpoint inside the commit (the
/// repository checkpoints on a thread of its own, see idsync_repo's `checkpointer`).
pub fn repository_settings(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        idsync_repo::WAL_SAFETY_NET_PAGES,
    )
}

/// Inserts every row of [`RECORD_TABLES`] in the repository file `written` into a fresh
/// repository file at `scratch` (removed first), timed.
pub fn records_floor(written: &Path, scratch: &Path) -> anyhow::Result<RecordsFloor> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = scratch.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(Path::new(&name));
    }
    // The real schema, from the repository's own migrations.
    drop(
        Repo::open(scratch)
            .with_context(|| format!("creating the repository {}", scratch.display()))?,
    );
    let mut conn = rusqlite::Connection::open(scratch)
        .with_context(|| format!("opening {}", scratch.display()))?;
    repository_settings(&conn).with_context(|| format!("setting {} up", scratch.display()))?;
    let source = written
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", written.display()))?;
    conn.execute("ATTACH DATABASE ?1 AS written", [source])
        .with_context(|| format!("attaching {source}"))?;
    let start = Instant::now();
    let tx = conn.transaction()?;
    let mut rows = 0u64;
    for table in RECORD_TABLES {
        let copying = || format!("copying the rows of {table}");
        let mut select = tx
            .prepare(&format!("SELECT * FROM written.{table}"))
            .with_context(copying)?;
        let columns = select.column_count();
        let marks = vec!["?"; columns].join(", ");
        let mut insert = tx
            .prepare(&format!("INSERT INTO main.{table} VALUES ({marks})"))
            .with_context(copying)?;
        let mut found = select.query([]).with_context(copying)?;
        while let Some(row) = found.next().with_context(copying)? {
            for i in 0..columns {
                let value = rusqlite::types::ToSqlOutput::Borrowed(row.get_ref(i)?);
                insert.raw_bind_parameter(i + 1, value)?;
            }
            insert.raw_execute().with_context(copying)?;
            rows += 1;
        }
    }
    tx.commit().context("committing the records floor")?;
    Ok(RecordsFloor {
        elapsed: start.elapsed(),
        rows,
    })
}
