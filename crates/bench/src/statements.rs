//! `idsync-bench statements --rows N`: what a statement costs on PostgreSQL, the figures
//! behind the repository's speculation (`crates/repo/src/speculation.rs`, `merge.rs`).
//!
//! Against a private server it starts (as the tests do, on the same machine), in one
//! transaction each, `N` rows of a four-column table with a primary key:
//!
//! 1. inserted one statement at a time, each reply waited for;
//! 2. the same statements pipelined: sent without waiting, 1,000 at a time;
//! 3. inserted set-wise, `INSERT … SELECT FROM unnest(arrays)` of 1,000 rows;
//! 4. read back one key at a time;
//! 5. read back 1,000 keys a query (`= ANY`).
//!
//! Each line gives the time per row and the server process's CPU time per row (its
//! `/proc` counters), so waiting and the server's work can be told apart.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures_util::future::join_all;

/// Options of `idsync-bench statements`.
#[derive(Debug, Args)]
pub struct StatementsArgs {
    /// Rows written and read in each way (a multiple of 1,000 reads best).
    #[arg(long, default_value_t = 20_000)]
    pub rows: usize,
}

/// Rows per pipelined group, per set-wise statement, per `= ANY` read.
const AT_ONCE: usize = 1000;

/// CPU time (user + system) of process `pid` so far.
fn cpu(pid: i32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {i} in {path}"))
    };
    // utime and stime, in clock ticks (100 a second on Linux).
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Prints one measured way: time and server CPU per row.
fn report(what: &str, rows: usize, elapsed: Duration, server: Duration) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / rows.max(1) as f64;
    say!(
        "{what}: {rows} rows in {:.2} s = {:.1} µs a row (server CPU {:.1} µs a row)",
        elapsed.as_secs_f64(),
        per(elapsed),
        per(server)
    );
}

/// Runs the benchmark.
pub fn run(args: &StatementsArgs) -> anyhow::Result<()> {
    let pg = idsync_testkit::postgres::Postgres::start()?;
    pg.create_database("bench")?;
    let url = pg.url("bench");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    runtime.block_on(measure(&url, args.rows))
}

async fn measure(url: &str, rows: usize) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the private server")?;
    let driver = tokio::spawn(connection);
    let c = &client;
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    c.batch_execute(
        "CREATE TABLE t (resource TEXT, key TEXT, id BIGINT, at BIGINT, PRIMARY KEY (resource, key))",
    )
    .await?;
    let insert = c
        .prepare("INSERT INTO t VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .await?;
    let set_wise = c
        .prepare(
            "INSERT INTO t SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let keys =
        |prefix: &str| -> Vec<String> { (0..rows).map(|i| format!("{prefix}{i}")).collect() };
    let (one, piped, set) = (keys("a"), keys("b"), keys("c"));

    let timed = |what: &'static str| {
        let (start, before) = (Instant::now(), cpu(pid));
        move || -> anyhow::Result<()> {
            report(what, rows, start.elapsed(), cpu(pid)? - before?);
            Ok(())
        }
    };

    c.batch_execute("BEGIN").await?;
    let done = timed("one statement at a time");
    for (i, k) in one.iter().enumerate() {
        let n = i as i64;
        c.execute(&insert, &[&"hr", k, &n, &n]).await?;
    }
    done()?;
    c.batch_execute("COMMIT").await?;

    c.batch_execute("BEGIN").await?;
    let done = timed("pipelined, 1,000 at a time");
    for group in piped.chunks(AT_ONCE) {
        let sent = group.iter().enumerate().map(|(i, k)| {
            let n = i as i64;
            let insert = &insert;
            async move { c.execute(insert, &[&"hr", k, &n, &n]).await }
        });
        for reply in join_all(sent).await {
            reply?;
        }
    }
    done()?;
    c.batch_execute("COMMIT").await?;

    c.batch_execute("BEGIN").await?;
    let done = timed("set-wise, 1,000 rows a statement");
    for group in set.chunks(AT_ONCE) {
        let resources = vec!["hr"; group.len()];
        let ids: Vec<i64> = (0..group.len() as i64).collect();
        c.execute(&set_wise, &[&resources, &group, &ids, &ids])
            .await?;
    }
    done()?;
    c.batch_execute("COMMIT").await?;

    let point = c
        .prepare("SELECT id FROM t WHERE resource = $1 AND key = $2")
        .await?;
    let done = timed("point reads, one at a time");
    for k in &one {
        c.query_opt(&point, &[&"hr", k]).await?;
    }
    done()?;

    let many = c
        .prepare("SELECT key, id FROM t WHERE resource = $1 AND key = ANY($2)")
        .await?;
    let done = timed("reads of 1,000 keys a query");
    let mut found = 0;
    for group in one.chunks(AT_ONCE) {
        found += c.query(&many, &[&"hr", &group]).await?.len();
    }
    done()?;
    anyhow::ensure!(found == rows, "read back {found} of {rows} rows");
    drop(client);
    let _ = driver.await;
    Ok(())
}
