//! The rule sandbox: Rhai scripts compiled once, run with limits, their values turned
//! into decisions.
//!
//! Key design choice: rules do no IO. A script receives data (`account`, `previous`,
//! `identity`, ...) and returns a value; the only way out is a [`RuleHost`] the engine binds
//! for one run, which offers read-only repository queries to every rule and the write
//! operations of `ctx` to process and resolve rules only. Errors name the script, line and
//! column, so `idsync check` and failed events point at the exact spot.

mod convert;
mod correlation;
mod error;
mod host;
mod sandbox;
mod strict;
mod truth;

pub use convert::{
    attrs_to_dynamic, attrs_to_map, dynamic_to_values, identity_to_dynamic, map_to_attrs, render,
};
pub use correlation::{Correlation, parse_correlation};
pub use error::{Limit, Pos, RuleError, RuleErrorKind};
pub use host::{Access, Context, RuleHost};
pub use rhai;
pub use sandbox::{CHECK_EVERY, Limits, MAX_LOG_LINE, RuleEngine, Script, ascii_fold};
pub use strict::undefined_variable;
pub use truth::truthy;

#[cfg(test)]
mod tests;
