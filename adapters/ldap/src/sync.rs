//! RFC 4533 content synchronization: refreshOnly (one refresh per fetch) and
//! refreshAndPersist (one long-lived search, committed in small batches).
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
const REFRESH_REQUIRED: u32 = 4096;

/// Checkpoint text of a cookie: `sync:<cookie>` when printable, else `sync64:<base64>`.
pub(crate) fn encode_cookie(cookie: &[u8]) -> Checkpoint {
    use base64::Engine as _;
    match std::str::from_utf8(cookie) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => Checkpoint(format!("sync:{s}")),
        _ => Checkpoint(format!(
            "sync64:{}",
            base64::engine::general_purpose::STANDARD.encode(cookie)
        )),
    }
}

/// The cookie of a checkpoint; `None` for none, or for one this mode did not write (the
/// mode was changed): a refresh from scratch follows.
pub(crate) fn decode_cookie(cp: Option<&Checkpoint>) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let cp = cp?;
    if let Some(s) = cp.0.strip_prefix("sync:") {
        return Some(s.as_bytes().to_vec());
    }
    let b = cp.0.strip_prefix("sync64:")?;
    base64::engine::general_purpose::STANDARD.decode(b).ok()
}

fn request(mode: RefreshMode, cookie: Option<Vec<u8>>) -> RawControl {
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
                col.delete_absent(cfg.delete_guard_percent, cfg.delete_guard_min)?;
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

fn search_error(client: &Client, rc: u32, text: &str) -> LdapError {
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

/// One refreshOnly pass after `after`: the batch and the new cookie.
pub(crate) fn refresh_only<'k>(
    client: &mut Client,
    shaper: &Shaper,
    resource: &str,
    after: Option<&Checkpoint>,
    known: &'k dyn KnownAccounts,
    filter: &str,
    attrs: &[String],
) -> Result<(Collector<'k>, Option<Vec<u8>>), LdapError> {
    let mut start_cookie = decode_cookie(after);
    let origin = client.config.url.clone();
    for _ in 0..2 {
        let mut col = Collector::new(resource, known, after.is_none(), &origin)?;
        let mut cookie = start_cookie.clone();
        let ctrl = request(RefreshMode::RefreshOnly, start_cookie.clone());
        let mut stream = client.search(filter, attrs.to_vec(), vec![ctrl], None)?;
        while let Some(re) = client.next(&mut stream)? {
            let msg = entry::decode(re).map_err(|message| LdapError::Protocol {
                url: client.config.url.clone(),
                message,
            })?;
            handle(client, shaper, msg, &mut col, &mut cookie)?;
        }
        let res = client.finish(&mut stream);
        match res.rc {
            0 => {
                let done = entry::sync_done(&res.ctrls).map_err(|message| LdapError::Protocol {
                    url: client.config.url.clone(),
                    message,
                })?;
                if let Some(done) = done {
                    if done.cookie.is_some() {
                        cookie = done.cookie;
                    }
                    if !done.refresh_deletes {
                        let c = &client.config;
                        col.delete_absent(c.delete_guard_percent, c.delete_guard_min)?;
                    }
                }
                return Ok((col, cookie));
            }
            REFRESH_REQUIRED if start_cookie.is_some() => {
                tracing::warn!(
                    resource,
                    "the server asks for a full refresh (e-syncRefreshRequired); deletes will be found by absence"
                );
                start_cookie = None;
            }
            rc => return Err(search_error(client, rc, &res.text)),
        }
    }
    Err(search_error(
        client,
        REFRESH_REQUIRED,
        "again after a full refresh",
    ))
}

/// A refreshAndPersist search kept between fetches.
pub(crate) struct Persist {
    stream: Stream,
    /// The checkpoint last returned (the stream continues only from it).
    returned: Option<Checkpoint>,
    cookie: Option<Vec<u8>>,
    in_refresh: bool,
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
    let mut col = Collector::new(resource, known, after.is_none(), &origin)?;
    let mut p = match state.take() {
        Some(p) if p.continues(after) => p,
        _ => {
            let cookie = if *full { None } else { decode_cookie(after) };
            let ctrl = request(RefreshMode::RefreshAndPersist, cookie.clone());
            let stream = client.search(filter, attrs.to_vec(), vec![ctrl], None)?;
            Persist {
                stream,
                returned: after.cloned(),
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
        Some(c) => Some(encode_cookie(c)),
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
        let c = encode_cookie(b"rid=000,csn=20260101000000.000000Z#000000#000#000000");
        assert!(c.0.starts_with("sync:rid=000"));
        assert_eq!(
            decode_cookie(Some(&c)).unwrap(),
            b"rid=000,csn=20260101000000.000000Z#000000#000#000000"
        );
        let b = encode_cookie(&[0, 1, 255]);
        assert!(b.0.starts_with("sync64:"));
        assert_eq!(decode_cookie(Some(&b)).unwrap(), vec![0, 1, 255]);
        assert_eq!(decode_cookie(Some(&Checkpoint("poll:x".into()))), None);
    }
}
