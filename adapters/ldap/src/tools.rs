//! Helpers for the LDAP benchmark (`idsync-bench ldap`, crates/bench): the raw floors (a
//! paged search, and the refreshOnly content-sync search a full sync sends), read the same
//! way the adapter reads but without building accounts, and a writer that modifies entries.
//! They stay here because they use the adapter's private connection.

use std::collections::HashSet;

use ldap3::Mod;

use crate::config::LdapConfig;
use crate::conn::Client;
use crate::error::LdapError;

/// Reads every entry under the config's base with a paged search (page size from the
/// config) and returns how many there were: the client-side floor for a full sync.
pub fn paged_search_count(config: &LdapConfig) -> Result<usize, LdapError> {
    let mut client = Client::new(config.clone())?;
    let filter = config.effective_filter().map_err(LdapError::Config)?;
    let mut stream = client.search(
        &filter,
        config.attributes.clone(),
        vec![],
        Some(config.page_size),
    )?;
    let mut n = 0;
    while client.next(&mut stream)?.is_some() {
        n += 1;
    }
    client.finish_ok(&mut stream)?;
    Ok(n)
}

/// Sends the refreshOnly content-sync search of a full sync (no cookie) and reads every
/// message of the response without decoding an entry: the floor of a full sync by the same
/// client library. Returns the number of entries.
pub fn sync_search_count(config: &LdapConfig) -> Result<usize, LdapError> {
    let mut client = Client::new(config.clone())?;
    let filter = config.effective_filter().map_err(LdapError::Config)?;
    let ctrl = crate::sync::request(ldap3::controls::RefreshMode::RefreshOnly, None);
    let mut stream = client.search(&filter, config.attributes.clone(), vec![ctrl], None)?;
    let mut n = 0;
    while let Some(re) = client.next(&mut stream)? {
        // Entries are application tag 4; sync info messages are intermediate responses.
        if re.0.id == 4 {
            n += 1;
        }
    }
    client.finish_ok(&mut stream)?;
    Ok(n)
}

/// Writes to the directory with the config's URL and credentials.
pub struct Writer {
    client: Client,
}

impl Writer {
    /// Connects and binds.
    pub fn new(config: &LdapConfig) -> Result<Writer, LdapError> {
        let mut client = Client::new(config.clone())?;
        client.ldap()?;
        Ok(Writer { client })
    }

    /// Replaces `attr` of `dn` with one value.
    pub fn replace(&mut self, dn: &str, attr: &str, value: &str) -> Result<(), LdapError> {
        let mut ldap = self.client.ldap()?;
        let mods = vec![Mod::Replace(
            attr.to_owned(),
            HashSet::from([value.to_owned()]),
        )];
        let dn = dn.to_owned();
        let res = self
            .client
            .run("modify", async move { ldap.modify(&dn, mods).await })?;
        if res.rc != 0 {
            return Err(LdapError::Search {
                url: self.client.config.url.clone(),
                base: String::new(),
                rc: res.rc,
                text: res.text,
            });
        }
        Ok(())
    }
}
