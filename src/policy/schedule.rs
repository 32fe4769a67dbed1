//! Deadline scheduling, jitter and pacing: pure logic, every function takes `now_ms` as an argument.

use crate::policy::thread_load::{BusyCounter, CounterGauge};
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;

/// Where in `[max_age * (1 - jitter), max_age]` a client's deadline falls.
///
/// The draw is a hash of the client id and a per-load seed rather than a random number kept per
/// client: the registry stays at 16 bytes a client, a changed max age re-times every client
/// without new draws, and clients that connected in the same millisecond still spread out.
pub fn deadline_ms(
    connected_at_ms: u64,
    max_age_ms: u64,
    jitter_pct: u64,
    client_id: u64,
    seed: u64,
) -> u64 {
    let window_ms = max_age_ms.saturating_mul(jitter_pct.min(100)) / 100;
    let offset_ms = if window_ms == 0 {
        0
    } else {
        // Multiply-shift maps the 64-bit hash onto [0, window] without modulo bias worth noting.
        ((u128::from(mix64(client_id ^ seed)) * u128::from(window_ms + 1)) >> 64) as u64
    };
    connected_at_ms.saturating_add(max_age_ms - offset_ms)
}

/// SplitMix64's finaliser: cheap, and consecutive ids land far apart.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// When each client is next looked at, ordered by (deadline, client id), earliest first.
///
/// One entry per client, updated in place (as Redis's `timeout.c` keeps one flag per client):
/// scheduling a client that already has an entry keeps the earlier of the two moments, and a
/// disconnect removes its entry. However often a client asks to be scheduled, it costs
/// O(log n) and the queue never holds more entries than there are clients.
#[derive(Default, Debug)]
pub struct DeadlineQueue {
    by_deadline: BTreeSet<(u64, u64)>,
    deadline_of: HashMap<u64, u64>,
}

impl DeadlineQueue {
    /// Schedules the client no later than `deadline_ms`.
    pub fn push(&mut self, deadline_ms: u64, client_id: u64) {
        match self.deadline_of.entry(client_id) {
            Entry::Occupied(mut scheduled) => {
                if *scheduled.get() <= deadline_ms {
                    return;
                }
                self.by_deadline.remove(&(*scheduled.get(), client_id));
                scheduled.insert(deadline_ms);
            }
            Entry::Vacant(slot) => {
                slot.insert(deadline_ms);
            }
        }
        self.by_deadline.insert((deadline_ms, client_id));
    }

    /// Forgets the client's entry, if it has one.
    pub fn remove(&mut self, client_id: u64) {
        if let Some(deadline_ms) = self.deadline_of.remove(&client_id) {
            self.by_deadline.remove(&(deadline_ms, client_id));
        }
    }

    /// The earliest pending (deadline, client id), whether or not it is due.
    pub fn next_deadline(&self) -> Option<(u64, u64)> {
        self.by_deadline.first().copied()
    }

    /// Removes and returns the earliest entry if its deadline is at or before `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(u64, u64)> {
        let (deadline_ms, client_id) = *self.by_deadline.first()?;
        if deadline_ms > now_ms {
            return None;
        }
        self.by_deadline.pop_first();
        self.deadline_of.remove(&client_id);
        Some((deadline_ms, client_id))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.deadline_of.len()
    }

    pub fn clear(&mut self) {
        self.by_deadline.clear();
        self.deadline_of = HashMap::new();
    }

    /// How many entries are due at `now_ms`: walks the due entries only (at most one a client).
    pub fn count_due(&self, now_ms: u64) -> usize {
        self.by_deadline.range(..=(now_ms, u64::MAX)).count()
    }

    /// Gives memory back after a wave of disconnects, keeping headroom for the next wave.
    pub fn shrink_if_sparse(&mut self) {
        shrink_if_sparse(&mut self.deadline_of);
    }

    /// Heap bytes, estimated: the map's table plus a B-tree node's share per entry.
    pub fn heap_bytes(&self) -> usize {
        const TREE_ENTRY: usize = std::mem::size_of::<(u64, u64)>() * 3 / 2;
        ClientTable::heap_bytes(&self.deadline_of) + self.by_deadline.len() * TREE_ENTRY
    }
}

/// The per-client hash tables (maps and sets keyed by client id), for memory accounting and
/// shrinking after a wave of disconnects.
pub trait ClientTable {
    fn slots(&self) -> usize;
    fn entries(&self) -> usize;
    fn shrink_to_fit_entries(&mut self, entries: usize);
    /// Heap bytes, estimated: each slot holds an entry plus a control byte.
    fn heap_bytes(&self) -> usize;
}

impl<K: Hash + Eq, V> ClientTable for HashMap<K, V> {
    fn slots(&self) -> usize {
        self.capacity()
    }
    fn entries(&self) -> usize {
        self.len()
    }
    fn shrink_to_fit_entries(&mut self, entries: usize) {
        self.shrink_to(entries);
    }
    fn heap_bytes(&self) -> usize {
        self.capacity() * (std::mem::size_of::<(K, V)>() + 1)
    }
}

impl<K: Hash + Eq> ClientTable for HashSet<K> {
    fn slots(&self) -> usize {
        self.capacity()
    }
    fn entries(&self) -> usize {
        self.len()
    }
    fn shrink_to_fit_entries(&mut self, entries: usize) {
        self.shrink_to(entries);
    }
    fn heap_bytes(&self) -> usize {
        self.capacity() * (std::mem::size_of::<K>() + 1)
    }
}

/// Gives a table's memory back after a wave of disconnects, keeping headroom for the next wave
/// (a few entries' worth at least, so that a server with a handful of clients keeps about as
/// little as before the wave).
pub fn shrink_if_sparse(table: &mut impl ClientTable) {
    if table.slots() > 16 && table.slots() > table.entries() * 4 {
        table.shrink_to_fit_entries((table.entries() * 2).max(8));
    }
}

/// A token bucket: at most `rate_per_sec` retirements a second on average, in bursts of at most
/// `burst` (a twentieth of a second's worth), so a mass expiry becomes a steady trickle.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_per_sec: u64,
    /// Tokens scaled by 1000 so that rates below 1000/s accrue without rounding loss.
    milli_tokens: u64,
    last_refill_ms: u64,
}

impl Pacer {
    /// `rate_per_sec == 0` means unlimited.
    pub fn new(rate_per_sec: u64, now_ms: u64) -> Self {
        let mut pacer = Self {
            rate_per_sec,
            milli_tokens: 0,
            last_refill_ms: now_ms,
        };
        pacer.milli_tokens = pacer.burst_milli_tokens();
        pacer
    }

    pub fn rate_per_sec(&self) -> u64 {
        self.rate_per_sec
    }

    /// Changes the rate, keeping the tokens already earned (capped at the new burst).
    pub fn set_rate(&mut self, rate_per_sec: u64, now_ms: u64) {
        if rate_per_sec == self.rate_per_sec {
            return;
        }
        self.refill(now_ms);
        self.rate_per_sec = rate_per_sec;
        self.milli_tokens = self.milli_tokens.min(self.burst_milli_tokens());
    }

    fn burst_milli_tokens(&self) -> u64 {
        (self.rate_per_sec / 20).max(1) * 1000
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_refill_ms);
        self.last_refill_ms = self.last_refill_ms.max(now_ms);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed_ms.saturating_mul(self.rate_per_sec))
            .min(self.burst_milli_tokens());
    }

    /// How many tokens there are now (`usize::MAX` when unlimited).
    pub fn available(&mut self, now_ms: u64) -> usize {
        if self.rate_per_sec == 0 {
            return usize::MAX;
        }
        self.refill(now_ms);
        usize::try_from(self.milli_tokens / 1000).unwrap_or(usize::MAX)
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        if self.rate_per_sec == 0 {
            return true;
        }
        self.refill(now_ms);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// When the next token will be there (`now_ms` if one is there already).
    pub fn next_token_at_ms(&mut self, now_ms: u64) -> u64 {
        if self.rate_per_sec == 0 {
            return now_ms;
        }
        self.refill(now_ms);
        if self.milli_tokens >= 1000 {
            return now_ms;
        }
        let missing = 1000 - self.milli_tokens;
        now_ms + missing.div_ceil(self.rate_per_sec)
    }
}

/// How busy the server's event loop is: the share of wall time it spends awake (handling
/// requests, timers and this module) rather than waiting in `epoll_wait`, smoothed. Where the
/// server has I/O threads, the busiest of that and the server's other counters
/// (thread_load.rs).
#[derive(Debug, Default, Clone)]
pub struct LoadGauge {
    last_wall_us: u64,
    last_busy_us: u64,
    /// The event loop's own share by the module's hooks: 0.0 (idle) to 1.0 (never sleeps).
    busy_share: f64,
    /// The server's other counters (none without I/O threads: 0).
    threads: CounterGauge,
}

/// Shorter windows than this are too noisy to take a sample from.
const LOAD_WINDOW_US: u64 = 20_000;

impl LoadGauge {
    /// Feeds the wall clock and the loop's busy time so far; returns the busy share.
    pub fn sample(&mut self, wall_us: u64, busy_us: u64) -> f64 {
        if self.last_wall_us == 0 {
            (self.last_wall_us, self.last_busy_us) = (wall_us, busy_us);
            return self.busy_share();
        }
        let wall = wall_us.saturating_sub(self.last_wall_us);
        if wall < LOAD_WINDOW_US {
            return self.busy_share();
        }
        let busy = (busy_us.saturating_sub(self.last_busy_us) as f64 / wall as f64).clamp(0.0, 1.0);
        // Weigh the new window by its length against a time constant of about 100 ms.
        let weight = (wall as f64 / 100_000.0).min(1.0);
        self.busy_share += (busy - self.busy_share) * weight;
        (self.last_wall_us, self.last_busy_us) = (wall_us, busy_us);
        self.busy_share()
    }

    /// Whether the server's other counters are due to be read (at most every 250 ms).
    pub fn threads_due(&self, wall_us: u64) -> bool {
        self.threads.due(wall_us)
    }

    /// Feeds one reading of the server's other counters (thread_load.rs).
    pub fn sample_threads(&mut self, wall_us: u64, counters: Vec<BusyCounter>) {
        self.threads.sample(wall_us, counters);
    }

    /// The busiest of the event loop (by the hooks) and the server's other counters.
    pub fn busy_share(&self) -> f64 {
        self.busy_share.max(self.threads.busiest_share())
    }

    /// Forgets the history (the measurement starts or stops).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Load-aware pacing: the full rate when the server is idle, falling linearly to `min_rate`
/// as the event loop approaches saturation. A rate of 0 (unlimited) stays unlimited.
pub fn adaptive_rate(max_rate: u64, min_rate: u64, busy_share: f64) -> u64 {
    if max_rate == 0 {
        return 0;
    }
    let floor = min_rate.clamp(1, max_rate);
    let scaled = (max_rate as f64 * (1.0 - busy_share.clamp(0.0, 1.0))).round() as u64;
    scaled.clamp(floor, max_rate)
}

/// How much one wake-up may do before it hands the loop back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassBudget {
    pub closes: usize,
    pub micros: u64,
}

/// Fixed pacing: 8 closes or 300 us per wake-up. The server frees closed clients at the end of
/// the loop iteration (about 14 us each plus the kernel's work on the socket), so this bounds
/// that part of the stall too.
pub const FULL_PASS: PassBudget = PassBudget {
    closes: 8,
    micros: 300,
};

/// Adaptive pacing also shrinks each wake-up as the loop gets busier, down to one close: every
/// request that arrives during a wake-up waits for all of it, so on a busy server the worst
/// latency follows the size of one pass, not the rate (a lower rate alone would only space the
/// same stalls further apart). It shrinks with the square of the idle share, faster than the
/// rate: the busier the loop, the more requests are already queued behind each pass.
pub fn pass_budget(adaptive: bool, busy_share: f64) -> PassBudget {
    if !adaptive {
        return FULL_PASS;
    }
    let idle_share = 1.0 - busy_share.clamp(0.0, 1.0);
    let room = idle_share * idle_share;
    PassBudget {
        closes: ((FULL_PASS.closes as f64 * room).round() as usize).max(1),
        micros: ((FULL_PASS.micros as f64 * room).round() as u64).max(50),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_rate_follows_load_within_bounds() {
        assert_eq!(adaptive_rate(1000, 50, 0.0), 1000);
        assert_eq!(adaptive_rate(1000, 50, 0.5), 500);
        assert_eq!(adaptive_rate(1000, 50, 0.99), 50);
        assert_eq!(adaptive_rate(1000, 50, 1.0), 50);
        assert_eq!(adaptive_rate(1000, 5000, 0.5), 1000);
        assert_eq!(adaptive_rate(0, 50, 0.9), 0);
    }

    #[test]
    fn pass_budget_shrinks_with_load_only_when_adaptive() {
        assert_eq!(pass_budget(false, 0.99), FULL_PASS);
        assert_eq!(pass_budget(true, 0.0), FULL_PASS);
        assert_eq!(
            pass_budget(true, 0.5),
            PassBudget {
                closes: 2,
                micros: 75
            }
        );
        assert_eq!(
            pass_budget(true, 0.1),
            PassBudget {
                closes: 6,
                micros: 243
            }
        );
        assert_eq!(
            pass_budget(true, 0.97),
            PassBudget {
                closes: 1,
                micros: 50
            }
        );
        assert_eq!(pass_budget(true, 7.0), pass_budget(true, 1.0));
        assert_eq!(pass_budget(true, -1.0), FULL_PASS);
    }

    #[test]
    fn load_gauge_tracks_busy_share_of_wall_time() {
        let mut gauge = LoadGauge::default();
        gauge.sample(1_000_000, 0);
        // 10 ms busy in a 5 ms window is ignored (too short a window).
        assert_eq!(gauge.sample(1_005_000, 10_000), 0.0);
        // A fully busy second.
        let full = gauge.sample(2_000_000, 1_000_000);
        assert!(full > 0.95, "{full}");
        // Then two idle seconds bring it back down.
        gauge.sample(3_000_000, 1_000_000);
        assert!(gauge.sample(4_000_000, 1_000_000) < 0.05);
    }

    #[test]
    fn pacer_rate_can_change_without_minting_tokens() {
        let mut pacer = Pacer::new(1000, 0);
        pacer.set_rate(20, 0);
        assert_eq!((0..100).take_while(|_| pacer.try_take(0)).count(), 1);
        assert_eq!(pacer.next_token_at_ms(0), 50);
    }

    #[test]
    fn no_jitter_means_exact_deadline() {
        for id in 1..100 {
            assert_eq!(deadline_ms(1000, 500, 0, id, 7), 1500);
        }
    }

    #[test]
    fn jitter_stays_inside_the_window_and_covers_it() {
        let (connected_at, max_age, jitter) = (10_000, 1000, 10);
        let deadlines: Vec<u64> = (1..=5000)
            .map(|id| deadline_ms(connected_at, max_age, jitter, id, 42))
            .collect();
        let earliest = *deadlines.iter().min().unwrap();
        let latest = *deadlines.iter().max().unwrap();
        assert!(earliest >= connected_at + 900, "earliest {earliest}");
        assert!(latest <= connected_at + 1000, "latest {latest}");
        // Spread: every tenth of the window is hit by a fair share of clients.
        let mut buckets = [0u32; 10];
        for deadline in &deadlines {
            let offset = connected_at + 1000 - deadline;
            buckets[(offset.min(99) / 10) as usize] += 1;
        }
        for count in buckets {
            assert!((350..=650).contains(&count), "buckets {buckets:?}");
        }
    }

    #[test]
    fn jitter_is_stable_per_client_and_varies_with_seed() {
        assert_eq!(
            deadline_ms(0, 10_000, 50, 9, 1),
            deadline_ms(0, 10_000, 50, 9, 1)
        );
        let differing = (1..100)
            .filter(|id| deadline_ms(0, 10_000, 50, *id, 1) != deadline_ms(0, 10_000, 50, *id, 2))
            .count();
        assert!(differing > 90);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        assert_eq!(deadline_ms(u64::MAX - 5, u64::MAX, 100, 1, 1), u64::MAX);
        assert!(deadline_ms(0, u64::MAX, 100, 1, 1) > 0);
        assert_eq!(deadline_ms(5, 0, 100, 1, 1), 5);
        assert!(deadline_ms(0, 1000, 250, 1, 1) <= 1000);
    }

    #[test]
    fn queue_pops_in_deadline_order_and_only_when_due() {
        let mut queue = DeadlineQueue::default();
        queue.push(30, 3);
        queue.push(10, 1);
        queue.push(20, 2);
        queue.push(10, 0);
        assert_eq!(queue.next_deadline(), Some((10, 0)));
        assert_eq!(queue.pop_due(5), None);
        assert_eq!(queue.pop_due(20), Some((10, 0)));
        assert_eq!(queue.pop_due(20), Some((10, 1)));
        assert_eq!(queue.pop_due(20), Some((20, 2)));
        assert_eq!(queue.pop_due(20), None);
        assert_eq!(queue.count_due(30), 1);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn one_entry_per_client_keeps_the_earliest_moment() {
        let mut queue = DeadlineQueue::default();
        for _ in 0..100_000 {
            queue.push(5_000, 7);
        }
        queue.push(9_000, 7);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.next_deadline(), Some((5_000, 7)));
        queue.push(1_000, 7);
        assert_eq!(queue.next_deadline(), Some((1_000, 7)));
        assert_eq!(queue.count_due(4_000), 1);
        queue.remove(7);
        assert_eq!((queue.len(), queue.next_deadline()), (0, None));
        queue.remove(7);
        // Popped, a client can be scheduled again, later than before.
        queue.push(10, 1);
        assert_eq!(queue.pop_due(10), Some((10, 1)));
        queue.push(50, 1);
        assert_eq!(queue.next_deadline(), Some((50, 1)));
    }

    #[test]
    fn memory_follows_the_clients_not_the_calls() {
        let mut queue = DeadlineQueue::default();
        for id in 0..10_000 {
            queue.push(id, id);
        }
        let full = queue.heap_bytes();
        for id in 0..10_000 {
            queue.remove(id);
        }
        queue.shrink_if_sparse();
        assert!(
            queue.heap_bytes() < full / 10,
            "{} of {full}",
            queue.heap_bytes()
        );
        for _ in 0..1_000_000 {
            queue.push(1, 1);
        }
        assert!(queue.heap_bytes() < 4096, "{}", queue.heap_bytes());
    }

    #[test]
    fn pacer_holds_the_rate() {
        let mut pacer = Pacer::new(100, 0);
        let mut taken_per_second = Vec::new();
        for second in 0..5u64 {
            let mut taken = 0;
            for ms in 0..1000 {
                while pacer.try_take(second * 1000 + ms) {
                    taken += 1;
                }
            }
            taken_per_second.push(taken);
        }
        for taken in &taken_per_second {
            assert!((99..=105).contains(taken), "{taken_per_second:?}");
        }
    }

    #[test]
    fn pacer_bursts_are_bounded_and_next_token_is_predicted() {
        let mut pacer = Pacer::new(1000, 0);
        let burst = (0..1000).take_while(|_| pacer.try_take(0)).count();
        assert_eq!(burst, 50);
        assert_eq!(pacer.next_token_at_ms(0), 1);
        let mut slow = Pacer::new(4, 0);
        assert!(slow.try_take(0));
        assert!(!slow.try_take(0));
        assert_eq!(slow.next_token_at_ms(0), 250);
        assert!(!slow.try_take(249));
        assert!(slow.try_take(250));
    }

    #[test]
    fn unlimited_pacer_never_refuses() {
        let mut pacer = Pacer::new(0, 0);
        assert!((0..100_000).all(|_| pacer.try_take(0)));
        assert_eq!(pacer.next_token_at_ms(7), 7);
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let mut pacer = Pacer::new(10, 1000);
        assert!(pacer.try_take(1000));
        assert!(!pacer.try_take(500));
        assert!(!pacer.try_take(1000));
        assert!(pacer.try_take(1100));
    }
}
