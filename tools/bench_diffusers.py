#!/usr/bin/env python3
"""The diffusers baseline of katz's GPU benchmark: SDXL (full size, seeded random weights — the
arithmetic is that of the real model) in PyTorch fp16 with SDPA, diffusers' MultiControlNet and
`load_lora_weights` + `fuse_lora`, on one GPU. Writes JSON (docs/bench/) and prints a table.

    python3 tools/bench_diffusers.py [--size 1024] [--steps 50] [--configs 0c0l,1c1l,3c2l] [--out FILE]

Per configuration: text encoders, UNet step (batch 2, median of 20 timed calls of the UNet
alone), ControlNet step (batch 2), VAE decode, LoRA load + fuse, and the end-to-end pipeline call
(LoRA loading included, as a serving system pays it per request). `--compile reduce-overhead`
(comma-separated torch.compile modes; `channels-last:` before a mode puts the UNet in
channels_last first) also times the UNet step under torch.compile — the peer a performance-minded
team runs — with its compile time, under "compiled" in the JSON; `--configs none` skips the
pipelines. Needs torch with CUDA,
transformers, peft and diffusers (the GPU host carries diffusers as a wheel:
tools/device/bench-diffusers.sh).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_bundle as eb  # noqa: E402  (configs, tokenizer, LoRA writer)


def sync_time(fn, n=1):
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, times


def compiled_step(unet, mode, x, t, ehs, added):
    """The UNet step (batch 2) under torch.compile(mode): compile time (the first call), then the
    median of 20 calls after 5 warm ones. `channels-last:<mode>` converts the UNet first (and back
    after)."""
    channels_last = mode.startswith("channels-last:")
    m = mode.split(":", 1)[1] if channels_last else mode
    torch._dynamo.reset()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    fn = torch.compile(unet, mode=m, fullgraph=False)
    _, first = sync_time(lambda: fn(x, t, ehs, added_cond_kwargs=added), 1)
    sync_time(lambda: fn(x, t, ehs, added_cond_kwargs=added), 5)
    _, ts = sync_time(lambda: fn(x, t, ehs, added_cond_kwargs=added), 20)
    if channels_last:
        unet.to(memory_format=torch.contiguous_format)
    r = {"unet_step_ms_batch2": round(statistics.median(ts) * 1e3, 2), "compile_s": round(first[0], 1),
         "min_ms": round(min(ts) * 1e3, 2)}
    print(f"  torch.compile({mode}): {r['unet_step_ms_batch2']} ms a step, compiled in {r['compile_s']} s", flush=True)
    del fn
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return r


def build(cfg, n_controlnets, dtype, device, seed):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = eb.build_tokenizer(cfg["vocab_size"])
    tmp = Path(tempfile.mkdtemp())
    tok.save(str(tmp / "tokenizer.json"))
    ids = dict(bos_token_id=tok.token_to_id("<|startoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
               pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(seed)
    with torch.device(device):
        common = dict(vocab_size=cfg["vocab_size"], max_position_embeddings=eb.MAX_LEN, **ids)
        te = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **common}))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **common}))
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        cns = []
        for i in range(n_controlnets):
            torch.manual_seed(seed + 1 + i)
            cn = ControlNetModel.from_unet(unet, conditioning_channels=3, **cfg["controlnet"])
            for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
                m.reset_parameters()
            cns.append(cn)
    mods = [te, te2, unet, vae, *cns]
    for m in mods:
        m.to(dtype).eval().requires_grad_(False)
    return eb.hf_tokenizer(tmp / "tokenizer.json"), te, te2, unet, vae, cns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--configs", default="0c0l,1c1l,3c2l")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lora-dir", type=Path, help="where to write the LoRA files (katz's benchmark reads the same ones)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--compile", default="", help="torch.compile modes for the UNet step: reduce-overhead,"
                    "max-autotune,default; prefix one with channels-last: (none by default)")
    a = ap.parse_args(argv)

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from PIL import Image

    dev, dtype = "cuda", torch.float16
    torch.backends.cuda.matmul.allow_tf32 = True
    configs = [] if a.configs in ("", "none") else [(c, int(c[0]), int(c[2])) for c in a.configs.split(",")]
    max_cn = max((c[1] for c in configs), default=0)
    cfg = eb.sdxl_config()
    t0 = time.perf_counter()
    tok, te, te2, unet, vae, cns = build(cfg, max_cn, dtype, dev, a.seed)
    build_s = time.perf_counter() - t0
    sched = EulerDiscreteScheduler(**{k: v for k, v in eb.SCHEDULER.items()
                                      if k not in ("set_alpha_to_one", "clip_sample", "skip_prk_steps", "sample_max_value")})
    h = a.size // 8
    B = 2
    C = unet.config.cross_attention_dim
    P = te2.config.projection_dim
    ehs = torch.randn(B, 77, C, device=dev, dtype=dtype)
    added = {"text_embeds": torch.randn(B, P, device=dev, dtype=dtype),
             "time_ids": torch.tensor([[a.size, a.size, 0, 0, a.size, a.size]] * B, device=dev, dtype=dtype)}
    x = torch.randn(B, 4, h, h, device=dev, dtype=dtype)
    t = torch.tensor([500.0] * B, device=dev)
    cond_img = torch.rand(B, 3, a.size, a.size, device=dev, dtype=dtype)
    with torch.no_grad():
        sync_time(lambda: unet(x, t, ehs, added_cond_kwargs=added), 3)
        _, ut = sync_time(lambda: unet(x, t, ehs, added_cond_kwargs=added), 20)
        cn_ms = None
        if cns:
            sync_time(lambda: cns[0](x, t, ehs, controlnet_cond=cond_img, added_cond_kwargs=added, return_dict=False), 3)
            _, ct = sync_time(lambda: cns[0](x, t, ehs, controlnet_cond=cond_img, added_cond_kwargs=added,
                                            return_dict=False), 20)
            cn_ms = statistics.median(ct) * 1e3
        compiled = {}
        for mode in [m for m in a.compile.split(",") if m]:
            compiled[mode] = compiled_step(unet, mode, x, t, ehs, added)
        lat = torch.randn(1, 4, h, h, device=dev, dtype=dtype)
        sync_time(lambda: vae.decode(lat / vae.config.scaling_factor), 2)
        _, vt = sync_time(lambda: vae.decode(lat / vae.config.scaling_factor), 5)
    prompt = "a red circle above a blue square on a white background"
    loras_dir = a.lora_dir or Path(tempfile.mkdtemp())
    loras_dir.mkdir(parents=True, exist_ok=True)
    lora_files = [eb.make_lora(unet, loras_dir / f"lora{i}.safetensors", rank=a.lora_rank, alpha=a.lora_rank,
                               seed=a.seed + 50 + i) for i in range(2)]
    cond_pil = Image.fromarray((torch.rand(a.size, a.size, 3) * 255).byte().numpy())
    results = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "diffusers": __import__("diffusers").__version__, "size": a.size, "steps": a.steps,
               "guidance": a.guidance, "dtype": "float16", "build_s": round(build_s, 1),
               "unet_step_ms_batch2": round(statistics.median(ut) * 1e3, 2),
               "controlnet_step_ms_batch2": None if cn_ms is None else round(cn_ms, 2),
               "vae_decode_ms": round(statistics.median(vt) * 1e3, 2), "compiled": compiled, "configs": {}}
    for name, n_cn, n_lora in configs:
        common = dict(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                      scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
        if n_cn:
            cnm = cns[0] if n_cn == 1 else MultiControlNetModel(cns[:n_cn])
            pipe = StableDiffusionXLControlNetPipeline(controlnet=cnm, **common)
        else:
            pipe = StableDiffusionXLPipeline(**common)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt=prompt, height=a.size, width=a.size, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, output_type="np")
        if n_cn:
            kw["image"] = cond_pil if n_cn == 1 else [cond_pil] * n_cn
            kw["controlnet_conditioning_scale"] = 0.8 if n_cn == 1 else [0.8] * n_cn

        def one_request():
            t_l = 0.0
            if n_lora:
                t0 = time.perf_counter()
                for i in range(n_lora):
                    pipe.load_lora_weights(str(lora_files[i]), adapter_name=f"l{i}")
                pipe.set_adapters([f"l{i}" for i in range(n_lora)], adapter_weights=[0.7] * n_lora)
                pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(n_lora)], lora_scale=1.0)
                torch.cuda.synchronize()
                t_l = time.perf_counter() - t0
            g = torch.Generator(device=dev).manual_seed(0)
            with torch.no_grad():
                _, tt = sync_time(lambda: pipe(generator=g, **kw))
            if n_lora:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
            return t_l, tt[0]

        one_request()  # warm-up
        runs = [one_request() for _ in range(2)]
        with torch.no_grad():
            _, tet = sync_time(lambda: pipe.encode_prompt(prompt, device=dev, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True), 5)
        lora_s = statistics.median(r[0] for r in runs)
        gen_s = statistics.median(r[1] for r in runs)
        results["configs"][name] = {
            "controlnets": n_cn, "loras": n_lora,
            "text_encoders_ms": round(statistics.median(tet) * 1e3, 2),
            "lora_load_fuse_ms": round(lora_s * 1e3, 1),
            "pipeline_s": round(gen_s, 3),
            "end_to_end_s": round(gen_s + lora_s, 3),
            "per_step_ms_estimate": round((gen_s - statistics.median(vt) - statistics.median(tet)) / a.steps * 1e3, 2),
        }
        del pipe
        torch.cuda.empty_cache()
    print(f"diffusers baseline on {results['machine']} ({a.size}², {a.steps} Euler steps, fp16, SDPA)")
    print(f"  UNet step (batch 2, median of 20): {results['unet_step_ms_batch2']} ms;"
          f" ControlNet step: {results['controlnet_step_ms_batch2']} ms; VAE decode: {results['vae_decode_ms']} ms")
    for mode, r in compiled.items():
        print(f"  UNet step under torch.compile({mode}): {r['unet_step_ms_batch2']} ms"
              f" (compile {r['compile_s']} s, first call included)")
    print(f"  {'config':<7} {'text enc':>9} {'LoRA load+fuse':>15} {'per step':>9} {'end-to-end':>11}")
    for name, r in results["configs"].items():
        print(f"  {name:<7} {r['text_encoders_ms']:>7.1f}ms {r['lora_load_fuse_ms']:>13.1f}ms "
              f"{r['per_step_ms_estimate']:>7.1f}ms {r['end_to_end_s']:>10.2f}s")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
