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
