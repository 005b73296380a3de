//! `idsync migrate --to URL_OR_PATH`: the configured repository copied into an empty one
//! of the other kind, verified table by table (`idsync_repo::Repo::copy_into_repository`).
//!
//! The agent must not run meanwhile: the command takes the agent lock like `run --once`.
//! The configured repository is only read; the config is left for the operator to point
//! at the new repository once the copy is verified.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use idsync_repo::{PgOptions, Repo};

use crate::cli::MigrateArgs;
use crate::config::Loaded;
use crate::exit::Exit;

/// Runs `idsync migrate`.
pub fn command(loaded: &Loaded, args: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let postgres_target =
        args.to.starts_with("postgres://") || args.to.starts_with("postgresql://");
    if postgres_target == loaded.config.repository.url.is_some() {
        eprintln!(
            "error: --to: the repository is already {}; migrate copies it into one of the \
             other kind (an SQLite file and a PostgreSQL database)",
            if postgres_target {
                "on PostgreSQL"
            } else {
                "an SQLite file"
            }
        );
        return Ok(ExitCode::from(Exit::Config));
    }
    if postgres_target && idsync_repo::redact_url(&args.to) != args.to {
        eprintln!("error: --to: give the password in --to-password-env, not in the URL");
        return Ok(ExitCode::from(Exit::Config));
    }
    let _lock = match crate::lock::AgentLock::acquire(&loaded.repository_path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(Exit::Resource));
        }
    };
    let source = crate::setup::open_repo(loaded)?;
    let (target, shown) = if postgres_target {
        let password = match &args.to_password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("--to-password-env: the variable {var} is not set")
            })?),
            None => None,
        };
        let options = PgOptions {
            password,
            ca_file: args.to_ca_file.clone(),
            connect_timeout: None,
            unresponsive_timeout: None,
        };
        let shown = idsync_repo::redact_url(&args.to);
        let repo = Repo::open_postgres(&args.to, &options)
            .map_err(|e| anyhow::anyhow!("target {shown}: {e}"))?;
        (repo, shown)
    } else {
        let path = PathBuf::from(&args.to);
        if path.exists() {
            eprintln!(
                "error: --to: {} exists; migrate writes a new SQLite file",
                path.display()
            );
            return Ok(ExitCode::from(Exit::Config));
        }
        let repo =
            Repo::open(&path).map_err(|e| anyhow::anyhow!("target {}: {e}", path.display()))?;
        (repo, path.display().to_string())
    };
    let tables = source
        .copy_into_repository(&target)
        .map_err(|e| anyhow::anyhow!("copying {} into {shown}: {e}", loaded.repository_shown()))?;
    let verified = tables.iter().all(idsync_repo::CopiedTable::matches);
    let mut out = crate::printable::stdout();
    if args.json {
        let value = serde_json::json!({
            "source": loaded.repository_shown(),
            "target": shown,
            "verified": verified,
            "tables": tables,
        });
        writeln!(out, "{value}")?;
    } else {
        for t in &tables {
            writeln!(
                out,
                "{:<22} {:>10} rows  {}",
                t.table,
                t.target_rows,
                if t.matches() {
                    "checksum equal".to_owned()
                } else {
                    format!(
                        "DIFFERS: source {} rows {}, target {} rows {}",
                        t.source_rows, t.source_checksum, t.target_rows, t.target_checksum
                    )
                }
            )?;
        }
        if verified {
            writeln!(
                out,
                "copied {} into {shown}: every table verified; point repository: at it to use it",
                loaded.repository_shown()
            )?;
        }
    }
    if verified {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the copy differs from the source (see above); do not use it");
        Ok(ExitCode::from(Exit::Resource))
    }
}
