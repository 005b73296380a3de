//! Copies committed WAL frames into the database file on a thread of its own.
//!
//! A commit in WAL mode appends the batch's pages to the write-ahead log and syncs it: from
//! then on the batch is durable. Copying those pages into the database file (the
//! checkpoint) is housekeeping, but SQLite does it by default inside the committing call
//! once the log passes 1,000 pages, so every large batch paid for it (a fifth of a
//! million-row initial load, half of the commit of an incremental pass) before the agent
//! could read the next batch. Here a WAL hook on the repository's own connection sees the
//! log's size after each commit: past [`WAKE_PAGES`] (SQLite's own default threshold) it
//! wakes this thread, whose second connection runs a *passive* checkpoint (it never waits
//! for or blocks the writer or the readers; the writer starts the log over once a
//! checkpoint has caught up); past [`WAL_SAFETY_NET_PAGES`], which only a stuck or failing
//! background checkpoint lets the log reach, the committing connection checkpoints itself.
//! Small commits (LDAP persist mode) thus cost no checkpoint at all until the log has
//! grown.
//!
//! The log only starts over from its beginning when a write transaction begins after a
//! checkpoint copied every frame; a checkpoint still running when the next batch begins
//! leaves that batch appending. Back-to-back batches would so grow the log without end, so
//! once it passes [`RESTART_PAGES`], [`crate::Repo::begin`] waits for the checkpoint
//! ([`Checkpointer::settle`]) before it begins: one checkpoint's wait per 128 MiB of log.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;

use crate::error::{Context, RepoError};

/// The log size (in pages) past which the committing connection checkpoints by itself:
/// larger than any batch, so only a stuck or failing background checkpoint lets it come
/// into play.
pub const WAL_SAFETY_NET_PAGES: i64 = 262_144;

/// The log size (in pages) from which a commit wakes the checkpoint thread.
pub(crate) const WAKE_PAGES: i64 = 1_000;

/// The log size (in pages, 128 MiB at 4 KiB) from which the next transaction waits for
/// the checkpoint, so that it starts the log over.
pub(crate) const RESTART_PAGES: i64 = 32_768;

/// The background checkpoint thread of one repository file. Dropping it stops the thread
/// (after the checkpoint in progress, if any).
pub(crate) struct Checkpointer {
    wake: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// The log's size in pages after the last commit, as the WAL hook saw it.
    log_pages: Arc<AtomicI64>,
    /// [`RESTART_PAGES`], smaller in tests.
    pub(crate) restart_pages: i64,
}

/// What the thread is asked for.
enum Request {
    /// A checkpoint, and whom to tell when it is done.
    Checkpoint(Option<Sender<()>>),
    /// Stop (the WAL hook keeps a sender alive as long as its connection, so the thread
    /// cannot wait for every sender to go).
    Stop,
}

impl Checkpointer {
    /// Opens a second connection to `path` and starts the thread. On error the caller
    /// leaves checkpoints to the committing connection, as SQLite does by default.
    pub(crate) fn start(path: &Path) -> Result<Checkpointer, String> {
        let setup = || -> Result<Connection, RepoError> {
            let conn = Connection::open(path).ctx("opening a checkpoint connection")?;
            conn.busy_timeout(crate::BUSY_TIMEOUT)
                .ctx("setting the busy timeout of the checkpoint connection")?;
            // A checkpoint syncs the database file before the log may be reused.
            conn.pragma_update(None, "synchronous", "FULL")
                .ctx("setting synchronous=FULL on the checkpoint connection")?;
            Ok(conn)
        };
        let conn = setup().map_err(|e| e.to_string())?;
        let (wake, woken) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("idsync-checkpoint".to_owned())
            .spawn(move || run(&conn, &woken))
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
            log_pages: Arc::new(AtomicI64::new(0)),
            restart_pages: RESTART_PAGES,
        })
    }

    /// Installs the WAL hook on the committing connection `conn` (see the module
    /// documentation). It replaces SQLite's automatic checkpoint.
    pub(crate) fn hook(&self, conn: &mut Connection) -> Result<(), RepoError> {
        let Some(wake) = self.wake.clone() else {
            return Ok(());
        };
        let log_pages = self.log_pages.clone();
        conn.wal_hook(Some(
            move |wal: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                let pages = i64::from(pages);
                log_pages.store(pages, Ordering::Relaxed);
                if pages >= WAL_SAFETY_NET_PAGES {
                    tracing::warn!(
                        pages,
                        "the write-ahead log was not checkpointed in the background: checkpointing in the commit"
                    );
                    wal.checkpoint()?;
                } else if pages >= WAKE_PAGES {
                    // A request already waiting covers this commit too.
                    let _ = wake.try_send(Request::Checkpoint(None));
                }
                Ok(())
            },
        ))
        .ctx("installing the WAL hook")
    }

    /// Before a transaction begins: if the log has grown past [`RESTART_PAGES`], waits
    /// for a checkpoint of everything committed, so the transaction starts the log over.
    pub(crate) fn before_begin(&self) {
        if self.log_pages.load(Ordering::Relaxed) >= self.restart_pages {
            self.settle();
            // Until the next commit reports the new size.
            self.log_pages.store(0, Ordering::Relaxed);
        }
    }

    /// Waits until a checkpoint that started after this call has finished (the one in
    /// progress, if any, finishes first).
    pub(crate) fn settle(&self) {
        let Some(wake) = &self.wake else {
            return;
        };
        let (done, finished) = channel();
        if wake.send(Request::Checkpoint(Some(done))).is_ok() {
            let _ = finished.recv();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some(wake) = self.wake.take() {
            let _ = wake.send(Request::Stop);
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

fn run(conn: &Connection, woken: &Receiver<Request>) {
    while let Ok(Request::Checkpoint(done)) = woken.recv() {
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match result {
            Ok((log, copied)) => {
                tracing::trace!(log, copied, "background checkpoint");
            }
            // The committing connection's safety net takes over if this keeps failing.
            Err(e) => tracing::warn!("background checkpoint failed: {e}"),
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}
