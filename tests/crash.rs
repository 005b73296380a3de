//! Crash safety through the real binary: `idsync run` is killed with SIGKILL at random
//! points (40 kills) while it works through a folder of dated CSV snapshots (six there from
//! the start, eight more arriving between kills), an LDAP persist stream (changes made by
//! the test between kills) and pending mails (file transport), and restarted each time. The
//! final repository must equal the one of a reference agent that was never killed and saw
//! the same inputs: the same identities (versions included), the same decision records per
//! account (every change applied exactly once), and every notification sent, each with its
//! `ID.eml` file (at least once).
//!
//! An outside reader (the `sqlite3` shell) reads the repository during every run.
//!
//! The kill points come from a small PRNG; the seed is printed, and `IDSYNC_CRASH_SEED=N`
//! replays a run.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, eventually};
use serde_json::Value;
use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};

/// xorshift64*: deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The dated HR snapshots, all in the folder from the start: hires, attribute changes, a
/// termination (h3 leaves on day 3) and a rehire (h3 back on day 5).
const DAYS: &[(&str, &str)] = &[
    (
        "hr-2026-11-01.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,clerk\nh2,Bob,bob@example.com,clerk\nh3,Cy,cy@example.com,clerk\n",
    ),
    (
        "hr-2026-11-02.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,lead\nh2,Bob,bob@example.com,clerk\nh3,Cy,cy@example.com,clerk\nh4,Di,di@example.com,intern\n",
    ),
    (
        "hr-2026-11-03.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,lead\nh2,Bob,bob@example.com,senior\nh4,Di,di@example.com,intern\n",
    ),
    (
        "hr-2026-11-04.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,lead\nh2,Bob,bob@example.com,senior\nh4,Di,di@example.com,clerk\nh5,Ed,ed@example.com,clerk\n",
    ),
    (
        "hr-2026-11-05.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,manager\nh2,Bob,bob@example.com,senior\nh3,Cy,cy@example.com,clerk\nh4,Di,di@example.com,clerk\nh5,Ed,ed@example.com,clerk\n",
    ),
    (
        "hr-2026-11-06.csv",
        "uid,cn,mail,title\nh1,Ann,ann@example.com,director\nh2,Bob,bob@example.com,senior\nh3,Cy,cy@example.com,lead\nh4,Di,di@example.com,clerk\nh5,Ed,ed@example.com,clerk\nh6,Flo,flo@example.com,final\n",
    ),
];

/// A sandbox with the flat-file folder resource `hr`, the LDAP persist resource `dir` and two
/// notification policies with the file transport.
fn world(slapd: &Slapd) -> Sandbox {
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", &format!("{SYNC_PW}\n"));
    for (name, csv) in DAYS {
        s.write(&format!("feeds/in/{name}"), csv);
    }
    s.config(&format!(
        r#"poll_interval_secs: 1
status: {{ listen: off }}
resources:
  - name: hr
    source:
      type: flatfile
      path: feeds/in
      pattern: 'hr-*.csv'
      after: leave
      completion: rename
      key: uid
    naming: 'account.uid'
    populate_global: true
  - name: dir
    source:
      type: ldap
      url: {url}
      base: {PEOPLE}
      filter: (objectClass=inetOrgPerson)
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
      timeout_secs: 5
      mode: persist
      idle_ms: 200
    naming: 'account.uid'
    populate_global: true
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: file, dir: mail }}
  dispatch: {{ claim_lease: 1s }}
  policies:
    - name: welcome
      on: [created]
      condition: 'identity.attrs.mail != ()'
      to: ['identity.attrs.mail']
      subject: 'Welcome {{{{ identity.name }}}}'
      text: 'Hello {{{{ identity.attrs.cn }}}}'
      retry: {{ every: 200ms, max_interval: 200ms, max_age: 1h }}
    - name: changed
      on: [updated]
      condition: 'identity.attrs.mail != ()'
      to: ['identity.attrs.mail']
      subject: 'Changed {{{{ identity.name }}}}: {{{{ changed | join(",") }}}}'
      text: 'Title {{{{ identity.attrs.title }}}}'
      retry: {{ every: 200ms, max_interval: 200ms, max_age: 1h }}
"#,
        url = slapd.url()
    ));
    s
}

/// A long-running `idsync run`.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(s: &Sandbox, env: &[(&str, &str)]) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .arg("run")
            .current_dir(s.path())
            .env_remove("IDSYNC_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(s.path().join("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        Agent { child }
    }

    /// SIGKILL.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; the agent must stop cleanly (exit 0).
    fn terminate(mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(code) = self.child.try_wait().unwrap() {
                assert_eq!(code.code(), Some(0), "exit status after SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn outbox(s: &Sandbox) -> Vec<Value> {
    s.json(&["outbox", "list", "--json"])
}

/// Decision records as `(resource, key) → [op, ...]`, oldest first.
fn decisions(s: &Sandbox) -> BTreeMap<(String, String), Vec<String>> {
    let mut all = s.results(&["-n", "100000"]);
    all.sort_by_key(|r| r["id"].as_i64());
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in all {
        out.entry((
            r["resource"].as_str().unwrap_or("").to_owned(),
            r["key"].as_str().unwrap_or("").to_owned(),
        ))
        .or_default()
        .push(r["op"].as_str().unwrap_or("").to_owned());
    }
    out
}

/// How many decision records one account has.
fn records_of(s: &Sandbox, key: &str) -> usize {
    s.results(&["--key", key]).len()
}

/// The outbox as a sorted list of `(policy, identity, subject, status)`.
fn mails(s: &Sandbox) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = outbox(s)
        .iter()
        .map(|m| {
            (
                m["policy"].as_str().unwrap_or("").to_owned(),
                m["identity"].as_str().unwrap_or("").to_owned(),
                m["mail"]["subject"].as_str().unwrap_or("").to_owned(),
                m["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// One LDAP change: the LDIF, the entry (uid) it touches, and how many decision records that
/// entry's account has once it is applied.
struct Change {
    uid: String,
    ldif: String,
    records_after: usize,
}

fn person(uid: &str, title: &str) -> String {
    format!(
        "dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@example.com\ntitle: {title}\n\n"
    )
}

fn retitle(uid: &str, title: &str) -> String {
    format!("dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: {title}\n\n")
}

fn remove(uid: &str) -> String {
    format!("dn: uid={uid},{PEOPLE}\nchangetype: delete\n\n")
}

/// About three dozen changes: people added, retitled (twice) and some deleted, interleaved.
fn changes() -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    let mut push = |uid: String, ldif: String| {
        let records_after = out.iter().filter(|c| c.uid == uid).count() + 1;
        out.push(Change {
            uid,
            ldif,
            records_after,
        });
    };
    for k in 1..=14 {
        push(format!("l{k}"), person(&format!("l{k}"), "engineer"));
        if k > 2 {
            let uid = format!("l{}", k - 2);
            push(uid.clone(), retitle(&uid, &format!("senior {k}")));
        }
        if k > 4 && k % 3 == 0 {
            let uid = format!("l{}", k - 4);
            push(uid.clone(), remove(&uid));
        } else if k > 4 {
            let uid = format!("l{}", k - 4);
            push(uid.clone(), retitle(&uid, &format!("lead {k}")));
        }
    }
    out
}

/// Whether the newest HR file is in: h1 has its title.
fn hr_done(s: &Sandbox, h1_title: &str) -> bool {
    s.identity("h1")
        .is_some_and(|i| common::attr(&i, "title") == Some(h1_title))
}

/// A day written during the run: h1's title changes, someone is hired, and on odd days the
/// previous day's hire leaves again.
fn later_day(day: usize) -> (String, String) {
    let mut csv = String::from(DAYS.last().unwrap().1);
    csv = csv.replace(
        "h1,Ann,ann@example.com,director",
        &format!("h1,Ann,ann@example.com,day {day}"),
    );
    for d in 7..=day {
        if d == day || d % 2 == 0 {
            csv.push_str(&format!("n{d},New{d},n{d}@example.com,day {d}\n"));
        }
    }
    (format!("hr-2026-11-{day:02}.csv"), csv)
}

/// Quiescent: the last HR file is in, `ldap_records` decision records of the directory
/// accounts are there, and every message is sent.
fn quiescent(s: &Sandbox, ldap_records: usize, h1_title: &str) -> bool {
    if !hr_done(s, h1_title) {
        return false;
    }
    let dir = s.results(&["--resource", "dir", "-n", "100000"]).len();
    if dir < ldap_records {
        return false;
    }
    let ob = outbox(s);
    !ob.is_empty() && ob.iter().all(|m| m["status"] == "sent")
}

/// Whether the crashed repository still has work to do: HR files not all in, a made LDAP
/// change not applied, or a message not sent.
fn outstanding(
    s: &Sandbox,
    made: &[Change],
    uuids: &BTreeMap<String, String>,
    h1_title: &str,
) -> bool {
    if !hr_done(s, h1_title) {
        return true;
    }
    if let Some(ch) = made.last()
        && records_of(s, &uuids[&ch.uid]) < ch.records_after
    {
        return true;
    }
    outbox(s).iter().any(|m| m["status"] != "sent")
}

/// Reads the repository with the `sqlite3` shell, as an operator would; the file may not
/// exist yet at the first start.
fn outside_read(s: &Sandbox) {
    if !s.db().exists() {
        return;
    }
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(s.db())
        .arg("SELECT count(*) FROM identities")
        .output()
        .expect("the sqlite3 shell (Debian package sqlite3) runs");
    assert!(
        out.status.success(),
        "sqlite3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `identities export`, sorted by name.
fn export(s: &Sandbox) -> Vec<Value> {
    let mut v = s.export();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    v
}

#[test]
fn sigkill_at_random_points_changes_nothing() {
    let started = Instant::now();
    let seed: u64 = std::env::var("IDSYNC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash test seed: {seed} (IDSYNC_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    let slapd = Slapd::start();
    let reference = world(&slapd);
    let crashed = world(&slapd);

    // The reference agent is never killed; it sees every LDAP change, one at a time, as the
    // crashed one does.
    let ref_agent = Agent::start(&reference, &[]);

    let plan = changes();
    let mut uuids: BTreeMap<String, String> = BTreeMap::new();
    let mut next = 0usize; // the next change to make
    let mut kills = 0usize;
    let mut fault_exits = 0usize;
    // Fault exits the test waited for (a mail was waiting when the random kill came).
    let mut waited_exits = 0usize;
    // Kills after which work was still outstanding (HR files, an LDAP change or a mail): the
    // ones that can have interrupted something. Too few would make the test vacuous.
    let mut interrupting = 0usize;
    let mut h1_title = String::from("director");

    while kills < 40 || next < plan.len() {
        assert!(kills < 200, "the LDAP changes did not get through");
        // The next LDAP change, once the previous one is applied in both repositories (so
        // both see each change in its own sync, and the decision records can be compared).
        if next < plan.len() {
            let applied = next == 0 || {
                let prev = &plan[next - 1];
                let key = &uuids[&prev.uid];
                records_of(&crashed, key) >= prev.records_after
                    && records_of(&reference, key) >= prev.records_after
            };
            if applied {
                let ch = &plan[next];
                slapd.modify(&ch.ldif);
                uuids
                    .entry(ch.uid.clone())
                    .or_insert_with(|| slapd.entry_uuid(&format!("uid={},{PEOPLE}", ch.uid)));
                next += 1;
            }
        }
        // Every fourth iteration a new dated HR file arrives (days 7 to 14).
        if kills % 4 == 1 && kills / 4 < 8 {
            let day = 7 + kills / 4;
            let (name, csv) = later_day(day);
            for sb in [&reference, &crashed] {
                sb.replace_atomically(&format!("feeds/in/{name}"), &csv);
            }
            h1_title = format!("day {day}");
        }
        // Every fifth start also crashes right after sending mail, before recording it.
        let fault = kills % 5 == 4;
        let agent = if fault {
            Agent::start(&crashed, &[("IDSYNC_FAULT", "exit-after-send")])
        } else {
            Agent::start(&crashed, &[])
        };
        // An operator's reader looks at the repository while the agent works (its close
        // must never take the agent's log away: see tests/repository.rs).
        let before_read = rng.below(200);
        std::thread::sleep(Duration::from_millis(before_read));
        outside_read(&crashed);
        std::thread::sleep(Duration::from_millis(
            rng.below(400).saturating_sub(before_read),
        ));
        let mut agent = agent;
        // A faulty agent still running with a mail waiting must send it and exit (86)
        // before recording it. (A claim left by an agent killed before lapses after its
        // lease, 1 s.)
        if fault
            && agent.child.try_wait().unwrap().is_none()
            && outbox(&crashed).iter().any(|m| m["status"] != "sent")
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            while agent.child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "a faulty agent with a mail waiting did not send it and exit"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            waited_exits += 1;
        }
        // Only the fault exit (86, right after a send, before recording it) may end an
        // agent before the kill; any other exit is a crash of its own.
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(
                fault && status.code() == Some(86),
                "start {kills} (IDSYNC_FAULT: {fault}) exited on its own ({status}):\n{}",
                std::fs::read_to_string(crashed.path().join("agent.log")).unwrap_or_default()
            );
            fault_exits += 1;
        }
        agent.kill();
        kills += 1;
        if outstanding(&crashed, &plan[..next], &uuids, &h1_title) {
            interrupting += 1;
        }
    }
    // Each LDAP change is one decision record.
    let ldap_records = plan.len();
    println!(
        "{kills} SIGKILLs ({interrupting} with work outstanding, {fault_exits} exits after a send before, {waited_exits} of them waited for) in {:?}",
        started.elapsed()
    );
    // The crash between sending a mail and recording it happened (else the "at least once,
    // never lost" check of the outbox below proves nothing about it).
    assert!(
        fault_exits >= 1,
        "no start with IDSYNC_FAULT=exit-after-send sent a mail and exited"
    );
    assert!(
        interrupting >= 10,
        "only {interrupting} kills left work outstanding"
    );

    assert_eq!(h1_title, "day 14");
    // A clean agent finishes the work; both repositories settle.
    let last = plan.last().unwrap();
    let last_key = uuids[&last.uid].clone();
    let agent = Agent::start(&crashed, &[]);
    for s in [&crashed, &reference] {
        eventually(40, "the last LDAP change", || {
            (records_of(s, &last_key) >= last.records_after).then_some(())
        });
        eventually(40, "quiescence", || {
            quiescent(s, ldap_records, &h1_title).then_some(())
        });
    }
    agent.terminate();
    ref_agent.terminate();

    // The same identities, versions included.
    let want = export(&reference);
    let got = export(&crashed);
    let identities = got.len();
    assert!(want.iter().all(|i| i["version"].is_u64()), "{want:?}");
    assert_eq!(want.len(), got.len(), "identity count");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g, "identity {} differs", w["name"]);
    }

    // Every change applied exactly once: the same decision records per account.
    let want = decisions(&reference);
    let got = decisions(&crashed);
    assert_eq!(want, got, "decision records per (resource, key)");
    // The HR lifecycle is what the files say (termination and rehire included).
    let h3 = &want[&("hr".to_owned(), "h3".to_owned())];
    assert_eq!(h3, &["upsert", "delete", "create", "update"], "h3: {h3:?}");

    // Every mail sent, with its file (at least once: a resend rewrites the same ID.eml,
    // whose Message-ID is derived from the row).
    let want = mails(&reference);
    let got = mails(&crashed);
    assert_eq!(want, got, "the outbox");
    let rows = outbox(&crashed);
    for m in &rows {
        let id = m["id"].as_i64().unwrap();
        let path = crashed.path().join("mail").join(format!("{id}.eml"));
        let eml =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            eml.contains(&format!("<idsync.{id}.")),
            "{}: Message-ID of row {id}\n{eml}",
            path.display()
        );
    }
    let files = std::fs::read_dir(crashed.path().join("mail"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .count();
    assert_eq!(files, rows.len(), "one mail file per outbox row");
    println!(
        "{identities} identities, {} messages, {kills} kills, {:?} in all",
        rows.len(),
        started.elapsed()
    );
}
