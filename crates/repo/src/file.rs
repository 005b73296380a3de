//! The repository file outside SQLite: created complete and owner-only, refused when it is
//! not a repository, and never closed by idsync while a connection to it may be open.
//!
//! # Why a descriptor of the file must never be closed early
//!
//! POSIX advisory locks belong to a process and a file, not to a descriptor: closing *any*
//! descriptor of the database file drops every lock the process holds on it, SQLite's
//! included. Another process's reader (the `sqlite3` shell, `idsync status`) then takes
//! itself for the last connection when it closes: it checkpoints and deletes the write-ahead
//! log and its index while this process keeps committing into the unlinked log, so readers
//! see stale data and every later commit is lost at the next crash. SQLite itself keeps such
//! descriptors open until its last connection to the file closes; idsync's own code must do
//! the same. The one descriptor it needs (to read the file ahead, module `warm`) is opened
//! **before** the first connection, shared by every [`crate::Repo`] of the process on that
//! file ([`hold`]), and closed only when the last of them has closed its connections (it is
//! the last field dropped). Nothing else in the process opens the repository's paths.
//!
//! # Creation and recognition
//!
//! A new repository is built under a temporary name, owner-only (mode 0600; SQLite gives its
//! log and index the database file's mode), with its schema, and then linked into place in
//! one step, so that a file at the repository path is always a complete repository. A
//! zero-byte file there is therefore never one of ours (a failed restore, a truncated copy):
//! it is refused, as is any database that another application wrote (schema module), instead
//! of silently starting over and creating every identity again.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::RepoError;

/// The files of the process, by (device, inode), with the one descriptor held for each.
static HELD: Mutex<Vec<(u64, u64, Weak<File>)>> = Mutex::new(Vec::new());

/// The process's descriptor of the repository file at `path`, opened if no [`crate::Repo`]
/// of the process holds it yet. Call it before opening a connection, keep it until every
/// connection opened after it is closed.
pub(crate) fn hold(path: &Path) -> Result<Arc<File>, RepoError> {
    let io = |context: &str, source| RepoError::File {
        context: format!("{context} {}", path.display()),
        source,
    };
    let mut held = HELD.lock().map_err(|_| RepoError::Poisoned)?;
    let meta = std::fs::metadata(path).map_err(|e| io("reading the metadata of", e))?;
    held.retain(|(_, _, file)| file.strong_count() > 0);
    if let Some(file) = held
        .iter()
        .filter(|(dev, ino, _)| (*dev, *ino) == (meta.dev(), meta.ino()))
        .find_map(|(_, _, file)| file.upgrade())
    {
        return Ok(file);
    }
    let file = Arc::new(File::open(path).map_err(|e| io("opening", e))?);
    // Key by what was opened: the path may have been replaced since the stat above.
    let opened = file
        .metadata()
        .map_err(|e| io("reading the metadata of", e))?;
    held.push((opened.dev(), opened.ino(), Arc::downgrade(&file)));
    Ok(file)
}

/// What is at the repository path.
pub(crate) enum Found {
    /// Nothing: a new repository is to be created.
    Nothing,
    /// A file that may be a repository (the schema check decides).
    File,
}

/// Looks at the repository path without opening it: a directory, a device or a zero-byte
/// file is refused.
pub(crate) fn inspect(path: &Path) -> Result<Found, RepoError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(RepoError::NotARepository {
            reason: "it is not a regular file".to_owned(),
        }),
        Ok(meta) if meta.len() == 0 => Err(RepoError::NotARepository {
            reason: "the file is empty (0 bytes; a failed restore or copy?)".to_owned(),
        }),
        Ok(_) => Ok(Found::File),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Found::Nothing),
        Err(source) => Err(RepoError::File {
            context: format!("reading the metadata of {}", path.display()),
            source,
        }),
    }
}

/// Creates a repository at `path`: builds it owner-only under a temporary name in the same
/// folder with `build` (schema and journal mode), then links it into place. If another
/// process created one meanwhile, that one is kept and this one discarded.
pub(crate) fn create(
    path: &Path,
    build: impl FnOnce(&Path) -> Result<(), RepoError>,
) -> Result<(), RepoError> {
    let io = |context: &str, at: &Path, source| RepoError::File {
        context: format!("{context} {}", at.display()),
        source,
    };
    let temp = temporary_name(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| io("creating the repository file", &temp, e))?;
    let built = build(&temp).and_then(|()| match std::fs::hard_link(&temp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        // A file system without hard links: a rename, which a racing creator may overwrite
        // with an equally new repository.
        Err(_) if !path.exists() => {
            std::fs::rename(&temp, path).map_err(|e| io("moving a new repository to", path, e))
        }
        Err(e) => Err(io("linking a new repository to", path, e)),
    });
    for leftover in [temp.clone(), sibling(&temp, "-wal"), sibling(&temp, "-shm")] {
        if let Err(e) = std::fs::remove_file(&leftover)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!("could not remove {}: {e}", leftover.display());
        }
    }
    built
}

/// `<path>.new-<pid>-<n>`: unique per process and creation.
fn temporary_name(path: &Path) -> PathBuf {
    static CREATIONS: AtomicU64 = AtomicU64::new(0);
    let n = CREATIONS.fetch_add(1, Ordering::Relaxed);
    sibling(path, &format!(".new-{}-{n}", std::process::id()))
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repo_of_the_process_shares_one_descriptor_until_the_last_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        std::fs::write(&path, b"x").unwrap();
        let a = hold(&path).unwrap();
        let b = hold(&path).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        drop(a);
        let c = hold(&path).unwrap();
        assert!(Arc::ptr_eq(&b, &c), "still held by b");
        drop((b, c));
        let d = hold(&path).unwrap();
        assert_eq!(Arc::strong_count(&d), 1, "a new descriptor once all went");
    }

    #[test]
    fn an_empty_file_or_a_folder_is_not_a_repository() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        assert!(matches!(inspect(&path), Ok(Found::Nothing)));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            inspect(&path),
            Err(RepoError::NotARepository { .. })
        ));
        assert!(matches!(
            inspect(dir.path()),
            Err(RepoError::NotARepository { .. })
        ));
    }
}
