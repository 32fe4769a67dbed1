//! Automatic enforcement, the server side of `policy::decisions`: the client-change events, the
//! one wake-up and its owner (`rearm`, `wake_no_later_than`, `disarm`), the bounded pass that
//! arms or closes due clients, and the event-loop hooks that find each armed client's moment.
//! Closing itself (counters, audit) is `retire.rs`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use lazy_static::lazy_static;
use redis_module::{Context, RedisValue};

use crate::policy::audit::Reason;
use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::closing::{CloseMode, Look, Moment};
use crate::policy::config;
use crate::policy::pass::{PassServer, RetireNow};
use crate::server::ffi::{self, LogLevel, monotonic_ms, monotonic_ms_ceil, monotonic_us};
use crate::server::next_command;
use crate::server::notices;
use crate::server::retire::{
    audit_summary_due_at_ms, close_queued_kills, flush_audit, kills_queued, retire,
};
use crate::server::server_view::{list_clients, look_up_clients, reply_text, tracking_sources_of};
use crate::server::shut_down;
use crate::server::state::{MainThreadCell, STATE};
use crate::server::stats;
use crate::server::thread_load::sample_load;

lazy_static! {
    /// When the wake-up is armed for (monotonic ms), if it is.
    static ref ARMED: MainThreadCell<Option<u64>> = MainThreadCell::new(None);
}

pub fn on_client_change(ctx: &Context, client_id: u64, connected: bool) {
    let now_ms = monotonic_ms();
    let noticed = STATE
        .with(|policy| {
            // Connections come and go all the time on a busy server: a moment to sample load.
            sample_load(policy);
            if connected {
                policy.on_connect(client_id, monotonic_ms_ceil());
                None
            } else {
                shut_down::forget(client_id);
                next_command::on_disconnect(client_id);
                policy.on_disconnect(client_id)
            }
        })
        .flatten();
    if let Some((opted_in, closed_by_module)) = noticed {
        notices::on_left(ctx, client_id, opted_in, closed_by_module);
    }
    // A disconnect can free a closing slot that clients' own requests wait for.
    rearm(now_ms);
}

/// Applies the current settings to the policy: re-times every connected client at once.
/// (`settings_changed` calls this and the other parts a setting changes.)
pub fn apply_settings() {
    let now_ms = monotonic_ms();
    let settings = config::snapshot();
    let let_go = STATE
        .with(|policy| {
            let let_go = policy.apply_settings(settings, now_ms);
            sample_load(policy);
            let_go
        })
        .unwrap_or_default();
    // Clients no longer to be closed get the replies held for their close.
    for fd in let_go {
        ffi::hold_output(fd, false);
    }
    // Before the module's init (settings from the config file) there is no context yet; init
    // calls this again once there is.
    if ffi::module_ctx_ready() {
        update_event_loop_watch(&ffi::module_ctx());
    }
    rearm(now_ms);
}

/// Watches the event loop while something needs it: adaptive pacing (its load) or a client
/// waiting for its moment to be closed. Never called from the event-loop hook itself.
fn update_event_loop_watch(ctx: &Context) {
    let Some((adaptive, closing, at_next_command)) = STATE.with(|policy| {
        (
            policy.settings().adaptive_pacing,
            !policy.closing().is_empty(),
            policy.closing().any_at_next_command(),
        )
    }) else {
        return;
    };
    ffi::watch_next_commands(at_next_command || shut_down::any());
    let handler: Option<ffi::EventLoopHandler> = (adaptive || closing).then_some(on_event_loop);
    if !ffi::watch_event_loop(ctx, handler) {
        ffi::log(
            ctx,
            LogLevel::Warning,
            "maxage: cannot watch the event loop; due clients are closed when grace runs out",
        );
    }
}

/// The event loop's hooks while clients wait for their moment (closing.rs): at the top of a
/// pass, looks at the clients whose reply went out in the last pass, idle ones and those out
/// of grace, and closes those with nothing in flight; at the bottom, makes the next pass come
/// at once when a due client's reply is going out now.
fn on_event_loop(ctx: &Context, top_of_pass: bool) {
    let now_ms = monotonic_ms();
    if !top_of_pass {
        let cork = STATE
            .with(|policy| policy.closing().before_sleep(now_ms))
            .unwrap_or_default();
        if !cork.is_empty() {
            for fd in cork {
                ffi::hold_output(fd, true);
            }
            wake_no_later_than(now_ms);
        }
        return;
    }
    let Some((grace_ms, top, connected)) = STATE.with(|policy| {
        let grace_ms = policy.settings().grace_ms;
        let top = policy
            .closing()
            .after_sleep(now_ms, grace_ms, ffi::unread_input_bytes);
        (grace_ms, top, policy.registry().len())
    }) else {
        return;
    };
    for fd in top.uncork {
        ffi::hold_output(fd, false);
    }
    let look_now = top.look_now;
    if look_now.is_empty() {
        return;
    }
    let listed: HashMap<u64, ListedClient> = look_up_clients(ctx, &look_now, connected)
        .into_iter()
        .map(|client| (client.id, client))
        .collect();
    for client_id in look_now {
        let Some(client) = listed.get(&client_id).filter(|c| !c.has_flag('A')) else {
            // Gone, or already being closed by someone else (which sends what it holds).
            STATE.with(|policy| policy.closing().remove(client_id));
            continue;
        };
        // Read last, right before the close: the race left is a request sent in between.
        let unread = ffi::unread_input_bytes(client.fd);
        let Some((look, reply_sent, age_ms)) = STATE.with(|policy| {
            let reply_sent = policy.closing().reply_sent(client_id);
            let moment = Moment {
                unread_input_bytes: unread,
                unsent_output_bytes: ffi::unsent_output_bytes(client.fd),
            };
            let look = policy.closing().look_at(client, moment, now_ms, grace_ms);
            let age_ms = policy
                .registry()
                .get(client_id)
                .map_or(client.lower_bound_age_ms(), |c| c.age_ms(now_ms));
            (look, reply_sent, age_ms)
        }) else {
            continue;
        };
        if let Look::Close(reason) = look {
            let counter = if reason == Reason::MaxAgeGraceExpired {
                None
            } else if reply_sent {
                Some(&stats::CLOSED_AFTER_REPLY)
            } else {
                Some(&stats::CLOSED_WHILE_IDLE)
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            retire(ctx, client, age_ms, reason, now_ms);
        } else {
            if reply_sent && look == Look::Keep {
                ffi::hold_output(client.fd, false);
            }
            stats::SAFE_MOMENT_POLLS.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The next wake-up stops watching the loop if nobody is left waiting.
    wake_no_later_than(
        STATE
            .with(|policy| policy.closing().next_look_ms(grace_ms))
            .flatten()
            .unwrap_or(now_ms),
    );
}

/// Arms the wake-up for the policy's next one, unless it is already armed for no later.
pub fn rearm(now_ms: u64) {
    let wake = STATE
        .with(|policy| {
            let grace_ms = policy.settings().grace_ms;
            let closing = policy.closing().next_look_ms(grace_ms);
            [
                policy.next_wake_ms(now_ms),
                closing,
                audit_summary_due_at_ms(),
                kills_queued().then_some(now_ms),
                shut_down::next_check_ms(),
                notices::keys_to_release().then_some(now_ms),
            ]
            .into_iter()
            .flatten()
            .min()
        })
        .flatten();
    if let Some(wake) = wake {
        wake_no_later_than(wake);
    }
}

fn wake_no_later_than(wake_ms: u64) {
    ARMED.with(|armed| {
        if armed.is_none_or(|fires_at| fires_at > wake_ms) {
            ffi::wake_at_us(wake_ms.saturating_mul(1000));
            *armed = Some(wake_ms);
        }
    });
}

/// Disarms the wake-up (module unload).
/// Disarms the wake-up and releases every reply held corked for a close that will now never
/// come (module unload).
pub fn disarm() {
    ARMED.with(|armed| *armed = None);
    ffi::cancel_wakeup();
    let corked = STATE
        .with(|policy| policy.closing().corked_fds())
        .unwrap_or_default();
    for fd in corked {
        ffi::hold_output(fd, false);
    }
}

pub fn on_wakeup(ctx: &Context) {
    let started_us = monotonic_us();
    ARMED.with(|armed| *armed = None);
    close_queued_kills(ctx, monotonic_ms());
    shut_down::close_leftovers(ctx, monotonic_ms());
    notices::release_keys();
    tick(ctx);
    notices::notice_pass(ctx, monotonic_ms());
    update_event_loop_watch(ctx);
    rearm(monotonic_ms());
    let took_us = monotonic_us() - started_us;
    stats::LONGEST_WAKEUP_US.fetch_max(took_us, Ordering::Relaxed);
    stats::WAKEUPS.fetch_add(1, Ordering::Relaxed);
    stats::WAKEUP_US_TOTAL.fetch_add(took_us, Ordering::Relaxed);
}

fn tick(ctx: &Context) {
    let started_us = monotonic_us();
    let now_ms = monotonic_ms();
    flush_audit(ctx, now_ms);
    let mut server = LiveServer {
        ctx,
        started_us,
        tracking_clients: None,
        default_user_open: None,
        connected: 0,
    };
    let Some(outcome) = STATE.with(|policy| {
        sample_load(policy);
        server.connected = policy.registry().len();
        let budget = policy.start_pass();
        policy.run_pass(now_ms, budget, &mut server)
    }) else {
        return;
    };
    stats::EXEMPTIONS.fetch_add(outcome.exempted, Ordering::Relaxed);
    stats::PACING_DELAYS.fetch_add(outcome.pacing_delays, Ordering::Relaxed);
    stats::PARKED_GIVEN_TIME.fetch_add(outcome.parked_given_time, Ordering::Relaxed);
    for RetireNow {
        client,
        age_ms,
        reason,
    } in outcome.retire_now
    {
        retire(ctx, &client, age_ms, reason, now_ms);
    }
    for RetireNow {
        client,
        age_ms,
        reason,
    } in outcome.close_quiet
    {
        stats::CLOSED_WHILE_IDLE.fetch_add(1, Ordering::Relaxed);
        retire(ctx, &client, age_ms, reason, now_ms);
    }
}

/// The server as a pass sees it. Its calls never touch the module's state, so the pass can run
/// inside the state's borrow.
struct LiveServer<'a> {
    ctx: &'a Context,
    started_us: u64,
    /// `tracking_clients` from INFO, read once a pass: each reading formats and parses the
    /// whole clients section, which made every RESP3 client due cost 1.36x a RESP2 one
    /// (21.6 vs 16.0 us, bench row 8), and no client can turn tracking on while a pass runs.
    tracking_clients: Option<u64>,
    /// Whether the `default` user is enabled with `nopass`, read once a pass when needed.
    default_user_open: Option<bool>,
    /// The clients the module tracks when the pass began (`look_up_clients` weighs a batch's
    /// look-up against a whole listing with it).
    connected: usize,
}

impl PassServer for LiveServer<'_> {
    fn close_mode(&mut self, client: &ListedClient) -> CloseMode {
        if client.io_thread <= 0 {
            return CloseMode::AfterReply;
        }
        let open = *self
            .default_user_open
            .get_or_insert_with(|| default_user_open(self.ctx));
        if ffi::next_command_filter_registered() && client.user == "default" && open {
            CloseMode::AtNextCommand
        } else {
            CloseMode::IdleOnly
        }
    }

    fn list(&mut self, client_ids: &[u64]) -> Vec<ListedClient> {
        look_up_clients(self.ctx, client_ids, self.connected)
    }
    fn tracking_sources(&mut self, target: u64) -> Vec<u64> {
        let tracking_clients = *self
            .tracking_clients
            .get_or_insert_with(|| ffi::tracking_clients(self.ctx));
        tracking_sources_of(self.ctx, target, monotonic_ms(), tracking_clients)
    }
    fn elapsed_us(&mut self) -> u64 {
        monotonic_us().saturating_sub(self.started_us)
    }
    fn unread_input_bytes(&mut self, fd: i32) -> usize {
        ffi::unread_input_bytes(fd)
    }
}

/// Seeds the registry with the clients that were connected before the module loaded. Their
/// connect time comes from `age=` and is marked approximate; it is taken at its lower bound,
/// so a seeded client is never thought older than it is.
pub fn seed_existing_clients(ctx: &Context) -> usize {
    let now_ms = monotonic_ms();
    let listed = list_clients(ctx, None);
    STATE
        .with(|policy| {
            for client in &listed {
                // The master link is never announced by the server (neither its connect nor,
                // when cached for a partial resync, its disconnect), so it is not tracked.
                if ClientType::of(client) == ClientType::Master {
                    continue;
                }
                if !policy.registry().contains(client.id) {
                    let connected_at_ms = now_ms.saturating_sub(client.lower_bound_age_ms());
                    policy.track(client.id, connected_at_ms, true);
                }
            }
            listed.len()
        })
        .unwrap_or(0)
}

/// Whether the `default` user is enabled and needs no password: then a client of `default`
/// closed inside its command (which resets it to `default`, unauthenticated) runs that command
/// exactly as before (see next_command.rs).
fn default_user_open(ctx: &Context) -> bool {
    let Ok(RedisValue::Array(fields)) = ctx.call("ACL", &["GETUSER", "default"][..]) else {
        return false;
    };
    let flags = fields
        .chunks(2)
        .find(|pair| matches!(&pair[0], value if reply_text(value.clone()) == "flags"))
        .and_then(|pair| match pair.get(1) {
            Some(RedisValue::Array(flags)) => Some(
                flags
                    .iter()
                    .map(|flag| reply_text(flag.clone()))
                    .collect::<Vec<String>>(),
            ),
            _ => None,
        })
        .unwrap_or_default();
    flags.iter().any(|f| f == "on") && flags.iter().any(|f| f == "nopass")
}
