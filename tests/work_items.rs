//! Work items and operator decisions through the real binary, over CSV feeds, a real SQLite
//! file and a real SMTP server: a disputed account raises a durable work item (and a mail
//! to an administrator), the same account coming again does not open a second one,
//! `work-items resolve` links, creates or ignores through the resource's mappings and
//! notification policies, `link`/`unlink` work on any account, every operator action is a
//! decision of op `operator` that `results` and `explain` show, and mistakes are refused
//! with exit status 2 before anything changes. A `seed` resource creates the identities the
//! `hr` resource's accounts are matched against.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use common::{Sandbox, SmtpServer, attr};
use serde_json::Value;

const SEED: &str = "\
id,empno,mail
ann,1,ann@example.com
bob,2,shared@example.com
bea,3,shared@example.com
";

/// Notification policies: one for administrators on every new work item, one for the
/// identity whose account an operator (or a rule) linked.
const POLICIES: &str = r#"
  policies:
    - name: admins
      on: [work_item]
      to: ['"iam-admins@example.com"']
      subject: 'Work item #{{ work_item.id }} ({{ work_item.kind }}): {{ resource }} {{ key }}'
      text: |
        {{ work_item.reason }}
        Candidates: {{ work_item.candidates | join(", ") }}
        Title on the account: {{ work_item.account.title }}
        idsync work-items show {{ work_item.id }}
    - name: account-linked
      on: [linked]
      condition: 'resource == "hr"'
      to: ['identity.attrs.mail']
      subject: 'Your HR account {{ key }} is now linked to {{ identity.name }}'
      text: 'Title: {{ identity.attrs.title }}'
"#;

/// A sandbox whose `hr` resource has `hr_extra` (YAML lines of the resource entry; without
/// a process rule also a naming and a mapping of `title`), the rule `by_mail.rhai`
/// (correlation by mail) and `rules`, and, with `smtp_port`,
/// notifications to an SMTP server on that port. The seed identities are created.
fn world(hr_extra: &str, smtp_port: Option<u16>, rules: &[(&str, &str)]) -> Sandbox {
    let s = Sandbox::new();
    for (name, src) in rules {
        s.rule(name, src);
    }
    let notifications = match smtp_port {
        None => String::new(),
        Some(port) => format!(
            "notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s }}
{POLICIES}"
        ),
    };
    s.config(&format!(
        "status: {{ listen: 'off' }}
resources:
  - name: seed
    source: {{ type: flatfile, path: feeds/seed.csv, key: id }}
    mappings:
      - {{ to: empno, from: empno }}
      - {{ to: mail, from: mail }}
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: emp }}
{naming}{hr_extra}{notifications}",
        // A process rule sets attributes itself: naming and mappings would be refused.
        naming = if hr_extra.contains("process:") {
            ""
        } else {
            "    naming: '\"p\" + account.emp'\n    mappings:\n      - { to: title, from: title }\n"
        }
    ));
    s.rule("by_mail.rhai", "#{ mail: account.mail }");
    s.feed("seed.csv", SEED);
    s.run_once(Some("seed"), 0);
    assert_eq!(s.export().len(), 3);
    s
}

const DISPUTED_BY_MAIL: &str =
    "    rules: { correlation: by_mail.rhai }\n    on_disputed: work_item\n";

/// The one open work item.
fn only_open(s: &Sandbox) -> Value {
    let open = s.work_items("open");
    assert_eq!(open.len(), 1, "{open:?}");
    open.into_iter().next().unwrap()
}

/// `outbox list --json`, parsed.
fn outbox(s: &Sandbox) -> Vec<Value> {
    let run = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
    run.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_disputed_event_raises_a_work_item_that_resolve_link_closes() {
    let port = common::free_port();
    let s = world(DISPUTED_BY_MAIL, Some(port), &[]);
    let mut smtp = SmtpServer::on_port(&s.path().join("smtp"), port);
    smtp.start();

    // Two identities share the mail: disputed. The event succeeds and waits for an operator.
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Clerk\n");
    let run = s.run_once(Some("hr"), 0);
    assert!(
        run.stdout.contains("disputed 1") && run.stdout.contains("work_item 1"),
        "{}",
        run.stdout
    );
    let d = s.last_result();
    assert_eq!(d["situation"], "disputed");
    assert_eq!(d["action"], "work_item");
    assert_eq!(s.owner("hr", "15"), None);
    let item = only_open(&s);
    assert_eq!(item["kind"], "disputed");
    assert_eq!(item["resource"], "hr");
    assert_eq!(item["key"], "15");
    assert_eq!(item["candidates"], serde_json::json!(["bea", "bob"]));
    assert_eq!(
        item["reason"],
        "account 15 of hr matches 2 identities: bea, bob"
    );
    assert_eq!(item["decision_id"], d["id"], "the decision that raised it");
    let id = item["id"].as_i64().unwrap();
    let table = s.idsync(&["work-items", "list"]).expect_code(0);
    assert!(
        table
            .stdout
            .contains(&format!("#{id} open disputed hr 15 candidates=bea,bob")),
        "{}",
        table.stdout
    );

    // The administrators' mail went out in the pass's dispatch round.
    let got = smtp.wait_for(1);
    assert_eq!(got[0].rcpt, vec!["iam-admins@example.com"]);
    assert_eq!(
        got[0].header("subject").as_deref(),
        Some(format!("Work item #{id} (disputed): hr 15").as_str())
    );
    assert!(
        got[0].raw.contains("Candidates: bea, bob"),
        "{}",
        got[0].raw
    );
    assert!(got[0].raw.contains("Title on the account: Clerk"));

    // The same account changes: still disputed, still the one open item, no second mail.
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,shared@example.com,Senior Clerk\n",
    );
    s.run_once(Some("hr"), 0);
    let again = only_open(&s);
    assert_eq!(again["id"], id);
    assert_eq!(again["seen"], 2);
    assert_eq!(again["last_decision_id"], s.last_result()["id"]);
    let admin_mails = outbox(&s)
        .into_iter()
        .filter(|m| m["policy"] == "admins")
        .count();
    assert_eq!(admin_mails, 1, "one mail per work item");

    // `show` gives the account, the candidates and the history.
    let show = s
        .idsync(&["work-items", "show", &id.to_string()])
        .expect_code(0);
    for expected in [
        "account: hr 15",
        "title: Senior Clerk",
        "  bea (enabled; accounts: seed:bea)",
        "  bob (enabled; accounts: seed:bob)",
        "    empno: 2",
        "history (2 decision(s) of the account):",
        "linked now to: (no identity)",
    ] {
        assert!(
            show.stdout.contains(expected),
            "{expected}\n{}",
            show.stdout
        );
    }

    // The operator links it to bob.
    let run = s
        .idsync(&[
            "work-items",
            "resolve",
            &id.to_string(),
            "--link",
            "bob",
            "--reason",
            "checked with HR",
        ])
        .expect_code(0);
    assert!(
        run.stdout.contains(&format!("work item #{id} closed")),
        "{}",
        run.stdout
    );
    assert_eq!(s.owner("hr", "15").as_deref(), Some("bob"));
    let bob = s.identity("bob").unwrap();
    assert_eq!(
        attr(&bob, "title"),
        Some("Senior Clerk"),
        "mappings applied"
    );
    assert_eq!(attr(&bob, "empno"), Some("2"), "other attributes kept");

    // Recorded as a decision of op operator.
    let d = s.last_result();
    assert_eq!(d["op"], "operator");
    assert_eq!(d["situation"], "unlinked");
    assert_eq!(d["action"], "linked");
    assert_eq!(d["identity"], "bob");
    let operator = d["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "operator")
        .unwrap();
    assert_eq!(
        operator["result"],
        format!("work item #{id}: link to bob (reason: checked with HR)")
    );
    assert!(
        d["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == "notification" && r["script"] == "account-linked"),
        "{d}"
    );
    let explain = s.idsync(&["explain", "hr", "15"]).expect_code(0);
    for expected in [
        "  op: operator",
        &format!("  operator: work item #{id}: link to bob (reason: checked with HR)"),
        "  action: linked (identity bob)",
        "    title: (none) → \"Senior Clerk\"",
        &format!("closed work item #{id} (disputed, hr 15)"),
        "linked to bob at ",
        &format!("by decision #{}", d["id"]),
    ] {
        assert!(
            explain.stdout.contains(expected),
            "{expected}\n{}",
            explain.stdout
        );
    }
    let by_identity = s.idsync(&["explain", "--identity", "bob"]).expect_code(0);
    assert!(
        by_identity.stdout.contains("  op: operator"),
        "{}",
        by_identity.stdout
    );

    // Closed, with how and by what.
    assert!(s.work_items("open").is_empty());
    let closed = s.work_items("closed");
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["state"], "closed");
    assert_eq!(closed[0]["closed"]["resolution"], "linked");
    assert_eq!(closed[0]["closed"]["identity"], "bob");
    assert_eq!(closed[0]["closed"]["decision_id"], d["id"]);
    assert_eq!(closed[0]["closed"]["reason"], "checked with HR");

    // The link notification reached the SMTP server through the outbox: the command
    // dispatched what it queued, as `run --once` does.
    let got = smtp.wait_for(2);
    assert_eq!(got[1].rcpt, vec!["shared@example.com"]);
    assert_eq!(
        got[1].header("subject").as_deref(),
        Some("Your HR account 15 is now linked to bob")
    );
    assert!(got[1].raw.contains("Title: Senior Clerk"));

    // From now on the account is owned: its changes update bob, no new item.
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Lead\n");
    s.run_once(Some("hr"), 0);
    assert_eq!(s.last_result()["situation"], "linked");
    assert_eq!(attr(&s.identity("bob").unwrap(), "title"), Some("Lead"));
    assert!(s.work_items("open").is_empty());
}

#[test]
fn resolve_create_and_ignore_unmatched_accounts() {
    let s = world(
        "    rules: { correlation: by_mail.rhai }\n    on_unmatched: work_item\n",
        None,
        &[],
    );
    s.feed(
        "hr.csv",
        "emp,mail,title\n42,new@example.com,Clerk\n43,other@example.com,Intern\n",
    );
    s.run_once(Some("hr"), 0);
    assert_eq!(s.export().len(), 3, "nothing created by the pass");
    let open = s.work_items("open");
    assert_eq!(open.len(), 2);
    assert!(open.iter().all(|i| i["kind"] == "unmatched"));
    assert_eq!(open[0]["reason"], "no identity matches account 42 of hr");
    let (first, second) = (
        open[0]["id"].as_i64().unwrap(),
        open[1]["id"].as_i64().unwrap(),
    );

    // --create: the resource's naming and mappings, as create_unmatched would.
    let run = s
        .idsync(&["work-items", "resolve", &first.to_string(), "--create"])
        .expect_code(0);
    assert!(
        run.stdout
            .contains("operator unmatched created identity=p42"),
        "{}",
        run.stdout
    );
    assert_eq!(s.owner("hr", "42").as_deref(), Some("p42"));
    assert_eq!(attr(&s.identity("p42").unwrap(), "title"), Some("Clerk"));
    let d = s.last_result();
    assert_eq!(
        (d["op"].as_str(), d["action"].as_str()),
        (Some("operator"), Some("created"))
    );

    // --ignore: nothing changes but the item, and the decision is recorded.
    s.idsync(&[
        "work-items",
        "resolve",
        &second.to_string(),
        "--ignore",
        "--reason",
        "a test row",
    ])
    .expect_code(0);
    assert_eq!(s.owner("hr", "43"), None);
    assert_eq!(s.export().len(), 4);
    let d = s.last_result();
    assert_eq!(d["op"], "operator");
    assert_eq!(d["situation"], "unmatched");
    assert_eq!(d["action"], "ignored");
    assert_eq!(d["key"], "43");
    let closed = s.work_items("closed");
    assert_eq!(closed.len(), 2);
    assert_eq!(closed[0]["closed"]["resolution"], "created");
    assert_eq!(closed[0]["closed"]["identity"], "p42");
    assert_eq!(closed[1]["closed"]["resolution"], "ignored");
    assert_eq!(closed[1]["closed"]["reason"], "a test row");

    // An ignored account that comes again (changed) raises a new item: the operator
    // closed the old question, this is a new one.
    s.feed(
        "hr.csv",
        "emp,mail,title\n42,new@example.com,Clerk\n43,other@example.com,Trainee\n",
    );
    s.run_once(Some("hr"), 0);
    let open = s.work_items("open");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["key"], "43");
    assert!(open[0]["id"].as_i64().unwrap() > second);
}

#[test]
fn link_and_unlink_any_account() {
    // Without work items: the account is created and linked by the pass.
    let s = world("    rules: { correlation: by_mail.rhai }\n", None, &[]);
    s.feed("hr.csv", "emp,mail,title\n7,seven@example.com,Clerk\n");
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "7").as_deref(), Some("p7"));

    // unlink: the link goes, the identity stays as it is.
    let run = s
        .idsync(&["unlink", "hr", "7", "--reason", "wrong person"])
        .expect_code(0);
    assert!(
        run.stdout
            .contains("hr 7 operator linked unlinked identity=p7"),
        "{}",
        run.stdout
    );
    assert_eq!(s.owner("hr", "7"), None);
    let p7 = s.identity("p7").unwrap();
    assert_eq!(p7["disabled"], false);
    assert_eq!(attr(&p7, "title"), Some("Clerk"));

    // link to ann: mappings from the account's last seen attributes.
    s.idsync(&["link", "hr", "7", "ann"]).expect_code(0);
    assert_eq!(s.owner("hr", "7").as_deref(), Some("ann"));
    assert_eq!(attr(&s.identity("ann").unwrap(), "title"), Some("Clerk"));

    // link to bob moves it from ann.
    let run = s.idsync(&["link", "hr", "7", "bob"]).expect_code(0);
    assert!(
        run.stdout.contains("operator=\"unlinked from ann\""),
        "{}",
        run.stdout
    );
    assert_eq!(s.owner("hr", "7").as_deref(), Some("bob"));
    let d = s.last_result();
    assert_eq!(d["situation"], "linked");
    assert_eq!(d["action"], "linked");

    // Every operator decision is in `results` and `explain`.
    let ops: Vec<Value> = s
        .results(&["--key", "7"])
        .into_iter()
        .filter(|d| d["op"] == "operator")
        .collect();
    let actions: Vec<&str> = ops.iter().map(|d| d["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["unlinked", "linked", "linked"]);
    let explain = s.idsync(&["explain", "--identity", "p7"]).expect_code(0);
    assert!(
        explain
            .stdout
            .contains("  operator: unlink (reason: wrong person)"),
        "{}",
        explain.stdout
    );
}

/// An operator unlinks an account correlation linked to the wrong person: its next change
/// is not correlated back to that identity (the rule still finds it), the account is then
/// unmatched and gets an identity of its own; an operator's link undoes the exclusion.
#[test]
fn an_account_an_operator_unlinked_is_not_correlated_back_to_that_identity() {
    let s = world("    rules: { correlation: by_mail.rhai }\n", None, &[]);
    s.feed("hr.csv", "emp,mail,title\n9,ann@example.com,Clerk\n");
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "9").as_deref(), Some("ann"));
    s.idsync(&["unlink", "hr", "9", "--reason", "not ann"])
        .expect_code(0);
    let explain = s.idsync(&["explain", "hr", "9"]).expect_code(0);
    assert!(
        explain
            .stdout
            .contains("not correlated: account 9 of hr is not linked to ann by correlation"),
        "{}",
        explain.stdout
    );

    s.feed("hr.csv", "emp,mail,title\n9,ann@example.com,Lead\n");
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "9").as_deref(), Some("p9"), "not ann again");
    assert_eq!(attr(&s.identity("ann").unwrap(), "title"), Some("Clerk"));
    let d = s.last_result();
    assert_eq!(d["situation"], "unmatched");
    assert_eq!(d["action"], "created");
    let said = d["rules"].to_string();
    assert!(said.contains("not a candidate: ann"), "{said}");

    // The operator links it to ann after all: from now on p9 is the one it is not.
    s.idsync(&["link", "hr", "9", "ann"]).expect_code(0);
    let explain = s.idsync(&["explain", "hr", "9"]).expect_code(0);
    assert!(
        explain
            .stdout
            .contains("is not linked to p9 by correlation")
            && !explain.stdout.contains("is not linked to ann"),
        "{}",
        explain.stdout
    );
    s.feed("hr.csv", "emp,mail,title\n9,ann@example.com,Chief\n");
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "9").as_deref(), Some("ann"));
    assert_eq!(attr(&s.identity("ann").unwrap(), "title"), Some("Chief"));
}

/// An operator's request that fails while applied (here the name its naming gives is
/// taken) changes nothing but is recorded, as a failed decision of op `operator` with
/// what was asked: the audit trail keeps the attempt, and the work item stays open.
#[test]
fn a_failed_operator_request_is_recorded_and_changes_nothing() {
    let s = world(DISPUTED_BY_MAIL, None, &[]);
    s.feed("seed.csv", &format!("{SEED}p15,15,p15@example.com\n"));
    s.run_once(Some("seed"), 0);
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Clerk\n");
    s.run_once(Some("hr"), 0);
    let id = only_open(&s)["id"].as_i64().unwrap().to_string();
    let run = s
        .idsync(&[
            "work-items",
            "resolve",
            &id,
            "--create",
            "--reason",
            "new hire",
        ])
        .expect_code(1);
    assert!(
        run.stderr
            .contains("nothing was changed (recorded as failed decision #"),
        "{}",
        run.stderr
    );
    let d = s.last_result();
    assert_eq!(d["op"], "operator");
    assert_eq!(d["action"], "failed");
    assert_eq!(d["key"], "15");
    assert!(d["error"].as_str().unwrap().contains("p15"), "{d}");
    assert!(
        d["rules"]
            .to_string()
            .contains("create an identity (reason: new hire)"),
        "{d}"
    );
    assert_eq!(only_open(&s)["id"].as_i64().unwrap().to_string(), id);
    assert_eq!(s.owner("hr", "15"), None);
    assert_eq!(attr(&s.identity("p15").unwrap(), "title"), None);
}

#[test]
fn unknown_ids_identities_accounts_and_mistakes_exit_2_and_change_nothing() {
    let s = world(DISPUTED_BY_MAIL, None, &[]);
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Clerk\n");
    s.run_once(Some("hr"), 0);
    let id = only_open(&s)["id"].as_i64().unwrap().to_string();
    let decisions = s.results(&[]).len();

    let refused = |args: &[&str], says: &str| {
        let run = s.idsync(args).expect_code(2);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    };
    refused(
        &["work-items", "resolve", "999", "--ignore"],
        "no work item #999",
    );
    refused(&["work-items", "show", "999"], "no work item #999");
    refused(
        &["work-items", "resolve", &id, "--link", "nobody"],
        "no identity named 'nobody'",
    );
    refused(
        &["link", "hr", "404", "bob"],
        "resource hr has no account '404'",
    );
    refused(
        &["link", "payroll", "15", "bob"],
        "no resource named 'payroll'",
    );
    refused(&["unlink", "hr", "15"], "account 15 of hr is not linked");
    refused(
        &["work-items", "list", "--resource", "payroll"],
        "no resource named 'payroll'",
    );
    // clap: one of --link, --create, --ignore.
    s.idsync(&["work-items", "resolve", &id]).expect_code(2);

    // Nothing changed: the item is open, no decision was recorded.
    assert_eq!(only_open(&s)["id"].as_i64().unwrap().to_string(), id);
    assert_eq!(s.results(&[]).len(), decisions);
    assert_eq!(s.owner("hr", "15"), None);

    // A closed item cannot be resolved again; --create on a linked account is refused.
    s.idsync(&["work-items", "resolve", &id, "--link", "bea"])
        .expect_code(0);
    refused(
        &["work-items", "resolve", &id, "--ignore"],
        &format!("work item #{id} is closed already (linked to bea at "),
    );
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,shared@example.com,Clerk\n16,shared@example.com,Clerk\n",
    );
    s.run_once(Some("hr"), 0);
    let second = only_open(&s)["id"].as_i64().unwrap().to_string();
    s.idsync(&["link", "hr", "16", "bob"]).expect_code(0);
    // Linking the account settled its disputed item.
    assert!(s.work_items("open").is_empty());
    let closed = s.work_items("closed");
    assert_eq!(
        closed.last().unwrap()["id"].as_i64().unwrap().to_string(),
        second
    );
    // Linking it again to its owner is no mistake: the mappings apply again.
    let run = s.idsync(&["link", "hr", "16", "bob"]).expect_code(0);
    assert!(
        run.stdout
            .contains("hr 16 operator linked updated identity=bob"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_rule_work_item_is_stored_once_per_account_and_message() {
    let s = world(
        "    rules: { correlation: by_mail.rhai, resolve: resolve.rhai }\n    create_unmatched: false\n",
        None,
        &[(
            "resolve.rhai",
            "ctx.work_item(`check employee ${account.emp}: ${situation}, ${candidates.len()} candidate(s)`);",
        )],
    );
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,shared@example.com,Clerk\n42,nobody@example.com,Clerk\n",
    );
    s.run_once(Some("hr"), 0);
    let open = s.work_items("open");
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(open[0]["kind"], "rule");
    assert_eq!(open[0]["key"], "15");
    assert_eq!(
        open[0]["reason"],
        "check employee 15: disputed, 2 candidate(s)"
    );
    assert_eq!(open[0]["candidates"], serde_json::json!(["bea", "bob"]));
    assert_eq!(
        open[1]["reason"],
        "check employee 42: unmatched, 0 candidate(s)"
    );
    assert_eq!(open[1]["candidates"], serde_json::json!([]));
    let d = s.results(&["--key", "15"]).pop().unwrap();
    assert_eq!(d["action"], "resolved");
    assert_eq!(open[0]["decision_id"], d["id"]);

    // The same accounts again, same messages: no new item.
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,shared@example.com,Lead\n42,nobody@example.com,Lead\n",
    );
    s.run_once(Some("hr"), 0);
    let again = s.work_items("open");
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|i| i["seen"] == 2), "{again:?}");

    // Another message for the same account is another question: a second item.
    s.rule(
        "resolve.rhai",
        "ctx.work_item(`employee ${account.emp} needs a manager`);",
    );
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Head\n");
    s.run_once(Some("hr"), 0);
    let now = s.work_items("open");
    assert_eq!(now.len(), 3);
    assert_eq!(now[2]["reason"], "employee 15 needs a manager");

    // explain lists the account's items.
    let explain = s.idsync(&["explain", "hr", "15"]).expect_code(0);
    assert!(
        explain
            .stdout
            .contains("(rule, hr 15): check employee 15: disputed, 2 candidate(s)"),
        "{}",
        explain.stdout
    );
    assert!(
        explain
            .stdout
            .contains("(rule, hr 15): employee 15 needs a manager")
    );
    // An operator's link settles the account's disputed and unmatched items, not the
    // rule's questions.
    s.idsync(&["link", "hr", "15", "bob"]).expect_code(0);
    assert_eq!(s.work_items("open").len(), 3);
    // --create for an account an identity owns is refused, the item stays open.
    let id = now[2]["id"].as_i64().unwrap().to_string();
    let run = s
        .idsync(&["work-items", "resolve", &id, "--create"])
        .expect_code(2);
    assert!(
        run.stderr
            .contains("account 15 of hr is linked to bob; unlink it first (idsync unlink hr 15)"),
        "{}",
        run.stderr
    );
    assert_eq!(s.work_items("open").len(), 3);
    // --ignore closes it, recording the owner as the decision's identity.
    s.idsync(&["work-items", "resolve", &id, "--ignore"])
        .expect_code(0);
    let d = s.last_result();
    assert_eq!(
        (d["situation"].as_str(), d["identity"].as_str()),
        (Some("linked"), Some("bob"))
    );
    assert_eq!(s.work_items("open").len(), 2);
}

#[test]
fn check_refuses_contradicting_unmatched_settings() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
    create_unmatched: true
    on_unmatched: work_item
",
    );
    let run = s.idsync(&["check"]).expect_code(2);
    assert!(
        run.stderr
            .contains("resources[0].on_unmatched: 'work_item' contradicts create_unmatched: true"),
        "{}",
        run.stderr
    );
}

/// `idsync run --once` killed with SIGKILL after `after`, unless it ended first: whether it
/// was killed.
fn run_once_killed_after(s: &Sandbox, after: std::time::Duration) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["run", "--once", "--resource", "hr"])
        .current_dir(s.path())
        .env_remove("IDSYNC_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + after;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    killed
}

#[test]
fn a_kill_never_leaves_a_decision_without_its_item_or_an_item_twice() {
    const ACCOUNTS: usize = 4000;
    let s = world(DISPUTED_BY_MAIL, None, &[]);
    // Parts of 100 events, each committed on its own: a kill lands between and inside them.
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&config.replace(
        "path: feeds/hr.csv, key: emp }",
        "path: feeds/hr.csv, key: emp, batch_size: 100 }",
    ));
    // Every account is disputed (two seed identities share the mail). Two passes: every
    // account raises its item, then raises it again (changed rows).
    for title in ["Clerk", "Lead"] {
        let mut csv = String::from("emp,mail,title\n");
        for i in 0..ACCOUNTS {
            csv.push_str(&format!("{i},shared@example.com,{title}\n"));
        }
        s.feed("hr.csv", &csv);
        let mut kills = 0;
        for ms in [40, 90, 160, 250, 400, 600, 900, 1300] {
            if run_once_killed_after(&s, std::time::Duration::from_millis(ms)) {
                kills += 1;
            }
        }
        eprintln!("{title}: {kills} run(s) killed");
        assert!(kills > 0, "no run was cut short: make the feed larger");
        s.run_once(Some("hr"), 0);
    }
    let count = |sql: &str| s.sql(sql).parse::<u64>().unwrap();
    let decided =
        count("SELECT count(*) FROM decisions WHERE resource = 'hr' AND action = 'work_item'");
    assert_eq!(decided, 2 * ACCOUNTS as u64, "one decision per event");
    assert_eq!(count("SELECT count(*) FROM work_items"), ACCOUNTS as u64);
    assert_eq!(
        count("SELECT count(*) FROM work_items WHERE seen = 2 AND state = 'open'"),
        ACCOUNTS as u64
    );
    // Every decision that left its account to an operator is the one that raised or last
    // raised its account's item.
    assert_eq!(
        count(
            "SELECT count(*) FROM decisions d WHERE d.action = 'work_item' AND NOT EXISTS \
             (SELECT 1 FROM work_items w WHERE w.resource = d.resource AND w.key = d.key \
              AND d.id IN (w.decision_id, w.last_decision_id))"
        ),
        0
    );
}

/// An operator's command waits for a write of another process (an agent committing a large
/// batch) instead of failing with "database is locked", says so, then applies.
#[test]
fn an_operator_command_waits_visibly_for_a_long_write_of_another_process() {
    let s = world(DISPUTED_BY_MAIL, None, &[]);
    s.feed("hr.csv", "emp,mail,title\n15,shared@example.com,Clerk\n");
    s.run_once(Some("hr"), 0);
    let id = only_open(&s)["id"].as_i64().unwrap().to_string();
    // Another process holds the write lock for 7 s, beyond SQLite's own 5 s.
    let mut holder = std::process::Command::new("sqlite3")
        .arg(s.db())
        .args([
            "BEGIN IMMEDIATE;",
            "UPDATE identities SET version = version WHERE 0;",
            ".shell sleep 7",
            "COMMIT;",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let run = s
        .idsync(&["work-items", "resolve", &id, "--link", "bea"])
        .expect_code(0);
    let waited = started.elapsed();
    holder.wait().unwrap();
    assert!(
        waited >= std::time::Duration::from_secs(5),
        "it waited for the lock ({waited:?})"
    );
    assert!(
        run.stderr.contains("repository is busy") && run.stderr.contains("waiting"),
        "{}",
        run.stderr
    );
    assert_eq!(s.owner("hr", "15").as_deref(), Some("bea"));
}

/// `link` and `unlink` name an LDAP account by its DN or its naming attribute (`uid`), as
/// `explain` does; the decisions are recorded under the entryUUID.
#[test]
fn ldap_accounts_are_linked_and_unlinked_by_dn_and_naming_attribute() {
    use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};
    let slapd = Slapd::start();
    slapd.add_person("ann", "Ann", "ann@example.com");
    slapd.add_person("bob", "Bob", "bob@example.com");
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", &format!("{SYNC_PW}\n"));
    s.config(&format!(
        "status: {{ listen: off }}
resources:
  - name: dir
    source:
      type: ldap
      url: {url}
      base: {PEOPLE}
      filter: (objectClass=inetOrgPerson)
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
      timeout_secs: 5
      mode: syncrepl
      name_attribute: uid
    naming: 'account.uid'
    mappings:
      - {{ to: mail, from: mail }}
",
        url = slapd.url()
    ));
    s.run_once(None, 0);
    let ann = slapd.entry_uuid(&format!("uid=ann,{PEOPLE}"));
    let bob = slapd.entry_uuid(&format!("uid=bob,{PEOPLE}"));
    assert_eq!(s.owner("dir", &ann).as_deref(), Some("ann"));

    // By DN (any case).
    s.idsync(&["unlink", "dir", &format!("UID=ann,{PEOPLE}")])
        .expect_code(0);
    assert_eq!(s.owner("dir", &ann), None);
    let d = s.last_result();
    assert_eq!(
        (d["key"].as_str(), d["op"].as_str()),
        (Some(ann.as_str()), Some("operator"))
    );

    // By the naming attribute: bob's entry moves to identity ann, whose mail follows it.
    s.idsync(&["link", "dir", "bob", "ann"]).expect_code(0);
    assert_eq!(s.owner("dir", &bob).as_deref(), Some("ann"));
    assert_eq!(
        attr(&s.identity("ann").unwrap(), "mail"),
        Some("bob@example.com")
    );
    assert_eq!(s.last_result()["key"], bob.as_str());
    // Nobody answers to that name.
    let run = s.idsync(&["link", "dir", "carol", "ann"]).expect_code(2);
    assert!(
        run.stderr.contains("resource dir has no account 'carol'"),
        "{}",
        run.stderr
    );
}

/// A process rule raises work items too, and an operator's link on its resource links
/// (a process-rule resource has no mappings: the identity is left as it is).
#[test]
fn a_process_rule_raises_work_items_and_an_operator_link_only_links() {
    let s = world(
        "    rules: { process: process.rhai }\n",
        None,
        &[(
            "process.rhai",
            "if account.title == \"Contractor\" { ctx.work_item(`contractor ${key}: who sponsors them?`); }",
        )],
    );
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,c@example.com,Contractor\n16,d@example.com,Clerk\n",
    );
    s.run_once(Some("hr"), 0);
    let item = only_open(&s);
    assert_eq!(item["kind"], "rule");
    assert_eq!(item["key"], "15");
    assert_eq!(item["reason"], "contractor 15: who sponsors them?");
    assert_eq!(s.results(&["--key", "15"])[0]["action"], "processed");

    let id = item["id"].as_i64().unwrap().to_string();
    s.idsync(&["work-items", "resolve", &id, "--link", "ann"])
        .expect_code(0);
    assert_eq!(s.owner("hr", "15").as_deref(), Some("ann"));
    assert_eq!(attr(&s.identity("ann").unwrap(), "title"), None);
    assert!(s.work_items("open").is_empty());
}

/// An open work item keeps its account's decision records through `results purge`, and
/// `status` counts it; once resolved, the records go at the next purge.
#[test]
fn an_open_work_item_keeps_its_records_and_shows_in_status() {
    let s = world(DISPUTED_BY_MAIL, None, &[]);
    s.feed(
        "hr.csv",
        "emp,mail,title\n15,shared@example.com,Clerk\n16,ann@example.com,Boss\n",
    );
    s.run_once(Some("hr"), 0);
    let id = only_open(&s)["id"].as_i64().unwrap();
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains("work items: 1 open"),
        "{}",
        status.stdout
    );
    let json = s.idsync(&["status", "--json"]).expect_code(0);
    let v: Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["work_items_open"], 1);

    let purge = s
        .idsync(&["results", "purge", "--before", "2999-01-01"])
        .expect_code(0);
    assert!(
        purge
            .stdout
            .contains("1: an open work item of their account needs them"),
        "{}",
        purge.stdout
    );
    let kept = s.results(&["--resource", "hr"]);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["key"], "15");

    s.idsync(&["work-items", "resolve", &id.to_string(), "--ignore"])
        .expect_code(0);
    s.idsync(&["results", "purge", "--before", "2999-01-01"])
        .expect_code(0);
    assert!(s.results(&["--resource", "hr"]).is_empty());
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(!status.stdout.contains("work items:"), "{}", status.stdout);
}
