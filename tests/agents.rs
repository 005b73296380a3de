//! Several agents on one PostgreSQL repository, through the real binary: each in a folder
//! of its own (its config, lock and status file), all pointing at one private PostgreSQL
//! database and at the same feed files. Resources are shared out by leases; a killed holder
//! is replaced within its lease time; a paused one commits nothing once it woke up.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Sandbox, eventually};
use idsync_testkit::postgres::Postgres;
use serde_json::Value;

/// Lease time of the tests (production default 30 s).
const LEASE_SECS: u64 = 2;

/// The config of agent `name`: two flat-file resources read from `feeds` (shared), parts
/// of 200 rows, the production poll interval (the feeds wake the holder).
fn config(url: &str, name: &str, feeds: &Path, slow: bool) -> String {
    let feeds = feeds.display();
    let rules = if slow {
        "\n    rules: { filter: slow.rhai }"
    } else {
        ""
    };
    format!(
        "repository: {{ url: \"{url}\", lease_secs: {LEASE_SECS}, agent_name: {name} }}
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: {feeds}/hr.csv, key: id, completion: rename, batch_size: 200 }}
    naming: '\"h\" + account.id'{rules}
    mappings:
      - {{ to: title, from: title }}
  - name: contractors
    source: {{ type: flatfile, path: {feeds}/contractors.csv, key: id, completion: rename, batch_size: 200 }}
    naming: '\"c\" + account.id'
    mappings:
      - {{ to: title, from: title }}
"
    )
}

/// Agents sharing one database.
struct Cluster {
    pg: Postgres,
    feeds: tempfile::TempDir,
    sandboxes: Vec<Sandbox>,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// `agents` agents; with `slow`, every hr event costs some work (a pass spans seconds).
    fn new(agents: usize, slow: bool) -> Cluster {
        let pg = Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let feeds = tempfile::tempdir().unwrap();
        let sandboxes: Vec<Sandbox> = (0..agents)
            .map(|i| {
                let s = Sandbox::new();
                s.config(&config(
                    &pg.url("idsync"),
                    &format!("agent-{i}"),
                    feeds.path(),
                    slow,
                ));
                s.rule(
                    "slow.rhai",
                    "let n = 0;\nfor i in 0..20000 { n += i; }\nn > 0",
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
        let name = holder.split('/').next()?;
        let index = name.strip_prefix("agent-")?.parse().ok()?;
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

/// Three agents, two resources: the leases are shared out, each resource has one holder;
/// the holder of a resource is killed with SIGKILL at a random point of a pass, again and
/// again, and restarted each time: every kill is followed by a takeover within the lease
/// time, the identities end as the feeds say, and every change is recorded exactly once
/// (a part rolled back by a kill is decided again by the successor, never twice).
#[test]
fn killed_holders_are_replaced_within_their_lease_and_every_change_is_applied_once() {
    const KILLS: usize = 12;
    const ROWS: usize = 1500;
    let mut cluster = Cluster::new(3, false);
    let (hr0, _) = version(0, ROWS, 3);
    let (ct0, _) = version(0, ROWS / 3, 5);
    cluster.feed("hr.csv", &hr0);
    cluster.feed("contractors.csv", &ct0);
    for i in 0..3 {
        cluster.start(i);
    }
    eventually(60, "both resources held", || {
        Some(())
            .filter(|()| cluster.holder("hr").is_some() && cluster.holder("contractors").is_some())
    });
    // Every change the feeds made, per account: how many decision records should change it.
    let mut expected_changes: BTreeMap<(String, String), usize> = BTreeMap::new();
    let count_version = |changes: &mut BTreeMap<(String, String), usize>,
                         resource: &str,
                         before: Option<&BTreeMap<String, String>>,
                         after: &BTreeMap<String, String>| {
        for (key, title) in after {
            if before.and_then(|b| b.get(key)) != Some(title) {
                *changes
                    .entry((resource.to_owned(), key.clone()))
                    .or_default() += 1;
            }
        }
    };
    let (_, hr_titles0) = version(0, ROWS, 3);
    let (_, ct_titles0) = version(0, ROWS / 3, 5);
    count_version(&mut expected_changes, "hr", None, &hr_titles0);
    count_version(&mut expected_changes, "contractors", None, &ct_titles0);
    let wait_applied =
        |cluster: &Cluster, hr: &BTreeMap<String, String>, ct: &BTreeMap<String, String>| {
            let want: BTreeMap<String, String> = hr
                .iter()
                .map(|(k, t)| (format!("h{k}"), t.clone()))
                .chain(ct.iter().map(|(k, t)| (format!("c{k}"), t.clone())))
                .collect();
            eventually(120, "the feeds applied", || {
                (cluster.titles() == want).then_some(())
            });
        };
    wait_applied(&cluster, &hr_titles0, &ct_titles0);

    let mut previous = (hr_titles0, ct_titles0);
    let mut takeovers = Vec::new();
    for k in 1..=KILLS {
        let resource = if k % 3 == 0 { "contractors" } else { "hr" };
        let (hr_csv, hr_titles) = version(k, ROWS, 3);
        let (ct_csv, ct_titles) = version(k, ROWS / 3, 5);
        let (victim, token) = cluster.holder(resource).expect("a holder");
        cluster.feed("hr.csv", &hr_csv);
        cluster.feed("contractors.csv", &ct_csv);
        // A random point of the pass the new feeds start.
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
        count_version(&mut expected_changes, "hr", Some(&previous.0), &hr_titles);
        count_version(
            &mut expected_changes,
            "contractors",
            Some(&previous.1),
            &ct_titles,
        );
        wait_applied(&cluster, &hr_titles, &ct_titles);
        previous = (hr_titles, ct_titles);
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

    // Every change recorded exactly once: one decision that changed the account per
    // version that changed it.
    let mut recorded: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in cluster.sandboxes[0].results(&[]) {
        let changed = r["changes"].as_array().is_some_and(|c| !c.is_empty());
        if changed {
            *recorded
                .entry((
                    r["resource"].as_str().unwrap().to_owned(),
                    r["key"].as_str().unwrap().to_owned(),
                ))
                .or_default() += 1;
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
        "(account, expected, recorded): {differing:?}"
    );
    assert_eq!(recorded.len(), expected_changes.len());
}

/// An agent stopped with SIGSTOP in the middle of a pass, past its lease: another agent
/// takes the resource over and applies the feed; woken with SIGCONT, the paused agent's
/// batch is fenced off at its commit (nothing of it is recorded), and it stands by.
#[test]
fn a_paused_holder_commits_nothing_once_its_lease_passed_on() {
    const ROWS: usize = 6000;
    let mut cluster = Cluster::new(2, true);
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
