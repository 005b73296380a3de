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

/// The aiosmtpd handler: answers RCPT according to the `mode` file (`accept`, `451`,
/// `550`), writes each accepted message as `N.eml` (raw bytes) and `N.rcpt` (one envelope
/// recipient a line) into the output folder, atomically.
const SMTP_HANDLER: &str = r#"
import os, itertools

class Handler:
    def __init__(self, outdir, modefile):
        self.outdir = outdir
        self.modefile = modefile
        self.counter = itertools.count(1)

    @classmethod
    def from_cli(cls, parser, outdir, modefile):
        return cls(outdir, modefile)

    def mode(self):
        try:
            with open(self.modefile) as f:
                return f.read().strip()
        except OSError:
            return "accept"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = self.mode()
        if m == "451":
            return "451 4.3.0 mailbox busy, try again later"
        if m == "550":
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        n = next(self.counter)
        base = os.path.join(self.outdir, "%d-%d" % (os.getpid(), n))
        with open(base + ".rcpt.tmp", "w") as f:
            f.write("\n".join(envelope.rcpt_tos))
        os.rename(base + ".rcpt.tmp", base + ".rcpt")
        with open(base + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(base + ".tmp", base + ".eml")
        return "250 2.0.0 accepted"
"#;

/// A server that requires STARTTLS and then AUTH (PLAIN or LOGIN) with the login and
/// password in the files `login` and `password` of its folder; same handler and inbox.
const SMTP_AUTH_SERVER: &str = r#"
import asyncio, os, ssl, sys
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from smtp_handler import Handler

port, cert, key, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def read(name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read().strip()

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == read("login") \
        and auth_data.password == read("password")
    return AuthResult(success=ok, handled=False)

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
handler = Handler(os.path.join(folder, "inbox"), os.path.join(folder, "mode"))
controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                        require_starttls=True, authenticator=authenticator,
                        auth_required=True)
controller.start()
asyncio.get_event_loop().run_forever()
"#;

/// A message the SMTP server received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Envelope recipients.
    pub rcpt: Vec<String>,
    /// The raw message.
    pub raw: String,
}

impl Received {
    /// The header lines, unfolded.
    pub fn headers(&self) -> Vec<(String, String)> {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or("");
        let mut out: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(last) = out.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                out.push((k.to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        out
    }

    /// The value of the first header `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.headers()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A real SMTP server (Debian's python3-aiosmtpd) on a free loopback port, killed on drop.
pub struct SmtpServer {
    child: Option<std::process::Child>,
    dir: PathBuf,
    pub port: u16,
}

/// Ports handed out by [`free_port`] in this process so far.
static PORTS_TAKEN: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A loopback port for a server a test starts on the command line (slapd, aiosmtpd) or
/// names in a config before the server runs. The kernel's "any free port" (bind to port 0,
/// release) can hand the same port to two tests running at once, and to the next client
/// socket; so each test process takes ports from a block of its own, derived from its
/// process id (nextest runs every test in a process of its own; two runs of the suite at
/// once have different pids), below the kernel's ephemeral range (32768–60999) so no client
/// socket takes them either, skipping any that is in use right now. A server that still
/// fails to bind says so (slapd retries on another port, see `slapd.rs`).
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const BLOCK: u32 = 24;
    const BLOCKS: u32 = (32_000 - FIRST) / BLOCK;
    let base = FIRST + (std::process::id() % BLOCKS) * BLOCK;
    loop {
        let n = PORTS_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(
            u32::from(n) < BLOCK,
            "this test process used up its {BLOCK} ports"
        );
        let port = u16::try_from(base + u32::from(n)).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (or on every
/// address): `/proc/net/tcp` names the listening socket's inode, `/proc/PID/fd` the
/// process's sockets. Tells a test's own server from another that has the port.
pub fn listens(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((_, p)) = f[1].rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok).any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            })
        })
        .unwrap_or(false)
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
        std::fs::create_dir_all(dir.join("inbox")).unwrap();
        std::fs::write(dir.join("smtp_handler.py"), SMTP_HANDLER).unwrap();
        SmtpServer {
            child: None,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// How RCPT is answered from now on: `accept`, `451` or `550`.
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).unwrap();
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts it with STARTTLS required (`implicit`: TLS from the first byte, SMTPS), the
    /// server certificate `cert` and its `key`.
    pub fn start_tls(&mut self, cert: &Path, key: &Path, implicit: bool) {
        let (cert_flag, key_flag) = if implicit {
            ("--smtpscert", "--smtpskey")
        } else {
            ("--tlscert", "--tlskey")
        };
        self.start_with(&[
            cert_flag.into(),
            cert.as_os_str().to_owned(),
            key_flag.into(),
            key.as_os_str().to_owned(),
        ]);
    }

    /// Starts it requiring STARTTLS (certificate `cert`, key `key`) and then AUTH as
    /// `login` with `password`.
    pub fn start_auth(&mut self, cert: &Path, key: &Path, login: &str, password: &str) {
        std::fs::write(self.dir.join("smtp_auth_server.py"), SMTP_AUTH_SERVER).unwrap();
        std::fs::write(self.dir.join("login"), login).unwrap();
        std::fs::write(self.dir.join("password"), password).unwrap();
        let script = self.dir.join("smtp_auth_server.py");
        let folder = self.dir.clone();
        self.launch(&[
            script.into_os_string(),
            self.port.to_string().into(),
            cert.as_os_str().to_owned(),
            key.as_os_str().to_owned(),
            folder.into_os_string(),
        ]);
    }

    fn start_with(&mut self, options: &[std::ffi::OsString]) {
        let mut args: Vec<std::ffi::OsString> = ["-m", "aiosmtpd", "-n", "-l"]
            .into_iter()
            .map(Into::into)
            .collect();
        args.push(format!("127.0.0.1:{}", self.port).into());
        args.extend(options.iter().cloned());
        args.extend(["-c".into(), "smtp_handler.Handler".into()]);
        args.push(self.dir.join("inbox").into_os_string());
        args.push(self.dir.join("mode").into_os_string());
        self.launch(&args);
    }

    /// Runs Debian's python3 with `args` (the handler module importable) and waits until
    /// the port accepts connections.
    fn launch(&mut self, args: &[std::ffi::OsString]) {
        assert!(self.child.is_none(), "already running");
        let importable = Command::new("/usr/bin/python3")
            .args(["-c", "import aiosmtpd"])
            .output()
            .expect("run /usr/bin/python3 (apt-get install python3)");
        assert!(
            importable.status.success(),
            "the SMTP tests need Debian's python3-aiosmtpd (apt-get install python3-aiosmtpd; \
             scripts/test.sh installs it): {}",
            String::from_utf8_lossy(&importable.stderr).trim()
        );
        let log = self.dir.join("smtp.log");
        let mut child = Command::new("/usr/bin/python3")
            .args(args)
            .env("PYTHONPATH", &self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start /usr/bin/python3 -m aiosmtpd (apt-get install python3-aiosmtpd)");
        let port = self.port;
        // Ready when our own process listens on the port (not another test's server that
        // took it meanwhile); an exit (the port taken, a bad option) is reported at once
        // with the server's own words.
        poll(20, "the SMTP server to listen", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the SMTP server on port {port} exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            listens(child.id(), port).then_some(())
        });
        self.child = Some(child);
    }

    /// Stops it (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("inbox"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        names
            .into_iter()
            .map(|p| Received {
                raw: String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
                rcpt: std::fs::read_to_string(p.with_extension("rcpt"))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        poll(30, &format!("{n} message(s)"), || {
            let r = self.received();
            (r.len() >= n).then_some(r)
        })
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
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
