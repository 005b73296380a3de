//! Tests of the repository: persistence, queries, compare-and-swap, transactions, records.

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use idsync_core::{
    Action, AttrMap, ChangeEvent, Checkpoint, Conditions, Decision, KnownAccounts, Op, Situation,
    Value,
};

use super::*;

fn attrs(pairs: &[(&str, &str)]) -> AttrMap {
    pairs.iter().copied().collect()
}

fn cp(s: &str) -> Checkpoint {
    Checkpoint(s.to_owned())
}

fn conds(pairs: &[(&str, &str)]) -> Conditions {
    Conditions(
        pairs
            .iter()
            .map(|(a, v)| ((*a).to_owned(), Value::from(*v)))
            .collect(),
    )
}

fn decision(resource: &str, key: &str, situation: Option<Situation>, action: Action) -> Decision {
    Decision {
        resource: resource.to_owned(),
        key: key.to_owned(),
        op: Op::Upsert,
        situation,
        action,
        identity: None,
        candidates: vec![],
        confirmed: vec![],
        rules: vec![],
        changes: vec![],
        error: None,
        at: None,
    }
}

fn event(resource: &str, key: &str) -> ChangeEvent {
    ChangeEvent {
        resource: resource.to_owned(),
        key: key.to_owned(),
        op: Op::Update,
        attrs: attrs(&[("mail", "x@example.org")]),
        previous: None,
        origin: Some("hr.csv:3".to_owned()),
    }
}

/// Three identities used by the query tests.
fn people() -> Repo {
    let repo = Repo::open_in_memory().unwrap();
    let mut ann = attrs(&[("givenName", "Ann"), ("sn", "Lee"), ("dept", "IT")]);
    ann.set("mail", vec!["ann@x.org".into(), "a.lee@x.org".into()]);
    repo.create_identity("ann", &ann).unwrap();
    repo.create_identity(
        "bob",
        &attrs(&[("GivenName", "Bob"), ("sn", "Lee"), ("dept", "IT")]),
    )
    .unwrap();
    let mut cat = attrs(&[("givenName", "Cat"), ("sn", "Roe"), ("dept", "HR")]);
    cat.set("photo", vec![Value::Binary(vec![1, 2, 3])]);
    repo.create_identity("cat", &cat).unwrap();
    repo
}

#[test]
fn open_twice_on_a_file_keeps_data_and_sets_pragmas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo.db");
    {
        let repo = Repo::open(&path).unwrap();
        repo.begin().unwrap();
        repo.create_identity("jdoe", &attrs(&[("mail", "j@x.org")]))
            .unwrap();
        repo.link("jdoe", "hr", "42").unwrap();
        repo.put_shadow("hr", "42", &attrs(&[("Mail", "j@x.org")]))
            .unwrap();
        repo.commit_batch("hr", None, Some(&cp("t1"))).unwrap();
    }
    let repo = Repo::open(&path).unwrap();
    let jdoe = repo.identity("jdoe").unwrap().unwrap();
    assert_eq!(jdoe.version, 1);
    assert_eq!(jdoe.attrs.first_text("MAIL"), Some("j@x.org"));
    assert_eq!(jdoe.accounts.len(), 1);
    assert_eq!(jdoe.accounts[0].attrs.first_text("mail"), Some("j@x.org"));
    assert_eq!(repo.checkpoint("hr").unwrap(), Some(cp("t1")));
    assert_eq!(repo.find(&conds(&[("mail", "j@x.org")])).unwrap(), ["jdoe"]);

    let conn = repo.sqlite_for_tests();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        (mode.as_str(), sync, fk, version),
        ("wal", 2, 1, SCHEMA_VERSION)
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo.db");
    drop(Repo::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Repo::open(&path).unwrap_err();
    assert!(
        matches!(err, RepoError::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1),
        "{err}"
    );
}

#[test]
fn find_matches_every_condition() {
    let repo = people();
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (&[("sn", "Lee")], &["ann", "bob"]),
        (&[("SN", "Lee")], &["ann", "bob"]),
        (&[("givenname", "Bob")], &["bob"]),
        (&[("GIVENNAME", "Ann")], &["ann"]),
        (&[("sn", "Lee"), ("dept", "IT")], &["ann", "bob"]),
        (&[("sn", "Lee"), ("givenName", "Ann")], &["ann"]),
        (&[("sn", "Lee"), ("dept", "HR")], &[]),
        (&[("mail", "a.lee@x.org")], &["ann"]),
        (&[("mail", "ann@x.org"), ("mail", "a.lee@x.org")], &["ann"]),
        (&[("mail", "ann@x.org"), ("mail", "nobody@x.org")], &[]),
        // values are exact
        (&[("sn", "lee")], &[]),
        (&[("dept", "HR")], &["cat"]),
        (&[("nosuch", "x")], &[]),
    ];
    for (c, want) in cases {
        assert_eq!(repo.find(&conds(c)).unwrap(), *want, "conditions {c:?}");
    }
}

#[test]
fn find_refuses_empty_and_binary_conditions() {
    let repo = people();
    assert!(matches!(
        repo.find(&Conditions::default()),
        Err(RepoError::EmptyQuery)
    ));
    let binary = Conditions(vec![("photo".to_owned(), Value::Binary(vec![1, 2, 3]))]);
    assert!(matches!(
        repo.find(&binary),
        Err(RepoError::BinaryCondition { attr }) if attr == "photo"
    ));
}

#[test]
fn find_uses_the_index() {
    let repo = people();
    let conn = repo.sqlite_for_tests();
    for n in 1..=3 {
        let sql = format!("EXPLAIN QUERY PLAN {}", index::find_sql(n));
        let mut st = conn.prepare(&sql).unwrap();
        let args: Vec<String> = (0..2 * n).map(|i| i.to_string()).collect();
        let plan: Vec<String> = st
            .query_map(rusqlite::params_from_iter(&args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for step in &plan {
            assert!(
                !step.starts_with("SCAN identities") && !step.starts_with("SCAN identity_values"),
                "full scan in plan for {n} conditions: {plan:?}"
            );
        }
    }
}

#[test]
fn checkin_is_a_compare_and_swap_and_reindexes() {
    let repo = people();
    let bob = repo.identity("bob").unwrap().unwrap();
    let mut changed = bob.attrs.clone();
    changed.set_text("sn", "Ray");
    assert_eq!(repo.checkin("bob", 1, &changed, false).unwrap(), 2);
    assert_eq!(repo.find(&conds(&[("sn", "Lee")])).unwrap(), ["ann"]);
    assert_eq!(repo.find(&conds(&[("sn", "Ray")])).unwrap(), ["bob"]);

    let err = repo.checkin("bob", 1, &bob.attrs, false).unwrap_err();
    assert!(matches!(
        &err,
        RepoError::VersionConflict { name, expected: 1, found: 2 } if name == "bob"
    ));
    assert!(err.is_conflict());
    // The losing checkin changed nothing.
    let now = repo.identity("bob").unwrap().unwrap();
    assert_eq!((now.version, now.attrs.first_text("sn")), (2, Some("Ray")));

    // Same attributes still bump the version; disabled is stored.
    assert_eq!(repo.checkin("bob", 2, &changed, true).unwrap(), 3);
    let now = repo.identity("bob").unwrap().unwrap();
    assert!(now.disabled);
    assert_eq!(repo.find(&conds(&[("sn", "Ray")])).unwrap(), ["bob"]);

    assert!(matches!(
        repo.checkin("zed", 1, &changed, false),
        Err(RepoError::NoSuchIdentity { name }) if name == "zed"
    ));
}

#[test]
fn error_messages_read_well() {
    let cases: Vec<(RepoError, &str)> = vec![
        (
            RepoError::VersionConflict {
                name: "jdoe".into(),
                expected: 3,
                found: 4,
            },
            "identity jdoe was changed by someone else (expected version 3, found 4)",
        ),
        (
            RepoError::AlreadyLinked {
                resource: "hr".into(),
                key: "42".into(),
                owner: "ann".into(),
            },
            "account 42 on resource hr is already linked to identity ann",
        ),
        (
            RepoError::CheckpointConflict {
                resource: "hr".into(),
                expected: None,
                found: Some(cp("t2")),
            },
            "resource hr: the checkpoint was moved by someone else (expected none, found \"t2\"); \
             the batch was rolled back and will be read again",
        ),
    ];
    for (err, want) in cases {
        assert_eq!(err.to_string(), want);
    }
}

#[test]
fn create_refuses_taken_and_empty_names() {
    let repo = people();
    let err = repo.create_identity("ann", &AttrMap::new()).unwrap_err();
    assert!(matches!(&err, RepoError::NameTaken { name } if name == "ann"));
    assert_eq!(err.to_string(), "identity ann already exists");
    assert!(matches!(
        repo.create_identity("", &AttrMap::new()),
        Err(RepoError::EmptyName)
    ));
    // The failed create left the original untouched.
    let ann = repo.identity("ann").unwrap().unwrap();
    assert_eq!(ann.attrs.first_text("givenname"), Some("Ann"));
    assert_eq!(
        repo.identity_names().unwrap(),
        ["ann", "bob", "cat"].map(String::from)
    );
}

#[test]
fn links_belong_to_one_identity() {
    let repo = people();
    repo.link("ann", "hr", "1").unwrap();
    repo.link("ann", "hr", "1").unwrap();
    repo.link("ann", "ldap", "uid=ann").unwrap();
    let err = repo.link("bob", "hr", "1").unwrap_err();
    assert!(matches!(
        &err,
        RepoError::AlreadyLinked { resource, key, owner }
            if resource == "hr" && key == "1" && owner == "ann"
    ));
    assert!(matches!(
        repo.link("zed", "hr", "9"),
        Err(RepoError::NoSuchIdentity { .. })
    ));
    assert_eq!(repo.owner_of("hr", "1").unwrap().as_deref(), Some("ann"));
    assert_eq!(repo.owner_of("hr", "2").unwrap(), None);
    let ann = repo.identity("ann").unwrap().unwrap();
    let keys: Vec<(&str, &str)> = ann
        .accounts
        .iter()
        .map(|a| (a.resource.as_str(), a.key.as_str()))
        .collect();
    assert_eq!(keys, [("hr", "1"), ("ldap", "uid=ann")]);
    assert!(ann.accounts[0].attrs.is_empty());

    assert!(repo.unlink("hr", "1").unwrap());
    assert!(!repo.unlink("hr", "1").unwrap());
    repo.link("bob", "hr", "1").unwrap();
    assert_eq!(repo.owner_of("hr", "1").unwrap().as_deref(), Some("bob"));
}

#[test]
fn delete_identity_removes_links_and_index() {
    let repo = people();
    repo.link("ann", "hr", "1").unwrap();
    repo.put_shadow("hr", "1", &attrs(&[("sn", "Lee")]))
        .unwrap();
    assert!(repo.delete_identity("ann").unwrap());
    assert!(!repo.delete_identity("ann").unwrap());
    assert_eq!(repo.identity("ann").unwrap(), None);
    assert_eq!(repo.owner_of("hr", "1").unwrap(), None);
    assert_eq!(repo.find(&conds(&[("sn", "Lee")])).unwrap(), ["bob"]);
    // The shadow describes the resource and stays.
    assert_eq!(repo.shadow_count("hr").unwrap(), 1);
    repo.link("bob", "hr", "1").unwrap();
    let conn = repo.sqlite_for_tests();
    let values: i64 = conn
        .query_row(
            "SELECT count(*) FROM identity_values v LEFT JOIN identities i ON i.id = v.identity_id \
             WHERE i.id IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(values, 0);
}

#[test]
fn shadows_feed_known_accounts() {
    let repo = Repo::open_in_memory().unwrap();
    let mut big = AttrMap::new();
    // Find content whose hash has the top bit set, to check the i64 round trip.
    for i in 0.. {
        big.set_text("n", i.to_string());
        if big.content_hash() >= 1 << 63 {
            break;
        }
    }
    let small = attrs(&[("cn", "Ann")]);
    repo.put_shadow("hr", "1", &small).unwrap();
    repo.put_shadow("hr", "2", &big).unwrap();
    repo.put_shadow("ldap", "1", &small).unwrap();
    assert_eq!(repo.shadow_count("hr").unwrap(), 2);

    let known = repo.known_hashes("hr").unwrap();
    assert_eq!(known.len(), 2);
    assert_eq!(known["1"], small.content_hash());
    assert_eq!(known["2"], big.content_hash());
    assert_eq!(repo.known_attrs("hr", "2").unwrap(), Some(big.clone()));
    assert_eq!(repo.known_attrs("hr", "3").unwrap(), None);
    // Several at once: the known ones only, each with its own attributes.
    let mut found = std::collections::BTreeMap::new();
    repo.known_attrs_of("hr", &["1", "2", "3"], &mut |k, a| {
        found.insert(k.to_owned(), a);
    })
    .unwrap();
    assert_eq!(
        found,
        [
            ("1".to_owned(), small.clone()),
            ("2".to_owned(), big.clone())
        ]
        .into()
    );

    // Overwrite, then delete.
    repo.put_shadow("hr", "1", &big).unwrap();
    assert_eq!(repo.known_hashes("hr").unwrap()["1"], big.content_hash());
    repo.delete_shadow("hr", "1").unwrap();
    repo.delete_shadow("hr", "1").unwrap();
    assert_eq!(repo.shadow_count("hr").unwrap(), 1);
    assert_eq!(repo.shadow_count("ldap").unwrap(), 1);
    assert_eq!(repo.shadow_count("none").unwrap(), 0);
}

#[test]
fn commit_batch_is_a_checkpoint_compare_and_swap() {
    let repo = Repo::open_in_memory().unwrap();
    repo.begin().unwrap();
    repo.create_identity("a", &AttrMap::new()).unwrap();
    repo.commit_batch("hr", None, Some(&cp("t1"))).unwrap();
    assert!(!repo.in_transaction().unwrap());
    assert_eq!(repo.checkpoint("hr").unwrap(), Some(cp("t1")));

    // A batch read after a stale checkpoint is rejected whole.
    repo.begin().unwrap();
    repo.create_identity("b", &AttrMap::new()).unwrap();
    repo.link("b", "hr", "7").unwrap();
    repo.put_shadow("hr", "7", &attrs(&[("cn", "B")])).unwrap();
    repo.record_decision(&decision("hr", "7", None, Action::Created))
        .unwrap();
    let err = repo.commit_batch("hr", None, Some(&cp("t2"))).unwrap_err();
    assert!(matches!(
        &err,
        RepoError::CheckpointConflict { resource, expected: None, found: Some(f) }
            if resource == "hr" && f.0 == "t1"
    ));
    assert!(err.is_conflict());
    assert!(!repo.in_transaction().unwrap());
    assert_eq!(repo.identity("b").unwrap(), None);
    assert_eq!(repo.owner_of("hr", "7").unwrap(), None);
    assert_eq!(repo.shadow_count("hr").unwrap(), 0);
    assert!(
        repo.decisions(&DecisionFilter::default())
            .unwrap()
            .is_empty()
    );
    assert_eq!(repo.checkpoint("hr").unwrap(), Some(cp("t1")));

    // The right expectation commits; None as new leaves the checkpoint as it is.
    repo.begin().unwrap();
    repo.create_identity("c", &AttrMap::new()).unwrap();
    repo.commit_batch("hr", Some(&cp("t1")), None).unwrap();
    assert_eq!(repo.checkpoint("hr").unwrap(), Some(cp("t1")));
    assert!(repo.identity("c").unwrap().is_some());
    // Checkpoints are per resource.
    repo.begin().unwrap();
    repo.commit_batch("ldap", None, Some(&cp("cookie")))
        .unwrap();
    assert_eq!(repo.checkpoint("ldap").unwrap(), Some(cp("cookie")));
}

#[test]
fn savepoint_rollback_undoes_only_that_event() {
    let repo = people();
    repo.begin().unwrap();
    for (key, fail) in [("1", false), ("2", true), ("3", false)] {
        repo.savepoint().unwrap();
        let name = format!("p{key}");
        repo.create_identity(&name, &attrs(&[("sn", "Lee")]))
            .unwrap();
        repo.link(&name, "hr", key).unwrap();
        repo.put_shadow("hr", key, &attrs(&[("sn", "Lee")]))
            .unwrap();
        let ann = repo.identity("ann").unwrap().unwrap();
        repo.checkin("ann", ann.version, &ann.attrs, false).unwrap();
        if fail {
            repo.rollback_savepoint().unwrap();
        } else {
            repo.release().unwrap();
        }
    }
    repo.commit().unwrap();
    assert_eq!(
        repo.find(&conds(&[("sn", "Lee")])).unwrap(),
        ["ann", "bob", "p1", "p3"]
    );
    assert_eq!(repo.owner_of("hr", "2").unwrap(), None);
    assert_eq!(repo.shadow_count("hr").unwrap(), 2);
    assert_eq!(repo.identity("ann").unwrap().unwrap().version, 3);
}

#[test]
fn transaction_calls_need_a_transaction() {
    let repo = Repo::open_in_memory().unwrap();
    repo.rollback().unwrap();
    for (op, result) in [
        ("savepoint", repo.savepoint()),
        ("release", repo.release()),
        ("rollback_savepoint", repo.rollback_savepoint()),
        ("commit", repo.commit()),
        ("commit_batch", repo.commit_batch("hr", None, None)),
    ] {
        assert!(
            matches!(result, Err(RepoError::NoTransaction { op: o }) if o == op),
            "{op}"
        );
    }
    repo.begin().unwrap();
    repo.create_identity("a", &AttrMap::new()).unwrap();
    repo.rollback().unwrap();
    assert!(!repo.in_transaction().unwrap());
    assert_eq!(repo.identity("a").unwrap(), None);
}

#[test]
fn begin_waits_for_the_batch_of_another_thread() {
    let repo = Arc::new(Repo::open_in_memory().unwrap());
    repo.begin().unwrap();
    repo.create_identity("first", &AttrMap::new()).unwrap();
    let (tx, rx) = mpsc::channel();
    let other = {
        let repo = Arc::clone(&repo);
        thread::spawn(move || {
            repo.begin().unwrap();
            // The first batch is committed by the time this one starts.
            let seen = repo.identity("first").unwrap().is_some();
            repo.create_identity("second", &AttrMap::new()).unwrap();
            repo.commit().unwrap();
            tx.send(seen).unwrap();
        })
    };
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    repo.commit_batch("hr", None, Some(&cp("t1"))).unwrap();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    other.join().unwrap();
    assert_eq!(repo.identity_names().unwrap(), ["first", "second"]);
}

#[test]
fn begin_gives_up_after_the_batch_wait() {
    let repo = Arc::new(
        Repo::open_in_memory()
            .unwrap()
            .with_batch_wait(Duration::from_millis(50)),
    );
    repo.begin().unwrap();
    let other = Arc::clone(&repo);
    let err = thread::spawn(move || other.begin())
        .join()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RepoError::Busy { .. }), "{err}");
    repo.rollback().unwrap();
}

#[test]
fn poisoned_lock_is_an_error() {
    let repo = Arc::new(Repo::open_in_memory().unwrap());
    let other = Arc::clone(&repo);
    let _ = thread::spawn(move || {
        let _guard = other.conn.lock();
        panic!("poison the repository lock (expected in this test)");
    })
    .join();
    assert!(matches!(repo.identity_names(), Err(RepoError::Poisoned)));
    assert!(matches!(repo.begin(), Err(RepoError::Poisoned)));
}

#[test]
fn damaged_json_is_reported() {
    let repo = people();
    repo.sqlite_for_tests()
        .execute(
            "UPDATE identities SET attrs = '{oops' WHERE name = 'bob'",
            [],
        )
        .unwrap();
    let err = repo.identity("bob").unwrap_err();
    assert!(
        matches!(&err, RepoError::Corrupt { what, .. } if what == "attributes of identity bob"),
        "{err}"
    );
}

#[test]
fn for_each_identity_walks_every_page_in_order() {
    let repo = Repo::open_in_memory().unwrap();
    let total = identities::PAGE * 2 + 3;
    repo.begin().unwrap();
    for i in (0..total).rev() {
        let name = format!("u{i:04}");
        repo.create_identity(&name, &attrs(&[("uid", &name)]))
            .unwrap();
    }
    repo.link("u0001", "hr", "1").unwrap();
    repo.commit().unwrap();
    let mut seen = Vec::new();
    repo.for_each_identity(&mut |identity| {
        // The callback may use the repository.
        assert_eq!(repo.owner_of("hr", "1")?.as_deref(), Some("u0001"));
        assert_eq!(
            identity.accounts.len(),
            usize::from(identity.name == "u0001")
        );
        seen.push(identity.name);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, repo.identity_names().unwrap());
    assert_eq!(seen.len(), total);

    // An error from the callback stops the walk.
    let mut n = 0;
    let err = repo
        .for_each_identity(&mut |_| {
            n += 1;
            Err(RepoError::EmptyName)
        })
        .unwrap_err();
    assert!(matches!(err, RepoError::EmptyName));
    assert_eq!(n, 1);
}

#[test]
fn decisions_filter() {
    let repo = Repo::open_in_memory().unwrap();
    let mut with_identity = decision("hr", "1", Some(Situation::Linked), Action::Updated);
    with_identity.identity = Some("ann".into());
    with_identity.candidates = vec!["ann".into()];
    let rows = [
        with_identity,
        decision("hr", "2", Some(Situation::Unmatched), Action::Created),
        decision("hr", "1", None, Action::Failed),
        decision("ldap", "1", Some(Situation::Disputed), Action::Failed),
        decision("ldap", "2", Some(Situation::Filtered), Action::Ignored),
    ];
    let ids: Vec<i64> = rows
        .iter()
        .map(|d| repo.record_decision(d).unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let f = |resource: Option<&str>,
             key: Option<&str>,
             situation: Option<Situation>,
             failed_only: bool,
             identity: Option<&str>,
             limit: Option<usize>| DecisionFilter {
        resource: resource.map(String::from),
        key: key.map(String::from),
        situation,
        failed_only,
        identity: identity.map(String::from),
        limit,
    };
    let cases: Vec<(DecisionFilter, Vec<usize>)> = vec![
        (DecisionFilter::default(), vec![0, 1, 2, 3, 4]),
        (f(Some("hr"), None, None, false, None, None), vec![0, 1, 2]),
        (
            f(Some("hr"), Some("1"), None, false, None, None),
            vec![0, 2],
        ),
        (f(None, Some("1"), None, false, None, None), vec![0, 2, 3]),
        (
            f(None, None, Some(Situation::Disputed), false, None, None),
            vec![3],
        ),
        (f(None, None, None, true, None, None), vec![2, 3]),
        (f(Some("hr"), None, None, true, None, None), vec![2]),
        (f(None, None, None, false, Some("ann"), None), vec![0]),
        (f(None, None, None, false, None, Some(2)), vec![3, 4]),
        (f(Some("hr"), None, None, false, None, Some(0)), vec![]),
        (f(Some("nosuch"), None, None, false, None, Some(10)), vec![]),
    ];
    for (filter, want) in cases {
        let got = repo.decisions(&filter).unwrap();
        let got_ids: Vec<i64> = got.iter().map(|d| d.id).collect();
        let want_ids: Vec<i64> = want.iter().map(|&i| ids[i]).collect();
        assert_eq!(got_ids, want_ids, "{filter:?}");
        for d in got {
            let i = ids.iter().position(|&x| x == d.id).unwrap();
            assert_eq!(d.decision, rows[i]);
        }
    }

    // The JSON for the CLI is the record with id and time beside its fields.
    let stored = &repo
        .decisions(&f(None, None, None, false, Some("ann"), None))
        .unwrap()[0];
    let json = serde_json::to_value(stored).unwrap();
    assert_eq!(json["id"], ids[0]);
    assert_eq!(json["situation"], "linked");
    assert_eq!(json["identity"], "ann");
    assert!(json["at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn failures_record_supersede_remove_retry() {
    let repo = Repo::open_in_memory().unwrap();
    let ev = event("hr", "1");
    let first = repo
        .record_failure(&NewFailure {
            resource: "hr",
            key: Some("1"),
            origin: Some("hr.csv:3"),
            error: "mapping.mail: boom",
            event: Some(&ev),
            decision_id: Some(12),
        })
        .unwrap();
    let second = repo
        .record_failure(&NewFailure {
            resource: "hr",
            key: Some("1"),
            origin: None,
            error: "again",
            event: Some(&ev),
            decision_id: None,
        })
        .unwrap();
    let reject = repo
        .record_failure(&NewFailure {
            resource: "hr",
            key: None,
            origin: Some("hr.csv:9"),
            error: "row 9 has 3 fields, the header 4",
            event: None,
            decision_id: None,
        })
        .unwrap();
    let other = repo
        .record_failure(&NewFailure {
            resource: "ldap",
            key: Some("1"),
            origin: None,
            error: "x",
            event: None,
            decision_id: None,
        })
        .unwrap();

    let all: Vec<i64> = repo.failures(None).unwrap().iter().map(|f| f.id).collect();
    assert_eq!(all, [first, second, reject, other]);
    let hr: Vec<i64> = repo
        .failures(Some("hr"))
        .unwrap()
        .iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(hr, [first, second, reject]);

    let f = repo.failure(first).unwrap().unwrap();
    assert_eq!(f.event.as_ref(), Some(&ev));
    assert_eq!(
        (
            f.key.as_deref(),
            f.origin.as_deref(),
            f.decision_id,
            f.attempts
        ),
        (Some("1"), Some("hr.csv:3"), Some(12), 0)
    );
    assert_eq!(f.last_attempt_at, None);

    repo.note_retry_failure(first, "still broken").unwrap();
    let f = repo.failure(first).unwrap().unwrap();
    assert_eq!((f.attempts, f.error.as_str()), (1, "still broken"));
    assert!(f.last_attempt_at.is_some());
    assert!(matches!(
        repo.note_retry_failure(999, "x"),
        Err(RepoError::NoSuchFailure { id: 999 })
    ));

    assert_eq!(repo.supersede_failures("hr", "1").unwrap(), 2);
    assert_eq!(repo.supersede_failures("hr", "1").unwrap(), 0);
    assert_eq!(repo.failure(first).unwrap(), None);
    assert!(repo.remove_failure(reject).unwrap());
    assert!(!repo.remove_failure(reject).unwrap());
    let left: Vec<i64> = repo.failures(None).unwrap().iter().map(|f| f.id).collect();
    assert_eq!(left, [other]);

    // Ids are never reused.
    repo.remove_failure(other).unwrap();
    let next = repo
        .record_failure(&NewFailure {
            resource: "ldap",
            key: None,
            origin: None,
            error: "y",
            event: None,
            decision_id: None,
        })
        .unwrap();
    assert!(next > other);
}

#[test]
fn repo_and_errors_can_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Repo>();
    send_sync::<RepoError>();
}

#[test]
fn a_reader_opens_while_a_batch_transaction_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idsync.db");
    let writer = Repo::open(&path).unwrap();
    writer.begin().unwrap();
    writer
        .create_identity("ann", &attrs(&[("mail", "a@x")]))
        .unwrap();
    // A command (`identities`, `status`) opening the file meanwhile must not need a lock.
    let reader = Repo::open(&path).unwrap();
    assert!(reader.identity("ann").unwrap().is_none(), "uncommitted");
    writer.commit().unwrap();
    assert!(reader.identity("ann").unwrap().is_some());
}

/// Index rows of `attr` as (value, identity name), sorted.
fn index_rows(repo: &Repo, attr: &str) -> Vec<(String, String)> {
    let conn = repo.sqlite_for_tests();
    let mut st = conn
        .prepare(
            "SELECT v.value, i.name FROM identity_values v JOIN identities i ON i.id = v.identity_id \
             WHERE v.attr = ?1 ORDER BY 1, 2",
        )
        .unwrap();
    st.query_map([attr], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[test]
fn attributes_are_indexed_on_first_query_in_a_transaction_and_kept_current() {
    let repo = people();
    // Nothing is indexed before a query asks; outside a transaction find scans.
    assert!(index_rows(&repo, "sn").is_empty());
    assert_eq!(repo.find(&conds(&[("SN", "Lee")])).unwrap(), ["ann", "bob"]);
    assert!(index_rows(&repo, "sn").is_empty());

    // A query inside a transaction builds the index; a rolled back batch undoes it.
    repo.begin().unwrap();
    assert_eq!(repo.find(&conds(&[("sn", "Lee")])).unwrap(), ["ann", "bob"]);
    repo.rollback().unwrap();
    assert!(index_rows(&repo, "sn").is_empty());

    repo.begin().unwrap();
    assert_eq!(repo.find(&conds(&[("sn", "Lee")])).unwrap(), ["ann", "bob"]);
    assert_eq!(
        repo.find(&conds(&[("mail", "a.lee@x.org")])).unwrap(),
        ["ann"]
    );
    repo.commit().unwrap();
    assert_eq!(
        index_rows(&repo, "sn"),
        pairs(&[("Lee", "ann"), ("Lee", "bob"), ("Roe", "cat")])
    );
    // Only the queried attributes are indexed.
    assert!(index_rows(&repo, "dept").is_empty());

    // Creation, checkin and deletion keep the rows of indexed attributes current.
    repo.create_identity("dan", &attrs(&[("sn", "Roe"), ("dept", "IT")]))
        .unwrap();
    let bob = repo.identity("bob").unwrap().unwrap();
    let mut changed = bob.attrs.clone();
    changed.set("sn", vec!["Ray".into(), "Lee".into()]);
    repo.checkin("bob", bob.version, &changed, false).unwrap();
    repo.delete_identity("cat").unwrap();
    assert_eq!(
        index_rows(&repo, "sn"),
        pairs(&[
            ("Lee", "ann"),
            ("Lee", "bob"),
            ("Ray", "bob"),
            ("Roe", "dan")
        ])
    );
    assert!(index_rows(&repo, "dept").is_empty());
    assert_eq!(
        index_rows(&repo, "mail"),
        pairs(&[("a.lee@x.org", "ann"), ("ann@x.org", "ann")])
    );

    // The indexed answer and the scanning answer agree.
    for q in [
        &[("sn", "Roe")][..],
        &[("sn", "Ray")],
        &[("sn", "Lee"), ("dept", "IT")],
    ] {
        let scanned = repo.find(&conds(q)).unwrap();
        repo.begin().unwrap();
        let indexed = repo.find(&conds(q)).unwrap();
        repo.commit().unwrap();
        assert_eq!(indexed, scanned, "query {q:?}");
    }
}

fn declare(repo: &Repo, list: &[(&str, &[idsync_core::Step])]) {
    let mut d = idsync_core::Normalisations::default();
    for (attr, steps) in list {
        d.declare(attr, idsync_core::Normalisation::of(steps));
    }
    repo.declare_normalisations(d).unwrap();
}

/// What `indexed_attributes` and `index_normalisations` say of `attr`.
fn stored_normalisation(repo: &Repo, attr: &str) -> Option<String> {
    let conn = repo.sqlite_for_tests();
    let listed: i64 = conn
        .query_row(
            "SELECT count(*) FROM indexed_attributes WHERE attr = ?1",
            [attr],
            |r| r.get(0),
        )
        .unwrap();
    (listed == 1).then(|| {
        conn.query_row(
            "SELECT coalesce((SELECT steps FROM index_normalisations WHERE attr = ?1), '')",
            [attr],
            |r| r.get(0),
        )
        .unwrap()
    })
}

#[test]
fn normalised_attributes_match_however_either_side_is_written() {
    use idsync_core::Step::{Case, Diacritics, Spaces};
    let repo = Repo::open_in_memory().unwrap();
    repo.create_identity(
        "ada",
        &attrs(&[("mail", "ada.lovelace@example.com"), ("sn", "Lovelace")]),
    )
    .unwrap();
    repo.create_identity("zoe", &attrs(&[("cn", "Zoë  Brontë"), ("sn", "Brontë")]))
        .unwrap();
    // Exact, as ever, until a normalisation is declared.
    let q = conds(&[("mail", "Ada.LOVELACE@Example.com")]);
    repo.begin().unwrap();
    assert!(repo.find(&q).unwrap().is_empty());
    repo.commit().unwrap();
    assert_eq!(stored_normalisation(&repo, "mail").as_deref(), Some(""));

    declare(
        &repo,
        &[
            ("MAIL", &[Case, Spaces]),
            ("cn", &[Case, Spaces, Diacritics]),
        ],
    );
    // Outside a transaction: a scan with the declared normalisation, nothing rebuilt.
    assert_eq!(repo.find(&q).unwrap(), ["ada"]);
    assert_eq!(stored_normalisation(&repo, "mail").as_deref(), Some(""));
    // Inside: the index is rebuilt with it, and stays so.
    repo.begin().unwrap();
    assert_eq!(repo.find(&q).unwrap(), ["ada"]);
    assert_eq!(
        repo.find(&conds(&[("cn", " zoe bronte ")])).unwrap(),
        ["zoe"]
    );
    assert!(repo.find(&conds(&[("sn", "bronte")])).unwrap().is_empty());
    repo.commit().unwrap();
    assert_eq!(
        stored_normalisation(&repo, "mail").as_deref(),
        Some("case,spaces")
    );
    assert_eq!(index_rows(&repo, "cn"), pairs(&[("zoe bronte", "zoe")]));

    // Checkins keep the normalised rows current; two values with one form are one row.
    let ada = repo.identity("ada").unwrap().unwrap();
    let mut changed = ada.attrs.clone();
    changed.set(
        "mail",
        vec![
            "A.Lovelace@Example.com".into(),
            "a.lovelace@example.com ".into(),
        ],
    );
    repo.checkin("ada", ada.version, &changed, false).unwrap();
    assert_eq!(
        index_rows(&repo, "mail"),
        pairs(&[("a.lovelace@example.com", "ada")])
    );
    repo.begin().unwrap();
    assert!(repo.find(&q).unwrap().is_empty());
    assert_eq!(
        repo.find(&conds(&[("mail", "a.LOVELACE@example.com")]))
            .unwrap(),
        ["ada"]
    );
    repo.commit().unwrap();

    // A value of nothing but spaces is a missing value: never indexed, never matched.
    let zoe = repo.identity("zoe").unwrap().unwrap();
    let mut blank = zoe.attrs.clone();
    blank.set("mail", vec!["   ".into()]);
    repo.checkin("zoe", zoe.version, &blank, false).unwrap();
    assert_eq!(
        index_rows(&repo, "mail"),
        pairs(&[("a.lovelace@example.com", "ada")])
    );
    repo.begin().unwrap();
    assert!(repo.find(&conds(&[("mail", " ")])).unwrap().is_empty());
    repo.commit().unwrap();
    assert!(repo.find(&conds(&[("mail", " ")])).unwrap().is_empty());
}

#[test]
fn a_changed_declaration_rebuilds_the_index_at_the_next_query_and_a_rollback_keeps_the_old() {
    use idsync_core::Step::{Case, Spaces};
    let repo = people();
    declare(&repo, &[("sn", &[Case])]);
    repo.begin().unwrap();
    assert_eq!(repo.find(&conds(&[("sn", "LEE")])).unwrap(), ["ann", "bob"]);
    repo.commit().unwrap();
    assert_eq!(
        index_rows(&repo, "sn"),
        pairs(&[("lee", "ann"), ("lee", "bob"), ("roe", "cat")])
    );
    // Until a query uses the attribute, checkins keep the rows in their stored form.
    declare(&repo, &[("sn", &[])]);
    repo.create_identity("dan", &attrs(&[("sn", "ROE")]))
        .unwrap();
    assert_eq!(stored_normalisation(&repo, "sn").as_deref(), Some("case"));
    assert!(index_rows(&repo, "sn").contains(&("roe".to_owned(), "dan".to_owned())));
    // A batch that queries it rebuilds; rolled back, the old index is intact.
    repo.begin().unwrap();
    assert!(repo.find(&conds(&[("sn", "LEE")])).unwrap().is_empty());
    assert_eq!(repo.find(&conds(&[("sn", "ROE")])).unwrap(), ["dan"]);
    repo.rollback().unwrap();
    assert_eq!(stored_normalisation(&repo, "sn").as_deref(), Some("case"));
    // Committed, the rows are exact again and no normalisation is stored.
    repo.begin().unwrap();
    assert_eq!(repo.find(&conds(&[("sn", "ROE")])).unwrap(), ["dan"]);
    repo.commit().unwrap();
    assert_eq!(stored_normalisation(&repo, "sn").as_deref(), Some(""));
    assert_eq!(
        index_rows(&repo, "sn"),
        pairs(&[
            ("Lee", "ann"),
            ("Lee", "bob"),
            ("ROE", "dan"),
            ("Roe", "cat")
        ])
    );
    // And to another normalisation again.
    declare(&repo, &[("sn", &[Case, Spaces])]);
    repo.begin().unwrap();
    assert_eq!(
        repo.find(&conds(&[("sn", " roe")])).unwrap(),
        ["cat", "dan"]
    );
    repo.commit().unwrap();
    assert_eq!(
        stored_normalisation(&repo, "sn").as_deref(),
        Some("case,spaces")
    );
}

#[test]
fn blocks_are_read_through_the_index_by_value_or_prefix_and_bounded() {
    use idsync_core::Step::{Case, Diacritics, Spaces};
    let repo = Repo::open_in_memory().unwrap();
    for (name, sn) in [
        ("a1", "Smith"),
        ("a2", "SMITH"),
        ("a3", "Smyth"),
        ("a4", "Smith"),
        ("a5", "Jones"),
        ("a6", "Śmigły"),
    ] {
        repo.create_identity(name, &attrs(&[("sn", sn)])).unwrap();
    }
    declare(&repo, &[("sn", &[Case, Spaces, Diacritics])]);
    let block = |value: &str, prefix: Option<usize>, limit: usize| {
        let b = repo
            .block(&BlockQuery {
                attribute: "SN",
                value,
                prefix,
                limit,
            })
            .unwrap();
        let names: Vec<String> = b.identities.iter().map(|i| i.name.clone()).collect();
        (b.key, names, b.truncated)
    };
    repo.begin().unwrap();
    assert_eq!(
        block(" smith ", None, 10),
        (
            "smith".to_owned(),
            vec!["a1".into(), "a2".into(), "a4".into()],
            false
        )
    );
    assert_eq!(
        block("Smith", None, 2),
        ("smith".to_owned(), vec!["a1".into(), "a2".into()], true)
    );
    assert_eq!(
        block("Smithers", Some(2), 10),
        (
            "sm".to_owned(),
            vec![
                "a6".into(),
                "a1".into(),
                "a2".into(),
                "a4".into(),
                "a3".into()
            ],
            false
        )
    );
    assert_eq!(block("", None, 10), (String::new(), vec![], false));
    // Every block query is an index search, never a scan of the identities.
    let conn = repo.sqlite_for_tests();
    for (prefix, bounded, n) in [(false, false, 3), (true, true, 4), (true, false, 3)] {
        let sql = format!("EXPLAIN QUERY PLAN {}", index::block_sql(prefix, bounded));
        let args: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let plan: Vec<String> = conn
            .prepare(&sql)
            .unwrap()
            .query_map(rusqlite::params_from_iter(&args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN")),
            "{sql}: {plan:?}"
        );
    }
    drop(conn);
    repo.commit().unwrap();
    // Outside a transaction the scan gives the same block.
    repo.begin().unwrap();
    let indexed = block("Smithers", Some(2), 10);
    repo.commit().unwrap();
    let mut scanned = block("Smithers", Some(2), 10);
    scanned.1.sort();
    let mut sorted = indexed.1.clone();
    sorted.sort();
    assert_eq!(scanned.1, sorted);
}

#[test]
fn a_version_2_file_upgrades_and_its_identities_are_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        // A file as version 2 wrote it: every attribute indexed, with the old table shape.
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &crate::schema::MIGRATIONS[..2] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 2).unwrap();
        tx.execute(
            "INSERT INTO identities (id, name, version, disabled, attrs, created_at, updated_at) \
             VALUES (1, 'ann', 1, 0, '{\"empno\":\"1\",\"sn\":\"Lee\"}', 't', 't')",
            [],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO identity_values (attr, value, identity_id) VALUES ('empno', '1', 1), ('sn', 'Lee', 1)",
            [],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO links (resource, key, identity_id, linked_at) VALUES ('hr', '1', 1, 't')",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let repo = Repo::open(&path).unwrap();
    repo.begin().unwrap();
    assert_eq!(repo.find(&conds(&[("empno", "1")])).unwrap(), ["ann"]);
    repo.commit().unwrap();
    assert_eq!(index_rows(&repo, "empno"), pairs(&[("1", "ann")]));
    assert!(index_rows(&repo, "sn").is_empty());
    // Version 4 rebuilt the links without a rowid: the link is still there both ways.
    assert_eq!(repo.owner_of("hr", "1").unwrap().as_deref(), Some("ann"));
    let ann = repo.identity("ann").unwrap().unwrap();
    assert_eq!(ann.accounts.len(), 1);
    assert_eq!(
        (
            ann.accounts[0].resource.as_str(),
            ann.accounts[0].key.as_str()
        ),
        ("hr", "1")
    );
    // Deleting the identity still takes its links along (the foreign key survived).
    repo.begin().unwrap();
    assert!(repo.delete_identity("ann").unwrap());
    repo.commit().unwrap();
    assert_eq!(repo.owner_of("hr", "1").unwrap(), None);
}

/// Back-to-back batches must not grow the write-ahead log without end: past the restart
/// size, the next transaction waits for the background checkpoint and starts the log over.
#[test]
fn back_to_back_batches_keep_the_write_ahead_log_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let mut repo = Repo::open(&path).unwrap();
    repo.set_wal_restart_pages(64);
    let wal = dir.path().join("wal.db-wal");
    let big = "x".repeat(2000);
    let mut sizes = Vec::new();
    for batch in 0..12 {
        repo.begin().unwrap();
        for i in 0..100 {
            repo.create_identity(&format!("p{batch}-{i}"), &attrs(&[("note", &big)]))
                .unwrap();
        }
        repo.commit().unwrap();
        sizes.push(std::fs::metadata(&wal).unwrap().len());
    }
    // One batch writes ~70 pages (~300 KB): twelve appended would pass 3 MB.
    let largest = *sizes.iter().max().unwrap();
    assert!(largest < 1_500_000, "log sizes {sizes:?}");
    assert_eq!(repo.identity_names().unwrap().len(), 1200);
}

/// The record's JSON no longer repeats what the columns hold; records written in full by
/// earlier versions still read back the same.
#[test]
fn decision_records_store_the_header_once_and_old_records_still_read() {
    let repo = Repo::open_in_memory().unwrap();
    let mut d = decision("hr", "7", Some(Situation::Unmatched), Action::Created);
    d.identity = Some("ann".into());
    d.rules = vec![idsync_core::RuleOutcome {
        rule: "correlation".into(),
        script: "correlation.rhai".into(),
        result: "()".into(),
    }];
    let new_id = repo.record_decision(&d).unwrap();
    {
        let conn = repo.sqlite_for_tests();
        let json: String = conn
            .query_row(
                "SELECT record FROM decisions WHERE id = ?1",
                [new_id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            !json.contains("\"resource\"") && !json.contains("\"action\""),
            "{json}"
        );
        let old = serde_json::to_string(&d).unwrap();
        conn.execute(
            "INSERT INTO decisions (at, resource, key, op, situation, action, identity, record) \
             VALUES ('2026-01-01T00:00:00.000Z', 'hr', '7', 'upsert', 'unmatched', 'created', 'ann', ?1)",
            [old],
        )
        .unwrap();
    }
    let read = repo.decisions(&DecisionFilter::default()).unwrap();
    assert_eq!(read.len(), 2);
    assert!(read.iter().all(|s| s.decision == d), "{read:?}");
}

#[test]
fn the_last_reconcile_of_each_resource_is_kept() {
    let repo = Repo::open_in_memory().unwrap();
    assert_eq!(repo.last_reconcile("hr").unwrap(), None);
    let run = |started_by: &str, outcome, events| ReconcileRun {
        resource: "hr".into(),
        started_at: "2026-01-01T03:00:00.000Z".into(),
        ended_at: String::new(),
        started_by: started_by.into(),
        keys: None,
        events,
        changed: 2,
        unchanged: events - 2,
        failed: 0,
        rejected: 1,
        outcome,
        error: None,
    };
    repo.record_reconcile(&run("schedule", ReconcileOutcome::Failed, 5))
        .unwrap();
    repo.record_reconcile(&run("command", ReconcileOutcome::Complete, 7))
        .unwrap();
    let last = repo.last_reconcile("hr").unwrap().unwrap();
    assert_eq!(last.started_by, "command");
    assert_eq!(last.outcome, ReconcileOutcome::Complete);
    assert_eq!((last.events, last.changed, last.unchanged), (7, 2, 5));
    assert!(last.ended_at.starts_with("20"), "{}", last.ended_at);
    assert_eq!(repo.last_reconcile("dir").unwrap(), None);
}

#[test]
fn work_items_are_refreshed_while_open_and_closed_once() {
    let repo = Repo::open_in_memory().unwrap();
    let candidates = vec!["ann".to_owned(), "bea".to_owned()];
    let item = |kind, reason| NewWorkItem {
        resource: "hr",
        key: "15",
        kind,
        reason,
        candidates: &candidates,
    };
    let first = repo
        .raise_work_item(&item(WorkItemKind::Disputed, "2 candidates"))
        .unwrap();
    assert!(first.new);
    repo.note_work_item_decision(first.id, 7).unwrap();
    // The same account and kind, another wording: the open item, refreshed.
    let again = repo
        .raise_work_item(&item(WorkItemKind::Disputed, "still 2 candidates"))
        .unwrap();
    assert_eq!(
        again,
        Raised {
            id: first.id,
            new: false
        }
    );
    repo.note_work_item_decision(first.id, 9).unwrap();
    // Rule items are one per message.
    let a = repo
        .raise_work_item(&item(WorkItemKind::Rule, "a"))
        .unwrap();
    let b = repo
        .raise_work_item(&item(WorkItemKind::Rule, "b"))
        .unwrap();
    assert!(a.new && b.new && a.id != b.id);
    assert!(
        !repo
            .raise_work_item(&item(WorkItemKind::Rule, "a"))
            .unwrap()
            .new
    );

    let stored = repo.work_item(first.id).unwrap().unwrap();
    assert_eq!(stored.seen, 2);
    assert_eq!(stored.reason, "still 2 candidates");
    assert_eq!(
        (stored.decision_id, stored.last_decision_id),
        (Some(7), Some(9))
    );
    assert_eq!(stored.candidates, candidates);

    let closure = NewClosure {
        resolution: Resolution::Linked,
        identity: Some("bea"),
        decision_id: Some(11),
        reason: Some("checked"),
    };
    assert!(repo.close_work_item(first.id, &closure).unwrap());
    assert!(
        !repo.close_work_item(first.id, &closure).unwrap(),
        "closed once"
    );
    let closed = repo.work_item(first.id).unwrap().unwrap();
    assert_eq!(closed.state, WorkItemState::Closed);
    let c = closed.closed.unwrap();
    assert_eq!(
        (c.resolution, c.identity.as_deref()),
        (Resolution::Linked, Some("bea"))
    );
    // Closed items do not absorb new events: the account raises a new item.
    assert!(
        repo.raise_work_item(&item(WorkItemKind::Disputed, "2 candidates"))
            .unwrap()
            .new
    );
    let open = repo
        .work_items(&WorkItemFilter {
            state: Some(WorkItemState::Open),
            ..WorkItemFilter::default()
        })
        .unwrap();
    assert_eq!(open.len(), 3);
    assert_eq!(repo.open_work_item_count().unwrap(), 3);
}
