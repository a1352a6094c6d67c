//! EST (RFC 7030) under `/.well-known/est/`: `cacerts`, `csrattrs`, `simpleenroll` and
//! `simplereenroll`. Bodies are base64 (`Content-Transfer-Encoding: base64`); certificates go
//! out as certs-only PKCS#7.
//!
//! - `simpleenroll` admits a device that DPS would admit: a TLS client certificate that
//!   attests against an X.509 enrollment (the same `Dps::authenticate`, revocation check
//!   included), or, for a symmetric-key device that has registered, HTTP Basic
//!   (`registrationId:deviceKeyOrSasToken`) or `Authorization: SharedAccessSignature …`.
//!   The CSR's CN must be the registration id.
//! - `simplereenroll` admits the holder of a current, unrevoked certificate issued here (TLS
//!   client certificate); the CSR keeps its subject, and the enrollment's `renewalPolicy` (or
//!   the default policy) decides whether it is time (`pki::check_renewal`).
//! - Labels (`/.well-known/est/{label}/…`) are accepted and ignored: there is one profile.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key::{self, SasToken};
use zerotouch_attestation::{AttestedIdentity, EnrollmentRef, Mechanism};
use zerotouch_certs::est;
use zerotouch_certs::renewal;

use crate::db::Collection;
use crate::dps::{Attestation, Evidence};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::pki::pki_of;
use crate::http::routes;
use crate::http::{AppState, peer_certificates};
use crate::pki::{Action, Pki};

const CERTS_ONLY: &str = "application/pkcs7-mime; smime-type=certs-only";

pub fn configure(cfg: &mut web::ServiceConfig) {
    let paths = [
        [
            routes::EST_CACERTS,
            routes::EST_CSRATTRS,
            routes::EST_SIMPLEENROLL,
            routes::EST_SIMPLEREENROLL,
        ],
        [
            routes::EST_LABEL_CACERTS,
            routes::EST_LABEL_CSRATTRS,
            routes::EST_LABEL_SIMPLEENROLL,
            routes::EST_LABEL_SIMPLEREENROLL,
        ],
    ];
    for [ca, attributes, enroll, reenroll] in paths {
        cfg.service(web::resource(ca).route(web::get().to(cacerts)))
            .service(web::resource(attributes).route(web::get().to(csrattrs)))
            .service(web::resource(enroll).route(web::post().to(simpleenroll)))
            .service(web::resource(reenroll).route(web::post().to(simplereenroll)));
    }
}

fn certs_only(certificates: &[Vec<u8>]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(CERTS_ONLY)
        .insert_header(("content-transfer-encoding", "base64"))
        .body(est::certs_only_body(certificates))
}

/// The operations of the labelled routes, which share the handlers with the plain ones.
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_label_cacerts;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_label_csrattrs;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_label_simpleenroll;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_label_simplereenroll;

#[utoipa::path(
    get,
    path = routes::EST_CACERTS,
    operation_id = "estCacerts",
    tag = "est",
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::PublicErrors),
)]
#[utoipa::path(
    get,
    path = routes::EST_LABEL_CACERTS,
    operation_id = "estCacertsLabelled",
    tag = "est",
    impl_for = __path_label_cacerts,
    params(("label" = String, Path, description = "Accepted and ignored: there is one profile")),
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::PublicErrors),
)]
async fn cacerts(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    Ok(certs_only(pki.ca_chain_der()))
}

#[utoipa::path(
    get,
    path = routes::EST_CSRATTRS,
    operation_id = "estCsrattrs",
    tag = "est",
    responses((status = 200, description = "CSR attributes, base64 DER", content_type = "application/csrattrs", body = String), (status = 204, description = "No attributes are asked for"), crate::http::openapi::PublicErrors),
)]
#[utoipa::path(
    get,
    path = routes::EST_LABEL_CSRATTRS,
    operation_id = "estCsrattrsLabelled",
    tag = "est",
    impl_for = __path_label_csrattrs,
    params(("label" = String, Path, description = "Accepted and ignored: there is one profile")),
    responses((status = 200, description = "CSR attributes, base64 DER", content_type = "application/csrattrs", body = String), (status = 204, description = "No attributes are asked for"), crate::http::openapi::PublicErrors),
)]
async fn csrattrs() -> HttpResponse {
    if est::DEFAULT_CSR_ATTRIBUTES.is_empty() {
        return HttpResponse::NoContent().finish();
    }
    HttpResponse::Ok()
        .content_type("application/csrattrs")
        .insert_header(("content-transfer-encoding", "base64"))
        .body(est::csrattrs_body(est::DEFAULT_CSR_ATTRIBUTES))
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

fn csr_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidCsr, format!("the CSR is refused: {e}"))
}

/// The CSR's single CN, if it has one.
fn csr_common_name(csr_der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der).ok()?;
    let mut names = csr.certification_request_info.subject.iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_string();
    names.next().is_none().then_some(cn)
}

/// Who is enrolling: the registration id and what they present.
fn enrollment_evidence(
    req: &HttpRequest,
    id_scope: &str,
    csr_der: &[u8],
) -> Result<(String, Evidence), ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(header) = header {
        if let Some(basic) = header.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| unauthorized("malformed Basic credentials"))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| unauthorized("malformed Basic credentials"))?;
            let token = if secret.starts_with("SharedAccessSignature ") {
                secret.to_string()
            } else {
                // The device key itself: sign a short-lived token with it and attest that.
                symmetric_key::sign(
                    &symmetric_key::registration_resource(id_scope, id),
                    secret,
                    crate::time::now_unix() + 60,
                    None,
                )
                .map_err(|_| unauthorized("the Basic password is neither a SAS token nor a key"))?
            };
            let token = SasToken::parse(&token)
                .map_err(|e| unauthorized(format!("malformed SAS token: {e}")))?;
            return Ok((id.to_string(), Evidence::Sas(token)));
        }
        let token = SasToken::parse(header)
            .map_err(|e| unauthorized(format!("malformed SAS token: {e}")))?;
        let id = csr_common_name(csr_der)
            .ok_or_else(|| csr_error("the subject must have exactly one CN"))?;
        return Ok((id, Evidence::Sas(token)));
    }
    let peer = peer_certificates(req).ok_or_else(|| {
        unauthorized("present a TLS client certificate, HTTP Basic or a SAS token")
    })?;
    let id = crate::pki::leaf_identity(&peer.leaf)
        .and_then(|_| zerotouch_attestation::x509::Certificate::from_der(&peer.leaf).ok())
        .and_then(|c| c.common_name().map(String::from))
        .ok_or_else(|| unauthorized("the client certificate has no CN"))?;
    Ok((id, Evidence::Certificate(peer)))
}

#[utoipa::path(
    post,
    path = routes::EST_SIMPLEENROLL,
    operation_id = "estSimpleenroll",
    tag = "est",
    request_body(content = String, content_type = "application/pkcs10", description = "A PKCS#10 CSR, base64 DER; its CN is the registration id"),
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::DeviceErrors),
    security(("deviceSharedAccessSignature" = []), ("estBasic" = []), ("x509" = [])),
)]
#[utoipa::path(
    post,
    path = routes::EST_LABEL_SIMPLEENROLL,
    operation_id = "estSimpleenrollLabelled",
    tag = "est",
    impl_for = __path_label_simpleenroll,
    params(("label" = String, Path, description = "Accepted and ignored: there is one profile")),
    request_body(content = String, content_type = "application/pkcs10", description = "A PKCS#10 CSR, base64 DER; its CN is the registration id"),
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::DeviceErrors),
    security(("deviceSharedAccessSignature" = []), ("estBasic" = []), ("x509" = [])),
)]
async fn simpleenroll(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    let dps = state
        .dps
        .clone()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "this instance runs no DPS"))?;
    let csr = est::decode_csr_body(&body).map_err(csr_error)?;
    let (registration_id, evidence) = enrollment_evidence(&req, &dps.id_scope, &csr)?;
    let (attested, _enrollment) = match dps.authenticate(&registration_id, &evidence).await? {
        Attestation::Accepted(attested, enrollment) => (attested, enrollment),
        Attestation::Disabled => return Err(unauthorized("the enrollment is disabled")),
    };
    if attested.mechanism == Mechanism::Tpm {
        return Err(unauthorized("TPM devices enroll through DPS"));
    }
    if attested.mechanism == Mechanism::SymmetricKey {
        // A shared key admits only a device that has provisioned.
        let id = registration_id.clone();
        let registered =
            crate::db::blocking(&state.store, move |s| s.get(Collection::Registrations, &id))
                .await?;
        let assigned = registered
            .as_ref()
            .and_then(|d| d.body.get("status").and_then(Value::as_str))
            == Some("assigned");
        if !assigned {
            return Err(unauthorized(
                "register with the provisioning service before enrolling over EST",
            ));
        }
    }
    let leaf = issue(
        &pki,
        &state,
        &csr,
        &registration_id,
        &attested,
        Action::Issue,
        json!({"via": "est/simpleenroll"}),
    )
    .await?;
    Ok(certs_only(&[leaf]))
}

async fn issue(
    pki: &Pki,
    state: &web::Data<AppState>,
    csr: &[u8],
    registration_id: &str,
    attested: &AttestedIdentity,
    action: Action,
    detail: Value,
) -> Result<Vec<u8>, ApiError> {
    let group = match &attested.matched {
        EnrollmentRef::Group(group) => Some(group.clone()),
        EnrollmentRef::Individual(_) => None,
    };
    sign_and_record(
        pki,
        state,
        csr,
        registration_id,
        group.as_deref(),
        action,
        detail,
    )
    .await
}

async fn sign_and_record(
    pki: &Pki,
    state: &web::Data<AppState>,
    csr: &[u8],
    registration_id: &str,
    group: Option<&str>,
    action: Action,
    detail: Value,
) -> Result<Vec<u8>, ApiError> {
    let issued = pki
        .issue(crate::pki::Issue {
            csr_der: csr,
            registration_id,
            group,
            validity_days: state.settings.dps.certificate_validity_days,
            actor: format!("est:{registration_id}"),
            action,
            detail,
        })
        .await?;
    Ok(issued.certificate_der)
}

#[utoipa::path(
    post,
    path = routes::EST_SIMPLEREENROLL,
    operation_id = "estSimplereenroll",
    tag = "est",
    request_body(content = String, content_type = "application/pkcs10", description = "A PKCS#10 CSR, base64 DER; its CN is the registration id"),
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::DeviceErrors),
    security(("x509" = [])),
)]
#[utoipa::path(
    post,
    path = routes::EST_LABEL_SIMPLEREENROLL,
    operation_id = "estSimplereenrollLabelled",
    tag = "est",
    impl_for = __path_label_simplereenroll,
    params(("label" = String, Path, description = "Accepted and ignored: there is one profile")),
    request_body(content = String, content_type = "application/pkcs10", description = "A PKCS#10 CSR, base64 DER; its CN is the registration id"),
    responses((status = 200, description = "Certificates, certs-only PKCS#7 in base64", content_type = "application/pkcs7-mime", body = String), crate::http::openapi::DeviceErrors),
    security(("x509" = [])),
)]
async fn simplereenroll(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let pki = pki_of(&req)?;
    let peer = peer_certificates(&req).ok_or_else(|| {
        unauthorized("re-enrollment needs the current certificate as TLS client certificate")
    })?;
    let identity = crate::pki::leaf_identity(&peer.leaf)
        .ok_or_else(|| unauthorized("the client certificate does not parse"))?;
    // The rule DPS and the hub apply too: a server-only certificate (such as a joined hub's
    // TLS certificate, issued by the same CA) renews nothing.
    let client_auth = zerotouch_attestation::x509::Certificate::from_der(&peer.leaf)
        .is_ok_and(|leaf| leaf.allows_client_auth());
    if !client_auth {
        return Err(unauthorized(
            "the client certificate's extended key usage does not allow client authentication",
        ));
    }
    let ours = pki
        .instance()
        .ca
        .is_issuer_of(&peer.leaf_pem())
        .unwrap_or(false);
    if !ours {
        return Err(unauthorized(
            "the client certificate was not issued by this service",
        ));
    }
    let serial = identity.serial.clone();
    let record = crate::db::blocking(&state.store, move |s| {
        s.get(Collection::IssuedCertificates, &serial)
    })
    .await?
    .ok_or_else(|| unauthorized("the client certificate was not issued by this service"))?
    .body;
    if record.get("status").and_then(Value::as_str) == Some("revoked") {
        return Err(ApiError::new(
            ErrorCode::CertificateRevoked,
            format!(
                "the client certificate (serial {}) has been revoked",
                identity.serial
            ),
        ));
    }
    let registration_id = record
        .get("registrationId")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::internal("an issued-certificate record without registrationId"))?
        .to_string();
    let group = record
        .get("enrollmentGroupId")
        .and_then(Value::as_str)
        .map(String::from);

    let csr = est::decode_csr_body(&body).map_err(csr_error)?;
    match renewal::same_subject(&peer.leaf, &csr) {
        Ok(true) => {}
        Ok(false) => {
            return Err(ApiError::new(
                ErrorCode::CsrSubjectMismatch,
                format!(
                    "the CSR's subject must be the current certificate's, {}",
                    identity.subject
                ),
            ));
        }
        Err(e) => return Err(csr_error(e)),
    }

    // The enrollment must still admit the device; its renewalPolicy decides the window.
    let (collection, enrollment_id) = match &group {
        Some(group) => (Collection::EnrollmentGroups, group.clone()),
        None => (Collection::IndividualEnrollments, registration_id.clone()),
    };
    let enrollment = crate::db::blocking(&state.store, move |s| s.get(collection, &enrollment_id))
        .await?
        .ok_or_else(|| unauthorized("the enrollment of this certificate no longer exists"))?;
    let enrollment = crate::enrollment::Enrollment::from_document(&enrollment)?;
    if !enrollment.enabled() {
        return Err(unauthorized("the enrollment is disabled"));
    }
    crate::pki::check_renewal(
        enrollment.renewal_policy,
        identity.not_before,
        identity.not_after,
        crate::time::now_unix() as i64,
    )?;
    let leaf = sign_and_record(
        &pki,
        &state,
        &csr,
        &registration_id,
        group.as_deref(),
        Action::Renew,
        json!({"via": "est/simplereenroll", "previousSerial": identity.serial}),
    )
    .await?;
    Ok(certs_only(&[leaf]))
}
