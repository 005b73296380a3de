//! Identities and account links (the correlation index of their values: module `index`).

use crate::db::Conn;
use idsync_core::{AttrMap, Identity, LinkedAccount};

use crate::db::Predicted;
use crate::error::{Context, RepoError, from_json, to_json};
use crate::index::reindex_values;
use crate::merge::{Kind, SetWise, entity};
use crate::speculation::{IdentityRow, Known};
use crate::{Repo, args, atomic, now};

/// New identities sent ahead, set-wise (module `merge`).
static NEW_IDENTITIES: SetWise = SetWise {
    sql: "INSERT INTO identities (id, name, version, disabled, attrs, created_at, updated_at) \
          SELECT u.id, u.name, 1, 0, u.attrs, u.at, u.at \
          FROM unnest(?1::bigint[], ?2::text[], ?3::text[], ?4::text[]) AS u(id, name, attrs, at) \
          ON CONFLICT (name) DO NOTHING",
    kinds: &[Kind::Int, Kind::Text, Kind::Text, Kind::Text],
};

/// Check-ins sent ahead, set-wise: each row by id and the version it had.
static CHECKINS: SetWise = SetWise {
    sql: "UPDATE identities AS i \
          SET version = u.version, disabled = u.disabled, attrs = u.attrs, updated_at = u.at \
          FROM unnest(?1::bigint[], ?2::bigint[], ?3::bigint[], ?4::text[], ?5::text[], ?6::bigint[]) \
          AS u(id, version, disabled, attrs, at, old) \
          WHERE i.id = u.id AND i.version = u.old",
    kinds: &[
        Kind::Int,
        Kind::Int,
        Kind::Int,
        Kind::Text,
        Kind::Text,
        Kind::Int,
    ],
};

/// Links sent ahead, set-wise.
static LINKS: SetWise = SetWise {
    sql: "INSERT INTO links (resource, key, identity_id, linked_at) \
          SELECT * FROM unnest(?1::text[], ?2::text[], ?3::bigint[], ?4::text[]) \
          ON CONFLICT (resource, key) DO NOTHING",
    kinds: &[Kind::Text, Kind::Text, Kind::Int, Kind::Text],
};

/// Unlinks sent ahead, set-wise.
static UNLINKS: SetWise = SetWise {
    sql: "DELETE FROM links AS l USING unnest(?1::text[], ?2::text[]) AS d(resource, key) \
          WHERE l.resource = d.resource AND l.key = d.key",
    kinds: &[Kind::Text, Kind::Text],
};

/// Identities loaded per lock in [`Repo::for_each_identity`].
pub(crate) const PAGE: usize = 256;

impl Repo {
    /// The identity view of `name` with its linked accounts (each account's attributes are
    /// its shadow, empty when none is stored).
    pub fn identity(&self, name: &str) -> Result<Option<Identity>, RepoError> {
        self.read_identity(name, true)
    }

    /// Identity `name` with `accounts` left empty: one row read instead of one per
    /// linked account (for callers that do not look at the accounts).
    pub fn identity_without_accounts(&self, name: &str) -> Result<Option<Identity>, RepoError> {
        self.read_identity(name, false)
    }

    fn read_identity(
        &self,
        name: &str,
        with_accounts: bool,
    ) -> Result<Option<Identity>, RepoError> {
        let conn = self.lock()?;
        let row = identity_row(&conn, self.known()?.as_mut(), name)?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(Identity {
            name: name.to_owned(),
            version: row.version,
            disabled: row.disabled,
            attrs: from_json(&row.json, || format!("attributes of identity {name}"))?,
            accounts: if with_accounts {
                accounts(&conn, row.id, name)?
            } else {
                Vec::new()
            },
        }))
    }

    /// The name of the identity linked to account `key` of `resource`.
    pub fn owner_of(&self, resource: &str, key: &str) -> Result<Option<String>, RepoError> {
        let conn = self.lock()?;
        owner_of(&conn, self.known()?.as_ref(), resource, key)
    }

    /// Every identity name, sorted.
    pub fn identity_names(&self) -> Result<Vec<String>, RepoError> {
        self.lock()?
            .query_map("SELECT name FROM identities ORDER BY name", args![], |r| {
                r.get::<String>(0)
            })
            .ctx("listing identities")
    }

    /// Calls `f` with every identity (with accounts), sorted by name, for export.
    ///
    /// Identities are read in pages and `f` runs with the repository unlocked, so it may
    /// call the repository itself. Outside a transaction, changes committed during the walk
    /// may or may not be seen (each page is read as it stands).
    pub fn for_each_identity(
        &self,
        f: &mut dyn FnMut(Identity) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        let mut after: Option<String> = None;
        loop {
            let page = {
                let conn = self.lock()?;
                identity_page(&conn, after.as_deref())?
            };
            let last_page = page.len() < PAGE;
            after = page.last().map(|i| i.name.clone());
            for identity in page {
                f(identity)?;
            }
            if last_page || after.is_none() {
                return Ok(());
            }
        }
    }

    /// Creates identity `name` at version 1, not disabled, without accounts.
    pub fn create_identity(&self, name: &str, attrs: &AttrMap) -> Result<Identity, RepoError> {
        self.create_identity_with_account(name, attrs, None)
    }

    /// Creates identity `name` like [`Repo::create_identity`] and, with `account` =
    /// (resource, key), links that account to it, all or nothing.
    pub fn create_identity_with_account(
        &self,
        name: &str,
        attrs: &AttrMap,
        account: Option<(&str, &str)>,
    ) -> Result<Identity, RepoError> {
        if name.is_empty() {
            return Err(RepoError::EmptyName);
        }
        let json = to_json(attrs, || format!("attributes of identity {name}"))?;
        let conn = self.lock()?;
        let mut known = self.known()?;
        let mut known = known.as_mut();
        let at = now();
        atomic(self, &conn, |c| {
            let id = match known.as_deref_mut() {
                // Speculating: the name is taken to be free (a taken one fails the insert
                // sent ahead: the batch is decided again, where it is `NameTaken`).
                Some(k) if c.sends_ahead() => {
                    let id = k.identity_ids.take(c)?;
                    c.send_ahead(
                        &Predicted {
                            sql: "INSERT INTO identities (id, name, version, disabled, attrs, created_at, updated_at) \
                                  VALUES (?1, ?2, 1, 0, ?3, ?4, ?4) ON CONFLICT (name) DO NOTHING",
                            set: &NEW_IDENTITIES,
                            args: args![id, name, json, at],
                            expect: Some(1),
                            entities: &[entity(("identity", id))],
                            after: &[],
                        },
                        || format!("creating identity {name}"),
                    )
                    .with_ctx(|| format!("creating identity {name}"))?;
                    id
                }
                _ => c
                    .insert_id(
                        "INSERT INTO identities (name, version, disabled, attrs, created_at, updated_at) \
                         VALUES (?1, 1, 0, ?2, ?3, ?3) ON CONFLICT (name) DO NOTHING RETURNING id",
                        args![name, json, at],
                    )
                    .with_ctx(|| format!("creating identity {name}"))?
                    .ok_or_else(|| RepoError::NameTaken {
                        name: name.to_owned(),
                    })?,
            };
            if let Some(k) = known.as_deref_mut() {
                k.identities.insert(
                    name.to_owned(),
                    Some(IdentityRow {
                        id,
                        version: 1,
                        disabled: false,
                        json: json.clone(),
                    }),
                );
            }
            let indexed = self.indexed(c)?;
            reindex_values(
                c,
                known.as_deref_mut(),
                id,
                name,
                &AttrMap::new(),
                attrs,
                &indexed,
            )?;
            if let Some((resource, key)) = account {
                link_id(c, known, id, name, resource, key)?;
            }
            Ok(())
        })?;
        Ok(Identity {
            name: name.to_owned(),
            version: 1,
            disabled: false,
            attrs: attrs.clone(),
            accounts: account
                .map(|(resource, key)| LinkedAccount {
                    resource: resource.to_owned(),
                    key: key.to_owned(),
                    attrs: AttrMap::new(),
                })
                .into_iter()
                .collect(),
        })
    }

    /// Checks in identity `name` as a compare-and-swap on its version: stores `attrs` and
    /// `disabled` if the stored version is `expected_version`, and returns the new version.
    pub fn checkin(
        &self,
        name: &str,
        expected_version: i64,
        attrs: &AttrMap,
        disabled: bool,
    ) -> Result<i64, RepoError> {
        let json = to_json(attrs, || format!("attributes of identity {name}"))?;
        let conn = self.lock()?;
        let mut known = self.known()?;
        atomic(self, &conn, |c| {
            let row = identity_row(c, known.as_mut(), name)?;
            let Some(IdentityRow {
                id,
                version,
                json: old_json,
                ..
            }) = row
            else {
                return Err(RepoError::NoSuchIdentity {
                    name: name.to_owned(),
                });
            };
            if version != expected_version {
                return Err(RepoError::VersionConflict {
                    name: name.to_owned(),
                    expected: expected_version,
                    found: version,
                });
            }
            let new_version = version + 1;
            let what = || format!("checking in identity {name}");
            let sql = "UPDATE identities SET version = ?2, disabled = ?3, attrs = ?4, updated_at = ?5 \
                       WHERE id = ?1 AND version = ?6";
            let at = now();
            let values = args![id, new_version, disabled, json, at, version];
            if c.sends_ahead() {
                // The version read is the batch's own: the update changes that one row.
                let w = Predicted {
                    sql,
                    set: &CHECKINS,
                    args: values,
                    expect: Some(1),
                    entities: &[entity(("identity", id))],
                    after: &[],
                };
                c.send_ahead(&w, what).with_ctx(what)?;
            } else {
                c.execute(sql, values).with_ctx(what)?;
            }
            if let Some(k) = known.as_mut() {
                k.identities.insert(
                    name.to_owned(),
                    Some(IdentityRow {
                        id,
                        version: new_version,
                        disabled,
                        json: json.clone(),
                    }),
                );
            }
            // The JSON of an AttrMap is canonical (sorted by folded name), so equal text
            // means the indexed values are already right.
            if old_json != json {
                let indexed = self.indexed(c)?;
                if !indexed.is_empty() {
                    let old: AttrMap =
                        from_json(&old_json, || format!("attributes of identity {name}"))?;
                    reindex_values(c, known.as_mut(), id, name, &old, attrs, &indexed)?;
                }
            }
            Ok(new_version)
        })
    }

    /// Deletes identity `name` with its links and indexed values; false if it did not exist.
    /// The shadows of its accounts stay: they describe the resources, not the identity.
    pub fn delete_identity(&self, name: &str) -> Result<bool, RepoError> {
        let conn = self.lock()?;
        atomic(self, &conn, |c| {
            let row = c
                .query_row(
                    "SELECT id, attrs FROM identities WHERE name = ?1",
                    args![name],
                    |r| Ok((r.get::<i64>(0)?, r.get::<String>(1)?)),
                )
                .with_ctx(|| format!("reading identity {name}"))?;
            let Some((id, json)) = row else {
                return Ok(false);
            };
            let indexed = self.indexed(c)?;
            if !indexed.is_empty() {
                let old: AttrMap = from_json(&json, || format!("attributes of identity {name}"))?;
                reindex_values(
                    c,
                    self.known()?.as_mut(),
                    id,
                    name,
                    &old,
                    &AttrMap::new(),
                    &indexed,
                )?;
            }
            c.execute("DELETE FROM identities WHERE id = ?1", args![id])
                .with_ctx(|| format!("deleting identity {name}"))?;
            if let Some(k) = self.known()?.as_mut() {
                k.deleted(name);
            }
            Ok(true)
        })
    }

    /// Links account `key` of `resource` to identity `name`. Linking it again to the same
    /// identity is fine; linked to another one it is [`RepoError::AlreadyLinked`].
    pub fn link(&self, name: &str, resource: &str, key: &str) -> Result<(), RepoError> {
        let conn = self.lock()?;
        let mut known = self.known()?;
        let known_id = known
            .as_ref()
            .and_then(|k| k.identities.get(name))
            .map(|e| e.as_ref().map(|e| e.id));
        let id = match known_id {
            Some(id) => id,
            None => identity_id(&conn, name)?,
        }
        .ok_or_else(|| RepoError::NoSuchIdentity {
            name: name.to_owned(),
        })?;
        link_id(&conn, known.as_mut(), id, name, resource, key)
    }

    /// Removes the link of account `key` of `resource`; false if it was not linked.
    pub fn unlink(&self, resource: &str, key: &str) -> Result<bool, RepoError> {
        let conn = self.lock()?;
        let mut known = self.known()?;
        let sql = "DELETE FROM links WHERE resource = ?1 AND key = ?2";
        let what = || format!("unlinking account {resource}/{key}");
        let linked = match known.as_ref().and_then(|k| k.owner(resource, key)) {
            Some(owner) if conn.sends_ahead() => {
                let linked = owner.is_some();
                let w = Predicted {
                    sql,
                    set: &UNLINKS,
                    args: args![resource, key],
                    expect: Some(u64::from(linked)),
                    entities: &[entity(("account", resource, key))],
                    after: &[],
                };
                conn.send_ahead(&w, what).with_ctx(what)?;
                linked
            }
            _ => conn.execute(sql, args![resource, key]).with_ctx(what)? > 0,
        };
        if let Some(k) = known.as_mut() {
            k.set_owner(resource, key, None);
        }
        Ok(linked)
    }
}

/// Links account `key` of `resource` to identity `id` (named `name`); idempotent for the
/// same identity, refused when another one owns the account. A speculating batch
/// (`known`) sends the link of an account it knows to be unlinked ahead.
fn link_id(
    conn: &Conn,
    mut known: Option<&mut Known>,
    id: i64,
    name: &str,
    resource: &str,
    key: &str,
) -> Result<(), RepoError> {
    let sql = "INSERT INTO links (resource, key, identity_id, linked_at) VALUES (?1, ?2, ?3, ?4) \
               ON CONFLICT (resource, key) DO NOTHING";
    let what = || format!("linking account {resource}/{key} to identity {name}");
    let owner = known
        .as_deref()
        .and_then(|k| k.owner(resource, key))
        .map(|o| o.map(str::to_owned));
    let inserted = match owner {
        Some(None) if conn.sends_ahead() => {
            let at = now();
            let w = Predicted {
                sql,
                set: &LINKS,
                args: args![resource, key, id, at],
                expect: Some(1),
                entities: &[entity(("account", resource, key))],
                after: &[entity(("identity", id))],
            };
            conn.send_ahead(&w, what).with_ctx(what)?;
            1
        }
        _ => conn
            .execute(sql, args![resource, key, id, now()])
            .with_ctx(what)?,
    };
    if inserted > 0 {
        if let Some(k) = known.as_deref_mut() {
            k.set_owner(resource, key, Some(name));
        }
        return Ok(());
    }
    match owner_of(conn, known.as_deref(), resource, key)? {
        Some(owner) if owner == name => Ok(()),
        Some(owner) => Err(RepoError::AlreadyLinked {
            resource: resource.to_owned(),
            key: key.to_owned(),
            owner,
        }),
        // Unreachable with foreign keys on: the conflicting link has an owner.
        None => Err(RepoError::Corrupt {
            what: format!("link of account {resource}/{key}"),
            message: "it points to no identity".to_owned(),
        }),
    }
}

/// The stored row of identity `name`: what a speculating batch (`known`) knows of it, else
/// read (and then known to the batch).
fn identity_row(
    conn: &Conn,
    known: Option<&mut Known>,
    name: &str,
) -> Result<Option<IdentityRow>, RepoError> {
    if let Some(entry) = known.as_deref().and_then(|k| k.identities.get(name)) {
        return Ok(entry.clone());
    }
    let row = conn
        .query_row(
            "SELECT id, version, disabled, attrs FROM identities WHERE name = ?1",
            args![name],
            |r| {
                Ok(IdentityRow {
                    id: r.get(0)?,
                    version: r.get(1)?,
                    disabled: r.get(2)?,
                    json: r.get(3)?,
                })
            },
        )
        .with_ctx(|| format!("reading identity {name}"))?;
    if let Some(k) = known {
        k.identities.insert(name.to_owned(), row.clone());
    }
    Ok(row)
}

fn identity_id(conn: &Conn, name: &str) -> Result<Option<i64>, RepoError> {
    conn.query_row(
        "SELECT id FROM identities WHERE name = ?1",
        args![name],
        |r| r.get(0),
    )
    .with_ctx(|| format!("reading identity {name}"))
}

/// The owner of account `key` of `resource`: known to a speculating batch, or read.
fn owner_of(
    conn: &Conn,
    known: Option<&Known>,
    resource: &str,
    key: &str,
) -> Result<Option<String>, RepoError> {
    if let Some(owner) = known.and_then(|k| k.owner(resource, key)) {
        return Ok(owner.map(str::to_owned));
    }
    conn.query_row(
        "SELECT i.name FROM links l JOIN identities i ON i.id = l.identity_id \
         WHERE l.resource = ?1 AND l.key = ?2",
        args![resource, key],
        |r| r.get(0),
    )
    .with_ctx(|| format!("reading the owner of account {resource}/{key}"))
}

/// The linked accounts of identity `id`, sorted by resource and key.
fn accounts(conn: &Conn, id: i64, name: &str) -> Result<Vec<LinkedAccount>, RepoError> {
    let rows = conn
        .query_map(
            "SELECT l.resource, l.key, s.attrs FROM links l \
             LEFT JOIN shadows s ON s.resource = l.resource AND s.key = l.key \
             WHERE l.identity_id = ?1 ORDER BY l.resource, l.key",
            args![id],
            |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<Option<String>>(2)?,
                ))
            },
        )
        .with_ctx(|| format!("reading the accounts of identity {name}"))?;
    rows.into_iter()
        .map(|(resource, key, attrs)| {
            let attrs = match attrs {
                Some(json) => from_json(&json, || format!("shadow of account {resource}/{key}"))?,
                None => AttrMap::new(),
            };
            Ok(LinkedAccount {
                resource,
                key,
                attrs,
            })
        })
        .collect()
}

/// Up to [`PAGE`] identities with names after `after` (from the first when `None`).
fn identity_page(conn: &Conn, after: Option<&str>) -> Result<Vec<Identity>, RepoError> {
    const COLS: &str = "SELECT id, name, version, disabled, attrs FROM identities";
    let limit = i64::try_from(PAGE).unwrap_or(i64::MAX);
    let map = |r: &crate::db::Row<'_>| {
        Ok((
            r.get::<i64>(0)?,
            r.get::<String>(1)?,
            r.get::<i64>(2)?,
            r.get::<bool>(3)?,
            r.get::<String>(4)?,
        ))
    };
    let rows = match after {
        None => conn.query_map(&format!("{COLS} ORDER BY name LIMIT ?1"), args![limit], map),
        Some(after) => conn.query_map(
            &format!("{COLS} WHERE name > ?1 ORDER BY name LIMIT ?2"),
            args![after, limit],
            map,
        ),
    }
    .ctx("reading identities")?;
    rows.into_iter()
        .map(|(id, name, version, disabled, attrs)| {
            let attrs = from_json(&attrs, || format!("attributes of identity {name}"))?;
            let accounts = accounts(conn, id, &name)?;
            Ok(Identity {
                name,
                version,
                disabled,
                attrs,
                accounts,
            })
        })
        .collect()
}
