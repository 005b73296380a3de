//! Wiring: from a loaded config to the repository, the compiled rules and policies, and
//! the adapters. Every rule file in the rules folder is compiled once here, and every
//! problem (config or rule) is collected before anything runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use idsync_core::{Adapter, AdapterError};
use idsync_engine::{
    DeleteAction, Engine, Escalation, Mapping, MappingSource, OnError, Policy, Strength,
};
use idsync_flatfile::FlatFileAdapter;
use idsync_ldap::LdapAdapter;
use idsync_notify::{Dispatcher, PolicyNotifier, setup as nsetup};
use idsync_repo::Repo;
use idsync_rules::{RuleEngine, Script};

use crate::config::{
    DeleteActionConfig, Loaded, OnDisputedConfig, OnErrorConfig, OnUnmatchedConfig, Problems,
    ResourceConfig, SourceConfig, StrengthConfig,
};

/// Compiles every `*.rhai` file of the rules folder: file name → script, plus problems.
pub fn compile_rules_dir(
    rules: &RuleEngine,
    dir: &Path,
    shown_as: &Path,
) -> (BTreeMap<String, Script>, Vec<String>) {
    let mut scripts = BTreeMap::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!(
                "{}: rules_dir: cannot read the rules folder: {e}",
                shown_as.display()
            ));
            return (scripts, problems);
        }
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai") && p.is_file())
        .collect();
    files.sort();
    for path in files {
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let label = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(src) => match rules.compile(&label, &src) {
                Ok(s) => {
                    scripts.insert(name, s);
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(format!("{label}: cannot read: {e}")),
        }
    }
    (scripts, problems)
}

/// Builds the policy of one resource from its config and the compiled rules.
fn policy(
    loaded: &Loaded,
    index: usize,
    r: &ResourceConfig,
    rules: &RuleEngine,
    scripts: &BTreeMap<String, Script>,
    problems: &mut Vec<String>,
) -> Policy {
    let file = loaded.file.display();
    let at = format!("{file}: resources[{index}]");
    let mut p = Policy::new(&r.name);
    let rules_dir = loaded.rules_dir();
    for (role, name) in r.rules.entries() {
        let script = match scripts.get(name) {
            Some(s) => Some(s.clone()),
            None => {
                let path = rules_dir.join(name);
                let top_level_rhai = Path::new(name).components().count() == 1
                    && Path::new(name).extension().is_some_and(|x| x == "rhai");
                if !path.is_file() {
                    problems.push(format!(
                        "{at}.rules.{role}: {} does not exist",
                        path.display()
                    ));
                } else if !top_level_rhai {
                    problems.push(format!(
                        "{at}.rules.{role}: {name}: rule files are *.rhai files directly in the rules folder {}",
                        rules_dir.display()
                    ));
                }
                // A top-level .rhai file that did not compile is reported by the compile step.
                None
            }
        };
        match role {
            "filter" => p.filter = script,
            "process" => p.process = script,
            "delete" => p.delete = script,
            "correlation" => p.correlation = script,
            "confirmation" => p.confirmation = script,
            _ => p.resolve = script,
        }
    }
    if let Some(expr) = &r.naming {
        match rules.compile(&format!("{}:resources[{index}].naming", file), expr) {
            Ok(s) => p.naming = Some(s),
            Err(e) => problems.push(e.to_string()),
        }
    }
    p.create_unmatched = r.creates_unmatched();
    if r.on_disputed == OnDisputedConfig::WorkItem {
        p.on_disputed = Escalation::WorkItem;
    }
    if r.on_unmatched == Some(OnUnmatchedConfig::WorkItem) {
        p.on_unmatched = Escalation::WorkItem;
    }
    p.populate_global = r.populate_global;
    p.fuzzy = crate::correlation::fuzzy(r);
    p.delete_action = match r.delete_action.action {
        DeleteActionConfig::Unlink => DeleteAction::Unlink,
        DeleteActionConfig::Disable => DeleteAction::Disable,
        DeleteActionConfig::Delete => DeleteAction::Delete,
    };
    // The grace period (`then: delete, after`) and the dates; validation reports what is
    // wrong with them.
    if r.delete_action.then.is_some() {
        p.delete_after = r
            .delete_action
            .after
            .as_deref()
            .and_then(|a| crate::when::parse_age(a).ok());
    }
    if r.rules.process.is_none() {
        p.lifecycle = r
            .lifecycle
            .as_ref()
            .or(loaded.config.lifecycle.as_ref())
            .map(|lc| idsync_engine::Lifecycle {
                valid_from: lc.valid_from.clone().filter(|a| !a.trim().is_empty()),
                valid_to: lc.valid_to.clone().filter(|a| !a.trim().is_empty()),
            });
    }
    p.on_error = match r.on_error {
        OnErrorConfig::Continue => OnError::Continue,
        OnErrorConfig::Halt => OnError::Halt,
    };
    for (j, m) in r.mappings.iter().enumerate() {
        let source = match (&m.from, &m.expr) {
            (Some(from), None) => MappingSource::Attribute(from.clone()),
            (None, Some(expr)) => {
                let label = format!("{file}:resources[{index}].mappings[{j}]({})", m.to);
                match rules.compile(&label, expr) {
                    Ok(s) => MappingSource::Expr(s),
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                }
            }
            _ => continue, // reported by validation
        };
        p.mappings.push(Mapping {
            attribute: m.to.clone(),
            source,
            strength: match m.strength {
                StrengthConfig::Strong => Strength::Strong,
                StrengthConfig::Weak => Strength::Weak,
                StrengthConfig::Initial => Strength::Initial,
            },
        });
    }
    p
}

/// Everything `idsync` needs to run: compiled policies by resource, in config order.
pub struct Setup {
    /// The loaded config.
    pub loaded: Loaded,
    /// The engine (rules + repository).
    pub engine: Engine,
    /// Policies in config order.
    pub policies: Vec<Policy>,
    /// The outbox dispatcher, when `notifications:` is configured.
    pub dispatcher: Option<idsync_notify::Dispatcher>,
}

/// Validates the config and compiles every rule; all problems at once.
pub fn compile_all(loaded: &Loaded, rules: &RuleEngine) -> Result<Vec<Policy>, Problems> {
    let mut problems = loaded.validate();
    problems.extend(limit_problems(loaded));
    problems.extend(reconcile_problems(loaded));
    let (scripts, rule_problems) = compile_rules_dir(rules, &loaded.rules_dir(), &loaded.file);
    problems.extend(rule_problems);
    let policies: Vec<Policy> = loaded
        .config
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| policy(loaded, i, r, rules, &scripts, &mut problems))
        .collect();
    if let Err(p) = notifications(loaded) {
        problems.extend(p);
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(Problems(problems))
    }
}

/// The `limits` that contradict each other, named with the config file.
fn limit_problems(loaded: &Loaded) -> Vec<String> {
    let file = loaded.file.display();
    loaded
        .config
        .limits
        .to_limits()
        .problems()
        .into_iter()
        .map(|p| format!("{file}: {p}"))
        .collect()
}

impl Setup {
    /// Loads everything; the repository is opened (and created) only if the config is valid.
    pub fn new(loaded: Loaded) -> anyhow::Result<Setup> {
        let limits = loaded.config.limits.to_limits();
        // Compile with a throw-away engine first so a bad config never creates a database.
        let probe = RuleEngine::new(&limits);
        compile_all(&loaded, &probe)?;
        let repo = open_repo(&loaded)?;
        Self::with_repo(loaded, repo)
    }

    /// Everything over an empty repository in memory (a preview before the first run: it
    /// must not create the file).
    pub fn in_memory(loaded: Loaded) -> anyhow::Result<Setup> {
        let probe = RuleEngine::new(&loaded.config.limits.to_limits());
        compile_all(&loaded, &probe)?;
        Self::with_repo(loaded, Arc::new(Repo::open_in_memory()?))
    }

    /// Everything over an open repository: the engine and the compiled rules are this
    /// thread's own (a rule engine stays on the thread that built it), the repository is
    /// shared.
    pub fn with_repo(loaded: Loaded, repo: Arc<Repo>) -> anyhow::Result<Setup> {
        let limits = loaded.config.limits.to_limits();
        repo.declare_normalisations(crate::correlation::normalisations(&loaded.config))?;
        let mut engine = Engine::new(repo.clone(), &limits);
        let policies = compile_all(&loaded, engine.rules())?;
        if let Some(authority) = crate::authority::build(&loaded, &policies) {
            engine.set_authority(authority);
        }
        let dispatcher = match notifications(&loaded).map_err(Problems)? {
            Some((notifier, dispatcher)) => {
                engine.set_notifier(Box::new(notifier));
                Some(dispatcher(repo))
            }
            None => None,
        };
        Ok(Setup {
            loaded,
            engine,
            policies,
            dispatcher,
        })
    }

    /// For a resource with a `cron` schedule: the time until its next occurrence.
    pub fn until_cron(&self, index: usize) -> Option<std::time::Duration> {
        let expr = self.loaded.config.resources[index].cron.as_deref()?;
        crate::schedule::Schedule::parse(expr).ok()?.wait()
    }

    /// The reconcile schedule of the resource at `index` (`reconcile: { cron }`), if any.
    pub fn reconcile_schedule(&self, index: usize) -> Option<crate::schedule::Schedule> {
        let r = self.loaded.config.resources[index].reconcile.as_ref()?;
        crate::schedule::Schedule::parse(&r.cron).ok()
    }

    /// The policy of `resource`.
    pub fn policy(&self, resource: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.resource == resource)
    }

    /// A fresh adapter for the resource at `index`.
    pub fn adapter(&self, index: usize) -> Box<dyn Adapter> {
        adapter_for(&self.loaded, index)
    }

    /// How long `idsync run` waits between passes of the resource at `index`: its own
    /// interval when it has one (an LDAP persist stream: none, it waits on the server),
    /// else `poll_interval_secs`.
    pub fn interval(&self, index: usize) -> std::time::Duration {
        if let Some(wait) = self.until_cron(index) {
            return wait;
        }
        let default = self.loaded.config.poll_interval_secs;
        let secs = match &self.loaded.config.resources[index].source {
            SourceConfig::Ldap(l) => match (l.interval_secs, l.mode) {
                (Some(s), _) => s,
                (None, idsync_ldap::Mode::Persist) => 0,
                (None, _) => default,
            },
            SourceConfig::Flatfile(_) => default,
        };
        std::time::Duration::from_secs(secs)
    }
}

/// A fresh adapter for the resource at `index` of `loaded` (connects to nothing yet).
pub fn adapter_for(loaded: &Loaded, index: usize) -> Box<dyn Adapter> {
    let r = &loaded.config.resources[index];
    match &r.source {
        SourceConfig::Flatfile(ff) => {
            let mut ff = ff.clone();
            ff.path = loaded.resolve(&ff.path);
            ff.archive_dir = ff.archive_dir.map(|p| loaded.resolve(&p));
            Box::new(FlatFileAdapter::new(&r.name, ff))
        }
        SourceConfig::Ldap(l) => {
            let mut l = (**l).clone();
            l.ca_file = l.ca_file.map(|p| loaded.resolve(&p));
            l.bind_password_file = l.bind_password_file.map(|p| loaded.resolve(&p));
            Box::new(LdapAdapter::new(&r.name, l))
        }
    }
}

/// A resource with `reconcile:` whose adapter cannot reconcile, named with the config file
/// and key (the adapter says so when asked to begin one; nothing is read).
fn reconcile_problems(loaded: &Loaded) -> Vec<String> {
    let file = loaded.file.display();
    loaded
        .config
        .resources
        .iter()
        .enumerate()
        .filter(|(_, r)| r.reconcile.is_some())
        .filter_map(|(i, r)| {
            let refused = adapter_for(loaded, i).begin_reconcile(None).err()?;
            let why = match refused {
                AdapterError::Permanent { message, .. }
                | AdapterError::Transient { message, .. } => message,
                other => other.to_string(),
            };
            Some(format!(
                "{file}: resources[{i}] ({}).reconcile: {why}",
                r.name
            ))
        })
        .collect()
}

/// Opens the repository named in the config.
pub fn open_repo(loaded: &Loaded) -> anyhow::Result<Arc<Repo>> {
    let shown = loaded.repository_shown();
    let failed = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("{}: repository {shown}: {e}", loaded.file.display())
    };
    let cfg = &loaded.config.repository;
    let repo = match &cfg.url {
        None => Repo::open(&loaded.repository_path()).map_err(|e| failed(&e))?,
        Some(url) => {
            let options = postgres_options(loaded).map_err(|e| failed(&e))?;
            Repo::open_postgres(url, &options).map_err(|e| failed(&e))?
        }
    };
    Ok(Arc::new(repo))
}

/// How to reach a PostgreSQL repository besides its URL: password and CA file.
pub fn postgres_options(loaded: &Loaded) -> anyhow::Result<idsync_repo::PgOptions> {
    Ok(idsync_repo::PgOptions {
        password: repository_password(loaded)?,
        ca_file: loaded
            .config
            .repository
            .ca_file
            .as_ref()
            .map(|p| loaded.resolve(p)),
        connect_timeout: None,
        // A batch open this long without a statement, or a reply unread this long, belongs
        // to a paused agent whose leases have expired meanwhile (module `leases`).
        unresponsive_timeout: Some(std::time::Duration::from_secs(
            loaded.config.repository.lease_secs,
        )),
    })
}

/// The PostgreSQL password from `password_env` or `password_file` (its first line), if
/// either is set; never part of a message.
fn repository_password(loaded: &Loaded) -> anyhow::Result<Option<String>> {
    let cfg = &loaded.config.repository;
    if let Some(var) = &cfg.password_env {
        return match std::env::var(var) {
            Ok(v) => Ok(Some(v)),
            Err(_) => anyhow::bail!("repository.password_env: the variable {var} is not set"),
        };
    }
    if let Some(file) = &cfg.password_file {
        let path = loaded.resolve(file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "repository.password_file: cannot read {}: {e}",
                path.display()
            )
        })?;
        return Ok(Some(text.lines().next().unwrap_or_default().to_owned()));
    }
    Ok(None)
}

/// Builds a dispatcher once the repository is open.
pub type MakeDispatcher = Box<dyn FnOnce(Arc<Repo>) -> Dispatcher>;

/// Compiles the notifications config: `None` when there is none; problems name the file
/// and key.
pub fn notifications(
    loaded: &Loaded,
) -> Result<Option<(PolicyNotifier, MakeDispatcher)>, Vec<String>> {
    let Some(cfg) = &loaded.config.notifications else {
        return Ok(None);
    };
    let f = loaded.file.display().to_string();
    let located = |v: Vec<String>| {
        v.into_iter()
            .map(|p| format!("{f}: {p}"))
            .collect::<Vec<_>>()
    };
    let limits = loaded.config.limits.to_limits();
    let mut problems = Vec::new();
    let notifier = PolicyNotifier::compile(cfg, &limits).map_err(|p| problems.extend(located(p)));
    let transport =
        nsetup::transport(cfg, &|p| loaded.resolve(p)).map_err(|p| problems.extend(located(p)));
    let settings = nsetup::settings(cfg).map_err(|p| problems.extend(located(p)));
    match (notifier, transport, settings) {
        (Ok(n), Ok(t), Ok(s)) => Ok(Some((
            n,
            Box::new(move |repo| Dispatcher::new(repo, t, s)) as MakeDispatcher,
        ))),
        _ => Err(problems),
    }
}
