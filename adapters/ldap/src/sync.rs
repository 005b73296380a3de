//! RFC 4533 content synchronization: the cookie as a checkpoint, the handling of the
//! protocol's messages, and refreshAndPersist (one long-lived search, committed in small
//! batches). The streamed refreshOnly pass is in module `refresh`.
//!
//! The cookie is the checkpoint. It is only ever sent to the server as the engine committed it
//! (`after`); a persist stream is kept between fetches only while `after` equals the checkpoint
//! it last returned, otherwise (a batch was not committed, or the agent restarted) the search
//! is restarted from the committed cookie. Deletes arrive as delete states, as syncIdSet
//! entryUUID sets, or are found by absence after a present phase (and after
//! e-syncRefreshRequired, which restarts the refresh without a cookie); deletes by absence go
//! through the accidental-delete guard.

use std::time::{Duration, Instant};

use idsync_core::{Checkpoint, KnownAccounts};
use ldap3::controls::{EntryState, MakeCritical, RawControl, RefreshMode, SyncInfo, SyncRequest};

use crate::collect::Collector;
use crate::conn::{Client, Stream, rc_name};
use crate::entry::{self, Message, Shaper};
use crate::error::LdapError;

/// The result code of e-syncRefreshRequired.
pub(crate) const REFRESH_REQUIRED: u32 = 4096;

/// unwillingToPerform: OpenLDAP's answer to a cookie newer than its state (module `stale`).
pub(crate) const UNWILLING_TO_PERFORM: u32 = 53;

/// After an unwillingToPerform to a search with `cookie`: whether the directory is older
/// than the cookie (restored from a backup). If so, logs it and counts it: the caller
/// refreshes from scratch, deletes found by absence behind the guard.
pub(crate) fn stale_cookie(
    client: &mut Client,
    resource: &str,
    cookie: Option<&[u8]>,
) -> Result<bool, LdapError> {
    let Some(cookie) = cookie else {
        return Ok(false);
    };
    if !crate::stale::server_is_older(client, cookie)? {
        return Ok(false);
    }
    client
        .stale_refreshes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        resource,
        "the directory's state is older than the stored cookie (restored from a backup?): refreshing from scratch; deletes are found by absence, behind the accidental-delete guard"
    );
    Ok(true)
}

/// Checkpoint text of a cookie for a search whose parameters hash to `params`:
/// `sync:<params>:<cookie>` when the cookie is printable, else `sync64:<params>:<base64>`.
pub(crate) fn encode_cookie(params: &str, cookie: &[u8]) -> Checkpoint {
    use base64::Engine as _;
    match std::str::from_utf8(cookie) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => {
            Checkpoint(format!("sync:{params}:{s}"))
        }
        _ => Checkpoint(format!(
            "sync64:{params}:{}",
            base64::engine::general_purpose::STANDARD.encode(cookie)
        )),
    }
}

/// The cookie of a checkpoint; `None` for none, for one this mode did not write (the mode
/// was changed), or for one of a search with other parameters (base, scope, filter or
/// attributes changed): a refresh from scratch follows, with deletes by absence.
pub(crate) fn decode_cookie(params: &str, cp: Option<&Checkpoint>) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let cp = cp?;
    if let Some(rest) = cp.0.strip_prefix("sync:") {
        let (p, cookie) = rest.split_once(':')?;
        return (p == params).then(|| cookie.as_bytes().to_vec());
    }
    let (p, b) = cp.0.strip_prefix("sync64:")?.split_once(':')?;
    if p != params {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(b).ok()
}

/// A short stable hash of what the search selects and reads.
pub(crate) fn params_hash(cfg: &crate::config::LdapConfig, filter: &str) -> String {
    let mut text = format!("{}\0{:?}\0{filter}", cfg.base.to_lowercase(), cfg.scope);
    for a in &cfg.attributes {
        text.push('\0');
        text.push_str(&a.to_lowercase());
    }
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

pub(crate) fn request(mode: RefreshMode, cookie: Option<Vec<u8>>) -> RawControl {
    SyncRequest {
        mode,
        cookie,
        reload_hint: false,
    }
    .critical()
    .into()
}

/// What handling one message found.
#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    /// The refresh stage ended (refreshAndPersist).
    RefreshDone,
}

/// Applies one response message to the batch and the cookie.
fn handle(
    client: &Client,
    shaper: &Shaper,
    msg: Message,
    col: &mut Collector<'_>,
    cookie: &mut Option<Vec<u8>>,
) -> Result<Flow, LdapError> {
    let cfg = &client.config;
    let proto = |message: String| LdapError::Protocol {
        url: cfg.url.clone(),
        message,
    };
    match msg {
        Message::Other => {}
        Message::Entry(raw, None) => {
            return Err(proto(format!("entry {} without a sync state", raw.dn)));
        }
        Message::Entry(raw, Some(state)) => {
            let key = entry::uuid_text(&state.entry_uuid).map_err(proto)?;
            if let Some(c) = state.cookie {
                *cookie = Some(c);
            }
            match state.state {
                EntryState::Present => col.mark_present(&key),
                EntryState::Add | EntryState::Modify => col.put(key, shaper.attrs(raw))?,
                EntryState::Delete => col.delete(key)?,
            }
        }
        Message::Info(info) => match info {
            SyncInfo::NewCookie(c) => *cookie = Some(c),
            SyncInfo::RefreshPresent {
                cookie: c,
                refresh_done,
            } => {
                if c.is_some() {
                    *cookie = c;
                }
                col.delete_absent(&cfg.guard(), cfg.deletes_accepted)?;
                if refresh_done {
                    return Ok(Flow::RefreshDone);
                }
            }
            SyncInfo::RefreshDelete {
                cookie: c,
                refresh_done,
            } => {
                if c.is_some() {
                    *cookie = c;
                }
                if refresh_done {
                    return Ok(Flow::RefreshDone);
                }
            }
            SyncInfo::SyncIdSet {
                cookie: c,
                refresh_deletes,
                sync_uuids,
            } => {
                if c.is_some() {
                    *cookie = c;
                }
                let mut keys = Vec::with_capacity(sync_uuids.len());
                for u in &sync_uuids {
                    keys.push(entry::uuid_text(u).map_err(proto)?);
                }
                keys.sort();
                for k in keys {
                    if refresh_deletes {
                        col.delete(k)?;
                    } else {
                        col.mark_present(&k);
                    }
                }
            }
        },
    }
    Ok(Flow::Go)
}

pub(crate) fn search_error(client: &Client, rc: u32, text: &str) -> LdapError {
    LdapError::Search {
        url: client.config.url.clone(),
        base: client.config.base.clone(),
        rc,
        text: if text.is_empty() {
            rc_name(rc).to_owned()
        } else {
            format!("{}: {text}", rc_name(rc))
        },
    }
}

/// A refreshAndPersist search kept between fetches.
pub(crate) struct Persist {
    stream: Stream,
    /// The checkpoint last returned (the stream continues only from it).
    returned: Option<Checkpoint>,
    cookie: Option<Vec<u8>>,
    in_refresh: bool,
    /// Started without a cookie: the refresh sends the whole content.
    from_scratch: bool,
}

impl Persist {
    /// Whether this stream continues from `after`.
    pub fn continues(&self, after: Option<&Checkpoint>) -> bool {
        self.returned.as_ref() == after
    }
}

/// Outcome of one persist fetch.
pub(crate) struct PersistFetch<'k> {
    pub col: Collector<'k>,
    pub checkpoint: Option<Checkpoint>,
}

/// Reads the next small batch of a refreshAndPersist search, starting it (from the committed
/// cookie, or from scratch when `full`) when `state` is `None`. On a stream error the state is
/// dropped and the error returned; the next fetch reconnects from the committed cookie.
#[allow(clippy::too_many_arguments)]
pub(crate) fn persist<'k>(
    client: &mut Client,
    state: &mut Option<Persist>,
    shaper: &Shaper,
    resource: &str,
    after: Option<&Checkpoint>,
    known: &'k dyn KnownAccounts,
    filter: &str,
    attrs: &[String],
    full: &mut bool,
) -> Result<PersistFetch<'k>, LdapError> {
    let origin = client.config.url.clone();
    let params = params_hash(&client.config, filter);
    let mut col = Collector::new(resource, known, after.is_none(), &origin)?;
    let mut p = match state.take() {
        Some(p) if p.continues(after) => p,
        _ => {
            let cookie = if *full {
                None
            } else {
                decode_cookie(&params, after)
            };
            let ctrl = request(RefreshMode::RefreshAndPersist, cookie.clone());
            let stream = client.search(filter, attrs.to_vec(), vec![ctrl], None)?;
            Persist {
                stream,
                returned: after.cloned(),
                from_scratch: cookie.is_none(),
                cookie,
                in_refresh: true,
            }
        }
    };
    let cfg = client.config.clone();
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let net = Duration::from_secs(cfg.timeout_secs);
    loop {
        let wait = if p.in_refresh {
            net
        } else {
            if col.events.len() >= cfg.batch_size {
                break;
            }
            let (from, bound) = match first {
                None => (started, cfg.idle_ms),
                Some(t) => (t, cfg.batch_ms),
            };
            let left = Duration::from_millis(bound).saturating_sub(from.elapsed());
            if left.is_zero() {
                break;
            }
            left
        };
        let next = client.run_for(wait, p.stream.next());
        let re = match next {
            None if p.in_refresh => {
                client.disconnect();
                return Err(LdapError::Connection {
                    url: cfg.url.clone(),
                    message: format!("refresh stalled: nothing for {}s", net.as_secs()),
                });
            }
            None => break,
            Some(Err(e)) => {
                client.disconnect();
                return Err(LdapError::Connection {
                    url: cfg.url.clone(),
                    message: format!("persistent search ended: {e}"),
                });
            }
            Some(Ok(None)) => {
                let res = client.finish(&mut p.stream);
                client.disconnect();
                if res.rc == UNWILLING_TO_PERFORM
                    && !*full
                    && stale_cookie(client, resource, p.cookie.as_deref())?
                {
                    client.disconnect();
                    // Nothing of this stream is committed; the next fetch refreshes from scratch.
                    *full = true;
                    return Err(LdapError::Connection {
                        url: cfg.url.clone(),
                        message: "the directory is older than the stored cookie: restarting with a full refresh".to_owned(),
                    });
                }
                if res.rc == REFRESH_REQUIRED {
                    tracing::warn!(
                        resource,
                        "the server asks for a full refresh (e-syncRefreshRequired)"
                    );
                    // Nothing of this stream is committed; the next fetch refreshes from scratch.
                    *full = true;
                    return Err(LdapError::Connection {
                        url: cfg.url.clone(),
                        message: "e-syncRefreshRequired: restarting with a full refresh".to_owned(),
                    });
                }
                return Err(if res.rc == 0 {
                    LdapError::Connection {
                        url: cfg.url.clone(),
                        message: "the server ended the persistent search".to_owned(),
                    }
                } else {
                    search_error(client, res.rc, &res.text)
                });
            }
            Some(Ok(Some(re))) => re,
        };
        let msg = entry::decode(re).map_err(|message| LdapError::Protocol {
            url: cfg.url.clone(),
            message,
        })?;
        let before = (col.events.len(), p.cookie.clone());
        match handle(client, shaper, msg, &mut col, &mut p.cookie) {
            Ok(Flow::RefreshDone) => {
                p.in_refresh = false;
                *full = false;
                if p.from_scratch
                    && let Err(e) = col.delete_absent(&cfg.guard(), cfg.deletes_accepted)
                {
                    client.disconnect();
                    return Err(e);
                }
                break;
            }
            Ok(Flow::Go) => {}
            Err(e) => {
                client.disconnect();
                return Err(e);
            }
        }
        if first.is_none() && (col.events.len() != before.0 || p.cookie != before.1) {
            first = Some(Instant::now());
        }
    }
    let checkpoint = match &p.cookie {
        Some(c) => Some(encode_cookie(&params, c)),
        None => after.cloned(),
    };
    p.returned = checkpoint.clone();
    *state = Some(p);
    Ok(PersistFetch { col, checkpoint })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cookie_round_trip() {
        let c = encode_cookie(
            "p1",
            b"rid=000,csn=20260101000000.000000Z#000000#000#000000",
        );
        assert!(c.0.starts_with("sync:p1:rid=000"));
        assert_eq!(
            decode_cookie("p1", Some(&c)).unwrap(),
            b"rid=000,csn=20260101000000.000000Z#000000#000#000000"
        );
        assert_eq!(
            decode_cookie("p2", Some(&c)),
            None,
            "other search parameters"
        );
        let b = encode_cookie("p1", &[0, 1, 255]);
        assert!(b.0.starts_with("sync64:p1:"));
        assert_eq!(decode_cookie("p1", Some(&b)).unwrap(), vec![0, 1, 255]);
        assert_eq!(
            decode_cookie("p1", Some(&Checkpoint("poll:x".into()))),
            None
        );
    }
}
