//! Work items: what the engine or a rule left to an operator — an account with several
//! candidate identities (disputed) or none (unmatched), when the resource says so, one
//! that matches no identity exactly but resembles some (similar: fuzzy candidates), or a
//! rule's `ctx.work_item(...)` — kept until an operator acts on it.
//!
//! Items are written in the batch transaction of the event that raised them, so a crash
//! leaves a decision with its item or neither. An account has at most one *open* item per
//! kind (for rule items: per message): the same account raised again refreshes the open
//! item (`seen`, the latest decision and candidates) instead of opening a second one. The
//! partial unique index `work_items_one_open` holds that even if two writers raced.

use serde::{Deserialize, Serialize};

use crate::db::{Arg, Conn, ToArg};
use crate::error::{Context, RepoError, from_json, to_json};
use crate::{Repo, args, now};

/// Why a work item was raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkItemKind {
    /// Several candidate identities (`on_disputed: work_item`).
    Disputed,
    /// No candidate identity (`on_unmatched: work_item`).
    Unmatched,
    /// A rule called `ctx.work_item(text)`.
    Rule,
    /// No identity matches exactly, but some are similar (fuzzy correlation candidates,
    /// listed with their scores in the reason): an operator links, creates or ignores.
    Similar,
}

impl WorkItemKind {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkItemKind::Disputed => "disputed",
            WorkItemKind::Unmatched => "unmatched",
            WorkItemKind::Rule => "rule",
            WorkItemKind::Similar => "similar",
        }
    }

    fn parse(s: &str) -> Option<WorkItemKind> {
        [
            WorkItemKind::Disputed,
            WorkItemKind::Unmatched,
            WorkItemKind::Rule,
            WorkItemKind::Similar,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Whether an item waits for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkItemState {
    /// Waiting for an operator.
    Open,
    /// An operator acted on it (see its [`Closure`]).
    Closed,
}

impl WorkItemState {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkItemState::Open => "open",
            WorkItemState::Closed => "closed",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<WorkItemState> {
        match s {
            "open" => Some(WorkItemState::Open),
            "closed" => Some(WorkItemState::Closed),
            _ => None,
        }
    }
}

/// How an item was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The account was linked to an existing identity.
    Linked,
    /// An identity was created for the account.
    Created,
    /// The operator closed it without changing anything.
    Ignored,
}

impl Resolution {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Linked => "linked",
            Resolution::Created => "created",
            Resolution::Ignored => "ignored",
        }
    }

    fn parse(s: &str) -> Option<Resolution> {
        [Resolution::Linked, Resolution::Created, Resolution::Ignored]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A work item to raise.
#[derive(Clone, Copy, Debug)]
pub struct NewWorkItem<'a> {
    /// Resource name.
    pub resource: &'a str,
    /// Account key.
    pub key: &'a str,
    /// Why.
    pub kind: WorkItemKind,
    /// What the operator is asked, in words.
    pub reason: &'a str,
    /// The candidate identities of the decision (names).
    pub candidates: &'a [String],
}

/// What raising an item did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The item's id.
    pub id: i64,
    /// Whether it is a new item (false: an open item of the account was seen again).
    pub new: bool,
}

/// How and when an item was closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closure {
    /// When (RFC 3339).
    pub at: String,
    /// What the operator did.
    pub resolution: Resolution,
    /// The identity the account was linked to or created as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The operator decision that closed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<i64>,
    /// Why, as the operator said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How to close an item ([`Repo::close_work_item`]; the time is now).
#[derive(Clone, Copy, Debug)]
pub struct NewClosure<'a> {
    /// What the operator did.
    pub resolution: Resolution,
    /// The identity the account was linked to or created as.
    pub identity: Option<&'a str>,
    /// The operator decision that closed it.
    pub decision_id: Option<i64>,
    /// Why, as the operator said.
    pub reason: Option<&'a str>,
}

/// A stored work item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// Id, stable and never reused.
    pub id: i64,
    /// When it was raised (RFC 3339).
    pub created_at: String,
    /// Resource name.
    pub resource: String,
    /// Account key.
    pub key: String,
    /// Why it was raised.
    pub kind: WorkItemKind,
    /// What the operator is asked (the latest wording).
    pub reason: String,
    /// Candidate identities (as of the latest event).
    pub candidates: Vec<String>,
    /// The decision record that raised it.
    pub decision_id: Option<i64>,
    /// How many events raised it (the first included).
    pub seen: i64,
    /// When it was last raised (RFC 3339).
    pub last_seen_at: String,
    /// The decision record that last raised it.
    pub last_decision_id: Option<i64>,
    /// Open or closed.
    pub state: WorkItemState,
    /// How it was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<Closure>,
}

/// Which items to list; the default lists all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkItemFilter {
    /// Only this state.
    pub state: Option<WorkItemState>,
    /// Only this resource.
    pub resource: Option<String>,
    /// Only this account key.
    pub key: Option<String>,
}

const COLUMNS: &str = "id, created_at, resource, key, kind, reason, candidates, decision_id, \
     seen, last_seen_at, last_decision_id, state, closed_at, resolution, resolved_identity, \
     closed_by_decision, closed_reason";

impl Repo {
    /// Raises a work item for an account, or, when the account already has an open item of
    /// the same kind (rule items: with the same reason), refreshes that one: its reason,
    /// candidates, `seen` count and last-seen time. Call inside the batch transaction.
    pub fn raise_work_item(&self, item: &NewWorkItem<'_>) -> Result<Raised, RepoError> {
        let what = || {
            format!(
                "work item of account {}/{} ({})",
                item.resource,
                item.key,
                item.kind.as_str()
            )
        };
        let candidates = to_json(&item.candidates, what)?;
        let conn = self.lock()?;
        let open: Option<i64> = conn
            .query_row(
                "SELECT id FROM work_items WHERE resource = ?1 AND key = ?2 AND kind = ?3 \
                 AND state = 'open' AND (kind <> 'rule' OR reason = ?4)",
                args![item.resource, item.key, item.kind.as_str(), item.reason],
                |r| r.get(0),
            )
            .with_ctx(|| format!("looking up the open {}", what()))?;
        let at = now();
        if let Some(id) = open {
            conn.execute(
                "UPDATE work_items SET seen = seen + 1, last_seen_at = ?2, reason = ?3, \
                 candidates = ?4 WHERE id = ?1",
                args![id, at, item.reason, candidates],
            )
            .with_ctx(|| format!("refreshing the {}", what()))?;
            return Ok(Raised { id, new: false });
        }
        let id: i64 = conn
            .insert_one_id(
                "INSERT INTO work_items (created_at, resource, key, kind, reason, candidates, \
                 last_seen_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?1, 'open') RETURNING id",
                args![
                    at,
                    item.resource,
                    item.key,
                    item.kind.as_str(),
                    item.reason,
                    candidates
                ],
            )
            .with_ctx(|| format!("recording the {}", what()))?;
        Ok(Raised { id, new: true })
    }

    /// Notes the decision record that raised (or raised again) item `id`: the first one
    /// stays its `decision_id`, the newest is its `last_decision_id`.
    pub fn note_work_item_decision(&self, id: i64, decision_id: i64) -> Result<(), RepoError> {
        self.lock()?
            .execute(
                "UPDATE work_items SET decision_id = coalesce(decision_id, ?2), \
                 last_decision_id = ?2 WHERE id = ?1",
                args![id, decision_id],
            )
            .with_ctx(|| format!("noting the decision of work item #{id}"))?;
        Ok(())
    }

    /// Closes item `id` if it is open; false if it was not (closed already, or unknown).
    pub fn close_work_item(&self, id: i64, closure: &NewClosure<'_>) -> Result<bool, RepoError> {
        let n = self
            .lock()?
            .execute(
                "UPDATE work_items SET state = 'closed', closed_at = ?2, resolution = ?3, \
                 resolved_identity = ?4, closed_by_decision = ?5, closed_reason = ?6 \
                 WHERE id = ?1 AND state = 'open'",
                args![
                    id,
                    now(),
                    closure.resolution.as_str(),
                    closure.identity,
                    closure.decision_id,
                    closure.reason
                ],
            )
            .with_ctx(|| format!("closing work item #{id}"))?;
        Ok(n > 0)
    }

    /// Work item `id`.
    pub fn work_item(&self, id: i64) -> Result<Option<WorkItem>, RepoError> {
        let rows = query(&*self.lock()?, "WHERE id = ?1", args![id])?;
        rows.into_iter().next().map(RawItem::decode).transpose()
    }

    /// Work items matching `filter`, oldest first.
    pub fn work_items(&self, filter: &WorkItemFilter) -> Result<Vec<WorkItem>, RepoError> {
        let mut wheres: Vec<&str> = Vec::new();
        let mut args: Vec<Arg<'_>> = Vec::new();
        if let Some(s) = &filter.state {
            wheres.push("state = ?");
            args.push(s.as_str().to_arg());
        }
        if let Some(r) = &filter.resource {
            wheres.push("resource = ?");
            args.push(r.to_arg());
        }
        if let Some(k) = &filter.key {
            wheres.push("key = ?");
            args.push(k.to_arg());
        }
        let mut tail = String::new();
        if !wheres.is_empty() {
            tail.push_str("WHERE ");
            tail.push_str(&wheres.join(" AND "));
        }
        tail.push_str(" ORDER BY id");
        let rows = query(&*self.lock()?, &tail, &args)?;
        rows.into_iter().map(RawItem::decode).collect()
    }

    /// How many work items are open.
    pub fn open_work_item_count(&self) -> Result<u64, RepoError> {
        let n: i64 = self
            .lock()?
            .query_one(
                "SELECT count(*) FROM work_items WHERE state = 'open'",
                args![],
                |r| r.get(0),
            )
            .ctx("counting open work items")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A row of `work_items` before decoding.
struct RawItem {
    id: i64,
    created_at: String,
    resource: String,
    key: String,
    kind: String,
    reason: String,
    candidates: String,
    decision_id: Option<i64>,
    seen: i64,
    last_seen_at: String,
    last_decision_id: Option<i64>,
    state: String,
    closed_at: Option<String>,
    resolution: Option<String>,
    resolved_identity: Option<String>,
    closed_by_decision: Option<i64>,
    closed_reason: Option<String>,
}

impl RawItem {
    fn decode(self) -> Result<WorkItem, RepoError> {
        let id = self.id;
        let corrupt = |what: &str, value: &str| RepoError::Corrupt {
            what: format!("work item {id}"),
            message: format!("unknown {what} '{value}'"),
        };
        let kind = WorkItemKind::parse(&self.kind).ok_or_else(|| corrupt("kind", &self.kind))?;
        let state =
            WorkItemState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?;
        let closed = match (state, self.closed_at, self.resolution) {
            (WorkItemState::Closed, Some(at), Some(r)) => Some(Closure {
                at,
                resolution: Resolution::parse(&r).ok_or_else(|| corrupt("resolution", &r))?,
                identity: self.resolved_identity,
                decision_id: self.closed_by_decision,
                reason: self.closed_reason,
            }),
            _ => None,
        };
        Ok(WorkItem {
            id,
            created_at: self.created_at,
            resource: self.resource,
            key: self.key,
            kind,
            reason: self.reason,
            candidates: from_json(&self.candidates, || format!("work item {id}"))?,
            decision_id: self.decision_id,
            seen: self.seen,
            last_seen_at: self.last_seen_at,
            last_decision_id: self.last_decision_id,
            state,
            closed,
        })
    }
}

fn query(conn: &Conn, tail: &str, args: &[Arg<'_>]) -> Result<Vec<RawItem>, RepoError> {
    let sql = format!("SELECT {COLUMNS} FROM work_items {tail}");
    conn.query_map(&sql, args, |r| {
        Ok(RawItem {
            id: r.get(0)?,
            created_at: r.get(1)?,
            resource: r.get(2)?,
            key: r.get(3)?,
            kind: r.get(4)?,
            reason: r.get(5)?,
            candidates: r.get(6)?,
            decision_id: r.get(7)?,
            seen: r.get(8)?,
            last_seen_at: r.get(9)?,
            last_decision_id: r.get(10)?,
            state: r.get(11)?,
            closed_at: r.get(12)?,
            resolution: r.get(13)?,
            resolved_identity: r.get(14)?,
            closed_by_decision: r.get(15)?,
            closed_reason: r.get(16)?,
        })
    })
    .ctx("reading work items")
}
