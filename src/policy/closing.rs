//! The moment a due client is closed, as pure logic. A client whose turn has come (deadline,
//! pacing token) is armed here, and the event loop's two hooks drive it:
//!
//! - at the top of a pass (after `epoll_wait`), bytes in its socket mean the server is about
//!   to read and serve a request: it is serving;
//! - at the bottom (before the server writes the pass's replies), a serving client's reply is
//!   about to go out: it has a reply sent;
//!   the module corks its socket (`TCP_CORK`), so the kernel holds the reply back;
//! - at the top of the next pass, which the module makes come at once, a client with a reply
//!   held and nothing new in its socket is looked at: if the server shows nothing in flight
//!   (no partial command, no pending output, no transaction, not blocked) it is closed, and the
//!   reply leaves in the same segment as the FIN; otherwise it is uncorked and served on.
//!
//! So a busy connection's application receives its last reply and the close together: it can
//! send nothing on the connection in between, and its pool sees the connection closed when it
//! next hands it out. A connection that sends nothing for `IDLE_CLOSE_MS` is closed while idle,
//! and one that never gets quiet is closed when its grace runs out. Nothing here reads the clock
//! or calls the server.

use crate::policy::audit::{Origin, Reason};
use crate::policy::client_list::ListedClient;

/// What the server shows about a due client right now, beyond `CLIENT LIST`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moment {
    /// Bytes of the next request already in the socket, not yet read by the server.
    pub unread_input_bytes: usize,
    /// Bytes of output in the socket that the kernel has not had acknowledged: a reply held by
    /// the cork shows here; one that has reached the client does not.
    pub unsent_output_bytes: usize,
}

/// In the middle of a request: inside MULTI, blocked (BLPOP, WAIT, ...), with part of a command
/// read, or with the next request already waiting in its socket. Closing it now would fail a
/// request in flight.
pub fn mid_request(client: &ListedClient, moment: Moment) -> bool {
    // The `x` flag, not `multi=`: Valkey 9.1 shows `multi=0` after EXEC.
    client.has_flag('x')
        || client.has_flag('b')
        || client.qbuf > 0
        || client.argv_mem > 0
        || moment.unread_input_bytes > 0
}

/// A reply is on its way out: the client has just run a command.
pub fn reply_pending(client: &ListedClient) -> bool {
    client.obl > 0 || client.oll > 0
}

/// Nothing suggests another request is coming soon: it never sent a command, or it has sent
/// none for a second (a connection parked in a pool). Closing such a client is safe now: a
/// pool notices the closed connection when it next hands it out.
pub fn parked(client: &ListedClient) -> bool {
    client.cmd == "NULL" || client.idle_s >= 1
}

/// Idle already (parked in a pool, never used, or subscribed: a subscriber's traffic is the
/// server's pushes, not requests) and, as the server and its socket show it now, with nothing
/// in flight: its moment is now.
pub fn quiet_now(client: &ListedClient, moment: Moment) -> bool {
    counts_as_idle(client) && !mid_request(client, moment) && !reply_pending(client)
}

fn counts_as_idle(client: &ListedClient) -> bool {
    parked(client) || client.has_flag('P')
}

/// A connection a pool may hand out again: it has served requests and is no subscriber. A
/// pool hands out its least recently used connections when its demand peaks, and retirements
/// make demand peak (their applications reconnect); connections opened in the same peak fall
/// due together. So a parked connection falls due just when it is most likely to be handed out
/// again: closed idle at once, one in two such closes failed the request sent in the
/// microseconds around the FIN (redis-py's sync pool, 32 threads, max age 500 ms: 5 failed of
/// 14 idle closes in 2 minutes on Redis 7.0 and 8.0). Given `PARKED_RECHECK_MS`, it either
/// sends a request and is closed after the reply, or is still idle and closed then, away
/// from the peak (0 failed of 7,800 retirements in the same run).
pub fn may_be_handed_out(client: &ListedClient) -> bool {
    client.cmd != "NULL" && !client.has_flag('P')
}

/// How long a due connection found parked in a pool is given to send a request (see
/// `may_be_handed_out`), once per deadline, and never more than `grace-ms`.
pub const PARKED_RECHECK_MS: u64 = IDLE_CLOSE_MS;

/// At most this many clients of each origin (the operator's, the clients' own requests) wait
/// for their moment at once; others wait their turn. That bounds the per-pass cost to one
/// socket query per armed client, and clients that hold their slot (a transaction left open)
/// cannot keep the operator's retirements waiting.
pub const MAX_CLOSING: usize = 32;
/// A client found inside a transaction or blocked is looked at again this often (its socket is
/// not queried at every event-loop pass meanwhile: it cannot be closed before it is done).
pub const HELD_POLL_MS: u64 = 10;
/// How long a corked reply the server still shows as being written is kept corked, looked at
/// again at every pass: Valkey's I/O threads write a pass's replies after the module's
/// before-sleep hook, so at the top of the next pass the write may still be under way.
pub const REPLY_WRITE_WAIT_MS: u64 = 10;
/// While an origin's slots are full, its due clients are still looked at, one pass this often,
/// and those quiet now are closed without a slot: clients that hold their slots (32
/// connections left in MULTI past their deadline, which an application user can open) would
/// otherwise keep the others of their origin waiting until grace ran out (the abuse harness saw
/// 5.2 s for a 1.5 s request). A client found busy then goes to the back of the queue, this
/// much later, so that each look starts with those not looked at yet. The look-ups stay bounded
/// however many clients wait: one pass's budget ten times a second (on Redis 8 with I/O
/// threads each look-up pauses a thread).
pub const FULL_LOOK_MS: u64 = 100;
/// A due client that sends no request for this long is closed while idle. An idle close races
/// a request the application sends in the microseconds around the FIN (its pool checked the
/// connection, then sends); the longer the connection has been idle, the less likely that is.
/// A quarter of a second: a connection in use more often than that is closed after one of its
/// replies instead, and one idle longer races a request once in thousands of idle closes at
/// most (measured: none in the client-impact runs).
pub const IDLE_CLOSE_MS: u64 = 250;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No request seen since `since_ms` (armed then, or last found busy then).
    Waiting { since_ms: u64 },
    /// Its socket held a request at the top of this pass: the server is serving it.
    Serving,
    /// Served in the last pass, whose writes sent the reply into its corked socket: look at
    /// the top of this one.
    ReplySent,
    /// Inside a transaction or blocked at its last look: looked at again at `until_ms`.
    Held { until_ms: u64 },
}

/// How the moment of a close is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseMode {
    /// The server's main thread reads and writes the client (no I/O threads; Valkey's I/O
    /// threads, which run jobs for the main thread): the reply is held corked at the bottom of a
    /// pass and the close follows at the top of the next, as described above.
    AfterReply,
    /// Redis 8 with I/O threads: the client's own thread reads and writes it, after the main
    /// thread's hooks, so nothing here can see or hold its reply. It is closed from inside its
    /// own next command instead (`next_command.rs`: the server then writes that command's reply
    /// and closes), or idle, or at the end of grace.
    AtNextCommand,
    /// Redis 8 with I/O threads, a client that cannot be closed inside its command (see
    /// `next_command.rs`): closed idle, or at the end of grace.
    IdleOnly,
}

#[derive(Clone, Debug)]
struct Armed {
    /// As the server listed it when it was armed (the fd to watch, the audit line's fields).
    client: ListedClient,
    /// Why it goes when it goes quietly (max-age, client-requested, manual drain).
    on_time: Reason,
    armed_at_ms: u64,
    phase: Phase,
    mode: CloseMode,
    /// When its reply was last corked (phase `ReplySent`).
    reply_sent_at_ms: u64,
}

/// What the top of a pass has to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TopOfPass {
    /// Clients to look at (and close if nothing is in flight).
    pub look_now: Vec<u64>,
    /// Corked sockets to release: a new request arrived behind the held reply.
    pub uncork: Vec<i32>,
}

/// What to do with a client that was looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    Close(Reason),
    Keep,
    /// Its reply is still being written into the corked socket: keep it corked and look again
    /// at the next pass.
    KeepCorked,
}

#[derive(Debug, Default)]
pub struct ClosingSet {
    armed: Vec<Armed>,
}

impl ClosingSet {
    /// Whether a client of this origin can be armed now.
    pub fn has_room(&self, origin: Origin) -> bool {
        self.armed
            .iter()
            .filter(|a| a.on_time.origin() == origin)
            .count()
            < MAX_CLOSING
    }

    /// Arms a due client. False if its origin's slots are full (or it is armed already).
    #[cfg(test)]
    pub fn arm(&mut self, client: ListedClient, on_time: Reason, now_ms: u64) -> bool {
        self.arm_with(client, on_time, now_ms, CloseMode::AfterReply)
    }

    pub fn arm_with(
        &mut self,
        client: ListedClient,
        on_time: Reason,
        now_ms: u64,
        mode: CloseMode,
    ) -> bool {
        if !self.has_room(on_time.origin()) || self.contains(client.id) {
            return false;
        }
        let since_ms = if counts_as_idle(&client) {
            now_ms.saturating_sub(IDLE_CLOSE_MS)
        } else {
            now_ms
        };
        self.armed.push(Armed {
            client,
            on_time,
            armed_at_ms: now_ms,
            phase: Phase::Waiting { since_ms },
            mode,
            reply_sent_at_ms: 0,
        });
        true
    }

    /// Whether any armed client waits to be closed inside its next command.
    pub fn any_at_next_command(&self) -> bool {
        self.armed
            .iter()
            .any(|a| a.mode == CloseMode::AtNextCommand)
    }

    /// Disarms a client armed to be closed inside its next command, which has come, if nothing
    /// more has come behind it (`unread(fd)`: bytes waiting in its socket): returns it as armed
    /// and why it goes. A request behind it would not be run, and a multiplexing client (valkey-
    /// glide, node-redis) fails it; the client waits for a command with nothing behind it, or
    /// the end of its grace.
    pub fn take_at_next_command(
        &mut self,
        client_id: u64,
        unread: impl FnOnce(i32) -> usize,
    ) -> Option<(ListedClient, Reason)> {
        let position = self
            .armed
            .iter()
            .position(|a| a.client.id == client_id && a.mode == CloseMode::AtNextCommand)?;
        if unread(self.armed[position].client.fd) > 0 {
            return None;
        }
        let armed = self.take(position);
        Some((armed.client, armed.on_time))
    }

    pub fn contains(&self, client_id: u64) -> bool {
        self.armed.iter().any(|a| a.client.id == client_id)
    }

    /// Why an armed client is armed.
    pub fn armed_for(&self, client_id: u64) -> Option<Reason> {
        self.armed
            .iter()
            .find(|a| a.client.id == client_id)
            .map(|a| a.on_time)
    }

    /// Disarms a client. Returns its socket if the module holds a reply corked in it, which the
    /// caller must release.
    pub fn remove(&mut self, client_id: u64) -> Option<i32> {
        let position = self.armed.iter().position(|a| a.client.id == client_id)?;
        let armed = self.take(position);
        (armed.phase == Phase::ReplySent).then_some(armed.client.fd)
    }

    /// Keeps only the armed clients `keep` says yes to. Returns the corked sockets of those
    /// dropped, which the caller must release.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, Reason) -> bool) -> Vec<i32> {
        let mut corked = Vec::new();
        self.armed.retain(|a| {
            let kept = keep(a.client.id, a.on_time);
            if !kept && a.phase == Phase::ReplySent {
                corked.push(a.client.fd);
            }
            kept
        });
        self.shrink_if_sparse();
        corked
    }

    fn take(&mut self, position: usize) -> Armed {
        let armed = self.armed.remove(position);
        self.shrink_if_sparse();
        armed
    }

    /// An armed client takes a few hundred bytes (the server's view of it): after a wave the
    /// set gives them back, as the registry does.
    fn shrink_if_sparse(&mut self) {
        if self.armed.capacity() > 4 && self.armed.capacity() > self.armed.len() * 4 {
            self.armed.shrink_to(self.armed.len() * 2);
        }
    }

    /// Every socket the module holds corked (to release them all at unload).
    pub fn corked_fds(&self) -> Vec<i32> {
        self.armed
            .iter()
            .filter(|a| a.phase == Phase::ReplySent)
            .map(|a| a.client.fd)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.armed.capacity() * std::mem::size_of::<Armed>()
            + self
                .armed
                .iter()
                .map(|armed| armed.client.heap_bytes())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }

    /// Whether its last look was right after a reply went out to it (not an idle close).
    pub fn reply_sent(&self, client_id: u64) -> bool {
        self.armed
            .iter()
            .any(|a| a.client.id == client_id && a.phase == Phase::ReplySent)
    }

    /// Top of an event-loop pass. `unread(fd)` is the bytes waiting in a socket. Says which
    /// clients to look at now (replies held and nothing new, idle long enough, or out of grace)
    /// and which corked sockets to release because a new request came in behind the reply.
    pub fn after_sleep(
        &mut self,
        now_ms: u64,
        grace_ms: u64,
        mut unread: impl FnMut(i32) -> usize,
    ) -> TopOfPass {
        let mut top = TopOfPass::default();
        for armed in &mut self.armed {
            let out_of_grace = now_ms.saturating_sub(armed.armed_at_ms) >= grace_ms;
            if let Phase::Held { until_ms } = armed.phase {
                if now_ms >= until_ms || out_of_grace {
                    top.look_now.push(armed.client.id);
                }
                continue;
            }
            if armed.mode != CloseMode::AfterReply {
                // Its socket belongs to an I/O thread: only time tells.
                let idle_long_enough = matches!(armed.phase, Phase::Waiting { since_ms }
                    if now_ms.saturating_sub(since_ms) >= IDLE_CLOSE_MS);
                if idle_long_enough || out_of_grace {
                    top.look_now.push(armed.client.id);
                }
                continue;
            }
            let has_input = unread(armed.client.fd) > 0;
            let ready = match armed.phase {
                _ if has_input => {
                    if armed.phase == Phase::ReplySent {
                        top.uncork.push(armed.client.fd);
                    }
                    armed.phase = Phase::Serving;
                    false
                }
                Phase::ReplySent => true,
                Phase::Waiting { since_ms } => now_ms.saturating_sub(since_ms) >= IDLE_CLOSE_MS,
                // Served at the last top, yet nothing reached the bottom (a pass interrupted by
                // a blocking command, say): treat as quiet from now.
                Phase::Serving => {
                    armed.phase = Phase::Waiting { since_ms: now_ms };
                    false
                }
                Phase::Held { .. } => unreachable!("held clients are handled above"),
            };
            if ready || out_of_grace {
                top.look_now.push(armed.client.id);
            }
        }
        top
    }

    /// Bottom of a pass, before the server writes its replies: the sockets to cork, of the
    /// clients served in this pass. When there are any, the next pass must come at once.
    pub fn before_sleep(&mut self, now_ms: u64) -> Vec<i32> {
        let mut cork = Vec::new();
        for armed in &mut self.armed {
            if armed.phase == Phase::Serving {
                armed.phase = Phase::ReplySent;
                armed.reply_sent_at_ms = now_ms;
                cork.push(armed.client.fd);
            }
        }
        cork
    }

    /// `look_at` with the reply, if one was corked, held in the kernel (unit tests).
    #[cfg(test)]
    pub fn look(
        &mut self,
        listed: &ListedClient,
        unread_now: usize,
        now_ms: u64,
        grace_ms: u64,
    ) -> Look {
        let moment = Moment {
            unread_input_bytes: unread_now,
            unsent_output_bytes: 1,
        };
        self.look_at(listed, moment, now_ms, grace_ms)
    }

    /// Decides on a client being looked at, from the server's view of it now and its socket
    /// read just now. A decision to close removes it from the set.
    ///
    /// A reply corked at the bottom of the last pass and not held in the kernel now left before
    /// the cork: Valkey's I/O threads (`io-threads-always-active`, or under load) can write a
    /// reply as soon as its command has run, before the module's before-sleep hook. Its
    /// application may be sending its next request right now, so this is no moment to close
    /// (5 failed requests in 3,885 retirements of redis-py's sync pool on Valkey 9.1 with
    /// threads, every one such a close): the client waits for its next reply, or its idle wait.
    /// Unix sockets have no cork, and nothing to check.
    pub fn look_at(
        &mut self,
        listed: &ListedClient,
        moment: Moment,
        now_ms: u64,
        grace_ms: u64,
    ) -> Look {
        let Some(position) = self.armed.iter().position(|a| a.client.id == listed.id) else {
            return Look::Keep;
        };
        let armed = &mut self.armed[position];
        let unread_now = moment.unread_input_bytes;
        let in_flight = mid_request(listed, moment) || reply_pending(listed);
        let reply_left_early = armed.phase == Phase::ReplySent
            && !listed.has_flag('U')
            && moment.unsent_output_bytes == 0;
        let out_of_grace = now_ms.saturating_sub(armed.armed_at_ms) >= grace_ms;
        let still_writing = armed.phase == Phase::ReplySent
            && !mid_request(listed, moment)
            && reply_pending(listed)
            && now_ms.saturating_sub(armed.reply_sent_at_ms) < REPLY_WRITE_WAIT_MS;
        let verdict = if !in_flight && !reply_left_early {
            Look::Close(armed.on_time)
        } else if still_writing {
            return Look::KeepCorked;
        } else if out_of_grace {
            Look::Close(match armed.on_time {
                Reason::MaxAge => Reason::MaxAgeGraceExpired,
                other => other,
            })
        } else {
            armed.phase = if unread_now > 0 && armed.mode == CloseMode::AfterReply {
                Phase::Serving
            } else if listed.has_flag('x') || listed.has_flag('b') {
                Phase::Held {
                    until_ms: now_ms + HELD_POLL_MS,
                }
            } else {
                Phase::Waiting { since_ms: now_ms }
            };
            Look::Keep
        };
        if verdict != Look::Keep {
            self.take(position);
        }
        verdict
    }

    /// When an armed client must next be looked at even if nothing happens on its socket: the
    /// end of an idle wait or of grace.
    pub fn next_look_ms(&self, grace_ms: u64) -> Option<u64> {
        self.armed
            .iter()
            .map(|a| {
                let grace_ends = a.armed_at_ms.saturating_add(grace_ms);
                match a.phase {
                    Phase::Waiting { since_ms } => {
                        grace_ends.min(since_ms.saturating_add(IDLE_CLOSE_MS))
                    }
                    Phase::Held { until_ms } => grace_ends.min(until_ms),
                    // Looked at again at the very next pass.
                    Phase::ReplySent => a.reply_sent_at_ms,
                    _ => grace_ends,
                }
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_list::parse_client_line;

    const GRACE: u64 = 5000;

    fn listed(id: u64, extra: &str) -> ListedClient {
        parse_client_line(&format!(
            "id={id} addr=127.0.0.1:1 fd={} name= flags=N db=0 multi=-1 qbuf=0 obl=0 oll=0 \
             cmd=get idle=0 user=default {extra}",
            100 + id
        ))
        .unwrap()
    }

    fn quiet(_fd: i32) -> usize {
        0
    }

    fn request_waiting(_fd: i32) -> usize {
        30
    }

    #[test]
    fn a_busy_client_is_closed_at_the_top_of_the_pass_after_its_reply() {
        let mut set = ClosingSet::default();
        assert!(set.arm(listed(5, ""), Reason::MaxAge, 1000));
        // Quiet at first: nothing to look at yet (it was active a moment ago).
        assert!(set.after_sleep(1000, GRACE, quiet).look_now.is_empty());
        // A request arrives: served in this pass; its reply goes out at the bottom, held back
        // in the corked socket.
        assert!(
            set.after_sleep(1001, GRACE, request_waiting)
                .look_now
                .is_empty()
        );
        assert_eq!(set.before_sleep(1001), vec![105]);
        assert!(set.before_sleep(1001).is_empty());
        // Next top: nothing new in the socket, so look now.
        assert_eq!(set.after_sleep(1001, GRACE, quiet).look_now, vec![5]);
        assert_eq!(
            set.look(&listed(5, ""), 0, 1001, GRACE),
            Look::Close(Reason::MaxAge)
        );
        assert!(set.is_empty());
    }

    #[test]
    fn a_new_request_behind_the_reply_means_serve_it_first() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, ""), Reason::ClientRequested, 1000);
        set.after_sleep(1000, GRACE, request_waiting);
        set.before_sleep(1001);
        // The application already sent its next request (it pipelines): the reply is released
        // and the request served, then it is looked at again.
        assert_eq!(
            set.after_sleep(1001, GRACE, request_waiting),
            TopOfPass {
                look_now: vec![],
                uncork: vec![105]
            }
        );
        assert_eq!(set.before_sleep(1001), vec![105]);
        assert_eq!(set.after_sleep(1001, GRACE, quiet).look_now, vec![5]);
        // The server still shows a reply going out: kept corked a few passes (Valkey's I/O
        // threads write after the hooks), then released and waited for.
        let replying = listed(5, "").tap_obl(5);
        assert_eq!(set.look(&replying, 0, 1001, GRACE), Look::KeepCorked);
        assert_eq!(set.next_look_ms(GRACE), Some(1001));
        assert_eq!(set.after_sleep(1002, GRACE, quiet).look_now, vec![5]);
        let later = 1001 + REPLY_WRITE_WAIT_MS;
        assert_eq!(set.look(&replying, 0, later, GRACE), Look::Keep);
        assert!(set.after_sleep(later + 1, GRACE, quiet).look_now.is_empty());
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn an_idle_client_is_closed_after_the_idle_wait() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, ""), Reason::MaxAge, 1000);
        assert!(
            set.after_sleep(999 + IDLE_CLOSE_MS, GRACE, quiet)
                .look_now
                .is_empty()
        );
        assert_eq!(set.next_look_ms(GRACE), Some(1000 + IDLE_CLOSE_MS));
        assert_eq!(
            set.after_sleep(1000 + IDLE_CLOSE_MS, GRACE, quiet).look_now,
            vec![5]
        );
        // Something slipped in between the two looks: not now.
        assert_eq!(
            set.look(&listed(5, ""), 12, 1000 + IDLE_CLOSE_MS, GRACE),
            Look::Keep
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn parked_and_never_used_clients_are_looked_at_once() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, "").tap_idle(3), Reason::MaxAge, 1000);
        set.arm(listed(6, "").tap_cmd("NULL"), Reason::MaxAge, 1000);
        assert_eq!(set.after_sleep(1000, GRACE, quiet).look_now, vec![5, 6]);
    }

    #[test]
    fn grace_ends_the_wait_and_names_the_reason() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, "flags=x"), Reason::MaxAge, 1000);
        set.arm(listed(6, "flags=x"), Reason::ClientRequested, 1000);
        let busy5 = listed(5, "").tap_flags("x");
        let busy6 = listed(6, "").tap_flags("b");
        assert_eq!(
            set.after_sleep(1000 + GRACE, GRACE, quiet).look_now,
            vec![5, 6]
        );
        assert_eq!(
            set.look(&busy5, 0, 1000 + GRACE, GRACE),
            Look::Close(Reason::MaxAgeGraceExpired)
        );
        assert_eq!(
            set.look(&busy6, 0, 1000 + GRACE, GRACE),
            Look::Close(Reason::ClientRequested)
        );
        assert!(set.is_empty());
    }

    const QUIET_LINE: &str = "id=5 addr=127.0.0.1:1 name=web flags=N db=0 multi=-1 qbuf=0 \
                              argv-mem=0 obl=0 oll=0 user=default";

    fn parsed(line: &str) -> ListedClient {
        parse_client_line(line).unwrap()
    }

    const QUIET: Moment = Moment {
        unread_input_bytes: 0,
        unsent_output_bytes: 0,
    };

    #[test]
    fn every_mid_request_sign_counts() {
        // Valkey 9.1 leaves `multi=0` on a client after EXEC: that alone is not a transaction.
        assert!(!mid_request(
            &parsed(&QUIET_LINE.replace("multi=-1", "multi=0")),
            QUIET
        ));
        for busy in ["flags=x", "flags=b", "qbuf=10", "argv-mem=12"] {
            let key = busy.split('=').next().unwrap();
            let line: String = QUIET_LINE
                .split(' ')
                .map(|f| {
                    if f.starts_with(&format!("{key}=")) {
                        busy
                    } else {
                        f
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            assert!(mid_request(&parsed(&line), QUIET), "{line}");
        }
        assert!(mid_request(
            &parsed(QUIET_LINE),
            Moment {
                unread_input_bytes: 1,
                ..QUIET
            }
        ));
        assert!(!mid_request(&parsed(QUIET_LINE), QUIET));
        assert!(reply_pending(&parsed(
            &QUIET_LINE.replace("obl=0", "obl=5")
        )));
        assert!(reply_pending(&parsed(
            &QUIET_LINE.replace("oll=0", "oll=1")
        )));
    }

    #[test]
    fn the_set_is_bounded() {
        let mut set = ClosingSet::default();
        for id in 0..MAX_CLOSING as u64 {
            assert!(set.arm(listed(id, ""), Reason::MaxAge, 0));
        }
        assert!(!set.arm(listed(999, ""), Reason::MaxAge, 0));
        assert!(!set.arm(listed(0, ""), Reason::MaxAge, 0));
        assert_eq!(set.remove(0), None);
        assert!(set.arm(listed(999, ""), Reason::MaxAge, 0));
        // Clients' own requests have their own slots: they cannot take the operator's.
        for id in 1000..1000 + MAX_CLOSING as u64 {
            assert!(set.arm(listed(id, ""), Reason::ClientRequested, 0));
        }
        assert!(!set.has_room(Origin::Client) && !set.has_room(Origin::Operator));
        set.remove(999);
        assert!(set.has_room(Origin::Operator) && !set.has_room(Origin::Client));
        // Emptied, it gives its memory back.
        let full_bytes = set.heap_bytes();
        for id in (1..MAX_CLOSING as u64).chain(1000..1000 + MAX_CLOSING as u64) {
            set.remove(id);
        }
        assert!(set.is_empty());
        assert!(
            set.heap_bytes() * 8 < full_bytes,
            "{} of {full_bytes}",
            set.heap_bytes()
        );
    }

    #[test]
    fn a_client_in_a_transaction_is_polled_not_queried_at_every_pass() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, ""), Reason::ClientRequested, 1000);
        let in_multi = listed(5, "").tap_flags("x");
        assert_eq!(set.look(&in_multi, 0, 1000, GRACE), Look::Keep);
        let mut queried = 0;
        let top = set.after_sleep(1005, GRACE, |_| {
            queried += 1;
            0
        });
        assert!(top.look_now.is_empty() && queried == 0);
        assert_eq!(set.next_look_ms(GRACE), Some(1000 + HELD_POLL_MS));
        assert_eq!(
            set.after_sleep(1000 + HELD_POLL_MS, GRACE, quiet).look_now,
            vec![5]
        );
        // Out of grace it is closed, transaction or not, as the README promises.
        assert_eq!(
            set.look(&in_multi, 0, 1000 + GRACE, GRACE),
            Look::Close(Reason::ClientRequested)
        );
    }

    #[test]
    fn a_client_of_an_io_thread_is_never_corked_and_waits_for_its_next_command() {
        let mut set = ClosingSet::default();
        set.arm_with(
            listed(5, ""),
            Reason::MaxAge,
            1000,
            CloseMode::AtNextCommand,
        );
        set.arm_with(listed(6, ""), Reason::MaxAge, 1000, CloseMode::IdleOnly);
        assert!(set.any_at_next_command());
        // Its socket is its I/O thread's: not queried, never corked.
        let mut queried = 0;
        let top = set.after_sleep(1001, GRACE, |_| {
            queried += 1;
            30
        });
        assert!(top.look_now.is_empty() && top.uncork.is_empty() && queried == 0);
        assert_eq!(set.look(&listed(6, ""), 30, 1001, GRACE), Look::Keep);
        assert!(set.before_sleep(1001).is_empty());
        // Quiet for the idle wait: looked at (and closed if nothing is in flight).
        assert_eq!(
            set.after_sleep(1001 + IDLE_CLOSE_MS, GRACE, quiet).look_now,
            vec![5, 6]
        );
        // Its next command came with another behind it: kept for a later one.
        assert_eq!(set.take_at_next_command(5, |_| 30), None);
        // Its next command came alone: taken out, to be closed inside it.
        assert_eq!(
            set.take_at_next_command(5, |_| 0).map(|(c, r)| (c.id, r)),
            Some((5, Reason::MaxAge))
        );
        assert_eq!(set.take_at_next_command(6, |_| 0).map(|(c, _)| c.id), None);
        assert!(!set.any_at_next_command());
    }

    #[test]
    fn a_reply_that_left_before_the_cork_is_no_moment_to_close() {
        let mut set = ClosingSet::default();
        assert!(set.arm(listed(5, ""), Reason::MaxAge, 1000));
        set.after_sleep(1001, GRACE, request_waiting);
        assert_eq!(set.before_sleep(1001), vec![105]);
        assert_eq!(set.after_sleep(1002, GRACE, quiet).look_now, vec![5]);
        // Nothing held in the socket: the reply reached the client before the cork, which may
        // be sending its next request. Kept (the caller releases the cork), waiting again.
        let left = Moment {
            unread_input_bytes: 0,
            unsent_output_bytes: 0,
        };
        assert_eq!(set.look_at(&listed(5, ""), left, 1002, GRACE), Look::Keep);
        assert!(set.contains(5) && set.corked_fds().is_empty());
        // Its next reply is held: closed after it.
        set.after_sleep(1003, GRACE, request_waiting);
        set.before_sleep(1003);
        assert_eq!(set.after_sleep(1004, GRACE, quiet).look_now, vec![5]);
        let held = Moment {
            unsent_output_bytes: 12,
            ..left
        };
        assert_eq!(
            set.look_at(&listed(5, ""), held, 1004, GRACE),
            Look::Close(Reason::MaxAge)
        );
        // A Unix socket has no cork: nothing to check there.
        assert!(set.arm(listed(6, "flags=U"), Reason::MaxAge, 1000));
        set.after_sleep(1001, GRACE, request_waiting);
        set.before_sleep(1001);
        assert_eq!(
            set.look_at(&listed(6, "flags=U"), left, 1002, GRACE),
            Look::Close(Reason::MaxAge)
        );
    }

    #[test]
    fn a_dropped_client_gives_back_its_corked_socket() {
        let mut set = ClosingSet::default();
        set.arm(listed(5, ""), Reason::ClientRequested, 1000);
        set.arm(listed(6, ""), Reason::MaxAge, 1000);
        set.after_sleep(1001, GRACE, request_waiting);
        assert_eq!(set.before_sleep(1001), vec![105, 106]);
        assert_eq!(set.corked_fds(), vec![105, 106]);
        assert_eq!(
            set.retain(|_, reason| reason == Reason::ClientRequested),
            vec![106]
        );
        assert_eq!(set.remove(5), Some(105));
        assert!(set.is_empty());
    }

    /// Test-only tweaks of a listed client.
    trait Tweak {
        fn tap_obl(self, obl: u64) -> Self;
        fn tap_idle(self, idle_s: u64) -> Self;
        fn tap_cmd(self, cmd: &str) -> Self;
        fn tap_flags(self, flags: &str) -> Self;
    }

    impl Tweak for ListedClient {
        fn tap_obl(mut self, obl: u64) -> Self {
            self.obl = obl as _;
            self
        }
        fn tap_idle(mut self, idle_s: u64) -> Self {
            self.idle_s = idle_s as _;
            self
        }
        fn tap_cmd(mut self, cmd: &str) -> Self {
            self.cmd = cmd.to_string();
            self
        }
        fn tap_flags(mut self, flags: &str) -> Self {
            self.flags = flags.to_string();
            self
        }
    }
}
