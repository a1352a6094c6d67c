//! Cloud-to-device messages (hub-protocol §2.3, §6): queued durably per device, delivered
//! over MQTT at QoS 1 or received over HTTPS, in enqueue order.
//!
//! One queue and one life cycle for both transports, as in IoT Hub: a delivered message is
//! locked (invisible) for [`LOCK_TIMEOUT`] and its delivery count goes up. Completing it (an
//! MQTT PUBACK, or HTTPS `DELETE …/deviceBound/{lockToken}`) removes it; rejecting it (HTTPS
//! `…?reject`) dead-letters it, which here means it is removed too; abandoning it (HTTPS `POST …/{lockToken}/abandon`, or an MQTT connection lost
//! before its PUBACK) makes it available again at once. A lock that expires does the same. A
//! message delivered [`MAX_DELIVERY_COUNT`] times without completion, or past its expiry, is
//! dead-lettered instead of delivered. Every change is a conditional write on the message's
//! etag, so two deliveries (MQTT and HTTPS, or two replicas) never hold one message at once.
//!
//! A message sent with `ack` leaves a [`Feedback`] record when it ends: `Success` when
//! completed (acks `positive` and `full`), `Rejected`, `Expired` or `DeliveryCountExceeded`
//! otherwise (acks `negative` and `full`). The record is written before the message is
//! removed (and taken back if the removal loses a race), so a crash can repeat a record but
//! never lose one. The service reads them on the AMQP feedback link (`amqp::feedback`); a
//! record nobody reads goes after [`FEEDBACK_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::Hub;
use super::error::{HubError, HubErrorCode};
use crate::db::{Change, Collection, Document, DocumentStore, StoreError, Write};
use crate::mqtt::QoS;

/// Most messages waiting for one device, as in IoT Hub.
pub const MAX_PENDING: usize = 50;
/// Largest C2D body.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a delivered message stays locked, as in IoT Hub (one minute, not configurable).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Deliveries without completion after which a message is dead-lettered (IoT Hub's default
/// `maxDeliveryCount`).
pub const MAX_DELIVERY_COUNT: u32 = 10;
/// Messages read per pass over a device's queue (the queue holds about [`MAX_PENDING`]).
const PAGE: usize = 1000;
/// How long a feedback record nobody reads is kept: IoT Hub's longest feedback time to live.
pub const FEEDBACK_TTL: Duration = Duration::from_secs(48 * 3600);
/// Feedback records written (by this process) between two prunes of expired ones.
const PRUNE_EVERY: u64 = 64;

/// Property-bag encoding: everything but unreserved characters, so no raw `/ & =` appears.
const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A message as the service sends it.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub expiry_time_utc: Option<String>,
    pub ack: Option<String>,
    pub properties: Vec<(String, Option<String>)>,
}

/// A queued message as stored in `c2d_messages` (one document per message, `parent` = the
/// device id, keys sorting in enqueue order).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueuedMessage {
    pub message_id: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub content_encoding: Option<String>,
    #[serde(default)]
    pub expiry_time_utc: Option<String>,
    #[serde(default)]
    pub ack: Option<String>,
    #[serde(default)]
    pub properties: Vec<(String, Option<String>)>,
    /// Base64 of the body.
    pub body: String,
    pub enqueued_time_utc: String,
    /// Deliveries so far (MQTT publishes and HTTPS receives), this one included once locked.
    #[serde(default)]
    pub delivery_count: u32,
    /// The lock of the delivery in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_token: Option<String>,
    /// Unix microseconds until which that lock holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<i64>,
}

impl QueuedMessage {
    fn locked_at(&self, now: i64) -> bool {
        self.lock_token.is_some() && self.locked_until.is_some_and(|until| until > now)
    }

    fn expired_at(&self, now: i64) -> bool {
        self.expiry_time_utc
            .as_deref()
            .and_then(crate::time::parse_rfc3339)
            .is_some_and(|t| t.unix_timestamp_nanos() / 1000 < i128::from(now))
    }

    /// The body bytes (a stored body that is not base64 is empty: we wrote it, so it is).
    pub fn body_bytes(&self) -> Vec<u8> {
        B64.decode(&self.body).unwrap_or_default()
    }
}

/// A message locked for one delivery.
#[derive(Debug, Clone)]
pub struct Locked {
    /// The document key.
    key: String,
    /// The etag of the locked document: settling is conditional on it.
    etag: String,
    pub message: QueuedMessage,
}

impl Locked {
    pub fn lock_token(&self) -> &str {
        self.message.lock_token.as_deref().unwrap_or_default()
    }
}

/// How a device settles a message it received over HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Complete,
    Reject,
    Abandon,
}

fn now_micros() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

fn queued(doc: &Document) -> Option<QueuedMessage> {
    serde_json::from_value(doc.body.clone()).ok()
}

fn to_body(message: &QueuedMessage) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(message).map_err(|e| StoreError::Backend(e.to_string()))
}

/// How a message with `ack` ended, as IoT Hub's feedback `statusCode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Success,
    Expired,
    DeliveryCountExceeded,
    Rejected,
}

impl Feedback {
    pub fn status_code(self) -> &'static str {
        match self {
            Feedback::Success => "Success",
            Feedback::Expired => "Expired",
            Feedback::DeliveryCountExceeded => "DeliveryCountExceeded",
            Feedback::Rejected => "Rejected",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Feedback::Success => "Success",
            Feedback::Expired => "Message expired",
            Feedback::DeliveryCountExceeded => "Message delivery count exceeded",
            Feedback::Rejected => "Message rejected",
        }
    }

    /// Whether a message sent with `ack` asks for this outcome.
    pub fn wanted_by(self, ack: Option<&str>) -> bool {
        match ack.map(str::to_ascii_lowercase).as_deref() {
            Some("full") => true,
            Some("positive") => self == Feedback::Success,
            Some("negative") => self != Feedback::Success,
            _ => false,
        }
    }
}

/// Writes the feedback record of a message that ends as `outcome`, if its `ack` asks for it.
/// `true` when a record was written now (and must be taken back if the message stays).
fn record_feedback(
    s: &dyn DocumentStore,
    device_id: &str,
    key: &str,
    message: &QueuedMessage,
    outcome: Feedback,
) -> Result<bool, StoreError> {
    if !outcome.wanted_by(message.ack.as_deref()) {
        return Ok(false);
    }
    let generation = s
        .get(Collection::Devices, device_id)?
        .and_then(|d| {
            d.body
                .get("generationId")
                .and_then(|g| g.as_str().map(String::from))
        })
        .unwrap_or_default();
    let record = serde_json::json!({
        "originalMessageId": message.message_id,
        "description": outcome.description(),
        "deviceGenerationId": generation,
        "deviceId": device_id,
        "enqueuedTimeUtc": crate::time::now_rfc3339(),
        "statusCode": outcome.status_code(),
    });
    match s.put(
        Collection::C2dFeedback,
        key,
        Some(device_id),
        &record,
        Write::Create,
    ) {
        Ok(_) => {
            static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            if WRITTEN
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(PRUNE_EVERY)
            {
                prune_feedback(s, time::OffsetDateTime::now_utc())?;
            }
            Ok(true)
        }
        // Written before, by an attempt that then lost its race or crashed: one record.
        Err(StoreError::Conflict) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes feedback records older than [`FEEDBACK_TTL`] among the oldest messages' records
/// (records are keyed by their message, oldest first), so records no service reads do not
/// pile up. Returns how many went.
pub fn prune_feedback(
    s: &dyn DocumentStore,
    now: time::OffsetDateTime,
) -> Result<usize, StoreError> {
    let page = s.list(Collection::C2dFeedback, None, PAGE, None)?;
    let mut removed = 0;
    for record in page.items {
        let written = record
            .body
            .get("enqueuedTimeUtc")
            .and_then(|t| t.as_str())
            .and_then(crate::time::parse_rfc3339);
        if written.is_none_or(|at| now - at > FEEDBACK_TTL) {
            match s.delete(Collection::C2dFeedback, &record.id, Some(&record.etag)) {
                Ok(_) => removed += 1,
                Err(StoreError::NotFound | StoreError::PreconditionFailed) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Removes a message that ends as `outcome`, leaving its feedback record; `false` (and no
/// record) when it is no longer the version `etag` names.
fn end(
    s: &dyn DocumentStore,
    device_id: &str,
    locked: &Locked,
    outcome: Feedback,
) -> Result<bool, StoreError> {
    let recorded = record_feedback(s, device_id, &locked.key, &locked.message, outcome)?;
    let removed = remove(s, &locked.key, &locked.etag)?;
    if recorded && !removed {
        let _ = s.delete(Collection::C2dFeedback, &locked.key, None);
    }
    Ok(removed)
}

/// Removes a message that will not be delivered (completed, rejected, expired, or delivered
/// too often), if it is still the version `etag` names.
fn remove(s: &dyn DocumentStore, key: &str, etag: &str) -> Result<bool, StoreError> {
    match s.delete(Collection::C2dMessages, key, Some(etag)) {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound | StoreError::PreconditionFailed) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Locks the oldest deliverable message of a device for `lock_for` and counts the delivery.
/// Expired messages and messages delivered [`MAX_DELIVERY_COUNT`] times are dead-lettered on
/// the way; locked ones are skipped. `None`: nothing to deliver now.
pub fn lock_next(
    s: &dyn DocumentStore,
    device_id: &str,
    now: i64,
    lock_for: Duration,
) -> Result<Option<Locked>, StoreError> {
    let page = s.list(Collection::C2dMessages, Some(device_id), PAGE, None)?;
    for listed in page.items {
        // Decided on the message as stored now: a delivery that raced this one and locked it
        // first makes `update` read it again, and this one moves on.
        let locked = s.update::<_, StoreError>(Collection::C2dMessages, &listed.id, |doc| {
            let Some(doc) = doc else {
                return Ok(Change::Keep(None));
            };
            let Some(mut message) = queued(doc) else {
                tracing::warn!(device_id, key = %doc.id, "dropping an unreadable C2D message");
                return Ok(Change::Delete(None));
            };
            if message.locked_at(now) {
                return Ok(Change::Keep(None));
            }
            if message.expired_at(now) || message.delivery_count >= MAX_DELIVERY_COUNT {
                tracing::info!(device_id, message_id = %message.message_id, deliveries = message.delivery_count, "C2D message dead-lettered");
                let outcome = if message.expired_at(now) {
                    Feedback::Expired
                } else {
                    Feedback::DeliveryCountExceeded
                };
                record_feedback(s, device_id, &doc.id, &message, outcome)?;
                return Ok(Change::Delete(None));
            }
            message.delivery_count += 1;
            message.lock_token = Some(uuid::Uuid::new_v4().to_string());
            message.locked_until = Some(now + lock_for.as_micros() as i64);
            Ok(Change::Put {
                body: to_body(&message)?,
                parent: Some(device_id.to_string()),
                result: Some(message),
            })
        })?;
        if let (Some(message), Some(written)) = (locked.result, locked.document) {
            return Ok(Some(Locked {
                key: written.id,
                etag: written.etag,
                message,
            }));
        }
    }
    Ok(None)
}

/// Ends a delivery: complete and reject remove the message, abandon makes it available again
/// (or dead-letters it once it was delivered [`MAX_DELIVERY_COUNT`] times). `false`: the lock
/// was lost (it expired and the message was delivered again, or the message is gone).
fn settle_locked(
    s: &dyn DocumentStore,
    device_id: &str,
    locked: &Locked,
    how: Settlement,
) -> Result<bool, StoreError> {
    match how {
        Settlement::Complete => end(s, device_id, locked, Feedback::Success),
        Settlement::Reject => end(s, device_id, locked, Feedback::Rejected),
        Settlement::Abandon if locked.message.delivery_count >= MAX_DELIVERY_COUNT => {
            end(s, device_id, locked, Feedback::DeliveryCountExceeded)
        }
        Settlement::Abandon => {
            let mut message = locked.message.clone();
            message.lock_token = None;
            message.locked_until = None;
            match s.put(
                Collection::C2dMessages,
                &locked.key,
                Some(device_id),
                &to_body(&message)?,
                Write::IfMatch(locked.etag.clone()),
            ) {
                Ok(_) => Ok(true),
                Err(StoreError::PreconditionFailed | StoreError::NotFound) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Settles the message whose lock is `lock_token`, if that lock still holds at `now`.
/// `false`: no message holds that lock (unknown token, expired lock, already settled).
pub fn settle(
    s: &dyn DocumentStore,
    device_id: &str,
    lock_token: &str,
    how: Settlement,
    now: i64,
) -> Result<bool, StoreError> {
    let page = s.list(Collection::C2dMessages, Some(device_id), PAGE, None)?;
    let held = page.items.into_iter().find_map(|doc| {
        let message = queued(&doc)?;
        (message.lock_token.as_deref() == Some(lock_token) && message.locked_at(now)).then_some({
            Locked {
                key: doc.id,
                etag: doc.etag,
                message,
            }
        })
    });
    match held {
        Some(locked) => settle_locked(s, device_id, &locked, how),
        None => Ok(false),
    }
}

/// One delivery at a time per device, so order holds and nothing is sent twice at once.
#[derive(Default)]
pub struct Deliveries {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Deliveries {
    fn lock_for(&self, device_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(device_id.to_string()).or_default().clone()
    }
}

pub async fn pending_count(
    store: &Arc<dyn DocumentStore>,
    device_id: &str,
) -> Result<usize, HubError> {
    let id = device_id.to_string();
    crate::db::blocking(store, move |s| {
        s.list(Collection::C2dMessages, Some(&id), MAX_PENDING + 1, None)
            .map(|p| p.items.len())
    })
    .await
    .map_err(HubError::from)
}

/// Deletes every queued message of a device.
pub fn purge(store: &dyn DocumentStore, device_id: &str) -> Result<(), StoreError> {
    loop {
        let page = store.list(Collection::C2dMessages, Some(device_id), 1000, None)?;
        if page.items.is_empty() {
            return Ok(());
        }
        for doc in page.items {
            match store.delete(Collection::C2dMessages, &doc.id, None) {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The topic a device receives a message on, with its property bag.
pub fn topic_for(device_id: &str, message: &QueuedMessage) -> String {
    let mut bag: Vec<(String, Option<String>)> = Vec::new();
    let system = [
        ("$.mid", Some(&message.message_id)),
        ("$.cid", message.correlation_id.as_ref()),
        ("$.uid", message.user_id.as_ref()),
        ("$.ct", message.content_type.as_ref()),
        ("$.ce", message.content_encoding.as_ref()),
        ("$.exp", message.expiry_time_utc.as_ref()),
        ("iothub-ack", message.ack.as_ref()),
    ];
    for (key, value) in system {
        if let Some(value) = value {
            bag.push((key.to_string(), Some(value.clone())));
        }
    }
    bag.push((
        "$.to".to_string(),
        Some(format!("/devices/{device_id}/messages/deviceBound")),
    ));
    bag.extend(message.properties.iter().cloned());
    let encoded: Vec<String> = bag
        .iter()
        .map(|(k, v)| {
            let key = utf8_percent_encode(k, BAG).to_string();
            match v {
                Some(v) => format!("{key}={}", utf8_percent_encode(v, BAG)),
                None => key,
            }
        })
        .collect();
    format!(
        "devices/{device_id}/messages/devicebound/{}",
        encoded.join("&")
    )
}

impl Hub {
    /// Queues a message for a device and starts delivery if it is connected.
    pub async fn send_c2d(
        self: &Arc<Self>,
        device_id: &str,
        message: OutgoingMessage,
    ) -> Result<String, HubError> {
        if message.body.len() > MAX_BODY {
            return Err(HubError::new(
                HubErrorCode::MessageTooLarge,
                "a cloud-to-device message body is at most 64 KiB",
            ));
        }
        self.require_device(device_id).await?;
        if pending_count(self.store(), device_id).await? >= MAX_PENDING {
            return Err(HubError::new(
                HubErrorCode::DeviceMaximumQueueDepthExceeded,
                format!("device {device_id} already has {MAX_PENDING} messages waiting"),
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let sequence = rand::random::<u32>() % 1_000_000;
        let key = format!("{:020}{:06}", now.unix_timestamp_nanos() / 1000, sequence);
        let message_id = message
            .message_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let queued = QueuedMessage {
            message_id: message_id.clone(),
            correlation_id: message.correlation_id,
            user_id: message.user_id,
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            expiry_time_utc: message.expiry_time_utc,
            ack: message.ack,
            properties: message.properties,
            body: B64.encode(&message.body),
            enqueued_time_utc: crate::time::rfc3339(now),
            delivery_count: 0,
            lock_token: None,
            locked_until: None,
        };
        let doc = to_body(&queued).map_err(HubError::store)?;
        let device = device_id.to_string();
        crate::db::blocking(self.store(), move |s| {
            s.put(
                Collection::C2dMessages,
                &key,
                Some(&device),
                &doc,
                Write::Create,
            )
        })
        .await?;
        self.start_c2d_delivery(device_id);
        Ok(message_id)
    }

    /// Delivers over MQTT in the background, if the device is connected (to this replica or,
    /// in replica mode, to another) and subscribed.
    pub fn start_c2d_delivery(self: &Arc<Self>, device_id: &str) {
        if self.outbound(device_id).is_none()
            && let Some(cluster) = self.cluster()
        {
            cluster.tell_soon(device_id, crate::cluster::Order::C2d, Default::default());
            return;
        }
        let hub = self.clone();
        let device = device_id.to_string();
        tokio::spawn(async move { hub.deliver_c2d(&device).await });
    }

    /// Sends every deliverable message to the device over MQTT, oldest first: each is locked
    /// and counted, then removed once acknowledged (PUBACK = complete). Messages locked by an
    /// HTTPS receive are skipped. Stops at the first failure (the device went away): that
    /// message is available again at once and the rest waits for the next session.
    pub async fn deliver_c2d(&self, device_id: &str) {
        let lock = self.c2d.lock_for(device_id);
        let _guard = lock.lock().await;
        loop {
            let Some(outbound) = self.outbound(device_id) else {
                return;
            };
            let probe = format!("devices/{device_id}/messages/devicebound/x");
            if !outbound.is_subscribed(&probe) {
                return;
            }
            let id = device_id.to_string();
            let locked = match crate::db::blocking(self.store(), move |s| {
                lock_next(s, &id, now_micros(), LOCK_TIMEOUT)
            })
            .await
            {
                Ok(Some(locked)) => locked,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(device_id, "reading the C2D queue failed: {e}");
                    return;
                }
            };
            let topic = topic_for(device_id, &locked.message);
            let body = locked.message.body_bytes();
            let delivered = outbound
                .publish(topic, body.into(), QoS::AtLeastOnce)
                .await
                .is_ok();
            let how = if delivered {
                Settlement::Complete
            } else {
                Settlement::Abandon
            };
            let id = device_id.to_string();
            let settled =
                crate::db::blocking(self.store(), move |s| settle_locked(s, &id, &locked, how))
                    .await;
            if let Err(e) = &settled {
                tracing::warn!(device_id, "settling a delivered C2D message failed: {e}");
            }
            if !delivered
                && settled.is_ok()
                && let Some(cluster) = self.cluster()
            {
                // The connection went away with the message, which is available again: a newer
                // connection on another replica may already be waiting for it.
                cluster.tell_soon(device_id, crate::cluster::Order::C2d, Default::default());
            }
            if !delivered || settled.is_err() {
                return;
            }
        }
    }

    /// HTTPS receive (`GET /devices/{id}/messages/deviceBound`): the oldest deliverable
    /// message, locked for [`LOCK_TIMEOUT`]; `None` when nothing is waiting.
    pub async fn receive_c2d(&self, device_id: &str) -> Result<Option<Locked>, HubError> {
        let id = device_id.to_string();
        crate::db::blocking(self.store(), move |s| {
            lock_next(s, &id, now_micros(), LOCK_TIMEOUT)
        })
        .await
        .map_err(HubError::from)
    }

    /// HTTPS complete, reject or abandon of the message locked by `lock_token`. An abandoned
    /// message goes to the device's MQTT connection, if it has one.
    pub async fn settle_c2d(
        self: &Arc<Self>,
        device_id: &str,
        lock_token: &str,
        how: Settlement,
    ) -> Result<(), HubError> {
        let (id, token) = (device_id.to_string(), lock_token.to_string());
        let settled = crate::db::blocking(self.store(), move |s| {
            settle(s, &id, &token, how, now_micros())
        })
        .await?;
        if !settled {
            return Err(HubError::new(
                HubErrorCode::DeviceMessageLockLost,
                "no message of this device holds that lock token (unknown, expired or settled)",
            ));
        }
        if how == Settlement::Abandon {
            self.start_c2d_delivery(device_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str) -> QueuedMessage {
        QueuedMessage {
            message_id: id.to_string(),
            correlation_id: None,
            user_id: None,
            content_type: None,
            content_encoding: None,
            expiry_time_utc: None,
            ack: None,
            properties: Vec::new(),
            body: B64.encode(id),
            enqueued_time_utc: "2026-01-01T00:00:00Z".to_string(),
            delivery_count: 0,
            lock_token: None,
            locked_until: None,
        }
    }

    #[test]
    fn property_bags_have_no_raw_separators() {
        let mut m = message("m/1");
        m.ack = Some("full".into());
        m.properties = vec![
            ("color".into(), Some("red&blue=x".into())),
            ("flag".into(), None),
        ];
        let topic = topic_for("dev1", &m);
        let bag = topic
            .strip_prefix("devices/dev1/messages/devicebound/")
            .unwrap();
        assert!(!bag.contains('/'), "{bag}");
        assert!(bag.contains("%24.mid=m%2F1"), "{bag}");
        assert!(bag.contains("iothub-ack=full"), "{bag}");
        assert!(bag.contains("color=red%26blue%3Dx"), "{bag}");
        assert!(bag.ends_with("&flag"), "{bag}");
        assert!(
            bag.contains("%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound"),
            "{bag}"
        );
    }

    /// Messages written before delivery counts and locks existed still read.
    #[test]
    fn stored_messages_without_lock_fields_read() {
        let old = serde_json::json!({
            "messageId": "m1", "correlationId": null, "userId": null, "contentType": null,
            "contentEncoding": null, "expiryTimeUtc": null, "ack": null,
            "properties": [["k", "v"], ["flag", null]], "body": "aGk=",
            "enqueuedTimeUtc": "2026-01-01T00:00:00Z",
        });
        let m: QueuedMessage = serde_json::from_value(old).unwrap();
        assert_eq!(
            (m.delivery_count, m.lock_token.clone(), m.body_bytes()),
            (0, None, b"hi".to_vec())
        );
        assert_eq!(m.properties[1], ("flag".to_string(), None));
    }

    /// Queues `m` for the device `dev` under `key`.
    fn queue(store: &dyn DocumentStore, key: &str, m: &QueuedMessage) {
        store
            .put(
                Collection::C2dMessages,
                key,
                Some("dev"),
                &to_body(m).unwrap(),
                Write::Create,
            )
            .unwrap();
    }

    /// The life cycle against a real store, with the clock passed in: locks hide a message,
    /// expire, count deliveries, and dead-letter at the limit.
    fn life_cycle(store: &dyn DocumentStore) {
        let put = |key: &str, m: &QueuedMessage| queue(store, key, m);
        put("001", &message("first"));
        put("002", &message("second"));
        let minute = LOCK_TIMEOUT.as_micros() as i64;
        let t0 = 1_000_000_000_000;
        let a = lock_next(store, "dev", t0, LOCK_TIMEOUT).unwrap().unwrap();
        assert_eq!(
            (a.message.message_id.as_str(), a.message.delivery_count),
            ("first", 1)
        );
        // Locked: the next receive gets the second message, then nothing.
        let b = lock_next(store, "dev", t0, LOCK_TIMEOUT).unwrap().unwrap();
        assert_eq!(b.message.message_id, "second");
        assert!(
            lock_next(store, "dev", t0 + 1, LOCK_TIMEOUT)
                .unwrap()
                .is_none()
        );
        // Another device's queue is its own.
        assert!(lock_next(store, "Dev", t0, LOCK_TIMEOUT).unwrap().is_none());
        // Abandon: available again at once, counted.
        assert!(settle(store, "dev", b.lock_token(), Settlement::Abandon, t0 + 2).unwrap());
        let again = lock_next(store, "dev", t0 + 3, LOCK_TIMEOUT)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                again.message.message_id.as_str(),
                again.message.delivery_count
            ),
            ("second", 2)
        );
        // The lock of `first` expires: delivered again, counted; its old token is lost.
        let expired = lock_next(store, "dev", t0 + minute + 1, LOCK_TIMEOUT)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                expired.message.message_id.as_str(),
                expired.message.delivery_count
            ),
            ("first", 2)
        );
        assert!(
            !settle(
                store,
                "dev",
                a.lock_token(),
                Settlement::Complete,
                t0 + minute + 2
            )
            .unwrap()
        );
        // Complete removes; a second complete finds nothing; reject removes too.
        assert!(
            settle(
                store,
                "dev",
                expired.lock_token(),
                Settlement::Complete,
                t0 + minute + 2
            )
            .unwrap()
        );
        assert!(
            !settle(
                store,
                "dev",
                expired.lock_token(),
                Settlement::Complete,
                t0 + minute + 3
            )
            .unwrap()
        );
        assert!(settle(store, "dev", again.lock_token(), Settlement::Reject, t0 + 4).unwrap());
        assert!(
            store
                .list(Collection::C2dMessages, Some("dev"), 10, None)
                .unwrap()
                .items
                .is_empty()
        );
        // Delivered MAX_DELIVERY_COUNT times without completion: dead-lettered, not delivered.
        put("003", &message("doomed"));
        let mut now = t0 + 10 * minute;
        for round in 1..=MAX_DELIVERY_COUNT {
            let l = lock_next(store, "dev", now, LOCK_TIMEOUT).unwrap().unwrap();
            assert_eq!(l.message.delivery_count, round);
            assert!(settle(store, "dev", l.lock_token(), Settlement::Abandon, now + 1).unwrap());
            now += 2;
        }
        assert!(
            lock_next(store, "dev", now, LOCK_TIMEOUT)
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .list(Collection::C2dMessages, Some("dev"), 10, None)
                .unwrap()
                .items
                .is_empty()
        );
        // An expired message is dropped, not delivered.
        let mut old = message("stale");
        old.expiry_time_utc = Some("1970-01-01T00:00:01Z".into());
        put("004", &old);
        assert!(
            lock_next(store, "dev", now, LOCK_TIMEOUT)
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .list(Collection::C2dMessages, Some("dev"), 10, None)
                .unwrap()
                .items
                .is_empty()
        );
    }

    /// Messages that asked for feedback and are dead-lettered leave `Expired` and
    /// `DeliveryCountExceeded` records; one without `ack` leaves none.
    #[test]
    fn dead_lettered_messages_leave_feedback() {
        let empty = crate::db::telemetry::TestDatabase::sqlite().unwrap();
        let store = crate::db::open(&empty.url).unwrap();
        let put = |key: &str, m: &QueuedMessage| queue(&store, key, m);
        let mut expired = message("expired");
        expired.ack = Some("full".into());
        expired.expiry_time_utc = Some("1970-01-01T00:00:01Z".into());
        put("001", &expired);
        let mut tired = message("tired");
        tired.ack = Some("negative".into());
        tired.delivery_count = MAX_DELIVERY_COUNT;
        put("002", &tired);
        let mut quiet = message("quiet");
        quiet.expiry_time_utc = Some("1970-01-01T00:00:01Z".into());
        put("003", &quiet);
        assert!(
            lock_next(&store, "dev", 1_000_000_000_000_000, LOCK_TIMEOUT)
                .unwrap()
                .is_none()
        );
        let records: Vec<(String, String)> = store
            .list(Collection::C2dFeedback, None, 10, None)
            .unwrap()
            .items
            .into_iter()
            .map(|d| {
                (
                    d.body["originalMessageId"].as_str().unwrap().to_string(),
                    d.body["statusCode"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            records,
            [
                ("expired".to_string(), "Expired".to_string()),
                ("tired".to_string(), "DeliveryCountExceeded".to_string())
            ]
        );
    }

    /// Unread feedback records go after [`FEEDBACK_TTL`]; younger ones stay.
    #[test]
    fn feedback_records_expire() {
        let empty = crate::db::telemetry::TestDatabase::sqlite().unwrap();
        let store = crate::db::open(&empty.url).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let record = |key: &str, at: time::OffsetDateTime| {
            let body = serde_json::json!({
                "originalMessageId": key, "statusCode": "Success", "deviceId": "dev",
                "enqueuedTimeUtc": crate::time::rfc3339(at),
            });
            store
                .put(
                    Collection::C2dFeedback,
                    key,
                    Some("dev"),
                    &body,
                    Write::Create,
                )
                .unwrap();
        };
        record("001", now - FEEDBACK_TTL - Duration::from_secs(1));
        record("002", now - FEEDBACK_TTL + Duration::from_secs(60));
        record("003", now);
        assert_eq!(prune_feedback(&store, now).unwrap(), 1);
        let left: Vec<String> = store
            .list(Collection::C2dFeedback, None, 10, None)
            .unwrap()
            .items
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(left, ["002", "003"]);
    }

    #[test]
    fn life_cycle_on_sqlite() {
        let empty = crate::db::telemetry::TestDatabase::sqlite().unwrap();
        life_cycle(&crate::db::open(&empty.url).unwrap());
    }

    #[test]
    fn life_cycle_on_postgres() {
        if let Some(empty) = crate::db::telemetry::TestDatabase::postgres() {
            let db = crate::db::open(&empty.url).unwrap();
            life_cycle(&db);
            drop(db);
        }
    }
}
