//! The web console at `/console`: a page and its script, embedded in the binary, that drive
//! the same management and hub APIs as the CLI and the SDKs.
//!
//! The browser signs in once with a management credential ([`session`]); its requests then
//! carry a sealed session cookie instead of an `Authorization` header, and `http::authorize`
//! and `http::hub::authorize` take the caller from it ([`caller`]), so every right is enforced
//! by the API itself, exactly as for any other client. Besides the session, the console has
//! two read-only endpoints of its own: the last hour of rates ([`rates`]) and the CRL's state.

pub mod rates;
pub mod session;

use actix_web::cookie::{Cookie, SameSite, time::Duration as CookieDuration};
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::db::Collection;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::{AppState, routes};
use session::{Credential, Session, SessionError};

/// What the console keeps in the process.
#[derive(Default)]
pub struct Console {
    pub rates: rates::Rates,
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// What the page may load and where it may connect: only this origin, no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Resources, so another method is a 405 as everywhere else.
    cfg.service(web::resource(routes::ROOT).route(web::get().to(root)))
        .service(web::resource(routes::CONSOLE).route(web::get().to(index)))
        .service(web::resource(routes::CONSOLE_ASSET).route(web::get().to(asset)))
        .service(
            web::resource(routes::CONSOLE_SESSION)
                .route(web::get().to(get_session))
                .route(web::post().to(sign_in))
                .route(web::delete().to(sign_out)),
        )
        .service(web::resource(routes::CONSOLE_RATES).route(web::get().to(get_rates)))
        .service(web::resource(routes::CONSOLE_PKI).route(web::get().to(get_pki)));
}

/// `/` is the console's address for people.
#[utoipa::path(
    get,
    path = routes::ROOT,
    operation_id = "root",
    tag = "console",
    responses((status = 302, description = "Redirects to /console")),
)]
pub(crate) async fn root() -> HttpResponse {
    HttpResponse::Found()
        .insert_header((header::LOCATION, routes::CONSOLE))
        .finish()
}

fn page(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .body(body)
}

#[utoipa::path(
    get,
    path = routes::CONSOLE,
    operation_id = "console",
    tag = "console",
    responses((status = 200, description = "The console's page", content_type = "text/html", body = String)),
)]
pub(crate) async fn index() -> HttpResponse {
    page("text/html; charset=utf-8", INDEX_HTML)
}

#[utoipa::path(
    get,
    path = routes::CONSOLE_ASSET,
    operation_id = "consoleAsset",
    tag = "console",
    params(("file" = String, Path, description = "`app.js` or `app.css`")),
    responses(
        (status = 200, description = "The script or the style sheet", content_type = "text/plain", body = String),
        (status = 404, description = "No such file", body = crate::http::openapi::AzureError),
    ),
)]
pub(crate) async fn asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    match file.as_str() {
        "app.js" => Ok(page("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(page("text/css; charset=utf-8", APP_CSS)),
        _ => Err(ApiError::new(ErrorCode::NotFound, "no such console file")),
    }
}

/// The token secret as stored now (it seals the cookies).
async fn token_secret(state: &web::Data<AppState>) -> Result<String, ApiError> {
    crate::db::blocking(&state.store, |store| {
        store.setting_get(crate::bootstrap::TOKEN_SECRET_KEY)
    })
    .await?
    .ok_or_else(|| ApiError::internal("the token secret is missing"))
}

fn cookie_of(req: &HttpRequest) -> Option<String> {
    req.cookie(session::COOKIE).map(|c| c.value().to_string())
}

/// Whether a request changes something (and so needs the CSRF token).
fn is_change(req: &HttpRequest) -> bool {
    !matches!(
        *req.method(),
        actix_web::http::Method::GET | actix_web::http::Method::HEAD
    )
}

fn csrf_matches(req: &HttpRequest, session: &Session) -> bool {
    req.headers()
        .get(session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sent| {
            sent.len() == session.csrf.len()
                && openssl::memcmp::eq(sent.as_bytes(), session.csrf.as_bytes())
        })
}

/// The session of a request that sends no `Authorization` header but the console's cookie,
/// with its caller; changes must carry the CSRF token. `None` when the request does not use a
/// console session (then the caller must authenticate as usual).
pub async fn session_of(
    req: &HttpRequest,
    state: &web::Data<AppState>,
) -> Result<Option<(Session, Caller)>, SessionError> {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return Ok(None);
    }
    let Some(cookie) = cookie_of(req) else {
        return Ok(None);
    };
    let store = state.store.clone();
    let id_scope = state.instance.id_scope.clone();
    let session = crate::db::blocking(&store, move |store| {
        let secret = store
            .setting_get(crate::bootstrap::TOKEN_SECRET_KEY)?
            .unwrap_or_default();
        let Some(session) = session::open(&cookie, &secret) else {
            return Ok(Err(SessionError::Expired));
        };
        let caller =
            session::caller_of(&session, store, &id_scope, &secret, crate::time::now_unix());
        Ok(caller.map(|caller| (session, caller)))
    })
    .await
    .map_err(SessionError::Store)??;
    if is_change(req) && !csrf_matches(req, &session.0) {
        return Err(SessionError::Csrf);
    }
    Ok(Some(session))
}

/// The caller of a console request, for the API's own authorization.
pub async fn caller(
    req: &HttpRequest,
    state: &web::Data<AppState>,
) -> Result<Option<Caller>, SessionError> {
    Ok(session_of(req, state).await?.map(|(_, caller)| caller))
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> ApiError {
        match error {
            SessionError::Malformed(message) => {
                ApiError::field(ErrorCode::InvalidField, "credential", message)
            }
            SessionError::Refused(e) => ApiError::from(e),
            e @ SessionError::Expired => ApiError::new(ErrorCode::SessionExpired, e.to_string()),
            e @ SessionError::Csrf => ApiError::new(ErrorCode::CsrfTokenInvalid, e.to_string()),
            SessionError::Store(e) => ApiError::from(e),
            SessionError::Internal(detail) => ApiError::internal(detail),
        }
    }
}

/// What the page learns about its session. The CSRF token is here and nowhere else a script
/// of another origin could read it.
fn describe(state: &AppState, session: &Session, caller: &Caller) -> ConsoleSession {
    let credentials = session
        .credentials
        .iter()
        .map(|c| match c {
            Credential::Token { .. } => json!({"kind": "token"}),
            Credential::Policy { name, .. } => json!({"kind": "policy", "name": name}),
        })
        .collect();
    ConsoleSession {
        principal: caller.principal.clone(),
        rights: caller
            .rights
            .names()
            .into_iter()
            .map(String::from)
            .collect(),
        csrf_token: session.csrf.clone(),
        expires_utc: crate::time::rfc3339_of_unix(session.expires),
        credentials,
        id_scope: state.instance.id_scope.clone(),
        runs_provisioning: state.dps.is_some(),
        runs_hub: state.hub.is_some(),
        host_name: state.settings.service.hostnames.first().cloned(),
    }
}

fn session_cookie(value: String, max_age_seconds: i64) -> Cookie<'static> {
    Cookie::build(session::COOKIE, value)
        .path("/")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .max_age(CookieDuration::seconds(max_age_seconds))
        .finish()
}

#[utoipa::path(
    get,
    path = routes::CONSOLE_SESSION,
    operation_id = "consoleSession",
    tag = "console",
    security(("consoleSession" = [])),
    responses(
        (status = 200, description = "The session: principal, rights, CSRF token, expiry", body = ConsoleSession),
        (status = 401, description = "No session, or one that ended with its credential (`SessionExpired`, a rotated key)", body = crate::http::openapi::AzureError),
    ),
)]
pub(crate) async fn get_session(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match session_of(&req, &state).await? {
        Some((session, caller)) => Ok(HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(describe(&state, &session, &caller))),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "no console session: sign in",
        )),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct SignIn {
    /// A connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`) or a token
    /// from `zerotouch token create`.
    credential: Option<String>,
}

/// A console session as the page sees it (the schema of `describe`'s JSON).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConsoleSession {
    principal: String,
    rights: Vec<String>,
    csrf_token: String,
    expires_utc: String,
    credentials: Vec<serde_json::Value>,
    id_scope: String,
    runs_provisioning: bool,
    runs_hub: bool,
    host_name: Option<String>,
}

/// Signs in with a credential, or adds one to the current session (which then needs its
/// CSRF token). The answer sets the session cookie.
#[utoipa::path(
    post,
    path = routes::CONSOLE_SESSION,
    operation_id = "consoleSignIn",
    tag = "console",
    request_body = SignIn,
    responses(
        (status = 200, description = "Signed in (or the credential added); sets the session cookie", body = ConsoleSession),
        (status = 400, description = "Not JSON, or not a credential", body = crate::http::openapi::AzureError),
        (status = 401, description = "The credential does not verify", body = crate::http::openapi::AzureError),
        (status = 403, description = "Adding to a session without its CSRF token", body = crate::http::openapi::AzureError),
    ),
)]
pub(crate) async fn sign_in(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let request: SignIn = crate::http::required_body(&body)?;
    let credential = Credential::parse(request.credential.as_deref().unwrap_or_default())?;
    // A credential added to a live session joins it; anything else starts a new one.
    let current = match session_of(&req, &state).await {
        Ok(Some((session, _))) => Some(session),
        Ok(None) | Err(SessionError::Expired | SessionError::Refused(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let secret = token_secret(&state).await?;
    let now = crate::time::now_unix();
    let mut session = current.unwrap_or_else(|| Session {
        credentials: Vec::new(),
        csrf: session::new_csrf(),
        expires: now + session::LIFETIME_SECONDS,
    });
    if !session.credentials.contains(&credential) {
        if session.credentials.len() >= session::MAX_CREDENTIALS {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "credential",
                format!(
                    "a session holds at most {} credentials",
                    session::MAX_CREDENTIALS
                ),
            ));
        }
        session.credentials.push(credential);
    }
    let (checked, id_scope, check_secret) = (
        session.clone(),
        state.instance.id_scope.clone(),
        secret.clone(),
    );
    let caller = crate::db::blocking(&state.store, move |store| {
        Ok(session::caller_of(
            &checked,
            store,
            &id_scope,
            &check_secret,
            now,
        ))
    })
    .await??;
    tracing::info!(principal = %caller.principal, "console sign-in");
    let max_age = session.expires.saturating_sub(now) as i64;
    Ok(HttpResponse::Ok()
        .cookie(session_cookie(session::seal(&session, &secret)?, max_age))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(describe(&state, &session, &caller)))
}

/// Clears the cookie. (The session's credentials stay valid until they are rotated.)
#[utoipa::path(
    delete,
    path = routes::CONSOLE_SESSION,
    operation_id = "consoleSignOut",
    tag = "console",
    responses((status = 204, description = "The cookie is cleared")),
)]
pub(crate) async fn sign_out() -> HttpResponse {
    HttpResponse::NoContent()
        .cookie(session_cookie(String::new(), 0))
        .finish()
}

/// The caller of a console-only endpoint: a console session is required.
async fn require_session(
    req: &HttpRequest,
    state: &web::Data<AppState>,
) -> Result<Caller, ApiError> {
    caller(req, state)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "no console session: sign in"))
}

#[utoipa::path(
    get,
    path = routes::CONSOLE_RATES,
    operation_id = "consoleRates",
    tag = "console",
    security(("consoleSession" = [])),
    responses(
        (status = 200, description = "The last hour of registrations and telemetry per second", body = serde_json::Value),
        (status = 401, description = "No console session", body = crate::http::openapi::AzureError),
    ),
)]
pub(crate) async fn get_rates(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require_session(&req, &state).await?;
    Ok(HttpResponse::Ok().json(json!({
        "intervalSeconds": rates::INTERVAL.as_secs(),
        "points": state.console.rates.points(),
    })))
}

/// The CRL as last signed, and where the CRL and the OCSP responder are published.
#[utoipa::path(
    get,
    path = routes::CONSOLE_PKI,
    operation_id = "consolePki",
    tag = "console",
    security(("consoleSession" = [])),
    responses(
        (status = 200, description = "The CRL as last signed, and the CRL and OCSP URLs", body = serde_json::Value),
        (status = 401, description = "No console session", body = crate::http::openapi::AzureError),
        (status = 403, description = "The session lacks EnrollmentRead", body = crate::http::openapi::AzureError),
    ),
)]
pub(crate) async fn get_pki(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require_session(&req, &state).await?;
    caller.require(crate::auth::Rights::ENROLLMENT_READ)?;
    let pki = crate::http::pki::pki_of(&req)?;
    let der = pki.crl(false).await?;
    let crl = x509_parser::parse_x509_crl(&der)
        .map_err(|e| ApiError::internal(format!("our own CRL does not parse: {e}")))?
        .1;
    let stored = crate::db::blocking(&state.store, |store| {
        store.get(Collection::PkiState, crate::pki::CRL_DOCUMENT)
    })
    .await?;
    let base = pki.base_url();
    Ok(HttpResponse::Ok().json(json!({
        "crl": {
            "number": stored.as_ref().and_then(|d| d.body.get("crlNumber").cloned()),
            "thisUpdateUtc": crate::time::rfc3339_of_unix(crl.last_update().timestamp().max(0) as u64),
            "nextUpdateUtc": crl.next_update().map(|t| crate::time::rfc3339_of_unix(t.timestamp().max(0) as u64)),
            "revokedCount": crl.iter_revoked_certificates().count(),
            "url": base.as_ref().map(|b| format!("{b}{}", routes::CRL)),
        },
        "ocsp": {
            "url": base.as_ref().map(|b| format!("{b}{}", routes::OCSP)),
        },
    })))
}

/// Reads this process's counters into the rate history, every [`rates::INTERVAL`].
pub async fn sample_rates(state: web::Data<AppState>) {
    let mut tick = tokio::time::interval(rates::INTERVAL);
    loop {
        tick.tick().await;
        let (registrations, failed) = state
            .dps
            .as_ref()
            .map_or((0, 0), |dps| dps.metrics.totals());
        let telemetry = state.hub.as_ref().map_or(0, |hub| {
            hub.metrics
                .messages_in
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        state.console.rates.record(rates::Reading {
            at_ms: crate::time::now_unix_ms(),
            registrations,
            failed_registrations: failed,
            telemetry,
        });
    }
}
