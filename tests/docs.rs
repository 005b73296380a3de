//! The documentation's examples run: the complete example of docs/config.md loads and
//! checks, the example rule set in rules/ checks, runs its feed and passes its fixtures,
//! and so does the process-rule variant; the README's five-minute tour runs as written on
//! the quickstart, and the quickstart script runs wherever cargo's target folder is.
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

/// The fenced block of `lang` that follows `heading` in a markdown file.
fn block_after(markdown: &str, heading: &str, lang: &str) -> String {
    let from = markdown.find(heading).expect("the heading") + heading.len();
    let fence = format!("```{lang}\n");
    let start = markdown[from..].find(&fence).expect("the block") + from + fence.len();
    let end = markdown[start..].find("```").expect("closing fence") + start;
    markdown[start..end].to_owned()
}

/// A copy of examples/quickstart (without its work folder) in `to`.
fn copy_quickstart(to: &Path) {
    copy_tree(&repo_root().join("examples/quickstart"), to);
    let _ = std::fs::remove_dir_all(to.join("work"));
}

#[test]
fn the_readme_tour_runs_as_written_on_the_quickstart() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let tour = "## A five-minute tour";
    let s = Sandbox::new();
    copy_quickstart(s.path());
    // The config and the rule the README shows are the quickstart's, verbatim.
    let yaml = block_after(&readme, tour, "yaml");
    let config = std::fs::read_to_string(s.path().join("idsync.yaml")).unwrap();
    assert!(
        config.contains(&yaml),
        "the README's config is not the quickstart's:\n{yaml}"
    );
    let rhai = block_after(&readme, tour, "rhai");
    let correlation = std::fs::read_to_string(s.path().join("rules/correlation.rhai")).unwrap();
    assert_eq!(
        rhai, correlation,
        "the README's rule is not the quickstart's"
    );
    std::fs::copy(
        s.path().join("feeds/day1.csv"),
        s.path().join("feeds/hr.csv"),
    )
    .unwrap();

    // Every command of the tour, in order; only the long-running agent is left out.
    let commands = block_after(&readme, "Then:", "sh");
    let mut ran = 0;
    for line in commands.lines() {
        let command = line.split("  #").next().unwrap().trim();
        let args: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(args.first(), Some(&"idsync"), "{line}");
        if args == ["idsync", "run"] {
            continue; // the agent runs until SIGTERM (tests/service.rs drives it)
        }
        let out = s.idsync(&args[1..]);
        assert_eq!(out.code, 0, "{command}\n{}\n{}", out.stdout, out.stderr);
        match args[1] {
            "run" => assert!(out.stdout.contains("created 7"), "{}", out.stdout),
            "test-rules" => assert!(out.stdout.contains(" 0 failed"), "{}", out.stdout),
            "explain" => assert!(out.stdout.contains("created"), "{}", out.stdout),
            _ => {}
        }
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} commands ran");
}

#[test]
fn the_quickstart_runs_when_cargo_builds_elsewhere() {
    // run.sh and scripts/ in a scratch copy of the repository layout; the binary is the
    // one cargo built for this test, the target folder another one (CARGO_TARGET_DIR).
    let s = Sandbox::new();
    let quickstart = s.path().join("examples/quickstart");
    copy_quickstart(&quickstart);
    copy_tree(&repo_root().join("scripts"), &s.path().join("scripts"));
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(quickstart.join("run.sh"))
        .env("IDSYNC_BIN", env!("CARGO_BIN_EXE_idsync"))
        .env("CARGO_TARGET_DIR", elsewhere.path())
        .env_remove("IDSYNC_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("==> Done"), "{stdout}");
}

#[test]
fn the_scripts_find_the_target_folder_cargo_uses() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/cargo-target-dir.sh"))
        .env("CARGO_TARGET_DIR", elsewhere.path())
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        elsewhere.path().to_str().unwrap()
    );
    // Neither script names target/ itself any more.
    for script in ["examples/quickstart/run.sh", "scripts/test.sh"] {
        let text = std::fs::read_to_string(repo_root().join(script)).unwrap();
        assert!(!text.contains("/target/"), "{script} hard-codes target/");
        assert!(text.contains("cargo-target-dir.sh"), "{script}");
    }
}
