//! The YAML configuration: raw serde types with `deny_unknown_fields`, then a validation
//! step that collects every problem at once, each naming the file and the key
//! (`idsync.yaml: resources[1].rules.correlation: ...`) or the file, line and column.
//!
//! Relative paths are resolved against the folder of the config file, so an agent
//! started from anywhere reads the same files.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use idsync_flatfile::FlatFileConfig;
use idsync_ldap::LdapConfig;
use serde::Deserialize;

/// The whole `idsync.yaml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The identity repository.
    #[serde(default)]
    pub repository: RepositoryConfig,
    /// The folder holding the rule scripts (`*.rhai`), relative to this file.
    #[serde(default = "default_rules_dir")]
    pub rules_dir: PathBuf,
    /// Sandbox limits for every rule run.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Seconds between passes of `idsync run` (without `--once`).
    #[serde(default = "default_interval")]
    pub poll_interval_secs: u64,
    /// The resources to synchronize.
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    /// The status endpoint of `idsync run` (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub status: StatusConfig,
    /// Automatic re-runs of failed events by `idsync run`.
    #[serde(default)]
    pub failed_retry: FailedRetryConfig,
    /// Attributes replaced by `REDACTED` when a decision is recorded as a rule fixture.
    #[serde(default)]
    pub redact_attributes: Vec<String>,
    /// Notification policies and the outbox transport (docs/notifications.md).
    #[serde(default)]
    pub notifications: Option<idsync_notify::NotificationsConfig>,
    /// How long records are kept (none of them is removed by default).
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Attribute authority: identity attribute → the resources that give it, first ranked
    /// first (module `authority`; docs/rules.md, "Attribute authority").
    #[serde(default)]
    pub authority: std::collections::BTreeMap<String, Vec<String>>,
    /// How identity attributes compare in correlation queries (module `correlation`).
    #[serde(default)]
    pub correlation: crate::correlation::CorrelationConfig,
    /// Date-driven state for the identities of every resource (a resource may give its
    /// own `lifecycle`).
    #[serde(default)]
    pub lifecycle: Option<LifecycleConfig>,
}

/// `lifecycle`: the identity attributes holding the dates between which an identity is
/// enabled (module `idsync_engine::lifecycle`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// The identity attribute holding the date from which the identity is enabled.
    #[serde(default)]
    pub valid_from: Option<String>,
    /// The identity attribute holding the date from which the identity is disabled.
    #[serde(default)]
    pub valid_to: Option<String>,
}

/// `retention`: how long each kind of record is kept, as an age (`90d`, `12h`); a kind left
/// out is kept for ever. Applied by `idsync run` (module `retention`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Decision records (those an open failed event needs are kept).
    pub decisions: Option<String>,
    /// Sent notifications (undelivered ones are never removed).
    pub outbox: Option<String>,
    /// Failed events an operator discarded.
    pub failed_discarded: Option<String>,
}

impl RetentionConfig {
    /// `(key, value)` of every age given.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        [
            ("decisions", &self.decisions),
            ("outbox", &self.outbox),
            ("failed_discarded", &self.failed_discarded),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// `status`: where the running agent serves health and metrics.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// `HOST:PORT` to listen on (default `127.0.0.1:9464`, loopback only); `off` disables it.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

/// `failed_retry`: how `idsync run` re-runs failed events before leaving them to an operator.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedRetryConfig {
    /// Automatic attempts per failed event (0 disables automatic retries).
    #[serde(default = "default_attempts")]
    pub max_attempts: i64,
    /// Seconds before the first retry; doubled after every attempt.
    #[serde(default = "default_backoff")]
    pub backoff_secs: u64,
}

impl Default for FailedRetryConfig {
    fn default() -> Self {
        FailedRetryConfig {
            max_attempts: default_attempts(),
            backoff_secs: default_backoff(),
        }
    }
}

fn default_attempts() -> i64 {
    5
}

fn default_backoff() -> u64 {
    60
}

fn default_rules_dir() -> PathBuf {
    PathBuf::from("rules")
}

fn default_interval() -> u64 {
    30
}

/// Where the repository lives: an SQLite file (`path`, the default) or a PostgreSQL
/// database (`url`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// The SQLite file, relative to the config file (default `idsync.db`). With `url`, the
    /// base name of this agent's own files (lock, status, in-flight marks).
    #[serde(default = "default_db")]
    pub path: PathBuf,
    /// A PostgreSQL database, `postgres://user@host:port/db`, without the password.
    pub url: Option<String>,
    /// The environment variable holding the PostgreSQL password.
    pub password_env: Option<String>,
    /// A file holding the PostgreSQL password (its first line), relative to the config.
    pub password_file: Option<PathBuf>,
    /// A PEM file of the CA that signed the PostgreSQL server's certificate: TLS, the
    /// certificate verified.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: how long a resource's lease lasts without renewal (default 30 s); an
    /// agent that dies is replaced for its resources within about this time.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// PostgreSQL: this agent's name in the leases table (default `host:config folder`);
    /// the same agent restarted takes its leases back at once under it. Give each agent
    /// its own.
    pub agent_name: Option<String>,
}

fn default_lease_secs() -> u64 {
    30
}

impl RepositoryConfig {
    /// What is wrong with these settings, each starting with the key concerned.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.url {
            None => {
                for (key, set) in [
                    ("password_env", self.password_env.is_some()),
                    ("password_file", self.password_file.is_some()),
                    ("ca_file", self.ca_file.is_some()),
                ] {
                    if set {
                        out.push(format!("{key}: only for a PostgreSQL repository (url)"));
                    }
                }
            }
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    out.push("url: expected postgres://user@host:port/database".to_owned());
                } else if idsync_repo::redact_url(url) != *url {
                    out.push(
                        "url: holds a password; give it in password_env or password_file \
                         instead (the URL is shown in status and logs)"
                            .to_owned(),
                    );
                }
                if self.lease_secs < 2 {
                    out.push("lease_secs: at least 2 (seconds)".to_owned());
                }
                if self.password_env.is_some() && self.password_file.is_some() {
                    out.push(
                        "password_env: give password_env or password_file, not both".to_owned(),
                    );
                }
            }
        }
        out
    }
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            path: default_db(),
            url: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            lease_secs: default_lease_secs(),
            agent_name: None,
        }
    }
}

fn default_db() -> PathBuf {
    PathBuf::from("idsync.db")
}

/// Rule sandbox limits; every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Operations per rule run.
    pub max_operations: Option<u64>,
    /// Function call depth.
    pub max_call_levels: Option<usize>,
    /// Expression nesting depth.
    pub max_expr_depth: Option<usize>,
    /// String length in bytes.
    pub max_string_size: Option<usize>,
    /// Array length.
    pub max_array_size: Option<usize>,
    /// Map size.
    pub max_map_size: Option<usize>,
    /// Data one rule run may hold at once, in MiB.
    pub max_memory_mb: Option<usize>,
    /// `print`/`debug` lines per second per rule file.
    pub max_log_lines_per_sec: Option<u32>,
}

impl LimitsConfig {
    /// The effective limits.
    pub fn to_limits(&self) -> idsync_rules::Limits {
        let d = idsync_rules::Limits::default();
        idsync_rules::Limits {
            max_operations: self.max_operations.unwrap_or(d.max_operations),
            max_call_levels: self.max_call_levels.unwrap_or(d.max_call_levels),
            max_expr_depth: self.max_expr_depth.unwrap_or(d.max_expr_depth),
            max_string_size: self.max_string_size.unwrap_or(d.max_string_size),
            max_array_size: self.max_array_size.unwrap_or(d.max_array_size),
            max_map_size: self.max_map_size.unwrap_or(d.max_map_size),
            max_memory: self
                .max_memory_mb
                .map_or(d.max_memory, |mb| mb.saturating_mul(1 << 20)),
            max_log_lines_per_sec: self
                .max_log_lines_per_sec
                .unwrap_or(d.max_log_lines_per_sec),
        }
    }
}

/// One resource: where its changes come from and how they are decided.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Unique name; also the `resource` of its accounts and records.
    pub name: String,
    /// The adapter and its settings.
    pub source: SourceConfig,
    /// Rule scripts by role, file names in the rules folder.
    #[serde(default)]
    pub rules: RulesConfig,
    /// Rhai expression naming a new identity (default: the account key).
    #[serde(default)]
    pub naming: Option<String>,
    /// Create an identity when nothing matches (default true; `on_unmatched` says the
    /// same in another way, see [`ResourceConfig::creates_unmatched`]).
    #[serde(default)]
    pub create_unmatched: Option<bool>,
    /// Who settles a disputed event (several candidates): the resolve rule (default) or
    /// an operator through a work item.
    #[serde(default)]
    pub on_disputed: OnDisputedConfig,
    /// What an unmatched event does: create an identity, the resolve rule, or a work item
    /// (default: `create`, or `resolve` with `create_unmatched: false`).
    #[serde(default)]
    pub on_unmatched: Option<OnUnmatchedConfig>,
    /// Copy every account attribute into the identity; rules also get `global`.
    #[serde(default)]
    pub populate_global: bool,
    /// What an account delete does to its owner (a word, or a map with a grace period).
    #[serde(default)]
    pub delete_action: DeleteActionSetting,
    /// What a failed event does to its batch.
    #[serde(default)]
    pub on_error: OnErrorConfig,
    /// A cron schedule (`*/5 * * * *`, UTC) for `idsync run` instead of the interval; file
    /// changes then do not wake the resource early.
    #[serde(default)]
    pub cron: Option<String>,
    /// The input form: identity attributes filled from the account.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    /// A scheduled reconcile (`idsync run` re-decides every account at these times).
    #[serde(default)]
    pub reconcile: Option<ReconcileConfig>,
    /// Date-driven state for the identities this resource checks in (instead of the
    /// top-level `lifecycle`).
    #[serde(default)]
    pub lifecycle: Option<LifecycleConfig>,
    /// Fuzzy correlation candidates (module `correlation`).
    #[serde(default)]
    pub fuzzy: Option<crate::correlation::FuzzyConfig>,
}

/// `reconcile:` of a resource.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// When `idsync run` reconciles the resource: a cron expression, UTC (`0 3 * * *`).
    pub cron: String,
}

impl ResourceConfig {
    /// Whether an unmatched account creates an identity: `on_unmatched: create`, or
    /// `create_unmatched` (default true) when `on_unmatched` is not given.
    pub fn creates_unmatched(&self) -> bool {
        match self.on_unmatched {
            Some(OnUnmatchedConfig::Create) => true,
            Some(_) => false,
            None => self.create_unmatched.unwrap_or(true),
        }
    }
}

/// `on_disputed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisputedConfig {
    /// The resolve rule; without one the event fails.
    #[default]
    Resolve,
    /// A work item for an operator.
    WorkItem,
}

/// `on_unmatched`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnmatchedConfig {
    /// Create an identity (naming, mappings) and link the account.
    Create,
    /// The resolve rule; without one the event fails.
    Resolve,
    /// A work item for an operator.
    WorkItem,
}

/// The adapter of a resource, chosen by `type`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant)] // built once per config load; boxing buys nothing
pub enum SourceConfig {
    /// A CSV flat file.
    Flatfile(FlatFileConfig),
    /// An LDAP directory (RFC 4533 content sync or timestamp polling).
    Ldap(Box<LdapConfig>),
}

/// Rule scripts by role.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Filter rule.
    pub filter: Option<String>,
    /// Process rule (overrides everything else).
    pub process: Option<String>,
    /// Delete rule.
    pub delete: Option<String>,
    /// Correlation rule.
    pub correlation: Option<String>,
    /// Confirmation rule.
    pub confirmation: Option<String>,
    /// Resolve process rule.
    pub resolve: Option<String>,
}

impl RulesConfig {
    /// `(role, file)` for each configured rule.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        [
            ("filter", &self.filter),
            ("process", &self.process),
            ("delete", &self.delete),
            ("correlation", &self.correlation),
            ("confirmation", &self.confirmation),
            ("resolve", &self.resolve),
        ]
        .into_iter()
        .filter_map(|(role, f)| f.as_deref().map(|f| (role, f)))
        .collect()
    }
}

/// `delete_action` (its word, or the map's `action`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteActionConfig {
    /// Unlink the account.
    #[default]
    Unlink,
    /// Unlink and disable the identity.
    Disable,
    /// Delete the identity.
    Delete,
}

/// `delete_action`: a word (`unlink`, `disable`, `delete`), or a map that adds a grace
/// period: `{ action: disable, then: delete, after: 30d }`.
#[derive(Clone, Debug, Default)]
pub struct DeleteActionSetting {
    /// What happens when the account is deleted.
    pub action: DeleteActionConfig,
    /// What happens at the end of the grace period (`then: delete`).
    pub then: Option<ThenActionConfig>,
    /// The grace period, as an age (`30d`); checked by validation.
    pub after: Option<String>,
}

/// `delete_action.then`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThenActionConfig {
    /// Delete the identity.
    Delete,
}

/// The map form of `delete_action`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StagedDeleteAction {
    action: DeleteActionConfig,
    #[serde(default)]
    then: Option<ThenActionConfig>,
    #[serde(default)]
    after: Option<String>,
}

impl<'de> Deserialize<'de> for DeleteActionSetting {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        use serde::de::{self, IntoDeserializer, MapAccess, Visitor};
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = DeleteActionSetting;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "unlink, disable or delete, or a map like { action: disable, then: delete, after: 30d }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let action = DeleteActionConfig::deserialize(v.into_deserializer())?;
                Ok(DeleteActionSetting {
                    action,
                    then: None,
                    after: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let staged =
                    StagedDeleteAction::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(DeleteActionSetting {
                    action: staged.action,
                    then: staged.then,
                    after: staged.after,
                })
            }
        }
        de.deserialize_any(Either)
    }
}

/// `on_error`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnErrorConfig {
    /// Record the failed event and go on.
    #[default]
    Continue,
    /// Roll back the batch and stop the resource.
    Halt,
}

/// One mapping: `to` an identity attribute, `from` an account attribute or an `expr`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Identity attribute.
    pub to: String,
    /// Account attribute copied as is.
    pub from: Option<String>,
    /// Rhai expression.
    pub expr: Option<String>,
    /// How strongly it gives its value (default `strong`).
    #[serde(default)]
    pub strength: StrengthConfig,
}

/// `strength` of a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrengthConfig {
    /// Always (subject to `authority` precedence).
    #[default]
    Strong,
    /// Only when no other source gives a value.
    Weak,
    /// Only when the event creates the identity.
    Initial,
}

/// A loaded config: the parsed file and where it is.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The config file as given.
    pub file: PathBuf,
    /// Its folder, against which relative paths resolve.
    pub base: PathBuf,
    /// The content.
    pub config: Config,
}

/// Problems found in a config, each a full line for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The agent lock beside the repository (`<repository>.lock`).
pub const LOCK_SUFFIX: &str = ".lock";
/// The status file beside the repository.
pub const STATUS_SUFFIX: &str = ".status.json";
/// The in-flight file (poison-event protection) beside the repository.
pub const INFLIGHT_SUFFIX: &str = ".inflight";

/// Every file written beside the repository: SQLite's log, index and rollback journal, and
/// idsync's lock, status and in-flight files.
pub const BESIDE_REPOSITORY: &[&str] = &[
    "-wal",
    "-shm",
    "-journal",
    LOCK_SUFFIX,
    STATUS_SUFFIX,
    INFLIGHT_SUFFIX,
];

/// `repository` with `suffix` appended to its file name (`idsync.db` → `idsync.db.lock`).
pub fn beside(repository: &Path, suffix: &str) -> PathBuf {
    let mut name = repository.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Loaded {
    /// Reads and parses `file`; a parse error is reported as `file:line:col: message`.
    pub fn read(file: &Path) -> Result<Loaded, Problems> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Problems(vec![format!("{}: cannot read config: {e}", file.display())]))?;
        let config = parse(&text).map_err(|e| Problems(vec![located(file, &e)]))?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Loaded {
            file: file.to_path_buf(),
            base,
            config,
        })
    }

    /// `path` resolved against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        // `rules_dir: .` resolves to the config folder itself, not `folder/.`.
        let relative: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        let joined = self.base.join(relative);
        if joined.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            joined
        }
    }

    /// The repository file (with `url`: the base name of the agent's own files beside the
    /// config, see [`RepositoryConfig::path`]).
    pub fn repository_path(&self) -> PathBuf {
        self.resolve(&self.config.repository.path)
    }

    /// The configured resources `only` names (all of them when `only` is empty), in
    /// config order.
    pub fn selected_resources(&self, only: &[String]) -> Vec<String> {
        self.config
            .resources
            .iter()
            .map(|r| r.name.clone())
            .filter(|n| only.is_empty() || only.contains(n))
            .collect()
    }

    /// The repository as messages name it: the file, or the URL without its password.
    pub fn repository_shown(&self) -> String {
        match &self.config.repository.url {
            Some(url) => idsync_repo::redact_url(url),
            None => self.repository_path().display().to_string(),
        }
    }

    /// Whether the repository exists yet (a PostgreSQL database is assumed to: it is set
    /// up when first opened).
    pub fn repository_exists(&self) -> bool {
        self.config.repository.url.is_some() || self.repository_path().exists()
    }

    /// The repository file and the files beside it that idsync and SQLite write
    /// ([`BESIDE_REPOSITORY`]). A feed must never read one (reading and closing the
    /// repository would drop SQLite's locks).
    pub fn repository_files(&self) -> Vec<PathBuf> {
        let db = self.repository_path();
        let mut files: Vec<PathBuf> = BESIDE_REPOSITORY.iter().map(|s| beside(&db, s)).collect();
        files.insert(0, db);
        files
    }

    /// The rules folder.
    pub fn rules_dir(&self) -> PathBuf {
        self.resolve(&self.config.rules_dir)
    }

    /// Checks what parsing cannot: unique names, mappings, adapter settings. Rule files are
    /// checked when they are compiled.
    pub fn validate(&self) -> Vec<String> {
        let f = self.file.display();
        let mut out = Vec::new();
        let mut names = HashSet::new();
        if self.config.resources.is_empty() {
            out.push(format!("{f}: resources: no resource is configured"));
        }
        out.extend(
            self.config
                .repository
                .problems()
                .into_iter()
                .map(|p| format!("{f}: repository.{p}")),
        );
        for (i, r) in self.config.resources.iter().enumerate() {
            let at = format!("{f}: resources[{i}]");
            if r.name.trim().is_empty() {
                out.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(r.name.clone()) {
                out.push(format!(
                    "{at}.name: resource name '{}' is used twice",
                    r.name
                ));
            }
            match &r.source {
                SourceConfig::Flatfile(ff) => {
                    for p in ff.validate() {
                        out.push(format!("{at}.source.{p}"));
                    }
                    let mut resolved = ff.clone();
                    resolved.path = self.resolve(&ff.path);
                    if let Some(file) = self
                        .repository_files()
                        .into_iter()
                        .find(|f| idsync_flatfile::might_read(&resolved, f))
                    {
                        out.push(format!(
                            "{at}.source.path: the feed would read {}, a file of the repository; \
                             give the feed a path (or a pattern) of its own",
                            file.display()
                        ));
                    }
                }
                SourceConfig::Ldap(l) => {
                    for p in l.validate() {
                        out.push(format!("{at}.source.{p}"));
                    }
                }
            }
            if r.rules.process.is_some() && (r.naming.is_some() || !r.mappings.is_empty()) {
                out.push(format!(
                    "{at}: naming and mappings do not apply with a process rule (it sets attributes itself); remove them"
                ));
            }
            if r.rules.process.is_some()
                && (r.on_disputed != OnDisputedConfig::Resolve || r.on_unmatched.is_some())
            {
                out.push(format!(
                    "{at}: on_disputed and on_unmatched do not apply with a process rule (it decides every event itself; it may call ctx.work_item); remove them"
                ));
            }
            match (r.on_unmatched, r.create_unmatched) {
                (Some(OnUnmatchedConfig::Create), Some(false)) => out.push(format!(
                    "{at}.on_unmatched: 'create' contradicts create_unmatched: false; keep one of them"
                )),
                (Some(u @ (OnUnmatchedConfig::Resolve | OnUnmatchedConfig::WorkItem)), Some(true)) => {
                    out.push(format!(
                        "{at}.on_unmatched: '{}' contradicts create_unmatched: true; keep one of them",
                        if u == OnUnmatchedConfig::Resolve { "resolve" } else { "work_item" }
                    ))
                }
                _ => {}
            }
            if r.rules.process.is_some() {
                for (role, _) in r.rules.entries() {
                    if role != "process" && role != "filter" {
                        out.push(format!(
                            "{at}.rules.{role}: a process rule overrides every other rule but the filter; remove one of them"
                        ));
                    }
                }
            }
            if let Some(c) = &r.cron
                && let Err(e) = crate::schedule::Schedule::parse(c)
            {
                out.push(format!("{at}.cron: '{c}' is not a cron expression: {e}"));
            }
            if let Some(rc) = &r.reconcile
                && let Err(e) = crate::schedule::Schedule::parse(&rc.cron)
            {
                out.push(format!(
                    "{at}.reconcile.cron: '{}' is not a cron expression: {e}",
                    rc.cron
                ));
            }
            out.extend(crate::correlation::fuzzy_problems(&at, r));
            for (j, m) in r.mappings.iter().enumerate() {
                match (&m.from, &m.expr) {
                    (Some(_), Some(_)) => out.push(format!(
                        "{at}.mappings[{j}]: give either `from` or `expr`, not both"
                    )),
                    (None, None) => out.push(format!(
                        "{at}.mappings[{j}]: give `from` (an account attribute) or `expr` (a Rhai expression)"
                    )),
                    _ => {}
                }
                if m.to.trim().is_empty() {
                    out.push(format!("{at}.mappings[{j}].to: must not be empty"));
                }
            }
        }
        out.extend(crate::correlation::correlation_problems(
            &f.to_string(),
            &self.config.correlation,
        ));
        let listen = &self.config.status.listen;
        if listen != "off" && listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!(
                "{f}: status.listen: '{listen}' is not HOST:PORT (e.g. 127.0.0.1:9464) or off"
            ));
        }
        if self.config.poll_interval_secs == 0 {
            out.push(format!("{f}: poll_interval_secs: must be at least 1"));
        }
        for (key, value) in self.config.retention.entries() {
            if let Err(e) = crate::when::parse_age(value) {
                out.push(format!("{f}: retention.{key}: {e}"));
            }
        }
        out.extend(crate::authority::problems(self));
        out.extend(self.lifecycle_problems());
        out
    }

    /// The problems of `delete_action`'s grace period and of every `lifecycle`.
    fn lifecycle_problems(&self) -> Vec<String> {
        let f = self.file.display();
        let mut out = Vec::new();
        let dates = |at: &str, lc: &LifecycleConfig, out: &mut Vec<String>| {
            if lc.valid_from.is_none() && lc.valid_to.is_none() {
                out.push(format!(
                    "{at}: name valid_from, valid_to or both (identity attributes holding dates)"
                ));
            }
            for (key, attr) in [("valid_from", &lc.valid_from), ("valid_to", &lc.valid_to)] {
                if attr.as_ref().is_some_and(|a| a.trim().is_empty()) {
                    out.push(format!("{at}.{key}: must not be empty"));
                }
            }
        };
        if let Some(lc) = &self.config.lifecycle {
            dates(&format!("{f}: lifecycle"), lc, &mut out);
        }
        for (i, r) in self.config.resources.iter().enumerate() {
            let at = format!("{f}: resources[{i}]");
            if let Some(lc) = &r.lifecycle {
                dates(&format!("{at}.lifecycle"), lc, &mut out);
                if r.rules.process.is_some() {
                    out.push(format!(
                        "{at}.lifecycle: does not apply with a process rule (it sets the state itself); remove it"
                    ));
                }
            }
            let da = &r.delete_action;
            match (&da.then, &da.after) {
                (Some(_), None) => out.push(format!(
                    "{at}.delete_action.after: required with then: delete (e.g. after: 30d)"
                )),
                (None, Some(_)) => out.push(format!(
                    "{at}.delete_action.after: a grace period needs then: delete"
                )),
                _ => {}
            }
            if da.then.is_some() && da.action != DeleteActionConfig::Disable {
                out.push(format!(
                    "{at}.delete_action.then: needs action: disable (the identity stays disabled during the grace period)"
                ));
            }
            if let Some(after) = &da.after
                && let Err(e) = crate::when::parse_age(after)
            {
                out.push(format!("{at}.delete_action.after: {e}"));
            }
        }
        out
    }
}

fn parse(text: &str) -> Result<Config, serde_yaml::Error> {
    serde_yaml::from_str(text)
}

/// `file:line:col: message` for a YAML error (the location moved to the front).
fn located(file: &Path, e: &serde_yaml::Error) -> String {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    match e.location() {
        Some(l) => format!("{}:{}:{}: {msg}", file.display(), l.line(), l.column()),
        None => format!("{}: {msg}", file.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Loaded, Problems> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idsync.yaml");
        std::fs::write(&file, text).unwrap();
        Loaded::read(&file)
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = load("resources:\n  - name: hr\n    sorce: {}\n").unwrap_err();
        let line = &err.0[0];
        assert!(line.contains("idsync.yaml:3:5: "), "{line}");
        assert!(line.contains("unknown field `sorce`"), "{line}");
    }

    #[test]
    fn unknown_flatfile_key_is_refused() {
        let err = load(
            "resources:\n  - name: hr\n    source:\n      type: flatfile\n      path: a.csv\n      key: id\n      paht: x\n",
        )
        .unwrap_err();
        assert!(err.0[0].contains("paht"), "{err}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let l = load(
            "resources:\n  - name: hr\n    source: { type: flatfile, path: a.csv, key: [] }\n    mappings:\n      - { to: mail }\n  - name: hr\n    source: { type: flatfile, path: b.csv, key: id }\n",
        )
        .unwrap();
        let problems = l.validate();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("resources[0].source.key"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("resources[0].mappings[0]"))
        );
        assert!(problems.iter().any(|p| p.contains("resources[1].name")));
    }

    #[test]
    fn a_feed_that_would_read_a_repository_file_is_refused() {
        let refused = |source: &str| {
            let l = load(&format!(
                "repository: {{ path: data/idsync.db }}\nresources:\n  - name: hr\n    source: {source}\n"
            ))
            .unwrap();
            l.validate()
                .iter()
                .any(|p| p.contains("resources[0].source.path") && p.contains("repository"))
        };
        assert!(refused("{ type: flatfile, path: data/idsync.db, key: id }"));
        assert!(refused(
            "{ type: flatfile, path: data/idsync.db-wal, key: id }"
        ));
        assert!(refused("{ type: flatfile, path: data, key: id }"));
        assert!(refused(
            "{ type: flatfile, path: data, pattern: 'idsync*', key: id }"
        ));
        assert!(!refused(
            "{ type: flatfile, path: data, pattern: 'hr-*.csv', key: id }"
        ));
        assert!(!refused("{ type: flatfile, path: feeds/hr.csv, key: id }"));
    }
}
