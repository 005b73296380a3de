//! What rules may ask of the outside world: read-only repository queries in every rule,
//! and the process context (`ctx`) in process and resolve rules.
//!
//! Scripts never do IO themselves. The engine binds a [`RuleHost`] for the length of one
//! script run; the registered functions reach it through a shared slot, and writes are
//! refused unless the run was granted [`Access::ReadWrite`].

use std::cell::RefCell;
use std::rc::Rc;

use idsync_core::{AttrMap, Conditions, Identity};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, Position};

use crate::convert::{identity_to_dynamic, map_to_attrs};

/// The repository as rules see it. Implemented by the engine over the open batch
/// transaction, so a rule sees the effects of earlier events of the same batch.
pub trait RuleHost {
    /// The identity named `name`.
    fn find_identity(&self, name: &str) -> Result<Option<Identity>, String>;
    /// Names of identities matching every condition.
    fn query(&self, conds: &Conditions) -> Result<Vec<String>, String>;
    /// Creates an identity (process and resolve rules only).
    fn create(&self, name: &str, attrs: &AttrMap) -> Result<Identity, String>;
    /// Checks in a view (compare-and-swap on its version); returns the new version.
    fn checkin(&self, view: &Identity) -> Result<i64, String>;
    /// Deletes an identity.
    fn delete(&self, name: &str) -> Result<bool, String>;
    /// Links the event's account to the identity.
    fn link(&self, name: &str) -> Result<(), String>;
    /// Unlinks the event's account.
    fn unlink(&self) -> Result<bool, String>;
    /// Opens a work item for an administrator.
    fn work_item(&self, message: &str) -> Result<(), String>;
}

/// What a script run may do through its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Queries only (filter, delete, correlation, confirmation, mappings).
    ReadOnly,
    /// Queries and the write operations of `ctx` (process and resolve rules).
    ReadWrite,
}

pub(crate) type HostSlot = Rc<RefCell<Option<(Rc<dyn RuleHost>, Access)>>>;

/// The `ctx` value handed to process and resolve rules.
#[derive(Clone, Debug, Default)]
pub struct Context;

type Res<T> = Result<T, Box<EvalAltResult>>;

fn fail(msg: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(msg.into()),
        Position::NONE,
    ))
}

fn host(slot: &HostSlot, write: Option<&str>) -> Res<Rc<dyn RuleHost>> {
    let bound = slot.borrow();
    let (h, access) = bound
        .as_ref()
        .ok_or_else(|| fail("no repository is available to this script"))?;
    if let Some(op) = write
        && *access != Access::ReadWrite
    {
        return Err(fail(format!(
            "ctx.{op} is only allowed in process and resolve rules"
        )));
    }
    Ok(h.clone())
}

fn view_from_dynamic(view: &Map) -> Res<Identity> {
    let name = view
        .get("name")
        .map(|d| d.to_string())
        .ok_or_else(|| fail("checkin: the view has no name"))?;
    let version = view
        .get("version")
        .and_then(|d| d.as_int().ok())
        .ok_or_else(|| fail("checkin: the view has no version (check it out first)"))?;
    let disabled = view
        .get("disabled")
        .map(|d| d.as_bool().unwrap_or(false))
        .unwrap_or(false);
    let attrs = match view.get("attrs") {
        Some(a) if a.is_map() => map_to_attrs(&a.clone().cast::<Map>()).map_err(fail)?,
        Some(a) if a.is_unit() => AttrMap::new(),
        None => AttrMap::new(),
        Some(a) => {
            return Err(fail(format!(
                "checkin: attrs must be a map, got {}",
                a.type_name()
            )));
        }
    };
    Ok(Identity {
        name,
        version,
        disabled,
        attrs,
        accounts: Vec::new(),
    })
}

fn conditions(m: &Map) -> Res<Conditions> {
    let attrs = map_to_attrs(m).map_err(fail)?;
    let mut out = Vec::new();
    for a in attrs.iter() {
        if a.values.len() != 1 {
            return Err(fail(format!(
                "query: condition {} needs exactly one value",
                a.name
            )));
        }
        out.push((a.name.clone(), a.values[0].clone()));
    }
    if out.is_empty() {
        return Err(fail("query: give at least one condition"));
    }
    Ok(Conditions(out))
}

/// The identity view of `name`, or `()`.
fn find(slot: &HostSlot, name: &str) -> Res<Dynamic> {
    let h = host(slot, None)?;
    Ok(h.find_identity(name)
        .map_err(fail)?
        .map(|i| identity_to_dynamic(&i))
        .unwrap_or(Dynamic::UNIT))
}

/// Registers the query functions and the `ctx` methods on `engine`.
pub(crate) fn register(engine: &mut Engine, slot: &HostSlot) {
    let s = slot.clone();
    engine.register_fn("find_identity", move |name: &str| find(&s, name));
    let s = slot.clone();
    engine.register_fn("query_identities", move |m: Map| -> Res<Array> {
        let h = host(&s, None)?;
        let names = h.query(&conditions(&m)?).map_err(fail)?;
        Ok(names.into_iter().map(Dynamic::from).collect())
    });

    engine.register_type_with_name::<Context>("Context");
    let s = slot.clone();
    engine.register_fn("find", move |_: &mut Context, name: &str| find(&s, name));
    let s = slot.clone();
    engine.register_fn("checkout", move |_: &mut Context, name: &str| {
        find(&s, name)
    });
    let s = slot.clone();
    engine.register_fn("query", move |_: &mut Context, m: Map| -> Res<Array> {
        let h = host(&s, None)?;
        let names = h.query(&conditions(&m)?).map_err(fail)?;
        Ok(names.into_iter().map(Dynamic::from).collect())
    });
    let s = slot.clone();
    engine.register_fn(
        "create",
        move |_: &mut Context, name: &str, attrs: Map| -> Res<Dynamic> {
            let h = host(&s, Some("create"))?;
            let attrs = map_to_attrs(&attrs).map_err(fail)?;
            Ok(identity_to_dynamic(&h.create(name, &attrs).map_err(fail)?))
        },
    );
    let s = slot.clone();
    engine.register_fn("checkin", move |_: &mut Context, view: Map| -> Res<i64> {
        let h = host(&s, Some("checkin"))?;
        h.checkin(&view_from_dynamic(&view)?).map_err(fail)
    });
    let s = slot.clone();
    engine.register_fn("delete", move |_: &mut Context, name: &str| -> Res<bool> {
        let h = host(&s, Some("delete"))?;
        h.delete(name).map_err(fail)
    });
    let s = slot.clone();
    engine.register_fn("link", move |_: &mut Context, name: &str| -> Res<()> {
        let h = host(&s, Some("link"))?;
        h.link(name).map_err(fail)
    });
    let s = slot.clone();
    engine.register_fn("unlink", move |_: &mut Context| -> Res<bool> {
        let h = host(&s, Some("unlink"))?;
        h.unlink().map_err(fail)
    });
    let s = slot.clone();
    engine.register_fn("work_item", move |_: &mut Context, msg: &str| -> Res<()> {
        let h = host(&s, Some("work_item"))?;
        h.work_item(msg).map_err(fail)
    });
}
