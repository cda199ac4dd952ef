#!/usr/bin/env python3
"""Records reference trajectories of the diffusers schedulers that `katz-onnx` reimplements.

Run with the tools venv (it has torch and diffusers):

    .venv-tools/bin/python tools/scheduler_reference.py

It writes `onnx/src/scheduler/testdata/reference.json`, which the unit tests of
`onnx/src/scheduler/mod.rs` compare the Rust schedulers against. Each case builds the scheduler the
way an SDXL pipeline does (`XScheduler.from_config(<SDXL base 1.0 scheduler_config.json>)` plus
per-case overrides), then runs the denoising loop of the pipeline on fixed pseudo-random data of 16
values: `scale_model_input`, a stand-in model output, `step`. Euler ancestral's noise is injected by
replacing the `randn_tensor` of its diffusers module so that step `i` draws `noise[i]`. The
`schedule_tables` section holds, without stepping, the timesteps (and Euler input scales) of many
more step counts.
"""

import json
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

OUT = pathlib.Path(__file__).resolve().parent.parent / "onnx/src/scheduler/testdata/reference.json"

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}

SHAPE = (1, 4, 2, 2)  # 16 values
MAX_STEPS = 62  # trailing spacing with 61 steps gives 62 timesteps in diffusers


def make_inputs():
    rng = np.random.default_rng(20240607)
    sample = rng.standard_normal(16).astype(np.float32)
    model_outputs = rng.standard_normal((MAX_STEPS, 16)).astype(np.float32)
    noise = rng.standard_normal((MAX_STEPS, 16)).astype(np.float32)
    return sample, model_outputs, noise


def check_config(name, sched):
    """Asserts that `from_config` gives the settings the Rust port assumes."""
    c = sched.config
    if name == "ddim":
        assert not c.set_alpha_to_one and not c.clip_sample and not c.thresholding, c
    if name == "dpm++2m":
        assert c.algorithm_type == "dpmsolver++" and c.solver_order == 2 and c.solver_type == "midpoint", c
        assert c.lower_order_final and not c.euler_at_final and c.final_sigmas_type == "zero", c
        assert not c.thresholding and c.lambda_min_clipped == -float("inf") and c.variance_type is None, c
    if name == "euler":
        assert c.interpolation_type == "linear" and c.final_sigmas_type == "zero", c
        assert c.timestep_type == "discrete" and not c.rescale_betas_zero_snr, c


def run_case(
    name, steps, spacing="leading", karras=False, prediction="epsilon", beta_schedule="scaled_linear", inputs=None
):
    sample0, model_outputs, noise = inputs
    overrides = {"timestep_spacing": spacing, "prediction_type": prediction, "beta_schedule": beta_schedule}
    if karras:
        overrides["use_karras_sigmas"] = True
    sched = CLASSES[name].from_config(SDXL_CONFIG, **overrides)
    check_config(name, sched)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)  # what StableDiffusionXLPipeline does

    noise_iter = iter(noise)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(next(noise_iter).copy()).reshape(shape).to(dtype=dtype)

    scheduling_euler_ancestral_discrete.randn_tensor = fake_randn

    timesteps = [float(t) for t in sched.timesteps]
    assert len(timesteps) <= MAX_STEPS
    sample = torch.from_numpy(sample0.copy()).reshape(SHAPE)
    scales, samples = [], []
    for i, t in enumerate(sched.timesteps):
        ones = torch.ones(SHAPE, dtype=torch.float32)
        scales.append(float(sched.scale_model_input(ones, t).flatten()[0]))
        model_output = torch.from_numpy(model_outputs[i].copy()).reshape(SHAPE)
        sample = sched.step(model_output, t, sample).prev_sample
        assert sample.dtype == torch.float32
        samples.append([float(v) for v in sample.flatten()])

    return {
        "scheduler": name,
        "steps": steps,
        "timestep_spacing": spacing,
        "use_karras_sigmas": karras,
        "prediction_type": prediction,
        "beta_schedule": beta_schedule,
        "timesteps": timesteps,
        "init_noise_sigma": float(sched.init_noise_sigma),
        "input_scales": scales,
        "samples": samples,
    }


def schedule_table(name, steps, spacing, karras):
    """Timesteps, init_noise_sigma and (Euler kinds) input scales for one setting, without stepping."""
    overrides = {"timestep_spacing": spacing}
    if karras:
        overrides["use_karras_sigmas"] = True
    sched = CLASSES[name].from_config(SDXL_CONFIG, **overrides)
    sched.set_timesteps(steps)
    row = {
        "scheduler": name,
        "steps": steps,
        "timestep_spacing": spacing,
        "use_karras_sigmas": karras,
        "timesteps": [float(t) for t in sched.timesteps],
        "init_noise_sigma": float(sched.init_noise_sigma),
    }
    if name in ("euler", "euler-a"):
        ones = torch.ones(1, dtype=torch.float32)
        row["input_scales"] = [float(ones / ((s**2 + 1) ** 0.5)) for s in sched.sigmas[:-1]]
    return row


def schedule_tables():
    tables = []
    settings = [
        ("euler", "leading", False),
        ("euler", "trailing", False),
        ("euler", "linspace", False),
        ("euler", "leading", True),
        ("euler", "trailing", True),
        ("euler-a", "leading", False),
        ("ddim", "leading", False),
        ("ddim", "trailing", False),
        ("ddim", "linspace", False),
        ("dpm++2m", "leading", False),
        ("dpm++2m", "trailing", False),
        ("dpm++2m", "linspace", False),
        ("dpm++2m", "leading", True),
    ]
    for name, spacing, karras in settings:
        for steps in list(range(1, 33)) + [50]:
            tables.append(schedule_table(name, steps, spacing, karras))
    return tables


def main():
    inputs = make_inputs()
    cases = []
    for name in CLASSES:
        for steps in (1, 4, 7):
            cases.append(run_case(name, steps, inputs=inputs))
        if name in ("euler", "dpm++2m"):
            for steps in (1, 4, 7):
                cases.append(run_case(name, steps, karras=True, inputs=inputs))
            cases.append(run_case(name, 25, karras=True, inputs=inputs))
        cases.append(run_case(name, 7, spacing="trailing", inputs=inputs))
        cases.append(run_case(name, 6, spacing="linspace", inputs=inputs))
        cases.append(run_case(name, 25, inputs=inputs))
        cases.append(run_case(name, 4, prediction="v_prediction", inputs=inputs))
        cases.append(run_case(name, 4, beta_schedule="linear", inputs=inputs))
        if name != "ddim":  # the 62nd trailing timestep is -1, which DDIM cannot index
            cases.append(run_case(name, 61, spacing="trailing", inputs=inputs))

    sample0, model_outputs, noise = inputs
    doc = {
        "generator": "tools/scheduler_reference.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "config": SDXL_CONFIG,
        "sample": [float(v) for v in sample0],
        "model_outputs": [[float(v) for v in row] for row in model_outputs],
        "noise": [[float(v) for v in row] for row in noise],
        "cases": cases,
        "schedule_tables": schedule_tables(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
