//! The HTTPS API: one file per resource, each with `configure`.
//!
//! Handlers are thin: authorize, extract, call storage or the domain, map the error. The
//! `observe` middleware gives every request an id (the `x-ms-request-id` response header, the
//! `trackingId` of error bodies and a field on every log line), records Prometheus metrics and
//! renders [`ApiError`]s.

pub mod certificates;
pub mod console;
pub mod dps;
pub mod enrollments;
pub mod error;
pub mod est;
pub mod health;
pub mod hub;
pub mod hubs;
pub mod metrics;
pub mod openapi;
pub mod pki;
pub mod policies;
pub mod registrations;
pub mod routes;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderMap;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use tracing::Instrument;

use crate::auth::{self, Caller, Credential, Rights};
use crate::bootstrap::Instance;
use crate::config::Settings;
use crate::db::{Collection, Document, DocumentStore, Write};
use crate::http::error::{ApiError, ErrorCode};
use crate::tls::PeerCertificates;

/// Largest request body we read (enrollments with two certificates fit comfortably).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Default and largest page of a query.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// Shared by every handler.
pub struct AppState {
    pub store: Arc<dyn DocumentStore>,
    /// The hub, when this process runs one.
    pub hub: Option<Arc<crate::hub::Hub>>,
    /// The device registration service, when this process runs provisioning.
    pub dps: Option<Arc<crate::dps::Dps>>,
    /// Replica mode: the other replicas, through NATS.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub settings: Settings,
    pub instance: Arc<Instance>,
    pub metrics: metrics::Metrics,
    pub console: console::Console,
}

/// The id of one request.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// All routes. Also used by in-process tests.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(MAX_BODY_BYTES)
            .error_handler(|e, _| json_error(e).into()),
    )
    .app_data(web::PayloadConfig::default().limit(MAX_BODY_BYTES))
    .app_data(
        web::PathConfig::default().error_handler(|e, _| {
            ApiError::new(ErrorCode::InvalidField, format!("path: {e}")).into()
        }),
    )
    .app_data(
        web::QueryConfig::default().error_handler(|e, _| {
            ApiError::new(ErrorCode::InvalidField, format!("query: {e}")).into()
        }),
    )
    .configure(health::configure)
    .configure(metrics::configure)
    .configure(openapi::configure)
    .configure(enrollments::configure)
    .configure(registrations::configure)
    // Before `certificates`: `/certificates/issued` would otherwise be a CA named "issued".
    .configure(pki::configure)
    .configure(est::configure)
    .configure(certificates::configure)
    .configure(policies::configure)
    .configure(hubs::configure)
    .configure(hub::configure)
    .configure(console::configure)
    // Last: its `/{idScope}/registrations/…` patterns would shadow nothing above, but keep the
    // fixed management paths first.
    .configure(dps::configure)
    .default_service(web::to(|| async {
        Err::<HttpResponse, _>(ApiError::new(ErrorCode::NotFound, "no such resource"))
    }));
}

fn json_error(e: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match e {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ),
        E::ContentType => ApiError::new(
            ErrorCode::InvalidJson,
            "Content-Type must be application/json",
        ),
        other => ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not JSON: {other}"),
        ),
    }
}

/// Rewrites the request's path to the spelling its route is registered with
/// ([`routes::normalize`]: fixed words in another case, a trailing slash), before routing.
fn respell_path(req: &mut ServiceRequest) {
    let Some(path) = routes::normalize(req.path()) else {
        return;
    };
    let path_and_query = match req.query_string() {
        "" => path,
        query => format!("{path}?{query}"),
    };
    let mut parts = req.head().uri.clone().into_parts();
    let Ok(path_and_query) = path_and_query.parse() else {
        return;
    };
    parts.path_and_query = Some(path_and_query);
    // Only the path changed, so the URI stays valid; keep the original if it somehow is not.
    let Ok(uri) = actix_web::http::Uri::from_parts(parts) else {
        return;
    };
    req.match_info_mut().get_mut().update(&uri);
    req.head_mut().uri = uri;
}

/// Request id, span, metrics, and the final rendering of API errors.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let mut req = req;
    respell_path(&mut req);
    let request_id = uuid::Uuid::new_v4().to_string();
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().to_string();
    let path = req.path().to_string();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!("request", request_id = %request_id, %method, %path);

    async move {
        let response = next.call(req).await?;
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_string());
        // Framework errors (payload limits, unknown methods…) get the same Azure error JSON.
        let framework_error = match response.response().error() {
            Some(e)
                if e.as_error::<ApiError>().is_none()
                    && e.as_error::<crate::hub::error::HubError>().is_none() =>
            {
                Some(framework_error(e))
            }
            _ => None,
        };
        let framework_error = framework_error.or_else(|| {
            (response.status() == actix_web::http::StatusCode::METHOD_NOT_ALLOWED).then(|| {
                ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    format!("{method} is not allowed on this resource"),
                )
            })
        });
        let api_error = framework_error.as_ref().or_else(|| {
            response.response().error().and_then(|e| e.as_error::<ApiError>())
        });
        // Hub routes answer in IoT Hub's error shape.
        let on_hub = hub::is_hub_path(&path);
        let hub_error = match (api_error, on_hub) {
            (Some(error), true) => Some(hub::from_api(error)),
            _ => None,
        };
        let hub_error = hub_error.as_ref().or_else(|| {
            response
                .response()
                .error()
                .and_then(|e| e.as_error::<crate::hub::error::HubError>())
        });
        let mut response = if let Some(error) = hub_error {
            match error.internal_detail() {
                Some(detail) if error.status().is_server_error() => {
                    tracing::error!(code = ?error.code, detail, "request failed")
                }
                _ => tracing::info!(code = ?error.code, message = %error.message, "request refused"),
            }
            let rendered = error.render(&request_id);
            response.into_response(rendered)
        } else { match api_error {
            Some(error) => {
                match error.internal_detail() {
                    Some(detail) if error.status().is_server_error() => {
                        tracing::error!(code = ?error.code, detail, "request failed")
                    }
                    Some(detail) => tracing::warn!(code = ?error.code, detail, "request refused"),
                    None => tracing::info!(code = ?error.code, message = %error.message, "request refused"),
                }
                let rendered = error.render(&request_id);
                response.into_response(rendered)
            }
            None => response.map_into_boxed_body(),
        } };
        if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(
                actix_web::http::header::HeaderName::from_static("x-ms-request-id"),
                value,
            );
        }
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        if let Some(state) = state {
            state.metrics.observe(&method, &route, status, elapsed);
        }
        tracing::info!(status, route = %route, latency_ms = elapsed.as_secs_f64() * 1000.0, "request done");
        Ok(response)
    }
    .instrument(span)
    .await
}

fn framework_error(error: &actix_web::Error) -> ApiError {
    let status = error.as_response_error().status_code();
    let code = match status.as_u16() {
        413 => ErrorCode::PayloadTooLarge,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        400..=499 => ErrorCode::InvalidField,
        _ => return ApiError::internal(error),
    };
    let message = match code {
        ErrorCode::PayloadTooLarge => format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ErrorCode::NotFound => "no such resource".to_string(),
        ErrorCode::MethodNotAllowed => "this method is not allowed on this resource".to_string(),
        _ => error.to_string(),
    };
    ApiError::new(code, message)
}

/// The `api-version` query parameter must be present (any value is accepted, spec §1.2).
pub fn require_api_version(req: &HttpRequest) -> Result<(), ApiError> {
    let present = url::form_urlencoded::parse(req.query_string().as_bytes())
        .any(|(k, v)| k.eq_ignore_ascii_case("api-version") && !v.is_empty());
    if present {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::ApiVersionMissing,
            "the api-version query parameter is required, e.g. ?api-version=2021-10-01",
        ))
    }
}

/// Authenticates the caller and checks `needed`. Also requires `api-version`.
pub async fn authorize(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    needed: Rights,
) -> Result<Caller, ApiError> {
    if !state.settings.service.role.runs_dps() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this instance runs only the hub (--role hub)",
        ));
    }
    require_api_version(req)?;
    if let Some(caller) = console::caller(req, state).await? {
        caller.require(needed)?;
        return Ok(caller);
    }
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match auth::parse_authorization(header)? {
        Credential::Bearer(token) => {
            let secret = crate::db::blocking(&state.store, |store| {
                store.setting_get(crate::bootstrap::TOKEN_SECRET_KEY)
            })
            .await?
            .ok_or_else(|| ApiError::internal("the token secret is missing"))?;
            auth::verify_token(
                &token,
                &secret,
                &state.instance.id_scope,
                crate::time::now_unix(),
            )?
        }
        Credential::Sas(token) => {
            let name = token.skn.clone().unwrap_or_default();
            let doc = crate::db::blocking(&state.store, move |store| {
                store.get(Collection::AuthorizationPolicies, &name)
            })
            .await?;
            let policy = doc
                .map(|d| crate::bootstrap::policy_from_doc(d.body))
                .transpose()
                .map_err(ApiError::internal)?;
            auth::verify_sas(
                &token,
                policy.as_ref(),
                &state.settings.service.hostnames,
                req.path(),
                crate::time::now_unix(),
            )?
        }
    };
    caller.require(needed)?;
    tracing::debug!(principal = %caller.principal, "authorized");
    Ok(caller)
}

/// Parses a request body as JSON; an empty body is `None`.
pub fn json_body(bytes: &[u8]) -> Result<Option<serde_json::Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {e}")))
}

/// A required JSON body parsed into `T`; a bad field is named in the error.
pub fn required_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = json_body(bytes)?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidJson, "the body is empty"))?;
    parse_typed(value)
}

/// Parses JSON text into a typed value; a type error names the JSON path of the field.
pub fn parse_typed<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ApiError::field(ErrorCode::InvalidField, path, e.into_inner())
    })
}

/// PUT semantics shared by every resource: without `If-Match` a PUT creates (and collides with
/// an existing entry); with it, it replaces the entry whose etag matches (`*`: any).
pub fn write_mode(headers: &HeaderMap) -> Result<Write, ApiError> {
    Ok(match if_match(headers)? {
        None => Write::Create,
        Some(etag) => Write::IfMatch(etag),
    })
}

/// The stored document's etag and timestamps, added to its JSON for the API.
pub fn with_metadata(doc: &Document, mut body: serde_json::Value) -> serde_json::Value {
    if let Some(map) = body.as_object_mut() {
        map.insert("etag".into(), serde_json::Value::String(doc.etag.clone()));
        map.entry("createdDateTimeUtc")
            .or_insert_with(|| serde_json::Value::String(crate::time::rfc3339(doc.created_at)));
        map.insert(
            "lastUpdatedDateTimeUtc".into(),
            serde_json::Value::String(crate::time::rfc3339(doc.updated_at)),
        );
    }
    body
}

/// `If-Match`, if sent.
pub fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(actix_web::http::header::IF_MATCH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim().to_string()))
            .map_err(|_| ApiError::new(ErrorCode::InvalidHeader, "If-Match is not ASCII")),
    }
}

/// Page size and continuation from `x-ms-max-item-count` / `x-ms-continuation`.
pub fn paging(headers: &HeaderMap) -> Result<(usize, Option<String>), ApiError> {
    let size = match headers.get("x-ms-max-item-count") {
        None => DEFAULT_PAGE,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidHeader,
                    format!("x-ms-max-item-count must be a number from 1 to {MAX_PAGE}"),
                )
            })?,
    };
    let continuation = match headers.get("x-ms-continuation") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::InvalidContinuationToken,
                        "x-ms-continuation is not ASCII",
                    )
                })?
                .to_string(),
        )
        .filter(|c| !c.is_empty()),
    };
    Ok((size, continuation))
}

/// A 200 JSON response for a page of items, with the paging headers.
pub fn page_response(
    items: Vec<serde_json::Value>,
    continuation: Option<String>,
    page_size: usize,
    item_type: &str,
) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.insert_header(("x-ms-max-item-count", page_size.to_string()));
    response.insert_header(("x-ms-item-type", item_type));
    if let Some(token) = continuation {
        response.insert_header(("x-ms-continuation", token));
    }
    response.json(items)
}

/// The client certificates presented on this connection (none when the client sent none).
pub fn peer_certificates(req: &HttpRequest) -> Option<PeerCertificates> {
    req.conn_data::<PeerCertificates>().cloned()
}
