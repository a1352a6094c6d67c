//! Messages: device telemetry over HTTPS (`POST /devices/{id}/messages/events`, hub-protocol
//! §6), cloud-to-device sends (`POST /devices/{id}/messages/deviceBound`), the device's HTTPS
//! C2D receive, complete, reject and abandon (`GET …/deviceBound`, `DELETE …/{lockToken}`,
//! `POST …/{lockToken}/abandon`), and the telemetry consumer (`GET /messages/events`, by
//! offset, with long-polling).

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::SasToken;

use super::{authorize, hub_of};
use crate::auth::Rights;
use crate::http::routes;
use crate::http::{AppState, peer_certificates};
use crate::hub::auth::{self, DeviceAuthFailure};
use crate::hub::c2d::{OutgoingMessage, Settlement};
use crate::hub::error::{HubError, HubErrorCode};
use crate::hub::mqtt::telemetry_message;
use crate::hub::{Hub, HubMetrics};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::DEVICE_EVENTS).route(web::post().to(device_event)))
        .service(
            web::resource(routes::DEVICE_BOUND)
                .route(web::post().to(send_c2d))
                .route(web::get().to(receive_c2d)),
        )
        .service(web::resource(routes::DEVICE_BOUND_LOCK).route(web::delete().to(complete_c2d)))
        .service(web::resource(routes::DEVICE_BOUND_ABANDON).route(web::post().to(abandon_c2d)))
        .service(web::resource(routes::MESSAGES_EVENTS).route(web::get().to(read_events)));
}

/// Longest a consumer may wait for new messages in one request.
const MAX_WAIT_SECONDS: u64 = 60;

fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// A device proves itself with a SAS token (its key, or a DeviceConnect policy) or its TLS
/// client certificate.
async fn authenticate_device(
    req: &HttpRequest,
    hub: &Hub,
    device_id: &str,
) -> Result<&'static str, HubError> {
    let refused = |failure: DeviceAuthFailure| {
        hub.metrics.auth_failure(failure.reason());
        HubError::new(
            HubErrorCode::IotHubUnauthorizedAccess,
            format!("device refused: {}", failure.reason()),
        )
    };
    // As IoT Hub: an unknown or disabled device is 404 DeviceNotFound on this endpoint.
    let not_found = || {
        HubError::new(
            HubErrorCode::DeviceNotFound,
            format!("device {device_id} is not registered or disabled"),
        )
    };
    let (device, _) = hub.device(device_id).await?.ok_or_else(|| {
        hub.metrics
            .auth_failure(DeviceAuthFailure::UnknownDevice.reason());
        not_found()
    })?;
    if device.status == crate::hub::device::DeviceStatus::Disabled {
        hub.metrics
            .auth_failure(DeviceAuthFailure::Disabled.reason());
        return Err(not_found());
    }
    let now = crate::time::now_unix();
    if let Some(header) = header(req, "authorization") {
        let token = SasToken::parse(&header).map_err(|_| refused(DeviceAuthFailure::BadToken))?;
        let policy = match token.skn.clone() {
            Some(name) => crate::db::blocking(hub.store(), move |s| auth::policy(s, &name)).await?,
            None => None,
        };
        auth::verify_device_token(&token, &device, policy.as_ref(), hub, now).map_err(refused)?;
        return Ok("sas");
    }
    let peer = peer_certificates(req).ok_or_else(|| refused(DeviceAuthFailure::NoCredentials))?;
    let bundle = hub.trust_bundle();
    let trusted = crate::db::blocking(hub.store(), move |s| auth::trusted_cas(s, &bundle)).await?;
    auth::verify_device_certificate(&device, &peer.leaf, &peer.chain, &trusted, now as i64)
        .map_err(refused)?;
    let leaf = peer.leaf.clone();
    if crate::db::blocking(hub.store(), move |s| crate::pki::revocation_of(s, &leaf))
        .await?
        .is_some()
    {
        return Err(refused(DeviceAuthFailure::Revoked));
    }
    Ok("x509")
}

/// HTTPS property names of system properties (hub-protocol §6) and their bag keys.
const SYSTEM_HEADERS: [(&str, &str); 7] = [
    ("iothub-messageid", "$.mid"),
    ("iothub-correlationid", "$.cid"),
    ("iothub-userid", "$.uid"),
    ("iothub-contenttype", "$.ct"),
    ("iothub-contentencoding", "$.ce"),
    ("iothub-creationtimeutc", "$.ctime"),
    ("iothub-expiry", "$.exp"),
];

/// One HTTPS property (header or batch property) as a bag entry.
fn bag_entry(name: &str, value: String) -> Option<(String, Option<String>)> {
    let name = name.to_ascii_lowercase();
    if let Some((_, key)) = SYSTEM_HEADERS.iter().find(|(h, _)| *h == name) {
        return Some((key.to_string(), Some(value)));
    }
    name.strip_prefix("iothub-app-")
        .map(|app| (app.to_string(), Some(value)))
}

/// `iothub-app-*` and the system headers of hub-protocol §6 → a property bag.
fn properties_from_headers(req: &HttpRequest) -> Vec<(String, Option<String>)> {
    let mut bag = Vec::new();
    for (name, _) in SYSTEM_HEADERS {
        if let Some(value) = header(req, name) {
            bag.extend(bag_entry(name, value));
        }
    }
    if !bag.iter().any(|(k, _)| k == "$.ct")
        && let Some(content_type) = header(req, "content-type")
    {
        bag.push(("$.ct".to_string(), Some(content_type)));
    }
    for (name, value) in req.headers() {
        if name.as_str().starts_with("iothub-app-")
            && let Ok(value) = value.to_str()
        {
            bag.extend(bag_entry(name.as_str(), value.to_string()));
        }
    }
    bag
}

/// Property-bag entries: name and value (`None`: a key without a value).
type PropertyBag = Vec<(String, Option<String>)>;

/// One message of a batch (`application/vnd.microsoft.iothub.json`, hub-protocol §6).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchItem {
    /// Base64 of the message bytes, unless `base64Encoded` is `false`.
    body: String,
    /// The Java SDK sends `true`; the Node and C SDKs send base64 without the flag. Only an
    /// explicit `false` makes the body literal text (docs/dev/decisions.md 36).
    base64_encoded: Option<bool>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

impl BatchItem {
    /// The message bytes and its property bag.
    fn into_message(self) -> Result<(Vec<u8>, PropertyBag), HubError> {
        let payload = if self.base64_encoded.unwrap_or(true) {
            B64.decode(self.body.trim()).map_err(|_| {
                HubError::new(
                    HubErrorCode::ArgumentInvalid,
                    "a batch body is not base64 (send base64Encoded: false for text)",
                )
            })?
        } else {
            self.body.into_bytes()
        };
        // System and `iothub-app-*` names as the single-message headers; anything else (the
        // Node SDK's `dt-subject`) as it is.
        let bag = self
            .properties
            .into_iter()
            .map(|(k, v)| bag_entry(&k, v.clone()).unwrap_or((k, Some(v))))
            .collect();
        Ok((payload, bag))
    }
}

#[utoipa::path(
    post,
    path = routes::DEVICE_EVENTS,
    operation_id = "sendDeviceEvent",
    tag = "device",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::MessageProperties),
    request_body(content((crate::http::openapi::AnyJson = "application/json"), (String = "text/plain"), (crate::http::openapi::Bytes = "application/octet-stream"), (Vec<crate::http::openapi::BatchMessage> = "application/vnd.microsoft.iothub.json")), description = "The message body; a batch with `application/vnd.microsoft.iothub.json`"),
    responses((status = 204, description = "Accepted and committed"), crate::http::openapi::HubErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn device_event(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    let hub = hub_of(&state)?;
    let auth_method = authenticate_device(&req, &hub, &id).await?;
    let batch = header(&req, "content-type")
        .is_some_and(|ct| ct.starts_with("application/vnd.microsoft.iothub.json"));
    let mut messages = Vec::new();
    if batch {
        let items: Vec<BatchItem> = serde_json::from_slice(&body).map_err(|e| {
            HubError::new(HubErrorCode::ArgumentInvalid, format!("batch body: {e}"))
        })?;
        for item in items {
            messages.push(item.into_message()?);
        }
    } else {
        messages.push((body.to_vec(), properties_from_headers(&req)));
    }
    let mut total = 0usize;
    let mut built = Vec::with_capacity(messages.len());
    for (payload, bag) in messages {
        total += payload.len();
        let message = telemetry_message(&id, auth_method, payload, bag)
            .map_err(|why| HubError::new(HubErrorCode::MessageTooLarge, why))?;
        built.push(message);
    }
    if total > crate::hub::mqtt::MAX_MESSAGE {
        return Err(HubError::new(
            HubErrorCode::MessageTooLarge,
            "a batch is at most 256 KiB",
        ));
    }
    let count = built.len() as u64;
    for message in built {
        hub.telemetry
            .append(message)
            .await
            .map_err(HubError::store)?;
    }
    HubMetrics::count(&hub.metrics.messages_in, count);
    HubMetrics::count(&hub.metrics.bytes_in, total as u64);
    hub.touch(&id);
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    post,
    path = routes::DEVICE_BOUND,
    operation_id = "sendCloudToDevice",
    tag = "hub",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::MessageProperties),
    request_body(content((crate::http::openapi::AnyJson = "application/json"), (String = "text/plain"), (crate::http::openapi::Bytes = "application/octet-stream")), description = "The message body"),
    responses((status = 204, description = "Queued for the device"), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn send_c2d(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::SERVICE_CONNECT]).await?;
    let mut properties = Vec::new();
    for (name, value) in req.headers() {
        if let Some(app) = name.as_str().strip_prefix("iothub-app-")
            && let Ok(value) = value.to_str()
        {
            properties.push((app.to_string(), Some(value.to_string())));
        }
    }
    let message = OutgoingMessage {
        body: body.to_vec(),
        message_id: header(&req, "iothub-messageid"),
        correlation_id: header(&req, "iothub-correlationid"),
        user_id: header(&req, "iothub-userid"),
        content_type: header(&req, "iothub-contenttype").or_else(|| header(&req, "content-type")),
        content_encoding: header(&req, "iothub-contentencoding"),
        expiry_time_utc: header(&req, "iothub-expiry"),
        ack: header(&req, "iothub-ack"),
        properties,
    };
    let message_id = hub.send_c2d(&id, message).await?;
    Ok(HttpResponse::NoContent()
        .insert_header(("iothub-messageid", message_id))
        .finish())
}

/// `GET /devices/{id}/messages/deviceBound`: the oldest waiting message, locked for
/// `c2d::LOCK_TIMEOUT`, with IoT Hub's headers (`ETag` is the lock token); 204 when none waits.
#[utoipa::path(
    get,
    path = routes::DEVICE_BOUND,
    operation_id = "receiveCloudToDevice",
    tag = "device",
    params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The next message, locked; its lock token is the `etag` header", content_type = "application/octet-stream", body = crate::http::openapi::Bytes, headers(("etag" = String, description = "The lock token"))), (status = 204, description = "No message is waiting"), crate::http::openapi::HubErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn receive_c2d(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, HubError> {
    let hub = hub_of(&state)?;
    authenticate_device(&req, &hub, &id).await?;
    hub.touch(&id);
    let Some(locked) = hub.receive_c2d(&id).await? else {
        return Ok(HttpResponse::NoContent().finish());
    };
    let message = &locked.message;
    let mut response = HttpResponse::Ok();
    response
        .insert_header(("ETag", format!("\"{}\"", locked.lock_token())))
        .insert_header(("iothub-messageid", message.message_id.clone()))
        .insert_header(("iothub-to", format!("/devices/{id}/messages/deviceBound")))
        .insert_header(("iothub-deliverycount", message.delivery_count.to_string()))
        .insert_header(("iothub-enqueuedtime", message.enqueued_time_utc.clone()))
        .content_type(
            message
                .content_type
                .clone()
                .unwrap_or_else(|| "application/octet-stream".to_string()),
        );
    let optional = [
        ("iothub-correlationid", &message.correlation_id),
        ("iothub-userid", &message.user_id),
        ("iothub-contenttype", &message.content_type),
        ("iothub-contentencoding", &message.content_encoding),
        ("iothub-expiry", &message.expiry_time_utc),
        ("iothub-ack", &message.ack),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            response.insert_header((name, value.clone()));
        }
    }
    for (name, value) in &message.properties {
        // A property that cannot be a header (a name that is not a token, a value with control
        // characters) is left out rather than failing the receive.
        let header = actix_web::http::header::HeaderName::try_from(format!("iothub-app-{name}"));
        let value =
            actix_web::http::header::HeaderValue::from_str(value.as_deref().unwrap_or_default());
        if let (Ok(header), Ok(value)) = (header, value) {
            response.append_header((header, value));
        }
    }
    Ok(response.body(message.body_bytes()))
}

/// The lock token of a settle path (`…/deviceBound/{lockToken}`), without the quotes an
/// `ETag` value carries.
fn lock_token_of(path: &(String, String)) -> &str {
    path.1.trim().trim_matches('"')
}

/// `DELETE /devices/{id}/messages/deviceBound/{lockToken}`: complete, or reject with `?reject`.
#[utoipa::path(
    delete,
    path = routes::DEVICE_BOUND_LOCK,
    operation_id = "completeCloudToDevice",
    tag = "device",
    params(("id" = String, Path, description = "The device id"), ("lock_token" = String, Path, description = "The lock token of the received message"), ("reject" = Option<String>, Query, description = "Present: reject instead of complete")),
    responses((status = 204, description = "Settled"), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn complete_c2d(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, HubError> {
    let hub = hub_of(&state)?;
    authenticate_device(&req, &hub, &path.0).await?;
    let reject = req
        .query_string()
        .split('&')
        .any(|pair| pair == "reject" || pair.starts_with("reject="));
    let how = if reject {
        Settlement::Reject
    } else {
        Settlement::Complete
    };
    hub.settle_c2d(&path.0, lock_token_of(&path), how).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /devices/{id}/messages/deviceBound/{lockToken}/abandon`.
#[utoipa::path(
    post,
    path = routes::DEVICE_BOUND_ABANDON,
    operation_id = "abandonCloudToDevice",
    tag = "device",
    params(("id" = String, Path, description = "The device id"), ("lock_token" = String, Path, description = "The lock token of the received message")),
    responses((status = 204, description = "Abandoned: the message is delivered again"), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn abandon_c2d(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, HubError> {
    let hub = hub_of(&state)?;
    authenticate_device(&req, &hub, &path.0).await?;
    hub.settle_c2d(&path.0, lock_token_of(&path), Settlement::Abandon)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadQuery {
    from: Option<i64>,
    limit: Option<usize>,
    device_id: Option<String>,
    /// Seconds to wait for a message at or after `from` when there is none yet.
    wait: Option<u64>,
}

#[utoipa::path(
    get,
    path = routes::MESSAGES_EVENTS,
    operation_id = "readEvents",
    tag = "hub",
    params(crate::http::openapi::ReadEvents),
    responses((status = 200, description = "Telemetry from `from` on", body = crate::http::openapi::EventsPage), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn read_events(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ReadQuery>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::SERVICE_CONNECT]).await?;
    let from = query.from.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(100);
    if !(1..=crate::telemetry::MAX_READ).contains(&limit) {
        return Err(HubError::new(
            HubErrorCode::ArgumentInvalid,
            format!("limit must be 1 to {}", crate::telemetry::MAX_READ),
        ));
    }
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(HubError::new(
            HubErrorCode::ArgumentInvalid,
            format!("wait must be 0 to {MAX_WAIT_SECONDS} seconds"),
        ));
    }
    let wait = Duration::from_secs(wait);
    let device = query.device_id.clone();
    let read = |hub: std::sync::Arc<Hub>, device: Option<String>| async move {
        hub.telemetry
            .read(from, limit, device.as_deref())
            .await
            .map_err(HubError::store)
    };
    let mut messages = read(hub.clone(), device.clone()).await?;
    if messages.is_empty() && !wait.is_zero() {
        // Wait for the next commit beyond what exists now; with a device filter, several
        // commits may pass before one of that device's messages does.
        let deadline = tokio::time::Instant::now() + wait;
        let mut target = from.max(hub.telemetry.last_offset() + 1);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !hub.telemetry.wait_for(target, left).await {
                break;
            }
            messages = read(hub.clone(), device.clone()).await?;
            if !messages.is_empty() {
                break;
            }
            target = hub.telemetry.last_offset() + 1;
        }
    }
    let next_offset = messages.last().map_or(from, |m| m.offset + 1);
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"messages": messages, "nextOffset": next_offset})))
}
