//! Replies the crate cannot express (ordered maps, any bytes in errors) and the INFO section.

use std::ffi::{CStr, CString, c_int};

use redis_module::{Context, raw};

use super::*;

// ---------------------------------------------------------------------------------------------
// Replies the crate's `RedisValue` cannot express in order (maps keep insertion order here).

pub enum Reply {
    Int(i64),
    Str(String),
    Bool(bool),
    Null,
    Array(Vec<Reply>),
    /// RESP3 clients see a map; RESP2 clients a flat [key, value, ...] array, as the server's own
    /// map replies (CONFIG GET, XINFO) do.
    Map(Vec<(&'static str, Reply)>),
}

pub fn reply(ctx: &Context, value: &Reply) {
    let ctx = ctx.ctx;
    reply_raw(ctx, value);
}

fn reply_raw(ctx: *mut raw::RedisModuleCtx, value: &Reply) {
    // SAFETY (all calls below): `ctx` is the context of the command being answered, and every
    // string pointer is valid for the length passed with it during the call.
    unsafe {
        match value {
            Reply::Int(n) => {
                raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, *n);
            }
            Reply::Str(s) => {
                raw::RedisModule_ReplyWithStringBuffer.unwrap()(ctx, s.as_ptr().cast(), s.len());
            }
            Reply::Bool(b) => {
                raw::RedisModule_ReplyWithBool.unwrap()(ctx, c_int::from(*b));
            }
            Reply::Null => {
                raw::RedisModule_ReplyWithNull.unwrap()(ctx);
            }
            Reply::Array(items) => {
                raw::RedisModule_ReplyWithArray.unwrap()(ctx, items.len() as _);
                items.iter().for_each(|item| reply_raw(ctx, item));
            }
            Reply::Map(fields) => {
                raw::RedisModule_ReplyWithMap.unwrap()(ctx, fields.len() as _);
                for (key, item) in fields {
                    raw::RedisModule_ReplyWithStringBuffer.unwrap()(
                        ctx,
                        key.as_ptr().cast(),
                        key.len(),
                    );
                    reply_raw(ctx, item);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// INFO.

pub type InfoHandler = fn(&mut InfoWriter);

static INFO_HANDLER: HandlerSlot<InfoHandler> = HandlerSlot::new();

pub struct InfoWriter {
    ctx: *mut raw::RedisModuleInfoCtx,
}

impl InfoWriter {
    pub fn section(&mut self, name: &CStr) {
        // SAFETY: `ctx` is the INFO context of the running callback; `name` is a C string.
        unsafe { raw::RedisModule_InfoAddSection.unwrap()(self.ctx, name.as_ptr()) };
    }

    pub fn field_u64(&mut self, name: &str, value: u64) {
        let name = CString::new(name).unwrap_or_default();
        // SAFETY: as above.
        unsafe { raw::RedisModule_InfoAddFieldULongLong.unwrap()(self.ctx, name.as_ptr(), value) };
    }

    pub fn field_str(&mut self, name: &str, value: &str) {
        let name = CString::new(name).unwrap_or_default();
        let value = CString::new(value.replace(['\r', '\n', '\0'], " ")).unwrap_or_default();
        // SAFETY: as above.
        unsafe {
            raw::RedisModule_InfoAddFieldCString.unwrap()(self.ctx, name.as_ptr(), value.as_ptr())
        };
    }
}

unsafe extern "C" fn on_info(ctx: *mut raw::RedisModuleInfoCtx, for_crash_report: c_int) {
    // A crash report is written from whichever thread crashed, maybe while the main thread is
    // inside the module: it gets nothing that touches the module's main-thread state.
    if for_crash_report != 0 {
        return;
    }
    no_unwind("INFO", (), || {
        if let Some(handler) = INFO_HANDLER.get() {
            handler(&mut InfoWriter { ctx });
        }
    })
}

/// Replaces the INFO callback the `redis_module!` macro installs with ours (the server keeps
/// the last one registered).
pub fn register_info(ctx: &Context, handler: InfoHandler) -> bool {
    INFO_HANDLER.set(Some(handler));
    // SAFETY: `ctx` is the OnLoad context and `on_info` has the signature the server calls.
    unsafe {
        raw::RedisModule_RegisterInfoFunc.unwrap()(ctx.ctx, Some(on_info))
            == raw::REDISMODULE_OK as c_int
    }
}

/// Replies with an error in the server's own way, whatever the message holds: CR and LF
/// (which would end the reply early) become spaces and NUL is shown as `?`, so no text can
/// make the reply path fail. (The crate's error path maps characters to bytes and panics on
/// the NUL that a character such as U+0100 becomes.)
pub fn reply_error(ctx: &Context, message: &str) {
    let cleaned: String = message
        .chars()
        .map(|c| match c {
            '\r' | '\n' => ' ',
            '\0' => '?',
            c => c,
        })
        .collect();
    let cleaned = CString::new(cleaned).unwrap_or_default();
    // SAFETY: `ctx` is the running command's context and `cleaned` a valid C string.
    unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx.ctx, cleaned.as_ptr()) };
}
