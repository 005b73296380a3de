//! The LDAP resource configuration: serde types, then [`LdapConfig::validate`], which collects
//! every problem at once, each starting with the field it is about.
//!
//! Secrets never live here: the bind password (and, if wanted, the bind DN) is named by an
//! environment variable or a file, read only when connecting, and never logged.

use std::collections::BTreeMap;
use std::path::PathBuf;

use idsync_core::DeleteGuard;
use serde::Deserialize;

/// How changes are detected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// RFC 4533 refreshOnly: one refresh per pass, the cookie is the checkpoint.
    #[default]
    Syncrepl,
    /// RFC 4533 refreshAndPersist: one long-lived search, committed in small batches.
    Persist,
    /// For servers without content sync: `modifyTimestamp` high-water mark, plus a periodic
    /// full pass that finds deletes by absence.
    Poll,
}

/// Search scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeConfig {
    /// The base entry only.
    Base,
    /// The base's children.
    One,
    /// The whole subtree (default).
    #[default]
    Sub,
}

/// One LDAP resource.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port/` or `ldaps://host:port/`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS (default false).
    #[serde(default)]
    pub starttls: bool,
    /// A PEM file of CA certificates trusted for the server's certificate (default: the
    /// system's trust store). Relative to the config file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The bind DN (not a secret; may also come from `bind_dn_env`). No DN: anonymous.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// Environment variable holding the bind DN.
    #[serde(default)]
    pub bind_dn_env: Option<String>,
    /// Environment variable holding the bind password.
    #[serde(default)]
    pub bind_password_env: Option<String>,
    /// File holding the bind password (one line; trailing newline ignored). Relative to the
    /// config file.
    #[serde(default)]
    pub bind_password_file: Option<PathBuf>,
    /// The search base.
    pub base: String,
    /// The search scope (default `sub`).
    #[serde(default)]
    pub scope: ScopeConfig,
    /// The search filter (default `(objectClass=*)`). `{name}` placeholders are replaced by the
    /// escaped values of `filter_values`.
    #[serde(default = "default_filter")]
    pub filter: String,
    /// Values for the filter's `{name}` placeholders; escaped (RFC 4515) before use, so
    /// `*`, `(`, `)` and `\` match literally.
    #[serde(default)]
    pub filter_values: BTreeMap<String, String>,
    /// Attributes to read (default: all user attributes).
    #[serde(default = "default_attributes")]
    pub attributes: Vec<String>,
    /// Attributes always carried as binary values (default: common binary attributes such as
    /// `jpegPhoto`). Any value that is not valid UTF-8 is binary too.
    #[serde(default = "default_binary")]
    pub binary_attributes: Vec<String>,
    /// The account attribute that carries the entry's DN (default `dn`).
    #[serde(default = "default_dn_attribute")]
    pub dn_attribute: String,
    /// An attribute people know accounts by (e.g. `uid`): commands that take an account key
    /// (`explain`, `results --key`, `failed list --key`) accept its value, as they accept
    /// the entry's DN, besides the entryUUID.
    #[serde(default)]
    pub name_attribute: Option<String>,
    /// How changes are detected (default `syncrepl`).
    #[serde(default)]
    pub mode: Mode,
    /// Seconds between passes of this resource in `idsync run` (default: the agent's
    /// `poll_interval_secs`; `persist` returns to its stream at once).
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Syncrepl mode: events per part of a streamed refresh; persist mode: the most events
    /// in one batch (default 5000).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Persist mode: how long a batch may wait for more events after its first (default 5 ms).
    #[serde(default = "default_batch_ms")]
    pub batch_ms: u64,
    /// Persist mode: how long one fetch waits for a first event before reporting no changes
    /// (default 1000 ms).
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Poll mode: seconds between full passes that find deletes (default 3600; 0: every
    /// pass is a full pass).
    #[serde(default = "default_full_pass")]
    pub full_pass_secs: u64,
    /// Page size of paged searches (poll mode; default 500).
    #[serde(default = "default_page_size")]
    pub page_size: i32,
    /// Network timeout for connecting and each request, in seconds (default 30).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The accidental-delete guard every adapter shares ([`DeleteGuard`]): a full refresh
    /// (deletes found by absence) that would delete too many known accounts stops before
    /// applying anything, until `--accept-deletes` accepts it once.
    #[serde(default)]
    pub delete_guard: DeleteGuard,
    /// Older spelling, still read: `delete_guard.max_delete_ratio` in percent (0–100).
    #[serde(default)]
    pub delete_guard_percent: Option<u8>,
    /// Older spelling, still read: `delete_guard.ratio_min_accounts`.
    #[serde(default)]
    pub delete_guard_min: Option<u64>,
    /// The operator accepted this run's deletes (`--accept-deletes`); not a config key.
    #[serde(skip)]
    pub deletes_accepted: bool,
}

fn default_filter() -> String {
    "(objectClass=*)".to_owned()
}
fn default_attributes() -> Vec<String> {
    vec!["*".to_owned()]
}
fn default_binary() -> Vec<String> {
    [
        "jpegPhoto",
        "userCertificate",
        "cACertificate",
        "userPKCS12",
        "audio",
        "photo",
        "objectGUID",
        "objectSid",
        "thumbnailPhoto",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
fn default_dn_attribute() -> String {
    "dn".to_owned()
}
fn default_batch_size() -> usize {
    5000
}
fn default_batch_ms() -> u64 {
    5
}
fn default_idle_ms() -> u64 {
    1000
}
fn default_full_pass() -> u64 {
    3600
}
fn default_page_size() -> i32 {
    500
}
fn default_timeout() -> u64 {
    30
}

impl LdapConfig {
    /// The guard in force: `delete_guard`, with the older keys applied when given.
    pub fn guard(&self) -> DeleteGuard {
        let mut g = self.delete_guard.clone();
        if let Some(p) = self.delete_guard_percent {
            g.max_delete_ratio = f64::from(p) / 100.0;
        }
        if let Some(m) = self.delete_guard_min {
            g.ratio_min_accounts = m;
        }
        g
    }

    /// A config for `url` and `base`, every other field at its default.
    pub fn new(url: &str, base: &str) -> Self {
        LdapConfig {
            url: url.to_owned(),
            starttls: false,
            ca_file: None,
            bind_dn: None,
            bind_dn_env: None,
            bind_password_env: None,
            bind_password_file: None,
            base: base.to_owned(),
            scope: ScopeConfig::Sub,
            filter: default_filter(),
            filter_values: BTreeMap::new(),
            attributes: default_attributes(),
            binary_attributes: default_binary(),
            dn_attribute: default_dn_attribute(),
            name_attribute: None,
            mode: Mode::Syncrepl,
            interval_secs: None,
            batch_size: default_batch_size(),
            batch_ms: default_batch_ms(),
            idle_ms: default_idle_ms(),
            full_pass_secs: default_full_pass(),
            page_size: default_page_size(),
            timeout_secs: default_timeout(),
            delete_guard: DeleteGuard::default(),
            delete_guard_percent: None,
            delete_guard_min: None,
            deletes_accepted: false,
        }
    }

    /// The filter with its `{name}` placeholders replaced by escaped values.
    pub fn effective_filter(&self) -> Result<String, String> {
        let mut out = String::with_capacity(self.filter.len());
        let mut rest = self.filter.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("filter: '{{' at byte {open} is not closed"))?;
            let name = &after[..close];
            let value = self.filter_values.get(name).ok_or_else(|| {
                format!("filter: placeholder {{{name}}} has no filter_values entry")
            })?;
            out.push_str(&ldap3::ldap_escape(value.as_str()));
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Every problem with this config, each starting with its field. Empty when usable.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let lower = self.url.to_ascii_lowercase();
        if !(lower.starts_with("ldap://") || lower.starts_with("ldaps://")) {
            p.push(format!(
                "url: must start with ldap:// or ldaps://, not '{}'",
                self.url
            ));
        }
        if self.starttls && lower.starts_with("ldaps://") {
            p.push("starttls: not with an ldaps:// url (already TLS)".to_owned());
        }
        if self.bind_dn.is_some() && self.bind_dn_env.is_some() {
            p.push("bind_dn_env: give either bind_dn or bind_dn_env, not both".to_owned());
        }
        if self.bind_password_env.is_some() && self.bind_password_file.is_some() {
            p.push(
                "bind_password_file: give either bind_password_env or bind_password_file, not both"
                    .to_owned(),
            );
        }
        let has_dn = self.bind_dn.is_some() || self.bind_dn_env.is_some();
        let has_pw = self.bind_password_env.is_some() || self.bind_password_file.is_some();
        if has_dn != has_pw {
            p.push(
                "bind_dn: a bind needs both a DN (bind_dn or bind_dn_env) and a password \
                 (bind_password_env or bind_password_file)"
                    .to_owned(),
            );
        }
        if self.base.trim().is_empty() {
            p.push("base: must name the search base".to_owned());
        }
        match self.effective_filter() {
            Ok(f) => {
                if let Err(e) = ldap3::parse_filter(&f) {
                    p.push(format!("filter: '{f}' is not a valid LDAP filter: {e:?}"));
                }
            }
            Err(e) => p.push(e),
        }
        if self.attributes.is_empty() {
            p.push("attributes: list at least one attribute (or \"*\")".to_owned());
        }
        if self.dn_attribute.trim().is_empty() {
            p.push("dn_attribute: must not be empty".to_owned());
        }
        if self.batch_size == 0 {
            p.push("batch_size: must be at least 1".to_owned());
        }
        if self.page_size <= 0 {
            p.push("page_size: must be at least 1".to_owned());
        }
        if self.timeout_secs == 0 {
            p.push("timeout_secs: must be at least 1".to_owned());
        }
        if self.delete_guard_percent.is_some_and(|p| p > 100) {
            p.push("delete_guard_percent: must be between 0 and 100".to_owned());
        }
        if self.interval_secs == Some(0) && self.mode != Mode::Persist {
            p.push("interval_secs: must be at least 1 (0 only in persist mode)".to_owned());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(yaml: &str) -> LdapConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse("url: ldap://127.0.0.1:389/\nbase: dc=example,dc=com\n");
        assert_eq!(
            c,
            LdapConfig::new("ldap://127.0.0.1:389/", "dc=example,dc=com")
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn filter_values_are_escaped() {
        let mut c = LdapConfig::new("ldap://h/", "dc=x");
        c.filter = "(&(objectClass=person)(departmentNumber={dept}))".to_owned();
        c.filter_values
            .insert("dept".to_owned(), "R*)(D\\".to_owned());
        assert_eq!(
            c.effective_filter().unwrap(),
            "(&(objectClass=person)(departmentNumber=R\\2a\\29\\28D\\5c))"
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c.filter = "(cn={nope})".to_owned();
        assert!(c.validate()[0].contains("{nope}"));
    }

    #[test]
    fn validation_messages() {
        let c = parse(
            "url: http://x\nbase: ''\nbind_dn: cn=a\nstarttls: true\nfilter: '(cn=a'\nbatch_size: 0\n",
        );
        let p = c.validate();
        assert!(p.iter().any(|m| m.starts_with("url:")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("base:")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("bind_dn:")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("filter:")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("batch_size:")), "{p:?}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = serde_yaml::from_str::<LdapConfig>("url: ldap://h/\nbase: x\nbind_password: s\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bind_password`"), "{e}");
    }
}
