//! The commands: each returns the process exit status.
//!
//! Exit status: 0 success; 1 some event or retry failed, or a thing asked for does not
//! exist; 2 the config or a rule is broken; 3 a resource could not be synchronized
//! (unreachable file, halted batch, repository error).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use idsync_core::{Action, Adapter, Fetch, Identity, Situation};
use idsync_engine::BatchReport;
use idsync_repo::DecisionFilter;
use idsync_rules::RuleEngine;

use crate::cli::{FailedCommand, IdentitiesCommand, ResultsArgs, RunArgs};
use crate::config::{Loaded, Problems};
use crate::setup::{Setup, compile_all, open_repo};

/// Exit status: an event or retry failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: the config or a rule is broken.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status: a resource could not be synchronized.
pub const EXIT_RESOURCE: u8 = 3;

/// Loads the config, reporting problems on stderr.
pub fn load(file: &std::path::Path) -> Result<Loaded, ExitCode> {
    Loaded::read(file).map_err(|p| report_problems(&p))
}

fn report_problems(p: &Problems) -> ExitCode {
    eprintln!("{p}");
    eprintln!("{} problem(s) found", p.0.len());
    ExitCode::from(EXIT_CONFIG)
}

fn setup(loaded: Loaded) -> Result<Setup, ExitCode> {
    Setup::new(loaded).map_err(|e| match e.downcast_ref::<Problems>() {
        Some(p) => report_problems(p),
        None => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RESOURCE)
        }
    })
}

/// `idsync check`.
pub fn check(loaded: Loaded) -> ExitCode {
    let rules = RuleEngine::new(&loaded.config.limits.to_limits());
    match compile_all(&loaded, &rules) {
        Ok(policies) => {
            println!(
                "{}: ok ({} resource(s), rules in {})",
                loaded.file.display(),
                policies.len(),
                loaded.rules_dir().display()
            );
            ExitCode::SUCCESS
        }
        Err(p) => report_problems(&p),
    }
}

/// `idsync run`.
pub fn run(loaded: Loaded, args: &RunArgs) -> ExitCode {
    let mut setup = match setup(loaded) {
        Ok(s) => s,
        Err(code) => return code,
    };
    for r in &args.resources {
        if setup.policy(r).is_none() {
            eprintln!(
                "error: no resource named '{r}' in {}",
                setup.loaded.file.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    for r in &args.accept_deletes {
        if setup.policy(r).is_none() {
            eprintln!(
                "error: --accept-deletes: no resource named '{r}' in {}",
                setup.loaded.file.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let _lock = match crate::lock::AgentLock::acquire(&setup.loaded.repository_path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_RESOURCE);
        }
    };
    if let Err(e) = crate::inflight::install(&mut setup) {
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_RESOURCE);
    }
    if !args.once {
        return crate::service::serve(setup, args);
    }
    let mut adapters = adapters(&setup, &args.accept_deletes);
    let mut code = pass(&setup, &args.resources, &mut adapters);
    if let Some(d) = &setup.dispatcher
        && let Err(e) = crate::outbox::dispatch_round(d)
    {
        eprintln!("error: outbox: {e}");
        code = ExitCode::from(EXIT_RESOURCE);
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
/// and a summary line. The long-running agent uses [`pass_resource`] from its own loop.
pub fn pass(setup: &Setup, only: &[String], adapters: &mut [Box<dyn Adapter>]) -> ExitCode {
    let mut total = BatchReport::default();
    let mut resource_errors = 0;
    for (i, r) in setup.loaded.config.resources.iter().enumerate() {
        if !only.is_empty() && !only.contains(&r.name) {
            continue;
        }
        let Some(policy) = setup.policy(&r.name) else {
            continue;
        };
        match pass_resource(setup, adapters[i].as_mut(), policy) {
            Ok(Some(report)) => {
                println!("{}: {}", r.name, describe(&report));
                total.merge(&report);
            }
            Ok(None) => println!("{}: no changes", r.name),
            Err(e) => {
                eprintln!("error: {e:#}");
                println!("{}: not synchronized (see error above)", r.name);
                resource_errors += 1;
            }
        }
    }
    println!("summary: {}", describe(&total));
    if resource_errors > 0 {
        ExitCode::from(EXIT_RESOURCE)
    } else if total.failed > 0 || total.rejected > 0 {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One resource: fetch and apply batches until the adapter has nothing more (a folder of
/// files, a large initial load in parts), each batch committed with its own checkpoint.
pub fn pass_resource(
    setup: &Setup,
    adapter: &mut dyn Adapter,
    policy: &idsync_engine::Policy,
) -> anyhow::Result<Option<BatchReport>> {
    let _span = tracing::info_span!("pass", resource = %policy.resource).entered();
    let repo = setup.engine.repo();
    let mut total: Option<BatchReport> = None;
    loop {
        let expected = repo.checkpoint(&policy.resource)?;
        match adapter.next_batch(expected.as_ref(), repo.as_ref())? {
            Fetch::Idle => return Ok(total),
            Fetch::Batch(batch) => {
                let bar = progress_bar(&policy.resource, batch.events.len());
                let report = setup
                    .engine
                    .apply_batch_with(policy, expected.as_ref(), &batch, &mut |_| {
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                    })
                    .with_context(|| format!("resource {}", policy.resource));
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                let report = report?;
                total
                    .get_or_insert_with(BatchReport::default)
                    .merge(&report);
                if !adapter.has_more() {
                    return Ok(total);
                }
            }
        }
    }
}

/// Batches at least this large show a progress bar (when stderr is a terminal).
const PROGRESS_MIN_EVENTS: usize = 500;

/// A progress bar on stderr for a long batch, only when stderr is a terminal.
fn progress_bar(resource: &str, events: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if events < PROGRESS_MIN_EVENTS || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(events as u64),
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

/// `3 events: unmatched 2, linked 1; created 2, updated 1; failed 0, rejected 0`.
pub fn describe(r: &BatchReport) -> String {
    let situations: Vec<String> = Situation::ALL
        .iter()
        .filter_map(|s| r.situations.get(s).map(|n| format!("{s} {n}")))
        .collect();
    let actions: Vec<String> = r
        .actions
        .iter()
        .filter(|(a, _)| **a != Action::Failed)
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    let mut out = format!("{} events", r.events());
    if !situations.is_empty() {
        out.push_str(": ");
        out.push_str(&situations.join(", "));
    }
    if !actions.is_empty() {
        out.push_str("; ");
        out.push_str(&actions.join(", "));
    }
    out.push_str(&format!("; failed {}, rejected {}", r.failed, r.rejected));
    out
}

/// `idsync identities ...`.
pub fn identities(loaded: Loaded, cmd: &IdentitiesCommand) -> anyhow::Result<ExitCode> {
    let repo = open_repo(&loaded)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        IdentitiesCommand::List => {
            let mut n = 0;
            repo.for_each_identity(&mut |id: Identity| {
                n += 1;
                let accounts: Vec<String> = id
                    .accounts
                    .iter()
                    .map(|a| format!("{}:{}", a.resource, a.key))
                    .collect();
                let state = if id.disabled { "disabled" } else { "enabled" };
                // A closed stdout (e.g. `| head`) must not become an error here.
                let _ = writeln!(out, "{}\t{state}\t{}", id.name, accounts.join(","));
                Ok(())
            })?;
            eprintln!("{n} identities");
        }
        IdentitiesCommand::Show { name } => {
            let Some(id) = repo.identity(name)? else {
                eprintln!("no identity named '{name}'");
                return Ok(ExitCode::from(EXIT_FAILED));
            };
            writeln!(out, "name: {}", id.name)?;
            writeln!(out, "version: {}", id.version)?;
            writeln!(
                out,
                "state: {}",
                if id.disabled { "disabled" } else { "enabled" }
            )?;
            writeln!(out, "attributes:")?;
            for a in id.attrs.iter() {
                let values: Vec<String> = a.values.iter().map(|v| v.to_string()).collect();
                writeln!(out, "  {}: {}", a.name, values.join(" | "))?;
            }
            writeln!(out, "accounts:")?;
            if id.accounts.is_empty() {
                writeln!(out, "  (none)")?;
            }
            for acc in &id.accounts {
                writeln!(out, "  {}:{}", acc.resource, acc.key)?;
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
                    writeln!(out, "  #{} {}: {}", f.id, f.at, f.error)?;
                }
            }
            crate::outbox::show_pending(&repo, &id.name, &mut out)?;
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
    }
    Ok(ExitCode::SUCCESS)
}

/// `idsync results`.
pub fn results(loaded: Loaded, args: &ResultsArgs) -> anyhow::Result<ExitCode> {
    let situation = match &args.situation {
        Some(s) => match Situation::parse(s) {
            Some(s) => Some(s),
            None => {
                let all: Vec<&str> = Situation::ALL.iter().map(|s| s.as_str()).collect();
                eprintln!("unknown situation '{s}'; one of: {}", all.join(", "));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
        None => None,
    };
    let repo = open_repo(&loaded)?;
    let records = repo.decisions(&DecisionFilter {
        resource: args.resource.clone(),
        key: args.key.clone(),
        situation,
        failed_only: args.failed,
        identity: args.identity.clone(),
        limit: args.limit,
    })?;
    if let Some(file) = &args.record {
        return crate::authoring::record(&loaded, &records, file);
    }
    let mut out = std::io::stdout().lock();
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

/// `idsync preview`.
pub fn preview(loaded: Loaded, args: &crate::cli::PreviewArgs) -> anyhow::Result<ExitCode> {
    match setup(loaded) {
        Ok(s) => crate::authoring::preview(&s, args),
        Err(code) => Ok(code),
    }
}

/// `idsync failed ...`.
pub fn failed(loaded: Loaded, cmd: &FailedCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FailedCommand::List { resource, json } => {
            let repo = open_repo(&loaded)?;
            let list = repo.failures(resource.as_deref())?;
            let mut out = std::io::stdout().lock();
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
                        f.key.as_deref().unwrap_or("-"),
                        f.attempts,
                        f.error,
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
                return Ok(ExitCode::from(EXIT_CONFIG));
            } else {
                let mut v = Vec::new();
                for id in ids {
                    match repo.failure(*id)? {
                        Some(f) => v.push(f),
                        None => {
                            eprintln!("no failed event #{id}");
                            return Ok(ExitCode::from(EXIT_FAILED));
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
                        println!(
                            "#{} {} {}: {} {}",
                            f.id,
                            f.resource,
                            d.key,
                            d.situation.map(|s| s.as_str()).unwrap_or("-"),
                            d.action
                        );
                    }
                    Ok(d) => {
                        still += 1;
                        println!(
                            "#{} {} {}: still failing: {}",
                            f.id,
                            f.resource,
                            d.key,
                            d.error.unwrap_or_default()
                        );
                    }
                    Err(e) => {
                        still += 1;
                        println!("#{}: {e}", f.id);
                    }
                }
            }
            println!(
                "retried {}: {ok} succeeded, {still} still failing",
                targets.len()
            );
            Ok(if still > 0 {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
