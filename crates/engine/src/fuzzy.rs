//! Fuzzy correlation candidates: when correlation finds no identity for an account, the
//! identities whose declared attributes are *similar* to the account's (Jaro-Winkler over
//! normalised values, averaged over the attributes, at or above a threshold). They never
//! link on their own: the pipeline turns them into a `similar` work item for an operator.
//!
//! The cost is bounded by a **block**: only identities whose block attribute has the
//! account's value (normalised as declared; or only its first characters) are read, through
//! the correlation index, and at most `block_limit` of them. An event never scans the
//! identities.

use std::collections::HashSet;

use idsync_core::{AttrMap, Normalisation, Value};
use idsync_repo::{BlockQuery, Repo, RepoError};

/// The most similar identities a decision lists (the best first).
pub const MAX_SIMILAR: usize = 10;

/// A resource's fuzzy-candidate settings (`fuzzy:` in the config).
#[derive(Clone, Debug, PartialEq)]
pub struct Fuzzy {
    /// The identity attributes compared (their values as the resource's mappings would
    /// give a new identity).
    pub attributes: Vec<String>,
    /// The lowest average similarity (0..=1) that makes a candidate.
    pub threshold: f64,
    /// The identity attribute whose (normalised) value an identity must share with the
    /// account to be compared at all.
    pub block: String,
    /// Only the first this many characters of the block value must agree.
    pub block_prefix: Option<usize>,
    /// The most identities compared per event.
    pub block_limit: usize,
}

/// Default of [`Fuzzy::block_limit`].
pub const DEFAULT_BLOCK_LIMIT: usize = 1000;

/// One similar identity with its scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// Identity name.
    pub name: String,
    /// The average of `per_attribute`.
    pub score: f64,
    /// The similarity of each compared attribute, in [`Fuzzy::attributes`] order.
    pub per_attribute: Vec<f64>,
}

/// What a fuzzy search found for one account.
#[derive(Clone, Debug, PartialEq)]
pub struct Similar {
    /// The block key(s) looked up (normalised values or prefixes of the block attribute).
    pub keys: Vec<String>,
    /// How many identities were compared.
    pub compared: usize,
    /// Whether a block held more identities than the limit (the rest were not compared).
    pub truncated: bool,
    /// The account's values compared, normalised, per attribute (`None`: it has none).
    pub values: Vec<Option<String>>,
    /// The identities at or above the threshold, best first, at most [`MAX_SIMILAR`].
    pub candidates: Vec<Scored>,
}

impl Fuzzy {
    /// The identities similar to an account whose would-be identity attributes are
    /// `mapped`, leaving out `exclude` (candidates the confirmation rule dropped).
    pub fn search(
        &self,
        repo: &Repo,
        mapped: &AttrMap,
        exclude: &[String],
    ) -> Result<Similar, RepoError> {
        let norms: Vec<Normalisation> = self
            .attributes
            .iter()
            .map(|a| repo.normalisation(a))
            .collect::<Result<_, _>>()?;
        let mine: Vec<Vec<String>> = self
            .attributes
            .iter()
            .zip(&norms)
            .map(|(a, n)| normalised(mapped, a, *n))
            .collect();
        let mut found = Similar {
            keys: Vec::new(),
            compared: 0,
            truncated: false,
            values: mine.iter().map(|v| v.first().cloned()).collect(),
            candidates: Vec::new(),
        };
        let block_values: Vec<&str> = mapped
            .get(&self.block)
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_text)
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        for value in block_values {
            let left = self.block_limit.saturating_sub(found.compared);
            let block = repo.block(&BlockQuery {
                attribute: &self.block,
                value,
                prefix: self.block_prefix,
                limit: left,
            })?;
            if block.key.is_empty() || found.keys.contains(&block.key) {
                continue;
            }
            found.keys.push(block.key);
            found.truncated |= block.truncated;
            for identity in block.identities {
                if !seen.insert(identity.name.clone()) {
                    continue;
                }
                found.compared += 1;
                if exclude.contains(&identity.name) {
                    continue;
                }
                let per_attribute: Vec<f64> = self
                    .attributes
                    .iter()
                    .zip(&norms)
                    .zip(&mine)
                    .map(|((a, n), ours)| best(ours, &normalised(&identity.attrs, a, *n)))
                    .collect();
                let score = per_attribute.iter().sum::<f64>() / per_attribute.len().max(1) as f64;
                if score >= self.threshold {
                    found.candidates.push(Scored {
                        name: identity.name,
                        score,
                        per_attribute,
                    });
                }
            }
        }
        found.candidates.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.name.cmp(&b.name))
        });
        found.candidates.truncate(MAX_SIMILAR);
        Ok(found)
    }

    /// `jonathan.smith 0.975 (givenName 0.950, sn 1.000)`.
    pub fn describe(&self, c: &Scored) -> String {
        let parts: Vec<String> = self
            .attributes
            .iter()
            .zip(&c.per_attribute)
            .map(|(a, s)| format!("{a} {s:.3}"))
            .collect();
        format!("{} {:.3} ({})", c.name, c.score, parts.join(", "))
    }

    /// What the search did, for the decision record: the block, how many identities were
    /// compared, the account's normalised values and each candidate with its scores.
    pub fn report(&self, s: &Similar) -> String {
        let values: Vec<String> = self
            .attributes
            .iter()
            .zip(&s.values)
            .map(|(a, v)| match v {
                Some(v) => format!("{a} {v:?}"),
                None => format!("{a} (none)"),
            })
            .collect();
        let block = if s.keys.is_empty() {
            format!("no block: the account gives no {}", self.block)
        } else {
            let keys: Vec<String> = s.keys.iter().map(|k| format!("{k:?}")).collect();
            let how = match self.block_prefix {
                Some(n) => format!(" (first {n} characters)"),
                None => String::new(),
            };
            let cut = if s.truncated {
                format!(
                    ", the block's first {} only (block_limit)",
                    self.block_limit
                )
            } else {
                String::new()
            };
            format!(
                "block {} = {}{how}: {} identit{} compared{cut}",
                self.block,
                keys.join(" | "),
                s.compared,
                if s.compared == 1 { "y" } else { "ies" }
            )
        };
        let found = if s.candidates.is_empty() {
            format!("none at or above {}", self.threshold)
        } else {
            let list: Vec<String> = s.candidates.iter().map(|c| self.describe(c)).collect();
            format!("at or above {}: {}", self.threshold, list.join("; "))
        };
        format!("{block}; account {}; {found}", values.join(", "))
    }
}

/// The non-empty text values of attribute `a` of `attrs`, normalised by `n`.
fn normalised(attrs: &AttrMap, a: &str, n: Normalisation) -> Vec<String> {
    attrs
        .get(a)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_text)
        .map(|t| n.apply(t).into_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The best Jaro-Winkler similarity between any of `ours` and any of `theirs`; 0 when
/// either side has no value.
fn best(ours: &[String], theirs: &[String]) -> f64 {
    ours.iter()
        .flat_map(|a| theirs.iter().map(move |b| strsim::jaro_winkler(a, b)))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_pairs_and_missing_values() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert!((best(&s(&["jonathon"]), &s(&["jonathan"])) - 0.95).abs() < 1e-9);
        assert_eq!(best(&s(&["smith"]), &s(&["jones", "smith"])), 1.0);
        assert_eq!(best(&s(&[]), &s(&["smith"])), 0.0);
        assert_eq!(best(&s(&["smith"]), &s(&[])), 0.0);
        // Different people with one surname stay apart at the usual thresholds.
        assert!(best(&s(&["john"]), &s(&["jane"])) < 0.8);
        // The figures docs/rules.md quotes for `Jonathon` against other first names.
        let vs = |other: &str| format!("{:.3}", best(&s(&["jonathon"]), &s(&[other])));
        assert_eq!(
            [vs("jonathan"), vs("john"), vs("jane")],
            ["0.950", "0.800", "0.597"]
        );
    }
}
