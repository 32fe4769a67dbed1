//! Every raw module-API call the crate does not wrap, in this folder (one file per job), each
//! with the reason it is sound; the only home of `unsafe` in the module.
//!
//! Everything here runs on the server's main thread: commands, server events, timers, INFO and
//! config callbacks are all called by the server with its global lock held.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a callback the server calls finds the module's handler for it: a plain function
/// pointer behind a lock, so no pointer casts are needed and an unset slot is simply `None`.
pub struct HandlerSlot<F: Copy>(Mutex<Option<F>>);

impl<F: Copy> Default for HandlerSlot<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Copy> HandlerSlot<F> {
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    pub fn set(&self, handler: Option<F>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = handler;
    }

    pub fn get(&self) -> Option<F> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Failures of server calls that have no caller to report to (a wake-up that could not be
/// armed, an event-loop removal the server refused); INFO shows the count as `ffi_errors`.
pub static FFI_ERRORS: AtomicU64 = AtomicU64::new(0);

fn count_failure(what: &str) {
    FFI_ERRORS.fetch_add(1, Ordering::Relaxed);
    log(
        &module_ctx(),
        LogLevel::Warning,
        &format!("maxage: {what} failed: {}", std::io::Error::last_os_error()),
    );
}

/// Runs `body`, turning a panic into `fallback` so it never unwinds into the server (which would
/// abort it). The panic message goes to the server log.
pub fn no_unwind<T>(what: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            log(
                &module_ctx(),
                LogLevel::Warning,
                &format!("maxage: internal error in {what}: {message}"),
            );
            fallback
        }
    }
}

/// Milliseconds from `CLOCK_MONOTONIC`: NTP steps and wall-clock jumps do not move it, so they
/// cannot make a connection look old. (`RedisModule_Microseconds` is missing on Redis 7.0.)
pub fn monotonic_ms() -> u64 {
    monotonic_us() / 1000
}

/// The current millisecond rounded up: a connect time taken with it is never earlier than the
/// real one, so a deadline computed from it is never early.
pub fn monotonic_ms_ceil() -> u64 {
    monotonic_us().div_ceil(1000)
}

pub fn monotonic_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1000
}

mod acl;
mod clients;
mod command_docs;
mod context;
mod event_loop;
mod filters;
mod replies;
mod server_info;
mod settings;
mod tracking;
mod wakeups;

pub use acl::*;
pub use clients::*;
pub use command_docs::*;
pub use context::*;
pub use event_loop::*;
pub use filters::*;
pub use replies::*;
pub use server_info::*;
pub use settings::*;
pub use tracking::*;
pub use wakeups::*;
