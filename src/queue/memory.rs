//! The in-memory store: deliveries live only in the outboxes, so this store hands out ids,
//! counts them against `max_pending`, and passes deliveries straight on. What it holds is lost
//! if the process dies, and dead letters are logged and counted but not kept.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::event::Event;
use crate::queue::outbox::{OutboxInput, Outboxes};
use crate::queue::{Delivery, PendingLimit, StoreError, StreamPositions};
use crate::telemetry::StorageTelemetry;

#[derive(Clone)]
pub struct MemoryStore {
    next_id: Arc<AtomicI64>,
    pub(super) limit: Arc<PendingLimit>,
    pub(super) positions: Arc<StreamPositions>,
    /// By target name; emptied at shutdown so the outboxes' inputs close.
    outboxes: Arc<Mutex<Outboxes>>,
    storage: Arc<StorageTelemetry>,
}

impl MemoryStore {
    pub fn new(max_pending: u64, storage: Arc<StorageTelemetry>) -> MemoryStore {
        MemoryStore {
            next_id: Arc::new(AtomicI64::new(1)),
            limit: Arc::new(PendingLimit::new(max_pending, 0)),
            positions: Arc::default(),
            outboxes: Arc::default(),
            storage,
        }
    }

    /// Hands one delivery per target to its outbox, waiting while one is full (which pauses
    /// the stream); returns whether it waited.
    pub async fn submit(&self, event: &Arc<Event>, targets: &[Arc<str>]) -> Result<bool, StoreError> {
        let mut waited = false;
        for target in targets {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut delivery = Delivery::new(id, Arc::clone(event));
            // A reload may replace the outbox while this waits for room: then the delivery
            // goes to its successor.
            let mut refused_by: Option<OutboxInput> = None;
            loop {
                let Some(outbox) = self
                    .outbox(target)
                    .filter(|outbox| refused_by.as_ref().is_none_or(|refused| !refused.same_outbox(outbox)))
                else {
                    // The target was removed by a reload, or the relay is stopping.
                    self.limit.release(1);
                    self.storage.not_delivered(
                        target,
                        1,
                        &"the target was removed or the relay stopped before the delivery reached it",
                    );
                    break;
                };
                match outbox.send(delivery).await {
                    Ok(waited_here) => {
                        waited |= waited_here;
                        break;
                    }
                    Err(returned) => {
                        delivery = returned;
                        refused_by = Some(outbox);
                    }
                }
            }
        }
        Ok(waited)
    }

    fn outbox(&self, target: &str) -> Option<OutboxInput> {
        self.outboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
            .cloned()
    }

    pub fn set_outboxes(&self, outboxes: Outboxes) {
        *self.outboxes.lock().unwrap_or_else(PoisonError::into_inner) = outboxes;
    }

    pub fn finish_submissions(&self) {
        self.outboxes.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}
