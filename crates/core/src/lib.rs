//! idsync's data model, shared by every other crate.
//!
//! Key design choice: this crate does no IO. It defines attribute maps with
//! case-insensitive names, change events, identities, decision records and the
//! [`Adapter`] contract (read after a checkpoint, never commit it), so that adapters,
//! the rule engine and the repository can be written and tested apart.

pub mod attrs;
pub mod decision;
pub mod event;
pub mod guard;
pub mod identity;
pub mod normalise;

pub use attrs::{Attr, AttrChange, AttrMap, Value};
pub use decision::{Action, Decision, RuleOutcome, Situation};
pub use event::{
    Adapter, AdapterError, ChangeBatch, ChangeEvent, ChangeWaiter, Checkpoint, Fetch, KeyHashes,
    KnownAccounts, Op, Reject, Wakeup,
};
pub use guard::{DeleteGuard, GuardRefusal};
pub use identity::{Conditions, Identity, LinkedAccount};
pub use normalise::{Normalisation, Normalisations, Step};
