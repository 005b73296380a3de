//! Rule errors: every one names the script, and the line and column when Rhai knows them.

use std::fmt;

use rhai::{EvalAltResult, ParseError, Position};

/// Where in a script something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub col: usize,
}

impl Pos {
    /// From a Rhai position, `None` when it has none.
    pub fn from_rhai(p: Position) -> Option<Pos> {
        p.line().map(|line| Pos {
            line,
            col: p.position().unwrap_or(0),
        })
    }
}

/// A rule that failed to compile or to run, or returned something the engine cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RuleError {
    /// Script label: the file name in the rules folder, or e.g. `mapping.mail`.
    pub script: String,
    /// Position of the error, when known.
    pub pos: Option<Pos>,
    /// What went wrong; for an error inside a script function, includes the inner position.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}:{}: {}", self.script, p.line, p.col, self.message),
            None => write!(f, "{}: {}", self.script, self.message),
        }
    }
}

impl RuleError {
    /// An error at a known position (or none).
    pub fn new(script: &str, pos: Option<Pos>, message: impl Into<String>) -> Self {
        RuleError {
            script: script.to_owned(),
            pos,
            message: message.into(),
        }
    }

    /// From a parse error.
    pub(crate) fn parse(script: &str, e: &ParseError) -> Self {
        RuleError::new(
            script,
            Pos::from_rhai(e.position()),
            e.err_type().to_string(),
        )
    }

    /// From a runtime error. Limit errors carry no position in Rhai: they are named
    /// as limits. An error inside a script function shows the call site as the position
    /// and the inner position in the message.
    pub(crate) fn eval(script: &str, e: &EvalAltResult) -> Self {
        match e {
            EvalAltResult::ErrorTooManyOperations(_) => RuleError::new(
                script,
                None,
                "too many operations: the operation limit stopped the script (runaway loop?)",
            ),
            EvalAltResult::ErrorStackOverflow(_) => RuleError::new(
                script,
                None,
                "call depth limit exceeded (runaway recursion?)",
            ),
            EvalAltResult::ErrorDataTooLarge(what, _) => RuleError::new(
                script,
                None,
                format!("size limit exceeded: {what} too large"),
            ),
            EvalAltResult::ErrorInFunctionCall(name, _, inner, pos) => {
                let inner_err = RuleError::eval(script, inner);
                let at = inner_err
                    .pos
                    .map(|p| format!(" at {}:{}", p.line, p.col))
                    .unwrap_or_default();
                RuleError::new(
                    script,
                    Pos::from_rhai(*pos),
                    format!("in function '{name}'{at}: {}", inner_err.message),
                )
            }
            EvalAltResult::ErrorRuntime(value, pos) => {
                RuleError::new(script, Pos::from_rhai(*pos), format!("{value}"))
            }
            other => {
                let mut text = other.to_string();
                // Rhai appends " (line x, position y)"; we show the position up front.
                if let Some(i) = text.rfind(" (line ") {
                    text.truncate(i);
                }
                RuleError::new(script, Pos::from_rhai(other.position()), text)
            }
        }
    }
}
