//! From the `notifications:` config to runtime values: the transport with its secret read
//! from the environment or a file, and the dispatcher settings. Problems name their key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::Certificate;
use lettre::transport::smtp::extension::ClientId;

use crate::config::{NotificationsConfig, TlsMode, TransportConfig, duration};
use crate::dispatch::{DispatchSettings, Transport};
use crate::smtp::SmtpSettings;

/// The transport of `cfg`; `resolve` turns relative paths into paths from the config
/// file's folder.
pub fn transport(
    cfg: &NotificationsConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Transport, Vec<String>> {
    match &cfg.transport {
        TransportConfig::File { dir } => Ok(Transport::File(resolve(dir))),
        TransportConfig::Smtp(s) => {
            let mut problems = Vec::new();
            let key = "notifications.transport";
            let timeout = duration(&format!("{key}.timeout"), &s.timeout).unwrap_or_else(|e| {
                problems.push(e);
                std::time::Duration::from_secs(30)
            });
            let password = match (&s.password_env, &s.password_file) {
                (Some(_), Some(_)) => {
                    problems.push(format!(
                        "{key}: give either password_env or password_file, not both"
                    ));
                    None
                }
                (Some(var), None) => match std::env::var(var) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        problems.push(format!(
                            "{key}.password_env: the environment variable {var} is not set"
                        ));
                        None
                    }
                },
                (None, Some(file)) => {
                    let path = resolve(file);
                    match std::fs::read_to_string(&path) {
                        Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_owned()),
                        Err(e) => {
                            problems.push(format!(
                                "{key}.password_file: cannot read {}: {e}",
                                path.display()
                            ));
                            None
                        }
                    }
                }
                (None, None) => None,
            };
            let credentials = match (&s.username, password) {
                (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p)),
                (Some(_), None) if problems.is_empty() => {
                    problems.push(format!(
                        "{key}: username is set but no password_env or password_file"
                    ));
                    None
                }
                (None, Some(_)) => {
                    problems.push(format!("{key}: a password is set but no username"));
                    None
                }
                _ => None,
            };
            let ca = s.ca_file.as_ref().and_then(|file| {
                let path = resolve(file);
                let problem = match std::fs::read(&path) {
                    Ok(pem) => match Certificate::from_pem(&pem) {
                        Ok(ca) if pem_has_certificate(&pem) => return Some(ca),
                        Ok(_) => "no PEM certificate in it".to_owned(),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => format!("cannot read it: {e}"),
                };
                problems.push(format!("{key}.ca_file: {}: {problem}", path.display()));
                None
            });
            if s.ca_file.is_some() && s.tls == TlsMode::None {
                problems.push(format!(
                    "{key}.ca_file: set, but tls is none (use starttls or tls)"
                ));
            }
            if s.connections == 0 {
                problems.push(format!("{key}.connections: must be at least 1"));
            }
            let port = s.port.unwrap_or(match s.tls {
                TlsMode::Starttls => 587,
                TlsMode::Tls => 465,
                TlsMode::None => 25,
            });
            let hello = match &s.hello_name {
                Some(h) => ClientId::Domain(h.clone()),
                None => ClientId::default(),
            };
            if !problems.is_empty() {
                return Err(problems);
            }
            Ok(Transport::Smtp(Arc::new(SmtpSettings {
                host: s.host.clone(),
                port,
                tls: s.tls,
                accept_invalid_certs: s.accept_invalid_certs,
                ca,
                credentials,
                connections: s.connections,
                timeout,
                hello,
            })))
        }
    }
}

/// Whether `pem` holds at least one certificate block.
fn pem_has_certificate(pem: &[u8]) -> bool {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    pem.windows(BEGIN.len()).any(|w| w == BEGIN)
}

/// The dispatcher settings of `cfg`. `IDSYNC_FAULT=exit-after-send` turns on the crash
/// test hook.
pub fn settings(cfg: &NotificationsConfig) -> Result<DispatchSettings, Vec<String>> {
    let lease = duration(
        "notifications.dispatch.claim_lease",
        &cfg.dispatch.claim_lease,
    )
    .map_err(|e| vec![e])?;
    Ok(DispatchSettings {
        lease,
        batch: cfg.dispatch.batch.max(1),
        exit_after_send: std::env::var("IDSYNC_FAULT").is_ok_and(|v| v == "exit-after-send"),
    })
}
