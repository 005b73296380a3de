//! The agent's runtime as users run it: `idsync run` with production intervals
//! (`poll_interval_secs: 3600`) in the quickstart's layout (the repository next to
//! `idsync.yaml`), longer than one pass, measured the way a user would notice: passes and
//! LDAP searches made while nothing changes, seconds until a change arrives, seconds to stop,
//! mail delivered after the server comes back, one slow part holding up another.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use std::time::{Duration, Instant};

use common::{Sandbox, SmtpServer, eventually, free_port, http_get, metric, terminate};
use slapd::{PEOPLE, SYNC_DN, SYNC_PW, Slapd};

fn metrics(port: u16) -> String {
    http_get(port, "/metrics").1
}

fn passes(text: &str, resource: &str) -> f64 {
    metric(
        text,
        &format!("idsync_passes_total{{resource=\"{resource}\"}}"),
    )
}

/// Seconds until `check` holds, polled every 20 ms, at most `secs`.
fn seconds_until(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    eventually(secs, what, || check().then_some(()));
    started.elapsed().as_secs_f64()
}

/// A CSV resource, an LDAP persist resource and an LDAP syncrepl resource with an hour's
/// interval: once the first passes are done, 30 s of quiet make no pass and send no search;
/// a change to the feed and one in the directory each arrive within 2 s.
#[test]
fn an_idle_agent_makes_no_passes_and_sends_no_searches() {
    let slapd = Slapd::start();
    slapd.add_person("d1", "D One", "d1@example.com");
    let s = Sandbox::new();
    s.write("secrets/ldap.pw", &format!("{SYNC_PW}\n"));
    let ldap = |name: &str, mode: &str| {
        format!(
            "  - name: {name}
    source:
      type: ldap
      url: {url}
      base: {PEOPLE}
      filter: (objectClass=inetOrgPerson)
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
      mode: {mode}
    naming: '\"{name}-\" + account.uid'
",
            url = slapd.url()
        )
    };
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: \"127.0.0.1:0\" }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '\"hr-\" + account.id'
{}{}",
        ldap("live", "persist"),
        ldap("sync", "syncrepl")
    ));
    s.feed("hr.csv", "id,title\n1,clerk\n");
    let mut agent = s.start_logged(&[]);
    let port = eventually(20, "the status endpoint", || {
        common::endpoint_port(&s.agent_log())
    });
    eventually(30, "the first passes", || {
        (std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && s.identity("hr-1").is_some()
            && s.identity("live-d1").is_some()
            && s.identity("sync-d1").is_some())
        .then_some(())
    });
    // Settle: the persist stream's first quiet fetch, the status file.
    std::thread::sleep(Duration::from_secs(2));
    let before = metrics(port);
    let searches = slapd.searches(PEOPLE);
    std::thread::sleep(Duration::from_secs(30));
    let after = metrics(port);
    for r in ["hr", "live", "sync"] {
        assert_eq!(
            passes(&before, r),
            passes(&after, r),
            "{r}: passes while nothing changed\n{after}"
        );
    }
    assert_eq!(
        slapd.searches(PEOPLE),
        searches,
        "searches sent to slapd while nothing changed"
    );
    assert!(passes(&after, "hr") >= 1.0, "{after}");

    s.replace_atomically("feeds/hr.csv", "id,title\n1,clerk\n2,lead\n");
    let feed = seconds_until(10, "the feed change", || s.identity("hr-2").is_some());
    slapd.add_person("d2", "D Two", "d2@example.com");
    let directory = seconds_until(10, "the directory change", || {
        s.identity("live-d2").is_some()
    });
    println!("feed change in {feed:.2} s, directory change in {directory:.2} s");
    // The polling through the CLI adds its own time: the bound is 2 s of agent time.
    assert!(feed < 2.0, "the feed change took {feed:.2} s");
    assert!(
        directory < 2.0,
        "the directory change took {directory:.2} s"
    );
    let (code, took) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
}

/// The outbox keeps its own clock: with every resource asleep for an hour, a mail whose
/// retry is every second is delivered within 3 s of the mail server coming back.
#[test]
fn mail_is_retried_on_its_own_schedule_while_resources_sleep() {
    let s = Sandbox::new();
    let smtp_port = free_port();
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, timeout: 2s }}
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome'
      text: 'Hello'
      retry: {{ every: 1s, max_interval: 1s, max_age: 1h }}
"
    ));
    s.feed("hr.csv", "id,mail\n1,a@example.com\n");
    let mut agent = s.start_logged(&[]);
    // The first attempt fails: the server is not there yet.
    eventually(20, "a failed first attempt", || {
        let out = s.idsync(&["outbox", "list", "--json"]).stdout;
        out.contains("\"attempts\":1").then_some(())
    });
    let mut server = SmtpServer::on_port(&s.path().join("smtp"), smtp_port);
    server.start();
    let took = seconds_until(10, "the mail", || !server.received().is_empty());
    println!("delivered {took:.2} s after the server came back");
    assert!(
        took < 3.0,
        "delivered {took:.2} s after the server came back"
    );
    let (code, _) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
}

/// SIGTERM in the middle of a 300,000-row initial load: the agent exits 0 within 5 s with
/// the parts it committed; a restart finishes the load with every row applied exactly once.
/// During the load /readyz answers 200 and the events counter advances; the log written to
/// a file carries no escape codes.
#[test]
fn a_stop_during_a_long_initial_load_is_prompt_and_loses_nothing() {
    const ROWS: usize = 300_000;
    let s = Sandbox::new();
    s.config(
        "poll_interval_secs: 3600
status: { listen: \"127.0.0.1:0\" }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: 'account.id'
",
    );
    let mut csv = String::with_capacity(ROWS * 40);
    csv.push_str("id,cn,mail,title\n");
    for i in 0..ROWS {
        csv.push_str(&format!("u{i},Name {i},u{i}@example.com,Engineer\n"));
    }
    s.feed("hr.csv", &csv);
    let mut agent = s.start_logged(&[]);
    let port = eventually(20, "the status endpoint", || {
        common::endpoint_port(&s.agent_log())
    });
    // Two parts committed, the pass still going.
    let progress = eventually(60, "parts of the load", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let text = metrics(port);
        let events = metric(
            &text,
            "idsync_events_total{resource=\"hr\",action=\"created\"}",
        );
        (events >= 40_000.0).then_some(text)
    });
    assert_eq!(passes(&progress, "hr"), 0.0, "the pass is still going");
    assert_eq!(
        metric(&progress, "idsync_pass_events_planned{resource=\"hr\"}"),
        ROWS as f64,
        "the pass's total is known across its parts"
    );
    assert!(metric(&progress, "idsync_pass_events_done{resource=\"hr\"}") >= 40_000.0);
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(
        code, 200,
        "ready while the first pass makes progress: {body}"
    );
    let status = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(
        status.contains("agent: running") && status.contains("hr: ok"),
        "the status during the first pass: {status}"
    );
    let (code, took) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let committed: usize = s.sql("SELECT count(*) FROM identities").parse().unwrap();
    println!("stopped in {took:?} with {committed} of {ROWS} rows committed");
    assert!(
        (40_000..ROWS).contains(&committed),
        "{committed} rows committed when stopped"
    );
    assert!(
        !s.agent_log().contains('\u{1b}'),
        "escape codes in a piped log"
    );

    s.run_once(None, 0);
    assert_eq!(s.sql("SELECT count(*) FROM identities"), ROWS.to_string());
    assert_eq!(
        s.sql("SELECT count(*) || ' ' || count(DISTINCT key) FROM decisions WHERE resource = 'hr'"),
        format!("{ROWS} {ROWS}"),
        "one decision record per row"
    );
}

/// An LDAP resource whose server is down (in backoff) and a mail server that accepts
/// connections but never answers hold up nothing: a CSV resource's change still arrives
/// at once.
#[test]
fn a_server_in_backoff_and_a_silent_mail_server_do_not_delay_other_resources() {
    let s = Sandbox::new();
    let down = free_port();
    // Accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for c in silent.incoming().take(20) {
            open.push(c);
        }
        std::thread::sleep(Duration::from_secs(120));
    });
    s.write("secrets/ldap.pw", "x\n");
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: mail, from: mail }}
  - name: dir
    source:
      type: ldap
      url: ldap://127.0.0.1:{down}
      base: {PEOPLE}
      bind_dn: {SYNC_DN}
      bind_password_file: secrets/ldap.pw
      mode: syncrepl
      timeout_secs: 5
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {silent_port}, tls: none, timeout: 30s }}
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome'
      text: 'Hello'
"
    ));
    s.feed("hr.csv", "id,mail\n1,a@example.com\n");
    let mut agent = s.start_logged(&[]);
    eventually(20, "the first pass", || s.identity("u1"));
    // The directory is in backoff and a mail waits on the silent server.
    eventually(20, "the directory failing", || {
        s.agent_log().contains("next attempt in").then_some(())
    });
    for i in 2..5 {
        s.replace_atomically(
            "feeds/hr.csv",
            &(1..=i)
                .map(|k| format!("{k},p{k}@example.com\n"))
                .fold(String::from("id,mail\n"), |acc, l| acc + &l),
        );
        let took = seconds_until(10, "the feed change", || {
            s.identity(&format!("u{i}")).is_some()
        });
        println!("change {i} arrived in {took:.2} s");
        assert!(took < 1.5, "the feed change took {took:.2} s");
    }
    let (code, took) = terminate(&mut agent);
    assert_eq!(code, Some(0), "{}", s.agent_log());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    drop(held);
}
