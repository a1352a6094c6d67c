//! Cloud-to-device messages (hub-protocol §2.3): queued durably per device, delivered over
//! MQTT at QoS 1 in enqueue order, removed when the device acknowledges (PUBACK = complete).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use super::error::{HubError, HubErrorCode};
use super::{Hub, blocking};
use crate::db::{Collection, DocumentStore, StoreError, Write};
use crate::mqtt::QoS;

/// Most messages waiting for one device, as in IoT Hub.
pub const MAX_PENDING: usize = 50;
/// Largest C2D body.
pub const MAX_BODY: usize = 64 * 1024;

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
    blocking(store, move |s| {
        s.list(Collection::C2dMessages, Some(&id), MAX_PENDING + 1, None)
            .map(|p| p.items.len())
    })
    .await
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
pub fn topic_for(device_id: &str, message: &Value) -> String {
    let mut bag: Vec<(String, Option<String>)> = Vec::new();
    let system = [
        ("$.mid", "messageId"),
        ("$.cid", "correlationId"),
        ("$.uid", "userId"),
        ("$.ct", "contentType"),
        ("$.ce", "contentEncoding"),
        ("$.exp", "expiryTimeUtc"),
        ("iothub-ack", "ack"),
    ];
    for (key, field) in system {
        if let Some(value) = message.get(field).and_then(Value::as_str) {
            bag.push((key.to_string(), Some(value.to_string())));
        }
    }
    bag.push((
        "$.to".to_string(),
        Some(format!("/devices/{device_id}/messages/deviceBound")),
    ));
    if let Some(properties) = message.get("properties").and_then(Value::as_array) {
        for pair in properties {
            if let Some(key) = pair.get(0).and_then(Value::as_str) {
                bag.push((
                    key.to_string(),
                    pair.get(1).and_then(Value::as_str).map(String::from),
                ));
            }
        }
    }
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
        let doc = json!({
            "messageId": message_id,
            "correlationId": message.correlation_id,
            "userId": message.user_id,
            "contentType": message.content_type,
            "contentEncoding": message.content_encoding,
            "expiryTimeUtc": message.expiry_time_utc,
            "ack": message.ack,
            "properties": message.properties.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "body": B64.encode(&message.body),
            "enqueuedTimeUtc": crate::time::rfc3339(now),
        });
        let device = device_id.to_string();
        blocking(self.store(), move |s| {
            s.put(
                Collection::C2dMessages,
                &key,
                Some(&device),
                &doc,
                Write::Create,
            )
        })
        .await?;
        let hub = self.clone();
        let device = device_id.to_string();
        tokio::spawn(async move { hub.deliver_c2d(&device).await });
        Ok(message_id)
    }

    /// Sends every queued message to the device, oldest first, each removed once acknowledged.
    /// Stops at the first failure (the device went away); the rest waits for its next session.
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
            let page = match blocking(self.store(), move |s| {
                s.list(Collection::C2dMessages, Some(&id), 10, None)
            })
            .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(device_id, "listing C2D messages failed: {e}");
                    return;
                }
            };
            if page.items.is_empty() {
                return;
            }
            for doc in page.items {
                let expired = doc
                    .body
                    .get("expiryTimeUtc")
                    .and_then(Value::as_str)
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| t < time::OffsetDateTime::now_utc());
                if !expired {
                    let body = doc
                        .body
                        .get("body")
                        .and_then(Value::as_str)
                        .and_then(|b| B64.decode(b).ok())
                        .unwrap_or_default();
                    let topic = topic_for(device_id, &doc.body);
                    if outbound
                        .publish(topic, body.into(), QoS::AtLeastOnce)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let key = doc.id.clone();
                let removed = blocking(self.store(), move |s| {
                    match s.delete(Collection::C2dMessages, &key, None) {
                        Ok(_) | Err(StoreError::NotFound) => Ok(()),
                        Err(e) => Err(e),
                    }
                })
                .await;
                if let Err(e) = removed {
                    tracing::warn!(device_id, "removing a delivered C2D message failed: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_bags_have_no_raw_separators() {
        let message = json!({
            "messageId": "m/1",
            "ack": "full",
            "properties": [["color", "red&blue=x"], ["flag", null]],
        });
        let topic = topic_for("dev1", &message);
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
}
