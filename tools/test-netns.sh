#!/usr/bin/env bash
# Workers on separate hosts, over a real network: RabbitMQ + Redis, a base worker and a ControlNet
# worker each in a network namespace of their own, joined by veth pairs to a bridge that lives in a
# fourth namespace (so nothing of the host's network, firewall or services on 127.0.0.1 is touched).
# Jobs go through the ControlNet service (Redis residual transport); the ControlNet host's link is
# cut mid-session, once shorter and once longer than the base's retry window, then restored.
#
#   svc  10.77.0.1  redis-server, rabbitmq-server (own node name, ports, mnesia, logs, cookie)
#   base 10.77.0.2  katz worker --controlnet-service …      (metrics on :9187)
#   cn   10.77.0.3  katz controlnet-worker                   (metrics on :9188)
#   net             bridge kzbr; the link cut is `ip link set <cn's end> down` there
#
# Checks (each printed): jobs done through the service; a short outage mid-session → the session
# moves (controlnet_retries ≥ 1) and the job is done; a long outage → the job fails cleanly in
# bounded time (failed, error_kind controlnet, names the ControlNet), its message kept in the
# dead-letter queue, nothing left in flight; after the link is back, jobs are done again; the
# ControlNet worker's /readyz and metrics answer over the network.
#
# Needs root, iproute2, redis-server, rabbitmq-server, curl and target/release/katz (make build).
# `make test-netns` runs it. Ends with PASS or FAIL; removes its namespaces and processes even on
# failure (KATZ_NETNS_KEEP=1 keeps the logs in $WORK).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KATZ=${KATZ_BIN:-$ROOT/target/release/katz}
SUBNET=${KATZ_NETNS_SUBNET:-10.77.0}
STEP_TIMEOUT_MS=${KATZ_NETNS_STEP_TIMEOUT_MS:-3000}
RETRIES=${KATZ_NETNS_RETRIES:-4}
STEPS=${KATZ_NETNS_STEPS:-300}
ID=$$
NS_NET=kz$ID-net NS_SVC=kz$ID-svc NS_BASE=kz$ID-base NS_CN=kz$ID-cn
SVC=$SUBNET.1 BASE=$SUBNET.2 CN=$SUBNET.3
WORK=$(mktemp -d /tmp/katz-netns.XXXXXX)
AMQP="amqp://guest:guest@$SVC:5672/%2f"
REDIS="redis://$SVC:6379/"
BUNDLES=$ROOT/bundles/shapes
CN_MODEL=shapes-sdxl-controlnet
QUEUE=katz.jobs.shapes-sdxl
IMAGE=$BUNDLES/examples/red-circle-above-blue-square-edges.png
FAILED=0
PIDS=()

say() { printf '[netns %s] %s\n' "$(date +%T)" "$*"; }
ok() { say "ok    $*"; }
bad() { say "FAIL  $*"; FAILED=1; }
check() { # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
quiet() { "$@" >/dev/null 2>&1; }
rcli() { in_ns "$NS_SVC" redis-cli -h "$SVC" -p 6379 --raw "$@"; }
field() { rcli hget "katz:job:$1" "$2"; }
rmqctl() {
  in_ns "$NS_SVC" env HOME="$WORK/rmq/home" RABBITMQ_NODENAME="katz-netns@localhost" \
    /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "katz-netns@localhost" "$@"
}
messages_in() { rmqctl list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q { print $2 }'; }

cleanup() {
  local rc=$?
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  # every process left in our namespaces is one this script started (epmd, beam, katz …)
  for ns in "$NS_CN" "$NS_BASE" "$NS_SVC" "$NS_NET"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  done
  sleep 0.5
  for ns in "$NS_CN" "$NS_BASE" "$NS_SVC" "$NS_NET"; do ip netns del "$ns" 2>/dev/null; done
  if [ "$FAILED" != 0 ] || [ "$rc" != 0 ]; then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "---- tail of $f"; tail -n 25 "$f"; }; done
  fi
  if [ "${KATZ_NETNS_KEEP:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
  local left
  left=$(ip netns list | grep -c "^kz$ID-" || true)
  echo "cleanup: namespaces of this run left: $left"
  if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then echo "PASS"; else echo "FAIL"; exit 1; fi
}
trap cleanup EXIT
trap 'FAILED=1; exit 1' INT TERM

need() { command -v "$1" >/dev/null || { bad "missing $1 ($2)"; exit 1; }; }
[ "$(id -u)" = 0 ] || { bad "needs root (network namespaces)"; exit 1; }
need ip "apt-get install iproute2"
need redis-server "apt-get install redis-server"
need redis-cli "apt-get install redis-tools"
need curl "apt-get install curl"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { bad "missing rabbitmq-server (apt-get install rabbitmq-server)"; exit 1; }
[ -x "$KATZ" ] || { bad "missing $KATZ (make build)"; exit 1; }

# ---- the network: one bridge in its own namespace, a veth pair per host ----
say "network: bridge in $NS_NET; svc $SVC, base $BASE, cn $CN"
ip netns add "$NS_NET" || exit 1
ip -n "$NS_NET" link add kzbr type bridge
ip -n "$NS_NET" link set kzbr up
host_if() { # host_if NS ADDR END: veth END (bridge side) ↔ eth0 in NS
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$NS_NET" link add "$3" type veth peer name eth0 netns "$1"
  ip -n "$NS_NET" link set "$3" master kzbr up
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" link set eth0 up
}
host_if "$NS_SVC" "$SVC" to-svc || exit 1
host_if "$NS_BASE" "$BASE" to-base || exit 1
host_if "$NS_CN" "$CN" to-cn || exit 1

# ---- services inside svc ----
in_ns "$NS_SVC" redis-server --port 6379 --bind "$SVC" --protected-mode no --save "" --appendonly no \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
R=$WORK/rmq
mkdir -p "$R/mnesia" "$R/log" "$R/home"
echo "[]." >"$R/enabled_plugins"
printf 'loopback_users = none\nlisteners.tcp.default = %s:5672\n' "$SVC" >"$R/rabbitmq.conf"
in_ns "$NS_SVC" env HOME="$R/home" RABBITMQ_NODENAME=katz-netns@localhost RABBITMQ_NODE_IP_ADDRESS="$SVC" \
  RABBITMQ_NODE_PORT=5672 RABBITMQ_DIST_PORT=25672 RABBITMQ_MNESIA_BASE="$R/mnesia" \
  RABBITMQ_LOG_BASE="$R/log" RABBITMQ_CONFIG_FILE="$R/rabbitmq.conf" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$R/enabled_plugins" RABBITMQ_PID_FILE="$R/pid" \
  /usr/lib/rabbitmq/bin/rabbitmq-server >"$WORK/rabbitmq.log" 2>&1 &
PIDS+=($!)
up() { in_ns "${2:-$NS_BASE}" bash -c "exec 3<>/dev/tcp/$SVC/$1" 2>/dev/null; }
for _ in $(seq 1 120); do up 6379 && up 5672 && break; sleep 1; done
if up 6379 && up 5672 && up 6379 "$NS_CN" && up 5672 "$NS_CN"; then
  ok "redis-server $SVC:6379 and rabbitmq-server $SVC:5672 (node katz-netns@localhost) answer from base and cn over the bridge"
else
  bad "redis-server or rabbitmq-server did not come up in $NS_SVC"
  exit 1
fi

# ---- workers ----
in_ns "$NS_CN" env KATZ_LOG=info,ort=warn "$KATZ" controlnet-worker --amqp "$AMQP" --redis "$REDIS" \
  --bundle "$BUNDLES/shapes-sdxl-controlnet" --base "$BUNDLES/shapes-sdxl" --concurrency 2 \
  --threads 1 --idle-s 30 --name cn-netns --metrics-addr "$CN:9188" >"$WORK/cn.log" 2>&1 &
PIDS+=($!)
in_ns "$NS_BASE" env KATZ_LOG=info,ort=warn "$KATZ" worker --amqp "$AMQP" --redis "$REDIS" \
  --bundle "$BUNDLES/shapes-sdxl" --controlnet-service "$CN_MODEL" --threads 1 --name base-netns \
  --controlnet-step-timeout-ms "$STEP_TIMEOUT_MS" --controlnet-retries "$RETRIES" \
  --metrics-addr "$BASE:9187" >"$WORK/base.log" 2>&1 &
PIDS+=($!)
ready() { in_ns "$NS_SVC" curl -sf -m 2 "http://$1/readyz" >/dev/null; }
for _ in $(seq 1 120); do ready "$BASE:9187" && ready "$CN:9188" && break; sleep 1; done
check "base worker /readyz (from svc, over the network): $(in_ns "$NS_SVC" curl -s -m 2 "http://$BASE:9187/readyz")" ready "$BASE:9187"
check "ControlNet worker /readyz (from svc, over the network): $(in_ns "$NS_SVC" curl -s -m 2 "http://$CN:9188/readyz")" ready "$CN:9188"

# ---- jobs ----
submit() { # submit ID STEPS: publishes (no wait)
  in_ns "$NS_SVC" "$KATZ" submit --amqp "$AMQP" --redis "$REDIS" --base shapes-sdxl --id "$1" \
    --steps "$2" --prompt "a red circle above a blue square" --seed 7 \
    --controlnet "$CN_MODEL=$IMAGE:1.0" >>"$WORK/submit.log" 2>&1
}
wait_final() { # wait_final ID SECONDS → prints the status; fails on time out
  local t0=$SECONDS s=""
  while [ $((SECONDS - t0)) -lt "$2" ]; do
    s=$(field "$1" status)
    case "$s" in done | failed | cancelled) echo "$s"; return 0 ;; esac
    sleep 0.2
  done
  echo "${s:-none} after $2 s"
  return 1
}
wait_step() { # wait_step ID N SECONDS: until the job's step ≥ N
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$3" ]; do
    local s
    s=$(field "$1" step)
    [ -n "$s" ] && [ "$s" -ge "$2" ] && return 0
    sleep 0.05
  done
  return 1
}
ID_PFX=netns-$ID
WINDOW_S=$(((RETRIES + 1) * STEP_TIMEOUT_MS / 1000))

say "phase 1: jobs through the ControlNet service (Redis residual transport)"
for i in 1 2; do
  submit "$ID_PFX-ok$i" 8
  st=$(wait_final "$ID_PFX-ok$i" 120)
  check "job ok$i: $st, controlnet_retries=$(field "$ID_PFX-ok$i" controlnet_retries), image_bytes=$(field "$ID_PFX-ok$i" image_bytes)" \
    test "$st" = done
done
steps=$(in_ns "$NS_SVC" curl -s -m 2 "http://$CN:9188/metrics" | awk '/^katz_controlnet_steps_total/ { print $2 }')
check "ControlNet worker answered steps (katz_controlnet_steps_total = ${steps:-none})" test "${steps:-0}" -ge 16

say "phase 2: the ControlNet host's link down mid-session for 5 s (< the retry window of ${WINDOW_S} s)"
J=$ID_PFX-short
submit "$J" "$STEPS"
if wait_step "$J" 2 60; then
  ip -n "$NS_NET" link set to-cn down
  say "link to cn DOWN at step $(field "$J" step)"
  sleep 5
  ip -n "$NS_NET" link set to-cn up
  say "link to cn UP at step $(field "$J" step)"
else
  bad "job $J never reached step 2"
fi
st=$(wait_final "$J" $((WINDOW_S + 120)))
retries=$(field "$J" controlnet_retries)
check "job short-outage: $st (error: $(field "$J" error))" test "$st" = done
check "its session moved to a new one after the step timeout (controlnet_retries=$retries)" test "${retries:-0}" -ge 1

say "phase 3: the link down for $((WINDOW_S + 8)) s (> the retry window): the job must fail cleanly"
J=$ID_PFX-long
dead_before=$(messages_in "$QUEUE.dead")
submit "$J" "$STEPS"
if wait_step "$J" 2 60; then
  ip -n "$NS_NET" link set to-cn down
  say "link to cn DOWN at step $(field "$J" step)"
  t0=$SECONDS
  st=$(wait_final "$J" $((WINDOW_S + 8)))
  took=$((SECONDS - t0))
  check "job long-outage ended while the link was down: $st after ${took} s (bound $((WINDOW_S + 8)) s)" test "$st" = failed
  kind=$(field "$J" error_kind) err=$(field "$J" error)
  check "error_kind=$kind, error: $err" bash -c '[ "$1" = controlnet ] && [[ "$2" == *"$3"* ]]' _ "$kind" "$err" "$CN_MODEL"
  sleep $((WINDOW_S + 8 - took > 0 ? WINDOW_S + 8 - took : 0))
  ip -n "$NS_NET" link set to-cn up
  say "link to cn UP"
else
  bad "job $J never reached step 2"
fi
sleep 1
dead_after=$(messages_in "$QUEUE.dead")
check "its message is kept in $QUEUE.dead (${dead_before:-0} → ${dead_after:-0}): nothing lost" \
  test "${dead_after:-0}" -eq $((${dead_before:-0} + 1))
check "nothing left in flight: $QUEUE has $(messages_in "$QUEUE") messages" test "$(messages_in "$QUEUE")" = 0

say "phase 4: after the link is back, jobs are done again"
for _ in $(seq 1 60); do ready "$CN:9188" && break; sleep 1; done
check "ControlNet worker /readyz after the outage: $(in_ns "$NS_SVC" curl -s -m 2 "http://$CN:9188/readyz")" ready "$CN:9188"
for i in 1 2; do
  submit "$ID_PFX-after$i" 8
  st=$(wait_final "$ID_PFX-after$i" 180)
  check "job after$i: $st (controlnet_retries=$(field "$ID_PFX-after$i" controlnet_retries))" test "$st" = done
done
m=$(in_ns "$NS_SVC" curl -s -m 2 "http://$BASE:9187/metrics")
say "base worker metrics: $(grep -E '^katz_jobs_total' <<<"$m" | tr '\n' ' ')"
say "base worker metrics: $(grep -E '^katz_job_errors_total.*error_kind="controlnet"' <<<"$m" | tr '\n' ' ')"
say "base worker metrics: $(grep -E '^katz_queue_messages' <<<"$m" | tr '\n' ' ')"
check "base worker counted the failure (katz_job_errors_total{error_kind=controlnet} ≥ 1)" \
  grep -qE '^katz_job_errors_total\{model="shapes-sdxl",error_kind="controlnet"\} [1-9]' <<<"$m"
c=$(in_ns "$NS_SVC" curl -s -m 2 "http://$CN:9188/metrics")
say "ControlNet worker metrics: $(grep -E '^katz_controlnet_(sessions_total|steps_total)' <<<"$c" | tr '\n' ' ')"
exit 0
