//! The config's `authority:` (which resources give each governed identity attribute, first
//! ranked first) and the mappings' `strength`: what `idsync check` refuses about them, and
//! the engine's [`Authority`] built from them. The semantics are the engine's (module
//! `authority` of idsync-engine; docs/rules.md, "Attribute authority").

use std::collections::HashMap;

use idsync_engine::{Authority, Policy};

use crate::config::{Loaded, StrengthConfig};

/// What `idsync check` warns about `authority:` (nothing refused): a governed attribute a
/// correlation rule mentions. When the last account that gives such an attribute goes,
/// the attribute is removed, and a person rehired later cannot be found by it (docs/rules.md,
/// "A governed correlation key can go").
pub fn warnings(loaded: &Loaded, policies: &[Policy]) -> Vec<String> {
    let mut out = Vec::new();
    for attr in loaded.config.authority.keys() {
        for p in policies {
            let Some(rule) = p.correlation.as_ref().filter(|c| c.mentions(attr)) else {
                continue;
            };
            out.push(format!(
                "authority.{attr}: the correlation rule of {} ({}) mentions {attr}; a governed \
                 attribute is removed when the last account that gives it goes, and a person \
                 rehired later cannot then be found by it (keep correlation keys out of \
                 authority, or let an account that stays give them)",
                p.resource,
                rule.label()
            ));
        }
    }
    out
}

/// Every problem of `authority:` and of the mappings it concerns, each naming the file
/// and the key (`idsync.yaml: authority.title: no resource named 'hrr' …`).
pub fn problems(loaded: &Loaded) -> Vec<String> {
    let f = loaded.file.display();
    let config = &loaded.config;
    let mut out = Vec::new();
    let configured: Vec<&str> = config.resources.iter().map(|r| r.name.as_str()).collect();
    // Governed attribute (lowercased) → (its key as written, resources).
    let mut governed: HashMap<String, (&str, &[String])> = HashMap::new();
    for (attr, order) in &config.authority {
        let at = format!("{f}: authority.{attr}");
        if attr.trim().is_empty() {
            out.push(format!(
                "{f}: authority: an attribute name must not be empty"
            ));
            continue;
        }
        if let Some((first, _)) = governed.get(&attr.to_lowercase()) {
            out.push(format!(
                "{at}: the same attribute as authority.{first} (attribute names are case-insensitive); keep one"
            ));
            continue;
        }
        governed.insert(attr.to_lowercase(), (attr.as_str(), order.as_slice()));
        if order.is_empty() {
            out.push(format!(
                "{at}: name the resources that give it, first ranked first (e.g. [hr, contractors])"
            ));
        }
        for (i, resource) in order.iter().enumerate() {
            if order[..i].contains(resource) {
                out.push(format!("{at}: {resource} is listed twice"));
                continue;
            }
            let Some(r) = config.resources.iter().find(|r| r.name == *resource) else {
                out.push(format!(
                    "{at}: no resource named '{resource}' (configured: {})",
                    configured.join(", ")
                ));
                continue;
            };
            if !r.mappings.iter().any(|m| m.to.eq_ignore_ascii_case(attr)) {
                out.push(format!(
                    "{at}: resource {resource} has no mapping to {attr}, so it can give none \
                     (populate_global and process rules do not fill an attribute authority \
                     governs); add one, e.g. {{ to: {attr}, from: {attr} }}, or leave {resource} out"
                ));
            }
        }
    }
    for (i, r) in config.resources.iter().enumerate() {
        for (j, m) in r.mappings.iter().enumerate() {
            let Some((attr, order)) = governed.get(&m.to.to_lowercase()) else {
                continue;
            };
            let at = format!("{f}: resources[{i}] ({}).mappings[{j}]", r.name);
            if !order.contains(&r.name) {
                out.push(format!(
                    "{at}: {} is governed by authority.{attr}, which does not list {}: add it where it ranks ([{}])",
                    m.to,
                    r.name,
                    order.join(", ")
                ));
            }
            if m.strength == StrengthConfig::Initial {
                out.push(format!(
                    "{at}.strength: initial does not apply to {}, which authority governs (its value \
                     is decided again from the linked accounts at every change); use weak, or leave \
                     {attr} out of authority",
                    m.to
                ));
            }
        }
    }
    out
}

/// The engine's authority over the compiled `policies`, `None` when `authority:` governs
/// no attribute.
pub fn build(loaded: &Loaded, policies: &[Policy]) -> Option<Authority> {
    if loaded.config.authority.is_empty() {
        return None;
    }
    Some(Authority::new(
        loaded
            .config
            .authority
            .iter()
            .map(|(attr, order)| (attr.clone(), order.clone())),
        policies,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(yaml: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idsync.yaml");
        std::fs::write(&file, yaml).unwrap();
        problems(&Loaded::read(&file).unwrap())
    }

    const RESOURCES: &str = "resources:
  - name: hr
    source: { type: flatfile, path: hr.csv, key: id }
    mappings:
      - { to: title, from: title }
  - name: contractors
    source: { type: flatfile, path: c.csv, key: id }
    mappings:
      - { to: Title, from: role, strength: weak }
      - { to: since, from: start, strength: initial }
";

    #[test]
    fn a_sound_authority_has_no_problem() {
        let p = problems_of(&format!(
            "authority:\n  title: [hr, contractors]\n{RESOURCES}"
        ));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn every_problem_names_its_key() {
        let p = problems_of(&format!(
            "authority:\n  title: [hr, hrr, hr]\n  Since: [contractors]\n  since: [contractors]\n  mail: []\n{RESOURCES}"
        ));
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(
            has("authority.title: no resource named 'hrr' (configured: hr, contractors)"),
            "{p:?}"
        );
        assert!(has("authority.title: hr is listed twice"), "{p:?}");
        assert!(
            has("authority.since: the same attribute as authority.Since"),
            "{p:?}"
        );
        assert!(has("authority.mail: name the resources"), "{p:?}");
        assert!(
            has(
                "resources[1] (contractors).mappings[0]: Title is governed by authority.title, which does not list contractors"
            ),
            "{p:?}"
        );
        assert!(
            has("resources[1] (contractors).mappings[1].strength: initial does not apply to since"),
            "{p:?}"
        );
        assert_eq!(p.len(), 6, "{p:?}");
    }

    #[test]
    fn a_listed_resource_without_a_mapping_is_refused() {
        let p = problems_of(&format!("authority:\n  mail: [hr]\n{RESOURCES}"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("authority.mail: resource hr has no mapping to mail"),
            "{p:?}"
        );
    }
}
