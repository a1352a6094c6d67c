//! The enrollment as the service works with it: parsed once from its stored JSON, which keeps
//! exactly the shape [`super::normalize`] writes (the DPS service API's, with secrets), so the
//! types need no data migration. Fields this version does not know are kept in `other` and
//! written back unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::Kind;
use crate::db::Document;

/// An individual enrollment or an enrollment group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrollment_group_id: Option<String>,
    /// Individual only: the hub device id (else the registration id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub attestation: Attestation,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub initial_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub optional_device_information: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// `None`: the instance default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    #[serde(default)]
    pub reprovision_policy: ReprovisionPolicy,
    /// Our extension: when a certificate of ours may be renewed (`pki::check_renewal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_policy: Option<RenewalPolicy>,
    #[serde(default)]
    pub provisioning_status: ProvisioningStatus,
    /// Fields this version does not interpret, kept as stored.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// How a device proves who it is. The stored form is DPS's: `{"type": "x509", "x509": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Attestation {
    SymmetricKey {
        /// `None` only in a view without secrets.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[serde(rename = "symmetricKey")]
        symmetric_key: Option<SymmetricKeys>,
    },
    Tpm {
        tpm: TpmAttestation,
    },
    X509 {
        x509: X509Attestation,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    pub primary_key: String,
    pub secondary_key: String,
}

/// An individual TPM enrollment names its endorsement key; a TPM group names the manufacturer
/// roots its devices' EK certificates chain to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TpmAttestation {
    #[serde(rename_all = "camelCase")]
    Key {
        /// Base64 TPM2B_PUBLIC.
        endorsement_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage_root_key: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Roots { root_certificates: CertificatePair },
}

/// Exactly one of DPS's three X.509 forms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum X509Attestation {
    /// Individual: the device's own certificate(s).
    ClientCertificates(CertificatePair),
    /// Group: CA certificates a device's chain must reach.
    SigningCertificates(CertificatePair),
    /// Group: names of uploaded (and verified) CA certificates.
    CaReferences(CaReferences),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CertificatePair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<CertificateSlot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<CertificateSlot>,
}

impl CertificatePair {
    /// The certificates present, primary first, as stored (PEM or base64 DER).
    pub fn certificates(&self) -> impl Iterator<Item = &str> {
        [&self.primary, &self.secondary]
            .into_iter()
            .flatten()
            .filter_map(|slot| slot.certificate.as_deref())
    }

    fn strip(&mut self) {
        for slot in [&mut self.primary, &mut self.secondary]
            .into_iter()
            .flatten()
        {
            slot.certificate = None;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CertificateSlot {
    /// `None` only in a view without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The parsed certificate's summary, computed at enrollment time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub info: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaReferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

impl CaReferences {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        [&self.primary, &self.secondary]
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    pub iot_edge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    Hashed,
    GeoLatency,
    Static,
    Custom,
}

impl From<AllocationPolicy> for zerotouch_policies::Policy {
    fn from(policy: AllocationPolicy) -> Self {
        match policy {
            AllocationPolicy::Hashed => zerotouch_policies::Policy::Hashed,
            AllocationPolicy::GeoLatency => zerotouch_policies::Policy::GeoLatency,
            AllocationPolicy::Static => zerotouch_policies::Policy::Static,
            AllocationPolicy::Custom => zerotouch_policies::Policy::Custom,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
}

/// What a repeat registration does (dps-protocol §5.5). Both default to true, as in DPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    pub update_hub_assignment: bool,
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        ReprovisionPolicy {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// The stored form of a renewal window (`certs::renewal::RenewalPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenewalPolicy {
    pub window_fraction: f64,
    pub grace_after_expiry_seconds: Option<u64>,
}

impl From<RenewalPolicy> for zerotouch_certs::renewal::RenewalPolicy {
    fn from(policy: RenewalPolicy) -> Self {
        zerotouch_certs::renewal::RenewalPolicy {
            window_fraction: policy.window_fraction,
            grace_after_expiry_seconds: policy.grace_after_expiry_seconds,
        }
    }
}

impl From<zerotouch_certs::renewal::RenewalPolicy> for RenewalPolicy {
    fn from(policy: zerotouch_certs::renewal::RenewalPolicy) -> Self {
        RenewalPolicy {
            window_fraction: policy.window_fraction,
            grace_after_expiry_seconds: policy.grace_after_expiry_seconds,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    #[default]
    Enabled,
    Disabled,
}

/// A stored enrollment that does not parse: the store was written by something else.
#[derive(Debug, thiserror::Error)]
#[error("the stored enrollment {id:?} is unreadable: {source}")]
pub struct Unreadable {
    pub id: String,
    #[source]
    pub source: serde_json::Error,
}

impl Enrollment {
    /// Parses a stored enrollment (either collection).
    pub fn from_document(doc: &Document) -> Result<Enrollment, Unreadable> {
        Enrollment::from_json(&doc.id, doc.body.clone())
    }

    /// Parses the stored JSON form of the enrollment `id`.
    pub fn from_json(id: &str, body: Value) -> Result<Enrollment, Unreadable> {
        serde_json::from_value(body).map_err(|source| Unreadable {
            id: id.to_string(),
            source,
        })
    }

    /// The stored JSON form.
    pub fn to_json(&self) -> Value {
        // Only maps with string keys and plain values: serialising cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    pub fn kind(&self) -> Kind {
        match self.enrollment_group_id {
            Some(_) => Kind::Group,
            None => Kind::Individual,
        }
    }

    /// The registration id (individual) or the group id.
    pub fn id(&self) -> &str {
        self.enrollment_group_id
            .as_deref()
            .or(self.registration_id.as_deref())
            .unwrap_or_default()
    }

    pub fn group_id(&self) -> Option<&str> {
        self.enrollment_group_id.as_deref()
    }

    pub fn enabled(&self) -> bool {
        self.provisioning_status == ProvisioningStatus::Enabled
    }

    /// The mechanism a device of this enrollment attests with.
    pub fn mechanism(&self) -> zerotouch_attestation::Mechanism {
        use zerotouch_attestation::Mechanism;
        match self.attestation {
            Attestation::SymmetricKey { .. } => Mechanism::SymmetricKey,
            Attestation::Tpm { .. } => Mechanism::Tpm,
            Attestation::X509 { .. } => Mechanism::X509,
        }
    }

    /// The hubs the enrollment names (`iotHubs`, then `iotHubHostName`); empty = any.
    pub fn named_hubs(&self) -> Vec<String> {
        self.iot_hubs
            .iter()
            .flatten()
            .chain(&self.iot_hub_host_name)
            .cloned()
            .collect()
    }

    /// The symmetric keys, if this is a symmetric-key enrollment read with its secrets.
    pub fn symmetric_keys(&self) -> Option<&SymmetricKeys> {
        match &self.attestation {
            Attestation::SymmetricKey { symmetric_key } => symmetric_key.as_ref(),
            _ => None,
        }
    }

    /// The enrolled endorsement and storage root keys (an individual TPM enrollment).
    pub fn tpm_keys(&self) -> Option<(&str, Option<&str>)> {
        match &self.attestation {
            Attestation::Tpm {
                tpm:
                    TpmAttestation::Key {
                        endorsement_key,
                        storage_root_key,
                    },
            } => Some((endorsement_key, storage_root_key.as_deref())),
            _ => None,
        }
    }

    /// The manufacturer roots of a TPM group.
    pub fn tpm_roots(&self) -> Option<&CertificatePair> {
        match &self.attestation {
            Attestation::Tpm {
                tpm: TpmAttestation::Roots { root_certificates },
            } => Some(root_certificates),
            _ => None,
        }
    }

    pub fn x509(&self) -> Option<&X509Attestation> {
        match &self.attestation {
            Attestation::X509 { x509 } => Some(x509),
            _ => None,
        }
    }

    /// CA certificate names a group refers to, for the caller to check they exist.
    pub fn ca_references(&self) -> Vec<String> {
        match self.x509() {
            Some(X509Attestation::CaReferences(refs)) => refs.names().map(String::from).collect(),
            _ => Vec::new(),
        }
    }

    /// The view for reads, queries and the allocation webhook: no symmetric keys and no
    /// certificate bodies (their `info` stays); the TPM's public keys stay, as in DPS.
    pub fn without_secrets(mut self) -> Enrollment {
        match &mut self.attestation {
            Attestation::SymmetricKey { symmetric_key } => *symmetric_key = None,
            Attestation::Tpm {
                tpm: TpmAttestation::Roots { root_certificates },
            } => root_certificates.strip(),
            Attestation::Tpm { .. } => {}
            Attestation::X509 { x509 } => match x509 {
                X509Attestation::ClientCertificates(pair)
                | X509Attestation::SigningCertificates(pair) => pair.strip(),
                X509Attestation::CaReferences(_) => {}
            },
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Enrollment {
        Enrollment::from_json("t", body).expect("parses")
    }

    #[test]
    fn the_stored_form_round_trips_unchanged() {
        let stored = [
            json!({"registrationId": "dev-1", "deviceId": "d1",
                "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": "cA==", "secondaryKey": "cQ=="}},
                "capabilities": {"iotEdge": true}, "initialTwin": {"tags": {"a": 1}},
                "iotHubs": ["h1"], "allocationPolicy": "geoLatency",
                "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": true},
                "renewalPolicy": {"windowFraction": 0.5, "graceAfterExpirySeconds": null},
                "provisioningStatus": "disabled", "somethingNewer": [1, 2]}),
            json!({"enrollmentGroupId": "g", "attestation": {"type": "tpm", "tpm": {
                    "rootCertificates": {"primary": {"certificate": "PEM", "info": {"x": 1}}}}},
                "capabilities": {"iotEdge": false},
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
                "provisioningStatus": "enabled"}),
            json!({"registrationId": "t", "attestation": {"type": "tpm", "tpm": {
                    "endorsementKey": "ek", "storageRootKey": "srk"}},
                "capabilities": {"iotEdge": false},
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
                "provisioningStatus": "enabled"}),
            json!({"enrollmentGroupId": "g", "attestation": {"type": "x509", "x509": {
                    "caReferences": {"primary": "root"}}},
                "capabilities": {"iotEdge": false}, "allocationPolicy": "custom",
                "customAllocationDefinition": {"webhookUrl": "https://w", "apiVersion": "2021-10-01"},
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
                "provisioningStatus": "enabled"}),
        ];
        for body in stored {
            assert_eq!(parse(body.clone()).to_json(), body);
        }
    }

    #[test]
    fn missing_policies_take_the_dps_defaults() {
        let e = parse(json!({"registrationId": "Dev-1",
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": "ek"}}}));
        assert_eq!(e.kind(), Kind::Individual);
        assert_eq!(e.id(), "Dev-1");
        assert!(e.enabled());
        assert_eq!(e.reprovision_policy, ReprovisionPolicy::default());
        assert_eq!(e.allocation_policy, None);
        assert_eq!(e.tpm_keys(), Some(("ek", None)));
    }

    #[test]
    fn an_unknown_mechanism_is_unreadable_not_a_default() {
        let error = Enrollment::from_json(
            "x",
            json!({"registrationId": "x", "attestation": {"type": "none"}}),
        )
        .unwrap_err();
        assert!(error.to_string().contains("\"x\""), "{error}");
    }

    #[test]
    fn the_view_without_secrets_keeps_infos_and_public_keys() {
        let e = parse(
            json!({"enrollmentGroupId": "g", "attestation": {"type": "x509", "x509": {
            "signingCertificates": {"primary": {"certificate": "PEM", "info": {"subjectName": "CN=ca"}},
                                    "secondary": {"certificate": "PEM2", "info": {}}}}}}),
        );
        let view = e.without_secrets().to_json();
        assert_eq!(
            view["attestation"],
            json!({"type": "x509", "x509": {"signingCertificates": {
                "primary": {"info": {"subjectName": "CN=ca"}}, "secondary": {"info": {}}}}})
        );
        let keys = parse(
            json!({"registrationId": "d", "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": "a", "secondaryKey": "b"}}}),
        );
        assert_eq!(
            keys.without_secrets().to_json()["attestation"],
            json!({"type": "symmetricKey"})
        );
        let tpm = parse(json!({"registrationId": "d", "attestation": {"type": "tpm",
            "tpm": {"endorsementKey": "ek"}}}));
        assert_eq!(
            tpm.clone().without_secrets().to_json()["attestation"],
            tpm.to_json()["attestation"]
        );
    }

    #[test]
    fn named_hubs_list_iot_hubs_then_the_host_name() {
        let e = parse(
            json!({"registrationId": "d", "iotHubs": ["a", "b"], "iotHubHostName": "c",
            "attestation": {"type": "symmetricKey"}}),
        );
        assert_eq!(e.named_hubs(), ["a", "b", "c"]);
        assert_eq!(e.symmetric_keys(), None);
    }
}
