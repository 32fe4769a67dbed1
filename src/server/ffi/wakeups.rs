//! The module's one wake-up: a timerfd in the server's own event loop.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use redis_module::{Context, raw};

use super::*;

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
