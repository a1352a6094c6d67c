//! Devices over AMQP (`azure-iot-device-amqp`): telemetry and cloud-to-device messages.
//!
//! A device puts its SAS token (`sr = {host}/devices/{id}`, signed with its key) on `$cbs`,
//! then attaches:
//! - a sender link to `/devices/{id}/messages/events`: each message is stored in the telemetry
//!   log exactly as one sent over MQTT, and accepted once it is durable;
//! - a receiver link from `/devices/{id}/messages/devicebound`: the device's C2D queue (shared
//!   with MQTT and HTTPS), one message at a time; its outcome settles the message (accepted:
//!   complete, rejected: reject, released or modified: abandon).
//!
//! Twins and direct methods over AMQP, and X.509 (SASL EXTERNAL) devices, are not served.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Value};

use super::c2d::{body_bytes, error, id_text, simple_text};
use crate::hub::Hub;
use crate::hub::c2d::{QueuedMessage, Settlement};

/// How often an idle C2D link looks for a message.
const C2D_POLL: Duration = Duration::from_millis(500);

fn device_of(path: &str, suffix: &str) -> Option<String> {
    let id = path
        .trim_start_matches('/')
        .strip_prefix("devices/")?
        .strip_suffix(suffix)?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .ok()
        .map(|id| id.into_owned())
}

/// `/devices/{id}/messages/events` → the device id.
pub fn events_of(path: &str) -> Option<String> {
    device_of(path, "/messages/events")
}

/// `/devices/{id}/messages/devicebound` → the device id.
pub fn devicebound_of(path: &str) -> Option<String> {
    device_of(path, "/messages/devicebound")
}

/// Whether the device is registered and enabled.
pub async fn enabled(hub: &Hub, device_id: &str) -> bool {
    matches!(
        hub.device(device_id).await,
        Ok(Some((device, _))) if device.status != crate::hub::device::DeviceStatus::Disabled
    )
}

/// A device message's property bag, in the MQTT shape `telemetry_message` takes.
fn bag_of(message: &Message<Body<Value>>) -> Vec<(String, Option<String>)> {
    let mut bag = Vec::new();
    if let Some(p) = &message.properties {
        let system = [
            ("$.mid", p.message_id.as_ref().map(id_text)),
            ("$.cid", p.correlation_id.as_ref().map(id_text)),
            (
                "$.uid",
                p.user_id
                    .as_ref()
                    .map(|u| String::from_utf8_lossy(u.as_ref()).into_owned()),
            ),
            (
                "$.ct",
                p.content_type.as_ref().map(|s| s.as_str().to_string()),
            ),
            (
                "$.ce",
                p.content_encoding.as_ref().map(|s| s.as_str().to_string()),
            ),
        ];
        for (key, value) in system {
            if let Some(value) = value {
                bag.push((key.to_string(), Some(value)));
            }
        }
    }
    if let Some(application) = &message.application_properties {
        for (name, value) in application.0.iter() {
            bag.push((name.clone(), simple_text(value)));
        }
    }
    bag
}

/// Stores the device's telemetry until the link, the connection or the grant ends.
pub async fn serve_events(
    mut receiver: Receiver,
    hub: Arc<Hub>,
    device_id: String,
    allowed: impl Fn() -> bool,
) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        if !allowed() {
            let e = error(
                ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                "the token that allowed this link has expired",
            );
            let _ = receiver.reject(&delivery, e.clone()).await;
            let _ = receiver.close_with_error(e).await;
            return;
        }
        let bag = bag_of(delivery.message());
        let stored = match body_bytes(delivery.message().body.clone()) {
            Err(e) => Err(e),
            Ok(body) => match crate::hub::mqtt::telemetry_message(&device_id, "sas", body, bag) {
                Err(why) => Err(error(
                    ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
                    why,
                )),
                Ok(message) => {
                    let size = message.body.len() as u64;
                    hub.telemetry
                        .append(message)
                        .await
                        .map(|_| size)
                        .map_err(|e| {
                            tracing::warn!(device_id, error = %e, "AMQP telemetry was not stored");
                            error(
                                ErrorCondition::AmqpError(AmqpError::InternalError),
                                "the message could not be stored; send it again",
                            )
                        })
                }
            },
        };
        let disposed = match stored {
            Ok(size) => {
                crate::hub::HubMetrics::count(&hub.metrics.messages_in, 1);
                crate::hub::HubMetrics::count(&hub.metrics.bytes_in, size);
                hub.touch(&device_id);
                receiver.accept(&delivery).await
            }
            Err(e) => receiver.reject(&delivery, e).await,
        };
        if disposed.is_err() {
            return;
        }
    }
}

/// A queued C2D message as the device SDK receives it.
fn c2d_message(device_id: &str, queued: &QueuedMessage) -> Message<Body<Value>> {
    let properties = Properties {
        message_id: Some(MessageId::String(queued.message_id.clone())),
        correlation_id: queued.correlation_id.clone().map(MessageId::String),
        user_id: queued.user_id.clone().map(|u| Binary::from(u.into_bytes())),
        to: Some(format!("/devices/{device_id}/messages/devicebound")),
        content_type: queued.content_type.clone().map(Symbol::from),
        content_encoding: queued.content_encoding.clone().map(Symbol::from),
        ..Properties::default()
    };
    let mut application = ApplicationProperties::builder();
    for (name, value) in &queued.properties {
        application = application.insert(
            name.clone(),
            value.clone().map_or(SimpleValue::Null, SimpleValue::String),
        );
    }
    if let Some(ack) = &queued.ack {
        application = application.insert("iothub-ack", SimpleValue::String(ack.clone()));
    }
    Message::builder()
        .properties(properties)
        .application_properties(application.build())
        .body(Body::Data(
            vec![Data(Binary::from(queued.body_bytes()))].into(),
        ))
        .build()
}

/// Delivers the device's C2D queue, one message at a time, until the link, the connection or
/// the grant ends; each outcome settles its message.
pub async fn serve_c2d(
    mut sender: Sender,
    hub: Arc<Hub>,
    device_id: String,
    allowed: impl Fn() -> bool,
) {
    loop {
        if !allowed() {
            let _ = sender
                .close_with_error(error(
                    ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                    "the token that allowed this link has expired",
                ))
                .await;
            return;
        }
        let locked = match hub.receive_c2d(&device_id).await {
            Ok(Some(locked)) => locked,
            Ok(None) => {
                tokio::time::sleep(C2D_POLL).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(device_id, error = %e, "AMQP C2D: reading the queue failed");
                tokio::time::sleep(C2D_POLL).await;
                continue;
            }
        };
        let outcome = super::send(&mut sender, c2d_message(&device_id, &locked.message)).await;
        let (how, ended) = match outcome {
            Ok(Outcome::Accepted(_)) => (Settlement::Complete, false),
            Ok(Outcome::Rejected(_)) => (Settlement::Reject, false),
            Ok(_) => (Settlement::Abandon, false),
            // The link went away with the message out: it is available again at once.
            Err(_) => (Settlement::Abandon, true),
        };
        if let Err(e) = hub.settle_c2d(&device_id, locked.lock_token(), how).await {
            tracing::info!(device_id, error = %e, "AMQP C2D: settling failed");
        }
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_name_their_device() {
        assert_eq!(
            events_of("/devices/d-1/messages/events"),
            Some("d-1".into())
        );
        assert_eq!(
            events_of("devices/d%201/messages/events"),
            Some("d 1".into())
        );
        assert_eq!(
            devicebound_of("/devices/d-1/messages/devicebound"),
            Some("d-1".into())
        );
        assert_eq!(events_of("/devices//messages/events"), None);
        assert_eq!(events_of("/devices/a/b/messages/events"), None);
        assert_eq!(devicebound_of("/devices/d-1/messages/events"), None);
    }
}
