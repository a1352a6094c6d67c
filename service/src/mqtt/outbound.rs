//! [`Outbound`]: what an application holds to reach one live connection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{CloseReason, Closed, QoS, topic};

/// A PUBLISH queued for the client.
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Resolved when the client's PUBACK arrives (QoS 1); dropped if the connection ends first.
    pub acked: Option<oneshot::Sender<()>>,
}

/// State of one connection shared between its task and the application's [`Outbound`] handles.
pub(crate) struct Shared {
    pub id: u64,
    commands: mpsc::Sender<Box<Message>>,
    subscriptions: Mutex<BTreeMap<String, QoS>>,
    closed: AtomicBool,
    close_request: Mutex<Option<CloseReason>>,
    close_notify: Notify,
    /// Set once the connection has fully ended (after `Session::closed`); waiters wake on
    /// `finished_notify`. (A `watch` channel did the same for 300 bytes more per connection.)
    finished: AtomicBool,
    finished_notify: Notify,
    /// Held while a session write is in flight, so that a takeover reads what was written.
    pub persist: Arc<tokio::sync::Mutex<()>>,
    /// The connection of the same session key this one took over, until it has finished.
    displaced: Mutex<Option<Arc<Shared>>>,
    runtime: tokio::runtime::Handle,
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    /// A new connection with a process-wide unique id, and the receiving end of its queue.
    /// Must be called on the runtime the connection runs on.
    pub fn new(queue: usize) -> (Arc<Shared>, mpsc::Receiver<Box<Message>>) {
        let (commands, receiver) = mpsc::channel(queue.max(1));
        let shared = Shared {
            id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            commands,
            subscriptions: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            close_request: Mutex::new(None),
            close_notify: Notify::new(),
            finished: AtomicBool::new(false),
            finished_notify: Notify::new(),
            persist: Arc::new(tokio::sync::Mutex::new(())),
            displaced: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
        };
        (Arc::new(shared), receiver)
    }

    /// Asks the connection task to close with `reason` (the first request wins).
    pub fn request_close(&self, reason: CloseReason) {
        lock(&self.close_request).get_or_insert(reason);
        self.close_notify.notify_one();
    }

    /// Resolves with the reason once a close has been requested.
    pub async fn close_requested(&self) -> CloseReason {
        loop {
            if let Some(reason) = lock(&self.close_request).clone() {
                return reason;
            }
            self.close_notify.notified().await;
        }
    }

    /// Marks the connection closed: from now on sends fail.
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Records the connection this one took over: this one is not finished before it is.
    pub fn displaced(&self, previous: Arc<Shared>) {
        *lock(&self.displaced) = Some(previous);
    }

    /// Waits (at most `limit`) until the connection this one took over, if any, has finished.
    /// A takeover that is itself taken over while it waits thereby passes the wait on: the
    /// newest connection never starts while an older one may still write the session.
    pub async fn displaced_finished(&self, limit: std::time::Duration) {
        // Cloned, not taken: if this wait is cancelled (this connection is taken over in
        // turn), its clean-up waits again.
        let previous = lock(&self.displaced).clone();
        let Some(previous) = previous else {
            return;
        };
        if tokio::time::timeout(limit, previous.finished())
            .await
            .is_err()
        {
            tracing::warn!(
                previous_connection_id = previous.id,
                "the connection taken over did not close in time"
            );
        }
        lock(&self.displaced).take();
    }

    pub fn mark_finished(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.finished_notify.notify_waiters();
    }

    /// Resolves once the connection has fully ended.
    pub async fn finished(&self) {
        loop {
            // Registered before the flag is read, so a `mark_finished` in between still wakes.
            let notified = self.finished_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.finished.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    pub fn subscriptions(&self) -> MutexGuard<'_, BTreeMap<String, QoS>> {
        lock(&self.subscriptions)
    }

    fn check(&self, topic: &str) -> Result<(), Closed> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Closed);
        }
        if !topic::valid_topic(topic) || !super::codec::encodable_topic(topic) {
            // An application bug, not the client's: the message cannot go on the wire.
            tracing::error!(
                connection_id = self.id,
                topic,
                "refusing to send a PUBLISH with an invalid topic name"
            );
            return Err(Closed);
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep going.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A handle to one live connection, given to the [`Application`](super::Application) in
/// `connect`. Cheap to clone; every method is safe to call after the connection has ended.
#[derive(Clone)]
pub struct Outbound {
    pub(crate) shared: Arc<Shared>,
}

impl Outbound {
    /// Unique per connection within the process (a counter, never reused).
    pub fn connection_id(&self) -> u64 {
        self.shared.id
    }

    /// Queues a PUBLISH to the client, waiting while the connection's queue is full.
    ///
    /// QoS 1 resolves `Ok` once the client's PUBACK arrives, `Err(Closed)` if the connection ends
    /// first. QoS 0 resolves once queued. The topic must be a valid topic name (no wildcards);
    /// an invalid one is logged as an application bug and gives `Err(Closed)`.
    pub async fn publish(&self, topic: String, payload: Bytes, qos: QoS) -> Result<(), Closed> {
        self.shared.check(&topic)?;
        let (acked, ack) = match qos {
            QoS::AtLeastOnce => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            QoS::AtMostOnce => (None, None),
        };
        let message = Box::new(Message {
            topic,
            payload,
            qos,
            acked,
        });
        self.shared
            .commands
            .send(message)
            .await
            .map_err(|_| Closed)?;
        match ack {
            Some(ack) => ack.await.map_err(|_| Closed),
            None => Ok(()),
        }
    }

    /// Queues a PUBLISH without waiting (QoS 1 is still acknowledged on the wire; nobody is told
    /// when). `Err(Closed)` if the connection has already closed. When the queue is full the
    /// message waits in a task of its own, so messages sent that way may overtake each other.
    pub fn send(&self, topic: String, payload: Bytes, qos: QoS) -> Result<(), Closed> {
        self.shared.check(&topic)?;
        let message = Box::new(Message {
            topic,
            payload,
            qos,
            acked: None,
        });
        match self.shared.commands.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Closed),
            Err(mpsc::error::TrySendError::Full(message)) => {
                let commands = self.shared.commands.clone();
                self.shared.runtime.spawn(async move {
                    let _ = commands.send(message).await;
                });
                Ok(())
            }
        }
    }

    /// Whether any current subscription of this connection matches `topic` (MQTT wildcard
    /// rules; `#` and `+` at the start of a filter do not match `$…` topics).
    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.shared
            .subscriptions()
            .keys()
            .any(|filter| topic::matches(filter, topic))
    }

    /// Closes the connection from the server side; `Session::closed` gets
    /// [`CloseReason::ClosedByApplication`]. Returns at once; does nothing if already closed.
    pub fn close(&self) {
        self.shared.request_close(CloseReason::ClosedByApplication);
    }

    /// Whether the connection has ended (or is ending): sends fail from then on.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("connection_id", &self.shared.id)
            .field("closed", &self.is_closed())
            .finish()
    }
}
