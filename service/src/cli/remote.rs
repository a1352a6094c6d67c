//! The clients of the management API: each verb signs its requests (`ApiClient`) and prints
//! the JSON the API answers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

use super::client::{ApiClient, ApiFailure, encode};
use super::table::Column;
use super::{
    AttestationKind, AuditCommand, CaRemoteCommand, CertCommand, EnrollmentCommand,
    EnrollmentFields, HubRemoteCommand, PolicyCommand, RegistrationCommand, print_json, print_out,
};

const ENROLLMENTS: &[Column] = &[
    Column {
        header: "ID",
        pointers: &["/registrationId", "/enrollmentGroupId"],
    },
    Column {
        header: "ATTESTATION",
        pointers: &["/attestation/type"],
    },
    Column {
        header: "STATUS",
        pointers: &["/provisioningStatus"],
    },
    Column {
        header: "POLICY",
        pointers: &["/allocationPolicy"],
    },
    Column {
        header: "DEVICE",
        pointers: &["/deviceId"],
    },
    Column {
        header: "UPDATED",
        pointers: &["/lastUpdatedDateTimeUtc"],
    },
];
const REGISTRATIONS: &[Column] = &[
    Column {
        header: "REGISTRATION",
        pointers: &["/registrationId"],
    },
    Column {
        header: "STATUS",
        pointers: &["/status"],
    },
    Column {
        header: "HUB",
        pointers: &["/assignedHub"],
    },
    Column {
        header: "DEVICE",
        pointers: &["/deviceId"],
    },
    Column {
        header: "ERROR",
        pointers: &["/errorMessage"],
    },
    Column {
        header: "UPDATED",
        pointers: &["/lastUpdatedDateTimeUtc"],
    },
];
/// Names and rights; the keys only in `--output json`.
const POLICIES: &[Column] = &[
    Column {
        header: "NAME",
        pointers: &["/keyName"],
    },
    Column {
        header: "RIGHTS",
        pointers: &["/rights"],
    },
];
const CA_CERTIFICATES: &[Column] = &[
    Column {
        header: "NAME",
        pointers: &["/name"],
    },
    Column {
        header: "SUBJECT",
        pointers: &["/properties/subject"],
    },
    Column {
        header: "VERIFIED",
        pointers: &["/properties/isVerified"],
    },
    Column {
        header: "EXPIRES",
        pointers: &["/properties/expiry"],
    },
];
use crate::enrollment::Kind;

/// Escapes every character but ASCII letters and digits (ids in enrollment, registration,
/// certificate and audit paths and filters).
fn escape_all(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Applies the flags to a body (a new one for create, the current one for update).
fn apply_fields(kind: Kind, body: &mut Value, fields: &EnrollmentFields) -> anyhow::Result<()> {
    if let Some(file) = &fields.from_file {
        let loaded: Value = serde_json::from_str(&read_text(file)?)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        if let (Some(target), Value::Object(source)) = (body.as_object_mut(), loaded) {
            target.extend(source);
        }
    }
    if let Some(kind_flag) = fields.attestation {
        body["attestation"] = match kind_flag {
            AttestationKind::SymmetricKey => json!({"type": "symmetricKey", "symmetricKey": {}}),
            AttestationKind::Tpm => json!({"type": "tpm", "tpm": {}}),
            AttestationKind::X509 => json!({"type": "x509", "x509": {}}),
        };
    }
    if fields.primary_key.is_some() || fields.secondary_key.is_some() {
        let keys = json!({"primaryKey": fields.primary_key, "secondaryKey": fields.secondary_key});
        body["attestation"]["type"] = json!("symmetricKey");
        body["attestation"]["symmetricKey"] = keys;
    }
    if fields.certificate.is_some() || fields.secondary_certificate.is_some() {
        let slot = |p: &Option<PathBuf>| -> anyhow::Result<Value> {
            Ok(match p {
                Some(path) => json!({"certificate": read_text(path)?}),
                None => Value::Null,
            })
        };
        let pair = json!({"primary": slot(&fields.certificate)?, "secondary": slot(&fields.secondary_certificate)?});
        let section = match kind {
            Kind::Individual => "clientCertificates",
            Kind::Group => "signingCertificates",
        };
        body["attestation"]["type"] = json!("x509");
        body["attestation"]["x509"] = json!({ section: pair });
    }
    if let Some(name) = &fields.ca_reference {
        body["attestation"]["type"] = json!("x509");
        body["attestation"]["x509"] = json!({"caReferences": {"primary": name}});
    }
    if let Some(ek) = &fields.endorsement_key {
        body["attestation"]["type"] = json!("tpm");
        body["attestation"]["tpm"] =
            json!({"endorsementKey": ek, "storageRootKey": fields.storage_root_key});
    }
    if let Some(device_id) = &fields.device_id {
        body["deviceId"] = json!(device_id);
    }
    if let Some(status) = &fields.status {
        body["provisioningStatus"] = json!(status);
    }
    if let Some(hubs) = &fields.iot_hubs {
        body["iotHubs"] = json!(hubs);
    }
    if let Some(policy) = &fields.allocation_policy {
        body["allocationPolicy"] = json!(policy);
    }
    if let Some(tags) = &fields.tags {
        body["initialTwin"]["tags"] = serde_json::from_str(tags).context("--tags is not JSON")?;
    }
    if let Some(desired) = &fields.desired {
        body["initialTwin"]["properties"]["desired"] =
            serde_json::from_str(desired).context("--desired is not JSON")?;
    }
    if let Some(edge) = fields.edge {
        body["capabilities"] = json!({"iotEdge": edge});
    }
    Ok(())
}

pub(super) fn enrollment(kind: Kind, command: EnrollmentCommand) -> anyhow::Result<()> {
    let base = match kind {
        Kind::Individual => "/enrollments",
        Kind::Group => "/enrollmentGroups",
    };
    match command {
        EnrollmentCommand::Create { remote, id, fields } => {
            let client = ApiClient::new(&remote)?;
            let mut body = json!({ kind.id_field(): id });
            if fields.attestation.is_none() && fields.from_file.is_none() {
                body["attestation"] = json!({"type": "symmetricKey"});
            }
            apply_fields(kind, &mut body, &fields)?;
            let path = format!("{base}/{}", escape_all(&id));
            print_json(
                &client
                    .call(reqwest::Method::PUT, &path, Some(&body), &[])?
                    .0,
            )
        }
        EnrollmentCommand::Show {
            remote,
            id,
            show_keys,
        } => {
            let client = ApiClient::new(&remote)?;
            let path = format!("{base}/{}", escape_all(&id));
            let mut value = client.get(&path)?;
            if show_keys {
                value["attestation"] = client
                    .call(
                        reqwest::Method::POST,
                        &format!("{path}/attestationmechanism"),
                        None,
                        &[],
                    )?
                    .0;
            }
            print_out(remote.output, &value, &[])
        }
        EnrollmentCommand::List { remote } => {
            let client = ApiClient::new(&remote)?;
            let all = client.query_all(&format!("{base}/query"), Some(&json!({"query": "*"})))?;
            print_out(remote.output, &all, ENROLLMENTS)
        }
        EnrollmentCommand::Update {
            remote,
            id,
            etag,
            fields,
        } => {
            let client = ApiClient::new(&remote)?;
            let path = format!("{base}/{}", escape_all(&id));
            let mut body = client.get(&path)?;
            let current = body["etag"].as_str().unwrap_or("*").to_string();
            let etag = etag.unwrap_or(current);
            if let Some(map) = body.as_object_mut() {
                for read_only in [
                    "etag",
                    "createdDateTimeUtc",
                    "lastUpdatedDateTimeUtc",
                    "registrationState",
                ] {
                    map.remove(read_only);
                }
            }
            apply_fields(kind, &mut body, &fields)?;
            print_json(
                &client
                    .call(
                        reqwest::Method::PUT,
                        &path,
                        Some(&body),
                        &[("If-Match", &etag)],
                    )?
                    .0,
            )
        }
        EnrollmentCommand::Delete { remote, id, etag } => {
            let client = ApiClient::new(&remote)?;
            let path = format!("{base}/{}", escape_all(&id));
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            client.call(reqwest::Method::DELETE, &path, None, &headers)?;
            Ok(())
        }
    }
}

pub(super) fn registration(command: RegistrationCommand) -> anyhow::Result<()> {
    match command {
        RegistrationCommand::Show { remote, id } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get(&format!("/registrations/{}", escape_all(&id)))?,
            &[],
        ),
        RegistrationCommand::List { remote, group } => {
            let all = ApiClient::new(&remote)?.query_all(
                &format!("/registrations/{}/query", escape_all(&group)),
                None,
            )?;
            print_out(remote.output, &all, REGISTRATIONS)
        }
        RegistrationCommand::Delete { remote, id, etag } => {
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            ApiClient::new(&remote)?.call(
                reqwest::Method::DELETE,
                &format!("/registrations/{}", escape_all(&id)),
                None,
                &headers,
            )?;
            Ok(())
        }
    }
}

pub(super) fn ca(command: CaRemoteCommand) -> anyhow::Result<()> {
    match command {
        CaRemoteCommand::Upload {
            remote,
            name,
            certificate,
            verified,
            etag,
        } => {
            let body = json!({"certificate": read_text(&certificate)?, "isVerified": verified});
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            let answer = ApiClient::new(&remote)?
                .call(
                    reqwest::Method::PUT,
                    &format!("/certificates/{}", encode(&name)),
                    Some(&body),
                    &headers,
                )
                .map_err(|e| match ApiFailure::code_of(&e) {
                    // The API's own hint (send If-Match) means --etag here.
                    Some(409_201) => anyhow::anyhow!(
                        "a CA certificate named {name:?} already exists: pass --etag ETAG (the \
                         etag `zerotouch ca show {name}` prints) or --etag '*' to replace it, \
                         or upload under another name"
                    ),
                    _ => e,
                })?;
            print_json(&answer.0)
        }
        CaRemoteCommand::List { remote } => {
            let all = ApiClient::new(&remote)?.get("/certificates")?;
            print_out(remote.output, &all, CA_CERTIFICATES)
        }
        CaRemoteCommand::Show { remote, name } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get(&format!("/certificates/{}", encode(&name)))?,
            &[],
        ),
        CaRemoteCommand::VerificationCode { remote, name } => {
            let client = ApiClient::new(&remote)?;
            let current = client.get(&format!("/certificates/{}", encode(&name)))?;
            let etag = current["etag"].as_str().unwrap_or("*").to_string();
            print_json(
                &client
                    .call(
                        reqwest::Method::POST,
                        &format!("/certificates/{}/generateVerificationCode", encode(&name)),
                        None,
                        &[("If-Match", &etag)],
                    )?
                    .0,
            )
        }
        CaRemoteCommand::Verify {
            remote,
            name,
            certificate,
        } => {
            let client = ApiClient::new(&remote)?;
            let current = client.get(&format!("/certificates/{}", encode(&name)))?;
            let etag = current["etag"].as_str().unwrap_or("*").to_string();
            let body = json!({"certificate": read_text(&certificate)?});
            print_json(
                &client
                    .call(
                        reqwest::Method::POST,
                        &format!("/certificates/{}/verify", encode(&name)),
                        Some(&body),
                        &[("If-Match", &etag)],
                    )?
                    .0,
            )
        }
        CaRemoteCommand::Delete { remote, name } => {
            ApiClient::new(&remote)?.call(
                reqwest::Method::DELETE,
                &format!("/certificates/{}", encode(&name)),
                None,
                &[],
            )?;
            Ok(())
        }
    }
}

pub(super) fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::List { remote } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get("/authorizationPolicies")?,
            POLICIES,
        ),
        PolicyCommand::Add {
            remote,
            name,
            rights,
        } => {
            let client = ApiClient::new(&remote)?;
            let path = format!("/authorizationPolicies/{}", encode(&name));
            let existing = client.get(&path).ok();
            let etag = existing
                .as_ref()
                .and_then(|e| e["etag"].as_str())
                .map(String::from);
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            print_json(
                &client
                    .call(
                        reqwest::Method::PUT,
                        &path,
                        Some(&json!({"rights": rights})),
                        &headers,
                    )?
                    .0,
            )
        }
        PolicyCommand::Rotate { remote, name, key } => print_json(
            &ApiClient::new(&remote)?
                .call(
                    reqwest::Method::POST,
                    &format!("/authorizationPolicies/{}/regenerateKey", encode(&name)),
                    Some(&json!({"keyType": key})),
                    &[],
                )?
                .0,
        ),
        PolicyCommand::Remove { remote, name } => {
            ApiClient::new(&remote)?.call(
                reqwest::Method::DELETE,
                &format!("/authorizationPolicies/{}", encode(&name)),
                None,
                &[],
            )?;
            Ok(())
        }
    }
}

pub(super) fn hub(command: HubRemoteCommand) -> anyhow::Result<()> {
    let encode =
        |name: &str| url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>();
    match command {
        HubRemoteCommand::List { remote } => {
            print_out(remote.output, &ApiClient::new(&remote)?.get("/hubs")?, &[])
        }
        HubRemoteCommand::Show { remote, name } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get(&format!("/hubs/{}", encode(&name)))?,
            &[],
        ),
        HubRemoteCommand::Drain { remote, name } => print_json(
            &ApiClient::new(&remote)?
                .call(
                    reqwest::Method::POST,
                    &format!("/hubs/{}/drain", encode(&name)),
                    None,
                    &[],
                )?
                .0,
        ),
        HubRemoteCommand::Activate { remote, name } => print_json(
            &ApiClient::new(&remote)?
                .call(
                    reqwest::Method::POST,
                    &format!("/hubs/{}/activate", encode(&name)),
                    None,
                    &[],
                )?
                .0,
        ),
        HubRemoteCommand::Remove { remote, name } => {
            ApiClient::new(&remote)?.call(
                reqwest::Method::DELETE,
                &format!("/hubs/{}", encode(&name)),
                None,
                &[],
            )?;
            eprintln!("hub {name} removed");
            Ok(())
        }
    }
}

/// `path?k=v&…` for the filters that are set.
fn with_filters(path: &str, filters: &[(&str, &Option<String>)]) -> String {
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", escape_all(v))))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

pub(super) fn cert(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Revoke {
            remote,
            serial,
            reason,
        } => {
            let (record, _) = ApiClient::new(&remote)?.call(
                reqwest::Method::POST,
                &format!("/certificates/issued/{}/revoke", escape_all(&serial)),
                Some(&json!({ "reason": reason })),
                &[],
            )?;
            print_json(&record)
        }
        CertCommand::List {
            remote,
            registration_id,
            status,
        } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get_all(&with_filters(
                "/certificates/issued",
                &[("registrationId", &registration_id), ("status", &status)],
            ))?,
            &[],
        ),
    }
}

pub(super) fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List {
            remote,
            serial,
            registration_id,
            action,
        } => print_out(
            remote.output,
            &ApiClient::new(&remote)?.get_all(&with_filters(
                "/audit",
                &[
                    ("serial", &serial),
                    ("registrationId", &registration_id),
                    ("action", &action),
                ],
            ))?,
            &[],
        ),
    }
}
