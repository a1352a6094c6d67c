//! `/devices/{id}`: the identity registry, and `/statistics`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::{authorize, if_match, json_body};
use crate::auth::Rights;
use crate::db::Collection;
use crate::http::AppState;
use crate::http::routes;
use crate::hub::device::DeviceStatus;
use crate::hub::error::HubError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::DEVICES).route(web::get().to(list)))
        .service(
            web::resource(routes::DEVICE)
                .route(web::get().to(get))
                .route(web::put().to(put))
                .route(web::delete().to(delete)),
        )
        .service(
            web::resource(routes::STATISTICS_DEVICES).route(web::get().to(registry_statistics)),
        )
        .service(
            web::resource(routes::STATISTICS_SERVICE).route(web::get().to(service_statistics)),
        );
}

#[utoipa::path(
    get,
    path = routes::DEVICE,
    operation_id = "getDevice",
    tag = "hub",
    params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The device identity", body = crate::http::openapi::Device), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::REGISTRY_READ]).await?;
    Ok(HttpResponse::Ok().json(hub.device_view(&id).await?))
}

#[utoipa::path(
    put,
    path = routes::DEVICE,
    operation_id = "createOrUpdateDevice",
    tag = "hub",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::Device, content_type = "application/json"),
    responses((status = 200, description = "The stored device identity", body = crate::http::openapi::Device), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::REGISTRY_WRITE]).await?;
    let body = json_body(&body)?;
    let device = hub.put_device(&id, body, if_match(&req)?).await?;
    Ok(HttpResponse::Ok().json(device))
}

#[utoipa::path(
    delete,
    path = routes::DEVICE,
    operation_id = "deleteDevice",
    tag = "hub",
    params(("id" = String, Path, description = "The device id"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::HubErrors, crate::http::openapi::HubWriteErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::REGISTRY_WRITE]).await?;
    hub.delete_device(&id, if_match(&req)?).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
struct ListQuery {
    top: Option<i64>,
}

#[utoipa::path(
    get,
    path = routes::DEVICES,
    operation_id = "listDevices",
    tag = "hub",
    params(crate::http::openapi::Top),
    responses((status = 200, description = "Devices", body = Vec<crate::http::openapi::Device>), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::REGISTRY_READ]).await?;
    // As IoT Hub: a top outside 1..=1000 means 1000.
    let top = query
        .top
        .filter(|t| (1..=1000).contains(t))
        .map_or(1000, |t| t as usize);
    Ok(HttpResponse::Ok().json(hub.list_devices(top).await?))
}

#[utoipa::path(
    get,
    path = routes::STATISTICS_DEVICES,
    operation_id = "registryStatistics",
    tag = "hub",
    responses((status = 200, description = "Device counts", body = crate::http::openapi::RegistryStatistics), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn registry_statistics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::REGISTRY_READ]).await?;
    let (total, enabled) = crate::db::blocking(hub.store(), |s| {
        let mut total = 0u64;
        let mut enabled = 0u64;
        let mut continuation: Option<String> = None;
        loop {
            let page = s.list(Collection::Devices, None, 1000, continuation.as_deref())?;
            for doc in &page.items {
                total += 1;
                if doc.body.get("status").and_then(|v| v.as_str())
                    == Some(DeviceStatus::Enabled.as_str())
                {
                    enabled += 1;
                }
            }
            match page.continuation {
                Some(next) => continuation = Some(next),
                None => return Ok((total, enabled)),
            }
        }
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "totalDeviceCount": total,
        "enabledDeviceCount": enabled,
        "disabledDeviceCount": total - enabled,
    })))
}

#[utoipa::path(
    get,
    path = routes::STATISTICS_SERVICE,
    operation_id = "serviceStatistics",
    tag = "hub",
    responses((status = 200, description = "Connected devices", body = crate::http::openapi::ServiceStatistics), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn service_statistics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(&req, &state, &[Rights::SERVICE_CONNECT]).await?;
    Ok(HttpResponse::Ok().json(json!({"connectedDeviceCount": hub.connected_count()})))
}
