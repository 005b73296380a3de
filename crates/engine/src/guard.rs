//! The crash guard: what the engine tells about the event in hand, so that an event that
//! kills the process can be traced to it on the next start and isolated (the agent keeps
//! the trace in a file beside the repository; the engine does no IO of its own). A
//! lifecycle timer's firing is told as an event of op `timer` (module `timers`).

use idsync_core::ChangeEvent;

/// Watches the events an engine decides. Called on the engine's thread, in order:
/// `before` an event, `after` it, `idle` once no event of the batch (or retry) is being
/// decided any more.
pub trait CrashGuard {
    /// `event` is about to be decided. `Some(n)`: it crashed the process `n` times while
    /// being decided, often enough to be isolated: the engine records it as a failed
    /// event without running any rule (and does not call `after`).
    fn before(&self, event: &ChangeEvent) -> Option<u32>;
    /// `event` was decided: `ok` without error.
    fn after(&self, event: &ChangeEvent, ok: bool);
    /// No event is being decided any more.
    fn idle(&self);
    /// `event` was isolated and will not come again as it is (a timer's firing, put off
    /// with one more attempt, is another event to the guard): nothing needs to be kept of
    /// it.
    fn forget(&self, _event: &ChangeEvent) {}
}
