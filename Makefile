# The two commands of the README, and what they need.
#   make demo    the embedded demo (tiny bundles, one ControlNet, one LoRA, CPU)
#   make test    every test (unit, parity against diffusers, CLI, integration)
#   make test-gateway-fuzz   schemathesis against a running gateway's /openapi.json: no 5xx (not
#                in make test: its own venv, minutes of requests)
#   make soak    MINUTES (5) at saturation on 2 workers, good and bad jobs, a worker killed every
#                KILL_S (90) s: RSS per worker, jobs lost / duplicated / misjudged (tests/soak.rs)
ORT_VERSION ?= 1.31.1
ORT_LIB := .katz/ort/libonnxruntime.so.$(ORT_VERSION)
CARGO ?= cargo

.PHONY: demo test build services export pyenv test-export soak test-gateway-fuzz

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
	$(CARGO) test --release --workspace --all-targets
	.katz/py/bin/python -m pytest -q tools/test_producer.py tools/test_compose.py tools/test_demo.py

test-gateway-fuzz: services
	$(CARGO) build --release -p katz
	tools/gateway-fuzz.sh

MINUTES ?= 5
KILL_S ?= 90
soak: $(ORT_LIB) services
	KATZ_SOAK_MINUTES=$(MINUTES) KATZ_SOAK_KILL_S=$(KILL_S) $(CARGO) test --release --test soak -- --ignored --nocapture

# Rebuilds the committed tiny bundles and parity references (torch + diffusers, in .venv-tools).
export:
	tools/export.sh

# The exporter's checkpoint inputs (tools/test_checkpoints.py) in .venv-tools, which make test does
# not build (torch + diffusers); pytest is not among its pins, so it is added here.
test-export:
	tools/export.sh --help >/dev/null
	.venv-tools/bin/pip install -q pytest==9.2.0
	.venv-tools/bin/python -m pytest -q tools/test_checkpoints.py
