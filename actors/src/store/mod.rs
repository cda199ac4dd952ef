//! ResultStore: the job records (status, progress, timings, error, the PNG) — in Redis through a
//! redis-rs `ConnectionManager`, which reconnects by itself after Redis restarts, or in memory for
//! the embedded mode (same messages and decisions; `BEGIN_LUA` has a Rust twin, [`Memory::begin`]).
//!
//! ```text
//! job ──BeginJob──▶ ResultStore ──EVAL begin.lua──▶ katz:job:<id> (digest, status, attempts)
//! forwarder ─Progress─▶         ──HSET step/total + PUBLISH katz:events:<id>
//!           (+ StepPreview)      (+ SET katz:job:<id>:preview EX ttl, HSET preview_step: MULTI)
//! job ──Finish───▶              ──SET katz:job:<id>:image, HSET status, EXPIRE, PUBLISH
//! ```
//!
//! Every key a job's end writes expires: the record and image `result_ttl_s` after the end (also
//! for a job cancelled before it started), and the cancel key is deleted once it is obeyed.

pub mod messages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::JobError;
use crate::protocol::{cancel_key, events_channel, image_key, job_key, now_ms, preview_key, Event, Status};
pub use messages::*;

/// Atomically decides what to do with a delivered job (see [`Begin`]).
const BEGIN_LUA: &str = r#"
local k, cancel = KEYS[1], KEYS[2]
local digest, worker, now, total, wait, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local d = redis.call('HGET', k, 'digest')
local st = redis.call('HGET', k, 'status')
if d and d ~= digest then return {'conflict', d} end
if st == 'done' then return {'done', ''} end
if st == 'cancelled' or redis.call('EXISTS', cancel) == 1 then
  redis.call('HSET', k, 'status', 'cancelled', 'digest', digest, 'finished_ms', now)
  redis.call('EXPIRE', k, ttl)
  redis.call('DEL', cancel)
  return {'cancelled', ''}
end
redis.call('HSET', k, 'status', 'running', 'digest', digest, 'worker', worker, 'started_ms', now,
  'step', 0, 'total', total)
if wait ~= '' then redis.call('HSET', k, 'queue_wait_ms', wait) end
redis.call('HDEL', k, 'error', 'error_kind')
-- a record without a TTL (a producer's `queued` one) gets one while the job runs; its end sets
-- the job's own
if redis.call('TTL', k) < 0 then redis.call('EXPIRE', k, ttl + 86400) end
local n = redis.call('HINCRBY', k, 'attempts', 1)
return {'run', tostring(n)}
"#;

/// Fails a message that did not decode, unless its id is another job's (see [`FailUndecoded`]).
const FAIL_UNDECODED_LUA: &str = r#"
local k, events = KEYS[1], KEYS[2]
local err, now, ttl, event = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local st = redis.call('HGET', k, 'status')
local ours = st == false or st == 'queued'
  or (st == 'failed' and redis.call('HGET', k, 'error_kind') == 'decode')
if redis.call('HEXISTS', k, 'digest') == 1 or not ours then
  redis.call('HSET', k, 'conflict', err)
  return 0
end
redis.call('HSET', k, 'status', 'failed', 'error', err, 'error_kind', 'decode', 'finished_ms', now)
redis.call('EXPIRE', k, ttl)
redis.call('PUBLISH', events, event)
return 1
"#;

/// Records and blobs of the in-memory store (embedded mode), by their Redis keys.
#[derive(Default)]
pub struct Memory {
    pub records: HashMap<String, HashMap<String, String>>,
    pub blobs: HashMap<String, Vec<u8>>,
    /// Receives what Redis would publish on `katz:events:<id>`.
    pub events: Option<UnboundedSender<Event>>,
}

impl Memory {
    fn publish(&self, e: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// The Rust twin of `FAIL_UNDECODED_LUA`.
    fn fail_undecoded(&mut self, m: &FailUndecoded) -> bool {
        let rec = self.records.entry(job_key(&m.id)).or_default();
        let ours = match rec.get("status").map(String::as_str) {
            None | Some("queued") => true,
            Some("failed") => rec.get("error_kind").map(String::as_str) == Some("decode"),
            Some(_) => false,
        };
        if rec.contains_key("digest") || !ours {
            rec.insert("conflict".into(), m.error.clone());
            return false;
        }
        for (k, v) in [
            ("status", "failed".to_string()),
            ("error", m.error.clone()),
            ("error_kind", "decode".into()),
            ("finished_ms", now_ms().to_string()),
        ] {
            rec.insert(k.into(), v);
        }
        self.publish(event(&m.id, Status::Failed, 0, 0, Some(m.error.clone())));
        true
    }

    /// The Rust twin of `BEGIN_LUA`.
    fn begin(&mut self, m: &BeginJob) -> Begin {
        let cancelled = self.blobs.contains_key(&cancel_key(&m.id));
        let rec = self.records.entry(job_key(&m.id)).or_default();
        if let Some(d) = rec.get("digest").filter(|d| **d != m.digest) {
            return Begin::Conflict { stored: d.clone() };
        }
        if rec.get("status").map(String::as_str) == Some("done") {
            return Begin::AlreadyDone;
        }
        if cancelled || rec.get("status").map(String::as_str) == Some("cancelled") {
            rec.insert("status".into(), "cancelled".into());
            rec.insert("digest".into(), m.digest.clone());
            rec.insert("finished_ms".into(), now_ms().to_string());
            self.blobs.remove(&cancel_key(&m.id));
            return Begin::Cancelled;
        }
        let attempts = rec
            .get("attempts")
            .and_then(|a| a.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let fields = [
            ("status", "running".to_string()),
            ("digest", m.digest.clone()),
            ("worker", m.worker.clone()),
            ("started_ms", now_ms().to_string()),
            ("step", "0".into()),
            ("total", m.total_steps.to_string()),
            ("attempts", attempts.to_string()),
        ];
        for (k, v) in fields {
            rec.insert(k.into(), v);
        }
        if let Some(w) = m.queue_wait_ms {
            rec.insert("queue_wait_ms".into(), w.to_string());
        }
        rec.remove("error");
        rec.remove("error_kind");
        Begin::Run { attempts }
    }
}

enum Backend {
    Redis {
        conn: ConnectionManager,
        begin: redis::Script,
    },
    Memory(Arc<Mutex<Memory>>),
}

pub struct ResultStore {
    backend: Backend,
}

impl ResultStore {
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(ResultStore {
            backend: Backend::Redis {
                conn,
                begin: redis::Script::new(BEGIN_LUA),
            },
        })
    }

    /// An in-memory store; the returned handle reads what the jobs stored.
    pub fn memory(events: Option<UnboundedSender<Event>>) -> (Self, Arc<Mutex<Memory>>) {
        let mem = Arc::new(Mutex::new(Memory {
            events,
            ..Memory::default()
        }));
        (
            ResultStore {
                backend: Backend::Memory(mem.clone()),
            },
            mem,
        )
    }
}

impl Actor for ResultStore {
    type Context = Context<Self>;
}

fn event(id: &str, status: Status, step: u32, total: u32, error: Option<String>) -> Event {
    Event {
        id: id.into(),
        status,
        step,
        total,
        error,
        preview_step: None,
    }
}

fn json(e: &Event) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

/// Runs `f` on the in-memory store, or returns the Redis connection to work with.
fn with_memory<T>(
    backend: &Backend,
    f: impl FnOnce(&mut Memory) -> T,
) -> Result<T, (ConnectionManager, redis::Script)> {
    match backend {
        Backend::Memory(m) => Ok(f(&mut m.lock().unwrap_or_else(|e| e.into_inner()))),
        Backend::Redis { conn, begin } => Err((conn.clone(), begin.clone())),
    }
}

type Reply<T> = ResponseFuture<Result<T, JobError>>;

impl Handler<BeginJob> for ResultStore {
    type Result = Reply<Begin>;

    fn handle(&mut self, m: BeginJob, _: &mut Context<Self>) -> Self::Result {
        let (mut conn, script) = match with_memory(&self.backend, |mem| {
            let v = mem.begin(&m);
            match v {
                Begin::Run { .. } => mem.publish(event(&m.id, Status::Running, 0, m.total_steps, None)),
                Begin::Cancelled => mem.publish(event(&m.id, Status::Cancelled, 0, 0, None)),
                _ => {}
            }
            v
        }) {
            Ok(v) => return Box::pin(async move { Ok(v) }),
            Err(redis) => redis,
        };
        Box::pin(async move {
            let (verdict, arg): (String, String) = script
                .key(job_key(&m.id))
                .key(cancel_key(&m.id))
                .arg(&m.digest)
                .arg(&m.worker)
                .arg(now_ms())
                .arg(m.total_steps)
                .arg(m.queue_wait_ms.map(|w| w.to_string()).unwrap_or_default())
                .arg(m.ttl_s)
                .invoke_async(&mut conn)
                .await?;
            Ok(match verdict.as_str() {
                "conflict" => Begin::Conflict { stored: arg },
                "done" => Begin::AlreadyDone,
                "cancelled" => {
                    let e = event(&m.id, Status::Cancelled, 0, 0, None);
                    let _: () = conn.publish(events_channel(&m.id), json(&e)).await?;
                    Begin::Cancelled
                }
                _ => {
                    let e = event(&m.id, Status::Running, 0, m.total_steps, None);
                    let _: () = conn.publish(events_channel(&m.id), json(&e)).await?;
                    Begin::Run {
                        attempts: arg.parse().unwrap_or(1),
                    }
                }
            })
        })
    }
}

impl Handler<Progress> for ResultStore {
    type Result = Reply<()>;

    fn handle(&mut self, m: Progress, _: &mut Context<Self>) -> Self::Result {
        let e = Event {
            preview_step: m.preview.as_ref().map(|p| p.step),
            ..event(&m.id, Status::Running, m.step, m.total, None)
        };
        let (mut conn, _) = match with_memory(&self.backend, |mem| {
            if let Some(p) = &m.preview {
                mem.blobs.insert(preview_key(&m.id), p.png.clone());
            }
            let rec = mem.records.entry(job_key(&m.id)).or_default();
            rec.insert("step".into(), m.step.to_string());
            rec.insert("total".into(), m.total.to_string());
            if let Some(p) = &m.preview {
                rec.insert("preview_step".into(), p.step.to_string());
            }
            mem.publish(e.clone());
        }) {
            Ok(()) => return Box::pin(async { Ok(()) }),
            Err(redis) => redis,
        };
        Box::pin(async move {
            // one round trip; with a preview, one transaction: a reader who sees `preview_step`
            // (or its event) finds that step's PNG
            let mut pipe = redis::pipe();
            let key = job_key(&m.id);
            if let Some(p) = &m.preview {
                pipe.atomic()
                    .set_ex(preview_key(&m.id), p.png.as_slice(), p.ttl_s)
                    .ignore()
                    .hset(&key, "preview_step", p.step)
                    .ignore();
            }
            let _: () = pipe
                .hset_multiple(&key, &[("step", m.step), ("total", m.total)])
                .ignore()
                .publish(events_channel(&m.id), json(&e))
                .ignore()
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }
}

impl Handler<Finish> for ResultStore {
    type Result = Reply<()>;

    fn handle(&mut self, m: Finish, _: &mut Context<Self>) -> Self::Result {
        let key = job_key(&m.id);
        let mut fields = m.fields.clone();
        fields.push(("status".into(), m.status.as_str().into()));
        fields.push(("finished_ms".into(), now_ms().to_string()));
        if let Some(png) = &m.png {
            fields.push(("image_key".into(), image_key(&m.id)));
            fields.push(("image_bytes".into(), png.len().to_string()));
        }
        if let Some((kind, msg)) = &m.error {
            fields.push(("error".into(), msg.clone()));
            fields.push(("error_kind".into(), kind.clone()));
        }
        let total: u32 = fields
            .iter()
            .find(|(k, _)| k == "total")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let e = event(
            &m.id,
            m.status,
            total,
            total,
            m.error.as_ref().map(|e| e.1.clone()),
        );
        let (mut conn, _) = match with_memory(&self.backend, |mem| {
            if let Some(png) = &m.png {
                mem.blobs.insert(image_key(&m.id), png.clone());
            }
            mem.blobs.remove(&cancel_key(&m.id));
            mem.records
                .entry(key.clone())
                .or_default()
                .extend(fields.iter().cloned());
            mem.publish(e.clone());
        }) {
            Ok(()) => return Box::pin(async { Ok(()) }),
            Err(redis) => redis,
        };
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if let Some(png) = &m.png {
                pipe.set_ex(image_key(&m.id), png.as_slice(), m.ttl_s).ignore();
            }
            pipe.hset_multiple(&key, &fields).ignore();
            pipe.expire(&key, m.ttl_s as i64).ignore();
            // a step preview lives as long as the record (no-op without one)
            pipe.expire(preview_key(&m.id), m.ttl_s as i64).ignore();
            pipe.del(cancel_key(&m.id)).ignore();
            pipe.publish(events_channel(&m.id), json(&e)).ignore();
            let _: () = pipe.query_async(&mut conn).await?;
            Ok(())
        })
    }
}

impl Handler<FailUndecoded> for ResultStore {
    type Result = Reply<bool>;

    fn handle(&mut self, m: FailUndecoded, _: &mut Context<Self>) -> Self::Result {
        let (mut conn, _) = match with_memory(&self.backend, |mem| mem.fail_undecoded(&m)) {
            Ok(v) => return Box::pin(async move { Ok(v) }),
            Err(redis) => redis,
        };
        Box::pin(async move {
            let e = event(&m.id, Status::Failed, 0, 0, Some(m.error.clone()));
            let wrote: i64 = redis::Script::new(FAIL_UNDECODED_LUA)
                .key(job_key(&m.id))
                .key(events_channel(&m.id))
                .arg(&m.error)
                .arg(now_ms())
                .arg(m.ttl_s)
                .arg(json(&e))
                .invoke_async(&mut conn)
                .await?;
            Ok(wrote == 1)
        })
    }
}

impl Handler<NoteConflict> for ResultStore {
    type Result = Reply<()>;

    fn handle(&mut self, m: NoteConflict, _: &mut Context<Self>) -> Self::Result {
        let (mut conn, _) = match with_memory(&self.backend, |mem| {
            mem.records
                .entry(job_key(&m.id))
                .or_default()
                .insert("conflict".into(), m.error.clone());
        }) {
            Ok(()) => return Box::pin(async { Ok(()) }),
            Err(redis) => redis,
        };
        Box::pin(async move {
            let _: () = conn.hset(job_key(&m.id), "conflict", m.error).await?;
            Ok(())
        })
    }
}

impl Handler<CancelRequested> for ResultStore {
    type Result = Reply<bool>;

    fn handle(&mut self, m: CancelRequested, _: &mut Context<Self>) -> Self::Result {
        let (mut conn, _) = match with_memory(&self.backend, |mem| mem.blobs.contains_key(&cancel_key(&m.id)))
        {
            Ok(v) => return Box::pin(async move { Ok(v) }),
            Err(redis) => redis,
        };
        Box::pin(async move { Ok(conn.exists(cancel_key(&m.id)).await?) })
    }
}

impl Handler<FetchBytes> for ResultStore {
    type Result = Reply<Option<Vec<u8>>>;

    fn handle(&mut self, m: FetchBytes, _: &mut Context<Self>) -> Self::Result {
        let (mut conn, _) = match with_memory(&self.backend, |mem| mem.blobs.get(&m.key).cloned()) {
            Ok(v) => return Box::pin(async move { Ok(v) }),
            Err(redis) => redis,
        };
        Box::pin(async move { Ok(conn.get(m.key).await?) })
    }
}
