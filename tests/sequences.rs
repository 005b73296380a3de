//! Sequences of CSV files through the real binary, as an HR feed lives: hire, attribute
//! change, termination, rehire; the same person in two feeds; an ambiguous match.
//! Assertions read `identities export` and the decision records.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Sandbox, attr};

fn hr_world() -> Sandbox {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
    rules:
      correlation: correlation.rhai
      confirmation: confirmation.rhai
      delete: delete.rhai
    naming: 'ascii_fold(account.first).to_lower() + \".\" + ascii_fold(account.last).to_lower()'
    delete_action: disable
    mappings:
      - { to: empno, from: emp }
      - { to: mail, expr: 'if account.email == () { () } else { account.email.to_lower() }' }
      - { to: born, from: born }
      - { to: title, from: title }
      - { to: displayName, expr: 'account.first + \" \" + account.last' }
  - name: badge
    source: { type: flatfile, path: feeds/badge.csv, key: badge }
    rules:
      correlation: badge_correlation.rhai
    create_unmatched: false
    mappings:
      - { to: badge, from: badge }
",
    );
    s.rule(
        "correlation.rhai",
        "// by employee number, then by email\n[#{ empno: account.emp }, #{ mail: if account.email == () { () } else { account.email.to_lower() } }]",
    );
    s.rule(
        "confirmation.rhai",
        "// an account without birth date cannot refute a candidate\naccount.born == () || identity.attrs.born == account.born",
    );
    s.rule("delete.rhai", "account.status == \"TERMINATED\"");
    s.rule("badge_correlation.rhai", "#{ empno: account.emp }");
    s
}

const HDR: &str = "emp,first,last,email,born,title,status\n";

fn feed(s: &Sandbox, rows: &[&str]) {
    s.feed("hr.csv", &format!("{HDR}{}\n", rows.join("\n")));
}

#[test]
fn hire_change_terminate_rehire() {
    let s = hr_world();
    // Day 1: hire.
    feed(
        &s,
        &["100,Zoë,Müller,Zoe.Muller@Example.com,1990-05-01,Analyst,ACTIVE"],
    );
    s.run_once(Some("hr"), 0);
    let zoe = s
        .identity("zoe.muller")
        .expect("created with the naming rule");
    assert_eq!(attr(&zoe, "mail"), Some("zoe.muller@example.com"));
    assert_eq!(attr(&zoe, "displayName"), Some("Zoë Müller"));
    assert_eq!(zoe["disabled"], false);

    // Day 2: attribute change: only what changed is recorded.
    feed(
        &s,
        &["100,Zoë,Müller,Zoe.Muller@Example.com,1990-05-01,Lead Analyst,ACTIVE"],
    );
    s.run_once(Some("hr"), 0);
    let d = s.last_result();
    assert_eq!(
        (d["situation"].as_str(), d["action"].as_str()),
        (Some("linked"), Some("updated"))
    );
    assert_eq!(d["changes"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["changes"][0]["name"], "title");
    assert_eq!(
        attr(&s.identity("zoe.muller").unwrap(), "title"),
        Some("Lead Analyst")
    );

    // Day 3: termination by status: the delete rule disables and unlinks.
    feed(
        &s,
        &["100,Zoë,Müller,Zoe.Muller@Example.com,1990-05-01,Lead Analyst,TERMINATED"],
    );
    s.run_once(Some("hr"), 0);
    let d = s.last_result();
    assert_eq!(
        (d["situation"].as_str(), d["action"].as_str()),
        (Some("deleted"), Some("disabled"))
    );
    let zoe = s.identity("zoe.muller").unwrap();
    assert_eq!(zoe["disabled"], true);
    assert!(zoe["accounts"].as_array().unwrap().is_empty());

    // Day 4: rehire under the same employee number: correlation finds her again, the
    // account is linked back and the identity re-enabled; no second identity.
    feed(
        &s,
        &["100,Zoë,Müller,Zoe.Muller@Example.com,1990-05-01,Manager,ACTIVE"],
    );
    s.run_once(Some("hr"), 0);
    let d = s.last_result();
    assert_eq!(
        (d["situation"].as_str(), d["action"].as_str()),
        (Some("unlinked"), Some("linked"))
    );
    let all = s.export();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["disabled"], false);
    assert_eq!(attr(&all[0], "title"), Some("Manager"));
    assert_eq!(s.owner("hr", "100").as_deref(), Some("zoe.muller"));

    // Day 5: the row disappears from the feed: a delete op on an owned account disables.
    feed(&s, &["200,Al,Bo,al@x,1970-01-01,Cook,ACTIVE"]);
    s.run_once(Some("hr"), 0);
    let deletes = s.results(&["--key", "100"]);
    let last = deletes.last().unwrap();
    assert_eq!(last["op"], "delete");
    assert_eq!(last["action"], "disabled");
    // One decision record per change, in order.
    let all = s.results(&["--resource", "hr"]);
    let ops: Vec<&str> = all.iter().map(|d| d["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["upsert", "update", "update", "update", "create", "delete"]
    );
}

#[test]
fn the_same_person_in_two_feeds_is_one_identity() {
    let s = hr_world();
    feed(
        &s,
        &[
            "100,Ann,Lee,ann@x,1990-01-01,Analyst,ACTIVE",
            "101,Bob,Ray,bob@x,1980-01-01,Clerk,ACTIVE",
        ],
    );
    s.run_once(Some("hr"), 0);
    s.feed("badge.csv", "badge,emp\nB-7,101\nB-9,999\n");
    // B-9 matches nobody and the badge feed may not create: a failed event (exit 1).
    s.run_once(Some("badge"), 1);
    let bob = s.identity("bob.ray").unwrap();
    let accounts: Vec<String> = bob["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{}",
                a["resource"].as_str().unwrap(),
                a["key"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(accounts, ["badge:B-7", "hr:101"]);
    assert_eq!(attr(&bob, "badge"), Some("B-7"));
    assert_eq!(s.export().len(), 2);
    let failed = s.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["key"], "B-9");
}

#[test]
fn ambiguous_match_is_not_attached_to_anyone() {
    let s = hr_world();
    // Two people share a team mailbox; their birth dates tell them apart, so Bob's row
    // (found by mail, refuted by the confirmation) creates his own identity.
    feed(
        &s,
        &[
            "100,Ann,Lee,team@x,1990-01-01,Analyst,ACTIVE",
            "101,Bob,Ray,team@x,1980-01-01,Clerk,ACTIVE",
        ],
    );
    s.run_once(Some("hr"), 0);
    assert_eq!(s.export().len(), 2);
    // A new employee number with the shared mailbox and no birth date: two candidates by
    // mail, the confirmation cannot refute either: disputed, failed, nobody gets it.
    feed(
        &s,
        &[
            "100,Ann,Lee,team@x,1990-01-01,Analyst,ACTIVE",
            "101,Bob,Ray,team@x,1980-01-01,Clerk,ACTIVE",
            "300,Cy,Dee,team@x,,Temp,ACTIVE",
        ],
    );
    s.run_once(Some("hr"), 1);
    let d = s.last_result();
    assert_eq!(d["key"], "300");
    assert_eq!(d["situation"], "disputed");
    assert_eq!(d["action"], "failed");
    assert_eq!(d["confirmed"], serde_json::json!(["ann.lee", "bob.ray"]));
    let error = d["error"].as_str().unwrap();
    assert!(error.contains("ann.lee, bob.ray"), "{error}");
    assert_eq!(s.owner("hr", "300"), None);
    assert_eq!(
        s.export().len(),
        2,
        "no identity created for an ambiguous account"
    );
}
