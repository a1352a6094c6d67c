//! DPS over MQTT (dps-protocol §2): `$dps/registrations/…` request/response topics on the
//! shared listener. A register that completes at once is answered `200 assigned` directly (the
//! fast path: Python otherwise waits a fixed 2 s before polling).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::SasToken;

use super::{Dps, Evidence, Progress, RegisterBody};
use crate::http::error::ApiError;
use crate::mqtt::{
    Accepted, Application, BoxFuture, CloseReason, ConnectRequest, Inbound, Outbound,
    PublishVerdict, QoS, Refusal, Session, SubscribeVerdict,
};

/// `{idScope}/registrations/{registrationId}/api-version=…` → (scope, registration id).
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next()?;
    (parts.next()? == "registrations").then_some(())?;
    let registration_id = parts.next()?;
    (!scope.is_empty() && !registration_id.is_empty()).then_some((scope, registration_id))
}

pub struct DpsApplication {
    dps: Arc<Dps>,
}

impl DpsApplication {
    pub fn new(dps: Arc<Dps>) -> DpsApplication {
        DpsApplication { dps }
    }

    pub fn claims(&self, username: &str) -> bool {
        parse_username(username)
            .is_some_and(|(scope, _)| scope.eq_ignore_ascii_case(&self.dps.id_scope))
    }
}

impl Application for DpsApplication {
    fn connect(
        &self,
        request: ConnectRequest,
        outbound: Outbound,
    ) -> BoxFuture<'_, Result<Accepted, Refusal>> {
        Box::pin(async move {
            let username = request.username.as_deref().unwrap_or_default();
            let Some((_, registration_id)) = parse_username(username) else {
                return Err(Refusal::NotAuthorized);
            };
            if registration_id != request.client_id {
                return Err(Refusal::IdentifierRejected);
            }
            let evidence = match request.password.as_deref().filter(|p| !p.is_empty()) {
                Some(password) => {
                    let token = SasToken::parse(password).map_err(|_| Refusal::NotAuthorized)?;
                    // A bad SAS is refused at CONNECT (CONNACK 5: Python's CredentialError).
                    match self
                        .dps
                        .authenticate(registration_id, &Evidence::Sas(token.clone()))
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if !e.is_refusal() => {
                            return Err(Refusal::ServerUnavailable);
                        }
                        Err(_) => return Err(Refusal::NotAuthorized),
                    }
                    Evidence::Sas(token)
                }
                // X.509 is judged at register time and refused on the response topic (as DPS does).
                None => match request.peer_certificates.clone() {
                    Some(peer) => Evidence::Certificate(peer),
                    None => return Err(Refusal::NotAuthorized),
                },
            };
            Ok(Accepted {
                session_key: format!("dps/{}/{registration_id}", self.dps.id_scope),
                session: Box::new(DpsSession {
                    dps: self.dps.clone(),
                    registration_id: registration_id.to_string(),
                    evidence,
                    outbound,
                    source: request.remote.ip(),
                }),
                expires_at: None,
            })
        })
    }
}

struct DpsSession {
    dps: Arc<Dps>,
    registration_id: String,
    evidence: Evidence,
    outbound: Outbound,
    /// The device's address, for `geoLatency` allocation.
    source: std::net::IpAddr,
}

fn query_value(topic: &str, key: &str) -> Option<String> {
    let (_, query) = topic.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

impl DpsSession {
    fn respond(&self, status: u16, rid: &str, retry_after: Option<u32>, body: Value) {
        let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
        if let Some(seconds) = retry_after {
            topic.push_str(&format!("&retry-after={seconds}"));
        }
        let _ = self
            .outbound
            .send(topic, Bytes::from(body.to_string()), QoS::AtMostOnce);
    }

    fn respond_error(&self, rid: &str, error: &ApiError) {
        let (status, code, _) = error.code.wire();
        let tracking_id =
            crate::logging::track_for_client(error.internal_detail(), "a DPS request over MQTT");
        let retry = error
            .code
            .retry_after()
            .or_else(|| (status.as_u16() >= 429).then_some(2));
        self.respond(
            status.as_u16(),
            rid,
            retry,
            json!({"errorCode": code, "message": error.message, "trackingId": tracking_id, "timestampUtc": crate::time::now_rfc3339()}),
        );
    }
}

impl Session for DpsSession {
    fn subscribe(&self, filter: &str, requested: QoS) -> SubscribeVerdict {
        if filter == "$dps/registrations/res/#" {
            SubscribeVerdict::Grant(requested)
        } else {
            SubscribeVerdict::Refuse
        }
    }

    fn publish(&self, message: Inbound) -> BoxFuture<'_, PublishVerdict> {
        let Inbound { topic, payload, .. } = message;
        Box::pin(async move {
            let Some(rid) = query_value(&topic, "$rid") else {
                return PublishVerdict::Ack;
            };
            if topic.starts_with("$dps/registrations/PUT/iotdps-register/") {
                let body = match serde_json::from_slice::<Value>(&payload) {
                    Ok(Value::Null) | Err(_) if payload.iter().all(u8::is_ascii_whitespace) => {
                        Ok(RegisterBody::default())
                    }
                    Ok(value) => crate::http::parse_typed::<RegisterBody>(value),
                    Err(e) => Err(ApiError::new(
                        crate::http::error::ErrorCode::InvalidJson,
                        format!("the body is not JSON: {e}"),
                    )),
                };
                let progress = match body {
                    Ok(mut body) => {
                        body.source_address = Some(self.source);
                        self.dps
                            .begin(
                                &self.registration_id,
                                clone_evidence(&self.evidence),
                                body,
                                self.dps.fast_path,
                            )
                            .await
                            .map_err(ApiError::from)
                    }
                    Err(e) => Err(e),
                };
                match progress {
                    // The fast path: the final state straight away.
                    Ok(Progress::Done(outcome)) => self.respond(200, &rid, None, outcome.body()),
                    // Not done in time: the device polls (Python waits 2 s first).
                    Ok(Progress::Running { operation_id }) => self.respond(
                        202,
                        &rid,
                        Some(1),
                        json!({"operationId": operation_id, "status": "assigning"}),
                    ),
                    Err(e) => self.respond_error(&rid, &e),
                }
            } else if topic.starts_with("$dps/registrations/GET/iotdps-get-operationstatus/") {
                let operation_id = query_value(&topic, "operationId")
                    .map(|o| {
                        percent_encoding::percent_decode_str(&o)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                    .unwrap_or_default();
                match self
                    .dps
                    .operation(&self.registration_id, &self.evidence, &operation_id)
                    .await
                {
                    Ok(outcome) if outcome.status == super::RegistrationStatus::Assigning => {
                        self.respond(202, &rid, Some(1), outcome.body())
                    }
                    Ok(outcome) => self.respond(200, &rid, None, outcome.body()),
                    Err(e) => self.respond_error(&rid, &ApiError::from(e)),
                }
            } else {
                self.respond(
                    404,
                    &rid,
                    None,
                    json!({"errorCode": 404_000, "message": "no such DPS operation"}),
                );
            }
            PublishVerdict::Ack
        })
    }

    fn closed(&self, _reason: CloseReason) {}
}

fn clone_evidence(evidence: &Evidence) -> Evidence {
    match evidence {
        Evidence::Sas(token) => Evidence::Sas(token.clone()),
        Evidence::Certificate(peer) => Evidence::Certificate(peer.clone()),
    }
}

/// Routes each CONNECT to DPS or the hub by the username's shape (one listener serves both).
pub struct Router {
    pub dps: Option<DpsApplication>,
    pub hub: Option<crate::hub::mqtt::HubApplication>,
}

impl Application for Router {
    fn connect(
        &self,
        request: ConnectRequest,
        outbound: Outbound,
    ) -> BoxFuture<'_, Result<Accepted, Refusal>> {
        let username = request.username.clone().unwrap_or_default();
        if let Some(dps) = self.dps.as_ref().filter(|d| d.claims(&username)) {
            return dps.connect(request, outbound);
        }
        match &self.hub {
            Some(hub) => hub.connect(request, outbound),
            None => Box::pin(async { Err(Refusal::NotAuthorized) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(
            parse_username(
                "0ne00000001/registrations/dev-01/api-version=2019-03-31&ClientVersion=x"
            ),
            Some(("0ne00000001", "dev-01"))
        );
        assert_eq!(parse_username("hub/dev1/?api-version=1"), None);
        assert_eq!(parse_username("0ne1/registrations/"), None);
    }

    #[test]
    fn query_values() {
        let topic =
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=42&operationId=5.ab%2Fcd";
        assert_eq!(query_value(topic, "$rid"), Some("42".into()));
        assert_eq!(query_value(topic, "operationId"), Some("5.ab%2Fcd".into()));
    }
}
