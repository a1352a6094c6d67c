//! `GET /healthz`: 200 once the service is ready (the database answers and takes writes), 503
//! with a reason otherwise. Also `GET /tls/client-certificate`, which echoes what the TLS layer
//! saw of the client's certificate: a debugging aid for device makers, and proof that the chain
//! reaches handlers.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::db::StoreError;
use crate::http::error::ApiError;
use crate::http::routes;
use crate::http::{AppState, peer_certificates};

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Resources, not `cfg.route`: another method on these paths is then a 405, as on every
    // other resource, instead of falling through to the 404 of the default service.
    cfg.service(web::resource(routes::HEALTHZ).route(web::get().to(healthz)))
        .service(
            web::resource(routes::TLS_CLIENT_CERTIFICATE).route(web::get().to(client_certificate)),
        );
}

/// The store must answer and take writes: a database that reads but cannot write (a full
/// disk) is degraded, and a load balancer should send traffic elsewhere until it recovers,
/// which it does by itself (`DocumentStore::check_writable` probes).
#[utoipa::path(
    get,
    path = routes::HEALTHZ,
    operation_id = "healthz",
    tag = "service",
    responses((status = 200, description = "The store answers and takes writes", body = crate::http::openapi::Health), (status = 503, description = "Degraded: the store (or NATS) fails; retry after `retry-after`", body = crate::http::openapi::Health), (status = 500, description = "Internal error", body = crate::http::openapi::AzureError)),
)]
async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    let checked = web::block(move || store.ping().and_then(|()| store.check_writable()))
        .await
        .map_err(ApiError::internal)?;
    // Replica mode: which replicas are there, and whether this one reaches NATS.
    let replica = state.cluster.as_ref().map(|cluster| {
        json!({
            "name": cluster.replica(),
            "nats": if cluster.connected() { "connected" } else { "disconnected" },
            "replicas": cluster.members(),
        })
    });
    let nats_down = state.cluster.as_ref().is_some_and(|c| !c.connected());
    Ok(match checked {
        Ok(()) if nats_down => {
            tracing::warn!("health check: NATS cannot be reached");
            HttpResponse::ServiceUnavailable()
                .insert_header(("retry-after", "5"))
                .json(json!({
                    "status": "degraded",
                    "store": "ok",
                    "reason": "NATS cannot be reached: new device connections are refused until it is back",
                    "idScope": state.instance.id_scope,
                    "replica": replica,
                }))
        }
        Ok(()) => {
            let mut body = json!({"status": "ok", "idScope": state.instance.id_scope});
            if let Some(replica) = replica {
                body["replica"] = replica;
            }
            HttpResponse::Ok().json(body)
        }
        Err(fault) => {
            tracing::warn!(%fault, "health check: the store is degraded");
            HttpResponse::ServiceUnavailable()
                .insert_header(("retry-after", "5"))
                .json(json!({
                    "status": "degraded",
                    "store": store_state(&fault),
                    "reason": reason(&fault),
                    "idScope": state.instance.id_scope,
                    "replica": replica.unwrap_or(serde_json::Value::Null),
                }))
        }
    })
}

/// A stable word for the store's state, for monitoring rules.
fn store_state(fault: &StoreError) -> &'static str {
    match fault {
        StoreError::Full(_) => "full",
        StoreError::Unavailable(_) => "unavailable",
        _ => "failing",
    }
}

/// What an operator reads; the database's own message stays in the log.
fn reason(fault: &StoreError) -> &'static str {
    match fault {
        StoreError::Full(_) => "the storage is full: writes fail until space is freed",
        StoreError::Unavailable(_) => "the database cannot be reached or written",
        _ => "writes to the database fail (details in the log)",
    }
}

#[utoipa::path(
    get,
    path = routes::TLS_CLIENT_CERTIFICATE,
    operation_id = "tlsClientCertificate",
    tag = "service",
    responses((status = 200, description = "What the TLS client presented on this connection", body = crate::http::openapi::ClientCertificate)),
)]
async fn client_certificate(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match peer_certificates(&req) {
        None => HttpResponse::Ok().json(json!({"presented": false})),
        Some(peer) => {
            let leaf = zerotouch_attestation::x509::parse_certificate(&peer.leaf_pem())
                .map(|c| serde_json::to_value(c.info()).unwrap_or_default())
                .unwrap_or_else(|e| json!({"error": e.to_string()}));
            HttpResponse::Ok().json(json!({
                "presented": true,
                "leaf": leaf,
                "chainLength": peer.chain.len(),
                "verifiedByServerCa": peer.chains_to(state.instance.ca.trust_bundle_pem().as_bytes()),
            }))
        }
    }
}
