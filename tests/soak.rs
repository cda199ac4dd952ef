//! A bounded soak (`make soak`, ignored by `cargo test`): two `katz worker`s on one queue kept
//! saturated with good and bad jobs for KATZ_SOAK_MINUTES (5), one worker SIGKILLed and started
//! again every KATZ_SOAK_KILL_S (90) s, alternately. Reports each worker incarnation's RSS (after
//! its warm-up, at its end), and the jobs lost (no final status), duplicated (two `done` events),
//! good jobs not done, bad jobs not failed with their reason. Real RabbitMQ and Redis on localhost.
//!
//! ```text
//! producer ─(queue depth < 2 × workers)─▶ katz.test.soak.<pid> ─▶ worker a, worker b (kill ↻)
//! PSUBSCRIBE katz:events:<prefix>* ─▶ done events per job          records ─▶ report
//! ```

mod common;
use common::*;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use katz_actors::protocol::{job_key, ImageRef, LoraJob};

/// What a job must end as.
#[derive(Clone)]
enum Expect {
    Done,
    /// `failed`, the error saying this.
    Failed(&'static str),
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The i-th job of the soak: mostly good ones, every fifth a bad one of a rotating kind.
fn nth(prefix: &str, i: u64) -> (katz_actors::protocol::Job, Expect) {
    let mut j = job("soak");
    j.id = format!("{prefix}-{i}");
    j.steps = 2 + (i % 3) as u32;
    j.seed = (i % 7).into();
    j.result_ttl_s = 3600;
    if i % 5 != 4 {
        return (j, Expect::Done);
    }
    let expect = match (i / 5) % 5 {
        0 => {
            j.result_ttl_s = 0;
            "result_ttl_s"
        }
        1 => {
            j.width = 7;
            "width must be a positive multiple of 8"
        }
        2 => {
            j.loras.push(LoraJob {
                name: "no-such-lora".into(),
                scale: 1.0,
            });
            "unknown LoRA `no-such-lora`"
        }
        3 => {
            with_controlnets(&mut j, 1);
            j.controlnets[0].image = ImageRef::RedisKey(format!("katz:job:{prefix}-0:image"));
            "is not one of this job's uploads"
        }
        _ => {
            with_controlnets(&mut j, 1);
            j.controlnets[0].scale = 3e38;
            "non-finite value"
        }
    };
    (j, Expect::Failed(expect))
}

struct Incarnation {
    name: String,
    warm_rss_kib: u64,
    end_rss_kib: u64,
    killed: bool,
}

#[test]
#[ignore = "a soak of minutes: make soak"]
fn soak() {
    rt().block_on(async {
        let minutes = env("KATZ_SOAK_MINUTES", 5);
        let kill_every = Duration::from_secs(env("KATZ_SOAK_KILL_S", 90));
        let mut bus = Bus::new("soak").await;
        let prefix = uid("soak");
        let client = redis::Client::open(REDIS).unwrap();
        let mut sub = client.get_async_pubsub().await.unwrap();
        sub.psubscribe(format!("katz:events:{prefix}-*")).await.unwrap();
        let (tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut msgs = sub.into_on_message();
            while let Some(m) = msgs.next().await {
                let payload: String = m.get_payload().unwrap_or_default();
                if payload.contains("\"status\":\"done\"") {
                    let _ = tx.send(m.get_channel_name().to_string());
                }
            }
        });

        let names = ["soak-a", "soak-b"];
        let mut gen = [0usize; 2];
        let start = |k: usize, gen: usize| Worker::start(&bus.queue, &format!("w-{}-{gen}", names[k]), &[]);
        let mut workers = [Some(start(0, 0)), Some(start(1, 0))];
        let mut started = [Instant::now(); 2];
        let mut warm = [0u64; 2];
        let mut incarnations: Vec<Incarnation> = Vec::new();
        let mut expect: Vec<(String, Expect)> = Vec::new();
        let t0 = Instant::now();
        let mut last_kill = Instant::now();
        let mut victim = 0;
        let mut i = 0u64;
        while t0.elapsed() < Duration::from_secs(60 * minutes) {
            // saturation: a few jobs always waiting
            while bus.count(&bus.queue).await < 4 {
                for _ in 0..8 {
                    let (j, e) = nth(&prefix, i);
                    bus.publish(&j).await;
                    expect.push((j.id.clone(), e));
                    i += 1;
                }
            }
            for k in 0..2 {
                if warm[k] == 0 && started[k].elapsed() > Duration::from_secs(20) {
                    warm[k] = workers[k].as_ref().map(|w| w.rss_kib()).unwrap_or(0);
                }
            }
            if last_kill.elapsed() >= kill_every {
                let w = workers[victim].take().unwrap();
                incarnations.push(Incarnation {
                    name: format!("w-{}-{}", names[victim], gen[victim]),
                    warm_rss_kib: warm[victim],
                    end_rss_kib: w.rss_kib(),
                    killed: true,
                });
                w.signal(libc::SIGKILL);
                drop(w);
                gen[victim] += 1;
                workers[victim] = Some(start(victim, gen[victim]));
                started[victim] = Instant::now();
                warm[victim] = 0;
                last_kill = Instant::now();
                victim = 1 - victim;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // drain: every job published must end
        let drain = Instant::now();
        let mut records: HashMap<String, HashMap<String, String>> = HashMap::new();
        loop {
            let mut open = 0;
            for chunk in expect.chunks(500) {
                let mut pipe = redis::pipe();
                for (id, _) in chunk {
                    pipe.hgetall(job_key(id));
                }
                let recs: Vec<HashMap<String, String>> = pipe.query_async(&mut bus.redis).await.unwrap();
                for ((id, _), r) in chunk.iter().zip(recs) {
                    if !matches!(
                        r.get("status").map(String::as_str),
                        Some("done" | "failed" | "cancelled")
                    ) {
                        open += 1;
                    }
                    records.insert(id.clone(), r);
                }
            }
            if open == 0 || drain.elapsed() > Duration::from_secs(300) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for k in 0..2 {
            let w = workers[k].take().unwrap();
            incarnations.push(Incarnation {
                name: format!("w-{}-{}", names[k], gen[k]),
                warm_rss_kib: warm[k],
                end_rss_kib: w.rss_kib(),
                killed: false,
            });
        }
        let mut done_events: HashMap<String, u32> = HashMap::new();
        while let Ok(ch) = done_rx.try_recv() {
            *done_events.entry(ch).or_default() += 1;
        }

        let (mut lost, mut dup, mut good_not_done, mut bad_ok, mut bad_wrong) =
            (vec![], vec![], vec![], 0, vec![]);
        let (mut good, mut bad) = (0, 0);
        for (id, e) in &expect {
            let r = &records[id];
            let status = r.get("status").map(String::as_str).unwrap_or("");
            if !matches!(status, "done" | "failed" | "cancelled") {
                lost.push(id.clone());
                continue;
            }
            if done_events
                .get(&format!("katz:events:{id}"))
                .copied()
                .unwrap_or(0)
                > 1
            {
                dup.push(id.clone());
            }
            match e {
                Expect::Done => {
                    good += 1;
                    if status != "done" {
                        good_not_done.push(format!("{id}: {r:?}"));
                    }
                }
                Expect::Failed(needle) => {
                    bad += 1;
                    if status == "failed" && r.get("error").is_some_and(|m| m.contains(needle)) {
                        bad_ok += 1;
                    } else {
                        bad_wrong.push(format!("{id} (wanted `{needle}`): {r:?}"));
                    }
                }
            }
        }
        println!(
            "soak: {minutes} min, 2 workers, a kill every {kill_every:?}, {} jobs ({good} good, {bad} bad)",
            expect.len()
        );
        for inc in &incarnations {
            println!(
                "  {:<14} RSS after warm-up {:>7} KiB, at {} {:>7} KiB",
                inc.name,
                inc.warm_rss_kib,
                if inc.killed { "kill" } else { "end " },
                inc.end_rss_kib
            );
        }
        println!(
            "  lost {}, duplicated {}, good not done {}, bad failed with their reason {bad_ok}/{bad}",
            lost.len(),
            dup.len(),
            good_not_done.len()
        );
        for l in lost
            .iter()
            .chain(&dup)
            .chain(&good_not_done)
            .chain(&bad_wrong)
            .take(10)
        {
            println!("  ! {l}");
        }
        bus.cleanup().await;
        assert!(
            lost.is_empty() && dup.is_empty() && good_not_done.is_empty() && bad_wrong.is_empty(),
            "the soak lost, duplicated or misjudged jobs (above)"
        );
    });
}
