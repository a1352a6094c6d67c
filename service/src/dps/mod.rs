//! Zero-touch registration: the DPS device API (dps-protocol §1–§3, §5).
//!
//! A device proves who it is, the matching enrollment decides where it goes and what it gets,
//! and the outcome is recorded as its registration. [`Dps::begin`] runs one registration as a
//! pipeline, a module per step: [`attest`] (who the device is) → [`issue`] (its certificate,
//! TPM activation and hub identity) → [`allocate`] (which hub, by policy, and what its twin
//! becomes) → [`apply`] (the identity on that hub, allocating again if the hub is down) →
//! [`record`] (the registration record) → [`cleanup`] (the old hub loses a moved device).
//! Errors are [`Error`]s, mapped to wire codes by `http::dps` and [`mqtt`], the two transports.

mod allocate;
mod apply;
mod attest;
mod cleanup;
mod error;
mod finished;
pub mod hubs;
mod issue;
pub mod mqtt;
mod record;
pub mod replicas;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;

use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::SasToken;
use zerotouch_attestation::{AttestedIdentity, Mechanism};
use zerotouch_policies::{self as policies, Policy};

pub use attest::Attestation;
pub use error::{Error, FailureCode};
pub use finished::Presented;
pub use record::{Registration, RegistrationStatus, Substatus, device_view};

use crate::db::{DocumentStore, Read};
use crate::enrollment::Enrollment;
use crate::hub::Hub;
use crate::tls::PeerCertificates;
use record::Recorded;

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

/// The result of a registration: an operation status as the device API returns it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub operation_id: String,
    pub status: RegistrationStatus,
    pub registration_state: Value,
}

impl Outcome {
    pub fn body(&self) -> Value {
        json!({
            "operationId": self.operation_id,
            "status": self.status.as_str(),
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
    failed: std::sync::Mutex<std::collections::HashMap<String, Error>>,
    /// Assigned operations an HTTPS device will poll for, answered without attesting again.
    finished: std::sync::Mutex<finished::Finished>,
    /// How long an MQTT register waits for its outcome before answering `assigning`.
    pub fast_path: std::time::Duration,
    /// Outstanding TPM challenges by lower-cased registration id. Per process: a device must
    /// answer the instance that challenged it (replicas behind a load balancer need stickiness).
    challenges: std::sync::Mutex<std::collections::HashMap<String, attest::Challenge>>,
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
    /// Replica mode: operations and TPM challenges shared with the other replicas.
    shared: std::sync::OnceLock<replicas::Shared>,
}

/// One registration on its way through the pipeline.
pub(crate) struct Registering<'a> {
    pub registration_id: &'a str,
    pub attested: &'a AttestedIdentity,
    pub enrollment: &'a Enrollment,
    pub body: &'a RegisterBody,
    /// The hub device id.
    pub device_id: String,
    /// The record before this registration, if the device registered before.
    pub previous: Option<Registration>,
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
            finished: Default::default(),
            fast_path: std::time::Duration::from_millis(settings.fast_path_ms),
            challenges: Default::default(),
            challenge_lifetime: settings.tpm_challenge_seconds,
            manufacturer_roots,
            metrics: DpsMetrics::new()?,
            id_scope,
            hub,
            pki,
            shared: std::sync::OnceLock::new(),
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
    ) -> Result<Progress, Error> {
        // While writes fail (a full disk), a registration could be answered 202 and then never
        // recorded: refuse it at once, with a retry hint the SDKs follow.
        match self.store.writable_known() {
            Some(known) => known?,
            None => crate::db::blocking(&self.store, |store| store.check_writable()).await?,
        }
        let operation_id = new_operation_id();
        self.lock_pending()
            .insert(operation_id.clone(), registration_id.to_ascii_lowercase());
        self.share_running(&operation_id, registration_id).await;
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
                failed.insert(op.clone(), e.clone());
            }
            dps.share_finished(&op, &id, result.as_ref().err()).await;
            dps.lock_pending().remove(&op);
            let _ = tx.send(result);
        });
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result.map(Progress::Done),
            Ok(Err(_)) => Err(Error::Internal(
                "the registration task ended without an answer".into(),
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
    ) -> Result<Outcome, Error> {
        let mechanism = self.mechanism_label(registration_id, &evidence);
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            self.metrics
                .count(mechanism, "throttled", std::time::Duration::ZERO);
            return Err(Error::Throttled);
        };
        let started = std::time::Instant::now();
        let result = self
            .register_now(operation_id.to_string(), registration_id, evidence, body)
            .await;
        let outcome = match &result {
            Ok(outcome) => outcome.status.as_str(),
            Err(e) if e.is_refusal() => "refused",
            Err(_) => "error",
        };
        self.metrics.count(mechanism, outcome, started.elapsed());
        result
    }

    /// The metrics label of a registration's mechanism: a SAS is a TPM's when the device was
    /// sent a TPM challenge (TPM devices always are, first).
    fn mechanism_label(&self, registration_id: &str, evidence: &Evidence) -> &'static str {
        match evidence {
            Evidence::Certificate(_) => "x509",
            Evidence::Sas(_)
                if self
                    .lock_challenges()
                    .contains_key(&registration_id.to_ascii_lowercase()) =>
            {
                "tpm"
            }
            Evidence::Sas(_) => "symmetricKey",
        }
    }

    async fn register_now(
        &self,
        operation_id: String,
        registration_id: &str,
        evidence: Evidence,
        body: RegisterBody,
    ) -> Result<Outcome, Error> {
        if let Some(body_id) = &body.registration_id
            && !body_id.eq_ignore_ascii_case(registration_id)
        {
            return Err(Error::IdMismatch);
        }
        match self.authenticate(registration_id, &evidence).await? {
            Attestation::Disabled => Ok(disabled(operation_id, registration_id)),
            Attestation::Accepted(attested, enrollment) => {
                if attested.mechanism == Mechanism::Tpm {
                    self.consume_challenge(registration_id)?;
                    self.share_challenge(registration_id).await;
                }
                self.assign(
                    registration_id,
                    &attested,
                    &enrollment,
                    &evidence,
                    &body,
                    operation_id,
                )
                .await
            }
        }
    }

    /// Steps 2 to 6 for an attested device.
    async fn assign(
        &self,
        registration_id: &str,
        attested: &AttestedIdentity,
        enrollment: &Enrollment,
        evidence: &Evidence,
        body: &RegisterBody,
        operation_id: String,
    ) -> Result<Outcome, Error> {
        let group_id = enrollment.group_id().map(String::from);
        let (previous, hub_records) = self.registration_and_hubs(registration_id).await?;
        // What the record write starts from (sparing it a read), unless it changes meanwhile.
        let read = Read::Was(previous.as_ref().map(|(_, doc)| doc.clone()));
        // A group member's credential depends on how it spells its id (the key derived from
        // it, the certificate's CN), so another spelling of a registered id is another device:
        // it must not take over the identity of the one that registered first.
        if group_id.is_some()
            && let Some((_, first)) = previous
                .as_ref()
                .filter(|(_, doc)| doc.id != registration_id)
        {
            return Err(spelling_taken(registration_id, &first.id));
        }
        // Registration ids are case-insensitive, hub device ids are not: name the device as the
        // enrollment (individual) or the registration (group member, spelled as it first was).
        let canonical_id = match &group_id {
            None => enrollment.id(),
            Some(_) => registration_id,
        }
        .to_string();
        let (issued, activation) = self
            .credentials(registration_id, enrollment, attested, evidence, body)
            .await?;
        let registering = Registering {
            registration_id,
            attested,
            enrollment,
            body,
            device_id: enrollment
                .device_id
                .clone()
                .unwrap_or_else(|| canonical_id.clone()),
            previous: previous.map(|(record, _)| record),
        };
        let identity = issue::hub_identity(
            &registering.device_id,
            registration_id,
            enrollment,
            attested,
            evidence,
            (issued.as_ref(), activation.as_ref()),
        );
        let linked = self.linked_hubs_of(hub_records);
        let now = crate::time::now_rfc3339();
        let placed = match self.place(&registering, &linked, &identity).await? {
            Ok(placed) => placed,
            Err((code, message)) => {
                let record = Registration::failed(registration_id, code.number(), &message, &now);
                return self.keep_failed(record, group_id, operation_id, read).await;
            }
        };
        let mut record = Registration {
            created_date_time_utc: Some(now.clone()),
            assigned_hub: Some(placed.hub.clone()),
            device_id: Some(registering.device_id.clone()),
            substatus: Some(placed.substatus),
            payload: placed
                .webhook_payload
                .clone()
                .or_else(|| body.payload.clone()),
            ..Registration::new(&canonical_id, RegistrationStatus::Assigned, &now)
        };
        record.attach_credentials(
            attested,
            group_id.as_deref(),
            issued.as_ref(),
            activation.as_ref(),
        );
        let doc = match self
            .record(registration_id, group_id, record, &operation_id, read)
            .await?
        {
            Recorded::Written(doc) => doc,
            Recorded::SpelledFirstAs(first) => {
                // Another spelling registered at the same moment and was recorded first: the
                // identity written for this one goes again (its name differs, hub ids being
                // case-sensitive), so one registration id never becomes two devices.
                if registering.device_id != first {
                    self.remove_from_old_hub(
                        &linked,
                        &placed.hub,
                        &registering.device_id,
                        registration_id,
                    )
                    .await;
                }
                return Err(spelling_taken(registration_id, &first));
            }
        };
        // Only now that the new assignment is stored does the old hub lose the device.
        if placed.moved
            && let Some((old_hub, old_device)) =
                registering.previous.as_ref().and_then(|p| p.placed())
        {
            self.remove_from_old_hub(&linked, old_hub, old_device, registration_id)
                .await;
        }
        Ok(Outcome {
            operation_id,
            status: RegistrationStatus::Assigned,
            registration_state: Registration::from_document(&doc)?.answer(&doc.etag),
        })
    }

    /// Records a failed registration as DPS does (status `failed`, `errorCode`, `errorMessage`),
    /// so that its operation can be polled from any replica and the management API shows why.
    /// A device that was assigned before stays where it is: the record keeps that assignment.
    async fn keep_failed(
        &self,
        mut record: Registration,
        group_id: Option<String>,
        operation_id: String,
        read: Read,
    ) -> Result<Outcome, Error> {
        let id = record.registration_id.clone();
        record.created_date_time_utc = record.last_updated_date_time_utc.clone();
        match self
            .record(&id, group_id, record, &operation_id, read)
            .await?
        {
            Recorded::Written(doc) => Ok(Outcome {
                operation_id,
                status: RegistrationStatus::Failed,
                registration_state: device_view(&doc),
            }),
            Recorded::SpelledFirstAs(first) => Err(spelling_taken(&id, &first)),
        }
    }

    /// Keeps an assigned outcome for the poll the device will send with the same credential
    /// (an HTTPS register is answered 202 however fast it was).
    pub fn keep_for_poll(&self, registration_id: &str, presented: Presented, outcome: Outcome) {
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep(registration_id, presented, outcome);
    }

    /// `GET …/operations/{operationId}`: the outcome of a registration.
    pub async fn operation(
        &self,
        registration_id: &str,
        evidence: &Evidence,
        operation_id: &str,
    ) -> Result<Outcome, Error> {
        let kept = self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(
                registration_id,
                operation_id,
                evidence,
                crate::time::now_unix(),
            );
        if let Some(outcome) = kept {
            // Revocation is enforced on every request that presents a certificate.
            if let Evidence::Certificate(peer) = evidence {
                crate::pki::refuse_revoked(&self.store, &peer.leaf).await?;
            }
            return Ok(outcome);
        }
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
                status: RegistrationStatus::Assigning,
                registration_state: json!({"registrationId": registration_id, "status": "assigning"}),
            });
        }
        let failure = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(operation_id)
            .cloned();
        if let Some(error) = failure {
            return Err(error);
        }
        // Replica mode: another replica may run (or have failed) the operation. One that runs
        // on a replica that has since died is finished, if at all, in the record below.
        if let Some(shared) = self.shared_operation(operation_id).await
            && shared
                .registration_id()
                .eq_ignore_ascii_case(registration_id)
            && !matches!(&shared, replicas::SharedOperation::Running { replica, .. }
                if !self.replica_alive(replica))
        {
            return match shared {
                replicas::SharedOperation::Running { .. } => Ok(Outcome {
                    operation_id: operation_id.to_string(),
                    status: RegistrationStatus::Assigning,
                    registration_state: json!({"registrationId": registration_id, "status": "assigning"}),
                }),
                replicas::SharedOperation::Failed { error, .. } => Err(error.into()),
            };
        }
        // Not recorded (nor running anywhere alive): the device registers again.
        let (record, doc) = self
            .registration(registration_id)
            .await?
            .filter(|(record, _)| record.operation_ids.iter().any(|i| i == operation_id))
            .ok_or(Error::OperationNotFound)?;
        let status = match record.status {
            RegistrationStatus::Assigned => RegistrationStatus::Assigned,
            RegistrationStatus::Disabled => RegistrationStatus::Disabled,
            _ => RegistrationStatus::Failed,
        };
        Ok(Outcome {
            operation_id: operation_id.to_string(),
            status,
            registration_state: record.answer(&doc.etag),
        })
    }

    /// `POST /{idScope}/registrations/{id}`: the bare registration state.
    pub async fn status(&self, registration_id: &str, evidence: &Evidence) -> Result<Value, Error> {
        self.authenticate(registration_id, evidence).await?;
        let (_, doc) = self
            .registration(registration_id)
            .await?
            .ok_or(Error::NotRegistered)?;
        Ok(device_view(&doc))
    }
}

/// A group member registering under another spelling of an id that is registered already.
fn spelling_taken(registration_id: &str, registered_as: &str) -> Error {
    Error::SpellingTaken {
        registration_id: registration_id.to_string(),
        registered_as: registered_as.to_string(),
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

    /// Registrations so far, and those of them that did not end assigned.
    pub fn totals(&self) -> (u64, u64) {
        let (mut all, mut not_assigned) = (0, 0);
        for family in prometheus::core::Collector::collect(&self.registrations) {
            for metric in family.get_metric() {
                let count = metric.get_counter().get_value() as u64;
                all += count;
                let assigned = metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == "outcome" && l.value() == "assigned");
                if !assigned {
                    not_assigned += count;
                }
            }
        }
        (all, not_assigned)
    }

    fn count(&self, attestation: &str, outcome: &str, elapsed: std::time::Duration) {
        self.registrations
            .with_label_values(&[attestation, outcome])
            .inc();
        self.latency
            .with_label_values(&[attestation])
            .observe(elapsed.as_secs_f64());
    }
}

/// The answer to a device whose enrollment is disabled, on register and on poll.
fn disabled(operation_id: String, registration_id: &str) -> Outcome {
    Outcome {
        operation_id,
        status: RegistrationStatus::Disabled,
        registration_state: json!({
            "registrationId": registration_id,
            "status": "disabled",
            "errorCode": FailureCode::EnrollmentDisabled.number(),
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
