//! Every situation of the decision order, through the real binary over CSV feeds and a
//! real SQLite file. A `seed` resource creates the existing identities; the `hr` resource
//! is the one under test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Sandbox, attr};

const SEED: &str = "\
id,empno,mail,born
ann,1,ann@x,1990-01-01
bob,2,shared@x,1980-02-02
bea,3,shared@x,1985-03-03
";

/// A sandbox with ann, bob and bea created by the seed resource, and the `hr` resource
/// configured with `hr_extra` (YAML lines indented for a resource entry).
fn world(hr_extra: &str, rules: &[(&str, &str)]) -> Sandbox {
    let s = Sandbox::new();
    for (name, src) in rules {
        s.rule(name, src);
    }
    s.config(&format!(
        "resources:
  - name: seed
    source: {{ type: flatfile, path: feeds/seed.csv, key: id }}
    mappings:
      - {{ to: empno, from: empno }}
      - {{ to: mail, from: mail }}
      - {{ to: born, from: born }}
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: emp }}
{mappings}{hr_extra}",
        // A process rule sets attributes itself: mappings would be refused.
        mappings = if hr_extra.contains("process:") {
            ""
        } else {
            "    mappings:\n      - { to: title, from: title }\n"
        }
    ));
    s.feed("seed.csv", SEED);
    s.rule("by_empno.rhai", "#{ empno: account.emp }");
    s.rule(
        "by_mail.rhai",
        "// every identity with this mail\n#{ mail: account.mail }",
    );
    s.run_once(Some("seed"), 0);
    assert_eq!(s.export().len(), 3);
    s
}

fn hr(s: &Sandbox, csv: &str, code: i32) -> common::Run {
    s.feed("hr.csv", csv);
    s.run_once(Some("hr"), code)
}

#[test]
fn unmatched_creates_and_then_linked_updates() {
    let s = world(
        "    rules: { correlation: by_empno.rhai }\n    naming: '\"p\" + account.emp'\n",
        &[],
    );
    let out = hr(&s, "emp,title\n9,Clerk\n", 0);
    assert!(out.stdout.contains("unmatched 1"), "{}", out.stdout);
    let d = s.last_result();
    assert_eq!(d["situation"], "unmatched");
    assert_eq!(d["action"], "created");
    assert_eq!(s.owner("hr", "9").as_deref(), Some("p9"));
    assert_eq!(attr(&s.identity("p9").unwrap(), "title"), Some("Clerk"));

    hr(&s, "emp,title\n9,Manager\n", 0);
    let d = s.last_result();
    assert_eq!(d["situation"], "linked");
    assert_eq!(d["action"], "updated");
    assert_eq!(attr(&s.identity("p9").unwrap(), "title"), Some("Manager"));
}

#[test]
fn unlinked_becomes_linked() {
    let s = world("    rules: { correlation: by_empno.rhai }\n", &[]);
    hr(&s, "emp,title\n2,Engineer\n", 0);
    let d = s.last_result();
    assert_eq!(d["situation"], "unlinked");
    assert_eq!(d["action"], "linked");
    assert_eq!(d["identity"], "bob");
    assert_eq!(s.owner("hr", "2").as_deref(), Some("bob"));
    assert_eq!(attr(&s.identity("bob").unwrap(), "title"), Some("Engineer"));
}

#[test]
fn unmatched_with_resolve_raises_a_work_item() {
    let s = world(
        "    rules: { correlation: by_empno.rhai, resolve: resolve.rhai }\n    create_unmatched: false\n",
        &[(
            "resolve.rhai",
            "ctx.work_item(`no identity for employee ${account.emp} (${situation})`);",
        )],
    );
    hr(&s, "emp,title\n42,Clerk\n", 0);
    let d = s.last_result();
    assert_eq!(d["situation"], "unmatched");
    assert_eq!(d["action"], "resolved");
    let rules = d["rules"].as_array().unwrap();
    assert!(
        rules.iter().any(|r| r["rule"] == "work_item"
            && r["result"] == "no identity for employee 42 (unmatched)"),
        "{d}"
    );
    assert_eq!(s.export().len(), 3, "nothing created");
}

#[test]
fn unmatched_without_create_or_resolve_fails() {
    let s = world(
        "    rules: { correlation: by_empno.rhai }\n    create_unmatched: false\n",
        &[],
    );
    let out = hr(&s, "emp,title\n42,Clerk\n", 1);
    assert!(out.stdout.contains("failed 1"), "{}", out.stdout);
    let d = s.last_result();
    assert_eq!(d["situation"], "unmatched");
    assert_eq!(d["action"], "failed");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("create_unmatched is off")
    );
    let failed = s.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["key"], "42");
    assert_eq!(s.export().len(), 3);
}

#[test]
fn disputed_with_resolve() {
    let s = world(
        "    rules: { correlation: by_mail.rhai, resolve: pick.rhai }\n",
        &[(
            "pick.rhai",
            "// link to the oldest candidate by name\nlet c = candidates;\nc.sort();\nctx.link(c[0]);",
        )],
    );
    hr(&s, "emp,mail,title\n77,shared@x,Clerk\n", 0);
    let d = s.last_result();
    assert_eq!(d["situation"], "disputed");
    assert_eq!(d["action"], "resolved");
    assert_eq!(d["candidates"], serde_json::json!(["bea", "bob"]));
    assert_eq!(s.owner("hr", "77").as_deref(), Some("bea"));
}

#[test]
fn disputed_without_resolve_fails_naming_every_candidate() {
    let s = world("    rules: { correlation: by_mail.rhai }\n", &[]);
    hr(&s, "emp,mail,title\n77,shared@x,Clerk\n", 1);
    let d = s.last_result();
    assert_eq!(d["situation"], "disputed");
    assert_eq!(d["action"], "failed");
    let e = d["error"].as_str().unwrap();
    assert!(e.contains("bea") && e.contains("bob"), "{e}");
    assert_eq!(s.owner("hr", "77"), None);
    let failed = s.idsync(&["failed", "list"]).expect_code(0);
    assert!(failed.stdout.contains("bea, bob"), "{}", failed.stdout);
}

#[test]
fn confirmation_keeps_one_candidate_wherever_it_stands() {
    let s = world(
        "    rules: { correlation: by_mail.rhai, confirmation: born.rhai }\n",
        &[("born.rhai", "identity.attrs.born == account.born")],
    );
    // Both accounts find the candidates bea and bob (in that order); 78 is bea (the first),
    // 77 is bob (the last): the one kept is the one confirmed, not one by its position.
    hr(
        &s,
        "emp,mail,born,title\n78,shared@x,1985-03-03,Cook\n77,shared@x,1980-02-02,Clerk\n",
        0,
    );
    for (key, who) in [("78", "bea"), ("77", "bob")] {
        let d = s.results(&["--key", key]).pop().unwrap();
        assert_eq!(d["situation"], "unlinked", "{d}");
        assert_eq!(d["candidates"], serde_json::json!(["bea", "bob"]), "{d}");
        assert_eq!(d["confirmed"], serde_json::json!([who]), "{d}");
        assert_eq!(d["identity"], who, "{d}");
        assert_eq!(s.owner("hr", key).as_deref(), Some(who));
    }
    assert_eq!(attr(&s.identity("bea").unwrap(), "title"), Some("Cook"));
    assert_eq!(attr(&s.identity("bob").unwrap(), "title"), Some("Clerk"));
    assert_eq!(s.export().len(), 3, "nothing created");
}

#[test]
fn delete_by_op_unlinks() {
    let s = world("    rules: { correlation: by_empno.rhai }\n", &[]);
    hr(&s, "emp,title\n1,Boss\n2,Clerk\n", 0);
    assert_eq!(s.owner("hr", "1").as_deref(), Some("ann"));
    hr(&s, "emp,title\n2,Clerk\n", 0);
    let d = s.last_result();
    assert_eq!(d["op"], "delete");
    assert_eq!(d["situation"], "deleted");
    assert_eq!(d["action"], "unlinked");
    assert_eq!(d["identity"], "ann");
    assert_eq!(s.owner("hr", "1"), None);
    assert!(s.identity("ann").is_some(), "unlink keeps the identity");
}

#[test]
fn delete_by_rule_disables() {
    let s = world(
        "    rules: { correlation: by_empno.rhai, delete: terminated.rhai }\n    delete_action: disable\n",
        &[("terminated.rhai", "account.status == \"T\"")],
    );
    hr(&s, "emp,title,status\n1,Boss,A\n", 0);
    hr(&s, "emp,title,status\n1,Boss,T\n", 0);
    let d = s.last_result();
    assert_eq!(d["op"], "update");
    assert_eq!(d["situation"], "deleted");
    assert_eq!(d["action"], "disabled");
    let ann = s.identity("ann").unwrap();
    assert_eq!(ann["disabled"], true);
    assert_eq!(s.owner("hr", "1"), None);
}

#[test]
fn process_rule_overrides_everything() {
    let s = world(
        "    rules: { process: process.rhai }\n",
        &[(
            "process.rhai",
            r#"// full control: find by employee number, else create; set; checkin; link
let names = ctx.query(#{ empno: account.emp });
let view = if names.len() == 1 { ctx.checkout(names[0]) } else { ctx.create("proc-" + key, #{ empno: account.emp }) };
view.attrs.title = "processed " + account.title;
ctx.checkin(view);
ctx.link(view.name);
"#,
        )],
    );
    hr(&s, "emp,title\n3,Clerk\n5,Intern\n", 0);
    let all = s.results(&["--resource", "hr"]);
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .all(|d| d["situation"] == "processed" && d["action"] == "processed")
    );
    assert_eq!(s.owner("hr", "3").as_deref(), Some("bea"));
    assert_eq!(
        attr(&s.identity("bea").unwrap(), "title"),
        Some("processed Clerk")
    );
    assert_eq!(s.owner("hr", "5").as_deref(), Some("proc-5"));
}

#[test]
fn filtered_events_are_recorded_and_ignored() {
    let s = world(
        "    rules: { filter: employees.rhai, correlation: by_empno.rhai }\n",
        &[("employees.rhai", "account.type != \"contractor\"")],
    );
    hr(
        &s,
        "emp,title,type\n1,Boss,employee\n8,Temp,contractor\n",
        0,
    );
    let filtered = s.results(&["--situation", "filtered"]);
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["key"], "8");
    assert_eq!(filtered[0]["action"], "ignored");
    assert_eq!(s.owner("hr", "8"), None);
    assert_eq!(s.owner("hr", "1").as_deref(), Some("ann"));
}

#[test]
fn a_broken_rule_fails_its_event_only_and_retry_applies_it() {
    let s = world(
        "    rules: { correlation: corr.rhai }\n",
        &[(
            "corr.rhai",
            "if account.emp == \"2\" {\n  account.nosuch.call()\n}\n#{ empno: account.emp }",
        )],
    );
    let out = hr(&s, "emp,title\n1,Boss\n2,Clerk\n3,Cook\n", 1);
    assert!(out.stdout.contains("failed 1"), "{}", out.stdout);
    let failed = s.failed();
    assert_eq!(failed.len(), 1);
    let err = failed[0]["error"].as_str().unwrap();
    assert!(
        err.contains("corr.rhai:2:"),
        "error names file:line:col: {err}"
    );
    assert_eq!(s.owner("hr", "1").as_deref(), Some("ann"));
    assert_eq!(s.owner("hr", "3").as_deref(), Some("bea"));
    assert_eq!(s.owner("hr", "2"), None);

    // Nothing new in the feed: the failed event is not lost, it waits for a retry.
    s.run_once(Some("hr"), 0);
    s.rule("corr.rhai", "#{ empno: account.emp }");
    let id = failed[0]["id"].as_i64().unwrap().to_string();
    let out = s.idsync(&["failed", "retry", &id]).expect_code(0);
    assert!(out.stdout.contains("1 succeeded"), "{}", out.stdout);
    assert_eq!(s.owner("hr", "2").as_deref(), Some("bob"));
    assert!(s.failed().is_empty());
}

#[test]
fn halt_keeps_the_batch_and_its_checkpoint_together() {
    let s = world(
        "    rules: { correlation: corr.rhai }\n    on_error: halt\n",
        &[(
            "corr.rhai",
            "if account.emp == \"3\" { throw \"not today\" }\n#{ empno: account.emp }",
        )],
    );
    let out = hr(&s, "emp,title\n1,Boss\n2,Clerk\n3,Cook\n", 3);
    assert!(out.stderr.contains("halted"), "{}", out.stderr);
    // Nothing of the batch, and not its checkpoint: the next pass reads it all again.
    assert!(s.results(&["--resource", "hr"]).is_empty());
    assert_eq!(s.owner("hr", "1"), None);
    s.rule("corr.rhai", "#{ empno: account.emp }");
    s.run_once(Some("hr"), 0);
    let records = s.results(&["--resource", "hr"]);
    assert_eq!(records.len(), 3, "each change applied exactly once");
    assert_eq!(s.owner("hr", "3").as_deref(), Some("bea"));
    // And the same file again is no change at all.
    let out = s.run_once(Some("hr"), 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
}

#[test]
fn a_resolve_rule_that_wrote_then_failed_leaves_nothing_and_the_batch_goes_on() {
    // The batch runs without per-event savepoints; employee 42's resolve rule creates and
    // links an identity and then throws, so the engine decides the batch again with
    // savepoints: 42's identity and link must be gone, 41 and 43 kept, one decision each.
    let s = world(
        "    rules: { correlation: by_empno.rhai, resolve: resolve.rhai }\n    create_unmatched: false\n",
        &[(
            "resolve.rhai",
            "ctx.create(`p${account.emp}`, #{ empno: account.emp });\nctx.link(`p${account.emp}`);\nif account.emp == \"42\" { throw \"refused after writing\" }",
        )],
    );
    let out = hr(&s, "emp,title\n41,Clerk\n42,Cook\n43,Baker\n", 1);
    assert!(out.stdout.contains("failed 1"), "{}", out.stdout);
    assert_eq!(s.owner("hr", "41").as_deref(), Some("p41"));
    assert_eq!(s.owner("hr", "42"), None);
    assert_eq!(s.owner("hr", "43").as_deref(), Some("p43"));
    let names: Vec<String> = s
        .export()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&"p42".to_owned()), "{names:?}");
    assert_eq!(names.len(), 5, "{names:?}");
    let failed = s.failed();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("refused after writing")
    );
    let decisions = s.results(&["--resource", "hr"]);
    for key in ["41", "42", "43"] {
        let n = decisions.iter().filter(|d| d["key"] == key).count();
        assert_eq!(n, 1, "one decision for {key}: {decisions:?}");
    }
}
