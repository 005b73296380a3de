//! Multi-valued attribute maps.
//!
//! Attribute names are compared case-insensitively (`mail` and `Mail` are the same
//! attribute) but kept as first given, so rules and exports show the resource's spelling.
//! Values are kept exactly as given; a value is text or binary (e.g. `jpegPhoto`).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// One attribute value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// Text (UTF-8).
    Text(String),
    /// Raw bytes, e.g. a photo or a certificate.
    Binary(Vec<u8>),
}

impl Value {
    /// The text, or `None` for a binary value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            Value::Binary(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Text(s) => f.write_str(s),
            Value::Binary(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Text(s) => serializer.serialize_str(s),
            Value::Binary(b) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(b),
                )?;
                map.end()
            }
        }
    }
}

/// Reads one value: a string (numbers and booleans become their text) or
/// `{"base64": ...}`.
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or {\"base64\": ...}")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut bytes = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "base64" {
                let text: String = map.next_value()?;
                bytes = Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(de::Error::custom)?,
                );
            } else {
                return Err(de::Error::unknown_field(&key, &["base64"]));
            }
        }
        bytes
            .map(Value::Binary)
            .ok_or_else(|| de::Error::missing_field("base64"))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// The values of one attribute as stored: a single value, or a list of them. Decided by
/// the token that comes (no buffering and retrying, as an untagged enum would).
struct Values(Vec<Value>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValuesVisitor;
        impl<'de> Visitor<'de> for ValuesVisitor {
            type Value = Values;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(v) = seq.next_element::<Value>()? {
                    values.push(v);
                }
                Ok(Values(values))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Values, E> {
                ValueVisitor.visit_str(v).map(|v| Values(vec![v]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Values, E> {
                ValueVisitor.visit_string(v).map(|v| Values(vec![v]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Values, E> {
                ValueVisitor.visit_i64(v).map(|v| Values(vec![v]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Values, E> {
                ValueVisitor.visit_u64(v).map(|v| Values(vec![v]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Values, E> {
                ValueVisitor.visit_f64(v).map(|v| Values(vec![v]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Values, E> {
                ValueVisitor.visit_bool(v).map(|v| Values(vec![v]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Values, A::Error> {
                ValueVisitor.visit_map(map).map(|v| Values(vec![v]))
            }
        }
        deserializer.deserialize_any(ValuesVisitor)
    }
}

/// One attribute: its name as first given, and its values in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The name as first given.
    pub name: String,
    /// The values, in order; never empty inside an [`AttrMap`].
    pub values: Vec<Value>,
}

/// A map of multi-valued attributes with case-insensitive names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttrMap {
    entries: BTreeMap<String, Attr>,
}

/// The folded (lowercased) form of an attribute name, without a copy for the usual name
/// that is ASCII without capitals already (`to_lowercase` would return it unchanged).
fn folded(name: &str) -> std::borrow::Cow<'_, str> {
    if name
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
    {
        std::borrow::Cow::Owned(name.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

impl AttrMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `values`, replacing what was there. Empty `values` removes it.
    /// The first spelling of a name is kept.
    pub fn set(&mut self, name: &str, values: Vec<Value>) {
        let folded = folded(name);
        if values.is_empty() {
            self.entries.remove(&*folded);
            return;
        }
        match self.entries.get_mut(&*folded) {
            Some(attr) => attr.values = values,
            None => {
                self.entries.insert(
                    folded.into_owned(),
                    Attr {
                        name: name.to_owned(),
                        values,
                    },
                );
            }
        }
    }

    /// Sets a single text value.
    pub fn set_text(&mut self, name: &str, value: impl Into<String>) {
        self.set(name, vec![Value::Text(value.into())]);
    }

    /// Removes `name`; returns whether it was present.
    pub fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(&*folded(name)).is_some()
    }

    /// The values of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&[Value]> {
        self.entries
            .get(&*folded(name))
            .map(|a| a.values.as_slice())
    }

    /// The first text value of `name`, if any.
    pub fn first_text(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|v| v.first())
            .and_then(Value::as_text)
    }

    /// The attribute entry (name as given and values).
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.entries.get(&*folded(name))
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(&*folded(name))
    }

    /// Iterates attributes ordered by folded name.
    pub fn iter(&self) -> impl Iterator<Item = &Attr> {
        self.entries.values()
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map holds no attribute.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A stable 64-bit hash of the content (xxh3; names folded, values length-prefixed),
    /// suitable for stored snapshots.
    pub fn content_hash(&self) -> u64 {
        // One buffer hashed at once: XXH3 of the concatenation, the same value the
        // streaming hasher gives, without its per-update overhead on short fields.
        let mut h = Vec::with_capacity(256);
        for (folded, attr) in &self.entries {
            hash_field(&mut h, 0, folded.as_bytes());
            h.extend_from_slice(&(attr.values.len() as u64).to_le_bytes());
            for v in &attr.values {
                match v {
                    Value::Text(s) => hash_field(&mut h, 1, s.as_bytes()),
                    Value::Binary(b) => hash_field(&mut h, 2, b),
                }
            }
        }
        xxh3_64(&h)
    }

    /// The attributes whose values differ between `self` (before) and `after`:
    /// `(name, before, after)`, either side `None` when absent.
    pub fn diff<'a>(&'a self, after: &'a AttrMap) -> Vec<AttrChange> {
        let mut out = Vec::new();
        for (k, a) in &self.entries {
            match after.entries.get(k) {
                Some(b) if b.values == a.values => {}
                Some(b) => out.push(AttrChange {
                    name: b.name.clone(),
                    before: Some(a.values.clone()),
                    after: Some(b.values.clone()),
                }),
                None => out.push(AttrChange {
                    name: a.name.clone(),
                    before: Some(a.values.clone()),
                    after: None,
                }),
            }
        }
        for (k, b) in &after.entries {
            if !self.entries.contains_key(k) {
                out.push(AttrChange {
                    name: b.name.clone(),
                    before: None,
                    after: Some(b.values.clone()),
                });
            }
        }
        out.sort_by_key(|c| c.name.to_lowercase());
        out
    }
}

/// Appends one field of the [`AttrMap::content_hash`] input: a tag (0 name, 1 text, 2
/// binary), the length as 8 little-endian bytes, the bytes. Public so a reader that hashes
/// rows without building maps (the flat-file adapter) produces the same value.
#[inline]
pub fn hash_field(h: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    h.push(tag);
    h.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    h.extend_from_slice(bytes);
}

/// One attribute's change between two maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrChange {
    /// Attribute name.
    pub name: String,
    /// Values before, `None` when absent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<Vec<Value>>,
    /// Values after, `None` when removed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<Vec<Value>>,
}

impl<K: AsRef<str>, V: Into<Value>> FromIterator<(K, V)> for AttrMap {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut m = AttrMap::new();
        for (k, v) in iter {
            m.set(k.as_ref(), vec![v.into()]);
        }
        m
    }
}

/// Serialized as a JSON object: a single value as itself, several as an array.
impl Serialize for AttrMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for attr in self.entries.values() {
            if attr.values.len() == 1 {
                map.serialize_entry(&attr.name, &attr.values[0])?;
            } else {
                map.serialize_entry(&attr.name, &attr.values)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for AttrMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = AttrMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of attribute names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AttrMap, A::Error> {
                let mut m = AttrMap::new();
                while let Some((name, values)) = map.next_entry::<String, Values>()? {
                    m.set(&name, values.0);
                }
                Ok(m)
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_case_and_keep_first_spelling() {
        let mut m = AttrMap::new();
        m.set_text("givenName", "Ann");
        m.set_text("GIVENNAME", "Anne");
        assert_eq!(m.first_text("givenname"), Some("Anne"));
        assert_eq!(m.iter().next().map(|a| a.name.as_str()), Some("givenName"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn empty_values_remove() {
        let mut m = AttrMap::new();
        m.set_text("a", "1");
        m.set("A", vec![]);
        assert!(m.is_empty());
    }

    #[test]
    fn hash_is_stable_and_boundary_safe() {
        let a: AttrMap = [("x", "ab"), ("y", "c")].into_iter().collect();
        let b: AttrMap = [("X", "ab"), ("y", "c")].into_iter().collect();
        let c: AttrMap = [("x", "a"), ("y", "bc")].into_iter().collect();
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(a.content_hash(), c.content_hash());
    }

    /// Shadows stored by earlier versions hold the streaming hasher's value: the one-buffer
    /// hash must stay equal to it, or every account would look changed after an upgrade.
    #[test]
    fn content_hash_equals_the_streaming_hash_of_earlier_versions() {
        let mut m = AttrMap::new();
        m.set("photo", vec![Value::Binary(vec![0, 255, 7])]);
        m.set("Mail", vec!["a@x".into(), "b@x".into()]);
        m.set_text("cn", "Ann");
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (folded, attr) in &m.entries {
            for part in [
                &[0u8][..],
                &(folded.len() as u64).to_le_bytes(),
                folded.as_bytes(),
            ] {
                h.update(part);
            }
            h.update(&(attr.values.len() as u64).to_le_bytes());
            for v in &attr.values {
                let (tag, bytes) = match v {
                    Value::Text(s) => (1u8, s.as_bytes()),
                    Value::Binary(b) => (2u8, b.as_slice()),
                };
                h.update(&[tag]);
                h.update(&(bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
        }
        assert_eq!(m.content_hash(), h.digest());
    }

    #[test]
    fn json_round_trip_with_binary_and_multi() {
        let mut m = AttrMap::new();
        m.set("photo", vec![Value::Binary(vec![0, 255, 7])]);
        m.set("mail", vec!["a@x".into(), "b@x".into()]);
        m.set_text("cn", "Ann");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"cn":"Ann","mail":["a@x","b@x"],"photo":{"base64":"AP8H"}}"#
        );
        let back: AttrMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn diff_lists_added_changed_removed() {
        let a: AttrMap = [("x", "1"), ("y", "2")].into_iter().collect();
        let b: AttrMap = [("x", "1"), ("y", "3"), ("z", "4")].into_iter().collect();
        let d = a.diff(&b);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "y");
        assert_eq!(d[1].name, "z");
        assert!(d[1].before.is_none());
    }
}
