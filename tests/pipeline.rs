//! Pipeline behaviour beyond parity: adapters change the image, pristine weights stay pristine,
//! cancellation stops at a step boundary, validation refuses bad requests.

mod common;
use common::*;

use katz_kernels::rel_err;
use katz_onnx::image::read_conditioning;
use katz_onnx::pipeline::{NoObserver, Observer, Pipeline};
use katz_onnx::request::{ControlRequest, LoraRequest, Request};
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;
use katz_onnx::Error;

fn pipeline() -> Pipeline {
    Pipeline::load(root().join("bundles/tiny-sdxl"), test_options()).unwrap()
}

fn request() -> Request {
    Request {
        prompt: "a red circle".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 3,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        karras: false,
        seed: 3,
        controlnets: vec![],
        loras: vec![],
    }
}

#[test]
fn adapters_change_the_image_and_pristine_weights_survive() {
    let mut p = pipeline();
    let plain = generate(&mut p, &request(), &mut NoObserver).unwrap().image;

    let mut with_lora = request();
    with_lora.loras = vec![LoraRequest::loaded(
        p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
            .unwrap(),
        1.0,
    )];
    let lora_img = generate(&mut p, &with_lora, &mut NoObserver).unwrap().image;
    let d = rel_err(&lora_img.data, &plain.data);
    assert!(d > 1e-3, "the LoRA changed nothing ({d:.1e})");

    let mut with_cn = request();
    let model = p.controlnet(root().join("bundles/tiny-sdxl-controlnet")).unwrap();
    let image = read_conditioning(&root().join("bundles/examples/cond_a.png"), (64, 64)).unwrap();
    with_cn.controlnets = vec![ControlRequest {
        model: model.into(),
        image,
        scale: 1.0,
        start: 0.0,
        end: 1.0,
    }];
    let cn_img = generate(&mut p, &with_cn, &mut NoObserver).unwrap().image;
    let d = rel_err(&cn_img.data, &plain.data);
    assert!(d > 1e-3, "the ControlNet changed nothing ({d:.1e})");

    // after jobs with adapters, a plain job gives exactly the first image
    let again = generate(&mut p, &request(), &mut NoObserver).unwrap().image;
    assert_eq!(again, plain);
}

#[test]
fn lora_scale_zero_is_the_base_model() {
    let mut p = pipeline();
    let plain = generate(&mut p, &request(), &mut NoObserver).unwrap().image;
    let mut r = request();
    r.loras = vec![LoraRequest::loaded(
        p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
            .unwrap(),
        0.0,
    )];
    let zero = generate(&mut p, &r, &mut NoObserver).unwrap().image;
    assert!(rel_err(&zero.data, &plain.data) < 1e-6);
}

struct CancelAt(usize);
impl Observer for CancelAt {
    fn on_step(&mut self, step: usize, _: usize, _: &Tensor) -> katz_onnx::Result<()> {
        if step == self.0 {
            return Err(Error::Cancelled { step });
        }
        Ok(())
    }
}

#[test]
fn an_observer_can_cancel_between_steps() {
    let mut p = pipeline();
    let e = generate(&mut p, &request(), &mut CancelAt(1)).unwrap_err();
    assert!(matches!(e, Error::Cancelled { step: 1 }), "{e}");
}

#[test]
fn validation_names_the_problem() {
    let p = pipeline();
    type Edit = Box<dyn Fn(&mut Request)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.steps = 0), "steps must be at least 1"),
        (Box::new(|r| r.steps = 5000), "at most"),
        (
            Box::new(|r| r.width = 100),
            "width must be a positive multiple of 8",
        ),
        (
            Box::new(|r| r.height = 0),
            "height must be a positive multiple of 8",
        ),
        (Box::new(|r| r.guidance = f32::NAN), "guidance"),
        (Box::new(|r| r.width = 8192), "at most 4096"),
    ];
    for (edit, needle) in cases {
        let mut r = request();
        edit(&mut r);
        let e = p.validate(r).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
        assert!(e.to_string().contains(needle), "`{e}` does not say `{needle}`");
        assert_eq!(e.disposition(), katz_onnx::Disposition::DeadLetter);
    }
}

#[test]
fn guidance_off_runs_one_half() {
    let mut p = pipeline();
    let mut r = request();
    r.guidance = 1.0;
    let out = generate(&mut p, &r, &mut NoObserver).unwrap();
    assert_eq!(out.image.shape, vec![1, 3, 64, 64]);
}

#[test]
fn static_shapes_give_the_dynamic_image_and_refuse_other_sizes() {
    // the same job through graphs whose free dimensions were fixed at load time
    let job = |p: &mut Pipeline| {
        let mut r = request();
        r.loras = vec![LoraRequest::loaded(
            p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
                .unwrap(),
            0.8,
        )];
        let model = p.controlnet(root().join("bundles/tiny-sdxl-controlnet")).unwrap();
        let image = read_conditioning(&root().join("bundles/examples/cond_a.png"), (64, 64)).unwrap();
        r.controlnets = vec![ControlRequest {
            model: model.into(),
            image,
            scale: 0.7,
            start: 0.0,
            end: 1.0,
        }];
        r
    };
    let mut dynamic = pipeline();
    let req = job(&mut dynamic);
    let want = generate(&mut dynamic, &req, &mut NoObserver).unwrap().image;

    let mut opts = test_options();
    opts.fixed = Some(katz_onnx::runtime::FixedShape::parse("64x64", 2).unwrap());
    let mut fixed = Pipeline::load(root().join("bundles/tiny-sdxl"), opts).unwrap();
    let req = job(&mut fixed);
    let got = generate(&mut fixed, &req, &mut NoObserver).unwrap().image;
    let e = rel_err(&got.data, &want.data);
    assert!(
        e <= 1e-5,
        "static shapes changed the image: relative error {e:.1e}"
    );

    let mut other = req.clone();
    other.width = 128;
    other.height = 128;
    other.controlnets.clear();
    let err = generate(&mut fixed, &other, &mut NoObserver).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("fixed to 64x64"), "{err}");
    let mut unguided = request();
    unguided.guidance = 1.0;
    let err = generate(&mut fixed, &unguided, &mut NoObserver).unwrap_err();
    assert!(err.to_string().contains("batch of 1"), "{err}");
}

#[test]
fn cuda_graphs_are_refused_without_fixed_shapes_or_a_cuda_device() {
    let load = |o| Pipeline::load(root().join("bundles/tiny-sdxl"), o).err();
    let mut o = test_options();
    o.cuda_graph = true;
    let err = load(o.clone()).expect("CUDA graphs without fixed shapes must be refused");
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("--static-shapes"), "{err}");
    if !o.device.is_gpu() {
        o.fixed = Some(katz_onnx::runtime::FixedShape::parse("64x64", 2).unwrap());
        let err = load(o).expect("CUDA graphs on the CPU must be refused");
        assert!(err.to_string().contains("CUDA provider"), "{err}");
    }
}

/// The step's ControlNet critical path is timed on the host loop too: every ControlNet has a run
/// time, the slowest run is no longer than the ControlNets' summed runs, and serial ControlNets
/// (computed after the encoder) are all after it.
#[test]
fn controlnet_runs_are_timed() {
    let mut p = pipeline();
    let model = p.controlnet(root().join("bundles/tiny-sdxl-controlnet")).unwrap();
    let image = read_conditioning(&root().join("bundles/examples/cond_a.png"), (64, 64)).unwrap();
    let mut r = request();
    r.controlnets = (0..2)
        .map(|_| ControlRequest {
            model: model.into(),
            image: image.clone(),
            scale: 0.5,
            start: 0.0,
            end: 1.0,
        })
        .collect();
    let t = generate(&mut p, &r, &mut NoObserver).unwrap().timings;
    assert_eq!(t.cn_runs.len(), 2);
    assert!(t.cn_runs.iter().all(|d| !d.is_zero()), "{:?}", t.cn_runs);
    let sum: std::time::Duration = t.cn_runs.iter().sum();
    assert!(!t.cn_slowest_run.is_zero() && t.cn_slowest_run <= sum);
    assert!(t.cn_after_encoder >= t.cn_slowest_run, "{t:?}");
}
