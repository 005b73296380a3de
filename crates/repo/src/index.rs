//! The correlation index: `identity_values(attr, value, identity_id)` holds the text values
//! of the identity attributes that correlation queries use, in the normalised form declared
//! for each attribute, so that [`Repo::find`] and the fuzzy candidates' blocks
//! ([`Repo::block`]) are index lookups, never scans of the identities.
//!
//! - An attribute is indexed the first time a query inside a transaction asks for it
//!   (listed in `indexed_attributes` from then on); creation, checkin and deletion keep its
//!   rows current ([`reindex_values`]).
//! - The normalisation an attribute's rows were built with is kept beside them
//!   (`index_normalisations`; no row: exact values, as every index before schema version 10).
//!   The rows are always maintained with that stored normalisation. A query whose declared
//!   normalisation ([`Repo::declare_normalisations`]) differs rebuilds the attribute's rows
//!   first (one scan of the identities, in the query's transaction), so a changed declaration
//!   takes effect at the first query that uses the attribute, and a rolled-back batch leaves
//!   the old index as it was.
//! - Outside a transaction (a read-only command) nothing is built: a query that has no
//!   usable index scans, with the declared normalisation, correct if slower.

use std::sync::Arc;

use crate::db::{Arg, Conn, ToArg};
use idsync_core::{AttrMap, Conditions, Identity, Normalisation, Normalisations, Value};

use crate::db::Predicted;
use crate::error::{Context, RepoError, from_json};
use crate::merge::{Kind, SetWise, entity};
use crate::speculation::Known;
use crate::{Repo, args, now};

/// A condition as [`Repo::find`] compares it: attribute folded, its declared
/// normalisation, value normalised.
type Compared = (String, Normalisation, String);

/// An indexed attribute (lower-cased) and the normalisation its rows hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Indexed {
    pub attr: String,
    pub normalisation: Normalisation,
}

/// The identities of one fuzzy-correlation block ([`Repo::block`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Block {
    /// The normalised value (or prefix) the block was looked up by.
    pub key: String,
    /// The identities whose indexed value equals the key (or starts with it), without their
    /// accounts, at most the limit asked for, by value then creation order.
    pub identities: Vec<Identity>,
    /// Whether the block holds more identities than the limit (the rest were not read).
    pub truncated: bool,
}

/// Which identities form a block ([`Repo::block`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockQuery<'a> {
    /// The identity attribute (any case).
    pub attribute: &'a str,
    /// The value, as the account gives it: normalised here as declared for the attribute.
    pub value: &'a str,
    /// Only the first this many characters of the normalised value must agree; `None`: the
    /// whole value.
    pub prefix: Option<usize>,
    /// The most identities to read.
    pub limit: usize,
}

impl Repo {
    /// Declares how each identity attribute's values compare in correlation queries (from
    /// the config; an attribute not listed compares exactly). Takes effect for the queries
    /// that follow; an index built with another normalisation is rebuilt by the first
    /// query inside a transaction that uses it (module doc).
    pub fn declare_normalisations(&self, declared: Normalisations) -> Result<(), RepoError> {
        *self.declared.lock().map_err(|_| RepoError::Poisoned)? = Arc::new(declared);
        Ok(())
    }

    /// The declared normalisation of identity attribute `attribute` (any case).
    pub fn normalisation(&self, attribute: &str) -> Result<Normalisation, RepoError> {
        Ok(self.declared()?.of(attribute))
    }

    fn declared(&self) -> Result<Arc<Normalisations>, RepoError> {
        Ok(self
            .declared
            .lock()
            .map_err(|_| RepoError::Poisoned)?
            .clone())
    }

    /// Names of the identities whose attributes match every condition: attribute names
    /// compare case-insensitively, values as declared for their attribute (exactly unless
    /// a normalisation is declared: then both sides in normalised form), and a
    /// multi-valued attribute matches if any of its values does. Sorted by name. Answered
    /// from the `identity_values` index. No condition, or a binary value, is an error.
    pub fn find(&self, conds: &Conditions) -> Result<Vec<String>, RepoError> {
        let Some(pairs) = self.compared(conds)? else {
            return Ok(Vec::new());
        };
        let conn = self.lock()?;
        for (folded, n, _) in &pairs {
            if !self.usable_index(&conn, folded, *n)? {
                // No transaction to build the index in (a read-only command): answer by
                // scanning, correct if slower.
                return scan_find(&conn, &pairs);
            }
        }
        if let Some(k) = self.known()?.as_ref()
            && let Some(names) = find_known(k, &pairs)
        {
            return Ok(names);
        }
        let sql = find_sql(pairs.len());
        let args: Vec<Arg<'_>> = pairs
            .iter()
            .flat_map(|(a, _, v)| [a.to_arg(), v.to_arg()])
            .collect();
        let names = conn
            .query_map(&sql, &args, |r| r.get::<String>(0))
            .ctx("searching identities")?;
        Ok(names)
    }

    /// The conditions of `conds` as [`Repo::find`] compares them. `None`: a value
    /// normalises to nothing (a missing value, which matches nothing). No condition, or a binary value, is an error.
    fn compared(&self, conds: &Conditions) -> Result<Option<Vec<Compared>>, RepoError> {
        if conds.0.is_empty() {
            return Err(RepoError::EmptyQuery);
        }
        let declared = self.declared()?;
        let mut pairs = Vec::with_capacity(conds.0.len());
        for (attr, value) in &conds.0 {
            let Value::Text(text) = value else {
                return Err(RepoError::BinaryCondition { attr: attr.clone() });
            };
            let folded = attr.to_lowercase();
            let n = declared.of(&folded);
            let normalised = n.apply(text).into_owned();
            if normalised.is_empty() && !n.is_exact() {
                return Ok(None);
            }
            pairs.push((folded, n, normalised));
        }
        Ok(Some(pairs))
    }

    /// Reads ahead, for a speculating batch (module `speculation`), what [`Repo::find`]
    /// will answer for the conditions of `queries`: the identities of every (attribute,
    /// value) pair, in one query per thousand pairs. Outside speculation it does nothing;
    /// a value `find` would refuse or answer without the index is left to `find`.
    pub fn prefetch_find(&self, queries: &[Conditions]) -> Result<(), RepoError> {
        let conn = self.lock()?;
        if self.known()?.is_none() {
            return Ok(());
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for q in queries {
            // What `find` refuses or answers as nothing is left to it.
            let Ok(Some(compared)) = self.compared(q) else {
                continue;
            };
            for (folded, n, normalised) in compared {
                if self.usable_index(&conn, &folded, n)? {
                    let pair = (folded, normalised);
                    if seen.insert(pair.clone()) {
                        pairs.push(pair);
                    }
                }
            }
        }
        let mut guard = self.known()?;
        let Some(known) = guard.as_mut() else {
            return Ok(());
        };
        pairs.retain(|p| !known.postings.contains_key(p));
        for chunk in pairs.chunks(1000) {
            let attrs: Vec<&str> = chunk.iter().map(|(a, _)| a.as_str()).collect();
            let values: Vec<&str> = chunk.iter().map(|(_, v)| v.as_str()).collect();
            for pair in chunk {
                known.postings.insert(pair.clone(), Vec::new());
            }
            let reading = || "reading ahead the identities correlation will find".to_owned();
            conn.each(
                "SELECT v.attr, v.value, v.identity_id, i.name \
                 FROM identity_values v JOIN identities i ON i.id = v.identity_id \
                 WHERE (v.attr, v.value) IN (SELECT * FROM unnest(?1::text[], ?2::text[]))",
                &[Arg::Texts(&attrs), Arg::Texts(&values)],
                &reading,
                |r| {
                    let pair = (
                        r.get::<String>(0).with_ctx(reading)?,
                        r.get::<String>(1).with_ctx(reading)?,
                    );
                    let entry = (
                        r.get::<i64>(2).with_ctx(reading)?,
                        r.get::<String>(3).with_ctx(reading)?,
                    );
                    if let Some(list) = known.postings.get_mut(&pair) {
                        list.push(entry);
                    }
                    Ok(())
                },
            )?;
        }
        for list in known.postings.values_mut() {
            list.sort_unstable_by_key(|(id, _)| *id);
        }
        // Which of the identities found have pending timers, in one query: a link to one
        // of the others then cancels nothing without asking (`Repo::cancel_timer`).
        let found: Vec<String> = known
            .postings
            .values()
            .flatten()
            .map(|(_, name)| name)
            .filter(|name| !known.timers_read.contains(*name))
            .cloned()
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect();
        if !found.is_empty() {
            let names: Vec<&str> = found.iter().map(String::as_str).collect();
            let reading =
                || "reading ahead the timers of the identities correlation will find".to_owned();
            conn.each(
                "SELECT DISTINCT identity FROM timers WHERE identity = ANY(?1)",
                &[Arg::Texts(&names)],
                &reading,
                |r| {
                    known
                        .identities_timed
                        .insert(r.get::<String>(0).with_ctx(reading)?);
                    Ok(())
                },
            )?;
            known.timers_read.extend(found);
        }
        Ok(())
    }

    /// The identities whose attribute `q.attribute`, normalised as declared, equals the
    /// normalised `q.value` (or, with `q.prefix`, starts with its first characters): at most
    /// `q.limit` of them, read through the index (a range of it for a prefix), never a
    /// scan of the identities inside a transaction. An empty key (the value normalises to
    /// nothing) is an empty block.
    pub fn block(&self, q: &BlockQuery<'_>) -> Result<Block, RepoError> {
        let folded = q.attribute.to_lowercase();
        let n = self.declared()?.of(&folded);
        let mut key = n.apply(q.value).into_owned();
        if let Some(len) = q.prefix {
            key = key.chars().take(len).collect();
        }
        if key.is_empty() || q.limit == 0 {
            return Ok(Block {
                key,
                ..Block::default()
            });
        }
        let conn = self.lock()?;
        let limit = i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = if !self.usable_index(&conn, &folded, n)? {
            scan_block(&conn, &folded, n, &key, q.prefix.is_some(), q.limit + 1)?
        } else {
            let end = q.prefix.and_then(|_| prefix_end(&key));
            let sql = block_sql(q.prefix.is_some(), end.is_some());
            let mut args: Vec<Arg<'_>> = vec![folded.to_arg(), key.to_arg()];
            if let Some(end) = &end {
                args.push(end.to_arg());
            }
            args.push(limit.to_arg());
            conn.query_map(&sql, &args, |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<i64>(1)?,
                    r.get::<bool>(2)?,
                    r.get::<String>(3)?,
                ))
            })
            .with_ctx(|| format!("reading the block of {folded} for fuzzy candidates"))?
        };
        drop(conn);
        let truncated = rows.len() > q.limit;
        let mut identities: Vec<Identity> = Vec::with_capacity(rows.len().min(q.limit));
        // A multi-valued attribute may put one identity in a prefix block twice.
        let mut seen = std::collections::HashSet::new();
        for (name, version, disabled, json) in rows.into_iter().take(q.limit) {
            if q.prefix.is_some() && !seen.insert(name.clone()) {
                continue;
            }
            let attrs = from_json(&json, || format!("attributes of identity {name}"))?;
            identities.push(Identity {
                name,
                version,
                disabled,
                attrs,
                accounts: Vec::new(),
            });
        }
        Ok(Block {
            key,
            identities,
            truncated,
        })
    }

    /// Whether the index of `folded` holds its values normalised as `declared`, building
    /// (or rebuilding, after a change of the declaration) it when a transaction is open.
    /// False: no transaction, and the index is missing or was built otherwise.
    fn usable_index(
        &self,
        conn: &Conn,
        folded: &str,
        declared: Normalisation,
    ) -> Result<bool, RepoError> {
        let found = self
            .indexed(conn)?
            .iter()
            .find(|i| i.attr == folded)
            .map(|i| i.normalisation);
        if found == Some(declared) {
            return Ok(true);
        }
        if !conn.in_transaction() {
            return Ok(false);
        }
        build_index(conn, folded, declared, found)?;
        self.forget_transaction_caches();
        if let Some(k) = self.known()?.as_mut() {
            // The conditions read ahead were answered from the index as it was.
            k.postings.clear();
        }
        Ok(true)
    }
}

/// [`Repo::find`]'s answer from what a speculating batch read ahead, when it read every
/// pair of `pairs` (attribute folded, normalisation, value normalised): in the order
/// [`find_sql`] gives (one condition: by id; several: by name).
fn find_known(known: &Known, pairs: &[Compared]) -> Option<Vec<String>> {
    let mut lists = Vec::with_capacity(pairs.len());
    for (attr, _, value) in pairs {
        lists.push(known.postings.get(&(attr.clone(), value.clone()))?);
    }
    let (first, rest) = lists.split_first()?;
    let mut names: Vec<String> = first
        .iter()
        .filter(|(id, _)| rest.iter().all(|l| l.iter().any(|(i, _)| i == id)))
        .map(|(_, name)| name.clone())
        .collect();
    if !rest.is_empty() {
        names.sort();
        names.dedup();
    }
    Some(names)
}

/// `SELECT` for [`Repo::find`] with `n` conditions: the intersection of one index lookup
/// per condition, then the names by rowid.
pub(crate) fn find_sql(n: usize) -> String {
    if n == 1 {
        // The common case (one correlation key): a join, no subquery and no sorter.
        return "SELECT i.name FROM identity_values v JOIN identities i ON i.id = v.identity_id \
                WHERE v.attr = ?1 AND v.value = ?2 ORDER BY v.identity_id"
            .to_owned();
    }
    let parts: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "SELECT identity_id FROM identity_values WHERE attr = ?{} AND value = ?{}",
                2 * i + 1,
                2 * i + 2
            )
        })
        .collect();
    format!(
        "SELECT name FROM identities WHERE id IN ({}) ORDER BY name",
        parts.join(" INTERSECT ")
    )
}

/// `SELECT` for [`Repo::block`]: name, version, disabled and attributes of the identities
/// whose index row of attribute `?1` equals `?2` or, for a `prefix`, lies in `[?2, ?3)`
/// (`bounded`) or from `?2` on; the limit is the last parameter.
pub(crate) fn block_sql(prefix: bool, bounded: bool) -> String {
    let range = match (prefix, bounded) {
        (false, _) => "v.value = ?2 ORDER BY v.identity_id LIMIT ?3",
        (true, true) => "v.value >= ?2 AND v.value < ?3 ORDER BY v.value, v.identity_id LIMIT ?4",
        (true, false) => "v.value >= ?2 ORDER BY v.value, v.identity_id LIMIT ?3",
    };
    format!(
        "SELECT i.name, i.version, i.disabled, i.attrs \
         FROM identity_values v JOIN identities i ON i.id = v.identity_id \
         WHERE v.attr = ?1 AND {range}"
    )
}

/// The smallest string greater than every string that starts with `prefix`: its last
/// character that can be incremented, incremented (`None` when there is none).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut code = u32::from(last) + 1;
        // Skip the surrogate range, which holds no characters.
        if (0xD800..=0xDFFF).contains(&code) {
            code = 0xE000;
        }
        if let Some(next) = char::from_u32(code) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The attributes (lowercased) whose values `identity_values` holds, with the
/// normalisation of their rows.
pub(crate) fn indexed_attrs(conn: &Conn) -> Result<Vec<Indexed>, RepoError> {
    let rows = conn
        .query_map(
            "SELECT a.attr, coalesce(n.steps, '') FROM indexed_attributes a \
             LEFT JOIN index_normalisations n ON n.attr = a.attr",
            args![],
            |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
        )
        .ctx("reading the indexed attributes")?;
    rows.into_iter()
        .map(|(attr, steps)| {
            let normalisation =
                Normalisation::from_token(&steps).ok_or_else(|| RepoError::Corrupt {
                    what: format!("the correlation index of attribute {attr}"),
                    message: format!("unknown normalisation '{steps}'"),
                })?;
            Ok(Indexed {
                attr,
                normalisation,
            })
        })
        .collect()
}

/// Indexes attribute `folded` of every identity with `normalisation` and lists it as
/// indexed, inside the caller's transaction (undone with it). One scan of the identities,
/// once per attribute and declaration: `previous` is the normalisation of rows built
/// before, removed first.
fn build_index(
    conn: &Conn,
    folded: &str,
    normalisation: Normalisation,
    previous: Option<Normalisation>,
) -> Result<(), RepoError> {
    match previous {
        None => tracing::info!(
            attribute = folded,
            normalisation = %normalisation,
            "indexing identity attribute for correlation queries"
        ),
        Some(before) => {
            tracing::info!(
                attribute = folded,
                normalisation = %normalisation,
                "re-indexing identity attribute for correlation queries: its normalisation changed (was {before})"
            );
            conn.execute("DELETE FROM identity_values WHERE attr = ?1", args![folded])
                .with_ctx(|| format!("removing the index rows of attribute {folded}"))?;
        }
    }
    let only = [Indexed {
        attr: folded.to_owned(),
        normalisation,
    }];
    let reading = || "reading identities to index".to_owned();
    conn.each_paged(
        "SELECT id, name, attrs FROM identities",
        args![],
        &reading,
        |r| {
            let id: i64 = r.get(0).with_ctx(reading)?;
            let name: String = r.get(1).with_ctx(reading)?;
            let json: &str = r.str(2).with_ctx(reading)?;
            let attrs: AttrMap = from_json(json, || format!("attributes of identity {name}"))?;
            reindex_values(conn, None, id, &name, &AttrMap::new(), &attrs, &only)
        },
    )?;
    conn.execute(
        "INSERT INTO indexed_attributes (attr, built_at) VALUES (?1, ?2) \
         ON CONFLICT (attr) DO UPDATE SET built_at = excluded.built_at",
        args![folded, now()],
    )
    .with_ctx(|| format!("listing attribute {folded} as indexed"))?;
    let stored = if normalisation.is_exact() {
        conn.execute(
            "DELETE FROM index_normalisations WHERE attr = ?1",
            args![folded],
        )
    } else {
        conn.execute(
            "INSERT INTO index_normalisations (attr, steps) VALUES (?1, ?2) \
             ON CONFLICT (attr) DO UPDATE SET steps = excluded.steps",
            args![folded, normalisation.token()],
        )
    };
    stored.with_ctx(|| format!("storing the normalisation of attribute {folded}'s index"))?;
    Ok(())
}

/// The text values of attribute `folded` of `attrs`, normalised, without repeats, sorted;
/// a value that normalises to nothing (only spaces) is left out.
fn normalised_texts(attrs: &AttrMap, folded: &str, n: Normalisation) -> Vec<String> {
    let mut out: Vec<String> = attrs
        .get(folded)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_text)
        .map(|t| n.apply(t).into_owned())
        .filter(|t| !t.is_empty() || n.is_exact())
        .collect();
    if out.len() > 1 {
        out.sort();
        out.dedup();
    }
    out
}

/// [`Repo::find`] without the index: every identity whose attributes hold each
/// (attribute, normalisation, normalised value) of `pairs`, by name.
fn scan_find(conn: &Conn, pairs: &[Compared]) -> Result<Vec<String>, RepoError> {
    let searching = || "searching identities".to_owned();
    let mut names = Vec::new();
    conn.each_paged(
        "SELECT name, attrs FROM identities ORDER BY name",
        args![],
        &searching,
        |r| {
            let name: String = r.get(0).with_ctx(searching)?;
            let json: &str = r.str(1).with_ctx(searching)?;
            let attrs: AttrMap = from_json(json, || format!("attributes of identity {name}"))?;
            let all = pairs
                .iter()
                .all(|(attr, n, value)| normalised_texts(&attrs, attr, *n).contains(value));
            if all {
                names.push(name);
            }
            Ok(())
        },
    )?;
    Ok(names)
}

/// [`Repo::block`] without the index (a read-only command): the rows of at most `limit`
/// matching identities, by name.
fn scan_block(
    conn: &Conn,
    folded: &str,
    n: Normalisation,
    key: &str,
    prefix: bool,
    limit: usize,
) -> Result<Vec<(String, i64, bool, String)>, RepoError> {
    let searching = || "searching identities".to_owned();
    let mut out = Vec::new();
    conn.each_paged(
        "SELECT name, version, disabled, attrs FROM identities ORDER BY name",
        args![],
        &searching,
        |r| {
            if out.len() >= limit {
                return Ok(());
            }
            let name: String = r.get(0).with_ctx(searching)?;
            let json: String = r.get(3).with_ctx(searching)?;
            let attrs: AttrMap = from_json(&json, || format!("attributes of identity {name}"))?;
            let hit = normalised_texts(&attrs, folded, n)
                .iter()
                .any(|v| if prefix { v.starts_with(key) } else { v == key });
            if hit {
                out.push((
                    name,
                    r.get(1).with_ctx(searching)?,
                    r.get(2).with_ctx(searching)?,
                    json,
                ));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// Index rows removed, set-wise (module `merge`).
static INDEX_DELETES: SetWise = SetWise {
    sql: "DELETE FROM identity_values AS v \
          USING unnest(?1::text[], ?2::text[], ?3::bigint[]) AS d(attr, value, identity_id) \
          WHERE v.attr = d.attr AND v.value = d.value AND v.identity_id = d.identity_id",
    kinds: &[Kind::Text, Kind::Text, Kind::Int],
};

/// Index rows added, set-wise.
static INDEX_INSERTS: SetWise = SetWise {
    sql: "INSERT INTO identity_values (attr, value, identity_id) \
          SELECT * FROM unnest(?1::text[], ?2::text[], ?3::bigint[]) ON CONFLICT DO NOTHING",
    kinds: &[Kind::Text, Kind::Text, Kind::Int],
};

/// Brings the index rows of identity `id` from `old` to `new` attributes: deletes the
/// values that went, inserts the ones that came, for the `indexed` attributes only, each
/// in the normalised form its index holds (two values with one normalised form are one
/// row). A new identity goes from an empty map, a deleted one to an empty map.
pub(crate) fn reindex_values(
    conn: &Conn,
    mut known: Option<&mut Known>,
    id: i64,
    name: &str,
    old: &AttrMap,
    new: &AttrMap,
    indexed: &[Indexed],
) -> Result<(), RepoError> {
    for ix in indexed {
        let folded = ix.attr.as_str();
        let before = normalised_texts(old, folded, ix.normalisation);
        let after = normalised_texts(new, folded, ix.normalisation);
        if before == after {
            continue;
        }
        let what = || format!("re-indexing attribute {folded} of identity {name}");
        let gone: Vec<&String> = before.iter().filter(|v| !after.contains(v)).collect();
        let came: Vec<&String> = after.iter().filter(|v| !before.contains(v)).collect();
        if let Some(k) = known.as_deref_mut() {
            k.reindexed(folded, &gone, &came, id, name);
        }
        let identity = [entity(("identity", id))];
        for gone in gone {
            let w = Predicted {
                sql: "DELETE FROM identity_values WHERE attr = ?1 AND value = ?2 AND identity_id = ?3",
                set: &INDEX_DELETES,
                args: args![folded, gone, id],
                expect: None,
                entities: &[entity(("index", folded, gone, id))],
                after: &identity,
            };
            conn.write(&w, what).with_ctx(what)?;
        }
        for came in came {
            let w = Predicted {
                sql: "INSERT INTO identity_values (attr, value, identity_id) VALUES (?1, ?2, ?3) \
                      ON CONFLICT DO NOTHING",
                set: &INDEX_INSERTS,
                args: args![folded, came, id],
                expect: None,
                entities: &[entity(("index", folded, came, id))],
                after: &identity,
            };
            conn.write(&w, what).with_ctx(what)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("sm").as_deref(), Some("sn"));
        assert_eq!(prefix_end("z").as_deref(), Some("{"));
        assert_eq!(prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
    }
}
