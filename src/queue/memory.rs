//! The in-memory store: deliveries live only in the dispatchers' memory, so this store hands
//! out ids, counts them against `max_pending`, and passes deliveries straight on. What it holds
//! is lost if the process dies, and dead letters are logged and counted but not kept.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::event::Event;
use crate::queue::outbox::{OutboxInput, Outboxes};
use crate::queue::{Pending, PendingLimit, StoreError, StreamPositions};

#[derive(Clone)]
pub struct MemoryStore {
    next_id: Arc<AtomicI64>,
    pub(super) limit: Arc<PendingLimit>,
    pub(super) positions: Arc<StreamPositions>,
    /// By target name; emptied at shutdown so the dispatchers' inputs close.
    dispatchers: Arc<Mutex<Outboxes>>,
}

impl MemoryStore {
    pub fn new(max_pending: u64, dispatchers: Outboxes) -> MemoryStore {
        MemoryStore {
            next_id: Arc::new(AtomicI64::new(1)),
            limit: Arc::new(PendingLimit::new(max_pending, 0)),
            positions: Arc::default(),
            dispatchers: Arc::new(Mutex::new(dispatchers)),
        }
    }

    /// Hands one delivery per target to its dispatcher, waiting while one is full (which
    /// pauses the stream); returns whether it waited.
    pub async fn submit(&self, event: &Arc<Event>, targets: &[Arc<str>]) -> Result<bool, StoreError> {
        let mut waited = false;
        for target in targets {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            // A reload may replace the dispatcher while this waits for room: then the delivery
            // goes to its successor.
            let mut pending = Pending::new(id, Arc::clone(event));
            for _ in 0..2 {
                let Some(dispatcher) = self.dispatcher(target) else {
                    // The target was removed by a reload, or the relay is stopping.
                    self.limit.release(1);
                    break;
                };
                match dispatcher.send(pending).await {
                    Ok(waited_here) => {
                        waited |= waited_here;
                        break;
                    }
                    Err(returned) => pending = returned,
                }
            }
        }
        Ok(waited)
    }

    fn dispatcher(&self, target: &str) -> Option<OutboxInput> {
        self.dispatchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
            .cloned()
    }

    pub fn set_dispatchers(&self, dispatchers: Outboxes) {
        *self.dispatchers.lock().unwrap_or_else(PoisonError::into_inner) = dispatchers;
    }

    pub fn finish_submissions(&self) {
        self.dispatchers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}
