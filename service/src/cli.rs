//! The `zerotouch` command line.
//!
//! `serve`, `credentials` and `token` act on the local data dir and database. The other verbs
//! (`enrollment`, `group`, `registration`, `ca`, `policy`) are clients of the management API,
//! in the spirit of `az iot dps …`: they sign each request with a SAS token from
//! `--connection-string` (or, without one, the owner policy of the local data dir) and print the
//! JSON the API answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;

use crate::auth::{self, Rights};
use crate::bootstrap;
use crate::config::Settings;
use crate::db;

/// Characters a path segment keeps as they are (RFC 3986 unreserved); the rest are escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// API version the CLI sends.
const API_VERSION: &str = "2021-10-01";

#[derive(Debug, Parser)]
#[command(
    name = "zerotouch",
    version,
    about = "Zero-touch device provisioning and PKI"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Local {
    /// TOML configuration file.
    #[arg(long, global = true, env = "ZEROTOUCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data dir (database, CA, TLS material). Default: ./zerotouch-data
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

impl Local {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut settings = Settings::load(self.config.as_deref())?;
        if let Some(dir) = &self.data_dir {
            settings.service.data_dir = dir.clone();
        }
        Ok(settings)
    }
}

#[derive(Debug, Args, Clone)]
pub struct Remote {
    #[command(flatten)]
    pub local: Local,
    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`. Default: the local owner policy.
    #[arg(long, env = "ZEROTOUCH_CONNECTION_STRING", global = true)]
    pub connection_string: Option<String>,
    /// PEM bundle to trust for the server. Default: the data dir's CA bundle.
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub local: Local,
    /// What to run: all (provisioning and hub), hub or dps. Overrides service.role.
    #[arg(long, value_enum)]
    pub role: Option<crate::config::Role>,
    /// With `--role hub`: join the provisioning service at this URL. Overrides hub.dps_url.
    #[arg(long)]
    pub dps_url: Option<String>,
    /// With `--dps-url`: the join token (`zerotouch hub join-token`), needed on first start
    /// only. Overrides hub.join_token.
    #[arg(long, env = "ZEROTOUCH_JOIN_TOKEN")]
    pub join_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (HTTPS and MQTT listeners).
    Serve(ServeArgs),
    /// Print the ID scope, connection strings and CA bundle path.
    Credentials {
        #[command(flatten)]
        local: Local,
        /// Print JSON (the only format today; kept for scripts that pass it).
        #[arg(long)]
        json: bool,
    },
    /// Bearer tokens for the management API.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check a configuration file and print the settings in force.
    Config(Local),
    /// Individual enrollments.
    Enrollment {
        #[command(subcommand)]
        command: EnrollmentCommand,
    },
    /// Enrollment groups.
    Group {
        #[command(subcommand)]
        command: EnrollmentCommand,
    },
    /// Device registration states.
    Registration {
        #[command(subcommand)]
        command: RegistrationCommand,
    },
    /// CA certificates and proof of possession.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Authorization policies (SAS keys and rights).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Hubs linked to this provisioning service: join tokens, list, drain, remove.
    Hub {
        #[command(subcommand)]
        command: HubCommand,
    },
    /// Certificates this service issued: list, revoke.
    Cert {
        #[command(subcommand)]
        command: crate::pki::cli::CertCommand,
    },
    /// The PKI audit trail (issue, renew, revoke).
    Audit {
        #[command(subcommand)]
        command: crate::pki::cli::AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Mint a single-use token a hub joins with (`serve --role hub --join-token …`). Needs the
    /// provisioning service's data dir (or database) and prints the token.
    JoinToken {
        #[command(flatten)]
        local: Local,
        /// Lifetime: seconds, or with a unit (30m, 1h, 7d). At most 7 days.
        #[arg(long, default_value = "15m")]
        ttl: String,
    },
    /// List linked hubs with their health.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one linked hub.
    Show {
        #[command(flatten)]
        remote: Remote,
        /// Host name of the hub, as `hub list` shows it.
        name: String,
    },
    /// Stop sending new devices to a hub (its devices stay).
    Drain {
        #[command(flatten)]
        remote: Remote,
        /// Host name of the hub, as `hub list` shows it.
        name: String,
    },
    /// Send new devices to a drained hub again.
    Activate {
        #[command(flatten)]
        remote: Remote,
        /// Host name of the hub, as `hub list` shows it.
        name: String,
    },
    /// Unlink a hub. Its devices are not moved; they move when they re-register.
    Remove {
        #[command(flatten)]
        remote: Remote,
        /// Host name of the hub, as `hub list` shows it.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a JWT carrying rights, e.g. `--rights EnrollmentRead,RegistrationStatusRead --ttl 1h`.
    Create {
        #[command(flatten)]
        local: Local,
        /// Comma-separated rights the token carries (see `zerotouch policy add --rights`).
        #[arg(long)]
        rights: String,
        /// Lifetime: seconds, or with a unit (30m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Who the token is for (goes into `sub` and the logs).
        #[arg(long, default_value = "cli")]
        subject: String,
    },
    /// Replace the token signing secret: every token minted so far stops working (running
    /// servers read the secret on each request).
    RotateSecret(Local),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AttestationKind {
    SymmetricKey,
    X509,
    Tpm,
}

#[derive(Debug, Args, Clone, Default)]
pub struct EnrollmentFields {
    /// Attestation mechanism. On update, switching the type replaces the credentials.
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationKind>,
    /// Symmetric keys (base64); generated when omitted.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64); generated when omitted.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// X.509: the device certificate (individual) or signing CA certificate (group), PEM file.
    #[arg(long)]
    pub certificate: Option<PathBuf>,
    /// X.509: the secondary device or signing CA certificate, PEM file.
    #[arg(long)]
    pub secondary_certificate: Option<PathBuf>,
    /// X.509 group: name of an uploaded CA certificate (devices are admitted once it is verified).
    #[arg(long)]
    pub ca_reference: Option<String>,
    /// TPM: endorsement key, base64 TPM2B_PUBLIC.
    #[arg(long)]
    pub endorsement_key: Option<String>,
    /// TPM: storage root key, base64 TPM2B_PUBLIC (optional).
    #[arg(long)]
    pub storage_root_key: Option<String>,
    /// Device id on the hub (individual only).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Provisioning status: a disabled enrollment refuses its devices.
    #[arg(long, value_parser = ["enabled", "disabled"])]
    pub status: Option<String>,
    /// Hubs this enrollment may be assigned to, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub iot_hubs: Option<Vec<String>>,
    /// How a hub is chosen among --iot-hubs (default: the service's dps.allocation_policy).
    #[arg(long, value_parser = ["hashed", "geoLatency", "static", "custom"])]
    pub allocation_policy: Option<String>,
    /// Initial twin tags, JSON object.
    #[arg(long)]
    pub tags: Option<String>,
    /// Initial twin desired properties, JSON object.
    #[arg(long)]
    pub desired: Option<String>,
    /// Mark devices as IoT Edge devices.
    #[arg(long)]
    pub edge: Option<bool>,
    /// Start from a full JSON body (file, or - for stdin); flags then override its fields.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    /// Create (fails if it exists).
    Create {
        #[command(flatten)]
        remote: Remote,
        /// Registration id (individual) or enrollment group id (group).
        id: String,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Show one, without secrets.
    Show {
        #[command(flatten)]
        remote: Remote,
        /// Registration id (individual) or enrollment group id (group).
        id: String,
        /// Include keys and certificates.
        #[arg(long)]
        show_keys: bool,
    },
    /// List all (pages through the query API).
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Change fields; read-modify-write guarded by the etag.
    Update {
        #[command(flatten)]
        remote: Remote,
        /// Registration id (individual) or enrollment group id (group).
        id: String,
        /// Only update if the stored etag is this one.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Delete one (its registrations and hub devices stay).
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// Registration id (individual) or enrollment group id (group).
        id: String,
        /// Only delete if the stored etag is this one.
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistrationCommand {
    /// Show the registration state of one device.
    Show {
        #[command(flatten)]
        remote: Remote,
        /// Registration id of the device.
        id: String,
    },
    /// Registrations of an enrollment group.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Enrollment group id.
        #[arg(long)]
        group: String,
    },
    /// Delete the registration state of one device.
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// Registration id of the device.
        id: String,
        /// Only delete if the stored etag is this one.
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Upload a CA certificate (PEM file). Fails if the name exists, unless --etag is given.
    Upload {
        #[command(flatten)]
        remote: Remote,
        /// Name of the CA certificate (enrollment groups refer to it by this name).
        name: String,
        /// The CA certificate, PEM file.
        #[arg(long)]
        certificate: PathBuf,
        /// Trust it without proof of possession.
        #[arg(long)]
        verified: bool,
        /// Replace the existing entry of this name if its etag is this one (`*`: whatever it
        /// is). Without it, an existing name is refused (409201).
        #[arg(long)]
        etag: Option<String>,
    },
    /// List the uploaded CA certificates.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one uploaded CA certificate.
    Show {
        #[command(flatten)]
        remote: Remote,
        /// Name of the CA certificate.
        name: String,
    },
    /// Get a code to put in the CN of a certificate signed by the CA's key.
    VerificationCode {
        #[command(flatten)]
        remote: Remote,
        /// Name of the CA certificate.
        name: String,
    },
    /// Prove possession with that certificate (PEM file).
    Verify {
        #[command(flatten)]
        remote: Remote,
        /// Name of the CA certificate.
        name: String,
        /// The verification certificate (CN = the verification code, signed by the CA's key),
        /// PEM file.
        #[arg(long)]
        certificate: PathBuf,
    },
    /// Delete an uploaded CA certificate (refused while an enrollment group refers to it).
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// Name of the CA certificate.
        name: String,
    },
    /// Sign a new issuing intermediate with the root key (local: needs ca/root.key). The
    /// current one stays in the trust bundle until `retire-intermediate`. Restart every
    /// replica afterwards.
    RotateIntermediate {
        #[command(flatten)]
        local: Local,
    },
    /// After the overlap: take the previous intermediates out of the trust bundle and revoke
    /// the certificates they issued (local). Restart every replica afterwards.
    RetireIntermediate {
        #[command(flatten)]
        local: Local,
    },
    /// Move the intermediate key (ca/intermediate.key) into the PKCS#11 token of
    /// `ca.pkcs11` as a non-extractable key, then delete the file (local). Restart every
    /// replica afterwards, with `ca.pkcs11` set.
    #[command(name = "import-to-pkcs11")]
    ImportToPkcs11 {
        #[command(flatten)]
        local: Local,
        /// Move the key file here instead of deleting it (e.g. to offline storage).
        #[arg(long)]
        move_key_to: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List the authorization policies, with their keys.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Add a policy, or change its rights (keys are kept).
    Add {
        #[command(flatten)]
        remote: Remote,
        /// Name of the policy (`SharedAccessKeyName`).
        name: String,
        /// e.g. EnrollmentRead,RegistrationStatusRead
        #[arg(long)]
        rights: String,
    },
    /// Replace the primary or secondary key.
    Rotate {
        #[command(flatten)]
        remote: Remote,
        /// Name of the policy.
        name: String,
        /// Which key to replace.
        #[arg(long, value_parser = ["primary", "secondary"], default_value = "secondary")]
        key: String,
    },
    /// Delete a policy (refused for the last one that can manage policies).
    Remove {
        #[command(flatten)]
        remote: Remote,
        /// Name of the policy.
        name: String,
    },
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 30m, 1h or 7d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    if seconds == 0 {
        bail!("a duration must be positive");
    }
    Ok(Duration::from_secs(seconds))
}

/// The service's command line as a program: parse, run, report a failure on stderr. The
/// `zerotouch` binary (package `zerotouch`) adds `simulate`; the tests' `zerotouch-node` is
/// this.
pub fn main() -> std::process::ExitCode {
    exit(run(Cli::parse()))
}

/// Reports a failed command on stderr (`zerotouch: …`) and turns the outcome into the exit
/// status: the one place an error becomes an exit code.
pub fn exit(outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zerotouch: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command; `serve` blocks until the service stops.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let mut settings = args.local.settings()?;
            if let Some(role) = args.role {
                settings.service.role = role;
            }
            if let Some(url) = args.dps_url {
                settings.hub.dps_url = Some(url);
            }
            if let Some(token) = args.join_token {
                settings.hub.join_token = Some(token);
            }
            settings.validate()?;
            // Held until the server stops, so the last lines are flushed.
            let _log = crate::logging::init(&settings.log);
            crate::server::serve(settings)
        }
        Command::Credentials { local, json: _ } => {
            let settings = local.settings()?;
            print_json(&credentials(&settings)?)
        }
        Command::Config(local) => {
            let settings = local.settings()?;
            print_json(&serde_json::to_value(settings.redacted())?)
        }
        Command::Token { command } => token(command),
        Command::Enrollment { command } => enrollment(crate::enrollment::Kind::Individual, command),
        Command::Group { command } => enrollment(crate::enrollment::Kind::Group, command),
        Command::Registration { command } => registration(command),
        Command::Ca { command } => ca(command),
        Command::Policy { command } => policy(command),
        Command::Hub { command } => hub(command),
        Command::Cert { command } => crate::pki::cli::cert(command),
        Command::Audit { command } => crate::pki::cli::audit(command),
    }
}

/// The verbs and flags of a command tree without help text, as `zerotouch …` paths. The CLI's
/// tests require there be none (docs/cli.md: every verb and flag has help).
pub fn undocumented(command: &clap::Command) -> Vec<String> {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for sub in command.get_subcommands() {
            let path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() {
                missing.push(format!("verb `{path}`"));
            }
            for arg in sub.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{path}` argument `{}`", arg.get_id()));
                }
            }
            walk(sub, &path, missing);
        }
    }
    let mut missing = Vec::new();
    walk(command, command.get_name(), &mut missing);
    missing
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The local instance, as `serve` created it; creates nothing (see `bootstrap::open_existing`).
fn open_local(settings: &Settings) -> anyhow::Result<(db::Database, bootstrap::Instance)> {
    bootstrap::open_existing(settings)
}

/// The operator contract of `zerotouch credentials --json`.
pub fn credentials(settings: &Settings) -> anyhow::Result<Value> {
    let (store, instance) = open_local(settings)?;
    let owner = bootstrap::owner_policy(&store)?;
    let hub_owner = bootstrap::hub_owner_policy(&store)?;
    // A joined hub presents a certificate from its provisioning service's CA: clients trust
    // the bundle that service handed over, not this data dir's own CA.
    // Whatever the configured role: `serve --role hub` may have overridden it.
    let join = crate::hub::join::JoinPaths::new(&settings.service.data_dir);
    let bundle_path = if join.state.exists() {
        join.trust_bundle
    } else {
        instance.paths.ca_bundle.clone()
    };
    let ca_bundle = std::fs::canonicalize(&bundle_path).unwrap_or(bundle_path);
    let mut out = json!({
        "idScope": instance.id_scope,
        "dpsConnectionString": bootstrap::connection_string(&settings.public_host(), &owner),
        "caBundlePath": ca_bundle,
        "httpsEndpoint": format!("https://{}", settings.public_host()),
        "mqttPort": settings.listen.mqtt.port(),
    });
    if settings.service.role.runs_hub() {
        out["hubConnectionString"] = json!(bootstrap::connection_string(
            &settings.hub_public_host(),
            &hub_owner
        ));
        out["hubHostName"] = json!(settings.hub_hostname());
        // Every hub policy (iothubowner, service, device, registryRead, registryReadWrite).
        let mut policies = serde_json::Map::new();
        for (name, _) in crate::hub::auth::DEFAULT_POLICIES {
            if let Some(policy) = crate::hub::auth::policy(&store, name)? {
                policies.insert(
                    name.to_string(),
                    json!(bootstrap::connection_string(
                        &settings.hub_public_host(),
                        &policy
                    )),
                );
            }
        }
        out["hubPolicies"] = serde_json::Value::Object(policies);
    }
    Ok(out)
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            local,
            rights,
            ttl,
            subject,
        } => {
            let settings = local.settings()?;
            let rights = Rights::parse(&rights).map_err(anyhow::Error::msg)?;
            let ttl = parse_duration(&ttl)?;
            let (_, instance) = open_local(&settings)?;
            let token = auth::mint_token(
                &instance.token_secret,
                &instance.id_scope,
                &subject,
                rights,
                crate::time::now_unix(),
                ttl.as_secs(),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::RotateSecret(local) => {
            let settings = local.settings()?;
            let (store, _) = open_local(&settings)?;
            db::DocumentStore::setting_set(
                &store,
                bootstrap::TOKEN_SECRET_KEY,
                &auth::generate_token_secret(),
            )?;
            eprintln!("token secret replaced: tokens minted before now are refused");
            Ok(())
        }
    }
}

fn hub(command: HubCommand) -> anyhow::Result<()> {
    let encode =
        |name: &str| url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>();
    match command {
        HubCommand::JoinToken { local, ttl } => {
            let settings = local.settings()?;
            let ttl = parse_duration(&ttl)?;
            let (store, instance) = open_local(&settings)?;
            let secret = db::DocumentStore::setting_get(&store, bootstrap::TOKEN_SECRET_KEY)?
                .unwrap_or(instance.token_secret.clone());
            let token = crate::dps::hubs::mint_join_token(
                &secret,
                &instance.id_scope,
                instance.ca.root_cert_pem(),
                crate::time::now_unix(),
                ttl.as_secs(),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        HubCommand::List { remote } => print_json(&ApiClient::new(&remote)?.get("/hubs")?),
        HubCommand::Show { remote, name } => {
            print_json(&ApiClient::new(&remote)?.get(&format!("/hubs/{}", encode(&name)))?)
        }
        HubCommand::Drain { remote, name } => print_json(
            &ApiClient::new(&remote)?
                .call(
                    reqwest::Method::POST,
                    &format!("/hubs/{}/drain", encode(&name)),
                    None,
                    &[],
                )?
                .0,
        ),
        HubCommand::Activate { remote, name } => print_json(
            &ApiClient::new(&remote)?
                .call(
                    reqwest::Method::POST,
                    &format!("/hubs/{}/activate", encode(&name)),
                    None,
                    &[],
                )?
                .0,
        ),
        HubCommand::Remove { remote, name } => {
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

/// An error answer of the management API: its status and body (Azure error JSON).
#[derive(Debug)]
pub struct ApiFailure {
    pub status: reqwest::StatusCode,
    pub body: Value,
}

impl ApiFailure {
    /// The six-digit `errorCode` of the body, if it has one.
    pub fn code(&self) -> Option<u64> {
        self.body.get("errorCode").and_then(Value::as_u64)
    }

    /// The six-digit code of `error` when it is an API answer.
    pub fn code_of(error: &anyhow::Error) -> Option<u64> {
        error
            .downcast_ref::<ApiFailure>()
            .and_then(ApiFailure::code)
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = serde_json::to_string_pretty(&self.body).unwrap_or_default();
        write!(f, "{}: {body}", self.status)
    }
}

impl std::error::Error for ApiFailure {}

/// A signed client for the management API.
pub struct ApiClient {
    base: String,
    host: String,
    key_name: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl ApiClient {
    pub fn new(remote: &Remote) -> anyhow::Result<ApiClient> {
        let settings = remote.local.settings()?;
        let (host, key_name, key, ca_file) = match &remote.connection_string {
            Some(cs) => {
                let (host, name, key) =
                    bootstrap::parse_connection_string(cs).map_err(anyhow::Error::msg)?;
                let ca = remote.ca_file.clone().or_else(|| {
                    let bundle = bootstrap::Paths::new(&settings.service.data_dir).ca_bundle;
                    bundle.exists().then_some(bundle)
                });
                (host, name, key, ca)
            }
            None => {
                let (store, instance) = open_local(&settings)?;
                let owner = bootstrap::owner_policy(&store)?;
                (
                    settings.public_host(),
                    owner.key_name,
                    owner.primary_key,
                    Some(remote.ca_file.clone().unwrap_or(instance.paths.ca_bundle)),
                )
            }
        };
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = ca_file {
            for certificate in load_ca(&ca)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        Ok(ApiClient {
            base: format!("https://{host}"),
            host,
            key_name,
            key,
            http: builder.build()?,
        })
    }

    fn sas(&self) -> anyhow::Result<String> {
        symmetric_key::sign(
            &self.host,
            &self.key,
            crate::time::now_unix() + 3600,
            Some(&self.key_name),
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))
    }

    /// Sends one request; returns the JSON body (Null for 204) and the response headers.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{}{sep}api-version={API_VERSION}", self.base, path);
        let mut request = self
            .http
            .request(method, &url)
            .header("Authorization", self.sas()?);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .map_err(|e| anyhow::anyhow!(describe_send_error(&self.host, &e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text()?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            return Err(ApiFailure {
                status,
                body: value,
            }
            .into());
        }
        Ok((value, headers))
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.call(reqwest::Method::GET, path, None, &[])?.0)
    }

    /// Collects every page of a query.
    fn query_all(&self, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", "100")];
            if let Some(token) = &continuation {
                headers.push(("x-ms-continuation", token.as_str()));
            }
            let (page, response_headers) =
                self.call(reqwest::Method::POST, path, body, &headers)?;
            if let Value::Array(page) = page {
                items.extend(page);
            }
            continuation = response_headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            if continuation.is_none() {
                return Ok(Value::Array(items));
            }
        }
    }
}

/// A failed request in one line: the cause and, for an untrusted server certificate, the fix.
/// reqwest's error chain repeats OpenSSL's message at several levels; each is printed once.
fn describe_send_error(host: &str, error: &reqwest::Error) -> String {
    let mut chain: Vec<String> = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !chain.iter().any(|seen| seen.contains(&text)) {
            chain.push(text);
        }
        source = e.source();
    }
    let full = chain.join(": ");
    if let Some(at) = full.find("certificate verify failed") {
        // OpenSSL puts the verify result in parentheses after the reason.
        let reason = full[at..]
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(reason, _)| reason.to_string())
            .unwrap_or_else(|| "certificate verify failed".to_string());
        let fix = if reason.to_ascii_lowercase().contains("hostname mismatch") {
            "connect with a host name the server's certificate covers (its service.hostnames, \
             as in the HostName of its connection strings)"
        } else {
            "pass --ca-file with the CA bundle the server presents (`caBundlePath` of `zerotouch \
             credentials` on the server: ca/bundle.pem in its data dir, or join/trust.pem on a \
             joined hub)"
        };
        return format!("TLS: the server certificate of {host} is not trusted ({reason}): {fix}");
    }
    full
}

/// Every certificate in a PEM bundle (root and intermediate, typically).
fn load_ca(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)?;
    if certificates.is_empty() {
        anyhow::bail!("{} holds no certificate", path.display());
    }
    Ok(certificates)
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
fn apply_fields(
    kind: crate::enrollment::Kind,
    body: &mut Value,
    fields: &EnrollmentFields,
) -> anyhow::Result<()> {
    use crate::enrollment::Kind;
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

fn enrollment(kind: crate::enrollment::Kind, command: EnrollmentCommand) -> anyhow::Result<()> {
    use crate::enrollment::Kind;
    let base = match kind {
        Kind::Individual => "/enrollments",
        Kind::Group => "/enrollmentGroups",
    };
    let encode = |id: &str| {
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    match command {
        EnrollmentCommand::Create { remote, id, fields } => {
            let client = ApiClient::new(&remote)?;
            let mut body = json!({ kind.id_field(): id });
            if fields.attestation.is_none() && fields.from_file.is_none() {
                body["attestation"] = json!({"type": "symmetricKey"});
            }
            apply_fields(kind, &mut body, &fields)?;
            let path = format!("{base}/{}", encode(&id));
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
            let path = format!("{base}/{}", encode(&id));
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
            print_json(&value)
        }
        EnrollmentCommand::List { remote } => {
            let client = ApiClient::new(&remote)?;
            print_json(&client.query_all(&format!("{base}/query"), Some(&json!({"query": "*"})))?)
        }
        EnrollmentCommand::Update {
            remote,
            id,
            etag,
            fields,
        } => {
            let client = ApiClient::new(&remote)?;
            let path = format!("{base}/{}", encode(&id));
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
            let path = format!("{base}/{}", encode(&id));
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            client.call(reqwest::Method::DELETE, &path, None, &headers)?;
            Ok(())
        }
    }
}

fn registration(command: RegistrationCommand) -> anyhow::Result<()> {
    let encode = |id: &str| {
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    match command {
        RegistrationCommand::Show { remote, id } => {
            print_json(&ApiClient::new(&remote)?.get(&format!("/registrations/{}", encode(&id)))?)
        }
        RegistrationCommand::List { remote, group } => print_json(
            &ApiClient::new(&remote)?
                .query_all(&format!("/registrations/{}/query", encode(&group)), None)?,
        ),
        RegistrationCommand::Delete { remote, id, etag } => {
            let headers: Vec<(&str, &str)> =
                etag.iter().map(|e| ("If-Match", e.as_str())).collect();
            ApiClient::new(&remote)?.call(
                reqwest::Method::DELETE,
                &format!("/registrations/{}", encode(&id)),
                None,
                &headers,
            )?;
            Ok(())
        }
    }
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::RotateIntermediate { local } => print_json(
            &crate::pki::rotation::rotate_intermediate(&local.settings()?)?,
        ),
        CaCommand::RetireIntermediate { local } => print_json(
            &crate::pki::rotation::retire_intermediate(&local.settings()?)?,
        ),
        CaCommand::ImportToPkcs11 { local, move_key_to } => print_json(
            &crate::pki::token::import_to_pkcs11(&local.settings()?, move_key_to.as_deref())?,
        ),
        CaCommand::Upload {
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
        CaCommand::List { remote } => print_json(&ApiClient::new(&remote)?.get("/certificates")?),
        CaCommand::Show { remote, name } => {
            print_json(&ApiClient::new(&remote)?.get(&format!("/certificates/{}", encode(&name)))?)
        }
        CaCommand::VerificationCode { remote, name } => {
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
        CaCommand::Verify {
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
        CaCommand::Delete { remote, name } => {
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

fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::List { remote } => {
            print_json(&ApiClient::new(&remote)?.get("/authorizationPolicies")?)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every verb and every flag says what it is for in `--help` (issue 12, item 16). The
    /// `zerotouch` binary checks its whole tree, `simulate` included, the same way.
    #[test]
    fn every_verb_and_flag_has_help() {
        let missing = undocumented(&Cli::command());
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("h").is_err());
    }
}
