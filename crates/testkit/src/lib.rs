//! The harness the end-to-end tests (`tests/common`) and the benchmarks (`idsync-bench`)
//! share: the servers they run idsync against, started privately on free loopback ports
//! and stopped when dropped.
//!
//! - [`slapd`]: a private OpenLDAP server (generated `slapd.conf`, offline `slapadd`,
//!   foreground child), optionally with TLS and bulk-loaded entries;
//! - [`smtp`]: a real SMTP server (Debian's python3-aiosmtpd) that keeps what it receives,
//!   and a minimal in-process SMTP sink that only counts.
//!
//! Not part of the product: only the root package's tests and the bench crate use it.
//! Every launcher returns errors with their context instead of panicking, so the bench
//! binary can report them; `tests/common` turns them into test failures.

pub mod slapd;
pub mod smtp;

/// A TCP port free right now on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    use anyhow::Context as _;
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(listener
        .local_addr()
        .context("reading a bound port")?
        .port())
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
