//! The server's view of its clients: the one place that asks the server about them (`CLIENT
//! LIST`, whole or for given ids), who redirects client-side-caching invalidations to whom, and
//! the event loop's load for adaptive pacing. Kill, list, preview, enforcement and INFO read
//! clients through here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lazy_static::lazy_static;
use redis_module::{CallOptionsBuilder, CallReply, CallResult, Context, RedisValue};

use crate::policy::client_list::{
    ListedClient, PauseCost, parse_client_list, whole_list_answers_lookup,
};
use crate::server::ffi::{self, LogLevel};
use crate::server::state::MainThreadCell;

lazy_static! {
    /// Tracking redirects seen in the last full `CLIENT LIST`: target id -> the clients whose
    /// invalidations go to it, and when that list was taken.
    static ref REDIRECTS: MainThreadCell<(u64, HashMap<u64, Vec<u64>>)> =
        MainThreadCell::new((0, HashMap::new()));
}

/// Whole `CLIENT LIST` calls the module made (the lookups of given ids are not counted): what
/// an application can make the module do is bounded by this (INFO `full_client_lists`).
pub static FULL_CLIENT_LISTS: AtomicU64 = AtomicU64::new(0);

/// Whether a listing has shown a client owned by an I/O thread (Redis 8's `io-thread=` above 0):
/// then each client a look-up shows pauses its thread (`look_up_clients`). A whole listing
/// says afresh; a look-up of given ids can only say yes.
static THREADS_OWN_CLIENTS: AtomicBool = AtomicBool::new(false);

/// Look-ups of given ids that a whole `CLIENT LIST` answered (`look_up_clients`).
pub static WHOLE_LIST_LOOKUPS: AtomicU64 = AtomicU64::new(0);

lazy_static! {
    /// What a pause of an I/O thread costs, as look-ups of given ids measure it.
    static ref PAUSE_COST: MainThreadCell<PauseCost> = MainThreadCell::new(PauseCost::START);
}

/// How long a full `CLIENT LIST` answers "who redirects to this client" (it costs about 15 ms
/// with 10,000 clients, so it is taken at most once a second, and only for likely targets).
const REDIRECTS_MAX_AGE_MS: u64 = 1000;

/// The tracking clients that redirect their invalidations to `target`, given the server's
/// count of clients with tracking on (`ffi::tracking_clients`).
pub fn tracking_sources_of(
    ctx: &Context,
    target: u64,
    now_ms: u64,
    tracking_clients: u64,
) -> Vec<u64> {
    // Only a full `CLIENT LIST` shows redirects (15 ms at 10,000 clients); the server's count
    // of tracking clients says whether there can be any.
    if tracking_clients == 0 {
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

/// The server's view of the given clients (those gone are missing), for a batch of due clients
/// among about `connected` clients. Where I/O threads own clients (Redis 8), `CLIENT LIST ID`
/// pauses a client's thread for each client it shows, so a batch among few clients is read
/// from one whole `CLIENT LIST` instead, which pauses each thread once
/// (`whole_list_answers_lookup` bounds what that formats per client asked for). Not counted
/// in `FULL_CLIENT_LISTS`: its cost is a look-up's, bounded per id.
pub fn look_up_clients(ctx: &Context, ids: &[u64], connected: usize) -> Vec<ListedClient> {
    let threads_own_clients = THREADS_OWN_CLIENTS.load(Ordering::Relaxed);
    let pause = PAUSE_COST.with(|cost| *cost).unwrap_or(PauseCost::START);
    if !whole_list_answers_lookup(ids.len(), connected, threads_own_clients, pause) {
        return list_clients(ctx, Some(ids));
    }
    PAUSE_COST.with(|cost| *cost = cost.after_whole_list());
    WHOLE_LIST_LOOKUPS.fetch_add(1, Ordering::Relaxed);
    let wanted: HashSet<u64> = ids.iter().copied().collect();
    call_client_list(ctx, &["LIST"])
        .into_iter()
        .filter(|client| wanted.contains(&client.id))
        .collect()
}

/// `CLIENT LIST`, or `CLIENT LIST ID ...` for just the given clients.
pub fn list_clients(ctx: &Context, ids: Option<&[u64]>) -> Vec<ListedClient> {
    let id_strings: Vec<String> = ids.unwrap_or_default().iter().map(u64::to_string).collect();
    let mut args: Vec<&str> = vec!["LIST"];
    if ids.is_some() {
        args.push("ID");
        args.extend(id_strings.iter().map(String::as_str));
    } else {
        FULL_CLIENT_LISTS.fetch_add(1, Ordering::Relaxed);
    }
    call_client_list(ctx, &args)
}

fn call_client_list(ctx: &Context, args: &[&str]) -> Vec<ListedClient> {
    // Parsed where the server's reply lies: a client may have a name of hundreds of MB, and
    // the module keeps only the first bytes of it (client_list.rs), so the reply is not copied.
    let started_us = ffi::monotonic_us();
    let reply: CallResult = ctx.call_ext("CLIENT", &CallOptionsBuilder::new().build(), args);
    let elapsed_us = ffi::monotonic_us().saturating_sub(started_us);
    match reply {
        Ok(CallReply::String(text)) => {
            let listed = parse_client_list(&String::from_utf8_lossy(text.as_bytes()));
            let thread_owned = listed.iter().filter(|client| client.io_thread > 0).count();
            if args.len() == 1 {
                THREADS_OWN_CLIENTS.store(thread_owned > 0, Ordering::Relaxed);
            } else if thread_owned > 0 {
                THREADS_OWN_CLIENTS.store(true, Ordering::Relaxed);
                PAUSE_COST.with(|cost| *cost = cost.after_id_lookup(elapsed_us, thread_owned));
            }
            listed
        }
        other => {
            let why = match other {
                Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
                Ok(_) => "an unexpected reply".to_string(),
            };
            ffi::log(
                ctx,
                LogLevel::Warning,
                &format!("maxage: CLIENT LIST failed: {why}"),
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
