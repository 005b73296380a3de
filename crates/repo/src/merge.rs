//! Writes sent ahead, merged into set-wise statements (PostgreSQL, module `speculation`).
//!
//! A write sent ahead costs the server a statement (about 25 µs on two cores, against a few
//! µs for a row of a statement over arrays). So the writes a speculating batch sends ahead
//! are held until the next statement that waits (or [`MAX_ROWS`]), and those of one kind
//! become one statement over arrays (`unnest`): all the decision records of a part in one
//! `INSERT`, all its check-ins in one `UPDATE … FROM unnest(…)`.
//!
//! Merging moves a write past others, so it may only move past writes it commutes with. Each
//! write names the rows it writes — its *entities* (an identity by id, an account by
//! resource and key, an index row) — and those it needs written before it (`after`: the
//! identity a link or an index row refers to). It joins the latest statement of its kind
//! only if no later statement, nor that one, touches one of its entities, and none writes
//! one it needs; otherwise it starts a new statement at the end. Two writes of one entity
//! therefore keep their order and never share a statement (an `INSERT … ON CONFLICT DO
//! UPDATE` may not touch a row twice), and a row is written before the rows that refer to
//! it. Writes of different entities commute: each statement's rows are keyed by them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::db::{Arg, DbError};

/// The type of a column of a set-wise statement's arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `bigint[]` (integers and flags).
    Int,
    /// `text[]`.
    Text,
}

/// The set-wise form of a write: `sql` takes one array per parameter of the single-row
/// statement (`?1` the first parameter of every merged write, and so on), of the `kinds`
/// given.
#[derive(Debug)]
pub(crate) struct SetWise {
    pub sql: &'static str,
    pub kinds: &'static [Kind],
}

/// A row (or set of rows) a write writes or needs, for the order rule (module doc).
pub(crate) fn entity(what: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    what.hash(&mut h);
    h.finish()
}

/// Rows held before they are sent anyway.
pub(crate) const MAX_ROWS: usize = 2_500;

/// One set-wise statement being filled (`S`: its prepared statement).
pub(crate) struct Group<S> {
    pub set: &'static SetWise,
    pub statement: S,
    /// Column-wise values.
    ints: Vec<Vec<Option<i64>>>,
    texts: Vec<Vec<Option<String>>>,
    rows: usize,
    /// The rows the statement must change in all (`None`: any number).
    pub expect: Option<u64>,
    /// What its first write does, for a message.
    first: String,
}

impl<S> Group<S> {
    /// What the statement does, for a message.
    pub(crate) fn what(&self) -> String {
        match self.rows {
            0 | 1 => self.first.clone(),
            n => format!("{} (and {} more of its kind)", self.first, n - 1),
        }
    }

    /// The arrays, in parameter order.
    pub(crate) fn params(self) -> Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
        let mut ints = self.ints.into_iter();
        let mut texts = self.texts.into_iter();
        self.set
            .kinds
            .iter()
            .map(|k| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                match k {
                    Kind::Int => Box::new(ints.next().unwrap_or_default()),
                    Kind::Text => Box::new(texts.next().unwrap_or_default()),
                }
            })
            .collect()
    }

    /// Appends a row ([`check`]ed).
    fn push(&mut self, args: &[Arg<'_>]) {
        let (mut i, mut t) = (0, 0);
        for (kind, arg) in self.set.kinds.iter().zip(args) {
            match (kind, *arg) {
                (Kind::Int, Arg::Int(v)) => self.ints[i].push(Some(v)),
                (Kind::Text, Arg::Text(s)) => self.texts[t].push(Some(s.to_owned())),
                (Kind::Int, _) => self.ints[i].push(None),
                (Kind::Text, _) => self.texts[t].push(None),
            }
            match kind {
                Kind::Int => i += 1,
                Kind::Text => t += 1,
            }
        }
        self.rows += 1;
    }
}

/// Whether `args` fit the columns of `set` (NULL fits any).
fn check(set: &SetWise, args: &[Arg<'_>]) -> Result<(), DbError> {
    if args.len() != set.kinds.len() {
        return Err(DbError::Shape(format!(
            "{} values for a set-wise statement of {}",
            args.len(),
            set.kinds.len()
        )));
    }
    for (kind, arg) in set.kinds.iter().zip(args) {
        match (kind, arg) {
            (Kind::Int, Arg::Int(_)) | (Kind::Text, Arg::Text(_)) | (_, Arg::Null) => {}
            (kind, other) => {
                return Err(DbError::Shape(format!(
                    "a {other:?} where a set-wise statement takes {kind:?}"
                )));
            }
        }
    }
    Ok(())
}

/// The writes held, as statements in the order they will be sent.
pub(crate) struct Merger<S> {
    groups: Vec<Group<S>>,
    /// The latest group of each set-wise statement.
    latest: HashMap<&'static str, usize>,
    /// The latest group that writes each entity, or needs it written.
    last: HashMap<u64, usize>,
    /// The latest group that writes each entity.
    last_written: HashMap<u64, usize>,
    rows: usize,
}

impl<S> Default for Merger<S> {
    fn default() -> Self {
        Merger {
            groups: Vec::new(),
            latest: HashMap::new(),
            last: HashMap::new(),
            last_written: HashMap::new(),
            rows: 0,
        }
    }
}

impl<S: Clone> Merger<S> {
    /// Adds a write (`args` of the single-row statement) under the order rule.
    pub(crate) fn add(
        &mut self,
        set: &'static SetWise,
        statement: &S,
        args: &[Arg<'_>],
        expect: Option<u64>,
        (entities, after): (&[u64], &[u64]),
        what: impl FnOnce() -> String,
    ) -> Result<(), DbError> {
        check(set, args)?;
        let joinable = self.latest.get(set.sql).copied().filter(|g| {
            entities
                .iter()
                .all(|e| self.last.get(e).is_none_or(|last| last < g))
                && after
                    .iter()
                    .all(|e| self.last_written.get(e).is_none_or(|last| last < g))
        });
        let index = match joinable {
            Some(g) => g,
            None => {
                let ints = set.kinds.iter().filter(|k| **k == Kind::Int).count();
                let texts = set.kinds.len() - ints;
                self.groups.push(Group {
                    set,
                    statement: statement.clone(),
                    ints: vec![Vec::new(); ints],
                    texts: vec![Vec::new(); texts],
                    rows: 0,
                    expect: Some(0),
                    first: what(),
                });
                let g = self.groups.len() - 1;
                self.latest.insert(set.sql, g);
                g
            }
        };
        let group = &mut self.groups[index];
        group.push(args);
        group.expect = match (group.expect, expect) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        for e in entities {
            self.last.insert(*e, index);
            self.last_written.insert(*e, index);
        }
        for e in after {
            let last = self.last.entry(*e).or_insert(index);
            *last = (*last).max(index);
        }
        self.rows += 1;
        Ok(())
    }

    /// Whether it holds [`MAX_ROWS`] or more.
    pub(crate) fn is_full(&self) -> bool {
        self.rows >= MAX_ROWS
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The statements, in order; it holds nothing after.
    pub(crate) fn take(&mut self) -> Vec<Group<S>> {
        self.latest.clear();
        self.last.clear();
        self.last_written.clear();
        self.rows = 0;
        std::mem::take(&mut self.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static A: SetWise = SetWise {
        sql: "a",
        kinds: &[Kind::Int],
    };
    static B: SetWise = SetWise {
        sql: "b",
        kinds: &[Kind::Int, Kind::Text],
    };

    /// The statements held: which kind, and the first column of their rows.
    fn order(m: &mut Merger<()>) -> Vec<(&'static str, Vec<Option<i64>>)> {
        m.take()
            .into_iter()
            .map(|g| (g.set.sql, g.ints[0].clone()))
            .collect()
    }

    fn add(m: &mut Merger<()>, set: &'static SetWise, v: i64, writes: &[u64], after: &[u64]) {
        let text;
        let args: Vec<Arg<'_>> = if set.kinds.len() == 2 {
            text = v.to_string();
            vec![Arg::Int(v), Arg::Text(&text)]
        } else {
            vec![Arg::Int(v)]
        };
        m.add(set, &(), &args, Some(1), (writes, after), || {
            format!("write {v}")
        })
        .unwrap();
    }

    #[test]
    fn writes_of_other_rows_merge_by_kind() {
        let mut m = Merger::default();
        for i in 0..3 {
            add(&mut m, &A, i, &[entity(("a", i))], &[]);
            add(&mut m, &B, i, &[entity(("b", i))], &[entity(("a", i))]);
        }
        assert_eq!(
            order(&mut m),
            [
                ("a", vec![Some(0), Some(1), Some(2)]),
                ("b", vec![Some(0), Some(1), Some(2)])
            ]
        );
        assert!(m.is_empty());
    }

    #[test]
    fn two_writes_of_one_row_keep_their_order_in_two_statements() {
        let mut m = Merger::default();
        add(&mut m, &A, 1, &[entity("x")], &[]);
        add(&mut m, &B, 2, &[entity("y")], &[entity("x")]);
        add(&mut m, &A, 3, &[entity("x")], &[]);
        add(&mut m, &A, 4, &[entity("z")], &[]);
        assert_eq!(
            order(&mut m),
            [
                ("a", vec![Some(1)]),
                ("b", vec![Some(2)]),
                ("a", vec![Some(3), Some(4)])
            ]
        );
    }

    #[test]
    fn a_write_comes_after_the_row_it_needs() {
        let mut m = Merger::default();
        // b(1) starts the b statements; a(2) writes x after it; b(3) needs x: it may
        // not join b(1), which is sent before a(2).
        add(&mut m, &B, 1, &[entity("p")], &[]);
        add(&mut m, &A, 2, &[entity("x")], &[]);
        add(&mut m, &B, 3, &[entity("q")], &[entity("x")]);
        assert_eq!(
            order(&mut m),
            [
                ("b", vec![Some(1)]),
                ("a", vec![Some(2)]),
                ("b", vec![Some(3)])
            ]
        );
    }

    #[test]
    fn expectations_add_up_and_a_value_of_the_wrong_kind_is_refused() {
        let mut m: Merger<()> = Merger::default();
        add(&mut m, &A, 1, &[], &[]);
        add(&mut m, &A, 2, &[], &[]);
        m.add(&A, &(), &[Arg::Int(3)], None, (&[], &[]), String::new)
            .unwrap();
        let groups = m.take();
        assert_eq!(groups[0].expect, None);
        assert_eq!(groups[0].what(), "write 1 (and 2 more of its kind)");
        assert!(
            m.add(&A, &(), &[Arg::Text("x")], Some(1), (&[], &[]), String::new)
                .is_err()
        );
        assert!(m.is_empty(), "nothing held for a refused write");
    }
}
