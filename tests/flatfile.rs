//! The flat-file adapter through the real binary: watching (atomic rename, in-place rewrite,
//! delete and re-create, polling fallback, a folder of dated files), write completion (a
//! slow writer, a marker file), CSV options, bad input, the accidental-delete guard and
//! snapshots. Assertions read the repository back through the CLI.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Run, Sandbox, attr, eventually};

/// A sandbox with one resource `hr` over `feeds/hr.csv` keyed by `id`, every account
/// attribute copied to its identity; `source_extra` is added to the source map.
fn world(source_extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "poll_interval_secs: 60
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id{source_extra} }}
    populate_global: true
"
    ));
    s
}

/// The identities' `id → cn` (linked accounts only).
fn names(s: &Sandbox) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = s
        .export()
        .iter()
        .filter(|i| !i["accounts"].as_array().unwrap().is_empty())
        .map(|i| {
            (
                attr(i, "id").unwrap_or("").to_owned(),
                attr(i, "cn").unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// The `op` of the decision records `results ARGS` lists, in order.
fn ops(s: &Sandbox, args: &[&str]) -> Vec<String> {
    s.results(args)
        .iter()
        .map(|d| d["op"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the linked identities are exactly `want`.
fn wait_for(s: &Sandbox, want: &[(&str, &str)]) {
    let want = pairs(want);
    eventually(20, &format!("identities {want:?}"), || {
        (names(s) == want).then_some(())
    });
}

// --- watching -------------------------------------------------------------------------

fn watch_scenario(env: &[(&str, &str)]) {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    let agent = s.start_agent(env);
    wait_for(&s, &[("1", "Ann")]);

    // Atomic replace by rename.
    s.replace_atomically("feeds/hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    wait_for(&s, &[("1", "Ann"), ("2", "Bob")]);

    // In-place rewrite.
    s.feed("hr.csv", "id,cn\n1,Ann Lee\n2,Bob\n");
    wait_for(&s, &[("1", "Ann Lee"), ("2", "Bob")]);

    // Delete, then re-create.
    std::fs::remove_file(s.path().join("feeds/hr.csv")).unwrap();
    s.feed("hr.csv", "id,cn\n1,Ann Lee\n2,Bob\n3,Cy\n");
    wait_for(&s, &[("1", "Ann Lee"), ("2", "Bob"), ("3", "Cy")]);
    agent.stop();
}

/// An in-place rewrite of the same size whose writer then puts the old modification time
/// back (a copy with `cp -p`, `rsync -t`): the polling fallback, which compares names,
/// sizes and times once a second, cannot see it; only the kernel's close-after-write event
/// can wake the resource before its next periodic pass, an hour away.
fn invisible_to_polling(s: &Sandbox) {
    let path = s.path().join("feeds/hr.csv");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let old = std::fs::read_to_string(&path).unwrap();
    let new = old.replace("Bob", "Rob");
    assert_eq!(old.len(), new.len());
    std::fs::write(&path, new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.len(), meta.modified().unwrap()),
        (old.len() as u64, mtime)
    );
}

#[test]
fn watch_atomic_rename_rewrite_delete_recreate() {
    watch_scenario(&[]);
    // The agent really watches (inotify), not a silent fallback to polling: a change that
    // polling cannot see wakes it.
    let s = world(", completion: rename");
    let yaml = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&yaml.replace("poll_interval_secs: 60", "poll_interval_secs: 3600"));
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    let agent = s.start_agent(&[]);
    wait_for(&s, &[("1", "Ann"), ("2", "Bob")]);
    invisible_to_polling(&s);
    eventually(
        20,
        "the change seen by the watcher (a polling agent never sees it)",
        || (names(&s) == pairs(&[("1", "Ann"), ("2", "Rob")])).then_some(()),
    );
    agent.stop();
}

#[test]
fn watch_polling_fallback() {
    watch_scenario(&[("IDSYNC_WATCH", "poll")]);
}

#[test]
fn folder_of_dated_files_in_order_then_archived() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source:
      type: flatfile
      path: feeds/in
      pattern: 'hr-*.csv'
      after: archive
      completion: rename
      key: id
    populate_global: true
",
    );
    s.write("feeds/in/hr-2026-11-02.csv", "id,cn\n1,Ann Lee\n2,Bob\n");
    s.write("feeds/in/hr-2026-11-01.csv", "id,cn\n1,Ann\n");
    s.write("feeds/in/other.csv", "id,cn\n9,Not me\n");
    // The preview covers both files, the second diffed against what the first leaves (Ann
    // renamed is an update, not a create), and writes nothing.
    let preview = s.idsync(&["preview"]).expect_code(0);
    assert!(
        preview.stdout.contains("hr 1 upsert") && preview.stdout.contains("hr 1 update"),
        "{}",
        preview.stdout
    );
    assert!(preview.stdout.contains("hr 2 "), "{}", preview.stdout);
    assert!(
        preview.stdout.contains("hr: 3 events"),
        "{}",
        preview.stdout
    );
    assert!(!s.db().exists(), "a preview creates no repository");
    assert!(
        s.path().join("feeds/in/hr-2026-11-01.csv").exists(),
        "nor archives"
    );
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 3 events"), "{}", out.stdout);
    // Day 1 created Ann, day 2 renamed her and added Bob: in that order.
    let ann = ops(&s, &["--key", "1"]);
    assert_eq!(ann, ["upsert", "update"]);
    assert_eq!(names(&s), pairs(&[("1", "Ann Lee"), ("2", "Bob")]));

    // The next run archives what is committed and finds nothing new.
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
    let archived = s.path().join("feeds/in/archive");
    assert!(archived.join("hr-2026-11-01.csv").exists());
    assert!(archived.join("hr-2026-11-02.csv").exists());
    assert!(s.path().join("feeds/in/other.csv").exists());

    // A new day.
    s.write(
        "feeds/in/hr-2026-11-03.csv",
        "id,cn\n1,Ann Lee\n2,Bob\n3,Cy\n",
    );
    s.run_once(None, 0);
    assert_eq!(names(&s).len(), 3);
}

// --- write completion -----------------------------------------------------------------

#[test]
fn slow_writer_is_read_once_complete() {
    let s = world(", settle_ms: 1500");
    let path = s.path().join("feeds/hr.csv");
    let mut first = String::from("id,cn\n");
    for i in 0..7 {
        first.push_str(&format!("{i},Person {i}\n"));
    }
    s.feed("hr.csv", &first);
    let agent = s.start_agent(&[]);
    let v1: Vec<(String, String)> = (0..7)
        .map(|i| (i.to_string(), format!("Person {i}")))
        .collect();
    eventually(20, "the first file", || (names(&s) == v1).then_some(()));

    // Rewrite in place, in slow chunks, each write closing the file (a wake-up each time).
    // A half-written file read now would delete the rows not written yet.
    std::fs::write(&path, "id,cn\n").unwrap();
    for i in 0..7 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "{i},Person {i} v2").unwrap();
        drop(f);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let v2: Vec<(String, String)> = (0..7)
        .map(|i| (i.to_string(), format!("Person {i} v2")))
        .collect();
    eventually(20, "the rewritten file", || (names(&s) == v2).then_some(()));
    agent.stop();
    let results = s.results(&[]);
    let ops: Vec<&str> = results.iter().map(|d| d["op"].as_str().unwrap()).collect();
    assert!(!ops.contains(&"delete"), "a partial file was read: {ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "update").count(), 7, "{ops:?}");
}

#[test]
fn marker_file_gates_the_read() {
    let s = world(", completion: marker");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
    assert!(s.export().is_empty());
    s.write("feeds/hr.csv.done", "");
    s.run_once(None, 0);
    assert_eq!(names(&s), pairs(&[("1", "Ann")]));
}

// --- CSV options ----------------------------------------------------------------------

#[test]
fn csv_options_delimiter_quote_columns_composite_key_latin1_multi_comment() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source:
      type: flatfile
      path: feeds/hr.csv
      completion: rename
      key: [company, id]
      delimiter: ';'
      quote: \"'\"
      header: false
      columns: [company, id, cn, groups]
      encoding: latin-1
      comment: '#'
      trim: true
      multi_valued: { groups: '|' }
    populate_global: true
",
    );
    // Latin-1 bytes: "Zoë" is 0x5A 0x6F 0xEB.
    let mut bytes = b"# exported by HR\nACME; 1 ;'Zo".to_vec();
    bytes.push(0xEB);
    bytes.extend_from_slice(b"; the boss';admins| staff |\nACME;2;Bob;\n");
    std::fs::write(s.path().join("feeds/hr.csv"), bytes).unwrap();
    s.run_once(None, 0);
    let zoe = s
        .identity("ACME+1")
        .expect("composite key names the identity");
    assert_eq!(attr(&zoe, "cn"), Some("Zoë; the boss"));
    assert_eq!(
        zoe["attrs"]["groups"],
        serde_json::json!(["admins", "staff"])
    );
    assert!(s.identity("ACME+2").is_some());
}

#[test]
fn utf8_bom_and_header() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "\u{feff}id,cn\n1,\"Lee, Ann\"\n");
    s.run_once(None, 0);
    assert_eq!(names(&s), pairs(&[("1", "Lee, Ann")]));
}

// --- bad input ------------------------------------------------------------------------

#[test]
fn malformed_rows_fail_alone_with_file_and_line() {
    let s = world(", completion: rename");
    let mut bytes = b"id,cn\n1,Ann\n2,Bob,extra\n3,Cy\n4,".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b"\n5,Di\n");
    std::fs::write(s.path().join("feeds/hr.csv"), bytes).unwrap();
    let out = s.run_once(None, 1);
    assert!(out.stdout.contains("rejected 2"), "{}", out.stdout);
    assert_eq!(names(&s), pairs(&[("1", "Ann"), ("3", "Cy"), ("5", "Di")]));
    let failed = s.failed();
    let errors: Vec<&str> = failed
        .iter()
        .map(|f| f["error"].as_str().unwrap())
        .collect();
    assert!(
        errors[0].starts_with("hr.csv:3: has 3 fields, expected 2"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("hr.csv:5: not valid UTF-8"),
        "{errors:?}"
    );
}

#[test]
fn bad_quoting_is_a_failed_row_with_a_hint() {
    let s = world(", completion: rename");
    // The quote opened on line 3 closes on line 4: one record of 3 fields over two lines.
    s.feed("hr.csv", "id,cn\n1,Ann\n2,\"Bob\n3,Cy\",x\n4,Di\n");
    let out = s.run_once(None, 1);
    assert!(out.stdout.contains("rejected 1"), "{}", out.stdout);
    assert_eq!(names(&s), pairs(&[("1", "Ann"), ("4", "Di")]));
    let error = s.failed()[0]["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("hr.csv:3:") && error.contains("is a quote unbalanced?"),
        "{error}"
    );
}

#[test]
fn duplicate_key_fails_both_rows_and_keeps_the_account() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    s.run_once(None, 0);
    s.feed("hr.csv", "id,cn\n1,Ann Lee\n2,Bob\n1,Annie\n");
    s.run_once(None, 1);
    assert_eq!(names(&s), pairs(&[("1", "Ann"), ("2", "Bob")]));
    let errors: Vec<String> = s
        .failed()
        .iter()
        .map(|f| f["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("hr.csv:2: duplicate key '1' also on line 4"));
    assert!(errors[1].contains("hr.csv:4: duplicate key '1' also on line 2"));
}

#[test]
fn missing_key_column_stops_the_resource() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "emp,cn\n1,Ann\n");
    let out = s.run_once(None, 3);
    assert!(
        out.stderr
            .contains("key column 'id' is not in the header of")
            && out.stderr.contains("hr.csv"),
        "{}",
        out.stderr
    );
    assert!(s.export().is_empty());
}

#[test]
fn changed_header_stops_until_the_config_changes_and_added_columns_are_attributes() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn,title\n1,Ann,Clerk\n");
    s.run_once(None, 0);

    // An added column becomes a new attribute.
    s.feed("hr.csv", "id,cn,title,mail\n1,Ann,Clerk,ann@x\n");
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("1").unwrap(), "mail"), Some("ann@x"));

    // A renamed column stops the resource, with nothing applied.
    s.feed("hr.csv", "id,cn,job,mail\n1,Ann,Boss,ann@x\n");
    let out = s.run_once(None, 3);
    assert!(
        out.stderr.contains("column(s) 'title' removed or renamed"),
        "{}",
        out.stderr
    );
    let out = s.run_once(None, 3);
    assert!(out.stderr.contains("header_version"), "{}", out.stderr);
    assert_eq!(attr(&s.identity("1").unwrap(), "title"), Some("Clerk"));

    // The operator reviewed it and changed the config.
    let yaml = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&yaml.replace(
        "completion: rename",
        "completion: rename, header_version: 2",
    ));
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("1").unwrap(), "job"), Some("Boss"));
}

// --- feeds that lie (issue 13, point 2) -------------------------------------------------

/// Like [`world`], but a deleted account disables its identity (what an HR feed does), so a
/// wrong delete shows as a disabled identity.
fn disabling_world(source_extra: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "poll_interval_secs: 60
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id, completion: rename{source_extra} }}
    populate_global: true
    delete_action: disable
"
    ));
    s
}

/// `id,cn,title` with `n` rows `i,P{i},Engineer`.
fn staff(n: usize) -> String {
    let mut csv = String::from("id,cn,title\n");
    for i in 1..=n {
        csv.push_str(&format!("{i},P{i},Engineer\n"));
    }
    csv
}

/// Every exported identity by name.
fn by_name(s: &Sandbox) -> std::collections::BTreeMap<String, serde_json::Value> {
    s.export()
        .into_iter()
        .map(|i| (i["name"].as_str().unwrap().to_owned(), i))
        .collect()
}

/// Asserts that every identity but those in `changed` is exactly as in `before`, and none
/// is disabled or unlinked.
fn unchanged_but(
    before: &std::collections::BTreeMap<String, serde_json::Value>,
    s: &Sandbox,
    changed: &[&str],
) {
    let after = by_name(s);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (name, identity) in &after {
        assert_ne!(identity["disabled"], true, "{name} was disabled");
        assert_eq!(
            identity["accounts"].as_array().unwrap().len(),
            1,
            "{name} lost its account"
        );
        if !changed.contains(&name.as_str()) {
            assert_eq!(identity, &before[name], "{name} changed");
        }
    }
}

#[test]
fn stray_quote_swallowing_rows_changes_no_account_and_good_rows_flow() {
    let s = disabling_world("");
    s.feed("hr.csv", &staff(10));
    s.run_once(None, 0);
    let before = by_name(&s);
    // Row 3 (line 4) opens a quote that row 9 (line 10) closes; the field count comes out
    // right, so only the line break gives it away. Row 10 really changed.
    let lying = staff(10)
        .replace("3,P3,Engineer", "3,\"P3,Engineer")
        .replace("9,P9,Engineer", "9,P9\",Engineer")
        .replace("10,P10,Engineer", "10,P10,Manager");
    s.feed("hr.csv", &lying);
    let out = s.run_once(None, 1);
    assert!(out.stdout.contains("rejected 1"), "{}", out.stdout);
    unchanged_but(&before, &s, &["10"]);
    assert_eq!(attr(&s.identity("10").unwrap(), "title"), Some("Manager"));
    let failed = s.failed();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "hr.csv:4: a quoted value in column 'cn' opens on line 4 and runs to line 10"
        ),
        "{error}"
    );
    assert!(
        out.stderr
            .contains("hr.csv: no account is deleted this pass")
            && out.stderr.contains("lines 4-10"),
        "{}",
        out.stderr
    );
}

#[test]
fn cut_tail_stores_nothing_and_is_read_once_complete() {
    let s = disabling_world("");
    let full = staff(200);
    s.feed("hr.csv", &full);
    s.run_once(None, 0);
    let before = by_name(&s);
    // Cut 10% short, in the middle of row 181's title.
    let at = full.find("181,P181,Engineer").unwrap() + "181,P181,Engin".len();
    s.feed("hr.csv", &full[..at]);
    let out = s.run_once(None, 3);
    assert!(
        out.stderr
            .contains("hr.csv is incomplete: its last line (line 182) has no line ending"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("Engin,") && !out.stdout.contains("Engin"));
    unchanged_but(&before, &s, &[]);

    // The agent retries: once the writer finishes the file, it is read.
    let agent = s.start_agent(&[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path().join("feeds/hr.csv"))
            .unwrap();
        let rest = full[at..].replace("200,P200,Engineer", "200,P200,Manager");
        f.write_all(rest.as_bytes()).unwrap();
    }
    eventually(20, "the completed file", || {
        (attr(&s.identity("200")?, "title") == Some("Manager")).then_some(())
    });
    agent.stop();
    unchanged_but(&before, &s, &["200"]);
}

#[test]
fn a_feed_without_a_final_line_ending_is_read_when_allowed() {
    let s = disabling_world(", require_final_newline: false");
    s.feed("hr.csv", "id,cn,title\n1,P1,Engineer");
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("1").unwrap(), "title"), Some("Engineer"));
}

#[test]
fn empty_key_changes_no_account_and_good_rows_flow() {
    let s = disabling_world("");
    s.feed("hr.csv", &staff(5));
    s.run_once(None, 0);
    let before = by_name(&s);
    // Row 3's key is empty (line 4): account 3 is "missing", but it may be that row.
    let lying = staff(5)
        .replace("3,P3,Engineer", ",P3,Engineer")
        .replace("5,P5,Engineer", "5,P5,Manager");
    s.feed("hr.csv", &lying);
    let out = s.run_once(None, 1);
    unchanged_but(&before, &s, &["5"]);
    assert_eq!(attr(&s.identity("5").unwrap(), "title"), Some("Manager"));
    let failed = s.failed();
    assert_eq!(
        failed[0]["error"].as_str().unwrap(),
        "hr.csv:4: empty key column 'id'"
    );
    assert!(
        out.stderr.contains(
            "hr.csv: no account is deleted this pass: 1 account(s) missing from the file are kept"
        ) && out.stderr.contains("on line 4"),
        "{}",
        out.stderr
    );
}

// --- the feed path is not trusted (issue 13, point 3) ------------------------------------

/// The first line of the file a link points to: it must never show anywhere.
const SECRET: &str = "s3cr3t-password-line";

/// Writes `secret.txt` (outside `feeds/`), whose first line is [`SECRET`]; returns its path.
fn secret_file(s: &Sandbox) -> std::path::PathBuf {
    let path = s.path().join("secret.txt");
    std::fs::write(&path, format!("{SECRET}\nsecond line\n")).unwrap();
    path
}

fn mkfifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "{what} shows the link target's content:\n{text}"
    );
}

/// `idsync ARGS`, which must end within `secs` (else it is killed and the test fails).
fn run_within(s: &Sandbox, args: &[&str], secs: u64) -> Run {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(args)
        .current_dir(s.path())
        .env_remove("IDSYNC_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = r.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("idsync {args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A sandbox with resource `hr` over `feeds/hr.csv` (`source_extra` added to its source)
/// and resource `badges` over a good `feeds/badges.csv`, which must not be starved by `hr`.
fn two_resources(source_extra: &str, listen: &str) -> Sandbox {
    let s = Sandbox::new();
    s.config(&format!(
        "poll_interval_secs: 60
status: {{ listen: {listen} }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id{source_extra} }}
    populate_global: true
  - name: badges
    source: {{ type: flatfile, path: feeds/badges.csv, key: badge, completion: rename }}
    naming: '\"badge-\" + account.badge'
"
    ));
    s.feed("badges.csv", "badge\nB1\n");
    s
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Runs the agent over a sandbox from [`two_resources`] whose `hr` feed path is refused:
/// `badges` is synchronized anyway, `hr` is reported failing with `why` in the status
/// file, `idsync status` and `/readyz`, none of which (nor the agent's log) shows
/// [`SECRET`]; SIGTERM stops the agent promptly.
fn agent_refuses(s: &Sandbox, why: &str) {
    /// Kills the agent if the test fails before it stopped.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = std::fs::File::create(s.path().join("agent.log")).unwrap();
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args(["run"])
        .current_dir(s.path())
        .env("IDSYNC_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut agent = Guard(agent);
    let status_file = s.path().join("idsync.db.status.json");
    eventually(20, "hr failing and badges synchronized", || {
        let text = std::fs::read_to_string(&status_file).ok()?;
        (text.contains("failing") && s.identity("badge-B1").is_some()).then_some(())
    });
    let file = std::fs::read_to_string(&status_file).unwrap();
    assert!(file.contains(why), "{file}");
    assert_no_secret("the status file", &file);
    let status = s.idsync(&["status"]).expect_code(0);
    assert!(status.stdout.contains(why), "{}", status.stdout);
    assert_no_secret("idsync status", &status.stdout);
    assert_no_secret("idsync status", &status.stderr);
    let json = s.idsync(&["status", "--json"]).expect_code(0);
    assert_no_secret("idsync status --json", &json.stdout);
    let port = eventually(10, "the status endpoint", || {
        common::endpoint_port(&std::fs::read_to_string(s.path().join("agent.log")).unwrap())
    });
    let ready = eventually(10, "/readyz", || http_get(port, "/readyz"));
    assert!(ready.contains("503") && ready.contains("hr:"), "{ready}");
    assert_no_secret("/readyz", &ready);

    let started = std::time::Instant::now();
    let pid = agent.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let code = eventually(10, "the agent to stop on SIGTERM", || {
        agent.0.try_wait().unwrap().map(|st| st.code())
    });
    assert_eq!(code, Some(0));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let log = std::fs::read_to_string(s.path().join("agent.log")).unwrap();
    assert!(log.contains(why), "{log}");
    assert_no_secret("the agent's log", &log);
}

#[test]
fn symlink_at_the_feed_path_is_refused_without_showing_its_target() {
    let s = two_resources(", completion: rename", "\"127.0.0.1:0\"");
    let secret = secret_file(&s);
    std::os::unix::fs::symlink(&secret, s.path().join("feeds/hr.csv")).unwrap();
    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("hr.csv is a symbolic link: refused"),
        "{}",
        out.stderr
    );
    assert_no_secret("stdout", &out.stdout);
    assert_no_secret("stderr", &out.stderr);
    agent_refuses(&s, "is a symbolic link: refused");
}

#[test]
fn fifo_at_the_feed_path_is_refused_at_once_and_starves_nothing() {
    // Default completion (settle): the refusal must not wait for a settle time either.
    let s = two_resources("", "\"127.0.0.1:0\"");
    secret_file(&s);
    mkfifo(&s.path().join("feeds/hr.csv"));
    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("hr.csv is a FIFO (named pipe), not a regular file: refused"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("badges: 1 events"), "{}", out.stdout);
    agent_refuses(&s, "is a FIFO (named pipe), not a regular file");
}

#[test]
fn link_to_dev_zero_is_refused_promptly_followed_or_not() {
    let s = disabling_world("");
    std::os::unix::fs::symlink("/dev/zero", s.path().join("feeds/hr.csv")).unwrap();
    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("hr.csv is a symbolic link: refused"),
        "{}",
        out.stderr
    );
    // Followed, it is still no regular file.
    let yaml = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&yaml.replace(
        "completion: rename",
        "completion: rename, follow_symlinks: true",
    ));
    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("hr.csv is a character device, not a regular file: refused"),
        "{}",
        out.stderr
    );
    // A link to a regular file is read through when allowed.
    std::fs::remove_file(s.path().join("feeds/hr.csv")).unwrap();
    s.write("elsewhere/hr.csv", "id,cn,title\n1,P1,Engineer\n");
    std::os::unix::fs::symlink(
        s.path().join("elsewhere/hr.csv"),
        s.path().join("feeds/hr.csv"),
    )
    .unwrap();
    run_within(&s, &["run", "--once"], 10);
    assert_eq!(attr(&s.identity("1").unwrap(), "title"), Some("Engineer"));
}

#[test]
fn folder_mode_refuses_a_symlink_or_fifo_among_the_files() {
    let s = Sandbox::new();
    s.config(
        "resources:
  - name: hr
    source:
      type: flatfile
      path: feeds/in
      pattern: 'hr-*.csv'
      completion: rename
      key: id
    populate_global: true
    delete_action: disable
",
    );
    s.write("feeds/in/hr-2026-11-01.csv", "id,cn\n1,Ann\n2,Bob\n");
    s.run_once(None, 0);
    let before = by_name(&s);
    let secret = secret_file(&s);
    let dir = s.path().join("feeds/in");
    std::os::unix::fs::symlink(&secret, dir.join("hr-2026-11-02.csv")).unwrap();
    mkfifo(&dir.join("hr-2026-11-03.csv"));

    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("hr-2026-11-02.csv is a symbolic link: refused"),
        "{}",
        out.stderr
    );
    assert_no_secret("stderr", &out.stderr);
    assert_no_secret("stdout", &out.stdout);
    unchanged_but(&before, &s, &[]);

    std::fs::remove_file(dir.join("hr-2026-11-02.csv")).unwrap();
    let out = run_within(&s, &["run", "--once"], 10);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("hr-2026-11-03.csv is a FIFO (named pipe), not a regular file"),
        "{}",
        out.stderr
    );
    unchanged_but(&before, &s, &[]);

    // Replaced by a real file, the day is read.
    std::fs::remove_file(dir.join("hr-2026-11-03.csv")).unwrap();
    s.write("feeds/in/hr-2026-11-03.csv", "id,cn\n1,Ann Lee\n2,Bob\n");
    s.run_once(None, 0);
    assert_eq!(attr(&s.identity("1").unwrap(), "cn"), Some("Ann Lee"));
}

// --- accidental-delete guard ----------------------------------------------------------

fn many(n: usize) -> String {
    let mut csv = String::from("id,cn\n");
    for i in 0..n {
        csv.push_str(&format!("{i},P{i}\n"));
    }
    csv
}

/// The repository as a refused pass must leave it: every identity, every decision record
/// and the checkpoint.
#[derive(Debug, PartialEq)]
struct State {
    identities: Vec<serde_json::Value>,
    records: usize,
    checkpoint: Option<String>,
}

fn state(s: &Sandbox) -> State {
    State {
        identities: s.export(),
        records: s.results(&["-n", "100000"]).len(),
        checkpoint: s.checkpoint("hr"),
    }
}

/// `run --once` refused by the guard (exit 3, the guard named in stderr) with nothing
/// applied: no identity changed, no decision recorded, the checkpoint unmoved. The feed
/// also changes row 1's name, so a pass that went through would show.
fn refused(s: &Sandbox, csv: &str, why: &str) {
    let before = state(s);
    let csv = csv.replace("\n1,P1\n", "\n1,Renamed\n");
    s.feed("hr.csv", &csv);
    let out = s.run_once(None, 3);
    assert!(
        out.stderr.contains("accidental-delete guard")
            && out.stderr.contains(why)
            && out.stderr.contains("--accept-deletes hr"),
        "{}",
        out.stderr
    );
    assert_eq!(state(s), before, "a refused pass applied something");
}

#[test]
fn empty_file_is_caught_by_the_guard_until_accepted() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    s.run_once(None, 0);
    refused(&s, "id,cn\n", "the source has no records");
    // Still refused at the next run.
    refused(&s, "id,cn\n", "the source has no records");
    s.idsync(&["run", "--once", "--accept-deletes", "hr"])
        .expect_code(0);
    assert!(names(&s).is_empty());
    assert_eq!(s.results(&["--situation", "deleted"]).len(), 2);
}

#[test]
fn truncated_file_is_caught_by_the_ratio() {
    let s = world(", completion: rename");
    s.feed("hr.csv", &many(40));
    s.run_once(None, 0);
    // Cut after 20 rows: half the accounts would go.
    let full = many(40);
    let cut: String = full.lines().take(21).map(|l| format!("{l}\n")).collect();
    refused(&s, &cut, "would delete 20 of 40 accounts");
    // A small change passes the guard.
    let mut fewer: String = full.lines().take(38).map(|l| format!("{l}\n")).collect();
    fewer.push_str("99,New\n");
    s.feed("hr.csv", &fewer);
    s.run_once(None, 0);
    assert_eq!(names(&s).len(), 38);
}

#[test]
fn max_deletes_is_configurable_and_accept_applies() {
    let s = world(", completion: rename, delete_guard: { max_deletes: 2, max_delete_ratio: 1.0 }");
    s.feed("hr.csv", &many(10));
    s.run_once(None, 0);
    let seven: String = many(10).lines().take(8).map(|l| format!("{l}\n")).collect();
    refused(&s, &seven, "more than max_deletes 2");
    s.idsync(&["run", "--once", "--accept-deletes", "hr"])
        .expect_code(0);
    assert_eq!(names(&s).len(), 7);
    assert_eq!(attr(&s.identity("1").unwrap(), "cn"), Some("Renamed"));
}

// --- snapshots ------------------------------------------------------------------------

/// The line the pass itself logs (at debug level) before it hands the read-ahead to a thread
/// of its own. The thread's own line ("repository read ahead in …") may come after the
/// process ended, so only this one can prove a read-ahead was *not* asked for.
const READ_AHEAD: &str = "reading the repository ahead";

#[test]
fn a_changed_file_has_the_repository_read_ahead_and_an_unchanged_one_not() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    // A first pass knows no account: nothing to read ahead.
    let first = s.idsync(&["-vv", "run", "--once"]).expect_code(0);
    assert!(first.stdout.contains("hr: 1 events"), "{}", first.stdout);
    assert!(!first.stderr.contains(READ_AHEAD), "{}", first.stderr);
    assert_eq!(names(&s), pairs(&[("1", "Ann")]));
    s.feed("hr.csv", "id,cn\n1,Ann Lee\n");
    let changed = s.idsync(&["-vv", "run", "--once"]).expect_code(0);
    assert_eq!(
        changed.stderr.matches(READ_AHEAD).count(),
        1,
        "{}",
        changed.stderr
    );
    assert_eq!(names(&s), pairs(&[("1", "Ann Lee")]));
    assert_eq!(ops(&s, &[]), ["upsert", "update"]);
    let unchanged = s.idsync(&["-vv", "run", "--once"]).expect_code(0);
    assert!(
        unchanged.stdout.contains("hr: no changes"),
        "{}",
        unchanged.stdout
    );
    assert!(
        !unchanged.stderr.contains(READ_AHEAD),
        "{}",
        unchanged.stderr
    );
    assert_eq!(ops(&s, &[]), ["upsert", "update"], "nothing decided");
}

#[test]
fn update_events_carry_previous_attributes() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n");
    s.run_once(None, 0);
    s.feed("hr.csv", "id,cn\n1,Ann Lee\n");
    s.run_once(None, 0);
    let d = s.last_result();
    assert_eq!(d["op"], "update");
    let change = &d["changes"][0];
    assert_eq!(change["name"], "cn");
    assert_eq!(change["before"], serde_json::json!(["Ann"]));
}

#[test]
fn missing_snapshot_means_a_full_pass() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n");
    s.run_once(None, 0);
    // Lose the snapshot (the checkpoint stays): the same file must not be "no changes".
    let db = rusqlite::Connection::open(s.db()).unwrap();
    db.execute("DELETE FROM shadows", []).unwrap();
    drop(db);
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 2 events"), "{}", out.stdout);
    let ops = ops(&s, &["-n", "2"]);
    assert_eq!(ops, ["upsert", "upsert"]);
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
}

#[test]
fn damaged_snapshot_with_a_changed_file_means_a_full_pass() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob\n3,Cy\n");
    s.run_once(None, 0);
    // Lose one account of the snapshot and change another row: the diff notices that
    // it loaded fewer accounts than the checkpoint counts, so every row is an upsert
    // (the unchanged row 3 too), not just the changed one.
    let db = rusqlite::Connection::open(s.db()).unwrap();
    db.execute("DELETE FROM shadows WHERE key = '1'", [])
        .unwrap();
    drop(db);
    s.feed("hr.csv", "id,cn\n1,Ann\n2,Bob Lee\n3,Cy\n");
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 3 events"), "{}", out.stdout);
    let ops = ops(&s, &["-n", "3"]);
    assert_eq!(ops, ["upsert", "upsert", "upsert"]);
    assert_eq!(
        s.identity("2").unwrap()["attrs"]["cn"],
        serde_json::json!("Bob Lee")
    );
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
}

#[test]
fn config_change_with_an_unchanged_file_is_diffed_again() {
    let s = world(", completion: rename");
    s.feed("hr.csv", "id,cn,groups\n1,Ann,a;b\n");
    s.run_once(None, 0);
    let yaml = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    s.config(&yaml.replace(
        "completion: rename",
        "completion: rename, multi_valued: { groups: ';' }",
    ));
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 1 events"), "{}", out.stdout);
    assert_eq!(
        s.identity("1").unwrap()["attrs"]["groups"],
        serde_json::json!(["a", "b"])
    );
}

#[test]
fn large_pass_commits_in_parts_and_stays_complete() {
    let s = world(", completion: rename, batch_size: 3");
    s.feed("hr.csv", &many(10));
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 10 events"), "{}", out.stdout);
    // Parts after the first are parsed ahead on another thread: each row must still land
    // on its own identity.
    let expected: Vec<(String, String)> =
        (0..10).map(|i| (i.to_string(), format!("P{i}"))).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(names(&s), expected_sorted);
    let ops = ops(&s, &[]);
    assert!(ops.iter().all(|o| o == "upsert"), "{ops:?}");
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);

    // An incremental pass in parts: changes spread over several parts, one row gone, one new.
    let mut csv = String::from("id,cn\n");
    for i in (0..11).filter(|i| *i != 5) {
        let cn = if [1, 4, 7, 9].contains(&i) {
            format!("Q{i}")
        } else {
            format!("P{i}")
        };
        csv.push_str(&format!("{i},{cn}\n"));
    }
    s.feed("hr.csv", &csv);
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: 6 events"), "{}", out.stdout);
    let mut want: Vec<(String, String)> = (0..11)
        .filter(|i| *i != 5)
        .map(|i| {
            let cn = if [1, 4, 7, 9].contains(&i) {
                format!("Q{i}")
            } else {
                format!("P{i}")
            };
            (i.to_string(), cn)
        })
        .collect();
    want.sort();
    assert_eq!(names(&s), want);
    let updates = s.results(&["--key", "7"]);
    let last = updates.last().unwrap();
    assert_eq!(last["op"], "update", "{last}");
}

/// `SELECT …` with the sqlite3 shell, as an operator's reader would; `None` before the
/// repository exists or while it cannot be read.
fn sql(s: &Sandbox, query: &str) -> Option<String> {
    if !s.db().exists() {
        return None;
    }
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(s.db())
        .arg(query)
        .output()
        .expect("the sqlite3 shell (Debian package sqlite3) runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A pass in parts killed (SIGKILL) between two parts keeps whole parts only: each committed
/// part with its decision records and a checkpoint that counts exactly the accounts
/// committed and says the pass is unfinished; the next run decides the rest, each row once.
#[test]
fn a_pass_killed_between_parts_keeps_whole_parts_and_the_next_run_finishes_it() {
    const ROWS: usize = 5000;
    const PART: usize = 1000;
    let s = Sandbox::new();
    s.config(&format!(
        "poll_interval_secs: 3600
status: {{ listen: off }}
resources:
  - name: hr
    source: {{ type: flatfile, path: feeds/hr.csv, key: id, completion: rename, batch_size: {PART} }}
    populate_global: true
    rules: {{ filter: slow.rhai }}
"
    ));
    // Some work per event, so that a part takes long enough to be caught between two.
    s.rule(
        "slow.rhai",
        "let n = 0;\nfor i in 0..2000 { n += i; }\nn > 0",
    );
    s.feed("hr.csv", &many(ROWS));
    let count = || sql(&s, "SELECT count(*) FROM identities").and_then(|n| n.parse::<usize>().ok());
    let agent = s.start_agent(&[]);
    let seen = eventually(120, "a first part committed", || {
        count().filter(|n| *n > 0 && *n < ROWS)
    });
    agent.stop(); // SIGKILL
    let committed = count().unwrap();
    assert!(
        committed >= seen && committed < ROWS,
        "killed between parts: {committed} committed (seen {seen})"
    );
    assert_eq!(committed % PART, 0, "a part was committed in pieces");
    // Each committed identity came with its decision record.
    assert_eq!(s.results(&["-n", "100000"]).len(), committed);
    // The checkpoint counts exactly the committed accounts and marks the pass unfinished.
    let token = s
        .checkpoint("hr")
        .expect("a checkpoint with the first part");
    let json: serde_json::Value =
        serde_json::from_str(token.split_once(' ').expect("a token with its state").1).unwrap();
    assert_eq!(json["n"], committed as u64, "{token}");
    assert_eq!(json["partial"], true, "{token}");

    // The next run decides the rest, and nothing twice.
    let out = s.run_once(None, 0);
    assert!(
        out.stdout
            .contains(&format!("hr: {} events", ROWS - committed)),
        "{}",
        out.stdout
    );
    assert_eq!(count(), Some(ROWS));
    let records = s.results(&["-n", "100000"]);
    assert_eq!(records.len(), ROWS);
    let mut keys: Vec<&str> = records.iter().map(|d| d["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), ROWS, "one decision record per row");
    let token = s.checkpoint("hr").unwrap();
    assert!(!token.contains("\"partial\""), "{token}");
    let out = s.run_once(None, 0);
    assert!(out.stdout.contains("hr: no changes"), "{}", out.stdout);
}
