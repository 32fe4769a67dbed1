//! `COMMAND DOCS` / `COMMAND INFO` metadata for the module's commands (arity, summary, since,
//! complexity, arguments), set with `RedisModule_SetCommandInfo`, which copies what it is given.

use std::ffi::{CString, c_int};
use std::ptr;

use redis_module::{Context, raw};

use crate::ffi;

#[derive(Clone, Copy)]
enum Kind {
    String,
    Integer,
    PureToken,
    OneOf,
}

/// One argument of a command's documentation.
pub struct Arg {
    name: &'static str,
    kind: Kind,
    token: Option<&'static str>,
    summary: Option<&'static str>,
    optional: bool,
    multiple: bool,
    subargs: Vec<Arg>,
}

fn arg(name: &'static str, kind: Kind, token: Option<&'static str>) -> Arg {
    Arg {
        name,
        kind,
        token,
        summary: None,
        optional: false,
        multiple: false,
        subargs: Vec::new(),
    }
}

impl Arg {
    fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
    fn multiple(mut self) -> Self {
        self.multiple = true;
        self
    }
    fn summary(mut self, summary: &'static str) -> Self {
        self.summary = Some(summary);
        self
    }
    fn with(mut self, subargs: Vec<Arg>) -> Self {
        self.subargs = subargs;
        self
    }
}

fn tokens(name: &'static str, token: &'static str, choices: &[&'static str]) -> Arg {
    arg(name, Kind::OneOf, Some(token)).with(
        choices
            .iter()
            .map(|choice| arg(choice, Kind::PureToken, Some(choice)))
            .collect(),
    )
}

/// The filters both commands take; `kill_only` adds DRYRUN.
fn filter_args(kill_only: bool) -> Vec<Arg> {
    let types = ["normal", "master", "primary", "replica", "slave", "pubsub"];
    let mut filters = vec![
        arg("client-id", Kind::Integer, Some("ID")).multiple(),
        arg("not-client-id", Kind::Integer, Some("NOT-ID")).multiple(),
        tokens("client-type", "TYPE", &types),
        tokens("not-client-type", "NOT-TYPE", &types),
        arg("username", Kind::String, Some("USER")),
        arg("not-username", Kind::String, Some("NOT-USER")),
        arg("addr", Kind::String, Some("ADDR")).summary("ip:port"),
        arg("not-addr", Kind::String, Some("NOT-ADDR")),
        arg("laddr", Kind::String, Some("LADDR")).summary("ip:port"),
        arg("not-laddr", Kind::String, Some("NOT-LADDR")),
        arg("ip", Kind::String, Some("IP")),
        arg("not-ip", Kind::String, Some("NOT-IP")),
        arg("name", Kind::String, Some("NAME")),
        arg("not-name", Kind::String, Some("NOT-NAME")),
        arg("lib-name", Kind::String, Some("LIB-NAME")),
        arg("not-lib-name", Kind::String, Some("NOT-LIB-NAME")),
        arg("lib-ver", Kind::String, Some("LIB-VER")),
        arg("not-lib-ver", Kind::String, Some("NOT-LIB-VER")),
        arg("flags", Kind::String, Some("FLAGS")),
        arg("not-flags", Kind::String, Some("NOT-FLAGS")),
        arg("capa", Kind::String, Some("CAPA")),
        arg("not-capa", Kind::String, Some("NOT-CAPA")),
        arg("db", Kind::Integer, Some("DB")),
        arg("not-db", Kind::Integer, Some("NOT-DB")),
        tokens("skipme", "SKIPME", &["yes", "no"]),
        arg("maxage", Kind::Integer, Some("MAXAGE")).summary("minimum age in seconds"),
        arg("maxage-ms", Kind::Integer, Some("MAXAGE-MS")).summary("minimum age in milliseconds"),
        arg("idle", Kind::Integer, Some("IDLE")).summary("minimum idle time in seconds"),
        arg("limit", Kind::Integer, Some("LIMIT")).summary("at most this many, oldest first"),
    ];
    if kill_only {
        filters.push(arg("dryrun", Kind::PureToken, Some("DRYRUN")).summary("count, kill nothing"));
        filters.push(
            arg("graceful", Kind::PureToken, Some("GRACEFUL"))
                .summary("retire through enforcement (pacing, after a reply, grace)"),
        );
        filters.push(
            arg("percent", Kind::Integer, Some("PERCENT"))
                .summary("only the oldest p % of the selection, rounded up"),
        );
    }
    filters
}

struct CommandDoc {
    name: &'static str,
    summary: &'static str,
    complexity: &'static str,
    arity: c_int,
    args: Vec<Arg>,
    tips: &'static str,
}

/// Commands about every connection of a server: a cluster client sends them to every node.
const ALL_NODES: &str = "nondeterministic_output request_policy:all_nodes";

fn command_docs() -> Vec<CommandDoc> {
    vec![
        CommandDoc {
            name: "maxage.kill",
            summary: "Closes the client connections that match all the given CLIENT KILL filters (plus MAXAGE-MS, LIMIT, DRYRUN, GRACEFUL, PERCENT), oldest first.",
            complexity: "O(N) where N is the number of client connections",
            arity: -2,
            tips: ALL_NODES,
            args: vec![
                arg("filter", Kind::OneOf, None)
                    .multiple()
                    .with(filter_args(true)),
            ],
        },
        CommandDoc {
            name: "maxage.list",
            summary: "Lists the client connections that match the given filters, oldest first, with their age in milliseconds and enforcement deadline.",
            complexity: "O(N) where N is the number of client connections",
            arity: -1,
            tips: ALL_NODES,
            args: vec![
                arg("filter", Kind::OneOf, None)
                    .optional()
                    .multiple()
                    .with(filter_args(false)),
            ],
        },
        CommandDoc {
            name: "maxage.preview",
            summary: "Reports, per client class, what a rule set would do: clients, age histogram, exempt, due now and due within a window. Changes nothing.",
            complexity: "O(N) where N is the number of client connections",
            arity: -1,
            tips: ALL_NODES,
            args: vec![
                arg("rules", Kind::String, Some("RULES"))
                    .optional()
                    .summary("a proposed maxage.rules value (default: the current one)"),
                arg("max-age-ms", Kind::Integer, Some("MAX-AGE-MS"))
                    .optional()
                    .summary("a proposed default max age (default: the current one)"),
                arg("within", Kind::Integer, Some("WITHIN"))
                    .optional()
                    .summary("the window in milliseconds (default 60000)"),
            ],
        },
        CommandDoc {
            name: "maxage.self",
            summary: "Sets the maximum age of the calling connection (only ever shorter than the operator's), withdraws it (0), or, without an argument, reports the connection's age, deadline and what set it.",
            complexity: "O(1)",
            arity: -1,
            tips: "nondeterministic_output",
            args: vec![
                arg("milliseconds", Kind::Integer, None)
                    .optional()
                    .summary("the connection's maximum age; 0 withdraws the request"),
            ],
        },
        CommandDoc {
            name: "maxage.clientkill",
            summary: "Internal: where the module's command filter sends a CLIENT KILL whose filters this server does not support (call CLIENT KILL instead).",
            complexity: "O(N) where N is the number of client connections",
            arity: -4,
            tips: ALL_NODES,
            args: vec![
                arg("kill", Kind::PureToken, Some("KILL")),
                arg("filter", Kind::OneOf, None)
                    .multiple()
                    .with(filter_args(true)),
            ],
        },
    ]
}

/// Owns every C string and argument array until `SetCommandInfo` has copied them.
#[derive(Default)]
struct Storage {
    strings: Vec<CString>,
    arrays: Vec<Vec<raw::RedisModuleCommandArg>>,
}

impl Storage {
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
                Kind::String => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_STRING,
                Kind::Integer => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_INTEGER,
                Kind::PureToken => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_PURE_TOKEN,
                Kind::OneOf => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_ONEOF,
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

/// Sets the documentation and arity of every module command. Returns the first failure.
pub fn register(ctx: &Context) -> Result<(), String> {
    let version = raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };
    for doc in command_docs() {
        let mut storage = Storage::default();
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
        ffi::log(
            ctx,
            ffi::LogLevel::Verbose,
            &format!("maxage: documented {}", doc.name),
        );
    }
    Ok(())
}
