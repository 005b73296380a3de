//! What a running agent tells operators: Prometheus metrics, liveness and readiness, served
//! over HTTP on loopback (`/metrics`, `/healthz`, `/readyz`).
//!
//! The resource loops report into an [`Observer`]; the HTTP thread only reads it. Metrics use
//! the Prometheus project's own `prometheus-client` crate; the server is `tiny_http`
//! (synchronous, one thread), enough for a scrape every few seconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idsync_core::Action;
use idsync_engine::BatchReport;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The last known state of one resource loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceState {
    /// The error of the last pass, if it failed.
    pub last_error: Option<String>,
}

/// Collects what the loops report and renders it.
pub struct Observer {
    registry: Registry,
    events: Family<Labels, Counter>,
    situations: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    passes: Family<Labels, Counter>,
    pass_errors: Family<Labels, Counter>,
    last_pass: Family<Labels, Gauge<f64, AtomicU64>>,
    pass_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    up: Family<Labels, Gauge>,
    checkpoint_resets: Family<Labels, Counter>,
    pass_done_events: Family<Labels, Gauge>,
    pass_planned_events: Family<Labels, Gauge>,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    last_reconcile: Family<Labels, Gauge<f64, AtomicU64>>,
    outbox_pending: Gauge,
    outbox_dead: Gauge,
    timers_fired: Family<Labels, Counter>,
    timers_pending: Gauge,
    timers_overdue: Gauge,
    states: Mutex<BTreeMap<String, ResourceState>>,
    /// With a PostgreSQL repository: which resources this agent holds the lease of.
    leases: Mutex<Option<Arc<crate::leases::Keeper>>>,
}

fn resource(name: &str) -> Labels {
    vec![("resource".to_owned(), name.to_owned())]
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Observer {
    /// An observer expecting `resources`.
    pub fn new(resources: &[String]) -> Observer {
        let mut registry = Registry::with_prefix("idsync");
        let events = Family::<Labels, Counter>::default();
        registry.register(
            "events",
            "Change events decided, by resource and action",
            events.clone(),
        );
        let situations = Family::<Labels, Counter>::default();
        registry.register(
            "situations",
            "Change events by resource and situation",
            situations.clone(),
        );
        let failed = Family::<Labels, Counter>::default();
        registry.register("events_failed", "Change events that failed", failed.clone());
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "input_rejected",
            "Input the adapter could not read (malformed rows)",
            rejected.clone(),
        );
        let passes = Family::<Labels, Counter>::default();
        registry.register("passes", "Completed passes", passes.clone());
        let pass_errors = Family::<Labels, Counter>::default();
        registry.register(
            "pass_errors",
            "Passes that could not synchronize the resource",
            pass_errors.clone(),
        );
        let last_pass = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_pass_timestamp_seconds",
            "Unix time of the last completed pass",
            last_pass.clone(),
        );
        let pass_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_pass_duration_seconds",
            "Duration of the last pass",
            pass_seconds.clone(),
        );
        let up = Family::<Labels, Gauge>::default();
        registry.register(
            "resource_up",
            "1 when the last pass of the resource succeeded",
            up.clone(),
        );
        let checkpoint_resets = Family::<Labels, Counter>::default();
        registry.register(
            "checkpoint_resets",
            "Times the source was found older than the committed checkpoint (a directory restored from a backup) and refreshed from scratch",
            checkpoint_resets.clone(),
        );
        let pass_done_events = Family::<Labels, Gauge>::default();
        registry.register(
            "pass_events_done",
            "Events committed so far by the pass in hand (or the last pass)",
            pass_done_events.clone(),
        );
        let pass_planned_events = Family::<Labels, Gauge>::default();
        registry.register(
            "pass_events_planned",
            "Events the pass in hand (or the last pass) hands out in all, as far as known",
            pass_planned_events.clone(),
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Completed reconciles (every account decided again), by resource",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that could not be completed",
            reconcile_errors.clone(),
        );
        let last_reconcile = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_reconcile_timestamp_seconds",
            "Unix time of the last completed reconcile",
            last_reconcile.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending",
            "Notifications waiting for delivery",
            outbox_pending.clone(),
        );
        let outbox_dead = Gauge::default();
        registry.register(
            "outbox_dead",
            "Notifications dead-lettered",
            outbox_dead.clone(),
        );
        let timers_fired = Family::<Labels, Counter>::default();
        registry.register(
            "timers_fired",
            "Lifecycle timers fired, by resource and action (failed: the firing failed and was put off)",
            timers_fired.clone(),
        );
        let timers_pending = Gauge::default();
        registry.register(
            "timers_pending",
            "Lifecycle timers waiting for their time",
            timers_pending.clone(),
        );
        let timers_overdue = Gauge::default();
        registry.register(
            "timers_overdue",
            "Lifecycle timers due for more than a minute and not fired yet (the timer thread is behind, or cannot reach the repository)",
            timers_overdue.clone(),
        );
        let states = resources
            .iter()
            .map(|r| (r.clone(), ResourceState::default()))
            .collect();
        for r in resources {
            up.get_or_create(&resource(r)).set(0);
        }
        Observer {
            registry,
            events,
            situations,
            failed,
            rejected,
            passes,
            pass_errors,
            last_pass,
            pass_seconds,
            up,
            checkpoint_resets,
            pass_done_events,
            pass_planned_events,
            reconciles,
            reconcile_errors,
            last_reconcile,
            outbox_pending,
            outbox_dead,
            timers_fired,
            timers_pending,
            timers_overdue,
            states: Mutex::new(states),
            leases: Mutex::new(None),
        }
    }

    /// A committed part of a pass: its events count at once, so the counters advance
    /// during a long pass, and the resource is making progress (up, ready).
    pub fn part_committed(&self, name: &str, r: &BatchReport) {
        let labels = resource(name);
        for (situation, n) in &r.situations {
            let l = vec![
                ("resource".to_owned(), name.to_owned()),
                ("situation".to_owned(), situation.as_str().to_owned()),
            ];
            self.situations.get_or_create(&l).inc_by(*n);
        }
        for (action, n) in &r.actions {
            let l = vec![
                ("resource".to_owned(), name.to_owned()),
                ("action".to_owned(), action.as_str().to_owned()),
            ];
            self.events.get_or_create(&l).inc_by(*n);
        }
        self.failed.get_or_create(&labels).inc_by(r.failed);
        self.rejected.get_or_create(&labels).inc_by(r.rejected);
        self.healthy(name);
    }

    /// The source was found older than the checkpoint `n` more times.
    pub fn checkpoint_resets(&self, name: &str, n: u64) {
        self.checkpoint_resets
            .get_or_create(&resource(name))
            .inc_by(n);
    }

    /// Where the pass in hand stands: events committed, and planned in all.
    pub fn pass_progress(&self, name: &str, done: u64, planned: u64) {
        let labels = resource(name);
        self.pass_done_events
            .get_or_create(&labels)
            .set(i64::try_from(done).unwrap_or(i64::MAX));
        self.pass_planned_events
            .get_or_create(&labels)
            .set(i64::try_from(planned).unwrap_or(i64::MAX));
    }

    /// A completed pass (its parts were counted by [`Observer::part_committed`]).
    pub fn pass_done(&self, name: &str, took: Duration) {
        let labels = resource(name);
        self.passes.get_or_create(&labels).inc();
        self.last_pass.get_or_create(&labels).set(now_secs());
        self.pass_seconds
            .get_or_create(&labels)
            .set(took.as_secs_f64());
        self.healthy(name);
    }

    /// A completed reconcile (its parts were counted by [`Observer::part_committed`]).
    pub fn reconcile_done(&self, name: &str) {
        let labels = resource(name);
        self.reconciles.get_or_create(&labels).inc();
        self.last_reconcile.get_or_create(&labels).set(now_secs());
        self.healthy(name);
    }

    /// A reconcile that could not be completed (counted besides the failed pass).
    pub fn reconcile_failed(&self, name: &str) {
        self.reconcile_errors.get_or_create(&resource(name)).inc();
    }

    /// The resource works (a part committed, a pass ended, a stream is open and quiet).
    pub fn healthy(&self, name: &str) {
        self.up.get_or_create(&resource(name)).set(1);
        if let Ok(mut states) = self.states.lock() {
            states.entry(name.to_owned()).or_default().last_error = None;
        }
    }

    /// A pass that could not synchronize the resource.
    pub fn pass_failed(&self, name: &str, error: &str) {
        let labels = resource(name);
        self.pass_errors.get_or_create(&labels).inc();
        self.up.get_or_create(&labels).set(0);
        if let Ok(mut states) = self.states.lock() {
            states.entry(name.to_owned()).or_default().last_error = Some(error.to_owned());
        }
    }

    /// The outbox counts.
    pub fn outbox(&self, pending: i64, dead: i64) {
        self.outbox_pending.set(pending);
        self.outbox_dead.set(dead);
    }

    /// Timers fired in a round: `(resource, action)` and how many.
    pub fn timers_fired<'a>(&self, fired: impl IntoIterator<Item = (&'a str, Action, u64)>) {
        for (name, action, n) in fired {
            let l = vec![
                ("resource".to_owned(), name.to_owned()),
                ("action".to_owned(), action.as_str().to_owned()),
            ];
            self.timers_fired.get_or_create(&l).inc_by(n);
        }
    }

    /// The timer counts.
    pub fn timers(&self, pending: u64, overdue: u64) {
        self.timers_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.timers_overdue
            .set(i64::try_from(overdue).unwrap_or(i64::MAX));
    }

    /// Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Reports which resources this agent runs through `keeper` (several agents).
    pub fn watch_leases(&self, keeper: Arc<crate::leases::Keeper>) {
        if let Ok(mut l) = self.leases.lock() {
            *l = Some(keeper);
        }
    }

    /// With leases: the resources this agent runs and those it stands by for, as lines.
    pub fn lease_lines(&self) -> Option<String> {
        let keeper = self.leases.lock().ok()?.clone()?;
        let held = keeper.held();
        let states = self.states.lock().ok()?;
        let standby: Vec<&str> = states
            .keys()
            .map(String::as_str)
            .filter(|n| !held.iter().any(|h| h == n))
            .collect();
        Some(format!(
            "agent: {}\nruns: {}\nstandby: {}\n",
            keeper.holder(),
            held.join(", "),
            standby.join(", ")
        ))
    }

    /// Ready unless a resource is failing or halted (with the reasons): a resource in its
    /// first long pass is ready, it is making progress.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let Ok(states) = self.states.lock() else {
            return Err(vec!["state unavailable".to_owned()]);
        };
        let why: Vec<String> = states
            .iter()
            .filter_map(|(name, s)| s.last_error.as_ref().map(|e| format!("{name}: {e}")))
            .collect();
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` from a background thread. Returns
/// the address bound (port 0 in `addr` picks a free port) with the thread.
pub fn serve(
    addr: SocketAddr,
    observer: Arc<Observer>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("status endpoint: cannot listen on {addr}: {e}"))?;
    let addr = server.server_addr().to_ip().unwrap_or(addr);
    tracing::info!("status endpoint on http://{addr}/ (metrics, healthz, readyz)");
    let handle = std::thread::Builder::new()
        .name("idsync-http".to_owned())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (code, body, content_type) = match request.url() {
                    "/metrics" => (
                        200,
                        observer.metrics(),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    "/healthz" => (200, "ok\n".to_owned(), "text/plain"),
                    "/readyz" => {
                        let leases = observer.lease_lines().unwrap_or_default();
                        match observer.readiness() {
                            Ok(()) => (200, format!("ready\n{leases}"), "text/plain"),
                            Err(why) => (
                                503,
                                format!("not ready\n{}\n{leases}", why.join("\n")),
                                "text/plain",
                            ),
                        }
                    }
                    _ => (404, "not found\n".to_owned(), "text/plain"),
                };
                let mut response = tiny_http::Response::from_string(body).with_status_code(code);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
                    response = response.with_header(h);
                }
                if let Err(e) = request.respond(response) {
                    tracing::debug!("status endpoint: {e}");
                }
            }
        })?;
    Ok((addr, handle))
}
