//! `POST /devices/query`: the IoT Hub query language over device twins (hub-protocol §4.6, §5),
//! paged with `x-ms-max-item-count` / `x-ms-continuation`.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zerotouch_twin::query::{Query, Source};

use super::{authorize, json_body};
use crate::auth::Rights;
use crate::db::Collection;
use crate::http::AppState;
use crate::http::routes;
use crate::hub::device::Device;
use crate::hub::error::{HubError, HubErrorCode};
use crate::hub::{Hub, bare_etag};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(routes::DEVICES_QUERY).route(web::post().to(query)));
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Devices read from storage per step.
const SCAN: usize = 500;

/// Where a query stopped: the store page it was in, how far into it, and how many rows it has
/// returned so far (for TOP).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Cursor {
    page: Option<String>,
    skip: usize,
    emitted: u64,
}

impl Cursor {
    fn encode(&self) -> String {
        B64URL.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(token: &str) -> Result<Cursor, HubError> {
        B64URL
            .decode(token)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| {
                HubError::new(
                    HubErrorCode::ArgumentInvalid,
                    "x-ms-continuation is not a token this hub issued",
                )
            })
    }
}

#[derive(Deserialize)]
struct QueryBody {
    query: String,
}

fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[utoipa::path(
    post,
    path = routes::DEVICES_QUERY,
    operation_id = "queryDevices",
    tag = "hub",
    params(crate::http::openapi::QueryPaging),
    request_body(content = crate::http::openapi::HubQuery, content_type = "application/json"),
    responses((status = 200, description = "A page of rows (twins, or projections and aggregates)", body = Vec<Object>, headers(("x-ms-continuation" = String, description = "The next page, when there is one"), ("x-ms-max-item-count" = u32), ("x-ms-item-type" = String))), crate::http::openapi::HubErrors),
    security(("hubSharedAccessSignature" = [])),
)]
async fn query(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, HubError> {
    let (hub, _) = authorize(
        &req,
        &state,
        &[Rights::SERVICE_CONNECT, Rights::REGISTRY_READ],
    )
    .await?;
    let body: QueryBody = serde_json::from_value(json_body(&body)?).map_err(|_| {
        HubError::new(
            HubErrorCode::ArgumentInvalid,
            "the body must be {\"query\": \"…\"}",
        )
    })?;
    let parsed = Query::parse(&body.query)
        .map_err(|e| HubError::new(HubErrorCode::ArgumentInvalid, format!("query: {e}")))?;
    let page_size = match header(&req, "x-ms-max-item-count") {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| n.min(MAX_PAGE))
            .ok_or_else(|| {
                HubError::new(
                    HubErrorCode::ArgumentInvalid,
                    "x-ms-max-item-count must be a positive number",
                )
            })?,
    };
    let cursor = match header(&req, "x-ms-continuation") {
        Some(token) => Cursor::decode(&token)?,
        None => Cursor::default(),
    };
    let item_type = if parsed.is_select_star() {
        "twin"
    } else {
        "raw"
    };
    if parsed.source() == Source::DeviceModules {
        // Modules are not served yet: the set is empty.
        return Ok(respond(Vec::new(), None, page_size, item_type));
    }
    if parsed.is_aggregate() {
        let twins = scan(&hub, &parsed, Cursor::default(), usize::MAX).await?.0;
        let mut rows = parsed.aggregate(twins.iter());
        if let Some(top) = parsed.top() {
            rows.truncate(usize::try_from(top).unwrap_or(usize::MAX));
        }
        return Ok(respond(rows, None, page_size, item_type));
    }
    let remaining = parsed
        .top()
        .map_or(u64::MAX, |top| top.saturating_sub(cursor.emitted));
    let want = page_size.min(usize::try_from(remaining).unwrap_or(usize::MAX));
    let emitted = cursor.emitted;
    let (twins, next) = scan(&hub, &parsed, cursor, want).await?;
    let rows: Vec<Value> = if parsed.is_select_star() {
        twins
    } else {
        twins.iter().map(|t| parsed.project(t)).collect()
    };
    let total = emitted + rows.len() as u64;
    let next = next
        .filter(|_| parsed.top().is_none_or(|top| total < top))
        .map(|mut c| {
            c.emitted = total;
            c.encode()
        });
    Ok(respond(rows, next, page_size, item_type))
}

fn respond(
    rows: Vec<Value>,
    continuation: Option<String>,
    page_size: usize,
    item_type: &str,
) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.insert_header(("x-ms-item-type", item_type));
    response.insert_header(("x-ms-max-item-count", page_size.to_string()));
    if let Some(token) = continuation {
        response.insert_header(("x-ms-continuation", token));
    }
    response.json(rows)
}

/// Matching twins (service view) from `cursor` on, at most `want`; and where to resume.
async fn scan(
    hub: &Hub,
    query: &Query,
    mut cursor: Cursor,
    want: usize,
) -> Result<(Vec<Value>, Option<Cursor>), HubError> {
    let mut out = Vec::new();
    loop {
        let token = cursor.page.clone();
        let page = crate::db::blocking(hub.store(), move |s| {
            s.list(Collection::Devices, None, SCAN, token.as_deref())
        })
        .await?;
        for (index, doc) in page.items.iter().enumerate().skip(cursor.skip) {
            let device: Device =
                serde_json::from_value(doc.body.clone()).map_err(HubError::internal)?;
            let twin = hub.twin(&device.device_id).await?;
            let view = hub
                .twin_service_view(&device, &bare_etag(&doc.etag), &twin)
                .await;
            if query.matches(&view) {
                out.push(view);
                if out.len() >= want {
                    let resume = if index + 1 < page.items.len() {
                        Some(Cursor {
                            page: cursor.page.clone(),
                            skip: index + 1,
                            emitted: 0,
                        })
                    } else {
                        page.continuation.clone().map(|p| Cursor {
                            page: Some(p),
                            skip: 0,
                            emitted: 0,
                        })
                    };
                    return Ok((out, resume));
                }
            }
        }
        match page.continuation {
            Some(next) => {
                cursor = Cursor {
                    page: Some(next),
                    skip: 0,
                    emitted: cursor.emitted,
                };
            }
            None => return Ok((out, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            page: Some("abc".into()),
            skip: 3,
            emitted: 7,
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        assert!(Cursor::decode("!!").is_err());
        assert!(Cursor::decode(&B64URL.encode(b"[1,2]")).is_err());
    }
}
