//! What the server is and says about itself: version, cluster, the caller's protocol, INFO fields, the module API it lacks.

use std::ffi::{CStr, CString, c_int};
use std::ptr;

use redis_module::{Context, raw};

/// The server's version as `0x00MMmmpp` (0 if the server cannot say).
pub fn server_version() -> u32 {
    // SAFETY: the function-pointer static was filled in by RedisModule_Init; the call reads a
    // constant.
    match unsafe { raw::RedisModule_GetServerVersion } {
        // SAFETY: as above.
        Some(version) => u32::try_from(unsafe { version() }).unwrap_or(0),
        None => 0,
    }
}

/// Whether this server is a Redis Cluster node.
pub fn cluster_enabled(ctx: &Context) -> bool {
    // SAFETY: `ctx` is a live module context.
    let flags = unsafe { raw::RedisModule_GetContextFlags.unwrap()(ctx.ctx) };
    flags as u64 & u64::from(raw::REDISMODULE_CTX_FLAGS_CLUSTER) != 0
}

/// Whether the client running the current command speaks RESP3 (and so can receive pushes).
pub fn caller_speaks_resp3(ctx: &Context) -> bool {
    // SAFETY: `ctx` is the context the server passed to the running command.
    let flags = unsafe { raw::RedisModule_GetContextFlags.unwrap()(ctx.ctx) };
    flags as u64 & u64::from(raw::REDISMODULE_CTX_FLAGS_RESP3) != 0
}

/// `tracking_clients` from `INFO clients`: how many clients have `CLIENT TRACKING` on.
pub fn tracking_clients(ctx: &Context) -> u64 {
    // SAFETY: `ctx` is a live module context; the info data is freed before returning and the
    // field name is a constant C string.
    unsafe {
        let info = raw::RedisModule_GetServerInfo.unwrap()(ctx.ctx, c"clients".as_ptr());
        if info.is_null() {
            return u64::MAX;
        }
        let mut failed: c_int = 0;
        let count = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(
            info,
            c"tracking_clients".as_ptr(),
            &mut failed,
        );
        raw::RedisModule_FreeServerInfo.unwrap()(ctx.ctx, info);
        // Unknown: assume there may be some.
        if failed != 0 { u64::MAX } else { count }
    }
}

/// Reads fields of one INFO section (`RM_GetServerInfo`): `read` gets a lookup that returns a
/// field's text, or `None` if the section has no such field. `None` if the server built no
/// section. Main thread only (the server builds the section there), as everything here.
pub fn read_server_info<T>(
    section: &CStr,
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> T,
) -> Option<T> {
    // SAFETY: a NULL context is allowed (the data is then not auto-freed, and is freed below
    // with a NULL context, as the API asks); the section name is a valid C string.
    let info =
        unsafe { raw::RedisModule_GetServerInfo.unwrap()(ptr::null_mut(), section.as_ptr()) };
    if info.is_null() {
        return None;
    }
    let field = |name: &str| {
        let name = CString::new(name).ok()?;
        // SAFETY: `info` lives until the FreeServerInfo below, after the last use of this
        // closure; the returned text (NULL if there is no such field) belongs to `info` and
        // is copied at once.
        unsafe {
            let text = raw::RedisModule_ServerInfoGetFieldC.unwrap()(info, name.as_ptr());
            (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    };
    let value = read(&field);
    // SAFETY: `info` came from GetServerInfo with a NULL context and is freed once.
    unsafe { raw::RedisModule_FreeServerInfo.unwrap()(ptr::null_mut(), info) };
    Some(value)
}

/// The first module API this module needs that the server lacks, if any (checked at load).
pub fn missing_api() -> Option<&'static str> {
    // Detect, never assume: each of these is needed and each is missing on some servers.
    // SAFETY (each read): the function-pointer statics were filled in by RedisModule_Init.
    let required = [
        (
            "DeauthenticateAndCloseClient",
            unsafe { raw::RedisModule_DeauthenticateAndCloseClient }.is_some(),
        ),
        (
            "SubscribeToServerEvent",
            unsafe { raw::RedisModule_SubscribeToServerEvent }.is_some(),
        ),
        (
            "SetCommandInfo",
            unsafe { raw::RedisModule_SetCommandInfo }.is_some(),
        ),
        (
            "GetDetachedThreadSafeContext",
            unsafe { raw::RedisModule_GetDetachedThreadSafeContext }.is_some(),
        ),
        (
            "EventLoopAdd",
            unsafe { raw::RedisModule_EventLoopAdd }.is_some(),
        ),
    ];
    required
        .iter()
        .find(|(_, present)| !present)
        .map(|(name, _)| *name)
}
