//! The rule host for one event: repository queries and, for process and resolve rules,
//! writes, all inside the batch transaction that is open while the event is decided.

use std::cell::RefCell;
use std::sync::Arc;

use idsync_core::{AttrMap, Conditions, Identity};
use idsync_repo::Repo;
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
}

impl EventHost {
    pub fn new(repo: &Arc<Repo>, resource: &str, key: &str) -> EventHost {
        EventHost {
            repo: repo.clone(),
            resource: resource.to_owned(),
            key: key.to_owned(),
            work_items: RefCell::new(Vec::new()),
            touched: RefCell::new(None),
        }
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
        let id = self
            .repo
            .create_identity(name, attrs)
            .map_err(|e| e.to_string())?;
        self.touch(name);
        Ok(id)
    }

    fn checkin(&self, view: &Identity) -> Result<i64, String> {
        let v = self
            .repo
            .checkin(&view.name, view.version, &view.attrs, view.disabled)
            .map_err(|e| e.to_string())?;
        self.touch(&view.name);
        Ok(v)
    }

    fn delete(&self, name: &str) -> Result<bool, String> {
        self.repo.delete_identity(name).map_err(|e| e.to_string())
    }

    fn link(&self, name: &str) -> Result<(), String> {
        self.repo
            .link(name, &self.resource, &self.key)
            .map_err(|e| e.to_string())?;
        self.touch(name);
        Ok(())
    }

    fn unlink(&self) -> Result<bool, String> {
        self.repo
            .unlink(&self.resource, &self.key)
            .map_err(|e| e.to_string())
    }

    fn work_item(&self, message: &str) -> Result<(), String> {
        tracing::warn!(resource = %self.resource, key = %self.key, "work item: {message}");
        self.work_items.borrow_mut().push(message.to_owned());
        Ok(())
    }
}
