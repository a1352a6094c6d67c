//! The typed settings tree.
//!
//! Loaded in this order, later sources overriding earlier ones: built-in defaults, the TOML
//! file given with `--config`, then environment variables `ZEROTOUCH__SECTION__KEY`
//! (for example `ZEROTOUCH__DATABASE__URL`). Unknown keys are an error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Default HTTPS port. 443 needs privileges (or `CAP_NET_BIND_SERVICE`); Azure service SDKs
/// reach another port through a connection string `HostName=host:8443`.
pub const DEFAULT_HTTPS_PORT: u16 = 8443;
/// Default MQTT-over-TLS port: the Azure device SDKs hard-code 8883.
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// AMQP 1.0 over TLS: the port the Azure service SDKs dial.
pub const DEFAULT_AMQP_PORT: u16 = 5671;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub listen: Listen,
    pub database: Database,
    pub service: Service,
    pub hub: Hub,
    pub dps: DpsSettings,
    pub telemetry: TelemetrySettings,
    pub mqtt: MqttSettings,
    pub log: Log,
    pub ca: CaSettings,
    pub cluster: ClusterSettings,
}

/// Replica mode (docs/deployment.md, "Replicas"): several processes share one PostgreSQL
/// database and reach each other through NATS, so any replica serves any device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// NATS servers (`nats://host:port`), a list or one string with commas; any set turns
    /// replica mode on. Empty (the default): a single process, no NATS.
    #[serde(deserialize_with = "one_or_many")]
    pub nats_url: Vec<String>,
    /// The first token of every subject this hub's replicas use; hubs sharing a NATS system
    /// need different prefixes.
    pub subject_prefix: String,
    /// This replica's name in logs, `/healthz` and metrics. Unset: `{host name}-{pid}`.
    pub replica: Option<String>,
    /// How many NATS servers keep a copy of each JetStream stream and bucket (1 to 5; 3 in a
    /// three-server cluster survives losing one).
    pub stream_replicas: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            nats_url: Vec::new(),
            subject_prefix: "zerotouch".into(),
            replica: None,
            stream_replicas: 1,
        }
    }
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.nats_url.is_empty()
    }
}

/// A list of strings, or one string of comma-separated items (as an environment variable
/// gives it).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(text) => text.split(',').map(String::from).collect(),
        OneOrMany::Many(items) => items,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The environment variable that may hold the CA key-encryption key (base64), instead of
/// `ca.kek_file`.
pub const CA_KEK_ENV: &str = "ZEROTOUCH_CA_KEK";

/// How the CA private keys are protected.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaSettings {
    /// A file holding the key-encryption key: 32 random bytes, base64 (`openssl rand -base64
    /// 32`). When a KEK is set (here or in `ZEROTOUCH_CA_KEK`), the CA keys in `ca/` are
    /// stored encrypted under it. Keep it outside the data dir.
    pub kek_file: Option<PathBuf>,
    /// Keep the intermediate CA key in a PKCS#11 token (an HSM; SoftHSM2 for testing) instead
    /// of `ca/intermediate.key`. Import it once with `zerotouch ca import-to-pkcs11`.
    pub pkcs11: Option<Pkcs11Settings>,
}

/// The environment variable that may hold the PKCS#11 user PIN, instead of `ca.pkcs11.pin_file`.
pub const CA_PKCS11_PIN_ENV: &str = "ZEROTOUCH_CA_PKCS11_PIN";

/// `[ca.pkcs11]`: where the intermediate key lives when it is in a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The PKCS#11 library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token that holds the key.
    pub token_label: String,
    /// The `CKA_LABEL` of the key in the token.
    #[serde(default = "default_pkcs11_key_label")]
    pub key_label: String,
    /// A file holding the user PIN (trailing whitespace ignored). Unset: the PIN comes from
    /// `ZEROTOUCH_CA_PKCS11_PIN`.
    pub pin_file: Option<PathBuf>,
}

fn default_pkcs11_key_label() -> String {
    "zerotouch-intermediate".into()
}

/// A PKCS#11 user PIN; `Debug` prints `[redacted]`.
#[derive(Clone)]
pub struct Pkcs11Pin(String);

impl Pkcs11Pin {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Pkcs11Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Pkcs11Settings {
    /// The user PIN, from `pin_file` or `ZEROTOUCH_CA_PKCS11_PIN` (exactly one of them).
    pub fn pin(&self) -> Result<Pkcs11Pin, ConfigError> {
        self.pin_from(std::env::var(CA_PKCS11_PIN_ENV).ok())
    }

    fn pin_from(&self, env: Option<String>) -> Result<Pkcs11Pin, ConfigError> {
        let env = env.filter(|v| !v.trim().is_empty());
        let pin = match (&self.pin_file, env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(format!(
                    "ca.pkcs11.pin_file and {CA_PKCS11_PIN_ENV} are both set: set one"
                )));
            }
            (Some(file), None) => std::fs::read_to_string(file)
                .map_err(|e| {
                    ConfigError::Invalid(format!("ca.pkcs11.pin_file {}: {e}", file.display()))
                })?
                .trim_end()
                .to_owned(),
            (None, Some(value)) => value.trim_end().to_owned(),
            (None, None) => {
                return Err(ConfigError::Invalid(format!(
                    "ca.pkcs11 needs a PIN: set ca.pkcs11.pin_file or {CA_PKCS11_PIN_ENV}"
                )));
            }
        };
        if pin.is_empty() {
            return Err(ConfigError::Invalid("the PKCS#11 PIN is empty".into()));
        }
        Ok(Pkcs11Pin(pin))
    }
}

/// Which parts of the service run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Provisioning and the hub (the default).
    #[default]
    All,
    /// The hub alone.
    Hub,
    /// Provisioning alone.
    Dps,
}

impl Role {
    pub fn runs_hub(self) -> bool {
        matches!(self, Role::All | Role::Hub)
    }

    pub fn runs_dps(self) -> bool {
        matches!(self, Role::All | Role::Dps)
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hub {
    /// The hub's `HostName` (in connection strings and device usernames). Unset: the first of
    /// `service.hostnames`. It must be one of `service.hostnames` so the TLS certificate covers it.
    pub hostname: Option<String>,
    /// The hub's region (Azure's `location`), used by `geoLatency` allocation.
    pub location: Option<String>,
    /// `allocationWeight` under `hashed` allocation, 1..=1000.
    pub allocation_weight: u32,
    /// `applyAllocationPolicy`: false keeps this hub out of policy-driven allocation (only a
    /// `static` enrollment naming it sends devices here).
    pub apply_allocation_policy: bool,
    /// A hub of its own (`--role hub`) joins the provisioning service at this URL
    /// (`https://host:port`). `serve --dps-url` overrides it.
    pub dps_url: Option<String>,
    /// The join token from `zerotouch hub join-token`, used once on first start.
    /// `serve --join-token` overrides it.
    pub join_token: Option<String>,
    /// Base URL the provisioning service calls this hub's service API at. Unset:
    /// `https://{hostname}:{public https port}`.
    pub service_url: Option<String>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            hostname: None,
            location: None,
            allocation_weight: 1,
            apply_allocation_policy: true,
            dps_url: None,
            join_token: None,
            service_url: None,
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("hostname", &self.hostname)
            .field("location", &self.location)
            .field("allocation_weight", &self.allocation_weight)
            .field("apply_allocation_policy", &self.apply_allocation_policy)
            .field("dps_url", &self.dps_url)
            .field("join_token", &self.join_token.as_ref().map(|_| "redacted"))
            .field("service_url", &self.service_url)
            .finish()
    }
}

/// The instance-wide allocation policy (dps-protocol §4.7): never `custom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DefaultAllocationPolicy {
    #[default]
    Hashed,
    GeoLatency,
    Static,
}

/// A source-address range and the region devices from it are in (`geoLatency`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRange {
    /// CIDR, IPv4 or IPv6, e.g. `10.1.0.0/16`.
    pub cidr: String,
    pub region: String,
}

/// Round-trip latency between two regions (`geoLatency`); symmetric unless both ways are given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionLatency {
    pub from: String,
    pub to: String,
    pub milliseconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpsSettings {
    /// Registrations handled at once; beyond it devices get 429 with `retry-after` and retry.
    pub max_concurrent_registrations: usize,
    /// Validity of device certificates issued from a registration's CSR, in days.
    pub certificate_validity_days: u32,
    /// How long an MQTT register waits for its assignment before answering `assigning` (the
    /// device then polls). 0 always answers `assigning`.
    pub fast_path_ms: u64,
    /// How long a TPM device may answer (and poll with) the key of a challenge, in seconds.
    pub tpm_challenge_seconds: u64,
    /// PEM bundle of TPM manufacturer roots. When set, TPM devices with an individual enrollment
    /// must also present an EK certificate chaining to one of them.
    pub tpm_manufacturer_roots: Option<PathBuf>,
    /// Policy for enrollments that name none: `hashed`, `geoLatency` or `static`.
    pub allocation_policy: DefaultAllocationPolicy,
    /// How often joined hubs send heartbeats, in seconds (told to each hub at join).
    pub hub_heartbeat_seconds: u64,
    /// A hub whose last heartbeat is older than this gets no new devices, in seconds.
    pub hub_heartbeat_timeout_seconds: u64,
    /// Bound on one custom-allocation webhook call, in milliseconds.
    pub webhook_timeout_ms: u64,
    /// PEM bundle of extra roots trusted for webhook URLs (on top of the system roots).
    pub webhook_ca_file: Option<PathBuf>,
    /// Accept `http://` webhook URLs. For development only.
    pub webhook_allow_http: bool,
    /// Which region a device is in, by source address (`geoLatency`).
    pub region_ranges: Vec<RegionRange>,
    /// Latencies between regions (`geoLatency`).
    pub region_latencies: Vec<RegionLatency>,
}

impl Default for DpsSettings {
    fn default() -> Self {
        DpsSettings {
            max_concurrent_registrations: 256,
            certificate_validity_days: 90,
            fast_path_ms: 1000,
            tpm_challenge_seconds: 300,
            tpm_manufacturer_roots: None,
            allocation_policy: DefaultAllocationPolicy::Hashed,
            hub_heartbeat_seconds: 10,
            hub_heartbeat_timeout_seconds: 30,
            webhook_timeout_ms: 10_000,
            webhook_ca_file: None,
            webhook_allow_http: false,
            region_ranges: Vec::new(),
            region_latencies: Vec::new(),
        }
    }
}

/// More MQTT worker threads than this is a typo, not a machine.
pub const MAX_MQTT_WORKERS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Threads that run MQTT connections; 0 (the default): one per core.
    pub workers: usize,
}

impl MqttSettings {
    /// The number of worker threads to start.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Telemetry older than this is deleted.
    pub retention_hours: u64,
    /// Beyond this many stored bytes, the oldest telemetry is deleted.
    pub max_bytes: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            retention_hours: 24 * 7,
            max_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Device and management HTTPS API.
    pub https: SocketAddr,
    /// Device MQTT over TLS.
    pub mqtt: SocketAddr,
    /// AMQP 1.0 over TLS (the service SDKs). Unset: `0.0.0.0:5671`, and a start goes on
    /// without AMQP (with a warning) when that address is taken; set, it must bind.
    pub amqp: Option<SocketAddr>,
}

impl Listen {
    /// The AMQP address in force, and whether it was configured.
    pub fn amqp(&self) -> (SocketAddr, bool) {
        match self.amqp {
            Some(addr) => (addr, true),
            None => (SocketAddr::from(([0, 0, 0, 0], DEFAULT_AMQP_PORT)), false),
        }
    }
}

#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// `sqlite://PATH` or `postgres://…`. Unset: `sqlite://{data_dir}/zerotouch.db`.
    pub url: Option<String>,
    /// A file holding the URL (for URLs with passwords, e.g. a mounted secret).
    pub url_file: Option<PathBuf>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .finish()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:redacted@host/db`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    /// Names clients use to reach this service. All become SANs of the server certificate;
    /// the first is the `HostName` of the connection strings.
    pub hostnames: Vec<String>,
    /// Where the database (SQLite), CA and TLS material live. `--data-dir` overrides it.
    pub data_dir: PathBuf,
    /// Port written into connection strings when clients reach the HTTPS listener through a
    /// different port than it binds (a proxy or port forward). Unset: the listener's port.
    pub public_https_port: Option<u16>,
    /// `all` (provisioning and hub), `hub` or `dps`. `zerotouch serve --role` overrides it.
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `zerotouch_service=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            https: SocketAddr::from(([0, 0, 0, 0], DEFAULT_HTTPS_PORT)),
            mqtt: SocketAddr::from(([0, 0, 0, 0], DEFAULT_MQTT_PORT)),
            amqp: None,
        }
    }
}

impl Default for Service {
    fn default() -> Self {
        Service {
            hostnames: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            data_dir: PathBuf::from("zerotouch-data"),
            public_https_port: None,
            role: Role::All,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, then `file` (if any), then `ZEROTOUCH__…` variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, Env::prefixed("ZEROTOUCH__").split("__"))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Env keys are lower-cased by figment; our keys are snake_case, so this round-trips.
        let settings: Settings = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Invalid(flatten_figment_error(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text alone (no environment), for tests.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Invalid(flatten_figment_error(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.service.hostnames.is_empty() {
            return Err(ConfigError::Invalid(
                "service.hostnames must name at least one host".into(),
            ));
        }
        for host in &self.service.hostnames {
            // The same rule the certificate issuer applies, so `config` and `serve` agree.
            zerotouch_certs::check_hostname(host)
                .map_err(|e| ConfigError::Invalid(format!("service.hostnames: {host:?}: {e}")))?;
        }
        if let Some(hub) = &self.hub.hostname
            && !self
                .service
                .hostnames
                .iter()
                .any(|h| h.eq_ignore_ascii_case(hub))
        {
            return Err(ConfigError::Invalid(format!(
                "hub.hostname {hub:?} must be one of service.hostnames, so the certificate covers it"
            )));
        }
        if self.dps.certificate_validity_days == 0 {
            return Err(ConfigError::Invalid(
                "dps.certificate_validity_days must be at least 1".into(),
            ));
        }
        if !(1..=1000).contains(&self.hub.allocation_weight) {
            return Err(ConfigError::Invalid(
                "hub.allocation_weight must be between 1 and 1000".into(),
            ));
        }
        if self.dps.hub_heartbeat_seconds == 0
            || self.dps.hub_heartbeat_timeout_seconds < self.dps.hub_heartbeat_seconds
        {
            return Err(ConfigError::Invalid(
                "dps.hub_heartbeat_seconds must be at least 1 and at most dps.hub_heartbeat_timeout_seconds".into(),
            ));
        }
        if let Some(url) = &self.hub.dps_url
            && !url.starts_with("https://")
        {
            return Err(ConfigError::Invalid(
                "hub.dps_url must be an https:// URL".into(),
            ));
        }
        self.latency_map()?;
        if self.mqtt.workers > MAX_MQTT_WORKERS {
            return Err(ConfigError::Invalid(format!(
                "mqtt.workers must be between 0 (one per core) and {MAX_MQTT_WORKERS}"
            )));
        }
        self.validate_cluster()?;
        if self.database.url.is_some() && self.database.url_file.is_some() {
            return Err(ConfigError::Invalid(
                "database.url and database.url_file are mutually exclusive".into(),
            ));
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("sqlite://")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "database.url must start with sqlite://, postgres:// or postgresql://".into(),
            ));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        if !cluster.enabled() {
            return Ok(());
        }
        for url in &cluster.nats_url {
            let ok = ["nats://", "tls://"].iter().any(|p| url.starts_with(p));
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "cluster.nats_url {url:?} must start with nats:// or tls://"
                )));
            }
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !cluster.subject_prefix.split('.').all(token_ok) {
            return Err(ConfigError::Invalid(
                "cluster.subject_prefix must be dot-separated tokens of letters, digits, - and _"
                    .into(),
            ));
        }
        if let Some(name) = &cluster.replica
            && !token_ok(name)
        {
            return Err(ConfigError::Invalid(
                "cluster.replica must be letters, digits, - and _".into(),
            ));
        }
        if !(1..=5).contains(&cluster.stream_replicas) {
            return Err(ConfigError::Invalid(
                "cluster.stream_replicas must be between 1 and 5".into(),
            ));
        }
        let postgres =
            self.database.url_file.is_some()
                || self.database.url.as_deref().is_some_and(|u| {
                    u.starts_with("postgres://") || u.starts_with("postgresql://")
                });
        if !postgres {
            return Err(ConfigError::Invalid(
                "replica mode (cluster.nats_url) needs a shared PostgreSQL database.url".into(),
            ));
        }
        Ok(())
    }

    /// The CA key-encryption key, from `ca.kek_file` or the `ZEROTOUCH_CA_KEK` environment
    /// variable (setting both is an error); `None` when neither is set. Errors name the source,
    /// never the key.
    pub fn ca_kek(&self) -> Result<Option<zerotouch_certs::sealed::Kek>, ConfigError> {
        self.ca_kek_from(std::env::var(CA_KEK_ENV).ok())
    }

    fn ca_kek_from(
        &self,
        env: Option<String>,
    ) -> Result<Option<zerotouch_certs::sealed::Kek>, ConfigError> {
        use zerotouch_certs::sealed::Kek;
        let env = env.filter(|v| !v.trim().is_empty());
        match (&self.ca.kek_file, env) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
                "ca.kek_file and {CA_KEK_ENV} are both set: set one"
            ))),
            (Some(file), None) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::Invalid(format!("ca.kek_file {}: {e}", file.display()))
                })?;
                Kek::from_base64(&text).map(Some).map_err(|e| {
                    ConfigError::Invalid(format!("ca.kek_file {}: {e}", file.display()))
                })
            }
            (None, Some(value)) => Kek::from_base64(&value)
                .map(Some)
                .map_err(|e| ConfigError::Invalid(format!("{CA_KEK_ENV}: {e}"))),
            (None, None) => Ok(None),
        }
    }

    /// The database URL in force: the configured one (or the file's), or SQLite in the data dir.
    pub fn database_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.database.url {
            return Ok(url.clone());
        }
        if let Some(file) = &self.database.url_file {
            return std::fs::read_to_string(file)
                .map(|text| text.trim().to_string())
                .map_err(|e| {
                    ConfigError::Invalid(format!("database.url_file {}: {e}", file.display()))
                });
        }
        Ok(format!(
            "sqlite://{}",
            self.service.data_dir.join("zerotouch.db").display()
        ))
    }

    /// The hub's `HostName`.
    pub fn hub_hostname(&self) -> String {
        self.hub
            .hostname
            .clone()
            .or_else(|| self.service.hostnames.first().cloned())
            .unwrap_or_else(|| "localhost".to_string())
    }

    /// `HostName` for hub connection strings: the hub's name, with the HTTPS port unless 443
    /// (service SDKs build `https://{HostName}`; device SDKs dial 8883 whatever it says).
    pub fn hub_public_host(&self) -> String {
        let host = self.hub_hostname();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let port = self
            .service
            .public_https_port
            .unwrap_or(self.listen.https.port());
        if port == 443 {
            host
        } else {
            format!("{host}:{port}")
        }
    }

    /// The settings with secrets masked, for `zerotouch config` and logs.
    pub fn redacted(&self) -> Settings {
        let mut copy = self.clone();
        copy.database.url = copy.database.url.as_deref().map(redact_url);
        if copy.hub.join_token.is_some() {
            copy.hub.join_token = Some("redacted".into());
        }
        copy
    }

    /// The `geoLatency` map from `dps.region_ranges` and `dps.region_latencies`.
    pub fn latency_map(&self) -> Result<zerotouch_policies::LatencyMap, ConfigError> {
        let mut map = zerotouch_policies::LatencyMap::new();
        for range in &self.dps.region_ranges {
            map.insert_range(&range.cidr, &range.region).map_err(|e| {
                ConfigError::Invalid(format!("dps.region_ranges: {:?}: {e}", range.cidr))
            })?;
        }
        for latency in &self.dps.region_latencies {
            map.insert_latency(&latency.from, &latency.to, latency.milliseconds);
        }
        Ok(map)
    }

    /// Base URL of this hub's service API as the provisioning service should call it.
    pub fn hub_service_url(&self) -> String {
        self.hub
            .service_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.hub_public_host()))
    }

    /// `host[:port]` as written in connection strings (`HostName=`).
    pub fn public_host(&self) -> String {
        let host = self
            .service
            .hostnames
            .first()
            .map(String::as_str)
            .unwrap_or("localhost");
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let port = self
            .service
            .public_https_port
            .unwrap_or(self.listen.https.port());
        if port == 443 {
            host
        } else {
            format!("{host}:{port}")
        }
    }
}

/// figment's error lists every failure; keep them, and keep the key path that names the field.
fn flatten_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let path = e.path.join(".");
            if path.is_empty() {
                e.kind.to_string()
            } else {
                format!("{path}: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's, not ours
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn shipped_example_parses() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/zerotouch.toml"),
        )
        .unwrap();
        let settings = Settings::from_toml(&text).unwrap();
        assert_eq!(settings.listen.mqtt.port(), 8883);
        assert!(!settings.service.hostnames.is_empty());
    }

    #[test]
    fn replica_mode_takes_nats_urls_as_a_list_or_a_string_and_needs_postgres() {
        let settings = Settings::from_toml(
            "[database]\nurl = \"postgres://db/zt\"\n[cluster]\nnats_url = \"nats://a:4222, nats://b:4222\"\n",
        )
        .unwrap();
        assert_eq!(
            settings.cluster.nats_url,
            ["nats://a:4222", "nats://b:4222"]
        );
        assert!(settings.cluster.enabled());
        let listed = Settings::from_toml(
            "[database]\nurl = \"postgres://db/zt\"\n[cluster]\nnats_url = [\"nats://a:4222\"]\n",
        )
        .unwrap();
        assert_eq!(listed.cluster.nats_url, ["nats://a:4222"]);
        assert!(!Settings::default().cluster.enabled());

        let cases = [
            ("[cluster]\nnats_url = \"nats://a:4222\"\n", "PostgreSQL"),
            (
                "[database]\nurl = \"postgres://db/zt\"\n[cluster]\nnats_url = \"http://a\"\n",
                "nats://",
            ),
            (
                "[database]\nurl = \"postgres://db/zt\"\n[cluster]\nnats_url = \"nats://a\"\nsubject_prefix = \"a.*\"\n",
                "subject_prefix",
            ),
            (
                "[database]\nurl = \"postgres://db/zt\"\n[cluster]\nnats_url = \"nats://a\"\nreplica = \"a.b\"\n",
                "cluster.replica",
            ),
        ];
        for (text, needle) in cases {
            let error = Settings::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn defaults_are_usable() {
        let settings = Settings::from_toml("").unwrap();
        assert_eq!(settings.listen.https.port(), DEFAULT_HTTPS_PORT);
        assert_eq!(settings.listen.mqtt.port(), DEFAULT_MQTT_PORT);
        assert_eq!(
            settings.service.hostnames,
            vec!["localhost", "127.0.0.1", "::1"]
        );
        assert_eq!(
            settings.database_url().unwrap(),
            "sqlite://zerotouch-data/zerotouch.db"
        );
        assert_eq!(settings.public_host(), "localhost:8443");
    }

    #[test]
    fn good_full_config() {
        let settings = Settings::from_toml(&fixture("good_full.toml")).unwrap();
        assert_eq!(settings.listen.https.to_string(), "127.0.0.1:9443");
        assert_eq!(
            settings.database.url.as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/zerotouch")
        );
        assert_eq!(settings.log.format, LogFormat::Json);
        assert_eq!(settings.public_host(), "dps.example.com");
        assert_eq!(settings.service.role, Role::Hub);
        assert_eq!(settings.hub_public_host(), "10.0.0.5");
        assert_eq!(settings.telemetry.retention_hours, 24);
        assert_eq!(settings.mqtt.worker_threads(), 3);
    }

    #[test]
    fn bad_unknown_key_is_named() {
        let err = Settings::from_toml(&fixture("bad_unknown_key.toml")).unwrap_err();
        assert!(err.to_string().contains("htps"), "{err}");
    }

    #[test]
    fn bad_address_is_rejected() {
        let err = Settings::from_toml(&fixture("bad_address.toml")).unwrap_err();
        assert!(err.to_string().contains("listen.https"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        let settings =
            Settings::from_toml("[database]\nurl = \"postgres://u:hunter2@db/zt\"\n").unwrap();
        let shown = format!("{:?} {:?}", settings.redacted(), settings);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("u:redacted@"), "{shown}");
    }

    #[test]
    fn url_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://u:p@db/zt\n").unwrap();
        let toml = format!("[database]\nurl_file = {:?}\n", file.display().to_string());
        let settings = Settings::from_toml(&toml).unwrap();
        assert_eq!(settings.database_url().unwrap(), "postgres://u:p@db/zt");
    }

    #[test]
    fn bad_hostname_is_rejected() {
        let err = Settings::from_toml("[service]\nhostnames = [\"bad_host\"]\n").unwrap_err();
        assert!(err.to_string().contains("service.hostnames"), "{err}");
    }

    #[test]
    fn mqtt_workers_default_to_the_cores_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(
            Settings::from_toml("").unwrap().mqtt.worker_threads(),
            cores
        );
        let err = Settings::from_toml("[mqtt]\nworkers = 100000\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.workers"), "{err}");
    }

    #[test]
    fn bad_database_scheme_is_rejected() {
        let err = Settings::from_toml(&fixture("bad_database_url.toml")).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("z.toml", "[database]\nurl = \"sqlite://a.db\"\n")?;
            jail.set_env(
                "ZEROTOUCH__DATABASE__URL",
                "postgres://postgres@127.0.0.1/x",
            );
            jail.set_env("ZEROTOUCH__LISTEN__MQTT", "127.0.0.1:18883");
            let settings = Settings::load_from(
                Some(Path::new("z.toml")),
                Env::prefixed("ZEROTOUCH__").split("__"),
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(
                settings.database_url().map_err(|e| e.to_string())?,
                "postgres://postgres@127.0.0.1/x"
            );
            assert_eq!(settings.listen.mqtt.port(), 18883);
            Ok(())
        });
    }

    #[test]
    fn ca_pkcs11_settings_parse_and_the_pin_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "1234\n").unwrap();
        let text = format!(
            "[ca.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"zt\"\npin_file = {:?}\n",
            pin_file.display().to_string()
        );
        let parsed = Settings::from_toml(&text).unwrap();
        let p11 = parsed.ca.pkcs11.clone().unwrap();
        assert_eq!(p11.key_label, "zerotouch-intermediate");
        assert_eq!(p11.token_label, "zt");
        let pin = p11.pin_from(None).unwrap();
        assert_eq!(pin.expose(), "1234");
        assert_eq!(format!("{pin:?}"), "[redacted]");
        assert!(p11.pin_from(Some("9".into())).is_err(), "both set");
        let mut from_env = p11.clone();
        from_env.pin_file = None;
        assert_eq!(from_env.pin_from(Some("9".into())).unwrap().expose(), "9");
        let err = from_env.pin_from(None).unwrap_err().to_string();
        assert!(err.contains(CA_PKCS11_PIN_ENV), "{err}");
        assert!(
            Settings::from_toml(
                "[ca.pkcs11]\nmodule = \"/x.so\"\ntoken_label = \"zt\"\nslot = 1\n"
            )
            .is_err()
        );
    }

    #[test]
    fn ca_kek_comes_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let kek = zerotouch_certs::sealed::Kek::generate().unwrap();
        let file = dir.path().join("kek");
        std::fs::write(&file, format!("{}\n", kek.to_base64())).unwrap();
        let mut settings = Settings::default();
        assert!(settings.ca_kek_from(None).unwrap().is_none());
        let from_env = settings.ca_kek_from(Some(kek.to_base64())).unwrap();
        assert_eq!(from_env.map(|k| k.id()), Some(kek.id()));
        let err = settings
            .ca_kek_from(Some("c2hvcnQ=".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(CA_KEK_ENV) && err.contains("32 bytes"),
            "{err}"
        );

        settings.ca.kek_file = Some(file.clone());
        let from_file = settings.ca_kek_from(None).unwrap();
        assert_eq!(from_file.map(|k| k.id()), Some(kek.id()));
        let err = settings
            .ca_kek_from(Some(kek.to_base64()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both"), "{err}");
        std::fs::write(&file, "not base64!").unwrap();
        let err = settings.ca_kek_from(None).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        settings.ca.kek_file = Some(dir.path().join("missing"));
        assert!(settings.ca_kek_from(None).is_err());

        let parsed = Settings::from_toml("[ca]\nkek_file = \"/etc/zerotouch/kek\"\n").unwrap();
        assert_eq!(
            parsed.ca.kek_file,
            Some(PathBuf::from("/etc/zerotouch/kek"))
        );
    }

    #[test]
    fn unknown_environment_key_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ZEROTOUCH__DATABASE__URLL", "x");
            let err = Settings::load_from(None, Env::prefixed("ZEROTOUCH__").split("__"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("urll"), "{err}");
            Ok(())
        });
    }
}
