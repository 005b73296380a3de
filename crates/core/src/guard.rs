//! The accidental-delete guard every adapter shares: a pass that would delete too many of a
//! resource's known accounts (an empty or truncated feed, a search whose filter or base went
//! wrong, a directory restored from an old backup) is refused before anything is applied,
//! until an operator accepts it once (`idsync run --once --accept-deletes RESOURCE`).

use serde::Deserialize;

/// `delete_guard:` of a resource.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteGuard {
    /// On by default.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Refuse a pass deleting more than this many accounts (default 500).
    #[serde(default = "default_max_deletes")]
    pub max_deletes: u64,
    /// Refuse a pass deleting more than this share of the resource's accounts (default
    /// 0.2), once the resource has at least `ratio_min_accounts` accounts.
    #[serde(default = "default_max_delete_ratio")]
    pub max_delete_ratio: f64,
    /// Below this many known accounts only `max_deletes` and the empty-source rule apply
    /// (default 10), so a small resource can lose one account without tripping the ratio.
    #[serde(default = "default_ratio_min_accounts")]
    pub ratio_min_accounts: u64,
}

impl Default for DeleteGuard {
    fn default() -> Self {
        DeleteGuard {
            enabled: true,
            max_deletes: default_max_deletes(),
            max_delete_ratio: default_max_delete_ratio(),
            ratio_min_accounts: default_ratio_min_accounts(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_max_deletes() -> u64 {
    500
}

fn default_max_delete_ratio() -> f64 {
    0.2
}

fn default_ratio_min_accounts() -> u64 {
    10
}

/// A pass the guard refused: what it would have done and which limit it passed.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardRefusal {
    /// Deletes the pass would apply.
    pub deletes: u64,
    /// Accounts the resource has.
    pub known: u64,
    /// The limit passed, for the message (`more than max_deletes 500`, `the source has no
    /// entries`).
    pub why: String,
}

impl std::fmt::Display for GuardRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accidental-delete guard: this pass would delete {} of {} accounts ({:.0}%; {}); nothing was applied",
            self.deletes,
            self.known,
            self.deletes as f64 * 100.0 / self.known.max(1) as f64,
            self.why
        )
    }
}

impl DeleteGuard {
    /// Checks a pass that deletes `deletes` of `known` accounts after reading `records`
    /// records from the source (`Some(0)`: an empty source, which never deletes without an
    /// operator). `accepted`: the operator accepted this run's deletes.
    pub fn check(
        &self,
        deletes: u64,
        known: u64,
        records: Option<u64>,
        accepted: bool,
    ) -> Result<(), GuardRefusal> {
        if !self.enabled || accepted || deletes == 0 {
            return Ok(());
        }
        let ratio = deletes as f64 / known.max(1) as f64;
        let why = if records == Some(0) {
            "the source has no records".to_owned()
        } else if deletes > self.max_deletes {
            format!("more than max_deletes {}", self.max_deletes)
        } else if known >= self.ratio_min_accounts && ratio > self.max_delete_ratio {
            format!(
                "more than max_delete_ratio {} of the accounts",
                self.max_delete_ratio
            )
        } else {
            return Ok(());
        };
        Err(GuardRefusal {
            deletes,
            known,
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_are_exclusive() {
        let g = DeleteGuard {
            max_deletes: 5,
            max_delete_ratio: 0.5,
            ratio_min_accounts: 10,
            ..DeleteGuard::default()
        };
        assert!(g.check(5, 100, Some(95), false).is_ok(), "at max_deletes");
        assert!(
            g.check(6, 100, Some(94), false).is_err(),
            "over max_deletes"
        );
        assert!(g.check(5, 10, Some(5), false).is_ok(), "at the ratio");
        assert!(
            g.check(5, 9, Some(4), false).is_ok(),
            "under ratio_min_accounts"
        );
        let ratio = g.check(3, 5, Some(2), false);
        assert!(ratio.is_ok(), "few accounts: only max_deletes");
        assert!(g.check(4, 10, Some(0), false).is_err(), "an empty source");
        assert!(g.check(6, 100, Some(94), true).is_ok(), "accepted");
        let off = DeleteGuard {
            enabled: false,
            ..g.clone()
        };
        assert!(off.check(100, 100, Some(0), false).is_ok());
        let refused = g.check(6, 10, Some(4), false).unwrap_err();
        assert_eq!(refused.deletes, 6);
        assert!(refused.to_string().contains("max_deletes 5"), "{refused}");
    }
}
