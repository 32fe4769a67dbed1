//! redis-maxage: a Redis/Valkey module that gives every client connection a maximum age.
//!
//! This file only declares the module (name, commands, configs) and wires the parts together;
//! each other file has the one responsibility its name says.

mod commands;
mod policy;
mod server;

// The fuzz targets (fuzz/) drive the pure parsers directly.
pub use policy::{client_list, filter, filter_keywords, glob};

use commands::{compat, docs, kill, notice, preview, self_request};
use policy::config;
use server::{enforcement, ffi, next_command, settings_changed, stats, thread_load, unload};

use redis_module::{
    Context, RedisError, RedisResult, RedisString, RedisValue, Status, redis_module,
};

use crate::ffi::{LogLevel, no_unwind};

/// Inside the server all memory comes from the server's allocator (so INFO memory and maxmemory
/// see it); unit tests run without a server and use the system allocator.
/// (`cargo fuzz` builds with `--cfg fuzzing`, also without a server.)
#[cfg(not(any(test, fuzzing)))]
type ModuleAllocator = redis_module::alloc::RedisAlloc;
#[cfg(not(any(test, fuzzing)))]
const MODULE_ALLOCATOR: ModuleAllocator = redis_module::alloc::RedisAlloc;
#[cfg(any(test, fuzzing))]
type ModuleAllocator = std::alloc::System;
#[cfg(any(test, fuzzing))]
const MODULE_ALLOCATOR: ModuleAllocator = std::alloc::System;

/// Every command handler runs inside this: a panic becomes an error reply, never an abort, and
/// every error is replied through the module's own path, which is safe for any bytes (the
/// crate's error path aborts the server on some client-supplied text).
fn guarded(
    what: &str,
    ctx: &Context,
    args: Vec<RedisString>,
    handler: fn(&Context, Vec<RedisString>) -> RedisResult,
) -> RedisResult {
    let result = no_unwind(
        what,
        Err(RedisError::Str(
            "ERR internal error in the maxage module (see the server log)",
        )),
        || handler(ctx, args),
    );
    match result {
        Err(RedisError::WrongArity) => Err(RedisError::WrongArity),
        Err(error) => {
            ffi::reply_error(ctx, &error.to_string());
            Ok(RedisValue::NoReply)
        }
        ok => ok,
    }
}

/// MAXAGE.KILL <filter> [<filter> ...]: closes matching clients, replies with how many.
fn maxage_kill(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.KILL", ctx, args, kill::kill_command)
}

/// MAXAGE.LIST [<filter> ...]: the matching clients, oldest first.
fn maxage_list(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.LIST", ctx, args, kill::list_command)
}

/// MAXAGE.PREVIEW [RULES <rules>] [MAX-AGE-MS ms] [WITHIN ms]: what a rule set would retire.
fn maxage_preview(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.PREVIEW", ctx, args, preview::preview_command)
}

/// MAXAGE.SELF [ms]: the calling connection's own max age (only ever shorter), or a report.
fn maxage_self(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.SELF", ctx, args, self_request::self_command)
}

/// MAXAGE.NOTICE [ON|OFF]: tell the calling connection before its deadline (RESP3 push).
fn maxage_notice(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.NOTICE", ctx, args, notice::notice_command)
}

/// MAXAGE.NOTICEKEY <key>: read-only no-op that MAXAGE.NOTICE runs to track its key.
fn maxage_noticekey(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("MAXAGE.NOTICEKEY", ctx, args, notice::notice_key_command)
}

/// CLIENT KILL <filters> that the server cannot answer itself, handed over by the filter.
fn maxage_clientkill(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(
        "CLIENT KILL compatibility",
        ctx,
        args,
        compat::compat_kill_command,
    )
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    no_unwind("module load", Status::Err, || load(ctx, args))
}

/// Refuses the load, undoing every registration the server would not undo itself: on a failed
/// load it drops the commands and settings but keeps command filters and event subscriptions,
/// which would then call into the unmapped library.
fn refuse(ctx: &Context, why: &str) -> Status {
    ffi::log(
        ctx,
        LogLevel::Warning,
        &format!("maxage: refusing to load: {why}"),
    );
    compat::stop_filter(ctx);
    ffi::unregister_next_command_filter(ctx);
    ffi::subscribe_client_changes(ctx, None);
    ffi::watch_event_loop(ctx, None);
    ffi::stop_wakeups();
    ffi::release_settings();
    ffi::release_module_ctx();
    Status::Err
}

/// The module's commands, for ACL categories where the server has them.
const COMMANDS: [&std::ffi::CStr; 4] = [
    c"maxage.kill",
    c"maxage.list",
    c"maxage.preview",
    c"maxage.clientkill",
];

fn load(ctx: &Context, args: &[RedisString]) -> Status {
    if let Some(missing) = ffi::missing_api() {
        return refuse(
            ctx,
            &format!("the server lacks the module API {missing} (Redis 7.0 or newer is needed)"),
        );
    }
    ffi::init_module_ctx(ctx);
    let args: Vec<&[u8]> = args.iter().map(RedisString::as_slice).collect();
    let defaults = match config::defaults_from_load_args(&args) {
        Ok(defaults) => defaults,
        Err(why) => return refuse(ctx, &why),
    };
    if let Err(why) = ffi::register_settings(ctx, &defaults, settings_changed::on_settings_changed)
    {
        return refuse(ctx, &why);
    }
    if let Err(why) = ffi::set_command_docs(ctx, &docs::command_docs()) {
        return refuse(ctx, &why);
    }
    // Commands that can close or list anyone's connection belong with CLIENT KILL/LIST.
    for command in COMMANDS {
        if let Err(why) = ffi::set_command_categories(ctx, command, c"admin dangerous connection") {
            return refuse(ctx, &why);
        }
    }
    // MAXAGE.SELF and MAXAGE.NOTICE are about the caller's own connection, like CLIENT
    // SETNAME and CLIENT TRACKING.
    for command in [c"maxage.self", c"maxage.notice", c"maxage.noticekey"] {
        if let Err(why) = ffi::set_command_categories(ctx, command, c"connection") {
            return refuse(ctx, &why);
        }
    }
    let native = compat::probe_native_support(ctx);
    let handed_over: Vec<String> = compat::probed_keywords()
        .into_iter()
        .map(|(keyword, _)| keyword)
        .filter(|keyword| !native.keywords.contains(keyword))
        .collect();
    compat::set_native_support(native);
    let compat_possible = ffi::acl_api_present();
    if !compat_possible {
        ffi::log(
            ctx,
            LogLevel::Warning,
            "maxage: CLIENT KILL compatibility is off: the server lacks the ACL check API",
        );
    } else if !handed_over.is_empty() {
        ffi::log(
            ctx,
            LogLevel::Notice,
            &format!(
                "maxage: this server's CLIENT KILL lacks {} (the module answers those calls while maxage.client-kill-compat is yes)",
                handed_over.join(", ")
            ),
        );
    }
    if !compat::start_filter(ctx, compat_possible) {
        return refuse(ctx, "cannot register the CLIENT KILL compatibility filter");
    }
    if let Some(load) = thread_load::describe(thread_load::decide(ctx)) {
        ffi::log(ctx, LogLevel::Notice, &format!("maxage: {load}"));
    }
    if !watch_io_thread_clients(ctx) {
        return refuse(ctx, "cannot register the next-command filter");
    }
    if let Err(why) = ffi::start_wakeups(enforcement::on_wakeup) {
        return refuse(ctx, &why);
    }
    if !ffi::subscribe_client_changes(ctx, Some(enforcement::on_client_change)) {
        return refuse(ctx, "cannot subscribe to client connect/disconnect events");
    }
    if !ffi::register_info(ctx, stats::write_info) {
        return refuse(ctx, "cannot register the INFO section");
    }
    let seeded = enforcement::seed_existing_clients(ctx);
    settings_changed::on_settings_changed();
    let settings = config::snapshot();
    ffi::log(
        ctx,
        LogLevel::Notice,
        &format!(
            "maxage: loaded; {seeded} already-connected clients seeded from CLIENT LIST (ages approximate); max-age-ms={} mode={}",
            settings.max_age_ms,
            settings.mode_name()
        ),
    );
    Status::Ok
}

/// With I/O threads that own their clients (Redis 8), due clients are closed inside their next
/// command (next_command.rs), which needs a filter that knows the client (Redis 7.4+).
fn watch_io_thread_clients(ctx: &Context) -> bool {
    let io_threads = thread_load::io_threads(ctx);
    if io_threads <= 1 {
        return true;
    }
    if !ffi::filter_client_id_api_present() {
        ffi::log(
            ctx,
            LogLevel::Notice,
            "maxage: io-threads is on and this server's command filters cannot tell the client: due clients owned by an I/O thread are closed idle or when grace runs out",
        );
        return true;
    }
    ffi::log(
        ctx,
        LogLevel::Notice,
        &format!(
            "maxage: io-threads {io_threads}: a due client owned by an I/O thread (Redis 8) is closed inside its next command when its user is an open default user, otherwise idle or when grace runs out"
        ),
    );
    ffi::register_next_command_filter(ctx, next_command::on_command)
}

fn deinit(ctx: &Context) -> Status {
    no_unwind("module unload", Status::Ok, || unload::unload(ctx))
}

redis_module! {
    name: "maxage",
    version: 1,
    allocator: (ModuleAllocator, MODULE_ALLOCATOR),
    data_types: [],
    init: init,
    deinit: deinit,
    commands: [
        // No keys. The ACL-categories field stays empty: a category there makes the load fail
        // on Redis 7.0; `load` sets them where the server has the API.
        ["maxage.kill", maxage_kill, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.list", maxage_list, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.preview", maxage_preview, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.clientkill", maxage_clientkill, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        // Acts on the caller's own connection only: no `admin`, so application users may run it.
        ["maxage.self", maxage_self, "fast deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.notice", maxage_notice, "deny-script allow-loading allow-stale", 0, 0, 0, ""],
        // One key, read-only: the server tracks it for the client whose MAXAGE.NOTICE runs it.
        ["maxage.noticekey", maxage_noticekey, "readonly fast deny-script allow-loading allow-stale", 1, 1, 1, ""],
    ],
}
