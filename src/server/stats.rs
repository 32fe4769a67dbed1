//! Counters and the `INFO maxage` section.
//!
//! Counters are relaxed atomics: they are written on the main thread and only ever read whole,
//! so no ordering between them is needed.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::audit::Reason;
use crate::server::ffi::{InfoWriter, monotonic_ms};
use crate::server::state::STATE;

pub static EVICTED_BY_MAX_AGE: AtomicU64 = AtomicU64::new(0);
pub static EVICTED_AFTER_GRACE: AtomicU64 = AtomicU64::new(0);
pub static EVICTED_BY_COMMAND: AtomicU64 = AtomicU64::new(0);
pub static EVICTED_CLIENT_REQUESTED: AtomicU64 = AtomicU64::new(0);
pub static EVICTED_BY_GRACEFUL_KILL: AtomicU64 = AtomicU64::new(0);
/// How enforcement's closes happened: right after a reply the client had just been sent, or
/// while the connection was idle (the rest are grace expiries).
pub static CLOSED_AFTER_REPLY: AtomicU64 = AtomicU64::new(0);
pub static CLOSED_WHILE_IDLE: AtomicU64 = AtomicU64::new(0);
/// Of `CLOSED_AFTER_REPLY`: closed from inside their own next command (Redis 8 I/O threads).
pub static CLOSED_IN_NEXT_COMMAND: AtomicU64 = AtomicU64::new(0);
/// Notices (`MAXAGE.NOTICE`) sent, and how the connections told left: by themselves, or
/// closed by the module when their time ran out (the backstop).
pub static NOTICES_SENT: AtomicU64 = AtomicU64::new(0);
pub static NOTICED_LEFT_THEMSELVES: AtomicU64 = AtomicU64::new(0);
pub static NOTICED_CLOSED_BY_MODULE: AtomicU64 = AtomicU64::new(0);
pub static OBSERVED_WOULD_EVICT: AtomicU64 = AtomicU64::new(0);
pub static EXEMPTIONS: AtomicU64 = AtomicU64::new(0);
pub static SAFE_MOMENT_POLLS: AtomicU64 = AtomicU64::new(0);
pub static PACING_DELAYS: AtomicU64 = AtomicU64::new(0);
/// Due clients found parked in a pool and given time to send a request (policy/closing.rs).
pub static PARKED_GIVEN_TIME: AtomicU64 = AtomicU64::new(0);
pub static COMPAT_KILLS: AtomicU64 = AtomicU64::new(0);
/// The longest one wake-up has held the event loop, in microseconds (the server's own work of
/// freeing the clients it closed comes after it, in the same pass).
pub static LONGEST_WAKEUP_US: AtomicU64 = AtomicU64::new(0);
/// Wake-ups and the time they held the event loop in all: their mean is the typical stall.
pub static WAKEUPS: AtomicU64 = AtomicU64::new(0);
pub static WAKEUP_US_TOTAL: AtomicU64 = AtomicU64::new(0);

pub fn count_retirement(reason: Reason, observe_only: bool) {
    let counter = match (observe_only, reason) {
        (true, _) => &OBSERVED_WOULD_EVICT,
        (false, Reason::MaxAge) => &EVICTED_BY_MAX_AGE,
        (false, Reason::MaxAgeGraceExpired) => &EVICTED_AFTER_GRACE,
        (false, Reason::ManualKill) => &EVICTED_BY_COMMAND,
        (false, Reason::ClientRequested) => &EVICTED_CLIENT_REQUESTED,
        (false, Reason::Drain) => &EVICTED_BY_GRACEFUL_KILL,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What INFO shows of the policy's state, read in one borrow.
struct PolicySnapshot {
    tracked: u64,
    approximate: u64,
    age_histogram: [u64; 6],
    in_grace: u64,
    draining: u64,
    due: u64,
    oldest: Option<u64>,
    next_deadline: Option<u64>,
    heap_bytes: u64,
    event_loop_busy_pct: u64,
    rate_now: u64,
    opted_in: u64,
}

impl PolicySnapshot {
    fn of(policy: &mut crate::policy::decisions::Policy, now_ms: u64) -> Self {
        // Nothing else reads the load while no client is due; INFO shows it as of now.
        crate::server::thread_load::sample_load(policy);
        let registry = policy.registry();
        Self {
            tracked: registry.len() as u64,
            approximate: registry.iter().filter(|c| c.approximate).count() as u64,
            age_histogram: registry.iter().fold([0u64; 6], |mut histogram, client| {
                histogram[crate::commands::preview::bucket_of(client.age_ms(now_ms))] += 1;
                histogram
            }),
            in_grace: policy.clients_in_grace() as u64,
            draining: policy.clients_draining() as u64,
            due: policy.clients_due(now_ms) as u64,
            oldest: policy.oldest_age_ms(now_ms),
            next_deadline: policy.next_deadline_ms(),
            heap_bytes: policy.heap_bytes() as u64,
            event_loop_busy_pct: (policy.event_loop_busy_share() * 100.0).round() as u64,
            rate_now: policy.current_rate_per_sec(),
            opted_in: policy.notices_view().len() as u64,
        }
    }
}

/// Writes the `maxage` section. The server prefixes every field with `maxage_`.
pub fn write_info(info: &mut InfoWriter) {
    let now_ms = monotonic_ms();
    info.section(c"");
    let Some(PolicySnapshot {
        tracked,
        approximate,
        age_histogram,
        in_grace,
        draining,
        due,
        oldest,
        next_deadline,
        heap_bytes,
        event_loop_busy_pct,
        rate_now,
        opted_in,
    }) = STATE.with(|policy| PolicySnapshot::of(policy, now_ms))
    else {
        return;
    };
    let by_max_age = get(&EVICTED_BY_MAX_AGE);
    let after_grace = get(&EVICTED_AFTER_GRACE);
    let by_command = get(&EVICTED_BY_COMMAND);
    let client_requested = get(&EVICTED_CLIENT_REQUESTED);
    info.field_u64("tracked_clients", tracked);
    info.field_u64("approximate_age_clients", approximate);
    let buckets: Vec<String> = crate::commands::preview::AGE_BUCKETS_MS
        .iter()
        .map(|(_, name)| *name)
        .chain(std::iter::once(crate::commands::preview::LAST_BUCKET))
        .zip(age_histogram)
        .map(|(name, count)| format!("{name}={count}"))
        .collect();
    info.field_str("age_histogram", &buckets.join(","));
    info.field_u64(
        "evicted_connections",
        by_max_age + after_grace + by_command + client_requested + get(&EVICTED_BY_GRACEFUL_KILL),
    );
    info.field_u64("evicted_max_age", by_max_age);
    info.field_u64("evicted_max_age_after_grace", after_grace);
    info.field_u64("evicted_manual", by_command);
    info.field_u64("evicted_client_requested", client_requested);
    info.field_u64("evicted_graceful_kill", get(&EVICTED_BY_GRACEFUL_KILL));
    info.field_u64("closed_after_reply", get(&CLOSED_AFTER_REPLY));
    info.field_u64("closed_while_idle", get(&CLOSED_WHILE_IDLE));
    info.field_u64("closed_in_next_command", get(&CLOSED_IN_NEXT_COMMAND));
    info.field_u64("observed_would_evict", get(&OBSERVED_WOULD_EVICT));
    info.field_u64("exempted", get(&EXEMPTIONS));
    info.field_u64("safe_moment_polls", get(&SAFE_MOMENT_POLLS));
    info.field_u64("pacing_delays", get(&PACING_DELAYS));
    info.field_u64("parked_given_time", get(&PARKED_GIVEN_TIME));
    info.field_u64("compat_client_kill_calls", get(&COMPAT_KILLS));
    info.field_u64("longest_wakeup_us", get(&LONGEST_WAKEUP_US));
    info.field_u64("wakeups", get(&WAKEUPS));
    info.field_u64("wakeup_us_total", get(&WAKEUP_US_TOTAL));
    info.field_u64(
        "full_client_lists",
        get(&crate::server::server_view::FULL_CLIENT_LISTS),
    );
    info.field_u64(
        "whole_list_lookups",
        get(&crate::server::server_view::WHOLE_LIST_LOOKUPS),
    );
    info.field_u64("notices_sent", get(&NOTICES_SENT));
    info.field_u64("noticed_left_themselves", get(&NOTICED_LEFT_THEMSELVES));
    info.field_u64("noticed_closed_by_module", get(&NOTICED_CLOSED_BY_MODULE));
    info.field_u64("clients_opted_in_to_notices", opted_in);
    info.field_u64("clients_in_grace", in_grace);
    info.field_u64("clients_draining", draining);
    info.field_u64("clients_delayed_by_pacing", due);
    info.field_u64("oldest_client_age_ms", oldest.unwrap_or(0));
    let next = next_deadline.map_or(-1, |deadline| deadline.saturating_sub(now_ms) as i64);
    info.field_str("next_deadline_in_ms", &next.to_string());
    info.field_u64("registry_bytes", heap_bytes);
    info.field_u64(
        "registry_bytes_per_client",
        heap_bytes.checked_div(tracked).unwrap_or(0),
    );
    // The settings in force, from the settings table (all of them, so none is forgotten).
    for (name, value) in crate::policy::config::info_fields() {
        info.field_str(&name, &value);
    }
    info.field_u64("evictions_per_sec_now", rate_now);
    info.field_u64("event_loop_busy_pct", event_loop_busy_pct);
    info.field_u64(
        "ffi_errors",
        crate::server::ffi::FFI_ERRORS.load(Ordering::Relaxed),
    );
}
