//! The authority's corners on a real (in-memory) repository: what the end-to-end tests in
//! `tests/authority.rs` do not reach through two CSV feeds.

use std::sync::Arc;

use idsync_core::{AttrMap, ChangeBatch, ChangeEvent, Checkpoint, Decision, Op};
use idsync_repo::{DecisionFilter, Repo};
use idsync_rules::Limits;

use crate::*;

fn attrs(pairs: &[(&str, &str)]) -> AttrMap {
    pairs.iter().copied().collect()
}

/// A mapping of a test resource: `(to, from-or-expr, strength)`.
type TestMapping<'a> = (&'a str, &'a str, Strength);

struct World {
    engine: Engine,
    policies: Vec<Policy>,
}

impl World {
    /// Resources `(name, [(to, from-or-expr, strength)])`, keys correlated by `mail`, and
    /// the authority over them.
    fn new(resources: &[(&str, &[TestMapping<'_>])], precedence: &[(&str, &[&str])]) -> World {
        let repo = Arc::new(Repo::open_in_memory().unwrap());
        let mut engine = Engine::new(repo, &Limits::default());
        let mut policies = Vec::new();
        for (name, mappings) in resources {
            let mut p = Policy::new(name);
            p.correlation = Some(
                engine
                    .rules()
                    .compile("corr.rhai", "#{ mail: account.mail }")
                    .unwrap(),
            );
            p.naming = Some(engine.rules().compile("naming", "account.login").unwrap());
            for (to, from, strength) in *mappings {
                let source = match from.strip_prefix("expr:") {
                    Some(src) => MappingSource::Expr(
                        engine
                            .rules()
                            .compile(&format!("{name}.mapping.{to}"), src)
                            .unwrap(),
                    ),
                    None => MappingSource::Attribute((*from).to_owned()),
                };
                p.mappings.push(Mapping {
                    attribute: (*to).to_owned(),
                    source,
                    strength: *strength,
                });
            }
            policies.push(p);
        }
        engine.set_authority(Authority::new(
            precedence.iter().map(|(a, order)| {
                (
                    (*a).to_owned(),
                    order.iter().map(|r| (*r).to_owned()).collect(),
                )
            }),
            &policies,
        ));
        World { engine, policies }
    }

    fn policy(&mut self, name: &str) -> &mut Policy {
        self.policies
            .iter_mut()
            .find(|p| p.resource == name)
            .unwrap()
    }

    /// Applies one event of `resource` in a batch of its own.
    fn apply(&self, resource: &str, op: Op, key: &str, a: &[(&str, &str)]) -> Decision {
        let repo = self.engine.repo();
        let expected = repo.checkpoint(resource).unwrap();
        let n = expected.as_ref().map_or(0, |c| c.0.len());
        let policy = self
            .policies
            .iter()
            .find(|p| p.resource == resource)
            .unwrap();
        let batch = ChangeBatch {
            events: vec![ChangeEvent {
                resource: resource.to_owned(),
                key: key.to_owned(),
                op,
                attrs: attrs(a),
                previous: None,
                origin: None,
            }],
            checkpoint: Some(Checkpoint("x".repeat(n + 1))),
            ..ChangeBatch::default()
        };
        self.engine
            .apply_batch(policy, expected.as_ref(), &batch)
            .unwrap();
        repo.decisions(&DecisionFilter::default())
            .unwrap()
            .pop()
            .unwrap()
            .decision
    }

    fn attr(&self, name: &str, attr: &str) -> Option<String> {
        self.engine
            .repo()
            .identity(name)
            .unwrap()
            .and_then(|i| i.attrs.first_text(attr).map(str::to_owned))
    }
}

fn notes(d: &Decision) -> Vec<&str> {
    d.rules
        .iter()
        .filter(|r| r.rule == AUTHORITY_RULE)
        .map(|r| r.result.as_str())
        .collect()
}

const STRONG: Strength = Strength::Strong;

#[test]
fn populate_global_leaves_a_governed_attribute_to_the_mappings() {
    let mut w = World::new(
        &[
            ("hr", &[("mail", "mail", STRONG)]),
            (
                "contractors",
                &[("mail", "mail", STRONG), ("title", "role", STRONG)],
            ),
        ],
        &[("title", &["contractors"])],
    );
    w.policy("hr").populate_global = true;
    w.apply(
        "contractors",
        Op::Upsert,
        "C1",
        &[("login", "ada"), ("mail", "a@x"), ("role", "Contractor")],
    );
    // hr's account has a `title` column: populate_global copies every other column.
    let d = w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[
            ("login", "ada"),
            ("mail", "a@x"),
            ("title", "Engineer"),
            ("site", "Paris"),
        ],
    );
    assert_eq!(d.identity.as_deref(), Some("ada"), "{d:?}");
    assert_eq!(w.attr("ada", "title").as_deref(), Some("Contractor"));
    assert_eq!(w.attr("ada", "site").as_deref(), Some("Paris"));
}

#[test]
fn two_accounts_of_one_resource_the_one_that_changed_gives_the_value() {
    let w = World::new(
        &[(
            "hr",
            &[("mail", "mail", STRONG), ("title", "title", STRONG)],
        )],
        &[("title", &["hr"])],
    );
    w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Engineer")],
    );
    // Rehired under a new key, both rows in the feed.
    w.apply(
        "hr",
        Op::Create,
        "2",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Architect")],
    );
    assert_eq!(w.attr("ada", "title").as_deref(), Some("Architect"));
    // The old row changes: it changed last, its value stands.
    let d = w.apply(
        "hr",
        Op::Update,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Lead")],
    );
    assert_eq!(w.attr("ada", "title").as_deref(), Some("Lead"), "{d:?}");
    // The old row goes: the new one's value comes back.
    let d = w.apply(
        "hr",
        Op::Delete,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Lead")],
    );
    assert_eq!(w.attr("ada", "title").as_deref(), Some("Architect"));
    assert_eq!(
        notes(&d),
        ["title: withdrawn with account 1 of hr; recomputed from account 2 of hr"]
    );
}

#[test]
fn another_accounts_expression_runs_over_its_last_seen_attributes() {
    let w = World::new(
        &[
            (
                "hr",
                &[("mail", "mail", STRONG), ("location", "site", STRONG)],
            ),
            (
                "badges",
                &[
                    ("mail", "mail", STRONG),
                    (
                        "location",
                        "expr:let who = if identity == () { \"-\" } else { identity.name };
                         let was = if previous == () { \"-\" } else { previous.building };
                         `${account.building} (${op}, ${who}, ${was})`",
                        STRONG,
                    ),
                ],
            ),
        ],
        &[("location", &["hr", "badges"])],
    );
    w.apply(
        "badges",
        Op::Upsert,
        "B1",
        &[("login", "ada"), ("mail", "a@x"), ("building", "B7")],
    );
    assert_eq!(
        w.attr("ada", "location").as_deref(),
        Some("B7 (upsert, -, -)")
    );
    w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("site", "Paris")],
    );
    assert_eq!(w.attr("ada", "location").as_deref(), Some("Paris"));
    let d = w.apply(
        "hr",
        Op::Delete,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("site", "Paris")],
    );
    // The badge's mapping ran over its shadow, as a reconcile would run it.
    assert_eq!(
        w.attr("ada", "location").as_deref(),
        Some("B7 (update, ada, B7)"),
        "{d:?}"
    );
}

#[test]
fn a_failing_mapping_of_another_resource_fails_the_event_and_names_it() {
    let w = World::new(
        &[
            (
                "hr",
                &[("mail", "mail", STRONG), ("location", "site", STRONG)],
            ),
            (
                "badges",
                &[
                    ("mail", "mail", STRONG),
                    ("location", "expr:account.building.to_upper()", STRONG),
                ],
            ),
        ],
        &[("location", &["hr", "badges"])],
    );
    w.apply(
        "badges",
        Op::Upsert,
        "B1",
        &[("login", "ada"), ("mail", "a@x"), ("building", "b7")],
    );
    assert_eq!(w.attr("ada", "location").as_deref(), Some("B7"));
    // The badge's row loses its building; its shadow with it.
    w.apply(
        "badges",
        Op::Update,
        "B1",
        &[("login", "ada"), ("mail", "a@x")],
    );
    let d = w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("site", "Paris")],
    );
    assert_eq!(d.action, Action::Failed, "{d:?}");
    assert!(
        d.error
            .as_deref()
            .unwrap_or("")
            .contains("badges.mapping.location"),
        "{d:?}"
    );
    assert_eq!(w.engine.repo().owner_of("hr", "1").unwrap(), None);
}

#[test]
fn a_stale_source_is_replaced_by_the_precedence_result() {
    let w = World::new(
        &[
            (
                "hr",
                &[("mail", "mail", STRONG), ("title", "title", STRONG)],
            ),
            (
                "contractors",
                &[("mail", "mail", STRONG), ("title", "role", STRONG)],
            ),
        ],
        &[("title", &["hr", "contractors"])],
    );
    w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Engineer")],
    );
    // Something outside authority (a process rule's ctx.unlink, a hand edit) unlinked hr's
    // account without taking its value: the recorded source is stale.
    let repo = w.engine.repo();
    repo.begin().unwrap();
    repo.unlink("hr", "1").unwrap();
    repo.commit().unwrap();
    let d = w.apply(
        "contractors",
        Op::Upsert,
        "C1",
        &[("login", "ada"), ("mail", "a@x"), ("role", "Contractor")],
    );
    assert_eq!(
        w.attr("ada", "title").as_deref(),
        Some("Contractor"),
        "{d:?}"
    );
    let sources = repo.attribute_sources("ada").unwrap();
    assert_eq!(sources.len(), 1);
    assert_eq!(
        (sources[0].resource.as_str(), sources[0].key.as_str()),
        ("contractors", "C1")
    );
}

#[test]
fn delete_action_delete_takes_the_sources_with_the_identity() {
    let mut w = World::new(
        &[(
            "hr",
            &[("mail", "mail", STRONG), ("title", "title", STRONG)],
        )],
        &[("title", &["hr"])],
    );
    w.policy("hr").delete_action = DeleteAction::Delete;
    w.apply(
        "hr",
        Op::Upsert,
        "1",
        &[("login", "ada"), ("mail", "a@x"), ("title", "Engineer")],
    );
    assert_eq!(w.engine.repo().attribute_sources("ada").unwrap().len(), 1);
    let d = w.apply("hr", Op::Delete, "1", &[("login", "ada"), ("mail", "a@x")]);
    assert_eq!(d.action, Action::DeletedIdentity);
    assert!(notes(&d).is_empty(), "{d:?}");
    // A new identity of the same name starts without sources.
    w.apply("hr", Op::Create, "2", &[("login", "ada"), ("mail", "a@x")]);
    assert!(w.engine.repo().attribute_sources("ada").unwrap().is_empty());
}
