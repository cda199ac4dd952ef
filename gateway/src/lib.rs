//! katz gateway: the HTTP face of katz, a stateless service in front of the same RabbitMQ queues
//! and Redis records as `katz submit` (docs/protocol.md); any number run beside any number of
//! workers. docs/http.md is the user's page.
//!
//! ```text
//! client ─HTTP─▶ api (axum) ─auth: key → Tenant─┬─ POST /v1/jobs ─▶ quota::rate (token bucket)
//!                                               │    jobs::into_job ─▶ protocol::Job ─▶ the worker's checks
//!                                               │    models: a live worker serving base, ControlNets, LoRAs
//!                                               │    uploads katz:upload:<id>:<i>; quota::reserve (record)
//!                                               │    broker::publish (confirmed) ─▶ 202
//!                                               ├─ GET/DELETE /v1/jobs/{id}[/image|/preview] ─▶ Redis
//!                                               ├─ GET /v1/jobs/{id}/events ─▶ events (SSE)
//!                                               └─ GET /v1/models ─▶ models (heartbeats)
//! webhook::dispatch (every gateway) ─ katz:webhooks:due ─▶ signed POSTs of ended jobs
//! page: GET / ─▶ queues, live workers, recent jobs;  GET /openapi.json ─▶ api::ApiDoc
//! ```
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | `config` | `GatewayConfig`: TOML, each default written once; tenants and their limits |
//! | `auth` | API keys → `Tenant` (constant-time), which job ids a tenant owns |
//! | `api` | the router, the handlers, the OpenAPI document |
//! | `jobs` | an HTTP body → `protocol::Job` (and the worker's checks); `JobView` of a record |
//! | `quota` | the token bucket and the concurrency quota (Lua in Redis, shared by gateways) |
//! | `models` | live workers from heartbeats; which queue serves a job |
//! | `broker` | RabbitMQ: publish with confirms, queue depths |
//! | `events` | SSE of a job's progress and previews |
//! | `webhook` | signed deliveries with retries, claimed through Redis |
//! | `page` | the operator page |
//! | `error` | `ApiError`: status, code, JSON body |

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod error;
pub mod events;
pub mod jobs;
pub mod models;
pub mod page;
pub mod quota;
pub mod webhook;

pub use config::GatewayConfig;

/// What every handler shares.
#[derive(Clone)]
pub struct State(Arc<Inner>);

pub struct Inner {
    pub cfg: GatewayConfig,
    /// This gateway's name (host and pid): the webhook lock's owner, the page's title.
    pub name: String,
    pub tenants: auth::Tenants,
    pub client: redis::Client,
    redis: redis::aio::ConnectionManager,
    pub broker: broker::Broker,
    /// Flips to true when the gateway stops: SSE streams and the webhook loop end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Deref for State {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    /// A Redis connection (a cheap clone of the gateway's multiplexed one; it reconnects).
    pub fn redis(&self) -> redis::aio::ConnectionManager {
        self.redis.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("redis at {url}: {source}")]
    Redis { url: String, source: redis::RedisError },
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
    #[error("the webhook HTTP client: {0}")]
    WebhookClient(#[source] reqwest::Error),
}

/// Serves on `listener` until `shutdown` resolves; the webhook dispatcher runs beside.
pub async fn run(
    cfg: GatewayConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    cfg.check()?;
    let redis_err = |source| GatewayError::Redis {
        url: cfg.redis.clone(),
        source,
    };
    let client = redis::Client::open(cfg.redis.as_str()).map_err(redis_err)?;
    let redis = redis::aio::ConnectionManager::new(client.clone())
        .await
        .map_err(redis_err)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gateway".into());
    let st = State(Arc::new(Inner {
        name: format!("{host}-{}", std::process::id()),
        tenants: auth::Tenants::new(&cfg),
        broker: broker::Broker::new(cfg.amqp.clone()),
        client,
        redis,
        shutdown: stop_rx,
        cfg,
    }));
    let http = webhook::client(&st.cfg.webhooks).map_err(GatewayError::WebhookClient)?;
    let webhooks = tokio::spawn(webhook::dispatch(st.clone(), http));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tenants = st.cfg.tenants.len(), "gateway listening");
    let app = api::router(st.clone());
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    let _ = webhooks.await;
    Ok(())
}
