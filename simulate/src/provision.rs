//! The simulator's provisioning side: enrollments through the management API, device
//! credentials (symmetric keys, X.509 leaves from a CA made for the run, CSRs), and one
//! device's registration over MQTT (dps-protocol §2, the Python SDK's flow) or HTTPS (§1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Name, X509NameBuilder, X509ReqBuilder};
use rumqttc::tokio_native_tls::native_tls;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use zerotouch_attestation::symmetric_key;

use super::mqtt::{connection_error_kind, response_status, topic_query_value};
use super::stats::{random_key, reqwest_kind};

/// The management API's version.
const API_VERSION: &str = "2021-10-01";
/// The device API version over HTTPS (the C SDK's, aziot's).
const DEVICE_API_VERSION: &str = "2021-06-01";
/// The device API version over MQTT (the Python SDK's).
const MQTT_DPS_API_VERSION: &str = "2019-03-31";
/// Enrollment keys: 64 bytes, what DPS generates.
const KEY_BYTES: usize = 64;
/// Lifetime of the SAS tokens the simulator signs; longer than any bounded run.
pub const TOKEN_TTL_SECS: u64 = 3600;
/// The enrollment group and CA certificate names the simulator owns (replaced on each run).
pub const SK_GROUP: &str = "simulate-sk";
pub const X509_GROUP: &str = "simulate-x509";
pub const X509_ROOT: &str = "simulate-root";

/// How devices prove who they are to DPS.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attestation {
    /// Enrollment group `simulate-sk`; each device signs with its derived key.
    SymmetricKeyGroup,
    /// One individual symmetric-key enrollment per device.
    SymmetricKey,
    /// Enrollment group `simulate-x509` on a CA made for the run; each device presents its leaf.
    X509,
}

impl Attestation {
    pub fn name(self) -> &'static str {
        match self {
            Attestation::SymmetricKeyGroup => "symmetric-key-group",
            Attestation::SymmetricKey => "symmetric-key",
            Attestation::X509 => "x509",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DpsTransport {
    Mqtt,
    Https,
}

/// A key or certificate a device holds.
#[derive(Clone)]
pub enum Credential {
    /// A device key (standard base64).
    Sas(String),
    /// A PEM certificate chain (leaf first) and its PKCS#8 PEM key.
    Certificate {
        chain_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
}

pub struct SimDevice {
    pub registration_id: String,
    pub credential: Credential,
}

/// Where the server is and what to trust.
pub struct Target {
    /// The host dialled and checked in the server certificate (DPS and, by default, the hub).
    pub host: String,
    pub https_port: u16,
    pub mqtt_port: u16,
    pub id_scope: String,
    pub ca_pem: Vec<u8>,
}

impl Target {
    /// `host:port`, with brackets around an IPv6 literal.
    pub fn authority(host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    pub fn https_base(&self) -> String {
        format!("https://{}", Target::authority(&self.host, self.https_port))
    }
}

/// What DPS answered for one device, and what the device then holds for its hub.
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    pub hub_credential: Credential,
    pub latency_ms: f64,
}

/// Options every registration shares.
pub struct RegisterPlan {
    pub target: Arc<Target>,
    pub transport: DpsTransport,
    pub csr: bool,
    /// For SAS devices over MQTT and HTTPS (no client identity): one connector / one client.
    pub shared_connector: native_tls::TlsConnector,
    pub shared_http: reqwest::Client,
    pub roots: Vec<reqwest::Certificate>,
    pub request_timeout: Duration,
    /// Attempts after a 429/5xx or a `retry-after`, per registration.
    pub max_attempts: u32,
}

// ----- the management API --------------------------------------------------------------------

/// The management API, signed with an owner-policy SAS token.
pub struct Management {
    pub http: reqwest::Client,
    pub base: String,
    pub auth: String,
}

impl Management {
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let response = request.header("Authorization", &self.auth).send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// PUT that creates, or replaces (`If-Match: *`) what already exists.
    pub async fn put_or_replace(&self, path: &str, body: &Value) -> anyhow::Result<()> {
        let url = format!("{}{path}?api-version={API_VERSION}", self.base);
        let (status, answer) = self.send(self.http.put(&url).json(body)).await?;
        let (status, answer) = if status == 409 {
            self.send(self.http.put(&url).header("If-Match", "*").json(body))
                .await?
        } else {
            (status, answer)
        };
        if !(200..300).contains(&status) {
            bail!("PUT {path} answered {status}: {answer}");
        }
        Ok(())
    }
}

/// Creates what `attestation` needs on the server and every device's DPS credential.
pub async fn setup(
    management: &Management,
    attestation: Attestation,
    ids: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<SimDevice>> {
    match attestation {
        Attestation::SymmetricKeyGroup => {
            let group_key = random_key(KEY_BYTES);
            management
                .put_or_replace(
                    &format!("/enrollmentGroups/{SK_GROUP}"),
                    &json!({
                        "enrollmentGroupId": SK_GROUP,
                        "attestation": {"type": "symmetricKey", "symmetricKey": {
                            "primaryKey": group_key, "secondaryKey": random_key(KEY_BYTES)}},
                    }),
                )
                .await
                .context("creating the symmetric-key enrollment group")?;
            ids.iter()
                .map(|id| {
                    let key = symmetric_key::derive_device_key(&group_key, id)
                        .map_err(|e| anyhow::anyhow!("deriving a device key: {e}"))?;
                    Ok(SimDevice {
                        registration_id: id.clone(),
                        credential: Credential::Sas(key),
                    })
                })
                .collect()
        }
        Attestation::SymmetricKey => {
            let gate = Arc::new(Semaphore::new(concurrency.max(1)));
            let mut set = JoinSet::new();
            for id in ids {
                let (gate, id) = (gate.clone(), id.clone());
                let (http, base, auth) = (
                    management.http.clone(),
                    management.base.clone(),
                    management.auth.clone(),
                );
                set.spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let key = random_key(KEY_BYTES);
                    let m = Management { http, base, auth };
                    m.put_or_replace(
                        &format!("/enrollments/{id}"),
                        &json!({
                            "registrationId": id,
                            "attestation": {"type": "symmetricKey", "symmetricKey": {
                                "primaryKey": key, "secondaryKey": random_key(KEY_BYTES)}},
                        }),
                    )
                    .await
                    .with_context(|| format!("creating the enrollment {id}"))?;
                    anyhow::Ok(SimDevice {
                        registration_id: id,
                        credential: Credential::Sas(key),
                    })
                });
            }
            let mut devices = Vec::with_capacity(ids.len());
            while let Some(joined) = set.join_next().await {
                devices.push(joined.context("an enrollment task failed")??);
            }
            devices.sort_by(|a, b| a.registration_id.cmp(&b.registration_id));
            Ok(devices)
        }
        Attestation::X509 => {
            let (root, root_key) = root_ca("zerotouch simulate root CA")?;
            management
                .put_or_replace(
                    &format!("/certificates/{X509_ROOT}"),
                    &json!({"certificate": String::from_utf8(root.to_pem()?)?, "isVerified": true}),
                )
                .await
                .context("uploading the simulator's root CA")?;
            management
                .put_or_replace(
                    &format!("/enrollmentGroups/{X509_GROUP}"),
                    &json!({
                        "enrollmentGroupId": X509_GROUP,
                        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": X509_ROOT}}},
                    }),
                )
                .await
                .context("creating the X.509 enrollment group")?;
            ids.iter()
                .map(|id| {
                    let key = ec_key()?;
                    let leaf = leaf_certificate(&root, &root_key, &key, id)?;
                    Ok(SimDevice {
                        registration_id: id.clone(),
                        credential: Credential::Certificate {
                            chain_pem: leaf.to_pem()?,
                            key_pem: key.private_key_to_pem_pkcs8()?,
                        },
                    })
                })
                .collect()
        }
    }
}

// ----- certificates --------------------------------------------------------------------------

fn ec_key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn name(cn: &str) -> anyhow::Result<X509Name> {
    let mut builder = X509NameBuilder::new()?;
    builder.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(builder.build())
}

fn serial() -> anyhow::Result<openssl::asn1::Asn1Integer> {
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(serial.to_asn1_integer()?)
}

/// A self-signed P-256 root CA, valid from an hour ago for 30 days.
fn root_ca(cn: &str) -> anyhow::Result<(X509, PKey<Private>)> {
    let key = ec_key()?;
    let now = zerotouch_service::time::now_unix() as i64;
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial = serial()?;
    builder.set_serial_number(&serial)?;
    let subject = name(cn)?;
    builder.set_subject_name(&subject)?;
    builder.set_issuer_name(&subject)?;
    builder.set_pubkey(&key)?;
    let (not_before, not_after) = (
        Asn1Time::from_unix(now - 3600)?,
        Asn1Time::from_unix(now + 30 * 86_400)?,
    );
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    builder.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
    builder.append_extension(ski)?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok((builder.build(), key))
}

/// A device leaf (CN = registration id, clientAuth) for `key`, signed by the root.
fn leaf_certificate(
    root: &X509,
    root_key: &PKey<Private>,
    key: &PKey<Private>,
    cn: &str,
) -> anyhow::Result<X509> {
    let now = zerotouch_service::time::now_unix() as i64;
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial = serial()?;
    builder.set_serial_number(&serial)?;
    let subject = name(cn)?;
    builder.set_subject_name(&subject)?;
    builder.set_issuer_name(root.subject_name())?;
    builder.set_pubkey(key)?;
    let (not_before, not_after) = (
        Asn1Time::from_unix(now - 3600)?,
        Asn1Time::from_unix(now + 30 * 86_400)?,
    );
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
    builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&builder.x509v3_context(Some(root), None))?;
    builder.append_extension(aki)?;
    builder.sign(root_key, MessageDigest::sha256())?;
    Ok(builder.build())
}

/// A fresh key and a PKCS#10 request for it (CN = registration id): (key, base64 DER).
fn csr(cn: &str) -> anyhow::Result<(PKey<Private>, String)> {
    let key = ec_key()?;
    let mut builder = X509ReqBuilder::new()?;
    let subject = name(cn)?;
    builder.set_subject_name(&subject)?;
    builder.set_pubkey(&key)?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok((key, B64.encode(builder.build().to_der()?)))
}

/// `issuedCertificateChain` (base64 DER, leaf first) as one PEM chain.
fn issued_chain_pem(state: &Value) -> Result<Vec<u8>, String> {
    let chain = state["issuedCertificateChain"]
        .as_array()
        .filter(|c| !c.is_empty())
        .ok_or("register:no_issued_certificate")?;
    let mut pem = Vec::new();
    for der in chain {
        let der = der
            .as_str()
            .and_then(|d| B64.decode(d).ok())
            .ok_or("register:bad_issued_certificate")?;
        let cert = X509::from_der(&der).map_err(|_| "register:bad_issued_certificate")?;
        pem.extend(
            cert.to_pem()
                .map_err(|_| "register:bad_issued_certificate")?,
        );
    }
    Ok(pem)
}

// ----- one registration ------------------------------------------------------------------------

/// Registers one device and returns its assignment, or an error kind such as
/// `register:http_401`, `register:status_failed` or `dps_connect:connack:NotAuthorized`.
pub async fn register(plan: &RegisterPlan, device: &SimDevice) -> Result<Assignment, String> {
    let id = &device.registration_id;
    let (csr_key, csr_b64) = if plan.csr {
        let (key, der) = csr(id).map_err(|_| "csr:generate".to_string())?;
        (Some(key), Some(der))
    } else {
        (None, None)
    };
    let mut body = json!({"registrationId": id, "payload": null});
    if let Some(csr) = &csr_b64 {
        body["csr"] = json!(csr);
    }
    let sas = match &device.credential {
        Credential::Sas(key) => Some(
            symmetric_key::sign(
                &symmetric_key::registration_resource(&plan.target.id_scope, id),
                key,
                zerotouch_service::time::now_unix() + TOKEN_TTL_SECS,
                None,
            )
            .map_err(|_| "sign:bad_key".to_string())?,
        ),
        Credential::Certificate { .. } => None,
    };
    let started = Instant::now();
    let state = match plan.transport {
        DpsTransport::Mqtt => register_mqtt(plan, device, sas.as_deref(), &body).await?,
        DpsTransport::Https => register_https(plan, device, sas.as_deref(), &body).await?,
    };
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let field = |name: &str| {
        state[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("register:no_{name}"))
    };
    let hub_credential = match csr_key {
        Some(key) => Credential::Certificate {
            chain_pem: issued_chain_pem(&state)?,
            key_pem: key
                .private_key_to_pem_pkcs8()
                .map_err(|_| "csr:key".to_string())?,
        },
        None => device.credential.clone(),
    };
    Ok(Assignment {
        assigned_hub: field("assignedHub")?,
        device_id: field("deviceId")?,
        hub_credential,
        latency_ms,
    })
}

/// `retry-after` seconds, clamped to 1–60, default `default`.
fn retry_after(value: Option<&str>, default: u64) -> Duration {
    Duration::from_secs(
        value
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(default)
            .clamp(1, 60),
    )
}

/// The registration state of a final answer, or the error kind for any other final status.
fn final_state(body: &Value, what: &str) -> Result<Value, String> {
    match body["status"].as_str() {
        Some("assigned") => Ok(body["registrationState"].clone()),
        Some(other) => Err(format!("{what}:status_{other}")),
        None => Err(format!("{what}:no_status")),
    }
}

/// Over HTTPS: PUT register, then poll the operation. The first poll goes out at once (the
/// server has already waited for the outcome before it answered 202), later ones after the
/// server's `retry-after`. 429 and 5xx are retried after `retry-after`.
async fn register_https(
    plan: &RegisterPlan,
    device: &SimDevice,
    sas: Option<&str>,
    body: &Value,
) -> Result<Value, String> {
    let own_client;
    let client = match &device.credential {
        Credential::Sas(_) => &plan.shared_http,
        Credential::Certificate { chain_pem, key_pem } => {
            let mut builder = reqwest::Client::builder()
                .timeout(plan.request_timeout)
                .tls_built_in_root_certs(false)
                .tcp_nodelay(true)
                .identity(
                    reqwest::Identity::from_pkcs8_pem(chain_pem, key_pem)
                        .map_err(|_| "identity:invalid".to_string())?,
                );
            for root in &plan.roots {
                builder = builder.add_root_certificate(root.clone());
            }
            own_client = builder.build().map_err(|_| "identity:client".to_string())?;
            &own_client
        }
    };
    let with_auth = |request: reqwest::RequestBuilder| match sas {
        Some(token) => request.header("Authorization", token),
        None => request,
    };
    let id = &device.registration_id;
    let base = format!(
        "{}/{}/registrations/{id}",
        plan.target.https_base(),
        plan.target.id_scope
    );
    let mut operation: Option<String> = None;
    let mut wait = Duration::ZERO;
    for _ in 0..plan.max_attempts.max(1) {
        tokio::time::sleep(wait).await;
        let (what, request) = match &operation {
            None => (
                "register",
                client
                    .put(format!("{base}/register?api-version={DEVICE_API_VERSION}"))
                    .json(body),
            ),
            Some(op) => (
                "poll",
                client.get(format!(
                    "{base}/operations/{op}?api-version={DEVICE_API_VERSION}"
                )),
            ),
        };
        let response = with_auth(request)
            .send()
            .await
            .map_err(|e| format!("{what}:request:{}", reqwest_kind(&e)))?;
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let answer: Value = response
            .json()
            .await
            .map_err(|e| format!("{what}:body:{}", reqwest_kind(&e)))?;
        match status {
            200 => return final_state(&answer, what),
            202 => {
                let first = operation.is_none();
                operation = Some(
                    answer["operationId"]
                        .as_str()
                        .ok_or(format!("{what}:no_operation_id"))?
                        .to_string(),
                );
                wait = if first {
                    Duration::ZERO
                } else {
                    retry_after(retry.as_deref(), 1)
                };
            }
            429 | 500..=599 => wait = retry_after(retry.as_deref(), 1),
            status => return Err(format!("{what}:http_{status}")),
        }
    }
    Err("register:attempts_exhausted".into())
}

/// Over MQTT, as the Python SDK does it (dps-protocol §2.5): TLS 1.2, CONNECT (CleanSession=0,
/// keep-alive 60 s), SUBSCRIBE `$dps/registrations/res/#` and wait for the SUBACK, PUBLISH the
/// register at QoS 1, then follow the answers: 200 ends it, 202 polls after `retry-after`
/// (default 2 s), 429 and 5xx resend after `retry-after`.
async fn register_mqtt(
    plan: &RegisterPlan,
    device: &SimDevice,
    sas: Option<&str>,
    body: &Value,
) -> Result<Value, String> {
    let id = &device.registration_id;
    let connector = match &device.credential {
        Credential::Sas(_) => plan.shared_connector.clone(),
        Credential::Certificate { chain_pem, key_pem } => {
            super::mqtt::connector(&plan.target.ca_pem, Some((chain_pem, key_pem)), true)
                .map_err(|_| "identity:invalid".to_string())?
        }
    };
    let mut options = MqttOptions::new(id, plan.target.host.clone(), plan.target.mqtt_port);
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(false)
        .set_credentials(
            format!(
                "{}/registrations/{id}/api-version={MQTT_DPS_API_VERSION}&ClientVersion=zerotouch-simulate",
                plan.target.id_scope
            ),
            sas.unwrap_or_default(),
        )
        .set_transport(Transport::tls_with_config(
            TlsConfiguration::NativeConnector(connector),
        ));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(plan.request_timeout.as_secs().max(1));
    eventloop.set_network_options(network);

    let payload = body.to_string();
    let mut rid = 0u32;
    let mut operation: Option<String> = None;
    let mut attempts = 0u32;
    let send = |client: &AsyncClient, rid: u32, operation: Option<&str>, wait: Duration| {
        let (topic, payload) = match operation {
            None => (
                format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
                payload.clone(),
            ),
            Some(op) => (
                format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}"
                ),
                " ".to_string(),
            ),
        };
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = client
                .publish(topic, QoS::AtLeastOnce, false, payload.into_bytes())
                .await;
        });
    };
    let outcome = loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) if rid == 0 => break Err(format!("dps_connect:{}", connection_error_kind(&e))),
            Err(e) => break Err(format!("dps_session:{}", connection_error_kind(&e))),
        };
        match event {
            Event::Incoming(Packet::ConnAck(_))
                if client
                    .try_subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
                    .is_err() =>
            {
                break Err("dps_subscribe:queue_full".into());
            }
            Event::Incoming(Packet::SubAck(_)) => {
                rid += 1;
                send(&client, rid, None, Duration::ZERO);
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let topic = publish.topic.as_str();
                let Some(status) = response_status(topic, "$dps/registrations/res/") else {
                    continue;
                };
                if topic_query_value(topic, "$rid") != Some(rid.to_string().as_str()) {
                    continue;
                }
                let what = if operation.is_none() {
                    "register"
                } else {
                    "poll"
                };
                let answer: Value = match serde_json::from_slice(&publish.payload) {
                    Ok(v) => v,
                    Err(_) => break Err(format!("{what}:bad_json")),
                };
                let retry = topic_query_value(topic, "retry-after");
                if status != 200 {
                    attempts += 1;
                    if attempts >= plan.max_attempts.max(1) {
                        break Err(format!("{what}:attempts_exhausted"));
                    }
                }
                match status {
                    200 => break final_state(&answer, what),
                    202 => {
                        // Python waits a fixed 2 s after the register's 202, retry-after after a poll's.
                        let wait = match &operation {
                            None => Duration::from_secs(2),
                            Some(_) => retry_after(retry, 2),
                        };
                        match answer["operationId"].as_str() {
                            Some(op) => operation = Some(op.to_string()),
                            None => break Err(format!("{what}:no_operation_id")),
                        }
                        rid += 1;
                        send(&client, rid, operation.as_deref(), wait);
                    }
                    429.. => {
                        rid += 1;
                        send(&client, rid, operation.as_deref(), retry_after(retry, 2));
                    }
                    status => break Err(format!("{what}:status_{status}")),
                }
            }
            _ => {}
        }
    };
    // Python disconnects once it has its answer.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_root_and_csrs_parse() {
        let (root, root_key) = root_ca("test root").expect("root");
        let key = ec_key().expect("key");
        let leaf = leaf_certificate(&root, &root_key, &key, "dev-1").expect("leaf");
        let root_public = root.public_key().expect("public key");
        assert!(leaf.verify(&root_public).expect("verify"));
        let (_, der) = csr("dev-1").expect("csr");
        let request =
            openssl::x509::X509Req::from_der(&B64.decode(der).expect("b64")).expect("parses");
        assert!(
            request
                .verify(&request.public_key().expect("key"))
                .expect("verify")
        );
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(retry_after(None, 2), Duration::from_secs(2));
        assert_eq!(retry_after(Some("0"), 2), Duration::from_secs(1));
        assert_eq!(retry_after(Some("999"), 2), Duration::from_secs(60));
        assert_eq!(retry_after(Some("x"), 1), Duration::from_secs(1));
    }

    #[test]
    fn final_states() {
        let ok = json!({"status": "assigned", "registrationState": {"assignedHub": "h"}});
        assert_eq!(final_state(&ok, "poll").expect("ok")["assignedHub"], "h");
        let failed = json!({"status": "failed"});
        assert_eq!(
            final_state(&failed, "poll").expect_err("failed"),
            "poll:status_failed"
        );
        assert!(issued_chain_pem(&json!({})).is_err());
    }
}
