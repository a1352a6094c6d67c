//! Individual enrollments (`/enrollments`) and enrollment groups (`/enrollmentGroups`): the
//! DPS service API 2021-10-01 (spec §4.2). Both resources share these handlers, parameterised by
//! [`Kind`]. `input` checks a PUT body and writes the stored form.

mod input;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Rights;
use crate::db::{Collection, Document, Write};
use crate::enrollment::{Enrollment, Kind};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{
    AppState, authorize, if_match, json_body, page_response, paging, with_metadata, write_mode,
};

/// The operations of the group routes, which share the handlers with the individual ones.
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_query;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_bulk;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_attestation_mechanism;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_get;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_put;
#[allow(non_camel_case_types)]
#[derive(Clone)]
pub struct __path_group_delete;

/// Most items in one bulk request, as in Azure DPS.
pub const MAX_BULK_ITEMS: usize = 10;

pub fn configure(cfg: &mut web::ServiceConfig) {
    let kinds = [
        (
            Kind::Individual,
            [
                routes::ENROLLMENTS_QUERY,
                routes::ENROLLMENTS,
                routes::ENROLLMENT_ATTESTATION,
                routes::ENROLLMENT,
            ],
        ),
        (
            Kind::Group,
            [
                routes::GROUPS_QUERY,
                routes::GROUPS,
                routes::GROUP_ATTESTATION,
                routes::GROUP,
            ],
        ),
    ];
    for (kind, [query_path, collection, mechanism, one]) in kinds {
        let k = web::Data::new(kind);
        cfg.service(
            web::resource(query_path)
                .app_data(k.clone())
                .route(web::post().to(query)),
        )
        .service(
            web::resource(collection)
                .app_data(k.clone())
                .route(web::post().to(bulk)),
        )
        .service(
            web::resource(mechanism)
                .app_data(k.clone())
                .route(web::post().to(attestation_mechanism)),
        )
        .service(
            web::resource(one)
                .app_data(k)
                .route(web::get().to(get))
                .route(web::put().to(put))
                .route(web::delete().to(delete)),
        );
    }
}

fn base_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Individual => routes::ENROLLMENTS,
        Kind::Group => routes::GROUPS,
    }
}

fn collection(kind: Kind) -> Collection {
    match kind {
        Kind::Individual => Collection::IndividualEnrollments,
        Kind::Group => Collection::EnrollmentGroups,
    }
}

fn not_found(kind: Kind) -> ErrorCode {
    match kind {
        Kind::Individual => ErrorCode::EnrollmentNotFound,
        Kind::Group => ErrorCode::EnrollmentGroupNotFound,
    }
}

fn item_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Individual => "Enrollment",
        Kind::Group => "EnrollmentGroup",
    }
}

/// The stored document as the API shows it: body plus etag and timestamps.
pub fn view(doc: &Document, with_secrets: bool) -> Result<Value, ApiError> {
    let body = if with_secrets {
        doc.body.clone()
    } else {
        Enrollment::from_document(doc)?.without_secrets().to_json()
    };
    Ok(with_metadata(doc, body))
}

#[utoipa::path(
    get,
    path = routes::ENROLLMENT,
    operation_id = "getEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id")),
    responses((status = 200, description = "The enrollment without secrets (an individual enrollment with its registrationState, once registered)", body = crate::enrollment::Enrollment), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    get,
    path = routes::GROUP,
    operation_id = "getEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_get,
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id")),
    responses((status = 200, description = "The enrollment without secrets (an individual enrollment with its registrationState, once registered)", body = crate::enrollment::Enrollment), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let kind = **kind;
    let id = id.into_inner();
    let (doc, registration) = crate::db::blocking(&state.store, move |store| {
        let doc = store.get(collection(kind), &id)?;
        let registration = match (&doc, kind) {
            (Some(_), Kind::Individual) => store.get(Collection::Registrations, &id)?,
            _ => None,
        };
        Ok((doc, registration))
    })
    .await?;
    let doc = doc.ok_or_else(|| ApiError::new(not_found(kind), "no enrollment with this id"))?;
    let mut body = view(&doc, false)?;
    if let Some(registration) = registration {
        body["registrationState"] = super::registrations::view(&registration);
    }
    Ok(HttpResponse::Ok().json(body))
}

#[utoipa::path(
    post,
    path = routes::ENROLLMENT_ATTESTATION,
    operation_id = "attestationMechanismEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id")),
    responses((status = 200, description = "The attestation mechanism, with its keys and certificates", body = crate::enrollment::Attestation), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    post,
    path = routes::GROUP_ATTESTATION,
    operation_id = "attestationMechanismEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_attestation_mechanism,
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id")),
    responses((status = 200, description = "The attestation mechanism, with its keys and certificates", body = crate::enrollment::Attestation), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn attestation_mechanism(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let kind = **kind;
    let id = id.into_inner();
    let doc = crate::db::blocking(&state.store, move |store| store.get(collection(kind), &id))
        .await?
        .ok_or_else(|| ApiError::new(not_found(kind), "no enrollment with this id"))?;
    Ok(HttpResponse::Ok().json(Enrollment::from_document(&doc)?.attestation))
}

#[utoipa::path(
    put,
    path = routes::ENROLLMENT,
    operation_id = "createOrUpdateEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id"), crate::http::openapi::IfMatch),
    request_body(content = crate::enrollment::Enrollment, content_type = "application/json"),
    responses((status = 200, description = "The stored enrollment, with its secrets", body = crate::enrollment::Enrollment), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    put,
    path = routes::GROUP,
    operation_id = "createOrUpdateEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_put,
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id"), crate::http::openapi::IfMatch),
    request_body(content = crate::enrollment::Enrollment, content_type = "application/json"),
    responses((status = 200, description = "The stored enrollment, with its secrets", body = crate::enrollment::Enrollment), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_WRITE).await?;
    let body = json_body(&body)?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidJson, "the body is empty"))?;
    let doc = upsert(
        &state,
        **kind,
        id.into_inner(),
        body,
        write_mode(req.headers())?,
    )
    .await?;
    Ok(HttpResponse::Ok().json(view(&doc, true)?))
}

/// Validates and stores one enrollment. Shared by PUT and bulk.
async fn upsert(
    state: &web::Data<AppState>,
    kind: Kind,
    id: String,
    body: Value,
    write: Write,
) -> Result<Document, ApiError> {
    let previous = match &write {
        Write::Create => None,
        _ => {
            let id = id.clone();
            crate::db::blocking(&state.store, move |store| store.get(collection(kind), &id))
                .await?
                .map(|d| d.body)
        }
    };
    let doc = input::normalize(
        kind,
        &id,
        body,
        previous.as_ref(),
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )?;
    let references = Enrollment::from_json(&id, doc.clone())?.ca_references();
    if !references.is_empty() {
        let names = references.clone();
        let found = crate::db::blocking(&state.store, move |store| {
            names
                .iter()
                .map(|n| {
                    store
                        .get(Collection::CaCertificates, n)
                        .map(|d| d.is_some())
                })
                .collect::<Result<Vec<bool>, _>>()
        })
        .await?;
        for ((name, exists), slot) in references.iter().zip(found).zip(["primary", "secondary"]) {
            if !exists {
                return Err(ApiError::field(
                    ErrorCode::InvalidCertificate,
                    format!("attestation.x509.caReferences.{slot}"),
                    format!("no CA certificate named {name:?} has been uploaded"),
                ));
            }
        }
    }
    crate::db::blocking(&state.store, move |store| {
        store.put(collection(kind), &id, None, &doc, write)
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, not_found(kind)))
}

#[utoipa::path(
    delete,
    path = routes::ENROLLMENT,
    operation_id = "deleteEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    delete,
    path = routes::GROUP,
    operation_id = "deleteEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_delete,
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id (individual) or the enrollment group id"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_WRITE).await?;
    let kind = **kind;
    let id = id.into_inner();
    let etag = if_match(req.headers())?;
    crate::db::blocking(&state.store, move |store| {
        store.delete(collection(kind), &id, etag.as_deref())
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, not_found(kind)))?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
struct QuerySpecification {
    query: Option<String>,
}

/// The query texts we answer: `*` or `SELECT * FROM enrollments` (resp. `enrollmentGroups`).
pub fn check_query(text: &str, table: &str) -> Result<(), ApiError> {
    let normalized = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if normalized.is_empty()
        || normalized == "*"
        || normalized.eq_ignore_ascii_case(&format!("SELECT * FROM {table}"))
    {
        Ok(())
    } else {
        Err(ApiError::field(
            ErrorCode::InvalidQuery,
            "query",
            format!("only \"*\" and \"SELECT * FROM {table}\" are supported"),
        ))
    }
}

#[utoipa::path(
    post,
    path = routes::ENROLLMENTS_QUERY,
    operation_id = "queryEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion, crate::http::openapi::Paging),
    request_body(content = Option<crate::http::openapi::QuerySpecification>, content_type = "application/json", description = "Optional: `*` or `SELECT * FROM enrollments` (resp. `enrollmentGroups`)"),
    responses((status = 200, description = "A page of enrollments (without secrets); x-ms-continuation names the next", body = Vec<crate::enrollment::Enrollment>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    post,
    path = routes::GROUPS_QUERY,
    operation_id = "queryEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_query,
    params(crate::http::openapi::ApiVersion, crate::http::openapi::Paging),
    request_body(content = Option<crate::http::openapi::QuerySpecification>, content_type = "application/json", description = "Optional: `*` or `SELECT * FROM enrollments` (resp. `enrollmentGroups`)"),
    responses((status = 200, description = "A page of enrollments (without secrets); x-ms-continuation names the next", body = Vec<crate::enrollment::Enrollment>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn query(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_READ).await?;
    let kind = **kind;
    if let Some(spec) = json_body(&body)? {
        let spec: QuerySpecification = crate::http::parse_typed(spec)?;
        let table = base_path(kind).trim_start_matches('/');
        check_query(spec.query.as_deref().unwrap_or("*"), table)?;
    }
    let (size, continuation) = paging(req.headers())?;
    let page = crate::db::blocking(&state.store, move |store| {
        store.list(collection(kind), None, size, continuation.as_deref())
    })
    .await?;
    let items = page
        .items
        .iter()
        .map(|d| view(d, false))
        .collect::<Result<_, _>>()?;
    Ok(page_response(
        items,
        page.continuation,
        size,
        item_type(kind),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
enum BulkMode {
    Create,
    Update,
    UpdateIfMatchETag,
    Delete,
}

#[utoipa::path(
    post,
    path = routes::ENROLLMENTS,
    operation_id = "bulkEnrollment",
    tag = "enrollments",
    params(crate::http::openapi::ApiVersion),
    request_body(content = crate::http::openapi::BulkOperation, content_type = "application/json"),
    responses((status = 200, description = "Each item applied or refused on its own", body = crate::http::openapi::BulkResult), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
#[utoipa::path(
    post,
    path = routes::GROUPS,
    operation_id = "bulkEnrollmentGroup",
    tag = "enrollments",
    impl_for = __path_group_bulk,
    params(crate::http::openapi::ApiVersion),
    request_body(content = crate::http::openapi::BulkOperation, content_type = "application/json"),
    responses((status = 200, description = "Each item applied or refused on its own", body = crate::http::openapi::BulkResult), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn bulk(
    req: HttpRequest,
    state: web::Data<AppState>,
    kind: web::Data<Kind>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::ENROLLMENT_WRITE).await?;
    let kind = **kind;
    let body = json_body(&body)?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidJson, "the body is empty"))?;
    let list_field = match kind {
        Kind::Individual => "enrollments",
        Kind::Group => "enrollmentGroups",
    };
    let mode: BulkMode =
        crate::http::parse_typed(body.get("mode").cloned().ok_or_else(|| {
            ApiError::field(ErrorCode::InvalidBulkOperation, "mode", "is required")
        })?)
        .map_err(|e| ApiError::field(ErrorCode::InvalidBulkOperation, "mode", e.message))?;
    let items = body
        .get(list_field)
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidBulkOperation,
                list_field,
                "must be an array",
            )
        })?;
    if items.is_empty() || items.len() > MAX_BULK_ITEMS {
        return Err(ApiError::field(
            ErrorCode::InvalidBulkOperation,
            list_field,
            format!("must hold 1 to {MAX_BULK_ITEMS} items"),
        ));
    }
    let id_field = kind.id_field();
    let mut errors = Vec::new();
    for item in items {
        let id = item.get(id_field).and_then(Value::as_str).map(String::from);
        let result = match id.clone() {
            None => Err(ApiError::field(
                ErrorCode::InvalidField,
                id_field,
                "is required",
            )),
            Some(id) => bulk_item(&state, kind, mode, id, item).await,
        };
        if let Err(e) = result {
            let (_, number, _) = e.code.wire();
            errors.push(json!({
                id_field: id.unwrap_or_default(),
                "errorCode": number,
                "errorStatus": e.message,
            }));
        }
    }
    Ok(HttpResponse::Ok().json(json!({"isSuccessful": errors.is_empty(), "errors": errors})))
}

async fn bulk_item(
    state: &web::Data<AppState>,
    kind: Kind,
    mode: BulkMode,
    id: String,
    item: Value,
) -> Result<(), ApiError> {
    let etag = item.get("etag").and_then(Value::as_str).map(String::from);
    match mode {
        BulkMode::Create => upsert(state, kind, id, item, Write::Create).await.map(drop),
        BulkMode::Update => upsert(state, kind, id, item, Write::Upsert).await.map(drop),
        BulkMode::UpdateIfMatchETag => {
            let etag = etag.ok_or_else(|| {
                ApiError::field(
                    ErrorCode::IfMatchRequired,
                    "etag",
                    "updateIfMatchETag needs each item's etag",
                )
            })?;
            upsert(state, kind, id, item, Write::IfMatch(etag))
                .await
                .map(drop)
        }
        BulkMode::Delete => crate::db::blocking(&state.store, move |store| {
            store.delete(collection(kind), &id, etag.as_deref())
        })
        .await
        .map_err(|e| crate::http::error::store_error(e, not_found(kind)))
        .map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_we_answer() {
        assert!(check_query("*", "enrollments").is_ok());
        assert!(check_query("select *  from ENROLLMENTS", "enrollments").is_ok());
        assert_eq!(
            check_query("SELECT * FROM devices", "enrollments")
                .unwrap_err()
                .code,
            ErrorCode::InvalidQuery
        );
    }

    #[test]
    fn bodies() {
        assert!(json_body(b"  ").unwrap().is_none());
        assert_eq!(json_body(b"{").unwrap_err().code, ErrorCode::InvalidJson);
    }
}
