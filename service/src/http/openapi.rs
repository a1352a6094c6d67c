//! The OpenAPI 3 description of the HTTPS API, served at `GET /openapi.json`.
//!
//! Generated from the code so that it cannot drift: each operation is described by the
//! `#[utoipa::path]` attribute on its handler (in the resource files beside this one), whose
//! path is the handler's own `routes` constant; this module gathers them into one document,
//! with the error bodies, the parameters every operation of a family shares and the security
//! schemes. A test below checks that the document has exactly the paths and methods the router
//! serves. `scripts/schemathesis` checks a live server against it.
//!
//! Two families answer in two error shapes: the management (DPS service) API renders Azure's
//! error JSON ([`AzureError`], `http/error.rs`) and the hub service API IoT Hub's
//! ([`HubErrorBody`], `hub/error.rs`).

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::http::routes;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::OPENAPI).route(web::get().to(document)));
}

/// The document. Built once per request: it is small, and requests for it are rare.
#[utoipa::path(
    get,
    path = routes::OPENAPI,
    operation_id = "openapi",
    tag = "service",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)),
)]
async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

/// Management API error (Azure DPS shape, `http/error.rs`).
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct AzureError {
    /// Six digits: the HTTP status followed by a sub-code (e.g. 400013 `ApiVersionMissing`);
    /// also in the `x-ms-error-code` header, the name in `x-ms-error-name`.
    error_code: u32,
    /// The request id, also `x-ms-request-id` and on every log line of the request.
    tracking_id: String,
    message: String,
    timestamp_utc: String,
    /// Details, such as `field`: the JSON path of the offending field.
    #[schema(value_type = Option<Object>)]
    info: Option<serde_json::Value>,
}

/// Hub service API error (IoT Hub shape, `hub/error.rs`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct HubErrorBody {
    /// `ErrorCode:<name>;<message>`; the name is also in the `iothub-errorcode` header.
    #[schema(rename = "Message")]
    message: String,
    /// `Tracking ID:<id>-TimeStamp:<time>`.
    #[schema(rename = "ExceptionMessage")]
    exception_message: String,
    /// Six digits: the HTTP status followed by a sub-code.
    #[schema(rename = "errorCode")]
    error_code: u32,
    #[schema(rename = "trackingId")]
    tracking_id: String,
}

/// `api-version`: required on every operation of the management and DPS device APIs
/// (`http::require_api_version`); any non-empty value is accepted.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ApiVersion {
    /// For example `2021-10-01`.
    #[serde(rename = "api-version")]
    #[param(min_length = 1, example = "2021-10-01")]
    api_version: String,
}

/// Paging of a query (`http::paging`).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct Paging {
    /// Items per page, 1 to 1000 (default 100).
    #[serde(rename = "x-ms-max-item-count")]
    #[param(minimum = 1, maximum = 1000)]
    max_item_count: Option<u32>,
    /// The `x-ms-continuation` of the previous page.
    #[serde(rename = "x-ms-continuation")]
    continuation: Option<String>,
}

/// `If-Match`: on a PUT, replace the entry with this etag (`*`: any) instead of creating one;
/// on a DELETE, delete only the entry with this etag.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IfMatch {
    #[serde(rename = "If-Match")]
    if_match: Option<String>,
}

/// Builds a map of error responses in one of the two shapes.
fn errors(schema: &str, statuses: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    statuses
        .iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(*description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name(schema)))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

const BAD_REQUEST: (u16, &str) = (400, "A bad parameter, header or body");
const UNAUTHORIZED: (u16, &str) = (401, "No credentials, or credentials that do not verify");
const FORBIDDEN: (u16, &str) = (403, "The credentials lack the right");
const NOT_FOUND: (u16, &str) = (404, "No such resource (or this instance does not serve it)");
const CONFLICT: (u16, &str) = (409, "The write collides with the stored state");
const PRECONDITION: (u16, &str) = (412, "If-Match does not match the stored etag");
const TOO_LARGE: (u16, &str) = (413, "The body is larger than the service accepts");
const THROTTLED: (u16, &str) = (429, "Too many requests; retry after `retry-after`");
const INTERNAL: (u16, &str) = (500, "Internal error; the log has the details");
const UNAVAILABLE: (u16, &str) = (503, "The store is unreachable or full; retry later");

/// What any authenticated management operation may answer besides its own outcomes.
pub struct ManagementErrors;

impl IntoResponses for ManagementErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(
            "AzureError",
            &[
                BAD_REQUEST,
                UNAUTHORIZED,
                FORBIDDEN,
                NOT_FOUND,
                TOO_LARGE,
                INTERNAL,
                UNAVAILABLE,
            ],
        )
    }
}

/// What a management write may answer on top of [`ManagementErrors`].
pub struct ManagementWriteErrors;

impl IntoResponses for ManagementWriteErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors("AzureError", &[CONFLICT, PRECONDITION])
    }
}

/// What an unauthenticated operation of the management side (CRL, OCSP, EST, health) may
/// answer besides its own outcomes.
pub struct PublicErrors;

impl IntoResponses for PublicErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(
            "AzureError",
            &[BAD_REQUEST, NOT_FOUND, TOO_LARGE, INTERNAL, UNAVAILABLE],
        )
    }
}

/// What a device operation of the DPS device API or EST may answer besides its own outcomes.
pub struct DeviceErrors;

impl IntoResponses for DeviceErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(
            "AzureError",
            &[
                BAD_REQUEST,
                UNAUTHORIZED,
                FORBIDDEN,
                NOT_FOUND,
                CONFLICT,
                TOO_LARGE,
                THROTTLED,
                INTERNAL,
                UNAVAILABLE,
            ],
        )
    }
}

/// What any hub operation may answer besides its own outcomes, in IoT Hub's shape.
pub struct HubErrors;

impl IntoResponses for HubErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(
            "HubErrorBody",
            &[
                BAD_REQUEST,
                UNAUTHORIZED,
                FORBIDDEN,
                NOT_FOUND,
                TOO_LARGE,
                THROTTLED,
                INTERNAL,
                UNAVAILABLE,
            ],
        )
    }
}

/// What a hub write may answer on top of [`HubErrors`].
pub struct HubWriteErrors;

impl IntoResponses for HubWriteErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors("HubErrorBody", &[CONFLICT, PRECONDITION])
    }
}

/// The security schemes. The management API takes a DPS SAS token (`SharedAccessSignature
/// sr=…&sig=…&se=…&skn=<policy>`) or a bearer JWT from `zerotouch token create`; the hub
/// service API a hub SAS token; devices a device SAS token or their TLS client certificate.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let sas = |description: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                description,
            )))
        };
        components.add_security_scheme(
            "SharedAccessSignature",
            sas(
                "A DPS SAS token signed with an authorization policy's key: \
                 `SharedAccessSignature sr=<host>&sig=…&se=…&skn=<policy>`",
            ),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A management token from `zerotouch token create`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "consoleSession",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "zerotouch_console",
                "The web console's sealed session cookie, set by `POST /console/session`. \
                 It is accepted on every management and hub operation without an \
                 `Authorization` header; changes also need the session's `X-CSRF-Token`",
            ))),
        );
        components.add_security_scheme(
            "hubSharedAccessSignature",
            sas("A hub SAS token signed with a hub shared access policy's key"),
        );
        components.add_security_scheme(
            "deviceSharedAccessSignature",
            sas("A device SAS token signed with the device's (or its group's derived) key"),
        );
        components.add_security_scheme(
            "estBasic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "EST: `registrationId:<device key or SAS token>` of a registered \
                         symmetric-key device",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "hubToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A hub's join token (`/hubs/join`) or heartbeat token (`/hubs/{name}/heartbeat`)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "x509",
            SecurityScheme::MutualTls {
                description: Some(
                    "The device's TLS client certificate (X.509 attestation)".to_string(),
                ),
                extensions: None,
            },
        );
    }
}

/// The handlers' paths are the router's templates; a `{name:.*}` pattern becomes `{name}`.
struct PathPatterns;

impl Modify for PathPatterns {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let paths = std::mem::take(&mut openapi.paths.paths);
        openapi.paths.paths = paths
            .into_iter()
            .map(|(path, item)| (openapi_path(&path), item))
            .collect();
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Zerotouch",
        version = env!("CARGO_PKG_VERSION"),
        description = "Self-hosted device provisioning: the DPS management API, the hub \
                       service API, the DPS device API and EST, as served by `zerotouch serve`. \
                       Generated from the code (service/src/http/openapi.rs)."
    ),
    servers((url = "/", description = "This server")),
    paths(
        document,
        crate::http::health::healthz,
        crate::http::health::client_certificate,
        crate::http::metrics::metrics,
        crate::http::enrollments::query,
        crate::http::enrollments::group_query,
        crate::http::enrollments::bulk,
        crate::http::enrollments::group_bulk,
        crate::http::enrollments::attestation_mechanism,
        crate::http::enrollments::group_attestation_mechanism,
        crate::http::enrollments::get,
        crate::http::enrollments::group_get,
        crate::http::enrollments::put,
        crate::http::enrollments::group_put,
        crate::http::enrollments::delete,
        crate::http::enrollments::group_delete,
        crate::http::registrations::query,
        crate::http::registrations::get,
        crate::http::registrations::delete,
        crate::http::pki::list_issued,
        crate::http::pki::revoke,
        crate::http::pki::get_issued,
        crate::http::pki::revoke_registration,
        crate::http::pki::revoke_group,
        crate::http::pki::list_audit,
        crate::http::pki::crl,
        crate::http::pki::ocsp_post,
        crate::http::pki::ocsp_get,
        crate::http::est::cacerts,
        crate::http::est::label_cacerts,
        crate::http::est::csrattrs,
        crate::http::est::label_csrattrs,
        crate::http::est::simpleenroll,
        crate::http::est::label_simpleenroll,
        crate::http::est::simplereenroll,
        crate::http::est::label_simplereenroll,
        crate::http::certificates::list,
        crate::http::certificates::generate_verification_code,
        crate::http::certificates::verify,
        crate::http::certificates::get,
        crate::http::certificates::put,
        crate::http::certificates::delete,
        crate::http::policies::list,
        crate::http::policies::regenerate_key,
        crate::http::policies::get,
        crate::http::policies::put,
        crate::http::policies::delete,
        crate::http::hubs::list,
        crate::http::hubs::join_token,
        crate::http::hubs::join,
        crate::http::hubs::trust_bundle,
        crate::http::hubs::heartbeat,
        crate::http::hubs::drain,
        crate::http::hubs::activate,
        crate::http::hubs::get,
        crate::http::hubs::remove,
        crate::http::hub::query::query,
        crate::http::hub::messages::device_event,
        crate::http::hub::messages::send_c2d,
        crate::http::hub::messages::receive_c2d,
        crate::http::hub::messages::complete_c2d,
        crate::http::hub::messages::abandon_c2d,
        crate::http::hub::messages::read_events,
        crate::http::hub::twins::invoke,
        crate::http::hub::twins::get,
        crate::http::hub::twins::patch,
        crate::http::hub::twins::put,
        crate::http::hub::devices::list,
        crate::http::hub::devices::get,
        crate::http::hub::devices::put,
        crate::http::hub::devices::delete,
        crate::http::hub::devices::registry_statistics,
        crate::http::hub::devices::service_statistics,
        crate::http::dps::register,
        crate::http::dps::operation,
        crate::http::dps::status,
        crate::http::console::root,
        crate::http::console::index,
        crate::http::console::asset,
        crate::http::console::get_session,
        crate::http::console::sign_in,
        crate::http::console::sign_out,
        crate::http::console::get_rates,
        crate::http::console::get_pki,
    ),
    components(schemas(AzureError, HubErrorBody)),
    modifiers(&SecuritySchemes, &PathPatterns),
    tags(
        (name = "service", description = "Health, metrics and this description"),
        (name = "enrollments", description = "Individual enrollments and enrollment groups"),
        (name = "registrations", description = "Device registration states"),
        (name = "pki", description = "Issued certificates, revocation, audit, CRL and OCSP"),
        (name = "est", description = "EST (RFC 7030) under /.well-known/est"),
        (name = "certificates", description = "CA certificates and proof of possession"),
        (name = "authorizationPolicies", description = "Shared access policies of the management API"),
        (name = "hubs", description = "Linked hubs and join tokens"),
        (name = "hub", description = "The hub service API: devices, twins, methods, messages, query"),
        (name = "device", description = "The device APIs: DPS registration and the hub's device endpoints"),
        (name = "console", description = "The web console's page and session (docs/console.md)"),
    ),
)]
pub struct ApiDoc;

/// An actix route template as an OpenAPI path: `{name:.*}` becomes `{name}`.
pub fn openapi_path(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment.split_once(':') {
            Some((name, _)) if segment.starts_with('{') => format!("{name}}}"),
            _ => segment.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

pub use schemas::*;

/// The bodies of the API as the handlers read and write them. Most are built as JSON in the
/// handlers; these types describe them (the known fields; more may appear where the type says
/// so) and are never constructed.
#[allow(dead_code)]
mod schemas {
    use serde::Deserialize;
    use serde_json::Value;
    use utoipa::{IntoParams, ToSchema};

    /// Raw bytes: DER, or whatever the client sends.
    #[derive(ToSchema)]
    #[schema(value_type = String, format = Binary)]
    pub struct Bytes(Vec<u8>);

    /// Any JSON value.
    #[derive(ToSchema)]
    #[schema(value_type = Value)]
    pub struct AnyJson(Value);

    /// One message of a telemetry batch (`application/vnd.microsoft.iothub.json`).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct BatchMessage {
        /// Base64 of the message bytes, unless `base64Encoded` is `false`.
        body: String,
        base64_encoded: Option<bool>,
        /// Application properties (and `iothub-*` system properties).
        properties: Option<std::collections::BTreeMap<String, String>>,
    }

    /// The body of an enrollment query.
    #[derive(ToSchema)]
    pub struct QuerySpecification {
        /// `*` or `SELECT * FROM enrollments` (resp. `enrollmentGroups`); absent: `*`.
        query: Option<String>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub enum BulkMode {
        Create,
        Update,
        UpdateIfMatchETag,
        Delete,
    }

    /// A bulk operation: 1 to 10 enrollments (`enrollments`) or groups (`enrollmentGroups`).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct BulkOperation {
        mode: BulkMode,
        #[schema(max_items = 10)]
        enrollments: Option<Vec<crate::enrollment::Enrollment>>,
        #[schema(max_items = 10)]
        enrollment_groups: Option<Vec<crate::enrollment::Enrollment>>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct BulkItemError {
        /// The item's `registrationId` (resp. `enrollmentGroupId`) is also named here.
        error_code: u32,
        error_status: String,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct BulkResult {
        is_successful: bool,
        errors: Vec<BulkItemError>,
    }

    /// `/healthz`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Health {
        /// `ok` or `degraded`.
        status: String,
        id_scope: String,
        /// When degraded: `ok`, `full`, `unavailable` or `failing`.
        store: Option<String>,
        reason: Option<String>,
        /// Replica mode: this replica, its NATS link and the others.
        #[schema(value_type = Option<Object>)]
        replica: Option<Value>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct ClientCertificate {
        presented: bool,
        /// The leaf's summary (subject, issuer, validity, thumbprints).
        #[schema(value_type = Option<Object>)]
        leaf: Option<Value>,
        chain_length: Option<u64>,
        /// Whether the chain reaches Zerotouch's own CA (informational).
        verified_by_server_ca: Option<bool>,
    }

    /// A device's registration state (DPS `DeviceRegistrationState`).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct RegistrationState {
        registration_id: String,
        created_date_time_utc: Option<String>,
        assigned_hub: Option<String>,
        device_id: Option<String>,
        /// `unassigned`, `assigning`, `assigned`, `failed` or `disabled`.
        status: Option<String>,
        substatus: Option<String>,
        error_code: Option<i64>,
        error_message: Option<String>,
        last_updated_date_time_utc: Option<String>,
        etag: Option<String>,
    }

    /// The answer to a register or an operation status (DPS `RegistrationOperationStatus`).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct RegistrationOperation {
        operation_id: String,
        /// `assigning`, `assigned`, `failed` or `disabled`.
        status: String,
        registration_state: Option<RegistrationState>,
    }

    /// The body of a register or a status lookup; all optional.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct DeviceRegistration {
        registration_id: Option<String>,
        /// The custom payload passed to a custom allocation webhook.
        #[schema(value_type = Option<Object>)]
        payload: Option<Value>,
        /// A PKCS#10 CSR (base64 DER) for a certificate issued with the assignment.
        csr: Option<String>,
        tpm: Option<TpmKeys>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct TpmKeys {
        endorsement_key: Option<String>,
        storage_root_key: Option<String>,
        endorsement_key_certificate: Option<String>,
    }

    /// Filters of `/certificates/issued` (compared case-insensitively).
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Query)]
    #[serde(rename_all = "camelCase")]
    pub struct IssuedFilters {
        registration_id: Option<String>,
        serial: Option<String>,
        /// `good` or `revoked`.
        #[param(pattern = "^(good|revoked)$")]
        status: Option<String>,
    }

    /// Filters of `/audit` (compared case-insensitively).
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Query)]
    #[serde(rename_all = "camelCase")]
    pub struct AuditFilters {
        registration_id: Option<String>,
        serial: Option<String>,
        /// `issue`, `renew` or `revoke`.
        #[param(pattern = "^(issue|renew|revoke)$")]
        action: Option<String>,
    }

    /// `format=pem` for PEM; DER otherwise.
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Query)]
    pub struct CrlFormat {
        format: Option<String>,
    }

    /// A certificate issued here (serial, subject, validity, revocation).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct IssuedCertificate {
        serial: String,
        registration_id: Option<String>,
        /// `good` or `revoked`.
        status: Option<String>,
        not_before_utc: Option<String>,
        not_after_utc: Option<String>,
        revoked_at_utc: Option<String>,
        etag: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct RevokeRequest {
        /// An RFC 5280 reason name such as `keyCompromise` or `superseded`; absent: `unspecified`.
        reason: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct Revoked {
        /// The records of the certificates revoked by this request.
        revoked: Vec<IssuedCertificate>,
    }

    /// One issuance audit event.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct AuditEvent {
        /// `issue`, `renew` or `revoke`.
        action: Option<String>,
        serial: Option<String>,
        registration_id: Option<String>,
    }

    /// A CA certificate (DPS `CertificateResponse`).
    #[derive(ToSchema)]
    pub struct CaCertificate {
        name: String,
        etag: String,
        #[schema(rename = "type")]
        kind: String,
        properties: CaCertificateProperties,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct CaCertificateProperties {
        #[schema(value_type = Option<String>)]
        subject: Option<Value>,
        #[schema(value_type = Option<String>)]
        expiry: Option<Value>,
        #[schema(value_type = Option<String>)]
        thumbprint: Option<Value>,
        #[schema(value_type = Option<String>)]
        sha256_thumbprint: Option<Value>,
        is_verified: bool,
        created: String,
        updated: String,
        #[schema(value_type = Option<String>)]
        certificate: Option<Value>,
        /// While proof of possession is pending.
        verification_code: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct CertificateList {
        value: Vec<CaCertificate>,
    }

    /// A CA certificate upload: PEM or base64 DER, at the top or under `properties`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct CertificateUpload {
        certificate: Option<String>,
        /// Trust it without proof of possession.
        is_verified: Option<bool>,
        properties: Option<CertificateUploadProperties>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct CertificateUploadProperties {
        certificate: Option<String>,
        is_verified: Option<bool>,
    }

    /// Proof of possession: a certificate whose subject CN is the verification code, signed by
    /// the CA certificate's key.
    #[derive(ToSchema)]
    pub struct VerificationRequest {
        certificate: String,
    }

    /// A shared access policy of the management API.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct AuthorizationPolicy {
        key_name: String,
        /// Comma-separated: `ServiceConfig`, `EnrollmentRead`, `EnrollmentWrite`,
        /// `RegistrationStatusRead`, `RegistrationStatusWrite`.
        rights: String,
        primary_key: String,
        secondary_key: String,
        etag: String,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct AuthorizationPolicyInput {
        rights: String,
        /// Base64; absent: kept, or generated for a new policy.
        primary_key: Option<String>,
        secondary_key: Option<String>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct RegenerateKeyRequest {
        /// `primary` or `secondary`.
        key_type: String,
    }

    #[derive(ToSchema)]
    pub struct PolicyList {
        value: Vec<AuthorizationPolicy>,
    }

    /// A linked hub.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct LinkedHub {
        name: String,
        location: Option<String>,
        allocation_weight: Option<u32>,
        apply_allocation_policy: Option<bool>,
        service_url: Option<String>,
        /// `active` or `draining`.
        state: String,
        /// `healthy` or `unhealthy` (no heartbeat within the timeout).
        health: Option<String>,
        /// The hub of this very process, which cannot be drained or removed.
        built_in: Option<bool>,
    }

    #[derive(ToSchema)]
    pub struct HubList {
        value: Vec<LinkedHub>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct JoinTokenRequest {
        /// Lifetime in seconds; default 15 minutes.
        ttl_seconds: Option<u64>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct JoinToken {
        token: String,
        expires_at_utc: String,
    }

    /// What a joining hub says about itself.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct JoinRequestSchema {
        host_name: String,
        hostnames: Option<Vec<String>>,
        service_url: String,
        location: Option<String>,
        allocation_weight: Option<u32>,
        apply_allocation_policy: Option<bool>,
        /// The hub's service credential (its shared access policy), for DPS to call it.
        #[schema(value_type = Object)]
        credential: Value,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct JoinResponse {
        name: String,
        id_scope: String,
        heartbeat_token: String,
        heartbeat_interval_seconds: u64,
        heartbeat_timeout_seconds: u64,
        certificate_chain: String,
        private_key: String,
        trust_bundle: String,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct HeartbeatResponse {
        state: String,
        heartbeat_interval_seconds: u64,
        trust_bundle: String,
        crl_sha256: Option<String>,
    }

    /// `top`: at most this many devices (1 to 1000; default and out of range: 1000).
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Query)]
    pub struct Top {
        top: Option<i64>,
    }

    /// A device identity (IoT Hub `Device`).
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Device {
        device_id: Option<String>,
        generation_id: Option<String>,
        etag: Option<String>,
        /// `enabled` or `disabled`.
        status: Option<String>,
        status_reason: Option<String>,
        connection_state: Option<String>,
        /// `sas`, `selfSigned`, `certificateAuthority` or `none`, with the keys or thumbprints.
        #[schema(value_type = Option<Object>)]
        authentication: Option<Value>,
        #[schema(value_type = Option<Object>)]
        capabilities: Option<Value>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct RegistryStatistics {
        total_device_count: u64,
        enabled_device_count: u64,
        disabled_device_count: u64,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct ServiceStatistics {
        connected_device_count: u64,
    }

    /// A device twin (IoT Hub `Twin`): tags, desired and reported properties.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Twin {
        device_id: Option<String>,
        etag: Option<String>,
        #[schema(value_type = Option<Object>)]
        tags: Option<Value>,
        #[schema(value_type = Option<Object>)]
        properties: Option<Value>,
    }

    /// A direct method call.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct MethodInvocation {
        method_name: String,
        #[schema(value_type = Option<Value>)]
        payload: Option<Value>,
        response_timeout_in_seconds: Option<u64>,
        connect_timeout_in_seconds: Option<u64>,
    }

    #[derive(ToSchema)]
    pub struct MethodResult {
        status: i64,
        #[schema(value_type = Value)]
        payload: Value,
    }

    /// Paging of a device query.
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Header)]
    pub struct QueryPaging {
        /// Rows per page.
        #[serde(rename = "x-ms-max-item-count")]
        max_item_count: Option<u32>,
        #[serde(rename = "x-ms-continuation")]
        continuation: Option<String>,
    }

    /// An IoT Hub query: `SELECT … FROM devices [WHERE …] [GROUP BY …]`.
    #[derive(ToSchema)]
    pub struct HubQuery {
        query: String,
    }

    /// Message properties sent as headers: `iothub-messageid`, `iothub-correlationid`,
    /// `iothub-contenttype`, `iothub-contentencoding`, `iothub-app-<name>` and others.
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Header)]
    pub struct MessageProperties {
        #[serde(rename = "iothub-messageid")]
        message_id: Option<String>,
        #[serde(rename = "iothub-correlationid")]
        correlation_id: Option<String>,
        #[serde(rename = "iothub-contenttype")]
        content_type: Option<String>,
        #[serde(rename = "iothub-contentencoding")]
        content_encoding: Option<String>,
    }

    /// The telemetry consumer's read: by offset, optionally for one device, with long-polling.
    #[derive(Deserialize, IntoParams)]
    #[into_params(parameter_in = Query)]
    #[serde(rename_all = "camelCase")]
    pub struct ReadEvents {
        /// The first offset to read (default 0).
        from: Option<i64>,
        /// At most this many messages (1 to 1000, default 100).
        #[param(minimum = 1, maximum = 1000)]
        limit: Option<u64>,
        device_id: Option<String>,
        /// Seconds to wait for a message when there is none yet (0 to 60, default 0).
        #[param(minimum = 0, maximum = 60)]
        wait: Option<u64>,
    }

    /// One telemetry message.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Event {
        offset: i64,
        device_id: Option<String>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct EventsPage {
        messages: Vec<Event>,
        /// Where the next read starts.
        next_offset: i64,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The methods the router serves on each template, asked of the router itself: every
    /// method is sent to a sample path of every template, and a method is served when the
    /// request reaches that template's resource and is not refused there with 405. (The
    /// handlers run without `AppState`, so those that need it fail early; that is no 405.)
    fn served() -> BTreeSet<(String, String)> {
        use actix_web::dev::Service;
        use actix_web::http::Method;
        let methods = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ];
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let app = actix_web::test::init_service(
                    actix_web::App::new()
                        .configure(crate::http::configure)
                        .wrap_fn(|req, srv| {
                            let call = srv.call(req);
                            async move {
                                let response = call.await?;
                                let pattern = response.request().match_pattern();
                                let refused = response.status()
                                    == actix_web::http::StatusCode::METHOD_NOT_ALLOWED;
                                let verdict = match pattern {
                                    Some(p) if !refused => p,
                                    _ => String::new(),
                                };
                                let request = response.request().clone();
                                Ok(actix_web::dev::ServiceResponse::new(
                                    request,
                                    HttpResponse::Ok().body(verdict),
                                ))
                            }
                        }),
                )
                .await;
                let mut found = BTreeSet::new();
                for template in routes::ALL {
                    let path = openapi_path(template)
                        .split('/')
                        .map(|s| if s.starts_with('{') { "x" } else { s })
                        .collect::<Vec<_>>()
                        .join("/");
                    for method in &methods {
                        let req = actix_web::test::TestRequest::default()
                            .method(method.clone())
                            .uri(&path)
                            .to_request();
                        let response = app.call(req).await.expect("call");
                        let body = actix_web::body::to_bytes(response.into_body())
                            .await
                            .expect("body");
                        if body.as_ref() == template.as_bytes() {
                            found.insert((
                                openapi_path(template),
                                method.as_str().to_ascii_lowercase(),
                            ));
                        }
                    }
                }
                found
            })
    }

    fn described() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("document");
        let mut found = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, _) in item.as_object().expect("path item") {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    found.insert((path.clone(), method.clone()));
                }
            }
        }
        found
    }

    #[test]
    fn openapi_paths_are_actix_templates_without_patterns() {
        assert_eq!(openapi_path("/ocsp/{request:.*}"), "/ocsp/{request}");
        assert_eq!(openapi_path(routes::DEVICE_BOUND), routes::DEVICE_BOUND);
    }

    /// Every route the router serves is in the document with each method it serves, and the
    /// document describes nothing the router lacks.
    #[test]
    fn openapi_describes_exactly_the_routes_and_methods_served() {
        let served = served();
        let described = described();
        let templates: BTreeSet<String> = routes::ALL.iter().map(|t| openapi_path(t)).collect();
        let served_paths: BTreeSet<String> = served.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(served_paths, templates, "every template serves some method");
        let missing: Vec<_> = served.difference(&described).collect();
        let extra: Vec<_> = described.difference(&served).collect();
        assert!(missing.is_empty(), "served but not described: {missing:?}");
        assert!(extra.is_empty(), "described but not served: {extra:?}");
    }

    #[test]
    fn openapi_declares_security_where_the_code_enforces_it() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("document");
        let open = [
            routes::HEALTHZ,
            routes::TLS_CLIENT_CERTIFICATE,
            routes::METRICS,
        ];
        for path in open {
            let security = &doc["paths"][path]["get"]["security"];
            assert!(
                security.is_null(),
                "{path} needs no credentials: {security}"
            );
        }
        let secured = doc["paths"][routes::ENROLLMENT]["get"]["security"].to_string();
        assert!(secured.contains("SharedAccessSignature") && secured.contains("bearer"));
        let hub = doc["paths"][routes::DEVICE]["get"]["security"].to_string();
        assert!(hub.contains("hubSharedAccessSignature"), "{hub}");
    }

    #[test]
    fn openapi_names_zerotouch_and_its_version() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("document");
        assert_eq!(doc["info"]["title"], "Zerotouch");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["servers"][0]["url"], "/");
    }
}
