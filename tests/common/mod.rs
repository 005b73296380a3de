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
    /// With IDSYNC_TEST_REPOSITORY=postgres: the private PostgreSQL server holding this
    /// sandbox's repository (every config written without a `repository:` key points
    /// there).
    postgres: Option<idsync_testkit::postgres::Postgres>,
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
        let postgres = idsync_testkit::postgres::tests_use_postgres().then(|| {
            let pg = idsync_testkit::postgres::Postgres::start().unwrap();
            pg.create_database("idsync").unwrap();
            pg
        });
        Sandbox { dir, postgres }
    }

    /// Whether the repository is a private PostgreSQL database (see [`Sandbox::new`]).
    pub fn on_postgres(&self) -> bool {
        self.postgres.is_some()
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
        match &self.postgres {
            Some(pg) if !yaml.lines().any(|l| l.starts_with("repository:")) => self.write(
                "idsync.yaml",
                &format!("repository: {{ url: \"{}\" }}\n{yaml}", pg.url("idsync")),
            ),
            _ => self.write("idsync.yaml", yaml),
        }
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

    /// `idsync ARGS` with extra environment variables.
    pub fn idsync_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("IDSYNC_LOG")
            .envs(env.iter().copied())
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

    /// `idsync ARGS` expecting exit 0, its JSON lines parsed.
    pub fn json(&self, args: &[&str]) -> Vec<Value> {
        Self::json_lines(self.idsync(args))
    }

    /// `work-items list --json --state STATE`, parsed.
    pub fn work_items(&self, state: &str) -> Vec<Value> {
        self.json(&["work-items", "list", "--json", "--state", state])
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

    /// The stored checkpoint of `resource` (read from the repository file with SQLite, as
    /// an operator's reader would), `None` before its first commit.
    pub fn checkpoint(&self, resource: &str) -> Option<String> {
        let db = rusqlite::Connection::open_with_flags(
            self.db(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        db.query_row(
            "SELECT token FROM checkpoints WHERE resource = ?1",
            [resource],
            |r| r.get(0),
        )
        .ok()
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

// --- SMTP server fixture (notifications) -------------------------------------------------

/// A message the SMTP server received (idsync-testkit's).
pub use idsync_testkit::smtp::Received;

/// A real SMTP server (Debian's python3-aiosmtpd, idsync-testkit's) on a loopback port,
/// killed on drop; its `port` and every failure to start or read it a test failure.
pub struct SmtpServer(idsync_testkit::smtp::SmtpServer);

impl std::ops::Deref for SmtpServer {
    type Target = idsync_testkit::smtp::SmtpServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A loopback port of this test process's own block (see `idsync_testkit::free_port`).
pub fn free_port() -> u16 {
    idsync_testkit::free_port().unwrap()
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (see
/// `idsync_testkit::listens`). Tells a test's own server from another that has the port.
pub fn listens(pid: u32, port: u16) -> bool {
    idsync_testkit::listens(pid, port)
}

/// The port of an agent's status endpoint, read from its start-up line in its `log`
/// (`agent started: … status endpoint http://127.0.0.1:PORT`). Tests that read the endpoint
/// configure `status: { listen: "127.0.0.1:0" }` and let the kernel choose a free port; the
/// others turn it off.
pub fn endpoint_port(log: &str) -> Option<u16> {
    let rest = log.split("status endpoint http://").nth(1)?;
    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    addr.trim_end_matches(['/', ','])
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0): the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// The value of a metric line `name` (with its labels, e.g.
/// `idsync_passes_total{resource="hr"}`) in Prometheus text, 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` until it returns `Some` or `secs` pass.
pub fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl SmtpServer {
    /// A server that is not running yet, on `port`, writing into `dir`.
    pub fn on_port(dir: &Path, port: u16) -> SmtpServer {
        SmtpServer(idsync_testkit::smtp::SmtpServer::on_port(dir, port).unwrap())
    }

    /// How RCPT is answered from now on: `accept`, `451` or `550`.
    pub fn set_mode(&self, mode: &str) {
        self.0.set_mode(mode).unwrap();
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) {
        self.0.start().unwrap();
    }

    /// Starts it with STARTTLS required (`implicit`: TLS from the first byte, SMTPS), the
    /// server certificate `cert` and its `key`.
    pub fn start_tls(&mut self, cert: &Path, key: &Path, implicit: bool) {
        self.0.start_tls(cert, key, implicit).unwrap();
    }

    /// Starts it requiring STARTTLS (certificate `cert`, key `key`) and then AUTH as
    /// `login` with `password`.
    pub fn start_auth(&mut self, cert: &Path, key: &Path, login: &str, password: &str) {
        self.0.start_auth(cert, key, login, password).unwrap();
    }

    /// Stops it (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        self.0.stop();
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.0.received().unwrap()
    }

    /// Waits until at least `n` messages arrived.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        self.0.wait_for(n).unwrap()
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

    /// Starts `idsync run` as users run it (default log level) with extra environment
    /// variables; its stderr goes to `agent.log` in the sandbox ([`Sandbox::agent_log`]), so
    /// a chatty agent never blocks on a full pipe and tests can wait for a log line.
    pub fn start_logged(&self, env: &[(&str, &str)]) -> std::process::Child {
        let log = std::fs::File::create(self.path().join("agent.log")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_idsync"))
            .arg("run")
            .current_dir(self.path())
            .env_remove("IDSYNC_LOG")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start idsync run")
    }

    /// What the agent started with [`Sandbox::start_logged`] logged so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path().join("agent.log")).unwrap_or_default()
    }

    /// `sqlite3 idsync.db QUERY` (5 s busy timeout), as an operator reads the repository,
    /// or `psql` on a PostgreSQL repository: the output, trimmed; panics if the shell fails.
    pub fn sql(&self, query: &str) -> String {
        if let Some(pg) = &self.postgres {
            // psql -A -t prints rows as sqlite3 does: fields joined by `|`.
            return pg.psql("idsync", query).unwrap();
        }
        let out = Command::new("sqlite3")
            .args(["-cmd", ".timeout 5000"])
            .arg(self.db())
            .arg(query)
            .output()
            .expect("the sqlite3 shell (Debian package sqlite3) runs");
        assert!(
            out.status.success(),
            "sqlite3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Writes `content` beside `rel` and renames it into place (an atomic replace).
    pub fn replace_atomically(&self, rel: &str, content: &str) {
        let p = self.dir.path().join(rel);
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }
}

/// SIGTERM to an agent, then waits for it (at most a minute): its exit status and how long
/// it took to exit.
pub fn terminate(child: &mut std::process::Child) -> (Option<i32>, std::time::Duration) {
    let asked = std::time::Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), asked.elapsed());
        }
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(60),
            "the agent ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
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

// --- dates, for feeds that carry them ----------------------------------------------

/// Days from 1970-01-01 to the civil date (proleptic Gregorian), and back.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `secs` (Unix) as `2026-07-01T09:00:00Z`.
pub fn rfc3339(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}
