//! The enforcement policy's state (`STATE`) and the audit cap (`AUDIT`), confined to the server's
//! main thread, and the cell type the module's other main-thread statics use (the wake-up in
//! enforcement.rs, the kill queue in retire.rs, the redirect cache in server_view.rs, the
//! native-support probe in compat.rs).

use std::cell::RefCell;

use lazy_static::lazy_static;

use crate::policy::audit::AuditLimiter;
use crate::policy::config;
use crate::policy::decisions::Policy;
use crate::policy::schedule::mix64;
use crate::server::ffi::{monotonic_ms, monotonic_us};

/// A `RefCell` that may sit in a `static` because only the server's main thread touches it.
///
/// Every module entry point (commands, server events, timers, INFO, config callbacks) is called
/// by the server on its main thread with the global lock held, so there is never a second
/// thread; lookups therefore need no mutex or atomic read-modify-write. A re-entrant borrow
/// (which the async close path rules out) is refused instead of aliasing.
pub struct MainThreadCell<T>(RefCell<T>);

// SAFETY: see the type's comment: the value is only ever reached from the server's main thread.
unsafe impl<T> Sync for MainThreadCell<T> {}
// SAFETY: as above; the value never moves between threads.
unsafe impl<T> Send for MainThreadCell<T> {}

impl<T> MainThreadCell<T> {
    pub fn new(value: T) -> Self {
        Self(RefCell::new(value))
    }

    /// Runs `body` with the value; `None` if it is already borrowed further up the stack.
    pub fn with<R>(&self, body: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.0
            .try_borrow_mut()
            .ok()
            .map(|mut value| body(&mut value))
    }
}

/// A policy with the current settings and no clients. The jitter seed differs per load (and
/// per reload after `MODULE UNLOAD`) so that a fleet restarted together does not retire its
/// clients in lockstep.
pub fn fresh_policy() -> Policy {
    Policy::new(
        config::snapshot(),
        mix64(monotonic_us() ^ u64::from(std::process::id())),
        monotonic_ms(),
    )
}

lazy_static! {
    /// The registry and the enforcement policy.
    pub static ref STATE: MainThreadCell<Policy> = MainThreadCell::new(fresh_policy());

    /// The per-second cap on audit lines, apart from the policy: it decides what is logged,
    /// never who is retired.
    pub static ref AUDIT: MainThreadCell<AuditLimiter> = MainThreadCell::new(AuditLimiter::default());
}
