//! Direct methods (hub-protocol §2.5, §4.5): the service invokes, the device answers on
//! `$iothub/methods/res/{status}/?$rid={rid}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use bytes::Bytes;

use super::error::{HubError, HubErrorCode};
use super::{Hub, HubMetrics};
use crate::mqtt::QoS;

/// Subscription a device needs to receive method calls.
pub const METHODS_TOPIC: &str = "$iothub/methods/POST/";
/// Largest payload either way (128 KiB).
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// `POST /twins/{id}/methods` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodRequest {
    pub method_name: String,
    #[serde(default)]
    pub payload: Option<Value>,
    pub response_timeout_in_seconds: Option<u64>,
    pub connect_timeout_in_seconds: Option<u64>,
}

/// What the device answered.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    pub status: i64,
    pub payload: Value,
}

/// A method call carried to the replica that holds the device.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodCall {
    pub method_name: String,
    /// The payload as the device receives it (JSON text, or empty).
    pub body: String,
    pub response_timeout_in_seconds: u64,
}

/// How a carried method call ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum MethodOutcome {
    Answered {
        status: i64,
        payload: Value,
    },
    /// The device is not subscribed to methods (or left before it was asked).
    NotListening,
    /// The device did not answer within the call's timeout.
    TimedOut,
}

impl MethodOutcome {
    pub fn from_response(response: MethodResponse) -> MethodOutcome {
        MethodOutcome::Answered {
            status: response.status,
            payload: response.payload,
        }
    }
}

/// A method call handed to a device connection without an `Outbound` (AMQP).
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The request id the answer must carry.
    pub rid: String,
    pub method_name: String,
    /// The payload as the device receives it (JSON text, or empty).
    pub body: String,
}

/// Calls waiting for their device's answer, by request id.
#[derive(Default)]
pub struct PendingMethods {
    waiting: Mutex<HashMap<String, (String, oneshot::Sender<MethodResponse>)>>,
    next: AtomicU64,
    /// Devices listening for methods on a transport without an `Outbound` (AMQP), by id.
    listeners: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Invocation>>>,
}

impl PendingMethods {
    /// Method calls for `device_id` from now on (the latest listener of a device wins), for a
    /// connection that is not an MQTT one. Dropping the receiver stops listening.
    pub fn listen(&self, device_id: &str) -> tokio::sync::mpsc::UnboundedReceiver<Invocation> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.insert(device_id.to_string(), tx);
        }
        rx
    }

    fn listener(&self, device_id: &str) -> Option<tokio::sync::mpsc::UnboundedSender<Invocation>> {
        let mut listeners = self.listeners.lock().ok()?;
        match listeners.get(device_id) {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                listeners.remove(device_id);
                None
            }
            None => None,
        }
    }

    fn register(&self, device_id: &str) -> (String, oneshot::Receiver<MethodResponse>) {
        let rid = format!("{:x}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(rid.clone(), (device_id.to_string(), tx));
        }
        (rid, rx)
    }

    fn forget(&self, rid: &str) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(rid);
        }
    }

    /// A device's answer. Ignored unless this device was asked under this id.
    pub fn complete(&self, device_id: &str, rid: &str, response: MethodResponse) -> bool {
        let entry = match self.waiting.lock() {
            Ok(mut waiting) => match waiting.get(rid) {
                Some((owner, _)) if owner == device_id => waiting.remove(rid),
                _ => None,
            },
            Err(_) => None,
        };
        match entry {
            Some((_, tx)) => tx.send(response).is_ok(),
            None => false,
        }
    }
}

/// Method names: printable US-ASCII without separators (hub-protocol §2.5).
fn check_method_name(name: &str) -> Result<(), HubError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !"$()<>@,;:\\\"/[]?={}".contains(c));
    if ok {
        Ok(())
    } else {
        Err(HubError::new(
            HubErrorCode::ArgumentInvalid,
            "methodName must be printable ASCII without $ ( ) < > @ , ; : \\ \" / [ ] ? = { } or spaces",
        ))
    }
}

impl Hub {
    /// Invokes a direct method and waits for the device's answer.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        request: MethodRequest,
    ) -> Result<MethodResponse, HubError> {
        check_method_name(&request.method_name)?;
        let response_timeout = request.response_timeout_in_seconds.unwrap_or(30);
        let connect_timeout = request.connect_timeout_in_seconds.unwrap_or(0);
        if !(5..=300).contains(&response_timeout) || connect_timeout > 300 {
            return Err(HubError::new(
                HubErrorCode::ArgumentInvalid,
                "responseTimeoutInSeconds must be 5 to 300 and connectTimeoutInSeconds 0 to 300",
            ));
        }
        let payload = request.payload.unwrap_or(Value::Null);
        let body = if payload.is_null() {
            Vec::new()
        } else {
            payload.to_string().into_bytes()
        };
        if body.len() > MAX_PAYLOAD {
            return Err(HubError::new(
                HubErrorCode::MessageTooLarge,
                "a method payload is at most 128 KiB",
            ));
        }
        self.require_device(device_id).await?;
        let call = MethodCall {
            method_name: request.method_name,
            body: String::from_utf8(body).unwrap_or_default(),
            response_timeout_in_seconds: response_timeout,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(connect_timeout);
        let outcome = loop {
            // A connection of this replica, else (replica mode) the replica holding one.
            let outcome = match self.call_local(device_id, &call).await {
                MethodOutcome::NotListening => match self.remote_method(device_id, &call).await {
                    None => MethodOutcome::NotListening,
                    Some(Ok(outcome)) => outcome,
                    Some(Err(e)) => {
                        return Err(HubError::new(
                            HubErrorCode::GatewayTimeout,
                            format!("the replica holding device {device_id} failed: {e}"),
                        ));
                    }
                },
                outcome => outcome,
            };
            match outcome {
                MethodOutcome::NotListening if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                outcome => break outcome,
            }
        };
        match outcome {
            MethodOutcome::Answered { status, payload } => Ok(MethodResponse { status, payload }),
            MethodOutcome::NotListening => Err(HubError::new(
                HubErrorCode::DeviceNotOnline,
                format!("device {device_id} is not connected or not listening for methods"),
            )),
            MethodOutcome::TimedOut => Err(HubError::new(
                HubErrorCode::GatewayTimeout,
                format!(
                    "device {device_id} did not answer within {} s",
                    call.response_timeout_in_seconds
                ),
            )),
        }
    }

    /// Calls the method on this replica's connection of the device and waits for the answer.
    pub(super) async fn call_local(&self, device_id: &str, call: &MethodCall) -> MethodOutcome {
        let topic_probe = format!("{METHODS_TOPIC}{}/?$rid=0", call.method_name);
        let outbound = match self.outbound(device_id) {
            Some(o) if o.is_subscribed(&topic_probe) => Some(o),
            _ => None,
        };
        let listener = match &outbound {
            Some(_) => None,
            None => match self.methods.listener(device_id) {
                Some(listener) => Some(listener),
                None => return MethodOutcome::NotListening,
            },
        };
        HubMetrics::count(&self.metrics.method_calls, 1);
        let (rid, answer) = self.methods.register(device_id);
        let sent = match (outbound, listener) {
            (Some(outbound), _) => {
                let topic = format!("{METHODS_TOPIC}{}/?$rid={rid}", call.method_name);
                let body = Bytes::from(call.body.clone().into_bytes());
                outbound.send(topic, body, QoS::AtMostOnce).is_ok()
            }
            (None, Some(listener)) => listener
                .send(Invocation {
                    rid: rid.clone(),
                    method_name: call.method_name.clone(),
                    body: call.body.clone(),
                })
                .is_ok(),
            (None, None) => false,
        };
        if !sent {
            self.methods.forget(&rid);
            return MethodOutcome::NotListening;
        }
        let wait = Duration::from_secs(call.response_timeout_in_seconds);
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(response)) => MethodOutcome::from_response(response),
            Ok(Err(_)) | Err(_) => {
                self.methods.forget(&rid);
                MethodOutcome::TimedOut
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asked_device_can_answer() {
        let pending = PendingMethods::default();
        let (rid, mut rx) = pending.register("dev1");
        let response = MethodResponse {
            status: 200,
            payload: Value::Null,
        };
        assert!(!pending.complete("dev2", &rid, response.clone()));
        assert!(pending.complete("dev1", &rid, response.clone()));
        assert_eq!(rx.try_recv().unwrap(), response);
        assert!(!pending.complete("dev1", &rid, response), "answers once");
    }

    #[test]
    fn method_names() {
        assert!(check_method_name("reboot_now-2").is_ok());
        for bad in ["", "a b", "a/b", "a?b", "é", "$x"] {
            assert!(check_method_name(bad).is_err(), "{bad}");
        }
    }
}
