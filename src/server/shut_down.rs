//! Closing a client of one of Redis 8's I/O threads without pausing that thread. The module
//! API's close (`freeClientAsync` for a client that is not running a command) first pauses the
//! thread that owns the client: the main thread asks it to stop and busy-waits until it has,
//! which is a wake-up of that thread and its scheduling, milliseconds on a loaded machine (the
//! server's own SLOWLOG shows `CLIENT LIST ID <one client>`, which pauses the same way, at
//! 7.8 ms on 2 busy cores). 10,000 clients due at once paid that 10,000 times.
//!
//! Instead the module shuts the socket down in both directions (`shutdown(SHUT_RDWR)`): the
//! peer gets its FIN at once, and the owning thread's next read returns end-of-file, so the
//! server frees the client the way it frees any client that hung up, with no pause. A request
//! already on its way when the FIN left may still be read: the next-command filter refuses
//! every command of a shut-down client (next_command.rs), so nothing it sent after its last
//! reply runs, as with the API's close (close-asap clients run nothing). The server answers
//! nothing either: the socket can no longer send. A client the server has not freed after
//! `FREE_WAIT_MS` is closed the API's way.
//!
//! Only where the filter can refuse commands (Redis 8 with I/O threads: the next-command
//! filter is registered and the client's `io-thread=` is above 0), and never for the client
//! whose command is running (the API's close then closes it after its reply).

use std::collections::HashMap;

use lazy_static::lazy_static;
use redis_module::Context;

use crate::policy::client_list::ListedClient;
use crate::server::ffi;
use crate::server::state::MainThreadCell;

/// How long the server has to free a shut-down client itself before the module closes it.
pub const FREE_WAIT_MS: u64 = 100;

lazy_static! {
    /// Shut-down clients the server has not freed yet: id -> when (monotonic ms).
    static ref SHUT: MainThreadCell<HashMap<u64, u64>> = MainThreadCell::new(HashMap::new());
}

/// Whether this client, just looked up in this main-thread pass, is closed by shutting its
/// socket down rather than through the module API.
pub fn applies_to(ctx: &Context, client: &ListedClient) -> bool {
    client.io_thread > 0
        && client.fd >= 0
        && ffi::next_command_filter_registered()
        && client.id != ffi::current_client_id(ctx)
}

/// Shuts the client's socket down; the server frees it when its thread reads the end-of-file.
pub fn close(client: &ListedClient, now_ms: u64) {
    ffi::shut_down(client.fd);
    SHUT.with(|shut| shut.insert(client.id, now_ms));
    ffi::watch_next_commands(true);
}

/// Whether a command of this client must be refused: the module has shut it down.
pub fn is_shut(client_id: u64) -> bool {
    SHUT.with(|shut| shut.contains_key(&client_id))
        .unwrap_or(false)
}

/// Whether any shut-down client is still waiting to be freed.
pub fn any() -> bool {
    SHUT.with(|shut| !shut.is_empty()).unwrap_or(false)
}

/// The server freed the client (its disconnect event).
pub fn forget(client_id: u64) {
    SHUT.with(|shut| shut.remove(&client_id));
}

/// When the oldest shut-down client must be checked on.
pub fn next_check_ms() -> Option<u64> {
    SHUT.with(|shut| shut.values().min().map(|at| at + FREE_WAIT_MS))
        .flatten()
}

/// Closes, through the module API, the shut-down clients the server has not freed in time.
pub fn close_leftovers(ctx: &Context, now_ms: u64) {
    let late: Vec<u64> = SHUT
        .with(|shut| {
            let late: Vec<u64> = shut
                .iter()
                .filter(|(_, at)| now_ms >= **at + FREE_WAIT_MS)
                .map(|(id, _)| *id)
                .collect();
            for id in &late {
                shut.remove(id);
            }
            late
        })
        .unwrap_or_default();
    for client_id in late {
        ffi::close_client(ctx, client_id);
    }
}

/// Closes every shut-down client not freed yet through the module API (module unload: the
/// filter that refuses their commands is going away).
pub fn close_all(ctx: &Context) {
    close_leftovers(ctx, u64::MAX - FREE_WAIT_MS);
}
