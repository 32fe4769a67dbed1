//! The module's own long-lived context, and logging through it.

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use redis_module::{Context, raw};

// ---------------------------------------------------------------------------------------------
// The module's own long-lived context.

static MODULE_CTX: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(ptr::null_mut());

/// Keeps a detached context for work that arrives without one (config callbacks, logging from
/// deep inside the logic). It is only used on the main thread, with the server lock held.
pub fn init_module_ctx(ctx: &Context) {
    // SAFETY: `ctx` is the OnLoad context; GetDetachedThreadSafeContext exists since Redis 6.2.
    let detached = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.ctx) };
    let previous = MODULE_CTX.swap(detached, Ordering::AcqRel);
    free_detached(previous);
}

pub fn release_module_ctx() {
    free_detached(MODULE_CTX.swap(ptr::null_mut(), Ordering::AcqRel));
    free_detached(crate_detached_ctx().swap(ptr::null_mut(), Ordering::AcqRel));
}

// The `redis_module!` macro of redis-module 2.0.8 gives the crate a detached context at every
// load and never frees it: about 17 KB (a fake client and its reply buffer) per MODULE LOAD /
// MODULE UNLOAD cycle. `DetachedContext` is one `AtomicPtr` (checked below for the pinned
// version), so the module frees it on unload and clears it.
const _: () = assert!(
    std::mem::size_of::<redis_module::DetachedContext>()
        == std::mem::size_of::<AtomicPtr<raw::RedisModuleCtx>>()
);

fn crate_detached_ctx() -> &'static AtomicPtr<raw::RedisModuleCtx> {
    // SAFETY: `DetachedContext` in redis-module =2.0.8 is `struct { ctx: AtomicPtr<RedisModuleCtx> }`
    // (the size assertion above guards the layout); the static lives for the whole program.
    unsafe {
        &*(ptr::addr_of!(redis_module::MODULE_CONTEXT).cast::<AtomicPtr<raw::RedisModuleCtx>>())
    }
}

fn free_detached(ctx: *mut raw::RedisModuleCtx) {
    if !ctx.is_null() {
        // SAFETY: `ctx` came from GetDetachedThreadSafeContext and is freed exactly once (swapped out).
        unsafe { raw::RedisModule_FreeThreadSafeContext.unwrap()(ctx) };
    }
}

/// Whether `init_module_ctx` has run (config callbacks also fire before the module's init).
pub fn module_ctx_ready() -> bool {
    !MODULE_CTX.load(Ordering::Acquire).is_null()
}

/// The module's own context (null before load and after unload; logging accepts that).
pub fn module_ctx() -> Context {
    Context::new(MODULE_CTX.load(Ordering::Acquire))
}

// ---------------------------------------------------------------------------------------------
// Logging.

#[derive(Clone, Copy)]
pub enum LogLevel {
    Verbose,
    Notice,
    Warning,
}

pub fn log(ctx: &Context, level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Verbose => c"verbose",
        LogLevel::Notice => c"notice",
        LogLevel::Warning => c"warning",
    };
    // Interior NULs cannot come from the server's own strings; replace them rather than fail.
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: the format is a constant "%s" with one matching C-string argument, so nothing in
    // the message is ever read as a format directive. A null ctx logs as "the module" on both servers.
    unsafe {
        raw::RedisModule_Log.unwrap()(ctx.ctx, level.as_ptr(), c"%s".as_ptr(), message.as_ptr())
    };
}
