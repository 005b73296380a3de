//! A resource's compiled sync policy: which rules run, and what the engine does by default.

use std::time::Duration;

use idsync_rules::Script;

use crate::fuzzy::Fuzzy;
pub use crate::lifecycle::Lifecycle;

/// What the engine does to the owner when its account is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeleteAction {
    /// Remove the link; the identity stays as it is.
    #[default]
    Unlink,
    /// Remove the link and disable the identity.
    Disable,
    /// Delete the identity (and all its links).
    Delete,
}

/// What a failed event does to its batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Record the event as failed; the rest of the batch proceeds.
    #[default]
    Continue,
    /// Roll the whole batch back and stop the resource.
    Halt,
}

/// Who settles an event that correlation left disputed (several candidates) or unmatched
/// (none, with `create_unmatched` off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Escalation {
    /// The resolve rule; without one the event fails (a failed event naming the
    /// candidates).
    #[default]
    ResolveRule,
    /// An operator: the engine opens a work item (action `work_item`); the resolve rule
    /// does not run for this situation.
    WorkItem,
}

/// Where a mapped identity attribute gets its value.
#[derive(Clone, Debug)]
pub enum MappingSource {
    /// An account attribute, copied as is (absent removes the identity attribute).
    Attribute(String),
    /// A Rhai expression over `account`, `previous`, `identity`, `global`.
    Expr(Script),
}

/// How strongly a mapping gives its value (docs/rules.md, "Attribute authority").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strength {
    /// Always (what every mapping did before strengths): the value is set whenever the
    /// mapping runs; for an attribute `authority` governs, unless a source ranked higher
    /// gives a value.
    #[default]
    Strong,
    /// Only when no other source gives a value: for an attribute `authority` governs, when
    /// no linked account's strong mapping gives one; otherwise when the identity has no
    /// value for the attribute.
    Weak,
    /// Only when the event creates the identity; later passes leave the value alone.
    Initial,
}

impl Strength {
    /// Its name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Strength::Strong => "strong",
            Strength::Weak => "weak",
            Strength::Initial => "initial",
        }
    }
}

/// One attribute mapping of the input form.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// The identity attribute to fill.
    pub attribute: String,
    /// Its source.
    pub source: MappingSource,
    /// How strongly it gives its value.
    pub strength: Strength,
}

/// Everything the engine needs to decide the events of one resource.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Resource name.
    pub resource: String,
    /// Filter rule: false-like ignores the event.
    pub filter: Option<Script>,
    /// Process rule: when set, it handles every event and nothing else runs.
    pub process: Option<Script>,
    /// Delete rule: true-like turns the event into a delete.
    pub delete: Option<Script>,
    /// Correlation rule: candidates for an account without owner.
    pub correlation: Option<Script>,
    /// Confirmation rule: keeps the candidates for which it is true-like.
    pub confirmation: Option<Script>,
    /// Resolve rule: handles unmatched (without create) and disputed events.
    pub resolve: Option<Script>,
    /// Naming expression for new identities (default: the account key).
    pub naming: Option<Script>,
    /// Create an identity when nothing matches (default true).
    pub create_unmatched: bool,
    /// Who settles a disputed event (default: the resolve rule).
    pub on_disputed: Escalation,
    /// Who settles an unmatched event when `create_unmatched` is off (default: the resolve
    /// rule).
    pub on_unmatched: Escalation,
    /// Copy every account attribute into the identity and give rules `global`.
    pub populate_global: bool,
    /// The delete action.
    pub delete_action: DeleteAction,
    /// With [`DeleteAction::Disable`]: the identity is deleted this long after it was
    /// disabled (a lifecycle timer), unless the account comes back or the identity gets a
    /// new link first (`delete_action: { action: disable, then: delete, after: 30d }`).
    pub delete_after: Option<Duration>,
    /// Date-driven state: the identity attributes holding `valid_from` and `valid_to`.
    pub lifecycle: Option<Lifecycle>,
    /// What a failed event does.
    pub on_error: OnError,
    /// The input form.
    pub mappings: Vec<Mapping>,
    /// Fuzzy correlation candidates: an account no identity matches, but that resembles
    /// some, opens a `similar` work item instead of being created or resolved.
    pub fuzzy: Option<Fuzzy>,
}

impl Policy {
    /// A policy with no rules: every account creates or updates an identity named by its key.
    pub fn new(resource: &str) -> Policy {
        Policy {
            resource: resource.to_owned(),
            filter: None,
            process: None,
            delete: None,
            correlation: None,
            confirmation: None,
            resolve: None,
            naming: None,
            create_unmatched: true,
            on_disputed: Escalation::ResolveRule,
            on_unmatched: Escalation::ResolveRule,
            populate_global: false,
            delete_action: DeleteAction::Unlink,
            delete_after: None,
            lifecycle: None,
            on_error: OnError::Continue,
            mappings: Vec::new(),
            fuzzy: None,
        }
    }

    /// Every script of the policy: rules, naming and mapping expressions.
    fn scripts(&self) -> impl Iterator<Item = &Script> {
        [
            &self.filter,
            &self.process,
            &self.delete,
            &self.correlation,
            &self.confirmation,
            &self.resolve,
            &self.naming,
        ]
        .into_iter()
        .flatten()
        .chain(self.mapping_scripts())
    }

    fn mapping_scripts(&self) -> impl Iterator<Item = &Script> {
        self.mappings.iter().filter_map(|m| match &m.source {
            MappingSource::Expr(s) => Some(s),
            MappingSource::Attribute(_) => None,
        })
    }

    /// Whether any script may read variable `name` ([`Script::mentions`]).
    fn reads(&self, name: &str) -> bool {
        self.scripts().any(|s| s.mentions(name))
    }
}

/// Which optional variables a policy's scripts may read ([`Script::mentions`]); one not
/// named anywhere is not built for each event. Worked out once per batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScopeNeeds {
    /// `account` (a policy with no script at all, or none that names it, does not).
    pub account: bool,
    /// `global` (only with `populate_global`).
    pub global: bool,
    pub previous: bool,
    pub resource: bool,
    pub key: bool,
    pub op: bool,
    /// `identity` in mapping expressions (with the linked accounts of an update).
    pub mapping_identity: bool,
}

impl ScopeNeeds {
    pub fn of(policy: &Policy) -> ScopeNeeds {
        ScopeNeeds {
            account: policy.reads("account"),
            global: policy.populate_global && policy.reads("global"),
            previous: policy.reads("previous"),
            resource: policy.reads("resource"),
            key: policy.reads("key"),
            op: policy.reads("op"),
            mapping_identity: policy.mapping_scripts().any(|s| s.mentions("identity")),
        }
    }
}
