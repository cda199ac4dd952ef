"""Structure of compose/docker-compose.yml (no container engine runs here: see compose/README.md)."""
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"


def load():
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_healthchecks():
    c = load()
    s = c["services"]
    assert {"rabbitmq", "redis", "worker", "worker-gpu"} <= set(s)
    for name in ("rabbitmq", "redis"):
        assert s[name]["healthcheck"]["test"], name
    assert "management" in s["rabbitmq"]["image"]
    for w in ("worker", "worker-gpu"):
        assert s[w]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert s[w]["stop_signal"] == "SIGTERM"
        assert (COMPOSE.parent / s[w]["build"]["context"] / s[w]["build"]["dockerfile"]).resolve().is_file()
    # guest only connects from localhost: the broker needs a user the workers can use
    user = s["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    assert user != "guest" and f"//{user}:" in s["worker"]["environment"]["KATZ_AMQP"]


def test_gpu_worker_reserves_a_gpu_and_asks_for_cuda():
    g = load()["services"]["worker-gpu"]
    assert g["profiles"] == ["gpu"]
    dev = g["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] >= 1
    assert g["environment"]["KATZ_DEVICE"].startswith("cuda:")


def test_worker_environment_names_real_flags():
    env = load()["services"]["worker"]["environment"]
    katz = ROOT / "target" / "release" / "katz"
    help_text = subprocess.run([str(katz), "worker", "--help"], capture_output=True, text=True, check=True).stdout
    for var in env:
        assert f"env: {var}=" in help_text or f"[env: {var}" in help_text, f"{var} is no `katz worker` option"


def test_dockerfiles_end_in_the_katz_entrypoint():
    for f in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "compose" / f).read_text()
        assert 'ENTRYPOINT ["katz"]' in text and 'CMD ["worker"]' in text, f
        assert "ORT_DYLIB_PATH" in text
