//! File watching for `idsync run`: one [`Watcher`] over the folders of the selected flat-file
//! resources, so the loop wakes when a feed is written instead of waiting for the next poll.
//!
//! Kept apart from the command loop on purpose: when the agent becomes a service with one
//! loop per resource, each loop builds its own watcher from its resource the same way.

use std::path::PathBuf;
use std::time::Duration;

use idsync_flatfile::{FlatFileAdapter, Watcher};

use crate::config::SourceConfig;
use crate::setup::Setup;

/// The folders to watch for the selected resources (all when `only` is empty).
pub fn watched_dirs(setup: &Setup, only: &[String]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for r in &setup.loaded.config.resources {
        if !only.is_empty() && !only.contains(&r.name) {
            continue;
        }
        #[allow(unreachable_patterns)] // other adapters have no files to watch
        let dir = match &r.source {
            SourceConfig::Flatfile(ff) => {
                let mut ff = ff.clone();
                ff.path = setup.loaded.resolve(&ff.path);
                Some(FlatFileAdapter::new(&r.name, ff).watch_dir())
            }
            _ => None,
        };
        if let Some(dir) = dir
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    }
    dirs
}

/// A watcher over the flat-file folders, `None` when no selected resource has one. In
/// polling mode it scans the folders once a second (or every `interval` if shorter).
pub fn watcher(setup: &Setup, only: &[String], interval: Duration) -> Option<Watcher> {
    let dirs = watched_dirs(setup, only);
    if dirs.is_empty() {
        return None;
    }
    let w = Watcher::new(dirs, interval.min(Duration::from_secs(1)));
    tracing::info!("watching {w:?}");
    Some(w)
}
