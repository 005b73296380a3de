//! The command line, as clap types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// What `idsync --help` says first: what idsync does for its user.
const ABOUT: &str = "Keeps your identities in step with your HR feeds and directories:\n\
reads their changes, lets your rules decide whose account each one is, and updates,\n\
creates or disables the identity, recording every decision.";

/// The global options, listed once (at the top level) rather than in every command's help.
const GLOBAL_OPTIONS: &str = "\
Global options (before or after the command):
  -c, --config <FILE>        The config file [default: idsync.yaml]
  -v, --verbose...           More log output on stderr (-v info, -vv debug); IDSYNC_LOG overrides
      --log-format <FORMAT>  Log format on stderr: human (default) or json

Start with `idsync check`, then `idsync run --once`; the README has a five-minute tour.";

/// The command line. The global options are hidden from every help screen and described
/// once in [`GLOBAL_OPTIONS`] (clap would repeat `global` options in each subcommand's help).
#[derive(Debug, Parser)]
#[command(
    name = "idsync",
    version,
    about = ABOUT,
    after_help = GLOBAL_OPTIONS,
    override_usage = "idsync [GLOBAL OPTIONS] <COMMAND>",
    max_term_width = 100
)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        short = 'c',
        global = true,
        hide = true,
        default_value = "idsync.yaml"
    )]
    pub config: PathBuf,
    /// More log output (-v info, -vv debug); IDSYNC_LOG overrides.
    #[arg(long, short = 'v', global = true, hide = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, hide = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line (with the resource and key of the event).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, compile every rule and look for what would fail a run: undefined
    /// variables in rules, unreadable secrets, key columns missing from a feed's header.
    Check(CheckArgs),
    /// Synchronize: every resource fetches its changes, the rules decide, a batch commits.
    Run(RunArgs),
    /// Identities in the repository.
    #[command(subcommand)]
    Identities(IdentitiesCommand),
    /// Decision records, one per change event (oldest first); `results purge` removes old ones.
    Results(ResultsArgs),
    /// Failed events: list them, re-run them.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// The notification outbox: list, show, retry, purge.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Per resource: state, last pass, checkpoint age, processed and failed counts; the outbox.
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Dry run of the next pass: every event's planned decision; writes nothing.
    Preview(PreviewArgs),
    /// Decide every account of a resource (or the given keys) again with the current rules
    /// and mappings, against what the resource holds now; recorded as op `reconcile`.
    Reconcile(ReconcileArgs),
    /// The decision records of one account (RESOURCE KEY) or identity, step by step.
    Explain(ExplainArgs),
    /// Work items: what the engine or a rule left to an operator (list, show, resolve).
    #[command(subcommand)]
    WorkItems(WorkItemsCommand),
    /// Link an account to an identity (the resource's mappings apply); recorded as an
    /// operator decision.
    Link(LinkArgs),
    /// Remove an account's link (the identity stays as it is); recorded as an operator
    /// decision.
    Unlink(UnlinkArgs),
    /// Copy the whole repository into an empty one of the other kind (SQLite file to
    /// PostgreSQL database or back), verified by row counts and checksums per table.
    Migrate(MigrateArgs),
    /// Run the rule fixtures (YAML) in <rules_dir>/tests or the given files and folders.
    TestRules {
        /// Fixture files or folders.
        paths: Vec<PathBuf>,
    },
}

/// `migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The target: `postgres://user@host:port/database` (an empty database) or the path of
    /// an SQLite file that does not exist yet.
    #[arg(long, value_name = "URL_OR_PATH")]
    pub to: String,
    /// The environment variable holding the target PostgreSQL's password.
    #[arg(long, value_name = "VAR")]
    pub to_password_env: Option<String>,
    /// A PEM file of the CA of the target PostgreSQL server (TLS, certificate verified).
    #[arg(long, value_name = "FILE")]
    pub to_ca_file: Option<PathBuf>,
    /// One JSON object: every table with its counts and checksums.
    #[arg(long)]
    pub json: bool,
}

/// `check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also bind to every LDAP directory and connect to the SMTP server, and report each.
    #[arg(long)]
    pub connect: bool,
}

/// `preview` options.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Only this resource.
    #[arg(long, short = 'r')]
    pub resource: Option<String>,
    /// JSON lines: the full planned decision records.
    #[arg(long)]
    pub json: bool,
    /// Output format (`--format json` is the older spelling of `--json`).
    #[arg(long, value_enum, default_value_t = PreviewFormat::Table)]
    pub format: PreviewFormat,
    /// List at most N decisions (deletes are always listed; the totals are always whole).
    #[arg(long, short = 'n')]
    pub limit: Option<usize>,
    /// What `idsync reconcile` would do instead of the next pass: every account decided
    /// again, only those whose decision changes something listed.
    #[arg(long)]
    pub reconcile: bool,
    /// With --reconcile: only these accounts (repeatable).
    #[arg(long = "key", short = 'k', value_name = "KEY", requires = "reconcile")]
    pub keys: Vec<String>,
    /// Instead of a pass: the lifecycle timers due within this time from now (`7d`, `12h`),
    /// those already due included.
    #[arg(long, value_name = "WITHIN", conflicts_with = "reconcile")]
    pub timers: Option<String>,
}

/// `reconcile` options.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The resource.
    pub resource: String,
    /// Only these accounts (repeatable; for LDAP also the DN or naming attribute).
    #[arg(long = "key", short = 'k', value_name = "KEY")]
    pub keys: Vec<String>,
    /// Apply the deletes the accidental-delete guard refuses: the operator checked the
    /// source (this run only).
    #[arg(long)]
    pub accept_deletes: bool,
}

/// How `preview` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewFormat {
    /// One line per event.
    Table,
    /// JSON lines: the full planned decision records.
    Json,
}

impl PreviewArgs {
    /// Whether to print JSON lines (`--json`, or `--format json`).
    pub fn json(&self) -> bool {
        self.json || self.format == PreviewFormat::Json
    }
}

/// `explain` options.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Resource of the account.
    #[arg(required_unless_present = "identity")]
    pub resource: Option<String>,
    /// Account key.
    #[arg(required_unless_present = "identity")]
    pub key: Option<String>,
    /// Every decision that acted on this identity instead.
    #[arg(long, short = 'i', conflicts_with_all = ["resource", "key"])]
    pub identity: Option<String>,
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
    List {
        /// JSON lines: name, state and linked accounts of each identity.
        #[arg(long)]
        json: bool,
    },
    /// Identities with their attributes and linked accounts.
    Show {
        /// Identity names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// JSON lines: one identity per line with its attributes and linked accounts.
    Export,
    /// Erase deleted identities: their decision records, the shadows and failed events of
    /// their former accounts, their notifications (an erasure request). Refuses an
    /// identity that still exists.
    Erase {
        /// Names of deleted identities.
        #[arg(required = true)]
        names: Vec<String>,
        /// The request's reference (a ticket number, not the name), kept with the record of
        /// the erasure.
        #[arg(long)]
        reference: Option<String>,
    },
    /// The erasures carried out: when, the reference, what was removed (never whose).
    Erasures {
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// `results` options.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ResultsArgs {
    /// `results purge`.
    #[command(subcommand)]
    pub command: Option<ResultsCommand>,
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
    /// Write the newest matching decision as a rule fixture to FILE (redacting the
    /// config's `redact_attributes`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

/// `results` subcommands.
#[derive(Debug, Subcommand)]
pub enum ResultsCommand {
    /// Remove the decision records recorded before a time, but those an open failed event
    /// still needs; says how many went and how many were kept, and why.
    Purge {
        /// RFC 3339 time (2026-01-31T00:00:00Z), a date (2026-01-31) or an age (90d).
        #[arg(long)]
        before: String,
    },
}

/// `failed` subcommands.
#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// Failed events and unreadable input, oldest first.
    List {
        /// Only this resource.
        #[arg(long, short = 'r')]
        resource: Option<String>,
        /// Only this account (its key; for LDAP also its DN or naming attribute).
        #[arg(long, short = 'k')]
        key: Option<String>,
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
    /// Give up on failed events: they leave the list and the retries, and are kept, with
    /// the reason, in the record of discarded events (`failed discarded`).
    Discard {
        /// Failed-event ids.
        ids: Vec<i64>,
        /// Every failed event of this resource (with --key: of that account).
        #[arg(long, short = 'r', conflicts_with = "ids")]
        resource: Option<String>,
        /// With --resource: only this account (its key; for LDAP also its DN or naming
        /// attribute).
        #[arg(long, short = 'k', requires = "resource")]
        key: Option<String>,
        /// Why (kept with each discarded event).
        #[arg(long)]
        reason: String,
    },
    /// The failed events discarded so far: when, and why.
    Discarded {
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// `outbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Messages, newest first: id, status, attempts, policy, identity, recipients, subject.
    List {
        /// Only this status (pending, sent, dead).
        #[arg(long)]
        status: Option<String>,
        /// Only messages about this identity.
        #[arg(long, short = 'i')]
        identity: Option<String>,
        /// At most N.
        #[arg(long, short = 'n')]
        limit: Option<u64>,
        /// JSON lines with every field.
        #[arg(long)]
        json: bool,
    },
    /// Messages with their text and HTML parts and their last error.
    Show {
        /// Outbox ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Make undelivered messages due now (fresh maximum age).
    Retry {
        /// Outbox ids.
        ids: Vec<i64>,
        /// Every dead-lettered message.
        #[arg(long, conflicts_with = "ids")]
        dead: bool,
    },
    /// Delete sent messages delivered before a time (never undelivered ones).
    Purge {
        /// RFC 3339 time (2026-01-31T00:00:00Z), a date (2026-01-31) or an age (30d).
        #[arg(long)]
        sent_before: String,
    },
}

/// `work-items` subcommands.
#[derive(Debug, Subcommand)]
pub enum WorkItemsCommand {
    /// Work items, oldest first: id, state, kind, account, candidates, reason.
    List {
        /// Only items in this state: open (default), closed or all.
        #[arg(long, value_enum, default_value_t = WorkItemStateArg::Open)]
        state: WorkItemStateArg,
        /// Only this resource.
        #[arg(long, short = 'r')]
        resource: Option<String>,
        /// JSON lines with every field.
        #[arg(long)]
        json: bool,
    },
    /// One work item: the account as last seen, the candidates, the reason, the history.
    Show {
        /// Work-item id.
        id: i64,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Settle a work item: link the account, create an identity for it, or ignore it.
    #[command(group(clap::ArgGroup::new("decision").required(true).args(["link", "create", "ignore"])))]
    Resolve {
        /// Work-item id.
        id: i64,
        /// Link the account to this identity (the resource's mappings apply).
        #[arg(long, value_name = "IDENTITY")]
        link: Option<String>,
        /// Create an identity for the account (the resource's naming and mappings).
        #[arg(long)]
        create: bool,
        /// Close the item without changing anything.
        #[arg(long)]
        ignore: bool,
        /// Why (kept in the decision record and the closed item).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `work-items list --state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkItemStateArg {
    /// Waiting for an operator.
    Open,
    /// Settled.
    Closed,
    /// Both.
    All,
}

/// `link` options.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The account's resource.
    pub resource: String,
    /// The account key (for LDAP also its DN or naming attribute).
    pub key: String,
    /// The identity to link it to.
    pub identity: String,
    /// Why (kept in the decision record).
    #[arg(long)]
    pub reason: Option<String>,
}

/// `unlink` options.
#[derive(Debug, Args)]
pub struct UnlinkArgs {
    /// The account's resource.
    pub resource: String,
    /// The account key (for LDAP also its DN or naming attribute).
    pub key: String,
    /// Why (kept in the decision record).
    #[arg(long)]
    pub reason: Option<String>,
}

impl Command {
    /// Whether the command only reads or discards what the repository recorded (`results`,
    /// `explain`, `failed list|discard`, `work-items list`): it may name a resource the
    /// config no longer has, as long as the repository holds records of it.
    pub fn reads_records_only(&self) -> bool {
        matches!(
            self,
            Command::Results(_)
                | Command::Explain(_)
                | Command::Failed(FailedCommand::List { .. })
                | Command::Failed(FailedCommand::Discard { .. })
                | Command::WorkItems(WorkItemsCommand::List { .. })
        )
    }

    /// Every resource named on the command line, with the option or argument that named
    /// it (`--resource`, `--accept-deletes`, `RESOURCE`): each must be configured, or for a
    /// command that [reads records only](Command::reads_records_only) known to the
    /// repository (`commands::check_resources`). A command that takes a resource lists it
    /// here.
    pub fn named_resources(&self) -> Vec<(&'static str, &str)> {
        match self {
            Command::Run(a) => a
                .resources
                .iter()
                .map(|r| ("--resource", r.as_str()))
                .chain(
                    a.accept_deletes
                        .iter()
                        .map(|r| ("--accept-deletes", r.as_str())),
                )
                .collect(),
            Command::Results(ResultsArgs { resource, .. })
            | Command::Preview(PreviewArgs { resource, .. })
            | Command::Failed(FailedCommand::List { resource, .. })
            | Command::Failed(FailedCommand::Retry { resource, .. })
            | Command::Failed(FailedCommand::Discard { resource, .. }) => resource
                .iter()
                .map(|r| ("--resource", r.as_str()))
                .collect(),
            Command::Explain(a) => a
                .resource
                .iter()
                .map(|r| ("RESOURCE", r.as_str()))
                .collect(),
            Command::Reconcile(a) => vec![("RESOURCE", a.resource.as_str())],
            Command::Link(a) => vec![("RESOURCE", a.resource.as_str())],
            Command::Unlink(a) => vec![("RESOURCE", a.resource.as_str())],
            Command::WorkItems(WorkItemsCommand::List { resource, .. }) => resource
                .iter()
                .map(|r| ("--resource", r.as_str()))
                .collect(),
            Command::WorkItems(WorkItemsCommand::Show { .. })
            | Command::WorkItems(WorkItemsCommand::Resolve { .. }) => Vec::new(),
            Command::Failed(FailedCommand::Discarded { .. })
            | Command::Migrate(_)
            | Command::Check(_)
            | Command::Identities(_)
            | Command::Outbox(_)
            | Command::Status { .. }
            | Command::TestRules { .. } => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::CommandFactory;

    use super::*;

    /// Every short flag of every command, with the long option it stands for there.
    fn short_flags(cmd: &clap::Command, path: &str, found: &mut BTreeMap<char, Vec<String>>) {
        for arg in cmd.get_arguments() {
            if let (Some(short), Some(long)) = (arg.get_short(), arg.get_long()) {
                found
                    .entry(short)
                    .or_default()
                    .push(format!("{path}: --{long}"));
            }
        }
        for sub in cmd.get_subcommands() {
            short_flags(sub, &format!("{path} {}", sub.get_name()), found);
        }
    }

    #[test]
    fn a_short_flag_means_one_thing_everywhere() {
        let mut found = BTreeMap::new();
        short_flags(&Cli::command(), "idsync", &mut found);
        for (short, uses) in &found {
            let longs: std::collections::BTreeSet<&str> = uses
                .iter()
                .filter_map(|u| u.rsplit_once(": ").map(|(_, l)| l))
                .collect();
            assert_eq!(longs.len(), 1, "-{short} means several things: {uses:?}");
        }
    }

    #[test]
    fn the_short_flags_are_the_documented_ones() {
        let doc = include_str!("../../../docs/operations.md");
        let mut found = BTreeMap::new();
        short_flags(&Cli::command(), "idsync", &mut found);
        for (short, uses) in &found {
            let long = uses[0].rsplit_once(": --").map(|(_, l)| l).unwrap_or("");
            assert!(
                doc.contains(&format!("| `-{short}` | `{long}` |")),
                "docs/operations.md, Command-line conventions: no row for -{short} ({long})"
            );
        }
    }
}
