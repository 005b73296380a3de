//! The known accounts of a resource while a file is diffed: every committed key → content
//! hash pair, and the first line the file shows each key on.
//!
//! A million keys as a `HashMap<Box<str>, _>` cost a million allocations to build (on the
//! loader thread), a million frees from the other thread afterwards, and two cache misses
//! per lookup (the bucket, then the boxed key). Here the keys sit one after the other in a
//! single arena, in the order the repository lists them, and the hash table holds where each
//! is with its hash and line: no allocation per key, and when the file is in the same order as the repository
//! the key comparisons walk the arena front to back.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// What is known about one key: its committed hash, and where the file has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KnownKey {
    /// The content hash of the account's last committed attributes.
    pub hash: u64,
    /// The first line the file shows the key on; 0 while it has not (lines are 1-based).
    pub first: u64,
}

/// One known key: where its text is in the arena, and what is known about it. Kept in
/// the table itself, so a lookup touches the table and the key's text, nothing else.
#[derive(Clone, Copy)]
struct Slot {
    start: usize,
    len: usize,
    known: KnownKey,
}

/// The known keys, looked up by text without an allocation per key.
#[derive(Default)]
pub(crate) struct KnownKeys {
    keys: String,
    table: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
}

impl KnownKeys {
    /// Room for `capacity` keys (the repository's count, when it knows it).
    pub fn with_capacity(capacity: usize) -> KnownKeys {
        KnownKeys {
            keys: String::with_capacity(capacity.saturating_mul(12)),
            table: HashTable::with_capacity(capacity),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    fn text<'k>(keys: &'k str, slot: &Slot) -> &'k str {
        keys.get(slot.start..slot.start + slot.len)
            .unwrap_or_default()
    }

    /// Adds `key` with its committed `hash`, not yet seen in the file. A key added twice
    /// keeps the later hash (the repository lists each key once).
    pub fn insert(&mut self, key: &str, hash: u64) {
        let known = KnownKey { hash, first: 0 };
        let (keys, hasher) = (&self.keys, &self.hasher);
        let entry = self.table.entry(
            hasher.hash_one(key),
            |s| Self::text(keys, s) == key,
            |s| hasher.hash_one(Self::text(keys, s)),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut o) => o.get_mut().known = known,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Slot {
                    start: self.keys.len(),
                    len: key.len(),
                    known,
                });
                self.keys.push_str(key);
            }
        }
    }

    /// What is known about `key`, to update in place.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut KnownKey> {
        let keys = &self.keys;
        self.table
            .find_mut(self.hasher.hash_one(key), |s| Self::text(keys, s) == key)
            .map(|s| &mut s.known)
    }

    /// Every known key with what is known about it, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, KnownKey)> {
        self.table
            .iter()
            .map(|s| (Self::text(&self.keys, s), s.known))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_text_and_updated_in_place() {
        let mut known = KnownKeys::with_capacity(2);
        known.insert("E1", 11);
        known.insert("E10", 110);
        known.insert("", 0);
        assert_eq!(known.len(), 3);
        assert_eq!(known.get_mut("E1").map(|k| k.hash), Some(11));
        assert_eq!(known.get_mut("E10").map(|k| k.hash), Some(110));
        assert_eq!(known.get_mut("").map(|k| k.hash), Some(0));
        assert!(known.get_mut("E100").is_none());
        assert!(known.get_mut("E").is_none());
        if let Some(k) = known.get_mut("E10") {
            k.first = 7;
        }
        known.insert("E1", 12);
        let mut all: Vec<_> = known.iter().map(|(k, v)| (k.to_owned(), v)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let seven = KnownKey {
            hash: 110,
            first: 7,
        };
        assert_eq!(
            all,
            vec![
                (String::new(), KnownKey { hash: 0, first: 0 }),
                ("E1".to_owned(), KnownKey { hash: 12, first: 0 }),
                ("E10".to_owned(), seven),
            ]
        );
    }

    #[test]
    fn many_keys_survive_the_table_growing() {
        let mut known = KnownKeys::with_capacity(0);
        for i in 0..10_000u64 {
            known.insert(&format!("key-{i}"), i);
        }
        for i in (0..10_000u64).rev() {
            assert_eq!(known.get_mut(&format!("key-{i}")).map(|k| k.hash), Some(i));
        }
        assert!(known.get_mut("key-10000").is_none());
    }
}
