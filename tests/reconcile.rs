//! Reconciliation through the real binary: a changed mapping does not reach the identities
//! through a pass (their accounts did not change), `preview --reconcile` shows what a
//! reconcile would change with exact totals and writes nothing, `idsync reconcile` applies
//! it to every identity (or only the keys asked for) as decisions of op `reconcile`, behind
//! the accidental-delete guard; a reconcile killed between parts is finished by running it
//! again, nothing doubled and no change of the file lost; the agent reconciles at the times
//! of `reconcile: { cron }`; `check` and `status` know the schedule.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Sandbox, attr, endpoint_port, eventually, http_get, metric};

/// The resource `hr` with the given extra mappings (and resource keys) after the base ones.
fn config(s: &Sandbox, extra_mappings: &str, extra: &str) {
    s.config(&format!(
        "status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id, completion: rename }}
    naming: 'account.id'
{extra}    mappings:
      - {{ to: givenName, from: first }}
      - to: mail
        expr: 'account.first.to_lower() + \"@example.com\"'
{extra_mappings}"
    ));
}

/// The mapping the tests add: the department, absent for a row without one.
const DEPARTMENT: &str = "      - { to: department, from: dept }\n";

const SIX: &str = "id,first,dept\n1,Ann,Sales\n2,Bo,Sales\n3,Cy,IT\n4,Di,IT\n5,Ed,\n6,Flo,\n";

/// The number of decisions of op `reconcile`, read as an operator would.
fn reconcile_decisions(s: &Sandbox) -> u64 {
    s.sql("SELECT count(*) FROM decisions WHERE op = 'reconcile'")
        .parse()
        .unwrap()
}

/// Identities with their department, by name.
fn departments(s: &Sandbox) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = s
        .export()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                attr(i, "department").map(str::to_owned),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_changed_mapping_reaches_every_identity_through_preview_and_reconcile() {
    let s = Sandbox::new();
    config(&s, "", "");
    s.feed("hr.csv", SIX);
    s.run_once(None, 0);
    assert_eq!(s.export().len(), 6);

    // A new mapping: the accounts did not change, so a pass does nothing.
    config(&s, DEPARTMENT, "");
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("hr: no changes"), "{}", run.stdout);
    assert!(departments(&s).iter().all(|(_, d)| d.is_none()));

    // The preview of a reconcile lists the four identities that would change, with the
    // whole totals, and writes nothing.
    let before = std::fs::read(s.db()).unwrap();
    let records = s.sql("SELECT count(*) FROM decisions");
    let checkpoint = s.checkpoint("hr");
    let preview = s.idsync(&["preview", "--reconcile"]).expect_code(0);
    let listed: Vec<&str> = preview
        .stdout
        .lines()
        .filter(|l| l.starts_with("hr "))
        .collect();
    assert_eq!(listed.len(), 4, "{}", preview.stdout);
    for key in ["1", "2", "3", "4"] {
        assert!(
            listed.contains(
                &format!("hr {key} reconcile linked updated identity={key} changed=department")
                    .as_str()
            ),
            "{}",
            preview.stdout
        );
    }
    assert!(
        preview.stdout.contains(
            "hr: reconcile: 4 would change, 2 unchanged; 6 events; situations: linked 6; actions: updated 6; failures: failed 0, rejected 0 in 1 part(s); nothing was written"
        ),
        "{}",
        preview.stdout
    );
    assert_eq!(std::fs::read(s.db()).unwrap(), before, "the preview wrote");
    assert_eq!(s.sql("SELECT count(*) FROM decisions"), records);
    assert_eq!(s.checkpoint("hr"), checkpoint);

    // The reconcile applies it to every identity, one decision of op reconcile each.
    let out = s.idsync(&["reconcile", "hr"]).expect_code(0);
    assert!(
        out.stdout
            .contains("hr: reconciled: 4 changed, 2 unchanged; 6 events; situations: linked 6"),
        "{}",
        out.stdout
    );
    let expected: Vec<(String, Option<String>)> = [
        ("1", Some("Sales")),
        ("2", Some("Sales")),
        ("3", Some("IT")),
        ("4", Some("IT")),
        ("5", None),
        ("6", None),
    ]
    .iter()
    .map(|(n, d)| ((*n).to_owned(), d.map(str::to_owned)))
    .collect();
    assert_eq!(departments(&s), expected);
    let decided = s.results(&["--key", "3"]).pop().unwrap();
    assert_eq!(
        (&decided["op"], &decided["situation"], &decided["action"]),
        (&"reconcile".into(), &"linked".into(), &"updated".into())
    );
    assert_eq!(reconcile_decisions(&s), 6);
    let explain = s.idsync(&["explain", "hr", "1"]).expect_code(0);
    assert!(
        explain.stdout.contains("op: reconcile"),
        "{}",
        explain.stdout
    );
    assert!(
        explain.stdout.contains("department: (none) → \"Sales\""),
        "{}",
        explain.stdout
    );

    // Nothing left: a pass is idle, a second reconcile changes nothing.
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("hr: no changes"), "{}", run.stdout);
    let again = s.idsync(&["reconcile", "hr"]).expect_code(0);
    assert!(
        again.stdout.contains("0 changed, 6 unchanged"),
        "{}",
        again.stdout
    );
    let preview = s.idsync(&["preview", "--reconcile"]).expect_code(0);
    assert!(
        preview
            .stdout
            .contains("hr: reconcile: 0 would change, 6 unchanged"),
        "{}",
        preview.stdout
    );
    assert_eq!(
        preview
            .stdout
            .lines()
            .filter(|l| l.starts_with("hr "))
            .count(),
        0
    );
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains(
            "reconcile: last 0s ago by command: complete, 6 events (0 changed, 6 unchanged)"
        ),
        "{}",
        status.stdout
    );
}

#[test]
fn a_reconcile_of_some_keys_and_behind_the_delete_guard() {
    let s = Sandbox::new();
    config(&s, "", "");
    let ten = |upto: usize| {
        let mut csv = String::from("id,first,dept\n");
        for i in 1..=upto {
            csv.push_str(&format!("{i},P{i},D{i}\n"));
        }
        csv
    };
    s.feed("hr.csv", &ten(10));
    s.run_once(None, 0);
    // Mappings that show the department and the op the rules saw.
    config(
        &s,
        &format!("{DEPARTMENT}      - {{ to: seenOp, expr: 'op' }}\n"),
        "",
    );
    let checkpoint = s.checkpoint("hr");

    // Two accounts only: those two change, nothing else, the checkpoint stays.
    let out = s
        .idsync(&["reconcile", "hr", "--key", "7", "-k", "2"])
        .expect_code(0);
    assert!(
        out.stdout.contains("2 changed, 0 unchanged"),
        "{}",
        out.stdout
    );
    let changed: Vec<String> = departments(&s)
        .into_iter()
        .filter(|(_, d)| d.is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(changed, ["2", "7"]);
    assert_eq!(attr(&s.identity("7").unwrap(), "seenOp"), Some("update"));
    assert_eq!(reconcile_decisions(&s), 2);
    assert_eq!(s.checkpoint("hr"), checkpoint);

    // A key that is nowhere is named, and the command fails.
    let out = s
        .idsync(&["reconcile", "hr", "--key", "404"])
        .expect_code(1);
    assert!(
        out.stderr.contains("no account '404' was reconciled"),
        "{}",
        out.stderr
    );

    // Three of ten rows gone (30%, more than max_delete_ratio 0.2): the preview and the
    // reconcile are refused and nothing is applied.
    s.feed("hr.csv", &ten(7));
    let records = s.sql("SELECT count(*) FROM decisions");
    let preview = s.idsync(&["preview", "--reconcile"]).expect_code(3);
    assert!(
        preview.stdout.contains("the reconcile would be refused")
            && preview.stdout.contains("would delete 3 of 10 accounts"),
        "{}",
        preview.stdout
    );
    let refused = s.idsync(&["reconcile", "hr"]).expect_code(3);
    assert!(
        refused.stderr.contains("accidental-delete guard")
            && refused
                .stderr
                .contains("`idsync reconcile hr --accept-deletes`"),
        "{}",
        refused.stderr
    );
    assert_eq!(s.sql("SELECT count(*) FROM decisions"), records);
    assert_eq!(attr(&s.identity("1").unwrap(), "department"), None);
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains("by command: failed, 0 events"),
        "{}",
        status.stdout
    );

    // Accepted: every account decided, the three missing ones deleted (unlinked).
    let out = s
        .idsync(&["reconcile", "hr", "--accept-deletes"])
        .expect_code(0);
    assert!(
        out.stdout
            .contains("10 events; situations: linked 7, deleted 3"),
        "{}",
        out.stdout
    );
    for key in ["8", "9", "10"] {
        assert_eq!(s.owner("hr", key), None, "account {key} still linked");
        let d = s.results(&["--key", key]).pop().unwrap();
        assert_eq!(
            (&d["op"], &d["situation"], &d["action"]),
            (&"reconcile".into(), &"deleted".into(), &"unlinked".into())
        );
    }
    assert_eq!(attr(&s.identity("1").unwrap(), "department"), Some("D1"));
    assert_eq!(attr(&s.identity("1").unwrap(), "seenOp"), Some("update"));
    assert_eq!(reconcile_decisions(&s), 12);
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("hr: no changes"), "{}", run.stdout);
}

/// `id,first,dept` rows 0..n; `dept(i)` gives row i's department.
fn big_feed(n: usize, dept: impl Fn(usize) -> String) -> String {
    let mut csv = String::with_capacity(n * 20);
    csv.push_str("id,first,dept\n");
    for i in 0..n {
        csv.push_str(&format!("{i},P{i},{}\n", dept(i)));
    }
    csv
}

/// Starts `idsync reconcile hr`, SIGKILLs it once at least `at_least` decisions of op
/// reconcile beyond `already` are committed (and before it finishes), and waits for it.
fn reconcile_killed(s: &Sandbox, already: u64, at_least: u64, total: u64) -> u64 {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["reconcile", "hr"])
        .current_dir(s.path())
        .env_remove("IDSYNC_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let done = eventually(120, "committed parts of the reconcile", || {
        let n = reconcile_decisions(s) - already;
        (n >= at_least).then_some(n)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let done = (reconcile_decisions(s) - already).max(done);
    assert!(done < total, "the reconcile finished before the kill");
    done
}

#[test]
fn a_killed_reconcile_is_finished_by_running_it_again() {
    const N: usize = 20_000;
    let s = Sandbox::new();
    config(&s, "", "");
    s.config(
        &std::fs::read_to_string(s.path().join("idsync.yaml"))
            .unwrap()
            .replace(
                "completion: rename }",
                "completion: rename, batch_size: 1000 }",
            ),
    );
    s.feed("hr.csv", &big_feed(N, |i| format!("D{}", i % 7)));
    s.run_once(None, 0);
    let with_batches = |extra_mappings: &str| {
        config(&s, extra_mappings, "");
        s.config(
            &std::fs::read_to_string(s.path().join("idsync.yaml"))
                .unwrap()
                .replace(
                    "completion: rename }",
                    "completion: rename, batch_size: 1000 }",
                ),
        );
    };
    with_batches(DEPARTMENT);

    // Killed after a few parts; run again, it resumes after the committed parts: one
    // decision per account in all, every identity right.
    let committed = reconcile_killed(&s, 0, 3000, N as u64);
    assert_eq!(committed % 1000, 0, "parts are atomic: {committed}");
    let out = s.idsync(&["reconcile", "hr"]).expect_code(0);
    assert!(
        out.stdout.contains(&format!(
            "hr: reconciled: {} changed, 0 unchanged",
            N as u64 - committed
        )),
        "{}",
        out.stdout
    );
    assert_eq!(reconcile_decisions(&s), N as u64, "nothing decided twice");
    let all = s.export();
    assert_eq!(all.len(), N);
    for i in &all {
        let id: usize = i["name"].as_str().unwrap().parse().unwrap();
        assert_eq!(attr(i, "department"), Some(format!("D{}", id % 7).as_str()));
    }

    // Killed again under a new mapping, and the file changes before the reconcile is run
    // again (an account of a committed part, one of a part not reached): the reconcile
    // starts over on the new file, nothing of it is lost.
    with_batches(&format!(
        "{DEPARTMENT}      - {{ to: unit, expr: 'account.dept + \"-\" + account.id' }}\n"
    ));
    let before = reconcile_decisions(&s);
    reconcile_killed(&s, before, 2000, N as u64);
    s.replace_atomically(
        "feeds/hr.csv",
        &big_feed(N, |i| match i {
            10 | 19_000 => "Moved".to_owned(),
            _ => format!("D{}", i % 7),
        }),
    );
    s.idsync(&["reconcile", "hr"]).expect_code(0);
    let all = s.export();
    assert_eq!(all.len(), N, "no identity doubled");
    assert_eq!(
        s.sql("SELECT count(*) FROM links WHERE resource = 'hr'"),
        N.to_string()
    );
    for i in &all {
        let id: usize = i["name"].as_str().unwrap().parse().unwrap();
        let dept = match id {
            10 | 19_000 => "Moved".to_owned(),
            _ => format!("D{}", id % 7),
        };
        assert_eq!(attr(i, "department"), Some(dept.as_str()), "{i}");
        assert_eq!(
            attr(i, "unit"),
            Some(format!("{dept}-{id}").as_str()),
            "{i}"
        );
    }
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("hr: no changes"), "{}", run.stdout);
}

#[test]
fn the_agent_reconciles_at_its_scheduled_times() {
    let s = Sandbox::new();
    config(&s, "", "");
    s.feed("hr.csv", SIX);
    s.run_once(None, 0);
    // Every two seconds (a sixth field in front is seconds), with the new mapping.
    config(&s, DEPARTMENT, "    reconcile: { cron: '*/2 * * * * *' }\n");
    s.config(
        &std::fs::read_to_string(s.path().join("idsync.yaml"))
            .unwrap()
            .replace(
                "status: { listen: off }",
                "status: { listen: \"127.0.0.1:0\" }",
            ),
    );
    let mut agent = s.start_logged(&[]);
    let port = eventually(20, "the status endpoint", || endpoint_port(&s.agent_log()));
    let reconciles = "idsync_reconciles_total{resource=\"hr\"}";
    eventually(20, "two scheduled reconciles", || {
        let (_, text) = http_get(port, "/metrics");
        (metric(&text, reconciles) >= 2.0).then_some(())
    });
    let (_, text) = http_get(port, "/metrics");
    // The first pass at start, then only the reconciles: nothing else woke the resource.
    assert_eq!(
        metric(&text, "idsync_passes_total{resource=\"hr\"}"),
        1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "idsync_last_reconcile_timestamp_seconds{resource=\"hr\"}"
        ) > 0.0
    );
    assert_eq!(
        departments(&s)[0],
        ("1".to_owned(), Some("Sales".to_owned()))
    );
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains("by schedule: complete, 6 events")
            && status
                .stdout
                .contains("scheduled at '*/2 * * * * *' (UTC), next in"),
        "{}",
        status.stdout
    );
    // While the agent runs, a reconcile from the command line waits for no one: it refuses.
    let refused = s.idsync(&["reconcile", "hr"]).expect_code(3);
    assert!(
        refused.stderr.contains("another idsync agent")
            && refused.stderr.contains("reconcile: { cron"),
        "{}",
        refused.stderr
    );
    let (code, _) = common::terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    assert!(
        s.agent_log().contains("reconcile at its scheduled time"),
        "{}",
        s.agent_log()
    );
    assert!(reconcile_decisions(&s) >= 12);
}

#[test]
fn check_and_status_know_the_schedule_and_what_cannot_reconcile() {
    let s = Sandbox::new();
    config(&s, "", "    reconcile: { cron: 'every night' }\n");
    s.feed("hr.csv", SIX);
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(
        out.stderr
            .contains("resources[0].reconcile.cron: 'every night' is not a cron expression"),
        "{}",
        out.stderr
    );
    // A directory reconciles too (a refresh from scratch): check accepts its schedule;
    // an unreachable one fails the command and the preview as a resource error (exit 3).
    let ldap = "  - name: dir
    source: { type: ldap, url: 'ldap://127.0.0.1:9/', base: 'dc=example,dc=com', timeout_secs: 2 }
";
    config(&s, "", "    reconcile: { cron: '0 3 * * *' }\n");
    let good = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&format!(
        "{good}{ldap}    reconcile: {{ cron: '0 3 * * *' }}\n"
    ));
    let out = s.idsync(&["check"]).expect_code(0);
    assert!(
        out.stdout
            .contains("reconcile: dir at '0 3 * * *' (UTC), next 20"),
        "{}",
        out.stdout
    );
    s.config(&format!("{good}{ldap}"));
    let out = s.idsync(&["check"]).expect_code(0);
    assert!(
        out.stdout
            .contains("reconcile: hr at '0 3 * * *' (UTC), next 20"),
        "{}",
        out.stdout
    );
    s.run_once(Some("hr"), 0);
    let out = s.idsync(&["reconcile", "dir"]).expect_code(3);
    assert!(out.stderr.contains("resource dir"), "{}", out.stderr);
    let out = s
        .idsync(&["preview", "--reconcile", "--resource", "dir"])
        .expect_code(3);
    assert!(out.stderr.contains("resource dir"), "{}", out.stderr);
    s.idsync(&["reconcile", "nosuch"]).expect_code(2);
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status
            .stdout
            .contains("reconcile: never; scheduled at '0 3 * * *' (UTC), next in"),
        "{}",
        status.stdout
    );
    let json = s.idsync(&["status", "--json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["resources"][0]["reconcile_cron"], "0 3 * * *");
    assert!(v["resources"][0]["last_reconcile"].is_null());
}
