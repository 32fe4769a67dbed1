//! The retire path: closing a client (the master link the server's own way), the FIN, the
//! counters and the audit line with its per-second cap. Enforcement and `MAXAGE.KILL` both end
//! here, once per client.

use std::collections::VecDeque;

use lazy_static::lazy_static;
use redis_module::{Context, RedisValue};

use crate::policy::audit::{Origin, Reason, RetiredClient, retirement_line};
use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::server::ffi::{self, LogLevel};
use crate::server::server_view::list_clients;
use crate::server::shut_down;
use crate::server::state::{AUDIT, MainThreadCell, STATE};
use crate::server::stats;

/// A one-shot kill closes this many clients per event-loop pass. The server frees the clients
/// closed in a pass all at once after it (about 10 us each here, measured with perf on Redis
/// 7.0 and on Valkey 9.1's native kill alike, most of it the kernel's TCP close), so a kill of
/// 5,000 at once held every other client up for 53 ms; in passes of 100 each one costs about
/// a millisecond and the whole kill a few more than at once.
pub const KILL_PASS: usize = 100;

/// A client a one-shot kill selected, to close now or in a later pass.
#[derive(Debug)]
pub enum KillTarget {
    /// From `CLIENT LIST` (its audit line needs nothing more).
    Listed {
        client: Box<ListedClient>,
        age_ms: u64,
    },
    /// From the registry (id and age only).
    ById { client_id: u64, age_ms: u64 },
}

impl KillTarget {
    fn client_id(&self) -> u64 {
        match self {
            KillTarget::Listed { client, .. } => client.id,
            KillTarget::ById { client_id, .. } => *client_id,
        }
    }
}

lazy_static! {
    /// The rest of one-shot kills, closed `KILL_PASS` a pass by the wake-up.
    static ref KILLS_QUEUED: MainThreadCell<VecDeque<KillTarget>> =
        MainThreadCell::new(VecDeque::new());
}

/// `MAXAGE.KILL`'s closes (after its reply): the first `KILL_PASS` now, the rest in the next
/// passes (the caller re-arms the wake-up). The caller itself (`SKIPME no`) and a master link
/// are always closed now. Queued clients count as being closed already, so no kill or wake-up
/// in between selects, counts or logs them again.
pub fn kill_spread(ctx: &Context, targets: Vec<KillTarget>, now_ms: u64) {
    let caller_id = ffi::current_client_id(ctx);
    let mut closed_now = 0;
    for target in targets {
        let at_once = match &target {
            KillTarget::Listed { client, .. } => {
                client.id == caller_id || ClientType::of(client) == ClientType::Master
            }
            KillTarget::ById { client_id, .. } => *client_id == caller_id,
        };
        if at_once || closed_now < KILL_PASS {
            close_target(ctx, target, now_ms);
            closed_now += 1;
        } else {
            STATE.with(|policy| policy.mark_closed(target.client_id()));
            KILLS_QUEUED.with(|queue| queue.push_back(target));
        }
    }
}

/// Closes the next `KILL_PASS` queued kills (from the wake-up).
pub fn close_queued_kills(ctx: &Context, now_ms: u64) {
    let batch: Vec<KillTarget> = KILLS_QUEUED
        .with(|queue| {
            let take = queue.len().min(KILL_PASS);
            queue.drain(..take).collect()
        })
        .unwrap_or_default();
    for target in batch {
        close_target(ctx, target, now_ms);
    }
}

/// Whether kills wait for a pass (the wake-up must come at once).
pub fn kills_queued() -> bool {
    KILLS_QUEUED
        .with(|queue| !queue.is_empty())
        .unwrap_or(false)
}

/// Closes every queued kill now (module unload: the kill's reply promised them).
pub fn close_all_queued_kills(ctx: &Context, now_ms: u64) {
    while kills_queued() {
        close_queued_kills(ctx, now_ms);
    }
}

fn close_target(ctx: &Context, target: KillTarget, now_ms: u64) {
    match target {
        KillTarget::Listed { client, age_ms } => {
            retire(ctx, &client, age_ms, Reason::ManualKill, now_ms);
        }
        KillTarget::ById { client_id, age_ms } => {
            retire_by_id(ctx, client_id, age_ms, Reason::ManualKill, now_ms);
        }
    }
}

/// Closes one client (or, in observe mode for enforcement, only says it would), counts it and
/// writes the audit line.
pub fn retire(ctx: &Context, client: &ListedClient, age_ms: u64, reason: Reason, now_ms: u64) {
    // Observe mode is about the operator's limits; a client's own request is carried out.
    let observe_only = matches!(reason, Reason::MaxAge | Reason::MaxAgeGraceExpired)
        && STATE
            .with(|policy| policy.settings().observe_only)
            .unwrap_or(false);
    if !observe_only {
        // A client of one of Redis 8's I/O threads: its socket is shut down, the server frees
        // it without a pause of the thread (shut_down.rs). It has had its FIN.
        let shut =
            ClientType::of(client) != ClientType::Master && shut_down::applies_to(ctx, client);
        let closed = if ClientType::of(client) == ClientType::Master {
            close_master_link(ctx, client.id)
        } else if shut {
            shut_down::close(client, now_ms);
            true
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
        if reason != Reason::ManualKill && !shut {
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
    record_with(ctx, age_ms, reason, false, now_ms, || {
        list_clients(ctx, Some(&[client_id]))
            .into_iter()
            .next()
            .unwrap_or_else(|| ListedClient {
                id: client_id,
                ..ListedClient::default()
            })
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
    record_with(ctx, age_ms, reason, observe_only, now_ms, || client.clone());
}

/// Counts a retirement and writes its audit line; `client` is only asked for (a lookup, or a
/// copy) when the audit cap lets the line be logged.
fn record_with(
    ctx: &Context,
    age_ms: u64,
    reason: Reason,
    observe_only: bool,
    now_ms: u64,
    client: impl FnOnce() -> ListedClient,
) {
    stats::count_retirement(reason, observe_only);
    audit(ctx, now_ms, reason.origin(), || {
        let client = client();
        let noticed = STATE
            .with(|policy| policy.notices_view().get(client.id))
            .flatten()
            .is_some_and(|opted_in| opted_in.sent_at_ms.is_some());
        retirement_line(
            &RetiredClient {
                client_id: client.id,
                addr: &client.addr,
                user: &client.user,
                name: &client.name,
                age_ms,
                noticed,
            },
            reason,
            observe_only,
        )
    });
}

/// Logs that a client told to leave (`MAXAGE.NOTICE`) closed its connection itself, under the
/// clients' own audit cap: it was the client's act.
pub fn audit_left_after_notice(ctx: &Context, client_id: u64, sent_at_ms: u64) {
    let now_ms = ffi::monotonic_ms();
    audit(ctx, now_ms, Origin::Client, || {
        format!(
            "maxage: client id={client_id} left by itself {} ms after its notice reason=left-after-notice",
            now_ms.saturating_sub(sent_at_ms)
        )
    });
}

/// Logs an audit line through the per-second cap (the line is only built when it is logged),
/// and any summary the cap owes.
fn audit(ctx: &Context, now_ms: u64, origin: Origin, line: impl FnOnce() -> String) {
    let Some((summaries, log_line)) = AUDIT.with(|audit| audit.admit(now_ms, origin)) else {
        return;
    };
    for summary in summaries {
        ffi::log(ctx, LogLevel::Notice, &summary);
    }
    if log_line {
        ffi::log(ctx, LogLevel::Notice, &line());
    }
}

/// When the audit cap owes a summary line, if it does.
pub fn audit_summary_due_at_ms() -> Option<u64> {
    AUDIT.with(|audit| audit.summary_due_at_ms()).flatten()
}

/// Logs the summary the audit cap owes for a finished second, if any.
pub fn flush_audit(ctx: &Context, now_ms: u64) {
    for summary in AUDIT.with(|audit| audit.flush(now_ms)).unwrap_or_default() {
        ffi::log(ctx, LogLevel::Notice, &summary);
    }
}
