//! Reading search responses without panicking: entries, intermediate messages and the
//! RFC 4533 controls.
//!
//! ldap3's own `SearchEntry::construct` and its control parsers panic on malformed input and
//! decide text versus binary by UTF-8 validity alone. Entries are therefore decoded here from
//! the BER structure, and the control parsers run under `catch_unwind`, so a malformed message
//! is a protocol error for this resource, never a crash of the agent.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use idsync_core::{AttrMap, Value};
use ldap3::ResultEntry;
use ldap3::asn1::{StructureTag, TagClass};
use ldap3::controls::{ControlParser, SyncDone, SyncInfo, SyncState};

/// OID of the Sync State control.
const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// OID of the Sync Done control.
const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";

/// One decoded entry: its DN and raw attribute values.
#[derive(Debug)]
pub(crate) struct RawEntry {
    pub dn: String,
    pub attrs: Vec<(String, Vec<Vec<u8>>)>,
}

/// What one search response message is.
pub(crate) enum Message {
    /// A search result entry, with its sync state when the search was a sync search.
    Entry(RawEntry, Option<SyncState>),
    /// A sync info intermediate message.
    Info(SyncInfo),
    /// A referral or an intermediate message of another kind: ignored.
    Other,
}

/// Runs a parser that may panic; a panic becomes an error message.
fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| format!("malformed {what}"))
}

/// Decodes one message of a search response.
pub(crate) fn decode(re: ResultEntry) -> Result<Message, String> {
    let (tag, controls) = (re.0, re.1);
    if tag.class == TagClass::Application && tag.id == 25 {
        let info = contained("sync info message", || {
            ldap3::controls::parse_syncinfo(ResultEntry::new(tag))
        })?;
        return Ok(Message::Info(info));
    }
    if tag.class != TagClass::Application || tag.id != 4 {
        return Ok(Message::Other);
    }
    // Controls are read before the entry is taken apart.
    let mut state = None;
    for c in &controls {
        if c.1.ctype == SYNC_STATE_OID {
            let val =
                c.1.val
                    .clone()
                    .ok_or("sync state control without a value")?;
            state = Some(contained("sync state control", || SyncState::parse(&val))?);
        }
    }
    Ok(Message::Entry(entry(tag)?, state))
}

fn entry(tag: StructureTag) -> Result<RawEntry, String> {
    let mut parts = tag
        .expect_constructed()
        .ok_or("entry is not a sequence")?
        .into_iter();
    let dn = parts
        .next()
        .and_then(StructureTag::expect_primitive)
        .ok_or("entry without a DN")?;
    let dn = String::from_utf8(dn).map_err(|_| "entry DN is not UTF-8")?;
    let mut attrs = Vec::new();
    if let Some(list) = parts.next() {
        for pa in list.expect_constructed().ok_or("attribute list")? {
            let mut pa = pa.expect_constructed().ok_or("attribute")?.into_iter();
            let name = pa
                .next()
                .and_then(StructureTag::expect_primitive)
                .ok_or("attribute without a name")?;
            let name = String::from_utf8(name).map_err(|_| "attribute name is not UTF-8")?;
            let mut values = Vec::new();
            if let Some(set) = pa.next() {
                for v in set.expect_constructed().ok_or("attribute values")? {
                    values.push(v.expect_primitive().ok_or("attribute value")?);
                }
            }
            attrs.push((name, values));
        }
    }
    Ok(RawEntry { dn, attrs })
}

/// The Sync Done control of a search result, if any.
pub(crate) fn sync_done(ctrls: &[ldap3::controls::Control]) -> Result<Option<SyncDone>, String> {
    for c in ctrls {
        if c.1.ctype == SYNC_DONE_OID {
            return match &c.1.val {
                Some(val) => Ok(Some(contained("sync done control", || {
                    SyncDone::parse(val)
                })?)),
                None => Ok(Some(SyncDone {
                    cookie: None,
                    refresh_deletes: false,
                })),
            };
        }
    }
    Ok(None)
}

/// The text form of an entryUUID (`8-4-4-4-12` lowercase hex) from its 16 raw bytes.
pub(crate) fn uuid_text(raw: &[u8]) -> Result<String, String> {
    if raw.len() != 16 {
        return Err(format!("entryUUID of {} bytes (expected 16)", raw.len()));
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(36);
    for (i, b) in raw.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Ok(text)
}

/// How raw entries become account attribute maps.
pub(crate) struct Shaper {
    binary: HashSet<String>,
    dn_attribute: String,
    /// Attributes the adapter asked for for itself, dropped from the map.
    drop: HashSet<String>,
}

impl Shaper {
    pub fn new(binary: &[String], dn_attribute: &str, drop: &[&str]) -> Shaper {
        Shaper {
            binary: binary.iter().map(|b| b.to_lowercase()).collect(),
            dn_attribute: dn_attribute.to_owned(),
            drop: drop.iter().map(|d| d.to_lowercase()).collect(),
        }
    }

    /// The account attributes of `e`: every attribute (name options such as `;binary`
    /// stripped), values in server order, binary where configured or not UTF-8; plus the DN.
    pub fn attrs(&self, e: RawEntry) -> AttrMap {
        let mut m = AttrMap::new();
        for (name, values) in e.attrs {
            let mut parts = name.split(';');
            let base = parts.next().unwrap_or(&name);
            let binary_option = parts.any(|o| o.eq_ignore_ascii_case("binary"));
            let folded = base.to_lowercase();
            if values.is_empty() || self.drop.contains(&folded) {
                continue;
            }
            let binary = binary_option
                || self.binary.contains(&folded)
                || values.iter().any(|v| std::str::from_utf8(v).is_err());
            let values: Vec<Value> = values
                .into_iter()
                .map(|v| {
                    if binary {
                        Value::Binary(v)
                    } else {
                        // Checked above: every value is UTF-8, so no copy is made.
                        String::from_utf8(v)
                            .map(Value::Text)
                            .unwrap_or_else(|e| Value::Binary(e.into_bytes()))
                    }
                })
                .collect();
            // The same attribute under several options (`cn`, `cn;lang-en`): one attribute.
            match m.get(base) {
                None => m.set(base, values),
                Some(earlier) => {
                    let mut all = earlier.to_vec();
                    all.extend(values);
                    m.set(base, all);
                }
            }
        }
        m.set_text(&self.dn_attribute, e.dn);
        m
    }

    /// Removes and returns the first text value of an attribute the adapter asked for.
    pub fn take_text(e: &mut RawEntry, name: &str) -> Option<String> {
        let i = e
            .attrs
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))?;
        let (_, values) = e.attrs.remove(i);
        values
            .into_iter()
            .next()
            .and_then(|v| String::from_utf8(v).ok())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uuid_format() {
        let raw: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            uuid_text(&raw).unwrap(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert!(uuid_text(&raw[..3]).is_err());
    }

    #[test]
    fn malformed_controls_are_errors_not_panics() {
        assert!(contained("x", || SyncState::parse(&[0x30, 0x01, 0xff])).is_err());
        assert!(contained("x", || SyncDone::parse(&[0x04])).is_err());
    }

    #[test]
    fn binary_and_multi_valued_and_case() {
        let s = Shaper::new(&["jpegPhoto".to_owned()], "dn", &["entryUUID"]);
        let e = RawEntry {
            dn: "uid=a,dc=x".to_owned(),
            attrs: vec![
                ("mail".to_owned(), vec![b"a@x".to_vec(), b"b@x".to_vec()]),
                ("JPEGPhoto".to_owned(), vec![b"text-looking".to_vec()]),
                ("blob".to_owned(), vec![vec![0xff, 0x00]]),
                ("entryUUID".to_owned(), vec![b"u".to_vec()]),
                ("userCertificate;binary".to_owned(), vec![b"der".to_vec()]),
                ("cn".to_owned(), vec![b"Ann".to_vec()]),
                ("cn;lang-fr".to_owned(), vec![b"Anne".to_vec()]),
            ],
        };
        let m = s.attrs(e);
        assert_eq!(
            m.get("usercertificate").unwrap(),
            &[Value::Binary(b"der".to_vec())]
        );
        assert_eq!(
            m.get("cn").unwrap(),
            &[Value::Text("Ann".into()), Value::Text("Anne".into())]
        );
        assert_eq!(m.get("MAIL").unwrap().len(), 2);
        assert_eq!(
            m.get("jpegphoto").unwrap(),
            &[Value::Binary(b"text-looking".to_vec())]
        );
        assert_eq!(m.get("blob").unwrap(), &[Value::Binary(vec![0xff, 0])]);
        assert!(!m.contains("entryUUID"));
        assert_eq!(m.first_text("dn"), Some("uid=a,dc=x"));
    }
}
