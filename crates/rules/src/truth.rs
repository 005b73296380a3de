//! True-like and false-like values, exactly as docs/design.md fixes them (after the Sun docs).
//!
//! True: `true`, `"true"`, `"1"`, `"yes"` (any case), non-zero numbers.
//! False: `false`, `"false"`, `"0"`, `"no"` (any case), `()`, the empty string, zero.
//! Anything else is an error naming the value.

use rhai::Dynamic;

/// Coerces a rule's return value; `Err` carries a description of the unusable value.
pub fn truthy(value: &Dynamic) -> Result<bool, String> {
    if value.is_unit() {
        return Ok(false);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(b);
    }
    if let Ok(i) = value.as_int() {
        return Ok(i != 0);
    }
    if let Ok(f) = value.as_float() {
        return Ok(f != 0.0);
    }
    if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
        let t = s.as_str();
        if t.is_empty()
            || t.eq_ignore_ascii_case("false")
            || t == "0"
            || t.eq_ignore_ascii_case("no")
        {
            return Ok(false);
        }
        if t.eq_ignore_ascii_case("true") || t == "1" || t.eq_ignore_ascii_case("yes") {
            return Ok(true);
        }
        return Err(format!("\"{t}\" is neither true-like nor false-like"));
    }
    Err(format!(
        "a value of type {} ({}) is neither true-like nor false-like",
        value.type_name(),
        value
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(v: Dynamic, expected: Result<bool, ()>) {
        let got = truthy(&v).map_err(|_| ());
        assert_eq!(got, expected, "value {v:?}");
    }

    #[test]
    fn table() {
        check(Dynamic::TRUE, Ok(true));
        check(Dynamic::FALSE, Ok(false));
        check(Dynamic::UNIT, Ok(false));
        check("true".into(), Ok(true));
        check("TRUE".into(), Ok(true));
        check("Yes".into(), Ok(true));
        check("1".into(), Ok(true));
        check("false".into(), Ok(false));
        check("No".into(), Ok(false));
        check("0".into(), Ok(false));
        check("".into(), Ok(false));
        check(Dynamic::from(2_i64), Ok(true));
        check(Dynamic::from(-1_i64), Ok(true));
        check(Dynamic::from(0_i64), Ok(false));
        check(Dynamic::from(0.5_f64), Ok(true));
        check(Dynamic::from(0.0_f64), Ok(false));
        check("maybe".into(), Err(()));
        check(" true".into(), Err(()));
        check("2".into(), Err(()));
        check(Dynamic::from(rhai::Array::new()), Err(()));
    }
}
