//! Attribute authority: which linked account gives each governed attribute its value.
//!
//! An attribute is *governed* when the config's `authority:` names it with its resources
//! in precedence order. Its value is not last-writer-wins: of the identity's linked
//! accounts, each offers what its resource's mapping of the attribute gives (the account
//! in hand from the event, the others from their shadows, through their own resources'
//! mappings), and the value is the best offer that has a value — a `strong` mapping before
//! a `weak` one, then the resource ranked first; between two accounts of one resource, the
//! account in hand, then the one that gave the value so far. No offer with a value: the
//! attribute is removed. The repository remembers the winning account
//! (`attribute_sources`), so an account that is unlinked or deleted takes its values
//! with it: those attributes are decided again from the remaining accounts.
//!
//! Key design choice: an event recomputes a governed attribute from every linked account,
//! not only from what changed, so the result depends on the accounts and the config alone
//! (a reconcile of any resource that maps the attribute converges to it); the cost, one
//! read of the linked accounts and of the recorded sources, is paid only by events of
//! resources that map a governed attribute, and by unlinks. Attributes `authority:` does
//! not name are untouched by all this (docs/rules.md, "Attribute authority").

use std::borrow::Cow;
use std::collections::HashMap;

use idsync_core::{
    AttrMap, ChangeEvent, Decision, Identity, LinkedAccount, Op, RuleOutcome, Value,
};
use idsync_repo::{AttributeSource, RepoError};
use idsync_rules::identity_to_dynamic;

use crate::EventError;
use crate::pipeline::Decider;
use crate::policy::{Mapping, MappingSource, Policy, ScopeNeeds, Strength};

/// The `rule` of the [`RuleOutcome`] that records an authority decision (its `script` is
/// the attribute, its `result` what was decided and why).
pub const AUTHORITY_RULE: &str = "authority";

/// The config's `authority:`, with every resource's mappings (to read what another
/// account offers).
#[derive(Debug, Default)]
pub struct Authority {
    /// Governed attribute (lowercased) → resources, first ranked first.
    precedence: HashMap<String, Vec<String>>,
    /// Resource → its policy and the variables its scripts read.
    sources: HashMap<String, (Policy, ScopeNeeds)>,
    /// The resources that map a governed attribute.
    mapping: Vec<String>,
}

impl Authority {
    /// The precedence lists (`attribute → [resource, …]`, first wins) over the resources'
    /// policies.
    pub fn new(
        precedence: impl IntoIterator<Item = (String, Vec<String>)>,
        policies: &[Policy],
    ) -> Authority {
        let precedence: HashMap<String, Vec<String>> = precedence
            .into_iter()
            .map(|(attr, order)| (attr.to_lowercase(), order))
            .collect();
        let mapping = policies
            .iter()
            .filter(|p| {
                p.mappings
                    .iter()
                    .any(|m| precedence.contains_key(&*fold(&m.attribute)))
            })
            .map(|p| p.resource.clone())
            .collect();
        Authority {
            precedence,
            sources: policies
                .iter()
                .map(|p| (p.resource.clone(), (p.clone(), ScopeNeeds::of(p))))
                .collect(),
            mapping,
        }
    }

    /// Whether `resource` maps a governed attribute.
    pub fn mapped_by(&self, resource: &str) -> bool {
        self.mapping.iter().any(|r| r == resource)
    }

    /// Whether no attribute is governed.
    pub fn is_empty(&self) -> bool {
        self.precedence.is_empty()
    }

    /// Whether attribute `attr` is governed.
    pub fn governs(&self, attr: &str) -> bool {
        self.precedence.contains_key(&*fold(attr))
    }

    /// The place of `resource` in the precedence of `attr` (0 first); a resource not
    /// listed ranks after every listed one (`idsync check` refuses such a mapping).
    fn rank(&self, attr: &str, resource: &str) -> usize {
        let order = self.precedence.get(attr).map(Vec::as_slice).unwrap_or(&[]);
        order
            .iter()
            .position(|r| r == resource)
            .unwrap_or(order.len())
    }

    /// The mapping through which `resource` fills governed attribute `attr` (lowercased):
    /// its last one, as the last mapping of an attribute wins.
    fn mapping<'p>(policy: &'p Policy, attr: &str) -> Option<&'p Mapping> {
        policy
            .mappings
            .iter()
            .rev()
            .find(|m| fold(&m.attribute) == attr)
    }
}

/// An attribute name lowercased (as `AttrMap` folds names), without a copy for a name in
/// lowercase ASCII already.
fn fold(name: &str) -> Cow<'_, str> {
    if name
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
    {
        Cow::Owned(name.to_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// What the account in hand's mappings offer for one governed attribute, gathered while
/// the mappings run (they do not set governed attributes themselves).
#[derive(Clone, Debug)]
pub(crate) struct Offer {
    /// The attribute, lowercased.
    pub attr: String,
    /// As the mapping spells it.
    pub name: String,
    /// The mapping's strength.
    pub strength: Strength,
    /// Its values; empty when it gives none.
    pub values: Vec<Value>,
}

/// One account's claim to a governed attribute.
#[derive(Clone, Debug)]
struct Claim {
    resource: String,
    key: String,
    name: String,
    strength: Strength,
    values: Vec<Value>,
    /// The account of the event in hand.
    in_hand: bool,
}

impl Claim {
    fn is(&self, source: Option<&AttributeSource>) -> bool {
        source.is_some_and(|s| s.resource == self.resource && s.key == self.key)
    }
}

/// Changes to the recorded sources: attribute (lowercased) → the account that gives it
/// now, or `None` to forget it.
pub(crate) type SourceWrites = Vec<(String, Option<(String, String)>)>;

/// Weak values come after every strong (or initial) one.
fn tier(s: Strength) -> u8 {
    match s {
        Strength::Strong | Strength::Initial => 0,
        Strength::Weak => 1,
    }
}

/// Why `loser` gives way to `winner`, in words.
fn why_lower(auth: &Authority, attr: &str, winner: &Claim, loser: &Claim) -> String {
    if tier(loser.strength) > tier(winner.strength) {
        format!("the mapping of {} is weak", loser.resource)
    } else if winner.resource == loser.resource {
        format!("account {} of {} changed last", winner.key, winner.resource)
    } else if auth.rank(attr, &loser.resource) > auth.rank(attr, &winner.resource) {
        format!("{} ranks lower", loser.resource)
    } else {
        format!("{} gives it", winner.resource)
    }
}

impl Decider<'_> {
    /// Whether mappings set attribute `attr` themselves (it is not governed).
    pub(crate) fn governed(&self, attr: &str) -> bool {
        self.authority.is_some_and(|a| a.governs(attr))
    }

    /// Sets the governed attributes of a new identity from the account in hand's offers
    /// (it is the identity's only account); returns the sources to record once the
    /// identity exists.
    pub(crate) fn settle_new(&mut self, attrs: &mut AttrMap) -> SourceWrites {
        let mut writes = Vec::new();
        for offer in std::mem::take(&mut self.offers) {
            if offer.values.is_empty() {
                continue;
            }
            attrs.set(&offer.name, offer.values);
            writes.push((
                offer.attr,
                Some((self.event.resource.clone(), self.event.key.clone())),
            ));
        }
        writes
    }

    /// Decides the governed attributes of existing identity `view` that the account in
    /// hand offers or gave, from every linked account (module doc), into `attrs`; records
    /// why a value was kept or replaced in `d`. Returns the sources to record after the
    /// checkin.
    pub(crate) fn settle(
        &mut self,
        view: &Identity,
        attrs: &mut AttrMap,
        d: &mut Decision,
    ) -> Result<SourceWrites, EventError> {
        let Some(auth) = self.authority.filter(|a| !a.is_empty()) else {
            return Ok(Vec::new());
        };
        let offers = std::mem::take(&mut self.offers);
        if offers.is_empty() {
            // The resource maps no governed attribute: nothing to read. (Values it gave
            // before its mapping was removed are decided again by the next account that
            // maps the attribute, or by a reconcile.)
            return Ok(Vec::new());
        }
        let (resource, key) = (&self.event.resource, &self.event.key);
        let sources = self.repo.attribute_sources(&view.name)?;
        // What the account offers, and what else it gave before (its resource's mapping
        // of it was removed).
        let mut attributes: Vec<(String, Option<Offer>)> = offers
            .into_iter()
            .map(|o| (o.attr.clone(), Some(o)))
            .collect();
        for s in &sources {
            if s.resource == *resource
                && s.key == *key
                && auth.governs(&s.attr)
                && !attributes.iter().any(|(a, _)| *a == s.attr)
            {
                attributes.push((s.attr.clone(), None));
            }
        }
        if attributes.is_empty() {
            return Ok(Vec::new());
        }
        let accounts = if view.accounts.is_empty() {
            self.repo
                .identity(&view.name)?
                .map(|i| i.accounts)
                .unwrap_or_default()
        } else {
            view.accounts.clone()
        };
        let mut writes = Vec::new();
        for (attr, offer) in attributes {
            let source = sources.iter().find(|s| s.attr == attr);
            let mut claims = Vec::new();
            let own = offer
                .as_ref()
                .filter(|o| !o.values.is_empty())
                .map(|o| Claim {
                    resource: resource.clone(),
                    key: key.clone(),
                    name: o.name.clone(),
                    strength: o.strength,
                    values: o.values.clone(),
                    in_hand: true,
                });
            claims.extend(own.clone());
            for account in accounts
                .iter()
                .filter(|a| !(a.resource == *resource && a.key == *key))
            {
                claims.extend(self.claim_of(auth, account, &attr, view)?);
            }
            let winner = best(auth, &attr, &claims, source).cloned();
            let name = offer
                .as_ref()
                .map(|o| o.name.clone())
                .or_else(|| winner.as_ref().map(|w| w.name.clone()))
                .unwrap_or_else(|| attr.clone());
            let before = attrs.get(&name).map(<[Value]>::to_vec);
            match &winner {
                Some(w) => attrs.set(&name, w.values.clone()),
                None => {
                    attrs.remove(&name);
                }
            }
            let unchanged = before.as_deref() == attrs.get(&name);
            let note = match (&own, &winner) {
                (Some(mine), Some(w)) if !w.in_hand => Some(format!(
                    "{name}: {} the value of account {} of {}; {}",
                    if unchanged { "kept" } else { "applied" },
                    w.key,
                    w.resource,
                    why_lower(auth, &attr, w, mine)
                )),
                (Some(mine), Some(_)) => match source {
                    Some(s) if !mine.is(Some(s)) => {
                        let previous = claims.iter().find(|c| c.is(Some(s)));
                        Some(format!(
                            "{name}: the value of account {} of {} replaces that of account {} of {}{}",
                            mine.key,
                            mine.resource,
                            s.key,
                            s.resource,
                            previous
                                .map(|p| format!("; {}", why_lower(auth, &attr, mine, p)))
                                .unwrap_or_default()
                        ))
                    }
                    _ => None,
                },
                (None, w) if source.is_some_and(|s| s.resource == *resource && s.key == *key) => {
                    Some(format!(
                        "{name}: {resource} gives no value now; {}",
                        recomputed(w.as_ref())
                    ))
                }
                _ => None,
            };
            if let Some(note) = note {
                d.rules.push(authority_note(&name, note));
            }
            push_write(&mut writes, &attr, source, winner.as_ref());
        }
        Ok(writes)
    }

    /// Takes away the governed values the account in hand gave identity `view` (it was
    /// just unlinked from it): each such attribute decided again from the remaining
    /// accounts, into `attrs`, noted in `d` (`from`: the identity's name, when the
    /// decision is about another identity). Returns the sources to record.
    pub(crate) fn withdraw_values(
        &mut self,
        view: &Identity,
        attrs: &mut AttrMap,
        from: Option<&str>,
        d: &mut Decision,
    ) -> Result<SourceWrites, EventError> {
        let Some(auth) = self.authority.filter(|a| !a.is_empty()) else {
            return Ok(Vec::new());
        };
        let (resource, key) = (&self.event.resource, &self.event.key);
        let sources = self.repo.attribute_sources(&view.name)?;
        let mut writes = Vec::new();
        for source in sources
            .iter()
            .filter(|s| s.resource == *resource && s.key == *key)
        {
            let attr = &source.attr;
            let mut claims = Vec::new();
            for account in &view.accounts {
                claims.extend(self.claim_of(auth, account, attr, view)?);
            }
            let winner = best(auth, attr, &claims, None).cloned();
            let name = attrs
                .attr(attr)
                .map(|a| a.name.clone())
                .or_else(|| winner.as_ref().map(|w| w.name.clone()))
                .unwrap_or_else(|| attr.clone());
            match &winner {
                Some(w) => attrs.set(&name, w.values.clone()),
                None => {
                    attrs.remove(&name);
                }
            }
            let whose = match from {
                Some(identity) => format!(" from {identity}"),
                None => String::new(),
            };
            d.rules.push(authority_note(
                &name,
                format!(
                    "{name}: withdrawn with account {key} of {resource}{whose}; {}",
                    recomputed(winner.as_ref())
                ),
            ));
            push_write(&mut writes, attr, Some(source), winner.as_ref());
        }
        Ok(writes)
    }

    /// Records the sources decided for identity `name`.
    pub(crate) fn write_sources(&self, name: &str, writes: SourceWrites) -> Result<(), RepoError> {
        for (attr, source) in writes {
            match source {
                Some((resource, key)) => self
                    .repo
                    .set_attribute_source(name, &attr, &resource, &key)?,
                None => self.repo.clear_attribute_source(name, &attr)?,
            }
        }
        Ok(())
    }

    /// What linked `account` (not the one in hand) offers for governed attribute `attr`:
    /// its resource's mapping of it over the account's last seen attributes, run as a
    /// reconcile would run it (op `update`, `previous` the same attributes) with
    /// `identity` the identity as it is. `None`: no mapping of it, an `initial` one, or no
    /// value.
    fn claim_of(
        &self,
        auth: &Authority,
        account: &LinkedAccount,
        attr: &str,
        view: &Identity,
    ) -> Result<Option<Claim>, EventError> {
        let Some((policy, needs)) = auth.sources.get(&account.resource) else {
            return Ok(None);
        };
        let Some(mapping) = Authority::mapping(policy, attr) else {
            return Ok(None);
        };
        if mapping.strength == Strength::Initial {
            return Ok(None);
        }
        let values = match &mapping.source {
            MappingSource::Attribute(from) => account
                .attrs
                .get(from)
                .map(<[Value]>::to_vec)
                .unwrap_or_default(),
            MappingSource::Expr(_) => self.run_for(account, policy, *needs, mapping, view)?,
        };
        if values.is_empty() {
            return Ok(None);
        }
        Ok(Some(Claim {
            resource: account.resource.clone(),
            key: account.key.clone(),
            name: mapping.attribute.clone(),
            strength: mapping.strength,
            values,
            in_hand: false,
        }))
    }

    /// Runs `mapping` (an expression) of `policy` for linked `account`, as [`claim_of`]
    /// says.
    ///
    /// [`claim_of`]: Decider::claim_of
    fn run_for(
        &self,
        account: &LinkedAccount,
        policy: &Policy,
        needs: ScopeNeeds,
        mapping: &Mapping,
        view: &Identity,
    ) -> Result<Vec<Value>, EventError> {
        let event = ChangeEvent {
            resource: account.resource.clone(),
            key: account.key.clone(),
            op: Op::Update,
            attrs: account.attrs.clone(),
            previous: Some(account.attrs.clone()),
            origin: None,
        };
        let mut other = Decider::new(self.rules, self.repo, policy, needs, &event);
        if needs.mapping_identity {
            other.scope.push("identity", identity_to_dynamic(view));
        }
        other.mapping_values(&mapping.source)
    }
}

/// The claim that gives the value (module doc): strong before weak, then by precedence,
/// then the account in hand, then the one that gave it so far, then by key.
fn best<'c>(
    auth: &Authority,
    attr: &str,
    claims: &'c [Claim],
    source: Option<&AttributeSource>,
) -> Option<&'c Claim> {
    claims.iter().min_by(|a, b| {
        let order = |c: &Claim| {
            (
                tier(c.strength),
                auth.rank(attr, &c.resource),
                !c.in_hand,
                !c.is(source),
            )
        };
        order(a).cmp(&order(b)).then_with(|| a.key.cmp(&b.key))
    })
}

/// `recomputed from account 1001 of hr`, or that nothing is left.
fn recomputed(winner: Option<&Claim>) -> String {
    match winner {
        Some(w) => format!("recomputed from account {} of {}", w.key, w.resource),
        None => "no other account gives a value: removed".to_owned(),
    }
}

fn authority_note(name: &str, result: String) -> RuleOutcome {
    RuleOutcome {
        rule: AUTHORITY_RULE.to_owned(),
        script: name.to_owned(),
        result,
    }
}

/// Adds the source change for `attr` to `writes`, if the winner is not the recorded one.
fn push_write(
    writes: &mut SourceWrites,
    attr: &str,
    recorded: Option<&AttributeSource>,
    winner: Option<&Claim>,
) {
    match winner {
        Some(w) if !w.is(recorded) => {
            writes.push((attr.to_owned(), Some((w.resource.clone(), w.key.clone()))))
        }
        None if recorded.is_some() => writes.push((attr.to_owned(), None)),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
