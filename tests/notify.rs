//! Notifications through the real binary against a real SMTP server on loopback
//! (Debian's python3-aiosmtpd, started by the harness on a free port): the server is down
//! when the event happens and the mail arrives after it comes back; a 4xx is retried; a 5xx
//! is dead-lettered and re-triable; a crash between sending and marking sends at most once
//! more with the same Message-ID; CR/LF in an attribute cannot inject a header; HTML in an
//! attribute is escaped; the file transport writes `.eml` files; STARTTLS and implicit TLS
//! verify the server against a configured private CA, and refuse an unknown one; AUTH after
//! STARTTLS with the password from a secret file, which no output ever shows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/slapd.rs"]
mod slapd;

use common::{Sandbox, SmtpServer, poll};
use serde_json::Value;

const POLICIES: &str = r#"
  policies:
    - name: welcome
      on: [created]
      condition: 'identity.attrs.mail != ()'
      to: ['identity.attrs.mail']
      subject: 'Welcome {{ identity.attrs.first }}'
      text: 'Hello {{ identity.attrs.first }}, your account {{ identity.name }} is ready.'
      html: '<p>Hello {{ identity.attrs.first }}</p>'
      retry: { every: 200ms, max_interval: 200ms, max_age: 1h }
"#;

fn world(transport: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: '\"u\" + account.id'
    mappings:
      - {{ to: first, from: first }}
      - {{ to: mail, from: mail }}
notifications:
  from: 'idsync <idsync@example.com>'
  transport: {transport}
  dispatch: {{ claim_lease: 1s }}
{POLICIES}"
    ));
    s
}

fn smtp_world() -> (Sandbox, SmtpServer) {
    let port = common::free_port();
    let s = world(&format!(
        "{{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s }}"
    ));
    let server = SmtpServer::on_port(&s.path().join("smtp"), port);
    (s, server)
}

fn outbox(s: &Sandbox) -> Vec<Value> {
    let r = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
    r.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn one(s: &Sandbox) -> Value {
    let mut all = outbox(s);
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

/// Runs `run --once` until `n` messages arrived.
fn run_until_received(s: &Sandbox, server: &SmtpServer, n: usize) -> Vec<common::Received> {
    poll(30, &format!("{n} message(s) delivered"), || {
        s.run_once(None, 0);
        let r = server.received();
        (r.len() >= n).then_some(r)
    })
}

#[test]
fn server_down_then_up_delivers_and_clears_pending() {
    let (s, mut server) = smtp_world();
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    // The server is down when the identity is created: the sync succeeds, the mail waits.
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("retrying 1"), "{}", run.stdout);
    let m = one(&s);
    assert_eq!(m["status"], "pending");
    assert_eq!(m["identity"], "u1");
    assert!(
        m["last_error"].as_str().unwrap().contains("transient"),
        "{m}"
    );
    let show = s.idsync(&["identities", "show", "u1"]).expect_code(0);
    assert!(
        show.stdout.contains("pending notifications:"),
        "{}",
        show.stdout
    );
    assert_eq!(s.identity("u1").unwrap()["pending_notifications"], 1);

    server.start();
    let got = run_until_received(&s, &server, 1);
    assert_eq!(got[0].rcpt, vec!["alice@example.com"]);
    assert_eq!(got[0].header("subject").as_deref(), Some("Welcome Alice"));
    let m = one(&s);
    assert_eq!(m["status"], "sent");
    let show = s.idsync(&["identities", "show", "u1"]).expect_code(0);
    assert!(
        !show.stdout.contains("pending notifications"),
        "{}",
        show.stdout
    );
    assert!(
        s.identity("u1")
            .unwrap()
            .get("pending_notifications")
            .is_none()
    );
}

#[test]
fn smtp_4xx_is_retried() {
    let (s, mut server) = smtp_world();
    server.set_mode("451");
    server.start();
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    s.run_once(None, 0);
    let m = one(&s);
    assert_eq!(m["status"], "pending");
    assert_eq!(m["attempts"], 1);
    assert!(m["last_error"].as_str().unwrap().contains("451"), "{m}");
    server.set_mode("accept");
    run_until_received(&s, &server, 1);
    let m = one(&s);
    assert_eq!(m["status"], "sent");
    assert!(m["attempts"].as_i64().unwrap() >= 2);
}

#[test]
fn smtp_5xx_is_dead_lettered_and_retriable() {
    let (s, mut server) = smtp_world();
    server.set_mode("550");
    server.start();
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    // A round that dead-letters a message fails the run, naming where to look.
    let r = s.run_once(None, 1);
    assert!(
        r.stderr.contains("1 message(s) dead-lettered"),
        "{}",
        r.stderr
    );
    let m = one(&s);
    assert_eq!(m["status"], "dead");
    assert!(m["last_error"].as_str().unwrap().contains("550"), "{m}");
    // Still undelivered: shown pending on the identity.
    let show = s.idsync(&["identities", "show", "u1"]).expect_code(0);
    assert!(show.stdout.contains("dead welcome"), "{}", show.stdout);
    // Not retried by itself.
    server.set_mode("accept");
    s.run_once(None, 0);
    assert_eq!(one(&s)["status"], "dead");
    assert!(server.received().is_empty());
    // Re-triable from the CLI.
    let r = s.idsync(&["outbox", "retry", "--dead"]).expect_code(0);
    assert!(r.stdout.contains("1 dead-lettered"), "{}", r.stdout);
    run_until_received(&s, &server, 1);
    assert_eq!(one(&s)["status"], "sent");
}

#[test]
fn crash_after_send_resends_at_most_once_with_the_same_message_id() {
    let (s, mut server) = smtp_world();
    server.start();
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    // Sent, then the process dies before recording the delivery.
    let r = s.idsync_env(&["run", "--once"], &[("IDSYNC_FAULT", "exit-after-send")]);
    assert_eq!(r.code, 86, "{}\n{}", r.stdout, r.stderr);
    let first = server.wait_for(1);
    assert_eq!(one(&s)["status"], "pending");
    // After the claim lease the next run sends it once more, with the same Message-ID.
    let got = run_until_received(&s, &server, 2);
    assert_eq!(one(&s)["status"], "sent");
    let id1 = first[0].header("message-id").unwrap();
    let id2 = got[1].header("message-id").unwrap();
    assert_eq!(id1, id2);
    assert!(id1.starts_with("<idsync."), "{id1}");
    // And never again.
    s.run_once(None, 0);
    assert_eq!(server.received().len(), 2);
}

/// Kills while 2,000 mails go out: each kill repeats at most the messages whose delivery
/// was not recorded yet (the one in flight on its connection, and the last group of
/// outcomes gathered within 20 ms, at most 64), never a whole claim; none is lost.
#[test]
fn kills_during_a_large_dispatch_repeat_at_most_the_messages_in_flight() {
    const MAILS: usize = 2_000;
    const KILLS: usize = 8;
    // One connection: a slower drain, so that eight kills land in it.
    let port = common::free_port();
    let s = world(&format!(
        "{{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s, connections: 1 }}"
    ));
    let mut server = SmtpServer::on_port(&s.path().join("smtp"), port);
    let mut csv = String::from("id,first,mail\n");
    for i in 0..MAILS {
        csv.push_str(&format!("{i},P{i},p{i}@example.com\n"));
    }
    s.feed("hr.csv", &csv);
    // The server is down for the first pass: every mail waits in the outbox.
    s.run_once(None, 0);
    assert_eq!(outbox(&s).len(), MAILS);
    server.start();
    let mut kills = 0;
    let mut rounds = 0;
    while kills < KILLS {
        rounds += 1;
        assert!(rounds < 60, "the dispatch never got under way");
        let before = server.received().len();
        let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(["run", "--once"])
            .current_dir(s.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill once 150 mails of this run arrived: far into its 512-row claim, which the
        // old dispatcher recorded only at its end (1,649 duplicates in 8 kills).
        // (Generous: a machine busy with other builds sends 150 mails slowly.)
        let flowing = poll(60, "mail flowing", || {
            if run.try_wait().unwrap().is_some() {
                return Some(false);
            }
            (server.received().len() > before + 150).then_some(true)
        });
        if !flowing {
            // Nothing was due: the rows a killed run claimed wait out their 1 s lease.
            if server.received().len() >= MAILS {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1100));
            continue;
        }
        run.kill().unwrap();
        run.wait().unwrap();
        kills += 1;
    }
    // Runs without kills finish the outbox.
    poll(60, "every mail sent", || {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        s.run_once(None, 0);
        outbox(&s)
            .iter()
            .all(|m| m["status"] == "sent")
            .then_some(())
    });
    let received = server.received();
    let mut ids: Vec<String> = received
        .iter()
        .map(|r| r.header("message-id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), MAILS, "every mail delivered");
    let duplicates = received.len() - MAILS;
    let bound = kills * (1 + 64);
    println!("{kills} kills, {duplicates} duplicates (bound {bound})");
    assert!(kills >= 6, "only {kills} kills hit the dispatch");
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {kills} kills: more than the messages in flight"
    );
}

#[test]
fn crlf_in_an_attribute_cannot_inject_a_header() {
    let (s, mut server) = smtp_world();
    // The feed carries values with line breaks on purpose: the resource must allow them.
    let yaml = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&yaml.replace("key: id }", "key: id, multiline: true }"));
    server.start();
    s.feed(
        "hr.csv",
        "id,first,mail\n\
         1,\"Alice\r\nBcc: evil@example.com\",alice@example.com\n\
         2,Bob,\"bob@example.com\r\nBcc: evil@example.com\"\n",
    );
    s.run_once(None, 0);
    let got = server.wait_for(1);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.rcpt, vec!["alice@example.com"]);
    assert!(
        m.headers().iter().all(|(k, _)| k != "bcc"),
        "{:?}",
        m.headers()
    );
    let head = m.raw.split("\r\n\r\n").next().unwrap();
    assert!(!head.contains("\r\nBcc:"), "{head}");
    let subject = m.header("subject").unwrap();
    assert!(
        subject.contains("Alice") && subject.contains("evil"),
        "{subject}"
    );
    // Bob's recipient is not an address: dead-lettered with the reason, nothing sent.
    let list = outbox(&s);
    let bob = list.iter().find(|m| m["identity"] == "u2").unwrap();
    assert_eq!(bob["status"], "dead");
    assert!(
        bob["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid recipient"),
        "{bob}"
    );
}

#[test]
fn html_in_an_attribute_is_escaped() {
    let (s, mut server) = smtp_world();
    server.start();
    s.feed(
        "hr.csv",
        "id,first,mail\n1,<script>alert(1)</script>,alice@example.com\n",
    );
    s.run_once(None, 0);
    let got = server.wait_for(1);
    let raw = &got[0].raw;
    assert!(raw.contains("<p>Hello &lt;script&gt;alert(1)&lt;"), "{raw}");
    assert!(!raw.contains("<p>Hello <script>"), "{raw}");
    // The text part keeps the value as it is.
    assert!(
        raw.contains("Hello <script>alert(1)</script>, your account"),
        "{raw}"
    );
}

#[test]
fn file_transport_writes_eml_files() {
    let s = world("{ type: file, dir: mail }");
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("outbox: sent 1"), "{}", run.stdout);
    let m = one(&s);
    let path = s.path().join("mail").join(format!("{}.eml", m["id"]));
    let eml = std::fs::read_to_string(&path).unwrap();
    assert!(eml.contains("Subject: Welcome Alice"), "{eml}");
    assert!(eml.contains("To: alice@example.com"), "{eml}");
    let show = s
        .idsync(&["outbox", "show", &m["id"].to_string()])
        .expect_code(0);
    assert!(
        show.stdout.contains("message-id: <idsync."),
        "{}",
        show.stdout
    );
}

#[test]
fn check_reports_policy_problems_with_their_key() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
notifications:
  from: 'idsync <idsync@example.com>'
  transport: { type: file, dir: mail }
  policies:
    - name: broken
      on: [created]
      to: ['identity.attrs.mail +']
      subject: '{{ unclosed'
      text: 'x'
      retry: { every: soon }
",
    );
    let r = s.idsync(&["check"]).expect_code(2);
    assert!(
        r.stderr.contains("notifications.policies[0].to[0]"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("notifications.policies[0].subject"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("notifications.policies[0].retry.every"),
        "{}",
        r.stderr
    );
}

/// `idsync check` warns where an HTML template puts a value that autoescaping cannot make
/// safe, naming the key and the template line; safe places are not reported.
#[test]
fn check_warns_of_values_in_unquoted_attributes_and_script_urls() {
    let s = Sandbox::new();
    s.config(
        r#"resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
notifications:
  from: 'idsync <idsync@example.com>'
  transport: { type: file, dir: mail }
  policies:
    - name: welcome
      on: [created]
      to: ['identity.attrs.mail']
      subject: 'Welcome'
      text: 'x'
      html: |
        <p title="{{ identity.name }}">Hello {{ identity.attrs.first }}</p>
        <td class={{ identity.attrs.dept }}>x</td>
        <a href="{{ identity.attrs.homepage }}">home</a>
        <a href="https://intranet/{{ identity.name }}">profile</a>
        <a href="javascript:open('{{ identity.name }}')">open</a>
"#,
    );
    let r = s.idsync(&["check"]).expect_code(0);
    let warnings: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 3, "{}", r.stdout);
    assert!(
        warnings[0]
            .contains("notifications.policies[0].html: line 2: a value in an unquoted attribute")
    );
    assert!(warnings[1].contains("line 3: a value at the start of a URL attribute"));
    assert!(warnings[2].contains("line 5: a value inside a javascript: URL"));
}

/// A sandbox whose SMTP transport uses `tls` (`starttls` or `tls`) towards a server with a
/// certificate from a generated CA (in `tls/`); `ca_file` is added when `trust_ca`.
fn tls_world(tls: &str, trust_ca: bool) -> (Sandbox, SmtpServer, slapd::Tls) {
    let port = common::free_port();
    let ca = if trust_ca {
        ", ca_file: tls/ca.pem"
    } else {
        ""
    };
    let s = world(&format!(
        "{{ type: smtp, host: 127.0.0.1, port: {port}, tls: {tls}{ca}, timeout: 5s }}"
    ));
    let dir = s.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let certs = slapd::Tls::generate(&dir);
    let server = SmtpServer::on_port(&s.path().join("smtp"), port);
    (s, server, certs)
}

#[test]
fn starttls_and_implicit_tls_verify_the_server_against_the_configured_ca() {
    for (mode, implicit) in [("starttls", false), ("tls", true)] {
        let (s, mut server, certs) = tls_world(mode, true);
        server.start_tls(&certs.cert, &certs.key, implicit);
        s.idsync(&["check"]).expect_code(0);
        s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
        let got = run_until_received(&s, &server, 1);
        assert_eq!(got[0].rcpt, vec!["alice@example.com"], "{mode}");
        assert_eq!(one(&s)["status"], "sent", "{mode}");
    }
}

#[test]
fn a_server_certificate_from_an_unknown_ca_is_refused_and_the_mail_waits() {
    let (s, mut server, certs) = tls_world("starttls", false);
    server.start_tls(&certs.cert, &certs.key, false);
    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    let run = s.run_once(None, 0);
    assert!(run.stdout.contains("retrying 1"), "{}", run.stdout);
    let m = one(&s);
    assert_eq!(m["status"], "pending");
    let error = m["last_error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert!(server.received().is_empty());
}

#[test]
fn a_ca_file_that_is_missing_or_not_a_certificate_is_a_config_error() {
    let (s, _server, _certs) = tls_world("starttls", true);
    std::fs::write(s.path().join("tls/ca.pem"), "not a certificate\n").unwrap();
    let out = s.idsync(&["check"]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("notifications.transport.ca_file") && text.contains("no PEM certificate"),
        "{text}"
    );
    std::fs::remove_file(s.path().join("tls/ca.pem")).unwrap();
    let out = s.idsync(&["check"]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("ca.pem: cannot read it"), "{text}");
}

#[test]
fn auth_after_starttls_with_the_password_from_a_secret_file_never_logged() {
    const PASSWORD: &str = "s3cret-Pa55";
    let port = common::free_port();
    let s = world(&format!(
        "{{ type: smtp, host: 127.0.0.1, port: {port}, tls: starttls, ca_file: tls/ca.pem, \
         username: idsync, password_file: secrets/smtp.pw, timeout: 5s }}"
    ));
    s.write("secrets/smtp.pw", &format!("{PASSWORD}\n"));
    let dir = s.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let certs = slapd::Tls::generate(&dir);
    let mut server = SmtpServer::on_port(&s.path().join("smtp"), port);
    server.start_auth(&certs.cert, &certs.key, "idsync", PASSWORD);

    s.feed("hr.csv", "id,first,mail\n1,Alice,alice@example.com\n");
    let got = run_until_received(&s, &server, 1);
    assert_eq!(got[0].rcpt, vec!["alice@example.com"]);

    // A wrong password: the server refuses the login (535, permanent): the message is
    // dead-lettered with the server's answer, and neither password shows anywhere.
    s.write("secrets/smtp.pw", "wrong-password\n");
    s.feed(
        "hr.csv",
        "id,first,mail\n1,Alice,alice@example.com\n2,Bob,bob@example.com\n",
    );
    let run = s.idsync(&["-vv", "run", "--once"]);
    let listed = s.idsync(&["outbox", "list", "--json"]).expect_code(0);
    let bob: Value = listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|m| m["identity"] == "u2")
        .unwrap();
    assert_eq!(bob["status"], "dead", "{bob}");
    assert!(bob["last_error"].as_str().unwrap().contains("535"), "{bob}");
    for text in [&run.stdout, &run.stderr, &listed.stdout] {
        assert!(!text.contains(PASSWORD), "password in: {text}");
        assert!(!text.contains("wrong-password"), "password in: {text}");
    }
    assert_eq!(server.received().len(), 1);
}
