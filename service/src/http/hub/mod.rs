//! The hub's service API (hub-protocol §4, api-version 2021-04-12 as azure-iot-hub sends it),
//! plus the device-side HTTPS telemetry endpoint (§6) and a telemetry consumer API. One file
//! per resource; errors are `HubError`s in IoT Hub's shape.

pub mod devices;
pub mod messages;
pub mod query;
pub mod twins;

use std::sync::Arc;

use actix_web::{HttpRequest, web};
use zerotouch_attestation::symmetric_key::SasToken;

use crate::auth::{Caller, Rights};
use crate::http::AppState;
use crate::hub::error::{HubError, HubErrorCode};
use crate::hub::{Hub, auth};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.configure(query::configure)
        .configure(messages::configure)
        .configure(twins::configure)
        .configure(devices::configure);
}

/// Path prefixes served by the hub API, for error rendering in `observe`.
pub fn is_hub_path(path: &str) -> bool {
    ["/devices", "/twins", "/statistics", "/messages"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

pub fn hub_of(state: &web::Data<AppState>) -> Result<Arc<Hub>, HubError> {
    state
        .hub
        .clone()
        .ok_or_else(|| HubError::new(HubErrorCode::NotFound, "this instance runs no hub"))
}

fn sas_token(req: &HttpRequest) -> Result<SasToken, HubError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            HubError::new(
                HubErrorCode::IotHubUnauthorizedAccess,
                "missing Authorization: SharedAccessSignature …",
            )
        })?;
    SasToken::parse(header).map_err(|e| {
        HubError::new(
            HubErrorCode::IotHubUnauthorizedAccess,
            format!("malformed SAS token: {e}"),
        )
    })
}

/// Authenticates a service caller holding any one of `needed`.
pub async fn authorize(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    needed: &[Rights],
) -> Result<(Arc<Hub>, Caller), HubError> {
    let hub = hub_of(state)?;
    let console = crate::http::console::caller(req, state)
        .await
        .map_err(from_session)?;
    if let Some(caller) = console {
        return holding_any(hub, caller, needed);
    }
    if let Some(token) = bearer_token(req) {
        let secret = crate::db::blocking(hub.store(), |s| {
            s.setting_get(crate::bootstrap::TOKEN_SECRET_KEY)
        })
        .await?
        .unwrap_or_default();
        let caller = crate::auth::verify_token(
            &token,
            &secret,
            &state.instance.id_scope,
            crate::time::now_unix(),
        )
        .map_err(|e| {
            hub.metrics.auth_failure("bearer_token");
            from_api(&crate::http::error::ApiError::from(e))
        })?;
        return holding_any(hub, caller, needed);
    }
    let token = sas_token(req)?;
    let name = token.skn.clone().unwrap_or_default();
    let policy = crate::db::blocking(hub.store(), move |s| auth::policy(s, &name)).await?;
    let now = crate::time::now_unix();
    let mut last = None;
    for right in needed {
        match auth::verify_service_token(&token, policy.as_ref(), &hub, req.path(), *right, now) {
            Ok(caller) => return Ok((hub, caller)),
            Err(e) if e.code == HubErrorCode::Forbidden => last = Some(e),
            Err(e) => {
                hub.metrics.auth_failure("service_token");
                return Err(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| HubError::new(HubErrorCode::Forbidden, "no right grants this")))
}

/// The token of `Authorization: Bearer …` (from `zerotouch token create`), if that is sent.
fn bearer_token(req: &HttpRequest) -> Option<String> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// `caller`, if it holds one of `needed`.
fn holding_any(
    hub: Arc<Hub>,
    caller: Caller,
    needed: &[Rights],
) -> Result<(Arc<Hub>, Caller), HubError> {
    if needed.iter().any(|right| caller.rights.contains(*right)) {
        Ok((hub, caller))
    } else {
        Err(HubError::new(
            HubErrorCode::Forbidden,
            format!("{} holds none of the rights this needs", caller.principal),
        ))
    }
}

/// A refused console session, in IoT Hub's terms.
fn from_session(error: crate::http::console::session::SessionError) -> HubError {
    from_api(&crate::http::error::ApiError::from(error))
}

/// `If-Match`, normalised: none, or the etag (`*` kept).
pub fn if_match(req: &HttpRequest) -> Result<Option<String>, HubError> {
    match req.headers().get(actix_web::http::header::IF_MATCH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim().to_string()))
            .map_err(|_| HubError::new(HubErrorCode::ArgumentInvalid, "If-Match is not ASCII")),
    }
}

/// A JSON body (empty → error).
pub fn json_body(bytes: &[u8]) -> Result<serde_json::Value, HubError> {
    crate::http::json_body(bytes)
        .map_err(|e| from_api(&e))?
        .ok_or_else(|| HubError::new(HubErrorCode::ArgumentNull, "the body is empty"))
}

/// An error of the DPS-shaped HTTP layer (a body that is not JSON, a framework error) met on a
/// hub route, in IoT Hub's terms.
pub(crate) fn from_api(error: &crate::http::error::ApiError) -> HubError {
    HubError::from_status(
        error.status().as_u16(),
        error.message.clone(),
        error.internal_detail(),
    )
}
