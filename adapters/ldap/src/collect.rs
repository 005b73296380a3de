//! Building one batch: turning "this entry is present with these attributes" and "this entry
//! is gone" into create/update/delete events against the committed shadows, and finding
//! deletes by absence after a full pass, behind the accidental-delete guard.
//!
//! The committed shadows ([`KnownAccounts`]) are the truth about what the repository has
//! seen; an overlay tracks what earlier events of the same batch did to a key, so an add and
//! a modify of one entry in one batch become a create and an update. An entry whose content
//! equals its shadow produces no event: a change delivered twice (after a reconnect, or a
//! refresh from scratch) is applied once.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

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
    /// No committed checkpoint: unknown accounts are upserts.
    fresh: bool,
    /// Keys seen present in the current full pass.
    present: HashSet<String>,
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
            overlay: HashMap::new(),
            fresh,
            present: HashSet::new(),
            origin: origin.to_owned(),
            absence_done: false,
            events: Vec::new(),
        })
    }

    /// Loads every committed shadow hash (needed for deletes by absence, and cheaper than
    /// single lookups once many keys are involved).
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
        if self.hashes.is_none() && self.looked_up.len() >= SINGLE_LOOKUPS {
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
        self.present.insert(key.to_owned());
    }

    /// The entry `key` exists with `attrs`.
    pub fn put(&mut self, key: String, attrs: AttrMap) -> Result<(), LdapError> {
        self.present.insert(key.clone());
        let before = self.current_hash(&key)?;
        if before == Some(attrs.content_hash()) {
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
        self.present.remove(&key);
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
    pub fn delete_absent(&mut self, guard: &DeleteGuard, accepted: bool) -> Result<(), LdapError> {
        if self.absence_done {
            return Ok(());
        }
        self.absence_done = true;
        let mut existing: HashSet<String> = self.load_all()?.keys().cloned().collect();
        for (k, v) in &self.overlay {
            if v.is_some() {
                existing.insert(k.clone());
            } else {
                existing.remove(k);
            }
        }
        let mut absent: Vec<String> = existing
            .into_iter()
            .filter(|k| !self.present.contains(k))
            .collect();
        absent.sort();
        let known = self.load_all()?.len();
        guard
            .check(absent.len() as u64, known as u64, None, accepted)
            .map_err(LdapError::DeleteGuard)?;
        for k in absent {
            self.delete(k)?;
        }
        self.present.clear();
        Ok(())
    }
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
