//! The crate's one error type, and its translation into the engine's [`AdapterError`]
//! (transient: retry later and resume from the committed cookie; permanent: needs an operator).

use idsync_core::AdapterError;

/// Why the LDAP adapter could not fetch.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// The config cannot be used.
    #[error("invalid config: {0}")]
    Config(String),
    /// A secret (bind DN or password) could not be read. The secret itself is never shown.
    #[error("cannot read the {what}: {message}")]
    Secret {
        /// Which secret and from where (e.g. `bind password from $LDAP_PW`).
        what: String,
        /// Why.
        message: String,
    },
    /// TLS settings could not be built (CA file unreadable or empty).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server could not be reached or the connection broke.
    #[error("{url}: {message}")]
    Connection {
        /// The server.
        url: String,
        /// What happened.
        message: String,
    },
    /// The server is up but refused the bind.
    #[error("{url}: bind as '{dn}' refused: {text} (result code {rc})")]
    BindRefused {
        /// The server.
        url: String,
        /// The bind DN (not a secret).
        dn: String,
        /// LDAP result code.
        rc: u32,
        /// Server text or the code's name.
        text: String,
    },
    /// The search failed on the server.
    #[error("{url}: search under '{base}' failed: {text} (result code {rc})")]
    Search {
        /// The server.
        url: String,
        /// The search base.
        base: String,
        /// LDAP result code.
        rc: u32,
        /// Server text.
        text: String,
    },
    /// The server sent something this adapter cannot read.
    #[error("{url}: malformed response: {message}")]
    Protocol {
        /// The server.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The accidental-delete guard stopped a full refresh.
    #[error(
        "a full refresh: {0}. If this is right, accept the deletes once with \
         `idsync run --once --accept-deletes` and this resource's name"
    )]
    DeleteGuard(idsync_core::GuardRefusal),
    /// The repository's known accounts could not be read.
    #[error("cannot read the known accounts: {0}")]
    Known(String),
}

impl LdapError {
    /// Whether retrying later (reconnecting) may succeed without an operator.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LdapError::Connection { .. } | LdapError::Protocol { .. } | LdapError::Known(_)
        ) || matches!(self, LdapError::Search { rc, .. } if is_transient_rc(*rc))
    }

    /// The engine's error, naming the resource.
    pub fn into_adapter(self, resource: &str) -> AdapterError {
        if let LdapError::DeleteGuard(refusal) = self {
            return AdapterError::DeleteGuard {
                resource: resource.to_owned(),
                refusal,
                advice: format!(
                    "A full refresh found them absent. If this is right, accept the deletes \
                     once with `idsync run --once --accept-deletes {resource}`"
                ),
            };
        }
        let message = self.to_string();
        if self.is_transient() {
            AdapterError::Transient {
                resource: resource.to_owned(),
                message,
            }
        } else {
            AdapterError::Permanent {
                resource: resource.to_owned(),
                message,
            }
        }
    }
}

/// busy, unavailable, unwillingToPerform, other, timeLimitExceeded, adminLimitExceeded.
fn is_transient_rc(rc: u32) -> bool {
    matches!(rc, 3 | 11 | 51 | 52 | 53 | 80)
}
