//! The strict-variables check of `idsync check`: a rule that reads a variable nobody
//! defines (a typo, or `identity` in a filter rule) fails every event that reaches that
//! line at run time; compiled a second time in Rhai's strict-variables mode, with the
//! variables its role receives declared, it is found before any run, with file:line:col.
//!
//! Key design choice: the sandbox's engine and its limits are not touched; this check uses
//! a plain engine of its own, which only parses (function names are resolved at run time,
//! so no helper needs registering), and reports only undefined variables: every other
//! parse error is the regular compile's to report.

use rhai::{Dynamic, Engine, ParseErrorType, Scope};

use crate::error::{Pos, RuleError};

/// The first variable `source` reads that is neither in `defined` nor declared by the
/// script itself, as an error at its position; `None` when every variable is defined or
/// the source does not parse (the regular compile reports that).
pub fn undefined_variable(label: &str, source: &str, defined: &[&str]) -> Option<RuleError> {
    let mut engine = Engine::new_raw();
    engine
        .set_strict_variables(true)
        .set_max_expr_depths(0, 0)
        .set_max_modules(0);
    let mut scope = Scope::new();
    for name in defined {
        scope.push_constant(*name, Dynamic::UNIT);
    }
    match engine.compile_with_scope(&scope, source) {
        Err(e) => match e.err_type() {
            ParseErrorType::VariableUndefined(name) => Some(RuleError::new(
                label,
                Pos::from_rhai(e.position()),
                format!(
                    "undefined variable: {name} (this rule gets {}; a misspelling, or a variable of another rule?)",
                    defined.join(", ")
                ),
            )),
            _ => None,
        },
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undefined_variables_are_found_with_their_position() {
        let e = undefined_variable(
            "rules/filter.rhai",
            "let kind = account.type;\nkind == () || identity.name != \"x\"\n",
            &["account", "resource", "key"],
        )
        .expect("identity is not defined");
        assert_eq!(e.pos, Some(Pos { line: 2, col: 15 }));
        assert!(e.message.contains("undefined variable: identity"), "{e}");
        assert!(e.to_string().starts_with("rules/filter.rhai:2:15: "), "{e}");
    }

    #[test]
    fn defined_and_declared_variables_and_functions_pass() {
        let src = "let x = account.mail;\nfn f(a) { a + 1 }\nlet n = f(1);\nfor i in 0..n { x += i; }\n[x, find_identity(key), is_def_var(\"previous\")]";
        assert_eq!(undefined_variable("r", src, &["account", "key"]), None);
        // Not this check's business: a syntax error (the compile reports it).
        assert_eq!(undefined_variable("r", "let = ;", &[]), None);
    }
}
