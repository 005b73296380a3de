//! The repository on PostgreSQL through the real binary: `idsync migrate` from an SQLite
//! file into a private PostgreSQL database and back, verified; the config's `repository:`
//! keys checked. (The situation and sequence tests run on PostgreSQL too, with
//! IDSYNC_TEST_REPOSITORY=postgres; several agents: tests/agents.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use common::Sandbox;
use idsync_testkit::postgres::Postgres;
use serde_json::Value;

const RESOURCES: &str = "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    rules: { correlation: by_mail.rhai }
    naming: '\"u\" + account.id'
    on_disputed: work_item
    mappings:
      - { to: mail, from: mail }
      - { to: title, from: title }
";

fn world(repository: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!("repository: {repository}\n{RESOURCES}"));
    s.rule("by_mail.rhai", "#{ mail: account.mail }");
    s
}

/// An SQLite repository with identities, links, decision records, a failed event and an
/// open work item is copied into an empty PostgreSQL database: every table verified by
/// count and checksum; pointed at the copy, idsync shows the same identities and records
/// (the same ids) and goes on from there (new ids after the copied ones). Copied back into
/// a new SQLite file, it is the same again.
#[test]
fn migrate_copies_a_repository_to_postgres_and_back_verified() {
    let pg = Postgres::start().unwrap();
    pg.create_database("idm").unwrap();
    let s = world("{ path: idsync.db }");
    s.feed(
        "hr.csv",
        "id,mail,title\n1,ann@example.com,Clerk\n2,bob@example.com,Clerk\n3,cy@example.com,Lead\n",
    );
    s.run_once(None, 0);
    // Changes (u2 takes ann's address), a row both then claim (a work item), a broken
    // row (a failed event).
    s.feed(
        "hr.csv",
        "id,mail,title\n1,ann@example.com,Manager\n2,ann@example.com,Clerk\n3,cy@example.com,Lead\n4,ann@example.com,Temp\n5,too,many,fields\n",
    );
    s.idsync(&["run", "--once"]);
    let identities = s.export();
    let results = s.results(&[]);
    assert!(results.len() >= 5, "{results:?}");
    let items = s
        .idsync(&["work-items", "list", "--json"])
        .expect_code(0)
        .stdout;
    assert!(items.contains("disputed"), "{items}");
    assert_eq!(s.failed().len(), 1);

    let url = pg.url("idm");
    let out = s.idsync(&["migrate", "--to", &url]).expect_code(0);
    assert!(
        out.stdout.contains("every table verified"),
        "{}",
        out.stdout
    );
    let json = s
        .idsync(&["migrate", "--to", &url, "--json"])
        .expect_code(3);
    assert!(
        json.stderr.contains("not empty"),
        "a second copy into the same database is refused: {}",
        json.stderr
    );

    // Pointed at PostgreSQL: the same identities, records and work items.
    let p = world(&format!("{{ url: \"{url}\" }}"));
    std::fs::copy(s.path().join("feeds/hr.csv"), p.path().join("feeds/hr.csv")).unwrap();
    assert_eq!(p.export(), identities);
    assert_eq!(p.results(&[]), results);
    assert_eq!(
        p.idsync(&["work-items", "list", "--json"])
            .expect_code(0)
            .stdout,
        items
    );
    // It goes on: a new hire gets the next record id.
    let last_id = results
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .max()
        .unwrap();
    p.feed(
        "hr.csv",
        "id,mail,title\n1,ann@example.com,Manager\n2,bob@example.com,Clerk\n3,cy@example.com,Lead\n6,di@example.com,Clerk\n",
    );
    p.idsync(&["run", "--once"]);
    let after = p.results(&["--key", "6"]);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0]["id"].as_i64().unwrap() > last_id);

    // And back into a new SQLite file.
    let back = p.path().join("back.db");
    let out = p
        .idsync(&["migrate", "--to", back.to_str().unwrap(), "--json"])
        .expect_code(0);
    let report: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(report["verified"], true);
    let identities_table = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "identities")
        .unwrap()
        .clone();
    assert_eq!(identities_table["target_rows"], 4);
    let b = world("{ path: back.db }");
    std::fs::copy(&back, b.path().join("back.db")).unwrap();
    assert_eq!(b.export(), p.export());
    assert_eq!(b.results(&[]), p.results(&[]));
}

/// The `repository:` keys are checked before anything connects: a password in the URL, a
/// PostgreSQL key without a URL, both password sources, each named with its key.
#[test]
fn check_refuses_repository_settings_that_cannot_work() {
    for (repository, key) in [
        (
            "{ url: \"postgres://idsync:s3cret@127.0.0.1:5432/idm\" }",
            "repository.url: holds a password",
        ),
        (
            "{ path: idsync.db, password_env: PGPASSWORD }",
            "repository.password_env: only for a PostgreSQL repository",
        ),
        (
            "{ url: \"postgres://idsync@127.0.0.1:5432/idm\", password_env: A, password_file: b }",
            "repository.password_env: give password_env or password_file, not both",
        ),
        (
            "{ url: \"mysql://idsync@127.0.0.1/idm\" }",
            "repository.url: expected postgres://",
        ),
    ] {
        let s = world(repository);
        let out = s.idsync(&["check"]).expect_code(2);
        assert!(out.stderr.contains(key), "{repository}: {}", out.stderr);
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
    }
}

/// An unreachable PostgreSQL server: the command says which repository (without the
/// password source's content) and exits as a resource failure, quickly.
#[test]
fn an_unreachable_database_is_named_and_fails_the_command() {
    let port = common::free_port();
    let s = world(&format!(
        "{{ url: \"postgres://idsync@127.0.0.1:{port}/idm\", password_env: IDSYNC_TEST_PGPW }}"
    ));
    let started = std::time::Instant::now();
    let out = s.idsync_env(&["status"], &[("IDSYNC_TEST_PGPW", "hunter2-secret")]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("postgres://idsync@127.0.0.1:{port}/idm")),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
    assert!(started.elapsed().as_secs() < 15);
}

/// `ca_file`: the connection is TLS and the server's certificate is verified against the
/// CA. Against a server that takes only TLS, the agent works with the right CA; without a
/// CA file (plain) the server refuses it; with another CA it refuses the server, naming the
/// repository.
#[test]
fn tls_to_postgres_verifies_the_server_against_the_ca_file() {
    let pg = Postgres::start_tls().unwrap();
    pg.create_database("idm").unwrap();
    let url = pg.url("idm");
    let s = world(&format!("{{ url: \"{url}\", ca_file: pg-ca.pem }}"));
    std::fs::copy(pg.ca(), s.path().join("pg-ca.pem")).unwrap();
    s.feed("hr.csv", "id,mail,title\n1,ann@example.com,Clerk\n");
    s.run_once(None, 0);
    assert!(s.identity("u1").is_some());
    // Without the CA file the connection is plain, and this server takes only TLS.
    let plain = world(&format!("{{ url: \"{url}\" }}"));
    let out = plain.idsync(&["status"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("no encryption"), "{}", out.stderr);
    // Another CA: refused.
    let other = tempfile::tempdir().unwrap();
    let wrong = idsync_testkit::slapd::Tls::generate(other.path()).unwrap();
    std::fs::copy(&wrong.ca, s.path().join("pg-ca.pem")).unwrap();
    let out = s.idsync(&["status"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains(&url), "{}", out.stderr);
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.stderr
    );
}

/// A preview of a folder of dated files on a PostgreSQL repository: each file decided
/// against a scratch copy (an SQLite file filled from the database), the second diffed
/// against what the first leaves; nothing is written to the database, nothing archived.
#[test]
fn a_folder_preview_on_postgres_decides_each_file_on_a_scratch_copy() {
    let pg = Postgres::start().unwrap();
    pg.create_database("idm").unwrap();
    let s = Sandbox::new();
    s.config(&format!(
        "repository: {{ url: \"{}\" }}
resources:
  - name: hr
    source:
      type: flatfile
      path: feeds/in
      pattern: 'hr-*.csv'
      after: archive
      completion: rename
      key: id
    populate_global: true
",
        pg.url("idm")
    ));
    s.write("feeds/in/hr-2026-11-01.csv", "id,cn\n1,Ann\n3,Cy\n");
    s.run_once(None, 0);
    s.write(
        "feeds/in/hr-2026-11-02.csv",
        "id,cn\n1,Ann Lee\n2,Bob\n3,Cy\n",
    );
    s.write(
        "feeds/in/hr-2026-11-03.csv",
        "id,cn\n1,Ann Lee\n2,Bob B\n3,Cy\n",
    );
    let before = s.export();
    let records = s.results(&[]).len();
    let preview = s.idsync(&["preview"]).expect_code(0);
    assert!(
        preview.stdout.contains("hr 1 update") && preview.stdout.contains("hr 2 create"),
        "{}",
        preview.stdout
    );
    assert!(
        preview.stdout.contains("hr 2 update"),
        "the third file is diffed against what the second leaves: {}",
        preview.stdout
    );
    assert_eq!(s.export(), before, "a preview writes nothing");
    assert_eq!(s.results(&[]).len(), records);
    assert!(s.path().join("feeds/in/hr-2026-11-02.csv").exists());
}
