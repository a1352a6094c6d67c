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
    cfg.route(routes::HEALTHZ, web::get().to(healthz)).route(
        routes::TLS_CLIENT_CERTIFICATE,
        web::get().to(client_certificate),
    );
}

/// The store must answer and take writes: a database that reads but cannot write (a full
/// disk) is degraded, and a load balancer should send traffic elsewhere until it recovers,
/// which it does by itself (`DocumentStore::check_writable` probes).
async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    let checked = web::block(move || store.ping().and_then(|()| store.check_writable()))
        .await
        .map_err(ApiError::internal)?;
    Ok(match checked {
        Ok(()) => HttpResponse::Ok().json(json!({
            "status": "ok",
            "idScope": state.instance.id_scope,
        })),
        Err(fault) => {
            tracing::warn!(%fault, "health check: the store is degraded");
            HttpResponse::ServiceUnavailable()
                .insert_header(("retry-after", "5"))
                .json(json!({
                    "status": "degraded",
                    "store": store_state(&fault),
                    "reason": reason(&fault),
                    "idScope": state.instance.id_scope,
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

async fn client_certificate(req: HttpRequest) -> HttpResponse {
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
                "verifiedByServerCa": peer.verified_by_server_ca,
            }))
        }
    }
}
