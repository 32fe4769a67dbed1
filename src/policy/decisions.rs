//! The enforcement policy as pure logic: the registry, each client's deadline, who is due, who
//! is spared and why, grace and pacing. It never reads the clock or calls the server: `now_ms`
//! and the server's view of a client (`ListedClient`) are passed in, so it is unit-tested with
//! fixed times and made-up clients.

use std::collections::{HashMap, HashSet};

use crate::policy::audit::{Origin, Reason};
use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::closing::{ClosingSet, FULL_LOOK_MS};
use crate::policy::config::Settings;
use crate::policy::notices::{Notices, OptedIn, notice_at_ms};
use crate::policy::pacing::Pacing;
use crate::policy::registry::{Registry, TrackedClient};
use crate::policy::schedule::{
    ClientTable, DeadlineQueue, PassBudget, deadline_ms, shrink_if_sparse,
};
use crate::policy::self_requests::SelfRequests;
use crate::policy::thread_load::BusyCounter;

/// How often a client in the middle of a request is looked at again.
pub const GRACE_POLL_MS: u64 = 10;
/// The shortest interval at which an exempt client is looked at again (exemptions can end:
/// `CLIENT NO-EVICT off`, `CLIENT SETNAME`).
pub const EXEMPT_RECHECK_MIN_MS: u64 = 1000;

/// What to do with a client that opted in to notices, when it is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeStep {
    /// Tell it now (the key's slot tag).
    Send(Option<u32>),
    /// Not yet, or no token: it is rescheduled.
    LookAgain,
    /// Not tracked any more.
    Forget,
}

/// What to do with a client whose deadline has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Retire(Reason),
    /// Spared by `maxage.exempt-*` or a rule with max age 0; looked at again at `recheck_at_ms`.
    Exempt {
        recheck_at_ms: u64,
    },
    /// Its class has a longer max age than the one it was first scheduled for.
    NotYet {
        due_at_ms: u64,
    },
}

/// Why a client is exempt, if it is.
pub fn exemption(settings: &Settings, client: &ListedClient) -> Option<&'static str> {
    let types = &settings.exempt_types;
    // MONITOR clients carry the replica flag inside the server but are shown as `O`.
    if client.has_flag('O') {
        return types.monitor.then_some("monitor");
    }
    match ClientType::of(client) {
        ClientType::Master if types.master => return Some("master"),
        ClientType::Replica if types.replica => return Some("replica"),
        ClientType::PubSub if types.pubsub => return Some("pubsub"),
        ClientType::Normal if types.normal => return Some("normal"),
        _ => {}
    }
    if types.no_evict && client.has_flag('e') {
        return Some("no-evict");
    }
    if settings.exempt_users.any_matches(&client.user) {
        return Some("user");
    }
    if !client.name.is_empty() && settings.exempt_names.any_matches(&client.name) {
        return Some("name");
    }
    None
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug)]
pub struct Policy {
    registry: Registry,
    settings: Settings,
    /// When each client is next looked at for the operator's limits (max age, rules, graceful
    /// kills, exemption rechecks): one entry per client.
    deadlines: DeadlineQueue,
    /// Clients' own requests (`MAXAGE.SELF`), in a queue of their own.
    self_requests: SelfRequests,
    pacing: Pacing,
    /// Due clients waiting for the moment right after a reply to be closed.
    closing: ClosingSet,
    /// Clients an operator's `MAXAGE.KILL ... GRACEFUL` scheduled for retirement.
    drain: HashSet<u64>,
    /// Clients the module has told the server to close, until the server frees them (at the
    /// end of the event-loop pass): a kill later in the same pass must not count them again.
    closed_pending: HashSet<u64>,
    /// When each client-side-caching redirect target began waiting for its sources.
    tracking_hold_since_ms: HashMap<u64, u64>,
    /// Clients to retire now whatever their own deadline: the tracking clients whose
    /// invalidations go to a client that is being retired.
    retire_early: HashSet<u64>,
    /// Due clients found parked in a pool that were given `PARKED_RECHECK_MS` to send a
    /// request before being closed idle (pass.rs): each is given it once.
    parked_rechecks: HashSet<u64>,
    seed: u64,
    /// Connections that asked to be told before their deadline (`MAXAGE.NOTICE`).
    notices: Notices,
    /// While an origin's closing slots are full: when its due clients may next be looked at
    /// (`FULL_LOOK_MS`), the operator's then the clients' own.
    full_look_at_ms: [u64; 2],
}

impl Policy {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn new(settings: Settings, seed: u64, now_ms: u64) -> Self {
        Self {
            registry: Registry::new(),
            pacing: Pacing::new(&settings, now_ms),
            settings,
            deadlines: DeadlineQueue::default(),
            self_requests: SelfRequests::default(),
            closing: ClosingSet::default(),
            drain: HashSet::new(),
            closed_pending: HashSet::new(),
            tracking_hold_since_ms: HashMap::new(),
            retire_early: HashSet::new(),
            parked_rechecks: HashSet::new(),
            seed,
            notices: Notices::default(),
            full_look_at_ms: [0; 2],
        }
    }

    /// Whether the due clients of an origin whose slots are full may be looked at now (in this
    /// pass, for those quiet now); if so, the next such look is `FULL_LOOK_MS` later.
    pub fn look_while_full(&mut self, origin: Origin, now_ms: u64) -> bool {
        let look_at_ms = &mut self.full_look_at_ms[origin as usize];
        if now_ms < *look_at_ms {
            return false;
        }
        *look_at_ms = now_ms + FULL_LOOK_MS;
        true
    }

    /// The next pass may look at the due clients of a full set again at once.
    pub fn look_again_while_full(&mut self, origin: Origin) {
        self.full_look_at_ms[origin as usize] = 0;
    }

    /// When the next wake-up is due for an origin's queue whose next entry is at `due_ms`.
    fn wake_for(&self, origin: Origin, due_ms: u64) -> u64 {
        if self.closing.has_room(origin) {
            due_ms
        } else {
            due_ms.max(self.full_look_at_ms[origin as usize])
        }
    }

    /// The first moment this client may be due by the operator's limits: its deadline under the
    /// shortest max age of any class (its own class is known only later, after AUTH and CLIENT
    /// SETNAME).
    pub fn deadline_of(&self, client: &TrackedClient) -> Option<u64> {
        self.settings
            .shortest_max_age_ms()
            .map(|max_age_ms| self.deadline_at(client, max_age_ms))
    }

    /// The deadline the client asked for with `MAXAGE.SELF` (no jitter: it asked for an age).
    pub fn requested_deadline(&self, client: &TrackedClient) -> Option<u64> {
        self.self_requests.deadline(client)
    }

    pub fn requested_max_age_ms(&self, client_id: u64) -> Option<u64> {
        self.self_requests.max_age_ms(client_id)
    }

    /// `MAXAGE.SELF <ms>` (0 withdraws): schedules the client for the age it asked for, in
    /// place of any earlier request (O(log n), nothing grows however often it asks). The
    /// operator's limits still apply; the earlier deadline wins. A client already waiting for
    /// its moment because of its request is let go if the request no longer makes it due.
    /// Returns a socket whose corked reply the caller must release.
    pub fn request_max_age(&mut self, client_id: u64, max_age_ms: u64, now_ms: u64) -> Option<i32> {
        let client = self.registry.get(client_id)?;
        let deadline = self.self_requests.request(&client, max_age_ms);
        if let Some(deadline) = deadline {
            let lead_ms = self.settings.notice_lead_ms;
            self.notices
                .look_no_later_than(client_id, notice_at_ms(deadline, lead_ms, now_ms));
        }
        let still_due = deadline.is_some_and(|deadline| deadline <= now_ms);
        if still_due || self.closing.armed_for(client_id) != Some(Reason::ClientRequested) {
            return None;
        }
        self.closing.remove(client_id)
    }

    /// The deadline that applies to a client now and whether it is the one the client asked
    /// for: the earlier of its class's (unless it is exempt) and its own request.
    pub fn effective_deadline(
        &self,
        tracked: &TrackedClient,
        listed: &ListedClient,
    ) -> (Option<u64>, bool) {
        let operator = if exemption(&self.settings, listed).is_some() {
            None
        } else {
            self.class_deadline(tracked, listed).1
        };
        let requested = self.requested_deadline(tracked);
        let effective = earliest(operator, requested);
        (effective, requested.is_some() && effective == requested)
    }

    /// This client's class (rule label or "default") and its deadline in that class (`None`:
    /// the class is never retired).
    pub fn class_deadline<'a>(
        &'a self,
        tracked: &TrackedClient,
        listed: &ListedClient,
    ) -> (&'a str, Option<u64>) {
        let (label, max_age_ms) = self
            .settings
            .rules
            .class_of(listed, self.settings.max_age_ms);
        (
            label,
            (max_age_ms > 0).then(|| self.deadline_at(tracked, max_age_ms)),
        )
    }

    fn deadline_at(&self, client: &TrackedClient, max_age_ms: u64) -> u64 {
        deadline_ms(
            client.connected_at_ms,
            max_age_ms,
            self.settings.jitter_pct,
            client.client_id,
            self.seed,
        )
    }

    pub fn on_connect(&mut self, client_id: u64, now_ms: u64) {
        self.track(client_id, now_ms, false);
    }

    /// Records a client (seeded ones are `approximate`) and schedules it.
    pub fn track(&mut self, client_id: u64, connected_at_ms: u64, approximate: bool) {
        self.registry
            .insert(client_id, connected_at_ms, approximate);
        if let Some(deadline) = self
            .registry
            .get(client_id)
            .and_then(|client| self.deadline_of(&client))
        {
            self.deadlines.push(deadline, client_id);
        }
    }

    /// Forgets a client that left. Returns, for a connection that had opted in to notices,
    /// what it was and whether the module closed it (rather than the client itself).
    pub fn on_disconnect(&mut self, client_id: u64) -> Option<(OptedIn, bool)> {
        let noticed = self
            .notices
            .forget(client_id)
            .map(|opted_in| (opted_in, self.closed_pending.contains(&client_id)));
        self.registry.remove(client_id);
        self.deadlines.remove(client_id);
        self.self_requests.forget(client_id);
        self.closing.remove(client_id);
        self.drain.remove(&client_id);
        self.closed_pending.remove(&client_id);
        self.retire_early.remove(&client_id);
        self.parked_rechecks.remove(&client_id);
        self.tracking_hold_since_ms.remove(&client_id);
        self.deadlines.shrink_if_sparse();
        // A wave of graceful kills, parked pools or tracking redirects leaves these as large
        // as the wave was.
        shrink_if_sparse(&mut self.drain);
        shrink_if_sparse(&mut self.closed_pending);
        shrink_if_sparse(&mut self.retire_early);
        shrink_if_sparse(&mut self.parked_rechecks);
        shrink_if_sparse(&mut self.tracking_hold_since_ms);
        noticed
    }

    /// Applies new settings to every connected client at once. Returns the sockets of clients
    /// no longer to be closed whose corked replies the caller must release.
    pub fn apply_settings(&mut self, settings: Settings, now_ms: u64) -> Vec<i32> {
        self.pacing
            .apply_settings(&self.settings, &settings, now_ms);
        self.settings = settings;
        self.retime_all()
    }

    /// Re-times the operator's deadlines (clients' own requests do not depend on settings).
    /// Returns the corked sockets of clients let go, to release.
    pub fn retime_all(&mut self) -> Vec<i32> {
        self.retime_notices();
        self.deadlines.clear();
        // An operator's graceful kill stands whatever the settings say.
        for client_id in &self.drain {
            self.deadlines.push(0, *client_id);
        }
        if !self.settings.enforcing() {
            // Enforcement is off: clients waiting for their moment are spared, except those a
            // graceful kill chose and those that asked for it themselves.
            let drain = &self.drain;
            return self.closing.retain(|client_id, reason| {
                drain.contains(&client_id) || reason.origin() == Origin::Client
            });
        }
        let clients: Vec<TrackedClient> = self.registry.iter().collect();
        for client in clients {
            if let Some(deadline) = self.deadline_of(&client) {
                self.deadlines.push(deadline, client.client_id);
            }
        }
        Vec::new()
    }

    fn queue(&mut self, origin: Origin) -> &mut DeadlineQueue {
        match origin {
            Origin::Operator => &mut self.deadlines,
            Origin::Client => &mut self.self_requests.queue,
        }
    }

    /// Takes up to `max` due clients of one queue that are still connected, earliest deadline
    /// first.
    pub fn take_due(&mut self, now_ms: u64, max: usize, origin: Origin) -> Vec<u64> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some((_, client_id)) = self.queue(origin).pop_due(now_ms) else {
                break;
            };
            if self.registry.contains(client_id) {
                due.push(client_id);
            }
        }
        due
    }

    /// Puts a client back into its queue, to be looked at no later than `at_ms`.
    pub fn requeue(&mut self, client_id: u64, at_ms: u64, origin: Origin) {
        self.queue(origin).push(at_ms, client_id);
    }

    /// Takes a pacing token for a retirement. A client overdue by `maxage.max-overdue-ms` or
    /// more (counted from its deadline, or from when pacing began holding clients back if that
    /// was later) needs none: pacing may delay a retirement, never by more than that slack.
    pub fn try_take_token(&mut self, now_ms: u64, deadline_ms: Option<u64>) -> bool {
        self.pacing
            .try_take(now_ms, deadline_ms, self.settings.max_overdue_ms)
    }

    /// How many due clients a pass may look up now: as many as pacing lets it close (at least
    /// one, so that a pass without a token still notes the delay and the overdue slack).
    pub fn closes_paced_now(&mut self, now_ms: u64) -> usize {
        self.pacing.available(now_ms)
    }

    /// Whether pacing has held the backlog back for all of `maxage.max-overdue-ms`: its clients
    /// need no token, so a pass looks up as many as it may close, not as many as tokens allow.
    pub fn backlog_past_slack(&self, now_ms: u64) -> bool {
        self.pacing
            .backlog_past_slack(now_ms, self.settings.max_overdue_ms)
    }

    /// Due clients are being held back (no token, or the pass is full): the slack clock of
    /// the backlog starts now, unless it is already running.
    pub fn hold_back(&mut self, now_ms: u64) {
        self.pacing.hold_back(now_ms);
    }

    /// A pass that dealt with everyone due leaves no backlog: pacing holds nobody now.
    pub fn end_pass(&mut self, drained: bool) {
        self.pacing.end_pass(drained);
    }

    /// This client's deadline now (its class's, or the earlier one it asked for).
    pub fn class_deadline_of(&self, client: &ListedClient) -> Option<u64> {
        self.registry
            .get(client.id)
            .and_then(|tracked| self.effective_deadline(&tracked, client).0)
    }

    /// With adaptive pacing, samples `(now_us, event_loop_busy_us)` and sets the rate from the
    /// load. Fixed pacing measures nothing, so the readings are only taken when needed (this
    /// runs on every connect and disconnect). `threads` reads the server's other busy-time
    /// counters (thread_load.rs; none without I/O threads), at most every 250 ms.
    pub fn observe_load(
        &mut self,
        readings: impl FnOnce() -> (u64, u64),
        threads: impl FnOnce() -> Vec<BusyCounter>,
    ) {
        self.pacing.observe_load(&self.settings, readings, threads);
    }

    /// How much this wake-up may do: smaller the busier the loop (adaptive pacing), unless
    /// clients are past the slack.
    pub fn start_pass(&mut self) -> PassBudget {
        self.pacing.start_pass(self.settings.adaptive_pacing)
    }

    /// The per-load seed of the jitter draws (to preview deadlines exactly).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn event_loop_busy_share(&self) -> f64 {
        self.pacing.busy_share()
    }

    pub fn current_rate_per_sec(&self) -> u64 {
        self.pacing.rate_per_sec()
    }

    /// The decision for a client whose own request came due, as the server describes it now:
    /// exemptions do not apply to what a client asked for itself.
    pub fn decide_requested(&mut self, client: &ListedClient, now_ms: u64) -> Decision {
        let requested = self
            .registry
            .get(client.id)
            .and_then(|tracked| self.requested_deadline(&tracked));
        match requested {
            Some(due_at_ms) if due_at_ms > now_ms => Decision::NotYet { due_at_ms },
            Some(_) => match self.notice_hold(client.id, now_ms, Origin::Client) {
                Some(due_at_ms) => Decision::NotYet { due_at_ms },
                None => Decision::Retire(Reason::ClientRequested),
            },
            // Withdrawn: nothing to look at again in this queue.
            None => Decision::Exempt {
                recheck_at_ms: u64::MAX,
            },
        }
    }

    /// The decision for a client due by the operator's limits, as the server describes it
    /// now. The moment of the close is not decided here: a client to retire is armed in
    /// `closing`, which waits for the moment right after one of its replies (see closing.rs).
    pub fn decide(&mut self, client: &ListedClient, now_ms: u64) -> Decision {
        if self.drain.contains(&client.id) {
            // Chosen by an operator's `MAXAGE.KILL ... GRACEFUL`: the filter said who, and an
            // exemption does not overrule it (as with the immediate kill).
            return match self.notice_hold(client.id, now_ms, Origin::Operator) {
                Some(due_at_ms) => Decision::NotYet { due_at_ms },
                None => Decision::Retire(Reason::Drain),
            };
        }
        let recheck_at_ms = now_ms
            + self
                .settings
                .shortest_max_age_ms()
                .unwrap_or(0)
                .max(EXEMPT_RECHECK_MIN_MS);
        let exempt = exemption(&self.settings, client).is_some();
        match self.registry.get(client.id) {
            None if exempt => return Decision::Exempt { recheck_at_ms },
            None => {}
            Some(tracked) => {
                let operator = if exempt {
                    None
                } else {
                    self.class_deadline(&tracked, client).1
                };
                match operator {
                    None => return Decision::Exempt { recheck_at_ms },
                    Some(due_at_ms)
                        if due_at_ms > now_ms && !self.retire_early.contains(&client.id) =>
                    {
                        return Decision::NotYet { due_at_ms };
                    }
                    Some(_) => {}
                }
            }
        }
        match self.notice_hold(client.id, now_ms, Origin::Operator) {
            Some(due_at_ms) => Decision::NotYet { due_at_ms },
            None => Decision::Retire(Reason::MaxAge),
        }
    }

    /// `MAXAGE.KILL ... GRACEFUL`: these clients are retired through enforcement (pacing, the
    /// moment after a reply, grace, audit) from now on, whatever their deadline. Returns how
    /// many were scheduled (clients already scheduled count once).
    pub fn drain(&mut self, client_ids: &[u64], now_ms: u64) -> usize {
        let mut scheduled = 0;
        for client_id in client_ids {
            if self.registry.contains(*client_id) && self.drain.insert(*client_id) {
                self.deadlines.push(now_ms, *client_id);
                self.notices.look_no_later_than(*client_id, now_ms);
                scheduled += 1;
            }
        }
        scheduled
    }

    /// The deadline a notice announces for this client now: the one that applies to it (its
    /// class's, the earlier one it asked for, or now for an operator's graceful kill). In
    /// observe mode only what a client asked for itself, which is carried out.
    fn noticed_deadline(
        &self,
        tracked: &TrackedClient,
        listed: &ListedClient,
        now_ms: u64,
    ) -> Option<u64> {
        if self.settings.observe_only {
            return self.requested_deadline(tracked);
        }
        if self.drain.contains(&listed.id) {
            return Some(now_ms);
        }
        self.effective_deadline(tracked, listed).0
    }

    /// `MAXAGE.NOTICE`: opts the client in (again) and returns its deadline now. It is looked
    /// at when its notice may be due (the class is known now, but may change before then).
    pub fn opt_in_to_notices(
        &mut self,
        listed: &ListedClient,
        slot_tag: Option<u32>,
        now_ms: u64,
    ) -> Option<u64> {
        let tracked = self.registry.get(listed.id)?;
        let deadline = self.noticed_deadline(&tracked, listed, now_ms);
        let look_at_ms = self.notice_look_at_ms(deadline, now_ms);
        self.notices.opt_in(listed.id, slot_tag, look_at_ms);
        deadline
    }

    fn notice_look_at_ms(&self, deadline: Option<u64>, now_ms: u64) -> u64 {
        match deadline {
            Some(deadline) => notice_at_ms(deadline, self.settings.notice_lead_ms, now_ms),
            None => now_ms.saturating_add(
                self.settings
                    .shortest_max_age_ms()
                    .unwrap_or(0)
                    .max(EXEMPT_RECHECK_MIN_MS),
            ),
        }
    }

    /// The opted-in clients to look at now, as many as notice pacing allows (0 when notices
    /// are off).
    pub fn take_due_notices(&mut self, now_ms: u64, max: usize) -> Vec<u64> {
        if self.settings.notice_lead_ms == 0 {
            return Vec::new();
        }
        let max = max.min(self.pacing.notices_available(now_ms));
        self.notices.take_due(now_ms, max)
    }

    /// Whether to tell this client now; otherwise it is looked at again when its notice may
    /// be due. Takes a pacing token when it is to be told.
    pub fn decide_notice(&mut self, listed: &ListedClient, now_ms: u64) -> NoticeStep {
        let Some(tracked) = self.registry.get(listed.id) else {
            return NoticeStep::Forget;
        };
        let deadline = self.noticed_deadline(&tracked, listed, now_ms);
        let look_at_ms = self.notice_look_at_ms(deadline, now_ms);
        if look_at_ms > now_ms || deadline.is_none() {
            self.notices.reschedule(listed.id, look_at_ms);
            return NoticeStep::LookAgain;
        }
        if let Err(next_token_ms) = self.pacing.try_take_notice(now_ms) {
            self.notices.reschedule(listed.id, next_token_ms);
            return NoticeStep::LookAgain;
        }
        NoticeStep::Send(self.notices.get(listed.id).and_then(|entry| entry.slot_tag))
    }

    pub fn notices(&mut self) -> &mut Notices {
        &mut self.notices
    }

    pub fn notices_view(&self) -> &Notices {
        &self.notices
    }

    /// A client told to leave gets the notice's lead to do so before the module closes it: a
    /// due client that opted in is held until then (told now if it has not been yet).
    fn notice_hold(&mut self, client_id: u64, now_ms: u64, origin: Origin) -> Option<u64> {
        let lead_ms = self.settings.notice_lead_ms;
        // Observe mode tells nobody about the operator's limits (see `noticed_deadline`).
        if lead_ms == 0 || (origin == Origin::Operator && self.settings.observe_only) {
            return None;
        }
        let opted_in = self.notices.get(client_id)?;
        match opted_in.sent_at_ms {
            Some(sent_at_ms) => {
                let leave_by_ms = sent_at_ms.saturating_add(lead_ms);
                (leave_by_ms > now_ms).then_some(leave_by_ms)
            }
            None => {
                self.notices.look_no_later_than(client_id, now_ms);
                Some(now_ms.saturating_add(lead_ms.min(GRACE_POLL_MS * 10)))
            }
        }
    }

    /// Settings changed: every opted-in client not yet told is looked at again at once (its
    /// deadline may have moved either way).
    fn retime_notices(&mut self) {
        for client_id in self.notices.waiting() {
            self.notices.reschedule(client_id, 0);
        }
    }

    /// The module has asked the server to close this client (it is freed at the end of the
    /// event-loop pass, when its disconnect event comes).
    pub fn mark_closed(&mut self, client_id: u64) {
        self.closed_pending.insert(client_id);
    }

    pub fn is_closing(&self, client_id: u64) -> bool {
        self.closed_pending.contains(&client_id)
    }

    /// Notes that a due client found parked is given time to send a request (pass.rs).
    pub fn give_parked_time(&mut self, client_id: u64) {
        self.parked_rechecks.insert(client_id);
    }

    /// Whether this client was given time while parked, since its last look (then it gets no
    /// more); forgets it either way.
    pub fn take_parked_time(&mut self, client_id: u64) -> bool {
        self.parked_rechecks.remove(&client_id)
    }

    /// A client looked at but put back without a decision (no budget or slot left in this
    /// pass) keeps the time it was given, so that it is not given time twice.
    pub fn keep_parked_time(&mut self, client_id: u64, given_time_already: bool) {
        if given_time_already {
            self.parked_rechecks.insert(client_id);
        }
    }

    /// Clients an operator's graceful kill scheduled that are still connected.
    pub fn clients_draining(&self) -> usize {
        self.drain.len()
    }

    /// The due clients waiting for their moment (see closing.rs).
    pub fn closing(&mut self) -> &mut ClosingSet {
        &mut self.closing
    }

    /// Client-side caching: `sources` send their tracking invalidations to `target`, which is
    /// about to be retired. Retiring the target alone would leave them connected with a broken
    /// redirect, silently missing invalidations; so they are retired first (each at its own safe
    /// moment) and the target waits for them. Returns when to look at the target again, or
    /// `None` when there is nothing to wait for or its grace has run out.
    pub fn hold_for_tracking_sources(
        &mut self,
        target: u64,
        sources: &[u64],
        now_ms: u64,
    ) -> Option<u64> {
        let live: Vec<u64> = sources
            .iter()
            .copied()
            .filter(|id| *id != target && self.registry.contains(*id))
            .collect();
        if live.is_empty() {
            return None;
        }
        // Its own clock: `decide` forgets a client's watch each time it finds it ready to
        // close, which restarted this grace at every look, so a target whose sources are
        // never retired (exempt) waited forever.
        let since_ms = *self.tracking_hold_since_ms.entry(target).or_insert(now_ms);
        let grace_ends = since_ms.saturating_add(self.settings.grace_ms);
        if now_ms >= grace_ends {
            return None;
        }
        for source in live {
            if self.retire_early.insert(source) {
                self.deadlines.push(now_ms, source);
            }
        }
        Some((now_ms + GRACE_POLL_MS).min(grace_ends))
    }

    /// When the timer should next fire for the deadlines: the earliest one, or, when that is
    /// due but pacing has no token, the next token. Clients' own requests are not paced. While
    /// a queue's closing slots are full its deadlines wait: a slot is freed by a close (whose
    /// disconnect re-arms the wake-up) or by the closing set's own next look.
    pub fn next_wake_ms(&mut self, now_ms: u64) -> Option<u64> {
        let requested = self
            .self_requests
            .queue
            .next_deadline()
            .map(|(deadline, _)| self.wake_for(Origin::Client, deadline).max(now_ms));
        let notice = self
            .notices
            .next_look_ms()
            .filter(|_| self.settings.notice_lead_ms > 0)
            .map(|at_ms| at_ms.max(now_ms));
        earliest(
            earliest(self.next_operator_wake_ms(now_ms), requested),
            notice,
        )
    }

    fn next_operator_wake_ms(&mut self, now_ms: u64) -> Option<u64> {
        let (deadline, _) = self.deadlines.next_deadline()?;
        let look_ms = self.pacing.next_look_ms(deadline, now_ms);
        Some(self.wake_for(Origin::Operator, look_ms))
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        earliest(
            self.deadlines.next_deadline().map(|(deadline, _)| deadline),
            self.self_requests
                .queue
                .next_deadline()
                .map(|(deadline, _)| deadline),
        )
    }

    pub fn clients_in_grace(&self) -> usize {
        self.closing.len()
    }

    /// Due clients waiting (for a pacing token, or for the next tick): walks the due entries,
    /// at most one a client.
    pub fn clients_due(&self, now_ms: u64) -> usize {
        self.deadlines.count_due(now_ms) + self.self_requests.queue.count_due(now_ms)
    }

    pub fn oldest_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.registry.oldest().map(|c| c.age_ms(now_ms))
    }

    /// Heap bytes of the per-client structures (registry, requests and deadline queues, and
    /// the sets of clients in some state), so that INFO's `registry_bytes` bounds all of them.
    pub fn heap_bytes(&self) -> usize {
        self.registry.heap_bytes()
            + self.deadlines.heap_bytes()
            + self.self_requests.heap_bytes()
            + self.notices.heap_bytes()
            + self.closing.heap_bytes()
            + self.drain.heap_bytes()
            + self.closed_pending.heap_bytes()
            + self.retire_early.heap_bytes()
            + self.parked_rechecks.heap_bytes()
            + self.tracking_hold_since_ms.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_list::parse_client_line;
    use crate::policy::config::{ExemptTypes, Patterns};
    use crate::policy::schedule::FULL_PASS;

    fn settings(max_age_ms: u64) -> Settings {
        Settings {
            max_overdue_ms: u64::MAX,
            max_age_ms,
            jitter_pct: 0,
            max_evictions_per_sec: 0,
            grace_ms: 100,
            ..Settings::table_defaults()
        }
    }

    fn listed(line: &str) -> ListedClient {
        parse_client_line(line).unwrap()
    }

    #[test]
    fn nothing_is_due_before_its_deadline() {
        let mut policy = Policy::new(settings(500), 1, 0);
        for id in 1..=50 {
            policy.on_connect(id, 1000 + id);
        }
        assert_eq!(policy.next_deadline_ms(), Some(1501));
        assert!(policy.take_due(1500, 100, Origin::Operator).is_empty());
        assert_eq!(
            policy.take_due(1510, 100, Origin::Operator),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(policy.next_wake_ms(1510), Some(1511));
    }

    #[test]
    fn a_wave_in_every_per_client_set_is_counted_and_given_back() {
        let mut policy = Policy::new(settings(600_000), 1, 0);
        policy.on_connect(1, 0);
        let quiet_bytes = policy.heap_bytes();
        let wave: Vec<u64> = (2..=10_001).collect();
        for client_id in &wave {
            policy.on_connect(*client_id, 0);
            policy.give_parked_time(*client_id);
            policy.mark_closed(*client_id);
        }
        assert_eq!(policy.drain(&wave, 10), wave.len());
        // Each set holds an entry a client: 10,000 clients cost at least 3 x 8 bytes each.
        assert!(policy.heap_bytes() > quiet_bytes + wave.len() * 24);
        for client_id in &wave {
            policy.on_disconnect(*client_id);
        }
        assert!(
            policy.heap_bytes() <= quiet_bytes + 2048,
            "{} bytes left after the wave, {quiet_bytes} before",
            policy.heap_bytes()
        );
    }

    #[test]
    fn enforcement_off_schedules_nothing() {
        let mut policy = Policy::new(settings(0), 1, 0);
        policy.on_connect(1, 0);
        assert_eq!(policy.next_deadline_ms(), None);
        assert_eq!(policy.next_wake_ms(10_000), None);
        assert_eq!(policy.registry.len(), 1);
    }

    #[test]
    fn departed_clients_are_skipped() {
        let mut policy = Policy::new(settings(100), 1, 0);
        policy.on_connect(1, 0);
        policy.on_connect(2, 0);
        policy.on_disconnect(1);
        assert_eq!(policy.take_due(1000, 10, Origin::Operator), vec![2]);
    }

    #[test]
    fn new_settings_retime_connected_clients() {
        let mut policy = Policy::new(settings(10_000), 1, 0);
        policy.on_connect(1, 0);
        assert_eq!(policy.next_deadline_ms(), Some(10_000));
        policy.apply_settings(settings(500), 0);
        assert_eq!(policy.next_deadline_ms(), Some(500));
        policy.apply_settings(settings(0), 0);
        assert_eq!(policy.next_deadline_ms(), None);
    }

    #[test]
    fn pacing_spreads_a_mass_expiry() {
        let mut config = settings(100);
        config.max_evictions_per_sec = 100;
        let mut policy = Policy::new(config, 1, 0);
        for id in 1..=2000 {
            policy.on_connect(id, 0);
        }
        let mut retired = 0;
        for now in 100..1100 {
            let due = policy.take_due(now, 64, Origin::Operator);
            for (position, _) in due.iter().enumerate() {
                if policy.try_take_token(now, Some(100)) {
                    retired += 1;
                } else {
                    due[position..]
                        .iter()
                        .for_each(|id| policy.requeue(*id, now, Origin::Operator));
                    break;
                }
            }
        }
        assert!((100..=106).contains(&retired), "{retired}");
    }

    #[test]
    fn busy_loop_shrinks_passes_until_the_slack_is_reached() {
        let mut config = settings(100);
        config.adaptive_pacing = true;
        config.max_evictions_per_sec = 100;
        config.max_overdue_ms = 500;
        let mut policy = Policy::new(config, 1, 0);
        // A loop that never sleeps.
        policy.observe_load(|| (1_000_000, 0), Vec::new);
        policy.observe_load(|| (2_000_000, 1_000_000), Vec::new);
        assert_eq!(policy.start_pass().closes, 1);
        // A client held back past the slack needs no token and makes the next pass full-size.
        while policy.try_take_token(1_500, Some(100)) {}
        assert!(!policy.try_take_token(1_510, Some(100)));
        assert!(policy.try_take_token(2_000, Some(100)));
        assert_eq!(policy.start_pass(), FULL_PASS);
        // That pass met nobody past the slack: back to one close a pass.
        assert_eq!(policy.start_pass().closes, 1);
        let mut fixed = Policy::new(settings(100), 1, 0);
        fixed.observe_load(|| (1_000_000, 0), Vec::new);
        fixed.observe_load(|| (2_000_000, 1_000_000), Vec::new);
        assert_eq!(fixed.start_pass(), FULL_PASS);
    }

    #[test]
    fn a_busy_io_thread_slows_retirement_while_the_hooks_read_idle() {
        let mut config = settings(100);
        config.adaptive_pacing = true;
        config.max_evictions_per_sec = 1000;
        config.min_evictions_per_sec = 20;
        let mut policy = Policy::new(config.clone(), 1, 0);
        let io = |busy_us| {
            move || {
                vec![
                    BusyCounter {
                        thread: 0,
                        busy_us: 0,
                    },
                    BusyCounter { thread: 1, busy_us },
                ]
            }
        };
        policy.observe_load(|| (1_000_000, 0), io(0));
        // The hooks see an idle main thread; I/O thread 1 was busy 80 % of the second.
        policy.observe_load(|| (2_000_000, 0), io(800_000));
        assert!((policy.event_loop_busy_share() - 0.8).abs() < 1e-9);
        assert_eq!(policy.current_rate_per_sec(), 200);
        // Counters are not read again within 250 ms (they cost an INFO section or /proc).
        policy.observe_load(|| (2_100_000, 0), || panic!("read too soon"));
        // Idle I/O thread: back to the full rate.
        policy.observe_load(|| (3_000_000, 0), io(800_000));
        assert_eq!(policy.current_rate_per_sec(), 1000);
        // Without counters (no I/O threads) the hooks alone decide, as before.
        let mut plain = Policy::new(config, 1, 0);
        plain.observe_load(|| (1_000_000, 0), Vec::new);
        plain.observe_load(|| (2_000_000, 500_000), Vec::new);
        assert_eq!(plain.current_rate_per_sec(), 500);
    }

    #[test]
    fn a_redirect_target_waits_for_its_sources_at_most_the_grace() {
        let mut policy = Policy::new(settings(100), 1, 0);
        policy.on_connect(5, 0);
        policy.on_connect(6, 0);
        let mut held_until = 0;
        for now in (200..400).step_by(10) {
            let idle = listed(&format!("{IDLE} cmd=get idle=3"));
            assert_eq!(policy.decide(&idle, now), Decision::Retire(Reason::MaxAge));
            match policy.hold_for_tracking_sources(5, &[6], now) {
                Some(_) => held_until = now,
                None => break,
            }
        }
        assert!((290..300).contains(&held_until), "{held_until}");
    }

    const IDLE: &str = "id=5 addr=127.0.0.1:1 name=web flags=N db=0 multi=-1 qbuf=0 argv-mem=0 \
                        obl=0 oll=0 user=default";

    #[test]
    fn exemptions_have_reasons() {
        let config = Settings {
            exempt_users: Patterns::parse("ops-*"),
            exempt_names: Patterns::parse("monitoring-*"),
            ..settings(100)
        };
        let reason = |line: &str| exemption(&config, &listed(line));
        assert_eq!(reason(IDLE), None);
        assert_eq!(reason(&IDLE.replace("flags=N", "flags=S")), Some("replica"));
        assert_eq!(reason(&IDLE.replace("flags=N", "flags=M")), Some("master"));
        assert_eq!(
            reason(&IDLE.replace("flags=N", "flags=e")),
            Some("no-evict")
        );
        assert_eq!(reason(&IDLE.replace("flags=N", "flags=O")), None);
        assert_eq!(
            reason(&IDLE.replace("user=default", "user=ops-1")),
            Some("user")
        );
        assert_eq!(
            reason(&IDLE.replace("name=web", "name=monitoring-a")),
            Some("name")
        );
        let hard = Settings {
            exempt_types: ExemptTypes::parse("master replica").unwrap(),
            ..settings(100)
        };
        assert_eq!(
            exemption(&hard, &listed(&IDLE.replace("flags=N", "flags=e"))),
            None
        );
    }

    #[test]
    fn a_graceful_kill_overrules_deadlines_exemptions_and_settings() {
        let mut policy = Policy::new(settings(0), 1, 0);
        policy.on_connect(5, 0);
        policy.on_connect(6, 0);
        assert_eq!(policy.drain(&[5, 6, 99], 10), 2);
        assert_eq!(policy.drain(&[5], 10), 0);
        assert_eq!(policy.clients_draining(), 2);
        let replica = listed(&IDLE.replace("flags=N", "flags=S"));
        assert_eq!(policy.decide(&replica, 10), Decision::Retire(Reason::Drain));
        // Settings changes re-time everyone; the drain stays scheduled.
        policy.retime_all();
        assert_eq!(policy.take_due(10, 10, Origin::Operator), vec![5, 6]);
        policy.on_disconnect(5);
        assert_eq!(policy.clients_draining(), 1);
    }

    #[test]
    fn tracking_sources_are_retired_before_their_redirect_target() {
        let mut policy = Policy::new(settings(60_000), 1, 0);
        for id in [5, 6, 7] {
            policy.on_connect(id, 0);
        }
        // 5 is due; 6 and 7 send their invalidations to it and are far from their own deadline.
        assert_eq!(
            policy.hold_for_tracking_sources(5, &[6, 7, 99], 100),
            Some(110)
        );
        assert_eq!(policy.take_due(100, 10, Origin::Operator), vec![6, 7]);
        let source = listed(&format!("{IDLE} cmd=get idle=3").replace("id=5", "id=6"));
        assert_eq!(
            policy.decide(&source, 100),
            Decision::Retire(Reason::MaxAge)
        );
        policy.on_disconnect(6);
        policy.on_disconnect(7);
        assert_eq!(policy.hold_for_tracking_sources(5, &[6, 7], 110), None);
        // The wait for sources ends with grace.
        policy.on_connect(8, 0);
        assert!(policy.hold_for_tracking_sources(5, &[8], 120).is_some());
        assert_eq!(policy.hold_for_tracking_sources(5, &[8], 100 + 100), None);
    }

    #[test]
    fn exempt_clients_are_rechecked_later() {
        let mut policy = Policy::new(settings(100), 1, 0);
        let replica = listed(&IDLE.replace("flags=N", "flags=S"));
        assert_eq!(
            policy.decide(&replica, 100),
            Decision::Exempt {
                recheck_at_ms: 100 + EXEMPT_RECHECK_MIN_MS
            }
        );
    }
}
