//! SMTP servers to send idsync's mail to:
//!
//! - [`SmtpServer`]: a real server (Debian's python3-aiosmtpd) on a free loopback port that
//!   keeps every message it accepts as a file, answers RCPT as told (`accept`, `451`,
//!   `550`), and can require STARTTLS, implicit TLS or AUTH; for the notification tests;
//! - [`Sink`]: a minimal in-process sink that accepts every message (`250` to everything,
//!   `354` to DATA, reads to the lone dot) and only counts, on a thread of its own, so a
//!   benchmark measures the sender, not a mail server (`idsync-bench outbox`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

// --- the counting sink ---------------------------------------------------------------------

/// A running sink: its address and how many messages it accepted. It runs for the life of
/// the process.
#[derive(Debug)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Messages accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl Sink {
    /// Starts a sink on `127.0.0.1` (free port) on a thread of its own.
    pub fn start() -> anyhow::Result<Sink> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the SMTP sink")?;
        listener
            .set_nonblocking(true)
            .context("making the SMTP sink's socket non-blocking")?;
        let addr = listener
            .local_addr()
            .context("reading the SMTP sink's address")?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the SMTP sink's runtime")?;
        std::thread::Builder::new()
            .name("smtp-sink".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    while let Ok((sock, _)) = listener.accept().await {
                        let count = count.clone();
                        tokio::spawn(async move {
                            let _ = session(sock, count).await;
                        });
                    }
                });
            })
            .context("starting the SMTP sink's thread")?;
        Ok(Sink { addr, accepted })
    }

    /// Messages accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// One SMTP session: every command succeeds; a message ends at the lone dot and is counted.
async fn session(sock: TcpStream, count: Arc<AtomicU64>) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 idsync-sink ESMTP\r\n").await?;
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" || line == ".\n" {
                in_data = false;
                count.fetch_add(1, Ordering::Relaxed);
                w.write_all(b"250 2.0.0 queued\r\n").await?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-idsync-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "DATA" => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            "QUIT" => {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        w.write_all(reply).await?;
    }
}

// --- aiosmtpd --------------------------------------------------------------------------------

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

/// A real SMTP server (Debian's python3-aiosmtpd) on a loopback port, killed on drop.
pub struct SmtpServer {
    child: Option<Child>,
    dir: PathBuf,
    /// Its port.
    pub port: u16,
}

impl SmtpServer {
    /// A server that is not running yet, on `port`, writing into `dir`.
    pub fn on_port(dir: &Path, port: u16) -> anyhow::Result<SmtpServer> {
        let inbox = dir.join("inbox");
        std::fs::create_dir_all(&inbox).with_context(|| format!("creating {}", inbox.display()))?;
        let handler = dir.join("smtp_handler.py");
        std::fs::write(&handler, SMTP_HANDLER)
            .with_context(|| format!("writing {}", handler.display()))?;
        Ok(SmtpServer {
            child: None,
            dir: dir.to_path_buf(),
            port,
        })
    }

    /// How RCPT is answered from now on: `accept`, `451` or `550`.
    pub fn set_mode(&self, mode: &str) -> anyhow::Result<()> {
        let path = self.dir.join("mode");
        std::fs::write(&path, mode).with_context(|| format!("writing {}", path.display()))
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.start_with(&[])
    }

    /// Starts it with STARTTLS required (`implicit`: TLS from the first byte, SMTPS), the
    /// server certificate `cert` and its `key`.
    pub fn start_tls(&mut self, cert: &Path, key: &Path, implicit: bool) -> anyhow::Result<()> {
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
        ])
    }

    /// Starts it requiring STARTTLS (certificate `cert`, key `key`) and then AUTH as
    /// `login` with `password`.
    pub fn start_auth(
        &mut self,
        cert: &Path,
        key: &Path,
        login: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let script = self.dir.join("smtp_auth_server.py");
        for (path, content) in [
            (script.clone(), SMTP_AUTH_SERVER),
            (self.dir.join("login"), login),
            (self.dir.join("password"), password),
        ] {
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let folder = self.dir.clone();
        self.launch(&[
            script.into_os_string(),
            self.port.to_string().into(),
            cert.as_os_str().to_owned(),
            key.as_os_str().to_owned(),
            folder.into_os_string(),
        ])
    }

    fn start_with(&mut self, options: &[std::ffi::OsString]) -> anyhow::Result<()> {
        let mut args: Vec<std::ffi::OsString> = ["-m", "aiosmtpd", "-n", "-l"]
            .into_iter()
            .map(Into::into)
            .collect();
        args.push(format!("127.0.0.1:{}", self.port).into());
        args.extend(options.iter().cloned());
        args.extend(["-c".into(), "smtp_handler.Handler".into()]);
        args.push(self.dir.join("inbox").into_os_string());
        args.push(self.dir.join("mode").into_os_string());
        self.launch(&args)
    }

    /// Runs Debian's python3 with `args` (the handler module importable) and waits until
    /// the port accepts connections.
    fn launch(&mut self, args: &[std::ffi::OsString]) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the SMTP server is already running");
        let importable = Command::new("/usr/bin/python3")
            .args(["-c", "import aiosmtpd"])
            .output()
            .context("running /usr/bin/python3 (apt-get install python3)")?;
        ensure!(
            importable.status.success(),
            "the SMTP server needs Debian's python3-aiosmtpd (apt-get install python3-aiosmtpd; \
             scripts/test.sh installs it): {}",
            String::from_utf8_lossy(&importable.stderr).trim()
        );
        let log = self.dir.join("smtp.log");
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new("/usr/bin/python3")
            .args(args)
            .env("PYTHONPATH", &self.dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting /usr/bin/python3 -m aiosmtpd (apt-get install python3-aiosmtpd)")?;
        let port = self.port;
        // Ready when our own process listens on the port (not another server that took it
        // meanwhile); an exit (the port taken, a bad option) is reported at once with the
        // server's own words.
        let ready = crate::poll(
            20,
            Duration::from_millis(50),
            "the SMTP server to listen",
            || match child.try_wait() {
                Ok(Some(status)) => Some(Err(anyhow::anyhow!(
                    "the SMTP server on port {port} exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))),
                Err(e) => Some(Err(
                    anyhow::Error::new(e).context("waiting for the SMTP server")
                )),
                Ok(None) => crate::listens(child.id(), port).then_some(Ok(())),
            },
        )
        .and_then(|r| r);
        if ready.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        } else {
            self.child = Some(child);
        }
        ready
    }

    /// Stops it (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> anyhow::Result<Vec<Received>> {
        let inbox = self.dir.join("inbox");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&inbox)
            .with_context(|| format!("reading {}", inbox.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        names
            .into_iter()
            .map(|p| {
                let raw = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                Ok(Received {
                    raw: String::from_utf8_lossy(&raw).into_owned(),
                    rcpt: std::fs::read_to_string(p.with_extension("rcpt"))
                        .unwrap_or_default()
                        .lines()
                        .map(str::to_owned)
                        .collect(),
                })
            })
            .collect()
    }

    /// Waits (up to 30 s) until at least `n` messages arrived.
    pub fn wait_for(&self, n: usize) -> anyhow::Result<Vec<Received>> {
        crate::poll(
            30,
            Duration::from_millis(50),
            &format!("{n} message(s)"),
            || {
                let r = self.received().ok()?;
                (r.len() >= n).then_some(r)
            },
        )
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}
