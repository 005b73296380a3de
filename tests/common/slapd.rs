//! A private OpenLDAP server for the LDAP tests: generated `slapd.conf` (mdb, syncprov with its
//! session log on an accesslog database, the accesslog overlay, a non-admin sync account with
//! `limits` and ACLs, optional TLS with a throw-away CA), loaded offline with `slapadd`, run in
//! the foreground as a child of the test (`-d 0`) on free loopback ports, stopped with SIGTERM
//! and waited for. Readiness and changes go through `ldapsearch`/`ldapmodify` (ldap-utils).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SUFFIX: &str = "dc=example,dc=com";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PW: &str = "admin-secret";
pub const SYNC_DN: &str = "cn=sync,dc=example,dc=com";
pub const SYNC_PW: &str = "sync-secret";
pub const PEOPLE: &str = "ou=people,dc=example,dc=com";

/// An OpenLDAP server program, from PATH or Debian's /usr/sbin.
fn sbin(name: &str) -> String {
    let p = Path::new("/usr/sbin").join(name);
    if p.is_file() {
        p.display().to_string()
    } else {
        name.to_owned()
    }
}

/// A loopback port of this test process's own block (see `common::free_port`).
pub fn free_port() -> u16 {
    crate::common::free_port()
}

/// A generated CA and server certificate (openssl), for ldaps and StartTLS.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
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
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
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
        );
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
        );
        Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// A running (or stopped) private slapd.
pub struct Slapd {
    dir: tempfile::TempDir,
    pub port: u16,
    pub tls_port: Option<u16>,
    pub tls: Option<Tls>,
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

impl Slapd {
    /// Starts a server with the base entries.
    pub fn start() -> Slapd {
        Self::start_with(false, false)
    }

    /// Stops the server and saves both databases (the directory and its access log) with
    /// slapcat, as a backup would; the server stays stopped.
    pub fn backup(&mut self, name: &str) {
        self.stop();
        for (suffix, file) in [(SUFFIX, "data"), ("cn=accesslog", "accesslog")] {
            let out = Command::new(sbin("slapcat"))
                .args(["-f", "slapd.conf", "-b", suffix, "-l"])
                .arg(format!("{name}-{file}.ldif"))
                .current_dir(self.dir.path())
                .output()
                .expect("slapcat");
            assert!(
                out.status.success(),
                "slapcat: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Stops the server, replaces both databases by the backup `name` and starts it again:
    /// a directory restored from an older backup.
    pub fn restore(&mut self, name: &str) {
        self.stop();
        for (suffix, file) in [(SUFFIX, "data"), ("cn=accesslog", "accesslog")] {
            let db = self.dir.path().join(file);
            std::fs::remove_dir_all(&db).unwrap();
            std::fs::create_dir_all(&db).unwrap();
            let out = Command::new(sbin("slapadd"))
                .args(["-f", "slapd.conf", "-q", "-b", suffix, "-l"])
                .arg(format!("{name}-{file}.ldif"))
                .current_dir(self.dir.path())
                .output()
                .expect("slapadd");
            assert!(
                out.status.success(),
                "slapadd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.launch();
    }

    /// How many searches under `base` the server received so far (from its stats log).
    pub fn searches(&self, base: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default();
        let needle = format!("SRCH base=\"{base}\"");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Starts a server that also listens on ldaps:// and offers StartTLS.
    pub fn start_tls() -> Slapd {
        Self::start_with(true, false)
    }

    /// Starts a server whose syncprov honours the reload hint (`syncprov-reloadhint`):
    /// a consumer whose cookie its logs cannot serve is told e-syncRefreshRequired
    /// instead of being sent a present phase.
    pub fn start_reload_hint() -> Slapd {
        Self::start_with(false, true)
    }

    fn start_with(tls: bool, reload_hint: bool) -> Slapd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::create_dir_all(d.join("accesslog")).unwrap();
        let tls = tls.then(|| Tls::generate(d));
        let tls_lines = match &tls {
            Some(t) => format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ),
            None => String::new(),
        };
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
maxsize 1073741824
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
maxsize 4294967296
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
            hint = if reload_hint {
                "syncprov-reloadhint TRUE\n"
            } else {
                ""
            },
        );
        std::fs::write(d.join("slapd.conf"), conf).unwrap();
        std::fs::write(d.join("base.ldif"), BASE_LDIF).unwrap();
        let out = Command::new(sbin("slapadd"))
            .args(["-f", "slapd.conf", "-b", SUFFIX, "-l", "base.ldif"])
            .current_dir(d)
            .output()
            .expect("slapadd (apt-get install slapd)");
        assert!(
            out.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Slapd {
            port: 0,
            tls_port: None,
            tls,
            dir,
            child: None,
            started_once: false,
        };
        s.launch();
        s
    }

    /// Starts the slapd process (after `start` picked the ports, or after `stop`).
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.port == 0 {
                self.port = free_port();
                if self.tls.is_some() {
                    self.tls_port = Some(free_port());
                }
            }
            let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
            if let Some(p) = self.tls_port {
                urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
            }
            // `-d stats`: one line per operation, so tests can count the searches sent.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("slapd.log"))
                .unwrap();
            let mut child = Command::new(sbin("slapd"))
                .args(["-f", "slapd.conf", "-h", &urls, "-d", "stats"])
                .current_dir(self.dir.path())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("slapd");
            // Ready when our own process listens on the port(s) and the root DSE answers
            // (every test slapd has the same suffix and credentials: another test's server
            // on the port must not pass for ours); failed when the process exits.
            loop {
                if let Some(_status) = child.try_wait().unwrap() {
                    break;
                }
                let ours = crate::common::listens(child.id(), self.port)
                    && self
                        .tls_port
                        .is_none_or(|p| crate::common::listens(child.id(), p));
                if ours && self.answers() {
                    self.child = Some(child);
                    self.started_once = true;
                    return;
                }
                assert!(Instant::now() < deadline, "slapd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            // The port was taken meanwhile (or is still in use after a stop): retry, on
            // new ports unless a client already knows these (a restart).
            assert!(Instant::now() < deadline, "slapd did not start");
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

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    pub fn ldaps_url(&self) -> String {
        format!(
            "ldaps://127.0.0.1:{}/",
            self.tls_port.expect("a TLS server")
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Applies an LDIF change set as the administrator (`ldapmodify`, adds allowed).
    pub fn modify(&self, ldif: &str) {
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
            .expect("ldapmodify (apt-get install ldap-utils)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ldif.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ldapmodify failed: {}\n{ldif}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds a person under ou=people.
    pub fn add_person(&self, uid: &str, cn: &str, mail: &str) {
        self.modify(&format!(
            "dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {cn}\nmail: {mail}\n\n"
        ));
    }

    /// The entryUUID of an entry.
    pub fn entry_uuid(&self, dn: &str) -> String {
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
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("entryUUID: "))
            .unwrap_or_else(|| panic!("no entryUUID for {dn}: {text}"))
            .to_owned()
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
