//! The hook through which notification policies see each decided event (docs/design.md, the decision order's step 9).
//!
//! Key design choice: the engine knows nothing of templates or email. It records the state
//! of every identity an event is about to change (its *pre-image*, read inside the event's
//! savepoint), and after the event succeeds hands each changed identity's before and after
//! views to a [`Notifier`]; the messages it returns are inserted into the outbox in the same
//! savepoint, so they commit with the checkin or not at all. A notifier error fails the
//! event like a rule error.

use idsync_core::{Decision, Identity};
use idsync_repo::NewOutboxMessage;

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

/// Turns identity changes into outbox messages. Runs on the engine's thread, inside the
/// batch transaction.
pub trait Notifier {
    /// The messages to enqueue for `change`; an error fails the event.
    fn messages(&self, change: &IdentityChange<'_>) -> Result<Vec<NewOutboxMessage>, String>;
}
