#!/usr/bin/env python3
"""A katz producer and result poller in Python (pika + msgpack + redis), written from
docs/protocol.md alone: what a text-to-image platform's Python service would embed.

    from producer import Producer
    p = Producer()                                   # RabbitMQ and Redis on localhost
    job_id = p.submit("a red circle", controlnets=[("tiny-sdxl-controlnet", open("edges.png", "rb").read(), 0.8)],
                      loras=[("tiny-lora-a", 0.8)])
    record = p.wait(job_id)                          # {'status': 'done', 'step': '20', ...}
    png = p.image(job_id)

Command line (tools/py-env.sh makes a venv with the pinned packages):

    .katz/py/bin/python tools/producer.py submit --prompt "a red circle" --wait --output out.png
    .katz/py/bin/python tools/producer.py status JOB_ID
    .katz/py/bin/python tools/producer.py cancel JOB_ID
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid

import msgpack
import pika
import redis

SCHEMA_VERSION = 1
JOBS_EXCHANGE = "katz.jobs"
DEAD_EXCHANGE = "katz.dlx"
MAX_PRIORITY = 10
FINAL = {"done", "failed", "cancelled"}


def jobs_queue(base: str) -> str:
    return f"katz.jobs.{base}"


# job ids: no `:`, so no id names another job's keys (docs/protocol.md, "Job ids and keys")
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def upload_key(job_id: str, name: str) -> str:
    """Where a job's conditioning image may be uploaded (the only keys a worker reads them from)."""
    return f"katz:upload:{job_id}:{name}"


def job_key(job_id: str) -> str:
    return f"katz:job:{job_id}"


class JobFailed(RuntimeError):
    pass


class Producer:
    def __init__(self, amqp_url: str | None = None, redis_url: str | None = None):
        self.amqp_url = amqp_url or os.environ.get("KATZ_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f")
        self.redis = redis.Redis.from_url(redis_url or os.environ.get("KATZ_REDIS", "redis://127.0.0.1:6379/0"))

    # ── topology: the same declarations as the workers (docs/protocol.md) ──
    @staticmethod
    def declare(ch, queue: str) -> None:
        ch.exchange_declare(JOBS_EXCHANGE, exchange_type="direct", durable=True)
        ch.exchange_declare(DEAD_EXCHANGE, exchange_type="direct", durable=True)
        dead = queue + ".dead"
        ch.queue_declare(dead, durable=True)
        ch.queue_bind(dead, DEAD_EXCHANGE, routing_key=dead)
        ch.queue_declare(queue, durable=True, arguments={
            "x-max-priority": MAX_PRIORITY,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            "x-dead-letter-routing-key": dead,
        })
        ch.queue_bind(queue, JOBS_EXCHANGE, routing_key=queue)

    def submit(self, prompt: str, base: str = "tiny-sdxl", *, job_id: str | None = None,
               negative_prompt: str | None = None, width: int = 128, height: int = 128, steps: int = 20,
               guidance: float = 5.0, seed: int = 0, scheduler: str = "euler", karras: bool = False,
               controlnets=(), loras=(), priority: int = 0, deadline_s: float | None = None,
               result_ttl_s: int = 86400, queue: str | None = None, unet_only: bool = False) -> str:
        """Publishes a job; returns its id. `controlnets`: (model, image_bytes | 'redis:KEY', scale[, start, end])
        or dicts {"model", "image", "scale", "start", "end", "resize", "canny": (low, high)}; images are PNG, JPEG
        or WebP of any size, `resize` one of "resize" (default), "crop", "pad". `seed=-1`: the worker draws one
        and records it as the job's `seed`. `loras`: (name, scale). `unet_only`: skip the parts of the LoRA files the
        base bundle cannot take (the record's `lora_skipped` names them) instead of failing."""
        job_id = job_id or f"py-{uuid.uuid4()}"
        if not ID_RE.match(job_id):
            raise ValueError(f"job id {job_id!r} is not 1-128 characters of [A-Za-z0-9_.-]")
        now_ms = int(time.time() * 1000)
        cns = []
        for c in controlnets:
            if not isinstance(c, dict):
                c = dict(zip(("model", "image", "scale", "start", "end"), c))
            image = c["image"]
            ref = {"redis_key": image[6:]} if isinstance(image, str) and image.startswith("redis:") else {"inline": bytes(image)}
            cn = {"model": c["model"], "image": ref, "scale": float(c.get("scale", 1.0)),
                  "start": float(c.get("start", 0.0)), "end": float(c.get("end", 1.0))}
            if c.get("resize"):
                cn["resize"] = c["resize"]
            if c.get("canny"):
                low, high = c["canny"]
                cn["canny"] = {"low": float(low), "high": float(high)}
            cns.append(cn)
        job = {
            "v": SCHEMA_VERSION, "id": job_id, "base": base, "prompt": prompt, "negative_prompt": negative_prompt,
            "width": width, "height": height, "steps": steps, "guidance": float(guidance), "seed": seed,
            "scheduler": scheduler, "karras": karras, "controlnets": cns,
            "loras": [{"name": n, "scale": float(s)} for n, s in loras],
            "priority": priority, "deadline_ms": now_ms + int(deadline_s * 1000) if deadline_s else None,
            "result_ttl_s": result_ttl_s, "submitted_ms": now_ms,
        }
        if unet_only:  # left out when false, as katz writes it
            job["unet_only"] = True
        body = msgpack.packb(job, use_bin_type=True)
        # a record first, so a reader never finds a published job without one
        if not self.redis.hsetnx(job_key(job_id), "status", "queued"):
            raise ValueError(f"job id {job_id!r} is already in use")
        self.redis.hset(job_key(job_id), mapping={"submitted_ms": now_ms})
        self.redis.expire(job_key(job_id), result_ttl_s)
        queue = queue or jobs_queue(base)
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            ch = conn.channel()
            self.declare(ch, queue)
            ch.confirm_delivery()
            ch.basic_publish(JOBS_EXCHANGE, queue, body, pika.BasicProperties(
                delivery_mode=2, priority=min(priority, MAX_PRIORITY), message_id=job_id,
                content_type="application/msgpack", timestamp=now_ms // 1000), mandatory=True)
        finally:
            conn.close()
        return job_id

    def status(self, job_id: str) -> dict:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(job_key(job_id)).items()}

    def wait(self, job_id: str, timeout: float = 600, poll: float = 0.1) -> dict:
        """Polls the record until the job ends; raises JobFailed for failed or cancelled jobs."""
        t0 = time.time()
        while True:
            rec = self.status(job_id)
            if rec.get("status") in FINAL:
                if rec["status"] != "done":
                    raise JobFailed(f"{job_id}: {rec['status']}: {rec.get('error', '')}")
                return rec
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{job_id} did not end within {timeout} s: {rec}")
            time.sleep(poll)

    def image(self, job_id: str) -> bytes:
        data = self.redis.get(f"katz:job:{job_id}:image")
        if data is None:
            raise KeyError(f"no image for {job_id}")
        return data

    def cancel(self, job_id: str) -> None:
        self.redis.set(f"katz:job:{job_id}:cancel", 1, ex=86400)
        if self.redis.hget(job_key(job_id), "status") == b"queued":
            self.redis.hset(job_key(job_id), mapping={"status": "cancelled", "finished_ms": int(time.time() * 1000)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="katz producer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--prompt", required=True)
    s.add_argument("--base", default="tiny-sdxl")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--size", default="128x128")
    s.add_argument("--seed", type=int, default=0, help="-1: the worker draws one (printed with --wait)")
    s.add_argument("--controlnet", action="append", default=[], help="MODEL=IMAGE[:SCALE] (PNG, JPEG or WebP, any size)")
    s.add_argument("--control-resize", choices=("resize", "crop", "pad"), default=None,
                   help="how images of another size are brought to the job's (every ControlNet)")
    s.add_argument("--canny", default=None, help="LOW,HIGH: the canny preprocessor on every ControlNet's image")
    s.add_argument("--lora", action="append", default=[], help="NAME[:SCALE]")
    s.add_argument("--unet-only", action="store_true",
                   help="skip the parts of the LoRA files the base bundle cannot take instead of failing")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--output")
    for name in ("status", "cancel"):
        sub.add_parser(name).add_argument("id")
    a = ap.parse_args(argv)
    p = Producer()
    if a.cmd == "status":
        print(p.status(a.id))
        return 0
    if a.cmd == "cancel":
        p.cancel(a.id)
        return 0
    w, h = (int(v) for v in a.size.lower().split("x"))
    cns = []
    for c in a.controlnet:
        model, rest = c.split("=", 1)
        path, _, scale = rest.partition(":")
        cns.append({"model": model, "image": open(path, "rb").read(), "scale": float(scale or 1.0),
                    "resize": a.control_resize,
                    "canny": tuple(float(v) for v in a.canny.split(",")) if a.canny else None})
    loras = [(n, float(s or 1.0)) for n, _, s in (x.partition(":") for x in a.lora)]
    job_id = p.submit(a.prompt, a.base, width=w, height=h, steps=a.steps, seed=a.seed, controlnets=cns, loras=loras,
                      unet_only=a.unet_only)
    print(job_id)
    if a.wait:
        rec = p.wait(job_id)
        if a.output:
            open(a.output, "wb").write(p.image(job_id))
        print(f"done by {rec.get('worker')} in {rec.get('service_ms')} ms, seed {rec.get('seed')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
