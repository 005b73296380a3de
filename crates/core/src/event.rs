//! Change events and the adapter contract.
//!
//! An adapter turns what changed on a resource into [`ChangeEvent`]s, strictly after the
//! last committed [`Checkpoint`]. It never commits that checkpoint itself: the engine stores
//! the batch's new checkpoint in the same repository transaction as the batch's effects, so a
//! crash leaves either all of a batch or none of it, and the adapter can always rewind.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::attrs::AttrMap;

/// What happened to an account on the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The account is new.
    Create,
    /// The account changed.
    Update,
    /// The account is gone.
    Delete,
    /// Created or updated; the resource cannot tell which.
    Upsert,
    /// Only in decision records: the decision of a reconcile (`idsync reconcile`, a
    /// scheduled reconcile), whatever the event's own op was. Events never carry it: the
    /// rules of a reconcile see the event's op (`create`, `update`, `delete`, `upsert`).
    Reconcile,
    /// Not a change on the resource: an operator decided about the account (`idsync link`,
    /// `unlink`, `work-items resolve`), with its attributes as last seen.
    Operator,
    /// Only in decision records: a lifecycle timer fired (a grace-period delete, a
    /// `valid_from` or `valid_to` date), decided again with the current rules and config.
    Timer,
}

impl Op {
    /// The lowercase name used in rules and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Upsert => "upsert",
            Op::Reconcile => "reconcile",
            Op::Operator => "operator",
            Op::Timer => "timer",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "create" => Op::Create,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "upsert" => Op::Upsert,
            "reconcile" => Op::Reconcile,
            "operator" => Op::Operator,
            "timer" => Op::Timer,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change on one account of one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The configured resource name.
    pub resource: String,
    /// The account's native key on the resource (CSV key, entryUUID, ...).
    pub key: String,
    /// What happened.
    pub op: Op,
    /// The account's attributes now (for a delete: the last known ones, possibly empty).
    pub attrs: AttrMap,
    /// The attributes before the change, when the resource or its snapshot knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AttrMap>,
    /// Where the change came from, for messages (e.g. `hr.csv:12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// An adapter's position on a resource, opaque to everything but that adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint(pub String);

/// Input the adapter could not turn into an event (e.g. a malformed CSV row).
/// It becomes a failed-event row; the rest of the batch proceeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The account key, when it could be read; its stored state is then kept as it was.
    pub key: Option<String>,
    /// Where (e.g. `hr.csv:12`).
    pub origin: String,
    /// Why, in words a user can act on.
    pub reason: String,
}

/// What one fetch found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Changes in order.
    pub events: Vec<ChangeEvent>,
    /// Input that could not become events.
    pub rejects: Vec<Reject>,
    /// Keys whose stored state must be kept although they are absent from `events`
    /// (rejected or ambiguous input); informational for the engine and records.
    pub held_keys: Vec<String>,
    /// The position after this batch, committed with it.
    pub checkpoint: Option<Checkpoint>,
    /// `rejects` are every reject of the source as read now (the first part of a pass that
    /// read the whole source): rejected input recorded earlier and not rejected again was
    /// fixed at the source, and its failed-event rows are cleared.
    pub rejects_complete: bool,
    /// The batch is a part of a reconcile ([`Adapter::begin_reconcile`]): its decisions are
    /// recorded with op [`Op::Reconcile`].
    pub reconcile: bool,
}

/// The result of asking an adapter for changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Changes to apply, with the checkpoint to commit with them.
    Batch(ChangeBatch),
    /// Nothing new after the checkpoint.
    Idle,
}

/// Account key -> content hash of its last seen attributes. Hashed with foldhash (seeded per
/// process): these maps hold every account of a resource, and SipHash was a large part of a
/// million-row diff.
pub type KeyHashes = HashMap<String, u64, foldhash::fast::RandomState>;

/// Read access to the accounts the repository last saw on a resource (the shadows),
/// so adapters that diff (flat files, full passes) can tell creates, updates and deletes.
/// `Sync`: an adapter may load the hashes on one thread while it reads on another.
pub trait KnownAccounts: Sync {
    /// Calls `each` with every known key of `resource` and the content hash of its last
    /// seen attributes, so the caller builds whatever map it needs without a copy.
    fn each_known_hash(
        &self,
        resource: &str,
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), String>;
    /// Every known key of `resource` with the content hash of its last seen attributes.
    fn known_hashes(&self, resource: &str) -> Result<KeyHashes, String> {
        let mut map = KeyHashes::default();
        self.each_known_hash(resource, &mut |key, hash| {
            map.insert(key.to_owned(), hash);
        })?;
        Ok(map)
    }
    /// The last seen attributes of one account.
    fn known_attrs(&self, resource: &str, key: &str) -> Result<Option<AttrMap>, String>;
    /// Calls `each` with those of `keys` that are known, and their content hashes: one
    /// lookup for a part of a stream, so the adapter's memory stays bounded by the part
    /// rather than by every known account. The default looks the keys up one at a time.
    fn known_hashes_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), String> {
        for key in keys {
            if let Some(attrs) = self.known_attrs(resource, key)? {
                each(key, attrs.content_hash());
            }
        }
        Ok(())
    }
    /// Calls `each` with those of `keys` that are known, and their last seen attributes:
    /// one lookup for a part of a pass (the previous attributes of its changes). The
    /// default looks the keys up one at a time.
    fn known_attrs_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, AttrMap),
    ) -> Result<(), String> {
        for key in keys {
            if let Some(attrs) = self.known_attrs(resource, key)? {
                each(key, attrs);
            }
        }
        Ok(())
    }
    /// A pass is about to visit many of the known accounts (a full diff, a full refresh):
    /// the store may start reading its data into memory in the background. A hint; the
    /// default does nothing.
    fn warm_up(&self) {}
    /// How many accounts of `resource` are known, when that is cheap to tell (`None`: unknown).
    /// Lets an adapter notice a snapshot that does not match its checkpoint.
    fn known_count(&self, _resource: &str) -> Result<Option<u64>, String> {
        Ok(None)
    }
}

/// Why an adapter could not fetch.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// May work later without a config change (server down, file being written).
    #[error("resource {resource}: {message}")]
    Transient {
        /// Resource name.
        resource: String,
        /// What happened.
        message: String,
    },
    /// Needs an operator (bad config, missing key column, changed header).
    #[error("resource {resource}: {message}")]
    Permanent {
        /// Resource name.
        resource: String,
        /// What happened.
        message: String,
    },
    /// The accidental-delete guard refused the pass before anything was applied; an
    /// operator may accept it for one run (`--accept-deletes`).
    #[error("resource {resource}: {refusal}. {advice}")]
    DeleteGuard {
        /// Resource name.
        resource: String,
        /// The deletes and the limit passed.
        refusal: crate::GuardRefusal,
        /// What the operator can do, naming the source (`If hr.csv is right, …`).
        advice: String,
    },
}

impl AdapterError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, AdapterError::Transient { .. })
    }
}

/// A source of change events for one resource.
pub trait Adapter: Send {
    /// The resource name from the config.
    fn resource(&self) -> &str;
    /// Changes strictly after `after`, the last committed checkpoint (`None`: never synced).
    /// Must not commit anything.
    fn next_batch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError>;
    /// The operator accepted, for this adapter's lifetime (one run), a pass that the
    /// accidental-delete guard would refuse. Adapters without a guard ignore it.
    fn accept_deletes(&mut self) {}
    /// Whether the last batch was only part of what is there (a large initial load, the
    /// next file of a folder): commit it, then fetch again.
    fn has_more(&self) -> bool {
        false
    }
    /// How many events the pass in hand hands out in all, parts already fetched included,
    /// when the adapter knows (a flat-file diff does; a directory stream does not): the
    /// total of a progress display across parts.
    fn planned(&self) -> Option<u64> {
        None
    }
    /// How many times, since it was created, the adapter found the source older than the
    /// committed checkpoint (a directory restored from a backup) and started over from
    /// scratch: the agent counts it in a metric.
    fn checkpoint_resets(&self) -> u64 {
        0
    }
    /// What wakes the runner for this adapter between passes. The default: only the
    /// resource's schedule (its poll interval or cron).
    fn wakeup(&self) -> Wakeup {
        Wakeup::Schedule
    }
    /// Makes the next fetches a **reconcile**: every account the resource holds now (or,
    /// with `keys`, only those accounts) handed out again, changed or not, so that the
    /// current rules and mappings decide each one again. Called between passes; what the
    /// adapter must then do:
    ///
    /// - [`Adapter::next_batch`] hands out the reconcile in parts, each a [`ChangeBatch`]
    ///   with `reconcile: true`, while [`Adapter::has_more`] says more parts follow. Every
    ///   account present on the resource is an event whether or not it changed, its op
    ///   classified against the known accounts as in a pass (`update` with the last seen
    ///   attributes as `previous` for a known account, `create` for an unknown one, `upsert`
    ///   where the adapter cannot tell); every known account absent from the resource is a
    ///   `delete`, behind the accidental-delete guard ([`Adapter::accept_deletes`] lifts it).
    ///   No shortcut for an unchanged source: a reconcile is never [`Fetch::Idle`] unless
    ///   the resource holds nothing and nothing is known.
    /// - Each part's checkpoint must be one a later ordinary pass can start from without
    ///   losing anything: the source's position as of the reconcile's read (for a flat
    ///   file, the file it read, marked unfinished until the last part; for a directory, the
    ///   cookie or high-water mark its full refresh returned, not the old one). A reconcile
    ///   interrupted between parts (a kill, a failed commit) is finished by calling this
    ///   again: the adapter resumes or starts over, either is safe.
    /// - With `keys`: only those accounts (present: `create`/`update`; absent but known:
    ///   `delete`; neither: no event), and the checkpoint stays what it was (adjusted only
    ///   in what it says about the accounts added or removed): a reconcile of some accounts
    ///   says nothing about the others.
    /// - After the last part has been handed out, or when a fetch fails, the adapter is
    ///   back to ordinary passes ([`Adapter::end_reconcile`] also ends it).
    ///
    /// The default refuses: the adapter cannot reconcile.
    fn begin_reconcile(&mut self, keys: Option<Vec<String>>) -> Result<(), AdapterError> {
        let _ = keys;
        Err(AdapterError::Permanent {
            resource: self.resource().to_owned(),
            message: "reconcile is not supported by this adapter".to_owned(),
        })
    }
    /// Abandons a reconcile begun by [`Adapter::begin_reconcile`] (the caller stopped
    /// between parts or a commit failed): the next fetch is an ordinary pass. The default
    /// does nothing.
    fn end_reconcile(&mut self) {}
}

/// What makes a resource's loop fetch again (beside the schedule, which always applies).
pub enum Wakeup {
    /// Only the schedule: the poll interval or the cron expression.
    Schedule,
    /// The adapter waits for changes itself inside [`Adapter::next_batch`] (a persistent
    /// search returns [`Fetch::Idle`] after a short quiet time): fetch again at once.
    Stream,
    /// This waiter reports changes of the adapter's own inputs (its feed file, folder or
    /// marker file, and nothing else); the schedule stays as a safety net.
    Watch(Box<dyn ChangeWaiter>),
}

impl std::fmt::Debug for Wakeup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wakeup::Schedule => "Schedule",
            Wakeup::Stream => "Stream",
            Wakeup::Watch(_) => "Watch",
        })
    }
}

/// Waits for a change of an adapter's inputs.
pub trait ChangeWaiter: Send {
    /// Blocks up to `timeout`; whether an input changed meanwhile.
    fn wait(&mut self, timeout: std::time::Duration) -> bool;
}
