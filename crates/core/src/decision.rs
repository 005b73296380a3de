//! Decision records: one per change event, saying what the engine found and did
//! (the Sun WavesetResult).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::attrs::AttrChange;
use crate::event::Op;

/// What the engine found for an event (midPoint's situation names, plus our own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Situation {
    /// The filter rule returned false: nothing else ran.
    Filtered,
    /// The process rule handled the event.
    Processed,
    /// An identity already owns the account.
    Linked,
    /// No owner; exactly one candidate was found and confirmed.
    Unlinked,
    /// No owner and no candidate.
    Unmatched,
    /// No owner and several candidates.
    Disputed,
    /// The account was deleted (by op or by the delete rule).
    Deleted,
}

impl Situation {
    /// Every situation, for listings.
    pub const ALL: [Situation; 7] = [
        Situation::Filtered,
        Situation::Processed,
        Situation::Linked,
        Situation::Unlinked,
        Situation::Unmatched,
        Situation::Disputed,
        Situation::Deleted,
    ];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Situation::Filtered => "filtered",
            Situation::Processed => "processed",
            Situation::Linked => "linked",
            Situation::Unlinked => "unlinked",
            Situation::Unmatched => "unmatched",
            Situation::Disputed => "disputed",
            Situation::Deleted => "deleted",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Situation> {
        Situation::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Situation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the engine did about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing (filtered, or a delete with no owner).
    Ignored,
    /// The owner was updated from the account.
    Updated,
    /// The account was linked to the one candidate and the identity updated.
    Linked,
    /// A new identity was created and linked.
    Created,
    /// The resolve rule handled the event.
    Resolved,
    /// The process rule handled the event.
    Processed,
    /// Delete action: the account was unlinked.
    Unlinked,
    /// Delete action: the account was unlinked and the identity disabled.
    Disabled,
    /// Delete action: the identity was deleted.
    DeletedIdentity,
    /// A rule or a check failed; the event is in the failed-event list.
    Failed,
    /// The situation was left to an operator: a work item was opened (the resource's
    /// `on_disputed` or `on_unmatched` is `work_item`).
    WorkItem,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 11] = [
        Action::Ignored,
        Action::Updated,
        Action::Linked,
        Action::Created,
        Action::Resolved,
        Action::Processed,
        Action::Unlinked,
        Action::Disabled,
        Action::DeletedIdentity,
        Action::Failed,
        Action::WorkItem,
    ];

    /// The action named `s` ([`Action::as_str`]).
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ignored => "ignored",
            Action::Updated => "updated",
            Action::Linked => "linked",
            Action::Created => "created",
            Action::Resolved => "resolved",
            Action::Processed => "processed",
            Action::Unlinked => "unlinked",
            Action::Disabled => "disabled",
            Action::DeletedIdentity => "deleted_identity",
            Action::Failed => "failed",
            Action::WorkItem => "work_item",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule's run for an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleOutcome {
    /// Role of the rule: filter, process, delete, correlation, confirmation, resolve, mapping.
    pub rule: String,
    /// Script or expression label (file name, or `mapping.<attr>`).
    pub script: String,
    /// What it returned, rendered for people.
    pub result: String,
}

/// The record of one event's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Resource name.
    pub resource: String,
    /// Account key.
    pub key: String,
    /// Event op.
    pub op: Op,
    /// What was found; `None` when the event failed before a situation was known.
    pub situation: Option<Situation>,
    /// What was done.
    pub action: Action,
    /// The identity acted on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Candidates found by correlation (before confirmation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    /// Candidates kept by confirmation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confirmed: Vec<String>,
    /// Each rule run, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleOutcome>,
    /// Attribute changes checked in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<AttrChange>,
    /// The error, for a failed event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When deciding began: the record's time, and the time delays planned by the decision
    /// (a grace period) count from, so the two agree to the millisecond. `None`: the time it
    /// is recorded.
    #[serde(skip)]
    pub at: Option<std::time::SystemTime>,
}

impl Decision {
    /// Whether the decision left everything as it was: an owned account whose mappings
    /// give the identity it already has, a filtered event, a delete that no identity owns.
    /// A failed decision, a link, a creation, a delete action and whatever a process or
    /// resolve rule did count as changes.
    pub fn changed_nothing(&self) -> bool {
        self.error.is_none()
            && self.changes.is_empty()
            && matches!(self.action, Action::Updated | Action::Ignored)
    }
}
