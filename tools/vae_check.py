#!/usr/bin/env python3
"""The VAE decoder of a GPU bundle against fp32 and against diffusers, in one sitting: relative
error of the fp16 VAE's image to the fp32 VAE's, and decode times (katz fp16, katz fp32, eager
diffusers `AutoencoderKL.decode` fp16 on the same seeded weights), whole at ≤ the VAE's sample
size and tiled above it (diffusers' `enable_tiling()`, katz's onnx/src/vae.rs). Writes JSON.

    python3 tools/vae_check.py --bundle /opt/sdxl/base --katz /opt/kb/katz --device cuda:0 \\
        --sizes 1024,2048 --out vae.json                       # the GPU machine (gpu-path.sh vae)
    python3 tools/vae_check.py --config tiny --bundle bundles/tiny-sdxl --katz target/release/katz \\
        --device cpu --sizes 128,256                           # plumbing, on the CPU
    python3 tools/vae_check.py --reference tests/data/vae      # the tiled-decode parity reference

Data flow:

    seeded modules (export_bundle.py's order and seed) ─▶ AutoencoderKL (fp32, CPU)
        ├─▶ vae_fp32.onnx (exported here, unless --fp32-graph)
        └─▶ eager diffusers on the device: fp16 (timed) and fp32 (the eager reference)
    latents (seeded: noise, smooth; already / scaling_factor) ─▶ .npy
        ─▶ `katz bench vae` --bundle (its VAE, fp16) and --graph vae_fp32.onnx ─▶ images .npy, ms
    errors: katz fp16 vs katz fp32; eager fp16 vs eager fp32; katz fp32 vs eager fp32 (same
    weights, same tiling) ─▶ table + JSON

The Python on the GPU machine has ONNX Runtime for the CPU only: every ONNX Runtime CUDA run
goes through the katz binary. The seeded weights are rebuilt as the exporter builds them (the
text encoders and the UNet first: the VAE's values depend on the generator's position).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_bundle as eb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def seeded_vae(config: str, seed: int):
    """The VAE of `export_bundle.py --config CONFIG --random-init --seed SEED`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = eb.tiny_config() if config == "tiny" else eb.sdxl_config()
    tok = eb.build_tokenizer(cfg["vocab_size"])
    ids = dict(bos_token_id=tok.token_to_id("<|startoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
               pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(seed)
    common = dict(vocab_size=cfg["vocab_size"], max_position_embeddings=eb.MAX_LEN, **ids)
    CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **common}))
    CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **common}))
    UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return vae.eval().requires_grad_(False)


def latents(kind: str, h: int, w: int, scaling: float, seed: int) -> np.ndarray:
    """The VAE's `latent` input (a pipeline latent / scaling_factor): `noise`, N(0, 1) per
    element; `smooth`, noise at 1/8 the size upsampled and renormalised (image-like structure)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        x = torch.randn(1, 4, h, w, generator=g)
    else:
        x = torch.randn(1, 4, max(1, h // 8), max(1, w // 8), generator=g)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
        x = (x - x.mean()) / x.std()
    return (x / scaling).float().numpy()


def errors(got: np.ndarray, want: np.ndarray) -> dict:
    d = got.astype(np.float64) - want.astype(np.float64)
    return {"max_abs": float(np.abs(d).max()), "mean_abs": float(np.abs(d).mean()),
            "rel_l2": float(np.linalg.norm(d) / max(np.linalg.norm(want), 1e-30)),
            "non_finite": int((~np.isfinite(got)).sum())}


def katz_vae(katz: Path, src: list[str], device: str, lat: Path, img: Path, js: Path, tile: int, repeat: int,
             warmup: int) -> dict:
    cmd = [str(katz), "bench", "vae", *src, "--device", device, "--latent", str(lat), "--dump", str(img),
           "--out", str(js), "--tile-sample", str(tile), "--repeat", str(repeat), "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.strip()[-2000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("VAE decode")]
    print("   katz:", line[0] if line else r.stdout.strip())
    return json.loads(js.read_text())


def eager(vae, lat: np.ndarray, dev: str, dtype, repeat: int, warmup: int):
    """diffusers' `decode` with tiling enabled (tiled only above the sample size, as katz)."""
    vae.enable_tiling()
    z = torch.from_numpy(lat).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            sync()
            t0 = time.perf_counter()
            out = vae.decode(z, return_dict=False)[0]
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return out.float().cpu().numpy(), statistics.median(times)


def reference(out: Path, seed: int):
    """diffusers' tiled decode on the committed tiny bundle's VAE with small tiles (64 px, latent 8:
    a 14×11 latent makes 3×2 tiles, the last row and column partial) ─▶ OUT/tiled.safetensors."""
    import onnxruntime as ort
    from safetensors.torch import save_file

    vae = seeded_vae("tiny", seed)
    lat = latents("smooth", 14, 11, vae.config.scaling_factor, seed + 3)
    # the same weights as bundles/tiny-sdxl's graph
    sess = ort.InferenceSession(str(REPO / "bundles" / "tiny-sdxl" / "vae_decoder.onnx"),
                                providers=["CPUExecutionProvider"])
    with torch.no_grad():
        whole = vae.decode(torch.from_numpy(lat), return_dict=False)[0].numpy()
    e = errors(sess.run(["image"], {"latent": lat})[0], whole)["rel_l2"]
    assert e < 1e-4, f"the seeded VAE is not bundles/tiny-sdxl's (relative error {e:.1e})"
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        tiled = vae.decode(torch.from_numpy(lat), return_dict=False)[0]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latent": torch.from_numpy(lat).contiguous(), "image": tiled.contiguous()},
              str(out / "tiled.safetensors"), metadata={"tile_sample": "64", "tile_latent": "8", "overlap": "0.25"})
    print(f"wrote {out / 'tiled.safetensors'}: latent {list(lat.shape)} → image {list(tiled.shape)}; "
          f"tiled vs whole: relative difference {errors(tiled.numpy(), whole)['rel_l2']:.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a --gpu bundle (its vae_decoder: fp16, fused)")
    ap.add_argument("--fp32-graph", type=Path, help="the fp32 VAE decoder of the same weights (default: exported here)")
    ap.add_argument("--config", choices=["tiny", "sdxl"], default="sdxl")
    ap.add_argument("--seed", type=int, default=1234, help="the bundle's export seed")
    ap.add_argument("--katz", type=Path, default=REPO / "target" / "release" / "katz")
    ap.add_argument("--device", default="cuda:0", help="katz's --device; diffusers runs on cuda:N or the CPU alike")
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--kinds", default="noise,smooth")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reference", type=Path, metavar="DIR", help="write the tiled-decode parity reference and stop")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.reference:
        return reference(a.reference, a.seed)
    if not a.bundle:
        ap.error("--bundle is needed")
    manifest = json.loads((a.bundle / "bundle.json").read_text())
    precision = manifest.get("vae_precision", "fp32")
    tile = int(manifest.get("vae_sample_size") or max(manifest["default_size"]))
    work = a.work or Path(tempfile.mkdtemp(prefix="vae-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vae = seeded_vae(a.config, a.seed)
    print(f"seeded {a.config} VAE (seed {a.seed}) in {time.perf_counter() - t0:.0f} s; bundle VAE: {precision}, "
          f"tiles of {tile} px")
    fp32 = a.fp32_graph
    if fp32 is None:
        fp32 = work / "vae_fp32.onnx"
        h = 16
        eb.export(eb.VaeDecoder(vae), [torch.randn(1, 4, h, h)], fp32, ["latent"], ["image"],
                  {"latent": eb.bs("batch", None, "height", "width"), "image": eb.spatial("image")})
        print(f"exported the fp32 VAE decoder: {fp32}")
    dev = "cpu" if a.device == "cpu" else "cuda:" + a.device.split(":")[-1]
    eager_dtype = torch.float16 if dev != "cpu" else torch.float32
    if dev != "cpu":
        torch.backends.cudnn.allow_tf32 = False  # the eager fp32 reference in full fp32
        torch.backends.cuda.matmul.allow_tf32 = False
    results = {"bundle": str(a.bundle), "vae_precision": precision, "tile_sample": tile, "device": a.device,
               "gpu": torch.cuda.get_device_name(0) if dev != "cpu" else None, "eager_dtype": str(eager_dtype),
               "sizes": {}}
    for size in [int(s) for s in a.sizes.split(",")]:
        h = size // manifest["vae_scale_factor"]
        per = {"tiled": h > tile // manifest["vae_scale_factor"], "kinds": {}}
        for k, kind in enumerate(a.kinds.split(",")):
            lat = latents(kind, h, h, manifest["scaling_factor"], a.seed + 100 + k)
            lp = work / f"latent-{size}-{kind}.npy"
            np.save(lp, lat)
            print(f"== {size}² ({'tiled' if per['tiled'] else 'whole'}), latent {kind}")
            timed = k == 0  # decode times do not depend on the values: timed once per size
            rep, wu = (a.repeat, a.warmup) if timed else (1, 0)
            r = {}
            try:
                j16 = katz_vae(a.katz, ["--bundle", str(a.bundle)], a.device, lp, work / "k16.npy",
                               work / "k16.json", tile, rep, wu)
                k16 = np.load(work / "k16.npy")
            except RuntimeError as e:
                if a.device != "cpu" or precision == "fp32":
                    raise
                print(f"   katz fp16 VAE on the CPU: not run ({str(e).splitlines()[-1]})")
                j16, k16 = None, None
            j32 = katz_vae(a.katz, ["--graph", str(fp32)], a.device, lp, work / "k32.npy", work / "k32.json",
                           tile, rep, wu)
            k32 = np.load(work / "k32.npy")
            vae.to(dev, eager_dtype)
            e16, e16_ms = eager(vae, lat, dev, eager_dtype, rep, wu)
            vae.to(dev, torch.float32)
            e32, _ = eager(vae, lat, dev, torch.float32, 1, 0)
            vae.to("cpu")
            r["katz_fp32_vs_eager_fp32"] = errors(k32, e32)
            r["eager_fp16_vs_eager_fp32"] = errors(e16, e32)
            if k16 is not None:
                r["katz_fp16_vs_katz_fp32"] = errors(k16, k32)
                r["katz_fp16_vs_eager_fp32"] = errors(k16, e32)
            if timed:
                per["katz_fp16_ms"] = j16["median_ms"] if j16 else None
                per["katz_fp32_ms"] = j32["median_ms"]
                per["eager_ms"] = round(e16_ms, 3)
                per["ratio_katz_fp16_to_eager"] = round(j16["median_ms"] / e16_ms, 3) if j16 else None
            for name, e in r.items():
                print(f"   {name:26s} max abs {e['max_abs']:.3e}  mean abs {e['mean_abs']:.3e}  "
                      f"rel L2 {e['rel_l2']:.3e}" + (f"  NON-FINITE {e['non_finite']}" if e["non_finite"] else ""))
            per["kinds"][kind] = r
        print(f"== {size}²: katz fp16 {per.get('katz_fp16_ms')} ms, katz fp32 {per['katz_fp32_ms']} ms, "
              f"eager diffusers {str(eager_dtype).split('.')[-1]} {per['eager_ms']} ms "
              f"(katz fp16 / eager = {per.get('ratio_katz_fp16_to_eager')}; goal ≤ 0.7)")
        results["sizes"][str(size)] = per
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
