//! Timestamp polling for servers without content synchronization.
//!
//! Each fetch reads, with a paged search, the entries whose `modifyTimestamp` is at or after
//! the high-water mark of the last committed checkpoint (`>=`, because timestamps have
//! one-second resolution: entries of that second are read again and dropped when equal to
//! their shadow). Every `full_pass_secs` the fetch is a full pass instead, which also finds
//! deletes by absence (behind the accidental-delete guard). The checkpoint is
//! `poll:<high-water mark>;<unix time of the last full pass>`.

use std::time::{SystemTime, UNIX_EPOCH};

use idsync_core::{Checkpoint, KnownAccounts};

use crate::collect::Collector;
use crate::conn::Client;
use crate::entry::{self, Message, RawEntry, Shaper};
use crate::error::LdapError;

/// The position of a poll: high-water mark and last full pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Position {
    pub hwm: Option<String>,
    pub last_full: u64,
}

impl Position {
    pub fn parse(cp: Option<&Checkpoint>) -> Option<Position> {
        let rest = cp?.0.strip_prefix("poll:")?;
        let (hwm, full) = rest.split_once(';')?;
        Some(Position {
            hwm: (!hwm.is_empty()).then(|| hwm.to_owned()),
            last_full: full.parse().ok()?,
        })
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint(format!(
            "poll:{};{}",
            self.hwm.as_deref().unwrap_or(""),
            self.last_full
        ))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The text of operational attribute `name` (asked for by the adapter itself): taken out of
/// the entry, unless the config's `attrs` asked for it too (by name or with `+`).
pub(crate) fn operational(raw: &mut RawEntry, attrs: &[String], name: &str) -> Option<String> {
    let asked = attrs
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name) || a == "+");
    if !asked {
        return Shaper::take_text(raw, name);
    }
    raw.attrs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .and_then(|v| String::from_utf8(v.clone()).ok())
}

/// The entryUUID of `raw` (the account key), taken out as [`operational`] does; an error
/// naming the entry when the bind account cannot read it.
pub(crate) fn entry_uuid(
    raw: &mut RawEntry,
    attrs: &[String],
    url: &str,
) -> Result<String, LdapError> {
    operational(raw, attrs, "entryUUID").ok_or_else(|| LdapError::Protocol {
        url: url.to_owned(),
        message: format!(
            "entry {} has no readable entryUUID (the bind account needs read access to it)",
            raw.dn
        ),
    })
}

/// One poll after `after`; a full pass that hands out every entry, changed or not, when
/// `reconcile`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn poll<'k>(
    client: &mut Client,
    shaper: &Shaper,
    resource: &str,
    after: Option<&Checkpoint>,
    known: &'k dyn KnownAccounts,
    filter: &str,
    attrs: &[String],
    reconcile: bool,
) -> Result<(Collector<'k>, Checkpoint), LdapError> {
    let cfg = client.config.clone();
    let pos = Position::parse(after);
    let now = now();
    let full = reconcile
        || match &pos {
            None => true,
            Some(p) => p.hwm.is_none() || now.saturating_sub(p.last_full) >= cfg.full_pass_secs,
        };
    let mut hwm = pos.as_ref().and_then(|p| p.hwm.clone());
    let search_filter = match (&hwm, full) {
        (Some(h), false) => format!(
            "(&{filter}(modifyTimestamp>={}))",
            ldap3::ldap_escape(h.as_str())
        ),
        _ => filter.to_owned(),
    };
    let mut wanted = attrs.to_vec();
    wanted.push("entryUUID".to_owned());
    wanted.push("modifyTimestamp".to_owned());
    let mut col = Collector::new(resource, known, after.is_none(), &cfg.url)?;
    if reconcile {
        col = col.reconciling(None);
    }
    let mut stream = client.search(&search_filter, wanted, vec![], Some(cfg.page_size))?;
    let proto = |message: String| LdapError::Protocol {
        url: cfg.url.clone(),
        message,
    };
    while let Some(re) = client.next(&mut stream)? {
        let Message::Entry(mut raw, _) = entry::decode(re).map_err(proto)? else {
            continue;
        };
        let uuid = entry_uuid(&mut raw, attrs, &cfg.url)?;
        let ts = operational(&mut raw, attrs, "modifyTimestamp");
        if let Some(ts) = ts
            && hwm.as_ref().is_none_or(|h| ts > *h)
        {
            hwm = Some(ts);
        }
        col.put(uuid, shaper.attrs(raw))?;
    }
    client.finish_ok(&mut stream)?;
    if full {
        col.delete_absent(&cfg.guard(), cfg.deletes_accepted)?;
    }
    let next = Position {
        hwm,
        last_full: if full {
            now
        } else {
            pos.map(|p| p.last_full).unwrap_or(now)
        },
    };
    Ok((col, next.checkpoint()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn position_round_trip() {
        let p = Position {
            hwm: Some("20260101120000Z".into()),
            last_full: 42,
        };
        assert_eq!(Position::parse(Some(&p.checkpoint())), Some(p));
        assert_eq!(Position::parse(Some(&Checkpoint("sync:x".into()))), None);
    }
}
