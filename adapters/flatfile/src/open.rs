//! Opening a feed without trusting its path.
//!
//! The feed path is a name anyone with write access to its folder can point elsewhere: a
//! symbolic link to a password file, a FIFO (an `open` that blocks for good), a link to
//! `/dev/zero` (endless content). So a feed is opened with `O_NOFOLLOW` (unless the
//! resource says `follow_symlinks: true`) and `O_NONBLOCK` (opening a FIFO never waits for a
//! writer), then `fstat`ed on the open descriptor: only a regular file is read, and only up
//! to `max_file_bytes`, checked against the size before reading and again while reading (a
//! file that grows meanwhile is cut, not followed). [`preflight`] does the same type check
//! with `lstat` before the adapter waits for the file to settle, so a refusal is prompt.
//!
//! Errors are [`FeedError`] values: the caller decides on the variant (transient or not),
//! never on text, and no variant carries a byte of the file.

use std::fs::{File, FileType, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::OFlags;

use crate::complete::{Signature, signature_of};
use crate::config::FlatFileConfig;

/// Why a feed was not read. No variant holds file content.
#[derive(Debug)]
pub(crate) enum FeedError {
    /// The file could not be opened or read (missing, permissions, I/O).
    Io(std::io::Error),
    /// A symbolic link, and the resource does not allow them.
    Symlink,
    /// Not a regular file: what it is instead (`a FIFO`, `a directory`, …).
    NotRegular(&'static str),
    /// Larger than `max_file_bytes`: its size (`None`: it grew past the bound while read).
    TooLarge { size: Option<u64>, max: u64 },
    /// The last line has no line ending: cut short or still being written.
    NoFinalNewline { size: u64, line: u64 },
    /// Its size or modification time changed between the moment it was found complete and
    /// the end of the read: a writer is still at work.
    ChangedWhileRead,
}

impl FeedError {
    /// Whether the next pass may find the file fine without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FeedError::Io(_) | FeedError::NoFinalNewline { .. } | FeedError::ChangedWhileRead
        )
    }

    /// The message for the user, naming the file by `shown_path`.
    pub fn message(&self, shown_path: &str) -> String {
        match self {
            FeedError::Io(e) => format!("cannot read {shown_path}: {e}"),
            FeedError::Symlink => format!(
                "{shown_path} is a symbolic link: refused (a feed is read only from a regular \
                 file at its path; set `follow_symlinks: true` to read through links)"
            ),
            FeedError::NotRegular(what) => {
                format!("{shown_path} is {what}, not a regular file: refused")
            }
            FeedError::TooLarge {
                size: Some(size),
                max,
            } => format!("{shown_path} is {size} bytes, more than max_file_bytes {max}: not read"),
            FeedError::TooLarge { size: None, max } => {
                format!("{shown_path} grew past max_file_bytes {max} while it was read: not read")
            }
            FeedError::NoFinalNewline { size, line } => format!(
                "{shown_path} is incomplete: its last line (line {line}) has no line ending \
                 ({size} bytes); it is cut short or still being written, and is read again at \
                 the next pass. If this feed never ends with a line ending, set \
                 `require_final_newline: false`"
            ),
            FeedError::ChangedWhileRead => format!(
                "{shown_path} is still being written: it changed while it was read; nothing of \
                 it is applied, and it is read again at the next pass"
            ),
        }
    }
}

/// What a file type is, for a refusal.
fn describe(t: &FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The type check by path, before waiting for the file to be complete: a symbolic link
/// (unless followed) or anything but a regular file is refused at once. [`open`] checks
/// again on the descriptor it reads from.
pub(crate) fn preflight(config: &FlatFileConfig, path: &Path) -> Result<(), FeedError> {
    let meta = std::fs::symlink_metadata(path).map_err(FeedError::Io)?;
    let meta = if meta.file_type().is_symlink() {
        if !config.follow_symlinks {
            return Err(FeedError::Symlink);
        }
        std::fs::metadata(path).map_err(FeedError::Io)?
    } else {
        meta
    };
    check_type(config, &meta)
}

fn check_type(config: &FlatFileConfig, meta: &Metadata) -> Result<(), FeedError> {
    let t = meta.file_type();
    if !t.is_file() {
        return Err(FeedError::NotRegular(describe(&t)));
    }
    if meta.len() > config.max_file_bytes {
        return Err(FeedError::TooLarge {
            size: Some(meta.len()),
            max: config.max_file_bytes,
        });
    }
    Ok(())
}

/// An open regular file and its `fstat`.
pub(crate) struct Feed {
    file: File,
    pub meta: Metadata,
}

/// Opens `path` without following a symbolic link (unless allowed) and without blocking,
/// and checks on the descriptor that it is a regular file within `max_file_bytes`.
pub(crate) fn open(config: &FlatFileConfig, path: &Path) -> Result<Feed, FeedError> {
    let mut flags = OFlags::NONBLOCK | OFlags::NOCTTY;
    if !config.follow_symlinks {
        flags |= OFlags::NOFOLLOW;
    }
    let flags = i32::try_from(flags.bits())
        .map_err(|_| FeedError::Io(std::io::Error::other("open flags out of range")))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            // O_NOFOLLOW on a link fails with ELOOP.
            if !config.follow_symlinks
                && e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
            {
                FeedError::Symlink
            } else {
                FeedError::Io(e)
            }
        })?;
    let meta = file.metadata().map_err(FeedError::Io)?;
    check_type(config, &meta)?;
    Ok(Feed { file, meta })
}

impl Feed {
    /// The file's bytes, at most `max_file_bytes` of them; with `require_final_newline`,
    /// a last line without a line ending is [`FeedError::NoFinalNewline`]. The file must
    /// end the read with the signature it `settled` at (without one, the signature it had
    /// when opened), else it is [`FeedError::ChangedWhileRead`].
    pub fn read(
        mut self,
        config: &FlatFileConfig,
        settled: Option<Signature>,
    ) -> Result<Vec<u8>, FeedError> {
        let max = config.max_file_bytes;
        let expected = usize::try_from(self.meta.len().min(max)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(expected.saturating_add(1));
        (&mut self.file)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(FeedError::Io)?;
        if bytes.len() as u64 > max {
            return Err(FeedError::TooLarge { size: None, max });
        }
        let expected = settled.unwrap_or_else(|| signature_of(&self.meta));
        let after = signature_of(&self.file.metadata().map_err(FeedError::Io)?);
        if after != expected || bytes.len() as u64 != after.0 {
            return Err(FeedError::ChangedWhileRead);
        }
        if config.require_final_newline
            && let Some(last) = bytes.last()
            && !matches!(last, b'\n' | b'\r')
        {
            let line = bytes.iter().filter(|b| **b == b'\n').count() as u64 + 1;
            return Err(FeedError::NoFinalNewline {
                size: bytes.len() as u64,
                line,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> FlatFileConfig {
        FlatFileConfig::new(dir.join("hr.csv"), &["id"])
    }

    #[test]
    fn regular_file_reads_and_bounds_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hr.csv");
        std::fs::write(&path, "id\n1\n").unwrap();
        let mut c = config(dir.path());
        preflight(&c, &path).unwrap();
        assert_eq!(open(&c, &path).unwrap().read(&c, None).unwrap(), b"id\n1\n");

        c.max_file_bytes = 4;
        assert!(matches!(
            preflight(&c, &path),
            Err(FeedError::TooLarge {
                size: Some(5),
                max: 4
            })
        ));
        assert!(matches!(
            open(&c, &path).map(|_| ()),
            Err(FeedError::TooLarge {
                size: Some(5),
                max: 4
            })
        ));
    }

    #[test]
    fn last_line_without_a_line_ending_is_incomplete_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hr.csv");
        std::fs::write(&path, "id,title\n1,Engineer\n2,Engin").unwrap();
        let mut c = config(dir.path());
        let err = open(&c, &path).unwrap().read(&c, None).unwrap_err();
        assert!(matches!(
            err,
            FeedError::NoFinalNewline { size: 27, line: 3 }
        ));
        assert!(err.is_transient());
        assert!(!err.message("hr.csv").contains("Engin"));
        c.require_final_newline = false;
        assert_eq!(open(&c, &path).unwrap().read(&c, None).unwrap().len(), 27);
    }

    #[test]
    fn a_file_that_changes_after_it_settled_or_opened_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hr.csv");
        std::fs::write(&path, "id\n1\n").unwrap();
        let c = config(dir.path());
        let settled = signature_of(&std::fs::metadata(&path).unwrap());
        // A writer that paused past the settle time truncates the file and goes on: the
        // empty file read now is not what settled.
        std::fs::write(&path, "").unwrap();
        let err = open(&c, &path)
            .unwrap()
            .read(&c, Some(settled))
            .unwrap_err();
        assert!(matches!(err, FeedError::ChangedWhileRead));
        assert!(err.is_transient());
        // Without a settled signature, a file that grows after it was opened.
        std::fs::write(&path, "id\n1\n").unwrap();
        let feed = open(&c, &path).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"2\n"))
            .unwrap();
        assert!(matches!(
            feed.read(&c, None),
            Err(FeedError::ChangedWhileRead)
        ));
        // Unchanged: read.
        let settled = signature_of(&std::fs::metadata(&path).unwrap());
        assert_eq!(
            open(&c, &path).unwrap().read(&c, Some(settled)).unwrap(),
            b"id\n1\n2\n"
        );
    }

    #[test]
    fn links_fifos_and_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t-password-line\n").unwrap();
        let path = dir.path().join("hr.csv");
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let mut c = config(dir.path());
        assert!(matches!(preflight(&c, &path), Err(FeedError::Symlink)));
        assert!(matches!(
            open(&c, &path).map(|_| ()),
            Err(FeedError::Symlink)
        ));
        // Allowed: read through the link.
        c.follow_symlinks = true;
        assert_eq!(open(&c, &path).unwrap().read(&c, None).unwrap().len(), 21);

        // A link to a device: followed, and refused as not a regular file.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(matches!(
            open(&c, &path).map(|_| ()),
            Err(FeedError::NotRegular("a character device"))
        ));
        c.follow_symlinks = false;
        assert!(matches!(
            open(&c, &path).map(|_| ()),
            Err(FeedError::Symlink)
        ));

        // A folder.
        assert!(matches!(
            open(&c, dir.path()).map(|_| ()),
            Err(FeedError::NotRegular("a directory"))
        ));
    }
}
