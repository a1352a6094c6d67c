//! Errors of the hub's service API, in IoT Hub's shape.
//!
//! IoT Hub answers `{"Message":"ErrorCode:DeviceNotFound;…","ExceptionMessage":"Tracking ID:…"}`
//! with the header `iothub-errorcode`, and its numeric codes are published (the C# service SDK's
//! `ErrorCode` enum). We use those numbers, so they differ from the DPS codes in
//! `http::error`. The Python service SDK reads only the status; others parse the body.

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::db::StoreError;

/// Stable hub error codes: (HTTP status, Azure's numeric code, name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubErrorCode {
    ArgumentInvalid,
    ArgumentNull,
    IotHubFormatError,
    IotHubUnauthorizedAccess,
    Forbidden,
    DeviceMaximumQueueDepthExceeded,
    DeviceNotFound,
    DeviceNotOnline,
    NotFound,
    MethodNotAllowed,
    DeviceAlreadyExists,
    PreconditionFailed,
    /// A C2D lock token that is unknown or whose lock expired (complete, reject, abandon).
    DeviceMessageLockLost,
    MessageTooLarge,
    ServerError,
    ServiceUnavailable,
    GatewayTimeout,
}

impl HubErrorCode {
    pub const ALL: &'static [HubErrorCode] = &[
        HubErrorCode::ArgumentInvalid,
        HubErrorCode::ArgumentNull,
        HubErrorCode::IotHubFormatError,
        HubErrorCode::IotHubUnauthorizedAccess,
        HubErrorCode::Forbidden,
        HubErrorCode::DeviceMaximumQueueDepthExceeded,
        HubErrorCode::DeviceNotFound,
        HubErrorCode::DeviceNotOnline,
        HubErrorCode::NotFound,
        HubErrorCode::MethodNotAllowed,
        HubErrorCode::DeviceAlreadyExists,
        HubErrorCode::PreconditionFailed,
        HubErrorCode::DeviceMessageLockLost,
        HubErrorCode::MessageTooLarge,
        HubErrorCode::ServerError,
        HubErrorCode::ServiceUnavailable,
        HubErrorCode::GatewayTimeout,
    ];

    pub fn wire(self) -> (StatusCode, u32, &'static str) {
        use HubErrorCode::*;
        match self {
            ArgumentInvalid => (StatusCode::BAD_REQUEST, 400_004, "ArgumentInvalid"),
            ArgumentNull => (StatusCode::BAD_REQUEST, 400_005, "ArgumentNull"),
            IotHubFormatError => (StatusCode::BAD_REQUEST, 400_006, "IotHubFormatError"),
            IotHubUnauthorizedAccess => (
                StatusCode::UNAUTHORIZED,
                401_002,
                "IotHubUnauthorizedAccess",
            ),
            Forbidden => (StatusCode::FORBIDDEN, 403_001, "IotHubUnauthorizedAccess"),
            DeviceMaximumQueueDepthExceeded => (
                StatusCode::FORBIDDEN,
                403_004,
                "DeviceMaximumQueueDepthExceeded",
            ),
            DeviceNotFound => (StatusCode::NOT_FOUND, 404_001, "DeviceNotFound"),
            DeviceNotOnline => (StatusCode::NOT_FOUND, 404_103, "DeviceNotOnline"),
            NotFound => (StatusCode::NOT_FOUND, 404_000, "NotFound"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 405_001, "MethodNotAllowed"),
            DeviceAlreadyExists => (StatusCode::CONFLICT, 409_001, "DeviceAlreadyExists"),
            PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                412_001,
                "PreconditionFailed",
            ),
            DeviceMessageLockLost => (
                StatusCode::PRECONDITION_FAILED,
                412_002,
                "DeviceMessageLockLost",
            ),
            MessageTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, 413_001, "MessageTooLarge"),
            ServerError => (StatusCode::INTERNAL_SERVER_ERROR, 500_001, "ServerError"),
            ServiceUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                503_001,
                "ServiceUnavailable",
            ),
            GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, 504_101, "GatewayTimeout"),
        }
    }
}

#[derive(Debug)]
pub struct HubError {
    pub code: HubErrorCode,
    pub message: String,
    internal: Option<String>,
}

impl HubError {
    pub fn new(code: HubErrorCode, message: impl Into<String>) -> HubError {
        HubError {
            code,
            message: message.into(),
            internal: None,
        }
    }

    pub fn internal(detail: impl fmt::Display) -> HubError {
        HubError {
            code: HubErrorCode::ServerError,
            message: "internal error".into(),
            internal: Some(detail.to_string()),
        }
    }

    pub fn internal_detail(&self) -> Option<&str> {
        self.internal.as_deref()
    }

    pub fn status(&self) -> StatusCode {
        self.code.wire().0
    }

    pub fn render(&self, tracking_id: &str) -> HttpResponse {
        let (status, number, name) = self.code.wire();
        let body = json!({
            "Message": format!("ErrorCode:{name};{}", self.message),
            "ExceptionMessage": format!(
                "Tracking ID:{tracking_id}-TimeStamp:{}",
                crate::time::now_rfc3339()
            ),
            "errorCode": number,
            "trackingId": tracking_id,
        });
        let mut response = HttpResponse::build(status);
        response.insert_header(("iothub-errorcode", name));
        response.insert_header(("x-ms-error-code", number.to_string()));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header(("retry-after", "1"));
        }
        response
            .content_type("application/json; charset=utf-8")
            .body(body.to_string())
    }

    /// An error of another layer met on a hub route (a framework error, a DPS-shaped one),
    /// in hub terms by its HTTP status; `message` is safe to show, `internal` is for the log.
    pub fn from_status(status: u16, message: String, internal: Option<&str>) -> HubError {
        let code = match status {
            401 => HubErrorCode::IotHubUnauthorizedAccess,
            403 => HubErrorCode::Forbidden,
            404 => HubErrorCode::NotFound,
            405 => HubErrorCode::MethodNotAllowed,
            412 => HubErrorCode::PreconditionFailed,
            413 => HubErrorCode::MessageTooLarge,
            400..=499 => HubErrorCode::ArgumentInvalid,
            503 => HubErrorCode::ServiceUnavailable,
            _ => HubErrorCode::ServerError,
        };
        HubError {
            code,
            message,
            internal: internal.map(String::from),
        }
    }

    pub fn store(error: StoreError) -> HubError {
        match error {
            StoreError::NotFound => {
                HubError::new(HubErrorCode::DeviceNotFound, "the device is not registered")
            }
            StoreError::Conflict => HubError::new(
                HubErrorCode::DeviceAlreadyExists,
                "a device with this id already exists",
            ),
            StoreError::PreconditionFailed => HubError::new(
                HubErrorCode::PreconditionFailed,
                "the etag in If-Match does not match",
            ),
            StoreError::BadContinuation => HubError::new(
                HubErrorCode::ArgumentInvalid,
                "x-ms-continuation is not a token this hub issued",
            ),
            StoreError::Unavailable(detail) => HubError {
                code: HubErrorCode::ServiceUnavailable,
                message: "the database is unavailable; retry later".into(),
                internal: Some(detail),
            },
            StoreError::Full(detail) => HubError {
                code: HubErrorCode::ServiceUnavailable,
                message: "the hub's storage is full and nothing was written; retry later".into(),
                internal: Some(detail),
            },
            other => HubError::internal(other),
        }
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)?;
        if let Some(internal) = &self.internal {
            write!(f, " ({internal})")?;
        }
        Ok(())
    }
}

impl ResponseError for HubError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        self.render("unknown")
    }
}

impl From<StoreError> for HubError {
    fn from(error: StoreError) -> HubError {
        HubError::store(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the published numbers; a change here changes the contract.
    #[test]
    fn codes_are_azures() {
        let expected: &[(HubErrorCode, u16, u32, &str)] = &[
            (
                HubErrorCode::ArgumentInvalid,
                400,
                400_004,
                "ArgumentInvalid",
            ),
            (HubErrorCode::ArgumentNull, 400, 400_005, "ArgumentNull"),
            (
                HubErrorCode::IotHubFormatError,
                400,
                400_006,
                "IotHubFormatError",
            ),
            (
                HubErrorCode::IotHubUnauthorizedAccess,
                401,
                401_002,
                "IotHubUnauthorizedAccess",
            ),
            (
                HubErrorCode::Forbidden,
                403,
                403_001,
                "IotHubUnauthorizedAccess",
            ),
            (
                HubErrorCode::DeviceMaximumQueueDepthExceeded,
                403,
                403_004,
                "DeviceMaximumQueueDepthExceeded",
            ),
            (HubErrorCode::DeviceNotFound, 404, 404_001, "DeviceNotFound"),
            (
                HubErrorCode::DeviceNotOnline,
                404,
                404_103,
                "DeviceNotOnline",
            ),
            (HubErrorCode::NotFound, 404, 404_000, "NotFound"),
            (
                HubErrorCode::MethodNotAllowed,
                405,
                405_001,
                "MethodNotAllowed",
            ),
            (
                HubErrorCode::DeviceAlreadyExists,
                409,
                409_001,
                "DeviceAlreadyExists",
            ),
            (
                HubErrorCode::PreconditionFailed,
                412,
                412_001,
                "PreconditionFailed",
            ),
            (
                HubErrorCode::DeviceMessageLockLost,
                412,
                412_002,
                "DeviceMessageLockLost",
            ),
            (
                HubErrorCode::MessageTooLarge,
                413,
                413_001,
                "MessageTooLarge",
            ),
            (HubErrorCode::ServerError, 500, 500_001, "ServerError"),
            (
                HubErrorCode::ServiceUnavailable,
                503,
                503_001,
                "ServiceUnavailable",
            ),
            (HubErrorCode::GatewayTimeout, 504, 504_101, "GatewayTimeout"),
        ];
        assert_eq!(expected.len(), HubErrorCode::ALL.len());
        for (code, status, number, name) in expected {
            let (s, n, nm) = code.wire();
            assert_eq!((s.as_u16(), n, nm), (*status, *number, *name), "{code:?}");
        }
    }

    #[test]
    fn internal_detail_stays_in_the_log() {
        let error = HubError::store(StoreError::Backend("relation devices missing".into()));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.message.contains("relation"));
    }
}
