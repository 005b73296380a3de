//! `idsync bench ldap`: one run that measures, against a private slapd it starts itself
//! (generated `slapd.conf` as in the tests, `slapadd` of generated entries, foreground child
//! on a free loopback port, stopped at the end):
//! 1. the floor: a raw ldap3 paged search of every entry;
//! 2. a full sync (refreshOnly, no cookie) of the same entries into a fresh repository,
//!    with its records floor (`bench_records`): the rows it wrote, inserted again alone;
//! 3. modify → identity-committed latency in persist mode, p50/p99 over paced modifies.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use idsync_core::{Adapter, Fetch};
use idsync_engine::{Engine, Policy};
use idsync_ldap::{LdapAdapter, LdapConfig, Mode};
use idsync_repo::Repo;

use crate::bench_records::records_floor;
use crate::cli::BenchLdapArgs;

const SUFFIX: &str = "dc=bench,dc=example";
const PEOPLE: &str = "ou=people,dc=bench,dc=example";
const ADMIN: &str = "cn=admin,dc=bench,dc=example";

/// A private slapd, stopped (SIGTERM, wait) and its folder removed on drop.
struct Server {
    dir: PathBuf,
    child: Option<Child>,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sbin(name: &str) -> String {
    let p = Path::new("/usr/sbin").join(name);
    if p.is_file() {
        p.display().to_string()
    } else {
        name.to_owned()
    }
}

fn start_server(entries: usize, password: &str) -> anyhow::Result<Server> {
    let dir = std::env::temp_dir().join(format!("idsync-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::create_dir_all(dir.join("accesslog"))?;
    let d = dir.display();
    let conf = format!(
        "include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {d}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload syncprov
moduleload accesslog
sizelimit size.soft=unlimited size.hard=unlimited
database mdb
suffix cn=accesslog
rootdn cn=admin,cn=accesslog
directory {d}/accesslog
maxsize 4294967296
dbnosync
index objectClass,entryCSN,reqEnd,reqResult,reqStart,reqDN,reqType eq
overlay syncprov
syncprov-nopresent TRUE
syncprov-reloadhint TRUE
database mdb
suffix {SUFFIX}
rootdn {ADMIN}
rootpw {password}
directory {d}/data
maxsize 8589934592
dbnosync
index objectClass,entryCSN,entryUUID eq
overlay syncprov
syncprov-checkpoint 100 10
syncprov-sessionlog-source cn=accesslog
overlay accesslog
logdb cn=accesslog
logops writes
logsuccess TRUE
"
    );
    std::fs::write(dir.join("slapd.conf"), conf)?;
    let mut ldif = std::io::BufWriter::new(std::fs::File::create(dir.join("data.ldif"))?);
    write!(
        ldif,
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Bench\ndc: bench\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
    )?;
    for i in 0..entries {
        write!(
            ldif,
            "dn: uid=u{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: User {i}\n\
             sn: {i}\ngivenName: User\nmail: u{i}@bench.example\ntitle: Engineer\n\
             telephoneNumber: +1 555 {i:07}\nemployeeNumber: {i}\n\n"
        )?;
    }
    ldif.flush()?;
    drop(ldif);
    let out = Command::new(sbin("slapadd"))
        .args(["-q", "-f", "slapd.conf", "-b", SUFFIX, "-l", "data.ldif"])
        .current_dir(&dir)
        .output()
        .context("slapadd (apt-get install slapd)")?;
    if !out.status.success() {
        bail!("slapadd: {}", String::from_utf8_lossy(&out.stderr));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("ldap://127.0.0.1:{port}/");
    let child = Command::new(sbin("slapd"))
        .args(["-f", "slapd.conf", "-h", &url, "-d", "0"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("slapd")?;
    let server = Server {
        dir,
        child: Some(child),
        url,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("ldapsearch")
            .args([
                "-x",
                "-H",
                &server.url,
                "-b",
                "",
                "-s",
                "base",
                "namingContexts",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(SUFFIX))
            .unwrap_or(false);
        if ok {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("slapd did not answer on {}", server.url);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `idsync bench ldap`.
pub fn ldap(args: &BenchLdapArgs) -> anyhow::Result<()> {
    let password = "bench-secret";
    // The adapter reads the password from a secret file, as in production.
    let t = Instant::now();
    let server = start_server(args.entries, password)?;
    let pw_file = server.dir.join("pw");
    std::fs::write(&pw_file, password)?;
    println!(
        "slapd with {} entries ready in {:.1}s ({})",
        args.entries,
        t.elapsed().as_secs_f64(),
        server.url
    );
    let mut cfg = LdapConfig::new(&server.url, PEOPLE);
    cfg.filter = "(objectClass=inetOrgPerson)".to_owned();
    cfg.bind_dn = Some(ADMIN.to_owned());
    cfg.bind_password_file = Some(pw_file);
    cfg.page_size = args.page_size;
    cfg.timeout_secs = 120;

    // 1. Floor: raw paged search.
    let t = Instant::now();
    let n = idsync_ldap::tools::paged_search_count(&cfg)?;
    let raw = t.elapsed();
    let raw_rate = n as f64 / raw.as_secs_f64();
    println!(
        "raw ldap3 paged search: {n} entries in {:.2}s = {raw_rate:.0} entries/s",
        raw.as_secs_f64()
    );

    // 2. Full sync into a fresh repository.
    let db = server.dir.join("bench.db");
    let repo = Arc::new(Repo::open(&db)?);
    let engine = Engine::new(repo.clone(), &idsync_rules::Limits::default());
    let policy = Policy::new("dir");
    let mut adapter = LdapAdapter::new("dir", cfg.clone());
    let t = Instant::now();
    let fetch = adapter.next_batch(None, repo.as_ref())?;
    let fetched = t.elapsed();
    let Fetch::Batch(batch) = fetch else {
        bail!("the full sync found nothing");
    };
    let events = batch.events.len();
    let report = engine.apply_batch(&policy, None, &batch)?;
    let total = t.elapsed();
    let rate = events as f64 / total.as_secs_f64();
    println!(
        "full sync: {events} events ({} failed) in {:.2}s (fetch {:.2}s, decide+commit {:.2}s) = {rate:.0} entries/s = {:.2}x the raw search",
        report.failed,
        total.as_secs_f64(),
        fetched.as_secs_f64(),
        (total - fetched).as_secs_f64(),
        rate / raw_rate
    );
    let fetch_rate = events as f64 / fetched.as_secs_f64();
    println!(
        "  (adapter fetch alone: {fetch_rate:.0} entries/s = {:.2}x the raw search)",
        fetch_rate / raw_rate
    );
    // The rows the full sync wrote, inserted again without the adapter or the engine.
    repo.settle();
    let records = records_floor(&db, &server.dir.join("records.db"))?;
    let records_rate = events as f64 / records.elapsed.as_secs_f64();
    println!(
        "  (records floor: the {} rows the full sync wrote, inserted again in {:.2}s = {records_rate:.0} entries/s = {:.2}x the raw search)",
        records.rows,
        records.elapsed.as_secs_f64(),
        records_rate / raw_rate
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
        let mut w = idsync_ldap::tools::Writer::new(&writer_cfg)?;
        for i in 0..changes {
            let dn = format!("uid=u{},{PEOPLE}", (i * 7919) % entries);
            if let Ok(mut s) = writer_sent.lock() {
                s[i] = Some(Instant::now());
            }
            w.replace(&dn, "title", &format!("lat{i}"))?;
            std::thread::sleep(pace);
        }
        Ok(())
    });
    let mut latencies = Vec::with_capacity(changes);
    let deadline = Instant::now() + Duration::from_secs(60 + changes as u64 * args.pace_ms / 100);
    while latencies.len() < changes && Instant::now() < deadline {
        let fetch = persist.next_batch(checkpoint.as_ref(), repo.as_ref())?;
        let Fetch::Batch(b) = fetch else { continue };
        engine.apply_batch(&policy, checkpoint.as_ref(), &b)?;
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
    println!(
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
