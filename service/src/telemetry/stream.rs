//! Replica mode's telemetry log: a JetStream stream that every replica appends to. A device's
//! message is acknowledged (PUBACK, HTTP 204) only after JetStream acknowledged it, that is
//! after the stream's servers (a quorum of `cluster.stream_replicas`) stored it. The stream's
//! sequence is the offset of the consumer API (`GET /messages/events`).
//!
//! The layout is the contract for applications that read the stream with any NATS client
//! (docs/hub.md, "Telemetry on JetStream"):
//! - stream `{PREFIX}_TELEMETRY` (the subject prefix upper-cased, dots as `_`), subjects
//!   `{prefix}.telemetry.{hex of the device id}`; retention by age and bytes from `[telemetry]`;
//! - the body is the device's payload, unchanged;
//! - header `Zt-Device-Id` (and `Zt-Module-Id`), `Zt-Enqueued-Time` (RFC 3339, UTC, seven
//!   fractional digits), `Zt-Size` (the bytes retention counts);
//! - each IoT Hub system property (`message-id`, `correlation-id`, `content-type`,
//!   `content-encoding`, `iothub-connection-device-id`, …) as a header of its own name;
//! - the application properties in one header, `Iothub-App-Properties`, encoded as on the
//!   device's MQTT topic: `name=value` pairs joined by `&`, a name alone for a property without
//!   a value, arrival order and repeated names kept.
//!
//! Header values are percent-encoded (RFC 3986) where they hold `%`, control characters or
//! non-ASCII text; plain values read as they are.
//!
//! Beside it, the stream `{PREFIX}_EVENTS` (subjects `{prefix}.events.>`) carries the hub's
//! events as IoT Hub sends them to its events endpoint: device lifecycle, connection state and
//! twin changes ([`HubEvent`], docs/hub.md "Events").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use base64::Engine as _;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::Value;

use super::{NewMessage, Retention, StoredMessage, TelemetryStats};
use crate::cluster::Cluster;
use crate::db::StoreError;

/// Characters percent-encoded in a header value (non-ASCII always is).
const VALUE: &AsciiSet = &CONTROLS.add(b'%');
/// In the application property bag, also the separators.
const BAG: &AsciiSet = &VALUE.add(b'&').add(b'=');

const DEVICE_ID: &str = "Zt-Device-Id";
const MODULE_ID: &str = "Zt-Module-Id";
const ENQUEUED: &str = "Zt-Enqueued-Time";
const SIZE: &str = "Zt-Size";
const APP_PROPERTIES: &str = "Iothub-App-Properties";

/// How often a long poll looks at the stream's last sequence.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// What an event is about; its subject's third token and its `iothub-message-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Lifecycle,
    Connection,
    Twin,
}

impl EventKind {
    fn token(self) -> &'static str {
        match self {
            EventKind::Lifecycle => "lifecycle",
            EventKind::Connection => "connections",
            EventKind::Twin => "twins",
        }
    }

    fn source(self) -> &'static str {
        match self {
            EventKind::Lifecycle => "deviceLifecycleEvents",
            EventKind::Connection => "deviceConnectionStateEvents",
            EventKind::Twin => "twinChangeEvents",
        }
    }
}

/// A hub event: `op_type` is IoT Hub's (`createDeviceIdentity`, `deleteDeviceIdentity`,
/// `deviceConnected`, `deviceDisconnected`, `updateTwin`, `replaceTwin`).
#[derive(Debug, Clone)]
pub struct HubEvent {
    pub kind: EventKind,
    pub op_type: &'static str,
    pub hub_name: String,
    pub device_id: String,
    pub body: Value,
}

pub struct StreamLog {
    jetstream: async_nats::jetstream::Context,
    /// For direct gets, which any server holding a copy answers: no stream info call per read.
    stream: stream::Stream,
    name: String,
    /// `{prefix}.telemetry`
    subjects: String,
    /// `{prefix}.events`
    events_prefix: String,
    /// The newest sequence this replica has seen (appended, or read in the stream's state).
    last: AtomicI64,
    messages: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
}

impl std::fmt::Debug for StreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLog")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("telemetry stream: {what}: {e}"))
}

impl StreamLog {
    /// Opens the stream, creating it if no replica has yet.
    pub async fn open(
        cluster: &Cluster,
        retention: &Retention,
        replicas: usize,
    ) -> Result<StreamLog, StoreError> {
        let prefix = cluster.subject_prefix();
        let name = format!("{}_TELEMETRY", prefix.replace('.', "_").to_uppercase());
        let subjects = format!("{prefix}.telemetry");
        let jetstream = cluster.jetstream();
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subjects}.>")],
            max_age: retention.max_age,
            max_bytes: i64::try_from(retention.max_bytes).unwrap_or(i64::MAX),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let stream = crate::cluster::at_start("creating the telemetry stream", || {
            jetstream.get_or_create_stream(config.clone())
        })
        .await
        .map_err(|e| unavailable("creating it", e))?;
        let events = stream::Config {
            name: format!("{}_EVENTS", prefix.replace('.', "_").to_uppercase()),
            subjects: vec![format!("{prefix}.events.>")],
            max_age: retention.max_age,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        crate::cluster::at_start("creating the events stream", || {
            jetstream.get_or_create_stream(events.clone())
        })
        .await
        .map_err(|e| unavailable("creating the events stream", e))?;
        let last = i64::try_from(stream.cached_info().state.last_sequence).unwrap_or(i64::MAX);
        tracing::info!(stream = %name, last_offset = last, "telemetry stream opened");
        Ok(StreamLog {
            jetstream,
            stream,
            name,
            events_prefix: format!("{prefix}.events"),
            subjects,
            last: AtomicI64::new(last),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn subject(&self, device_id: &str) -> String {
        format!("{}.{}", self.subjects, hex::encode(device_id.as_bytes()))
    }

    fn saw(&self, sequence: u64) {
        let sequence = i64::try_from(sequence).unwrap_or(i64::MAX);
        self.last.fetch_max(sequence, Ordering::Relaxed);
    }

    /// Appends and waits for JetStream's acknowledgement; returns the sequence.
    pub async fn append(&self, message: NewMessage) -> Result<i64, StoreError> {
        let size = message.size();
        let subject = self.subject(&message.device_id);
        let headers = encode_headers(&message, size)?;
        let acked = async {
            self.jetstream
                .publish_with_headers(subject, headers, message.body.into())
                .await
                .map_err(|e| unavailable("publishing", e))?
                .await
                .map_err(|e| unavailable("waiting for the acknowledgement", e))
        }
        .await;
        match acked {
            Ok(ack) => {
                self.saw(ack.sequence);
                self.messages.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(size, Ordering::Relaxed);
                Ok(i64::try_from(ack.sequence).unwrap_or(i64::MAX))
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Messages with sequence `>= from`, ascending, at most `limit`, optionally of one device.
    pub async fn read(
        &self,
        from: i64,
        limit: usize,
        device_id: Option<&str>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let stream = &self.stream;
        let filter = match device_id {
            Some(device) => self.subject(device),
            None => format!("{}.>", self.subjects),
        };
        let mut next = u64::try_from(from.max(1)).unwrap_or(1);
        let mut out = Vec::new();
        while out.len() < limit {
            let message = match stream
                .direct_get_next_for_subject(filter.as_str(), Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(unavailable("reading", e)),
            };
            next = message.sequence + 1;
            self.saw(message.sequence);
            out.push(decode(message)?);
        }
        Ok(out)
    }

    /// The stream's last sequence now (all replicas' appends).
    async fn refresh_last(&self) -> Result<i64, StoreError> {
        let stream = self
            .jetstream
            .get_stream(&self.name)
            .await
            .map_err(|e| unavailable("reading its state", e))?;
        self.saw(stream.cached_info().state.last_sequence);
        Ok(self.last_offset())
    }

    /// `true` once a message with sequence `>= offset` is stored, `false` after `timeout`.
    pub async fn wait_for(&self, offset: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.last_offset() >= offset {
                return true;
            }
            if let Ok(last) = self.refresh_last().await
                && last >= offset
            {
                return true;
            }
            if tokio::time::Instant::now() + POLL_EVERY > deadline {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub fn last_offset(&self) -> i64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Publishes a hub event in the background: the operation it reports does not wait for
    /// it. A failure is logged (and the event lost, as with IoT Hub when no route takes it).
    pub fn event(&self, event: HubEvent) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let subject = format!(
            "{}.{}.{}",
            self.events_prefix,
            event.kind.token(),
            hex::encode(event.device_id.as_bytes())
        );
        let value = |text: &str| utf8_percent_encode(text, VALUE).to_string();
        let mut headers = HeaderMap::new();
        headers.insert("iothub-message-source", event.kind.source());
        headers.insert("opType", event.op_type);
        headers.insert("hubName", value(&event.hub_name).as_str());
        headers.insert("deviceId", value(&event.device_id).as_str());
        let now = crate::time::rfc3339(time::OffsetDateTime::now_utc());
        headers.insert("operationTimestamp", now.as_str());
        let jetstream = self.jetstream.clone();
        let body = event.body.to_string();
        runtime.spawn(async move {
            let stored = match jetstream
                .publish_with_headers(subject, headers, body.into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = stored {
                tracing::warn!(device_id = %event.device_id, op_type = event.op_type, "a hub event was not stored: {e}");
            }
        });
    }

    pub fn stats(&self) -> TelemetryStats {
        TelemetryStats {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failed_batches: self.failed.load(Ordering::Relaxed),
            ..TelemetryStats::default()
        }
    }
}

fn header_name(name: &str) -> Result<async_nats::HeaderName, StoreError> {
    name.parse()
        .map_err(|_| StoreError::Backend(format!("telemetry: {name:?} is not a header name")))
}

fn encode_headers(message: &NewMessage, size: u64) -> Result<HeaderMap, StoreError> {
    let value = |text: &str| utf8_percent_encode(text, VALUE).to_string();
    let mut headers = HeaderMap::new();
    headers.insert(DEVICE_ID, value(&message.device_id).as_str());
    if let Some(module) = &message.module_id {
        headers.insert(MODULE_ID, value(module).as_str());
    }
    let now = crate::time::rfc3339(time::OffsetDateTime::now_utc());
    headers.insert(ENQUEUED, now.as_str());
    headers.insert(SIZE, size.to_string().as_str());
    for (name, text) in &message.system {
        headers.insert(header_name(name)?, value(text).as_str());
    }
    if !message.properties.is_empty() {
        let bag: Vec<String> = message
            .properties
            .iter()
            .map(|(name, text)| {
                let name = utf8_percent_encode(name, BAG).to_string();
                match text {
                    Some(text) => format!("{name}={}", utf8_percent_encode(text, BAG)),
                    None => name,
                }
            })
            .collect();
        headers.insert(APP_PROPERTIES, bag.join("&").as_str());
    }
    Ok(headers)
}

fn decode(
    message: async_nats::jetstream::message::StreamMessage,
) -> Result<StoredMessage, StoreError> {
    let text = |raw: &str| percent_decode_str(raw).decode_utf8_lossy().into_owned();
    let mut device_id = None;
    let mut module_id = None;
    let mut enqueued = None;
    let mut size = 0;
    let mut system = BTreeMap::new();
    let mut properties_in_order = Vec::new();
    for (name, values) in message.headers.iter() {
        let Some(raw) = values.first().map(|v| v.as_str()) else {
            continue;
        };
        match name.as_ref() {
            DEVICE_ID => device_id = Some(text(raw)),
            MODULE_ID => module_id = Some(text(raw)),
            ENQUEUED => enqueued = Some(raw.to_string()),
            SIZE => size = raw.parse().unwrap_or(0),
            APP_PROPERTIES => {
                properties_in_order = raw
                    .split('&')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| match pair.split_once('=') {
                        Some((name, value)) => (text(name), Some(text(value))),
                        None => (text(pair), None),
                    })
                    .collect()
            }
            // JetStream's own (direct get answers carry them).
            other if other.starts_with("Nats-") => {}
            other => {
                system.insert(other.to_string(), text(raw));
            }
        }
    }
    let device_id = device_id.ok_or_else(|| {
        StoreError::Backend(format!(
            "telemetry message {} has no {DEVICE_ID} header",
            message.sequence
        ))
    })?;
    let properties = properties_in_order
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::String)))
        .collect();
    Ok(StoredMessage {
        offset: i64::try_from(message.sequence).unwrap_or(i64::MAX),
        enqueued_time_utc: enqueued.unwrap_or_else(|| crate::time::rfc3339(message.time)),
        device_id,
        module_id,
        system_properties: system,
        properties,
        body: base64::engine::general_purpose::STANDARD.encode(&message.payload),
        properties_in_order,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_properties_exactly() {
        let message = NewMessage {
            device_id: "dev.1*".into(),
            module_id: None,
            body: b"{}".to_vec(),
            system: BTreeMap::from([
                ("message-id".to_string(), "m 1%\r\n".to_string()),
                ("content-type".to_string(), "application/json".to_string()),
            ]),
            properties: vec![
                ("a&b".into(), Some("x=y".into())),
                ("flag".into(), None),
                ("a&b".into(), Some("é".into())),
                ("empty".into(), Some(String::new())),
            ],
        };
        let headers = encode_headers(&message, message.size()).unwrap();
        let decoded = decode(async_nats::jetstream::message::StreamMessage {
            subject: "zerotouch.telemetry.x".into(),
            sequence: 9,
            headers,
            payload: message.body.clone().into(),
            time: time::OffsetDateTime::now_utc(),
        })
        .unwrap();
        assert_eq!(decoded.offset, 9);
        assert_eq!(decoded.device_id, "dev.1*");
        assert_eq!(decoded.system_properties, message.system);
        assert_eq!(decoded.properties_in_order, message.properties);
        assert_eq!(decoded.size, message.size());
        assert_eq!(decoded.body, "e30=");
    }
}
