//! The CSV flat-file adapter.
//!
//! Key design choice: a flat file has no change log, so the adapter diffs the whole file against
//! the **last committed snapshot** — the accounts the repository last saw on the resource
//! ([`KnownAccounts`]: key → content hash, and the attributes for "previous") — and never keeps
//! or advances a snapshot of its own. The checkpoint is only the xxh3 hash of the file's bytes
//! (`xxh3:<16 hex digits>`), committed by the engine with the batch; an unchanged file is
//! [`Fetch::Idle`]. If a batch is lost (crash, failed commit), the next fetch diffs against the
//! same committed state and produces the same events again: nothing is skipped and nothing is
//! applied twice.
//!
//! Bad input never blocks good rows: a malformed record becomes a [`Reject`] with its
//! `file:line`, and when its key can still be read that account is *held* (no update, no
//! delete) until the file is fixed. A key that appears on several lines is held the same way.
//! A rejected record whose key cannot be read, or that spans lines (a stray quote swallows
//! rows), may be any missing account: that pass applies no delete at all, and warns.
//! Problems with the file as a whole (missing key column, duplicate column name) are
//! [`AdapterError::Permanent`]; an unreadable or empty file, or one whose last line has no
//! line ending (cut short or still being written), is [`AdapterError::Transient`].
//!
//! The feed path is not trusted (module `open`): it is opened without following a link
//! (unless `follow_symlinks`) and without blocking, and only a regular file within
//! `max_file_bytes` is read. No message quotes the file's content: errors and rejects
//! name the file, lines, configured columns and sizes.
//!
//! The steps of [`FlatFileAdapter::next_batch`]: pick the file (one path, or the next file of
//! a folder), refuse a link or a non-regular file, wait until it is complete (settle time,
//! marker file, or trust an atomic rename), open it safely, read and hash the bytes, decode (UTF-8 or Latin-1), check the header against the
//! last committed one, diff, then the **accidental-delete guard** refuses a pass that would
//! delete too many accounts before anything is applied. A pass larger than `batch_size` is
//! handed out in parts; while the caller applies one, a read-ahead thread (`ReadAhead`)
//! parses the next one's rows.
//!
//! The checkpoint ([`token`]) carries, beside the content hash, a fingerprint of the parsing
//! options (a config change re-diffs an unchanged file and acknowledges a changed header),
//! the snapshot's expected account count (a snapshot that does not match means a full pass of
//! upserts, never silently lost changes), the header's columns and, in folder mode, the file.
//!
//! A **reconcile** ([`Adapter::begin_reconcile`]) reads the file the same way but plans every
//! row (or the rows of the keys asked for), changed or not, and never takes the unchanged-
//! file shortcut. Its parts' checkpoints say how many rows it has committed (`rec`), so a
//! reconcile begun again on the same bytes resumes there; a reconcile of some keys is one
//! part that leaves the checkpoint as it was (its account count aside). In folder mode it
//! re-reads the last file committed, and is refused while newer files wait.
//!
//! [`Watcher`] (module `watch`) wakes the agent when a watched file is replaced, rewritten,
//! deleted or created, with a polling fallback.

mod complete;
mod config;
mod diff;
mod folder;
mod header;
mod known;
mod open;
mod rows;
mod token;
mod watch;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use idsync_core::{Adapter, AdapterError, ChangeBatch, Checkpoint, Fetch, KnownAccounts, Wakeup};
use xxhash_rust::xxh3::xxh3_64;

pub use config::{AfterProcessing, Completion, DeleteGuard, Encoding, FlatFileConfig};
pub use folder::might_read;
pub use header::header_problem;
pub use watch::Watcher;

use crate::diff::{DiffStats, Emit, Target};
use crate::open::FeedError;
use crate::rows::{Row, Rows};
use crate::token::{Token, hex};

/// Reads one CSV file (or a folder of them) and reports what changed since the last
/// committed snapshot.
#[derive(Debug)]
pub struct FlatFileAdapter {
    resource: String,
    config: FlatFileConfig,
    accept_deletes: bool,
    more: bool,
    /// A file's pass handed out in parts: kept between fetches so the next part does not
    /// read and diff the file again. Used only if the caller committed the last part (its
    /// checkpoint comes back as `after`); otherwise the pass starts over against the
    /// committed snapshot, which already holds every committed part.
    in_progress: Option<InProgress>,
    /// Events of the pass in hand in all ([`Adapter::planned`]).
    planned: Option<u64>,
    /// A reconcile asked for ([`Adapter::begin_reconcile`]) and not yet handed out whole.
    reconcile: Option<Scope>,
}

/// What a reconcile covers.
#[derive(Clone, Debug)]
enum Scope {
    /// Every account.
    Every,
    /// These accounts only.
    Only(HashSet<String>),
}

/// What the pass in hand is.
#[derive(Clone, Debug)]
enum Mode {
    /// An ordinary pass: what changed.
    Pass,
    /// A reconcile of every account: each part's checkpoint says how many rows it has
    /// committed (`rec`), so that a reconcile begun again on the same file resumes there.
    Reconcile,
    /// A reconcile of some accounts, in one part: the checkpoint stays the committed one
    /// (`base`), its account count moved by the accounts added or removed.
    Keys {
        /// The committed checkpoint when the reconcile read the file.
        base: Option<Checkpoint>,
    },
}

/// A pass handed out in parts.
#[derive(Debug)]
struct InProgress {
    /// The decoded file (shared with the read-ahead thread).
    data: Arc<Vec<u8>>,
    /// The file's size and modification time when it was read.
    signature: (u64, Option<std::time::SystemTime>),
    plan: diff::Plan,
    /// The next plan index to emit.
    next: usize,
    /// Accounts in the snapshot once the parts handed out so far are committed.
    n: u64,
    token: Token,
    folder_more: bool,
    fresh: bool,
    full_pass: bool,
    shown_path: String,
    file_name: String,
    /// The checkpoint of the part handed out last.
    checkpoint: Option<String>,
    /// A pass or a reconcile.
    mode: Mode,
    /// Rejects and held keys still to hand out (with the first part).
    rejects: Vec<idsync_core::Reject>,
    /// The next part carries every reject of the file ([`ChangeBatch::rejects_complete`]).
    rejects_complete: bool,
    held: Vec<String>,
    /// The next part's changed rows, being read while the caller applies this part.
    ahead: Option<ReadAhead>,
}

/// The changed rows of a part, read (CSV parse and attribute maps) on a thread of its own,
/// so the second core does it while the engine applies the part before. Only the file is
/// read there: previous attributes come from the repository when the part is handed out.
#[derive(Debug)]
struct ReadAhead {
    /// The plan index the part starts at.
    from: usize,
    thread: JoinHandle<Result<Vec<Row>, AdapterError>>,
}

impl FlatFileAdapter {
    /// An adapter for resource `resource`. The config should have passed
    /// [`FlatFileConfig::validate`]; if not, every fetch fails with a permanent error.
    pub fn new(resource: &str, config: FlatFileConfig) -> Self {
        FlatFileAdapter {
            resource: resource.to_owned(),
            config,
            accept_deletes: false,
            more: false,
            in_progress: None,
            planned: None,
            reconcile: None,
        }
    }

    /// The adapter's config.
    pub fn config(&self) -> &FlatFileConfig {
        &self.config
    }

    /// A watcher over [`Self::watch_dir`] that wakes only for this resource's own inputs:
    /// the feed file (in folder mode, the files the pattern picks) and their marker files —
    /// never another file of the folder, such as the repository or its log.
    pub fn watcher(&self, poll: std::time::Duration) -> Watcher {
        let feed = self.config.path.file_name().map(|n| n.to_owned());
        let pattern = self.config.pattern.clone();
        let marker = (self.config.completion == Completion::Marker)
            .then(|| self.config.marker_suffix.clone());
        Watcher::new(vec![self.watch_dir()], poll).only(move |path: &Path| {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let input = |name: &str| match &pattern {
                Some(p) => folder::matches(p, name),
                None => feed.as_deref().is_some_and(|f| f == name),
            };
            input(name)
                || marker
                    .as_deref()
                    .and_then(|m| name.strip_suffix(m))
                    .is_some_and(input)
        })
    }

    /// The folder to watch for this resource: the file's folder, or the folder itself in
    /// folder mode (a watch on the file would die at the first atomic rename).
    pub fn watch_dir(&self) -> PathBuf {
        if self.config.pattern.is_some() {
            return self.config.path.clone();
        }
        match self.config.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn permanent(&self, message: String) -> AdapterError {
        AdapterError::Permanent {
            resource: self.resource.clone(),
            message,
        }
    }

    fn transient(&self, message: String) -> AdapterError {
        AdapterError::Transient {
            resource: self.resource.clone(),
            message,
        }
    }

    /// A feed that could not be opened or read: transient or permanent by its kind.
    fn feed_error(&self, e: &FeedError, shown_path: &str) -> AdapterError {
        let message = e.message(shown_path);
        if e.is_transient() {
            self.transient(message)
        } else {
            self.permanent(message)
        }
    }

    /// The guard: refuses (before anything is applied) a pass deleting too many accounts.
    fn guard(&self, stats: &DiffStats, shown_path: &str) -> Result<(), AdapterError> {
        let accept = if self.reconcile.is_some() {
            format!("idsync reconcile {} --accept-deletes", self.resource)
        } else {
            format!("idsync run --once --accept-deletes {}", self.resource)
        };
        self.config
            .delete_guard
            .check(
                stats.deletes,
                stats.known,
                Some(stats.records),
                self.accept_deletes,
            )
            .map_err(|refusal| AdapterError::DeleteGuard {
                resource: self.resource.clone(),
                refusal,
                advice: format!(
                    "If {shown_path} is right, accept the deletes once with `{accept}`"
                ),
            })
    }
}

/// The file name shown in origins (`hr.csv`), or the whole path if it has none.
fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// The columns of `old` that `new` lacks (names compare case-insensitively).
fn removed_columns<'a>(old: &'a [String], new: &[String]) -> Vec<&'a str> {
    old.iter()
        .filter(|o| !new.iter().any(|n| n.eq_ignore_ascii_case(o)))
        .map(String::as_str)
        .collect()
}

impl Adapter for FlatFileAdapter {
    fn resource(&self) -> &str {
        &self.resource
    }

    fn accept_deletes(&mut self) {
        self.accept_deletes = true;
    }

    fn has_more(&self) -> bool {
        self.more
    }

    fn planned(&self) -> Option<u64> {
        self.planned
    }

    fn wakeup(&self) -> Wakeup {
        // Polling (where inotify is unavailable) looks at the folder once a second.
        Wakeup::Watch(Box::new(self.watcher(std::time::Duration::from_secs(1))))
    }

    fn begin_reconcile(&mut self, keys: Option<Vec<String>>) -> Result<(), AdapterError> {
        // A pass left in parts is not continued: the reconcile reads the file afresh.
        self.in_progress = None;
        self.planned = None;
        self.reconcile = Some(match keys {
            None => Scope::Every,
            Some(keys) => Scope::Only(keys.into_iter().collect()),
        });
        Ok(())
    }

    fn end_reconcile(&mut self) {
        self.reconcile = None;
        if self
            .in_progress
            .as_ref()
            .is_some_and(|ip| !matches!(ip.mode, Mode::Pass))
        {
            self.in_progress = None;
        }
    }

    fn next_batch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError> {
        let fetched = self.fetch(after, known);
        if fetched.is_err() {
            // A reconcile that could not be read ends here; the caller begins it again.
            self.end_reconcile();
        }
        fetched
    }
}

impl FlatFileAdapter {
    /// [`Adapter::next_batch`].
    fn fetch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError> {
        self.more = false;
        let problems = self.config.validate();
        if !problems.is_empty() {
            return Err(self.permanent(format!("invalid config: {}", problems.join("; "))));
        }
        let previous = after.and_then(|c| Token::decode(&c.0));
        let cfg = hex(self.config.parse_fingerprint());

        // Which file: the configured one, or the next one of the folder (a reconcile: the
        // last one committed).
        let (path, folder_file) = if self.config.pattern.is_some() && self.reconcile.is_some() {
            let last = previous.as_ref().and_then(|t| t.file.as_deref());
            match folder::reconcile_file(&self.config, &self.resource, last) {
                Ok(pick) => (pick.path, Some(pick.name)),
                Err(folder::ReconcilePick::Unreadable(e)) => return Err(self.transient(e)),
                Err(folder::ReconcilePick::Refused(e)) => return Err(self.permanent(e)),
            }
        } else if self.config.pattern.is_some() {
            let last = previous.as_ref().and_then(|t| t.file.as_deref());
            let resume = previous.as_ref().is_some_and(|t| t.partial);
            let pick =
                folder::next_file(&self.config, last, resume).map_err(|e| self.transient(e))?;
            match pick {
                None => return Ok(Fetch::Idle),
                Some(pick) => {
                    self.more = pick.more;
                    (pick.path, Some(pick.name))
                }
            }
        } else {
            (self.config.path.clone(), None)
        };
        let shown_path = path.display().to_string();

        // A link, a FIFO or a device at the path is refused before any wait.
        open::preflight(&self.config, &path).map_err(|e| self.feed_error(&e, &shown_path))?;
        let settled =
            match complete::is_complete(&self.config, &path).map_err(|e| self.transient(e))? {
                complete::Readiness::Ready(settled) => settled,
                complete::Readiness::NotYet => {
                    if self.reconcile.is_some() {
                        return Err(self.transient(format!(
                            "{shown_path} is not complete yet; the reconcile reads it once it is"
                        )));
                    }
                    tracing::info!(resource = %self.resource, "{shown_path} is not complete yet");
                    self.more = false;
                    return Ok(Fetch::Idle);
                }
            };
        let feed = open::open(&self.config, &path).map_err(|e| self.feed_error(&e, &shown_path))?;
        let signature = complete::signature_of(&feed.meta);
        // The next part of a pass in progress, if its last part was committed and the file
        // was not touched since: no need to read, hash and count again.
        if let Some(ip) = self.in_progress.take()
            && after.map(|c| c.0.as_str()) == ip.checkpoint.as_deref()
            && ip.signature == signature
        {
            return self.emit(ip, known);
        }
        let bytes = feed
            .read(&self.config, settled)
            .map_err(|e| self.feed_error(&e, &shown_path))?;
        let content = xxh3_64(&bytes);

        // The snapshot is checked against the checkpoint's account count: here, by a
        // count, only when the file looks unchanged (an idle pass must not hide a lost
        // snapshot); otherwise, and when that count differs, the diff checks the accounts
        // it loads against it and makes the pass a full pass.
        let expected = previous.as_ref().and_then(|t| t.n);
        let count = || {
            known
                .known_count(&self.resource)
                .map_err(|e| self.transient(format!("cannot count the known accounts: {e}")))
        };
        let unchanged = self.reconcile.is_none()
            && previous.as_ref().is_some_and(|p| {
                !p.partial
                    && p.content == content
                    && p.cfg.as_deref().is_none_or(|c| c == cfg)
                    && p.file == folder_file
            });
        if unchanged {
            let snapshot_matches = match expected {
                Some(n) => count()?.is_none_or(|c| c == n),
                None => true,
            };
            if snapshot_matches {
                return Ok(Fetch::Idle);
            }
        }
        // A checkpoint without a count (a first pass, an older checkpoint): the
        // repository's own count tells the diff whether there is anything to load.
        let expected_accounts = match expected {
            Some(n) => Some(n),
            None => count()?,
        };
        // The diff visits every known account: have the store read itself into memory
        // while the file is decoded and read (the updates then find their pages cached).
        if expected_accounts != Some(0) {
            known.warm_up();
        }
        let data: Vec<u8> = match self.config.encoding {
            Encoding::Utf8 => bytes,
            Encoding::Latin1 => {
                let (text, _) = encoding_rs::WINDOWS_1252.decode_without_bom_handling(&bytes);
                text.into_owned().into_bytes()
            }
        };
        let fresh = after.is_none() || previous.as_ref().is_some_and(|t| t.fresh);
        let file_name = file_name(&path);
        let scope = self.reconcile.clone();
        let emit = match &scope {
            None => Emit::Changes,
            Some(Scope::Every) => Emit::Every,
            Some(Scope::Only(keys)) => Emit::Only(keys),
        };
        let (plan, columns) = {
            let mut rows = Rows::open(&data, &self.config, &self.resource, &shown_path)?;
            // A removed or renamed column stops the resource until the config is changed.
            if let Some(p) = &previous
                && p.cfg.as_deref() == Some(cfg.as_str())
                && let Some(old) = &p.cols
            {
                let removed = removed_columns(old, rows.columns());
                if !removed.is_empty() {
                    return Err(self.permanent(format!(
                        "the header of {shown_path} changed: column(s) {} removed or renamed \
                         (was: {}; now {} columns). The resource stops until its config is \
                         changed: \
                         check the key, mappings and rules, then change the resource's source \
                         config (e.g. raise `header_version`) to accept the new header",
                        removed
                            .iter()
                            .map(|c| format!("'{c}'"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        old.join(", "),
                        rows.columns().len()
                    )));
                }
            }
            let target = Target {
                resource: &self.resource,
                file_name: &file_name,
                shown_path: &shown_path,
                fresh,
                full_pass: false,
                emit,
            };
            (
                diff::plan(&target, &mut rows, known, expected_accounts)?,
                rows.columns().to_vec(),
            )
        };
        self.guard(&plan.stats, &shown_path)?;
        let full_pass = plan.full_pass;
        let mode = match &scope {
            None => Mode::Pass,
            Some(Scope::Every) => Mode::Reconcile,
            Some(Scope::Only(keys)) => {
                let held: Vec<&String> = plan.held.iter().filter(|k| keys.contains(*k)).collect();
                if !held.is_empty() {
                    tracing::warn!(
                        resource = %self.resource,
                        "{shown_path}: {} account(s) asked for are held, not reconciled: their rows are rejected (idsync failed list)",
                        held.len()
                    );
                }
                Mode::Keys {
                    base: after.cloned(),
                }
            }
        };
        // A reconcile begun again on the file it was interrupted on resumes after the rows
        // it committed (the plan of the same bytes lists them in the same order).
        let resume_at = match (&mode, &previous) {
            (Mode::Reconcile, Some(p))
                if p.partial
                    && p.content == content
                    && p.cfg.as_deref() == Some(cfg.as_str())
                    && p.file == folder_file =>
            {
                p.rec
                    .and_then(|n| usize::try_from(n).ok())
                    .map(|n| n.min(plan.changes.len()))
            }
            _ => None,
        };
        if let Some(n) = resume_at {
            tracing::info!(
                resource = %self.resource,
                "{shown_path}: resuming the interrupted reconcile after its {n} committed row(s)"
            );
        }
        // Rejects were handed out with the first part of an interrupted pass already; a
        // reconcile of some accounts hands out none (it reads the others only to judge
        // the keys).
        let resumed = match mode {
            Mode::Pass => previous.as_ref().is_some_and(|t| t.partial),
            Mode::Reconcile => resume_at.is_some(),
            Mode::Keys { .. } => true,
        };
        let (rejects, held) = if resumed {
            (Vec::new(), Vec::new())
        } else {
            (plan.rejects.clone(), plan.held.clone())
        };
        let ip = InProgress {
            data: Arc::new(data),
            signature,
            n: plan.stats.known,
            plan,
            next: resume_at.unwrap_or(0),
            token: Token {
                content,
                cfg: Some(cfg),
                n: None,
                cols: Some(columns),
                file: folder_file,
                fresh: false,
                partial: false,
                rec: None,
            },
            folder_more: self.more && matches!(mode, Mode::Pass),
            fresh,
            full_pass,
            shown_path,
            file_name,
            checkpoint: None,
            mode,
            rejects,
            held,
            rejects_complete: !resumed,
            ahead: None,
        };
        self.emit(ip, known)
    }
}

impl FlatFileAdapter {
    /// Hands out the next part of a pass: at most `batch_size` events, with the checkpoint
    /// that says how far the pass got.
    fn emit(
        &mut self,
        mut ip: InProgress,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError> {
        let from = ip.next;
        let batch_size = part_size(&self.config, &ip);
        let read = match ip.ahead.take() {
            Some(ahead) if ahead.from == from => ahead.thread.join().map_err(|_| {
                self.transient(format!("{}: the read-ahead thread failed", ip.shown_path))
            })??,
            _ => diff::read_planned(
                &ip.data,
                &self.config,
                &self.resource,
                &ip.shown_path,
                ip.plan
                    .changes
                    .get(diff::change_range(&ip.plan, from, batch_size))
                    .unwrap_or_default(),
            )?,
        };
        let events = {
            let target = Target {
                resource: &self.resource,
                file_name: &ip.file_name,
                shown_path: &ip.shown_path,
                fresh: ip.fresh,
                full_pass: ip.full_pass,
                emit: Emit::Changes,
            };
            diff::events(&target, known, &ip.plan, from, batch_size, read)?
        };
        let end = from + events.len();
        for i in from..end {
            match ip.plan.changes.get(i) {
                Some(c) if !c.known => ip.n += 1,
                Some(_) => {}
                None => ip.n = ip.n.saturating_sub(1),
            }
        }
        ip.next = end;
        self.planned = Some(ip.plan.len() as u64);
        let more = ip.next < ip.plan.len();
        ip.checkpoint = match &ip.mode {
            Mode::Keys { base } => keys_checkpoint(base.as_ref(), ip.n, ip.plan.stats.known),
            mode => {
                let mut token = ip.token.clone();
                token.n = Some(ip.n);
                token.fresh = ip.fresh && more;
                token.partial = more;
                if matches!(mode, Mode::Reconcile) && more {
                    token.rec = Some(ip.next.min(ip.plan.changes.len()) as u64);
                }
                Some(token.encode())
            }
        };
        let batch = ChangeBatch {
            events,
            rejects: std::mem::take(&mut ip.rejects),
            held_keys: std::mem::take(&mut ip.held),
            checkpoint: ip.checkpoint.clone().map(Checkpoint),
            rejects_complete: std::mem::take(&mut ip.rejects_complete),
            reconcile: !matches!(ip.mode, Mode::Pass),
        };
        self.more = more || ip.folder_more;
        if more {
            ip.ahead = self.read_ahead(&ip);
            self.in_progress = Some(ip);
        } else {
            // The reconcile is handed out whole: the next fetch is an ordinary pass.
            self.reconcile = None;
        }
        Ok(Fetch::Batch(batch))
    }

    /// Starts reading the changed rows of the part after the one just handed out; `None`
    /// if it has none or no thread could be started (the part is then read when asked for).
    fn read_ahead(&self, ip: &InProgress) -> Option<ReadAhead> {
        let range = diff::change_range(&ip.plan, ip.next, part_size(&self.config, ip));
        let planned = ip.plan.changes.get(range)?.to_vec();
        if planned.is_empty() {
            return None;
        }
        let data = ip.data.clone();
        let config = self.config.clone();
        let resource = self.resource.clone();
        let shown_path = ip.shown_path.clone();
        let started = std::thread::Builder::new()
            .name(format!("idsync-read-{resource}"))
            .spawn(move || diff::read_planned(&data, &config, &resource, &shown_path, &planned));
        match started {
            Ok(thread) => Some(ReadAhead {
                from: ip.next,
                thread,
            }),
            Err(e) => {
                tracing::debug!(resource = %self.resource, "no read-ahead thread: {e}");
                None
            }
        }
    }
}

/// How many events a part of `ip` holds: `batch_size`, but a reconcile of some accounts
/// is one part (its checkpoint does not move, so parts could not be told apart).
fn part_size(config: &FlatFileConfig, ip: &InProgress) -> usize {
    match ip.mode {
        Mode::Keys { .. } => ip.plan.len().max(1),
        _ => config.batch_size,
    }
}

/// The checkpoint of a reconcile of some accounts: the committed one (`base`), with the
/// account count it holds moved from `known` (before) to `n` (after); a checkpoint this
/// adapter cannot read is kept as it is.
fn keys_checkpoint(base: Option<&Checkpoint>, n: u64, known: u64) -> Option<String> {
    let base = base?;
    let Some(mut token) = Token::decode(&base.0) else {
        return Some(base.0.clone());
    };
    token.n = token
        .n
        .map(|count| (i128::from(count) + i128::from(n) - i128::from(known)).max(0) as u64);
    Some(token.encode())
}

#[cfg(test)]
mod tests;
