//! Who may use the hub: shared access policies for services, device credentials for devices
//! (hub-protocol §1.4, §1.5).

use serde_json::Value;
use zerotouch_attestation::symmetric_key::{self, SasError, SasToken};

use crate::auth::{AuthorizationPolicy, Caller, Rights};
use crate::db::{Collection, DocumentStore, StoreError, Write};

use super::device::{AuthenticationType, Device, DeviceStatus};
use super::error::{HubError, HubErrorCode};

/// The policies every hub starts with (hub-protocol §1.4).
pub const DEFAULT_POLICIES: [(&str, Rights); 5] = [
    ("iothubowner", Rights::HUB_ALL),
    ("service", Rights::SERVICE_CONNECT),
    ("device", Rights::DEVICE_CONNECT),
    ("registryRead", Rights::REGISTRY_READ),
    (
        "registryReadWrite",
        Rights::REGISTRY_READ.union(Rights::REGISTRY_WRITE),
    ),
];

pub const OWNER: &str = "iothubowner";

/// Creates the default policies that are missing (first start, or after an upgrade).
pub fn ensure_policies(store: &dyn DocumentStore) -> Result<(), StoreError> {
    for (name, rights) in DEFAULT_POLICIES {
        if store.get(Collection::HubPolicies, name)?.is_some() {
            continue;
        }
        let policy = AuthorizationPolicy {
            key_name: name.to_string(),
            primary_key: super::device::generate_device_key(),
            secondary_key: super::device::generate_device_key(),
            rights: rights.to_string(),
        };
        let body = serde_json::to_value(&policy).map_err(|e| StoreError::Backend(e.to_string()))?;
        match store.put(Collection::HubPolicies, name, None, &body, Write::Create) {
            Ok(_) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn policy(
    store: &dyn DocumentStore,
    name: &str,
) -> Result<Option<AuthorizationPolicy>, StoreError> {
    store
        .get(Collection::HubPolicies, name)?
        .map(|d| serde_json::from_value::<AuthorizationPolicy>(d.body))
        .transpose()
        .map_err(|e| StoreError::Backend(e.to_string()))
}

fn unauthorized(message: impl Into<String>) -> HubError {
    HubError::new(HubErrorCode::IotHubUnauthorizedAccess, message)
}

/// Checks a service caller's SAS token (`sr={host}`, `skn={policy}`) for `needed`.
pub fn verify_service_token(
    token: &SasToken,
    policy: Option<&AuthorizationPolicy>,
    hub: &super::Hub,
    request_path: &str,
    needed: Rights,
    now_unix: u64,
) -> Result<Caller, HubError> {
    verify_policy_token(token, policy, hub, request_path, needed, now_unix, false)
}

/// [`verify_service_token`], with `text_key` for tokens signed as Service Bus and Event Hubs
/// clients sign them (the key's text is the HMAC key; `symmetric_key::verify_text_key`).
pub fn verify_policy_token(
    token: &SasToken,
    policy: Option<&AuthorizationPolicy>,
    hub: &super::Hub,
    request_path: &str,
    needed: Rights,
    now_unix: u64,
    text_key: bool,
) -> Result<Caller, HubError> {
    let policy = policy.ok_or_else(|| unauthorized("the SAS token names no policy of this hub"))?;
    let keys = [policy.primary_key.as_str(), policy.secondary_key.as_str()];
    let verified = if text_key {
        symmetric_key::verify_text_key(token, &keys, now_unix)
    } else {
        symmetric_key::verify(token, &keys, now_unix)
    };
    verified.map_err(sas_refusal)?;
    let resource = token
        .resource_decoded()
        .map_err(|_| unauthorized("sr is not URL-encoded text"))?;
    let (host, path) = split_resource(&resource);
    if !hub.is_own_host(host) {
        return Err(unauthorized(format!(
            "the token is for {host:?}, not this hub"
        )));
    }
    if !segment_prefix(path, request_path) {
        return Err(unauthorized(format!("the token is scoped to {path:?}")));
    }
    let rights = Rights::parse(&policy.rights).map_err(HubError::internal)?;
    if !rights.contains(needed) {
        return Err(HubError::new(
            HubErrorCode::Forbidden,
            format!("policy {} lacks {needed}", policy.key_name),
        ));
    }
    Ok(Caller {
        principal: format!("hub-policy:{}", policy.key_name),
        rights,
    })
}

fn sas_refusal(e: SasError) -> HubError {
    match e {
        SasError::Expired => unauthorized("the SAS token has expired"),
        _ => unauthorized("the SAS token signature does not verify"),
    }
}

/// `host/devices/x` → (`host`, `/devices/x`); a scheme in front (`https://`, and `sb://` or
/// `amqps://` as Event Hubs clients write) is dropped.
pub fn split_resource(resource: &str) -> (&str, &str) {
    let resource = ["https://", "http://", "sb://", "amqps://", "amqp://"]
        .iter()
        .find_map(|scheme| resource.strip_prefix(scheme))
        .unwrap_or(resource);
    match resource.find('/') {
        Some(i) => (&resource[..i], &resource[i..]),
        None => (resource, ""),
    }
}

/// `/a/b` covers `/a/b` and `/a/b/c`, not `/a/bc` (case-sensitive: device ids are).
pub fn segment_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    let path = path.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Why a device was refused, for metrics (`reason`) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAuthFailure {
    UnknownDevice,
    Disabled,
    BadToken,
    Expired,
    WrongScope,
    WrongKey,
    NoCredentials,
    ThumbprintMismatch,
    UntrustedCertificate,
    /// The certificate's extended key usage does not allow TLS client authentication.
    NotForClientAuth,
    WrongMechanism,
    /// The certificate was issued by this service and has been revoked.
    Revoked,
    /// The database could not be read: nothing is known about the device yet (a transient
    /// refusal, not a verdict on its credentials).
    StoreUnavailable,
}

impl DeviceAuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            DeviceAuthFailure::UnknownDevice => "unknown_device",
            DeviceAuthFailure::Disabled => "disabled",
            DeviceAuthFailure::BadToken => "malformed_token",
            DeviceAuthFailure::Expired => "expired_token",
            DeviceAuthFailure::WrongScope => "wrong_scope",
            DeviceAuthFailure::WrongKey => "wrong_key",
            DeviceAuthFailure::NoCredentials => "no_credentials",
            DeviceAuthFailure::ThumbprintMismatch => "thumbprint_mismatch",
            DeviceAuthFailure::UntrustedCertificate => "untrusted_certificate",
            DeviceAuthFailure::NotForClientAuth => "not_for_client_auth",
            DeviceAuthFailure::WrongMechanism => "wrong_mechanism",
            DeviceAuthFailure::Revoked => "revoked_certificate",
            DeviceAuthFailure::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Verifies a device's SAS token: signed with the device's own key (no `skn`), or with a hub
/// policy holding DeviceConnect (`skn`). `sr` must cover `{host}/devices/{deviceId}`.
/// Returns the token's expiry.
pub fn verify_device_token(
    token: &SasToken,
    device: &Device,
    policy: Option<&AuthorizationPolicy>,
    hub: &super::Hub,
    now_unix: u64,
) -> Result<u64, DeviceAuthFailure> {
    if device.status == DeviceStatus::Disabled {
        return Err(DeviceAuthFailure::Disabled);
    }
    let resource = token
        .resource_decoded()
        .map_err(|_| DeviceAuthFailure::BadToken)?;
    let (host, path) = split_resource(&resource);
    let target = format!("/devices/{}", device.device_id);
    if !hub.is_own_host(host) || !segment_prefix(path, &target) {
        return Err(DeviceAuthFailure::WrongScope);
    }
    let keys: Vec<&str> = match (&token.skn, policy) {
        (Some(_), Some(policy)) => {
            let rights = Rights::parse(&policy.rights).map_err(|_| DeviceAuthFailure::WrongKey)?;
            if !rights.contains(Rights::DEVICE_CONNECT) {
                return Err(DeviceAuthFailure::WrongKey);
            }
            vec![&policy.primary_key, &policy.secondary_key]
        }
        (Some(_), None) => return Err(DeviceAuthFailure::WrongKey),
        (None, _) => {
            if device.authentication_type != AuthenticationType::Sas {
                return Err(DeviceAuthFailure::WrongMechanism);
            }
            [&device.primary_key, &device.secondary_key]
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect()
        }
    };
    match symmetric_key::verify(token, &keys, now_unix) {
        Ok(_) => Ok(token.se),
        Err(SasError::Expired) => Err(DeviceAuthFailure::Expired),
        Err(_) => Err(DeviceAuthFailure::WrongKey),
    }
}

/// Verifies an X.509 device: a self-signed certificate by thumbprint, or (certificateAuthority)
/// a chain to a CA this hub trusts whose leaf CN is the device id. `trusted_cas` are PEM.
pub fn verify_device_certificate(
    device: &Device,
    leaf_der: &[u8],
    chain_der: &[Vec<u8>],
    trusted_cas: &[String],
    now_unix: i64,
) -> Result<(), DeviceAuthFailure> {
    if device.status == DeviceStatus::Disabled {
        return Err(DeviceAuthFailure::Disabled);
    }
    let leaf = zerotouch_attestation::x509::Certificate::from_der(leaf_der)
        .map_err(|_| DeviceAuthFailure::UntrustedCertificate)?;
    if !leaf.is_valid_at(now_unix) {
        return Err(DeviceAuthFailure::UntrustedCertificate);
    }
    // The rule DPS and EST apply too: a server-only certificate is no device credential.
    if !leaf.allows_client_auth() {
        return Err(DeviceAuthFailure::NotForClientAuth);
    }
    match device.authentication_type {
        AuthenticationType::SelfSigned => {
            let info = leaf.info();
            let presented = [&info.sha1_thumbprint, &info.sha256_thumbprint];
            let matches = [&device.primary_thumbprint, &device.secondary_thumbprint]
                .into_iter()
                .flatten()
                .any(|expected| presented.iter().any(|p| p.eq_ignore_ascii_case(expected)));
            if matches {
                Ok(())
            } else {
                Err(DeviceAuthFailure::ThumbprintMismatch)
            }
        }
        AuthenticationType::CertificateAuthority => {
            if leaf.common_name() != Some(device.device_id.as_str()) {
                return Err(DeviceAuthFailure::UntrustedCertificate);
            }
            let anchors: Vec<zerotouch_attestation::x509::Certificate> = trusted_cas
                .iter()
                .filter_map(|pem| zerotouch_attestation::x509::parse_certificate(pem).ok())
                .collect();
            zerotouch_attestation::x509::chains_to(&leaf, chain_der, &anchors, now_unix)
                .then_some(())
                .ok_or(DeviceAuthFailure::UntrustedCertificate)
        }
        AuthenticationType::Sas | AuthenticationType::None => {
            Err(DeviceAuthFailure::WrongMechanism)
        }
    }
}

/// The trust anchors for certificateAuthority devices: the service's own CA bundle plus every
/// verified CA certificate uploaded to the provisioning API.
pub fn trusted_cas(store: &dyn DocumentStore, own_bundle: &str) -> Result<Vec<String>, StoreError> {
    let mut pems: Vec<String> = split_pem_bundle(own_bundle);
    for doc in store.list_all(Collection::CaCertificates, None)? {
        if doc.body.get("isVerified").and_then(Value::as_bool) == Some(true)
            && let Some(cert) = doc.body.get("certificate").and_then(Value::as_str)
        {
            pems.push(cert.to_string());
        }
    }
    Ok(pems)
}

fn split_pem_bundle(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_prefixes() {
        assert!(segment_prefix("", "/devices/a"));
        assert!(segment_prefix("/devices/a", "/devices/a"));
        assert!(segment_prefix("/devices/a", "/devices/a/messages"));
        assert!(!segment_prefix("/devices/a", "/devices/ab"));
        assert!(!segment_prefix("/devices/A", "/devices/a"));
    }

    #[test]
    fn bundles_split() {
        let one = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        assert_eq!(split_pem_bundle(&format!("{one}{one}")).len(), 2);
        assert!(split_pem_bundle("").is_empty());
    }
}
