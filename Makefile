# The two commands of the README, and what they need.
#   make demo    the embedded demo (tiny bundles, one ControlNet, one LoRA, CPU)
#   make test    every test (unit, parity against diffusers, CLI, integration)
#   make test-helm  the Helm chart compose/helm/katz rendered by helm and checked against the
#                Kubernetes and KEDA schemas (tools/test-helm.sh installs what it needs)
#   make test-netns  base worker, ControlNet worker and RabbitMQ + Redis on three network
#                namespaces; the ControlNet host's link cut mid-session (root; tools/test-netns.sh)
#   make test-gateway-fuzz   schemathesis against a running gateway's /openapi.json: no 5xx (not
#                in make test: its own venv, minutes of requests)
#   make soak    MINUTES (5) at saturation on 2 workers, good and bad jobs, a worker killed every
#                KILL_S (90) s: RSS per worker, jobs lost / duplicated / misjudged (tests/soak.rs)
#   make test-compose  the docker-compose stack for real: builds the images, runs jobs through
#                it with workers restarted mid-job, tears it down (needs Docker; not in make test)
ORT_VERSION ?= 1.31.1
ORT_LIB := .katz/ort/libonnxruntime.so.$(ORT_VERSION)
CARGO ?= cargo

.PHONY: demo test build services export pyenv test-export soak test-helm test-compose test-netns test-gateway-fuzz

$(ORT_LIB): tools/fetch-onnxruntime.sh
	ORT_VERSION=$(ORT_VERSION) tools/fetch-onnxruntime.sh

build: $(ORT_LIB)
	$(CARGO) build --release

demo: build
	./target/release/katz demo --output demo.png

services:
	tools/services.sh

pyenv:
	tools/py-env.sh >/dev/null

test: $(ORT_LIB) services pyenv
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "make test: the gateway test drives Chromium headless: apt-get install chromium" >&2; exit 1; }
	$(CARGO) test --release --workspace --all-targets
	.katz/py/bin/python -m pytest -q tools/test_producer.py tools/test_compose.py tools/test_demo.py tools/test_job_prelude.py tools/test_step_rewrite.py

# Needs root and network namespaces (CI machines may lack them), so `make test` leaves it out.
test-netns: build
	tools/test-netns.sh

test-gateway-fuzz: services
	$(CARGO) build --release -p katz
	tools/gateway-fuzz.sh

MINUTES ?= 5
KILL_S ?= 90
soak: $(ORT_LIB) services
	KATZ_SOAK_MINUTES=$(MINUTES) KATZ_SOAK_KILL_S=$(KILL_S) $(CARGO) test --release --test soak -- --ignored --nocapture

test-compose:
	bash tools/test-compose.sh

# Rebuilds the committed tiny bundles and parity references (torch + diffusers, in .venv-tools).
export:
	tools/export.sh

# The exporter's checkpoint inputs and its fp8 rewrite (tools/test_checkpoints.py,
# tools/test_fp8_rewrite.py) in .venv-tools, which make test does not build (torch + diffusers);
# pytest is not among its pins, so it is added here.
test-export:
	tools/export.sh --help >/dev/null
	.venv-tools/bin/pip install -q pytest==9.2.0
	.venv-tools/bin/python -m pytest -q tools/test_checkpoints.py tools/test_fp8_rewrite.py

# The Helm chart (compose/helm/katz): helm template with the default and example values, the
# manifests validated against Kubernetes' and KEDA's schemas, and the chart's invariants.
test-helm:
	tools/test-helm.sh
