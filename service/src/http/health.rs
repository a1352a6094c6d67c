//! `GET /healthz`: 200 once the service is ready (database reachable), 503 otherwise.
//! Also `GET /tls/client-certificate`, which echoes what the TLS layer saw of the client's
//! certificate: a debugging aid for device makers, and proof that the chain reaches handlers.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, blocking, peer_certificates};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(routes::HEALTHZ, web::get().to(healthz)).route(
        routes::TLS_CLIENT_CERTIFICATE,
        web::get().to(client_certificate),
    );
}

async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    blocking(&state, |store| store.ping()).await.map_err(|e| {
        if e.code == ErrorCode::Internal {
            ApiError::new(ErrorCode::Unavailable, "the database is not answering")
        } else {
            e
        }
    })?;
    Ok(HttpResponse::Ok().json(json!({"status": "ok", "idScope": state.instance.id_scope})))
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
