//! Per-tenant limits, kept in Redis so that every gateway sees the same numbers.
//!
//! ```text
//! POST /v1/jobs ─rate()─▶ token bucket katz:tenant:<t>:bucket (Lua, Redis TIME) ─▶ 0 | wait ms → 429
//!              ─reserve()─▶ Lua, atomically: prune katz:tenant:<t>:active (ZSET of job ids) of
//!                jobs ended or gone; over max_active → 429; id taken → conflict; else ZADD the
//!                id and write its `queued` record (HSETNX status, digest, submitted_ms, tenant,
//!                webhook_url; EXPIRE) — before the job is published (docs/protocol.md)
//! ```

use crate::error::ApiError;

const BUCKET_LUA: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait
"#;

const RESERVE_LUA: &str = r#"
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  local st = redis.call('HGET', ARGV[3] .. id, 'status')
  if (not st) or st == 'done' or st == 'failed' or st == 'cancelled' then
    redis.call('ZREM', KEYS[1], id)
  end
end
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return -1 end
if redis.call('HSETNX', KEYS[2], 'status', 'queued') == 0 then return -2 end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[2])
redis.call('EXPIRE', KEYS[1], 604800)
return n + 1
"#;

pub fn active_key(tenant: &str) -> String {
    format!("katz:tenant:{tenant}:active")
}

fn bucket_key(tenant: &str) -> String {
    format!("katz:tenant:{tenant}:bucket")
}

/// Takes one token of the tenant's bucket, or says how long to wait for one.
pub async fn rate<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    tenant: &str,
    rate_per_s: f64,
    burst: u32,
) -> Result<(), ApiError> {
    let wait_ms: u64 = redis::Script::new(BUCKET_LUA)
        .key(bucket_key(tenant))
        .arg(rate_per_s)
        .arg(burst)
        .invoke_async(conn)
        .await?;
    if wait_ms == 0 {
        return Ok(());
    }
    Err(ApiError::RateLimited {
        message: format!(
            "tenant `{tenant}` is over its rate of {rate_per_s} jobs/s (burst {burst}); retry in {:.1} s",
            wait_ms as f64 / 1000.0
        ),
        retry_after_s: wait_ms.div_ceil(1000),
    })
}

/// The record a job starts with, and how long it lives if no worker ever ends it.
pub struct Reserve<'a> {
    pub tenant: &'a str,
    pub max_active: u32,
    pub id: &'a str,
    pub record_ttl_s: u64,
    /// Fields besides `status` (`digest`, `submitted_ms`, `tenant`, …).
    pub fields: Vec<(&'static str, String)>,
}

/// Admits the job under the tenant's concurrency quota and writes its `queued` record, in one
/// step; returns the tenant's jobs not yet ended, this one included.
pub async fn reserve<C: redis::aio::ConnectionLike>(conn: &mut C, r: Reserve<'_>) -> Result<u32, ApiError> {
    let script = redis::Script::new(RESERVE_LUA);
    let mut s = script.prepare_invoke();
    s.key(active_key(r.tenant))
        .key(katz_actors::protocol::job_key(r.id))
        .arg(r.max_active)
        .arg(r.id)
        .arg("katz:job:")
        .arg(r.record_ttl_s)
        .arg(katz_actors::protocol::now_ms());
    for (k, v) in &r.fields {
        s.arg(*k).arg(v);
    }
    let n: i64 = s.invoke_async(conn).await?;
    match n {
        -1 => Err(ApiError::QuotaExceeded {
            message: format!(
                "tenant `{}` has {} jobs not yet ended, its quota; retry when one ends",
                r.tenant, r.max_active
            ),
            retry_after_s: 2,
        }),
        -2 => Err(ApiError::Internal(format!("job id `{}` is already in use", r.id))),
        n => Ok(n as u32),
    }
}

/// Takes the job out of its tenant's active set (after a publish that failed).
pub async fn release<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    tenant: &str,
    id: &str,
) -> redis::RedisResult<()> {
    redis::pipe()
        .zrem(active_key(tenant), id)
        .ignore()
        .del(katz_actors::protocol::job_key(id))
        .ignore()
        .query_async(conn)
        .await
}
