//! A private OpenLDAP server: generated `slapd.conf` (mdb, syncprov with its session log on an
//! accesslog database, the accesslog overlay, a non-admin sync account with `limits` and ACLs,
//! optional TLS with a throw-away CA), loaded offline with `slapadd` (the base entries, then
//! optionally a bulk LDIF file), run in the foreground as a child (`-d`) on free loopback
//! ports, stopped with SIGTERM and waited for, its folder removed on drop. Readiness and
//! changes go through `ldapsearch`/`ldapmodify` (ldap-utils).
//!
//! The LDAP tests start it with the operations log on ([`Options::log_operations`], so they
//! can count searches); `idsync-bench ldap` starts it with generated entries and no log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

/// The directory's suffix.
pub const SUFFIX: &str = "dc=example,dc=com";
/// The root DN (no ACL applies to it).
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
/// The root DN's password.
pub const ADMIN_PW: &str = "admin-secret";
/// A non-admin account that may read everything (`limits` unlimited), as a sync account.
pub const SYNC_DN: &str = "cn=sync,dc=example,dc=com";
/// Its password.
pub const SYNC_PW: &str = "sync-secret";
/// Where people live.
pub const PEOPLE: &str = "ou=people,dc=example,dc=com";

/// How long a start may take, from launch to the root DSE answering.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// An OpenLDAP server program, from PATH or Debian's /usr/sbin.
fn sbin(name: &str) -> String {
    let p = Path::new("/usr/sbin").join(name);
    if p.is_file() {
        p.display().to_string()
    } else {
        name.to_owned()
    }
}

/// A generated CA and server certificate (openssl), for ldaps, StartTLS and SMTP over TLS.
#[derive(Debug)]
pub struct Tls {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The server certificate for 127.0.0.1 and localhost (PEM).
    pub cert: PathBuf,
    /// The server certificate's key (PEM).
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let what = format!("openssl {args:?}");
    crate::run_tool(
        Command::new("openssl").args(args),
        dir,
        &what,
        "apt-get install openssl",
    )
    .map(|_| ())
}

impl Tls {
    /// Generates a CA and a server certificate it signed into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Tls> {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=idsync test CA",
            ],
        )?;
        let ext = dir.join("ext.cnf");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .with_context(|| format!("writing {}", ext.display()))?;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        )?;
        Ok(Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        })
    }
}

/// How to start a server.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// Also listen on ldaps:// and offer StartTLS (a generated CA, [`Slapd::tls`]).
    pub tls: bool,
    /// syncprov honours the reload hint (`syncprov-reloadhint`) on the data database: a
    /// consumer whose cookie its logs cannot serve is told e-syncRefreshRequired instead of
    /// being sent a present phase.
    pub reload_hint: bool,
    /// Log one line per operation (`-d stats`) into `slapd.log`, for [`Slapd::searches`].
    /// Off, the server logs nothing (`-d 0`), as a benchmark wants.
    pub log_operations: bool,
    /// An LDIF file of further entries under [`SUFFIX`], loaded offline after the base
    /// entries with `slapadd -q` (a bulk load).
    pub entries: Option<&'a Path>,
}

/// A running (or stopped) private slapd.
pub struct Slapd {
    dir: tempfile::TempDir,
    /// The ldap:// port.
    pub port: u16,
    /// The ldaps:// port, with TLS.
    pub tls_port: Option<u16>,
    /// The certificates, with TLS.
    pub tls: Option<Tls>,
    log_operations: bool,
    child: Option<Child>,
    /// Whether it ran once: a restart must come back on the same ports.
    started_once: bool,
}

const BASE_LDIF: &str = "dn: dc=example,dc=com
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=com
objectClass: organizationalUnit
ou: people

dn: ou=other,dc=example,dc=com
objectClass: organizationalUnit
ou: other

dn: cn=sync,dc=example,dc=com
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: sync
userPassword: sync-secret
";

/// Runs `slapadd` in `dir` with `args`.
fn slapadd(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    crate::run_tool(
        Command::new(sbin("slapadd")).args(args),
        dir,
        "slapadd",
        "apt-get install slapd",
    )
    .map(|_| ())
}

impl Slapd {
    /// Configures, loads and starts a server; returns once it answers.
    pub fn start(options: &Options<'_>) -> anyhow::Result<Slapd> {
        let dir = tempfile::Builder::new()
            .prefix("idsync-slapd-")
            .tempdir()
            .context("creating the slapd folder")?;
        let d = dir.path();
        for sub in ["data", "accesslog"] {
            std::fs::create_dir_all(d.join(sub))
                .with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        let tls = if options.tls {
            Some(Tls::generate(d)?)
        } else {
            None
        };
        let tls_lines = match &tls {
            Some(t) => format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ),
            None => String::new(),
        };
        // maxsize only bounds the memory map: large enough for a million-entry bench.
        let conf = format!(
            "include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload syncprov
moduleload accesslog
sizelimit size.soft=unlimited size.hard=unlimited
{tls_lines}
database mdb
suffix cn=accesslog
rootdn cn=admin,cn=accesslog
directory {d}/accesslog
maxsize 4294967296
dbnosync
index objectClass,entryCSN,reqEnd,reqResult,reqStart,reqDN,reqType eq
access to * by dn.exact=\"{SYNC_DN}\" read by * none
limits dn.exact=\"{SYNC_DN}\" size=unlimited time=unlimited
overlay syncprov
syncprov-nopresent TRUE
syncprov-reloadhint TRUE

database mdb
suffix {SUFFIX}
rootdn {ADMIN_DN}
rootpw {ADMIN_PW}
directory {d}/data
maxsize 8589934592
dbnosync
index objectClass,entryCSN,entryUUID eq
index departmentNumber eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by dn.exact=\"{SYNC_DN}\" read by * none
limits dn.exact=\"{SYNC_DN}\" size=unlimited time=unlimited
overlay syncprov
syncprov-checkpoint 100 10
syncprov-sessionlog-source cn=accesslog
{hint}overlay accesslog
logdb cn=accesslog
logops writes
logsuccess TRUE
",
            d = d.display(),
            hint = if options.reload_hint {
                "syncprov-reloadhint TRUE\n"
            } else {
                ""
            },
        );
        std::fs::write(d.join("slapd.conf"), conf).context("writing slapd.conf")?;
        std::fs::write(d.join("base.ldif"), BASE_LDIF).context("writing base.ldif")?;
        slapadd(d, &["-f", "slapd.conf", "-b", SUFFIX, "-l", "base.ldif"])?;
        if let Some(entries) = options.entries {
            let path = entries
                .to_str()
                .with_context(|| format!("{} is not UTF-8", entries.display()))?;
            slapadd(d, &["-q", "-f", "slapd.conf", "-b", SUFFIX, "-l", path])
                .with_context(|| format!("loading {}", entries.display()))?;
        }
        let mut s = Slapd {
            port: 0,
            tls_port: None,
            tls,
            dir,
            log_operations: options.log_operations,
            child: None,
            started_once: false,
        };
        s.launch()?;
        Ok(s)
    }

    /// Stops the server and saves both databases (the directory and its access log) with
    /// slapcat into `NAME-data.ldif` and `NAME-accesslog.ldif` in its folder, as a backup
    /// would; the server stays stopped.
    pub fn backup(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop();
        for (suffix, file) in [(SUFFIX, "data"), ("cn=accesslog", "accesslog")] {
            let out = Command::new(sbin("slapcat"))
                .args(["-f", "slapd.conf", "-b", suffix, "-l"])
                .arg(format!("{name}-{file}.ldif"))
                .current_dir(self.dir.path())
                .output()
                .context("running slapcat (apt-get install slapd)")?;
            ensure!(
                out.status.success(),
                "slapcat of {suffix}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the server, replaces both databases by the backup `name` and starts it again:
    /// a directory restored from an older backup.
    pub fn restore(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop();
        for (suffix, file) in [(SUFFIX, "data"), ("cn=accesslog", "accesslog")] {
            let db = self.dir.path().join(file);
            std::fs::remove_dir_all(&db).with_context(|| format!("removing {}", db.display()))?;
            std::fs::create_dir_all(&db).with_context(|| format!("creating {}", db.display()))?;
            let ldif = format!("{name}-{file}.ldif");
            slapadd(
                self.dir.path(),
                &["-f", "slapd.conf", "-q", "-b", suffix, "-l", &ldif],
            )
            .with_context(|| format!("restoring {ldif}"))?;
        }
        self.launch()
    }

    /// How many searches under `base` the server received so far (from its operations log,
    /// [`Options::log_operations`]; 0 without it).
    pub fn searches(&self, base: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default();
        let needle = format!("SRCH base=\"{base}\"");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Starts the slapd process (after `start` configured it, or after `stop`) and waits
    /// until it answers; picks new free ports if the ones chosen are taken meanwhile.
    pub fn launch(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "slapd is already running");
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if self.port == 0 {
                self.port = crate::free_port()?;
                if self.tls.is_some() {
                    self.tls_port = Some(crate::free_port()?);
                }
            }
            let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
            if let Some(p) = self.tls_port {
                urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
            }
            let (level, stderr) = if self.log_operations {
                // `-d stats`: one line per operation, so tests can count the searches sent.
                let path = self.dir.path().join("slapd.log");
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                ("stats", Stdio::from(log))
            } else {
                ("0", Stdio::null())
            };
            let mut child = Command::new(sbin("slapd"))
                .args(["-f", "slapd.conf", "-h", &urls, "-d", level])
                .current_dir(self.dir.path())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .context("starting slapd (apt-get install slapd)")?;
            // Ready when our own process listens on the port(s) and the root DSE answers
            // (every slapd started here has the same suffix and credentials: another
            // one on the port must not pass for ours); failed when the process exits.
            loop {
                if child.try_wait().context("waiting for slapd")?.is_some() {
                    break;
                }
                let ours = crate::listens(child.id(), self.port)
                    && self.tls_port.is_none_or(|p| crate::listens(child.id(), p));
                if ours && self.answers() {
                    self.child = Some(child);
                    self.started_once = true;
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("slapd did not answer on {urls} within {START_PATIENCE:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // The port was taken meanwhile (or is still in use after a stop): retry, on
            // new ports unless a client already knows these (a restart).
            ensure!(
                Instant::now() < deadline,
                "slapd did not start on {urls} within {START_PATIENCE:?}"
            );
            if !self.started_once {
                self.port = 0;
                self.tls_port = None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self) -> bool {
        Command::new("ldapsearch")
            .args([
                "-x",
                "-H",
                &self.url(),
                "-b",
                "",
                "-s",
                "base",
                "-o",
                "nettimeout=1",
            ])
            .args(["(objectClass=*)", "namingContexts"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(SUFFIX))
            .unwrap_or(false)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Stops and launches it again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
    }

    /// The ldap:// URL.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// The ldaps:// URL, with TLS.
    pub fn ldaps_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("ldaps://127.0.0.1:{p}/"))
    }

    /// The server's folder (its config, databases and log), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Applies an LDIF change set as the administrator (`ldapmodify`, adds allowed).
    pub fn modify(&self, ldif: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ldapmodify")
            .args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
                "-a",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ldapmodify (apt-get install ldap-utils)")?;
        child
            .stdin
            .take()
            .context("ldapmodify's stdin")?
            .write_all(ldif.as_bytes())
            .context("writing to ldapmodify")?;
        let out = child.wait_with_output().context("waiting for ldapmodify")?;
        ensure!(
            out.status.success(),
            "ldapmodify failed: {}\n{ldif}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Adds a person under ou=people.
    pub fn add_person(&self, uid: &str, cn: &str, mail: &str) -> anyhow::Result<()> {
        self.modify(&format!(
            "dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {cn}\nmail: {mail}\n\n"
        ))
    }

    /// The entryUUID of an entry.
    pub fn entry_uuid(&self, dn: &str) -> anyhow::Result<String> {
        let out = Command::new("ldapsearch")
            .args([
                "-x",
                "-LLL",
                "-H",
                &self.url(),
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
            ])
            .args(["-b", dn, "-s", "base", "(objectClass=*)", "entryUUID"])
            .output()
            .context("running ldapsearch (apt-get install ldap-utils)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("entryUUID: "))
            .map(str::to_owned)
            .with_context(|| format!("no entryUUID for {dn}: {text}"))
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
