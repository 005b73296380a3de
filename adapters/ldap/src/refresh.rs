//! A streamed refreshOnly content synchronization: the refresh reaches the engine in parts
//! of `batch_size` events while the rest of it is still arriving, with memory bounded by
//! the part size whatever the size of the directory.
//!
//! A reader thread owns the connection for the length of the refresh: it reads the search
//! response, decodes each message and shapes each entry into an account, and hands them
//! over through a bounded channel, so the network and the decoding run beside the engine
//! (two cores) and a slow engine holds the server back rather than filling memory.
//!
//! The checkpoint of every part but the last is a *part checkpoint*: it names the cookie the
//! refresh started from (or none), not the cookie reached, and counts the parts. The refresh
//! goes on with the next part only when the engine committed exactly that checkpoint;
//! otherwise (a crash, a restart, a failed commit) it is redone from its start: entries
//! already applied equal their shadows and produce no event, deletes already applied find
//! nothing to delete, and deletes by absence are found at the end of the redone refresh.
//! Only the last part commits the server's new cookie, so no change is ever skipped.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use idsync_core::{AttrMap, Checkpoint, KnownAccounts};
use ldap3::controls::{EntryState, RefreshMode, SyncDone, SyncInfo};

use crate::collect::{Collector, Present};
use crate::conn::Client;
use crate::entry::{self, Message, Shaper};
use crate::error::LdapError;
use crate::sync::{
    REFRESH_REQUIRED, UNWILLING_TO_PERFORM, decode_cookie, encode_cookie, request, search_error,
    stale_cookie,
};

/// Messages looked up against the shadows in one query.
const CHUNK: usize = 250;

/// One message of the search, as the reader thread hands it over.
enum Item {
    /// An entry with its sync state; `attrs` for an add or a modify.
    Entry {
        key: String,
        state: EntryState,
        attrs: Option<AttrMap>,
        cookie: Option<Vec<u8>>,
    },
    /// A sync info message.
    Info(SyncInfo),
    /// The search ended; the connection comes back with its result.
    End {
        rc: u32,
        text: String,
        done: Option<SyncDone>,
        client: Box<Client>,
    },
    /// The search failed; the connection comes back when it is still usable.
    Failed(LdapError),
}

/// Where a refresh started.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Start {
    /// The cookie sent (`None`: from scratch, the whole content).
    cookie: Option<Vec<u8>>,
    /// The resource had never been synced: unknown accounts are upserts.
    fresh: bool,
}

/// The checkpoint of a part that is not the last: `syncpart:<params>:<f|r>:<n>:<base64 of
/// the start cookie, empty for none>`.
fn part_checkpoint(params: &str, start: &Start, part: u64) -> Checkpoint {
    use base64::Engine as _;
    let cookie = start
        .cookie
        .as_deref()
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        .unwrap_or_default();
    let fresh = if start.fresh { 'f' } else { 'r' };
    Checkpoint(format!("syncpart:{params}:{fresh}:{part}:{cookie}"))
}

/// Where a refresh after `after` starts: the committed cookie, the start of an unfinished
/// refresh (a part checkpoint), or from scratch (none, or a checkpoint of another mode or of
/// a search with other parameters).
fn start_after(params: &str, after: Option<&Checkpoint>) -> Start {
    use base64::Engine as _;
    let Some(cp) = after else {
        return Start {
            cookie: None,
            fresh: true,
        };
    };
    if let Some(rest) = cp.0.strip_prefix("syncpart:") {
        let mut fields = rest.splitn(4, ':');
        if let (Some(p), Some(fresh), Some(_part), Some(cookie)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
            && p == params
        {
            let decoded = if cookie.is_empty() {
                None
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(cookie)
                    .ok()
            };
            // An unreadable start cookie: from scratch, which is always correct.
            return Start {
                cookie: decoded,
                fresh: fresh == "f",
            };
        }
        return Start {
            cookie: None,
            fresh: false,
        };
    }
    Start {
        cookie: decode_cookie(params, Some(cp)),
        fresh: false,
    }
}

/// A refresh in progress, kept by the adapter between the parts it hands out.
pub(crate) struct Refresh {
    items: Receiver<Item>,
    params: String,
    start: Start,
    /// The newest cookie the server sent.
    cookie: Option<Vec<u8>>,
    /// The keys seen present so far (deletes by absence at the end).
    present: Present,
    /// The checkpoint of the last part handed out: the refresh goes on only from it.
    returned: Option<Checkpoint>,
    parts: u64,
    /// Restarts from scratch asked by the server in this refresh.
    restarts: u32,
    /// Deletes by absence were made (after a present phase): not again at the end.
    absence_done: bool,
    /// A reconcile: from scratch, every entry an event whether or not it changed.
    reconcile: bool,
}

/// What one call of [`next_part`] found.
pub(crate) struct Part<'k> {
    pub col: Collector<'k>,
    pub checkpoint: Option<Checkpoint>,
    /// The refresh goes on: fetch again after committing this part.
    pub more: bool,
}

/// Starts the search on a reader thread that owns `client` until the search ends.
fn spawn_reader(
    client: Client,
    filter: &str,
    attrs: &[String],
    cookie: Option<Vec<u8>>,
    capacity: usize,
) -> Receiver<Item> {
    let (tx, rx) = sync_channel(capacity);
    let filter = filter.to_owned();
    let attrs = attrs.to_vec();
    let spawned = std::thread::Builder::new()
        .name("ldap-refresh".to_owned())
        .spawn({
            let tx = tx.clone();
            move || read(client, &filter, attrs, cookie, &tx)
        });
    if let Err(e) = spawned {
        let _ = tx.send(Item::Failed(LdapError::Connection {
            url: String::new(),
            message: format!("cannot start the reader thread: {e}"),
        }));
    }
    rx
}

/// The reader thread: sends every message of the search, then its end. Stops early when
/// the receiver is gone (the refresh was abandoned).
fn read(
    mut client: Client,
    filter: &str,
    attrs: Vec<String>,
    cookie: Option<Vec<u8>>,
    tx: &SyncSender<Item>,
) {
    let cfg = client.config.clone();
    let proto = |message: String| LdapError::Protocol {
        url: cfg.url.clone(),
        message,
    };
    let shaper = Shaper::new(&cfg.binary_attributes, &cfg.dn_attribute, &[]);
    let ctrl = request(RefreshMode::RefreshOnly, cookie);
    let mut stream = match client.search(filter, attrs, vec![ctrl], None) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Item::Failed(e));
            return;
        }
    };
    loop {
        let re = match client.next(&mut stream) {
            Ok(Some(re)) => re,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Item::Failed(e));
                return;
            }
        };
        let item = match entry::decode(re) {
            Err(message) => Item::Failed(proto(message)),
            Ok(Message::Other) => continue,
            Ok(Message::Info(info)) => Item::Info(info),
            Ok(Message::Entry(raw, None)) => {
                Item::Failed(proto(format!("entry {} without a sync state", raw.dn)))
            }
            Ok(Message::Entry(raw, Some(state))) => match entry::uuid_text(&state.entry_uuid) {
                Err(message) => Item::Failed(proto(message)),
                Ok(key) => {
                    let attrs = matches!(state.state, EntryState::Add | EntryState::Modify)
                        .then(|| shaper.attrs(raw));
                    Item::Entry {
                        key,
                        state: state.state,
                        attrs,
                        cookie: state.cookie,
                    }
                }
            },
        };
        let failed = matches!(item, Item::Failed(_));
        if tx.send(item).is_err() || failed {
            return;
        }
    }
    let res = client.finish(&mut stream);
    let done = match entry::sync_done(&res.ctrls) {
        Ok(d) => d,
        Err(message) => {
            let _ = tx.send(Item::Failed(proto(message)));
            return;
        }
    };
    let _ = tx.send(Item::End {
        rc: res.rc,
        text: res.text,
        done,
        client: Box::new(client),
    });
}

/// The inputs of a refresh that stay the same from part to part.
pub(crate) struct Search<'a> {
    pub resource: &'a str,
    pub filter: &'a str,
    pub attrs: &'a [String],
    pub params: &'a str,
    /// A reconcile (`idsync reconcile`): the refresh starts from scratch and hands out
    /// every entry, changed or not.
    pub reconcile: bool,
    /// The adapter's count of stale cookies, for a new connection.
    pub resets: &'a std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The next part of the refresh after `after`: goes on with `state`'s refresh when `after`
/// is the checkpoint it last handed out, else starts one (taking the connection from
/// `client`, which gets it back when the search ends).
pub(crate) fn next_part<'k>(
    client: &mut Option<Client>,
    state: &mut Option<Refresh>,
    search: &Search<'_>,
    config: &crate::config::LdapConfig,
    after: Option<&Checkpoint>,
    known: &'k dyn KnownAccounts,
) -> Result<Part<'k>, LdapError> {
    let mut r = match state.take() {
        Some(r) if r.returned.as_ref() == after && r.reconcile == search.reconcile => r,
        _ => {
            let start = if search.reconcile {
                Start {
                    cookie: None,
                    fresh: after.is_none(),
                }
            } else {
                start_after(search.params, after)
            };
            let c = match client.take() {
                Some(c) => c,
                None => Client::with_counter(config.clone(), search.resets)?,
            };
            let items = spawn_reader(
                c,
                search.filter,
                search.attrs,
                start.cookie.clone(),
                capacity(config),
            );
            Refresh {
                items,
                params: search.params.to_owned(),
                cookie: start.cookie.clone(),
                start,
                present: Present::default(),
                returned: after.cloned(),
                parts: 0,
                restarts: 0,
                absence_done: false,
                reconcile: search.reconcile,
            }
        }
    };
    let present = std::mem::take(&mut r.present);
    let mut col =
        Collector::new(search.resource, known, r.start.fresh, &config.url)?.streamed(present);
    if r.reconcile {
        col = col.reconciling(None);
    }
    let wait = Duration::from_secs(config.timeout_secs.saturating_add(5));
    let mut chunk: Vec<Item> = Vec::with_capacity(CHUNK);
    loop {
        // A chunk of messages, no more than the part still has room for (each is at most
        // one event), stopping at the end of the search.
        let room = config
            .batch_size
            .saturating_sub(col.events.len())
            .clamp(1, CHUNK);
        chunk.clear();
        let mut ended = false;
        while chunk.len() < room {
            let item = match r.items.recv_timeout(wait) {
                Ok(item) => item,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(LdapError::Connection {
                        url: config.url.clone(),
                        message: format!("refresh stalled: nothing for {}s", wait.as_secs()),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(LdapError::Connection {
                        url: config.url.clone(),
                        message: "the refresh's reader ended without a result".to_owned(),
                    });
                }
            };
            ended = matches!(item, Item::End { .. } | Item::Failed(_));
            chunk.push(item);
            if ended {
                break;
            }
        }
        let keys: Vec<&str> = chunk
            .iter()
            .filter_map(|i| match i {
                Item::Entry {
                    key,
                    state: EntryState::Add | EntryState::Modify | EntryState::Delete,
                    ..
                } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        col.prefetch(&keys)?;
        for item in chunk.drain(..) {
            match item {
                Item::Entry {
                    key,
                    state,
                    attrs,
                    cookie,
                } => {
                    if cookie.is_some() {
                        r.cookie = cookie;
                    }
                    match (state, attrs) {
                        (EntryState::Present, _) => col.mark_present(&key),
                        (EntryState::Delete, _) => col.delete(key)?,
                        (_, Some(attrs)) => col.put(key, attrs)?,
                        (_, None) => col.mark_present(&key),
                    }
                }
                Item::Info(info) => info_message(info, &mut r, &mut col, config)?,
                Item::Failed(e) => return Err(e),
                Item::End {
                    rc,
                    text,
                    done,
                    client: c,
                } => {
                    let mut c = *c;
                    match rc {
                        0 => {
                            *client = Some(c);
                            return finish(r, col, done, config, after);
                        }
                        REFRESH_REQUIRED if r.start.cookie.is_some() && r.restarts == 0 => {
                            tracing::warn!(
                                resource = search.resource,
                                "the server asks for a full refresh (e-syncRefreshRequired); deletes will be found by absence"
                            );
                        }
                        UNWILLING_TO_PERFORM
                            if r.restarts == 0
                                && stale_cookie(
                                    &mut c,
                                    search.resource,
                                    r.start.cookie.as_deref(),
                                )? => {}
                        rc => {
                            let e = search_error(&c, rc, &text);
                            *client = Some(c);
                            return Err(e);
                        }
                    }
                    // From scratch: what was seen present before proves nothing now.
                    r.restarts += 1;
                    r.absence_done = false;
                    r.start.cookie = None;
                    r.cookie = None;
                    col.take_present();
                    r.items = spawn_reader(c, search.filter, search.attrs, None, capacity(config));
                }
            }
        }
        if col.events.len() >= config.batch_size && !ended {
            r.parts += 1;
            let cp = part_checkpoint(&r.params, &r.start, r.parts);
            r.present = col.take_present();
            r.returned = Some(cp.clone());
            *state = Some(r);
            return Ok(Part {
                col,
                checkpoint: Some(cp),
                more: true,
            });
        }
    }
}

/// Applies a sync info message of the refresh.
fn info_message(
    info: SyncInfo,
    r: &mut Refresh,
    col: &mut Collector<'_>,
    config: &crate::config::LdapConfig,
) -> Result<(), LdapError> {
    match info {
        SyncInfo::NewCookie(c) => r.cookie = Some(c),
        SyncInfo::RefreshPresent { cookie, .. } => {
            if cookie.is_some() {
                r.cookie = cookie;
            }
            if !r.absence_done {
                col.delete_absent(&config.guard(), config.deletes_accepted)?;
                r.absence_done = true;
            }
        }
        SyncInfo::RefreshDelete { cookie, .. } => {
            if cookie.is_some() {
                r.cookie = cookie;
            }
        }
        SyncInfo::SyncIdSet {
            cookie,
            refresh_deletes,
            sync_uuids,
        } => {
            if cookie.is_some() {
                r.cookie = cookie;
            }
            let mut keys = Vec::with_capacity(sync_uuids.len());
            for u in &sync_uuids {
                keys.push(entry::uuid_text(u).map_err(|message| LdapError::Protocol {
                    url: config.url.clone(),
                    message,
                })?);
            }
            keys.sort();
            if refresh_deletes {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                col.prefetch(&refs)?;
            }
            for k in keys {
                if refresh_deletes {
                    col.delete(k)?;
                } else {
                    col.mark_present(&k);
                }
            }
        }
    }
    Ok(())
}

/// The last part: deletes by absence when the refresh sent the whole content (or had a
/// present phase), and the server's new cookie as the checkpoint.
fn finish<'k>(
    r: Refresh,
    mut col: Collector<'k>,
    done: Option<SyncDone>,
    config: &crate::config::LdapConfig,
    after: Option<&Checkpoint>,
) -> Result<Part<'k>, LdapError> {
    let mut cookie = r.cookie;
    // Without a cookie the refresh sent the whole content (OpenLDAP then still says
    // refreshDeletes): whatever it did not send is gone. With one, a present phase
    // (refreshDeletes false) means the same.
    let mut absent = r.start.cookie.is_none();
    if let Some(done) = done {
        if done.cookie.is_some() {
            cookie = done.cookie;
        }
        absent |= !done.refresh_deletes;
    }
    if absent && !r.absence_done {
        col.delete_absent(&config.guard(), config.deletes_accepted)?;
    }
    let checkpoint = match cookie.or(r.start.cookie) {
        Some(c) => Some(encode_cookie(&r.params, &c)),
        None => after.cloned(),
    };
    Ok(Part {
        col,
        checkpoint,
        more: false,
    })
}

/// Messages buffered between the reader and the engine: one part, so the reader reads
/// the whole next part while the engine applies the one in hand (memory: two parts).
fn capacity(config: &crate::config::LdapConfig) -> usize {
    config.batch_size.max(CHUNK)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn part_checkpoints_name_the_start_of_the_refresh() {
        let from_cookie = Start {
            cookie: Some(b"rid=000,csn=1".to_vec()),
            fresh: false,
        };
        let cp = part_checkpoint("p1", &from_cookie, 3);
        assert!(cp.0.starts_with("syncpart:p1:r:3:"), "{}", cp.0);
        assert_eq!(start_after("p1", Some(&cp)), from_cookie);
        let scratch = Start {
            cookie: None,
            fresh: true,
        };
        assert_eq!(
            start_after("p1", Some(&part_checkpoint("p1", &scratch, 1))),
            scratch
        );
        // Other search parameters: from scratch, not fresh.
        assert_eq!(
            start_after("p2", Some(&cp)),
            Start {
                cookie: None,
                fresh: false
            }
        );
        // A committed cookie.
        let done = encode_cookie("p1", b"rid=000,csn=2");
        assert_eq!(
            start_after("p1", Some(&done)).cookie.as_deref(),
            Some(&b"rid=000,csn=2"[..])
        );
        assert!(start_after("p1", None).fresh);
    }
}
