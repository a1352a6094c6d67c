//! Step 5 of a registration: the registration record, as DPS keeps it (dps-protocol §1.5) and
//! as devices and operators read it back. The stored JSON is the device API's
//! `registrationState` plus the operation ids still pollable.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use zerotouch_attestation::tpm::Activation;
use zerotouch_attestation::{AttestedIdentity, Mechanism};

use super::Dps;
use super::error::Error;
use crate::db::{Change, Collection, Document, Read, StoreError};
use zerotouch_certs::IssuedDeviceCertificate;

/// Where a registration stands (`registrationState.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    Unassigned,
    Assigning,
    Assigned,
    Failed,
    Disabled,
}

impl RegistrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationStatus::Unassigned => "unassigned",
            RegistrationStatus::Assigning => "assigning",
            RegistrationStatus::Assigned => "assigned",
            RegistrationStatus::Failed => "failed",
            RegistrationStatus::Disabled => "disabled",
        }
    }
}

/// What an assignment did to the device's data (dps-protocol §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    InitialAssignment,
    DeviceDataMigrated,
    DeviceDataReset,
    ReprovisionedToInitialAssignment,
}

/// One device's registration record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// `{"enrollmentGroupId": …}` of a symmetric-key device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<Value>,
    /// The device's certificate and the group certificate it chained to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    /// `{"authenticationKey": …}`: the activation blob (never shown by status look-ups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Serial, subject and validity of a certificate issued from the device's CSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate: Option<Value>,
    /// Base64 DER, leaf first: kept so the poll after a 202 can hand it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
    /// Operations a device may still poll (the last few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operation_ids: Vec<String>,
    /// Fields this version does not interpret, kept as stored.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Operation ids kept per record: a device that registered twice concurrently polls both.
const KEEP_OPERATIONS: usize = 8;

impl Registration {
    /// A record of status `status` for `registration_id`, updated `now`.
    pub fn new(registration_id: &str, status: RegistrationStatus, now: &str) -> Registration {
        Registration {
            registration_id: registration_id.to_string(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: Some(now.to_string()),
            symmetric_key: None,
            x509: None,
            tpm: None,
            payload: None,
            issued_certificate: None,
            issued_certificate_chain: None,
            operation_ids: Vec::new(),
            other: Map::new(),
        }
    }

    /// A failed registration: DPS's `errorCode` and `errorMessage`.
    pub fn failed(registration_id: &str, code: u32, message: &str, now: &str) -> Registration {
        Registration {
            error_code: Some(code),
            error_message: Some(message.to_string()),
            ..Registration::new(registration_id, RegistrationStatus::Failed, now)
        }
    }

    pub fn from_document(doc: &Document) -> Result<Registration, Error> {
        serde_json::from_value(doc.body.clone()).map_err(|e| {
            Error::Internal(format!(
                "the stored registration {:?} is unreadable: {e}",
                doc.id
            ))
        })
    }

    pub fn to_json(&self) -> Value {
        // Only maps with string keys and plain values: serialising cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Whether the device's identity is on a hub (assigned, or failed since with the
    /// assignment before kept).
    pub fn placed(&self) -> Option<(&str, &str)> {
        Some((self.assigned_hub.as_deref()?, self.device_id.as_deref()?))
    }

    /// This record written over `current` for operation `operation_id`: the first creation
    /// time stays, the operation joins the pollable ones, and a failure keeps the assignment
    /// before it (the device's identity is still there).
    pub fn merged_over(
        mut self,
        current: Option<&Registration>,
        operation_id: &str,
    ) -> Registration {
        let mut operations = current.map(|c| c.operation_ids.clone()).unwrap_or_default();
        operations.push(operation_id.to_string());
        let skip = operations.len().saturating_sub(KEEP_OPERATIONS);
        self.operation_ids = operations.into_iter().skip(skip).collect();
        if let Some(current) = current {
            if current.created_date_time_utc.is_some() {
                self.created_date_time_utc = current.created_date_time_utc.clone();
            }
            if self.status == RegistrationStatus::Failed {
                if current.assigned_hub.is_some() {
                    self.assigned_hub = current.assigned_hub.clone();
                }
                if current.device_id.is_some() {
                    self.device_id = current.device_id.clone();
                }
            }
        }
        self
    }

    /// How the device attested and what it was issued, as DPS reports them.
    pub fn attach_credentials(
        &mut self,
        attested: &AttestedIdentity,
        group_id: Option<&str>,
        issued: Option<&IssuedDeviceCertificate>,
        activation: Option<&Activation>,
    ) {
        match attested.mechanism {
            Mechanism::SymmetricKey => {
                self.symmetric_key = Some(json!({"enrollmentGroupId": group_id}));
            }
            Mechanism::X509 => {
                self.x509 = Some(json!({
                    "certificateInfo": attested.certificate_info,
                    "enrollmentGroupId": group_id,
                    "signingCertificateInfo": attested.signing_certificate_info,
                }));
            }
            Mechanism::Tpm => {
                self.tpm = activation.map(|a| json!({"authenticationKey": a.blob_base64()}));
            }
        }
        if let Some(issued) = issued {
            self.issued_certificate = Some(json!({
                "serialNumber": issued.serial_hex,
                "subject": issued.subject,
                "notBeforeUnix": issued.not_before_unix,
                "notAfterUnix": issued.not_after_unix,
            }));
            self.issued_certificate_chain =
                Some(issued.chain_der.iter().map(|d| B64.encode(d)).collect());
        }
    }

    /// The `registrationState` of a register or poll answer: with the certificate chain,
    /// without the operation ids.
    pub fn answer(&self, etag: &str) -> Value {
        let mut state = self.to_json();
        state["etag"] = json!(crate::hub::bare_etag(etag));
        if let Some(map) = state.as_object_mut() {
            map.remove("operationIds");
        }
        state
    }
}

/// A registration record as devices (status look-up) and operators see it: no operation ids,
/// and neither the issued certificate chain nor the TPM blob (those go only in register and
/// poll answers, dps-protocol §1.5).
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

/// What [`Dps::record`] did.
pub enum Recorded {
    Written(Document),
    /// Nothing: the record belongs to another spelling of the id (the one given).
    SpelledFirstAs(String),
}

impl Dps {
    /// Writes a registration record (read-merge-write guarded by the etag, so concurrent
    /// registrations of one device all stay pollable; see [`Registration::merged_over`]). For a
    /// group member (`parent`) the record also decides which spelling of its id came first
    /// when two raced: a record spelled otherwise is left alone.
    pub(super) async fn record(
        &self,
        registration_id: &str,
        parent: Option<String>,
        record: Registration,
        operation_id: &str,
        read: Read,
    ) -> Result<Recorded, Error> {
        let id = registration_id.to_string();
        let this_operation = operation_id.to_string();
        let updated = crate::db::blocking(&self.store, move |s| {
            s.update_from::<_, StoreError>(Collection::Registrations, &id, read, |current| {
                if parent.is_some()
                    && let Some(first) = current.filter(|c| c.id != id)
                {
                    return Ok(Change::Keep(Some(first.id.clone())));
                }
                // A record this version cannot read is replaced rather than merged.
                let current = current.and_then(|c| Registration::from_document(c).ok());
                let record = record
                    .clone()
                    .merged_over(current.as_ref(), &this_operation);
                Ok(Change::Put {
                    body: record.to_json(),
                    parent: parent.clone(),
                    result: None,
                })
            })
        })
        .await?;
        match (updated.result, updated.document) {
            (Some(first), _) => Ok(Recorded::SpelledFirstAs(first)),
            (None, Some(doc)) => Ok(Recorded::Written(doc)),
            (None, None) => Err(Error::Internal(
                "a written registration record is gone".into(),
            )),
        }
    }

    /// The record of `registration_id` (if it registered) and the joined hubs' records, in
    /// one trip to the store: what a registration reads before it chooses a hub.
    pub(super) async fn registration_and_hubs(
        &self,
        registration_id: &str,
    ) -> Result<
        (
            Option<(Registration, Document)>,
            Vec<super::hubs::LinkedHub>,
        ),
        Error,
    > {
        let id = registration_id.to_string();
        let (doc, hubs) = crate::db::blocking(&self.store, move |s| {
            Ok((
                s.get(Collection::Registrations, &id)?,
                super::hubs::load_all(s)?,
            ))
        })
        .await?;
        Ok((parsed(doc)?, hubs))
    }

    /// The record of `registration_id`, if it registered.
    pub(super) async fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<(Registration, Document)>, Error> {
        let id = registration_id.to_string();
        let doc = crate::db::blocking(&self.store, move |s| s.get(Collection::Registrations, &id))
            .await?;
        parsed(doc)
    }
}

/// A stored registration record with the document it was read from.
fn parsed(doc: Option<Document>) -> Result<Option<(Registration, Document)>, Error> {
    doc.map(|doc| Ok((Registration::from_document(&doc)?, doc)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(hub: &str, now: &str) -> Registration {
        Registration {
            assigned_hub: Some(hub.into()),
            device_id: Some("dev".into()),
            created_date_time_utc: Some(now.into()),
            substatus: Some(Substatus::InitialAssignment),
            ..Registration::new("dev", RegistrationStatus::Assigned, now)
        }
    }

    #[test]
    fn the_stored_form_round_trips_unchanged() {
        let stored = json!({"registrationId": "dev", "createdDateTimeUtc": "t0",
            "assignedHub": "h", "deviceId": "dev", "status": "assigned",
            "substatus": "deviceDataMigrated", "lastUpdatedDateTimeUtc": "t1",
            "x509": {"enrollmentGroupId": "g", "certificateInfo": {"a": 1}},
            "issuedCertificate": {"serialNumber": "01"}, "issuedCertificateChain": ["AA=="],
            "operationIds": ["op1"], "payload": {"p": [1]}, "later": true});
        let doc = Document {
            id: "dev".into(),
            etag: "\"e\"".into(),
            body: stored.clone(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
            parent: None,
        };
        assert_eq!(Registration::from_document(&doc).unwrap().to_json(), stored);
    }

    #[test]
    fn a_rewrite_keeps_the_creation_time_and_the_last_operations() {
        let mut current = assigned("h", "t0");
        current.operation_ids = (0..KEEP_OPERATIONS).map(|i| format!("op{i}")).collect();
        let next = Registration {
            created_date_time_utc: Some("t9".into()),
            ..assigned("h2", "t9")
        }
        .merged_over(Some(&current), "new");
        assert_eq!(next.created_date_time_utc.as_deref(), Some("t0"));
        assert_eq!(next.operation_ids.len(), KEEP_OPERATIONS);
        assert_eq!(next.operation_ids.first().map(String::as_str), Some("op1"));
        assert_eq!(next.operation_ids.last().map(String::as_str), Some("new"));
        assert_eq!(next.assigned_hub.as_deref(), Some("h2"));
    }

    #[test]
    fn a_failure_keeps_the_assignment_before_it() {
        let current = assigned("h", "t0");
        let failed =
            Registration::failed("dev", 400_208, "no hub", "t5").merged_over(Some(&current), "op");
        assert_eq!(failed.status, RegistrationStatus::Failed);
        assert_eq!(failed.placed(), Some(("h", "dev")));
        assert_eq!(failed.error_code, Some(400_208));
        let first = Registration::failed("dev", 400_208, "no hub", "t5").merged_over(None, "op");
        assert_eq!(first.placed(), None);
        assert_eq!(first.operation_ids, ["op"]);
    }

    #[test]
    fn answers_and_views_hide_what_they_must() {
        let mut record = assigned("h", "t0");
        record.operation_ids = vec!["op".into()];
        record.tpm = Some(json!({"authenticationKey": "blob"}));
        record.issued_certificate_chain = Some(vec!["AA==".into()]);
        let answer = record.answer("\"abc\"");
        assert_eq!(answer["etag"], "abc");
        assert!(answer.get("operationIds").is_none());
        assert_eq!(answer["tpm"]["authenticationKey"], "blob");
        let doc = Document {
            id: "dev".into(),
            etag: "\"abc\"".into(),
            body: record.to_json(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
            parent: None,
        };
        let view = device_view(&doc);
        for hidden in ["operationIds", "tpm", "issuedCertificateChain"] {
            assert!(view.get(hidden).is_none(), "{hidden}");
        }
        assert_eq!(view["assignedHub"], "h");
    }
}
