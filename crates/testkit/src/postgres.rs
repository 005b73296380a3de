//! A private PostgreSQL server: a cluster made with `initdb` in a temporary folder (trust
//! authentication for one superuser, UTF-8, C locale), started with `pg_ctl` on a free
//! loopback port with its Unix socket in that folder, stopped (`pg_ctl stop -m fast`) and
//! removed on drop. Debian's server programs live in `/usr/lib/postgresql/<version>/bin`
//! (package `postgresql`), not on PATH; the newest version there is used.
//!
//! PostgreSQL refuses to run as root: when the tests run as root (CI does), the cluster's
//! folder is given to the `postgres` system user (the package creates it) and the server
//! programs run as that user through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

/// The superuser the tests connect as (trust authentication on loopback only).
pub const SUPERUSER: &str = "idsync";

/// The newest installed server's program folder (`/usr/lib/postgresql/<version>/bin`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("reading {} (apt-get install postgresql)", root.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server under {} (apt-get install postgresql)",
            root.display()
        ),
    }
}

/// Whether this process runs as root (PostgreSQL's programs must then run as another user).
fn running_as_root() -> bool {
    // The real and effective ids of this process, as `id -u` prints them.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_root: bool,
    /// Its loopback TCP port.
    pub port: u16,
}

impl Postgres {
    /// Makes a cluster and starts it; returns once it accepts connections.
    pub fn start() -> anyhow::Result<Postgres> {
        Self::start_with(false)
    }

    /// Like [`Postgres::start`], with TLS on (`ssl=on`): a throw-away CA and a server
    /// certificate for 127.0.0.1, in `tls/` of the cluster's folder ([`Postgres::ca`]).
    /// TCP connections must use TLS (`hostssl` in pg_hba.conf).
    pub fn start_tls() -> anyhow::Result<Postgres> {
        Self::start_with(true)
    }

    /// The CA certificate of a server started with [`Postgres::start_tls`].
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("tls").join("ca.pem")
    }

    fn start_with(tls: bool) -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("idsync-postgres-")
            .tempdir()
            .context("creating the PostgreSQL folder")?;
        let as_root = running_as_root();
        let pg = Postgres {
            dir,
            bin,
            as_root,
            port: crate::free_port()?,
        };
        let tls_options = if tls {
            let dir = pg.dir.path().join("tls");
            std::fs::create_dir_all(&dir).context("creating the TLS folder")?;
            let generated = crate::slapd::Tls::generate(&dir)?;
            // The server refuses a key others can read.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&generated.key, std::fs::Permissions::from_mode(0o600))
                .context("making the server key owner-only")?;
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                generated.cert.display(),
                generated.key.display()
            )
        } else {
            String::new()
        };
        if as_root {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .output()
                .context("giving the cluster's folder to the postgres user")?;
            ensure!(
                out.status.success(),
                "chown postgres: {} (is the postgresql package installed?)",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        if tls {
            // TCP connections only over TLS (`hostssl`), so a plain one is refused.
            let hba = pg.data().join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).context("reading pg_hba.conf")?;
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).context("writing pg_hba.conf")?;
        }
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}{tls_options}",
            pg.port,
            pg.dir.path().display()
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-l",
                &pg.dir.path().join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| format!("server log:\n{}", pg.log()))?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs server program `name` with `args` (as the `postgres` user when we are root).
    fn run(&self, name: &str, args: &[&str]) -> anyhow::Result<String> {
        let program = self.bin.join(name);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        crate::run_tool(
            cmd.args(args),
            self.dir.path(),
            name,
            "apt-get install postgresql",
        )
    }

    /// Stops the server (fast: every session ended) and starts it again on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        let data = self.data().display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        // With its log file named again: the server must not inherit our output pipes.
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart",
            ],
        )
        .with_context(|| format!("server log:\n{}", self.log()))
        .map(|_| ())
    }

    /// A connection URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` in database `db` with `psql` over TCP (unaligned, tuples only, stop at the
    /// first error); its output, trimmed.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(db),
                "-c",
                sql,
            ],
        )?;
        Ok(out.trim().to_owned())
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .map(|_| ())
    }
}

/// The environment variable that makes the engine's and the repository's unit tests run
/// against a private PostgreSQL server instead of an in-memory SQLite repository
/// (`IDSYNC_TEST_REPOSITORY=postgres`; scripts/test.sh runs them both ways).
pub const REPOSITORY_ENV: &str = "IDSYNC_TEST_REPOSITORY";

/// Whether the unit tests of this run use PostgreSQL ([`REPOSITORY_ENV`]).
pub fn tests_use_postgres() -> bool {
    std::env::var(REPOSITORY_ENV).is_ok_and(|v| v == "postgres")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_private_server_starts_answers_on_its_port_and_stops() {
        let pg = Postgres::start().unwrap();
        pg.create_database("probe").unwrap();
        assert_eq!(pg.psql("probe", "SELECT 40 + 2").unwrap(), "42");
        let listen = pg.psql("probe", "SHOW listen_addresses").unwrap();
        assert_eq!(listen, "127.0.0.1");
        let port = pg.port;
        let data = pg.data();
        drop(pg);
        assert!(!data.exists(), "the cluster's folder is removed");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server stopped"
        );
    }
}
