//! Attribute authority through the real binary: two flat-file feeds, `hr` and
//! `contractors`, both map `title` with `authority: { title: [hr, contractors] }`. hr's
//! value wins whatever the order of the passes; a contractor who leaves (row removed →
//! delete → unlink) takes the values it gave with it, recomputed from hr or removed, with
//! before/after in the decision and an `updated` notification (attribute condition) over
//! real SMTP; `weak` and `initial` mappings; an operator's `unlink` and a moved link
//! withdraw too; a reconcile converges to the precedence result; `check` refuses a broken
//! authority.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Sandbox, SmtpServer, attr};
use serde_json::Value;

/// Correlates an account to the identity with its mail.
const BY_MAIL: &str = "if account.mail == () { () } else { #{ mail: account.mail } }";

const HR: &str = "id,login,mail,title,location\n\
1001,ada,ada@example.com,Engineer,Paris\n\
1002,bob,bob@example.com,,Paris\n";

const CONTRACTORS: &str = "cid,login,mail,role,site,agency\n\
C1,ada,ada@example.com,Contractor,Lyon,Acme\n\
C2,bob,bob@example.com,Contractor,Lyon,Acme\n\
C3,cyd,cyd@example.com,Contractor,Nice,Acme\n";

/// The authority of the scenario: hr first for `title`; contractors first for `location`
/// (the site they work at while contracting); `agency` from contractors only.
const AUTHORITY: &str = "authority:
  title: [hr, contractors]
  location: [contractors, hr]
  agency: [contractors]
";

fn resources(extra: &str) -> String {
    format!(
        "resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
    naming: 'account.login'
    rules: {{ correlation: by_mail.rhai }}
    mappings:
      - {{ to: mail, from: mail }}
      - {{ to: title, from: title }}
      - {{ to: location, from: location }}
  - name: contractors
    source: {{ type: flatfile, path: feeds/contractors.csv, key: cid }}
    naming: 'account.login'
    rules: {{ correlation: by_mail.rhai }}
    mappings:
      - {{ to: mail, from: mail }}
      - {{ to: title, from: role }}
      - {{ to: location, from: site }}
      - {{ to: agency, from: agency }}
{extra}"
    )
}

fn world(authority: &str, extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!("{authority}{}", resources(extra)));
    s.rule("by_mail.rhai", BY_MAIL);
    s.feed("hr.csv", HR);
    s.feed("contractors.csv", CONTRACTORS);
    s
}

fn text<'a>(s: &'a Value, name: &str) -> Option<&'a str> {
    attr(s, name)
}

/// The newest decision record of `resource`/`key`.
fn decision(s: &Sandbox, resource: &str, key: &str) -> Value {
    s.results(&["--resource", resource, "--key", key])
        .pop()
        .expect("a decision record")
}

/// The decision's change of `name`: (before, after), each the first value or `None`.
fn change(d: &Value, name: &str) -> Option<(Option<String>, Option<String>)> {
    let first = |v: &Value| match v {
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_owned),
        Value::String(s) => Some(s.clone()),
        _ => None,
    };
    d["changes"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| (first(&c["before"]), first(&c["after"])))
}

fn some(v: &str) -> Option<String> {
    Some(v.to_owned())
}

#[test]
fn hr_gives_the_title_whatever_the_order_of_the_passes() {
    for order in [["hr", "contractors"], ["contractors", "hr"]] {
        let s = world(AUTHORITY, "");
        s.run_once(Some(order[0]), 0);
        s.run_once(Some(order[1]), 0);
        let ada = s.identity("ada").unwrap();
        assert_eq!(text(&ada, "title"), Some("Engineer"), "{order:?}: {ada}");
        assert_eq!(text(&ada, "location"), Some("Lyon"), "{order:?}: {ada}");
        assert_eq!(text(&ada, "agency"), Some("Acme"), "{order:?}: {ada}");
        assert_eq!(s.owner("hr", "1001").as_deref(), Some("ada"));
        assert_eq!(s.owner("contractors", "C1").as_deref(), Some("ada"));
        // hr gives bob no title: the contractor's is the title.
        let bob = s.identity("bob").unwrap();
        assert_eq!(text(&bob, "title"), Some("Contractor"), "{order:?}: {bob}");
        // Which account gave what, as the operator sees it.
        let show = s.idsync(&["identities", "show", "ada"]).expect_code(0);
        assert!(
            show.stdout.contains("title: Engineer  (from hr:1001)"),
            "{}",
            show.stdout
        );
        assert!(
            show.stdout
                .contains("location: Lyon  (from contractors:C1)"),
            "{}",
            show.stdout
        );
        assert!(
            show.stdout.contains("mail: ada@example.com\n"),
            "{}",
            show.stdout
        );
        // The later pass says why its value was not applied, or what it replaced.
        if order[0] == "hr" {
            let explain = s.idsync(&["explain", "contractors", "C1"]).expect_code(0);
            assert!(
                explain.stdout.contains(
                    "authority: title: kept the value of account 1001 of hr; contractors ranks lower"
                ),
                "{}",
                explain.stdout
            );
            assert!(change(&decision(&s, "contractors", "C1"), "title").is_none());
        } else {
            let d = decision(&s, "hr", "1001");
            assert_eq!(
                change(&d, "title"),
                Some((some("Contractor"), some("Engineer"))),
                "{d}"
            );
            let explain = s.idsync(&["explain", "hr", "1001"]).expect_code(0);
            assert!(
                explain.stdout.contains(
                    "authority: title: the value of account 1001 of hr replaces that of account C1 of contractors; contractors ranks lower"
                ),
                "{}",
                explain.stdout
            );
            assert!(
                explain.stdout.contains(
                    "authority: location: kept the value of account C1 of contractors; hr ranks lower"
                ),
                "{}",
                explain.stdout
            );
        }
        // A later change of the contractor's role is not applied either.
        s.feed(
            "contractors.csv",
            &CONTRACTORS.replace(
                "C1,ada,ada@example.com,Contractor",
                "C1,ada,ada@example.com,Lead",
            ),
        );
        s.run_once(Some("contractors"), 0);
        let d = decision(&s, "contractors", "C1");
        assert_eq!(d["action"], "updated", "{d}");
        assert!(change(&d, "title").is_none(), "{d}");
        assert_eq!(text(&s.identity("ada").unwrap(), "title"), Some("Engineer"));
    }
    // Both resources in one `run --once`: the same result.
    let s = world(AUTHORITY, "");
    s.run_once(None, 0);
    assert_eq!(text(&s.identity("ada").unwrap(), "title"), Some("Engineer"));
}

#[test]
fn a_leaving_contractor_takes_its_values_with_it_and_a_policy_sees_the_change() {
    let port = common::free_port();
    let notifications = format!(
        "notifications:
  from: 'idsync <idsync@example.com>'
  transport: {{ type: smtp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s }}
  policies:
    - name: moved
      on: [updated]
      attributes: [location]
      to: ['\"facilities@example.com\"']
      subject: 'Location of {{{{ identity.name }}}}: {{{{ identity.attrs.location }}}}'
      text: '{{{{ before.attrs.location }}}} -> {{{{ identity.attrs.location }}}}'
"
    );
    let s = world(AUTHORITY, &notifications);
    let mut server = SmtpServer::on_port(&s.path().join("smtp"), port);
    server.start();
    s.run_once(Some("hr"), 0);
    s.run_once(Some("contractors"), 0);
    // ada and bob moved to the contractors' site when their contract was linked.
    let subjects = |n: usize| -> Vec<String> {
        server
            .wait_for(n)
            .iter()
            .filter_map(|m| m.header("subject"))
            .collect()
    };
    let before = subjects(2);
    assert!(
        before.contains(&"Location of ada: Lyon".to_owned()),
        "{before:?}"
    );
    assert!(
        before.contains(&"Location of bob: Lyon".to_owned()),
        "{before:?}"
    );

    // ada's and bob's contracts end: their rows go (cyd's stays).
    s.feed(
        "contractors.csv",
        "cid,login,mail,role,site,agency\nC3,cyd,cyd@example.com,Contractor,Nice,Acme\n",
    );
    s.run_once(Some("contractors"), 0);

    let ada = s.identity("ada").unwrap();
    assert_eq!(text(&ada, "location"), Some("Paris"), "{ada}");
    assert_eq!(text(&ada, "agency"), None, "{ada}");
    assert_eq!(text(&ada, "title"), Some("Engineer"), "{ada}");
    assert_eq!(ada["accounts"].as_array().unwrap().len(), 1, "{ada}");
    let d = decision(&s, "contractors", "C1");
    assert_eq!(d["situation"], "deleted", "{d}");
    assert_eq!(d["action"], "unlinked", "{d}");
    assert_eq!(
        change(&d, "location"),
        Some((some("Lyon"), some("Paris"))),
        "{d}"
    );
    assert_eq!(change(&d, "agency"), Some((some("Acme"), None)), "{d}");
    assert!(change(&d, "title").is_none(), "{d}");
    let explain = s.idsync(&["explain", "contractors", "C1"]).expect_code(0);
    for line in [
        "location: \"Lyon\" → \"Paris\"",
        "agency: \"Acme\" → (none)",
        "authority: location: withdrawn with account C1 of contractors; recomputed from account 1001 of hr",
        "authority: agency: withdrawn with account C1 of contractors; no other account gives a value: removed",
    ] {
        assert!(explain.stdout.contains(line), "{line}\n{}", explain.stdout);
    }
    // bob's title came from the contractor only: it goes.
    let bob = s.identity("bob").unwrap();
    assert_eq!(text(&bob, "title"), None, "{bob}");
    assert_eq!(text(&bob, "location"), Some("Paris"), "{bob}");
    assert_eq!(
        change(&decision(&s, "contractors", "C2"), "title"),
        Some((some("Contractor"), None))
    );
    // The identities stay as hr has them; the sources went with the accounts.
    let show = s.idsync(&["identities", "show", "ada"]).expect_code(0);
    assert!(
        show.stdout.contains("location: Paris  (from hr:1001)"),
        "{}",
        show.stdout
    );
    assert_eq!(
        s.sql("SELECT count(DISTINCT key) FROM attribute_sources WHERE resource = 'contractors'"),
        "1",
        "only cyd's contract still gives values"
    );
    // The policy saw the withdrawal like any other update.
    let after = subjects(4);
    assert!(
        after.contains(&"Location of ada: Paris".to_owned()),
        "{after:?}"
    );
    assert!(
        after.contains(&"Location of bob: Paris".to_owned()),
        "{after:?}"
    );
    let mail = server
        .received()
        .into_iter()
        .find(|m| m.header("subject").as_deref() == Some("Location of ada: Paris"))
        .unwrap();
    assert!(mail.raw.contains("Lyon -> Paris"), "{}", mail.raw);
}

#[test]
fn weak_and_initial_mappings() {
    let s = Sandbox::new();
    s.config(
        "authority:
  phone: [contractors, hr]       # contractors first, but its mapping is weak
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: 'account.login'
    rules: { correlation: by_mail.rhai }
    mappings:
      - { to: mail, from: mail }
      - { to: phone, from: phone }
      - { to: displayName, from: name }
  - name: contractors
    source: { type: flatfile, path: feeds/contractors.csv, key: cid }
    naming: 'account.login'
    rules: { correlation: by_mail.rhai }
    mappings:
      - { to: mail, from: mail }
      - { to: phone, from: phone, strength: weak }
      - { to: displayName, from: name, strength: weak }
      - { to: employeeType, expr: '\"contractor\"', strength: initial }
      - { to: firstSeen, from: start, strength: initial }
",
    );
    s.rule("by_mail.rhai", BY_MAIL);
    let contractors = |phone: &str, name: &str, start: &str| {
        format!(
            "cid,login,mail,phone,name,start\n\
             C1,dan,dan@example.com,{phone},{name},{start}\n\
             C2,eve,eve@example.com,300,Eve C,2026-01-05\n"
        )
    };
    s.feed(
        "hr.csv",
        "id,login,mail,phone,name\n2002,eve,eve@example.com,,Eve Hr\n",
    );
    s.feed(
        "contractors.csv",
        &contractors("111", "Dan C", "2026-01-01"),
    );
    s.run_once(Some("hr"), 0);
    s.run_once(Some("contractors"), 0);
    // dan was created by his contract: every mapping gave its value.
    let dan = s.identity("dan").unwrap();
    assert_eq!(text(&dan, "phone"), Some("111"), "{dan}");
    assert_eq!(text(&dan, "displayName"), Some("Dan C"), "{dan}");
    assert_eq!(text(&dan, "employeeType"), Some("contractor"), "{dan}");
    assert_eq!(text(&dan, "firstSeen"), Some("2026-01-01"), "{dan}");
    // eve existed (hr): an initial mapping does not fill an identity it links to, a weak
    // one fills only what nobody gives.
    let eve = s.identity("eve").unwrap();
    assert_eq!(s.owner("contractors", "C2").as_deref(), Some("eve"));
    assert_eq!(text(&eve, "employeeType"), None, "{eve}");
    assert_eq!(text(&eve, "firstSeen"), None, "{eve}");
    assert_eq!(text(&eve, "displayName"), Some("Eve Hr"), "{eve}");
    assert_eq!(text(&eve, "phone"), Some("300"), "{eve}");

    // dan's contract changes: the weak governed value follows it (no other source), the
    // weak ungoverned one stays (the identity has a value), the initial ones stay.
    s.feed(
        "contractors.csv",
        &contractors("112", "Dan Contractor", "2026-02-02"),
    );
    s.run_once(Some("contractors"), 0);
    let dan = s.identity("dan").unwrap();
    assert_eq!(text(&dan, "phone"), Some("112"), "{dan}");
    assert_eq!(text(&dan, "displayName"), Some("Dan C"), "{dan}");
    assert_eq!(text(&dan, "firstSeen"), Some("2026-01-01"), "{dan}");
    assert_eq!(text(&dan, "employeeType"), Some("contractor"), "{dan}");

    // hr hires dan: its strong values win, although contractors ranks first for phone.
    s.feed(
        "hr.csv",
        "id,login,mail,phone,name\n2001,dan,dan@example.com,222,Dan Hr\n2002,eve,eve@example.com,,Eve Hr\n",
    );
    s.run_once(Some("hr"), 0);
    let dan = s.identity("dan").unwrap();
    assert_eq!(s.owner("hr", "2001").as_deref(), Some("dan"));
    assert_eq!(text(&dan, "phone"), Some("222"), "{dan}");
    assert_eq!(text(&dan, "displayName"), Some("Dan Hr"), "{dan}");
    assert_eq!(text(&dan, "employeeType"), Some("contractor"), "{dan}");

    // The contract changes again: the weak value is not applied, and explain says why.
    s.feed(
        "contractors.csv",
        &contractors("113", "Dan Contractor", "2026-02-02"),
    );
    s.run_once(Some("contractors"), 0);
    assert_eq!(text(&s.identity("dan").unwrap(), "phone"), Some("222"));
    let explain = s.idsync(&["explain", "contractors", "C1"]).expect_code(0);
    assert!(
        explain.stdout.contains(
            "authority: phone: kept the value of account 2001 of hr; the mapping of contractors is weak"
        ),
        "{}",
        explain.stdout
    );

    // hr no longer has a phone for dan: the weak value comes back.
    s.feed(
        "hr.csv",
        "id,login,mail,phone,name\n2001,dan,dan@example.com,,Dan Hr\n2002,eve,eve@example.com,,Eve Hr\n",
    );
    s.run_once(Some("hr"), 0);
    assert_eq!(text(&s.identity("dan").unwrap(), "phone"), Some("113"));
    let explain = s.idsync(&["explain", "hr", "2001"]).expect_code(0);
    assert!(
        explain.stdout.contains(
            "authority: phone: hr gives no value now; recomputed from account C1 of contractors"
        ),
        "{}",
        explain.stdout
    );
}

#[test]
fn an_operator_unlink_and_a_moved_link_withdraw_too() {
    let s = world(AUTHORITY, "");
    s.run_once(None, 0);
    assert_eq!(text(&s.identity("ada").unwrap(), "location"), Some("Lyon"));

    // The contract was linked to the wrong person: move it to bob.
    let link = s
        .idsync(&["link", "contractors", "C1", "bob"])
        .expect_code(0);
    assert!(link.stdout.contains("unlinked from ada"), "{}", link.stdout);
    let ada = s.identity("ada").unwrap();
    assert_eq!(text(&ada, "location"), Some("Paris"), "{ada}");
    assert_eq!(text(&ada, "agency"), None, "{ada}");
    let explain = s.idsync(&["explain", "contractors", "C1"]).expect_code(0);
    assert!(
        explain.stdout.contains(
            "authority: location: withdrawn with account C1 of contractors from ada; recomputed from account 1001 of hr"
        ),
        "{}",
        explain.stdout
    );

    // An operator's unlink takes its values back as a delete would.
    s.idsync(&["unlink", "contractors", "C2"]).expect_code(0);
    let d = s.last_result();
    assert_eq!(d["op"], "operator", "{d}");
    assert_eq!(d["action"], "unlinked", "{d}");
    // bob still has C1 (moved to him): its values stand in for C2's.
    let bob = s.identity("bob").unwrap();
    assert_eq!(text(&bob, "location"), Some("Lyon"), "{bob}");
    assert_eq!(text(&bob, "title"), Some("Contractor"), "{bob}");
    s.idsync(&["unlink", "contractors", "C1"]).expect_code(0);
    let d = s.last_result();
    assert_eq!(change(&d, "title"), Some((some("Contractor"), None)), "{d}");
    assert_eq!(
        change(&d, "location"),
        Some((some("Lyon"), some("Paris"))),
        "{d}"
    );
    let bob = s.identity("bob").unwrap();
    assert_eq!(text(&bob, "title"), None, "{bob}");
    assert_eq!(text(&bob, "agency"), None, "{bob}");
}

#[test]
fn a_reconcile_converges_to_the_precedence_result() {
    // Without authority the last writer wins: the contractors' pass ran last.
    let s = world("", "");
    s.run_once(None, 0);
    assert_eq!(
        text(&s.identity("ada").unwrap(), "title"),
        Some("Contractor")
    );
    // The operator declares who wins, then reconciles the resource that ranks lower.
    s.config(&format!("{AUTHORITY}{}", resources("")));
    s.idsync(&["check"]).expect_code(0);
    let preview = s
        .idsync(&["preview", "--reconcile", "--resource", "contractors"])
        .expect_code(0);
    assert!(
        preview
            .stdout
            .contains("contractors C1 reconcile linked updated identity=ada changed=title"),
        "{}",
        preview.stdout
    );
    assert_eq!(
        text(&s.identity("ada").unwrap(), "title"),
        Some("Contractor")
    );
    let run = s.idsync(&["reconcile", "contractors"]).expect_code(0);
    assert!(
        run.stdout.contains("1 changed, 2 unchanged"),
        "{}",
        run.stdout
    );
    assert_eq!(text(&s.identity("ada").unwrap(), "title"), Some("Engineer"));
    assert_eq!(
        text(&s.identity("bob").unwrap(), "title"),
        Some("Contractor")
    );
    // Converged: neither resource changes anything any more.
    let again = s.idsync(&["reconcile", "contractors"]).expect_code(0);
    assert!(
        again.stdout.contains("0 changed, 3 unchanged"),
        "{}",
        again.stdout
    );
    let hr = s.idsync(&["reconcile", "hr"]).expect_code(0);
    assert!(
        hr.stdout.contains("0 changed, 2 unchanged"),
        "{}",
        hr.stdout
    );
}

/// Governing the attribute correlation finds people by is allowed but warned about: when
/// its last giver goes it is removed, and a rehire cannot be found by it.
#[test]
fn check_warns_when_authority_governs_a_correlation_key() {
    let s = world(&format!("{AUTHORITY}  mail: [hr, contractors]\n"), "");
    let run = s.idsync(&["check"]).expect_code(0);
    for resource in ["hr", "contractors"] {
        let line = format!(
            "warning: idsync.yaml: authority.mail: the correlation rule of {resource} (rules/by_mail.rhai) mentions mail"
        );
        assert!(run.stdout.contains(&line), "{line}\n{}", run.stdout);
    }
    let quiet = world(AUTHORITY, "").idsync(&["check"]).expect_code(0);
    assert!(!quiet.stdout.contains("warning"), "{}", quiet.stdout);
}

#[test]
fn check_refuses_a_broken_authority() {
    let s = Sandbox::new();
    s.config(&format!(
        "authority:\n  title: [hr, contractor]\n  agency: [contractors]\n{}",
        resources("").replace(
            "{ to: agency, from: agency }",
            "{ to: agency, from: agency, strength: initial }"
        )
    ));
    s.rule("by_mail.rhai", BY_MAIL);
    let run = s.idsync(&["check"]).expect_code(2);
    for line in [
        "idsync.yaml: authority.title: no resource named 'contractor' (configured: hr, contractors)",
        "idsync.yaml: resources[1] (contractors).mappings[1]: title is governed by authority.title, which does not list contractors: add it where it ranks ([hr, contractor])",
        "idsync.yaml: resources[1] (contractors).mappings[3].strength: initial does not apply to agency",
    ] {
        assert!(run.stderr.contains(line), "{line}\n{}", run.stderr);
    }
    // A strength that does not exist is a YAML error at its line.
    s.config(&resources("").replace(
        "{ to: agency, from: agency }",
        "{ to: agency, from: agency, strength: sometimes }",
    ));
    let run = s.idsync(&["check"]).expect_code(2);
    assert!(run.stderr.contains("idsync.yaml:18:"), "{}", run.stderr);
    assert!(
        run.stderr.contains("unknown variant `sometimes`"),
        "{}",
        run.stderr
    );
    // Nothing was created.
    assert!(!s.db().exists());
}
