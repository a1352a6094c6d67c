//! The one place that maps errors to the wire.
//!
//! Every failure a client can see has an [`ErrorCode`]: an HTTP status, a stable six-digit
//! Azure-style code (status followed by a three-digit sub-code, spec §1.7) and a name. The body is
//! the Azure error JSON; `trackingId` is the request id that also appears on every log line of the
//! request, so an operator can find the full story of an "internal error" from what a client saw.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{Map, Value, json};

use crate::db::StoreError;

/// Stable error codes. Never renumber one; add new ones at the end of their status group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body is not JSON.
    InvalidJson,
    /// A registration id breaks the id rules.
    InvalidRegistrationId,
    /// An enrollment group id breaks the id rules.
    InvalidEnrollmentGroupId,
    /// The attestation mechanism is missing, of an unknown type or incomplete.
    InvalidAttestation,
    /// An X.509 certificate does not parse or does not fit its place.
    InvalidCertificate,
    /// A symmetric key is not base64 of 16 to 64 bytes.
    InvalidSymmetricKey,
    /// A TPM endorsement or storage root key is not a supported TPM2B_PUBLIC.
    InvalidEndorsementKey,
    /// A field has a value of the wrong type or outside its range.
    InvalidField,
    /// `x-ms-continuation` was not issued by us.
    InvalidContinuationToken,
    /// The query text is not one we answer.
    InvalidQuery,
    /// A bulk request with no items or more than the limit.
    InvalidBulkOperation,
    /// The id in the body differs from the id in the path.
    IdMismatch,
    /// The proof-of-possession certificate does not prove possession.
    InvalidVerificationCertificate,
    /// The `api-version` query parameter is missing.
    ApiVersionMissing,
    /// A header or query parameter has a bad value.
    InvalidHeader,
    /// The request needs `If-Match` and has none.
    IfMatchRequired,
    /// A PKCS#10 certificate signing request is malformed, badly signed or names another
    /// subject than the one required.
    InvalidCsr,
    /// An EST re-enrollment CSR does not keep the subject of the current certificate.
    CsrSubjectMismatch,
    /// No credentials, or credentials we cannot read.
    Unauthorized,
    /// The token has expired.
    TokenExpired,
    /// The signature does not verify, or the key name is unknown.
    InvalidSignature,
    /// The token is for another audience (resource).
    InvalidAudience,
    /// The credentials are good but lack the right.
    InsufficientRights,
    /// The console session's cookie does not open, or the session has expired.
    SessionExpired,
    /// A change from a console session without the session's CSRF token.
    CsrfTokenInvalid,
    /// A certificate renewal outside the renewal window of its policy.
    RenewalNotAllowed,
    /// A hub join token that was already used once.
    JoinTokenUsed,
    /// The client certificate was issued here and has been revoked.
    CertificateRevoked,
    /// No such route.
    NotFound,
    EnrollmentNotFound,
    RegistrationNotFound,
    EnrollmentGroupNotFound,
    CertificateNotFound,
    PolicyNotFound,
    /// No linked hub with this name.
    HubNotFound,
    /// No certificate with this serial was issued by this service.
    CertificateNotIssuedHere,
    /// The resource exists but not with this HTTP method.
    MethodNotAllowed,
    /// A create collided with an existing entry (PUT without `If-Match`).
    AlreadyExists,
    /// The operation would leave the service without a policy that can manage it.
    WouldLockOut,
    /// A CA certificate still referenced by an enrollment group cannot be deleted.
    CertificateInUse,
    /// The certificate is revoked already.
    AlreadyRevoked,
    /// A group member registers under another spelling of a registration id that is
    /// registered already (ids are case-insensitive; the first spelling keeps it).
    RegistrationIdConflict,
    /// The built-in hub of a process that runs both roles cannot be drained or removed.
    HubIsBuiltIn,
    /// `If-Match` did not match the stored etag.
    PreconditionFailed,
    /// The body is larger than we accept.
    PayloadTooLarge,
    /// More requests than the service can take right now; retry after `retry-after`.
    Throttled,
    /// Something broke on our side. Details are in the log under the tracking id.
    Internal,
    /// The database cannot be reached right now; the client may retry.
    Unavailable,
    /// The service's storage is full: nothing was written; the client may retry later.
    StorageFull,
}

impl ErrorCode {
    /// Every code, for the table test and the docs.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRegistrationId,
        ErrorCode::InvalidEnrollmentGroupId,
        ErrorCode::InvalidAttestation,
        ErrorCode::InvalidCertificate,
        ErrorCode::InvalidSymmetricKey,
        ErrorCode::InvalidEndorsementKey,
        ErrorCode::InvalidField,
        ErrorCode::InvalidContinuationToken,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidBulkOperation,
        ErrorCode::IdMismatch,
        ErrorCode::InvalidVerificationCertificate,
        ErrorCode::ApiVersionMissing,
        ErrorCode::InvalidHeader,
        ErrorCode::IfMatchRequired,
        ErrorCode::InvalidCsr,
        ErrorCode::CsrSubjectMismatch,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidSignature,
        ErrorCode::InvalidAudience,
        ErrorCode::InsufficientRights,
        ErrorCode::SessionExpired,
        ErrorCode::CsrfTokenInvalid,
        ErrorCode::RenewalNotAllowed,
        ErrorCode::JoinTokenUsed,
        ErrorCode::CertificateRevoked,
        ErrorCode::NotFound,
        ErrorCode::EnrollmentNotFound,
        ErrorCode::RegistrationNotFound,
        ErrorCode::EnrollmentGroupNotFound,
        ErrorCode::CertificateNotFound,
        ErrorCode::PolicyNotFound,
        ErrorCode::HubNotFound,
        ErrorCode::CertificateNotIssuedHere,
        ErrorCode::MethodNotAllowed,
        ErrorCode::AlreadyExists,
        ErrorCode::WouldLockOut,
        ErrorCode::CertificateInUse,
        ErrorCode::AlreadyRevoked,
        ErrorCode::RegistrationIdConflict,
        ErrorCode::HubIsBuiltIn,
        ErrorCode::PreconditionFailed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Throttled,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::StorageFull,
    ];

    /// (HTTP status, six-digit code, name).
    pub fn wire(self) -> (StatusCode, u32, &'static str) {
        use ErrorCode::*;
        match self {
            InvalidJson => (StatusCode::BAD_REQUEST, 400_000, "InvalidJson"),
            InvalidRegistrationId => (StatusCode::BAD_REQUEST, 400_001, "InvalidRegistrationId"),
            InvalidEnrollmentGroupId => {
                (StatusCode::BAD_REQUEST, 400_002, "InvalidEnrollmentGroupId")
            }
            InvalidAttestation => (StatusCode::BAD_REQUEST, 400_003, "InvalidAttestation"),
            InvalidCertificate => (StatusCode::BAD_REQUEST, 400_004, "InvalidCertificate"),
            InvalidSymmetricKey => (StatusCode::BAD_REQUEST, 400_005, "InvalidSymmetricKey"),
            InvalidEndorsementKey => (StatusCode::BAD_REQUEST, 400_006, "InvalidEndorsementKey"),
            InvalidField => (StatusCode::BAD_REQUEST, 400_007, "InvalidField"),
            InvalidContinuationToken => {
                (StatusCode::BAD_REQUEST, 400_008, "InvalidContinuationToken")
            }
            InvalidQuery => (StatusCode::BAD_REQUEST, 400_009, "InvalidQuery"),
            InvalidBulkOperation => (StatusCode::BAD_REQUEST, 400_010, "InvalidBulkOperation"),
            IdMismatch => (StatusCode::BAD_REQUEST, 400_011, "IdMismatch"),
            InvalidVerificationCertificate => (
                StatusCode::BAD_REQUEST,
                400_012,
                "InvalidVerificationCertificate",
            ),
            ApiVersionMissing => (StatusCode::BAD_REQUEST, 400_013, "ApiVersionMissing"),
            InvalidHeader => (StatusCode::BAD_REQUEST, 400_014, "InvalidHeader"),
            IfMatchRequired => (StatusCode::BAD_REQUEST, 400_015, "IfMatchRequired"),
            InvalidCsr => (StatusCode::BAD_REQUEST, 400_016, "InvalidCsr"),
            CsrSubjectMismatch => (StatusCode::BAD_REQUEST, 400_017, "CsrSubjectMismatch"),
            Unauthorized => (StatusCode::UNAUTHORIZED, 401_000, "Unauthorized"),
            TokenExpired => (StatusCode::UNAUTHORIZED, 401_001, "TokenExpired"),
            InvalidSignature => (StatusCode::UNAUTHORIZED, 401_002, "InvalidSignature"),
            InvalidAudience => (StatusCode::UNAUTHORIZED, 401_003, "InvalidAudience"),
            JoinTokenUsed => (StatusCode::UNAUTHORIZED, 401_004, "JoinTokenUsed"),
            CertificateRevoked => (StatusCode::UNAUTHORIZED, 401_005, "CertificateRevoked"),
            SessionExpired => (StatusCode::UNAUTHORIZED, 401_007, "SessionExpired"),
            InsufficientRights => (StatusCode::FORBIDDEN, 403_001, "InsufficientRights"),
            RenewalNotAllowed => (StatusCode::FORBIDDEN, 403_002, "RenewalNotAllowed"),
            CsrfTokenInvalid => (StatusCode::FORBIDDEN, 403_003, "CsrfTokenInvalid"),
            NotFound => (StatusCode::NOT_FOUND, 404_000, "NotFound"),
            EnrollmentNotFound => (StatusCode::NOT_FOUND, 404_201, "EnrollmentNotFound"),
            RegistrationNotFound => (StatusCode::NOT_FOUND, 404_202, "RegistrationNotFound"),
            EnrollmentGroupNotFound => (StatusCode::NOT_FOUND, 404_203, "EnrollmentGroupNotFound"),
            CertificateNotFound => (StatusCode::NOT_FOUND, 404_204, "CertificateNotFound"),
            PolicyNotFound => (StatusCode::NOT_FOUND, 404_205, "PolicyNotFound"),
            HubNotFound => (StatusCode::NOT_FOUND, 404_206, "HubNotFound"),
            CertificateNotIssuedHere => {
                (StatusCode::NOT_FOUND, 404_207, "CertificateNotIssuedHere")
            }
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 405_001, "MethodNotAllowed"),
            AlreadyExists => (StatusCode::CONFLICT, 409_201, "AlreadyExists"),
            WouldLockOut => (StatusCode::CONFLICT, 409_202, "WouldLockOut"),
            CertificateInUse => (StatusCode::CONFLICT, 409_203, "CertificateInUse"),
            AlreadyRevoked => (StatusCode::CONFLICT, 409_204, "AlreadyRevoked"),
            RegistrationIdConflict => (StatusCode::CONFLICT, 409_205, "RegistrationIdConflict"),
            HubIsBuiltIn => (StatusCode::CONFLICT, 409_206, "HubIsBuiltIn"),
            PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                412_001,
                "PreconditionFailed",
            ),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, 413_001, "PayloadTooLarge"),
            Throttled => (StatusCode::TOO_MANY_REQUESTS, 429_001, "Throttled"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, 500_000, "InternalError"),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                503_001,
                "ServiceUnavailable",
            ),
            StorageFull => (StatusCode::SERVICE_UNAVAILABLE, 503_002, "StorageFull"),
        }
    }

    /// Seconds for `Retry-After`, on the answers a client should retry.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            ErrorCode::Throttled | ErrorCode::Unavailable => Some(1),
            // Space rarely comes back within a second; spare the disk a retry storm.
            ErrorCode::StorageFull => Some(5),
            _ => None,
        }
    }
}

/// An error on its way to a client. `message` is safe to show; `internal` is for the log only.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub info: Map<String, Value>,
    internal: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            info: Map::new(),
            internal: None,
        }
    }

    /// Names the offending field in `info.field`, as every 400 for a bad field should.
    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl fmt::Display) -> Self {
        let field = field.into();
        let mut error = ApiError::new(code, format!("{field}: {message}"));
        error.info.insert("field".into(), Value::String(field));
        error
    }

    /// An internal failure. The detail goes to the log, never to the client.
    pub fn internal(detail: impl fmt::Display) -> Self {
        ApiError {
            code: ErrorCode::Internal,
            message: "internal error".into(),
            info: Map::new(),
            internal: Some(detail.to_string()),
        }
    }

    pub fn internal_detail(&self) -> Option<&str> {
        self.internal.as_deref()
    }

    pub fn status(&self) -> StatusCode {
        self.code.wire().0
    }

    /// The response a client sees, tagged with the request's tracking id.
    pub fn render(&self, tracking_id: &str) -> HttpResponse {
        let (status, number, name) = self.code.wire();
        let mut body = json!({
            "errorCode": number,
            "trackingId": tracking_id,
            "message": self.message,
            "timestampUtc": crate::time::now_rfc3339(),
        });
        if !self.info.is_empty() {
            body["info"] = Value::Object(self.info.clone());
        }
        let mut response = HttpResponse::build(status);
        response.insert_header(("x-ms-error-code", number.to_string()));
        response.insert_header(("x-ms-error-name", name));
        response.insert_header((
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        ));
        if let Some(seconds) = self.code.retry_after() {
            response.insert_header(("retry-after", seconds.to_string()));
        }
        response.body(body.to_string())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)?;
        if let Some(internal) = &self.internal {
            write!(f, " ({internal})")?;
        }
        Ok(())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    /// Without the request-id middleware (it re-renders with the real id) the id is unknown.
    fn error_response(&self) -> HttpResponse {
        self.render("unknown")
    }
}

/// A storage error where "not found" has no resource of its own (`NotFound`); resources that
/// have one use [`store_error`].
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        store_error(error, ErrorCode::NotFound)
    }
}

/// A refused caller at the HTTP boundary.
impl From<crate::auth::Error> for ApiError {
    fn from(error: crate::auth::Error) -> ApiError {
        use crate::auth::Error as E;
        match error {
            E::Unauthorized(message) => ApiError::new(ErrorCode::Unauthorized, message),
            E::Expired(message) => ApiError::new(ErrorCode::TokenExpired, message),
            E::InvalidSignature(message) => ApiError::new(ErrorCode::InvalidSignature, message),
            E::InvalidAudience(message) => ApiError::new(ErrorCode::InvalidAudience, message),
            e @ E::InsufficientRights(_) => {
                ApiError::new(ErrorCode::InsufficientRights, e.to_string())
            }
            e @ E::Internal(_) => ApiError::internal(e),
        }
    }
}

/// An id that breaks its rule, named in its field.
impl From<crate::ids::InvalidId> for ApiError {
    fn from(error: crate::ids::InvalidId) -> ApiError {
        use crate::ids::IdKind;
        let (code, field) = match error.kind {
            IdKind::Registration => (ErrorCode::InvalidRegistrationId, "registrationId"),
            IdKind::EnrollmentGroup => (ErrorCode::InvalidEnrollmentGroupId, "enrollmentGroupId"),
            IdKind::Device => (ErrorCode::InvalidField, "deviceId"),
        };
        ApiError::field(code, field, error.message)
    }
}

/// A stored enrollment this version cannot read: ours to fix, not the caller's.
impl From<crate::enrollment::Unreadable> for ApiError {
    fn from(error: crate::enrollment::Unreadable) -> ApiError {
        ApiError::internal(error)
    }
}

/// Registration errors at the boundary (HTTPS and the MQTT DPS router). Exhaustive: a new kind
/// of error needs its wire code.
impl From<crate::dps::Error> for ApiError {
    fn from(error: crate::dps::Error) -> ApiError {
        use crate::dps::Error as E;
        match error {
            E::InvalidId(e) => ApiError::from(e),
            e @ E::IdMismatch => ApiError::field(ErrorCode::IdMismatch, "registrationId", e),
            E::Unauthorized(message) => ApiError::new(ErrorCode::InvalidSignature, message),
            E::InvalidTpmKey { field, message } => {
                ApiError::field(ErrorCode::InvalidEndorsementKey, field, message)
            }
            E::InvalidCertificate { field, message } => {
                ApiError::field(ErrorCode::InvalidCertificate, field, message)
            }
            e @ E::SpellingTaken { .. } => {
                ApiError::new(ErrorCode::RegistrationIdConflict, e.to_string())
            }
            e @ E::Throttled => ApiError::new(ErrorCode::Throttled, e.to_string()),
            e @ E::HubRefused(_) => ApiError::new(ErrorCode::InvalidField, e.to_string()),
            E::Unavailable(message) => ApiError::new(ErrorCode::Unavailable, message),
            e @ E::OperationNotFound => ApiError::new(ErrorCode::NotFound, e.to_string()),
            e @ E::NotRegistered => ApiError::new(ErrorCode::RegistrationNotFound, e.to_string()),
            e @ E::Revoked { .. } => ApiError::new(ErrorCode::CertificateRevoked, e.to_string()),
            E::RenewalNotAllowed(message) => ApiError::new(ErrorCode::RenewalNotAllowed, message),
            E::Store(e) => ApiError::from(e),
            E::Internal(detail) => ApiError::internal(detail),
        }
    }
}

/// A join token that cannot be spent.
impl From<crate::dps::hubs::JoinError> for ApiError {
    fn from(error: crate::dps::hubs::JoinError) -> ApiError {
        use crate::dps::hubs::JoinError as E;
        match error {
            e @ E::Used => ApiError::new(ErrorCode::JoinTokenUsed, e.to_string()),
            E::Store(e) => ApiError::from(e),
        }
    }
}

/// PKI failures at the HTTP boundary. Exhaustive: a new kind of failure needs its wire code.
impl From<crate::pki::Error> for ApiError {
    fn from(error: crate::pki::Error) -> ApiError {
        use crate::pki::Error as E;
        match error {
            E::BadCsr(e) => {
                ApiError::new(ErrorCode::InvalidCsr, format!("the CSR is refused: {e}"))
            }
            e @ E::Revoked { .. } => ApiError::new(ErrorCode::CertificateRevoked, e.to_string()),
            E::RenewalNotAllowed(message) => ApiError::new(ErrorCode::RenewalNotAllowed, message),
            E::InvalidSerial => ApiError::field(
                ErrorCode::InvalidField,
                "serial",
                "is not a hex serial number",
            ),
            e @ E::NotIssuedHere => {
                ApiError::new(ErrorCode::CertificateNotIssuedHere, e.to_string())
            }
            e @ E::AlreadyRevoked => ApiError::new(ErrorCode::AlreadyRevoked, e.to_string()),
            E::Store(StoreError::NotFound) => ApiError::new(
                ErrorCode::CertificateNotIssuedHere,
                "no certificate with this serial was issued by this service",
            ),
            E::Store(e) => ApiError::from(e),
            e @ E::Internal(_) => ApiError::internal(e),
        }
    }
}

/// Storage errors seen from a resource of the given kind.
pub fn store_error(error: StoreError, not_found: ErrorCode) -> ApiError {
    match error {
        StoreError::NotFound => ApiError::new(not_found, "not found"),
        StoreError::Conflict => ApiError::new(
            ErrorCode::AlreadyExists,
            "an entry with this id already exists; send If-Match with its etag (or *) to replace it",
        ),
        StoreError::PreconditionFailed => ApiError::new(
            ErrorCode::PreconditionFailed,
            "the etag in If-Match does not match the stored entry",
        ),
        StoreError::BadContinuation => ApiError::new(
            ErrorCode::InvalidContinuationToken,
            "x-ms-continuation is not a token this service issued",
        ),
        StoreError::Unavailable(detail) => {
            let mut error = ApiError::new(
                ErrorCode::Unavailable,
                "the database is unavailable; retry later",
            );
            error.internal = Some(detail);
            error
        }
        StoreError::Full(detail) => {
            let mut error = ApiError::new(
                ErrorCode::StorageFull,
                "the service's storage is full and nothing was written; retry later",
            );
            error.internal = Some(detail);
            error
        }
        other => ApiError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Pins every mapping: a change here is a change of the public contract.
    #[test]
    fn every_code_maps_to_a_unique_stable_number() {
        let expected: &[(ErrorCode, u16, u32)] = &[
            (ErrorCode::InvalidJson, 400, 400_000),
            (ErrorCode::InvalidRegistrationId, 400, 400_001),
            (ErrorCode::InvalidEnrollmentGroupId, 400, 400_002),
            (ErrorCode::InvalidAttestation, 400, 400_003),
            (ErrorCode::InvalidCertificate, 400, 400_004),
            (ErrorCode::InvalidSymmetricKey, 400, 400_005),
            (ErrorCode::InvalidEndorsementKey, 400, 400_006),
            (ErrorCode::InvalidField, 400, 400_007),
            (ErrorCode::InvalidContinuationToken, 400, 400_008),
            (ErrorCode::InvalidQuery, 400, 400_009),
            (ErrorCode::InvalidBulkOperation, 400, 400_010),
            (ErrorCode::IdMismatch, 400, 400_011),
            (ErrorCode::InvalidVerificationCertificate, 400, 400_012),
            (ErrorCode::ApiVersionMissing, 400, 400_013),
            (ErrorCode::InvalidHeader, 400, 400_014),
            (ErrorCode::IfMatchRequired, 400, 400_015),
            (ErrorCode::InvalidCsr, 400, 400_016),
            (ErrorCode::CsrSubjectMismatch, 400, 400_017),
            (ErrorCode::Unauthorized, 401, 401_000),
            (ErrorCode::TokenExpired, 401, 401_001),
            (ErrorCode::InvalidSignature, 401, 401_002),
            (ErrorCode::InvalidAudience, 401, 401_003),
            (ErrorCode::JoinTokenUsed, 401, 401_004),
            (ErrorCode::CertificateRevoked, 401, 401_005),
            (ErrorCode::SessionExpired, 401, 401_007),
            (ErrorCode::InsufficientRights, 403, 403_001),
            (ErrorCode::RenewalNotAllowed, 403, 403_002),
            (ErrorCode::CsrfTokenInvalid, 403, 403_003),
            (ErrorCode::NotFound, 404, 404_000),
            (ErrorCode::EnrollmentNotFound, 404, 404_201),
            (ErrorCode::RegistrationNotFound, 404, 404_202),
            (ErrorCode::EnrollmentGroupNotFound, 404, 404_203),
            (ErrorCode::CertificateNotFound, 404, 404_204),
            (ErrorCode::PolicyNotFound, 404, 404_205),
            (ErrorCode::HubNotFound, 404, 404_206),
            (ErrorCode::CertificateNotIssuedHere, 404, 404_207),
            (ErrorCode::MethodNotAllowed, 405, 405_001),
            (ErrorCode::AlreadyExists, 409, 409_201),
            (ErrorCode::WouldLockOut, 409, 409_202),
            (ErrorCode::CertificateInUse, 409, 409_203),
            (ErrorCode::AlreadyRevoked, 409, 409_204),
            (ErrorCode::RegistrationIdConflict, 409, 409_205),
            (ErrorCode::HubIsBuiltIn, 409, 409_206),
            (ErrorCode::PreconditionFailed, 412, 412_001),
            (ErrorCode::PayloadTooLarge, 413, 413_001),
            (ErrorCode::Throttled, 429, 429_001),
            (ErrorCode::Internal, 500, 500_000),
            (ErrorCode::Unavailable, 503, 503_001),
            (ErrorCode::StorageFull, 503, 503_002),
        ];
        assert_eq!(expected.len(), ErrorCode::ALL.len());
        let mut numbers = HashSet::new();
        for (code, status, number) in expected {
            let (s, n, _) = code.wire();
            assert_eq!((s.as_u16(), n), (*status, *number), "{code:?}");
            assert_eq!(n / 1000, u32::from(s.as_u16()), "{code:?} prefix");
            assert!(numbers.insert(n), "{code:?} duplicates {n}");
        }
    }

    /// Every PKI failure has its wire code; internal ones say only "internal error".
    #[test]
    fn pki_errors_map_to_their_codes() {
        use crate::pki::Error as E;
        let cases: Vec<(E, ErrorCode)> = vec![
            (
                E::BadCsr(zerotouch_certs::Error::CsrSignatureInvalid),
                ErrorCode::InvalidCsr,
            ),
            (
                E::Revoked {
                    serial: "AB".into(),
                },
                ErrorCode::CertificateRevoked,
            ),
            (
                E::RenewalNotAllowed("too early".into()),
                ErrorCode::RenewalNotAllowed,
            ),
            (E::InvalidSerial, ErrorCode::InvalidField),
            (E::NotIssuedHere, ErrorCode::CertificateNotIssuedHere),
            (E::AlreadyRevoked, ErrorCode::AlreadyRevoked),
            (
                E::Store(StoreError::NotFound),
                ErrorCode::CertificateNotIssuedHere,
            ),
            (
                E::Store(StoreError::Unavailable("down".into())),
                ErrorCode::Unavailable,
            ),
            (
                E::Internal("C_Sign: CKR_DEVICE_ERROR".into()),
                ErrorCode::Internal,
            ),
        ];
        for (error, code) in cases {
            let api = ApiError::from(error);
            assert_eq!(api.code, code, "{api}");
            assert!(!api.message.contains("CKR_"), "{api}");
        }
    }

    /// Registration failure codes (`dps::FailureCode`, in a registration state's `errorCode`)
    /// share no number with an HTTP error code but the generic internal error, so a number
    /// names one thing (401003 once meant both `InvalidAudience` and a disabled enrollment).
    #[test]
    fn registration_failure_codes_collide_with_no_error_code() {
        use crate::dps::FailureCode;
        for failure in FailureCode::ALL {
            let (number, name) = failure.wire();
            for code in ErrorCode::ALL {
                let (_, wire_number, wire_name) = code.wire();
                if wire_number == number {
                    assert_eq!(
                        (failure, *code),
                        (FailureCode::Internal, ErrorCode::Internal),
                        "{number} is both {name} and {wire_name}"
                    );
                }
            }
        }
    }

    #[test]
    fn registration_errors_map_to_their_codes() {
        use crate::dps::Error as E;
        let cases = [
            (E::IdMismatch, ErrorCode::IdMismatch),
            (E::Unauthorized("x".into()), ErrorCode::InvalidSignature),
            (
                E::InvalidTpmKey {
                    field: "tpm.endorsementKey",
                    message: "x".into(),
                },
                ErrorCode::InvalidEndorsementKey,
            ),
            (
                E::InvalidCertificate {
                    field: "csr",
                    message: "x".into(),
                },
                ErrorCode::InvalidCertificate,
            ),
            (
                E::SpellingTaken {
                    registration_id: "a".into(),
                    registered_as: "A".into(),
                },
                ErrorCode::RegistrationIdConflict,
            ),
            (E::Throttled, ErrorCode::Throttled),
            (E::HubRefused("x".into()), ErrorCode::InvalidField),
            (E::Unavailable("x".into()), ErrorCode::Unavailable),
            (E::OperationNotFound, ErrorCode::NotFound),
            (E::NotRegistered, ErrorCode::RegistrationNotFound),
            (
                E::Revoked {
                    serial: "01".into(),
                },
                ErrorCode::CertificateRevoked,
            ),
            (
                E::RenewalNotAllowed("x".into()),
                ErrorCode::RenewalNotAllowed,
            ),
            (
                E::Store(StoreError::Full("x".into())),
                ErrorCode::StorageFull,
            ),
            (
                E::Internal("token CKR_DEVICE_ERROR".into()),
                ErrorCode::Internal,
            ),
        ];
        for (error, code) in cases {
            let api = ApiError::from(error);
            assert_eq!(api.code, code, "{}", api.message);
            assert!(!api.message.contains("CKR_"), "{}", api.message);
        }
    }

    #[test]
    fn internal_detail_never_reaches_the_body() {
        let error = ApiError::internal("password authentication failed for user postgres");
        let response = error.render("req-1");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = actix_web::body::to_bytes(response.into_body());
        let body = futures_lite_block_on(body).unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("password"), "{text}");
        assert!(text.contains("req-1"), "{text}");
    }

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        actix_web::rt::System::new().block_on(f)
    }

    #[test]
    fn store_errors_map_to_client_errors() {
        assert_eq!(
            store_error(
                StoreError::PreconditionFailed,
                ErrorCode::EnrollmentNotFound
            )
            .status(),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            store_error(StoreError::NotFound, ErrorCode::EnrollmentNotFound).code,
            ErrorCode::EnrollmentNotFound
        );
        assert_eq!(
            store_error(StoreError::Conflict, ErrorCode::EnrollmentNotFound).status(),
            StatusCode::CONFLICT
        );
        let unavailable = store_error(
            StoreError::Unavailable("connection refused".into()),
            ErrorCode::EnrollmentNotFound,
        );
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!unavailable.message.contains("refused"));
        assert_eq!(
            store_error(StoreError::Backend("syntax".into()), ErrorCode::NotFound).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
