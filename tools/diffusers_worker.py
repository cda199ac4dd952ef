#!/usr/bin/env python3
"""A diffusers queue worker: what a team would write instead of katz, to compare against it
(`katz bench service`, docs/workload.md). A plain pika consumer of one RabbitMQ queue (manual ack,
prefetch 1) that reads katz's job message (docs/protocol.md) and runs it with diffusers'
StableDiffusionXLPipeline, or StableDiffusionXLControlNetPipeline with a MultiControlNetModel when
the job has ControlNets; LoRAs by name from a store directory with `load_lora_weights` +
`set_adapters` + `fuse_lora`, unfused and unloaded after the job. fp16 with SDPA on CUDA (fp32 on
the CPU). It writes the result and the job's record into Redis in the keys and shape a katz worker
writes, so `katz report`, `katz status`, `katz result` and `katz bench service` read both alike.

    python3 tools/diffusers_worker.py --queue katz.jobs.sdxl --base sdxl --controlnet sdxl-controlnet \\
        --lora-dir /tmp/store --device cuda:0 [--config sdxl|tiny] [--name NAME]

Data flow:

    RabbitMQ delivery ─▶ decode (msgpack, schema v1, id, types, defaults) ──bad──▶ failed + reject (.dead)
      ─▶ begin (the katz worker's Lua: conflict / already done / cancelled / running, attempts)
      ─▶ check (base, size, steps, guidance, scheduler, ControlNet models, PNG sizes, LoRA files)
      ─▶ LoRAs load + fuse ─▶ pipeline (progress per step: HSET step/total, PUBLISH, cancel flag)
      ─▶ unfuse + unload ─▶ PNG ─▶ Redis (image, record: done, timings) ─▶ ack

Models are built once, as tools/bench_diffusers.py builds them: seeded random weights from the
config katz's bundles are exported from (`--config sdxl`, or `tiny` for a CPU smoke test); each
`--controlnet NAME` is a ControlNet of that config (a job that names a ControlNet twice gets the
same one twice). Euler (katz's default) and the other schedulers a job may name are diffusers'
own, from the SDXL scheduler config. Needs torch, diffusers, transformers, peft, pika, redis,
msgpack, pillow.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import msgpack
import pika
import redis

SCHEMA_VERSION = 1
JOBS_EXCHANGE, DEAD_EXCHANGE, MAX_PRIORITY = "katz.jobs", "katz.dlx", 10
DEFAULT_TTL_S = 86_400
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SCHEDULERS = ("euler", "euler-a", "ddim", "dpm++2m")

# The katz worker's begin script (actors/src/store/mod.rs), verbatim: conflict / done / cancelled /
# run, atomically.
BEGIN_LUA = r"""
local k, cancel = KEYS[1], KEYS[2]
local digest, worker, now, total, wait = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local d = redis.call('HGET', k, 'digest')
local st = redis.call('HGET', k, 'status')
if d and d ~= digest then return {'conflict', d} end
if st == 'done' then return {'done', ''} end
if st == 'cancelled' or redis.call('EXISTS', cancel) == 1 then
  redis.call('HSET', k, 'status', 'cancelled', 'digest', digest, 'finished_ms', now)
  return {'cancelled', ''}
end
redis.call('HSET', k, 'status', 'running', 'digest', digest, 'worker', worker, 'started_ms', now,
  'step', 0, 'total', total)
if wait ~= '' then redis.call('HSET', k, 'queue_wait_ms', wait) end
redis.call('HDEL', k, 'error', 'error_kind')
local n = redis.call('HINCRBY', k, 'attempts', 1)
return {'run', tostring(n)}
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def job_key(i: str) -> str:
    return f"katz:job:{i}"


class Rejected(Exception):
    """A job that can never succeed: its record says why (`error_kind`), and it is dead-lettered."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Cancelled(Exception):
    pass


# ───────────────────────────── the job message ─────────────────────────────

def _int(v, what, lo=0, hi=(1 << 64) - 1):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise Rejected("decode", f"job does not decode: `{what}` is not an integer in {lo}..={hi}")
    return v


def _float(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Rejected("decode", f"job does not decode: `{what}` is not a number")
    return struct.unpack(">f", struct.pack(">f", float(v)))[0]  # an f32, as katz reads it


def _str(v, what, optional=False):
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise Rejected("decode", f"job does not decode: `{what}` is not a string")
    return v


def decode(body: bytes, max_bytes: int) -> dict:
    """The message as katz's `protocol::decode` reads it: a normalised job (defaults filled in,
    field order and types of katz's `Job`). Raises Rejected('decode') with the id where readable."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        m = None
    jid = m.get("id") if isinstance(m, dict) and isinstance(m.get("id"), str) and ID_RE.match(m["id"]) else None

    def fail(msg):
        e = Rejected("decode", msg)
        e.id = jid
        return e

    if len(body) > max_bytes:
        raise fail(f"message is {len(body)} bytes, over the limit of {max_bytes} (send large conditioning "
                   "images by Redis key)")
    if not isinstance(m, dict):
        raise fail("message is not a msgpack map (see docs/protocol.md)")
    if "v" not in m or m["v"] is None:
        raise fail("message has no schema version `v`")
    if m["v"] != SCHEMA_VERSION:
        raise fail(f"schema version {m['v']} is not supported (this worker reads {SCHEMA_VERSION})")
    if "id" not in m or m["id"] is None:
        raise fail("message has no job `id`")
    if jid is None:
        raise fail(f"job id {m['id']!r} is not 1-128 characters of [A-Za-z0-9_.-]")
    try:
        for k in ("base", "prompt", "width", "height", "steps", "guidance", "seed"):
            if k not in m:
                raise Rejected("decode", f"job does not decode: missing field `{k}`")
        for k in ("controlnets", "loras"):
            if not isinstance(m.get(k, []), list):
                raise Rejected("decode", f"job does not decode: `{k}` is not an array")
        cns = []
        for i, c in enumerate(m.get("controlnets", [])):
            if not isinstance(c, dict) or "model" not in c or "image" not in c:
                raise Rejected("decode", f"job does not decode: controlnets[{i}] needs `model` and `image`")
            img = c["image"]
            if isinstance(img, dict) and len(img) == 1 and isinstance(img.get("inline"), (bytes, bytearray)):
                ref = {"inline": bytes(img["inline"])}
            elif isinstance(img, dict) and len(img) == 1 and isinstance(img.get("redis_key"), str):
                ref = {"redis_key": img["redis_key"]}
            else:
                raise Rejected("decode", f"job does not decode: controlnets[{i}].image is neither "
                                         "{inline: bin} nor {redis_key: str}")
            cns.append({"model": _str(c["model"], "model"), "image": ref,
                        "scale": _float(c.get("scale", 1.0), "scale"), "start": _float(c.get("start", 0.0), "start"),
                        "end": _float(c.get("end", 1.0), "end")})
        loras = []
        for i, lo in enumerate(m.get("loras", [])):
            if not isinstance(lo, dict) or "name" not in lo:
                raise Rejected("decode", f"job does not decode: loras[{i}] needs `name`")
            loras.append({"name": _str(lo["name"], "name"), "scale": _float(lo.get("scale", 1.0), "scale")})
        dl, sub = m.get("deadline_ms"), m.get("submitted_ms")
        job = {
            "v": SCHEMA_VERSION, "id": jid, "base": _str(m["base"], "base"), "prompt": _str(m["prompt"], "prompt"),
            "negative_prompt": _str(m.get("negative_prompt"), "negative_prompt", optional=True),
            "width": _int(m["width"], "width", hi=2**32 - 1), "height": _int(m["height"], "height", hi=2**32 - 1),
            "steps": _int(m["steps"], "steps", hi=2**32 - 1), "guidance": _float(m["guidance"], "guidance"),
            "seed": _int(m["seed"], "seed"), "scheduler": _str(m.get("scheduler", "euler"), "scheduler"),
            "karras": bool(m.get("karras", False)), "controlnets": cns, "loras": loras,
            "priority": _int(m.get("priority", 0), "priority", hi=255),
            "deadline_ms": None if dl is None else _int(dl, "deadline_ms"),
            "result_ttl_s": _int(m.get("result_ttl_s", DEFAULT_TTL_S), "result_ttl_s"),
            "submitted_ms": None if sub is None else _int(sub, "submitted_ms"),
        }
        if not isinstance(m.get("karras", False), bool):
            raise Rejected("decode", "job does not decode: `karras` is not a bool")
    except Rejected as e:
        raise fail(str(e)) from None
    if job["priority"] > MAX_PRIORITY:
        raise fail(f"priority {job['priority']} is over {MAX_PRIORITY}")
    return job


def digest(job: dict) -> str:
    """katz's `Job::digest`: FNV-1a 64 over the job's msgpack (named fields in `Job`'s order, f32
    floats) without `submitted_ms` and `priority` — the digest a katz producer records."""
    canon = dict(job, submitted_ms=None, priority=0)
    h = 0xcbf29ce484222325
    for b in msgpack.packb(canon, use_bin_type=True, use_single_float=True):
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# ───────────────────────────── the models ─────────────────────────────

class Models:
    """The pipeline's modules, built once and kept on the device."""

    def __init__(self, config: str, controlnets: list[str], device: str, seed: int, lora_dir: Path | None,
                 fuse: bool):
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_diffusers as bd
        import export_bundle as eb

        self.torch, self.device, self.lora_dir, self.fuse = torch, device, lora_dir, fuse
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
        cfg = eb.tiny_config() if config == "tiny" else eb.sdxl_config()
        tok, te, te2, unet, vae, cns = bd.build(cfg, len(controlnets), self.dtype, device, seed)
        self.controlnets = dict(zip(controlnets, cns))
        self.sched_config = {k: v for k, v in eb.SCHEDULER.items() if k not in ("skip_prk_steps",)}
        self.common = dict(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                           force_zeros_for_empty_prompt=True, add_watermarker=False)
        self.base = StableDiffusionXLPipeline(scheduler=EulerDiscreteScheduler(**self._sched_kw()), **self.common)
        self.base.set_progress_bar_config(disable=True)
        self.max_side = 2048

    def _sched_kw(self):
        drop = ("set_alpha_to_one", "clip_sample", "sample_max_value")
        return {k: v for k, v in self.sched_config.items() if k not in drop}

    def scheduler(self, name: str, karras: bool):
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                               EulerDiscreteScheduler)
        kw = self._sched_kw()
        if name == "euler":
            return EulerDiscreteScheduler(**{**kw, "use_karras_sigmas": karras})
        if name == "euler-a":
            return EulerAncestralDiscreteScheduler(**{k: v for k, v in kw.items()
                                                      if k not in ("interpolation_type", "use_karras_sigmas")})
        if name == "ddim":
            c = {k: v for k, v in self.sched_config.items() if k not in ("interpolation_type", "use_karras_sigmas")}
            return DDIMScheduler(**c)
        return DPMSolverMultistepScheduler(**{**{k: v for k, v in kw.items() if k != "interpolation_type"},
                                              "use_karras_sigmas": karras})

    def check(self, job: dict, images: list[bytes]):
        """The request check katz makes before any model work; returns the conditioning images."""
        from PIL import Image
        w, h = job["width"], job["height"]
        if w == 0 or h == 0 or w % 8 or h % 8 or max(w, h) > self.max_side:
            raise Rejected("invalid", f"size {w}x{h}: sides must be positive multiples of 8, at most {self.max_side}")
        if not 1 <= job["steps"] <= 1000:
            raise Rejected("invalid", f"steps {job['steps']}: 1-1000")
        if not 0.0 <= job["guidance"] <= 100.0:
            raise Rejected("invalid", f"guidance {job['guidance']}: 0-100")
        if job["scheduler"] not in SCHEDULERS:
            raise Rejected("invalid", f"unknown scheduler `{job['scheduler']}` (known: {', '.join(SCHEDULERS)})")
        pil = []
        for c, png in zip(job["controlnets"], images):
            if c["model"] not in self.controlnets:
                raise Rejected("invalid", f"ControlNet `{c['model']}` is not loaded here "
                                          f"(loaded: {', '.join(self.controlnets) or 'none'})")
            if not (0.0 <= c["start"] <= c["end"] <= 1.0):
                raise Rejected("invalid", f"ControlNet `{c['model']}`: start {c['start']}, end {c['end']}")
            try:
                im = Image.open(io.BytesIO(png))
                im.load()
            except Exception as e:
                raise Rejected("image", f"conditioning image of `{c['model']}` is not a PNG: {e}") from None
            if im.size != (w, h):
                raise Rejected("image", f"conditioning image of `{c['model']}` is {im.size[0]}x{im.size[1]}, "
                                        f"the job is {w}x{h}")
            pil.append(im.convert("RGB"))
        for lo in job["loras"]:
            n = lo["name"]
            if not n or "/" in n or "\\" in n or n.startswith("."):
                raise Rejected("lora", f"LoRA name `{n}` is not a plain name")
            if self.lora_dir is None or not (self.lora_dir / f"{n}.safetensors").is_file():
                raise Rejected("lora", f"LoRA `{n}` is not in the store ({self.lora_dir})")
        return pil

    def run(self, job: dict, pil: list, on_step) -> tuple[bytes, dict]:
        """Runs the job; `on_step(step, total)` after every step returns True to stop (cancel)."""
        torch = self.torch
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        t = {}
        t0 = time.perf_counter()
        names = []
        if job["loras"]:
            for i, lo in enumerate(job["loras"]):
                names.append(f"l{i}")
                self.base.load_lora_weights(str(self.lora_dir / f"{lo['name']}.safetensors"), adapter_name=names[-1])
            self.base.set_adapters(names, adapter_weights=[lo["scale"] for lo in job["loras"]])
            if self.fuse:
                self.base.fuse_lora(adapter_names=names, lora_scale=1.0)
            sync()
        t["lora_merge_ms"] = (time.perf_counter() - t0) * 1e3
        try:
            sched = self.scheduler(job["scheduler"], job["karras"])
            kw = dict(prompt=job["prompt"], negative_prompt=job["negative_prompt"], height=job["height"],
                      width=job["width"], num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                      generator=torch.Generator(device=self.device).manual_seed(job["seed"]), output_type="pil")
            if job["controlnets"]:
                from diffusers import StableDiffusionXLControlNetPipeline
                from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
                cns = job["controlnets"]
                pipe = StableDiffusionXLControlNetPipeline(
                    controlnet=MultiControlNetModel([self.controlnets[c["model"]] for c in cns]),
                    scheduler=sched, **self.common)
                kw.update(image=pil, controlnet_conditioning_scale=[c["scale"] for c in cns],
                          control_guidance_start=[c["start"] for c in cns],
                          control_guidance_end=[c["end"] for c in cns])
            else:
                pipe = self.base
                pipe.scheduler = sched
            pipe.set_progress_bar_config(disable=True)
            steps_t = []
            cancelled = []

            def cb(p, i, _ts, kwargs):
                steps_t.append(time.perf_counter())
                if on_step(i + 1, job["steps"]):
                    cancelled.append(i + 1)
                    p._interrupt = True
                return kwargs

            t1 = time.perf_counter()
            with torch.no_grad():
                img = pipe(callback_on_step_end=cb, **kw).images[0]
            sync()
            t["pipeline_run_ms"] = (time.perf_counter() - t1) * 1e3
            if cancelled:
                raise Cancelled()
            if steps_t:
                t["first_step_ms"] = (steps_t[0] - t0) * 1e3
                t["step_ms"] = ((steps_t[-1] - steps_t[0]) / max(len(steps_t) - 1, 1)) * 1e3 if len(steps_t) > 1 \
                    else (steps_t[0] - t1) * 1e3
        finally:
            if names:
                t2 = time.perf_counter()
                if self.fuse:
                    self.base.unfuse_lora()
                self.base.unload_lora_weights()
                t["lora_unload_ms"] = (time.perf_counter() - t2) * 1e3
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), t


# ───────────────────────────── the worker ─────────────────────────────

class Worker:
    def __init__(self, a, models: Models | None, r: redis.Redis):
        self.a, self.models, self.r = a, models, r
        self.begin = r.register_script(BEGIN_LUA)
        self.stop = False

    def event(self, jid, status, step, total, error=None):
        e = {"id": jid, "status": status, "step": step, "total": total}
        if error is not None:
            e["error"] = error
        return json.dumps(e, separators=(",", ":"))

    def finish(self, jid, status, ttl, fields=(), png=None, error=None):
        f = dict(fields)
        f["status"] = status
        f["finished_ms"] = now_ms()
        if png is not None:
            f["image_key"] = f"katz:job:{jid}:image"
            f["image_bytes"] = len(png)
        if error is not None:
            f["error"], f["error_kind"] = error[1], error[0]
        total = int(f.get("total", 0) or 0)
        p = self.r.pipeline(transaction=True)
        if png is not None:
            p.set(f"katz:job:{jid}:image", png, ex=ttl)
        p.hset(job_key(jid), mapping=f)
        p.expire(job_key(jid), ttl)
        p.delete(f"katz:job:{jid}:cancel")
        p.publish(f"katz:events:{jid}", self.event(jid, status, total, total, None if error is None else error[1]))
        p.execute()

    def on_message(self, ch, method, props, body):
        delivered = time.perf_counter()
        try:
            job = decode(body, self.a.max_message_bytes)
        except Rejected as e:
            print(f"rejecting a message: {e}", flush=True)
            if getattr(e, "id", None):
                self.finish(e.id, "failed", DEFAULT_TTL_S, error=(e.kind, str(e)))
            ch.basic_reject(method.delivery_tag, requeue=False)
            return
        jid, ttl = job["id"], job["result_ttl_s"]
        wait = "" if job["submitted_ms"] is None else str(max(now_ms() - job["submitted_ms"], 0))
        try:
            if job["deadline_ms"] is not None and now_ms() > job["deadline_ms"]:
                raise Rejected("deadline", f"the job's deadline passed {now_ms() - job['deadline_ms']} ms ago")
            d = digest(job)
            verdict, arg = (x.decode() if isinstance(x, bytes) else x for x in self.begin(
                keys=[job_key(jid), f"katz:job:{jid}:cancel"], args=[d, self.a.name, now_ms(), job["steps"], wait]))
            if verdict == "conflict":
                self.r.hset(job_key(jid), "conflict", f"job id `{jid}` is in use by another job "
                                                      f"(digest {arg}, this one {d})")
                ch.basic_reject(method.delivery_tag, requeue=False)
                return
            if verdict in ("done", "cancelled"):
                if verdict == "cancelled":
                    self.r.publish(f"katz:events:{jid}", self.event(jid, "cancelled", 0, 0))
                ch.basic_ack(method.delivery_tag)
                return
            self.r.publish(f"katz:events:{jid}", self.event(jid, "running", 0, job["steps"]))
            if job["base"] != self.a.base:
                raise Rejected("invalid", f"base model `{job['base']}` is not served here (this worker: {self.a.base})")
            images = []
            for c in job["controlnets"]:
                if "inline" in c["image"]:
                    images.append(c["image"]["inline"])
                else:
                    if not c["image"]["redis_key"].startswith(f"katz:upload:{jid}:"):
                        raise Rejected("invalid", f"conditioning image key `{c['image']['redis_key']}` is not one of "
                                                  f"this job's uploads (`katz:upload:{jid}:<name>`)")
                    b = self.r.get(c["image"]["redis_key"])
                    if b is None:
                        raise Rejected("invalid", f"conditioning image key `{c['image']['redis_key']}` is not in Redis")
                    images.append(b)
            pil = self.models.check(job, images)

            def on_step(step, total):
                p = self.r.pipeline(transaction=False)
                p.hset(job_key(jid), mapping={"step": step, "total": total})
                p.publish(f"katz:events:{jid}", self.event(jid, "running", step, total))
                p.exists(f"katz:job:{jid}:cancel")
                return bool(p.execute()[-1])

            t0 = time.perf_counter()
            png, t = self.models.run(job, pil, on_step)
            pipeline_ms = (time.perf_counter() - t0) * 1e3
            fields = {"worker": self.a.name, "step": job["steps"], "total": job["steps"],
                      "pipeline_ms": f"{pipeline_ms:.3f}",
                      "service_ms": f"{(time.perf_counter() - delivered) * 1e3:.3f}",
                      **{k: f"{v:.3f}" for k, v in t.items() if k in ("first_step_ms", "step_ms", "lora_merge_ms")}}
            if job["loras"]:
                fields.update(lora_mode="fuse" if self.a.fuse else "unfused", lora_loads=len(job["loras"]),
                              lora_cache_hits=0, lora_load_ms=f"{t['lora_merge_ms']:.3f}")
            self.finish(jid, "done", ttl, fields, png=png)
            ch.basic_ack(method.delivery_tag)
            print(f"{jid}: done in {pipeline_ms:.0f} ms ({len(job['controlnets'])}C/{len(job['loras'])}L, "
                  f"{job['width']}x{job['height']}, {job['steps']} steps)", flush=True)
        except Rejected as e:
            print(f"{jid}: failed ({e.kind}): {e}", flush=True)
            self.finish(jid, "failed", ttl, error=(e.kind, str(e)))
            ch.basic_reject(method.delivery_tag, requeue=False)
        except Cancelled:
            self.finish(jid, "cancelled", ttl, error=("cancelled", "the job was cancelled"))
            ch.basic_ack(method.delivery_tag)
        except redis.RedisError as e:
            print(f"{jid}: Redis: {e}; the job goes back to the queue", flush=True)
            time.sleep(1)
            ch.basic_nack(method.delivery_tag, requeue=True)
        except Exception as e:  # the model failed on this job (e.g. out of memory): say so, dead-letter
            print(f"{jid}: failed: {type(e).__name__}: {e}", flush=True)
            self.finish(jid, "failed", ttl, error=("model", f"{type(e).__name__}: {e}"))
            ch.basic_reject(method.delivery_tag, requeue=False)
        if self.stop:
            ch.stop_consuming()


def declare(ch, queue: str) -> None:
    """The topology katz's workers and producers declare (docs/protocol.md)."""
    ch.exchange_declare(JOBS_EXCHANGE, exchange_type="direct", durable=True)
    ch.exchange_declare(DEAD_EXCHANGE, exchange_type="direct", durable=True)
    dead = queue + ".dead"
    ch.queue_declare(dead, durable=True)
    ch.queue_bind(dead, DEAD_EXCHANGE, routing_key=dead)
    ch.queue_declare(queue, durable=True, arguments={
        "x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": DEAD_EXCHANGE, "x-dead-letter-routing-key": dead})
    ch.queue_bind(queue, JOBS_EXCHANGE, routing_key=queue)


class Heartbeat(threading.Thread):
    """`katz:worker:<name>` as a katz worker writes it: every 5 s, expiring 15 s after the last."""

    def __init__(self, r: redis.Redis, a, started: float):
        super().__init__(daemon=True)
        self.r, self.a, self.started, self.status, self.ready_after = r, a, started, "loading", ""
        self.wake = threading.Event()

    def set(self, status: str):
        if status == "ready" and not self.ready_after:
            self.ready_after = str(int((time.time() - self.started) * 1000))
        self.status = status
        self.write()

    def write(self):
        k = f"katz:worker:{self.a.name}"
        try:
            self.r.hset(k, mapping={"status": self.status, "base": self.a.base, "queue": self.a.queue,
                                    "device": self.a.device, "concurrency": 1, "pid": os.getpid(),
                                    "heartbeat_ms": now_ms(), "ready_after_ms": self.ready_after})
            self.r.expire(k, 15)
        except redis.RedisError:
            pass

    def run(self):
        while not self.wake.wait(5):
            self.write()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", required=True)
    ap.add_argument("--base", default=None, help="the base model name jobs ask for [default: the config's]")
    ap.add_argument("--config", choices=("sdxl", "tiny"), default="sdxl")
    ap.add_argument("--controlnet", action="append", default=[], help="a ControlNet model name (repeatable)")
    ap.add_argument("--lora-dir", type=Path, help="LoRA store: <name>.safetensors")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep LoRAs as adapters (no fuse_lora)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random weights")
    ap.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}")
    ap.add_argument("--max-message-bytes", type=int, default=32 << 20)
    ap.add_argument("--amqp", default=os.environ.get("KATZ_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    ap.add_argument("--redis", default=os.environ.get("KATZ_REDIS", "redis://127.0.0.1:6379/0"))
    a = ap.parse_args(argv)
    a.base = a.base or ("tiny-sdxl" if a.config == "tiny" else "sdxl")
    started = time.time()
    r = redis.Redis.from_url(a.redis)
    hb = Heartbeat(r, a, started)
    hb.set("loading")
    hb.start()
    t0 = time.perf_counter()
    models = Models(a.config, a.controlnet, a.device, a.seed, a.lora_dir, a.fuse)
    print(f"diffusers worker {a.name}: {a.config} on {a.device} ({models.dtype}), ControlNets "
          f"{', '.join(a.controlnet) or 'none'}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    params = pika.URLParameters(a.amqp)
    params.heartbeat = 0  # a job may run longer than the broker's heartbeat; the IO loop waits for it
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    declare(ch, a.queue)
    ch.basic_qos(prefetch_count=1)
    w = Worker(a, models, r)

    def stop(*_):
        w.stop = True
        hb.set("stopping")
        conn.add_callback_threadsafe(ch.stop_consuming)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ch.basic_consume(a.queue, w.on_message, auto_ack=False)
    hb.set("ready")
    print(f"consuming {a.queue}", flush=True)
    try:
        ch.start_consuming()
    finally:
        hb.wake.set()
        hb.set("stopped")
        try:
            conn.close()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
