//! Adaptive pacing's load signal where the server has I/O threads: the server's own busy-time
//! counters and its I/O threads', read a few times a second, next to the module's measure of
//! the main thread (the event-loop hooks, `LoadGauge`).
//!
//! Why the hooks alone do not hold with I/O threads (read in the servers' sources and measured
//! with a busy Lua loop and with `redis-benchmark -c 50` on two cores):
//! - Valkey 8 and 9 run the commands whose reads an I/O thread finished both before and after
//!   the module's before-sleep hook (`beforeSleep` calls `processIOThreadsResponses`, in 8.x
//!   `processIOThreadsReadDone`, again after `handleClientsWithPendingWrites`), so the hooks miss
//!   part of the commands: a Lua loop that kept the main thread runnable all the time read 23 to
//!   87 % busy on Valkey 9.1.2 with `io-threads 2`. The server's own accounts cover that part:
//!   `used_active_time_main_thread` (INFO cpu, Valkey 9) and `eventloop_duration_sum` (INFO
//!   stats, Valkey 8) read 75 to 111 % in the same windows. Valkey's I/O threads spin while
//!   active, so their CPU time says nothing; Valkey 9 publishes the time they spend on jobs
//!   (`used_active_time_io_thread_N`), Valkey 8 nothing.
//! - Redis 8's I/O threads read, parse and write for their clients in their own event loops and
//!   sleep in `epoll_wait` when idle, so their CPU time is their work. The main thread only runs
//!   commands, from an event the hooks cover.
//! - Redis 7's I/O threads work while the main thread waits for them inside its busy stretch:
//!   the hooks already count it, so Redis 7 keeps the hooks alone.
//!
//! The load is then the busiest of them: the main thread's share by the hooks, and each
//! counter's share of wall time here.

/// Where the extra busy-time counters come from, decided from what the server has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// No I/O threads, or I/O threads whose work the hooks already count (Redis 7): the
    /// event-loop hooks alone, as without threads.
    HooksOnly,
    /// Valkey 9: INFO cpu's `used_active_time_main_thread` and `used_active_time_io_thread_N`.
    /// The fields follow `io-threads` as it changes at runtime; with none of the I/O-thread
    /// fields (`io-threads 1`) nothing is added to the hooks.
    ValkeyActiveTime,
    /// Valkey 8: INFO stats' `eventloop_duration_sum` (the main thread only).
    ValkeyEventLoopDuration,
    /// Redis 8 and later: the CPU time of the threads named `io_thd_N`.
    IoThreadCpuTime,
}

/// What the server says about itself, as the module reads it at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerFacts {
    /// `io-threads` (1: none).
    pub io_threads: i64,
    /// INFO names `valkey_version`.
    pub valkey: bool,
    /// INFO cpu has `used_active_time_main_thread` (Valkey 9).
    pub active_time_fields: bool,
    /// The server's major version (Valkey's own numbering on Valkey).
    pub major_version: u32,
}

/// Which counters to read next to the hooks.
pub fn load_source(facts: ServerFacts) -> LoadSource {
    if facts.active_time_fields {
        // Valkey 9 can change io-threads at runtime: the fields say what is there now.
        return LoadSource::ValkeyActiveTime;
    }
    if facts.io_threads <= 1 {
        return LoadSource::HooksOnly;
    }
    if facts.valkey && facts.major_version >= 8 {
        return LoadSource::ValkeyEventLoopDuration;
    }
    if !facts.valkey && facts.major_version >= 8 {
        return LoadSource::IoThreadCpuTime;
    }
    LoadSource::HooksOnly
}

/// One cumulative busy-time counter: which thread (0: the server's account of its main
/// thread, n: I/O thread n) and its busy microseconds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyCounter {
    pub thread: u32,
    pub busy_us: u64,
}

/// Counters are read at most every this long (they cost an INFO section or a few /proc reads),
/// and a shorter window would be noise anyway.
pub const COUNTER_WINDOW_US: u64 = 250_000;

/// The busiest counter's share of wall time over the last window.
#[derive(Debug, Default, Clone)]
pub struct CounterGauge {
    last_wall_us: u64,
    last: Vec<BusyCounter>,
    /// 0.0 (idle) to 1.0.
    busiest_share: f64,
}

impl CounterGauge {
    /// Whether a window has passed since the last reading (the counters are worth reading).
    pub fn due(&self, wall_us: u64) -> bool {
        self.last_wall_us == 0 || wall_us.saturating_sub(self.last_wall_us) >= COUNTER_WINDOW_US
    }

    /// Feeds one reading of every counter; returns the busiest share. A counter seen for the
    /// first time (a new thread) counts from the next window; one that went back (a thread
    /// started again) reads idle for a window. No counters (no I/O threads now): 0.
    pub fn sample(&mut self, wall_us: u64, counters: Vec<BusyCounter>) -> f64 {
        if !self.due(wall_us) {
            return self.busiest_share;
        }
        if self.last_wall_us != 0 {
            let wall = wall_us.saturating_sub(self.last_wall_us).max(1);
            let busiest = counters
                .iter()
                .filter_map(|now| {
                    let before = self.last.iter().find(|c| c.thread == now.thread)?;
                    Some(now.busy_us.saturating_sub(before.busy_us))
                })
                .max()
                .unwrap_or(0);
            self.busiest_share = (busiest as f64 / wall as f64).clamp(0.0, 1.0);
        }
        self.last_wall_us = wall_us;
        self.last = counters;
        self.busiest_share
    }

    pub fn busiest_share(&self) -> f64 {
        self.busiest_share
    }
}

/// An INFO field in seconds with a fraction (`12.345678`, how Valkey prints
/// `used_active_time_*`) as microseconds; `None` if it is not one.
pub fn parse_seconds_us(text: &str) -> Option<u64> {
    let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: u64 = whole.parse().ok()?;
    let micros: u64 = format!("{fraction:0<6}").parse().ok()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// The I/O thread number in a thread name `io_thd_N` (Redis 7 and 8, Valkey 8 and 9 all name
/// them so); `None` for other threads (the main thread, `bio_*`, module threads).
pub fn io_thread_number(comm: &str) -> Option<u32> {
    let number = comm.trim_end().strip_prefix("io_thd_")?;
    number.parse().ok().filter(|n| *n > 0)
}

/// The on-CPU nanoseconds in a `/proc/.../schedstat` line (its first field) as microseconds.
/// Only the time on the CPU: the second field (waiting for a CPU) grows with the machine's
/// other processes as much as with the thread's own work, and would throttle an idle server
/// on a crowded machine.
pub fn schedstat_cpu_us(line: &str) -> Option<u64> {
    let ns: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(u32, u64)]) -> Vec<BusyCounter> {
        pairs
            .iter()
            .map(|&(thread, busy_us)| BusyCounter { thread, busy_us })
            .collect()
    }

    #[test]
    fn the_source_follows_what_the_server_has() {
        let facts = |io_threads, valkey, active_time_fields, major_version| ServerFacts {
            io_threads,
            valkey,
            active_time_fields,
            major_version,
        };
        // No I/O threads: the hooks alone, on every server but Valkey 9 (whose fields show
        // when io-threads is raised at runtime, and add nothing while it is 1).
        assert_eq!(
            load_source(facts(1, false, false, 7)),
            LoadSource::HooksOnly
        );
        assert_eq!(
            load_source(facts(1, false, false, 8)),
            LoadSource::HooksOnly
        );
        assert_eq!(load_source(facts(1, true, false, 8)), LoadSource::HooksOnly);
        assert_eq!(
            load_source(facts(1, true, true, 9)),
            LoadSource::ValkeyActiveTime
        );
        // Redis 7's I/O threads work inside the main thread's busy stretch.
        assert_eq!(
            load_source(facts(4, false, false, 7)),
            LoadSource::HooksOnly
        );
        assert_eq!(
            load_source(facts(2, false, false, 8)),
            LoadSource::IoThreadCpuTime
        );
        assert_eq!(
            load_source(facts(2, true, false, 8)),
            LoadSource::ValkeyEventLoopDuration
        );
        assert_eq!(
            load_source(facts(2, true, true, 9)),
            LoadSource::ValkeyActiveTime
        );
        // Valkey 7.2 is Redis 7.2.
        assert_eq!(load_source(facts(2, true, false, 7)), LoadSource::HooksOnly);
    }

    #[test]
    fn the_busiest_counter_sets_the_share() {
        let mut gauge = CounterGauge::default();
        assert_eq!(gauge.sample(1_000_000, counters(&[(0, 0), (1, 0)])), 0.0);
        // Too soon: not read, the share holds.
        assert!(!gauge.due(1_100_000));
        assert_eq!(gauge.sample(1_100_000, counters(&[(0, 90_000)])), 0.0);
        // Main 20 %, I/O thread 60 % of a second.
        assert!(gauge.due(2_000_000));
        let share = gauge.sample(2_000_000, counters(&[(0, 200_000), (1, 600_000)]));
        assert!((share - 0.6).abs() < 1e-9, "{share}");
        // Idle again.
        let share = gauge.sample(3_000_000, counters(&[(0, 200_000), (1, 600_000)]));
        assert_eq!(share, 0.0);
        // Never above 1 (counters read at slightly different moments).
        let share = gauge.sample(3_250_000, counters(&[(0, 600_000), (1, 600_000)]));
        assert_eq!(share, 1.0);
    }

    #[test]
    fn threads_that_come_go_or_restart_do_not_spike() {
        let mut gauge = CounterGauge::default();
        gauge.sample(1_000_000, counters(&[(0, 0), (1, 500_000)]));
        // A new thread with a large counter: not counted until it has a window of its own.
        let share = gauge.sample(2_000_000, counters(&[(0, 0), (1, 500_000), (2, 9_000_000)]));
        assert_eq!(share, 0.0);
        let share = gauge.sample(3_000_000, counters(&[(0, 0), (1, 500_000), (2, 9_300_000)]));
        assert!((share - 0.3).abs() < 1e-9, "{share}");
        // Thread 1 started again from zero: idle for that window, not a wrap-around.
        let share = gauge.sample(4_000_000, counters(&[(0, 0), (1, 10), (2, 9_300_000)]));
        assert_eq!(share, 0.0);
        // All I/O threads gone (io-threads 1 at runtime): nothing to add.
        assert_eq!(gauge.sample(5_000_000, Vec::new()), 0.0);
        assert_eq!(gauge.sample(6_000_000, Vec::new()), 0.0);
    }

    #[test]
    fn seconds_with_a_fraction_become_microseconds() {
        assert_eq!(parse_seconds_us("0.000000"), Some(0));
        assert_eq!(parse_seconds_us("12.345678"), Some(12_345_678));
        assert_eq!(parse_seconds_us("3.5"), Some(3_500_000));
        assert_eq!(parse_seconds_us("7"), Some(7_000_000));
        assert_eq!(parse_seconds_us(" 1.000001\r"), Some(1_000_001));
        for bad in ["", ".5", "1.2345678", "-1.0", "1.-5", "x", "1e3", "1.2.3"] {
            assert_eq!(parse_seconds_us(bad), None, "{bad:?}");
        }
        assert_eq!(parse_seconds_us("99999999999999999999.0"), None);
    }

    #[test]
    fn io_threads_are_known_by_name() {
        assert_eq!(io_thread_number("io_thd_1\n"), Some(1));
        assert_eq!(io_thread_number("io_thd_15"), Some(15));
        for other in [
            "redis-server",
            "valkey-server",
            "bio_close_file",
            "io_thd_",
            "io_thd_0",
            "io_thd_x",
        ] {
            assert_eq!(io_thread_number(other), None, "{other}");
        }
    }

    #[test]
    fn schedstat_gives_cpu_time_only() {
        assert_eq!(schedstat_cpu_us("234966341 183735084 65\n"), Some(234_966));
        assert_eq!(schedstat_cpu_us(""), None);
        assert_eq!(schedstat_cpu_us("x 1 2"), None);
    }
}
