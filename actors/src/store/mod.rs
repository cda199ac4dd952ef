//! ResultStore: the job records in Redis (status, progress, timings, error, the PNG), through a
//! redis-rs `ConnectionManager`, which reconnects by itself after Redis restarts.
//!
//! ```text
//! JobConsumer ──BeginJob──▶ ResultStore ──EVAL begin.lua──▶ katz:job:<id> (digest, status, attempts)
//! forwarder  ──Progress──▶             ──HSET step/total + PUBLISH katz:events:<id>
//! JobConsumer ──Finish───▶             ──SET katz:job:<id>:image, HSET status, EXPIRE, PUBLISH
//! ```

pub mod messages;

use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::error::JobError;
use crate::protocol::{cancel_key, events_channel, image_key, job_key, now_ms, Event, Status};
pub use messages::*;

/// Atomically decides what to do with a delivered job (see [`Begin`]).
const BEGIN_LUA: &str = r#"
local k, cancel = KEYS[1], KEYS[2]
local digest, worker, now, total, wait = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local d = redis.call('HGET', k, 'digest')
local st = redis.call('HGET', k, 'status')
if d and d ~= digest then return {'conflict', d} end
if st == 'done' then return {'done', ''} end
if st == 'cancelled' or redis.call('EXISTS', cancel) == 1 then
  redis.call('HSET', k, 'status', 'cancelled', 'digest', digest, 'finished_ms', now)
  return {'cancelled', ''}
end
redis.call('HSET', k, 'status', 'running', 'digest', digest, 'worker', worker, 'started_ms', now,
  'step', 0, 'total', total)
if wait ~= '' then redis.call('HSET', k, 'queue_wait_ms', wait) end
redis.call('HDEL', k, 'error', 'error_kind')
local n = redis.call('HINCRBY', k, 'attempts', 1)
return {'run', tostring(n)}
"#;

pub struct ResultStore {
    conn: ConnectionManager,
    begin: redis::Script,
}

impl ResultStore {
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(ResultStore {
            conn,
            begin: redis::Script::new(BEGIN_LUA),
        })
    }
}

impl Actor for ResultStore {
    type Context = Context<Self>;
}

fn event(id: &str, status: Status, step: u32, total: u32, error: Option<String>) -> String {
    serde_json::to_string(&Event {
        id: id.into(),
        status,
        step,
        total,
        error,
    })
    .unwrap_or_default()
}

impl Handler<BeginJob> for ResultStore {
    type Result = ResponseFuture<Result<Begin, JobError>>;

    fn handle(&mut self, m: BeginJob, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        let script = self.begin.clone();
        Box::pin(async move {
            let (verdict, arg): (String, String) = script
                .key(job_key(&m.id))
                .key(cancel_key(&m.id))
                .arg(&m.digest)
                .arg(&m.worker)
                .arg(now_ms())
                .arg(m.total_steps)
                .arg(m.queue_wait_ms.map(|w| w.to_string()).unwrap_or_default())
                .invoke_async(&mut conn)
                .await?;
            Ok(match verdict.as_str() {
                "conflict" => Begin::Conflict { stored: arg },
                "done" => Begin::AlreadyDone,
                "cancelled" => {
                    let _: () = conn
                        .publish(events_channel(&m.id), event(&m.id, Status::Cancelled, 0, 0, None))
                        .await?;
                    Begin::Cancelled
                }
                _ => {
                    let _: () = conn
                        .publish(
                            events_channel(&m.id),
                            event(&m.id, Status::Running, 0, m.total_steps, None),
                        )
                        .await?;
                    Begin::Run {
                        attempts: arg.parse().unwrap_or(1),
                    }
                }
            })
        })
    }
}

impl Handler<Progress> for ResultStore {
    type Result = ResponseFuture<Result<(), JobError>>;

    fn handle(&mut self, m: Progress, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let _: () = redis::pipe()
                .hset_multiple(job_key(&m.id), &[("step", m.step), ("total", m.total)])
                .ignore()
                .publish(
                    events_channel(&m.id),
                    event(&m.id, Status::Running, m.step, m.total, None),
                )
                .ignore()
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }
}

impl Handler<Finish> for ResultStore {
    type Result = ResponseFuture<Result<(), JobError>>;

    fn handle(&mut self, m: Finish, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let key = job_key(&m.id);
            let mut fields = m.fields.clone();
            fields.push(("status".into(), m.status.as_str().into()));
            fields.push(("finished_ms".into(), now_ms().to_string()));
            let mut pipe = redis::pipe();
            pipe.atomic();
            if let Some(png) = &m.png {
                pipe.set_ex(image_key(&m.id), png.as_slice(), m.ttl_s).ignore();
                fields.push(("image_key".into(), image_key(&m.id)));
                fields.push(("image_bytes".into(), png.len().to_string()));
            }
            if let Some((kind, msg)) = &m.error {
                fields.push(("error".into(), msg.clone()));
                fields.push(("error_kind".into(), kind.clone()));
            }
            pipe.hset_multiple(&key, &fields).ignore();
            pipe.expire(&key, m.ttl_s as i64).ignore();
            pipe.del(cancel_key(&m.id)).ignore();
            let total: u32 = fields
                .iter()
                .find(|(k, _)| k == "total")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            pipe.publish(
                events_channel(&m.id),
                event(&m.id, m.status, total, total, m.error.map(|e| e.1)),
            )
            .ignore();
            let _: () = pipe.query_async(&mut conn).await?;
            Ok(())
        })
    }
}

impl Handler<NoteConflict> for ResultStore {
    type Result = ResponseFuture<Result<(), JobError>>;

    fn handle(&mut self, m: NoteConflict, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let _: () = conn.hset(job_key(&m.id), "conflict", m.error).await?;
            Ok(())
        })
    }
}

impl Handler<CancelRequested> for ResultStore {
    type Result = ResponseFuture<Result<bool, JobError>>;

    fn handle(&mut self, m: CancelRequested, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        Box::pin(async move { Ok(conn.exists(cancel_key(&m.id)).await?) })
    }
}

impl Handler<FetchBytes> for ResultStore {
    type Result = ResponseFuture<Result<Option<Vec<u8>>, JobError>>;

    fn handle(&mut self, m: FetchBytes, _: &mut Context<Self>) -> Self::Result {
        let mut conn = self.conn.clone();
        Box::pin(async move { Ok(conn.get(m.key).await?) })
    }
}
