//! The LDAP adapter through the real `idsync` binary against a real, private slapd started by
//! the test (tests/common/slapd.rs): initial full sync, add, modify, modrdn and delete in
//! syncrepl (refreshOnly), persist (refreshAndPersist, with `idsync run` as a long-running
//! child) and poll modes; slapd restarted between passes and mid-stream; a stale cookie (the
//! agent's repository restored from a backup); ldaps and StartTLS with a generated CA; a
//! non-admin sync account (every test binds as it, with `limits` and ACLs); a refused bind;
//! an escaped filter value; binary and multi-valued attributes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, attr};
use serde_json::Value;
use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};

/// A sandbox whose one resource `dir` reads ou=people of `slapd` as the sync account.
fn world(slapd: &Slapd, source_extra: &str) -> Sandbox {
    world_at(slapd, &slapd.url(), source_extra)
}

fn world_at(_slapd: &Slapd, url: &str, source_extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", &format!("{SYNC_PW}\n"));
    s.config(&format!(
        "poll_interval_secs: 1
status: {{ listen: off }}
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
{source_extra}
    naming: 'account.uid'
    populate_global: true
    rules: {{ filter: has_uid.rhai }}
"
    ));
    // Delete events carry the last known attributes: a filter that needs them lets deletes
    // through (an empty account would be filtered out, not deleted).
    s.rule("has_uid.rhai", "account.uid != () && account.dn != ()");
    s
}

/// Polls `f` until it returns `Some`, failing after `secs`.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn dn_of(identity: &Value) -> Option<String> {
    attr(identity, "dn").map(str::to_owned)
}

/// Decision records of `key`, oldest first.
fn records(s: &Sandbox, key: &str) -> Vec<Value> {
    let mut r = s.results(&["--key", key]);
    r.sort_by_key(|v| v["id"].as_i64());
    r
}

/// Add, modify, modrdn, delete; each followed by `sync`; checks the repository after each.
fn lifecycle(slapd: &Slapd, s: &Sandbox, sync: &dyn Fn()) {
    let before = s.export().len();
    slapd.add_person("ann", "Ann", "ann@example.com");
    sync();
    let uuid = slapd.entry_uuid(&format!("uid=ann,{PEOPLE}"));
    assert_eq!(s.owner("dir", &uuid).as_deref(), Some("ann"));
    let ann = s.identity("ann").unwrap();
    assert_eq!(dn_of(&ann).as_deref(), Some(&*format!("uid=ann,{PEOPLE}")));

    slapd.modify(&format!(
        "dn: uid=ann,{PEOPLE}\nchangetype: modify\nreplace: mail\nmail: ann@new.example.com\nmail: a@new.example.com\n\n"
    ));
    sync();
    let ann = s.identity("ann").unwrap();
    assert_eq!(
        ann["attrs"]["mail"],
        serde_json::json!(["ann@new.example.com", "a@new.example.com"])
    );

    // A rename is an update of the same account (key = entryUUID), not a new identity.
    slapd.modify(&format!(
        "dn: uid=ann,{PEOPLE}\nchangetype: modrdn\nnewrdn: uid=anna\ndeleteoldrdn: 1\n\n"
    ));
    sync();
    assert_eq!(s.owner("dir", &uuid).as_deref(), Some("ann"));
    let ann = s.identity("ann").unwrap();
    assert_eq!(dn_of(&ann).as_deref(), Some(&*format!("uid=anna,{PEOPLE}")));
    assert_eq!(attr(&ann, "uid"), Some("anna"));
    assert_eq!(
        s.export().len(),
        before + 1,
        "a rename must not create an identity"
    );

    slapd.modify(&format!("dn: uid=anna,{PEOPLE}\nchangetype: delete\n\n"));
    sync();
    assert_eq!(
        s.owner("dir", &uuid),
        None,
        "the delete unlinks the account"
    );
    let recs = records(s, &uuid);
    let ops: Vec<&str> = recs.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops.first().copied(), Some("create"));
    assert_eq!(ops.last().copied(), Some("delete"));
    assert_eq!(
        ops.iter().filter(|o| **o == "update").count(),
        2,
        "modify and rename, each once: {ops:?}"
    );
}

#[test]
fn syncrepl_full_sync_then_add_modify_modrdn_delete() {
    let slapd = Slapd::start();
    for i in 0..5 {
        slapd.add_person(
            &format!("p{i}"),
            &format!("P {i}"),
            &format!("p{i}@example.com"),
        );
    }
    // Outside the base: never synchronized.
    slapd.modify("dn: uid=x,ou=other,dc=example,dc=com\nobjectClass: inetOrgPerson\nuid: x\ncn: X\nsn: X\n\n");
    let s = world(&slapd, "      mode: syncrepl");
    s.idsync(&["check"]).expect_code(0);
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: 5 events"), "{}", run.stdout);
    assert_eq!(s.export().len(), 5);
    // Nothing new: idle, and nothing recorded twice.
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: no changes"), "{}", run.stdout);
    assert_eq!(s.results(&[]).len(), 5);

    lifecycle(&slapd, &s, &|| {
        s.run_once(None, 0);
    });
    assert_eq!(s.export().len(), 6);
}

#[test]
fn syncrepl_resumes_after_slapd_restart_and_outage() {
    let mut slapd = Slapd::start();
    slapd.add_person("a", "A", "a@example.com");
    slapd.add_person("b", "B", "b@example.com");
    let s = world(&slapd, "      mode: syncrepl");
    s.run_once(None, 0);
    let b = slapd.entry_uuid(&format!("uid=b,{PEOPLE}"));

    // Changes, including a delete, while the agent is not running; then slapd restarts.
    slapd.add_person("c", "C", "c@example.com");
    slapd.modify(&format!("dn: uid=b,{PEOPLE}\nchangetype: delete\n\n"));
    slapd.restart();
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: 2 events"), "{}", run.stdout);
    assert_eq!(s.owner("dir", &b), None);
    assert!(s.identity("c").is_some());

    // The server is down: a clear error naming the resource, exit 3, nothing committed.
    slapd.stop();
    let run = s.run_once(None, 3);
    assert!(run.stderr.contains("resource dir"), "{}", run.stderr);
    assert!(run.stderr.contains("127.0.0.1"), "{}", run.stderr);
    slapd.launch();
    slapd.add_person("d", "D", "d@example.com");
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: 1 events"), "{}", run.stdout);
    // Every account decided exactly once per change.
    assert_eq!(s.results(&[]).len(), 5);
}

/// People a, b and c in the directory, synchronized once in syncrepl mode.
fn synced_a_b_c(slapd: &Slapd) -> Sandbox {
    for u in ["a", "b", "c"] {
        slapd.add_person(u, u, &format!("{u}@example.com"));
    }
    let s = world(slapd, "      mode: syncrepl");
    s.run_once(None, 0);
    s
}

/// Deletes a, changes b's cn to Bee, adds d.
fn delete_a_rename_b_add_d(slapd: &Slapd) {
    slapd.modify(&format!("dn: uid=a,{PEOPLE}\nchangetype: delete\n\n"));
    slapd.modify(&format!(
        "dn: uid=b,{PEOPLE}\nchangetype: modify\nreplace: cn\ncn: Bee\n\n"
    ));
    slapd.add_person("d", "d", "d@example.com");
}

#[test]
fn stale_cookie_from_a_restored_repository_converges() {
    let slapd = Slapd::start();
    let s = synced_a_b_c(&slapd);
    let backup = s.path().join("backup.db");
    std::fs::copy(s.db(), &backup).unwrap();

    delete_a_rename_b_add_d(&slapd);
    s.run_once(None, 0);
    let after_sync: Vec<String> = s
        .export()
        .iter()
        .map(|i| format!("{} {}", i["name"], i["accounts"]))
        .collect();

    // The agent's repository is restored from the backup: its cookie is old.
    std::fs::remove_file(s.path().join("idsync.db-wal")).ok();
    std::fs::remove_file(s.path().join("idsync.db-shm")).ok();
    std::fs::copy(&backup, s.db()).unwrap();
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: 3 events"), "{}", run.stdout);
    let again: Vec<String> = s
        .export()
        .iter()
        .map(|i| format!("{} {}", i["name"], i["accounts"]))
        .collect();
    assert_eq!(again, after_sync);
    assert_eq!(attr(&s.identity("b").unwrap(), "cn"), Some("Bee"));
}

#[test]
fn cookie_older_than_the_server_logs_gets_a_full_refresh_with_deletes_by_absence() {
    let slapd = Slapd::start_reload_hint();
    let s = synced_a_b_c(&slapd);
    delete_a_rename_b_add_d(&slapd);

    // The committed cookie now names a CSN from before anything the server's logs hold:
    // it cannot send the changes since, so it answers e-syncRefreshRequired, and the
    // adapter starts over without a cookie and finds the delete by absence.
    let db = rusqlite::Connection::open(s.db()).unwrap();
    let token: String = db
        .query_row(
            "SELECT token FROM checkpoints WHERE resource = 'dir'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let at = token.find("csn=").expect("a cookie with a CSN") + 4;
    let end = token[at..].find([',', ';']).map_or(token.len(), |e| at + e);
    let aged = format!(
        "{}20000101000000.000000Z#000000#000#000000{}",
        &token[..at],
        &token[end..]
    );
    db.execute(
        "UPDATE checkpoints SET token = ?1 WHERE resource = 'dir'",
        [&aged],
    )
    .unwrap();
    drop(db);

    let run = s.idsync(&["run", "--once"]).expect_code(0);
    assert!(
        run.stderr.contains("e-syncRefreshRequired"),
        "the server did not ask for a full refresh: {}",
        run.stderr
    );
    let names: Vec<String> = s
        .export()
        .iter()
        .filter(|i| i["accounts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|i| i["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["b", "c", "d"], "{}", run.stdout);
    assert_eq!(attr(&s.identity("b").unwrap(), "cn"), Some("Bee"));
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: no changes"), "{}", run.stdout);
}

/// `idsync run` (no --once) as a child, killed when dropped.
struct Agent(Child);

impl Agent {
    fn start(s: &Sandbox) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .arg("run")
            .current_dir(s.path())
            .env_remove("IDSYNC_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn persist_streams_changes_and_survives_slapd_restart() {
    let mut slapd = Slapd::start();
    slapd.add_person("p0", "P0", "p0@example.com");
    let s = world(&slapd, "      mode: persist\n      idle_ms: 300");
    let _agent = Agent::start(&s);
    eventually(20, "the initial refresh", || s.identity("p0"));

    // Each step of the lifecycle makes exactly one decision record: wait for it.
    let expected = std::cell::Cell::new(s.results(&[]).len());
    let sync = || {
        expected.set(expected.get() + 1);
        eventually(10, "a streamed change", || {
            (s.results(&[]).len() >= expected.get()).then_some(())
        });
    };
    lifecycle(&slapd, &s, &sync);

    // slapd restarted mid-stream: the agent reconnects and resumes from the committed cookie.
    slapd.restart();
    slapd.add_person("late", "Late", "late@example.com");
    eventually(30, "a change after the restart", || s.identity("late"));
    let late = slapd.entry_uuid(&format!("uid=late,{PEOPLE}"));
    assert_eq!(records(&s, &late).len(), 1, "applied exactly once");
    let p0 = slapd.entry_uuid(&format!("uid=p0,{PEOPLE}"));
    assert_eq!(records(&s, &p0).len(), 1, "not re-applied by the resume");
}

#[test]
fn poll_mode_finds_changes_by_timestamp_and_deletes_by_full_pass() {
    let slapd = Slapd::start();
    slapd.add_person("p0", "P0", "p0@example.com");
    let s = world(
        &slapd,
        "      mode: poll\n      full_pass_secs: 0\n      page_size: 2",
    );
    s.run_once(None, 0);
    assert!(s.identity("p0").is_some());
    for i in 1..5 {
        slapd.add_person(&format!("p{i}"), "P", "p@example.com");
    }
    s.run_once(None, 0);
    assert_eq!(s.export().len(), 5, "read through pages of 2");
    lifecycle(&slapd, &s, &|| {
        s.run_once(None, 0);
    });
}

#[test]
fn poll_mode_incremental_uses_the_high_water_mark() {
    let slapd = Slapd::start();
    slapd.add_person("p0", "P0", "p0@example.com");
    let s = world(&slapd, "      mode: poll\n      full_pass_secs: 3600");
    s.run_once(None, 0);
    slapd.add_person("p1", "P1", "p1@example.com");
    slapd.modify(&format!(
        "dn: uid=p0,{PEOPLE}\nchangetype: modify\nreplace: cn\ncn: Changed\n\n"
    ));
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("dir: 2 events"), "{}", run.stdout);
    assert_eq!(attr(&s.identity("p0").unwrap(), "cn"), Some("Changed"));
    // Entries of the high-water second are read again but not applied twice.
    s.run_once(None, 0);
    assert_eq!(s.results(&[]).len(), 3);
}

#[test]
fn ldaps_and_starttls_with_a_generated_ca() {
    let slapd = Slapd::start_tls();
    slapd.add_person("t", "T", "t@example.com");
    let ca = slapd.tls.as_ref().unwrap().ca.display().to_string();

    let s = world_at(&slapd, &slapd.ldaps_url(), &format!("      ca_file: {ca}"));
    s.run_once(None, 0);
    assert!(s.identity("t").is_some());

    let s = world_at(
        &slapd,
        &slapd.url(),
        &format!("      starttls: true\n      ca_file: {ca}"),
    );
    s.run_once(None, 0);
    assert!(s.identity("t").is_some());

    // Verification is on: without the CA the server's certificate is refused, for that
    // reason (not a refused connection or bind), over ldaps and StartTLS alike, and
    // nothing is stored.
    for (url, extra) in [
        (slapd.ldaps_url(), ""),
        (slapd.url(), "      starttls: true"),
    ] {
        let s = world_at(&slapd, &url, extra);
        let run = s.run_once(None, 3);
        assert!(
            run.stderr.contains("resource dir")
                && run
                    .stderr
                    .contains("invalid peer certificate: UnknownIssuer"),
            "{url} {extra}: {}",
            run.stderr
        );
        assert!(s.export().is_empty());
        assert!(s.results(&[]).is_empty());
        assert_eq!(s.checkpoint("dir"), None);
    }
}

#[test]
fn refused_bind_names_the_resource_and_never_the_password() {
    let slapd = Slapd::start();
    let s = world(&slapd, "");
    s.write("secrets/ldap.pw", "wrong-password-123\n");
    let run = s.run_once(None, 3);
    assert!(run.stderr.contains("resource dir"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("bind as 'cn=sync,dc=example,dc=com' refused"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("invalidCredentials"), "{}", run.stderr);
    assert!(!run.stderr.contains("wrong-password-123"));
    assert!(!run.stdout.contains("wrong-password-123"));
}

#[test]
fn password_from_the_environment() {
    let slapd = Slapd::start();
    slapd.add_person("e", "E", "e@example.com");
    let s = Sandbox::new();
    s.config(&format!(
        "resources:
  - name: dir
    source: {{ type: ldap, url: '{}', base: '{PEOPLE}', filter: '(uid=*)', bind_dn_env: T_LDAP_DN, bind_password_env: T_LDAP_PW }}
    naming: 'account.uid'
",
        slapd.url()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["run", "--once"])
        .current_dir(s.path())
        .env("T_LDAP_DN", SYNC_DN)
        .env("T_LDAP_PW", SYNC_PW)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.identity("e").is_some());
    // Without the variable: a clear error naming it, not a crash.
    let run = s.run_once(None, 3);
    assert!(run.stderr.contains("$T_LDAP_DN"), "{}", run.stderr);
}

#[test]
fn filter_values_are_escaped() {
    let slapd = Slapd::start();
    slapd.modify(&format!(
        "dn: uid=odd,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: odd\ncn: Odd\nsn: Odd\ndepartmentNumber: R*)(D\n\n"
    ));
    slapd.modify(&format!(
        "dn: uid=rd,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: rd\ncn: Rd\nsn: Rd\ndepartmentNumber: RxD\n\n"
    ));
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", SYNC_PW);
    s.config(&format!(
        "resources:
  - name: dir
    source:
      type: ldap
      url: {}
      base: {PEOPLE}
      filter: '(&(objectClass=inetOrgPerson)(departmentNumber={{dept}}))'
      filter_values: {{ dept: 'R*)(D' }}
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
    naming: 'account.uid'
",
        slapd.url()
    ));
    s.run_once(None, 0);
    let names: Vec<String> = s
        .export()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["odd"],
        "the value matched literally, not as a wildcard"
    );
}

#[test]
fn binary_and_multi_valued_attributes_are_carried_faithfully() {
    let slapd = Slapd::start();
    // jpegPhoto bytes that are not UTF-8, and bytes that happen to be.
    slapd.modify(&format!(
        "dn: uid=ph,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: ph\ncn: Ph\nsn: Ph\n\
         mail: one@example.com\nmail: two@example.com\njpegPhoto:: /9j/AAEC/w==\n\n"
    ));
    let s = world(&slapd, "");
    s.run_once(None, 0);
    let ph = s.identity("ph").unwrap();
    assert_eq!(
        ph["attrs"]["jpegPhoto"],
        serde_json::json!({"base64": "/9j/AAEC/w=="})
    );
    assert_eq!(
        ph["attrs"]["mail"],
        serde_json::json!(["one@example.com", "two@example.com"])
    );
}

/// Narrows the resource's filter to p0 and p1: the cookie no longer fits, a full refresh
/// finds the others absent.
fn narrow_to_p0_and_p1(s: &Sandbox) {
    let narrow = std::fs::read_to_string(s.path().join("idsync.yaml"))
        .unwrap()
        .replace(
            "filter: (objectClass=inetOrgPerson)",
            "filter: (|(uid=p0)(uid=p1))",
        );
    s.config(&narrow);
}

#[test]
fn changed_search_refreshes_from_scratch_behind_the_delete_guard() {
    let slapd = Slapd::start();
    for i in 0..12 {
        slapd.add_person(&format!("p{i}"), "P", "p@example.com");
    }
    let s = world(&slapd, "      mode: syncrepl");
    s.run_once(None, 0);
    assert_eq!(s.export().len(), 12);

    // A narrower filter invalidates the cookie: a full refresh finds 10 accounts absent,
    // more than the guard allows, so nothing is applied: no identity, no decision record,
    // not the cookie. p0 changed meanwhile: a refresh that went through would show it.
    let before = (s.export(), s.results(&["-n", "1000"]), s.checkpoint("dir"));
    assert!(before.2.is_some());
    slapd.modify(&format!(
        "dn: uid=p0,{PEOPLE}\nchangetype: modify\nreplace: cn\ncn: Changed\n\n"
    ));
    narrow_to_p0_and_p1(&s);
    let run = s.run_once(None, 3);
    assert!(
        run.stderr.contains("would delete 10 of 12 accounts")
            && run.stderr.contains("--accept-deletes"),
        "{}",
        run.stderr
    );
    let after = (s.export(), s.results(&["-n", "1000"]), s.checkpoint("dir"));
    assert!(after == before, "a refused refresh applied something");
    // Still refused at the next run: an acceptance is for one run only.
    s.run_once(None, 3);
    let after = (s.export(), s.results(&["-n", "1000"]), s.checkpoint("dir"));
    assert!(after == before, "a refused refresh applied something");

    // The operator agrees, for this run: the deletes are applied, each with the last known
    // attributes.
    let run = s
        .idsync(&["run", "--once", "--accept-deletes", "dir"])
        .expect_code(0);
    assert!(run.stdout.contains("dir: 11 events"), "{}", run.stdout);
    let deleted = s.results(&["--situation", "deleted"]);
    assert_eq!(deleted.len(), 10);
    assert_eq!(attr(&s.identity("p0").unwrap(), "cn"), Some("Changed"));
    assert_ne!(s.checkpoint("dir"), before.2, "the new cookie");
}

#[test]
fn the_older_guard_keys_still_set_the_shared_guard() {
    let slapd = Slapd::start();
    for i in 0..12 {
        slapd.add_person(&format!("p{i}"), "P", "p@example.com");
    }
    let s = world(
        &slapd,
        "      mode: syncrepl\n      delete_guard_percent: 100",
    );
    s.run_once(None, 0);
    narrow_to_p0_and_p1(&s);
    // 100%: no share of the accounts is too many.
    s.run_once(None, 0);
    assert_eq!(s.results(&["--situation", "deleted"]).len(), 10);
}

#[test]
fn long_running_syncrepl_keeps_its_connection_and_survives_slapd_restart() {
    let mut slapd = Slapd::start();
    slapd.add_person("a", "A", "a@example.com");
    let s = world(&slapd, "      mode: syncrepl\n      interval_secs: 1");
    let _agent = Agent::start(&s);
    eventually(20, "the first pass", || s.identity("a"));
    slapd.restart();
    slapd.add_person("b", "B", "b@example.com");
    eventually(30, "a change after the restart", || s.identity("b"));
    assert_eq!(s.results(&[]).len(), 2, "each change applied once");
}

/// A directory restored from a backup (its state older than the stored cookie): the changes
/// made between the backup and the restore are gone from the server, so the repository must
/// follow the restored content (the hire removed, the leaver back, the old title), and the
/// changes made after the restore arrive too. Nothing is missed, nothing waits forever.
#[test]
fn a_directory_restored_from_a_backup_converges() {
    let mut slapd = Slapd::start();
    for i in 0..12 {
        slapd.add_person(&format!("p{i}"), "P", &format!("p{i}@example.com"));
    }
    let s = world(&slapd, "      mode: syncrepl");
    // A person who comes back is the same identity (correlated by uid).
    let cfg = std::fs::read_to_string(s.path().join("idsync.yaml"))
        .unwrap()
        .replace(
            "rules: { filter: has_uid.rhai }",
            "rules: { filter: has_uid.rhai, correlation: by_uid.rhai }",
        );
    s.config(&cfg);
    s.rule("by_uid.rhai", "#{ uid: account.uid }");
    s.run_once(None, 0);
    assert_eq!(s.export().len(), 12);
    slapd.backup("before");
    slapd.launch();
    // Changes after the backup, seen by idsync, then lost by the restore.
    slapd.add_person("hire", "H", "hire@example.com");
    slapd.modify(&format!(
        "dn: uid=p1,{PEOPLE}\nchangetype: modify\nreplace: mail\nmail: lost@example.com\n\n"
    ));
    slapd.modify(&format!("dn: uid=p2,{PEOPLE}\nchangetype: delete\n\n"));
    slapd.modify(&format!(
        "dn: uid=p4,{PEOPLE}\nchangetype: modrdn\nnewrdn: uid=p4x\ndeleteoldrdn: 1\n\n"
    ));
    s.run_once(None, 0);
    assert!(s.identity("hire").is_some());
    assert_eq!(
        dn_of(&s.identity("p4").unwrap()).as_deref(),
        Some(format!("uid=p4x,{PEOPLE}").as_str())
    );
    assert_eq!(
        attr(&s.identity("p1").unwrap(), "mail"),
        Some("lost@example.com")
    );
    slapd.restore("before");
    // The agent meets the restored server before anything else is written to it.
    let run = s.idsync(&["run", "--once"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("older than the stored cookie"),
        "{}",
        run.stderr
    );
    // A change after the restore.
    slapd.modify(&format!(
        "dn: uid=p3,{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: after\n\n"
    ));
    s.run_once(None, 0);
    let owner_hire = s.owner("dir", &slapd.entry_uuid(&format!("uid=p0,{PEOPLE}")));
    assert!(owner_hire.is_some());
    assert_eq!(attr(&s.identity("p3").unwrap(), "title"), Some("after"));
    assert_eq!(
        attr(&s.identity("p1").unwrap(), "mail"),
        Some("p1@example.com"),
        "the restored p1"
    );
    let hire = s.identity("hire").unwrap();
    assert!(hire["accounts"].as_array().unwrap().is_empty(), "{hire}");
    let p2 = s.identity("p2").unwrap();
    assert_eq!(p2["accounts"].as_array().unwrap().len(), 1, "{p2}");
    assert_eq!(
        dn_of(&s.identity("p4").unwrap()).as_deref(),
        Some(format!("uid=p4,{PEOPLE}").as_str()),
        "the rename undone by the restore"
    );
    // Every entry of the restored directory is linked, the lost hire is not.
    assert_eq!(
        s.export()
            .iter()
            .filter(|i| !i["accounts"].as_array().unwrap().is_empty())
            .count(),
        12
    );
}

/// An account is found by its DN, and by the resource's naming attribute, wherever a key
/// is accepted, not only by its entryUUID.
#[test]
fn accounts_are_found_by_dn_and_by_naming_attribute() {
    let slapd = Slapd::start();
    slapd.add_person("ann", "Ann", "ann@example.com");
    slapd.add_person("bob", "Bob", "bob@example.com");
    let s = world(&slapd, "      mode: syncrepl\n      name_attribute: uid");
    s.run_once(None, 0);
    let uuid = slapd.entry_uuid(&format!("uid=ann,{PEOPLE}"));
    let by_uuid = s.idsync(&["explain", "dir", &uuid]).expect_code(0).stdout;
    let dn = format!("UID=ann,{PEOPLE}");
    let by_dn = s.idsync(&["explain", "dir", &dn]).expect_code(0).stdout;
    let by_uid = s.idsync(&["explain", "dir", "ann"]).expect_code(0).stdout;
    assert_eq!(by_dn, by_uuid);
    assert_eq!(by_uid, by_uuid);
    assert!(by_uuid.contains(&uuid), "{by_uuid}");
    let results = s.results(&["--key", &format!("uid=ann,{PEOPLE}")]);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["key"], uuid.as_str());
    s.idsync(&["failed", "list", "--key", "bob"]).expect_code(0);
    // Nobody else answers to that name.
    s.idsync(&["explain", "dir", "carol"]).expect_code(1);
}
