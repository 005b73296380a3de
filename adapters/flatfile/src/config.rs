//! The flat-file resource configuration: raw serde types, then [`FlatFileConfig::validate`],
//! which collects every problem at once, each naming its field.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// How to read one CSV file.
///
/// An empty field means the attribute is absent (the row's attribute map has no entry for that
/// column), so `a,,c` and a row without column `b` describe the same account.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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
        }
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
        } else if matches!(d, '"' | '\n' | '\r') {
            problems.push(format!(
                "delimiter: {d:?} cannot be used (it is the quote or a line end)"
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
