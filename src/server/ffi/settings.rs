//! The module's settings, registered with the server from the settings table (policy/config.rs).

use std::ffi::{CString, c_char, c_int, c_longlong, c_void};
use std::ptr;
use std::sync::Mutex;

use redis_module::{Context, raw};

use crate::policy::config::{self, Kind, SETTINGS, Value};

use super::*;

// ---------------------------------------------------------------------------------------------
// Settings. The module registers them itself rather than through the crate's macro: the
// crate's callbacks turn values and errors into C strings with `unwrap`, so a NUL byte from
// CONFIG SET or a load argument aborted the server, and it cannot make load arguments the
// registered defaults. The private data of each setting is its position in `SETTINGS`.

/// Called after a setting changed (CONFIG SET, or the config file before the module's init).
pub type SettingsChangedHandler = fn();

static SETTINGS_CHANGED: HandlerSlot<SettingsChangedHandler> = HandlerSlot::new();

/// The last string each string setting handed to the server: the server copies it at once,
/// and the module owns it, so it is freed on the next read of the same setting.
struct HandedOut([*mut raw::RedisModuleString; SETTINGS.len()]);
// SAFETY: only touched on the main thread (config callbacks); the lock makes the static legal.
unsafe impl Send for HandedOut {}
static HANDED_OUT: Mutex<HandedOut> = Mutex::new(HandedOut([ptr::null_mut(); SETTINGS.len()]));

fn setting_index(privdata: *mut c_void) -> usize {
    privdata as usize
}

/// Stores a value the server hands over; on refusal sets `*err` to the reason.
fn store_setting(index: usize, value: Value, err: *mut *mut raw::RedisModuleString) -> c_int {
    match config::set(index, value) {
        Ok(()) => {
            if let Some(changed) = SETTINGS_CHANGED.get() {
                changed();
            }
            raw::REDISMODULE_OK as c_int
        }
        Err(why) => refuse_setting(err, &why),
    }
}

fn refuse_setting(err: *mut *mut raw::RedisModuleString, why: &str) -> c_int {
    if !err.is_null() {
        // SAFETY: the server passes a valid out-pointer and frees the string it gets;
        // CreateString copies `why` with its length, so any byte is fine.
        unsafe {
            *err = raw::RedisModule_CreateString.unwrap()(
                ptr::null_mut(),
                why.as_ptr().cast(),
                why.len(),
            );
        }
    }
    raw::REDISMODULE_ERR as c_int
}

unsafe extern "C" fn get_number(_name: *const c_char, privdata: *mut c_void) -> c_longlong {
    no_unwind("CONFIG GET", 0, || {
        match config::get(setting_index(privdata)) {
            Some(Value::Number(n)) => n,
            _ => 0,
        }
    })
}

unsafe extern "C" fn set_number(
    _name: *const c_char,
    value: c_longlong,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Number(value), err)
    })
}

unsafe extern "C" fn get_flag(_name: *const c_char, privdata: *mut c_void) -> c_int {
    no_unwind("CONFIG GET", 0, || {
        c_int::from(config::get(setting_index(privdata)) == Some(Value::Flag(true)))
    })
}

unsafe extern "C" fn set_flag(
    _name: *const c_char,
    value: c_int,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Flag(value != 0), err)
    })
}

unsafe extern "C" fn get_choice(_name: *const c_char, privdata: *mut c_void) -> c_int {
    no_unwind("CONFIG GET", 0, || {
        match config::get(setting_index(privdata)) {
            Some(Value::Choice(i)) => i,
            _ => 0,
        }
    })
}

unsafe extern "C" fn set_choice(
    _name: *const c_char,
    value: c_int,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Choice(value), err)
    })
}

unsafe extern "C" fn get_text(
    _name: *const c_char,
    privdata: *mut c_void,
) -> *mut raw::RedisModuleString {
    no_unwind("CONFIG GET", ptr::null_mut(), || {
        let index = setting_index(privdata);
        let text = match config::get(index) {
            Some(Value::Text(text)) => text,
            _ => String::new(),
        };
        // SAFETY: CreateString copies `text` with its length (no C string is involved);
        // the previous string of this setting was copied by the server when it was handed out.
        unsafe {
            let string = raw::RedisModule_CreateString.unwrap()(
                ptr::null_mut(),
                text.as_ptr().cast(),
                text.len(),
            );
            let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = handed_out.0.get_mut(index) {
                let previous = std::mem::replace(slot, string);
                if !previous.is_null() {
                    raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), previous);
                }
            }
            string
        }
    })
}

unsafe extern "C" fn set_text(
    _name: *const c_char,
    value: *mut raw::RedisModuleString,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        let mut len = 0usize;
        // SAFETY: `value` is the server's string for the duration of this call.
        let bytes = unsafe {
            let pointer = raw::RedisModule_StringPtrLen.unwrap()(value, &mut len);
            std::slice::from_raw_parts(pointer.cast::<u8>(), len)
        };
        match std::str::from_utf8(bytes) {
            Ok(text) => store_setting(setting_index(privdata), Value::Text(text.to_string()), err),
            Err(_) => refuse_setting(err, "the value is not valid UTF-8"),
        }
    })
}

/// Registers every setting of `SETTINGS` with `defaults` (from the load arguments) and loads
/// the values the config file gives; `changed` runs after each later change.
pub fn register_settings(
    ctx: &Context,
    defaults: &[Value],
    changed: SettingsChangedHandler,
) -> Result<(), String> {
    // Values set while loading (the defaults, the config file) are applied by the caller once.
    SETTINGS_CHANGED.set(None);
    for (index, def) in SETTINGS.iter().enumerate() {
        let name = CString::new(def.name).map_err(|_| "bad setting name".to_string())?;
        let privdata = index as *mut c_void;
        let flags = raw::REDISMODULE_CONFIG_DEFAULT;
        let default = defaults
            .get(index)
            .cloned()
            .unwrap_or_else(|| def.kind.default_value());
        // SAFETY: `ctx` is the OnLoad context; `name` and the defaults are copied by the server;
        // every callback has the signature the server calls for its kind.
        let status = unsafe {
            match (def.kind, default) {
                (Kind::Number { min, max, .. }, Value::Number(n)) => {
                    raw::RedisModule_RegisterNumericConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        n,
                        flags,
                        min,
                        max,
                        Some(get_number),
                        Some(set_number),
                        None,
                        privdata,
                    )
                }
                (Kind::Text { .. }, Value::Text(text)) => {
                    let text = CString::new(text).map_err(|_| "bad default".to_string())?;
                    raw::RedisModule_RegisterStringConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        text.as_ptr(),
                        flags,
                        Some(get_text),
                        Some(set_text),
                        None,
                        privdata,
                    )
                }
                (Kind::Flag { .. }, Value::Flag(on)) => raw::RedisModule_RegisterBoolConfig
                    .unwrap()(
                    ctx.ctx,
                    name.as_ptr(),
                    c_int::from(on),
                    flags,
                    Some(get_flag),
                    Some(set_flag),
                    None,
                    privdata,
                ),
                (Kind::Choice { options, .. }, Value::Choice(position)) => {
                    let names: Vec<CString> = options
                        .iter()
                        .map(|option| CString::new(*option).unwrap_or_default())
                        .collect();
                    let mut name_pointers: Vec<*const c_char> =
                        names.iter().map(|n| n.as_ptr()).collect();
                    let values: Vec<c_int> = (0..options.len() as c_int).collect();
                    raw::RedisModule_RegisterEnumConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        position,
                        flags,
                        name_pointers.as_mut_ptr(),
                        values.as_ptr(),
                        options.len() as c_int,
                        Some(get_choice),
                        Some(set_choice),
                        None,
                        privdata,
                    )
                }
                _ => {
                    return Err(format!(
                        "setting {} has a default of the wrong kind",
                        def.name
                    ));
                }
            }
        };
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!(
                "the server refused the setting maxage.{}",
                def.name
            ));
        }
    }
    // SAFETY: `ctx` is the OnLoad context, after every setting is registered.
    let loaded = unsafe { raw::RedisModule_LoadConfigs.unwrap()(ctx.ctx) };
    if loaded != raw::REDISMODULE_OK as c_int {
        return Err("the server could not apply the maxage.* lines of its config file".to_string());
    }
    SETTINGS_CHANGED.set(Some(changed));
    Ok(())
}

/// Frees the strings handed to the server (module unload).
pub fn release_settings() {
    SETTINGS_CHANGED.set(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for slot in handed_out.0.iter_mut() {
        let string = std::mem::replace(slot, ptr::null_mut());
        if !string.is_null() {
            // SAFETY: created by `get_text`, freed once (swapped out).
            unsafe { raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), string) };
        }
    }
}
