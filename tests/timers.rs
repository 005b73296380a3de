//! Lifecycle timers through the real binary, on CSV feeds and a real SQLite file: a leaver's
//! grace-period delete carried out by the running agent on its own (an hour's poll
//! interval: no pass wakes it), cancelled by a rehire; `valid_from` and `valid_to` dates
//! enabling and disabling identities on time, a date that passed while the agent was
//! stopped fired at start-up, a changed date re-planning its timer; `preview --timers`,
//! `explain` and `status`; and SIGKILLs while 500 timers fire, after which each fired
//! exactly once (one decision per timer, counted by SQL).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Sandbox, attr, days_from_civil, eventually, free_port, http_get, metric, now_secs, rfc3339,
    terminate,
};
use serde_json::Value;

/// `secs` (Unix) as the date `2026-07-01`.
fn date(secs: i64) -> String {
    rfc3339(secs)[..10].to_owned()
}

/// A recorded time (`2026-07-01T09:00:00.123Z`) as Unix milliseconds.
fn millis(at: &str) -> i64 {
    let n = |a: usize, b: usize| at[a..b].parse::<i64>().unwrap();
    let days = days_from_civil(n(0, 4), n(5, 7), n(8, 10));
    let secs = days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19);
    let frac = at[19..].trim_end_matches('Z');
    let ms = if frac.is_empty() {
        0
    } else {
        format!("{:0<3}", &frac[1..frac.len().min(4)])
            .parse::<i64>()
            .unwrap()
    };
    secs * 1000 + ms
}

/// Sleeps until `ms` (Unix milliseconds) has passed.
fn sleep_past(ms: i64) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        if now > ms {
            return;
        }
        std::thread::sleep(Duration::from_millis((ms - now + 1).min(100) as u64));
    }
}

/// The latest due time of the pending timers (Unix ms).
fn last_due(s: &Sandbox) -> i64 {
    s.sql("SELECT max(due_at) FROM timers").parse().unwrap()
}

fn disabled(s: &Sandbox, name: &str) -> Option<bool> {
    s.identity(name).map(|i| i["disabled"].as_bool().unwrap())
}

/// The decision records of op `timer`.
fn firings(s: &Sandbox) -> Vec<Value> {
    s.results(&[])
        .into_iter()
        .filter(|r| r["op"] == "timer")
        .collect()
}

fn pending_timers(s: &Sandbox) -> i64 {
    s.sql("SELECT count(*) FROM timers").parse().unwrap()
}

/// A resource `hr` over `feeds/hr.csv` (key `id`, identities `u<id>`, `mail` and the
/// columns in `mapped` mapped as they are) with `extra` lines, an hour's poll interval, and
/// notification policies (file transport) on updates and deletes.
fn world(extra: &str, mapped: &[&str]) -> Sandbox {
    let mapped: String = mapped
        .iter()
        .map(|c| format!("      - {{ to: {c}, from: {c} }}\n"))
        .collect();
    let s = Sandbox::new();
    s.config(&format!(
        r#"poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '"u" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
{mapped}{extra}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: file, dir: mail }}
  policies:
    - name: gone
      on: [deleted]
      to: ['"iam@example.com"']
      subject: 'Deleted {{{{ identity.name }}}} ({{{{ op }}}})'
      text: 'Gone'
    - name: state
      on: [updated]
      to: ['"iam@example.com"']
      subject: '{{{{ identity.name }}}} {{% if identity.disabled %}}disabled{{% else %}}enabled{{% endif %}} ({{{{ op }}}})'
      text: 'Changed'
"#
    ));
    s
}

/// The subjects of the messages sent so far.
fn sent(s: &Sandbox) -> Vec<String> {
    let out = s
        .idsync(&["outbox", "list", "--status", "sent", "--json"])
        .expect_code(0)
        .stdout;
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|m| m["mail"]["subject"].as_str().unwrap().to_owned())
        .collect()
}

/// `delete_action: { action: disable, then: delete, after: 2s }` with the agent running as
/// in production (an hour between passes): the leaver is disabled at once and deleted 2 s
/// later by the timer alone, as a decision of op `timer` that the notification policies
/// see; nothing is left pending.
#[test]
fn a_grace_period_delete_is_carried_out_by_the_running_agent_after_its_delay() {
    let s = world(
        "    delete_action: { action: disable, then: delete, after: 2s }",
        &[],
    );
    s.feed("hr.csv", "id,mail\n1,a@example.com\n2,b@example.com\n");
    let mut agent = s.start_logged(&[]);
    eventually(20, "the first pass", || s.identity("u2").map(|_| ()));
    s.replace_atomically("feeds/hr.csv", "id,mail\n2,b@example.com\n");
    eventually(10, "u1 disabled", || {
        s.results(&["--key", "1"])
            .iter()
            .any(|r| r["action"] == "disabled")
            .then_some(())
    });
    eventually(10, "u1 deleted by its timer", || {
        s.identity("u1").is_none().then_some(())
    });
    let records = s.results(&["--key", "1"]);
    let disable = records
        .iter()
        .find(|r| r["action"] == "disabled")
        .expect("the delete decision");
    let fired = firings(&s);
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let fired = &fired[0];
    assert_eq!(fired["action"], "deleted_identity", "{fired:#}");
    assert_eq!(fired["situation"], "deleted");
    assert_eq!(fired["identity"], "u1");
    let waited = millis(fired["at"].as_str().unwrap()) - millis(disable["at"].as_str().unwrap());
    println!("deleted {waited} ms after it was disabled");
    assert!(
        (2000..5000).contains(&waited),
        "deleted {waited} ms after it was disabled"
    );
    assert_eq!(pending_timers(&s), 0);
    assert!(s.identity("u2").is_some());
    // The mail round after the firing: the policy saw the delete.
    eventually(10, "the mail about the delete", || {
        sent(&s)
            .iter()
            .any(|x| x == "Deleted u1 (timer)")
            .then_some(())
    });
    let (code, _) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    let log = s.agent_log();
    assert!(
        log.contains("(delete of u1) fired: deleted_identity"),
        "{log}"
    );
}

/// Two leavers come back before their grace period ends: one under the same key (a rehire:
/// linked back without correlation), the other under a new key that correlation finds (a
/// new link). Both are enabled again, their deletes cancelled in the same decision, and
/// past the delay nothing fires.
#[test]
fn a_rehire_before_the_delay_cancels_the_delete() {
    let s = world(
        "    delete_action: { action: disable, then: delete, after: 4s }
    rules: { correlation: by_mail.rhai }",
        &[],
    );
    s.rule("by_mail.rhai", "#{ mail: account.mail }");
    s.feed("hr.csv", "id,mail\n1,a@example.com\n2,b@example.com\n");
    s.run_once(None, 0);
    s.feed("hr.csv", "id,mail\n");
    s.idsync(&["run", "--once", "--accept-deletes", "hr"])
        .expect_code(0);
    assert_eq!(disabled(&s, "u1"), Some(true));
    assert_eq!(disabled(&s, "u2"), Some(true));
    assert_eq!(pending_timers(&s), 2);
    let due = last_due(&s);
    s.feed("hr.csv", "id,mail\n1,a@example.com\n3,b@example.com\n");
    s.run_once(None, 0);
    assert_eq!(pending_timers(&s), 0);
    assert_eq!(disabled(&s, "u1"), Some(false));
    assert_eq!(disabled(&s, "u2"), Some(false));
    assert_eq!(s.owner("hr", "1").as_deref(), Some("u1"));
    assert_eq!(s.owner("hr", "3").as_deref(), Some("u2"));
    let explain = s.idsync(&["explain", "hr", "1"]).expect_code(0).stdout;
    assert!(
        explain.contains("timer: rehire: account 1 of hr left u1 within its grace period"),
        "{explain}"
    );
    assert!(
        explain.contains("cancelled: u1 has an account again (hr 1)"),
        "{explain}"
    );
    let explain = s.idsync(&["explain", "hr", "3"]).expect_code(0).stdout;
    assert!(
        explain.contains("cancelled: u2 has an account again (hr 3)"),
        "{explain}"
    );
    sleep_past(due + 200);
    let run = s.run_once(None, 0);
    assert!(!run.stdout.contains("timers:"), "{}", run.stdout);
    assert!(firings(&s).is_empty());
    assert_eq!(disabled(&s, "u1"), Some(false));
    assert_eq!(disabled(&s, "u2"), Some(false));
}

/// The start date, `margin` seconds ahead, of account 1 of the `hr` feed.
fn start_in(s: &Sandbox, margin: i64, write: impl Fn(&Sandbox, &str, &str)) -> i64 {
    let start = now_secs() + margin;
    write(
        s,
        "feeds/hr.csv",
        &format!("id,start\n1,{}\n", rfc3339(start)),
    );
    start
}

/// Whether u1 was checked in with the start date `start` (by the pass that read it).
fn checked_in_with(s: &Sandbox, start: i64) -> bool {
    s.identity("u1")
        .is_some_and(|i| attr(&i, "start") == Some(rfc3339(start).as_str()))
}

/// `lifecycle: { valid_from: start }` and a start a few seconds ahead: the running agent
/// creates the identity disabled and enables it on time, on its own (an hour between
/// passes).
#[test]
fn a_valid_from_in_the_future_enables_the_identity_on_time() {
    let s = world("    lifecycle: { valid_from: start }", &["start"]);
    let write = |s: &Sandbox, rel: &str, csv: &str| s.write(rel, csv);
    let mut margin = 3;
    let mut start = start_in(&s, margin, write);
    let mut agent = s.start_logged(&[]);
    loop {
        eventually(30, "u1 checked in", || {
            checked_in_with(&s, start).then_some(())
        });
        if disabled(&s, "u1") == Some(true) && pending_timers(&s) == 1 {
            break;
        }
        // The pass came after the start (a busy machine): a later start, which the dates
        // disable again until then.
        assert!(
            margin < 24,
            "the agent never decided the feed before its start date"
        );
        margin *= 2;
        start = start_in(&s, margin, |s, rel, csv| s.replace_atomically(rel, csv));
    }
    eventually(margin as u64 + 10, "u1 enabled", || {
        (disabled(&s, "u1") == Some(false)).then_some(())
    });
    let fired = firings(&s);
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["action"], "updated");
    let late = millis(fired[0]["at"].as_str().unwrap()) - start * 1000;
    println!("enabled {late} ms after valid_from");
    assert!(
        (0..2000).contains(&late),
        "enabled {late} ms after valid_from"
    );
    // The policies see the change like any update.
    eventually(10, "the mail about the enable", || {
        sent(&s)
            .iter()
            .any(|x| x == "u1 enabled (timer)")
            .then_some(())
    });
    let (code, _) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
}

/// A `valid_from` that comes while no agent runs: the agent started after it fires the
/// timer at start-up.
#[test]
fn a_valid_from_that_passed_while_the_agent_was_stopped_fires_at_start_up() {
    let s = world("    lifecycle: { valid_from: start }", &["start"]);
    let mut margin = 2;
    let start = loop {
        let start = start_in(&s, margin, |s, rel, csv| s.write(rel, csv));
        s.run_once(None, 0);
        if disabled(&s, "u1") == Some(true) && pending_timers(&s) == 1 {
            break start;
        }
        // The run came after the start (a busy machine): a later start.
        assert!(
            margin < 16,
            "run --once never decided the feed before its start date"
        );
        margin *= 2;
    };
    while now_secs() <= start {
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = free_port();
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&config.replace(
        "status: { listen: off }",
        &format!("status: {{ listen: \"127.0.0.1:{port}\" }}"),
    ));
    let started = Instant::now();
    let mut agent = s.start_logged(&[]);
    eventually(10, "u1 enabled at start-up", || {
        (disabled(&s, "u1") == Some(false)).then_some(())
    });
    println!("enabled {:?} after the start", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    // The metrics count the firing; nothing is left pending or overdue.
    eventually(10, "the timer metrics", || {
        let text = http_get(port, "/metrics").1;
        let fired = metric(
            &text,
            "idsync_timers_fired_total{resource=\"hr\",action=\"updated\"}",
        );
        let shown = |line: &str| text.lines().any(|l| l == line);
        (fired == 1.0 && shown("idsync_timers_pending 0") && shown("idsync_timers_overdue 0"))
            .then_some(())
    });
    let (code, _) = terminate(&mut agent);
    assert_eq!(code, Some(0));
    let log = s.agent_log();
    assert!(log.contains("(enable of u1) fired: updated"), "{log}");
    assert_eq!(firings(&s).len(), 1);
}

/// `valid_to` disables; a changed `valid_to` moves its timer; a date in the past disables
/// at once; a date alone is a whole day (UTC); an unreadable date is a failed event naming
/// the attribute, not its value. `run --once` fires what is due.
#[test]
fn valid_to_disables_and_a_changed_date_replans_its_timer() {
    let s = world("", &["start", "end"]);
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&format!(
        "lifecycle: {{ valid_from: start, valid_to: end }}\n{config}"
    ));
    let now = now_secs();
    let tomorrow = date(now + 86_400);
    s.feed(
        "hr.csv",
        &format!(
            "id,start,end\n1,,{}\n2,,2020-01-31\n3,{tomorrow},\n4,someday,\n",
            rfc3339(now + 600)
        ),
    );
    let run = s.run_once(None, 1);
    assert!(run.stdout.contains("failed 1"), "{}", run.stdout);
    assert_eq!(disabled(&s, "u1"), Some(false));
    assert_eq!(disabled(&s, "u2"), Some(true), "a valid_to in the past");
    assert_eq!(disabled(&s, "u3"), Some(true), "a valid_from tomorrow");
    let failed = s.failed();
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("identity attribute 'start' of u4 is not a date"),
        "{error}"
    );
    assert!(!error.contains("someday"), "{error}");
    let listed = s
        .idsync(&["preview", "--timers", "2d", "--json"])
        .expect_code(0)
        .stdout;
    let timers: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(timers.len(), 2, "{listed}");
    assert_eq!(timers[0]["kind"], "disable");
    assert_eq!(timers[0]["identity"], "u1");
    assert_eq!(timers[0]["due_at"], rfc3339(now + 600));
    assert_eq!(timers[1]["kind"], "enable");
    assert_eq!(timers[1]["due_at"], format!("{tomorrow}T00:00:00Z"));
    // Within 5 minutes: only... nothing; within 11 minutes: u1's.
    let soon = s
        .idsync(&["preview", "--timers", "5m"])
        .expect_code(0)
        .stdout;
    assert!(
        soon.contains("timers: 0 due within 5m, 2 pending in all"),
        "{soon}"
    );
    let status = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(status.contains("timers: 2 pending, next in"), "{status}");

    // The end moves to a moment from now: the timer moves with it, and fires.
    let feed = |end: i64| {
        s.feed(
            "hr.csv",
            &format!(
                "id,start,end\n1,,{}\n2,,2020-01-31\n3,{tomorrow},\n",
                rfc3339(end)
            ),
        );
    };
    let mut margin = 2;
    let mut from = now + 600;
    let end = loop {
        let end = now_secs() + margin;
        feed(end);
        s.run_once(None, 0);
        let due = s.sql("SELECT due_at FROM timers WHERE identity = 'u1' AND kind = 'disable'");
        if disabled(&s, "u1") == Some(false) && due == (end * 1000).to_string() {
            break end;
        }
        // The run came after the end (a busy machine): the end moves out, then a later
        // one is tried.
        assert!(
            margin < 16,
            "run --once never decided the feed before its end date"
        );
        margin *= 2;
        from = now_secs() + 3600;
        feed(from);
        s.run_once(None, 0);
    };
    let explain = s.idsync(&["explain", "hr", "1"]).expect_code(0).stdout;
    assert!(
        explain.contains(&format!(
            "timer: disable of u1 moved from {} to {}",
            rfc3339(from),
            rfc3339(end)
        )),
        "{explain}"
    );
    assert!(
        explain.contains(&format!("disable u1 at {}", rfc3339(end))),
        "{explain}"
    );
    while now_secs() <= end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = s.run_once(None, 0);
    assert!(
        run.stdout
            .contains("timers: 1 fired; actions: disabled 1; failed 0"),
        "{}",
        run.stdout
    );
    assert_eq!(disabled(&s, "u1"), Some(true));
    let fired = firings(&s);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["key"], "1");
    let explain = s
        .idsync(&["explain", "--identity", "u1"])
        .expect_code(0)
        .stdout;
    assert!(explain.contains("op: timer"), "{explain}");
    assert!(
        explain.contains("lifecycle: valid_to") && explain.contains("has passed: disabled"),
        "{explain}"
    );

    // The end moves out again: the dates enable what they disabled.
    s.feed(
        "hr.csv",
        &format!(
            "id,start,end\n1,,{}\n2,,2020-01-31\n3,{tomorrow},\n",
            rfc3339(now + 3600)
        ),
    );
    s.run_once(None, 0);
    assert_eq!(disabled(&s, "u1"), Some(false));
    assert_eq!(pending_timers(&s), 2);

    // No agent runs while u1's end passes (the time is moved back instead of waited for):
    // status says a timer is overdue, and a run fires it.
    s.sql("UPDATE timers SET due_at = due_at - 3720000 WHERE identity = 'u1'");
    let status = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(
        status.contains("1 overdue by more than a minute: is an agent running?"),
        "{status}"
    );
    let json: Value =
        serde_json::from_str(s.idsync(&["status", "--json"]).expect_code(0).stdout.trim()).unwrap();
    assert_eq!(json["timers"]["overdue"], 1, "{json}");
    s.run_once(None, 0);
    let status = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(!status.contains("overdue"), "{status}");
}

/// The config's grace period and dates are checked like everything else.
#[test]
fn check_refuses_a_grace_period_or_dates_that_cannot_work() {
    let s = Sandbox::new();
    s.feed("hr.csv", "id\n1\n");
    s.config(
        "lifecycle: {}
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    delete_action: { action: unlink, then: delete, after: soon }
  - name: dir
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    delete_action: { action: disable, then: delete }
    lifecycle: { valid_to: '' }
  - name: old
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    delete_action: disable
",
    );
    let run = s.idsync(&["check"]).expect_code(2);
    for expected in [
        "lifecycle: name valid_from, valid_to or both",
        "resources[0].delete_action.then: needs action: disable",
        "resources[0].delete_action.after: 'soon' is not an age",
        "resources[1].delete_action.after: required with then: delete",
        "resources[1].lifecycle.valid_to: must not be empty",
        "5 problem(s) found",
    ] {
        assert!(run.stderr.contains(expected), "{expected}\n{}", run.stderr);
    }
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    delete_action: { action: disable, then: archive, after: 1d }
",
    );
    let run = s.idsync(&["check"]).expect_code(2);
    assert!(
        run.stderr
            .contains("unknown variant `archive`, expected `delete`"),
        "{}",
        run.stderr
    );
}

/// 500 timers come due at once; the agent is SIGKILLed while it fires them, again and again,
/// then restarted: every timer fired exactly once (one decision of op `timer` per account,
/// by SQL), none is left, every identity is gone and every delete mail was queued once.
#[test]
fn a_kill_while_timers_fire_loses_none_and_fires_none_twice() {
    const N: usize = 500;
    // The accounts stay in the feed marked as leavers, so each firing runs the delete
    // rule again (is the account still gone?): a firing takes a moment, and kills land
    // in the middle of the rounds.
    let s = world(
        "    delete_action: { action: disable, then: delete, after: 3s }
    rules: { delete: left.rhai }",
        &[],
    );
    s.rule(
        "left.rhai",
        "let n = 0; for i in 0..3000 { n += i; } account.status == \"left\"",
    );
    let feed = |status: &str| {
        let mut csv = String::from("id,mail,status\n");
        for i in 0..N {
            csv.push_str(&format!("{i},u{i}@example.com,{status}\n"));
        }
        csv
    };
    s.feed("hr.csv", &feed("active"));
    s.run_once(None, 0);
    s.feed("hr.csv", &feed("left"));
    s.run_once(None, 0);

    let fired = || -> i64 {
        s.sql("SELECT count(*) FROM decisions WHERE op = 'timer'")
            .parse()
            .unwrap()
    };
    // (A busy machine may take so long over the run that it fired some already.)
    assert_eq!(pending_timers(&s) + fired(), N as i64);
    sleep_past(last_due(&s));
    let mut kills_mid_way = 0;
    for _ in 0..4 {
        let before = fired();
        if before == N as i64 {
            break;
        }
        let mut agent = s.start_logged(&[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while fired() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.kill().unwrap();
        agent.wait().unwrap();
        let after = fired();
        println!("killed with {after} of {N} fired");
        if after > before && after < N as i64 {
            kills_mid_way += 1;
        }
    }
    assert!(kills_mid_way >= 1, "no kill landed while timers fired");
    let run = s.run_once(None, 0);
    println!("{}", run.stdout);
    assert_eq!(fired(), N as i64);
    assert_eq!(
        s.sql("SELECT count(*) FROM (SELECT key FROM decisions WHERE op = 'timer' GROUP BY key HAVING count(*) != 1) AS twice"),
        "0"
    );
    assert_eq!(
        s.sql("SELECT count(*) FROM decisions WHERE op = 'timer' AND action = 'deleted_identity'"),
        N.to_string()
    );
    assert_eq!(pending_timers(&s), 0);
    assert_eq!(s.sql("SELECT count(*) FROM identities"), "0");
    assert_eq!(
        s.sql("SELECT count(*), count(DISTINCT identity) FROM outbox WHERE policy = 'gone'"),
        format!("{N}|{N}")
    );
}
