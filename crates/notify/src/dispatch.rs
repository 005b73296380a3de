//! The outbox dispatcher: claim due messages, send them, record the outcomes.
//!
//! Key design choice: at least once, never silently lost. A round claims due rows with a
//! lease (committed before anything is sent), sends them, then records every outcome in
//! one transaction: `sent` (which clears the identity's pending mark), a retry time from
//! the row's schedule, or dead-lettered. A crash between sending and recording leaves the
//! rows pending; after the lease they are sent again with the same Message-ID. A
//! [`Dispatcher`] is self-contained (repository, transport, settings) so the long-running
//! agent can run it as a task; [`Dispatcher::round_blocking`] runs one round on a private
//! current-thread runtime for `idsync run`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idsync_repo::{OutboxMessage, OutboxOutcome, Repo, now_ms};

use crate::NotifyError;
use crate::message::{Outgoing, build};
use crate::retry::RetrySpec;
use crate::smtp::{SendFailure, SmtpSettings, send_all};

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
            let results: std::collections::HashMap<i64, Result<(), SendFailure>> =
                self.send(&rows).await?.into_iter().collect();
            if self.settings.exit_after_send {
                tracing::error!("IDSYNC_FAULT=exit-after-send: exiting before recording");
                std::process::exit(86);
            }
            let now = now_ms();
            let mut outcomes = Vec::with_capacity(rows.len());
            let mut all_transient = true;
            for m in &rows {
                let outcome = match results.get(&m.id) {
                    Some(Ok(())) => {
                        all_transient = false;
                        OutboxOutcome::Sent
                    }
                    Some(Err(f)) => {
                        all_transient &= !f.permanent;
                        failure_outcome(m, f, now)
                    }
                    None => failure_outcome(
                        m,
                        &SendFailure {
                            permanent: false,
                            message: "no result".into(),
                        },
                        now,
                    ),
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
            if all_transient {
                break;
            }
        }
        Ok(report)
    }

    async fn send(
        &self,
        rows: &[OutboxMessage],
    ) -> Result<Vec<(i64, Result<(), SendFailure>)>, NotifyError> {
        let mut results = Vec::with_capacity(rows.len());
        let mut ready: Vec<Outgoing> = Vec::with_capacity(rows.len());
        for m in rows {
            match build(m) {
                Ok(o) => ready.push(o),
                Err(e) => results.push((
                    m.id,
                    Err(SendFailure {
                        permanent: true,
                        message: e,
                    }),
                )),
            }
        }
        match &self.transport {
            Transport::Smtp(s) => {
                let mut sent = send_all(s, ready).await;
                results.append(&mut sent);
            }
            Transport::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| NotifyError::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                for o in ready {
                    let r = write_eml(dir, &o).map_err(|e| SendFailure {
                        permanent: false,
                        message: e,
                    });
                    results.push((o.id, r));
                }
            }
        }
        Ok(results)
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
