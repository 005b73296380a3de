//! The `notifications:` section of `idsync.yaml`, as serde types with
//! `deny_unknown_fields`. Durations are humantime strings (`90s`, `5m`, `3d`).
//!
//! Secrets never live here: the SMTP password is read from the environment variable named
//! by `password_env` or from the file named by `password_file`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole `notifications:` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// The default From mailbox, e.g. `idsync <idsync@example.com>`.
    pub from: String,
    /// Where messages go.
    pub transport: TransportConfig,
    /// Dispatcher tuning.
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// The policies.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

/// Where messages go.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum TransportConfig {
    /// An SMTP server.
    Smtp(SmtpConfig),
    /// `.eml` files in a folder (quickstart, tests, pickup by another system).
    File {
        /// The folder, relative to the config file.
        dir: PathBuf,
    },
}

/// How to reach the SMTP server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Host name or address.
    pub host: String,
    /// Port (default 587 for `starttls`, 465 for `tls`, 25 for `none`).
    pub port: Option<u16>,
    /// `starttls` (default), `tls` (implicit TLS) or `none` (plain, for loopback relays).
    #[serde(default)]
    pub tls: TlsMode,
    /// A PEM file of CA certificates that sign the server's certificate (a private CA),
    /// trusted besides the usual roots; relative to the config file.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (test servers only).
    #[serde(default)]
    pub accept_invalid_certs: bool,
    /// User name for AUTH.
    pub username: Option<String>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (e.g. a container secret), relative to the config file.
    pub password_file: Option<PathBuf>,
    /// Connections kept open while draining (default 4).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Timeout of connecting and of each send (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Name sent in EHLO (default: this host's name).
    pub hello_name: Option<String>,
}

fn default_connections() -> usize {
    4
}

fn default_timeout() -> String {
    "30s".to_owned()
}

/// Transport security.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// Implicit TLS from the first byte (SMTPS).
    Tls,
    /// No TLS at all.
    None,
}

/// Dispatcher tuning.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// How long a claimed message is reserved for the dispatcher that claimed it; a
    /// dispatcher that dies mid-send leaves it to be sent again after this (default 2m).
    #[serde(default = "default_lease")]
    pub claim_lease: String,
    /// Messages claimed at a time (default 512).
    #[serde(default = "default_batch")]
    pub batch: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            claim_lease: default_lease(),
            batch: default_batch(),
        }
    }
}

fn default_lease() -> String {
    "2m".to_owned()
}

fn default_batch() -> u64 {
    512
}

/// One notification policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Unique name (shown in the outbox).
    pub name: String,
    /// Identity events that trigger it.
    pub on: Vec<Trigger>,
    /// `updated` fires only when one of these attributes changed.
    #[serde(default)]
    pub attributes: Vec<String>,
    /// `updated` fires only when this attribute changes from and/or to a value.
    pub change: Option<ChangeCondition>,
    /// A Rhai expression over `identity`, `before`, `event`, `resource`, `key`; true-like
    /// sends.
    pub condition: Option<String>,
    /// Recipient expressions (Rhai), each a string, an array of strings or `()`.
    pub to: Vec<String>,
    /// From mailbox for this policy (default: `notifications.from`).
    pub from: Option<String>,
    /// Subject template (minijinja), one line.
    pub subject: String,
    /// Text part template (minijinja).
    pub text: String,
    /// HTML part template (minijinja, values autoescaped).
    pub html: Option<String>,
    /// When to try again.
    #[serde(default)]
    pub retry: RetryConfig,
    /// What each error category does.
    #[serde(default)]
    pub on_error: ErrorActions,
}

/// Identity events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// An identity was created.
    Created,
    /// An identity's attributes (or its disabled flag) changed.
    Updated,
    /// An identity was deleted.
    Deleted,
    /// An account was linked to an existing identity.
    Linked,
    /// An account was unlinked from an identity.
    Unlinked,
    /// A work item was opened for an operator (a disputed or unmatched account, a rule's
    /// `ctx.work_item`); the message has no identity.
    #[serde(rename = "work_item")]
    WorkItem,
}

impl Trigger {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Created => "created",
            Trigger::Updated => "updated",
            Trigger::Deleted => "deleted",
            Trigger::Linked => "linked",
            Trigger::Unlinked => "unlinked",
            Trigger::WorkItem => "work_item",
        }
    }
}

/// An attribute changing from and/or to a value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeCondition {
    /// The attribute.
    pub attribute: String,
    /// Its value before (absent: any).
    pub from: Option<String>,
    /// Its value after (absent: any).
    pub to: Option<String>,
}

/// The retry schedule: an interval with exponential backoff, or a cron schedule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First retry delay, doubled after each failure up to `max_interval` (default 1m).
    pub every: Option<String>,
    /// A cron expression instead (e.g. `*/5 * * * *`, the CA article's every 5 minutes).
    pub cron: Option<String>,
    /// Longest delay between attempts (default 1h).
    pub max_interval: Option<String>,
    /// Give up (dead-letter) this long after the message was created (default 3d).
    #[serde(default = "default_max_age")]
    pub max_age: String,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            every: None,
            cron: None,
            max_interval: None,
            max_age: default_max_age(),
        }
    }
}

fn default_max_age() -> String {
    "3d".to_owned()
}

/// What an error category does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorAction {
    /// Leave the message pending and try again on the schedule.
    Retry,
    /// Dead-letter it (shown, re-triable with `outbox retry`).
    Dead,
}

/// What each error category does.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorActions {
    /// Connection refused, timeouts, TLS failures, SMTP 4xx (default `retry`).
    #[serde(default = "retry")]
    pub transient: ErrorAction,
    /// SMTP 5xx, malformed messages (default `dead`).
    #[serde(default = "dead")]
    pub permanent: ErrorAction,
}

impl Default for ErrorActions {
    fn default() -> Self {
        ErrorActions {
            transient: ErrorAction::Retry,
            permanent: ErrorAction::Dead,
        }
    }
}

fn retry() -> ErrorAction {
    ErrorAction::Retry
}

fn dead() -> ErrorAction {
    ErrorAction::Dead
}

/// Parses a humantime duration, naming the key on error.
pub fn duration(key: &str, s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{key}: {s:?} is not a duration: {e}"))
}
