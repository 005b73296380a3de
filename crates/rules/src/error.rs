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

/// A sandbox limit that stopped a script run. Limit errors carry no position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `max_operations`: too many operations (a runaway loop).
    Operations,
    /// `max_call_levels`: calls nested too deep (runaway recursion).
    CallDepth,
    /// `max_string_size`, `max_array_size` or `max_map_size`: one value too large.
    DataSize,
    /// `max_memory_mb`: all the data the run holds together is over the budget.
    Memory,
}

/// What kind of error a [`RuleError`] is; decisions are made on this, never on the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleErrorKind {
    /// A compile error, a runtime error of the script, or a value the engine cannot use.
    Script,
    /// A sandbox limit stopped the run.
    Limit(Limit),
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
    /// What kind of error it is.
    pub kind: RuleErrorKind,
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
            kind: RuleErrorKind::Script,
        }
    }

    /// A limit that stopped the run (no position: Rhai gives none for limits).
    pub fn limit(script: &str, limit: Limit, message: impl Into<String>) -> Self {
        RuleError {
            kind: RuleErrorKind::Limit(limit),
            ..RuleError::new(script, None, message)
        }
    }

    /// The limit that stopped the run, if a limit did.
    pub fn limit_hit(&self) -> Option<Limit> {
        match self.kind {
            RuleErrorKind::Limit(l) => Some(l),
            RuleErrorKind::Script => None,
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
    /// and the inner position in the message. `budget` is the run's memory budget in
    /// bytes, named when it stopped the run.
    pub(crate) fn eval(script: &str, e: &EvalAltResult, budget: usize) -> Self {
        match e {
            EvalAltResult::ErrorTooManyOperations(_) => RuleError::limit(
                script,
                Limit::Operations,
                "too many operations: the operation limit stopped the script (runaway loop?)",
            ),
            EvalAltResult::ErrorStackOverflow(_) => RuleError::limit(
                script,
                Limit::CallDepth,
                "call depth limit exceeded (runaway recursion?)",
            ),
            EvalAltResult::ErrorDataTooLarge(what, _) => RuleError::limit(
                script,
                Limit::DataSize,
                format!("size limit exceeded: {what} too large"),
            ),
            EvalAltResult::ErrorTerminated(token, _) if crate::sandbox::is_memory_token(token) => {
                RuleError::limit(
                    script,
                    Limit::Memory,
                    format!(
                        "memory limit exceeded: the data this run holds passed max_memory_mb ({} MiB) (a map or array growing without bound?)",
                        budget.div_ceil(1 << 20)
                    ),
                )
            }
            EvalAltResult::ErrorInFunctionCall(name, _, inner, pos) => {
                let inner_err = RuleError::eval(script, inner, budget);
                if inner_err.kind != RuleErrorKind::Script {
                    return inner_err;
                }
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
