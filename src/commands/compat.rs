//! `CLIENT KILL` compatibility: on servers whose own `CLIENT KILL` lacks a filter (Redis 7.0 has
//! no `MAXAGE`, `NAME`, `IDLE`, `NOT-*`, ...), a command filter hands such calls to the module's
//! kill path, so redis-py's `client_kill_filter(maxage=...)`, go-redis and runbooks work
//! unchanged. Every call the server can answer itself, and the old `CLIENT KILL ip:port` form,
//! is left untouched, so servers with native support behave exactly as before.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use lazy_static::lazy_static;
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::acl::{self, Needs};
use crate::commands::kill;
use crate::policy::config;
use crate::policy::filter::Command;
use crate::policy::filter_keywords::{KEYWORDS, Native, Takes, lookup, spellings};
use crate::policy::integers::parse_strict_i64;
use crate::server::ffi;
use crate::server::state::MainThreadCell;
use crate::server::stats;

/// The command a handed-over `CLIENT KILL` is rewritten to.
pub const COMPAT_COMMAND: &str = "maxage.clientkill";

/// Spellings every supported server's `CLIENT KILL` has had since Redis 6.
fn base_keywords() -> impl Iterator<Item = String> {
    KEYWORDS
        .iter()
        .filter(|k| k.native == Native::Always)
        .map(|k| k.name.to_string())
}

/// Spellings some servers lack, each with a value that can be probed harmlessly (the `NOT-`
/// forms of the base keywords too).
pub fn probed_keywords() -> Vec<(String, &'static str)> {
    spellings()
        .filter_map(|(spelling, keyword)| match keyword.native {
            Native::Probed(value) => Some((spelling, value)),
            Native::Always if spelling.starts_with("NOT-") => Some((
                spelling,
                match keyword.takes {
                    Takes::Ids => "1",
                    Takes::OneOf(words) => words[0],
                    _ if keyword.name == "USER" => "default",
                    _ => "x",
                },
            )),
            _ => None,
        })
        .collect()
}

/// An id no client has, so a probe can never kill anyone.
const NO_SUCH_CLIENT: &str = "9223372036854775807";

/// What the running server's own `CLIENT KILL` understands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NativeKillSupport {
    pub keywords: HashSet<String>,
    /// `ID a b c` (Valkey 8.1+); Redis takes one id.
    pub variadic_id: bool,
}

impl NativeKillSupport {
    /// Everything: the module leaves every call alone.
    pub fn everything() -> Self {
        Self {
            keywords: base_keywords()
                .chain(probed_keywords().into_iter().map(|(keyword, _)| keyword))
                .collect(),
            variadic_id: true,
        }
    }

    /// Only the keywords every supported server has (Redis 7.0-7.2).
    pub fn base() -> Self {
        Self {
            keywords: base_keywords().collect(),
            variadic_id: false,
        }
    }
}

lazy_static! {
    static ref NATIVE: MainThreadCell<NativeKillSupport> =
        MainThreadCell::new(NativeKillSupport::everything());
}

/// Whether `CLIENT KILL` may hand this spelling to the module (the module's own keywords
/// included, but not those only its commands take).
fn is_module_keyword(keyword: &str) -> bool {
    lookup(keyword.as_bytes()).is_some_and(|k| k.native != Native::ModuleCommandsOnly)
}

/// Whether the module must answer these `CLIENT KILL` filters because the server cannot. A
/// keyword neither knows is left to the server (it answers `ERR syntax error` either way).
pub fn needs_module(filters: &[&[u8]], native: &NativeKillSupport) -> bool {
    let mut i = 0;
    while i < filters.len() {
        let keyword = String::from_utf8_lossy(filters[i]).to_ascii_uppercase();
        i += 1;
        match keyword.as_str() {
            "ID" | "NOT-ID" => {
                let mut ids = 0;
                while filters
                    .get(i)
                    .is_some_and(|arg| parse_strict_i64(arg).is_some())
                {
                    ids += 1;
                    i += 1;
                }
                if !native.keywords.contains(&keyword) || (ids > 1 && !native.variadic_id) {
                    return true;
                }
            }
            "DRYRUN" => return true,
            _ => {
                if is_module_keyword(&keyword) && !native.keywords.contains(&keyword) {
                    return true;
                }
                i += 1;
            }
        }
    }
    false
}

/// Finds out, by probing with an id no client has, which filters the server's `CLIENT KILL`
/// understands. Runs once at load.
pub fn probe_native_support(ctx: &Context) -> NativeKillSupport {
    let accepts = |extra: &[&str]| {
        let mut args = vec!["KILL", "ID", NO_SUCH_CLIENT];
        args.extend_from_slice(extra);
        matches!(
            ctx.call("CLIENT", args.as_slice()),
            Ok(RedisValue::Integer(_))
        )
    };
    let mut support = NativeKillSupport::base();
    for (keyword, value) in probed_keywords() {
        if accepts(&[&keyword, value]) {
            support.keywords.insert(keyword);
        }
    }
    support.variadic_id = accepts(&["9223372036854775806"]);
    support
}

pub fn set_native_support(support: NativeKillSupport) {
    NATIVE.with(|native| *native = support);
}

/// Whether the server has what a handed-over kill needs (its ACL check API); set at load.
static FILTER_POSSIBLE: AtomicBool = AtomicBool::new(false);

/// Registers the filter at load if the setting asks for it; false if the server refused it.
pub fn start_filter(ctx: &Context, possible: bool) -> bool {
    FILTER_POSSIBLE.store(possible, Ordering::Relaxed);
    apply_setting(ctx)
}

/// Removes the filter (unload, or a refused load: the server drops a module's filters only on
/// MODULE UNLOAD, so otherwise the next command would call into the unmapped library).
pub fn stop_filter(ctx: &Context) {
    FILTER_POSSIBLE.store(false, Ordering::Relaxed);
    ffi::unregister_client_kill_filter(ctx);
}

/// Follows `maxage.client-kill-compat`: the server calls a command filter for every command
/// it receives, so the filter is registered only while the setting is on (bench row 1
/// measures the difference). False if the server refused to register it.
pub fn apply_setting(ctx: &Context) -> bool {
    let wanted = FILTER_POSSIBLE.load(Ordering::Relaxed) && config::client_kill_compat();
    if wanted == ffi::client_kill_filter_registered() {
        return true;
    }
    if !wanted {
        ffi::unregister_client_kill_filter(ctx);
        return true;
    }
    ffi::register_client_kill_filter(ctx, rewrite_client_kill)
}

/// The command filter: `CLIENT KILL <filters>` the server cannot answer goes to the module.
/// Registered only while `maxage.client-kill-compat` is yes (`apply_setting` runs on every
/// stored setting, rollbacks of a failed CONFIG SET included), so it does not check it again.
pub fn rewrite_client_kill(filters: &[&[u8]]) -> Option<&'static str> {
    NATIVE
        .with(|native| needs_module(filters, native))
        .unwrap_or(false)
        .then_some(COMPAT_COMMAND)
}

/// `CLIENT KILL <filters>` handed over by the filter (arrives as `maxage.clientkill KILL ...`).
/// The user must be allowed the original `CLIENT KILL` as well as this command.
pub fn compat_kill_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let filters = args.get(2..).unwrap_or_default();
    let original: Vec<&[u8]> = filters.iter().map(RedisString::as_slice).collect();
    acl::require(ctx, Needs::ClientKill, &original)?;
    let filter = kill::parse_args(ctx, filters, Command::Kill)?;
    // `CLIENT KILL` keeps the server's own grammar: the drain is `MAXAGE.KILL`'s.
    if filter.graceful || filter.percent.is_some() {
        return Err(RedisError::Str("ERR syntax error"));
    }
    stats::COMPAT_KILLS.fetch_add(1, Ordering::Relaxed);
    kill::kill(ctx, &filter);
    Ok(RedisValue::NoReply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(args: &[&str], native: &NativeKillSupport) -> bool {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        needs_module(&bytes, native)
    }

    #[test]
    fn redis_70_hands_over_only_what_it_lacks() {
        let redis70 = NativeKillSupport::base();
        assert!(needs(&["MAXAGE", "1"], &redis70));
        assert!(needs(&["maxage", "1", "TYPE", "normal"], &redis70));
        assert!(needs(&["TYPE", "normal", "NOT-NAME", "x"], &redis70));
        assert!(needs(&["ID", "5", "6"], &redis70));
        assert!(needs(&["NOT-ID", "5"], &redis70));
        assert!(needs(&["USER", "default", "DRYRUN"], &redis70));
        assert!(!needs(&["TYPE", "normal", "SKIPME", "no"], &redis70));
        assert!(!needs(&["ID", "5", "USER", "default"], &redis70));
        assert!(!needs(&["ADDR", "127.0.0.1:5"], &redis70));
        // Unknown to both: the server's own syntax error stands.
        assert!(!needs(&["BOGUS", "1"], &redis70));
    }

    #[test]
    fn a_server_with_everything_keeps_every_standard_call() {
        let valkey = NativeKillSupport::everything();
        for args in [
            &["MAXAGE", "1"][..],
            &["ID", "5", "6", "NOT-NAME", "x", "IDLE", "3"],
            &["NOT-FLAGS", "N", "CAPA", "r", "LIB-VER", "1"],
        ] {
            assert!(!needs(args, &valkey), "{args:?}");
        }
        assert!(needs(&["MAXAGE-MS", "1500"], &valkey));
        assert!(needs(&["TYPE", "normal", "LIMIT", "3"], &valkey));
    }

    #[test]
    fn values_that_look_like_keywords_are_skipped() {
        let redis70 = NativeKillSupport::base();
        assert!(!needs(&["USER", "MAXAGE"], &redis70));
        assert!(needs(&["USER", "MAXAGE", "MAXAGE", "1"], &redis70));
    }
}
