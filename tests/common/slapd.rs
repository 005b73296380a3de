//! A private OpenLDAP server for the LDAP tests: idsync-testkit's [`Slapd`](kit::Slapd) (the
//! one `idsync-bench ldap` starts too) with its operations log on, so tests can count the
//! searches sent, and every failure to start, change or read it a test failure. See
//! crates/testkit/src/slapd.rs for the server's configuration.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use idsync_testkit::slapd as kit;
pub use kit::{ADMIN_DN, ADMIN_PW, PEOPLE, SUFFIX, SYNC_DN, SYNC_PW};

/// A free loopback TCP port (bound and released; checked free again before use).
pub fn free_port() -> u16 {
    idsync_testkit::free_port().unwrap()
}

/// A generated CA and server certificate (openssl), for ldaps, StartTLS and SMTP over TLS.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        let kit::Tls { ca, cert, key } = kit::Tls::generate(dir).unwrap();
        Tls { ca, cert, key }
    }
}

/// A running (or stopped) private slapd; its fields (`port`, `tls_port`, `tls`) and
/// infallible methods are idsync-testkit's.
pub struct Slapd(kit::Slapd);

impl Deref for Slapd {
    type Target = kit::Slapd;
    fn deref(&self) -> &kit::Slapd {
        &self.0
    }
}

impl DerefMut for Slapd {
    fn deref_mut(&mut self) -> &mut kit::Slapd {
        &mut self.0
    }
}

impl Slapd {
    fn start_with(tls: bool, reload_hint: bool) -> Slapd {
        Slapd(
            kit::Slapd::start(&kit::Options {
                tls,
                reload_hint,
                log_operations: true,
                entries: None,
            })
            .unwrap(),
        )
    }

    /// Starts a server with the base entries and `n` people `uid=p0` … under [`PEOPLE`],
    /// bulk-loaded offline (`slapadd -q`) in that order.
    pub fn start_with_people(n: usize) -> Slapd {
        let dir = tempfile::tempdir().unwrap();
        let ldif = dir.path().join("people.ldif");
        let mut text = String::with_capacity(n * 160);
        for i in 0..n {
            text.push_str(&format!(
                "dn: uid=p{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: p{i}\ncn: P {i}\nsn: {i}\nmail: p{i}@example.com\ntitle: Engineer\n\n"
            ));
        }
        std::fs::write(&ldif, text).unwrap();
        Slapd(
            kit::Slapd::start(&kit::Options {
                log_operations: true,
                entries: Some(&ldif),
                ..kit::Options::default()
            })
            .unwrap(),
        )
    }

    /// Starts a server with the base entries.
    pub fn start() -> Slapd {
        Self::start_with(false, false)
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

    /// Stops the server and saves both databases (the directory and its access log) with
    /// slapcat, as a backup would; the server stays stopped.
    pub fn backup(&mut self, name: &str) {
        self.0.backup(name).unwrap();
    }

    /// Stops the server, replaces both databases by the backup `name` and starts it again:
    /// a directory restored from an older backup.
    pub fn restore(&mut self, name: &str) {
        self.0.restore(name).unwrap();
    }

    /// Starts the slapd process (after `start` picked the ports, or after `stop`).
    pub fn launch(&mut self) {
        self.0.launch().unwrap();
    }

    pub fn restart(&mut self) {
        self.0.restart().unwrap();
    }

    pub fn ldaps_url(&self) -> String {
        self.0.ldaps_url().expect("a TLS server")
    }

    /// Applies an LDIF change set as the administrator (`ldapmodify`, adds allowed).
    pub fn modify(&self, ldif: &str) {
        self.0.modify(ldif).unwrap();
    }

    /// Adds a person under ou=people.
    pub fn add_person(&self, uid: &str, cn: &str, mail: &str) {
        self.0.add_person(uid, cn, mail).unwrap();
    }

    /// The entryUUID of an entry.
    pub fn entry_uuid(&self, dn: &str) -> String {
        self.0.entry_uuid(dn).unwrap()
    }
}
