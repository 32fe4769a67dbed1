//! Command filters: the CLIENT KILL compatibility filter and the next-command filter (Redis 8 I/O threads).

use std::ffi::c_int;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use redis_module::{Context, raw};

use super::*;

// ---------------------------------------------------------------------------------------------
// Command filter: sees every command before the server runs it (and before ACL is checked).

/// Gets the filter arguments of a `CLIENT KILL` (everything after `KILL`) and returns the command
/// name to rewrite `argv[0]` to, if any.
pub type ClientKillHandler = fn(filters: &[&[u8]]) -> Option<&'static str>;

static FILTER_HANDLER: HandlerSlot<ClientKillHandler> = HandlerSlot::new();
static FILTER: AtomicPtr<raw::RedisModuleCommandFilter> = AtomicPtr::new(ptr::null_mut());

/// Reads argument `pos` of the filtered command.
///
/// # Safety
/// `fctx` must be the live filter context and `pos` below its argument count; the slice must
/// not outlive the filter callback or any replacement of that argument.
unsafe fn filter_arg<'a>(fctx: *mut raw::RedisModuleCommandFilterCtx, pos: c_int) -> &'a [u8] {
    // SAFETY: as the function's contract says.
    unsafe {
        let arg = raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, pos);
        let mut len = 0usize;
        let bytes = raw::RedisModule_StringPtrLen.unwrap()(arg, &mut len);
        std::slice::from_raw_parts(bytes.cast::<u8>(), len)
    }
}

unsafe extern "C" fn on_command(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    // This runs for every command the server receives: the common case must stay two calls
    // and a length check.
    no_unwind("command filter", (), || {
        // SAFETY: `fctx` is the live filter context for the duration of this callback.
        let count = unsafe { raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx) };
        // Only the new-style form (CLIENT KILL and two or more arguments) is ever handled.
        if count < 4 {
            return;
        }
        // SAFETY: positions 0 and 1 are below `count`.
        let (name, subcommand) = unsafe { (filter_arg(fctx, 0), filter_arg(fctx, 1)) };
        if !name.eq_ignore_ascii_case(b"client") || !subcommand.eq_ignore_ascii_case(b"kill") {
            return;
        }
        let Some(handler) = FILTER_HANDLER.get() else {
            return;
        };
        // SAFETY: every position is below `count`; the slices are dropped before the replace.
        let filters: Vec<&[u8]> = (2..count)
            .map(|pos| unsafe { filter_arg(fctx, pos) })
            .collect();
        let rewrite_to = handler(&filters);
        drop(filters);
        if let Some(command) = rewrite_to {
            // SAFETY: on success the new string is handed to the server, which owns and frees
            // it; on failure it is still ours and freed here.
            unsafe {
                let replacement = raw::RedisModule_CreateString.unwrap()(
                    ptr::null_mut(),
                    command.as_ptr().cast(),
                    command.len(),
                );
                if raw::RedisModule_CommandFilterArgReplace.unwrap()(fctx, 0, replacement)
                    != raw::REDISMODULE_OK as c_int
                {
                    raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), replacement);
                    FFI_ERRORS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The next-command filter (Redis 8 with I/O threads): tells the module which client is about
// to run a command, while clients wait to be closed inside their next command.

/// Gets the id of the client about to run a command and the command's name; true: the command
/// must not run (it is renamed to `REFUSED_COMMAND`, which the server answers with an error).
pub type NextCommandHandler = fn(client_id: u64, command: &[u8]) -> bool;

/// What a refused command is renamed to: no such command exists, so the server runs nothing.
const REFUSED_COMMAND: &str = "maxage-connection-closed";

static NEXT_COMMAND_HANDLER: HandlerSlot<NextCommandHandler> = HandlerSlot::new();
/// Whether any client waits for its next command: while none does (nearly always), the filter
/// costs every command one atomic load.
static NEXT_COMMAND_WATCHED: AtomicBool = AtomicBool::new(false);
static NEXT_COMMAND_FILTER: AtomicPtr<raw::RedisModuleCommandFilter> =
    AtomicPtr::new(ptr::null_mut());

unsafe extern "C" fn on_next_command(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if !NEXT_COMMAND_WATCHED.load(Ordering::Relaxed) {
        return;
    }
    no_unwind("next-command filter", (), || {
        // SAFETY: `fctx` is the live filter context; the API's presence was checked before
        // the filter was registered; position 0 exists (the server never filters an empty
        // command).
        let (client_id, count) = unsafe {
            (
                raw::RedisModule_CommandFilterGetClientId.unwrap()(fctx),
                raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx),
            )
        };
        if count < 1 {
            return;
        }
        // SAFETY: position 0 is below `count`; the slice is not kept past this call.
        let command = unsafe { filter_arg(fctx, 0) };
        let refuse = NEXT_COMMAND_HANDLER
            .get()
            .is_some_and(|handler| handler(client_id, command));
        if refuse {
            // SAFETY: on success the new string is handed to the server, which owns and frees
            // it; on failure it is still ours and freed here. `command` is not used after.
            unsafe {
                let replacement = raw::RedisModule_CreateString.unwrap()(
                    ptr::null_mut(),
                    REFUSED_COMMAND.as_ptr().cast(),
                    REFUSED_COMMAND.len(),
                );
                if raw::RedisModule_CommandFilterArgReplace.unwrap()(fctx, 0, replacement)
                    != raw::REDISMODULE_OK as c_int
                {
                    raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), replacement);
                    FFI_ERRORS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// Whether a command filter can tell which client sent the command (Redis 7.4+, Valkey).
pub fn filter_client_id_api_present() -> bool {
    // SAFETY: a copy of a function-pointer static filled in by RedisModule_Init.
    unsafe { raw::RedisModule_CommandFilterGetClientId }.is_some()
}

/// Registers the next-command filter (once; it skips the module's own calls).
pub fn register_next_command_filter(ctx: &Context, handler: NextCommandHandler) -> bool {
    NEXT_COMMAND_HANDLER.set(Some(handler));
    register_filter(ctx, &NEXT_COMMAND_FILTER, on_next_command)
}

pub fn next_command_filter_registered() -> bool {
    !NEXT_COMMAND_FILTER.load(Ordering::Acquire).is_null()
}

/// Removes the next-command filter if it is registered (unload, refused load).
pub fn unregister_next_command_filter(ctx: &Context) {
    NEXT_COMMAND_WATCHED.store(false, Ordering::Relaxed);
    NEXT_COMMAND_HANDLER.set(None);
    unregister_filter(
        ctx,
        &NEXT_COMMAND_FILTER,
        "unregistering the next-command filter",
    );
}

/// Turns the next-command filter's work on while some client waits for its next command.
pub fn watch_next_commands(watch: bool) {
    NEXT_COMMAND_WATCHED.store(watch, Ordering::Relaxed);
}

/// Whether the client is inside MULTI (its commands are queued, not run).
pub fn client_in_transaction(client_id: u64) -> bool {
    // SAFETY: the structure is plain integers and bytes, for which all zeroes is valid.
    let mut info: raw::RedisModuleClientInfo = unsafe { std::mem::zeroed() };
    info.version = 1;
    // SAFETY: `info` is a version-1 structure the server fills for a known id; the call only
    // writes into it.
    let status = unsafe {
        raw::RedisModule_GetClientInfoById.unwrap()(ptr::addr_of_mut!(info).cast(), client_id)
    };
    status == raw::REDISMODULE_OK as c_int
        && info.flags & u64::from(raw::REDISMODULE_CLIENTINFO_FLAG_MULTI) != 0
}

/// Registers the `CLIENT KILL` filter once; it skips the module's own `RM_Call`s (NOSELF).
pub fn register_client_kill_filter(ctx: &Context, handler: ClientKillHandler) -> bool {
    FILTER_HANDLER.set(Some(handler));
    register_filter(ctx, &FILTER, on_command)
}

type FilterCallback = unsafe extern "C" fn(*mut raw::RedisModuleCommandFilterCtx);

/// Registers `callback` as a command filter into `slot`, once; it skips the module's own
/// `RM_Call`s (NOSELF). False if the server refused it.
fn register_filter(
    ctx: &Context,
    slot: &AtomicPtr<raw::RedisModuleCommandFilter>,
    callback: FilterCallback,
) -> bool {
    if !slot.load(Ordering::Acquire).is_null() {
        return true;
    }
    // SAFETY: `ctx` is the OnLoad context or the module's detached one (a CONFIG SET), both
    // carrying the module the filter belongs to; `callback` has the signature the server calls.
    let filter = unsafe {
        raw::RedisModule_RegisterCommandFilter.unwrap()(
            ctx.ctx,
            Some(callback),
            raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
        )
    };
    slot.store(filter, Ordering::Release);
    !filter.is_null()
}

/// Removes the filter in `slot` if one is registered.
fn unregister_filter(
    ctx: &Context,
    slot: &AtomicPtr<raw::RedisModuleCommandFilter>,
    failure: &'static str,
) {
    let filter = slot.swap(ptr::null_mut(), Ordering::AcqRel);
    if !filter.is_null() {
        // SAFETY: `filter` was returned by RegisterCommandFilter for this module, removed once.
        let status = unsafe { raw::RedisModule_UnregisterCommandFilter.unwrap()(ctx.ctx, filter) };
        if status != raw::REDISMODULE_OK as c_int {
            count_failure(failure);
        }
    }
}

pub fn client_kill_filter_registered() -> bool {
    !FILTER.load(Ordering::Acquire).is_null()
}

/// Removes the filter if it is registered.
pub fn unregister_client_kill_filter(ctx: &Context) {
    FILTER_HANDLER.set(None);
    unregister_filter(ctx, &FILTER, "unregistering the CLIENT KILL filter");
}
