//! One agent per repository: `idsync run` holds an exclusive lock on `<repository>.lock`
//! for as long as it runs. The lock is released by the kernel when the process exits, even
//! on SIGKILL, so a crashed agent never blocks the next one.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
    path: PathBuf,
}

impl AgentLock {
    /// The lock file path for a repository file.
    pub fn path_for(repository: &Path) -> PathBuf {
        crate::config::beside(repository, crate::config::LOCK_SUFFIX)
    }

    /// Takes the lock or says who holds it.
    pub fn acquire(repository: &Path) -> anyhow::Result<AgentLock> {
        let path = Self::path_for(repository);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot open the agent lock: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "another idsync agent{} is already running on {}; one agent per repository (lock file {})",
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    },
                    repository.display(),
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                anyhow::bail!("{}: cannot take the agent lock: {e}", path.display())
            }
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(AgentLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an agent holds the lock on `repository` right now.
    pub fn is_held(repository: &Path) -> bool {
        let path = Self::path_for(repository);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => matches!(f.try_lock(), Err(TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idsync.db");
        let first = AgentLock::acquire(&db).unwrap();
        assert!(AgentLock::is_held(&db));
        let err = AgentLock::acquire(&db).unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(!AgentLock::is_held(&db));
        AgentLock::acquire(&db).unwrap();
    }
}
