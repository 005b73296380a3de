//! Retry schedules and what a failed attempt comes to.
//!
//! Key design choice: the schedule is copied into each outbox row when it is enqueued
//! ([`RetrySpec`] as JSON), so a message keeps the rules it was created with even if the
//! policy is edited or removed, and the dispatcher needs nothing but the row.

use std::str::FromStr;

use idsync_repo::OutboxOutcome;
use serde::{Deserialize, Serialize};

use crate::config::{ErrorAction, ErrorActions, RetryConfig, duration};

/// The stored schedule of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrySpec {
    /// First delay in ms (interval mode).
    pub every_ms: u64,
    /// Longest delay in ms.
    pub max_interval_ms: u64,
    /// Cron expression (cron mode, instead of the interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Transient failures: retry or dead-letter.
    pub transient: ErrorAction,
    /// Permanent failures: retry or dead-letter.
    pub permanent: ErrorAction,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            every_ms: 60_000,
            max_interval_ms: 3_600_000,
            cron: None,
            transient: ErrorAction::Retry,
            permanent: ErrorAction::Dead,
        }
    }
}

impl RetrySpec {
    /// The spec and the maximum age (ms) of a policy's config; errors name the key.
    pub fn from_config(
        key: &str,
        r: &RetryConfig,
        on_error: &ErrorActions,
    ) -> Result<(RetrySpec, i64), String> {
        let every = r
            .every
            .as_deref()
            .map(|s| duration(&format!("{key}.every"), s))
            .transpose()?
            .map_or(60_000, |d| d.as_millis() as u64)
            .max(1);
        let max_interval = r
            .max_interval
            .as_deref()
            .map(|s| duration(&format!("{key}.max_interval"), s))
            .transpose()?
            .map_or(3_600_000, |d| d.as_millis() as u64)
            .max(every);
        let max_age = duration(&format!("{key}.max_age"), &r.max_age)?.as_millis() as i64;
        if r.every.is_some() && r.cron.is_some() {
            return Err(format!("{key}: give either every or cron, not both"));
        }
        if let Some(c) = &r.cron {
            croner::Cron::from_str(c)
                .map_err(|e| format!("{key}.cron: {c:?} is not a cron expression: {e}"))?;
        }
        Ok((
            RetrySpec {
                every_ms: every,
                max_interval_ms: max_interval,
                cron: r.cron.clone(),
                transient: on_error.transient,
                permanent: on_error.permanent,
            },
            max_age,
        ))
    }

    /// When to try again after the `attempts`-th failed attempt (1 for the first), from
    /// `now` (Unix ms): the cron schedule's next time, or the interval doubled per failure,
    /// capped, with ±20% jitter so a backlog does not hit a recovering server at once.
    pub fn next_attempt(&self, attempts: i64, now: i64) -> i64 {
        if let Some(c) = &self.cron
            && let Ok(cron) = croner::Cron::from_str(c)
            && let Some(t) = chrono_next(&cron, now)
        {
            return t;
        }
        let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        let base = self
            .every_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_interval_ms);
        let jitter = base / 5;
        let delay = base - jitter + fastrand::u64(0..=jitter.saturating_mul(2));
        now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX))
    }

    /// What a failure comes to: retry on the schedule, or dead-letter when the category
    /// says so or the next attempt would be after `expires_at`.
    pub fn outcome(
        &self,
        permanent: bool,
        error: String,
        attempts: i64,
        now: i64,
        expires_at: i64,
    ) -> OutboxOutcome {
        let action = if permanent {
            self.permanent
        } else {
            self.transient
        };
        let kind = if permanent { "permanent" } else { "transient" };
        if action == ErrorAction::Dead {
            return OutboxOutcome::Dead {
                error: format!("{kind} failure: {error}"),
            };
        }
        let next = self.next_attempt(attempts, now);
        if next > expires_at {
            return OutboxOutcome::Dead {
                error: format!("gave up at the maximum age after {attempts} attempts: {error}"),
            };
        }
        OutboxOutcome::Retry {
            next_attempt_at: next,
            error: format!("{kind} failure: {error}"),
        }
    }
}

/// The next time of `cron` strictly after `now_ms`, in Unix ms.
fn chrono_next(cron: &croner::Cron, now_ms: i64) -> Option<i64> {
    let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)?;
    let next = cron.find_next_occurrence(&now, false).ok()?;
    Some(next.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_backs_off_with_jitter_and_cap() {
        let s = RetrySpec {
            every_ms: 1000,
            max_interval_ms: 4000,
            ..RetrySpec::default()
        };
        for (attempts, base) in [(1, 1000), (2, 2000), (3, 4000), (9, 4000)] {
            let d = s.next_attempt(attempts, 0);
            assert!(d >= base * 8 / 10 && d <= base * 12 / 10, "{attempts}: {d}");
        }
    }

    #[test]
    fn cron_every_five_minutes() {
        let s = RetrySpec {
            cron: Some("*/5 * * * *".into()),
            ..RetrySpec::default()
        };
        // 2026-01-01T00:01:00Z → 00:05:00Z
        let now = 1_767_225_660_000;
        assert_eq!(s.next_attempt(1, now), 1_767_225_900_000);
    }

    #[test]
    fn permanent_dead_letters_and_age_limit_gives_up() {
        let s = RetrySpec::default();
        assert!(matches!(
            s.outcome(true, "550".into(), 1, 0, 1_000_000),
            OutboxOutcome::Dead { .. }
        ));
        assert!(matches!(
            s.outcome(false, "451".into(), 1, 0, 1_000_000),
            OutboxOutcome::Retry { .. }
        ));
        assert!(matches!(
            s.outcome(false, "451".into(), 1, 0, 10),
            OutboxOutcome::Dead { .. }
        ));
    }
}
