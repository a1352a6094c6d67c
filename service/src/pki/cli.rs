//! `zerotouch cert` and `zerotouch audit`: clients of the certificate and audit routes of the
//! management API (`http::pki`).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::{ApiClient, Remote};

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

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `path?k=v&…` for the filters that are set.
fn with_filters(path: &str, filters: &[(&str, &Option<String>)]) -> String {
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Every page of a GET list.
fn get_all(client: &ApiClient, path: &str) -> anyhow::Result<Value> {
    let mut items = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let mut headers = vec![("x-ms-max-item-count", "1000")];
        if let Some(token) = &continuation {
            headers.push(("x-ms-continuation", token.as_str()));
        }
        let (page, response_headers) = client.call(reqwest::Method::GET, path, None, &headers)?;
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

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn cert(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Revoke {
            remote,
            serial,
            reason,
        } => {
            let (record, _) = ApiClient::new(&remote)?.call(
                reqwest::Method::POST,
                &format!("/certificates/issued/{}/revoke", encode(&serial)),
                Some(&json!({ "reason": reason })),
                &[],
            )?;
            print(&record)
        }
        CertCommand::List {
            remote,
            registration_id,
            status,
        } => print(&get_all(
            &ApiClient::new(&remote)?,
            &with_filters(
                "/certificates/issued",
                &[("registrationId", &registration_id), ("status", &status)],
            ),
        )?),
    }
}

pub fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List {
            remote,
            serial,
            registration_id,
            action,
        } => print(&get_all(
            &ApiClient::new(&remote)?,
            &with_filters(
                "/audit",
                &[
                    ("serial", &serial),
                    ("registrationId", &registration_id),
                    ("action", &action),
                ],
            ),
        )?),
    }
}
