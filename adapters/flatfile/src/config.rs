//! The flat-file resource configuration: raw serde types, then [`FlatFileConfig::validate`],
//! which collects every problem at once, each naming its field.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub use idsync_core::DeleteGuard;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// How to read one CSV file.
///
/// An empty field means the attribute is absent (the row's attribute map has no entry for that
/// column), so `a,,c` and a row without column `b` describe the same account.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlatFileConfig {
    /// The CSV file. The agent resolves a relative path against the config file's folder
    /// before building the adapter.
    pub path: PathBuf,
    /// The key column(s), at least one. YAML may give one name (`key: emp_id`) or a list
    /// (`key: [company, emp_id]`). Several columns make a composite key: the values joined with
    /// `+`, each with `\` escaped as `\\` and `+` as `\+`.
    #[serde(deserialize_with = "one_or_many")]
    pub key: Vec<String>,
    /// The field delimiter, one ASCII character (default `,`).
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Whether the first line names the columns (default true). When false, `columns` must
    /// name them.
    #[serde(default = "default_true")]
    pub header: bool,
    /// The column names, for a file without a header line; absent when `header` is true.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Whether to trim whitespace around fields and header names (default true).
    #[serde(default = "default_true")]
    pub trim: bool,
    /// The quote character, one ASCII character (default `"`); doubled inside a quoted field.
    #[serde(default = "default_quote")]
    pub quote: char,
    /// Whether quotes are special at all (default true). False: a quote is an ordinary byte.
    #[serde(default = "default_true")]
    pub quoting: bool,
    /// The file's character encoding: `utf-8` (default; a byte order mark is skipped) or
    /// `latin-1` (ISO-8859-1, decoded as its superset windows-1252).
    #[serde(default)]
    pub encoding: Encoding,
    /// Lines starting with this ASCII character are comments and skipped (default: none).
    #[serde(default)]
    pub comment: Option<char>,
    /// Multi-valued columns: column name → the separator between its values
    /// (e.g. `{ groups: ";" }`). Empty values are dropped.
    #[serde(default)]
    pub multi_valued: BTreeMap<String, String>,
    /// Folder mode: `path` is a folder and every file whose name matches this pattern
    /// (`*` and `?` wildcards) is a full snapshot, processed in name order (so dated names
    /// like `hr-2026-11-23.csv` run oldest first).
    #[serde(default)]
    pub pattern: Option<String>,
    /// Folder mode: what happens to a file once its batch is committed (default `leave`).
    #[serde(default)]
    pub after: AfterProcessing,
    /// Folder mode with `after: archive`: where processed files go (default `<path>/archive`).
    #[serde(default)]
    pub archive_dir: Option<PathBuf>,
    /// How the agent knows a file is completely written (default `settle`).
    #[serde(default)]
    pub completion: Completion,
    /// `completion: settle`: milliseconds the size and modification time must stay
    /// unchanged before the file is read (default 1000).
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// `completion: marker`: the marker file's suffix (default `.done`: `hr.csv.done`).
    /// The file is read only when its marker is at least as new as the file.
    #[serde(default = "default_marker_suffix")]
    pub marker_suffix: String,
    /// The accidental-delete guard.
    #[serde(default)]
    pub delete_guard: DeleteGuard,
    /// At most this many events per committed batch (default 20000): a large first load
    /// commits in parts, each with its own checkpoint, so memory stays bounded.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Any number: changing it (or any other parsing option) tells the adapter that a changed
    /// header was reviewed, so a removed or renamed column no longer stops the resource.
    #[serde(default)]
    pub header_version: u64,
    /// Whether a quoted value may span lines (default false). Off, a record whose quoted
    /// field holds a line break is rejected, naming the line where the quote opened: a stray
    /// quote would otherwise swallow the rows up to the next quote into one value.
    #[serde(default)]
    pub multiline: bool,
    /// Whether the file must end with a line ending (default true). A last line without one
    /// means a file cut short or still being written: the pass stops (transient) and the
    /// file is read again at the next pass, so a cut value is never stored.
    #[serde(default = "default_true")]
    pub require_final_newline: bool,
    /// Whether a symbolic link at `path` (or, in folder mode, among the files) is read
    /// through (default false: refused). Only regular files are read, either way.
    #[serde(default)]
    pub follow_symlinks: bool,
    /// The largest value of one field, in bytes (default 64 KiB); a record with a larger
    /// one is rejected.
    #[serde(default = "default_max_field_bytes")]
    pub max_field_bytes: u64,
    /// The largest record, in bytes of the file (default 1 MiB); a larger one is rejected
    /// and, as its rows cannot be trusted, the pass applies no deletes.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// The largest file, in bytes (default 4 GiB), checked before reading and while
    /// reading; a larger file stops the pass.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
}

/// `encoding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum Encoding {
    /// UTF-8, with or without a byte order mark.
    #[default]
    #[serde(rename = "utf-8", alias = "utf8", alias = "UTF-8")]
    Utf8,
    /// ISO-8859-1 (read as windows-1252, its superset).
    #[serde(
        rename = "latin-1",
        alias = "latin1",
        alias = "iso-8859-1",
        alias = "windows-1252"
    )]
    Latin1,
}

/// `after` (folder mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterProcessing {
    /// Leave processed files where they are; the checkpoint remembers the last one.
    #[default]
    Leave,
    /// Move processed files to `archive_dir` (done at the next fetch, once committed).
    Archive,
}

/// `completion`: the signal that a file is completely written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Completion {
    /// Size and modification time unchanged for `settle_ms`.
    #[default]
    Settle,
    /// A marker file (`hr.csv.done`) at least as new as the file.
    Marker,
    /// The writer replaces the file by an atomic rename: whatever is there is complete.
    Rename,
}

/// 64 KiB: far above any HR attribute, far below memory trouble.
pub const DEFAULT_MAX_FIELD_BYTES: u64 = 64 * 1024;
/// 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1024 * 1024;
/// 4 GiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

fn default_max_field_bytes() -> u64 {
    DEFAULT_MAX_FIELD_BYTES
}

fn default_max_record_bytes() -> u64 {
    DEFAULT_MAX_RECORD_BYTES
}

fn default_max_file_bytes() -> u64 {
    DEFAULT_MAX_FILE_BYTES
}

fn default_batch_size() -> usize {
    20_000
}

fn default_quote() -> char {
    '"'
}

fn default_settle_ms() -> u64 {
    1000
}

fn default_marker_suffix() -> String {
    ".done".to_owned()
}

fn default_delimiter() -> char {
    ','
}

fn default_true() -> bool {
    true
}

/// Accepts `key: id` as well as `key: [a, b]`.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;
    impl<'de> Visitor<'de> for OneOrMany {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a column name or a list of column names")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(vec![v])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1));
            while let Some(name) = seq.next_element::<String>()? {
                out.push(name);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(OneOrMany)
}

impl FlatFileConfig {
    /// A config for `path` keyed by `key`, every other field at its default.
    pub fn new(path: impl Into<PathBuf>, key: &[&str]) -> Self {
        FlatFileConfig {
            path: path.into(),
            key: key.iter().map(|k| (*k).to_owned()).collect(),
            delimiter: default_delimiter(),
            header: true,
            columns: None,
            trim: true,
            quote: default_quote(),
            quoting: true,
            encoding: Encoding::Utf8,
            comment: None,
            multi_valued: BTreeMap::new(),
            pattern: None,
            after: AfterProcessing::Leave,
            archive_dir: None,
            completion: Completion::Settle,
            settle_ms: default_settle_ms(),
            marker_suffix: default_marker_suffix(),
            delete_guard: DeleteGuard::default(),
            batch_size: default_batch_size(),
            header_version: 0,
            multiline: false,
            require_final_newline: true,
            follow_symlinks: false,
            max_field_bytes: DEFAULT_MAX_FIELD_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }

    /// A stable fingerprint of every option that changes how rows are read (not of the
    /// path, completion, folder handling or the guard). Folded into the checkpoint so that a
    /// config change with an unchanged file is diffed again, and so that a changed header is
    /// accepted once the config was touched. The options that decide which records are
    /// rejected (`multiline`, the field and record bounds) count only when they are not at
    /// their defaults, so checkpoints written before they existed stay valid.
    pub fn parse_fingerprint(&self) -> u64 {
        let mut text = format!(
            "{:?}|{}|{}|{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}|{}",
            self.key,
            self.delimiter,
            self.header,
            self.columns,
            self.trim,
            self.quote,
            self.quoting,
            self.encoding,
            self.comment,
            self.multi_valued,
            self.header_version
        );
        if self.multiline {
            text.push_str("|multiline");
        }
        if self.max_field_bytes != DEFAULT_MAX_FIELD_BYTES
            || self.max_record_bytes != DEFAULT_MAX_RECORD_BYTES
        {
            text.push_str(&format!(
                "|{}|{}",
                self.max_field_bytes, self.max_record_bytes
            ));
        }
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }

    /// Every problem with this config, each starting with the field it is about
    /// (e.g. `key: at least one key column is required`). Empty when the config is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.path.as_os_str().is_empty() {
            problems.push("path: must name the CSV file".to_owned());
        }

        if self.key.is_empty() {
            problems.push("key: at least one key column is required".to_owned());
        }
        let mut seen = HashSet::new();
        for name in &self.key {
            if name.trim().is_empty() {
                problems.push("key: a key column name is empty".to_owned());
            } else if !seen.insert(name.to_lowercase()) {
                problems.push(format!("key: column '{name}' is listed twice"));
            }
        }

        let d = self.delimiter;
        if !d.is_ascii() {
            problems.push(format!(
                "delimiter: must be a single ASCII character, not '{d}'"
            ));
        } else if matches!(d, '\n' | '\r') || d == self.quote {
            problems.push(format!(
                "delimiter: {d:?} cannot be used (it is the quote or a line end)"
            ));
        }

        for (field, c) in [("quote", Some(self.quote)), ("comment", self.comment)] {
            let Some(c) = c else { continue };
            if !c.is_ascii() || matches!(c, '\n' | '\r') {
                problems.push(format!(
                    "{field}: must be a single ASCII character other than a line end, not {c:?}"
                ));
            } else if c == d && field == "comment" {
                problems.push(format!("{field}: {c:?} is also the delimiter"));
            }
        }
        for (column, sep) in &self.multi_valued {
            if sep.is_empty() {
                problems.push(format!("multi_valued.{column}: the separator is empty"));
            }
            if self.key.iter().any(|k| k.eq_ignore_ascii_case(column)) {
                problems.push(format!(
                    "multi_valued.{column}: a key column cannot be multi-valued"
                ));
            }
        }
        if let Some(p) = &self.pattern {
            if p.is_empty() || p.contains('/') || p.contains('\\') {
                problems.push(format!(
                    "pattern: must be a file name pattern without folders, not {p:?}"
                ));
            }
        } else {
            if self.after != AfterProcessing::Leave {
                problems.push("after: only with `pattern` (folder mode)".to_owned());
            }
            if self.archive_dir.is_some() {
                problems.push("archive_dir: only with `pattern` (folder mode)".to_owned());
            }
        }
        if self.completion == Completion::Marker && self.marker_suffix.is_empty() {
            problems.push("marker_suffix: must not be empty".to_owned());
        }
        if self.batch_size == 0 {
            problems.push("batch_size: must be at least 1".to_owned());
        }
        for (field, value) in [
            ("max_field_bytes", self.max_field_bytes),
            ("max_record_bytes", self.max_record_bytes),
            ("max_file_bytes", self.max_file_bytes),
        ] {
            if value == 0 {
                problems.push(format!("{field}: must be at least 1"));
            }
        }
        let ratio = self.delete_guard.max_delete_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            problems.push(format!(
                "delete_guard.max_delete_ratio: must be between 0 and 1, not {ratio}"
            ));
        }

        match (&self.columns, self.header) {
            (Some(_), true) => problems.push(
                "columns: only allowed with `header: false` (the header line names the columns)"
                    .to_owned(),
            ),
            (None, false) => {
                problems.push("columns: required when `header: false`".to_owned());
            }
            (Some(columns), false) => {
                problems.extend(validate_columns(columns, &self.key));
            }
            (None, true) => {}
        }
        problems
    }
}

fn validate_columns(columns: &[String], key: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if columns.is_empty() {
        problems.push("columns: at least one column is required".to_owned());
    }
    let mut seen = HashSet::new();
    for (i, name) in columns.iter().enumerate() {
        if name.trim().is_empty() {
            problems.push(format!("columns: column {} has an empty name", i + 1));
        } else if !seen.insert(name.to_lowercase()) {
            problems.push(format!(
                "columns: '{name}' is listed twice (names are case-insensitive)"
            ));
        }
    }
    for k in key {
        if !k.trim().is_empty() && !seen.contains(&k.to_lowercase()) {
            problems.push(format!("key: column '{k}' is not one of `columns`"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> FlatFileConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_single_key() {
        let c = parse("path: hr.csv\nkey: emp_id\n");
        assert_eq!(c, FlatFileConfig::new("hr.csv", &["emp_id"]));
        assert!(c.validate().is_empty());
    }

    #[test]
    fn key_list_and_options() {
        let c = parse(
            "path: hr.csv\nkey: [company, emp_id]\ndelimiter: \";\"\nheader: false\n\
             columns: [company, emp_id, cn]\ntrim: false\n",
        );
        assert_eq!(c.key, ["company", "emp_id"]);
        assert_eq!(c.delimiter, ';');
        assert!(!c.header && !c.trim);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn feed_safety_options_default_and_validate() {
        let c = parse("path: hr.csv\nkey: id\n");
        assert!(!c.multiline && c.require_final_newline && !c.follow_symlinks);
        assert_eq!(
            (c.max_field_bytes, c.max_record_bytes, c.max_file_bytes),
            (65_536, 1_048_576, 4_294_967_296)
        );
        check(
            "path: a\nkey: id\nmax_field_bytes: 0\nmax_record_bytes: 0\nmax_file_bytes: 0\n",
            &[
                "max_field_bytes: must be at least 1",
                "max_record_bytes: must be at least 1",
                "max_file_bytes: must be at least 1",
            ],
        );
    }

    #[test]
    fn fingerprint_is_unchanged_by_the_new_options_at_their_defaults() {
        // The text the fingerprint hashed before `multiline` and the bounds existed:
        // checkpoints written then stay valid.
        let c = FlatFileConfig::new("hr.csv", &["id"]);
        let before = format!(
            "{:?}|{}|{}|{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}|{}",
            c.key,
            c.delimiter,
            c.header,
            c.columns,
            c.trim,
            c.quote,
            c.quoting,
            c.encoding,
            c.comment,
            c.multi_valued,
            c.header_version
        );
        assert_eq!(
            c.parse_fingerprint(),
            xxhash_rust::xxh3::xxh3_64(before.as_bytes())
        );
        // Options that change which records are rejected re-read an unchanged file.
        for adjust in [
            (|c: &mut FlatFileConfig| c.multiline = true) as fn(&mut FlatFileConfig),
            |c| c.max_field_bytes = 10,
            |c| c.max_record_bytes = 10,
        ] {
            let mut other = c.clone();
            adjust(&mut other);
            assert_ne!(other.parse_fingerprint(), c.parse_fingerprint());
        }
    }

    #[test]
    fn tab_delimiter() {
        let c = parse("path: hr.tsv\nkey: id\ndelimiter: \"\\t\"\n");
        assert_eq!(c.delimiter, '\t');
        assert!(c.validate().is_empty());
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = serde_yaml::from_str::<FlatFileConfig>("path: a\nkey: id\nkeys: id\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `keys`"), "{err}");
    }

    fn check(yaml: &str, expected: &[&str]) {
        assert_eq!(parse(yaml).validate(), expected, "for {yaml:?}");
    }

    #[test]
    fn validation_messages() {
        check(
            "path: ''\nkey: []\n",
            &[
                "path: must name the CSV file",
                "key: at least one key column is required",
            ],
        );
        check(
            "path: a\nkey: [id, ' ', ID]\n",
            &[
                "key: a key column name is empty",
                "key: column 'ID' is listed twice",
            ],
        );
        check(
            "path: a\nkey: id\ndelimiter: é\n",
            &["delimiter: must be a single ASCII character, not 'é'"],
        );
        check(
            "path: a\nkey: id\ndelimiter: '\"'\n",
            &["delimiter: '\"' cannot be used (it is the quote or a line end)"],
        );
        check(
            "path: a\nkey: id\ncolumns: [id]\n",
            &["columns: only allowed with `header: false` (the header line names the columns)"],
        );
        check(
            "path: a\nkey: id\nheader: false\n",
            &["columns: required when `header: false`"],
        );
        check(
            "path: a\nkey: [id, mail]\nheader: false\ncolumns: [id, '', Id]\n",
            &[
                "columns: column 2 has an empty name",
                "columns: 'Id' is listed twice (names are case-insensitive)",
                "key: column 'mail' is not one of `columns`",
            ],
        );
    }
}
