"""What a `--checkpoint` / `--controlnet-checkpoint` path holds, decided before any export work.

    PATH ─┬─ directory with model_index.json + unet/config.json ─▶ Layout("diffusers-dir")
          ├─ directory with config.json (a ControlNet's)        ─▶ Layout("diffusers-dir")
          └─ file .safetensors / .ckpt / .pt / .bin
               header (safetensors) or pickle (torch.load, weights only) ─▶ key names and shapes
               ─▶ diffusers' own `infer_diffusers_model_type` + the SGM structure test below
               ─▶ Layout("single-file", family) or CheckpointError naming the file and the family

Only SDXL base checkpoints are exported (the SGM "original" layout of model sites: `model.diffusion_model.*`,
`first_stage_model.*`, `conditioner.embedders.{0,1}.*`). diffusers tells SDXL by the tenth layer of its
second text encoder (`CHECKPOINT_KEY_NAMES["xl_base"]`); narrower test models have fewer layers, so a
file is also SDXL when it has the SGM pieces only SDXL has together: both conditioner text encoders and the
UNet's text-time embedding (`label_emb`), and no transformer of SD3/FLUX. Everything else is refused with
the family diffusers names (SD 1.x/2.x, SD3, the SDXL refiner or inpainting model, FLUX, ...).

A single ControlNet file may be in diffusers' key layout (`controlnet_cond_embedding.*`, as most SDXL
ControlNets are published) or the original one (`control_model.*`); `ControlNetModel.from_single_file`
reads both.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# diffusers' model type ─▶ the family named in errors
FAMILIES = {
    "v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x", "inpainting": "Stable Diffusion 1.x inpainting",
    "inpainting_v2": "Stable Diffusion 2.x inpainting", "xl_base": "SDXL", "xl_refiner": "SDXL refiner",
    "xl_inpaint": "SDXL inpainting", "playground-v2-5": "Playground v2.5 (SDXL with EDM sampling)",
    "upscale": "Stable Diffusion x4 upscaler", "sd3": "Stable Diffusion 3", "sd35_medium": "Stable Diffusion 3.5 Medium",
    "sd35_large": "Stable Diffusion 3.5 Large", "instruct-pix2pix": "InstructPix2Pix",
    "controlnet": "a Stable Diffusion 1.x/2.x ControlNet",
    **{f"controlnet_xl_{s}": "an SDXL ControlNet (give it as --controlnet-checkpoint)" for s in ("small", "mid", "large")},
}


class CheckpointError(Exception):
    """A checkpoint the exporter cannot take; the message names the file and why."""


@dataclass(frozen=True)
class Layout:
    kind: str            # "diffusers-dir" | "single-file"
    path: Path
    family: str          # "SDXL", "SDXL ControlNet", ...
    diffusers_type: str  # what diffusers' infer_diffusers_model_type said ("" for directories)


class _Shape:
    """What diffusers' detection reads of a tensor: its shape (no data is loaded)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def read_keys(path: Path) -> dict[str, _Shape]:
    """Tensor names and shapes of a single-file checkpoint; a damaged file is a CheckpointError."""
    if path.suffix == ".safetensors":
        return _safetensors_keys(path)
    import torch

    try:
        obj = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, foreign objects
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: _Shape(v.shape) for k, v in obj.items() if hasattr(v, "shape")}


def _safetensors_keys(path: Path) -> dict[str, _Shape]:
    """The header through the safetensors library, its failures turned into errors naming the file
    (the library's own messages say what is wrong: "header too large", "invalid JSON", ...)."""
    from safetensors import safe_open

    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its header length)")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        (n,) = struct.unpack("<Q", path.open("rb").read(8))
        detail = f"header of {n} bytes in a file of {size}" if n + 8 > size else str(e)
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({detail})") from None


def _is_sgm_sdxl(keys) -> bool:
    return ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
            and "conditioner.embedders.1.model.positional_embedding" in keys
            and "model.diffusion_model.label_emb.0.0.weight" in keys
            and not any(k.startswith(("model.diffusion_model.joint_blocks.", "model.diffusion_model.double_blocks."))
                        for k in keys))


def family_of(keys: dict) -> tuple[str, str]:
    """(family, diffusers' model type) of a base-model state dict's keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(keys)
    if kind == "xl_base" or (kind == "v1" and _is_sgm_sdxl(keys)):
        # an inpainting/refiner/EDM SDXL is caught by diffusers before xl_base and v1
        return "SDXL", kind
    if kind == "v1" and not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("down_blocks.", "transformer_blocks.", "conv_in.")) for k in keys):
            return "a single diffusers component (diffusers key names, no text encoders or VAE)", kind
        return "no diffusion model diffusers knows", kind
    return FAMILIES.get(kind, kind), kind


def base_checkpoint(path: Path) -> Layout:
    """The `--checkpoint` input, checked: a diffusers SDXL directory or an SDXL single file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "unet" / "config.json").exists():
            raise CheckpointError(f"{path}: not a diffusers checkpoint directory (no unet/config.json)")
        index = path / "model_index.json"
        cls = json.loads(index.read_text()).get("_class_name", "") if index.exists() else ""
        if cls and "XL" not in cls:
            raise CheckpointError(f"{path}: a diffusers {cls} directory; katz exports SDXL base models only")
        unet = json.loads((path / "unet" / "config.json").read_text())
        if unet.get("addition_embed_type") != "text_time" or unet.get("in_channels") != 4:
            raise CheckpointError(f"{path}: its UNet is not an SDXL base UNet (addition_embed_type "
                                  f"{unet.get('addition_embed_type')!r}, in_channels {unet.get('in_channels')})")
        return Layout("diffusers-dir", path, "SDXL", "")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: not a checkpoint (a diffusers directory or a "
                              f"{'/'.join(SINGLE_FILE_SUFFIXES)} file)")
    family, kind = family_of(read_keys(path))
    if family != "SDXL":
        raise CheckpointError(f"{path}: detected {family} (diffusers model type {kind!r}); "
                              "katz exports SDXL base checkpoints only")
    return Layout("single-file", path, family, kind)


def controlnet_checkpoint(path: Path) -> Layout:
    """The `--controlnet-checkpoint` input: a diffusers ControlNet directory or a single file in
    diffusers' or the original key layout."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{path}: not a diffusers ControlNet directory (no config.json)")
        cls = json.loads(cfg.read_text()).get("_class_name", "")
        if cls != "ControlNetModel":
            raise CheckpointError(f"{path}: a diffusers {cls or 'model'} directory, not a ControlNetModel")
        return Layout("diffusers-dir", path, "SDXL ControlNet", "")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    keys = read_keys(path)
    if "controlnet_cond_embedding.conv_in.weight" in keys or "control_model.input_hint_block.0.weight" in keys \
            or "input_hint_block.0.weight" in keys:
        sdxl = any(k.endswith(("add_embedding.linear_1.weight", "label_emb.0.0.weight")) for k in keys)
        if not sdxl:
            raise CheckpointError(f"{path}: a ControlNet without SDXL's text-time embedding "
                                  "(a Stable Diffusion 1.x/2.x ControlNet); katz takes SDXL ControlNets only")
        return Layout("single-file", path, "SDXL ControlNet", "controlnet")
    family, kind = family_of(keys)
    raise CheckpointError(f"{path}: not a ControlNet (detected {family}, diffusers model type {kind!r})")
