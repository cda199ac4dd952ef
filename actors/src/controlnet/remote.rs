//! ControlNets served by `katz controlnet-worker`s, reached over RabbitMQ (session open) and
//! Redis (tensors): the base worker's side. Runs on the model thread, so it uses blocking Redis
//! calls and drives the AMQP publish through the worker's tokio runtime.
//!
//! ```text
//! open:  SET katz:cn:<s>:init (cond, image; TTL) ─▶ publish SessionOpen ─▶ katz.controlnet.<model>
//! send:  RPUSH katz:cn:<s>:in  step + latent_in, t       (the UNet encoder runs meanwhile)
//! recv:  BLPOP katz:cn:<s>:out ≤ step_timeout ─▶ residuals
//!        timeout: the session is abandoned (its keys deleted; a late worker finds no init and
//!        drops it), a new one opens on another worker and the step is sent again — at most
//!        `retries` times, then the job fails naming the ControlNet and the step
//! close: RPUSH an empty payload (the worker ends the session), DEL the keys; TTLs catch the rest
//! ```
//!
//! With `RemoteConfig::ipc` (a GPU base, ControlNet workers on GPUs of the same host) the step
//! messages carry CUDA IPC handles instead of tensors (`super::ipc`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use katz_onnx::controlnet::{ControlService, ControlSession, SessionInit};
use katz_onnx::device::DevRef;
use katz_onnx::request::{ControlModel, ControlRequest};
use katz_onnx::tensor::Tensor;
use katz_onnx::{Error, Result};

use super::ipc::BaseIpc;
use super::wire::{self, controlnet_queue, IpcResiduals, Residuals, SessionOpen, WireError, SESSION_VERSION};
use crate::topology;

/// How the base worker reaches remote ControlNets.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub amqp: String,
    pub redis: String,
    /// Longest wait for one step's residuals before the session is retried elsewhere.
    pub step_timeout: Duration,
    /// Sessions opened again after a timeout before the job fails.
    pub retries: u32,
    /// Lifetime of every Redis key of a session (refreshed at each step).
    pub ttl: Duration,
    /// Steps by CUDA IPC (GPU base, ControlNet workers on GPUs of this host) instead of Redis.
    pub ipc: bool,
    /// The precision residuals come back in (the worker's answer says which it used).
    pub residuals: Residuals,
}

impl RemoteConfig {
    pub fn new(amqp: String, redis: String) -> Self {
        RemoteConfig {
            amqp,
            redis,
            step_timeout: Duration::from_secs(30),
            retries: 2,
            ttl: Duration::from_secs(300),
            ipc: false,
            residuals: Residuals::Auto,
        }
    }
}

/// A ControlNet failure of the job's or the model's (dead-lettered).
fn cn_err(message: String) -> Error {
    Error::ControlNet(message)
}

/// A transport failure: Redis or RabbitMQ away (requeued: a later try may find them back).
fn transport(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::controlnet_transport(what, source)
}

/// Publishes session-open requests (one AMQP connection, made on first use, remade on failure).
#[derive(Clone)]
struct Publisher {
    uri: String,
    rt: tokio::runtime::Handle,
    amqp: Arc<Mutex<Option<(lapin::Connection, lapin::Channel)>>>,
}

impl Publisher {
    fn publish(&self, model: &str, queue: &str, open: &SessionOpen) -> Result<()> {
        let queue = queue.to_string();
        let mut amqp = self.amqp.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            let ch = match amqp.as_ref() {
                Some((_, ch)) => ch.clone(),
                None => {
                    let uri = self.uri.clone();
                    let made = self.rt.block_on(async {
                        let conn = topology::connect(&uri, "katz-controlnet-client").await?;
                        let ch = conn.create_channel().await?;
                        Ok::<_, lapin::Error>((conn, ch))
                    });
                    let (conn, ch) =
                        made.map_err(|e| transport(format!("RabbitMQ at {}", crate::redact::url(&uri)), e))?;
                    *amqp = Some((conn, ch.clone()));
                    ch
                }
            };
            let payload = open
                .encode()
                .map_err(|e| cn_err(format!("encoding the session request: {e}")))?;
            let (q, id) = (queue.clone(), open.session.clone());
            let res = self.rt.block_on(async move {
                topology::declare(&ch, &q).await?;
                topology::publish(&ch, &q, &payload, 0, &id).await
            });
            match res {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "publishing a ControlNet session failed; reconnecting");
                    *amqp = None;
                }
                Err(e) => return Err(transport(format!("opening a {model} session on {queue}"), e)),
            }
        }
        Err(cn_err(format!(
            "opening a {model} session on {queue}: no attempt was made"
        )))
    }
}

/// A remote ControlNet model: its name and the queue its workers consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteModel {
    pub name: String,
    pub queue: String,
}

/// A remote ControlNet spec that is not `MODEL` or `MODEL@QUEUE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected MODEL or MODEL@QUEUE")]
pub struct BadRemoteModel(pub String);

impl std::str::FromStr for RemoteModel {
    type Err = BadRemoteModel;
    /// `MODEL` (queue `katz.controlnet.MODEL`) or `MODEL@QUEUE`.
    fn from_str(s: &str) -> std::result::Result<Self, BadRemoteModel> {
        let (name, queue) = match s.split_once('@') {
            Some((n, q)) => (n.trim(), q.trim().to_string()),
            None => (s.trim(), controlnet_queue(s.trim())),
        };
        if name.is_empty() || queue.is_empty() {
            return Err(BadRemoteModel(s.to_string()));
        }
        Ok(RemoteModel {
            name: name.to_string(),
            queue,
        })
    }
}

/// Opens sessions on remote ControlNet workers; `models[i]` serves `ControlModel::Served(ServiceId(i))`.
pub struct RemoteControlNets {
    cfg: RemoteConfig,
    models: Vec<RemoteModel>,
    job: String,
    publisher: Publisher,
    redis: redis::Client,
    /// Sessions opened again after a timeout, since [`RemoteControlNets::for_job`].
    retried: Arc<AtomicU32>,
}

impl RemoteControlNets {
    pub fn new(cfg: RemoteConfig, models: Vec<RemoteModel>, rt: tokio::runtime::Handle) -> Result<Self> {
        let redis = redis::Client::open(cfg.redis.as_str())
            .map_err(|e| transport(format!("Redis URL {}", crate::redact::url(&cfg.redis)), e))?;
        Ok(RemoteControlNets {
            publisher: Publisher {
                uri: cfg.amqp.clone(),
                rt,
                amqp: Arc::default(),
            },
            cfg,
            models,
            job: String::new(),
            redis,
            retried: Arc::default(),
        })
    }

    /// The job whose sessions open next (names, logs, retry count).
    pub fn for_job(&mut self, job: &str) {
        self.job = job.to_string();
        self.retried.store(0, Ordering::Relaxed);
    }

    /// Sessions retried on another worker during the current job.
    pub fn retried(&self) -> u32 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn models(&self) -> &[RemoteModel] {
        &self.models
    }
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (std::process::id() as u64).rotate_left(32)
}

/// One remote ControlNet working for one job.
pub struct RemoteSession {
    publisher: Publisher,
    retried: Arc<AtomicU32>,
    conn: redis::Connection,
    id: String,
    job: String,
    model: String,
    queue: String,
    index: usize,
    attempt: u32,
    init: Vec<u8>,
    /// The last step sent (to send again to a new session after a timeout).
    last: Option<(usize, Vec<u8>)>,
    cfg: RemoteConfig,
    closed: bool,
    /// The CUDA IPC side (made at the first device step).
    ipc: Option<BaseIpc>,
}

impl ControlService for RemoteControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let ControlModel::Served(m) = req.model else {
            return Err(Error::InvalidRequest(format!(
                "ControlNet #{index} is not served by a ControlNet service"
            )));
        };
        let RemoteModel { name: model, queue } = self
            .models
            .get(m.0)
            .ok_or_else(|| Error::InvalidRequest(format!("ControlNet #{index}: no such remote model")))?
            .clone();
        let c = init.cond;
        let conn = self
            .redis
            .get_connection()
            .map_err(|e| transport(format!("Redis at {}", crate::redact::url(&self.cfg.redis)), e))?;
        let mut s = RemoteSession {
            publisher: self.publisher.clone(),
            retried: self.retried.clone(),
            conn,
            id: String::new(),
            job: if self.job.is_empty() {
                "job".into()
            } else {
                self.job.clone()
            },
            model,
            queue,
            index,
            attempt: 0,
            init: wire::encode(0, &[&c.prompt_embeds, &c.pooled, &c.time_ids, init.image]),
            last: None,
            cfg: self.cfg.clone(),
            closed: false,
            ipc: None,
        };
        s.start()?;
        Ok(Box::new(s))
    }
}

impl RemoteSession {
    /// Stores the session's inputs under a fresh id and publishes its open request.
    fn start(&mut self) -> Result<()> {
        self.attempt += 1;
        self.id = format!("{}-{}-{}-{:x}", self.job, self.index, self.attempt, nonce());
        redis::cmd("SET")
            .arg(wire::init_key(&self.id))
            .arg(&self.init)
            .arg("EX")
            .arg(self.cfg.ttl.as_secs().max(1))
            .query::<()>(&mut self.conn)
            .map_err(|e| transport("Redis: storing a session's inputs", e))?;
        let open = SessionOpen {
            v: SESSION_VERSION,
            session: self.id.clone(),
            model: self.model.clone(),
            job: self.job.clone(),
            ipc: self.cfg.ipc.then(wire::host_identity),
            residuals: self.cfg.residuals,
            traceparent: crate::trace_context::traceparent(),
        };
        self.publisher.publish(&self.model, &self.queue, &open)?;
        tracing::debug!(session = %self.id, model = %self.model, attempt = self.attempt, "ControlNet session opened");
        Ok(())
    }

    fn push(&mut self, payload: &[u8]) -> Result<()> {
        let key = wire::in_key(&self.id);
        redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(payload)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.cfg.ttl.as_secs().max(1))
            .ignore()
            .query::<()>(&mut self.conn)
            .map_err(|e| transport("Redis: sending a ControlNet step", e))
    }

    /// Abandons the session: a worker still in it (or one that picks its open request up late)
    /// finds the close marker, or no inputs at all, and ends at once.
    fn forget(&mut self) {
        let _ = self.push(&[]);
        let _ = redis::cmd("DEL")
            .arg(wire::init_key(&self.id))
            .arg(wire::out_key(&self.id))
            .query::<()>(&mut self.conn);
    }
}

impl ControlSession for RemoteSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        let payload = wire::encode(step as u64, &[latent_in, timestep]);
        self.push(&payload)?;
        self.last = Some((step, payload));
        Ok(())
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        self.wait(step, wire::decode)
    }

    fn on_device(&self) -> bool {
        self.cfg.ipc
    }

    fn send_device(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<()> {
        let t0 = std::time::Instant::now();
        if self.ipc.is_none() {
            self.ipc = Some(BaseIpc::new(latent_in.device)?);
            tracing::debug!(
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "CUDA IPC: base side opened"
            );
        }
        let m = self
            .ipc
            .as_mut()
            .ok_or_else(|| cn_err("no CUDA IPC side".into()))?
            .step(step, latent_in, timestep)?;
        let payload = wire::encode_ipc(&m).map_err(|e| cn_err(e.to_string()))?;
        self.push(&payload)?;
        self.last = Some((step, payload));
        tracing::debug!(
            step,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "CUDA IPC: latent sent"
        );
        Ok(())
    }

    fn recv_device(&mut self, step: usize) -> Result<Vec<DevRef>> {
        let t0 = std::time::Instant::now();
        let r: IpcResiduals = self.wait(step, |bytes| match wire::decode_ipc::<IpcResiduals>(bytes) {
            Some(Ok(r)) => Ok((r.step, r)),
            Some(Err(e)) => Err(e),
            None => Err(WireError::NotIpc),
        })?;
        let out = self
            .ipc
            .as_mut()
            .ok_or_else(|| cn_err("CUDA IPC residuals before any IPC step".into()))?
            .residuals(&r)
            .map_err(|e| cn_err(format!("ControlNet {} step {step}: {e}", self.model)));
        tracing::debug!(
            step,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "CUDA IPC: residuals in (wait + mapping)"
        );
        out
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let _ = self.push(&[]);
        let _ = redis::cmd("DEL")
            .arg(wire::init_key(&self.id))
            .arg(wire::out_key(&self.id))
            .query::<()>(&mut self.conn);
    }
}

impl RemoteSession {
    /// Waits for step `step`'s answer (`parse` gives its step and contents); after a step
    /// timeout the session moves to another worker and the step is sent again, at most
    /// `retries` times.
    fn wait<T>(
        &mut self,
        step: usize,
        parse: impl Fn(&[u8]) -> std::result::Result<(u64, T), WireError>,
    ) -> Result<T> {
        let started = Instant::now();
        loop {
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                .arg(wire::out_key(&self.id))
                .arg(self.cfg.step_timeout.as_secs_f64())
                .query(&mut self.conn)
                .map_err(|e| transport("Redis: waiting for ControlNet residuals", e))?;
            if let Some((_, bytes)) = got {
                let (s, out) =
                    parse(&bytes).map_err(|e| cn_err(format!("ControlNet {}: {e}", self.model)))?;
                if s as usize == step {
                    return Ok(out);
                }
                continue; // a late answer of an earlier step
            }
            // no answer in time: the worker is gone or stuck — another session, same step
            if self.attempt > self.cfg.retries {
                self.forget();
                self.closed = true;
                return Err(cn_err(format!(
                    "ControlNet {}: no worker answered step {step} within {:?} ({} sessions tried, {:.1} s)",
                    self.model,
                    self.cfg.step_timeout,
                    self.attempt,
                    started.elapsed().as_secs_f64()
                )));
            }
            tracing::warn!(session = %self.id, model = %self.model, step, "ControlNet session timed out; opening another");
            self.forget();
            self.retried.fetch_add(1, Ordering::Relaxed);
            self.start()?;
            let (last_step, payload) = self
                .last
                .clone()
                .ok_or_else(|| cn_err("no step to resend".into()))?;
            debug_assert_eq!(last_step, step);
            self.push(&payload)?;
        }
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use katz_onnx::text::Conditioning;

    use super::*;
    use crate::error::{Action, JobError};

    /// A port on this machine where nothing listens (bound, then released).
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Opens one session of `tiny-controlnet` through `amqp` / `redis`; the error it fails with.
    fn open_fails(amqp: String, redis: String) -> Error {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let model: RemoteModel = "tiny-controlnet@katz.test.unreachable".parse().unwrap();
        let mut svc =
            RemoteControlNets::new(RemoteConfig::new(amqp, redis), vec![model], rt.handle().clone())
                .expect("a client is made without connecting");
        svc.for_job("transport-test");
        let t = |shape: Vec<usize>| Tensor::new(shape.clone(), vec![0.5; shape.iter().product()]);
        let cond = Conditioning {
            prompt_embeds: t(vec![1, 2, 4]),
            pooled: t(vec![1, 4]),
            time_ids: t(vec![1, 6]),
        };
        let image = t(vec![1, 3, 8, 8]);
        let req = ControlRequest {
            prep: Default::default(),
            model: ControlModel::Served(katz_onnx::request::ServiceId(0)),
            image: image.clone(),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        };
        let init = SessionInit {
            cond: &cond,
            image: &image,
        };
        match svc.open(0, &req, init) {
            Ok(_) => panic!("a session opened without its transport"),
            Err(e) => e,
        }
    }

    /// The action a job failing with `e` gets.
    fn action(e: Error) -> Action {
        JobError::Model(e).action()
    }

    #[test]
    fn redis_away_requeues_the_job() {
        let e = open_fails(
            "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            format!("redis://127.0.0.1:{}/", closed_port()),
        );
        assert!(matches!(e, Error::ControlNetTransport { .. }), "{e}");
        assert!(e.to_string().contains("Redis"), "{e}");
        assert_eq!(action(e), Action::Requeue);
    }

    /// Redis (the real one on 6379) takes the session's inputs; the publish of its open request
    /// fails (RabbitMQ unreachable): the job goes back to the queue, not to the dead letters.
    #[test]
    fn a_failed_session_publish_requeues_the_job() {
        let e = open_fails(
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()),
            "redis://127.0.0.1:6379/".into(),
        );
        assert!(matches!(e, Error::ControlNetTransport { .. }), "{e}");
        assert!(e.to_string().contains("RabbitMQ"), "{e}");
        assert_eq!(action(e), Action::Requeue);
    }

    #[test]
    fn bad_answers_still_dead_letter() {
        assert_eq!(
            action(cn_err("ControlNet m: bad payload".into())),
            Action::DeadLetter
        );
        assert!("".parse::<RemoteModel>().is_err());
        assert_eq!(
            "m@q".parse::<RemoteModel>().unwrap(),
            RemoteModel {
                name: "m".into(),
                queue: "q".into()
            }
        );
    }
}
