"""tools/producer.py against a real `katz worker`, RabbitMQ and Redis on localhost.

Run by `make test` (after the Rust build): .katz/py/bin/python -m pytest tools/test_producer.py
"""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from producer import JobFailed, Producer, upload_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KATZ = ROOT / "target" / "release" / "katz"


@pytest.fixture(scope="module")
def worker():
    queue = f"katz.test.py.{os.getpid()}"
    log = open(f"/tmp/katz-pytest-{os.getpid()}.log", "w")
    proc = subprocess.Popen([str(KATZ), "worker", "--queue", queue, "--name", "py-worker", "--threads", "1"],
                            cwd=ROOT, stdout=log, stderr=log)
    yield queue
    proc.terminate()
    assert proc.wait(timeout=60) == 0, "worker did not exit cleanly on SIGTERM"
    conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
    ch = conn.channel()
    ch.queue_delete(queue)
    ch.queue_delete(queue + ".dead")
    conn.close()


def test_submit_controlnet_and_lora_then_read_the_png(worker):
    p = Producer()
    cond = (ROOT / "bundles" / "examples" / "cond_a.png").read_bytes()
    job_id = p.submit("a red circle", width=64, height=64, steps=3, queue=worker,
                      controlnets=[("tiny-sdxl-controlnet", cond, 0.8)], loras=[("tiny-lora-a", 0.7)])
    rec = p.wait(job_id, timeout=120)
    assert rec["status"] == "done" and rec["worker"] == "py-worker"
    assert rec["step"] == rec["total"] == "3"
    assert p.image(job_id).startswith(b"\x89PNG\r\n\x1a\n")


def test_image_by_redis_key(worker):
    p = Producer()
    job_id = f"py-{uuid.uuid4()}"
    key = upload_key(job_id, "cond")
    p.redis.set(key, (ROOT / "bundles" / "examples" / "cond_b.png").read_bytes(), ex=600)
    p.submit("a square", job_id=job_id, width=64, height=64, steps=2, queue=worker,
             controlnets=[("tiny-sdxl-controlnet", f"redis:{key}", 0.5)])
    assert p.wait(job_id, timeout=120)["status"] == "done"


def test_a_photo_of_another_size_with_canny_and_a_random_seed(worker):
    p = Producer()
    photo = (ROOT / "bundles" / "examples" / "photo-200x120.jpg").read_bytes()
    cn = {"model": "tiny-sdxl-controlnet", "image": photo, "scale": 0.8, "resize": "crop", "canny": (100, 200)}
    job_id = p.submit("a red circle", width=64, height=64, steps=2, seed=-1, queue=worker, controlnets=[cn])
    rec = p.wait(job_id, timeout=120)
    assert rec["status"] == "done"
    seed = int(rec["seed"])
    again = p.submit("a red circle", width=64, height=64, steps=2, seed=seed, queue=worker, controlnets=[cn])
    assert p.wait(again, timeout=120)["seed"] == str(seed)
    assert p.image(again) == p.image(job_id), "the recorded seed makes the same PNG"


def test_bad_job_fails_with_the_reason(worker):
    p = Producer()
    job_id = p.submit("x", width=64, height=64, steps=2, queue=worker, loras=[("no-such-lora", 1.0)])
    with pytest.raises(JobFailed, match="unknown LoRA `no-such-lora`"):
        p.wait(job_id, timeout=120)


def test_cancel_a_queued_job(worker):
    p = Producer()
    # a long job ahead keeps the worker busy, so the second one is still queued when cancelled
    first = p.submit("busy", width=128, height=128, steps=300, queue=worker)
    second = p.submit("never", width=64, height=64, steps=2, queue=worker)
    p.cancel(second)
    assert p.status(second)["status"] == "cancelled"
    p.cancel(first)
    with pytest.raises(JobFailed, match="cancelled"):
        p.wait(first, timeout=120)
    time.sleep(0.5)
    assert p.status(second)["status"] == "cancelled"
