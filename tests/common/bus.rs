//! A test's own queue on the real RabbitMQ and Redis on localhost (`tools/services.sh` starts
//! them): publish jobs, read their records and images; and the jobs the tests publish.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use katz_actors::protocol::{job_key, ControlNetJob, ImageRef, Job};

use super::root;
use katz_actors::topology;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use redis::AsyncCommands;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS: &str = "redis://127.0.0.1:6379/";

pub struct Bus {
    pub conn: lapin::Connection,
    pub channel: lapin::Channel,
    pub redis: redis::aio::MultiplexedConnection,
    pub queue: String,
}

impl Bus {
    pub async fn new(test: &str) -> Bus {
        let queue = format!("katz.test.{test}.{}", std::process::id());
        let conn = topology::connect(AMQP, "katz-test")
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = conn.create_channel().await.unwrap();
        topology::declare(&channel, &queue).await.unwrap();
        let redis = redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        Bus {
            conn,
            channel,
            redis,
            queue,
        }
    }

    pub async fn reconnect(&mut self) {
        let t0 = Instant::now();
        loop {
            match topology::connect(AMQP, "katz-test").await {
                Ok(c) => {
                    self.channel = c.create_channel().await.unwrap();
                    self.conn = c;
                    return;
                }
                Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("RabbitMQ did not come back: {e}"),
            }
        }
    }

    pub async fn publish_raw(&self, bytes: &[u8]) {
        topology::publish(&self.channel, &self.queue, bytes, 0, "raw")
            .await
            .expect("publish");
    }

    pub async fn publish(&self, job: &Job) {
        topology::publish(
            &self.channel,
            &self.queue,
            &job.encode().unwrap(),
            job.priority,
            &job.id,
        )
        .await
        .expect("publish");
    }

    pub async fn count(&self, queue: &str) -> u32 {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .unwrap();
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    pub async fn record(&mut self, id: &str) -> HashMap<String, String> {
        self.redis.hgetall(job_key(id)).await.unwrap_or_default()
    }

    /// Waits until `id`'s status is final; returns the record.
    pub async fn wait_final(&mut self, id: &str, within: Duration) -> HashMap<String, String> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self
                .redis
                .hgetall::<_, HashMap<String, String>>(job_key(id))
                .await
            {
                if matches!(
                    r.get("status").map(String::as_str),
                    Some("done" | "failed" | "cancelled")
                ) {
                    return r;
                }
            }
            if t0.elapsed() > within {
                panic!(
                    "job {id} did not end within {within:?}: {:?}",
                    self.record(id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_until(
        &mut self,
        id: &str,
        within: Duration,
        pred: impl Fn(&HashMap<String, String>) -> bool,
    ) {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(r) = self
                .redis
                .hgetall::<_, HashMap<String, String>>(job_key(id))
                .await
            {
                if pred(&r) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "job {id}: condition not met within {within:?}: {:?}",
            self.record(id).await
        );
    }

    pub async fn cleanup(self) {
        let cn = format!("{}.cn", self.queue);
        for q in [
            self.queue.clone(),
            topology::dead_queue(&self.queue),
            topology::dead_queue(&cn),
            cn,
        ] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "".into()).await;
    }
}

pub fn uid(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{tag}-{n:x}")
}

pub fn job(tag: &str) -> Job {
    let mut j = Job::new(uid(tag), "tiny-sdxl", "a red circle above a blue square");
    j.steps = 2;
    j
}

/// A job that runs for a few seconds on this machine's CPU.
pub fn long_job(tag: &str) -> Job {
    let mut j = job(tag);
    j.width = 128;
    j.height = 128;
    j.steps = 400;
    j
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Adds `n` (at most 3) ControlNets of the tiny ControlNet model, on the example images.
pub fn with_controlnets(j: &mut Job, n: usize) {
    let images = ["cond_a.png", "cond_b.png", "cond_a.png"];
    let spans = [(0.0, 1.0), (0.0, 0.6), (0.3, 1.0)];
    for k in 0..n {
        j.controlnets.push(ControlNetJob {
            resize: Default::default(),
            canny: None,
            model: "tiny-sdxl-controlnet".into(),
            image: ImageRef::Inline(std::fs::read(root().join("bundles/examples").join(images[k])).unwrap()),
            scale: [0.8, 0.5, -0.4][k],
            start: spans[k].0,
            end: spans[k].1,
        });
    }
}
