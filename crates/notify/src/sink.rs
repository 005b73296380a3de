//! The outbox drain benchmark (`idsync bench outbox`) and a minimal SMTP sink for it.
//!
//! The sink accepts every message (`250` to everything, `354` to DATA, reads to the lone
//! dot) and only counts; it listens on loopback and runs on a thread of its own, so the
//! benchmark measures the dispatcher and the repository, not a mail server. Point the
//! benchmark at another sink (postfix's `smtp-sink`) with `--smtp HOST:PORT`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idsync_repo::{NewOutboxMessage, RenderedMail, Repo};
use lettre::transport::smtp::extension::ClientId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::NotifyError;
use crate::config::TlsMode;
use crate::dispatch::{DispatchSettings, Dispatcher, Transport};
use crate::smtp::SmtpSettings;

/// A running sink: its address and how many messages it accepted.
#[derive(Debug)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Messages accepted so far.
    pub accepted: Arc<AtomicU64>,
}

/// Starts a sink on `127.0.0.1` (free port) on a thread of its own, for the life of the
/// process.
pub fn start_sink() -> Result<Sink, NotifyError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| NotifyError::Bench(format!("binding the sink: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| NotifyError::Bench(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NotifyError::Bench(e.to_string()))?;
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NotifyError::Runtime(e.to_string()))?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((sock, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let _ = session(sock, count).await;
                });
            }
        });
    });
    Ok(Sink { addr, accepted })
}

async fn session(sock: TcpStream, count: Arc<AtomicU64>) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 idsync-sink ESMTP\r\n").await?;
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" || line == ".\n" {
                in_data = false;
                count.fetch_add(1, Ordering::Relaxed);
                w.write_all(b"250 2.0.0 queued\r\n").await?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-idsync-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "DATA" => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            "QUIT" => {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        w.write_all(reply).await?;
    }
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
) -> Result<BenchReport, NotifyError> {
    let (target, sink) = match target {
        Some(t) => (t, None),
        None => {
            let s = start_sink()?;
            (s.addr, Some(s.accepted))
        }
    };
    let repo = Arc::new(Repo::open(repo_path)?);
    let t0 = Instant::now();
    let mut left = messages;
    let mut n = 0u64;
    while left > 0 {
        let chunk = left.min(5_000);
        repo.begin()?;
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
            })?;
        }
        repo.commit()?;
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
    let report = d.round_blocking()?;
    let drain = t1.elapsed();
    let (pending, sent, dead) = repo.outbox_counts()?;
    if sent != messages || report.sent != messages {
        return Err(NotifyError::Bench(format!(
            "expected {messages} sent, found {sent} sent, {pending} pending, {dead} dead"
        )));
    }
    Ok(BenchReport {
        messages,
        enqueue,
        drain,
        accepted: sink.map(|c| c.load(Ordering::Relaxed)),
        connections,
        target,
    })
}
