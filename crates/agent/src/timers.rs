//! Lifecycle timers in the agent and the commands: firing the due ones (`run --once`, and
//! the agent's timer thread, which sleeps until the next due time), and showing them
//! (`preview --timers`, `explain`, `status`).
//!
//! Key design choice: the timer thread mirrors the outbox dispatcher. It fires what is due
//! (at start-up: whatever came due while the agent was not running), then sleeps until the
//! next due time the repository holds, or until a resource loop committed a batch that
//! planned or moved a timer (it is poked, like the dispatcher after a commit), or at most
//! a minute (timers planned by another process: an operator's `idsync link`). It never
//! passes a resource and never wakes a resource loop.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use idsync_core::Action;
use idsync_engine::{EngineError, FiredTimer, format_time};
use idsync_repo::{Repo, Timer, now_ms};

use crate::cli::PreviewArgs;
use crate::config::Loaded;
use crate::exit::Exit;
use crate::observe::Observer;
use crate::printable::inline;
use crate::runner::Stop;
use crate::setup::{Setup, open_repo};

/// Timers fired per transaction.
const ROUND: usize = 64;

/// The longest the timer thread sleeps without looking at the repository.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A timer due this long ago and still pending counts as overdue (metric
/// `idsync_timers_overdue`): a firing that failed is put off, so only a timer thread that
/// is behind or cannot reach the repository leaves timers overdue.
const OVERDUE_AFTER_MS: i64 = 60_000;

/// After a round that could not be applied (the repository's storage failed), the next
/// attempt waits this long, doubled after each failure up to [`MAX_BACKOFF`]: a timer that
/// stays due must not spin the thread.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What firing the due timers came to.
#[derive(Clone, Debug, Default)]
pub struct Fired {
    /// Timers fired, by resource and action (`failed`: the firing failed and the timer was
    /// put off).
    pub by_resource: BTreeMap<(String, Action), u64>,
    /// Whether a firing queued a notification.
    pub notified: bool,
}

impl Fired {
    /// How many timers fired.
    pub fn count(&self) -> u64 {
        self.by_resource.values().sum()
    }

    /// How many firings failed (each timer put off).
    pub fn failed(&self) -> u64 {
        self.actions().get(&Action::Failed).copied().unwrap_or(0)
    }

    /// Timers fired, by action.
    fn actions(&self) -> BTreeMap<Action, u64> {
        let mut actions = BTreeMap::new();
        for ((_, action), n) in &self.by_resource {
            *actions.entry(*action).or_default() += n;
        }
        actions
    }

    fn add(&mut self, f: &FiredTimer) {
        *self
            .by_resource
            .entry((f.timer.resource.clone(), f.decision.action))
            .or_default() += 1;
        if f.decision
            .rules
            .iter()
            .any(|r| r.rule == idsync_engine::NOTIFICATION_RULE)
        {
            self.notified = true;
        }
    }

    /// Adds what `other` fired.
    fn merge(&mut self, other: Fired) {
        for (k, n) in other.by_resource {
            *self.by_resource.entry(k).or_default() += n;
        }
        self.notified |= other.notified;
    }

    /// `2 fired; actions: deleted_identity 1, disabled 1; failed 0`.
    pub fn describe(&self) -> String {
        let actions: Vec<String> = self
            .actions()
            .iter()
            .filter(|(a, _)| **a != Action::Failed)
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        let mut out = format!("{} fired", self.count());
        if !actions.is_empty() {
            out.push_str("; actions: ");
            out.push_str(&actions.join(", "));
        }
        out.push_str(&format!("; failed {}", self.failed()));
        out
    }
}

/// Fires every timer due now (of the resources in `only`, none: of every resource), a
/// round per transaction, until none is due or `stop` says so.
pub fn fire_due(
    setup: &Setup,
    only: Option<&[String]>,
    stop: &dyn Fn() -> bool,
) -> Result<Fired, EngineError> {
    let mut fired = Fired::default();
    loop {
        let round = setup.engine.fire_due_timers(&setup.policies, only, ROUND)?;
        for f in &round {
            fired.add(f);
        }
        if round.len() < ROUND || stop() {
            return Ok(fired);
        }
    }
}

/// The timers `idsync run --once` fires: those due before its passes (their time came
/// while nothing ran: they go first, as they would have in a running agent), then those
/// that came due during the passes.
#[derive(Debug, Default)]
pub struct OnceRounds {
    fired: Fired,
    failed: bool,
}

impl OnceRounds {
    /// Fires every timer due now of the resources in `only` (empty: every timer).
    pub fn fire(&mut self, setup: &Setup, only: &[String]) {
        let only = (!only.is_empty()).then_some(only);
        match fire_due(setup, only, &|| false) {
            Ok(fired) => self.fired.merge(fired),
            Err(e) => {
                eprintln!("error: timers: {e}");
                self.failed = true;
            }
        }
    }

    /// Prints what fired (if anything); the exit status it calls for: 1 when a firing
    /// failed, 3 when the repository failed.
    pub fn finish(self) -> Option<ExitCode> {
        if self.fired.count() > 0 {
            crate::printable::line(format_args!("timers: {}", self.fired.describe()));
        }
        if self.failed {
            Some(ExitCode::from(Exit::Resource))
        } else {
            (self.fired.failed() > 0).then(|| ExitCode::from(Exit::Failed))
        }
    }
}

/// The agent's timer thread (module doc). `woken`: a resource loop committed a batch that
/// planned a timer; `dispatcher`: poked after firings that queued notifications.
pub fn timer_loop(
    setup: &Setup,
    only: Option<&[String]>,
    woken: &Receiver<()>,
    stop: &Stop,
    dispatcher: Option<&Sender<()>>,
    observer: &Observer,
) {
    let repo = setup.engine.repo().clone();
    let mut backoff: Option<Duration> = None;
    while !stop.requested() {
        match fire_due(setup, only, &|| stop.requested()) {
            Ok(fired) => {
                backoff = None;
                if fired.count() > 0 {
                    tracing::info!("timers: {}", fired.describe());
                }
                observer.timers_fired(
                    fired
                        .by_resource
                        .iter()
                        .map(|((r, a), n)| (r.as_str(), *a, *n)),
                );
                if fired.notified
                    && let Some(d) = dispatcher
                {
                    let _ = d.send(());
                }
            }
            Err(e) => {
                let wait = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                backoff = Some(wait);
                tracing::warn!(
                    "timers: {e}; next attempt in {}",
                    humantime::format_duration(wait)
                );
            }
        }
        let overdue_before = now_ms().saturating_sub(OVERDUE_AFTER_MS);
        if let Ok((pending, overdue)) = repo.timer_counts(overdue_before, only) {
            observer.timers(pending, overdue);
        }
        let sleep = match (backoff, repo.next_timer_due(only)) {
            (Some(wait), _) => wait,
            (None, Ok(Some(due))) => {
                Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
            }
            (None, Ok(None)) => MAX_SLEEP,
            (None, Err(e)) => {
                tracing::warn!("timers: {e}");
                MAX_SLEEP
            }
        };
        let deadline = Instant::now() + sleep.min(MAX_SLEEP.max(backoff.unwrap_or_default()));
        stop.wait_poked(woken, deadline);
    }
}

/// `in 2d 3h`, `due now` (past), relative to now.
fn due_in(due: i64) -> String {
    let left = due - now_ms();
    if left <= 0 {
        return "due now".to_owned();
    }
    let secs = u64::try_from(left).unwrap_or(0).div_ceil(1000);
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// One timer for people: `#4 delete alice.martin at T (in 2d 3h); planned T0 by hr 1001:
/// REASON`.
fn describe_timer(t: &Timer) -> String {
    let mut out = format!(
        "#{} {} {} at {} ({}); planned {} by {} {}: {}",
        t.id,
        t.kind,
        inline(&t.identity),
        format_time(t.due_at),
        due_in(t.due_at),
        format_time(t.planned_at),
        t.resource,
        inline(&t.key),
        inline(&t.reason)
    );
    if t.attempts > 0 {
        out.push_str(&format!(
            "; {} failed attempt(s), last: {}",
            t.attempts,
            inline(t.last_error.as_deref().unwrap_or(""))
        ));
    }
    out
}

fn timer_json(t: &Timer) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "identity": t.identity,
        "kind": t.kind.as_str(),
        "due_at": format_time(t.due_at),
        "due": t.due_at <= now_ms(),
        "planned_at": format_time(t.planned_at),
        "resource": t.resource,
        "key": t.key,
        "reason": t.reason,
        "attempts": t.attempts,
        "last_error": t.last_error,
    })
}

/// `idsync preview --timers WITHIN`: the pending timers due within that time from now
/// (those already due included), earliest first; writes nothing.
pub fn preview(loaded: &Loaded, args: &PreviewArgs, within: &str) -> anyhow::Result<ExitCode> {
    let shown_within = within.trim();
    let within = match crate::when::parse_age(within) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --timers: {e}");
            return Ok(ExitCode::from(Exit::Config));
        }
    };
    let json = args.json();
    let mut out = crate::printable::stdout();
    let shown = inline(shown_within).into_owned();
    if !loaded.repository_exists() {
        let text = "timers: none pending (no repository yet); nothing was written";
        if json {
            eprintln!("{text}");
        } else {
            writeln!(out, "{text}")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let repo = open_repo(loaded)?;
    let until = now_ms().saturating_add(i64::try_from(within.as_millis()).unwrap_or(i64::MAX));
    let only = args.resource.clone().map(|r| vec![r]);
    let due = repo.due_timers(until, usize::MAX, only.as_deref())?;
    let limit = args.limit.unwrap_or(usize::MAX);
    for t in due.iter().take(limit) {
        if json {
            writeln!(out, "{}", timer_json(t))?;
        } else {
            writeln!(out, "{}", describe_timer(t))?;
        }
    }
    let (pending, _) = repo.timer_counts(0, None)?;
    let mut summary = format!(
        "timers: {} due within {shown}, {pending} pending in all; nothing was written",
        due.len()
    );
    if due.len() > limit {
        summary.push_str(&format!(
            " ({} more not listed: --limit)",
            due.len() - limit
        ));
    }
    if json {
        eprintln!("{summary}");
    } else {
        writeln!(out, "{summary}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `explain`: the pending timers of the account (`resource`, `key`: those its events
/// planned, and its owner's) or of the identity `name`.
pub fn explain(
    repo: &Repo,
    account: Option<(&str, &str)>,
    identity: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut timers = Vec::new();
    if let Some((resource, key)) = account {
        timers.extend(repo.timers_of_account(resource, key)?);
        if let Some(owner) = repo.owner_of(resource, key)? {
            timers.extend(repo.timers_of_identity(&owner)?);
        }
    }
    if let Some(name) = identity {
        timers.extend(repo.timers_of_identity(name)?);
    }
    timers.sort_by_key(|t| (t.due_at, t.id));
    timers.dedup_by_key(|t| t.id);
    for t in &timers {
        writeln!(out, "pending timer {}", describe_timer(t))?;
    }
    Ok(())
}

/// `status`: how many timers are pending and when the next is due.
pub fn status(repo: &Repo) -> anyhow::Result<TimerStatus> {
    let (pending, overdue) = repo.timer_counts(now_ms().saturating_sub(OVERDUE_AFTER_MS), None)?;
    Ok(TimerStatus {
        pending,
        overdue,
        next_due: repo.next_timer_due(None)?,
    })
}

/// The timers as `idsync status` shows them.
#[derive(Clone, Copy, Debug)]
pub struct TimerStatus {
    /// Pending timers.
    pub pending: u64,
    /// Of them, due for more than a minute (no agent fires them, or it cannot).
    pub overdue: u64,
    /// When the next is due (Unix ms).
    pub next_due: Option<i64>,
}

/// The `status` line: `timers: 3 pending, next in 2d 3h (2026-05-03T10:00:00Z)`, with the
/// overdue ones when there are some.
pub fn status_line(t: &TimerStatus) -> String {
    let pending = t.pending;
    let mut out = match t.next_due {
        Some(due) => format!(
            "timers: {pending} pending, next {} ({}) (idsync preview --timers 7d)",
            due_in(due),
            format_time(due)
        ),
        None => format!("timers: {pending} pending"),
    };
    if t.overdue > 0 {
        out.push_str(&format!(
            "; {} overdue by more than a minute: is an agent running? (`idsync run --once` fires them)",
            t.overdue
        ));
    }
    out
}
