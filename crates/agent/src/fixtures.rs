//! Rule fixtures and `idsync test-rules`: given repository identities and one change event,
//! expect the situation, the action, the chosen identity, attribute values. Each fixture
//! runs the configured rules against a fresh in-memory repository (real SQLite), so a
//! fixture never touches the real one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use idsync_core::{AttrMap, ChangeBatch, ChangeEvent, Op};
use idsync_engine::Engine;
use idsync_repo::{DecisionFilter, Repo};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{Loaded, Problems};
use crate::exit::Exit;
use crate::explain::steps;
use crate::setup::compile_all;

/// One fixture file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// What the case is about (default: the file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The resource whose rules decide the event.
    pub resource: String,
    /// The repository before the event.
    #[serde(default)]
    pub identities: Vec<FixtureIdentity>,
    /// The change event.
    pub event: FixtureEvent,
    /// What must come out.
    pub expect: Expect,
}

/// An identity present before the event.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureIdentity {
    /// Name.
    pub name: String,
    /// Disabled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Attributes.
    #[serde(default)]
    pub attrs: AttrMap,
    /// Linked accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<FixtureAccount>,
}

/// A linked account of a fixture identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureAccount {
    /// Resource.
    pub resource: String,
    /// Key.
    pub key: String,
    /// Last seen attributes.
    #[serde(default, skip_serializing_if = "AttrMap::is_empty")]
    pub attrs: AttrMap,
}

/// The event of a fixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureEvent {
    /// create, update, delete, upsert.
    pub op: Op,
    /// Account key.
    pub key: String,
    /// Account attributes.
    #[serde(default)]
    pub attrs: AttrMap,
    /// Previous attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AttrMap>,
}

/// Expectations; every field optional, each one checked when given.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Situation name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub situation: Option<String>,
    /// Action name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The identity acted on; `identity: null` expects none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub identity: Option<Option<String>>,
    /// Candidates found by correlation, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<String>>,
    /// Candidates kept by confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Vec<String>>,
    /// Attribute values of the identity afterwards (only those named are compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<AttrMap>,
    /// Whether the identity is disabled afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Text the error must contain (the event must fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_contains: Option<String>,
    /// The notification policies that queued a message, in order (`[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Vec<String>>,
}

/// Distinguishes `identity: null` (Some(None)) from an absent key (None).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// The fixture files: the given paths (files or folders), else `<rules_dir>/tests`.
fn fixture_files(loaded: &Loaded, paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let roots = if paths.is_empty() {
        vec![loaded.rules_dir().join("tests")]
    } else {
        paths.to_vec()
    };
    let mut files = Vec::new();
    for root in roots {
        if root.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
                .with_context(|| format!("reading {}", root.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            files.extend(found);
        } else if root.is_file() {
            files.push(root);
        } else {
            anyhow::bail!("{}: no such fixture file or folder", root.display());
        }
    }
    Ok(files)
}

/// `idsync test-rules [PATHS]`.
pub fn test_rules(loaded: &Loaded, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let files = fixture_files(loaded, paths)?;
    if files.is_empty() {
        eprintln!(
            "no fixtures found (looked in {})",
            loaded.rules_dir().join("tests").display()
        );
        return Ok(ExitCode::from(Exit::Failed));
    }
    let mut out = crate::printable::stdout();
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        match run_fixture(loaded, file) {
            Ok(Outcome::Pass(name)) => {
                passed += 1;
                writeln!(out, "ok    {} ({name})", file.display())?;
            }
            Ok(Outcome::Fail(name, diff)) => {
                failed += 1;
                writeln!(out, "FAIL  {} ({name})", file.display())?;
                write!(out, "{diff}")?;
            }
            Ok(Outcome::Broken(p)) => {
                writeln!(out, "error {}", file.display())?;
                for line in p.0 {
                    writeln!(out, "  {line}")?;
                }
                return Ok(ExitCode::from(Exit::Config));
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "error {}: {e:#}", file.display())?;
            }
        }
    }
    writeln!(out, "{passed} passed, {failed} failed")?;
    Ok(if failed > 0 {
        ExitCode::from(Exit::Failed)
    } else {
        ExitCode::SUCCESS
    })
}

enum Outcome {
    Pass(String),
    Fail(String, String),
    Broken(Problems),
}

fn run_fixture(loaded: &Loaded, file: &Path) -> anyhow::Result<Outcome> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let fx: Fixture = serde_yaml::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!("{}{at}: {e}", file.display())
    })?;
    let name = fx.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let repo = Arc::new(Repo::open_in_memory()?);
    repo.declare_normalisations(crate::correlation::normalisations(&loaded.config))?;
    let mut engine = Engine::new(repo.clone(), &loaded.config.limits.to_limits());
    match crate::setup::notifications(loaded) {
        Ok(Some((notifier, _))) => engine.set_notifier(Box::new(notifier)),
        Ok(None) => {}
        Err(p) => return Ok(Outcome::Broken(Problems(p))),
    }
    let policies = match compile_all(loaded, engine.rules()) {
        Ok(p) => p,
        Err(p) => return Ok(Outcome::Broken(p)),
    };
    if let Some(authority) = crate::authority::build(loaded, &policies) {
        engine.set_authority(authority);
    }
    let Some(policy) = policies.iter().find(|p| p.resource == fx.resource) else {
        anyhow::bail!(
            "resource '{}' is not in {}",
            fx.resource,
            loaded.file.display()
        );
    };
    repo.begin()?;
    for id in &fx.identities {
        let created = repo.create_identity(&id.name, &id.attrs)?;
        if id.disabled {
            repo.checkin(&id.name, created.version, &id.attrs, true)?;
        }
        for a in &id.accounts {
            repo.link(&id.name, &a.resource, &a.key)?;
            repo.put_shadow(&a.resource, &a.key, &a.attrs)?;
        }
    }
    repo.commit()?;
    let event = ChangeEvent {
        resource: fx.resource.clone(),
        key: fx.event.key.clone(),
        op: fx.event.op,
        attrs: fx.event.attrs.clone(),
        previous: fx.event.previous.clone(),
        origin: Some(file.display().to_string()),
    };
    let batch = ChangeBatch {
        events: vec![event],
        ..ChangeBatch::default()
    };
    if let Err(e) = engine.apply_batch(policy, None, &batch) {
        return Ok(Outcome::Fail(
            name,
            format!("  the batch did not apply: {e}\n"),
        ));
    }
    let Some(stored) = repo.decisions(&DecisionFilter::default())?.pop() else {
        anyhow::bail!("no decision was recorded");
    };
    let d = stored.decision;
    let mut diff = Vec::new();
    let e = &fx.expect;
    let got_situation = d.situation.map(|s| s.as_str().to_owned());
    if let Some(want) = &e.situation
        && Some(want) != got_situation.as_ref()
    {
        diff.push(format!(
            "situation: expected {want}, got {}",
            got_situation.as_deref().unwrap_or("(none)")
        ));
    }
    if let Some(want) = &e.action
        && want != d.action.as_str()
    {
        diff.push(format!("action: expected {want}, got {}", d.action));
    }
    if let Some(want) = &e.identity
        && want != &d.identity
    {
        diff.push(format!(
            "identity: expected {}, got {}",
            want.as_deref().unwrap_or("none"),
            d.identity.as_deref().unwrap_or("none")
        ));
    }
    if let Some(want) = &e.candidates
        && want != &d.candidates
    {
        diff.push(format!(
            "candidates: expected [{}], got [{}]",
            want.join(", "),
            d.candidates.join(", ")
        ));
    }
    if let Some(want) = &e.confirmed
        && want != &d.confirmed
    {
        diff.push(format!(
            "confirmed: expected [{}], got [{}]",
            want.join(", "),
            d.confirmed.join(", ")
        ));
    }
    if let Some(want) = &e.notifications {
        let got: Vec<String> = d
            .rules
            .iter()
            .filter(|r| r.rule == idsync_engine::NOTIFICATION_RULE)
            .map(|r| r.script.clone())
            .collect();
        if want != &got {
            diff.push(format!(
                "notifications: expected [{}], got [{}]",
                want.join(", "),
                got.join(", ")
            ));
        }
    }
    match (&e.error_contains, &d.error) {
        (Some(want), Some(got)) if !got.contains(want.as_str()) => diff.push(format!(
            "error: expected it to contain {want:?}, got {got:?}"
        )),
        (Some(want), None) => diff.push(format!(
            "error: expected a failure containing {want:?}, but the event succeeded"
        )),
        (None, Some(got)) => diff.push(format!("error: unexpected failure: {got}")),
        _ => {}
    }
    if e.attrs.is_some() || e.disabled.is_some() {
        let identity = match &d.identity {
            Some(n) => repo.identity(n)?,
            None => None,
        };
        match identity {
            None => diff.push("attrs: expected an identity, but the decision names none".into()),
            Some(id) => {
                if let Some(want) = &e.attrs {
                    for a in want.iter() {
                        let got = id.attrs.get(&a.name).unwrap_or(&[]);
                        if got != a.values.as_slice() {
                            diff.push(format!(
                                "attrs.{}: expected {}, got {}",
                                a.name,
                                show(&a.values),
                                show(got)
                            ));
                        }
                    }
                }
                if let Some(want) = e.disabled
                    && want != id.disabled
                {
                    diff.push(format!("disabled: expected {want}, got {}", id.disabled));
                }
            }
        }
    }
    if diff.is_empty() {
        Ok(Outcome::Pass(name))
    } else {
        let mut text = String::new();
        for line in diff {
            text.push_str(&format!("  - {line}\n"));
        }
        text.push_str("  what happened:\n");
        for line in steps(&d).lines() {
            text.push_str(&format!("  {line}\n"));
        }
        Ok(Outcome::Fail(name, text))
    }
}

fn show(values: &[idsync_core::Value]) -> String {
    if values.is_empty() {
        return "(none)".to_owned();
    }
    let v: Vec<String> = values
        .iter()
        .map(|v| format!("{:?}", v.to_string()))
        .collect();
    v.join(" | ")
}
