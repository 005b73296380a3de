//! The sandboxed Rhai engine: limits, no `eval`, no modules, no IO; scripts compiled once.

use std::cell::RefCell;
use std::rc::Rc;

use rhai::{AST, Array, Dynamic, Engine, Map, Scope};

use crate::error::{Pos, RuleError};
use crate::host::{self, Access, HostSlot, RuleHost};

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
        }
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
        engine.on_print(|text| tracing::info!(target: "idsync::rule", "{text}"));
        engine.on_debug(|text, source, pos| {
            tracing::debug!(target: "idsync::rule", "{}:{}: {text}", source.unwrap_or("rule"), pos)
        });
        register_helpers(&mut engine);
        let slot: HostSlot = Rc::new(RefCell::new(None));
        host::register(&mut engine, &slot);
        RuleEngine { engine, slot }
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
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(scope, &script.ast);
        *self.slot.borrow_mut() = None;
        scope.rewind(mark);
        result.map_err(|e| RuleError::eval(&script.label, &e))
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
