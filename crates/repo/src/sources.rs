//! Attribute sources: for each identity attribute that `authority:` governs, the linked
//! account (resource and key) that gave the identity its current value.
//!
//! The engine writes these rows in the batch transaction, next to the checkin that set the
//! value, and reads them to know whose values an account takes away when it is unlinked or
//! deleted (docs/rules.md, "Attribute authority"). A row goes with its identity (foreign
//! key, `ON DELETE CASCADE`); attribute names are stored lowercased.

use crate::error::{Context, RepoError};
use crate::{Repo, args, now};

/// Which account gave one attribute of an identity its current value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributeSource {
    /// The attribute, lowercased.
    pub attr: String,
    /// The account's resource.
    pub resource: String,
    /// The account's key.
    pub key: String,
}

impl Repo {
    /// The recorded sources of identity `name`'s attributes, sorted by attribute; empty for
    /// an identity without any (or without such an identity).
    pub fn attribute_sources(&self, name: &str) -> Result<Vec<AttributeSource>, RepoError> {
        self.lock()?
            .query_map(
                "SELECT s.attr, s.resource, s.key FROM attribute_sources s \
                 JOIN identities i ON i.id = s.identity_id WHERE i.name = ?1 ORDER BY s.attr",
                args![name],
                |r| {
                    Ok(AttributeSource {
                        attr: r.get(0)?,
                        resource: r.get(1)?,
                        key: r.get(2)?,
                    })
                },
            )
            .with_ctx(|| format!("reading the attribute sources of identity {name}"))
    }

    /// Records that account `key` of `resource` gave attribute `attr` of identity `name`
    /// its current value (replacing the source recorded before). No effect when there is
    /// no identity `name`.
    pub fn set_attribute_source(
        &self,
        name: &str,
        attr: &str,
        resource: &str,
        key: &str,
    ) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "INSERT INTO attribute_sources (identity_id, attr, resource, key, given_at) \
                 SELECT id, ?2, ?3, ?4, ?5 FROM identities WHERE name = ?1 \
                 ON CONFLICT (identity_id, attr) DO UPDATE SET resource = excluded.resource, \
                 key = excluded.key, given_at = excluded.given_at",
                args![name, attr.to_lowercase(), resource, key, now()],
            )
            .with_ctx(|| format!("recording the source of attribute {attr} of identity {name}"))?;
        Ok(())
    }

    /// Forgets the source of attribute `attr` of identity `name` (no account gives it a
    /// value any more).
    pub fn clear_attribute_source(&self, name: &str, attr: &str) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "DELETE FROM attribute_sources WHERE attr = ?2 \
                 AND identity_id = (SELECT id FROM identities WHERE name = ?1)",
                args![name, attr.to_lowercase()],
            )
            .with_ctx(|| format!("forgetting the source of attribute {attr} of identity {name}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use idsync_core::{Action, AttrMap, Decision, Op, Situation};

    use crate::{Erasure, Repo};

    fn sources(repo: &Repo, name: &str) -> Vec<(String, String, String)> {
        repo.attribute_sources(name)
            .unwrap()
            .into_iter()
            .map(|s| (s.attr, s.resource, s.key))
            .collect()
    }

    fn row(attr: &str, resource: &str, key: &str) -> (String, String, String) {
        (attr.to_owned(), resource.to_owned(), key.to_owned())
    }

    #[test]
    fn a_source_is_replaced_forgotten_and_goes_with_its_identity() {
        let repo = Repo::open_in_memory().unwrap();
        repo.begin().unwrap();
        repo.create_identity("ada", &AttrMap::new()).unwrap();
        repo.set_attribute_source("ada", "Title", "hr", "1")
            .unwrap();
        repo.set_attribute_source("ada", "agency", "contractors", "C1")
            .unwrap();
        assert_eq!(
            sources(&repo, "ada"),
            [row("agency", "contractors", "C1"), row("title", "hr", "1")]
        );
        repo.set_attribute_source("ada", "title", "contractors", "C1")
            .unwrap();
        repo.clear_attribute_source("ada", "AGENCY").unwrap();
        assert_eq!(sources(&repo, "ada"), [row("title", "contractors", "C1")]);
        // No such identity: nothing is written.
        repo.set_attribute_source("nobody", "title", "hr", "1")
            .unwrap();
        assert!(sources(&repo, "nobody").is_empty());
        repo.delete_identity("ada").unwrap();
        repo.commit().unwrap();
        let left: i64 = repo
            .sqlite_for_tests()
            .query_row("SELECT count(*) FROM attribute_sources", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "the foreign key removes them with the identity");
    }

    #[test]
    fn an_erasure_removes_the_sources_naming_a_former_account() {
        let repo = Repo::open_in_memory().unwrap();
        repo.begin().unwrap();
        repo.create_identity("ann", &AttrMap::new()).unwrap();
        repo.create_identity("bob", &AttrMap::new()).unwrap();
        repo.link("ann", "hr", "7").unwrap();
        repo.record_decision(&Decision {
            resource: "hr".into(),
            key: "7".into(),
            op: Op::Upsert,
            situation: Some(Situation::Unmatched),
            action: Action::Created,
            identity: Some("ann".into()),
            candidates: vec![],
            confirmed: vec![],
            rules: vec![],
            changes: vec![],
            error: None,
            at: None,
        })
        .unwrap();
        // A row left naming ann's account on another identity (written outside the engine).
        repo.set_attribute_source("bob", "title", "hr", "7")
            .unwrap();
        repo.set_attribute_source("bob", "mail", "dir", "b")
            .unwrap();
        repo.delete_identity("ann").unwrap();
        repo.commit().unwrap();
        let Erasure::Erased(report) = repo.erase_identity("ann", None).unwrap() else {
            panic!("not erased");
        };
        assert_eq!(report.attribute_sources, 1, "{report:?}");
        assert_eq!(sources(&repo, "bob"), [row("mail", "dir", "b")]);
    }
}
