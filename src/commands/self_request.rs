//! `MAXAGE.SELF [ms]`: a connection chooses its own maximum age, as a pool declaring
//! `maxage=300000` for its connections would. It only ever shortens the connection's life: the
//! earlier of the operator's deadline and the requested one applies. It affects no other
//! client, so it needs no more rights than `CLIENT SETNAME`.
//!
//! An exempt client that asks for a max age gets it: exemptions say the operator will not retire
//! the connection, and the request is the client's own decision about itself.

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::policy::decisions::exemption;
use crate::policy::integers::parse_strict_i64;
use crate::server::enforcement::rearm;
use crate::server::ffi::{self, Reply, monotonic_ms};
use crate::server::server_view::list_clients;
use crate::server::state::STATE;

const ERR_RANGE: &str = "ERR max age is not an integer from 0 to 315360000000";

/// MAXAGE.SELF [milliseconds]
pub fn self_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let client_id = ffi::current_client_id(ctx);
    if client_id == 0 {
        return Err(RedisError::Str("ERR MAXAGE.SELF needs a client connection"));
    }
    match args.len() {
        1 => report(ctx, client_id),
        2 => {
            let max_age_ms = parse_strict_i64(args[1].as_slice())
                .filter(|ms| (0..=crate::policy::config::MAX_AGE_MS_MAX).contains(ms))
                .ok_or(RedisError::Str(ERR_RANGE))? as u64;
            let now_ms = monotonic_ms();
            let corked = STATE
                .with(|policy| policy.request_max_age(client_id, max_age_ms, now_ms))
                .flatten();
            if let Some(fd) = corked {
                ffi::hold_output(fd, false);
            }
            rearm(now_ms);
            Ok(RedisValue::SimpleStringStatic("OK"))
        }
        _ => Err(RedisError::WrongArity),
    }
}

/// This connection's age, the max age and deadline that apply to it, and what set them.
fn report(ctx: &Context, client_id: u64) -> RedisResult {
    let Some(listed) = list_clients(ctx, Some(&[client_id])).into_iter().next() else {
        return Err(RedisError::Str("ERR this connection is not listed"));
    };
    let now_ms = monotonic_ms();
    let fields = STATE
        .with(|policy| {
            let tracked = policy.registry().get(client_id)?;
            let exempt = exemption(policy.settings(), &listed);
            let (deadline, requested_binds) = policy.effective_deadline(&tracked, &listed);
            let requested = policy.requested_max_age_ms(client_id);
            let (label, class_max_age_ms) = policy
                .settings()
                .rules
                .class_of(&listed, policy.settings().max_age_ms);
            let set_by = if requested_binds {
                "client-requested".to_string()
            } else if let Some(reason) = exempt {
                format!("exempt:{reason}")
            } else if deadline.is_none() {
                "none".to_string()
            } else if class_max_age_ms > 0 && label != crate::policy::rules::DEFAULT_CLASS {
                format!("rule:{label}")
            } else {
                "max-age-ms".to_string()
            };
            let optional = |value: Option<i64>| value.map_or(Reply::Null, Reply::Int);
            Some(vec![
                ("age-ms", Reply::Int(tracked.age_ms(now_ms) as i64)),
                (
                    "max-age-ms",
                    optional(deadline.map(|d| d.saturating_sub(tracked.connected_at_ms) as i64)),
                ),
                (
                    "deadline-in-ms",
                    optional(deadline.map(|d| d as i64 - now_ms as i64)),
                ),
                ("set-by", Reply::Str(set_by)),
                (
                    "requested-max-age-ms",
                    optional(requested.map(|ms| ms as i64)),
                ),
                (
                    "exempt",
                    exempt.map_or(Reply::Null, |reason| Reply::Str(reason.to_string())),
                ),
            ])
        })
        .flatten()
        .ok_or(RedisError::Str("ERR this connection is not tracked"))?;
    ffi::reply(ctx, &Reply::Map(fields));
    Ok(RedisValue::NoReply)
}
