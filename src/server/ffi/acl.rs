//! ACL: whether the server has the ACL check API, and command categories.

use std::ffi::{CStr, c_int};

use redis_module::{Context, raw};

// ---------------------------------------------------------------------------------------------
// ACL.

pub fn acl_api_present() -> bool {
    // SAFETY (each read): copies of function-pointer statics filled in by RedisModule_Init.
    let present = [
        unsafe { raw::RedisModule_GetClientUserNameById }.is_some(),
        unsafe { raw::RedisModule_GetModuleUserFromUserName }.is_some(),
        unsafe { raw::RedisModule_ACLCheckCommandPermissions }.is_some(),
        unsafe { raw::RedisModule_FreeModuleUser }.is_some(),
    ];
    present.iter().all(|p| *p)
}

/// Puts a module command in ACL categories, where the server can (Valkey, Redis 7.2+).
/// `Ok(false)`: this server has no such API (Redis 7.0).
pub fn set_command_categories(
    ctx: &Context,
    command: &CStr,
    categories: &CStr,
) -> Result<bool, String> {
    // SAFETY: copies of function-pointer statics filled in by RedisModule_Init.
    let (Some(get_command), Some(set_categories)) =
        (unsafe { raw::RedisModule_GetCommand }, unsafe {
            raw::RedisModule_SetCommandACLCategories
        })
    else {
        return Ok(false);
    };
    // SAFETY: `ctx` is the OnLoad context and both strings are NUL-terminated constants.
    let status = unsafe {
        let handle = get_command(ctx.ctx, command.as_ptr());
        if handle.is_null() {
            return Err(format!("no command {}", command.to_string_lossy()));
        }
        set_categories(handle, categories.as_ptr())
    };
    if status == raw::REDISMODULE_OK as c_int {
        Ok(true)
    } else {
        Err(format!(
            "the server refused ACL categories for {}",
            command.to_string_lossy()
        ))
    }
}
