//! The event loop's hooks (the top and the bottom of a pass) and its busy time.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redis_module::{Context, raw};

use super::*;

// ---------------------------------------------------------------------------------------------
// The event loop's two hooks: after `epoll_wait` returns (the top of a pass, before the server
// reads requests) and before it sleeps again (the bottom, before it writes the pass's replies).
//
// They measure busy time: the wall time the main thread spends between waking up and going back
// to sleep. A request that arrives meanwhile waits for the rest of that stretch, so its share of
// wall time is the load clients feel (unlike CPU time, it also counts time the thread was
// runnable but preempted). And they carry the moment a due client is closed (closing.rs).
// They are only subscribed while needed (adaptive pacing, or a client waiting to be closed):
// the server builds a module context for every event it fires, twice per loop iteration.

/// When the current busy stretch began (monotonic us), 0 while the loop sleeps.
static AWAKE_SINCE_US: AtomicU64 = AtomicU64::new(0);
/// Busy microseconds of every finished stretch since the module loaded.
static BUSY_US_TOTAL: AtomicU64 = AtomicU64::new(0);
static WATCHING_EVENT_LOOP: AtomicBool = AtomicBool::new(false);

/// Called at the top (`true`) or the bottom (`false`) of every event-loop pass while watched.
pub type EventLoopHandler = fn(ctx: &Context, top_of_pass: bool);

static EVENT_LOOP_HANDLER: HandlerSlot<EventLoopHandler> = HandlerSlot::new();

unsafe extern "C" fn on_event_loop(
    ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut c_void,
) {
    let now_us = monotonic_us();
    let top_of_pass = subevent == raw::REDISMODULE_SUBEVENT_EVENTLOOP_AFTER_SLEEP;
    if top_of_pass {
        AWAKE_SINCE_US.store(now_us, Ordering::Relaxed);
    } else {
        let since_us = AWAKE_SINCE_US.swap(0, Ordering::Relaxed);
        if since_us != 0 {
            BUSY_US_TOTAL.fetch_add(now_us.saturating_sub(since_us), Ordering::Relaxed);
        }
    }
    if let Some(handler) = EVENT_LOOP_HANDLER.get() {
        no_unwind("event-loop hook", (), || {
            handler(&Context::new(ctx), top_of_pass)
        });
    }
}

/// Starts (with the handler for each pass) or stops watching the event loop; false if the
/// server refused. Must not be called from inside an event-loop hook: the server walks its
/// listener list while it calls them, and removing the running listener frees it under the
/// server's feet.
pub fn watch_event_loop(ctx: &Context, handler: Option<EventLoopHandler>) -> bool {
    let watch = handler.is_some();
    if WATCHING_EVENT_LOOP.load(Ordering::Relaxed) == watch {
        EVENT_LOOP_HANDLER.set(handler);
        return true;
    }
    if ctx.ctx.is_null() {
        return false;
    }
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_EVENTLOOP,
        dataver: 1,
    };
    let callback: raw::RedisModuleEventCallback = if watch { Some(on_event_loop) } else { None };
    // SAFETY: `ctx` belongs to this module (a NULL callback unsubscribes); the callback has the
    // signature the server calls. Never called from inside an event callback (see above).
    let subscribed = unsafe {
        raw::RedisModule_SubscribeToServerEvent.unwrap()(ctx.ctx, event, callback)
            == raw::REDISMODULE_OK as c_int
    };
    if subscribed {
        WATCHING_EVENT_LOOP.store(watch, Ordering::Relaxed);
        EVENT_LOOP_HANDLER.set(handler);
        AWAKE_SINCE_US.store(0, Ordering::Relaxed);
    } else {
        count_failure("subscribing to the event loop");
    }
    subscribed
}

/// Busy microseconds so far, including the stretch in progress (the caller is part of it).
pub fn event_loop_busy_us() -> u64 {
    let since_us = AWAKE_SINCE_US.load(Ordering::Relaxed);
    let current = if since_us == 0 {
        0
    } else {
        monotonic_us().saturating_sub(since_us)
    };
    BUSY_US_TOTAL.load(Ordering::Relaxed) + current
}
