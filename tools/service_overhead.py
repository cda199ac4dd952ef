#!/usr/bin/env python3
"""Queue-to-result overhead of the katz service on the tiny bundles.

Starts one `katz worker` on its own queue, submits jobs one at a time with tools/producer.py and
reads each job's record: `pipeline_ms` (time in the model pipeline), `service_ms` (delivery →
result stored, in the worker) and submitted → finished (what a producer sees). The service's
overhead is `service_ms − pipeline_ms` (worker side) and `(finished − submitted) − pipeline_ms`
(end to end: publish, queueing, delivery, Redis writes). Medians over N jobs per configuration.

    .katz/py/bin/python tools/service_overhead.py [--jobs 30]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from producer import Producer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30)
    a = ap.parse_args()
    queue = f"katz.bench.overhead.{os.getpid()}"
    worker = subprocess.Popen([str(ROOT / "target/release/katz"), "worker", "--queue", queue, "--name", "bench"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = Producer()
    cond = (ROOT / "bundles/examples/edges-128.png").read_bytes()
    configs = {
        "64x64, 4 steps, no adapters": dict(width=64, height=64, steps=4),
        "128x128, 20 steps, 1 ControlNet + 1 LoRA (the demo)": dict(
            width=128, height=128, steps=20, controlnets=[("tiny-sdxl-controlnet", cond, 0.8)],
            loras=[("tiny-lora-a", 0.8)]),
    }
    try:
        p.wait(p.submit("warm up", queue=queue, width=64, height=64, steps=2), timeout=120)
        print(f"{'configuration':<52} {'pipeline':>9} {'service':>9} {'overhead':>9} {'end-to-end':>11} {'e2e overhead':>13}")
        for name, kw in configs.items():
            rows = []
            for i in range(a.jobs):
                rec = p.wait(p.submit("a red circle above a blue square", queue=queue, seed=i, **kw), timeout=300)
                pipe, svc = float(rec["pipeline_ms"]), float(rec["service_ms"])
                e2e = int(rec["finished_ms"]) - int(rec["submitted_ms"])
                rows.append((pipe, svc, svc - pipe, e2e, e2e - pipe))
            med = [statistics.median(c) for c in zip(*rows)]
            print(f"{name:<52} {med[0]:>7.1f}ms {med[1]:>7.1f}ms {med[2]:>7.1f}ms {med[3]:>9.1f}ms {med[4]:>11.1f}ms")
        print(f"(medians of {a.jobs} jobs each, one at a time, one worker; this machine: {os.cpu_count()} cores)")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        import pika
        conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
        ch = conn.channel()
        ch.queue_delete(queue)
        ch.queue_delete(queue + ".dead")
        conn.close()


if __name__ == "__main__":
    main()
