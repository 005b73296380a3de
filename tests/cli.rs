//! The command line itself: `check` reporting every problem as file:line:col, exit codes,
//! `identities list|show`, results filters, and the documented config example.
#![allow(clippy::unwrap_used)]

mod common;

use common::Sandbox;

fn basic(s: &Sandbox) {
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    rules: { correlation: corr.rhai }
    mappings:
      - { to: mail, from: email }
",
    );
    s.rule("corr.rhai", "#{ mail: account.email }");
    s.feed("hr.csv", "id,email\n1,a@x\n2,b@x\n");
}

#[test]
fn check_passes_on_a_good_config() {
    let s = Sandbox::new();
    basic(&s);
    let out = s.idsync(&["check"]).expect_code(0);
    assert!(out.stdout.contains("ok"), "{}", out.stdout);
    assert!(!s.db().exists(), "check creates no repository");
}

#[test]
fn check_prints_every_broken_rule_with_file_line_col() {
    let s = Sandbox::new();
    basic(&s);
    s.rule("corr.rhai", "let a = 1;\nlet b = ;\n");
    s.rule("other.rhai", "fn f( {\n");
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(
        out.stderr.contains("rules/corr.rhai:2:9: "),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("rules/other.rhai:1:"), "{}", out.stderr);
    assert!(out.stderr.contains("2 problem(s)"), "{}", out.stderr);
    // run refuses to start on the same problems, and creates nothing.
    s.idsync(&["run", "--once"]).expect_code(2);
    assert!(!s.db().exists());
}

#[test]
fn check_reports_config_problems_together() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: [] }
    rules: { correlation: missing.rhai }
    mappings:
      - { to: mail, from: email, expr: account.email }
      - { to: cn, expr: 'account.cn +' }
",
    );
    let out = s.idsync(&["check"]).expect_code(2);
    let e = &out.stderr;
    assert!(e.contains("resources[0].source.key"), "{e}");
    assert!(
        e.contains("resources[0].rules.correlation") && e.contains("missing.rhai"),
        "{e}"
    );
    assert!(e.contains("resources[0].mappings[0]"), "{e}");
    assert!(e.contains("mappings[1](cn):1:"), "{e}");
}

#[test]
fn yaml_errors_name_line_and_column() {
    let s = Sandbox::new();
    s.config("resources:\n  - name: hr\n    source: { type: flatfile, path: a.csv, key: id }\n    create_unmatchd: false\n");
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(out.stderr.contains("idsync.yaml:4:5: "), "{}", out.stderr);
    assert!(out.stderr.contains("create_unmatchd"), "{}", out.stderr);
}

#[test]
fn config_flag_and_relative_paths() {
    let s = Sandbox::new();
    basic(&s);
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = s.path().join("idsync.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["--config", cfg.to_str().unwrap(), "run", "--once"])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        s.db().exists(),
        "the repository path resolves against the config folder"
    );
}

#[test]
fn identities_list_show_and_results_filters() {
    let s = Sandbox::new();
    basic(&s);
    let out = s.run_once(None, 0);
    assert!(
        out.stdout
            .contains("hr: 2 events; situations: unmatched 2; actions: created 2; failures: failed 0, rejected 0"),
        "{}",
        out.stdout
    );
    let list = s.idsync(&["identities", "list"]).expect_code(0);
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    assert!(list.stdout.contains("1\tenabled\thr:1"), "{}", list.stdout);
    let show = s.idsync(&["identities", "show", "2"]).expect_code(0);
    assert!(show.stdout.contains("mail: b@x"), "{}", show.stdout);
    assert!(show.stdout.contains("hr:2"), "{}", show.stdout);
    s.idsync(&["identities", "show", "nobody"]).expect_code(1);
    assert_eq!(s.results(&["--situation", "unmatched"]).len(), 2);
    assert_eq!(s.results(&["--situation", "linked"]).len(), 0);
    assert_eq!(s.results(&["--key", "2"]).len(), 1);
    assert_eq!(s.results(&["--failed"]).len(), 0);
    s.idsync(&["results", "--situation", "weird"])
        .expect_code(2);
}

#[test]
fn unreadable_rows_are_reported_and_the_rest_flows() {
    let s = Sandbox::new();
    basic(&s);
    s.feed("hr.csv", "id,email\n1,a@x\n2,b@x,extra\n3,c@x\n");
    let out = s.run_once(None, 1);
    assert!(out.stdout.contains("rejected 1"), "{}", out.stdout);
    let failed = s.failed();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["error"].as_str().unwrap().contains("hr.csv:3"),
        "{:?}",
        failed[0]
    );
    assert_eq!(s.export().len(), 2);
    // Fixed in the source: the row flows and its failure is superseded.
    s.feed("hr.csv", "id,email\n1,a@x\n2,b@x\n3,c@x\n");
    s.run_once(None, 0);
    assert_eq!(s.export().len(), 3);
    assert!(s.failed().is_empty());
}

#[test]
fn missing_feed_is_a_resource_error_naming_it() {
    let s = Sandbox::new();
    basic(&s);
    std::fs::remove_file(s.path().join("feeds/hr.csv")).unwrap();
    let out = s.idsync(&["run", "--once"]).expect_code(3);
    assert!(
        out.stderr.contains("hr") && out.stderr.contains("hr.csv"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_second_agent_on_the_same_repository_refuses_to_start() {
    let s = Sandbox::new();
    basic(&s);
    // No status endpoint: parallel tests must not meet on the default port.
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&format!("status: {{ listen: off }}\n{config}"));
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["run"])
        .current_dir(s.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first agent has done its first pass once the identities are there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.export().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "first agent never synced"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = s.idsync(&["run", "--once"]).expect_code(3);
    assert!(
        out.stderr.contains("another idsync agent"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("pid {}", first.id())),
        "{}",
        out.stderr
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // Killed hard, the lock is gone with the process.
    s.run_once(None, 0);
}

#[test]
fn json_logs_carry_resource_and_key() {
    let s = Sandbox::new();
    basic(&s);
    s.rule("corr.rhai", "throw \"no luck\"");
    let out = s
        .idsync(&["--log-format", "json", "run", "--once"])
        .expect_code(1);
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("event failed"))
        })
        .collect();
    assert_eq!(failed.len(), 2, "{}", out.stderr);
    assert_eq!(failed[0]["span"]["resource"], "hr");
    assert_eq!(failed[0]["span"]["key"], "1");
    assert_eq!(failed[1]["span"]["key"], "2");
    assert_eq!(failed[0]["level"], "WARN");

    // The filter docs/operations.md gives, with the jq binary, follows one account.
    let mut jq = std::process::Command::new("jq")
        .args(["-c", r#"select(.span.key == "1")"#])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("jq (apt-get install jq; scripts/test.sh installs it)");
    {
        use std::io::Write;
        jq.stdin
            .take()
            .unwrap()
            .write_all(out.stderr.as_bytes())
            .unwrap();
    }
    let picked = jq.wait_with_output().unwrap();
    assert!(picked.status.success());
    let picked: Vec<serde_json::Value> = String::from_utf8(picked.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(picked.len(), 1, "{picked:?}");
    assert_eq!(picked[0]["span"]["key"], "1");
    assert!(
        picked[0]["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("no luck"),
        "{picked:?}"
    );
}

#[test]
fn long_passes_show_a_progress_bar_only_on_a_terminal() {
    let s = Sandbox::new();
    s.config(
        "resources:\n  - name: hr\n    source: { type: flatfile, path: feeds/hr.csv, key: id }\n",
    );
    let mut csv = String::from("id,cn\n");
    for i in 0..2000 {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    s.feed("hr.csv", &csv);
    // Not a terminal: no bar.
    let plain = s.run_once(None, 0);
    assert!(!plain.stderr.contains("events,"), "{}", plain.stderr);
    // A terminal (util-linux `script` gives the command a pseudo-terminal): a bar.
    s.feed("hr.csv", &csv.replace(",n", ",m"));
    let bin = env!("CARGO_BIN_EXE_idsync");
    let out = std::process::Command::new("script")
        .args(["-qec", &format!("{bin} run --once"), "/dev/null"])
        .current_dir(s.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("hr [") && text.contains("/2000 events"),
        "{text}"
    );
}

/// Values with escape sequences, CR, NUL-like controls and line breaks are printed escaped:
/// they can neither drive the terminal nor forge a line of the output.
#[test]
fn control_characters_in_values_are_printed_escaped() {
    let s = Sandbox::new();
    s.config(
        r#"resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id, multiline: true }
    naming: 'account.id'
    populate_global: true
"#,
    );
    s.feed(
        "hr.csv",
        "id,title\n1,\"\u{1b}[31mred\u{1b}[0m\rover\u{7}\nforged: line\u{9b}x\"\n",
    );
    s.run_once(None, 0);
    for args in [
        &["identities", "show", "1"][..],
        &["identities", "list"][..],
        &["results"][..],
        &["explain", "hr", "1"][..],
    ] {
        let out = s.idsync(args).expect_code(0).stdout;
        assert!(
            !out.chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{args:?} printed a raw control character: {out:?}"
        );
        assert!(
            !out.lines().any(|l| l.starts_with("forged")),
            "{args:?} let a value forge a line: {out}"
        );
    }
    let show = s.idsync(&["identities", "show", "1"]).stdout;
    assert!(
        show.contains("\\u001b[31mred\\u001b[0m\\rover\\u0007\\nforged: line\\u009bx"),
        "{show}"
    );
    // JSON keeps the value exact.
    assert_eq!(
        common::attr(&s.identity("1").unwrap(), "title"),
        Some("\u{1b}[31mred\u{1b}[0m\rover\u{7}\nforged: line\u{9b}x")
    );
}

#[test]
fn a_closed_stdout_ends_the_output_quietly_and_every_resource_is_synchronized() {
    // `idsync run --once | head -1`, deterministically: the reader has gone before the
    // first line, so every line of the pass meets a broken pipe.
    let s = Sandbox::new();
    let mut config = String::from("resources:\n");
    for (key, name) in ["hr", "badges", "payroll"].into_iter().enumerate() {
        config.push_str(&format!(
            "  - name: {name}
    source: {{ type: flatfile, path: feeds/{name}.csv, key: id }}
    rules: {{ correlation: corr.rhai }}
    mappings:
      - {{ to: mail, from: email }}
"
        ));
        s.feed(
            &format!("{name}.csv"),
            &format!("id,email\n{key},{name}@x\n"),
        );
    }
    s.config(&config);
    s.rule("corr.rhai", "#{ mail: account.email }");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["run", "--once"])
        .current_dir(s.path())
        .env_remove("IDSYNC_LOG")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "a closed stdout is no error: {stderr}");
    for (key, name) in ["hr", "badges", "payroll"].into_iter().enumerate() {
        assert!(
            s.owner(name, &key.to_string()).is_some(),
            "{name} was not synchronized: {:?}",
            s.export()
        );
    }
}

#[test]
fn check_finds_undefined_variables_with_file_line_col() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    rules: { filter: filter.rhai, correlation: corr.rhai, confirmation: confirm.rhai }
    naming: 'account.mail'
    mappings:
      - { to: mail, from: email }
      - { to: seen, expr: 'if identity == () { account.id } else { identity.attrs.seen }' }
",
    );
    s.rule(
        "filter.rhai",
        "let kind = account.type;\nkind == () || identity != ()\n",
    );
    s.rule("corr.rhai", "#{ mail: acount.email }");
    // The confirmation rule gets `identity`: no finding there.
    s.rule("confirm.rhai", "identity.attrs.mail == account.email");
    let out = s.idsync(&["check"]).expect_code(2);
    assert!(
        out.stderr
            .contains("rules/corr.rhai:1:10: undefined variable: acount"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("rules/filter.rhai:2:15: undefined variable: identity"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("2 problem(s)"), "{}", out.stderr);
}

#[test]
fn check_finds_missing_secrets_and_key_columns() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: employee_id }
  - name: dir
    source:
      type: ldap
      url: ldap://127.0.0.1:1/
      base: dc=example,dc=com
      bind_dn: cn=idsync,dc=example,dc=com
      bind_password_env: IDSYNC_TEST_UNSET_LDAP_PASSWORD
  - name: badges
    source:
      type: ldap
      url: ldap://127.0.0.1:1/
      base: dc=example,dc=com
      bind_dn: cn=idsync,dc=example,dc=com
      bind_password_file: secrets/ldap
notifications:
  from: it@example.com
  transport: { type: smtp, host: 127.0.0.1, tls: none, username: idsync, password_env: IDSYNC_TEST_UNSET_SMTP_PASSWORD }
  policies: []
",
    );
    s.feed("hr.csv", "empno,mail\n1,a@x\n");
    let out = s.idsync(&["check"]).expect_code(2);
    let err = &out.stderr;
    assert!(err.contains("IDSYNC_TEST_UNSET_SMTP_PASSWORD"), "{err}");
    // The SMTP problem is a config problem: fixed first, the others show.
    s.write("smtp-password", "x");
    let config = std::fs::read_to_string(s.path().join("idsync.yaml"))
        .unwrap()
        .replace(
            "password_env: IDSYNC_TEST_UNSET_SMTP_PASSWORD",
            "password_file: smtp-password",
        );
    s.config(&config);
    let out = s.idsync(&["check"]).expect_code(2);
    let err = &out.stderr;
    assert!(
        err.contains(
            "resources[0] (hr).source.key: key column 'employee_id' is not in the header of"
        ),
        "{err}"
    );
    assert!(
        err.contains("resources[1] (dir).source: cannot read the bind password from $IDSYNC_TEST_UNSET_LDAP_PASSWORD: the variable is not set"),
        "{err}"
    );
    assert!(
        err.contains("resources[2] (badges).source: cannot read the bind password from")
            && err.contains("secrets/ldap"),
        "{err}"
    );
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn check_connect_reports_each_connection_without_its_password() {
    let s = Sandbox::new();
    let closed = common::free_port();
    let mut smtp = common::SmtpServer::on_port(&s.path().join("smtp"), common::free_port());
    smtp.start();
    s.config(&format!(
        "resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id }}
  - name: dir
    source:
      type: ldap
      url: ldap://127.0.0.1:{closed}/
      base: dc=example,dc=com
      bind_dn: cn=idsync,dc=example,dc=com
      bind_password_env: IDSYNC_TEST_LDAP_PASSWORD
notifications:
  from: it@example.com
  transport: {{ type: smtp, host: 127.0.0.1, port: {}, tls: none }}
  policies: []
",
        smtp.port
    ));
    let secret = "s3cret-never-shown";
    let out = s.idsync_env(
        &["check", "--connect"],
        &[("IDSYNC_TEST_LDAP_PASSWORD", secret)],
    );
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!text.contains(secret), "{text}");
    assert!(
        out.stdout.contains(&format!(
            "connect: resource dir (ldap://127.0.0.1:{closed}/): "
        )) && !out
            .stdout
            .contains(&format!("resource dir (ldap://127.0.0.1:{closed}/): ok")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "connect: notifications transport (smtp 127.0.0.1:{}): ok",
            smtp.port
        )),
        "{}",
        out.stdout
    );
    // Without --connect nothing is contacted, and the config is fine.
    s.idsync_env(&["check"], &[("IDSYNC_TEST_LDAP_PASSWORD", secret)])
        .expect_code(0);
    smtp.stop();
    let out = s.idsync_env(
        &["check", "--connect"],
        &[("IDSYNC_TEST_LDAP_PASSWORD", secret)],
    );
    assert!(
        out.stdout.contains(&format!(
            "connect: notifications transport (smtp 127.0.0.1:{}): connecting to 127.0.0.1:",
            smtp.port
        )),
        "{}",
        out.stdout
    );
}

#[test]
fn help_says_what_idsync_does_and_lists_global_options_once() {
    let s = Sandbox::new();
    let top = s.idsync(&["--help"]).expect_code(0).stdout;
    assert!(
        top.starts_with("Keeps your identities in step with your HR feeds"),
        "{top}"
    );
    assert!(
        top.contains("Usage: idsync [GLOBAL OPTIONS] <COMMAND>"),
        "{top}"
    );
    assert_eq!(top.matches("--config").count(), 1, "{top}");
    assert_eq!(top.matches("--log-format").count(), 1, "{top}");
    for command in [
        &["check", "--help"][..],
        &["run", "--help"],
        &["results", "--help"],
    ] {
        let help = s.idsync(command).expect_code(0).stdout;
        assert!(
            !help.contains("--config") && !help.contains("--log-format"),
            "{command:?}: {help}"
        );
    }
    // Still accepted after the command.
    s.config("resources: []\n");
    let out = s.idsync(&["check", "--config", "other.yaml"]);
    assert!(out.stderr.contains("other.yaml"), "{}", out.stderr);
}
