//! Poison-event protection: `<repository>.inflight` names the event being applied (or the
//! lifecycle timer being fired, which the engine presents to the guard as an event of op
//! `timer`), so that an event that kills the agent (an abort, an out-of-memory kill, a
//! SIGKILL) can be traced to it on the next start, and isolated once it did so twice.
//! Batches and timer rounds take turns on the repository's write lock, so one slot serves
//! every thread of the process.
//!
//! The file (owner-only) holds a 32-byte *slot* and then, as JSON, the *suspects*: events
//! (by hashes of resource, account key and content) that crashed the agent, with a
//! count. Before each event the engine decides, the slot is overwritten in place with the
//! event's hashes (one `pwrite`, no fsync: a write that returned survives the death of the
//! process, and only a machine crash can lose it); after the batch's last event it is
//! zeroed. At the start of `idsync run`, a slot still set names the event the previous
//! process died on: its count goes up, and the file is rewritten (temporary file, fsync,
//! rename) with the slot zeroed; only consecutive crashes on one event count (a crash on
//! another event forgets the others). An event whose count reached [`ISOLATE_AFTER`] is handed
//! to the engine as crashed ([`idsync_engine::CrashGuard`]): it becomes a failed event
//! without running its rules, and the batch goes on. A suspect that is later applied
//! without crashing is forgotten; an isolated one is kept until its failed event, once
//! recorded, is gone, so that the agent's automatic retries never run it (`idsync failed
//! retry` by hand does).
//!
//! The content hash covers the operation and the attributes: a changed account is a new
//! event with a fresh count.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use idsync_core::ChangeEvent;
use idsync_engine::CrashGuard;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Crashes after which an event is isolated.
pub const ISOLATE_AFTER: u32 = 2;

/// Suspects kept at most (the oldest are dropped first).
const MAX_SUSPECTS: usize = 1000;

/// Bytes of the slot at the start of the file.
const SLOT: usize = 32;

/// The first 8 bytes of a set slot.
const ARMED: u64 = u64::from_le_bytes(*b"inflight");

/// An event by hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct EventId {
    resource: u64,
    key: u64,
    content: u64,
}

impl EventId {
    fn of(event: &ChangeEvent) -> EventId {
        let mut content = Vec::with_capacity(16);
        content.extend_from_slice(event.op.as_str().as_bytes());
        content.extend_from_slice(&event.attrs.content_hash().to_le_bytes());
        EventId {
            resource: xxh3_64(event.resource.as_bytes()),
            key: xxh3_64(event.key.as_bytes()),
            content: xxh3_64(&content),
        }
    }

    fn slot(&self) -> [u8; SLOT] {
        let mut out = [0u8; SLOT];
        for (i, v) in [ARMED, self.resource, self.key, self.content]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn from_slot(bytes: &[u8]) -> Option<EventId> {
        let word = |i: usize| {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        (word(0)? == ARMED).then_some(EventId {
            resource: word(1)?,
            key: word(2)?,
            content: word(3)?,
        })
    }
}

/// An event that crashed the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Suspect {
    id: EventId,
    crashes: u32,
    /// Isolated, and seen in the failed-event list since.
    #[serde(default)]
    recorded: bool,
}

/// The in-flight file of one repository, as the engine's [`CrashGuard`].
pub struct InFlight {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    suspects: Vec<Suspect>,
    /// The event whose hashes the slot holds.
    armed: Option<EventId>,
}

/// `<repository>.inflight`.
pub fn path_for(repository: &Path) -> PathBuf {
    crate::config::beside(repository, crate::config::INFLIGHT_SUFFIX)
}

impl InFlight {
    /// Opens the file of `repository` (creating it), counts the crash its slot names if it
    /// is set, forgets isolated suspects whose failed event is gone (`failed` gives the
    /// events of the failed-event list), and writes it back with the slot cleared.
    pub fn open(repository: &Path, failed: &[ChangeEvent]) -> anyhow::Result<InFlight> {
        let path = path_for(repository);
        let (armed, mut suspects) = match std::fs::read(&path) {
            Ok(bytes) => read(&bytes).unwrap_or_else(|| {
                tracing::warn!(
                    "{}: unreadable, starting a new one (crash counts are lost)",
                    path.display()
                );
                (None, Vec::new())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if let Some(id) = armed {
            // Only consecutive crashes on the same event count: an event that crashed once
            // and was then passed by a crash elsewhere is forgotten (two operator kills
            // landing on one event in a row are unlikely; a poison event crashes every time).
            suspects.retain(|s| s.id == id || s.crashes >= ISOLATE_AFTER);
            let crashes = match suspects.iter_mut().find(|s| s.id == id) {
                Some(s) => {
                    s.crashes += 1;
                    s.crashes
                }
                None => {
                    suspects.push(Suspect {
                        id,
                        crashes: 1,
                        recorded: false,
                    });
                    1
                }
            };
            tracing::warn!(
                "the previous run died while applying an event ({crashes} time(s) for this event); {}",
                if crashes >= ISOLATE_AFTER {
                    "it is isolated as a failed event when it comes again"
                } else {
                    "it is tried again, and isolated if it crashes the agent again"
                }
            );
        }
        // An isolated event seen in the failed-event list is recorded; once its failed
        // event is gone (retried by hand, discarded) it is forgotten.
        let failed: Vec<EventId> = failed.iter().map(EventId::of).collect();
        suspects.retain_mut(|s| {
            let listed = failed.contains(&s.id);
            let keep = s.crashes < ISOLATE_AFTER || listed || !s.recorded;
            s.recorded |= listed;
            keep
        });
        if suspects.len() > MAX_SUSPECTS {
            suspects.drain(..suspects.len() - MAX_SUSPECTS);
        }
        let file = write_atomically(&path, &suspects)?;
        Ok(InFlight {
            path,
            state: Mutex::new(State {
                file,
                suspects,
                armed: None,
            }),
        })
    }

    /// Writes the slot; a failure is logged (the protection is lost for this event only).
    fn set_slot(&self, st: &mut State, bytes: &[u8; SLOT], armed: Option<EventId>) {
        match st.file.write_all_at(bytes, 0) {
            Ok(()) => st.armed = armed,
            Err(e) => tracing::warn!("{}: {e}", self.path.display()),
        }
    }

    /// Rewrites the file after the suspects changed.
    fn save(&self, st: &mut State) {
        match write_atomically(&self.path, &st.suspects) {
            Ok(file) => {
                st.file = file;
                st.armed = None;
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

impl CrashGuard for InFlight {
    fn before(&self, event: &ChangeEvent) -> Option<u32> {
        let Ok(mut st) = self.state.lock() else {
            return None;
        };
        let id = EventId::of(event);
        if let Some(s) = st.suspects.iter().find(|s| s.id == id)
            && s.crashes >= ISOLATE_AFTER
        {
            return Some(s.crashes);
        }
        self.set_slot(&mut st, &id.slot(), Some(id));
        None
    }

    fn after(&self, event: &ChangeEvent, ok: bool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if !ok || st.suspects.is_empty() {
            return;
        }
        let id = EventId::of(event);
        let before = st.suspects.len();
        st.suspects.retain(|s| s.id != id);
        if st.suspects.len() != before {
            // Decided without crashing: no longer a suspect. The slot still names it
            // (rewriting clears it): set it again.
            self.save(&mut st);
            self.set_slot(&mut st, &id.slot(), Some(id));
        }
    }

    fn idle(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.armed.is_some() {
            self.set_slot(&mut st, &[0u8; SLOT], None);
        }
    }

    fn forget(&self, event: &ChangeEvent) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let id = EventId::of(event);
        let before = st.suspects.len();
        st.suspects.retain(|s| s.id != id);
        if st.suspects.len() != before {
            // Rewriting clears the slot, which names no event now (`before` returned a
            // count, so it was not set for this one).
            let armed = st.armed;
            self.save(&mut st);
            if let Some(armed) = armed {
                self.set_slot(&mut st, &armed.slot(), Some(armed));
            }
        }
    }
}

/// The slot's event (if set) and the suspects; `None` if the file is damaged.
fn read(bytes: &[u8]) -> Option<(Option<EventId>, Vec<Suspect>)> {
    let slot = bytes.get(..SLOT)?;
    let suspects = serde_json::from_slice(bytes.get(SLOT..)?).ok()?;
    Some((EventId::from_slot(slot), suspects))
}

/// Writes a cleared slot and `suspects` to a temporary file (owner-only), syncs it,
/// renames it to `path`, syncs the folder; returns the file, open for the slot's writes.
fn write_atomically(path: &Path, suspects: &[Suspect]) -> anyhow::Result<File> {
    let tmp = path.with_extension("inflight.tmp");
    let what = || format!("writing {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(what)?;
    f.write_all(&[0u8; SLOT]).with_context(what)?;
    serde_json::to_writer(&mut f, suspects).with_context(what)?;
    f.sync_all().with_context(what)?;
    std::fs::rename(&tmp, path).with_context(what)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(what)?;
    }
    Ok(f)
}

/// The in-flight file of the repository of `setup`, opened after reading its failed-event
/// list (under the agent's lock), to be shared by every engine of the process: events are
/// decided one batch at a time (the repository serializes batches), so one slot serves
/// every resource loop.
pub fn open(setup: &crate::setup::Setup) -> anyhow::Result<Arc<InFlight>> {
    let repository = setup.loaded.repository_path();
    let failed: Vec<ChangeEvent> = setup
        .engine
        .repo()
        .failures(None)?
        .into_iter()
        .filter_map(|f| f.event)
        .collect();
    Ok(Arc::new(InFlight::open(&repository, &failed)?))
}

/// Makes a panic in any thread of `idsync run` end the process (abort) after it is
/// reported. Without this a panicking resource loop or timer thread would stop alone,
/// leaving its transaction open and every other loop waiting on it, in an agent that looks
/// alive. Aborting makes a panic a crash like any other: the service manager restarts the
/// agent, nothing uncommitted is kept, and the event or timer in hand (the slot still names
/// it) is counted, and isolated if it does so twice.
pub fn crash_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(
            "a thread of the agent panicked (a bug in idsync): the process ends now, nothing uncommitted is kept; restart it (the service manager does)"
        );
        std::process::abort();
    }));
}

/// Makes `guard` the crash guard of the engine of `setup`.
pub fn attach(setup: &mut crate::setup::Setup, guard: &Arc<InFlight>) {
    setup
        .engine
        .set_crash_guard(Box::new(Shared(guard.clone())));
}

/// One [`InFlight`] shared by several engines.
struct Shared(Arc<InFlight>);

impl CrashGuard for Shared {
    fn before(&self, event: &ChangeEvent) -> Option<u32> {
        self.0.before(event)
    }

    fn after(&self, event: &ChangeEvent, ok: bool) {
        self.0.after(event, ok);
    }

    fn idle(&self) {
        self.0.idle();
    }

    fn forget(&self, event: &ChangeEvent) {
        self.0.forget(event);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use idsync_core::{AttrMap, Op};

    use super::*;

    fn event(key: &str, title: &str) -> ChangeEvent {
        let mut attrs = AttrMap::new();
        attrs.set_text("title", title);
        ChangeEvent {
            resource: "hr".into(),
            key: key.into(),
            op: Op::Create,
            attrs,
            previous: None,
            origin: None,
        }
    }

    /// What a process that died during `event` leaves behind, and the next start.
    fn crash_during(db: &Path, event: &ChangeEvent, failed: &[ChangeEvent]) -> InFlight {
        let g = InFlight::open(db, failed).unwrap();
        assert_eq!(g.before(event), None);
        drop(g);
        InFlight::open(db, failed).unwrap()
    }

    #[test]
    fn an_event_is_isolated_after_two_crashes_and_only_that_event() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        let (k, other) = (event("2", "b"), event("3", "c"));
        let g = crash_during(&db, &k, &[]);
        assert_eq!(g.before(&k), None, "one crash: tried again");
        drop(g);
        let g = InFlight::open(&db, &[]).unwrap();
        assert_eq!(g.before(&k), Some(2));
        assert_eq!(g.before(&other), None);
        // The same account with other content is another event.
        assert_eq!(g.before(&event("2", "changed")), None);
        drop(g);
        // Crashes that are not consecutive do not add up.
        let g = crash_during(&db, &other, &[]);
        drop(g);
        let g = crash_during(&db, &event("4", "d"), &[]);
        drop(g);
        let g = crash_during(&db, &other, &[]);
        assert_eq!(
            g.before(&other),
            None,
            "1 crash, 1 elsewhere, 1 again: not 2 in a row"
        );
        assert_eq!(g.before(&k), Some(2), "an isolated event stays isolated");
        let mode = std::fs::metadata(path_for(&db)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_clean_batch_leaves_nothing_and_a_success_clears_a_suspect() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        let k = event("2", "b");
        let g = InFlight::open(&db, &[]).unwrap();
        assert_eq!(g.before(&k), None);
        g.after(&k, true);
        g.idle();
        drop(g);
        let g = InFlight::open(&db, &[]).unwrap();
        assert!(g.state.lock().unwrap().suspects.is_empty());
        drop(g);
        // One crash, then decided fine: forgotten.
        let g = crash_during(&db, &k, &[]);
        assert_eq!(g.state.lock().unwrap().suspects.len(), 1);
        assert_eq!(g.before(&k), None);
        g.after(&k, true);
        g.idle();
        assert!(g.state.lock().unwrap().suspects.is_empty());
        drop(g);
        assert!(
            InFlight::open(&db, &[])
                .unwrap()
                .state
                .lock()
                .unwrap()
                .suspects
                .is_empty()
        );
    }

    #[test]
    fn an_isolated_event_is_kept_while_its_failed_event_exists() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        let k = event("2", "b");
        drop(crash_during(&db, &k, &[]));
        let g = crash_during(&db, &k, &[]);
        assert_eq!(g.before(&k), Some(2));
        drop(g);
        // Not in the failed-event list yet (the batch that isolates it may not have
        // committed): kept.
        let g = InFlight::open(&db, &[]).unwrap();
        assert_eq!(g.before(&k), Some(2));
        drop(g);
        let g = InFlight::open(&db, std::slice::from_ref(&k)).unwrap();
        assert_eq!(g.before(&k), Some(2), "still a failed event: kept");
        drop(g);
        let g = InFlight::open(&db, &[]).unwrap();
        assert_eq!(g.before(&k), None, "failed event gone (retried, discarded)");
    }

    /// A panic in a thread other than the main one ends the whole process: run in a child
    /// copy of this test binary, which must die of SIGABRT instead of going on.
    #[test]
    fn a_panic_in_any_thread_ends_the_process() {
        const CHILD: &str = "IDSYNC_TEST_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            crash_on_panic();
            let _ = std::thread::spawn(|| panic!("a bug")).join();
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "inflight::tests::a_panic_in_any_thread_ends_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("a bug"));
    }

    /// An isolated firing that will not come again as it is (a timer put off) is forgotten,
    /// in the file too; the slot of the event in hand is kept.
    #[test]
    fn a_forgotten_suspect_is_gone_and_the_slot_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        let k = event("2", "b");
        drop(crash_during(&db, &k, &[]));
        let g = crash_during(&db, &k, &[]);
        let other = event("3", "c");
        assert_eq!(g.before(&other), None);
        assert_eq!(g.before(&k), Some(2));
        g.forget(&k);
        assert!(g.state.lock().unwrap().suspects.is_empty());
        assert_eq!(g.state.lock().unwrap().armed, Some(EventId::of(&other)));
        drop(g);
        let g = InFlight::open(&db, &[]).unwrap();
        let st = g.state.lock().unwrap();
        assert_eq!(
            st.suspects.len(),
            1,
            "the slot named the other event: one crash of it"
        );
        assert_eq!(st.suspects[0].id, EventId::of(&other));
    }

    #[test]
    fn a_damaged_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        std::fs::write(path_for(&db), b"garbage").unwrap();
        let g = InFlight::open(&db, &[]).unwrap();
        assert!(g.state.lock().unwrap().suspects.is_empty());
    }
}
