//! COMMAND DOCS: the plain data of commands/docs.rs turned into the server's structs.

use std::ffi::{CString, c_int};
use std::ptr;

use redis_module::{Context, raw};

use crate::commands::docs::{self, Arg, CommandDoc};

use super::*;

// ---------------------------------------------------------------------------------------------
// Command docs: the plain data of docs.rs turned into the server's structs.

/// Owns every C string and argument array until `SetCommandInfo` has copied them.
#[derive(Default)]
struct DocStorage {
    strings: Vec<CString>,
    arrays: Vec<Vec<raw::RedisModuleCommandArg>>,
}

impl DocStorage {
    fn c_str(&mut self, text: &str) -> *const std::ffi::c_char {
        let owned = CString::new(text).unwrap_or_default();
        let pointer = owned.as_ptr();
        self.strings.push(owned);
        pointer
    }

    fn opt_str(&mut self, text: Option<&str>) -> *const std::ffi::c_char {
        text.map_or(ptr::null(), |t| self.c_str(t))
    }

    /// A null-terminated array of raw args (the server stops at the entry whose name is null).
    fn args(&mut self, args: &[Arg]) -> *mut raw::RedisModuleCommandArg {
        if args.is_empty() {
            return ptr::null_mut();
        }
        let mut array: Vec<raw::RedisModuleCommandArg> = Vec::with_capacity(args.len() + 1);
        for a in args {
            let kind = match a.kind {
                docs::Kind::String => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_STRING,
                docs::Kind::Integer => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_INTEGER,
                docs::Kind::PureToken => {
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_PURE_TOKEN
                }
                docs::Kind::OneOf => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_ONEOF,
            };
            let mut flags = 0;
            if a.optional {
                flags |= raw::REDISMODULE_CMD_ARG_OPTIONAL;
            }
            if a.multiple {
                flags |= raw::REDISMODULE_CMD_ARG_MULTIPLE;
            }
            let entry = raw::RedisModuleCommandArg {
                name: self.c_str(a.name),
                type_: kind,
                key_spec_index: -1,
                token: self.opt_str(a.token),
                summary: self.opt_str(a.summary),
                since: ptr::null(),
                flags: flags as c_int,
                deprecated_since: ptr::null(),
                subargs: self.args(&a.subargs),
                display_text: ptr::null(),
            };
            array.push(entry);
        }
        // SAFETY: an all-zero RedisModuleCommandArg (null name) is the array terminator.
        array.push(unsafe { std::mem::zeroed() });
        let pointer = array.as_mut_ptr();
        self.arrays.push(array);
        pointer
    }
}

/// Sets the documentation and arity of every module command (`COMMAND DOCS`, `COMMAND INFO`).
/// Returns the first failure.
pub fn set_command_docs(ctx: &Context, docs: &[CommandDoc]) -> Result<(), String> {
    let version = raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };
    for doc in docs {
        let mut storage = DocStorage::default();
        let name = storage.c_str(doc.name);
        // SAFETY: `ctx` is the OnLoad context and `name` a registered command's name.
        let command = unsafe { raw::RedisModule_GetCommand.unwrap()(ctx.ctx, name) };
        if command.is_null() {
            return Err(format!("command {} is not registered", doc.name));
        }
        let info = raw::RedisModuleCommandInfo {
            version: &version,
            summary: storage.c_str(doc.summary),
            complexity: storage.c_str(doc.complexity),
            since: storage.c_str(env!("CARGO_PKG_VERSION")),
            history: ptr::null_mut(),
            tips: storage.c_str(doc.tips),
            arity: doc.arity,
            key_specs: ptr::null_mut(),
            args: storage.args(&doc.args),
        };
        // SAFETY: every pointer in `info` points into `storage` or `version`, which outlive the
        // call; the server validates the struct and copies what it keeps.
        let status = unsafe { raw::RedisModule_SetCommandInfo.unwrap()(command, &info) };
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!("SetCommandInfo refused the docs of {}", doc.name));
        }
        log(
            ctx,
            LogLevel::Verbose,
            &format!("maxage: documented {}", doc.name),
        );
    }
    Ok(())
}
