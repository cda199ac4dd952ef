"""Checks of katz's Helm chart as `helm template` renders it (tools/test_helm.py uses them).

```text
rendered YAML ─▶ Kubernetes kinds ─▶ kubernetes-validate, strict (unknown fields refused), per version
              ─▶ KEDA kinds ──────▶ the CRD's openAPIV3Schema (jsonschema; unknown fields refused as the
                                    API server's strict field validation does) + its CEL rules (cel-python)
              ─▶ invariants ──────▶ against the values the chart was rendered with: one ScaledObject
                                    per queue naming its own Deployment, probes, drain, GPUs, secrets
```

Each check returns the problems it found (empty: none), so a test can also feed it a broken
manifest and see the problem named.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import celpy
import jsonschema
import kubernetes_validate
import yaml

KEDA_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
}
METRICS_PORT = 9187


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def merge_values(base: dict, over: dict) -> dict:
    """Helm's values overlay: maps merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --- schemas -------------------------------------------------------------------------------


def validate_kubernetes(doc: dict, versions: list[str]) -> list[str]:
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    problems = []
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name} (Kubernetes {v}): {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no Kubernetes {v} schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return problems


def _structural(schema: dict) -> dict:
    """A CRD openAPIV3Schema as JSON Schema: `nullable` as a null type, and objects with listed
    properties closed (the API server's strict field validation refuses unknown fields), unless
    they keep unknown fields or take a map."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not schema.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _structural(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            s[key] = [_structural(x) for x in schema[key]]
    return s


def _cel_rules(schema: dict, path: tuple = ()):  # -> (path, rule, message)
    for r in schema.get("x-kubernetes-validations", []):
        yield path, r["rule"], r.get("message", r["rule"])
    for k, sub in schema.get("properties", {}).items():
        yield from _cel_rules(sub, path + (k,))


class CrdSchemas:
    """KEDA's CRDs (keda.sh_*.yaml from a KEDA release), read from a directory."""

    def __init__(self, directory: Path):
        self.by_kind = {}
        for key, file in KEDA_KINDS.items():
            crd = yaml.safe_load((directory / file).read_text())
            group, version = key[0].split("/")
            assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == key[1], file
            (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            raw = ver["schema"]["openAPIV3Schema"]
            schema = _structural(raw)
            # metadata is the API server's ObjectMeta, checked by the API server, not the CRD
            schema["properties"]["metadata"] = {"type": "object"}
            self.by_kind[key] = (jsonschema.Draft7Validator(schema), list(_cel_rules(raw)))

    def validate(self, doc: dict) -> list[str]:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        validator, rules = self.by_kind[key]
        problems = [f"{name} (KEDA CRD): {e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(doc)]
        env = celpy.Environment()
        for path, rule, message in rules:
            node = doc
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                continue
            ok = env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(node)})
            if not bool(ok):
                problems.append(f"{name} (KEDA CRD rule at {'.'.join(path)}): {message}")
        return problems


def validate_all(docs: list[dict], crds: CrdSchemas, versions: list[str]) -> list[str]:
    problems = []
    for d in docs:
        if (d.get("apiVersion"), d.get("kind")) in KEDA_KINDS:
            problems += crds.validate(d)
        else:
            problems += validate_kubernetes(d, versions)
    return problems


# --- invariants ----------------------------------------------------------------------------


def _model(entry: dict, values: dict) -> dict:
    """A model's settings: `defaults`, each key the entry gives replacing the default's."""
    return {**copy.deepcopy(values["defaults"]), **entry}


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _env(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def _plain(c: dict, name: str):
    e = _env(c).get(name)
    return None if e is None else e.get("value")


def bundle_path(values: dict, p: str) -> str:
    if p.startswith("/"):
        return p
    root = "/opt/katz/bundles" if values["bundles"]["source"] == "image" else values["bundles"]["mountPath"]
    return f"{root}/{p}"


def expected_workloads(values: dict) -> dict:
    """queue → what its Deployment must be, from the values."""
    out = {}
    for e in values["models"]:
        m = _model(e, values)
        services = [c["name"] for c in values.get("controlnets") or [] if c["base"] == m["name"]]
        out[f"katz.jobs.{m['name']}"] = {
            "kind": "worker",
            "model": m,
            "args": ["worker"],
            "env": {
                "KATZ_BUNDLE": bundle_path(values, m["bundle"]),
                "KATZ_CONTROLNET_SERVICES": ",".join(services) or None,
            },
        }
    bases = {e["name"]: _model(e, values) for e in values["models"]}
    for e in values.get("controlnets") or []:
        m = _model(e, values)
        out[f"katz.controlnet.{m['name']}"] = {
            "kind": "controlnet",
            "model": m,
            "args": ["controlnet-worker"],
            "env": {
                "KATZ_CONTROLNET_BUNDLE": bundle_path(values, m["bundle"]),
                "KATZ_BUNDLE": bundle_path(values, bases[m["base"]]["bundle"]),
            },
        }
    return out


def check_invariants(docs: list[dict], values: dict) -> list[str]:
    problems = []
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    expected = expected_workloads(values)

    # Deployments: one per queue, each consuming its own queue
    by_queue = {}
    for name, dep in deployments.items():
        q = _plain(_container(dep), "KATZ_QUEUE")
        if q in by_queue:
            problems.append(f"Deployments {by_queue[q]} and {name} both consume {q}")
        by_queue[q] = name
    if set(by_queue) != set(expected):
        problems.append(f"queues consumed {sorted(map(str, by_queue))} ≠ the values' {sorted(expected)}")

    secret_names = set()
    for q, want in expected.items():
        name = by_queue.get(q)
        if name is None:
            continue
        dep, m = deployments[name], want["model"]
        pod = dep["spec"]["template"]["spec"]
        c = _container(dep)
        env = _env(c)
        where = f"Deployment {name} ({q})"
        names = [e["name"] for e in c.get("env", [])]
        if len(names) != len(set(names)):
            problems.append(f"{where}: an environment variable is set twice: {sorted(names)}")
        if c.get("args") != want["args"]:
            problems.append(f"{where}: args {c.get('args')} ≠ {want['args']}")
        for k, v in want["env"].items():
            if _plain(c, k) != v:
                problems.append(f"{where}: {k} = {_plain(c, k)!r}, expected {v!r}")
        # probes on the metrics port, which KATZ_METRICS_ADDR serves
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if ports.get("metrics") != values["metricsPort"]:
            problems.append(f"{where}: no container port `metrics` = {values['metricsPort']}")
        if _plain(c, "KATZ_METRICS_ADDR") != f"0.0.0.0:{values['metricsPort']}":
            problems.append(f"{where}: KATZ_METRICS_ADDR = {_plain(c, 'KATZ_METRICS_ADDR')!r}")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") not in ("metrics", values["metricsPort"]):
                problems.append(f"{where}: {probe} is not GET {path} on the metrics port: {get}")
        # drain: the grace period covers it, and preStop waits for it
        drain = int(m.get("drainSeconds") or values["drainSeconds"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < drain:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} < drain {drain}")
        pre = " ".join((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command", []))
        if "kill -TERM 1" not in pre or "kill -0 1" not in pre:
            problems.append(f"{where}: preStop does not signal the worker and wait for its drain: {pre!r}")
        # GPUs
        gpu = str(m.get("gpu")).lower() == "true"
        limits = (c.get("resources") or {}).get("limits") or {}
        if gpu != (str(limits.get("nvidia.com/gpu")) == "1"):
            problems.append(f"{where}: gpu={gpu} but limits nvidia.com/gpu = {limits.get('nvidia.com/gpu')}")
        if _plain(c, "KATZ_DEVICE") != ("cuda:0" if gpu else "cpu"):
            problems.append(f"{where}: KATZ_DEVICE = {_plain(c, 'KATZ_DEVICE')!r} with gpu={gpu}")
        # the broker's and Redis's URLs come from the Secret
        for var, key in (("KATZ_AMQP", "amqp-url"), ("KATZ_REDIS", "redis-url")):
            ref = ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("key") != key or "value" in (env.get(var) or {}):
                problems.append(f"{where}: {var} is not read from a Secret's {key}")
            secret_names.add(ref.get("name"))
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it has no use for")
        if not values["keda"]["enabled"] and dep["spec"].get("replicas") != m["minReplicas"]:
            problems.append(f"{where}: replicas {dep['spec'].get('replicas')} ≠ minReplicas without KEDA")
        if values["keda"]["enabled"] and "replicas" in dep["spec"]:
            problems.append(f"{where}: sets replicas, which KEDA's HPA owns")
    if len(secret_names) != 1:
        problems.append(f"Deployments read the URLs from {sorted(map(str, secret_names))}, expected one Secret")
    want_secret = values["secret"]["existingSecret"] or None
    if want_secret and secret_names != {want_secret}:
        problems.append(f"Deployments read {secret_names}, not secret.existingSecret {want_secret}")
    if not want_secret and not secret_names <= set(secrets):
        problems.append(f"Secret {secret_names} is read but not rendered")

    # KEDA: one ScaledObject per queue, each on its own Deployment and queue
    if not values["keda"]["enabled"]:
        if scaled or auths:
            problems.append("keda.enabled is false but KEDA objects were rendered")
    else:
        seen_q, seen_dep = {}, {}
        for so in scaled:
            name = so["metadata"]["name"]
            (t,) = so["spec"]["triggers"]
            meta, q = t["metadata"], t["metadata"].get("queueName")
            target = so["spec"]["scaleTargetRef"]
            if q in seen_q:
                problems.append(f"ScaledObjects {seen_q[q]} and {name} both scale on {q}")
            seen_q[q] = name
            if target.get("name") in seen_dep:
                problems.append(f"ScaledObjects {seen_dep[target['name']]} and {name} both scale {target['name']}")
            seen_dep[target.get("name")] = name
            if target.get("kind", "Deployment") != "Deployment" or target.get("name") not in deployments:
                problems.append(f"ScaledObject {name}: scaleTargetRef {target} is not a rendered Deployment")
            elif by_queue.get(q) != target["name"]:
                problems.append(
                    f"ScaledObject {name}: scales {target['name']} on {q}, which {by_queue.get(q)} consumes"
                )
            if t["type"] != "rabbitmq" or meta.get("mode") != "QueueLength":
                problems.append(f"ScaledObject {name}: not KEDA's rabbitmq scaler in QueueLength mode: {t}")
            if meta.get("protocol") != values["keda"]["protocol"]:
                problems.append(f"ScaledObject {name}: protocol {meta.get('protocol')}")
            if any(k in meta for k in ("host", "hostFromEnv")) or "amqp://" in str(meta):
                problems.append(f"ScaledObject {name}: the broker's address is inlined in the trigger")
            want = expected.get(q)
            if want:
                m = want["model"]
                got = (so["spec"].get("minReplicaCount"), so["spec"].get("maxReplicaCount"))
                if got != (m["minReplicas"], m["maxReplicas"]):
                    problems.append(f"ScaledObject {name}: replicas {got} ≠ values {m['minReplicas'], m['maxReplicas']}")
                if meta.get("value") != str(m["queueLength"]):
                    problems.append(f"ScaledObject {name}: value {meta.get('value')} ≠ queueLength {m['queueLength']}")
            auth = auths.get((t.get("authenticationRef") or {}).get("name"))
            if auth is None:
                problems.append(f"ScaledObject {name}: authenticationRef names no rendered TriggerAuthentication")
            else:
                key = "rabbitmq-management-url" if values["keda"]["protocol"] == "http" else "amqp-url"
                refs = {(r["parameter"], r["name"], r["key"]) for r in auth["spec"].get("secretTargetRef", [])}
                if not any(p == "host" and n in secret_names and k == key for p, n, k in refs):
                    problems.append(f"TriggerAuthentication {auth['metadata']['name']}: host is not {key} of {secret_names}")
        if set(seen_q) != set(expected):
            problems.append(f"ScaledObjects scale on {sorted(map(str, seen_q))}, expected one per queue {sorted(expected)}")

    # no URL, and no password of one, in any object but the Secret
    urls = [values["rabbitmq"]["url"], values["redis"]["url"], values["rabbitmq"].get("managementUrl") or ""]
    # each URL, and its credentials part (`user:password@`)
    secrets_text = [u for u in urls if u] + re.findall(r"//([^/@]+@)", " ".join(urls))
    for d in docs:
        if d["kind"] == "Secret":
            continue
        text = yaml.safe_dump(d)
        for s in secrets_text:
            if s in text:
                problems.append(f"{d['kind']} {d['metadata']['name']}: holds {s!r} in plain text")
        if re.search(r"\b(amqps?|redis)://", text):
            problems.append(f"{d['kind']} {d['metadata']['name']}: holds a broker or Redis URL")
    return problems


def env_names_of_sources(paths: list[Path]) -> set[str]:
    """The KATZ_* variables that clap reads (`env = "KATZ_…"`) in these Rust sources."""
    return {m for p in paths for m in re.findall(r'env\s*=\s*"(KATZ_[A-Z0-9_]+)"', p.read_text())}
