"""The Helm chart compose/helm/katz, rendered by a real `helm` and checked (tools/test-helm.sh).

```text
values (chart defaults, compose/helm/tests/*.yaml) ─helm template─▶ manifests
   ─▶ Kubernetes schemas (kubernetes-validate, strict) and KEDA's CRD schemas (tools/helm_check.py)
   ─▶ invariants: one ScaledObject per queue naming its own Deployment and queue, probes on
      /readyz and /healthz, grace period ≥ drain, GPUs, URLs only in the Secret
bad values ─helm template─▶ refused, naming the problem;  broken manifests ─▶ the checks name them
```

Needs HELM (a helm binary) and KATZ_KEDA_CRDS (a directory with KEDA's keda.sh_scaledobjects.yaml
and keda.sh_triggerauthentications.yaml); tools/test-helm.sh provides both.
"""
import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

import helm_check as hc

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "compose" / "helm" / "katz"
TESTS = ROOT / "compose" / "helm" / "tests"
HELM = os.environ.get("HELM", "helm")
CRDS = Path(os.environ.get("KATZ_KEDA_CRDS", ROOT / ".katz" / "keda-crds"))
# oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas here
K8S = ["1.29.0", "1.37.0"]
RELEASE = "katz"


def helm(*args, check=True):
    r = subprocess.run([HELM, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {r.stderr}")
    return r


def render(values_file=None, *sets):
    args = ["template", RELEASE, str(CHART), "--namespace", "katz"]
    if values_file:
        args += ["-f", str(values_file)]
    for s in sets:
        args += ["--set", s]
    return hc.load_docs(helm(*args).stdout)


def values_of(values_file=None):
    v = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        v = hc.merge_values(v, yaml.safe_load(Path(values_file).read_text()))
    return v


@pytest.fixture(scope="module")
def crds():
    missing = [f for f in hc.KEDA_KINDS.values() if not (CRDS / f).is_file()]
    assert not missing, f"KEDA's CRDs {missing} are not in {CRDS} (tools/test-helm.sh says where they come from)"
    return hc.CrdSchemas(CRDS)


def test_helm_is_a_real_helm():
    out = helm("version", "--short").stdout
    assert out.startswith("v4.") or out.startswith("v3."), out


SCENARIOS = [None, "gpu-values.yaml", "hostpath-values.yaml", "initcontainer-values.yaml", "no-keda-values.yaml"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s or "defaults")
def test_rendered_manifests_validate_and_keep_the_invariants(scenario, crds):
    f = TESTS / scenario if scenario else None
    docs = render(f)
    values = values_of(f)
    assert docs, "nothing rendered"
    problems = hc.validate_all(docs, crds, K8S) + hc.check_invariants(docs, values)
    assert not problems, "\n".join(problems)
    kinds = sorted(d["kind"] for d in docs)
    n = len(values["models"]) + len(values.get("controlnets") or [])
    assert kinds.count("Deployment") == n
    assert kinds.count("ScaledObject") == (n if values["keda"]["enabled"] else 0)


def test_gpu_example_scales_each_model_on_its_own_queue(crds):
    docs = render(TESTS / "gpu-values.yaml")
    so = {d["spec"]["triggers"][0]["metadata"]["queueName"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert sorted(so) == [
        "katz.controlnet.sdxl-controlnet-canny",
        "katz.controlnet.sdxl-controlnet-depth",
        "katz.controlnet.sdxl-controlnet-openpose",
        "katz.jobs.sdxl",
        "katz.jobs.sdxl-turbo",
    ]
    assert so["katz.jobs.sdxl"]["spec"]["scaleTargetRef"]["name"] == "katz-worker-sdxl"
    assert so["katz.controlnet.sdxl-controlnet-depth"]["spec"]["scaleTargetRef"]["name"] == "katz-cn-sdxl-controlnet-depth"
    assert [so[q]["spec"]["minReplicaCount"] for q in sorted(so)] == [1, 0, 0, 1, 0]
    assert [so[q]["spec"]["maxReplicaCount"] for q in sorted(so)] == [6, 3, 2, 8, 4]
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    env = {n: {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]} for n, d in deps.items()}
    assert env["katz-worker-sdxl"]["KATZ_CONTROLNET_SERVICES"] == "sdxl-controlnet-canny,sdxl-controlnet-depth"
    assert env["katz-worker-sdxl-turbo"]["KATZ_CONTROLNET_SERVICES"] == "sdxl-controlnet-openpose"
    assert env["katz-worker-sdxl"]["KATZ_CONTROLNETS"] == "none"
    assert env["katz-worker-sdxl"]["KATZ_LORA_DIR"] == "/bundles/loras"
    assert env["katz-worker-sdxl-turbo"]["KATZ_CONCURRENCY"] == "2"
    assert env["katz-cn-sdxl-controlnet-openpose"]["KATZ_BUNDLE"] == "/bundles/sdxl-turbo"
    pods = {n: d["spec"]["template"]["spec"] for n, d in deps.items()}
    assert pods["katz-worker-sdxl-turbo"]["terminationGracePeriodSeconds"] == 150  # its own drain + 30
    assert pods["katz-worker-sdxl"]["terminationGracePeriodSeconds"] == 330
    for name, pod in pods.items():
        c = pod["containers"][0]
        assert c["image"] == "registry.example.com/katz:gpu", name
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert pod["volumes"] == [{"name": "bundles", "persistentVolumeClaim": {"claimName": "katz-bundles", "readOnly": True}}]
        assert c["volumeMounts"][0]["readOnly"] is True
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert d_annotations(deps[name])["prometheus.io/port"] == "9187"


def test_env_given_wins_once_and_cpu_pods_get_their_cores_as_threads():
    docs = render(None)
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    env = deps["katz-worker-tiny-sdxl"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KATZ_THREADS", "value": "2"} in env  # defaults.cpuResources.requests.cpu
    f = TESTS / "gpu-values.yaml"
    docs = render(None, "models[0].name=tiny-sdxl", "models[0].bundle=tiny-sdxl", "models[0].env.KATZ_THREADS=3",
                  "models[0].env.KATZ_CONCURRENCY=2")
    c = [d for d in docs if d["metadata"]["name"] == "katz-worker-tiny-sdxl"][0]["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), names
    assert {"name": "KATZ_THREADS", "value": "3"} in c["env"] and {"name": "KATZ_CONCURRENCY", "value": "2"} in c["env"]
    gpu = [d for d in render(f) if d["kind"] == "Deployment"]
    assert all("KATZ_THREADS" not in str(d) for d in gpu)


def d_annotations(dep):
    return dep["spec"]["template"]["metadata"]["annotations"]


def test_env_names_are_options_of_the_commands():
    """Every KATZ_* variable the chart sets is read by `katz worker` / `katz controlnet-worker`."""
    cmd = ROOT / "src" / "cmd"
    worker = hc.env_names_of_sources([cmd / "worker.rs", cmd / "lora_args.rs", cmd / "mod.rs"])
    controlnet = hc.env_names_of_sources([cmd / "controlnet_worker.rs", cmd / "mod.rs"])
    # the ControlNet worker's probes and metrics on --metrics-addr (KATZ_METRICS_ADDR, as the
    # base worker's) are the interface the chart assumes for it
    controlnet |= {"KATZ_METRICS_ADDR"}
    docs = render(TESTS / "gpu-values.yaml")
    for d in (d for d in docs if d["kind"] == "Deployment"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        known = worker if c["args"] == ["worker"] else controlnet
        unknown = {e["name"] for e in c["env"]} - known
        assert not unknown, f"{d['metadata']['name']}: {unknown} are not options of katz {c['args'][0]}"


def test_lint_strict():
    for f in [None, TESTS / "gpu-values.yaml"]:
        args = ["lint", "--strict", str(CHART)] + (["-f", str(f)] if f else [])
        r = helm(*args, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_notes_say_how_to_submit_a_job():
    r = helm("install", RELEASE, str(CHART), "--dry-run=client", "-n", "katz", "-f", str(TESTS / "gpu-values.yaml"))
    notes = r.stdout.split("NOTES:", 1)[1]
    assert "katz submit --base sdxl" in notes and "exec deploy/katz-worker-sdxl" in notes
    assert "katz.controlnet.sdxl-controlnet-openpose" in notes
    # ControlNets at zero whose base keeps the default step timeout are pointed out
    assert "scales to zero" not in notes  # the example raises the timeout on both bases
    r = helm("install", RELEASE, str(CHART), "--dry-run=client", "--set", "controlnets[0].minReplicas=0",
             "--set", "controlnets[0].name=cn", "--set", "controlnets[0].bundle=cn", "--set", "controlnets[0].base=tiny-sdxl")
    assert "ControlNet cn scales to zero" in r.stdout.split("NOTES:", 1)[1]


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"controlnets": [{"name": "cn", "bundle": "cn", "base": "nope"}]}, 'base "nope" is not a name in models'),
        (
            {"models": [{"name": "tiny-sdxl", "bundle": "a"}, {"name": "Tiny_SDXL", "bundle": "b"}]},
            "give the same Deployment name",
        ),
        ({"bundles": {"source": "nfs"}}, 'bundles.source "nfs"'),
        ({"keda": {"protocol": "http"}}, "rabbitmq.managementUrl is required"),
        ({"rabbitmq": {"enabled": True, "auth": {"password": "p"}}}, "needs the Bitnami rabbitmq dependency"),
        ({"models": [{"name": "tiny-sdxl", "bundle": "a", "minReplicas": 3, "maxReplicas": 2}]}, "minReplicas ≤ maxReplicas"),
        ({"bundles": {"source": "initContainer"}}, "bundles.initContainer.image is required"),
        ({"models": [{"name": "a:b", "bundle": "a"}], "controlnets": []}, "must be a bundle name"),
        ({"models": [{"name": "m"}], "controlnets": []}, "models[m].bundle is required"),
        ({"rabbitmq": {"url": ""}}, "rabbitmq.url (or secret.existingSecret) is required"),
        ({"defaults": {"env": {"KATZ_AMQP": "amqp://x"}}}, "KATZ_AMQP is set by the chart"),
    ],
)
def test_bad_values_are_refused_naming_the_problem(overlay, message, tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(overlay))
    r = helm("template", RELEASE, str(CHART), "-f", str(f), check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def _break(docs, kind, name_part, fn):
    docs = copy.deepcopy(docs)
    for d in docs:
        if d["kind"] == kind and name_part in d["metadata"]["name"]:
            fn(d)
            return docs
    raise AssertionError(f"no {kind} {name_part}")


def _c(d):
    return d["spec"]["template"]["spec"]["containers"][0]


BROKEN = {
    "queue of another model": (
        "ScaledObject", "worker-sdxl-turbo",
        lambda d: d["spec"]["triggers"][0]["metadata"].update(queueName="katz.jobs.sdxl"),
        "both scale on katz.jobs.sdxl",
    ),
    "another Deployment": (
        "ScaledObject", "cn-sdxl-controlnet-depth",
        lambda d: d["spec"]["scaleTargetRef"].update(name="katz-cn-sdxl-controlnet-canny"),
        "both scale katz-cn-sdxl-controlnet-canny",
    ),
    "inlined AMQP URL": (
        "Deployment", "worker-sdxl",
        lambda d: _c(d)["env"].__setitem__(0, {"name": "KATZ_AMQP", "value": "amqp://katz:katz@rabbitmq:5672/%2f"}),
        "KATZ_AMQP is not read from a Secret",
    ),
    "grace below drain": (
        "Deployment", "worker-sdxl",
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds 30 < drain 300",
    ),
    "readiness elsewhere": (
        "Deployment", "cn-sdxl-controlnet-canny",
        lambda d: _c(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "readinessProbe is not GET /readyz",
    ),
    "no GPU": (
        "Deployment", "worker-sdxl-turbo",
        lambda d: _c(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "gpu=True but limits",
    ),
    "min above max": (
        "ScaledObject", "worker-sdxl-turbo",
        lambda d: d["spec"].update(minReplicaCount=9),
        "minReplicaCount must be less than or equal to maxReplicaCount",
    ),
    "unknown KEDA field": (
        "ScaledObject", "worker-sdxl",
        lambda d: d["spec"].update(minReplicas=1),
        "Additional properties are not allowed ('minReplicas'",
    ),
    "unknown pod field": (
        "Deployment", "worker-sdxl",
        lambda d: _c(d).update(gpus=1),
        "Additional properties are not allowed ('gpus'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_checks_name_a_broken_manifest(case, crds):
    kind, name, fn, message = BROKEN[case]
    f = TESTS / "gpu-values.yaml"
    docs = _break(render(f), kind, name, fn)
    problems = hc.validate_all(docs, crds, K8S) + hc.check_invariants(docs, values_of(f))
    assert any(message in p for p in problems), "\n".join(problems) or "no problem found"
