//! `idsync status`: per resource, what the running agent last did (from the status file it
//! rewrites after every turn of its loop, `<repository>.status.json`) or, when no agent
//! runs, what the last `idsync run --once` recorded in the repository (its last pass and
//! last error), and what the repository holds (checkpoint age, events processed, failed
//! events, the last reconcile and the reconcile schedule); the outbox counts and the open
//! work items.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use idsync_engine::BatchReport;
use idsync_repo::ReconcileRun;
use serde::{Deserialize, Serialize};

use crate::config::Loaded;
use crate::lock::AgentLock;
use crate::setup::open_repo;

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One resource loop, as the agent reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResourceStatus {
    /// Resource name.
    pub resource: String,
    /// `starting`, `ok`, `failing`, or `standby` (another agent holds its lease).
    pub state: String,
    /// When the last pass ended (RFC 3339).
    pub last_pass_at: Option<String>,
    /// When the last pass that applied changes ended.
    pub last_change_at: Option<String>,
    /// The error of the last pass, if it failed.
    pub last_error: Option<String>,
    /// Passes since the agent started.
    pub passes: u64,
    /// Events decided since the agent started.
    pub processed: u64,
    /// Events that failed since the agent started.
    pub failed: u64,
}

impl ResourceStatus {
    /// A resource that has not passed yet.
    pub fn new(resource: &str) -> Self {
        ResourceStatus {
            resource: resource.to_owned(),
            state: "starting".to_owned(),
            ..ResourceStatus::default()
        }
    }

    /// A committed part of a pass (counted at once, so a long pass shows its progress).
    pub fn part_ok(&mut self, report: &BatchReport) {
        self.state = "ok".to_owned();
        self.last_error = None;
        self.processed += report.events();
        self.failed += report.failed;
        self.last_change_at = Some(now());
    }

    /// A pass that worked (its parts were counted by [`ResourceStatus::part_ok`]).
    pub fn pass_ok(&mut self, report: Option<&BatchReport>) {
        let t = now();
        self.state = "ok".to_owned();
        self.passes += 1;
        self.last_error = None;
        if report.is_some() {
            self.last_change_at = Some(t.clone());
        }
        self.last_pass_at = Some(t);
    }

    /// A scheduled reconcile that worked (its parts were counted by
    /// [`ResourceStatus::part_ok`]); not counted as a pass.
    pub fn reconcile_ok(&mut self) {
        self.state = "ok".to_owned();
        self.last_error = None;
    }

    /// Another agent holds the resource's lease: this agent waits (PostgreSQL).
    pub fn standby(&mut self) {
        self.state = "standby".to_owned();
    }

    /// A pass that could not synchronize the resource.
    pub fn pass_failed(&mut self, error: &str) {
        self.state = "failing".to_owned();
        self.passes += 1;
        self.last_error = Some(error.to_owned());
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    pid: u32,
    running: bool,
    updated_at: String,
    resources: Vec<ResourceStatus>,
}

/// The status file next to the repository.
#[derive(Clone, Debug)]
pub struct StatusFile {
    path: PathBuf,
}

impl StatusFile {
    /// `<repository>.status.json`.
    pub fn for_repository(db: &Path) -> StatusFile {
        StatusFile {
            path: crate::config::beside(db, crate::config::STATUS_SUFFIX),
        }
    }

    fn store(&self, running: bool, resources: &[ResourceStatus]) {
        let snap = Snapshot {
            pid: std::process::id(),
            running,
            updated_at: now(),
            resources: resources.to_vec(),
        };
        let tmp = self.path.with_extension("json.tmp");
        let result = serde_json::to_vec_pretty(&snap)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_owner_only(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::debug!("status file {}: {e}", self.path.display());
        }
    }

    /// Rewrites the file (atomically: temp file and rename).
    pub fn write(&self, resources: &[ResourceStatus]) {
        self.store(true, resources);
    }

    /// Marks the agent stopped.
    pub fn write_stopped(&self, resources: &[ResourceStatus]) {
        self.store(false, resources);
    }

    fn read(&self) -> Option<Snapshot> {
        let bytes = std::fs::read(&self.path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

fn age(at: Option<&str>) -> String {
    let Some(at) = at else {
        return "never".to_owned();
    };
    match humantime::parse_rfc3339_weak(at) {
        Ok(t) => {
            let secs = SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs();
            format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(secs))
            )
        }
        Err(_) => at.to_owned(),
    }
}

/// `idsync status [--json]`.
pub fn command(loaded: &Loaded, json: bool) -> anyhow::Result<ExitCode> {
    let db = loaded.repository_path();
    let running = AgentLock::is_held(&db);
    let snapshot = StatusFile::for_repository(&db).read();
    let repo = open_repo(loaded)?;
    let mut rows = Vec::new();
    let mut reconciles = Vec::new();
    for r in &loaded.config.resources {
        let summary = repo.resource_summary(&r.name)?;
        let live = snapshot
            .as_ref()
            .filter(|_| running)
            .and_then(|s| s.resources.iter().find(|x| x.resource == r.name).cloned());
        let recorded = repo.last_pass(&r.name)?.unwrap_or_default();
        let passes = Passes::of(live.as_ref(), recorded);
        rows.push((r.name.clone(), summary, live, passes));
        reconciles.push((
            repo.last_reconcile(&r.name)?,
            r.reconcile.as_ref().map(|c| c.cron.clone()),
        ));
    }
    let (pending, sent, dead) = repo.outbox_counts()?;
    let open_items = repo.open_work_item_count()?;
    let timers = crate::timers::status(&repo)?;
    let leases = repo.leases()?;
    let mut out = crate::printable::stdout();
    if json {
        let value = serde_json::json!({
            "agent": { "running": running, "pid": snapshot.as_ref().filter(|_| running).map(|s| s.pid) },
            "resources": rows.iter().zip(&reconciles).map(|((name, summary, live, passes), (last, cron))| serde_json::json!({
                "resource": name,
                "state": live.as_ref().map(|l| l.state.as_str()).unwrap_or(if running { "starting" } else { "stopped" }),
                "checkpoint_at": summary.checkpoint_at,
                "last_pass_at": passes.last_pass_at,
                "last_error": passes.last_error,
                "processed": summary.decisions,
                "failed": summary.failed_decisions,
                "failed_pending": summary.failed_pending,
                "last_reconcile": last,
                "reconcile_cron": cron,
            })).collect::<Vec<_>>(),
            "outbox": { "pending": pending, "sent": sent, "dead": dead },
            "work_items_open": open_items,
            "timers": { "pending": timers.pending, "overdue": timers.overdue, "next_due": timers.next_due.map(idsync_engine::format_time) },
            "leases": leases.iter().map(|l| serde_json::json!({
                "resource": l.resource,
                "holder": l.holder,
                "token": l.token,
                "since": idsync_engine::format_time(l.acquired_at),
                "expires_at": idsync_engine::format_time(l.expires_at),
                "expired": l.expired,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{value}")?;
        return Ok(ExitCode::SUCCESS);
    }
    match snapshot.as_ref().filter(|_| running) {
        Some(s) => writeln!(
            out,
            "agent: running (pid {}), last report {}",
            s.pid,
            age(Some(&s.updated_at))
        )?,
        None => writeln!(out, "agent: not running")?,
    }
    for ((name, summary, live, passes), (last, cron)) in rows.iter().zip(&reconciles) {
        let state = live.as_ref().map(|l| l.state.clone()).unwrap_or_else(|| {
            if running {
                "starting".into()
            } else {
                "stopped".into()
            }
        });
        writeln!(
            out,
            "{name}: {state}; last pass {}; checkpoint committed {}; processed {}, failed {} ({} waiting for retry)",
            age(passes.last_pass_at.as_deref()),
            age(summary.checkpoint_at.as_deref()),
            summary.decisions,
            summary.failed_decisions,
            summary.failed_pending
        )?;
        if let Some(e) = &passes.last_error {
            writeln!(out, "  last error: {}", crate::printable::inline(e))?;
        }
        if last.is_some() || cron.is_some() {
            writeln!(out, "  {}", reconcile_line(last.as_ref(), cron.as_deref()))?;
        }
    }
    for l in &leases {
        let since = idsync_engine::format_time(l.acquired_at);
        if l.expired {
            writeln!(
                out,
                "lease {}: expired (last held by {} since {since}); the next agent to look takes it",
                l.resource, l.holder
            )?;
        } else {
            writeln!(
                out,
                "lease {}: held by {} since {since} (token {})",
                l.resource, l.holder, l.token
            )?;
        }
    }
    writeln!(out, "outbox: {pending} pending, {sent} sent, {dead} dead")?;
    if open_items > 0 {
        writeln!(
            out,
            "work items: {open_items} open (idsync work-items list)"
        )?;
    }
    if timers.pending > 0 {
        writeln!(out, "{}", crate::timers::status_line(&timers))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `reconcile: last 3h ago by command: complete, 6 events (4 changed, 2 unchanged); at
/// '0 3 * * *' (UTC), next in 5h`.
fn reconcile_line(last: Option<&ReconcileRun>, cron: Option<&str>) -> String {
    let mut out = String::from("reconcile: ");
    match last {
        Some(r) => {
            out.push_str(&format!(
                "last {} by {}: {}, {} events ({} changed, {} unchanged",
                age(Some(&r.ended_at)),
                r.started_by,
                r.outcome.as_str(),
                r.events,
                r.changed,
                r.unchanged
            ));
            if r.failed > 0 || r.rejected > 0 {
                out.push_str(&format!(", failed {}, rejected {}", r.failed, r.rejected));
            }
            if let Some(k) = r.keys {
                out.push_str(&format!("; {k} key(s) asked for"));
            }
            out.push(')');
            if let Some(e) = &r.error {
                out.push_str(&format!("; error: {e}"));
            }
        }
        None => out.push_str("never"),
    }
    if let Some(cron) = cron {
        let next = crate::schedule::Schedule::parse(cron)
            .ok()
            .and_then(|s| s.wait())
            .map(|w| {
                format!(
                    ", next in {}",
                    humantime::format_duration(std::time::Duration::from_secs(w.as_secs()))
                )
            })
            .unwrap_or_default();
        out.push_str(&format!("; scheduled at '{cron}' (UTC){next}"));
    }
    out
}

/// A resource's last pass and last error as `status` shows them.
#[derive(Debug)]
struct Passes {
    last_pass_at: Option<String>,
    last_error: Option<String>,
}

impl Passes {
    /// While an agent runs, its own report (`live`; the last pass of an earlier
    /// `run --once` until its first pass ends); otherwise what the last `run --once`
    /// recorded.
    fn of(live: Option<&ResourceStatus>, recorded: idsync_repo::LastPass) -> Passes {
        match live {
            Some(l) => Passes {
                last_pass_at: l.last_pass_at.clone().or(recorded.passed_at),
                last_error: l.last_error.clone(),
            },
            None => Passes {
                last_pass_at: recorded.passed_at,
                last_error: recorded.error,
            },
        }
    }
}

/// Writes `bytes` to a file readable by its owner only (it names resources and errors).
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}
