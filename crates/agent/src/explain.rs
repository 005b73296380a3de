//! Human renderings of decision records — one line for tables, a step-by-step account for
//! `idsync explain` and failing rule fixtures — and of a pass's report (the summary line).

use std::fmt::Write as _;

use idsync_core::{Action, AttrChange, Decision, Op, Situation, Value};
use idsync_engine::{
    AUTHORITY_RULE, BatchReport, FUZZY_RULE, LIFECYCLE_RULE, NORMALISED_RULE, NOTIFICATION_RULE,
    OPERATOR_RULE, TIMER_RULE, WORK_ITEM_RULE,
};

use crate::printable::inline;

/// One line: `hr 100 update unlinked→linked ann.lee candidates=.. changed=..`.
pub fn one_line(d: &Decision) -> String {
    let mut line = format!(
        "{} {} {} {} {}",
        d.resource,
        inline(&d.key),
        d.op,
        d.situation.map(|s| s.as_str()).unwrap_or("-"),
        d.action
    );
    if let Some(i) = &d.identity {
        let _ = write!(line, " identity={}", inline(i));
    }
    if !d.candidates.is_empty() {
        let _ = write!(line, " candidates={}", inline(&d.candidates.join(",")));
    }
    if !d.changes.is_empty() {
        let names: Vec<&str> = d.changes.iter().map(|c| c.name.as_str()).collect();
        let _ = write!(line, " changed={}", names.join(","));
    }
    for o in d.rules.iter().filter(|o| o.rule == OPERATOR_RULE) {
        let _ = write!(line, " operator={:?}", o.result);
    }
    for w in d.rules.iter().filter(|o| o.rule == WORK_ITEM_RULE) {
        let _ = write!(line, " work_item={:?}", w.result);
    }
    for o in d
        .rules
        .iter()
        .filter(|o| o.rule == LIFECYCLE_RULE || o.rule == TIMER_RULE)
    {
        let _ = write!(line, " {}={:?}", o.rule, o.result);
    }
    for n in d.rules.iter().filter(|o| o.rule == NOTIFICATION_RULE) {
        let _ = write!(line, " notify={}", n.script);
    }
    if let Some(e) = &d.error {
        let _ = write!(line, " error={e:?}");
    }
    line
}

fn values(v: &Option<Vec<Value>>) -> String {
    match v {
        None => "(none)".to_owned(),
        Some(vs) => {
            let shown: Vec<String> = vs.iter().map(|v| format!("{:?}", v.to_string())).collect();
            shown.join(" | ")
        }
    }
}

/// A change as `name: before → after`.
pub fn change(c: &AttrChange) -> String {
    format!("{}: {} → {}", c.name, values(&c.before), values(&c.after))
}

/// The decision step by step, indented by two spaces.
pub fn steps(d: &Decision) -> String {
    let mut out = String::new();
    let situation = d.situation.map(|s| s.as_str()).unwrap_or("(not reached)");
    let _ = writeln!(out, "  op: {}", d.op);
    for o in d.rules.iter().filter(|o| o.rule == OPERATOR_RULE) {
        let _ = writeln!(out, "  operator: {}", o.result);
    }
    for r in d.rules.iter().filter(|r| {
        ![
            WORK_ITEM_RULE,
            NOTIFICATION_RULE,
            OPERATOR_RULE,
            AUTHORITY_RULE,
        ]
        .contains(&r.rule.as_str())
    }) {
        let _ = match r.rule.as_str() {
            // What the engine itself did about timers and dates, not a rule's result.
            TIMER_RULE | LIFECYCLE_RULE => writeln!(out, "  {}: {}", r.rule, r.result),
            NORMALISED_RULE => writeln!(out, "  compared in normalised form: {}", r.result),
            FUZZY_RULE => writeln!(out, "  fuzzy candidates: {}", r.result),
            _ => writeln!(
                out,
                "  {} rule ({}) returned {}",
                r.rule, r.script, r.result
            ),
        };
    }
    // An operator's decision runs no correlation: its situation is what the operator found.
    let correlated = d.op != Op::Operator
        && d.op != Op::Timer
        && matches!(
            d.situation,
            Some(Situation::Unlinked | Situation::Unmatched | Situation::Disputed)
        );
    if correlated || !d.candidates.is_empty() {
        if d.candidates.is_empty() {
            let _ = writeln!(out, "  candidates: none");
        } else {
            let _ = writeln!(out, "  candidates: {}", d.candidates.join(", "));
            let dropped: Vec<&str> = d
                .candidates
                .iter()
                .filter(|c| !d.confirmed.contains(c))
                .map(String::as_str)
                .collect();
            if !dropped.is_empty() {
                let _ = writeln!(out, "  dropped by confirmation: {}", dropped.join(", "));
            }
        }
    }
    let _ = writeln!(out, "  situation: {situation}");
    let _ = write!(out, "  action: {}", d.action);
    if let Some(i) = &d.identity {
        let _ = write!(out, " (identity {i})");
    }
    out.push('\n');
    if !d.changes.is_empty() {
        let _ = writeln!(out, "  changes:");
        for c in &d.changes {
            let _ = writeln!(out, "    {}", change(c));
        }
    } else if matches!(d.action, Action::Updated | Action::Linked) {
        let _ = writeln!(out, "  changes: none");
    }
    for a in d.rules.iter().filter(|o| o.rule == AUTHORITY_RULE) {
        let _ = writeln!(out, "  authority: {}", a.result);
    }
    for w in d.rules.iter().filter(|o| o.rule == WORK_ITEM_RULE) {
        let _ = writeln!(out, "  work item: {}", w.result);
    }
    for n in d.rules.iter().filter(|o| o.rule == NOTIFICATION_RULE) {
        let _ = writeln!(out, "  notification queued ({}): {}", n.script, n.result);
    }
    if let Some(e) = &d.error {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

/// `3 events; situations: unmatched 2, linked 1; actions: created 2, updated 1;
/// failures: failed 0, rejected 0` (a group with nothing in it is left out, but failures).
pub fn describe(r: &BatchReport) -> String {
    let situations: Vec<String> = Situation::ALL
        .iter()
        .filter_map(|s| r.situations.get(s).map(|n| format!("{s} {n}")))
        .collect();
    let actions: Vec<String> = r
        .actions
        .iter()
        .filter(|(a, _)| **a != Action::Failed)
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    let mut out = format!("{} events", r.events());
    if !situations.is_empty() {
        out.push_str("; situations: ");
        out.push_str(&situations.join(", "));
    }
    if !actions.is_empty() {
        out.push_str("; actions: ");
        out.push_str(&actions.join(", "));
    }
    out.push_str(&format!(
        "; failures: failed {}, rejected {}",
        r.failed, r.rejected
    ));
    out
}
