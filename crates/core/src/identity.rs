//! Identities as the repository holds them and as rules and exports see them.

use serde::{Deserialize, Serialize};

use crate::attrs::{AttrMap, Value};

/// An account on a resource linked to an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedAccount {
    /// Resource name.
    pub resource: String,
    /// Native key on that resource.
    pub key: String,
    /// The account's last seen attributes.
    #[serde(default)]
    pub attrs: AttrMap,
}

/// The identity view: what checkout returns and checkin commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Unique name.
    pub name: String,
    /// Version for compare-and-swap checkin; incremented by every checkin.
    pub version: i64,
    /// Disabled by a delete action (or a process rule).
    #[serde(default)]
    pub disabled: bool,
    /// The identity's attributes.
    pub attrs: AttrMap,
    /// Linked accounts.
    #[serde(default)]
    pub accounts: Vec<LinkedAccount>,
}

/// Attribute equality conditions, AND-ed, used for correlation queries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditions(pub Vec<(String, Value)>);
