//! Diffing the file's rows against the repository's last seen accounts.
//!
//! Two phases, so memory stays bounded on a million-row file:
//! 1. [`plan`] streams every record once, hashing each row straight from its fields (no
//!    attribute map) and comparing with the known hash. A changed or new row is kept only as
//!    key, operation and file position. Keys are judged after the whole file is read, because
//!    a duplicate further down makes every row with that key ambiguous.
//! 2. [`events`] turns a slice of the plan into change events: it goes back to each planned
//!    row's position, builds its attribute map and fetches its previous attributes. The
//!    caller takes the plan in slices of `batch_size` events, each committed on its own.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use foldhash::HashMap;

use csv::Position;
use idsync_core::{AdapterError, AttrMap, ChangeEvent, KnownAccounts, Op, Reject};

use crate::rows::{Record, Row, Rows};

/// Where the diff happens, for events and messages.
pub(crate) struct Target<'a> {
    /// The resource name.
    pub resource: &'a str,
    /// The file name shown in origins (`hr.csv`).
    pub file_name: &'a str,
    /// The full path shown in messages.
    pub shown_path: &'a str,
    /// No committed checkpoint: accounts not known are upserts, not creates.
    pub fresh: bool,
    /// The snapshot does not match the checkpoint (missing or damaged): every row is an
    /// upsert, unchanged or not, so nothing the snapshot lost is skipped.
    pub full_pass: bool,
}

/// Counts the accidental-delete guard and the checkpoint need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DiffStats {
    /// Accounts known before the batch.
    pub known: u64,
    /// Records read that were not blank (good or bad).
    pub records: u64,
    /// Events for keys not known before (they add a snapshot entry).
    pub added: u64,
    /// Delete events.
    pub deletes: u64,
}

impl Target<'_> {
    fn origin(&self, line: u64) -> String {
        format!("{}:{line}", self.file_name)
    }

    fn transient(&self, message: String) -> AdapterError {
        AdapterError::Transient {
            resource: self.resource.to_owned(),
            message,
        }
    }
}

/// A row to emit, found by [`plan`].
#[derive(Clone, Debug)]
pub(crate) struct Planned {
    pub op: Op,
    /// The account is known (its previous attributes are fetched).
    pub known: bool,
    pub pos: Position,
}

/// Everything one file's diff will emit, in order: the changed rows, then the deletes.
#[derive(Debug)]
pub(crate) struct Plan {
    pub changes: Vec<Planned>,
    pub deletes: Vec<String>,
    pub rejects: Vec<Reject>,
    pub held: Vec<String>,
    pub stats: DiffStats,
}

impl Plan {
    /// Events in the plan.
    pub fn len(&self) -> usize {
        self.changes.len() + self.deletes.len()
    }
}

/// A known account: its committed content hash and the first line the file has it on.
struct KnownKey {
    hash: u64,
    /// 0 while the file has not shown the key (lines are 1-based).
    first: u64,
}

/// The known accounts and the lines every key was seen on (good rows and bad rows whose
/// key could be read). Known keys are marked in place, so an incremental pass over a
/// million rows allocates nothing for the rows it has seen before.
struct Occurrences {
    known: HashMap<String, KnownKey>,
    /// Keys not known: the first line of each.
    new: HashMap<String, u64>,
    /// Only keys seen more than once: every line, in file order.
    repeated: HashMap<String, Vec<u64>>,
}

impl Occurrences {
    /// Notes that `key` is on `line`; returns its known hash, if it is known.
    fn note(&mut self, key: &str, line: u64) -> Option<u64> {
        let (first, hash) = match self.known.get_mut(key) {
            Some(k) if k.first == 0 => {
                k.first = line;
                return Some(k.hash);
            }
            Some(k) => (k.first, Some(k.hash)),
            None => match self.new.entry(key.to_owned()) {
                Entry::Vacant(v) => {
                    v.insert(line);
                    return None;
                }
                Entry::Occupied(o) => (*o.get(), None),
            },
        };
        self.repeated
            .entry(key.to_owned())
            .or_insert_with(|| vec![first])
            .push(line);
        hash
    }
}

/// A good row before keys are judged.
struct Pending {
    key: String,
    op: Op,
    known: bool,
    pos: Position,
}

/// Phase 1: reads every record of `rows` and diffs it against `known`.
pub(crate) fn plan(
    target: &Target<'_>,
    rows: &mut Rows<'_>,
    known: &dyn KnownAccounts,
) -> Result<Plan, AdapterError> {
    let resource = target.resource;
    let started = Instant::now();
    let mut seen = Occurrences {
        known: HashMap::default(),
        new: HashMap::default(),
        repeated: HashMap::default(),
    };
    known
        .each_known_hash(resource, &mut |key, hash| {
            seen.known.insert(key, KnownKey { hash, first: 0 });
        })
        .map_err(|e| target.transient(format!("cannot read the known accounts: {e}")))?;
    let loaded = started.elapsed();

    let mut pending = Vec::new();
    let mut rejects: Vec<(u64, Reject)> = Vec::new();
    let mut held = BTreeSet::new();
    let mut stats = DiffStats {
        known: seen.known.len() as u64,
        ..DiffStats::default()
    };

    rows.build_attrs(false);
    loop {
        let record = rows
            .next_record()
            .map_err(|e| target.transient(format!("{}: {e}", target.shown_path)))?;
        match record {
            None => break,
            Some(Record::Good(row)) => {
                stats.records += 1;
                let known_hash = seen.note(&row.key, row.line);
                let op = match known_hash {
                    None if target.fresh || target.full_pass => Some(Op::Upsert),
                    None => Some(Op::Create),
                    Some(_) if target.full_pass => Some(Op::Upsert),
                    Some(hash) if hash != row.hash => Some(Op::Update),
                    Some(_) => None,
                };
                if let Some(op) = op {
                    pending.push(Pending {
                        key: row.key,
                        op,
                        known: known_hash.is_some(),
                        pos: rows.last_start().clone(),
                    });
                }
            }
            Some(Record::Bad(bad)) => {
                stats.records += 1;
                if let Some(key) = &bad.key {
                    seen.note(key, bad.line);
                    held.insert(key.clone());
                }
                let reject = Reject {
                    key: bad.key,
                    origin: target.origin(bad.line),
                    reason: bad.reason,
                };
                rejects.push((bad.line, reject));
            }
        }
    }

    // A key on several lines is ambiguous: reject every row with it (an unchanged one too)
    // and keep the stored account as it is. (A bad row with a key counts as a line.)
    held.extend(seen.repeated.keys().cloned());
    let bad_lines: HashSet<u64> = rejects.iter().map(|(l, _)| *l).collect();
    for (key, lines) in &seen.repeated {
        for &line in lines {
            let others: Vec<String> = lines
                .iter()
                .filter(|&&l| l != line)
                .map(u64::to_string)
                .collect();
            let reason = format!(
                "duplicate key '{key}' also on line{} {}",
                if others.len() == 1 { "" } else { "s" },
                others.join(", ")
            );
            // A bad row on that line is already rejected for its own reason.
            if bad_lines.contains(&line) {
                continue;
            }
            rejects.push((
                line,
                Reject {
                    key: Some(key.clone()),
                    origin: target.origin(line),
                    reason,
                },
            ));
        }
    }

    let mut changes = Vec::with_capacity(pending.len());
    for p in pending {
        if seen.repeated.contains_key(&p.key) {
            continue;
        }
        if !p.known {
            stats.added += 1;
        }
        changes.push(Planned {
            op: p.op,
            known: p.known,
            pos: p.pos,
        });
    }

    let mut deletes: Vec<String> = seen
        .known
        .into_iter()
        .filter(|(key, k)| k.first == 0 && !held.contains(key))
        .map(|(key, _)| key)
        .collect();
    deletes.sort();
    stats.deletes = deletes.len() as u64;

    rejects.sort_by_key(|(line, _)| *line);
    tracing::debug!(
        resource,
        file = target.shown_path,
        known = stats.known,
        records = stats.records,
        "diff planned: known accounts loaded in {loaded:?}, file diffed in {:?}",
        started.elapsed() - loaded
    );
    Ok(Plan {
        changes,
        deletes,
        rejects: rejects.into_iter().map(|(_, r)| r).collect(),
        held: held.into_iter().collect(),
        stats,
    })
}

/// The changed rows at `planned` positions, read again with their attribute maps. Needs
/// nothing but the file, so it can run ahead on another thread ([`events`] takes its
/// result).
pub(crate) fn read_planned(
    shown_path: &str,
    resource: &str,
    rows: &mut Rows<'_>,
    planned: &[Planned],
) -> Result<Vec<Row>, AdapterError> {
    let transient = |message| AdapterError::Transient {
        resource: resource.to_owned(),
        message,
    };
    rows.build_attrs(true);
    let mut out = Vec::with_capacity(planned.len());
    for p in planned {
        let record = rows
            .read_at(&p.pos)
            .map_err(|e| transient(format!("{shown_path}: {e}")))?;
        let Some(Record::Good(row)) = record else {
            return Err(transient(format!(
                "{shown_path}: line {} reads differently the second time",
                p.pos.line()
            )));
        };
        out.push(row);
    }
    Ok(out)
}

/// The plan indexes of the changed rows among plan indexes `from..from + max`.
pub(crate) fn change_range(plan: &Plan, from: usize, max: usize) -> std::ops::Range<usize> {
    let end = plan.changes.len().min(from.saturating_add(max));
    from.min(end)..end
}

/// Phase 2: the events of `plan` from index `from`, at most `max` of them. `read` holds
/// the rows of [`change_range`]`(plan, from, max)` as [`read_planned`] returned them.
pub(crate) fn events(
    target: &Target<'_>,
    known: &dyn KnownAccounts,
    plan: &Plan,
    from: usize,
    max: usize,
    read: Vec<Row>,
) -> Result<Vec<ChangeEvent>, AdapterError> {
    let resource = target.resource;
    let end = plan.len().min(from.saturating_add(max));
    let mut out = Vec::with_capacity(end.saturating_sub(from));
    let mut read = read.into_iter();
    for i in from..end {
        if let Some(p) = plan.changes.get(i) {
            let Some(row) = read.next() else {
                return Err(target.transient(format!(
                    "{}: line {} was not read ahead",
                    target.shown_path,
                    p.pos.line()
                )));
            };
            let previous = if p.known {
                known_attrs(target, known, &row.key)
            } else {
                None
            };
            out.push(ChangeEvent {
                resource: resource.to_owned(),
                key: row.key,
                op: p.op,
                attrs: row.attrs.unwrap_or_default(),
                previous,
                origin: Some(target.origin(row.line)),
            });
        } else if let Some(key) = plan.deletes.get(i - plan.changes.len()) {
            let previous = known_attrs(target, known, key);
            out.push(ChangeEvent {
                resource: resource.to_owned(),
                key: key.clone(),
                op: Op::Delete,
                attrs: previous.clone().unwrap_or_default(),
                previous,
                origin: Some(target.file_name.to_owned()),
            });
        }
    }
    Ok(out)
}

/// The last seen attributes of `key`. A stored snapshot entry that cannot be read is
/// reported and treated as unknown (the event then carries no previous attributes) rather
/// than blocking the resource; the batch still commits only if the repository works.
fn known_attrs(target: &Target<'_>, known: &dyn KnownAccounts, key: &str) -> Option<AttrMap> {
    match known.known_attrs(target.resource, key) {
        Ok(attrs) => attrs,
        Err(e) => {
            tracing::warn!(resource = %target.resource, key, "snapshot of the account is unreadable, treated as unknown: {e}");
            None
        }
    }
}
