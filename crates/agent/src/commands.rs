//! The commands: each returns the process exit status.
//!
//! Exit status: 0 success; 1 some event or retry failed, a mail was dead-lettered, or a
//! thing asked for does not exist; 2 the config or a rule is broken; 3 a resource could not be synchronized
//! (unreachable file, halted batch, repository error).

use std::io::Write;
use std::process::ExitCode;

use idsync_core::{Adapter, Identity, Situation};
use idsync_engine::BatchReport;
use idsync_repo::DecisionFilter;
use idsync_rules::RuleEngine;

use crate::cli::{Command, FailedCommand, IdentitiesCommand, ResultsArgs, ResultsCommand, RunArgs};
use crate::config::{Loaded, Problems};
use crate::exit::Exit;
use crate::printable::{inline, line};
use crate::setup::{Setup, compile_all, open_repo};

/// Loads the config, reporting problems on stderr.
pub fn load(file: &std::path::Path) -> Result<Loaded, ExitCode> {
    Loaded::read(file).map_err(|p| report_problems(&p))
}

fn report_problems(p: &Problems) -> ExitCode {
    eprintln!("{p}");
    eprintln!("{} problem(s) found", p.0.len());
    ExitCode::from(Exit::Config)
}

/// The setup of a command that decides (run, retry, operator commands): the config's
/// problems are reported as `check` reports them.
pub(crate) fn setup(loaded: Loaded) -> Result<Setup, ExitCode> {
    Setup::new(loaded).map_err(|e| setup_failed(&e))
}

/// Reports why the setup failed: every config problem, or the error.
fn setup_failed(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<Problems>() {
        Some(p) => report_problems(p),
        None => {
            eprintln!("error: {e:#}");
            ExitCode::from(Exit::Resource)
        }
    }
}

/// Refuses a resource named on the command line (`--resource`, `--accept-deletes`, the
/// `RESOURCE` of `explain`) that the config does not have: exit status 2, naming it and the
/// configured ones. A command that reads records only may name a removed resource whose
/// records the repository still holds (to read them, or discard its failed events). The
/// one place every command's resources are checked.
pub fn check_resources(loaded: &Loaded, command: &Command) -> Result<(), ExitCode> {
    let configured: Vec<&str> = loaded
        .config
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    let mut unknown: Vec<(&str, &str)> = command
        .named_resources()
        .into_iter()
        .filter(|(_, name)| !configured.contains(name))
        .collect();
    let no_file = loaded.config.repository.url.is_none() && !loaded.repository_path().exists();
    let mut looked_in_repository = false;
    if !unknown.is_empty() && command.reads_records_only() && !no_file {
        // A repository that cannot be opened is reported by the command itself.
        if let Ok(repo) = crate::setup::open_repo(loaded) {
            looked_in_repository = true;
            unknown.retain(|(_, name)| !repo.holds_records_of(name).unwrap_or(false));
        }
    }
    let nor_recorded = if looked_in_repository || (no_file && command.reads_records_only()) {
        "; the repository holds no records of it either"
    } else {
        ""
    };
    let unknown: Vec<String> = unknown
        .into_iter()
        .map(|(flag, name)| {
            format!(
                "error: {flag}: no resource named '{}' in {} (configured: {}){nor_recorded}",
                inline(name),
                loaded.file.display(),
                if configured.is_empty() {
                    "none".to_owned()
                } else {
                    configured.join(", ")
                }
            )
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    for line in unknown {
        eprintln!("{line}");
    }
    Err(ExitCode::from(Exit::Config))
}

/// `idsync check [--connect]`.
pub fn check(loaded: Loaded, args: &crate::cli::CheckArgs) -> ExitCode {
    let rules = RuleEngine::new(&loaded.config.limits.to_limits());
    let policies = match compile_all(&loaded, &rules) {
        Ok(policies) => policies,
        Err(p) => return report_problems(&p),
    };
    let found = crate::preflight::problems(&loaded);
    if !found.is_empty() {
        return report_problems(&Problems(found));
    }
    if let Some(n) = &loaded.config.notifications {
        for w in idsync_notify::PolicyNotifier::html_warnings(n) {
            line(format_args!("warning: {}: {w}", loaded.file.display()));
        }
    }
    for w in crate::authority::warnings(&loaded, &policies) {
        line(format_args!("warning: {}: {w}", loaded.file.display()));
    }
    for r in &loaded.config.resources {
        let Some(rc) = &r.reconcile else {
            continue;
        };
        let next = crate::schedule::Schedule::parse(&rc.cron)
            .ok()
            .zip(crate::schedule::utc_now())
            .and_then(|(s, now)| s.next_after(now))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "never".to_owned());
        line(format_args!(
            "reconcile: {} at '{}' (UTC), next {next}",
            r.name, rc.cron
        ));
    }
    let mut code = ExitCode::SUCCESS;
    if args.connect {
        for probe in crate::preflight::connect(&loaded) {
            match probe.result {
                Ok(()) => line(format_args!("connect: {}: ok", probe.what)),
                Err(e) => {
                    line(format_args!("connect: {}: {}", probe.what, inline(&e)));
                    code = ExitCode::from(Exit::Resource);
                }
            }
        }
    }
    line(format_args!(
        "{}: {} ({} resource(s), rules in {})",
        loaded.file.display(),
        if code == ExitCode::SUCCESS {
            "ok"
        } else {
            "config ok, a connection failed"
        },
        policies.len(),
        loaded.rules_dir().display()
    ));
    code
}

/// `idsync run`.
pub fn run(loaded: Loaded, args: &RunArgs) -> ExitCode {
    let mut setup = match setup(loaded) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _lock = match crate::lock::AgentLock::acquire(&setup.loaded.repository_path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(Exit::Resource);
        }
    };
    let guard = match crate::inflight::open(&setup) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(Exit::Resource);
        }
    };
    crate::inflight::attach(&mut setup, &guard);
    if !args.once {
        return crate::service::serve(setup, args, &guard);
    }
    let mut adapters = adapters(&setup, &args.accept_deletes);
    // On PostgreSQL, only the resources whose lease this run can take (another agent runs
    // the others); their batches are fenced like the agent's.
    let selected = setup.loaded.selected_resources(&args.resources);
    let leases =
        match crate::leases::OnceLeases::take(&setup.loaded, setup.engine.repo(), &selected) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(Exit::Resource);
            }
        };
    let only: Vec<String> = match &leases {
        Some((_, elsewhere)) => {
            for r in elsewhere {
                line(format_args!(
                    "{r}: skipped: another agent holds its lease (idsync status)"
                ));
            }
            selected
                .into_iter()
                .filter(|r| !elsewhere.contains(r))
                .collect()
        }
        None => args.resources.clone(),
    };
    if leases.as_ref().is_some_and(|(_, e)| !e.is_empty()) && only.is_empty() {
        return ExitCode::SUCCESS;
    }
    // Lifecycle timers due by now: before the passes (their time came first) and after
    // them; before the mail round, which sends their mail.
    let mut timers = crate::timers::OnceRounds::default();
    timers.fire(&setup, &args.resources);
    let mut code = pass(&setup, &only, &mut adapters);
    // The leases are given back once the pass is over (before the mail round).
    drop(leases);
    timers.fire(&setup, &args.resources);
    if let Some(timers) = timers.finish()
        && (code == ExitCode::SUCCESS || timers == ExitCode::from(Exit::Resource))
    {
        code = timers;
    }
    code = crate::outbox::round_after_command(&setup, code);
    let ages = crate::retention::Ages::of(&setup.loaded.config.retention);
    if !ages.is_empty() {
        match crate::retention::apply(setup.engine.repo(), &ages, &|| false) {
            Ok(applied) => {
                if let Some(what) = applied.describe() {
                    line(format_args!("retention: {what}"));
                }
            }
            Err(e) => {
                eprintln!("error: retention: {e}");
                code = ExitCode::from(Exit::Resource);
            }
        }
    }
    code
}

/// One adapter per resource, kept as long as the setup: a connection (and an LDAP persist
/// stream) survives between passes. `accept_deletes` lifts the delete guard of those.
pub fn adapters(setup: &Setup, accept_deletes: &[String]) -> Vec<Box<dyn Adapter>> {
    setup
        .loaded
        .config
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut a = setup.adapter(i);
            if accept_deletes.contains(&r.name) {
                a.accept_deletes();
            }
            a
        })
        .collect()
}

/// One pass of every selected resource (`idsync run --once`); prints a line per resource
/// and, for several, a summary line. A closed standard output ends the lines quietly; the
/// pass goes on (see [`crate::printable`]). The long-running agent uses [`pass_resource`] from its own loop.
pub fn pass(setup: &Setup, only: &[String], adapters: &mut [Box<dyn Adapter>]) -> ExitCode {
    let mut total = BatchReport::default();
    let mut resource_errors = 0;
    let mut passed = 0;
    for (i, r) in setup.loaded.config.resources.iter().enumerate() {
        if !only.is_empty() && !only.contains(&r.name) {
            continue;
        }
        let Some(policy) = setup.policy(&r.name) else {
            continue;
        };
        passed += 1;
        let result = pass_resource(setup, adapters[i].as_mut(), policy);
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        match result {
            Ok(Some(report)) => {
                line(format_args!(
                    "{}: {}",
                    r.name,
                    crate::explain::describe(&report)
                ));
                total.merge(&report);
            }
            Ok(None) => line(format_args!("{}: no changes", r.name)),
            Err(e) => {
                eprintln!("error: {e:#}");
                line(format_args!(
                    "{}: not synchronized (see error above)",
                    r.name
                ));
                resource_errors += 1;
            }
        }
        // For `idsync status` once this process has gone (the agent has its status file).
        if let Err(e) = setup.engine.repo().record_pass(&r.name, error.as_deref()) {
            tracing::warn!(resource = %r.name, "cannot record the pass for `idsync status`: {e}");
        }
    }
    summary(passed, &total);
    if resource_errors > 0 {
        ExitCode::from(Exit::Resource)
    } else if total.failed > 0 || total.rejected > 0 {
        ExitCode::from(Exit::Failed)
    } else {
        ExitCode::SUCCESS
    }
}

/// One resource: fetch and apply batches until the adapter has nothing more (a folder of
/// files, a large initial load in parts), each batch committed with its own checkpoint; a
/// progress bar on a terminal.
pub fn pass_resource(
    setup: &Setup,
    adapter: &mut dyn Adapter,
    policy: &idsync_engine::Policy,
) -> anyhow::Result<Option<BatchReport>> {
    let mut bar = TerminalBar::new(&policy.resource);
    crate::runner::pass(
        setup,
        adapter,
        policy,
        &crate::runner::Stop::new(),
        &mut bar,
    )
}

/// One progress bar per pass across its parts (the adapter's total when it knows it), on
/// a terminal only.
pub(crate) struct TerminalBar {
    resource: String,
    bar: Option<indicatif::ProgressBar>,
    /// Events of the parts started so far.
    seen: u64,
}

impl TerminalBar {
    /// No bar yet: it appears with the first part of a long pass.
    pub(crate) fn new(resource: &str) -> TerminalBar {
        TerminalBar {
            resource: resource.to_owned(),
            bar: None,
            seen: 0,
        }
    }
}

impl crate::runner::Progress for TerminalBar {
    fn part_started(&mut self, events: usize, planned: Option<u64>) {
        self.seen += events as u64;
        let total = planned.unwrap_or(self.seen).max(self.seen);
        match &self.bar {
            Some(b) => b.set_length(total),
            None => self.bar = progress_bar(&self.resource, total),
        }
    }

    fn event_done(&mut self, _decision: &idsync_core::Decision) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    fn part_committed(&mut self, _report: &BatchReport) {}
}

impl Drop for TerminalBar {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Passes at least this large show a progress bar (when stderr is a terminal).
const PROGRESS_MIN_EVENTS: u64 = 500;

/// A progress bar on stderr for a long pass, only when stderr is a terminal.
fn progress_bar(resource: &str, events: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if events < PROGRESS_MIN_EVENTS || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(events),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} events, {per_sec}, {eta} left",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(resource.to_owned());
    Some(bar)
}

/// The summary line of a pass over several resources (one resource's line says it all).
fn summary(resources: usize, total: &BatchReport) {
    if resources > 1 {
        line(format_args!("summary: {}", crate::explain::describe(total)));
    }
}

/// `idsync identities ...`.
pub fn identities(loaded: Loaded, cmd: &IdentitiesCommand) -> anyhow::Result<ExitCode> {
    let repo = open_repo(&loaded)?;
    let mut out = crate::printable::stdout();
    match cmd {
        IdentitiesCommand::List { json } => {
            let mut n = 0;
            repo.for_each_identity(&mut |id: Identity| {
                n += 1;
                let state = if id.disabled { "disabled" } else { "enabled" };
                // A closed stdout (e.g. `| head`) must not become an error here.
                if *json {
                    let accounts: Vec<serde_json::Value> = id
                        .accounts
                        .iter()
                        .map(|a| serde_json::json!({"resource": a.resource, "key": a.key}))
                        .collect();
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::json!({"name": id.name, "state": state, "accounts": accounts})
                    );
                    return Ok(());
                }
                let accounts: Vec<String> = id
                    .accounts
                    .iter()
                    .map(|a| format!("{}:{}", a.resource, inline(&a.key)))
                    .collect();
                let _ = writeln!(out, "{}\t{state}\t{}", inline(&id.name), accounts.join(","));
                Ok(())
            })?;
            eprintln!("{n} identities");
        }
        IdentitiesCommand::Show { names } => {
            let mut code = ExitCode::SUCCESS;
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                if !show_identity(&repo, name, &mut out)? {
                    eprintln!("no identity named '{}'", inline(name));
                    code = ExitCode::from(Exit::Failed);
                }
            }
            return Ok(code);
        }
        IdentitiesCommand::Export => {
            let pending = crate::outbox::pending_counts(&repo)?;
            repo.for_each_identity(&mut |id: Identity| {
                let line = crate::outbox::export_line(&id, &pending).map_err(|e| {
                    idsync_repo::RepoError::Encode {
                        what: format!("identity {}", id.name),
                        message: e.to_string(),
                    }
                })?;
                let _ = writeln!(out, "{line}");
                Ok(())
            })?;
        }
        IdentitiesCommand::Erase { names, reference } => {
            return crate::erase::erase(&repo, names, reference.as_deref());
        }
        IdentitiesCommand::Erasures { json } => {
            return crate::erase::list(&repo, *json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `identities show NAME`: one identity's attributes, accounts, failed events and pending
/// notifications; false when there is no such identity.
fn show_identity(
    repo: &idsync_repo::Repo,
    name: &str,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let Some(id) = repo.identity(name)? else {
        return Ok(false);
    };
    writeln!(out, "name: {}", inline(&id.name))?;
    writeln!(out, "version: {}", id.version)?;
    writeln!(
        out,
        "state: {}",
        if id.disabled { "disabled" } else { "enabled" }
    )?;
    writeln!(out, "attributes:")?;
    // Which account gave each attribute `authority:` governs.
    let sources = repo.attribute_sources(name)?;
    for a in id.attrs.iter() {
        let values: Vec<String> = a
            .values
            .iter()
            .map(|v| inline(&v.to_string()).into_owned())
            .collect();
        let given = sources
            .iter()
            .find(|s| s.attr == a.name.to_lowercase())
            .map(|s| format!("  (from {}:{})", s.resource, inline(&s.key)))
            .unwrap_or_default();
        writeln!(out, "  {}: {}{given}", a.name, values.join(" | "))?;
    }
    writeln!(out, "accounts:")?;
    if id.accounts.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for acc in &id.accounts {
        writeln!(out, "  {}:{}", acc.resource, inline(&acc.key))?;
    }
    let failures: Vec<_> = repo
        .failures(None)?
        .into_iter()
        .filter(|f| {
            f.key.as_ref().is_some_and(|k| {
                id.accounts
                    .iter()
                    .any(|a| &a.key == k && a.resource == f.resource)
            })
        })
        .collect();
    if !failures.is_empty() {
        writeln!(out, "failed events of its accounts:")?;
        for f in failures {
            writeln!(out, "  #{} {}: {}", f.id, f.at, inline(&f.error))?;
        }
    }
    crate::outbox::show_pending(repo, &id.name, out)?;
    Ok(true)
}

/// `idsync results`.
pub fn results(loaded: Loaded, args: &ResultsArgs) -> anyhow::Result<ExitCode> {
    if let Some(ResultsCommand::Purge { before }) = &args.command {
        return purge_results(&loaded, before);
    }
    let situation = match &args.situation {
        Some(s) => match Situation::parse(s) {
            Some(s) => Some(s),
            None => {
                let all: Vec<&str> = Situation::ALL.iter().map(|s| s.as_str()).collect();
                eprintln!("unknown situation '{s}'; one of: {}", all.join(", "));
                return Ok(ExitCode::from(Exit::Config));
            }
        },
        None => None,
    };
    let repo = open_repo(&loaded)?;
    let key = args
        .key
        .as_deref()
        .map(|k| crate::accounts::resolve_key(&loaded, &repo, args.resource.as_deref(), k))
        .transpose()?;
    let records = repo.decisions(&DecisionFilter {
        resource: args.resource.clone(),
        key,
        situation,
        failed_only: args.failed,
        identity: args.identity.clone(),
        limit: args.limit,
    })?;
    if let Some(file) = &args.record {
        return crate::authoring::record(&loaded, &records, file);
    }
    let mut out = crate::printable::stdout();
    if !args.json && !records.is_empty() {
        results_header(&mut out)?;
    }
    for r in &records {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
            continue;
        }
        writeln!(
            out,
            "#{} {} {}",
            r.id,
            r.at,
            crate::explain::one_line(&r.decision)
        )?;
    }
    eprintln!("{} record(s)", records.len());
    Ok(ExitCode::SUCCESS)
}

/// `idsync results purge --before WHEN`: removes the older decision records but those
/// `idsync_repo::KEEP` holds, and says what went and what stayed.
fn purge_results(loaded: &Loaded, before: &str) -> anyhow::Result<ExitCode> {
    let cutoff = match crate::when::parse_cutoff(before) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --before: {e}");
            return Ok(ExitCode::from(Exit::Config));
        }
    };
    let repo = open_repo(loaded)?;
    let report = repo.purge_decisions_before(cutoff, &|| false)?;
    line(format_args!(
        "removed {} decision record(s) recorded before {}{}",
        report.removed,
        humantime::format_rfc3339_seconds(cutoff),
        crate::retention::describe_kept(&report)
    ));
    Ok(ExitCode::SUCCESS)
}

/// The header line of `results`: what each field of a record line is.
fn results_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "#record time resource key op situation action [identity= candidates= changed= operator= work_item= lifecycle= timer= notify= error=]"
    )
}

/// `idsync preview`.
pub fn preview(loaded: Loaded, args: &crate::cli::PreviewArgs) -> anyhow::Result<ExitCode> {
    if let Some(within) = &args.timers {
        return crate::timers::preview(&loaded, args, within);
    }
    // A preview writes nothing: without a repository yet, it decides against an empty one
    // in memory instead of creating the file.
    let made = if loaded.repository_exists() {
        setup(loaded)
    } else {
        Setup::in_memory(loaded).map_err(|e| setup_failed(&e))
    };
    match made {
        Ok(s) => crate::authoring::preview(&s, args),
        Err(code) => Ok(code),
    }
}

/// `idsync failed ...`.
pub fn failed(loaded: Loaded, cmd: &FailedCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FailedCommand::List {
            resource,
            key,
            json,
        } => {
            let repo = open_repo(&loaded)?;
            let key = key
                .as_deref()
                .map(|k| crate::accounts::resolve_key(&loaded, &repo, resource.as_deref(), k))
                .transpose()?;
            let mut list = repo.failures(resource.as_deref())?;
            if let Some(k) = &key {
                list.retain(|f| f.key.as_ref() == Some(k));
            }
            let mut out = crate::printable::stdout();
            for f in &list {
                if *json {
                    writeln!(out, "{}", serde_json::to_string(f)?)?;
                } else {
                    writeln!(
                        out,
                        "#{} {} {} {} attempts={} {}{}",
                        f.id,
                        f.at,
                        f.resource,
                        inline(f.key.as_deref().unwrap_or("-")),
                        f.attempts,
                        inline(&f.error),
                        if f.event.is_none() {
                            " (input unreadable: fix the source)"
                        } else {
                            ""
                        }
                    )?;
                }
            }
            eprintln!("{} failed event(s)", list.len());
            Ok(ExitCode::SUCCESS)
        }
        FailedCommand::Discard {
            ids,
            resource,
            key,
            reason,
        } => {
            let repo = open_repo(&loaded)?;
            let ids: Vec<i64> = match resource {
                None => ids.clone(),
                Some(r) => {
                    let key = key
                        .as_deref()
                        .map(|k| crate::accounts::resolve_key(&loaded, &repo, Some(r), k))
                        .transpose()?;
                    repo.failures(Some(r))?
                        .into_iter()
                        .filter(|f| key.is_none() || f.key == key)
                        .map(|f| f.id)
                        .collect()
                }
            };
            if ids.is_empty() {
                eprintln!("no failed event to discard");
                return Ok(ExitCode::from(Exit::Failed));
            }
            let done = repo.discard_failures(&ids, reason)?;
            for id in &done {
                tracing::warn!("failed event #{id} discarded: {reason}");
            }
            line(format_args!("{} failed event(s) discarded", done.len()));
            if done.len() < ids.len() {
                eprintln!("{} id(s) were not failed events", ids.len() - done.len());
                return Ok(ExitCode::from(Exit::Failed));
            }
            Ok(ExitCode::SUCCESS)
        }
        FailedCommand::Discarded { json } => {
            let repo = open_repo(&loaded)?;
            let mut out = crate::printable::stdout();
            let list = repo.discarded_failures()?;
            for d in &list {
                if *json {
                    writeln!(out, "{}", serde_json::to_string(d)?)?;
                    continue;
                }
                writeln!(
                    out,
                    "#{} {} {} discarded {}: {} (was: {})",
                    d.id,
                    d.resource,
                    inline(d.key.as_deref().unwrap_or("-")),
                    d.discarded_at,
                    inline(&d.reason),
                    inline(&d.error)
                )?;
            }
            eprintln!("{} discarded failed event(s)", list.len());
            Ok(ExitCode::SUCCESS)
        }
        FailedCommand::Retry { ids, all, resource } => {
            let setup = match setup(loaded) {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let repo = setup.engine.repo().clone();
            let targets = if *all {
                repo.failures(resource.as_deref())?
            } else if ids.is_empty() {
                eprintln!("give failed-event ids, or --all");
                return Ok(ExitCode::from(Exit::Config));
            } else {
                let mut v = Vec::new();
                for id in ids {
                    match repo.failure(*id)? {
                        Some(f) => v.push(f),
                        None => {
                            eprintln!("no failed event #{id}");
                            return Ok(ExitCode::from(Exit::Failed));
                        }
                    }
                }
                v
            };
            let (mut ok, mut still) = (0, 0);
            for f in &targets {
                let Some(policy) = setup.policy(&f.resource) else {
                    eprintln!("#{}: resource {} is no longer configured", f.id, f.resource);
                    still += 1;
                    continue;
                };
                match setup.engine.retry(policy, f) {
                    Ok(d) if d.error.is_none() => {
                        ok += 1;
                        crate::printable::line(format_args!(
                            "#{} {} {}: {} {}",
                            f.id,
                            f.resource,
                            d.key,
                            d.situation.map(|s| s.as_str()).unwrap_or("-"),
                            d.action
                        ));
                    }
                    Ok(d) => {
                        still += 1;
                        crate::printable::line(format_args!(
                            "#{} {} {}: still failing: {}",
                            f.id,
                            f.resource,
                            d.key,
                            d.error.unwrap_or_default()
                        ));
                    }
                    Err(e) => {
                        still += 1;
                        crate::printable::line(format_args!("#{}: {e}", f.id));
                    }
                }
            }
            crate::printable::line(format_args!(
                "retried {}: {ok} succeeded, {still} still failing",
                targets.len()
            ));
            Ok(if still > 0 {
                ExitCode::from(Exit::Failed)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
