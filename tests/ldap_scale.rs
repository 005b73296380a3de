//! The LDAP adapter at directory scale, through the real `idsync` binary against a private
//! slapd with thousands of people: the streamed refresh reaches the repository in parts of
//! `batch_size` while the rest is still arriving, an agent killed with SIGKILL in the middle
//! of it and started again ends with every entry once and every change made meanwhile —
//! deletes included — and the sync cookie is committed only with the last part; a changed
//! mapping reaches every directory account through `idsync reconcile` (all of them, or some
//! named by DN), deletes made meanwhile included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::time::{Duration, Instant};

use common::{Sandbox, attr};
use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};

const PEOPLE_COUNT: usize = 20_000;

/// The quickstart's layout (repository beside the config) with production intervals: one
/// LDAP resource in syncrepl mode, parts of 1,000 events.
fn world(slapd: &Slapd) -> Sandbox {
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", &format!("{SYNC_PW}\n"));
    configure(&s, slapd, "");
    s.rule("has_uid.rhai", "account.uid != () && account.dn != ()");
    s
}

/// Writes the config of [`world`] with `mappings` (YAML list items) for the resource.
fn configure(s: &Sandbox, slapd: &Slapd, mappings: &str) {
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: dir
    source:
      type: ldap
      url: {}
      base: {PEOPLE}
      filter: (objectClass=inetOrgPerson)
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
      mode: syncrepl
      batch_size: 1000
    naming: 'account.uid'
    populate_global: true
    rules: {{ filter: has_uid.rhai }}
    mappings: [{mappings}]
",
        slapd.url()
    ));
}

/// The part number of a part checkpoint (`syncpart:<params>:<f|r>:<n>:…`), `None` for the
/// cookie of a finished refresh.
fn part_of(checkpoint: &str) -> Option<u64> {
    checkpoint
        .strip_prefix("syncpart:")?
        .split(':')
        .nth(2)?
        .parse()
        .ok()
}

fn count(s: &Sandbox, query: &str) -> usize {
    s.sql(query).parse().unwrap()
}

#[test]
fn a_refresh_killed_midway_resumes_with_every_entry_once_and_every_delete() {
    let t0 = Instant::now();
    let slapd = Slapd::start_with_people(PEOPLE_COUNT);
    eprintln!("slapd ready at {:?}", t0.elapsed());
    let s = world(&slapd);
    let mut agent = s.start_logged(&[]);

    // Parts commit one after the other while the refresh goes on; kill the agent once a
    // few have.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut parts_seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no third part: {}",
            s.agent_log()
        );
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited: {}",
            s.agent_log()
        );
        if !s.db().exists() {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if let Some(n) = s.checkpoint("dir").as_deref().and_then(part_of) {
            if parts_seen.last() != Some(&n) {
                parts_seen.push(n);
            }
            if n >= 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    eprintln!("killed at {:?}", t0.elapsed());
    let linked = count(&s, "SELECT count(*) FROM links WHERE resource = 'dir'");
    let part = part_of(&s.checkpoint("dir").unwrap()).expect("killed inside the refresh");
    assert!(
        (3000..PEOPLE_COUNT).contains(&linked) && linked.is_multiple_of(1000),
        "whole parts of 1,000 committed, not the whole refresh: {linked} linked at part {part}"
    );
    assert_eq!(linked as u64, part * 1000, "one part per checkpoint");

    // Meanwhile on the server: deletes of people already synced and of people not yet
    // reached, hires, and changes on both sides of where the refresh stopped.
    let synced_deleted: Vec<usize> = (0..40).collect();
    let unreached_deleted: Vec<usize> = (PEOPLE_COUNT - 40..PEOPLE_COUNT).collect();
    for i in synced_deleted.iter().chain(&unreached_deleted) {
        slapd.modify(&format!("dn: uid=p{i},{PEOPLE}\nchangetype: delete\n\n"));
    }
    for i in 0..20 {
        slapd.add_person(&format!("hire{i}"), "Hire", &format!("hire{i}@example.com"));
    }
    for i in [100, 200, 15_000, 16_000] {
        slapd.modify(&format!(
            "dn: uid=p{i},{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: Changed\n\n"
        ));
    }

    eprintln!("changes made at {:?}", t0.elapsed());
    let mut agent = s.start_logged(&[]);
    let expected = PEOPLE_COUNT - 80 + 20;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the restarted refresh did not finish: {}",
            s.agent_log()
        );
        let cp = s.checkpoint("dir").unwrap_or_default();
        if cp.starts_with("sync:") || cp.starts_with("sync64:") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    eprintln!("refresh done at {:?}", t0.elapsed());

    // Every entry once: one link and one shadow per live entry, no identity twice.
    assert_eq!(
        count(&s, "SELECT count(*) FROM links WHERE resource = 'dir'"),
        expected
    );
    assert_eq!(
        count(&s, "SELECT count(*) FROM shadows WHERE resource = 'dir'"),
        expected
    );
    assert_eq!(
        s.sql(
            "SELECT count(*) FROM (SELECT key FROM decisions WHERE resource = 'dir' \
             AND op IN ('create', 'upsert') GROUP BY key HAVING count(*) > 1)"
        ),
        "0",
        "an entry applied twice"
    );
    let identities: std::collections::HashMap<String, serde_json::Value> = s
        .export()
        .into_iter()
        .map(|i| (i["name"].as_str().unwrap().to_owned(), i))
        .collect();
    assert_eq!(
        identities.len(),
        PEOPLE_COUNT - 40 + 20,
        "one identity per person ever seen"
    );
    let identity = |name: &str| identities.get(name).cloned();
    // Every delete: the people deleted after they were synced lost their account (by
    // absence: the refresh was redone from scratch); those never reached were never linked.
    for i in &synced_deleted {
        let p = identity(&format!("p{i}")).expect("an identity stays (unlink)");
        assert!(
            p["accounts"].as_array().unwrap().is_empty(),
            "p{i} kept its deleted account: {p}"
        );
    }
    for i in &unreached_deleted {
        assert!(
            identity(&format!("p{i}")).is_none(),
            "p{i} was deleted first"
        );
    }
    assert_eq!(
        count(
            &s,
            "SELECT count(*) FROM decisions WHERE resource = 'dir' AND op = 'delete'"
        ),
        synced_deleted.len()
    );
    for i in 0..20 {
        assert!(identity(&format!("hire{i}")).is_some(), "hire{i}");
    }
    for i in [100, 200, 15_000, 16_000] {
        assert_eq!(
            attr(&identity(&format!("p{i}")).unwrap(), "title"),
            Some("Changed"),
            "p{i}"
        );
    }
    assert!(parts_seen.len() >= 2, "parts seen: {parts_seen:?}");

    // And the cookie is good: one more change arrives in a small pass.
    slapd.modify(&format!(
        "dn: uid=p500,{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: Later\n\n"
    ));
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("p500").unwrap(), "title"), Some("Later"));
}

#[test]
fn a_changed_mapping_reaches_every_directory_account_by_reconcile() {
    const N: usize = 3000;
    let slapd = Slapd::start_with_people(N);
    let s = world(&slapd);
    s.run_once(None, 0);
    assert_eq!(count(&s, "SELECT count(*) FROM links"), N);

    // A new mapping: the directory did not change, so a pass changes nothing.
    configure(&s, &slapd, "{ to: org, expr: '\"Example\"' }");
    s.run_once(None, 0);
    assert_eq!(
        count(
            &s,
            "SELECT count(*) FROM identities WHERE attrs LIKE '%\"org\"%'"
        ),
        0
    );
    // Meanwhile on the server: two leave, one changes.
    for i in [10, 20] {
        slapd.modify(&format!("dn: uid=p{i},{PEOPLE}\nchangetype: delete\n\n"));
    }
    slapd.modify(&format!(
        "dn: uid=p30,{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: Changed\n\n"
    ));

    let run = s.idsync(&["reconcile", "dir"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let with_org = count(
        &s,
        "SELECT count(*) FROM identities WHERE json_extract(attrs, '$.org') IS NOT NULL",
    );
    assert_eq!(
        with_org,
        N - 2,
        "every identity still linked has the new mapping (the two leavers were unlinked)"
    );
    assert_eq!(
        count(&s, "SELECT count(*) FROM decisions WHERE op = 'reconcile'"),
        N,
        "one reconcile decision per account, deletes included"
    );
    assert_eq!(
        count(&s, "SELECT count(*) FROM links"),
        N - 2,
        "the deletes"
    );
    let p30 = s.identity("p30").unwrap();
    assert_eq!(attr(&p30, "title"), Some("Changed"));
    // The reconcile committed the directory's cookie: the next pass finds nothing.
    let cp = s.checkpoint("dir").unwrap();
    assert!(cp.starts_with("sync:"), "{cp}");
    let before = count(&s, "SELECT count(*) FROM decisions");
    s.run_once(None, 0);
    assert_eq!(count(&s, "SELECT count(*) FROM decisions"), before);

    // Some accounts, named by DN: only they are decided again.
    configure(&s, &slapd, "{ to: org, expr: '\"Example 2\"' }");
    let dn = format!("uid=p5,{PEOPLE}");
    let run = s.idsync(&["reconcile", "dir", "--key", &dn]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(attr(&s.identity("p5").unwrap(), "org"), Some("Example 2"));
    assert_eq!(
        count(
            &s,
            "SELECT count(*) FROM identities WHERE json_extract(attrs, '$.org') = 'Example 2'"
        ),
        1
    );
    assert_eq!(
        s.checkpoint("dir").unwrap(),
        cp,
        "some accounts leave the cookie"
    );
}
