//! Notices, the server side (the bookkeeping is `policy::notices`): registering a connection's
//! notice key in its own client-side-caching table, telling clients from the wake-up, and
//! counting how the connections that were told left.
//!
//! The key is registered by running the module's read-only `MAXAGE.NOTICEKEY <key>` with
//! `RM_Call` inside the client's own `MAXAGE.NOTICE`: the server remembers the keys a read-only
//! command reads for the client that issued the outer command (`call()` in server.c uses
//! `server.current_client`), exactly as if the client had read the key itself, but without
//! the client having to name a key (which in a cluster would be redirected to another node).
//! The notice is `RM_SignalModifiedKey` on that key: the server sends the one client tracking
//! it an invalidation push and forgets the key, on this node only.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use lazy_static::lazy_static;
use redis_module::{Context, RedisValue};

use crate::policy::client_list::ListedClient;
use crate::policy::decisions::NoticeStep;
use crate::policy::notices::{OptedIn, key_of, tag_for_slots};
use crate::server::ffi;
use crate::server::server_view::list_clients;
use crate::server::state::{MainThreadCell, STATE};
use crate::server::stats::{NOTICED_CLOSED_BY_MODULE, NOTICED_LEFT_THEMSELVES, NOTICES_SENT};

/// At most this many notices a wake-up (each is a lookup and a push of a few dozen bytes).
const NOTICES_PER_PASS: usize = 256;
/// Opted-in clients looked up with one `CLIENT LIST ID ...`.
const LOOKUP_BATCH: usize = 64;
/// Hash tags tried to find one in this node's slots (a node with one slot in 16,384 needs about
/// 16,384 on average; each try is a CRC16 of a few bytes).
const MAX_TAG_TRIES: u32 = 1_000_000;
/// After a failed search (no slots here, or a replica asked by a client without `READONLY`) a
/// new one is not tried for this long, so repeated opt-ins cost O(1).
const TAG_RETRY_MS: u64 = 1000;

#[derive(Default)]
struct SlotTag {
    tag: Option<u32>,
    searched_at_ms: Option<u64>,
}

lazy_static! {
    /// The hash tag of this cluster node's notice keys, found once and kept while it works.
    static ref SLOT_TAG: MainThreadCell<SlotTag> = MainThreadCell::new(SlotTag::default());
    /// Keys of connections that left, to invalidate in the next wake-up: the server keeps a
    /// tracked key until it is invalidated, whoever tracked it, and at the disconnect event the
    /// client is still tracking (it would be sent the push while being freed).
    static ref KEYS_TO_RELEASE: MainThreadCell<Vec<String>> = MainThreadCell::new(Vec::new());
}

/// Whether keys wait to be released (the wake-up must come at once).
pub fn keys_to_release() -> bool {
    KEYS_TO_RELEASE
        .with(|keys| !keys.is_empty())
        .unwrap_or(false)
}

/// Invalidates the keys of connections that left (from the wake-up).
pub fn release_keys() {
    let keys = KEYS_TO_RELEASE.with(std::mem::take).unwrap_or_default();
    for key in keys {
        ffi::signal_key_modified(&key);
    }
}

/// Redis 7.2 is the first to track what a module's `RM_Call` reads for the client whose
/// command made the call (Redis 7.0 tracks it only for scripts' callers).
const TRACKS_CALLS_FOR_CALLER: u32 = 0x00_07_02_00;

/// Whether `MAXAGE.NOTICE` can register the key itself; otherwise the client reads it with
/// `MAXAGE.NOTICEKEY <key>` (after `CLIENT CACHING yes`), which the reply tells it.
pub fn registers_for_caller() -> bool {
    ffi::server_version() >= TRACKS_CALLS_FOR_CALLER
}

/// Has the server remember `key` for the calling client, as if it had read it (Redis 7.2+):
/// otherwise checks only that the key is in a slot of this node, for the client to read it.
fn track_for_caller(ctx: &Context, key: &str) -> bool {
    ctx.call("MAXAGE.NOTICEKEY", &[key][..]).is_ok()
}

/// Registers the calling client's notice key (where the server allows, see
/// `registers_for_caller`). Returns its slot tag (cluster only), or `Err` when the key cannot
/// be kept on this node.
pub fn register_key(ctx: &Context, client_id: u64, now_ms: u64) -> Result<Option<u32>, ()> {
    if !ffi::cluster_enabled(ctx) {
        return track_for_caller(ctx, &key_of(client_id, None))
            .then_some(None)
            .ok_or(());
    }
    let cached = SLOT_TAG.with(|slot| slot.tag).flatten();
    if let Some(tag) = cached
        && track_for_caller(ctx, &key_of(client_id, Some(tag)))
    {
        return Ok(Some(tag));
    }
    let may_search = SLOT_TAG
        .with(|slot| {
            slot.searched_at_ms
                .is_none_or(|at_ms| now_ms.saturating_sub(at_ms) >= TAG_RETRY_MS)
        })
        .unwrap_or(false);
    if !may_search {
        return Err(());
    }
    let tag = tag_for_slots(&own_slot_ranges(ctx), MAX_TAG_TRIES);
    SLOT_TAG.with(|slot| {
        slot.tag = tag;
        slot.searched_at_ms = Some(now_ms);
    });
    match tag {
        Some(tag) if track_for_caller(ctx, &key_of(client_id, Some(tag))) => Ok(Some(tag)),
        _ => Err(()),
    }
}

/// The slot ranges this node serves, or whose primary it replicates (`CLUSTER SLOTS`).
fn own_slot_ranges(ctx: &Context) -> Vec<(u16, u16)> {
    let Ok(RedisValue::Array(ranges)) = ctx.call("CLUSTER", &["SLOTS"][..]) else {
        return Vec::new();
    };
    let Ok(my_id) = ctx
        .call("CLUSTER", &["MYID"][..])
        .map(crate::server::server_view::reply_text)
    else {
        return Vec::new();
    };
    let slot = |value: &RedisValue| match value {
        RedisValue::Integer(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    ranges
        .iter()
        .filter_map(|range| {
            let RedisValue::Array(fields) = range else {
                return None;
            };
            let (first, last) = (slot(fields.first()?)?, slot(fields.get(1)?)?);
            let ours = fields.iter().skip(2).any(|node| match node {
                RedisValue::Array(node) => node
                    .get(2)
                    .is_some_and(|id| crate::server::server_view::reply_text(id.clone()) == my_id),
                _ => false,
            });
            ours.then_some((first, last))
        })
        .collect()
}

/// The wake-up's notice pass: tells the opted-in clients whose notice is due (as many as
/// notice pacing allows) and re-times the others.
pub fn notice_pass(ctx: &Context, now_ms: u64) {
    let due = STATE
        .with(|policy| policy.take_due_notices(now_ms, NOTICES_PER_PASS))
        .unwrap_or_default();
    for batch in due.chunks(LOOKUP_BATCH) {
        let listed: HashMap<u64, ListedClient> = list_clients(ctx, Some(batch))
            .into_iter()
            .map(|client| (client.id, client))
            .collect();
        for client_id in batch {
            let Some(client) = listed.get(client_id) else {
                // Gone: its disconnect event forgets it.
                continue;
            };
            let step = STATE
                .with(|policy| policy.decide_notice(client, now_ms))
                .unwrap_or(NoticeStep::LookAgain);
            if let NoticeStep::Send(slot_tag) = step {
                ffi::signal_key_modified(&key_of(*client_id, slot_tag));
                STATE.with(|policy| policy.notices().mark_sent(*client_id, now_ms));
                NOTICES_SENT.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A client that had opted in left: its key is released in the next wake-up; a told client's
/// leaving is counted and logged.
pub fn on_left(ctx: &Context, client_id: u64, opted_in: OptedIn, closed_by_module: bool) {
    // A notice already invalidated the key and the server forgot it.
    if opted_in.sent_at_ms.is_none() {
        KEYS_TO_RELEASE.with(|keys| keys.push(key_of(client_id, opted_in.slot_tag)));
    }
    let Some(sent_at_ms) = opted_in.sent_at_ms else {
        return;
    };
    if closed_by_module {
        NOTICED_CLOSED_BY_MODULE.fetch_add(1, Ordering::Relaxed);
        return;
    }
    NOTICED_LEFT_THEMSELVES.fetch_add(1, Ordering::Relaxed);
    crate::server::retire::audit_left_after_notice(ctx, client_id, sent_at_ms);
}
