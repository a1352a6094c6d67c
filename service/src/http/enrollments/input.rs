//! Enrollment PUT bodies: parsed into typed input structs (so a wrong type names its field),
//! then checked and normalised into the stored form that [`super::Enrollment`] reads: ids follow
//! the DPS rules, symmetric keys are generated when omitted, X.509 certificates are parsed and
//! their `info` computed, TPM keys are parsed as TPM2B_PUBLIC.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use zerotouch_attestation::{symmetric_key, tpm, x509};

use crate::enrollment::{
    AllocationPolicy, CaReferences, Capabilities, CustomAllocationDefinition, Kind,
    ProvisioningStatus, ReprovisionPolicy,
};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::parse_typed;

// ----- input shapes -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnrollmentInput {
    registration_id: Option<String>,
    enrollment_group_id: Option<String>,
    device_id: Option<String>,
    attestation: Option<AttestationInput>,
    capabilities: Option<Capabilities>,
    initial_twin: Option<Value>,
    optional_device_information: Option<Value>,
    iot_hub_host_name: Option<String>,
    iot_hubs: Option<Vec<String>>,
    allocation_policy: Option<AllocationPolicy>,
    custom_allocation_definition: Option<CustomAllocationDefinition>,
    reprovision_policy: Option<ReprovisionPolicy>,
    provisioning_status: Option<ProvisioningStatus>,
    /// Our extension: when EST re-enrollment may renew (see `pki::renewal_policy`).
    renewal_policy: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttestationInput {
    #[serde(rename = "type")]
    kind: Option<AttestationType>,
    tpm: Option<TpmInput>,
    x509: Option<X509Input>,
    symmetric_key: Option<SymmetricKeyInput>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
enum AttestationType {
    None,
    Tpm,
    X509,
    SymmetricKey,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TpmInput {
    endorsement_key: Option<String>,
    storage_root_key: Option<String>,
    root_certificates: Option<CertificatePair>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SymmetricKeyInput {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct X509Input {
    client_certificates: Option<CertificatePair>,
    signing_certificates: Option<CertificatePair>,
    ca_references: Option<CaReferences>,
}

#[derive(Debug, Deserialize)]
struct CertificatePair {
    primary: Option<CertificateSlot>,
    secondary: Option<CertificateSlot>,
}

#[derive(Debug, Deserialize)]
struct CertificateSlot {
    certificate: Option<String>,
}

// ----- validation ---------------------------------------------------------------------------

/// Checks and normalises a PUT body for `kind` with path id `id`. `previous` is the stored
/// document being replaced, if any: omitted symmetric keys and certificates are kept from it
/// rather than regenerated, so a read-modify-write through a GET (which strips secrets) never
/// rotates a device's credentials by accident.
pub fn normalize(
    kind: Kind,
    id: &str,
    body: Value,
    previous: Option<&Value>,
    now_unix: i64,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the body must be a JSON object",
        ));
    }
    let input: EnrollmentInput = parse_typed(body)?;
    let id_field = kind.id_field();
    let body_id = match kind {
        Kind::Individual => input.registration_id.as_deref(),
        Kind::Group => input.enrollment_group_id.as_deref(),
    };
    if let Some(body_id) = body_id
        && !body_id.eq_ignore_ascii_case(id)
    {
        return Err(ApiError::field(
            ErrorCode::IdMismatch,
            id_field,
            format!("{body_id:?} differs from the id in the path, {id:?}"),
        ));
    }
    match kind {
        Kind::Individual => crate::ids::registration_id(id)?,
        Kind::Group => crate::ids::enrollment_group_id(id)?,
    }

    let mut out = Map::new();
    out.insert(id_field.into(), Value::String(id.to_string()));
    if let Some(device_id) = &input.device_id {
        if kind == Kind::Group {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "deviceId",
                "only individual enrollments name a device id",
            ));
        }
        crate::ids::device_id(device_id)?;
        out.insert("deviceId".into(), Value::String(device_id.clone()));
    }

    let attestation = input.attestation.ok_or_else(|| {
        ApiError::field(ErrorCode::InvalidAttestation, "attestation", "is required")
    })?;
    let previous_attestation = previous.and_then(|p| p.get("attestation"));
    out.insert(
        "attestation".into(),
        normalize_attestation(kind, attestation, previous_attestation, now_unix)?,
    );

    out.insert(
        "capabilities".into(),
        serde_json::to_value(
            input
                .capabilities
                .unwrap_or(Capabilities { iot_edge: false }),
        )
        .map_err(ApiError::internal)?,
    );
    if let Some(twin) = input.initial_twin {
        out.insert("initialTwin".into(), check_initial_twin(twin)?);
    }
    if let Some(info) = input.optional_device_information {
        if kind == Kind::Group {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "optionalDeviceInformation",
                "only individual enrollments carry device information",
            ));
        }
        if !info.is_object() {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "optionalDeviceInformation",
                "must be an object",
            ));
        }
        out.insert("optionalDeviceInformation".into(), info);
    }
    if let Some(host) = input.iot_hub_host_name {
        check_hub_name("iotHubHostName", &host)?;
        out.insert("iotHubHostName".into(), Value::String(host));
    }
    if let Some(hubs) = input.iot_hubs {
        for (i, hub) in hubs.iter().enumerate() {
            check_hub_name(&format!("iotHubs[{i}]"), hub)?;
        }
        out.insert("iotHubs".into(), json!(hubs));
    }
    if let Some(policy) = input.allocation_policy {
        out.insert(
            "allocationPolicy".into(),
            serde_json::to_value(policy).map_err(ApiError::internal)?,
        );
    }
    match (input.allocation_policy, input.custom_allocation_definition) {
        (Some(AllocationPolicy::Custom), None) => {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "customAllocationDefinition",
                "is required when allocationPolicy is custom",
            ));
        }
        (_, Some(custom)) => {
            let url = url::Url::parse(&custom.webhook_url).map_err(|e| {
                ApiError::field(
                    ErrorCode::InvalidField,
                    "customAllocationDefinition.webhookUrl",
                    e,
                )
            })?;
            if url.scheme() != "https" && url.scheme() != "http" {
                return Err(ApiError::field(
                    ErrorCode::InvalidField,
                    "customAllocationDefinition.webhookUrl",
                    "must be an https:// (or http://) URL",
                ));
            }
            check_webhook_api_version(&custom.api_version)?;
            out.insert(
                "customAllocationDefinition".into(),
                serde_json::to_value(custom).map_err(ApiError::internal)?,
            );
        }
        _ => {}
    }
    out.insert(
        "reprovisionPolicy".into(),
        serde_json::to_value(input.reprovision_policy.unwrap_or(ReprovisionPolicy {
            update_hub_assignment: true,
            migrate_device_data: true,
        }))
        .map_err(ApiError::internal)?,
    );
    if let Some(policy) = input.renewal_policy {
        let policy = crate::pki::renewal_policy(&policy)
            .map_err(|e| ApiError::field(ErrorCode::InvalidField, "renewalPolicy", e))?;
        out.insert(
            "renewalPolicy".into(),
            crate::pki::renewal_policy_json(&policy),
        );
    }
    out.insert(
        "provisioningStatus".into(),
        serde_json::to_value(
            input
                .provisioning_status
                .unwrap_or(ProvisioningStatus::Enabled),
        )
        .map_err(ApiError::internal)?,
    );
    Ok(Value::Object(out))
}

/// `YYYY-MM-DD` with an optional `-suffix` (e.g. `-preview`), no earlier than 2018-09-01.
fn check_webhook_api_version(version: &str) -> Result<(), ApiError> {
    let field = "customAllocationDefinition.apiVersion";
    let date = version.get(..10).unwrap_or("");
    let shape_ok = date.len() == 10
        && date.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            _ => c.is_ascii_digit(),
        })
        && (version.len() == 10 || version.as_bytes().get(10) == Some(&b'-'));
    if !shape_ok {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            field,
            "must look like 2021-10-01 (optionally with a -preview suffix)",
        ));
    }
    // Fixed-width dates compare correctly as strings.
    if date < "2018-09-01" {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            field,
            "must be 2018-09-01-preview or later",
        ));
    }
    Ok(())
}

fn check_hub_name(field: &str, host: &str) -> Result<(), ApiError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            ErrorCode::InvalidField,
            field,
            "must be a hub host name",
        ))
    }
}

fn check_initial_twin(twin: Value) -> Result<Value, ApiError> {
    let Value::Object(map) = &twin else {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "initialTwin",
            "must be an object",
        ));
    };
    for (key, value) in map {
        match key.as_str() {
            "tags" if value.is_object() || value.is_null() => {}
            "properties" => match value {
                Value::Null => {}
                Value::Object(props) => {
                    for (k, v) in props {
                        if k != "desired" || !(v.is_object() || v.is_null()) {
                            return Err(ApiError::field(
                                ErrorCode::InvalidField,
                                format!("initialTwin.properties.{k}"),
                                "only an object `desired` may be set",
                            ));
                        }
                    }
                }
                _ => {
                    return Err(ApiError::field(
                        ErrorCode::InvalidField,
                        "initialTwin.properties",
                        "must be an object",
                    ));
                }
            },
            other => {
                return Err(ApiError::field(
                    ErrorCode::InvalidField,
                    format!("initialTwin.{other}"),
                    "an initial twin holds only tags and properties.desired",
                ));
            }
        }
    }
    Ok(twin)
}

fn normalize_attestation(
    kind: Kind,
    input: AttestationInput,
    previous: Option<&Value>,
    now_unix: i64,
) -> Result<Value, ApiError> {
    let declared = input.kind.ok_or_else(|| {
        ApiError::field(
            ErrorCode::InvalidAttestation,
            "attestation.type",
            "is required",
        )
    })?;
    let previous_of = |section: &str| {
        previous
            .filter(|p| p.get("type") == Some(&json!(attestation_type_name(declared))))
            .and_then(|p| p.get(section))
    };
    match declared {
        AttestationType::None => Err(ApiError::field(
            ErrorCode::InvalidAttestation,
            "attestation.type",
            "an enrollment needs a mechanism: tpm, x509 or symmetricKey",
        )),
        AttestationType::SymmetricKey => {
            let input = input.symmetric_key.unwrap_or(SymmetricKeyInput {
                primary_key: None,
                secondary_key: None,
            });
            let old = previous_of("symmetricKey");
            let primary = key_or_keep(input.primary_key, old, "primaryKey")?;
            let secondary = key_or_keep(input.secondary_key, old, "secondaryKey")?;
            Ok(json!({
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
            }))
        }
        AttestationType::Tpm if kind == Kind::Group => {
            // A TPM group admits any TPM whose EK certificate chains to one of its roots.
            let roots = input
                .tpm
                .and_then(|t| t.root_certificates)
                .ok_or_else(|| {
                    ApiError::field(
                        ErrorCode::InvalidAttestation,
                        "attestation.tpm.rootCertificates",
                        "a TPM group needs the TPM manufacturer roots its devices' EK certificates chain to",
                    )
                })?;
            let old = previous_of("tpm").and_then(|t| t.get("rootCertificates"));
            Ok(
                json!({"type": "tpm", "tpm": {"rootCertificates": certificate_pair(
                roots,
                old,
                "attestation.tpm.rootCertificates",
                true,
                now_unix,
            )?}}),
            )
        }
        AttestationType::Tpm => {
            let input = input.tpm.ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidAttestation,
                    "attestation.tpm",
                    "is required",
                )
            })?;
            let ek = input.endorsement_key.ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidEndorsementKey,
                    "attestation.tpm.endorsementKey",
                    "is required",
                )
            })?;
            tpm::parse_endorsement_key(&ek).map_err(|e| {
                ApiError::field(
                    ErrorCode::InvalidEndorsementKey,
                    "attestation.tpm.endorsementKey",
                    e,
                )
            })?;
            let mut tpm_out = json!({"endorsementKey": ek});
            if let Some(srk) = input.storage_root_key.filter(|s| !s.is_empty()) {
                tpm::parse_storage_root_key(&srk).map_err(|e| {
                    ApiError::field(
                        ErrorCode::InvalidEndorsementKey,
                        "attestation.tpm.storageRootKey",
                        e,
                    )
                })?;
                tpm_out["storageRootKey"] = Value::String(srk);
            }
            Ok(json!({"type": "tpm", "tpm": tpm_out}))
        }
        AttestationType::X509 => {
            let input = input.x509.ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidAttestation,
                    "attestation.x509",
                    "is required",
                )
            })?;
            let old = previous_of("x509");
            let mut x509_out = Map::new();
            match kind {
                Kind::Individual => {
                    if input.signing_certificates.is_some() || input.ca_references.is_some() {
                        return Err(ApiError::field(
                            ErrorCode::InvalidAttestation,
                            "attestation.x509",
                            "an individual enrollment uses clientCertificates",
                        ));
                    }
                    let pair = input.client_certificates.ok_or_else(|| {
                        ApiError::field(
                            ErrorCode::InvalidAttestation,
                            "attestation.x509.clientCertificates",
                            "is required",
                        )
                    })?;
                    x509_out.insert(
                        "clientCertificates".into(),
                        certificate_pair(
                            pair,
                            old.and_then(|o| o.get("clientCertificates")),
                            "attestation.x509.clientCertificates",
                            false,
                            now_unix,
                        )?,
                    );
                }
                Kind::Group => match (input.signing_certificates, input.ca_references) {
                    (Some(pair), None) => {
                        x509_out.insert(
                            "signingCertificates".into(),
                            certificate_pair(
                                pair,
                                old.and_then(|o| o.get("signingCertificates")),
                                "attestation.x509.signingCertificates",
                                true,
                                now_unix,
                            )?,
                        );
                    }
                    (None, Some(refs)) => {
                        if refs.primary.as_deref().is_none_or(str::is_empty) {
                            return Err(ApiError::field(
                                ErrorCode::InvalidAttestation,
                                "attestation.x509.caReferences.primary",
                                "is required",
                            ));
                        }
                        x509_out.insert(
                            "caReferences".into(),
                            serde_json::to_value(refs).map_err(ApiError::internal)?,
                        );
                    }
                    _ => {
                        return Err(ApiError::field(
                            ErrorCode::InvalidAttestation,
                            "attestation.x509",
                            "an enrollment group uses exactly one of signingCertificates or caReferences",
                        ));
                    }
                },
            }
            Ok(json!({"type": "x509", "x509": x509_out}))
        }
    }
}

fn attestation_type_name(kind: AttestationType) -> &'static str {
    match kind {
        AttestationType::None => "none",
        AttestationType::Tpm => "tpm",
        AttestationType::X509 => "x509",
        AttestationType::SymmetricKey => "symmetricKey",
    }
}

fn key_or_keep(given: Option<String>, old: Option<&Value>, name: &str) -> Result<String, ApiError> {
    match given.filter(|k| !k.is_empty()) {
        Some(key) => {
            symmetric_key::validate_key(&key).map_err(|e| {
                ApiError::field(
                    ErrorCode::InvalidSymmetricKey,
                    format!("attestation.symmetricKey.{name}"),
                    e,
                )
            })?;
            Ok(key)
        }
        None => match old.and_then(|o| o.get(name)).and_then(Value::as_str) {
            Some(kept) => Ok(kept.to_string()),
            None => symmetric_key::generate_key().map_err(ApiError::internal),
        },
    }
}

fn certificate_pair(
    pair: CertificatePair,
    old: Option<&Value>,
    field: &str,
    must_be_ca: bool,
    now_unix: i64,
) -> Result<Value, ApiError> {
    let mut out = Map::new();
    for (slot_name, slot) in [("primary", pair.primary), ("secondary", pair.secondary)] {
        let slot_field = format!("{field}.{slot_name}");
        let given = slot
            .and_then(|s| s.certificate)
            .filter(|c| !c.trim().is_empty());
        let certificate = match given {
            Some(text) => text,
            None => match old
                .and_then(|o| o.get(slot_name))
                .and_then(|s| s.get("certificate"))
                .and_then(Value::as_str)
            {
                Some(kept) => kept.to_string(),
                None if slot_name == "primary" => {
                    return Err(ApiError::field(
                        ErrorCode::InvalidCertificate,
                        format!("{slot_field}.certificate"),
                        "is required",
                    ));
                }
                None => continue,
            },
        };
        let parsed = x509::parse_certificate(&certificate).map_err(|e| {
            ApiError::field(
                ErrorCode::InvalidCertificate,
                format!("{slot_field}.certificate"),
                e,
            )
        })?;
        if must_be_ca && !parsed.is_ca() {
            return Err(ApiError::field(
                ErrorCode::InvalidCertificate,
                format!("{slot_field}.certificate"),
                "a signing certificate must be a CA certificate (basicConstraints CA:TRUE)",
            ));
        }
        if parsed.not_after_unix() < now_unix {
            return Err(ApiError::field(
                ErrorCode::InvalidCertificate,
                format!("{slot_field}.certificate"),
                format!("expired on {}", parsed.info().not_after_utc),
            ));
        }
        out.insert(
            slot_name.into(),
            json!({
                "certificate": certificate,
                "info": serde_json::to_value(parsed.info()).map_err(ApiError::internal)?,
            }),
        );
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn individual(body: Value) -> Result<Value, ApiError> {
        normalize(Kind::Individual, "dev-01", body, None, 1_700_000_000)
    }

    #[test]
    fn symmetric_keys_are_generated_and_defaults_filled() {
        let doc = individual(json!({"attestation": {"type": "symmetricKey"}})).unwrap();
        let primary = doc.pointer("/attestation/symmetricKey/primaryKey").unwrap();
        assert!(symmetric_key::validate_key(primary.as_str().unwrap()).is_ok());
        assert_eq!(doc["registrationId"], "dev-01");
        assert_eq!(doc["provisioningStatus"], "enabled");
        assert_eq!(doc["capabilities"], json!({"iotEdge": false}));
        assert_eq!(
            doc["reprovisionPolicy"],
            json!({"updateHubAssignment": true, "migrateDeviceData": true})
        );
    }

    #[test]
    fn omitted_keys_are_kept_on_update() {
        let first = individual(json!({"attestation": {"type": "symmetricKey"}})).unwrap();
        let mut view = crate::enrollment::Enrollment::from_json("dev-01", first.clone())
            .unwrap()
            .without_secrets()
            .to_json();
        assert_eq!(view["attestation"], json!({"type": "symmetricKey"}));
        view["provisioningStatus"] = json!("disabled");
        let second = normalize(Kind::Individual, "dev-01", view, Some(&first), 0).unwrap();
        assert_eq!(second["attestation"], first["attestation"]);
        assert_eq!(second["provisioningStatus"], "disabled");
    }

    #[test]
    fn bad_inputs_name_their_field() {
        let cases = [
            (json!({}), ErrorCode::InvalidAttestation, "attestation"),
            (
                json!({"attestation": {"type": "carrier-pigeon"}}),
                ErrorCode::InvalidField,
                "attestation.type",
            ),
            (
                json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64!"}}}),
                ErrorCode::InvalidSymmetricKey,
                "attestation.symmetricKey.primaryKey",
            ),
            (
                json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "MIIB"}}}}}),
                ErrorCode::InvalidCertificate,
                "attestation.x509.clientCertificates.primary.certificate",
            ),
            (
                json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}),
                ErrorCode::InvalidEndorsementKey,
                "attestation.tpm.endorsementKey",
            ),
            (
                json!({"registrationId": "other", "attestation": {"type": "symmetricKey"}}),
                ErrorCode::IdMismatch,
                "registrationId",
            ),
            (
                json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": 3}),
                ErrorCode::InvalidField,
                "provisioningStatus",
            ),
            (
                json!({"attestation": {"type": "symmetricKey"}, "initialTwin": {"properties": {"reported": {}}}}),
                ErrorCode::InvalidField,
                "initialTwin.properties.reported",
            ),
            (
                json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"}),
                ErrorCode::InvalidField,
                "customAllocationDefinition",
            ),
        ];
        for (body, code, field) in cases {
            let err = individual(body.clone()).unwrap_err();
            assert_eq!(err.code, code, "{body}: {err}");
            assert_eq!(err.info.get("field"), Some(&json!(field)), "{body}: {err}");
        }
    }

    #[test]
    fn webhook_api_versions() {
        for good in ["2018-09-01-preview", "2021-10-01", "2025-07-01-preview"] {
            assert!(check_webhook_api_version(good).is_ok(), "{good}");
        }
        for bad in [
            "9",
            "2018-08-31",
            "2021-1-01",
            "2021-10-01x",
            "",
            "2021/10/01",
        ] {
            assert!(check_webhook_api_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tpm_groups_need_roots_and_x509_groups_a_ca() {
        let err = normalize(
            Kind::Group,
            "grp",
            json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}),
            None,
            0,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidAttestation);
        let doc = normalize(
            Kind::Group,
            "grp",
            json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root"}}}}),
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            crate::enrollment::Enrollment::from_json("g", doc)
                .unwrap()
                .ca_references(),
            vec!["root".to_string()]
        );
    }
}
