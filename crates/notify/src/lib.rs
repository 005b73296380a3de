//! Notification policies and the durable email outbox (docs/design.md: the decision
//! order's step 9, and "Durability"; the CA email-retry design).
//!
//! Key design choice: safe without configuration. A policy's message is rendered and
//! inserted into the outbox in the same transaction as the checkin that caused it
//! ([`PolicyNotifier`], the engine's [`Notifier`](idsync_engine::Notifier)); it stays
//! pending on the identity until the [`Dispatcher`] records its delivery. Transient
//! failures are retried on the policy's schedule, permanent ones dead-lettered and
//! re-triable; the Message-ID derives from the outbox row so a resend can be deduplicated.
//!
//! Modules: `config` (the YAML section), `policy` (triggers, Rhai conditions and
//! recipients, minijinja templates), `retry` (schedules), `message` (RFC 5322 building),
//! `smtp` (lettre connections with `TCP_NODELAY`), `dispatch` (claim, send, record),
//! `setup` (config to runtime values, secrets).

pub mod config;
pub mod dispatch;
pub mod html_lint;
pub mod message;
pub mod policy;
pub mod retry;
pub mod setup;
pub mod smtp;

use std::path::PathBuf;

pub use config::NotificationsConfig;
pub use dispatch::{DispatchSettings, Dispatcher, RoundReport, Transport};
pub use policy::PolicyNotifier;

/// Everything that can go wrong outside a single message's delivery.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] idsync_repo::RepoError),
    /// A file or folder could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the dispatcher runtime: {0}")]
    Runtime(String),
    /// The notifications config is invalid (every problem, each naming its key).
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
}
