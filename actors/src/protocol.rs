//! The wire protocol between producers, workers and result readers (docs/protocol.md).
//!
//! A job is a msgpack map (named fields) published to exchange [`JOBS_EXCHANGE`] with routing key
//! = the base model's name; its queue is `katz.jobs.<base>`. Results and progress live in Redis
//! under `katz:job:<id>`.

use std::time::{SystemTime, UNIX_EPOCH};

use katz_onnx::conditioning::{Canny, ResizeMode};
use serde::{Deserialize, Serialize};

pub mod wire;

/// The job schema version this worker reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Direct exchange that jobs are published to (routing key: base model name).
pub const JOBS_EXCHANGE: &str = "katz.jobs";
/// Dead-letter exchange and the queue that collects rejected jobs.
pub const DEAD_EXCHANGE: &str = "katz.dlx";
pub const DEAD_QUEUE: &str = "katz.jobs.dead";
/// Highest message priority the job queues honour (`x-max-priority`).
pub const MAX_PRIORITY: u8 = 10;
/// Result TTL when a job gives none: one day.
pub const DEFAULT_RESULT_TTL_S: u64 = 86_400;
/// The longest result TTL a job may ask for: 365 days (a job's `result_ttl_s` is 1 to this).
pub const MAX_RESULT_TTL_S: u64 = 365 * 86_400;

/// The queue of a base model.
pub fn jobs_queue(base: &str) -> String {
    format!("katz.jobs.{base}")
}
/// Hash with the job's status, progress, timings and error.
pub fn job_key(id: &str) -> String {
    format!("katz:job:{id}")
}
/// The PNG bytes of a finished job.
pub fn image_key(id: &str) -> String {
    format!("katz:job:{id}:image")
}
/// The PNG of the running job's latest step preview (`katz worker --preview-every`).
pub fn preview_key(id: &str) -> String {
    format!("katz:job:{id}:preview")
}
/// Set (to anything) to ask for cancellation.
pub fn cancel_key(id: &str) -> String {
    format!("katz:job:{id}:cancel")
}
/// The prefix of the Redis keys a job may read its conditioning images from (its own uploads):
/// `katz:upload:<id>:`. Job ids hold no `:`, so no job's prefix is another's.
pub fn upload_prefix(id: &str) -> String {
    format!("katz:upload:{id}:")
}
/// Pub/sub channel of the job's progress events (JSON [`Event`]).
pub fn events_channel(id: &str) -> String {
    format!("katz:events:{id}")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A conditioning image: inline PNG bytes, or the Redis key of a string holding them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRef {
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    RedisKey(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetJob {
    /// ControlNet model name (its bundle's `name`).
    pub model: String,
    /// PNG, JPEG or WebP bytes of any size.
    pub image: ImageRef,
    /// How an image of another size is brought to the job's: `resize` (default), `crop`, `pad`.
    /// Left out of the message when it is the default (old jobs keep their digest).
    #[serde(default, skip_serializing_if = "is_default")]
    pub resize: ResizeMode,
    /// The canny preprocessor: the image is a photo, its edges are the conditioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canny: Option<Canny>,
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub start: f32,
    #[serde(default = "one")]
    pub end: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraJob {
    /// LoRA name: `<name>.safetensors` in the worker's LoRA store.
    pub name: String,
    #[serde(default = "one")]
    pub scale: f32,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A job's seed: a number, or `-1` on the wire for one the worker draws at random (and records
/// as the job's `seed`, so resubmitting with it makes the same image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seed {
    Fixed(u64),
    Random,
}

impl Seed {
    /// The seed to run with: this one, or a fresh random one below 2^53 (so it survives any
    /// JSON reader as a number).
    pub fn resolve(self) -> u64 {
        match self {
            Seed::Fixed(s) => s,
            Seed::Random => rand::random::<u64>() >> 11,
        }
    }
}

impl From<u64> for Seed {
    fn from(s: u64) -> Self {
        Seed::Fixed(s)
    }
}

impl PartialEq<u64> for Seed {
    fn eq(&self, o: &u64) -> bool {
        *self == Seed::Fixed(*o)
    }
}

impl std::fmt::Display for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seed::Fixed(s) => write!(f, "{s}"),
            Seed::Random => f.write_str("-1"),
        }
    }
}

impl std::str::FromStr for Seed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "-1" => Ok(Seed::Random),
            t => t
                .parse::<u64>()
                .map(Seed::Fixed)
                .map_err(|_| format!("`{s}`: a seed is 0 to 2^64-1, or -1 for a random one")),
        }
    }
}

impl Serialize for Seed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Seed::Fixed(v) => s.serialize_u64(*v),
            Seed::Random => s.serialize_i64(-1),
        }
    }
}

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Seed;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a seed: an integer 0 to 2^64-1, or -1 for a random one")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed::Fixed(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Seed, E> {
                match v {
                    -1 => Ok(Seed::Random),
                    v if v >= 0 => Ok(Seed::Fixed(v as u64)),
                    v => Err(E::custom(format!(
                        "seed {v}: a seed is 0 to 2^64-1, or -1 for a random one"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn one() -> f32 {
    1.0
}
fn default_scheduler() -> String {
    "euler".into()
}
fn default_ttl() -> u64 {
    DEFAULT_RESULT_TTL_S
}

/// One text-to-image job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Schema version: [`SCHEMA_VERSION`].
    pub v: u32,
    /// Unique job id chosen by the producer (a UUID is a good choice); 1 to 128 bytes of
    /// `[A-Za-z0-9_.-]` (no `:`, so no id names another job's keys: [`valid_id`]).
    pub id: String,
    /// Base model name (the bundle's `name`), also the routing key.
    pub base: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// `-1`: the worker draws one and records it in the job's `seed` field.
    pub seed: Seed,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default)]
    pub karras: bool,
    #[serde(default)]
    pub controlnets: Vec<ControlNetJob>,
    #[serde(default)]
    pub loras: Vec<LoraJob>,
    /// Skip the parts of the LoRA files that the base bundle cannot take (text-encoder parts on a
    /// bundle whose text encoders take no weights, convolution parts on one whose convolutions
    /// take none) instead of failing the job; the record's `lora_skipped` names them. Left out of
    /// the message when false (old jobs keep their digest).
    #[serde(default, skip_serializing_if = "is_default")]
    pub unet_only: bool,
    /// 0 (lowest) to [`MAX_PRIORITY`]; also set it as the AMQP message priority.
    #[serde(default)]
    pub priority: u8,
    /// Unix milliseconds after which the job is not started.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Seconds the status and image stay in Redis after the job ends.
    #[serde(default = "default_ttl")]
    pub result_ttl_s: u64,
    /// Unix milliseconds when the producer submitted it (for queue-wait metrics).
    #[serde(default)]
    pub submitted_ms: Option<u64>,
}

impl Job {
    /// A job with the defaults a producer would fill in.
    pub fn new(id: impl Into<String>, base: impl Into<String>, prompt: impl Into<String>) -> Self {
        Job {
            v: SCHEMA_VERSION,
            id: id.into(),
            base: base.into(),
            prompt: prompt.into(),
            negative_prompt: None,
            width: 64,
            height: 64,
            steps: 4,
            guidance: 5.0,
            seed: Seed::Fixed(0),
            scheduler: default_scheduler(),
            karras: false,
            controlnets: vec![],
            loras: vec![],
            unet_only: false,
            priority: 0,
            deadline_ms: None,
            result_ttl_s: DEFAULT_RESULT_TTL_S,
            submitted_ms: Some(now_ms()),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        rmp_serde::to_vec_named(self)
    }

    /// FNV-1a over the job's content (everything but `submitted_ms` and `priority`): two
    /// deliveries of one job have the same digest; a reused id with other content does not.
    pub fn digest(&self) -> Result<String, rmp_serde::encode::Error> {
        let mut canon = self.clone();
        canon.submitted_ms = None;
        canon.priority = 0;
        let bytes = canon.encode()?;
        let mut h: u64 = 0xcbf29ce484222325;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        Ok(format!("{h:016x}"))
    }
}

/// Why a message could not become a job. `id` is set where the message's id could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<String>,
    pub message: String,
}

/// Limits a worker enforces on every job before any model work: the message size here, at
/// decode; the rest by the one request validation (`katz_onnx::request::ValidRequest`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_side: u32,
    pub max_steps: u32,
    pub max_controlnets: usize,
    pub max_loras: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 32 << 20,
            max_side: 2048,
            max_steps: 1000,
            max_controlnets: 8,
            max_loras: 8,
        }
    }
}

/// Whether `id` may name a job: 1 to 128 bytes of `[A-Za-z0-9_.-]`. A `:` is not allowed: the
/// job's keys are `katz:job:<id>`, `katz:job:<id>:image`, `katz:job:<id>:cancel`, so an id
/// `<other>:cancel` would name another job's cancel key.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Limits {
    /// The request limits for `katz_onnx::request::ValidRequest`.
    pub fn request(&self) -> katz_onnx::request::Limits {
        katz_onnx::request::Limits {
            max_side: self.max_side as usize,
            max_steps: self.max_steps as usize,
            max_controlnets: self.max_controlnets,
            max_loras: self.max_loras,
            ..Default::default()
        }
    }
}

/// Decodes a message (the strict wire shape, schema version, job id, priority, result TTL,
/// conditioning keys); every failure names the problem. The job's values are checked later,
/// once, as a request.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Job, DecodeError> {
    let shape = wire::check(bytes);
    let id = match &shape {
        Ok(s) => s.id.clone(),
        Err(e) => e.shape.id.clone(),
    }
    .filter(|i| valid_id(i));
    let fail = |message: String| DecodeError {
        id: id.clone(),
        message,
    };
    if bytes.len() > limits.max_message_bytes {
        return Err(fail(format!(
            "message is {} bytes, over the limit of {} (send large conditioning images by Redis key)",
            bytes.len(),
            limits.max_message_bytes
        )));
    }
    let shape = shape.map_err(|e| fail(e.message))?;
    match shape.v {
        None => return Err(fail("message has no schema version `v`".into())),
        Some(v) if v != SCHEMA_VERSION as u64 => {
            return Err(fail(format!(
                "schema version {v} is not supported (this worker reads {SCHEMA_VERSION})"
            )))
        }
        _ => {}
    }
    match &shape.id {
        None => return Err(fail("message has no job `id` string".into())),
        Some(i) if !valid_id(i) => {
            return Err(fail(format!(
                "job id {i:?} is not 1-128 characters of [A-Za-z0-9_.-]"
            )))
        }
        _ => {}
    }
    let job: Job = rmp_serde::from_slice(bytes).map_err(|e| fail(format!("job does not decode: {e}")))?;
    if job.priority > MAX_PRIORITY {
        return Err(fail(format!("priority {} is over {MAX_PRIORITY}", job.priority)));
    }
    if !(1..=MAX_RESULT_TTL_S).contains(&job.result_ttl_s) {
        return Err(fail(format!(
            "result_ttl_s {} is out of range: 1 to {MAX_RESULT_TTL_S} (365 days)",
            job.result_ttl_s
        )));
    }
    let uploads = upload_prefix(&job.id);
    for (i, c) in job.controlnets.iter().enumerate() {
        if let ImageRef::RedisKey(k) = &c.image {
            if !k.starts_with(&uploads) || k.len() == uploads.len() {
                return Err(fail(format!(
                    "ControlNet #{i}: conditioning image key `{k}` is not one of this job's uploads (`{uploads}<name>`)"
                )));
            }
        }
    }
    Ok(job)
}

/// Job status in `katz:job:<id>` field `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "done" => Status::Done,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// A progress event on `katz:events:<id>` (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub status: Status,
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub total: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The step whose preview `katz:job:<id>:preview` now holds (events that bring one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_step: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_digest() {
        let mut j = Job::new("j-1", "tiny-sdxl", "a cat");
        j.controlnets.push(ControlNetJob {
            model: "cn".into(),
            image: ImageRef::Inline(vec![1, 2, 3]),
            resize: ResizeMode::Pad,
            canny: Some(Canny {
                low: 100.0,
                high: 200.0,
            }),
            scale: 0.5,
            start: 0.0,
            end: 1.0,
        });
        let back = decode(&j.encode().unwrap(), &Limits::default()).unwrap();
        assert_eq!(back, j);
        let mut later = j.clone();
        later.submitted_ms = Some(1);
        assert_eq!(later.digest().unwrap(), j.digest().unwrap());
        let mut other = j.clone();
        other.prompt = "a dog".into();
        assert_ne!(other.digest().unwrap(), j.digest().unwrap());
    }

    #[test]
    fn old_jobs_read_the_same_and_keep_their_digest() {
        // a job as schema 1 had it before seeds of -1, resize modes and canny: no new keys
        #[derive(Serialize)]
        struct OldCn<'a> {
            model: &'a str,
            image: ImageRef,
        }
        #[derive(Serialize)]
        struct Old<'a> {
            v: u32,
            id: &'a str,
            base: &'a str,
            prompt: &'a str,
            width: u32,
            height: u32,
            steps: u32,
            guidance: f32,
            seed: u64,
            controlnets: Vec<OldCn<'a>>,
        }
        let old = Old {
            v: 1,
            id: "old",
            base: "b",
            prompt: "p",
            width: 64,
            height: 64,
            steps: 4,
            guidance: 5.0,
            seed: u64::MAX,
            controlnets: vec![OldCn {
                model: "cn",
                image: ImageRef::Inline(vec![9]),
            }],
        };
        let j = decode(&rmp_serde::to_vec_named(&old).unwrap(), &Limits::default()).unwrap();
        assert_eq!(j.seed, Seed::Fixed(u64::MAX));
        assert_eq!(
            (j.controlnets[0].resize, j.controlnets[0].canny),
            (ResizeMode::Resize, None)
        );
        // defaults are left out when encoding: the same keys as before
        let enc = String::from_utf8_lossy(&j.encode().unwrap()).into_owned();
        assert!(!enc.contains("resize") && !enc.contains("canny"), "{enc}");
    }

    #[test]
    fn seeds_are_numbers_or_minus_one() {
        let l = Limits::default();
        let mut j = Job::new("s", "b", "p");
        j.seed = Seed::Random;
        let back = decode(&j.encode().unwrap(), &l).unwrap();
        assert_eq!(back.seed, Seed::Random);
        let json: Job = serde_json::from_str(
            r#"{"v":1,"id":"s","base":"b","prompt":"p","width":64,"height":64,"steps":4,"guidance":5,"seed":-1,
               "controlnets":[{"model":"cn","image":{"redis_key":"k"},"resize":"crop","canny":{"low":100,"high":200}}]}"#,
        )
        .unwrap();
        assert_eq!(json.seed, Seed::Random);
        assert_eq!(json.controlnets[0].resize, ResizeMode::Crop);
        assert_eq!(
            json.controlnets[0].canny,
            Some(Canny {
                low: 100.0,
                high: 200.0
            })
        );
        #[derive(Serialize)]
        struct Neg {
            v: u32,
            id: &'static str,
            seed: i64,
        }
        let e = decode(
            &rmp_serde::to_vec_named(&Neg {
                v: 1,
                id: "n",
                seed: -2,
            })
            .unwrap(),
            &l,
        )
        .unwrap_err();
        assert!(e.message.contains("seed -2"), "{}", e.message);
        assert!(Seed::Random.resolve() < 1 << 53);
        assert_eq!(Seed::Fixed(7).resolve(), 7);
        assert_eq!("-1".parse::<Seed>().unwrap(), Seed::Random);
        assert_eq!("42".parse::<Seed>().unwrap(), Seed::Fixed(42));
        assert!("-5".parse::<Seed>().is_err());
    }

    #[test]
    fn bad_messages_name_the_problem() {
        let l = Limits::default();
        assert!(decode(b"\xc1garbage", &l)
            .unwrap_err()
            .message
            .contains("not a msgpack map"));
        let mut j = Job::new("j-2", "b", "p");
        j.v = 7;
        let e = decode(&j.encode().unwrap(), &l).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("j-2"));
        assert!(e.message.contains("schema version 7"), "{}", e.message);
        // values out of range decode, and are refused by the one request check
        let check = |j: &Job| {
            let j = decode(&j.encode().unwrap(), &l).expect("a well-formed message decodes");
            crate::pipeline::Catalogue::producer(&j, &l)
                .request(&j, &[])
                .unwrap_err()
                .to_string()
        };
        let mut j = Job::new("j-3", "b", "p");
        j.width = 100_000;
        j.height = 100_000;
        assert!(check(&j).contains("exceeds the limit"));
        let mut j = Job::new("j-4", "b", "p");
        j.steps = 1_000_000;
        assert!(check(&j).contains("steps 1000000"));
        // a map without `prompt`
        #[derive(Serialize)]
        struct Partial<'a> {
            v: u32,
            id: &'a str,
        }
        let e = decode(
            &rmp_serde::to_vec_named(&Partial { v: 1, id: "j-5" }).unwrap(),
            &l,
        )
        .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("j-5"));
        assert!(e.message.contains("missing field"), "{}", e.message);
    }

    #[test]
    fn no_job_id_names_another_jobs_keys() {
        let l = Limits::default();
        for id in ["v:cancel", "d:image", "a:b", "", &"x".repeat(129), "a b", "a{b}"] {
            let e = decode(&Job::new(id, "b", "p").encode().unwrap(), &l).unwrap_err();
            assert!(
                e.message.contains("is not 1-128 characters"),
                "{id}: {}",
                e.message
            );
            assert_eq!(e.id, None, "an invalid id gets no record");
        }
        for id in [
            "0b7c1f9e-2a0d-4c1e-9a55-6f0d3e8a1b2c",
            "job_1.2",
            &"y".repeat(128),
        ] {
            assert!(
                decode(&Job::new(id, "b", "p").encode().unwrap(), &l).is_ok(),
                "{id}"
            );
        }
        // with ids free of `:`, every key of one job differs from every key of any other
        let keys = |id: &str| [job_key(id), image_key(id), cancel_key(id), upload_prefix(id)];
        for (a, b) in [("v", "v.cancel"), ("d", "d-image"), ("a", "a_")] {
            for ka in keys(a) {
                for kb in keys(b) {
                    assert!(ka != kb && !kb.starts_with(&upload_prefix(a)), "{ka} {kb}");
                }
            }
        }
    }

    #[test]
    fn result_ttls_out_of_range_are_refused_naming_the_job() {
        let l = Limits::default();
        for ttl in [0, MAX_RESULT_TTL_S + 1, 1 << 63, u64::MAX] {
            let mut j = Job::new("ttl", "b", "p");
            j.result_ttl_s = ttl;
            let e = decode(&j.encode().unwrap(), &l).unwrap_err();
            assert_eq!(e.id.as_deref(), Some("ttl"));
            assert!(e.message.contains("result_ttl_s"), "{}", e.message);
        }
        for ttl in [1, DEFAULT_RESULT_TTL_S, MAX_RESULT_TTL_S] {
            let mut j = Job::new("ttl", "b", "p");
            j.result_ttl_s = ttl;
            assert!(decode(&j.encode().unwrap(), &l).is_ok());
        }
    }

    #[test]
    fn conditioning_keys_are_the_jobs_own_uploads() {
        let l = Limits::default();
        let with_key = |k: &str| {
            let mut j = Job::new("j9", "b", "p");
            j.controlnets.push(ControlNetJob {
                model: "cn".into(),
                image: ImageRef::RedisKey(k.into()),
                resize: ResizeMode::Resize,
                canny: None,
                scale: 1.0,
                start: 0.0,
                end: 1.0,
            });
            decode(&j.encode().unwrap(), &l)
        };
        assert!(with_key("katz:upload:j9:0").is_ok());
        for k in [
            "katz:job:other:image",
            "katz:job:j9:image",
            "katz:upload:j9:",
            "katz:upload:j90:0",
            "katz:upload:other:0",
            "secret",
        ] {
            let e = with_key(k).unwrap_err();
            assert!(
                e.message.contains("not one of this job's uploads"),
                "{k}: {}",
                e.message
            );
            assert_eq!(e.id.as_deref(), Some("j9"));
        }
    }
}
