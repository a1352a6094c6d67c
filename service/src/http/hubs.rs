//! Linked hubs, at `/hubs` (see `dps::hubs` and docs/deployment.md).
//!
//! - Operators (`ServiceConfig`): mint join tokens (`POST /hubs/joinTokens`), list and inspect
//!   hubs, drain (`POST /hubs/{name}/drain`), re-activate (`…/activate`) and remove them.
//! - Hubs: join once with a join token (`POST /hubs/join`, `Authorization: Bearer <join
//!   token>`), then send heartbeats (`POST /hubs/{name}/heartbeat`, `Authorization: Bearer
//!   <heartbeat token>`). `GET /hubs/trustBundle` is public: the CA certificates a joining hub
//!   checks against the fingerprint in its join token.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Credential, Rights};
use crate::db::{Collection, Write};
use crate::dps::hubs::{self, HubCredential, HubState, LinkedHub};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, authorize, required_body};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::HUBS).route(web::get().to(list)))
        .service(web::resource(routes::HUB_JOIN_TOKENS).route(web::post().to(join_token)))
        .service(web::resource(routes::HUB_JOIN).route(web::post().to(join)))
        .service(web::resource(routes::HUB_TRUST_BUNDLE).route(web::get().to(trust_bundle)))
        .service(web::resource(routes::HUB_HEARTBEAT).route(web::post().to(heartbeat)))
        .service(web::resource(routes::HUB_DRAIN).route(web::post().to(drain)))
        .service(web::resource(routes::HUB_ACTIVATE).route(web::post().to(activate)))
        .service(
            web::resource(routes::HUB)
                .route(web::get().to(get))
                .route(web::delete().to(remove)),
        );
}

fn require_dps(state: &AppState) -> Result<(), ApiError> {
    if state.settings.service.role.runs_dps() {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            "this instance runs only the hub (--role hub)",
        ))
    }
}

fn timeout(state: &AppState) -> u64 {
    state.settings.dps.hub_heartbeat_timeout_seconds
}

/// The built-in hub of this process, as a linked hub view.
fn built_in_view(state: &AppState) -> Option<Value> {
    let hub = state.hub.as_ref()?;
    let own = &state.settings.hub;
    Some(json!({
        "name": hub.hostname,
        "location": own.location,
        "allocationWeight": own.allocation_weight,
        "applyAllocationPolicy": own.apply_allocation_policy,
        "serviceUrl": state.settings.hub_service_url(),
        "state": "active",
        "health": "healthy",
        "builtIn": true,
    }))
}

/// Whether `name` is this process's built-in hub.
fn is_built_in(state: &AppState, name: &str) -> bool {
    state
        .hub
        .as_ref()
        .is_some_and(|hub| hub.hostname.eq_ignore_ascii_case(name))
}

/// The refusal of drain and remove for the built-in hub (docs/dev/decisions.md).
fn built_in_refusal(name: &str, action: &str) -> ApiError {
    ApiError::new(
        ErrorCode::HubIsBuiltIn,
        format!(
            "{name} is the built-in hub of this process (\"builtIn\": true in the hub list): it \
             is always active and cannot be {action}. To send new devices elsewhere, name other \
             hubs in the enrollments' iotHubs, or run the hub as a process of its own \
             (--role hub, joined with a token), which can be drained and removed"
        ),
    )
}

#[utoipa::path(
    get,
    path = routes::HUBS,
    operation_id = "listHubs",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion),
    responses((status = 200, description = "The linked hubs", body = crate::http::openapi::HubList), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let linked = crate::db::blocking(&state.store, hubs::load_all).await?;
    let now = crate::time::now_unix();
    let mut items: Vec<Value> = built_in_view(&state).into_iter().collect();
    items.extend(linked.iter().map(|h| h.view(now, timeout(&state))));
    Ok(HttpResponse::Ok().json(json!({"value": items})))
}

async fn load(state: &web::Data<AppState>, name: String) -> Result<LinkedHub, ApiError> {
    crate::db::blocking(&state.store, move |s| hubs::load(s, &name))
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::HubNotFound, "no linked hub with this name"))
}

#[utoipa::path(
    get,
    path = routes::HUB,
    operation_id = "getHub",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The linked hub's name (its host name)")),
    responses((status = 200, description = "The linked hub", body = crate::http::openapi::LinkedHub), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    if let Some(view) = built_in_view(&state).filter(|v| {
        v["name"]
            .as_str()
            .is_some_and(|n| n.eq_ignore_ascii_case(&name))
    }) {
        return Ok(HttpResponse::Ok().json(view));
    }
    let hub = load(&state, name.into_inner()).await?;
    let mut view = hub.view(crate::time::now_unix(), timeout(&state));
    let name = hub.name.clone();
    // Moved devices still to be removed from this hub (the provisioning service retries).
    let pending =
        crate::db::blocking(&state.store, move |s| hubs::load_stale(s, Some(&name))).await?;
    view["pendingRemovals"] = json!(
        pending
            .iter()
            .take(100)
            .map(|p| json!({
                "deviceId": p.device_id,
                "registrationId": p.registration_id,
                "sinceUnix": p.since_unix,
                "attempts": p.attempts,
                "lastError": p.last_error,
            }))
            .collect::<Vec<_>>()
    );
    view["pendingRemovalCount"] = json!(pending.len());
    Ok(HttpResponse::Ok().json(view))
}

async fn set_state(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    to: HubState,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    if is_built_in(&state, &name) {
        return match to {
            HubState::Active => Ok(HttpResponse::Ok().json(built_in_view(&state))),
            HubState::Draining => Err(built_in_refusal(&name, "drained")),
        };
    }
    let hub = crate::db::blocking(&state.store, move |s| {
        hubs::update(s, &name, |h| {
            let changed = h.state != to;
            h.state = to;
            changed
        })
    })
    .await?
    .ok_or_else(|| ApiError::new(ErrorCode::HubNotFound, "no linked hub with this name"))?;
    tracing::info!(hub = %hub.name, state = ?to, "hub state changed");
    Ok(HttpResponse::Ok().json(hub.view(crate::time::now_unix(), timeout(&state))))
}

#[utoipa::path(
    post,
    path = routes::HUB_DRAIN,
    operation_id = "drainHub",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The linked hub's name (its host name)")),
    responses((status = 200, description = "The hub, draining", body = crate::http::openapi::LinkedHub), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn drain(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_state(req, state, name, HubState::Draining).await
}

#[utoipa::path(
    post,
    path = routes::HUB_ACTIVATE,
    operation_id = "activateHub",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The linked hub's name (its host name)")),
    responses((status = 200, description = "The hub, active", body = crate::http::openapi::LinkedHub), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn activate(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_state(req, state, name, HubState::Active).await
}

#[utoipa::path(
    delete,
    path = routes::HUB,
    operation_id = "removeHub",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The linked hub's name (its host name)")),
    responses((status = 204, description = "Removed"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn remove(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    if is_built_in(&state, &name) {
        return Err(built_in_refusal(&name, "removed"));
    }
    let key = name.clone();
    crate::db::blocking(&state.store, move |s| {
        s.delete(Collection::LinkedHubs, &key, None)
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::HubNotFound))?;
    tracing::info!(hub = %name, "hub removed");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinTokenRequest {
    /// Lifetime in seconds; default 15 minutes.
    ttl_seconds: Option<u64>,
}

#[utoipa::path(
    post,
    path = routes::HUB_JOIN_TOKENS,
    operation_id = "createHubJoinToken",
    tag = "hubs",
    params(crate::http::openapi::ApiVersion),
    request_body(content = Option<crate::http::openapi::JoinTokenRequest>, content_type = "application/json"),
    responses((status = 200, description = "A one-time join token", body = crate::http::openapi::JoinToken), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn join_token(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let ttl = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        required_body::<JoinTokenRequest>(&body)?.ttl_seconds
    }
    .unwrap_or(15 * 60);
    let secret = current_secret(&state).await?;
    let now = crate::time::now_unix();
    let token = hubs::mint_join_token(
        &secret,
        &state.instance.id_scope,
        state.instance.ca.root_cert_pem(),
        now,
        ttl,
    )
    .map_err(|e| ApiError::field(ErrorCode::InvalidField, "ttlSeconds", e))?;
    tracing::info!(principal = %caller.principal, ttl, "hub join token minted");
    Ok(HttpResponse::Ok().json(json!({
        "token": token,
        "expiresAtUtc": crate::time::rfc3339_of_unix(now.saturating_add(ttl)),
    })))
}

async fn current_secret(state: &web::Data<AppState>) -> Result<String, ApiError> {
    crate::db::blocking(&state.store, |s| {
        s.setting_get(crate::bootstrap::TOKEN_SECRET_KEY)
    })
    .await?
    .ok_or_else(|| ApiError::internal("the token secret is missing"))
}

fn bearer(req: &HttpRequest) -> Result<String, ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match crate::auth::parse_authorization(header)? {
        Credential::Bearer(token) => Ok(token),
        Credential::Sas(_) => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "send the token as `Authorization: Bearer …`",
        )),
    }
}

/// The CA certificates devices' and hubs' certificates chain to, plus every verified CA
/// uploaded for enrollment groups: what a hub needs to trust devices.
async fn bundle(state: &web::Data<AppState>) -> Result<String, ApiError> {
    let own = state.instance.ca.trust_bundle_pem();
    let pems = crate::db::blocking(&state.store, move |s| {
        crate::hub::auth::trusted_cas(s, &own)
    })
    .await?;
    Ok(pems.iter().map(|p| format!("{}\n", p.trim())).collect())
}

#[utoipa::path(
    get,
    path = routes::HUB_TRUST_BUNDLE,
    operation_id = "hubTrustBundle",
    tag = "hubs",
    responses((status = 200, description = "The CA certificates a hub trusts, PEM", content_type = "application/x-pem-file", body = String), crate::http::openapi::PublicErrors),
)]
async fn trust_bundle(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_dps(&state)?;
    Ok(HttpResponse::Ok()
        .content_type("application/x-pem-file")
        .body(bundle(&state).await?))
}

/// What a hub sends to join.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// The name devices connect to (`assignedHub`).
    pub host_name: String,
    /// Every name the hub answers to (its certificate's SANs); must include `hostName`.
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub service_url: String,
    pub location: Option<String>,
    pub allocation_weight: Option<u32>,
    pub apply_allocation_policy: Option<bool>,
    pub credential: HubCredential,
}

#[utoipa::path(
    post,
    path = routes::HUB_JOIN,
    operation_id = "joinHub",
    tag = "hubs",
    description = "A hub joins with a join token (`Authorization: Bearer <join token>`).",
    request_body(content = crate::http::openapi::JoinRequestSchema, content_type = "application/json"),
    responses((status = 200, description = "The joined hub's identity: heartbeat token, TLS certificate and key, trust bundle", body = crate::http::openapi::JoinResponse), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("hubToken" = [])),
)]
async fn join(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_dps(&state)?;
    let token = bearer(&req)?;
    let secret = current_secret(&state).await?;
    let now = crate::time::now_unix();
    let claims = hubs::verify_join_token(&token, &secret, &state.instance.id_scope, now)?;
    let request: JoinRequest = required_body(&body)?;

    let name = request.host_name.trim().to_string();
    zerotouch_certs::check_hostname(&name)
        .map_err(|e| ApiError::field(ErrorCode::InvalidField, "hostName", e))?;
    let mut hostnames = request.hostnames.clone();
    if !hostnames.iter().any(|h| h.eq_ignore_ascii_case(&name)) {
        hostnames.insert(0, name.clone());
    }
    for host in &hostnames {
        zerotouch_certs::check_hostname(host)
            .map_err(|e| ApiError::field(ErrorCode::InvalidField, "hostnames", e))?;
    }
    let service_url = url::Url::parse(&request.service_url)
        .ok()
        .filter(|u| u.scheme() == "https" && u.host_str().is_some())
        .ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidField,
                "serviceUrl",
                "must be an https:// URL",
            )
        })?;
    let weight = request.allocation_weight.unwrap_or(1);
    if !(1..=1000).contains(&weight) {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "allocationWeight",
            "must be between 1 and 1000",
        ));
    }
    if request.credential.key_name.is_empty()
        || zerotouch_attestation::symmetric_key::validate_key(&request.credential.key).is_err()
    {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "credential",
            "needs a keyName and a base64 key of 16 to 64 bytes",
        ));
    }
    if state
        .hub
        .as_ref()
        .is_some_and(|h| h.hostname.eq_ignore_ascii_case(&name))
    {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            "this name is the provisioning service's own built-in hub",
        ));
    }

    // Everything checked: spend the token, then issue.
    {
        let claims = claims.clone();
        crate::db::blocking(&state.store, move |s| {
            Ok(hubs::consume_join_token(s, &claims))
        })
        .await??;
    }
    let issued = state
        .instance
        .ca
        .issue_server_certificate(&hostnames, hubs::HUB_CERT_DAYS)
        .map_err(|e| ApiError::field(ErrorCode::InvalidField, "hostnames", e))?;
    let heartbeat_token = hex::encode(rand::random::<[u8; 32]>());
    let record = LinkedHub {
        name: name.clone(),
        location: request.location.filter(|l| !l.trim().is_empty()),
        allocation_weight: weight,
        apply_allocation_policy: request.apply_allocation_policy.unwrap_or(true),
        service_url: service_url.as_str().trim_end_matches('/').to_string(),
        credential: request.credential,
        state: HubState::Active,
        joined_at_utc: crate::time::now_rfc3339(),
        last_heartbeat_unix: now,
        last_failure_unix: 0,
        heartbeat_token_sha256: hubs::hash_token(&heartbeat_token),
    };
    let body = serde_json::to_value(&record).map_err(ApiError::internal)?;
    let key = name.clone();
    crate::db::blocking(&state.store, move |s| {
        s.put(Collection::LinkedHubs, &key, None, &body, Write::Upsert)
    })
    .await?;
    tracing::info!(hub = %name, jti = %claims.jti, weight, "hub joined");
    Ok(HttpResponse::Ok().json(json!({
        "name": name,
        "idScope": state.instance.id_scope,
        "heartbeatToken": heartbeat_token,
        "heartbeatIntervalSeconds": state.settings.dps.hub_heartbeat_seconds,
        "heartbeatTimeoutSeconds": timeout(&state),
        "certificateChain": issued.chain_pem,
        "privateKey": issued.private_key.expose(),
        "trustBundle": bundle(&state).await?,
    })))
}

#[utoipa::path(
    post,
    path = routes::HUB_HEARTBEAT,
    operation_id = "hubHeartbeat",
    tag = "hubs",
    description = "A linked hub reports in with its heartbeat token (`Authorization: Bearer <heartbeat token>`).",
    params(("name" = String, Path, description = "The linked hub's name (its host name)")),
    responses((status = 200, description = "The hub's state and what it must trust", body = crate::http::openapi::HeartbeatResponse), crate::http::openapi::ManagementErrors),
    security(("hubToken" = [])),
)]
async fn heartbeat(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_dps(&state)?;
    let token = bearer(&req)?;
    let name = name.into_inner();
    let hub = load(&state, name.clone()).await?;
    let presented = hubs::hash_token(&token);
    if !same_hash(&presented, &hub.heartbeat_token_sha256) {
        return Err(ApiError::new(
            ErrorCode::InvalidSignature,
            "the heartbeat token is not this hub's",
        ));
    }
    let now = crate::time::now_unix();
    let hub = crate::db::blocking(&state.store, move |s| {
        hubs::update(s, &name, |h| {
            h.last_heartbeat_unix = now;
            true
        })
    })
    .await?
    .ok_or_else(|| ApiError::new(ErrorCode::HubNotFound, "no linked hub with this name"))?;
    // The CRL's fingerprint: a hub fetches `/crl` when it changes and enforces it.
    let crl_sha256 = match state.dps.as_ref().map(|d| &d.pki) {
        Some(pki) => Some(hubs::sha256_hex(&pki.crl(false).await?)),
        None => None,
    };
    Ok(HttpResponse::Ok().json(json!({
        "state": hub.state,
        "heartbeatIntervalSeconds": state.settings.dps.hub_heartbeat_seconds,
        "trustBundle": bundle(&state).await?,
        "crlSha256": crl_sha256,
    })))
}

/// Constant-time equality of two token hashes.
fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a.as_bytes(), b.as_bytes())
}
