//! The `zerotouch` command line: the clap tree and `run`, which dispatches each verb.
//!
//! - `local.rs`: the verbs that act on the local data dir and database (`serve`,
//!   `credentials`, `config`, `token`, `hub join-token`, `ca rotate-intermediate`,
//!   `retire-intermediate`, `import-to-pkcs11`). They open an existing instance and never
//!   create one (only `serve` does).
//! - `remote.rs`: the clients of the management API (`enrollment`, `group`, `registration`,
//!   `ca`, `policy`, `hub`, `cert`, `audit`), in the spirit of `az iot dps …`: they sign each
//!   request with a SAS token from `--connection-string` (or, without one, the owner policy of
//!   the local data dir) and print the JSON the API answers.
//! - `client.rs`: `ApiClient`, the signed HTTPS client those use.
//!
//! `zerotouch simulate` is not here: the `zerotouch` binary adds it from `zerotouch-simulate`.
//! This module depends on the rest of the crate; nothing else in the crate depends on it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::config::Settings;
use crate::enrollment::Kind;

mod client;
mod local;
mod remote;
mod table;

pub use client::{ApiClient, ApiFailure};
pub use local::credentials;

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
    /// How list and show verbs print: table or json. Default: table on a terminal, json
    /// otherwise (pipes, files, scripts).
    #[arg(long, value_enum, global = true)]
    pub output: Option<Output>,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns for people.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
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
        command: CertCommand,
    },
    /// The PKI audit trail (issue, renew, revoke).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// `zerotouch hub …`: one verb on the local data dir, the others remote.
#[derive(Debug, Subcommand)]
pub enum HubCommand {
    #[command(flatten)]
    Local(HubLocalCommand),
    #[command(flatten)]
    Remote(HubRemoteCommand),
}

#[derive(Debug, Subcommand)]
pub enum HubLocalCommand {
    /// Mint a single-use token a hub joins with (`serve --role hub --join-token …`). Needs the
    /// provisioning service's data dir (or database) and prints the token.
    JoinToken {
        #[command(flatten)]
        local: Local,
        /// Lifetime: seconds, or with a unit (30m, 1h, 7d). At most 7 days.
        #[arg(long, default_value = "15m")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum HubRemoteCommand {
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

/// `zerotouch ca …`: uploaded CA certificates (remote), and the service's own CA (local).
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    #[command(flatten)]
    Remote(CaRemoteCommand),
    #[command(flatten)]
    Local(CaLocalCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaRemoteCommand {
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
}

#[derive(Debug, Subcommand)]
pub enum CaLocalCommand {
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

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke a certificate this service issued.
    Revoke {
        #[command(flatten)]
        remote: Remote,
        /// Serial number in hex (as `openssl x509 -serial` prints it; colons allowed).
        serial: String,
        /// RFC 5280 reason name: keyCompromise, superseded, cessationOfOperation, ...
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Certificates this service issued.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only the certificates issued to this registration id.
        #[arg(long)]
        registration_id: Option<String>,
        /// `good` or `revoked`.
        #[arg(long)]
        status: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit events (issue, renew, revoke), oldest first.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only the events of this certificate serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// Only the events of this registration id.
        #[arg(long)]
        registration_id: Option<String>,
        /// `issue`, `renew` or `revoke`.
        #[arg(long)]
        action: Option<String>,
    },
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
        Command::Serve(args) => local::serve(args),
        Command::Credentials { local, json: _ } => local::print_credentials(&local),
        Command::Config(local) => local::config(&local),
        Command::Token { command } => local::token(command),
        Command::Enrollment { command } => remote::enrollment(Kind::Individual, command),
        Command::Group { command } => remote::enrollment(Kind::Group, command),
        Command::Registration { command } => remote::registration(command),
        Command::Ca {
            command: CaCommand::Remote(command),
        } => remote::ca(command),
        Command::Ca {
            command: CaCommand::Local(command),
        } => local::ca(command),
        Command::Policy { command } => remote::policy(command),
        Command::Hub {
            command: HubCommand::Local(command),
        } => local::hub(command),
        Command::Hub {
            command: HubCommand::Remote(command),
        } => remote::hub(command),
        Command::Cert { command } => remote::cert(command),
        Command::Audit { command } => remote::audit(command),
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

/// A list or show verb's result, as `--output` says (a table when unset and stdout is a
/// terminal). A list uses `columns` (its first plain fields when empty).
fn print_out(
    output: Option<Output>,
    value: &Value,
    columns: &[table::Column],
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let output = output.unwrap_or(if std::io::stdout().is_terminal() {
        Output::Table
    } else {
        Output::Json
    });
    // Some lists come wrapped, as Azure's do: {"value": [...]}.
    let list = match value {
        Value::Array(items) => Some(items),
        Value::Object(map) if map.len() == 1 => map.get("value").and_then(Value::as_array),
        _ => None,
    };
    match (output, list) {
        (Output::Json, _) => print_json(value),
        (Output::Table, Some(items)) => {
            println!("{}", table::list(items, columns));
            Ok(())
        }
        (Output::Table, None) => {
            println!("{}", table::item(value));
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
}
