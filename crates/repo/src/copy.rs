//! Copying a whole repository into an empty one of either kind (`idsync migrate`): SQLite
//! to PostgreSQL and back.
//!
//! Every table is copied with its ids (decision records keep their numbers, links their
//! identities), in an order that satisfies the foreign keys, in one transaction of the
//! target: into PostgreSQL with `COPY` (the rows streamed a few megabytes at a time), into
//! SQLite with multi-row inserts; PostgreSQL's id sequences are then moved past the
//! copied ids. The copy is
//! verified by reading both sides again: per table, the row count and a checksum of every
//! value in primary-key order (both databases sort text byte-wise), computed the same way
//! on both. A preview's scratch copy of a PostgreSQL repository uses the copy alone
//! (`copy_tables_into`): it is thrown away after the preview. Leases are not copied: they belong to the agents running, and there are none
//! during a migration.

use std::hash::{Hash, Hasher};

use serde::Serialize;

use crate::db::{Arg, Conn, Dialect, ToArg, Value, copy_text};
use crate::error::{Context, RepoError};
use crate::{Repo, args};

/// A table: its name, its columns, its primary key order, and whether `id` is generated.
struct Table {
    name: &'static str,
    columns: &'static [&'static str],
    order: &'static str,
    generated_id: bool,
}

/// Every table of the repository, parents before children.
const TABLES: &[Table] = &[
    Table {
        name: "identities",
        columns: &[
            "id",
            "name",
            "version",
            "disabled",
            "attrs",
            "created_at",
            "updated_at",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "identity_values",
        columns: &["attr", "value", "identity_id"],
        order: "attr, value, identity_id",
        generated_id: false,
    },
    Table {
        name: "indexed_attributes",
        columns: &["attr", "built_at"],
        order: "attr",
        generated_id: false,
    },
    Table {
        name: "index_normalisations",
        columns: &["attr", "steps"],
        order: "attr",
        generated_id: false,
    },
    Table {
        name: "links",
        columns: &["resource", "key", "identity_id", "linked_at"],
        order: "resource, key",
        generated_id: false,
    },
    Table {
        name: "shadows",
        columns: &["resource", "key", "hash", "attrs"],
        order: "resource, key",
        generated_id: false,
    },
    Table {
        name: "checkpoints",
        columns: &["resource", "token", "updated_at"],
        order: "resource",
        generated_id: false,
    },
    Table {
        name: "decisions",
        columns: &[
            "id",
            "at",
            "resource",
            "key",
            "op",
            "situation",
            "action",
            "identity",
            "record",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "failed_events",
        columns: &[
            "id",
            "at",
            "resource",
            "key",
            "origin",
            "error",
            "event",
            "attempts",
            "last_attempt_at",
            "decision_id",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "failed_discarded",
        columns: &[
            "id",
            "at",
            "resource",
            "key",
            "origin",
            "error",
            "event",
            "discarded_at",
            "reason",
        ],
        order: "id",
        generated_id: false,
    },
    Table {
        name: "outbox",
        columns: &[
            "id",
            "created_at",
            "policy",
            "identity",
            "resource",
            "key",
            "status",
            "attempts",
            "next_attempt_at",
            "expires_at",
            "claimed_until",
            "last_error",
            "sent_at",
            "message",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "reconciles",
        columns: &[
            "id",
            "resource",
            "started_at",
            "ended_at",
            "started_by",
            "key_count",
            "events",
            "changed",
            "unchanged",
            "failed",
            "rejected",
            "outcome",
            "error",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "erasures",
        columns: &["id", "at", "reference", "removed"],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "last_passes",
        columns: &["resource", "passed_at", "failed_at", "error"],
        order: "resource",
        generated_id: false,
    },
    Table {
        name: "work_items",
        columns: &[
            "id",
            "created_at",
            "resource",
            "key",
            "kind",
            "reason",
            "candidates",
            "decision_id",
            "seen",
            "last_seen_at",
            "last_decision_id",
            "state",
            "closed_at",
            "resolution",
            "resolved_identity",
            "closed_by_decision",
            "closed_reason",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "timers",
        columns: &[
            "id",
            "identity",
            "kind",
            "due_at",
            "planned_at",
            "resource",
            "key",
            "reason",
            "attempts",
            "last_error",
        ],
        order: "id",
        generated_id: true,
    },
    Table {
        name: "attribute_sources",
        columns: &["identity_id", "attr", "resource", "key", "given_at"],
        order: "identity_id, attr",
        generated_id: false,
    },
    Table {
        name: "correlation_exclusions",
        columns: &["resource", "key", "identity_id", "excluded_at"],
        order: "resource, key, identity_id",
        generated_id: false,
    },
];

/// Rows per `INSERT` of the copy.
const ROWS_PER_INSERT: usize = 100;

/// One table of a copy, as both sides read after it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CopiedTable {
    /// Table name.
    pub table: String,
    /// Rows in the source.
    pub source_rows: u64,
    /// Rows in the target.
    pub target_rows: u64,
    /// Checksum of the source's rows (hex).
    pub source_checksum: String,
    /// Checksum of the target's rows (hex).
    pub target_checksum: String,
}

impl CopiedTable {
    /// Whether both sides hold the same rows.
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows && self.source_checksum == self.target_checksum
    }
}

impl Repo {
    /// Copies every table of this repository into `target`, which must be empty, and
    /// verifies the copy (module doc). Not while an agent writes to either.
    pub fn copy_into_repository(&self, target: &Repo) -> Result<Vec<CopiedTable>, RepoError> {
        self.copy_tables_into(target)?;
        self.compare_with(target)
    }

    /// Copies every table into `target`, which must be empty, without verifying.
    pub(crate) fn copy_tables_into(&self, target: &Repo) -> Result<(), RepoError> {
        {
            let conn = target.lock()?;
            for t in TABLES {
                let n = count(&conn, t)?;
                if n > 0 {
                    return Err(RepoError::NotEmpty {
                        table: t.name.to_owned(),
                        rows: n,
                    });
                }
            }
        }
        target.begin()?;
        let copied = (|| {
            let source = self.lock()?;
            let conn = target.lock()?;
            for t in TABLES {
                copy_table(&source, &conn, t)?;
            }
            if conn.dialect() == Dialect::Postgres {
                for t in TABLES.iter().filter(|t| t.generated_id) {
                    let sql = format!(
                        "SELECT setval(pg_get_serial_sequence('{0}', 'id'), \
                         coalesce(max(id), 0) + 1, false) FROM {0}",
                        t.name
                    );
                    conn.query_one(&sql, args![], |r| r.get::<i64>(0))
                        .with_ctx(|| format!("moving the ids of {} past the copy", t.name))?;
                }
            }
            Ok(())
        })();
        target.finish(copied)
    }

    /// Every table's row count and checksum here and in `target`.
    fn compare_with(&self, target: &Repo) -> Result<Vec<CopiedTable>, RepoError> {
        let source = self.lock()?;
        let conn = target.lock()?;
        TABLES
            .iter()
            .map(|t| {
                let (source_rows, source_checksum) = checksum(&source, t)?;
                let (target_rows, target_checksum) = checksum(&conn, t)?;
                Ok(CopiedTable {
                    table: t.name.to_owned(),
                    source_rows,
                    target_rows,
                    source_checksum,
                    target_checksum,
                })
            })
            .collect()
    }
}

fn count(conn: &Conn, t: &Table) -> Result<u64, RepoError> {
    let n: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {}", t.name), args![], |r| {
            r.get(0)
        })
        .with_ctx(|| format!("counting the rows of {}", t.name))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn select(t: &Table) -> String {
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        t.columns.join(", "),
        t.name,
        t.order
    )
}

fn insert(t: &Table, rows: usize) -> String {
    let width = t.columns.len();
    let tuples: Vec<String> = (0..rows)
        .map(|r| {
            let marks: Vec<String> = (1..=width).map(|c| format!("?{}", r * width + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES {}",
        t.name,
        t.columns.join(", "),
        tuples.join(", ")
    )
}

fn copy_table(source: &Conn, target: &Conn, t: &Table) -> Result<(), RepoError> {
    if target.dialect() == Dialect::Postgres {
        return copy_table_in_bulk(source, target, t);
    }
    let reading = || format!("reading table {}", t.name);
    let writing = || format!("copying table {}", t.name);
    let width = t.columns.len();
    let mut pending: Vec<Value> = Vec::with_capacity(width * ROWS_PER_INSERT);
    let flush = |pending: &mut Vec<Value>| -> Result<(), RepoError> {
        if pending.is_empty() {
            return Ok(());
        }
        let rows = pending.len() / width;
        let values: Vec<Arg<'_>> = pending.iter().map(ToArg::to_arg).collect();
        target
            .execute(&insert(t, rows), &values)
            .with_ctx(writing)?;
        pending.clear();
        Ok(())
    };
    source.each_paged(&select(t), args![], &reading, |r| {
        for c in 0..width {
            pending.push(r.value(c).with_ctx(reading)?);
        }
        if pending.len() >= width * ROWS_PER_INSERT {
            flush(&mut pending)?;
        }
        Ok(())
    })?;
    flush(&mut pending)
}

/// Bytes of COPY data sent at a time.
const COPY_CHUNK: usize = 8 << 20;

/// Into PostgreSQL: the rows as `COPY … FROM STDIN` data, a few megabytes at a time.
fn copy_table_in_bulk(source: &Conn, target: &Conn, t: &Table) -> Result<(), RepoError> {
    let reading = || format!("reading table {}", t.name);
    let writing = || format!("copying table {}", t.name);
    let sql = format!("COPY {} ({}) FROM STDIN", t.name, t.columns.join(", "));
    let mut data: Vec<u8> = Vec::with_capacity(COPY_CHUNK + 4096);
    let flush = |data: &mut Vec<u8>| -> Result<(), RepoError> {
        if !data.is_empty() {
            target.copy_in(&sql, data).with_ctx(writing)?;
            data.clear();
        }
        Ok(())
    };
    source.each_paged(&select(t), args![], &reading, |r| {
        for c in 0..t.columns.len() {
            if c > 0 {
                data.push(b'\t');
            }
            copy_text(&r.value(c).with_ctx(reading)?, &mut data);
        }
        data.push(b'\n');
        if data.len() >= COPY_CHUNK {
            flush(&mut data)?;
        }
        Ok(())
    })?;
    flush(&mut data)
}

/// Row count and checksum of table `t` (module doc).
fn checksum(conn: &Conn, t: &Table) -> Result<(u64, String), RepoError> {
    let reading = || format!("verifying table {}", t.name);
    let mut hasher = std::hash::DefaultHasher::new();
    let mut rows = 0u64;
    conn.each_paged(&select(t), args![], &reading, |r| {
        rows += 1;
        for c in 0..t.columns.len() {
            match r.value(c).with_ctx(reading)? {
                Value::Null => 0u8.hash(&mut hasher),
                Value::Int(v) => (1u8, v).hash(&mut hasher),
                Value::Real(v) => (2u8, v.to_bits()).hash(&mut hasher),
                Value::Text(s) => (3u8, s).hash(&mut hasher),
                Value::Blob(b) => (4u8, b).hash(&mut hasher),
            }
        }
        Ok(())
    })?;
    Ok((rows, format!("{:016x}", hasher.finish())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    /// Table → (column → `integer` or `text`), of an SQLite or a PostgreSQL repository.
    fn columns(conn: &Conn) -> BTreeMap<String, BTreeMap<String, String>> {
        let sql = match conn.dialect() {
            Dialect::Sqlite => {
                "SELECT m.name, p.name, lower(p.type) FROM sqlite_master m, \
                 pragma_table_info(m.name) p WHERE m.type = 'table' \
                 AND m.name NOT LIKE 'sqlite_%'"
            }
            Dialect::Postgres => {
                "SELECT table_name::text, column_name::text, data_type::text \
                 FROM information_schema.columns WHERE table_schema = current_schema() \
                 AND table_name NOT IN ('leases', 'idsync_schema')"
            }
        };
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (table, column, kind) in conn
            .query_map(sql, args![], |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                ))
            })
            .unwrap()
        {
            let kind = match kind.as_str() {
                "integer" | "bigint" => "integer",
                "text" => "text",
                other => panic!("{table}.{column}: unexpected type {other}"),
            };
            out.entry(table)
                .or_default()
                .insert(column, kind.to_owned());
        }
        out
    }

    /// Text with every character COPY's text format escapes, and others, survives a copy
    /// into PostgreSQL and back: every table verified, the values equal.
    #[test]
    fn awkward_text_survives_a_copy_into_postgres_and_back() {
        use idsync_core::AttrMap;
        let source = Repo::open_in_memory().unwrap();
        let awkward = "tab\there\nnew line\r\\backslash \\N 'quote' \"dq\" é ∑ 😀 \\x41";
        let mut attrs = AttrMap::new();
        attrs.set_text("note", awkward);
        source.begin().unwrap();
        source
            .create_identity_with_account("ann\tlee", &attrs, Some(("hr", "k\n1")))
            .unwrap();
        source.put_shadow("hr", "k\n1", &attrs).unwrap();
        source.commit().unwrap();
        let pg = idsync_testkit::postgres::Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let target = Repo::open_postgres(&pg.url("idsync"), &Default::default()).unwrap();
        let tables = source.copy_into_repository(&target).unwrap();
        assert!(tables.iter().all(CopiedTable::matches), "{tables:#?}");
        let copied = target.identity("ann\tlee").unwrap().unwrap();
        assert_eq!(copied.attrs, attrs);
        assert_eq!(target.shadow("hr", "k\n1").unwrap(), Some(attrs.clone()));
        let back = Repo::open_in_memory().unwrap();
        let tables = target.copy_into_repository(&back).unwrap();
        assert!(tables.iter().all(CopiedTable::matches), "{tables:#?}");
        assert_eq!(back.identity("ann\tlee").unwrap().unwrap().attrs, attrs);
    }

    /// The PostgreSQL schema is the SQLite one after every migration (same tables, same
    /// columns, same kinds), and the copy knows every table with every column: a migration
    /// added for SQLite alone fails here.
    #[test]
    fn both_schemas_and_the_copy_list_the_same_tables_and_columns() {
        let sqlite = Repo::open_in_memory().unwrap();
        let pg = idsync_testkit::postgres::Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let postgres = Repo::open_postgres(&pg.url("idsync"), &Default::default()).unwrap();
        let on_sqlite = columns(&sqlite.lock().unwrap());
        let on_postgres = columns(&postgres.lock().unwrap());
        assert_eq!(on_sqlite, on_postgres);
        let copied: BTreeMap<String, Vec<String>> = TABLES
            .iter()
            .map(|t| {
                let mut c: Vec<String> = t.columns.iter().map(|c| (*c).to_owned()).collect();
                c.sort();
                (t.name.to_owned(), c)
            })
            .collect();
        let schema: BTreeMap<String, Vec<String>> = on_sqlite
            .iter()
            .map(|(t, c)| (t.clone(), c.keys().cloned().collect()))
            .collect();
        assert_eq!(copied, schema);
    }
}
