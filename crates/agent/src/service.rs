//! `idsync run` as a service: a loop per resource on a thread of its own, the outbox
//! dispatcher on a thread and a clock of its own, reload, signals and the status endpoint.
//!
//! - **Resource loops** (`resource_loop`): each builds its own rule engine and adapter over
//!   the shared repository, runs passes through [`crate::runner::pass`], and between passes
//!   waits only for what its adapter declares ([`Wakeup`]): a flat file's own feed, folder or
//!   marker file; an LDAP persist stream (the fetch itself waits on the server); otherwise
//!   the poll interval or cron. Never the repository, its log or the status file. At the
//!   times of its `reconcile: { cron }` a loop runs a reconcile instead of a pass. A failing
//!   source backs off on its own loop; a slow resource never holds the others. Fetches of
//!   different resources overlap; commits serialize in the repository.
//! - **The dispatcher** (`dispatcher_loop`) sends mail when a loop committed something and
//!   at the earliest next attempt the outbox holds, so a retry schedule holds whatever the
//!   resources do, and a stalled mail server holds up nothing but mail.
//! - **The timer thread** (`crate::timers::timer_loop`) fires the lifecycle timers that
//!   are due (at start-up, those that came due while the agent was down), then sleeps until
//!   the next one is due, a loop committed a batch that planned one (it is poked like the
//!   dispatcher), or a minute; it never passes a resource.
//! - **The main thread** watches only the config file and the rule files (and SIGHUP) to
//!   reload, writes the status file, starts the retention job when it is due (module
//!   `retention`), and on SIGTERM/SIGINT stops every loop after the part in hand (committed
//!   with its checkpoint). A second signal exits at once: every part is atomic, so that is
//!   as safe as a crash.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use idsync_core::Wakeup;
use idsync_engine::BatchReport;
use idsync_repo::Repo;

use crate::cli::RunArgs;
use crate::config::Loaded;
use crate::exit::Exit;
use crate::explain::describe;
use crate::inflight::InFlight;
use crate::leases::Keeper;
use crate::observe::{Observer, serve as serve_http};
use crate::runner::{Failure, Progress, SLICE, Stop};
use crate::setup::Setup;
use crate::status::{ResourceStatus, StatusFile};

/// How long a stop waits for the dispatcher's round in hand (a mail server that does not
/// answer): its unrecorded messages are sent again after their lease.
const DISPATCHER_STOP_WAIT: Duration = Duration::from_secs(2);

/// The longest the dispatcher sleeps without looking at the outbox.
const DISPATCHER_MAX_SLEEP: Duration = Duration::from_secs(60);

/// An info line at most this often during a long pass.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// The per-resource status the loops update and the main thread writes to the status file.
#[derive(Default)]
struct Board {
    statuses: Mutex<Vec<ResourceStatus>>,
    dirty: AtomicBool,
}

impl Board {
    fn update(&self, name: &str, f: impl FnOnce(&mut ResourceStatus)) {
        if let Ok(mut all) = self.statuses.lock()
            && let Some(st) = all.iter_mut().find(|s| s.resource == name)
        {
            f(st);
            self.dirty.store(true, Ordering::SeqCst);
        }
    }

    fn snapshot(&self) -> Vec<ResourceStatus> {
        self.statuses.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// What every loop of one generation (one config) shares.
#[derive(Clone)]
struct Shared {
    loaded: Loaded,
    repo: Arc<Repo>,
    stop: Stop,
    observer: Arc<Observer>,
    board: Arc<Board>,
    /// Wakes the dispatcher after a commit (absent without notifications).
    poke: Option<Sender<()>>,
    /// Wakes the timer thread after a commit that planned or moved a timer.
    timers_poke: Option<Sender<()>>,
    /// The in-flight file every loop's engine notes its event in.
    guard: Arc<InFlight>,
    /// PostgreSQL: the leases of the resources this agent may run (module `leases`).
    keeper: Option<Arc<Keeper>>,
}

/// The loops of one config; a reload stops them and starts the next.
struct Generation {
    stop: Stop,
    loops: Vec<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
    /// The timer thread.
    timers: Option<JoinHandle<()>>,
    loaded: Loaded,
    /// The repository the loops share (the retention job works on it too).
    repo: Arc<Repo>,
}

impl Generation {
    fn start(
        mut setup: Setup,
        args: &RunArgs,
        names: &[String],
        observer: &Arc<Observer>,
        board: &Arc<Board>,
        guard: &Arc<InFlight>,
        keeper: Option<&Arc<Keeper>>,
    ) -> Generation {
        let stop = Stop::new();
        let repo = setup.engine.repo().clone();
        let (poke, poked) = channel();
        let dispatcher = setup.dispatcher.take().and_then(|d| {
            let (repo, stop, observer) = (repo.clone(), stop.clone(), observer.clone());
            spawn("idsync-outbox", move || {
                dispatcher_loop(&d, &repo, &poked, &stop, &observer)
            })
        });
        let poke = dispatcher.is_some().then_some(poke);
        let (timers_poke, timers_poked) = channel();
        let timers = {
            let (loaded, repo, stop) = (setup.loaded.clone(), repo.clone(), stop.clone());
            let (guard, observer) = (guard.clone(), observer.clone());
            let dispatcher = poke.clone();
            // Timers of every resource, unless the agent runs only some (`--resource`).
            let only = (!args.resources.is_empty()).then(|| names.to_vec());
            // Its own engine over the shared repository (a rule engine stays on the thread
            // that built it), under the process's crash guard (a firing that kills the
            // agent is traced to its timer).
            spawn("idsync-timers", move || {
                match Setup::with_repo(loaded, repo) {
                    Ok(mut setup) => {
                        crate::inflight::attach(&mut setup, &guard);
                        crate::timers::timer_loop(
                            &setup,
                            only.as_deref(),
                            &timers_poked,
                            &stop,
                            dispatcher.as_ref(),
                            &observer,
                        )
                    }
                    Err(e) => tracing::error!("timers: {e:#}"),
                }
            })
        };
        let shared = Shared {
            loaded: setup.loaded.clone(),
            repo: repo.clone(),
            stop: stop.clone(),
            observer: observer.clone(),
            board: board.clone(),
            poke,
            timers_poke: timers.is_some().then_some(timers_poke),
            guard: guard.clone(),
            keeper: keeper.cloned(),
        };
        let mut loops = Vec::new();
        for (index, r) in setup.loaded.config.resources.iter().enumerate() {
            if !names.contains(&r.name) {
                continue;
            }
            let shared = shared.clone();
            let accept = args.accept_deletes.contains(&r.name);
            if let Some(h) = spawn(&format!("idsync-{}", r.name), move || {
                resource_loop(shared, index, accept)
            }) {
                loops.push(h);
            }
        }
        Generation {
            stop,
            loops,
            dispatcher,
            timers,
            loaded: setup.loaded,
            repo,
        }
    }

    /// Stops every loop after the part in hand and waits for them (the dispatcher only
    /// briefly). No thread ends by a panic: a panic ends the process
    /// (`inflight::crash_on_panic`).
    fn stop(self) {
        self.stop.request();
        for h in self.loops.into_iter().chain(self.timers) {
            let _ = h.join();
        }
        if let Some(d) = self.dispatcher {
            let until = Instant::now() + DISPATCHER_STOP_WAIT;
            while !d.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if d.is_finished() {
                let _ = d.join();
            } else {
                tracing::warn!(
                    "the mail server has not answered the round in hand; its messages are sent again after their lease"
                );
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name(name.to_owned()).spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!("cannot start thread {name}: {e}");
            None
        }
    }
}

/// Runs until SIGTERM or SIGINT; exit status 0 after a clean stop. `guard` notes the event
/// in hand for every resource loop (poison-event protection, module `inflight`).
pub fn serve(setup: Setup, args: &RunArgs, guard: &Arc<InFlight>) -> ExitCode {
    let stop = Stop::new();
    let reload = Arc::new(AtomicBool::new(false));
    if let Err(e) = install_signals(&stop, &reload) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::from(Exit::Resource);
    }
    let names = setup.loaded.selected_resources(&args.resources);
    let observer = Arc::new(Observer::new(&names));
    let listen = setup.loaded.config.status.listen.clone();
    let mut endpoint = "off".to_owned();
    if listen != "off" {
        match listen.parse() {
            Ok(addr) => match serve_http(addr, observer.clone()) {
                Ok((bound, _)) => endpoint = format!("http://{bound}"),
                Err(e) => tracing::warn!("{e:#}; running without the status endpoint"),
            },
            Err(e) => tracing::warn!("status.listen {listen}: {e}"),
        }
    }
    let board = Arc::new(Board {
        statuses: Mutex::new(names.iter().map(|n| ResourceStatus::new(n)).collect()),
        dirty: AtomicBool::new(false),
    });
    let status_file = StatusFile::for_repository(&setup.loaded.repository_path());
    status_file.write(&board.snapshot());
    let config_file = setup.loaded.file.clone();
    tracing::info!(
        "agent started: config {}, repository {}, {} resource(s) ({}), status endpoint {endpoint}",
        config_file.display(),
        setup.loaded.repository_shown(),
        names.len(),
        names.join(", "),
    );
    let keeper = match start_keeper(&setup, &names) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(Exit::Resource);
        }
    };
    if let Some(k) = &keeper {
        observer.watch_leases(k.clone());
    }
    let keeper_stop = Stop::new();
    let keeper_thread = keeper.clone().and_then(|k| {
        let stop = keeper_stop.clone();
        spawn("idsync-leases", move || k.run(&stop))
    });
    let mut generation = Generation::start(
        setup,
        args,
        &names,
        &observer,
        &board,
        guard,
        keeper.as_ref(),
    );
    let mut reload_watch = reload_watcher(&generation.loaded);
    let mut retention = crate::retention::Job::new();
    let mut ages = crate::retention::Ages::of(&generation.loaded.config.retention);
    while !stop.requested() {
        let changed = reload_watch.wait(SLICE);
        if board.dirty.swap(false, Ordering::SeqCst) {
            status_file.write(&board.snapshot());
        }
        retention.tick(&generation.repo, &ages, &generation.stop);
        if !(changed || reload.swap(false, Ordering::SeqCst)) || stop.requested() {
            continue;
        }
        match Loaded::read(&config_file)
            .map_err(anyhow::Error::from)
            .and_then(Setup::new)
        {
            Ok(new) => {
                generation.stop();
                retention.restart();
                ages = crate::retention::Ages::of(&new.loaded.config.retention);
                generation =
                    Generation::start(new, args, &names, &observer, &board, guard, keeper.as_ref());
                tracing::warn!("reloaded {} and the rules", config_file.display());
                reload_watch = reload_watcher(&generation.loaded);
            }
            Err(e) => tracing::error!("reload refused, keeping the running rules: {e:#}"),
        }
    }
    generation.stop();
    retention.join();
    keeper_stop.request();
    if let Some(h) = keeper_thread {
        let _ = h.join();
    }
    if let Some(k) = &keeper {
        k.release_all();
    }
    tracing::info!("stopping: the last batch was committed");
    status_file.write_stopped(&board.snapshot());
    ExitCode::SUCCESS
}

/// With a PostgreSQL repository: the lease keeper of the resources this agent runs, on a
/// connection of its own (module `leases`); `None` for SQLite.
fn start_keeper(setup: &Setup, names: &[String]) -> anyhow::Result<Option<Arc<Keeper>>> {
    let cfg = &setup.loaded.config.repository;
    let Some(url) = &cfg.url else {
        return Ok(None);
    };
    let holder = crate::leases::holder_name(&setup.loaded);
    let ttl = Duration::from_secs(cfg.lease_secs);
    let options = crate::setup::postgres_options(&setup.loaded)?;
    let leases = idsync_repo::Leases::open(url, &options, &holder, ttl).map_err(|e| {
        anyhow::anyhow!(
            "repository {}: leases: {e}",
            setup.loaded.repository_shown()
        )
    })?;
    tracing::info!(
        "agent {holder}: resources run under leases of {} s",
        cfg.lease_secs
    );
    Ok(Some(Arc::new(Keeper::new(
        leases,
        setup.engine.repo().clone(),
        names.to_vec(),
        ttl,
    ))))
}

/// SIGTERM and SIGINT request the stop (a second one exits at once with
/// [`Exit::SecondSignal`]); SIGHUP requests a reload.
fn install_signals(stop: &Stop, reload: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGTERM, SIGINT] {
        // Registered first: it exits only when the flag was already set by the first signal.
        signal_hook::flag::register_conditional_shutdown(
            sig,
            i32::from(Exit::SecondSignal.code()),
            stop.flag(),
        )?;
        signal_hook::flag::register(sig, stop.flag())?;
    }
    signal_hook::flag::register(SIGHUP, reload.clone())?;
    Ok(())
}

/// A watcher over the config file and the rules folder's `*.rhai` files, and nothing else
/// (the repository often lives beside the config).
fn reload_watcher(loaded: &Loaded) -> idsync_flatfile::Watcher {
    let folder = |p: &Path| {
        let p = if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p.to_path_buf()
        };
        std::fs::canonicalize(&p).unwrap_or(p)
    };
    let config_dir = folder(loaded.file.parent().unwrap_or(Path::new(".")));
    let config_name = loaded.file.file_name().map(|n| n.to_owned());
    let rules_dir = folder(&loaded.rules_dir());
    let mut dirs = vec![config_dir.clone()];
    if rules_dir != config_dir {
        dirs.push(rules_dir.clone());
    }
    idsync_flatfile::Watcher::new(dirs, Duration::from_secs(1)).only(move |p: &Path| {
        let dir = folder(p.parent().unwrap_or(Path::new(".")));
        (dir == config_dir && p.file_name() == config_name.as_deref())
            || (dir == rules_dir && p.extension().is_some_and(|x| x == "rhai"))
    })
}

/// Per-part reporting of a resource loop: metrics and status advance with every committed
/// part, and a long pass logs its progress every ten seconds.
struct LoopProgress<'a> {
    name: &'a str,
    shared: &'a Shared,
    started: Instant,
    done: u64,
    /// Events of the parts started so far, and the pass's total (the adapter's, when known).
    started_events: u64,
    planned: u64,
    parts: u64,
    last_log: Instant,
}

impl Progress for LoopProgress<'_> {
    fn part_started(&mut self, events: usize, planned: Option<u64>) {
        self.started_events += events as u64;
        self.planned = planned
            .unwrap_or(self.started_events)
            .max(self.started_events);
        self.shared
            .observer
            .pass_progress(self.name, self.done, self.planned);
    }

    fn event_done(&mut self, _decision: &idsync_core::Decision) {}

    fn part_committed(&mut self, report: &BatchReport) {
        self.done += report.events();
        self.parts += 1;
        self.shared.observer.part_committed(self.name, report);
        self.shared
            .observer
            .pass_progress(self.name, self.done, self.planned);
        self.shared.board.update(self.name, |st| st.part_ok(report));
        if let Some(p) = &self.shared.poke {
            let _ = p.send(());
        }
        if report.timers > 0
            && let Some(p) = &self.shared.timers_poke
        {
            let _ = p.send(());
        }
        if self.last_log.elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.done as f64 / secs;
            let left = self.planned.saturating_sub(self.done) as f64 / rate.max(0.001);
            tracing::info!(
                resource = %self.name,
                "pass in progress: {}/{} events in {} part(s), {:.0}/s, about {} left",
                self.done,
                self.planned,
                self.parts,
                rate,
                humantime::format_duration(Duration::from_secs(left.ceil() as u64))
            );
        }
    }
}

/// One resource's loop (module doc).
fn resource_loop(shared: Shared, index: usize, accept_deletes: bool) {
    let name = shared.loaded.config.resources[index].name.clone();
    let mut setup = match Setup::with_repo(shared.loaded.clone(), shared.repo.clone()) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!(resource = %name, "{msg}");
            shared.observer.pass_failed(&name, &msg);
            shared.board.update(&name, |st| st.pass_failed(&msg));
            return;
        }
    };
    crate::inflight::attach(&mut setup, &shared.guard);
    let Some(policy) = setup.policy(&name).cloned() else {
        return;
    };
    let mut adapter = setup.adapter(index);
    if accept_deletes {
        adapter.accept_deletes();
    }
    let mut wakeup = adapter.wakeup();
    let stream = matches!(wakeup, Wakeup::Stream);
    let mut failures: Option<(Failure, u32)> = None;
    let mut resets_seen = 0;
    // The scheduled reconcile (`reconcile: { cron }`): its next time (a time missed while
    // the agent was down is not made up for), and whether one is due and not yet done (a
    // transient failure tries again after its backoff, any other waits for the next time).
    let reconcile_schedule = setup.reconcile_schedule(index);
    let next_time = || {
        reconcile_schedule
            .as_ref()
            .and_then(|s| s.wait())
            .map(|w| Instant::now() + w)
    };
    let mut next_reconcile = next_time();
    let mut reconcile_due = false;
    let mut standby = false;
    while !shared.stop.requested() {
        if let Some(keeper) = &shared.keeper
            && !keeper.holds(&name)
        {
            // A standby: another agent runs the resource; look again at the next round.
            if !standby {
                shared.board.update(&name, |st| st.standby());
                standby = true;
            }
            shared.stop.sleep_until(Instant::now() + keeper.round());
            continue;
        }
        standby = false;
        if next_reconcile.is_some_and(|t| Instant::now() >= t) {
            reconcile_due = true;
            next_reconcile = next_time();
        }
        let reconciling = reconcile_due;
        let started = Instant::now();
        let mut progress = LoopProgress {
            name: &name,
            shared: &shared,
            started,
            done: 0,
            started_events: 0,
            planned: 0,
            parts: 0,
            last_log: started,
        };
        let result = if reconciling {
            tracing::info!(resource = %name, "reconcile at its scheduled time: every account is decided again");
            crate::reconcile::run(
                &setup,
                adapter.as_mut(),
                &policy,
                None,
                crate::reconcile::StartedBy::Schedule,
                &shared.stop,
                &mut progress,
            )
            .map(|done| {
                crate::printable::line(format_args!(
                    "{}",
                    crate::reconcile::describe(&name, &done)
                ));
                if done.complete {
                    shared.observer.reconcile_done(&name);
                }
                done.report
            })
        } else {
            crate::runner::pass(
                &setup,
                adapter.as_mut(),
                &policy,
                &shared.stop,
                &mut progress,
            )
        };
        // Whether file changes may cut the wait short, and how long it is (`None`: fetch
        // again at once).
        // A resource on a cron schedule runs at its times only.
        let mut woken_by_changes = setup.loaded.config.resources[index].cron.is_none();
        let mut wait = (!stream).then(|| setup.interval(index));
        match result {
            Ok(report) => {
                failures = None;
                if reconciling {
                    reconcile_due = false;
                    shared.board.update(&name, |st| st.reconcile_ok());
                } else {
                    if let Some(r) = &report {
                        crate::printable::line(format_args!("{name}: {}", describe(r)));
                    }
                    // A quiet persist stream is the stream waiting, not a pass.
                    if report.is_some() || !stream {
                        shared.observer.pass_done(&name, started.elapsed());
                        shared.board.update(&name, |st| st.pass_ok(report.as_ref()));
                    } else {
                        shared.observer.healthy(&name);
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(resource = %name, "{msg}");
                shared.observer.pass_failed(&name, &msg);
                shared.board.update(&name, |st| st.pass_failed(&msg));
                let kind = Failure::of(&e);
                if kind == Failure::Fenced
                    && let Some(keeper) = &shared.keeper
                {
                    keeper.lost(&name);
                    continue;
                }
                if reconciling {
                    shared.observer.reconcile_failed(&name);
                    // Only a failure that may pass soon is tried again before the next time.
                    reconcile_due = matches!(kind, Failure::Transient | Failure::Storage);
                }
                let n = match failures {
                    Some((k, n)) if k == kind => n.saturating_add(1),
                    _ => 1,
                };
                failures = Some((kind, n));
                if kind == Failure::Halted {
                    tracing::error!(resource = %name, "resource halted until the config or rules change");
                    while !shared
                        .stop
                        .sleep_until(Instant::now() + Duration::from_secs(3600))
                    {
                    }
                    break;
                }
                let backoff = kind.backoff(n).unwrap_or_else(|| {
                    // A source that needs an operator: the schedule, at least 30 s (a
                    // persist stream has no interval and must not spin on it).
                    setup.interval(index).max(Duration::from_secs(30))
                });
                if kind == Failure::Storage {
                    woken_by_changes = false;
                    tracing::warn!(
                        resource = %name,
                        "the repository's storage failed; next attempt in {}",
                        humantime::format_duration(backoff)
                    );
                } else {
                    tracing::warn!(
                        resource = %name,
                        "next attempt in {}",
                        humantime::format_duration(backoff)
                    );
                }
                wait = Some(backoff);
            }
        }
        let resets = adapter.checkpoint_resets();
        if resets > resets_seen {
            shared
                .observer
                .checkpoint_resets(&name, resets - resets_seen);
            resets_seen = resets;
        }
        if retry_due(&setup, &policy, &name)
            && let Some(p) = &shared.timers_poke
        {
            let _ = p.send(());
        }
        let Some(wait) = wait else {
            continue;
        };
        // The next reconcile ends the wait too.
        let mut deadline = Instant::now() + wait;
        if let Some(t) = next_reconcile
            && !reconcile_due
        {
            deadline = deadline.min(t);
        }
        match &mut wakeup {
            Wakeup::Watch(w) if woken_by_changes => {
                while !shared.stop.requested() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || w.wait(left.min(SLICE)) {
                        break;
                    }
                }
            }
            _ => {
                shared.stop.sleep_until(deadline);
            }
        }
    }
}

/// The dispatcher's loop (module doc): a round, then sleep until the next message is due,
/// a loop committed something, or the stop.
fn dispatcher_loop(
    d: &idsync_notify::Dispatcher,
    repo: &Repo,
    poked: &Receiver<()>,
    stop: &Stop,
    observer: &Observer,
) {
    while !stop.requested() {
        if let Err(e) = crate::outbox::dispatch_round(d) {
            tracing::warn!("outbox: {e}");
        }
        if let Ok((pending, _, dead)) = repo.outbox_counts() {
            observer.outbox(pending as i64, dead as i64);
        }
        let sleep = match repo.outbox_next_due() {
            Ok(Some(due)) => {
                Duration::from_millis(u64::try_from(due - idsync_repo::now_ms()).unwrap_or(0))
            }
            Ok(None) => DISPATCHER_MAX_SLEEP,
            Err(e) => {
                tracing::warn!("outbox: {e}");
                DISPATCHER_MAX_SLEEP
            }
        };
        let deadline = Instant::now() + sleep.min(DISPATCHER_MAX_SLEEP);
        stop.wait_poked(poked, deadline);
    }
}

/// Re-runs the failed events of `resource` whose backoff has passed; true when one of
/// them planned, moved or cancelled a lifecycle timer.
fn retry_due(setup: &Setup, policy: &idsync_engine::Policy, resource: &str) -> bool {
    let cfg = &setup.loaded.config.failed_retry;
    if cfg.max_attempts <= 0 {
        return false;
    }
    let repo = setup.engine.repo();
    let Ok(failures) = repo.failures(Some(resource)) else {
        return false;
    };
    let mut timers = false;
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
        let result = setup.engine.retry(policy, &f);
        if let Ok(d) = &result {
            timers |= d.rules.iter().any(|r| r.rule == idsync_engine::TIMER_RULE);
        }
        match result {
            Ok(d) if d.error.is_none() => {
                let _span = tracing::warn_span!("event", resource, key = %d.key).entered();
                tracing::info!("failed event #{} re-run: {}", f.id, d.action)
            }
            Ok(d) => {
                let _span = tracing::warn_span!("event", resource, key = %d.key).entered();
                tracing::warn!(
                    "failed event #{} still failing (attempt {}): {}",
                    f.id,
                    f.attempts + 1,
                    d.error.unwrap_or_default()
                )
            }
            Err(e) => tracing::warn!(resource, "failed event #{}: {e}", f.id),
        }
    }
    timers
}
