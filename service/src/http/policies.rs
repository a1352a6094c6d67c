//! Authorization policies (spec §4.7), at `/authorizationPolicies`: list, add or change rights,
//! rotate a key, remove. In Azure this is ARM; here it is part of the service API. Every call needs
//! `ServiceConfig`, and no call may leave the service without a policy that holds it.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;

use crate::auth::{AuthorizationPolicy, Rights};
use crate::bootstrap::policy_from_doc;
use crate::db::{Collection, Document, DocumentStore, StoreError, Write};
use crate::http::error::{ApiError, ErrorCode};
use crate::http::routes;
use crate::http::{AppState, authorize, if_match, required_body, write_mode};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::POLICIES).route(web::get().to(list)))
        .service(web::resource(routes::POLICY_REGENERATE_KEY).route(web::post().to(regenerate_key)))
        .service(
            web::resource(routes::POLICY)
                .route(web::get().to(get))
                .route(web::put().to(put))
                .route(web::delete().to(delete)),
        );
}

fn view(doc: &Document) -> Result<Value, ApiError> {
    let policy = policy_from_doc(doc.body.clone()).map_err(ApiError::internal)?;
    Ok(json!({
        "keyName": policy.key_name,
        "rights": policy.rights,
        "primaryKey": policy.primary_key,
        "secondaryKey": policy.secondary_key,
        "etag": doc.etag,
    }))
}

fn all_policies(store: &dyn DocumentStore) -> Result<Vec<Document>, StoreError> {
    store.list_all(Collection::AuthorizationPolicies, None)
}

/// Whether some policy other than `except` holds ServiceConfig.
fn another_admin_exists(docs: &[Document], except: &str) -> bool {
    docs.iter().any(|d| {
        !d.id.eq_ignore_ascii_case(except)
            && policy_from_doc(d.body.clone())
                .ok()
                .and_then(|p| Rights::parse(&p.rights).ok())
                .is_some_and(|r| r.contains(Rights::SERVICE_CONFIG))
    })
}

#[utoipa::path(
    get,
    path = routes::POLICIES,
    operation_id = "listAuthorizationPolicies",
    tag = "authorizationPolicies",
    params(crate::http::openapi::ApiVersion),
    responses((status = 200, description = "The policies, with their keys", body = crate::http::openapi::PolicyList), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let docs = crate::db::blocking(&state.store, all_policies).await?;
    let items = docs.iter().map(view).collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(json!({"value": items})))
}

#[utoipa::path(
    get,
    path = routes::POLICY,
    operation_id = "getAuthorizationPolicy",
    tag = "authorizationPolicies",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The policy's key name")),
    responses((status = 200, description = "The policy, with its keys", body = crate::http::openapi::AuthorizationPolicy), crate::http::openapi::ManagementErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn get(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    let doc = crate::db::blocking(&state.store, move |store| {
        store.get(Collection::AuthorizationPolicies, &name)
    })
    .await?
    .ok_or_else(|| ApiError::new(ErrorCode::PolicyNotFound, "no policy with this name"))?;
    Ok(HttpResponse::Ok().json(view(&doc)?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyInput {
    rights: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            ErrorCode::InvalidField,
            "keyName",
            "must be 1 to 64 of A-Z a-z 0-9 - . _",
        ))
    }
}

#[utoipa::path(
    put,
    path = routes::POLICY,
    operation_id = "createOrUpdateAuthorizationPolicy",
    tag = "authorizationPolicies",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The policy's key name"), crate::http::openapi::IfMatch),
    request_body(content = crate::http::openapi::AuthorizationPolicyInput, content_type = "application/json"),
    responses((status = 200, description = "The stored policy", body = crate::http::openapi::AuthorizationPolicy), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn put(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    check_name(&name)?;
    let input: PolicyInput = required_body(&body)?;
    let rights = Rights::parse(&input.rights)
        .map_err(|e| ApiError::field(ErrorCode::InvalidField, "rights", e))?;
    if rights == Rights::default() {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "rights",
            "name at least one right",
        ));
    }
    let foreign = rights.outside(Rights::ALL);
    if foreign != Rights::default() {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "rights",
            format!(
                "{foreign} are hub rights; a provisioning policy holds only {}",
                Rights::ALL
            ),
        ));
    }
    let write = write_mode(req.headers())?;
    let mut keys = Vec::new();
    for (field, key) in [
        ("primaryKey", input.primary_key),
        ("secondaryKey", input.secondary_key),
    ] {
        match key.filter(|k| !k.is_empty()) {
            Some(k) => {
                symmetric_key::validate_key(&k)
                    .map_err(|e| ApiError::field(ErrorCode::InvalidSymmetricKey, field, e))?;
                keys.push(Some(k));
            }
            None => keys.push(None),
        }
    }
    let doc = crate::db::blocking(&state.store, move |store| {
        let existing = store.get(Collection::AuthorizationPolicies, &name)?;
        let old = existing
            .as_ref()
            .and_then(|d| policy_from_doc(d.body.clone()).ok());
        if !rights.contains(Rights::SERVICE_CONFIG)
            && old.is_some()
            && !another_admin_exists(&all_policies(store)?, &name)
        {
            return Ok(Err(()));
        }
        let pick = |given: &Option<String>, old: Option<&String>| match given
            .clone()
            .or_else(|| old.cloned())
        {
            Some(key) => Ok(key),
            None => symmetric_key::generate_key().map_err(|e| StoreError::Backend(e.to_string())),
        };
        let policy = AuthorizationPolicy {
            key_name: name.clone(),
            primary_key: pick(&keys[0], old.as_ref().map(|p| &p.primary_key))?,
            secondary_key: pick(&keys[1], old.as_ref().map(|p| &p.secondary_key))?,
            rights: rights.to_string(),
        };
        let body = serde_json::to_value(&policy).map_err(|e| StoreError::Backend(e.to_string()))?;
        store
            .put(Collection::AuthorizationPolicies, &name, None, &body, write)
            .map(Ok)
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::PolicyNotFound))?
    .map_err(|()| lock_out())?;
    Ok(HttpResponse::Ok().json(view(&doc)?))
}

fn lock_out() -> ApiError {
    ApiError::new(
        ErrorCode::WouldLockOut,
        "this would leave no policy with the ServiceConfig right",
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegenerateRequest {
    key_type: String,
}

#[utoipa::path(
    post,
    path = routes::POLICY_REGENERATE_KEY,
    operation_id = "regenerateAuthorizationPolicyKey",
    tag = "authorizationPolicies",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The policy's key name")),
    request_body(content = crate::http::openapi::RegenerateKeyRequest, content_type = "application/json"),
    responses((status = 200, description = "The policy with its new key", body = crate::http::openapi::AuthorizationPolicy), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn regenerate_key(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    let request: RegenerateRequest = required_body(&body)?;
    let primary = match request.key_type.to_ascii_lowercase().as_str() {
        "primary" => true,
        "secondary" => false,
        _ => {
            return Err(ApiError::field(
                ErrorCode::InvalidField,
                "keyType",
                "must be primary or secondary",
            ));
        }
    };
    let doc = crate::db::blocking(&state.store, move |store| {
        let doc = store
            .get(Collection::AuthorizationPolicies, &name)?
            .ok_or(StoreError::NotFound)?;
        let mut policy =
            policy_from_doc(doc.body.clone()).map_err(|e| StoreError::Backend(e.to_string()))?;
        let fresh =
            symmetric_key::generate_key().map_err(|e| StoreError::Backend(e.to_string()))?;
        if primary {
            policy.primary_key = fresh;
        } else {
            policy.secondary_key = fresh;
        }
        let body = serde_json::to_value(&policy).map_err(|e| StoreError::Backend(e.to_string()))?;
        store.put(
            Collection::AuthorizationPolicies,
            &name,
            None,
            &body,
            Write::IfMatch(doc.etag),
        )
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::PolicyNotFound))?;
    Ok(HttpResponse::Ok().json(view(&doc)?))
}

#[utoipa::path(
    delete,
    path = routes::POLICY,
    operation_id = "deleteAuthorizationPolicy",
    tag = "authorizationPolicies",
    params(crate::http::openapi::ApiVersion, ("name" = String, Path, description = "The policy's key name"), crate::http::openapi::IfMatch),
    responses((status = 204, description = "Deleted"), crate::http::openapi::ManagementErrors, crate::http::openapi::ManagementWriteErrors),
    security(("SharedAccessSignature" = []), ("bearer" = [])),
)]
async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Rights::SERVICE_CONFIG).await?;
    let name = name.into_inner();
    let etag = if_match(req.headers())?;
    crate::db::blocking(&state.store, move |store| {
        if !another_admin_exists(&all_policies(store)?, &name) {
            let this = store.get(Collection::AuthorizationPolicies, &name)?;
            let is_admin = this
                .and_then(|d| policy_from_doc(d.body).ok())
                .and_then(|p| Rights::parse(&p.rights).ok())
                .is_some_and(|r| r.contains(Rights::SERVICE_CONFIG));
            if is_admin {
                return Ok(Err(()));
            }
        }
        store
            .delete(Collection::AuthorizationPolicies, &name, etag.as_deref())
            .map(|_| Ok(()))
    })
    .await
    .map_err(|e| crate::http::error::store_error(e, ErrorCode::PolicyNotFound))?
    .map_err(|()| lock_out())?;
    Ok(HttpResponse::NoContent().finish())
}
