//! Folder mode: a folder of dated full snapshots (`hr-2026-11-23.csv`), matched by a
//! pattern and processed one per batch in name order.
//!
//! A matching name is picked whatever it is (but a folder); the adapter then opens it with
//! the same rules as a single feed, so a symbolic link or a FIFO among the files is refused
//! by name, not followed and not skipped in silence.
//!
//! The checkpoint remembers the last committed file. Files up to it are done: left in place,
//! or, with `after: archive`, moved to the archive folder at the next fetch — only then is
//! their batch known to be committed, so a crash never archives an unapplied file.
//!
//! A reconcile re-reads the last committed file ([`reconcile_file`]), found in the folder
//! or, once archived, in the archive folder; it is refused while newer files wait, which a
//! pass must apply first.

use std::path::PathBuf;

use crate::complete::marker_path;
use crate::config::{AfterProcessing, FlatFileConfig};

/// The file to read next.
pub(crate) struct Pick {
    pub path: PathBuf,
    pub name: String,
    /// More matching files follow it.
    pub more: bool,
}

/// Whether `name` matches `pattern` (`*` any run of characters, `?` one character).
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether a resource with `config` could read `file` as its feed: the feed path itself,
/// or (when the path is a folder) a file in it that the pattern picks. Paths are compared
/// as given: resolve both against the same base first.
pub fn might_read(config: &FlatFileConfig, file: &std::path::Path) -> bool {
    if file == config.path {
        return true;
    }
    let pattern = config.pattern.as_deref().unwrap_or("*");
    file.parent() == Some(config.path.as_path())
        && file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| matches(pattern, n) && !n.starts_with('.'))
}

/// Archives the files committed already (names up to `last`), then picks the first
/// matching file after `last`. With `resume`, the pass of `last` itself is unfinished (it
/// was committed in parts): `last` is picked again and not archived.
pub(crate) fn next_file(
    config: &FlatFileConfig,
    last: Option<&str>,
    resume: bool,
) -> Result<Option<Pick>, String> {
    let dir = &config.path;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the folder {}: {e}", dir.display()))?;
    let mut names = matching_names(config, entries);
    names.sort();

    if config.after == AfterProcessing::Archive
        && let Some(last) = last
    {
        let archive = archive_dir(config);
        let done = |n: &&String| n.as_str() < last || (!resume && n.as_str() == last);
        for name in names.iter().filter(done) {
            std::fs::create_dir_all(&archive).map_err(|e| {
                format!(
                    "cannot create the archive folder {}: {e}",
                    archive.display()
                )
            })?;
            let from = dir.join(name);
            std::fs::rename(&from, archive.join(name)).map_err(|e| {
                format!(
                    "cannot archive {} to {}: {e}",
                    from.display(),
                    archive.display()
                )
            })?;
            let marker = marker_path(&from, &config.marker_suffix);
            if marker.exists() {
                let _ = std::fs::rename(
                    &marker,
                    marker_path(&archive.join(name), &config.marker_suffix),
                );
            }
        }
    }

    let mut after = names
        .into_iter()
        .filter(|n| last.is_none_or(|l| n.as_str() > l || (resume && n.as_str() == l)));
    Ok(after.next().map(|name| Pick {
        path: dir.join(&name),
        more: after.next().is_some(),
        name,
    }))
}

/// The archive folder of `config` (`archive_dir`, or `archive` in the folder).
fn archive_dir(config: &FlatFileConfig) -> PathBuf {
    config
        .archive_dir
        .clone()
        .unwrap_or_else(|| config.path.join("archive"))
}

/// Why a reconcile cannot read a file of the folder.
#[derive(Debug)]
pub(crate) enum ReconcilePick {
    /// The folder could not be read (may work later).
    Unreadable(String),
    /// The folder is not in a state to reconcile (needs a pass or an operator first).
    Refused(String),
}

/// The file a reconcile re-reads: `last`, the last file a pass committed (in the folder, or
/// in the archive folder once archived). Refused before any file was applied, while newer
/// files wait (a pass applies them first), or when `last` is gone. Archives nothing.
pub(crate) fn reconcile_file(
    config: &FlatFileConfig,
    resource: &str,
    last: Option<&str>,
) -> Result<Pick, ReconcilePick> {
    let dir = &config.path;
    let pass = format!("`idsync run --once --resource {resource}`");
    let Some(last) = last else {
        return Err(ReconcilePick::Refused(format!(
            "reconcile: no file of the folder {} has been applied yet; a pass applies the first one ({pass}), a reconcile then re-reads the last one applied",
            dir.display()
        )));
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ReconcilePick::Unreadable(format!("cannot read the folder {}: {e}", dir.display()))
    })?;
    let mut waiting: Vec<String> = matching_names(config, entries)
        .into_iter()
        .filter(|n| n.as_str() > last)
        .collect();
    waiting.sort();
    if let Some(first) = waiting.first() {
        return Err(ReconcilePick::Refused(format!(
            "reconcile: {} file(s) of the folder {} wait to be applied (the first: {first}); a pass applies them first ({pass}), a reconcile then re-reads the last one",
            waiting.len(),
            dir.display()
        )));
    }
    let in_folder = dir.join(last);
    let archived = archive_dir(config).join(last);
    let path = if std::fs::symlink_metadata(&in_folder).is_ok() {
        in_folder
    } else if config.after == AfterProcessing::Archive
        && std::fs::symlink_metadata(&archived).is_ok()
    {
        archived
    } else {
        return Err(ReconcilePick::Refused(format!(
            "reconcile: {last}, the last file applied, is no longer in the folder {}{}; a reconcile re-reads the file the repository was last synchronized with",
            dir.display(),
            if config.after == AfterProcessing::Archive {
                format!(
                    " nor in the archive folder {}",
                    archive_dir(config).display()
                )
            } else {
                String::new()
            }
        )));
    };
    Ok(Pick {
        path,
        name: last.to_owned(),
        more: false,
    })
}

/// The names in `entries` that the pattern picks: every matching name but folders and
/// hidden names. A symbolic link, a FIFO or a device dropped here is picked like a file and
/// refused when opened (`open`), not skipped in silence.
fn matching_names(config: &FlatFileConfig, entries: std::fs::ReadDir) -> Vec<String> {
    let pattern = config.pattern.as_deref().unwrap_or("*");
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let is_folder = |t: std::fs::FileType| {
                t.is_dir()
                    || (t.is_symlink() && std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir()))
            };
            e.file_type().is_ok_and(|t| !is_folder(t))
        })
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| matches(pattern, n) && !n.starts_with('.'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards() {
        assert!(matches("hr-*.csv", "hr-2026-11-23.csv"));
        assert!(!matches("hr-*.csv", "hr-2026-11-23.csv.done"));
        assert!(matches("hr-????.csv", "hr-2026.csv"));
        assert!(!matches("hr-????.csv", "hr-26.csv"));
        assert!(matches("*", "x"));
        assert!(matches("a*b*c", "aXbYc"));
    }
}
