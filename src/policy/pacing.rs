//! Pacing, apart from who is due: the token buckets of retirements and of notices, the load
//! adaptive pacing reads, and the slack clock of a backlog. `Policy` asks it for tokens and
//! budgets; it never looks at a client.

use crate::policy::config::Settings;
use crate::policy::schedule::{LoadGauge, Pacer, PassBudget, adaptive_rate, pass_budget};
use crate::policy::thread_load::BusyCounter;

#[derive(Debug)]
pub struct Pacing {
    retirements: Pacer,
    /// Notices go out no faster than retirements may: a mass of clients told at once would
    /// all reconnect at once, the herd pacing exists to prevent.
    notices: Pacer,
    load: LoadGauge,
    /// Since when pacing has been holding due clients back (cleared by a pass that retires
    /// everyone due). The slack counts from the later of a client's deadline and this moment,
    /// so clients that were overdue long before pacing began (after lowering the max age, or a
    /// runtime load into a long-running server) are paced too.
    backlog_since_ms: Option<u64>,
    /// The last pass met a client past `max-overdue-ms`: the slack outranks the load, so
    /// passes are full-size until one meets none.
    behind_slack: bool,
}

impl Pacing {
    pub fn new(settings: &Settings, now_ms: u64) -> Self {
        Self {
            retirements: Pacer::new(settings.max_evictions_per_sec, now_ms),
            notices: Pacer::new(settings.max_evictions_per_sec, now_ms),
            load: LoadGauge::default(),
            backlog_since_ms: None,
            behind_slack: false,
        }
    }

    /// A new rate or mode starts fresh buckets; otherwise adaptive pacing keeps the rate it
    /// has reached.
    pub fn apply_settings(&mut self, old: &Settings, new: &Settings, now_ms: u64) {
        if new.max_evictions_per_sec != old.max_evictions_per_sec
            || new.adaptive_pacing != old.adaptive_pacing
        {
            self.retirements = Pacer::new(new.max_evictions_per_sec, now_ms);
            self.notices = Pacer::new(new.max_evictions_per_sec, now_ms);
        }
        if new.adaptive_pacing != old.adaptive_pacing {
            self.load.reset();
        }
    }

    /// A retirement's token. A client overdue by `max_overdue_ms` or more (counted from its
    /// deadline, or from when pacing began holding clients back if that was later) needs none:
    /// pacing may delay a retirement, never by more than that slack.
    pub fn try_take(&mut self, now_ms: u64, deadline_ms: Option<u64>, max_overdue_ms: u64) -> bool {
        let counted_from = deadline_ms
            .unwrap_or(now_ms)
            .max(self.backlog_since_ms.unwrap_or(now_ms));
        if now_ms.saturating_sub(counted_from) >= max_overdue_ms {
            self.behind_slack = true;
            return true;
        }
        let taken = self.retirements.try_take(now_ms);
        if !taken {
            self.hold_back(now_ms);
        }
        taken
    }

    /// How many retirements pacing allows now (at least one, so that a pass without a token
    /// still notes the delay and the overdue slack).
    pub fn available(&mut self, now_ms: u64) -> usize {
        self.retirements.available(now_ms).max(1)
    }

    /// Whether pacing has held clients back for the whole slack: every client due since then
    /// is past it and needs no token.
    pub fn backlog_past_slack(&self, now_ms: u64, max_overdue_ms: u64) -> bool {
        self.backlog_since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= max_overdue_ms)
    }

    /// Due clients are being held back: the backlog's slack clock starts now, unless running.
    pub fn hold_back(&mut self, now_ms: u64) {
        self.backlog_since_ms.get_or_insert(now_ms);
    }

    /// A pass that dealt with everyone due leaves no backlog.
    pub fn end_pass(&mut self, drained: bool) {
        if drained {
            self.backlog_since_ms = None;
        }
    }

    /// When the operator's queue, whose earliest deadline is `deadline_ms`, should be looked at.
    pub fn next_look_ms(&mut self, deadline_ms: u64, now_ms: u64) -> u64 {
        if deadline_ms <= now_ms && self.behind_slack {
            // Clients past the slack need no token: carry on at the next loop pass.
            now_ms
        } else if deadline_ms <= now_ms {
            self.retirements.next_token_at_ms(now_ms)
        } else {
            deadline_ms
        }
    }

    /// Samples the load (adaptive pacing) and sets the rate from it. `threads` reads the
    /// server's other busy-time counters, at most every 250 ms.
    pub fn observe_load(
        &mut self,
        settings: &Settings,
        readings: impl FnOnce() -> (u64, u64),
        threads: impl FnOnce() -> Vec<BusyCounter>,
    ) {
        if !settings.adaptive_pacing {
            return;
        }
        let (now_us, event_loop_busy_us) = readings();
        if self.load.threads_due(now_us) {
            self.load.sample_threads(now_us, threads());
        }
        let busy_share = self.load.sample(now_us, event_loop_busy_us);
        let rate = adaptive_rate(
            settings.max_evictions_per_sec,
            settings.min_evictions_per_sec,
            busy_share,
        );
        self.retirements.set_rate(rate, now_us / 1000);
    }

    /// How much this wake-up may do: smaller the busier the loop (adaptive pacing), unless
    /// clients are past the slack.
    pub fn start_pass(&mut self, adaptive_pacing: bool) -> PassBudget {
        let adaptive = adaptive_pacing && !self.behind_slack;
        self.behind_slack = false;
        pass_budget(adaptive, self.load.busy_share())
    }

    pub fn busy_share(&self) -> f64 {
        self.load.busy_share()
    }

    pub fn rate_per_sec(&self) -> u64 {
        self.retirements.rate_per_sec()
    }

    /// How many notices may go out now (at least one), at the retirements' rate now.
    pub fn notices_available(&mut self, now_ms: u64) -> usize {
        let rate = self.retirements.rate_per_sec();
        if rate != self.notices.rate_per_sec() {
            // Adaptive pacing moved the retirements' rate: notices follow it.
            self.notices.set_rate(rate, now_ms);
        }
        self.notices.available(now_ms).max(1)
    }

    /// A notice's token; otherwise when the next one comes.
    pub fn try_take_notice(&mut self, now_ms: u64) -> Result<(), u64> {
        if self.notices.try_take(now_ms) {
            Ok(())
        } else {
            Err(self.notices.next_token_at_ms(now_ms))
        }
    }
}
