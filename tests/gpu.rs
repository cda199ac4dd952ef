//! The device-resident GPU loop against the host loop, on the tiny bundles.
//!
//! These need a GPU and ONNX Runtime's CUDA provider: they are `#[ignore]`d here and run on the
//! GPU machine by `tools/device/gpu-path.sh tests` (`--ignored`, `KATZ_TEST_DEVICE=cuda:0`).
//! CI runs the same pipeline arithmetic on the CPU in the parity, pipeline and ControlNet tests.

mod common;
use common::*;

use katz_kernels::rel_err;
use katz_onnx::controlnet::{ControlService, ControlSession, InlineControlNets, SessionInit};
use katz_onnx::image::read_conditioning;
use katz_onnx::noise::SeededNoise;
use katz_onnx::pipeline::{LoraPlan, NoObserver, Pipeline};
use katz_onnx::placement::{ControlNetPlace, Placement};
use katz_onnx::request::{ControlRequest, LoraRequest, ModelId, Request};
use katz_onnx::runtime::{Device, SessionOptions};
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;

fn gpu() -> Device {
    std::env::var("KATZ_TEST_DEVICE")
        .ok()
        .map(|d| d.parse().expect("KATZ_TEST_DEVICE"))
        .filter(Device::is_gpu)
        .unwrap_or(Device::Cuda(0))
}

fn opts(device: Device) -> SessionOptions {
    SessionOptions {
        intra_threads: 0,
        device,
        deterministic: true,
        ..SessionOptions::default()
    }
}

fn request(models: &[ModelId], scheduler: SchedulerKind, lora: bool, p: &Pipeline) -> Request {
    let images = ["cond_a.png", "cond_b.png", "cond_a.png"];
    let spans = [(0.0, 1.0), (0.0, 0.6), (0.3, 1.0)];
    let controlnets = models
        .iter()
        .enumerate()
        .map(|(j, &model)| ControlRequest {
            prep: Default::default(),
            model: model.into(),
            image: read_conditioning(&root().join("bundles/examples").join(images[j]), (64, 64)).unwrap(),
            scale: [0.8, 0.5, -0.4][j],
            start: spans[j].0,
            end: spans[j].1,
        })
        .collect();
    let loras = if lora {
        vec![LoraRequest::loaded(
            p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
                .unwrap(),
            0.8,
        )]
    } else {
        vec![]
    };
    Request {
        prompt: "a red circle above a blue square".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 6,
        guidance: 5.0,
        scheduler,
        karras: false,
        seed: 11,
        controlnets,
        loras,
    }
}

/// The request's LoRAs as an asynchronous merge takes them.
fn adapters(r: &Request) -> Vec<(std::sync::Arc<katz_onnx::lora::LoraAdapter>, f32)> {
    r.loras
        .iter()
        .map(|l| (l.adapter.clone().expect("a loaded LoRA"), l.scale))
        .collect()
}

/// The base on GPU 0, the conditional guidance half on GPU 1.
fn split_on_1() -> Placement {
    Placement {
        cond_half: Some(Device::Cuda(1)),
        ..Placement::on(Device::Cuda(0))
    }
}

/// The GPU count, failing the test when there are fewer than two (a skip would pass unseen).
fn two_gpus() -> usize {
    let count = katz_kernels::cuda::device_count();
    assert!(count >= 2, "this test needs two GPUs, found {count}");
    count
}

/// The tiny base bundle: `KATZ_GPU_TINY` (gpu-path.sh runs the tests again on a copy with a
/// UNet prelude), else bundles/tiny-sdxl.
fn tiny() -> std::path::PathBuf {
    std::env::var_os("KATZ_GPU_TINY")
        .map(Into::into)
        .unwrap_or_else(|| root().join("bundles/tiny-sdxl"))
}

/// The tiny ControlNet: `KATZ_GPU_TINY_CN` (a copy with a prelude), else bundles/tiny-sdxl-controlnet.
fn cn_dir() -> std::path::PathBuf {
    std::env::var_os("KATZ_GPU_TINY_CN")
        .map(Into::into)
        .unwrap_or_else(|| root().join("bundles/tiny-sdxl-controlnet"))
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-path.sh tests"]
fn the_device_loop_matches_the_host_loop_for_0_to_3_controlnets_euler_and_euler_a() {
    let mut cpu = Pipeline::load(tiny(), opts(Device::Cpu)).unwrap();
    let mut dev = Pipeline::load(tiny(), opts(gpu())).unwrap();
    let (mc, md) = (
        cpu.controlnet(cn_dir()).unwrap(),
        dev.controlnet(cn_dir()).unwrap(),
    );
    for sched in [SchedulerKind::Euler, SchedulerKind::EulerAncestral] {
        for n in 0..=3 {
            let lora = n % 2 == 1;
            let (rc, rd) = (
                request(&vec![mc; n], sched, lora, &cpu),
                request(&vec![md; n], sched, lora, &dev),
            );
            let a = generate(&mut cpu, &rc, &mut NoObserver).unwrap();
            let b = generate(&mut dev, &rd, &mut NoObserver).unwrap();
            let e = rel_err(&b.image.data, &a.image.data);
            println!("{sched:?} {n} ControlNets, LoRA {lora}: relative error GPU vs CPU {e:.2e}");
            assert!(e < 1e-3, "{sched:?}, {n} ControlNets: {e}");
        }
    }
}

/// Hides a session's device path: the GPU pipeline must then download the latent and upload the
/// residuals (what it does for ControlNets served over Redis).
struct HostOnly(InlineControlNets);
struct HostSession(Box<dyn ControlSession>);

impl ControlService for HostOnly {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> katz_onnx::Result<Box<dyn ControlSession>> {
        Ok(Box::new(HostSession(self.0.open(index, req, init)?)))
    }
}

impl ControlSession for HostSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> katz_onnx::Result<()> {
        self.0.send(step, latent_in, timestep)
    }
    fn recv(&mut self, step: usize) -> katz_onnx::Result<Vec<Tensor>> {
        self.0.recv(step)
    }
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-path.sh tests"]
fn device_threaded_and_host_path_sessions_equal_the_inline_device_loop() {
    let mut dev = Pipeline::load(tiny(), opts(gpu())).unwrap();
    let m = dev.controlnet(cn_dir()).unwrap();
    for n in 1..=3 {
        let r = request(&vec![m; n], SchedulerKind::Euler, false, &dev);
        let serial = generate(&mut dev, &r, &mut NoObserver).unwrap().image;
        let mut threaded = dev.threaded_controlnets();
        let t = generate_with(
            &mut dev,
            &r,
            &mut SeededNoise::new(r.seed),
            &mut NoObserver,
            LoraPlan::Sync,
            Some(&mut threaded),
        )
        .unwrap()
        .image;
        let mut host = HostOnly(dev.inline_controlnets());
        let h = generate_with(
            &mut dev,
            &r,
            &mut SeededNoise::new(r.seed),
            &mut NoObserver,
            LoraPlan::Sync,
            Some(&mut host),
        )
        .unwrap()
        .image;
        let (et, eh) = (rel_err(&t.data, &serial.data), rel_err(&h.data, &serial.data));
        println!("{n} ControlNets: threaded {et:.2e}, host-path sessions {eh:.2e}");
        assert!(et < 1e-5 && eh < 1e-4, "{n}: threaded {et}, host path {eh}");
    }
}

#[test]
#[ignore = "needs two GPUs: tools/device/gpu-path.sh tests on a multi-GPU kind"]
fn controlnets_on_other_gpus_equal_controlnets_on_the_pipelines_gpu() {
    let count = two_gpus();
    let mut dev = Pipeline::load(tiny(), opts(Device::Cuda(0))).unwrap();
    let local = dev.controlnet(cn_dir()).unwrap();
    let others = Placement {
        base: Device::Cuda(0),
        cond_half: None,
        controlnets: (0..3)
            .map(|j| ControlNetPlace::One(Device::Cuda(1 + (j % (count - 1)) as i32)))
            .collect(),
    };
    let remote = dev.place(&others, &[cn_dir(), cn_dir(), cn_dir()]).unwrap();
    for n in 1..=3 {
        let rl = request(&vec![local; n], SchedulerKind::Euler, false, &dev);
        let a = generate(&mut dev, &rl, &mut NoObserver).unwrap().image;
        let r = request(&remote[..n], SchedulerKind::Euler, false, &dev);
        let mut threaded = dev.threaded_controlnets();
        let b = generate_with(
            &mut dev,
            &r,
            &mut SeededNoise::new(r.seed),
            &mut NoObserver,
            LoraPlan::Sync,
            Some(&mut threaded),
        )
        .unwrap()
        .image;
        let e = rel_err(&b.data, &a.data);
        println!("{n} ControlNets on other GPUs (threaded): relative error {e:.2e}");
        assert!(e < 1e-4, "{n}: {e}");
    }
}

#[test]
#[ignore = "needs two GPUs: tools/device/gpu-path.sh on a multi-GPU kind"]
fn split_guidance_gives_the_one_gpu_image_with_controlnets_and_loras() {
    two_gpus();
    let mut dev = Pipeline::load(tiny(), opts(Device::Cuda(0))).unwrap();
    let m0 = dev.controlnet(cn_dir()).unwrap();
    let on_1 = Placement {
        controlnets: vec![ControlNetPlace::One(Device::Cuda(1))],
        ..Placement::on(Device::Cuda(0))
    };
    let m1 = dev.place(&on_1, &[cn_dir()]).unwrap()[0];
    let cases = [
        (vec![], SchedulerKind::Euler, true),
        (vec![m0], SchedulerKind::Euler, false),
        (vec![m0, m1], SchedulerKind::Euler, true),
        (vec![m1, m0, m0], SchedulerKind::EulerAncestral, true),
    ];
    let run = |dev: &mut Pipeline, models: &Vec<ModelId>, sched, lora, asynchronous: bool| {
        let r = request(models, sched, lora, dev);
        if asynchronous && lora {
            let mut pending = katz_onnx::lora::PendingMerge::spawn(dev.shared_weights(), adapters(&r));
            let plan = LoraPlan::Async {
                pending: &mut pending,
                bound: 2,
                timeout: std::time::Duration::from_secs(60),
                early: false,
            };
            let mut threaded = dev.threaded_controlnets();
            generate_with(
                dev,
                &r,
                &mut SeededNoise::new(r.seed),
                &mut NoObserver,
                plan,
                Some(&mut threaded),
            )
            .unwrap()
            .image
        } else {
            generate(dev, &r, &mut NoObserver).unwrap().image
        }
    };
    let mut single = Vec::new();
    for (models, sched, lora) in &cases {
        for asynchronous in [false, true] {
            single.push(run(&mut dev, models, *sched, *lora, asynchronous));
        }
    }
    dev.place(&split_on_1(), &[] as &[std::path::PathBuf]).unwrap();
    let mut i = 0;
    for (models, sched, lora) in &cases {
        for asynchronous in [false, true] {
            let split = run(&mut dev, models, *sched, *lora, asynchronous);
            let e = rel_err(&split.data, &single[i].data);
            println!(
                "split guidance, {} ControlNets, {sched:?}, LoRA {lora} ({}): relative error {e:.2e}",
                models.len(),
                if asynchronous {
                    "async, threaded sessions"
                } else {
                    "sync, inline"
                }
            );
            // batch-1 halves run other cuDNN/cuBLAS kernels (TF32) than one batch-2 run: the
            // same tolerance as GPU vs CPU (the bar for fp16 SDXL is 1e-2)
            assert!(e < 1e-3, "case {i}: {e}");
            i += 1;
        }
    }
}

/// Options with the UNet shapes fixed for the tiny requests (64², a UNet batch of `batch`), with
/// or without CUDA graphs.
fn fixed(device: Device, batch: usize, cuda_graph: bool) -> SessionOptions {
    SessionOptions {
        buckets: vec![katz_onnx::runtime::FixedShape::parse("64x64", batch).unwrap()],
        other_sizes: katz_onnx::runtime::OtherSizes::Refuse,
        cuda_graph,
        ..opts(device)
    }
}

/// One job, its LoRA merged before step 0 (`bound` None) or asynchronously, switching in by step
/// `bound` (a switch mid-job).
fn job_with(dev: &mut Pipeline, r: &Request, bound: Option<usize>) -> Tensor {
    match bound {
        Some(bound) if !r.loras.is_empty() => {
            let mut pending = katz_onnx::lora::PendingMerge::spawn(dev.shared_weights(), adapters(r));
            let plan = LoraPlan::Async {
                pending: &mut pending,
                bound,
                timeout: std::time::Duration::from_secs(60),
                early: false,
            };
            generate_with(dev, r, &mut SeededNoise::new(r.seed), &mut NoObserver, plan, None)
                .unwrap()
                .image
        }
        _ => generate(dev, r, &mut NoObserver).unwrap().image,
    }
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-path.sh tests"]
fn cuda_graphs_give_the_ungraphed_image_across_jobs_loras_and_controlnets() {
    let base = tiny();
    let mut plain = Pipeline::load(&base, fixed(gpu(), 2, false)).unwrap();
    let mut graphed = Pipeline::load(&base, fixed(gpu(), 2, true)).unwrap();
    let (mp, mg) = (
        plain.controlnet(cn_dir()).unwrap(),
        graphed.controlnet(cn_dir()).unwrap(),
    );
    // the weight slot must follow the jobs: pristine, a merge, another merge (another scale),
    // a merge switched in mid-job, pristine again, then the first merge again
    let cases: [(usize, Option<f32>, Option<usize>); 6] = [
        (0, None, None),
        (1, Some(0.8), None),
        (2, Some(0.3), None),
        (1, Some(0.8), Some(2)),
        (3, None, None),
        (0, Some(0.8), None),
    ];
    for (i, &(n, lora, bound)) in cases.iter().enumerate() {
        let make = |p: &Pipeline, m: ModelId| {
            let mut r = request(&vec![m; n], SchedulerKind::Euler, lora.is_some(), p);
            if let (Some(s), Some(l)) = (lora, r.loras.first_mut()) {
                l.scale = s;
            }
            r
        };
        let (rp, rg) = (make(&plain, mp), make(&graphed, mg));
        let want = job_with(&mut plain, &rp, bound);
        let got = job_with(&mut graphed, &rg, bound);
        let e = rel_err(&got.data, &want.data);
        println!(
            "CUDA graphs, case {i}: {n} ControlNets, LoRA {lora:?}, bound {bound:?}: relative error {e:.2e}"
        );
        assert!(e < 1e-4, "case {i}: {e}");
    }
    // the ControlNet ran on its own CUDA graph of the bucket (its weights are graph inputs)
    let captured = graphed.inline_controlnets().models[mg.index()]
        .lock()
        .unwrap()
        .captured();
    assert_eq!(captured.len(), 1, "the ControlNet's bucket was not captured");
    // another size than the captured one is refused, not run on stale shapes
    let mut other = request(&[], SchedulerKind::Euler, false, &graphed);
    other.width = 128;
    other.height = 128;
    let err = generate(&mut graphed, &other, &mut NoObserver).unwrap_err();
    assert!(matches!(err, katz_onnx::Error::InvalidRequest(_)), "{err}");
}

/// The tiny bundle and ControlNet with their preludes (`KATZ_GPU_PRELUDE`, `KATZ_GPU_PRELUDE_CN`:
/// tools/job_prelude.py on copies of bundles/tiny-sdxl and bundles/tiny-sdxl-controlnet) against
/// the whole graphs, bound and under CUDA graphs: pristine, a LoRA merged before step 0, a LoRA
/// switched in mid-job (the UNet's prelude runs again on the merged weights), a ControlNet.
#[test]
#[ignore = "needs a GPU and hoisted tiny bundles: tools/device/gpu-path.sh tests"]
fn the_prelude_gives_the_whole_graphs_image_bound_and_graphed() {
    let env = |k: &str| -> std::path::PathBuf {
        std::env::var_os(k)
            .unwrap_or_else(|| panic!("{k} must name a tiny bundle hoisted by tools/job_prelude.py"))
            .into()
    };
    let (hoisted, hoisted_cn) = (env("KATZ_GPU_PRELUDE"), env("KATZ_GPU_PRELUDE_CN"));
    for dir in [&hoisted, &hoisted_cn] {
        let manifest = std::fs::read_to_string(dir.join("bundle.json")).unwrap();
        assert!(
            manifest.contains("\"prelude\""),
            "{} has no prelude",
            dir.display()
        );
    }
    let (base, cn) = (
        root().join("bundles/tiny-sdxl"),
        root().join("bundles/tiny-sdxl-controlnet"),
    );
    for graph in [false, true] {
        let mut whole = Pipeline::load(&base, fixed(gpu(), 2, graph)).unwrap();
        let mut split = Pipeline::load(&hoisted, fixed(gpu(), 2, graph)).unwrap();
        let (mw, ms) = (
            whole.controlnet(&cn).unwrap(),
            split.controlnet(&hoisted_cn).unwrap(),
        );
        for (lora, bound, n) in [
            (false, None, 0),
            (true, None, 0),
            (true, Some(2), 0),
            (false, None, 1),
            (true, Some(2), 1),
        ] {
            let (rw, rs) = (
                request(&vec![mw; n], SchedulerKind::Euler, lora, &whole),
                request(&vec![ms; n], SchedulerKind::Euler, lora, &split),
            );
            let want = job_with(&mut whole, &rw, bound);
            let got = job_with(&mut split, &rs, bound);
            let e = rel_err(&got.data, &want.data);
            println!("prelude, CUDA graph {graph}, LoRA {lora}, bound {bound:?}, {n} ControlNets: relative error {e:.2e}");
            assert!(
                e < 1e-5,
                "graph {graph}, LoRA {lora}, bound {bound:?}, {n} ControlNets: {e}"
            );
        }
    }
}

#[test]
#[ignore = "needs two GPUs: tools/device/gpu-path.sh on a multi-GPU kind"]
fn split_guidance_with_cuda_graphs_gives_the_one_gpu_image() {
    two_gpus();
    let base = tiny();
    let mut single = Pipeline::load(&base, opts(Device::Cuda(0))).unwrap();
    let mut split = Pipeline::load(&base, fixed(Device::Cuda(0), 1, true)).unwrap();
    split.place(&split_on_1(), &[] as &[std::path::PathBuf]).unwrap();
    let (ms, mp) = (
        single.controlnet(cn_dir()).unwrap(),
        split.controlnet(cn_dir()).unwrap(),
    );
    for (n, lora, bound) in [
        (0, true, None),
        (1, false, None),
        (2, true, Some(2)),
        (0, false, None),
    ] {
        let rs = request(&vec![ms; n], SchedulerKind::Euler, lora, &single);
        let want = job_with(&mut single, &rs, bound);
        let rp = request(&vec![mp; n], SchedulerKind::Euler, lora, &split);
        let got = job_with(&mut split, &rp, bound);
        let e = rel_err(&got.data, &want.data);
        println!("split guidance + CUDA graphs, {n} ControlNets, LoRA {lora}, bound {bound:?}: relative error {e:.2e}");
        assert!(e < 1e-3, "{n} ControlNets, LoRA {lora}: {e}");
    }
}

/// The Katz paper's placement in small: the guidance halves on GPUs 0 and 1, each ControlNet once
/// per half (batch 1) on GPUs 2 and 3, beside a ControlNet that runs both halves. Gives the
/// one-GPU image, with inline and threaded sessions, dynamic and static shapes (CUDA graphs).
#[test]
#[ignore = "needs four GPUs: tools/device/gpu-path.sh on a 4-GPU kind"]
fn controlnets_per_guidance_half_give_the_one_gpu_image() {
    let count = katz_kernels::cuda::device_count();
    assert!(count >= 4, "this test needs four GPUs, found {count}");
    let base = tiny();
    let mut single = Pipeline::load(&base, opts(Device::Cuda(0))).unwrap();
    let ms = single.controlnet(cn_dir()).unwrap();
    for static_shapes in [false, true] {
        let o = if static_shapes {
            fixed(Device::Cuda(0), 1, true)
        } else {
            opts(Device::Cuda(0))
        };
        let mut split = Pipeline::load(&base, o).unwrap();
        let paper = Placement {
            controlnets: vec![
                ControlNetPlace::Halves(Device::Cuda(2), Device::Cuda(3)),
                ControlNetPlace::One(Device::Cuda(3)),
            ],
            ..split_on_1()
        };
        let ids = split.place(&paper, &[cn_dir(), cn_dir()]).unwrap();
        let (halves, whole) = (ids[0], ids[1]);
        for (models, lora, threaded) in [
            (vec![halves], false, false),
            (vec![halves, whole], true, true),
            (vec![halves, halves, whole], true, false),
        ] {
            let rs = request(&vec![ms; models.len()], SchedulerKind::Euler, lora, &single);
            let want = generate(&mut single, &rs, &mut NoObserver).unwrap().image;
            let r = request(&models, SchedulerKind::Euler, lora, &split);
            let got = if threaded {
                let mut svc = split.threaded_controlnets();
                generate_with(
                    &mut split,
                    &r,
                    &mut SeededNoise::new(r.seed),
                    &mut NoObserver,
                    LoraPlan::Sync,
                    Some(&mut svc),
                )
                .unwrap()
                .image
            } else {
                generate(&mut split, &r, &mut NoObserver).unwrap().image
            };
            let e = rel_err(&got.data, &want.data);
            println!(
                "per-half ControlNets (static shapes {static_shapes}), {} ControlNets, LoRA {lora}, threaded {threaded}: relative error {e:.2e}",
                models.len()
            );
            assert!(e < 1e-3, "{models:?}, LoRA {lora}: {e}");
        }
    }
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-path.sh tests"]
fn shape_buckets_with_cuda_graphs_give_the_dynamic_image_in_every_bucket() {
    use katz_onnx::runtime::{FixedShape, OtherSizes};
    let base = tiny();
    let mut dynamic = Pipeline::load(&base, opts(gpu())).unwrap();
    let mut o = opts(gpu());
    o.buckets = vec![
        FixedShape::parse("64x64", 2).unwrap(),
        FixedShape::parse("96x64", 2).unwrap(),
    ];
    o.other_sizes = OtherSizes::Dynamic;
    o.cuda_graph = true;
    let mut buckets = Pipeline::load(&base, o).unwrap();
    let (md, mb) = (
        dynamic.controlnet(cn_dir()).unwrap(),
        buckets.controlnet(cn_dir()).unwrap(),
    );
    // as a worker does: its ControlNets loaded, then the warm-up (every bucket at load: their
    // ControlNet graphs captured now, none by a job)
    buckets.warm_up().unwrap();
    // jobs alternate between the buckets (and a size with none), LoRA merges in and out: the
    // one weight slot follows them
    let cases: [((usize, usize), usize, bool); 6] = [
        ((64, 64), 0, false),
        ((96, 64), 1, true),
        ((64, 64), 1, true),
        ((128, 96), 0, true),
        ((96, 64), 0, false),
        ((64, 64), 0, true),
    ];
    for (i, &((w, h), n, lora)) in cases.iter().enumerate() {
        let make = |p: &Pipeline, m: ModelId| {
            let mut r = request(&vec![m; n], SchedulerKind::Euler, lora, p);
            (r.width, r.height) = (w, h);
            for c in &mut r.controlnets {
                c.image = checkerboard(w, h);
            }
            r
        };
        let (rd, rb) = (make(&dynamic, md), make(&buckets, mb));
        let want = generate(&mut dynamic, &rd, &mut NoObserver).unwrap().image;
        let got = generate(&mut buckets, &rb, &mut NoObserver).unwrap().image;
        let e = rel_err(&got.data, &want.data);
        println!("buckets, case {i}: {w}x{h}, {n} ControlNets, LoRA {lora}: relative error {e:.2e}");
        assert!(e < 1e-3, "case {i}: {e}");
    }
    // the ControlNet has a CUDA graph in each bucket (captured at the warm-up), none for the size
    // without a bucket
    let mut captured: Vec<(usize, usize)> = buckets.inline_controlnets().models[mb.index()]
        .lock()
        .unwrap()
        .captured()
        .iter()
        .map(|f| (f.width, f.height))
        .collect();
    captured.sort();
    assert_eq!(captured, vec![(64, 64), (96, 64)]);
}

#[test]
#[ignore = "needs a GPU: tools/device/gpu-path.sh tests"]
fn the_same_job_twice_gives_a_byte_identical_png() {
    use katz_onnx::image::encode_png;
    use katz_onnx::runtime::ConvSearch;
    let base = tiny();
    let png = |p: &mut Pipeline, lora: bool, n: usize| {
        let m = p.controlnet(cn_dir()).unwrap();
        let r = request(&vec![m; n], SchedulerKind::Euler, lora, p);
        encode_png(&generate(p, &r, &mut NoObserver).unwrap().image).unwrap()
    };
    // the product's configuration (buckets, CUDA graphs, heuristic algorithms, deterministic
    // compute) must repeat itself exactly, within a pipeline and across two loads
    let mut product = opts(gpu());
    product.buckets = vec![katz_onnx::runtime::FixedShape::parse("64x64", 2).unwrap()];
    product.cuda_graph = true;
    let configs: [(&str, SessionOptions, bool); 3] = [
        (
            "buckets + CUDA graphs, heuristic, deterministic",
            product.clone(),
            true,
        ),
        ("free shapes, heuristic, deterministic", opts(gpu()), true),
        (
            "buckets + CUDA graphs, exhaustive search",
            SessionOptions {
                conv_search: ConvSearch::Exhaustive,
                ..product
            },
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (name, o, must) in configs {
        let mut a = Pipeline::load(&base, o.clone()).unwrap();
        let mut b = Pipeline::load(&base, o).unwrap();
        for (lora, n) in [(false, 0), (true, 1)] {
            let first = png(&mut a, lora, n);
            let second = png(&mut a, lora, n);
            let other_load = png(&mut b, lora, n);
            let same = first == second && first == other_load;
            println!(
                "{name}, LoRA {lora}, {n} ControlNets: twice {}, another load {} ({} bytes)",
                if first == second { "identical" } else { "DIFFERENT" },
                if first == other_load {
                    "identical"
                } else {
                    "DIFFERENT"
                },
                first.len()
            );
            if must && !same {
                failures.push(format!("{name}, LoRA {lora}, {n} ControlNets"));
            }
        }
    }
    assert!(failures.is_empty(), "not byte-identical: {failures:?}");
}

/// The full-size fp16 bundle for the determinism test (`gpu-path.sh determinism` sets it).
fn fp16_bundle() -> std::path::PathBuf {
    std::env::var_os("KATZ_GPU_BUNDLE")
        .map(Into::into)
        .expect("KATZ_GPU_BUNDLE must name an fp16 --gpu bundle (tools/device/gpu-path.sh determinism)")
}

#[test]
#[ignore = "needs a GPU and an fp16 --gpu bundle: tools/device/gpu-path.sh determinism"]
fn an_fp16_bundle_repeats_itself_with_its_deterministic_graphs() {
    use katz_onnx::image::encode_png;
    let base = fp16_bundle();
    let steps: usize = std::env::var("KATZ_GPU_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bundle = katz_onnx::bundle::BaseBundle::open(&base).unwrap();
    assert!(
        bundle.has_exact_twins(),
        "{} names no deterministic graphs",
        base.display()
    );
    let [w, h] = bundle.manifest.default_size;
    let job = |p: &mut Pipeline| {
        let r = Request {
            prompt: "a photograph of an astronaut riding a horse".into(),
            negative_prompt: None,
            width: w,
            height: h,
            steps,
            guidance: 7.5,
            scheduler: SchedulerKind::Euler,
            karras: false,
            seed: 7,
            controlnets: vec![],
            loras: vec![],
        };
        let image = generate(p, &r, &mut NoObserver).unwrap().image;
        (encode_png(&image).unwrap(), image)
    };
    let cache = std::env::temp_dir().join("katz-determinism-graphs");
    let product = |deterministic: bool| SessionOptions {
        buckets: vec![katz_onnx::runtime::FixedShape::parse(&format!("{w}x{h}"), 2).unwrap()],
        cuda_graph: true,
        deterministic,
        cache: Some(cache.clone()),
        ..opts(gpu())
    };
    // the deterministic graphs: the same PNG twice, and from another load
    let (first, second, other) = {
        let mut a = Pipeline::load(&base, product(true)).unwrap();
        let (first, _) = job(&mut a);
        let (second, _) = job(&mut a);
        drop(a);
        let mut b = Pipeline::load(&base, product(true)).unwrap();
        (first, second, job(&mut b).0)
    };
    println!(
        "deterministic graphs, {w}x{h}, {steps} steps: twice {}, another load {} ({} bytes)",
        if first == second { "identical" } else { "DIFFERENT" },
        if first == other { "identical" } else { "DIFFERENT" },
        first.len()
    );
    // the fused GroupNorm: how far two runs of one job are apart (docs/protocol.md states it)
    let mut f = Pipeline::load(&base, product(false)).unwrap();
    let (pa, a) = job(&mut f);
    let (pb, b) = job(&mut f);
    let q = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as i32;
    let diffs: Vec<i32> = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (q(*x) - q(*y)).abs())
        .collect();
    let n = diffs.iter().filter(|d| **d > 0).count();
    println!(
        "fused GroupNorm, {w}x{h}, {steps} steps: PNGs {}; {n} of {} pixel values differ ({:.2}%), by at most {}/255",
        if pa == pb { "identical" } else { "differ" },
        diffs.len(),
        100.0 * n as f64 / diffs.len() as f64,
        diffs.iter().max().unwrap_or(&0)
    );
    assert!(
        first == second && first == other,
        "the deterministic graphs did not repeat themselves"
    );
}

/// fp8 graphs against the fp16 graphs of the same bundle (`KATZ_GPU_BUNDLE`, exported with
/// `--gpu --fp8`), and with CUDA graphs against without, across LoRA merges: a job with
/// `KATZ_GPU_LORA`, then without, then with it again (`gpu-path.sh fp8` runs it).
#[test]
#[ignore = "needs a GPU of compute capability 8.9+ and an fp8 --gpu bundle: tools/device/gpu-path.sh fp8"]
fn fp8_graphs_follow_the_fp16_image_and_every_lora_switch() {
    use katz_onnx::runtime::Precision;
    let base = fp16_bundle();
    let lora = std::env::var_os("KATZ_GPU_LORA").expect("KATZ_GPU_LORA: a LoRA file of the bundle's UNet");
    let bundle = katz_onnx::bundle::BaseBundle::open(&base).unwrap();
    assert!(
        bundle.manifest.fp8.is_some(),
        "{} has no fp8 graphs",
        base.display()
    );
    let [w, h] = bundle.manifest.default_size;
    let make = |precision: Precision, cuda_graph: bool| {
        let o = SessionOptions {
            buckets: vec![katz_onnx::runtime::FixedShape::parse(&format!("{w}x{h}"), 2).unwrap()],
            other_sizes: katz_onnx::runtime::OtherSizes::Refuse,
            cuda_graph,
            deterministic: false,
            precision,
            ..opts(gpu())
        };
        Pipeline::load(&base, o).unwrap()
    };
    let job = |p: &mut Pipeline, with_lora: bool| {
        let loras = if with_lora {
            vec![LoraRequest::loaded(
                p.lora(std::path::PathBuf::from(&lora)).unwrap(),
                1.0,
            )]
        } else {
            vec![]
        };
        let r = Request {
            prompt: "a photograph of an astronaut riding a horse".into(),
            negative_prompt: None,
            width: w,
            height: h,
            steps: 4,
            guidance: 7.5,
            scheduler: SchedulerKind::Euler,
            karras: false,
            seed: 5,
            controlnets: vec![],
            loras,
        };
        generate(p, &r, &mut NoObserver).unwrap().image
    };
    let order = [true, false, true];
    let mut fp16 = make(Precision::Bundle, false);
    let want: Vec<Tensor> = order.iter().map(|&l| job(&mut fp16, l)).collect();
    drop(fp16);
    let lora_moves = rel_err(&want[0].data, &want[1].data);
    for graph in [false, true] {
        let mut fp8 = make(Precision::Fp8, graph);
        for (i, &l) in order.iter().enumerate() {
            let got = job(&mut fp8, l);
            let e = rel_err(&got.data, &want[i].data);
            // the fp16 image of the other LoRA state: what stale fp8 weights would give
            let wrong = rel_err(&got.data, &want[if l { 1 } else { 0 }].data);
            println!(
                "fp8 (CUDA graphs {graph}), job {i} (LoRA {l}): relative error {e:.4} against fp16, \
                 {wrong:.4} against the other LoRA state (the LoRA moves fp16 by {lora_moves:.4})"
            );
            assert!(
                e < 0.1 && e < wrong,
                "job {i}: {e} against fp16, {wrong} against the other state"
            );
        }
    }
}
