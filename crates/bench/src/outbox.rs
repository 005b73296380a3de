//! `idsync-bench outbox --messages N`: the outbox drain. It enqueues N rendered messages into
//! a scratch repository (one transaction per 5,000), then times one dispatch round draining
//! them over SMTP to a minimal sink it starts on loopback (idsync-testkit's [`Sink`]: it
//! accepts and counts, so the figure is the dispatcher's and the repository's, not a mail
//! server's), or to another sink (postfix's `smtp-sink`) with `--smtp HOST:PORT`. It fails
//! unless every message ends `sent`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Args;
use idsync_notify::config::TlsMode;
use idsync_notify::dispatch::{DispatchSettings, Dispatcher, Transport};
use idsync_notify::smtp::SmtpSettings;
use idsync_repo::{NewOutboxMessage, RenderedMail, Repo};
use idsync_testkit::smtp::Sink;
use lettre::transport::smtp::extension::ClientId;

/// `idsync-bench outbox` options.
#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// Messages.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// SMTP sink HOST:PORT (default: a built-in sink on loopback).
    #[arg(long)]
    pub smtp: Option<SocketAddr>,
    /// SMTP connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Messages claimed at a time.
    #[arg(long, default_value_t = 512)]
    pub batch: u64,
}

/// Runs `idsync-bench outbox`.
pub fn run(args: &OutboxArgs) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("idsync-bench-")
        .tempdir()
        .context("creating a scratch folder")?;
    let r = bench_outbox(
        &scratch.path().join("bench.db"),
        args.messages,
        args.smtp,
        args.connections,
        args.batch,
    )?;
    let rate = r.messages as f64 / r.drain.as_secs_f64().max(1e-9);
    say!(
        "bench outbox: {} messages to {} over {} connection(s): enqueue {:.2}s, drain {:.2}s = {:.0} msg/s{}",
        r.messages,
        r.target,
        r.connections,
        r.enqueue.as_secs_f64(),
        r.drain.as_secs_f64(),
        rate,
        r.accepted
            .map(|n| format!(" (sink accepted {n})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// What the benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Messages enqueued and drained.
    pub messages: u64,
    /// Time to enqueue them (one transaction per 5,000).
    pub enqueue: Duration,
    /// Time to drain the outbox (claim, send, record).
    pub drain: Duration,
    /// Messages the sink counted (built-in sink only).
    pub accepted: Option<u64>,
    /// Connections used.
    pub connections: usize,
    /// Where they went.
    pub target: SocketAddr,
}

/// Enqueues `messages` into a fresh repository at `repo_path`, then drains it through SMTP
/// to `target` (or a built-in sink) with `connections` connections.
pub fn bench_outbox(
    repo_path: &Path,
    messages: u64,
    target: Option<SocketAddr>,
    connections: usize,
    batch: u64,
) -> anyhow::Result<BenchReport> {
    let (target, sink) = match target {
        Some(t) => (t, None),
        None => {
            let s = Sink::start()?;
            (s.addr, Some(s))
        }
    };
    let repo = Arc::new(
        Repo::open(repo_path).with_context(|| format!("opening {}", repo_path.display()))?,
    );
    let t0 = Instant::now();
    let mut left = messages;
    let mut n = 0u64;
    while left > 0 {
        let chunk = left.min(5_000);
        repo.begin().context("enqueueing")?;
        for _ in 0..chunk {
            n += 1;
            repo.outbox_insert(&NewOutboxMessage {
                policy: "bench".into(),
                identity: Some(format!("user{n}")),
                resource: Some("bench".into()),
                key: Some(n.to_string()),
                mail: RenderedMail {
                    from: "idsync <idsync@example.com>".into(),
                    to: vec![format!("user{n}@example.com")],
                    subject: format!("Welcome, user {n}"),
                    text: format!("Hello user {n},\n\nyour account is ready.\n"),
                    html: None,
                    retry: serde_json::Value::Null,
                },
                max_age_ms: 86_400_000,
                dead: None,
            })
            .context("enqueueing")?;
        }
        repo.commit().context("enqueueing")?;
        left -= chunk;
    }
    let enqueue = t0.elapsed();
    let settings = Arc::new(SmtpSettings {
        host: target.ip().to_string(),
        port: target.port(),
        tls: TlsMode::None,
        accept_invalid_certs: false,
        ca: None,
        credentials: None,
        connections,
        timeout: Duration::from_secs(30),
        hello: ClientId::Domain("idsync.bench".into()),
    });
    let d = Dispatcher::new(
        repo.clone(),
        Transport::Smtp(settings),
        DispatchSettings {
            lease: Duration::from_secs(120),
            batch,
            exit_after_send: false,
        },
    );
    let t1 = Instant::now();
    let report = d
        .round_blocking()
        .with_context(|| format!("draining the outbox to {target}"))?;
    let drain = t1.elapsed();
    let (pending, sent, dead) = repo.outbox_counts().context("counting the outbox")?;
    ensure!(
        sent == messages && report.sent == messages,
        "expected {messages} sent, found {sent} sent, {pending} pending, {dead} dead"
    );
    Ok(BenchReport {
        messages,
        enqueue,
        drain,
        accepted: sink.map(|s| s.accepted()),
        connections,
        target,
    })
}
