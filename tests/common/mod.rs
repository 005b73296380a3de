//! Test harness: a temporary folder with a config, rules and feeds, and the real `idsync`
//! binary run in it. Every assertion reads the repository back through the CLI
//! (`identities export`, `results --json`, `failed list --json`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A working folder for one scenario.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

/// What one run of the binary printed.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::create_dir_all(dir.path().join("feeds")).unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, content).unwrap();
    }

    pub fn config(&self, yaml: &str) {
        self.write("idsync.yaml", yaml);
    }

    pub fn rule(&self, name: &str, src: &str) {
        self.write(&format!("rules/{name}"), src);
    }

    pub fn feed(&self, name: &str, csv: &str) {
        self.write(&format!("feeds/{name}"), csv);
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("idsync.db")
    }

    /// Runs `idsync ARGS` in the folder (config `idsync.yaml`).
    pub fn idsync(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("IDSYNC_LOG")
            .output()
            .expect("run idsync");
        Run::from(out)
    }

    /// `idsync run --once [--resource R]`, expecting `code`.
    pub fn run_once(&self, resource: Option<&str>, code: i32) -> Run {
        let mut args = vec!["run", "--once"];
        if let Some(r) = resource {
            args.extend(["--resource", r]);
        }
        self.idsync(&args).expect_code(code)
    }

    fn json_lines(run: Run) -> Vec<Value> {
        let run = run.expect_code(0);
        run.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `identities export`, parsed.
    pub fn export(&self) -> Vec<Value> {
        Self::json_lines(self.idsync(&["identities", "export"]))
    }

    /// One exported identity.
    pub fn identity(&self, name: &str) -> Option<Value> {
        self.export().into_iter().find(|i| i["name"] == name)
    }

    /// The identity that owns `resource:key`.
    pub fn owner(&self, resource: &str, key: &str) -> Option<String> {
        self.export().into_iter().find_map(|i| {
            i["accounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["resource"] == resource && a["key"] == key)
                .then(|| i["name"].as_str().unwrap().to_owned())
        })
    }

    /// `results --json [extra args]`, parsed.
    pub fn results(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["results", "--json"];
        args.extend_from_slice(extra);
        Self::json_lines(self.idsync(&args))
    }

    /// The newest decision record.
    pub fn last_result(&self) -> Value {
        self.results(&[]).pop().expect("a decision record")
    }

    /// `failed list --json`, parsed.
    pub fn failed(&self) -> Vec<Value> {
        Self::json_lines(self.idsync(&["failed", "list", "--json"]))
    }
}

/// An attribute's text value in an exported identity (first value if several).
pub fn attr<'a>(identity: &'a Value, name: &str) -> Option<&'a str> {
    let v = &identity["attrs"][name];
    match v {
        Value::String(s) => Some(s),
        Value::Array(a) => a.first().and_then(Value::as_str),
        _ => None,
    }
}

/// A long-running `idsync run` (watching), killed when dropped.
pub struct Agent {
    child: std::process::Child,
}

impl Agent {
    /// Kills the agent and returns what it printed on stderr.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        err
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandbox {
    /// Starts `idsync run` (no `--once`) with extra environment variables.
    pub fn start_agent(&self, env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idsync"));
        cmd.args(["run"])
            .current_dir(self.dir.path())
            .env_remove("IDSYNC_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent {
            child: cmd.spawn().expect("start idsync run"),
        }
    }

    /// Writes `content` beside `rel` and renames it into place (an atomic replace).
    pub fn replace_atomically(&self, rel: &str, content: &str) {
        let p = self.dir.path().join(rel);
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }
}

/// Polls `check` until it returns `Some` or `secs` seconds pass (then panics with `what`).
pub fn eventually<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
