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
//! - both links of `/devices/{id}/twin`: GET, reported-properties PATCH, and the desired-patch
//!   subscription (PUT/DELETE `/notifications/twin/properties/desired`), whose patches go out
//!   on the device's receiver link without a correlation id.
//!
//! - both links of `/devices/{id}/methods/devicebound`: direct method calls (the request id
//!   as correlation id, the name in `IoThub-methodname`) and the device's answers
//!   (`IoThub-status`).
//!
//! An X.509 device presents its certificate in the TLS handshake and puts no token: its first
//! device link authenticates the certificate for the device the link names.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Value};

use super::c2d::{body_bytes, error, id_text, simple_text};
use crate::hub::Hub;
use crate::hub::c2d::{QueuedMessage, Settlement};

/// How often an idle C2D link looks for a message.
const C2D_POLL: Duration = Duration::from_millis(500);

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
    auth_method: &'static str,
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
            Ok(body) => {
                match crate::hub::mqtt::telemetry_message(&device_id, auth_method, body, bag) {
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
                }
            }
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

/// What a twin request asks, from its `operation` and `resource` annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOperation {
    Get,
    PatchReported,
    Subscribe,
    Unsubscribe,
}

fn annotation<'a>(message: &'a Message<Body<Value>>, name: &str) -> Option<&'a str> {
    let annotations = message.message_annotations.as_ref()?;
    annotations
        .0
        .iter()
        .find_map(|(key, value)| match (key, value) {
            (OwnedKey::Symbol(key), Value::String(text)) if key.as_str() == name => {
                Some(text.as_str())
            }
            (OwnedKey::Symbol(key), Value::Symbol(text)) if key.as_str() == name => {
                Some(text.as_str())
            }
            _ => None,
        })
}

/// The operation of a twin request; `None` for one we do not serve.
pub fn twin_operation(message: &Message<Body<Value>>) -> Option<TwinOperation> {
    let resource = annotation(message, "resource").unwrap_or_default();
    match (annotation(message, "operation")?, resource) {
        ("GET", "" | "/") => Some(TwinOperation::Get),
        ("PATCH", "/properties/reported") => Some(TwinOperation::PatchReported),
        ("PUT", "/notifications/twin/properties/desired") => Some(TwinOperation::Subscribe),
        ("DELETE", "/notifications/twin/properties/desired") => Some(TwinOperation::Unsubscribe),
        _ => None,
    }
}

/// The answer to a twin request: its correlation id, `status` (and `version`) annotations, and
/// a JSON body if any.
pub fn twin_answer(
    request: &Message<Body<Value>>,
    status: i32,
    version: Option<i64>,
    body: Option<Vec<u8>>,
) -> Message<Body<Value>> {
    let properties = Properties {
        correlation_id: request
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone()),
        ..Properties::default()
    };
    let mut annotations =
        MessageAnnotations::builder().insert(Symbol::from("status"), Value::Int(status));
    if let Some(version) = version {
        annotations = annotations.insert(Symbol::from("version"), Value::Long(version));
    }
    let body = match body {
        Some(bytes) => Body::Data(vec![Data(Binary::from(bytes))].into()),
        None => Body::Empty,
    };
    Message::builder()
        .properties(properties)
        .message_annotations(annotations.build())
        .body(body)
        .build()
}

/// A desired-properties patch pushed to the device: no correlation id, the patch as body.
pub fn desired_delta(patch: &serde_json::Value) -> Message<Body<Value>> {
    Message::builder()
        .body(Body::Data(
            vec![Data(Binary::from(patch.to_string().into_bytes()))].into(),
        ))
        .build()
}

/// Serves a twin GET or reported-properties PATCH of `device_id` as over MQTT: the same
/// store operations, the same 429 beyond the hub's twin capacity, the same error bodies.
pub async fn twin_request(
    hub: &Hub,
    device_id: &str,
    request: &Message<Body<Value>>,
) -> Message<Body<Value>> {
    use crate::hub::mqtt::{THROTTLED, error_body, refusal_body};
    let failed = |e: &crate::hub::error::HubError| {
        twin_answer(
            request,
            i32::from(e.status().as_u16()),
            None,
            Some(error_body(e)),
        )
    };
    let Some(_turn) = hub.twin_slot(std::time::Instant::now()).await else {
        return twin_answer(request, 429, None, Some(refusal_body(THROTTLED)));
    };
    match twin_operation(request) {
        Some(TwinOperation::Get) => match hub.twin(device_id).await {
            Ok(twin) => {
                crate::hub::HubMetrics::count(&hub.metrics.twin_operations, 1);
                let view = twin.device_view().to_string().into_bytes();
                twin_answer(request, 200, None, Some(view))
            }
            Err(e) => failed(&e),
        },
        Some(TwinOperation::PatchReported) => {
            let patch = body_bytes(request.body.clone())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .filter(serde_json::Value::is_object);
            let Some(patch) = patch else {
                let why = refusal_body("the reported patch must be a JSON object");
                return twin_answer(request, 400, None, Some(why));
            };
            match hub.patch_reported(device_id, patch).await {
                Ok(version) => {
                    crate::hub::HubMetrics::count(&hub.metrics.twin_operations, 1);
                    twin_answer(request, 204, i64::try_from(version).ok(), None)
                }
                Err(e) => failed(&e),
            }
        }
        _ => twin_answer(
            request,
            404,
            None,
            Some(refusal_body("no such twin operation")),
        ),
    }
}

/// A method call as the device SDK receives it: the request id as correlation id, the name in
/// `IoThub-methodname`, the payload as data.
pub fn method_call(call: &crate::hub::methods::Invocation) -> Message<Body<Value>> {
    let properties = Properties {
        correlation_id: Some(MessageId::String(call.rid.clone())),
        ..Properties::default()
    };
    let application = ApplicationProperties::builder()
        .insert(
            "IoThub-methodname",
            SimpleValue::String(call.method_name.clone()),
        )
        .build();
    Message::builder()
        .properties(properties)
        .application_properties(application)
        .body(Body::Data(
            vec![Data(Binary::from(call.body.clone().into_bytes()))].into(),
        ))
        .build()
}

/// Sends the device's method calls until the link or the connection ends.
pub async fn serve_method_calls(mut sender: Sender, hub: Arc<Hub>, device_id: String) {
    let mut calls = hub.methods.listen(&device_id);
    while let Some(call) = calls.recv().await {
        if let Err(e) = super::send(&mut sender, method_call(&call)).await {
            tracing::info!(device_id, error = %e, "AMQP methods link ended");
            return;
        }
    }
}

/// Takes the device's method answers (correlation id = request id, `IoThub-status`, JSON
/// payload) until the link or the connection ends.
pub async fn serve_method_answers(mut receiver: Receiver, hub: Arc<Hub>, device_id: String) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let _ = receiver.accept(&delivery).await;
        let message = delivery.into_message();
        let rid = message
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(id_text);
        let status = message
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get("IoThub-status"))
            .and_then(simple_text)
            .and_then(|s| s.parse::<i64>().ok());
        let (Some(rid), Some(status)) = (rid, status) else {
            tracing::info!(device_id, "a malformed AMQP method answer was ignored");
            continue;
        };
        let body = body_bytes(message.body).unwrap_or_default();
        let payload = if body.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
            })
        };
        let answer = crate::hub::methods::MethodResponse { status, payload };
        if !hub.methods.complete(&device_id, &rid, answer) {
            tracing::debug!(device_id, rid, "late or unknown method answer");
        }
    }
}

/// Authenticates the TLS client certificate of a connection as `device_id` (a self-signed
/// or CA-signed X.509 device), as MQTT and HTTPS do; the Unix time the certificate expires.
pub async fn authenticate_x509(
    hub: &Hub,
    device_id: &str,
    peer: &crate::tls::PeerCertificates,
) -> Result<u64, crate::hub::auth::DeviceAuthFailure> {
    use crate::hub::auth::{self, DeviceAuthFailure};
    let (device, _) = hub
        .device(device_id)
        .await
        .map_err(|_| DeviceAuthFailure::StoreUnavailable)?
        .ok_or(DeviceAuthFailure::UnknownDevice)?;
    if device.status == crate::hub::device::DeviceStatus::Disabled {
        return Err(DeviceAuthFailure::Disabled);
    }
    let bundle = hub.trust_bundle();
    let trusted = crate::db::blocking(hub.store(), move |s| auth::trusted_cas(s, &bundle))
        .await
        .map_err(|_| DeviceAuthFailure::StoreUnavailable)?;
    let now = crate::time::now_unix();
    auth::verify_device_certificate(&device, &peer.leaf, &peer.chain, &trusted, now as i64)?;
    let leaf = peer.leaf.clone();
    let revoked = crate::db::blocking(hub.store(), move |s| crate::pki::revocation_of(s, &leaf))
        .await
        .map_err(|_| DeviceAuthFailure::StoreUnavailable)?;
    if revoked.is_some() {
        return Err(DeviceAuthFailure::Revoked);
    }
    Ok(
        zerotouch_attestation::x509::Certificate::from_der(&peer.leaf)
            .ok()
            .and_then(|c| u64::try_from(c.not_after_unix()).ok())
            .unwrap_or(now),
    )
}
