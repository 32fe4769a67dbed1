//! `MODULE UNLOAD`: refused while the server could still reach one of the module's commands
//! after it, otherwise undoing everything the module registered.

use redis_module::{Context, Status};

use crate::policy::client_list::ListedClient;
use crate::server::ffi::{self, LogLevel, monotonic_ms};
use crate::server::server_view::list_clients;
use crate::server::state::{AUDIT, STATE, fresh_policy};
use crate::{
    commands::compat, policy::audit, server::enforcement, server::retire, server::shut_down,
};

/// A client through which the server would reach a command of the module's after the unload:
/// its last command was one (the next `CLIENT LIST` reads its name from the freed command, seen
/// to crash Valkey 9.1), or it has a transaction with queued commands (`EXEC` would run a queued
/// `MAXAGE.SELF` from freed memory: Redis 7.0 crashed). The server does not show what a
/// transaction holds, so any queued transaction counts.
pub fn pins_the_module(client: &ListedClient) -> bool {
    client.cmd.starts_with("maxage.") || (client.has_flag('x') && client.multi > 0)
}

pub fn unload(ctx: &Context) -> Status {
    let pinning: Vec<u64> = list_clients(ctx, None)
        .iter()
        .filter(|client| pins_the_module(client))
        .map(|client| client.id)
        .collect();
    if !pinning.is_empty() {
        // Refusing alone would let any application keep the module loaded for ever (one idle
        // connection whose last command was MAXAGE.SELF): these clients are retired the way a
        // graceful kill retires them, at their next safe moment, within grace at most.
        let now_ms = monotonic_ms();
        let scheduled = STATE
            .with(|policy| policy.drain(&pinning, now_ms))
            .unwrap_or(0);
        enforcement::rearm(now_ms);
        ffi::log(
            ctx,
            LogLevel::Warning,
            &format!(
                "maxage: refusing to unload: client(s) {pinning:?} last ran a maxage command or hold a queued transaction that may; {scheduled} of them are being retired at their next safe moment (as by MAXAGE.KILL ... GRACEFUL, within maxage.grace-ms); unload again once they are gone"
            ),
        );
        return Status::Err;
    }
    retire::close_all_queued_kills(ctx, monotonic_ms());
    shut_down::close_all(ctx);
    enforcement::disarm();
    compat::stop_filter(ctx);
    ffi::unregister_next_command_filter(ctx);
    ffi::stop_wakeups();
    ffi::watch_event_loop(&ffi::module_ctx(), None);
    ffi::subscribe_client_changes(ctx, None);
    STATE.with(|policy| *policy = fresh_policy());
    AUDIT.with(|limiter| *limiter = audit::AuditLimiter::default());
    ffi::release_settings();
    ffi::release_module_ctx();
    Status::Ok
}
