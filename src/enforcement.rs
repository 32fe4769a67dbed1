//! Automatic enforcement, the server side of `policy`: the client-change events, the one timer,
//! the bounded tick that retires due clients, and the close path shared with `MAXAGE.KILL`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use lazy_static::lazy_static;
use redis_module::{Context, RedisValue};

use crate::audit::{Reason, RetiredClient, retirement_line};
use crate::client_list::{ListedClient, parse_client_list};
use crate::closing::{FULL_RETRY_MS, Look, MAX_CLOSING};
use crate::config;
use crate::ffi::{self, LogLevel, monotonic_ms, monotonic_ms_ceil, monotonic_us};
use crate::filter::ClientType;
use crate::policy::{Decision, Policy};
use crate::state::{MainThreadCell, STATE};
use crate::stats;

/// At most this many due clients are looked up with one `CLIENT LIST ID ...` call, and never
/// more than twice what the pass may still close (a lookup costs a few microseconds a client).
const LOOKUP_BATCH: usize = 16;

lazy_static! {
    /// When the wake-up is armed for (monotonic ms), if it is.
    static ref ARMED: MainThreadCell<Option<u64>> = MainThreadCell::new(None);
    /// Tracking redirects seen in the last full `CLIENT LIST`: target id -> the clients whose
    /// invalidations go to it, and when that list was taken.
    static ref REDIRECTS: MainThreadCell<(u64, HashMap<u64, Vec<u64>>)> =
        MainThreadCell::new((0, HashMap::new()));
}

/// How long a full `CLIENT LIST` answers "who redirects to this client" (it costs about 15 ms
/// with 10,000 clients, so it is taken at most once a second, and only for likely targets).
const REDIRECTS_MAX_AGE_MS: u64 = 1000;

/// Whether invalidation messages of another client's tracking can go to this one: a RESP2
/// client must be subscribed (to `__redis__:invalidate`) to receive them; any RESP3 client can.
fn may_receive_invalidations(client: &ListedClient) -> bool {
    client.resp == 3 || (client.has_flag('P') && client.sub > 0)
}

/// The tracking clients that redirect their invalidations to `target`.
fn tracking_sources_of(ctx: &Context, target: u64, now_ms: u64) -> Vec<u64> {
    // Only a full `CLIENT LIST` shows redirects (15 ms at 10,000 clients); the server's count
    // of tracking clients, which costs next to nothing, says whether there can be any.
    if ffi::tracking_clients(ctx) == 0 {
        return Vec::new();
    }
    let stale = REDIRECTS
        .with(|(taken_at_ms, _)| now_ms.saturating_sub(*taken_at_ms) >= REDIRECTS_MAX_AGE_MS)
        .unwrap_or(true);
    if stale {
        let mut redirects: HashMap<u64, Vec<u64>> = HashMap::new();
        for client in list_clients(ctx, None) {
            if client.has_flag('t') && client.redir > 0 {
                redirects
                    .entry(client.redir as u64)
                    .or_default()
                    .push(client.id);
            }
        }
        REDIRECTS.with(|cached| *cached = (now_ms, redirects));
    }
    REDIRECTS
        .with(|(_, redirects)| redirects.get(&target).cloned().unwrap_or_default())
        .unwrap_or_default()
}

pub fn on_client_change(_ctx: &Context, client_id: u64, connected: bool) {
    let now_ms = monotonic_ms();
    STATE.with(|policy| {
        // Connections come and go all the time on a busy server: a moment to sample load.
        sample_load(policy);
        if connected {
            policy.on_connect(client_id, monotonic_ms_ceil());
        } else {
            policy.on_disconnect(client_id);
        }
    });
    if connected {
        rearm(now_ms);
    }
}

/// Called after any `maxage.*` setting changes: re-times every connected client at once.
pub fn on_settings_changed() {
    let now_ms = monotonic_ms();
    let settings = config::snapshot();
    STATE.with(|policy| {
        policy.apply_settings(settings, now_ms);
        sample_load(policy);
    });
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
    let Some((adaptive, closing)) = STATE.with(|policy| {
        (
            policy.settings.adaptive_pacing,
            !policy.closing().is_empty(),
        )
    }) else {
        return;
    };
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
            .with(|policy| policy.closing().before_sleep())
            .unwrap_or_default();
        if !cork.is_empty() {
            for fd in cork {
                ffi::hold_output(fd, true);
            }
            wake_no_later_than(now_ms);
        }
        return;
    }
    let Some((grace_ms, top)) = STATE.with(|policy| {
        let grace_ms = policy.settings.grace_ms;
        let top = policy
            .closing()
            .after_sleep(now_ms, grace_ms, ffi::unread_input_bytes);
        (grace_ms, top)
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
    let listed: HashMap<u64, ListedClient> = list_clients(ctx, Some(&look_now))
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
            let look = policy.closing().look(client, unread, now_ms, grace_ms);
            let age_ms = policy
                .registry
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
            if reply_sent {
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

/// Feeds the event loop's busy time to adaptive pacing.
pub fn sample_load(policy: &mut Policy) {
    policy.observe_load(|| (monotonic_us(), ffi::event_loop_busy_us()));
}

/// Arms the wake-up for the policy's next one, unless it is already armed for no later.
pub fn rearm(now_ms: u64) {
    let wake = STATE
        .with(|policy| {
            let grace_ms = policy.settings.grace_ms;
            let closing = policy.closing().next_look_ms(grace_ms);
            match (policy.next_wake_ms(now_ms), closing) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
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
pub fn disarm() {
    ARMED.with(|armed| *armed = None);
    ffi::cancel_wakeup();
}

pub fn on_wakeup(ctx: &Context) {
    let started_us = monotonic_us();
    ARMED.with(|armed| *armed = None);
    tick(ctx);
    update_event_loop_watch(ctx);
    rearm(monotonic_ms());
    let took_us = monotonic_us() - started_us;
    stats::LONGEST_WAKEUP_US.fetch_max(took_us, Ordering::Relaxed);
    stats::WAKEUPS.fetch_add(1, Ordering::Relaxed);
    stats::WAKEUP_US_TOTAL.fetch_add(took_us, Ordering::Relaxed);
}

/// `CLIENT LIST`, or `CLIENT LIST ID ...` for just the given clients.
pub fn list_clients(ctx: &Context, ids: Option<&[u64]>) -> Vec<ListedClient> {
    let id_strings: Vec<String> = ids.unwrap_or_default().iter().map(u64::to_string).collect();
    let mut args: Vec<&str> = vec!["LIST"];
    if ids.is_some() {
        args.push("ID");
        args.extend(id_strings.iter().map(String::as_str));
    }
    match ctx.call("CLIENT", args.as_slice()) {
        Ok(reply) => parse_client_list(&reply_text(reply)),
        Err(error) => {
            ffi::log(
                ctx,
                LogLevel::Warning,
                &format!("maxage: CLIENT LIST failed: {error}"),
            );
            Vec::new()
        }
    }
}

pub fn reply_text(reply: RedisValue) -> String {
    match reply {
        RedisValue::SimpleString(s) | RedisValue::BulkString(s) => s,
        RedisValue::StringBuffer(bytes) | RedisValue::VerbatimString((_, bytes)) => {
            String::from_utf8_lossy(&bytes).into_owned()
        }
        RedisValue::BulkRedisString(s) => s.to_string_lossy(),
        _ => String::new(),
    }
}

/// Closes one client (or, in observe mode for enforcement, only says it would), counts it and
/// writes the audit line.
pub fn retire(ctx: &Context, client: &ListedClient, age_ms: u64, reason: Reason, now_ms: u64) {
    // Observe mode is about the operator's limits; a client's own request is carried out.
    let observe_only = matches!(reason, Reason::MaxAge | Reason::MaxAgeGraceExpired)
        && STATE
            .with(|policy| policy.settings.observe_only)
            .unwrap_or(false);
    if !observe_only {
        let closed = if ClientType::of(client) == ClientType::Master {
            close_master_link(ctx, client.id)
        } else {
            ffi::close_client(ctx, client.id)
        };
        if !closed {
            return;
        }
        // (The master link's close already did what its disconnect would.)
        if ClientType::of(client) != ClientType::Master {
            STATE.with(|policy| policy.mark_closed(client.id));
        }
        // Only enforcement picks its moment (right after a reply) and needs the FIN out at
        // once; a one-shot kill of thousands would pay a system call per client for nothing.
        if reason != Reason::ManualKill {
            ffi::send_fin_now(client.fd);
        }
    }
    record_retirement(ctx, client, age_ms, reason, observe_only, now_ms);
}

/// Closes a replica's link to its master the way the server's own `CLIENT KILL` does. The
/// module API's close resets the client's user to `default` first, and the replica keeps that
/// client for a partial resync: with a restricted `default` user every replicated write would
/// then be refused by ACL, silently. `CLIENT KILL ID` leaves the user alone (the master link is
/// never the caller, whose own id would crash Redis 7.0 here).
fn close_master_link(ctx: &Context, client_id: u64) -> bool {
    if client_id == ffi::current_client_id(ctx) {
        return false;
    }
    let id = client_id.to_string();
    let killed = matches!(
        ctx.call("CLIENT", &["KILL", "ID", id.as_str()][..]),
        Ok(RedisValue::Integer(1))
    );
    // The server announces neither the master link's connect nor (when it caches it for a
    // partial resync) its disconnect.
    STATE.with(|policy| policy.on_disconnect(client_id));
    killed
}

/// Closes one tracked client known only by id (a `MAXAGE.KILL` the registry answered): no
/// `CLIENT LIST` is taken, except of this one client when its audit line is logged (at most
/// the audit cap's 40 a second). Never the master link, which is not tracked.
pub fn retire_by_id(ctx: &Context, client_id: u64, age_ms: u64, reason: Reason, now_ms: u64) {
    if !ffi::close_client(ctx, client_id) {
        return;
    }
    STATE.with(|policy| policy.mark_closed(client_id));
    stats::count_retirement(reason, false);
    audit(ctx, now_ms, || {
        let listed = list_clients(ctx, Some(&[client_id]))
            .into_iter()
            .next()
            .unwrap_or_else(|| ListedClient {
                id: client_id,
                ..ListedClient::default()
            });
        retirement_line(
            &RetiredClient {
                client_id,
                addr: &listed.addr,
                user: &listed.user,
                name: &listed.name,
                age_ms,
            },
            reason,
            false,
        )
    });
}

/// Counts a retirement and writes its audit line.
pub fn record_retirement(
    ctx: &Context,
    client: &ListedClient,
    age_ms: u64,
    reason: Reason,
    observe_only: bool,
    now_ms: u64,
) {
    stats::count_retirement(reason, observe_only);
    audit(ctx, now_ms, || {
        retirement_line(
            &RetiredClient {
                client_id: client.id,
                addr: &client.addr,
                user: &client.user,
                name: &client.name,
                age_ms,
            },
            reason,
            observe_only,
        )
    });
}

/// Logs an audit line through the per-second cap (the line is only built when it is logged),
/// and any summary the cap owes.
fn audit(ctx: &Context, now_ms: u64, line: impl FnOnce() -> String) {
    let Some((summary, log_line)) = STATE.with(|policy| policy.audit.admit(now_ms)) else {
        return;
    };
    if let Some(summary) = summary {
        ffi::log(ctx, LogLevel::Notice, &summary);
    }
    if log_line {
        ffi::log(ctx, LogLevel::Notice, &line());
    }
}

/// Logs the summary the audit cap owes for a finished second, if any.
fn flush_audit(ctx: &Context, now_ms: u64) {
    if let Some(summary) = STATE.with(|policy| policy.audit.flush(now_ms)).flatten() {
        ffi::log(ctx, LogLevel::Notice, &summary);
    }
}

fn tick(ctx: &Context) {
    let started_us = monotonic_us();
    let now_ms = monotonic_ms();
    flush_audit(ctx, now_ms);

    let Some((observe_only, budget)) = STATE.with(|policy| {
        sample_load(policy);
        (policy.settings.observe_only, policy.start_pass())
    }) else {
        return;
    };
    let mut closed = 0;
    // Every due client was dealt with in this pass (none left waiting for a token or time).
    let mut drained = false;
    // Clients to look at again go back into the queue only after this pass, so that one asked
    // to be looked at "right after the next write" is not looked at again within this pass.
    let mut look_again: Vec<(u64, u64)> = Vec::new();
    'batches: while closed < budget.closes
        && monotonic_us().saturating_sub(started_us) < budget.micros
    {
        let lookups = LOOKUP_BATCH.min(2 * (budget.closes - closed));
        let batch = STATE
            .with(|policy| policy.take_due(now_ms, lookups))
            .unwrap_or_default();
        if batch.is_empty() {
            drained = true;
            break;
        }
        let listed: HashMap<u64, ListedClient> = list_clients(ctx, Some(&batch))
            .into_iter()
            .map(|client| (client.id, client))
            .collect();
        for (position, client_id) in batch.iter().enumerate() {
            // Gone, or already being closed (a MAXAGE.KILL earlier in this event-loop pass).
            let Some(client) = listed.get(client_id).filter(|c| !c.has_flag('A')) else {
                continue;
            };
            let Some((decision, age_ms)) = STATE.with(|policy| {
                let age_ms = policy
                    .registry
                    .get(*client_id)
                    .map_or(client.lower_bound_age_ms(), |c| c.age_ms(now_ms));
                (policy.decide(client, now_ms), age_ms)
            }) else {
                continue;
            };
            match decision {
                Decision::Exempt { recheck_at_ms } => {
                    stats::EXEMPTIONS.fetch_add(1, Ordering::Relaxed);
                    look_again.push((*client_id, recheck_at_ms));
                }
                Decision::NotYet { due_at_ms } => look_again.push((*client_id, due_at_ms)),
                Decision::Retire(reason) => {
                    if may_receive_invalidations(client) {
                        let sources = tracking_sources_of(ctx, client.id, now_ms);
                        let hold = STATE
                            .with(|policy| {
                                policy.hold_for_tracking_sources(client.id, &sources, now_ms)
                            })
                            .flatten();
                        if let Some(retry_at_ms) = hold {
                            look_again.push((*client_id, retry_at_ms));
                            continue;
                        }
                    }
                    let observe_this = observe_only
                        && matches!(reason, Reason::MaxAge | Reason::MaxAgeGraceExpired);
                    let Some((already_waiting, full)) = STATE.with(|policy| {
                        let closing = policy.closing();
                        (closing.contains(*client_id), closing.len() >= MAX_CLOSING)
                    }) else {
                        continue;
                    };
                    if already_waiting {
                        continue;
                    }
                    if full && !observe_this && ClientType::of(client) != ClientType::Master {
                        look_again.push((*client_id, now_ms + FULL_RETRY_MS));
                        continue;
                    }
                    let paced_out = closed >= budget.closes
                        || !STATE
                            .with(|policy| {
                                let deadline_ms = policy.class_deadline_of(client);
                                policy.try_take_token(now_ms, deadline_ms)
                            })
                            .unwrap_or(false);
                    if paced_out {
                        STATE.with(|policy| policy.hold_back(now_ms));
                        stats::PACING_DELAYS.fetch_add(1, Ordering::Relaxed);
                        look_again.extend(batch[position..].iter().map(|id| (*id, now_ms)));
                        break 'batches;
                    }
                    // Observe mode closes nothing; a replica's link to its master carries no
                    // requests of ours to spare and goes at once.
                    if observe_this || ClientType::of(client) == ClientType::Master {
                        retire(ctx, client, age_ms, reason, now_ms);
                    } else {
                        let armed = STATE
                            .with(|policy| policy.closing().arm(client.clone(), reason, now_ms))
                            .unwrap_or(false);
                        if !armed {
                            look_again.push((*client_id, now_ms + FULL_RETRY_MS));
                            continue;
                        }
                    }
                    if !observe_this {
                        closed += 1;
                    }
                }
            }
        }
    }
    STATE.with(|policy| {
        policy.end_pass(drained);
        for (client_id, at_ms) in look_again {
            policy.requeue(client_id, at_ms);
        }
    });
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
                if !policy.registry.contains(client.id) {
                    let connected_at_ms = now_ms.saturating_sub(client.lower_bound_age_ms());
                    policy.track(client.id, connected_at_ms, true);
                }
            }
            listed.len()
        })
        .unwrap_or(0)
}
