//! Step 1 of a registration: who the device is. The device's evidence (a SAS token, its TLS
//! client certificate, a TPM-signed SAS) is checked against its enrollment: the individual
//! one, else the groups (dps-protocol §3). [`Candidates`] builds each mechanism's attestor
//! from the stored enrollments and [`Dps::authenticate`] is the one match over mechanisms, so
//! a new mechanism touches this file only. TPM devices first get a challenge
//! ([`Dps::tpm_challenge`], §3.4).

use serde::Deserialize;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::{
    SasEvidence, SasToken, SymmetricKeyAttestationError, SymmetricKeyAttestor,
    SymmetricKeyEnrollment, SymmetricKeyGroup,
};
use zerotouch_attestation::tpm::{
    self, TpmAttestationError, TpmAttestor, TpmEnrollment, TpmEvidence,
};
use zerotouch_attestation::x509::{
    ClientCertificate, GroupCertificate, X509AttestationError, X509Attestor, X509Enrollment,
    X509Evidence, X509Group,
};
use zerotouch_attestation::{AttestedIdentity, Attestor, EnrollmentRef, Mechanism};

use super::error::Error;
use super::{Dps, Evidence, TpmBody};
use crate::db::{Collection, Document};
use crate::enrollment::{CertificatePair, Enrollment, X509Attestation};
use crate::tls::PeerCertificates;

/// What [`Dps::authenticate`] concluded.
pub enum Attestation {
    /// The evidence proves the device; the enrollment that admitted it.
    Accepted(Box<AttestedIdentity>, Box<Enrollment>),
    /// The matching enrollment is disabled.
    Disabled,
}

/// An activation key handed to a TPM, waiting for the device's signed re-register. Replicas
/// share it (`dps::replicas`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Challenge {
    key_b64: String,
    /// The endorsement key challenged (base64 TPM2B_PUBLIC).
    pub(super) ek_b64: String,
    /// The TPM group that admitted it, when no individual enrollment did.
    group: Option<String>,
    pub(super) expires_at: u64,
    /// Set once a re-register used it: polls may still sign with it, a second register may not.
    pub(super) used: bool,
}

/// Why evidence was not accepted.
pub(super) enum Refused {
    Disabled,
    Unauthorized(String),
}

/// An uploaded CA certificate, as X.509 groups refer to it by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaCertificate {
    #[serde(skip)]
    name: String,
    certificate: String,
    #[serde(default)]
    is_verified: bool,
}

/// The enrollments (and CA certificates) one registration is checked against, read once.
#[derive(Default)]
pub(super) struct Candidates {
    individual: Option<Enrollment>,
    groups: Vec<Enrollment>,
    cas: Vec<CaCertificate>,
}

fn unauthorized(message: impl Into<String>) -> Error {
    Error::Unauthorized(message.into())
}

impl Candidates {
    fn read(
        individual: Option<Enrollment>,
        groups: Vec<Document>,
        cas: Vec<Document>,
    ) -> Result<Candidates, Error> {
        Ok(Candidates {
            individual,
            groups: groups
                .iter()
                .map(Enrollment::from_document)
                .collect::<Result<_, _>>()?,
            cas: cas
                .into_iter()
                .filter_map(|doc| {
                    let mut ca: CaCertificate = serde_json::from_value(doc.body).ok()?;
                    ca.name = doc.id;
                    Some(ca)
                })
                .collect(),
        })
    }

    fn group(&self, id: &str) -> Option<&Enrollment> {
        self.groups.iter().find(|g| g.id().eq_ignore_ascii_case(id))
    }

    fn symmetric_key(&self, id_scope: &str) -> SymmetricKeyAttestor {
        SymmetricKeyAttestor {
            id_scope: id_scope.to_string(),
            individual: self.individual.as_ref().and_then(|e| {
                e.symmetric_keys().map(|keys| SymmetricKeyEnrollment {
                    primary_key: keys.primary_key.clone(),
                    secondary_key: keys.secondary_key.clone(),
                    enabled: e.enabled(),
                })
            }),
            groups: self
                .groups
                .iter()
                .filter_map(|g| {
                    g.symmetric_keys().map(|keys| SymmetricKeyGroup {
                        group_id: g.id().to_string(),
                        primary_key: keys.primary_key.clone(),
                        secondary_key: keys.secondary_key.clone(),
                        enabled: g.enabled(),
                    })
                })
                .collect(),
        }
    }

    fn x509(&self) -> X509Attestor {
        let der = |pair: &CertificatePair| -> Vec<Vec<u8>> {
            pair.certificates().filter_map(der_of).collect()
        };
        let slot_der = |slot: &Option<crate::enrollment::CertificateSlot>| {
            slot.as_ref()
                .and_then(|s| s.certificate.as_deref())
                .and_then(der_of)
        };
        X509Attestor {
            individual: self.individual.as_ref().and_then(|e| match e.x509() {
                Some(X509Attestation::ClientCertificates(pair)) => Some(X509Enrollment {
                    primary: slot_der(&pair.primary).map(ClientCertificate::Der),
                    secondary: slot_der(&pair.secondary).map(ClientCertificate::Der),
                    enabled: e.enabled(),
                }),
                _ => None,
            }),
            groups: self
                .groups
                .iter()
                .filter_map(|g| {
                    let certificates = match g.x509()? {
                        X509Attestation::SigningCertificates(pair) => der(pair)
                            .into_iter()
                            .map(GroupCertificate::Signing)
                            .collect(),
                        X509Attestation::CaReferences(refs) => refs
                            .names()
                            .filter_map(|name| {
                                let ca = self
                                    .cas
                                    .iter()
                                    .find(|c| c.name.eq_ignore_ascii_case(name))?;
                                Some(GroupCertificate::CaReference {
                                    name: name.to_string(),
                                    certificate: der_of(&ca.certificate)?,
                                    verified: ca.is_verified,
                                })
                            })
                            .collect(),
                        X509Attestation::ClientCertificates(_) => Vec::new(),
                    };
                    Some(X509Group {
                        group_id: g.id().to_string(),
                        certificates,
                        enabled: g.enabled(),
                    })
                })
                .collect(),
            verified_cas: self
                .cas
                .iter()
                .filter(|c| c.is_verified)
                .filter_map(|c| der_of(&c.certificate))
                .collect(),
        }
    }
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
    /// Checks the device's evidence against its enrollment (individual, then groups).
    /// Unknown devices and bad evidence are 401; a disabled match is [`Attestation::Disabled`].
    pub async fn authenticate(
        &self,
        registration_id: &str,
        evidence: &Evidence,
    ) -> Result<Attestation, Error> {
        crate::ids::registration_id(registration_id)?;
        if matches!(evidence, Evidence::Sas(_)) {
            // A TPM may answer a challenge another replica gave it.
            self.fetch_challenge(registration_id).await;
        }
        let candidates = self.candidates(registration_id, evidence).await?;
        let now = crate::time::now_unix();
        // A TPM enrolled individually, or admitted by a group during its challenge.
        let tpm_enrollment = candidates
            .individual
            .as_ref()
            .filter(|e| e.mechanism() == Mechanism::Tpm)
            .or_else(|| {
                let group = self
                    .lock_challenges()
                    .get(&registration_id.to_ascii_lowercase())
                    .and_then(|c| c.group.clone())?;
                candidates.group(&group)
            });
        // The one match over mechanisms: a SAS is a TPM's when a TPM enrollment admits the
        // device, else a symmetric key's; a certificate is X.509.
        let attested = match evidence {
            Evidence::Sas(token) if tpm_enrollment.is_some() => {
                self.attest_tpm(registration_id, token, tpm_enrollment, now)
            }
            Evidence::Sas(token) => candidates
                .symmetric_key(&self.id_scope)
                .attest(
                    &SasEvidence {
                        registration_id: registration_id.to_string(),
                        token: token.clone(),
                    },
                    now,
                )
                .map_err(|e| match e {
                    SymmetricKeyAttestationError::Disabled => Refused::Disabled,
                    other => {
                        Refused::Unauthorized(format!("symmetric key attestation failed: {other}"))
                    }
                }),
            Evidence::Certificate(peer) => {
                attest_certificate(&candidates.x509(), registration_id, peer, now)
            }
        };
        let attested = match attested {
            Ok(attested) => attested,
            Err(Refused::Disabled) => return Ok(Attestation::Disabled),
            Err(Refused::Unauthorized(why)) => return Err(unauthorized(why)),
        };
        if let Evidence::Certificate(peer) = evidence {
            crate::pki::refuse_revoked(&self.store, &peer.leaf).await?;
        }
        let Candidates {
            individual, groups, ..
        } = candidates;
        let enrollment = match &attested.matched {
            EnrollmentRef::Individual(_) => individual,
            EnrollmentRef::Group(group_id) => groups
                .into_iter()
                .find(|g| g.id().eq_ignore_ascii_case(group_id)),
        }
        .ok_or_else(|| Error::Internal("the matched enrollment vanished".into()))?;
        Ok(Attestation::Accepted(
            Box::new(attested),
            Box::new(enrollment),
        ))
    }

    /// Reads what `evidence` may match. An individual enrollment of the evidence's kind decides
    /// alone (§3.2, §3.3): then neither the groups nor the CA certificates are read.
    async fn candidates(
        &self,
        registration_id: &str,
        evidence: &Evidence,
    ) -> Result<Candidates, Error> {
        let id = registration_id.to_string();
        let certificate = matches!(evidence, Evidence::Certificate(_));
        crate::db::blocking(&self.store, move |s| {
            let individual = match s.get(Collection::IndividualEnrollments, &id)? {
                Some(doc) => match Enrollment::from_document(&doc) {
                    Ok(enrollment) => Some(enrollment),
                    Err(unreadable) => return Ok(Err(Error::from(unreadable))),
                },
                None => None,
            };
            let decides = match individual.as_ref().map(Enrollment::mechanism) {
                Some(Mechanism::X509) => certificate,
                Some(Mechanism::SymmetricKey | Mechanism::Tpm) => !certificate,
                None => false,
            };
            if decides {
                return Ok(Candidates::read(individual, Vec::new(), Vec::new()));
            }
            let groups = s.list_all(Collection::EnrollmentGroups, None)?;
            let cas = if certificate {
                s.list_all(Collection::CaCertificates, None)?
            } else {
                Vec::new()
            };
            Ok(Candidates::read(individual, groups, cas))
        })
        .await?
    }

    /// A TPM device's SAS, signed inside its TPM with the key of the challenge it was sent.
    fn attest_tpm(
        &self,
        registration_id: &str,
        token: &SasToken,
        enrollment: Option<&Enrollment>,
        now: u64,
    ) -> Result<AttestedIdentity, Refused> {
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
            .filter(|g| g.eq_ignore_ascii_case(enrollment.id()));
        let ek_text = match &group {
            Some(_) => challenge.as_ref().map(|c| c.ek_b64.clone()),
            None => enrollment.tpm_keys().map(|(ek, _)| ek.to_string()),
        };
        let ek = ek_text
            .and_then(|k| tpm::parse_endorsement_key(&k).ok())
            .ok_or_else(|| Refused::Unauthorized("no endorsement key to check against".into()))?;
        let attestor = TpmAttestor {
            id_scope: self.id_scope.clone(),
            enrollment: Some(TpmEnrollment {
                endorsement_key: ek.clone(),
                enabled: enrollment.enabled(),
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

    pub(super) fn lock_challenges(
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
        body: &TpmBody,
    ) -> Result<Value, Error> {
        crate::ids::registration_id(registration_id)?;
        let keys = DeviceTpmKeys::parse(body)?;
        let id = registration_id.to_string();
        let (individual, groups) = crate::db::blocking(&self.store, move |s| {
            Ok((
                s.get(Collection::IndividualEnrollments, &id)?,
                s.list_all(Collection::EnrollmentGroups, None)?,
            ))
        })
        .await?;
        let individual = individual
            .as_ref()
            .map(Enrollment::from_document)
            .transpose()?;
        let candidates = Candidates::read(individual, groups, Vec::new())?;
        let group = match candidates
            .individual
            .as_ref()
            .filter(|e| e.mechanism() == Mechanism::Tpm)
        {
            Some(enrollment) => {
                self.check_enrolled_tpm(enrollment, &keys)?;
                None
            }
            None => Some(admitting_group(registration_id, &candidates, &keys)?),
        };
        // The keys are the device's: one the blob cannot be built for is its error, not ours.
        let activation =
            tpm::build_activation(&keys.ek, &keys.srk).map_err(|e| Error::InvalidTpmKey {
                field: "tpm",
                message: e.to_string(),
            })?;
        self.lock_challenges().insert(
            registration_id.to_ascii_lowercase(),
            Challenge {
                key_b64: activation.hmac_key_base64(),
                ek_b64: keys.ek_text,
                group,
                expires_at: crate::time::now_unix() + self.challenge_lifetime,
                used: false,
            },
        );
        self.share_challenge(registration_id).await;
        Ok(json!({
            "message": "Sign a SAS token with the key in authenticationKey and register again",
            "authenticationKey": activation.blob_base64(),
            "keyName": "registration",
        }))
    }

    /// An individual TPM enrollment admits only its endorsement key (and its storage root
    /// key, when it names one); with manufacturer roots configured, the EK certificate too.
    fn check_enrolled_tpm(
        &self,
        enrollment: &Enrollment,
        keys: &DeviceTpmKeys,
    ) -> Result<(), Error> {
        let (ek_text, srk_text) = enrollment
            .tpm_keys()
            .ok_or_else(|| Error::Internal("a TPM enrollment without keys".into()))?;
        let enrolled = tpm::parse_endorsement_key(ek_text)
            .map_err(|_| Error::Internal("the enrolled endorsement key is unreadable".into()))?;
        if !enrolled.same_key(&keys.ek) {
            return Err(unauthorized(
                "the endorsement key does not match the enrollment",
            ));
        }
        if let Some(pinned) = srk_text.and_then(|k| tpm::parse_storage_root_key(k).ok())
            && !pinned.same_key(&keys.srk)
        {
            return Err(unauthorized(
                "the storage root key does not match the enrollment",
            ));
        }
        if !self.manufacturer_roots.is_empty() {
            keys.check_certificate(&self.manufacturer_roots)?;
        }
        Ok(())
    }

    /// Marks the registration's challenge as spent by a register (a replay is refused).
    pub(super) fn consume_challenge(&self, registration_id: &str) -> Result<(), Error> {
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
}

/// A TPM group admits only the C SDK's EK-derived registration id (so one EK is one
/// registration), and only an EK certificate that chains to one of the group's roots.
fn admitting_group(
    registration_id: &str,
    candidates: &Candidates,
    keys: &DeviceTpmKeys,
) -> Result<String, Error> {
    if !registration_id.eq_ignore_ascii_case(&keys.ek.registration_id()) {
        return Err(unauthorized(
            "no TPM enrollment for this registration id (TPM groups admit only the EK-derived id)",
        ));
    }
    candidates
        .groups
        .iter()
        .filter_map(|g| Some((g, g.tpm_roots()?)))
        .find(|(_, roots)| {
            let roots: Vec<Vec<u8>> = roots.certificates().filter_map(der_of).collect();
            keys.check_certificate(&roots).is_ok()
        })
        .map(|(g, _)| g.id().to_string())
        .ok_or_else(|| unauthorized("no TPM enrollment or TPM group admits this endorsement key"))
}

/// The keys a TPM device sends with its first register.
struct DeviceTpmKeys {
    ek_text: String,
    ek: tpm::TpmPublic,
    srk: tpm::TpmPublic,
    /// The EK certificate (DER; empty when none was sent) and any intermediates.
    certificate: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl DeviceTpmKeys {
    fn parse(body: &TpmBody) -> Result<DeviceTpmKeys, Error> {
        let bad_key =
            |field: &'static str, message: String| Error::InvalidTpmKey { field, message };
        let ek_text = body
            .endorsement_key
            .clone()
            .ok_or_else(|| bad_key("tpm.endorsementKey", "is required".into()))?;
        let ek = tpm::parse_endorsement_key(&ek_text)
            .map_err(|e| bad_key("tpm.endorsementKey", e.to_string()))?;
        let srk_text = body
            .storage_root_key
            .as_deref()
            .ok_or_else(|| bad_key("tpm.storageRootKey", "is required".into()))?;
        let srk = tpm::parse_storage_root_key(srk_text)
            .map_err(|e| bad_key("tpm.storageRootKey", e.to_string()))?;
        let (certificate, chain) = match body.endorsement_key_certificate.as_deref() {
            Some(text) => split_certificates(text).ok_or_else(|| Error::InvalidCertificate {
                field: "tpm.endorsementKeyCertificate",
                message: "is not a PEM certificate bundle or base64 DER".into(),
            })?,
            None => (Vec::new(), Vec::new()),
        };
        Ok(DeviceTpmKeys {
            ek_text,
            ek,
            srk,
            certificate,
            chain,
        })
    }

    fn check_certificate(&self, roots: &[Vec<u8>]) -> Result<(), Error> {
        if self.certificate.is_empty() {
            return Err(unauthorized(
                "an EK certificate (tpm.endorsementKeyCertificate) is required",
            ));
        }
        let now = crate::time::now_unix() as i64;
        tpm::ek_certificate::verify(&self.certificate, &self.chain, roots, &self.ek, now)
            .map_err(|e| unauthorized(e.to_string()))
    }
}

fn attest_certificate(
    attestor: &X509Attestor,
    registration_id: &str,
    peer: &PeerCertificates,
    now: u64,
) -> Result<AttestedIdentity, Refused> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment(body: Value) -> Enrollment {
        Enrollment::from_json("e", body).unwrap()
    }

    #[test]
    fn the_symmetric_key_attestor_holds_every_keyed_enrollment() {
        let candidates = Candidates {
            individual: Some(enrollment(json!({"registrationId": "dev",
                "provisioningStatus": "disabled",
                "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": "cA==", "secondaryKey": "cQ=="}}}))),
            groups: vec![
                enrollment(
                    json!({"enrollmentGroupId": "G1", "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": "Zw==", "secondaryKey": "aA=="}}}),
                ),
                enrollment(
                    json!({"enrollmentGroupId": "x", "attestation": {"type": "x509",
                    "x509": {"caReferences": {"primary": "root"}}}}),
                ),
            ],
            cas: Vec::new(),
        };
        let attestor = candidates.symmetric_key("0ne");
        assert_eq!(attestor.id_scope, "0ne");
        let individual = attestor.individual.expect("the individual enrollment");
        assert_eq!(individual.primary_key, "cA==");
        assert!(!individual.enabled);
        assert_eq!(attestor.groups.len(), 1);
        assert_eq!(attestor.groups[0].group_id, "G1");
        assert!(attestor.groups[0].enabled);
    }

    #[test]
    fn ca_references_resolve_to_uploaded_certificates_with_their_verification() {
        let candidates = Candidates {
            individual: None,
            groups: vec![enrollment(json!({"enrollmentGroupId": "g",
                "attestation": {"type": "x509", "x509": {"caReferences": {
                    "primary": "Root", "secondary": "missing"}}}}))],
            cas: vec![CaCertificate {
                name: "root".into(),
                certificate: "not a certificate".into(),
                is_verified: true,
            }],
        };
        let attestor = candidates.x509();
        // The CA named exists but its certificate does not parse, the other is not uploaded:
        // the group is there and admits nobody.
        assert_eq!(attestor.groups.len(), 1);
        assert!(attestor.groups[0].certificates.is_empty());
        assert!(attestor.verified_cas.is_empty());
        assert!(attestor.individual.is_none());
    }

    #[test]
    fn tpm_keys_are_required_and_named() {
        let error = DeviceTpmKeys::parse(&TpmBody::default())
            .err()
            .expect("refused");
        assert!(matches!(
            error,
            Error::InvalidTpmKey {
                field: "tpm.endorsementKey",
                ..
            }
        ));
    }
}
