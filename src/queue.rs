//! The delivery queue between routing and delivery: one bounded queue per target.
//!
//! A stream that finds a target's queue full waits for room (backpressure) rather than dropping
//! the event; the target's workers take deliveries out. This is the in-memory store: what it
//! holds is lost if the process dies.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{Mutex, mpsc};

use crate::event::{Event, TargetId};

/// One (event, target) pair to deliver.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Arc<Event>,
    pub target: TargetId,
}

/// Why a delivery could not be queued right away.
#[derive(Debug)]
pub enum EnqueueError {
    /// The queue is full: wait with `enqueue` (and count the pause).
    Full(Delivery),
    /// The relay is shutting down.
    Closed(Delivery),
}

#[derive(Clone)]
pub struct QueueSender {
    sender: mpsc::Sender<Delivery>,
    depth: IntGauge,
}

/// The receiving end, shared by a target's workers.
#[derive(Clone)]
pub struct QueueReceiver {
    receiver: Arc<Mutex<mpsc::Receiver<Delivery>>>,
    depth: IntGauge,
}

pub fn bounded(capacity: usize, depth: IntGauge) -> (QueueSender, QueueReceiver) {
    let (sender, receiver) = mpsc::channel(capacity);
    (
        QueueSender {
            sender,
            depth: depth.clone(),
        },
        QueueReceiver {
            receiver: Arc::new(Mutex::new(receiver)),
            depth,
        },
    )
}

impl QueueSender {
    pub fn try_enqueue(&self, delivery: Delivery) -> Result<(), EnqueueError> {
        match self.sender.try_send(delivery) {
            Ok(()) => {
                self.depth.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(delivery)) => Err(EnqueueError::Full(delivery)),
            Err(mpsc::error::TrySendError::Closed(delivery)) => Err(EnqueueError::Closed(delivery)),
        }
    }

    /// Waits for room in the queue.
    pub async fn enqueue(&self, delivery: Delivery) -> Result<(), EnqueueError> {
        match self.sender.send(delivery).await {
            Ok(()) => {
                self.depth.inc();
                Ok(())
            }
            Err(mpsc::error::SendError(delivery)) => Err(EnqueueError::Closed(delivery)),
        }
    }
}

impl QueueReceiver {
    /// The next delivery; `None` once every sender is gone and the queue is empty.
    pub async fn next(&self) -> Option<Delivery> {
        let delivery = self.receiver.lock().await.recv().await;
        if delivery.is_some() {
            self.depth.dec();
        }
        delivery
    }

    /// How many deliveries are waiting.
    pub fn len(&self) -> usize {
        usize::try_from(self.depth.get()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
