//! The hook through which notification policies see each decided event (docs/design.md, the decision order's step 9).
//!
//! Key design choice: the engine knows nothing of templates or email. It records the state
//! of every identity an event is about to change (its *pre-image*, read inside the event's
//! savepoint), and after the event succeeds hands each changed identity's before and after
//! views to a [`Notifier`]; the messages it returns are inserted into the outbox in the same
//! savepoint, so they commit with the checkin or not at all. A notifier error fails the
//! event like a rule error. A new work item is handed to the notifier the same way
//! ([`Notifier::work_item`]), once, when it is opened (not when the same account raises it
//! again).

use idsync_core::{AttrMap, Decision, Identity};
use idsync_repo::{NewOutboxMessage, WorkItemKind};

/// One identity changed by one event.
#[derive(Clone, Copy, Debug)]
pub struct IdentityChange<'a> {
    /// The identity before the event (`None`: created by it).
    pub before: Option<&'a Identity>,
    /// The identity after the event (`None`: deleted by it).
    pub after: Option<&'a Identity>,
    /// The event's decision so far (resource, key, situation, action, changes).
    pub decision: &'a Decision,
}

/// A work item just opened by an event.
#[derive(Clone, Copy, Debug)]
pub struct WorkItemNotice<'a> {
    /// Its id (`idsync work-items show ID`).
    pub id: i64,
    /// Why it was raised.
    pub kind: WorkItemKind,
    /// What the operator is asked.
    pub reason: &'a str,
    /// The candidate identities.
    pub candidates: &'a [String],
    /// The account's attributes as the event saw them.
    pub account: &'a AttrMap,
    /// The event's decision so far (resource, key, situation, action).
    pub decision: &'a Decision,
}

/// Turns identity changes (and new work items) into outbox messages. Runs on the engine's
/// thread, inside the batch transaction.
pub trait Notifier {
    /// The messages to enqueue for `change`; an error fails the event.
    fn messages(&self, change: &IdentityChange<'_>) -> Result<Vec<NewOutboxMessage>, String>;

    /// The messages to enqueue for a work item the event opened; an error fails the
    /// event. The default sends nothing.
    fn work_item(&self, item: &WorkItemNotice<'_>) -> Result<Vec<NewOutboxMessage>, String> {
        let _ = item;
        Ok(Vec::new())
    }
}
