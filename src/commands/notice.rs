//! `MAXAGE.NOTICE [ON|OFF]`: a connection asks to be told, `maxage.notice-lead-ms` before its
//! deadline, that it should leave, so that its client can finish what is in flight, open a
//! replacement and close it itself, and no request fails. Like `MAXAGE.SELF` it is about the
//! caller's own connection only, so application users may run it; it costs O(1) however often
//! it is called (one entry per connection, replaced in place).
//!
//! The notice is a RESP3 client-side-caching invalidation of the key the reply names, so the
//! connection needs RESP3 and `CLIENT TRACKING on` (`OPTIN` mode with `CLIENT CACHING yes`
//! right before, so that nothing else it reads is tracked). Without them it gets its deadline
//! in the reply and no push (`push` 0 and the reason).

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::policy::notices::{key_of, notice_at_ms};
use crate::server::enforcement::rearm;
use crate::server::ffi::{self, Reply, monotonic_ms};
use crate::server::notices::{register_key, registers_for_caller};
use crate::server::server_view::list_clients;
use crate::server::state::STATE;

/// MAXAGE.NOTICE [ON|OFF]
pub fn notice_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let client_id = ffi::current_client_id(ctx);
    if client_id == 0 {
        return Err(RedisError::Str(
            "ERR MAXAGE.NOTICE needs a client connection",
        ));
    }
    let on = match args.get(1).map(|arg| arg.as_slice().to_ascii_uppercase()) {
        None => true,
        Some(word) if word == b"ON" => true,
        Some(word) if word == b"OFF" => false,
        Some(_) => return Err(RedisError::Str("ERR syntax error: expected ON or OFF")),
    };
    if args.len() > 2 {
        return Err(RedisError::WrongArity);
    }
    if !on {
        STATE.with(|policy| policy.notices().forget(client_id));
        return Ok(RedisValue::SimpleStringStatic("OK"));
    }
    opt_in(ctx, client_id)
}

fn opt_in(ctx: &Context, client_id: u64) -> RedisResult {
    let Some(listed) = list_clients(ctx, Some(&[client_id])).into_iter().next() else {
        return Err(RedisError::Str("ERR this connection is not listed"));
    };
    let now_ms = monotonic_ms();
    let lead_ms = STATE
        .with(|policy| policy.settings().notice_lead_ms)
        .unwrap_or(0);
    let no_push = if lead_ms == 0 {
        Some("notices-off")
    } else if !ffi::caller_speaks_resp3(ctx) {
        Some("resp2")
    } else if !ffi::client_is_tracking(client_id) {
        Some("tracking-off")
    } else {
        None
    };
    let (slot_tag, no_push) = match no_push {
        Some(reason) => (None, Some(reason)),
        None => match register_key(ctx, client_id, now_ms) {
            Ok(slot_tag) => (slot_tag, None),
            Err(()) => (None, Some("no-local-slot")),
        },
    };
    let deadline = STATE
        .with(|policy| {
            if no_push.is_none() {
                policy.opt_in_to_notices(&listed, slot_tag, now_ms)
            } else {
                // Told nothing later: the reply's deadline is all it gets.
                policy.notices().forget(client_id);
                policy
                    .registry()
                    .get(client_id)
                    .and_then(|tracked| policy.effective_deadline(&tracked, &listed).0)
            }
        })
        .flatten();
    rearm(now_ms);
    let in_ms = |at_ms: u64| Reply::Int(at_ms as i64 - now_ms as i64);
    let notice_in = match (deadline, no_push) {
        (Some(deadline), None) => in_ms(notice_at_ms(deadline, lead_ms, now_ms)),
        _ => Reply::Null,
    };
    ffi::reply(
        ctx,
        &Reply::Map(vec![
            ("deadline-in-ms", deadline.map_or(Reply::Null, in_ms)),
            ("notice-in-ms", notice_in),
            ("notice-lead-ms", Reply::Int(lead_ms as i64)),
            ("push", Reply::Int(i64::from(no_push.is_none()))),
            // 0: this server (Redis 7.0) does not track for the client what the module reads
            // on its behalf: the client reads the key itself, `CLIENT CACHING yes` then
            // `MAXAGE.NOTICEKEY <key>`.
            (
                "key-tracked",
                Reply::Int(i64::from(no_push.is_none() && registers_for_caller())),
            ),
            (
                "key",
                match no_push {
                    None => Reply::Str(key_of(client_id, slot_tag)),
                    Some(_) => Reply::Null,
                },
            ),
            (
                "no-push-reason",
                no_push.map_or(Reply::Null, |reason| Reply::Str(reason.to_string())),
            ),
        ]),
    );
    Ok(RedisValue::NoReply)
}

/// `MAXAGE.NOTICEKEY <key>`: read-only and does nothing; run by `MAXAGE.NOTICE` through
/// `RM_Call` so that the server tracks the key for the calling client (see server/notices.rs).
/// A client calling it itself gets what `GET` of a missing key would track for it.
pub fn notice_key_command(_ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    Ok(RedisValue::SimpleStringStatic("OK"))
}
