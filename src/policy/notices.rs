//! Notices: a connection that opted in with `MAXAGE.NOTICE` is told, a lead time before its
//! deadline, that it should leave, so that it can finish what is in flight on it, open a
//! replacement and close it itself, and no request fails. The module cannot write a message to
//! another client, but it can make the server send one: a RESP3 client-side-caching
//! invalidation of a key only that connection is tracking (`key_of`). This file is the pure
//! bookkeeping: who opted in, when each is to be told, who was told.
//!
//! One entry per opted-in connection, replaced in place however often it opts in again; a
//! notice is sent at most once per connection (the server forgets the key's tracking when it
//! sends the invalidation); after it the server-side close at the deadline is the backstop.

use std::collections::HashMap;

use crate::policy::schedule::{ClientTable, DeadlineQueue, shrink_if_sparse};

/// The keys whose invalidation is a notice start with this; adapters match on it.
pub const KEY_PREFIX: &str = "__maxage__:notice:";

/// The key whose invalidation tells `client_id` to leave. In a cluster the key carries a hash
/// tag that puts it in a slot this node serves (`slot_tag`), since the server refuses to track
/// keys of other nodes' slots.
pub fn key_of(client_id: u64, slot_tag: Option<u32>) -> String {
    match slot_tag {
        Some(tag) => format!("{KEY_PREFIX}{{{tag}}}:{client_id}"),
        None => format!("{KEY_PREFIX}{client_id}"),
    }
}

/// When a client whose deadline is `deadline_ms` is told: `lead_ms` before it, or now if that
/// moment has passed.
pub fn notice_at_ms(deadline_ms: u64, lead_ms: u64, now_ms: u64) -> u64 {
    deadline_ms.saturating_sub(lead_ms).max(now_ms)
}

/// Redis Cluster's key slot of a key (CRC16-XMODEM of the hash tag or the whole key, mod 16384).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|b| *b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for byte in hashed {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3fff
}

/// The first hash tag (`{0}`, `{1}`, ...) whose slot is in one of `ranges` (inclusive), trying
/// at most `max_tries` tags: the notice key must live in a slot this node serves.
pub fn tag_for_slots(ranges: &[(u16, u16)], max_tries: u32) -> Option<u32> {
    (0..max_tries).find(|tag| {
        let slot = key_slot(tag.to_string().as_bytes());
        ranges
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptedIn {
    pub slot_tag: Option<u32>,
    /// When the notice was sent, once it has been.
    pub sent_at_ms: Option<u64>,
}

/// Who opted in and when each is next looked at (to send its notice or to re-time it).
#[derive(Debug, Default)]
pub struct Notices {
    opted_in: HashMap<u64, OptedIn>,
    look_at: DeadlineQueue,
}

impl Notices {
    /// Opts a connection in (again): a connection that opts in after its notice was sent
    /// registered its key anew, so it can be told again.
    pub fn opt_in(&mut self, client_id: u64, slot_tag: Option<u32>, look_at_ms: u64) {
        self.opted_in.insert(
            client_id,
            OptedIn {
                slot_tag,
                sent_at_ms: None,
            },
        );
        self.look_at.remove(client_id);
        self.look_at.push(look_at_ms, client_id);
    }

    /// Opts a connection out (`MAXAGE.NOTICE OFF`), or forgets it when it disconnects. Returns
    /// what it was, so the caller can release its key and count how it left.
    pub fn forget(&mut self, client_id: u64) -> Option<OptedIn> {
        self.look_at.remove(client_id);
        let was = self.opted_in.remove(&client_id);
        if was.is_some() {
            self.look_at.shrink_if_sparse();
            shrink_if_sparse(&mut self.opted_in);
        }
        was
    }

    pub fn get(&self, client_id: u64) -> Option<OptedIn> {
        self.opted_in.get(&client_id).copied()
    }

    /// Looks at a connection again at `at_ms`, in place of any earlier plan (its deadline
    /// moved). Connections not opted in or already told are left alone.
    pub fn reschedule(&mut self, client_id: u64, at_ms: u64) {
        if self
            .opted_in
            .get(&client_id)
            .is_some_and(|entry| entry.sent_at_ms.is_none())
        {
            self.look_at.remove(client_id);
            self.look_at.push(at_ms, client_id);
        }
    }

    /// Looks at a connection no later than `at_ms` (its deadline may have come closer).
    pub fn look_no_later_than(&mut self, client_id: u64, at_ms: u64) {
        if self
            .opted_in
            .get(&client_id)
            .is_some_and(|entry| entry.sent_at_ms.is_none())
        {
            self.look_at.push(at_ms, client_id);
        }
    }

    /// Up to `max` connections to look at now, earliest first.
    pub fn take_due(&mut self, now_ms: u64, max: usize) -> Vec<u64> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some((_, client_id)) = self.look_at.pop_due(now_ms) else {
                break;
            };
            if self.opted_in.contains_key(&client_id) {
                due.push(client_id);
            }
        }
        due
    }

    pub fn mark_sent(&mut self, client_id: u64, now_ms: u64) {
        if let Some(entry) = self.opted_in.get_mut(&client_id) {
            entry.sent_at_ms = Some(now_ms);
        }
        self.look_at.remove(client_id);
    }

    /// Every opted-in connection not yet told (to re-time after a settings change).
    pub fn waiting(&self) -> Vec<u64> {
        self.opted_in
            .iter()
            .filter(|(_, entry)| entry.sent_at_ms.is_none())
            .map(|(client_id, _)| *client_id)
            .collect()
    }

    pub fn next_look_ms(&self) -> Option<u64> {
        self.look_at.next_deadline().map(|(at_ms, _)| at_ms)
    }

    pub fn len(&self) -> usize {
        self.opted_in.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.opted_in.heap_bytes() + self.look_at.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_the_clusters() {
        // Values from CLUSTER KEYSLOT on Redis 7.0.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"{7}"), key_slot(b"7"));
    }

    #[test]
    fn a_tag_is_found_for_any_slot_range() {
        for (first, last) in [(0, 5460), (5461, 10922), (10923, 16383), (100, 100)] {
            let tag = tag_for_slots(&[(first, last)], 1_000_000).unwrap();
            let slot = key_slot(key_of(9, Some(tag)).as_bytes());
            assert!((first..=last).contains(&slot), "{tag} -> {slot}");
        }
        assert_eq!(tag_for_slots(&[], 1_000), None);
    }

    #[test]
    fn keys_name_the_connection_and_carry_the_slot_tag() {
        assert_eq!(key_of(42, None), "__maxage__:notice:42");
        assert_eq!(key_of(42, Some(7)), "__maxage__:notice:{7}:42");
    }

    #[test]
    fn a_notice_comes_its_lead_before_the_deadline_or_at_once() {
        assert_eq!(notice_at_ms(10_000, 1_000, 0), 9_000);
        assert_eq!(notice_at_ms(10_000, 1_000, 9_500), 9_500);
        assert_eq!(notice_at_ms(500, 1_000, 100), 100);
    }

    #[test]
    fn opting_in_again_replaces_the_entry() {
        let mut notices = Notices::default();
        for round in 0..10_000 {
            notices.opt_in(1, None, 5_000 + round);
        }
        assert_eq!(notices.len(), 1);
        assert_eq!(notices.next_look_ms(), Some(14_999));
        assert!(notices.take_due(14_998, 10).is_empty());
        assert_eq!(notices.take_due(14_999, 10), vec![1]);
    }

    #[test]
    fn a_sent_notice_is_not_rescheduled_until_the_connection_opts_in_again() {
        let mut notices = Notices::default();
        notices.opt_in(1, Some(3), 100);
        assert_eq!(notices.take_due(100, 10), vec![1]);
        notices.mark_sent(1, 100);
        notices.reschedule(1, 50);
        notices.look_no_later_than(1, 50);
        assert!(notices.take_due(1_000, 10).is_empty());
        assert!(notices.waiting().is_empty());
        assert_eq!(notices.get(1).unwrap().sent_at_ms, Some(100));
        notices.opt_in(1, Some(3), 200);
        assert_eq!(notices.waiting(), vec![1]);
    }

    #[test]
    fn rescheduling_moves_later_and_looking_earlier_keeps_the_earlier() {
        let mut notices = Notices::default();
        notices.opt_in(1, None, 1_000);
        notices.reschedule(1, 5_000);
        assert_eq!(notices.next_look_ms(), Some(5_000));
        notices.look_no_later_than(1, 7_000);
        assert_eq!(notices.next_look_ms(), Some(5_000));
        notices.look_no_later_than(1, 2_000);
        assert_eq!(notices.next_look_ms(), Some(2_000));
        notices.reschedule(2, 1);
        assert_eq!(notices.len(), 1);
    }

    #[test]
    fn forgetting_leaves_nothing_behind() {
        let mut notices = Notices::default();
        for client_id in 0..1_000 {
            notices.opt_in(client_id, None, client_id);
        }
        for client_id in 0..1_000 {
            assert!(notices.forget(client_id).is_some());
        }
        assert!(notices.forget(5).is_none());
        assert_eq!(notices.len(), 0);
        assert_eq!(notices.next_look_ms(), None);
        assert!(notices.heap_bytes() < 2_048, "{}", notices.heap_bytes());
    }

    #[test]
    fn take_due_is_bounded_and_in_order() {
        let mut notices = Notices::default();
        for client_id in 0..100 {
            notices.opt_in(client_id, None, 1_000 - client_id);
        }
        let first = notices.take_due(2_000, 3);
        assert_eq!(first, vec![99, 98, 97]);
        assert_eq!(notices.take_due(2_000, 1_000).len(), 97);
    }
}
