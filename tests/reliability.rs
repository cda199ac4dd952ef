//! Jobs a careless or hostile producer may send, against `katz worker` processes on the real
//! RabbitMQ and Redis (`tools/services.sh` starts them), each test on its own queue and job ids:
//! no job touches another job's keys; a bad job fails at once with the reason (never retried for
//! ever, never `done`); the wire format is read strictly; every record the worker ends expires.

mod common;
use common::*;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use katz_actors::protocol::{cancel_key, image_key, job_key, upload_prefix, ImageRef, LoraJob};
use katz_actors::topology;
use redis::AsyncCommands;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until the test queue's dead-letter queue holds `n` messages; returns how many it holds.
async fn dead(bus: &Bus, n: u32) -> u32 {
    let q = topology::dead_queue(&bus.queue);
    let t0 = Instant::now();
    while bus.count(&q).await < n && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.count(&q).await
}

/// What a producer does before publishing: a `queued` record.
async fn queued(bus: &mut Bus, id: &str) {
    let _: () = bus
        .redis
        .hset_multiple(job_key(id), &[("status", "queued")])
        .await
        .unwrap();
}

async fn ttl(bus: &mut Bus, key: &str) -> i64 {
    bus.redis.ttl(key).await.unwrap()
}

fn failed_with(r: &HashMap<String, String>, needle: &str) {
    assert_eq!(r.get("status").map(String::as_str), Some("failed"), "{r:?}");
    assert!(
        r["error"].contains(needle),
        "error `{}` does not say `{needle}`",
        r["error"]
    );
}

#[test]
fn no_job_id_or_conditioning_key_reaches_another_jobs_keys() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-keys").await;
        let _w = Worker::start(&bus.queue, "w-rel-keys", &[]);
        // a job that runs a while, and jobs whose ids would have named its keys
        let mut v = long_job("victim");
        v.steps = 60;
        bus.publish(&v).await;
        for suffix in ["cancel", "image"] {
            let mut j = job("alias");
            j.id = format!("{}:{suffix}", v.id);
            bus.publish(&j).await;
        }
        // `X:image` before X
        let x = job("x");
        let mut xi = job("xi");
        xi.id = format!("{}:image", x.id);
        bus.publish(&xi).await;
        bus.publish(&x).await;
        // conditioning images: another job's image, a hash under the job's own prefix, its own
        let mut steal = job("steal");
        with_controlnets(&mut steal, 1);
        steal.controlnets[0].image = ImageRef::RedisKey(image_key(&x.id));
        let mut secret = job("secret");
        with_controlnets(&mut secret, 1);
        secret.controlnets[0].image = ImageRef::RedisKey("katz:worker:anything".into());
        let mut hash = job("hash");
        with_controlnets(&mut hash, 1);
        let hkey = format!("{}0", upload_prefix(&hash.id));
        let _: () = bus.redis.hset(&hkey, "status", "done").await.unwrap();
        let _: () = bus.redis.expire(&hkey, 600).await.unwrap();
        hash.controlnets[0].image = ImageRef::RedisKey(hkey.clone());
        let mut own = job("own");
        with_controlnets(&mut own, 1);
        let okey = format!("{}cond", upload_prefix(&own.id));
        let png = std::fs::read(root().join("bundles/examples/cond_b.png")).unwrap();
        let _: () = bus.redis.set_ex(&okey, png, 600).await.unwrap();
        own.controlnets[0].image = ImageRef::RedisKey(okey.clone());
        for j in [&steal, &secret, &hash, &own] {
            bus.publish(j).await;
        }

        let r = bus.wait_final(&v.id, Duration::from_secs(120)).await;
        assert_eq!(
            (r["status"].as_str(), r["attempts"].as_str()),
            ("done", "1"),
            "{r:?}"
        );
        let img: Vec<u8> = bus.redis.get(image_key(&v.id)).await.unwrap();
        assert!(img.starts_with(b"\x89PNG"));
        let r = bus.wait_final(&x.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        let img: Vec<u8> = bus.redis.get(image_key(&x.id)).await.unwrap();
        assert!(img.starts_with(b"\x89PNG"));
        // the aliases wrote nothing: no record under their ids, no cancel key for V
        let exists: bool = bus.redis.exists(cancel_key(&v.id)).await.unwrap();
        assert!(!exists, "an id named the victim's cancel key");
        for j in [&steal, &secret] {
            let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
            failed_with(&r, "is not one of this job's uploads");
        }
        let t0 = Instant::now();
        let r = bus.wait_final(&hash.id, Duration::from_secs(60)).await;
        failed_with(&r, "WRONGTYPE");
        assert!(t0.elapsed() < Duration::from_secs(30), "a WRONGTYPE was retried");
        assert_eq!(r["attempts"], "1", "{r:?}");
        assert_eq!(
            bus.wait_final(&own.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        // 3 ids with `:` + 3 conditioning keys refused
        assert_eq!(dead(&bus, 6).await, 6);
        let _: () = bus.redis.del(&[hkey, okey]).await.unwrap();
        bus.cleanup().await;
    });
}

#[test]
fn bad_ttls_and_records_of_other_types_fail_at_once_and_every_end_expires() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-ttl").await;
        let _w = Worker::start(&bus.queue, "w-rel-ttl", &[]);
        let mut bad = Vec::new();
        for (tag, ttl) in [("zero", 0), ("max", u64::MAX), ("half", 1 << 63)] {
            let mut j = job(tag);
            j.result_ttl_s = ttl;
            if tag == "half" {
                j.width = 7; // a job that would fail anyway
            }
            queued(&mut bus, &j.id).await;
            bus.publish(&j).await;
            bad.push(j);
        }
        // a record key someone made a string: the worker cannot write the record (WRONGTYPE)
        let wrong = job("wrongtype");
        let _: () = bus.redis.set_ex(job_key(&wrong.id), "junk", 600).await.unwrap();
        bus.publish(&wrong).await;
        // cancelled by hand before it started (the cancel key has no TTL)
        let c = job("cancelled");
        queued(&mut bus, &c.id).await;
        let _: () = bus.redis.set(cancel_key(&c.id), "1").await.unwrap();
        bus.publish(&c).await;
        let mut ok = job("ok");
        ok.result_ttl_s = 600;
        let t0 = Instant::now();
        bus.publish(&ok).await;

        let r = bus.wait_final(&ok.id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the good job waited on bad ones"
        );
        assert!((1..=600).contains(&ttl(&mut bus, &job_key(&ok.id)).await));
        assert!((1..=600).contains(&ttl(&mut bus, &image_key(&ok.id)).await));
        for j in &bad {
            let r = bus.wait_final(&j.id, Duration::from_secs(10)).await;
            failed_with(&r, "result_ttl_s");
            let t = ttl(&mut bus, &job_key(&j.id)).await;
            assert!((1..=86_400).contains(&t), "failed record of {}: ttl {t}", j.id);
        }
        let r = bus.wait_final(&c.id, Duration::from_secs(10)).await;
        assert_eq!(r["status"], "cancelled", "{r:?}");
        let t = ttl(&mut bus, &job_key(&c.id)).await;
        assert!((1..=86_400).contains(&t), "cancelled before start: ttl {t}");
        let gone: bool = bus.redis.exists(cancel_key(&c.id)).await.unwrap();
        assert!(!gone, "the cancel key outlived the job");
        // wrongtype: dead-lettered without a retry loop; its key is left as it was
        assert_eq!(dead(&bus, 4).await, 4);
        let junk: String = bus.redis.get(job_key(&wrong.id)).await.unwrap();
        assert_eq!(junk, "junk");
        let _: () = bus.redis.del(job_key(&wrong.id)).await.unwrap();
        bus.cleanup().await;
    });
}

/// msgpack of a short string (fixstr).
fn s(x: &str) -> Vec<u8> {
    let mut b = vec![0xa0 | x.len() as u8];
    b.extend(x.as_bytes());
    b
}

#[test]
fn the_wire_format_is_read_strictly_and_every_refused_job_with_an_id_gets_a_status() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-wire").await;
        let _w = Worker::start(&bus.queue, "w-rel-wire", &[]);
        // field positions as keys, no string key: no id to report on
        bus.publish_raw(
            &[
                vec![0x83, 0x00, 0x01, 0x01],
                s("anon"),
                vec![0x02],
                s("tiny-sdxl"),
            ]
            .concat(),
        )
        .await;
        // a job as a msgpack array
        bus.publish_raw(&rmp_serde::to_vec(&job("array")).unwrap()).await;
        // string keys, but `seed` missing and given as integer key 9
        #[derive(serde::Serialize)]
        struct NoSeed<'a> {
            v: u32,
            id: &'a str,
            base: &'a str,
            prompt: &'a str,
            width: u32,
            height: u32,
            steps: u32,
            guidance: f32,
        }
        let int_key = uid("intkey");
        let mut b = rmp_serde::to_vec_named(&NoSeed {
            v: 1,
            id: &int_key,
            base: "tiny-sdxl",
            prompt: "p",
            width: 64,
            height: 64,
            steps: 2,
            guidance: 5.0,
        })
        .unwrap();
        assert_eq!(b[0], 0x88);
        b[0] = 0x89;
        b.extend([0x09, 0x05]);
        queued(&mut bus, &int_key).await;
        bus.publish_raw(&b).await;
        // 10⁵ levels under an unknown key, before the id
        let deep = uid("deep");
        let mut b = [vec![0x83], s("x")].concat();
        b.extend(std::iter::repeat_n(0x91, 100_000));
        b.push(0xc0);
        b.extend([s("v"), vec![0x01], s("id"), s(&deep)].concat());
        queued(&mut bus, &deep).await;
        bus.publish_raw(&b).await;
        let ok = job("after");
        bus.publish(&ok).await;

        failed_with(
            &bus.wait_final(&int_key, Duration::from_secs(30)).await,
            "is an integer: the protocol's maps have string keys",
        );
        failed_with(
            &bus.wait_final(&deep, Duration::from_secs(30)).await,
            "nests deeper than 16 levels",
        );
        assert_eq!(
            bus.wait_final(&ok.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        assert_eq!(dead(&bus, 4).await, 4);
        // a bad message under a finished job's id: that record stays, with a conflict note
        let mut again = ok.clone();
        again.v = 99;
        bus.publish(&again).await;
        assert_eq!(dead(&bus, 5).await, 5);
        let r = bus.record(&ok.id).await;
        assert_eq!(r["status"], "done", "{r:?}");
        assert!(r["conflict"].contains("schema version 99"), "{r:?}");
        bus.cleanup().await;
    });
}

#[test]
fn a_job_whose_numbers_overflow_fails_instead_of_storing_an_image() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-nan").await;
        let _w = Worker::start(&bus.queue, "w-rel-nan", &[]);
        let mut lora = job("lora-huge");
        lora.loras.push(LoraJob {
            name: "tiny-lora-a".into(),
            scale: 3e38,
        });
        let mut cn = job("cn-huge");
        with_controlnets(&mut cn, 1);
        cn.controlnets[0].scale = 3e38;
        let ok = job("ok");
        for j in [&lora, &cn, &ok] {
            bus.publish(j).await;
        }
        for j in [&lora, &cn] {
            let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
            failed_with(&r, "non-finite value");
            assert_eq!(r["error_kind"], "non_finite");
            let img: bool = bus.redis.exists(image_key(&j.id)).await.unwrap();
            assert!(!img, "{}: an image was stored", j.id);
        }
        assert_eq!(
            bus.wait_final(&ok.id, Duration::from_secs(60)).await["status"],
            "done"
        );
        bus.cleanup().await;
    });
}

/// Tiny jobs one after another: the worker's RSS after a warm-up must not grow with the jobs it
/// served (KATZ_RSS_JOBS, default 1500).
#[test]
fn worker_memory_stays_flat_over_many_jobs() {
    let _g = serial();
    rt().block_on(async {
        let n: usize = std::env::var("KATZ_RSS_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500);
        let mut bus = Bus::new("rel-rss").await;
        let w = Worker::start(&bus.queue, "w-rel-rss", &["--lookahead", "4"]);
        let tiny = |i: usize| {
            let mut j = job(&format!("rss{i}"));
            j.steps = 1;
            j.result_ttl_s = 60;
            j
        };
        let mut samples = Vec::new();
        let warm = n / 5;
        let batch = 100;
        let mut sent = 0;
        while sent < n {
            let jobs: Vec<_> = (sent..(sent + batch).min(n)).map(tiny).collect();
            for j in &jobs {
                bus.publish(j).await;
            }
            let last = jobs.last().unwrap();
            bus.wait_final(&last.id, Duration::from_secs(120)).await;
            sent += jobs.len();
            if sent >= warm {
                samples.push((sent, w.rss_kib()));
            }
        }
        eprintln!("rss (jobs, KiB): {samples:?}");
        let (j0, r0) = samples[0];
        let (j1, r1) = *samples.last().unwrap();
        let per_job = (r1 as f64 - r0 as f64) / (j1 - j0) as f64;
        assert!(
            per_job < 2.0,
            "RSS grew {per_job:.2} KiB per job ({r0} KiB after {j0} jobs, {r1} KiB after {j1})"
        );
        bus.cleanup().await;
    });
}

/// Closes the RabbitMQ connections whose client name is `name` (as a broker restart would, for
/// this worker only: other tests' connections stay); returns how many.
fn close_connections(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains(&format!("\"{name}\"")) {
            let pid = line.split('\t').next().unwrap_or_default();
            let st = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: connection closed"])
                .output()
                .expect("rabbitmqctl");
            assert!(st.status.success(), "{st:?}");
            n += 1;
        }
    }
    n
}

#[test]
fn a_job_redelivered_while_it_still_runs_here_waits_for_that_run_and_runs_once() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-redeliver").await;
        let name = format!("w-rel-redeliver-{}", std::process::id());
        let w = Worker::start(&bus.queue, &name, &[]);
        let j = long_job("redelivered");
        let client = redis::Client::open(REDIS).unwrap();
        let mut sub = client.get_async_pubsub().await.unwrap();
        sub.subscribe(katz_actors::protocol::events_channel(&j.id))
            .await
            .unwrap();
        bus.publish(&j).await;
        bus.wait_until(&j.id, Duration::from_secs(60), |r| {
            r.get("step").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) >= 5
        })
        .await;
        assert!(
            close_connections(&name) >= 1,
            "the worker's connection was not found"
        );
        let r = bus.wait_final(&j.id, Duration::from_secs(180)).await;
        assert_eq!(r["status"], "done", "{r:?}");
        // the redelivery reaches the worker after its reconnect: give it time to settle
        let t0 = Instant::now();
        while bus.count(&bus.queue).await > 0 && t0.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let r = bus.record(&j.id).await;
        assert_eq!(r["attempts"], "1", "the job ran twice: {r:?}\n{}", w.log());
        use futures_util::StreamExt;
        let mut done = 0;
        let mut msgs = sub.on_message();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), msgs.next()).await {
            let payload: String = m.get_payload().unwrap();
            if payload.contains("\"done\"") {
                done += 1;
            }
        }
        assert_eq!(done, 1, "done events");
        bus.cleanup().await;
    });
}

/// The classification on real Redis replies: what the job's data caused is not retried.
#[test]
fn redis_replies_refusing_a_jobs_data_are_the_jobs_fault_and_a_lost_connection_is_not() {
    use actix::Actor;
    use katz_actors::error::{Action, JobError};
    use katz_actors::store::{FetchBytes, Finish, ResultStore};
    actix::System::new().block_on(async {
        let store = ResultStore::connect(REDIS).await.expect("Redis").start();
        let id = uid("refused");
        // an expire time Redis refuses (inside the atomic pipeline: EXECABORT)
        for ttl in [0, u64::MAX] {
            let e = store
                .send(Finish {
                    id: id.clone(),
                    status: katz_actors::protocol::Status::Done,
                    png: Some(vec![1]),
                    error: None,
                    fields: vec![],
                    ttl_s: ttl,
                })
                .await
                .unwrap()
                .unwrap_err();
            assert!(!e.is_transient_store(), "ttl {ttl}: {e}");
            assert_eq!(e.action(), Action::DeadLetter, "ttl {ttl}: {e}");
        }
        // a key of another type
        let mut c = redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key = format!("{}0", upload_prefix(&id));
        let _: () = c.hset(&key, "a", "b").await.unwrap();
        let e = store
            .send(FetchBytes { key: key.clone() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        assert_eq!((e.action(), e.kind()), (Action::DeadLetter, "redis_refused"));
        let _: () = c.del(&[key, job_key(&id), image_key(&id)]).await.unwrap();
        // nobody listening: transient
        let gone = ResultStore::connect("redis://127.0.0.1:1/").await;
        if let Err(e) = gone {
            let e = JobError::Store(e);
            assert!(e.is_transient_store(), "{e}");
            assert_eq!(e.action(), Action::Requeue);
        }
    });
}

/// A job that takes its worker down every time (here: SIGKILL mid-job) is failed after
/// `--max-attempts` starts instead of coming back for ever.
#[test]
fn a_job_that_keeps_killing_its_worker_fails_after_its_attempts() {
    let _g = serial();
    rt().block_on(async {
        let mut bus = Bus::new("rel-attempts").await;
        let j = long_job("poison");
        bus.publish(&j).await;
        for n in 1..=2 {
            let w = Worker::start(
                &bus.queue,
                &format!("w-rel-attempts-{n}"),
                &["--max-attempts", "2"],
            );
            bus.wait_until(&j.id, Duration::from_secs(60), |r| {
                r.get("attempts").map(String::as_str) == Some(&n.to_string())
                    && r.get("step").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) >= 1
            })
            .await;
            w.signal(libc::SIGKILL);
            drop(w);
        }
        let _w = Worker::start(&bus.queue, "w-rel-attempts-3", &["--max-attempts", "2"]);
        let r = bus.wait_final(&j.id, Duration::from_secs(60)).await;
        failed_with(&r, "started 3 times (the most is 2)");
        assert_eq!(r["error_kind"], "attempts");
        assert_eq!(dead(&bus, 1).await, 1);
        bus.cleanup().await;
    });
}
