//! Bounded asynchronous LoRA loading, without a broker: the pipeline's switch at the
//! bound step, the merge against an f64 reference, and the LoraManager's store, cache and bound
//! on pending loads (its Redis source talks to the real Redis on 127.0.0.1:6379).

mod common;
use common::*;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use katz_actors::lora::{LoraConfig, LoraManager, LoraStore};
use katz_kernels::rel_err;
use katz_onnx::lora::{LoraAdapter, LoraParts, PendingMerge};
use katz_onnx::noise::SeededNoise;
use katz_onnx::pipeline::{LoraPlan, NoObserver, Observer, Pipeline};
use katz_onnx::request::{LoraRequest, Request};
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;

fn pipeline() -> Pipeline {
    Pipeline::load(root().join("bundles/tiny-sdxl"), test_options()).unwrap()
}

fn request(steps: usize) -> Request {
    Request {
        prompt: "a red circle above a blue square".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        karras: false,
        seed: 11,
        controlnets: vec![],
        loras: vec![],
    }
}

fn lora_requests(p: &Pipeline) -> Vec<LoraRequest> {
    loras(p)
        .into_iter()
        .map(|(l, s)| LoraRequest::loaded(l, s))
        .collect()
}

fn loras(p: &Pipeline) -> Vec<(Arc<LoraAdapter>, f32)> {
    vec![
        (
            p.lora(root().join("bundles/loras/tiny-lora-a.safetensors"))
                .unwrap(),
            0.8,
        ),
        (
            p.lora(root().join("bundles/loras/tiny-lora-b.safetensors"))
                .unwrap(),
            -0.5,
        ),
    ]
}

fn run_async(
    p: &mut Pipeline,
    req: &Request,
    mut pending: PendingMerge,
    bound: usize,
) -> katz_onnx::pipeline::Generated {
    generate_planned(
        p,
        req,
        &mut SeededNoise::new(req.seed),
        &mut NoObserver,
        LoraPlan::Async {
            pending: &mut pending,
            bound,
            timeout: Duration::from_secs(60),
            early: false,
        },
    )
    .unwrap()
}

#[test]
fn async_with_bound_0_equals_sync_exactly() {
    let mut p = pipeline();
    let mut req = request(6);
    req.loras = lora_requests(&p);
    let sync = generate(&mut p, &req, &mut NoObserver).unwrap();
    let pending = PendingMerge::spawn(p.shared_weights(), loras(&p));
    let asy = run_async(&mut p, &request(6), pending, 0);
    assert_eq!(
        sync.image.data, asy.image.data,
        "K = 0 must be the sync pipeline exactly"
    );
    assert_eq!(asy.timings.lora_switch_step, Some(0));
    assert_eq!(sync.timings.lora_switch_step, Some(0));
}

#[test]
fn async_switches_exactly_at_the_bound_and_is_deterministic() {
    let mut p = pipeline();
    let mut with = request(8);
    with.loras = lora_requests(&p);
    let sync = generate(&mut p, &with, &mut NoObserver).unwrap().image;
    let plain = generate(&mut p, &request(8), &mut NoObserver).unwrap().image;
    let mut images = Vec::new();
    for _ in 0..2 {
        let pending = PendingMerge::spawn(p.shared_weights(), loras(&p));
        let out = run_async(&mut p, &request(8), pending, 3);
        assert_eq!(out.timings.lora_switch_step, Some(3));
        images.push(out.image);
    }
    assert_eq!(
        images[0].data, images[1].data,
        "switching at the bound is deterministic"
    );
    let (to_sync, to_plain) = (
        rel_err(&images[0].data, &sync.data),
        rel_err(&images[0].data, &plain.data),
    );
    assert!(
        to_sync > 0.0 && to_plain > 0.0,
        "K = 3 is neither sync nor LoRA-free"
    );
    // a bound past the last step is clamped: the LoRA still acts on the last step
    let pending = PendingMerge::spawn(p.shared_weights(), loras(&p));
    let out = run_async(&mut p, &request(8), pending, 100);
    assert_eq!(out.timings.lora_switch_step, Some(7));
}

/// Records when each step ended.
struct StepTimes(Arc<Mutex<Vec<Instant>>>);
impl Observer for StepTimes {
    fn on_step(&mut self, _: usize, _: usize, _: &Tensor) -> katz_onnx::Result<()> {
        self.0.lock().unwrap().push(Instant::now());
        Ok(())
    }
}

#[test]
fn a_slow_merge_does_not_hold_the_first_steps_and_is_waited_for_at_the_bound() {
    let mut p = pipeline();
    let (tx, mut pending) = PendingMerge::channel();
    let ready_at = Arc::new(Mutex::new(None));
    let (weights, ls, r) = (p.shared_weights(), loras(&p), ready_at.clone());
    std::thread::spawn(move || {
        // the adapters are read (no text-encoder layers): the job denoises while they merge
        tx.text_encoders(false);
        std::thread::sleep(Duration::from_secs(2)); // a slow merge
        let merged = weights.merge(&ls).map(Arc::new);
        *r.lock().unwrap() = Some(Instant::now());
        tx.send(merged);
    });
    let steps = Arc::new(Mutex::new(Vec::new()));
    let req = request(6);
    let out = generate_planned(
        &mut p,
        &req,
        &mut SeededNoise::new(req.seed),
        &mut StepTimes(steps.clone()),
        LoraPlan::Async {
            pending: &mut pending,
            bound: 4,
            timeout: Duration::from_secs(60),
            early: false,
        },
    )
    .unwrap();
    let ready = ready_at.lock().unwrap().expect("the merge finished");
    let steps = steps.lock().unwrap();
    // steps 0..3 ran with the pristine weights before the merge was ready; step 4 waited for it
    assert!(steps[3] < ready, "the first steps waited for the slow LoRA");
    assert!(steps[4] > ready);
    assert_eq!(out.timings.lora_switch_step, Some(4));
    assert!(out.timings.lora_wait > Duration::ZERO);
    // and the image is the one a fast merge gives at the same bound
    let fast = PendingMerge::spawn(p.shared_weights(), loras(&p));
    let again = run_async(&mut p, &request(6), fast, 4);
    assert_eq!(out.image.data, again.image.data);
}

#[test]
fn a_failed_merge_fails_the_job_with_the_reason() {
    let mut p = pipeline();
    let pending = PendingMerge::ready(Err(katz_onnx::Error::Lora {
        path: "x".into(),
        message: "gone".into(),
    }));
    let req = request(3);
    let mut pending = pending;
    let e = generate_planned(
        &mut p,
        &req,
        &mut SeededNoise::new(1),
        &mut NoObserver,
        LoraPlan::Async {
            pending: &mut pending,
            bound: 1,
            timeout: Duration::from_secs(5),
            early: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("gone"), "{e}");
    // a merge that never arrives: bounded wait, clear error
    let (_tx, mut never) = PendingMerge::channel();
    let e = generate_planned(
        &mut p,
        &req,
        &mut SeededNoise::new(1),
        &mut NoObserver,
        LoraPlan::Async {
            pending: &mut never,
            bound: 1,
            timeout: Duration::from_millis(200),
            early: false,
        },
    )
    .unwrap_err();
    // (the merging side never said its files were read: the job fails before its first step)
    assert!(e.to_string().contains("not read within"), "{e}");
}

/// Counts the steps that ran.
struct Steps(usize);
impl Observer for Steps {
    fn on_step(&mut self, _: usize, _: usize, _: &Tensor) -> katz_onnx::Result<()> {
        self.0 += 1;
        Ok(())
    }
}

#[test]
fn a_bad_lora_file_fails_an_async_job_before_any_step() {
    let mut p = pipeline();
    let dir = std::env::temp_dir().join(format!("katz-bad-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("truncated.safetensors");
    let good = std::fs::read(root().join("bundles/loras/tiny-lora-a.safetensors")).unwrap();
    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    let mut pending =
        PendingMerge::spawn_loading(p.shared_weights(), vec![(bad.clone(), 1.0)], LoraParts::All);
    let req = request(4);
    let mut steps = Steps(0);
    let e = generate_planned(
        &mut p,
        &req,
        &mut SeededNoise::new(1),
        &mut steps,
        LoraPlan::Async {
            pending: &mut pending,
            bound: 3,
            timeout: Duration::from_secs(30),
            early: false,
        },
    )
    .unwrap_err()
    .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(e.contains("truncated.safetensors"), "{e}");
    assert_eq!(steps.0, 0, "steps ran before the bad file was found");
}

#[test]
fn merged_weights_equal_the_f64_reference() {
    let p = pipeline();
    let mut ls = loras(&p);
    // and a kohya file with LoCon factors on every convolution the bundle takes
    let locon = std::env::temp_dir().join(format!("katz-f64-locon-{}.safetensors", std::process::id()));
    write_kohya_lora(&locon, 3, 11);
    ls.push((p.lora(&locon).unwrap(), 0.3));
    let _ = std::fs::remove_file(&locon);
    let merged = p.weights().merge(&ls).unwrap();
    assert!(!merged.is_empty());
    assert!(
        merged.names().any(|n| p.weights().map()[n].shape.len() == 4),
        "no convolution merged"
    );
    for name in merged.names() {
        let shape = &p.weights().map()[name].shape;
        // a convolution [out, in, kh, kw] as [out, in·kh·kw]
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let base = p.weights().data(name).unwrap();
        let mut want: Vec<f64> = base.iter().map(|&x| x as f64).collect();
        for (l, s) in &ls {
            let Some(layer) = l.layers.get(name) else { continue };
            let c = *s as f64 * layer.alpha as f64 / layer.rank as f64;
            for r in 0..rows {
                for j in 0..cols {
                    let mut acc = 0f64;
                    for k in 0..layer.rank {
                        acc += layer.b[r * layer.rank + k] as f64 * layer.a[k * cols + j] as f64;
                    }
                    want[r * cols + j] += c * acc;
                }
            }
        }
        let want: Vec<f32> = want.into_iter().map(|x| x as f32).collect();
        let got = merged.host_data(p.weights(), name).unwrap();
        let e = rel_err(&got, &want);
        // f32 on the CPU; fp16 GPU bundles store the merged weight in fp16
        let tol = if p.weights().device().is_some() {
            1e-3
        } else {
            1e-6
        };
        assert!(e < tol, "{name}: relative error {e:.2e}");
        assert!(rel_err(&got, &base) > 1e-4, "{name}: the merge changed nothing");
    }
}

fn system() -> actix::SystemRunner {
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

#[test]
fn the_manager_bounds_pending_loads_caches_adapters_and_merges_kohya_files() {
    let p = pipeline();
    let store_dir = test_lora_store("manager");
    let mut cfg = LoraConfig::new(store_dir.clone());
    cfg.max_pending_loads = 1;
    cfg.fetch_delay = Duration::from_millis(300);
    let weights = p.shared_weights();
    system().block_on(async move {
        let store = LoraStore::new(store_dir, None, cfg.fetch_delay);
        let mgr = LoraManager::spawn(&cfg, store, weights.clone());
        // unknown names are refused at admission, before any fetch
        let e = mgr.admit(vec!["nope".into()]).await.unwrap_err();
        assert!(e.to_string().contains("unknown LoRA `nope`"), "{e}");
        // one pending load at most: the second admission waits for the first fetch to end
        let first = mgr.admit(vec!["tiny-lora-a".into()]).await.unwrap();
        assert_eq!((first.hits, first.loads), (0, 1));
        assert_eq!(mgr.stats().await.unwrap().pending_loads, 1);
        let second = mgr.admit(vec!["tiny-lora-c".into()]).await.unwrap();
        assert_eq!(second.loads, 1);
        assert!(
            mgr.stats().await.unwrap().fetches >= 1,
            "admitted past a full queue of pending loads"
        );
        // a merge of all three (c is in the kohya layout) equals Weights::merge of the files
        let started = mgr
            .merge(
                vec![
                    ("tiny-lora-a".into(), 0.8),
                    ("tiny-lora-b".into(), -0.5),
                    ("tiny-lora-c".into(), 0.3),
                ],
                LoraParts::All,
            )
            .await
            .unwrap();
        let mut pending = started.pending;
        let merged = pending.poll(Some(Duration::from_secs(30))).unwrap().unwrap();
        let st = started.stats.borrow().clone();
        assert_eq!(st.hits + st.loads, 3);
        let files: Vec<_> = [("tiny-lora-a", 0.8), ("tiny-lora-b", -0.5), ("tiny-lora-c", 0.3)]
            .iter()
            .map(|(n, s)| {
                let path = test_lora_store("manager").join(format!("{n}.safetensors"));
                (Arc::new(LoraAdapter::load(&path, weights.map()).unwrap()), *s)
            })
            .collect();
        let want = weights.merge(&files).unwrap();
        for name in want.names() {
            let (a, b) = (
                merged.host_data(&weights, name).unwrap(),
                want.host_data(&weights, name).unwrap(),
            );
            assert!(rel_err(&a, &b) < 1e-6, "{name}");
        }
        // now all three are cached: admission counts hits
        let again = mgr
            .admit(vec![
                "tiny-lora-a".into(),
                "tiny-lora-b".into(),
                "tiny-lora-c".into(),
            ])
            .await
            .unwrap();
        assert_eq!((again.hits, again.loads), (3, 0));
        assert_eq!(mgr.stats().await.unwrap().pending_loads, 0);
    });
}

#[test]
fn adapters_come_from_redis_when_the_directory_lacks_them() {
    use redis::AsyncCommands;
    let p = pipeline();
    let empty = std::env::temp_dir().join(format!("katz-empty-store-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let name = format!("redis-lora-{}", std::process::id());
    let mut cfg = LoraConfig::new(empty);
    cfg.redis = Some("redis://127.0.0.1:6379/".into());
    let weights = p.shared_weights();
    system().block_on(async move {
        let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis on 127.0.0.1:6379");
        let bytes = std::fs::read(root().join("bundles/loras/tiny-lora-b.safetensors")).unwrap();
        let key = katz_actors::lora::store::lora_key(&name);
        let _: () = conn.set_ex(&key, bytes, 60).await.unwrap();
        let store = LoraStore::open(&cfg).await.unwrap();
        let mgr = LoraManager::spawn(&cfg, store, weights.clone());
        let a = mgr.admit(vec![name.clone()]).await.unwrap();
        assert_eq!(a.loads, 1);
        let started = mgr
            .merge(vec![(name.clone(), 1.0)], LoraParts::All)
            .await
            .unwrap();
        let mut pending = started.pending;
        let merged = pending.poll(Some(Duration::from_secs(30))).unwrap().unwrap();
        assert!(!merged.is_empty());
        let _: () = conn.del(&key).await.unwrap();
    });
}

#[test]
fn a_cache_of_n_entries_evicts_and_prefetched_adapters_count_as_loads() {
    let p = pipeline();
    let store_dir = test_lora_store("entries");
    let mut cfg = LoraConfig::new(store_dir.clone());
    cfg.host_cache_entries = Some(1);
    let weights = p.shared_weights();
    system().block_on(async move {
        let store = LoraStore::new(store_dir, None, cfg.fetch_delay);
        let mgr = LoraManager::spawn(&cfg, store, weights);
        let settle = || async {
            for _ in 0..500 {
                if mgr.stats().await.unwrap().pending_loads == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("fetches did not finish");
        };
        let admit = |names: &[&str]| mgr.admit(names.iter().map(|s| s.to_string()).collect());
        let a = admit(&["tiny-lora-a"]).await.unwrap();
        settle().await;
        let a2 = admit(&["tiny-lora-a"]).await.unwrap();
        assert_eq!((a.loads, a2.hits), (1, 1), "a is cached once fetched");
        admit(&["tiny-lora-b"]).await.unwrap();
        settle().await;
        // one entry: b evicted a
        let a3 = admit(&["tiny-lora-a"]).await.unwrap();
        assert_eq!((a3.hits, a3.loads), (0, 1), "a was evicted by b");
        settle().await;
        // a prefetched adapter is the first admitted job's load, then a hit
        mgr.prefetch_started(vec!["tiny-lora-b".into()]).await.unwrap();
        settle().await;
        let b1 = admit(&["tiny-lora-b"]).await.unwrap();
        let b2 = admit(&["tiny-lora-b"]).await.unwrap();
        assert_eq!((b1.loads, b1.hits, b2.loads, b2.hits), (1, 0, 0, 1));
    });
}
