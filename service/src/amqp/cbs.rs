//! Claims-based security (CBS): how an AMQP client proves who it is after an anonymous SASL
//! handshake. It sends `put-token` requests on a link to `$cbs`, and gets the answer on a
//! link from `$cbs` (hub-protocol §7; the Azure service SDKs always do this).
//!
//! A request's application properties are `operation = "put-token"`, `type` (a SAS token:
//! `servicebus.windows.net:sastoken` or `azure-devices.net:sastoken`) and `name` (the
//! audience), and its body is the token as an AMQP string. The answer correlates with the
//! request's message id and carries `status-code` (200, 400 or 401) and `status-description`.
//! A token that verifies becomes a [`Grant`] of the connection until it expires. Every link
//! and every message on it is checked against the grants.

use std::sync::{Arc, Mutex};

use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use zerotouch_attestation::symmetric_key::SasToken;

use crate::auth::{Caller, Rights};
use crate::hub::Hub;

/// The address of the CBS node.
pub const NODE: &str = "$cbs";

/// What one verified token allows, until when.
#[derive(Debug, Clone)]
pub struct Grant {
    pub audience: String,
    /// The path the token's `sr` is scoped to (`""`: the whole hub).
    pub scope: String,
    pub caller: Caller,
    /// Unix seconds.
    pub expires: u64,
}

/// The grants of one connection.
#[derive(Debug, Default)]
pub struct Grants {
    grants: Mutex<Vec<Grant>>,
}

impl Grants {
    pub fn add(&self, grant: Grant) {
        if let Ok(mut grants) = self.grants.lock() {
            grants.retain(|g| g.audience != grant.audience);
            grants.push(grant);
        }
    }

    /// The first live grant holding `needed` whose scope covers `path` (a link's node),
    /// compared case-insensitively: Event Hubs clients lower-case the path they sign
    /// (`/zerotouch/consumergroups/$Default`) but not the one they attach. No AMQP node here
    /// is per device, so case carries no identity.
    pub fn holding(&self, needed: Rights, now_unix: u64, path: &str) -> Option<Grant> {
        let grants = self.grants.lock().ok()?;
        // rhea attaches `zerotouch/…`, pyamqp `/zerotouch/…`.
        let path = format!("/{}", path.trim_start_matches('/').to_ascii_lowercase());
        grants
            .iter()
            .find(|g| {
                g.expires >= now_unix
                    && g.caller.rights.contains(needed)
                    && crate::hub::auth::segment_prefix(&g.scope.to_ascii_lowercase(), &path)
            })
            .cloned()
    }
}

/// The answer to one CBS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: i32,
    pub description: String,
}

impl Answer {
    fn new(status: i32, description: impl Into<String>) -> Answer {
        Answer {
            status,
            description: description.into(),
        }
    }
}

/// An application property of a request, as text.
pub(super) fn property<'a>(message: &'a Message<Body<Value>>, name: &str) -> Option<&'a str> {
    let properties = message.application_properties.as_ref()?;
    match properties.0.get(name)? {
        SimpleValue::String(text) => Some(text),
        SimpleValue::Symbol(symbol) => Some(symbol.as_str()),
        _ => None,
    }
}

fn body_text(message: &Message<Body<Value>>) -> Option<&str> {
    match &message.body {
        Body::Value(value) => match &value.0 {
            Value::String(text) => Some(text),
            _ => None,
        },
        _ => None,
    }
}

/// Handles one CBS request: a verified token becomes a grant of `grants`.
pub async fn handle(hub: &Arc<Hub>, grants: &Grants, message: &Message<Body<Value>>) -> Answer {
    match property(message, "operation") {
        Some("put-token") => {}
        Some(other) => return Answer::new(400, format!("unknown CBS operation {other:?}")),
        None => return Answer::new(400, "a CBS request needs the operation property"),
    }
    let kind = property(message, "type").unwrap_or_default();
    if !kind.ends_with(":sastoken") {
        return Answer::new(
            400,
            format!("token type {kind:?} is not supported: send a SAS token"),
        );
    }
    let Some(audience) = property(message, "name") else {
        return Answer::new(
            400,
            "a put-token request needs the name (audience) property",
        );
    };
    let Some(text) = body_text(message) else {
        return Answer::new(400, "the token must be the body, as an AMQP string");
    };
    let token = match SasToken::parse(text) {
        Ok(token) => token,
        Err(e) => return Answer::new(400, format!("malformed SAS token: {e}")),
    };
    if token.skn.is_none() {
        return device_token(hub, grants, audience, &token).await;
    }
    let name = token.skn.clone().unwrap_or_default();
    let policy =
        match crate::db::blocking(hub.store(), move |s| crate::hub::auth::policy(s, &name)).await {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!(error = %e, "CBS: reading the policy failed");
                return Answer::new(503, "the service cannot check tokens right now");
            }
        };
    let now = crate::time::now_unix();
    // Neither a right nor a path is asked here: each link asks for its own when it attaches.
    let scope = token
        .resource_decoded()
        .map(|r| {
            crate::hub::auth::split_resource(&r)
                .1
                .trim_end_matches('/')
                .to_string()
        })
        .unwrap_or_default();
    // Event Hubs clients sign for `sb://…` with the key's text (Service Bus's convention).
    let text_key = token
        .resource_decoded()
        .is_ok_and(|r| r.to_ascii_lowercase().starts_with("sb://"));
    match crate::hub::auth::verify_policy_token(
        &token,
        policy.as_ref(),
        hub,
        &scope,
        Rights::default(),
        now,
        text_key,
    ) {
        Ok(caller) => {
            tracing::info!(principal = %caller.principal, audience, "AMQP: CBS token accepted");
            grants.add(Grant {
                audience: audience.to_string(),
                scope,
                caller,
                expires: token.se,
            });
            Answer::new(200, "OK")
        }
        Err(e) => {
            hub.metrics.auth_failure("amqp_cbs");
            Answer::new(401, e.message)
        }
    }
}

/// A device's own token (no `skn`; `sr = {host}/devices/{id}`, signed with its key): a grant
/// of `DeviceConnect` for that device's paths.
async fn device_token(hub: &Arc<Hub>, grants: &Grants, audience: &str, token: &SasToken) -> Answer {
    let resource = token.resource_decoded().unwrap_or_default();
    let (_, path) = crate::hub::auth::split_resource(&resource);
    let Some(device_id) = path
        .strip_prefix("/devices/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
    else {
        return Answer::new(
            401,
            "a token without skn must be a device's: sr = {host}/devices/{id}",
        );
    };
    let device = match hub.device(&device_id).await {
        Ok(Some((device, _))) => device,
        Ok(None) => {
            hub.metrics.auth_failure("amqp_cbs");
            return Answer::new(401, format!("device {device_id} is not registered"));
        }
        Err(e) => {
            tracing::warn!(error = %e, "CBS: reading the device failed");
            return Answer::new(503, "the service cannot check tokens right now");
        }
    };
    let now = crate::time::now_unix();
    match crate::hub::auth::verify_device_token(token, &device, None, hub, now) {
        Ok(_) => {
            tracing::info!(device_id, audience, "AMQP: CBS device token accepted");
            grants.add(Grant {
                audience: audience.to_string(),
                scope: format!("/devices/{device_id}"),
                caller: Caller {
                    principal: format!("device:{device_id}"),
                    rights: Rights::DEVICE_CONNECT,
                },
                expires: token.se,
            });
            Answer::new(200, "OK")
        }
        Err(failure) => {
            hub.metrics.auth_failure(failure.reason());
            Answer::new(401, format!("device refused: {}", failure.reason()))
        }
    }
}

/// The answer as a message for the client's `$cbs` receiver link.
pub fn reply(request: &Message<Body<Value>>, answer: &Answer) -> Message<Body<Value>> {
    response(request, answer.status, &answer.description, Value::Null)
}

/// The answer to a request on a request-response node (`$cbs`, `$management`): correlated
/// with the request's message id, addressed to its `reply-to`, with `status-code` and
/// `status-description`, and `body`.
pub fn response(
    request: &Message<Body<Value>>,
    status: i32,
    description: &str,
    body: Value,
) -> Message<Body<Value>> {
    let request_properties = request.properties.as_ref();
    let correlation_id: Option<MessageId> = request_properties
        .and_then(|p| p.message_id.clone())
        .or_else(|| request_properties.and_then(|p| p.correlation_id.clone()));
    let properties = Properties {
        correlation_id,
        to: request_properties.and_then(|p| p.reply_to.clone()),
        ..Properties::default()
    };
    let application_properties = ApplicationProperties::builder()
        .insert("status-code", SimpleValue::Int(status))
        .insert(
            "status-description",
            SimpleValue::String(description.to_string()),
        )
        .build();
    Message::builder()
        .properties(properties)
        .application_properties(application_properties)
        .body(Body::Value(AmqpValue(body)))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(scope: &str, rights: Rights, expires: u64) -> Grant {
        Grant {
            audience: format!("sb://hub{scope}"),
            scope: scope.into(),
            caller: Caller {
                principal: "hub-policy:service".into(),
                rights,
            },
            expires,
        }
    }

    /// A grant covers its scope and what is under it, whatever the case or leading slash of
    /// the link's address; not other paths, missing rights or after it expires.
    #[test]
    fn grants_cover_their_scope_and_rights_until_they_expire() {
        let grants = Grants::default();
        grants.add(grant(
            "/zerotouch/consumergroups/$Default",
            Rights::SERVICE_CONNECT,
            100,
        ));
        let partition = "zerotouch/ConsumerGroups/$Default/Partitions/0";
        assert!(
            grants
                .holding(Rights::SERVICE_CONNECT, 50, partition)
                .is_some()
        );
        assert!(
            grants
                .holding(Rights::SERVICE_CONNECT, 101, partition)
                .is_none()
        );
        assert!(
            grants
                .holding(Rights::REGISTRY_READ, 50, partition)
                .is_none()
        );
        assert!(
            grants
                .holding(Rights::SERVICE_CONNECT, 50, "/messages/devicebound")
                .is_none()
        );
        grants.add(grant("", Rights::SERVICE_CONNECT, 100));
        assert!(
            grants
                .holding(Rights::SERVICE_CONNECT, 50, "/messages/devicebound")
                .is_some()
        );
    }
}
