//! The outbox dispatcher: claim due messages, send them, record the outcomes.
//!
//! Key design choice: at least once, never silently lost, and at most the messages in
//! flight sent twice. A round claims due rows with a lease (committed before anything is
//! sent), sends them on a task of its own, and records each outcome as it arrives, in
//! small groups (what arrives within 20 ms, at most 64, one transaction each): `sent`
//! (which clears the identity's pending mark), a retry time from the row's schedule, or
//! dead-lettered. A crash between sending and recording leaves those few rows pending;
//! after the lease they are sent again with the same Message-ID. A
//! [`Dispatcher`] is self-contained (repository, transport, settings) so the long-running
//! agent can run it as a task; [`Dispatcher::round_blocking`] runs one round on a private
//! current-thread runtime for `idsync run`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use idsync_repo::{OutboxMessage, OutboxOutcome, Repo, now_ms};

use crate::NotifyError;
use crate::message::{Outgoing, build};
use crate::retry::RetrySpec;
use crate::smtp::{Outcomes, SendFailure, SmtpSettings, send_all};

/// Outcomes that arrive within this window of the first are recorded in one transaction.
const RECORD_WINDOW: Duration = Duration::from_millis(20);

/// At most this many outcomes are recorded in one transaction.
const RECORD_GROUP: usize = 64;

/// Where messages go.
#[derive(Clone, Debug)]
pub enum Transport {
    /// An SMTP server.
    Smtp(Arc<SmtpSettings>),
    /// `ID.eml` files in a folder, written atomically (temp file, then rename), so a resend
    /// overwrites the same file.
    File(PathBuf),
}

/// Dispatcher settings.
#[derive(Clone, Copy, Debug)]
pub struct DispatchSettings {
    /// Claim lease.
    pub lease: Duration,
    /// Rows claimed at a time.
    pub batch: u64,
    /// Fault injection for tests: exit the process after sending a chunk and before
    /// recording it (`IDSYNC_FAULT=exit-after-send`).
    pub exit_after_send: bool,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            lease: Duration::from_secs(120),
            batch: 512,
            exit_after_send: false,
        }
    }
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Delivered.
    pub sent: u64,
    /// Failed, to be retried.
    pub retrying: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// The outbox dispatcher.
#[derive(Debug)]
pub struct Dispatcher {
    repo: Arc<Repo>,
    transport: Transport,
    settings: DispatchSettings,
}

impl Dispatcher {
    /// A dispatcher draining `repo`'s outbox through `transport`.
    pub fn new(repo: Arc<Repo>, transport: Transport, settings: DispatchSettings) -> Dispatcher {
        Dispatcher {
            repo,
            transport,
            settings,
        }
    }

    /// One round on a private current-thread runtime (for the synchronous agent).
    pub fn round_blocking(&self) -> Result<RoundReport, NotifyError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NotifyError::Runtime(e.to_string()))?;
        rt.block_on(self.round())
    }

    /// Sends every message due now, chunk by chunk, until none is due. Stops early when
    /// the server is unreachable (every message of a chunk failed transiently).
    pub async fn round(&self) -> Result<RoundReport, NotifyError> {
        let mut report = RoundReport::default();
        let lease_ms = i64::try_from(self.settings.lease.as_millis()).unwrap_or(i64::MAX);
        loop {
            let rows = self.repo.outbox_claim(self.settings.batch, lease_ms)?;
            if rows.is_empty() {
                break;
            }
            let mut by_id: HashMap<i64, &OutboxMessage> = rows.iter().map(|m| (m.id, m)).collect();
            let (tx, mut outcomes) = mpsc::unbounded_channel();
            let sending = self.start_sending(&rows, tx)?;
            let mut all_transient = true;
            // Record outcomes as they come, in groups of what arrived within
            // RECORD_WINDOW: a crash repeats at most the messages in flight.
            while let Some(first) = outcomes.recv().await {
                let mut group = vec![first];
                let until = tokio::time::Instant::now() + RECORD_WINDOW;
                while group.len() < RECORD_GROUP {
                    match tokio::time::timeout_at(until, outcomes.recv()).await {
                        Ok(Some(o)) => group.push(o),
                        Ok(None) | Err(_) => break,
                    }
                }
                if self.settings.exit_after_send && group.iter().any(|(_, r)| r.is_ok()) {
                    tracing::error!("IDSYNC_FAULT=exit-after-send: exiting before recording");
                    std::process::exit(86);
                }
                let group: Vec<_> = group
                    .into_iter()
                    .filter_map(|(id, r)| by_id.remove(&id).map(|m| (m, r)))
                    .collect();
                all_transient &= self.record(group, &mut report)?;
            }
            if let Err(e) = sending.await {
                tracing::error!("the sending task failed: {e}");
            }
            // A message whose sender failed has no outcome: try it again later.
            let unsent: Vec<_> = by_id
                .into_values()
                .map(|m| {
                    (
                        m,
                        Err(SendFailure::transient("no result from the sending task")),
                    )
                })
                .collect();
            all_transient &= self.record(unsent, &mut report)?;
            if all_transient {
                break;
            }
        }
        Ok(report)
    }

    /// Records one group of outcomes in one transaction; whether every one of them was a
    /// transient failure (the server is unreachable).
    fn record(
        &self,
        group: Vec<(&OutboxMessage, Result<(), SendFailure>)>,
        report: &mut RoundReport,
    ) -> Result<bool, NotifyError> {
        let now = now_ms();
        let mut all_transient = true;
        let mut outcomes = Vec::with_capacity(group.len());
        for (m, result) in group {
            let outcome = match result {
                Ok(()) => {
                    all_transient = false;
                    OutboxOutcome::Sent
                }
                Err(f) => {
                    all_transient &= !f.permanent;
                    failure_outcome(m, &f, now)
                }
            };
            match &outcome {
                OutboxOutcome::Sent => report.sent += 1,
                OutboxOutcome::Retry { error, .. } => {
                    tracing::warn!(id = m.id, policy = %m.policy, "delivery failed, will retry: {error}");
                    report.retrying += 1;
                }
                OutboxOutcome::Dead { error } => {
                    tracing::warn!(id = m.id, policy = %m.policy, "dead-lettered: {error}");
                    report.dead += 1;
                }
            }
            outcomes.push((m.id, outcome));
        }
        self.repo.outbox_record(&outcomes)?;
        Ok(all_transient)
    }

    /// Builds the claimed messages and starts sending them on a task of their own; each
    /// outcome goes to `out` as soon as it is known (a message that cannot be built fails
    /// permanently at once).
    fn start_sending(
        &self,
        rows: &[OutboxMessage],
        out: Outcomes,
    ) -> Result<tokio::task::JoinHandle<()>, NotifyError> {
        let mut ready: Vec<Outgoing> = Vec::with_capacity(rows.len());
        for m in rows {
            match build(m) {
                Ok(o) => ready.push(o),
                Err(e) => {
                    let _ = out.send((
                        m.id,
                        Err(SendFailure {
                            permanent: true,
                            message: e,
                        }),
                    ));
                }
            }
        }
        Ok(match &self.transport {
            Transport::Smtp(s) => {
                let s = s.clone();
                tokio::spawn(async move { send_all(&s, ready, out).await })
            }
            Transport::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| NotifyError::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                let dir = dir.clone();
                tokio::spawn(async move {
                    for o in ready {
                        let r = write_eml(&dir, &o).map_err(SendFailure::transient);
                        let _ = out.send((o.id, r));
                        // Let the recorder take what is written so far.
                        tokio::task::yield_now().await;
                    }
                })
            }
        })
    }
}

fn write_eml(dir: &std::path::Path, o: &Outgoing) -> Result<(), String> {
    let path = dir.join(format!("{}.eml", o.id));
    let tmp = dir.join(format!(".{}.eml.tmp", o.id));
    std::fs::write(&tmp, &o.bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

fn failure_outcome(m: &OutboxMessage, f: &SendFailure, now: i64) -> OutboxOutcome {
    let spec: RetrySpec = serde_json::from_value(m.mail.retry.clone()).unwrap_or_default();
    spec.outcome(
        f.permanent,
        f.message.clone(),
        m.attempts + 1,
        now,
        m.expires_at,
    )
}
