//! Permission checks the server cannot make for the module: the module's commands act on other
//! clients' connections, so a caller needs the rights of the server command that would do the
//! same (`CLIENT KILL` to close, `CLIENT LIST` to see), on every server, categories or not.

use redis_module::{Context, RedisError};

use crate::server::ffi;

/// The server command whose rights a module command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    ClientKill,
    ClientList,
}

impl Needs {
    fn subcommand(self) -> &'static [u8] {
        match self {
            Needs::ClientKill => b"KILL",
            Needs::ClientList => b"LIST",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Needs::ClientKill => "client|kill",
            Needs::ClientList => "client|list",
        }
    }

    fn denied(self) -> RedisError {
        RedisError::Str(match self {
            Needs::ClientKill => {
                "NOPERM this user has no permissions to run the 'client|kill' command"
            }
            Needs::ClientList => {
                "NOPERM this user has no permissions to run the 'client|list' command"
            }
        })
    }
}

/// Refuses with the server's NOPERM (and an `ACL LOG` entry) unless the calling client's user
/// may run `CLIENT <KILL|LIST> <args...>`. Calls without a client (the server itself) pass.
pub fn require(ctx: &Context, needs: Needs, args: &[&[u8]]) -> Result<(), RedisError> {
    let caller_id = ffi::current_client_id(ctx);
    if caller_id == 0 || !ffi::acl_api_present() {
        return Ok(());
    }
    let mut argv: Vec<&[u8]> = vec![b"CLIENT", needs.subcommand()];
    argv.extend_from_slice(args);
    if ffi::client_may_run(ctx, caller_id, &argv) {
        Ok(())
    } else {
        ffi::log_acl_denial(ctx, caller_id, needs.object());
        Err(needs.denied())
    }
}
