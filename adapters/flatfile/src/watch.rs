//! Waking up when a watched file changes: `notify` (inotify on Linux) on the file's folder,
//! with a polling fallback.
//!
//! Key design choice: watch the **folder**, never the file — a watch on the file dies at the
//! first atomic rename. Wake-ups come from the events that mean "a write finished": a
//! close after writing (in-place rewrite), a rename into place (atomic replace), a create and
//! a remove (delete and re-create). `Modify(Data)` alone never wakes: it means a write is
//! still going on. Temporary names (a leading `.`, `~`, `.tmp`, `.part`, `.swp`) are ignored.
//! Events are debounced: after the first, the watcher waits until the folder has been
//! quiet for [`QUIET`] (at most [`MAX_DEBOUNCE`]).
//!
//! When `notify` cannot be set up (no inotify, too many watches, a network file system) or
//! `IDSYNC_WATCH=poll` is set, the watcher polls: it lists the folders every `poll` interval and
//! wakes when a name, size or modification time changed. Either way [`Watcher::wait`] returns
//! at its timeout, so the caller's periodic pass is a last safety net.
//!
//! The type is independent of the agent's loop: `wait(timeout) -> bool` fits a per-resource
//! loop (a thread or a blocking task) as well as today's single loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

/// Quiet time that ends a burst of events.
pub const QUIET: Duration = Duration::from_millis(100);
/// Longest a burst is debounced before the wake-up is reported anyway.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

type Listing = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

enum Mode {
    Notify {
        // Kept alive: dropping it stops the watch.
        _watcher: RecommendedWatcher,
        events: Receiver<notify::Result<Event>>,
    },
    Poll {
        every: Duration,
        last: Listing,
    },
}

/// Which files of the watched folders count (the others never wake the caller).
type Accept = Box<dyn Fn(&Path) -> bool + Send>;

/// Wakes the caller when a file in the watched folders was written, replaced, removed or
/// created.
pub struct Watcher {
    dirs: Vec<PathBuf>,
    mode: Mode,
    /// `None`: every file but temporary ones.
    accept: Option<Accept>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("dirs", &self.dirs)
            .field("polling", &self.is_polling())
            .finish()
    }
}

/// Whether a file name looks like a writer's temporary file.
fn is_temporary(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return true;
    };
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".part", ".swp", ".partial"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Whether a raw event means a write finished (or a file appeared or went away) on an
/// accepted file.
fn is_trigger(event: &Event, accept: Option<&Accept>) -> bool {
    let kind_ok = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            | EventKind::Create(_)
            | EventKind::Remove(_)
    );
    kind_ok
        && event
            .paths
            .iter()
            .any(|p| !is_temporary(p) && accept.is_none_or(|a| a(p)))
}

fn list(dirs: &[PathBuf], accept: Option<&Accept>) -> Listing {
    let mut out = Listing::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if is_temporary(&path) || accept.is_some_and(|a| !a(&path)) {
                continue;
            }
            if let Ok(m) = e.metadata()
                && m.is_file()
            {
                out.insert(path, (m.len(), m.modified().ok()));
            }
        }
    }
    out
}

impl Watcher {
    /// Watches `dirs` (each non-recursively) with `notify`, or polls them every `poll` when
    /// that is not possible or `IDSYNC_WATCH=poll` is set.
    pub fn new(dirs: Vec<PathBuf>, poll: Duration) -> Watcher {
        let forced_poll = std::env::var("IDSYNC_WATCH").is_ok_and(|v| v == "poll");
        let mode = if forced_poll {
            tracing::info!(dirs = ?dirs, "polling every {poll:?} (IDSYNC_WATCH=poll)");
            None
        } else {
            match Self::notify(&dirs) {
                Ok(mode) => Some(mode),
                Err(e) => {
                    tracing::warn!("file watching unavailable ({e}); polling every {poll:?}");
                    None
                }
            }
        };
        let mode = mode.unwrap_or_else(|| Mode::Poll {
            every: poll.max(Duration::from_millis(50)),
            last: list(&dirs, None),
        });
        Watcher {
            dirs,
            mode,
            accept: None,
        }
    }

    /// Only changes of the files `accept` takes wake the caller (a feed's own file and
    /// marker, never the repository or the status file beside it).
    pub fn only(mut self, accept: impl Fn(&Path) -> bool + Send + 'static) -> Watcher {
        let accept: Accept = Box::new(accept);
        if let Mode::Poll { last, .. } = &mut self.mode {
            *last = list(&self.dirs, Some(&accept));
        }
        self.accept = Some(accept);
        self
    }

    fn notify(dirs: &[PathBuf]) -> notify::Result<Mode> {
        let (tx, rx) = channel();
        let mut watcher = notify::recommended_watcher(tx)?;
        for dir in dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(Mode::Notify {
            _watcher: watcher,
            events: rx,
        })
    }

    /// Whether the watcher fell back to polling.
    pub fn is_polling(&self) -> bool {
        matches!(self.mode, Mode::Poll { .. })
    }

    /// Blocks until a watched file was written, replaced, removed or created (`true`, after
    /// debouncing) or `timeout` passed (`false`).
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        match &mut self.mode {
            Mode::Notify { events, .. } => {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match events.recv_timeout(left) {
                        Ok(Ok(e)) if is_trigger(&e, self.accept.as_ref()) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("file watch error: {e}"),
                        Err(RecvTimeoutError::Timeout) => return false,
                        Err(RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(left);
                            return false;
                        }
                    }
                }
                // Debounce: let the burst end.
                let burst = Instant::now();
                while burst.elapsed() < MAX_DEBOUNCE {
                    match events.recv_timeout(QUIET) {
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                true
            }
            Mode::Poll { every, last } => loop {
                let now = Instant::now();
                if now >= deadline {
                    return false;
                }
                std::thread::sleep((*every).min(deadline - now));
                let current = list(&self.dirs, self.accept.as_ref());
                if current != *last {
                    *last = current;
                    return true;
                }
            },
        }
    }
}

impl idsync_core::ChangeWaiter for Watcher {
    fn wait(&mut self, timeout: Duration) -> bool {
        Watcher::wait(self, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        assert!(is_temporary(Path::new("/x/.hr.csv.swp")));
        assert!(is_temporary(Path::new("/x/hr.csv.tmp")));
        assert!(is_temporary(Path::new("/x/hr.csv~")));
        assert!(!is_temporary(Path::new("/x/hr.csv")));
        assert!(!is_temporary(Path::new("/x/hr.csv.done")));
    }

    fn wakes_on_write(mut w: Watcher, dir: &Path) {
        assert!(!w.wait(Duration::from_millis(100)), "no event yet");
        std::fs::write(dir.join("hr.csv"), "id\n1\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut woke = false;
        while !woke && Instant::now() < deadline {
            woke = w.wait(Duration::from_millis(500));
        }
        assert!(woke);
    }

    #[test]
    fn notify_wakes_on_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watcher::new(vec![dir.path().to_path_buf()], Duration::from_millis(50));
        wakes_on_write(w, dir.path());
    }

    #[test]
    fn files_not_accepted_never_wake() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(vec![dir.path().to_path_buf()], Duration::from_millis(50))
            .only(|p| p.file_name().is_some_and(|n| n == "hr.csv"));
        std::fs::write(dir.path().join("idsync.db-wal"), "x").unwrap();
        assert!(!w.wait(Duration::from_millis(300)), "the repository's log");
        wakes_on_write(w, dir.path());
    }

    #[test]
    fn polling_wakes_on_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watcher {
            dirs: vec![dir.path().to_path_buf()],
            mode: Mode::Poll {
                every: Duration::from_millis(50),
                last: list(&[dir.path().to_path_buf()], None),
            },
            accept: None,
        };
        wakes_on_write(w, dir.path());
    }
}
