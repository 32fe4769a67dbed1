//! Permission checks the server cannot make for the module: the module's commands act on other
//! clients' connections, so a caller needs the rights of the server command that would do the
//! same (`CLIENT KILL` to close, `CLIENT LIST` to see), on every server, categories or not.

use redis_module::{CallOptionsBuilder, CallReply, CallResult, Context, RedisError};

use crate::server::ffi;

/// The server command whose rights a module command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    ClientKill,
    ClientList,
}

impl Needs {
    fn subcommand(self) -> &'static str {
        match self {
            Needs::ClientKill => "KILL",
            Needs::ClientList => "LIST",
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

/// An id no client has: the permission probe below must act on nobody.
const NO_SUCH_CLIENT: &str = "9223372036854775807";

/// Refuses with the server's NOPERM unless the calling client's user may run
/// `CLIENT <KILL|LIST>`. Calls without a client (the server itself) pass.
///
/// The check is the server's own: `CLIENT <KILL|LIST> ID <no such client>` is called with the
/// caller's ACL checked (`RM_Call`'s `C` flag), which uses the client's user object itself, so a
/// client authenticated as another module's user is checked as that user (looking the user up
/// by name found an ACL user of the same name instead). The server writes the `ACL LOG` entry
/// of a denial. The probe acts on no client; it shows in `INFO commandstats` as one
/// `client|kill` or `client|list` call.
pub fn require(ctx: &Context, needs: Needs, _args: &[&[u8]]) -> Result<(), RedisError> {
    if ffi::current_client_id(ctx) == 0 {
        return Ok(());
    }
    let options = CallOptionsBuilder::new().verify_acl().build();
    let probe = [needs.subcommand(), "ID", NO_SUCH_CLIENT];
    let reply: CallResult = ctx.call_ext("CLIENT", &options, &probe[..]);
    match reply {
        // The server refused to run it: no reply, errno EACCES.
        Ok(CallReply::Unknown) => Err(needs.denied()),
        _ => Ok(()),
    }
}
