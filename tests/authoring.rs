//! Rule authoring through the real binary: `preview` writes nothing, `explain` tells the
//! story of an account, `test-rules` runs fixtures with a readable diff, and
//! `results --record` turns a real decision into a fixture that passes.
#![allow(clippy::unwrap_used)]

mod common;

use common::Sandbox;

fn world() -> Sandbox {
    let s = Sandbox::new();
    s.config(
        "redact_attributes: [born]
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
    rules: { correlation: corr.rhai, confirmation: confirm.rhai }
    mappings:
      - { to: empno, from: emp }
      - { to: mail, from: mail }
      - { to: born, from: born }
      - { to: title, from: title }
",
    );
    s.rule(
        "corr.rhai",
        "[#{ empno: account.emp }, #{ mail: account.mail }]",
    );
    s.rule(
        "confirm.rhai",
        "account.born == () || identity.attrs.born == account.born",
    );
    s.feed(
        "hr.csv",
        "emp,mail,born,title\n1,ann@x,1990-01-01,Analyst\n2,team@x,1980-01-01,Clerk\n3,team@x,1985-01-01,Cook\n",
    );
    s.run_once(None, 0);
    s
}

#[test]
fn preview_shows_the_next_pass_and_writes_nothing() {
    let s = world();
    s.feed(
        "hr.csv",
        "emp,mail,born,title\n1,ann@x,1990-01-01,Lead\n2,team@x,1980-01-01,Clerk\n9,team@x,,Temp\n",
    );
    let before = std::fs::read(s.db()).unwrap();
    let records_before = s.results(&[]).len();
    let out = s.idsync(&["preview"]).expect_code(1);
    assert!(
        out.stdout
            .contains("hr 1 update linked updated identity=1 changed=title"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("hr 9 create disputed failed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("hr 3 delete deleted unlinked"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("nothing was written"), "{}", out.stdout);
    let json = s
        .idsync(&["preview", "--format", "json", "--resource", "hr"])
        .expect_code(1);
    let planned: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(planned.len(), 3);
    assert_eq!(planned[1]["candidates"], serde_json::json!(["2", "3"]));
    // The repository file, its records and its checkpoint are untouched.
    assert_eq!(
        std::fs::read(s.db()).unwrap(),
        before,
        "repository file changed"
    );
    assert_eq!(s.results(&[]).len(), records_before);
    assert!(s.failed().is_empty());
    // The real pass then does exactly what the preview said.
    s.run_once(None, 1);
    let d = s.results(&["--key", "9"]).pop().unwrap();
    assert_eq!(d["situation"], "disputed");
}

#[test]
fn explain_tells_the_story_of_an_account() {
    let s = world();
    s.feed(
        "hr.csv",
        "emp,mail,born,title\n1,ann@x,1990-01-01,Lead\n2,team@x,1980-01-01,Clerk\n3,team@x,1985-01-01,Cook\n9,team@x,1985-01-01,Temp\n",
    );
    s.run_once(None, 0);
    let out = s.idsync(&["explain", "hr", "9"]).expect_code(0);
    let text = &out.stdout;
    assert!(
        text.contains("correlation rule (rules/corr.rhai) returned"),
        "{text}"
    );
    assert!(
        text.contains("confirmation rule (rules/confirm.rhai) returned 2: false"),
        "{text}"
    );
    assert!(text.contains("candidates: 2, 3"), "{text}");
    assert!(text.contains("dropped by confirmation: 2"), "{text}");
    assert!(text.contains("situation: unlinked"), "{text}");
    assert!(text.contains("title: \"Cook\" → \"Temp\""), "{text}");
    let by_identity = s.idsync(&["explain", "--identity", "1"]).expect_code(0);
    assert!(
        by_identity.stdout.contains("title: \"Analyst\" → \"Lead\""),
        "{}",
        by_identity.stdout
    );
    s.idsync(&["explain", "hr", "404"]).expect_code(1);
}

#[test]
fn test_rules_passes_and_fails_with_a_readable_diff() {
    let s = world();
    s.write(
        "rules/tests/link_by_empno.yaml",
        "name: an account with a known employee number is linked
resource: hr
identities:
  - name: ann
    attrs: { empno: '7', mail: ann@x, born: 1990-01-01 }
event:
  op: create
  key: '7'
  attrs: { emp: '7', mail: ann@x, title: Boss }
expect:
  situation: unlinked
  action: linked
  identity: ann
  attrs: { title: Boss }
",
    );
    let out = s.idsync(&["test-rules"]).expect_code(0);
    assert!(out.stdout.contains("1 passed, 0 failed"), "{}", out.stdout);
    s.write(
        "rules/tests/wrong.yaml",
        "resource: hr
identities:
  - { name: ann, attrs: { empno: '7' } }
event: { op: create, key: '8', attrs: { emp: '8' } }
expect: { situation: unlinked, identity: ann }
",
    );
    let out = s.idsync(&["test-rules"]).expect_code(1);
    assert!(
        out.stdout.contains("FAIL  rules/tests/wrong.yaml"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("situation: expected unlinked, got unmatched"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("identity: expected ann, got 8"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("1 passed, 1 failed"), "{}", out.stdout);
    // The real repository is never touched by fixtures.
    assert!(s.identity("ann").is_none());
}

#[test]
fn a_recorded_decision_becomes_a_passing_fixture_with_redaction() {
    let s = world();
    s.feed(
        "hr.csv",
        "emp,mail,born,title\n1,ann@x,1990-01-01,Lead\n2,team@x,1980-01-01,Clerk\n3,team@x,1985-01-01,Cook\n",
    );
    s.run_once(None, 0);
    s.idsync(&[
        "results",
        "--key",
        "1",
        "--record",
        "rules/tests/recorded.yaml",
    ])
    .expect_code(0);
    let text = std::fs::read_to_string(s.path().join("rules/tests/recorded.yaml")).unwrap();
    assert!(
        text.contains("redacted:") && !text.contains("1990-01-01"),
        "{text}"
    );
    let out = s.idsync(&["test-rules"]).expect_code(0);
    assert!(out.stdout.contains("1 passed, 0 failed"), "{}", out.stdout);
}

#[test]
fn notifications_show_in_preview_explain_and_fixtures() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
    mappings:
      - { to: mail, from: mail }
notifications:
  from: 'IT <it@example.com>'
  transport: { type: file, dir: mail }
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome {{ identity.name }}'
      text: 'Hello'
",
    );
    s.feed("hr.csv", "emp,mail\n1,ann@x\n");
    let out = s.idsync(&["preview"]).expect_code(0);
    assert!(
        out.stdout
            .contains("hr 1 upsert unmatched created identity=1 changed=mail notify=welcome"),
        "{}",
        out.stdout
    );
    assert!(!s.path().join("mail").exists(), "preview sends nothing");
    s.run_once(None, 0);
    let out = s.idsync(&["explain", "hr", "1"]).expect_code(0);
    assert!(
        out.stdout
            .contains("notification queued (welcome): to ann@x: Welcome 1"),
        "{}",
        out.stdout
    );
    s.write(
        "rules/tests/welcome.yaml",
        "resource: hr
event: { op: create, key: '2', attrs: { emp: '2', mail: bob@x } }
expect: { action: created, notifications: [welcome] }
",
    );
    s.write(
        "rules/tests/quiet.yaml",
        "resource: hr
identities:
  - { name: '3', attrs: { mail: cy@x }, accounts: [ { resource: hr, key: '3' } ] }
event: { op: update, key: '3', attrs: { emp: '3', mail: cy@y } }
expect: { action: updated, notifications: [welcome] }
",
    );
    let out = s.idsync(&["test-rules"]).expect_code(1);
    assert!(
        out.stdout.contains("ok    rules/tests/welcome.yaml"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("notifications: expected [welcome], got []"),
        "{}",
        out.stdout
    );
}

#[test]
fn redaction_keeps_a_birth_date_confirmation_true_to_the_decision() {
    // Account 3 shares a mail with identity 2 but not its birth date: confirmation refused
    // the candidate and a new identity was created. Its recording must replay that: the
    // redacted birth dates must still differ (and equal ones still agree).
    let s = world();
    let three = s.results(&["--key", "3"]);
    assert_eq!(three[0]["action"], "created", "{three:?}");
    s.idsync(&[
        "results",
        "--key",
        "3",
        "--record",
        "rules/tests/three.yaml",
    ])
    .expect_code(0);
    let text = std::fs::read_to_string(s.path().join("rules/tests/three.yaml")).unwrap();
    assert!(
        !text.contains("1985-01-01") && !text.contains("1980-01-01"),
        "{text}"
    );
    // Identity 2's birth date (in its attributes and its account's) and account 3's: two
    // different values, two different placeholders, the equal ones equal.
    let placeholders: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.starts_with("redacted:"))
        .collect();
    let distinct: std::collections::BTreeSet<&str> = placeholders.iter().copied().collect();
    assert_eq!((placeholders.len(), distinct.len()), (3, 2), "{text}");
    // Ann's update: her own birth date on both sides, the same placeholder twice.
    s.feed(
        "hr.csv",
        "emp,mail,born,title\n1,ann@x,1990-01-01,Lead\n2,team@x,1980-01-01,Clerk\n3,team@x,1985-01-01,Cook\n",
    );
    s.run_once(None, 0);
    s.idsync(&["results", "--key", "1", "--record", "rules/tests/ann.yaml"])
        .expect_code(0);
    let out = s.idsync(&["test-rules"]).expect_code(0);
    assert!(out.stdout.contains("2 passed, 0 failed"), "{}", out.stdout);
}

/// A preview covers the whole pass, every part of it: with 25,000 changes and 100 removals
/// (two parts of the default 20,000), the totals are exact, every delete is listed, the
/// rest only up to --limit; the run that follows applies exactly that. Before the first run,
/// a preview creates no repository file.
#[test]
fn a_preview_covers_every_part_of_the_pass() {
    let s = Sandbox::new();
    s.config(
        "status: { listen: off }\nresources:\n  - name: hr\n    source: { type: flatfile, path: feeds/hr.csv, key: id }\n    naming: 'account.id'\n    populate_global: true\n",
    );
    let feed = |changed: usize, removed: usize| {
        let mut csv = String::from("id,title\n");
        for i in removed..50_000 {
            let title = if i < changed { "lead" } else { "clerk" };
            csv.push_str(&format!("{i},{title}\n"));
        }
        csv
    };
    s.feed("hr.csv", &feed(0, 0));
    let first = s.idsync(&["preview", "--limit", "3"]).expect_code(0);
    assert!(!s.db().exists(), "a preview created the repository");
    assert!(
        first.stdout.contains("50000 events") && first.stdout.contains("in 3 part(s)"),
        "{}",
        first.stdout
    );
    s.run_once(None, 0);
    // Rows 0..99 removed, 100..25099 changed.
    s.feed("hr.csv", &feed(25_100, 100));
    let out = s.idsync(&["preview", "--limit", "10"]).expect_code(0);
    let decisions: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("hr "))
        .collect();
    let deletes = decisions
        .iter()
        .filter(|l| l.split(' ').nth(2) == Some("delete"))
        .count();
    assert_eq!(deletes, 100, "every delete is listed");
    assert_eq!(decisions.len(), 110, "the deletes and 10 more");
    assert!(
        out.stdout.contains("25100 events")
            && out.stdout.contains("updated 25000")
            && out.stdout.contains("in 2 part(s)")
            && out.stdout.contains("24990 more event(s) not listed"),
        "{}",
        out.stdout
    );
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("25100 events"), "{}", run.stdout);

    // 600 removals: more than the guard's max_deletes (500). The preview says the run would
    // refuse the pass and lists the 600 deletes it would apply if accepted.
    s.feed("hr.csv", &feed(25_100, 700));
    let out = s.idsync(&["preview", "--limit", "0"]).expect_code(3);
    assert!(
        out.stdout.contains("the run would refuse this pass")
            && out.stdout.contains("would delete 600 of 49900 accounts"),
        "{}",
        out.stdout
    );
    let deletes = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("hr ") && l.split(' ').nth(2) == Some("delete"))
        .count();
    assert_eq!(deletes, 600);
    let records = s.sql("SELECT count(*) FROM decisions");
    s.run_once(None, 3);
    assert_eq!(
        s.sql("SELECT count(*) FROM decisions"),
        records,
        "the refused pass applied nothing"
    );
}
