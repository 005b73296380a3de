//! Connecting: TLS settings (rustls, verification on, optional CA file), reading the bind
//! secrets from the environment or a file, binding, and the search calls, all on a small
//! tokio runtime owned by the adapter (the `Adapter` trait is synchronous).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ldap3::controls::RawControl;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchStream};
use tokio::runtime::Runtime;

use crate::config::{LdapConfig, ScopeConfig};
use crate::error::LdapError;

/// A search stream owning its strings, so it can be kept between fetches.
pub(crate) type Stream = SearchStream<'static, String, Vec<String>>;

/// The adapter's runtime and its open connection, if any.
pub(crate) struct Client {
    rt: Runtime,
    ldap: Option<Ldap>,
    pub config: LdapConfig,
    /// Times the directory was found older than the stored cookie (module `stale`) and
    /// refreshed from scratch; shared by every connection of one adapter.
    pub stale_refreshes: Arc<AtomicU64>,
}

impl Client {
    pub fn new(config: LdapConfig) -> Result<Client, LdapError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LdapError::Connection {
                url: config.url.clone(),
                message: format!("cannot start the network runtime: {e}"),
            })?;
        Ok(Client {
            rt,
            ldap: None,
            config,
            stale_refreshes: Arc::default(),
        })
    }

    /// A client counting its stale refreshes in `counter` (the adapter's).
    pub fn with_counter(config: LdapConfig, counter: &Arc<AtomicU64>) -> Result<Client, LdapError> {
        let mut c = Client::new(config)?;
        c.stale_refreshes = counter.clone();
        Ok(c)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs)
    }

    fn conn_err(&self, message: impl Into<String>) -> LdapError {
        LdapError::Connection {
            url: self.config.url.clone(),
            message: message.into(),
        }
    }

    /// Runs `fut` on the runtime with the network timeout.
    pub fn run<T>(
        &self,
        what: &str,
        fut: impl Future<Output = ldap3::result::Result<T>>,
    ) -> Result<T, LdapError> {
        let t = self.timeout();
        match self
            .rt
            .block_on(async move { tokio::time::timeout(t, fut).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.conn_err(format!("{what}: {e}"))),
            Err(_) => Err(self.conn_err(format!("{what}: no answer within {}s", t.as_secs()))),
        }
    }

    /// Runs `fut` on the runtime, waiting at most `wait`; `None` when the time ran out.
    /// Only cancel-safe futures may be given (reading the next message of a stream is).
    pub fn run_for<T>(&self, wait: Duration, fut: impl Future<Output = T>) -> Option<T> {
        self.rt
            .block_on(async move { tokio::time::timeout(wait, fut).await })
            .ok()
    }

    /// Drops the connection (the next call reconnects).
    pub fn disconnect(&mut self) {
        if let Some(mut ldap) = self.ldap.take() {
            let _ = self.rt.block_on(async move {
                tokio::time::timeout(Duration::from_millis(200), ldap.unbind()).await
            });
        }
    }

    /// The open connection, connecting and binding first if needed.
    pub fn ldap(&mut self) -> Result<Ldap, LdapError> {
        if let Some(l) = &mut self.ldap
            && !l.is_closed()
        {
            return Ok(l.clone());
        }
        self.ldap = None;
        let ldap = self.connect()?;
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    fn connect(&self) -> Result<Ldap, LdapError> {
        let c = &self.config;
        let creds = credentials(c)?;
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout())
            .set_starttls(c.starttls);
        if let Some(ca) = &c.ca_file {
            settings = settings.set_config(Arc::new(tls_config(ca)?));
        }
        let url = c.url.clone();
        let (conn, mut ldap) = self.run("connect", async move {
            LdapConnAsync::with_settings(settings, &url).await
        })?;
        let url = c.url.clone();
        self.rt.spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(url = %url, "LDAP connection ended: {e}");
            }
        });
        if let Some((dn, pw)) = creds {
            let res = self.run("bind", async { ldap.simple_bind(&dn, &pw).await })?;
            if res.rc != 0 {
                return Err(LdapError::BindRefused {
                    url: c.url.clone(),
                    dn,
                    rc: res.rc,
                    text: if res.text.is_empty() {
                        rc_name(res.rc).to_owned()
                    } else {
                        format!("{} ({})", rc_name(res.rc), res.text)
                    },
                });
            }
        }
        Ok(ldap)
    }

    /// Starts a streaming search with `controls` (made critical by the caller), optionally
    /// paged. A kept connection that turns out dead (the server restarted since the last
    /// fetch) is replaced once at once.
    pub fn search(
        &mut self,
        filter: &str,
        attrs: Vec<String>,
        controls: Vec<RawControl>,
        page_size: Option<i32>,
    ) -> Result<Stream, LdapError> {
        let reused = self.ldap.is_some();
        match self.search_once(filter, attrs.clone(), controls.clone(), page_size) {
            Err(LdapError::Connection { .. }) if reused => {
                self.search_once(filter, attrs, controls, page_size)
            }
            r => r,
        }
    }

    fn search_once(
        &mut self,
        filter: &str,
        attrs: Vec<String>,
        controls: Vec<RawControl>,
        page_size: Option<i32>,
    ) -> Result<Stream, LdapError> {
        let mut ldap = self.ldap()?;
        let base = self.config.base.clone();
        let scope = match self.config.scope {
            ScopeConfig::Base => Scope::Base,
            ScopeConfig::One => Scope::OneLevel,
            ScopeConfig::Sub => Scope::Subtree,
        };
        let filter = filter.to_owned();
        let result = self.run("search", async move {
            if !controls.is_empty() {
                ldap.with_controls(controls);
            }
            match page_size {
                Some(n) => {
                    let adapters: Vec<
                        Box<dyn ldap3::adapters::Adapter<'static, String, Vec<String>>>,
                    > = vec![
                        Box::new(ldap3::adapters::EntriesOnly::new()),
                        Box::new(ldap3::adapters::PagedResults::new(n)),
                    ];
                    ldap.streaming_search_with(adapters, &base, scope, &filter, attrs)
                        .await
                }
                None => ldap.streaming_search(&base, scope, &filter, attrs).await,
            }
        });
        if result.is_err() {
            self.disconnect();
        }
        result
    }

    /// The values of `attrs` of the entry `dn` (a base-scope search; an absent entry or
    /// attribute reads as empty).
    pub fn read_entry(
        &mut self,
        dn: &str,
        attrs: &[&str],
    ) -> Result<std::collections::HashMap<String, Vec<String>>, LdapError> {
        let mut ldap = self.ldap()?;
        let dn_owned = dn.to_owned();
        let wanted: Vec<String> = attrs.iter().map(|a| (*a).to_owned()).collect();
        let (entries, _res) = self.run("reading an entry", async move {
            ldap.search(&dn_owned, Scope::Base, "(objectClass=*)", wanted)
                .await?
                .success()
        })?;
        Ok(entries
            .into_iter()
            .next()
            .map(|e| ldap3::SearchEntry::construct(e).attrs)
            .unwrap_or_default())
    }

    /// The next message of `stream` (network timeout applies).
    pub fn next(&mut self, stream: &mut Stream) -> Result<Option<ldap3::ResultEntry>, LdapError> {
        let r = self.run("reading search results", stream.next());
        if r.is_err() {
            self.disconnect();
        }
        r
    }

    /// The final result of a finished stream.
    pub fn finish(&self, stream: &mut Stream) -> ldap3::LdapResult {
        self.rt.block_on(stream.finish())
    }

    /// Ends a finished plain search: an error naming the server, base and result code
    /// unless it succeeded.
    pub fn finish_ok(&self, stream: &mut Stream) -> Result<(), LdapError> {
        let res = self.finish(stream);
        if res.rc == 0 {
            return Ok(());
        }
        Err(LdapError::Search {
            url: self.config.url.clone(),
            base: self.config.base.clone(),
            rc: res.rc,
            text: res.text,
        })
    }
}

/// `(bind DN, password)` from the config's sources, or `None` for an anonymous bind.
fn credentials(c: &LdapConfig) -> Result<Option<(String, String)>, LdapError> {
    let dn = match (&c.bind_dn, &c.bind_dn_env) {
        (Some(dn), _) => Some(dn.clone()),
        (None, Some(var)) => Some(env_secret(&format!("bind DN from ${var}"), var)?),
        (None, None) => None,
    };
    let Some(dn) = dn else { return Ok(None) };
    let pw = match (&c.bind_password_env, &c.bind_password_file) {
        (Some(var), _) => env_secret(&format!("bind password from ${var}"), var)?,
        (None, Some(file)) => {
            let what = format!("bind password from {}", file.display());
            let text = std::fs::read_to_string(file).map_err(|e| LdapError::Secret {
                what: what.clone(),
                message: e.to_string(),
            })?;
            let pw = text.trim_end_matches(['\n', '\r']).to_owned();
            if pw.is_empty() {
                return Err(LdapError::Secret {
                    what,
                    message: "the file is empty".to_owned(),
                });
            }
            pw
        }
        (None, None) => {
            return Err(LdapError::Config(
                "a bind DN is given but no bind password source".to_owned(),
            ));
        }
    };
    Ok(Some((dn, pw)))
}

fn env_secret(what: &str, var: &str) -> Result<String, LdapError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(LdapError::Secret {
            what: what.to_owned(),
            message: "the variable is empty".to_owned(),
        }),
        Err(_) => Err(LdapError::Secret {
            what: what.to_owned(),
            message: "the variable is not set".to_owned(),
        }),
    }
}

/// A rustls client config trusting the CA certificates of a PEM file (verification on).
fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, LdapError> {
    let shown = ca_file.display();
    let pem = std::fs::read(ca_file)
        .map_err(|e| LdapError::Tls(format!("cannot read ca_file {shown}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| LdapError::Tls(format!("ca_file {shown}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| LdapError::Tls(format!("ca_file {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(LdapError::Tls(format!(
            "ca_file {shown} holds no PEM certificate"
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LdapError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The name of an LDAP result code, for messages.
pub(crate) fn rc_name(rc: u32) -> &'static str {
    match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        8 => "strongerAuthRequired",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        80 => "other",
        4096 => "e-syncRefreshRequired",
        _ => "error",
    }
}

/// Whether the bind DN and password of `config` can be read now (the variables set, the
/// file readable and not empty), without connecting; the error names the source, never the
/// secret. For `idsync check`.
pub fn check_credentials(config: &LdapConfig) -> Result<(), LdapError> {
    credentials(config).map(|_| ())
}

/// Connects to the directory of `config` and binds as it would for a pass, then unbinds.
/// For `idsync check --connect`.
pub fn check_bind(config: &LdapConfig) -> Result<(), LdapError> {
    let mut client = Client::new(config.clone())?;
    client.ldap()?;
    client.disconnect();
    Ok(())
}
