//! The rule host for one event: repository queries and, for process and resolve rules,
//! writes, all inside the batch transaction that is open while the event is decided.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use idsync_core::{AttrMap, Conditions, Identity};
use idsync_repo::{Repo, RepoError};
use idsync_rules::RuleHost;

/// Binds the repository and the event's account for a rule run.
pub(crate) struct EventHost {
    pub repo: Arc<Repo>,
    pub resource: String,
    pub key: String,
    /// Work items the rules raised.
    pub work_items: RefCell<Vec<String>>,
    /// The last identity a process or resolve rule created, checked in or linked to.
    pub touched: RefCell<Option<String>>,
    /// Whether to record pre-images (only when a notifier is set).
    pub capture: Cell<bool>,
    /// Each identity this event changed, as it was before its first change.
    pub pre_images: RefCell<Vec<(String, Option<Identity>)>>,
    /// The identities a process or resolve rule linked the account to (their
    /// grace-period deletes are cancelled).
    pub linked: RefCell<Vec<String>>,
}

impl EventHost {
    pub fn new(repo: &Arc<Repo>, resource: &str, key: &str) -> EventHost {
        EventHost {
            repo: repo.clone(),
            resource: resource.to_owned(),
            key: key.to_owned(),
            work_items: RefCell::new(Vec::new()),
            touched: RefCell::new(None),
            capture: Cell::new(false),
            pre_images: RefCell::new(Vec::new()),
            linked: RefCell::new(Vec::new()),
        }
    }

    /// Records the identity `name` as it is now, before this event's first change to it.
    pub fn pre_image(&self, name: &str) -> Result<(), RepoError> {
        if !self.capture.get() || self.pre_images.borrow().iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let view = self.repo.identity(name)?;
        self.pre_images.borrow_mut().push((name.to_owned(), view));
        Ok(())
    }

    fn touch(&self, name: &str) {
        *self.touched.borrow_mut() = Some(name.to_owned());
    }
}

impl RuleHost for EventHost {
    fn find_identity(&self, name: &str) -> Result<Option<Identity>, String> {
        self.repo.identity(name).map_err(|e| e.to_string())
    }

    fn query(&self, conds: &Conditions) -> Result<Vec<String>, String> {
        self.repo.find(conds).map_err(|e| e.to_string())
    }

    fn create(&self, name: &str, attrs: &AttrMap) -> Result<Identity, String> {
        self.pre_image(name).map_err(|e| e.to_string())?;
        let id = self
            .repo
            .create_identity(name, attrs)
            .map_err(|e| e.to_string())?;
        self.touch(name);
        Ok(id)
    }

    fn checkin(&self, view: &Identity) -> Result<i64, String> {
        self.pre_image(&view.name).map_err(|e| e.to_string())?;
        let v = self
            .repo
            .checkin(&view.name, view.version, &view.attrs, view.disabled)
            .map_err(|e| e.to_string())?;
        self.touch(&view.name);
        Ok(v)
    }

    fn delete(&self, name: &str) -> Result<bool, String> {
        self.pre_image(name).map_err(|e| e.to_string())?;
        self.repo.delete_identity(name).map_err(|e| e.to_string())
    }

    fn link(&self, name: &str) -> Result<(), String> {
        self.pre_image(name).map_err(|e| e.to_string())?;
        self.repo
            .link(name, &self.resource, &self.key)
            .map_err(|e| e.to_string())?;
        self.touch(name);
        self.linked.borrow_mut().push(name.to_owned());
        Ok(())
    }

    fn unlink(&self) -> Result<bool, String> {
        if self.capture.get()
            && let Some(owner) = self
                .repo
                .owner_of(&self.resource, &self.key)
                .map_err(|e| e.to_string())?
        {
            self.pre_image(&owner).map_err(|e| e.to_string())?;
        }
        self.repo
            .unlink(&self.resource, &self.key)
            .map_err(|e| e.to_string())
    }

    fn work_item(&self, message: &str) -> Result<(), String> {
        let _span =
            tracing::warn_span!("event", resource = %self.resource, key = %self.key).entered();
        tracing::warn!("work item: {message}");
        self.work_items.borrow_mut().push(message.to_owned());
        Ok(())
    }
}
