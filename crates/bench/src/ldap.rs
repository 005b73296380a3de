//! `idsync-bench ldap`: one run that measures, against a private slapd it starts itself
//! (idsync-testkit's, as the LDAP tests use it: generated `slapd.conf`, `slapadd` of generated
//! entries, foreground child on a free loopback port, stopped at the end):
//! 1. the floors: a raw ldap3 paged search of every entry, and the raw refreshOnly
//!    content-sync search a full sync sends (no cookie), by the same client library with no
//!    processing;
//! 2. a full sync (refreshOnly, no cookie) of the same entries into a fresh repository, part
//!    by part as `idsync run` applies it (the adapter streams the refresh while the engine
//!    applies the previous part), with the peak RSS of the process during it and its records
//!    floor (`records.rs`): the rows it wrote, inserted again alone;
//! 3. modify → identity-committed latency in persist mode, p50/p99 over paced modifies.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use idsync_core::{Adapter, Fetch};
use idsync_engine::{Engine, Policy};
use idsync_ldap::{LdapAdapter, LdapConfig, Mode};
use idsync_repo::Repo;
use idsync_testkit::slapd::{ADMIN_DN, ADMIN_PW, Options, PEOPLE, Slapd};

use crate::memory::{reset_peak_rss, rss};
use crate::records::records_floor;

/// `idsync-bench ldap` options.
#[derive(Debug, Args)]
pub struct LdapArgs {
    /// Entries loaded into the directory.
    #[arg(long, default_value_t = 100_000)]
    pub entries: usize,
    /// Page size of the paged search.
    #[arg(long, default_value_t = 1000)]
    pub page_size: i32,
    /// Modifies timed in persist mode.
    #[arg(long, default_value_t = 500)]
    pub changes: usize,
    /// Milliseconds between two timed modifies.
    #[arg(long, default_value_t = 10)]
    pub pace_ms: u64,
    /// Events per part of the full sync (default: the adapter's `batch_size` default).
    #[arg(long)]
    pub batch_size: Option<usize>,
}

/// Writes `entries` people (`uid=u0` ...) under [`PEOPLE`] as LDIF into `path`.
fn write_entries(path: &Path, entries: usize) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut ldif = std::io::BufWriter::new(file);
    for i in 0..entries {
        write!(
            ldif,
            "dn: uid=u{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: User {i}\n\
             sn: {i}\ngivenName: User\nmail: u{i}@bench.example\ntitle: Engineer\n\
             telephoneNumber: +1 555 {i:07}\nemployeeNumber: {i}\n\n"
        )?;
    }
    ldif.flush()?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `idsync-bench ldap`.
pub fn run(args: &LdapArgs) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("idsync-bench-")
        .tempdir()
        .context("creating a scratch folder")?;
    let ldif = scratch.path().join("entries.ldif");
    let t = Instant::now();
    write_entries(&ldif, args.entries).with_context(|| format!("writing {}", ldif.display()))?;
    let server = Slapd::start(&Options {
        entries: Some(&ldif),
        ..Options::default()
    })
    .context("starting slapd")?;
    let url = server.url();
    // The adapter reads the password from a secret file, as in production.
    let pw_file = scratch.path().join("pw");
    std::fs::write(&pw_file, ADMIN_PW).with_context(|| format!("writing {}", pw_file.display()))?;
    say!(
        "slapd with {} entries ready in {:.1}s ({url})",
        args.entries,
        t.elapsed().as_secs_f64(),
    );
    let mut cfg = LdapConfig::new(&url, PEOPLE);
    cfg.filter = "(objectClass=inetOrgPerson)".to_owned();
    cfg.bind_dn = Some(ADMIN_DN.to_owned());
    cfg.bind_password_file = Some(pw_file);
    cfg.page_size = args.page_size;
    cfg.timeout_secs = 120;

    if let Some(n) = args.batch_size {
        cfg.batch_size = n;
    }

    // 1. Floors: raw paged search, raw content-sync search.
    let t = Instant::now();
    let n = idsync_ldap::tools::paged_search_count(&cfg).context("the raw paged search")?;
    let raw = t.elapsed();
    let raw_rate = n as f64 / raw.as_secs_f64();
    say!(
        "raw ldap3 paged search: {n} entries in {:.2}s = {raw_rate:.0} entries/s",
        raw.as_secs_f64()
    );
    let t = Instant::now();
    let n = idsync_ldap::tools::sync_search_count(&cfg).context("the raw sync search")?;
    let raw_sync = t.elapsed();
    let sync_rate = n as f64 / raw_sync.as_secs_f64();
    say!(
        "raw ldap3 refreshOnly sync search: {n} entries in {:.2}s = {sync_rate:.0} entries/s (the floor)",
        raw_sync.as_secs_f64()
    );

    // 2. Full sync into a fresh repository, part by part.
    let db = scratch.path().join("bench.db");
    let repo = Arc::new(Repo::open(&db).with_context(|| format!("opening {}", db.display()))?);
    let engine = Engine::new(repo.clone(), &idsync_rules::Limits::default());
    let policy = Policy::new("dir");
    let mut adapter = LdapAdapter::new("dir", cfg.clone());
    reset_peak_rss();
    let t = Instant::now();
    let (mut events, mut failed, mut parts) = (0, 0, 0);
    let mut applying = Duration::ZERO;
    loop {
        let expected = repo.checkpoint("dir")?;
        let fetch = adapter
            .next_batch(expected.as_ref(), repo.as_ref())
            .context("the full sync's fetch")?;
        let Fetch::Batch(batch) = fetch else {
            break;
        };
        let a = Instant::now();
        let report = engine
            .apply_batch(&policy, expected.as_ref(), &batch)
            .context("the full sync's apply")?;
        applying += a.elapsed();
        events += batch.events.len();
        failed += report.failed;
        parts += 1;
        if !adapter.has_more() {
            break;
        }
    }
    let total = t.elapsed();
    let peak = rss();
    if events == 0 {
        bail!("the full sync found nothing");
    }
    let rate = events as f64 / total.as_secs_f64();
    say!(
        "full sync: {events} events ({failed} failed) in {parts} parts of {} in {:.2}s (applying {:.2}s, waiting for the directory {:.2}s) = {rate:.0} entries/s = {:.2}x the raw sync search ({:.2}x the paged search); peak RSS {peak}",
        cfg.batch_size,
        total.as_secs_f64(),
        applying.as_secs_f64(),
        (total - applying).as_secs_f64(),
        rate / sync_rate,
        rate / raw_rate
    );
    // The rows the full sync wrote, inserted again without the adapter or the engine.
    repo.settle();
    let records = records_floor(&db, &scratch.path().join("records.db"))?;
    let records_rate = events as f64 / records.elapsed.as_secs_f64();
    say!(
        "  (records floor: the {} rows the full sync wrote, inserted again in {:.2}s = {records_rate:.0} entries/s = {:.2}x the raw sync search)",
        records.rows,
        records.elapsed.as_secs_f64(),
        records_rate / sync_rate
    );

    // 3. Persist latency: modify → identity committed. Timed once the background
    // checkpoint of the full sync has caught up, as after any pause.
    repo.settle();
    let mut pcfg = cfg.clone();
    pcfg.mode = Mode::Persist;
    let mut persist = LdapAdapter::new("dir", pcfg);
    let changes = args.changes;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; changes]));
    // Reach the persist stage first (the refresh finds nothing new).
    let mut checkpoint = repo.checkpoint("dir")?;
    if let Fetch::Batch(b) = persist.next_batch(checkpoint.as_ref(), repo.as_ref())? {
        engine.apply_batch(&policy, checkpoint.as_ref(), &b)?;
        checkpoint = repo.checkpoint("dir")?;
    }
    let writer_cfg = cfg.clone();
    let writer_sent = sent.clone();
    let pace = Duration::from_millis(args.pace_ms);
    let entries = args.entries.max(1);
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut w = idsync_ldap::tools::Writer::new(&writer_cfg).context("the writer's bind")?;
        for i in 0..changes {
            let dn = format!("uid=u{},{PEOPLE}", (i * 7919) % entries);
            if let Ok(mut s) = writer_sent.lock() {
                s[i] = Some(Instant::now());
            }
            w.replace(&dn, "title", &format!("lat{i}"))
                .with_context(|| format!("modifying {dn}"))?;
            std::thread::sleep(pace);
        }
        Ok(())
    });
    let mut latencies = Vec::with_capacity(changes);
    let deadline = Instant::now() + Duration::from_secs(60 + changes as u64 * args.pace_ms / 100);
    while latencies.len() < changes && Instant::now() < deadline {
        let fetch = persist
            .next_batch(checkpoint.as_ref(), repo.as_ref())
            .context("a persist-mode fetch")?;
        let Fetch::Batch(b) = fetch else { continue };
        engine
            .apply_batch(&policy, checkpoint.as_ref(), &b)
            .context("a persist-mode apply")?;
        let now = Instant::now();
        checkpoint = b.checkpoint.clone().or(checkpoint);
        let s = sent
            .lock()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        for e in &b.events {
            let Some(title) = e.attrs.first_text("title") else {
                continue;
            };
            if let Some(i) = title
                .strip_prefix("lat")
                .and_then(|n| n.parse::<usize>().ok())
                && let Some(Some(t0)) = s.get(i)
            {
                latencies.push(now - *t0);
            }
        }
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    latencies.sort();
    say!(
        "persist latency (modify → identity committed), {} of {changes} changes paced {} ms: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        args.pace_ms,
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    drop(server);
    Ok(())
}
