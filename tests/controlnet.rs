//! ControlNet sessions without a broker: in-process serial (the pipeline's own loop), inline
//! sessions and threaded sessions (overlapping the UNet encoder) give the same image for 1, 2 and 3
//! ControlNets — the arithmetic is the same, only where and when it runs changes.

mod common;
use common::*;

use katz_kernels::rel_err;
use katz_onnx::image::read_conditioning;
use katz_onnx::noise::SeededNoise;
use katz_onnx::pipeline::{LoraPlan, NoObserver, Pipeline};
use katz_onnx::request::{ControlRequest, Request};
use katz_onnx::scheduler::SchedulerKind;

fn request(p: &mut Pipeline, n: usize) -> Request {
    let model = p.controlnet(root().join("bundles/tiny-sdxl-controlnet")).unwrap();
    let images = ["cond_a.png", "cond_b.png", "cond_a.png"];
    let spans = [(0.0, 1.0), (0.0, 0.6), (0.3, 1.0)];
    let controlnets = (0..n)
        .map(|j| ControlRequest {
            prep: Default::default(),
            model: model.into(),
            image: read_conditioning(&root().join("bundles/examples").join(images[j]), (64, 64)).unwrap(),
            scale: [0.8, 0.5, -0.4][j],
            start: spans[j].0,
            end: spans[j].1,
        })
        .collect();
    Request {
        prompt: "a red circle above a blue square".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 6,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        karras: false,
        seed: 9,
        controlnets,
        loras: vec![],
    }
}

#[test]
fn inline_and_threaded_sessions_equal_the_serial_pipeline_for_1_2_3_controlnets() {
    let mut p = Pipeline::load(root().join("bundles/tiny-sdxl"), test_options()).unwrap();
    let plain = {
        let r = request(&mut p, 0);
        generate(&mut p, &r, &mut NoObserver).unwrap().image
    };
    for n in 1..=3 {
        let r = request(&mut p, n);
        let serial = generate(&mut p, &r, &mut NoObserver).unwrap().image;
        assert!(
            rel_err(&serial.data, &plain.data) > 1e-3,
            "{n} ControlNets changed nothing"
        );
        let mut inline = p.inline_controlnets();
        let a = generate_with(
            &mut p,
            &r,
            &mut SeededNoise::new(r.seed),
            &mut NoObserver,
            LoraPlan::Sync,
            Some(&mut inline),
        )
        .unwrap();
        let mut threaded = p.threaded_controlnets();
        let b = generate_with(
            &mut p,
            &r,
            &mut SeededNoise::new(r.seed),
            &mut NoObserver,
            LoraPlan::Sync,
            Some(&mut threaded),
        )
        .unwrap();
        assert_eq!(
            a.image.data, serial.data,
            "{n}: inline sessions differ from the serial loop"
        );
        assert_eq!(
            b.image.data, serial.data,
            "{n}: threaded sessions differ from the serial loop"
        );
    }
}

#[test]
fn a_controlnet_takes_its_weights_as_inputs_and_older_bundles_still_load() {
    use katz_onnx::bundle::{BaseBundle, ControlNetBundle};
    use katz_onnx::controlnet::ControlNet;
    use katz_onnx::runtime::SessionOptions;
    let base = BaseBundle::open(root().join("bundles/tiny-sdxl")).unwrap();
    let opts = SessionOptions::default();
    // the exported bundle lists its LoRA-targetable Linear weights, bound from one copy
    let cn = ControlNet::load(
        ControlNetBundle::open(root().join("bundles/tiny-sdxl-controlnet")).unwrap(),
        &base,
        &opts,
    )
    .unwrap();
    let w = cn
        .weights()
        .expect("the tiny ControlNet takes its weights as inputs");
    assert!(!w.map().is_empty() && w.map().values().all(|e| e.graph == "controlnet"));
    assert!(
        w.map().keys().any(|k| k.ends_with("attn1.to_q.weight")),
        "{:?}",
        w.map().keys().next()
    );
    // a bundle exported before (every weight inside its graph) loads as before
    let ckpt = BaseBundle::open(root().join("bundles/tiny-ckpt")).unwrap();
    let old = ControlNet::load(
        ControlNetBundle::open(root().join("bundles/tiny-ckpt-controlnet")).unwrap(),
        &ckpt,
        &opts,
    )
    .unwrap();
    assert!(old.weights().is_none());
    // a manifest naming a weights file that is not there is refused, naming it
    let dir = std::env::temp_dir().join(format!("katz-cn-noweights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["bundle.json", "controlnet.onnx"] {
        std::fs::copy(root().join("bundles/tiny-sdxl-controlnet").join(f), dir.join(f)).unwrap();
    }
    let err = ControlNetBundle::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("weights.safetensors") && err.contains("missing"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
