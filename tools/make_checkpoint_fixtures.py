#!/usr/bin/env python3
"""Builds the checkpoint fixtures of tests/data/checkpoints/ with the reference tools.

    git clone https://github.com/huggingface/diffusers /tmp/diffusers     # for its scripts/ (not in the wheel)
    .venv-tools/bin/python tools/make_checkpoint_fixtures.py --diffusers-src /tmp/diffusers

Data flow (everything seeded; diffusers and transformers as pinned in requirements-export.txt):

    tiny SDXL (export_bundle.tiny_config, text_encoder_2 24 wide) ─▶ seeded random modules
      ├─▶ StableDiffusionXLPipeline.save_pretrained ─▶ tiny-sdxl/          (a diffusers directory)
      │     └─▶ the same directory without weights ─▶ tools/configs/tiny/  (from_single_file's config=)
      ├─▶ diffusers' scripts/convert_diffusers_to_original_sdxl.py, run unchanged
      │     ─▶ tiny-sdxl.safetensors, tiny-sdxl.ckpt                         (the SGM layout of model sites)
      ├─▶ ControlNetModel.from_unet(unet), seeded residual convolutions
      │     ─▶ save_pretrained ─▶ tiny-sdxl-controlnet/  (its diffusion_pytorch_model.safetensors
      │                                                   is the single-file form model sites publish)
      └─▶ check: StableDiffusionXLPipeline.from_single_file(tiny-sdxl.safetensors, config=tools/configs/tiny,
                 local_files_only=True) gives back every tensor of the directory exactly
    tiny SD 1.x (StableDiffusionPipeline) ─▶ save_pretrained ─▶
      scripts/convert_diffusers_to_original_stable_diffusion.py ─▶ tiny-sd15.safetensors (to be refused)
    SDXL base 1.0's configuration (export_bundle.sdxl_config) ─▶ tools/configs/sdxl/ (no weights, no tokenizer files)

Why text_encoder_2 is 24 wide (the tiny bundles' text encoders are both 16): diffusers' single-file
loader tells SDXL's two CLIP encoders apart by their width, as in SDXL (768 and 1280).

transformers ≥ 5.6 saves `CLIPTextModel` without the `text_model.` prefix that every published
SDXL repository (and the original layout's `conditioner.embedders.0.transformer.text_model.*`) has;
the conversion script copies the first text encoder's keys as they are, so this script saves that
encoder in the published key layout (the prefix added back; transformers loads both, checked below)
before running the script.

The files are small (a few MB in all) and committed; running this again rewrites them byte for byte
(safetensors) — the .ckpt pickles may differ in bytes, not in tensors.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import export_bundle as eb  # noqa: E402

SEED = 2024
OUT = REPO / "tests" / "data" / "checkpoints"
CONFIG_DIR = TOOLS / "configs" / "tiny"
SDXL_SCRIPT = "scripts/convert_diffusers_to_original_sdxl.py"
SD_SCRIPT = "scripts/convert_diffusers_to_original_stable_diffusion.py"


def checkpoint_config() -> dict:
    """The tiny SDXL structure with a 24-wide second text encoder (see the module doc)."""
    cfg = eb.tiny_config()
    cfg["text_encoder_2"]["hidden_size"] = 24
    cfg["unet"]["cross_attention_dim"] = cfg["text_encoder"]["hidden_size"] + 24
    return cfg


def scheduler():
    from diffusers import EulerDiscreteScheduler

    extra = ("set_alpha_to_one", "clip_sample", "skip_prk_steps", "sample_max_value")
    s = EulerDiscreteScheduler(**{k: v for k, v in eb.SCHEDULER.items() if k not in extra})
    s.register_to_config(**{k: eb.SCHEDULER[k] for k in extra})  # as SDXL base 1.0's scheduler_config.json
    return s


def published_clip_layout(model_dir: Path):
    """Rewrites a CLIPTextModel's model.safetensors with the `text_model.` prefix of published repos."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    if not all(k.startswith("text_model.") for k in sd):
        save_file({f"text_model.{k}": v for k, v in sd.items()}, str(f), metadata={"format": "pt"})


def run_script(src: Path, script: str, *args):
    path = src / script
    if not path.exists():
        raise SystemExit(f"{path}: not found (--diffusers-src must be a checkout of huggingface/diffusers)")
    subprocess.run([sys.executable, str(path), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def sdxl_fixtures(src: Path, out: Path):
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from transformers import CLIPTextModel

    cfg = checkpoint_config()
    tok = eb.build_tokenizer(cfg["vocab_size"])
    ids = dict(bos_token_id=tok.token_to_id("<|startoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
               pad_token_id=tok.token_to_id("<|endoftext|>"))
    te, te2, unet, vae, cn = eb.build_models(cfg, SEED, None, ids)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_file))
        hf = eb.hf_tokenizer(tok_file)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=hf, tokenizer_2=hf,
                                         unet=unet, scheduler=scheduler(), force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    d = out / "tiny-sdxl"
    shutil.rmtree(d, ignore_errors=True)
    pipe.save_pretrained(str(d), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # the builder's own file (padding and truncation to 77 included)
        tok.save(str(d / sub / "tokenizer.json"))
    published_clip_layout(d / "text_encoder")
    again = CLIPTextModel.from_pretrained(str(d / "text_encoder"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), te.state_dict().values()))

    # the config directory: the same files without the weights
    shutil.rmtree(CONFIG_DIR, ignore_errors=True)
    for f in sorted(d.rglob("*")):
        if f.is_file() and not f.name.endswith(".safetensors"):
            (CONFIG_DIR / f.relative_to(d)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, CONFIG_DIR / f.relative_to(d))

    run_script(src, SDXL_SCRIPT, "--model_path", d, "--checkpoint_path", out / "tiny-sdxl.safetensors",
               "--use_safetensors")
    run_script(src, SDXL_SCRIPT, "--model_path", d, "--checkpoint_path", out / "tiny-sdxl.ckpt")

    cnd = out / "tiny-sdxl-controlnet"
    shutil.rmtree(cnd, ignore_errors=True)
    cn.save_pretrained(str(cnd), safe_serialization=True)

    # the round trip through diffusers' single-file loader is exact
    back = StableDiffusionXLPipeline.from_single_file(
        str(out / "tiny-sdxl.safetensors"), config=str(CONFIG_DIR), local_files_only=True,
        tokenizer=hf, tokenizer_2=hf)
    for name, mod in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
        want, got = mod.state_dict(), getattr(back, name).state_dict()
        assert set(want) == set(got), f"{name}: keys differ after from_single_file: {set(want) ^ set(got)}"
        bad = [k for k in want if not torch.equal(want[k], got[k])]
        assert not bad, f"{name}: {len(bad)} tensors differ after from_single_file, e.g. {bad[:3]}"
    back_cn = ControlNetModel.from_single_file(str(cnd / "diffusion_pytorch_model.safetensors"), config=str(cnd),
                                               local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(back_cn.state_dict().values(), cn.state_dict().values()))
    print(f"  {d.name}/, tiny-sdxl.safetensors, tiny-sdxl.ckpt, {cnd.name}/: from_single_file gives every tensor back")


def sd15_fixture(src: Path, out: Path):
    """A tiny Stable Diffusion 1.x model in the original layout (the exporter must refuse it)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 3)
    tok = eb.build_tokenizer(1000)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
                                norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=1000, max_position_embeddings=77,
                                      bos_token_id=tok.token_to_id("<|startoftext|>"),
                                      eos_token_id=tok.token_to_id("<|endoftext|>")))
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        hf = eb.hf_tokenizer(Path(tmp) / "tokenizer.json")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=hf, unet=unet, scheduler=scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        published_clip_layout(Path(tmp) / "text_encoder")
        run_script(src, SD_SCRIPT, "--model_path", tmp, "--checkpoint_path", out / "tiny-sd15.safetensors",
                   "--use_safetensors")
    print("  tiny-sd15.safetensors")


def sdxl_config_dir(out: Path):
    """tools/configs/sdxl/: SDXL base 1.0's diffusers configuration (export_bundle.sdxl_config, the
    values of its published config files) as diffusers and transformers write it, for from_single_file
    of full-size checkpoints. The CLIP tokenizer files (vocab.json, merges.txt) cannot be made here
    (no hub); they go into tokenizer/ and tokenizer_2/ by hand (docs/bundles.md)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    cfg = eb.sdxl_config()
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as published for both SDXL text encoders
               vocab_size=cfg["vocab_size"], max_position_embeddings=eb.MAX_LEN)
    with init_empty_weights():
        UNet2DConditionModel(**cfg["unet"]).save_config(str(out / "unet"))
        AutoencoderKL(**cfg["vae"], force_upcast=True).save_config(str(out / "vae"))
    CLIPTextConfig(**{**cfg["text_encoder"], **ids}, architectures=["CLIPTextModel"]).save_pretrained(
        str(out / "text_encoder"))
    CLIPTextConfig(**{**cfg["text_encoder_2"], **ids}, architectures=["CLIPTextModelWithProjection"]).save_pretrained(
        str(out / "text_encoder_2"))
    scheduler().save_config(str(out / "scheduler"))
    index = json.loads((CONFIG_DIR / "model_index.json").read_text())
    index["tokenizer"] = index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"  {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-src", type=Path, required=True,
                    help="a checkout of huggingface/diffusers (its scripts/ directory is not in the wheel)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    sdxl_fixtures(a.diffusers_src, a.out)
    sd15_fixture(a.diffusers_src, a.out)
    sdxl_config_dir(TOOLS / "configs" / "sdxl")
    sizes = {f.name: f.stat().st_size for f in sorted(a.out.iterdir()) if f.is_file()}
    print("  " + json.dumps(sizes))


if __name__ == "__main__":
    sys.exit(main())
