//! Step 2 of a registration: what the device gets. A certificate from its CSR (signed by
//! `Pki::issue`, the function EST uses too; a device that presents a certificate of ours is
//! renewing it, inside its enrollment's renewal window), a fresh activation blob for a TPM,
//! and the identity written on the hub (dps-protocol §5.4).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::derive_device_key;
use zerotouch_attestation::tpm::{self, Activation};
use zerotouch_attestation::{AttestedIdentity, EnrollmentRef, Mechanism};

use super::error::Error;
use super::{Dps, Evidence, RegisterBody};
use crate::db::Collection;
use crate::enrollment::Enrollment;
use zerotouch_certs::IssuedDeviceCertificate;

/// The hub identity of a registering device: how it will authenticate there.
pub(super) fn hub_identity(
    device_id: &str,
    registration_id: &str,
    enrollment: &Enrollment,
    attested: &AttestedIdentity,
    evidence: &Evidence,
    credentials: (Option<&IssuedDeviceCertificate>, Option<&Activation>),
) -> Value {
    let group = matches!(attested.matched, EnrollmentRef::Group(_));
    let authentication = match credentials {
        (Some(_), _) => json!({"type": "certificateAuthority"}),
        (None, Some(activation)) => json!({"type": "sas", "symmetricKey": {
            "primaryKey": activation.hmac_key_base64(),
            "secondaryKey": crate::hub::device::generate_device_key(),
        }}),
        (None, None) => match (attested.mechanism, evidence) {
            (Mechanism::SymmetricKey, _) => {
                // A group member's keys are derived from the group's and its own id.
                let keys = enrollment.symmetric_keys();
                let key = |pick: fn(&crate::enrollment::SymmetricKeys) -> &String| {
                    let key = keys.map(pick).cloned().unwrap_or_default();
                    if group {
                        derive_device_key(&key, registration_id).unwrap_or_default()
                    } else {
                        key
                    }
                };
                json!({"type": "sas", "symmetricKey": {
                    "primaryKey": key(|k| &k.primary_key),
                    "secondaryKey": key(|k| &k.secondary_key),
                }})
            }
            (_, Evidence::Certificate(peer)) if !group => {
                let thumbprint = zerotouch_attestation::x509::Certificate::from_der(&peer.leaf)
                    .map(|c| c.info().sha256_thumbprint.clone())
                    .unwrap_or_default();
                json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint}})
            }
            _ => json!({"type": "certificateAuthority"}),
        },
    };
    json!({
        "deviceId": device_id,
        "status": "enabled",
        "authentication": authentication,
        "capabilities": {"iotEdge": enrollment.capabilities.iot_edge},
    })
}

impl Dps {
    /// Signs the device's CSR (if it sent one) and builds a TPM device's activation.
    pub(super) async fn credentials(
        &self,
        registration_id: &str,
        enrollment: &Enrollment,
        attested: &AttestedIdentity,
        evidence: &Evidence,
        body: &RegisterBody,
    ) -> Result<(Option<IssuedDeviceCertificate>, Option<Activation>), Error> {
        let issued = match &body.csr {
            None => None,
            Some(csr) => Some(
                self.issue_certificate(registration_id, enrollment, evidence, csr)
                    .await?,
            ),
        };
        let activation = match attested.mechanism {
            Mechanism::Tpm => Some(self.tpm_activation(registration_id, enrollment, body)?),
            _ => None,
        };
        Ok((issued, activation))
    }

    /// A certificate from the device's CSR (2025-07-01-preview shape). A device that presents
    /// a certificate we issued and sends a new CSR is renewing it: the enrollment's renewal
    /// window applies, as for EST.
    async fn issue_certificate(
        &self,
        registration_id: &str,
        enrollment: &Enrollment,
        evidence: &Evidence,
        csr: &str,
    ) -> Result<IssuedDeviceCertificate, Error> {
        let der = B64
            .decode(csr.trim())
            .map_err(|_| Error::InvalidCertificate {
                field: "csr",
                message: "is not base64 DER".into(),
            })?;
        let renewing = self.renewing(evidence).await?;
        if let Some(current) = &renewing {
            crate::pki::check_renewal(
                enrollment.renewal_policy,
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
                group: enrollment.group_id(),
                validity_days: self.certificate_days,
                actor: "dps".into(),
                action: match renewing {
                    Some(_) => crate::pki::Action::Renew,
                    None => crate::pki::Action::Issue,
                },
                detail: match &renewing {
                    Some(current) => json!({"via": "dps", "previousSerial": current.serial}),
                    None => Value::Null,
                },
            })
            .await?;
        Ok(issued)
    }

    /// The certificate the device authenticated with, if this service issued it.
    async fn renewing(
        &self,
        evidence: &Evidence,
    ) -> Result<Option<crate::pki::LeafIdentity>, Error> {
        let Evidence::Certificate(peer) = evidence else {
            return Ok(None);
        };
        let Some(identity) = crate::pki::leaf_identity(&peer.leaf) else {
            return Ok(None);
        };
        let serial = identity.serial.clone();
        let record = crate::db::blocking(&self.store, move |s| {
            s.get(Collection::IssuedCertificates, &serial)
        })
        .await?;
        let ours = record.is_some_and(|d| crate::pki::issued_by(&d, &identity.issuer));
        Ok(ours.then_some(identity))
    }

    /// A fresh activation for a TPM device: its endorsement key (enrolled, or the one its
    /// group challenged) and the storage root key it sent (else the enrolled one).
    fn tpm_activation(
        &self,
        registration_id: &str,
        enrollment: &Enrollment,
        body: &RegisterBody,
    ) -> Result<Activation, Error> {
        let enrolled = enrollment.tpm_keys();
        let srk_text = body
            .tpm
            .as_ref()
            .and_then(|t| t.storage_root_key.clone())
            .or_else(|| enrolled.and_then(|(_, srk)| srk.map(String::from)))
            .ok_or_else(|| Error::InvalidTpmKey {
                field: "tpm.storageRootKey",
                message: "is required".into(),
            })?;
        let ek_text = enrolled.map(|(ek, _)| ek.to_string()).or_else(|| {
            self.lock_challenges()
                .get(&registration_id.to_ascii_lowercase())
                .map(|c| c.ek_b64.clone())
        });
        let ek = ek_text
            .and_then(|k| tpm::parse_endorsement_key(&k).ok())
            .ok_or_else(|| Error::Internal("the endorsement key is unknown".into()))?;
        // The SRK is the device's (from this request's body).
        let srk_error = |e: String| Error::InvalidTpmKey {
            field: "tpm.storageRootKey",
            message: e,
        };
        let srk = tpm::parse_storage_root_key(&srk_text).map_err(|e| srk_error(e.to_string()))?;
        tpm::build_activation(&ek, &srk).map_err(|e| srk_error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerotouch_attestation::symmetric_key::SasToken;

    fn attested(mechanism: Mechanism, matched: EnrollmentRef) -> AttestedIdentity {
        AttestedIdentity {
            registration_id: "dev-1".into(),
            mechanism,
            matched,
            certificate_info: None,
            signing_certificate_info: None,
            expires_at: None,
        }
    }

    fn sas() -> Evidence {
        Evidence::Sas(SasToken::parse("SharedAccessSignature sr=x&sig=eQ%3D%3D&se=1").unwrap())
    }

    fn keyed(id_field: &str) -> Enrollment {
        Enrollment::from_json(
            "e",
            json!({id_field: "e", "capabilities": {"iotEdge": true},
                "attestation": {"type": "symmetricKey", "symmetricKey": {
                    "primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}}}),
        )
        .unwrap()
    }

    #[test]
    fn an_individual_device_gets_its_enrolled_keys() {
        let identity = hub_identity(
            "dev-1",
            "dev-1",
            &keyed("registrationId"),
            &attested(
                Mechanism::SymmetricKey,
                EnrollmentRef::Individual("dev-1".into()),
            ),
            &sas(),
            (None, None),
        );
        assert_eq!(identity["deviceId"], "dev-1");
        assert_eq!(identity["capabilities"]["iotEdge"], true);
        assert_eq!(
            identity["authentication"],
            json!({"type": "sas", "symmetricKey": {
                "primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}})
        );
    }

    #[test]
    fn a_group_member_gets_keys_derived_from_its_own_spelling() {
        let group = keyed("enrollmentGroupId");
        let attested = attested(Mechanism::SymmetricKey, EnrollmentRef::Group("e".into()));
        let for_id = |id: &str| hub_identity(id, id, &group, &attested, &sas(), (None, None));
        let upper = for_id("Sensor-7");
        let lower = for_id("sensor-7");
        assert_eq!(
            upper["authentication"]["symmetricKey"]["primaryKey"],
            json!(derive_device_key("cHJpbWFyeQ==", "Sensor-7").unwrap())
        );
        assert_ne!(
            upper["authentication"]["symmetricKey"]["primaryKey"],
            lower["authentication"]["symmetricKey"]["primaryKey"]
        );
    }

    #[test]
    fn x509_group_members_authenticate_by_ca() {
        let group = keyed("enrollmentGroupId");
        let identity = hub_identity(
            "d",
            "d",
            &group,
            &attested(Mechanism::X509, EnrollmentRef::Group("e".into())),
            &sas(),
            (None, None),
        );
        assert_eq!(identity["authentication"]["type"], "certificateAuthority");
    }
}
