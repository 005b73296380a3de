//! What a correlation rule may return, and how it becomes candidate queries.
//!
//! Forms (after the Sun docs): nothing (`()` or `""`), one identity name, a list of names,
//! a map of attribute conditions (AND-ed), or a list of such maps (each one a query; the
//! candidates are the union). A condition whose value is `()` makes its map match nothing,
//! so a missing account attribute never matches every identity.

use idsync_core::{Conditions, Value};
use rhai::{Array, Dynamic, Map};

use crate::convert::dynamic_to_value;

/// A correlation rule's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Correlation {
    /// No candidates.
    Nothing,
    /// Identity names.
    Names(Vec<String>),
    /// Attribute queries; candidates are the union of their matches.
    Queries(Vec<Conditions>),
}

/// Interprets a correlation rule's return value; `Err` describes an unusable value.
pub fn parse_correlation(d: &Dynamic) -> Result<Correlation, String> {
    if d.is_unit() {
        return Ok(Correlation::Nothing);
    }
    if d.is_string() {
        let s = d.to_string();
        return Ok(if s.is_empty() {
            Correlation::Nothing
        } else {
            Correlation::Names(vec![s])
        });
    }
    if d.is_map() {
        let m = d.clone().cast::<Map>();
        return Ok(match map_conditions(&m)? {
            Some(c) => Correlation::Queries(vec![c]),
            None => Correlation::Nothing,
        });
    }
    if d.is_array() {
        let arr = d.clone().cast::<Array>();
        if arr.is_empty() {
            return Ok(Correlation::Nothing);
        }
        if arr.iter().all(|x| x.is_string()) {
            let names: Vec<String> = arr
                .iter()
                .map(|x| x.to_string())
                .filter(|s| !s.is_empty())
                .collect();
            return Ok(if names.is_empty() {
                Correlation::Nothing
            } else {
                Correlation::Names(names)
            });
        }
        if arr.iter().all(|x| x.is_map()) {
            let mut queries = Vec::new();
            for x in &arr {
                if let Some(c) = map_conditions(&x.clone().cast::<Map>())? {
                    queries.push(c);
                }
            }
            return Ok(if queries.is_empty() {
                Correlation::Nothing
            } else {
                Correlation::Queries(queries)
            });
        }
        return Err(
            "a correlation list must hold only names (strings) or only condition maps".into(),
        );
    }
    Err(format!(
        "a correlation rule returns (), a name, a list of names, a map of conditions or a list of maps; got {} ({d})",
        d.type_name()
    ))
}

fn map_conditions(m: &Map) -> Result<Option<Conditions>, String> {
    if m.is_empty() {
        return Ok(None);
    }
    let mut conds = Vec::with_capacity(m.len());
    for (k, v) in m {
        if v.is_array() || v.is_map() {
            return Err(format!(
                "correlation condition {k}: expected one value, got {}",
                v.type_name()
            ));
        }
        match dynamic_to_value(v).map_err(|e| format!("correlation condition {k}: {e}"))? {
            Some(Value::Text(t)) if t.is_empty() => return Ok(None),
            Some(val) => conds.push((k.to_string(), val)),
            None => return Ok(None),
        }
    }
    Ok(Some(Conditions(conds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Dynamic)]) -> Dynamic {
        let mut m = Map::new();
        for (k, v) in pairs {
            m.insert((*k).into(), v.clone());
        }
        Dynamic::from_map(m)
    }

    fn conds(pairs: &[(&str, &str)]) -> Conditions {
        Conditions(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::Text((*v).to_owned())))
                .collect(),
        )
    }

    #[test]
    fn every_form() {
        let cases: Vec<(Dynamic, Result<Correlation, ()>)> = vec![
            (Dynamic::UNIT, Ok(Correlation::Nothing)),
            ("".into(), Ok(Correlation::Nothing)),
            ("jdoe".into(), Ok(Correlation::Names(vec!["jdoe".into()]))),
            (
                Dynamic::from_array(vec!["a".into(), "b".into()]),
                Ok(Correlation::Names(vec!["a".into(), "b".into()])),
            ),
            (Dynamic::from_array(vec![]), Ok(Correlation::Nothing)),
            (
                map(&[("empno", "7".into()), ("sn", "Doe".into())]),
                Ok(Correlation::Queries(vec![conds(&[
                    ("empno", "7"),
                    ("sn", "Doe"),
                ])])),
            ),
            (
                map(&[("empno", Dynamic::from(7_i64))]),
                Ok(Correlation::Queries(vec![conds(&[("empno", "7")])])),
            ),
            (map(&[("empno", Dynamic::UNIT)]), Ok(Correlation::Nothing)),
            (
                Dynamic::from_array(vec![
                    map(&[("empno", "7".into())]),
                    map(&[("mail", Dynamic::UNIT)]),
                    map(&[("mail", "a@x".into())]),
                ]),
                Ok(Correlation::Queries(vec![
                    conds(&[("empno", "7")]),
                    conds(&[("mail", "a@x")]),
                ])),
            ),
            (Dynamic::from(3_i64), Err(())),
            (
                Dynamic::from_array(vec!["a".into(), map(&[("x", "1".into())])]),
                Err(()),
            ),
            (
                map(&[("x", Dynamic::from_array(vec!["1".into()]))]),
                Err(()),
            ),
        ];
        for (input, expected) in cases {
            let got = parse_correlation(&input).map_err(|_| ());
            assert_eq!(got, expected, "input {input:?}");
        }
    }
}
