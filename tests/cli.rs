//! The `katz` binary as a user runs it: the demo, `generate` with several adapters, and a clear
//! error (never a panic) for each kind of bad input.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("katz-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn katz(args: &[&str]) -> Output {
    Command::new(katz_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("katz runs")
}

fn ok(out: &Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "katz failed:\n{so}\n{se}");
    so.into_owned()
}

/// Fails with a message containing `needle`, and without a panic.
fn fails_with(out: &Output, needle: &str) {
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "katz succeeded where it should fail ({needle})"
    );
    assert!(!se.contains("panicked"), "katz panicked:\n{se}");
    assert!(se.contains(needle), "error does not say `{needle}`:\n{se}");
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p)
        .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 100)
        .unwrap_or(false)
}

#[test]
fn demo_is_reproducible_and_seeded() {
    let d = tmp("demo");
    let (a, b, c) = (d.join("a.png"), d.join("b.png"), d.join("c.png"));
    let out = ok(&katz(&["demo", "--steps", "4", "--output", a.to_str().unwrap()]));
    assert!(
        out.contains("UNet encoder") && out.contains("VAE decode") && out.contains("total"),
        "{out}"
    );
    ok(&katz(&["demo", "--steps", "4", "--output", b.to_str().unwrap()]));
    ok(&katz(&[
        "demo",
        "--steps",
        "4",
        "--seed",
        "7",
        "--output",
        c.to_str().unwrap(),
    ]));
    assert!(is_png(&a));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, different bytes"
    );
    assert_ne!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&c).unwrap(),
        "other seed, same image"
    );
    // the demo runs through the worker's actors; the direct pipeline gives the same bytes
    let g = d.join("g.png");
    let prompt = "a red circle above a blue square on a white background";
    ok(&katz(&[
        "generate",
        "--bundle",
        "bundles/shapes/shapes-sdxl",
        "--prompt",
        prompt,
        "--size",
        "128x128",
        "--steps",
        "4",
        "--guidance",
        "5",
        "--seed",
        "1",
        "--controlnet",
        "bundles/shapes/shapes-sdxl-controlnet=bundles/shapes/examples/red-circle-above-blue-square-edges.png:1.0",
        "--lora",
        "bundles/shapes/loras/pastel.safetensors:1.0",
        "--output",
        g.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&g).unwrap(),
        "embedded demo != direct generate"
    );
}

fn generate(extra: &[&str], output: &Path) -> Output {
    let mut args = vec![
        "generate",
        "--bundle",
        "bundles/tiny-sdxl",
        "--prompt",
        "a blue star",
    ];
    args.extend(["--output", output.to_str().unwrap()]);
    // defaults unless the test gives its own
    for (flag, value) in [("--size", "64x64"), ("--steps", "3")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    katz(&args)
}

#[test]
fn generate_with_two_controlnets_and_two_loras() {
    let d = tmp("two");
    let out = d.join("two.png");
    ok(&generate(
        &[
            "--scheduler",
            "dpm++2m",
            "--karras",
            "--negative-prompt",
            "blurry",
            "--controlnet",
            "bundles/tiny-sdxl-controlnet=bundles/examples/cond_a.png:0.7",
            "--controlnet",
            "bundles/tiny-sdxl-controlnet=bundles/examples/cond_b.png:0.5:0.2:0.8",
            "--lora",
            "bundles/loras/tiny-lora-a.safetensors:0.6",
            "--lora",
            "bundles/loras/tiny-lora-b.safetensors:-0.4",
        ],
        &out,
    ));
    assert!(is_png(&out));
}

#[test]
fn a_random_seed_is_printed_and_makes_the_same_image_again() {
    let d = tmp("seed");
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    // a conditioning image of another size than the request's: resized, no error
    let cn = [
        "--controlnet",
        "bundles/tiny-sdxl-controlnet=bundles/examples/edges-128.png:0.8",
    ];
    let so = ok(&generate(&[&["--seed", "-1"][..], &cn].concat(), &a));
    let line = so
        .lines()
        .find(|l| l.starts_with("seed "))
        .unwrap_or_else(|| panic!("no seed printed: {so}"));
    let seed: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        line.contains(&format!("--seed {seed} makes this image again")),
        "{line}"
    );
    let s = seed.to_string();
    let so = ok(&generate(&[&["--seed", s.as_str()][..], &cn].concat(), &b));
    assert!(!so.contains("drawn at random"), "{so}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "seed {seed}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tmp("bad");
    let o = d.join("x.png");
    let o = o.as_path();
    fails_with(
        &katz(&[
            "generate",
            "--bundle",
            "no/such/bundle",
            "--prompt",
            "x",
            "--output",
            o.to_str().unwrap(),
        ]),
        "no such bundle directory",
    );
    fails_with(&generate(&["--steps", "0"], o), "steps must be at least 1");
    fails_with(&generate(&["--size", "60x64"], o), "multiples of 8");
    fails_with(
        &generate(
            &[
                "--controlnet",
                "bundles/tiny-sdxl-controlnet=bundles/examples/photo-200x120.jpg",
                "--canny",
                "300,100",
            ],
            o,
        ),
        "ControlNet #0: canny thresholds must be 0 ≤ low ≤ high ≤ 1140, got low 300 high 100",
    );
    fails_with(
        &generate(&["--control-resize", "stretch"], o),
        "the resize modes are resize, crop and pad",
    );
    fails_with(&generate(&["--seed", "-2"], o), "or -1 for a random one");
    let not_png = d.join("not.png");
    std::fs::write(&not_png, "hello").unwrap();
    let spec = format!("bundles/tiny-sdxl-controlnet={}", not_png.display());
    fails_with(
        &generate(&["--controlnet", &spec], o),
        "not a PNG, JPEG or WebP image",
    );
    fails_with(
        &generate(
            &["--controlnet", "bundles/tiny-sdxl=bundles/examples/cond_a.png"],
            o,
        ),
        "is a `base` bundle where a `controlnet` bundle was expected",
    );
    fails_with(&generate(&["--lora", "no/such.safetensors"], o), "no such file");
    fails_with(&generate(&["--scheduler", "plms"], o), "euler");
    assert!(!o.exists(), "a failed run wrote an image");
}

/// `--unet-only`: a file with text-encoder and convolution parts (made by peft for the trained
/// family) on the family's bundle, which takes neither (exported before its text encoders and
/// convolutions took weights), fails naming them, before any step, in both LoRA modes; with the
/// flag its attention layers are merged and what was skipped is named.
#[test]
fn unet_only_skips_the_parts_the_bundle_cannot_take() {
    let d = tmp("unet-only");
    for mode in ["sync", "async"] {
        let png = d.join(format!("{mode}.png"));
        let mut args = vec![
            "generate",
            "--bundle",
            "bundles/shapes/shapes-sdxl",
            "--prompt",
            "a red circle",
            "--size",
            "64x64",
            "--steps",
            "2",
            "--lora",
            "tests/data/lora/shapes-te-conv.safetensors:0.8",
            "--lora-mode",
            mode,
            "--output",
            png.to_str().unwrap(),
        ];
        let refused = katz(&args);
        for want in [
            "shapes-te-conv.safetensors",
            "keys adapt a text encoder",
            "keys are convolution LoRA factors",
            "conv1.lora_A.weight",
            "unet_only",
        ] {
            fails_with(&refused, want);
        }
        assert!(!png.exists(), "{mode}: an image was written");
        args.push("--unet-only");
        let out = katz(&args);
        ok(&out);
        assert!(is_png(&png), "{mode}");
        if mode == "sync" {
            let se = String::from_utf8_lossy(&out.stderr);
            assert!(
                se.contains("skipped what the bundle cannot take") && se.contains("text-encoder keys"),
                "{se}"
            );
        }
    }
}

#[test]
fn lora_whose_keys_match_nothing_is_refused() {
    use safetensors::tensor::{Dtype, TensorView};
    let d = tmp("lora");
    let a = vec![0u8; 4 * 4 * 4];
    let write = |name: &str, keys: &[&str]| {
        let p = d.join(name);
        let views: Vec<_> = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    TensorView::new(Dtype::F32, vec![4, 4], &a).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &p).unwrap();
        format!("{}:1.0", p.display())
    };
    // kohya keys of another model, peft keys of a text encoder: both name what matched nothing
    let kohya = write(
        "foreign-kohya.safetensors",
        &[
            "lora_unet_foo_bar.lora_down.weight",
            "lora_unet_foo_bar.lora_up.weight",
        ],
    );
    fails_with(
        &generate(&["--lora", &kohya], &d.join("x.png")),
        "keys match no weight of the bundle",
    );
    let peft = write(
        "foreign-peft.safetensors",
        &["text_model.encoder.layers.0.q_proj.lora_A.weight"],
    );
    fails_with(
        &generate(&["--lora", &peft], &d.join("x.png")),
        "keys match no weight of the bundle",
    );
    // and a file mixing both layouts says so
    let mixed = write(
        "mixed.safetensors",
        &[
            "lora_unet_foo_bar.lora_down.weight",
            "text_model.encoder.layers.0.q_proj.lora_A.weight",
        ],
    );
    fails_with(
        &generate(&["--lora", &mixed], &d.join("x.png")),
        "a file must be in one layout",
    );
}

#[test]
fn manifest_that_does_not_match_its_graphs_is_refused() {
    let d = tmp("manifest");
    let b = d.join("bundle");
    std::fs::create_dir_all(&b).unwrap();
    for e in std::fs::read_dir(root().join("bundles/tiny-sdxl")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(b.join("bundle.json")).unwrap();
    // claim one skip fewer than the graphs have
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["unet"]["skips"] = serde_json::json!(8);
    std::fs::write(b.join("bundle.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let out = katz(&[
        "generate",
        "--bundle",
        b.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        "/dev/null",
    ]);
    fails_with(&out, "graph does not match the manifest");
    // a file the manifest names is missing
    v["unet"]["skips"] = serde_json::json!(9);
    v["vae_decoder"] = serde_json::json!("vae.onnx");
    std::fs::write(b.join("bundle.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let out = katz(&[
        "generate",
        "--bundle",
        b.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        "/dev/null",
    ]);
    fails_with(&out, "manifest names `vae.onnx`, which is missing");
}

#[test]
fn a_gpu_that_cannot_be_used_is_an_error_not_a_cpu_fallback() {
    let d = tmp("gpu");
    for dev in ["cuda:0", "tensorrt:0"] {
        fails_with(
            &generate(&["--device", dev], &d.join("x.png")),
            &format!("device {dev} cannot be used"),
        );
    }
    fails_with(
        &generate(&["--device", "tpu:0"], &d.join("x.png")),
        "expected cpu, cuda:N or tensorrt:N",
    );
    assert!(!d.join("x.png").exists());
}

#[test]
fn gpu_placement_flags_are_refused_clearly_where_they_cannot_apply() {
    let d = tmp("placement");
    fails_with(
        &generate(&["--split-guidance", "cuda:1"], &d.join("x.png")),
        "split guidance needs two GPUs, got cpu and cuda:1",
    );
    fails_with(
        &katz(&["worker", "--split-guidance", "cuda:1"]),
        "needs the worker on one GPU",
    );
    fails_with(
        &katz(&["worker", "--controlnet-device", "cuda:1"]),
        "ControlNets go to GPUs when the base runs on one",
    );
    fails_with(
        &katz(&["worker", "--controlnet-transport", "cuda-ipc"]),
        "cuda-ipc needs the worker on a GPU",
    );
    fails_with(
        &katz(&["worker", "--controlnet-transport", "carrier-pigeon"]),
        "must be redis or cuda-ipc",
    );
    fails_with(
        &generate(&["--precision", "fp8"], &d.join("x.png")),
        "fp8 precision: it runs on cuda:N only, got cpu",
    );
    fails_with(
        &generate(&["--precision", "fp4"], &d.join("x.png")),
        "expected bundle or fp8",
    );
    assert!(!d.join("x.png").exists());
}

#[test]
fn missing_onnx_runtime_names_the_fix() {
    let out = Command::new(katz_bin())
        .args(["demo", "--steps", "1", "--output", "/dev/null"])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .current_dir(root())
        .output()
        .unwrap();
    fails_with(&out, "tools/fetch-onnxruntime.sh");
}

#[test]
fn bench_lora_merge_times_the_cpu_merge_and_refuses_bad_input() {
    let d = tmp("bench");
    let json = d.join("bench.json");
    let lora = "bundles/loras/tiny-lora-a.safetensors:0.8";
    let so = ok(&katz(&[
        "bench",
        "lora-merge",
        "--bundle",
        "bundles/tiny-sdxl",
        "--lora",
        lora,
        "--lora",
        "bundles/loras/tiny-lora-b.safetensors",
        "--repeat",
        "3",
        "--bandwidth-mib",
        "16",
        "--out",
        json.to_str().unwrap(),
    ]));
    assert!(so.contains("merge, median"), "{so}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["loras"].as_array().unwrap().len(), 2);
    assert!(r["layers"].as_u64().unwrap() > 0);
    assert!(r["timings_ms"]["merge_median"].as_f64().unwrap() > 0.0);
    assert!(r["floor_ms"].as_f64().unwrap() > 0.0);

    let shapes = d.join("shapes.json");
    std::fs::write(&shapes, r#"{"a.weight": [4, 4]}"#).unwrap();
    let base = ["bench", "lora-merge", "--lora", lora];
    let with = |extra: &[&str]| katz(&[&base[..], extra].concat());
    fails_with(
        &with(&["--shapes", shapes.to_str().unwrap(), "--device", "cpu"]),
        "pass --bundle",
    );
    fails_with(
        &with(&["--bundle", "bundles/tiny-sdxl", "--dtype", "f16"]),
        "--dtype f16 is for GPUs",
    );
    fails_with(
        &with(&["--bundle", "bundles/tiny-sdxl", "--repeat", "0"]),
        "--repeat must be at least 1",
    );
    // an error either way: no CUDA (here), or the LoRA's layers are not in this map (on a GPU)
    fails_with(
        &with(&["--shapes", shapes.to_str().unwrap(), "--device", "cuda:0"]),
        "error:",
    );
    fails_with(
        &katz(&[
            "bench",
            "lora-merge",
            "--bundle",
            "bundles/tiny-sdxl",
            "--lora",
            "/nonexistent.safetensors",
        ]),
        "no such file",
    );
}

#[test]
fn trace_tools_draw_read_and_replay_a_katz_format_trace() {
    let d = tmp("trace");
    let trace = d.join("trace.json");
    let (t, s, c) = (
        trace.to_str().unwrap(),
        d.join("stats.json"),
        d.join("cache.json"),
    );
    let so = ok(&katz(&[
        "trace",
        "gen",
        "--service",
        "A",
        "--requests",
        "3000",
        "--rate",
        "4",
        "--bursty",
        "3:5:10",
        "--instances",
        "2",
        "--seed",
        "5",
        "--out",
        t,
    ]));
    assert!(so.contains("3000 requests of service A"), "{so}");
    // the file is a JSON list in the published format
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let first = &raw.as_array().unwrap()[0];
    for k in [
        "timestamp",
        "ip",
        "scene_id",
        "base_model_id",
        "controlnets",
        "loras",
    ] {
        assert!(first.get(k).is_some(), "{k} missing: {first}");
    }
    let so = ok(&katz(&["trace", "stats", t, "--out", s.to_str().unwrap()]));
    assert!(so.contains("2 instance(s)"), "{so}");
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&s).unwrap()).unwrap();
    assert_eq!(st["requests"], 3000);
    let top5 = st["top_controlnet_share"]["5"].as_f64().unwrap();
    assert!(
        (top5 - 0.98).abs() < 0.02,
        "service A's top 5 ControlNets: {top5}"
    );
    assert_eq!(st["distinct_loras_over_time"].as_object().unwrap().len(), 2);

    let so = ok(&katz(&[
        "trace",
        "cache",
        t,
        "--max-entries",
        "4",
        "--out",
        c.to_str().unwrap(),
    ]));
    assert!(so.contains("LoRA LRU"), "{so}");
    let ca: serde_json::Value = serde_json::from_slice(&std::fs::read(&c).unwrap()).unwrap();
    let rows = ca["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let lru = |r: &serde_json::Value| r["lora_lru"]["loads_per_request"].as_f64().unwrap();
    assert!(
        lru(&rows[3]) < lru(&rows[0]),
        "more entries, fewer loads: {rows:?}"
    );

    // bad input is a clear error, not a panic
    std::fs::write(d.join("bad.json"), r#"[{"timestamp": "noon", "ip": "a"}]"#).unwrap();
    fails_with(
        &katz(&["trace", "stats", d.join("bad.json").to_str().unwrap()]),
        "not a Katz trace",
    );
    fails_with(
        &katz(&["trace", "gen", "--bursty", "x", "--out", t]),
        "--bursty x",
    );
    fails_with(
        &katz(&["trace", "gen", "--service", "Z", "--out", t]),
        "unknown service",
    );
}
