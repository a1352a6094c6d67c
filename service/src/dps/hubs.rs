//! Hubs linked to this provisioning service (dps-protocol §4.7): how they join, how their health
//! is judged, and how the provisioning service manages device identities on them.
//!
//! - A hub joins with a **join token**: a short-lived HS256 JWT of audience
//!   [`JOIN_AUDIENCE`], minted here (`zerotouch hub join-token`, `POST /hubs/joinTokens`) and
//!   usable once (its `jti` is recorded in [`Collection::JoinTokens`]). The token also carries
//!   the SHA-256 of this service's root CA certificate (`cah`), so the joining hub can check it
//!   talks to the right service before it trusts anything it is told.
//! - At join the hub gets its TLS server certificate from our CA, a heartbeat token, and the
//!   trust bundle devices' certificates chain to. The record ([`LinkedHub`]) lives in
//!   [`Collection::LinkedHubs`], so every replica sees the same hubs.
//! - A hub is **healthy** when it is active (not draining), its last heartbeat is within the
//!   heartbeat timeout, and no call to it failed since that heartbeat.
//! - [`HubTarget`] is one hub as registration sees it: the built-in hub of this process, or a
//!   remote hub reached over TLS with the credential it handed over at join.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::Error as AuthError;
use crate::db::{Change, Collection, DocumentStore, StoreError, Write};
use crate::hub::Hub;
use crate::hub::error::HubErrorCode;

/// Audience of join tokens; a management token (another audience) cannot join a hub.
pub const JOIN_AUDIENCE: &str = "zerotouch-hub-join";
/// Longest join-token lifetime we mint: join tokens are meant to be short-lived.
pub const MAX_JOIN_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// Name of the hub policy the provisioning service uses on a joined hub.
pub const PROVISIONING_POLICY: &str = "provisioningservice";
/// Validity of a joined hub's TLS server certificate.
pub const HUB_CERT_DAYS: u32 = 365;

/// Claims of a join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinClaims {
    pub iss: String,
    pub aud: String,
    /// Unique id: a token is accepted once.
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
    /// Hex SHA-256 of the DER of this service's root CA certificate.
    pub cah: String,
}

/// Hex SHA-256 of the first certificate of a PEM bundle (the root, in our bundles' order is
/// not guaranteed, so callers pass the root alone).
pub fn certificate_hash(pem: &str) -> Option<String> {
    let der = zerotouch_attestation::x509::parse_certificate(pem).ok()?;
    Some(sha256_hex(der.der()))
}

/// Mints a single-use join token valid for `ttl_seconds`.
pub fn mint_join_token(
    secret_b64: &str,
    id_scope: &str,
    root_cert_pem: &str,
    now_unix: u64,
    ttl_seconds: u64,
) -> Result<String, String> {
    if ttl_seconds == 0 || ttl_seconds > MAX_JOIN_TTL_SECONDS {
        return Err(format!(
            "a join token lives between 1 second and {} days",
            MAX_JOIN_TTL_SECONDS / 86_400
        ));
    }
    let secret = B64
        .decode(secret_b64)
        .map_err(|_| "the token secret is not base64".to_string())?;
    let cah = certificate_hash(root_cert_pem).ok_or("the root CA certificate does not parse")?;
    let claims = JoinClaims {
        iss: crate::auth::token_issuer(id_scope),
        aud: JOIN_AUDIENCE.into(),
        jti: hex::encode(rand::random::<[u8; 16]>()),
        iat: now_unix,
        exp: now_unix.saturating_add(ttl_seconds),
        cah,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret),
    )
    .map_err(|e| e.to_string())
}

/// Checks a join token's signature, audience, issuer and expiry (not whether it was used).
pub fn verify_join_token(
    token: &str,
    secret_b64: &str,
    id_scope: &str,
    now_unix: u64,
) -> Result<JoinClaims, AuthError> {
    let secret = B64
        .decode(secret_b64)
        .map_err(|e| AuthError::Internal(format!("the join secret is not base64: {e}")))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[JOIN_AUDIENCE]);
    validation.set_issuer(&[crate::auth::token_issuer(id_scope)]);
    validation.leeway = 0;
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp", "aud", "iss", "jti"]);
    let claims =
        jsonwebtoken::decode::<JoinClaims>(token, &DecodingKey::from_secret(&secret), &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                        AuthError::InvalidAudience(
                            "this is not a join token of this provisioning service".into(),
                        )
                    }
                    ErrorKind::InvalidSignature => AuthError::InvalidSignature(
                        "the join token signature does not verify".into(),
                    ),
                    _ => AuthError::Unauthorized("malformed join token".into()),
                }
            })?
            .claims;
    if claims.exp <= now_unix {
        return Err(AuthError::Expired(
            "the join token has expired: mint a new one with `zerotouch hub join-token`".into(),
        ));
    }
    Ok(claims)
}

/// Reads a join token's claims without checking its signature: what the joining hub does to
/// learn the CA fingerprint (the provisioning service checks the signature).
pub fn peek_join_claims(token: &str) -> Result<JoinClaims, String> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("a join token is a JWT: three dot-separated parts")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "the join token payload is not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the join token payload: {e}"))
}

/// Why a join token cannot be spent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("this join token was already used: mint a new one")]
    Used,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Marks a join token used. A second use is refused.
pub fn consume_join_token(store: &dyn DocumentStore, claims: &JoinClaims) -> Result<(), JoinError> {
    let body = json!({"usedAtUnix": crate::time::now_unix(), "exp": claims.exp});
    match store.put(
        Collection::JoinTokens,
        &claims.jti,
        None,
        &body,
        Write::Create,
    ) {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict) => Err(JoinError::Used),
        Err(e) => Err(JoinError::Store(e)),
    }
}

/// A linked hub's state as an operator sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HubState {
    /// Receives new devices when healthy.
    Active,
    /// Keeps its devices, receives no new ones.
    Draining,
}

/// The credential the provisioning service uses on a hub's service API.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubCredential {
    pub key_name: String,
    pub key: String,
}

impl std::fmt::Debug for HubCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCredential")
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// A joined hub as stored in [`Collection::LinkedHubs`] (keyed by `name`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    /// Host name devices connect to (`assignedHub`).
    pub name: String,
    pub location: Option<String>,
    /// 1..=1000.
    pub allocation_weight: u32,
    pub apply_allocation_policy: bool,
    /// Base URL of the hub's service API, e.g. `https://hub1.example:8443`.
    pub service_url: String,
    pub credential: HubCredential,
    pub state: HubState,
    pub joined_at_utc: String,
    pub last_heartbeat_unix: u64,
    /// Last failed call from a provisioning service; 0 when none.
    #[serde(default)]
    pub last_failure_unix: u64,
    /// Hex SHA-256 of the heartbeat token handed out at join.
    pub heartbeat_token_sha256: String,
}

/// Health as a management view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// No heartbeat within the timeout, or a call failed since the last heartbeat.
    Unhealthy,
    Draining,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Draining => "draining",
        }
    }
}

impl LinkedHub {
    pub fn health(&self, now_unix: u64, timeout_seconds: u64) -> Health {
        if self.state == HubState::Draining {
            return Health::Draining;
        }
        let fresh = now_unix.saturating_sub(self.last_heartbeat_unix) <= timeout_seconds;
        if fresh && self.last_failure_unix <= self.last_heartbeat_unix {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }

    /// The management view: no credential, no token hash.
    pub fn view(&self, now_unix: u64, timeout_seconds: u64) -> Value {
        json!({
            "name": self.name,
            "location": self.location,
            "allocationWeight": self.allocation_weight,
            "applyAllocationPolicy": self.apply_allocation_policy,
            "serviceUrl": self.service_url,
            "state": self.state,
            "health": self.health(now_unix, timeout_seconds).as_str(),
            "joinedAtUtc": self.joined_at_utc,
            "lastHeartbeatUtc": crate::time::rfc3339_of_unix(self.last_heartbeat_unix),
            "lastFailureUtc": (self.last_failure_unix > 0)
                .then(|| crate::time::rfc3339_of_unix(self.last_failure_unix)),
            "builtIn": false,
        })
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn hash_token(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Reads one linked hub.
pub fn load(store: &dyn DocumentStore, name: &str) -> Result<Option<LinkedHub>, StoreError> {
    store
        .get(Collection::LinkedHubs, name)?
        .map(|d| serde_json::from_value::<LinkedHub>(d.body))
        .transpose()
        .map_err(|e| StoreError::Backend(format!("linked hub record: {e}")))
}

/// Every linked hub, in name order.
pub fn load_all(store: &dyn DocumentStore) -> Result<Vec<LinkedHub>, StoreError> {
    store
        .list_all(Collection::LinkedHubs, None)?
        .into_iter()
        .map(|d| serde_json::from_value::<LinkedHub>(d.body))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Backend(format!("linked hub record: {e}")))
}

/// Read-modify-write of one hub record under its etag (`DocumentStore::update`): `change`
/// returns whether it changed the record. `None` when there is no such hub.
pub fn update(
    store: &dyn DocumentStore,
    name: &str,
    change: impl Fn(&mut LinkedHub) -> bool,
) -> Result<Option<LinkedHub>, StoreError> {
    let updated = store.update::<_, StoreError>(Collection::LinkedHubs, name, |doc| {
        let Some(doc) = doc else {
            return Ok(Change::Keep(None));
        };
        let mut hub: LinkedHub = serde_json::from_value(doc.body.clone())
            .map_err(|e| StoreError::Backend(format!("linked hub record: {e}")))?;
        if !change(&mut hub) {
            return Ok(Change::Keep(Some(hub)));
        }
        let body = serde_json::to_value(&hub).map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Change::put(body, Some(hub)))
    })?;
    Ok(updated.result)
}

/// A moved device's identity that could not be removed from its old hub when it moved. The
/// provisioning service retries the removal until it succeeds ([`Collection::StaleIdentities`]);
/// a device that comes back to that hub first cancels it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaleIdentity {
    pub hub: String,
    pub device_id: String,
    pub registration_id: String,
    pub since_unix: u64,
    pub attempts: u32,
    pub last_error: String,
}

impl StaleIdentity {
    /// The document id: the hub's lower-cased name and the (case-sensitive) device id.
    pub fn key(hub: &str, device_id: &str) -> String {
        format!("{}/{device_id}", hub.to_ascii_lowercase())
    }
}

/// Records (or updates) a removal still to be done.
pub fn save_stale(store: &dyn DocumentStore, stale: &StaleIdentity) -> Result<(), StoreError> {
    let body = serde_json::to_value(stale).map_err(|e| StoreError::Backend(e.to_string()))?;
    store
        .put(
            Collection::StaleIdentities,
            &StaleIdentity::key(&stale.hub, &stale.device_id),
            Some(&stale.hub.to_ascii_lowercase()),
            &body,
            Write::Upsert,
        )
        .map(drop)
}

/// Forgets a removal (done, or no longer wanted). Already gone is fine.
pub fn forget_stale(
    store: &dyn DocumentStore,
    hub: &str,
    device_id: &str,
) -> Result<(), StoreError> {
    match store.delete(
        Collection::StaleIdentities,
        &StaleIdentity::key(hub, device_id),
        None,
    ) {
        Ok(_) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removals still to be done, on one hub or on all.
pub fn load_stale(
    store: &dyn DocumentStore,
    hub: Option<&str>,
) -> Result<Vec<StaleIdentity>, StoreError> {
    let parent = hub.map(str::to_ascii_lowercase);
    store
        .list_all(Collection::StaleIdentities, parent.as_deref())?
        .into_iter()
        .map(|d| serde_json::from_value::<StaleIdentity>(d.body))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Backend(format!("stale identity record: {e}")))
}

/// Why a call to a hub did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubCallError {
    /// Create collided with an existing identity.
    AlreadyExists,
    /// The identity (or twin) is not there.
    NotFound,
    /// The hub refused the request (4xx): the device's or the enrollment's problem.
    Refused(String),
    /// The hub cannot be reached or failed (transport error, timeout, 5xx): try another hub.
    Unreachable(String),
}

impl std::fmt::Display for HubCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubCallError::AlreadyExists => write!(f, "the device already exists"),
            HubCallError::NotFound => write!(f, "the device does not exist"),
            HubCallError::Refused(m) => write!(f, "the hub refused: {m}"),
            HubCallError::Unreachable(m) => write!(f, "the hub is unreachable: {m}"),
        }
    }
}

fn from_local(error: crate::hub::error::HubError) -> HubCallError {
    match error.code {
        HubErrorCode::DeviceAlreadyExists => HubCallError::AlreadyExists,
        HubErrorCode::DeviceNotFound => HubCallError::NotFound,
        // As from a remote hub: the identity changed under the caller.
        HubErrorCode::PreconditionFailed => HubCallError::NotFound,
        _ if error.status().is_server_error() => HubCallError::Unreachable(error.message),
        _ => HubCallError::Refused(error.message),
    }
}

/// A remote hub's service API.
#[derive(Clone)]
pub struct RemoteHub {
    pub name: String,
    base_url: String,
    credential: HubCredential,
    client: reqwest::Client,
}

/// One hub as registration sees it.
#[derive(Clone)]
pub enum HubTarget {
    /// The hub running in this process.
    Local(Arc<Hub>),
    Remote(RemoteHub),
}

/// Hub service API version we speak to remote hubs.
const HUB_API_VERSION: &str = "2021-04-12";

impl RemoteHub {
    pub fn new(hub: &LinkedHub, client: reqwest::Client) -> RemoteHub {
        RemoteHub {
            name: hub.name.clone(),
            base_url: hub.service_url.trim_end_matches('/').to_string(),
            credential: hub.credential.clone(),
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}?api-version={HUB_API_VERSION}", self.base_url)
    }

    fn token(&self) -> Result<String, HubCallError> {
        let expiry = crate::time::now_unix() + 3600;
        zerotouch_attestation::symmetric_key::sign(
            &self.name,
            &self.credential.key,
            expiry,
            Some(&self.credential.key_name),
        )
        .map_err(|e| HubCallError::Refused(format!("signing for the hub: {e}")))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Option<Value>, HubCallError> {
        let path = format!("/{}", path.trim_start_matches('/'));
        let mut request = self
            .client
            .request(method, self.url(&path))
            .header("Authorization", self.token()?);
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| HubCallError::Unreachable(transport_message(&e)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| HubCallError::Unreachable(transport_message(&e)))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Some(Value::Null));
            }
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| HubCallError::Unreachable(format!("the hub answered non-JSON: {e}")));
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("Message").or(v.get("message")).cloned())
            .and_then(|m| m.as_str().map(String::from))
            .unwrap_or_else(|| format!("HTTP {status}"));
        match status.as_u16() {
            404 => Err(HubCallError::NotFound),
            409 => Err(HubCallError::AlreadyExists),
            // A precondition race: the caller re-reads and retries.
            412 => Err(HubCallError::NotFound),
            // The hub no longer accepts our credential (its policy was rotated or removed):
            // the hub's problem, not the device's; allocation goes elsewhere.
            401 | 403 => Err(HubCallError::Unreachable(format!(
                "the hub refused the provisioning credential: {message}"
            ))),
            // Busy, not a refusal: the hub timed out reading the request (408, seen under load)
            // or throttles (429). Retried, then allocation goes elsewhere.
            408 | 429 => Err(HubCallError::Unreachable(message)),
            s if s >= 500 => Err(HubCallError::Unreachable(message)),
            _ => Err(HubCallError::Refused(message)),
        }
    }
}

fn transport_message(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn encode_id(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
}

impl HubTarget {
    pub fn is_remote(&self) -> bool {
        matches!(self, HubTarget::Remote(_))
    }

    pub fn name(&self) -> &str {
        match self {
            HubTarget::Local(hub) => &hub.hostname,
            HubTarget::Remote(remote) => &remote.name,
        }
    }

    /// Creates or replaces the identity; on the built-in hub a created device gets `twin` (its
    /// tags and desired properties) in the same step. Whether the twin was written.
    async fn put_device(
        &self,
        device_id: &str,
        identity: &Value,
        if_match: Option<String>,
        twin: Option<&Value>,
    ) -> Result<bool, HubCallError> {
        match self {
            HubTarget::Local(hub) => hub
                .put_device_quietly(device_id, identity.clone(), if_match, twin)
                .await
                .map_err(from_local),
            HubTarget::Remote(remote) => remote
                .call(
                    reqwest::Method::PUT,
                    &format!("devices/{}", encode_id(device_id)),
                    Some(identity),
                    if_match.as_deref(),
                )
                .await
                .map(|_| false),
        }
    }

    /// Creates the identity or replaces it. Safe to repeat: the identity is keyed by its id,
    /// so a retry after a lost answer updates what the first attempt created. A new device
    /// costs one call (create); an existing one two (create refused, replace). With `twin`,
    /// the built-in hub creates a new device's twin with its tags and desired properties;
    /// the answer says whether it did (otherwise the caller replaces the twin).
    pub async fn ensure_device(
        &self,
        device_id: &str,
        identity: &Value,
        twin: Option<&Value>,
    ) -> Result<bool, HubCallError> {
        let mut if_match = None;
        for _ in 0..4 {
            match self
                .put_device(device_id, identity, if_match.clone(), twin)
                .await
            {
                Ok(twin_written) => return Ok(twin_written),
                Err(HubCallError::AlreadyExists) => if_match = Some("*".to_string()),
                Err(HubCallError::NotFound) => if_match = None,
                Err(e) => return Err(e),
            }
        }
        Err(HubCallError::Unreachable(
            "the device identity is being changed concurrently".into(),
        ))
    }

    /// Tags and desired properties of a device's twin; `None` if the device is not there.
    pub async fn twin(&self, device_id: &str) -> Result<Option<Value>, HubCallError> {
        let view = match self {
            HubTarget::Local(hub) => match hub.twin_view(device_id).await {
                Ok(view) => view,
                Err(e) if e.code == HubErrorCode::DeviceNotFound => return Ok(None),
                Err(e) => return Err(from_local(e)),
            },
            HubTarget::Remote(remote) => match remote
                .call(
                    reqwest::Method::GET,
                    &format!("twins/{}", encode_id(device_id)),
                    None,
                    None,
                )
                .await
            {
                Ok(view) => view.unwrap_or(Value::Null),
                Err(HubCallError::NotFound) => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        Ok(Some(json!({
            "tags": view.get("tags").cloned().unwrap_or(json!({})),
            "properties": {"desired": strip_metadata(
                view.pointer("/properties/desired").cloned().unwrap_or(json!({}))
            )},
        })))
    }

    /// Replaces the twin's tags and desired properties.
    pub async fn replace_twin(&self, device_id: &str, twin: &Value) -> Result<(), HubCallError> {
        match self {
            HubTarget::Local(hub) => hub
                .replace_twin_quietly(device_id, twin)
                .await
                .map_err(from_local),
            HubTarget::Remote(remote) => remote
                .call(
                    reqwest::Method::PUT,
                    &format!("twins/{}", encode_id(device_id)),
                    Some(twin),
                    Some("*"),
                )
                .await
                .map(drop),
        }
    }

    /// Runs `call`; on a remote hub, a transport failure or 5xx is retried twice, 100 and
    /// 200 ms later (a hiccup should neither fail a registration nor lose a device's data).
    pub async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, HubCallError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, HubCallError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(HubCallError::Unreachable(_)) if attempt < 2 && self.is_remote() => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// The etag of a device identity, `None` when it is not there.
    pub async fn device_etag(&self, device_id: &str) -> Result<Option<String>, HubCallError> {
        match self {
            HubTarget::Local(hub) => hub
                .device(device_id)
                .await
                .map(|found| found.map(|(_, etag)| etag))
                .map_err(from_local),
            HubTarget::Remote(remote) => match remote
                .call(
                    reqwest::Method::GET,
                    &format!("devices/{}", encode_id(device_id)),
                    None,
                    None,
                )
                .await
            {
                Ok(device) => Ok(device
                    .as_ref()
                    .and_then(|d| d.get("etag"))
                    .and_then(Value::as_str)
                    .map(String::from)),
                Err(HubCallError::NotFound) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Removes a device (after it moved to another hub), only if its etag is still `if_match`
    /// (`*`: any). Already gone, or changed since (someone wrote it again), is fine.
    pub async fn remove_device(&self, device_id: &str, if_match: &str) -> Result<(), HubCallError> {
        let result = match self {
            HubTarget::Local(hub) => hub
                .delete_device(device_id, Some(if_match.to_string()))
                .await
                .map(drop)
                .map_err(from_local),
            HubTarget::Remote(remote) => remote
                .call(
                    reqwest::Method::DELETE,
                    &format!("devices/{}", encode_id(device_id)),
                    None,
                    Some(if_match),
                )
                .await
                .map(drop),
        };
        match result {
            Err(HubCallError::NotFound) => Ok(()),
            other => other,
        }
    }
}

/// Drops `$metadata` and `$version` from a desired-properties object (they are the hub's).
fn strip_metadata(mut desired: Value) -> Value {
    if let Some(map) = desired.as_object_mut() {
        map.remove("$metadata");
        map.remove("$version");
    }
    desired
}

/// The HTTPS client for remote hubs: trusts only our own CA (every joined hub's certificate
/// is issued by it), bounded timeouts, no redirects.
pub fn hub_client(ca_bundle_pem: &str) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    for certificate in reqwest::Certificate::from_pem_bundle(ca_bundle_pem.as_bytes())? {
        builder = builder.add_root_certificate(certificate);
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> String {
        crate::auth::generate_token_secret()
    }

    fn root_pem() -> String {
        let ca = zerotouch_certs::CaHierarchy::generate("test").unwrap();
        ca.root_cert_pem().to_string()
    }

    #[test]
    fn join_tokens_round_trip_and_expire() {
        let secret = secret();
        let root = root_pem();
        let token = mint_join_token(&secret, "0ne00000001", &root, 1_000, 600).unwrap();
        let claims = verify_join_token(&token, &secret, "0ne00000001", 1_599).unwrap();
        assert_eq!(claims.cah, certificate_hash(&root).unwrap());
        assert_eq!(peek_join_claims(&token).unwrap().jti, claims.jti);
        let expired = verify_join_token(&token, &secret, "0ne00000001", 1_600).unwrap_err();
        assert!(matches!(expired, AuthError::Expired(_)), "{expired:?}");
        let other_scope = verify_join_token(&token, &secret, "0ne00000002", 1_000).unwrap_err();
        assert!(matches!(other_scope, AuthError::InvalidAudience(_)));
        let other_secret =
            verify_join_token(&token, &self::secret(), "0ne00000001", 1_000).unwrap_err();
        assert!(matches!(other_secret, AuthError::InvalidSignature(_)));
        assert!(mint_join_token(&secret, "s", &root, 0, 0).is_err());
        assert!(mint_join_token(&secret, "s", &root, 0, MAX_JOIN_TTL_SECONDS + 1).is_err());
    }

    #[test]
    fn management_tokens_cannot_join() {
        let secret = secret();
        let token = crate::auth::mint_token(
            &secret,
            "0ne00000001",
            "admin",
            crate::auth::Rights::ALL,
            1_000,
            600,
        )
        .unwrap();
        let error = verify_join_token(&token, &secret, "0ne00000001", 1_001).unwrap_err();
        assert!(!matches!(error, AuthError::Internal(_)), "{error:?}");
        assert!(peek_join_claims("not-a-jwt").is_err());
        assert!(peek_join_claims("a.!!!.c").is_err());
    }

    fn hub(heartbeat: u64, failure: u64, state: HubState) -> LinkedHub {
        LinkedHub {
            name: "hub1.example".into(),
            location: None,
            allocation_weight: 1,
            apply_allocation_policy: true,
            service_url: "https://hub1.example:8443".into(),
            credential: HubCredential {
                key_name: PROVISIONING_POLICY.into(),
                key: "secret".into(),
            },
            state,
            joined_at_utc: "2026-11-29T00:00:00Z".into(),
            last_heartbeat_unix: heartbeat,
            last_failure_unix: failure,
            heartbeat_token_sha256: hash_token("t"),
        }
    }

    #[test]
    fn health_rules() {
        let cases = [
            (hub(100, 0, HubState::Active), 110, Health::Healthy),
            (hub(100, 0, HubState::Active), 130, Health::Healthy),
            (hub(100, 0, HubState::Active), 131, Health::Unhealthy),
            (hub(100, 105, HubState::Active), 110, Health::Unhealthy),
            (hub(106, 105, HubState::Active), 110, Health::Healthy),
            (hub(100, 0, HubState::Draining), 100, Health::Draining),
        ];
        for (hub, now, expected) in cases {
            assert_eq!(hub.health(now, 30), expected, "{hub:?} at {now}");
        }
        let view = hub(100, 0, HubState::Active).view(100, 30);
        assert!(view.get("credential").is_none());
        assert!(!view.to_string().contains("secret"));
    }
}
