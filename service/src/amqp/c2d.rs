//! `/messages/devicebound`: the service SDKs' cloud-to-device sender link (hub-protocol §7).
//!
//! Each message names its device in `to` (`/devices/{id}/messages/devicebound`). It goes to
//! the same queue as C2D sent over HTTPS, with its message id, correlation id, user id,
//! content type and encoding, absolute expiry and application properties (`iothub-ack` among
//! them). A queued message is accepted; one that cannot be queued is rejected with the AMQP
//! error the service SDKs map to their error types.

use fe2o3_amqp_types::definitions::{self, AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp_types::messaging::{Body, Message, MessageId};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};

use crate::hub::c2d::OutgoingMessage;
use crate::hub::error::{HubError, HubErrorCode};

/// The address of the link.
pub const ADDRESS: &str = "/messages/devicebound";

/// Why a message is refused, before or after the hub saw it.
pub fn error(condition: ErrorCondition, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

/// The AMQP error for a hub error: the conditions IoT Hub uses.
pub fn hub_error(e: &HubError) -> definitions::Error {
    let condition = match e.code {
        HubErrorCode::DeviceNotFound | HubErrorCode::NotFound => {
            ErrorCondition::AmqpError(AmqpError::NotFound)
        }
        HubErrorCode::DeviceMaximumQueueDepthExceeded => {
            ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)
        }
        HubErrorCode::MessageTooLarge => ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
        HubErrorCode::IotHubUnauthorizedAccess | HubErrorCode::Forbidden => {
            ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
        }
        HubErrorCode::ArgumentInvalid
        | HubErrorCode::ArgumentNull
        | HubErrorCode::IotHubFormatError => ErrorCondition::AmqpError(AmqpError::InvalidField),
        _ => ErrorCondition::AmqpError(AmqpError::InternalError),
    };
    error(condition, e.message.clone())
}

pub fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(text) => text.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(uuid) => {
            let bytes: &[u8] = uuid.as_ref();
            uuid::Uuid::from_slice(bytes)
                .map(|u| u.to_string())
                .unwrap_or_else(|_| hex::encode(bytes))
        }
        MessageId::Binary(bytes) => hex::encode(bytes.as_ref()),
    }
}

pub fn simple_text(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::String(text) => text.clone(),
        SimpleValue::Symbol(symbol) => symbol.as_str().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Null => return None,
        _ => return None,
    })
}

/// A message's payload: its data sections, or a string or binary value.
pub fn body_bytes(body: Body<Value>) -> Result<Vec<u8>, definitions::Error> {
    let invalid = || {
        error(
            ErrorCondition::AmqpError(AmqpError::InvalidField),
            "the body must be data, a string or binary",
        )
    };
    Ok(match body {
        Body::Data(batch) => batch
            .into_iter()
            .flat_map(|data| data.0.into_vec())
            .collect(),
        Body::Value(value) => match value.0 {
            Value::String(text) => text.into_bytes(),
            Value::Binary(bytes) => bytes.into_vec(),
            Value::Null => Vec::new(),
            _ => return Err(invalid()),
        },
        Body::Empty => Vec::new(),
        Body::Sequence(_) => return Err(invalid()),
    })
}

/// The device a message is for and the message as the hub queues it.
pub fn outgoing(
    message: Message<Body<Value>>,
) -> Result<(String, OutgoingMessage), definitions::Error> {
    let invalid = |text: &str| error(ErrorCondition::AmqpError(AmqpError::InvalidField), text);
    let properties = message.properties.unwrap_or_default();
    let to = properties.to.as_deref().ok_or_else(|| {
        invalid("the message needs `to`: /devices/{deviceId}/messages/devicebound")
    })?;
    let device = match super::link_of(to) {
        Some((super::Link::DeviceBound, device)) => device,
        _ => {
            return Err(invalid(
                "`to` must be /devices/{deviceId}/messages/devicebound",
            ));
        }
    };
    let body = body_bytes(message.body)?;
    let mut ack = None;
    let mut application = Vec::new();
    if let Some(props) = message.application_properties {
        for (name, value) in props.0 {
            let value = simple_text(&value);
            if name == "iothub-ack" {
                ack = value;
            } else {
                application.push((name, value));
            }
        }
    }
    let expiry_time_utc = properties.absolute_expiry_time.map(|t| {
        let ms = t.milliseconds();
        crate::time::rfc3339_of_unix(u64::try_from(ms / 1000).unwrap_or(0))
    });
    Ok((
        device,
        OutgoingMessage {
            body,
            message_id: properties.message_id.as_ref().map(id_text),
            correlation_id: properties.correlation_id.as_ref().map(id_text),
            user_id: properties
                .user_id
                .map(|u| String::from_utf8_lossy(u.as_ref()).into_owned()),
            content_type: properties.content_type.map(|s| s.as_str().to_string()),
            content_encoding: properties.content_encoding.map(|s| s.as_str().to_string()),
            expiry_time_utc,
            ack,
            properties: application,
        },
    ))
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::messaging::{ApplicationProperties, Data, Properties};
    use fe2o3_amqp_types::primitives::Binary;

    use super::*;

    fn message(to: Option<&str>) -> Message<Body<Value>> {
        let properties = Properties {
            to: to.map(String::from),
            message_id: Some(MessageId::String("m-1".into())),
            correlation_id: Some(MessageId::Ulong(7)),
            content_type: Some("application/json".into()),
            ..Properties::default()
        };
        Message::builder()
            .properties(properties)
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-ack", SimpleValue::String("full".into()))
                    .insert("color", SimpleValue::String("blue".into()))
                    .insert("count", SimpleValue::Int(3))
                    .build(),
            )
            .body(Body::Data(
                vec![Data(Binary::from(b"{\"a\":1}".to_vec()))].into(),
            ))
            .build()
    }

    #[test]
    fn a_service_message_becomes_the_queued_message() {
        let (device, out) =
            outgoing(message(Some("/devices/dev%201/messages/devicebound"))).unwrap();
        assert_eq!(device, "dev 1");
        assert_eq!(out.body, b"{\"a\":1}");
        assert_eq!(out.message_id.as_deref(), Some("m-1"));
        assert_eq!(out.correlation_id.as_deref(), Some("7"));
        assert_eq!(out.content_type.as_deref(), Some("application/json"));
        assert_eq!(out.ack.as_deref(), Some("full"));
        assert_eq!(
            out.properties,
            vec![
                ("color".to_string(), Some("blue".to_string())),
                ("count".to_string(), Some("3".to_string()))
            ]
        );
    }

    #[test]
    fn a_message_without_a_device_is_refused() {
        for to in [
            None,
            Some("/devices//messages/devicebound"),
            Some("/devices/a/b/messages/devicebound"),
            Some("/twins/a"),
        ] {
            let e = outgoing(message(to)).unwrap_err();
            assert_eq!(
                e.condition,
                ErrorCondition::AmqpError(AmqpError::InvalidField),
                "{to:?}"
            );
        }
    }
}
