//! Zero-touch registration: the DPS device API (dps-protocol §1–§3, §5.4–§5.5).
//!
//! A device proves who it is (a SAS token, or its TLS client certificate), the matching
//! enrollment decides where it goes and what it gets, and the outcome is recorded as its
//! registration. [`Dps::register`] does all of it; `http::dps` and `dps::mqtt` are its two
//! transports. Assignment is to the built-in hub for now; allocation across hubs comes later.

pub mod hubs;
pub mod mqtt;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::{
    SasEvidence, SasToken, SymmetricKeyAttestationError, SymmetricKeyAttestor,
    SymmetricKeyEnrollment, SymmetricKeyGroup, derive_device_key,
};
use zerotouch_attestation::x509::{
    ClientCertificate, GroupCertificate, X509AttestationError, X509Attestor, X509Enrollment,
    X509Evidence, X509Group,
};
use zerotouch_attestation::{AttestedIdentity, Attestor, EnrollmentRef, Mechanism};

use crate::db::{Change, Collection, Document, DocumentStore, StoreError};
use crate::http::error::{ApiError, ErrorCode};
use crate::hub::Hub;
use crate::tls::PeerCertificates;
use hubs::{HubCallError, HubTarget};
use zerotouch_policies::{self as policies, Policy};

/// Allocation settings of this instance.
pub struct AllocationSettings {
    /// The instance default policy (for enrollments that name none).
    pub default_policy: Policy,
    pub latency: policies::LatencyMap,
    /// Seconds without a heartbeat after which a joined hub gets no new devices.
    pub heartbeat_timeout: u64,
    /// The built-in hub's own allocation settings (`[hub]`).
    pub own_hub: crate::config::Hub,
}

impl AllocationSettings {
    pub fn from_settings(settings: &crate::config::Settings) -> anyhow::Result<Self> {
        Ok(AllocationSettings {
            default_policy: match settings.dps.allocation_policy {
                crate::config::DefaultAllocationPolicy::Hashed => Policy::Hashed,
                crate::config::DefaultAllocationPolicy::GeoLatency => Policy::GeoLatency,
                crate::config::DefaultAllocationPolicy::Static => Policy::Static,
            },
            latency: settings.latency_map()?,
            heartbeat_timeout: settings.dps.hub_heartbeat_timeout_seconds,
            own_hub: settings.hub.clone(),
        })
    }
}

/// The hubs one registration may go to, and how to reach each.
#[derive(Default)]
struct LinkedHubs {
    hubs: Vec<policies::Hub>,
    targets: Vec<HubTarget>,
}

impl LinkedHubs {
    fn target(&self, name: &str) -> Option<HubTarget> {
        self.targets
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .cloned()
    }
}

/// The registration `errorCode` of an allocation failure (docs/allocation.md).
fn allocation_code(error: &policies::AllocationError) -> u32 {
    use policies::{AllocationError, WebhookError};
    match error {
        AllocationError::NoHub => 400_208,
        AllocationError::Ambiguous { .. } => 400_215,
        AllocationError::Webhook(WebhookError::Transport(_)) => 400_210,
        AllocationError::Webhook(WebhookError::Timeout) => 400_211,
        AllocationError::Webhook(WebhookError::Status(_)) => 400_212,
        AllocationError::Webhook(WebhookError::BadResponse(_)) => 400_213,
        AllocationError::Webhook(WebhookError::HubNotOffered(_)) => 400_214,
        AllocationError::Webhook(_) => 400_216,
        _ => 500_000,
    }
}

/// What a device presents.
pub enum Evidence {
    Sas(SasToken),
    Certificate(PeerCertificates),
}

/// A register request body (dps-protocol §1.4).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    pub registration_id: Option<String>,
    pub payload: Option<Value>,
    pub csr: Option<String>,
    pub tpm: Option<TpmBody>,
    /// Where the request came from (not part of the body), for `geoLatency` allocation.
    #[serde(skip)]
    pub source_address: Option<std::net::IpAddr>,
}

/// `tpm` of a register body: the device's endorsement and storage root keys (TPM2B_PUBLIC).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmBody {
    pub endorsement_key: Option<String>,
    pub storage_root_key: Option<String>,
    /// Our extension (DPS has none): the EK certificate as PEM (followed by any intermediate
    /// certificates) or base64 DER. Required for TPM groups and when manufacturer roots are set.
    pub endorsement_key_certificate: Option<String>,
}

/// An activation key handed to a TPM, waiting for the device's signed re-register.
#[derive(Debug, Clone)]
struct Challenge {
    key_b64: String,
    /// The endorsement key challenged (base64 TPM2B_PUBLIC).
    ek_b64: String,
    /// The TPM group that admitted it, when no individual enrollment did.
    group: Option<String>,
    expires_at: u64,
    /// Set once a re-register used it: polls may still sign with it, a second register may not.
    used: bool,
}

/// The result of a registration: an operation status as the device API returns it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub operation_id: String,
    /// `assigned`, `failed` or `disabled`.
    pub status: &'static str,
    pub registration_state: Value,
}

impl Outcome {
    pub fn body(&self) -> Value {
        json!({
            "operationId": self.operation_id,
            "status": self.status,
            "registrationState": self.registration_state,
        })
    }
}

pub struct Dps {
    store: Arc<dyn DocumentStore>,
    /// Bounds registrations in progress: beyond it a device gets 429 and retries, never a timeout.
    inflight: Arc<tokio::sync::Semaphore>,
    certificate_days: u32,
    /// Operations still being assigned, by operation id (to the registration id).
    pending: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Operations that failed after their requester stopped waiting: polled answers.
    failed: std::sync::Mutex<std::collections::HashMap<String, (ErrorCode, String)>>,
    /// How long an MQTT register waits for its outcome before answering `assigning`.
    pub fast_path: std::time::Duration,
    /// Outstanding TPM challenges by lower-cased registration id. Per process: a device must
    /// answer the instance that challenged it (replicas behind a load balancer need stickiness).
    challenges: std::sync::Mutex<std::collections::HashMap<String, Challenge>>,
    challenge_lifetime: u64,
    /// DER of the configured TPM manufacturer roots (`dps.tpm_manufacturer_roots`).
    manufacturer_roots: Vec<Vec<u8>>,
    pub metrics: DpsMetrics,
    pub id_scope: String,
    hub: Option<Arc<Hub>>,
    allocation: AllocationSettings,
    /// Calls joined hubs' service APIs (trusts our CA only).
    hub_client: reqwest::Client,
    /// The custom-allocation webhook client, or why it could not be built (bad CA file): a
    /// custom enrollment then fails with 400216 rather than the service refusing to start.
    webhook: Result<policies::webhook::WebhookClient, String>,
    /// Issuance profile (CRL/OCSP URLs) and certificate records.
    pub pki: Arc<crate::pki::Pki>,
}

/// What [`Dps::record_registration`] did.
enum Recorded {
    Written(Document),
    /// Nothing: the record belongs to another spelling of the id (the one given).
    SpelledFirstAs(String),
}

/// A group member registering under another spelling of an id that is registered already.
fn spelling_taken(registration_id: &str, registered_as: &str) -> ApiError {
    ApiError::new(
        ErrorCode::RegistrationIdConflict,
        format!(
            "registration ids are case-insensitive and `{registration_id}` is registered as \
             `{registered_as}`: register with that spelling, or delete the registration record \
             to register under another one"
        ),
    )
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidSignature, message)
}

fn enabled(doc: &Value) -> bool {
    doc.get("provisioningStatus").and_then(Value::as_str) != Some("disabled")
}

/// A PEM bundle (first certificate, then the rest) or one base64 DER certificate.
fn split_certificates(text: &str) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    if text.contains("-----BEGIN") {
        let mut ders: Vec<Vec<u8>> = text
            .split_inclusive("-----END CERTIFICATE-----")
            .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
            .map(der_of)
            .collect::<Option<Vec<_>>>()?;
        if ders.is_empty() {
            return None;
        }
        let first = ders.remove(0);
        Some((first, ders))
    } else {
        der_of(text).map(|d| (d, Vec::new()))
    }
}

fn der_of(pem_or_b64: &str) -> Option<Vec<u8>> {
    zerotouch_attestation::x509::parse_certificate(pem_or_b64)
        .ok()
        .map(|c| c.der().to_vec())
}

impl Dps {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        id_scope: String,
        hub: Option<Arc<Hub>>,
        instance: Arc<crate::bootstrap::Instance>,
        all_settings: &crate::config::Settings,
        manufacturer_roots: Vec<Vec<u8>>,
        pki: Arc<crate::pki::Pki>,
    ) -> anyhow::Result<Dps> {
        let settings = &all_settings.dps;
        let extra_root_ca_pem = match &settings.webhook_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("dps.webhook_ca_file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let webhook = policies::webhook::WebhookClient::new(&policies::webhook::WebhookConfig {
            timeout: std::time::Duration::from_millis(settings.webhook_timeout_ms.max(1)),
            extra_root_ca_pem,
            insecure_allow_http: settings.webhook_allow_http,
        })
        .map_err(|e| e.to_string());
        let hub_client = hubs::hub_client(&instance.ca.trust_bundle_pem())?;
        Ok(Dps {
            allocation: AllocationSettings::from_settings(all_settings)?,
            hub_client,
            webhook,
            store,
            inflight: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_registrations,
            )),
            certificate_days: settings.certificate_validity_days,
            pending: Default::default(),
            failed: Default::default(),
            fast_path: std::time::Duration::from_millis(settings.fast_path_ms),
            challenges: Default::default(),
            challenge_lifetime: settings.tpm_challenge_seconds,
            manufacturer_roots,
            metrics: DpsMetrics::new()?,
            id_scope,
            hub,
            pki,
        })
    }

    /// Starts a registration and waits up to `wait` for its outcome. It always runs to the end
    /// (in a task of its own): a caller that stops waiting gets [`Progress::Running`] and the
    /// device polls the operation.
    pub async fn begin(
        self: &Arc<Self>,
        registration_id: &str,
        evidence: Evidence,
        body: RegisterBody,
        wait: std::time::Duration,
    ) -> Result<Progress, ApiError> {
        // While writes fail (a full disk), a registration could be answered 202 and then never
        // recorded: refuse it at once, with a retry hint the SDKs follow.
        crate::db::blocking(&self.store, |store| store.check_writable()).await?;
        let operation_id = new_operation_id();
        self.lock_pending()
            .insert(operation_id.clone(), registration_id.to_ascii_lowercase());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let dps = self.clone();
        let id = registration_id.to_string();
        let op = operation_id.clone();
        tokio::spawn(async move {
            let result = dps.register_as(&op, &id, evidence, body).await;
            if let Err(e) = &result {
                let mut failed = dps.failed.lock().unwrap_or_else(|p| p.into_inner());
                if failed.len() >= 10_000 {
                    failed.clear();
                }
                failed.insert(op.clone(), (e.code, e.message.clone()));
            }
            dps.lock_pending().remove(&op);
            let _ = tx.send(result);
        });
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result.map(Progress::Done),
            Ok(Err(_)) => Err(ApiError::internal(
                "the registration task ended without an answer",
            )),
            Err(_) => Ok(Progress::Running { operation_id }),
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attests, assigns and records one registration, counted in the metrics.
    async fn register_as(
        &self,
        operation_id: &str,
        registration_id: &str,
        evidence: Evidence,
        body: RegisterBody,
    ) -> Result<Outcome, ApiError> {
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            self.metrics
                .observe(&evidence, "throttled", std::time::Duration::ZERO);
            return Err(ApiError::new(
                ErrorCode::Throttled,
                "too many registrations at once; retry after the given delay",
            ));
        };
        let started = std::time::Instant::now();
        let mechanism = match &evidence {
            Evidence::Sas(_) => "symmetricKey",
            Evidence::Certificate(_) => "x509",
        };
        let result = self
            .register_now(operation_id.to_string(), registration_id, evidence, body)
            .await;
        let outcome = match &result {
            Ok(outcome) => outcome.status,
            Err(e) if e.status().is_client_error() => "refused",
            Err(_) => "error",
        };
        self.metrics.count(mechanism, outcome, started.elapsed());
        result
    }

    async fn register_now(
        &self,
        operation_id: String,
        registration_id: &str,
        evidence: Evidence,
        body: RegisterBody,
    ) -> Result<Outcome, ApiError> {
        if let Some(body_id) = &body.registration_id
            && !body_id.eq_ignore_ascii_case(registration_id)
        {
            return Err(ApiError::field(
                ErrorCode::IdMismatch,
                "registrationId",
                "differs from the registration id in the path",
            ));
        }
        match self.authenticate(registration_id, &evidence).await? {
            Attestation::Disabled => Ok(disabled(operation_id, registration_id)),
            Attestation::Accepted(attested, enrollment) => {
                if attested.mechanism == Mechanism::Tpm {
                    self.consume_challenge(registration_id)?;
                }
                let group_id = match &attested.matched {
                    EnrollmentRef::Group(g) => Some(g.clone()),
                    EnrollmentRef::Individual(_) => None,
                };
                let outcome = self
                    .assign(
                        registration_id,
                        &attested,
                        &enrollment,
                        &evidence,
                        body,
                        operation_id,
                    )
                    .await?;
                if outcome.status == "failed" {
                    return self.keep_failed(outcome, group_id).await;
                }
                Ok(outcome)
            }
        }
    }

    /// Records a failed registration as DPS does (status `failed`, `errorCode`, `errorMessage`),
    /// so that its operation can be polled from any replica and the management API shows why.
    /// A device that was assigned before stays where it is: the record keeps that assignment.
    async fn keep_failed(
        &self,
        mut outcome: Outcome,
        group_id: Option<String>,
    ) -> Result<Outcome, ApiError> {
        let id = outcome
            .registration_state
            .get("registrationId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        outcome.registration_state["createdDateTimeUtc"] = outcome
            .registration_state
            .get("lastUpdatedDateTimeUtc")
            .cloned()
            .unwrap_or_else(|| json!(crate::time::now_rfc3339()));
        let recorded = self
            .record_registration(
                &id,
                group_id,
                outcome.registration_state.clone(),
                &outcome.operation_id,
            )
            .await?;
        match recorded {
            Recorded::Written(doc) => {
                outcome.registration_state = device_view(&doc);
                Ok(outcome)
            }
            Recorded::SpelledFirstAs(first) => Err(spelling_taken(&id, &first)),
        }
    }

    /// Writes a registration record, keeping the first creation time and the operation ids a
    /// device may still poll (read-merge-write guarded by the etag: concurrent registrations of
    /// one device all stay pollable). A `failed` record keeps the hub and device id of the
    /// assignment before it, where the device's identity still is. For a group member (`parent`)
    /// the record also decides which spelling of its id came first when two raced: a record
    /// spelled otherwise is left alone.
    async fn record_registration(
        &self,
        registration_id: &str,
        parent: Option<String>,
        record: Value,
        operation_id: &str,
    ) -> Result<Recorded, ApiError> {
        let id = registration_id.to_string();
        let this_operation = operation_id.to_string();
        let updated = crate::db::blocking(&self.store, move |s| {
            s.update::<_, StoreError>(Collection::Registrations, &id, |current| {
                if parent.is_some()
                    && let Some(first) = current.filter(|c| c.id != id)
                {
                    return Ok(Change::Keep(Some(first.id.clone())));
                }
                let mut record = record.clone();
                record["operationIds"] = recent_operations(current, &this_operation);
                if let Some(current) = current {
                    if let Some(created) = current.body.get("createdDateTimeUtc") {
                        record["createdDateTimeUtc"] = created.clone();
                    }
                    if record.get("status").and_then(Value::as_str) == Some("failed") {
                        for field in ["assignedHub", "deviceId"] {
                            if let Some(value) = current.body.get(field) {
                                record[field] = value.clone();
                            }
                        }
                    }
                }
                Ok(Change::Put {
                    body: record,
                    parent: parent.clone(),
                    result: None,
                })
            })
        })
        .await?;
        match (updated.result, updated.document) {
            (Some(first), _) => Ok(Recorded::SpelledFirstAs(first)),
            (None, Some(doc)) => Ok(Recorded::Written(doc)),
            (None, None) => Err(ApiError::internal("a written registration record is gone")),
        }
    }

    /// Checks the device's evidence against its enrollment (individual, then groups).
    /// Unknown devices and bad evidence are 401; a disabled match is [`Attestation::Disabled`].
    pub async fn authenticate(
        &self,
        registration_id: &str,
        evidence: &Evidence,
    ) -> Result<Attestation, ApiError> {
        crate::enrollment::check_registration_id(registration_id)?;
        let id = registration_id.to_string();
        let certificate = matches!(evidence, Evidence::Certificate(_));
        // An individual enrollment of the evidence's kind decides alone (§3.2, §3.3): then
        // neither the groups nor the CA certificates need reading.
        let (individual, groups, cas) = crate::db::blocking(&self.store, move |s| {
            let individual = s.get(Collection::IndividualEnrollments, &id)?;
            let kind = individual
                .as_ref()
                .and_then(|d| d.body.pointer("/attestation/type").and_then(Value::as_str));
            let decides = match kind {
                Some("x509") => certificate,
                Some("symmetricKey" | "tpm") => !certificate,
                _ => false,
            };
            if decides {
                return Ok((individual, Vec::new(), Vec::new()));
            }
            let groups = s.list_all(Collection::EnrollmentGroups, None)?;
            let cas = if certificate {
                s.list_all(Collection::CaCertificates, None)?
            } else {
                Vec::new()
            };
            Ok((individual, groups, cas))
        })
        .await?;
        let now = crate::time::now_unix();
        let tpm_enrollment = individual
            .as_ref()
            .filter(|d| d.body.pointer("/attestation/type").and_then(Value::as_str) == Some("tpm"))
            .or_else(|| {
                // A TPM admitted by a group during its challenge.
                let group = self
                    .lock_challenges()
                    .get(&registration_id.to_ascii_lowercase())
                    .and_then(|c| c.group.clone())?;
                groups.iter().find(|g| g.id.eq_ignore_ascii_case(&group))
            });
        let attested = match evidence {
            Evidence::Sas(token) if tpm_enrollment.is_some() => {
                self.attest_tpm(registration_id, token, tpm_enrollment, now)
            }
            Evidence::Sas(token) => {
                self.attest_sas(registration_id, token, individual.as_ref(), &groups, now)
            }
            Evidence::Certificate(peer) => self.attest_x509(
                registration_id,
                peer,
                individual.as_ref(),
                &groups,
                &cas,
                now,
            ),
        };
        let attested = match attested {
            Ok(attested) => attested,
            Err(Refused::Disabled) => return Ok(Attestation::Disabled),
            Err(Refused::Unauthorized(why)) => return Err(unauthorized(why)),
        };
        if let Evidence::Certificate(peer) = evidence {
            crate::pki::refuse_revoked(&self.store, &peer.leaf).await?;
        }
        let enrollment = match &attested.matched {
            EnrollmentRef::Individual(_) => individual,
            EnrollmentRef::Group(group_id) => groups
                .into_iter()
                .find(|g| g.id.eq_ignore_ascii_case(group_id)),
        }
        .ok_or_else(|| ApiError::internal("the matched enrollment vanished"))?;
        Ok(Attestation::Accepted(Box::new(attested), enrollment))
    }

    /// A TPM device's SAS, signed inside its TPM with the key of the challenge it was sent.
    fn attest_tpm(
        &self,
        registration_id: &str,
        token: &SasToken,
        enrollment: Option<&Document>,
        now: u64,
    ) -> Result<AttestedIdentity, Refused> {
        use zerotouch_attestation::tpm::{
            TpmAttestationError, TpmAttestor, TpmEnrollment, TpmEvidence,
        };
        let enrollment = enrollment.ok_or(Refused::Unauthorized("no TPM enrollment".into()))?;
        let challenge = self
            .lock_challenges()
            .get(&registration_id.to_ascii_lowercase())
            .filter(|c| c.expires_at > now)
            .cloned();
        // An individual enrollment names the EK; a group admitted the one it challenged.
        let group = challenge
            .as_ref()
            .and_then(|c| c.group.clone())
            .filter(|g| g.eq_ignore_ascii_case(&enrollment.id));
        let ek_text = match &group {
            Some(_) => challenge.as_ref().map(|c| c.ek_b64.clone()),
            None => enrollment
                .body
                .pointer("/attestation/tpm/endorsementKey")
                .and_then(Value::as_str)
                .map(String::from),
        };
        let ek = ek_text
            .and_then(|k| zerotouch_attestation::tpm::parse_endorsement_key(&k).ok())
            .ok_or_else(|| Refused::Unauthorized("no endorsement key to check against".into()))?;
        let attestor = TpmAttestor {
            id_scope: self.id_scope.clone(),
            enrollment: Some(TpmEnrollment {
                endorsement_key: ek.clone(),
                enabled: enabled(&enrollment.body),
            }),
            authentication_key: challenge.map(|c| c.key_b64),
        };
        let evidence = TpmEvidence {
            registration_id: registration_id.to_string(),
            endorsement_key: ek,
            token: Some(token.clone()),
        };
        let mut attested = attestor.attest(&evidence, now).map_err(|e| match e {
            TpmAttestationError::Disabled => Refused::Disabled,
            other => Refused::Unauthorized(format!("TPM attestation failed: {other}")),
        })?;
        if let Some(group) = group {
            attested.matched = EnrollmentRef::Group(group);
        }
        Ok(attested)
    }

    fn lock_challenges(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Challenge>> {
        self.challenges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first TPM register (no `Authorization`): checks the endorsement key against the
    /// enrollment and answers the 401 challenge body with a fresh activation blob
    /// (dps-protocol §3.4). Nothing is recorded but the challenge.
    pub async fn tpm_challenge(
        &self,
        registration_id: &str,
        tpm: &TpmBody,
    ) -> Result<Value, ApiError> {
        use zerotouch_attestation::tpm;
        crate::enrollment::check_registration_id(registration_id)?;
        let ek_text = tpm.endorsement_key.as_deref().ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidEndorsementKey,
                "tpm.endorsementKey",
                "is required",
            )
        })?;
        let ek = tpm::parse_endorsement_key(ek_text).map_err(|e| {
            ApiError::field(ErrorCode::InvalidEndorsementKey, "tpm.endorsementKey", e)
        })?;
        let srk =
            tpm::parse_storage_root_key(tpm.storage_root_key.as_deref().ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidEndorsementKey,
                    "tpm.storageRootKey",
                    "is required",
                )
            })?)
            .map_err(|e| {
                ApiError::field(ErrorCode::InvalidEndorsementKey, "tpm.storageRootKey", e)
            })?;
        let (ek_cert, ek_chain) = match tpm.endorsement_key_certificate.as_deref() {
            Some(text) => split_certificates(text).ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidCertificate,
                    "tpm.endorsementKeyCertificate",
                    "is not a PEM certificate bundle or base64 DER",
                )
            })?,
            None => (Vec::new(), Vec::new()),
        };
        let now = crate::time::now_unix() as i64;
        let check_ek_certificate = |roots: &[Vec<u8>]| -> Result<(), ApiError> {
            if ek_cert.is_empty() {
                return Err(unauthorized(
                    "an EK certificate (tpm.endorsementKeyCertificate) is required",
                ));
            }
            tpm::ek_certificate::verify(&ek_cert, &ek_chain, roots, &ek, now)
                .map_err(|e| unauthorized(e.to_string()))
        };
        let id = registration_id.to_string();
        let (individual, groups) = crate::db::blocking(&self.store, move |s| {
            Ok((
                s.get(Collection::IndividualEnrollments, &id)?,
                s.list_all(Collection::EnrollmentGroups, None)?,
            ))
        })
        .await?;
        let is_tpm = |d: &Document| {
            d.body.pointer("/attestation/type").and_then(Value::as_str) == Some("tpm")
        };
        let group = match individual.filter(is_tpm) {
            Some(enrollment) => {
                let enrolled = enrollment
                    .body
                    .pointer("/attestation/tpm/endorsementKey")
                    .and_then(Value::as_str)
                    .and_then(|k| tpm::parse_endorsement_key(k).ok())
                    .ok_or_else(|| {
                        ApiError::internal("the enrolled endorsement key is unreadable")
                    })?;
                if !enrolled.same_key(&ek) {
                    return Err(unauthorized(
                        "the endorsement key does not match the enrollment",
                    ));
                }
                // An enrollment that names the storage root key pins it too.
                if let Some(pinned) = enrollment
                    .body
                    .pointer("/attestation/tpm/storageRootKey")
                    .and_then(Value::as_str)
                    .and_then(|k| tpm::parse_storage_root_key(k).ok())
                    && !pinned.same_key(&srk)
                {
                    return Err(unauthorized(
                        "the storage root key does not match the enrollment",
                    ));
                }
                if !self.manufacturer_roots.is_empty() {
                    check_ek_certificate(&self.manufacturer_roots)?;
                }
                None
            }
            None => {
                // A TPM group admits only the C SDK's EK-derived registration id, so one EK is
                // one registration.
                if !registration_id.eq_ignore_ascii_case(&ek.registration_id()) {
                    return Err(unauthorized(
                        "no TPM enrollment for this registration id (TPM groups admit only the EK-derived id)",
                    ));
                }
                let admitted = groups.iter().filter(|g| is_tpm(g)).find(|group| {
                    let roots: Vec<Vec<u8>> = ["primary", "secondary"]
                        .iter()
                        .filter_map(|slot| {
                            group
                                .body
                                .pointer(&format!(
                                    "/attestation/tpm/rootCertificates/{slot}/certificate"
                                ))
                                .and_then(Value::as_str)
                                .and_then(der_of)
                        })
                        .collect();
                    check_ek_certificate(&roots).is_ok()
                });
                Some(admitted.map(|g| g.id.clone()).ok_or_else(|| {
                    unauthorized("no TPM enrollment or TPM group admits this endorsement key")
                })?)
            }
        };
        // The keys are the device's: one the blob cannot be built for is its error, not ours.
        let activation = tpm::build_activation(&ek, &srk)
            .map_err(|e| ApiError::field(ErrorCode::InvalidEndorsementKey, "tpm", e))?;
        self.lock_challenges().insert(
            registration_id.to_ascii_lowercase(),
            Challenge {
                key_b64: activation.hmac_key_base64(),
                ek_b64: ek_text.to_string(),
                group,
                expires_at: crate::time::now_unix() + self.challenge_lifetime,
                used: false,
            },
        );
        Ok(json!({
            "message": "Sign a SAS token with the key in authenticationKey and register again",
            "authenticationKey": activation.blob_base64(),
            "keyName": "registration",
        }))
    }

    /// Marks the registration's challenge as spent by a register (a replay is refused).
    fn consume_challenge(&self, registration_id: &str) -> Result<(), ApiError> {
        let mut challenges = self.lock_challenges();
        match challenges.get_mut(&registration_id.to_ascii_lowercase()) {
            Some(c) if !c.used => {
                c.used = true;
                Ok(())
            }
            _ => Err(unauthorized(
                "this TPM challenge was already answered; start again",
            )),
        }
    }

    fn attest_sas(
        &self,
        registration_id: &str,
        token: &SasToken,
        individual: Option<&Document>,
        groups: &[Document],
        now: u64,
    ) -> Result<AttestedIdentity, Refused> {
        let keys_of = |doc: &Value| {
            let keys = doc.pointer("/attestation/symmetricKey")?;
            Some((
                keys.get("primaryKey")?.as_str()?.to_string(),
                keys.get("secondaryKey")?.as_str()?.to_string(),
            ))
        };
        let attestor = SymmetricKeyAttestor {
            id_scope: self.id_scope.clone(),
            individual: individual.and_then(|d| {
                keys_of(&d.body).map(|(primary_key, secondary_key)| SymmetricKeyEnrollment {
                    primary_key,
                    secondary_key,
                    enabled: enabled(&d.body),
                })
            }),
            groups: groups
                .iter()
                .filter_map(|g| {
                    keys_of(&g.body).map(|(primary_key, secondary_key)| SymmetricKeyGroup {
                        group_id: g.id.clone(),
                        primary_key,
                        secondary_key,
                        enabled: enabled(&g.body),
                    })
                })
                .collect(),
        };
        let evidence = SasEvidence {
            registration_id: registration_id.to_string(),
            token: token.clone(),
        };
        attestor.attest(&evidence, now).map_err(|e| match e {
            SymmetricKeyAttestationError::Disabled => Refused::Disabled,
            other => Refused::Unauthorized(format!("symmetric key attestation failed: {other}")),
        })
    }

    fn attest_x509(
        &self,
        registration_id: &str,
        peer: &PeerCertificates,
        individual: Option<&Document>,
        groups: &[Document],
        cas: &[Document],
        now: u64,
    ) -> Result<AttestedIdentity, Refused> {
        let slot = |doc: &Value, pair: &str, slot: &str| -> Option<String> {
            doc.pointer(&format!("/attestation/x509/{pair}/{slot}/certificate"))
                .and_then(Value::as_str)
                .map(String::from)
        };
        let ca_named = |name: &str| cas.iter().find(|c| c.id.eq_ignore_ascii_case(name));
        let verified_cas: Vec<Vec<u8>> = cas
            .iter()
            .filter(|c| c.body.get("isVerified").and_then(Value::as_bool) == Some(true))
            .filter_map(|c| {
                c.body
                    .get("certificate")
                    .and_then(Value::as_str)
                    .and_then(der_of)
            })
            .collect();
        let attestor = X509Attestor {
            individual: individual
                .filter(|d| {
                    d.body.pointer("/attestation/type").and_then(Value::as_str) == Some("x509")
                })
                .map(|d| X509Enrollment {
                    primary: slot(&d.body, "clientCertificates", "primary")
                        .and_then(|c| der_of(&c))
                        .map(ClientCertificate::Der),
                    secondary: slot(&d.body, "clientCertificates", "secondary")
                        .and_then(|c| der_of(&c))
                        .map(ClientCertificate::Der),
                    enabled: enabled(&d.body),
                }),
            groups: groups
                .iter()
                .filter(|g| {
                    g.body.pointer("/attestation/type").and_then(Value::as_str) == Some("x509")
                })
                .map(|g| {
                    let mut certificates = Vec::new();
                    for s in ["primary", "secondary"] {
                        if let Some(der) =
                            slot(&g.body, "signingCertificates", s).and_then(|c| der_of(&c))
                        {
                            certificates.push(GroupCertificate::Signing(der));
                        }
                        if let Some(name) = g
                            .body
                            .pointer(&format!("/attestation/x509/caReferences/{s}"))
                            .and_then(Value::as_str)
                            && let Some(ca) = ca_named(name)
                            && let Some(der) = ca
                                .body
                                .get("certificate")
                                .and_then(Value::as_str)
                                .and_then(der_of)
                        {
                            certificates.push(GroupCertificate::CaReference {
                                name: name.to_string(),
                                certificate: der,
                                verified: ca.body.get("isVerified").and_then(Value::as_bool)
                                    == Some(true),
                            });
                        }
                    }
                    X509Group {
                        group_id: g.id.clone(),
                        certificates,
                        enabled: enabled(&g.body),
                    }
                })
                .collect(),
            verified_cas,
        };
        let evidence = X509Evidence {
            registration_id: registration_id.to_string(),
            leaf: peer.leaf.clone(),
            chain: peer.chain.clone(),
        };
        attestor.attest(&evidence, now).map_err(|e| match e {
            X509AttestationError::Disabled => Refused::Disabled,
            other => Refused::Unauthorized(format!("X.509 attestation failed: {other}")),
        })
    }

    async fn assign(
        &self,
        registration_id: &str,
        attested: &AttestedIdentity,
        enrollment: &Document,
        evidence: &Evidence,
        body: RegisterBody,
        operation_id: String,
    ) -> Result<Outcome, ApiError> {
        let group_id = match &attested.matched {
            EnrollmentRef::Group(g) => Some(g.clone()),
            EnrollmentRef::Individual(_) => None,
        };
        let now = crate::time::now_rfc3339();
        let failed = |code: u32, message: &str| Outcome {
            operation_id: operation_id.clone(),
            status: "failed",
            registration_state: json!({
                "registrationId": registration_id,
                "status": "failed",
                "errorCode": code,
                "errorMessage": message,
                "lastUpdatedDateTimeUtc": now,
            }),
        };
        let e = &enrollment.body;
        // Registration ids are case-insensitive, hub device ids are not: name the device as the
        // enrollment (individual) or the first registration (group member) spelled it.
        let id = registration_id.to_string();
        let previous =
            crate::db::blocking(&self.store, move |s| s.get(Collection::Registrations, &id))
                .await?;
        let canonical_id = match &group_id {
            None => enrollment.id.clone(),
            Some(_) => previous
                .as_ref()
                .map(|p| p.id.clone())
                .unwrap_or_else(|| registration_id.to_string()),
        };
        // A group member's credential depends on how it spells its id (the key derived from
        // it, the certificate's CN), so another spelling of a registered id is another device:
        // it must not take over the identity of the one that registered first.
        if group_id.is_some()
            && let Some(first) = previous.as_ref().filter(|p| p.id != registration_id)
        {
            return Err(spelling_taken(registration_id, &first.id));
        }
        let device_id = e
            .get("deviceId")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| canonical_id.clone());

        // Certificate from the CSR, if the device sent one (2025-07-01-preview shape).
        let issued = match &body.csr {
            None => None,
            Some(csr) => {
                let der = B64.decode(csr.trim()).map_err(|_| {
                    ApiError::field(ErrorCode::InvalidCertificate, "csr", "is not base64 DER")
                })?;
                // A device that presents a certificate we issued and sends a new CSR is
                // renewing it: the enrollment's renewal window applies, as for EST.
                let renewing = self.renewing(evidence).await?;
                if let Some(current) = &renewing {
                    crate::pki::check_renewal(
                        e,
                        current.not_before,
                        current.not_after,
                        crate::time::now_unix() as i64,
                    )?;
                }
                let issued = self
                    .pki
                    .issue(crate::pki::Issue {
                        csr_der: &der,
                        registration_id,
                        group: group_id.as_deref(),
                        validity_days: self.certificate_days,
                        actor: "dps".into(),
                        action: if renewing.is_some() {
                            crate::pki::Action::Renew
                        } else {
                            crate::pki::Action::Issue
                        },
                        detail: match &renewing {
                            Some(current) => {
                                json!({"via": "dps", "previousSerial": current.serial})
                            }
                            None => Value::Null,
                        },
                    })
                    .await
                    .map_err(|e| match e {
                        // The device's own mistake, named in its field (as DPS always did).
                        crate::pki::Error::BadCsr(e) => {
                            ApiError::field(ErrorCode::InvalidCertificate, "csr", e)
                        }
                        other => ApiError::from(other),
                    })?;
                Some(issued)
            }
        };

        // A TPM device gets a fresh activation blob; its key signs the device's hub SAS
        // (dps-protocol §3.4 step 5).
        let tpm_activation = if attested.mechanism == Mechanism::Tpm {
            let srk_text = body
                .tpm
                .as_ref()
                .and_then(|t| t.storage_root_key.clone())
                .or_else(|| {
                    e.pointer("/attestation/tpm/storageRootKey")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .ok_or_else(|| {
                    ApiError::field(
                        ErrorCode::InvalidEndorsementKey,
                        "tpm.storageRootKey",
                        "is required",
                    )
                })?;
            let ek_text = e
                .pointer("/attestation/tpm/endorsementKey")
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| {
                    self.lock_challenges()
                        .get(&registration_id.to_ascii_lowercase())
                        .map(|c| c.ek_b64.clone())
                });
            let ek = ek_text
                .and_then(|k| zerotouch_attestation::tpm::parse_endorsement_key(&k).ok())
                .ok_or_else(|| ApiError::internal("the endorsement key is unknown"))?;
            let srk =
                zerotouch_attestation::tpm::parse_storage_root_key(&srk_text).map_err(|e| {
                    ApiError::field(ErrorCode::InvalidEndorsementKey, "tpm.storageRootKey", e)
                })?;
            Some(
                zerotouch_attestation::tpm::build_activation(&ek, &srk).map_err(|e| {
                    // The SRK is the device's (from this request's body).
                    ApiError::field(ErrorCode::InvalidEndorsementKey, "tpm.storageRootKey", e)
                })?,
            )
        } else {
            None
        };

        // The hub identity (dps-protocol §5.4).
        let authentication = if issued.is_some() {
            json!({"type": "certificateAuthority"})
        } else if let Some(activation) = &tpm_activation {
            json!({"type": "sas", "symmetricKey": {
                "primaryKey": activation.hmac_key_base64(),
                "secondaryKey": crate::hub::device::generate_device_key(),
            }})
        } else {
            match (attested.mechanism, evidence) {
                (Mechanism::SymmetricKey, _) => {
                    let (primary, secondary) = match &group_id {
                        None => (
                            e.pointer("/attestation/symmetricKey/primaryKey")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            e.pointer("/attestation/symmetricKey/secondaryKey")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        ),
                        Some(_) => {
                            let derive = |k: &str| {
                                e.pointer(&format!("/attestation/symmetricKey/{k}"))
                                    .and_then(Value::as_str)
                                    .and_then(|key| derive_device_key(key, registration_id).ok())
                                    .unwrap_or_default()
                            };
                            (derive("primaryKey"), derive("secondaryKey"))
                        }
                    };
                    json!({"type": "sas", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}})
                }
                (_, Evidence::Certificate(peer)) if group_id.is_none() => {
                    let thumbprint = zerotouch_attestation::x509::Certificate::from_der(&peer.leaf)
                        .map(|c| c.info().sha256_thumbprint.clone())
                        .unwrap_or_default();
                    json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint}})
                }
                _ => json!({"type": "certificateAuthority"}),
            }
        };
        let iot_edge = e
            .pointer("/capabilities/iotEdge")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let identity = json!({
            "deviceId": device_id,
            "status": "enabled",
            "authentication": authentication,
            "capabilities": {"iotEdge": iot_edge},
        });

        // Repeat registrations follow the reprovision policy (dps-protocol §5.5).
        let reprovision = e.get("reprovisionPolicy");
        let update_hub_assignment = reprovision
            .and_then(|r| r.get("updateHubAssignment"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let migrate = reprovision
            .and_then(|r| r.get("migrateDeviceData"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        // A failed record keeps the assignment before it (`keep_failed`): the device is there.
        let previously_assigned = previous
            .as_ref()
            .filter(|p| p.body.get("assignedHub").is_some());
        let previous_hub = previously_assigned
            .and_then(|p| p.body.get("assignedHub"))
            .and_then(Value::as_str)
            .map(String::from);
        let previous_device = previously_assigned
            .and_then(|p| p.body.get("deviceId"))
            .and_then(Value::as_str)
            .map(String::from);

        // Where the device goes (dps-protocol §5): the enrollment's policy (else the instance
        // default) over the linked hubs. A hub that cannot be reached is marked unhealthy and
        // allocation runs again without it, so a dead hub fails no registration.
        let linked = self.linked_hubs().await?;
        let named: Vec<String> = e
            .get("iotHubs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect::<Vec<String>>()
            })
            .into_iter()
            .flatten()
            .chain(
                e.get("iotHubHostName")
                    .and_then(Value::as_str)
                    .map(String::from),
            )
            .collect();
        let policy = match e.get("allocationPolicy").and_then(Value::as_str) {
            Some("hashed") => Policy::Hashed,
            Some("geoLatency") => Policy::GeoLatency,
            Some("static") => Policy::Static,
            Some("custom") => Policy::Custom,
            _ => self.allocation.default_policy,
        };
        let region_hint = body
            .payload
            .as_ref()
            .and_then(|p| p.get("region"))
            .and_then(Value::as_str);
        let keep_current = !update_hub_assignment
            && previous_hub
                .as_deref()
                .is_some_and(|h| linked.target(h).is_some());
        let mut excluded: Vec<String> = Vec::new();
        let mut old_twin: Option<Option<Value>> = None;
        let (assigned_hub, substatus, webhook_payload, moved) = loop {
            let (chosen, webhook_twin, webhook_payload) = if keep_current && excluded.is_empty() {
                (previous_hub.clone().unwrap_or_default(), None, None)
            } else {
                let hubs: Vec<policies::Hub> = linked
                    .hubs
                    .iter()
                    .filter(|h| !excluded.iter().any(|x| x.eq_ignore_ascii_case(&h.name)))
                    .cloned()
                    .collect();
                let request = policies::Request {
                    registration_id,
                    enrollment_hubs: (!named.is_empty()).then_some(named.as_slice()),
                    policy,
                    region_hint,
                    source_address: body.source_address,
                };
                let candidates = match policies::candidates(&hubs, &request) {
                    Ok(c) => c,
                    Err(_) if !excluded.is_empty() => {
                        return Err(ApiError::new(
                            ErrorCode::Unavailable,
                            "no hub for this device can be reached right now; retry",
                        ));
                    }
                    Err(error) => return Ok(failed(allocation_code(&error), &error.to_string())),
                };
                if policy == Policy::Custom {
                    match self
                        .custom_allocation(
                            registration_id,
                            attested,
                            enrollment,
                            &body,
                            previous_hub.as_deref(),
                            previous_device.as_deref(),
                            &candidates,
                        )
                        .await
                    {
                        Ok(assignment) => (
                            assignment.hub.name.clone(),
                            assignment.initial_twin,
                            assignment.payload,
                        ),
                        Err(error) => {
                            tracing::warn!(registration_id, %error, "custom allocation failed");
                            let error = policies::AllocationError::Webhook(error);
                            return Ok(failed(allocation_code(&error), &error.to_string()));
                        }
                    }
                } else {
                    match policies::allocate(&candidates, &request, &self.allocation.latency) {
                        Ok(hub) => (hub.name.clone(), None, None),
                        Err(error) => {
                            return Ok(failed(allocation_code(&error), &error.to_string()));
                        }
                    }
                }
            };
            let Some(target) = linked.target(&chosen) else {
                return Err(ApiError::internal(format!(
                    "allocation chose {chosen}, which is not linked"
                )));
            };
            let moved = previous_hub
                .as_deref()
                .is_some_and(|h| !h.eq_ignore_ascii_case(&chosen));
            // What the twin becomes, and the substatus that says so.
            let initial = webhook_twin
                .clone()
                .unwrap_or_else(|| e.get("initialTwin").cloned().unwrap_or(json!({})));
            let (twin, substatus) = if previously_assigned.is_none() {
                (Some(initial), "initialAssignment")
            } else if keep_current && !moved {
                // updateHubAssignment=false: the device stays as it is.
                (None, "deviceDataMigrated")
            } else if webhook_twin.is_some() || !migrate {
                (Some(initial), "deviceDataReset")
            } else if !moved {
                (None, "deviceDataMigrated")
            } else {
                if old_twin.is_none() {
                    old_twin = Some(
                        self.read_old_twin(
                            &linked,
                            previous_hub.as_deref(),
                            previous_device.as_deref(),
                        )
                        .await,
                    );
                }
                match old_twin.clone().flatten() {
                    Some(twin) => (Some(twin), "deviceDataMigrated"),
                    None => (Some(initial), "deviceDataReset"),
                }
            };
            // A removal still pending on this hub (the device left it earlier) no longer is.
            // Only a device coming to this hub can have one: a move, or a first registration
            // after its record was deleted. Re-registering on the same hub skips the read.
            if moved || previously_assigned.is_none() {
                self.cancel_stale(&chosen, &device_id).await?;
            }
            match self
                .apply_on_hub(&target, &device_id, &identity, twin.as_ref())
                .await
            {
                Ok(()) => break (chosen, substatus, webhook_payload, moved),
                Err(HubCallError::Unreachable(message)) => {
                    tracing::warn!(hub = %chosen, %message, "hub unreachable; allocating again without it");
                    self.hub_failed(&target).await;
                    excluded.push(chosen);
                }
                Err(HubCallError::Refused(message)) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidField,
                        format!("the hub refused the device identity: {message}"),
                    ));
                }
                Err(other) => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the device identity is being changed concurrently ({other}); retry"
                        ),
                    ));
                }
            }
        };

        let mut state = json!({
            "registrationId": canonical_id,
            "createdDateTimeUtc": previous
                .as_ref()
                .and_then(|p| p.body.get("createdDateTimeUtc").cloned())
                .unwrap_or(json!(now)),
            "assignedHub": assigned_hub,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": substatus,
            "lastUpdatedDateTimeUtc": now,
        });
        match attested.mechanism {
            Mechanism::SymmetricKey => {
                state["symmetricKey"] = json!({"enrollmentGroupId": group_id});
            }
            Mechanism::X509 => {
                state["x509"] = json!({
                    "certificateInfo": attested.certificate_info,
                    "enrollmentGroupId": group_id,
                    "signingCertificateInfo": attested.signing_certificate_info,
                });
            }
            Mechanism::Tpm => {
                if let Some(activation) = &tpm_activation {
                    state["tpm"] = json!({"authenticationKey": activation.blob_base64()});
                }
            }
        }
        // The webhook's payload is what the device receives; without a webhook, its own.
        if let Some(payload) = webhook_payload.as_ref().or(body.payload.as_ref()) {
            state["payload"] = payload.clone();
        }
        if let Some(issued) = &issued {
            state["issuedCertificate"] = json!({
                "serialNumber": issued.serial_hex,
                "subject": issued.subject,
                "notBeforeUnix": issued.not_before_unix,
                "notAfterUnix": issued.not_after_unix,
            });
        }
        if let Some(issued) = &issued {
            // Kept with the record so the poll that follows a 202 can hand it over.
            state["issuedCertificateChain"] = json!(
                issued
                    .chain_der
                    .iter()
                    .map(|d| B64.encode(d))
                    .collect::<Vec<_>>()
            );
        }
        let doc = match self
            .record_registration(
                registration_id,
                group_id.clone(),
                state.clone(),
                &operation_id,
            )
            .await?
        {
            Recorded::Written(doc) => doc,
            Recorded::SpelledFirstAs(first) => {
                // Another spelling registered at the same moment and was recorded first: the
                // identity written for this one goes again (its name differs, hub ids being
                // case-sensitive), so one registration id never becomes two devices.
                if device_id != first {
                    self.remove_from_old_hub(&linked, &assigned_hub, &device_id, registration_id)
                        .await;
                }
                return Err(spelling_taken(registration_id, &first));
            }
        };
        state["createdDateTimeUtc"] = doc
            .body
            .get("createdDateTimeUtc")
            .cloned()
            .unwrap_or(json!(now));
        state["etag"] = json!(crate::hub::bare_etag(&doc.etag));
        if let Some(map) = state.as_object_mut() {
            map.remove("operationIds");
        }
        // Only now that the new assignment is stored does the old hub lose the device.
        if moved
            && let (Some(old), Some(old_device)) =
                (previous_hub.as_deref(), previous_device.as_deref())
        {
            self.remove_from_old_hub(&linked, old, old_device, registration_id)
                .await;
        }
        Ok(Outcome {
            operation_id,
            status: "assigned",
            registration_state: state,
        })
    }

    /// The hubs devices can be assigned to: the built-in hub of this process (if it runs one)
    /// and every joined hub, with their health as of now.
    async fn linked_hubs(&self) -> Result<LinkedHubs, ApiError> {
        let mut linked = LinkedHubs::default();
        if let Some(hub) = &self.hub {
            let own = &self.allocation.own_hub;
            linked.hubs.push(policies::Hub {
                name: hub.hostname.clone(),
                location: own.location.clone(),
                weight: own.allocation_weight,
                apply_allocation_policy: own.apply_allocation_policy,
                healthy: true,
            });
            linked.targets.push(HubTarget::Local(hub.clone()));
        }
        let remote = crate::db::blocking(&self.store, hubs::load_all).await?;
        let now = crate::time::now_unix();
        for record in remote {
            if linked.target(&record.name).is_some() {
                continue;
            }
            linked.hubs.push(policies::Hub {
                name: record.name.clone(),
                location: record.location.clone(),
                weight: record.allocation_weight,
                apply_allocation_policy: record.apply_allocation_policy,
                healthy: record.health(now, self.allocation.heartbeat_timeout)
                    == hubs::Health::Healthy,
            });
            linked.targets.push(HubTarget::Remote(hubs::RemoteHub::new(
                &record,
                self.hub_client.clone(),
            )));
        }
        Ok(linked)
    }

    /// Asks the enrollment's webhook (dps-protocol §5.3).
    #[allow(clippy::too_many_arguments)]
    async fn custom_allocation<'a>(
        &self,
        registration_id: &str,
        attested: &AttestedIdentity,
        enrollment: &Document,
        body: &RegisterBody,
        current_hub: Option<&str>,
        current_device_id: Option<&str>,
        candidates: &[&'a policies::Hub],
    ) -> Result<policies::webhook::Assignment<'a>, policies::WebhookError> {
        let url = enrollment
            .body
            .pointer("/customAllocationDefinition/webhookUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                policies::WebhookError::Config("the enrollment has no webhookUrl".into())
            })?;
        let client = self
            .webhook
            .as_ref()
            .map_err(|e| policies::WebhookError::Config(e.clone()))?;
        let attestation = match attested.mechanism {
            Mechanism::SymmetricKey => policies::webhook::RuntimeAttestation::SymmetricKey,
            Mechanism::X509 => policies::webhook::RuntimeAttestation::X509(json!({
                "certificateInfo": attested.certificate_info,
                "signingCertificateInfo": attested.signing_certificate_info,
            })),
            Mechanism::Tpm => policies::webhook::RuntimeAttestation::Tpm {
                endorsement_key: enrollment
                    .body
                    .pointer("/attestation/tpm/endorsementKey")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .or_else(|| body.tpm.as_ref().and_then(|t| t.endorsement_key.clone()))
                    .unwrap_or_default(),
                storage_root_key: body.tpm.as_ref().and_then(|t| t.storage_root_key.clone()),
            },
        };
        let context = policies::webhook::DeviceRuntimeContext {
            registration_id,
            current_hub,
            current_device_id,
            attestation,
            payload: body.payload.as_ref(),
        };
        let kind = match attested.matched {
            EnrollmentRef::Group(_) => policies::webhook::Enrollment::Group(&enrollment.body),
            EnrollmentRef::Individual(_) => {
                policies::webhook::Enrollment::Individual(&enrollment.body)
            }
        };
        let request = policies::webhook::build_request(kind, &context, candidates);
        client.allocate(url, &request, candidates).await
    }

    /// Creates or updates the identity on `target` and, when `twin` is given, replaces its tags
    /// and desired properties. Transport failures are retried briefly on the same hub.
    async fn apply_on_hub(
        &self,
        target: &HubTarget,
        device_id: &str,
        identity: &Value,
        twin: Option<&Value>,
    ) -> Result<(), HubCallError> {
        target
            .retrying(|| async move {
                target.ensure_device(device_id, identity).await?;
                if let Some(twin) = twin {
                    let body = json!({
                        "tags": twin.get("tags").cloned().unwrap_or(json!({})),
                        "properties": {"desired": twin
                            .pointer("/properties/desired")
                            .cloned()
                            .unwrap_or(json!({}))},
                    });
                    target.replace_twin(device_id, &body).await?;
                }
                Ok(())
            })
            .await
    }

    /// The twin (tags, desired) a moving device has on its old hub; `None` when the old hub is
    /// gone or unreachable, or the device is not there.
    async fn read_old_twin(
        &self,
        linked: &LinkedHubs,
        old_hub: Option<&str>,
        device_id: Option<&str>,
    ) -> Option<Value> {
        let target = linked.target(old_hub?)?;
        let device_id = device_id?;
        match target.retrying(|| target.twin(device_id)).await {
            Ok(twin) => twin,
            Err(error) => {
                tracing::warn!(hub = target.name(), %error, "cannot read the twin to migrate; resetting it");
                None
            }
        }
    }

    /// Removes a moved device from its old hub, retrying briefly. When that fails the removal
    /// is recorded and [`Dps::sweep_stale_identities`] retries it until it succeeds.
    async fn remove_from_old_hub(
        &self,
        linked: &LinkedHubs,
        old_hub: &str,
        device_id: &str,
        registration_id: &str,
    ) {
        let Some(target) = linked.target(old_hub) else {
            return;
        };
        let Err(error) = target
            .retrying(|| target.remove_device(device_id, "*"))
            .await
        else {
            return;
        };
        self.metrics.stale_identities.inc();
        tracing::warn!(hub = old_hub, device_id, %error, "could not remove a moved device from its old hub; will retry");
        let stale = hubs::StaleIdentity {
            hub: target.name().to_string(),
            device_id: device_id.to_string(),
            registration_id: registration_id.to_string(),
            since_unix: crate::time::now_unix(),
            attempts: 1,
            last_error: error.to_string(),
        };
        if let Err(error) =
            crate::db::blocking(&self.store, move |s| hubs::save_stale(s, &stale)).await
        {
            tracing::error!(hub = old_hub, device_id, %error, "could not record a pending removal; the old identity stays until removed by hand");
        }
    }

    /// Drops a pending removal of `device_id` from `hub` (the device is going back there).
    async fn cancel_stale(&self, hub: &str, device_id: &str) -> Result<(), ApiError> {
        let key = hubs::StaleIdentity::key(hub, device_id);
        let (hub, device_id) = (hub.to_string(), device_id.to_string());
        crate::db::blocking(&self.store, move |s| {
            // A read first: almost always there is nothing to cancel, and reads are cheap.
            if s.get(Collection::StaleIdentities, &key)?.is_some() {
                hubs::forget_stale(s, &hub, &device_id)?;
            }
            Ok(())
        })
        .await
        .map_err(ApiError::from)
    }

    /// Retries every pending removal of a moved device from its old hub; returns how many
    /// are still pending. Safe against a device moving back at the same time: the identity is
    /// removed only under the etag read before checking that the device is still elsewhere
    /// and the removal still wanted, and registration cancels the removal before it writes
    /// the identity again.
    pub async fn sweep_stale_identities(&self) -> Result<usize, ApiError> {
        let pending = crate::db::blocking(&self.store, |s| hubs::load_stale(s, None)).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let linked = self.linked_hubs().await?;
        let mut left = 0;
        for mut stale in pending {
            match self.retry_stale(&linked, &stale).await {
                Ok(()) => {
                    let (hub, device) = (stale.hub.clone(), stale.device_id.clone());
                    crate::db::blocking(&self.store, move |s| hubs::forget_stale(s, &hub, &device))
                        .await?;
                }
                Err(error) => {
                    left += 1;
                    stale.attempts = stale.attempts.saturating_add(1);
                    stale.last_error = error.to_string();
                    // Written only if the record is still there: a registration may have
                    // cancelled it meanwhile.
                    crate::db::blocking(&self.store, move |s| {
                        let key = hubs::StaleIdentity::key(&stale.hub, &stale.device_id);
                        match s.get(Collection::StaleIdentities, &key)? {
                            Some(_) => hubs::save_stale(s, &stale),
                            None => Ok(()),
                        }
                    })
                    .await?;
                }
            }
        }
        Ok(left)
    }

    /// Runs [`Dps::sweep_stale_identities`] every `every`, for as long as the server runs.
    pub async fn sweep_stale_identities_every(self: Arc<Self>, every: std::time::Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.sweep_stale_identities().await {
                Ok(0) => {}
                Ok(left) => tracing::debug!(left, "moved devices still to remove from old hubs"),
                Err(error) => tracing::warn!(%error, "cannot retry pending removals"),
            }
        }
    }

    /// One pending removal: `Ok` when nothing is left to do.
    async fn retry_stale(
        &self,
        linked: &LinkedHubs,
        stale: &hubs::StaleIdentity,
    ) -> Result<(), HubCallError> {
        // A hub no longer linked is out of our hands (docs/deployment.md).
        let Some(target) = linked.target(&stale.hub) else {
            return Ok(());
        };
        let Some(etag) = target.device_etag(&stale.device_id).await? else {
            return Ok(());
        };
        let (registration, key) = (
            stale.registration_id.clone(),
            hubs::StaleIdentity::key(&stale.hub, &stale.device_id),
        );
        let (current, wanted) = crate::db::blocking(&self.store, move |s| {
            Ok((
                s.get(Collection::Registrations, &registration)?,
                s.get(Collection::StaleIdentities, &key)?.is_some(),
            ))
        })
        .await
        .map_err(|e| HubCallError::Unreachable(ApiError::from(e).message))?;
        // Assigned there, or failed since with that assignment kept.
        let back_there = current.is_some_and(|doc| {
            doc.body
                .get("assignedHub")
                .and_then(Value::as_str)
                .is_some_and(|h| h.eq_ignore_ascii_case(&stale.hub))
                && doc.body.get("deviceId").and_then(Value::as_str)
                    == Some(stale.device_id.as_str())
        });
        if back_there || !wanted {
            return Ok(());
        }
        target.remove_device(&stale.device_id, &etag).await?;
        tracing::info!(hub = %stale.hub, device_id = %stale.device_id, attempts = stale.attempts, "removed a moved device from its old hub");
        Ok(())
    }

    /// The certificate the device authenticated with, if this service issued it (a renewal
    /// when the device also sends a CSR).
    async fn renewing(
        &self,
        evidence: &Evidence,
    ) -> Result<Option<crate::pki::LeafIdentity>, ApiError> {
        let Evidence::Certificate(peer) = evidence else {
            return Ok(None);
        };
        let Some(identity) = crate::pki::leaf_identity(&peer.leaf) else {
            return Ok(None);
        };
        let (serial, issuer) = (identity.serial.clone(), identity.issuer.clone());
        let ours = crate::db::blocking(&self.store, move |s| {
            Ok(s.get(Collection::IssuedCertificates, &serial)?
                .is_some_and(|d| d.body.get("issuer").and_then(Value::as_str) == Some(&issuer)))
        })
        .await?;
        Ok(ours.then_some(identity))
    }

    /// Records that a call to a remote hub failed: it gets no devices until its next heartbeat.
    async fn hub_failed(&self, target: &HubTarget) {
        let HubTarget::Remote(remote) = target else {
            return;
        };
        let name = remote.name.clone();
        let now = crate::time::now_unix();
        let result = crate::db::blocking(&self.store, move |s| {
            hubs::update(s, &name, |h| {
                h.last_failure_unix = now;
                true
            })
        })
        .await;
        if let Err(error) = result {
            tracing::warn!(hub = %remote.name, %error, "could not record the hub failure");
        }
    }

    /// `GET …/operations/{operationId}`: the outcome of a completed registration.
    pub async fn operation(
        &self,
        registration_id: &str,
        evidence: &Evidence,
        operation_id: &str,
    ) -> Result<Outcome, ApiError> {
        if let Attestation::Disabled = self.authenticate(registration_id, evidence).await? {
            return Ok(disabled(operation_id.to_string(), registration_id));
        }
        let running = self
            .lock_pending()
            .get(operation_id)
            .is_some_and(|r| r.eq_ignore_ascii_case(registration_id));
        if running {
            return Ok(Outcome {
                operation_id: operation_id.to_string(),
                status: "assigning",
                registration_state: json!({"registrationId": registration_id, "status": "assigning"}),
            });
        }
        let failure = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(operation_id)
            .cloned();
        if let Some((code, message)) = failure {
            return Err(ApiError::new(code, message));
        }
        let id = registration_id.to_string();
        let doc = crate::db::blocking(&self.store, move |s| s.get(Collection::Registrations, &id))
            .await?;
        let doc = doc
            .filter(|d| {
                d.body
                    .get("operationIds")
                    .and_then(Value::as_array)
                    .is_some_and(|ids| ids.iter().any(|i| i.as_str() == Some(operation_id)))
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    "no such operation for this registration",
                )
            })?;
        let mut state = doc.body.clone();
        state["etag"] = json!(crate::hub::bare_etag(&doc.etag));
        if let Some(map) = state.as_object_mut() {
            map.remove("operationIds");
        }
        let status = match state.get("status").and_then(Value::as_str) {
            Some("assigned") => "assigned",
            Some("disabled") => "disabled",
            _ => "failed",
        };
        Ok(Outcome {
            operation_id: operation_id.to_string(),
            status,
            registration_state: state,
        })
    }

    /// `POST /{idScope}/registrations/{id}`: the bare registration state.
    pub async fn status(
        &self,
        registration_id: &str,
        evidence: &Evidence,
    ) -> Result<Value, ApiError> {
        self.authenticate(registration_id, evidence).await?;
        let id = registration_id.to_string();
        let doc = crate::db::blocking(&self.store, move |s| s.get(Collection::Registrations, &id))
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::RegistrationNotFound,
                    "this device has not registered",
                )
            })?;
        Ok(device_view(&doc))
    }
}

/// Registrations by attestation and outcome, and their latency (for `/metrics`).
pub struct DpsMetrics {
    pub registry: prometheus::Registry,
    registrations: prometheus::IntCounterVec,
    latency: prometheus::HistogramVec,
    /// Moved devices that could not be removed from their old hub.
    stale_identities: prometheus::IntCounter,
}

impl DpsMetrics {
    fn new() -> Result<DpsMetrics, prometheus::Error> {
        let registrations = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "zerotouch_dps_registrations_total",
                "Device registrations by attestation and outcome",
            ),
            &["attestation", "outcome"],
        )?;
        let latency = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "zerotouch_dps_registration_duration_seconds",
                "Time from a register request to its outcome",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["attestation"],
        )?;
        let stale_identities = prometheus::IntCounter::new(
            "zerotouch_dps_stale_identities_total",
            "Devices moved to another hub whose old identity could not be removed",
        )?;
        let registry = prometheus::Registry::new();
        registry.register(Box::new(registrations.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(stale_identities.clone()))?;
        Ok(DpsMetrics {
            registry,
            registrations,
            latency,
            stale_identities,
        })
    }

    fn count(&self, attestation: &str, outcome: &str, elapsed: std::time::Duration) {
        self.registrations
            .with_label_values(&[attestation, outcome])
            .inc();
        self.latency
            .with_label_values(&[attestation])
            .observe(elapsed.as_secs_f64());
    }

    fn observe(&self, evidence: &Evidence, outcome: &str, elapsed: std::time::Duration) {
        let attestation = match evidence {
            Evidence::Sas(_) => "symmetricKey",
            Evidence::Certificate(_) => "x509",
        };
        self.count(attestation, outcome, elapsed);
    }
}

enum Refused {
    Disabled,
    Unauthorized(String),
}

/// The answer to a device whose enrollment is disabled, on register and on poll.
fn disabled(operation_id: String, registration_id: &str) -> Outcome {
    Outcome {
        operation_id,
        status: "disabled",
        registration_state: json!({
            "registrationId": registration_id,
            "status": "disabled",
            "errorCode": 401_003,
            "errorMessage": "the enrollment is disabled",
            "lastUpdatedDateTimeUtc": crate::time::now_rfc3339(),
        }),
    }
}

/// Where a registration stands when its requester stops waiting.
pub enum Progress {
    Done(Outcome),
    Running { operation_id: String },
}

fn new_operation_id() -> String {
    format!(
        "5.{}.{}",
        hex::encode(rand::random::<[u8; 8]>()),
        uuid::Uuid::new_v4()
    )
}

/// What [`Dps::authenticate`] concluded.
pub enum Attestation {
    Accepted(Box<AttestedIdentity>, Document),
    Disabled,
}

/// Operation ids a device may still poll: this one and the last few before it (a device that
/// registered twice concurrently polls both).
fn recent_operations(previous: Option<&Document>, operation_id: &str) -> Value {
    const KEEP: usize = 8;
    let mut ids: Vec<Value> = previous
        .and_then(|p| p.body.get("operationIds"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ids.push(json!(operation_id));
    let skip = ids.len().saturating_sub(KEEP);
    Value::Array(ids.into_iter().skip(skip).collect())
}

/// A registration record as devices (status lookup) and operators see it: no operation ids,
/// and the issued certificate chain only on register and poll answers (dps-protocol §1.5).
pub fn device_view(doc: &Document) -> Value {
    let mut state = doc.body.clone();
    state["etag"] = json!(crate::hub::bare_etag(&doc.etag));
    if let Some(map) = state.as_object_mut() {
        map.remove("operationIds");
        map.remove("issuedCertificateChain");
        map.remove("tpm");
    }
    state
}
