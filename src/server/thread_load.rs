//! Reads the server's busy-time counters that adaptive pacing adds to its event-loop hooks where
//! the server has I/O threads (policy/thread_load.rs says which and why). Which ones is decided
//! once at load from what the server says; without I/O threads there are none and pacing reads
//! the hooks alone, as before.

use std::sync::atomic::{AtomicU8, Ordering};

use redis_module::{Context, RedisValue};

use crate::policy::decisions::Policy;
use crate::policy::thread_load::{
    BusyCounter, LoadSource, ServerFacts, io_thread_number, load_source, parse_seconds_us,
    schedstat_cpu_us,
};
use crate::server::ffi::{self, monotonic_us};
use crate::server::server_view::reply_text;

static SOURCE: AtomicU8 = AtomicU8::new(0);

const SOURCES: [LoadSource; 4] = [
    LoadSource::HooksOnly,
    LoadSource::ValkeyActiveTime,
    LoadSource::ValkeyEventLoopDuration,
    LoadSource::IoThreadCpuTime,
];

/// Valkey allows up to this many I/O threads (IO_THREADS_MAX_NUM); the fields are looked up
/// until the first missing one.
const MAX_IO_THREADS: u32 = 256;

pub fn source() -> LoadSource {
    SOURCES[SOURCE.load(Ordering::Relaxed) as usize % SOURCES.len()]
}

/// `io-threads` (1 if the server does not say).
pub fn io_threads(ctx: &Context) -> i64 {
    match ctx.call("CONFIG", &["GET", "io-threads"][..]) {
        Ok(RedisValue::Array(pair)) => pair
            .get(1)
            .map(|value| reply_text(value.clone()))
            .and_then(|text| text.parse::<i64>().ok())
            .unwrap_or(1),
        _ => 1,
    }
}

/// Decides at load which counters to read (and returns it, for the log).
pub fn decide(ctx: &Context) -> LoadSource {
    let facts = ServerFacts {
        io_threads: io_threads(ctx),
        valkey: ffi::read_server_info(c"server", |field| field("valkey_version").is_some())
            .unwrap_or(false),
        active_time_fields: ffi::read_server_info(c"cpu", |field| {
            field("used_active_time_main_thread").is_some()
        })
        .unwrap_or(false),
        major_version: ctx
            .get_redis_version()
            .map(|version| version.major.max(0) as u32)
            .unwrap_or(0),
    };
    let source = load_source(facts);
    let index = SOURCES.iter().position(|s| *s == source).unwrap_or(0);
    SOURCE.store(index as u8, Ordering::Relaxed);
    source
}

/// What the log says about the load signal, if it is more than the hooks.
pub fn describe(source: LoadSource) -> Option<&'static str> {
    match source {
        LoadSource::HooksOnly => None,
        LoadSource::ValkeyActiveTime => Some(
            "adaptive pacing reads the busiest of the event loop, INFO's used_active_time_main_thread and each used_active_time_io_thread_N (while io-threads > 1)",
        ),
        LoadSource::ValkeyEventLoopDuration => Some(
            "adaptive pacing reads the busier of the event loop and INFO's eventloop_duration_sum (this server publishes no busy time for its I/O threads)",
        ),
        LoadSource::IoThreadCpuTime => Some(
            "adaptive pacing reads the busiest of the event loop and each io_thd_N thread's CPU time",
        ),
    }
}

/// One reading of the counters (none without I/O threads). Called at most every 250 ms.
pub fn counters() -> Vec<BusyCounter> {
    match source() {
        LoadSource::HooksOnly => Vec::new(),
        LoadSource::ValkeyActiveTime => {
            ffi::read_server_info(c"cpu", valkey_active_times).unwrap_or_default()
        }
        LoadSource::ValkeyEventLoopDuration => ffi::read_server_info(c"stats", |field| {
            field("eventloop_duration_sum")
                .and_then(|text| text.trim().parse::<u64>().ok())
                .map(|busy_us| vec![BusyCounter { thread: 0, busy_us }])
                .unwrap_or_default()
        })
        .unwrap_or_default(),
        LoadSource::IoThreadCpuTime => io_thread_cpu_times(),
    }
}

fn valkey_active_times(field: &dyn Fn(&str) -> Option<String>) -> Vec<BusyCounter> {
    let mut counters: Vec<BusyCounter> = (1..MAX_IO_THREADS)
        .map_while(|thread| {
            let text = field(&format!("used_active_time_io_thread_{thread}"))?;
            Some(BusyCounter {
                thread,
                busy_us: parse_seconds_us(&text)?,
            })
        })
        .collect();
    // io-threads 1 (now): the hooks alone, as without threads.
    if counters.is_empty() {
        return counters;
    }
    if let Some(busy_us) = field("used_active_time_main_thread").and_then(|t| parse_seconds_us(&t))
    {
        counters.push(BusyCounter { thread: 0, busy_us });
    }
    counters
}

/// On-CPU time of the server's `io_thd_N` threads (Redis 8: they sleep in `epoll_wait` when
/// idle, so that time is their work). Plain file reads of this process's /proc entries.
fn io_thread_cpu_times() -> Vec<BusyCounter> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let dir = task.path();
            let thread = io_thread_number(&std::fs::read_to_string(dir.join("comm")).ok()?)?;
            let busy_us = schedstat_cpu_us(&std::fs::read_to_string(dir.join("schedstat")).ok()?)?;
            Some(BusyCounter { thread, busy_us })
        })
        .collect()
}

/// Feeds the event loop's busy time to adaptive pacing, and where the server has I/O threads
/// its other busy-time counters (read at most every 250 ms).
pub fn sample_load(policy: &mut Policy) {
    policy.observe_load(|| (monotonic_us(), ffi::event_loop_busy_us()), counters);
}
