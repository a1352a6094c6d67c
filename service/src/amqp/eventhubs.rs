//! The Event Hubs-compatible endpoint: device telemetry for the Event Hubs SDKs
//! (`azure-eventhub`, `@azure/event-hubs`), as IoT Hub's built-in endpoint serves it.
//!
//! The event hub is [`ENTITY`], with one partition, `"0"`, which is the durable telemetry log
//! itself: an event's offset and sequence number are its log offset, so every device's
//! messages land in partition 0, in the order the log committed them. Consumer groups keep no
//! state here (Event Hubs clients keep their checkpoints themselves), so any group name is
//! served, `$Default` included.
//!
//! - `$management`: READ of the hub (`com.microsoft:eventhub`) and of a partition
//!   (`com.microsoft:partition`), answered on the client's receiver link from `$management`.
//! - `/{ENTITY}/ConsumerGroups/{group}/Partitions/0`: events from the position the source's
//!   selector filter names (offset, sequence number or enqueued time; `@latest`).

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::Sender;
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value};

use crate::hub::Hub;
use crate::telemetry::StoredMessage;

/// The event hub's name: `EntityPath` in the connection string.
pub const ENTITY: &str = "zerotouch";
/// The partitions: one, the telemetry log.
pub const PARTITIONS: [&str; 1] = ["0"];
/// The management node.
pub const MANAGEMENT: &str = "$management";
/// The selector filter's key in a source's filter set.
const SELECTOR: &str = "apache.org:selector-filter:string";
/// Events read from the log per batch.
const READ_BATCH: usize = 100;
/// How long an idle partition link waits for new telemetry before it checks its grant again.
const IDLE_WAIT: Duration = Duration::from_secs(2);

/// Whether `path` names the event hub (`/zerotouch`), case-insensitively as Event Hubs.
pub fn is_entity(name: &str) -> bool {
    name.trim_matches('/').eq_ignore_ascii_case(ENTITY)
}

/// `/{ENTITY}/ConsumerGroups/{group}/Partitions/{id}` → (group, partition id).
pub fn partition_of(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [entity, groups, group, partitions, id]
            if is_entity(entity)
                && groups.eq_ignore_ascii_case("ConsumerGroups")
                && partitions.eq_ignore_ascii_case("Partitions")
                && !group.is_empty() =>
        {
            Some((group.to_string(), id.to_string()))
        }
        _ => None,
    }
}

/// Where a partition receiver starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first event with offset (= sequence number) at least this.
    Offset(i64),
    /// The first event enqueued after this many Unix milliseconds (or at, if inclusive).
    EnqueuedAfter { millis: i64, inclusive: bool },
    /// Only events enqueued from now on.
    Latest,
}

/// The selector filter of a source (`amqp.annotation.x-opt-offset > '41'`, …); none means
/// the start of the partition.
pub fn start_of(selector: Option<&str>) -> Result<Start, String> {
    let Some(selector) = selector else {
        return Ok(Start::Offset(0));
    };
    let malformed = || format!("unsupported selector {selector:?}");
    let rest = selector
        .trim()
        .strip_prefix("amqp.annotation.x-opt-")
        .ok_or_else(malformed)?;
    let (field, rest) = rest.split_once(char::is_whitespace).ok_or_else(malformed)?;
    let rest = rest.trim_start();
    let (inclusive, value) = if let Some(v) = rest.strip_prefix(">=") {
        (true, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (false, v)
    } else {
        return Err(malformed());
    };
    let value = value.trim().trim_matches('\'');
    if value == "@latest" {
        return Ok(Start::Latest);
    }
    let number: i64 = value.parse().map_err(|_| malformed())?;
    match field {
        "offset" | "sequence-number" => {
            let first = if inclusive {
                number
            } else {
                number.saturating_add(1)
            };
            Ok(Start::Offset(first.max(0)))
        }
        "enqueued-time" => Ok(Start::EnqueuedAfter {
            millis: number,
            inclusive,
        }),
        _ => Err(malformed()),
    }
}

/// The selector string in a source's filter set, if any.
pub fn selector_of(filter: Option<&OrderedMap<Symbol, Value>>) -> Option<String> {
    fn text(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Described(described) => text(&described.value),
            _ => None,
        }
    }
    let filter = filter?;
    filter
        .iter()
        .find(|(key, _)| key.as_str() == SELECTOR)
        .or_else(|| filter.iter().next())
        .and_then(|(_, value)| text(value))
}

fn millis_of(rfc3339: &str) -> i64 {
    crate::time::parse_rfc3339(rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// One stored telemetry message as an event: the device's body, its system properties in the
/// AMQP properties and the `iothub-*` annotations, its application properties, and the
/// Event Hubs annotations (`x-opt-offset`, `x-opt-sequence-number`, `x-opt-enqueued-time`).
pub fn event(message: &StoredMessage) -> Message<Body<Value>> {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD
        .decode(&message.body)
        .unwrap_or_default();
    let system = &message.system_properties;
    let text = |name: &str| system.get(name).cloned();
    let properties = Properties {
        message_id: text("message-id").map(MessageId::String),
        correlation_id: text("correlation-id").map(MessageId::String),
        user_id: text("user-id").map(|u| Binary::from(u.into_bytes())),
        content_type: text("content-type").map(Symbol::from),
        content_encoding: text("content-encoding").map(Symbol::from),
        ..Properties::default()
    };
    let enqueued = Timestamp::from_milliseconds(millis_of(&message.enqueued_time_utc));
    let mut annotations = MessageAnnotations::builder()
        .insert(
            Symbol::from("x-opt-sequence-number"),
            Value::Long(message.offset),
        )
        .insert(
            Symbol::from("x-opt-offset"),
            Value::String(message.offset.to_string()),
        )
        .insert(
            Symbol::from("x-opt-enqueued-time"),
            Value::Timestamp(enqueued.clone()),
        )
        .insert(
            Symbol::from("iothub-enqueuedtime"),
            Value::Timestamp(enqueued),
        )
        .insert(
            Symbol::from("iothub-message-source"),
            Value::String("Telemetry".into()),
        );
    for (name, value) in system {
        if name.starts_with("iothub-") {
            annotations =
                annotations.insert(Symbol::from(name.as_str()), Value::String(value.clone()));
        }
    }
    let mut application = ApplicationProperties::builder();
    for (name, value) in &message.properties_in_order {
        application = application.insert(
            name.clone(),
            value.clone().map_or(SimpleValue::Null, SimpleValue::String),
        );
    }
    Message::builder()
        .properties(properties)
        .message_annotations(annotations.build())
        .application_properties(application.build())
        .body(Body::Data(vec![Data(Binary::from(body))].into()))
        .build()
}

/// The first offset of an event enqueued after `millis` (or at it, if `inclusive`): a scan
/// from the start of the log, as the log has no time index.
async fn offset_after(hub: &Hub, millis: i64, inclusive: bool) -> Result<i64, String> {
    let mut from = 0;
    loop {
        let batch = hub
            .telemetry
            .read(from, crate::telemetry::MAX_READ, None)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = batch.last() else {
            return Ok(hub.telemetry.last_offset() + 1);
        };
        if let Some(found) = batch.iter().find(|m| {
            let at = millis_of(&m.enqueued_time_utc);
            at > millis || (inclusive && at == millis)
        }) {
            return Ok(found.offset);
        }
        from = last.offset + 1;
    }
}

/// Sends the partition's events from `start` until the link or the connection goes away, or
/// the grant that allowed it expires (`allowed`).
pub async fn serve_partition(
    mut sender: Sender,
    hub: Arc<Hub>,
    start: Start,
    allowed: impl Fn() -> bool,
) {
    let mut next = match start {
        Start::Offset(offset) => offset,
        Start::Latest => hub.telemetry.last_offset() + 1,
        Start::EnqueuedAfter { millis, inclusive } => {
            match offset_after(&hub, millis, inclusive).await {
                Ok(offset) => offset,
                Err(e) => {
                    tracing::warn!(error = %e, "Event Hubs: reading the log failed");
                    let _ = sender
                        .close_with_error(super::c2d::error(
                            ErrorCondition::AmqpError(AmqpError::InternalError),
                            "the telemetry log cannot be read now",
                        ))
                        .await;
                    return;
                }
            }
        }
    };
    loop {
        if !allowed() {
            let _ = sender
                .close_with_error(super::c2d::error(
                    ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                    "the token that allowed this link has expired",
                ))
                .await;
            return;
        }
        let batch = match hub.telemetry.read(next, READ_BATCH, None).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "Event Hubs: reading the log failed");
                tokio::time::sleep(IDLE_WAIT).await;
                continue;
            }
        };
        if batch.is_empty() {
            hub.telemetry.wait_for(next, IDLE_WAIT).await;
            continue;
        }
        // The batch goes out without waiting message by message (link credit still applies);
        // then its outcomes are collected.
        let mut deliveries = Vec::with_capacity(batch.len());
        for message in batch {
            next = message.offset + 1;
            match sender.send_batchable(event(&message)).await {
                Ok(delivery) => deliveries.push(delivery),
                Err(e) => {
                    tracing::info!(error = %e, "Event Hubs: a partition link ended");
                    return;
                }
            }
        }
        for delivery in deliveries {
            if let Err(e) = delivery.await {
                tracing::info!(error = %e, "Event Hubs: a partition link ended");
                return;
            }
        }
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::String(k.to_string()), v))
            .collect(),
    )
}

/// The answer to a `$management` request: status, description and body.
pub async fn manage(hub: &Hub, request: &Message<Body<Value>>) -> (i32, String, Value) {
    use super::cbs::property;
    if property(request, "operation") != Some("READ") {
        return (
            400,
            "only the READ operation is supported".into(),
            Value::Null,
        );
    }
    let name = property(request, "name").unwrap_or_default();
    if !is_entity(name) {
        return (
            404,
            format!("no event hub {name:?} here; this hub's is {ENTITY:?}"),
            Value::Null,
        );
    }
    let created_at = Value::Timestamp(Timestamp::from_milliseconds(0));
    match property(request, "type") {
        Some("com.microsoft:eventhub") => (
            200,
            "OK".into(),
            map(vec![
                ("name", Value::String(ENTITY.into())),
                ("type", Value::String("com.microsoft:eventhub".into())),
                ("created_at", created_at),
                ("partition_count", Value::Int(PARTITIONS.len() as i32)),
                (
                    "partition_ids",
                    Value::Array(
                        PARTITIONS
                            .iter()
                            .map(|p| Value::String(p.to_string()))
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                ),
            ]),
        ),
        Some("com.microsoft:partition") => {
            let partition = property(request, "partition").unwrap_or_default();
            if !PARTITIONS.contains(&partition) {
                return (
                    404,
                    format!("no partition {partition:?}; this event hub has partition \"0\""),
                    Value::Null,
                );
            }
            let first = hub.telemetry.read(0, 1, None).await;
            let last_offset = hub.telemetry.last_offset();
            let last = hub.telemetry.read(last_offset, 1, None).await;
            let (first, last) = match (first, last) {
                (Ok(first), Ok(last)) => (first, last),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "Event Hubs: reading the log failed");
                    return (
                        503,
                        "the telemetry log cannot be read now".into(),
                        Value::Null,
                    );
                }
            };
            let empty = first.is_empty();
            let (begin, last_sequence, last_time) = match (first.first(), last.first()) {
                (Some(first), Some(last)) => (
                    first.offset,
                    last.offset,
                    millis_of(&last.enqueued_time_utc),
                ),
                _ => (-1, -1, 0),
            };
            (
                200,
                "OK".into(),
                map(vec![
                    ("name", Value::String(ENTITY.into())),
                    ("type", Value::String("com.microsoft:partition".into())),
                    ("partition", Value::String(partition.into())),
                    ("begin_sequence_number", Value::Long(begin)),
                    ("last_enqueued_sequence_number", Value::Long(last_sequence)),
                    (
                        "last_enqueued_offset",
                        Value::String(last_sequence.to_string()),
                    ),
                    (
                        "last_enqueued_time_utc",
                        Value::Timestamp(Timestamp::from_milliseconds(last_time)),
                    ),
                    ("is_partition_empty", Value::Bool(empty)),
                ]),
            )
        }
        other => (
            400,
            format!("unknown management type {other:?}"),
            Value::Null,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_addresses_parse() {
        assert_eq!(
            partition_of("/zerotouch/ConsumerGroups/$Default/Partitions/0"),
            Some(("$Default".into(), "0".into()))
        );
        assert_eq!(
            partition_of("/ZeroTouch/consumergroups/billing/partitions/0"),
            Some(("billing".into(), "0".into()))
        );
        assert_eq!(
            partition_of("/other/ConsumerGroups/$Default/Partitions/0"),
            None
        );
        assert_eq!(
            partition_of("/zerotouch/ConsumerGroups//Partitions/0"),
            None
        );
        assert_eq!(partition_of("/zerotouch"), None);
    }

    #[test]
    fn selectors_name_the_first_event() {
        assert_eq!(start_of(None), Ok(Start::Offset(0)));
        assert_eq!(
            start_of(Some("amqp.annotation.x-opt-offset > '-1'")),
            Ok(Start::Offset(0))
        );
        assert_eq!(
            start_of(Some("amqp.annotation.x-opt-offset > '41'")),
            Ok(Start::Offset(42))
        );
        assert_eq!(
            start_of(Some("amqp.annotation.x-opt-offset >= '41'")),
            Ok(Start::Offset(41))
        );
        assert_eq!(
            start_of(Some("amqp.annotation.x-opt-sequence-number > '7'")),
            Ok(Start::Offset(8))
        );
        assert_eq!(
            start_of(Some("amqp.annotation.x-opt-offset > '@latest'")),
            Ok(Start::Latest)
        );
        assert_eq!(
            start_of(Some(
                "amqp.annotation.x-opt-enqueued-time > '1700000000000'"
            )),
            Ok(Start::EnqueuedAfter {
                millis: 1_700_000_000_000,
                inclusive: false
            })
        );
        assert!(start_of(Some("amqp.annotation.x-opt-offset < '3'")).is_err());
        assert!(start_of(Some("sys.something > '3'")).is_err());
        assert!(start_of(Some("amqp.annotation.x-opt-offset > 'abc'")).is_err());
    }
}
