//! The checkpoint token: what the adapter needs to know about the last committed pass.
//!
//! `xxh3:<16 hex digits of the file's bytes>` followed, after a space, by a JSON object:
//! the parse-config fingerprint (`cfg`), the number of accounts the snapshot holds after
//! the batch (`n`, to detect a missing or damaged snapshot), the header's columns (`cols`, to
//! detect a removed or renamed column), the file name in folder mode (`file`), and whether an
//! initial load is still in progress (`fresh`), whether the batch was one part of a pass
//! (`partial`) and, for a part of a reconcile, how many rows it has committed (`rec`). A
//! bare `xxh3:<hex>` (written by older versions) is still understood: the missing parts are
//! simply not checked.

use serde::{Deserialize, Serialize};

/// The decoded token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Token {
    /// xxh3 of the file's bytes.
    #[serde(skip)]
    pub content: u64,
    /// [`crate::FlatFileConfig::parse_fingerprint`] when the pass was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg: Option<String>,
    /// Accounts in the snapshot after the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// The header's columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<Vec<String>>,
    /// Folder mode: the file this pass read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// An initial load committed in several batches is not finished: accounts not yet
    /// known are still upserts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// The batch was one part of a file's pass; the rest follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// A reconcile of this file is under way (with `partial`): how many of the plan's rows
    /// it has committed, so that a reconcile begun again on the same file resumes there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rec: Option<u64>,
}

impl Token {
    /// The token text.
    pub fn encode(&self) -> String {
        // Serializing these plain fields cannot fail; fall back to the bare hash anyway.
        let extra = serde_json::to_string(self).unwrap_or_default();
        if extra.is_empty() || extra == "{}" {
            format!("xxh3:{:016x}", self.content)
        } else {
            format!("xxh3:{:016x} {extra}", self.content)
        }
    }

    /// Decodes a token; `None` for one this adapter did not write (then the pass is a
    /// full diff, as after a config change).
    pub fn decode(text: &str) -> Option<Token> {
        let rest = text.strip_prefix("xxh3:")?;
        let (hex, extra) = match rest.split_once(' ') {
            Some((hex, extra)) => (hex, Some(extra)),
            None => (rest, None),
        };
        let content = u64::from_str_radix(hex, 16).ok()?;
        let mut token = match extra {
            Some(json) => serde_json::from_str::<Token>(json).ok()?,
            None => Token::default(),
        };
        token.content = content;
        Some(token)
    }
}

/// Formats a fingerprint as in the token.
pub(crate) fn hex(v: u64) -> String {
    format!("{v:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bare_form() {
        let t = Token {
            content: 0xab,
            cfg: Some(hex(7)),
            n: Some(3),
            cols: Some(vec!["id".into(), "a b;c".into()]),
            file: None,
            fresh: true,
            partial: false,
            rec: None,
        };
        let text = t.encode();
        assert!(text.starts_with("xxh3:00000000000000ab {"), "{text}");
        assert_eq!(Token::decode(&text), Some(t));
        let bare = Token::decode("xxh3:00000000000000ff").unwrap();
        assert_eq!(bare.content, 0xff);
        assert_eq!(bare.n, None);
        assert_eq!(Token::decode("cookie:1"), None);
        assert_eq!(Token::decode("xxh3:zz"), None);
        let reconciling = Token {
            partial: true,
            rec: Some(3000),
            ..Token::default()
        };
        assert_eq!(
            Token::decode(&reconciling.encode()),
            Some(reconciling.clone())
        );
        assert!(reconciling.encode().contains("\"rec\":3000"));
    }
}
