//! The command line, as clap types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// idsync: identity synchronization. Adapters detect changes, your Rhai rules decide,
/// identities are checked in to the repository and every decision is recorded.
#[derive(Debug, Parser)]
#[command(name = "idsync", version, about, max_term_width = 100)]
pub struct Cli {
    /// The config file.
    #[arg(long, short = 'c', global = true, default_value = "idsync.yaml")]
    pub config: PathBuf,
    /// More log output (-v info, -vv debug); IDSYNC_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config and compile every rule; print every problem as file:line:col.
    Check,
    /// Synchronize: every resource fetches its changes, the rules decide, a batch commits.
    Run(RunArgs),
    /// Identities in the repository.
    #[command(subcommand)]
    Identities(IdentitiesCommand),
    /// Decision records, one per change event (oldest first).
    Results(ResultsArgs),
    /// Failed events: list them, re-run them.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// Benchmarks on generated data (no config needed).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// `run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// One pass of every resource, then exit (non-zero if an event failed).
    #[arg(long)]
    pub once: bool,
    /// Only these resources (repeatable).
    #[arg(long = "resource", short = 'r')]
    pub resources: Vec<String>,
    /// Apply this resource's pass although the accidental-delete guard refuses it: the
    /// operator checked the file (repeatable; for this run only).
    #[arg(long = "accept-deletes", value_name = "RESOURCE")]
    pub accept_deletes: Vec<String>,
}

/// `identities` subcommands.
#[derive(Debug, Subcommand)]
pub enum IdentitiesCommand {
    /// One line per identity: name, state, linked accounts.
    List,
    /// One identity: attributes and linked accounts.
    Show {
        /// Identity name.
        name: String,
    },
    /// JSON lines: one identity per line with its attributes and linked accounts.
    Export,
}

/// `results` options.
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// Only this resource.
    #[arg(long, short = 'r')]
    pub resource: Option<String>,
    /// Only this account key.
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Only this situation (filtered, processed, linked, unlinked, unmatched, disputed, deleted).
    #[arg(long, short = 's')]
    pub situation: Option<String>,
    /// Only this identity.
    #[arg(long, short = 'i')]
    pub identity: Option<String>,
    /// Only failed events.
    #[arg(long)]
    pub failed: bool,
    /// At most the newest N records.
    #[arg(long, short = 'n')]
    pub limit: Option<usize>,
    /// JSON lines with every detail (rules run, candidates, changes).
    #[arg(long)]
    pub json: bool,
}

/// `failed` subcommands.
#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// Failed events and unreadable input, oldest first.
    List {
        /// Only this resource.
        #[arg(long, short = 'r')]
        resource: Option<String>,
        /// JSON lines with the stored event.
        #[arg(long)]
        json: bool,
    },
    /// Re-run failed events with the current rules.
    Retry {
        /// Failed-event ids.
        ids: Vec<i64>,
        /// Every failed event (of `--resource`, if given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: only this resource.
        #[arg(long, short = 'r')]
        resource: Option<String>,
    },
}
