//! Closing a client from inside its own next command, where the server does the rest right: on
//! Redis 8 with I/O threads each client's thread reads, parses and writes for it, and writes a
//! reply as soon as the main thread has run the command, after none of the module's hooks; so
//! the module can neither see a reply go out nor hold it (closing.rs's way), and a close from a
//! wake-up drops a request the thread has just read. The one moment the server itself handles
//! is a close asked for while the client's own command runs: the server marks it
//! close-after-command, writes that command's whole reply, runs nothing pipelined behind it,
//! and closes. The module corks the socket, so that the reply leaves together with the FIN
//! when the main thread frees the client, instead of ahead of it.
//!
//! The reply must reach the application even when the connection ends with a reset: a
//! multiplexing client (ioredis, the Rust crate's multiplexed connection) has usually sent more
//! requests behind this one, which the server never reads, and a socket closed with unread
//! input sends a reset and drops what it still holds, the corked reply with it. The client,
//! having no reply, sends the command again on a new connection: executed twice (ioredis with
//! its default resend, Redis 8.0.6 with I/O threads: 33 and 42 of about 240 retirements on TCP
//! and TLS). So when the server frees the client (its disconnect event, which comes before
//! the server closes the socket), the module ends the sending side first: the corked reply
//! and the FIN leave together, and any reset comes after them.
//!
//! The command filter is the module's only code that runs inside an arbitrary command, and it
//! runs before the server's authentication and ACL checks, while the close resets the client
//! to the `default` user, unauthenticated. So a client is closed this way only when that changes
//! nothing: its user is `default`, and `default` is enabled with `nopass` (the command is then
//! checked and run exactly as it would have been). Any other client is closed idle or at the end
//! of grace (`CloseMode::IdleOnly`). A client inside MULTI, or sending a command that starts
//! something the next one depends on (MULTI, WATCH, a subscription), is left for its next
//! command.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use lazy_static::lazy_static;

use crate::server::ffi::{self, monotonic_ms};
use crate::server::retire::record_retirement;
use crate::server::shut_down;
use crate::server::state::{MainThreadCell, STATE};
use crate::server::stats;

lazy_static! {
    /// Clients closed inside their command, until the server frees them: id -> socket.
    static ref CLOSED_IN_COMMAND: MainThreadCell<HashMap<u64, i32>> =
        MainThreadCell::new(HashMap::new());
}

/// Commands after which the client's next one depends on the connection staying open.
const STARTS_SOMETHING: [&[u8]; 8] = [
    b"multi",
    b"watch",
    b"subscribe",
    b"psubscribe",
    b"ssubscribe",
    b"monitor",
    b"sync",
    b"psync",
];

/// Called by the next-command filter (only while some client waits for its next command, or a
/// shut-down client for the server to free it). True: the command must not run, its client
/// was shut down (shut_down.rs) and what it sent after its last reply is not served.
pub fn on_command(client_id: u64, command: &[u8]) -> bool {
    if shut_down::is_shut(client_id) {
        return true;
    }
    if STARTS_SOMETHING
        .iter()
        .any(|name| command.eq_ignore_ascii_case(name))
    {
        return false;
    }
    let ctx = ffi::module_ctx();
    if ffi::client_in_transaction(client_id) {
        return false;
    }
    let Some((client, reason)) = STATE
        .with(|policy| {
            policy
                .closing()
                .take_at_next_command(client_id, ffi::unread_input_bytes)
        })
        .flatten()
    else {
        return false;
    };
    // The client is the server's current client: this marks it close-after-command.
    if !ffi::close_client(&ctx, client_id) {
        return false;
    }
    // Its thread writes the reply at once, but the socket is closed only when the main thread
    // frees the client a moment later: the application could read the reply, send its next
    // request on the connection and have it reset. Corked, the reply leaves with the FIN.
    ffi::hold_output(client.fd, true);
    CLOSED_IN_COMMAND.with(|closed| closed.insert(client_id, client.fd));
    let now_ms = monotonic_ms();
    let age_ms = STATE
        .with(|policy| {
            policy.mark_closed(client_id);
            policy
                .registry()
                .get(client_id)
                .map_or(client.lower_bound_age_ms(), |c| c.age_ms(now_ms))
        })
        .unwrap_or_else(|| client.lower_bound_age_ms());
    stats::CLOSED_AFTER_REPLY.fetch_add(1, Ordering::Relaxed);
    stats::CLOSED_IN_NEXT_COMMAND.fetch_add(1, Ordering::Relaxed);
    record_retirement(&ctx, &client, age_ms, reason, false, now_ms);
    false
}

/// The server is freeing a client (its disconnect event, before it closes the socket): if the
/// module closed it inside its command, its reply and FIN go out now, ahead of any reset.
pub fn on_disconnect(client_id: u64) {
    if let Some(fd) = CLOSED_IN_COMMAND
        .with(|closed| closed.remove(&client_id))
        .flatten()
    {
        ffi::send_fin_now(fd);
    }
}
