//! The harness the end-to-end tests (`tests/common`) and the benchmarks (`idsync-bench`)
//! share: the servers they run idsync against, started privately on free loopback ports
//! and stopped when dropped.
//!
//! - [`slapd`]: a private OpenLDAP server (generated `slapd.conf`, offline `slapadd`,
//!   foreground child), optionally with TLS and bulk-loaded entries;
//! - [`smtp`]: a real SMTP server (Debian's python3-aiosmtpd) that keeps what it receives,
//!   and a minimal in-process SMTP sink that only counts;
//! - [`postgres`]: a private PostgreSQL server (`initdb`, `pg_ctl`), for the repository on
//!   PostgreSQL.
//!
//! Not part of the product: only the root package's tests and the bench crate use it.
//! Every launcher returns errors with their context instead of panicking, so the bench
//! binary can report them; `tests/common` turns them into test failures.

pub mod postgres;
pub mod slapd;
pub mod smtp;

/// Runs `cmd` in `dir` to its end (the servers' offline tools: openssl, slapadd, initdb,
/// pg_ctl, psql): its standard output, or an error naming `what` with what it printed.
/// `setup` says how to get the program when it cannot be started.
pub(crate) fn run_tool(
    cmd: &mut std::process::Command,
    dir: &std::path::Path,
    what: &str,
    setup: &str,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let out = cmd
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {what} ({setup})"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ports handed out by [`free_port`] in this process so far.
static PORTS_TAKEN: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A loopback port for a server started on the command line (slapd, aiosmtpd) or named in
/// a config before the server runs. The kernel's "any free port" (bind to port 0, release)
/// can hand the same port to two tests running at once, and to the next client socket; so
/// each process takes ports from a block of its own, derived from its process id (nextest
/// runs every test in a process of its own), below the kernel's ephemeral range
/// (32768–60999) so no client socket takes them either, skipping any in use right now. A
/// server that still fails to bind says so (slapd retries on another port).
pub fn free_port() -> anyhow::Result<u16> {
    const FIRST: u32 = 10_000;
    const BLOCK: u32 = 24;
    const BLOCKS: u32 = (32_000 - FIRST) / BLOCK;
    let base = FIRST + (std::process::id() % BLOCKS) * BLOCK;
    loop {
        let n = PORTS_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        anyhow::ensure!(
            u32::from(n) < BLOCK,
            "this process used up its {BLOCK} loopback ports"
        );
        let port = u16::try_from(base + u32::from(n))?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (or on every
/// address): `/proc/net/tcp` names the listening socket's inode, `/proc/PID/fd` the
/// process's sockets. Tells a server we started from another that has the port.
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

/// Polls `f` every `every` until it returns `Some`, or fails after `secs` seconds naming
/// `what`.
pub fn poll<T>(
    secs: u64,
    every: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(every);
    }
}
