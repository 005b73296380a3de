//! Reading the repository file into the operating system's page cache ahead of a pass that
//! will visit many of its accounts (a flat-file diff, a full LDAP refresh).
//!
//! Such a pass updates accounts spread over the whole file: a 1% change of a million-row
//! feed touches some 40,000 pages of a 1.2 GB repository, one at a time. When those pages
//! are not cached (the pass runs hours after the last one, or the host reclaims cold page
//! cache, as this project's test machines do), each is a synchronous random read, and the
//! pass took twice as long as with a warm cache (4 s → 8 s, see docs/benchmarks.md). A
//! sequential read of the whole file takes about a second, so the repository asks the
//! kernel to read it ahead (`posix_fadvise(WILLNEED)` over every 4 MiB of it, no copy into
//! this process) on a thread of its own while the adapter reads its source; by the time the engine applies
//! the changes, their pages are in memory.
//!
//! The read-ahead uses the descriptor the repository holds for its whole life (module
//! `file`): opening and closing one here would drop SQLite's locks on the file.
//!
//! Only a file that fits comfortably in the memory available (a quarter of it) is read
//! ahead, and at most once every ten seconds (hints for pages already cached cost some 60 ms
//! of that thread for a 1 GB file); elsewhere than Linux this does nothing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most one read-ahead per this interval (a pass in parts asks once per part).
const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes per read-ahead hint.
#[cfg(target_os = "linux")]
const CHUNK: u64 = 4 << 20;

/// The largest share of the memory available a file may take to be read ahead.
const MAX_SHARE_OF_AVAILABLE: u64 = 4;

/// Reads a repository file ahead on request, at most once per [`MIN_INTERVAL`].
#[derive(Debug)]
pub(crate) struct Warmer {
    /// For log lines.
    path: PathBuf,
    /// The process's descriptor of the file (module `file`): never opened or closed here.
    file: Arc<File>,
    last: Mutex<Option<Instant>>,
}

impl Warmer {
    pub fn new(path: &Path, file: Arc<File>) -> Warmer {
        Warmer {
            path: path.to_path_buf(),
            file,
            last: Mutex::new(None),
        }
    }

    /// Starts reading the file ahead on a thread of its own, unless it did so less than
    /// [`MIN_INTERVAL`] ago or the file is too large for the memory available. Never
    /// blocks, never fails (a read-ahead is a hint: a failure is logged at debug level).
    pub fn warm_up(&self) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        let path = self.path.clone();
        let file = self.file.clone();
        let size = match file.metadata() {
            Ok(m) => m.len(),
            Err(e) => {
                tracing::debug!(file = %path.display(), "repository not read ahead: {e}");
                return;
            }
        };
        if available_memory().is_none_or(|a| size > a / MAX_SHARE_OF_AVAILABLE) {
            tracing::debug!(
                file = %path.display(),
                bytes = size,
                "repository not read ahead: larger than a quarter of the memory available"
            );
            return;
        }
        tracing::debug!(file = %path.display(), bytes = size, "reading the repository ahead");
        let spawned = std::thread::Builder::new()
            .name("idsync-warm".to_owned())
            .spawn(move || {
                let started = Instant::now();
                match read_ahead(&file, size) {
                    Ok(()) => tracing::debug!(
                        file = %path.display(),
                        "repository read ahead in {:?}",
                        started.elapsed()
                    ),
                    Err(e) => tracing::debug!(
                        file = %path.display(),
                        "repository not read ahead: {e}"
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("repository not read ahead: no thread: {e}");
        }
    }
}

/// Asks the kernel to read the first `size` bytes of `file` into the page cache.
#[cfg(target_os = "linux")]
fn read_ahead(file: &File, size: u64) -> std::io::Result<()> {
    // One hint for the whole file reads no more than the device's read-ahead window
    // (Linux caps WILLNEED at it): hint it window by window.
    let mut offset = 0;
    while offset < size {
        let len = CHUNK.min(size - offset);
        if let Some(len) = std::num::NonZeroU64::new(len) {
            rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed)?;
        }
        offset += CHUNK;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn read_ahead(_file: &File, _size: u64) -> std::io::Result<()> {
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes (`None` elsewhere than Linux: nothing is
/// read ahead there).
fn available_memory() -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_available(&info)
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let info = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_available(info), Some(22_000_000 * 1024));
        assert_eq!(parse_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn a_second_request_within_the_interval_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let warmer = Warmer::new(&path, file.clone());
        warmer.warm_up();
        let first = *warmer.last.lock().unwrap();
        assert!(first.is_some());
        warmer.warm_up();
        assert_eq!(*warmer.last.lock().unwrap(), first);
        #[cfg(target_os = "linux")]
        read_ahead(&file, 8192).unwrap();
    }
}
