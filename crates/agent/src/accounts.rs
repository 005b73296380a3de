//! Finding an account by what a person knows of it. An LDAP account's key is its
//! entryUUID, which nobody types: commands that take a key also accept the entry's DN and,
//! when the resource names one (`name_attribute`, e.g. `uid`), that attribute's value,
//! looked up in the accounts' last seen attributes.

use idsync_repo::{Repo, RepoError};

use crate::config::{Loaded, SourceConfig};

/// The account key `given` stands for on `resource` (every LDAP resource when `None`):
/// `given` itself when it is a key, else the key of the one account whose DN or naming
/// attribute is `given`. Unchanged when nothing (or more than one account) matches, so
/// the command reports "no records" as before.
pub fn resolve_key(
    loaded: &Loaded,
    repo: &Repo,
    resource: Option<&str>,
    given: &str,
) -> Result<String, RepoError> {
    for r in &loaded.config.resources {
        if resource.is_some_and(|name| name != r.name) {
            continue;
        }
        let SourceConfig::Ldap(l) = &r.source else {
            continue;
        };
        if repo.shadow(&r.name, given)?.is_some() {
            return Ok(given.to_owned());
        }
        for attr in std::iter::once(&l.dn_attribute).chain(l.name_attribute.iter()) {
            let keys = repo.shadow_keys_with_value(&r.name, attr, given)?;
            if let [key] = keys.as_slice() {
                return Ok(key.clone());
            }
        }
    }
    Ok(given.to_owned())
}
