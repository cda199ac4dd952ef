#!/usr/bin/env python3
"""diffusers parity references for the trained family (bundles/shapes), for tests/parity.rs.

    .venv-tools/bin/python tools/shapes/ckpt_from_bundle.py --out /tmp/tiny-ckpt     (once)
    .venv-tools/bin/python tools/shapes/parity_refs.py --checkpoint /tmp/tiny-ckpt

diffusers' own pipelines run the checkpoint (the committed bundles' exact weights) with recorded
noise, at the demo's settings (128², 20 Euler steps, guidance 5), with each LoRA (the peft layout
and the kohya one) and with the ControlNet; `tests/data/parity-shapes/` gets the latents after
every step and the image. The Rust pipeline, fed the same noise, must follow them step by step:
this is the comparison from the same initial latents that tells a real difference between katz
and diffusers from a difference of noise (docs/quality/README.md, the stripes question).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import export_bundle as eb  # noqa: E402
import train_tiny as tt  # noqa: E402

PROMPT = "a red circle above a blue square on a white background"
EDGES = "bundles/shapes/examples/red-circle-above-blue-square-edges.png"
LORAS = {f"bundles/shapes/loras/{n}.safetensors": REPO / "bundles/shapes/loras" / f"{n}.safetensors"
         for n in ("stripes", "stripes-kohya", "pastel")}
CASES = [
    dict(name="shapes_stripes", scheduler="euler", prompt=PROMPT, steps=20, width=128, height=128,
         loras=[dict(file="bundles/shapes/loras/stripes.safetensors", scale=1.0)]),
    dict(name="shapes_stripes_kohya", scheduler="euler", prompt="a green star on a gray background", steps=20,
         width=128, height=128, loras=[dict(file="bundles/shapes/loras/stripes-kohya.safetensors", scale=1.0)]),
    dict(name="shapes_controlnet_pastel", scheduler="euler", prompt=PROMPT, steps=20, width=128, height=128,
         controlnets=[dict(image=EDGES, scale=1.0, start=0.0, end=1.0)],
         loras=[dict(file="bundles/shapes/loras/pastel.safetensors", scale=1.0)]),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the family's diffusers checkpoint")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "parity-shapes")
    ap.add_argument("--seed", type=int, default=4321)
    a = ap.parse_args(argv)
    from tokenizers import Tokenizer

    bundle = REPO / "bundles/shapes/shapes-sdxl"
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    models = eb.build_models(tt.family_config(), a.seed, a.checkpoint, tt.token_ids(tok))
    eb.run_references(models, bundle, REPO / "bundles/shapes/shapes-sdxl-controlnet", LORAS, {EDGES: REPO / EDGES},
                      a.out, a.seed, cases=[dict(c) for c in CASES],
                      bundle_names=("bundles/shapes/shapes-sdxl", "bundles/shapes/shapes-sdxl-controlnet"),
                      about="diffusers reference runs on the trained family (tools/shapes/parity_refs.py)")


if __name__ == "__main__":
    sys.exit(main())
