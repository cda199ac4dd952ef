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
        prep: Default::default(),
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
fn shape_buckets_give_the_dynamic_image_and_other_sizes_go_as_configured() {
    use katz_onnx::runtime::{FixedShape, OtherSizes};
    // the same job through graphs whose free dimensions were fixed at load time, per bucket
    let job = |p: &mut Pipeline, (w, h): (usize, usize)| {
        let mut r = request();
        (r.width, r.height) = (w, h);
        r.loras = vec![LoraRequest::loaded(
            p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
                .unwrap(),
            0.8,
        )];
        let model = p.controlnet(root().join("bundles/tiny-sdxl-controlnet")).unwrap();
        let image = checkerboard(w, h);
        r.controlnets = vec![ControlRequest {
            prep: Default::default(),
            model: model.into(),
            image,
            scale: 0.7,
            start: 0.0,
            end: 1.0,
        }];
        r
    };
    let sizes = [(64, 64), (96, 64)];
    let mut dynamic = pipeline();
    let want: Vec<Tensor> = sizes
        .iter()
        .map(|&s| {
            let req = job(&mut dynamic, s);
            generate(&mut dynamic, &req, &mut NoObserver).unwrap().image
        })
        .collect();

    let mut opts = test_options();
    opts.buckets = vec![
        FixedShape::parse("64x64", 2).unwrap(),
        FixedShape::parse("96x64", 2).unwrap(),
    ];
    opts.other_sizes = OtherSizes::Refuse;
    let mut buckets = Pipeline::load(root().join("bundles/tiny-sdxl"), opts.clone()).unwrap();
    buckets.warm_up().unwrap();
    for (s, want) in sizes.iter().zip(&want) {
        let req = job(&mut buckets, *s);
        let got = generate(&mut buckets, &req, &mut NoObserver).unwrap().image;
        let e = rel_err(&got.data, &want.data);
        assert!(
            e <= 1e-5,
            "bucket {s:?} changed the image: relative error {e:.1e}"
        );
    }

    // other sizes refused (the check names the buckets), or run on free-shape sessions
    let mut other = job(&mut buckets, (64, 64));
    (other.width, other.height) = (128, 128);
    other.controlnets.clear();
    let err = generate(&mut buckets, &other, &mut NoObserver).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("64x64, 96x64"), "{err}");
    let mut unguided = request();
    unguided.guidance = 1.0;
    let err = generate(&mut buckets, &unguided, &mut NoObserver).unwrap_err();
    assert!(err.to_string().contains("batch of 1"), "{err}");

    opts.other_sizes = OtherSizes::Dynamic;
    let mut mixed = Pipeline::load(root().join("bundles/tiny-sdxl"), opts).unwrap();
    let want_other = generate(&mut dynamic, &other, &mut NoObserver).unwrap().image;
    let got = generate(&mut mixed, &other, &mut NoObserver).unwrap().image;
    assert_eq!(got.shape, vec![1, 3, 128, 128]);
    assert!(rel_err(&got.data, &want_other.data) <= 1e-5);
    let got = generate(&mut mixed, &unguided, &mut NoObserver).unwrap().image;
    assert_eq!(got.shape, vec![1, 3, 64, 64]);
}

#[test]
fn buckets_left_for_their_first_use_give_the_images_of_buckets_opened_at_load() {
    use katz_onnx::runtime::{BucketLoad, FixedShape, OtherSizes};
    let sizes = [(64, 64), (96, 64), (64, 96)];
    let mut opts = test_options();
    opts.buckets = sizes
        .iter()
        .map(|(w, h)| FixedShape::parse(&format!("{w}x{h}"), 2).unwrap())
        .collect();
    opts.other_sizes = OtherSizes::Refuse;
    let run = |p: &mut Pipeline, (w, h): (usize, usize)| {
        let mut r = request();
        (r.width, r.height) = (w, h);
        generate(p, &r, &mut NoObserver).unwrap().image
    };
    let bundle = root().join("bundles/tiny-sdxl");
    let mut all = Pipeline::load(&bundle, opts.clone()).unwrap();
    opts.bucket_load = BucketLoad::FirstUse;
    let mut later = Pipeline::load(&bundle, opts.clone()).unwrap();
    // the last bucket first (opened on this thread or taken from the opener), then the others
    for s in [sizes[2], sizes[1], sizes[0], sizes[2]] {
        assert_eq!(run(&mut later, s).data, run(&mut all, s).data, "bucket {s:?}");
    }
    // a size without a bucket is still refused, and a pipeline dropped while its opener works
    // does not hang
    let mut other = request();
    (other.width, other.height) = (128, 128);
    assert!(generate(&mut later, &other, &mut NoObserver).is_err());
    drop(Pipeline::load(&bundle, opts).unwrap());
}

#[test]
fn a_graph_cache_is_written_once_and_read_after() {
    let dir = std::env::temp_dir().join(format!("katz-graph-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = test_options();
    opts.cache = Some(dir.clone());
    opts.buckets = vec![katz_onnx::runtime::FixedShape::parse("64x64", 2).unwrap()];
    let entries = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let r = request();
    let mut p = Pipeline::load(root().join("bundles/tiny-sdxl"), opts.clone()).unwrap();
    let first = generate(&mut p, &r, &mut NoObserver).unwrap().image;
    let made = entries();
    // text encoders, the UNet pair of the bucket and of free shapes, the VAE; no staging left
    assert!(made.len() >= 5, "{made:?}");
    assert!(made.iter().all(|e| !e.starts_with(".staging")), "{made:?}");
    let mut p = Pipeline::load(root().join("bundles/tiny-sdxl"), opts.clone()).unwrap();
    let again = generate(&mut p, &r, &mut NoObserver).unwrap().image;
    assert_eq!(entries(), made, "a warm load writes nothing new");
    assert!(rel_err(&again.data, &first.data) <= 1e-6);
    // an entry that cannot be read is dropped, the graph loads from its source, and the graph
    // stays out of the cache
    let unet = made.iter().find(|e| e.starts_with("unet_encoder")).unwrap();
    std::fs::write(dir.join(unet).join("graph.onnx"), b"not a graph").unwrap();
    let mut p = Pipeline::load(root().join("bundles/tiny-sdxl"), opts).unwrap();
    let broken = generate(&mut p, &r, &mut NoObserver).unwrap().image;
    assert!(rel_err(&broken.data, &first.data) <= 1e-6);
    assert!(
        entries().iter().any(|e| e.ends_with(".refused")),
        "{:?}",
        entries()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_graphs_are_refused_without_fixed_shapes_or_a_cuda_device() {
    let load = |o| Pipeline::load(root().join("bundles/tiny-sdxl"), o).err();
    let mut o = test_options();
    o.cuda_graph = true;
    let err = load(o.clone()).expect("CUDA graphs without shape buckets must be refused");
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("--shapes"), "{err}");
    if !o.device.is_gpu() {
        o.buckets = vec![katz_onnx::runtime::FixedShape::parse("64x64", 2).unwrap()];
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
            prep: Default::default(),
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

#[test]
fn a_prompt_over_77_tokens_is_truncated_and_reported() {
    let mut p = pipeline();
    let short = generate(&mut p, &request(), &mut NoObserver).unwrap();
    assert_eq!((short.prompt_truncated, short.negative_truncated), (None, None));
    let long = "a red circle above a blue square, ".repeat(20);
    let mut r = request();
    r.prompt = long.clone();
    r.negative_prompt = Some("blurry".into());
    let out = generate(&mut p, &r, &mut NoObserver).unwrap();
    let t = out.prompt_truncated.expect("a long prompt is reported");
    assert!(t.tokens > 77 && t.kept == 77, "{t:?}");
    assert_eq!(out.negative_truncated, None);
    // the tokens past the 77th change nothing: the same image with more words after them
    r.prompt = format!("{long} a green star below a yellow moon");
    let more = generate(&mut p, &r, &mut NoObserver).unwrap();
    assert!(more.prompt_truncated.unwrap().tokens > t.tokens);
    assert_eq!(more.image, out.image, "words past the cut changed the image");
    // a long negative prompt is reported too (guidance on)
    r.negative_prompt = Some(long);
    let neg = generate(&mut p, &r, &mut NoObserver).unwrap();
    assert_eq!(neg.negative_truncated.map(|n| n.kept), Some(77));
}
