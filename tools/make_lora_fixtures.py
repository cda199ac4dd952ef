#!/usr/bin/env python3
"""Builds the LoRA fixtures of tests/data/lora/ and their diffusers references in tests/data/parity-lora/
with the reference tools (peft + diffusers): no key name is written by this script.

    .venv-tools/bin/python tools/make_lora_fixtures.py          # (tools/export.sh --help makes the venv)

Data flow (everything seeded; diffusers, peft and transformers as pinned in requirements-export.txt):

    tests/data/checkpoints/tiny-sdxl.safetensors ─▶ export_bundle.build_models (from_single_file with
      tools/configs/tiny, as `export_bundle.py --checkpoint` loads it; the katz bundle is bundles/tiny-ckpt)
      ├─▶ per LoRA and component, a copy of the module ─▶ torch.manual_seed ─▶ module.add_adapter(
      │     peft LoraConfig(r=4, lora_alpha≠r, init_lora_weights=False, target_modules=…))
      │     ─▶ lora_B × B_SCALE ─▶ get_peft_model_state_dict
      ├─▶ StableDiffusionXLPipeline.save_lora_weights(unet_/text_encoder_/text_encoder_2_lora_layers,
      │     *_lora_adapter_metadata = module.peft_config["default"].to_dict(), as diffusers'
      │     training_utils._collate_lora_metadata) ─▶ peft-te.safetensors, peft-te-only.safetensors,
      │     peft-locon.safetensors (UNet Conv2d layers and time_emb_proj, text_encoder_2),
      │     peft-dora.safetensors (use_dora=True; lora_magnitude_vector × 1 ± MAG_JITTER)
      ├─▶ the same files' state dict (unet./text_encoder./text_encoder_2. prefixes, as written)
      │     ─▶ diffusers.utils.convert_state_dict_to_kohya ─▶ `.alpha` set to lora_alpha (see below)
      │     ─▶ kohya-te.safetensors, kohya-locon.safetensors (UNet Linear + Conv2d layers)
      ├─▶ check: pipe.load_lora_weights of each file adapts exactly the targeted modules of unet,
      │     text_encoder and text_encoder_2 (modules with `lora_A`, counted per component)
      └─▶ export_bundle.run_references (StableDiffusionXLPipeline, load_lora_weights + set_adapters,
            recorded noise) ─▶ tests/data/parity-lora/<case>.safetensors + cases.json;
            the same cases without LoRAs (same noise) give the relative effect printed per case

LoRA factors: init_lora_weights=False keeps peft's nn.Linear/Conv2d default (Kaiming-uniform) A and B,
drawn after torch.manual_seed(seed of the LoRA); B is then multiplied by B_SCALE (a constant) so the
final latents move by some percent (3-18 %, printed; unscaled B with lora_alpha/r = 2 moves them by far more).

Alpha: the peft layout keeps r and lora_alpha only in the safetensors metadata `lora_adapter_metadata`
(JSON, keys `unet.r`, `unet.lora_alpha`, `text_encoder.…`, `text_encoder_2.…`); diffusers builds the
LoraConfig from it, scale lora_alpha/r. Without that metadata diffusers would use alpha = r (scale 1).
convert_state_dict_to_kohya writes `.alpha = torch.tensor(rank)` (int64, i.e. scale 1 whatever the
LoraConfig said); the kohya files here carry the LoraConfig's lora_alpha instead as a 0-d float32
tensor (what kohya's sd-scripts write), so they mean the same LoRA as the peft model; diffusers
reads `.alpha` into network_alphas, scale alpha/rank.

transformers ≥ 5 flattens CLIPTextModel (no `text_model.` module) but not CLIPTextModelWithProjection,
so text_encoder's keys have no `text_model.` (`text_encoder.encoder.layers.0.self_attn.q_proj…`,
`lora_te1_encoder_layers_0_…`) while text_encoder_2's have it (`text_encoder_2.text_model.encoder…`,
`lora_te2_text_model_encoder_…`); diffusers strips `text_model.` when the encoder has none, so the
published form loads too. The kohya UNet keys carry diffusers' module names
(`lora_unet_down_blocks_1_attentions_0_…`), as diffusers' `--output_kohya_format` writes them, not the
SGM block names (`lora_unet_input_blocks_4_1_…`) of LoRAs trained with kohya's sd-scripts.

transformers 5.24's `add_adapter` refuses the pinned peft 0.21.2 (it wants ≥ 0.22), so the adapters
are made with peft's `inject_adapter_in_model`, what diffusers' own ModelMixin.add_adapter calls;
diffusers' load_lora_weights goes through transformers' `load_adapter`, which works with 0.21.2.

`--shapes-checkpoint DIR` (the trained family's checkpoint, rebuilt from its committed bundles by
tools/shapes/ckpt_from_bundle.py) writes only `shapes-te-conv.safetensors`: a peft LoRA (r=2) on that
family's UNet attention and resnet convolutions and both text encoders, saved by save_lora_weights and
checked with load_lora_weights — a file with the parts bundles/shapes/shapes-sdxl (exported before its text
encoders and convolutions took weights) cannot take, for the `unet_only` tests.

The files are small and committed; running this again rewrites them byte for byte (the peft files'
two safetensors metadata entries are put in key order: safetensors writes them in hash-map order).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import export_bundle as eb  # noqa: E402

SEED = 3141
CKPT = REPO / "tests" / "data" / "checkpoints" / "tiny-sdxl.safetensors"
CONFIGS = TOOLS / "configs" / "tiny"
CONTROLNET = REPO / "tests" / "data" / "checkpoints" / "tiny-sdxl-controlnet"
BUNDLES = ("bundles/tiny-ckpt", "bundles/tiny-ckpt-controlnet")
LORA_DIR = REPO / "tests" / "data" / "lora"
REF_DIR = REPO / "tests" / "data" / "parity-lora"

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv_in", "conv_out", "conv"]  # `conv`: the samplers'
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK = 4
B_SCALE = 0.15

# name → (seed, {component: (target_modules, lora_alpha)}, layout)
LORAS = {
    "peft-te": (SEED + 1, {"unet": (UNET_TARGETS, 8), "text_encoder": (TE_TARGETS, 2),
                           "text_encoder_2": (TE_TARGETS, 2)}, "peft"),
    "kohya-te": (SEED + 2, {"unet": (UNET_TARGETS, 6), "text_encoder": (TE_TARGETS, 2),
                            "text_encoder_2": (TE_TARGETS, 3)}, "kohya"),
    "peft-te-only": (SEED + 3, {"text_encoder": (TE_TARGETS, 8), "text_encoder_2": (TE_TARGETS, 8)}, "peft"),
    "kohya-locon": (SEED + 4, {"unet": (UNET_TARGETS + CONV_TARGETS, 8)}, "kohya"),
    # peft's LoRA on the convolutions (and the resnets' time_emb_proj, as kohya's LoCon adapts them) in
    # the peft layout, with a text-encoder part
    "peft-locon": (SEED + 5, {"unet": (CONV_TARGETS + ["time_emb_proj"], 6), "text_encoder_2": (TE_TARGETS, 4)},
                   "peft"),
    # DoRA (peft use_dora=True: lora_magnitude_vector) on the UNet's linear layers and resnets' conv1
    "peft-dora": (SEED + 6, {"unet": (UNET_TARGETS + ["conv1"], 8)}, "peft"),
}
DORA = {"peft-dora"}
# the magnitudes peft initialises to ‖W + s·B·A‖ (rows) are scaled by 1 ± MAG_JITTER (seeded), so that
# DoRA differs from the LoRA of the same factors at scale 1
MAG_JITTER = 0.3


def load_models():
    """The checkpoint's modules as `export_bundle.py --checkpoint tests/data/checkpoints/tiny-sdxl.safetensors
    --controlnet-checkpoint tests/data/checkpoints/tiny-sdxl-controlnet` loads them."""
    return eb.build_models(eb.tiny_config(), SEED, CKPT, {}, CONTROLNET, CONFIGS)


def targeted(module, targets) -> int:
    """How many modules peft's target matching picks (name == target or ends with '.' + target)."""
    return sum(1 for n, m in module.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets))


def adapter(module, targets, alpha: int, seed: int, dora: bool = False):
    """peft's LoRA layers (DoRA with `dora`) on a copy of `module`: its state dict
    (get_peft_model_state_dict) and config."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    m = copy.deepcopy(module)
    cfg = LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False, target_modules=targets, use_dora=dora)
    torch.manual_seed(seed)
    # what diffusers' ModelMixin.add_adapter does (transformers 5.24's add_adapter refuses peft < 0.22)
    inject_adapter_in_model(cfg, m, adapter_name="default")
    m.peft_config = {"default": cfg}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.mul_(B_SCALE)
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in m.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + MAG_JITTER * (2 * torch.rand(p.shape, generator=g) - 1))
    n_adapted = sum(1 for _, x in m.named_modules() if hasattr(x, "lora_A"))
    assert n_adapted == targeted(module, targets), (n_adapted, targeted(module, targets))
    meta = m.peft_config["default"].to_dict()  # as diffusers.training_utils._collate_lora_metadata
    # save_lora_weights turns the set target_modules into a list in hash order: sorted here, so that
    # reruns write the same bytes
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    return get_peft_model_state_dict(m), meta


def make_file(name: str, models, out: Path):
    """Writes OUT/<name>.safetensors; returns its path and each component's peft state dict."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    seed, parts, layout = LORAS[name]
    comps = dict(zip(("text_encoder", "text_encoder_2", "unet"), models[:3]))
    kwargs, made = {}, {}
    for i, (comp, (targets, alpha)) in enumerate(parts.items()):
        sd, meta = adapter(comps[comp], targets, alpha, seed * 10 + i, dora=name in DORA)
        made[comp] = sd
        kwargs[f"{comp}_lora_layers"] = sd
        kwargs[f"{comp}_lora_adapter_metadata"] = meta
    path = out / f"{name}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        if layout == "peft":
            path.write_bytes((Path(tmp) / "lora.safetensors").read_bytes())
            sorted_metadata(path)
            return path, made
        peft_sd = load_file(str(Path(tmp) / "lora.safetensors"))
    kohya = convert_state_dict_to_kohya(peft_sd)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for k in [k for k in kohya if k.endswith(".alpha")]:
        comp = next(c for c, p in prefix.items() if k.startswith(p))
        assert kohya[k].item() == RANK  # what convert_state_dict_to_kohya writes
        kohya[k] = torch.tensor(float(parts[comp][1]))
    save_file(kohya, str(path))  # as diffusers' --output_kohya_format: no metadata
    return path, made


def sorted_metadata(path: Path):
    """safetensors writes the header's __metadata__ entries in hash-map order (here two: format and
    lora_adapter_metadata); rewritten in key order, same length and tensors, so reruns write the same bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].decode()
    header = json.loads(text, object_pairs_hook=dict)
    dump = lambda h: json.dumps(h, separators=(",", ":"), ensure_ascii=False)  # noqa: E731  serde_json's form
    assert dump(header) == text.rstrip(" "), f"{path}: unexpected header form"
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    new = dump(header).encode()
    assert len(new) == len(text.rstrip(" ").encode())
    path.write_bytes(raw[:8] + new.ljust(n, b" ") + raw[8 + n:])


def pipeline(models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te, te2, unet, vae, _ = models
    tok = eb.hf_tokenizer(REPO / BUNDLES[0] / "tokenizer.json")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)


def lora_counts(pipe) -> dict:
    return {c: sum(1 for _, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_A"))
            for c in ("unet", "text_encoder", "text_encoder_2")}


def check_loads(models, files: dict) -> dict:
    """load_lora_weights adapts exactly the modules each LoRA targets, in every component (diffusers
    can skip a part without an error), with the tensors peft made and the scale lora_alpha/r; and
    unload_lora_weights leaves none behind."""
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline(models)
    comps = dict(zip(("text_encoder", "text_encoder_2", "unet"), models[:3]))
    found = {}
    for name, (path, made) in files.items():
        parts = LORAS[name][1]
        want = {c: targeted(comps[c], parts[c][0]) if c in parts else 0 for c in ("unet", "text_encoder", "text_encoder_2")}
        pipe.load_lora_weights(str(path), adapter_name="x")
        got = lora_counts(pipe)
        assert got == want, f"{name}: load_lora_weights adapted {got} modules, targeted {want}"
        for c, sd in made.items():
            mod = getattr(pipe, c)
            back = get_peft_model_state_dict(mod, adapter_name="x")
            assert set(back) == set(sd), f"{name}/{c}: loaded keys differ: {sorted(set(back) ^ set(sd))[:4]}"
            assert all(torch.equal(back[k], sd[k]) for k in sd), f"{name}/{c}: loaded tensors differ"
            scales = {m.scaling["x"] for _, m in mod.named_modules() if hasattr(m, "lora_A")}
            assert scales == {parts[c][1] / RANK}, f"{name}/{c}: scale {scales}, want {parts[c][1] / RANK}"
        pipe.unload_lora_weights()
        assert lora_counts(pipe) == {c: 0 for c in got}
        found[name] = got
        print(f"  {path.name}: load_lora_weights adapts {got} modules (all targeted), tensors as made, "
              f"scale alpha/r {[parts[c][1] / RANK for c in parts]}")
    return found


def cases():
    lo = lambda name, scale: dict(file=f"tests/data/lora/{name}.safetensors", scale=scale)  # noqa: E731
    return [
        dict(name="lora_peft_te", scheduler="euler", prompt="a red circle above a blue square", steps=4,
             loras=[lo("peft-te", 0.8)]),
        dict(name="lora_kohya_te", scheduler="euler-a", prompt="a green star on a white background",
             negative_prompt="blurry lowres", steps=4, loras=[lo("kohya-te", 1.0)]),
        dict(name="lora_te_only", scheduler="euler", prompt="a yellow triangle left of a purple ring", steps=4,
             loras=[lo("peft-te-only", 1.0)]),
        dict(name="lora_mixed", scheduler="euler", prompt="a pink heart in the centre", steps=4,
             loras=[lo("peft-te", 0.7), lo("kohya-te", -0.5)]),
        dict(name="lora_locon", scheduler="euler", prompt="an orange moon above a dark sea", steps=4,
             loras=[lo("kohya-locon", 1.0)]),
        dict(name="lora_peft_locon", scheduler="euler", prompt="a grey cloud over a green hill", steps=4,
             loras=[lo("peft-locon", 0.9)]),
        dict(name="lora_locon_mixed", scheduler="euler-a", prompt="a blue kite in a red sky",
             negative_prompt="blurry", steps=4, loras=[lo("kohya-locon", 0.6), lo("peft-te", 0.8), lo("peft-locon", -0.4)]),
        dict(name="lora_dora", scheduler="euler", prompt="a white swan on a black lake", steps=4,
             loras=[lo("peft-dora", 0.7)]),
        # DoRA between two LoRAs: peft applies a DoRA adapter to what the adapters before it made
        dict(name="lora_dora_mixed", scheduler="euler", prompt="a brown dog under a yellow sun", steps=4,
             loras=[lo("peft-te", 0.5), lo("peft-dora", 0.8), lo("kohya-locon", 0.4)]),
    ]


SHAPES_LORA = {"unet": (["to_q", "to_v", "conv1"], 2), "text_encoder": (["q_proj"], 2),
               "text_encoder_2": (["q_proj"], 2)}


def shapes_fixture(ckpt: Path, out: Path):
    """shapes-te-conv.safetensors on the trained family's checkpoint (see the module doc)."""
    from diffusers import StableDiffusionXLPipeline

    te, te2, unet, _vae = eb.load_checkpoint(ckpt, None)
    comps = {"text_encoder": te, "text_encoder_2": te2, "unet": unet}
    kwargs = {}
    for i, (comp, (targets, alpha)) in enumerate(SHAPES_LORA.items()):
        sd, meta = adapter(comps[comp], targets, alpha, (SEED + 9) * 10 + i)
        kwargs[f"{comp}_lora_layers"] = sd
        kwargs[f"{comp}_lora_adapter_metadata"] = meta
    path = out / "shapes-te-conv.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        path.write_bytes((Path(tmp) / "lora.safetensors").read_bytes())
    sorted_metadata(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(ckpt), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(path), adapter_name="x")
    got = lora_counts(pipe)
    want = {c: targeted(comps[c], SHAPES_LORA[c][0]) for c in got}
    assert got == want, f"load_lora_weights adapted {got} modules, targeted {want}"
    print(f"  {path.name}: load_lora_weights adapts {got} modules (all targeted), {path.stat().st_size} bytes")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora-out", type=Path, default=LORA_DIR)
    ap.add_argument("--references", type=Path, default=REF_DIR)
    ap.add_argument("--shapes-checkpoint", type=Path, metavar="DIR",
                    help="only write shapes-te-conv.safetensors from the trained family's checkpoint")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import diffusers
    import transformers

    # transformers' load report lists the base weights as missing from each LoRA file, diffusers warns
    # that a TE-only file has no UNet part: both expected (check_loads checks what was loaded)
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    from safetensors.torch import load_file

    if a.shapes_checkpoint:
        return shapes_fixture(a.shapes_checkpoint, a.lora_out)
    models = load_models()
    a.lora_out.mkdir(parents=True, exist_ok=True)
    files = {name: make_file(name, models, a.lora_out) for name in LORAS}
    check_loads(models, files)

    loras = {f"tests/data/lora/{p.name}": p for p, _ in files.values()}
    about = ("diffusers reference runs of the LoRAs of tests/data/lora/ (peft layout with text-encoder parts, "
             "kohya layout from diffusers' convert_state_dict_to_kohya, text-encoder-only, two at once, kohya LoCon "
             "with UNet convolutions, peft-layout LoRA on the convolutions, LoCon mixed with other layouts) on the checkpoint tests/data/checkpoints/tiny-sdxl.safetensors as diffusers "
             "loads it; LoRAs made with peft r=4, lora_alpha != r (tools/make_lora_fixtures.py)")
    eb.run_references(models, REPO / BUNDLES[0], REPO / BUNDLES[1], loras, {}, a.references, SEED,
                      cases=cases(), bundle_names=BUNDLES, about=about)
    with tempfile.TemporaryDirectory() as tmp:  # the same cases (so the same noise) without the LoRAs
        plain = [dict(c, loras=[]) for c in cases()]
        eb.run_references(models, REPO / BUNDLES[0], REPO / BUNDLES[1], {}, {}, Path(tmp), SEED, cases=plain,
                          bundle_names=BUNDLES)
        for c in cases():
            ref, base = load_file(str(a.references / f"{c['name']}.safetensors")), load_file(f"{tmp}/{c['name']}.safetensors")
            last = f"latents_{c['steps'] - 1}"
            assert torch.isfinite(ref[last]).all() and torch.isfinite(ref["image"]).all()
            rel = ((ref[last] - base[last]).norm() / base[last].norm()).item()
            print(f"  {c['name']}: final latents move by {100 * rel:.1f}% with the LoRA")
            assert rel > 0.02, f"{c['name']}: the LoRA barely changes the result"
    sizes = {eb.repo_relative(f): f.stat().st_size for d in (a.lora_out, a.references)
             for f in sorted(d.iterdir()) if f.is_file()}
    print("  " + json.dumps(sizes, indent=1))


if __name__ == "__main__":
    sys.exit(main())
