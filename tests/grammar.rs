//! One command-line grammar (docs/operations.md, "Command-line conventions"), through the
//! real binary: `--json` on every listing gives JSON lines `jq` reads; an unknown
//! `--resource` is refused with exit status 2 by every command that takes one; a short flag
//! means one thing; ids are repeatable; `status` shows the last pass and error of
//! `run --once`.
#![allow(clippy::unwrap_used)]

mod common;

use common::Sandbox;
use serde_json::Value;

/// Two resources; accounts 3 and 4 of hr fail their correlation rule; the welcome mails of
/// u1 and u2 wait for an SMTP server that is not there.
fn world(s: &Sandbox) {
    let closed = common::free_port();
    s.config(&format!(
        "status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    rules: {{ correlation: corr.rhai }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
  - name: badges
    source: {{ type: flatfile, path: feeds/badges.csv, key: badge }}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {closed}, tls: none, timeout: 1s }}
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
        "if account.id == \"3\" || account.id == \"4\" { throw \"no luck\" } else { () }",
    );
    s.feed(
        "hr.csv",
        "id,mail\n1,one@example.com\n2,two@example.com\n3,three@example.com\n4,four@example.com\n",
    );
    s.feed("badges.csv", "badge\nb1\n");
}

/// `jq -c .` over `text`: the objects it read (it fails on anything that is not JSON).
fn jq(text: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = std::process::Command::new("jq")
        .args(["-c", "."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("jq (apt-get install jq; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jq refused: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_listing_prints_json_lines() {
    let s = Sandbox::new();
    world(&s);
    s.run_once(None, 1);
    s.idsync(&[
        "failed", "discard", "-r", "hr", "-k", "4", "--reason", "left",
    ])
    .expect_code(0);
    // A change for preview to show.
    s.feed(
        "hr.csv",
        "id,mail\n1,one@example.org\n2,two@example.com\n3,three@example.com\n4,four@example.com\n",
    );
    let listings: [(&[&str], usize); 9] = [
        (&["identities", "list", "--json"], 3),
        (&["identities", "export"], 3),
        (&["results", "--json"], 5),
        (&["preview", "--json"], 1),
        (&["preview", "--format", "json"], 1),
        (&["failed", "list", "--json"], 1),
        (&["failed", "discarded", "--json"], 1),
        (&["outbox", "list", "--json"], 2),
        (&["status", "--json"], 1),
    ];
    for (args, n) in listings {
        let out = s.idsync(args).expect_code(0);
        assert_eq!(
            out.stdout.lines().count(),
            n,
            "{args:?}: one line per item\n{}",
            out.stdout
        );
        let objects = jq(&out.stdout);
        assert_eq!(objects.len(), n, "{args:?}: one object per line");
        assert!(
            objects.iter().all(Value::is_object),
            "{args:?}: {objects:?}"
        );
    }
    let list = jq(&s.idsync(&["identities", "list", "--json"]).stdout);
    assert_eq!(list[0]["name"], "b1");
    let u1 = list.iter().find(|i| i["name"] == "u1").unwrap();
    assert_eq!(u1["state"], "enabled");
    assert_eq!(u1["accounts"][0]["resource"], "hr");
    assert_eq!(u1["accounts"][0]["key"], "1");
    let discarded = jq(&s.idsync(&["failed", "discarded", "--json"]).stdout);
    assert_eq!(discarded[0]["reason"], "left");
    let erasures = s
        .idsync(&["identities", "erasures", "--json"])
        .expect_code(0);
    assert_eq!(erasures.stdout, "");
}

#[test]
fn an_unknown_resource_is_refused_by_every_command_that_takes_one() {
    let s = Sandbox::new();
    world(&s);
    let commands: [&[&str]; 8] = [
        &["run", "--once", "--resource", "hrr"],
        &["run", "--once", "--accept-deletes", "hrr"],
        &["preview", "-r", "hrr"],
        &["results", "-r", "hrr"],
        &["failed", "list", "-r", "hrr"],
        &["failed", "retry", "--all", "-r", "hrr"],
        &["failed", "discard", "-r", "hrr", "--reason", "x"],
        &["explain", "hrr", "1"],
    ];
    for args in commands {
        let out = s.idsync(args);
        assert_eq!(out.code, 2, "{args:?}\n{}", out.stderr);
        assert!(
            out.stderr
                .contains("no resource named 'hrr' in idsync.yaml (configured: hr, badges)"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!s.db().exists(), "{args:?} created the repository");
    }
    // The known ones work.
    s.run_once(Some("badges"), 0);
    s.idsync(&["results", "-r", "badges"]).expect_code(0);
    s.idsync(&["explain", "badges", "b1"]).expect_code(0);

    // A resource removed from the config: its records can still be read and its failed
    // events discarded by name; what needs its rules refuses it.
    s.run_once(Some("hr"), 1);
    assert_eq!(s.failed().len(), 2);
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    let start = config.find("  - name: hr").unwrap();
    let end = config.find("  - name: badges").unwrap();
    s.config(&format!("{}{}", &config[..start], &config[end..]));
    s.idsync(&["results", "-r", "hr"]).expect_code(0);
    s.idsync(&["explain", "hr", "1"]).expect_code(0);
    s.idsync(&["failed", "list", "-r", "hr"]).expect_code(0);
    s.idsync(&["work-items", "list", "-r", "hr"]).expect_code(0);
    s.idsync(&["failed", "discard", "-r", "hr", "--reason", "gone"])
        .expect_code(0);
    assert!(s.failed().is_empty());
    for args in [
        &["failed", "retry", "--all", "-r", "hr"][..],
        &["run", "--once", "--resource", "hr"][..],
        &["results", "-r", "hrr"][..],
    ] {
        let out = s.idsync(args).expect_code(2);
        assert!(
            out.stderr.contains("no resource named"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn a_short_flag_means_one_thing() {
    let s = Sandbox::new();
    world(&s);
    s.run_once(None, 1);
    // -s is --situation; outbox list's --status has no short form.
    let out = s
        .idsync(&["outbox", "list", "-s", "pending"])
        .expect_code(2);
    assert!(
        out.stderr.contains("unexpected argument '-s'"),
        "{}",
        out.stderr
    );
    assert_eq!(
        jq(&s
            .idsync(&["outbox", "list", "--status", "pending", "-n", "1", "--json"])
            .stdout)
        .len(),
        1
    );
    let one = jq(&s
        .idsync(&[
            "results",
            "-r",
            "hr",
            "-k",
            "2",
            "-s",
            "unmatched",
            "-n",
            "1",
            "--json",
        ])
        .expect_code(0)
        .stdout);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["key"], "2");
    let by_identity = jq(&s.idsync(&["results", "-i", "u1", "--json"]).stdout);
    assert_eq!(by_identity.len(), 1);
}

#[test]
fn ids_and_names_are_repeatable() {
    let s = Sandbox::new();
    world(&s);
    s.run_once(None, 1);
    let ids: Vec<String> = jq(&s.idsync(&["outbox", "list", "--json"]).stdout)
        .iter()
        .map(|m| m["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let show = s
        .idsync(&["outbox", "show", &ids[0], &ids[1]])
        .expect_code(0);
    assert_eq!(
        show.stdout.matches("message-id: ").count(),
        2,
        "{}",
        show.stdout
    );
    let retry = s
        .idsync(&["outbox", "retry", &ids[0], &ids[1]])
        .expect_code(0);
    assert_eq!(
        retry.stdout.matches(" due again").count(),
        2,
        "{}",
        retry.stdout
    );
    // One that does not exist: the others are handled, the status says one was missing.
    let show = s.idsync(&["outbox", "show", &ids[0], "999"]).expect_code(1);
    assert_eq!(show.stdout.matches("message-id: ").count(), 1);
    assert!(
        show.stderr.contains("no outbox message #999"),
        "{}",
        show.stderr
    );
    let people = s.idsync(&["identities", "show", "u1", "u2"]).expect_code(0);
    assert!(
        people.stdout.contains("name: u1") && people.stdout.contains("name: u2"),
        "{}",
        people.stdout
    );
    s.idsync(&["identities", "show", "u1", "nobody"])
        .expect_code(1);
}

#[test]
fn status_shows_the_last_pass_and_error_of_run_once() {
    let s = Sandbox::new();
    world(&s);
    s.feed("hr.csv", "id,mail\n1,one@example.com\n");
    let status = |s: &Sandbox| jq(&s.idsync(&["status", "--json"]).expect_code(0).stdout);
    s.run_once(None, 0);
    let first = status(&s);
    let hr = &first[0]["resources"][0];
    assert_eq!(hr["resource"], "hr");
    assert_eq!(hr["state"], "stopped");
    assert!(hr["last_pass_at"].is_string(), "{hr}");
    assert!(hr["last_error"].is_null(), "{hr}");
    let text = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(
        text.contains("hr: stopped; last pass ") && !text.contains("last pass never"),
        "{text}"
    );

    std::fs::remove_file(s.path().join("feeds/hr.csv")).unwrap();
    s.run_once(Some("hr"), 3);
    let failed = status(&s);
    let hr = &failed[0]["resources"][0];
    assert_eq!(hr["last_pass_at"], first[0]["resources"][0]["last_pass_at"]);
    assert!(
        hr["last_error"].as_str().unwrap().contains("hr.csv"),
        "{hr}"
    );
    let text = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(text.contains("\n  last error: "), "{text}");
    // badges was not part of that run: its own last pass stays as it was.
    assert_eq!(
        failed[0]["resources"][1]["last_pass_at"],
        first[0]["resources"][1]["last_pass_at"]
    );

    s.feed("hr.csv", "id,mail\n1,one@example.com\n");
    s.run_once(Some("hr"), 0);
    let fixed = status(&s);
    assert!(fixed[0]["resources"][0]["last_error"].is_null());
    assert_ne!(
        fixed[0]["resources"][0]["last_pass_at"],
        first[0]["resources"][0]["last_pass_at"]
    );
}

/// `preview --json` prints only the records on stdout; its notes (the accidental-delete
/// guard would refuse the pass) go to stderr, and the exit status says it as the run would.
#[test]
fn preview_json_keeps_its_notes_on_stderr() {
    let s = Sandbox::new();
    s.config(
        "resources:\n  - name: hr\n    source: { type: flatfile, path: feeds/hr.csv, key: id }\n",
    );
    let rows = |n: usize| {
        let mut csv = String::from("id\n");
        for i in 0..n {
            csv.push_str(&format!("{i}\n"));
        }
        csv
    };
    s.feed("hr.csv", &rows(10));
    s.run_once(None, 0);
    s.feed("hr.csv", &rows(6));
    let out = s.idsync(&["preview", "--json"]).expect_code(3);
    let records = jq(&out.stdout);
    assert_eq!(records.len(), 4, "{}", out.stdout);
    assert!(records.iter().all(|r| r["op"] == "delete"), "{records:?}");
    assert!(
        out.stderr.contains("hr: the run would refuse this pass"),
        "{}",
        out.stderr
    );
    let table = s.idsync(&["preview"]).expect_code(3);
    assert!(
        table.stdout.contains("hr: the run would refuse this pass"),
        "{}",
        table.stdout
    );
}
