//! The DPS device API over HTTPS (dps-protocol §1): register, operation status, status lookup.
//! Devices authenticate with a SAS token (`Authorization`) or their TLS client certificate.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;
use zerotouch_attestation::symmetric_key::SasToken;

use crate::dps::{Dps, Evidence, Presented, Progress, RegisterBody, RegistrationStatus};
use crate::http::routes;

/// How long a register over HTTPS waits for its outcome before answering 202 anyway.
const HTTPS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
use crate::http::error::{ApiError, ErrorCode};
use crate::http::{AppState, json_body, peer_certificates, require_api_version};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::DPS_REGISTER).route(web::put().to(register)))
        .service(web::resource(routes::DPS_OPERATION).route(web::get().to(operation)))
        .service(web::resource(routes::DPS_STATUS).route(web::post().to(status)));
}

fn dps_of<'a>(
    state: &'a web::Data<AppState>,
    id_scope: &str,
) -> Result<&'a std::sync::Arc<Dps>, ApiError> {
    let dps = state
        .dps
        .as_ref()
        .filter(|_| state.settings.service.role.runs_dps())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                "this instance runs no provisioning service",
            )
        })?;
    if !dps.id_scope.eq_ignore_ascii_case(id_scope) {
        return Err(ApiError::new(ErrorCode::NotFound, "unknown ID scope"));
    }
    Ok(dps)
}

fn evidence(req: &HttpRequest) -> Result<Evidence, ApiError> {
    if let Some(header) = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return SasToken::parse(header).map(Evidence::Sas).map_err(|e| {
            ApiError::new(ErrorCode::Unauthorized, format!("malformed SAS token: {e}"))
        });
    }
    peer_certificates(req)
        .map(Evidence::Certificate)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send a SAS token in Authorization, or a client certificate",
            )
        })
}

fn body_of(bytes: &[u8]) -> Result<RegisterBody, ApiError> {
    match json_body(bytes)? {
        None | Some(Value::Null) => Ok(RegisterBody::default()),
        Some(value) => crate::http::parse_typed(value),
    }
}

fn json(status: actix_web::http::StatusCode, body: Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json; charset=utf-8")
        .body(body.to_string())
}

#[utoipa::path(
    put,
    path = routes::DPS_REGISTER,
    operation_id = "registerDevice",
    tag = "device",
    params(crate::http::openapi::ApiVersion, ("id_scope" = String, Path, description = "The ID scope"), ("registration_id" = String, Path, description = "The registration id")),
    request_body(content = Option<crate::http::openapi::DeviceRegistration>, content_type = "application/json"),
    responses((status = 200, description = "Registered (within a few seconds)", body = crate::http::openapi::RegistrationOperation), (status = 202, description = "Registering: poll the operation", body = crate::http::openapi::RegistrationOperation), crate::http::openapi::DeviceErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn register(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (id_scope, registration_id) = path.into_inner();
    require_api_version(&req)?;
    let dps = dps_of(&state, &id_scope)?;
    let mut body = body_of(&body)?;
    body.source_address = req.peer_addr().map(|a| a.ip());
    // A TPM device's first register carries no Authorization: answer the challenge.
    if let Some(tpm) = &body.tpm
        && req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .is_none()
    {
        let challenge = dps.tpm_challenge(&registration_id, tpm).await?;
        return Ok(json(actix_web::http::StatusCode::UNAUTHORIZED, challenge));
    }
    // Wait a while for the outcome so that bad requests (a CSR with the wrong CN…) come back as
    // 4xx here; the answer to a good one is 202 either way, and the device polls.
    let evidence = evidence(&req)?;
    let presented = Presented::of(&evidence);
    let progress = dps
        .begin(&registration_id, evidence, body, HTTPS_WAIT)
        .await?;
    let operation_id = match progress {
        Progress::Done(outcome) if outcome.status != RegistrationStatus::Assigned => {
            // `disabled` and `failed` are final at once.
            return Ok(json(actix_web::http::StatusCode::OK, outcome.body()));
        }
        Progress::Done(outcome) => {
            let operation_id = outcome.operation_id.clone();
            dps.keep_for_poll(&registration_id, presented, outcome);
            operation_id
        }
        Progress::Running { operation_id } => operation_id,
    };
    // Registration is an operation: 202 `assigning` (iot-identity-service rejects 200), the
    // final state on a poll.
    let mut response = json(
        actix_web::http::StatusCode::ACCEPTED,
        serde_json::json!({"operationId": operation_id, "status": "assigning"}),
    );
    response.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("retry-after"),
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    Ok(response)
}

#[utoipa::path(
    get,
    path = routes::DPS_OPERATION,
    operation_id = "operationStatus",
    tag = "device",
    params(crate::http::openapi::ApiVersion, ("id_scope" = String, Path, description = "The ID scope"), ("registration_id" = String, Path, description = "The registration id"), ("operation_id" = String, Path, description = "The operation id of the register")),
    responses((status = 200, description = "The operation's state", body = crate::http::openapi::RegistrationOperation), (status = 202, description = "Still registering", body = crate::http::openapi::RegistrationOperation), crate::http::openapi::DeviceErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn operation(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id_scope, registration_id, operation_id) = path.into_inner();
    require_api_version(&req)?;
    let dps = dps_of(&state, &id_scope)?;
    let outcome = dps
        .operation(&registration_id, &evidence(&req)?, &operation_id)
        .await?;
    if outcome.status == RegistrationStatus::Assigning {
        let mut response = json(actix_web::http::StatusCode::ACCEPTED, outcome.body());
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("retry-after"),
            actix_web::http::header::HeaderValue::from_static("1"),
        );
        return Ok(response);
    }
    Ok(json(actix_web::http::StatusCode::OK, outcome.body()))
}

#[utoipa::path(
    post,
    path = routes::DPS_STATUS,
    operation_id = "deviceRegistrationStatus",
    tag = "device",
    params(crate::http::openapi::ApiVersion, ("id_scope" = String, Path, description = "The ID scope"), ("registration_id" = String, Path, description = "The registration id")),
    request_body(content = Option<crate::http::openapi::DeviceRegistration>, content_type = "application/json"),
    responses((status = 200, description = "The device's registration state", body = crate::http::openapi::RegistrationState), crate::http::openapi::DeviceErrors),
    security(("deviceSharedAccessSignature" = []), ("x509" = [])),
)]
async fn status(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (id_scope, registration_id) = path.into_inner();
    require_api_version(&req)?;
    let dps = dps_of(&state, &id_scope)?;
    if body_of(&body)?.csr.is_some() {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "csr",
            "is not allowed on a status lookup",
        ));
    }
    let state_json = dps.status(&registration_id, &evidence(&req)?).await?;
    Ok(json(actix_web::http::StatusCode::OK, state_json))
}
