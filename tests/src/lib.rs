//! Integration test harness: a real Zerotouch server on ephemeral ports, on SQLite or on a
//! PostgreSQL database created for the run and dropped after it, plus an HTTPS client that
//! trusts the server's CA and signs requests the way the Azure SDKs do.

use std::path::PathBuf;

use anyhow::Context;
use diesel::{Connection, PgConnection, RunQueryDsl};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::Value;
use tempfile::TempDir;
use zerotouch_attestation::symmetric_key;
use zerotouch_service::config::Settings;
use zerotouch_service::server::Running;

pub mod cluster;
/// A tmpfs that tests fill up, for the storage fault tests.
pub mod disk;
pub mod load;
/// A blocking MQTT device (hub and DPS topics) for tests.
pub mod mqtt;
/// Private NATS servers and clusters for the replica tests.
pub mod nats;
/// swtpm + tpm2-tools for the TPM tests, and the device script `tpm/device.sh`.
pub mod swtpm;

pub const API_VERSION: &str = "2021-10-01";
/// The `api-version` the C SDK (current master) and iot-identity-service send to the device API.
pub const DEVICE_API_VERSION: &str = "2021-06-01";
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL unless `ZEROTOUCH_TEST_SKIP_PG=1` (then it is skipped loudly).
pub fn backends() -> Vec<Backend> {
    if std::env::var("ZEROTOUCH_TEST_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("PostgreSQL backend skipped: ZEROTOUCH_TEST_SKIP_PG=1");
        vec![Backend::Sqlite]
    } else {
        vec![Backend::Sqlite, Backend::Postgres]
    }
}

/// Runs `test` against a fresh server on each backend of [`backends`].
pub fn each_backend(test: impl Fn(&TestServer)) {
    for backend in backends() {
        let server = TestServer::start(backend);
        eprintln!("--- {backend:?}");
        test(&server);
    }
}

/// The `errorCode` of an Azure error body.
pub fn error_code(body: &Value) -> u64 {
    body["errorCode"]
        .as_u64()
        .unwrap_or_else(|| panic!("no errorCode in {body}"))
}

/// A PostgreSQL database that exists for one test server and is dropped with it.
pub struct TempPostgres {
    admin_url: String,
    name: String,
    pub url: String,
}

/// The URL tests create their PostgreSQL databases through (`ZEROTOUCH_TEST_PG_URL`).
pub fn postgres_admin_url() -> String {
    std::env::var("ZEROTOUCH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

impl TempPostgres {
    pub fn create() -> anyhow::Result<TempPostgres> {
        let admin_url = postgres_admin_url();
        let mut conn = PgConnection::establish(&admin_url)
            .with_context(|| format!("PostgreSQL at {admin_url} is unreachable"))?;
        let name = format!("zt_it_{}", hex::encode(rand::random::<[u8; 6]>()));
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn)?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin_url.clone());
        Ok(TempPostgres {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn);
        }
    }
}

/// A running server with its data dir (and database) owned by the test.
pub struct TestServer {
    pub backend: Backend,
    pub settings: Settings,
    running: Option<Running>,
    pub client: Client,
    owner_key: String,
    hub_key: String,
    pub id_scope: String,
    // Dropped last: the server must stop before its data dir and database go.
    _pg: Option<TempPostgres>,
    _dir: TempDir,
}

impl TestServer {
    pub fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {})
    }

    /// Starts with settings adjusted by `adjust` (e.g. a role).
    pub fn start_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TempPostgres::create().expect(
                "PostgreSQL is needed for these tests (set ZEROTOUCH_TEST_SKIP_PG=1 to skip)",
            )),
        };
        let mut settings = Settings::default();
        settings.service.data_dir = dir.path().join("data");
        settings.listen.https = "127.0.0.1:0".parse().expect("addr");
        settings.listen.mqtt = "127.0.0.1:0".parse().expect("addr");
        settings.listen.amqp = Some("127.0.0.1:0".parse().expect("addr"));
        settings.database.url = pg.as_ref().map(|p| p.url.clone());
        adjust(&mut settings);
        let mut server = TestServer {
            backend,
            settings,
            running: None,
            client: Client::new(),
            owner_key: String::new(),
            hub_key: String::new(),
            id_scope: String::new(),
            _pg: pg,
            _dir: dir,
        };
        server.boot();
        server
    }

    fn boot(&mut self) {
        let running = Running::spawn(self.settings.clone()).expect("server starts");
        self.id_scope = running.bound.instance.id_scope.clone();
        self.client = client_trusting(&running.bound.instance.paths.ca_bundle, None);
        self.running = Some(running);
        let credentials = zerotouch_service::cli::credentials(&self.settings).expect("credentials");
        let cs = credentials["dpsConnectionString"].as_str().expect("cs");
        self.owner_key = zerotouch_service::bootstrap::parse_connection_string(cs)
            .expect("parse")
            .2;
        // Without a hub (role dps) any key will do: hub routes must answer 404 regardless.
        self.hub_key = match credentials["hubConnectionString"].as_str() {
            Some(hub_cs) => {
                zerotouch_service::bootstrap::parse_connection_string(hub_cs)
                    .expect("parse")
                    .2
            }
            None => symmetric_key::generate_key().expect("key"),
        };
    }

    /// Stops the server (and releases its data dir); [`TestServer::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }

    /// Stops the server and starts it again on the same data dir and database.
    pub fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
        self.boot();
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("server is running")
    }

    pub fn https_port(&self) -> u16 {
        self.running().bound.https.port()
    }

    pub fn mqtt_port(&self) -> u16 {
        self.running().bound.mqtt.port()
    }

    pub fn ca_bundle(&self) -> PathBuf {
        self.running().bound.instance.paths.ca_bundle.clone()
    }

    /// The host as written in connection strings and SAS audiences.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.https_port())
    }

    pub fn owner_connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
            self.host(),
            self.owner_key
        )
    }

    /// The hub's `iothubowner` connection string.
    pub fn hub_connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            self.host(),
            self.hub_key
        )
    }

    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "https://localhost:{}{path}{sep}api-version={API_VERSION}",
            self.https_port()
        )
    }

    /// A SAS token for a policy, valid for `ttl` seconds (negative: already expired).
    pub fn sas(&self, policy: &str, key: &str, ttl: i64) -> String {
        let now = zerotouch_service::time::now_unix() as i64;
        symmetric_key::sign(&self.host(), key, (now + ttl).max(1) as u64, Some(policy))
            .expect("sign")
    }

    pub fn owner_sas(&self) -> String {
        self.sas("provisioningserviceowner", &self.owner_key, 3600)
    }

    /// A request to the hub's service API signed with `iothubowner`.
    pub fn hub_request(&self, method: Method, path: &str) -> RequestBuilder {
        let now = zerotouch_service::time::now_unix();
        let token =
            symmetric_key::sign(&self.host(), &self.hub_key, now + 3600, Some("iothubowner"))
                .expect("sign");
        self.client
            .request(method, self.url(path))
            .header("Authorization", token)
    }

    /// A request signed with the owner policy.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("Authorization", self.owner_sas())
    }

    /// The URL of a DPS device API path (`/{idScope}/registrations/…`) with the given
    /// `api-version` (none: the parameter is left out).
    pub fn device_url(&self, path: &str, api_version: Option<&str>) -> String {
        let base = format!("https://localhost:{}{path}", self.https_port());
        match api_version {
            Some(v) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{base}{sep}api-version={v}")
            }
            None => base,
        }
    }

    /// `PUT …/register` with `body` through `client`, then polls the operation until it is
    /// `assigned`; returns the registrationState.
    pub fn register_and_poll(
        &self,
        client: &Client,
        id: &str,
        sas: Option<&str>,
        body: &Value,
    ) -> Value {
        let path = format!("/{}/registrations/{id}/register", self.id_scope);
        let (status, accepted, _) = send(
            self.dps_request(client, Method::PUT, &path, sas)
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        );
        assert_eq!(status, 202, "{accepted}");
        let operation = accepted["operationId"]
            .as_str()
            .expect("operationId")
            .to_string();
        for _ in 0..50 {
            let (status, polled, _) = send(self.dps_request(
                client,
                Method::GET,
                &format!(
                    "/{}/registrations/{id}/operations/{operation}",
                    self.id_scope
                ),
                sas,
            ));
            assert_eq!(status, 200, "{polled}");
            if polled["status"] == "assigned" {
                return polled["registrationState"].clone();
            }
            assert_eq!(polled["status"], "assigning", "{polled}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{id} was never assigned");
    }

    /// A DPS device API request (`api-version` as the C SDK sends it) carrying `sas` as its
    /// `Authorization` header, through `client` (the server's, or one with a client identity).
    pub fn dps_request(
        &self,
        client: &Client,
        method: Method,
        path: &str,
        sas: Option<&str>,
    ) -> RequestBuilder {
        let request = client.request(method, self.device_url(path, Some(DEVICE_API_VERSION)));
        match sas {
            Some(token) => request.header("Authorization", token),
            None => request,
        }
    }

    /// Creates an individual symmetric-key enrollment; returns its primary key.
    pub fn enroll_symmetric(&self, registration_id: &str) -> String {
        let (status, created, _) = send(
            self.request(Method::PUT, &format!("/enrollments/{registration_id}"))
                .json(&serde_json::json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!(status, 200, "{created}");
        created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("primary key")
            .to_string()
    }

    /// A device SAS token as the Python SDK builds it (upper-case `%2F`, no `skn`).
    pub fn device_sas(&self, registration_id: &str, key: &str, ttl: i64) -> String {
        let now = zerotouch_service::time::now_unix() as i64;
        symmetric_key::sign(
            &symmetric_key::registration_resource(&self.id_scope, registration_id),
            key,
            (now + ttl).max(1) as u64,
            None,
        )
        .expect("sign")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

/// An HTTPS client that trusts `ca_bundle`, optionally presenting a client identity (PEM cert
/// chain, PKCS#8 PEM key).
pub fn client_trusting(ca_bundle: &std::path::Path, identity: Option<(&str, &str)>) -> Client {
    let pem = std::fs::read(ca_bundle).expect("CA bundle");
    let mut builder = Client::builder().timeout(std::time::Duration::from_secs(30));
    for certificate in reqwest::Certificate::from_pem_bundle(&pem).expect("bundle parses") {
        builder = builder.add_root_certificate(certificate);
    }
    if let Some((chain, key)) = identity {
        builder = builder.identity(
            reqwest::Identity::from_pkcs8_pem(chain.as_bytes(), key.as_bytes()).expect("identity"),
        );
    }
    builder.build().expect("client")
}

/// The C SDK's URL encoder (`URL_Encode`): alphanumerics and `! ( ) * - . _` stay, everything
/// else becomes `%xx` with **lower-case** hex.
pub fn c_sdk_url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"!()*-._".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

/// A device SAS token as the C SDK builds it: `sr` with lower-case hex (`%2f`), the signature
/// over that exact text, `skn=registration`. `key` is the device key (standard base64).
pub fn c_sdk_device_sas(id_scope: &str, registration_id: &str, key: &str, expiry: u64) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sr = c_sdk_url_encode(&format!("{id_scope}/registrations/{registration_id}"));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(key).expect("key"));
    let tag = ring::hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes());
    let sig = c_sdk_url_encode(&b64.encode(tag.as_ref()));
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn=registration")
}

/// Sends and returns (status, JSON body or Null, headers).
pub fn send(request: RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = request.send().expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body, headers)
}

/// Test PKI, generated per test with rcgen; nothing is ever written to the repository.
pub mod pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    pub struct TestCa {
        pub cert_pem: String,
        pub key: KeyPair,
        params: CertificateParams,
    }

    impl TestCa {
        pub fn new(name: &str) -> TestCa {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).expect("self-signed");
            TestCa {
                cert_pem: cert.pem(),
                key,
                params,
            }
        }

        /// A certificate with subject CN `cn` signed by this CA: a device leaf or a
        /// proof-of-possession certificate.
        pub fn issue(&self, cn: &str) -> (String, String) {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).expect("signed");
            (cert.pem(), key.serialize_pem())
        }
    }

    impl TestCa {
        /// An intermediate CA (basicConstraints CA:TRUE, keyCertSign) signed by this CA.
        pub fn intermediate(&self, name: &str) -> TestCa {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).expect("signed");
            TestCa {
                cert_pem: cert.pem(),
                key,
                params,
            }
        }

        /// Like [`TestCa::issue`] with the given extended key usages (empty: no EKU extension).
        pub fn issue_with_eku(
            &self,
            cn: &str,
            ekus: Vec<ExtendedKeyUsagePurpose>,
        ) -> (String, String) {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = ekus;
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).expect("signed");
            (cert.pem(), key.serialize_pem())
        }
    }

    /// A PKCS#10 certificate signing request (DER) with subject CN `cn`, and its key.
    pub fn csr(cn: &str) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let request = params.serialize_request(&key).expect("csr");
        (request.der().to_vec(), key)
    }

    /// PEM of one DER certificate.
    pub fn pem_of_der(der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    /// A self-signed leaf that expired yesterday.
    pub fn expired_self_signed(cn: &str) -> String {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
        params.self_signed(&key).expect("self-signed").pem()
    }

    /// A self-signed leaf, as devices with individual X.509 enrollments often use.
    pub fn self_signed(cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }
}
