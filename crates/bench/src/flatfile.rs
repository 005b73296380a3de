//! `idsync-bench flatfile --rows N`: the flat-file pipeline's speed and memory, in one run.
//!
//! It generates a 12-column HR feed of N rows in a scratch folder, then reports:
//! 1. the **floor**: parsing the file with the csv crate plus a bulk insert of the same rows
//!    (key + attributes as JSON) into a SQLite file with the repository's settings (WAL,
//!    `synchronous=FULL`, one transaction) — what no pipeline can beat;
//! 2. the **initial load** through the whole pipeline (adapter diff, correlation rule,
//!    mappings, checkin, links, shadows, decision records), as `idsync run --once` does it;
//! 3. **incremental passes** (`--passes`, 3 by default; median, best and worst), each after
//!    changing 1% of the rows, adding 0.1% and removing 0.1%;
//! 4. the process's **peak RSS** (VmHWM) after each step; the counter is reset after the
//!    floor, so the pipeline's figures are its own;
//! 5. last, the **records floor** (`records.rs`): the rows the passes wrote, inserted
//!    again row by row into a fresh file, no rules — what SQLite alone costs for them.
//!
//! With `--repository postgres` (a private server) or a URL, the repository is that
//! PostgreSQL database and the floor a `COPY` of the same records into it; the records
//! floor is not run.
//!
//! Each pipeline step is split into the adapter's fetch (read, parse, diff) and the engine's
//! apply (rules, repository writes, commit), so the figures say what dominates.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use idsync_core::Fetch;

use idsync_agent::config::Loaded;
use idsync_agent::setup::Setup;

use crate::memory::{reset_peak_rss, rss};
use crate::records::{records_floor, repository_settings};

/// `idsync-bench flatfile` options.
#[derive(Debug, Args)]
pub struct FlatfileArgs {
    /// Rows in the generated feed.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Scratch folder (default: a new temporary folder, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Incremental passes after the initial load (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Declare the correlation attribute normalised (`correlation: { normalise: { empno:
    /// [case, spaces, diacritics] } }`): the index holds folded values and every query
    /// value is folded, for the cost of normalisation against exact comparison.
    #[arg(long)]
    pub normalise: bool,
    /// Give the resource a grace period (`delete_action: { action: disable, then: delete,
    /// after: 30d }`): every account without an owner is looked up as a possible rehire
    /// (its pending delete timers).
    #[arg(long)]
    pub grace: bool,
    /// Keep the repository in PostgreSQL: `postgres` starts a private server on this
    /// machine (testkit), or give the URL of an empty database. The floor is then a `COPY`
    /// of the same records into a table of the same database.
    #[arg(long, value_name = "postgres|URL")]
    pub repository: Option<String>,
}

const COLUMNS: &str = "id,first_name,last_name,email,department,title,manager,location,phone,start_date,status,cost_center";

/// One generated row; `version` changes the title (the 1% update).
fn row(i: usize, version: u32) -> String {
    const FIRST: [&str; 8] = [
        "Ann", "Bob", "Cyril", "Dana", "Emil", "Fatou", "Goran", "Hana",
    ];
    const LAST: [&str; 8] = [
        "Lee", "Martin", "Okafor", "Novak", "Schmidt", "Rossi", "Tanaka", "Dubois",
    ];
    const DEPT: [&str; 6] = ["Finance", "Sales", "Engineering", "Support", "Legal", "HR"];
    let first = FIRST[i % 8];
    let last = LAST[(i / 8) % 8];
    format!(
        "E{i:07},{first},{last},{f}.{l}.{i}@mail.example-corp.com,{dept},{title} {version},E{mgr:07},Site {site},+1 555 0100 {phone:07},20{y:02}-{m:02}-{d:02},ACTIVE,CC-{cc:04}\n",
        f = first.to_lowercase(),
        l = last.to_lowercase(),
        dept = DEPT[i % 6],
        title = if i.is_multiple_of(3) {
            "Analyst"
        } else {
            "Engineer"
        },
        mgr = i / 10,
        site = i % 40,
        phone = i % 10_000_000,
        y = i % 25,
        m = i % 12 + 1,
        d = i % 28 + 1,
        cc = i % 1000,
    )
}

/// Writes the feed: rows `0..n` at version 1, except that incremental pass `pass` (1, 2,
/// ...) has every 100th row at version `pass + 1` (1% changed since the pass before),
/// leaves out every 1000th row from offset `pass + 6` (0.1%, and the rows the pass before
/// left out come back), and appends `n / 1000` extra rows (new in the first pass).
fn write_feed(path: &Path, n: usize, pass: usize) -> anyhow::Result<u64> {
    let (changed_every, removed_every, extra) = if pass == 0 {
        (None, None, 0)
    } else {
        (Some(100), Some(1000), n / 1000)
    };
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    writeln!(w, "{COLUMNS}")?;
    for i in 0..n {
        if removed_every.is_some_and(|k| i % k == pass + 6) {
            continue;
        }
        let version = if changed_every.is_some_and(|k| i % k == 3) {
            pass as u32 + 1
        } else {
            1
        };
        w.write_all(row(i, version).as_bytes())?;
    }
    for i in n..n + extra {
        w.write_all(row(i, 1).as_bytes())?;
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// The floor: csv parse alone, then parse + bulk insert of the same rows (key and the
/// attributes as JSON) streaming in one transaction, with the repository's settings
/// (WAL, `synchronous=FULL`, its page cache, checkpoints not in the commit).
/// Returns (parse time, parse + insert time).
fn floor(feed: &Path, db: &Path) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let reading = || format!("reading {}", feed.display());
    let mut reader = csv::ReaderBuilder::new()
        .from_path(feed)
        .with_context(reading)?;
    let mut record = csv::ByteRecord::new();
    let mut rows = 0u64;
    while reader.read_byte_record(&mut record).with_context(reading)? {
        rows += 1;
    }
    let parsed = start.elapsed();
    anyhow::ensure!(rows > 0, "the generated feed is empty");

    let start = Instant::now();
    let conn = rusqlite::Connection::open(db)
        .with_context(|| format!("opening the floor's file {}", db.display()))?;
    repository_settings(&conn).context("setting the floor's file up")?;
    conn.execute_batch(
        "CREATE TABLE rows (key TEXT PRIMARY KEY, attrs TEXT NOT NULL) WITHOUT ROWID",
    )?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    {
        let mut st = conn.prepare("INSERT INTO rows (key, attrs) VALUES (?1, ?2)")?;
        let mut reader = csv::ReaderBuilder::new()
            .from_path(feed)
            .with_context(reading)?;
        let headers = reader.headers().with_context(reading)?.clone();
        let mut record = csv::StringRecord::new();
        let mut json = String::with_capacity(512);
        while reader.read_record(&mut record).with_context(reading)? {
            json.clear();
            json.push('{');
            for (i, (h, v)) in headers.iter().zip(record.iter()).enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json.push_str(&serde_json::to_string(h)?);
                json.push(':');
                json.push_str(&serde_json::to_string(v)?);
            }
            json.push('}');
            st.execute(rusqlite::params![record.get(0).unwrap_or_default(), json])
                .context("inserting into the floor's file")?;
        }
    }
    conn.execute_batch("COMMIT")
        .context("committing the floor's file")?;
    Ok((parsed, parsed + start.elapsed()))
}

/// The PostgreSQL floor: csv parse, then `COPY` of the same rows (key and the attributes
/// as JSON, tab-separated text format) into a new table of the database at `url`, in one
/// transaction. Returns (parse time, parse + copy time).
/// PostgreSQL's records floor: the rows the passes wrote to the record tables, inserted
/// again in one transaction into copies of those tables with the same indexes (`LIKE …
/// INCLUDING ALL`), by the server itself (`INSERT … SELECT`): what keeping those records
/// costs the server, without the pipeline, the rules or the client.
fn postgres_records_floor(url: &str) -> anyhow::Result<crate::records::RecordsFloor> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)
        .context("connecting to PostgreSQL for the records floor")?;
    let mut setup =
        String::from("DROP SCHEMA IF EXISTS bench_records CASCADE; CREATE SCHEMA bench_records;");
    for table in crate::records::RECORD_TABLES {
        setup.push_str(&format!(
            " CREATE TABLE bench_records.{table} (LIKE public.{table} INCLUDING ALL);"
        ));
    }
    client
        .batch_execute(&setup)
        .context("creating the records floor's tables")?;
    let start = Instant::now();
    let mut tx = client.transaction()?;
    let mut rows = 0;
    for table in crate::records::RECORD_TABLES {
        rows += tx
            .execute(
                &format!("INSERT INTO bench_records.{table} SELECT * FROM public.{table}"),
                &[],
            )
            .with_context(|| format!("copying the rows of {table}"))?;
    }
    tx.commit()?;
    let elapsed = start.elapsed();
    client
        .batch_execute("DROP SCHEMA bench_records CASCADE")
        .context("dropping the records floor's tables")?;
    Ok(crate::records::RecordsFloor { elapsed, rows })
}

fn postgres_floor(feed: &Path, url: &str) -> anyhow::Result<(Duration, Duration)> {
    use std::io::Write as _;
    let reading = || format!("reading {}", feed.display());
    let start = Instant::now();
    let mut reader = csv::ReaderBuilder::new()
        .from_path(feed)
        .with_context(reading)?;
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).with_context(reading)? {}
    let parsed = start.elapsed();
    let mut client = postgres::Client::connect(url, postgres::NoTls)
        .context("connecting to PostgreSQL for the floor")?;
    client.batch_execute(
        "DROP TABLE IF EXISTS bench_floor; \
         CREATE TABLE bench_floor (key TEXT COLLATE \"C\" PRIMARY KEY, attrs TEXT NOT NULL)",
    )?;
    let start = Instant::now();
    let mut tx = client.transaction()?;
    {
        let mut writer = tx.copy_in("COPY bench_floor (key, attrs) FROM STDIN")?;
        let mut reader = csv::ReaderBuilder::new()
            .from_path(feed)
            .with_context(reading)?;
        let headers = reader.headers().with_context(reading)?.clone();
        let mut record = csv::StringRecord::new();
        let mut line = String::with_capacity(512);
        while reader.read_record(&mut record).with_context(reading)? {
            line.clear();
            line.push_str(record.get(0).unwrap_or_default());
            line.push_str("\t{");
            for (i, (h, v)) in headers.iter().zip(record.iter()).enumerate() {
                if i > 0 {
                    line.push(',');
                }
                line.push_str(&serde_json::to_string(h)?);
                line.push(':');
                line.push_str(&serde_json::to_string(v)?);
            }
            // COPY's text format: a backslash starts an escape.
            let escaped = line.replace('\\', "\\\\");
            writer.write_all(escaped.as_bytes())?;
            writer.write_all(b"}\n")?;
        }
        writer.finish()?;
    }
    tx.commit()?;
    let copied = start.elapsed();
    client.batch_execute("DROP TABLE bench_floor")?;
    Ok((parsed, parsed + copied))
}

/// One pipeline pass, as `idsync run --once` does it: (fetch time, apply time, events).
fn pipeline_pass(setup: &Setup) -> anyhow::Result<(Duration, Duration, u64)> {
    let policy = &setup.policies[0];
    let repo = setup.engine.repo();
    let mut adapter = setup.adapter(0);
    let (mut fetch_t, mut apply_t, mut events) = (Duration::ZERO, Duration::ZERO, 0);
    loop {
        let expected = repo.checkpoint(&policy.resource)?;
        let t = Instant::now();
        let fetched = adapter.next_batch(expected.as_ref(), repo.as_ref())?;
        fetch_t += t.elapsed();
        let Fetch::Batch(batch) = fetched else {
            break;
        };
        let t = Instant::now();
        let report = setup
            .engine
            .apply_batch(policy, expected.as_ref(), &batch)?;
        apply_t += t.elapsed();
        events += report.events();
        if !adapter.has_more() {
            break;
        }
    }
    Ok((fetch_t, apply_t, events))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Runs `idsync-bench flatfile`.
pub fn run(args: &FlatfileArgs) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a scratch folder")?;
            temp.path().to_path_buf()
        }
    };
    let n = args.rows;
    let feed = dir.join("hr.csv");
    for f in [
        "floor.db",
        "floor.db-wal",
        "floor.db-shm",
        "records.db",
        "records.db-wal",
        "records.db-shm",
        "idsync.db",
        "idsync.db-wal",
        "idsync.db-shm",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let written = |path: &Path| format!("writing {}", path.display());
    std::fs::create_dir_all(dir.join("rules")).with_context(|| written(&dir.join("rules")))?;
    let rule = dir.join("rules/correlation.rhai");
    std::fs::write(&rule, "// by employee number\n#{ empno: account.id }\n")
        .with_context(|| written(&rule))?;
    // A private PostgreSQL server when asked for by name (kept until the end).
    let private = match args.repository.as_deref() {
        Some("postgres") => {
            let pg = idsync_testkit::postgres::Postgres::start()?;
            pg.create_database("bench")?;
            Some(pg)
        }
        _ => None,
    };
    let url = match (&private, args.repository.as_deref()) {
        (Some(pg), _) => Some(pg.url("bench")),
        (None, Some(url)) => Some(url.to_owned()),
        (None, None) => None,
    };
    let repository = match &url {
        Some(url) => format!("{{ url: \"{url}\" }}"),
        None => "{ path: idsync.db }".to_owned(),
    };
    let config = dir.join("idsync.yaml");
    let correlation = if args.normalise {
        "correlation: { normalise: { empno: [case, spaces, diacritics] } }\n"
    } else {
        ""
    };
    let grace = if args.grace {
        "    delete_action: { action: disable, then: delete, after: 30d }\n"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "repository: {repository}
rules_dir: rules
{correlation}resources:
  - name: hr
    source:
      type: flatfile
      path: hr.csv
      key: id
      completion: rename
      delete_guard: {{ max_deletes: 100000 }}
{grace}    rules: {{ correlation: correlation.rhai }}
    mappings:
      - {{ to: empno, from: id }}
      - {{ to: mail, expr: 'account.email.to_lower()' }}
      - {{ to: title, from: title }}
      - {{ to: department, from: department }}
"
        ),
    )
    .with_context(|| written(&config))?;
    if args.normalise {
        say!("correlation: empno compared in normalised form (case, spaces, diacritics)");
    }
    if args.grace {
        say!("delete_action: disable, then delete after 30d (a grace period)");
    }

    let t = Instant::now();
    let size = write_feed(&feed, n, 0).with_context(|| written(&feed))?;
    say!(
        "feed: {n} rows x 12 columns, {:.0} MB, generated in {}",
        size as f64 / 1e6,
        secs(t.elapsed())
    );

    let (parsed, floor_total) = match &url {
        Some(url) => {
            let (parsed, total) = postgres_floor(&feed, url)?;
            say!(
                "floor: {} (csv parse {}, PostgreSQL COPY {}); peak RSS {}",
                secs(total),
                secs(parsed),
                secs(total - parsed),
                rss()
            );
            (parsed, total)
        }
        None => {
            let (parsed, total) = floor(&feed, &dir.join("floor.db"))?;
            say!(
                "floor: {} (csv parse {}, SQLite bulk insert {}); peak RSS {}",
                secs(total),
                secs(parsed),
                secs(total - parsed),
                rss()
            );
            (parsed, total)
        }
    };
    let _ = parsed;

    reset_peak_rss();
    let loaded = Loaded::read(&config).map_err(|p| anyhow::anyhow!("{p}"))?;
    let setup = Setup::new(loaded).context("setting the pipeline up")?;
    let t = Instant::now();
    let (fetch_t, apply_t, events) = pipeline_pass(&setup)?;
    let initial = t.elapsed();
    // The repository copies committed batches into the database file on a thread of its
    // own; the next pass is timed once that has caught up, as after any pause between
    // passes (the floor's file is checkpointed when its connection closes, untimed too).
    setup.engine.repo().settle();
    say!(
        "initial load: {} for {events} events (fetch {}, apply {}) = {:.1}x the floor; peak RSS so far {}",
        secs(initial),
        secs(fetch_t),
        secs(apply_t),
        initial.as_secs_f64() / floor_total.as_secs_f64(),
        rss()
    );
    // Each pass: 1% changed, 0.1% removed, 0.1% added (from the second pass on, the
    // rows the pass before removed). Several, because one pass on this kind of machine
    // varies by a third from run to run.
    let mut times = Vec::new();
    for pass in 1..=args.passes.max(1) {
        write_feed(&feed, n, pass).with_context(|| written(&feed))?;
        let t = Instant::now();
        let (fetch_t, apply_t, events) = pipeline_pass(&setup)?;
        let incremental = t.elapsed();
        setup.engine.repo().settle();
        times.push(incremental);
        say!(
            "incremental pass {pass} (1% changed, 0.1% added, 0.1% removed): {} for {events} events (fetch {}, apply {}); peak RSS so far {}",
            secs(incremental),
            secs(fetch_t),
            secs(apply_t),
            rss()
        );
    }
    times.sort();
    say!(
        "incremental passes: median {}, best {}, worst {}",
        secs(times[times.len() / 2]),
        secs(times[0]),
        secs(times[times.len() - 1])
    );

    let t = Instant::now();
    let (fetch_t, _, events) = pipeline_pass(&setup)?;
    say!(
        "unchanged file: {} ({events} events, fetch {})",
        secs(t.elapsed()),
        secs(fetch_t)
    );
    say!("peak RSS of the pipeline: {}", rss());

    // Last, so its writes do not compete with the passes: the rows the passes wrote (the
    // initial load's, plus the ~1% the incremental passes added), inserted again without
    // the pipeline.
    let (records, how) = match &url {
        Some(url) => (
            postgres_records_floor(url)?,
            " again, server-side, into tables with the same indexes",
        ),
        None => (
            records_floor(&dir.join("idsync.db"), &dir.join("records.db"))?,
            "",
        ),
    };
    say!(
        "records floor: {} to insert the {} rows the passes wrote (identities, correlation index, links, shadows, decision records){how} = {:.1}x the floor; the initial load took {:.1}x the records floor",
        secs(records.elapsed),
        records.rows,
        records.elapsed.as_secs_f64() / floor_total.as_secs_f64(),
        initial.as_secs_f64() / records.elapsed.as_secs_f64()
    );
    Ok(())
}
