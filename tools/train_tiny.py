#!/usr/bin/env python3
"""Trains katz's tiny model family on the synthetic shapes dataset, so that its
pictures can be judged: a VAE, the SDXL-structured base (two CLIP text encoders and a UNet with the
text-time embedding, as export_bundle.tiny_config() builds it, wider), a ControlNet on edge maps and
two style LoRAs ("stripes", "pastel").

    tools/train_tiny.py all --device cuda --out build/tiny-ckpt --samples   # GPU: ~16 min (caps below)
    tools/train_tiny.py all --smoke --device cpu --out /tmp/tiny-ckpt --samples  # a few steps of each
    tools/train_tiny.py controlnet lora --out build/tiny-ckpt                 # stages on a checkpoint
    tools/export.sh --checkpoint build/tiny-ckpt --out /tmp/trained-sdxl      # → katz bundles

(tools/device/train-tiny.sh runs it on the GPU machine, in two calls of < 10 minutes.)

Data flow:

    shapes.dataset, 128² px: images, captions, edge maps; a second set stylized per style
        │  (rendered once per run by all CPU cores, held as uint8 tensors on the device)
        ├─ vae         AutoencoderKL (factor 8: 16×16×4 latents) on plain + stylized images;
        │              L1 (objects' pixels weighted 1 + --vae-fg-weight) + image-gradient L1 + a
        │              light KL; scaling_factor := 1/std(latents)
        ├─ base        latents ─▶ DDPM noise (export_bundle.SCHEDULER: scaled-linear β, 1000 steps)
        │              ─▶ UNet ε-prediction, min-SNR-5 weighting; the text encoders learn with it;
        │              SDXL time_ids (S, S, 0, 0, S, S) for S = 128 and, one step in five, 64;
        │              10 % of captions dropped to zero embeddings (what force_zeros_for_empty_prompt
        │              feeds the unconditional half of guidance); EMA weights are saved
        ├─ controlnet  ControlNetModel.from_unet(UNet); UNet and text encoders frozen; edges (randomly
        │              thickened, so thicker outlines than the dataset's also work) ─▶ same ε loss
        └─ lora        per style: peft LoRA on export_bundle.TARGET_RE's Linears (the bundle's
                       LoRA-targetable weights), stylized images with the same captions

    OUT/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ unet/ vae/ scheduler/ model_index.json
         (StableDiffusionXLPipeline.from_pretrained(OUT) loads it), controlnet/,
         loras/<style>.safetensors      diffusers/peft layout (save_lora_weights: `unet.` prefix,
                                        alpha in the `lora_adapter_metadata` metadata)
         loras/<style>-kohya.safetensors  kohya layout: lora_unet_<module, '.'→'_'>.lora_down/up.weight, .alpha
         samples/<stage>.png (--samples), train_log.json (losses, steps, timings, sample metrics)

Each stage stops at its step count or its --<stage>-minutes, whichever comes first; the learning
rate follows the further of the two (warm-up, then cosine down to 10 %), so a time-capped run still
anneals. Stages read what earlier stages wrote into OUT, so they can run in separate processes.

The tokenizer is export_bundle.build_tokenizer with the dataset's words added (every caption word
is one token); it is saved in the checkpoint and export_bundle.py --checkpoint takes it from there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import export_bundle as eb  # noqa: E402
from shapes import dataset as shapes  # noqa: E402

STAGES = ("vae", "base", "controlnet", "lora")
DEMO_PROMPT = "a red circle above a blue square on a white background"  # `katz demo`'s default
DEMO_EDGES = TOOLS.parent / "bundles" / "shapes" / "examples" / "red-circle-above-blue-square-edges.png"  # katz demo's (tools/test_demo.py)
FIXED_PROMPTS = [
    DEMO_PROMPT,
    "a yellow star on a black background",
    "a green triangle left of a purple circle on a gray background",
    "a blue circle, a red star and a yellow square on a white background",
]


# ───────────────────────────── configuration ─────────────────────────────


def family_config() -> dict:
    """export_bundle.tiny_config() — SDXL's structure — with the widths that can learn shapes,
    colours and positions: UNet 24/48/48 (was 16/32/32), text encoders 32 wide (16), VAE
    16/32/32/48 (8/16/16/16). About 14 MB of fp32 bundles with the ControlNet, 15 with the LoRAs."""
    cfg = eb.tiny_config()
    hidden = 32
    time_dim = cfg["unet"]["addition_time_embed_dim"]
    cfg["unet"].update(block_out_channels=(24, 48, 48), cross_attention_dim=2 * hidden,
                       projection_class_embeddings_input_dim=hidden + 6 * time_dim)
    for k in ("text_encoder", "text_encoder_2"):
        cfg[k].update(hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden)
    cfg["vae"].update(block_out_channels=(16, 32, 32, 48), norm_num_groups=8)
    cfg["controlnet"] = dict(conditioning_embedding_out_channels=(16, 16, 32, 32))
    return cfg


@dataclass
class StageArgs:
    steps: int
    minutes: float
    batch: int
    lr: float


# Step counts are upper bounds: on the GPU the minutes bind (13.5 min of training, ~16 min in all).
DEFAULTS = {
    "vae": StageArgs(steps=30000, minutes=3.0, batch=96, lr=1e-3),
    "base": StageArgs(steps=60000, minutes=5.5, batch=1024, lr=8e-4),
    "controlnet": StageArgs(steps=30000, minutes=3.0, batch=512, lr=5e-4),
    "lora": StageArgs(steps=10000, minutes=1.5, batch=512, lr=1e-3),  # per style
}
SMOKE = {k: StageArgs(steps=3, minutes=1.0, batch=4, lr=v.lr) for k, v in DEFAULTS.items()}


# ───────────────────────────── tokenizer ─────────────────────────────


def dataset_words() -> list[str]:
    """Every word the dataset's captions use."""
    return sorted(shapes.WORDS)


def make_tokenizer():
    tok = eb.build_tokenizer(eb.tiny_config()["vocab_size"], extra_words=dataset_words())
    for w in dataset_words():
        pieces = tok.encode(w).tokens[1:-1]
        pieces = pieces[:pieces.index("<|endoftext|>")] if "<|endoftext|>" in pieces else pieces
        assert len(pieces) == 1, f"dataset word {w!r} is not one token: {pieces}"
    return tok


def token_ids(tok) -> dict:
    return dict(bos_token_id=tok.token_to_id("<|startoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
                pad_token_id=tok.token_to_id("<|endoftext|>"))


def save_tokenizers(tok, out: Path):
    """tokenizer/ and tokenizer_2/ as transformers saves them, with the builder's own tokenizer.json
    (padding and truncation to 77 included) — the file the exporter copies into the bundle."""
    with_file = out / "tokenizer" / "tokenizer.json"
    with_file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(with_file))
    hf = eb.hf_tokenizer(with_file)
    for sub in ("tokenizer", "tokenizer_2"):
        hf.save_pretrained(str(out / sub))
        tok.save(str(out / sub / "tokenizer.json"))
    return hf


# ───────────────────────────── data ─────────────────────────────


def _render(job):
    """One chunk of a set (runs in a worker process): images, edges, captions, stylized copies."""
    seed, n, size, styles = job
    samples = shapes.dataset(seed, n, size)
    return (np.stack([s.image for s in samples]), np.stack([s.edges[..., 0] for s in samples]),
            [s.caption for s in samples],
            {st: np.stack([shapes.stylize(s.image, st, s.mask) for s in samples]) for st in styles})


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 3, S, S] uint8, on the training device
    edges: torch.Tensor  # [N, 1, S, S] uint8 (255 = outline)
    ids: torch.Tensor  # [N, 77] int64 token ids
    captions: list[str]
    styled: dict[str, torch.Tensor] = field(default_factory=dict)  # style → [N, 3, S, S] uint8

    def __len__(self):
        return len(self.captions)


def render_set(seed: int, n: int, size: int, styles, workers: int):
    """A set as numpy arrays, rendered in `workers` forked processes (before any CUDA work)."""
    chunk = 500
    jobs = [(seed * 100_000 + k, min(chunk, n - k * chunk), size, tuple(styles)) for k in range((n + chunk - 1) // chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render, jobs)
    else:
        parts = [_render(j) for j in jobs]
    return parts


def to_image_set(parts, styles, tok, device) -> ImageSet:
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    captions = [c for p in parts for c in p[2]]
    encoded = tok.encode_batch(captions)
    for c, e in zip(captions, encoded):  # one token per word (and comma), none cut off
        n = e.tokens.index("<|endoftext|>") - 1 if "<|endoftext|>" in e.tokens else len(e.tokens)
        assert n == len(c.replace(",", " ,").split()), f"caption {c!r} tokenizes as {e.tokens[:n + 2]}"
    ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
    return ImageSet(
        images=to_t(np.concatenate([p[0] for p in parts]).transpose(0, 3, 1, 2)),
        edges=to_t(np.concatenate([p[1] for p in parts])[:, None]),
        ids=ids.to(device), captions=captions,
        styled={st: to_t(np.concatenate([p[3][st] for p in parts]).transpose(0, 3, 1, 2)) for st in styles})


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]"""
    return x_u8.float().div_(127.5).sub_(1.0)


def foreground(x: torch.Tensor, tol: float = 0.08) -> torch.Tensor:
    """[B, 1, H, W] 1 where a pixel differs from its image's background (the top-left pixel: the
    dataset keeps objects off the corners) in any channel; x in [-1, 1]."""
    return ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > tol).float()


def foreground_colour_error(rec: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of |mean colour of the objects in rec − in x| (L1 over RGB, [-1, 1] units),
    the objects being x's foreground: 0 when the VAE keeps every object's colour."""
    m = foreground(x)
    n = m.sum(dim=(2, 3)).clamp(min=1.0)
    mean = lambda t: (t * m).sum(dim=(2, 3)) / n  # noqa: E731  [B, 3]
    return float((mean(rec) - mean(x)).abs().sum(dim=1).mean())


# ───────────────────────────── training machinery ─────────────────────────────


class Ema:
    """Exponential moving average of parameters (decay warms up as (1+n)/(10+n))."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


class Diffusion:
    """The training side of the bundle's scheduler: DDPM forward noise on SCHEDULER's betas."""

    def __init__(self, device):
        from diffusers import DDPMScheduler

        s = eb.SCHEDULER
        sched = DDPMScheduler(num_train_timesteps=s["num_train_timesteps"], beta_start=s["beta_start"],
                              beta_end=s["beta_end"], beta_schedule=s["beta_schedule"],
                              prediction_type=s["prediction_type"])
        self.T = s["num_train_timesteps"]
        self.ab = sched.alphas_cumprod.to(device=device, dtype=torch.float32)

    def noised(self, z):
        t = torch.randint(0, self.T, (z.shape[0],), device=z.device)
        ab = self.ab[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(z)
        snr = ab / (1 - ab)
        weight = snr.clamp(max=5.0) / snr  # min-SNR-5 for ε-prediction
        return ab.sqrt() * z + (1 - ab).sqrt() * noise, t, noise, weight.view(-1)


_TIME_IDS: dict = {}


def time_ids(size: int, n: int, device) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop (0, 0), target size (made once per shape:
    no host-to-device copy in the training step)."""
    key = (size, n, str(device))
    if key not in _TIME_IDS:
        _TIME_IDS[key] = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device).expand(n, 6)
    return _TIME_IDS[key]


def encode_text(te, te2, ids):
    """StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
    concatenated; the pooled (projected) output of the second."""
    o1 = te(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds


def drop_captions(ehs, pooled, p: float):
    """Zero the conditioning of a fraction p of the batch (the unconditional branch of guidance)."""
    keep = (torch.rand(ehs.shape[0], device=ehs.device) >= p).to(ehs.dtype)
    return ehs * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)


class Run:
    """Shared state of one invocation: arguments, device, data, the log."""

    def __init__(self, a):
        self.a = a
        self.out: Path = a.out
        self.dev = torch.device(a.device)
        self.cuda = self.dev.type == "cuda"
        self.cfg = family_config()
        self.tok = make_tokenizer()
        self.ids = token_ids(self.tok)
        self.log_path = self.out / "train_log.json"
        self.log = json.loads(self.log_path.read_text()) if self.log_path.exists() else {"stages": {}}
        self.log["config"] = {"unet": {k: v for k, v in self.cfg["unet"].items()},
                              "vae_channels": self.cfg["vae"]["block_out_channels"],
                              "text_hidden": self.cfg["text_encoder"]["hidden_size"], "size": a.size,
                              "smoke": a.smoke}
        self.wrote: set[str] = set()  # stage labels this process wrote (save_log merges by them)
        self.t_start = time.perf_counter()
        self.units_left = 0  # trainings still to start (a LoRA per style), for --deadline
        self.base_set: ImageSet | None = None
        self.style_set: ImageSet | None = None
        self.eval_set: ImageSet | None = None

    def load_data(self, stages):
        """Renders every set the stages need first (the workers fork a process with no CUDA
        state in use), then moves them to the device."""
        a, t0 = self.a, time.perf_counter()
        specs = {"eval": (a.seed * 10 + 3, 8, a.styles, 1)}
        if {"vae", "base", "controlnet"} & set(stages):
            specs["base"] = (a.seed * 10 + 1, a.n_base, (), a.workers)
        if {"vae", "lora"} & set(stages):
            specs["style"] = (a.seed * 10 + 2, a.n_style, a.styles, a.workers)
        parts = {k: render_set(seed, n, a.size, styles, w) for k, (seed, n, styles, w) in specs.items()}
        t1 = time.perf_counter()
        sets = {k: to_image_set(parts.pop(k), specs[k][2], self.tok, self.dev) for k in list(parts)}
        self.base_set, self.style_set, self.eval_set = sets.get("base"), sets.get("style"), sets["eval"]
        self.log["config"]["device"] = torch.cuda.get_device_name() if self.cuda else "cpu"
        print(f"data: {a.n_base if self.base_set else 0} images and {a.n_style if self.style_set else 0} × "
              f"{len(a.styles)} stylized at {a.size}² rendered in {t1 - t0:.1f} s, on the device "
              f"{time.perf_counter() - t1:.1f} s later", flush=True)

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def stage_args(self, stage: str) -> StageArgs:
        return getattr(self.a, f"{stage}_args")

    def train(self, stage: str, params, step_fn, ema: Ema | None = None, label: str | None = None) -> dict:
        """The loop every stage shares: AdamW, warm-up + cosine on max(step, time) progress, grad
        clipping, optional EMA, loss logging. A non-finite mean loss at a log point restores the
        weights of the last good one, clears the optimizer state and halves the learning rate."""
        sa = self.stage_args(stage)
        label = label or stage
        params = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=sa.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                **({"fused": True} if self.cuda else {}))
        warm = min(300, max(1, sa.steps // 20))
        budget = sa.minutes * 60
        if self.a.deadline:
            left = self.a.deadline * 60 - (time.perf_counter() - self.t_start) - 30 * self.units_left
            if left < budget:
                budget = max(left, 6.0)
                print(f"{label}: --deadline leaves {budget / 60:.2f} min of training", flush=True)
        self.units_left = max(0, self.units_left - 1)
        every = 1 if self.a.smoke else 100
        history, running, seen = [], torch.zeros((), device=self.dev), 0
        good = [p.detach().clone() for p in params]  # the weights at the last finite log point
        lr_scale, recoveries = 1.0, 0

        def logged(step: int) -> float:
            nonlocal lr_scale, recoveries
            mean = float(running) / seen  # syncs with the device once per `every` steps
            with torch.no_grad():
                if math.isfinite(mean):
                    torch._foreach_copy_(good, [p.detach() for p in params])
                    return mean
                torch._foreach_copy_(params, good)
                if ema is not None:
                    torch._foreach_copy_(ema.shadow, good)
            opt.state.clear()
            lr_scale, recoveries = lr_scale / 2, recoveries + 1
            print(f"  {label} step {step}: non-finite loss — back to the weights of the last log point, "
                  f"learning rate halved", flush=True)
            return mean

        n_params = sum(p.numel() for p in params)
        print(f"{label}: {n_params / 1e6:.2f} M trainable parameters, batch {sa.batch}, lr {sa.lr:g}, "
              f"≤ {sa.steps} steps, ≤ {budget / 60:.2f} min", flush=True)
        t0 = time.perf_counter()
        step = 0
        while step < sa.steps:
            elapsed = time.perf_counter() - t0
            progress = max(step / sa.steps, elapsed / budget)
            if progress >= 1:
                break
            lr = lr_scale * sa.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for g in opt.param_groups:
                g["lr"] = lr
            with self.autocast():
                loss = step_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                ema.update(step)
            running += loss.detach().float()
            seen += 1
            step += 1
            if step % every == 0 or step == sa.steps:
                mean = logged(step)
                history.append([step, round(mean, 5)])
                print(f"  {label} step {step:6d}  loss {mean:.4f}  lr {lr:.2e}  "
                      f"{step / (time.perf_counter() - t0):6.1f} it/s  {(time.perf_counter() - t0) / 60:5.2f} min",
                      flush=True)
                running.zero_()
                seen = 0
        if seen:
            history.append([step, round(logged(step), 5)])
        if ema is not None:
            ema.copy_to_params()
        secs = time.perf_counter() - t0
        rec = {"steps": step, "seconds": round(secs, 1), "it_per_s": round(step / max(secs, 1e-9), 2),
               "batch": sa.batch, "lr": sa.lr, "final_loss": history[-1][1] if history else None,
               "loss": history, "parameters": n_params, "nonfinite_recoveries": recoveries}
        print(f"{label}: {step} steps in {secs / 60:.2f} min, final loss {rec['final_loss']}", flush=True)
        self.log["stages"][label] = rec
        self.wrote.add(label)
        self.save_log()
        return rec

    def save_log(self):
        """Writes the log, merged with what other processes wrote meanwhile: stages may train in
        parallel processes on one checkpoint (tools/device/train-tiny.sh par), each keeping the
        stages it wrote itself; the file is locked while it is read and replaced."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".train_log.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(self.log_path.read_text()) if self.log_path.exists() else {"stages": {}}
            for label in self.wrote:
                mine, theirs = self.log["stages"][label], disk.setdefault("stages", {}).get(label)
                if label == "lora_samples" and theirs:  # one process per style: merge the scores
                    for k, v in mine["style_score"].items():
                        t = theirs["style_score"].setdefault(k, {} if isinstance(v, dict) else v)
                        if isinstance(v, dict):
                            t.update(v)
                        else:
                            theirs["style_score"][k] = v
                    mine = theirs
                disk["stages"][label] = mine
            for k, v in self.log.items():
                if k not in ("stages", "runs"):
                    disk[k] = v
            runs = disk.setdefault("runs", [])
            runs += [r for r in self.log.get("runs", []) if r not in runs]
            tmp = self.log_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk, indent=1) + "\n")
            tmp.replace(self.log_path)
            self.log = disk

    # ── checkpoint pieces ──
    def load_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.out / "vae").to(self.dev).eval().requires_grad_(False)

    def load_base(self):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        te = CLIPTextModel.from_pretrained(self.out, subfolder="text_encoder")
        te2 = CLIPTextModelWithProjection.from_pretrained(self.out, subfolder="text_encoder_2")
        unet = UNet2DConditionModel.from_pretrained(self.out, subfolder="unet")
        return [m.to(self.dev).eval().requires_grad_(False) for m in (te, te2, unet)]

    @torch.no_grad()
    def encode_images(self, vae, images_u8: torch.Tensor, size: int | None = None):
        """Latent distributions (mean, std) of a set, optionally area-downsampled to `size` first."""
        means, stds = [], []
        for i in range(0, len(images_u8), 256):
            x = to_unit(images_u8[i:i + 256])
            if size and size != x.shape[-1]:
                x = F.interpolate(x, size=(size, size), mode="area")
            with self.autocast():
                d = vae.encode(x).latent_dist
            means.append(d.mean.float())
            stds.append(d.std.float())
        return torch.cat(means), torch.cat(stds)

    def scheduler(self):
        from diffusers import EulerDiscreteScheduler

        s = {k: v for k, v in eb.SCHEDULER.items() if k not in ("set_alpha_to_one", "clip_sample", "skip_prk_steps",
                                                                 "sample_max_value")}
        sched = EulerDiscreteScheduler(**s)
        sched.register_to_config(set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True, sample_max_value=1.0)
        return sched


# ───────────────────────────── stages ─────────────────────────────


def stage_vae(run: Run):
    from diffusers import AutoencoderKL

    a, sa = run.a, run.stage_args("vae")
    torch.manual_seed(a.seed * 100 + 1)
    vae = AutoencoderKL(**run.cfg["vae"]).to(run.dev).train()
    pools = [run.base_set.images] + [run.style_set.styled[s] for s in a.styles]
    weights = torch.tensor([0.6] + [0.4 / len(a.styles)] * len(a.styles))

    fg_w = a.vae_fg_weight

    def step(i):
        src = pools[int(torch.multinomial(weights, 1))]
        x = to_unit(src[torch.randint(0, len(src), (sa.batch,), device=run.dev)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample.float()
        # the shapes are a few percent of the pixels: unweighted, the background dominates the
        # loss and the first run's VAE kept only an orange–teal axis of the objects' colours
        w = 1.0 + fg_w * foreground(x)
        l1 = ((rec - x).abs() * w).mean() / w.mean()
        grad = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
        kl = post.kl().mean() / post.mean[0].numel()
        return l1 + 0.5 * grad + 1e-5 * kl

    run.train("vae", vae.parameters(), step)
    vae.eval().requires_grad_(False)
    # scaling_factor: latents (sampled) of unit standard deviation, as SD's 0.18215 / SDXL's 0.13025 were set
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    pick = lambda s: s[torch.randperm(len(s), generator=g)[:2048].to(s.device)]  # noqa: E731
    m, sd = run.encode_images(vae, torch.cat([pick(p) for p in pools]))
    z = m + sd * torch.randn_like(m)
    std = float(z.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    print(f"vae: latent std {std:.3f} → scaling_factor {vae.config.scaling_factor}; latent mean {float(z.mean()):+.3f}")
    vae.save_pretrained(run.out / "vae")
    run.log["stages"]["vae"].update(scaling_factor=vae.config.scaling_factor, latent_std=round(std, 4))
    # reconstruction quality on held-out images
    with torch.no_grad():
        x = to_unit(run.eval_set.images)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
        fg_err = foreground_colour_error(rec, x)
    run.log["stages"]["vae"]["eval_psnr_db"] = round(psnr, 2)
    run.log["stages"]["vae"]["eval_foreground_colour_error"] = round(fg_err, 4)
    run.log["stages"]["vae"]["fg_weight"] = fg_w
    print(f"vae: held-out reconstruction PSNR {psnr:.1f} dB; objects' mean colour off by {fg_err:.3f} "
          "(L1 over RGB in [-1, 1] units; 0 = every object's colour kept)")
    run.save_log()
    if a.samples:
        from PIL import Image

        rows = [("image", [(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), "") for im in run.eval_set.images]),
                ("VAE", [(to_pil(r), "") for r in rec])]
        for st in a.styles:
            xs = to_unit(run.eval_set.styled[st])
            with torch.no_grad():
                rs = vae.decode(vae.encode(xs).latent_dist.mode()).sample.clamp(-1, 1)
            rows += [(st, [(to_pil(r), "") for r in xs]), (f"VAE {st}", [(to_pil(r), "") for r in rs])]
        save_grid(run.out / "samples" / "vae.png", rows)


def stage_base(run: Run):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    a, sa, cfg = run.a, run.stage_args("base"), run.cfg
    torch.manual_seed(a.seed * 100 + 2)
    vae = run.load_vae()
    if a.resume and (run.out / "unet" / "config.json").exists():
        te, te2, unet = run.load_base()
        print("base: resuming from the checkpoint's text encoders and UNet")
    else:
        common = dict(vocab_size=len(run.tok.get_vocab()), max_position_embeddings=eb.MAX_LEN, **run.ids)
        te = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **common}))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **common}))
        unet = UNet2DConditionModel(**cfg["unet"])
    models = [m.to(run.dev).train().requires_grad_(True) for m in (te, te2, unet)]
    sf = vae.config.scaling_factor
    data = run.base_set
    lat = {a.size: run.encode_images(vae, data.images)}
    small = a.size // 2
    mixed = a.small_every > 0 and a.size == 128  # 64² too; 32² (4×4 latents) would teach nothing
    if mixed:
        lat[small] = run.encode_images(vae, data.images, small)
    del vae
    diff = Diffusion(run.dev)
    params = [p for m in models for p in m.parameters()]
    ema = Ema(params, a.ema)

    def step(i):
        size = small if mixed and i % a.small_every == a.small_every - 1 else a.size
        idx = torch.randint(0, len(data), (sa.batch,), device=run.dev)
        m, s = lat[size]
        z = (m[idx] + s[idx] * torch.randn_like(s[idx])) * sf
        ehs, pooled = encode_text(te, te2, data.ids[idx])
        ehs, pooled = drop_captions(ehs, pooled, a.caption_dropout)
        noisy, t, noise, w = diff.noised(z)
        pred = unet(noisy, t, ehs, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(size, len(z), run.dev)}).sample
        return (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    run.train("base", params, step, ema=ema)
    for m in models:
        m.eval().requires_grad_(False)
    hf = save_tokenizers(run.tok, run.out)
    pipe = StableDiffusionXLPipeline(vae=run.load_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=hf,
                                     tokenizer_2=hf, unet=unet, scheduler=run.scheduler(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(str(run.out))
    save_tokenizers(run.tok, run.out)  # the builder's tokenizer.json over the one save_pretrained wrote
    check_encoding(run)
    if a.samples:
        samples_base(run)


def stage_controlnet(run: Run):
    from diffusers import ControlNetModel

    a, sa = run.a, run.stage_args("controlnet")
    torch.manual_seed(a.seed * 100 + 3)
    te, te2, unet = run.load_base()
    vae = run.load_vae()
    sf = vae.config.scaling_factor
    data = run.base_set
    m, s = run.encode_images(vae, data.images)
    del vae
    if a.resume and (run.out / "controlnet" / "config.json").exists():
        cn = ControlNetModel.from_pretrained(run.out / "controlnet")
        print("controlnet: resuming from the checkpoint's ControlNet")
    else:
        cn = ControlNetModel.from_unet(unet.cpu(), conditioning_channels=3, **run.cfg["controlnet"])
    cn = cn.to(run.dev).train().requires_grad_(True)
    unet.to(run.dev)
    diff = Diffusion(run.dev)
    ema = Ema(list(cn.parameters()), a.ema)
    thick = (1, 1, 3, 5)  # outline thickening (max-pool kernel), one per batch

    def step(i):
        idx = torch.randint(0, len(data), (sa.batch,), device=run.dev)
        z = (m[idx] + s[idx] * torch.randn_like(s[idx])) * sf
        with torch.no_grad():
            ehs, pooled = encode_text(te, te2, data.ids[idx])
        ehs, pooled = drop_captions(ehs, pooled, a.controlnet_caption_dropout)
        cond = data.edges[idx].float() / 255.0
        k = thick[int(torch.randint(0, len(thick), ()))]
        if k > 1:
            cond = F.max_pool2d(cond, k, stride=1, padding=k // 2)
        cond = cond.expand(-1, 3, -1, -1)
        noisy, t, noise, w = diff.noised(z)
        added = {"text_embeds": pooled, "time_ids": time_ids(a.size, len(z), run.dev)}
        down, mid = cn(noisy, t, encoder_hidden_states=ehs, controlnet_cond=cond, added_cond_kwargs=added,
                       return_dict=False)
        pred = unet(noisy, t, ehs, added_cond_kwargs=added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        return (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    run.train("controlnet", cn.parameters(), step, ema=ema)
    cn.eval().requires_grad_(False)
    cn.save_pretrained(run.out / "controlnet")
    if a.samples:
        samples_controlnet(run)


def lora_targets(unet) -> tuple[list[str], list[str]]:
    """The UNet's LoRA-targetable Linears (export_bundle.TARGET_RE) and the peft target_modules
    suffixes that select exactly them."""
    names = [n for n, mod in unet.named_modules() if isinstance(mod, torch.nn.Linear) and eb.TARGET_RE.search(n)]
    suffix = lambda n: ("ff.net." + n.split(".ff.net.")[1] if ".ff.net." in n  # noqa: E731
                        else "to_out.0" if n.endswith(".to_out.0") else n.rsplit(".", 1)[1])
    return names, sorted({suffix(n) for n in names})


def stage_lora(run: Run):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    a, sa = run.a, run.stage_args("lora")
    te, te2, _ = run.load_base()
    vae = run.load_vae()
    sf = vae.config.scaling_factor
    data = run.style_set
    (run.out / "loras").mkdir(parents=True, exist_ok=True)
    diff = Diffusion(run.dev)
    for si, style in enumerate(a.styles):
        torch.manual_seed(a.seed * 100 + 4 + si)
        m, s = run.encode_images(vae, data.styled[style])
        unet = run.load_base()[2]
        names, suffixes = lora_targets(unet)
        config = LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, init_lora_weights="gaussian",
                            target_modules=suffixes)
        unet.add_adapter(config, adapter_name=style)
        adapted = sorted({n.split(".lora_A.")[0] for n, _ in unet.named_parameters() if ".lora_A." in n})
        assert adapted == sorted(names), "peft adapted other layers than export_bundle.TARGET_RE's"
        unet.train()

        def step(i):
            idx = torch.randint(0, len(data), (sa.batch,), device=run.dev)
            z = (m[idx] + s[idx] * torch.randn_like(s[idx])) * sf
            with torch.no_grad():
                ehs, pooled = encode_text(te, te2, data.ids[idx])
            ehs, pooled = drop_captions(ehs, pooled, a.caption_dropout)
            noisy, t, noise, w = diff.noised(z)
            pred = unet(noisy, t, ehs, added_cond_kwargs={"text_embeds": pooled,
                                                          "time_ids": time_ids(a.size, len(z), run.dev)}).sample
            return (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()

        run.train("lora", unet.parameters(), step, label=f"lora-{style}")
        unet.eval()
        sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=style).items()}
        # the peft config, as diffusers' training scripts pass it (sets sorted: a stable file)
        meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        StableDiffusionXLPipeline.save_lora_weights(str(run.out / "loras"), unet_lora_layers=sd,
                                                    unet_lora_adapter_metadata=meta, weight_name=f"{style}.safetensors")
        if style in a.kohya:
            kohya = {}
            for k, v in sd.items():
                mod, part = k.rsplit(".lora_", 1)
                key = "lora_unet_" + mod.replace(".", "_")
                kohya[f"{key}.lora_down.weight" if part.startswith("A") else f"{key}.lora_up.weight"] = v
                kohya[f"{key}.alpha"] = torch.tensor(float(a.lora_alpha))
            save_file(kohya, str(run.out / "loras" / f"{style}-kohya.safetensors"), metadata={
                "format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(a.lora_rank),
                "ss_network_alpha": str(float(a.lora_alpha))})
        print(f"lora-{style}: {len(names)} layers, rank {a.lora_rank}, alpha {a.lora_alpha} → loras/{style}.safetensors"
              + (f" and loras/{style}-kohya.safetensors" if style in a.kohya else ""), flush=True)
        del unet
        if style in a.kohya:
            check_kohya(run, style)
    if a.samples:
        samples_lora(run)


# ───────────────────────────── checks and samples ─────────────────────────────


def check_encoding(run: Run):
    """The training's text conditioning equals the pipeline's (what katz reproduces)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(run.out), add_watermarker=False)  # on the CPU: exact
    prompts = FIXED_PROMPTS[:2]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=eb.MAX_LEN, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ehs, pl = encode_text(pipe.text_encoder, pipe.text_encoder_2, ids)
    err = max(float((ehs - pe).abs().max()), float((pl - pooled).abs().max()))
    assert err < 1e-4, f"training conditioning differs from the pipeline's by {err}"
    raw = torch.tensor([e.ids for e in run.tok.encode_batch(prompts)])
    assert torch.equal(raw, ids), "the saved tokenizer tokenizes differently from the training one"
    print(f"base: checkpoint loads as StableDiffusionXLPipeline; conditioning equals encode_prompt (max diff {err:.1e})")


def check_kohya(run: Run, style: str):
    """diffusers reads the kohya file as the same adapter as the peft one: one UNet forward on
    random inputs with each, against the UNet without a LoRA."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(run.out), add_watermarker=False)  # on the CPU: exact
    u = pipe.unet
    g = torch.Generator("cpu").manual_seed(0)
    B, h = 2, run.a.size // 8
    cross, pooled = u.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim
    args = [torch.randn(B, 4, h, h, generator=g), torch.tensor([900, 300]),
            torch.randn(B, eb.MAX_LEN, cross, generator=g), torch.randn(B, pooled, generator=g)]
    fwd = lambda: u(*args[:3], added_cond_kwargs={"text_embeds": args[3],  # noqa: E731
                                                  "time_ids": time_ids(run.a.size, B, "cpu")}).sample
    outs = {}
    with torch.no_grad():
        outs["none"] = fwd()
        for layout, f in (("peft", f"{style}.safetensors"), ("kohya", f"{style}-kohya.safetensors")):
            pipe.load_lora_weights(str(run.out / "loras" / f), adapter_name=layout)
            pipe.set_adapters([layout], adapter_weights=[1.0])
            outs[layout] = fwd()
            pipe.delete_adapters([layout])
    effect = float((outs["peft"] - outs["none"]).norm())
    gap = float((outs["peft"] - outs["kohya"]).norm())
    print(f"lora-{style}: kohya file vs peft file in diffusers: |Δ| {gap:.2e} against the LoRA's effect {effect:.2e}")
    assert effect > 0 and gap <= 1e-3 * effect, "the kohya file does not load as the same LoRA"
    run.log["stages"][f"lora-{style}"]["kohya_check"] = {"effect": effect, "difference": gap}
    run.save_log()


def to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def save_grid(path: Path, rows, tile: int = 128):
    """rows: [(title, [(PIL image, caption), …]), …] → one PNG with titles and wrapped captions."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=10)
    except TypeError:
        font = ImageFont.load_default()
    cols = max(len(r[1]) for r in rows)
    cap_h = 40 if any(c for _, r in rows for _, c in r) else 0
    left = 90
    W, H = left + cols * (tile + 4), len(rows) * (tile + cap_h + 4)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for ri, (title, items) in enumerate(rows):
        y = ri * (tile + cap_h + 4)
        d.multiline_text((4, y + tile // 2 - 10), "\n".join(textwrap.wrap(title, 14)), fill=(0, 0, 0), font=font)
        for ci, (im, cap) in enumerate(items):
            x = left + ci * (tile + 4)
            img.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
            if cap:
                d.multiline_text((x, y + tile + 1), "\n".join(textwrap.wrap(cap, 24)[:3]), fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"samples: {path}")


def sample_prompts(run: Run) -> list[str]:
    prompts = FIXED_PROMPTS + run.eval_set.captions[:4]
    return prompts[:3] if run.a.smoke else prompts  # smoke: the grids' layout, quickly


def generate(pipe, prompts, seeds, run: Run, size: int | None = None, **kw):
    size = size or run.a.size
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(prompt=prompts, height=size, width=size, num_inference_steps=run.a.sample_steps,
                    guidance_scale=5.0, generator=gens, **kw).images


def load_pipe(run: Run, controlnet: bool = False):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    if controlnet:
        cn = ControlNetModel.from_pretrained(run.out / "controlnet")
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(str(run.out), controlnet=cn, add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(run.out), add_watermarker=False)
    pipe.scheduler = run.scheduler()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(run.dev)


def samples_base(run: Run):
    pipe = load_pipe(run)
    prompts = sample_prompts(run)
    rows = []
    for seed in (1,) if run.a.smoke else (1, 2):
        imgs = generate(pipe, prompts, [seed] * len(prompts), run)
        rows.append((f"base {run.a.size}² seed {seed}", list(zip(imgs, prompts))))
    small = run.a.size // 2
    imgs = generate(pipe, prompts, [1] * len(prompts), run, size=small)
    rows.append((f"base {small}² seed 1", list(zip(imgs, prompts))))
    save_grid(run.out / "samples" / "base.png", rows)


def samples_controlnet(run: Run):
    from PIL import Image

    pipe = load_pipe(run, controlnet=True)
    ev = run.eval_set
    n = 2 if run.a.smoke else 6
    conds = [Image.fromarray(e[0].cpu().numpy()).convert("RGB") for e in ev.edges[:n]]
    prompts = ev.captions[:n]
    if DEMO_EDGES.exists():
        demo = Image.open(DEMO_EDGES).convert("RGB").resize((run.a.size, run.a.size))
        conds.append(demo)
        prompts = prompts + [DEMO_PROMPT]
    rows = [("condition", [(c, "") for c in conds])]
    ious = {}
    for scale in (1.0,) if run.a.smoke else (1.0, 0.8):
        imgs = generate(pipe, prompts, [1] * len(prompts), run, image=conds, controlnet_conditioning_scale=scale)
        rows.append((f"ControlNet scale {scale}", list(zip(imgs, prompts))))
        ious[str(scale)] = [round(shapes.edge_iou(shapes.edge_map(np.asarray(im)), np.asarray(c)), 3)
                            for im, c in zip(imgs, conds)]
    run.log["stages"]["controlnet"]["sample_edge_iou"] = ious
    print(f"controlnet: edge IoU of samples vs their conditions: {ious}")
    run.save_log()
    save_grid(run.out / "samples" / "controlnet.png", rows)


def samples_lora(run: Run):
    pipe = load_pipe(run)
    prompts = sample_prompts(run)[:6]
    seeds = [1] * len(prompts)
    base = generate(pipe, prompts, seeds, run)
    rows = [("no LoRA", list(zip(base, prompts)))]
    scores = {"none": {st: round(float(np.mean([shapes.style_score(np.asarray(i), st) for i in base])), 3)
                       for st in run.a.styles}}
    for style in run.a.styles:
        pipe.load_lora_weights(str(run.out / "loras" / f"{style}.safetensors"), adapter_name=style)
        for scale in (0.8,) if run.a.smoke else (0.8, 1.0):
            pipe.set_adapters([style], adapter_weights=[scale])
            imgs = generate(pipe, prompts, seeds, run)
            rows.append((f"{style} {scale}", list(zip(imgs, prompts))))
            scores[f"{style} {scale}"] = round(float(np.mean([shapes.style_score(np.asarray(i), style) for i in imgs])), 3)
        pipe.delete_adapters([style])
    run.log["stages"]["lora_samples"] = {"style_score": scores}
    run.wrote.add("lora_samples")
    print(f"lora: style scores of the samples (mean; 'none': without a LoRA): {scores}")
    run.save_log()
    name = "lora" if set(run.a.styles) == set(shapes.STYLES) else "lora-" + "-".join(run.a.styles)
    save_grid(run.out / "samples" / f"{name}.png", rows)


# ───────────────────────────── main ─────────────────────────────


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", choices=[*STAGES, "all"], help="what to train (run in the order vae, base, controlnet, lora)")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory (earlier stages are read from it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, choices=[64, 128], help="training image size (latents size/8)")
    ap.add_argument("--small-every", type=int, default=5,
                    help="every n-th base step trains at half the size (SDXL time_ids say which); 0: never")
    ap.add_argument("--n-base", type=int, help="training images (default 80000; smoke 24)")
    ap.add_argument("--n-style", type=int, help="images per style for the VAE and the LoRAs (default 12000; smoke 12)")
    ap.add_argument("--styles", nargs="+", default=list(shapes.STYLES))
    ap.add_argument("--kohya", nargs="*", default=["stripes"], help="styles whose LoRA is also written in the kohya layout")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-alpha", type=float, default=4.0)
    ap.add_argument("--vae-fg-weight", type=float, default=8.0,
                    help="extra weight of the objects' pixels in the VAE's L1 loss (0: every pixel alike, the first run)")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--controlnet-caption-dropout", type=float, default=0.3)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the base and ControlNet weights")
    ap.add_argument("--resume", action="store_true", help="base/controlnet: continue from the checkpoint's weights")
    ap.add_argument("--samples", action="store_true", help="write samples/<stage>.png grids (diffusers pipelines)")
    ap.add_argument("--sample-steps", type=int, help="Euler steps of the samples (default 20; smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="a few iterations of every stage on tiny data (CPU checks)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the dataset")
    ap.add_argument("--deadline", type=float, metavar="MINUTES",
                    help="end the whole invocation within this many minutes: training is cut short where needed, "
                         "keeping half a minute for saving and samples per stage still to train")
    for st in STAGES:
        d = DEFAULTS[st]
        ap.add_argument(f"--{st}-steps", type=int, help=f"default {d.steps}")
        ap.add_argument(f"--{st}-minutes", type=float, help=f"default {d.minutes}" + (" (per style)" if st == "lora" else ""))
        ap.add_argument(f"--{st}-batch", type=int, help=f"default {d.batch}")
        ap.add_argument(f"--{st}-lr", type=float, help=f"default {d.lr}")
    a = ap.parse_args(argv)
    stages = list(STAGES) if "all" in a.stages else [s for s in STAGES if s in a.stages]
    base = SMOKE if a.smoke else DEFAULTS
    for st in STAGES:
        d = base[st]
        setattr(a, f"{st}_args", StageArgs(
            steps=getattr(a, f"{st}_steps") or d.steps, minutes=getattr(a, f"{st}_minutes") or d.minutes,
            batch=getattr(a, f"{st}_batch") or d.batch, lr=getattr(a, f"{st}_lr") or d.lr))
    a.n_base = a.n_base or (24 if a.smoke else 80_000)
    a.n_style = a.n_style or (12 if a.smoke else 12_000)
    a.sample_steps = a.sample_steps or (2 if a.smoke else 20)
    unknown = set(a.styles) - set(shapes.STYLES) or set(a.kohya) - set(a.styles)
    if unknown:
        ap.error(f"unknown style(s) {sorted(unknown)}; the dataset has {shapes.STYLES}")
    if a.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    made_by = {"vae": "vae", "unet": "base"}
    needs = {"base": ["vae"], "controlnet": ["vae", "unet"], "lora": ["vae", "unet"]}
    for st in stages:
        for sub in needs.get(st, []):
            if made_by[sub] not in stages and not (a.out / sub / "config.json").exists():
                ap.error(f"stage {st} needs {a.out / sub}: run stage {made_by[sub]} first")

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lg in (diffusers_logging, transformers_logging):  # progress bars and per-load notices
        lg.set_verbosity_error()
        lg.disable_progress_bar()
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    run = Run(a)
    run.units_left = sum(len(a.styles) if st == "lora" else 1 for st in stages)
    run.load_data(stages)
    for st in stages:
        t = time.perf_counter()
        {"vae": stage_vae, "base": stage_base, "controlnet": stage_controlnet, "lora": stage_lora}[st](run)
        print(f"== {st} done in {(time.perf_counter() - t) / 60:.2f} min (total {(time.perf_counter() - t0) / 60:.2f} min)",
              flush=True)
    run.log.setdefault("runs", []).append({"stages": stages, "minutes": round((time.perf_counter() - t0) / 60, 2)})
    run.save_log()
    print(f"train_tiny: {', '.join(stages)} in {(time.perf_counter() - t0) / 60:.2f} min → {a.out}")


if __name__ == "__main__":
    sys.exit(main())
