//! `katz gateway` end to end: real RabbitMQ and Redis, a real `katz worker` on the committed
//! shapes bundles, the gateway as its own process, an HTTP client, a local webhook receiver and
//! headless Chromium for the operator page.
//!
//! ```text
//! test ─HTTP─▶ katz gateway ─AMQP─▶ katz.test.gateway.<pid> ─▶ katz worker (shapes-sdxl + ControlNet, LoRA store)
//!   ◀─SSE/JSON/PNG─┘   ◀──────── Redis records, events, heartbeats ────────┘
//!   webhook receiver (down, then up) ◀─signed POST─ gateway
//! ```
//! One worker and one gateway serve every scenario, one after another (each prints its name).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{root, rt, Bus, Worker};
use futures_util::StreamExt;
use hmac::Mac;
use serde_json::{json, Value};

const ACME: &str = "acme-key-0123456789";
const ACME_OLD: &str = "acme-old-0123456789";
const BETA: &str = "beta-key-0123456789";
const TIGHT: &str = "tight-key-012345678";
const SLOW: &str = "slow-key-0123456789";
const SECRET: &str = "acme-webhook-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("gateway.toml");
    std::fs::write(
        &p,
        format!(
            r#"
max_body_bytes = 2097152
[webhooks]
base_delay_ms = 300
max_delay_ms = 1500
poll_ms = 100
timeout_ms = 2000
[tenants.acme]
keys = ["{ACME}"]
revoked = ["{ACME_OLD}"]
webhook_secret = "{SECRET}"
max_priority = 5
[tenants.beta]
keys = ["{BETA}"]
[tenants.tight]
keys = ["{TIGHT}"]
max_active = 1
[tenants.slow]
keys = ["{SLOW}"]
rate_per_s = 0.2
burst = 2
"#
        ),
    )
    .unwrap();
    p
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }
    async fn post(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/jobs"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }
    async fn submit(&self, key: &str, body: &Value) -> String {
        let r = self.post(key, body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 202, "{v}");
        v["id"].as_str().unwrap().to_string()
    }
    async fn job(&self, key: &str, id: &str) -> Value {
        self.get(key, &format!("/v1/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }
    async fn wait_final(&self, key: &str, id: &str, within: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.job(key, id).await;
            if ["done", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(t0.elapsed() < within, "job {id} did not end: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The error body's code, checking the body's shape.
async fn code(r: reqwest::Response) -> (u16, String, Option<String>) {
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = r.json().await.expect("a JSON error body");
    let c = v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code: {v}"));
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    (status, c.to_string(), retry)
}

fn edges_b64() -> String {
    let png =
        std::fs::read(root().join("bundles/shapes/examples/red-circle-above-blue-square-edges.png")).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn job_body(steps: u32) -> Value {
    json!({
        "base": "shapes-sdxl",
        "prompt": "a red circle above a blue square",
        "width": 128, "height": 128, "steps": steps, "guidance": 5.0, "seed": 1,
        "controlnets": [{"model": "shapes-sdxl-controlnet", "image": {"base64": edges_b64()}, "scale": 1.0}],
        "loras": [{"name": "pastel", "scale": 0.8}]
    })
}

fn plain_body(steps: u32) -> Value {
    json!({"base": "shapes-sdxl", "prompt": "a blue square", "width": 64, "height": 64, "steps": steps, "guidance": 5.0, "seed": 2})
}

/// The events of an SSE stream until `end` (or `within`): (event name, data).
async fn sse(api: &Api, key: &str, id: &str, within: Duration) -> Vec<(String, Value)> {
    let r = api.get(key, &format!("/v1/jobs/{id}/events")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut name, mut data) = (String::new(), String::new());
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().into();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            if name.is_empty() {
                continue; // a keep-alive comment
            }
            let done = name == "end";
            out.push((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            if done {
                return out;
            }
        }
    }
    out
}

/// A webhook receiver on `port`: every request's Katz-Signature header and body.
async fn receiver(
    port: u16,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap, body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let sig = h
                    .get("katz-signature")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let _ = tx.send((sig, body.to_vec()));
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    (
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() }),
        rx,
    )
}

fn verify(sig: &str, body: &[u8], secret: &str) -> bool {
    let mut parts = HashMap::new();
    for kv in sig.split(',') {
        if let Some((k, v)) = kv.split_once('=') {
            parts.insert(k, v);
        }
    }
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    want == *v1
}

#[test]
fn gateway_end_to_end() {
    rt().block_on(async {
        let mut bus = Bus::new("gateway").await;
        // the tenants' quota buckets, counters and idempotency keys of an earlier run start afresh
        for t in ["acme", "beta", "tight", "slow"] {
            for pat in [format!("katz:tenant:{t}:*"), format!("katz:idem:{t}:*")] {
                let keys: Vec<String> = redis::cmd("KEYS").arg(&pat).query_async(&mut bus.redis).await.unwrap();
                if !keys.is_empty() {
                    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut bus.redis).await.unwrap();
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("katz-gateway-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir);
        let wname = format!("gw-worker-{}", std::process::id());
        let mut worker = Worker::start(
            &bus.queue,
            &wname,
            &[
                "--bundle",
                "bundles/shapes/shapes-sdxl",
                "--controlnet",
                "bundles/shapes/shapes-sdxl-controlnet",
                "--lora-dir",
                "bundles/shapes/loras",
                "--preview-every",
                "3",
            ],
        );
        let port = free_port();
        let gw = Worker::spawn(
            &["gateway", "--config", cfg.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")],
            &format!("gw-{}", std::process::id()),
            &[],
        );
        let api = Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        // the gateway answers, and the worker's heartbeat shows what it serves
        let t0 = Instant::now();
        loop {
            let up = api.http.get(api.url("/healthz")).send().await.is_ok_and(|r| r.status() == 200);
            let models: Value = if up {
                api.get(ACME, "/v1/models").await.json().await.unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            // (a worker of an earlier run, killed, is listed until its heartbeat expires: wait
            // for this run's queue)
            let served = models["base_models"]
                .as_array()
                .and_then(|b| b.iter().find(|m| m["name"] == "shapes-sdxl"))
                .filter(|m| m["queues"].as_array().is_some_and(|q| q.contains(&json!(bus.queue))))
                .cloned();
            if let Some(m) = served {
                println!("models: {m}");
                assert!(m["controlnets"].as_array().unwrap().contains(&json!("shapes-sdxl-controlnet")), "{m}");
                assert!(m["loras"].as_array().unwrap().contains(&json!("pastel")), "{m}");
                assert!(m["queues"].as_array().unwrap().contains(&json!(bus.queue)), "{m}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "gateway or worker not up: {}\n{}",
                gw.log(),
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        println!("== a job with a ControlNet and a LoRA, end to end, its events over SSE");
        let id = api.submit(ACME, &job_body(12)).await;
        assert!(id.starts_with("acme."), "{id}");
        let events = sse(&api, ACME, &id, Duration::from_secs(120)).await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        println!("events: {names:?}");
        assert_eq!(names.first(), Some(&"status"));
        assert_eq!(names.last(), Some(&"end"), "{events:?}");
        let steps: Vec<u64> = events
            .iter()
            .filter(|(n, d)| n == "progress" && d["status"] == "running")
            .map(|(_, d)| d["step"].as_u64().unwrap())
            .collect();
        assert!(steps.len() >= 3 && steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert!(
            events.iter().any(|(n, d)| n == "progress" && d["total"] == 12 && d["eta_ms"].is_u64()),
            "progress with total and ETA: {events:?}"
        );
        let end = &events.last().unwrap().1;
        assert_eq!(end["status"], "done", "{end}");
        assert!(end["record"]["lora_mode"].is_string(), "the LoRA ran: {end}");
        assert!(end["record"]["controlnet_ms"].is_string(), "the ControlNet ran: {end}");
        let img = api.get(ACME, &format!("/v1/jobs/{id}/image")).await;
        assert_eq!(img.status(), 200);
        assert_eq!(img.headers()["content-type"], "image/png");
        let png = img.bytes().await.unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 128, "width");
        let previews: Vec<&Value> = events.iter().filter(|(n, _)| n == "preview").map(|(_, d)| d).collect();
        println!("previews over SSE: {}", previews.len());
        assert!(!previews.is_empty(), "preview events: {events:?}");
        for p in &previews {
            let b = base64::engine::general_purpose::STANDARD
                .decode(p["png_base64"].as_str().expect("the preview's PNG"))
                .unwrap();
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(p["url"], json!(format!("/v1/jobs/{id}/preview")));
        }
        let steps_seen: Vec<u64> = previews.iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert!(steps_seen.windows(2).all(|w| w[0] < w[1]), "{steps_seen:?}");
        let pv = api.get(ACME, &format!("/v1/jobs/{id}/preview")).await;
        assert_eq!(pv.status(), 200);
        assert_eq!(&pv.bytes().await.unwrap()[..8], b"\x89PNG\r\n\x1a\n");

        println!("== multipart: the image as a part");
        let job_part = {
            let mut b = job_body(4);
            b["controlnets"][0]["image"] = json!({"upload": "edges"});
            b.to_string()
        };
        let edges = std::fs::read(root().join("bundles/shapes/examples/red-circle-above-blue-square-edges.png")).unwrap();
        let boundary = "katz-test-boundary-7d1c";
        let mut form = Vec::new();
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"job\"\r\nContent-Type: application/json\r\n\r\n{job_part}\r\n").as_bytes(),
        );
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"edges\"; filename=\"edges.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        form.extend_from_slice(&edges);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let r = api
            .http
            .post(api.url("/v1/jobs"))
            .bearer_auth(ACME)
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let mid = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        assert_eq!(api.wait_final(ACME, &mid, Duration::from_secs(60)).await["status"], "done");

        println!("== two tenants cannot read each other's jobs or images");
        for path in [
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}/image"),
            format!("/v1/jobs/{id}/events"),
            format!("/v1/jobs/{id}/preview"),
        ] {
            let (s, c, _) = code(api.get(BETA, &path).await).await;
            assert_eq!((s, c.as_str()), (404, "not_found"), "{path}");
        }
        let r = api.http.delete(api.url(&format!("/v1/jobs/{id}"))).bearer_auth(BETA).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let bid = api.submit(BETA, &plain_body(2)).await;
        assert!(bid.starts_with("beta."));
        assert_eq!(api.wait_final(BETA, &bid, Duration::from_secs(60)).await["status"], "done");
        assert_eq!(api.get(ACME, &format!("/v1/jobs/{bid}/image")).await.status(), 404);
        assert_eq!(api.get(BETA, &format!("/v1/jobs/{bid}/image")).await.status(), 200);
        let (s, c, _) = code(api.get(ACME_OLD, &format!("/v1/jobs/{id}")).await).await;
        assert_eq!((s, c.as_str()), (401, "revoked_key"));
        let (s, c, _) = code(api.get("not-a-key-0000000000", "/v1/models").await).await;
        assert_eq!((s, c.as_str()), (401, "unknown_key"));
        let (s, c, _) = code(api.http.get(api.url("/v1/models")).send().await.unwrap()).await;
        assert_eq!((s, c.as_str()), (401, "missing_key"));

        println!("== cancel");
        let cid = api.submit(ACME, &plain_body(1000)).await;
        bus.wait_until(&cid, Duration::from_secs(60), |r| {
            r.get("status").is_some_and(|s| s == "running")
                && r.get("step").and_then(|s| s.parse::<u32>().ok()).is_some_and(|s| s >= 1)
        })
        .await;
        let r = api.http.delete(api.url(&format!("/v1/jobs/{cid}"))).bearer_auth(ACME).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status_before"], "running", "{v}");
        let end = api.wait_final(ACME, &cid, Duration::from_secs(30)).await;
        assert_eq!(end["status"], "cancelled", "{end}");
        assert!(end["step"].as_u64().unwrap() < 1000);
        let (s, c, _) = code(api.get(ACME, &format!("/v1/jobs/{cid}/image")).await).await;
        assert_eq!((s, c.as_str()), (409, "not_ready"));

        println!("== quotas: concurrency (tight: 1 job at once) and rate (slow: burst 2, 0.2/s)");
        let first = api.submit(TIGHT, &plain_body(1000)).await;
        let (s, c, retry) = code(api.post(TIGHT, &plain_body(2)).await).await;
        assert_eq!((s, c.as_str()), (429, "quota_exceeded"));
        assert!(retry.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
        api.http.delete(api.url(&format!("/v1/jobs/{first}"))).bearer_auth(TIGHT).send().await.unwrap();
        api.wait_final(TIGHT, &first, Duration::from_secs(30)).await;
        let second = api.submit(TIGHT, &plain_body(2)).await;
        api.wait_final(TIGHT, &second, Duration::from_secs(60)).await;
        let mut statuses = Vec::new();
        let mut retry_after = None;
        for _ in 0..3 {
            let r = api.post(SLOW, &plain_body(2)).await;
            statuses.push(r.status().as_u16());
            if r.status() == 429 {
                let (_, c, retry) = code(r).await;
                assert_eq!(c, "rate_limited");
                retry_after = retry;
            }
        }
        assert_eq!(statuses, vec![202, 202, 429]);
        assert!(retry_after.as_ref().is_some_and(|r| (1..=5).contains(&r.parse::<u64>().unwrap())), "{retry_after:?}");

        println!("== priority ceiling, idempotency, bad input");
        let mut high = plain_body(2);
        high["priority"] = json!(9);
        let (s, c, _) = code(api.post(ACME, &high).await).await;
        assert_eq!((s, c.as_str()), (422, "priority_above_ceiling"));
        let post_idem = |key: &'static str, body: Value| {
            let api = &api;
            async move {
                api.http
                    .post(api.url("/v1/jobs"))
                    .bearer_auth(ACME)
                    .header("Idempotency-Key", key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
            }
        };
        let idem = format!("idem-{}", std::process::id());
        let idem: &'static str = Box::leak(idem.into_boxed_str());
        let r1 = post_idem(idem, plain_body(2)).await;
        assert_eq!(r1.status(), 202);
        let id1 = r1.json::<Value>().await.unwrap()["id"].clone();
        let r2 = post_idem(idem, plain_body(2)).await;
        assert_eq!(r2.status(), 200);
        assert_eq!(r2.json::<Value>().await.unwrap()["id"], id1, "the same key and body: the same job");
        let (s, c, _) = code(post_idem(idem, plain_body(3)).await).await;
        assert_eq!((s, c.as_str()), (409, "idempotency_conflict"));
        let bad: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).header("content-type", "application/json").body("{not json"), 400, "bad_request"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).json(&{ let mut b = plain_body(2); b["steps"] = json!("many"); b }), 400, "bad_request"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).header("content-type", "text/plain").body("x"), 415, "unsupported_media_type"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).header("content-type", "application/json").body(vec![b' '; 3 << 20]), 413, "body_too_large"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).json(&{ let mut b = job_body(2); b["controlnets"][0]["image"] = json!({"base64": base64::engine::general_purpose::STANDARD.encode(b"not an image at all")}); b }), 422, "invalid_job"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).json(&{ let mut b = plain_body(2); b["base"] = json!("no-such-model"); b }), 422, "unknown_model"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).json(&{ let mut b = job_body(2); b["loras"][0]["name"] = json!("no-such-lora"); b }), 422, "unknown_model"),
            (api.http.post(api.url("/v1/jobs")).bearer_auth(ACME).json(&{ let mut b = plain_body(2); b["width"] = json!(100); b }), 422, "invalid_job"),
            (api.http.get(api.url("/v1/jobs/acme.nope")).bearer_auth(ACME), 404, "not_found"),
            (api.http.get(api.url("/v1/nothing")).bearer_auth(ACME), 404, "not_found"),
            (api.http.put(api.url("/v1/jobs")).bearer_auth(ACME), 405, "method_not_allowed"),
        ];
        for (i, (req, want, want_code)) in bad.into_iter().enumerate() {
            let (s, c, _) = code(req.send().await.unwrap()).await;
            assert_eq!((s, c.as_str()), (want, want_code), "bad input #{i}");
        }
        // an SSE client that goes away: the gateway keeps serving
        let lid = api.submit(ACME, &plain_body(30)).await;
        let r = api.get(ACME, &format!("/v1/jobs/{lid}/events")).await;
        let mut s = r.bytes_stream();
        let _ = s.next().await;
        drop(s);
        assert_eq!(api.wait_final(ACME, &lid, Duration::from_secs(60)).await["status"], "done");

        println!("== webhooks: the receiver is down, then up");
        let hook_port = free_port();
        let mut hooked = job_body(4);
        hooked["webhook_url"] = json!(format!("http://127.0.0.1:{hook_port}/hook"));
        let wid = api.submit(ACME, &hooked).await;
        api.wait_final(ACME, &wid, Duration::from_secs(60)).await;
        let t0 = Instant::now();
        loop {
            let v = api.job(ACME, &wid).await;
            if v["webhook_attempts"].as_u64().unwrap_or(0) >= 2 {
                assert_eq!(v["webhook_status"], "retrying", "{v}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no retries: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (server, mut got) = receiver(hook_port).await;
        let (sig, body) = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await
            .expect("the webhook arrives once the receiver is up")
            .unwrap();
        assert!(verify(&sig, &body, SECRET), "signature {sig} checks");
        assert!(!verify(&sig, &body, "another secret"));
        let delivered: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(delivered["id"], json!(wid));
        assert_eq!(delivered["status"], "done");
        let t0 = Instant::now();
        loop {
            let v = api.job(ACME, &wid).await;
            if v["webhook_status"] == "delivered" {
                println!("webhook delivered after {} attempts", v["webhook_attempts"]);
                assert!(v["webhook_attempts"].as_u64().unwrap() >= 3, "{v}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(got.try_recv().is_err(), "delivered once");
        server.abort();

        println!("== the operator page in headless Chromium");
        let chromium = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|c| std::process::Command::new(c).arg("--version").output().is_ok())
            .expect("chromium is installed (apt-get install -y chromium)");
        let out = std::process::Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", &api.url("/")])
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(dom.contains(&format!("data-queue=\"{}\"", bus.queue)), "queue row: {dom}");
        assert!(dom.contains(&format!("data-worker=\"{wname}\"")), "worker row");
        assert!(dom.contains("shapes-sdxl-controlnet") && dom.contains("pastel"), "what it serves");
        assert!(dom.contains(&format!("data-job=\"{wid}\"")), "a recent job");
        assert!(dom.contains("data:image/png;base64,"), "previews or images of recent jobs");
        assert!(dom.contains("<td class=\"status\">cancelled</td>") && dom.contains("<td class=\"status\">done</td>"));

        worker.signal(libc::SIGTERM);
        worker.wait_exit(Duration::from_secs(20));
        gw.signal(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&dir);
        bus.cleanup().await;
    });
}
