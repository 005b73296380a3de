//! Retention and erasure as users run them: the agent's `retention:` removing old decision
//! records, sent notifications and discarded failed events while keeping what an open failed
//! event needs; `results purge --before`; `identities erase` of a deleted identity leaving
//! nothing of it in any table of the repository, and refusing an identity that exists.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Sandbox, eventually, terminate};

/// A feed of three accounts, the third failing its correlation rule (an open failed event),
/// with a welcome mail written by the file transport.
fn three_accounts(s: &Sandbox, retention: &str) {
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: off }}
{retention}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    rules: {{ correlation: corr.rhai }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: file, dir: mail }}
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome'
      text: 'Hello'
"
    ));
    s.rule(
        "corr.rhai",
        "if account.id == \"3\" || account.id == \"4\" { throw \"no luck for \" + account.id } else { () }",
    );
    s.feed(
        "hr.csv",
        "id,mail\n1,one@example.com\n2,two@example.com\n3,three@example.com\n4,four@example.com\n",
    );
}

fn keys_of_decisions(s: &Sandbox) -> String {
    s.sql("SELECT group_concat(key, ',') FROM (SELECT key FROM decisions ORDER BY id)")
}

/// The agent applies `retention:` at start: the decision records of accounts 1, 2 and 4
/// (whose failed event was discarded) go, account 3's stay for its open failed event; the
/// sent mails and the discarded failed event go too.
#[test]
fn the_agent_applies_retention_and_keeps_what_an_open_failed_event_needs() {
    let s = Sandbox::new();
    three_accounts(
        &s,
        "retention: { decisions: 2s, outbox: 2s, failed_discarded: 2s }",
    );
    // run --once applies retention too: nothing is old enough yet.
    let out = s.run_once(None, 1);
    assert!(!out.stdout.contains("retention:"), "{}", out.stdout);
    s.idsync(&[
        "failed", "discard", "-r", "hr", "-k", "4", "--reason", "left",
    ])
    .expect_code(0);
    assert_eq!(keys_of_decisions(&s), "1,2,3,4");
    assert_eq!(
        s.sql("SELECT count(*) FROM outbox WHERE status = 'sent'"),
        "2"
    );
    assert_eq!(s.sql("SELECT count(*) FROM failed_discarded"), "1");
    std::thread::sleep(Duration::from_millis(2500));

    let mut agent = s.start_logged(&[]);
    let log = eventually(20, "the retention line", || {
        let log = s.agent_log();
        log.contains("retention: ").then_some(log)
    });
    assert!(
        log.contains(
            "retention: removed 3 decision record(s) older than 2s; kept 1 of them \
             (1: an open failed event of their account needs them); removed 2 sent \
             notification(s) older than 2s; removed 1 discarded failed event(s) older than 2s"
        ),
        "{log}"
    );
    assert_eq!(keys_of_decisions(&s), "3");
    assert_eq!(s.sql("SELECT count(*) FROM outbox"), "0");
    assert_eq!(s.sql("SELECT count(*) FROM failed_discarded"), "0");
    assert_eq!(s.sql("SELECT key FROM failed_events"), "3");
    // The identities themselves are not records: they stay.
    assert_eq!(s.export().len(), 2);
    let (code, _) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    // `explain` still shows why account 3 waits.
    let explain = s.idsync(&["explain", "hr", "3"]).expect_code(0);
    assert!(
        explain.stdout.contains("no luck for 3"),
        "{}",
        explain.stdout
    );
}

/// `idsync check` refuses a retention value that is not an age, naming the key.
#[test]
fn check_refuses_a_retention_that_is_not_an_age() {
    let s = Sandbox::new();
    three_accounts(&s, "retention: { decisions: forever, outbox: 0d }");
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(
        out.stderr.contains(
            "idsync.yaml: retention.decisions: 'forever' is not an age like 90d, 12h or 30m"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("retention.outbox: '0d': give an age of more than 0"),
        "{}",
        out.stderr
    );
    assert!(!s.db().exists());
}

/// `results purge --before` removes the older records but those an open failed event
/// needs, and says how many went and how many were kept and why; once the failed event is
/// retried, its account's records go too.
#[test]
fn results_purge_keeps_the_records_an_open_failed_event_needs() {
    let s = Sandbox::new();
    three_accounts(&s, "");
    s.run_once(None, 1);
    s.idsync(&[
        "failed", "discard", "-r", "hr", "-k", "4", "--reason", "left",
    ])
    .expect_code(0);
    assert_eq!(keys_of_decisions(&s), "1,2,3,4");

    let out = s
        .idsync(&["results", "purge", "--before", "2000-01-01"])
        .expect_code(0);
    assert!(
        out.stdout
            .contains("removed 0 decision record(s) recorded before 2000-01-01T00:00:00Z"),
        "{}",
        out.stdout
    );
    let out = s
        .idsync(&["results", "purge", "--before", "last tuesday"])
        .expect_code(2);
    assert!(
        out.stderr
            .contains("--before: 'last tuesday' is neither an RFC 3339 time"),
        "{}",
        out.stderr
    );
    assert_eq!(keys_of_decisions(&s), "1,2,3,4");

    let out = s
        .idsync(&["results", "purge", "--before", "0s"])
        .expect_code(0);
    assert!(
        out.stdout
            .contains("removed 3 decision record(s) recorded before ")
            && out
                .stdout
                .contains("; kept 1 of them (1: an open failed event of their account needs them)"),
        "{}",
        out.stdout
    );
    assert_eq!(keys_of_decisions(&s), "3");

    // Fixed and retried: nothing needs account 3's records any more.
    s.rule("corr.rhai", "()");
    s.idsync(&["failed", "retry", "--all"]).expect_code(0);
    let out = s
        .idsync(&["results", "purge", "--before", "0s"])
        .expect_code(0);
    assert!(
        out.stdout.contains("removed 2 decision record(s)") && !out.stdout.contains("kept"),
        "{}",
        out.stdout
    );
    assert_eq!(s.sql("SELECT count(*) FROM decisions"), "0");
    s.idsync(&["results"]).expect_code(0);
}

/// Every table of the repository, dumped as text (`sqlite3`), table by table.
fn dump(s: &Sandbox) -> Vec<(String, String)> {
    let tables = s.sql("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name");
    tables
        .lines()
        .map(|t| (t.to_owned(), s.sql(&format!("SELECT * FROM \"{t}\""))))
        .collect()
}

/// alice is created, fails an update (discarded by the operator), gets a welcome mail and
/// is deleted by the delete rule (her row stays, marked `left`); a visitor's disputed
/// event names her as a candidate. `identities erase alice` refuses while she exists, then
/// removes every row holding her name or her values from every table, replaces her name in
/// the visitor's records, keeps bob's, and records the erasure without her name.
#[test]
fn erasing_a_deleted_identity_leaves_nothing_of_it_in_any_table() {
    let s = Sandbox::new();
    s.config(
        "status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    rules: { delete: delete.rhai }
    naming: 'account.first'
    delete_action: delete
    mappings:
      - { to: first, from: first }
      - { to: last, from: last }
      - { to: mail, from: mail }
      - to: title
        expr: 'if account.status == \"suspended\" { throw \"cannot map a suspended account\" } else { account.status }'
  - name: visitors
    source: { type: flatfile, path: feeds/visitors.csv, key: badge }
    rules: { correlation: visitors.rhai }
notifications:
  from: 'idsync <idsync@example.com>'
  transport: { type: file, dir: mail }
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome {{ identity.attrs.first }} {{ identity.attrs.last }}'
      text: 'Hello {{ identity.attrs.first }}'
",
    );
    s.rule("delete.rhai", "account.status == \"left\"");
    s.rule("visitors.rhai", "[\"alice\", \"bob\"]");
    let hr = |alice_status: &str| {
        s.feed(
            "hr.csv",
            &format!(
                "id,first,last,mail,status\n1,alice,Liddell,alice@wonder.land,{alice_status}\n2,bob,Builder,bob@build.er,active\n"
            ),
        );
    };
    hr("active");
    s.feed("visitors.csv", "badge,note\nv1,guest\n");
    s.run_once(None, 1);
    assert!(s.identity("alice").is_some());

    // A live identity is refused, and nothing changes.
    let before = dump(&s);
    let out = s.idsync(&["identities", "erase", "alice"]).expect_code(2);
    assert!(
        out.stderr.contains(
            "error: identity 'alice' still exists (enabled, linked to hr:1): only a deleted identity can be erased; nothing was changed"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(dump(&s), before);

    // A failed update the operator discards, then the delete.
    hr("suspended");
    s.run_once(None, 1);
    s.idsync(&[
        "failed",
        "discard",
        "-r",
        "hr",
        "-k",
        "1",
        "--reason",
        "suspended",
    ])
    .expect_code(0);
    hr("left");
    let out = s.idsync(&["run", "--once"]);
    assert!(out.code == 0 || out.code == 1, "{}", out.stderr);
    assert!(s.identity("alice").is_none(), "{:?}", s.export());
    // What the history still holds of her, before the erasure.
    let held = |t: &(String, String)| {
        t.1.contains("alice") || t.1.contains("Liddell") || t.1.contains("wonder.land")
    };
    let holding: Vec<String> = dump(&s).into_iter().filter(held).map(|t| t.0).collect();
    for table in [
        "decisions",
        "failed_discarded",
        "failed_events",
        "outbox",
        "shadows",
    ] {
        assert!(
            holding.iter().any(|t| t == table),
            "{table} should hold alice before the erasure: {holding:?}"
        );
    }

    let out = s
        .idsync(&["identities", "erase", "alice", "--reference", "GDPR-1"])
        .expect_code(0);
    assert!(
        out.stdout
            .starts_with("erased alice: 1 former account(s); removed ")
            && out
                .stdout
                .contains("1 shadow(s), 1 notification(s) (0 undelivered), ")
            && out.stdout.contains("1 discarded failed event(s)")
            && out.stdout.contains(
                "the name replaced by (erased) in 2 other record(s); recorded as erasure #1"
            ),
        "{}",
        out.stdout
    );
    let after = dump(&s);
    for (table, rows) in &after {
        for gone in ["alice", "Liddell", "wonder.land"] {
            assert!(
                !rows.contains(gone),
                "table {table} still holds '{gone}' after the erasure:\n{rows}"
            );
        }
    }
    let table = |name: &str| {
        after
            .iter()
            .find(|t| t.0 == name)
            .map(|t| t.1.clone())
            .unwrap()
    };
    // bob keeps everything; the visitor's records name him and "(erased)".
    assert!(table("identities").contains("Builder"), "{after:?}");
    assert!(table("shadows").contains("bob@build.er"), "{after:?}");
    let visitor = s.idsync(&["explain", "visitors", "v1"]).expect_code(0);
    assert!(
        visitor.stdout.contains("(erased)") && visitor.stdout.contains("bob"),
        "{}",
        visitor.stdout
    );
    let failed = s.failed();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["error"].as_str().unwrap().contains("(erased)"),
        "{failed:?}"
    );

    // The record of the erasure: when, the reference, the counts; never the name.
    let erasures = s
        .idsync(&["identities", "erasures", "--json"])
        .expect_code(0);
    let lines: Vec<serde_json::Value> = erasures
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", erasures.stdout);
    assert_eq!(lines[0]["reference"], "GDPR-1");
    assert_eq!(lines[0]["removed"]["shadows"], 1);
    assert!(!erasures.stdout.contains("alice"));

    // Nothing more to erase; a name nothing holds; bob still exists.
    s.idsync(&["identities", "erase", "alice"]).expect_code(1);
    let out = s.idsync(&["identities", "erase", "nobody"]).expect_code(1);
    assert!(
        out.stderr
            .contains("nothing in the repository is about an identity named 'nobody'"),
        "{}",
        out.stderr
    );
    // A word the records mention that was never an identity's name is no one's.
    let before = dump(&s);
    s.idsync(&["identities", "erase", "resolve"]).expect_code(1);
    s.idsync(&["identities", "erase", "#"]).expect_code(1);
    assert_eq!(dump(&s), before);
    let out = s.idsync(&["identities", "erase", "bob"]).expect_code(2);
    assert!(out.stderr.contains("still exists"), "{}", out.stderr);
    assert!(s.identity("bob").is_some());
}
