//! One enforcement pass as pure logic: take the due clients in deadline order, ask the server
//! about them in small batches, decide (exempt, not yet, retire), wait for client-side-caching
//! sources, take pacing tokens, arm the clients to retire for their moment (closing.rs) and put
//! back everyone to look at again. The server is reached only through `PassServer`, so the
//! wake-up is a few lines of glue and pacing, requeueing and the closing set's bound are
//! unit-tested with fixed times and made-up clients.

use std::collections::HashMap;

use crate::policy::audit::{Origin, Reason};
use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::closing::{
    CloseMode, FULL_LOOK_MS, Moment, PARKED_RECHECK_MS, may_be_handed_out, quiet_now,
};
use crate::policy::decisions::{Decision, Policy};
use crate::policy::schedule::PassBudget;

/// At most this many due clients are looked up with one `CLIENT LIST ID ...` call, and never
/// more than twice what the pass may still close, by its budget and by pacing's tokens (a
/// lookup costs a few microseconds a client; at 1,000/s a wake-up has one token, and looking
/// up 16 to close one made the paced wake-up 8 times dearer than it needs to be).
pub const LOOKUP_BATCH: usize = 16;

/// What a pass needs from the server.
pub trait PassServer {
    /// The server's view of these clients (those gone are missing).
    fn list(&mut self, client_ids: &[u64]) -> Vec<ListedClient>;
    /// The tracking clients that send their invalidations to `target`.
    fn tracking_sources(&mut self, target: u64) -> Vec<u64>;
    /// Microseconds since the pass began (the budget bounds it).
    fn elapsed_us(&mut self) -> u64;
    /// Bytes of a next request waiting in a client's socket, not yet read by the server.
    fn unread_input_bytes(&mut self, fd: i32) -> usize;
    /// How this client's close moment can be found on this server.
    fn close_mode(&mut self, client: &ListedClient) -> CloseMode;
}

/// A client to retire at once rather than at its moment: observe mode (nothing is closed, the
/// audit line says it would be) and a replica's link to its master (no requests of ours on it).
#[derive(Debug)]
pub struct RetireNow {
    pub client: ListedClient,
    pub age_ms: u64,
    pub reason: Reason,
}

#[derive(Debug, Default)]
pub struct PassOutcome {
    pub retire_now: Vec<RetireNow>,
    /// Idle clients with nothing in flight: their moment is now, so they are closed in this
    /// pass rather than armed and looked up again at the top of the next loop pass (half the
    /// lookups when thousands of parked connections fall due at once).
    pub close_quiet: Vec<RetireNow>,
    /// Clients armed for their moment in this pass.
    pub armed: usize,
    /// Due clients found parked in a pool and given `PARKED_RECHECK_MS` to send a request.
    pub parked_given_time: u64,
    pub exempted: u64,
    pub pacing_delays: u64,
}

impl Policy {
    /// One pass: the operator's queue first, then clients' own requests, each with its own
    /// close budget and closing slots (the time budget is shared, the operator first), so no
    /// number of requests can hold the operator's retirements back. Clients' requests take no
    /// pacing token: pacing spreads the operator's mass retirements, and a request is one
    /// client's own reconnect.
    pub fn run_pass(
        &mut self,
        now_ms: u64,
        budget: PassBudget,
        server: &mut impl PassServer,
    ) -> PassOutcome {
        let mut outcome = PassOutcome::default();
        // Clients to look at again go back into their queue only after this pass, so that
        // none is looked at twice within it.
        let mut look_again: Vec<(u64, u64, Origin)> = Vec::new();
        let drained = self.run_queue(
            Origin::Operator,
            now_ms,
            budget,
            server,
            &mut outcome,
            &mut look_again,
        );
        self.end_pass(drained);
        self.run_queue(
            Origin::Client,
            now_ms,
            budget,
            server,
            &mut outcome,
            &mut look_again,
        );
        for (client_id, at_ms, origin) in look_again {
            self.requeue(client_id, at_ms, origin);
        }
        outcome
    }

    /// Works through one queue's due clients within the budget. Returns whether every due
    /// client was dealt with (none left waiting for a token or time).
    fn run_queue(
        &mut self,
        origin: Origin,
        now_ms: u64,
        budget: PassBudget,
        server: &mut impl PassServer,
        outcome: &mut PassOutcome,
        look_again: &mut Vec<(u64, u64, Origin)>,
    ) -> bool {
        let operators = origin == Origin::Operator;
        let observe_only = operators && self.settings().observe_only;
        let mut closed = 0;
        // Whether this pass is the FULL_LOOK_MS look at the due clients of a full set (then it
        // goes on within the pass's budget, closing those quiet now).
        let mut looking_while_full = false;
        while closed < budget.closes && server.elapsed_us() < budget.micros {
            if !looking_while_full && !self.closing().has_room(origin) {
                if !self.look_while_full(origin, now_ms) {
                    // A slot freed, or FULL_LOOK_MS later, re-arms the wake-up (`next_wake_ms`).
                    return false;
                }
                looking_while_full = true;
            }
            let mut may_close = budget.closes - closed;
            if operators && !self.backlog_past_slack(now_ms) {
                may_close = may_close.min(self.closes_paced_now(now_ms));
            }
            let batch = self.take_due(now_ms, LOOKUP_BATCH.min(2 * may_close), origin);
            if batch.is_empty() {
                return true;
            }
            let listed: HashMap<u64, ListedClient> = server
                .list(&batch)
                .into_iter()
                .map(|client| (client.id, client))
                .collect();
            for (position, client_id) in batch.iter().enumerate() {
                // Gone, or already being closed (a MAXAGE.KILL earlier in this event-loop pass).
                let Some(client) = listed
                    .get(client_id)
                    .filter(|c| !c.has_flag('A') && !self.is_closing(c.id))
                else {
                    continue;
                };
                let given_time_already = self.take_parked_time(*client_id);
                let decision = if operators {
                    self.decide(client, now_ms)
                } else {
                    self.decide_requested(client, now_ms)
                };
                let reason = match decision {
                    Decision::Exempt { recheck_at_ms } => {
                        if operators {
                            outcome.exempted += 1;
                            look_again.push((*client_id, recheck_at_ms, origin));
                        }
                        continue;
                    }
                    Decision::NotYet { due_at_ms } => {
                        look_again.push((*client_id, due_at_ms, origin));
                        continue;
                    }
                    Decision::Retire(reason) => reason,
                };
                if may_receive_invalidations(client) {
                    let sources = server.tracking_sources(client.id);
                    if let Some(retry_at_ms) =
                        self.hold_for_tracking_sources(client.id, &sources, now_ms)
                    {
                        look_again.push((*client_id, retry_at_ms, origin));
                        continue;
                    }
                }
                if self.closing().contains(*client_id) {
                    continue;
                }
                let observe_this =
                    observe_only && matches!(reason, Reason::MaxAge | Reason::MaxAgeGraceExpired);
                let at_once = observe_this || ClientType::of(client) == ClientType::Master;
                let quiet = !at_once && {
                    let unread_input_bytes = server.unread_input_bytes(client.fd);
                    quiet_now(
                        client,
                        Moment {
                            unread_input_bytes,
                            ..Moment::default()
                        },
                    )
                };
                // The time given is part of the wait for a safe moment, which grace bounds.
                let recheck_ms = PARKED_RECHECK_MS.min(self.settings().grace_ms);
                if quiet && recheck_ms > 0 && !given_time_already && may_be_handed_out(client) {
                    self.give_parked_time(*client_id);
                    look_again.push((*client_id, now_ms + recheck_ms, origin));
                    outcome.parked_given_time += 1;
                    continue;
                }
                // Only a client that must wait for its moment takes a slot: one quiet now is
                // closed whatever the set holds (32 connections sitting in MULTI past their
                // deadline, which an application user can open, would otherwise hold every
                // quiet due client of their origin until grace ran out).
                if !at_once && !quiet && !self.closing().has_room(origin) {
                    self.keep_parked_time(*client_id, given_time_already);
                    look_again.push((*client_id, now_ms + FULL_LOOK_MS, origin));
                    continue;
                }
                let paced_out = operators && {
                    let deadline_ms = self.class_deadline_of(client);
                    !self.try_take_token(now_ms, deadline_ms)
                };
                if closed >= budget.closes || paced_out {
                    // Put back for a later pass: the time it was given still counts then.
                    self.keep_parked_time(*client_id, given_time_already);
                    if operators {
                        self.hold_back(now_ms);
                        outcome.pacing_delays += 1;
                    }
                    look_again.extend(batch[position..].iter().map(|id| (*id, now_ms, origin)));
                    return false;
                }
                if at_once || quiet {
                    let age_ms = self
                        .registry()
                        .get(*client_id)
                        .map_or(client.lower_bound_age_ms(), |c| c.age_ms(now_ms));
                    let retirement = RetireNow {
                        client: client.clone(),
                        age_ms,
                        reason,
                    };
                    if at_once {
                        outcome.retire_now.push(retirement);
                    } else {
                        outcome.close_quiet.push(retirement);
                    }
                    // A look at a full set that closes clients quiet now may stop at the
                    // pass's budget with more of them due: the next pass looks again at once
                    // (each such look closes one at least, so these look-ups are bounded by the
                    // closes).
                    self.look_again_while_full(origin);
                } else {
                    let mode = server.close_mode(client);
                    self.closing()
                        .arm_with(client.clone(), reason, now_ms, mode);
                    outcome.armed += 1;
                }
                if !observe_this {
                    closed += 1;
                }
            }
        }
        false
    }
}

/// Whether invalidation messages of another client's tracking can go to this one: any RESP3
/// client can; the server redirects to a RESP2 client in Pub/Sub mode, whatever it subscribed
/// with (`SUBSCRIBE`, `PSUBSCRIBE` or `SSUBSCRIBE`).
pub fn may_receive_invalidations(client: &ListedClient) -> bool {
    client.resp == 3 || client.has_flag('P')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_list::parse_client_line;
    use crate::policy::closing::MAX_CLOSING;
    use crate::policy::config::Settings;
    use crate::policy::schedule::FULL_PASS;

    /// A server of idle RESP2 clients, all still connected unless `gone`.
    #[derive(Default)]
    struct FakeServer {
        gone: Vec<u64>,
        replicas: Vec<u64>,
        /// Never sent a command (`cmd=NULL`): parked.
        parked: Vec<u64>,
        /// Sent commands, but none for a second: parked in a pool.
        pooled: Vec<u64>,
        /// With bytes of a request waiting in their socket.
        unread: Vec<u64>,
        lists: usize,
        looked_up: usize,
    }

    impl PassServer for FakeServer {
        fn list(&mut self, client_ids: &[u64]) -> Vec<ListedClient> {
            self.lists += 1;
            self.looked_up += client_ids.len();
            client_ids
                .iter()
                .filter(|id| !self.gone.contains(id))
                .map(|id| {
                    let flags = if self.replicas.contains(id) { "S" } else { "N" };
                    let cmd = if self.parked.contains(id) {
                        "NULL"
                    } else {
                        "get"
                    };
                    let idle = u8::from(self.pooled.contains(id));
                    parse_client_line(&format!(
                        "id={id} addr=127.0.0.1:1 fd={id} flags={flags} db=0 qbuf=0 obl=0 oll=0 \
                         cmd={cmd} idle={idle} user=default resp=2"
                    ))
                    .unwrap()
                })
                .collect()
        }
        fn tracking_sources(&mut self, _target: u64) -> Vec<u64> {
            Vec::new()
        }
        fn elapsed_us(&mut self) -> u64 {
            0
        }
        fn unread_input_bytes(&mut self, fd: i32) -> usize {
            if self.unread.contains(&(fd as u64)) {
                30
            } else {
                0
            }
        }
        fn close_mode(&mut self, _client: &ListedClient) -> CloseMode {
            CloseMode::AfterReply
        }
    }

    fn settings(max_age_ms: u64, rate: u64) -> Settings {
        Settings {
            max_overdue_ms: u64::MAX,
            max_age_ms,
            jitter_pct: 0,
            max_evictions_per_sec: rate,
            grace_ms: 100,
            ..Settings::table_defaults()
        }
    }

    #[test]
    fn a_pass_arms_the_due_clients_up_to_its_budget_and_requeues_the_rest() {
        let mut policy = Policy::new(settings(100, 0), 1, 0);
        for id in 1..=20 {
            policy.on_connect(id, 0);
        }
        let mut server = FakeServer {
            gone: vec![3],
            replicas: vec![4],
            ..FakeServer::default()
        };
        let outcome = policy.run_pass(100, FULL_PASS, &mut server);
        // 8 closes a pass (FULL_PASS); the one gone and the exempt replica do not count.
        assert_eq!(outcome.armed, FULL_PASS.closes);
        assert_eq!(outcome.exempted, 1);
        assert_eq!(policy.clients_in_grace(), FULL_PASS.closes);
        assert!(server.lists <= 2, "{} lookups", server.lists);
        // The rest are still due, and the next pass goes on with them.
        assert_eq!(policy.run_pass(101, FULL_PASS, &mut server).armed, 8);
    }

    #[test]
    fn a_paced_pass_looks_up_only_what_its_tokens_can_close() {
        // 20/s: a burst of one token, then one every 50 ms.
        let mut policy = Policy::new(settings(100, 20), 1, 0);
        for id in 1..=40 {
            policy.on_connect(id, 0);
        }
        let mut server = FakeServer::default();
        assert_eq!(policy.run_pass(100, FULL_PASS, &mut server).armed, 1);
        assert_eq!(server.looked_up, 2);
        // No token yet: a lookup of two notes the delay.
        let outcome = policy.run_pass(101, FULL_PASS, &mut server);
        assert_eq!((outcome.armed, outcome.pacing_delays), (0, 1));
        assert_eq!(server.looked_up, 4);
        assert_eq!(policy.run_pass(150, FULL_PASS, &mut server).armed, 1);
    }

    #[test]
    fn a_full_closing_set_does_not_hold_back_a_client_quiet_now() {
        let mut policy = Policy::new(settings(100, 0), 1, 0);
        let busy = MAX_CLOSING as u64;
        for id in 1..=busy + 2 {
            policy.on_connect(id, 0);
        }
        // The first MAX_CLOSING have a request waiting: they fill the set. Of the last two,
        // one never sent a command (quiet now) and one has a request waiting.
        let mut server = FakeServer {
            parked: vec![busy + 1],
            unread: (1..=busy).chain([busy + 2]).collect(),
            ..FakeServer::default()
        };
        let budget = PassBudget {
            closes: usize::MAX,
            ..FULL_PASS
        };
        let outcome = policy.run_pass(100, budget, &mut server);
        let closed: Vec<u64> = outcome.close_quiet.iter().map(|r| r.client.id).collect();
        assert_eq!(closed, vec![busy + 1]);
        assert_eq!(outcome.armed, MAX_CLOSING);
        assert!(!policy.closing().contains(busy + 2));
    }

    #[test]
    fn parked_clients_with_nothing_in_flight_are_closed_in_the_pass() {
        let mut policy = Policy::new(settings(100, 0), 1, 0);
        for id in 1..=4 {
            policy.on_connect(id, 0);
        }
        // 1 and 2 parked, 2 with a request just arrived; 3 and 4 ran a command a moment ago.
        let mut server = FakeServer {
            parked: vec![1, 2],
            unread: vec![2],
            ..FakeServer::default()
        };
        let outcome = policy.run_pass(100, FULL_PASS, &mut server);
        let closed: Vec<u64> = outcome.close_quiet.iter().map(|r| r.client.id).collect();
        assert_eq!(closed, vec![1]);
        assert_eq!(outcome.close_quiet[0].reason, Reason::MaxAge);
        assert_eq!(outcome.armed, 3);
        assert!(!policy.closing().contains(1) && policy.closing().contains(2));
        assert_eq!(server.lists, 1);
    }

    #[test]
    fn parked_clients_put_back_for_want_of_budget_are_not_given_time_twice() {
        let mut policy = Policy::new(
            Settings {
                grace_ms: 1000,
                ..settings(100, 0)
            },
            1,
            0,
        );
        let wave = 3 * FULL_PASS.closes as u64;
        for id in 1..=wave {
            policy.on_connect(id, 0);
        }
        let mut server = FakeServer {
            pooled: (1..=wave).collect(),
            ..FakeServer::default()
        };
        let mut given = 0;
        let mut now = 100;
        while given < wave {
            given += policy
                .run_pass(now, FULL_PASS, &mut server)
                .parked_given_time;
            now += 1;
        }
        // Their time is up: FULL_PASS.closes a pass, and none is given time again.
        let mut closed = 0;
        now = 100 + PARKED_RECHECK_MS;
        while closed < wave as usize {
            let outcome = policy.run_pass(now, FULL_PASS, &mut server);
            assert_eq!(outcome.parked_given_time, 0, "at {now}");
            assert!(outcome.close_quiet.len() <= FULL_PASS.closes);
            closed += outcome.close_quiet.len();
            now += 1;
        }
        assert_eq!(now, 100 + PARKED_RECHECK_MS + 3);
    }

    #[test]
    fn pooled_clients_parked_at_their_deadline_get_time_to_send_a_request_once() {
        let mut policy = Policy::new(
            Settings {
                grace_ms: 1000,
                ..settings(100, 0)
            },
            1,
            0,
        );
        for id in 1..=3 {
            policy.on_connect(id, 0);
        }
        let mut server = FakeServer {
            pooled: vec![1, 2, 3],
            ..FakeServer::default()
        };
        let outcome = policy.run_pass(100, FULL_PASS, &mut server);
        assert!(outcome.close_quiet.is_empty() && outcome.armed == 0);
        assert_eq!(outcome.parked_given_time, 3);
        // Not looked at again before their time is up, and then once only.
        assert!(
            policy
                .run_pass(100 + PARKED_RECHECK_MS - 1, FULL_PASS, &mut server)
                .parked_given_time
                == 0
        );
        assert_eq!(server.lists, 1);
        // Meanwhile 2 sent a request (it is closed after its reply) and 3 is serving one.
        server.pooled = vec![1];
        server.unread = vec![3];
        let outcome = policy.run_pass(100 + PARKED_RECHECK_MS, FULL_PASS, &mut server);
        let closed: Vec<u64> = outcome.close_quiet.iter().map(|r| r.client.id).collect();
        assert_eq!(
            (closed, outcome.armed, outcome.parked_given_time),
            (vec![1], 2, 0)
        );
        assert!(policy.closing().contains(2) && policy.closing().contains(3));
        // A client that leaves meanwhile is forgotten.
        policy.on_connect(4, 200);
        server.pooled = vec![4];
        assert_eq!(
            policy
                .run_pass(300, FULL_PASS, &mut server)
                .parked_given_time,
            1
        );
        policy.on_disconnect(4);
        assert!(!policy.take_parked_time(4));
        // Grace bounds the time given: with none, a parked client is closed at once.
        let mut policy = Policy::new(
            Settings {
                grace_ms: 0,
                ..settings(100, 0)
            },
            1,
            0,
        );
        policy.on_connect(5, 0);
        server.pooled = vec![5];
        let outcome = policy.run_pass(100, FULL_PASS, &mut server);
        assert_eq!(
            (outcome.close_quiet.len(), outcome.parked_given_time),
            (1, 0)
        );
    }

    #[test]
    fn a_full_closing_set_puts_clients_back_for_later() {
        let mut policy = Policy::new(settings(100, 0), 1, 0);
        for id in 1..=(MAX_CLOSING as u64 + 5) {
            policy.on_connect(id, 0);
        }
        let mut server = FakeServer::default();
        let mut now = 100;
        while policy.clients_in_grace() < MAX_CLOSING {
            policy.run_pass(now, FULL_PASS, &mut server);
            now += 1;
        }
        // Full: the 5 waiting are looked at once a FULL_LOOK_MS (to close those quiet now),
        // not at every event-loop pass.
        let lookups = server.looked_up;
        let end = now + 2 * FULL_LOOK_MS;
        while now < end {
            assert_eq!(policy.run_pass(now, FULL_PASS, &mut server).armed, 0);
            now += 1;
        }
        assert!(
            server.looked_up - lookups <= 2 * 5,
            "{}",
            server.looked_up - lookups
        );
        assert_eq!(policy.clients_due(now + FULL_LOOK_MS), 5);
        let wake_ms = policy.next_wake_ms(now).unwrap();
        assert!(wake_ms <= now + FULL_LOOK_MS, "{wake_ms} at {now}");
        // A slot freed: they are armed as soon as they are due.
        policy.on_disconnect(1);
        let later = now + FULL_LOOK_MS;
        assert!(policy.next_wake_ms(later).unwrap() <= later);
        assert_eq!(policy.run_pass(later, FULL_PASS, &mut server).armed, 1);
    }

    /// Item 3 of the application-user issue: clients that asked for a 1 ms max age and then
    /// hold their slot (a transaction left open) neither take the operator's closing slots nor
    /// its pacing tokens, and are looked at after the operator's due clients.
    #[test]
    fn clients_own_requests_never_hold_the_operators_retirements_back() {
        let mut policy = Policy::new(settings(2_000, 10), 1, 0);
        for id in 1..=200 {
            policy.on_connect(id, 0);
        }
        for id in 1_000..1_100 {
            policy.on_connect(id, 1_990);
            policy.request_max_age(id, 1, 1_990);
        }
        let mut server = FakeServer::default();
        let mut now = 1_991;
        while now < 2_000 {
            policy.run_pass(now, FULL_PASS, &mut server);
            now += 1;
        }
        assert!(!policy.closing().has_room(Origin::Client));
        let mut operators_armed = 0;
        while now < 2_100 {
            operators_armed += policy.run_pass(now, FULL_PASS, &mut server).armed;
            for id in 1..=200 {
                policy.closing().remove(id);
            }
            now += 1;
        }
        // 10/s with a burst of one: the operator's pacing alone decides.
        assert!((1..=3).contains(&operators_armed), "{operators_armed}");
        let mut unpaced = Policy::new(settings(2_000, 0), 1, 0);
        for id in 1..=200 {
            unpaced.on_connect(id, 0);
        }
        for id in 1_000..1_100 {
            unpaced.on_connect(id, 1_990);
            unpaced.request_max_age(id, 1, 1_990);
            unpaced.run_pass(1_991, FULL_PASS, &mut server);
        }
        let mut armed = 0;
        for tick in 0..25 {
            armed += unpaced.run_pass(2_000 + tick, FULL_PASS, &mut server).armed;
            for id in 1..=200 {
                unpaced.closing().remove(id);
            }
        }
        assert_eq!(armed, 200);
    }

    /// Lowering the max age makes every old client overdue at once, by far more than the
    /// slack: pacing must still spread them, the slack counting from when pacing held each.
    #[test]
    fn clients_overdue_before_pacing_held_them_are_still_paced() {
        let mut config = settings(3_600_000, 100);
        config.max_overdue_ms = 2_000;
        let mut policy = Policy::new(config.clone(), 1, 0);
        for id in 1..=1000 {
            policy.on_connect(id, 0);
        }
        config.max_age_ms = 1_000;
        let now = 86_400_000;
        policy.apply_settings(config, now);
        let mut server = FakeServer::default();
        let mut armed_in_first_second = 0;
        for tick in 0..1000 {
            armed_in_first_second += policy.run_pass(now + tick, FULL_PASS, &mut server).armed;
            // Each armed client is closed at its moment, making room for the next.
            for id in 1..=1000 {
                policy.closing().remove(id);
            }
        }
        assert!(
            (100..=106).contains(&armed_in_first_second),
            "{armed_in_first_second}"
        );
        // ...and the slack still bounds the wait, counted from when pacing began.
        assert!(policy.try_take_token(now + 2_000, Some(1_000)));
    }

    #[test]
    fn observe_mode_retires_nothing_and_arms_nobody() {
        let mut config = settings(100, 0);
        config.observe_only = true;
        let mut policy = Policy::new(config, 1, 0);
        for id in 1..=3 {
            policy.on_connect(id, 0);
        }
        let outcome = policy.run_pass(100, FULL_PASS, &mut FakeServer::default());
        assert_eq!(outcome.armed, 0);
        assert_eq!(outcome.retire_now.len(), 3);
        assert!(
            outcome
                .retire_now
                .iter()
                .all(|r| r.reason == Reason::MaxAge && r.age_ms == 100)
        );
    }
}
