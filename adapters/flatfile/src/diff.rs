//! Diffing the file's rows against the repository's last seen accounts.
//!
//! Two phases, so memory stays bounded on a million-row file:
//! 1. [`plan`] reads every record once, hashing each row straight from its fields (no
//!    attribute map) and comparing with the known hash. When accounts are known, their
//!    key → hash pairs load from the repository on a second thread meanwhile, and the rows
//!    wait in a compact [`ReadList`] (about 40 bytes each plus the key) until they have; on a
//!    first load the file is diffed as it streams. A changed or new row is kept only as
//!    operation and file position. Keys are judged after the whole file is read, because a
//!    duplicate further down makes every row with that key ambiguous.
//! 2. [`read_planned`] goes back to a slice of the plan's positions and builds each row's
//!    attribute map (on the adapter's read-ahead thread, for the part after the one being
//!    applied), and [`events`] adds the previous attributes and makes the change events.
//!    The caller takes the plan in slices of `batch_size` events, each committed on its own.
//!
//! A reconcile ([`Emit::Every`], [`Emit::Only`]) plans every row (or the rows of the keys
//! asked for), changed or not, with the same ops, previous attributes, rejects, held keys
//! and deletes as a pass.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use foldhash::HashMap;

use csv::Position;
use idsync_core::{AdapterError, AttrMap, ChangeEvent, KnownAccounts, Op, Reject};

use crate::config::FlatFileConfig;
use crate::known::KnownKeys;
use crate::rows::{BadRow, Record, Row, Rows};

/// Where the diff happens, for events and messages.
#[derive(Clone, Copy)]
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
    /// upsert, unchanged or not, so nothing the snapshot lost is skipped. [`plan`] also
    /// sets it when the accounts it loads are not as many as the checkpoint expects.
    pub full_pass: bool,
    /// Which accounts the plan hands out.
    pub emit: Emit<'a>,
}

/// Which accounts a plan hands out.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Emit<'a> {
    /// A pass: the new, changed and missing accounts.
    Changes,
    /// A reconcile: every account, changed or not (and the missing ones).
    Every,
    /// A reconcile of these accounts only.
    Only(&'a HashSet<String>),
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
    /// Accounts missing from the file but not deleted, because a rejected record may hold
    /// them ([`BadRow::may_hide_accounts`]).
    pub deletes_withheld: u64,
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
    /// Every row is an upsert: the snapshot did not match the checkpoint.
    pub full_pass: bool,
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

/// The known accounts and the lines every key was seen on (good rows and bad rows whose
/// key could be read). Known keys are marked in place, so an incremental pass over a
/// million rows allocates nothing for the rows it has seen before.
struct Occurrences {
    known: KnownKeys,
    /// Keys not known: the first line of each.
    new: HashMap<Box<str>, u64>,
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
            None => match self.new.entry(key.into()) {
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

/// A good row to emit, before keys are judged (a key found on several lines drops it).
struct Pending {
    planned: Planned,
    line: u64,
}

/// The diff in progress: records go in one at a time, in file order.
struct Differ<'t> {
    target: &'t Target<'t>,
    seen: Occurrences,
    pending: Vec<Pending>,
    rejects: Vec<(u64, Reject)>,
    held: BTreeSet<String>,
    /// The lines (first, last) of rejected records that may hide accounts.
    hiding: Vec<(u64, u64)>,
    stats: DiffStats,
}

impl Differ<'_> {
    fn good(&mut self, key: &str, hash: u64, line: u64, pos: Position) {
        let target = self.target;
        self.stats.records += 1;
        let known_hash = self.seen.note(key, line);
        let wanted = match target.emit {
            Emit::Changes => target.full_pass || known_hash.is_none_or(|known| known != hash),
            Emit::Every => true,
            Emit::Only(keys) => keys.contains(key),
        };
        let op = match known_hash {
            _ if !wanted => None,
            None if target.fresh || target.full_pass => Some(Op::Upsert),
            None => Some(Op::Create),
            Some(_) if target.full_pass => Some(Op::Upsert),
            Some(_) => Some(Op::Update),
        };
        if let Some(op) = op {
            self.pending.push(Pending {
                planned: Planned {
                    op,
                    known: known_hash.is_some(),
                    pos,
                },
                line,
            });
        }
    }

    fn bad(&mut self, bad: BadRow) {
        self.stats.records += 1;
        if bad.may_hide_accounts() {
            self.hiding.push((bad.line, bad.last_line));
        }
        if let Some(key) = &bad.key {
            self.seen.note(key, bad.line);
            self.held.insert(key.clone());
        }
        let reject = Reject {
            key: bad.key,
            origin: self.target.origin(bad.line),
            reason: bad.reason,
        };
        self.rejects.push((bad.line, reject));
    }
}

/// The records of a whole file, kept compactly while the known accounts load: a million
/// rows take about 40 bytes each plus their key.
#[derive(Default)]
struct ReadList {
    /// Every good row's key, one after the other.
    keys: String,
    goods: Vec<GoodRead>,
    /// Bad records, with the number of good rows before each.
    bads: Vec<(usize, BadRow)>,
}

struct GoodRead {
    /// Where the key ends in `keys` (it starts where the previous one ended).
    key_end: usize,
    hash: u64,
    line: u64,
    /// The record's start, as [`Rows::last_start`] gave it (byte, line, record).
    start: (u64, u64, u64),
}

impl ReadList {
    /// Reads every record; `capacity`: the rows expected (the known accounts' count), so
    /// the list does not grow (and copy itself) a dozen times on the way.
    fn read(
        target: &Target<'_>,
        rows: &mut Rows<'_>,
        capacity: usize,
    ) -> Result<ReadList, AdapterError> {
        let mut list = ReadList {
            keys: String::with_capacity(capacity.saturating_mul(10)),
            goods: Vec::with_capacity(capacity),
            bads: Vec::new(),
        };
        while let Some(record) = next_record(target, rows)? {
            match record {
                Record::Good(row) => {
                    list.keys.push_str(&row.key);
                    let pos = rows.last_start();
                    list.goods.push(GoodRead {
                        key_end: list.keys.len(),
                        hash: row.hash,
                        line: row.line,
                        start: (pos.byte(), pos.line(), pos.record()),
                    });
                }
                Record::Bad(bad) => list.bads.push((list.goods.len(), bad)),
            }
        }
        Ok(list)
    }

    /// Feeds the records to `differ` in file order.
    fn replay(self, differ: &mut Differ<'_>) {
        let mut bads = self.bads.into_iter().peekable();
        let mut key_start = 0;
        for (i, g) in self.goods.iter().enumerate() {
            while let Some((_, bad)) = bads.next_if(|(before, _)| *before <= i) {
                differ.bad(bad);
            }
            let key = self.keys.get(key_start..g.key_end).unwrap_or_default();
            key_start = g.key_end;
            let mut pos = Position::new();
            pos.set_byte(g.start.0)
                .set_line(g.start.1)
                .set_record(g.start.2);
            differ.good(key, g.hash, g.line, pos);
        }
        for (_, bad) in bads {
            differ.bad(bad);
        }
    }
}

fn next_record(target: &Target<'_>, rows: &mut Rows<'_>) -> Result<Option<Record>, AdapterError> {
    rows.next_record()
        .map_err(|e| target.transient(format!("{}: {e}", target.shown_path)))
}

/// The known accounts of the resource, none seen yet (`capacity`: how many are expected).
fn load_known(
    target: &Target<'_>,
    known: &dyn KnownAccounts,
    capacity: usize,
) -> Result<KnownKeys, AdapterError> {
    let mut map = KnownKeys::with_capacity(capacity);
    known
        .each_known_hash(target.resource, &mut |key, hash| map.insert(key, hash))
        .map_err(|e| target.transient(format!("cannot read the known accounts: {e}")))?;
    Ok(map)
}

/// Phase 1: reads every record of `rows` and diffs it against the known accounts.
/// `expected` is how many accounts the checkpoint says the snapshot holds: when it is not
/// `Some(0)`, they load from the repository on a second thread while this one reads the
/// file into a [`ReadList`], and the diff runs once both are done; otherwise the file is
/// diffed as it is read. A snapshot that does not hold `expected` accounts (lost or
/// damaged) makes the pass a full pass, as if `target.full_pass` had been set.
pub(crate) fn plan(
    target: &Target<'_>,
    rows: &mut Rows<'_>,
    known: &dyn KnownAccounts,
    expected: Option<u64>,
) -> Result<Plan, AdapterError> {
    let resource = target.resource;
    let started = Instant::now();
    rows.build_attrs(false);
    let capacity = expected.map_or(0, |n| usize::try_from(n).unwrap_or(0));
    let (known_keys, list) = if expected == Some(0) {
        (load_known(target, known, 0)?, None)
    } else {
        std::thread::scope(|scope| {
            let loader = scope.spawn(|| {
                let known = load_known(target, known, capacity);
                (known, started.elapsed())
            });
            let list = ReadList::read(target, rows, capacity.saturating_add(capacity / 64));
            let read = started.elapsed();
            let (loaded, load_time) = loader.join().map_err(|_| {
                target.transient("the thread loading the known accounts failed".to_owned())
            })?;
            tracing::debug!(
                resource,
                "known accounts loaded in {load_time:?}, file read and hashed in {read:?}"
            );
            Ok::<_, AdapterError>((loaded?, Some(list?)))
        })?
    };
    let loaded = started.elapsed();
    let found = known_keys.len() as u64;
    let mismatch = expected.is_some_and(|n| n != found);
    if mismatch && !target.full_pass {
        tracing::warn!(
            resource,
            "the snapshot does not match the checkpoint (expected {expected:?} accounts, found {found}): full pass",
        );
    }
    let target = &Target {
        full_pass: target.full_pass || mismatch,
        ..*target
    };

    let mut differ = Differ {
        target,
        stats: DiffStats {
            known: known_keys.len() as u64,
            ..DiffStats::default()
        },
        seen: Occurrences {
            known: known_keys,
            new: HashMap::default(),
            repeated: HashMap::default(),
        },
        pending: Vec::new(),
        rejects: Vec::new(),
        held: BTreeSet::new(),
        hiding: Vec::new(),
    };
    match list {
        Some(list) => list.replay(&mut differ),
        None => {
            while let Some(record) = next_record(target, rows)? {
                match record {
                    Record::Good(row) => {
                        let pos = rows.last_start().clone();
                        differ.good(&row.key, row.hash, row.line, pos);
                    }
                    Record::Bad(bad) => differ.bad(bad),
                }
            }
        }
    }
    let Differ {
        seen,
        pending,
        mut rejects,
        mut held,
        mut stats,
        hiding,
        ..
    } = differ;

    // A key on several lines is ambiguous: reject every row with it (an unchanged one too)
    // and keep the stored account as it is. (A bad row with a key counts as a line.)
    held.extend(seen.repeated.keys().cloned());
    let bad_lines: HashSet<u64> = rejects.iter().map(|(l, _)| *l).collect();
    let mut repeated_lines = HashSet::new();
    for (key, lines) in &seen.repeated {
        repeated_lines.extend(lines.iter().copied());
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
        if repeated_lines.contains(&p.line) {
            continue;
        }
        if !p.planned.known {
            stats.added += 1;
        }
        changes.push(p.planned);
    }

    let mut deletes: Vec<String> = seen
        .known
        .iter()
        .filter(|(key, k)| k.first == 0 && !held.contains(*key))
        .map(|(key, _)| key.to_owned())
        .collect();
    if let Emit::Only(keys) = target.emit {
        deletes.retain(|key| keys.contains(key));
    }
    deletes.sort();
    // A rejected record whose key could not be read, or that spans lines, may be any of
    // the accounts missing from the file: none of them is deleted this pass.
    if !hiding.is_empty() && !deletes.is_empty() {
        stats.deletes_withheld = deletes.len() as u64;
        deletes.clear();
        tracing::warn!(
            resource,
            "{}: no account is deleted this pass: {} account(s) missing from the file are \
             kept, because the rejected record(s) on {} may hold them (a key that could not \
             be read, or a quoted value spanning lines); once those lines are fixed, the next \
             pass deletes what is really gone",
            target.shown_path,
            stats.deletes_withheld,
            line_list(&hiding)
        );
    }
    stats.deletes = deletes.len() as u64;

    rejects.sort_by_key(|(line, _)| *line);
    tracing::debug!(
        resource,
        file = target.shown_path,
        known = stats.known,
        records = stats.records,
        "diff planned: {:?} to load the known accounts (reading the file meanwhile, if any), {:?} to diff",
        loaded,
        started.elapsed() - loaded
    );
    Ok(Plan {
        full_pass: target.full_pass,
        changes,
        deletes,
        rejects: rejects.into_iter().map(|(_, r)| r).collect(),
        held: held.into_iter().collect(),
        stats,
    })
}

/// `line 3`, `lines 3-9, 12`: at most ten ranges, then how many more.
fn line_list(ranges: &[(u64, u64)]) -> String {
    const SHOWN: usize = 10;
    let mut parts: Vec<String> = ranges
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if b > a {
                format!("{a}-{b}")
            } else {
                a.to_string()
            }
        })
        .collect();
    if ranges.len() > SHOWN {
        parts.push(format!("and {} more", ranges.len() - SHOWN));
    }
    let plural = ranges.len() > 1 || ranges.first().is_some_and(|(a, b)| b > a);
    format!("line{} {}", if plural { "s" } else { "" }, parts.join(", "))
}

/// The changed rows at `planned` positions of the decoded file `data`, read again with
/// their attribute maps. Needs nothing but the file, so it can run ahead on another thread
/// ([`events`] takes its result).
pub(crate) fn read_planned(
    data: &[u8],
    config: &FlatFileConfig,
    resource: &str,
    shown_path: &str,
    planned: &[Planned],
) -> Result<Vec<Row>, AdapterError> {
    let transient = |message| AdapterError::Transient {
        resource: resource.to_owned(),
        message,
    };
    let mut rows = Rows::open(data, config, resource, shown_path)?;
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
    // The previous attributes of the part's known accounts, in one lookup.
    let mut wanted: Vec<&str> = Vec::new();
    let mut rows = read.iter();
    for i in from..end {
        if let Some(p) = plan.changes.get(i) {
            if let Some(row) = rows.next()
                && p.known
            {
                wanted.push(&row.key);
            }
        } else if let Some(key) = plan.deletes.get(i - plan.changes.len()) {
            wanted.push(key);
        }
    }
    let mut previous = known_attrs_of(target, known, &wanted);
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
                previous.remove(&row.key)
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
            let previous = previous.remove(key);
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

/// The last seen attributes of those of `keys` that are known. A stored snapshot that
/// cannot be read is reported and its accounts treated as unknown (their events then
/// carry no previous attributes) rather than blocking the resource; the batch still
/// commits only if the repository works.
fn known_attrs_of(
    target: &Target<'_>,
    known: &dyn KnownAccounts,
    keys: &[&str],
) -> HashMap<String, AttrMap> {
    let mut found = HashMap::with_capacity_and_hasher(keys.len(), Default::default());
    if keys.is_empty() {
        return found;
    }
    let read = known.known_attrs_of(target.resource, keys, &mut |key, attrs| {
        found.insert(key.to_owned(), attrs);
    });
    match read {
        Ok(()) => found,
        Err(e) => {
            tracing::warn!(resource = %target.resource, "snapshots of {} accounts are unreadable, treated as unknown: {e}", keys.len());
            HashMap::default()
        }
    }
}
