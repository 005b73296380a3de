//! The `idsync-bench` benchmarks run end to end on small inputs, so they keep working between
//! the runs that measure with them: each must finish, report every step, and (as the
//! benchmarks check themselves) lose nothing on the way. The figures are not asserted: speed
//! is measured on full-size runs, recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// Runs `idsync-bench ARGS`, expects it to succeed, returns its stdout.
fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_idsync-bench"))
        .args(args)
        .env_remove("IDSYNC_LOG")
        .output()
        .expect("run idsync-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "idsync-bench {args:?}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number after `label` in `text` (e.g. `"for 2000 events"` → 2000).
fn number_after(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        + label.len();
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
}

#[test]
fn flatfile_reports_every_step_on_a_small_feed() {
    let text = &flatfile(&[]);
    assert_flatfile_report(text, "SQLite bulk insert");
}

/// `flatfile --rows 2000 --passes 2` with `extra` options, in a scratch folder: its report.
fn flatfile(extra: &[&str]) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("bench");
    let mut args = vec![
        "flatfile",
        "--rows",
        "2000",
        "--passes",
        "2",
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bench(&args)
}

/// What `flatfile --rows 2000 --passes 2` must report, `floor` naming its floor.
fn assert_flatfile_report(text: &str, floor: &str) {
    for step in [
        floor,
        "initial load:",
        "incremental pass 1",
        "incremental pass 2",
        "incremental passes: median",
        "unchanged file:",
        "peak RSS of the pipeline:",
        "records floor:",
    ] {
        assert!(text.contains(step), "no {step:?} in {text}");
    }
    assert!(text.contains("for 2000 events"), "{text}");
    // 1% changed (20), 0.1% removed (2) and added (2) in each pass.
    assert_eq!(text.matches("for 24 events").count(), 2, "{text}");
    assert!(
        text.contains("unchanged file: ") && text.contains("(0 events"),
        "{text}"
    );
    // Identities and their index rows (2,002), links and shadows (2,000 each), decisions
    // (2,048).
    let rows = number_after(text, "to insert the");
    assert!(rows >= 10_000, "{rows} rows in {text}");
}

/// The same on a private PostgreSQL server the bench starts (the floor is a `COPY`, the
/// records floor the rows inserted again by the server), for a resource with a grace
/// period (`--grace`).
#[test]
fn flatfile_on_postgres_reports_every_step() {
    let text = &flatfile(&["--repository", "postgres", "--grace"]);
    assert!(
        text.contains("delete_action: disable, then delete after 30d (a grace period)"),
        "{text}"
    );
    assert_flatfile_report(text, "PostgreSQL COPY");
}

/// `statements` measures each way on a private PostgreSQL and reads back what it wrote.
#[test]
fn statements_reports_every_way_against_its_own_postgres() {
    let text = &bench(&["statements", "--rows", "2000"]);
    for way in [
        "one statement at a time: 2000 rows",
        "pipelined, 1,000 at a time: 2000 rows",
        "set-wise, 1,000 rows a statement: 2000 rows",
        "point reads, one at a time: 2000 rows",
        "reads of 1,000 keys a query: 2000 rows",
    ] {
        assert!(text.contains(way), "no {way:?} in {text}");
    }
    assert_eq!(text.matches("server CPU").count(), 5, "{text}");
}

#[test]
fn ldap_reports_every_step_against_its_own_slapd() {
    let text = &bench(&[
        "ldap",
        "--entries",
        "300",
        "--changes",
        "5",
        "--pace-ms",
        "20",
    ]);
    assert!(
        text.contains("raw ldap3 paged search: 300 entries"),
        "{text}"
    );
    assert!(text.contains("full sync: 300 events (0 failed)"), "{text}");
    assert!(text.contains("records floor: the"), "{text}");
    assert!(text.contains("5 of 5 changes"), "{text}");
}

#[test]
fn outbox_drains_every_message_to_its_own_sink() {
    let text = bench(&["outbox", "--messages", "200"]);
    assert!(
        text.contains("200 messages") && text.contains("(sink accepted 200)"),
        "{text}"
    );
}
