//! The in-memory store: deliveries live only in the dispatchers' memory, so this store just
//! hands out ids and counts them against `max_pending`. What it holds is lost if the process
//! dies, and dead letters are logged and counted but not kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::queue::{DeliveryId, PendingLimit};

#[derive(Clone)]
pub struct MemoryStore {
    next_id: Arc<AtomicI64>,
    pub(super) limit: Arc<PendingLimit>,
}

impl MemoryStore {
    pub fn new(max_pending: u64) -> MemoryStore {
        MemoryStore {
            next_id: Arc::new(AtomicI64::new(1)),
            limit: Arc::new(PendingLimit::new(max_pending, 0)),
        }
    }

    pub fn append(&self, n: usize) -> Vec<DeliveryId> {
        let first = self.next_id.fetch_add(n as i64, Ordering::Relaxed);
        (first..first + n as i64).collect()
    }
}
