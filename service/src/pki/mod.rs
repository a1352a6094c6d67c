//! The PKI lifecycle around the `certs` primitives: records of every certificate this service
//! issues, the audit trail, revocation (with its enforcement), the CRL and the OCSP responder.
//!
//! - Storage: `issued_certificates` (one document per certificate, id = serial in upper-case
//!   hex, parent = registration id), `audit_events` (id sorts by time, parent = registration
//!   id) and `pki_state` (document `crl`: the current signed CRL and its number).
//! - A revocation check is one get by serial ([`revocation_of`]); the DPS X.509 attestation,
//!   EST and the hub's device authentication (MQTT and HTTPS) call it.
//! - The CRL is re-signed on every revocation and when less than [`CRL_REFRESH_MARGIN`] is
//!   left before its `nextUpdate`. Its number rises across restarts and replicas: it lives in
//!   the database and is written with an etag condition.
//!
//! **Invariant:** the CA keys stay in `certs`; this module only asks `CaHierarchy` and
//! `OcspSigner` to sign.

pub mod live;
pub mod rotation;
pub mod token;

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zerotouch_certs::ocsp::{self, CertStatus, OcspFailure, OcspRequest, OcspSigner};
use zerotouch_certs::renewal::RenewalPolicy;
use zerotouch_certs::revocation::{CrlParams, ReasonCode, RevokedEntry};
use zerotouch_certs::{IssuanceProfile, IssuedDeviceCertificate};

use crate::bootstrap::Instance;
use crate::db::{Change, Collection, Document, DocumentStore, StoreError, Write};

/// How long a CRL is valid (`nextUpdate - thisUpdate`).
pub const CRL_LIFETIME_SECONDS: i64 = 24 * 3600;
/// A CRL with less than this left before `nextUpdate` is re-signed when it is asked for.
pub const CRL_REFRESH_MARGIN: i64 = 3600;
/// The `pki_state` document holding the current CRL.
pub const CRL_DOCUMENT: &str = "crl";

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Issue,
    Renew,
    Revoke,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Issue => "issue",
            Action::Renew => "renew",
            Action::Revoke => "revoke",
        }
    }
}

/// The serial and names of a certificate (DER), as they are recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafIdentity {
    /// Upper-case hex, no leading zero bytes: the `issued_certificates` id.
    pub serial: String,
    /// The issuer's distinguished name, as x509-parser prints it.
    pub issuer: String,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the serial, issuer and subject of a DER certificate; `None` if it does not parse.
pub fn leaf_identity(der: &[u8]) -> Option<LeafIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(LeafIdentity {
        serial: serial_key(&hex::encode_upper(cert.raw_serial()))?,
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A serial in hex (colons and case ignored) as the record key: upper-case, without leading
/// zero bytes. `None` if it is not hex of 1 to 21 bytes.
pub fn serial_key(hex: &str) -> Option<String> {
    let bytes = zerotouch_certs::revocation::parse_serial_hex(hex).ok()?;
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    Some(hex::encode_upper(bytes.get(first..)?))
}

/// The record of the certificate `leaf_der` if this service issued it (same serial and
/// issuer name) and has revoked it. One indexed get.
pub fn revocation_of(
    store: &dyn DocumentStore,
    leaf_der: &[u8],
) -> Result<Option<Value>, StoreError> {
    let Some(identity) = leaf_identity(leaf_der) else {
        return Ok(None);
    };
    Ok(store
        .get(Collection::IssuedCertificates, &identity.serial)?
        .map(|doc| doc.body)
        .filter(|body| {
            body.get("issuer").and_then(Value::as_str) == Some(identity.issuer.as_str())
                && body.get("status").and_then(Value::as_str) == Some("revoked")
        }))
}

/// What goes wrong in the PKI, as the callers at the HTTP and MQTT boundaries map it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device's certificate signing request is malformed, badly signed or names another
    /// subject: the device's fault, and safe to show it.
    #[error("the CSR is refused: {0}")]
    BadCsr(zerotouch_certs::Error),
    /// A certificate this service issued, and revoked, was presented.
    #[error("the client certificate (serial {serial}) has been revoked")]
    Revoked { serial: String },
    /// A renewal outside the renewal window of the enrollment's policy.
    #[error("{0}")]
    RenewalNotAllowed(String),
    /// A serial number given by a caller is not hex.
    #[error("the serial is not a hex serial number")]
    InvalidSerial,
    /// No certificate with this serial was issued by this service.
    #[error("no certificate with this serial was issued by this service")]
    NotIssuedHere,
    #[error("the certificate is already revoked")]
    AlreadyRevoked,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something broke on our side (signing, a PKCS#11 token). For the log only.
    #[error("{0}")]
    Internal(String),
}

/// Whose fault a failed issuance is: only the CSR's own faults are the device's; a signing or
/// PKCS#11 failure is ours, and its text (a token's return value, say) stays in the log.
fn signing_error(error: zerotouch_certs::Error) -> Error {
    use zerotouch_certs::Error as E;
    match error {
        E::InvalidCsr { .. } | E::CsrSignatureInvalid | E::CnMismatch { .. } => {
            Error::BadCsr(error)
        }
        other => Error::Internal(format!("signing a device certificate: {other}")),
    }
}

/// One certificate to issue from a device's CSR ([`Pki::issue`]).
#[derive(Debug)]
pub struct Issue<'a> {
    pub csr_der: &'a [u8],
    /// The CSR's CN must be this.
    pub registration_id: &'a str,
    /// The enrollment group that admitted the device, if any (kept with the record).
    pub group: Option<&'a str>,
    pub validity_days: u32,
    /// Who asked, for the audit trail (`dps`, `est:{id}`).
    pub actor: String,
    pub action: Action,
    /// Extra audit detail (how it was asked for, the certificate it renews).
    pub detail: Value,
}

/// What [`Pki::subscribe`] takes: called with a revoked certificate's serial (hex).
pub type RevocationListener = Arc<dyn Fn(&str) + Send + Sync>;

/// [`Error::Revoked`] if the certificate `leaf_der` was issued here and revoked.
pub async fn refuse_revoked(store: &Arc<dyn DocumentStore>, leaf_der: &[u8]) -> Result<(), Error> {
    let leaf = leaf_der.to_vec();
    let revoked = crate::db::blocking(store, move |s| revocation_of(s, &leaf)).await?;
    match revoked {
        None => Ok(()),
        Some(record) => Err(Error::Revoked {
            serial: record
                .get("serial")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        }),
    }
}

/// Whether `record` (of `issued_certificates`) was issued by `issuer` (a distinguished name as
/// [`LeafIdentity::issuer`] spells it).
pub fn issued_by(record: &Document, issuer: &str) -> bool {
    record.body.get("issuer").and_then(Value::as_str) == Some(issuer)
}

/// The renewal window of an enrollment (its `renewalPolicy`, else [`RenewalPolicy::DEFAULT`])
/// for a certificate valid from `not_before` to `not_after` (unix seconds):
/// [`Error::RenewalNotAllowed`] outside it. EST re-enrollment and a DPS re-registration that presents a
/// certificate of ours with a new `csr` both go through here, so they follow one policy.
pub fn check_renewal(
    policy: Option<crate::enrollment::RenewalPolicy>,
    not_before: i64,
    not_after: i64,
    now: i64,
) -> Result<(), Error> {
    let policy = policy.map_or(RenewalPolicy::DEFAULT, RenewalPolicy::from);
    zerotouch_certs::renewal::decide(&policy, not_before, not_after, now).map_err(|refusal| {
        let message = match refusal {
            zerotouch_certs::renewal::RenewalRefusal::TooEarly { opens_at_unix } => format!(
                "renewal opens at {}",
                crate::time::rfc3339_of_unix(u64::try_from(opens_at_unix).unwrap_or(0))
            ),
            other => other.to_string(),
        };
        Error::RenewalNotAllowed(message)
    })
}

/// Parses an enrollment's `renewalPolicy`: `{"windowFraction": 0.0..=1.0,
/// "graceAfterExpirySeconds": n}` (the grace is optional; absent = none).
pub fn renewal_policy(value: &Value) -> Result<RenewalPolicy, String> {
    let object = value.as_object().ok_or("must be an object")?;
    if let Some(key) = object
        .keys()
        .find(|k| !["windowFraction", "graceAfterExpirySeconds"].contains(&k.as_str()))
    {
        return Err(format!("unknown field {key:?}"));
    }
    let window_fraction = object
        .get("windowFraction")
        .and_then(Value::as_f64)
        .ok_or("windowFraction must be a number from 0 to 1")?;
    let grace_after_expiry_seconds = match object.get("graceAfterExpirySeconds") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or("graceAfterExpirySeconds must be a whole number of seconds")?,
        ),
    };
    let policy = RenewalPolicy {
        window_fraction,
        grace_after_expiry_seconds,
    };
    if !policy.is_valid() {
        return Err("windowFraction must be a number from 0 to 1".into());
    }
    Ok(policy)
}

/// The stored form of a [`RenewalPolicy`].
pub fn renewal_policy_json(policy: &RenewalPolicy) -> Value {
    json!({
        "windowFraction": policy.window_fraction,
        "graceAfterExpirySeconds": policy.grace_after_expiry_seconds,
    })
}

/// A time-sortable unique id: microseconds since the epoch (16 hex digits) and 8 random ones.
fn audit_id() -> String {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{:016x}{}",
        micros.max(0),
        random.get(..8).unwrap_or_default()
    )
}

/// Who asked for a certificate operation and what it was about, for the audit trail.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub action: Action,
    pub actor: &'a str,
    pub serial: &'a str,
    pub registration_id: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub detail: Value,
}

/// Appends one audit event.
pub fn audit(store: &dyn DocumentStore, entry: &AuditEntry<'_>) -> Result<(), StoreError> {
    let id = audit_id();
    let body = json!({
        "id": id,
        "at": crate::time::now_rfc3339(),
        "actor": entry.actor,
        "action": entry.action.name(),
        "serial": entry.serial,
        "registrationId": entry.registration_id,
        "reason": entry.reason,
        "detail": entry.detail,
    });
    store
        .put(
            Collection::AuditEvents,
            &id,
            entry.registration_id,
            &body,
            Write::Create,
        )
        .map(drop)
}

/// The PKI of one process: issuance profile, revocation, CRL and OCSP.
pub struct Pki {
    store: Arc<dyn DocumentStore>,
    instance: Arc<Instance>,
    signer: OcspSigner,
    /// The intermediate's subject, as recorded in `issuer`.
    issuer: String,
    /// DER of the intermediate and the root (for EST `/cacerts`).
    ca_chain_der: Vec<Vec<u8>>,
    /// `host` of the CRL and OCSP URLs (first of `service.hostnames`, IPv6 in brackets).
    host: String,
    /// The public HTTPS port, known once the listener is bound.
    port: OnceLock<u16>,
    /// Told of every certificate this process revokes (the hub, to close its connections).
    listeners: std::sync::RwLock<Vec<RevocationListener>>,
    /// One CRL re-signing at a time in this process (replicas are ordered by the etag).
    crl_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Pki {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        instance: Arc<Instance>,
        hostname: &str,
    ) -> anyhow::Result<Pki> {
        let signer = instance.ca.ocsp_signer()?;
        let der_of = |pem: &str| -> anyhow::Result<Vec<u8>> {
            let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("CA certificate PEM: {e}"))?;
            Ok(block.contents)
        };
        let intermediate = der_of(instance.ca.intermediate_cert_pem())?;
        let root = der_of(instance.ca.root_cert_pem())?;
        let issuer = leaf_identity(&intermediate)
            .map(|i| i.subject)
            .ok_or_else(|| anyhow::anyhow!("the intermediate certificate does not parse"))?;
        let host = if hostname.contains(':') {
            format!("[{hostname}]")
        } else {
            hostname.to_string()
        };
        Ok(Pki {
            store,
            instance,
            signer,
            issuer,
            ca_chain_der: vec![intermediate, root],
            host,
            port: OnceLock::new(),
            listeners: std::sync::RwLock::default(),
            crl_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Calls `listener` with the serial (hex) of every certificate this process revokes, once
    /// the record says so. Other processes learn of it through the database and the CRL.
    pub fn subscribe(&self, listener: RevocationListener) {
        self.listeners
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(listener);
    }

    /// Sets the public HTTPS port once the listener is bound (first call wins).
    pub fn set_public_port(&self, port: u16) {
        let _ = self.port.set(port);
    }

    /// `https://{host}:{port}`, once the port is known.
    pub fn base_url(&self) -> Option<String> {
        self.port.get().map(|port| match port {
            443 => format!("https://{}", self.host),
            port => format!("https://{}:{port}", self.host),
        })
    }

    /// The device profile: `validity_days`, with the CRL distribution point and OCSP URLs.
    pub fn profile(&self, validity_days: u32) -> IssuanceProfile {
        let mut profile = IssuanceProfile::new(validity_days);
        if let Some(base) = self.base_url() {
            profile.crl_distribution_point = url::Url::parse(&format!("{base}/crl")).ok();
            profile.ocsp_responder = url::Url::parse(&format!("{base}/ocsp")).ok();
        }
        profile
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub fn store(&self) -> &Arc<dyn DocumentStore> {
        &self.store
    }

    /// The intermediate and root certificates (DER).
    pub fn ca_chain_der(&self) -> &[Vec<u8>] {
        &self.ca_chain_der
    }

    /// Signs a device certificate from `csr_der` (PKCS#10, CN = `registration_id`) with the
    /// issuance profile and records it with its audit event: the one way DPS and EST issue.
    /// A CSR the device got wrong is [`Error::BadCsr`]; a failure on our side (signing, a
    /// PKCS#11 token, the store) is never shown to the device.
    pub async fn issue(&self, request: Issue<'_>) -> Result<IssuedDeviceCertificate, Error> {
        let issued = self
            .instance
            .ca
            .sign_device_csr_with(
                request.csr_der,
                request.registration_id,
                &self.profile(request.validity_days),
                crate::time::now_unix() as i64,
            )
            .map_err(signing_error)?;
        let serial = serial_key(&issued.serial_hex).ok_or_else(|| {
            Error::Internal("issued a certificate with an unusable serial".into())
        })?;
        let body = json!({
            "serial": serial,
            "subject": issued.subject,
            "registrationId": request.registration_id,
            "enrollmentGroupId": request.group,
            "notBefore": issued.not_before_unix,
            "notAfter": issued.not_after_unix,
            "issuer": self.issuer,
            "status": "good",
            "revokedAt": null,
            "reason": null,
        });
        let registration_id = request.registration_id.to_string();
        let (actor, action, detail) = (request.actor, request.action, request.detail);
        crate::db::blocking(&self.store, move |s| {
            s.put(
                Collection::IssuedCertificates,
                &serial,
                Some(&registration_id),
                &body,
                Write::Create,
            )?;
            audit(
                s,
                &AuditEntry {
                    action,
                    actor: &actor,
                    serial: &serial,
                    registration_id: Some(&registration_id),
                    reason: None,
                    detail,
                },
            )
        })
        .await?;
        Ok(issued)
    }

    /// Revokes one certificate issued here: [`Error::NotIssuedHere`] if there is no record of
    /// it, [`Error::AlreadyRevoked`] if it is revoked already.
    pub async fn revoke(
        &self,
        serial: &str,
        reason: ReasonCode,
        actor: &str,
    ) -> Result<Value, Error> {
        let key = serial_key(serial).ok_or(Error::InvalidSerial)?;
        let actor = actor.to_string();
        let record =
            crate::db::blocking(&self.store, move |s| revoke_record(s, &key, reason, &actor))
                .await?;
        match record {
            Revoked::Now(record) => {
                self.after_revocation(std::slice::from_ref(&record)).await?;
                Ok(record)
            }
            Revoked::Already => Err(Error::AlreadyRevoked),
            Revoked::Missing => Err(Error::NotIssuedHere),
        }
    }

    /// Revokes every unrevoked certificate of a registration (`group` = None) or of an
    /// enrollment group (`registration_id` = None); returns the records revoked now.
    pub async fn revoke_all(
        &self,
        registration_id: Option<String>,
        group: Option<String>,
        reason: ReasonCode,
        actor: &str,
    ) -> Result<Vec<Value>, Error> {
        let actor = actor.to_string();
        let revoked = crate::db::blocking(&self.store, move |s| {
            let registrations: Vec<String> = match (&registration_id, &group) {
                (Some(id), _) => vec![id.clone()],
                (None, Some(group)) => s
                    .list_all(Collection::Registrations, Some(group))?
                    .into_iter()
                    .map(|d| d.id)
                    .collect(),
                (None, None) => Vec::new(),
            };
            let mut revoked = Vec::new();
            for id in registrations {
                for doc in s.list_all(Collection::IssuedCertificates, Some(&id))? {
                    let in_group = match &group {
                        None => true,
                        Some(g) => doc
                            .body
                            .get("enrollmentGroupId")
                            .and_then(Value::as_str)
                            .is_some_and(|x| x.eq_ignore_ascii_case(g)),
                    };
                    if !in_group {
                        continue;
                    }
                    if let Revoked::Now(record) = revoke_record(s, &doc.id, reason, &actor)? {
                        revoked.push(record);
                    }
                }
            }
            Ok(revoked)
        })
        .await?;
        if !revoked.is_empty() {
            self.after_revocation(&revoked).await?;
        }
        Ok(revoked)
    }

    /// Tells the listeners (the hub closes the certificates' sessions) and re-signs the CRL.
    async fn after_revocation(&self, records: &[Value]) -> Result<(), Error> {
        {
            let listeners = self
                .listeners
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for serial in records
                .iter()
                .filter_map(|r| r.get("serial").and_then(Value::as_str))
            {
                for listener in listeners.iter() {
                    listener(serial);
                }
            }
        }
        self.crl(true).await.map(drop)
    }

    /// The current CRL (DER), re-signed if `force`, if there is none, or if its `nextUpdate`
    /// is less than [`CRL_REFRESH_MARGIN`] away.
    pub async fn crl(&self, force: bool) -> Result<Vec<u8>, Error> {
        let _one_at_a_time = self.crl_lock.lock().await;
        let (instance, issuer) = (Arc::clone(&self.instance), self.issuer.clone());
        // Another replica may sign one in between: `update` then reads it and decides again.
        let updated = crate::db::blocking(&self.store, move |s| {
            Ok(
                s.update::<_, Error>(Collection::PkiState, CRL_DOCUMENT, |current| {
                    let now = crate::time::now_unix() as i64;
                    let stored = current.and_then(|doc| {
                        let next = doc.body.get("nextUpdate").and_then(Value::as_i64)?;
                        let der = doc.body.get("der").and_then(Value::as_str)?;
                        let signer = doc.body.get("issuer").and_then(Value::as_str)?;
                        Some((next, B64.decode(der).ok()?, signer == issuer))
                    });
                    if let Some((next, der, same_issuer)) = stored
                        && !force
                        && same_issuer
                        && next - now > CRL_REFRESH_MARGIN
                    {
                        return Ok(Change::Keep((der, None)));
                    }
                    let number = current
                        .and_then(|d| d.body.get("crlNumber").and_then(Value::as_u64))
                        .unwrap_or(0)
                        .saturating_add(1);
                    let revoked = s
                        .list_all(Collection::IssuedCertificates, None)?
                        .into_iter()
                        .filter_map(|d| revoked_entry(&d))
                        .collect::<Vec<_>>();
                    let signed = instance
                        .ca
                        .sign_crl(&CrlParams {
                            crl_number: number,
                            this_update_unix: now,
                            next_update_unix: now + CRL_LIFETIME_SECONDS,
                            revoked,
                        })
                        .map_err(|e| Error::Internal(format!("signing the CRL: {e}")))?;
                    let body = json!({
                        "crlNumber": number,
                        "thisUpdate": now,
                        "nextUpdate": now + CRL_LIFETIME_SECONDS,
                        "issuer": issuer,
                        "der": B64.encode(&signed.der),
                    });
                    Ok(Change::put(body, (signed.der, Some(number))))
                }),
            )
        })
        .await??;
        let (der, signed) = updated.result;
        if let Some(number) = signed {
            tracing::info!(crl_number = number, "signed a new CRL");
        }
        Ok(der)
    }

    /// Answers a DER OCSP request with a DER OCSP response (never an error: failures are
    /// OCSP error statuses).
    pub async fn ocsp(&self, request_der: &[u8]) -> Vec<u8> {
        let request = match OcspRequest::parse(request_der) {
            Ok(request) => request,
            Err(e) => {
                tracing::info!(error = %e, "malformed OCSP request");
                return OcspFailure::MalformedRequest.to_der();
            }
        };
        let ours: Vec<Option<String>> = request
            .cert_ids
            .iter()
            .map(|id| {
                id.matches_issuer(self.signer.issuer())
                    .then(|| serial_key(&id.serial_hex()))
                    .flatten()
            })
            .collect();
        let lookups = ours.clone();
        let records = crate::db::blocking(&self.store, move |s| {
            lookups
                .iter()
                .map(|serial| match serial {
                    Some(serial) => s.get(Collection::IssuedCertificates, serial),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        let records = match records {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "OCSP lookup failed");
                return OcspFailure::TryLater.to_der();
            }
        };
        let responses: Vec<_> = request
            .cert_ids
            .iter()
            .zip(&records)
            .map(|(id, record)| {
                let status = match record.as_ref().map(|d| &d.body) {
                    None => CertStatus::Unknown,
                    Some(body)
                        if body.get("issuer").and_then(Value::as_str) != Some(&self.issuer) =>
                    {
                        CertStatus::Unknown
                    }
                    Some(body) => match body.get("status").and_then(Value::as_str) {
                        Some("revoked") => CertStatus::Revoked {
                            revoked_at_unix: body
                                .get("revokedAt")
                                .and_then(Value::as_i64)
                                .unwrap_or_default(),
                            reason: body
                                .get("reason")
                                .and_then(Value::as_str)
                                .and_then(|r| r.parse().ok()),
                        },
                        _ => CertStatus::Good,
                    },
                };
                (id.clone(), status)
            })
            .collect();
        let now = crate::time::now_unix() as i64;
        match ocsp::build_response(
            &self.signer,
            &responses,
            request.nonce.as_deref(),
            now,
            None,
        ) {
            Ok(der) => der,
            Err(e) => {
                tracing::error!(error = %e, "signing an OCSP response failed");
                OcspFailure::InternalError.to_der()
            }
        }
    }
}

pub(crate) enum Revoked {
    Now(Value),
    Already,
    Missing,
}

/// Marks one record revoked (conditioned on its etag; `DocumentStore::update` retries if it
/// changed) and audits it.
pub(crate) fn revoke_record(
    store: &dyn DocumentStore,
    serial: &str,
    reason: ReasonCode,
    actor: &str,
) -> Result<Revoked, StoreError> {
    let updated = store.update::<_, StoreError>(Collection::IssuedCertificates, serial, |doc| {
        let Some(doc) = doc else {
            return Ok(Change::Keep(Revoked::Missing));
        };
        if doc.body.get("status").and_then(Value::as_str) == Some("revoked") {
            return Ok(Change::Keep(Revoked::Already));
        }
        let mut body = doc.body.clone();
        body["status"] = json!("revoked");
        body["revokedAt"] = json!(crate::time::now_unix());
        body["reason"] = json!(reason.name());
        Ok(Change::Put {
            body: body.clone(),
            parent: doc.parent.clone(),
            result: Revoked::Now(body),
        })
    })?;
    if let (Revoked::Now(body), Some(doc)) = (&updated.result, &updated.document) {
        audit(
            store,
            &AuditEntry {
                action: Action::Revoke,
                actor,
                serial: &doc.id,
                registration_id: body.get("registrationId").and_then(Value::as_str),
                reason: Some(reason.name()),
                detail: Value::Null,
            },
        )?;
    }
    Ok(updated.result)
}

/// The CRL entry of a revoked record; `None` for good ones (and unreadable ones).
fn revoked_entry(doc: &Document) -> Option<RevokedEntry> {
    let body = &doc.body;
    if body.get("status").and_then(Value::as_str) != Some("revoked") {
        return None;
    }
    Some(RevokedEntry {
        serial: zerotouch_certs::revocation::parse_serial_hex(body.get("serial")?.as_str()?)
            .ok()?,
        revoked_at_unix: body.get("revokedAt").and_then(Value::as_i64)?,
        reason: body
            .get("reason")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device learns what was wrong with its CSR, never what broke on our side.
    #[test]
    fn only_csr_faults_reach_the_device() {
        use zerotouch_certs::Error as E;
        for csr_fault in [
            E::InvalidCsr {
                reason: "trailing data".into(),
            },
            E::CsrSignatureInvalid,
            E::CnMismatch {
                expected: "dev".into(),
                found: None,
            },
        ] {
            assert!(matches!(signing_error(csr_fault), Error::BadCsr(_)));
        }
        for ours in [
            E::Pkcs11("C_Sign: CKR_DEVICE_ERROR (slot 0, user pin 1234)".into()),
            E::Generation("rcgen".into()),
            E::RootKeyMissing,
        ] {
            let error = signing_error(ours);
            assert!(matches!(error, Error::Internal(_)), "{error:?}");
        }
    }

    #[test]
    fn serial_keys_are_normalised() {
        assert_eq!(serial_key("00:ab:CD").as_deref(), Some("ABCD"));
        assert_eq!(serial_key("7F01").as_deref(), Some("7F01"));
        assert_eq!(serial_key("00").as_deref(), Some("00"));
        assert_eq!(serial_key("xyz"), None);
        assert_eq!(serial_key(""), None);
    }

    #[test]
    fn audit_ids_sort_by_time() {
        let a = audit_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = audit_id();
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), 24);
    }
}
