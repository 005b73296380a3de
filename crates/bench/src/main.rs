//! `idsync-bench`: idsync's benchmarks, outside the product crates. Each one starts what it
//! measures against (a generated feed, a private slapd, an SMTP sink) and needs no config:
//!
//! - `idsync-bench flatfile --rows N` (`flatfile.rs`): floor, initial load, incremental
//!   passes, peak RSS and records floor of the flat-file pipeline;
//! - `idsync-bench ldap --entries N` (`ldap.rs`): raw paged search, full sync and its records
//!   floor, modify → committed latency in persist mode;
//! - `idsync-bench outbox --messages N` (`outbox.rs`): the outbox drained over SMTP;
//! - `idsync-bench statements --rows N` (`statements.rs`): what a statement costs on
//!   PostgreSQL, one at a time, pipelined and set-wise.
//!
//! `records.rs` is the records floor both pipeline benchmarks report. The figures and how to
//! read them are in docs/benchmarks.md; `tests/bench.rs` runs each benchmark on small inputs.
//! Like the product binary, it uses mimalloc, so its figures are the product's.

/// Prints one line of results on stdout through the product's `printable::line`: control
/// characters escaped, and a closed stdout (`idsync-bench ldap | head -3`) silences the rest
/// of the output instead of panicking, so the bench still stops what it started.
macro_rules! say {
    ($($arg:tt)*) => {
        idsync_agent::printable::line(format_args!($($arg)*))
    };
}

mod flatfile;
mod ldap;
mod memory;
mod outbox;
mod records;
mod statements;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "idsync-bench",
    version,
    about = "idsync's benchmarks: each starts what it measures against and needs no config \
             (figures in docs/benchmarks.md).",
    max_term_width = 100
)]
struct Cli {
    /// The benchmark.
    #[command(subcommand)]
    bench: Bench,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
enum Bench {
    /// Generate a CSV feed and measure floor, initial load, incremental passes and peak RSS.
    Flatfile(flatfile::FlatfileArgs),
    /// Against a private slapd it starts: raw paged search (floor), full sync into a
    /// repository, modify→committed latency in persist mode.
    Ldap(ldap::LdapArgs),
    /// Enqueue N messages into a scratch repository and drain them through SMTP.
    Outbox(outbox::OutboxArgs),
    /// What a statement costs on a private PostgreSQL: one at a time, pipelined, set-wise.
    Statements(statements::StatementsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings and errors on stderr, as the product binary logs them; IDSYNC_LOG overrides.
    let filter = EnvFilter::try_from_env("IDSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match &cli.bench {
        Bench::Flatfile(args) => flatfile::run(args),
        Bench::Ldap(args) => ldap::run(args),
        Bench::Outbox(args) => outbox::run(args),
        Bench::Statements(args) => statements::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
