//! The durable telemetry store: device-to-cloud messages are acknowledged (MQTT PUBACK, HTTP
//! 204) only once they are committed to the database.
//!
//! [`Telemetry::append`] queues a message on a bounded queue and waits. One writer thread,
//! with a connection of its own, takes the first queued message, drains whatever else is
//! already queued (at most [`MAX_BATCH_MESSAGES`] messages / [`MAX_BATCH_BYTES`] bytes), inserts
//! the lot in one transaction and commits: one fsync for the whole batch (group commit). Only
//! then does each caller learn its offset. When a batch fails, every caller in it gets the
//! error; nothing is acknowledged that is not stored.
//!
//! Durability: on SQLite the writer's connection uses WAL with `synchronous = FULL`, so a
//! commit is fsynced before it returns and an acknowledged message survives a crash or a power
//! loss. On PostgreSQL commits wait for the WAL flush (`synchronous_commit` is forced back on
//! if the server turned it off).
//!
//! Offsets are assigned by the database, increase, and are never reused. Because one writer
//! commits one batch at a time, a reader never sees an offset appear below one it has already
//! seen, which is what lets consumers resume from "last offset + 1" and long-poll with
//! [`Telemetry::wait_for`]. **Invariant:** one [`Telemetry`] appends to a database table.
//! Replicas (which share a database) therefore do not use the table: in replica mode the log is
//! a JetStream stream ([`stream`], [`Telemetry::start_stream`]), whose sequence is the offset.
//!
//! Retention: messages older than [`Retention::max_age`] are deleted, then the oldest until the
//! stored bytes fit in [`Retention::max_bytes`]; the writer does this every
//! [`Retention::check_every`], and [`Telemetry::enforce_retention`] does it on demand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::db::StoreError;
use crate::db::telemetry::{NewRow, Reader, Row, Writer};

pub mod stream;

/// Messages waiting for the writer; [`Telemetry::append`] waits when the queue is full.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Bytes (see [`NewMessage::size`]) of queued and in-flight messages; [`Telemetry::append`]
/// also waits while they exceed this, so that 10,000 queued 256 KB messages cannot take
/// 2.5 GB. A larger message waits until it is alone.
pub const QUEUE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// At most this many messages per transaction.
pub const MAX_BATCH_MESSAGES: usize = 1000;
/// A batch stops growing once its messages add up to this many bytes (a single message is
/// always taken, whatever its size).
pub const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// [`Telemetry::read`] returns at most this many messages.
pub const MAX_READ: usize = 1000;

/// The wait for a queued message's commit: its offset ([`Telemetry::enqueue`]).
pub type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, StoreError>> + Send>>;

/// A device-to-cloud message as received.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewMessage {
    pub device_id: String,
    pub module_id: Option<String>,
    pub body: Vec<u8>,
    /// System properties: message-id, correlation-id, user-id, content-type, content-encoding,
    /// absolute-expiry-time, creation-time, iothub-connection-device-id,
    /// iothub-connection-auth-method, … (names chosen by the caller).
    pub system: BTreeMap<String, String>,
    /// Application properties in arrival order; `None` = property sent without a value.
    pub properties: Vec<(String, Option<String>)>,
}

impl NewMessage {
    /// Body plus the names and values of all properties, in bytes: what retention counts.
    pub fn size(&self) -> u64 {
        let system = self.system.iter().map(|(k, v)| k.len() + v.len());
        let properties = self
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len));
        let total = system
            .chain(properties)
            .fold(self.body.len(), usize::saturating_add);
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

/// A stored message, as consumers read it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessage {
    pub offset: i64,
    /// RFC 3339, UTC, seven fractional digits (microsecond precision).
    pub enqueued_time_utc: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub system_properties: BTreeMap<String, String>,
    /// Application properties; `null` for a property sent without a value. A JSON object
    /// cannot keep arrival order or repeated names: [`StoredMessage::properties_in_order`]
    /// does.
    pub properties: serde_json::Map<String, Value>,
    /// Base64 (standard alphabet, padded).
    pub body: String,
    /// Application properties exactly as received: arrival order, repeated names kept.
    #[serde(skip)]
    pub properties_in_order: Vec<(String, Option<String>)>,
    /// Bytes counted by retention (see [`NewMessage::size`]).
    #[serde(skip)]
    pub size: u64,
}

/// How long and how much telemetry is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Messages older than this are deleted.
    pub max_age: Duration,
    /// Then the oldest messages are deleted until the stored bytes (see [`NewMessage::size`])
    /// add up to at most this.
    pub max_bytes: u64,
    /// How often the writer enforces retention by itself.
    pub check_every: Duration,
}

impl Default for Retention {
    /// 7 days, 1 GiB, checked every minute.
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1024 * 1024 * 1024,
            check_every: Duration::from_secs(60),
        }
    }
}

/// Counters since [`Telemetry::start`], for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TelemetryStats {
    /// Messages committed.
    pub messages: u64,
    /// Their bytes (see [`NewMessage::size`]).
    pub bytes: u64,
    /// Transactions that committed messages.
    pub batches: u64,
    /// Transactions that failed (each of their callers got the error).
    pub failed_batches: u64,
    /// Messages deleted by retention.
    pub deleted: u64,
    /// Messages waiting in the queue right now.
    pub queued: u64,
}

#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    deleted: AtomicU64,
}

/// One queued message and the caller waiting for it.
struct Request {
    row: NewRow,
    bytes: u64,
    reply: oneshot::Sender<Result<i64, StoreError>>,
    /// Where the caller waits, if on a Tokio runtime (see [`answer_all`]).
    waiter: Option<Waiter>,
    /// Its share of [`QUEUE_MAX_BYTES`], given back when the request is answered (dropped).
    _room: Option<OwnedSemaphorePermit>,
}

/// The thread and runtime a caller of [`Telemetry::append`] waits on.
#[derive(Clone)]
struct Waiter {
    thread: std::thread::ThreadId,
    runtime: tokio::runtime::Handle,
}

impl Waiter {
    fn current() -> Option<Waiter> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(Waiter {
            thread: std::thread::current().id(),
            runtime,
        })
    }
}

/// A request and its outcome.
type Answer = (Request, Result<i64, StoreError>);

/// Answers a batch. Waking a task from the writer thread costs its runtime a wake-up
/// (an `eventfd` write for each task woken, on Tokio's event loops), so answers to two or
/// more callers on one thread go out from one task spawned on their runtime: one wake-up per
/// thread and batch instead of one per message. A lone answer is sent directly.
fn answer_all(answers: impl Iterator<Item = Answer>) {
    let mut groups: Vec<(Waiter, Vec<Answer>)> = Vec::new();
    for (request, outcome) in answers {
        let Some(waiter) = &request.waiter else {
            request.answer(outcome);
            continue;
        };
        match groups.iter_mut().find(|(w, _)| w.thread == waiter.thread) {
            Some((_, group)) => group.push((request, outcome)),
            None => groups.push((waiter.clone(), vec![(request, outcome)])),
        }
    }
    for (waiter, mut group) in groups {
        if group.len() == 1 {
            if let Some((request, outcome)) = group.pop() {
                request.answer(outcome);
            }
            continue;
        }
        // Should the runtime be shutting down, the task is dropped with the answers: its
        // callers see the store as stopped (the messages are stored all the same).
        drop(waiter.runtime.spawn(async move {
            for (request, outcome) in group {
                request.answer(outcome);
            }
        }));
    }
}

impl Request {
    /// Gives back the request's room in the queue, then wakes its caller (in this order, so
    /// that the room is free by the time the caller runs).
    fn answer(self, outcome: Result<i64, StoreError>) {
        let Request { reply, _room, .. } = self;
        drop(_room);
        // The caller may have gone away; nothing to do then.
        let _ = reply.send(outcome);
    }
}

/// The durable telemetry store. Cheap to clone; all clones share one log: the database table
/// with its writer thread (which stops after [`Telemetry::shutdown`], or once the last clone is
/// dropped, after flushing the queue), or in replica mode a JetStream stream.
#[derive(Clone)]
pub struct Telemetry {
    log: Log,
}

#[derive(Clone)]
enum Log {
    Table(Arc<Inner>),
    Stream(Arc<stream::StreamLog>),
}

struct Inner {
    queue: mpsc::Sender<Request>,
    /// [`QUEUE_MAX_BYTES`] permits.
    room: Arc<Semaphore>,
    committed: watch::Receiver<i64>,
    reader: Reader,
    retention: Retention,
    counters: Arc<Counters>,
    stop: Arc<Notify>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.log {
            Log::Table(inner) => f
                .debug_struct("Telemetry")
                .field("last_offset", &self.last_offset())
                .field("retention", &inner.retention)
                .field("reader", &inner.reader)
                .finish_non_exhaustive(),
            Log::Stream(log) => f.debug_tuple("Telemetry").field(log).finish(),
        }
    }
}

impl Telemetry {
    /// Opens the database at `url` (the same URL as the document store) on a connection of its
    /// own, applies pending migrations (idempotent; harmless if [`crate::db::open`] already
    /// did), and starts the group-commit writer on a dedicated thread.
    pub fn start(url: &str, retention: Retention) -> Result<Telemetry, StoreError> {
        let mut writer = Writer::open(url)?;
        let backend = writer.backend();
        let tail = writer.tail()?;
        let reader = writer.reader();
        // The writer waits on the queue, the stop signal and the retention timer through a
        // small runtime of its own: it runs blocking diesel calls, so it must not borrow the
        // caller's runtime, and it must work when there is none.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot build the telemetry runtime: {e}")))?;
        let (queue, requests) = mpsc::channel(QUEUE_CAPACITY);
        let (committed_tx, committed) = watch::channel(tail.last_offset);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(Notify::new());
        let task = WriterTask {
            writer,
            requests,
            committed: committed_tx,
            counters: Arc::clone(&counters),
            stop: Arc::clone(&stop),
            retention: retention.clone(),
            last_enqueued_at: tail.last_enqueued_at,
        };
        let handle = std::thread::Builder::new()
            .name("telemetry-writer".to_owned())
            .spawn(move || task.run(&runtime))
            .map_err(|e| StoreError::Backend(format!("cannot start the telemetry writer: {e}")))?;
        tracing::info!(
            ?backend,
            last_offset = tail.last_offset,
            "telemetry store started"
        );
        Ok(Telemetry {
            log: Log::Table(Arc::new(Inner {
                queue,
                room: Arc::new(Semaphore::new(queue_max_bytes())),
                committed,
                reader,
                retention,
                counters,
                stop,
                writer: Mutex::new(Some(handle)),
            })),
        })
    }

    /// Replica mode: the log is the replicas' JetStream stream (see [`stream`]).
    pub async fn start_stream(
        cluster: &crate::cluster::Cluster,
        retention: Retention,
        replicas: usize,
    ) -> Result<Telemetry, StoreError> {
        let log = stream::StreamLog::open(cluster, &retention, replicas).await?;
        Ok(Telemetry {
            log: Log::Stream(Arc::new(log)),
        })
    }

    /// Queues `message` and waits until it is committed; returns its offset. Waits while the
    /// queue is full (backpressure). If the future is dropped after the message was queued, the
    /// message may still be stored.
    pub async fn append(&self, message: NewMessage) -> Result<i64, StoreError> {
        self.enqueue(message).await?.await
    }

    /// Queues `message`, waiting while the queue is full, and returns the wait for its commit
    /// (which resolves to its offset). Messages queued one after another by one caller are
    /// stored in that order. Once queued, the message is stored even if the wait is dropped.
    /// In replica mode the message is appended to the stream before this returns.
    pub async fn enqueue(&self, message: NewMessage) -> Result<Commit, StoreError> {
        let inner = match &self.log {
            Log::Table(inner) => inner,
            Log::Stream(log) => {
                let appended = log.append(message).await;
                return Ok(Box::pin(std::future::ready(appended)));
            }
        };
        let bytes = message.size();
        let row = encode(message)?;
        let share = u32::try_from(bytes.min(QUEUE_MAX_BYTES)).unwrap_or(u32::MAX);
        let room = Arc::clone(&inner.room)
            .acquire_many_owned(share)
            .await
            .map_err(|_| stopped())?;
        let (reply, answer) = oneshot::channel();
        inner
            .queue
            .send(Request {
                row,
                bytes,
                reply,
                waiter: Waiter::current(),
                _room: Some(room),
            })
            .await
            .map_err(|_| stopped())?;
        Ok(Box::pin(
            async move { answer.await.map_err(|_| stopped())? },
        ))
    }

    /// Messages with offset `>= from`, ascending, at most `limit` (clamped to
    /// `1..=`[`MAX_READ`]), optionally of one device.
    pub async fn read(
        &self,
        from: i64,
        limit: usize,
        device_id: Option<&str>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = limit.clamp(1, MAX_READ);
        match &self.log {
            Log::Table(inner) => {
                let (inner, device) = (inner.clone(), device_id.map(String::from));
                tokio::task::spawn_blocking(move || {
                    let limit = i64::try_from(limit).unwrap_or(1);
                    inner
                        .reader
                        .read(from, limit, device.as_deref())?
                        .into_iter()
                        .map(decode)
                        .collect()
                })
                .await
                .map_err(|e| StoreError::Backend(format!("telemetry read: {e}")))?
            }
            Log::Stream(log) => log.read(from, limit, device_id).await,
        }
    }

    /// Resolves `true` as soon as a message with offset `>= offset` is committed (at once if one
    /// already is), `false` after `timeout`. For long polls. Needs a Tokio runtime with time.
    pub async fn wait_for(&self, offset: i64, timeout: Duration) -> bool {
        let inner = match &self.log {
            Log::Table(inner) => inner,
            Log::Stream(log) => return log.wait_for(offset, timeout).await,
        };
        let mut committed = inner.committed.clone();
        let waited = tokio::time::timeout(timeout, async {
            committed.wait_for(|last| *last >= offset).await.is_ok()
        })
        .await;
        match waited {
            Ok(true) => true,
            // The writer has stopped: nothing more will be committed.
            Ok(false) => *committed.borrow() >= offset,
            Err(_elapsed) => false,
        }
    }

    /// The newest committed offset: at start-up the newest stored one (0 if none), then the
    /// newest appended.
    pub fn last_offset(&self) -> i64 {
        match &self.log {
            Log::Table(inner) => *inner.committed.borrow(),
            Log::Stream(log) => log.last_offset(),
        }
    }

    /// Whether hub events are published (replica mode: the events stream). Without it, callers
    /// need not build them.
    pub fn publishes_events(&self) -> bool {
        matches!(self.log, Log::Stream(_))
    }

    /// Publishes a hub event (replica mode: the events stream); without NATS, nothing.
    pub fn event(&self, event: stream::HubEvent) {
        if let Log::Stream(log) = &self.log {
            log.event(event);
        }
    }

    /// Deletes messages older than `max_age`, then the oldest until the stored bytes are at
    /// most `max_bytes`; returns how many were deleted. Synchronous (`spawn_blocking`). The
    /// writer also does this by itself every [`Retention::check_every`]. In replica mode
    /// JetStream enforces the stream's limits itself: 0.
    pub fn enforce_retention(&self) -> Result<u64, StoreError> {
        let Log::Table(inner) = &self.log else {
            return Ok(0);
        };
        let (cutoff, max_bytes) = retention_bounds(&inner.retention)?;
        let deleted = inner.reader.enforce_retention(cutoff, max_bytes)?;
        inner.counters.deleted.fetch_add(deleted, Ordering::Relaxed);
        Ok(deleted)
    }

    pub fn stats(&self) -> TelemetryStats {
        let inner = match &self.log {
            Log::Table(inner) => inner,
            Log::Stream(log) => return log.stats(),
        };
        let c = &inner.counters;
        let queued = QUEUE_CAPACITY.saturating_sub(inner.queue.capacity());
        TelemetryStats {
            messages: c.messages.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            deleted: c.deleted.load(Ordering::Relaxed),
            queued: u64::try_from(queued).unwrap_or(u64::MAX),
        }
    }

    /// Stops the writer after it has committed (or failed) everything already queued, and
    /// waits for it. Appends after this fail with [`StoreError::Unavailable`]. Blocks for up to
    /// one batch: from async code call it through `spawn_blocking`. Idempotent.
    pub fn shutdown(&self) {
        let Log::Table(inner) = &self.log else {
            return;
        };
        inner.stop.notify_one();
        let handle = inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.thread().id() != std::thread::current().id()
            && handle.join().is_err()
        {
            tracing::error!("the telemetry writer panicked");
        }
    }
}

#[cfg(test)]
impl Telemetry {
    /// The table log's state, for tests of the writer.
    fn table(&self) -> &Inner {
        match &self.log {
            Log::Table(inner) => inner,
            Log::Stream(_) => panic!("a test of the table log got a stream log"),
        }
    }
}

fn queue_max_bytes() -> usize {
    usize::try_from(QUEUE_MAX_BYTES).unwrap_or(usize::MAX >> 4)
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the telemetry store is shut down".to_owned())
}

/// `(enqueued_at cutoff in unix µs, max bytes)` for a retention pass now.
fn retention_bounds(retention: &Retention) -> Result<(i64, i64), StoreError> {
    let max_age = i64::try_from(retention.max_age.as_micros()).unwrap_or(i64::MAX);
    let cutoff = now_micros()?.saturating_sub(max_age);
    let max_bytes = i64::try_from(retention.max_bytes).unwrap_or(i64::MAX);
    Ok((cutoff, max_bytes))
}

/// Encodes the JSON columns. Rejects NUL in ids: PostgreSQL cannot store it in TEXT, and one
/// such message would fail the whole batch it is in. (NUL inside properties is fine: JSON
/// escapes it.)
fn encode(message: NewMessage) -> Result<NewRow, StoreError> {
    let size = i64::try_from(message.size()).unwrap_or(i64::MAX);
    if message.device_id.contains('\0')
        || message.module_id.as_ref().is_some_and(|m| m.contains('\0'))
    {
        return Err(StoreError::Backend(
            "telemetry: a device or module id contains NUL".to_owned(),
        ));
    }
    let system = serde_json::to_string(&message.system)
        .map_err(|e| StoreError::Backend(format!("cannot encode system properties: {e}")))?;
    let properties = serde_json::to_string(&message.properties)
        .map_err(|e| StoreError::Backend(format!("cannot encode properties: {e}")))?;
    Ok(NewRow {
        device_id: message.device_id,
        module_id: message.module_id,
        size,
        system,
        properties,
        body: message.body,
    })
}

fn decode(row: Row) -> Result<StoredMessage, StoreError> {
    let corrupt = |what: &str, e: serde_json::Error| {
        StoreError::Backend(format!(
            "stored {what} of telemetry message {} is not valid: {e}",
            row.offset
        ))
    };
    let system_properties: BTreeMap<String, String> =
        serde_json::from_str(&row.system).map_err(|e| corrupt("system properties", e))?;
    let properties_in_order: Vec<(String, Option<String>)> =
        serde_json::from_str(&row.properties).map_err(|e| corrupt("properties", e))?;
    let properties = properties_in_order
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::String)))
        .collect();
    let enqueued = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(row.enqueued_at).saturating_mul(1000),
    )
    .map_err(|e| {
        StoreError::Backend(format!(
            "stored enqueue time {} of telemetry message {} is out of range: {e}",
            row.enqueued_at, row.offset
        ))
    })?;
    Ok(StoredMessage {
        offset: row.offset,
        enqueued_time_utc: crate::time::rfc3339(enqueued),
        device_id: row.device_id,
        module_id: row.module_id,
        system_properties,
        properties,
        body: base64::engine::general_purpose::STANDARD.encode(&row.body),
        properties_in_order,
        size: u64::try_from(row.size).unwrap_or(0),
    })
}

fn now_micros() -> Result<i64, StoreError> {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
    i64::try_from(micros).map_err(|_| StoreError::Backend("clock out of range".to_owned()))
}

/// What the writer thread waits for.
enum Event {
    Request(Request),
    Stop,
    /// Every sender is gone, or the queue was closed and is drained.
    Closed,
    RetentionDue,
}

/// State of the writer thread.
struct WriterTask {
    writer: Writer,
    requests: mpsc::Receiver<Request>,
    committed: watch::Sender<i64>,
    counters: Arc<Counters>,
    stop: Arc<Notify>,
    retention: Retention,
    /// Enqueue times never go backwards in offset order, even if the clock does.
    last_enqueued_at: i64,
}

impl WriterTask {
    fn run(mut self, runtime: &tokio::runtime::Runtime) {
        let mut stopping = false;
        let mut next_retention = next_check(&self.retention);
        loop {
            let event = runtime.block_on(async {
                tokio::select! {
                    biased;
                    () = self.stop.notified(), if !stopping => Event::Stop,
                    request = self.requests.recv() => request.map_or(Event::Closed, Event::Request),
                    () = tokio::time::sleep_until(next_retention) => Event::RetentionDue,
                }
            });
            match event {
                Event::Request(first) => self.commit_batch(first),
                Event::Stop => {
                    // Refuse new messages; those already queued are still received, then
                    // `recv` answers `None`.
                    stopping = true;
                    self.requests.close();
                }
                Event::Closed => break,
                Event::RetentionDue => {}
            }
            // Checked here too: under constant load `recv` is always ready and the timer
            // branch would never be polled.
            if !stopping && Instant::now() >= next_retention {
                self.enforce_retention();
                next_retention = next_check(&self.retention);
            }
        }
        tracing::info!(
            last_offset = *self.committed.borrow(),
            "telemetry writer stopped"
        );
    }

    /// Commits `first` and everything already queued behind it, up to the batch limits, in
    /// one transaction, then answers every caller.
    fn commit_batch(&mut self, first: Request) {
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            match self.requests.try_recv() {
                Ok(request) => {
                    bytes = bytes.saturating_add(request.bytes);
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let enqueued_at = match now_micros() {
            Ok(now) => now.max(self.last_enqueued_at),
            Err(error) => return fail(batch, &error, &self.counters),
        };
        let rows: Vec<&NewRow> = batch.iter().map(|r| &r.row).collect();
        match self.writer.append(&rows, enqueued_at) {
            Ok(offsets) if offsets.len() == batch.len() => {
                self.last_enqueued_at = enqueued_at;
                let count = u64::try_from(batch.len()).unwrap_or(u64::MAX);
                self.counters.messages.fetch_add(count, Ordering::Relaxed);
                self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                // Publish before answering: once `append` returns, `last_offset()` and
                // `wait_for` already see the offset.
                if let Some(&last) = offsets.iter().max() {
                    self.committed.send_if_modified(|current| {
                        let newer = last > *current;
                        if newer {
                            *current = last;
                        }
                        newer
                    });
                }
                // A caller that has gone away misses its answer; the message is stored all the
                // same.
                answer_all(batch.into_iter().zip(offsets.into_iter().map(Ok)));
            }
            Ok(offsets) => {
                // Cannot happen: one RETURNING row per insert. Refuse to guess offsets.
                let error = StoreError::Backend(format!(
                    "telemetry insert returned {} offsets for {} messages",
                    offsets.len(),
                    batch.len()
                ));
                fail(batch, &error, &self.counters);
            }
            Err(error) => fail(batch, &error, &self.counters),
        }
    }

    fn enforce_retention(&mut self) {
        let outcome = retention_bounds(&self.retention)
            .and_then(|(cutoff, max_bytes)| self.writer.enforce_retention(cutoff, max_bytes));
        match outcome {
            Ok(0) => {}
            Ok(deleted) => {
                self.counters.deleted.fetch_add(deleted, Ordering::Relaxed);
                tracing::info!(deleted, "telemetry retention");
            }
            Err(error) => tracing::warn!(%error, "telemetry retention failed"),
        }
    }
}

/// When the writer next enforces retention: `check_every` from now, at least 10 ms (zero would
/// spin) and at most a year (`Duration::MAX` would overflow the clock).
fn next_check(retention: &Retention) -> Instant {
    let every = retention.check_every.clamp(
        Duration::from_millis(10),
        Duration::from_secs(365 * 24 * 3600),
    );
    Instant::now() + every
}

/// Answers every caller of a failed batch with the error.
fn fail(batch: Vec<Request>, error: &StoreError, counters: &Counters) {
    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%error, messages = batch.len(), "telemetry batch not stored");
    answer_all(
        batch
            .into_iter()
            .map(|request| (request, Err(error.clone()))),
    );
}

#[cfg(test)]
mod tests;
