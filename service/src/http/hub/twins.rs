//! `/twins/{id}`: twin read, PATCH (merge) and PUT (replace), and direct methods.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::{authorize, if_match, json_body};
use crate::auth::Rights;
use crate::http::AppState;
use crate::http::routes;
use crate::hub::error::{HubError, HubErrorCode};
use crate::hub::methods::MethodRequest;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::TWIN_METHODS).route(web::post().to(invoke)))
        .service(
            web::resource(routes::TWIN)
                .route(web::get().to(get))
                .route(web::patch().to(patch))
                .route(web::put().to(put)),
        );
}

/// Twin reads are ServiceConnect in IoT Hub; RegistryRead may read too.
const READERS: &[Rights] = &[Rights::SERVICE_CONNECT, Rights::REGISTRY_READ];

#[utoipa::path(
    get,
    path = routes::TWIN,
    operation_id = "getTwin",
    tag = "hub",
    params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The twin", body = crate::http::openapi::Twin), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, READERS).await?;
    Ok(HttpResponse::Ok().json(hub.twin_view(&id).await?))
}

async fn write(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
    replace: bool,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::SERVICE_CONNECT]).await?;
    let body = json_body(&body)?;
    if !body.is_object() {
        return Err(HubError::new(
            HubErrorCode::ArgumentInvalid,
            "the twin must be a JSON object",
        ));
    }
    let etag = if_match(&req)?;
    let view = hub.write_twin(&id, &body, etag.as_deref(), replace).await?;
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(
    patch,
    path = routes::TWIN,
    operation_id = "updateTwin",
    tag = "hub",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::Twin, content_type = "application/json", description = "Tags and desired properties to merge"),
    responses((status = 200, description = "The twin after the patch", body = crate::http::openapi::Twin), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn patch(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    write(req, state, id, body, false).await
}

#[utoipa::path(
    put,
    path = routes::TWIN,
    operation_id = "replaceTwin",
    tag = "hub",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::Twin, content_type = "application/json", description = "Tags and desired properties that replace the current ones"),
    responses((status = 200, description = "The replaced twin", body = crate::http::openapi::Twin), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    write(req, state, id, body, true).await
}

#[utoipa::path(
    post,
    path = routes::TWIN_METHODS,
    operation_id = "invokeMethod",
    tag = "hub",
    params(("id" = String, Path, description = "The device id")),
    request_body(content = crate::http::openapi::MethodInvocation, content_type = "application/json"),
    responses((status = 200, description = "The device's answer", body = crate::http::openapi::MethodResult), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn invoke(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::SERVICE_CONNECT]).await?;
    let request: MethodRequest =
        serde_path_to_error::deserialize(json_body(&body)?).map_err(|e| {
            HubError::new(
                HubErrorCode::ArgumentInvalid,
                format!("{}: {}", e.path(), e.inner()),
            )
        })?;
    let response = hub.invoke_method(&id, request).await?;
    Ok(HttpResponse::Ok().json(json!({"status": response.status, "payload": response.payload})))
}
