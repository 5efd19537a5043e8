//! Panic containment: one connection's panic must not take the worker's
//! other connections with it. [`guarded`] runs a piece of a session's
//! handling (a step, a timeout, hooks) and turns a panic into a value with
//! its message and `file:line`, which the engine logs before closing that
//! one connection. [`install_panic_hook`] (once per process, by the
//! worker) makes a panic inside `guarded` recorded for the caller instead
//! of printed to stderr (a daemon's stderr is /dev/null; the error log is
//! where operators look).

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A panic caught by [`guarded`]: its message and `file:line`.
pub(super) struct Panic {
    pub(super) message: String,
    pub(super) location: String,
}

thread_local! {
    /// Inside [`guarded`]: the panic hook records the panic for the caller.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<Panic>> = const { RefCell::new(None) };
}

/// Chains a hook before the default one that records panics inside
/// [`guarded`] (the payload of `catch_unwind` has no location).
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(Cell::get) {
            return default(info);
        }
        let p = info.payload();
        let message = match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
            (Some(m), _) => (*m).to_string(),
            (None, Some(m)) => m.clone(),
            (None, None) => "(no message)".to_string(),
        };
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|l| *l.borrow_mut() = Some(Panic { message, location }));
    }));
}

/// Runs `f`, catching a panic. `AssertUnwindSafe`: after a panic the
/// caller throws away the one session `f` worked on; the engine's shared
/// state is left consistent by construction (slab entries and counters
/// are released by closing that session, and backend connections it owned
/// are found by their owner).
pub(super) fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    let outer = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    r.map_err(|_| {
        LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .unwrap_or(Panic { message: "(unknown)".to_string(), location: String::new() })
    })
}
