//! `idsync run` as a service, through the real binary: a clean stop on SIGTERM, reload of
//! rules on change (a bad reload keeps the running rules), automatic retries of failed
//! events up to a limit, the status command and the HTTP endpoints.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command};

use common::{Sandbox, eventually, http_get};

fn config(s: &Sandbox, extra: &str) {
    s.config(&format!(
        "poll_interval_secs: 1
{extra}resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id, completion: rename }}
    rules: {{ correlation: corr.rhai }}
    mappings:
      - {{ to: mail, from: email }}
"
    ));
    s.rule("corr.rhai", "#{ mail: account.email }");
    s.feed("hr.csv", "id,email\n1,a@x\n2,b@x\n");
}

/// SIGTERM; the exit status and the agent's log.
fn terminate_in(s: &Sandbox, mut child: Child) -> (i32, String) {
    let (code, _) = common::terminate(&mut child);
    (code.unwrap_or(-1), s.agent_log())
}

#[test]
fn sigterm_stops_cleanly_after_committing() {
    let s = Sandbox::new();
    config(&s, "status: { listen: off }\n");
    let agent = s.start_logged(&[]);
    eventually(20, "the first pass", || {
        (s.export().len() == 2).then_some(())
    });
    s.replace_atomically("feeds/hr.csv", "id,email\n1,a@x\n2,b@x\n3,c@x\n");
    eventually(20, "the change", || (s.export().len() == 3).then_some(()));
    let (code, err) = terminate_in(&s, agent);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stopping"), "{err}");
    assert_eq!(s.results(&[]).len(), 3, "each change once");
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains("agent: not running"),
        "{}",
        status.stdout
    );
}

#[test]
fn rules_reload_on_change_and_a_bad_reload_keeps_the_running_rules() {
    let s = Sandbox::new();
    config(&s, "status: { listen: off }\n");
    let agent = s.start_logged(&[]);
    eventually(20, "the first pass", || {
        (s.export().len() == 2).then_some(())
    });
    // A broken rule: the reload is refused, the agent keeps deciding with the old rules.
    s.rule("corr.rhai", "let x = ;");
    eventually(20, "the refused reload", || {
        s.agent_log().contains("reload refused").then_some(())
    });
    // Account 3 has account 1's mail: the running rule (by mail) links it to 1's identity;
    // the broken one would fail it, no rule at all would create an identity.
    let owner = s.owner("hr", "1").unwrap();
    s.replace_atomically("feeds/hr.csv", "id,email\n1,a@x\n2,b@x\n3,a@x\n");
    let d = eventually(20, "the change with the old rules", || {
        s.results(&["--key", "3"]).pop()
    });
    assert_eq!(
        (&d["situation"], &d["action"]),
        (&"unlinked".into(), &"linked".into()),
        "{d}"
    );
    assert_eq!(s.owner("hr", "3"), Some(owner));
    assert!(s.failed().is_empty());
    // A good new rule is picked up without a restart.
    s.rule(
        "corr.rhai",
        "// now by id\n#{ mail: account.email, id: account.id }",
    );
    // The reload is asynchronous (the rule file's watcher): a change each time, until one
    // is decided with the new rule.
    let mut n = 0;
    eventually(20, "the reload", || {
        n += 1;
        s.replace_atomically(
            "feeds/hr.csv",
            &format!("id,email\n1,a@x\n2,b@x\n3,a@x\nk{n},d{n}@x\n"),
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        s.results(&["--key", &format!("k{n}")]).pop().filter(|d| {
            d["rules"][0]["result"]
                .as_str()
                .is_some_and(|r| r.contains("\"id\""))
        })
    });
    let (code, err) = terminate_in(&s, agent);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("reload refused"), "{err}");
    assert!(
        err.contains("corr.rhai:1:"),
        "the refusal names file:line:col: {err}"
    );
    assert!(err.contains("reloaded"), "{err}");
}

#[test]
fn failed_events_are_retried_up_to_the_limit_then_left_for_an_operator() {
    let s = Sandbox::new();
    config(
        &s,
        "status: { listen: off }\nfailed_retry: { max_attempts: 2, backoff_secs: 0 }\n",
    );
    s.rule(
        "corr.rhai",
        "if account.id == \"2\" { throw \"not yet\" }\n#{ mail: account.email }",
    );
    let agent = s.start_logged(&[]);
    eventually(20, "two automatic attempts", || {
        s.failed()
            .pop()
            .filter(|f| f["attempts"].as_i64() == Some(2))
    });
    // The limit holds: no third automatic attempt.
    s.replace_atomically("feeds/hr.csv", "id,email\n1,a@x\n2,b@x\n3,c@x\n");
    eventually(20, "another pass", || (s.export().len() == 2).then_some(()));
    assert_eq!(s.failed()[0]["attempts"], 2);
    let (code, _) = terminate_in(&s, agent);
    assert_eq!(code, 0);
    // A fixed rule and the next agent: the operator's retry (or the agent's) applies it.
    s.rule("corr.rhai", "#{ mail: account.email }");
    s.idsync(&["failed", "retry", "--all"]).expect_code(0);
    assert!(s.failed().is_empty());
    assert_eq!(s.export().len(), 3);
}

#[test]
fn status_health_readiness_and_metrics() {
    let s = Sandbox::new();
    config(&s, "status: { listen: \"127.0.0.1:0\" }\n");
    let agent = s.start_logged(&[]);
    let port = eventually(20, "the status endpoint", || {
        common::endpoint_port(&s.agent_log())
    });
    eventually(20, "ready", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|_| (http_get(port, "/readyz").0 == 200).then_some(()))
    });
    eventually(20, "the first pass in the status", || {
        s.idsync(&["status"])
            .stdout
            .contains("hr: ok")
            .then_some(())
    });
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_owned()));
    let (code, metrics) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("idsync_events_total{resource=\"hr\",action=\"created\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idsync_resource_up{resource=\"hr\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("idsync_outbox_pending 0"), "{metrics}");
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(
        status.stdout.contains("agent: running"),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("hr: ok"), "{}", status.stdout);
    assert!(status.stdout.contains("processed 2"), "{}", status.stdout);
    let json = s.idsync(&["status", "--json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["resources"][0]["state"], "ok");
    assert_eq!(v["agent"]["running"], true);
    // Broken source: not ready, and status says why.
    std::fs::remove_file(s.path().join("feeds/hr.csv")).unwrap();
    eventually(20, "not ready", || {
        (http_get(port, "/readyz").0 == 503).then_some(())
    });
    let (_, why) = http_get(port, "/readyz");
    assert!(why.contains("hr:"), "{why}");
    let (code, _) = terminate_in(&s, agent);
    assert_eq!(code, 0);
}

/// SIGHUP reloads what no watcher sees: the rules folder is a link that a deployment
/// switches to a new release of the rules (no watched file is written, so nothing reloads
/// them until SIGHUP). The file watch reloads on its own whenever the config or a rule
/// file is written, so a test that only changed such a file, or only looked for "reloaded"
/// after SIGHUP, could not tell SIGHUP did anything; here the rules in force before and
/// after the signal are told apart by the decisions they make.
#[test]
fn sighup_reloads_rules_no_watcher_sees() {
    let s = Sandbox::new();
    s.config(
        "poll_interval_secs: 1
status: { listen: off }
rules_dir: live
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id, completion: rename }
    rules: { correlation: corr.rhai }
    mappings:
      - { to: mail, from: email }
",
    );
    // Release a correlates by mail; release b by an attribute no identity has.
    s.write("rules-a/corr.rhai", "#{ mail: account.email }");
    s.write("rules-b/corr.rhai", "// release b\n#{ id: account.id }");
    std::os::unix::fs::symlink("rules-a", s.path().join("live")).unwrap();
    s.feed("hr.csv", "id,email\n1,a@x\n2,b@x\n");
    let agent = s.start_logged(&[]);
    eventually(20, "the first pass", || {
        (s.export().len() == 2).then_some(())
    });
    let owner = s.owner("hr", "1").unwrap();

    // Deploy release b: the link is replaced atomically.
    std::os::unix::fs::symlink("rules-b", s.path().join("live.new")).unwrap();
    std::fs::rename(s.path().join("live.new"), s.path().join("live")).unwrap();
    // Account 3 has account 1's mail: still decided by release a (by mail: linked to 1's
    // identity).
    s.replace_atomically("feeds/hr.csv", "id,email\n1,a@x\n2,b@x\n3,a@x\n");
    let d = eventually(20, "account 3", || s.results(&["--key", "3"]).pop());
    assert_eq!(
        (&d["situation"], &d["action"]),
        (&"unlinked".into(), &"linked".into()),
        "{d}"
    );
    assert_eq!(s.owner("hr", "3").as_deref(), Some(owner.as_str()));
    assert!(!s.agent_log().contains("reloaded"), "{}", s.agent_log());

    let pid = agent.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(20, "the reload", || {
        s.agent_log().contains("reloaded").then_some(())
    });
    // Account 4, also with 1's mail, is decided by release b: no candidate, a new identity.
    s.replace_atomically("feeds/hr.csv", "id,email\n1,a@x\n2,b@x\n3,a@x\n4,a@x\n");
    let d = eventually(20, "account 4", || s.results(&["--key", "4"]).pop());
    assert_eq!(
        (&d["situation"], &d["action"]),
        (&"unmatched".into(), &"created".into()),
        "{d}"
    );
    let owner4 = s.owner("hr", "4").unwrap();
    assert_ne!(owner4, owner);
    assert_eq!(s.export().len(), 3);
    let (code, err) = terminate_in(&s, agent);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("reloaded").count(), 1, "{err}");
}

#[test]
fn a_cron_resource_is_not_woken_by_file_changes_and_bad_cron_is_refused() {
    let s = Sandbox::new();
    s.config(
        "poll_interval_secs: 1
status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id, completion: rename }
    cron: '0 0 1 1 *'
  - name: tick
    source: { type: flatfile, path: feeds/tick.csv, key: id, completion: rename }
",
    );
    s.feed("hr.csv", "id\n1\n");
    s.feed("tick.csv", "id\nt1\n");
    let agent = s.start_logged(&[]);
    // Both pass once at start.
    eventually(20, "the first passes", || {
        (s.export().len() == 2).then_some(())
    });
    // Both files change; only the interval resource is woken (resources pass in config
    // order, so had hr been woken, its change would be in before tick's).
    s.replace_atomically("feeds/hr.csv", "id\n1\n2\n");
    s.replace_atomically("feeds/tick.csv", "id\nt1\nt2\n");
    eventually(20, "tick's change", || {
        (s.owner("tick", "t2").is_some()).then_some(())
    });
    assert_eq!(
        s.owner("hr", "2"),
        None,
        "the cron resource waits for its time"
    );
    let (code, err) = terminate_in(&s, agent);
    assert_eq!(code, 0, "{err}");

    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    cron: 'every now and then'
",
    );
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(out.stderr.contains("resources[0].cron"), "{}", out.stderr);
}
