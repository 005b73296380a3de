//! Conversions between idsync's model and Rhai values.
//!
//! An attribute with one text value becomes a string, several values an array, a binary
//! value a blob; an absent attribute reads as `()` in a rule. Going back, `()` removes the
//! attribute, numbers and booleans become text, arrays become multi-valued attributes.

use idsync_core::{AttrMap, Identity, Value};
use rhai::{Array, Blob, Dynamic, Map};

/// One value as Rhai sees it.
pub fn value_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Text(s) => Dynamic::from(s.clone()),
        Value::Binary(b) => Dynamic::from_blob(b.clone()),
    }
}

/// An attribute map as a Rhai object map (keys as the attributes are spelled).
pub fn attrs_to_map(attrs: &AttrMap) -> Map {
    let mut m = Map::new();
    for a in attrs.iter() {
        let v = if a.values.len() == 1 {
            value_to_dynamic(&a.values[0])
        } else {
            Dynamic::from_array(a.values.iter().map(value_to_dynamic).collect())
        };
        m.insert(a.name.as_str().into(), v);
    }
    m
}

/// An attribute map as a Rhai value.
pub fn attrs_to_dynamic(attrs: &AttrMap) -> Dynamic {
    Dynamic::from_map(attrs_to_map(attrs))
}

/// The identity view as rules see it:
/// `#{ name, version, disabled, attrs: #{..}, accounts: [#{resource, key, attrs}] }`.
pub fn identity_to_dynamic(id: &Identity) -> Dynamic {
    let mut m = Map::new();
    m.insert("name".into(), Dynamic::from(id.name.clone()));
    m.insert("version".into(), Dynamic::from(id.version));
    m.insert("disabled".into(), Dynamic::from(id.disabled));
    m.insert("attrs".into(), attrs_to_dynamic(&id.attrs));
    let accounts: Array = id
        .accounts
        .iter()
        .map(|a| {
            let mut am = Map::new();
            am.insert("resource".into(), Dynamic::from(a.resource.clone()));
            am.insert("key".into(), Dynamic::from(a.key.clone()));
            am.insert("attrs".into(), attrs_to_dynamic(&a.attrs));
            Dynamic::from_map(am)
        })
        .collect();
    m.insert("accounts".into(), Dynamic::from_array(accounts));
    Dynamic::from_map(m)
}

/// A scalar rule value as an attribute value; `Ok(None)` for `()`.
pub fn dynamic_to_value(d: &Dynamic) -> Result<Option<Value>, String> {
    if d.is_unit() {
        return Ok(None);
    }
    if d.is_string() || d.is_char() || d.is_int() || d.is_float() || d.is_bool() {
        return Ok(Some(Value::Text(d.to_string())));
    }
    if d.is_blob() {
        let b = d.clone().cast::<Blob>();
        return Ok(Some(Value::Binary(b)));
    }
    Err(format!(
        "a value of type {} cannot be an attribute value",
        d.type_name()
    ))
}

/// A rule value as an attribute's values: a scalar is one value, an array several,
/// `()` none (the attribute is removed).
pub fn dynamic_to_values(d: &Dynamic) -> Result<Vec<Value>, String> {
    if d.is_array() {
        let arr = d.clone().cast::<Array>();
        let mut out = Vec::with_capacity(arr.len());
        for item in &arr {
            if item.is_array() || item.is_map() {
                return Err(format!(
                    "an array of attribute values may hold only scalars, found {}",
                    item.type_name()
                ));
            }
            if let Some(v) = dynamic_to_value(item)? {
                out.push(v);
            }
        }
        return Ok(out);
    }
    Ok(dynamic_to_value(d)?.into_iter().collect())
}

/// A Rhai object map as an attribute map.
pub fn map_to_attrs(m: &Map) -> Result<AttrMap, String> {
    let mut attrs = AttrMap::new();
    for (k, v) in m {
        let values = dynamic_to_values(v).map_err(|e| format!("attribute {k}: {e}"))?;
        attrs.set(k.as_str(), values);
    }
    Ok(attrs)
}

/// Renders a value for decision records (short, single line).
pub fn render(d: &Dynamic) -> String {
    if d.is_unit() {
        return "()".to_owned();
    }
    if d.is_string() {
        return format!("{:?}", d.to_string());
    }
    let s = format!("{d:?}");
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut a = AttrMap::new();
        a.set_text("givenName", "Ann");
        a.set("mail", vec!["a@x".into(), "b@x".into()]);
        a.set("photo", vec![Value::Binary(vec![1, 2, 3])]);
        let m = attrs_to_map(&a);
        assert_eq!(map_to_attrs(&m).unwrap(), a);
    }

    #[test]
    fn scalars_become_text_and_unit_removes() {
        assert_eq!(
            dynamic_to_values(&Dynamic::from(42_i64)).unwrap(),
            vec![Value::Text("42".into())]
        );
        assert!(dynamic_to_values(&Dynamic::UNIT).unwrap().is_empty());
        assert!(dynamic_to_values(&Dynamic::from_map(Map::new())).is_err());
    }
}
