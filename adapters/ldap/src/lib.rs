//! The LDAP adapter: OpenLDAP and other RFC 4533 servers through content synchronization,
//! and a timestamp-polling mode for servers without it.
//!
//! Key design choice: the account key is the entry's **entryUUID**, so a rename (modrdn) is an
//! update of the same account whose `dn` attribute changed, never a delete and a create. The
//! adapter keeps no state that matters for correctness: the position on the server (the sync
//! cookie, or the poll high-water mark) is the checkpoint the engine commits with each batch,
//! and every fetch reads strictly after the committed one. A connection and, in persist
//! mode, an open search are kept between fetches only as an optimisation; whenever the
//! committed checkpoint is not the one last returned, or the connection broke, the adapter
//! reconnects (with backoff) and resumes from the committed cookie. Content equal to the
//! committed shadow produces no event, so a change the server sends twice is applied once.
//!
//! Modes (see `docs/ldap.md`):
//! - `syncrepl`: refreshOnly, one refresh per fetch ([`sync::refresh_only`]);
//! - `persist`: refreshAndPersist, one search kept open, each fetch returns a small batch
//!   bounded by count and time ([`sync::persist`]);
//! - `poll`: `modifyTimestamp` high-water mark and periodic full passes ([`poll::poll`]).

mod collect;
mod config;
mod conn;
mod entry;
mod error;
mod keys;
mod poll;
mod refresh;
mod stale;
mod sync;
pub mod tools;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use idsync_core::{Adapter, AdapterError, ChangeBatch, Checkpoint, Fetch, KnownAccounts, Wakeup};

pub use config::{LdapConfig, Mode, ScopeConfig};
pub use conn::{check_bind, check_credentials};
pub use error::LdapError;

use crate::collect::Collector;
use crate::conn::Client;
use crate::entry::Shaper;

/// Reads one directory subtree and reports what changed after the committed checkpoint.
pub struct LdapAdapter {
    resource: String,
    config: LdapConfig,
    client: Option<Client>,
    persist: Option<sync::Persist>,
    /// Persist mode: the server asked for a refresh from scratch.
    full: bool,
    /// Syncrepl mode: the refresh whose parts are being handed out.
    refresh: Option<refresh::Refresh>,
    /// Syncrepl mode: the last part handed out was not the last of its refresh.
    more: bool,
    /// Times the directory was found older than the committed cookie.
    resets: Arc<AtomicU64>,
    /// A reconcile asked for and not finished: of every account, or of these keys.
    reconcile: Option<Reconcile>,
}

/// What a reconcile reads.
#[derive(Clone, Debug)]
enum Reconcile {
    /// Every account: a refresh from scratch (a full pass in poll mode).
    Every,
    /// These accounts only, read by entryUUID.
    Keys(Arc<foldhash::HashSet<String>>),
}

impl LdapAdapter {
    /// An adapter for resource `resource`. The config should have passed
    /// [`LdapConfig::validate`]; if not, every fetch fails with a permanent error.
    pub fn new(resource: &str, config: LdapConfig) -> Self {
        LdapAdapter {
            resource: resource.to_owned(),
            config,
            client: None,
            persist: None,
            full: false,
            refresh: None,
            more: false,
            resets: Arc::default(),
            reconcile: None,
        }
    }

    /// The adapter's config.
    pub fn config(&self) -> &LdapConfig {
        &self.config
    }

    fn fetch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, LdapError> {
        let problems = self.config.validate();
        if !problems.is_empty() {
            return Err(LdapError::Config(problems.join("; ")));
        }
        let filter = self.config.effective_filter().map_err(LdapError::Config)?;
        let attrs = self.config.attributes.clone();
        let drop: &[&str] = &[];
        let shaper = Shaper::new(
            &self.config.binary_attributes,
            &self.config.dn_attribute,
            drop,
        );
        let resource = self.resource.as_str();
        self.more = false;
        let reconcile = self.reconcile.clone();
        if let Some(Reconcile::Keys(keys)) = &reconcile {
            let client = connected(&mut self.client, &self.config, &self.resets)?;
            let col = keys::read_keys(
                client,
                &shaper,
                resource,
                after.is_none(),
                known,
                &filter,
                &attrs,
                keys,
            )?;
            self.reconcile = None;
            return Ok(batch_or_idle(col, after.cloned(), after, true));
        }
        let every = matches!(reconcile, Some(Reconcile::Every));
        let (col, checkpoint): (Collector<'_>, Option<Checkpoint>) = match self.config.mode {
            // A reconcile in persist mode is a streamed refresh from scratch too; the stream
            // then resumes from the cookie it committed.
            Mode::Syncrepl | Mode::Persist if every => {
                self.refresh_part(&filter, &attrs, after, known, true)?
            }
            Mode::Syncrepl => self.refresh_part(&filter, &attrs, after, known, false)?,
            Mode::Persist => {
                let client = connected(&mut self.client, &self.config, &self.resets)?;
                let f = sync::persist(
                    client,
                    &mut self.persist,
                    &shaper,
                    resource,
                    after,
                    known,
                    &filter,
                    &attrs,
                    &mut self.full,
                )?;
                (f.col, f.checkpoint)
            }
            Mode::Poll => {
                let client = connected(&mut self.client, &self.config, &self.resets)?;
                let (col, cp) = poll::poll(
                    client, &shaper, resource, after, known, &filter, &attrs, every,
                )?;
                (col, Some(cp))
            }
        };
        if !self.more {
            self.reconcile = None;
        }
        Ok(batch_or_idle(col, checkpoint, after, every))
    }

    /// The next part of a streamed refresh (a reconcile's when `reconcile`).
    fn refresh_part<'k>(
        &mut self,
        filter: &str,
        attrs: &[String],
        after: Option<&Checkpoint>,
        known: &'k dyn KnownAccounts,
        reconcile: bool,
    ) -> Result<(Collector<'k>, Option<Checkpoint>), LdapError> {
        if reconcile {
            self.persist = None;
        }
        let params = sync::params_hash(&self.config, filter);
        let search = refresh::Search {
            resource: &self.resource,
            filter,
            attrs,
            params: &params,
            reconcile,
            resets: &self.resets,
        };
        let part = refresh::next_part(
            &mut self.client,
            &mut self.refresh,
            &search,
            &self.config,
            after,
            known,
        )?;
        self.more = part.more;
        Ok((part.col, part.checkpoint))
    }

    /// Makes the next fetches a reconcile of every account (`keys` `None`) or of `keys`.
    fn start_reconcile(&mut self, keys: Option<Vec<String>>) {
        self.refresh = None;
        self.reconcile = Some(match keys {
            None => Reconcile::Every,
            Some(k) => Reconcile::Keys(Arc::new(k.into_iter().collect())),
        });
    }
}

/// The adapter's connection, made when there is none.
fn connected<'c>(
    client: &'c mut Option<Client>,
    config: &LdapConfig,
    resets: &Arc<AtomicU64>,
) -> Result<&'c mut Client, LdapError> {
    if client.is_none() {
        *client = Some(Client::with_counter(config.clone(), resets)?);
    }
    client
        .as_mut()
        .ok_or_else(|| LdapError::Config("no connection".to_owned()))
}

/// The fetch's result: nothing when no event was found and the checkpoint did not move.
fn batch_or_idle(
    col: Collector<'_>,
    checkpoint: Option<Checkpoint>,
    after: Option<&Checkpoint>,
    reconcile: bool,
) -> Fetch {
    if col.events.is_empty() && checkpoint.as_ref() == after {
        return Fetch::Idle;
    }
    Fetch::Batch(ChangeBatch {
        events: col.events,
        checkpoint,
        reconcile,
        ..ChangeBatch::default()
    })
}

impl Adapter for LdapAdapter {
    fn resource(&self) -> &str {
        &self.resource
    }

    fn next_batch(
        &mut self,
        after: Option<&Checkpoint>,
        known: &dyn KnownAccounts,
    ) -> Result<Fetch, AdapterError> {
        match self.fetch(after, known) {
            Ok(f) => Ok(f),
            Err(e) => {
                // The next fetch reconnects (from the committed cookie); when, is the
                // runner's decision (it backs off without blocking other resources).
                self.persist = None;
                self.refresh = None;
                self.more = false;
                self.reconcile = None;
                if let Some(c) = self.client.as_mut() {
                    c.disconnect();
                }
                Err(e.into_adapter(&self.resource))
            }
        }
    }

    fn accept_deletes(&mut self) {
        self.config.deletes_accepted = true;
        if let Some(c) = self.client.as_mut() {
            c.config.deletes_accepted = true;
        }
    }

    fn checkpoint_resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    fn has_more(&self) -> bool {
        self.more
    }

    fn begin_reconcile(&mut self, keys: Option<Vec<String>>) -> Result<(), AdapterError> {
        self.start_reconcile(keys);
        Ok(())
    }

    fn end_reconcile(&mut self) {
        self.reconcile = None;
        self.refresh = None;
        self.more = false;
    }

    fn wakeup(&self) -> Wakeup {
        match self.config.mode {
            Mode::Persist => Wakeup::Stream,
            Mode::Syncrepl | Mode::Poll => Wakeup::Schedule,
        }
    }
}
