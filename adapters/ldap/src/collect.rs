//! Building one batch: turning "this entry is present with these attributes" and "this entry
//! is gone" into create/update/delete events against the committed shadows, and finding
//! deletes by absence after a full pass, behind the accidental-delete guard.
//!
//! The committed shadows ([`KnownAccounts`]) are the truth about what the repository has
//! seen; an overlay tracks what earlier events of the same batch did to a key, so an add and
//! a modify of one entry in one batch become a create and an update. An entry whose content
//! equals its shadow produces no event: a change delivered twice (after a reconnect, or a
//! refresh from scratch) is applied once.
//!
//! Memory: a streamed refresh (module `refresh`) looks the shadows of each part up in one
//! query ([`Collector::prefetch`]) and marks keys present in a [`Present`] set of 16 bytes
//! per entryUUID that it carries from part to part; deletes by absence read the committed
//! keys as a stream. Nothing the collector holds grows with the directory but that set.

use foldhash::{HashMap, HashMapExt, HashSet};

use idsync_core::{AttrMap, ChangeEvent, DeleteGuard, KeyHashes, KnownAccounts, Op};

use crate::error::LdapError;

/// Single shadow lookups before a collector loads every shadow hash at once.
const SINGLE_LOOKUPS: usize = 512;

/// One batch in the making.
pub(crate) struct Collector<'k> {
    resource: String,
    known: &'k dyn KnownAccounts,
    /// Key → content hash of every committed shadow, once loaded (full passes, or after
    /// many single lookups); until then single keys are looked up and cached in `looked_up`.
    hashes: Option<KeyHashes>,
    /// Single lookups so far: key → committed shadow (`None`: not known).
    looked_up: HashMap<String, Option<AttrMap>>,
    /// Key → state after the events collected so far (`None`: deleted in this batch).
    overlay: HashMap<String, Option<usize>>,
    /// Committed hashes of the keys looked up ahead by [`Collector::prefetch`] (`None`: not
    /// known).
    prefetched: HashMap<String, Option<u64>>,
    /// A streamed part: never load every committed hash, whatever the number of lookups.
    bounded: bool,
    /// A reconcile: an entry equal to its shadow is an event too.
    force: bool,
    /// A reconcile of some accounts: events only for these keys.
    only: Option<std::sync::Arc<HashSet<String>>>,
    /// No committed checkpoint: unknown accounts are upserts.
    fresh: bool,
    /// Keys seen present in the current full pass.
    present: Present,
    origin: String,
    /// Deletes by absence were applied in this batch (once per pass).
    absence_done: bool,
    pub events: Vec<ChangeEvent>,
}

impl<'k> Collector<'k> {
    pub fn new(
        resource: &str,
        known: &'k dyn KnownAccounts,
        fresh: bool,
        origin: &str,
    ) -> Result<Collector<'k>, LdapError> {
        Ok(Collector {
            resource: resource.to_owned(),
            known,
            hashes: None,
            looked_up: HashMap::new(),
            prefetched: HashMap::new(),
            bounded: false,
            force: false,
            only: None,
            overlay: HashMap::new(),
            fresh,
            present: Present::default(),
            origin: origin.to_owned(),
            absence_done: false,
            events: Vec::new(),
        })
    }

    /// A part of a streamed refresh: the keys seen present so far in the refresh are
    /// `present`; shadows are only looked up part by part (see [`Collector::prefetch`]).
    pub fn streamed(mut self, present: Present) -> Collector<'k> {
        self.present = present;
        self.bounded = true;
        self
    }

    /// A reconcile: every entry read is an event, changed or not (an unchanged known one
    /// an `update` with itself as `previous`); with `only`, events only for those keys.
    pub fn reconciling(mut self, only: Option<std::sync::Arc<HashSet<String>>>) -> Collector<'k> {
        self.force = true;
        self.only = only;
        self
    }

    /// Whether this batch hands out events for `key` (every key, but in a reconcile of some
    /// accounts).
    fn wanted(&self, key: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(key))
    }

    /// The keys seen present so far, for the next part of the refresh.
    pub fn take_present(&mut self) -> Present {
        std::mem::take(&mut self.present)
    }

    /// Looks up the committed hashes of `keys` in one go, ahead of the events that will
    /// need them.
    pub fn prefetch(&mut self, keys: &[&str]) -> Result<(), LdapError> {
        let wanted: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !self.prefetched.contains_key(*k) && !self.overlay.contains_key(*k))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut found: HashMap<String, u64> = HashMap::with_capacity(wanted.len());
        self.known
            .known_hashes_of(&self.resource, &wanted, &mut |k, h| {
                found.insert(k.to_owned(), h);
            })
            .map_err(LdapError::Known)?;
        for k in wanted {
            let hash = found.get(k).copied();
            self.prefetched.insert(k.to_owned(), hash);
        }
        Ok(())
    }

    /// Loads every committed shadow hash (cheaper than single lookups once many keys are
    /// involved; not for streamed parts).
    fn load_all(&mut self) -> Result<&KeyHashes, LdapError> {
        if self.hashes.is_none() {
            // A full pass visits every known account: let the store read itself ahead.
            self.known.warm_up();
            let all = self
                .known
                .known_hashes(&self.resource)
                .map_err(LdapError::Known)?;
            self.hashes = Some(all);
        }
        Ok(self.hashes.get_or_insert_with(KeyHashes::default))
    }

    /// The committed content hash of `key`, if known.
    fn committed_hash(&mut self, key: &str) -> Result<Option<u64>, LdapError> {
        if let Some(h) = self.prefetched.get(key) {
            return Ok(*h);
        }
        if !self.bounded && self.hashes.is_none() && self.looked_up.len() >= SINGLE_LOOKUPS {
            self.load_all()?;
        }
        if let Some(all) = &self.hashes {
            return Ok(all.get(key).copied());
        }
        if !self.looked_up.contains_key(key) {
            let attrs = self
                .known
                .known_attrs(&self.resource, key)
                .map_err(LdapError::Known)?;
            self.looked_up.insert(key.to_owned(), attrs);
        }
        Ok(self
            .looked_up
            .get(key)
            .and_then(|a| a.as_ref().map(AttrMap::content_hash)))
    }

    /// The attributes of `key` as of the events so far, if it exists.
    fn current(&mut self, key: &str) -> Result<Option<AttrMap>, LdapError> {
        match self.overlay.get(key) {
            Some(Some(i)) => Ok(Some(self.events[*i].attrs.clone())),
            Some(None) => Ok(None),
            None => {
                if let Some(Some(a)) = self.looked_up.get(key) {
                    return Ok(Some(a.clone()));
                }
                if self.committed_hash(key)?.is_none() {
                    return Ok(None);
                }
                self.known
                    .known_attrs(&self.resource, key)
                    .map_err(LdapError::Known)
            }
        }
    }

    fn current_hash(&mut self, key: &str) -> Result<Option<u64>, LdapError> {
        match self.overlay.get(key) {
            Some(Some(i)) => Ok(Some(self.events[*i].attrs.content_hash())),
            Some(None) => Ok(None),
            None => self.committed_hash(key),
        }
    }

    /// Marks `key` present in the current full pass without content (RFC 4533 present).
    pub fn mark_present(&mut self, key: &str) {
        self.present.insert(key);
    }

    /// The entry `key` exists with `attrs`.
    pub fn put(&mut self, key: String, attrs: AttrMap) -> Result<(), LdapError> {
        self.present.insert(&key);
        if !self.wanted(&key) {
            return Ok(());
        }
        let before = self.current_hash(&key)?;
        if before == Some(attrs.content_hash()) && !self.force {
            return Ok(());
        }
        let (op, previous) = match before {
            Some(_) => (Op::Update, self.current(&key)?),
            None if self.fresh && !self.overlay.contains_key(&key) => (Op::Upsert, None),
            None => (Op::Create, None),
        };
        self.overlay.insert(key.clone(), Some(self.events.len()));
        self.events.push(ChangeEvent {
            resource: self.resource.clone(),
            key,
            op,
            attrs,
            previous,
            origin: Some(self.origin.clone()),
        });
        Ok(())
    }

    /// The entry `key` is gone. Unknown keys are ignored (already deleted, or never seen).
    pub fn delete(&mut self, key: String) -> Result<(), LdapError> {
        if !self.wanted(&key) {
            return Ok(());
        }
        let Some(last) = self.current(&key)? else {
            return Ok(());
        };
        self.overlay.insert(key.clone(), None);
        self.events.push(ChangeEvent {
            resource: self.resource.clone(),
            key,
            op: Op::Delete,
            attrs: last.clone(),
            previous: Some(last),
            origin: Some(self.origin.clone()),
        });
        Ok(())
    }

    /// Ends a full pass: every account that exists but was not seen present is deleted,
    /// unless that is more than the guard allows. Only the first call of a batch acts.
    /// The committed keys are read as a stream, not loaded.
    pub fn delete_absent(&mut self, guard: &DeleteGuard, accepted: bool) -> Result<(), LdapError> {
        if self.absence_done {
            return Ok(());
        }
        self.absence_done = true;
        self.present.seal();
        let mut absent: Vec<String> = Vec::new();
        let mut known: u64 = 0;
        {
            let (present, overlay, only) = (&self.present, &self.overlay, &self.only);
            self.known
                .each_known_hash(&self.resource, &mut |key, _| {
                    known += 1;
                    // Deleted earlier in this batch: already an event.
                    let gone = matches!(overlay.get(key), Some(None));
                    let wanted = only.as_ref().is_none_or(|o| o.contains(key));
                    if wanted && !gone && !present.contains(key) {
                        absent.push(key.to_owned());
                    }
                })
                .map_err(LdapError::Known)?;
        }
        absent.sort();
        absent.dedup();
        guard
            .check(absent.len() as u64, known, None, accepted)
            .map_err(LdapError::DeleteGuard)?;
        for k in absent {
            self.delete(k)?;
        }
        self.present.clear();
        Ok(())
    }
}

/// The keys seen present in a full pass. An entryUUID (every key of a sync search) takes
/// 16 bytes; other keys (poll mode reads entryUUID too; kept for safety) a string.
#[derive(Debug, Default)]
pub(crate) struct Present {
    uuids: Vec<u128>,
    /// `uuids` is sorted and without repeats.
    sealed: bool,
    other: HashSet<String>,
}

impl Present {
    /// Notes `key` as present.
    pub fn insert(&mut self, key: &str) {
        match parse_uuid(key) {
            Some(u) => {
                self.uuids.push(u);
                self.sealed = false;
            }
            None => {
                self.other.insert(key.to_owned());
            }
        }
    }

    /// Sorts the set for lookups; call after the last insert of a pass.
    pub fn seal(&mut self) {
        if !self.sealed {
            self.uuids.sort_unstable();
            self.uuids.dedup();
            self.uuids.shrink_to_fit();
            self.sealed = true;
        }
    }

    /// Whether `key` was noted (after [`Present::seal`]).
    pub fn contains(&self, key: &str) -> bool {
        match parse_uuid(key) {
            Some(u) if self.sealed => self.uuids.binary_search(&u).is_ok(),
            Some(u) => self.uuids.contains(&u),
            None => self.other.contains(key),
        }
    }

    /// Forgets every key.
    pub fn clear(&mut self) {
        *self = Present::default();
    }
}

/// The 128 bits of a UUID in its canonical text form (`8-4-4-4-12` hex digits, either
/// case); `None` for anything else.
fn parse_uuid(text: &str) -> Option<u128> {
    let b = text.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let mut v: u128 = 0;
    for (i, c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        let d = (*c as char).to_digit(16)?;
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Known(HashMap<String, AttrMap>);
    impl KnownAccounts for Known {
        fn each_known_hash(&self, _: &str, each: &mut dyn FnMut(&str, u64)) -> Result<(), String> {
            for (k, v) in &self.0 {
                each(k, v.content_hash());
            }
            Ok(())
        }
        fn known_attrs(&self, _: &str, key: &str) -> Result<Option<AttrMap>, String> {
            Ok(self.0.get(key).cloned())
        }
    }

    fn a(cn: &str) -> AttrMap {
        [("cn", cn)].into_iter().collect()
    }

    fn known(n: usize) -> Known {
        Known(
            (0..n)
                .map(|i| (format!("k{i}"), a(&format!("c{i}"))))
                .collect(),
        )
    }

    #[test]
    fn ops_against_shadows_and_overlay() {
        let k = known(2);
        let mut c = Collector::new("r", &k, false, "o").unwrap();
        c.put("k0".into(), a("c0")).unwrap(); // unchanged: nothing
        c.put("k1".into(), a("new")).unwrap(); // update with previous
        c.put("n".into(), a("x")).unwrap(); // create
        c.put("n".into(), a("y")).unwrap(); // update of the in-batch create
        c.delete("n".into()).unwrap();
        c.delete("nobody".into()).unwrap(); // ignored
        let ops: Vec<_> = c.events.iter().map(|e| (e.key.as_str(), e.op)).collect();
        assert_eq!(
            ops,
            [
                ("k1", Op::Update),
                ("n", Op::Create),
                ("n", Op::Update),
                ("n", Op::Delete)
            ]
        );
        assert_eq!(c.events[0].previous, Some(a("c1")));
        assert_eq!(c.events[3].attrs, a("y"));
    }

    #[test]
    fn absence_deletes_and_guard() {
        let k = known(20);
        let mut c = Collector::new("r", &k, false, "o").unwrap();
        for i in 0..15 {
            c.mark_present(&format!("k{i}"));
        }
        let guard = DeleteGuard {
            max_delete_ratio: 0.5,
            ..DeleteGuard::default()
        };
        c.delete_absent(&guard, false).unwrap();
        assert_eq!(c.events.len(), 5);
        assert!(c.events.iter().all(|e| e.op == Op::Delete));

        let mut c = Collector::new("r", &k, false, "o").unwrap();
        c.mark_present("k0");
        let e = c.delete_absent(&guard, false).unwrap_err();
        assert!(e.to_string().contains("delete 19 of 20"), "{e}");
        assert!(c.events.is_empty());
        // Accepted by the operator for this run.
        let mut c = Collector::new("r", &k, false, "o").unwrap();
        c.mark_present("k0");
        c.delete_absent(&guard, true).unwrap();
        assert_eq!(c.events.len(), 19);
    }
}
