//! What the docs promise, driven through the real binary where no other test drove it: the
//! filter rule on delete events; notification `condition`, `attributes` and `change` and the
//! `deleted`, `linked`, `unlinked` triggers; the accidental-delete guard at exactly its limits
//! and the scope of `--accept-deletes`; a known account whose row turns malformed is held; a
//! stale marker file; a settle that gives up; `delete_action: delete`; `on_error: halt` in the
//! agent; reload when the config file changes; the outbox's `max_age`, `outbox retry ID`,
//! `outbox purge` and `password_env`. Every test asserts the repository's state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::{Sandbox, SmtpServer, attr, eventually, terminate};
use serde_json::Value;

/// A sandbox with one flat-file resource `hr` over `feeds/hr.csv` keyed by `id`, identities
/// named `u<id>`; `resource_extra` holds more lines of the resource entry, `source_extra`
/// more keys of the source map.
fn hr_world(source_extra: &str, resource_extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id{source_extra} }}
    naming: '\"u\" + account.id'
    populate_global: true
{resource_extra}"
    ));
    s
}

/// A feed of `ids` (column `id`, `cn` = `P<id>`).
fn feed_of(ids: impl IntoIterator<Item = usize>) -> String {
    ids.into_iter().fold(String::from("id,cn\n"), |acc, i| {
        acc + &format!("{i},P{i}\n")
    })
}

/// The keys of `resource` linked to an identity, sorted.
fn linked(s: &Sandbox, resource: &str) -> Vec<String> {
    let mut keys: Vec<String> = s
        .export()
        .iter()
        .flat_map(|i| i["accounts"].as_array().unwrap().clone())
        .filter(|a| a["resource"] == resource)
        .map(|a| a["key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

fn keys(ids: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut v: Vec<String> = ids.into_iter().map(|i| i.to_string()).collect();
    v.sort();
    v
}

// --- the filter rule on delete events -----------------------------------------------------

/// docs/rules.md: the filter "runs first, for every event of the resource, deletes included".
#[test]
fn the_filter_rule_decides_delete_events_too() {
    let s = hr_world("", "    rules: { filter: keep.rhai }\n");
    // Ignores the delete of account 2 only.
    s.rule("keep.rhai", "!(op == \"delete\" && account.id == \"2\")");
    s.feed("hr.csv", &feed_of(1..=3));
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys(1..=3));
    s.feed("hr.csv", &feed_of([1]));
    s.run_once(None, 0);
    assert_eq!(
        linked(&s, "hr"),
        keys([1, 2]),
        "the delete of 2 was filtered, the delete of 3 applied"
    );
    let d = s.results(&["--key", "2"]).pop().unwrap();
    assert_eq!(
        (&d["op"], &d["situation"], &d["action"]),
        (&"delete".into(), &"filtered".into(), &"ignored".into()),
        "{d}"
    );
    let d = s.results(&["--key", "3"]).pop().unwrap();
    assert_eq!(
        (&d["op"], &d["situation"]),
        (&"delete".into(), &"deleted".into())
    );
}

// --- delete_action: delete -----------------------------------------------------------------

#[test]
fn delete_action_delete_removes_the_identity_with_its_links() {
    let s = Sandbox::new();
    s.config(
        "status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: '\"u\" + account.id'
    delete_action: delete
    mappings:
      - { to: empno, from: id }
  - name: badge
    source: { type: flatfile, path: feeds/badge.csv, key: badge }
    rules: { correlation: by_empno.rhai }
    create_unmatched: false
",
    );
    s.rule("by_empno.rhai", "#{ empno: account.emp }");
    s.feed("hr.csv", "id\n1\n2\n");
    s.feed("badge.csv", "badge,emp\nb2,2\n");
    s.run_once(None, 0);
    assert_eq!(s.owner("badge", "b2").as_deref(), Some("u2"));
    s.feed("hr.csv", "id\n1\n");
    s.run_once(Some("hr"), 0);
    let d = s.results(&["--key", "2"]).pop().unwrap();
    assert_eq!(
        (&d["situation"], &d["action"]),
        (&"deleted".into(), &"deleted_identity".into()),
        "{d}"
    );
    assert!(s.identity("u2").is_none(), "the identity is gone");
    assert_eq!(s.owner("badge", "b2"), None, "with all its links");
    assert!(s.identity("u1").is_some());
}

// --- notification policies -----------------------------------------------------------------

const NOTIFY: &str = "status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: '\"u\" + account.id'
    delete_action: delete
    mappings:
      - { to: empno, from: id }
      - { to: title, from: title }
      - { to: status, from: status }
      - { to: phone, from: phone }
  - name: badge
    source: { type: flatfile, path: feeds/badge.csv, key: badge, delete_guard: { enabled: false } }
    rules: { correlation: by_empno.rhai }
    create_unmatched: false
notifications:
  from: 'idsync <idsync@example.com>'
  transport: { type: file, dir: mail }
  policies:
    - name: welcome
      on: [created]
      condition: 'identity.attrs.title != \"intern\"'
      to: ['\"ops@example.com\"']
      subject: 'welcome {{ identity.name }}'
      text: 'x'
    - name: title
      on: [updated]
      attributes: [title]
      to: ['\"ops@example.com\"']
      subject: 'title {{ identity.name }}'
      text: 'x'
    - name: terminated
      on: [updated]
      change: { attribute: status, from: active, to: terminated }
      to: ['\"ops@example.com\"']
      subject: 'terminated {{ identity.name }}'
      text: 'x'
    - name: gone
      on: [deleted]
      to: ['\"ops@example.com\"']
      subject: 'gone {{ identity.name }}'
      text: 'x'
    - name: linked
      on: [linked]
      to: ['\"ops@example.com\"']
      subject: 'linked {{ identity.name }} {{ resource }}:{{ key }}'
      text: 'x'
    - name: unlinked
      on: [unlinked]
      to: ['\"ops@example.com\"']
      subject: 'unlinked {{ identity.name }} {{ resource }}:{{ key }}'
      text: 'x'
";

/// The outbox as `policy → [identity, …]`, in insertion order.
fn mails(s: &Sandbox) -> BTreeMap<String, Vec<String>> {
    let out = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
    let mut list: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    list.sort_by_key(|m| m["id"].as_i64());
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in list {
        by.entry(m["policy"].as_str().unwrap().to_owned())
            .or_default()
            .push(m["identity"].as_str().unwrap_or("-").to_owned());
    }
    by
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(p, ids)| {
            (
                (*p).to_owned(),
                ids.iter().map(|i| (*i).to_owned()).collect(),
            )
        })
        .collect()
}

#[test]
fn notification_condition_attributes_change_and_every_trigger() {
    let s = Sandbox::new();
    s.config(NOTIFY);
    s.rule("by_empno.rhai", "#{ empno: account.emp }");
    s.feed("badge.csv", "badge,emp\n");
    let hr = |csv: &str| {
        s.feed("hr.csv", &format!("id,title,status,phone\n{csv}"));
        s.run_once(Some("hr"), 0);
    };
    // `condition`: the intern gets no welcome.
    hr("1,clerk,active,100\n2,intern,active,200\n");
    assert_eq!(mails(&s), expect(&[("welcome", &["u1"])]));
    // `attributes: [title]`: a phone change sends no title mail; `change … to: terminated`:
    // active → on_leave sends no termination mail.
    hr("1,clerk,active,101\n2,intern,on_leave,200\n");
    assert_eq!(mails(&s), expect(&[("welcome", &["u1"])]));
    // The title changed: a title mail. `change … from: active`: on_leave → terminated is not
    // from active: no termination mail.
    hr("1,lead,active,101\n2,intern,terminated,200\n");
    assert_eq!(
        mails(&s),
        expect(&[("welcome", &["u1"]), ("title", &["u1"])])
    );
    // active → terminated: the termination mail.
    hr("1,lead,terminated,101\n2,intern,terminated,200\n");
    assert_eq!(
        mails(&s),
        expect(&[
            ("welcome", &["u1"]),
            ("title", &["u1"]),
            ("terminated", &["u1"])
        ])
    );
    // `linked`, then `unlinked`, from another resource's account.
    s.feed("badge.csv", "badge,emp\nb1,1\n");
    s.run_once(Some("badge"), 0);
    s.feed("badge.csv", "badge,emp\n");
    s.run_once(Some("badge"), 0);
    // `deleted` (delete_action: delete).
    hr("1,lead,terminated,101\n");
    assert!(s.identity("u2").is_none());
    assert_eq!(
        mails(&s),
        expect(&[
            ("welcome", &["u1"]),
            ("title", &["u1"]),
            ("terminated", &["u1"]),
            ("linked", &["u1"]),
            ("unlinked", &["u1"]),
            ("gone", &["u2"]),
        ])
    );
    let show = |policy: &str| {
        let out = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
        out.stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|m| m["policy"] == policy)
            .unwrap()
    };
    assert_eq!(show("linked")["mail"]["subject"], "linked u1 badge:b1");
    assert_eq!(show("unlinked")["mail"]["subject"], "unlinked u1 badge:b1");
}

// --- the accidental-delete guard at its limits -----------------------------------------------

/// `max_deletes: 3`: exactly 3 deletes pass, 4 are refused and nothing of that pass is applied.
#[test]
fn the_guard_allows_exactly_max_deletes() {
    let s = hr_world(
        ", delete_guard: { max_deletes: 3, max_delete_ratio: 1.0 }",
        "",
    );
    s.feed("hr.csv", &feed_of(0..12));
    s.run_once(None, 0);
    s.feed("hr.csv", &feed_of(3..12));
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys(3..12), "3 deletes pass");
    let records = s.results(&[]).len();
    let checkpoint = s.sql("SELECT token FROM checkpoints WHERE resource = 'hr'");
    // 4 deletes, and a change and a new row in the same pass: none of it is applied.
    let mut csv = feed_of(7..12).replace("7,P7", "7,changed");
    csv.push_str("99,P99\n");
    s.feed("hr.csv", &csv);
    let out = s.run_once(None, 3);
    assert!(
        out.stderr.contains("would delete 4 of 9 accounts") && out.stderr.contains("max_deletes 3"),
        "{}",
        out.stderr
    );
    assert_eq!(linked(&s, "hr"), keys(3..12), "nothing applied");
    assert_eq!(attr(&s.identity("u7").unwrap(), "cn"), Some("P7"));
    assert_eq!(s.results(&[]).len(), records, "no decision recorded");
    assert_eq!(
        s.sql("SELECT token FROM checkpoints WHERE resource = 'hr'"),
        checkpoint,
        "the checkpoint did not move"
    );
}

/// `max_delete_ratio: 0.25` with `ratio_min_accounts: 8`: at 8 accounts, 3 deletes (37.5%) are
/// refused and 2 (exactly 25%) pass; below 8 accounts the ratio does not apply.
#[test]
fn the_guard_ratio_holds_at_exactly_its_limits() {
    let s = hr_world(
        ", delete_guard: { max_deletes: 100, max_delete_ratio: 0.25, ratio_min_accounts: 8 }",
        "",
    );
    s.feed("hr.csv", &feed_of(0..8));
    s.run_once(None, 0);
    s.feed("hr.csv", &feed_of(3..8));
    let out = s.run_once(None, 3);
    assert!(
        out.stderr.contains("would delete 3 of 8 accounts"),
        "{}",
        out.stderr
    );
    assert_eq!(linked(&s, "hr"), keys(0..8));
    s.feed("hr.csv", &feed_of(2..8));
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys(2..8), "exactly the ratio passes");
    // 6 accounts, fewer than ratio_min_accounts: 4 of 6 deletes pass.
    s.feed("hr.csv", &feed_of(6..8));
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys(6..8));
}

#[test]
fn a_disabled_guard_lets_an_empty_file_delete_everything() {
    let s = hr_world(", delete_guard: { enabled: false }", "");
    s.feed("hr.csv", &feed_of(0..20));
    s.run_once(None, 0);
    s.feed("hr.csv", "id,cn\n");
    s.run_once(None, 0);
    assert!(linked(&s, "hr").is_empty());
}

/// `--accept-deletes hr` lifts the guard of `hr` for that run only: another resource stays
/// guarded, and the next run guards `hr` again.
#[test]
fn accept_deletes_is_for_one_resource_and_one_run() {
    let s = Sandbox::new();
    s.config(
        "status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: '\"h\" + account.id'
  - name: crm
    source: { type: flatfile, path: feeds/crm.csv, key: id }
    naming: '\"c\" + account.id'
",
    );
    s.feed("hr.csv", &feed_of(0..5));
    s.feed("crm.csv", &feed_of(0..5));
    s.run_once(None, 0);
    s.feed("hr.csv", "id,cn\n");
    s.feed("crm.csv", "id,cn\n");
    let out = s
        .idsync(&["run", "--once", "--accept-deletes", "hr"])
        .expect_code(3);
    assert!(
        out.stderr.contains("--accept-deletes crm"),
        "{}",
        out.stderr
    );
    assert!(linked(&s, "hr").is_empty(), "hr's deletes accepted");
    assert_eq!(linked(&s, "crm"), keys(0..5), "crm still guarded");
    // The next run guards hr again.
    s.feed("hr.csv", &feed_of(10..15));
    s.run_once(Some("hr"), 0);
    s.feed("hr.csv", "id,cn\n");
    s.run_once(Some("hr"), 3);
    assert_eq!(linked(&s, "hr"), keys(10..15));
}

// --- bad input for a known account ------------------------------------------------------------

/// docs/flatfile.md: "If the row's key can still be read, that account is held as it was (no
/// update, no delete)."
#[test]
fn a_known_account_whose_row_turns_malformed_is_held() {
    let s = hr_world(", delete_guard: { enabled: false }", "");
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n3,Cy\n");
    s.run_once(None, 0);
    // Row 2 gains a field (and a changed name): rejected; 3 really goes.
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Robert,extra\n");
    s.run_once(None, 1);
    assert_eq!(linked(&s, "hr"), keys([1, 2]), "2 held, 3 deleted");
    assert_eq!(
        attr(&s.identity("u2").unwrap(), "cn"),
        Some("Bob"),
        "not updated"
    );
    assert!(
        s.results(&["--key", "2"])
            .iter()
            .all(|d| d["op"] != "delete"),
        "no delete of 2 recorded"
    );
    let failed = s.failed();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("hr.csv:3:"),
        "{failed:?}"
    );
    // Fixed: the update goes through.
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Robert\n");
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("u2").unwrap(), "cn"), Some("Robert"));
}

// --- write completion ------------------------------------------------------------------------

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// `completion: marker`: a marker older than the feed does not release it.
#[test]
fn a_marker_older_than_the_feed_does_not_release_it() {
    let s = hr_world(", completion: marker", "");
    let feed = s.path().join("feeds/hr.csv");
    let marker = s.path().join("feeds/hr.csv.done");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    s.write("feeds/hr.csv.done", "");
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys([1]));
    // Today's feed is being written; yesterday's marker is still there.
    let now = SystemTime::now();
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    set_mtime(&feed, now);
    set_mtime(&marker, now - Duration::from_secs(3600));
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
    assert_eq!(
        linked(&s, "hr"),
        keys([1]),
        "a stale marker released the feed"
    );
    // The writer touches the marker: released.
    set_mtime(&marker, now + Duration::from_secs(1));
    s.run_once(None, 0);
    assert_eq!(linked(&s, "hr"), keys([1, 2]));
}

/// `completion: settle`: a file that keeps changing for more than 30 settle times is reported
/// as still being written, and nothing of it is applied. The writer rewrites the file in
/// place (truncate, then write) every 20 ms; the settle time leaves room for that thread to
/// be descheduled on a loaded machine, and a read that catches the file between a pause and
/// the next write is refused by the signature check after the read.
#[test]
fn a_settle_that_gives_up_says_so_and_applies_nothing() {
    let s = hr_world(", settle_ms: 250", "");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    s.run_once(None, 0);
    let path = s.path().join("feeds/hr.csv");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                std::fs::write(&path, format!("id,cn\n1,Ann\n2,Bob{n}\n")).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = s.idsync(&["run", "--once"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("is still being written"),
        "{}",
        out.stderr
    );
    assert_eq!(linked(&s, "hr"), keys([1]), "nothing applied");
}

// --- the agent: on_error: halt, reload on a config change -----------------------------------

/// A resource with `on_error: halt` whose batch failed stays halted in the agent — nothing of
/// the batch applied, its checkpoint unmoved, not re-run when its feed changes — while the
/// other resource goes on; a rule change releases it.
#[test]
fn on_error_halt_in_the_agent_holds_the_resource_until_the_rules_change() {
    let s = Sandbox::new();
    s.config(
        "poll_interval_secs: 1
status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id, completion: rename }
    rules: { correlation: corr.rhai }
    naming: '\"u\" + account.id'
    on_error: halt
  - name: other
    source: { type: flatfile, path: feeds/other.csv, key: id, completion: rename }
    naming: '\"o\" + account.id'
",
    );
    s.rule(
        "corr.rhai",
        "if account.id == \"bad\" { throw \"bad row\" }\n#{ empno: account.id }",
    );
    s.feed("hr.csv", "id\n1\nbad\n");
    s.feed("other.csv", "id\n1\n");
    let mut agent = s.start_logged(&[]);
    eventually(20, "the halt", || {
        s.agent_log()
            .contains("resource halted until the config or rules change")
            .then_some(())
    });
    eventually(20, "the other resource", || s.identity("o1"));
    // The halted resource's feed changes: it is not passed again.
    s.replace_atomically("feeds/hr.csv", "id\n1\nbad\n2\n");
    s.replace_atomically("feeds/other.csv", "id\n1\n2\n");
    eventually(20, "the other resource's change", || s.identity("o2"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(linked(&s, "hr").is_empty(), "nothing of the halted batch");
    assert!(s.results(&["--resource", "hr"]).is_empty());
    assert_eq!(
        s.sql("SELECT count(*) FROM checkpoints WHERE resource = 'hr'"),
        "0",
        "hr's checkpoint unmoved"
    );
    assert_eq!(
        s.agent_log().matches("event failed").count(),
        1,
        "the halted resource was passed again:\n{}",
        s.agent_log()
    );
    let status: Value =
        serde_json::from_str(s.idsync(&["status", "--json"]).expect_code(0).stdout.trim()).unwrap();
    let hr = status["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "hr")
        .unwrap()
        .clone();
    assert_eq!(hr["state"], "failing", "{status}");
    // The rule is fixed: the reload releases the resource.
    s.rule("corr.rhai", "#{ empno: account.id }");
    eventually(20, "hr after the fix", || {
        (linked(&s, "hr") == ["1", "2", "bad"]).then_some(())
    });
    assert_eq!(terminate(&mut agent).0, Some(0), "{}", s.agent_log());
}

/// The agent reloads when the config file (not a rule) is written: a mapping added to the
/// config applies to the next change.
#[test]
fn the_agent_reloads_when_the_config_file_changes() {
    let s = Sandbox::new();
    let config = |mappings: &str| {
        format!(
            "poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id, completion: rename }}
    naming: '\"u\" + account.id'
{mappings}"
        )
    };
    s.config(&config(""));
    s.feed("hr.csv", "id,title\n1,clerk\n");
    let mut agent = s.start_logged(&[]);
    eventually(20, "the first pass", || s.identity("u1"));
    assert_eq!(attr(&s.identity("u1").unwrap(), "title"), None);
    assert!(!s.agent_log().contains("reloaded"), "{}", s.agent_log());
    s.replace_atomically(
        "idsync.yaml",
        &config("    mappings:\n      - { to: title, from: title }\n"),
    );
    eventually(20, "the reload", || {
        s.agent_log().contains("reloaded").then_some(())
    });
    s.replace_atomically("feeds/hr.csv", "id,title\n1,clerk\n2,lead\n");
    let u2 = eventually(20, "the change", || s.identity("u2"));
    assert_eq!(
        attr(&u2, "title"),
        Some("lead"),
        "decided with the new config"
    );
    assert_eq!(terminate(&mut agent).0, Some(0), "{}", s.agent_log());
}

// --- the outbox ------------------------------------------------------------------------------

fn outbox(s: &Sandbox) -> Vec<Value> {
    let out = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
    let mut v: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    v.sort_by_key(|m| m["id"].as_i64());
    v
}

fn smtp_config(transport: &str, retry: &str) -> String {
    format!(
        "status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {transport}
  dispatch: {{ claim_lease: 1s }}
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome'
      text: 'Hello'
      retry: {retry}
"
    )
}

/// `max_age` dead-letters a message the server never took; `outbox retry ID` makes it due
/// again; `outbox purge --sent-before` removes sent messages before the time only, never an
/// undelivered one.
#[test]
fn outbox_max_age_retry_by_id_and_purge() {
    let s = Sandbox::new();
    let port = common::free_port();
    s.config(&smtp_config(
        &format!("{{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 2s }}"),
        "{ every: 100ms, max_interval: 100ms, max_age: 1s }",
    ));
    s.feed("hr.csv", "id,mail\n1,a@example.com\n");
    // The server is down: pending, then past max_age dead.
    s.run_once(None, 0);
    let m = outbox(&s).remove(0);
    assert_eq!(m["status"], "pending", "{m}");
    std::thread::sleep(Duration::from_millis(1200));
    let out = s.run_once(None, 1);
    assert!(out.stdout.contains("dead-lettered 1"), "{}", out.stdout);
    let m = outbox(&s).remove(0);
    assert_eq!(m["status"], "dead", "{m}");
    let id = m["id"].as_i64().unwrap().to_string();

    let mut server = SmtpServer::on_port(&s.path().join("smtp"), port);
    server.start();
    s.run_once(None, 0);
    assert!(server.received().is_empty(), "a dead message is not sent");
    let out = s.idsync(&["outbox", "retry", &id]).expect_code(0);
    assert!(
        out.stdout.contains(&format!("#{id} due again")),
        "{}",
        out.stdout
    );
    s.run_once(None, 0);
    assert_eq!(server.received().len(), 1);
    assert_eq!(outbox(&s)[0]["status"], "sent");
    s.idsync(&["outbox", "retry", &id]).expect_code(1);

    // A second message the server keeps refusing for now (451): pending.
    server.set_mode("451");
    s.feed("hr.csv", "id,mail\n1,a@example.com\n2,b@example.com\n");
    s.run_once(None, 0);
    let statuses: Vec<String> = outbox(&s)
        .iter()
        .map(|m| m["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["sent", "pending"]);
    // Sent before an hour ago: nothing.
    let out = s
        .idsync(&["outbox", "purge", "--sent-before", "1h"])
        .expect_code(0);
    assert!(out.stdout.contains("purged 0"), "{}", out.stdout);
    assert_eq!(outbox(&s).len(), 2);
    // Sent before 2100: the sent one; the pending one stays.
    let out = s
        .idsync(&["outbox", "purge", "--sent-before", "2100-01-01T00:00:00Z"])
        .expect_code(0);
    assert!(out.stdout.contains("purged 1"), "{}", out.stdout);
    let left = outbox(&s);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (&left[0]["status"], &left[0]["identity"]),
        (&"pending".into(), &"u2".into())
    );
}

/// AUTH with the password from `password_env`: `check` names the variable when it is not
/// set, and with it set the mail is delivered.
#[test]
fn smtp_password_from_the_environment() {
    const VAR: &str = "IDSYNC_TEST_SMTP_PASSWORD";
    const PASSWORD: &str = "env-Pa55word";
    let s = Sandbox::new();
    let port = common::free_port();
    s.config(&smtp_config(
        &format!(
            "{{ type: smtp, host: 127.0.0.1, port: {port}, tls: starttls, ca_file: tls/ca.pem, \
             username: idsync, password_env: {VAR}, timeout: 5s }}"
        ),
        "{ every: 100ms, max_interval: 100ms, max_age: 1h }",
    ));
    let dir = s.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let certs = slapd::Tls::generate(&dir);
    let mut server = SmtpServer::on_port(&s.path().join("smtp"), port);
    server.start_auth(&certs.cert, &certs.key, "idsync", PASSWORD);

    let out = s.idsync(&["check"]).expect_code(2);
    assert!(
        out.stderr.contains(&format!(
            "password_env: the environment variable {VAR} is not set"
        )),
        "{}",
        out.stderr
    );
    s.idsync_env(&["check"], &[(VAR, PASSWORD)]).expect_code(0);
    s.feed("hr.csv", "id,mail\n1,a@example.com\n");
    let run = s
        .idsync_env(&["run", "--once"], &[(VAR, PASSWORD)])
        .expect_code(0);
    assert!(!run.stderr.contains(PASSWORD) && !run.stdout.contains(PASSWORD));
    let got = server.wait_for(1);
    assert_eq!(got[0].rcpt, vec!["a@example.com"]);
    assert_eq!(outbox(&s)[0]["status"], "sent");
    // A wrong password in the variable: refused (535), dead-lettered.
    s.feed("hr.csv", "id,mail\n1,a@example.com\n2,b@example.com\n");
    s.idsync_env(&["run", "--once"], &[(VAR, "wrong")])
        .expect_code(1);
    let m = outbox(&s).pop().unwrap();
    assert_eq!(m["status"], "dead", "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("535"), "{m}");
}
