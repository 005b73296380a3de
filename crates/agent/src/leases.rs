//! Several agents on one PostgreSQL repository: which resources this agent runs.
//!
//! The [`Keeper`] thread takes the lease of every resource of the config that is free or
//! expired, renews the ones it holds every third of the lease time, and registers each with
//! the repository as the fence its batches commit under (`idsync_repo::Leases`). A resource
//! loop runs passes only while its lease is held; otherwise it waits as a standby and
//! looks again at the keeper's next round, so a resource whose holder died is taken over
//! within one lease time plus one round. A lease that cannot be renewed (taken over after
//! this agent was paused, or the database unreachable for a whole lease time) is dropped:
//! the loop stops at its next pass, and a batch in progress is fenced off at its commit.
//! A clean stop gives the leases back, so another agent takes them at once.
//!
//! An SQLite repository has one agent (the file lock) and no keeper.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idsync_repo::{Fence, Leases, Repo};

use crate::config::Loaded;
use crate::runner::Stop;

/// This agent's name in the leases table: `agent_name`, or the host and the config's
/// folder. One name per agent, the same after a restart (it takes its leases back at
/// once); two agents of one host differ by their config folder (each holds its own agent
/// lock).
pub fn holder_name(loaded: &Loaded) -> String {
    if let Some(name) = &loaded.config.repository.agent_name {
        return name.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "agent".to_owned());
    let folder = loaded
        .file
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .unwrap_or_default();
    format!("{host}:{}", folder.display())
}

/// The leases `idsync run --once` (and `reconcile`) takes for the resources it passes, on
/// a PostgreSQL repository: a resource another agent holds is left to it.
pub struct OnceLeases {
    leases: Leases,
    repo: Arc<Repo>,
    held: Vec<(String, Fence)>,
}

impl OnceLeases {
    /// Takes the lease of each of `resources`; `None` for an SQLite repository. Returns
    /// the leases and the resources another agent holds.
    pub fn take(
        loaded: &Loaded,
        repo: &Arc<Repo>,
        resources: &[String],
    ) -> anyhow::Result<Option<(OnceLeases, Vec<String>)>> {
        let cfg = &loaded.config.repository;
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let options = crate::setup::postgres_options(loaded)?;
        let leases = Leases::open(
            url,
            &options,
            &holder_name(loaded),
            Duration::from_secs(cfg.lease_secs),
        )
        .map_err(|e| anyhow::anyhow!("repository {}: leases: {e}", loaded.repository_shown()))?;
        let mut held = Vec::new();
        let mut elsewhere = Vec::new();
        for resource in resources {
            match leases.acquire(resource)? {
                Some(fence) => {
                    repo.set_fence(resource, Some(fence.clone()))?;
                    held.push((resource.clone(), fence));
                }
                None => elsewhere.push(resource.clone()),
            }
        }
        Ok(Some((
            OnceLeases {
                leases,
                repo: repo.clone(),
                held,
            },
            elsewhere,
        )))
    }

    /// Renews every lease held (between resources of a long run).
    pub fn renew(&self) {
        for (resource, fence) in &self.held {
            if let Err(e) = self.leases.renew(resource, fence) {
                tracing::warn!(resource = %resource, "cannot renew the lease: {e}");
            }
        }
    }
}

/// Every lease is given back when the command drops them, on every way out.
impl Drop for OnceLeases {
    fn drop(&mut self) {
        for (resource, fence) in self.held.drain(..) {
            let _ = self.repo.set_fence(&resource, None);
            if let Err(e) = self.leases.release(&resource, &fence) {
                tracing::warn!(resource = %resource, "cannot give back the lease: {e}");
            }
        }
    }
}

/// Runs the leases of this agent's resources.
pub struct Keeper {
    leases: Leases,
    repo: Arc<Repo>,
    resources: Vec<String>,
    ttl: Duration,
    held: Mutex<HashMap<String, Held>>,
}

struct Held {
    fence: Fence,
    since: Instant,
    renewed: Instant,
}

impl Keeper {
    /// A keeper for `resources`, holding leases of `ttl` through `leases`.
    pub fn new(leases: Leases, repo: Arc<Repo>, resources: Vec<String>, ttl: Duration) -> Keeper {
        Keeper {
            leases,
            repo,
            resources,
            ttl,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// This agent's name in the leases table.
    pub fn holder(&self) -> &str {
        self.leases.holder()
    }

    /// How often the keeper renews and looks for free resources.
    pub fn round(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(200))
    }

    /// Whether this agent holds the lease of `resource` now.
    pub fn holds(&self, resource: &str) -> bool {
        self.held
            .lock()
            .map(|h| h.contains_key(resource))
            .unwrap_or(false)
    }

    /// The resources this agent holds, sorted.
    pub fn held(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .held
            .lock()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The lease of `resource` is no longer ours (not renewed in time, or a batch was
    /// fenced off). The fence stays registered with the repository: a batch still in hand
    /// commits only if this agent takes the lease back (a new fence) and nobody else
    /// committed meanwhile (the checkpoint's compare-and-swap).
    pub fn lost(&self, resource: &str) {
        let was = self.held.lock().ok().and_then(|mut h| h.remove(resource));
        if was.is_some() {
            tracing::warn!(resource, "lease lost: another agent runs this resource now");
        }
    }

    /// One round: renew what is held, take what is free.
    pub fn tick(&self) {
        for resource in &self.resources {
            let fence = self
                .held
                .lock()
                .ok()
                .and_then(|h| h.get(resource).map(|x| x.fence.clone()));
            match fence {
                Some(fence) => match self.leases.renew(resource, &fence) {
                    Ok(true) => {
                        if let Ok(mut h) = self.held.lock()
                            && let Some(x) = h.get_mut(resource)
                        {
                            x.renewed = Instant::now();
                        }
                    }
                    Ok(false) => self.lost(resource),
                    Err(e) => {
                        tracing::warn!(resource, "cannot renew the lease: {e}");
                        let stale = self
                            .held
                            .lock()
                            .ok()
                            .and_then(|h| h.get(resource).map(|x| x.renewed.elapsed()))
                            .is_some_and(|d| d >= self.ttl);
                        if stale {
                            self.lost(resource);
                        }
                    }
                },
                None => match self.leases.acquire(resource) {
                    Ok(Some(fence)) => {
                        tracing::info!(
                            resource,
                            token = fence.token,
                            "lease taken: this agent runs the resource"
                        );
                        if self.repo.set_fence(resource, Some(fence.clone())).is_ok()
                            && let Ok(mut h) = self.held.lock()
                        {
                            let now = Instant::now();
                            h.insert(
                                resource.clone(),
                                Held {
                                    fence,
                                    since: now,
                                    renewed: now,
                                },
                            );
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(resource, "cannot take the lease: {e}"),
                },
            }
        }
    }

    /// Rounds until `stop`, then gives every lease back.
    pub fn run(&self, stop: &Stop) {
        loop {
            self.tick();
            if stop.sleep_until(Instant::now() + self.round()) {
                break;
            }
        }
    }

    /// Gives back every lease held (after the loops stopped: nothing commits any more).
    pub fn release_all(&self) {
        let held: Vec<(String, Held)> = self
            .held
            .lock()
            .map(|mut h| h.drain().collect())
            .unwrap_or_default();
        for (resource, h) in held {
            let _ = self.repo.set_fence(&resource, None);
            match self.leases.release(&resource, &h.fence) {
                Ok(()) => tracing::info!(
                    resource = %resource,
                    "lease given back after {}",
                    humantime::format_duration(Duration::from_secs(h.since.elapsed().as_secs()))
                ),
                Err(e) => tracing::warn!(resource = %resource, "cannot give back the lease: {e}"),
            }
        }
    }
}
