//! What `idsync check` finds beyond parsing and compiling: the problems a run would meet
//! on its first event or first fetch, found before it.
//!
//! - A rule that reads a variable its role does not get (strict variables; file:line:col).
//! - An LDAP bind DN or password whose environment variable or file is missing (the SMTP
//!   password is checked when the transport is built, with the other config problems).
//! - A CSV feed that exists but whose header lacks a key column.
//!
//! With `--connect`, [`connect`] also binds to every LDAP directory and opens (and closes)
//! the SMTP connection, reporting each one; a password is used, never printed.

use std::collections::BTreeSet;

use idsync_notify::Transport;

use crate::config::{Loaded, ResourceConfig, SourceConfig};

/// The variables every rule and expression of `r` gets (docs/rules.md, "Variables").
fn base_variables(r: &ResourceConfig) -> Vec<&'static str> {
    let mut vars = vec!["account", "previous", "resource", "key", "op"];
    if r.populate_global {
        vars.push("global");
    }
    vars
}

/// The variables a rule of `role` gets in addition to the base ones.
fn role_variables(role: &str) -> &'static [&'static str] {
    match role {
        "confirmation" => &["identity"],
        "process" => &["ctx"],
        "resolve" => &["candidates", "situation", "ctx"],
        _ => &[],
    }
}

/// Every problem found, one full line each (empty: none).
pub fn problems(loaded: &Loaded) -> Vec<String> {
    let mut out = undefined_variables(loaded);
    out.extend(secrets(loaded));
    out.extend(feed_headers(loaded));
    out
}

/// Undefined variables in the rules, naming expressions and mapping expressions.
fn undefined_variables(loaded: &Loaded) -> Vec<String> {
    let file = loaded.file.display();
    let rules_dir = loaded.rules_dir();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut report = |label: String, source: &str, vars: Vec<&str>| {
        if let Some(e) = idsync_rules::undefined_variable(&label, source, &vars) {
            let line = e.to_string();
            if seen.insert(line.clone()) {
                out.push(line);
            }
        }
    };
    for (index, r) in loaded.config.resources.iter().enumerate() {
        let base = base_variables(r);
        for (role, name) in r.rules.entries() {
            let path = rules_dir.join(name);
            // An unreadable or missing file is reported by the compile step.
            let Ok(source) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut vars = base.clone();
            vars.extend(role_variables(role));
            report(path.display().to_string(), &source, vars);
        }
        if let Some(expr) = &r.naming {
            report(
                format!("{file}:resources[{index}].naming"),
                expr,
                base.clone(),
            );
        }
        for (j, m) in r.mappings.iter().enumerate() {
            if let Some(expr) = &m.expr {
                let mut vars = base.clone();
                vars.push("identity");
                report(
                    format!("{file}:resources[{index}].mappings[{j}]({})", m.to),
                    expr,
                    vars,
                );
            }
        }
    }
    out
}

/// LDAP credentials that cannot be read now.
fn secrets(loaded: &Loaded) -> Vec<String> {
    let file = loaded.file.display();
    let mut out = Vec::new();
    for (index, r) in loaded.config.resources.iter().enumerate() {
        if let SourceConfig::Ldap(l) = &r.source {
            let mut l = (**l).clone();
            l.bind_password_file = l.bind_password_file.map(|p| loaded.resolve(&p));
            if let Err(e) = idsync_ldap::check_credentials(&l) {
                out.push(format!(
                    "{file}: resources[{index}] ({}).source: {e}",
                    r.name
                ));
            }
        }
    }
    out
}

/// Existing single-file CSV feeds whose header lacks a key column.
fn feed_headers(loaded: &Loaded) -> Vec<String> {
    let file = loaded.file.display();
    let mut out = Vec::new();
    for (index, r) in loaded.config.resources.iter().enumerate() {
        if let SourceConfig::Flatfile(ff) = &r.source {
            let mut ff = ff.clone();
            ff.path = loaded.resolve(&ff.path);
            if let Some(p) = idsync_flatfile::header_problem(&r.name, &ff) {
                out.push(format!(
                    "{file}: resources[{index}] ({}).source.key: {p}",
                    r.name
                ));
            }
        }
    }
    out
}

/// One connection tried by `check --connect`.
pub struct Probe {
    /// What was tried: `resource dir (ldap://...)`, `notifications transport (smtp ...)`.
    pub what: String,
    /// `Ok` or the error (never a password).
    pub result: Result<(), String>,
}

/// Binds to every LDAP resource and connects to the SMTP server, each once.
pub fn connect(loaded: &Loaded) -> Vec<Probe> {
    let mut out = Vec::new();
    for r in &loaded.config.resources {
        if let SourceConfig::Ldap(l) = &r.source {
            let mut l = (**l).clone();
            l.ca_file = l.ca_file.map(|p| loaded.resolve(&p));
            l.bind_password_file = l.bind_password_file.map(|p| loaded.resolve(&p));
            out.push(Probe {
                what: format!("resource {} ({})", r.name, l.url),
                result: idsync_ldap::check_bind(&l).map_err(|e| e.to_string()),
            });
        }
    }
    if let Some(n) = &loaded.config.notifications {
        let transport = idsync_notify::setup::transport(n, &|p| loaded.resolve(p));
        match transport {
            Ok(Transport::Smtp(s)) => out.push(Probe {
                what: format!("notifications transport (smtp {}:{})", s.host, s.port),
                result: idsync_notify::smtp::probe(&s).map_err(|f| f.message),
            }),
            Ok(Transport::File(dir)) => out.push(Probe {
                what: format!("notifications transport (files in {})", dir.display()),
                result: Ok(()),
            }),
            // Reported with the config problems before any connection is tried.
            Err(_) => {}
        }
    }
    out
}
