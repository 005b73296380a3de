//! The documentation's examples run: the complete example of docs/config.md loads and
//! checks, the example rule set in rules/ checks, runs its feed and passes its fixtures,
//! and so does the process-rule variant.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::Sandbox;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The single ```yaml block of a markdown file.
fn yaml_block(markdown: &str) -> String {
    let start = markdown.find("```yaml\n").expect("a ```yaml block") + "```yaml\n".len();
    let end = markdown[start..].find("```").expect("closing fence") + start;
    markdown[start..end].to_owned()
}

#[test]
fn the_config_reference_example_checks() {
    let md = std::fs::read_to_string(repo_root().join("docs/config.md")).unwrap();
    let yaml = yaml_block(&md);
    let s = Sandbox::new();
    s.config(&yaml);
    // Every rule file the example names exists (as a trivial script); so do its feeds.
    for line in yaml.lines() {
        if let Some(i) = line.find(".rhai") {
            let name = line[..i].rsplit([' ', ':']).next().unwrap().trim();
            s.rule(&format!("{name}.rhai"), "()");
        }
    }
    let out = s.idsync(&["check"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
}

/// Copies a folder tree (rules/ or the quickstart) into the sandbox.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".db") || name.contains(".db-") || name.ends_with(".lock") {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_example_rule_set_checks_runs_and_passes_its_fixtures() {
    let s = Sandbox::new();
    let rules = s.path().join("rules");
    copy_tree(&repo_root().join("rules"), &rules);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(args)
            .current_dir(&rules)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["run", "--once"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created"), "{out}");
    let (code, out, err) = run(&["test-rules"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" 0 failed"), "{out}");
    let (code, out, err) = run(&["--config", "idsync-process.yaml", "check"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["--config", "idsync-process.yaml", "run", "--once"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("processed"), "{out}");
}
