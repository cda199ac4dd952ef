"""Structure of the compose deployment (compose/), checked without a container engine.

`make test-compose` (tools/test-compose.sh) builds the images and runs jobs through the stack;
this file, in `make test`, keeps the files it runs honest: services and profiles, healthchecks,
secrets only from .env, ports on the configured address (never the host's 5672/6379), Redis's
password and memory policy, one GPU per GPU service, bundles mounted, the worker environment
against `katz worker`'s flags, the Dockerfiles' layout and the build context's filter.
"""
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "compose" / ".env.example"
WORKERS = ("worker", "worker-cn", "worker-gpu-0", "worker-gpu-1")
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def load():
    return yaml.safe_load(COMPOSE.read_text())


def services():
    return load()["services"]


def default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_services_profiles_and_healthchecks():
    s = services()
    assert {"rabbitmq", "redis", "worker", "worker-cn", "controlnet", "worker-gpu-0", "worker-gpu-1"} <= set(s)
    assert "profiles" not in s["rabbitmq"] and "profiles" not in s["redis"]
    assert s["worker"]["profiles"] == ["cpu"]
    assert s["worker-cn"]["profiles"] == ["cn"] and s["controlnet"]["profiles"] == ["cn"]
    for name in ("rabbitmq", "redis"):
        assert s[name]["healthcheck"]["test"], name
        assert s[name]["restart"] == "unless-stopped", name
    assert "management" in default(s["rabbitmq"]["image"])
    for w in WORKERS:
        assert s[w]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", w
        assert s[w]["depends_on"]["redis"]["condition"] == "service_healthy", w
        assert s[w]["stop_signal"] == "SIGTERM" and s[w]["restart"] == "unless-stopped", w
        assert (COMPOSE.parent / s[w]["build"]["context"] / s[w]["build"]["dockerfile"]).resolve().is_file(), w
        # healthy = ready to take jobs: GET /readyz on the metrics address
        test = " ".join(s[w]["healthcheck"]["test"])
        assert "/readyz" in test and ":9187/" in test, w
        assert s[w]["environment"]["KATZ_METRICS_ADDR"].endswith(":9187"), w
        assert any(str(p).endswith(":9187") for p in s[w]["ports"]), f"{w} publishes no metrics port"
    assert s["controlnet"]["command"][0] == "controlnet-worker"
    assert s["controlnet"]["restart"] == "unless-stopped"


def test_secrets_come_from_env_and_the_broker_has_its_own_user():
    s = services()
    rabbit = s["rabbitmq"]["environment"]
    assert rabbit["RABBITMQ_DEFAULT_PASS"].startswith("${KATZ_RABBITMQ_PASSWORD:?")
    # guest only connects from localhost: the broker needs a user the workers can use
    user = default(rabbit["RABBITMQ_DEFAULT_USER"])
    assert user != "guest"
    for w in (*WORKERS, "controlnet"):
        env = s[w]["environment"]
        assert f"//{rabbit['RABBITMQ_DEFAULT_USER']}:${{KATZ_RABBITMQ_PASSWORD:?" in env["KATZ_AMQP"], w
        assert env["KATZ_REDIS"].startswith("redis://:${KATZ_REDIS_PASSWORD:?"), w
    # no literal password in any setting: every one is a variable
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    assert not re.search(r"(PASS|PASSWORD)\w*:\s*[A-Za-z0-9]", text)
    assert not re.search(r"amqp://\w+:\w", text) and not re.search(r"redis://:\w", text)


def test_env_example_lists_every_variable_and_holds_no_secret():
    used = set(VAR.findall(COMPOSE.read_text()))
    example = ENV_EXAMPLE.read_text()
    listed = set(re.findall(r"^#?([A-Z0-9_]+)=", example, re.M))
    assert used <= listed, f"not in compose/.env.example: {sorted(used - listed)}"
    for name in ("KATZ_RABBITMQ_PASSWORD", "KATZ_REDIS_PASSWORD"):
        assert re.search(rf"^{name}=$", example, re.M), f"{name} must be empty in the example"
    assert "/compose/.env" in (ROOT / ".gitignore").read_text().split()


def test_ports_bind_the_configured_address_and_not_the_hosts_services():
    s = services()
    for name, svc in s.items():
        for p in svc.get("ports", []):
            p = str(p)
            assert p.startswith("${KATZ_BIND:-127.0.0.1}:"), f"{name}: {p} is not on KATZ_BIND"
            host = default(p).split(":")[1]
            assert host not in ("5672", "6379", "15672"), f"{name}: {p} takes a port of the host's own services"


def test_redis_needs_a_password_and_keeps_results():
    cmd = [default(str(c)) for c in services()["redis"]["command"]]
    assert cmd[0] == "redis-server"
    args = dict(zip(cmd[1::2], cmd[2::2]))
    assert args["--requirepass"].startswith("${KATZ_REDIS_PASSWORD:?")
    assert args["--maxmemory"] and args["--maxmemory"] != "0"
    assert args["--maxmemory-policy"] in ("noeviction", "volatile-ttl")  # docs/protocol.md, "Keeping results"
    assert args["--appendonly"] == "yes"
    hc = " ".join(services()["redis"]["healthcheck"]["test"])
    assert "redis-cli" in hc and "REDISCLI_AUTH" in services()["redis"]["environment"]


def test_one_gpu_per_gpu_service():
    s = services()
    seen = []
    for i in (0, 1):
        g = s[f"worker-gpu-{i}"]
        assert g["profiles"] == ["gpu"]
        assert g["environment"]["KATZ_DEVICE"] == "cuda:0"  # the one card the container sees
        (dev,) = g["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert "count" not in dev and dev["device_ids"] == [str(i)]
        seen.append(dev["device_ids"][0])
        assert g["build"]["dockerfile"] == "compose/Dockerfile.gpu"
    assert len(set(seen)) == len(seen)


def test_bundles_are_mounted_and_named_by_absolute_paths():
    s = services()
    for w in (*WORKERS, "controlnet"):
        vols = [str(v) for v in s[w]["volumes"]]
        assert any(v.endswith(":/bundles:ro") for v in vols), w
        env = s[w]["environment"]
        for k in ("KATZ_BUNDLE", "KATZ_CONTROLNET_BUNDLE", "KATZ_LORA_DIR", "KATZ_CONTROLNETS"):
            if k in env and env[k] != "none":
                assert env[k].startswith("/bundles/"), f"{w}: {k}={env[k]} is not under the mounted /bundles"
    # the defaults name the committed tiny family
    for k, d in (("KATZ_BUNDLE", "shapes/shapes-sdxl"), ("KATZ_LORA_DIR", "shapes/loras")):
        assert (ROOT / "bundles" / default(s["worker"]["environment"][k]).removeprefix("/bundles/")).is_dir(), k
    assert (ROOT / "bundles" / default(s["controlnet"]["environment"]["KATZ_CONTROLNET_BUNDLE"])
            .removeprefix("/bundles/") / "bundle.json").is_file()


def help_text(*cmd):
    katz = ROOT / "target" / "release" / "katz"
    return subprocess.run([str(katz), *cmd, "--help"], capture_output=True, text=True, check=True).stdout


def test_worker_environment_names_real_flags():
    worker_help = help_text("worker")
    top_help = help_text()
    for w in WORKERS:
        for var in services()[w]["environment"]:
            if f"\n  {var} " in top_help:
                continue  # read by every command (the log filter, the trace export)
            assert f"env: {var}=" in worker_help or f"[env: {var}" in worker_help, f"{w}: {var} is no `katz worker` option"
    cn_help = help_text("controlnet-worker")
    for var in services()["controlnet"]["environment"]:
        if f"\n  {var} " not in top_help:
            assert f"[env: {var}" in cn_help, f"{var} is no `katz controlnet-worker` option"


def test_dockerfiles():
    for f in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "compose" / f).read_text()
        assert 'ENTRYPOINT ["katz"]' in text and 'CMD ["worker"]' in text, f
        assert "ORT_DYLIB_PATH" in text, f
        assert "COPY . ." not in text, f"{f}: copies the whole context"
        assert "--mount=type=cache" in text and "cargo build --release --locked" in text, f
        assert "WORKDIR /var/lib/katz" in text and "USER katz" in text, f
        assert "KATZ_BUNDLES=/opt/katz/bundles" in text, f


def test_build_context_holds_sources_and_committed_bundles_only():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the context is an allow-list"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    for a in allowed:
        assert not a.startswith(("target", ".katz", ".git", "bundles/sdxl")), a
        assert (ROOT / a).exists(), f"{a} is allowed but missing"
    tracked = subprocess.run(["git", "ls-files", "bundles"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for a in allowed:
        if a.startswith("bundles/"):
            assert any(t.startswith(a + "/") for t in tracked), f"{a}: not a committed bundle"
    # every crate of the workspace (read from Cargo.toml) and the ONNX Runtime fetch are in,
    # and each Dockerfile copies every crate
    members = [m for m in workspace_members() if m != "."]
    for need in ("Cargo.toml", "Cargo.lock", "src", "vendor", "tools/fetch-onnxruntime.sh", "bundles/shapes", *members):
        assert need in allowed, need
    for f in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "compose" / f).read_text()
        for m in members:
            assert f"COPY {m}/ {m}/" in text, f"{f} does not copy the workspace member {m}"


def workspace_members():
    text = (ROOT / "Cargo.toml").read_text()
    block = re.search(r"^members\s*=\s*\[(.*?)\]", text, re.S | re.M)
    assert block, "no workspace members in Cargo.toml"
    return re.findall(r'"([^"]+)"', block.group(1))
