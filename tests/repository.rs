//! The repository file and its neighbours, through the real binary: other processes read it
//! while the agent writes (the `sqlite3` shell and idsync's own read commands), and a kill
//! afterwards must still find every commit the readers saw; a file that is not an idsync
//! repository is refused; what the agent creates is readable by its owner only.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Sandbox, attr, eventually};

/// A flat-file resource in the quickstart's layout (the repository next to `idsync.yaml`)
/// with production intervals: only the feed's watcher wakes the agent.
fn hr_sandbox() -> Sandbox {
    let s = Sandbox::new();
    s.config(
        r#"poll_interval_secs: 3600
status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: 'account.id'
    populate_global: true
"#,
    );
    s
}

/// [`hr_sandbox`] with a correlation rule, `rules/corr.rhai`, for the test to write.
fn correlated_sandbox() -> Sandbox {
    let s = Sandbox::new();
    s.config(
        r#"status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: 'account.id'
    rules: { correlation: corr.rhai }
"#,
    );
    s
}

/// The feed of round `round`: 300 people whose title names the round, and one more person
/// hired in each round so far.
fn feed_of_round(round: usize) -> String {
    let mut csv = String::from("id,title\n");
    for i in 0..300 {
        csv.push_str(&format!("e{i},title-{round}\n"));
    }
    for r in 0..=round {
        csv.push_str(&format!("hire{r},new\n"));
    }
    csv
}

/// Readers between commits must not make the agent's later commits vanish: each round the
/// feed changes, the agent commits, and both an outside `sqlite3` and `idsync` read the
/// result; then SIGKILL. Every round a reader saw must be in the repository after the kill.
#[test]
fn readers_between_commits_then_a_kill_lose_no_commit() {
    let s = hr_sandbox();
    s.feed("hr.csv", &feed_of_round(0));
    let agent = s.start_agent(&[]);
    for round in 0..8 {
        if round > 0 {
            s.replace_atomically("feeds/hr.csv", &feed_of_round(round));
        }
        let hire = format!("hire{round}");
        let want_title = format!("title-{round}");
        // The commit is reported when idsync's own read command shows it ...
        eventually(30, &format!("round {round} committed"), || {
            let e = s.identity("e299")?;
            (attr(&e, "title") == Some(want_title.as_str()) && s.identity(&hire).is_some())
                .then_some(())
        });
        // ... and an outside reader sees the same.
        let seen = s.sql(&format!(
                "SELECT count(*) FROM identities WHERE name = '{hire}' OR json_extract(attrs, '$.title') = '{want_title}'"
            ),
        );
        assert_eq!(seen, "301", "round {round}: sqlite3 sees the commit");
        s.idsync(&["identities", "list"]).expect_code(0);
    }
    // Child::kill is SIGKILL.
    agent.stop();

    // After the kill, a fresh reader finds the last round everywhere.
    let all = s.export();
    assert_eq!(
        all.len(),
        300 + 8,
        "every hire of every round survived the kill"
    );
    for e in &all {
        let name = e["name"].as_str().unwrap();
        if name.starts_with('e') {
            assert_eq!(
                attr(e, "title"),
                Some("title-7"),
                "{name} keeps the last round"
            );
        }
    }
    assert_eq!(
        s.sql("SELECT count(*) FROM identities WHERE json_extract(attrs, '$.title') = 'title-7'"),
        "300"
    );
}

/// A zero-byte file where the repository should be (a failed restore) is refused, not
/// taken for a new repository: nothing is created again.
#[test]
fn an_empty_file_at_the_repository_path_is_refused() {
    let s = hr_sandbox();
    s.feed("hr.csv", &feed_of_round(0));
    std::fs::write(s.db(), b"").unwrap();
    let run = s.idsync(&["run", "--once"]);
    assert_ne!(run.code, 0, "a 0-byte repository is refused");
    assert!(
        run.stderr.contains("idsync.db") && run.stderr.contains("not an idsync repository"),
        "the message names the file: {}",
        run.stderr
    );
    assert_eq!(
        std::fs::metadata(s.db()).unwrap().len(),
        0,
        "the file is left as it was"
    );

    // Some other SQLite database is refused the same way.
    std::fs::remove_file(s.db()).unwrap();
    s.sql("CREATE TABLE notes(x); INSERT INTO notes VALUES (1);");
    let run = s.idsync(&["identities", "list"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("not an idsync repository"),
        "{}",
        run.stderr
    );
    assert_eq!(s.sql("SELECT count(*) FROM sqlite_master"), "1");
}

/// The repository, its log and the status file are readable by their owner only, whatever
/// the umask.
#[test]
fn files_the_agent_creates_are_owner_only() {
    let s = hr_sandbox();
    s.feed("hr.csv", &feed_of_round(0));
    let agent = s.start_agent(&[]);
    eventually(30, "the first pass", || s.identity("hire0"));
    eventually(10, "the status file", || {
        s.path()
            .join("idsync.db.status.json")
            .exists()
            .then_some(())
    });
    for name in [
        "idsync.db",
        "idsync.db-wal",
        "idsync.db-shm",
        "idsync.db.lock",
        "idsync.db.status.json",
    ] {
        let path = s.path().join(name);
        if let Ok(meta) = std::fs::metadata(&path) {
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{name} is owner-only");
        }
    }
    agent.stop();
}

/// A line the feed keeps getting wrong is one failed event however many passes reject it.
#[test]
fn the_same_rejected_line_is_one_failed_event_across_passes() {
    let s = hr_sandbox();
    s.feed("hr.csv", "id,title\n1,clerk\n2,too,many,fields\n3,clerk\n");
    s.run_once(None, 1);
    // Other rows change; the bad line stays as it was.
    s.feed("hr.csv", "id,title\n1,lead\n2,too,many,fields\n3,clerk\n");
    s.run_once(None, 1);
    s.feed(
        "hr.csv",
        "id,title\n1,director\n2,too,many,fields\n3,lead\n",
    );
    s.run_once(None, 1);
    assert_eq!(attr(&s.identity("1").unwrap(), "title"), Some("director"));
    let failed = s.failed();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["origin"].as_str().unwrap().ends_with("hr.csv:3"),
        "{failed:?}"
    );
}

/// A command that writes while another process holds the write lock for longer than five
/// seconds (an agent committing a large batch) waits for it, says so, and then succeeds.
#[test]
fn a_command_waits_visibly_for_a_long_write_of_another_process() {
    let s = correlated_sandbox();
    s.rule(
        "corr.rhai",
        "if account.id == \"2\" { throw \"not yet\" }\n[]",
    );
    s.feed("hr.csv", "id,title\n1,clerk\n2,clerk\n");
    s.run_once(None, 1);
    assert_eq!(s.failed().len(), 1);
    s.rule("corr.rhai", "[]");
    // Another process holds the write lock for 7 s.
    let mut holder = Command::new("sqlite3")
        .arg(s.db())
        .args([
            "BEGIN IMMEDIATE;",
            "UPDATE identities SET version = version WHERE 0;",
            ".shell sleep 7",
            "COMMIT;",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let retry = s.idsync(&["failed", "retry", "--all"]).expect_code(0);
    let waited = started.elapsed();
    holder.wait().unwrap();
    assert!(
        waited >= std::time::Duration::from_secs(5),
        "the retry waited for the lock ({waited:?})"
    );
    assert!(
        retry.stderr.contains("repository is busy") && retry.stderr.contains("waiting"),
        "the wait is announced: {}",
        retry.stderr
    );
    assert!(s.identity("2").is_some());
    assert!(s.failed().is_empty());
}

/// A small tmpfs mounted over a folder for the length of a test (the CI runs as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(st.success(), "mounting a tmpfs needs root, as the CI has");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk under the repository: the agent backs off (2 s, 4 s, 8 s, …) instead of
/// retrying at every turn, and resumes by itself once space is freed.
#[test]
fn a_full_disk_makes_the_agent_back_off_and_resume() {
    let s = Sandbox::new();
    let _fs = Tmpfs::mount(s.path(), "24m");
    std::fs::create_dir_all(s.path().join("rules")).unwrap();
    s.config(
        r#"poll_interval_secs: 1
status: { listen: off }
resources:
  - name: hr
    source: { type: flatfile, path: feeds/hr.csv, key: id }
    naming: 'account.id'
    populate_global: true
"#,
    );
    s.feed("hr.csv", "id,title\nfirst,clerk\n");
    // The log lives off the full disk.
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("agent.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .arg("run")
        .current_dir(s.path())
        .env_remove("IDSYNC_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    eventually(30, "the first pass", || s.identity("first"));
    // A large change waits beside the feed; then the disk fills up and it is moved in.
    let mut csv = String::from("id,title\nfirst,clerk\n");
    for i in 0..5_000 {
        csv.push_str(&format!("p{i},a title long enough to need pages {i}\n"));
    }
    s.write("feeds/.next.csv", &csv);
    let filler = s.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 32 << 20]);
    std::fs::rename(
        s.path().join("feeds/.next.csv"),
        s.path().join("feeds/hr.csv"),
    )
    .unwrap();
    let failures = |text: &str| text.matches("storage failed").count();
    std::thread::sleep(std::time::Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let n = failures(&text);
    // Attempts at about 0, 2, 6 and 14 s: a few, not one a second.
    assert!(
        (2..=5).contains(&n),
        "{n} storage failures in 20 s with poll_interval_secs: 1\n{text}"
    );
    // Space freed: the next attempt (within 16 s) applies the change.
    std::fs::remove_file(&filler).unwrap();
    let applied = (0..400).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        s.identity("p4999").is_some()
    });
    assert!(
        applied,
        "the change after space was freed\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Rejected input is cleared once the source is fixed, even when the fixed row is back to
/// the state the repository holds (no change event): `status` stops counting it and
/// `failed retry --all` has nothing left to fail on.
#[test]
fn a_fixed_source_clears_its_rejected_rows() {
    let s = hr_sandbox();
    s.feed("hr.csv", "id,title\n1,clerk\n2,clerk\n3,clerk\n");
    s.run_once(None, 0);
    // Row 2 turns malformed (held), a row without a key appears.
    s.feed(
        "hr.csv",
        "id,title\n1,lead\n2,clerk,extra\n3,clerk\n,nobody\n",
    );
    s.run_once(None, 1);
    assert_eq!(s.failed().len(), 2, "{:?}", s.failed());
    // The source is fixed: row 2 as it was, the keyless row gone.
    s.feed("hr.csv", "id,title\n1,director\n2,clerk\n3,clerk\n");
    s.run_once(None, 0);
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    assert_eq!(attr(&s.identity("2").unwrap(), "title"), Some("clerk"));
    let status = s.idsync(&["status"]).expect_code(0).stdout;
    assert!(
        status.contains("failed 0 (0 waiting for retry)"),
        "{status}"
    );
}

/// An operator gives up on failed events: they leave the list and the retries, and the
/// record of discarded events keeps each with the reason.
#[test]
fn discarded_failed_events_are_recorded_with_their_reason() {
    let s = correlated_sandbox();
    s.rule(
        "corr.rhai",
        "if account.id != \"1\" { throw \"no luck\" }\n[]",
    );
    s.feed("hr.csv", "id,title\n1,clerk\n2,clerk\n3,clerk\n");
    s.run_once(None, 1);
    let failed = s.failed();
    assert_eq!(failed.len(), 2);
    let first = failed[0]["id"].as_i64().unwrap().to_string();
    // One by id, the rest by resource and key.
    s.idsync(&["failed", "discard", &first, "--reason", "left the company"])
        .expect_code(0);
    s.idsync(&[
        "failed",
        "discard",
        "--resource",
        "hr",
        "--key",
        "3",
        "--reason",
        "test account",
    ])
    .expect_code(0);
    assert!(s.failed().is_empty());
    let record = s.idsync(&["failed", "discarded"]).expect_code(0).stdout;
    assert!(
        record.contains("left the company") && record.contains("test account"),
        "{record}"
    );
    // Nothing left to retry; an unknown id is an error.
    let retry = s.idsync(&["failed", "retry", "--all"]);
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    s.idsync(&["failed", "discard", "999", "--reason", "x"])
        .expect_code(1);
    assert!(s.identity("2").is_none() && s.identity("3").is_none());
}
