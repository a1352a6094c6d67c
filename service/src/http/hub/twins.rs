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

async fn patch(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    write(req, state, id, body, false).await
}

async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    write(req, state, id, body, true).await
}

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
