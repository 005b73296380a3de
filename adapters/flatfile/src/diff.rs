//! Diffing the file's rows against the repository's last seen accounts.
//!
//! Rows stream in; a row whose content hash equals the known one is reduced to its key and line
//! at once, so only changed rows keep their attributes until the end of the file. Keys are
//! judged only after the whole file is read, because a duplicate further down makes every row
//! with that key ambiguous.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use idsync_core::{AdapterError, AttrMap, ChangeBatch, ChangeEvent, KnownAccounts, Op, Reject};

use crate::rows::{Record, Rows};

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

/// A good row, reduced to what the end of the diff needs.
struct Pending {
    key: String,
    line: u64,
    /// The event to emit, `None` when the row equals the known account.
    change: Option<(Op, AttrMap)>,
}

/// The lines every key was seen on (good rows and bad rows whose key could be read).
#[derive(Default)]
struct Occurrences {
    first: HashMap<String, u64>,
    /// Only keys seen more than once: every line, in file order.
    repeated: HashMap<String, Vec<u64>>,
}

impl Occurrences {
    fn note(&mut self, key: &str, line: u64) {
        match self.first.entry(key.to_owned()) {
            Entry::Vacant(v) => {
                v.insert(line);
            }
            Entry::Occupied(o) => self
                .repeated
                .entry(key.to_owned())
                .or_insert_with(|| vec![*o.get()])
                .push(line),
        }
    }
}

/// Reads every record of `rows` and diffs it against `known`. The returned batch has no
/// checkpoint; the caller adds it.
pub(crate) fn diff(
    target: &Target<'_>,
    rows: &mut Rows<'_>,
    known: &dyn KnownAccounts,
) -> Result<(ChangeBatch, DiffStats), AdapterError> {
    let resource = target.resource;
    let known_hashes = known
        .known_hashes(resource)
        .map_err(|e| target.transient(format!("cannot read the known accounts: {e}")))?;

    let mut pending = Vec::new();
    let mut seen = Occurrences::default();
    let mut rejects: Vec<(u64, Reject)> = Vec::new();
    let mut held = BTreeSet::new();
    let mut stats = DiffStats {
        known: known_hashes.len() as u64,
        ..DiffStats::default()
    };

    loop {
        let record = rows
            .next_record()
            .map_err(|e| target.transient(format!("{}: {e}", target.shown_path)))?;
        match record {
            None => break,
            Some(Record::Good(row)) => {
                stats.records += 1;
                seen.note(&row.key, row.line);
                let op = match known_hashes.get(&row.key) {
                    None if target.fresh || target.full_pass => Some(Op::Upsert),
                    None => Some(Op::Create),
                    Some(_) if target.full_pass => Some(Op::Upsert),
                    Some(&hash) if hash != row.attrs.content_hash() => Some(Op::Update),
                    Some(_) => None,
                };
                pending.push(Pending {
                    key: row.key,
                    line: row.line,
                    change: op.map(|op| (op, row.attrs)),
                });
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

    // A key on several lines is ambiguous: reject every good row with it and keep the stored
    // account as it is. (A bad row with a key counts as a line too: its good twin is rejected.)
    held.extend(seen.repeated.keys().cloned());

    let mut events = Vec::new();
    for row in pending {
        if let Some(lines) = seen.repeated.get(&row.key) {
            let others: Vec<String> = lines
                .iter()
                .filter(|&&l| l != row.line)
                .map(u64::to_string)
                .collect();
            let reason = format!(
                "duplicate key '{}' also on line{} {}",
                row.key,
                if others.len() == 1 { "" } else { "s" },
                others.join(", ")
            );
            let reject = Reject {
                key: Some(row.key),
                origin: target.origin(row.line),
                reason,
            };
            rejects.push((row.line, reject));
            continue;
        }
        let Some((op, attrs)) = row.change else {
            continue;
        };
        let previous = if known_hashes.contains_key(&row.key) {
            known_attrs(target, known, &row.key)
        } else {
            stats.added += 1;
            None
        };
        events.push(ChangeEvent {
            resource: resource.to_owned(),
            key: row.key,
            op,
            attrs,
            previous,
            origin: Some(target.origin(row.line)),
        });
    }

    let mut gone: Vec<&String> = known_hashes
        .keys()
        .filter(|key| !seen.first.contains_key(*key) && !held.contains(*key))
        .collect();
    gone.sort();
    stats.deletes = gone.len() as u64;
    for key in gone {
        let previous = known_attrs(target, known, key);
        events.push(ChangeEvent {
            resource: resource.to_owned(),
            key: key.clone(),
            op: Op::Delete,
            attrs: previous.clone().unwrap_or_default(),
            previous,
            origin: Some(target.file_name.to_owned()),
        });
    }

    rejects.sort_by_key(|(line, _)| *line);
    let batch = ChangeBatch {
        events,
        rejects: rejects.into_iter().map(|(_, r)| r).collect(),
        held_keys: held.into_iter().collect(),
        checkpoint: None,
    };
    Ok((batch, stats))
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
