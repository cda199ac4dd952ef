//! The service against the real RabbitMQ and Redis on localhost (`tools/services.sh` starts them):
//! workers are `katz worker` processes, each test on its own queue; tests run one at a time
//! (some restart the brokers).

mod common;
use common::*;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use katz_actors::protocol::{image_key, job_key, ControlNetJob, ImageRef, Job, LoraJob, Seed};
use katz_actors::topology;
use katz_onnx::conditioning::ResizeMode;
use redis::AsyncCommands;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_job_with_controlnet_and_lora_runs_and_a_duplicate_runs_once() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("basic").await;
        let _w = Worker::start(&bus.queue, "w-basic", &[]);
        let mut j = job("basic");
        j.controlnets.push(ControlNetJob {
            resize: Default::default(),
            canny: None,
            model: "tiny-sdxl-controlnet".into(),
            image: ImageRef::Inline(std::fs::read(root().join("bundles/examples/cond_a.png")).unwrap()),
            scale: 0.8,
            start: 0.0,
            end: 1.0,
        });
        j.loras.push(LoraJob {
            name: "tiny-lora-a".into(),
            scale: 0.8,
        });
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        assert_eq!(r["worker"], "w-basic");
        let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        for k in [
            "pipeline_ms",
            "service_ms",
            "unet_encoder_ms",
            "controlnet_ms",
            "step_ms",
            "queue_wait_ms",
        ] {
            assert!(r.contains_key(k), "record lacks {k}: {r:?}");
        }
        // the same job again: acked without running (attempts stays 1)
        bus.publish(&j).await;
        let t0 = Instant::now();
        while bus.count(&bus.queue).await > 0 && t0.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = bus.record(&j.id).await;
        assert_eq!(r["attempts"], "1", "the duplicate ran again: {r:?}");
        bus.cleanup().await;
    });
}

#[test]
fn a_seed_of_minus_one_is_drawn_recorded_and_makes_the_same_png_again_and_long_prompts_are_recorded() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("seed").await;
        let _w = Worker::start(&bus.queue, "w-seed", &[]);
        let (mut a, mut b) = (job("seed-a"), job("seed-b"));
        a.seed = Seed::Random;
        b.seed = Seed::Random;
        bus.publish(&a).await;
        bus.publish(&b).await;
        let ra = bus.wait_final(&a.id, Duration::from_secs(60)).await;
        let rb = bus.wait_final(&b.id, Duration::from_secs(60)).await;
        assert_eq!((ra["status"].as_str(), rb["status"].as_str()), ("done", "done"));
        let seed: u64 = ra["seed"].parse().expect("the record holds the seed used");
        assert_ne!(ra["seed"], rb["seed"], "two random seeds");
        // resubmitted with the recorded seed: the same PNG, byte for byte
        let mut again = a.clone();
        again.id = uid("seed-again");
        again.seed = seed.into();
        bus.publish(&again).await;
        let r = bus.wait_final(&again.id, Duration::from_secs(60)).await;
        assert_eq!(
            (r["status"].as_str(), r["seed"].as_str()),
            ("done", ra["seed"].as_str())
        );
        let png_a: Vec<u8> = bus.redis.get(image_key(&a.id)).await.unwrap();
        let png_again: Vec<u8> = bus.redis.get(image_key(&again.id)).await.unwrap();
        assert!(png_a == png_again, "the recorded seed gives another image");
        let png_b: Vec<u8> = bus.redis.get(image_key(&b.id)).await.unwrap();
        assert!(png_a != png_b, "another seed, another image");
        assert!(!ra.contains_key("prompt_truncated"), "{ra:?}");
        // a prompt over 77 tokens runs, and its record says it was cut
        let mut long = job("seed-long");
        long.prompt = "a red circle above a blue square, ".repeat(20);
        bus.publish(&long).await;
        let r = bus.wait_final(&long.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        let t: serde_json::Value = serde_json::from_str(&r["prompt_truncated"]).unwrap();
        assert!(t["tokens"].as_u64().unwrap() > 77 && t["kept"] == 77, "{t}");
        bus.cleanup().await;
    });
}

#[test]
fn jpeg_and_webp_conditioning_of_another_size_run_resized_and_match_katz_generate() {
    let _g = serial();
    let store = test_lora_store("formats");
    rt().block_on(async {
        let mut bus = Bus::new("formats").await;
        let _w = Worker::start(&bus.queue, "w-formats", &[]);
        let ex = root().join("bundles/examples");
        let modes = [
            ("photo-200x120.jpg", ResizeMode::Resize, None, vec![]),
            (
                "photo-200x120.webp",
                ResizeMode::Crop,
                Some((100.0, 200.0)),
                vec!["--control-resize", "crop", "--canny", "100,200"],
            ),
            (
                "photo-200x120.jpg",
                ResizeMode::Pad,
                None,
                vec!["--control-resize", "pad"],
            ),
        ];
        let mut pngs = Vec::new();
        for (k, (file, resize, canny, flags)) in modes.into_iter().enumerate() {
            let mut j = job(&format!("fmt-{k}"));
            j.controlnets.push(ControlNetJob {
                model: "tiny-sdxl-controlnet".into(),
                image: ImageRef::Inline(std::fs::read(ex.join(file)).unwrap()),
                resize,
                canny: canny.map(|(low, high)| katz_onnx::conditioning::Canny { low, high }),
                scale: 0.8,
                start: 0.0,
                end: 1.0,
            });
            bus.publish(&j).await;
            let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
            assert_eq!(r["status"], "done", "{file} {resize:?}: {r:?}");
            let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
            let spec = format!("bundles/tiny-sdxl-controlnet=bundles/examples/{file}:0.8");
            let mut extra = vec!["--controlnet", spec.as_str()];
            extra.extend(flags);
            let local = generate_png(&j, &store, &extra);
            assert!(
                png == local,
                "{file} {resize:?}: the worker and katz generate differ"
            );
            pngs.push(png);
        }
        assert!(
            pngs[0] != pngs[1] && pngs[0] != pngs[2],
            "modes and canny change the image"
        );
        bus.cleanup().await;
    });
}

#[test]
fn sigkill_mid_job_leaves_it_to_another_worker_exactly_once() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("kill").await;
        let j = long_job("kill");
        bus.publish(&j).await;
        let a = Worker::start(&bus.queue, "w-kill-a", &[]);
        bus.wait_until(&j.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
                && r.get("step").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) >= 3
        })
        .await;
        a.signal(libc::SIGKILL);
        drop(a);
        assert_ne!(bus.record(&j.id).await["status"], "done");
        let b = Worker::start(&bus.queue, "w-kill-b", &[]);
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}\n{}", b.log());
        assert_eq!(r["worker"], "w-kill-b");
        assert_eq!(r["attempts"], "2");
        assert_eq!(bus.count(&bus.queue).await, 0);
        assert_eq!(bus.count(&topology::dead_queue(&bus.queue)).await, 0);
        bus.cleanup().await;
    });
}

#[test]
fn sigterm_finishes_the_job_in_flight_and_exits_0() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("term").await;
        let (first, second) = (long_job("term1"), job("term2"));
        bus.publish(&first).await;
        bus.publish(&second).await;
        let mut w = Worker::start(&bus.queue, "w-term", &[]);
        bus.wait_until(&first.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
        })
        .await;
        w.signal(libc::SIGTERM);
        let status = w
            .wait_exit(Duration::from_secs(120))
            .expect("worker exits after SIGTERM");
        assert!(status.success(), "exit status {status:?}\n{}", w.log());
        let r = bus.record(&first.id).await;
        assert_eq!(r["status"], "done", "{r:?}");
        // the second job was not taken: it waits in the queue for the next worker
        assert!(bus.record(&second.id).await.is_empty());
        assert_eq!(bus.count(&bus.queue).await, 1);
        bus.cleanup().await;
    });
}

#[test]
fn cancel_stops_a_running_job_at_a_step_boundary() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("cancel").await;
        let j = long_job("cancel");
        bus.publish(&j).await;
        let _w = Worker::start(&bus.queue, "w-cancel", &[]);
        bus.wait_until(&j.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
        })
        .await;
        let out = Command::new(katz_bin()).args(["cancel", &j.id]).output().unwrap();
        assert!(out.status.success());
        let r = bus.wait_final(&j.id, Duration::from_secs(30)).await;
        assert_eq!(r["status"], "cancelled", "{r:?}");
        let step: u32 = r["step"].parse().unwrap();
        assert!(step < 400, "it ran to the end");
        assert_eq!(bus.count(&bus.queue).await, 0);
        bus.cleanup().await;
    });
}

#[test]
fn bad_input_is_dead_lettered_with_a_failed_status_and_the_worker_stays_healthy() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("bad").await;
        let _w = Worker::start(&bus.queue, "w-bad", &[]);
        let mut expect: Vec<(String, &str)> = Vec::new();

        bus.publish_raw(b"\xc1 this is not msgpack").await; // no id to report on
        #[derive(serde::Serialize)]
        struct NoPrompt<'a> {
            v: u32,
            id: &'a str,
            base: &'a str,
        }
        let id = uid("missing");
        bus.publish_raw(
            &rmp_serde::to_vec_named(&NoPrompt {
                v: 1,
                id: &id,
                base: "tiny-sdxl",
            })
            .unwrap(),
        )
        .await;
        expect.push((id, "missing field"));
        #[derive(serde::Serialize)]
        struct BadSeed<'a> {
            v: u32,
            id: &'a str,
            seed: i64,
        }
        let id = uid("seed");
        bus.publish_raw(
            &rmp_serde::to_vec_named(&BadSeed {
                v: 1,
                id: &id,
                seed: -2,
            })
            .unwrap(),
        )
        .await;
        expect.push((id, "seed -2: a seed is 0 to 2^64-1, or -1 for a random one"));

        let mut cases: Vec<(Job, &str)> = Vec::new();
        let mut j = job("version");
        j.v = 99;
        cases.push((j, "schema version 99"));
        let mut j = job("huge");
        j.width = 100_000;
        j.height = 100_000;
        cases.push((j, "exceeds the limit"));
        let mut j = job("steps");
        j.steps = 1_000_000;
        cases.push((j, "steps 1000000"));
        let mut j = job("base");
        j.base = "sd15".into();
        cases.push((j, "unknown base model `sd15`"));
        let mut j = job("cn");
        j.controlnets.push(ControlNetJob {
            resize: Default::default(),
            canny: None,
            model: "canny".into(),
            image: ImageRef::Inline(vec![1, 2, 3]),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        });
        cases.push((j, "unknown ControlNet `canny`"));
        let mut j = job("lora");
        j.loras.push(LoraJob {
            name: "no-such-lora".into(),
            scale: 1.0,
        });
        cases.push((j, "unknown LoRA `no-such-lora`"));
        let mut j = job("image");
        j.controlnets.push(ControlNetJob {
            resize: Default::default(),
            canny: None,
            model: "tiny-sdxl-controlnet".into(),
            image: ImageRef::Inline(b"\x89PNG\r\n\x1a\ncorrupt".to_vec()),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        });
        cases.push((
            j,
            "ControlNet #0 (`tiny-sdxl-controlnet`): the conditioning image is not a readable PNG",
        ));
        let mut j = job("image-garbage");
        with_controlnets(&mut j, 1);
        j.controlnets[0].image = ImageRef::Inline(b"neither PNG nor JPEG nor WebP".to_vec());
        cases.push((
            j,
            "ControlNet #0 (`tiny-sdxl-controlnet`): the conditioning image is not a PNG, JPEG or WebP",
        ));
        let mut j = job("canny");
        with_controlnets(&mut j, 1);
        j.controlnets[0].canny = Some(katz_onnx::conditioning::Canny {
            low: 50.0,
            high: 5000.0,
        });
        cases.push((j, "ControlNet #0: canny thresholds must be 0 ≤ low ≤ high ≤ 1140"));
        let mut j = job("big");
        j.negative_prompt = Some("x".repeat(100 << 20));
        cases.push((j, "over the limit"));
        for (j, needle) in cases {
            bus.publish(&j).await;
            expect.push((j.id.clone(), needle));
        }
        // an id reused with other content: the first result stays
        let first = job("reuse");
        bus.publish(&first).await;
        let r = bus.wait_final(&first.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done");
        let mut again = first.clone();
        again.prompt = "something else".into();
        bus.publish(&again).await;

        for (id, needle) in &expect {
            let r = bus.wait_final(id, Duration::from_secs(60)).await;
            assert_eq!(r["status"], "failed", "{id}: {r:?}");
            assert!(
                r["error"].contains(needle),
                "{id}: error `{}` does not say `{needle}`",
                r["error"]
            );
        }
        let dead = topology::dead_queue(&bus.queue);
        let want = expect.len() as u32 + 2; // + the undecodable bytes + the reused id
        let t0 = Instant::now();
        while bus.count(&dead).await < want && t0.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(bus.count(&dead).await, want, "dead-letter queue");
        let r = bus.record(&first.id).await;
        assert_eq!(
            r["status"], "done",
            "the reused id overwrote the first job: {r:?}"
        );
        assert!(
            r.get("conflict").is_some_and(|c| c.contains("different job")),
            "{r:?}"
        );

        // still healthy
        let ok = job("after");
        bus.publish(&ok).await;
        assert_eq!(
            bus.wait_final(&ok.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        bus.cleanup().await;
    });
}

#[test]
fn metrics_endpoint_reports_jobs() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("metrics").await;
        let port = 20000 + (std::process::id() % 20000) as u16;
        let addr = format!("127.0.0.1:{port}");
        let _w = Worker::start(&bus.queue, "w-metrics", &["--metrics-addr", &addr]);
        let j = job("metrics");
        bus.publish(&j).await;
        assert_eq!(
            bus.wait_final(&j.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(
            body.contains("katz_jobs_total{model=\"tiny-sdxl\",outcome=\"done\"} 1"),
            "{body}"
        );
        for m in [
            "katz_queue_wait_seconds_count 1",
            "katz_job_latency_seconds_count 1",
            "katz_step_seconds_count 2",
            "# TYPE katz_lora_cache_hits_total counter",
            "katz_lora_pending_loads 0",
            "# TYPE katz_controlnet_session_retries_total counter",
        ] {
            assert!(body.contains(m), "no `{m}` in\n{body}");
        }
        bus.cleanup().await;
    });
}

#[test]
fn higher_priority_jobs_run_first() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("prio").await;
        let mut low = job("low");
        low.priority = 0;
        let mut high = job("high");
        high.priority = 9;
        bus.publish(&low).await;
        bus.publish(&high).await;
        let _w = Worker::start(&bus.queue, "w-prio", &[]);
        let l = bus.wait_final(&low.id, Duration::from_secs(60)).await;
        let h = bus.wait_final(&high.id, Duration::from_secs(60)).await;
        let started = |r: &HashMap<String, String>| r["started_ms"].parse::<u64>().unwrap();
        assert!(started(&h) <= started(&l), "high {h:?} low {l:?}");
        bus.cleanup().await;
    });
}

fn sh(cmd: &str) {
    let st = Command::new("bash")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "`{cmd}` failed");
}

#[test]
fn rabbitmq_and_redis_restarts_lose_no_job() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("restart").await;
        let w = Worker::start(&bus.queue, "w-restart", &[]);
        let warm = job("warm");
        bus.publish(&warm).await;
        assert_eq!(
            bus.wait_final(&warm.id, Duration::from_secs(60)).await["status"],
            "done"
        );

        // RabbitMQ goes away with a job running and jobs queued, comes back; more jobs follow
        let running = long_job("rb-running");
        bus.publish(&running).await;
        let queued: Vec<Job> = (0..2).map(|i| job(&format!("rb-queued{i}"))).collect();
        for j in &queued {
            bus.publish(j).await;
        }
        bus.wait_until(&running.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
        })
        .await;
        sh("rabbitmqctl stop_app");
        tokio::time::sleep(Duration::from_secs(1)).await;
        sh("rabbitmqctl start_app && rabbitmqctl await_startup");
        bus.reconnect().await;
        let after: Vec<Job> = (0..3).map(|i| job(&format!("rb-after{i}"))).collect();
        for j in &after {
            bus.publish(j).await;
        }
        for j in std::iter::once(&running).chain(&queued).chain(&after) {
            let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
            assert_eq!(r["status"], "done", "{r:?}\n{}", w.log());
        }
        // the job whose channel died was redelivered to the same worker: it waited for the first
        // run and was acked as done, so one result and one run
        assert_eq!(bus.record(&running.id).await["attempts"], "1");
        let t0 = Instant::now();
        while bus.count(&bus.queue).await > 0 && t0.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(bus.count(&bus.queue).await, 0);

        // Redis goes away in the middle of a job and comes back (empty: it keeps nothing on disk)
        let j = long_job("redis");
        bus.publish(&j).await;
        bus.wait_until(&j.id, Duration::from_secs(60), |r| {
            r.get("status").map(String::as_str) == Some("running")
        })
        .await;
        sh("redis-cli -p 6379 shutdown nosave || true");
        tokio::time::sleep(Duration::from_secs(2)).await;
        sh(&format!("{}/tools/services.sh", root().display()));
        bus.redis = redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}\n{}", w.log());
        let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let after = job("after-redis");
        bus.publish(&after).await;
        assert_eq!(
            bus.wait_final(&after.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        bus.cleanup().await;
    });
}

#[test]
fn five_hundred_jobs_two_workers_none_lost_none_duplicated() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("load").await;
        let jobs: Vec<Job> = (0..500).map(|i| job(&format!("load{i}"))).collect();
        for j in &jobs {
            bus.publish(j).await;
        }
        let a = Worker::start(&bus.queue, "w-load-a", &[]);
        let b = Worker::start(&bus.queue, "w-load-b", &[]);
        let t0 = Instant::now();
        let mut max_rss = 0;
        loop {
            max_rss = max_rss.max(a.rss_kib()).max(b.rss_kib());
            let mut pipe = redis::pipe();
            for j in &jobs {
                pipe.hget(job_key(&j.id), "status");
            }
            let st: Vec<Option<String>> = pipe.query_async(&mut bus.redis).await.unwrap();
            let done = st.iter().filter(|s| s.as_deref() == Some("done")).count();
            if done == jobs.len() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{done}/500 done after 300 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut by_worker: HashMap<String, usize> = HashMap::new();
        for j in &jobs {
            let r = bus.record(&j.id).await;
            assert_eq!(r["attempts"], "1", "{} ran twice", j.id);
            *by_worker.entry(r["worker"].clone()).or_default() += 1;
            let n: bool = bus.redis.exists(image_key(&j.id)).await.unwrap();
            assert!(n);
        }
        assert_eq!(by_worker.len(), 2, "both workers took jobs: {by_worker:?}");
        assert!(max_rss < 1_500_000, "worker RSS grew to {max_rss} KiB");
        eprintln!(
            "500 jobs in {:.1} s, by worker {by_worker:?}, max RSS {} MiB",
            t0.elapsed().as_secs_f64(),
            max_rss / 1024
        );
        assert_eq!(bus.count(&bus.queue).await, 0);
        bus.cleanup().await;
    });
}

#[test]
fn the_readme_service_path_submit_wait_status() {
    let _g = serial();
    rt().block_on(async {
        let bus = Bus::new("cli").await;
        let _w = Worker::start(&bus.queue, "w-cli", &[]);
        let dir = std::env::temp_dir().join(format!("katz-submit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out.png");
        let katz = |args: &[&str]| {
            Command::new(katz_bin())
                .args(args)
                .current_dir(root())
                .output()
                .unwrap()
        };
        let r = katz(&[
            "submit",
            "--queue",
            &bus.queue,
            "--prompt",
            "a red circle above a blue square",
            "--size",
            "64x64",
            "--steps",
            "3",
            "--controlnet",
            "tiny-sdxl-controlnet=bundles/examples/cond_a.png:0.8",
            "--lora",
            "tiny-lora-a:0.8",
            "--wait",
            "--output",
            out.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(
            r.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));
        let id = stdout.lines().next().unwrap().trim().to_string();
        let st = katz(&["status", &id]);
        let rec: HashMap<String, String> = serde_json::from_slice(&st.stdout).unwrap();
        assert_eq!(rec["status"], "done");
        assert_eq!(rec["worker"], "w-cli");
        // a job that fails: --wait exits non-zero with the reason
        let r = katz(&[
            "submit", "--queue", &bus.queue, "--prompt", "x", "--size", "64x64", "--steps", "2", "--lora",
            "nope", "--wait",
        ]);
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains("unknown LoRA `nope`"));
        assert!(katz(&["status", "no-such-job-id"]).status.code() == Some(1));
        bus.cleanup().await;
    });
}

/// Runs `katz generate` for a job's parameters (LoRAs from `store`); returns the PNG.
fn generate_png(j: &Job, store: &std::path::Path, extra: &[&str]) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("katz-gen-{}-{}.png", j.id, std::process::id()));
    let mut cmd = Command::new(katz_bin());
    cmd.current_dir(root()).args([
        "generate",
        "--bundle",
        "bundles/tiny-sdxl",
        "--prompt",
        &j.prompt,
        "--steps",
        &j.steps.to_string(),
        "--size",
        &format!("{}x{}", j.width, j.height),
        "--guidance",
        &j.guidance.to_string(),
        "--seed",
        &j.seed.to_string(),
        "--threads",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    for l in &j.loras {
        cmd.arg("--lora").arg(format!(
            "{}:{}",
            store.join(format!("{}.safetensors", l.name)).display(),
            l.scale
        ));
    }
    let o = cmd.args(extra).stdout(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(&out).unwrap()
}

#[test]
fn jobs_with_0_to_3_loras_run_in_both_modes_and_match_katz_generate() {
    let _g = serial();
    let store = test_lora_store("modes");
    let names = ["tiny-lora-a", "tiny-lora-b", "tiny-lora-c"]; // c: kohya layout
    rt().block_on(async {
        for (mode, bound) in [("sync", 0usize), ("async", 4)] {
            let mut bus = Bus::new(&format!("lora-{mode}")).await;
            let _w = Worker::start(
                &bus.queue,
                &format!("w-lora-{mode}"),
                &[
                    "--lora-dir",
                    store.to_str().unwrap(),
                    "--lora-mode",
                    mode,
                    "--lora-bound",
                    "4",
                ],
            );
            let mut jobs = Vec::new();
            for n in 0..=3 {
                let mut j = job(&format!("{mode}{n}"));
                j.steps = 8;
                j.seed = 5.into();
                for (i, name) in names.iter().take(n).enumerate() {
                    j.loras.push(LoraJob {
                        name: name.to_string(),
                        scale: [0.8, -0.5, 0.6][i],
                    });
                }
                bus.publish(&j).await;
                jobs.push(j);
            }
            let mut pngs = Vec::new();
            for j in &jobs {
                let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
                assert_eq!(r["status"], "done", "{mode} {r:?}");
                if !j.loras.is_empty() {
                    assert_eq!(r["lora_mode"], mode);
                    assert_eq!(r["lora_switch_step"], bound.to_string(), "{r:?}");
                    let (h, l): (u32, u32) = (
                        r["lora_cache_hits"].parse().unwrap(),
                        r["lora_loads"].parse().unwrap(),
                    );
                    assert_eq!((h + l) as usize, j.loras.len(), "{r:?}");
                }
                let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
                pngs.push(png);
            }
            // every LoRA count gives another image
            for a in 0..pngs.len() {
                for b in a + 1..pngs.len() {
                    assert_ne!(pngs[a], pngs[b], "{mode}: {a} and {b} LoRAs gave the same image");
                }
            }
            // the worker's image is `katz generate`'s in the same mode
            let want = generate_png(&jobs[3], &store, &["--lora-mode", mode, "--lora-bound", "4"]);
            assert_eq!(pngs[3], want, "{mode}: the worker and katz generate differ");
            bus.cleanup().await;
        }
    });
}

#[test]
fn a_slow_lora_store_delays_the_first_step_in_sync_mode_only() {
    let _g = serial();
    let store = test_lora_store("slow");
    rt().block_on(async {
        for mode in ["async", "sync"] {
            let mut bus = Bus::new(&format!("slow-{mode}")).await;
            let _w = Worker::start(
                &bus.queue,
                &format!("w-slow-{mode}"),
                &[
                    "--lora-dir",
                    store.to_str().unwrap(),
                    "--lora-mode",
                    mode,
                    "--lora-bound",
                    "0.5",
                    "--lora-fetch-delay-ms",
                    "2000",
                ],
            );
            let mut j = job(&format!("slow-{mode}"));
            j.steps = 10;
            j.loras.push(LoraJob {
                name: "tiny-lora-b".into(),
                scale: 0.7,
            });
            bus.publish(&j).await;
            let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
            assert_eq!(r["status"], "done", "{r:?}");
            let f = |k: &str| r[k].parse::<f64>().unwrap();
            // the fetch starts at admission, a moment before the merge is asked for: ≥ 1.5 s, not 2
            assert!(f("lora_ready_ms") >= 1500.0, "{r:?}");
            if mode == "async" {
                // denoising started at once; the job waited at step 5 for the LoRA
                assert!(f("first_step_ms") < f("lora_ready_ms"), "{r:?}");
                assert_eq!(r["lora_switch_step"], "5");
            } else {
                assert!(f("first_step_ms") >= 1500.0, "{r:?}");
                assert_eq!(r["lora_switch_step"], "0");
            }
            bus.cleanup().await;
        }
    });
}

/// A `katz controlnet-worker` for the tiny ControlNet, killed when dropped.
fn cn_worker(name: &str, extra: &[&str]) -> Worker {
    let args = [
        "controlnet-worker",
        "--bundle",
        "bundles/tiny-sdxl-controlnet",
        "--name",
        name,
        "--threads",
        "1",
        "--idle-s",
        "10",
    ];
    Worker::spawn(&args, name, extra)
}

/// `katz generate` with the job's ControlNets in-process.
fn generate_with_controlnets(j: &Job) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("katz-gen-{}-{}.png", j.id, std::process::id()));
    let mut cmd = Command::new(katz_bin());
    cmd.current_dir(root()).args([
        "generate",
        "--bundle",
        "bundles/tiny-sdxl",
        "--prompt",
        &j.prompt,
        "--steps",
        &j.steps.to_string(),
        "--size",
        &format!("{}x{}", j.width, j.height),
        "--guidance",
        &j.guidance.to_string(),
        "--seed",
        &j.seed.to_string(),
        "--threads",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    let images = ["cond_a.png", "cond_b.png", "cond_a.png"];
    for (k, c) in j.controlnets.iter().enumerate() {
        cmd.arg("--controlnet").arg(format!(
            "bundles/tiny-sdxl-controlnet=bundles/examples/{}:{}:{}:{}",
            images[k], c.scale, c.start, c.end
        ));
    }
    let o = cmd.stdout(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(&out).unwrap()
}

fn png_f32(png: &[u8]) -> Vec<f32> {
    katz_onnx::image::decode_png(png, std::path::Path::new("png"))
        .unwrap()
        .data
}

#[test]
fn remote_controlnets_give_the_in_process_image_for_1_2_3_controlnets() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("cn-remote").await;
        let q = format!("{}.cn", bus.queue);
        let _a = cn_worker("cn-a", &["--concurrency", "2", "--queue", &q]);
        let _b = cn_worker("cn-b", &["--concurrency", "2", "--queue", &q]);
        let svc = format!("tiny-sdxl-controlnet@{q}");
        let _w = Worker::start(&bus.queue, "w-cn-remote", &["--controlnet-service", &svc]);
        for n in 1..=3 {
            let mut j = job(&format!("cnr{n}"));
            j.steps = 6;
            j.seed = 9.into();
            with_controlnets(&mut j, n);
            bus.publish(&j).await;
            let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
            assert_eq!(r["status"], "done", "{n} ControlNets: {r:?}");
            assert_eq!(r["controlnet_retries"], "0", "{r:?}");
            let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
            let want = generate_with_controlnets(&j);
            let e = katz_kernels::rel_err(&png_f32(&png), &png_f32(&want));
            assert!(
                e <= 1e-4,
                "{n} ControlNets: service vs in-process relative error {e:.2e}"
            );
        }
        bus.cleanup().await;
    });
}

/// `--controlnet-residuals f16` on an f32 ControlNet: the residuals come back rounded to fp16 (half
/// the bytes through Redis), so the image is close to the in-process one but not the same.
#[test]
fn half_precision_residuals_round_an_f32_controlnet_slightly() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("cn-half").await;
        let q = format!("{}.cn", bus.queue);
        let _a = cn_worker("cn-half", &["--queue", &q]);
        let svc = format!("tiny-sdxl-controlnet@{q}");
        let _w = Worker::start(
            &bus.queue,
            "w-cn-half",
            &["--controlnet-service", &svc, "--controlnet-residuals", "f16"],
        );
        let mut j = job("cnh");
        j.steps = 6;
        j.seed = 9.into();
        with_controlnets(&mut j, 1);
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        let png: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        let want = generate_with_controlnets(&j);
        let e = katz_kernels::rel_err(&png_f32(&png), &png_f32(&want));
        assert!(e <= 1e-2, "fp16 residuals vs in-process: relative error {e:.2e}");
        // the ControlNet worker answered in fp16 (its log, escapes stripped)
        let log: String = {
            let raw = _a.log();
            let mut out = String::with_capacity(raw.len());
            let mut esc = false;
            for c in raw.chars() {
                match (esc, c) {
                    (false, '\x1b') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => out.push(c),
                }
            }
            out
        };
        assert!(
            log.lines()
                .any(|l| l.contains("session started") && l.contains("half=true")),
            "the ControlNet worker did not answer in fp16:\n{log}"
        );
        bus.cleanup().await;
    });
}

async fn leftover_keys(bus: &mut Bus, job: &str) -> Vec<(String, i64)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("katz:cn:{job}-*"))
        .query_async(&mut bus.redis)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let ttl: i64 = bus.redis.ttl(&k).await.unwrap();
        out.push((k, ttl));
    }
    out
}

#[test]
fn a_controlnet_worker_killed_mid_session_moves_the_session_or_fails_the_job() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("cn-kill").await;
        let q = format!("{}.cn", bus.queue);
        let svc = format!("tiny-sdxl-controlnet@{q}");
        let mut a = cn_worker("cn-kill-a", &["--queue", &q]);
        let _w = Worker::start(
            &bus.queue,
            "w-cn-kill",
            &[
                "--controlnet-service",
                &svc,
                "--controlnet-step-timeout-ms",
                "1500",
                "--controlnet-retries",
                "2",
            ],
        );
        let mut j = job("cnkill");
        j.steps = 400;
        with_controlnets(&mut j, 1);
        bus.publish(&j).await;
        // the session is on A once A says so (progress in Redis may lag a busy machine)
        let t0 = Instant::now();
        while !(a.log().contains(j.id.as_str()) && a.log().contains("session started")) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "A never started the session:\n{}",
                a.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _b = cn_worker("cn-kill-b", &["--queue", &q]);
        a.signal(libc::SIGKILL);
        let _ = a.wait_exit(Duration::from_secs(5));
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        // B finished the job's ControlNet steps, one of two ways: A died between steps, its unacked
        // session-open came back to B, which carried the same session on; or A died holding a step,
        // the base's step timeout abandoned the session and opened another, which B took
        let retried = r["controlnet_retries"].parse::<u32>().unwrap();
        assert!(
            _b.log().contains(j.id.as_str()) && _b.log().contains("session started"),
            "B never served the job (retries {retried}):\n{}",
            _b.log()
        );
        // nothing of the job's sessions stays without a TTL
        for (k, ttl) in leftover_keys(&mut bus, &j.id).await {
            assert!(ttl > 0, "{k} has no TTL");
        }
        drop(_b);

        // no ControlNet worker at all: the job fails, naming the ControlNet, in bounded time
        let mut j = job("cnnone");
        with_controlnets(&mut j, 1);
        let t0 = Instant::now();
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "failed", "{r:?}");
        assert!(
            r["error"].contains("tiny-sdxl-controlnet") && r["error"].contains("no worker answered"),
            "{r:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
        assert_eq!(bus.count(&topology::dead_queue(&bus.queue)).await, 1);
        for (k, ttl) in leftover_keys(&mut bus, &j.id).await {
            assert!(ttl > 0, "{k} has no TTL");
        }
        bus.cleanup().await;
    });
}

#[test]
fn a_replayed_trace_runs_every_job_with_its_loras() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("replay").await;
        let dir = std::env::temp_dir().join(format!("katz-replay-{}", std::process::id()));
        let (store, trace) = (dir.join("store"), dir.join("trace.json"));
        let run = |args: &[&str]| {
            let out = Command::new(katz_bin())
                .args(args)
                .current_dir(root())
                .output()
                .expect("katz runs");
            let so = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "katz {args:?}: {so}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            so
        };
        let t = trace.to_str().unwrap();
        run(&[
            "trace",
            "gen",
            "--service",
            "B",
            "--requests",
            "10",
            "--rate",
            "5",
            "--seed",
            "3",
            "--out",
            t,
        ]);
        let reqs: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        let _w = Worker::start(&bus.queue, "w-replay", &["--lora-dir", store.to_str().unwrap()]);
        let prefix = uid("replay");
        let so = run(&[
            "trace",
            "replay",
            t,
            "--store",
            store.to_str().unwrap(),
            "--speed",
            "50",
            "--queue",
            &bus.queue,
            "--id-prefix",
            &prefix,
            "--steps",
            "4",
        ]);
        assert!(so.contains("10 jobs published"), "{so}");
        for i in 0..10 {
            let r = bus
                .wait_final(&format!("{prefix}-{i}"), Duration::from_secs(120))
                .await;
            assert_eq!(r["status"], "done", "job {i}: {r:?}");
            let want = reqs[i]["loras"].as_array().unwrap().len();
            let got: usize = ["lora_loads", "lora_cache_hits"]
                .iter()
                .map(|k| r.get(*k).map(|v| v.parse::<usize>().unwrap()).unwrap_or(0))
                .sum();
            assert_eq!(got, want, "job {i}: its LoRAs were loaded or found cached: {r:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        bus.cleanup().await;
    });
}
