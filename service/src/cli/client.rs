//! `ApiClient`: the management API client of the remote verbs, signed with a SAS token.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use zerotouch_attestation::symmetric_key;

use super::Remote;
use super::local::open_local;
use crate::bootstrap;

/// Characters a path segment keeps as they are (RFC 3986 unreserved); the rest are escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(super) fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// API version the CLI sends.
const API_VERSION: &str = "2021-10-01";

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

    pub(super) fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.call(reqwest::Method::GET, path, None, &[])?.0)
    }

    /// Collects every page of a query (POST, 100 items a page).
    pub(super) fn query_all(&self, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.all_pages(reqwest::Method::POST, path, body, "100")
    }

    /// Every page of a GET list (1,000 items a page).
    pub(super) fn get_all(&self, path: &str) -> anyhow::Result<Value> {
        self.all_pages(reqwest::Method::GET, path, None, "1000")
    }

    /// Follows `x-ms-continuation` until the last page and returns every item.
    fn all_pages(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        page_size: &str,
    ) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", page_size)];
            if let Some(token) = &continuation {
                headers.push(("x-ms-continuation", token.as_str()));
            }
            let (page, response_headers) = self.call(method.clone(), path, body, &headers)?;
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
