//! The worker in-process: `katz_actors::worker::run` (and the ControlNet worker's `run`) on a
//! thread of the test, stopped by a channel passed as its shutdown future, against the real
//! RabbitMQ and Redis on localhost (`tools/services.sh` starts them), each test on its own queue,
//! serving the committed tiny bundles. Tests run one at a time (they share two cores).

mod common;
use common::*;

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use katz_actors::config::WorkerConfig;
use katz_actors::controlnet::worker::{self as cn_worker, ControlNetWorkerConfig};
use katz_actors::protocol::image_key;
use katz_actors::worker;
use redis::AsyncCommands;
use tokio::sync::oneshot;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `run` on its own thread and the sender that resolves its shutdown future.
struct InProcess<E> {
    thread: Option<JoinHandle<Result<(), E>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl<E: std::fmt::Debug + Send + 'static> InProcess<E> {
    fn spawn(name: &str, run: impl FnOnce(oneshot::Receiver<()>) -> Result<(), E> + Send + 'static) -> Self {
        let (stop, rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))
            .unwrap();
        InProcess {
            thread: Some(thread),
            stop: Some(stop),
        }
    }

    /// Resolves the shutdown future and waits, at most `within`, for `run` to return.
    async fn shut_down(&mut self, within: Duration) -> Result<(), E> {
        let _ = self.stop.take().expect("shut down once").send(());
        let t0 = Instant::now();
        let thread = self.thread.take().unwrap();
        while !thread.is_finished() {
            assert!(
                t0.elapsed() < within,
                "run did not return within {within:?} of its shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        thread.join().expect("run does not panic")
    }
}

impl<E> Drop for InProcess<E> {
    /// A test that failed stops its worker (without waiting for it).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The default configuration on a queue of the test's own, serving the committed tiny bundles.
fn config(queue: &str, name: &str) -> WorkerConfig {
    let mut cfg = WorkerConfig {
        queue: Some(queue.into()),
        name: Some(name.into()),
        ..WorkerConfig::default()
    };
    cfg.session.threads = 1;
    cfg.session.device = test_options().device;
    cfg
}

fn start(mut cfg: WorkerConfig) -> InProcess<worker::WorkerError> {
    cfg.locate_bundles(&root().join("bundles"));
    let name = cfg.name.clone().unwrap_or_default();
    InProcess::spawn(&name, move |stop| {
        worker::run(cfg, async move {
            let _ = stop.await;
        })
    })
}

/// Waits (at most 20 s) until nothing is left in `queue`, ready or unacked; returns that count.
async fn drained(bus: &Bus, queue: &str) -> u32 {
    let t0 = Instant::now();
    loop {
        let n = bus.count(queue).await;
        if n == 0 || t0.elapsed() > Duration::from_secs(20) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_job_runs_in_process_and_shutdown_returns_with_the_job_acked() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("inproc-basic").await;
        let mut w = start(config(&bus.queue, "w-inproc-basic"));
        let mut j = job("inproc-basic");
        with_controlnets(&mut j, 1);
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        assert_eq!(r["worker"], "w-inproc-basic");
        let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        w.shut_down(Duration::from_secs(15))
            .await
            .expect("run returns Ok");
        // the worker's connection is closed: an unacked delivery would be back in the queue
        assert_eq!(drained(&bus, &bus.queue).await, 0, "the job was not acked");
        assert_eq!(bus.record(&j.id).await["attempts"], "1");
        bus.cleanup().await;
    });
}

#[test]
fn a_shutdown_mid_job_finishes_stores_and_acks_that_job() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("inproc-drain").await;
        let mut cfg = config(&bus.queue, "w-inproc-drain");
        cfg.controlnet.controlnets = Some(Vec::new()); // `--controlnet none`
        let mut w = start(cfg);
        let j = long_job("inproc-drain");
        bus.publish(&j).await;
        bus.wait_until(&j.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
                && r.get("step").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) >= 3
        })
        .await;
        // a second job, published now, is not started: it stays in the queue for another worker
        let next = job("inproc-drain-next");
        bus.publish(&next).await;
        w.shut_down(Duration::from_secs(180))
            .await
            .expect("run returns Ok");
        let r = bus.record(&j.id).await;
        assert_eq!(r["status"], "done", "the job in flight was not finished: {r:?}");
        assert_eq!(r["attempts"], "1");
        let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        // the finished job is acked; the one not started is back in the queue, ready
        assert_eq!(bus.count(&bus.queue).await, 1);
        assert_ne!(
            bus.record(&next.id).await.get("status").map(String::as_str),
            Some("done")
        );
        bus.cleanup().await;
    });
}

#[test]
fn a_remote_controlnet_session_runs_in_process_and_both_workers_stop() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("inproc-cn").await;
        let q = format!("{}.cn", bus.queue);
        let bundles = root().join("bundles");
        let cn_cfg = ControlNetWorkerConfig {
            amqp: AMQP.into(),
            redis: REDIS.into(),
            bundle: bundles.join("tiny-sdxl-controlnet"),
            base: bundles.join("tiny-sdxl"),
            session: config(&q, "cn-inproc").session.options(
                &katz_onnx::placement::Placement::on(katz_onnx::runtime::Device::Cpu),
                None,
            ),
            concurrency: 1,
            name: "cn-inproc".into(),
            queue: Some(q.clone()),
            idle_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            metrics_addr: None,
        };
        let mut cn = InProcess::spawn("cn-inproc", move |stop| {
            cn_worker::run(cn_cfg, async move {
                let _ = stop.await;
            })
        });
        let mut cfg = config(&bus.queue, "w-inproc-cn");
        cfg.controlnet.controlnet_services = vec![format!("tiny-sdxl-controlnet@{q}").parse().unwrap()];
        let mut w = start(cfg);
        let mut j = job("inproc-cn");
        with_controlnets(&mut j, 1);
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        w.shut_down(Duration::from_secs(15))
            .await
            .expect("the base worker returns Ok");
        cn.shut_down(Duration::from_secs(15))
            .await
            .expect("the ControlNet worker returns Ok");
        assert_eq!(drained(&bus, &bus.queue).await, 0, "the job was not acked");
        assert_eq!(drained(&bus, &q).await, 0, "the session-open was not acked");
        bus.cleanup().await;
    });
}

/// `GET path` on `addr`: the whole answer, or `None` while nothing listens there.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

#[test]
fn readiness_shows_on_readyz_and_in_the_heartbeat_until_the_worker_stops() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("inproc-ready").await;
        // a free port for the probes
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let name = format!("w-inproc-ready-{}", std::process::id());
        let mut cfg = config(&bus.queue, &name);
        cfg.metrics_addr = Some(addr);
        let mut w = start(cfg);
        // ready once its pipelines are loaded and it consumes
        let t0 = Instant::now();
        let ready = loop {
            match http_get(addr, "/readyz").await {
                Some(r) if r.starts_with("HTTP/1.1 200") => break r,
                _ => {
                    assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert!(ready.contains("ready"), "{ready}");
        let health = http_get(addr, "/healthz").await.expect("healthz answers");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        // the heartbeat says the same, with where it serves and how long it took to be ready
        let key = katz_actors::health::worker_key(&name);
        let beat: std::collections::HashMap<String, String> = loop {
            let b: std::collections::HashMap<String, String> = bus.redis.hgetall(&key).await.unwrap();
            if b.get("status").map(String::as_str) == Some("ready") {
                break b;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no ready heartbeat: {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(beat["base"], "tiny-sdxl", "{beat:?}");
        assert_eq!(beat["queue"], bus.queue, "{beat:?}");
        assert!(beat["ready_after_ms"].parse::<u64>().unwrap() > 0, "{beat:?}");
        let ttl: i64 = bus.redis.ttl(&key).await.unwrap();
        assert!(
            ttl > 0 && ttl <= 15,
            "the heartbeat expires on its own: ttl {ttl}"
        );
        // it still serves jobs
        let j = job("inproc-ready");
        bus.publish(&j).await;
        assert_eq!(
            bus.wait_final(&j.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        // a clean stop says so last
        w.shut_down(Duration::from_secs(15))
            .await
            .expect("the worker returns Ok");
        let beat: std::collections::HashMap<String, String> = bus.redis.hgetall(&key).await.unwrap();
        assert_eq!(
            beat.get("status").map(String::as_str),
            Some("stopped"),
            "{beat:?}"
        );
        let _: () = bus.redis.del(&key).await.unwrap();
        bus.cleanup().await;
    });
}

#[test]
fn shape_buckets_warm_up_before_ready_and_other_sizes_are_refused_as_configured() {
    use katz_actors::config::{ImageSize, ShapeList};
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("inproc-buckets").await;
        let mut cfg = config(&bus.queue, "w-inproc-buckets");
        cfg.controlnet.controlnets = Some(Vec::new());
        cfg.concurrency = 2;
        cfg.session.shapes = ShapeList::Sizes(vec![ImageSize {
            width: 64,
            height: 64,
        }]);
        cfg.session.other_sizes = katz_onnx::runtime::OtherSizes::Refuse;
        cfg.session.warm_up = Some(true);
        let mut w = start(cfg);
        let sized = |tag: &str, w: u32, h: u32| {
            let mut j = job(tag);
            (j.width, j.height) = (w, h);
            j
        };
        // the same job twice (two ids): the same PNG, byte for byte
        let (a, b) = (sized("bucket-a", 64, 64), sized("bucket-b", 64, 64));
        let other = sized("bucket-other", 96, 64);
        for j in [&a, &b, &other] {
            bus.publish(j).await;
        }
        let mut pngs = Vec::new();
        for j in [&a, &b] {
            let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
            assert_eq!(r["status"], "done", "{r:?}");
            let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
            pngs.push(png);
        }
        assert_eq!(pngs[0], pngs[1], "the same job gave two PNGs");
        let r = bus.wait_final(&other.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "failed", "{r:?}");
        assert!(
            r["error"].contains("64x64"),
            "the error names the sizes served: {r:?}"
        );
        w.shut_down(Duration::from_secs(30))
            .await
            .expect("run returns Ok");
        bus.cleanup().await;
    });
}
