//! Reading some accounts by their key (entryUUID): a reconcile of given accounts
//! (`idsync reconcile RESOURCE --key …`) in every mode.
//!
//! One paged search with the configured filter and an `entryUUID` equality per key (values
//! escaped); each entry found is an event whether or not it changed, each given key that is
//! known but not found is a delete (behind the accidental-delete guard), and the checkpoint
//! is not moved: reading some accounts says nothing about the others.

use std::sync::Arc;

use foldhash::HashSet;
use idsync_core::KnownAccounts;

use crate::collect::Collector;
use crate::conn::Client;
use crate::entry::{self, Message, Shaper};
use crate::error::LdapError;
use crate::poll::entry_uuid;

/// Keys per search (each an equality in one OR filter).
const KEYS_PER_SEARCH: usize = 200;

/// The entries of `keys` that match `filter`, as reconcile events.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_keys<'k>(
    client: &mut Client,
    shaper: &Shaper,
    resource: &str,
    fresh: bool,
    known: &'k dyn KnownAccounts,
    filter: &str,
    attrs: &[String],
    keys: &Arc<HashSet<String>>,
) -> Result<Collector<'k>, LdapError> {
    let cfg = client.config.clone();
    let proto = |message: String| LdapError::Protocol {
        url: cfg.url.clone(),
        message,
    };
    let mut col = Collector::new(resource, known, fresh, &cfg.url)?.reconciling(Some(keys.clone()));
    let mut wanted = attrs.to_vec();
    wanted.push("entryUUID".to_owned());
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    for chunk in sorted.chunks(KEYS_PER_SEARCH) {
        let mut or = String::from("(|");
        for k in chunk {
            or.push_str("(entryUUID=");
            or.push_str(&ldap3::ldap_escape(k.as_str()));
            or.push(')');
        }
        or.push(')');
        let search_filter = format!("(&{filter}{or})");
        let mut stream =
            client.search(&search_filter, wanted.clone(), vec![], Some(cfg.page_size))?;
        while let Some(re) = client.next(&mut stream)? {
            let Message::Entry(mut raw, _) = entry::decode(re).map_err(proto)? else {
                continue;
            };
            let uuid = entry_uuid(&mut raw, attrs, &cfg.url)?;
            col.put(uuid, shaper.attrs(raw))?;
        }
        client.finish_ok(&mut stream)?;
    }
    col.delete_absent(&cfg.guard(), cfg.deletes_accepted)?;
    Ok(col)
}
