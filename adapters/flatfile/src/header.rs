//! The header check of `idsync check`: when a single-file feed exists, its header must name
//! every key column (and have no unnamed or duplicate column), or every pass will refuse
//! the file. Found before a run, the problem names the resource, the file and the key.

use std::io::Read;

use idsync_core::AdapterError;

use crate::config::{Encoding, FlatFileConfig};
use crate::rows::Rows;

/// How much of the feed is read to find its header line.
const HEADER_BYTES: u64 = 1 << 20;

/// The permanent problem the header of `config.path` would cause, as a full message;
/// `None` when the header is fine, or there is nothing to check now: a folder of files
/// (`pattern`), a file without a header line, or a feed that does not exist yet.
pub fn header_problem(resource: &str, config: &FlatFileConfig) -> Option<String> {
    if config.pattern.is_some() || !config.header || !config.path.is_file() {
        return None;
    }
    let shown = config.path.display().to_string();
    let mut bytes = Vec::new();
    let read = std::fs::File::open(&config.path)
        .and_then(|f| f.take(HEADER_BYTES).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Some(format!("cannot read {shown}: {e}"));
    }
    // Only whole lines: a field cut at the read limit is not the file's.
    if bytes.len() as u64 == HEADER_BYTES
        && let Some(end) = bytes.iter().rposition(|b| *b == b'\n')
    {
        bytes.truncate(end + 1);
    }
    let data = match config.encoding {
        Encoding::Utf8 => bytes,
        Encoding::Latin1 => {
            let (text, _) = encoding_rs::WINDOWS_1252.decode_without_bom_handling(&bytes);
            text.into_owned().into_bytes()
        }
    };
    match Rows::open(&data, config, resource, &shown) {
        Err(AdapterError::Permanent { message, .. }) => Some(message),
        // An empty file or one being written may be complete at the next pass.
        Err(AdapterError::Transient { .. } | AdapterError::DeleteGuard { .. }) | Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_column_missing_from_an_existing_feed_is_a_problem() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("hr.csv");
        std::fs::write(&path, "empno,mail\n1,a@x\n").unwrap_or_else(|e| panic!("{e}"));
        let config = FlatFileConfig::new(&path, &["employee_id"]);
        let problem = header_problem("hr", &config).unwrap_or_default();
        assert!(problem.contains("employee_id"), "{problem}");
        assert!(problem.contains("hr.csv"), "{problem}");
        let good = FlatFileConfig::new(&path, &["EMPNO"]);
        assert_eq!(header_problem("hr", &good), None);
        let absent = FlatFileConfig::new(dir.path().join("later.csv"), &["employee_id"]);
        assert_eq!(header_problem("hr", &absent), None);
    }
}
