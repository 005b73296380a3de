//! Table-driven tests for every branch of the decision order, on an in-memory SQLite
//! repository (the real one, not a fake).

use std::sync::Arc;

use idsync_core::{Action, AttrMap, ChangeBatch, ChangeEvent, Checkpoint, Op, Situation};
use idsync_repo::{DecisionFilter, Repo};
use idsync_rules::Limits;

use crate::*;

struct World {
    engine: Engine,
    /// The private PostgreSQL server of the test, stopped after the engine is dropped.
    _server: Option<idsync_testkit::postgres::Postgres>,
}

fn attrs(pairs: &[(&str, &str)]) -> AttrMap {
    pairs.iter().copied().collect()
}

impl World {
    fn new() -> World {
        // With IDSYNC_TEST_REPOSITORY=postgres, a private PostgreSQL server per test.
        let (repo, server) = if idsync_testkit::postgres::tests_use_postgres() {
            let pg = idsync_testkit::postgres::Postgres::start().unwrap();
            pg.create_database("idsync").unwrap();
            let repo = Repo::open_postgres(&pg.url("idsync"), &Default::default()).unwrap();
            (repo, Some(pg))
        } else {
            (Repo::open_in_memory().unwrap(), None)
        };
        World {
            engine: Engine::new(Arc::new(repo), &Limits::default()),
            _server: server,
        }
    }

    fn identity(self, name: &str, a: &[(&str, &str)]) -> World {
        let r = self.engine.repo();
        r.begin().unwrap();
        r.create_identity(name, &attrs(a)).unwrap();
        r.commit().unwrap();
        self
    }

    fn linked(self, name: &str, key: &str) -> World {
        let r = self.engine.repo();
        r.begin().unwrap();
        r.link(name, "hr", key).unwrap();
        r.commit().unwrap();
        self
    }

    fn policy(&self, rules: &[(&str, &str)]) -> Policy {
        let mut p = Policy::new("hr");
        let c = |label: &str, src: &str| self.engine.rules().compile(label, src).unwrap();
        for (role, src) in rules {
            let label = format!("{role}.rhai");
            match *role {
                "filter" => p.filter = Some(c(&label, src)),
                "process" => p.process = Some(c(&label, src)),
                "delete" => p.delete = Some(c(&label, src)),
                "correlation" => p.correlation = Some(c(&label, src)),
                "confirmation" => p.confirmation = Some(c(&label, src)),
                "resolve" => p.resolve = Some(c(&label, src)),
                "naming" => p.naming = Some(c(&label, src)),
                "create_unmatched" => p.create_unmatched = *src == "true",
                "populate_global" => p.populate_global = *src == "true",
                "delete_action" => {
                    p.delete_action = match *src {
                        "disable" => DeleteAction::Disable,
                        "delete" => DeleteAction::Delete,
                        _ => DeleteAction::Unlink,
                    }
                }
                "delete_after_days" => {
                    let days: u64 = src.parse().unwrap();
                    p.delete_after = Some(std::time::Duration::from_secs(days * 86_400));
                }
                "halt" => p.on_error = OnError::Halt,
                m if m.starts_with("map:") => p.mappings.push(Mapping {
                    attribute: m[4..].to_owned(),
                    source: MappingSource::Attribute((*src).to_owned()),
                    strength: Strength::Strong,
                }),
                m if m.starts_with("expr:") => p.mappings.push(Mapping {
                    attribute: m[5..].to_owned(),
                    source: MappingSource::Expr(c(&format!("mapping.{}", &m[5..]), src)),
                    strength: Strength::Strong,
                }),
                other => panic!("unknown role {other}"),
            }
        }
        p
    }

    fn apply(&self, policy: &Policy, events: Vec<ChangeEvent>) -> Result<BatchReport, EngineError> {
        let expected = self.engine.repo().checkpoint("hr").unwrap();
        let n = expected.as_ref().map(|c| c.0.len()).unwrap_or(0);
        let batch = ChangeBatch {
            events,
            checkpoint: Some(Checkpoint(format!("cp{}", n + 1))),
            ..ChangeBatch::default()
        };
        self.engine.apply_batch(policy, expected.as_ref(), &batch)
    }

    fn last(&self) -> idsync_core::Decision {
        self.engine
            .repo()
            .decisions(&DecisionFilter::default())
            .unwrap()
            .pop()
            .unwrap()
            .decision
    }

    fn owner(&self, key: &str) -> Option<String> {
        self.engine.repo().owner_of("hr", key).unwrap()
    }

    fn attr(&self, name: &str, attr: &str) -> Option<String> {
        self.engine
            .repo()
            .identity(name)
            .unwrap()
            .and_then(|i| i.attrs.first_text(attr).map(str::to_owned))
    }
}

fn ev(op: Op, key: &str, a: &[(&str, &str)]) -> ChangeEvent {
    ChangeEvent {
        resource: "hr".into(),
        key: key.into(),
        op,
        attrs: attrs(a),
        previous: None,
        origin: Some(format!("hr.csv:{key}")),
    }
}

/// One row of the decision table: the world, the rules, the event, and what must follow.
struct Case {
    name: &'static str,
    world: fn() -> World,
    rules: &'static [(&'static str, &'static str)],
    event: (Op, &'static str, &'static [(&'static str, &'static str)]),
    situation: Option<Situation>,
    action: Action,
    identity: Option<&'static str>,
    owner_after: Option<&'static str>,
    error_contains: Option<&'static str>,
}

fn people() -> World {
    World::new()
        .identity(
            "ann",
            &[("empno", "1"), ("mail", "ann@x"), ("born", "1990-01-01")],
        )
        .identity(
            "bob",
            &[("empno", "2"), ("mail", "shared@x"), ("born", "1980-02-02")],
        )
        .identity(
            "bea",
            &[("empno", "3"), ("mail", "shared@x"), ("born", "1985-03-03")],
        )
}

fn people_linked() -> World {
    people().linked("ann", "E1")
}

const CORR_EMPNO: &str = "#{ empno: account.empno }";

#[test]
fn decision_table() {
    let cases = [
        Case {
            name: "filter false ignores",
            world: people,
            rules: &[
                ("filter", "account.type != \"contractor\""),
                ("correlation", CORR_EMPNO),
            ],
            event: (Op::Create, "E9", &[("empno", "1"), ("type", "contractor")]),
            situation: Some(Situation::Filtered),
            action: Action::Ignored,
            identity: None,
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "process rule overrides everything",
            world: people,
            rules: &[
                (
                    "process",
                    "let v = ctx.create(\"p-\" + key, #{ src: \"process\" }); ctx.link(v.name);",
                ),
                ("correlation", CORR_EMPNO),
                ("create_unmatched", "false"),
            ],
            event: (Op::Update, "E1", &[("empno", "1")]),
            situation: Some(Situation::Processed),
            action: Action::Processed,
            identity: Some("p-E1"),
            owner_after: Some("p-E1"),
            error_contains: None,
        },
        Case {
            name: "process rule error undoes its writes",
            world: people_linked,
            rules: &[(
                "process",
                "let v = ctx.create(\"p-\" + key, #{}); ctx.link(v.name);",
            )],
            event: (Op::Update, "E1", &[("empno", "1")]),
            situation: Some(Situation::Processed),
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("process.rhai:1:"),
        },
        Case {
            name: "owner by link updates",
            world: people_linked,
            rules: &[("map:mail", "email")],
            event: (Op::Update, "E1", &[("empno", "1"), ("email", "ann@new")]),
            situation: Some(Situation::Linked),
            action: Action::Updated,
            identity: Some("ann"),
            owner_after: Some("ann"),
            error_contains: None,
        },
        Case {
            name: "delete by op unlinks owner",
            world: people_linked,
            rules: &[],
            event: (Op::Delete, "E1", &[]),
            situation: Some(Situation::Deleted),
            action: Action::Unlinked,
            identity: Some("ann"),
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "delete with no owner is ignored",
            world: people,
            rules: &[],
            event: (Op::Delete, "E7", &[]),
            situation: Some(Situation::Deleted),
            action: Action::Ignored,
            identity: None,
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "delete by rule disables",
            world: people_linked,
            rules: &[
                ("delete", "account.status == \"TERMINATED\""),
                ("delete_action", "disable"),
            ],
            event: (Op::Update, "E1", &[("status", "TERMINATED")]),
            situation: Some(Situation::Deleted),
            action: Action::Disabled,
            identity: Some("ann"),
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "delete action delete removes identity",
            world: people_linked,
            rules: &[("delete_action", "delete")],
            event: (Op::Delete, "E1", &[]),
            situation: Some(Situation::Deleted),
            action: Action::DeletedIdentity,
            identity: Some("ann"),
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "correlation by name links",
            world: people,
            rules: &[("correlation", "\"bob\"")],
            event: (Op::Create, "E2", &[("empno", "2")]),
            situation: Some(Situation::Unlinked),
            action: Action::Linked,
            identity: Some("bob"),
            owner_after: Some("bob"),
            error_contains: None,
        },
        Case {
            name: "correlation list of names keeps existing ones",
            world: people,
            rules: &[("correlation", "[\"nobody\", \"bob\"]")],
            event: (Op::Create, "E2", &[]),
            situation: Some(Situation::Unlinked),
            action: Action::Linked,
            identity: Some("bob"),
            owner_after: Some("bob"),
            error_contains: None,
        },
        Case {
            name: "correlation map of conditions",
            world: people,
            rules: &[(
                "correlation",
                "#{ empno: account.empno, mail: account.mail }",
            )],
            event: (Op::Create, "E3", &[("empno", "3"), ("mail", "shared@x")]),
            situation: Some(Situation::Unlinked),
            action: Action::Linked,
            identity: Some("bea"),
            owner_after: Some("bea"),
            error_contains: None,
        },
        Case {
            name: "disputed without resolve fails naming every candidate",
            world: people,
            rules: &[(
                "correlation",
                "[#{ empno: account.empno }, #{ mail: account.mail }]",
            )],
            event: (Op::Create, "E9", &[("empno", "99"), ("mail", "shared@x")]),
            situation: Some(Situation::Disputed),
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("matches 2 identities: bea, bob"),
        },
        Case {
            name: "confirmation narrows to one",
            world: people,
            rules: &[
                ("correlation", "#{ mail: account.mail }"),
                ("confirmation", "identity.attrs.born == account.born"),
            ],
            event: (
                Op::Create,
                "E9",
                &[("mail", "shared@x"), ("born", "1985-03-03")],
            ),
            situation: Some(Situation::Unlinked),
            action: Action::Linked,
            identity: Some("bea"),
            owner_after: Some("bea"),
            error_contains: None,
        },
        Case {
            name: "confirmation rejects all: unmatched creates",
            world: people,
            rules: &[
                ("correlation", "#{ mail: account.mail }"),
                ("confirmation", "identity.attrs.born == account.born"),
                ("naming", "\"new-\" + key"),
            ],
            event: (
                Op::Create,
                "E9",
                &[("mail", "shared@x"), ("born", "2000-01-01")],
            ),
            situation: Some(Situation::Unmatched),
            action: Action::Created,
            identity: Some("new-E9"),
            owner_after: Some("new-E9"),
            error_contains: None,
        },
        Case {
            name: "unmatched with create off and resolve",
            world: people,
            rules: &[
                ("correlation", CORR_EMPNO),
                ("create_unmatched", "false"),
                (
                    "resolve",
                    "ctx.work_item(`no match for ${key} (${situation})`)",
                ),
            ],
            event: (Op::Create, "E9", &[("empno", "99")]),
            situation: Some(Situation::Unmatched),
            action: Action::Resolved,
            identity: None,
            owner_after: None,
            error_contains: None,
        },
        Case {
            name: "unmatched with create off and no resolve fails",
            world: people,
            rules: &[("correlation", CORR_EMPNO), ("create_unmatched", "false")],
            event: (Op::Create, "E9", &[("empno", "99")]),
            situation: Some(Situation::Unmatched),
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("create_unmatched is off"),
        },
        Case {
            name: "disputed with resolve links the first candidate",
            world: people,
            rules: &[
                ("correlation", "#{ mail: account.mail }"),
                ("resolve", "ctx.link(candidates[0]);"),
            ],
            event: (Op::Create, "E9", &[("mail", "shared@x")]),
            situation: Some(Situation::Disputed),
            action: Action::Resolved,
            identity: Some("bea"),
            owner_after: Some("bea"),
            error_contains: None,
        },
        Case {
            name: "rule runtime error fails the event with position",
            world: people,
            rules: &[("correlation", "let x = 1;\nx.nosuch()")],
            event: (Op::Create, "E9", &[]),
            situation: None,
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("correlation.rhai:2:"),
        },
        Case {
            name: "non true-like filter value is an error naming the value",
            world: people,
            rules: &[("filter", "\n\"maybe\"")],
            event: (Op::Create, "E9", &[]),
            situation: None,
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("filter.rhai:2:1: filter rule returned \"maybe\""),
        },
        Case {
            name: "runaway rule fails its event only",
            world: people,
            rules: &[("correlation", "loop {}")],
            event: (Op::Create, "E9", &[]),
            situation: None,
            action: Action::Failed,
            identity: None,
            owner_after: None,
            error_contains: Some("too many operations"),
        },
    ];
    for case in cases {
        let w = (case.world)();
        let p = w.policy(case.rules);
        let (op, key, a) = case.event;
        w.apply(&p, vec![ev(op, key, a)]).unwrap();
        let d = w.last();
        assert_eq!(d.situation, case.situation, "{}: {d:?}", case.name);
        assert_eq!(d.action, case.action, "{}: {d:?}", case.name);
        if case.action != Action::Failed {
            assert_eq!(d.identity.as_deref(), case.identity, "{}: {d:?}", case.name);
        }
        match case.error_contains {
            Some(text) => assert!(
                d.error.as_deref().unwrap_or("").contains(text),
                "{}: error {:?} lacks {text:?}",
                case.name,
                d.error
            ),
            None => assert_eq!(d.error, None, "{}", case.name),
        }
        if case.error_contains.is_none() {
            assert_eq!(w.owner(key).as_deref(), case.owner_after, "{}", case.name);
        }
        // Exactly one decision per event, and a failed event is re-runnable.
        let repo = w.engine.repo();
        assert_eq!(repo.decisions(&DecisionFilter::default()).unwrap().len(), 1);
        let failures = repo.failures(Some("hr")).unwrap();
        assert_eq!(
            failures.len(),
            usize::from(d.action == Action::Failed),
            "{}",
            case.name
        );
        assert_eq!(
            repo.checkpoint("hr").unwrap(),
            Some(Checkpoint("cp1".into()))
        );
    }
}

#[test]
fn failed_event_effects_are_undone_and_batch_goes_on() {
    let w = people();
    let p = w.policy(&[(
        "process",
        "ctx.create(key, #{}); if key == \"E2\" { throw \"boom\" }",
    )]);
    let report = w
        .apply(
            &p,
            vec![
                ev(Op::Create, "E1", &[]),
                ev(Op::Create, "E2", &[]),
                ev(Op::Create, "E3", &[]),
            ],
        )
        .unwrap();
    assert_eq!(report.failed, 1);
    let names = w.engine.repo().identity_names().unwrap();
    assert!(names.contains(&"E1".to_string()) && names.contains(&"E3".to_string()));
    assert!(
        !names.contains(&"E2".to_string()),
        "the failed event's create was undone"
    );
}

/// On PostgreSQL a batch speculates (the repository's module `speculation`): this batch
/// makes it guess wrong (a new identity's name is taken) and read its own writes (an
/// account correlating to an identity created earlier in the batch, one changing an
/// identity it read ahead). The outcome must be the one SQLite gives, event by event.
#[test]
fn a_batch_decides_the_same_when_a_guess_of_its_speculation_is_wrong() {
    let w = people_linked();
    let p = w.policy(&[
        ("correlation", CORR_EMPNO),
        ("create_unmatched", "true"),
        ("naming", r#"if key == "E9" { "bob" } else { key }"#),
        ("map:empno", "empno"),
        ("map:title", "title"),
    ]);
    let report = w
        .apply(
            &p,
            vec![
                ev(Op::Create, "E7", &[("empno", "7"), ("title", "a")]),
                ev(Op::Create, "E9", &[("empno", "9"), ("title", "b")]),
                ev(Op::Create, "E10", &[("empno", "10"), ("title", "c")]),
                ev(Op::Create, "E11", &[("empno", "10"), ("title", "d")]),
                ev(Op::Update, "E1", &[("empno", "1"), ("title", "e")]),
                ev(Op::Create, "E12", &[("empno", "1"), ("title", "f")]),
            ],
        )
        .unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    let failed = w.engine.repo().failures(Some("hr")).unwrap();
    assert_eq!(failed[0].key.as_deref(), Some("E9"));
    assert!(failed[0].error.contains("bob"), "{}", failed[0].error);
    assert_eq!(w.owner("E7").as_deref(), Some("E7"));
    assert_eq!(w.owner("E9"), None);
    assert_eq!(w.owner("E10").as_deref(), Some("E10"));
    assert_eq!(
        w.owner("E11").as_deref(),
        Some("E10"),
        "found in the batch's own writes"
    );
    assert_eq!(w.attr("E10", "title").as_deref(), Some("d"));
    assert_eq!(w.owner("E12").as_deref(), Some("ann"));
    assert_eq!(w.attr("ann", "title").as_deref(), Some("f"));
    assert_eq!(
        w.attr("bob", "empno").as_deref(),
        Some("2"),
        "bob untouched"
    );
    let decisions = w
        .engine
        .repo()
        .decisions(&DecisionFilter::default())
        .unwrap();
    assert_eq!(decisions.len(), 6, "one record per event, none twice");
}

#[test]
fn halt_rolls_back_the_whole_batch_and_keeps_the_checkpoint() {
    let w = people();
    let p = w.policy(&[
        ("halt", ""),
        ("correlation", "if key == \"E2\" { throw \"boom\" }"),
    ]);
    let err = w
        .apply(
            &p,
            vec![ev(Op::Create, "E1", &[]), ev(Op::Create, "E2", &[])],
        )
        .unwrap_err();
    assert!(err.to_string().contains("halted"), "{err}");
    let repo = w.engine.repo();
    assert_eq!(repo.checkpoint("hr").unwrap(), None);
    assert!(repo.identity("E1").unwrap().is_none());
    assert!(
        repo.decisions(&DecisionFilter::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn stale_checkpoint_is_rejected_and_nothing_applies() {
    let w = people();
    let p = w.policy(&[]);
    w.apply(&p, vec![ev(Op::Create, "E1", &[])]).unwrap();
    let batch = ChangeBatch {
        events: vec![ev(Op::Create, "E5", &[])],
        checkpoint: Some(Checkpoint("other".into())),
        ..ChangeBatch::default()
    };
    let err = w.engine.apply_batch(&p, None, &batch).unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");
    assert!(w.engine.repo().identity("E5").unwrap().is_none());
}

#[test]
fn populate_global_copies_account_and_mappings_apply_on_top() {
    let w = World::new();
    let p = w.policy(&[
        ("populate_global", "true"),
        ("expr:mail", "global.first.to_lower() + \"@example.com\""),
    ]);
    w.apply(
        &p,
        vec![ev(Op::Create, "E1", &[("first", "Ann"), ("dept", "R&D")])],
    )
    .unwrap();
    assert_eq!(w.attr("E1", "dept").as_deref(), Some("R&D"));
    assert_eq!(w.attr("E1", "mail").as_deref(), Some("ann@example.com"));
}

/// Variables are built only for policies whose scripts name them: a mapping that reads
/// `previous` and the linked accounts through `identity` still sees them on an update.
#[test]
fn mappings_naming_previous_and_identity_accounts_see_them() {
    let w = people_linked();
    let p = w.policy(&[
        (
            "expr:was",
            "if previous == () { \"none\" } else { previous.title }",
        ),
        (
            "expr:accounts",
            "identity.accounts.map(|a| a.resource + \"/\" + a.key).reduce(|s, a| s + a, \"\")",
        ),
    ]);
    let mut update = ev(Op::Update, "E1", &[("title", "Lead")]);
    update.previous = Some(attrs(&[("title", "Analyst")]));
    w.apply(&p, vec![update]).unwrap();
    assert_eq!(w.attr("ann", "was").as_deref(), Some("Analyst"));
    assert_eq!(w.attr("ann", "accounts").as_deref(), Some("hr/E1"));
    // A policy whose scripts never name them runs without them.
    let plain = w.policy(&[("expr:t", "account.title")]);
    w.apply(&plain, vec![ev(Op::Update, "E1", &[("title", "Head")])])
        .unwrap();
    assert_eq!(w.attr("ann", "t").as_deref(), Some("Head"));
}

#[test]
fn rehire_relinks_and_reenables() {
    let w = people_linked();
    let p = w.policy(&[
        ("delete", "account.status == \"TERMINATED\""),
        ("delete_action", "disable"),
        ("correlation", CORR_EMPNO),
    ]);
    w.apply(
        &p,
        vec![ev(
            Op::Update,
            "E1",
            &[("empno", "1"), ("status", "TERMINATED")],
        )],
    )
    .unwrap();
    assert!(w.engine.repo().identity("ann").unwrap().unwrap().disabled);
    w.apply(
        &p,
        vec![ev(
            Op::Update,
            "E1",
            &[("empno", "1"), ("status", "ACTIVE")],
        )],
    )
    .unwrap();
    let ann = w.engine.repo().identity("ann").unwrap().unwrap();
    assert!(!ann.disabled);
    assert_eq!(w.owner("E1").as_deref(), Some("ann"));
    assert_eq!(w.last().situation, Some(Situation::Unlinked));
}

/// A leaver who comes back in the same batch, within the grace period its leaving planned
/// (no correlation rule: only the pending delete can link the account back). On
/// PostgreSQL the batch speculates and knows which accounts have timers: one planned in the
/// batch counts.
#[test]
fn a_leaver_who_comes_back_in_the_same_batch_is_a_rehire() {
    let w = people_linked();
    let p = w.policy(&[("delete_action", "disable"), ("delete_after_days", "30")]);
    w.apply(
        &p,
        vec![
            ev(Op::Delete, "E1", &[("empno", "1")]),
            ev(Op::Create, "E1", &[("empno", "1")]),
        ],
    )
    .unwrap();
    assert_eq!(w.owner("E1").as_deref(), Some("ann"), "linked back");
    assert!(!w.engine.repo().identity("ann").unwrap().unwrap().disabled);
    assert!(
        w.engine
            .repo()
            .timers_of_identity("ann")
            .unwrap()
            .is_empty()
    );
    assert_eq!(w.last().situation, Some(Situation::Unlinked));
}

/// A leaver's identity found again by correlation (another account, within the grace
/// period) gets its pending delete cancelled: whether the delete was planned by an earlier
/// batch or earlier in the same one. On PostgreSQL the batch reads ahead which identities
/// correlation finds have timers.
#[test]
fn a_correlated_link_cancels_the_grace_delete_of_its_identity() {
    let w = people().linked("ann", "E1").linked("bob", "E2");
    let p = w.policy(&[
        ("delete_action", "disable"),
        ("delete_after_days", "30"),
        ("correlation", CORR_EMPNO),
    ]);
    let pending = |name: &str| w.engine.repo().timers_of_identity(name).unwrap().len();
    w.apply(&p, vec![ev(Op::Delete, "E1", &[("empno", "1")])])
        .unwrap();
    assert_eq!(pending("ann"), 1);
    w.apply(&p, vec![ev(Op::Create, "E9", &[("empno", "1")])])
        .unwrap();
    assert_eq!(w.owner("E9").as_deref(), Some("ann"));
    assert_eq!(pending("ann"), 0, "cancelled by the link");
    w.apply(
        &p,
        vec![
            ev(Op::Delete, "E2", &[("empno", "2")]),
            ev(Op::Create, "E8", &[("empno", "2")]),
        ],
    )
    .unwrap();
    assert_eq!(w.owner("E8").as_deref(), Some("bob"));
    assert_eq!(pending("bob"), 0, "planned and cancelled in one batch");
    assert!(!w.engine.repo().identity("bob").unwrap().unwrap().disabled);
}

#[test]
fn retry_reruns_a_failed_event_and_removes_it() {
    let w = people();
    let broken = w.policy(&[("correlation", "throw \"broken\"")]);
    w.apply(&broken, vec![ev(Op::Create, "E2", &[("empno", "2")])])
        .unwrap();
    let failure = w.engine.repo().failures(None).unwrap().remove(0);
    let fixed = w.policy(&[("correlation", CORR_EMPNO)]);
    let d = w.engine.retry(&fixed, &failure).unwrap();
    assert_eq!(d.action, Action::Linked);
    assert!(w.engine.repo().failures(None).unwrap().is_empty());
    assert_eq!(w.owner("E2").as_deref(), Some("bob"));
}

#[test]
fn shadows_follow_events_and_a_newer_success_supersedes_failures() {
    let w = World::new();
    let broken = w.policy(&[("correlation", "throw \"broken\"")]);
    w.apply(&broken, vec![ev(Op::Create, "E1", &[("a", "1")])])
        .unwrap();
    assert_eq!(w.engine.repo().failures(None).unwrap().len(), 1);
    let ok = w.policy(&[]);
    w.apply(&ok, vec![ev(Op::Update, "E1", &[("a", "2")])])
        .unwrap();
    assert!(w.engine.repo().failures(None).unwrap().is_empty());
    w.apply(&ok, vec![ev(Op::Delete, "E1", &[])]).unwrap();
    assert_eq!(w.engine.repo().shadow_count("hr").unwrap(), 0);
}

#[test]
fn delete_action_spares_an_identity_with_another_account_on_the_resource() {
    let w = people_linked().linked("ann", "E1-new");
    let p = w.policy(&[("delete_action", "disable")]);
    w.apply(&p, vec![ev(Op::Delete, "E1", &[])]).unwrap();
    let d = w.last();
    assert_eq!(d.action, Action::Unlinked);
    assert!(
        d.rules[0].result.contains("still has account(s) E1-new"),
        "{d:?}"
    );
    assert!(!w.engine.repo().identity("ann").unwrap().unwrap().disabled);
    w.apply(&p, vec![ev(Op::Delete, "E1-new", &[])]).unwrap();
    assert_eq!(w.last().action, Action::Disabled);
}

/// A notifier that enqueues one message per identity change, describing it; fails for
/// identities named `boom`.
struct Recorder;

impl Notifier for Recorder {
    fn messages(
        &self,
        c: &IdentityChange<'_>,
    ) -> Result<Vec<idsync_repo::NewOutboxMessage>, String> {
        let name = c
            .after
            .or(c.before)
            .map(|i| i.name.clone())
            .unwrap_or_default();
        if name == "boom" {
            return Err("notifier refused".into());
        }
        let what = match (c.before, c.after) {
            (None, Some(_)) => "created".to_owned(),
            (Some(_), None) => "deleted".to_owned(),
            (Some(b), Some(a)) => format!(
                "updated {} accounts {}->{}",
                b.attrs.diff(&a.attrs).len(),
                b.accounts.len(),
                a.accounts.len()
            ),
            (None, None) => "nothing".to_owned(),
        };
        Ok(vec![idsync_repo::NewOutboxMessage {
            policy: "p".into(),
            identity: Some(name),
            resource: Some(c.decision.resource.clone()),
            key: Some(c.decision.key.clone()),
            mail: idsync_repo::RenderedMail {
                from: "a@example.com".into(),
                to: vec!["b@example.com".into()],
                subject: what,
                text: String::new(),
                html: None,
                retry: serde_json::Value::Null,
            },
            max_age_ms: 1000,
            dead: None,
        }])
    }
}

#[test]
fn notifier_sees_before_and_after_and_its_messages_commit_with_the_event() {
    let mut w = World::new();
    w.engine.set_notifier(Box::new(Recorder));
    let p = w.policy(&[("naming", "account.name"), ("map:mail", "mail")]);
    w.apply(
        &p,
        vec![
            ev(Op::Create, "1", &[("name", "ann"), ("mail", "a@x")]),
            ev(Op::Create, "2", &[("name", "boom"), ("mail", "b@x")]),
        ],
    )
    .unwrap();
    w.apply(
        &p,
        vec![ev(Op::Update, "1", &[("name", "ann"), ("mail", "new@x")])],
    )
    .unwrap();
    let subjects: Vec<String> = w
        .engine
        .repo()
        .outbox_list(&idsync_repo::OutboxFilter::default())
        .unwrap()
        .into_iter()
        .rev()
        .map(|m| format!("{}: {}", m.identity.unwrap_or_default(), m.mail.subject))
        .collect();
    assert_eq!(subjects, ["ann: created", "ann: updated 1 accounts 1->1"]);
    // The notifier's failure failed the event: no identity, no message, a failed row.
    assert!(w.engine.repo().identity("boom").unwrap().is_none());
    assert_eq!(w.engine.repo().failures(None).unwrap().len(), 1);
}

#[test]
fn an_event_failing_after_writing_sends_the_batch_back_with_savepoints() {
    let w = people();
    // No process rule: the batch starts without savepoints. The resolve rule writes
    // (create and link) and then fails for E2, so the batch is decided again with a
    // savepoint per event; E2's writes must be gone, and every event reported once.
    let p = w.policy(&[
        (
            "resolve",
            "ctx.create(key, #{ empno: key }); ctx.link(key); if key == \"E2\" { throw \"boom\" }",
        ),
        ("correlation", CORR_EMPNO),
        ("create_unmatched", "false"),
    ]);
    let expected = w.engine.repo().checkpoint("hr").unwrap();
    let batch = ChangeBatch {
        events: ["E1", "E2", "E3"]
            .iter()
            .map(|k| ev(Op::Create, k, &[("empno", k)]))
            .collect(),
        checkpoint: Some(Checkpoint("cp1".into())),
        ..ChangeBatch::default()
    };
    let mut seen = Vec::new();
    let report = w
        .engine
        .apply_batch_with(&p, expected.as_ref(), &batch, &mut |d| {
            seen.push((d.key.clone(), d.action))
        })
        .unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(
        seen,
        [
            ("E1".to_owned(), Action::Resolved),
            ("E2".to_owned(), Action::Failed),
            ("E3".to_owned(), Action::Resolved),
        ]
    );
    let names = w.engine.repo().identity_names().unwrap();
    assert!(names.contains(&"E1".to_owned()) && names.contains(&"E3".to_owned()));
    assert!(!names.contains(&"E2".to_owned()), "E2's create was undone");
    assert_eq!(w.owner("E2"), None, "E2's link was undone");
    assert_eq!(w.owner("E3").as_deref(), Some("E3"));
    // One decision per event, not one per attempt.
    let decisions = w
        .engine
        .repo()
        .decisions(&DecisionFilter::default())
        .unwrap();
    assert_eq!(decisions.len(), 3);
    assert_eq!(w.engine.repo().failures(None).unwrap().len(), 1);
}

#[test]
fn an_event_failing_before_writing_needs_no_second_pass() {
    let w = people();
    // The mapping fails for E2 before anything is written; E1 and E3 are created.
    let p = w.policy(&[
        ("create_unmatched", "true"),
        (
            "expr:mail",
            "if key == \"E2\" { throw \"bad mail\" } else { key + \"@x\" }",
        ),
    ]);
    let report = w
        .apply(
            &p,
            vec![
                ev(Op::Create, "E1", &[]),
                ev(Op::Create, "E2", &[]),
                ev(Op::Create, "E3", &[]),
            ],
        )
        .unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(w.attr("E3", "mail").as_deref(), Some("E3@x"));
    assert!(w.engine.repo().identity("E2").unwrap().is_none());
    assert_eq!(w.owner("E2"), None);
}

#[test]
fn a_mapping_failing_after_the_link_of_an_unlinked_account_leaves_no_link() {
    let w = people();
    // Correlation finds ann for E1 and bob for E2; the account is linked before the
    // mappings run, and E1's mapping throws: the batch is redone with savepoints.
    let p = w.policy(&[
        ("correlation", CORR_EMPNO),
        (
            "expr:title",
            "if key == \"E1\" { throw \"no title\" } else { \"Clerk\" }",
        ),
    ]);
    let report = w
        .apply(
            &p,
            vec![
                ev(Op::Update, "E1", &[("empno", "1")]),
                ev(Op::Update, "E2", &[("empno", "2")]),
            ],
        )
        .unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(w.owner("E1"), None, "E1's link was undone");
    assert_eq!(w.owner("E2").as_deref(), Some("bob"));
    assert_eq!(w.attr("bob", "title").as_deref(), Some("Clerk"));
    assert_eq!(w.attr("ann", "title"), None);
}

/// A guard that says account "2" crashed the process twice, and logs its calls.
#[derive(Clone, Default)]
struct FakeGuard {
    calls: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
}

impl CrashGuard for FakeGuard {
    fn before(&self, event: &ChangeEvent) -> Option<u32> {
        self.calls
            .borrow_mut()
            .push(format!("before {}", event.key));
        (event.key == "2").then_some(2)
    }
    fn after(&self, event: &ChangeEvent, ok: bool) {
        self.calls
            .borrow_mut()
            .push(format!("after {} {ok}", event.key));
    }
    fn idle(&self) {
        self.calls.borrow_mut().push("idle".into());
    }
}

#[test]
fn an_event_the_guard_names_as_crashing_is_isolated_without_running_a_rule() {
    let mut w = World::new();
    let guard = FakeGuard::default();
    w.engine.set_crash_guard(Box::new(guard.clone()));
    // The correlation rule would fail every event it runs for: it does not run for "2".
    let p = w.policy(&[
        (
            "correlation",
            r#"if account.id == "2" { nosuch() } else { () }"#,
        ),
        ("map:title", "title"),
    ]);
    let r = w
        .apply(
            &p,
            vec![
                ev(Op::Create, "1", &[("id", "1"), ("title", "a")]),
                ev(Op::Create, "2", &[("id", "2"), ("title", "b")]),
                ev(Op::Create, "3", &[("id", "3"), ("title", "c")]),
            ],
        )
        .unwrap();
    assert_eq!(r.failed, 1);
    let calls = guard.calls.borrow().clone();
    let decided = [
        "before 1",
        "after 1 true",
        "before 2",
        "before 3",
        "after 3 true",
        "idle",
    ];
    // A speculating batch (PostgreSQL) tells the guard of each account first, as it runs
    // the correlation rules ahead.
    let ahead = calls.len().saturating_sub(decided.len());
    assert!(
        calls[..ahead].is_empty() || calls[..ahead] == ["before 1", "before 2", "before 3"],
        "{calls:?}"
    );
    assert_eq!(calls[ahead..], decided);
    let failed = w.engine.repo().failures(Some("hr")).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].key.as_deref(), Some("2"));
    assert!(
        failed[0].error.starts_with("crashed the agent (2 times)"),
        "{}",
        failed[0].error
    );
    assert!(failed[0].event.is_some(), "kept for a retry");
    let d = &w
        .engine
        .repo()
        .decisions(&DecisionFilter {
            key: Some("2".into()),
            ..DecisionFilter::default()
        })
        .unwrap()[0]
        .decision;
    assert_eq!(d.action, Action::Failed);
    assert!(d.rules.is_empty(), "no rule ran: {:?}", d.rules);
    assert_eq!(w.owner("1").as_deref(), Some("1"));
    assert_eq!(w.owner("3").as_deref(), Some("3"));
    // The shadow moved on, as for any failed event.
    assert!(w.engine.repo().shadow("hr", "2").unwrap().is_some());
    // An automatic retry through the guarded engine does not run it either.
    guard.calls.borrow_mut().clear();
    let d = w.engine.retry(&p, &failed[0]).unwrap();
    assert!(d.error.unwrap().starts_with("crashed the agent (2 times)"));
    assert_eq!(*guard.calls.borrow(), ["before 2"]);
    assert_eq!(w.engine.repo().failures(Some("hr")).unwrap()[0].attempts, 1);
}

#[test]
fn a_reconcile_batch_is_recorded_as_op_reconcile_and_counts_what_did_not_change() {
    let w = World::new()
        .identity("ann", &[("mail", "ann@x")])
        .linked("ann", "1")
        .identity("bo", &[("mail", "bo@x"), ("dept", "IT")])
        .linked("bo", "2");
    // The rules see the event's op; the record says reconcile.
    let p = w.policy(&[("map:dept", "dept"), ("expr:seenOp", "op")]);
    let expected = w.engine.repo().checkpoint("hr").unwrap();
    let batch = ChangeBatch {
        events: vec![
            ev(Op::Update, "1", &[("dept", "Sales")]),
            ev(Op::Update, "2", &[("dept", "IT")]),
        ],
        checkpoint: Some(Checkpoint("cp-reconcile".into())),
        reconcile: true,
        ..ChangeBatch::default()
    };
    let report = w.engine.apply_batch(&p, expected.as_ref(), &batch).unwrap();
    assert_eq!(report.unchanged, 0, "seenOp is new on both");
    assert_eq!(w.attr("ann", "seenOp").as_deref(), Some("update"));
    let records = w
        .engine
        .repo()
        .decisions(&DecisionFilter::default())
        .unwrap();
    assert!(records.iter().all(|r| r.decision.op == Op::Reconcile));
    // Again: nothing changes, both counted unchanged, still recorded.
    let batch = ChangeBatch {
        checkpoint: Some(Checkpoint("cp-reconcile-2".into())),
        ..batch
    };
    let report = w
        .engine
        .apply_batch(&p, Some(&Checkpoint("cp-reconcile".into())), &batch)
        .unwrap();
    assert_eq!((report.events(), report.unchanged), (2, 2));
    let last = w.last();
    assert_eq!(last.op, Op::Reconcile);
    assert!(last.changed_nothing() && last.changes.is_empty());
    // A pass's batch keeps the event's op.
    let report = w
        .apply(&p, vec![ev(Op::Update, "1", &[("dept", "Ops")])])
        .unwrap();
    assert_eq!(report.unchanged, 0);
    assert_eq!(w.last().op, Op::Update);
}

/// A policy comparing mapped `givenName` and `sn`, blocked on `sn`, with the names
/// normalised in the repository.
fn fuzzy_world() -> World {
    let w = World::new()
        .identity(
            "jonathan",
            &[
                ("givenName", "Jonathan"),
                ("sn", "Smith"),
                ("birth", "1970"),
            ],
        )
        .identity(
            "joanna",
            &[("givenName", "Joanna"), ("sn", "Smith"), ("birth", "1990")],
        );
    let mut n = idsync_core::Normalisations::default();
    n.declare("givenName", idsync_core::Normalisation::FULL);
    n.declare("sn", idsync_core::Normalisation::FULL);
    w.engine.repo().declare_normalisations(n).unwrap();
    w
}

fn with_fuzzy(mut p: Policy, threshold: f64, limit: usize) -> Policy {
    p.fuzzy = Some(Fuzzy {
        attributes: vec!["givenName".into(), "sn".into()],
        threshold,
        block: "sn".into(),
        block_prefix: None,
        block_limit: limit,
    });
    p
}

#[test]
fn fuzzy_candidates_preempt_create_and_resolve_but_not_a_confirmation_that_dropped_them() {
    let w = fuzzy_world();
    let base = [("map:givenName", "first"), ("map:sn", "last")];
    let account = [("first", "JONATHON"), ("last", "smith "), ("birth", "1970")];
    // Unmatched with create_unmatched, and with a resolve rule: a similar item either way.
    for extra in [
        &[][..],
        &[
            ("create_unmatched", "false"),
            ("resolve", "ctx.link(\"joanna\")"),
        ],
    ] {
        let mut rules = base.to_vec();
        rules.extend_from_slice(extra);
        let p = with_fuzzy(w.policy(&rules), 0.92, 1000);
        w.apply(&p, vec![ev(Op::Create, "7", &account)]).unwrap();
        let d = w.last();
        assert_eq!(d.action, Action::WorkItem, "{d:?}");
        assert_eq!(d.situation, Some(Situation::Unmatched));
        assert_eq!(w.owner("7"), None);
        let fuzzy = d.rules.iter().find(|r| r.rule == FUZZY_RULE).unwrap();
        assert!(
            fuzzy
                .result
                .ends_with("at or above 0.92: jonathan 0.975 (givenName 0.950, sn 1.000)"),
            "{}",
            fuzzy.result
        );
    }
    let items = w
        .engine
        .repo()
        .work_items(&idsync_repo::WorkItemFilter::default())
        .unwrap();
    assert_eq!(items.len(), 1, "raised again, not twice: {items:?}");
    assert_eq!(items[0].kind, idsync_repo::WorkItemKind::Similar);
    assert_eq!(items[0].candidates, ["jonathan"]);
    assert_eq!(items[0].seen, 2);

    // Correlation found jonathan, the confirmation dropped him (another birth year): he is
    // not proposed again, and the account is created.
    let mut rules = base.to_vec();
    rules.extend_from_slice(&[
        ("correlation", "#{ sn: account.last }"),
        ("confirmation", "identity.attrs.birth == \"1999\""),
        ("naming", "\"new\""),
    ]);
    let p = with_fuzzy(w.policy(&rules), 0.92, 1000);
    w.apply(&p, vec![ev(Op::Create, "8", &account)]).unwrap();
    let d = w.last();
    assert_eq!(d.candidates, ["joanna", "jonathan"]);
    assert!(d.confirmed.is_empty());
    assert_eq!(d.action, Action::Created, "{d:?}");
    assert_eq!(w.owner("8").as_deref(), Some("new"));
    assert_eq!(w.attr("new", "givenName").as_deref(), Some("JONATHON"));
    let fuzzy = d.rules.iter().find(|r| r.rule == FUZZY_RULE).unwrap();
    assert!(
        fuzzy.result.ends_with("none at or above 0.92"),
        "{}",
        fuzzy.result
    );
}

#[test]
fn a_fuzzy_block_larger_than_its_limit_is_cut_and_says_so() {
    let w = fuzzy_world();
    let p = with_fuzzy(
        w.policy(&[("map:givenName", "first"), ("map:sn", "last")]),
        0.5,
        1,
    );
    w.apply(
        &p,
        vec![ev(Op::Create, "9", &[("first", "Jo"), ("last", "Smith")])],
    )
    .unwrap();
    let d = w.last();
    let fuzzy = d.rules.iter().find(|r| r.rule == FUZZY_RULE).unwrap();
    assert!(
        fuzzy.result.starts_with(
            "block sn = \"smith\": 1 identity compared, the block's first 1 only (block_limit)"
        ),
        "{}",
        fuzzy.result
    );
}
