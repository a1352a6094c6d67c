//! Device registration states (spec §4.2, §4.5): read, delete, and query per enrollment group.
//! The store is filled by device registration (a later issue); until then it is empty.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

use crate::auth::Rights;
use crate::db::{Collection, Document};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, authorize, if_match, page_response, paging, with_metadata};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::REGISTRATIONS_QUERY).route(web::post().to(query)))
        .service(
            web::resource(routes::REGISTRATION)
                .route(web::get().to(get))
                .route(web::delete().to(delete)),
        );
}

/// A registration as the service API shows it.
pub fn view(doc: &Document) -> Value {
    with_metadata(doc, crate::dps::device_view(doc))
}

#[utoipa::path(
    get,
    path = routes::REGISTRATION,
    operation_id = "getRegistrationState",
    tag = "registrations",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id")),
    responses((status = 200, description = "The registration state", body = crate::http::openapi::RegistrationState), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::REGISTRATION_STATUS_READ).await?;
    let id = id.into_inner();
    let doc = crate::db::blocking(&state.store, move |store| {
        store.get(Collection::Registrations, &id)
    })
    .await?
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::RegistrationNotFound,
            "no registration with this id",
        )
    })?;
    Ok(HttpResponse::Ok().json(view(&doc)))
}

#[utoipa::path(
    delete,
    path = routes::REGISTRATION,
    operation_id = "deleteRegistrationState",
    tag = "registrations",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The registration id"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::REGISTRATION_STATUS_WRITE).await?;
    let id = id.into_inner();
    let etag = if_match(req.headers())?;
    crate::db::blocking(&state.store, move |store| {
        store.delete(Collection::Registrations, &id, etag.as_deref())
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::RegistrationNotFound))?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /registrations/{enrollmentGroupId}/query`: the devices registered through a group.
#[utoipa::path(
    post,
    path = routes::REGISTRATIONS_QUERY,
    operation_id = "queryRegistrationStates",
    tag = "registrations",
    params(crate::http::openapi::ApiVersion, ("id" = String, Path, description = "The enrollment group id"), crate::http::openapi::Paging),
    responses((status = 200, description = "A page of the group's registration states", body = Vec<crate::http::openapi::RegistrationState>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn query(
    req: HttpRequest,
    state: web::Data<AppState>,
    group: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::REGISTRATION_STATUS_READ).await?;
    let group = group.into_inner();
    let (size, continuation) = paging(req.headers())?;
    let page = crate::db::blocking(&state.store, move |store| {
        store.list(
            Collection::Registrations,
            Some(&group),
            size,
            continuation.as_deref(),
        )
    })
    .await?;
    let items = page.items.iter().map(view).collect();
    Ok(page_response(
        items,
        page.continuation,
        size,
        "DeviceRegistration",
    ))
}
