//! Several agents on one PostgreSQL repository, through the real binary: each in a folder
//! of its own (its config, lock and status file), all pointing at one private PostgreSQL
//! database, the same feed files, a private OpenLDAP server and a real SMTP server (aiosmtpd).
//! Resources are shared out by leases; a killed holder is replaced within its lease time; a
//! paused one commits nothing once it woke up.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Sandbox, SmtpServer, eventually};
use idsync_testkit::postgres::Postgres;
use serde_json::Value;
use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};

/// Lease time of the tests (production default 30 s).
const LEASE_SECS: u64 = 2;

/// What the agents of a cluster are pointed at besides the database and the feeds.
#[derive(Clone, Copy)]
struct Extras<'a> {
    /// Every hr event costs some work (a pass spans seconds).
    slow: bool,
    /// An LDAP persist resource `dir` on this server.
    ldap: Option<&'a Slapd>,
    /// Notifications over SMTP to this port: a mail for every changed contractor.
    smtp_port: Option<u16>,
}

/// The config of agent `name`: two flat-file resources read from `feeds` (shared), parts
/// of 200 rows, the production poll interval (the feeds wake the holder); optionally a
/// directory and mail.
fn config(url: &str, name: &str, feeds: &Path, extras: Extras<'_>) -> String {
    let feeds_shown = feeds.display();
    let rules = if extras.slow {
        "\n    rules: { filter: slow.rhai }"
    } else {
        ""
    };
    let mut yaml = format!(
        "repository: {{ url: \"{url}\", lease_secs: {LEASE_SECS}, agent_name: {name} }}
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: {feeds_shown}/hr.csv, key: id, completion: rename, batch_size: 200 }}
    naming: '\"h\" + account.id'{rules}
    mappings:
      - {{ to: title, from: title }}
  - name: contractors
    source: {{ type: flatfile, path: {feeds_shown}/contractors.csv, key: id, completion: rename, batch_size: 200 }}
    naming: '\"c\" + account.id'
    mappings:
      - {{ to: title, from: title }}
"
    );
    if let Some(ldap) = extras.ldap {
        yaml.push_str(&format!(
            "  - name: dir
    source:
      type: ldap
      url: {url}
      base: {PEOPLE}
      filter: (objectClass=inetOrgPerson)
      bind_dn: {SYNC_DN}
      bind_password_file: {feeds_shown}/ldap.pw
      timeout_secs: 5
      mode: persist
      idle_ms: 200
    naming: '\"d\" + account.uid'
    mappings:
      - {{ to: title, from: title }}
",
            url = ldap.url()
        ));
    }
    if let Some(port) = extras.smtp_port {
        yaml.push_str(&format!(
            r#"notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s }}
  dispatch: {{ claim_lease: 2s }}
  policies:
    - name: changed
      on: [updated]
      condition: 'identity.name.starts_with("c")'
      to: ['"ops@example.com"']
      subject: 'Changed {{{{ identity.name }}}} to {{{{ identity.attrs.title }}}}'
      text: 'Title {{{{ identity.attrs.title }}}}'
      retry: {{ every: 200ms, max_interval: 200ms, max_age: 1h }}
"#
        ));
    }
    yaml
}

/// Agents sharing one database.
struct Cluster {
    pg: Postgres,
    feeds: tempfile::TempDir,
    sandboxes: Vec<Sandbox>,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// `agents` agents pointed at `extras`.
    fn new(agents: usize, extras: Extras<'_>) -> Cluster {
        let pg = Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let feeds = tempfile::tempdir().unwrap();
        std::fs::write(feeds.path().join("ldap.pw"), format!("{SYNC_PW}\n")).unwrap();
        let sandboxes: Vec<Sandbox> = (0..agents)
            .map(|i| {
                let s = Sandbox::new();
                s.config(&config(
                    &pg.url("idsync"),
                    &format!("agent-{i}"),
                    feeds.path(),
                    extras,
                ));
                s.rule(
                    "slow.rhai",
                    "let n = 0;\nfor i in 0..10000 { n += i; }\nn > 0",
                );
                s
            })
            .collect();
        let children = (0..agents).map(|_| None).collect();
        Cluster {
            pg,
            feeds,
            sandboxes,
            children,
        }
    }

    fn start(&mut self, i: usize) {
        self.children[i] = Some(self.sandboxes[i].start_logged(&[]));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Writes a feed atomically (the writer renames it into place).
    fn feed(&self, name: &str, csv: &str) {
        let tmp = self.feeds.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, csv).unwrap();
        std::fs::rename(tmp, self.feeds.path().join(name)).unwrap();
    }

    /// `idsync status --json` from agent 0's folder.
    fn status(&self) -> Value {
        let out = self.sandboxes[0]
            .idsync(&["status", "--json"])
            .expect_code(0);
        serde_json::from_str(out.stdout.trim()).unwrap()
    }

    /// The live lease of `resource`: (agent index, token).
    fn holder(&self, resource: &str) -> Option<(usize, i64)> {
        let status = self.status();
        let lease = status["leases"]
            .as_array()?
            .iter()
            .find(|l| l["resource"] == resource && l["expired"] == false)?
            .clone();
        let holder = lease["holder"].as_str()?;
        let index = holder.strip_prefix("agent-")?.parse().ok()?;
        Some((index, lease["token"].as_i64()?))
    }

    /// Identities as `identities export` shows them: name → title.
    fn titles(&self) -> BTreeMap<String, String> {
        self.sandboxes[0]
            .export()
            .into_iter()
            .map(|i| {
                let title = common::attr(&i, "title").unwrap_or_default().to_owned();
                (i["name"].as_str().unwrap().to_owned(), title)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Version `v` of a feed of `n` accounts: every account whose id is a multiple of `every`
/// changes its title at each version, the others keep theirs; `n` grows by the version.
fn version(v: usize, n: usize, every: usize) -> (String, BTreeMap<String, String>) {
    let mut csv = String::from("id,title\n");
    let mut titles = BTreeMap::new();
    for id in 0..n + v * 10 {
        let title = if id % every == 0 {
            format!("T{v}")
        } else {
            "Staff".to_owned()
        };
        csv.push_str(&format!("{id},{title}\n"));
        titles.insert(id.to_string(), title);
    }
    (csv, titles)
}

/// The title of directory person `uid` at version `v`: people 0 to 7 exist from the start,
/// one more arrives at each version, and person `v % 8` changes title at version `v`.
fn person_title(uid: usize, v: usize) -> String {
    let changed_at: Vec<usize> = (1..=v).filter(|k| k % 8 == uid).collect();
    match changed_at.last() {
        Some(k) => format!("D{k}"),
        None => "Member".to_owned(),
    }
}

/// Three agents, two CSV resources and a directory (LDAP persist), mail for every changed
/// contractor over SMTP: the leases are shared out, each resource has one holder. The
/// holder of a resource is killed with SIGKILL at a random point (the feeds and the
/// directory having just changed), twenty times, and restarted each time: every kill is
/// followed by a takeover within the lease time; the identities end as the sources say;
/// every change is recorded exactly once (a part rolled back by a kill is decided again by
/// the successor, never twice); every mail reaches the SMTP server, none is lost.
#[test]
fn killed_holders_are_replaced_within_their_lease_and_every_change_is_applied_once() {
    const KILLS: usize = 20;
    const ROWS: usize = 1200;
    const PEOPLE_AT_START: usize = 8;
    let ldap = Slapd::start();
    let smtp_port = common::free_port();
    let mut cluster = Cluster::new(
        3,
        Extras {
            slow: false,
            ldap: Some(&ldap),
            smtp_port: Some(smtp_port),
        },
    );
    let mut smtp = SmtpServer::on_port(&cluster.feeds.path().join("smtp"), smtp_port);
    smtp.start();
    let set_person = |uid: usize, v: usize| {
        let title = person_title(uid, v);
        if v == 0 || uid == PEOPLE_AT_START + v - 1 {
            ldap.modify(&format!(
                "dn: uid=p{uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: p{uid}\ncn: P{uid}\n\
                 sn: P{uid}\ntitle: {title}\n\n"
            ));
        } else {
            ldap.modify(&format!(
                "dn: uid=p{uid},{PEOPLE}\nchangetype: modify\nreplace: title\ntitle: {title}\n\n"
            ));
        }
    };
    for uid in 0..PEOPLE_AT_START {
        set_person(uid, 0);
    }
    let people = |v: usize| -> BTreeMap<String, String> {
        (0..PEOPLE_AT_START + v)
            .map(|uid| (format!("p{uid}"), person_title(uid, v)))
            .collect()
    };
    let (hr0, hr_titles0) = version(0, ROWS, 3);
    let (ct0, ct_titles0) = version(0, ROWS / 3, 5);
    cluster.feed("hr.csv", &hr0);
    cluster.feed("contractors.csv", &ct0);
    for i in 0..3 {
        cluster.start(i);
    }
    eventually(60, "every resource held", || {
        ["hr", "contractors", "dir"]
            .iter()
            .all(|r| cluster.holder(r).is_some())
            .then_some(())
    });
    // Every change the sources made, per identity: how many decision records change it.
    let mut expected_changes: BTreeMap<String, usize> = BTreeMap::new();
    // The subjects of the mails every contractor update must send.
    let mut expected_mail: Vec<String> = Vec::new();
    let mut count = |prefix: &str,
                     before: Option<&BTreeMap<String, String>>,
                     after: &BTreeMap<String, String>,
                     mail: &mut Vec<String>| {
        for (key, title) in after {
            let old = before.and_then(|b| b.get(key));
            if old != Some(title) {
                let name = format!("{prefix}{key}");
                *expected_changes.entry(name.clone()).or_default() += 1;
                if prefix == "c" && old.is_some() {
                    mail.push(format!("Changed {name} to {title}"));
                }
            }
        }
    };
    count("h", None, &hr_titles0, &mut expected_mail);
    count("c", None, &ct_titles0, &mut expected_mail);
    count("d", None, &people(0), &mut expected_mail);
    let wait_applied = |cluster: &Cluster,
                        v: usize,
                        hr: &BTreeMap<String, String>,
                        ct: &BTreeMap<String, String>| {
        let want: BTreeMap<String, String> = hr
            .iter()
            .map(|(k, t)| (format!("h{k}"), t.clone()))
            .chain(ct.iter().map(|(k, t)| (format!("c{k}"), t.clone())))
            .chain(people(v).into_iter().map(|(k, t)| (format!("d{k}"), t)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = cluster.titles();
            if got == want {
                break;
            }
            if Instant::now() > deadline {
                let wrong: Vec<_> = want
                    .iter()
                    .filter(|(k, t)| got.get(*k) != Some(*t))
                    .take(10)
                    .map(|(k, t)| (k, t, got.get(k)))
                    .collect();
                for (i, sb) in cluster.sandboxes.iter().enumerate() {
                    eprintln!("--- agent-{i} log:\n{}", sb.agent_log());
                }
                panic!("version {v} not applied after 120 s: (identity, wanted, found) {wrong:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_applied(&cluster, 0, &hr_titles0, &ct_titles0);

    let mut previous = (hr_titles0, ct_titles0, people(0));
    let mut takeovers = Vec::new();
    for k in 1..=KILLS {
        let resource = ["hr", "contractors", "dir"][k % 3];
        let (hr_csv, hr_titles) = version(k, ROWS, 3);
        let (ct_csv, ct_titles) = version(k, ROWS / 3, 5);
        let (victim, token) = cluster.holder(resource).expect("a holder");
        cluster.feed("hr.csv", &hr_csv);
        cluster.feed("contractors.csv", &ct_csv);
        set_person(PEOPLE_AT_START + k - 1, k);
        if k % 8 < PEOPLE_AT_START + k - 1 {
            set_person(k % 8, k);
        }
        // A random point of the passes the changes start.
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..600)));
        cluster.kill(victim);
        let killed = Instant::now();
        let (successor, new_token) = eventually(30, "a takeover", || {
            cluster
                .holder(resource)
                .filter(|(i, t)| *i != victim && *t > token)
        });
        takeovers.push(killed.elapsed());
        assert_ne!(successor, victim);
        assert!(new_token > token);
        cluster.start(victim);
        count("h", Some(&previous.0), &hr_titles, &mut expected_mail);
        count("c", Some(&previous.1), &ct_titles, &mut expected_mail);
        count("d", Some(&previous.2), &people(k), &mut expected_mail);
        wait_applied(&cluster, k, &hr_titles, &ct_titles);
        previous = (hr_titles, ct_titles, people(k));
    }
    let slowest = takeovers.iter().max().unwrap();
    println!("takeovers after a kill: {takeovers:?}");
    // Expiry (at most the lease time after the last renewal) plus one round of the
    // standby (a third of it), plus the status polling.
    let bound = Duration::from_millis(LEASE_SECS * 1000 * 4 / 3 + 700);
    assert!(
        *slowest <= bound,
        "a takeover took {slowest:?} (bound {bound:?})"
    );

    // Every change recorded exactly once: one decision that changed the identity per
    // version that changed it.
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    for r in cluster.sandboxes[0].results(&[]) {
        let changed = r["changes"].as_array().is_some_and(|c| !c.is_empty());
        if changed && let Some(name) = r["identity"].as_str() {
            *recorded.entry(name.to_owned()).or_default() += 1;
        }
    }
    let differing: Vec<_> = expected_changes
        .iter()
        .filter(|(k, n)| recorded.get(*k) != Some(*n))
        .take(10)
        .map(|(k, n)| (k.clone(), *n, recorded.get(k).copied()))
        .collect();
    assert!(
        differing.is_empty(),
        "(identity, expected, recorded): {differing:?}"
    );
    assert_eq!(recorded.len(), expected_changes.len());

    // Every mail sent at least once: each expected subject arrived.
    let subjects = || -> std::collections::BTreeSet<String> {
        smtp.received()
            .iter()
            .filter_map(|m| {
                m.headers()
                    .into_iter()
                    .find(|(h, _)| h.eq_ignore_ascii_case("subject"))
                    .map(|(_, v)| v)
            })
            .collect()
    };
    eventually(60, "every mail delivered", || {
        let got = subjects();
        expected_mail.iter().all(|m| got.contains(m)).then_some(())
    });
    println!(
        "mails expected {}, received {} (duplicates allowed: at least once)",
        expected_mail.len(),
        smtp.received().len()
    );
}

/// An agent stopped with SIGSTOP in the middle of a pass, past its lease: another agent
/// takes the resource over and applies the feed; woken with SIGCONT, the paused agent's
/// batch is fenced off at its commit (nothing of it is recorded), and it stands by.
#[test]
fn a_paused_holder_commits_nothing_once_its_lease_passed_on() {
    const ROWS: usize = 2400;
    let mut cluster = Cluster::new(
        2,
        Extras {
            slow: true,
            ldap: None,
            smtp_port: None,
        },
    );
    cluster.feed("hr.csv", "id,title\n");
    cluster.feed("contractors.csv", "id,title\n");
    cluster.start(0);
    eventually(30, "agent-0 holds hr", || {
        (cluster.holder("hr").map(|h| h.0) == Some(0)).then_some(())
    });
    cluster.start(1);
    let (csv, titles) = version(1, ROWS, 2);
    cluster.feed("hr.csv", &csv);
    // Paused once its first part is committed, with the next in hand.
    eventually(30, "a first part of agent-0", || {
        let n = cluster.titles().len();
        (n > 0 && n < titles.len()).then_some(())
    });
    let pid = cluster.children[0].as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    eventually(30, "agent-1 takes hr over", || {
        (cluster.holder("hr").map(|h| h.0) == Some(1)).then_some(())
    });
    let want: BTreeMap<String, String> = titles
        .iter()
        .map(|(k, t)| (format!("h{k}"), t.clone()))
        .collect();
    eventually(120, "agent-1 applies the feed", || {
        (cluster.titles() == want).then_some(())
    });
    signal("-CONT");
    eventually(30, "agent-0 sees its lease lost", || {
        cluster.sandboxes[0]
            .agent_log()
            .contains("lease lost")
            .then_some(())
    });
    // One decision per account: nothing of the paused agent's part was committed.
    let results = cluster.sandboxes[1].results(&["--resource", "hr"]);
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        *per_key
            .entry(r["key"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_key.len(), titles.len());
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).take(5).collect();
    if !twice.is_empty() {
        let k = twice[0].0.clone();
        for r in results.iter().filter(|r| r["key"] == k.as_str()) {
            eprintln!("RECORD {r}");
        }
        eprintln!("LOG0 {}", cluster.sandboxes[0].agent_log());
        eprintln!("LOG1 {}", cluster.sandboxes[1].agent_log());
    }
    assert!(twice.is_empty(), "decided twice: {twice:?}");
    assert_eq!(cluster.holder("hr").map(|h| h.0), Some(1));
    let _ = &cluster.pg;
}

/// `idsync run --once` on a shared repository passes only the resources whose lease it can
/// take: while an agent runs them (its `/readyz` names them) it leaves them alone, saying
/// so, and `idsync reconcile` refuses; once that agent stopped cleanly (giving its leases
/// back) `run --once` passes them at once.
#[test]
fn run_once_leaves_a_resource_to_the_agent_that_holds_it() {
    let mut cluster = Cluster::new(
        2,
        Extras {
            slow: false,
            ldap: None,
            smtp_port: None,
        },
    );
    cluster.feed("hr.csv", "id,title\n1,Clerk\n");
    cluster.feed("contractors.csv", "id,title\n1,Temp\n");
    // Agent 0 with its status endpoint: /readyz says what it runs.
    let port = common::free_port();
    let extras = Extras {
        slow: false,
        ldap: None,
        smtp_port: None,
    };
    cluster.sandboxes[0].config(
        &config(
            &cluster.pg.url("idsync"),
            "agent-0",
            cluster.feeds.path(),
            extras,
        )
        .replace(
            "status: { listen: off }",
            &format!("status: {{ listen: \"127.0.0.1:{port}\" }}"),
        ),
    );
    cluster.start(0);
    eventually(30, "agent-0 applies both feeds", || {
        (cluster.titles().len() == 2).then_some(())
    });
    let (code, body) = common::http_get(port, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("agent: agent-0") && body.contains("runs: contractors, hr"),
        "{body}"
    );
    let out = cluster.sandboxes[1].run_once(None, 0);
    assert!(
        out.stdout
            .contains("hr: skipped: another agent holds its lease")
            && out
                .stdout
                .contains("contractors: skipped: another agent holds its lease"),
        "{}",
        out.stdout
    );
    // A reconcile is refused while another agent holds the resource.
    let out = cluster.sandboxes[1].idsync(&["reconcile", "hr"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("hr: another agent holds its lease"),
        "{}",
        out.stderr
    );
    let mut child = cluster.children[0].take().unwrap();
    let (code, _) = common::terminate(&mut child);
    assert_eq!(code, Some(0));
    assert_eq!(cluster.holder("hr"), None, "the leases were given back");
    cluster.feed("hr.csv", "id,title\n1,Lead\n");
    let out = cluster.sandboxes[1].run_once(None, 0);
    assert!(out.stdout.contains("hr: 1 event"), "{}", out.stdout);
    assert_eq!(cluster.titles().get("h1").map(String::as_str), Some("Lead"));
}

/// The database restarts under a running agent (every session ended): the agent connects
/// again — its repository connection and its leases' — and goes on; nothing is applied twice.
#[test]
fn an_agent_goes_on_after_the_database_restarted() {
    let mut cluster = Cluster::new(
        1,
        Extras {
            slow: false,
            ldap: None,
            smtp_port: None,
        },
    );
    cluster.feed("hr.csv", "id,title\n1,Clerk\n2,Clerk\n");
    cluster.feed("contractors.csv", "id,title\n");
    cluster.start(0);
    eventually(30, "the first feed applied", || {
        (cluster.titles().len() == 2).then_some(())
    });
    cluster.pg.restart().unwrap();
    cluster.feed("hr.csv", "id,title\n1,Lead\n2,Clerk\n3,Clerk\n");
    eventually(60, "the second feed applied after the restart", || {
        let t = cluster.titles();
        (t.len() == 3 && t.get("h1").map(String::as_str) == Some("Lead")).then_some(())
    });
    assert_eq!(cluster.holder("hr").map(|h| h.0), Some(0));
    let results = cluster.sandboxes[0].results(&["--key", "1"]);
    assert_eq!(results.len(), 2, "{results:?}");
    let log = cluster.sandboxes[0].agent_log();
    assert!(log.contains("connected again"), "{log}");
    assert!(
        log.contains(&format!("repository {},", cluster.pg.url("idsync"))),
        "the start-up line names the database: {log}"
    );
}
