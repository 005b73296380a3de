//! Correlation that tolerates people, through the real binary on CSV feeds and a real
//! SQLite file: values compared in a declared normalised form (case, spaces, diacritics)
//! find their identity however either side is written, and without a declaration they are
//! compared exactly as before; a changed declaration rebuilds the attribute's index; a
//! near-miss name opens a `similar` work item with its scores instead of a duplicate
//! identity, which an operator settles with `work-items resolve --link`. A `seed` resource
//! creates the identities the `hr` accounts are matched against.
#![allow(clippy::unwrap_used)]

mod common;

use common::Sandbox;
use serde_json::Value;

const SEED: &str = "\
id,first,last,mail,display
ada.lovelace,Ada,Lovelace,ada.lovelace@example.com,Ada Lovelace
zoe.bronte,Zoë,Brontë,zoe@example.com,Zoë Brontë
jonathan.smith,Jonathan,Smith,jsmith@example.com,Jonathan Smith
jane.smith,Jane,Smith,jane@example.com,Jane Smith
john.smith,John,Smith,john@example.com,John Smith
";

/// A sandbox with the `seed` resource (its identities created) and an `hr` resource
/// correlating by mail and by display name, with `top` (top-level YAML, e.g. a
/// `correlation:` block) and `hr_extra` (lines of the `hr` entry).
fn world(top: &str, hr_extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "status: {{ listen: 'off' }}
{top}resources:
  - name: seed
    source: {{ type: flatfile, path: feeds/seed.csv, key: id }}
    naming: 'account.id'
    mappings:
      - {{ to: givenName, from: first }}
      - {{ to: sn, from: last }}
      - {{ to: mail, from: mail }}
      - {{ to: displayName, from: display }}
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: emp }}
    rules: {{ correlation: correlation.rhai }}
    naming: '\"p\" + account.emp'
    mappings:
      - {{ to: givenName, from: first }}
      - {{ to: sn, from: last }}
      - {{ to: title, from: title }}
{hr_extra}"
    ));
    s.rule(
        "correlation.rhai",
        "let conditions = [];\n\
         if account.email != () { conditions.push(#{ mail: account.email }); }\n\
         if account.display != () { conditions.push(#{ displayName: account.display }); }\n\
         conditions\n",
    );
    s.feed("seed.csv", SEED);
    s.run_once(Some("seed"), 0);
    assert_eq!(s.export().len(), 5);
    s
}

const NORMALISE: &str = "correlation:
  normalise:
    mail: [case, spaces]
    displayName: [case, spaces, diacritics]
";

const HR: &str = "\
emp,first,last,email,display,title
1,Ada,Lovelace,Ada.LOVELACE@Example.com ,,Countess
2,Zoe,Bronte,,zoe  BRONTE,Writer
";

/// The decision records of `hr` account `key`, newest last.
fn decisions(s: &Sandbox, key: &str) -> Vec<Value> {
    s.results(&["--resource", "hr", "--key", key])
}

#[test]
fn a_mixed_case_accented_value_finds_its_identity_once_normalisation_is_declared() {
    // Without a declaration values compare exactly, as before: both accounts are new people.
    let exact = world("", "");
    exact.feed("hr.csv", HR);
    exact.run_once(Some("hr"), 0);
    assert_eq!(exact.owner("hr", "1").as_deref(), Some("p1"));
    assert_eq!(exact.owner("hr", "2").as_deref(), Some("p2"));
    assert_eq!(exact.export().len(), 7);

    // Declared, the same feed finds Ada (a mixed-case mail with a trailing space) and Zoë
    // (an accented display name, stored with its accents, asked for without them).
    let s = world(NORMALISE, "");
    s.feed("hr.csv", HR);
    let run = s.run_once(Some("hr"), 0);
    assert!(
        run.stdout
            .contains("situations: unlinked 2; actions: linked 2"),
        "{}",
        run.stdout
    );
    assert_eq!(s.owner("hr", "1").as_deref(), Some("ada.lovelace"));
    assert_eq!(s.owner("hr", "2").as_deref(), Some("zoe.bronte"));
    assert_eq!(s.export().len(), 5, "no duplicate identity");
    // The identities keep their values as written; only the index holds the folded form.
    let zoe = s.identity("zoe.bronte").unwrap();
    assert_eq!(common::attr(&zoe, "displayName"), Some("Zoë Brontë"));
    assert_eq!(
        s.sql("SELECT value FROM identity_values WHERE attr = 'displayname' ORDER BY value"),
        "ada lovelace\njane smith\njohn smith\njonathan smith\nzoe bronte"
    );

    // The decision says what was compared, and explain shows it.
    let d = decisions(&s, "1").pop().unwrap();
    let normalised: Vec<&str> = d["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["rule"] == "normalised")
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        normalised,
        ["mail \"Ada.LOVELACE@Example.com\" → \"ada.lovelace@example.com\" (case, spaces)"],
        "{d}"
    );
    let explain = s.idsync(&["explain", "hr", "2"]).expect_code(0);
    assert!(
        explain.stdout.contains(
            "compared in normalised form: displayName \"zoe  BRONTE\" → \"zoe bronte\" (case, diacritics, spaces)"
        ),
        "{}",
        explain.stdout
    );
}

#[test]
fn a_changed_normalisation_declaration_rebuilds_the_attribute_index() {
    let s = world("", "");
    let index = |s: &Sandbox| {
        (
            s.sql("SELECT value FROM identity_values WHERE attr = 'mail' AND identity_id = (SELECT id FROM identities WHERE name = 'ada.lovelace')"),
            s.sql("SELECT steps FROM index_normalisations WHERE attr = 'mail'"),
        )
    };
    // 1. Exact: a shouted mail matches nobody; the index holds the value as written.
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n1,Ada,L,ADA.LOVELACE@EXAMPLE.COM,,x\n",
    );
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "1").as_deref(), Some("p1"));
    assert_eq!(
        index(&s),
        ("ada.lovelace@example.com".into(), String::new())
    );

    // 2. Declared [case]: the next query rebuilds the index, and the next account matches.
    s.config(
        &std::fs::read_to_string(s.path().join("idsync.yaml"))
            .unwrap()
            .replace(
                "resources:",
                "correlation: { normalise: { Mail: [case] } }\nresources:",
            ),
    );
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n1,Ada,L,ADA.LOVELACE@EXAMPLE.COM,,x\n2,Ada,L,Ada.Lovelace@EXAMPLE.com,,x\n",
    );
    let run = s
        .idsync(&["-v", "run", "--once", "--resource", "hr"])
        .expect_code(0);
    assert!(
        run.stderr.contains("re-indexing identity attribute for correlation queries: its normalisation changed (was exact)"),
        "{}",
        run.stderr
    );
    assert_eq!(s.owner("hr", "2").as_deref(), Some("ada.lovelace"));
    assert_eq!(
        index(&s),
        ("ada.lovelace@example.com".into(), "case".into())
    );
    // p1's shouted mail is not mapped by hr: its index rows are those of the seed only.
    assert_eq!(
        s.sql("SELECT count(*) FROM identity_values WHERE attr = 'mail'"),
        "5"
    );

    // 3. A seed identity whose mail is written in capitals is indexed folded too.
    s.feed(
        "seed.csv",
        &format!("{SEED}grace.hopper,Grace,Hopper,Grace.Hopper@Example.COM,Grace Hopper\n"),
    );
    s.run_once(Some("seed"), 0);
    assert_eq!(
        s.sql("SELECT value FROM identity_values WHERE attr = 'mail' AND identity_id = (SELECT id FROM identities WHERE name = 'grace.hopper')"),
        "grace.hopper@example.com"
    );

    // 4. The declaration removed: exact again, rows as written; a shouted mail is new.
    s.config(
        &std::fs::read_to_string(s.path().join("idsync.yaml"))
            .unwrap()
            .replace("correlation: { normalise: { Mail: [case] } }\n", ""),
    );
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n1,Ada,L,ADA.LOVELACE@EXAMPLE.COM,,x\n2,Ada,L,Ada.Lovelace@EXAMPLE.com,,x\n3,Grace,H,grace.hopper@example.com,,x\n",
    );
    s.run_once(Some("hr"), 0);
    assert_eq!(s.owner("hr", "3").as_deref(), Some("p3"));
    assert_eq!(
        s.sql("SELECT value FROM identity_values WHERE attr = 'mail' AND identity_id = (SELECT id FROM identities WHERE name = 'grace.hopper')"),
        "Grace.Hopper@Example.COM"
    );
    assert_eq!(index(&s).1, "");
}

const FUZZY: &str = "correlation:
  normalise:
    givenName: [case, spaces, diacritics]
    sn: [case, spaces, diacritics]
";

#[test]
fn a_near_miss_name_opens_a_similar_work_item_with_scores_instead_of_a_duplicate() {
    let s = world(
        FUZZY,
        "    fuzzy: { attributes: [givenName, sn], threshold: 0.92, block: sn }\n",
    );
    // No mail or display name to correlate by: correlation finds nobody for either row.
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n7,Jonathon,SMITH,,,Engineer\n8,Zed,Quux,,,Engineer\n",
    );
    let run = s.run_once(Some("hr"), 0);
    assert!(
        run.stdout
            .contains("situations: unmatched 2; actions: created 1, work_item 1"),
        "{}",
        run.stdout
    );
    // Zed resembles nobody and is created; Jonathon waits for a person.
    assert_eq!(s.owner("hr", "8").as_deref(), Some("p8"));
    assert_eq!(s.owner("hr", "7"), None);
    assert_eq!(s.export().len(), 6, "no duplicate of jonathan.smith");

    let open = s.work_items("open");
    assert_eq!(open.len(), 1, "{open:?}");
    let item = &open[0];
    assert_eq!(item["kind"], "similar");
    assert_eq!(item["key"], "7");
    assert_eq!(item["candidates"], serde_json::json!(["jonathan.smith"]));
    assert_eq!(
        item["reason"],
        "account 7 of hr matches no identity exactly; similar: jonathan.smith 0.975 (givenName 0.950, sn 1.000)"
    );
    let id = item["id"].as_i64().unwrap().to_string();

    // explain shows the block, the normalised values compared and the scores.
    let explain = s.idsync(&["explain", "hr", "7"]).expect_code(0);
    assert!(
        explain.stdout.contains(
            "fuzzy candidates: block sn = \"smith\": 3 identities compared; account givenName \"jonathon\", sn \"smith\"; at or above 0.92: jonathan.smith 0.975 (givenName 0.950, sn 1.000)"
        ),
        "{}",
        explain.stdout
    );
    assert!(
        explain.stdout.contains("action: work_item"),
        "{}",
        explain.stdout
    );

    // The account changing again refreshes the item, still no duplicate.
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n7,Jonathon,SMITH,,,Senior Engineer\n8,Zed,Quux,,,Engineer\n",
    );
    s.run_once(Some("hr"), 0);
    let open = s.work_items("open");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["seen"], 2);
    assert_eq!(s.export().len(), 6);

    // The operator confirms it: linked through hr's mappings, the item closed.
    s.idsync(&["work-items", "resolve", &id, "--link", "jonathan.smith"])
        .expect_code(0);
    assert_eq!(s.owner("hr", "7").as_deref(), Some("jonathan.smith"));
    let js = s.identity("jonathan.smith").unwrap();
    assert_eq!(common::attr(&js, "title"), Some("Senior Engineer"));
    assert_eq!(common::attr(&js, "givenName"), Some("Jonathon"));
    assert!(s.work_items("open").is_empty());
    let closed = s.work_items("closed");
    assert_eq!(closed[0]["closed"]["resolution"], "linked");
    assert_eq!(closed[0]["closed"]["identity"], "jonathan.smith");
}

#[test]
fn a_surname_typo_is_compared_only_within_a_block_prefix() {
    let s = world(
        FUZZY,
        "    fuzzy: { attributes: [givenName, sn], threshold: 0.9, block: sn, block_prefix: 2 }\n",
    );
    s.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n9,Jonathan,Smiht,,,x\n",
    );
    s.run_once(Some("hr"), 0);
    let open = s.work_items("open");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["kind"], "similar");
    assert_eq!(open[0]["candidates"][0], "jonathan.smith");
    let d = decisions(&s, "9").pop().unwrap();
    let fuzzy = d["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "fuzzy")
        .unwrap()["result"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        fuzzy.starts_with("block sn = \"sm\" (first 2 characters): 3 identities compared"),
        "{fuzzy}"
    );

    // Blocked on the whole surname, the typo leaves the block empty: a new identity.
    let whole = world(
        FUZZY,
        "    fuzzy: { attributes: [givenName, sn], threshold: 0.9, block: sn }\n",
    );
    whole.feed(
        "hr.csv",
        "emp,first,last,email,display,title\n9,Jonathan,Smiht,,,x\n",
    );
    whole.run_once(Some("hr"), 0);
    assert_eq!(whole.owner("hr", "9").as_deref(), Some("p9"));
    assert!(whole.work_items("open").is_empty());
}

#[test]
fn check_names_a_bad_correlation_declaration() {
    let s = Sandbox::new();
    s.config(
        "correlation: { normalise: { mail: [case, accents] } }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
",
    );
    let run = s.idsync(&["check"]).expect_code(2);
    assert!(
        run.stderr.contains("idsync.yaml:1:") && run.stderr.contains("unknown variant `accents`"),
        "{}",
        run.stderr
    );
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: emp }
    mappings: [{ to: sn, from: last }]
    fuzzy: { attributes: [sn, givenName], threshold: 92, block: sn }
",
    );
    let run = s.idsync(&["check"]).expect_code(2);
    for expected in [
        "idsync.yaml: resources[0].fuzzy.attributes[1]: no mapping of this resource fills 'givenName'",
        "idsync.yaml: resources[0].fuzzy.threshold: 92 is not a similarity between 0 (excluded) and 1",
        "2 problem(s) found",
    ] {
        assert!(run.stderr.contains(expected), "{expected}\n{}", run.stderr);
    }
    assert!(!s.db().exists(), "a broken config creates no repository");
}
