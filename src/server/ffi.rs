//! Every raw module-API call the crate does not wrap, in one place, each with the reason it is sound.
//!
//! Everything here runs on the server's main thread: commands, server events, timers, INFO and
//! config callbacks are all called by the server with its global lock held.

use std::ffi::{CStr, CString, c_char, c_int, c_longlong, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};

use redis_module::{Context, raw};

use crate::commands::docs::{self, Arg, CommandDoc};
use crate::policy::config::{self, Kind, SETTINGS, Value};

/// Where a callback the server calls finds the module's handler for it: a plain function
/// pointer behind a lock, so no pointer casts are needed and an unset slot is simply `None`.
pub struct HandlerSlot<F: Copy>(Mutex<Option<F>>);

impl<F: Copy> Default for HandlerSlot<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Copy> HandlerSlot<F> {
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    pub fn set(&self, handler: Option<F>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = handler;
    }

    pub fn get(&self) -> Option<F> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Failures of server calls that have no caller to report to (a wake-up that could not be
/// armed, an event-loop removal the server refused); INFO shows the count as `ffi_errors`.
pub static FFI_ERRORS: AtomicU64 = AtomicU64::new(0);

fn count_failure(what: &str) {
    FFI_ERRORS.fetch_add(1, Ordering::Relaxed);
    log(
        &module_ctx(),
        LogLevel::Warning,
        &format!("maxage: {what} failed: {}", std::io::Error::last_os_error()),
    );
}

/// Runs `body`, turning a panic into `fallback` so it never unwinds into the server (which would
/// abort it). The panic message goes to the server log.
pub fn no_unwind<T>(what: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            log(
                &module_ctx(),
                LogLevel::Warning,
                &format!("maxage: internal error in {what}: {message}"),
            );
            fallback
        }
    }
}

/// Milliseconds from `CLOCK_MONOTONIC`: NTP steps and wall-clock jumps do not move it, so they
/// cannot make a connection look old. (`RedisModule_Microseconds` is missing on Redis 7.0.)
pub fn monotonic_ms() -> u64 {
    monotonic_us() / 1000
}

/// The current millisecond rounded up: a connect time taken with it is never earlier than the
/// real one, so a deadline computed from it is never early.
pub fn monotonic_ms_ceil() -> u64 {
    monotonic_us().div_ceil(1000)
}

pub fn monotonic_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1000
}

// ---------------------------------------------------------------------------------------------
// The module's own long-lived context.

static MODULE_CTX: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(ptr::null_mut());

/// Keeps a detached context for work that arrives without one (config callbacks, logging from
/// deep inside the logic). It is only used on the main thread, with the server lock held.
pub fn init_module_ctx(ctx: &Context) {
    // SAFETY: `ctx` is the OnLoad context; GetDetachedThreadSafeContext exists since Redis 6.2.
    let detached = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.ctx) };
    let previous = MODULE_CTX.swap(detached, Ordering::AcqRel);
    free_detached(previous);
}

pub fn release_module_ctx() {
    free_detached(MODULE_CTX.swap(ptr::null_mut(), Ordering::AcqRel));
    free_detached(crate_detached_ctx().swap(ptr::null_mut(), Ordering::AcqRel));
}

// The `redis_module!` macro of redis-module 2.0.8 gives the crate a detached context at every
// load and never frees it: about 17 KB (a fake client and its reply buffer) per MODULE LOAD /
// MODULE UNLOAD cycle. `DetachedContext` is one `AtomicPtr` (checked below for the pinned
// version), so the module frees it on unload and clears it.
const _: () = assert!(
    std::mem::size_of::<redis_module::DetachedContext>()
        == std::mem::size_of::<AtomicPtr<raw::RedisModuleCtx>>()
);

fn crate_detached_ctx() -> &'static AtomicPtr<raw::RedisModuleCtx> {
    // SAFETY: `DetachedContext` in redis-module =2.0.8 is `struct { ctx: AtomicPtr<RedisModuleCtx> }`
    // (the size assertion above guards the layout); the static lives for the whole program.
    unsafe {
        &*(ptr::addr_of!(redis_module::MODULE_CONTEXT).cast::<AtomicPtr<raw::RedisModuleCtx>>())
    }
}

fn free_detached(ctx: *mut raw::RedisModuleCtx) {
    if !ctx.is_null() {
        // SAFETY: `ctx` came from GetDetachedThreadSafeContext and is freed exactly once (swapped out).
        unsafe { raw::RedisModule_FreeThreadSafeContext.unwrap()(ctx) };
    }
}

/// Whether `init_module_ctx` has run (config callbacks also fire before the module's init).
pub fn module_ctx_ready() -> bool {
    !MODULE_CTX.load(Ordering::Acquire).is_null()
}

/// The module's own context (null before load and after unload; logging accepts that).
pub fn module_ctx() -> Context {
    Context::new(MODULE_CTX.load(Ordering::Acquire))
}

// ---------------------------------------------------------------------------------------------
// Logging.

#[derive(Clone, Copy)]
pub enum LogLevel {
    Verbose,
    Notice,
    Warning,
}

pub fn log(ctx: &Context, level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Verbose => c"verbose",
        LogLevel::Notice => c"notice",
        LogLevel::Warning => c"warning",
    };
    // Interior NULs cannot come from the server's own strings; replace them rather than fail.
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: the format is a constant "%s" with one matching C-string argument, so nothing in
    // the message is ever read as a format directive. A null ctx logs as "the module" on both servers.
    unsafe {
        raw::RedisModule_Log.unwrap()(ctx.ctx, level.as_ptr(), c"%s".as_ptr(), message.as_ptr())
    };
}

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
    if fd < 0 {
        return 0;
    }
    let mut pending: c_int = 0;
    // SAFETY: FIONREAD only reads the socket's receive-queue length into `pending`; it does not
    // change the socket. An fd that is not a socket makes the call fail, which reads as 0.
    let status = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut pending) };
    if status == 0 {
        pending.max(0) as usize
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

// ---------------------------------------------------------------------------------------------
// Wake-ups. A timerfd in the server's own event loop rather than a module timer: the server
// refuses MODULE UNLOAD while a module timer is pending, and enforcement always has one
// pending. The timerfd is armed with an absolute CLOCK_MONOTONIC time, so it fires on the
// microsecond the deadline falls, not on a rounded millisecond. A wake-up for a time already
// come (the next pass of a mass retirement) goes through an eventfd instead: arming a timerfd
// costs about 30 us here (measured inside a wake-up: 30 of its 150 us) and its expiry 45 us
// more to arrive, an eventfd write under a microsecond.

pub type WakeupHandler = fn(ctx: &Context);

static WAKEUP_HANDLER: HandlerSlot<WakeupHandler> = HandlerSlot::new();
static WAKEUP_FD: AtomicI32 = AtomicI32::new(-1);
static WAKE_NOW_FD: AtomicI32 = AtomicI32::new(-1);

unsafe extern "C" fn on_wakeup(fd: c_int, _user_data: *mut c_void, _mask: c_int) {
    no_unwind("wake-up", (), || {
        let mut expirations = 0u64;
        // SAFETY: reading the 8-byte count (timerfd expirations, eventfd writes) clears the fd's
        // readiness; both fds are non-blocking, so a spurious wake-up returns EAGAIN instead of
        // blocking the server. The count itself is not needed; EAGAIN is harmless.
        let _ = unsafe { libc::read(fd, ptr::addr_of_mut!(expirations).cast(), 8) };
        if let Some(handler) = WAKEUP_HANDLER.get() {
            handler(&module_ctx());
        }
    })
}

/// Creates the timerfd and the eventfd and adds both to the server's event loop.
pub fn start_wakeups(handler: WakeupHandler) -> Result<(), String> {
    WAKEUP_HANDLER.set(Some(handler));
    // SAFETY: plain system call; the result is checked.
    let timer_fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if timer_fd < 0 {
        return Err(format!(
            "timerfd_create failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    add_wakeup_fd(timer_fd, "wake-up timer")?;
    WAKEUP_FD.store(timer_fd, Ordering::Release);
    // SAFETY: plain system call; the result is checked.
    let now_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if now_fd < 0 {
        let error = std::io::Error::last_os_error();
        stop_wakeups();
        return Err(format!("eventfd failed: {error}"));
    }
    if let Err(error) = add_wakeup_fd(now_fd, "wake-up event") {
        stop_wakeups();
        return Err(error);
    }
    WAKE_NOW_FD.store(now_fd, Ordering::Release);
    Ok(())
}

/// Adds a wake-up fd to the event loop; closes it if the server refuses.
fn add_wakeup_fd(fd: c_int, what: &str) -> Result<(), String> {
    // SAFETY: `fd` is open and `on_wakeup` has the signature the event loop calls.
    let status = unsafe {
        raw::RedisModule_EventLoopAdd.unwrap()(
            fd,
            raw::REDISMODULE_EVENTLOOP_READABLE as c_int,
            Some(on_wakeup),
            ptr::null_mut(),
        )
    };
    if status != raw::REDISMODULE_OK as c_int {
        // SAFETY: `fd` is ours and not registered anywhere.
        unsafe { libc::close(fd) };
        return Err(format!("cannot add the {what} to the event loop"));
    }
    Ok(())
}

/// Removes the wake-up fds from the event loop and closes them (module unload, failed load).
pub fn stop_wakeups() {
    WAKEUP_HANDLER.set(None);
    for (slot, what) in [
        (&WAKEUP_FD, "wake-up timer"),
        (&WAKE_NOW_FD, "wake-up event"),
    ] {
        let fd = slot.swap(-1, Ordering::AcqRel);
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` was added by `start_wakeups` and is removed and closed exactly once.
        let removed = unsafe {
            raw::RedisModule_EventLoopDel.unwrap()(fd, raw::REDISMODULE_EVENTLOOP_READABLE as c_int)
        };
        if removed != raw::REDISMODULE_OK as c_int {
            count_failure(&format!("removing the {what} from the event loop"));
        }
        // SAFETY: our own fd, closed once.
        if unsafe { libc::close(fd) } != 0 {
            count_failure(&format!("closing the {what}"));
        }
    }
}

/// Arms the wake-up for an absolute monotonic time in microseconds. A time already come fires
/// at the next event-loop pass (through the eventfd); the caller never asks for one that would
/// keep it spinning.
pub fn wake_at_us(at_us: u64) {
    if at_us <= monotonic_us() {
        wake_at_next_pass();
    } else {
        set_wakeup(at_us);
    }
}

fn wake_at_next_pass() {
    let fd = WAKE_NOW_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let one = 1u64;
    // SAFETY: `fd` is our non-blocking eventfd and `one` an 8-byte value. EAGAIN (the counter
    // at its maximum) means a wake-up is pending anyway.
    let written = unsafe { libc::write(fd, ptr::addr_of!(one).cast(), 8) };
    if written != 8 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
        count_failure("signalling the wake-up event");
    }
}

/// Disarms the wake-up.
pub fn cancel_wakeup() {
    set_wakeup(0);
}

fn set_wakeup(at_us: u64) {
    let fd = WAKEUP_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    // A time_t holds any u64 microsecond count divided by a million.
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: (at_us / 1_000_000).min(i64::MAX as u64) as libc::time_t,
            tv_nsec: ((at_us % 1_000_000) * 1000) as libc::c_long,
        },
    };
    // SAFETY: `fd` is our timerfd and `spec` a valid itimerspec; an all-zero value disarms it.
    let status =
        unsafe { libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, ptr::null_mut()) };
    if status != 0 {
        count_failure("arming the wake-up timer");
    }
}

// ---------------------------------------------------------------------------------------------
// Replies the crate's `RedisValue` cannot express in order (maps keep insertion order here).

pub enum Reply {
    Int(i64),
    Str(String),
    Bool(bool),
    Null,
    Array(Vec<Reply>),
    /// RESP3 clients see a map; RESP2 clients a flat [key, value, ...] array, as the server's own
    /// map replies (CONFIG GET, XINFO) do.
    Map(Vec<(&'static str, Reply)>),
}

pub fn reply(ctx: &Context, value: &Reply) {
    let ctx = ctx.ctx;
    reply_raw(ctx, value);
}

fn reply_raw(ctx: *mut raw::RedisModuleCtx, value: &Reply) {
    // SAFETY (all calls below): `ctx` is the context of the command being answered, and every
    // string pointer is valid for the length passed with it during the call.
    unsafe {
        match value {
            Reply::Int(n) => {
                raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, *n);
            }
            Reply::Str(s) => {
                raw::RedisModule_ReplyWithStringBuffer.unwrap()(ctx, s.as_ptr().cast(), s.len());
            }
            Reply::Bool(b) => {
                raw::RedisModule_ReplyWithBool.unwrap()(ctx, c_int::from(*b));
            }
            Reply::Null => {
                raw::RedisModule_ReplyWithNull.unwrap()(ctx);
            }
            Reply::Array(items) => {
                raw::RedisModule_ReplyWithArray.unwrap()(ctx, items.len() as _);
                items.iter().for_each(|item| reply_raw(ctx, item));
            }
            Reply::Map(fields) => {
                raw::RedisModule_ReplyWithMap.unwrap()(ctx, fields.len() as _);
                for (key, item) in fields {
                    raw::RedisModule_ReplyWithStringBuffer.unwrap()(
                        ctx,
                        key.as_ptr().cast(),
                        key.len(),
                    );
                    reply_raw(ctx, item);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// INFO.

pub type InfoHandler = fn(&mut InfoWriter);

static INFO_HANDLER: HandlerSlot<InfoHandler> = HandlerSlot::new();

pub struct InfoWriter {
    ctx: *mut raw::RedisModuleInfoCtx,
}

impl InfoWriter {
    pub fn section(&mut self, name: &CStr) {
        // SAFETY: `ctx` is the INFO context of the running callback; `name` is a C string.
        unsafe { raw::RedisModule_InfoAddSection.unwrap()(self.ctx, name.as_ptr()) };
    }

    pub fn field_u64(&mut self, name: &str, value: u64) {
        let name = CString::new(name).unwrap_or_default();
        // SAFETY: as above.
        unsafe { raw::RedisModule_InfoAddFieldULongLong.unwrap()(self.ctx, name.as_ptr(), value) };
    }

    pub fn field_str(&mut self, name: &str, value: &str) {
        let name = CString::new(name).unwrap_or_default();
        let value = CString::new(value.replace(['\r', '\n', '\0'], " ")).unwrap_or_default();
        // SAFETY: as above.
        unsafe {
            raw::RedisModule_InfoAddFieldCString.unwrap()(self.ctx, name.as_ptr(), value.as_ptr())
        };
    }
}

unsafe extern "C" fn on_info(ctx: *mut raw::RedisModuleInfoCtx, for_crash_report: c_int) {
    // A crash report is written from whichever thread crashed, maybe while the main thread is
    // inside the module: it gets nothing that touches the module's main-thread state.
    if for_crash_report != 0 {
        return;
    }
    no_unwind("INFO", (), || {
        if let Some(handler) = INFO_HANDLER.get() {
            handler(&mut InfoWriter { ctx });
        }
    })
}

/// Replaces the INFO callback the `redis_module!` macro installs with ours (the server keeps
/// the last one registered).
pub fn register_info(ctx: &Context, handler: InfoHandler) -> bool {
    INFO_HANDLER.set(Some(handler));
    // SAFETY: `ctx` is the OnLoad context and `on_info` has the signature the server calls.
    unsafe {
        raw::RedisModule_RegisterInfoFunc.unwrap()(ctx.ctx, Some(on_info))
            == raw::REDISMODULE_OK as c_int
    }
}

// ---------------------------------------------------------------------------------------------
// Command filter: sees every command before the server runs it (and before ACL is checked).

/// Gets the filter arguments of a `CLIENT KILL` (everything after `KILL`) and returns the command
/// name to rewrite `argv[0]` to, if any.
pub type ClientKillHandler = fn(filters: &[&[u8]]) -> Option<&'static str>;

static FILTER_HANDLER: HandlerSlot<ClientKillHandler> = HandlerSlot::new();
static FILTER: AtomicPtr<raw::RedisModuleCommandFilter> = AtomicPtr::new(ptr::null_mut());

/// Reads argument `pos` of the filtered command.
///
/// # Safety
/// `fctx` must be the live filter context and `pos` below its argument count; the slice must
/// not outlive the filter callback or any replacement of that argument.
unsafe fn filter_arg<'a>(fctx: *mut raw::RedisModuleCommandFilterCtx, pos: c_int) -> &'a [u8] {
    // SAFETY: as the function's contract says.
    unsafe {
        let arg = raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, pos);
        let mut len = 0usize;
        let bytes = raw::RedisModule_StringPtrLen.unwrap()(arg, &mut len);
        std::slice::from_raw_parts(bytes.cast::<u8>(), len)
    }
}

unsafe extern "C" fn on_command(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    // This runs for every command the server receives: the common case must stay two calls
    // and a length check.
    no_unwind("command filter", (), || {
        // SAFETY: `fctx` is the live filter context for the duration of this callback.
        let count = unsafe { raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx) };
        // Only the new-style form (CLIENT KILL and two or more arguments) is ever handled.
        if count < 4 {
            return;
        }
        // SAFETY: positions 0 and 1 are below `count`.
        let (name, subcommand) = unsafe { (filter_arg(fctx, 0), filter_arg(fctx, 1)) };
        if !name.eq_ignore_ascii_case(b"client") || !subcommand.eq_ignore_ascii_case(b"kill") {
            return;
        }
        let Some(handler) = FILTER_HANDLER.get() else {
            return;
        };
        // SAFETY: every position is below `count`; the slices are dropped before the replace.
        let filters: Vec<&[u8]> = (2..count)
            .map(|pos| unsafe { filter_arg(fctx, pos) })
            .collect();
        let rewrite_to = handler(&filters);
        drop(filters);
        if let Some(command) = rewrite_to {
            // SAFETY: on success the new string is handed to the server, which owns and frees
            // it; on failure it is still ours and freed here.
            unsafe {
                let replacement = raw::RedisModule_CreateString.unwrap()(
                    ptr::null_mut(),
                    command.as_ptr().cast(),
                    command.len(),
                );
                if raw::RedisModule_CommandFilterArgReplace.unwrap()(fctx, 0, replacement)
                    != raw::REDISMODULE_OK as c_int
                {
                    raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), replacement);
                    FFI_ERRORS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The next-command filter (Redis 8 with I/O threads): tells the module which client is about
// to run a command, while clients wait to be closed inside their next command.

/// Gets the id of the client about to run a command and the command's name.
pub type NextCommandHandler = fn(client_id: u64, command: &[u8]);

static NEXT_COMMAND_HANDLER: HandlerSlot<NextCommandHandler> = HandlerSlot::new();
/// Whether any client waits for its next command: while none does (nearly always), the filter
/// costs every command one atomic load.
static NEXT_COMMAND_WATCHED: AtomicBool = AtomicBool::new(false);
static NEXT_COMMAND_FILTER: AtomicPtr<raw::RedisModuleCommandFilter> =
    AtomicPtr::new(ptr::null_mut());

unsafe extern "C" fn on_next_command(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if !NEXT_COMMAND_WATCHED.load(Ordering::Relaxed) {
        return;
    }
    no_unwind("next-command filter", (), || {
        // SAFETY: `fctx` is the live filter context; the API's presence was checked before
        // the filter was registered; position 0 exists (the server never filters an empty
        // command).
        let (client_id, count) = unsafe {
            (
                raw::RedisModule_CommandFilterGetClientId.unwrap()(fctx),
                raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx),
            )
        };
        if count < 1 {
            return;
        }
        // SAFETY: position 0 is below `count`; the slice is not kept past this call.
        let command = unsafe { filter_arg(fctx, 0) };
        if let Some(handler) = NEXT_COMMAND_HANDLER.get() {
            handler(client_id, command);
        }
    })
}

/// Whether a command filter can tell which client sent the command (Redis 7.4+, Valkey).
pub fn filter_client_id_api_present() -> bool {
    // SAFETY: a copy of a function-pointer static filled in by RedisModule_Init.
    unsafe { raw::RedisModule_CommandFilterGetClientId }.is_some()
}

/// Registers the next-command filter (once; it skips the module's own calls).
pub fn register_next_command_filter(ctx: &Context, handler: NextCommandHandler) -> bool {
    NEXT_COMMAND_HANDLER.set(Some(handler));
    register_filter(ctx, &NEXT_COMMAND_FILTER, on_next_command)
}

pub fn next_command_filter_registered() -> bool {
    !NEXT_COMMAND_FILTER.load(Ordering::Acquire).is_null()
}

/// Removes the next-command filter if it is registered (unload, refused load).
pub fn unregister_next_command_filter(ctx: &Context) {
    NEXT_COMMAND_WATCHED.store(false, Ordering::Relaxed);
    NEXT_COMMAND_HANDLER.set(None);
    unregister_filter(
        ctx,
        &NEXT_COMMAND_FILTER,
        "unregistering the next-command filter",
    );
}

/// Turns the next-command filter's work on while some client waits for its next command.
pub fn watch_next_commands(watch: bool) {
    NEXT_COMMAND_WATCHED.store(watch, Ordering::Relaxed);
}

/// Whether the client is inside MULTI (its commands are queued, not run).
pub fn client_in_transaction(client_id: u64) -> bool {
    // SAFETY: the structure is plain integers and bytes, for which all zeroes is valid.
    let mut info: raw::RedisModuleClientInfo = unsafe { std::mem::zeroed() };
    info.version = 1;
    // SAFETY: `info` is a version-1 structure the server fills for a known id; the call only
    // writes into it.
    let status = unsafe {
        raw::RedisModule_GetClientInfoById.unwrap()(ptr::addr_of_mut!(info).cast(), client_id)
    };
    status == raw::REDISMODULE_OK as c_int
        && info.flags & u64::from(raw::REDISMODULE_CLIENTINFO_FLAG_MULTI) != 0
}

/// Whether the client has `CLIENT TRACKING` on (any mode).
pub fn client_is_tracking(client_id: u64) -> bool {
    // SAFETY: the structure is plain integers and bytes, for which all zeroes is valid.
    let mut info: raw::RedisModuleClientInfo = unsafe { std::mem::zeroed() };
    info.version = 1;
    // SAFETY: `info` is a version-1 structure the server fills for a known id; the call only
    // writes into it.
    let status = unsafe {
        raw::RedisModule_GetClientInfoById.unwrap()(ptr::addr_of_mut!(info).cast(), client_id)
    };
    status == raw::REDISMODULE_OK as c_int
        && info.flags & u64::from(raw::REDISMODULE_CLIENTINFO_FLAG_TRACKING) != 0
}

/// Whether the client running the current command speaks RESP3 (and so can receive pushes).
pub fn caller_speaks_resp3(ctx: &Context) -> bool {
    // SAFETY: `ctx` is the context the server passed to the running command.
    let flags = unsafe { raw::RedisModule_GetContextFlags.unwrap()(ctx.ctx) };
    flags as u64 & u64::from(raw::REDISMODULE_CTX_FLAGS_RESP3) != 0
}

/// The server's version as `0x00MMmmpp` (0 if the server cannot say).
pub fn server_version() -> u32 {
    // SAFETY: the function-pointer static was filled in by RedisModule_Init; the call reads a
    // constant.
    match unsafe { raw::RedisModule_GetServerVersion } {
        // SAFETY: as above.
        Some(version) => u32::try_from(unsafe { version() }).unwrap_or(0),
        None => 0,
    }
}

/// Whether this server is a Redis Cluster node.
pub fn cluster_enabled(ctx: &Context) -> bool {
    // SAFETY: `ctx` is a live module context.
    let flags = unsafe { raw::RedisModule_GetContextFlags.unwrap()(ctx.ctx) };
    flags as u64 & u64::from(raw::REDISMODULE_CTX_FLAGS_CLUSTER) != 0
}

/// Tells the server a key was modified, without touching it: clients tracking the key get an
/// invalidation (the notice). Nothing is written, replicated or counted as a keyspace event.
pub fn signal_key_modified(key: &str) {
    if !module_ctx_ready() {
        return;
    }
    let ctx = module_ctx();
    // SAFETY: the module context is live between load and unload and has a client with a
    // selected database; the string is created and freed with that context, and the server
    // copies the key before the call returns.
    unsafe {
        let name = raw::RedisModule_CreateString.unwrap()(ctx.ctx, key.as_ptr().cast(), key.len());
        if name.is_null() {
            count_failure("creating a notice key");
            return;
        }
        raw::RedisModule_SignalModifiedKey.unwrap()(ctx.ctx, name);
        raw::RedisModule_FreeString.unwrap()(ctx.ctx, name);
    }
}

/// Registers the `CLIENT KILL` filter once; it skips the module's own `RM_Call`s (NOSELF).
pub fn register_client_kill_filter(ctx: &Context, handler: ClientKillHandler) -> bool {
    FILTER_HANDLER.set(Some(handler));
    register_filter(ctx, &FILTER, on_command)
}

type FilterCallback = unsafe extern "C" fn(*mut raw::RedisModuleCommandFilterCtx);

/// Registers `callback` as a command filter into `slot`, once; it skips the module's own
/// `RM_Call`s (NOSELF). False if the server refused it.
fn register_filter(
    ctx: &Context,
    slot: &AtomicPtr<raw::RedisModuleCommandFilter>,
    callback: FilterCallback,
) -> bool {
    if !slot.load(Ordering::Acquire).is_null() {
        return true;
    }
    // SAFETY: `ctx` is the OnLoad context or the module's detached one (a CONFIG SET), both
    // carrying the module the filter belongs to; `callback` has the signature the server calls.
    let filter = unsafe {
        raw::RedisModule_RegisterCommandFilter.unwrap()(
            ctx.ctx,
            Some(callback),
            raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
        )
    };
    slot.store(filter, Ordering::Release);
    !filter.is_null()
}

/// Removes the filter in `slot` if one is registered.
fn unregister_filter(
    ctx: &Context,
    slot: &AtomicPtr<raw::RedisModuleCommandFilter>,
    failure: &'static str,
) {
    let filter = slot.swap(ptr::null_mut(), Ordering::AcqRel);
    if !filter.is_null() {
        // SAFETY: `filter` was returned by RegisterCommandFilter for this module, removed once.
        let status = unsafe { raw::RedisModule_UnregisterCommandFilter.unwrap()(ctx.ctx, filter) };
        if status != raw::REDISMODULE_OK as c_int {
            count_failure(failure);
        }
    }
}

pub fn client_kill_filter_registered() -> bool {
    !FILTER.load(Ordering::Acquire).is_null()
}

/// Removes the filter if it is registered.
pub fn unregister_client_kill_filter(ctx: &Context) {
    FILTER_HANDLER.set(None);
    unregister_filter(ctx, &FILTER, "unregistering the CLIENT KILL filter");
}

// ---------------------------------------------------------------------------------------------
// ACL.

pub fn acl_api_present() -> bool {
    // SAFETY (each read): copies of function-pointer statics filled in by RedisModule_Init.
    let present = [
        unsafe { raw::RedisModule_GetClientUserNameById }.is_some(),
        unsafe { raw::RedisModule_GetModuleUserFromUserName }.is_some(),
        unsafe { raw::RedisModule_ACLCheckCommandPermissions }.is_some(),
        unsafe { raw::RedisModule_FreeModuleUser }.is_some(),
    ];
    present.iter().all(|p| *p)
}

/// Puts a module command in ACL categories, where the server can (Valkey, Redis 7.2+).
/// `Ok(false)`: this server has no such API (Redis 7.0).
pub fn set_command_categories(
    ctx: &Context,
    command: &CStr,
    categories: &CStr,
) -> Result<bool, String> {
    // SAFETY: copies of function-pointer statics filled in by RedisModule_Init.
    let (Some(get_command), Some(set_categories)) =
        (unsafe { raw::RedisModule_GetCommand }, unsafe {
            raw::RedisModule_SetCommandACLCategories
        })
    else {
        return Ok(false);
    };
    // SAFETY: `ctx` is the OnLoad context and both strings are NUL-terminated constants.
    let status = unsafe {
        let handle = get_command(ctx.ctx, command.as_ptr());
        if handle.is_null() {
            return Err(format!("no command {}", command.to_string_lossy()));
        }
        set_categories(handle, categories.as_ptr())
    };
    if status == raw::REDISMODULE_OK as c_int {
        Ok(true)
    } else {
        Err(format!(
            "the server refused ACL categories for {}",
            command.to_string_lossy()
        ))
    }
}

/// Replies with an error in the server's own way, whatever the message holds: CR and LF
/// (which would end the reply early) become spaces and NUL is shown as `?`, so no text can
/// make the reply path fail. (The crate's error path maps characters to bytes and panics on
/// the NUL that a character such as U+0100 becomes.)
pub fn reply_error(ctx: &Context, message: &str) {
    let cleaned: String = message
        .chars()
        .map(|c| match c {
            '\r' | '\n' => ' ',
            '\0' => '?',
            c => c,
        })
        .collect();
    let cleaned = CString::new(cleaned).unwrap_or_default();
    // SAFETY: `ctx` is the running command's context and `cleaned` a valid C string.
    unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx.ctx, cleaned.as_ptr()) };
}

/// `tracking_clients` from `INFO clients`: how many clients have `CLIENT TRACKING` on.
pub fn tracking_clients(ctx: &Context) -> u64 {
    // SAFETY: `ctx` is a live module context; the info data is freed before returning and the
    // field name is a constant C string.
    unsafe {
        let info = raw::RedisModule_GetServerInfo.unwrap()(ctx.ctx, c"clients".as_ptr());
        if info.is_null() {
            return u64::MAX;
        }
        let mut failed: c_int = 0;
        let count = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(
            info,
            c"tracking_clients".as_ptr(),
            &mut failed,
        );
        raw::RedisModule_FreeServerInfo.unwrap()(ctx.ctx, info);
        // Unknown: assume there may be some.
        if failed != 0 { u64::MAX } else { count }
    }
}

/// Reads fields of one INFO section (`RM_GetServerInfo`): `read` gets a lookup that returns a
/// field's text, or `None` if the section has no such field. `None` if the server built no
/// section. Main thread only (the server builds the section there), as everything here.
pub fn read_server_info<T>(
    section: &CStr,
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> T,
) -> Option<T> {
    // SAFETY: a NULL context is allowed (the data is then not auto-freed, and is freed below
    // with a NULL context, as the API asks); the section name is a valid C string.
    let info =
        unsafe { raw::RedisModule_GetServerInfo.unwrap()(ptr::null_mut(), section.as_ptr()) };
    if info.is_null() {
        return None;
    }
    let field = |name: &str| {
        let name = CString::new(name).ok()?;
        // SAFETY: `info` lives until the FreeServerInfo below, after the last use of this
        // closure; the returned text (NULL if there is no such field) belongs to `info` and
        // is copied at once.
        unsafe {
            let text = raw::RedisModule_ServerInfoGetFieldC.unwrap()(info, name.as_ptr());
            (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    };
    let value = read(&field);
    // SAFETY: `info` came from GetServerInfo with a NULL context and is freed once.
    unsafe { raw::RedisModule_FreeServerInfo.unwrap()(ptr::null_mut(), info) };
    Some(value)
}

// ---------------------------------------------------------------------------------------------
// Settings. The module registers them itself rather than through the crate's macro: the
// crate's callbacks turn values and errors into C strings with `unwrap`, so a NUL byte from
// CONFIG SET or a load argument aborted the server, and it cannot make load arguments the
// registered defaults. The private data of each setting is its position in `SETTINGS`.

/// Called after a setting changed (CONFIG SET, or the config file before the module's init).
pub type SettingsChangedHandler = fn();

static SETTINGS_CHANGED: HandlerSlot<SettingsChangedHandler> = HandlerSlot::new();

/// The last string each string setting handed to the server: the server copies it at once,
/// and the module owns it, so it is freed on the next read of the same setting.
struct HandedOut([*mut raw::RedisModuleString; SETTINGS.len()]);
// SAFETY: only touched on the main thread (config callbacks); the lock makes the static legal.
unsafe impl Send for HandedOut {}
static HANDED_OUT: Mutex<HandedOut> = Mutex::new(HandedOut([ptr::null_mut(); SETTINGS.len()]));

fn setting_index(privdata: *mut c_void) -> usize {
    privdata as usize
}

/// Stores a value the server hands over; on refusal sets `*err` to the reason.
fn store_setting(index: usize, value: Value, err: *mut *mut raw::RedisModuleString) -> c_int {
    match config::set(index, value) {
        Ok(()) => {
            if let Some(changed) = SETTINGS_CHANGED.get() {
                changed();
            }
            raw::REDISMODULE_OK as c_int
        }
        Err(why) => refuse_setting(err, &why),
    }
}

fn refuse_setting(err: *mut *mut raw::RedisModuleString, why: &str) -> c_int {
    if !err.is_null() {
        // SAFETY: the server passes a valid out-pointer and frees the string it gets;
        // CreateString copies `why` with its length, so any byte is fine.
        unsafe {
            *err = raw::RedisModule_CreateString.unwrap()(
                ptr::null_mut(),
                why.as_ptr().cast(),
                why.len(),
            );
        }
    }
    raw::REDISMODULE_ERR as c_int
}

unsafe extern "C" fn get_number(_name: *const c_char, privdata: *mut c_void) -> c_longlong {
    no_unwind("CONFIG GET", 0, || {
        match config::get(setting_index(privdata)) {
            Some(Value::Number(n)) => n,
            _ => 0,
        }
    })
}

unsafe extern "C" fn set_number(
    _name: *const c_char,
    value: c_longlong,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Number(value), err)
    })
}

unsafe extern "C" fn get_flag(_name: *const c_char, privdata: *mut c_void) -> c_int {
    no_unwind("CONFIG GET", 0, || {
        c_int::from(config::get(setting_index(privdata)) == Some(Value::Flag(true)))
    })
}

unsafe extern "C" fn set_flag(
    _name: *const c_char,
    value: c_int,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Flag(value != 0), err)
    })
}

unsafe extern "C" fn get_choice(_name: *const c_char, privdata: *mut c_void) -> c_int {
    no_unwind("CONFIG GET", 0, || {
        match config::get(setting_index(privdata)) {
            Some(Value::Choice(i)) => i,
            _ => 0,
        }
    })
}

unsafe extern "C" fn set_choice(
    _name: *const c_char,
    value: c_int,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        store_setting(setting_index(privdata), Value::Choice(value), err)
    })
}

unsafe extern "C" fn get_text(
    _name: *const c_char,
    privdata: *mut c_void,
) -> *mut raw::RedisModuleString {
    no_unwind("CONFIG GET", ptr::null_mut(), || {
        let index = setting_index(privdata);
        let text = match config::get(index) {
            Some(Value::Text(text)) => text,
            _ => String::new(),
        };
        // SAFETY: CreateString copies `text` with its length (no C string is involved);
        // the previous string of this setting was copied by the server when it was handed out.
        unsafe {
            let string = raw::RedisModule_CreateString.unwrap()(
                ptr::null_mut(),
                text.as_ptr().cast(),
                text.len(),
            );
            let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = handed_out.0.get_mut(index) {
                let previous = std::mem::replace(slot, string);
                if !previous.is_null() {
                    raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), previous);
                }
            }
            string
        }
    })
}

unsafe extern "C" fn set_text(
    _name: *const c_char,
    value: *mut raw::RedisModuleString,
    privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    no_unwind("CONFIG SET", raw::REDISMODULE_ERR as c_int, || {
        let mut len = 0usize;
        // SAFETY: `value` is the server's string for the duration of this call.
        let bytes = unsafe {
            let pointer = raw::RedisModule_StringPtrLen.unwrap()(value, &mut len);
            std::slice::from_raw_parts(pointer.cast::<u8>(), len)
        };
        match std::str::from_utf8(bytes) {
            Ok(text) => store_setting(setting_index(privdata), Value::Text(text.to_string()), err),
            Err(_) => refuse_setting(err, "the value is not valid UTF-8"),
        }
    })
}

/// Registers every setting of `SETTINGS` with `defaults` (from the load arguments) and loads
/// the values the config file gives; `changed` runs after each later change.
pub fn register_settings(
    ctx: &Context,
    defaults: &[Value],
    changed: SettingsChangedHandler,
) -> Result<(), String> {
    // Values set while loading (the defaults, the config file) are applied by the caller once.
    SETTINGS_CHANGED.set(None);
    for (index, def) in SETTINGS.iter().enumerate() {
        let name = CString::new(def.name).map_err(|_| "bad setting name".to_string())?;
        let privdata = index as *mut c_void;
        let flags = raw::REDISMODULE_CONFIG_DEFAULT;
        let default = defaults
            .get(index)
            .cloned()
            .unwrap_or_else(|| def.kind.default_value());
        // SAFETY: `ctx` is the OnLoad context; `name` and the defaults are copied by the server;
        // every callback has the signature the server calls for its kind.
        let status = unsafe {
            match (def.kind, default) {
                (Kind::Number { min, max, .. }, Value::Number(n)) => {
                    raw::RedisModule_RegisterNumericConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        n,
                        flags,
                        min,
                        max,
                        Some(get_number),
                        Some(set_number),
                        None,
                        privdata,
                    )
                }
                (Kind::Text { .. }, Value::Text(text)) => {
                    let text = CString::new(text).map_err(|_| "bad default".to_string())?;
                    raw::RedisModule_RegisterStringConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        text.as_ptr(),
                        flags,
                        Some(get_text),
                        Some(set_text),
                        None,
                        privdata,
                    )
                }
                (Kind::Flag { .. }, Value::Flag(on)) => raw::RedisModule_RegisterBoolConfig
                    .unwrap()(
                    ctx.ctx,
                    name.as_ptr(),
                    c_int::from(on),
                    flags,
                    Some(get_flag),
                    Some(set_flag),
                    None,
                    privdata,
                ),
                (Kind::Choice { options, .. }, Value::Choice(position)) => {
                    let names: Vec<CString> = options
                        .iter()
                        .map(|option| CString::new(*option).unwrap_or_default())
                        .collect();
                    let mut name_pointers: Vec<*const c_char> =
                        names.iter().map(|n| n.as_ptr()).collect();
                    let values: Vec<c_int> = (0..options.len() as c_int).collect();
                    raw::RedisModule_RegisterEnumConfig.unwrap()(
                        ctx.ctx,
                        name.as_ptr(),
                        position,
                        flags,
                        name_pointers.as_mut_ptr(),
                        values.as_ptr(),
                        options.len() as c_int,
                        Some(get_choice),
                        Some(set_choice),
                        None,
                        privdata,
                    )
                }
                _ => {
                    return Err(format!(
                        "setting {} has a default of the wrong kind",
                        def.name
                    ));
                }
            }
        };
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!(
                "the server refused the setting maxage.{}",
                def.name
            ));
        }
    }
    // SAFETY: `ctx` is the OnLoad context, after every setting is registered.
    let loaded = unsafe { raw::RedisModule_LoadConfigs.unwrap()(ctx.ctx) };
    if loaded != raw::REDISMODULE_OK as c_int {
        return Err("the server could not apply the maxage.* lines of its config file".to_string());
    }
    SETTINGS_CHANGED.set(Some(changed));
    Ok(())
}

/// Frees the strings handed to the server (module unload).
pub fn release_settings() {
    SETTINGS_CHANGED.set(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for slot in handed_out.0.iter_mut() {
        let string = std::mem::replace(slot, ptr::null_mut());
        if !string.is_null() {
            // SAFETY: created by `get_text`, freed once (swapped out).
            unsafe { raw::RedisModule_FreeString.unwrap()(ptr::null_mut(), string) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command docs: the plain data of docs.rs turned into the server's structs.

/// Owns every C string and argument array until `SetCommandInfo` has copied them.
#[derive(Default)]
struct DocStorage {
    strings: Vec<CString>,
    arrays: Vec<Vec<raw::RedisModuleCommandArg>>,
}

impl DocStorage {
    fn c_str(&mut self, text: &str) -> *const std::ffi::c_char {
        let owned = CString::new(text).unwrap_or_default();
        let pointer = owned.as_ptr();
        self.strings.push(owned);
        pointer
    }

    fn opt_str(&mut self, text: Option<&str>) -> *const std::ffi::c_char {
        text.map_or(ptr::null(), |t| self.c_str(t))
    }

    /// A null-terminated array of raw args (the server stops at the entry whose name is null).
    fn args(&mut self, args: &[Arg]) -> *mut raw::RedisModuleCommandArg {
        if args.is_empty() {
            return ptr::null_mut();
        }
        let mut array: Vec<raw::RedisModuleCommandArg> = Vec::with_capacity(args.len() + 1);
        for a in args {
            let kind = match a.kind {
                docs::Kind::String => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_STRING,
                docs::Kind::Integer => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_INTEGER,
                docs::Kind::PureToken => {
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_PURE_TOKEN
                }
                docs::Kind::OneOf => raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_ONEOF,
            };
            let mut flags = 0;
            if a.optional {
                flags |= raw::REDISMODULE_CMD_ARG_OPTIONAL;
            }
            if a.multiple {
                flags |= raw::REDISMODULE_CMD_ARG_MULTIPLE;
            }
            let entry = raw::RedisModuleCommandArg {
                name: self.c_str(a.name),
                type_: kind,
                key_spec_index: -1,
                token: self.opt_str(a.token),
                summary: self.opt_str(a.summary),
                since: ptr::null(),
                flags: flags as c_int,
                deprecated_since: ptr::null(),
                subargs: self.args(&a.subargs),
                display_text: ptr::null(),
            };
            array.push(entry);
        }
        // SAFETY: an all-zero RedisModuleCommandArg (null name) is the array terminator.
        array.push(unsafe { std::mem::zeroed() });
        let pointer = array.as_mut_ptr();
        self.arrays.push(array);
        pointer
    }
}

/// Sets the documentation and arity of every module command (`COMMAND DOCS`, `COMMAND INFO`).
/// Returns the first failure.
pub fn set_command_docs(ctx: &Context, docs: &[CommandDoc]) -> Result<(), String> {
    let version = raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };
    for doc in docs {
        let mut storage = DocStorage::default();
        let name = storage.c_str(doc.name);
        // SAFETY: `ctx` is the OnLoad context and `name` a registered command's name.
        let command = unsafe { raw::RedisModule_GetCommand.unwrap()(ctx.ctx, name) };
        if command.is_null() {
            return Err(format!("command {} is not registered", doc.name));
        }
        let info = raw::RedisModuleCommandInfo {
            version: &version,
            summary: storage.c_str(doc.summary),
            complexity: storage.c_str(doc.complexity),
            since: storage.c_str(env!("CARGO_PKG_VERSION")),
            history: ptr::null_mut(),
            tips: storage.c_str(doc.tips),
            arity: doc.arity,
            key_specs: ptr::null_mut(),
            args: storage.args(&doc.args),
        };
        // SAFETY: every pointer in `info` points into `storage` or `version`, which outlive the
        // call; the server validates the struct and copies what it keeps.
        let status = unsafe { raw::RedisModule_SetCommandInfo.unwrap()(command, &info) };
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!("SetCommandInfo refused the docs of {}", doc.name));
        }
        log(
            ctx,
            LogLevel::Verbose,
            &format!("maxage: documented {}", doc.name),
        );
    }
    Ok(())
}

/// The first module API this module needs that the server lacks, if any (checked at load).
pub fn missing_api() -> Option<&'static str> {
    // Detect, never assume: each of these is needed and each is missing on some servers.
    // SAFETY (each read): the function-pointer statics were filled in by RedisModule_Init.
    let required = [
        (
            "DeauthenticateAndCloseClient",
            unsafe { raw::RedisModule_DeauthenticateAndCloseClient }.is_some(),
        ),
        (
            "SubscribeToServerEvent",
            unsafe { raw::RedisModule_SubscribeToServerEvent }.is_some(),
        ),
        (
            "SetCommandInfo",
            unsafe { raw::RedisModule_SetCommandInfo }.is_some(),
        ),
        (
            "GetDetachedThreadSafeContext",
            unsafe { raw::RedisModule_GetDetachedThreadSafeContext }.is_some(),
        ),
        (
            "EventLoopAdd",
            unsafe { raw::RedisModule_EventLoopAdd }.is_some(),
        ),
    ];
    required
        .iter()
        .find(|(_, present)| !present)
        .map(|(name, _)| *name)
}
