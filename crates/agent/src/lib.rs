//! The `idsync` command line: config loading and validation, wiring of adapters, rules,
//! engine and repository, and the commands.
//!
//! Key design choice: only this crate knows every adapter and reads the config; the
//! library crates below it take already-validated values, so a bad config is reported
//! completely (`idsync check`) before any repository file is created.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod setup;
pub mod watching;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};

/// Runs the command line; returns the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Command::Bench(cmd) = &cli.command {
        return bench::run(cmd);
    }
    let loaded = match commands::load(&cli.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let result = match &cli.command {
        Command::Check => Ok(commands::check(loaded)),
        Command::Run(args) => Ok(commands::run(loaded, args)),
        Command::Identities(cmd) => commands::identities(loaded, cmd),
        Command::Results(args) => commands::results(loaded, args),
        Command::Failed(cmd) => commands::failed(loaded, cmd),
        Command::Bench(cmd) => Ok(bench::run(cmd)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(commands::EXIT_RESOURCE)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("IDSYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
