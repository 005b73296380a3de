//! Sandbox tests: limits, closed doors, error positions, host access.

use std::cell::RefCell;
use std::rc::Rc;

use idsync_core::{AttrMap, Conditions, Identity};
use rhai::{Dynamic, Scope};

use crate::*;

fn engine() -> RuleEngine {
    RuleEngine::new(&Limits::default())
}

fn run(src: &str) -> Result<Dynamic, RuleError> {
    let e = engine();
    let s = e.compile("t.rhai", src)?;
    e.run(&s, &mut Scope::new(), None)
}

#[test]
fn syntax_error_names_file_line_col() {
    let err = engine()
        .compile("rules/c.rhai", "let x = 1;\nlet y = ;\n")
        .unwrap_err();
    assert_eq!(err.script, "rules/c.rhai");
    assert_eq!(err.pos.map(|p| p.line), Some(2));
    assert!(err.to_string().starts_with("rules/c.rhai:2:"), "{err}");
}

#[test]
fn runtime_error_has_position() {
    let err = run("let a = 1;\nnosuch(a)").unwrap_err();
    assert_eq!(err.pos.map(|p| p.line), Some(2), "{err}");
    assert!(err.message.contains("nosuch"), "{err}");
}

#[test]
fn error_inside_function_shows_call_site_and_inner_position() {
    let err = run("fn f(x) {\n  x.nosuch()\n}\n\nf(1)").unwrap_err();
    assert_eq!(err.pos.map(|p| p.line), Some(5), "{err}");
    assert!(err.message.contains("at 2:"), "{err}");
}

#[test]
fn eval_is_disabled() {
    assert!(engine().compile("t.rhai", r#"eval("1")"#).is_err());
}

#[test]
fn import_is_refused_at_compile_time() {
    let err = engine()
        .compile("t.rhai", "let a = 1;\nimport \"/etc/passwd\" as p;\n1")
        .unwrap_err();
    assert_eq!(err.pos.map(|p| p.line), Some(2), "{err}");
    assert!(err.message.contains("import is not allowed"), "{err}");
}

#[test]
fn limits_stop_runaway_scripts() {
    for src in [
        "loop {}",
        "fn f(x) { f(x + 1) } f(0)",
        r#"let s = "x"; loop { s += s; }"#,
        "let a = []; loop { a.push(1); }",
        "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
    ] {
        let err = run(src).unwrap_err();
        assert!(
            err.message.contains("limit") || err.message.contains("operations"),
            "{src}: {err}"
        );
    }
}

#[test]
fn no_io_functions() {
    for src in [r#"open_file("x")"#, r#"system("ls")"#, r#"env("HOME")"#] {
        assert!(run(src).is_err(), "{src}");
    }
}

#[test]
fn scope_variables_do_not_leak_between_runs() {
    let e = engine();
    let s1 = e.compile("a.rhai", "let leaked = 1; leaked").unwrap();
    let s2 = e.compile("b.rhai", "leaked").unwrap();
    let mut scope = Scope::new();
    scope.push("account", Dynamic::UNIT);
    assert_eq!(e.run(&s1, &mut scope, None).unwrap().as_int(), Ok(1));
    assert_eq!(scope.len(), 1);
    assert!(e.run(&s2, &mut scope, None).is_err());
}

#[test]
fn helpers() {
    assert_eq!(
        run(r#"attr(#{ Mail: "a@x" }, "mail")"#)
            .unwrap()
            .to_string(),
        "a@x"
    );
    assert_eq!(run(r#"first(["a", "b"])"#).unwrap().to_string(), "a");
    assert_eq!(run(r#"values(()).len()"#).unwrap().as_int().unwrap(), 0);
    assert_eq!(
        run(r#"ascii_fold("Zoë Ångström")"#).unwrap().to_string(),
        "Zoe Angstrom"
    );
    assert_eq!(
        run(r#"normalize_space("  a   b ")"#).unwrap().to_string(),
        "a b"
    );
}

#[derive(Default)]
struct FakeHost {
    log: RefCell<Vec<String>>,
}

impl RuleHost for FakeHost {
    fn find_identity(&self, name: &str) -> Result<Option<Identity>, String> {
        Ok((name == "ann").then(|| Identity {
            name: "ann".into(),
            version: 3,
            disabled: false,
            attrs: [("mail", "ann@x")].into_iter().collect(),
            accounts: vec![],
        }))
    }
    fn query(&self, conds: &Conditions) -> Result<Vec<String>, String> {
        self.log.borrow_mut().push(format!("query {:?}", conds.0));
        Ok(vec!["ann".into()])
    }
    fn create(&self, name: &str, attrs: &AttrMap) -> Result<Identity, String> {
        self.log
            .borrow_mut()
            .push(format!("create {name} {}", attrs.len()));
        Ok(Identity {
            name: name.into(),
            version: 1,
            disabled: false,
            attrs: attrs.clone(),
            accounts: vec![],
        })
    }
    fn checkin(&self, view: &Identity) -> Result<i64, String> {
        self.log.borrow_mut().push(format!(
            "checkin {} v{} mail={:?}",
            view.name,
            view.version,
            view.attrs.first_text("mail")
        ));
        Ok(view.version + 1)
    }
    fn delete(&self, name: &str) -> Result<bool, String> {
        self.log.borrow_mut().push(format!("delete {name}"));
        Ok(true)
    }
    fn link(&self, name: &str) -> Result<(), String> {
        self.log.borrow_mut().push(format!("link {name}"));
        Ok(())
    }
    fn unlink(&self) -> Result<bool, String> {
        Ok(true)
    }
    fn work_item(&self, message: &str) -> Result<(), String> {
        self.log.borrow_mut().push(format!("work {message}"));
        Ok(())
    }
}

#[test]
fn process_context_reads_and_writes() {
    let e = engine();
    let s = e
        .compile(
            "p.rhai",
            r#"
            let v = ctx.checkout("ann");
            v.attrs.mail = "new@x";
            ctx.checkin(v);
            ctx.link("ann");
            let n = ctx.query(#{ empno: 7 });
            ctx.work_item("check " + n[0]);
            "#,
        )
        .unwrap();
    let h = Rc::new(FakeHost::default());
    let mut scope = Scope::new();
    scope.push("ctx", Context);
    let _ = e
        .run(&s, &mut scope, Some((h.clone(), Access::ReadWrite)))
        .unwrap();
    let log = h.log.borrow().clone();
    assert_eq!(
        log,
        vec![
            "checkin ann v3 mail=Some(\"new@x\")".to_string(),
            "link ann".into(),
            "query [(\"empno\", Text(\"7\"))]".into(),
            "work check ann".into(),
        ]
    );
}

#[test]
fn writes_refused_in_read_only_rules() {
    let e = engine();
    let s = e.compile("c.rhai", "ctx.link(\"ann\")").unwrap();
    let h = Rc::new(FakeHost::default());
    let mut scope = Scope::new();
    scope.push("ctx", Context);
    let err = e
        .run(&s, &mut scope, Some((h.clone(), Access::ReadOnly)))
        .unwrap_err();
    assert!(err.message.contains("only allowed"), "{err}");
    assert!(h.log.borrow().is_empty());
}

#[test]
fn read_only_queries_everywhere() {
    let e = engine();
    let s = e
        .compile("c.rhai", r#"find_identity("ann").attrs.mail"#)
        .unwrap();
    let h = Rc::new(FakeHost::default());
    let v = e
        .run(&s, &mut Scope::new(), Some((h, Access::ReadOnly)))
        .unwrap();
    assert_eq!(v.to_string(), "ann@x");
}

#[test]
fn mentions_finds_words_in_code_strings_and_comments_only() {
    let e = engine();
    let s = e
        .compile(
            "m",
            "let x = account.mail; // previous\nif is_def_var(\"identity\") { x } else { global_x }",
        )
        .unwrap();
    for word in [
        "account",
        "mail",
        "previous",
        "identity",
        "is_def_var",
        "global_x",
    ] {
        assert!(s.mentions(word), "{word}");
    }
    for word in ["global", "acc", "identit", "ail"] {
        assert!(!s.mentions(word), "{word}");
    }
}

/// The issue's hostile rule: a 10,000-entry map of distinct 512 KiB strings, built by
/// index assignment (which Rhai's per-value checks do not see): 5 GiB without the budget.
const MAP_OF_BIG_STRINGS: &str = r#"
let m = #{};
let s = "x";
s.pad(524288, "x");
let n = 0;
for i in 0..10000 { m[`k${i}`] = s + i; n += 1; }
n
"#;

#[test]
fn memory_budget_stops_a_map_of_big_strings() {
    let started = std::time::Instant::now();
    let err = run(MAP_OF_BIG_STRINGS).unwrap_err();
    assert_eq!(err.limit_hit(), Some(Limit::Memory), "{err}");
    assert_eq!(err.kind, RuleErrorKind::Limit(Limit::Memory));
    assert!(err.pos.is_none(), "{err}");
    assert_eq!(
        err.to_string(),
        "t.rhai: memory limit exceeded: the data this run holds passed max_memory_mb (64 MiB) (a map or array growing without bound?)"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn memory_budget_counts_every_variable_and_every_call_frame() {
    let limits = Limits {
        max_memory: 8 << 20,
        ..Limits::default()
    };
    let e = RuleEngine::new(&limits);
    for src in [
        // Many variables, each within the per-value limits.
        r#"let a = "x"; a.pad(1000000, "x");
           let b = a + 1; let c = a + 2; let d = a + 3; let e = a + 4; let f = a + 5;
           let g = a + 6; let h = a + 7; let i = a + 8; let j = a + 9;
           let n = 0; for k in 0..100 { n += k; } n"#,
        // Each frame of a recursion holds 1 MB; 32 frames deep is 32 MB.
        r#"fn f(n) { let a = "x"; a.pad(1000000, "y"); let b = a + n; if n < 30 { f(n + 1) } else { b.len() } }
           f(0)"#,
        // A script cannot catch it.
        r#"let r = 0; try { let m = #{}; let s = "x"; s.pad(900000, "x");
           for i in 0..100 { m[`k${i}`] = s + i; } } catch (e) { r = 1; } r"#,
    ] {
        let s = e.compile("t.rhai", src).unwrap();
        let err = e.run(&s, &mut Scope::new(), None).unwrap_err();
        assert_eq!(err.limit_hit(), Some(Limit::Memory), "{src}: {err}");
        assert!(err.to_string().contains("(8 MiB)"), "{err}");
    }
}

#[test]
fn memory_budget_leaves_ordinary_scripts_alone_and_resets_per_run() {
    let limits = Limits {
        max_memory: 8 << 20,
        ..Limits::default()
    };
    let e = RuleEngine::new(&limits);
    // 6 MB held, then dropped, run after run: each run has the whole budget. (No method
    // call on the map: that would have Rhai check its strings against max_string_size.)
    let s = e
        .compile(
            "t.rhai",
            r#"let a = "x"; a.pad(1000000, "x"); let m = #{}; let n = 0;
               for i in 0..6 { m[`k${i}`] = a + i; n += 1; } n"#,
        )
        .unwrap();
    for _ in 0..5 {
        assert_eq!(e.run(&s, &mut Scope::new(), None).unwrap().as_int(), Ok(6));
    }
    // The data handed in counts too: a scope holding 9 MB is over an 8 MB budget.
    let mut scope = Scope::new();
    scope.push("big", Dynamic::from("z".repeat(9 << 20)));
    let s = e
        .compile("t.rhai", "let n = 0; for i in 0..100 { n += i; } n")
        .unwrap();
    let err = e.run(&s, &mut scope, None).unwrap_err();
    assert_eq!(err.limit_hit(), Some(Limit::Memory), "{err}");
}

#[test]
fn limit_errors_are_typed() {
    for (src, limit) in [
        ("loop {}", Limit::Operations),
        ("fn f(x) { f(x + 1) } f(0)", Limit::CallDepth),
        (r#"let s = "x"; loop { s += s; }"#, Limit::DataSize),
    ] {
        assert_eq!(run(src).unwrap_err().limit_hit(), Some(limit), "{src}");
    }
    assert_eq!(run("nosuch()").unwrap_err().kind, RuleErrorKind::Script);
}

#[test]
fn limits_that_contradict_the_memory_budget_are_problems() {
    assert_eq!(Limits::default().problems(), Vec::<String>::new());
    let p = Limits {
        max_string_size: 100 << 20,
        ..Limits::default()
    }
    .problems();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("limits.max_string_size: one value at this limit holds about 100 MiB, more than limits.max_memory_mb (64 MiB)"), "{p:?}");
    let p = Limits {
        max_memory: 0,
        ..Limits::default()
    }
    .problems();
    assert_eq!(p, ["limits.max_memory_mb: must be at least 1"]);
}

#[test]
fn log_limiter_allows_a_burst_then_the_rate_and_counts_the_rest() {
    use std::time::{Duration, Instant};
    let mut l = crate::sandbox::LogLimiter::new(10);
    let a: Rc<str> = Rc::from("a.rhai");
    let b: Rc<str> = Rc::from("b.rhai");
    let t0 = Instant::now();
    for _ in 0..10 {
        assert_eq!(l.admit(&a, t0), Some(0));
    }
    for _ in 0..5 {
        assert_eq!(l.admit(&a, t0), None);
    }
    // Another rule file has its own bucket.
    assert_eq!(l.admit(&b, t0), Some(0));
    // After refusing, a waits for a full bucket (a second), then reports the count.
    assert_eq!(l.admit(&a, t0 + Duration::from_millis(500)), None);
    let t1 = t0 + Duration::from_millis(1000);
    assert_eq!(l.admit(&a, t1), Some(6));
    for _ in 0..9 {
        assert_eq!(l.admit(&a, t1), Some(0));
    }
    assert_eq!(l.admit(&a, t1), None);
    assert_eq!(crate::sandbox::LogLimiter::new(0).admit(&a, t0), Some(0));
}
