//! The hub as an MQTT application (hub-protocol §1–§2): device authentication at CONNECT,
//! per-device topic ACLs, telemetry, twin requests, direct-method answers and C2D delivery.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::SasToken;

use super::auth::{self, DeviceAuthFailure};
use super::methods::MethodResponse;
use super::{Hub, HubMetrics};
use crate::mqtt::{
    Accepted, Application, BoxFuture, CloseReason, ConnectRequest, Inbound, Outbound,
    PublishVerdict, QoS, Refusal, Session, SubscribeVerdict,
};
use crate::telemetry::NewMessage;

/// How long a CONNECT may wait for the database before it is refused with 0x03 (server
/// unavailable). Device SDKs give up on a CONNACK after 5 s or more.
const AUTHENTICATION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Largest telemetry message: body plus properties (256 KiB, as in IoT Hub).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Persistent sessions of hub devices are stored under this key.
pub fn session_key(device_id: &str) -> String {
    format!("hub/{device_id}")
}

/// `{host}/{deviceId}/?api-version=…` → (host, device id). Modules are not served yet.
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let path = match username.find("/?") {
        Some(i) => &username[..i],
        None => username.trim_end_matches('/'),
    };
    let (host, device) = path.split_once('/')?;
    if host.is_empty() || device.is_empty() || device.contains('/') {
        return None;
    }
    Some((host, device))
}

pub struct HubApplication {
    hub: Arc<Hub>,
}

impl HubApplication {
    pub fn new(hub: Arc<Hub>) -> HubApplication {
        HubApplication { hub }
    }

    async fn authenticate(
        &self,
        request: &ConnectRequest,
    ) -> Result<(String, Option<u64>, &'static str), DeviceAuthFailure> {
        let username = request
            .username
            .as_deref()
            .ok_or(DeviceAuthFailure::NoCredentials)?;
        let (host, device_id) = parse_username(username).ok_or(DeviceAuthFailure::WrongScope)?;
        if !self.hub.is_own_host(host) || device_id != request.client_id {
            return Err(DeviceAuthFailure::WrongScope);
        }
        let (device, _) = self
            .hub
            .device(device_id)
            .await
            .map_err(|_| DeviceAuthFailure::StoreUnavailable)?
            .ok_or(DeviceAuthFailure::UnknownDevice)?;
        let now = crate::time::now_unix();
        if let Some(password) = request.password.as_deref().filter(|p| !p.is_empty()) {
            let token = SasToken::parse(password).map_err(|_| DeviceAuthFailure::BadToken)?;
            let policy = match token.skn.clone() {
                Some(name) => {
                    crate::db::blocking(self.hub.store(), move |s| auth::policy(s, &name))
                        .await
                        .map_err(|_| DeviceAuthFailure::StoreUnavailable)?
                }
                None => None,
            };
            let expires =
                auth::verify_device_token(&token, &device, policy.as_ref(), &self.hub, now)?;
            return Ok((device.device_id, Some(expires), "sas"));
        }
        let peer = request
            .peer_certificates
            .as_ref()
            .ok_or(DeviceAuthFailure::NoCredentials)?;
        let bundle = self.hub.trust_bundle();
        let trusted = crate::db::blocking(self.hub.store(), move |s| auth::trusted_cas(s, &bundle))
            .await
            .map_err(|_| DeviceAuthFailure::StoreUnavailable)?;
        auth::verify_device_certificate(&device, &peer.leaf, &peer.chain, &trusted, now as i64)?;
        let leaf = peer.leaf.clone();
        let revoked = crate::db::blocking(self.hub.store(), move |s| {
            crate::pki::revocation_of(s, &leaf)
        })
        .await
        .map_err(|_| DeviceAuthFailure::StoreUnavailable)?;
        if revoked.is_some() {
            return Err(DeviceAuthFailure::Revoked);
        }
        // The session ends when the certificate does.
        let expires = zerotouch_attestation::x509::Certificate::from_der(&peer.leaf)
            .ok()
            .and_then(|c| u64::try_from(c.not_after_unix()).ok());
        Ok((device.device_id, expires, "x509"))
    }
}

impl Application for HubApplication {
    fn connect(
        &self,
        request: ConnectRequest,
        outbound: Outbound,
    ) -> BoxFuture<'_, Result<Accepted, Refusal>> {
        Box::pin(async move {
            // A replica without NATS could neither hear its devices' orders nor store their
            // telemetry: devices retry (0x03), through the load balancer, on another replica.
            if let Some(cluster) = self.hub.cluster()
                && !cluster.connected()
            {
                tracing::warn!("device connection refused: NATS cannot be reached");
                return Err(Refusal::ServerUnavailable);
            }
            // A database that does not answer must not hold the device past its own connect
            // timeout: it hears 0x03 and retries.
            let verdict = tokio::time::timeout(AUTHENTICATION_WAIT, self.authenticate(&request))
                .await
                .unwrap_or(Err(DeviceAuthFailure::StoreUnavailable));
            match verdict {
                Ok((device_id, _, _)) if !self.hub.shared_connect_allowed(&device_id).await => {
                    tracing::warn!(
                        device_id,
                        "device connection refused: over {} CONNECTs this minute across replicas",
                        super::replicas::SHARED_CONNECTS_PER_MINUTE
                    );
                    Err(Refusal::ServerUnavailable)
                }
                Ok((device_id, expires_at, method)) => {
                    tracing::info!(device_id, method, "device authenticated");
                    if let Some(peer) = request
                        .peer_certificates
                        .as_ref()
                        .filter(|_| method == "x509")
                    {
                        self.hub.certificates.track(&peer.leaf, outbound.clone());
                    }
                    Ok(Accepted {
                        session_key: session_key(&device_id),
                        session: Box::new(HubSession {
                            hub: self.hub.clone(),
                            events_topic: format!("devices/{device_id}/messages/events"),
                            device_id,
                            outbound,
                            auth_method: method,
                            touched: Default::default(),
                        }),
                        expires_at,
                    })
                }
                Err(DeviceAuthFailure::StoreUnavailable) => {
                    // The device may be fine: it retries on 0x03 (here or, behind a load
                    // balancer, on another replica); 0x05 would make it give up.
                    tracing::warn!(
                        client_id = %request.client_id,
                        "device connection refused: the database cannot be read"
                    );
                    Err(Refusal::ServerUnavailable)
                }
                Err(failure) => {
                    self.hub.metrics.auth_failure(failure.reason());
                    tracing::info!(
                        client_id = %request.client_id,
                        reason = failure.reason(),
                        "device refused"
                    );
                    Err(Refusal::NotAuthorized)
                }
            }
        })
    }
}

struct HubSession {
    hub: Arc<Hub>,
    device_id: String,
    outbound: Outbound,
    auth_method: &'static str,
    /// `devices/{id}/messages/events`, the prefix of this device's telemetry topics.
    events_topic: String,
    /// The second (Unix time) of the last `Hub::touch`: activity is recorded at most once a
    /// second per connection, not under the hub's lock for every message.
    touched: std::sync::atomic::AtomicU64,
}

/// The `k=v&…` query after `/?` in a topic.
fn query_of(topic: &str) -> Vec<(String, String)> {
    let Some((_, query)) = topic.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn rid_of(topic: &str) -> Option<String> {
    query_of(topic)
        .into_iter()
        .find(|(k, _)| k == "$rid")
        .map(|(_, v)| v)
}

/// A malformed property bag: a key or value that does not percent-decode to UTF-8, or an
/// empty key.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPropertyBag;

/// Decodes `k1=v1&k2&k3=` (hub-protocol §2.2): keys and values percent-decoded (`+` stays `+`),
/// a key without `=` has no value.
pub fn parse_property_bag(bag: &str) -> Result<Vec<(String, Option<String>)>, BadPropertyBag> {
    let decode = |text: &str| {
        // percent_decode_str passes invalid escapes through; a bag with one is malformed.
        let bytes = text.as_bytes();
        let valid_escapes = bytes.iter().enumerate().all(|(i, b)| {
            *b != b'%'
                || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        });
        if !valid_escapes {
            return Err(BadPropertyBag);
        }
        percent_decode_str(text)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| BadPropertyBag)
    };
    let mut out = Vec::new();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (decode(k)?, Some(decode(v)?)),
            None => (decode(pair)?, None),
        };
        if key.is_empty() {
            return Err(BadPropertyBag);
        }
        out.push((key, value));
    }
    Ok(out)
}

/// System property names for the bag's `$.` keys.
fn system_name(key: &str) -> Option<&'static str> {
    Some(match key {
        "$.mid" => "message-id",
        "$.cid" => "correlation-id",
        "$.uid" => "user-id",
        "$.ct" => "content-type",
        "$.ce" => "content-encoding",
        "$.exp" => "absolute-expiry-time",
        "$.ctime" => "creation-time",
        "$.ifid" => "interface-id",
        "$.on" => "output-name",
        "$.sub" => "component-name",
        _ => return None,
    })
}

/// `iothub-connection-auth-method` as IoT Hub writes it. The usual ones are constants: this is
/// on every message's path.
fn auth_method_property(auth_method: &str) -> String {
    match auth_method {
        "sas" => r#"{"issuer":"iothub","scope":"device","type":"sas"}"#.to_owned(),
        "x509" => r#"{"issuer":"iothub","scope":"device","type":"x509"}"#.to_owned(),
        other => json!({"scope": "device", "type": other, "issuer": "iothub"}).to_string(),
    }
}

/// Builds a stored message from a body and its properties; rejects oversize ones.
pub fn telemetry_message(
    device_id: &str,
    auth_method: &str,
    body: Vec<u8>,
    bag: Vec<(String, Option<String>)>,
) -> Result<NewMessage, &'static str> {
    let mut system = BTreeMap::new();
    let mut properties = Vec::new();
    let mut size = body.len();
    for (key, value) in bag {
        size += key.len() + value.as_ref().map_or(0, String::len);
        match (system_name(&key), value) {
            (Some(name), Some(value)) => {
                system.insert(name.to_string(), value);
            }
            (_, value) => properties.push((key, value)),
        }
    }
    if size > MAX_MESSAGE {
        return Err("the message is larger than 256 KiB");
    }
    system.insert("iothub-connection-device-id".into(), device_id.to_string());
    system.insert(
        "iothub-connection-auth-method".into(),
        auth_method_property(auth_method),
    );
    Ok(NewMessage {
        device_id: device_id.to_string(),
        module_id: None,
        body,
        system,
        properties,
    })
}

impl HubSession {
    fn own(&self, suffix: &str) -> String {
        format!("devices/{}/{suffix}", self.device_id)
    }

    fn respond_twin(&self, status: u16, rid: &str, extra: &str, body: Vec<u8>) {
        let topic = format!("$iothub/twin/res/{status}/?$rid={rid}{extra}");
        // Twin answers go out even before `$iothub/twin/res/#` is subscribed (hub-protocol §2.4).
        let _ = self
            .outbound
            .send(topic, Bytes::from(body), QoS::AtMostOnce);
    }

    async fn telemetry(&self, topic: &str, payload: Bytes) -> PublishVerdict {
        let Some(rest) = topic.strip_prefix(self.events_topic.as_str()) else {
            return PublishVerdict::Disconnect;
        };
        let bag = rest.strip_prefix('/').unwrap_or(rest);
        if !rest.is_empty() && !rest.starts_with('/') {
            return PublishVerdict::Disconnect;
        }
        let Ok(bag) = parse_property_bag(bag) else {
            tracing::info!(device_id = %self.device_id, "malformed property bag; disconnecting");
            return PublishVerdict::Disconnect;
        };
        let size = payload.len() as u64;
        let message = match telemetry_message(
            &self.device_id,
            self.auth_method,
            payload.to_vec(),
            bag,
        ) {
            Ok(message) => message,
            Err(why) => {
                tracing::info!(device_id = %self.device_id, why, "telemetry refused; disconnecting");
                return PublishVerdict::Disconnect;
            }
        };
        // Queued in the order the device sent it; the PUBACK waits for the commit while the
        // device's next messages are queued behind it (they may share its group commit).
        let commit = match self.hub.telemetry.enqueue(message).await {
            Ok(commit) => commit,
            Err(e) => {
                // No PUBACK: the device keeps the message and sends it again after reconnecting.
                tracing::error!(device_id = %self.device_id, "storing telemetry failed: {e}");
                return PublishVerdict::Disconnect;
            }
        };
        let (hub, device_id) = (self.hub.clone(), self.device_id.clone());
        PublishVerdict::AckWhen(Box::pin(async move {
            match commit.await {
                Ok(_) => {
                    HubMetrics::count(&hub.metrics.messages_in, 1);
                    HubMetrics::count(&hub.metrics.bytes_in, size);
                    true
                }
                Err(e) => {
                    tracing::error!(%device_id, "storing telemetry failed: {e}");
                    false
                }
            }
        }))
    }

    async fn twin_request(
        &self,
        topic: &str,
        payload: Bytes,
        read_at: std::time::Instant,
    ) -> PublishVerdict {
        let Some(rid) = rid_of(topic) else {
            tracing::info!(device_id = %self.device_id, topic, "twin request without $rid ignored");
            return PublishVerdict::Ack;
        };
        let Some(_turn) = self.hub.twin_slot(read_at).await else {
            self.respond_twin(429, &rid, "", refusal_body(THROTTLED));
            return PublishVerdict::Ack;
        };
        if topic.starts_with("$iothub/twin/GET/") {
            match self.hub.twin(&self.device_id).await {
                Ok(twin) => {
                    HubMetrics::count(&self.hub.metrics.twin_operations, 1);
                    self.respond_twin(200, &rid, "", twin.device_view().to_string().into_bytes());
                }
                Err(e) => self.respond_twin(e.status().as_u16(), &rid, "", error_body(&e)),
            }
        } else if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
            let patch: Value = match serde_json::from_slice(&payload) {
                Ok(value @ Value::Object(_)) => value,
                _ => {
                    self.respond_twin(
                        400,
                        &rid,
                        "",
                        refusal_body("the reported patch must be a JSON object"),
                    );
                    return PublishVerdict::Ack;
                }
            };
            match self.hub.patch_reported(&self.device_id, patch).await {
                Ok(version) => {
                    self.respond_twin(204, &rid, &format!("&$version={version}"), Vec::new())
                }
                Err(e) => self.respond_twin(e.status().as_u16(), &rid, "", error_body(&e)),
            }
        } else {
            self.respond_twin(404, &rid, "", refusal_body("no such twin operation"));
        }
        PublishVerdict::Ack
    }

    fn method_response(&self, topic: &str, payload: Bytes) -> PublishVerdict {
        // $iothub/methods/res/{status}/?$rid={rid}
        let status = topic
            .strip_prefix("$iothub/methods/res/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|s| s.parse::<i64>().ok());
        let (Some(status), Some(rid)) = (status, rid_of(topic)) else {
            tracing::info!(device_id = %self.device_id, topic, "malformed method response ignored");
            return PublishVerdict::Ack;
        };
        let payload = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()))
        };
        if !self
            .hub
            .methods
            .complete(&self.device_id, &rid, MethodResponse { status, payload })
        {
            tracing::debug!(device_id = %self.device_id, rid, "late or unknown method response");
        }
        PublishVerdict::Ack
    }
}

/// A twin error on its response topic: the safe message and a tracking id, under which any
/// internal detail is logged.
pub(crate) fn error_body(error: &super::error::HubError) -> Vec<u8> {
    let tracking_id =
        crate::logging::track_for_client(error.internal_detail(), "a twin request over MQTT");
    json!({"message": error.message, "trackingId": tracking_id})
        .to_string()
        .into_bytes()
}

/// The body of a throttled twin request's 429.
pub(crate) const THROTTLED: &str = "the hub is busy; retry the twin request later";

/// A twin refusal of the device's own making (no internal detail to log).
pub(crate) fn refusal_body(message: &str) -> Vec<u8> {
    json!({"message": message}).to_string().into_bytes()
}

impl Session for HubSession {
    fn ready(&self) {
        // Just before CONNACK: the engine has already closed and reported any older connection of
        // this device (takeover), so the registry only ever holds the live one.
        self.hub.connected(&self.device_id, self.outbound.clone());
        let hub = self.hub.clone();
        let device_id = self.device_id.clone();
        tokio::spawn(async move { hub.deliver_c2d(&device_id).await });
    }

    fn subscribe(&self, filter: &str, requested: QoS) -> SubscribeVerdict {
        let allowed = [
            self.own("messages/devicebound/#"),
            "$iothub/twin/res/#".to_string(),
            "$iothub/methods/POST/#".to_string(),
            "$iothub/twin/PATCH/properties/desired/#".to_string(),
        ];
        if allowed.iter().any(|a| a == filter) {
            if filter.starts_with("devices/") {
                let hub = self.hub.clone();
                let device_id = self.device_id.clone();
                // Deliver queued C2D once the grant is in place.
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    hub.deliver_c2d(&device_id).await
                });
            }
            SubscribeVerdict::Grant(requested)
        } else {
            tracing::info!(device_id = %self.device_id, filter, "subscription refused");
            SubscribeVerdict::Refuse
        }
    }

    fn publish(&self, message: Inbound) -> BoxFuture<'_, PublishVerdict> {
        let Inbound {
            topic,
            payload,
            read_at,
            ..
        } = message;
        Box::pin(async move {
            let now = crate::time::now_unix();
            if self.touched.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                self.hub.touch(&self.device_id);
            }
            if topic.starts_with("devices/") {
                self.telemetry(&topic, payload).await
            } else if topic.starts_with("$iothub/twin/") {
                self.twin_request(&topic, payload, read_at).await
            } else if topic.starts_with("$iothub/methods/res/") {
                self.method_response(&topic, payload)
            } else {
                tracing::info!(device_id = %self.device_id, topic, "publish to a foreign topic; disconnecting");
                PublishVerdict::Disconnect
            }
        })
    }

    fn closed(&self, reason: CloseReason) {
        tracing::info!(device_id = %self.device_id, ?reason, "device disconnected");
        self.hub
            .disconnected(&self.device_id, self.outbound.connection_id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_method_constants_are_what_json_renders() {
        for method in ["sas", "x509", "selfSigned"] {
            assert_eq!(
                auth_method_property(method),
                json!({"scope": "device", "type": method, "issuer": "iothub"}).to_string()
            );
        }
    }

    #[test]
    fn usernames() {
        assert_eq!(
            parse_username("hub.local/dev1/?api-version=2019-10-01&DeviceClientType=x"),
            Some(("hub.local", "dev1"))
        );
        assert_eq!(
            parse_username("127.0.0.5/dev1/"),
            Some(("127.0.0.5", "dev1"))
        );
        assert_eq!(parse_username("hub/dev1/mod1/?api-version=1"), None);
        assert_eq!(
            parse_username("0ne00000001/registrations/dev1/api-version=1"),
            None
        );
        assert_eq!(parse_username("nohost"), None);
    }

    #[test]
    fn property_bags_decode() {
        assert_eq!(
            parse_property_bag(
                "%24.mid=mid-1&%24.ct=application%2Fjson&alert%20level=high%2F1&flag&empty="
            )
            .unwrap(),
            vec![
                ("$.mid".into(), Some("mid-1".into())),
                ("$.ct".into(), Some("application/json".into())),
                ("alert level".into(), Some("high/1".into())),
                ("flag".into(), None),
                ("empty".into(), Some(String::new())),
            ]
        );
        assert_eq!(
            parse_property_bag("a+b=c+d").unwrap(),
            vec![("a+b".into(), Some("c+d".into()))]
        );
        assert!(parse_property_bag("").unwrap().is_empty());
        assert_eq!(parse_property_bag("=v"), Err(BadPropertyBag));
        assert_eq!(parse_property_bag("k=%FF"), Err(BadPropertyBag));
        assert_eq!(parse_property_bag("%ZZ=1"), Err(BadPropertyBag));
        assert_eq!(parse_property_bag("k=50%"), Err(BadPropertyBag));
    }

    #[test]
    fn system_properties_are_separated() {
        let message = telemetry_message(
            "dev1",
            "sas",
            b"{}".to_vec(),
            vec![
                ("$.mid".into(), Some("m1".into())),
                ("color".into(), Some("red".into())),
            ],
        )
        .unwrap();
        assert_eq!(message.system["message-id"], "m1");
        assert_eq!(message.system["iothub-connection-device-id"], "dev1");
        assert_eq!(
            message.properties,
            vec![("color".to_string(), Some("red".to_string()))]
        );
        let huge = telemetry_message("d", "sas", vec![0; MAX_MESSAGE + 1], vec![]);
        assert!(huge.is_err());
    }

    #[test]
    fn rids() {
        assert_eq!(rid_of("$iothub/twin/GET/?$rid=abc"), Some("abc".into()));
        assert_eq!(
            rid_of("$iothub/methods/res/200/?$rid=1f&x=y"),
            Some("1f".into())
        );
        assert_eq!(rid_of("$iothub/twin/GET/"), None);
    }
}
