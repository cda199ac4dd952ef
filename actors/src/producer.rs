//! What a producer does in Redis besides publishing, shared by `katz cancel` and `katz gateway`.
//!
//! ```text
//! cancel(id): SET katz:job:<id>:cancel 1 EX 86400; a `queued` record becomes `cancelled` at
//!             once (expiring after `ttl_s`); a running job stops at its next step (the worker
//!             reads the cancel key) ─▶ the status before
//! ```

use crate::protocol::{cancel_key, job_key, now_ms};

const CANCEL_LUA: &str = r#"
redis.call('SET', KEYS[2], '1', 'EX', 86400)
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_ms', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return st or ''
"#;

/// Cancels job `id` (docs/protocol.md, "Idempotency and cancellation"); returns its status
/// before (`""`: no record yet, it will not run). A queued job's record expires after `ttl_s`.
pub async fn cancel<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    id: &str,
    ttl_s: u64,
) -> redis::RedisResult<String> {
    redis::Script::new(CANCEL_LUA)
        .key(job_key(id))
        .key(cancel_key(id))
        .arg(now_ms())
        .arg(ttl_s)
        .invoke_async(conn)
        .await
}
