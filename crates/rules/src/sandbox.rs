//! The sandboxed Rhai engine: limits, no `eval`, no modules, no IO; scripts compiled once.
//!
//! Memory: Rhai checks each value it builds against the string, array and map limits
//! (a container counts everything nested in it), but not the data of a run as a whole,
//! and not a container grown in place by index assignment (`m[k] = v`). The run's
//! budget (`max_memory`) closes both: every [`CHECK_EVERY`] operations or more (see
//! `Budget::next_stride`), at the next variable access, the data reachable from the
//! scope of every live call frame is estimated (`Measure`) and a run over the budget is
//! terminated with a typed [`crate::Limit::Memory`] error, which a script cannot catch. The
//! same measure applies the map and array limits to maps grown in place.
//!
//! Logging: `print` and `debug` go through one token bucket per rule file
//! ([`LogLimiter`]), and each line is cut to [`MAX_LOG_LINE`] bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use rhai::{AST, Array, Dynamic, Engine, EvalAltResult, Map, Position, Scope};

use crate::error::{Pos, RuleError};
use crate::host::{self, Access, HostSlot, RuleHost};

/// How many operations may pass between two estimates of a run's data. A run can pass
/// its budget by what this many operations build (each value being bounded by the
/// string, array and map limits) before it is stopped.
pub const CHECK_EVERY: u64 = 32;

/// Printed rule lines longer than this many bytes are cut.
pub const MAX_LOG_LINE: usize = 1024;

/// Estimated bytes of one Rhai value slot (a `Dynamic`), and of a map entry beyond its
/// key and value (the B-tree's share).
const SLOT: usize = std::mem::size_of::<Dynamic>();
const MAP_ENTRY: usize = 32;

/// Resource limits for every script run. A script that hits one fails its event only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum operations per run (stops runaway loops).
    pub max_operations: u64,
    /// Maximum function call depth (stops runaway recursion).
    pub max_call_levels: usize,
    /// Maximum expression nesting depth, at top level and in functions.
    pub max_expr_depth: usize,
    /// Maximum string length in bytes.
    pub max_string_size: usize,
    /// Maximum array length.
    pub max_array_size: usize,
    /// Maximum object map size.
    pub max_map_size: usize,
    /// Budget, in bytes, for all the data one run holds at once (strings, arrays, maps in
    /// every variable of every live call frame), estimated.
    pub max_memory: usize,
    /// `print`/`debug` lines per second per rule file (also the burst); 0: no limit.
    pub max_log_lines_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 1_000_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_memory: 64 << 20,
            max_log_lines_per_sec: 100,
        }
    }
}

impl Limits {
    /// Limits that contradict each other: one value allowed by a per-value limit would
    /// alone pass the memory budget. Each problem names the keys (of the config's
    /// `limits` map).
    pub fn problems(&self) -> Vec<String> {
        let mib = |b: usize| b.div_ceil(1 << 20);
        let mut out = Vec::new();
        if self.max_memory == 0 {
            out.push("limits.max_memory_mb: must be at least 1".to_owned());
            return out;
        }
        for (key, bytes) in [
            ("max_string_size", self.max_string_size),
            ("max_array_size", self.max_array_size.saturating_mul(SLOT)),
            (
                "max_map_size",
                self.max_map_size.saturating_mul(SLOT + MAP_ENTRY),
            ),
        ] {
            if bytes > self.max_memory {
                out.push(format!(
                    "limits.{key}: one value at this limit holds about {} MiB, more than limits.max_memory_mb ({} MiB); raise max_memory_mb or lower {key}",
                    mib(bytes),
                    mib(self.max_memory)
                ));
            }
        }
        out
    }
}

/// A compiled script or expression, with the label its errors carry.
#[derive(Clone, Debug)]
pub struct Script {
    label: String,
    ast: AST,
    /// Every word of the source (identifiers, and words inside strings and comments),
    /// sorted: see [`Script::mentions`].
    words: Vec<String>,
}

impl Script {
    /// The label (file name or e.g. `mapping.mail`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the source contains `name` as a word anywhere (code, string or comment).
    /// `false` means the script cannot read a variable of that name (without `eval`, a
    /// script names every variable it reads, even `is_def_var("name")`), so the engine
    /// may leave it out of the scope rather than build it.
    pub fn mentions(&self, name: &str) -> bool {
        self.words
            .binary_search_by(|w| w.as_str().cmp(name))
            .is_ok()
    }
}

/// The words of `source`: maximal runs of ASCII letters, digits and `_`, sorted, once each.
fn words(source: &str) -> Vec<String> {
    let mut words: Vec<String> = source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    words.sort();
    words.dedup();
    words
}

/// The rule engine: one sandboxed Rhai engine, reused for every script run.
/// Not `Send`: each worker thread owns its own.
pub struct RuleEngine {
    engine: Engine,
    slot: HostSlot,
    run: Rc<RefCell<RunState>>,
    limits: Limits,
}

/// What the engine's callbacks know of the run in progress.
#[derive(Default)]
struct RunState {
    /// The label of the script running (for the log limiter).
    label: Rc<str>,
    /// The memory budget's bookkeeping.
    budget: Budget,
    /// The `print`/`debug` rate limiter.
    log: LogLimiter,
}

/// The memory budget of one run: the estimated data of each live call frame, measured
/// at a variable access once enough operations have passed (see [`Budget::next_stride`]).
#[derive(Default)]
struct Budget {
    max: usize,
    /// The most one operation is expected to build: the string limit (at least 64 KiB).
    per_op: usize,
    next_check: u64,
    frames: Vec<usize>,
}

/// What one measure of a frame found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Measure {
    /// Estimated bytes.
    pub bytes: usize,
    /// Array elements (nested ones included) of the largest value.
    pub array: usize,
    /// Map entries (nested ones included) of the largest value.
    pub map: usize,
    /// Values visited (the cost of the measure).
    pub visited: usize,
}

impl Measure {
    fn add(&mut self, v: &Dynamic) {
        let mut one = Measure::default();
        one.walk(v, 0);
        self.bytes += one.bytes;
        self.array = self.array.max(one.array);
        self.map = self.map.max(one.map);
        self.visited += one.visited;
    }

    fn walk(&mut self, v: &Dynamic, depth: usize) {
        self.visited += 1;
        self.bytes += SLOT;
        if depth > 64 {
            return;
        }
        if v.is_string() {
            if let Ok(s) = v.as_immutable_string_ref() {
                self.bytes += s.len();
            }
        } else if v.is_map() {
            if let Ok(m) = v.as_map_ref() {
                self.map += m.len();
                for (k, e) in m.iter() {
                    self.bytes += MAP_ENTRY + k.len();
                    self.walk(e, depth + 1);
                }
            }
        } else if v.is_array() {
            if let Ok(a) = v.as_array_ref() {
                self.array += a.len();
                for e in a.iter() {
                    self.walk(e, depth + 1);
                }
            }
        } else if v.is_blob()
            && let Ok(b) = v.as_blob_ref()
        {
            self.array += b.len();
            self.bytes += b.len();
        }
    }
}

impl Budget {
    fn reset(&mut self, limits: &Limits) {
        self.max = limits.max_memory;
        self.per_op = limits.max_string_size.max(64 << 10);
        self.next_check = CHECK_EVERY;
        self.frames.clear();
    }

    /// Records the estimate of the frame at `level`; the run's total. Deeper frames have
    /// returned: they are dropped.
    fn measure(&mut self, level: usize, bytes: usize) -> usize {
        self.frames.resize(level + 1, 0);
        self.frames[level] = bytes;
        self.frames.iter().sum()
    }

    /// Operations until the next measure: [`CHECK_EVERY`] for small scopes and near the
    /// budget; with more data in the scope, enough operations for a measure's cost (the
    /// values it visits) to stay under 1/16 of a value per operation, as long as they
    /// cannot build the headroom left (an operation that builds a string of the limit's
    /// size takes 4 operations with the variable accesses and the assignment around it),
    /// and at most 1,024. So a run passes its budget by at most what [`CHECK_EVERY`]
    /// operations build, and measuring costs little even with large arrays in the scope.
    fn next_stride(&self, total: usize, visited: usize) -> u64 {
        let headroom = (4 * (self.max.saturating_sub(total) / self.per_op)) as u64;
        let amortized = (visited / 16) as u64;
        headroom.min(amortized).clamp(CHECK_EVERY, 1024)
    }
}

/// The token a run over its memory budget is terminated with.
const MEMORY_TOKEN: &str = "idsync:max_memory";

/// Whether an `ErrorTerminated` token is the memory budget's.
pub(crate) fn is_memory_token(token: &Dynamic) -> bool {
    token
        .read_lock::<rhai::ImmutableString>()
        .is_some_and(|t| t.as_str() == MEMORY_TOKEN)
}

/// A token bucket per rule file for `print` and `debug`: at most `rate` lines a second
/// (and a burst of as many); the lines refused are counted and announced by one line when
/// the file may log again, once its bucket is full again.
#[derive(Default)]
pub(crate) struct LogLimiter {
    rate: u32,
    buckets: HashMap<Rc<str>, Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter allowing `rate` lines a second per rule file (0: no limit).
    pub(crate) fn new(rate: u32) -> LogLimiter {
        LogLimiter {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Whether a line of `label` may be logged now (at `now`). `Some(k)`: yes, after a
    /// note that `k` lines were suppressed (`k` may be 0); `None`: no (counted).
    pub(crate) fn admit(&mut self, label: &Rc<str>, now: Instant) -> Option<u64> {
        if self.rate == 0 {
            return Some(0);
        }
        let rate = f64::from(self.rate);
        let b = self.buckets.entry(label.clone()).or_insert(Bucket {
            tokens: rate,
            at: now,
            suppressed: 0,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at = now;
        // Once lines were refused, the bucket refills completely before the next one:
        // under steady pressure, a burst and one note a second.
        let needed = if b.suppressed > 0 { rate } else { 1.0 };
        if b.tokens >= needed {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

/// `text` cut to [`MAX_LOG_LINE`] bytes (on a character boundary), saying so.
fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_LOG_LINE {
        return text.into();
    }
    let mut end = MAX_LOG_LINE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes, cut)", &text[..end], text.len()).into()
}

/// Logs one `print` (`pos` `None`) or `debug` line of a rule through the limiter.
fn log_line(run: &RefCell<RunState>, text: &str, source: Option<&str>, pos: Option<Position>) {
    let Ok(mut st) = run.try_borrow_mut() else {
        return;
    };
    let st = &mut *st;
    let label = match source {
        Some(s) if s != &*st.label => Rc::from(s),
        _ => st.label.clone(),
    };
    let Some(suppressed) = st.log.admit(&label, Instant::now()) else {
        return;
    };
    if suppressed > 0 {
        tracing::warn!(target: "idsync::rule", "{label}: {suppressed} line(s) of print/debug suppressed (limits.max_log_lines_per_sec: {})", st.log.rate);
    }
    let text = clip(text);
    match pos {
        None => tracing::info!(target: "idsync::rule", "{text}"),
        Some(pos) => tracing::debug!(target: "idsync::rule", "{label}:{pos}: {text}"),
    }
}

impl RuleEngine {
    /// A sandboxed engine with `limits`.
    pub fn new(limits: &Limits) -> RuleEngine {
        let mut engine = Engine::new();
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_max_modules(0)
            .set_max_strings_interned(0)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");
        let run = Rc::new(RefCell::new(RunState {
            log: LogLimiter::new(limits.max_log_lines_per_sec),
            ..RunState::default()
        }));
        let state = run.clone();
        engine.on_print(move |text| log_line(&state, text, None, None));
        let state = run.clone();
        engine.on_debug(move |text, source, pos| log_line(&state, text, source, Some(pos)));
        let state = run.clone();
        // A volatile API in Rhai's words, not a deprecated one: the one hook that sees the
        // scope while a script runs.
        #[allow(deprecated)]
        engine.on_var(move |_, _, ctx| {
            let ops = ctx.global_runtime_state().num_operations();
            let Ok(mut st) = state.try_borrow_mut() else {
                return Ok(None);
            };
            if ops < st.budget.next_check {
                return Ok(None);
            }
            let mut m = Measure::default();
            for (_, _, v) in ctx.scope().iter_raw() {
                m.add(v);
            }
            if let Some(this) = ctx.this_ptr() {
                m.add(this);
            }
            // A map grown by index assignment escapes Rhai's own size checks.
            let engine = ctx.engine();
            for (over, what) in [
                (
                    m.map > engine.max_map_size() && engine.max_map_size() > 0,
                    "Size of object map",
                ),
                (
                    m.array > engine.max_array_size() && engine.max_array_size() > 0,
                    "Size of array/BLOB",
                ),
            ] {
                if over {
                    return Err(
                        EvalAltResult::ErrorDataTooLarge(what.to_owned(), Position::NONE).into(),
                    );
                }
            }
            let total = st.budget.measure(ctx.call_level(), m.bytes);
            if total > st.budget.max {
                return Err(EvalAltResult::ErrorTerminated(
                    Dynamic::from(rhai::ImmutableString::from(MEMORY_TOKEN)),
                    Position::NONE,
                )
                .into());
            }
            st.budget.next_check = ops + st.budget.next_stride(total, m.visited);
            Ok(None)
        });
        register_helpers(&mut engine);
        let slot: HostSlot = Rc::new(RefCell::new(None));
        host::register(&mut engine, &slot);
        RuleEngine {
            engine,
            slot,
            run,
            limits: limits.clone(),
        }
    }

    /// Compiles a script; the error names `label:line:col`.
    pub fn compile(&self, label: &str, source: &str) -> Result<Script, RuleError> {
        let mut ast = self
            .engine
            .compile(source)
            .map_err(|e| RuleError::parse(label, &e))?;
        ast.set_source(label);
        if let Some(pos) = first_import(&ast) {
            return Err(RuleError::new(
                label,
                Pos::from_rhai(pos),
                "import is not allowed: rules cannot load modules (use host functions)",
            ));
        }
        Ok(Script {
            label: label.to_owned(),
            ast,
            words: words(source),
        })
    }

    /// Runs `script` with the variables in `scope`; variables the script declares are
    /// dropped afterwards. `host` is bound for this run only.
    pub fn run(
        &self,
        script: &Script,
        scope: &mut Scope<'static>,
        host: Option<(Rc<dyn RuleHost>, Access)>,
    ) -> Result<Dynamic, RuleError> {
        let mark = scope.len();
        *self.slot.borrow_mut() = host;
        if let Ok(mut st) = self.run.try_borrow_mut() {
            st.budget.reset(&self.limits);
            if *st.label != *script.label {
                st.label = Rc::from(script.label.as_str());
            }
        }
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(scope, &script.ast);
        *self.slot.borrow_mut() = None;
        scope.rewind(mark);
        result.map_err(|e| RuleError::eval(&script.label, &e, self.limits.max_memory))
    }

    /// Position of the script's last top-level statement, for errors about its result.
    pub fn result_pos(script: &Script) -> Option<Pos> {
        script
            .ast
            .statements()
            .last()
            .and_then(|s| Pos::from_rhai(s.position()))
    }
}

/// The position of the first `import` statement, if any.
fn first_import(ast: &AST) -> Option<rhai::Position> {
    let mut found = None;
    ast.walk(&mut |path: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(stmt @ rhai::Stmt::Import(..))) = path.last() {
            found = Some(stmt.position());
            return false;
        }
        true
    });
    found
}

fn register_helpers(engine: &mut Engine) {
    // attr(map, name): case-insensitive attribute lookup.
    engine.register_fn("attr", |m: Map, name: &str| -> Dynamic {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .unwrap_or(Dynamic::UNIT)
    });
    // first(v): the first value of a multi-valued attribute, or the value itself.
    engine.register_fn("first", |v: Dynamic| -> Dynamic {
        if v.is_array() {
            v.cast::<Array>()
                .into_iter()
                .next()
                .unwrap_or(Dynamic::UNIT)
        } else {
            v
        }
    });
    // values(v): always an array (empty for ()).
    engine.register_fn("values", |v: Dynamic| -> Array {
        if v.is_array() {
            v.cast::<Array>()
        } else if v.is_unit() {
            Array::new()
        } else {
            vec![v]
        }
    });
    // ascii_fold(s): strips common Latin accents (for names and generated logins).
    engine.register_fn("ascii_fold", |s: &str| -> String { ascii_fold(s) });
    // normalize_space(s): trims and collapses runs of whitespace.
    engine.register_fn("normalize_space", |s: &str| -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    });
}

/// Folds Latin-1 and common Latin Extended-A letters to ASCII.
pub fn ascii_fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let r: &str = match c {
            'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' | 'Ā' | 'Ă' | 'Ą' => "A",
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
            'Æ' => "AE",
            'æ' => "ae",
            'Ç' | 'Ć' | 'Č' => "C",
            'ç' | 'ć' | 'č' => "c",
            'Ď' | 'Đ' | 'Ð' => "D",
            'ď' | 'đ' | 'ð' => "d",
            'È' | 'É' | 'Ê' | 'Ë' | 'Ē' | 'Ė' | 'Ę' | 'Ě' => "E",
            'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => "e",
            'Ì' | 'Í' | 'Î' | 'Ï' | 'Ī' | 'Į' => "I",
            'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' => "i",
            'Ł' | 'Ľ' | 'Ĺ' => "L",
            'ł' | 'ľ' | 'ĺ' => "l",
            'Ñ' | 'Ń' | 'Ň' => "N",
            'ñ' | 'ń' | 'ň' => "n",
            'Ò' | 'Ó' | 'Ô' | 'Õ' | 'Ö' | 'Ø' | 'Ō' | 'Ő' => "O",
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
            'Œ' => "OE",
            'œ' => "oe",
            'Ŕ' | 'Ř' => "R",
            'ŕ' | 'ř' => "r",
            'Ś' | 'Š' | 'Ş' => "S",
            'ś' | 'š' | 'ş' => "s",
            'ß' => "ss",
            'Ť' | 'Ţ' => "T",
            'ť' | 'ţ' => "t",
            'Ù' | 'Ú' | 'Û' | 'Ü' | 'Ū' | 'Ů' | 'Ű' | 'Ų' => "U",
            'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ų' => "u",
            'Ý' | 'Ÿ' => "Y",
            'ý' | 'ÿ' => "y",
            'Ź' | 'Ż' | 'Ž' => "Z",
            'ź' | 'ż' | 'ž' => "z",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(r);
    }
    out
}
