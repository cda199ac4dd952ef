//! The embedded mode: the worker's job path (decode → idempotency → pipeline actor → store →
//! settle) with an in-process source and the in-memory store — no broker, no Redis.

mod common;
use common::*;

use katz_actors::embedded::run_jobs;
use katz_actors::pipeline::Models;
use katz_actors::protocol::{Job, LoraJob};
use katz_actors::Action;

fn models() -> Models {
    Models::local(
        root().join("bundles/tiny-sdxl"),
        vec![root().join("bundles/tiny-sdxl-controlnet")],
        katz_actors::lora::LoraConfig::new(root().join("bundles/loras")),
        test_options(),
    )
}

#[test]
fn jobs_run_fail_and_deduplicate_like_in_a_worker() {
    let mut ok = Job::new("emb-ok", "tiny-sdxl", "a red circle");
    ok.steps = 3;
    ok.loras.push(LoraJob {
        name: "tiny-lora-a".into(),
        scale: 0.5,
    });
    let mut bad = Job::new("emb-bad", "tiny-sdxl", "x");
    bad.loras.push(LoraJob {
        name: "no-such".into(),
        scale: 1.0,
    });
    let mut events = Vec::new();
    let r = run_jobs(&models(), vec![ok.clone(), bad, ok], |e| events.push(e.clone())).unwrap();

    assert_eq!(r[0].record["status"], "done");
    assert_eq!(r[0].action, Some(Action::Ack));
    assert!(r[0].png.as_ref().is_some_and(|p| p.starts_with(b"\x89PNG")));
    for k in ["pipeline_ms", "service_ms", "step_ms", "text_encode_ms"] {
        assert!(r[0].record.contains_key(k), "no {k}");
    }
    assert_eq!(r[1].record["status"], "failed");
    assert!(r[1].record["error"].contains("unknown LoRA `no-such`"));
    assert_eq!(r[1].action, Some(Action::DeadLetter));
    // the same job again: acked without running
    assert_eq!(r[2].action, Some(Action::Ack));
    assert_eq!(r[2].record["attempts"], "1");
    // progress: running, one event per step, done
    let steps: Vec<u32> = events
        .iter()
        .filter(|e| e.id == "emb-ok")
        .map(|e| e.step)
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 3], "{events:?}");
}

/// `unet_only` through the worker's job path: a LoRA file with text-encoder and convolution parts
/// on the trained family's bundle (which takes neither) fails the job naming them (dead letter);
/// the same job with `unet_only` runs, and its record names what was skipped.
#[test]
fn unet_only_jobs_skip_and_record_the_parts_the_bundle_cannot_take() {
    let models = Models::local(
        root().join("bundles/shapes/shapes-sdxl"),
        vec![],
        katz_actors::lora::LoraConfig::new(root().join("tests/data/lora")),
        test_options(),
    );
    let mut strict = Job::new("emb-strict", "shapes-sdxl", "a red circle");
    strict.steps = 2;
    strict.loras.push(LoraJob {
        name: "shapes-te-conv".into(),
        scale: 0.8,
    });
    let mut skip = strict.clone();
    skip.id = "emb-unet-only".into();
    skip.unet_only = true;
    let r = run_jobs(&models, vec![strict, skip], |_| {}).unwrap();

    assert_eq!(r[0].record["status"], "failed");
    let e = &r[0].record["error"];
    assert!(
        e.contains("shapes-te-conv")
            && e.contains("adapt a text encoder")
            && e.contains("convolution LoRA factors"),
        "{e}"
    );
    assert_eq!(r[0].action, Some(Action::DeadLetter));
    assert!(!r[0].record.contains_key("lora_skipped"));

    assert_eq!(r[1].record["status"], "done", "{:?}", r[1].record);
    let skipped: serde_json::Value = serde_json::from_str(&r[1].record["lora_skipped"]).unwrap();
    let what = skipped["shapes-te-conv"].as_str().unwrap();
    assert!(
        what.contains("text-encoder keys") && what.contains("convolution keys"),
        "{what}"
    );
}
