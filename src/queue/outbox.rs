//! A target's outbox: the hand-off from the store to the target's dispatcher. The store writes
//! into it (`OutboxInput`); the dispatcher reads from it (`Outbox`). With SQLite, what does not
//! fit stays on disk and the outbox notes the first id left there, for the dispatcher to load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::mpsc;

use crate::queue::Pending;

/// Appended deliveries on their way from the streams to a target's dispatcher.
const CAPACITY: usize = 1024;

/// Each target's outbox input, by target name.
pub type Outboxes = HashMap<Arc<str>, OutboxInput>;

/// How the store hands a target's dispatcher its deliveries.
#[derive(Clone)]
pub struct OutboxInput {
    sender: mpsc::Sender<Pending>,
    /// The smallest id offered but not taken (`i64::MAX` when none): it is on disk, and the
    /// dispatcher loads it from there.
    overflow: Arc<AtomicI64>,
    /// Counts every stored delivery of the target; the dispatcher counts them out.
    queue_depth: prometheus::IntGauge,
}

/// The dispatcher's end of its input.
pub struct Outbox {
    pub receiver: mpsc::Receiver<Pending>,
    overflow: Arc<AtomicI64>,
}

pub fn channel(queue_depth: prometheus::IntGauge) -> (OutboxInput, Outbox) {
    let (sender, receiver) = mpsc::channel(CAPACITY);
    let overflow = Arc::new(AtomicI64::new(i64::MAX));
    (
        OutboxInput {
            sender,
            overflow: Arc::clone(&overflow),
            queue_depth,
        },
        Outbox { receiver, overflow },
    )
}

impl OutboxInput {
    /// For the SQLite writer, which must never wait on a dispatcher (the dispatcher may be
    /// waiting on it): a stored delivery that does not fit is left on disk and noted.
    pub fn offer(&self, pending: Pending) {
        self.queue_depth.inc();
        if let Err(mpsc::error::TrySendError::Full(pending)) = self.sender.try_send(pending) {
            // Ordered after the sends before it: a dispatcher that sees the overflow also sees
            // every delivery offered before it in the channel.
            self.overflow.fetch_min(pending.id, Ordering::SeqCst);
        }
    }

    /// For the memory store: waits for room, which pauses the stream. Returns whether it
    /// waited, or the delivery back once the dispatcher has stopped.
    pub async fn send(&self, pending: Pending) -> Result<bool, Pending> {
        let sent = match self.sender.try_send(pending) {
            Ok(()) => Ok(false),
            Err(mpsc::error::TrySendError::Full(pending)) => self
                .sender
                .send(pending)
                .await
                .map(|()| true)
                .map_err(|mpsc::error::SendError(pending)| pending),
            Err(mpsc::error::TrySendError::Closed(pending)) => Err(pending),
        };
        if sent.is_ok() {
            self.queue_depth.inc();
        }
        sent
    }
}

impl Outbox {
    /// The smallest id left on disk since the last call, if any.
    pub fn take_overflow(&self) -> Option<i64> {
        match self.overflow.swap(i64::MAX, Ordering::SeqCst) {
            i64::MAX => None,
            id => Some(id),
        }
    }
}
