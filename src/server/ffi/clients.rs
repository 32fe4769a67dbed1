//! Clients: closing one, its socket (unread input, cork, FIN), its id and flags.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::{Context, raw};

use super::*;

// ---------------------------------------------------------------------------------------------
// Clients.

/// Closes a client the way the server frees clients asynchronously: after the current command,
/// in the same event-loop pass. Returns false if there is no such client.
pub fn close_client(ctx: &Context, client_id: u64) -> bool {
    // SAFETY: `ctx` is a live module context; the call looks the id up and ignores unknown ids.
    // It must never be replaced by RM_Call("CLIENT","KILL",...): that crashes Redis 7.0 when
    // the id is the caller's own.
    let status =
        unsafe { raw::RedisModule_DeauthenticateAndCloseClient.unwrap()(ctx.ctx, client_id) };
    status == raw::REDISMODULE_OK as c_int
}

/// Bytes waiting unread in a client's socket: a request the client has sent and the server has
/// not read yet. The module lives in the server's process, so the server's fd is valid here.
pub fn unread_input_bytes(fd: i32) -> usize {
    socket_queue_bytes(fd, libc::FIONREAD)
}

/// Bytes of output in a client's socket that the kernel has not sent yet (`SIOCOUTQNSD`): a
/// reply held by the cork counts, one that has left (acknowledged or not) does not.
pub fn unsent_output_bytes(fd: i32) -> usize {
    socket_queue_bytes(fd, libc::SIOCOUTQNSD)
}

/// The length `request` (FIONREAD or SIOCOUTQNSD) reads of one of a socket's queues; 0 if the
/// call fails.
fn socket_queue_bytes(fd: i32, request: libc::c_ulong) -> usize {
    if fd < 0 {
        return 0;
    }
    let mut bytes: c_int = 0;
    // SAFETY: both requests only read a queue's length into `bytes`; they do not change the
    // socket. An fd that is not a TCP socket makes the call fail, which reads as 0.
    let status = unsafe { libc::ioctl(fd, request, &mut bytes) };
    if status == 0 {
        bytes.max(0) as usize
    } else {
        0
    }
}

/// Holds a connection's output in the kernel (`TCP_CORK`) or releases it. The module corks a
/// due client's socket just before the server writes its reply and then either closes it
/// (the reply and the FIN leave together) or releases it at the top of the next pass, which
/// comes at once; the kernel itself sends held data after 200 ms, so nothing can be held
/// longer. Unix sockets have no cork: there the call fails and the close comes a few
/// microseconds behind the reply instead.
pub fn hold_output(fd: i32, hold: bool) {
    if fd < 0 {
        return;
    }
    let value: c_int = c_int::from(hold);
    // SAFETY: `fd` is a connected client's socket in this process (the server's own); TCP_CORK
    // only changes when the kernel sends what the server has written. `value` lives across the
    // call and its size is passed.
    let status = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            ptr::addr_of!(value).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    if status != 0 {
        let error = std::io::Error::last_os_error().raw_os_error();
        // Unix sockets have no TCP options, and a client may be gone already (its socket
        // reset by the peer): neither is a failure of the module's.
        let expected = [
            libc::EOPNOTSUPP,
            libc::ENOPROTOOPT,
            libc::EINVAL,
            libc::EBADF,
        ];
        if !error.is_some_and(|e| expected.contains(&e)) {
            count_failure("corking a client socket");
        }
    }
}

/// Sends the FIN of a connection the server has just been told to close, instead of after the
/// rest of this event-loop pass. A pooled client that is between two requests then sees the
/// close before it hands the connection out again, rather than after sending a request on it.
pub fn send_fin_now(fd: i32) {
    if fd >= 0 {
        // SAFETY: only for a client already marked close-asap, whose socket the server will
        // neither read nor write again before closing it; SHUT_WR only ends our sending side.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    }
}

/// Ends a connection in both directions without the server: the peer gets its FIN now, and the
/// server's own read of the socket returns end-of-file, so the server frees the client itself,
/// as it does any client that hung up (next_command.rs: for clients of Redis 8's I/O threads).
pub fn shut_down(fd: i32) {
    if fd >= 0 {
        // SAFETY: `fd` is the socket of a client the server still has (looked up in this
        // main-thread pass; I/O threads never free clients); shutdown closes no descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// The id of the client that sent the current command (0 inside a timer or event).
pub fn current_client_id(ctx: &Context) -> u64 {
    // SAFETY: `ctx` is the context the server passed to the running callback.
    unsafe { raw::RedisModule_GetClientId.unwrap()(ctx.ctx) }
}

/// The server's client-change events: connected (`true`) and disconnected (`false`), with the id.
pub type ClientChangeHandler = fn(ctx: &Context, client_id: u64, connected: bool);

static CLIENT_CHANGE_HANDLER: HandlerSlot<ClientChangeHandler> = HandlerSlot::new();

unsafe extern "C" fn on_client_change(
    ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    subevent: u64,
    data: *mut c_void,
) {
    no_unwind("client-change event", (), || {
        if data.is_null() {
            return;
        }
        // SAFETY: for the ClientChange event the server passes a RedisModuleClientInfo (V1);
        // only its `id` field is read, which every version has at the same offset.
        let client_id = unsafe { (*data.cast::<raw::RedisModuleClientInfo>()).id };
        if let Some(handler) = CLIENT_CHANGE_HANDLER.get() {
            let connected = subevent == raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_CONNECTED;
            handler(&Context::new(ctx), client_id, connected);
        }
    })
}

/// Subscribes `handler` to client connects and disconnects, or (`None`) unsubscribes.
pub fn subscribe_client_changes(ctx: &Context, handler: Option<ClientChangeHandler>) -> bool {
    static SUBSCRIBED: AtomicBool = AtomicBool::new(false);
    CLIENT_CHANGE_HANDLER.set(handler);
    // Unsubscribing what is not subscribed would *add* a listener with a NULL callback (the
    // server looks the pair up and adds it when missing), which the next event calls.
    if handler.is_none() && !SUBSCRIBED.load(Ordering::Relaxed) {
        return true;
    }
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_CLIENT_CHANGE,
        dataver: 1,
    };
    let callback: raw::RedisModuleEventCallback = handler.map(|_| {
        on_client_change
            as unsafe extern "C" fn(
                *mut raw::RedisModuleCtx,
                raw::RedisModuleEvent,
                u64,
                *mut c_void,
            )
    });
    // SAFETY: `ctx` belongs to this module (a NULL callback unsubscribes) and the callback has
    // the signature the server calls.
    let done = unsafe {
        raw::RedisModule_SubscribeToServerEvent.unwrap()(ctx.ctx, event, callback)
            == raw::REDISMODULE_OK as c_int
    };
    if done {
        SUBSCRIBED.store(handler.is_some(), Ordering::Relaxed);
    }
    done
}
