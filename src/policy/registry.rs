//! The registry of connect times: which clients the module knows about and when each connected.
//!
//! The server hands out client ids in increasing order and fires the connected event in that
//! order, so the registry is a vector sorted by id: a connect is an append, a lookup is a binary
//! search, and a disconnect marks its slot dead (keeping the id, so the order and the binary
//! search stay intact); dead slots are swept out once they outnumber a quarter of the slots. Each slot is 16 bytes, so a tracked client costs 16-40 bytes here
//! depending on where the vector stands in its growth cycle.

/// Bit 0 of the packed time marks a connect time estimated from `CLIENT LIST age=`.
const APPROXIMATE_BIT: u64 = 1;
/// Bit 1 marks a slot whose client has gone.
const DEAD_BIT: u64 = 2;
const FLAG_BITS: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    client_id: u64,
    /// `connected_at_ms << 2 | dead | approximate`.
    packed_connected_at: u64,
}

/// What the registry knows about one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedClient {
    pub client_id: u64,
    /// Monotonic milliseconds (`ffi::monotonic_ms`), not wall-clock time.
    pub connected_at_ms: u64,
    /// True when the connect time was seeded from `CLIENT LIST age=` (whole seconds).
    pub approximate: bool,
}

impl TrackedClient {
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.connected_at_ms)
    }
}

impl Slot {
    fn tracked(&self) -> TrackedClient {
        TrackedClient {
            client_id: self.client_id,
            connected_at_ms: self.packed_connected_at >> FLAG_BITS,
            approximate: self.packed_connected_at & APPROXIMATE_BIT != 0,
        }
    }

    fn is_dead(&self) -> bool {
        self.packed_connected_at & DEAD_BIT != 0
    }
}

#[derive(Default, Debug)]
pub struct Registry {
    slots: Vec<Slot>,
    dead_slots: usize,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a client; a second insert of the same id replaces its connect time.
    pub fn insert(&mut self, client_id: u64, connected_at_ms: u64, approximate: bool) {
        let slot = Slot {
            client_id,
            packed_connected_at: (connected_at_ms << FLAG_BITS) | u64::from(approximate),
        };
        // The common case: ids arrive in increasing order.
        if self
            .slots
            .last()
            .is_none_or(|last| last.client_id < client_id)
        {
            self.slots.push(slot);
            return;
        }
        match self.slots.binary_search_by_key(&client_id, |s| s.client_id) {
            Ok(index) => {
                if self.slots[index].is_dead() {
                    self.dead_slots -= 1;
                }
                self.slots[index] = slot;
            }
            Err(index) => self.slots.insert(index, slot),
        }
    }

    /// Forgets a client. Returns whether it was tracked.
    pub fn remove(&mut self, client_id: u64) -> bool {
        let Ok(index) = self.position(client_id) else {
            return false;
        };
        if index + 1 == self.slots.len() {
            self.slots.pop();
            while self.slots.last().is_some_and(Slot::is_dead) {
                self.slots.pop();
                self.dead_slots -= 1;
            }
            self.shrink_if_sparse();
        } else {
            self.slots[index].packed_connected_at |= DEAD_BIT;
            self.dead_slots += 1;
            if self.dead_slots * 4 > self.slots.len() {
                self.sweep();
            }
        }
        true
    }

    pub fn get(&self, client_id: u64) -> Option<TrackedClient> {
        self.position(client_id)
            .ok()
            .map(|index| self.slots[index].tracked())
    }

    pub fn contains(&self, client_id: u64) -> bool {
        self.position(client_id).is_ok()
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.dead_slots
    }

    /// Tracked clients in id order, which is connect order for clients seen connecting.
    pub fn iter(&self) -> impl Iterator<Item = TrackedClient> + '_ {
        self.slots
            .iter()
            .filter(|s| !s.is_dead())
            .map(Slot::tracked)
    }

    /// The client that connected first: ids follow connect order, and seeded clients' connect
    /// times (from `age=`) follow it too, so it is the first live slot.
    pub fn oldest(&self) -> Option<TrackedClient> {
        self.slots.iter().find(|s| !s.is_dead()).map(Slot::tracked)
    }

    /// Heap bytes held by the registry, for INFO's per-client accounting.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }

    fn position(&self, client_id: u64) -> Result<usize, usize> {
        match self.slots.binary_search_by_key(&client_id, |s| s.client_id) {
            Ok(index) if self.slots[index].is_dead() => Err(index),
            found => found,
        }
    }

    fn sweep(&mut self) {
        self.slots.retain(|s| !s.is_dead());
        self.dead_slots = 0;
        self.shrink_if_sparse();
    }

    /// Gives memory back after a wave of disconnects, keeping headroom for the next wave.
    fn shrink_if_sparse(&mut self) {
        if self.slots.capacity() > 64 && self.slots.capacity() > self.slots.len() * 4 {
            self.slots.shrink_to((self.slots.len() * 2).max(64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_in_connect_order() {
        let mut registry = Registry::new();
        for id in 1..=100 {
            registry.insert(id, id * 10, false);
        }
        assert_eq!(registry.len(), 100);
        assert_eq!(
            registry.get(42),
            Some(TrackedClient {
                client_id: 42,
                connected_at_ms: 420,
                approximate: false
            })
        );
        for id in (1..=100).step_by(2) {
            assert!(registry.remove(id));
        }
        assert!(!registry.remove(1));
        assert_eq!(registry.len(), 50);
        for id in 1..=100 {
            assert_eq!(registry.contains(id), id % 2 == 0, "id {id}");
        }
        let ids: Vec<u64> = registry.iter().map(|c| c.client_id).collect();
        assert_eq!(ids, (2..=100).step_by(2).collect::<Vec<_>>());
    }

    #[test]
    fn out_of_order_insert_and_tombstone_reuse() {
        let mut registry = Registry::new();
        registry.insert(10, 1, false);
        registry.insert(30, 3, true);
        registry.insert(20, 2, false);
        registry.insert(40, 4, false);
        registry.remove(20);
        registry.insert(25, 5, false);
        registry.insert(20, 6, false);
        let seen: Vec<(u64, u64, bool)> = registry
            .iter()
            .map(|c| (c.client_id, c.connected_at_ms, c.approximate))
            .collect();
        assert_eq!(
            seen,
            vec![
                (10, 1, false),
                (20, 6, false),
                (25, 5, false),
                (30, 3, true),
                (40, 4, false)
            ]
        );
    }

    #[test]
    fn removing_the_tail_trims_dead_slots() {
        let mut registry = Registry::new();
        for id in 1..=8 {
            registry.insert(id, 0, false);
        }
        registry.remove(7);
        registry.remove(8);
        assert_eq!(registry.len(), 6);
        assert_eq!(registry.slots.len(), 6);
        registry.insert(9, 0, false);
        assert!(registry.contains(9));
    }

    #[test]
    fn lookups_stay_correct_under_churn() {
        // A tiny deterministic generator keeps the test free of extra crates.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut registry = Registry::new();
        let mut reference = std::collections::BTreeMap::new();
        let mut next_id = 1u64;
        for _ in 0..20_000 {
            if next() % 3 != 0 || reference.is_empty() {
                registry.insert(next_id, next_id, false);
                reference.insert(next_id, next_id);
                next_id += 1;
            } else {
                let victim = 1 + next() % next_id;
                assert_eq!(registry.remove(victim), reference.remove(&victim).is_some());
            }
            if next() % 997 == 0 {
                let probe = 1 + next() % next_id;
                assert_eq!(registry.contains(probe), reference.contains_key(&probe));
            }
        }
        assert_eq!(registry.len(), reference.len());
        let ids: Vec<u64> = registry.iter().map(|c| c.client_id).collect();
        assert_eq!(ids, reference.keys().copied().collect::<Vec<_>>());
        assert!(registry.heap_bytes() <= 64 * registry.len().max(64));
    }

    #[test]
    fn age_never_underflows() {
        let tracked = TrackedClient {
            client_id: 1,
            connected_at_ms: 100,
            approximate: false,
        };
        assert_eq!(tracked.age_ms(50), 0);
        assert_eq!(tracked.age_ms(150), 50);
    }
}
