//! The known accounts of a resource while a file is diffed: every committed key → content
//! hash pair, and the first line the file shows each key on.
//!
//! A million keys as a `HashMap<Box<str>, _>` cost a million allocations to build (on the
//! loader thread), a million frees from the other thread afterwards, and two cache misses
//! per lookup (the bucket, then the boxed key). Here the keys sit one after the other in a
//! single arena, in the order the repository lists them (its key order), and a hash table
//! holds their indexes: no allocation per key. A lookup first tries the key after the one
//! found last, so a file in the repository's key order (a feed sorted by its key) walks
//! the arena front to back without hashing; any other order takes one table lookup.

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

/// One known key, in the order the keys were added: where its text ends in the arena (it
/// starts where the previous one ended), and what is known about it.
#[derive(Clone, Copy)]
struct Slot {
    end: usize,
    known: KnownKey,
}

/// The known keys, looked up by text without an allocation per key.
#[derive(Default)]
pub(crate) struct KnownKeys {
    keys: String,
    /// In the order added (the repository's key order).
    slots: Vec<Slot>,
    /// Indexes into `slots`, by the hash of the key's text.
    table: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// The slot after the one found last: a file in the repository's key order finds
    /// each key here, without hashing it or touching the table.
    cursor: usize,
}

impl KnownKeys {
    /// Room for `capacity` keys (the repository's count, when it knows it).
    pub fn with_capacity(capacity: usize) -> KnownKeys {
        KnownKeys {
            keys: String::with_capacity(capacity.saturating_mul(12)),
            slots: Vec::with_capacity(capacity),
            table: HashTable::with_capacity(capacity),
            hasher: foldhash::fast::RandomState::default(),
            cursor: 0,
        }
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn key_at<'k>(keys: &'k str, slots: &[Slot], index: usize) -> &'k str {
        let start = index
            .checked_sub(1)
            .and_then(|prev| slots.get(prev))
            .map_or(0, |s| s.end);
        let end = slots.get(index).map_or(start, |s| s.end);
        keys.get(start..end).unwrap_or_default()
    }

    /// Adds `key` with its committed `hash`, not yet seen in the file. A key added twice
    /// keeps the later hash (the repository lists each key once).
    pub fn insert(&mut self, key: &str, hash: u64) {
        let known = KnownKey { hash, first: 0 };
        let Ok(index) = u32::try_from(self.slots.len()) else {
            // More than four billion keys: not a file this adapter can diff in memory
            // anyway; the diff's count check reports the mismatch.
            return;
        };
        let (keys, slots, hasher) = (&self.keys, &self.slots, &self.hasher);
        let entry = self.table.entry(
            hasher.hash_one(key),
            |&i| Self::key_at(keys, slots, i as usize) == key,
            |&i| hasher.hash_one(Self::key_at(keys, slots, i as usize)),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(o) => {
                let at = *o.get() as usize;
                if let Some(slot) = self.slots.get_mut(at) {
                    slot.known = known;
                }
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(index);
                self.keys.push_str(key);
                self.slots.push(Slot {
                    end: self.keys.len(),
                    known,
                });
            }
        }
    }

    /// What is known about `key`, to update in place.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut KnownKey> {
        let index = if self.cursor < self.slots.len()
            && Self::key_at(&self.keys, &self.slots, self.cursor) == key
        {
            self.cursor
        } else {
            let (keys, slots) = (&self.keys, &self.slots);
            *self.table.find(self.hasher.hash_one(key), |&i| {
                Self::key_at(keys, slots, i as usize) == key
            })? as usize
        };
        self.cursor = index + 1;
        self.slots.get_mut(index).map(|s| &mut s.known)
    }

    /// Every known key with what is known about it, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, KnownKey)> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| (Self::key_at(&self.keys, &self.slots, i), s.known))
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
    fn keys_in_any_order_are_found_and_only_known_ones() {
        let mut known = KnownKeys::with_capacity(4);
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            known.insert(k, i as u64);
        }
        // In order (the cursor), out of order (the table), a repeat, unknown keys (also
        // the empty key once the cursor is past the end).
        for (key, want) in [
            ("a", Some(0)),
            ("b", Some(1)),
            ("d", Some(3)),
            ("", None),
            ("c", Some(2)),
            ("d", Some(3)),
            ("a", Some(0)),
            ("e", None),
            ("b", Some(1)),
        ] {
            assert_eq!(known.get_mut(key).map(|k| k.hash), want, "{key:?}");
        }
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
