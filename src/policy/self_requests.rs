//! Clients' own requests (`MAXAGE.SELF <ms>`): the max age each asked for and a queue of
//! their deadlines, apart from the operator's, so that however many clients ask, and whenever,
//! their requests are served after the operator's retirements, never ahead of them. One entry
//! per client that asked, replaced in place however often it asks.

use std::collections::HashMap;

use crate::policy::registry::TrackedClient;
use crate::policy::schedule::{ClientTable, DeadlineQueue, shrink_if_sparse};

#[derive(Debug, Default)]
pub struct SelfRequests {
    /// client id -> the max age it asked for (only clients that asked).
    max_age_ms: HashMap<u64, u64>,
    /// When each such client reaches that age.
    pub queue: DeadlineQueue,
}

impl SelfRequests {
    pub fn max_age_ms(&self, client_id: u64) -> Option<u64> {
        self.max_age_ms.get(&client_id).copied()
    }

    /// The deadline the client asked for (no jitter: it asked for an age).
    pub fn deadline(&self, client: &TrackedClient) -> Option<u64> {
        self.max_age_ms(client.client_id)
            .map(|ms| client.connected_at_ms.saturating_add(ms))
    }

    /// Records a request in place of any earlier one (0 withdraws) and queues its deadline.
    /// Returns the new deadline, if any.
    pub fn request(&mut self, client: &TrackedClient, max_age_ms: u64) -> Option<u64> {
        self.queue.remove(client.client_id);
        if max_age_ms == 0 {
            self.max_age_ms.remove(&client.client_id);
            return None;
        }
        self.max_age_ms.insert(client.client_id, max_age_ms);
        let deadline = self.deadline(client)?;
        self.queue.push(deadline, client.client_id);
        Some(deadline)
    }

    /// Forgets a client that left.
    pub fn forget(&mut self, client_id: u64) {
        self.queue.remove(client_id);
        self.max_age_ms.remove(&client_id);
        self.queue.shrink_if_sparse();
        shrink_if_sparse(&mut self.max_age_ms);
    }

    pub fn heap_bytes(&self) -> usize {
        self.queue.heap_bytes() + self.max_age_ms.heap_bytes()
    }
}
