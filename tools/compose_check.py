#!/usr/bin/env python3
"""Jobs through a running compose stack, with workers restarted mid-job (tools/test-compose.sh).

    submit ──▶ RabbitMQ ──▶ worker / worker-cn (+ controlnet) ──▶ Redis ──▶ records, images
       │                         ▲ docker restart mid-job                       │
       └── katz:events:* (psubscribe): `done` events counted per job ◀──────────┘

Submits jobs with the shapes family's ControlNet and a LoRA (tools/producer.py), waits until
jobs run, restarts worker containers while a job of theirs is in flight (`--kill`: SIGKILL and
start again, the job is redelivered; `--stop`: SIGTERM, the job finishes first), then checks
that nothing was lost: every job `done` exactly once (one `done` event), its PNG in Redis with
the record's size, nothing dead-lettered or left in the queue. Prints one `check` line per
check and exits 1 if one failed.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pika
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from producer import FINAL, Producer, job_key, jobs_queue  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDGES = ROOT / "bundles/shapes/examples/red-circle-above-blue-square-edges.png"
PROMPT = "a red circle above a blue square"

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"check {'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def sh(*args: str, check_rc: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if check_rc and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p.stdout.strip()


class Events(threading.Thread):
    """Counts the `done` events of every job (katz:events:<id>)."""

    def __init__(self, r: redis.Redis):
        super().__init__(daemon=True)
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("katz:events:*")
        self.done: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.stop = False

    def run(self):
        while not self.stop:
            m = self.pubsub.get_message(timeout=0.5)
            if not m or m["type"] != "pmessage":
                continue
            ev = json.loads(m["data"])
            self.steps[ev["id"]] += 1
            if ev.get("status") == "done":
                self.done[ev["id"]] += 1


def containers(project: str) -> dict[str, tuple[str, str]]:
    """Container hostname → (container name, compose service) of the project's workers."""
    out = {}
    ids = sh("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}").split()
    for cid in ids:
        host, name, service = sh("docker", "inspect", "-f",
                                 '{{.Config.Hostname}} {{.Name}} {{index .Config.Labels "com.docker.compose.service"}}',
                                 cid).split()
        out[host] = (name.lstrip("/"), service)
    return out


def running_job(p: Producer, ids: list[str], services: set[str], project: str, taken: set[str], min_step: int):
    """A job running on a worker of one of `services`, at least min_step steps in: (id, container, service)."""
    hosts = containers(project)
    for i in ids:
        if i in taken:
            continue
        rec = p.status(i)
        if rec.get("status") != "running" or int(rec.get("step") or 0) < min_step:
            continue
        host = rec.get("worker", "").rsplit("-", 1)[0]   # worker names are <host>-<pid>
        if host in hosts and hosts[host][1] in services:
            return i, hosts[host][0], hosts[host][1]
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amqp", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--project", required=True, help="compose project name (container labels)")
    ap.add_argument("--base", default="shapes-sdxl")
    ap.add_argument("--controlnet", default="shapes-sdxl-controlnet")
    ap.add_argument("--lora", default="pastel")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--kill", action="append", default=[], metavar="SERVICE",
                    help="SIGKILL and restart a container of SERVICE while a job of its runs (repeatable)")
    ap.add_argument("--stop", action="append", default=[], metavar="SERVICE",
                    help="docker restart (SIGTERM, the job in flight finishes) a container of SERVICE mid-job")
    ap.add_argument("--kill-controlnet", action="store_true",
                    help="also SIGKILL and restart the ControlNet service's container while a worker-cn job runs")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()

    p = Producer(a.amqp, a.redis)
    events = Events(p.redis)
    events.start()
    edges = EDGES.read_bytes()
    t0 = time.time()
    ids = []
    for n in range(a.jobs):
        ids.append(p.submit(PROMPT, base=a.base, job_id=f"compose-{int(t0)}-{n:02d}", steps=a.steps, seed=n % 4 + 1,
                            controlnets=[(a.controlnet, edges, 1.0)], loras=[(a.lora, 0.8)]))
    print(f"submitted {len(ids)} jobs ({a.steps} steps, ControlNet {a.controlnet}, LoRA {a.lora}) "
          f"to {jobs_queue(a.base)}", flush=True)

    # faults, each while a job of that service is in flight
    faults = [("kill", s) for s in a.kill] + [("stop", s) for s in a.stop]
    if a.kill_controlnet:
        faults.append(("kill-controlnet", "worker-cn"))
    hit: dict[str, tuple[str, str, str]] = {}   # job id → (fault, container, service)
    for kind, service in faults:
        deadline = time.time() + 300
        found = None
        while time.time() < deadline and not found:
            found = running_job(p, ids, {service}, a.project, set(hit), min_step=max(2, a.steps // 10))
            if not found:
                time.sleep(0.2)
        if not found:
            check(f"{kind} {service} mid-job", False, "no job of it was seen running")
            continue
        job, container, svc = found
        rec = p.status(job)
        if kind == "kill":
            sh("docker", "restart", "-t", "0", container)      # SIGKILL at once, then started again
        elif kind == "stop":
            sh("docker", "restart", "-t", "600", container)    # SIGTERM: the job in flight ends first
        else:
            cn = [n for n, s in containers(a.project).values() if s == "controlnet"]
            container = cn[0]
            sh("docker", "restart", "-t", "0", container)
        hit[job] = (kind, container, svc)
        print(f"{kind}: restarted {container} while {job} was at step {rec.get('step')}/{rec.get('total')} "
              f"on {svc} ({time.time() - t0:.1f} s)", flush=True)

    # every job ends
    pending = set(ids)
    end = time.time() + a.timeout
    while pending and time.time() < end:
        for i in list(pending):
            if p.status(i).get("status") in FINAL:
                pending.discard(i)
        time.sleep(0.5)
    wall = time.time() - t0
    time.sleep(1.0)   # the last events
    events.stop = True

    recs = {i: p.status(i) for i in ids}
    by_status = Counter(r.get("status", "missing") for r in recs.values())
    check("every job ended", not pending, f"{len(ids) - len(pending)}/{len(ids)} in {wall:.1f} s"
          + (f"; not ended: {sorted(pending)}" if pending else ""))
    bad = {i: f"{r.get('status')} {r.get('error_kind', '')} {r.get('error', '')}".strip()
           for i, r in recs.items() if r.get("status") != "done"}
    check("every job done", not bad, f"{dict(by_status)}" + (f"; {bad}" if bad else ""))
    dup = {i: events.done[i] for i in ids if events.done[i] != 1}
    check("exactly one `done` event per job", not dup, f"{sum(events.done[i] for i in ids)} done events for "
          f"{len(ids)} jobs" + (f"; off: {dup}" if dup else ""))
    images_ok = 0
    for i, r in recs.items():
        data = p.redis.get(f"katz:job:{i}:image") or b""
        if png_size(data) == (128, 128) and str(len(data)) == r.get("image_bytes"):
            images_ok += 1
    check("every image stored (128x128 PNG, size as recorded)", images_ok == len(ids), f"{images_ok}/{len(ids)}")

    for job, (kind, container, svc) in hit.items():
        r = recs[job]
        if kind == "kill":
            check(f"job killed mid-run on {svc} ran again and ended done", r.get("status") == "done"
                  and int(r.get("attempts") or 0) >= 2, f"{job}: status {r.get('status')}, attempts {r.get('attempts')}")
        elif kind == "stop":
            check(f"job in flight on a stopped {svc} finished before the stop", r.get("status") == "done"
                  and int(r.get("attempts") or 0) == 1, f"{job}: status {r.get('status')}, attempts {r.get('attempts')}")
        else:
            check("job whose ControlNet service was killed mid-run ended done", r.get("status") == "done",
                  f"{job}: attempts {r.get('attempts')}, controlnet_retries {r.get('controlnet_retries', 0)}")

    services = Counter()
    hosts = containers(a.project)
    for r in recs.values():
        h = r.get("worker", "").rsplit("-", 1)[0]
        services[hosts.get(h, ("?", "?"))[1]] += 1
    check("jobs ran on both the in-process ControlNet workers and the ControlNet-service workers",
          services["worker"] > 0 and services["worker-cn"] > 0, f"by service: {dict(services)}")

    conn = pika.BlockingConnection(pika.URLParameters(a.amqp))
    ch = conn.channel()
    q = ch.queue_declare(jobs_queue(a.base), passive=True).method.message_count
    d = ch.queue_declare(jobs_queue(a.base) + ".dead", passive=True).method.message_count
    conn.close()
    check("job queue empty, nothing dead-lettered", q == 0 and d == 0, f"queue {q}, dead {d}")
    steps = [float(r.get("pipeline_ms") or 0) for r in recs.values() if r.get("status") == "done"]
    if steps:
        print(f"pipeline_ms per job: min {min(steps):.0f}, max {max(steps):.0f}; wall {wall:.1f} s for {len(ids)} jobs",
              flush=True)
    for i in ids:
        p.redis.delete(job_key(i), f"katz:job:{i}:image")
    failed = [n for n, ok, _ in results if not ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
