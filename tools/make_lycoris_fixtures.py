#!/usr/bin/env python3
"""Builds the LyCORIS (LoHa, LoKr) fixtures of tests/data/lycoris/ and their diffusers references in
tests/data/parity-lycoris/ with the reference tools (peft makes the adapters, LyCORIS names them): no key
name is written by this script.

    .venv-tools/bin/pip install --no-deps --target /tmp/lyc lycoris-lora==4.1.3 einops toml
    LYCORIS_PATH=/tmp/lyc .venv-tools/bin/python tools/make_lycoris_fixtures.py

(LyCORIS, KohakuBlueleaf's library that model sites' LoHa/LoKr files come from, is not in
requirements-export.txt; it is only needed here, for the names; LYCORIS_PATH is put first on sys.path.)

Data flow (everything seeded; same model, seeds and style as tools/make_lora_fixtures.py):

    tests/data/checkpoints/tiny-sdxl.safetensors ─▶ export_bundle.build_models (make_lora_fixtures.load_models)
      ├─▶ per adapter, a copy of the UNet ─▶ torch.manual_seed ─▶ peft inject_adapter_in_model(
      │     LoHaConfig / LoKrConfig(r=4, alpha≠r, init_weights=False, target_modules=UNET_TARGETS))
      │     ─▶ hada_w2_b × 6 / lokr_w2 and lokr_w2_b × 0.5 (init_weights=False: peft's Kaiming-uniform
      │     factors move the final latents by < 1 % (LoHa) / ~11 % (LoKr), estimated; scaled: 4-6 %, printed)
      │     ─▶ get_peft_model_state_dict
      ├─▶ StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=…, unet_lora_adapter_metadata=
      │     peft_config.to_dict()) ─▶ loha-peft.safetensors, lokr-peft.safetensors   (peft layout, `unet.` prefix)
      ├─▶ LyCORIS 4.1.3 `lycoris.kohya.LycorisNetworkKohya(None, unet, algo)` on a bare copy of the UNet picks
      │     the modules and names them (`lora_unet_` + module path with `_`; preset: unet_target_module
      │     ["Transformer2DModel"], no convs); each LyCORIS module is rebuilt from peft's tensors for the same
      │     UNet module (matched by module identity, not by name) with LyCORIS' own loader
      │     `<Module>.make_module_from_state_dict` (as lycoris.kohya.create_network_from_weights) and the
      │     peft alpha of that module; network.save_weights ─▶ loha.safetensors, lokr.safetensors
      │     (checked: same module set as peft; every LyCORIS module's get_diff_weight == peft's
      │     get_delta_weight; tensors in the file == peft's)
      ├─▶ delta.safetensors: peft's get_delta_weight in float64 for a few layers (see below)
      ├─▶ check: what diffusers' pipe.load_lora_weights does with each file (printed; see below)
      └─▶ export_bundle.run_references, its code path unchanged, with StableDiffusionXLPipeline's
            load_lora_weights / set_adapters / unload_lora_weights replaced for the call (peft_loader below)
            by peft itself: inject_adapter_in_model + set_peft_model_state_dict of the -peft twin of the
            case's file (config from its metadata), set_adapter(all) + LycorisLayer.set_scale(name, weight)
            per layer (what diffusers' set_adapters does for LoRA layers), then the peft layers removed;
            ─▶ tests/data/parity-lycoris/<case>.safetensors + cases.json (run_references' format; the case
            files are the LyCORIS-named ones; the relative effect is printed per case, as make_lora_fixtures)

Shapes (the tiny UNet's targeted Linear layers: 124 × [32,32], 34 × [32,40], 17 × [256,32] ff.net.0.proj,
17 × [32,128] ff.net.2; 192 modules):
  LoHa (r=4): hada_w1_a, hada_w2_a [out, 4]; hada_w1_b, hada_w2_b [4, in]; 4 tensors + alpha per module.
  LoKr (r=4, decompose_both=False, decompose_factor=-1; peft tuners/lokr/layer.py:update_layer, factorization
  as LyCORIS' (m ≤ n, near sqrt): out = a·b, in = c·d with (a,b) = factorization(out), (c,d) = factorization(in),
  lokr_w1 [a, c] always full (decompose_both=False), w2 full [b, d] unless r < max(b, d)/2, then
  lokr_w2_a [b, r] · lokr_w2_b [r, d]):
    [32,32] → w1 [4,4], w2 [8,8]          [32,40] → w1 [4,5], w2 [8,8]       (both full: 158 modules)
    [256,32] → w1 [16,4], w2_a [16,4], w2_b [4,8]     [32,128] → w1 [4,8], w2_a [8,4], w2_b [4,16]
  ΔW = kron(w1, w2) · scale (torch.kron, w1 the outer factor).

Scale (multiplier 1) — peft 0.21.2:
  LoHa: ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · alpha/r   (peft tuners/loha/layer.py: update_layer sets
        scaling = alpha / r; get_delta_weight → HadaWeight.forward). LyCORIS LohaModule: scale = alpha/lora_dim,
        alpha buffer = alpha: the same.
  LoKr: peft scaling = alpha / r for every module, whether or not a factor is decomposed (tuners/lokr/layer.py:
        update_layer). LyCORIS (modules/lokr.py: LokrModule.__init__) sets alpha = lora_dim when both w1 and w2 are
        full ("use scale = 1") and saves that alpha; make_module_from_state_dict, with no _a/_b tensor to read a rank
        from, uses lora_dim = 1, so such modules are saved with alpha = 1; diffusers' _bake_lokr_alpha_
        (loaders/lora_conversion_utils.py) likewise applies alpha/rank only when a factor is decomposed and drops
        alpha otherwise. So: scale = alpha / rank, rank = the inner dimension of lokr_w1_b / lokr_w2_b, and scale 1
        when neither factor is decomposed. To keep the peft model and the LyCORIS file the same LoRA, the LoKr
        adapter's fully-full modules (attention + proj_in/proj_out) get alpha = r through peft's alpha_pattern
        (peft scale 1 = LyCORIS' 1); ff.net.2 keeps alpha = 2 (scale 0.5), ff.net.0.proj alpha = 3 (0.75).
  A case's LoRA weight w multiplies this scale (LycorisLayer.set_scale: scaling = w · alpha / r).

Key layouts:
  *-peft.safetensors: `unet.<module path>.hada_w1_a` … / `unet.<module path>.lokr_w1`, `.lokr_w2_a` …
    (get_peft_model_state_dict's keys, `unet.` added by save_lora_weights), no alpha tensors; metadata
    `format`: pt and `lora_adapter_metadata`: JSON of the peft config with `unet.` keys (r, alpha,
    alpha_pattern, peft_type LOHA/LOKR, …), as make_lora_fixtures' peft files (entries put in key order).
  loha.safetensors / lokr.safetensors: `lora_unet_<module path, . → _>.hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|
    alpha`, `….lokr_w1|lokr_w2|lokr_w2_a|lokr_w2_b|alpha`; alpha a 0-d float32 tensor; metadata only
    `sshs_model_hash` (what LycorisNetworkKohya.save_weights writes). The names are LyCORIS' (kohya.py:
    create_modules: lora_name = "lora_unet" + "_" + module path with "." → "_", tensor suffixes from
    <Module>.custom_state_dict); the UNet paths are diffusers' (`lora_unet_down_blocks_1_attentions_0_…`), as
    LyCORIS names a diffusers UNet, not the SGM names (`lora_unet_input_blocks_4_1_…`) of kohya sd-scripts'
    own SDXL UNet. Nothing is renamed by this script. diffusers' convert_state_dict_to_kohya is no help here:
    it detects only `.lora_A.` keys (ValueError otherwise) and, forced, mis-places the dots of LoHa/LoKr keys.
  delta.safetensors: `loha.<LyCORIS prefix>` / `lokr.<LyCORIS prefix>`: float64 [out, in], peft's
    get_delta_weight on a float64 copy of the peft layer (factors = the file's float32 tensors, exactly), i.e.
    ΔW at multiplier 1 including alpha/r; metadata `about` and one JSON entry per key (peft module, r, alpha,
    scale, factor shapes).

diffusers (0.42.1), as check_diffusers finds (and asserts for the pipeline):
  pipe.load_lora_weights(<x>-peft.safetensors): ValueError "Invalid LoRA checkpoint. Make sure all LoRA param
    names contain `'lora'` substring." (StableDiffusionXLLoraLoaderMixin.load_lora_weights' key check);
  pipe.load_lora_weights(loha/lokr.safetensors): the `lora_unet_` keys pass that check, then
    _convert_non_diffusers_lora_to_diffusers raises ValueError "The following keys have not been correctly
    renamed: lora_unet_….alpha, lora_unet_….hada_w1_a, …" (resp. lokr_w1 …);
  pipe.unet.load_lora_adapter(loha-peft, prefix="unet"): IndexError (it takes the LoRA path: no lora_B key);
  pipe.unet.load_lora_adapter(lokr-peft, prefix="unet"): loads all 192 modules with the saved tensors, but with
    a LoKrConfig inferred from the shapes by utils/peft_utils.py:_create_lokr_config (r = 8 = max(lokr_w2.shape)
    with a rank_pattern of 4 for the decomposed ones, alpha = r: scale 1 everywhere, "alpha expected to be
    already baked"), i.e. not the file's alpha/r (0.5, 0.75 on the ff layers): not usable as the reference.
The pipeline-level LoKr support of diffusers 0.42.1 (lora_pipeline.py: `is_lokr`, _bake_lokr_alpha_) exists only
for Z-Image and Flux2, not SDXL; diffusers has no LoHa support.

transformers 5.24's add_adapter refuses peft 0.21.2 (see make_lora_fixtures), so adapters are made with
inject_adapter_in_model. Running this again rewrites every file byte for byte.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
if os.environ.get("LYCORIS_PATH"):
    sys.path.insert(0, os.environ["LYCORIS_PATH"])

import export_bundle as eb  # noqa: E402
import make_lora_fixtures as mlf  # noqa: E402

SEED = mlf.SEED
BUNDLES = mlf.BUNDLES
UNET_TARGETS = mlf.UNET_TARGETS
OUT_DIR = REPO / "tests" / "data" / "lycoris"
REF_DIR = REPO / "tests" / "data" / "parity-lycoris"
RANK = 4
LYCORIS_VERSION = "4.1.3"
FULL_FULL = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]  # LoKr modules with no decomposed factor

# name → (seed, peft config kwargs, factor scaled, constant): the scaled factor keeps the final latents'
# move at a few percent (printed)
ADAPTERS = {
    "loha": (SEED + 11, dict(kind="loha", alpha=2), "hada_w2_b", 6.0),
    "lokr": (SEED + 12, dict(kind="lokr", alpha=2, decompose_both=False, decompose_factor=-1,
                             alpha_pattern={**{t: RANK for t in FULL_FULL}, "ff.net.0.proj": 3}),
             "lokr_w2", 0.5),
}
# delta.safetensors: (adapter, peft module path)
DELTA_LAYERS = [
    ("loha", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("loha", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("lokr", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lokr", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("lokr", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
]


def peft_config(kind: str, **kw):
    from peft import LoHaConfig, LoKrConfig

    cls = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    return cls(r=RANK, init_weights=False, target_modules=UNET_TARGETS, **kw)


def tuner_layers(module):
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LycorisLayer)}


def adapter(unet, name: str):
    """peft's adapter on a copy of the UNet: (model with the peft layers, state dict, config metadata)."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    seed, kw, factor, const = ADAPTERS[name]
    kw = dict(kw)
    cfg = peft_config(kw.pop("kind"), **kw)
    m = copy.deepcopy(unet)
    torch.manual_seed(seed)
    inject_adapter_in_model(cfg, m, adapter_name="default")
    m.peft_config = {"default": cfg}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(f".{factor}.default") or n.endswith(f".{factor}_b.default"):
                p.mul_(const)
    layers = tuner_layers(m)
    assert len(layers) == mlf.targeted(unet, UNET_TARGETS), (len(layers), mlf.targeted(unet, UNET_TARGETS))
    if name == "lokr":  # alpha = r exactly where neither factor is decomposed (see the docstring)
        for n, x in layers.items():
            full = "default" in x.lokr_w1 and "default" in x.lokr_w2
            assert (x.alpha["default"] == RANK) == full, (n, x.alpha["default"], full)
    meta = m.peft_config["default"].to_dict()  # as diffusers.training_utils._collate_lora_metadata
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    return m, get_peft_model_state_dict(m, adapter_name="default"), meta


def lycoris_modules(unet, name: str):
    """LyCORIS' kohya network on a bare copy of the UNet: {id(original module): (lora_name, LyCORIS module)},
    and the copy's {id(module): module path}."""
    from lycoris.kohya import LycorisNetworkKohya

    kw = dict(ADAPTERS[name][1])
    kind, alpha = kw.pop("kind"), kw.pop("alpha")
    extra = {"decompose_both": kw["decompose_both"], "factor": kw["decompose_factor"]} if kind == "lokr" else {}
    LycorisNetworkKohya.apply_preset({"enable_conv": False, "unet_target_module": ["Transformer2DModel"],
                                      "unet_target_name": [], "module_algo_map": {}, "name_algo_map": {}})
    u = copy.deepcopy(unet)
    with torch.random.fork_rng():
        net = LycorisNetworkKohya(None, u, multiplier=1.0, lora_dim=RANK, alpha=alpha, network_module=kind,
                                  **extra)
    return net, u


def make_files(unet, name: str, out: Path):
    """Writes OUT/<name>-peft.safetensors and OUT/<name>.safetensors; returns (peft model, {LyCORIS prefix:
    peft module path}, peft state dict)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    model, sd, meta = adapter(unet, name)
    peft_path = out / f"{name}-peft.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name="x.safetensors", unet_lora_layers=sd,
                                                    unet_lora_adapter_metadata=meta)
        peft_path.write_bytes((Path(tmp) / "x.safetensors").read_bytes())
    mlf.sorted_metadata(peft_path)

    net, u = lycoris_modules(unet, name)
    paths = {id(mod): p for p, mod in u.named_modules()}
    layers = tuner_layers(model)
    rebuilt, prefixes = [], {}
    for lyco in net.unet_loras:
        path = paths[id(lyco.org_module[0])]
        x = layers.pop(path)  # KeyError: a module LyCORIS picks that peft did not
        t = {k: getattr(x, k)["default"].detach() for k in x.adapter_layer_names if "default" in getattr(x, k)}
        alpha = torch.tensor(float(x.alpha["default"]))
        if name == "loha":
            params = (t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], None, None, alpha, None)
        else:
            g = t.get
            params = (g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"),
                      None, None, alpha, None)
        with torch.no_grad():
            new = type(lyco).make_module_from_state_dict(lyco.lora_name, lyco.org_module[0], *params)
        rebuilt.append((new, x))
        prefixes[new.lora_name] = path
    assert not layers, f"peft adapted modules LyCORIS does not pick: {sorted(layers)[:4]}"
    net.unet_loras, net.text_encoder_loras = [m for m, _ in rebuilt], []
    net.apply_to(None, u, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LyCORIS' forward (its module patched in) == peft's layer, per module
        for new, x in rebuilt:
            inp = torch.randn(3, x.get_base_layer().in_features, generator=g)
            got, want = new.org_module[0](inp), x(inp)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (new.lora_name, (got - want).abs().max())
    path = out / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, None)

    got = load_file(str(path))
    for prefix, mpath in prefixes.items():  # the LyCORIS file holds peft's tensors
        for k in [k for k in sd if k.startswith(mpath + ".") and k.count(".") == mpath.count(".") + 1]:
            assert torch.equal(got[f"{prefix}.{k.rpartition('.')[2]}"], sd[k]), k
    n_t = sum(1 for k in got if not k.endswith(".alpha"))
    assert n_t == len(sd) and len(got) == len(sd) + len(prefixes), (len(got), len(sd), len(prefixes))
    print(f"  {name}: {len(prefixes)} modules; {peft_path.name} {len(sd)} tensors, {path.name} {len(got)} "
          f"(LyCORIS forward == peft forward per module)")
    return model, prefixes, sd


def write_deltas(models_by_name: dict, prefixes_by_name: dict, out: Path):
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, mpath in DELTA_LAYERS:
        layer = copy.deepcopy(tuner_layers(models_by_name[name])[mpath]).double()
        with torch.no_grad():
            d = layer.get_delta_weight("default")
        assert d.dtype == torch.float64
        prefix = next(p for p, q in prefixes_by_name[name].items() if q == mpath)
        key = f"{name}.{prefix}"
        tensors[key] = d.contiguous()
        shapes = {k: list(getattr(layer, k)["default"].shape) for k in layer.adapter_layer_names
                  if "default" in getattr(layer, k)}
        meta[key] = json.dumps({"peft_module": mpath, "r": layer.r["default"], "alpha": layer.alpha["default"],
                                "scale": layer.scaling["default"], "factors": shapes}, sort_keys=True)
    meta["about"] = ("peft 0.21.2 get_delta_weight (multiplier 1, alpha/r included) in float64 of the float32 "
                     "factors stored in tests/data/lycoris/<adapter>.safetensors under the key's LyCORIS prefix; "
                     "key = <adapter>.<LyCORIS prefix>; tools/make_lycoris_fixtures.py")
    path = out / "delta.safetensors"
    save_file(tensors, str(path), dict(sorted(meta.items())))
    sort_header(path)
    return path


def sort_header(path: Path):
    """safetensors writes __metadata__ in hash-map order: rewritten in key order (same bytes otherwise)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].decode()
    header = json.loads(text)
    dump = lambda h: json.dumps(h, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    assert dump(header) == text.rstrip(" ")
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    new = dump(header).encode()
    assert len(new) == len(text.rstrip(" ").encode())
    path.write_bytes(raw[:8] + new.ljust(n, b" ") + raw[8 + n:])


def read_peft_file(path: Path):
    """A -peft file: its UNet state dict (prefix `unet.` dropped) and the peft config of its metadata."""
    from peft import PeftConfig
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        sd = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("unet.") for k in meta)
    cfg = PeftConfig.from_peft_type(**{k.removeprefix("unet."): v for k, v in meta.items()})
    return sd, cfg


@contextlib.contextmanager
def peft_loader(twins: dict):
    """StableDiffusionXLPipeline's load_lora_weights / set_adapters / unload_lora_weights done by peft for
    the UNet while the block runs (diffusers' own refuse LoHa/LoKr files): `twins` maps the path that
    run_references passes (the LyCORIS-named file) to its -peft twin, which is what gets loaded."""
    from diffusers import StableDiffusionXLPipeline as P
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def load(self, path, adapter_name):
        sd, cfg = read_peft_file(twins[str(path)])
        configs = dict(getattr(self.unet, "peft_config", {}))
        with warnings.catch_warnings():  # "Already found a `peft_config` attribute": the second adapter, meant
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(cfg, self.unet, adapter_name=adapter_name)
        self.unet.peft_config = {**configs, adapter_name: cfg}
        res = set_peft_model_state_dict(self.unet, sd, adapter_name=adapter_name)
        assert not res.unexpected_keys, res.unexpected_keys[:4]
        back = get_peft_model_state_dict(self.unet, adapter_name=adapter_name)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd), f"{path}: not loaded as saved"

    def set_adapters(self, names, adapter_weights):
        for m in self.unet.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(list(names))
                for n, w in zip(names, adapter_weights):
                    m.set_scale(n, w)  # ignores adapters the layer does not have

    def unload(self):
        while True:
            hit = next(((n, m) for n, m in self.unet.named_modules() if isinstance(m, BaseTunerLayer)), None)
            if hit is None:
                break
            parent, _, leaf = hit[0].rpartition(".")
            setattr(self.unet.get_submodule(parent), leaf, hit[1].base_layer)
        del self.unet.peft_config

    names = ("load_lora_weights", "set_adapters", "unload_lora_weights")
    saved = {k: P.__dict__.get(k) for k in names}  # None: inherited (from the LoRA loader mixins)
    P.load_lora_weights, P.set_adapters, P.unload_lora_weights = load, set_adapters, unload
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(P, k)
            else:
                setattr(P, k, v)


def check_diffusers(models, files: list[Path]) -> dict:
    """What diffusers itself does with each file: the pipeline's load_lora_weights, and for the -peft files
    UNet2DConditionModel.load_lora_adapter (diffusers' generic PEFT loader, which knows LoKr)."""
    pipe = mlf.pipeline(models)
    seen = {}
    for path in files:
        for how in ("pipe.load_lora_weights", "unet.load_lora_adapter"):
            if how == "unet.load_lora_adapter" and not path.name.endswith("-peft.safetensors"):
                continue
            try:
                if how == "pipe.load_lora_weights":
                    pipe.load_lora_weights(str(path), adapter_name="x")
                else:
                    pipe.unet.load_lora_adapter(str(path), prefix="unet", adapter_name="x")
                counts = mlf.lora_counts(pipe)
                n = len(tuner_layers(pipe.unet))
                msg = f"loads: {n} LoHa/LoKr layers in the UNet, LoRA layers {counts}"
                if n:
                    sd, _ = read_peft_file(path)
                    from peft.utils import get_peft_model_state_dict
                    back = get_peft_model_state_dict(pipe.unet, adapter_name="x")
                    same = set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
                    scales = sorted({m.scaling["x"] for m in tuner_layers(pipe.unet).values()})
                    cfg = pipe.unet.peft_config["x"]
                    msg += (f"; tensors as saved: {same}; config r={cfg.r} alpha={cfg.alpha} (inferred from the "
                            f"shapes, not the file's metadata), scales {scales}")
                pipe.unload_lora_weights()
                assert not tuner_layers(pipe.unet) and not any(mlf.lora_counts(pipe).values())
            except Exception as e:  # noqa: BLE001  what diffusers says is the result
                msg = f"refuses: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            seen[f"{path.name} {how}"] = msg
            print(f"  {path.name} {how}: {msg}")
    return seen


def cases():
    lo = lambda name, scale: dict(file=f"tests/data/lycoris/{name}.safetensors", scale=scale)  # noqa: E731
    return [
        dict(name="loha", scheduler="euler", prompt="a red circle above a blue square", steps=4,
             loras=[lo("loha", 1.0)]),
        dict(name="lokr", scheduler="euler-a", prompt="a green star on a white background",
             negative_prompt="blurry lowres", steps=4, loras=[lo("lokr", 1.0)]),
        dict(name="loha_lokr", scheduler="euler", prompt="a pink heart in the centre", steps=4,
             loras=[lo("loha", 0.8), lo("lokr", -0.5)]),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--references", type=Path, default=REF_DIR)
    ap.add_argument("--no-references", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import importlib.metadata

    import diffusers
    import transformers

    try:
        import lycoris  # noqa: F401
    except ImportError:
        sys.exit("LyCORIS is needed for the names: see this script's --help (LYCORIS_PATH)")
    version = importlib.metadata.version("lycoris-lora")
    assert version == LYCORIS_VERSION, f"lycoris-lora {version}, want {LYCORIS_VERSION}"
    import logging
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    from safetensors.torch import load_file

    models = mlf.load_models()
    unet = models[2]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    a.out.mkdir(parents=True, exist_ok=True)
    made = {name: make_files(unet, name, a.out) for name in ADAPTERS}
    write_deltas({n: m[0] for n, m in made.items()}, {n: m[1] for n, m in made.items()}, a.out)
    files = [a.out / f"{n}{s}.safetensors" for n in ADAPTERS for s in ("-peft", "")]
    seen = check_diffusers(models, files)
    # what cases.json's "about" says
    assert all(v.startswith("refuses") for k, v in seen.items() if "pipe.load_lora_weights" in k), seen
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items()), "base UNet changed"
    if a.no_references:
        return
    twins = {str(a.out / f"{n}.safetensors"): a.out / f"{n}-peft.safetensors" for n in ADAPTERS}
    loras = {f"tests/data/lycoris/{n}.safetensors": a.out / f"{n}.safetensors" for n in ADAPTERS}
    about = ("diffusers reference runs (StableDiffusionXLPipeline, recorded noise) of the LyCORIS LoHa/LoKr files of "
             "tests/data/lycoris/ on the checkpoint tests/data/checkpoints/tiny-sdxl.safetensors as diffusers loads it; "
             "adapters made with peft 0.21.2 (LoHaConfig / LoKrConfig r=4, alpha != r, UNet Linear layers), named by "
             "LyCORIS 4.1.3; diffusers' StableDiffusionXLPipeline.load_lora_weights refuses all of them (peft layout: "
             "'Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.'; LyCORIS layout: "
             "'The following keys have not been correctly renamed: ...'), UNet2DConditionModel.load_lora_adapter "
             "refuses the LoHa one and loads the LoKr one with r and alpha inferred from the shapes (alpha = r: scale 1 "
             "everywhere, not the file's alpha/r), so each is applied by peft itself (inject_adapter_in_model + set_peft_model_state_dict of the "
             "<name>-peft.safetensors twin, same tensors; LycorisLayer.set_scale(name, weight) per case LoRA). Scales: "
             "LoHa dW = (w1_a@w1_b)*(w2_a@w2_b)*alpha/r; LoKr dW = kron(w1, w2)*alpha/r with r the inner dim of "
             "lokr_w1_b/lokr_w2_b, and 1 when neither factor is decomposed (LyCORIS writes alpha=1 there; peft's "
             "alpha/r agrees since those modules have alpha=r); times the case weight (tools/make_lycoris_fixtures.py)")
    with peft_loader(twins):
        eb.run_references(models, REPO / BUNDLES[0], REPO / BUNDLES[1], loras, {}, a.references, SEED,
                          cases=cases(), bundle_names=BUNDLES, about=about)
    assert not tuner_layers(unet) and all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    with tempfile.TemporaryDirectory() as tmp:  # the same cases (so the same noise) without the adapters
        plain, moved = [dict(c, loras=[]) for c in cases()], {}
        eb.run_references(models, REPO / BUNDLES[0], REPO / BUNDLES[1], {}, {}, Path(tmp), SEED, cases=plain,
                          bundle_names=BUNDLES)
        for c in cases():
            ref, base = load_file(str(a.references / f"{c['name']}.safetensors")), load_file(f"{tmp}/{c['name']}.safetensors")
            last = f"latents_{c['steps'] - 1}"
            assert torch.isfinite(ref[last]).all() and torch.isfinite(ref["image"]).all()
            rel = ((ref[last] - base[last]).norm() / base[last].norm()).item()
            print(f"  {c['name']}: final latents move by {100 * rel:.1f}% with the adapters")
            moved[c["name"]] = rel
        assert all(rel > 0.02 for rel in moved.values()), f"the adapters barely change the result: {moved}"
    sizes = {eb.repo_relative(f): f.stat().st_size for d in (a.out, a.references)
             for f in sorted(d.iterdir()) if f.is_file()}
    print("  " + json.dumps(sizes, indent=1))


if __name__ == "__main__":
    sys.exit(main())
