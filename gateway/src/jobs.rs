//! A job as HTTP carries it, and as a tenant reads it back.
//!
//! ```text
//! JSON body (or the `job` part of a multipart body, its images in other parts)
//!   ─into_job()─▶ conditioning images out ({"base64"} | {"upload": part}) → bytes, each replaced
//!                 by {"redis_key": "katz:upload:<id>:<i>"}; v, id, submitted_ms set here
//!   ─serde─▶ protocol::Job  (the protocol's own type: its fields, types and defaults)
//!   ─protocol::decode(encode)─▶ the worker's own decode checks (priority, TTL, upload keys)
//!   ─Catalogue::producer().request(job, images)─▶ the worker's one request check (sizes, steps,
//!                 scheduler, images decoded as PNG, JPEG or WebP)          ─bad─▶ 422 invalid_job
//! record katz:job:<id> ─JobView::from_record─▶ GET /v1/jobs/{id} (status, progress, ETA, links)
//! ```
//! `JobRequest` only documents the body for OpenAPI; a unit test keeps its fields those of
//! `protocol::Job` (plus `webhook_url`), so the schema is written once, in katz-actors.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use katz_actors::protocol::{self, Job, Limits, SCHEMA_VERSION};

use crate::error::ApiError;

/// The body of `POST /v1/jobs`: the fields of a protocol job (docs/protocol.md, "The job
/// message"), less those the gateway sets (`v`, `id`, `submitted_ms`), plus `webhook_url`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobRequest {
    /// Base model name, served by a live worker (`GET /v1/models`).
    #[schema(example = "shapes-sdxl", min_length = 1)]
    base: String,
    prompt: String,
    negative_prompt: Option<String>,
    /// A multiple of 8, at most 2048.
    #[schema(example = 128, minimum = 8, maximum = 2048)]
    width: u32,
    #[schema(example = 128, minimum = 8, maximum = 2048)]
    height: u32,
    #[schema(example = 20, minimum = 1, maximum = 1000)]
    steps: u32,
    /// Classifier-free guidance scale, 0-100 (≤ 1: no guidance).
    #[schema(example = 5.0, minimum = 0.0, maximum = 100.0)]
    guidance: f32,
    /// 0 to 2^64-1, or -1: the worker draws one and records it.
    #[schema(example = 1, minimum = -1)]
    seed: i64,
    /// `euler` (default), `euler-a`, `ddim`, `dpm++2m`.
    scheduler: Option<String>,
    karras: Option<bool>,
    controlnets: Option<Vec<ControlNetRequest>>,
    loras: Option<Vec<LoraRequest>>,
    unet_only: Option<bool>,
    /// 0-10, at most the tenant's ceiling (above it the job is refused, 422).
    #[schema(minimum = 0, maximum = 10)]
    priority: Option<u8>,
    /// Unix ms after which the job is not started.
    deadline_ms: Option<u64>,
    /// 1 to 31536000 (365 days): how long the record and image stay.
    #[schema(minimum = 1, maximum = 31536000)]
    result_ttl_s: Option<u64>,
    /// `http://` URL POSTed the job's record, signed, when it ends (docs/http.md, "Webhooks").
    webhook_url: Option<String>,
}

/// A ControlNet of a job.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ControlNetRequest {
    /// The ControlNet's name, served by a live worker.
    model: String,
    image: ImageRequest,
    #[schema(example = 1.0)]
    scale: Option<f32>,
    start: Option<f32>,
    end: Option<f32>,
    /// `resize` (default), `crop`, `pad`.
    resize: Option<String>,
    canny: Option<CannyRequest>,
}

/// A conditioning image: PNG, JPEG or WebP bytes in base64, or the name of a part of a
/// multipart body holding them.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ImageRequest {
    Base64(String),
    Upload(String),
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CannyRequest {
    low: f32,
    high: f32,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LoraRequest {
    name: String,
    scale: Option<f32>,
}

/// A job ready to be queued: the protocol job, its images, its webhook, its request digest.
pub struct Prepared {
    pub job: Job,
    pub images: Vec<Vec<u8>>,
    pub webhook_url: Option<String>,
    /// sha256 of the request's content (images by their digest): same body, same digest.
    pub request_digest: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The body's job (`body`: the JSON value; `parts`: a multipart body's other parts by name) as
/// the protocol job `id`, checked as a worker would. Every problem names itself.
pub fn into_job(
    mut body: Value,
    parts: &HashMap<String, Vec<u8>>,
    id: &str,
    default_ttl_s: u64,
) -> Result<Prepared, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let obj = body
        .as_object_mut()
        .ok_or_else(|| bad("the body is not a JSON object".into()))?;
    for k in ["v", "id", "submitted_ms"] {
        if obj.contains_key(k) {
            return Err(bad(format!("`{k}` is set by the gateway; leave it out")));
        }
    }
    let webhook_url = match obj.remove("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u),
        Some(_) => return Err(bad("`webhook_url` is not a string".into())),
    };
    obj.entry("result_ttl_s").or_insert(Value::from(default_ttl_s));
    // the request's digest: its JSON with each image by its sha256
    let mut canon = Value::Object(obj.clone());
    let mut images = Vec::new();
    if let Some(cns) = obj.get_mut("controlnets") {
        let cns = match cns {
            Value::Null => None,
            Value::Array(a) => Some(a),
            _ => return Err(bad("`controlnets` is not an array".into())),
        };
        for (i, c) in cns.into_iter().flatten().enumerate() {
            let c = c
                .as_object_mut()
                .ok_or_else(|| bad(format!("controlnets[{i}] is not an object")))?;
            let img = c.get("image").and_then(Value::as_object).ok_or_else(|| {
                bad(format!(
                    "controlnets[{i}].image: an object {{\"base64\"}} or {{\"upload\"}} is required"
                ))
            })?;
            let bytes = match (img.get("base64"), img.get("upload")) {
                (Some(Value::String(b)), None) => base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .map_err(|e| bad(format!("controlnets[{i}].image.base64 is not base64: {e}")))?,
                (None, Some(Value::String(name))) => parts.get(name).cloned().ok_or_else(|| {
                    bad(format!(
                        "controlnets[{i}].image.upload: no part `{name}` in the multipart body"
                    ))
                })?,
                _ => {
                    return Err(bad(format!(
                        "controlnets[{i}].image: exactly one of `base64` (a string) or `upload` (a part name)"
                    )))
                }
            };
            if bytes.is_empty() {
                return Err(ApiError::Invalid(format!("controlnets[{i}].image is empty")));
            }
            let key = format!("{}{i}", protocol::upload_prefix(id));
            c.insert("image".into(), serde_json::json!({ "redis_key": key }));
            if let Some(cc) = canon
                .get_mut("controlnets")
                .and_then(|a| a.get_mut(i))
                .and_then(Value::as_object_mut)
            {
                cc.insert("image".into(), Value::from(hex(&Sha256::digest(&bytes))));
            }
            images.push(bytes);
        }
    }
    obj.insert("v".into(), Value::from(SCHEMA_VERSION));
    obj.insert("id".into(), Value::from(id));
    obj.insert("submitted_ms".into(), Value::from(protocol::now_ms()));
    let job: Job = serde_path_to_error::deserialize(&body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad(format!("{inner}"))
        } else {
            bad(format!("{path}: {inner}"))
        }
    })?;
    // the worker's own decode: priority, TTL, upload keys
    let bytes = job
        .encode()
        .map_err(|e| bad(format!("the job does not encode: {e}")))?;
    let job = protocol::decode(&bytes, &Limits::default()).map_err(|e| ApiError::Invalid(e.message))?;
    Ok(Prepared {
        job,
        images,
        webhook_url,
        request_digest: hex(&Sha256::digest(canon.to_string().as_bytes())),
    })
}

/// The worker's one request check, as far as a producer can make it (sizes, steps, scheduler,
/// every image decoded): CPU work, run off the async threads.
pub async fn check(p: &Prepared) -> Result<(), ApiError> {
    let job = p.job.clone();
    let images = p.images.clone();
    tokio::task::spawn_blocking(move || {
        katz_actors::pipeline::Catalogue::producer(&job, &Limits::default())
            .request(&job, &images)
            .map(|_| ())
            .map_err(|e| ApiError::Invalid(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the request check stopped: {e}")))?
}

/// `GET /v1/jobs/{id}`: the job's record, with its progress and links.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// `queued`, `running`, `done`, `failed`, `cancelled`.
    pub status: String,
    pub step: u32,
    pub total: u32,
    /// A running job's expected milliseconds to its end (its steps so far, extrapolated).
    pub eta_ms: Option<u64>,
    pub error: Option<String>,
    pub error_kind: Option<String>,
    /// Where the PNG is once the job is `done`.
    pub image_url: Option<String>,
    /// Where the latest preview is, when the worker stores previews.
    pub preview_url: Option<String>,
    pub preview_step: Option<u32>,
    pub webhook_status: Option<String>,
    pub webhook_attempts: Option<u32>,
    /// Every field of the record (docs/protocol.md, "Fields of katz:job:<id>").
    pub record: BTreeMap<String, String>,
}

impl JobView {
    pub fn from_record(id: &str, rec: HashMap<String, String>) -> JobView {
        let num = |k: &str| rec.get(k).and_then(|v| v.parse::<u64>().ok());
        let s = |k: &str| rec.get(k).filter(|v| !v.is_empty()).cloned();
        let status = s("status").unwrap_or_else(|| "queued".into());
        let (step, total) = (num("step").unwrap_or(0), num("total").unwrap_or(0));
        let eta_ms = match (status.as_str(), num("started_ms")) {
            ("running", Some(t0)) if step > 0 && total >= step => {
                let spent = protocol::now_ms().saturating_sub(t0);
                Some(spent / step * (total - step))
            }
            _ => None,
        };
        let preview_step = num("preview_step").map(|v| v as u32);
        JobView {
            id: id.into(),
            image_url: (status == "done").then(|| format!("/v1/jobs/{id}/image")),
            preview_url: preview_step.map(|_| format!("/v1/jobs/{id}/preview")),
            preview_step,
            status,
            step: step as u32,
            total: total as u32,
            eta_ms,
            error: s("error"),
            error_kind: s("error_kind"),
            webhook_status: s("webhook_status"),
            webhook_attempts: num("webhook_attempts").map(|v| v as u32),
            record: rec.into_iter().collect(),
        }
    }
}

/// What `POST /v1/jobs` answers (202; 200 for a replay of an `Idempotency-Key`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    pub id: String,
    pub status: String,
    /// `GET` it for the job's state.
    pub url: String,
    /// Server-Sent Events of its progress.
    pub events_url: String,
    pub queue: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Value {
        serde_json::json!({
            "base": "b", "prompt": "p", "width": 64, "height": 64, "steps": 4, "guidance": 5.0, "seed": 1,
            "controlnets": [{"model": "cn", "image": {"base64": "iVBORw0KGgo="}, "scale": 0.5}],
            "loras": [{"name": "pastel", "scale": 0.8}],
            "webhook_url": "http://127.0.0.1:1/hook"
        })
    }

    #[test]
    fn a_body_becomes_a_protocol_job_with_its_uploads() {
        let p = into_job(body(), &HashMap::new(), "t.1", 60).unwrap();
        assert_eq!(p.job.id, "t.1");
        assert_eq!(p.job.result_ttl_s, 60);
        assert_eq!(
            p.job.controlnets[0].image,
            protocol::ImageRef::RedisKey("katz:upload:t.1:0".into())
        );
        assert_eq!(p.images[0], b"\x89PNG\r\n\x1a\n");
        assert_eq!(p.webhook_url.as_deref(), Some("http://127.0.0.1:1/hook"));
        // the same body under another id has the same digest; another body another
        let q = into_job(body(), &HashMap::new(), "t.2", 60).unwrap();
        assert_eq!(p.request_digest, q.request_digest);
        let mut other = body();
        other["prompt"] = "q".into();
        assert_ne!(
            into_job(other, &HashMap::new(), "t.3", 60)
                .unwrap()
                .request_digest,
            p.request_digest
        );
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        let e = |v: Value| into_job(v, &HashMap::new(), "t.1", 60).err().unwrap().to_string();
        let mut b = body();
        b["steps"] = "many".into();
        assert!(e(b).contains("steps"), "names the field");
        let mut b = body();
        b.as_object_mut().unwrap().remove("prompt");
        assert!(e(b).contains("prompt"));
        let mut b = body();
        b["controlnets"][0]["image"] = serde_json::json!({"base64": "***"});
        assert!(e(b).contains("not base64"));
        let mut b = body();
        b["priority"] = 11.into();
        assert!(e(b).contains("priority 11"));
        assert!(e(serde_json::json!([1])).contains("not a JSON object"));
        let mut b = body();
        b["id"] = "x".into();
        assert!(e(b).contains("set by the gateway"));
    }

    #[test]
    fn the_documented_body_is_the_protocol_job() {
        // every field JobRequest documents is a protocol job's field (or the gateway's own)
        let schema = serde_json::to_value(<JobRequest as utoipa::PartialSchema>::schema()).unwrap();
        let job = serde_json::to_value(Job::new("x", "b", "p")).unwrap();
        let mut documented: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
        documented.retain(|k| k.as_str() != "webhook_url");
        for k in &documented {
            assert!(
                job.get(k.as_str()).is_some() || *k == "unet_only",
                "`{k}` is no protocol field"
            );
        }
        for k in job.as_object().unwrap().keys() {
            assert!(
                ["v", "id", "submitted_ms"].contains(&k.as_str()) || documented.iter().any(|d| *d == k),
                "protocol field `{k}` is not documented"
            );
        }
    }
}
