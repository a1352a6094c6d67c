//! A provisioning service over a temporary SQLite store, with its built-in hub, for the
//! pipeline steps' unit tests: the real store, CA and hub, and joined hubs that cannot be
//! reached (a closed port), so a step's I/O is exercised rather than imitated.

use std::sync::Arc;

use serde_json::{Value, json};
use zerotouch_attestation::{AttestedIdentity, EnrollmentRef, Mechanism};

use super::hubs::{HubCredential, HubState, LinkedHub};
use super::{Dps, RegisterBody, Registering};
use crate::config::Settings;
use crate::db::{Collection, DocumentStore, Write};
use crate::enrollment::Enrollment;
use crate::hub::Hub;

pub(crate) struct Fixture {
    pub dps: Arc<Dps>,
    pub hub: Arc<Hub>,
    pub store: Arc<dyn DocumentStore>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary data dir");
        let mut settings = Settings::default();
        settings.service.data_dir = dir.path().to_path_buf();
        let url = settings.database_url().expect("the default database url");
        let store: Arc<dyn DocumentStore> =
            Arc::new(crate::db::open(&url).expect("a SQLite store"));
        let instance = Arc::new(
            crate::bootstrap::bootstrap(&settings, store.as_ref()).expect("a new instance"),
        );
        let telemetry =
            crate::telemetry::Telemetry::start(&url, crate::telemetry::Retention::default())
                .expect("the telemetry store");
        let hub = Arc::new(Hub::new(
            store.clone(),
            settings.service.hostnames.clone(),
            settings.hub_hostname(),
            telemetry,
            instance.ca.trust_bundle_pem(),
        ));
        let pki = Arc::new(
            crate::pki::Pki::new(store.clone(), instance.clone(), "localhost").expect("the PKI"),
        );
        let dps = Dps::new(
            store.clone(),
            instance.id_scope.clone(),
            Some(hub.clone()),
            instance,
            &settings,
            Vec::new(),
            pki,
        )
        .expect("the provisioning service");
        Fixture {
            dps: Arc::new(dps),
            hub,
            store,
            _dir: dir,
        }
    }

    /// Links a joined hub whose service API nobody answers (a port just closed), healthy as
    /// of now.
    pub fn link_dead_hub(&self, name: &str, weight: u32) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let hub = LinkedHub {
            name: name.to_string(),
            location: None,
            allocation_weight: weight,
            apply_allocation_policy: true,
            service_url: format!("https://127.0.0.1:{port}"),
            credential: HubCredential {
                key_name: "iothubowner".into(),
                key: zerotouch_attestation::symmetric_key::generate_key().expect("a key"),
            },
            state: HubState::Active,
            joined_at_utc: crate::time::now_rfc3339(),
            last_heartbeat_unix: crate::time::now_unix(),
            last_failure_unix: 0,
            heartbeat_token_sha256: String::new(),
        };
        let body = serde_json::to_value(&hub).expect("a hub record");
        self.store
            .put(Collection::LinkedHubs, name, None, &body, Write::Upsert)
            .expect("the hub record is written");
    }
}

/// A symmetric-key individual enrollment for `id` with `extra` fields.
pub(super) fn enrollment(id: &str, extra: Value) -> Enrollment {
    let mut body = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}}});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    Enrollment::from_json(id, body).expect("a valid enrollment")
}

pub(super) fn attested(id: &str) -> AttestedIdentity {
    AttestedIdentity {
        registration_id: id.to_string(),
        mechanism: Mechanism::SymmetricKey,
        matched: EnrollmentRef::Individual(id.to_string()),
        certificate_info: None,
        signing_certificate_info: None,
        expires_at: None,
    }
}

/// The identity a symmetric-key device gets on its hub.
pub(super) fn identity(device_id: &str) -> Value {
    let key = || zerotouch_attestation::symmetric_key::generate_key().expect("a key");
    json!({"deviceId": device_id, "status": "enabled",
        "authentication": {"type": "sas", "symmetricKey": {
            "primaryKey": key(), "secondaryKey": key()}},
        "capabilities": {"iotEdge": false}})
}

pub(super) fn registering<'a>(
    enrollment: &'a Enrollment,
    attested: &'a AttestedIdentity,
    body: &'a RegisterBody,
) -> Registering<'a> {
    Registering {
        registration_id: enrollment.id(),
        attested,
        enrollment,
        body,
        device_id: enrollment.id().to_string(),
        previous: None,
    }
}
