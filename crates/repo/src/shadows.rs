//! Account shadows (the last seen attributes of every account) and resource checkpoints.
//!
//! Shadows let diffing adapters (flat files, full passes) tell creates, updates and deletes
//! apart through [`KnownAccounts`]; they are written in the batch transaction, so they move
//! together with the checkpoint.

use crate::db::{Arg, Conn, Dialect, Predicted, ToArg};
use crate::merge::{Kind, SetWise, entity};
use idsync_core::{AttrMap, Checkpoint, KnownAccounts};

use crate::error::{Context, RepoError, from_json, to_json};
use crate::{Repo, args, now};

/// Keys per query of [`Repo::shadow_hashes_of`] (SQLite allows 32,766 parameters; a part's
/// lookups take a handful of queries, each statement kept prepared).
const KEYS_PER_QUERY: usize = 250;

/// The statement sizes [`Repo::shadow_hashes_of`] uses, the last being [`KEYS_PER_QUERY`].
const QUERY_SIZES: [usize; 3] = [10, 50, KEYS_PER_QUERY];

/// Shadows stored ahead, set-wise (module `merge`).
static SHADOWS: SetWise = SetWise {
    sql: "INSERT INTO shadows (resource, key, hash, attrs) \
          SELECT * FROM unnest(?1::text[], ?2::text[], ?3::bigint[], ?4::text[]) \
          ON CONFLICT (resource, key) DO UPDATE SET hash = excluded.hash, attrs = excluded.attrs",
    kinds: &[Kind::Text, Kind::Text, Kind::Int, Kind::Text],
};

/// Shadows removed ahead, set-wise.
static SHADOW_DELETES: SetWise = SetWise {
    sql: "DELETE FROM shadows AS s USING unnest(?1::text[], ?2::text[]) AS d(resource, key) \
          WHERE s.resource = d.resource AND s.key = d.key",
    kinds: &[Kind::Text, Kind::Text],
};

impl Repo {
    /// The last committed checkpoint of `resource` (`None`: never synced).
    pub fn checkpoint(&self, resource: &str) -> Result<Option<Checkpoint>, RepoError> {
        read_checkpoint(&*self.lock()?, resource)
    }

    /// Stores the attributes last seen for account `key` of `resource`, with their
    /// [`AttrMap::content_hash`].
    pub fn put_shadow(&self, resource: &str, key: &str, attrs: &AttrMap) -> Result<(), RepoError> {
        let json = to_json(attrs, || format!("shadow of account {resource}/{key}"))?;
        // Stored as the i64 with the same bits: SQLite integers are signed.
        let hash = attrs.content_hash() as i64;
        let what = || format!("storing shadow of account {resource}/{key}");
        self.lock()?
            .write(
                &Predicted {
                    sql: "INSERT INTO shadows (resource, key, hash, attrs) VALUES (?1, ?2, ?3, ?4) \
                          ON CONFLICT (resource, key) DO UPDATE SET hash = excluded.hash, attrs = excluded.attrs",
                    set: &SHADOWS,
                    args: args![resource, key, hash, json],
                    expect: None,
                    entities: &[entity(("shadow", resource, key))],
                    after: &[],
                },
                what,
            )
            .with_ctx(what)
    }

    /// Forgets account `key` of `resource` (it was deleted there).
    pub fn delete_shadow(&self, resource: &str, key: &str) -> Result<(), RepoError> {
        let what = || format!("deleting shadow of account {resource}/{key}");
        self.lock()?
            .write(
                &Predicted {
                    sql: "DELETE FROM shadows WHERE resource = ?1 AND key = ?2",
                    set: &SHADOW_DELETES,
                    args: args![resource, key],
                    expect: None,
                    entities: &[entity(("shadow", resource, key))],
                    after: &[],
                },
                what,
            )
            .with_ctx(what)
    }

    /// How many accounts of `resource` have a shadow (for the accidental-delete guard).
    pub fn shadow_count(&self, resource: &str) -> Result<u64, RepoError> {
        let n: i64 = self
            .lock()?
            .query_one(
                "SELECT count(*) FROM shadows WHERE resource = ?1",
                args![resource],
                |r| r.get(0),
            )
            .with_ctx(|| format!("counting shadows of resource {resource}"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The last seen attributes of account `key` of `resource`.
    pub fn shadow(&self, resource: &str, key: &str) -> Result<Option<AttrMap>, RepoError> {
        let json: Option<String> = self
            .lock()?
            .query_row(
                "SELECT attrs FROM shadows WHERE resource = ?1 AND key = ?2",
                args![resource, key],
                |r| r.get(0),
            )
            .with_ctx(|| format!("reading shadow of account {resource}/{key}"))?;
        json.map(|j| from_json(&j, || format!("shadow of account {resource}/{key}")))
            .transpose()
    }

    /// The keys of the accounts of `resource` whose last seen attribute `attr` has the
    /// text value `value`, compared without regard to ASCII case (a DN, a uid): what an
    /// operator knows of an account whose key is a UUID. Reads every shadow of the
    /// resource: for commands, not for passes.
    pub fn shadow_keys_with_value(
        &self,
        resource: &str,
        attr: &str,
        value: &str,
    ) -> Result<Vec<String>, RepoError> {
        let conn = self.lock()?;
        let (sql, path) = match conn.dialect() {
            Dialect::Sqlite => (
                "SELECT DISTINCT s.key FROM shadows s, json_each(s.attrs, ?2) v \
                 WHERE s.resource = ?1 AND v.type = 'text' AND lower(v.value) = lower(?3) \
                 ORDER BY s.key",
                format!("$.\"{}\"", attr.replace('"', "")),
            ),
            // The attribute's values: a JSON string, or an array of them; an attribute
            // name as a key of the object (`->` takes it as a parameter, no path syntax).
            Dialect::Postgres => (
                "SELECT DISTINCT s.key FROM shadows s, \
                 jsonb_array_elements(CASE jsonb_typeof(s.attrs::jsonb -> ?2) \
                   WHEN 'array' THEN s.attrs::jsonb -> ?2 \
                   ELSE jsonb_build_array(s.attrs::jsonb -> ?2) END) v \
                 WHERE s.resource = ?1 AND jsonb_typeof(v) = 'string' \
                 AND lower(v #>> '{}') = lower(?3) ORDER BY s.key",
                attr.to_owned(),
            ),
        };
        conn.query_map(sql, args![resource, path, value], |r| r.get(0))
            .with_ctx(|| format!("finding accounts of {resource} by {attr}"))
    }

    /// Calls `each` with those of `keys` that have a shadow in `resource`, and its content
    /// hash: one query per [`KEYS_PER_QUERY`] keys (a part of a directory stream).
    pub fn shadow_hashes_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), RepoError> {
        let reading = || format!("reading shadows of resource {resource}");
        self.each_shadow_of(resource, keys, "hash", &mut |key, r| {
            each(key, r.get::<i64>(1).with_ctx(reading)? as u64);
            Ok(())
        })
    }

    /// Calls `each` with those of `keys` that have a shadow in `resource`, and their last
    /// seen attributes: one query per part of a pass instead of one per account.
    pub fn shadows_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, AttrMap),
    ) -> Result<(), RepoError> {
        let reading = || format!("reading shadows of resource {resource}");
        self.each_shadow_of(resource, keys, "attrs", &mut |key, r| {
            let json = r.str(1).with_ctx(reading)?;
            each(
                key,
                from_json(json, || format!("shadow of account {resource}/{key}"))?,
            );
            Ok(())
        })
    }

    /// Calls `each` with the key and the row (key, `column`) of those of `keys` that have a
    /// shadow in `resource`, [`KEYS_PER_QUERY`] keys a query.
    fn each_shadow_of(
        &self,
        resource: &str,
        keys: &[&str],
        column: &str,
        each: &mut dyn FnMut(&str, &crate::db::Row<'_>) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        let conn = self.lock()?;
        for chunk in keys.chunks(KEYS_PER_QUERY) {
            // A few statement sizes only, padded with the chunk's last key (an IN list
            // ignores repeats), so the prepared statements stay in the cache.
            let size = QUERY_SIZES
                .iter()
                .copied()
                .find(|n| *n >= chunk.len())
                .unwrap_or(KEYS_PER_QUERY);
            let marks = vec!["?"; size].join(",");
            let sql = format!(
                "SELECT key, {column} FROM shadows WHERE resource = ? AND key IN ({marks})"
            );
            let mut args: Vec<Arg<'_>> = Vec::with_capacity(size + 1);
            args.push(resource.to_arg());
            for k in chunk {
                args.push(k.to_arg());
            }
            let Some(last) = chunk.last() else { continue };
            while args.len() <= size {
                args.push(last.to_arg());
            }
            let reading = || format!("reading shadows of resource {resource}");
            conn.each(&sql, &args, &reading, |r| {
                let key = r.str(0).with_ctx(reading)?;
                each(key, r)
            })?;
        }
        Ok(())
    }

    /// Calls `each` with every account key of `resource` and the content hash of its
    /// shadow (read from the covering index `shadows_hash`).
    pub fn each_shadow_hash(
        &self,
        resource: &str,
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), RepoError> {
        let reading = || format!("reading shadows of resource {resource}");
        self.lock()?.each_paged(
            "SELECT key, hash FROM shadows WHERE resource = ?1",
            args![resource],
            &reading,
            |r| {
                let key = r.str(0).with_ctx(reading)?;
                each(key, r.get::<i64>(1).with_ctx(reading)? as u64);
                Ok(())
            },
        )
    }
}

impl KnownAccounts for Repo {
    fn each_known_hash(
        &self,
        resource: &str,
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), String> {
        self.each_shadow_hash(resource, each)
            .map_err(|e| e.to_string())
    }

    fn known_attrs(&self, resource: &str, key: &str) -> Result<Option<AttrMap>, String> {
        self.shadow(resource, key).map_err(|e| e.to_string())
    }

    fn known_hashes_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), String> {
        self.shadow_hashes_of(resource, keys, each)
            .map_err(|e| e.to_string())
    }

    fn known_attrs_of(
        &self,
        resource: &str,
        keys: &[&str],
        each: &mut dyn FnMut(&str, AttrMap),
    ) -> Result<(), String> {
        self.shadows_of(resource, keys, each)
            .map_err(|e| e.to_string())
    }

    fn warm_up(&self) {
        Repo::warm_up(self);
    }

    fn known_count(&self, resource: &str) -> Result<Option<u64>, String> {
        self.shadow_count(resource)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

pub(crate) fn read_checkpoint(
    conn: &Conn,
    resource: &str,
) -> Result<Option<Checkpoint>, RepoError> {
    conn.query_row(
        "SELECT token FROM checkpoints WHERE resource = ?1",
        args![resource],
        |r| r.get(0),
    )
    .with_ctx(|| format!("reading the checkpoint of resource {resource}"))
    .map(|token| token.map(Checkpoint))
}

pub(crate) fn write_checkpoint(
    conn: &Conn,
    resource: &str,
    checkpoint: &Checkpoint,
) -> Result<(), RepoError> {
    conn.execute(
        "INSERT INTO checkpoints (resource, token, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (resource) DO UPDATE SET token = excluded.token, updated_at = excluded.updated_at",
        args![resource, checkpoint.0, now()],
    )
    .with_ctx(|| format!("storing the checkpoint of resource {resource}"))?;
    Ok(())
}
