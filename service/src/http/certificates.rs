//! CA certificates with proof of possession (spec §4.7, §5.6), at `/certificates`.
//!
//! In Azure these live in the ARM API; here they are part of the service API with the same JSON
//! shape (`{"name","etag","properties":{…}}`). Upload, then `generateVerificationCode`, then
//! `verify` with a certificate whose CN is the code, signed by the CA's key. Only verified CAs may
//! authenticate group devices (`caReferences`). Every call needs the `ServiceConfig` right.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use zerotouch_attestation::x509;

use crate::auth::Rights;
use crate::db::{Collection, Document, Write};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, authorize, if_match, required_body, write_mode};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::CERTIFICATES).route(web::get().to(list)))
        .service(
            web::resource(routes::CERTIFICATE_VERIFICATION_CODE)
                .route(web::post().to(generate_verification_code)),
        )
        .service(web::resource(routes::CERTIFICATE_VERIFY).route(web::post().to(verify)))
        .service(
            web::resource(routes::CERTIFICATE)
                .route(web::get().to(get))
                .route(web::put().to(put))
                .route(web::delete().to(delete)),
        );
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            ErrorCode::InvalidField,
            "name",
            "must be 1 to 256 of A-Z a-z 0-9 - . _",
        ))
    }
}

/// The API view. `certificate` is public; the verification code is shown while pending.
fn view(doc: &Document) -> Value {
    let b = &doc.body;
    let mut properties = json!({
        "subject": b.get("subject"),
        "expiry": b.get("expiry"),
        "thumbprint": b.get("thumbprint"),
        "sha256Thumbprint": b.get("sha256Thumbprint"),
        "isVerified": b.get("isVerified").and_then(Value::as_bool).unwrap_or(false),
        "created": crate::time::rfc3339(doc.created_at),
        "updated": crate::time::rfc3339(doc.updated_at),
        "certificate": b.get("certificate"),
    });
    if let Some(code) = b.get("verificationCode").filter(|c| !c.is_null()) {
        properties["verificationCode"] = code.clone();
    }
    json!({
        "name": doc.id,
        "etag": doc.etag,
        "type": "Microsoft.Devices/ProvisioningServices/Certificates",
        "properties": properties,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadProperties {
    certificate: Option<String>,
    is_verified: Option<bool>,
}

#[derive(Deserialize)]
struct Upload {
    certificate: Option<String>,
    #[serde(rename = "isVerified")]
    is_verified: Option<bool>,
    properties: Option<UploadProperties>,
}

#[utoipa::path(
    get,
    path = routes::CERTIFICATES,
    operation_id = "listCertificates",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion),
    responses((status = 200, description = "The CA certificates", body = crate::http::openapi::CertificateList), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let docs = crate::db::blocking(&state.store, |store| {
        store.list_all(Collection::CaCertificates, None)
    })
    .await?;
    let items: Vec<Value> = docs.iter().map(view).collect();
    Ok(HttpResponse::Ok().json(json!({"value": items})))
}

#[utoipa::path(
    get,
    path = routes::CERTIFICATE,
    operation_id = "getCertificate",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The CA certificate's name")),
    responses((status = 200, description = "The CA certificate", body = crate::http::openapi::CaCertificate), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let doc = load(&state, name.into_inner()).await?;
    Ok(HttpResponse::Ok().json(view(&doc)))
}

async fn load(state: &web::Data<AppState>, name: String) -> Result<Document, ApiError> {
    crate::db::blocking(&state.store, move |store| {
        store.get(Collection::CaCertificates, &name)
    })
    .await?
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::CertificateNotFound,
            "no CA certificate with this name",
        )
    })
}

#[utoipa::path(
    put,
    path = routes::CERTIFICATE,
    operation_id = "createOrUpdateCertificate",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The CA certificate's name"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::CertificateUpload, content_type = "application/json"),
    responses((status = 200, description = "The stored CA certificate", body = crate::http::openapi::CaCertificate), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    check_name(&name)?;
    let upload: Upload = required_body(&body)?;
    let (certificate, is_verified) = match upload.properties {
        Some(p) => (p.certificate, p.is_verified),
        None => (upload.certificate, upload.is_verified),
    };
    let certificate = certificate
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| {
            ApiError::field(ErrorCode::InvalidCertificate, "certificate", "is required")
        })?;
    let parsed = x509::parse_certificate(&certificate)
        .map_err(|e| ApiError::field(ErrorCode::InvalidCertificate, "certificate", e))?;
    if !parsed.is_ca() {
        return Err(ApiError::field(
            ErrorCode::InvalidCertificate,
            "certificate",
            "must be a CA certificate (basicConstraints CA:TRUE)",
        ));
    }
    let info = parsed.info();
    let stored = json!({
        "certificate": certificate.trim(),
        "subject": info.subject_name,
        "expiry": info.not_after_utc,
        "thumbprint": info.sha1_thumbprint,
        "sha256Thumbprint": info.sha256_thumbprint,
        "isVerified": is_verified.unwrap_or(false),
        "verificationCode": Value::Null,
    });
    let write = write_mode(req.headers())?;
    let doc = crate::db::blocking(&state.store, move |store| {
        store.put(Collection::CaCertificates, &name, None, &stored, write)
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::CertificateNotFound))?;
    Ok(HttpResponse::Ok().json(view(&doc)))
}

#[utoipa::path(
    delete,
    path = routes::CERTIFICATE,
    operation_id = "deleteCertificate",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The CA certificate's name"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    let etag = if_match(req.headers())?;
    let in_use = crate::db::blocking(&state.store, move |store| {
        if let Some(group) = group_referencing(store, &name)? {
            return Ok(Some(group));
        }
        store
            .delete(Collection::CaCertificates, &name, etag.as_deref())
            .map(|_| None)
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::CertificateNotFound))?;
    if let Some(group) = in_use {
        return Err(ApiError::new(
            ErrorCode::CertificateInUse,
            format!("enrollment group {group:?} references this CA certificate"),
        ));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The first enrollment group whose `caReferences` names `name`, if any.
fn group_referencing(
    store: &dyn crate::db::DocumentStore,
    name: &str,
) -> Result<Option<String>, crate::db::StoreError> {
    Ok(store
        .list_all(Collection::EnrollmentGroups, None)?
        .into_iter()
        .find(|doc| {
            // A group that cannot be read counts as using the CA: the guard fails closed.
            crate::enrollment::Enrollment::from_document(doc).map_or(true, |e| {
                e.ca_references()
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(name))
            })
        })
        .map(|doc| doc.id))
}

fn require_if_match(req: &HttpRequest) -> Result<String, ApiError> {
    if_match(req.headers())?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::IfMatchRequired,
            "this operation needs If-Match with the certificate's etag",
        )
    })
}

#[utoipa::path(
    post,
    path = routes::CERTIFICATE_VERIFICATION_CODE,
    operation_id = "generateVerificationCode",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The CA certificate's name"), crate::http::openapi::IfMatch),
    responses((status = 200, description = "The CA certificate with its verification code", body = crate::http::openapi::CaCertificate), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn generate_verification_code(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let etag = require_if_match(&req)?;
    let name = name.into_inner();
    let doc = load(&state, name.clone()).await?;
    let mut body = doc.body;
    let code: [u8; 16] = rand::random();
    body["verificationCode"] = Value::String(hex::encode_upper(code));
    let doc = crate::db::blocking(&state.store, move |store| {
        store.put(
            Collection::CaCertificates,
            &name,
            None,
            &body,
            Write::IfMatch(etag),
        )
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::CertificateNotFound))?;
    Ok(HttpResponse::Ok().json(view(&doc)))
}

#[derive(Deserialize)]
struct VerifyRequest {
    certificate: Option<String>,
}

#[utoipa::path(
    post,
    path = routes::CERTIFICATE_VERIFY,
    operation_id = "verifyCertificate",
    tag = "certificates",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The CA certificate's name"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::VerificationRequest, content_type = "application/json"),
    responses((status = 200, description = "The CA certificate, now verified", body = crate::http::openapi::CaCertificate), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn verify(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let etag = require_if_match(&req)?;
    let name = name.into_inner();
    let request: VerifyRequest = required_body(&body)?;
    let proof = request.certificate.ok_or_else(|| {
        ApiError::field(
            ErrorCode::InvalidVerificationCertificate,
            "certificate",
            "is required",
        )
    })?;
    let doc = load(&state, name.clone()).await?;
    let code = doc
        .body
        .get("verificationCode")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidVerificationCertificate,
                "no verification code is pending: call generateVerificationCode first",
            )
        })?
        .to_string();
    let stored = doc
        .body
        .get("certificate")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ca = x509::parse_certificate(stored).map_err(ApiError::internal)?;
    x509::verify_proof_of_possession(
        &ca,
        &proof,
        &code,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .map_err(|e| ApiError::field(ErrorCode::InvalidVerificationCertificate, "certificate", e))?;
    let mut body = doc.body;
    body["isVerified"] = Value::Bool(true);
    body["verificationCode"] = Value::Null;
    let doc = crate::db::blocking(&state.store, move |store| {
        store.put(
            Collection::CaCertificates,
            &name,
            None,
            &body,
            Write::IfMatch(etag),
        )
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::CertificateNotFound))?;
    Ok(HttpResponse::Ok().json(view(&doc)))
}
