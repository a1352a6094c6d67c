//! `custom`: the DPS custom allocation webhook (dps-protocol §5.3). The one module that does I/O.
//!
//! The service builds the request body with the pure [`build_request`] (the enrollment as the
//! service API shows it, without secrets — the service strips them, on its enrollment type —
//! the `deviceRuntimeContext`, and `linkedHubs` = the §5.1 candidates), then [`WebhookClient::allocate`] POSTs it as `application/json` to the
//! enrollment's `webhookUrl`, verbatim (Azure Functions keys travel as `?code=`), and checks the
//! answer with the pure [`parse_response`]: a 2xx JSON object
//! `{"iotHubHostName": <one of linkedHubs>, "initialTwin"?: {…}, "payload"?: …}`.
//!
//! The client verifies TLS against the system roots plus an optional extra root CA bundle, refuses
//! plain `http` unless built with [`WebhookConfig::insecure_allow_http`], follows no redirects,
//! bounds the whole exchange by [`WebhookConfig::timeout`] and the response by
//! [`MAX_RESPONSE_BYTES`].
//!
//! # Failures and suggested registration error codes
//!
//! Every failure is a `failed` registration. The exact DPS codes are unpublished (\[UNCONF\], §8),
//! so we pick 400xxx sub-codes next to 400208/400209 (never 5xx: SDKs retry those forever):
//!
//! | [`WebhookError`] | errorCode | errorMessage (safe for the device) |
//! |---|---|---|
//! | `Transport` | 400210 | custom allocation webhook unreachable |
//! | `Timeout` | 400211 | custom allocation webhook timed out |
//! | `Status(n)` | 400212 | custom allocation webhook returned HTTP n |
//! | `BadResponse` | 400213 | custom allocation webhook returned an invalid response |
//! | `HubNotOffered` | 400214 | custom allocation webhook chose a hub that was not offered |
//! | `Config` | 400216 | custom allocation webhook is misconfigured |
//!
//! ([`AllocationError::Ambiguous`](crate::AllocationError::Ambiguous) takes 400215.) The error
//! strings carry details (URLs, transport messages) for the operator's log, not for the device.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::Hub;

/// Largest webhook response body read; larger is [`WebhookError::BadResponse`].
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Why the webhook did not yield a hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// Connecting, TLS, or sending/receiving failed (detail for the log). Code 400210.
    #[error("webhook transport failure: {0}")]
    Transport(String),
    /// No complete answer within the configured timeout. Code 400211.
    #[error("webhook timed out")]
    Timeout,
    /// The webhook answered with a non-2xx status (3xx included: redirects are not followed).
    /// Code 400212.
    #[error("webhook answered HTTP {0}")]
    Status(u16),
    /// The 2xx body is not the expected JSON (detail for the log). Code 400213.
    #[error("webhook response is invalid: {0}")]
    BadResponse(String),
    /// `iotHubHostName` names a hub that was not in `linkedHubs`. Code 400214.
    #[error("webhook chose hub `{0}`, which was not offered")]
    HubNotOffered(String),
    /// The client or the webhook URL is unusable (bad CA bundle, bad or non-https URL).
    /// Code 400216.
    #[error("webhook configuration: {0}")]
    Config(String),
}

/// Which kind of enrollment matched; decides the request's top-level key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Enrollment<'a> {
    /// Sent as `individualEnrollment`.
    Individual(&'a Value),
    /// Sent as `enrollmentGroup`.
    Group(&'a Value),
}

/// The attestation part of `deviceRuntimeContext`.
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeAttestation {
    /// `"symmetricKey": {}`.
    SymmetricKey,
    /// `"x509": {…}`: certificate info of the device's certificate, as the service renders it
    /// (the field names are \[UNCONF\] in §5.3; the service owns that shape).
    X509(Value),
    /// `"tpm": {"endorsementKey", "storageRootKey"?}` (base64, public keys).
    Tpm {
        /// Base64 EK public.
        endorsement_key: String,
        /// Base64 SRK public, if known.
        storage_root_key: Option<String>,
    },
}

/// What the device presented on this registration (`deviceRuntimeContext`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRuntimeContext<'a> {
    /// The registration id.
    pub registration_id: &'a str,
    /// On re-registration: the hub the device is on now.
    pub current_hub: Option<&'a str>,
    /// On re-registration: the device id it has there.
    pub current_device_id: Option<&'a str>,
    /// How it attested.
    pub attestation: RuntimeAttestation,
    /// The device's `payload`, if it sent one.
    pub payload: Option<&'a Value>,
}

/// What the webhook decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment<'a> {
    /// The chosen hub (one of the candidates).
    pub hub: &'a Hub,
    /// Overrides the enrollment's initial twin and the migration settings when present.
    pub initial_twin: Option<Value>,
    /// Echoed to the device as `registrationState.payload`.
    pub payload: Option<Value>,
}

/// The JSON body DPS POSTs to the webhook (§5.3). `enrollment` must already be without
/// secrets (it is sent as given); `candidates` become `linkedHubs`.
pub fn build_request(
    enrollment: Enrollment<'_>,
    context: &DeviceRuntimeContext<'_>,
    candidates: &[&Hub],
) -> Value {
    let mut runtime = Map::new();
    runtime.insert("registrationId".into(), context.registration_id.into());
    if let Some(hub) = context.current_hub {
        runtime.insert("currentIotHubHostName".into(), hub.into());
    }
    if let Some(device_id) = context.current_device_id {
        runtime.insert("currentDeviceId".into(), device_id.into());
    }
    match &context.attestation {
        RuntimeAttestation::SymmetricKey => {
            runtime.insert("symmetricKey".into(), json!({}));
        }
        RuntimeAttestation::X509(info) => {
            runtime.insert("x509".into(), info.clone());
        }
        RuntimeAttestation::Tpm {
            endorsement_key,
            storage_root_key,
        } => {
            let mut tpm = Map::new();
            tpm.insert("endorsementKey".into(), endorsement_key.as_str().into());
            if let Some(srk) = storage_root_key {
                tpm.insert("storageRootKey".into(), srk.as_str().into());
            }
            runtime.insert("tpm".into(), Value::Object(tpm));
        }
    }
    if let Some(payload) = context.payload {
        runtime.insert("payload".into(), payload.clone());
    }
    let (key, enrollment) = match enrollment {
        Enrollment::Individual(e) => ("individualEnrollment", e),
        Enrollment::Group(e) => ("enrollmentGroup", e),
    };
    let linked: Vec<Value> = candidates.iter().map(|h| h.name.as_str().into()).collect();
    json!({
        key: enrollment.clone(),
        "deviceRuntimeContext": Value::Object(runtime),
        "linkedHubs": linked,
    })
}

/// Checks a 2xx response body: a JSON object whose `iotHubHostName` is one of `candidates`
/// (case-insensitively), with optional `initialTwin` (object) and `payload` (any JSON; `null`
/// is absent).
pub fn parse_response<'a>(
    body: &[u8],
    candidates: &[&'a Hub],
) -> Result<Assignment<'a>, WebhookError> {
    let bad = |m: String| WebhookError::BadResponse(m);
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let hub_name = match object.remove("iotHubHostName") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(bad("`iotHubHostName` is not a string".into())),
        None => return Err(bad("`iotHubHostName` is missing".into())),
    };
    let hub = candidates
        .iter()
        .copied()
        .find(|h| h.name.eq_ignore_ascii_case(&hub_name))
        .ok_or(WebhookError::HubNotOffered(hub_name))?;
    let initial_twin = match object.remove("initialTwin") {
        None | Some(Value::Null) => None,
        Some(twin @ Value::Object(_)) => Some(twin),
        Some(_) => return Err(bad("`initialTwin` is not an object".into())),
    };
    let payload = object.remove("payload").filter(|p| !p.is_null());
    Ok(Assignment {
        hub,
        initial_twin,
        payload,
    })
}

/// How the webhook client is built (operator configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Bound on the whole exchange (connect, send, read the response).
    pub timeout: Duration,
    /// Extra trusted root CAs (PEM, one or more certificates), on top of the system roots.
    pub extra_root_ca_pem: Option<Vec<u8>>,
    /// Allow `http://` webhook URLs (tests, local development). Off in production.
    pub insecure_allow_http: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            extra_root_ca_pem: None,
            insecure_allow_http: false,
        }
    }
}

/// A reusable HTTPS client for custom allocation webhooks (one per service, any number of URLs).
#[derive(Debug, Clone)]
pub struct WebhookClient {
    client: reqwest::Client,
    insecure_allow_http: bool,
}

impl WebhookClient {
    /// Builds the client. A bad CA bundle is [`WebhookError::Config`].
    pub fn new(config: &WebhookConfig) -> Result<Self, WebhookError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!config.insecure_allow_http);
        if let Some(pem) = &config.extra_root_ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| WebhookError::Config(format!("extra root CA: {e}")))?;
            if certificates.is_empty() {
                return Err(WebhookError::Config("extra root CA: no certificate".into()));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|e| WebhookError::Config(format!("client: {e}")))?;
        Ok(Self {
            client,
            insecure_allow_http: config.insecure_allow_http,
        })
    }

    /// POSTs `request` (from [`build_request`]) to `url` and returns the webhook's choice among
    /// `candidates` (the same ones passed to `build_request`).
    pub async fn allocate<'a>(
        &self,
        url: &str,
        request: &Value,
        candidates: &[&'a Hub],
    ) -> Result<Assignment<'a>, WebhookError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| WebhookError::Config(format!("webhook URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.insecure_allow_http => {}
            other => {
                return Err(WebhookError::Config(format!(
                    "webhook URL scheme `{other}` is not allowed"
                )));
            }
        }
        let mut response = self
            .client
            .post(url)
            .json(request)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(WebhookError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_RESPONSE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        parse_response(&body, candidates)
    }
}

fn too_large() -> WebhookError {
    WebhookError::BadResponse(format!("body larger than {MAX_RESPONSE_BYTES} bytes"))
}

fn transport(error: reqwest::Error) -> WebhookError {
    if error.is_timeout() {
        return WebhookError::Timeout;
    }
    // The chain carries the useful part (connection refused, certificate verify failed). The
    // URL does not go in: its query may hold a key (Azure Functions' `?code=`), and the
    // message reaches the device and the management API as the registration's errorMessage.
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    WebhookError::Transport(message)
}

#[cfg(test)]
mod tests;
