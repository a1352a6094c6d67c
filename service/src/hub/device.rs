//! Device identities as the IoT Hub registry keeps them (hub-protocol §4.3).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;

use super::error::{HubError, HubErrorCode};

/// How a device proves itself on MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthenticationType {
    Sas,
    SelfSigned,
    CertificateAuthority,
    None,
}

impl AuthenticationType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthenticationType::Sas => "sas",
            AuthenticationType::SelfSigned => "selfSigned",
            AuthenticationType::CertificateAuthority => "certificateAuthority",
            AuthenticationType::None => "none",
        }
    }
}

/// A stored device identity. Dynamic fields (connection state, C2D count) are added on read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub status: DeviceStatus,
    pub status_reason: Option<String>,
    pub status_updated_time: String,
    pub authentication_type: AuthenticationType,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Enabled,
    Disabled,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Enabled => "enabled",
            DeviceStatus::Disabled => "disabled",
        }
    }
}

/// "Never", as msrest parses it.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// IoT Hub device ids ([`crate::ids::device_id`]), refused in the hub's terms.
pub fn check_device_id(id: &str) -> Result<(), HubError> {
    crate::ids::device_id(id).map_err(|e| HubError::new(HubErrorCode::ArgumentInvalid, e.message))
}

/// 32 random bytes, base64: the shape of IoT Hub's generated keys.
pub fn generate_device_key() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceInput {
    device_id: Option<String>,
    status: Option<String>,
    status_reason: Option<String>,
    authentication: Option<AuthenticationInput>,
    capabilities: Option<CapabilitiesInput>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthenticationInput {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<KeysInput>,
    x509_thumbprint: Option<ThumbprintsInput>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeysInput {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThumbprintsInput {
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CapabilitiesInput {
    iot_edge: Option<bool>,
}

fn invalid(message: impl Into<String>) -> HubError {
    HubError::new(HubErrorCode::ArgumentInvalid, message)
}

/// A thumbprint as compared: upper-case hex, no separators; SHA-1 (40) or SHA-256 (64).
pub fn normalize_thumbprint(text: &str) -> Result<String, HubError> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if (hex.len() == 40 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(invalid(
            "a thumbprint is the SHA-1 (40 hex digits) or SHA-256 (64) of the certificate",
        ))
    }
}

impl Device {
    /// Validates a PUT body for `id`. `previous` is the stored identity being replaced: its
    /// generation id is kept, and omitted keys are kept rather than regenerated.
    pub fn from_request(
        id: &str,
        body: Value,
        previous: Option<&Device>,
        now: &str,
    ) -> Result<Device, HubError> {
        check_device_id(id)?;
        if !body.is_object() {
            return Err(invalid("the body must be a JSON object"));
        }
        let input: DeviceInput = serde_path_to_error::deserialize(body)
            .map_err(|e| invalid(format!("{}: {}", e.path(), e.inner())))?;
        if let Some(body_id) = &input.device_id
            && body_id != id
        {
            return Err(invalid(format!(
                "deviceId {body_id:?} differs from the id in the path, {id:?}"
            )));
        }
        let status = match input
            .status
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("enabled") => DeviceStatus::Enabled,
            Some("disabled") => DeviceStatus::Disabled,
            Some(other) => {
                return Err(invalid(format!(
                    "status {other:?} must be enabled or disabled"
                )));
            }
        };
        if input.status_reason.as_ref().is_some_and(|r| r.len() > 128) {
            return Err(invalid("statusReason is at most 128 characters"));
        }
        let authentication = input.authentication.unwrap_or(AuthenticationInput {
            kind: None,
            symmetric_key: None,
            x509_thumbprint: None,
        });
        let kind = match authentication.kind.as_deref() {
            None | Some("sas") => AuthenticationType::Sas,
            Some("selfSigned") => AuthenticationType::SelfSigned,
            Some("certificateAuthority") => AuthenticationType::CertificateAuthority,
            Some("none") => AuthenticationType::None,
            Some(other) => {
                return Err(invalid(format!(
                    "authentication.type {other:?} must be sas, selfSigned, certificateAuthority or none"
                )));
            }
        };
        let mut device = Device {
            device_id: id.to_string(),
            generation_id: previous
                .map(|p| p.generation_id.clone())
                .unwrap_or_else(new_generation_id),
            status,
            status_reason: input.status_reason,
            status_updated_time: match previous {
                Some(p) if p.status == status => p.status_updated_time.clone(),
                Some(_) => now.to_string(),
                None => NEVER.to_string(),
            },
            authentication_type: kind,
            primary_key: None,
            secondary_key: None,
            primary_thumbprint: None,
            secondary_thumbprint: None,
            iot_edge: input.capabilities.and_then(|c| c.iot_edge).unwrap_or(false),
        };
        match kind {
            AuthenticationType::Sas => {
                let keys = authentication.symmetric_key;
                let given = |k: Option<&KeysInput>, primary: bool| {
                    k.and_then(|k| {
                        if primary {
                            k.primary_key.clone()
                        } else {
                            k.secondary_key.clone()
                        }
                    })
                    .filter(|k| !k.is_empty())
                };
                let kept = |primary: bool| {
                    previous
                        .filter(|p| p.authentication_type == AuthenticationType::Sas)
                        .and_then(|p| {
                            if primary {
                                p.primary_key.clone()
                            } else {
                                p.secondary_key.clone()
                            }
                        })
                };
                for (primary, field) in [(true, "primaryKey"), (false, "secondaryKey")] {
                    let key = match given(keys.as_ref(), primary) {
                        Some(key) => {
                            symmetric_key::validate_key(&key).map_err(|e| {
                                invalid(format!("authentication.symmetricKey.{field}: {e}"))
                            })?;
                            key
                        }
                        None => kept(primary).unwrap_or_else(generate_device_key),
                    };
                    if primary {
                        device.primary_key = Some(key);
                    } else {
                        device.secondary_key = Some(key);
                    }
                }
            }
            AuthenticationType::SelfSigned => {
                let thumbprints = authentication.x509_thumbprint.ok_or_else(|| {
                    invalid("a selfSigned device needs authentication.x509Thumbprint")
                })?;
                let primary = thumbprints
                    .primary_thumbprint
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        invalid("authentication.x509Thumbprint.primaryThumbprint is required")
                    })?;
                device.primary_thumbprint = Some(normalize_thumbprint(&primary)?);
                device.secondary_thumbprint = thumbprints
                    .secondary_thumbprint
                    .filter(|t| !t.is_empty())
                    .map(|t| normalize_thumbprint(&t))
                    .transpose()?;
            }
            AuthenticationType::CertificateAuthority | AuthenticationType::None => {}
        }
        Ok(device)
    }

    /// The registry view (hub-protocol §4.3), with the dynamic fields supplied by the caller.
    pub fn view(&self, etag: &str, connection: &ConnectionView) -> Value {
        json!({
            "deviceId": self.device_id,
            "moduleId": Value::Null,
            "generationId": self.generation_id,
            "etag": etag,
            "connectionState": connection.state(),
            "status": self.status.as_str(),
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": connection.state_updated_time,
            "statusUpdatedTime": self.status_updated_time,
            "lastActivityTime": connection.last_activity_time,
            "cloudToDeviceMessageCount": connection.c2d_pending,
            "authentication": self.authentication_view(),
            "capabilities": {"iotEdge": self.iot_edge},
            "deviceScope": Value::Null,
            "parentScopes": [],
        })
    }

    pub fn authentication_view(&self) -> Value {
        json!({
            "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
            "x509Thumbprint": {
                "primaryThumbprint": self.primary_thumbprint,
                "secondaryThumbprint": self.secondary_thumbprint,
            },
            "type": self.authentication_type.as_str(),
        })
    }

    /// Whether a change from `self` to `next` must end the device's current connection.
    pub fn credentials_changed(&self, next: &Device) -> bool {
        self.authentication_type != next.authentication_type
            || self.primary_key != next.primary_key
            || self.secondary_key != next.secondary_key
            || self.primary_thumbprint != next.primary_thumbprint
            || self.secondary_thumbprint != next.secondary_thumbprint
            || next.status == DeviceStatus::Disabled
    }
}

/// What the registry reports about a device's connection.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    pub connected: bool,
    pub state_updated_time: String,
    pub last_activity_time: String,
    pub c2d_pending: usize,
}

impl ConnectionView {
    pub fn state(&self) -> &'static str {
        if self.connected {
            "Connected"
        } else {
            "Disconnected"
        }
    }
}

/// Azure's generation ids look like .NET ticks; ours are a random 18-digit number.
fn new_generation_id() -> String {
    format!("63{:016}", rand::random::<u64>() % 10_000_000_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_devices_get_keys_and_keep_them() {
        let first = Device::from_request(
            "dev1",
            json!({"deviceId": "dev1", "authentication": {"type": "sas"}}),
            None,
            "t0",
        )
        .unwrap();
        assert_eq!(
            B64.decode(first.primary_key.as_deref().unwrap())
                .unwrap()
                .len(),
            32
        );
        let second = Device::from_request(
            "dev1",
            json!({"status": "Disabled", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null}}}),
            Some(&first),
            "t1",
        )
        .unwrap();
        assert_eq!(second.primary_key, first.primary_key);
        assert_eq!(second.generation_id, first.generation_id);
        assert_eq!(second.status, DeviceStatus::Disabled);
        assert_eq!(second.status_updated_time, "t1");
        assert!(
            first.credentials_changed(&second),
            "disabling ends the connection"
        );
    }

    #[test]
    fn thumbprints_are_normalized_and_checked() {
        let device = Device::from_request(
            "x",
            json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "aa:".repeat(20)}}}),
            None,
            "t",
        )
        .unwrap();
        assert_eq!(device.primary_thumbprint.unwrap(), "AA".repeat(20));
        for bad in [
            json!({"authentication": {"type": "selfSigned"}}),
            json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "zz"}}}),
            json!({"authentication": {"type": "psk"}}),
            json!({"status": "sleeping"}),
            json!({"deviceId": "other"}),
            json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "short"}}}),
            json!([]),
        ] {
            let error = Device::from_request("x", bad.clone(), None, "t").unwrap_err();
            assert_eq!(error.code, HubErrorCode::ArgumentInvalid, "{bad}");
        }
    }

    #[test]
    fn device_ids() {
        assert!(check_device_id("dev-1.a+b%c_d#e*f?g!h(i)j,k=l@m$n'o:p;q").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(check_device_id(bad).is_err(), "{bad}");
        }
    }
}
