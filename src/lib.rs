//! redis-maxage: a Redis/Valkey module that gives every client connection a maximum age.
//!
//! This file only declares the module (name, commands, configs) and wires the parts together;
//! each other file has the one responsibility its name says.

pub mod audit;
pub mod client_list;
pub mod compat;
pub mod config;
pub mod docs;
pub mod enforcement;
pub mod ffi;
pub mod filter;
pub mod glob;
pub mod kill;
pub mod policy;
pub mod preview;
pub mod registry;
pub mod rules;
pub mod schedule;
pub mod state;
pub mod stats;

use redis_module::configuration::{ConfigurationContext, ConfigurationFlags};
use redis_module::{Context, RedisError, RedisResult, RedisString, Status, redis_module};

use crate::config::{Mode, Pacing};
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

/// Every command handler runs inside this: a panic becomes an error reply, never an abort.
fn guarded(
    what: &str,
    ctx: &Context,
    args: Vec<RedisString>,
    handler: fn(&Context, Vec<RedisString>) -> RedisResult,
) -> RedisResult {
    no_unwind(
        what,
        Err(RedisError::Str(
            "ERR internal error in the maxage module (see the server log)",
        )),
        || handler(ctx, args),
    )
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

/// CLIENT KILL <filters> that the server cannot answer itself, handed over by the filter.
fn maxage_clientkill(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(
        "CLIENT KILL compatibility",
        ctx,
        args,
        compat::compat_kill_command,
    )
}

fn on_setting_changed<T>(_ctx: &ConfigurationContext, _name: &str, _value: &'static T) {
    no_unwind("config change", (), enforcement::on_settings_changed);
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    no_unwind("module load", Status::Err, || load(ctx, args))
}

fn refuse(ctx: &Context, why: &str) -> Status {
    ffi::log(
        ctx,
        LogLevel::Warning,
        &format!("maxage: refusing to load: {why}"),
    );
    ffi::stop_wakeups();
    ffi::release_module_ctx();
    Status::Err
}

fn load(ctx: &Context, args: &[RedisString]) -> Status {
    // Detect, never assume: each of these is needed and each is missing on some servers.
    // SAFETY (each read): the function-pointer statics were filled in by RedisModule_Init.
    let required = [
        (
            "DeauthenticateAndCloseClient",
            unsafe { redis_module::raw::RedisModule_DeauthenticateAndCloseClient }.is_some(),
        ),
        (
            "SubscribeToServerEvent",
            unsafe { redis_module::raw::RedisModule_SubscribeToServerEvent }.is_some(),
        ),
        (
            "SetCommandInfo",
            unsafe { redis_module::raw::RedisModule_SetCommandInfo }.is_some(),
        ),
        (
            "GetDetachedThreadSafeContext",
            unsafe { redis_module::raw::RedisModule_GetDetachedThreadSafeContext }.is_some(),
        ),
        (
            "EventLoopAdd",
            unsafe { redis_module::raw::RedisModule_EventLoopAdd }.is_some(),
        ),
    ];
    if let Some((missing, _)) = required.iter().find(|(_, present)| !present) {
        return refuse(
            ctx,
            &format!("the server lacks the module API {missing} (Redis 7.0 or newer is needed)"),
        );
    }
    ffi::init_module_ctx(ctx);
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy()).collect();
    if let Err(why) = config::apply_load_args(&args) {
        return refuse(ctx, &why);
    }
    if let Err(why) = docs::register(ctx) {
        return refuse(ctx, &why);
    }
    let native = compat::probe_native_support(ctx);
    let handed_over: Vec<&str> = ["MAXAGE", "NAME", "IDLE", "NOT-ID"]
        .into_iter()
        .filter(|keyword| !native.keywords.contains(*keyword))
        .collect();
    compat::set_native_support(native);
    if !ffi::acl_api_present() {
        ffi::log(
            ctx,
            LogLevel::Warning,
            "maxage: CLIENT KILL compatibility is off: the server lacks the ACL check API",
        );
    } else if !ffi::register_client_kill_filter(ctx, compat::rewrite_client_kill) {
        return refuse(ctx, "cannot register the CLIENT KILL compatibility filter");
    } else if !handed_over.is_empty() {
        ffi::log(
            ctx,
            LogLevel::Notice,
            &format!(
                "maxage: this server's CLIENT KILL lacks {} (and more); the module answers those calls",
                handed_over.join(", ")
            ),
        );
    }
    if let Err(why) = ffi::start_wakeups(enforcement::on_wakeup) {
        return refuse(ctx, &why);
    }
    if !ffi::subscribe_client_changes(ctx, enforcement::on_client_change) {
        return refuse(ctx, "cannot subscribe to client connect/disconnect events");
    }
    if !ffi::register_info(ctx, stats::write_info) {
        return refuse(ctx, "cannot register the INFO section");
    }
    let seeded = enforcement::seed_existing_clients(ctx);
    enforcement::on_settings_changed();
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

fn deinit(_ctx: &Context) -> Status {
    no_unwind("module unload", Status::Ok, || {
        enforcement::disarm();
        ffi::stop_wakeups();
        ffi::watch_event_loop(&ffi::module_ctx(), false);
        state::STATE.with(|policy| {
            *policy = policy::Policy::new(config::snapshot(), 0, ffi::monotonic_ms())
        });
        ffi::release_module_ctx();
        Status::Ok
    })
}

redis_module! {
    name: "maxage",
    version: 1,
    allocator: (ModuleAllocator, MODULE_ALLOCATOR),
    data_types: [],
    init: init,
    deinit: deinit,
    commands: [
        // No keys; the ACL-categories field stays empty because Redis 7.0 cannot set categories.
        ["maxage.kill", maxage_kill, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.list", maxage_list, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.preview", maxage_preview, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
        ["maxage.clientkill", maxage_clientkill, "admin deny-script allow-loading allow-stale", 0, 0, 0, ""],
    ],
    configurations: [
        i64: [
            ["max-age-ms", &*config::MAX_AGE_MS, config::MAX_AGE_MS_DEFAULT, config::MAX_AGE_MS_MIN, config::MAX_AGE_MS_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["jitter-pct", &*config::JITTER_PCT, config::JITTER_PCT_DEFAULT, config::JITTER_PCT_MIN, config::JITTER_PCT_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["max-evictions-per-sec", &*config::MAX_EVICTIONS_PER_SEC, config::MAX_EVICTIONS_PER_SEC_DEFAULT, config::MAX_EVICTIONS_PER_SEC_MIN, config::MAX_EVICTIONS_PER_SEC_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["min-evictions-per-sec", &*config::MIN_EVICTIONS_PER_SEC, config::MIN_EVICTIONS_PER_SEC_DEFAULT, config::MAX_EVICTIONS_PER_SEC_MIN, config::MAX_EVICTIONS_PER_SEC_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["max-overdue-ms", &*config::MAX_OVERDUE_MS, config::MAX_OVERDUE_MS_DEFAULT, config::MAX_OVERDUE_MS_MIN, config::MAX_OVERDUE_MS_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["grace-ms", &*config::GRACE_MS, config::GRACE_MS_DEFAULT, config::GRACE_MS_MIN, config::GRACE_MS_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
        ],
        string: [
            ["exempt-types", &*config::EXEMPT_TYPES, config::EXEMPT_TYPES_DEFAULT, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["exempt-users", &*config::EXEMPT_USERS, config::EXEMPT_USERS_DEFAULT, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["exempt-names", &*config::EXEMPT_NAMES, config::EXEMPT_NAMES_DEFAULT, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["rules", &*config::RULES, config::RULES_DEFAULT, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
        ],
        bool: [
            ["client-kill-compat", &*config::CLIENT_KILL_COMPAT, config::CLIENT_KILL_COMPAT_DEFAULT, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
        ],
        enum: [
            ["mode", &*config::MODE, Mode::enforce, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
            ["pacing", &*config::PACING, Pacing::fixed, ConfigurationFlags::DEFAULT, Some(Box::new(on_setting_changed))],
        ],
        module_args_as_configuration: false,
    ]
}
