//! Correlation exclusions: "this account is not this person". An operator who unlinks an
//! account from its identity (`idsync unlink`, or `idsync link` moving it to another one)
//! says the link was wrong; the account's next change must not be correlated back to the
//! same identity by the rule that linked it. One row per account and identity it must
//! not be linked to again without an operator; written in the operator decision's
//! transaction, removed when an operator links the account to that identity after all, and
//! with the identity (foreign key, `ON DELETE CASCADE`).
//!
//! Reading them costs a query per correlated account only while some exclusion exists: a
//! transaction asks once whether the table holds any row (cached until it ends).

use crate::db::Arg;
use crate::error::{Context, RepoError};
use crate::{Repo, args, now};

/// One account an identity must not be linked to again by correlation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    /// The account's resource.
    pub resource: String,
    /// The account's key.
    pub key: String,
    /// The identity it was unlinked from.
    pub identity: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

impl Repo {
    /// Records that account `key` of `resource` must not be correlated to identity `name`
    /// again (nothing when there is no such identity; once per account and identity).
    pub fn exclude(&self, resource: &str, key: &str, name: &str) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "INSERT INTO correlation_exclusions (resource, key, identity_id, excluded_at) \
                 SELECT ?1, ?2, id, ?4 FROM identities WHERE name = ?3 \
                 ON CONFLICT (resource, key, identity_id) DO NOTHING",
                args![resource, key, name, now()],
            )
            .with_ctx(|| {
                format!("recording that account {resource}/{key} is not identity {name}")
            })?;
        self.set_any_exclusion(Some(true))
    }

    /// Forgets that account `key` of `resource` must not be correlated to identity `name`
    /// (an operator linked it there after all).
    pub fn clear_exclusion(&self, resource: &str, key: &str, name: &str) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "DELETE FROM correlation_exclusions WHERE resource = ?1 AND key = ?2 \
                 AND identity_id = (SELECT id FROM identities WHERE name = ?3)",
                args![resource, key, name],
            )
            .with_ctx(|| format!("forgetting the exclusion of account {resource}/{key}"))?;
        Ok(())
    }

    /// The identities account `key` of `resource` must not be correlated to, by name.
    pub fn excluded_for(&self, resource: &str, key: &str) -> Result<Vec<String>, RepoError> {
        if !self.any_exclusion()? {
            return Ok(Vec::new());
        }
        Ok(self
            .exclusions_of_account(resource, key)?
            .into_iter()
            .map(|e| e.identity)
            .collect())
    }

    /// The exclusions of account `key` of `resource` (`idsync explain`).
    pub fn exclusions_of_account(
        &self,
        resource: &str,
        key: &str,
    ) -> Result<Vec<Exclusion>, RepoError> {
        self.exclusions_where("e.resource = ?1 AND e.key = ?2", args![resource, key])
    }

    /// The exclusions naming identity `name` (`idsync explain`).
    pub fn exclusions_of_identity(&self, name: &str) -> Result<Vec<Exclusion>, RepoError> {
        self.exclusions_where("i.name = ?1", args![name])
    }

    fn exclusions_where(
        &self,
        condition: &str,
        values: &[Arg<'_>],
    ) -> Result<Vec<Exclusion>, RepoError> {
        self.lock()?
            .query_map(
                &format!(
                    "SELECT e.resource, e.key, i.name, e.excluded_at \
                     FROM correlation_exclusions e JOIN identities i ON i.id = e.identity_id \
                     WHERE {condition} ORDER BY e.resource, e.key, i.name"
                ),
                values,
                |r| {
                    Ok(Exclusion {
                        resource: r.get(0)?,
                        key: r.get(1)?,
                        identity: r.get(2)?,
                        at: r.get(3)?,
                    })
                },
            )
            .ctx("reading correlation exclusions")
    }

    /// Whether any exclusion exists, asked once per transaction.
    fn any_exclusion(&self) -> Result<bool, RepoError> {
        if let Some(any) = *self.any_exclusion.lock().map_err(|_| RepoError::Poisoned)? {
            return Ok(any);
        }
        let conn = self.lock()?;
        let any: bool = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM correlation_exclusions)",
                args![],
                |r| r.get(0),
            )
            .ctx("reading whether correlation exclusions exist")?;
        if conn.in_transaction() {
            self.set_any_exclusion(Some(any))?;
        }
        Ok(any)
    }

    /// Sets (or with `None` forgets) the cached answer of [`Repo::any_exclusion`].
    pub(crate) fn set_any_exclusion(&self, any: Option<bool>) -> Result<(), RepoError> {
        *self.any_exclusion.lock().map_err(|_| RepoError::Poisoned)? = any;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Repo;
    use idsync_core::AttrMap;

    #[test]
    fn an_exclusion_names_the_identity_until_cleared_or_the_identity_goes() {
        let repo = Repo::open_in_memory().unwrap();
        repo.begin().unwrap();
        assert!(repo.excluded_for("hr", "1").unwrap().is_empty());
        repo.create_identity("bob", &AttrMap::new()).unwrap();
        repo.create_identity("ann", &AttrMap::new()).unwrap();
        repo.exclude("hr", "1", "bob").unwrap();
        repo.exclude("hr", "1", "bob").unwrap();
        repo.exclude("hr", "1", "nobody").unwrap();
        repo.exclude("hr", "2", "ann").unwrap();
        repo.commit().unwrap();
        assert_eq!(repo.excluded_for("hr", "1").unwrap(), vec!["bob"]);
        assert_eq!(repo.exclusions_of_identity("ann").unwrap()[0].key, "2");
        repo.begin().unwrap();
        repo.clear_exclusion("hr", "1", "bob").unwrap();
        repo.delete_identity("ann").unwrap();
        repo.commit().unwrap();
        assert!(repo.excluded_for("hr", "1").unwrap().is_empty());
        assert!(repo.exclusions_of_account("hr", "2").unwrap().is_empty());
    }
}
