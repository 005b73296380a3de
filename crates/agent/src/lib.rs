//! The `idsync` command line: config loading and validation, wiring of adapters, rules,
//! engine and repository, and the commands.
//!
//! Key design choice: only this crate knows every adapter and reads the config; the
//! library crates below it take already-validated values, so a bad config is reported
//! completely (`idsync check`) before any repository file is created.

pub mod accounts;
pub mod authoring;
pub mod authority;
pub mod cli;
pub mod commands;
pub mod config;
pub mod correlation;
pub mod erase;
pub mod exit;
pub mod explain;
pub mod fixtures;
pub mod inflight;
pub mod leases;
pub mod lock;
pub mod migrate;
pub mod observe;
pub mod outbox;
pub mod preflight;
pub mod printable;
pub mod reconcile;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod service;
pub mod setup;
pub mod status;
pub mod timers;
pub mod when;
pub mod work_items;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use exit::Exit;

/// How long a command waits for another process's write (the agent's batch in progress).
const COMMAND_WRITE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs the command line; returns the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent = matches!(&cli.command, Command::Run(args) if !args.once);
    init_logging(cli.verbose, cli.log_format, agent);
    let loaded = match commands::load(&cli.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(code) = commands::check_resources(&loaded, &cli.command) {
        return code;
    }
    if !matches!(cli.command, Command::Run(_)) {
        // A command that writes while the agent commits a large batch waits for it, and
        // says so, instead of failing after the agent's own five seconds.
        idsync_repo::wait_for_other_writers(COMMAND_WRITE_PATIENCE, |patience| {
            eprintln!(
                "idsync: the repository is busy (an agent is committing a batch); waiting for it, up to {}",
                humantime::format_duration(patience)
            );
        });
    }
    if matches!(cli.command, Command::Run(_)) {
        inflight::crash_on_panic();
    }
    let result = match &cli.command {
        Command::Check(args) => Ok(commands::check(loaded, args)),
        Command::Run(args) => Ok(commands::run(loaded, args)),
        Command::Identities(cmd) => commands::identities(loaded, cmd),
        Command::Results(args) => commands::results(loaded, args),
        Command::Failed(cmd) => commands::failed(loaded, cmd),
        Command::Preview(args) => commands::preview(loaded, args),
        Command::Reconcile(args) => reconcile::command(loaded, args),
        Command::Explain(args) => authoring::explain(&loaded, args),
        Command::TestRules { paths } => fixtures::test_rules(&loaded, paths),
        Command::Outbox(cmd) => outbox::command(loaded, cmd),
        Command::Status { json } => status::command(&loaded, *json),
        Command::WorkItems(cmd) => work_items::command(loaded, cmd),
        Command::Link(args) => work_items::link(loaded, args),
        Command::Unlink(args) => work_items::unlink(loaded, args),
        Command::Migrate(args) => migrate::command(&loaded, args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(Exit::Resource)
        }
    }
}

/// Logging on stderr: warnings and errors by default (the agent also its start-up line and
/// progress: info), `-v` info, `-vv` debug, or `IDSYNC_LOG`; colours only on a terminal.
fn init_logging(verbose: u8, format: cli::LogFormat, agent: bool) {
    use std::io::IsTerminal;
    let default = match (verbose, agent) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("IDSYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        cli::LogFormat::Human => builder.init(),
        cli::LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}
