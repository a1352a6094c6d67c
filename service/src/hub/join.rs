//! A hub of its own (`serve --role hub --dps-url … --join-token …`) joining a provisioning
//! service, and its heartbeats (the provisioning side is `dps::hubs` and `http::hubs`).
//!
//! Join, once:
//! 1. Read the CA fingerprint (`cah`) out of the join token, fetch the provisioning service's
//!    public trust bundle without trusting anything yet, and keep the certificate whose SHA-256
//!    is the fingerprint. From then on only that root is trusted: a man in the middle cannot
//!    present a bundle that matches.
//! 2. Create the `provisioningservice` policy on this hub (registry read/write, service
//!    connect) and send its key with the hub's name, service URL, region and weight, with the
//!    token as bearer.
//! 3. Keep what comes back in `{data_dir}/join/`: the TLS server certificate and key issued by
//!    the provisioning service's CA (devices trust that CA already), the trust bundle for
//!    X.509 devices, and the heartbeat token (`state.json`, 0600).
//!
//! Later starts reuse `{data_dir}/join/` and need no token. Heartbeats run every interval the
//! provisioning service asked for; each answer refreshes the trust bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{AuthorizationPolicy, Rights};
use crate::config::{Role, Settings};
use crate::db::{Collection, DocumentStore, StoreError, Write};
use crate::dps::hubs::{PROVISIONING_POLICY, certificate_hash, peek_join_claims};

/// What a joined hub keeps between starts (`join/state.json`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinState {
    pub dps_url: String,
    pub name: String,
    pub heartbeat_token: String,
    pub heartbeat_interval_seconds: u64,
    /// The provisioning service's root, PEM: the only certificate trusted when calling it.
    pub dps_root: String,
}

impl std::fmt::Debug for JoinState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinState")
            .field("dps_url", &self.dps_url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Files of a joined hub.
#[derive(Debug, Clone)]
pub struct JoinPaths {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
    pub trust_bundle: PathBuf,
}

impl JoinPaths {
    pub fn new(data_dir: &Path) -> JoinPaths {
        let dir = data_dir.join("join");
        JoinPaths {
            state: dir.join("state.json"),
            server_chain: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            trust_bundle: dir.join("trust.pem"),
            dir,
        }
    }
}

/// A joined hub: where its TLS material is and how to reach the provisioning service.
#[derive(Debug, Clone)]
pub struct Joined {
    pub paths: JoinPaths,
    pub state: JoinState,
}

impl Joined {
    pub fn trust_bundle(&self) -> anyhow::Result<String> {
        std::fs::read_to_string(&self.paths.trust_bundle)
            .with_context(|| format!("reading {}", self.paths.trust_bundle.display()))
    }
}

fn trim_url(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// Joins (first start) or loads the join (later starts). `None` unless this process is a hub
/// of its own with `hub.dps_url` set.
pub async fn ensure_joined(
    settings: &Settings,
    store: Arc<dyn DocumentStore>,
) -> anyhow::Result<Option<Joined>> {
    let Some(dps_url) = settings.hub.dps_url.as_deref().map(trim_url) else {
        return Ok(None);
    };
    if settings.service.role != Role::Hub {
        bail!("hub.dps_url (--dps-url) needs --role hub");
    }
    let paths = JoinPaths::new(&settings.service.data_dir);
    if paths.state.exists() {
        let text = std::fs::read_to_string(&paths.state)
            .with_context(|| format!("reading {}", paths.state.display()))?;
        let state: JoinState = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", paths.state.display()))?;
        if state.dps_url == dps_url && paths.server_chain.exists() && paths.server_key.exists() {
            tracing::info!(dps = %dps_url, name = %state.name, "joined earlier; reusing it");
            return Ok(Some(Joined { paths, state }));
        }
        tracing::info!(dps = %dps_url, "the provisioning service URL changed; joining again");
    }
    let token = settings.hub.join_token.as_deref().context(
        "this hub has not joined its provisioning service yet: pass --join-token (from `zerotouch hub join-token` on the provisioning side)",
    )?;
    let joined = join(settings, store, &dps_url, token, &paths).await?;
    Ok(Some(joined))
}

async fn join(
    settings: &Settings,
    store: Arc<dyn DocumentStore>,
    dps_url: &str,
    token: &str,
    paths: &JoinPaths,
) -> anyhow::Result<Joined> {
    let claims = peek_join_claims(token).map_err(|e| anyhow::anyhow!("the join token: {e}"))?;
    let dps_root = fetch_pinned_root(dps_url, &claims.cah).await?;
    let client = pinned_client(&dps_root)?;

    let key = crate::db::blocking(&store, |s| Ok(provisioning_policy(s)))
        .await
        .context("creating the provisioning policy")??;
    let name = settings.hub_hostname();
    let body = json!({
        "hostName": name,
        "hostnames": settings.service.hostnames,
        "serviceUrl": settings.hub_service_url(),
        "location": settings.hub.location,
        "allocationWeight": settings.hub.allocation_weight,
        "applyAllocationPolicy": settings.hub.apply_allocation_policy,
        "credential": {"keyName": PROVISIONING_POLICY, "key": key},
    });
    let response = client
        .post(format!("{dps_url}/hubs/join"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("joining {dps_url}"))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = answer
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        let code = answer.get("errorCode").cloned().unwrap_or(Value::Null);
        bail!("the provisioning service refused the join: HTTP {status}, {code}: {message}");
    }
    let field = |name: &str| -> anyhow::Result<String> {
        answer
            .get(name)
            .and_then(Value::as_str)
            .map(String::from)
            .with_context(|| format!("the join answer has no {name}"))
    };
    let state = JoinState {
        dps_url: dps_url.to_string(),
        name: field("name")?,
        heartbeat_token: field("heartbeatToken")?,
        heartbeat_interval_seconds: answer
            .get("heartbeatIntervalSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(10)
            .max(1),
        dps_root,
    };
    crate::bootstrap::create_private_dir(&paths.dir)?;
    crate::bootstrap::write_atomic(&paths.server_key, field("privateKey")?.as_bytes(), 0o600)?;
    crate::bootstrap::write_atomic(
        &paths.server_chain,
        field("certificateChain")?.as_bytes(),
        0o644,
    )?;
    crate::bootstrap::write_atomic(&paths.trust_bundle, field("trustBundle")?.as_bytes(), 0o644)?;
    // Last: its presence means the join is complete.
    crate::bootstrap::write_atomic(&paths.state, &serde_json::to_vec(&state)?, 0o600)?;
    tracing::info!(dps = %dps_url, name = %state.name, "joined the provisioning service");
    Ok(Joined {
        paths: paths.clone(),
        state,
    })
}

/// The key of this hub's `provisioningservice` policy, created if absent.
fn provisioning_policy(store: &dyn DocumentStore) -> anyhow::Result<String> {
    if let Some(policy) = crate::hub::auth::policy(store, PROVISIONING_POLICY)? {
        return Ok(policy.primary_key);
    }
    let policy = AuthorizationPolicy {
        key_name: PROVISIONING_POLICY.into(),
        primary_key: super::device::generate_device_key(),
        secondary_key: super::device::generate_device_key(),
        rights: Rights::REGISTRY_READ
            .union(Rights::REGISTRY_WRITE)
            .union(Rights::SERVICE_CONNECT)
            .to_string(),
    };
    let body = serde_json::to_value(&policy)?;
    match store.put(
        Collection::HubPolicies,
        PROVISIONING_POLICY,
        None,
        &body,
        Write::Create,
    ) {
        Ok(_) => Ok(policy.primary_key),
        Err(StoreError::Conflict) => provisioning_policy(store),
        Err(e) => Err(e.into()),
    }
}

/// Fetches `/hubs/trustBundle` without verifying TLS and returns the certificate whose SHA-256
/// is `fingerprint`. Nothing else from that connection is used.
async fn fetch_pinned_root(dps_url: &str, fingerprint: &str) -> anyhow::Result<String> {
    let probe = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let bundle = probe
        .get(format!("{dps_url}/hubs/trustBundle"))
        .send()
        .await
        .with_context(|| format!("reaching {dps_url}"))?
        .error_for_status()
        .with_context(|| format!("{dps_url}/hubs/trustBundle"))?
        .text()
        .await?;
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .find(|block| certificate_hash(block).is_some_and(|h| h.eq_ignore_ascii_case(fingerprint)))
        .map(|block| format!("{block}\n"))
        .with_context(|| {
            format!(
                "{dps_url} does not present the CA named in the join token: wrong URL, a token from another service, or someone in between"
            )
        })
}

/// An HTTPS client that trusts only the provisioning service's root.
fn pinned_client(root_pem: &str) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes())?)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(3))
        .build()?)
}

/// Sends heartbeats until the process ends; each answer refreshes the hub's trust bundle.
pub async fn heartbeats(joined: Joined, hub: Arc<super::Hub>) {
    let client = match pinned_client(&joined.state.dps_root) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the heartbeat client; no heartbeats");
            return;
        }
    };
    let url = format!(
        "{}/hubs/{}/heartbeat",
        joined.state.dps_url,
        url::form_urlencoded::byte_serialize(joined.state.name.as_bytes()).collect::<String>()
    );
    let interval = Duration::from_secs(joined.state.heartbeat_interval_seconds);
    let mut last_bundle = joined.trust_bundle().unwrap_or_default();
    let mut last_crl: Option<String> = None;
    loop {
        match client
            .post(&url)
            .bearer_auth(&joined.state.heartbeat_token)
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                if let Some(bundle) = answer.get("trustBundle").and_then(Value::as_str)
                    && bundle != last_bundle
                    && bundle.contains("-----BEGIN CERTIFICATE-----")
                {
                    if let Err(error) = crate::bootstrap::write_atomic(
                        &joined.paths.trust_bundle,
                        bundle.as_bytes(),
                        0o644,
                    ) {
                        tracing::warn!(%error, "cannot store the new trust bundle");
                    }
                    hub.set_trust_bundle(bundle.to_string());
                    last_bundle = bundle.to_string();
                    tracing::info!("trust bundle updated from the provisioning service");
                }
                if let Some(fingerprint) = answer.get("crlSha256").and_then(Value::as_str)
                    && last_crl.as_deref() != Some(fingerprint)
                {
                    match apply_crl(&client, &joined.state.dps_url, &hub).await {
                        Ok(count) => {
                            tracing::info!(
                                revoked = count,
                                "CRL applied from the provisioning service"
                            );
                            last_crl = Some(fingerprint.to_string());
                        }
                        Err(error) => tracing::warn!(%error, "cannot apply the CRL; retrying"),
                    }
                }
            }
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                tracing::error!(%status, %body, "the provisioning service refused a heartbeat (removed? re-join with a new token)");
            }
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed; retrying");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Fetches the provisioning service's CRL over the pinned connection and records every entry as
/// a revoked certificate in this hub's store, so that `pki::revocation_of` refuses it here too;
/// live connections that used a newly revoked certificate are closed. Returns the entry count.
async fn apply_crl(
    client: &reqwest::Client,
    dps_url: &str,
    hub: &Arc<super::Hub>,
) -> anyhow::Result<usize> {
    let der = client
        .get(format!("{dps_url}/crl"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| anyhow::anyhow!("the CRL does not parse: {e}"))?;
    let issuer = crl.issuer().to_string();
    let entries: Vec<(String, i64)> = crl
        .iter_revoked_certificates()
        .filter_map(|entry| {
            let serial = crate::pki::serial_key(&hex::encode_upper(entry.raw_serial()))?;
            Some((serial, entry.revocation_date.timestamp()))
        })
        .collect();
    let count = entries.len();
    let newly = crate::db::blocking(hub.store(), move |store| {
        let mut newly = Vec::new();
        for (serial, revoked_at) in entries {
            let known = store
                .get(Collection::IssuedCertificates, &serial)?
                .is_some_and(|d| d.body.get("status").and_then(Value::as_str) == Some("revoked"));
            if known {
                continue;
            }
            let body = json!({
                "serial": serial,
                "issuer": issuer,
                "status": "revoked",
                "revokedAt": revoked_at,
                "source": "crl",
            });
            store.put(
                Collection::IssuedCertificates,
                &serial,
                None,
                &body,
                Write::Upsert,
            )?;
            newly.push(serial);
        }
        Ok(newly)
    })
    .await?;
    for serial in &newly {
        let closed = hub.certificates.close(serial);
        if closed > 0 {
            tracing::info!(%serial, closed, "closed connections of a revoked certificate");
        }
    }
    Ok(count)
}
