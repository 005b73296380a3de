//! The correlation settings of the config: `correlation: { normalise }` at the top level
//! (how each identity attribute compares, repository-wide, as the correlation index is
//! shared by every resource) and `fuzzy:` on a resource (similar identities open a work
//! item). Their serde types, their validation (each problem naming the key), and what they
//! become: the repository's [`Normalisations`] and the engine's [`Fuzzy`].

use std::collections::{BTreeMap, HashMap};

use idsync_core::{Normalisation, Normalisations, Step};
use idsync_engine::{DEFAULT_BLOCK_LIMIT, Fuzzy};
use serde::Deserialize;

use crate::config::{Config, ResourceConfig};

/// The most identities a fuzzy search may read per event (`block_limit`).
pub const MAX_BLOCK_LIMIT: usize = 100_000;

/// `correlation:` at the top level.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelationConfig {
    /// Identity attribute → its normalisation steps (`mail: [case, spaces]`); an attribute
    /// not listed compares exactly.
    #[serde(default, alias = "normalize")]
    pub normalise: BTreeMap<String, Vec<Step>>,
}

/// `fuzzy:` of a resource.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuzzyConfig {
    /// The identity attributes compared, as this resource's mappings fill them.
    pub attributes: Vec<String>,
    /// The lowest average Jaro-Winkler similarity (more than 0, at most 1) of a candidate.
    pub threshold: f64,
    /// The identity attribute an identity must share (normalised) with the account to be
    /// compared at all.
    pub block: String,
    /// Only the first this many characters of the block value must agree.
    #[serde(default)]
    pub block_prefix: Option<usize>,
    /// The most identities compared per event (default 1000).
    #[serde(default)]
    pub block_limit: Option<usize>,
}

/// The repository's normalisations from the config.
pub fn normalisations(config: &Config) -> Normalisations {
    let mut n = Normalisations::default();
    for (attr, steps) in &config.correlation.normalise {
        n.declare(attr, Normalisation::of(steps));
    }
    n
}

/// The engine's fuzzy settings of a resource.
pub fn fuzzy(r: &ResourceConfig) -> Option<Fuzzy> {
    let f = r.fuzzy.as_ref()?;
    Some(Fuzzy {
        attributes: f.attributes.clone(),
        threshold: f.threshold,
        block: f.block.clone(),
        block_prefix: f.block_prefix,
        block_limit: f.block_limit.unwrap_or(DEFAULT_BLOCK_LIMIT),
    })
}

/// The problems of `correlation:` (`f`: the config file as shown).
pub fn correlation_problems(f: &str, c: &CorrelationConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, &str> = HashMap::new();
    for attr in c.normalise.keys() {
        if attr.trim().is_empty() {
            out.push(format!(
                "{f}: correlation.normalise: an attribute name must not be empty"
            ));
        } else if let Some(first) = seen.insert(attr.to_lowercase(), attr) {
            out.push(format!(
                "{f}: correlation.normalise.{attr}: '{first}' and '{attr}' name one attribute (attribute names are case-insensitive); keep one"
            ));
        }
    }
    out
}

/// The problems of a resource's `fuzzy:` (`at`: `idsync.yaml: resources[N]`).
pub fn fuzzy_problems(at: &str, r: &ResourceConfig) -> Vec<String> {
    let Some(f) = &r.fuzzy else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if r.rules.process.is_some() {
        out.push(format!(
            "{at}.fuzzy: does not apply with a process rule (it decides every event itself); remove it"
        ));
        return out;
    }
    if f.attributes.is_empty() {
        out.push(format!(
            "{at}.fuzzy.attributes: name at least one identity attribute to compare"
        ));
    }
    if !(f.threshold > 0.0 && f.threshold <= 1.0) {
        out.push(format!(
            "{at}.fuzzy.threshold: {} is not a similarity between 0 (excluded) and 1, e.g. 0.92",
            f.threshold
        ));
    }
    if f.block_prefix == Some(0) {
        out.push(format!(
            "{at}.fuzzy.block_prefix: must be at least 1 (characters); leave it out to block on the whole value"
        ));
    }
    if let Some(limit) = f.block_limit
        && !(1..=MAX_BLOCK_LIMIT).contains(&limit)
    {
        out.push(format!(
            "{at}.fuzzy.block_limit: {limit} is not between 1 and {MAX_BLOCK_LIMIT}"
        ));
    }
    // The account's side of every comparison is what the mappings give a new identity.
    let mapped = |a: &str| {
        r.populate_global
            || r.mappings
                .iter()
                .any(|m| m.to.trim().eq_ignore_ascii_case(a.trim()))
    };
    let named = f
        .attributes
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("attributes[{i}]"), a))
        .chain(std::iter::once(("block".to_owned(), &f.block)));
    for (key, a) in named {
        if a.trim().is_empty() {
            out.push(format!("{at}.fuzzy.{key}: must not be empty"));
        } else if !mapped(a) {
            out.push(format!(
                "{at}.fuzzy.{key}: no mapping of this resource fills '{a}' (fuzzy compares the identity attributes its mappings give a new identity); map it or name a mapped attribute"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::Loaded;

    fn problems(yaml: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idsync.yaml");
        std::fs::write(&file, yaml).unwrap();
        Loaded::read(&file).unwrap().validate()
    }

    const RESOURCE: &str = "resources:\n  - name: hr\n    source: { type: flatfile, path: a.csv, key: id }\n    mappings: [{ to: givenName, from: first }, { to: sn, from: last }]\n";

    #[test]
    fn a_sound_declaration_passes() {
        let p = problems(&format!(
            "correlation: {{ normalise: {{ mail: [case, spaces], sn: [case, spaces, diacritics] }} }}\n{RESOURCE}    fuzzy: {{ attributes: [givenName, sn], threshold: 0.92, block: sn, block_prefix: 2 }}\n"
        ));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn every_fuzzy_problem_is_named_by_its_key() {
        let p = problems(&format!(
            "{RESOURCE}    fuzzy: {{ attributes: [givenName, mail], threshold: 1.5, block: title, block_prefix: 0, block_limit: 0 }}\n"
        ));
        let keys = [
            "resources[0].fuzzy.attributes[1]: no mapping of this resource fills 'mail'",
            "resources[0].fuzzy.threshold: 1.5 is not a similarity",
            "resources[0].fuzzy.block: no mapping of this resource fills 'title'",
            "resources[0].fuzzy.block_prefix: must be at least 1",
            "resources[0].fuzzy.block_limit: 0 is not between 1 and 100000",
        ];
        for k in keys {
            assert!(p.iter().any(|l| l.contains(k)), "{k} not in {p:?}");
        }
        assert_eq!(p.len(), keys.len(), "{p:?}");
    }

    #[test]
    fn a_step_that_does_not_exist_and_a_name_given_twice_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idsync.yaml");
        std::fs::write(
            &file,
            format!("correlation: {{ normalise: {{ mail: [case, accents] }} }}\n{RESOURCE}"),
        )
        .unwrap();
        let err = Loaded::read(&file).unwrap_err().to_string();
        assert!(
            err.contains("idsync.yaml:1:") && err.contains("unknown variant `accents`"),
            "{err}"
        );
        let p = problems(&format!(
            "correlation: {{ normalize: {{ mail: [case], Mail: [spaces] }} }}\n{RESOURCE}"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("name one attribute"), "{p:?}");
    }
}
