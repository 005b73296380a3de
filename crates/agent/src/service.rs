//! `idsync run` as a service: every resource on its own schedule, the outbox dispatcher
//! beside them, failed events retried with backoff, rules and config reloaded on SIGHUP or
//! when a file changes, a clean stop on SIGTERM/SIGINT, and the status endpoint.
//!
//! One thread does the work, in turns: pass the resources that are due (each keeps its
//! adapter, so an LDAP persist stream stays open), one dispatch round, the due retries, then
//! wait for a file change or the next due time, in short slices so a signal is seen within
//! a fraction of a second. A stop request lets the batch in hand commit (batches are atomic
//! anyway: a SIGKILL loses at most the uncommitted batch, which the next start reads again).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use idsync_core::Adapter;

use crate::cli::RunArgs;
use crate::commands::{adapters, describe, pass_resource};
use crate::config::Loaded;
use crate::observe::{Observer, serve as serve_http};
use crate::setup::Setup;
use crate::status::{ResourceStatus, StatusFile};

/// The longest the loop sleeps before looking at its signals again.
const SLICE: Duration = Duration::from_millis(200);

struct Signals {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
}

fn signals() -> anyhow::Result<Signals> {
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    Ok(Signals { stop, reload })
}

/// What decides a reload: the config file and the rule files, by size and mtime.
fn fingerprint(loaded: &Loaded) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut note = |p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            out.push((p.to_path_buf(), m.len(), m.modified().ok()));
        }
    };
    note(&loaded.file);
    if let Ok(entries) = std::fs::read_dir(loaded.rules_dir()) {
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
            .collect();
        files.sort();
        for f in files {
            note(&f);
        }
    }
    out
}

struct Worker {
    setup: Setup,
    adapters: Vec<Box<dyn Adapter>>,
    due: Vec<Instant>,
    halted: Vec<Option<String>>,
    watcher: Option<idsync_flatfile::Watcher>,
}

impl Worker {
    fn new(setup: Setup, args: &RunArgs) -> Worker {
        let adapters = adapters(&setup, &args.accept_deletes);
        let n = adapters.len();
        let interval = Duration::from_secs(setup.loaded.config.poll_interval_secs);
        let mut dirs = crate::watching::watched_dirs(&setup, &args.resources);
        for d in [setup.loaded.rules_dir(), setup.loaded.base.clone()] {
            let d = if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            };
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        let watcher = Some(idsync_flatfile::Watcher::new(
            dirs,
            interval.min(Duration::from_secs(1)),
        ));
        Worker {
            setup,
            adapters,
            due: vec![Instant::now(); n],
            halted: vec![None; n],
            watcher,
        }
    }
}

/// Runs until SIGTERM or SIGINT; exit status 0 after a clean stop.
pub fn serve(setup: Setup, args: &RunArgs) -> ExitCode {
    let sig = match signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(crate::commands::EXIT_RESOURCE);
        }
    };
    let names: Vec<String> = setup
        .loaded
        .config
        .resources
        .iter()
        .map(|r| r.name.clone())
        .filter(|n| args.resources.is_empty() || args.resources.contains(n))
        .collect();
    let observer = Arc::new(Observer::new(&names));
    let listen = setup.loaded.config.status.listen.clone();
    if listen != "off" {
        match listen.parse() {
            Ok(addr) => {
                if let Err(e) = serve_http(addr, observer.clone()) {
                    tracing::warn!("{e:#}; running without the status endpoint");
                }
            }
            Err(e) => tracing::warn!("status.listen {listen}: {e}"),
        }
    }
    let status_file = StatusFile::for_repository(&setup.loaded.repository_path());
    let config_file = setup.loaded.file.clone();
    let mut seen = fingerprint(&setup.loaded);
    let mut w = Worker::new(setup, args);
    tracing::info!("agent started ({} resource(s))", names.len());
    let mut statuses: Vec<ResourceStatus> = names.iter().map(|n| ResourceStatus::new(n)).collect();
    while !sig.stop.load(Ordering::SeqCst) {
        // Reload on SIGHUP or a changed config or rule file, after validation.
        let now_seen = fingerprint(&w.setup.loaded);
        if sig.reload.swap(false, Ordering::SeqCst) || now_seen != seen {
            seen = now_seen;
            match Loaded::read(&config_file)
                .map_err(anyhow::Error::from)
                .and_then(Setup::new)
                .and_then(|mut new| crate::inflight::install(&mut new).map(|()| new))
            {
                Ok(new) => {
                    tracing::warn!("reloaded {} and the rules", config_file.display());
                    w = Worker::new(new, args);
                }
                Err(e) => tracing::error!("reload refused, keeping the running rules: {e:#}"),
            }
        }
        for (i, r) in w.setup.loaded.config.resources.clone().iter().enumerate() {
            if sig.stop.load(Ordering::SeqCst) {
                break;
            }
            if !names.contains(&r.name) || w.due[i] > Instant::now() || w.halted[i].is_some() {
                continue;
            }
            let Some(policy) = w.setup.policy(&r.name).cloned() else {
                continue;
            };
            let started = Instant::now();
            let st = statuses.iter_mut().find(|s| s.resource == r.name);
            match pass_resource(&w.setup, w.adapters[i].as_mut(), &policy) {
                Ok(report) => {
                    if let Some(rep) = &report {
                        println!("{}: {}", r.name, describe(rep));
                    }
                    observer.pass_done(&r.name, report.as_ref(), started.elapsed());
                    if let Some(st) = st {
                        st.pass_ok(report.as_ref());
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    tracing::error!(resource = %r.name, "{msg}");
                    observer.pass_failed(&r.name, &msg);
                    if let Some(st) = st {
                        st.pass_failed(&msg);
                    }
                    if msg.contains("(on_error: halt)") {
                        tracing::error!(resource = %r.name, "resource halted until the config or rules change");
                        w.halted[i] = Some(msg);
                    }
                }
            }
            w.due[i] = Instant::now() + w.setup.interval(i);
            retry_due(&w.setup, &policy, &r.name);
        }
        if let Some(d) = &w.setup.dispatcher
            && let Err(e) = crate::outbox::dispatch_round(d)
        {
            tracing::warn!("outbox: {e}");
        }
        if let Ok((pending, _, dead)) = w.setup.engine.repo().outbox_counts() {
            observer.outbox(pending as i64, dead as i64);
        }
        status_file.write(&statuses);
        // Wait for a file change, the next due resource, or a signal.
        let next = w.due.iter().min().copied().unwrap_or_else(Instant::now);
        while !sig.stop.load(Ordering::SeqCst) && !sig.reload.load(Ordering::SeqCst) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let woke = match w.watcher.as_mut() {
                Some(watch) => watch.wait(left.min(SLICE)),
                None => {
                    std::thread::sleep(left.min(SLICE));
                    false
                }
            };
            if woke {
                // A watched file changed: resources not on a cron schedule and a reload
                // check are due.
                for (i, d) in w.due.iter_mut().enumerate() {
                    if w.setup.loaded.config.resources[i].cron.is_none() {
                        *d = Instant::now();
                    }
                }
                break;
            }
        }
    }
    tracing::info!("stopping: the last batch was committed");
    status_file.write_stopped(&statuses);
    ExitCode::SUCCESS
}

/// Re-runs the failed events of `resource` whose backoff has passed.
fn retry_due(setup: &Setup, policy: &idsync_engine::Policy, resource: &str) {
    let cfg = &setup.loaded.config.failed_retry;
    if cfg.max_attempts <= 0 {
        return;
    }
    let repo = setup.engine.repo();
    let Ok(failures) = repo.failures(Some(resource)) else {
        return;
    };
    let now = SystemTime::now();
    for f in failures {
        if f.event.is_none() || f.attempts >= cfg.max_attempts {
            continue;
        }
        let since = f.last_attempt_at.as_deref().unwrap_or(&f.at);
        let Ok(last) = humantime::parse_rfc3339_weak(since) else {
            continue;
        };
        let wait = Duration::from_secs(cfg.backoff_secs.saturating_mul(1 << f.attempts.min(20)));
        if now.duration_since(last).unwrap_or_default() < wait {
            continue;
        }
        match setup.engine.retry(policy, &f) {
            Ok(d) if d.error.is_none() => {
                tracing::info!(resource, key = %d.key, "failed event #{} re-run: {}", f.id, d.action)
            }
            Ok(d) => tracing::warn!(
                resource,
                key = %d.key,
                "failed event #{} still failing (attempt {}): {}",
                f.id,
                f.attempts + 1,
                d.error.unwrap_or_default()
            ),
            Err(e) => tracing::warn!(resource, "failed event #{}: {e}", f.id),
        }
    }
}
