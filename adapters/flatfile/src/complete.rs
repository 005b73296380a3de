//! Write completion: never read a half-written file.
//!
//! Three signals, chosen by `completion`:
//! - `settle` (default): the file's size and modification time stay unchanged for
//!   `settle_ms`. The adapter waits for that (re-checking every quarter of the settle time),
//!   at most [`MAX_WAIT_FACTOR`] settle times, then reports the file as still being written.
//! - `marker`: a marker file (`hr.csv.done`) exists and is at least as new as the file;
//!   without it the file is simply not ready (the fetch is idle).
//! - `rename`: the writer replaces the file atomically; whatever is there is complete.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Completion, FlatFileConfig};

/// How many settle times the adapter waits for a file that keeps changing.
pub(crate) const MAX_WAIT_FACTOR: u32 = 30;

/// The marker file of `path`.
pub(crate) fn marker_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Size and modification time: what must not change while a file settles and is read.
pub(crate) type Signature = (u64, Option<SystemTime>);

/// The signature of a file's metadata.
pub(crate) fn signature_of(meta: &std::fs::Metadata) -> Signature {
    (meta.len(), meta.modified().ok())
}

fn signature(path: &Path) -> Result<Signature, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(signature_of(&m))
}

/// Whether a file can be read now.
#[derive(Debug, PartialEq)]
pub(crate) enum Readiness {
    /// Not yet (no marker, or an older one).
    NotYet,
    /// Complete. `Some`: the signature it settled at, which the file must still have once it
    /// is read (a writer that paused longer than the settle time and went on is caught).
    Ready(Option<Signature>),
}

/// Whether the file at `path` is complete. `Err`: the file cannot be read, or it kept
/// changing for too long.
pub(crate) fn is_complete(config: &FlatFileConfig, path: &Path) -> Result<Readiness, String> {
    match config.completion {
        Completion::Rename => Ok(Readiness::Ready(None)),
        Completion::Marker => {
            let (_, file_time) = signature(path)?;
            let marker = marker_path(path, &config.marker_suffix);
            match std::fs::metadata(&marker) {
                Ok(m) => Ok(match (m.modified().ok(), file_time) {
                    (Some(marker_time), Some(file_time)) if marker_time < file_time => {
                        Readiness::NotYet
                    }
                    _ => Readiness::Ready(None),
                }),
                Err(_) => Ok(Readiness::NotYet),
            }
        }
        Completion::Settle => {
            let settle = Duration::from_millis(config.settle_ms);
            if settle.is_zero() {
                return Ok(Readiness::Ready(None));
            }
            let step = (settle / 4).max(Duration::from_millis(10));
            let started = Instant::now();
            let mut last = signature(path)?;
            let mut unchanged_since = Instant::now();
            loop {
                let age = last
                    .1
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                if age >= settle || unchanged_since.elapsed() >= settle {
                    return Ok(Readiness::Ready(Some(last)));
                }
                if started.elapsed() >= settle * MAX_WAIT_FACTOR {
                    return Err(format!(
                        "{} is still being written (it changed within the last {} ms for {} s)",
                        path.display(),
                        config.settle_ms,
                        started.elapsed().as_secs()
                    ));
                }
                std::thread::sleep(step);
                let now = signature(path)?;
                if now != last {
                    last = now;
                    unchanged_since = Instant::now();
                }
            }
        }
    }
}
