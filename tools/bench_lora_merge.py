#!/usr/bin/env python3
"""The diffusers side of katz's LoRA-merge benchmark (`katz bench lora-merge`).

    python3 tools/bench_lora_merge.py --work DIR --out FILE.json [--ranks 64,128] [--config sdxl]

Data flow:

    tools/configs/sdxl.json ─▶ bench_diffusers.build(): SDXL (full size, seeded random weights) in
        fp16 on the GPU ─▶ StableDiffusionXLPipeline
    the UNet's attention (attn1/attn2 to_q, to_k, to_v, to_out.0) and feed-forward (ff.net.0.proj,
        ff.net.2) Linear layers ─▶ DIR/shapes.json   {"<module>.weight": [out, in]}: the names
        katz bundles use, for `katz bench lora-merge --shapes`
        ─▶ DIR/lora-r<R>-<i>.safetensors   (export_bundle.make_lora, diffusers/peft layout, fp16
           tensors as published LoRAs are, alpha = rank; i = 0, 1 for the two-LoRA set)
    per rank and set (one LoRA, two LoRAs): pipe.load_lora_weights(file) for each + set_adapters
        + fuse_lora, synchronized; one warm-up, then --repeat timed runs (median), unfuse and
        unload between runs ─▶ FILE.json

Needs torch with CUDA, transformers, peft and diffusers (the GPU machine carries diffusers as a
wheel: tools/device/bench-lora.sh). `--config tiny --device cpu` runs the same logic on the tiny
architecture for a quick check without a GPU.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_diffusers as bd  # noqa: E402  (build)
import export_bundle as eb  # noqa: E402  (configs, make_lora, TARGET_RE, SCHEDULER)

# The attention and feed-forward Linear layers of the transformer blocks: katz's targets
# (export_bundle.TARGET_RE) without proj_in / proj_out.
ATTN_FF_RE = re.compile(r"\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|\.ff\.net\.(0\.proj|2)$")


def target_names(unet) -> list[str]:
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ATTN_FF_RE.search(n)]
    missing = [n for n in names if not eb.TARGET_RE.search(n)]
    assert not missing, f"not katz-targetable: {missing[:3]}"
    return names


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the LoRA files and shapes.json go")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks", default="64,128")
    ap.add_argument("--sets", default="1,2", help="LoRAs per set")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.8)
    ap.add_argument("--config", choices=["sdxl", "tiny"], default="sdxl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)

    import diffusers
    import peft
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoders", per load

    dev = a.device
    dtype = torch.float16 if dev == "cuda" else torch.float32
    ranks = [int(r) for r in a.ranks.split(",")]
    sets = [int(n) for n in a.sets.split(",")]
    cfg = eb.sdxl_config() if a.config == "sdxl" else eb.tiny_config()
    t0 = time.perf_counter()
    tok, te, te2, unet, vae, _ = bd.build(cfg, 0, dtype, dev, a.seed)
    build_s = time.perf_counter() - t0
    sched = EulerDiscreteScheduler(**{k: v for k, v in eb.SCHEDULER.items()
                                      if k not in ("set_alpha_to_one", "clip_sample", "skip_prk_steps", "sample_max_value")})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    names = target_names(unet)
    shapes = {f"{n}.weight": list(unet.get_submodule(n).weight.shape) for n in names}
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "shapes.json").write_text(json.dumps(shapes, indent=0) + "\n")
    params = sum(o * i for o, i in shapes.values())
    print(f"{len(names)} attention + feed-forward layers, {params / 1e9:.3f} G parameters "
          f"(built in {build_s:.1f} s on {dev})", flush=True)

    files = {}
    for r in ranks:
        for i in range(max(sets)):
            p = a.work / f"lora-r{r}-{i}.safetensors"
            t0 = time.perf_counter()
            eb.make_lora(unet, p, rank=r, alpha=r, seed=a.seed + 50 + 10 * r + i, names=names, dtype=torch.float16)
            files[(r, i)] = p
            print(f"  wrote {p.name}: {p.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s", flush=True)

    # one layer to check that fuse_lora did what katz does: W + scale·(alpha/r)·B·A summed over LoRAs
    probe = names[0]

    def one_run(r, n, check=False):
        adapters = [f"l{i}" for i in range(n)]
        w0 = unet.get_submodule(probe).weight.detach().double().cpu() if check else None
        sync(dev)
        t0 = time.perf_counter()
        for i in range(n):
            pipe.load_lora_weights(str(files[(r, i)]), adapter_name=adapters[i])
        sync(dev)
        t1 = time.perf_counter()
        pipe.set_adapters(adapters, adapter_weights=[a.scale] * n)
        pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)
        sync(dev)
        t2 = time.perf_counter()
        layers = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and adapters[0] in m.lora_A)
        err = None
        if check:
            from safetensors.torch import load_file
            want = w0
            for i in range(n):
                sd = load_file(str(files[(r, i)]))
                b = sd[f"unet.{probe}.lora_B.weight"].double()
                aa = sd[f"unet.{probe}.lora_A.weight"].double()
                want = want + a.scale * (b @ aa)  # alpha = rank
            m = unet.get_submodule(probe)
            got = getattr(m, "base_layer", m).weight.detach().double().cpu()
            err = float((got - want).norm() / want.norm())
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        sync(dev)
        return t1 - t0, t2 - t1, layers, err

    results = {"bench": "lora-merge", "side": "diffusers", "machine": torch.cuda.get_device_name(0) if dev == "cuda"
               else "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
               "config": a.config, "dtype": str(dtype).replace("torch.", ""), "targets": "attention q/k/v/out + ff",
               "layers": len(names), "parameters": params, "scale": a.scale, "repeat": a.repeat,
               "lora_files": {f"r{r}-{i}": {"path": str(p), "bytes": p.stat().st_size} for (r, i), p in files.items()},
               "method": "per run: load_lora_weights for each LoRA, set_adapters, fuse_lora, synchronize; one "
                         "warm-up then the median of --repeat runs; unfuse_lora + unload_lora_weights between runs",
               "runs": []}
    for r in ranks:
        for n in sets:
            _, _, layers, err = one_run(r, n, check=True)  # warm-up, and the check
            runs = [one_run(r, n) for _ in range(a.repeat)]
            load = [x[0] * 1e3 for x in runs]
            fuse = [x[1] * 1e3 for x in runs]
            total = [(x[0] + x[1]) * 1e3 for x in runs]
            row = {"rank": r, "loras": n, "lora_layers": layers, "fuse_check_rel_err": err,
                   "load_ms": round(statistics.median(load), 2), "fuse_ms": round(statistics.median(fuse), 2),
                   "load_fuse_ms": round(statistics.median(total), 2), "load_fuse_min_ms": round(min(total), 2),
                   "load_fuse_all_ms": [round(x, 2) for x in total]}
            results["runs"].append(row)
            print(f"  rank {r:>4} × {n} LoRA(s): load {row['load_ms']:>9.1f} ms  fuse {row['fuse_ms']:>8.1f} ms  "
                  f"total {row['load_fuse_ms']:>9.1f} ms  ({layers} layers, fuse check {err:.1e})", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
