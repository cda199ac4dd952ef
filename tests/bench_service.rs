//! `katz bench service` against the real RabbitMQ and Redis on localhost (`tools/services.sh`
//! starts them), with a `katz worker` on the tiny bundle consuming the test's own queue: a small
//! service B mix at saturation, then at a rate against the first run as the baseline.

mod common;
use common::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench(args: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(katz_bin())
        .args(["bench", "service"])
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "katz bench service failed:\n{text}");
    let path = args[args.iter().position(|a| *a == "--out").unwrap() + 1];
    (
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap(),
        text,
    )
}

#[test]
fn a_trace_mix_through_a_katz_worker_gives_throughput_and_percentiles() {
    let tag = format!("svcbench.{}", std::process::id());
    let rt = rt();
    let bus = rt.block_on(Bus::new("svcbench"));
    let queue = bus.queue.clone();
    let dir = std::env::temp_dir().join(format!("katz-{tag}"));
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let log = std::fs::File::create(dir.join("worker.log")).unwrap();
    let _w = Worker(
        Command::new(katz_bin())
            .args([
                "worker",
                "--queue",
                &queue,
                "--name",
                &format!("w-{tag}"),
                "--threads",
                "1",
            ])
            .args(["--lora-dir", store.to_str().unwrap()])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("KATZ_LOG", "warn")
            .current_dir(root())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("worker starts"),
    );
    // ready: /readyz answers 200
    let t0 = Instant::now();
    loop {
        use std::io::{Read, Write};
        let ok = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
                let mut r = String::new();
                s.read_to_string(&mut r).ok()?;
                Some(r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            })
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the worker did not get ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sat = dir.join("sat.json");
    let common = [
        "--queue",
        &queue,
        "--store",
        store.to_str().unwrap(),
        "--steps",
        "4",
        "--timeout-s",
        "300",
    ];
    let mut args: Vec<&str> = common.to_vec();
    let prefix_sat = format!("{tag}-sat");
    args.extend([
        "--requests",
        "4",
        "--id-prefix",
        &prefix_sat,
        "--out",
        sat.to_str().unwrap(),
    ]);
    let (r, text) = bench(&args);
    assert_eq!(r["mode"], "saturation", "{text}");
    assert_eq!(
        (r["jobs"].as_u64(), r["done"].as_u64()),
        (Some(4), Some(4)),
        "{text}"
    );
    assert_eq!(
        (r["failed"].as_u64(), r["unfinished"].as_u64()),
        (Some(0), Some(0)),
        "{text}"
    );
    let tp = r["throughput_per_s"].as_f64().unwrap();
    let span = r["span_s"].as_f64().unwrap();
    assert!(
        tp > 0.0 && (tp * span - 4.0).abs() < 1e-6,
        "throughput {tp} over {span} s\n{text}"
    );
    let lat = &r["latency_ms"];
    let (p50, p90, p99) = (
        lat["p50"].as_f64().unwrap(),
        lat["p90"].as_f64().unwrap(),
        lat["p99"].as_f64().unwrap(),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= span * 1e3 + 1.0,
        "{lat}\n{text}"
    );
    assert_eq!(lat["n"].as_u64(), Some(4));
    assert_eq!(r["workers"], serde_json::json!([format!("w-{tag}")]));
    // the classes add up to the jobs
    let classes = r["classes"].as_object().unwrap();
    assert!(!classes.is_empty());
    let n: u64 = classes.values().map(|c| c["jobs"].as_u64().unwrap()).sum();
    assert_eq!(n, 4, "{text}");
    assert!(
        classes.keys().all(|k| k.contains("C/") && k.ends_with('L')),
        "{classes:?}"
    );

    // at a rate, capped to one ControlNet and one LoRA, against the first run
    let rated = dir.join("rate.json");
    let mut args: Vec<&str> = common.to_vec();
    let prefix_rate = format!("{tag}-rate");
    args.extend([
        "--requests",
        "3",
        "--seed",
        "8",
        "--rate",
        "4",
        "--warmup",
        "1",
        "--max-controlnets",
        "1",
        "--max-loras",
        "1",
        "--id-prefix",
        &prefix_rate,
        "--baseline",
        sat.to_str().unwrap(),
        "--out",
        rated.to_str().unwrap(),
    ]);
    let (r, text) = bench(&args);
    assert_eq!(
        (r["mode"].as_str(), r["done"].as_u64()),
        (Some("rate"), Some(3)),
        "{text}"
    );
    assert!(r["classes"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k == "0C/0L" || k == "0C/1L" || k == "1C/0L" || k == "1C/1L"));
    let v = &r["vs_baseline"];
    assert!(v["throughput"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["latency_p50_speedup"].as_f64().unwrap() > 0.0, "{v}");
    assert!(text.contains("throughput") && text.contains("faster"), "{text}");
    assert!(text.contains("1 warm-up job(s)"), "{text}");
    // an id prefix is not reused
    let again = Command::new(katz_bin())
        .args(["bench", "service"])
        .args(common)
        .args(["--requests", "1", "--id-prefix", &prefix_sat])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already in use"));
    let _ = std::fs::remove_dir_all(&dir);
    rt.block_on(bus.cleanup());
}
