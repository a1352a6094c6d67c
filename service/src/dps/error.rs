//! What goes wrong in a registration, in DPS's own terms. The HTTP layer (`http::error`) and
//! the MQTT DPS router map [`Error`] to wire codes; [`FailureCode`] is the pinned table of the
//! `errorCode`s a failed or disabled registration carries in its `registrationState`.

use crate::db::StoreError;
use crate::ids::InvalidId;

/// A registration refused or broken before it could be recorded (the device gets an error
/// answer, not a registration state).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// The body's `registrationId` is not the one in the path.
    #[error("differs from the registration id in the path")]
    IdMismatch,
    /// Unknown device, or evidence that does not prove it (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The device's TPM keys (`field`) cannot be used.
    #[error("{message}")]
    InvalidTpmKey {
        field: &'static str,
        message: String,
    },
    /// A certificate the device sent (`field`) cannot be used.
    #[error("{message}")]
    InvalidCertificate {
        field: &'static str,
        message: String,
    },
    /// A group member registering under another spelling of a registered id.
    #[error(
        "registration ids are case-insensitive and `{registration_id}` is registered as \
         `{registered_as}`: register with that spelling, or delete the registration record \
         to register under another one"
    )]
    SpellingTaken {
        registration_id: String,
        registered_as: String,
    },
    #[error("too many registrations at once; retry after the given delay")]
    Throttled,
    /// The chosen hub refused the identity written for the device.
    #[error("the hub refused the device identity: {0}")]
    HubRefused(String),
    /// Worth retrying: no hub reachable, or the identity changed concurrently.
    #[error("{0}")]
    Unavailable(String),
    /// A poll of an operation this registration does not have.
    #[error("no such operation for this registration")]
    OperationNotFound,
    /// A status look-up of a device that never registered.
    #[error("this device has not registered")]
    NotRegistered,
    /// The certificate presented was issued here and revoked.
    #[error("the client certificate (serial {serial}) has been revoked")]
    Revoked { serial: String },
    /// A CSR sent to renew outside the enrollment's renewal window.
    #[error("{0}")]
    RenewalNotAllowed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something broke on our side. For the log only: clients get a tracking id.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Whether the device (or its request) is refused, rather than something failing on our
    /// side: the metrics count these as `refused`.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Store(e) => matches!(
                e,
                StoreError::NotFound
                    | StoreError::Conflict
                    | StoreError::PreconditionFailed
                    | StoreError::BadContinuation
            ),
            Error::Unavailable(_) | Error::Internal(_) => false,
            _ => true,
        }
    }
}

impl From<crate::pki::Error> for Error {
    fn from(error: crate::pki::Error) -> Error {
        use crate::pki::Error as E;
        match error {
            E::BadCsr(e) => Error::InvalidCertificate {
                field: "csr",
                message: e.to_string(),
            },
            E::Revoked { serial } => Error::Revoked { serial },
            E::RenewalNotAllowed(message) => Error::RenewalNotAllowed(message),
            E::Store(e) => Error::Store(e),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<crate::enrollment::Unreadable> for Error {
    fn from(error: crate::enrollment::Unreadable) -> Error {
        Error::Internal(error.to_string())
    }
}

/// The `errorCode` of a registration that ended `failed` or `disabled`: one number and one
/// name each (docs/allocation.md, docs/dev/decisions.md 35). Separate from the HTTP error
/// codes, but no number is in both tables (`http::error`'s tests check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCode {
    /// No linked hub is eligible for the device.
    NoHub,
    /// The custom-allocation webhook cannot be reached.
    WebhookUnreachable,
    WebhookTimeout,
    /// The webhook answered a status other than 2xx.
    WebhookStatus,
    /// The webhook's answer is not a valid allocation.
    WebhookBadResponse,
    /// The webhook chose a hub it was not offered.
    WebhookForeignHub,
    /// A static enrollment names several hubs.
    Ambiguous,
    /// The enrollment's webhook cannot be called as configured.
    WebhookConfig,
    /// The enrollment is disabled.
    EnrollmentDisabled,
    /// Allocation broke on our side.
    Internal,
}

impl FailureCode {
    pub const ALL: [FailureCode; 10] = [
        FailureCode::NoHub,
        FailureCode::WebhookUnreachable,
        FailureCode::WebhookTimeout,
        FailureCode::WebhookStatus,
        FailureCode::WebhookBadResponse,
        FailureCode::WebhookForeignHub,
        FailureCode::Ambiguous,
        FailureCode::WebhookConfig,
        FailureCode::EnrollmentDisabled,
        FailureCode::Internal,
    ];

    /// (number, name).
    pub fn wire(self) -> (u32, &'static str) {
        match self {
            FailureCode::NoHub => (400_208, "NoHubForDevice"),
            FailureCode::WebhookUnreachable => (400_210, "WebhookUnreachable"),
            FailureCode::WebhookTimeout => (400_211, "WebhookTimeout"),
            FailureCode::WebhookStatus => (400_212, "WebhookStatus"),
            FailureCode::WebhookBadResponse => (400_213, "WebhookBadResponse"),
            FailureCode::WebhookForeignHub => (400_214, "WebhookForeignHub"),
            FailureCode::Ambiguous => (400_215, "AmbiguousHub"),
            FailureCode::WebhookConfig => (400_216, "WebhookConfig"),
            FailureCode::EnrollmentDisabled => (401_006, "EnrollmentDisabled"),
            FailureCode::Internal => (500_000, "InternalError"),
        }
    }

    pub fn number(self) -> u32 {
        self.wire().0
    }

    /// The code of an allocation failure.
    pub fn of_allocation(error: &zerotouch_policies::AllocationError) -> FailureCode {
        use zerotouch_policies::{AllocationError, WebhookError};
        match error {
            AllocationError::NoHub => FailureCode::NoHub,
            AllocationError::Ambiguous { .. } => FailureCode::Ambiguous,
            AllocationError::Webhook(WebhookError::Transport(_)) => FailureCode::WebhookUnreachable,
            AllocationError::Webhook(WebhookError::Timeout) => FailureCode::WebhookTimeout,
            AllocationError::Webhook(WebhookError::Status(_)) => FailureCode::WebhookStatus,
            AllocationError::Webhook(WebhookError::BadResponse(_)) => {
                FailureCode::WebhookBadResponse
            }
            AllocationError::Webhook(WebhookError::HubNotOffered(_)) => {
                FailureCode::WebhookForeignHub
            }
            AllocationError::Webhook(_) => FailureCode::WebhookConfig,
            _ => FailureCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are what devices and operators see in `registrationState.errorCode`:
    /// changing one breaks them. A new code needs a new row here.
    #[test]
    fn failure_codes_are_pinned() {
        let table: Vec<(u32, &str)> = FailureCode::ALL.iter().map(|c| c.wire()).collect();
        assert_eq!(
            table,
            [
                (400_208, "NoHubForDevice"),
                (400_210, "WebhookUnreachable"),
                (400_211, "WebhookTimeout"),
                (400_212, "WebhookStatus"),
                (400_213, "WebhookBadResponse"),
                (400_214, "WebhookForeignHub"),
                (400_215, "AmbiguousHub"),
                (400_216, "WebhookConfig"),
                (401_006, "EnrollmentDisabled"),
                (500_000, "InternalError"),
            ]
        );
    }

    #[test]
    fn allocation_failures_have_their_codes() {
        use zerotouch_policies::{AllocationError, WebhookError};
        let cases = [
            (AllocationError::NoHub, 400_208),
            (AllocationError::Webhook(WebhookError::Timeout), 400_211),
            (
                AllocationError::Webhook(WebhookError::Config("x".into())),
                400_216,
            ),
        ];
        for (error, number) in cases {
            assert_eq!(FailureCode::of_allocation(&error).number(), number);
        }
    }

    #[test]
    fn only_csr_faults_keep_their_text_for_the_device() {
        let internal = Error::from(crate::pki::Error::Internal("token CKR_DEVICE_ERROR".into()));
        assert!(matches!(internal, Error::Internal(_)));
        let store = Error::from(crate::pki::Error::Store(StoreError::Full("disk".into())));
        assert!(matches!(store, Error::Store(StoreError::Full(_))));
    }
}
