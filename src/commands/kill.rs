//! `MAXAGE.KILL` and `MAXAGE.LIST`: the one-shot commands over the `CLIENT KILL` filter grammar.

use redis_module::{Context, ContextFlags, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::acl::{self, Needs};
use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::decisions::exemption;
use crate::policy::filter::{self, ClientFilter, Command};
use crate::policy::filter_keywords::ServerFacts;
use crate::server::ffi::{self, Reply, monotonic_ms};
use crate::server::retire::{KillTarget, kill_spread};
use crate::server::server_view::{list_clients, reply_text};
use crate::server::state::STATE;

/// Answers the parser's questions with `RM_Call`, only when a filter needs them.
struct CallFacts<'a> {
    ctx: &'a Context,
    databases: Option<i64>,
}

impl ServerFacts for CallFacts<'_> {
    fn user_exists(&mut self, name: &str) -> bool {
        !matches!(
            self.ctx.call("ACL", &["GETUSER", name][..]),
            Ok(RedisValue::Null) | Err(_)
        )
    }

    fn databases(&mut self) -> i64 {
        *self.databases.get_or_insert_with(|| {
            match self.ctx.call("CONFIG", &["GET", "databases"][..]) {
                Ok(RedisValue::Array(items)) => items
                    .into_iter()
                    .nth(1)
                    .and_then(|value| reply_text(value).parse().ok())
                    .unwrap_or(16),
                _ => 16,
            }
        })
    }
}

/// A client that matched, with what the registry adds to the server's view.
pub struct Matched {
    pub listed: ListedClient,
    /// The `maxage.rules` selector that applies, or "default".
    pub rule: String,
    pub age_ms: u64,
    pub approximate: bool,
    /// Milliseconds from now to the enforcement deadline (negative when overdue).
    pub deadline_in_ms: Option<i64>,
    pub exempt_reason: Option<&'static str>,
    /// What the client asked for with `MAXAGE.SELF`.
    pub requested_max_age_ms: Option<u64>,
}

pub fn parse_args(
    ctx: &Context,
    args: &[RedisString],
    command: Command,
) -> Result<ClientFilter, RedisError> {
    let raw: Vec<&[u8]> = args.iter().map(RedisString::as_slice).collect();
    filter::parse(
        &raw,
        command,
        &mut CallFacts {
            ctx,
            databases: None,
        },
    )
    .map_err(RedisError::String)
}

/// The clients the filter selects, oldest first (then by id), at most `LIMIT` of them.
pub fn select(ctx: &Context, filter: &ClientFilter) -> Vec<Matched> {
    let caller_id = ffi::current_client_id(ctx);
    let now_ms = monotonic_ms();
    // Where the registry answers the filter, only the clients it selects are listed.
    let ids: Option<Vec<u64>> = if registry_answers(ctx, filter) {
        STATE.with(|policy| select_from_registry(policy, filter, caller_id, now_ms))
    } else {
        filter.ids.as_ref().map(|ids| ids.iter().copied().collect())
    };
    if ids.as_ref().is_some_and(Vec::is_empty) {
        return Vec::new();
    }
    let listed = list_clients(ctx, ids.as_deref());
    let mut matched: Vec<Matched> = STATE
        .with(|policy| {
            listed
                .into_iter()
                .filter_map(|client| {
                    // Already being closed (by an earlier kill or a wake-up in this event-loop
                    // pass): the server frees it before the next pass, and it must not be
                    // closed, counted or logged twice.
                    if client.has_flag('A') || policy.is_closing(client.id) {
                        return None;
                    }
                    let tracked = policy.registry().get(client.id);
                    let age_ms = tracked.map_or(client.lower_bound_age_ms(), |t| t.age_ms(now_ms));
                    let candidate = filter::Candidate {
                        listed: &client,
                        age_ms,
                        caller_id,
                    };
                    if !filter.matches(&candidate) {
                        return None;
                    }
                    let exempt_reason = exemption(policy.settings(), &client);
                    let rule = match tracked {
                        Some(t) if policy.settings().enforcing() => {
                            policy.class_deadline(&t, &client).0
                        }
                        _ => crate::policy::rules::DEFAULT_CLASS,
                    };
                    let deadline = tracked.and_then(|t| policy.effective_deadline(&t, &client).0);
                    let deadline_in_ms = deadline.map(|deadline| deadline as i64 - now_ms as i64);
                    Some(Matched {
                        requested_max_age_ms: policy.requested_max_age_ms(client.id),
                        rule: rule.to_string(),
                        age_ms,
                        approximate: tracked.is_none_or(|t| t.approximate),
                        deadline_in_ms,
                        exempt_reason,
                        listed: client,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    matched.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.listed.id.cmp(&b.listed.id)));
    filter.keep_allowed(&mut matched);
    matched
}

/// Kills the selected clients (unless `DRYRUN`) and replies with how many; with `GRACEFUL`
/// schedules them for enforcement's close (pacing, the moment after a reply, grace, audit)
/// and replies with how many were scheduled. The reply goes out
/// before any close. The caller itself (`SKIPME no`) is closed by the server's own
/// close-after-reply: its reply is written, then the connection closes, and nothing pipelined
/// behind the command runs, exactly as with the server's `CLIENT KILL`.
pub fn kill(ctx: &Context, filter: &ClientFilter) -> usize {
    if filter.graceful {
        return drain(ctx, filter);
    }
    let killed = if registry_answers(ctx, filter) {
        kill_from_registry(ctx, filter)
    } else {
        kill_listed(ctx, filter)
    };
    // The rest of the closes come in the next passes, and the audit cap may owe a summary
    // line at the end of this second: with enforcement off nothing else would wake up.
    crate::server::enforcement::rearm(monotonic_ms());
    killed
}

/// `MAXAGE.KILL` of a filter that needs the server's view of every client.
fn kill_listed(ctx: &Context, filter: &ClientFilter) -> usize {
    let matched = select(ctx, filter);
    ffi::reply(ctx, &Reply::Int(matched.len() as i64));
    if filter.dry_run {
        return matched.len();
    }
    let killed = matched.len();
    let targets = matched
        .into_iter()
        .map(|client| KillTarget::Listed {
            client: Box::new(client.listed),
            age_ms: client.age_ms,
        })
        .collect();
    kill_spread(ctx, targets, monotonic_ms());
    killed
}

/// `MAXAGE.KILL ... GRACEFUL`: schedules the selected clients for enforcement's close and
/// replies with how many (with `DRYRUN`, how many it would schedule). The close of each one is
/// enforcement's, at the moment after one of its replies and within pacing, so thousands
/// selected at once do not stall the server; where the filter selects by id and age only, not
/// even a `CLIENT LIST` is taken.
fn drain(ctx: &Context, filter: &ClientFilter) -> usize {
    let now_ms = monotonic_ms();
    let ids: Vec<u64> = if registry_answers(ctx, filter) {
        let caller_id = ffi::current_client_id(ctx);
        STATE
            .with(|policy| select_from_registry(policy, filter, caller_id, now_ms))
            .unwrap_or_default()
    } else {
        select(ctx, filter).iter().map(|m| m.listed.id).collect()
    };
    let scheduled = if filter.dry_run {
        ids.len()
    } else {
        STATE.with(|policy| policy.drain(&ids, now_ms)).unwrap_or(0)
    };
    ffi::reply(ctx, &Reply::Int(scheduled as i64));
    crate::server::enforcement::rearm(now_ms);
    scheduled
}

/// Whether the module's registry alone can answer this filter: ids and ages only, on a server
/// that is not a replica (a replica's link to its master is a client the registry does not
/// track, and `CLIENT KILL MAXAGE` would select it).
fn registry_answers(ctx: &Context, filter: &ClientFilter) -> bool {
    filter.needs_only_ids_and_age() && !ctx.get_flags().contains(ContextFlags::SLAVE)
}

/// `MAXAGE.KILL` of an id-and-age filter: touches only the selected clients, with no
/// `CLIENT LIST` of everyone (15 ms and 2.6 MB at 10,000 clients). Replies first, then closes.
fn kill_from_registry(ctx: &Context, filter: &ClientFilter) -> usize {
    let now_ms = monotonic_ms();
    let caller_id = ffi::current_client_id(ctx);
    let selected: Vec<(u64, u64)> = STATE
        .with(|policy| {
            select_from_registry(policy, filter, caller_id, now_ms)
                .into_iter()
                .map(|id| {
                    let age_ms = policy.registry().get(id).map_or(0, |c| c.age_ms(now_ms));
                    (id, age_ms)
                })
                .collect()
        })
        .unwrap_or_default();
    ffi::reply(ctx, &Reply::Int(selected.len() as i64));
    let killed = selected.len();
    if !filter.dry_run {
        let targets = selected
            .into_iter()
            .map(|(client_id, age_ms)| KillTarget::ById { client_id, age_ms })
            .collect();
        kill_spread(ctx, targets, now_ms);
    }
    killed
}

/// The tracked clients an id-and-age filter selects, oldest first (then by id), within
/// `LIMIT` and `PERCENT`. The master link is never tracked, so never selected.
fn select_from_registry(
    policy: &crate::policy::decisions::Policy,
    filter: &ClientFilter,
    caller_id: u64,
    now_ms: u64,
) -> Vec<u64> {
    let mut selected: Vec<(u64, u64)> = policy
        .registry()
        .iter()
        .filter(|client| {
            let id = client.client_id;
            let spared = policy.is_closing(id)
                || filter.not_ids.contains(&id)
                || (filter.skip_me && id == caller_id);
            !spared
                && filter.ids.as_ref().is_none_or(|ids| ids.contains(&id))
                && filter
                    .min_age_ms
                    .is_none_or(|min_age_ms| client.age_ms(now_ms) >= min_age_ms)
        })
        .map(|client| (client.age_ms(now_ms), client.client_id))
        .collect();
    selected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    filter.keep_allowed(&mut selected);
    selected.into_iter().map(|(_, id)| id).collect()
}

/// MAXAGE.KILL <filter> [<filter> ...]
pub fn kill_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    acl::require(ctx, Needs::ClientKill, &[])?;
    let filter = parse_args(ctx, args.get(1..).unwrap_or_default(), Command::Kill)?;
    kill(ctx, &filter);
    Ok(RedisValue::NoReply)
}

/// MAXAGE.LIST [<filter> ...]
pub fn list_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    acl::require(ctx, Needs::ClientList, &[])?;
    let filter = parse_args(ctx, args.get(1..).unwrap_or_default(), Command::List)?;
    let entries: Vec<Reply> = select(ctx, &filter).into_iter().map(entry).collect();
    ffi::reply(ctx, &Reply::Array(entries));
    Ok(RedisValue::NoReply)
}

fn entry(client: Matched) -> Reply {
    let listed = client.listed;
    Reply::Map(vec![
        ("id", Reply::Int(listed.id as i64)),
        ("addr", Reply::Str(listed.addr.clone())),
        ("laddr", Reply::Str(listed.laddr.clone())),
        ("name", Reply::Str(listed.name.clone())),
        ("user", Reply::Str(listed.user.clone())),
        (
            "type",
            Reply::Str(ClientType::of(&listed).name().to_string()),
        ),
        ("db", Reply::Int(listed.db)),
        ("flags", Reply::Str(listed.flags.clone())),
        ("lib-name", Reply::Str(listed.lib_name.clone())),
        ("age-ms", Reply::Int(client.age_ms as i64)),
        ("age-approximate", Reply::Bool(client.approximate)),
        ("idle-s", Reply::Int(listed.idle_s as i64)),
        (
            "deadline-in-ms",
            client.deadline_in_ms.map_or(Reply::Null, Reply::Int),
        ),
        ("rule", Reply::Str(client.rule.clone())),
        (
            "requested-max-age-ms",
            client
                .requested_max_age_ms
                .map_or(Reply::Null, |ms| Reply::Int(ms as i64)),
        ),
        (
            "exempt",
            client
                .exempt_reason
                .map_or(Reply::Null, |reason| Reply::Str(reason.to_string())),
        ),
    ])
}
