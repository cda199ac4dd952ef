#!/usr/bin/env python3
"""Builds katz model bundles from diffusers models, and the parity references of the tiny ones.

    tools/export.sh                                   # tiny bundles + LoRAs + parity references
    tools/export.sh --config sdxl --random-init --out bundles/sdxl      # full size, seeded
    tools/export.sh --config sdxl --checkpoint DIR --out bundles/sdxl   # a diffusers checkpoint
    tools/export.sh --config sdxl --checkpoint FILE --out bundles/sdxl  # a single-file (SGM) checkpoint

(`tools/export.sh` makes the pinned venv and calls this file.)

Data flow:

    configs (tiny | models/sdxl.json) ─▶ diffusers modules (seeded random or checkpoint:
        checkpoints.py decides the layout first; a directory: from_pretrained, one file:
        from_single_file with tools/configs/<config>/, offline)
        ├─▶ text_encoder[_2].onnx          (penultimate hidden states, pooled/projected)
        ├─▶ unet_encoder.onnx / unet_decoder.onnx   split after the mid block; the
        │      LoRA-targetable Linear weights (and, but for --gpu, LoCon's convolutions
        │      and time_emb_proj) become graph inputs ─▶ weights.safetensors;
        │      what they compute from the conditioning and weights alone ─▶ unet_prelude.onnx,
        │      run once per job (tools/job_prelude.py; --no-prelude keeps the pair whole);
        │      --gpu: katz's GEGLU and layer norms, convolution biases folded into the group norms after them
        │      (tools/step_rewrite.py; --no-step-rewrite keeps ONNX Runtime's graphs);
        │      --gpu --fp8: then their GEMMs in fp8 too, activation ranges calibrated ─▶ unet_*.fp8.onnx
        │      (tools/fp8_rewrite.py)
        ├─▶ vae_decoder.onnx               --gpu: fused, fp16 or fp16-upcast (--vae-precision,
        │                                   default auto: an activation probe decides)
        ├─▶ controlnet.onnx               --controlnet-checkpoint, CHECKPOINT/controlnet/ or
        │                                   ControlNetModel.from_unet(unet); what it computes from
        │                                   the conditioning, image and weights alone ─▶ controlnet_prelude.onnx
        └─▶ parity references: StableDiffusionXL[ControlNet]Pipeline on the same weights,
               explicit noise, per-step latents and the final image ─▶ tests/data/parity/

Every exported graph is checked against its PyTorch module with ONNX Runtime on fresh random
inputs before the bundle is written; the exporter fails if the relative error exceeds 1e-4.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 77

# LoRA-targetable Linear layers of the UNet's transformer blocks (see docs/bundles.md).
TARGET_RE = re.compile(
    r"\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|\.ff\.net\.(0\.proj|2)$|\.attentions\.\d+\.(proj_in|proj_out)$"
)
# What LoCon (kohya LoCon, peft LoRA on Conv2d) adapts besides those: the UNet's convolutions (resnets'
# conv1/conv2/conv_shortcut, the down/upsamplers' conv, conv_in, conv_out) and the resnets' Linear
# time_emb_proj (kohya's LoCon adapts every layer of a ResnetBlock2D). Graph inputs of CPU bundles
# only: GPU bundles keep the convolutions as initializers (ONNX Runtime's NhwcConv fusion needs constant
# weights) and time_emb_proj too (their graphs stay as they were: no step-time cost to measure), and
# their manifests say so (`weights.conv_graphs` empty).
CONV_TARGET_RE = re.compile(
    r"^(conv_in|conv_out)$|\.resnets\.\d+\.(conv1|conv2|conv_shortcut)$|\.(downsamplers|upsamplers)\.0\.conv$"
)
RESNET_LINEAR_RE = re.compile(r"\.resnets\.\d+\.time_emb_proj$")


class _MultiHeadAttention(torch.autograd.Function):
    """Attention over [B, S, H·D] projections. In PyTorch: scaled dot-product attention; in the
    exported graph: ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (what its fusion tool
    and CUDA kernels expect; the PyTorch 2.11 export pattern is not one the fusion tool matches)."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        b, s, hd = q.shape
        d = hd // heads
        split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, s, hd)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        return out.setType(q.type())


class MhaProcessor:
    """diffusers' AttnProcessor2_0 for SDXL's transformer blocks (3-D input, no norms, no mask),
    with the attention itself as one `MultiHeadAttention` node."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        assert attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
        assert hidden_states.ndim == 3 and attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        out = _MultiHeadAttention.apply(q, k, v, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# ───────────────────────────── configurations ─────────────────────────────


def tiny_config() -> dict:
    """SDXL's block structure (3 levels, DownBlock2D first, transformer depths growing, text-time
    embedding, two text encoders) with small widths."""
    hidden, hidden2, proj = 16, 16, 16
    time_dim = 8
    return {
        "name": "tiny-sdxl",
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32), layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2),
            cross_attention_dim=hidden + hidden2, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=proj + 6 * time_dim,
            norm_num_groups=8, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        ),
        "controlnet": dict(conditioning_embedding_out_channels=(8, 8, 16, 16)),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
            sample_size=128, scaling_factor=0.13025,
        ),
        "text_encoder": dict(hidden_size=hidden, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, hidden_act="quick_gelu", projection_dim=proj),
        "text_encoder_2": dict(hidden_size=hidden2, intermediate_size=32, num_hidden_layers=3,
                               num_attention_heads=2, hidden_act="gelu", projection_dim=proj),
        "vocab_size": 1000,
        "default_size": [128, 128], "default_steps": 20, "default_guidance": 5.0,
    }


def sdxl_config() -> dict:
    src = json.loads((REPO / "tools" / "configs" / "sdxl.json").read_text())
    unet = {k: v for k, v in src["unet"].items() if k != "parameters"}
    for k in ("down_block_types", "up_block_types", "block_out_channels", "transformer_layers_per_block",
              "attention_head_dim"):
        unet[k] = tuple(unet[k])
    vae = {k: v for k, v in src["vae"].items() if k not in ("note",)}
    vae.update(in_channels=3, out_channels=3)
    te = {k: v for k, v in src["text_encoder"].items() if k not in ("class",)}
    te2 = {k: v for k, v in src["text_encoder_2"].items() if k not in ("class",)}
    return {
        "name": "sdxl",
        "unet": unet,
        "controlnet": {},
        "vae": vae,
        "text_encoder": te,
        "text_encoder_2": te2,
        "vocab_size": 49408,
        "default_size": [1024, 1024], "default_steps": 50, "default_guidance": 7.5,
    }


SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
    "interpolation_type": "linear", "use_karras_sigmas": False,
    # SDXL base 1.0 scheduler_config.json also carries these (they matter for DDIM):
    "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True, "sample_max_value": 1.0,
}


# ───────────────────────────── tokenizer ─────────────────────────────

COLOURS = "red green blue yellow orange purple pink brown black white grey cyan magenta gold silver".split()
SHAPES = "circle square triangle star hexagon ring cross diamond heart moon cube sphere".split()
WORDS = ("a an the of on in at above below left right of and with next to small large big tiny photo "
         "painting drawing picture background foreground centre center top bottom corner bright dark "
         "pastel striped dotted style cat dog house tree mountain river city car flower sky sea sun "
         "portrait landscape detailed high quality blurry ugly lowres watermark").split()


def build_tokenizer(vocab_size: int, extra_words=()):
    """A small CLIP-like BPE vocabulary in the HF tokenizers format (lower-cased, `</w>` word
    ends, <|startoftext|> … <|endoftext|>, padded with <|endoftext|> to 77). The merges are built
    deterministically (each known word assembled left to right), so every export writes the same
    file; unknown words fall back to shorter pieces and single characters. `extra_words` (a
    training set's, say) become one token each through merges appended after all the others, so
    without them the file is the one the committed bundles hold."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    special = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"))
    vocab = {t: i for i, t in enumerate(special)}
    for ch in alphabet:
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    # classic BPE training over the known words, ties broken by the pair's text: deterministic,
    # and every known word ends as one token
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(COLOURS + SHAPES + WORDS))]
    merges = []
    while len(vocab) < vocab_size:
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1
    ranks = {m: i for i, m in enumerate(merges)}
    for word in sorted({w.lower() for w in extra_words} - set(COLOURS + SHAPES + WORDS)):
        assert word and set(word) <= set(alphabet), f"extra word {word!r}: characters outside the alphabet"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            # BPE as the tokenizer applies it (lowest-ranked pair first); when no merge applies,
            # a new one joins the first two pieces
            ranked = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
            i = min(ranked)[1] if ranked else 0
            if not ranked:
                if len(vocab) >= vocab_size:
                    raise ValueError(f"vocab_size {vocab_size} is too small for the extra word {word!r}")
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|unk|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.enable_truncation(MAX_LEN)
    tok.enable_padding(length=MAX_LEN, pad_id=eos, pad_token="<|endoftext|>")
    return tok


def hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|unk|>", model_max_length=MAX_LEN)


# ───────────────────────────── models ─────────────────────────────


def config_dir(config: str) -> Path:
    """from_single_file's `config=` for a `--config`: a diffusers directory without weights
    (model_index.json, each component's config.json, the tokenizers, the scheduler)."""
    return REPO / "tools" / "configs" / config


def load_checkpoint(path: Path, configs: Path | None):
    """diffusers' own loaders, in fp32: `from_pretrained` for a diffusers directory,
    `StableDiffusionXLPipeline.from_single_file` (the SGM layout, offline, configured by `configs`)
    for one file. Returns text_encoder, text_encoder_2, unet, vae."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if path.is_dir():
        return (CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                AutoencoderKL.from_pretrained(path, subfolder="vae"))
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                      torch_dtype=torch.float32)
    return pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae


def load_controlnet(path: Path, unet, cfg: dict, configs: Path | None):
    """A pretrained ControlNet: a diffusers directory, or one file (diffusers' or the original key
    layout) through `ControlNetModel.from_single_file`, configured by `configs` (a directory with the
    ControlNet's config.json) or else by `ControlNetModel.from_unet(unet)`'s configuration (SDXL's
    published ControlNets have it). It must fit the UNet: the bundle carries the base's signature."""
    from diffusers import ControlNetModel

    if path.is_dir():
        cn = ControlNetModel.from_pretrained(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if configs is None:
                import warnings

                from accelerate import init_empty_weights

                with init_empty_weights(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # from_unet's weight copies into the empty model: only its config is kept
                    ControlNetModel.from_unet(unet, conditioning_channels=3, **cfg["controlnet"]).save_config(tmp)
                configs = Path(tmp)
            cn = ControlNetModel.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                  torch_dtype=torch.float32)
    for key in ("block_out_channels", "cross_attention_dim", "transformer_layers_per_block", "layers_per_block",
                "projection_class_embeddings_input_dim"):
        a, b = cn.config.get(key), unet.config.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise SystemExit(f"{path}: this ControlNet does not fit the base model: {key} {a} != {b}")
    return cn


def build_models(cfg: dict, seed: int, checkpoint: Path | None, tok_ids: dict, controlnet: Path | None = None,
                 configs: Path | None = None, controlnet_configs: Path | None = None):
    """The modules to export: from `checkpoint` (a diffusers directory or one SGM-layout file,
    `load_checkpoint`) or seeded random ones of `cfg`; the ControlNet from `controlnet`, else a
    trained one in CHECKPOINT/controlnet/, else `ControlNetModel.from_unet(unet)` with seeded
    residual convolutions."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if checkpoint is not None:
        te, te2, unet, vae = load_checkpoint(Path(checkpoint), configs)
    else:
        torch.manual_seed(seed)
        common = dict(vocab_size=cfg["vocab_size"], max_position_embeddings=MAX_LEN, **tok_ids)
        te = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **common}))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **common}))
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
    if controlnet is not None:
        cn = load_controlnet(Path(controlnet), unet, cfg, controlnet_configs)
    elif checkpoint is not None and (Path(checkpoint) / "controlnet" / "config.json").exists():
        cn = ControlNetModel.from_pretrained(Path(checkpoint) / "controlnet")  # a trained one (tools/train_tiny.py)
    else:
        torch.manual_seed(seed + 1)
        cn = ControlNetModel.from_unet(unet, conditioning_channels=3, **cfg["controlnet"])
        # from_unet zero-initialises the residual convolutions (a trained ControlNet has learnt them);
        # seeded random values make the residuals real and the parity test meaningful.
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.reset_parameters()
    for m in (te, te2, unet, vae, cn):
        m.eval().requires_grad_(False)
    return te, te2, unet, vae, cn


class TextEncoder(nn.Module):
    def __init__(self, te, projected: bool):
        super().__init__()
        self.te, self.projected = te, projected

    def forward(self, input_ids):
        out = self.te(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return out.hidden_states[-2], pooled


class UNetEncoder(nn.Module):
    """conv_in, time + text-time embedding, down blocks, mid block (diffusers' forward, verbatim
    in the parts SDXL uses)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        u = self.unet
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)
        emb = u.time_embedding(t_emb, None)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        emb = emb + aug
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        sample = u.conv_in(sample)
        skips = (sample,)
        for blk in u.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                sample, res = blk(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = blk(hidden_states=sample, temb=emb)
            skips += res
        sample = u.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        return (emb, sample, *skips)


class UNetDecoder(nn.Module):
    """Up blocks and conv_out. The skips already hold the ControlNet residuals. Upsampling is
    always given the skip's size, so latents of any size (image a multiple of 8) work."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, emb, encoder_hidden_states, mid, *skips):
        u = self.unet
        sample, skips = mid, tuple(skips)
        for i, blk in enumerate(u.up_blocks):
            n = len(blk.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if i < len(u.up_blocks) - 1 else None
            if getattr(blk, "has_cross_attention", False):
                sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                             encoder_hidden_states=encoder_hidden_states, upsample_size=size)
            else:
                sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)


class WeightInputs(nn.Module):
    """Runs `core` with some of its parameters taken from trailing forward arguments, so the
    exported graph has them as inputs instead of initializers."""

    def __init__(self, core: nn.Module, names: list[str], prefix: str):
        super().__init__()
        self.core, self.names, self.prefix = core, names, prefix

    def forward(self, *args):
        n = len(args) - len(self.names)
        saved = []
        try:
            # torch.func.functional_call refuses traced modules: shadow the parameters by hand
            for name, t in zip(self.names, args[n:]):
                mod_name, attr = (self.prefix + name).rsplit(".", 1)
                m = self.core.get_submodule(mod_name)
                object.__setattr__(m, attr, t)  # an instance attribute shadows the parameter
                saved.append((m, attr))
            return self.core(*args[:n])
        finally:
            for m, attr in saved:
                del m.__dict__[attr]


class ControlNet(nn.Module):
    def __init__(self, cn):
        super().__init__()
        self.cn = cn

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond):
        down, mid = self.cn(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                            return_dict=False)
        return (*down, mid)


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeMid(nn.Module):
    """The VAE decoder up to its mid block (what diffusers' `upcast_vae` keeps in fp16):
    post_quant_conv, decoder.conv_in, decoder.mid_block."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        x = self.vae.post_quant_conv(latent) if self.vae.post_quant_conv is not None else latent
        return self.vae.decoder.mid_block(self.vae.decoder.conv_in(x))


class VaeUp(nn.Module):
    """The rest of the VAE decoder: the up blocks and the output convolution."""

    def __init__(self, vae):
        super().__init__()
        self.d = vae.decoder

    def forward(self, mid):
        x = mid
        for b in self.d.up_blocks:
            x = b(x)
        return self.d.conv_out(self.d.conv_act(self.d.conv_norm_out(x)))


class VaeMhaProcessor:
    """diffusers' AttnProcessor2_0 for the VAE's mid-block attention (4-D input, a GroupNorm,
    residual), the GroupNorm on the 4-D tensor (what ONNX Runtime's GroupNorm fusion matches) and
    the attention as one `MultiHeadAttention` node."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        assert encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
        assert hidden_states.ndim == 4 and attn.norm_q is None and attn.norm_k is None
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = attn.group_norm(hidden_states) if attn.group_norm is not None else hidden_states
        x = x.view(b, c, h * w).transpose(1, 2)
        out = _MultiHeadAttention.apply(attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


TE_TARGET_RE = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")
TE_GRAPHS = ("text_encoder", "text_encoder_2")


def targeted_te_weights(te) -> list[str]:
    """Names of a CLIP text encoder's LoRA-targetable weights (attention projections, MLP), as
    its own modules name them (the graph inputs are `text_encoder[_2].<name>`)."""
    return [name + ".weight" for name, m in te.named_modules() if isinstance(m, nn.Linear) and TE_TARGET_RE.search(name)]


def locon_target(name: str, m: nn.Module, conv: bool, time_emb: bool) -> bool:
    """Whether module `name` is one of the UNet's LoCon targets taken as inputs: with `time_emb` the
    resnets' time_emb_proj (RESNET_LINEAR_RE), with `conv` the convolutions (CONV_TARGET_RE)."""
    return ((conv and isinstance(m, nn.Conv2d) and CONV_TARGET_RE.search(name) is not None)
            or (time_emb and isinstance(m, nn.Linear) and RESNET_LINEAR_RE.search(name) is not None))


def targeted_weights(unet, conv: bool = True, time_emb: bool = True) -> dict[str, list[str]]:
    """diffusers names of the LoRA-targetable weights, by the graph that takes them; `conv`: with the
    convolutions LoCon adapts, `time_emb`: with the resnets' time_emb_proj."""
    out = {"unet_encoder": [], "unet_decoder": []}
    for name, m in unet.named_modules():
        if (isinstance(m, nn.Linear) and TARGET_RE.search(name)) or locon_target(name, m, conv, time_emb):
            graph = "unet_decoder" if name.startswith("up_blocks.") or name == "conv_out" else "unet_encoder"
            out[graph].append(name + ".weight")
    return out


def targeted_cn_weights(cn) -> list[str]:
    """diffusers names of a ControlNet's LoRA-targetable Linear weights (the UNet's down and mid
    blocks' transformer layers): the ControlNet graph takes them as inputs."""
    return [name + ".weight" for name, m in cn.named_modules() if isinstance(m, nn.Linear) and TARGET_RE.search(name)]


# ───────────────────────────── ONNX export ─────────────────────────────


def export(module, args, path: Path, input_names, output_names, dynamic_axes, external=False):
    """Exports one graph. Large graphs (> 2 GB) keep their initializers in one `<graph>.onnx.data`
    file beside the graph: the TorchScript exporter writes one file per tensor, so it writes into a
    scratch directory first (graphs share tensor names) and the result is re-saved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path
    if external:
        scratch = Path(tempfile.mkdtemp(prefix=path.stem + "-", dir=path.parent))
        target = scratch / path.name
    with torch.no_grad():
        torch.onnx.export(module, tuple(args), str(target), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
    if external:
        import onnx

        m = onnx.load(str(target))  # pulls in the per-tensor files
        data = path.parent / (path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        shutil.rmtree(scratch)


def group_norm_fusable(unet) -> bool:
    """Whether ONNX Runtime's fused CUDA GroupNorm takes this UNet's widths: its kernel splits the
    channels into blocks of 64 or more and refuses others at run time ("GroupNorm in CUDA does not
    support the input: ... c=24 groups=8", seen with the trained tiny family's 24/48/48 on an H200).
    SDXL's 320/640/1280 are fine; narrower widths keep the unfused GroupNorm."""
    return all(c % 64 == 0 for c in unet.config.block_out_channels)


def fuse_fp16(path: Path, external: bool, weight_inputs=(), group_norm: bool = True, model_type: str = "unet",
              fp16: bool = True, dest: Path | None = None, exact: bool = False) -> dict:
    """The GPU recipe after the MultiHeadAttention export: ONNX Runtime's fusion tool for UNets
    (GroupNorm, SkipGroupNorm, BiasSplitGelu, NhwcConv, SkipLayerNorm …), then fp16 compute with
    the graph's inputs and outputs kept fp32 (the converter keeps Resize scales and GroupNorm
    parameters fp32). The LoRA-targetable weight inputs become fp16 inputs (casting fp32 weights
    inside every run cost a quarter of the step). The result runs on the CUDA execution provider
    only (CUDA-only fused ops). Written to `dest` (default: over `path`). `exact`: without the
    GroupNorm and SkipGroupNorm fusions, whose CUDA kernels sum with atomics (two runs can differ
    in the last bit): the deterministic twin of a graph."""
    import collections

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    import onnx

    model = onnx.load(str(path))
    # graph outputs that other nodes also read (the skips) break the fp16 converter's output casts
    # ("graph is not a DAG"): give every graph output its own Identity
    outs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        node.input[:] = [i + "__int" if i in outs else i for i in node.input]
        node.output[:] = [o + "__int" if o in outs else o for o in node.output]
    for o in model.graph.output:
        model.graph.node.append(onnx.helper.make_node("Identity", [o.name + "__int"], [o.name], name=o.name + "__out"))
    options = FusionOptions(model_type)
    if not group_norm:  # and the other fused kernels sized for SD's widths only
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
        options.enable_bias_splitgelu = False  # "hidden size should be 2560, 5120, 6144, 10240 or 12288"
        options.enable_bias_add = False
    if exact:
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
    m = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0, use_gpu=True,
                       optimization_options=options)
    weights = set(weight_inputs)
    edges = [i.name for i in model.graph.input if i.name not in weights] + [o.name for o in model.graph.output]
    if fp16:
        m.convert_float_to_float16(keep_io_types=edges)
    dest = dest or path
    for f in dest.parent.glob(dest.name + "*.data"):
        f.unlink()
    m.save_model_to_file(str(dest), use_external_data_format=external)
    counts = collections.Counter(n.op_type for n in m.model.graph.node)
    fused = {k: counts[k] for k in ("MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv",
                                    "SkipLayerNormalization", "BiasAdd") if counts[k]}
    print(f"  {dest.name}: fused for CUDA, {'fp16 inside, fp32 at the edges' if fp16 else 'fp32'}: {fused}")
    return fused


# ───────────────────────────── the VAE decoder of GPU bundles ─────────────────────────────

FP16_MAX = 65504.0
VAE_PRECISIONS = ("auto", "fp16", "fp16-upcast", "fp32")


def vae_probe(vae, latent) -> float:
    """The largest magnitude of any module output of the VAE decoder (PyTorch fp32) on `latent`:
    where it nears fp16's range, fp16 overflows (the original SDXL VAE: diffusers' `force_upcast`)."""
    worst = [0.0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            worst[0] = max(worst[0], float(out.detach().abs().max()))

    mods = [m for m in [vae.post_quant_conv, *vae.decoder.modules()] if m is not None]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        with torch.no_grad():
            VaeDecoder(vae)(latent)
    finally:
        for h in handles:
            h.remove()
    return worst[0]


def vae_precision(choice: str, probe_max: float) -> str:
    """`auto`: fp16 throughout when the probe's largest activation stays under 1/8 of fp16's
    range (the headroom larger images and other latents take), else `fp16-upcast`."""
    if choice != "auto":
        return choice
    return "fp16" if probe_max * 8 < FP16_MAX else "fp16-upcast"


def merge_vae(mid: Path, up: Path, path: Path):
    """One graph from the mid part (fp16 inside, f32 `mid` out) and the up part (fp32): the up
    part's names get a prefix, its `mid` input becomes the mid part's output."""
    import onnx

    a, b = onnx.load(str(mid)), onnx.load(str(up))
    ren = lambda n: n if n in ("", "mid", "image") else "up/" + n  # noqa: E731
    for node in b.graph.node:
        node.name = "up/" + node.name
        node.input[:] = [ren(i) for i in node.input]
        node.output[:] = [ren(o) for o in node.output]
    for t in b.graph.initializer:
        t.name = ren(t.name)
    for v in b.graph.value_info:
        v.name = ren(v.name)
    a.graph.node.extend(b.graph.node)
    a.graph.initializer.extend(b.graph.initializer)
    a.graph.value_info.extend(b.graph.value_info)
    a.graph.value_info.extend(a.graph.output)  # `mid` becomes an inner value
    del a.graph.output[:]
    a.graph.output.extend(b.graph.output)
    domains = {o.domain for o in a.opset_import}
    a.opset_import.extend(o for o in b.opset_import if o.domain not in domains)
    onnx.save_model(a, str(path))
    mid.unlink()
    up.unlink()


def fuse_vae(out: Path, precision: str, group_norm: bool, exact: bool = False) -> dict:
    """The fused VAE decoder of a GPU bundle (`vae_decoder.onnx`, f32 `latent` in, f32 `image`
    out): `fp16` fuses and converts the whole graph like the UNet's; `fp16-upcast` fuses the mid
    part fp16 and the up blocks fp32 (diffusers' `upcast_vae` split) and joins them. `exact`:
    the deterministic twin (`vae_decoder.exact.onnx`, no fused GroupNorm), from the same
    unfused graphs, which stay as they are."""
    tag = ".exact" if exact else ""
    if precision == "fp16":
        return fuse_fp16(out / "vae_decoder.fp32.onnx", False, group_norm=group_norm, model_type="vae",
                         dest=out / f"vae_decoder{tag}.onnx", exact=exact)
    mid, up = out / "vae_mid.onnx", out / "vae_up.onnx"
    fmid, fup = out / f"vae_mid{tag}.fused.onnx", out / f"vae_up{tag}.fused.onnx"
    fused = fuse_fp16(mid, False, group_norm=group_norm, model_type="vae", dest=fmid, exact=exact)
    fused_up = fuse_fp16(up, False, group_norm=group_norm, model_type="vae", fp16=False, dest=fup, exact=exact)
    merge_vae(fmid, fup, out / f"vae_decoder{tag}.onnx")
    return {k: fused.get(k, 0) + fused_up.get(k, 0) for k in {*fused, *fused_up}}


def export_vae(vae, out: Path, vin, lat_axes, gpu: bool, choice: str, jobs: list) -> str:
    """Exports `vae_decoder.onnx`; returns its precision (the manifest's `vae_precision`)."""
    vmod = VaeDecoder(vae)
    image_axes = {"latent": lat_axes, "image": spatial("image")}
    if not gpu:
        export(vmod, vin, out / "vae_decoder.onnx", ["latent"], ["image"], image_axes)
        check_graph(out / "vae_decoder.onnx", vmod, vin, ["latent"], ["image"])
        return "fp32"
    vae.set_attn_processor(VaeMhaProcessor())
    probe = vae_probe(vae, vin[0] / vae.config.scaling_factor)
    precision = vae_precision(choice, probe)
    print(f"  vae_decoder.onnx: largest activation {probe:.3g} on a probe latent (fp16 max {FP16_MAX:.0f}): "
          f"{precision}" + (" (auto)" if choice == "auto" else ""))
    group_norm = all(c % 64 == 0 for c in vae.config.block_out_channels)
    # the fused decoder, and with a fused GroupNorm its deterministic twin (vae_decoder.exact.onnx)
    twins = [False, True] if group_norm else [False]
    if precision in ("fp16", "fp32"):
        export(vmod, vin, out / "vae_decoder.onnx", ["latent"], ["image"], image_axes)
        check_graph(out / "vae_decoder.onnx", vmod, vin, ["latent"], ["image"])
        if precision == "fp16":
            # the twins read the fp32 graph: it moves aside first (dropped once both are written)
            (out / "vae_decoder.onnx").rename(out / "vae_decoder.fp32.onnx")
            for ex in twins:
                fuse_later_fn(jobs, "vae_decoder" + (".exact" if ex else ""), fuse_vae, out, precision, group_norm, ex)
        return precision
    mid_mod, up_mod = VaeMid(vae), VaeUp(vae)
    with torch.no_grad():
        mid = mid_mod(vin[0])
        err = float((up_mod(mid) - vmod(vin[0])).norm() / vmod(vin[0]).norm())
    assert err < 1e-6, f"VAE mid + up parts differ from the VAE decoder: {err}"
    export(mid_mod, vin, out / "vae_mid.onnx", ["latent"], ["mid"], {"latent": lat_axes, "mid": spatial("mid")})
    check_graph(out / "vae_mid.onnx", mid_mod, vin, ["latent"], ["mid"])
    export(up_mod, [mid], out / "vae_up.onnx", ["mid"], ["image"], {"mid": spatial("mid"), "image": spatial("image")})
    check_graph(out / "vae_up.onnx", up_mod, [mid], ["mid"], ["image"])
    for ex in twins:
        fuse_later_fn(jobs, "vae_decoder" + (".exact" if ex else ""), fuse_vae, out, precision, group_norm, ex)
    return precision


# --no-check: benchmark bundles skip the CPU comparison of each graph with PyTorch (the tiny bundles'
# parity tests and the GPU tests check the same export code); --jobs: fusions run in other processes
CHECK = True
FUSER = None


def fuse_later(jobs: list, path: Path, external: bool, weight_inputs=(), group_norm: bool = True,
               dest: Path | None = None, exact: bool = False):
    """fuse_fp16 of `path` into `dest` in a worker process when --jobs > 1 (the next graph exports
    meanwhile), else now; with `exact`, the deterministic twin too (`<dest stem>.exact.onnx`)."""
    dest = dest or path
    twins = [(dest, False)] + ([(dest.with_suffix(".exact.onnx"), True)] if exact else [])
    for d, ex in twins:
        args = (path, external, list(weight_inputs), group_norm, "unet", True, d, ex)
        jobs.append((d.name, fuse_fp16(*args) if FUSER is None else FUSER.submit(fuse_fp16, *args)))


def fuse_later_fn(jobs: list, name: str, fn, *args):
    """`fn(*args)` in a worker process when --jobs > 1, else now."""
    jobs.append((name, fn(*args) if FUSER is None else FUSER.submit(fn, *args)))


def fused_results(jobs: list) -> dict:
    return {name: (r.result() if hasattr(r, "result") else r) for name, r in jobs}


def check_graph(path: Path, module, args, input_names, output_names, tol=1e-4):
    """ONNX Runtime vs PyTorch on the same (random) inputs."""
    if not CHECK:
        print(f"  {path.name}: not checked against PyTorch (--no-check)")
        return
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: a.detach().numpy() for n, a in zip(input_names, args)}
    got = sess.run(output_names, feeds)
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for name, g, w in zip(output_names, got, want):
        w = w.numpy()
        assert g.shape == w.shape, f"{path.name}:{name} shape {g.shape} != {w.shape}"
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
        worst = max(worst, err)
        if err > tol:
            raise SystemExit(f"{path.name}: output {name} differs from PyTorch (relative error {err:.2e})")
    print(f"  {path.name}: ONNX Runtime vs PyTorch, worst relative error {worst:.1e}")


FP8_PROMPTS = ("a red circle above a blue square", "a green star on a white background")


def prompt_conditioning(te, te2, tok, prompts) -> list[tuple]:
    """SDXL's conditioning of each prompt as a CFG batch [uncond; cond]: encoder_hidden_states (both
    text encoders' penultimate hidden states side by side) and text_embeds (the second's projected
    pooled output), the unconditional half zeros (force_zeros_for_empty_prompt)."""
    eos = tok.token_to_id("<|endoftext|>")
    out = []
    for p in prompts:
        ids = tok.encode(p).ids[:MAX_LEN]
        ids = torch.tensor([ids + [eos] * (MAX_LEN - len(ids))])
        with torch.no_grad():
            h1, _ = TextEncoder(te, False)(ids)
            h2, pooled = TextEncoder(te2, True)(ids)
        ehs = torch.cat([h1, h2], -1)
        out.append((torch.cat([torch.zeros_like(ehs), ehs]), torch.cat([torch.zeros_like(pooled), pooled])))
    return out


def fp8_calibrate(unet, weight_names, size: tuple[int, int], device: str, cond=None, seed: int = 0,
                  timesteps=(999, 750, 500, 250, 20)) -> dict[str, float]:
    """The fp8 activation ranges: max |input| of each nn.Linear whose weight is in `weight_names`,
    over UNet forwards of CFG batches (`cond`: [(encoder_hidden_states, text_embeds)] of batch 2,
    default seeded random) at timesteps spread over the schedule, seeded random latents of `size`
    (height, width) pixels. On CUDA under fp16 autocast; the UNet is back on the CPU afterwards."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    if cond is None:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond = [(torch.randn(2, MAX_LEN, cfg.cross_attention_dim, generator=g), torch.randn(2, pooled, generator=g))]
    amax, hooks = {}, []
    for name in weight_names:
        m = unet.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(m, nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].detach().abs().max().float()
                amax[name] = torch.maximum(amax[name], x) if name in amax else x
            hooks.append(m.register_forward_pre_hook(hook))
    H, W = size
    time_ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32, device=device)
    unet.to(device)
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=device == "cuda"):
            for ehs, text_embeds in cond:
                for t in timesteps:
                    lat = torch.randn(1, cfg.in_channels, H // 8, W // 8, generator=g).repeat(2, 1, 1, 1)
                    unet(lat.to(device), torch.tensor([float(t)] * 2, device=device), ehs.to(device),
                         added_cond_kwargs={"text_embeds": text_embeds.to(device), "time_ids": time_ids})
    finally:
        for h in hooks:
            h.remove()
        unet.to("cpu")
    return {n: float(v) for n, v in amax.items()}


def fp8_graphs(out: Path, cfg: dict, tok, te, te2, unet, weight_names, seed: int):
    """--fp8: calibrates the UNet's activation ranges on two prompts (fp8_amax.json) and writes the
    fp8 UNet graphs and the manifest's `fp8` entry (tools/fp8_rewrite.py)."""
    import fp8_rewrite

    cuda = torch.cuda.is_available()
    size = tuple(cfg["default_size"]) if cuda else tuple(min(s, 256) for s in cfg["default_size"])
    amax = fp8_calibrate(unet, weight_names, size, "cuda" if cuda else "cpu",
                         prompt_conditioning(te, te2, tok, FP8_PROMPTS), seed)
    (out / "fp8_amax.json").write_text(json.dumps(amax, indent=1) + "\n")
    print(f"  fp8: {len(amax)} activation ranges calibrated at {size[0]}x{size[1]} on {'CUDA' if cuda else 'CPU'}")
    fp8_rewrite.rewrite_bundle(out)


def bs(*dims):  # dynamic axis names for batch/latent/image dims
    return {i: d for i, d in enumerate(dims) if d}


def spatial(name):  # a 4-D tensor whose batch and spatial dims vary (named per tensor: they differ)
    return bs("batch", None, f"{name}_h", f"{name}_w")


def export_bundle(cfg, out: Path, seed: int, checkpoint: Path | None, cn_out: Path, check_size: int,
                  attention: str = "sdpa", gpu: bool = False, vae_choice: str = "auto", controlnet: Path | None = None,
                  configs: Path | None = None, controlnet_configs: Path | None = None, locon: bool = True,
                  te_inputs: bool = True, cn_inputs: bool = True, fp8: bool = False,
                  prelude: bool = True, step_rewrite: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    # the tokenizers: a directory's own, or for a single file (which carries none) the config directory's
    tok_dir = None if checkpoint is None else (checkpoint if Path(checkpoint).is_dir() else configs)
    saved = [tok_dir / sub / "tokenizer.json" for sub in ("tokenizer", "tokenizer_2")] if tok_dir else []
    if saved and not saved[0].exists() and not Path(checkpoint).is_dir():
        raise SystemExit(f"{configs}: no tokenizer/tokenizer.json for the single-file checkpoint {checkpoint}")
    if saved and saved[0].exists():
        # the checkpoint's own tokenizer (a trained one's vocabulary), file for file
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(saved[0]))
        shutil.copy(saved[0], out / "tokenizer.json")
        shutil.copy(saved[1] if saved[1].exists() else saved[0], out / "tokenizer_2.json")
    else:
        tok = build_tokenizer(cfg["vocab_size"])
        tok.save(str(out / "tokenizer.json"))
        shutil.copy(out / "tokenizer.json", out / "tokenizer_2.json")
    ids = dict(bos_token_id=tok.token_to_id("<|startoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
               pad_token_id=tok.token_to_id("<|endoftext|>"))
    te, te2, unet, vae, cn = build_models(cfg, seed, checkpoint, ids, controlnet, configs, controlnet_configs)
    if attention == "mha" or gpu:
        unet.set_attn_processor(MhaProcessor())
        cn.set_attn_processor(MhaProcessor())
    big = sum(p.numel() for p in unet.parameters()) > 200_000_000

    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, h = 2, check_size // 8
    ids_in = torch.randint(3, min(cfg["vocab_size"], len(tok.get_vocab())), (B, MAX_LEN), generator=g)
    ids_in[:, 0], ids_in[:, 20:] = ids["bos_token_id"], ids["eos_token_id"]

    print(f"exporting {cfg['name']} into {out}")
    # the text encoders take their LoRA-targetable weights as inputs, like the UNet (bound per job:
    # pristine, or merged with a LoRA's text-encoder part)
    te_weights = {}
    for gname, enc, projected in (("text_encoder", te, False), ("text_encoder_2", te2, True)):
        names = targeted_te_weights(enc) if te_inputs else []
        tparams = dict(enc.named_parameters())
        # without te_inputs (--no-text-encoder-inputs) the graph of bundles exported before the text
        # encoders took weights: the encoder itself, its weights initializers
        mod = WeightInputs(TextEncoder(enc, projected), names, "te.") if te_inputs else TextEncoder(enc, projected)
        wargs = [tparams[n].detach().clone() for n in names]
        inputs = ["input_ids"] + [f"{gname}.{n}" for n in names]
        io = (inputs, ["hidden_states", "pooled"])
        export(mod, [ids_in] + wargs, out / f"{gname}.onnx", *io,
               {"input_ids": bs("batch"), "hidden_states": bs("batch"), "pooled": bs("batch")}, external=big)
        check_graph(out / f"{gname}.onnx", mod, [ids_in] + wargs, *io)
        te_weights[gname] = {f"{gname}.{n}": tparams[n] for n in names}

    ucfg = unet.config
    C, P = ucfg.cross_attention_dim, te2.config.projection_dim
    # GPU bundles: the LoCon targets stay initializers (NhwcConv fusion needs constant convolutions);
    # without `locon` (--no-locon-inputs) neither, as in bundles exported before they were inputs
    weights = targeted_weights(unet, conv=locon and not gpu, time_emb=locon and not gpu)
    params = dict(unet.named_parameters())
    enc_in = [rnd(B, 4, h, h), torch.tensor([999.0, 1.0]), rnd(B, MAX_LEN, C), rnd(B, P),
              torch.tensor([[check_size, check_size, 0, 0, check_size, check_size]] * B, dtype=torch.float32)]
    enc = UNetEncoder(unet)
    with torch.no_grad():
        enc_out = enc(*enc_in)
    n_skips = len(enc_out) - 2
    skip_names = [f"skip_{i}" for i in range(n_skips)]
    lat = bs("batch", None, "height", "width")
    enc_inputs = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    wmod = WeightInputs(enc, weights["unet_encoder"], "unet.")
    wargs = [params[n].detach().clone() for n in weights["unet_encoder"]]
    dyn = {"sample": lat, "timestep": bs("batch"), "encoder_hidden_states": bs("batch"), "text_embeds": bs("batch"),
           "time_ids": bs("batch"), "emb": bs("batch"), "mid": spatial("mid"), **{s: spatial(s) for s in skip_names}}
    # GPU bundles: the fp32 graph is the fusions' source (the fused graph and its deterministic
    # twin, made side by side), dropped once they are written
    src = lambda name: out / (f"{name}.fp32.onnx" if gpu else f"{name}.onnx")  # noqa: E731
    exact = gpu and group_norm_fusable(unet)
    export(wmod, enc_in + wargs, src("unet_encoder"), enc_inputs + weights["unet_encoder"],
           ["emb", "mid", *skip_names], dyn, external=big)
    check_graph(src("unet_encoder"), wmod, enc_in + wargs, enc_inputs + weights["unet_encoder"],
                ["emb", "mid", *skip_names])
    jobs = []  # fusions (GPU bundles), each once its fp32 graph was checked against PyTorch
    if gpu:
        fuse_later(jobs, src("unet_encoder"), big, weights["unet_encoder"], group_norm_fusable(unet),
                   out / "unet_encoder.onnx", exact)

    dec = UNetDecoder(unet)
    dec_in = [enc_out[0], enc_in[2], enc_out[1], *enc_out[2:]]
    dec_inputs = ["emb", "encoder_hidden_states", "mid", *skip_names]
    wmod = WeightInputs(dec, weights["unet_decoder"], "unet.")
    wargs = [params[n].detach().clone() for n in weights["unet_decoder"]]
    dyn = {"emb": bs("batch"), "encoder_hidden_states": bs("batch"), "mid": spatial("mid"), "noise_pred": lat,
           **{s: spatial(s) for s in skip_names}}
    export(wmod, dec_in + wargs, src("unet_decoder"), dec_inputs + weights["unet_decoder"], ["noise_pred"],
           dyn, external=big)
    check_graph(src("unet_decoder"), wmod, dec_in + wargs, dec_inputs + weights["unet_decoder"], ["noise_pred"])
    if gpu:
        fuse_later(jobs, src("unet_decoder"), big, weights["unet_decoder"], group_norm_fusable(unet),
                   out / "unet_decoder.onnx", exact)
    # the split graphs compose to the whole UNet
    with torch.no_grad():
        whole = unet(enc_in[0], enc_in[1], enc_in[2], added_cond_kwargs={"text_embeds": enc_in[3],
                                                                         "time_ids": enc_in[4]}).sample
        split = dec(*dec_in)
    err = float((split - whole).norm() / whole.norm())
    assert err < 1e-5, f"split UNet differs from the whole UNet: {err}"
    print(f"  encoder+decoder vs UNet2DConditionModel: relative error {err:.1e}")

    vin = [rnd(1, 4, h, h)]
    vae_prec = export_vae(vae, out, vin, lat, gpu, vae_choice, jobs)

    from safetensors.torch import save_file

    all_w = weights["unet_encoder"] + weights["unet_decoder"]
    # GPU bundles' graphs take the weights as f16: stored so, a load reads half the bytes and
    # converts nothing
    wdtype = torch.float16 if gpu else torch.float32
    tensors = {n: params[n].detach().to(wdtype).contiguous() for n in all_w}
    # the text encoders' graphs compute in fp32 on every device: their weights are stored so
    tensors.update({n: p.detach().float().contiguous() for g in TE_GRAPHS for n, p in te_weights[g].items()})
    save_file(tensors, str(out / "weights.safetensors"))
    signature = f"sdxl:c{C}:b{'-'.join(map(str, ucfg.block_out_channels))}"
    manifest = {
        "format": 1, "kind": "base", "name": cfg["name"], "architecture": "sdxl", "signature": signature,
        "dtype": "float16" if gpu else "float32", "compute": "fp16-cuda" if gpu else "fp32", "latent_channels": ucfg.in_channels, "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "scaling_factor": vae.config.scaling_factor, "prediction_type": "epsilon",
        "default_size": cfg["default_size"], "default_steps": cfg["default_steps"],
        "default_guidance": cfg["default_guidance"], "force_zeros_for_empty_prompt": True,
        "scheduler": {k: SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                "timestep_spacing", "steps_offset", "prediction_type")},
        "text_encoders": [
            {"graph": "text_encoder.onnx", "tokenizer": "tokenizer.json", "max_length": MAX_LEN,
             "hidden_size": te.config.hidden_size, "pooled_size": te.config.hidden_size},
            {"graph": "text_encoder_2.onnx", "tokenizer": "tokenizer_2.json", "max_length": MAX_LEN,
             "hidden_size": te2.config.hidden_size, "pooled_size": P},
        ],
        "unet": {"encoder": "unet_encoder.onnx", "decoder": "unet_decoder.onnx", "cross_attention_dim": C,
                 "pooled_dim": P, "skips": n_skips, "emb_dim": int(enc_out[0].shape[1])},
        "vae_decoder": "vae_decoder.onnx", "vae_precision": vae_prec,
        "vae_sample_size": int(vae.config.sample_size if isinstance(vae.config.sample_size, int)
                               else vae.config.sample_size[0]),
        # the graphs whose convolutions (LoCon targets) are inputs: none in GPU bundles
        "weights": {"file": "weights.safetensors",
                    "conv_graphs": ["unet_encoder", "unet_decoder"] if locon and not gpu else [], "map": {
            **{n: {"graph": gname, "shape": list(params[n].shape)} for gname in ("unet_encoder", "unet_decoder")
               for n in weights[gname]},
            **{n: {"graph": g, "shape": list(p.shape)} for g in TE_GRAPHS for n, p in te_weights[g].items()}}},
    }
    # the graphs that give deterministic output (docs/bundles.md, "exact"): the twins without
    # fused GroupNorm, or the graphs themselves where nothing nondeterministic was fused
    if gpu:
        tag = lambda twin: ".exact" if twin else ""  # noqa: E731
        vae_twin = vae_prec != "fp32" and all(c % 64 == 0 for c in vae.config.block_out_channels)
        manifest["exact"] = {"unet_encoder": f"unet_encoder{tag(exact)}.onnx",
                             "unet_decoder": f"unet_decoder{tag(exact)}.onnx",
                             "vae_decoder": f"vae_decoder{tag(vae_twin)}.onnx"}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")

    # ControlNet bundle: its LoRA-targetable Linear weights are graph inputs too (weights.safetensors
    # beside the graph), so that the sessions of every shape bucket read one copy of them
    cn_out.mkdir(parents=True, exist_ok=True)
    # without cn_inputs (--no-controlnet-inputs) every weight stays inside the graph, as in
    # ControlNet bundles exported before
    cn_w = targeted_cn_weights(cn) if cn_inputs else []
    cparams = dict(cn.named_parameters())
    cmod = WeightInputs(ControlNet(cn), cn_w, "cn.") if cn_w else ControlNet(cn)
    cwargs = [cparams[n].detach().clone() for n in cn_w]
    cin = enc_in + [torch.rand(B, 3, check_size, check_size, generator=g)]
    cn_inputs = enc_inputs + ["controlnet_cond"] + cn_w
    cn_outputs = [f"down_{i}" for i in range(n_skips)] + ["mid"]
    dyn = {"sample": lat, "timestep": bs("batch"), "encoder_hidden_states": bs("batch"), "text_embeds": bs("batch"),
           "time_ids": bs("batch"), "controlnet_cond": bs("batch", None, "image_height", "image_width"),
           **{o: spatial(o) for o in cn_outputs}}
    export(cmod, cin + cwargs, cn_out / "controlnet.onnx", cn_inputs, cn_outputs, dyn, external=big)
    check_graph(cn_out / "controlnet.onnx", cmod, cin + cwargs, cn_inputs, cn_outputs)
    if gpu:
        fuse_later(jobs, cn_out / "controlnet.onnx", big, cn_w, group_norm=group_norm_fusable(unet))
    if cn_w:
        save_file({n: cparams[n].detach().to(wdtype).contiguous() for n in cn_w}, str(cn_out / "weights.safetensors"))
    fused_results(jobs)  # waits for the fusions; a failed one raises here
    for f in [*out.glob("*.fp32.onnx*"), out / "vae_mid.onnx", out / "vae_up.onnx"]:
        f.unlink(missing_ok=True)  # the fusions' sources
    if prelude:  # before the fp8 rewrite: its graphs are made from the hoisted ones
        import job_prelude
        job_prelude.hoist_bundle(out)
    if gpu and step_rewrite:  # before the fp8 rewrite: its graphs are made from the rewritten ones
        import step_rewrite as sr
        for f, c in sr.rewrite_bundle(out).items():
            print(f"  {f}: {c['BiasSplitGelu']} GEGLUs and {c['LayerNorm']} layer norms katz's, "
                  f"{c['conv biases']} convolution biases folded")
    if fp8:
        fp8_graphs(out, cfg, tok, te, te2, unet, weights["unet_encoder"] + weights["unet_decoder"], seed)
    cn_manifest = {
        "format": 1, "kind": "controlnet", "name": cn_out.name, "architecture": "sdxl", "signature": signature,
        "dtype": "float16" if gpu else "float32", "compute": "fp16-cuda" if gpu else "fp32", "graph": "controlnet.onnx",
        "conditioning_channels": 3, "residuals": n_skips,
    }
    if cn_w:
        cn_manifest["weights"] = {"file": "weights.safetensors",
                                  "map": {n: {"graph": "controlnet", "shape": list(cparams[n].shape)} for n in cn_w}}
    (cn_out / "bundle.json").write_text(json.dumps(cn_manifest, indent=1) + "\n")
    if prelude:  # its text keys and values, and its image's embedding, once per job
        import job_prelude
        job_prelude.hoist_controlnet_bundle(cn_out)
    if gpu and step_rewrite:
        import step_rewrite as sr
        for f, c in sr.rewrite_bundle(cn_out).items():
            print(f"  {f}: {c['BiasSplitGelu']} GEGLUs and {c['LayerNorm']} layer norms katz's, "
                  f"{c['conv biases']} convolution biases folded")
    return tok, (te, te2, unet, vae, cn), weights


# ───────────────────────────── LoRAs ─────────────────────────────


def make_lora(unet, path: Path, rank: int, alpha: float, seed: int, every: int = 1, names=None,
              dtype=torch.float32):
    """A LoRA in the diffusers/peft layout (`unet.<module>.lora_A/B.weight`, alpha in the
    safetensors metadata) with seeded random A and B (peft would zero B: no effect to test).
    `names`: the UNet modules to adapt (default: every katz-targetable Linear, `every` n-th);
    `dtype`: the tensors' type in the file (values drawn in f32 either way)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    if names is None:
        names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and TARGET_RE.search(n)][::every]
    sd = {}
    for n in names:
        m = unet.get_submodule(n)
        a = torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features)
        b = torch.randn(m.out_features, rank, generator=g) * 0.1
        sd[f"unet.{n}.lora_A.weight"] = a.to(dtype)
        sd[f"unet.{n}.lora_B.weight"] = b.to(dtype)
    targets = sorted({n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names})
    # diffusers' save_lora_weights writes the peft LoraConfig with the component prefix
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": targets}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    return path


# ───────────────────────────── parity references ─────────────────────────────


def conditioning_image(size: tuple[int, int], kind: str, seed: int):
    """An edge-map-like RGB image: white outlines of shapes on black."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        x1, y1 = x0 + rng.integers(w // 6, w // 2), y0 + rng.integers(h // 6, h // 2)
        if kind == "circle":
            d.ellipse([x0, y0, x1, y1], outline=(255, 255, 255), width=max(1, w // 32))
        else:
            d.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=max(1, w // 32))
        kind = "square" if kind == "circle" else "circle"
    return img


def run_references(models, bundle: Path, cn_bundle: Path, loras: dict, images: dict, out: Path, seed: int,
                   cases: list | None = None, bundle_names: tuple[str, str] = ("bundles/tiny-sdxl", "bundles/tiny-sdxl-controlnet"),
                   about: str = "diffusers reference runs on the tiny bundles (tools/export_bundle.py)"):
    """diffusers' pipelines on `models` with recorded noise, per case (default: the tiny bundles'
    cases); writes OUT/<case>.safetensors and OUT/cases.json naming the bundles `bundle_names`."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod
    from safetensors.torch import save_file

    te, te2, unet, vae, cn = models
    tokenizer = hf_tokenizer(bundle / "tokenizer.json")
    tokenizer_2 = hf_tokenizer(bundle / "tokenizer_2.json")
    base_sched = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items()
                                           if k not in ("set_alpha_to_one", "clip_sample", "skip_prk_steps",
                                                        "sample_max_value")})
    base_sched.register_to_config(set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
                                  sample_max_value=1.0)

    def scheduler(kind: str):
        karras = kind.endswith("-karras")
        kind = kind.removesuffix("-karras")
        cls = {"euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler,
               "dpm++2m": DPMSolverMultistepScheduler}[kind]
        extra = {"use_karras_sigmas": True} if karras else {}
        if kind == "dpm++2m":
            extra.update(algorithm_type="dpmsolver++", solver_order=2)
        return cls.from_config(base_sched.config, **extra)

    cases = cases or [
        dict(name="euler", scheduler="euler", prompt="a red circle above a blue square", steps=4),
        dict(name="euler_karras_negative", scheduler="euler-karras", prompt="a green star on a white background",
             negative_prompt="blurry lowres", steps=4),
        dict(name="euler_a", scheduler="euler-a", prompt="a yellow triangle left of a purple ring", steps=4),
        dict(name="ddim", scheduler="ddim", prompt="a pink heart in the centre", negative_prompt="ugly", steps=4),
        dict(name="dpmpp_2m", scheduler="dpm++2m", prompt="an orange moon above a dark sea", steps=5),
        dict(name="dpmpp_2m_karras_wide", scheduler="dpm++2m-karras", prompt="a small cube next to a sphere",
             steps=4, width=96, height=64),
        dict(name="controlnet", scheduler="euler", prompt="a white circle on a black background", steps=4,
             controlnets=[dict(image="bundles/examples/cond_a.png", scale=0.8, start=0.0, end=1.0)]),
        dict(name="lora", scheduler="euler", prompt="a striped blue square", steps=4,
             loras=[dict(file="bundles/loras/tiny-lora-a.safetensors", scale=0.8)]),
        dict(name="two_controlnets_two_loras", scheduler="euler-a", prompt="a pastel flower and a tree", steps=4,
             negative_prompt="watermark",
             controlnets=[dict(image="bundles/examples/cond_a.png", scale=0.7, start=0.0, end=1.0),
                          dict(image="bundles/examples/cond_b.png", scale=0.5, start=0.25, end=0.75)],
             loras=[dict(file="bundles/loras/tiny-lora-a.safetensors", scale=0.6), dict(file="bundles/loras/tiny-lora-b.safetensors", scale=-0.4)]),
    ]
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 100)
    records = []
    for case in cases:
        case.setdefault("negative_prompt", None)
        case.setdefault("guidance", 5.0)
        case.setdefault("width", 64)
        case.setdefault("height", 64)
        case.setdefault("controlnets", [])
        case.setdefault("loras", [])
        h, w = case["height"] // 8, case["width"] // 8
        init = torch.randn(1, 4, h, w, generator=g)
        noises = [torch.randn(1, 4, h, w, generator=g) for _ in range(case["steps"])]
        tensors = {"init_noise": init}
        sched = scheduler(case["scheduler"])
        common = dict(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                      unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
        if case["controlnets"]:
            cnm = cn if len(case["controlnets"]) == 1 else MultiControlNetModel([cn] * len(case["controlnets"]))
            pipe = StableDiffusionXLControlNetPipeline(controlnet=cnm, **common)
        else:
            pipe = StableDiffusionXLPipeline(**common)
        pipe.set_progress_bar_config(disable=True)
        names = []
        for i, lo in enumerate(case["loras"]):
            pipe.load_lora_weights(str(loras[lo["file"]]), adapter_name=f"l{i}")
            names.append(f"l{i}")
        if names:
            pipe.set_adapters(names, adapter_weights=[lo["scale"] for lo in case["loras"]])
        latents_seen = []

        def on_step(p, i, t, kw):
            latents_seen.append(kw["latents"].detach().clone())
            return kw

        queue = list(noises)
        orig = ea_mod.randn_tensor
        ea_mod.randn_tensor = lambda *a, **k: queue.pop(0).clone()
        kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                      width=case["width"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                      latents=init.clone(), output_type="pt", callback_on_step_end=on_step)
        if case["controlnets"]:
            from PIL import Image

            imgs = [Image.open(images[c["image"]]).convert("RGB") for c in case["controlnets"]]
            one = len(imgs) == 1
            kwargs.update(image=imgs[0] if one else imgs,
                          controlnet_conditioning_scale=case["controlnets"][0]["scale"] if one else [c["scale"] for c in case["controlnets"]],
                          control_guidance_start=case["controlnets"][0]["start"] if one else [c["start"] for c in case["controlnets"]],
                          control_guidance_end=case["controlnets"][0]["end"] if one else [c["end"] for c in case["controlnets"]])
        try:
            with torch.no_grad():
                image = pipe(**kwargs).images
        finally:
            ea_mod.randn_tensor = orig
        if names:
            pipe.unload_lora_weights()
        if case["scheduler"].startswith("euler-a"):
            assert not queue, "ancestral sampler did not draw one noise tensor per step"
            tensors.update({f"step_noise_{i}": n for i, n in enumerate(noises)})
        tensors.update({f"latents_{i}": l for i, l in enumerate(latents_seen)})
        tensors["image"] = image.float()
        tok_ids = [tokenizer(case["prompt"], padding="max_length", max_length=MAX_LEN, truncation=True,
                             return_tensors="pt").input_ids]
        tensors["input_ids"] = tok_ids[0].to(torch.int64)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{case['name']}.safetensors"))
        case["tensors"] = f"{case['name']}.safetensors"
        records.append(case)
        print(f"  reference {case['name']}: {case['steps']} steps, image {tuple(image.shape)}, "
              f"|latents| {latents_seen[-1].abs().mean():.3f}")
    (out / "cases.json").write_text(json.dumps({
        "about": f"{about}; latents_<i> after step i",
        "bundle": bundle_names[0], "controlnet": bundle_names[1],
        "cases": records}, indent=1) + "\n")


def repo_relative(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def checkpoint_references(models, bundle: Path, cn_bundle: Path, out: Path, seed: int, checkpoint: Path):
    """Parity references of a checkpoint export: diffusers' pipelines on the modules diffusers loaded
    from the checkpoint itself (`load_checkpoint`: from_single_file for a file), recorded noise; an
    Euler, an ancestral (with a negative prompt) and a ControlNet case at 64², 4 steps."""
    ex = REPO / "bundles" / "examples"
    cond = "bundles/examples/cond_a.png"
    cases = [
        dict(name="ckpt_euler", scheduler="euler", prompt="a red circle above a blue square", steps=4),
        dict(name="ckpt_euler_a_negative", scheduler="euler-a", prompt="a green star on a white background",
             negative_prompt="blurry", steps=4),
        dict(name="ckpt_controlnet", scheduler="euler", prompt="a white circle on a black background", steps=4,
             controlnets=[dict(image=cond, scale=0.8, start=0.0, end=1.0)]),
    ]
    run_references(models, bundle, cn_bundle, {}, {cond: ex / "cond_a.png"}, out, seed, cases=cases,
                   bundle_names=(repo_relative(bundle), repo_relative(cn_bundle)),
                   about=f"diffusers reference runs on the checkpoint {repo_relative(checkpoint)} as diffusers loads it "
                         "(tools/export_bundle.py --checkpoint ... --references)")


# ───────────────────────────── main ─────────────────────────────


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "sdxl"], default="tiny")
    ap.add_argument("--random-init", action="store_true", help="seeded random weights (no checkpoint needed)")
    ap.add_argument("--checkpoint", type=Path, metavar="PATH",
                    help="an SDXL base checkpoint: a diffusers directory, or one .safetensors/.ckpt file in the "
                         "original (SGM) layout of model sites, loaded with diffusers' from_single_file")
    ap.add_argument("--checkpoint-config", type=Path, metavar="DIR",
                    help="from_single_file's config= for a single-file --checkpoint: a diffusers directory without "
                         "weights (default tools/configs/<--config>/)")
    ap.add_argument("--controlnet-checkpoint", type=Path, metavar="PATH",
                    help="export this ControlNet (a diffusers directory, or one file in diffusers' or the original "
                         "key layout) instead of ControlNetModel.from_unet(unet)")
    ap.add_argument("--controlnet-config", type=Path, metavar="DIR",
                    help="the config.json directory for a single-file --controlnet-checkpoint (default: the "
                         "configuration ControlNetModel.from_unet gives for the base UNet)")
    ap.add_argument("--references", type=Path, metavar="DIR",
                    help="with --checkpoint: also write diffusers parity references of the checkpoint itself "
                         "into DIR (cases.json + tensors, tests/parity.rs's format)")
    ap.add_argument("--out", type=Path, help="bundle directory (default bundles/tiny-sdxl or bundles/sdxl)")
    ap.add_argument("--name", help="the base bundle's model name (default the config's: tiny-sdxl or sdxl); "
                                   "its ControlNet is named after the ControlNet's directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-references", action="store_true", help="skip the diffusers parity references")
    ap.add_argument("--attention", choices=["sdpa", "mha"], default="sdpa",
                    help="mha: UNet/ControlNet attention as com.microsoft.MultiHeadAttention (the GPU recipe's first step)")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU bundle: MultiHeadAttention export + ONNX Runtime fusions + fp16 compute (CUDA only)")
    ap.add_argument("--vae-precision", choices=VAE_PRECISIONS, default="auto",
                    help="GPU bundles' VAE decoder: fp16 (fused, fp16 throughout), fp16-upcast (fused; the up "
                         "blocks in fp32, as diffusers' upcast_vae), fp32 (unfused); auto (default): fp16 unless "
                         "a probe decode's activations come within 1/8 of fp16's range, then fp16-upcast")
    ap.add_argument("--no-check", action="store_true",
                    help="skip each graph's CPU comparison with PyTorch (benchmark bundles; the tiny bundles' parity tests check the exporter)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes for the GPU fusions (>1: fusions overlap the next graph's export)")
    ap.add_argument("--no-text-encoder-inputs", action="store_true",
                    help="the text encoders' LoRA-targetable weights stay initializers, as in bundles exported before "
                         "they were inputs (tools/shapes/ckpt_from_bundle.py probes those)")
    ap.add_argument("--no-locon-inputs", action="store_true",
                    help="keep the UNet's LoCon targets (convolutions, time_emb_proj) as initializers, as bundles "
                         "exported before they were inputs (tools/shapes/ckpt_from_bundle.py probes those)")
    ap.add_argument("--no-controlnet-inputs", action="store_true",
                    help="keep every ControlNet weight inside its graph, as ControlNet bundles exported before their "
                         "Linear weights were inputs (tools/shapes/ckpt_from_bundle.py probes those)")
    ap.add_argument("--no-prelude", action="store_true",
                    help="keep the UNet pair and the ControlNet whole: without it, what their step graphs compute "
                         "from the conditioning, image and weights alone (cross-attention keys and values, "
                         "the added embedding, the ControlNet's image embedding) moves into "
                         "unet_prelude.onnx / controlnet_prelude.onnx, run once per job (tools/job_prelude.py)")
    ap.add_argument("--no-step-rewrite", action="store_true",
                    help="with --gpu: keep ONNX Runtime's operators where katz has faster ones, and the "
                         "convolution biases in the convolutions (tools/step_rewrite.py: katz's GEGLU, "
                         "biases folded into the group norms after them)")
    ap.add_argument("--fp8", action="store_true",
                    help="with --gpu: also calibrate the UNet's activation ranges (fp8_amax.json) and write fp8 "
                         "UNet graphs (unet_*.fp8.onnx, tools/fp8_rewrite.py) and the manifest's fp8 entry")
    ap.add_argument("--example-lora", type=Path, metavar="FILE",
                    help="also write a seeded rank-8 LoRA (diffusers/peft layout) for this bundle's UNet")
    a = ap.parse_args(argv)
    if a.config == "sdxl" and not (a.random_init or a.checkpoint):
        ap.error("--config sdxl needs --random-init or --checkpoint DIR")
    configs = a.checkpoint_config or config_dir(a.config)
    if a.checkpoint:
        # the layout and family are checked before any export work (tools/checkpoints.py)
        import checkpoints

        try:
            layout = checkpoints.base_checkpoint(a.checkpoint)
            if a.controlnet_checkpoint:
                cn_layout = checkpoints.controlnet_checkpoint(a.controlnet_checkpoint)
        except checkpoints.CheckpointError as e:
            ap.exit(2, f"export_bundle.py: error: {e}\n")
        if layout.kind == "single-file" and not (configs / "model_index.json").exists():
            ap.error(f"{configs}: no model_index.json (--checkpoint-config: the diffusers configuration of a "
                     "single-file checkpoint)")
        if layout.kind == "single-file" and not (configs / "tokenizer" / "tokenizer.json").exists():
            ap.error(f"{configs}: no tokenizer/tokenizer.json; a single-file checkpoint carries no tokenizer, so "
                     "its config directory must (docs/bundles.md, \"Checkpoints\")")
        print(f"checkpoint {a.checkpoint}: {layout.family}, {layout.kind}"
              + (f" (configured by {configs})" if layout.kind == "single-file" else "")
              + (f"; ControlNet {a.controlnet_checkpoint}: {cn_layout.kind}" if a.controlnet_checkpoint else ""))
    elif a.controlnet_checkpoint or a.references:
        ap.error("--controlnet-checkpoint and --references go with --checkpoint")
    if a.fp8 and not a.gpu:
        ap.error("--fp8 goes with --gpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = tiny_config() if a.config == "tiny" else sdxl_config()
    if a.name:
        cfg["name"] = a.name
    out = a.out or REPO / "bundles" / cfg["name"]
    cn_out = out.parent / (out.name + "-controlnet")
    check = 64 if a.config == "tiny" else 128
    if a.gpu and a.config == "tiny" and not a.no_references and a.out is None:
        ap.error("--gpu writes a CUDA-only bundle: give --out (the committed tiny bundles stay fp32)")
    global CHECK, FUSER
    CHECK = not a.no_check
    if a.jobs > 1 and a.gpu:
        import concurrent.futures
        import multiprocessing

        FUSER = concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        tok, models, _ = export_bundle(cfg, out, a.seed, a.checkpoint, cn_out, check, a.attention, a.gpu,
                                       a.vae_precision, a.controlnet_checkpoint, configs, a.controlnet_config,
                                       locon=not a.no_locon_inputs, te_inputs=not a.no_text_encoder_inputs,
                                       cn_inputs=not a.no_controlnet_inputs, fp8=a.fp8,
                                       prelude=not a.no_prelude, step_rewrite=not a.no_step_rewrite)
    finally:
        if FUSER is not None:
            FUSER.shutdown()
    if a.example_lora:
        make_lora(models[2], a.example_lora, rank=8, alpha=8.0, seed=a.seed + 13)
        print(f"  example LoRA: {a.example_lora}")
    if a.checkpoint and a.references and not a.no_references:
        checkpoint_references(models, out, cn_out, a.references, a.seed, a.checkpoint)
    if a.config != "tiny" or a.no_references or a.checkpoint:
        return  # the committed LoRAs, examples and parity references belong to the seeded tiny bundles
    loras = {
        "bundles/loras/tiny-lora-a.safetensors": make_lora(models[2], REPO / "bundles" / "loras" / "tiny-lora-a.safetensors",
                                             rank=4, alpha=8.0, seed=a.seed + 11),
        "bundles/loras/tiny-lora-b.safetensors": make_lora(models[2], REPO / "bundles" / "loras" / "tiny-lora-b.safetensors",
                                             rank=2, alpha=2.0, seed=a.seed + 12, every=2),
    }
    images = {}
    ex = REPO / "bundles" / "examples"
    ex.mkdir(parents=True, exist_ok=True)
    for name, kind, size, s in (("cond_a.png", "circle", (64, 64), 1), ("cond_b.png", "square", (64, 64), 2),
                                ("edges-128.png", "circle", (128, 128), 3)):
        conditioning_image(size, kind, s).save(ex / name)
        images[f"bundles/examples/{name}"] = ex / name
    run_references(models, out, cn_out, loras, images, REPO / "tests" / "data" / "parity", a.seed)


if __name__ == "__main__":
    sys.exit(main())
