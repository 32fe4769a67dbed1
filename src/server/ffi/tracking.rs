//! Client-side caching: whether a client tracks keys, and the invalidation that is a notice (commands/notice.rs).

use std::ffi::c_int;
use std::ptr;

use redis_module::raw;

use super::*;

/// Tells the server a key was modified, without touching it: clients tracking the key get an
/// invalidation (the notice). Nothing is written, replicated or counted as a keyspace event.
pub fn signal_key_modified(key: &str) {
    if !module_ctx_ready() {
        return;
    }
    let ctx = module_ctx();
    // SAFETY: the module context is live between load and unload and has a client with a
    // selected database; the string is created and freed with that context, and the server
    // copies the key before the call returns.
    unsafe {
        let name = raw::RedisModule_CreateString.unwrap()(ctx.ctx, key.as_ptr().cast(), key.len());
        if name.is_null() {
            count_failure("creating a notice key");
            return;
        }
        raw::RedisModule_SignalModifiedKey.unwrap()(ctx.ctx, name);
        raw::RedisModule_FreeString.unwrap()(ctx.ctx, name);
    }
}

/// Whether the client has `CLIENT TRACKING` on (any mode).
pub fn client_is_tracking(client_id: u64) -> bool {
    // SAFETY: the structure is plain integers and bytes, for which all zeroes is valid.
    let mut info: raw::RedisModuleClientInfo = unsafe { std::mem::zeroed() };
    info.version = 1;
    // SAFETY: `info` is a version-1 structure the server fills for a known id; the call only
    // writes into it.
    let status = unsafe {
        raw::RedisModule_GetClientInfoById.unwrap()(ptr::addr_of_mut!(info).cast(), client_id)
    };
    status == raw::REDISMODULE_OK as c_int
        && info.flags & u64::from(raw::REDISMODULE_CLIENTINFO_FLAG_TRACKING) != 0
}
