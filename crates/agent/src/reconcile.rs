//! Reconciliation: every account of a resource (or some of them) decided again with the
//! current rules and mappings against what the resource holds now, so that a changed
//! mapping or rule reaches the identities whose accounts did not change.
//!
//! - `idsync reconcile RESOURCE [--key KEY ...] [--accept-deletes]` ([`command`]) runs one
//!   in this process. It takes the agent lock, as `idsync run --once` does: a reconcile and
//!   a pass of the same resource never run at once, and a reconcile refuses to start while
//!   an agent runs on the repository (the agent reconciles on its own schedule instead).
//! - The agent runs one at a resource's `reconcile: { cron }` times (module `service`),
//!   through [`run`] like the command.
//!
//! Both go through [`crate::runner::reconcile`]: ordinary batches of `batch_size` with
//! their checkpoints, so a reconcile cut short by a kill loses nothing; begun again, it
//! resumes after its committed parts (or starts over if the file changed meanwhile).
//! Every decision is recorded with op `reconcile`, and every run in the repository's
//! record of reconciles, which `idsync status` shows.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::SystemTime;

use idsync_core::{Adapter, Decision};
use idsync_engine::{BatchReport, Policy};
use idsync_repo::{ReconcileOutcome, ReconcileRun};

use crate::cli::ReconcileArgs;
use crate::commands::TerminalBar;
use crate::config::Loaded;
use crate::exit::Exit;
use crate::printable::{inline, line};
use crate::runner::{Progress, Reconciled, Stop};
use crate::setup::Setup;

/// What started a reconcile, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartedBy {
    /// `idsync reconcile`.
    Command,
    /// The agent, at the resource's `reconcile: { cron }` time.
    Schedule,
}

impl StartedBy {
    fn as_str(self) -> &'static str {
        match self {
            StartedBy::Command => "command",
            StartedBy::Schedule => "schedule",
        }
    }
}

/// One reconcile of `policy`'s resource through `adapter`, recorded in the repository's
/// record of reconciles whatever its outcome (a failure to record it is logged: the
/// reconcile itself is committed).
pub fn run(
    setup: &Setup,
    adapter: &mut dyn Adapter,
    policy: &Policy,
    keys: Option<Vec<String>>,
    started_by: StartedBy,
    stop: &Stop,
    progress: &mut dyn Progress,
) -> anyhow::Result<Reconciled> {
    let started_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let key_count = keys.as_ref().map(|k| k.len() as u64);
    let mut seen = Counting {
        inner: progress,
        report: BatchReport::default(),
    };
    let result = crate::runner::reconcile(setup, adapter, policy, keys, stop, &mut seen);
    let report = match &result {
        Ok(r) => r.report.clone().unwrap_or_default(),
        Err(_) => seen.report,
    };
    let (outcome, error) = match &result {
        Ok(r) if r.complete => (ReconcileOutcome::Complete, None),
        Ok(_) => (ReconcileOutcome::Stopped, None),
        Err(e) => (ReconcileOutcome::Failed, Some(format!("{e:#}"))),
    };
    let record = ReconcileRun {
        resource: policy.resource.clone(),
        started_at,
        ended_at: String::new(),
        started_by: started_by.as_str().to_owned(),
        keys: key_count,
        events: report.events(),
        changed: report.events() - report.unchanged.min(report.events()),
        unchanged: report.unchanged,
        failed: report.failed,
        rejected: report.rejected,
        outcome,
        error,
    };
    if let Err(e) = setup.engine.repo().record_reconcile(&record) {
        tracing::warn!(resource = %policy.resource, "the reconcile could not be recorded for `idsync status`: {e}");
    }
    result
}

/// Counts the committed parts (so a reconcile that fails after some parts records what it
/// committed) and passes everything on.
struct Counting<'a> {
    inner: &'a mut dyn Progress,
    report: BatchReport,
}

impl Progress for Counting<'_> {
    fn part_started(&mut self, events: usize, planned: Option<u64>) {
        self.inner.part_started(events, planned);
    }

    fn event_done(&mut self, decision: &Decision) {
        self.inner.event_done(decision);
    }

    fn part_committed(&mut self, report: &BatchReport) {
        self.report.merge(report);
        self.inner.part_committed(report);
    }
}

/// The line that says what a reconcile did: `hr: reconciled: 6 events, 4 changed, 2
/// unchanged; situations: …`.
pub fn describe(resource: &str, reconciled: &Reconciled) -> String {
    let Some(report) = &reconciled.report else {
        return format!(
            "{resource}: nothing to reconcile (the resource holds no account and none is known)"
        );
    };
    let events = report.events();
    format!(
        "{resource}: {}: {} changed, {} unchanged; {}",
        if reconciled.complete {
            "reconciled"
        } else {
            "reconcile stopped between parts (begun again, it goes on)"
        },
        events - report.unchanged.min(events),
        report.unchanged,
        crate::explain::describe(report)
    )
}

/// The command's progress: the terminal bar, and the keys decided (to name the ones asked
/// for that were not).
struct CommandProgress {
    bar: TerminalBar,
    decided: BTreeSet<String>,
}

impl Progress for CommandProgress {
    fn part_started(&mut self, events: usize, planned: Option<u64>) {
        self.bar.part_started(events, planned);
    }

    fn event_done(&mut self, decision: &Decision) {
        self.bar.event_done(decision);
        self.decided.insert(decision.key.clone());
    }

    fn part_committed(&mut self, report: &BatchReport) {
        self.bar.part_committed(report);
    }
}

/// `idsync reconcile RESOURCE [--key KEY ...] [--accept-deletes]`.
pub fn command(loaded: Loaded, args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let Some(index) = loaded
        .config
        .resources
        .iter()
        .position(|r| r.name == args.resource)
    else {
        eprintln!(
            "error: no resource named '{}' in {}",
            args.resource,
            loaded.file.display()
        );
        return Ok(ExitCode::from(Exit::Config));
    };
    let mut setup = match crate::commands::setup(loaded) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    // The agent's writer discipline: one process passes a resource at a time.
    let _lock = match crate::lock::AgentLock::acquire(&setup.loaded.repository_path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: {e:#}; a reconcile runs only while no agent runs on the repository: stop the agent, or let it reconcile on a schedule (`reconcile: {{ cron: ... }}` in the resource)"
            );
            return Ok(ExitCode::from(Exit::Resource));
        }
    };
    let guard = crate::inflight::open(&setup)?;
    crate::inflight::attach(&mut setup, &guard);
    let Some(policy) = setup.policy(&args.resource).cloned() else {
        return Ok(ExitCode::from(Exit::Config));
    };
    let repo = setup.engine.repo().clone();
    // On PostgreSQL, the resource's lease: another agent may be running it.
    let leases = crate::leases::OnceLeases::take(
        &setup.loaded,
        &repo,
        std::slice::from_ref(&args.resource),
    )?;
    if leases
        .as_ref()
        .is_some_and(|(_, elsewhere)| !elsewhere.is_empty())
    {
        eprintln!(
            "error: {}: another agent holds its lease (idsync status); it reconciles it on its \
             schedule (`reconcile: {{ cron: ... }}`), or stop that agent first",
            args.resource
        );
        return Ok(ExitCode::from(Exit::Resource));
    }
    let keys = if args.keys.is_empty() {
        None
    } else {
        let mut resolved = Vec::new();
        for k in &args.keys {
            resolved.push(crate::accounts::resolve_key(
                &setup.loaded,
                &repo,
                Some(&args.resource),
                k,
            )?);
        }
        Some(resolved)
    };
    let mut adapter = setup.adapter(index);
    if args.accept_deletes {
        adapter.accept_deletes();
    }
    let mut progress = CommandProgress {
        bar: TerminalBar::new(&args.resource),
        decided: BTreeSet::new(),
    };
    let result = run(
        &setup,
        adapter.as_mut(),
        &policy,
        keys.clone(),
        StartedBy::Command,
        &Stop::new(),
        &mut progress,
    );
    drop(progress.bar);
    drop(leases);
    let mut code = match &result {
        Ok(reconciled) => {
            line(format_args!("{}", describe(&args.resource, reconciled)));
            match &reconciled.report {
                Some(r) if r.failed > 0 || r.rejected > 0 => ExitCode::from(Exit::Failed),
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            line(format_args!(
                "{}: not reconciled (see error above); what was committed stays, and `idsync reconcile {}` goes on from it",
                args.resource, args.resource
            ));
            ExitCode::from(Exit::Resource)
        }
    };
    if result.is_ok()
        && let Some(keys) = &keys
    {
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !progress.decided.contains(*k))
            .collect();
        for k in &missing {
            eprintln!(
                "error: {}: no account '{}' was reconciled: it is not on the resource and not known, or its input is rejected (idsync failed list --resource {})",
                args.resource,
                inline(k),
                args.resource
            );
        }
        if !missing.is_empty() && code == ExitCode::SUCCESS {
            code = ExitCode::from(Exit::Failed);
        }
    }
    // The notifications the reconcile queued, as after `run --once`.
    code = crate::outbox::round_after_command(&setup, code);
    Ok(code)
}
