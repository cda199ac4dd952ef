//! The HTTP API (`/v1`), the probes, the OpenAPI document and the operator page.
//!
//! ```text
//! POST   /v1/jobs                 auth → rate → body (JSON | multipart) → jobs::into_job → priority
//!                                 ceiling, webhook_url → the worker's checks → a live worker's queue
//!                                 → Idempotency-Key → uploads → reserve (quota, record) → publish
//!                                 (confirmed) → 202 {id, url, events_url}
//! GET    /v1/jobs/{id}            the record as a JobView          (ids of other tenants: 404)
//! GET    /v1/jobs/{id}/image      the PNG of a done job            (409 not_ready before)
//! GET    /v1/jobs/{id}/preview    the latest preview PNG           (404 while there is none)
//! GET    /v1/jobs/{id}/events     Server-Sent Events (events.rs)
//! DELETE /v1/jobs/{id}            cancel (as `katz cancel`)
//! GET    /v1/models               what live workers serve (models.rs)
//! GET    /healthz, /openapi.json, /   probes, the OpenAPI document, the operator page
//! ```

use std::collections::{BTreeSet, HashMap};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use redis::AsyncCommands;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use katz_actors::protocol::{image_key, job_key, now_ms, upload_prefix, valid_id, DEFAULT_RESULT_TTL_S};

use crate::auth::Tenant;
use crate::error::{from_rejection, ApiError, ErrorBody};
use crate::jobs::{self, JobView, Submitted};
use crate::models::{self, Catalog};
use crate::{page, quota, webhook, State};

/// How long a job may wait in its queue beyond its result TTL before its `queued` record expires.
const QUEUE_ALLOWANCE_S: u64 = 86_400;
/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_TTL_S: u64 = 86_400;

#[derive(OpenApi)]
#[openapi(
    info(title = "katz gateway", description = "The HTTP API of katz: diffusion jobs with ControlNets and LoRAs (docs/http.md)."),
    paths(submit, get_job, get_image, get_preview, cancel, events, list_models, healthz),
    components(schemas(ErrorBody, Submitted, JobView, jobs::JobRequest, Catalog, Cancelled, Health)),
    modifiers(&BearerAuth),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

pub fn router(st: State) -> Router {
    let limit = st.cfg.max_body_bytes;
    Router::new()
        .route("/v1/jobs", axum::routing::post(submit))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel))
        .route("/v1/jobs/{id}/image", get(get_image))
        .route("/v1/jobs/{id}/preview", get(get_preview))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/", get(operator_page))
        .fallback(|| async { ApiError::NotFound("no such endpoint (see /openapi.json)".into()) })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"error": {"code": "method_not_allowed", "message": "this endpoint does not take that method (see /openapi.json)"}})),
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(st)
}

type Id = Result<Path<String>, PathRejection>;

/// The tenant and the job id it may read: an invalid id, or another tenant's, is not found.
fn owned(st: &State, headers: &HeaderMap, id: Id) -> Result<(Tenant, String), ApiError> {
    let tenant = st.tenants.from_headers(headers)?;
    let Path(id) = id.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !valid_id(&id) || !tenant.owns(&id) {
        return Err(ApiError::NotFound(format!("no job `{id}`")));
    }
    Ok((tenant, id))
}

async fn record(st: &State, id: &str) -> Result<HashMap<String, String>, ApiError> {
    let rec: HashMap<String, String> = st.redis().hgetall(job_key(id)).await?;
    if rec.is_empty() {
        return Err(ApiError::NotFound(format!("no job `{id}`")));
    }
    Ok(rec)
}

fn hex_sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// The body as JSON, and a multipart body's other parts by name.
async fn read_body(
    req: Request,
    limit: usize,
) -> Result<(serde_json::Value, HashMap<String, Vec<u8>>), ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| from_rejection(e.status(), e.body_text(), limit))?;
        let mut job = None;
        let mut parts = HashMap::new();
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(from_rejection(e.status(), e.body_text(), limit)),
            };
            let name = field.name().unwrap_or("").to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| from_rejection(e.status(), e.body_text(), limit))?;
            if name == "job" {
                job = Some(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| ApiError::BadRequest(format!("the `job` part is not JSON: {e}")))?,
                );
            } else if !name.is_empty() {
                parts.insert(name, bytes.to_vec());
            }
        }
        let job = job.ok_or_else(|| {
            ApiError::BadRequest("the multipart body has no `job` part (the job's JSON)".into())
        })?;
        return Ok((job, parts));
    }
    if !(ctype.starts_with("application/json")
        || (ctype.starts_with("application/") && ctype.contains("+json")))
    {
        return Err(ApiError::UnsupportedMediaType(
            "send the job as `application/json`, or as `multipart/form-data` with a `job` part".into(),
        ));
    }
    let bytes = body_bytes(req.into_body(), limit).await?;
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    Ok((v, HashMap::new()))
}

/// Reading on past the limit before the 413, at most this many times the limit: a client still
/// sending an over-long body then gets the answer instead of a reset connection.
const DRAIN_FACTOR: usize = 4;

/// The whole body, at most `limit` bytes; an over-long one is read on and dropped (up to
/// [`DRAIN_FACTOR`] × `limit`) and answered 413.
async fn body_bytes(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::TooLarge(limit));
    }
    Ok(Bytes::from(buf))
}

/// Submit a job.
#[utoipa::path(
    post, path = "/v1/jobs",
    request_body(content(
        (jobs::JobRequest = "application/json"),
        (jobs::JobRequest = "multipart/form-data")
    ), description = "The job (JSON), or a multipart body: its JSON in a part `job`, images in parts named by `{\"upload\": \"<part>\"}`"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key and body return the same job; another body → 409")),
    responses(
        (status = 202, description = "Queued (the broker confirmed it)", body = Submitted),
        (status = 200, description = "A replay of an Idempotency-Key: the job made the first time", body = Submitted),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked API key", body = ErrorBody),
        (status = 409, description = "Idempotency-Key used with another body", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "A job that cannot run: values, images, models no live worker serves, priority above the tenant's ceiling", body = ErrorBody),
        (status = 429, description = "Over the tenant's rate or concurrency quota (Retry-After)", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ away: nothing was queued", body = ErrorBody),
    )
)]
async fn submit(
    axum::extract::State(st): axum::extract::State<State>,
    req: Request,
) -> Result<Response, ApiError> {
    let tenant = st.tenants.from_headers(req.headers())?;
    let idem = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) if (1..=255).contains(&s.len()) => Some(s.to_string()),
            _ => {
                return Err(ApiError::BadRequest(
                    "Idempotency-Key: 1-255 visible ASCII characters".into(),
                ))
            }
        },
    };
    let mut r = st.redis();
    quota::rate(&mut r, &tenant.name, tenant.cfg.rate_per_s, tenant.cfg.burst).await?;
    let (body, parts) = read_body(req, st.cfg.max_body_bytes).await?;
    let id = format!("{}.{}", tenant.name, uuid::Uuid::new_v4().simple());
    let p = jobs::into_job(body, &parts, &id, st.cfg.default_result_ttl_s)?;
    if p.job.priority > tenant.cfg.max_priority {
        return Err(ApiError::PriorityAboveCeiling(format!(
            "priority {} is above tenant `{}`'s ceiling of {} (refused, not lowered)",
            p.job.priority, tenant.name, tenant.cfg.max_priority
        )));
    }
    if let Some(url) = &p.webhook_url {
        webhook::check_url(url).map_err(ApiError::Invalid)?;
        if tenant.cfg.webhook_secret.is_none() {
            return Err(ApiError::Invalid(format!(
                "tenant `{}` has no webhook secret configured: webhooks cannot be signed",
                tenant.name
            )));
        }
    }
    jobs::check(&p).await?;
    let catalog = Catalog::from_workers(models::workers(&mut r).await?);
    let mut redis_loras = BTreeSet::new();
    if catalog.live_workers().iter().any(|w| w.lora_redis) {
        for l in &p.job.loras {
            let found: bool = r.exists(katz_actors::lora::store::lora_key(&l.name)).await?;
            if found {
                redis_loras.insert(l.name.clone());
            }
        }
    }
    let queue = catalog.route(&p.job, &redis_loras)?;

    // the same key and body give the same job
    let idem_key = idem.map(|k| format!("katz:idem:{}:{}", tenant.name, hex_sha256(k.as_bytes())));
    if let Some(k) = &idem_key {
        let claimed: Option<String> = redis::cmd("SET")
            .arg(k)
            .arg(format!("{} {id}", p.request_digest))
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL_S)
            .query_async(&mut r)
            .await?;
        if claimed.is_none() {
            let before: String = r.get(k).await.unwrap_or_default();
            let (digest, first) = before.split_once(' ').unwrap_or(("", ""));
            if digest != p.request_digest {
                return Err(ApiError::IdempotencyConflict(first.to_string()));
            }
            let rec: HashMap<String, String> = r.hgetall(job_key(first)).await?;
            let status = rec.get("status").cloned().unwrap_or_else(|| "queued".into());
            let mut resp = Json(submitted(first, &status, None)).into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
    }
    let result = enqueue(&st, &tenant, &p, &queue).await;
    if result.is_err() {
        if let Some(k) = &idem_key {
            let _: Result<(), _> = r.del(k).await;
        }
    }
    result?;
    let mut resp = (StatusCode::ACCEPTED, Json(submitted(&id, "queued", Some(queue)))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    tracing::info!(tenant = %tenant.name, job = %id, "queued");
    Ok(resp)
}

fn submitted(id: &str, status: &str, queue: Option<String>) -> Submitted {
    Submitted {
        id: id.into(),
        status: status.into(),
        url: format!("/v1/jobs/{id}"),
        events_url: format!("/v1/jobs/{id}/events"),
        queue,
    }
}

/// Uploads, the record (under the quota), the webhook's due entry, then the confirmed publish;
/// anything written is taken back if the publish fails.
async fn enqueue(st: &State, tenant: &Tenant, p: &jobs::Prepared, queue: &str) -> Result<(), ApiError> {
    let mut r = st.redis();
    let job = &p.job;
    let ttl = job.result_ttl_s + QUEUE_ALLOWANCE_S;
    let uploads: Vec<String> = (0..p.images.len())
        .map(|i| format!("{}{i}", upload_prefix(&job.id)))
        .collect();
    for (k, bytes) in uploads.iter().zip(&p.images) {
        let _: () = r.set_ex(k, bytes.as_slice(), ttl).await?;
    }
    let digest = job
        .digest()
        .map_err(|e| ApiError::Internal(format!("the job does not encode: {e}")))?;
    let mut fields = vec![
        ("digest", digest),
        ("submitted_ms", now_ms().to_string()),
        ("tenant", tenant.name.clone()),
        ("base", job.base.clone()),
    ];
    if let Some(url) = &p.webhook_url {
        fields.push(("webhook_url", url.clone()));
        fields.push(("webhook_status", "pending".into()));
        fields.push(("webhook_attempts", "0".into()));
    }
    let reserved = quota::reserve(
        &mut r,
        quota::Reserve {
            tenant: &tenant.name,
            max_active: tenant.cfg.max_active,
            id: &job.id,
            record_ttl_s: ttl,
            fields,
        },
    )
    .await;
    let undo = |mut r: redis::aio::ConnectionManager, uploads: Vec<String>| async move {
        for k in uploads {
            let _: Result<(), _> = r.del(k).await;
        }
    };
    if let Err(e) = reserved {
        undo(r, uploads).await;
        return Err(e);
    }
    if p.webhook_url.is_some() {
        let _: () = r.zadd(webhook::DUE, &job.id, now_ms()).await?;
    }
    let payload = job
        .encode()
        .map_err(|e| ApiError::Internal(format!("the job does not encode: {e}")))?;
    if let Err(e) = st.broker.publish(queue, &payload, job.priority, &job.id).await {
        let _ = quota::release(&mut r, &tenant.name, &job.id).await;
        let _: Result<(), _> = r.zrem(webhook::DUE, &job.id).await;
        undo(r, uploads).await;
        return Err(e);
    }
    let _: Result<(), _> = redis::pipe()
        .zadd(page::RECENT, &job.id, now_ms())
        .ignore()
        .zremrangebyrank(page::RECENT, 0, -(page::RECENT_KEEP + 1))
        .ignore()
        .query_async::<()>(&mut r)
        .await;
    Ok(())
}

/// A job's state.
#[utoipa::path(
    get, path = "/v1/jobs/{id}",
    params(("id" = String, Path, description = "The job id (`<tenant>.<uuid>`)")),
    responses(
        (status = 200, body = JobView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job of this tenant", body = ErrorBody),
    )
)]
async fn get_job(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
    id: Id,
) -> Result<Json<JobView>, ApiError> {
    let (_, id) = owned(&st, &headers, id)?;
    let rec = record(&st, &id).await?;
    Ok(Json(JobView::from_record(&id, rec)))
}

/// The PNG stored under `key`, or a 404 saying `missing`.
async fn stored_png(st: &State, key: String, missing: String) -> Result<Response, ApiError> {
    let bytes: Option<Vec<u8>> = st.redis().get(key).await?;
    bytes
        .map(|b| ([(header::CONTENT_TYPE, "image/png")], b).into_response())
        .ok_or(ApiError::NotFound(missing))
}

/// The PNG of a done job.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/image",
    params(("id" = String, Path)),
    responses(
        (status = 200, content_type = "image/png", description = "The image"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The job is not done (yet)", body = ErrorBody),
    )
)]
async fn get_image(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
    id: Id,
) -> Result<Response, ApiError> {
    let (_, id) = owned(&st, &headers, id)?;
    let rec = record(&st, &id).await?;
    let status = rec.get("status").cloned().unwrap_or_default();
    if status != "done" {
        return Err(ApiError::NotReady(format!("job `{id}` is {status}: no image")));
    }
    stored_png(&st, image_key(&id), format!("the image of `{id}` expired")).await
}

/// The latest preview of a job (when its worker stores previews).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/preview",
    params(("id" = String, Path)),
    responses(
        (status = 200, content_type = "image/png", description = "The latest preview"),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job, or no preview yet", body = ErrorBody),
    )
)]
async fn get_preview(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
    id: Id,
) -> Result<Response, ApiError> {
    let (_, id) = owned(&st, &headers, id)?;
    record(&st, &id).await?;
    let key = katz_actors::protocol::preview_key(&id);
    stored_png(&st, key, format!("job `{id}` has no preview (yet)")).await
}

/// What `DELETE /v1/jobs/{id}` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    pub id: String,
    /// The status before: `queued` (cancelled at once), `running` (stops at its next step), or
    /// an end state (nothing to do).
    pub status_before: String,
    pub status: String,
}

/// Cancel a job: a queued one at once, a running one at its next step.
#[utoipa::path(
    delete, path = "/v1/jobs/{id}",
    params(("id" = String, Path)),
    responses(
        (status = 202, body = Cancelled),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn cancel(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
    id: Id,
) -> Result<Response, ApiError> {
    let (_, id) = owned(&st, &headers, id)?;
    record(&st, &id).await?;
    let before = katz_actors::producer::cancel(&mut st.redis(), &id, DEFAULT_RESULT_TTL_S).await?;
    let status: Option<String> = st.redis().hget(job_key(&id), "status").await?;
    let body = Cancelled {
        id,
        status_before: before,
        status: status.unwrap_or_default(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// A job's progress as Server-Sent Events.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events",
    params(("id" = String, Path)),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "Events `status` (the record at once), `progress` {status, step, total, eta_ms}, `preview` {step, url, png_base64}, `end` (the final record); the stream closes after `end`"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn events(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
    id: Id,
) -> Result<Response, ApiError> {
    let (_, id) = owned(&st, &headers, id)?;
    record(&st, &id).await?;
    Ok(crate::events::stream(st, id).into_response())
}

/// The base models, ControlNets and LoRAs that live workers serve.
#[utoipa::path(
    get, path = "/v1/models",
    responses((status = 200, body = Catalog), (status = 401, body = ErrorBody))
)]
async fn list_models(
    axum::extract::State(st): axum::extract::State<State>,
    headers: HeaderMap,
) -> Result<Json<Catalog>, ApiError> {
    st.tenants.from_headers(&headers)?;
    let workers = models::workers(&mut st.redis()).await?;
    Ok(Json(Catalog::from_workers(workers)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub redis: bool,
    pub rabbitmq: bool,
}

/// Liveness and the backing services.
#[utoipa::path(
    get, path = "/healthz", security(()),
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
async fn healthz(axum::extract::State(st): axum::extract::State<State>) -> Response {
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut st.redis())
        .await
        .is_ok();
    let rabbitmq = st.broker.up().await;
    let ok = redis && rabbitmq;
    let h = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        redis,
        rabbitmq,
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h)).into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn operator_page(
    axum::extract::State(st): axum::extract::State<State>,
) -> Result<Html<String>, ApiError> {
    if !st.cfg.operator_page {
        return Err(ApiError::NotFound("the operator page is off".into()));
    }
    Ok(Html(page::render(&st).await?))
}
