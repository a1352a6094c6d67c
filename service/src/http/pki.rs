//! Certificates issued by this service, their revocation and the audit trail (management API),
//! and the revocation status endpoints relying parties use without credentials: `GET /crl`
//! and the OCSP responder (`POST /ocsp`, `GET /ocsp/{request}`, RFC 6960 appendix A).

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde_json::{Value, json};
use zerotouch_certs::revocation::ReasonCode;

use crate::auth::{Caller, Rights};
use crate::db::{Collection, Document};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, authorize, json_body, page_response, paging, with_metadata};
use crate::pki::Pki;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::ISSUED_CERTIFICATES).route(web::get().to(list_issued)))
        .service(web::resource(routes::ISSUED_CERTIFICATE_REVOKE).route(web::post().to(revoke)))
        .service(web::resource(routes::ISSUED_CERTIFICATE).route(web::get().to(get_issued)))
        .service(
            web::resource(routes::REGISTRATION_REVOKE).route(web::post().to(revoke_registration)),
        )
        .service(web::resource(routes::GROUP_REVOKE).route(web::post().to(revoke_group)))
        .service(web::resource(routes::AUDIT).route(web::get().to(list_audit)))
        .service(web::resource(routes::CRL).route(web::get().to(crl)))
        .service(web::resource(routes::OCSP).route(web::post().to(ocsp_post)))
        .service(web::resource(routes::OCSP_GET).route(web::get().to(ocsp_get)));
}

/// The process's PKI (registered as app data by `server::start`).
pub fn pki_of(req: &HttpRequest) -> Result<web::Data<Pki>, ApiError> {
    req.app_data::<web::Data<Pki>>()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "this instance runs no PKI"))
}

/// Revoking needs ServiceConfig or EnrollmentWrite.
async fn authorize_revoke(
    req: &HttpRequest,
    state: &web::Data<AppState>,
) -> Result<Caller, ApiError> {
    let caller = authorize(req, state, Rights::default()).await?;
    if caller.rights.contains(Rights::SERVICE_CONFIG)
        || caller.rights.contains(Rights::ENROLLMENT_WRITE)
    {
        Ok(caller)
    } else {
        Err(ApiError::new(
            ErrorCode::InsufficientRights,
            "revoking certificates needs the right ServiceConfig or EnrollmentWrite",
        ))
    }
}

/// `{"reason": "keyCompromise"}`; no body (or no `reason`) is `unspecified`.
fn reason_of(body: &[u8]) -> Result<ReasonCode, ApiError> {
    let Some(body) = json_body(body)? else {
        return Ok(ReasonCode::Unspecified);
    };
    if !body.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the body must be a JSON object",
        ));
    }
    match body.get("reason") {
        None | Some(Value::Null) => Ok(ReasonCode::Unspecified),
        Some(Value::String(name)) => name.parse().map_err(|e| {
            ApiError::field(
                ErrorCode::InvalidField,
                "reason",
                format!("{e}; use an RFC 5280 name such as keyCompromise or superseded"),
            )
        }),
        Some(_) => Err(ApiError::field(
            ErrorCode::InvalidField,
            "reason",
            "must be a string",
        )),
    }
}

fn record_view(doc: &Document) -> Value {
    let mut body = doc.body.clone();
    if let Some(map) = body.as_object_mut() {
        for field in ["notBefore", "notAfter", "revokedAt"] {
            if let Some(unix) = map.get(field).and_then(Value::as_u64) {
                map.insert(
                    format!("{field}Utc"),
                    Value::String(crate::time::rfc3339_of_unix(unix)),
                );
            }
        }
    }
    with_metadata(doc, body)
}

#[utoipa::path(
    post,
    path = routes::ISSUED_CERTIFICATE_REVOKE,
    operation_id = "revokeCertificate",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, ("serial" = String, Path, description = "The certificate serial, hex")),
    request_body(content = Option<crate::http::openapi::RevokeRequest>, content_type = "application/json", description = "Optional: the reason"),
    responses((status = 200, description = "The certificate's record, now revoked", body = crate::http::openapi::IssuedCertificate), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn revoke(
    req: HttpRequest,
    state: web::Data<AppState>,
    serial: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = authorize_revoke(&req, &state).await?;
    let reason = reason_of(&body)?;
    let pki = pki_of(&req)?;
    let record = pki.revoke(&serial, reason, &caller.principal).await?;
    Ok(HttpResponse::Ok().json(record))
}

#[utoipa::path(
    post,
    path = routes::REGISTRATION_REVOKE,
    operation_id = "revokeRegistrationCertificates",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id")),
    request_body(content = Option<crate::http::openapi::RevokeRequest>, content_type = "application/json", description = "Optional: the reason"),
    responses((status = 200, description = "How many certificates were revoked", body = crate::http::openapi::Revoked), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn revoke_registration(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = authorize_revoke(&req, &state).await?;
    let reason = reason_of(&body)?;
    let pki = pki_of(&req)?;
    let revoked = pki
        .revoke_all(Some(id.into_inner()), None, reason, &caller.principal)
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "revoked": revoked })))
}

#[utoipa::path(
    post,
    path = routes::GROUP_REVOKE,
    operation_id = "revokeGroupCertificates",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The enrollment group id")),
    request_body(content = Option<crate::http::openapi::RevokeRequest>, content_type = "application/json", description = "Optional: the reason"),
    responses((status = 200, description = "How many certificates were revoked", body = crate::http::openapi::Revoked), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn revoke_group(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = authorize_revoke(&req, &state).await?;
    let reason = reason_of(&body)?;
    let pki = pki_of(&req)?;
    let group = id.into_inner();
    let exists = {
        let group = group.clone();
        crate::db::blocking(&state.store, move |s| {
            s.get(Collection::EnrollmentGroups, &group)
        })
        .await?
    };
    if exists.is_none() {
        return Err(ApiError::new(
            ErrorCode::EnrollmentGroupNotFound,
            "no enrollment group with this id",
        ));
    }
    let revoked = pki
        .revoke_all(None, Some(group), reason, &caller.principal)
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "revoked": revoked })))
}

#[utoipa::path(
    get,
    path = routes::ISSUED_CERTIFICATE,
    operation_id = "getIssuedCertificate",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, ("serial" = String, Path, description = "The certificate serial, hex")),
    responses((status = 200, description = "The certificate's record", body = crate::http::openapi::IssuedCertificate), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get_issued(
    req: HttpRequest,
    state: web::Data<AppState>,
    serial: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let key = crate::pki::serial_key(&serial).ok_or_else(|| {
        ApiError::field(
            ErrorCode::InvalidField,
            "serial",
            "is not a hex serial number",
        )
    })?;
    let doc = crate::db::blocking(&state.store, move |s| {
        s.get(Collection::IssuedCertificates, &key)
    })
    .await?
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::CertificateNotIssuedHere,
            "no certificate with this serial was issued by this service",
        )
    })?;
    Ok(HttpResponse::Ok().json(record_view(&doc)))
}

/// Query filters of the two lists; each is compared case-insensitively.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filters {
    registration_id: Option<String>,
    serial: Option<String>,
    action: Option<String>,
    status: Option<String>,
    #[serde(rename = "api-version")]
    _api_version: Option<String>,
}

fn filters(req: &HttpRequest) -> Result<Filters, ApiError> {
    let filters: Filters = web::Query::<Filters>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("query: {e}")))?;
    if let Some(action) = &filters.action
        && !["issue", "renew", "revoke"].contains(&action.as_str())
    {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "action",
            "must be issue, renew or revoke",
        ));
    }
    if let Some(status) = &filters.status
        && !["good", "revoked"].contains(&status.as_str())
    {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "status",
            "must be good or revoked",
        ));
    }
    Ok(filters)
}

fn field_is(doc: &Document, field: &str, wanted: Option<&str>) -> bool {
    match wanted {
        None => true,
        Some(wanted) => doc
            .body
            .get(field)
            .and_then(Value::as_str)
            .is_some_and(|v| v.eq_ignore_ascii_case(wanted)),
    }
}

/// `GET /certificates/issued?registrationId=&status=`: paged like the other lists (a page may
/// hold fewer items than asked when filters drop some; follow `x-ms-continuation`).
#[utoipa::path(
    get,
    path = routes::ISSUED_CERTIFICATES,
    operation_id = "listIssuedCertificates",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, crate::http::openapi::Paging, crate::http::openapi::IssuedFilters),
    responses((status = 200, description = "A page of certificates issued here", body = Vec<crate::http::openapi::IssuedCertificate>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn list_issued(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let filters = filters(&req)?;
    let (size, continuation) = paging(req.headers())?;
    let parent = filters.registration_id.clone();
    let page = crate::db::blocking(&state.store, move |s| {
        s.list(
            Collection::IssuedCertificates,
            parent.as_deref(),
            size,
            continuation.as_deref(),
        )
    })
    .await?;
    let items = page
        .items
        .iter()
        .filter(|d| field_is(d, "status", filters.status.as_deref()))
        .map(record_view)
        .collect();
    Ok(page_response(
        items,
        page.continuation,
        size,
        "IssuedCertificate",
    ))
}

/// `GET /audit?serial=&registrationId=&action=`, oldest first.
#[utoipa::path(
    get,
    path = routes::AUDIT,
    operation_id = "listAudit",
    tag = "pki",
    params(crate::http::openapi::ApiVersion, crate::http::openapi::Paging, crate::http::openapi::AuditFilters),
    responses((status = 200, description = "A page of the issuance audit log", body = Vec<crate::http::openapi::AuditEvent>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn list_audit(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let filters = filters(&req)?;
    let serial = match &filters.serial {
        Some(serial) => Some(crate::pki::serial_key(serial).ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidField,
                "serial",
                "is not a hex serial number",
            )
        })?),
        None => None,
    };
    let (size, continuation) = paging(req.headers())?;
    let parent = filters.registration_id.clone();
    let page = crate::db::blocking(&state.store, move |s| {
        s.list(
            Collection::AuditEvents,
            parent.as_deref(),
            size,
            continuation.as_deref(),
        )
    })
    .await?;
    let items = page
        .items
        .iter()
        .filter(|d| field_is(d, "serial", serial.as_deref()))
        .filter(|d| field_is(d, "action", filters.action.as_deref()))
        .map(|d| d.body.clone())
        .collect();
    Ok(page_response(items, page.continuation, size, "AuditEvent"))
}

/// `GET /crl`: DER (`application/pkix-crl`), or PEM with `?format=pem`.
#[utoipa::path(
    get,
    path = routes::CRL,
    operation_id = "crl",
    tag = "pki",
    params(crate::http::openapi::CrlFormat),
    responses((status = 200, description = "The CRL: DER, or PEM with `format=pem`", content((String = "application/pkix-crl"), (String = "application/x-pem-file"))), crate::http::openapi::PublicErrors),
)]
async fn crl(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    let pem = url::form_urlencoded::parse(req.query_string().as_bytes())
        .any(|(k, v)| k == "format" && v.eq_ignore_ascii_case("pem"));
    let der = pki.crl(false).await?;
    if pem {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let mut text = String::from("-----BEGIN X509 CRL-----\n");
        for line in b64.as_bytes().chunks(64) {
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        text.push_str("-----END X509 CRL-----\n");
        return Ok(HttpResponse::Ok()
            .content_type("application/x-pem-file")
            .body(text));
    }
    Ok(HttpResponse::Ok()
        .content_type("application/pkix-crl")
        .body(der))
}

fn ocsp_response(der: Vec<u8>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/ocsp-response")
        .insert_header(("cache-control", "no-cache"))
        .body(der)
}

/// `POST /ocsp` with an `application/ocsp-request` body.
#[utoipa::path(
    post,
    path = routes::OCSP,
    operation_id = "ocsp",
    tag = "pki",
    request_body(content = crate::http::openapi::Bytes, content_type = "application/ocsp-request", description = "A DER OCSP request"),
    responses((status = 200, description = "The OCSP response (`malformedRequest` for a bad request)", content_type = "application/ocsp-response", body = crate::http::openapi::Bytes), crate::http::openapi::PublicErrors),
)]
async fn ocsp_post(req: HttpRequest, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    Ok(ocsp_response(pki.ocsp(&body).await))
}

/// `GET /ocsp/{url-encoded base64 of the DER request}`.
#[utoipa::path(
    get,
    path = routes::OCSP_GET,
    operation_id = "ocspGet",
    tag = "pki",
    params(("request" = String, Path, description = "The DER OCSP request, base64 and URL-encoded")),
    responses((status = 200, description = "The OCSP response (`malformedRequest` for a bad request)", content_type = "application/ocsp-response", body = crate::http::openapi::Bytes), crate::http::openapi::PublicErrors),
)]
async fn ocsp_get(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    let raw = req.uri().path().strip_prefix("/ocsp/").unwrap_or_default();
    let decoded: String = percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let lenient = |alphabet: &base64::alphabet::Alphabet| {
        base64::engine::GeneralPurpose::new(
            alphabet,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        )
        .decode(decoded.as_bytes())
    };
    let request = lenient(&base64::alphabet::STANDARD)
        .or_else(|_| lenient(&base64::alphabet::URL_SAFE))
        .unwrap_or_default();
    // Undecodable base64 is an empty request: `malformedRequest`.
    Ok(ocsp_response(pki.ocsp(&request).await))
}
