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
